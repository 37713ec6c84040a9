//! The SQLite backend: one file, `host.db`, in WAL mode, with explicit SQL. The embedded
//! default: one server, no database to run. `PRAGMA user_version` says which of
//! [`MIGRATIONS`] a file has had.
//!
//! Its methods are `async` to match [`super::postgres`], but run in place: one connection
//! behind a mutex, each statement a local file operation (SQLite serialises writers anyway).
//!
//! The write-ahead log is folded into `host.db` by a thread of its own ([`Checkpointer`]),
//! not by whichever commit crosses SQLite's threshold: that commit would copy a thousand
//! pages and wait for the disk with the connection held, stalling every call behind it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    AliasRow, AliasTarget, BundleRow, Canary, Completed, Dialect, EVALUATION_COLUMNS,
    EVALUATION_STOPPED, Entry, EvaluationSummary, Finished, Gate, MIGRATIONS, MINUTE_MS, MoveRow,
    NewBundle, NewEvaluation, NewRun, RUN_COLUMNS, RunFilter, RunRow, Usage, check_version,
    class_counts,
};

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";

/// How often the checkpointer folds the write-ahead log into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// The write-ahead log's file is cut back to this size when the log starts over.
const WAL_KEPT: i64 = 64 << 20;
/// The checkpointer starts the log over once it holds this many bytes (see [`Checkpointer`]).
const RESTART_AT: i64 = 32 << 20;

pub struct Sqlite {
    conn: Mutex<Connection>,
    path: PathBuf,
    _checkpointer: Checkpointer,
}

/// A thread with its own connection that folds the write-ahead log into the database every
/// [`CHECKPOINT_EVERY`] without blocking writers (a passive checkpoint copies what the log
/// holds while calls keep committing). Under a steady load the log never ends folded (calls
/// commit while it is copied), so SQLite never starts it over and it would grow for ever:
/// once it is past [`RESTART_AT`], the round also folds the few pages committed meanwhile
/// with writers held back (a restarting checkpoint, skipped for the round when a reader or a
/// writer is busy), so the log starts over. Writers wait for that (the file is synced
/// meanwhile, milliseconds), so it is done when needed, not every round: at 1,200 trivial
/// calls a second (47 KB of log each), every third round. Stopped, and joined, when dropped.
struct Checkpointer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Checkpointer> {
        let conn = Connection::open(path).with_context(|| {
            format!(
                "failed to open the run store `{}` to checkpoint it",
                path.display()
            )
        })?;
        // A restarting checkpoint holds writers back while it waits for readers: it does not
        // wait (a reader left open, an operator's shell, would stall every call), it tries
        // again next round.
        conn.busy_timeout(Duration::ZERO)?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = stop.clone();
        let shown = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("host-checkpoint".into())
            .spawn(move || {
                let (lock, wake) = &*stopped;
                let mut failing = false;
                loop {
                    let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let (guard, _) = wake
                        .wait_timeout_while(guard, CHECKPOINT_EVERY, |stop| !*stop)
                        .unwrap_or_else(|e| e.into_inner());
                    if *guard {
                        return;
                    }
                    drop(guard);
                    let folded = fold(&conn);
                    // Said once when it starts failing, not four times a second.
                    match folded {
                        Err(e) if !failing => {
                            failing = true;
                            eprintln!(
                                "host: run store `{shown}`: folding the write-ahead log failed: {e}"
                            );
                        }
                        Err(_) => {}
                        Ok(_) => failing = false,
                    }
                }
            })
            .context("failed to start the run store's checkpointer")?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

/// One round of the [`Checkpointer`]: a passive checkpoint, then a restarting one if the log
/// holds [`RESTART_AT`] or more. (The passive one says how long the log was when it began;
/// calls committed meanwhile are in the log after that, so whether it is all folded now, it
/// cannot say.)
fn fold(conn: &Connection) -> rusqlite::Result<()> {
    let checkpoint = |mode: &str| {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            r.get::<_, i64>(1)
        })
    };
    let logged = checkpoint("PASSIVE")?;
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    if logged * page >= RESTART_AT {
        checkpoint("RESTART")?;
    }
    Ok(())
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long a statement waits for a lock another connection holds before it fails: the
/// checkpointer's (see [`Checkpointer`]) is held for milliseconds; longer is someone else, an
/// operator's shell holding a write transaction, say.
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// The first [`SHORT_WAITS`] waits for a lock are this short, the rest [`LONG_WAIT`].
const SHORT_WAIT: Duration = Duration::from_micros(100);
const SHORT_WAITS: u32 = 200;
const LONG_WAIT: Duration = Duration::from_millis(5);

/// SQLite's busy handler for the store's connection: waits up to [`LOCK_WAIT`] for a lock,
/// in short steps at first. SQLite's own (`busy_timeout`) sleeps 1, 2, 5, 10, 15 ms and so
/// on: a commit that met the checkpointer's lock, held 3 ms to sync the file, slept 33 ms
/// with the store's mutex held, every call of the server waiting behind it.
fn wait_for_lock(tries: i32) -> bool {
    match lock_wait(u32::try_from(tries).unwrap_or(u32::MAX)) {
        Some(wait) => {
            std::thread::sleep(wait);
            true
        }
        None => false,
    }
}

/// How long the `tries`-th wait for a lock lasts (counting from 0); None once the waits
/// before it add up to [`LOCK_WAIT`].
fn lock_wait(tries: u32) -> Option<Duration> {
    let (wait, waited) = match tries.checked_sub(SHORT_WAITS) {
        None => (SHORT_WAIT, SHORT_WAIT * tries),
        Some(long) => (
            LONG_WAIT,
            SHORT_WAIT * SHORT_WAITS + LONG_WAIT.saturating_mul(long),
        ),
    };
    (waited < LOCK_WAIT).then_some(wait)
}

impl Sqlite {
    /// Opens (or creates) the store and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Sqlite> {
        let mut conn = Connection::open(path)
            .with_context(|| format!("failed to open the run store `{}`", path.display()))?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        anyhow::ensure!(
            mode == "wal",
            "the run store cannot use WAL mode (it says `{mode}`)"
        );
        // With WAL, NORMAL loses nothing a process crash (`kill -9`) could lose; only a power
        // cut can take back the last commits.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_handler(Some(wait_for_lock))?;
        // Commits never checkpoint: the checkpointer does (see the module's doc).
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "journal_size_limit", WAL_KEPT)?;
        let data = path.parent().unwrap_or(Path::new("."));
        migrate(&mut conn, data)
            .with_context(|| format!("failed to migrate the run store `{}`", path.display()))?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
            path: path.to_owned(),
            _checkpointer: Checkpointer::start(path)?,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut conn).with_context(|| format!("run store `{}`", self.path.display()))
    }

    pub async fn ping(&self) -> Result<()> {
        // One row, not `count(*)`: counting reads every page of an index, and a load
        // balancer asks this every few seconds.
        self.with(|c| {
            c.prepare_cached("SELECT 1 FROM runs LIMIT 1")?
                .query([])?
                .next()
                .map(drop)
        })
    }

    pub async fn close(&self) -> Result<()> {
        self.with(|c| c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)"))
    }

    pub async fn mark_interrupted(&self, replica: &str) -> Result<usize> {
        self.with(|c| {
            c.execute(
                &format!(
                    "UPDATE runs SET outcome = 'interrupted', finished_at = {NOW},
                     error = 'the server stopped before the call ended'
                     WHERE outcome IS NULL AND (replica = ?1 OR replica IS NULL)"
                ),
                [replica],
            )
        })
    }

    pub async fn heartbeat(&self, replica: &str, silent: Duration) -> Result<usize> {
        let silent = silent.as_millis() as i64;
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute(
                &format!(
                    "INSERT INTO replicas (name, seen_at_ms) VALUES (?1, {NOW_MS})
                     ON CONFLICT (name) DO UPDATE SET seen_at_ms = excluded.seen_at_ms"
                ),
                [replica],
            )?;
            let marked = tx.execute(
                &format!(
                    "UPDATE runs SET outcome = 'interrupted', finished_at = {NOW},
                     error = 'its replica stopped before the call ended'
                     WHERE outcome IS NULL AND replica IN
                     (SELECT name FROM replicas WHERE seen_at_ms < {NOW_MS} - ?1)"
                ),
                [silent],
            )?;
            let failed = tx.execute(
                &format!(
                    "UPDATE evaluations SET status = 'failed', finished_at = {NOW}, error = ?2
                     WHERE status = 'running' AND replica IN
                     (SELECT name FROM replicas WHERE seen_at_ms < {NOW_MS} - ?1)"
                ),
                rusqlite::params![silent, EVALUATION_STOPPED],
            )?;
            tx.execute(
                &format!("DELETE FROM admissions WHERE at_ms < {NOW_MS} - ?1"),
                [MINUTE_MS],
            )?;
            tx.commit()?;
            Ok(marked + failed)
        })
    }

    pub async fn insert_bundle(&self, b: &NewBundle<'_>) -> Result<bool> {
        let functions = serde_json::to_string(b.functions)?;
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT OR IGNORE INTO bundle_files (version, data) VALUES (?1, ?2)",
                params![b.version, b.file],
            )?;
            let n = tx.execute(
                &format!(
                    "INSERT OR IGNORE INTO bundles
                     (tenant, version, functions, label, notebook, size, deployed_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, {NOW})"
                ),
                params![
                    b.tenant,
                    b.version,
                    functions,
                    b.label,
                    b.notebook,
                    b.file.len() as i64
                ],
            )?;
            tx.commit()?;
            Ok(n == 1)
        })
    }

    pub async fn bundle_file(&self, version: &str) -> Result<Option<Vec<u8>>> {
        self.with(|c| {
            c.query_row(
                "SELECT data FROM bundle_files WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .optional()
        })
    }

    pub async fn bundles(&self, tenant: &str) -> Result<Vec<BundleRow>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT version, functions, label, notebook, size, deployed_at FROM bundles
                 WHERE tenant = ?1 ORDER BY deployed_at DESC, version",
            )?;
            s.query_map([tenant], bundle_row)?.collect()
        })
    }

    pub async fn bundle(&self, tenant: &str, version: &str) -> Result<Option<BundleRow>> {
        // On every call's path: the statement is kept prepared, as are the others there.
        self.with(|c| {
            c.prepare_cached(
                "SELECT version, functions, label, notebook, size, deployed_at FROM bundles
                 WHERE tenant = ?1 AND version = ?2",
            )?
            .query_row([tenant, version], bundle_row)
            .optional()
        })
    }

    pub async fn versions(&self) -> Result<Vec<String>> {
        self.with(|c| {
            let mut s = c.prepare("SELECT DISTINCT version FROM bundles")?;
            s.query_map([], |r| r.get(0))?.collect()
        })
    }

    pub async fn move_alias(
        &self,
        tenant: &str,
        alias: &str,
        target: &AliasTarget,
        evaluation: Option<&str>,
    ) -> Result<Option<String>> {
        let canary = target.canary.as_ref();
        let (cv, cp, cs) = (
            canary.map(|c| c.version.as_str()),
            canary.map(|c| c.percent),
            canary.map(|c| c.sticky.as_str()),
        );
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let previous: Option<String> = tx
                .query_row(
                    "SELECT version FROM aliases WHERE tenant = ?1 AND name = ?2",
                    [tenant, alias],
                    |r| r.get(0),
                )
                .optional()?;
            tx.execute(
                &format!(
                    "INSERT INTO aliases (tenant, name, version, moved_at, canary_version,
                     canary_percent, canary_sticky, shadow_version)
                     VALUES (?1, ?2, ?3, {NOW}, ?4, ?5, ?6, ?7)
                     ON CONFLICT (tenant, name) DO UPDATE SET version = ?3, moved_at = {NOW},
                     canary_version = ?4, canary_percent = ?5, canary_sticky = ?6,
                     shadow_version = ?7"
                ),
                params![tenant, alias, target.version, cv, cp, cs, target.shadow],
            )?;
            tx.execute(
                &format!(
                    "INSERT INTO alias_moves (tenant, alias, from_version, to_version, moved_at,
                     canary_version, canary_percent, shadow_version, evaluation)
                     VALUES (?1, ?2, ?3, ?4, {NOW}, ?5, ?6, ?7, ?8)"
                ),
                params![
                    tenant,
                    alias,
                    previous,
                    target.version,
                    cv,
                    cp,
                    target.shadow,
                    evaluation
                ],
            )?;
            tx.commit()?;
            Ok(previous)
        })
    }

    pub async fn alias(&self, tenant: &str, alias: &str) -> Result<Option<AliasTarget>> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT version, canary_version, canary_percent, canary_sticky, shadow_version
                 FROM aliases WHERE tenant = ?1 AND name = ?2",
            )?
            .query_row([tenant, alias], |r| {
                Ok(AliasTarget::from_columns(
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                ))
            })
            .optional()
        })
    }

    pub async fn aliases(&self, tenant: &str) -> Result<Vec<AliasRow>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT name, version, moved_at, canary_version, canary_percent, canary_sticky,
                 shadow_version FROM aliases WHERE tenant = ?1 ORDER BY name",
            )?;
            s.query_map([tenant], |r| {
                Ok(AliasRow {
                    alias: r.get(0)?,
                    target: AliasTarget::from_columns(
                        r.get(1)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ),
                    moved_at: r.get(2)?,
                })
            })?
            .collect()
        })
    }

    pub async fn alias_history(&self, tenant: &str, alias: &str) -> Result<Vec<MoveRow>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT alias, tenant, from_version, to_version, moved_at, canary_version,
                 canary_percent, shadow_version, evaluation FROM alias_moves
                 WHERE tenant = ?1 AND alias = ?2 ORDER BY id",
            )?;
            s.query_map([tenant, alias], |r| {
                let canary: Option<String> = r.get(5)?;
                Ok(MoveRow {
                    alias: r.get(0)?,
                    tenant: r.get(1)?,
                    from: r.get(2)?,
                    to: r.get(3)?,
                    moved_at: r.get(4)?,
                    canary: canary.map(|version| Canary {
                        version,
                        percent: r.get::<_, Option<f64>>(6).ok().flatten().unwrap_or(0.0),
                        sticky: Default::default(),
                    }),
                    shadow: r.get(7)?,
                    evaluation: r.get(8)?,
                })
            })?
            .collect()
        })
    }

    pub async fn admit(&self, tenant: &str, quota: u32) -> Result<Option<u64>> {
        self.with(|c| {
            // IMMEDIATE takes the write lock first: two admissions never count the same window.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let (count, oldest, now): (i64, Option<i64>, i64) = tx.query_row(
                &format!(
                    "SELECT count(*), min(at_ms), {NOW_MS} FROM admissions
                     WHERE tenant = ?1 AND at_ms > {NOW_MS} - ?2"
                ),
                params![tenant, MINUTE_MS],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            if count >= i64::from(quota) {
                let wait = oldest.map_or(MINUTE_MS, |t| t + MINUTE_MS - now);
                return Ok(Some(wait.max(1) as u64));
            }
            tx.execute(
                "INSERT INTO admissions (tenant, at_ms) VALUES (?1, ?2)",
                params![tenant, now],
            )?;
            tx.commit()?;
            Ok(None)
        })
    }

    pub async fn gate(
        &self,
        tenant: &str,
        candidate: &str,
        baseline: &str,
        max_changed: u64,
        max_failing: u64,
    ) -> Result<Gate> {
        self.with(|c| {
            let passed = c
                .query_row(
                    &format!(
                        "SELECT {EVALUATION_COLUMNS} FROM evaluations
                         WHERE tenant = ?1 AND candidate = ?2 AND baseline = ?3
                         AND status = 'done' AND changed <= ?4 AND newly_failing <= ?5
                         ORDER BY id DESC LIMIT 1"
                    ),
                    params![
                        tenant,
                        candidate,
                        baseline,
                        max_changed as i64,
                        max_failing as i64
                    ],
                    evaluation_summary,
                )
                .optional()?;
            if let Some(e) = passed {
                return Ok(Gate::Passed(e));
            }
            let latest = c
                .query_row(
                    &format!(
                        "SELECT {EVALUATION_COLUMNS} FROM evaluations
                         WHERE tenant = ?1 AND candidate = ?2 AND baseline = ?3
                         ORDER BY id DESC LIMIT 1"
                    ),
                    params![tenant, candidate, baseline],
                    evaluation_summary,
                )
                .optional()?;
            Ok(Gate::Refused(latest))
        })
    }

    pub async fn start_evaluation(&self, e: &NewEvaluation<'_>) -> Result<()> {
        self.with(|c| {
            c.execute(
                &format!(
                    "INSERT INTO evaluations (id, tenant, candidate, against, baseline, function,
                     selection, tolerance, status, total, created_at, replica)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'running', ?9, {NOW}, ?10)"
                ),
                params![
                    e.id,
                    e.tenant,
                    e.candidate,
                    e.against,
                    e.baseline,
                    e.function,
                    e.selection,
                    e.tolerance,
                    e.total as i64,
                    e.replica
                ],
            )
        })
        .map(drop)
    }

    pub async fn evaluation_entries(&self, evaluation: &str, entries: &[Entry]) -> Result<bool> {
        let [same, changed, newly_failing, fixed, not_replayable] = class_counts(entries);
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // Many times in an evaluation: the statements are kept prepared.
            let counted = tx
                .prepare_cached(
                    "UPDATE evaluations SET done = done + ?2, same = same + ?3,
                     changed = changed + ?4, newly_failing = newly_failing + ?5,
                     fixed = fixed + ?6, not_replayable = not_replayable + ?7
                     WHERE id = ?1 AND status = 'running'",
                )?
                .execute(params![
                    evaluation,
                    entries.len() as i64,
                    same,
                    changed,
                    newly_failing,
                    fixed,
                    not_replayable
                ])?;
            if counted == 1 {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO evaluation_runs (evaluation, run, class, detail)
                     VALUES (?1, ?2, ?3, ?4)",
                )?;
                for e in entries {
                    insert.execute(params![evaluation, e.run, e.class, e.detail])?;
                }
            }
            tx.commit()?;
            Ok(counted == 1)
        })
    }

    pub async fn finish_evaluation(&self, id: &str, error: Option<&str>) -> Result<()> {
        self.with(|c| {
            c.execute(
                &format!(
                    "UPDATE evaluations SET finished_at = {NOW}, error = ?2,
                     status = CASE WHEN ?2 IS NULL THEN 'done' ELSE 'failed' END
                     WHERE id = ?1 AND status = 'running'"
                ),
                params![id, error],
            )
        })
        .map(drop)
    }

    pub async fn fail_evaluations(&self, replica: &str) -> Result<usize> {
        self.with(|c| {
            c.execute(
                &format!(
                    "UPDATE evaluations SET status = 'failed', finished_at = {NOW}, error = ?2
                     WHERE status = 'running' AND replica = ?1"
                ),
                [replica, EVALUATION_STOPPED],
            )
        })
    }

    pub async fn returned_run(&self, tenant: &str, key: &str) -> Result<Option<RunRow>> {
        self.with(|c| {
            c.query_row(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE tenant = ?1 AND idempotency_key = ?2
                     AND outcome = 'returned'"
                ),
                [tenant, key],
                run_row,
            )
            .optional()
        })
    }

    pub async fn start_run(&self, run: &NewRun<'_>) -> Result<()> {
        self.with(|c| {
            c.prepare_cached(&format!(
                "INSERT INTO runs (id, tenant, alias, bundle_version, function, idempotency_key,
                 received_at, input_sha256, host_version, runtime_sha256, replica, side,
                 shadow_of)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, {NOW}, ?7, ?8, ?9, ?10, ?11, ?12)"
            ))?
            .execute(params![
                run.id,
                run.tenant,
                run.alias,
                run.bundle_version,
                run.function,
                run.idempotency_key,
                run.input_sha256,
                env!("CARGO_PKG_VERSION"),
                run.runtime_sha256,
                run.replica,
                run.side,
                run.shadow_of,
            ])
        })
        .map(drop)
    }

    pub async fn finish_run(&self, id: &str, f: &Finished<'_>) -> Result<Completed> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // A retried call may have returned first under the same key: then this one is
            // the duplicate, and the earlier result stands.
            let earlier: Option<String> = match f.idempotency_key {
                Some(key) if f.outcome == "returned" => tx
                    .prepare_cached(
                        "SELECT id FROM runs WHERE tenant = ?1 AND idempotency_key = ?2
                         AND outcome = 'returned'",
                    )?
                    .query_row([f.tenant, key], |r| r.get(0))
                    .optional()?,
                _ => None,
            };
            let (outcome, error) = match &earlier {
                Some(e) => (
                    "duplicate",
                    Some(format!(
                        "run {e} with the same Idempotency-Key returned first: its result was the answer"
                    )),
                ),
                None => (f.outcome, f.error.map(str::to_owned)),
            };
            if let Some((data, _)) = f.trace {
                tx.prepare_cached("INSERT INTO traces (run, data) VALUES (?1, ?2)")?
                    .execute(params![id, data])?;
                count_trace_bytes(&tx, f.tenant, id, data.len() as i64)?;
            }
            tx.prepare_cached(&format!(
                "UPDATE runs SET finished_at = {NOW}, duration_ms = ?2, outcome = ?3,
                 http_status = ?4, result = ?5, result_sha256 = ?6, error = ?7,
                 trace_sha256 = ?8, trace_size = ?9,
                 started_at = CASE WHEN ?10 IS NOT NULL THEN strftime(
                   '%Y-%m-%dT%H:%M:%fZ', 'now', printf('%.3f seconds', -?10 / 1000.0)) END
                 WHERE id = ?1"
            ))?
            .execute(params![
                id,
                f.duration_ms,
                outcome,
                f.http_status,
                f.result,
                f.result_sha256,
                error,
                f.trace.map(|t| t.1),
                f.trace.map(|t| t.0.len() as i64),
                f.running_ms,
            ])?;
            tx.commit()?;
            Ok(earlier.map_or(Completed::Recorded, Completed::Duplicate))
        })
    }

    pub async fn interrupt(&self, id: &str, error: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                &format!(
                    "UPDATE runs SET outcome = 'interrupted', http_status = 503,
                     finished_at = {NOW}, error = ?2 WHERE id = ?1 AND outcome IS NULL"
                ),
                [id, error],
            )
        })
        .map(drop)
    }

    pub async fn runs(&self, tenant: &str, f: &RunFilter) -> Result<Vec<RunRow>> {
        self.with(|c| {
            let mut s = c.prepare(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE tenant = ?1
                 AND (?2 IS NULL OR function = ?2) AND (?3 IS NULL OR alias = ?3)
                 AND (?4 IS NULL OR bundle_version = ?4) AND (?5 IS NULL OR outcome = ?5)
                 AND (?6 IS NULL OR received_at >= ?6) AND (?7 IS NULL OR id < ?7)
                 AND (?9 IS NULL OR side = ?9)
                 ORDER BY id DESC LIMIT ?8"
            ))?;
            s.query_map(
                params![
                    tenant,
                    f.function,
                    f.alias,
                    f.version,
                    f.outcome,
                    f.since,
                    f.after,
                    f.limit(),
                    f.side
                ],
                run_row,
            )?
            .collect()
        })
    }

    pub async fn run(&self, tenant: &str, id: &str) -> Result<Option<RunRow>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE tenant = ?1 AND id = ?2"),
                [tenant, id],
                run_row,
            )
            .optional()
        })
    }

    pub async fn trace(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT t.data FROM traces t JOIN runs r ON r.id = t.run
                 WHERE r.tenant = ?1 AND t.run = ?2",
            )?
            .query_row([tenant, id], |r| r.get(0))
            .optional()
        })
    }

    pub async fn usage(&self, tenant: &str) -> Result<Usage> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT (SELECT coalesce(sum(size), 0) FROM bundles WHERE tenant = ?1),
                        (SELECT coalesce(sum(bytes), 0) FROM trace_bytes WHERE tenant = ?1)",
            )?
            .query_row([tenant], |r| {
                Ok(Usage {
                    bundles: r.get(0)?,
                    traces: r.get(1)?,
                })
            })
        })
    }

    pub async fn traces(
        &self,
        tenant: &str,
        age: Option<Duration>,
        limit: u32,
    ) -> Result<Vec<(String, u64)>> {
        // Two statements, not one with `?2 IS NULL OR ...`: SQLite plans a statement before
        // it sees its parameters, and that `OR` would have it read every live trace.
        self.with(|c| {
            let mut s = match age {
                Some(age) => {
                    let mut s =
                        c.prepare_cached(&format!("{LIVE_TRACES} {PAST_RETENTION} {OLDEST}"))?;
                    s.raw_bind_parameter(2, format!("-{} seconds", age.as_secs()))?;
                    s
                }
                None => c.prepare_cached(&format!("{LIVE_TRACES} {OLDEST}"))?,
            };
            s.raw_bind_parameter(1, tenant)?;
            s.raw_bind_parameter(3, limit)?;
            s.raw_query()
                .mapped(|r| Ok((r.get(0)?, r.get(1)?)))
                .collect()
        })
    }

    pub async fn prune(&self, id: &str) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            let pruned: Option<(String, i64)> = tx
                .prepare_cached(
                    "UPDATE runs SET trace_pruned = 1
                     WHERE id = ?1 AND trace_pruned = 0 AND trace_size IS NOT NULL
                     RETURNING tenant, trace_size",
                )?
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((tenant, size)) = pruned {
                tx.prepare_cached("DELETE FROM traces WHERE run = ?1")?
                    .execute([id])?;
                count_trace_bytes(&tx, &tenant, id, -size)?;
            }
            tx.commit()
        })
    }

    // The UI's reads of evaluations.

    pub async fn evaluations(&self, tenant: &str) -> Result<Vec<super::EvaluationRow>> {
        self.with(|c| {
            let mut s = c.prepare(&format!(
                "SELECT {} FROM evaluations WHERE tenant = ?1 ORDER BY created_at DESC, id DESC",
                super::EVALUATION_ROW_COLUMNS
            ))?;
            s.query_map([tenant], evaluation_row)?.collect()
        })
    }

    pub async fn evaluation(&self, tenant: &str, id: &str) -> Result<Option<super::EvaluationRow>> {
        self.with(|c| {
            c.query_row(
                &format!(
                    "SELECT {} FROM evaluations WHERE tenant = ?1 AND id = ?2",
                    super::EVALUATION_ROW_COLUMNS
                ),
                [tenant, id],
                evaluation_row,
            )
            .optional()
        })
    }

    pub async fn evaluation_runs(&self, id: &str) -> Result<Vec<super::EvaluationRunRow>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT run, class, detail FROM evaluation_runs WHERE evaluation = ?1 ORDER BY run",
            )?;
            s.query_map([id], |r| {
                let detail: String = r.get(2)?;
                Ok(super::EvaluationRunRow {
                    run: r.get(0)?,
                    class: r.get(1)?,
                    detail: serde_json::from_str(&detail).unwrap_or_default(),
                })
            })?
            .collect()
        })
    }
}

fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    let result: Option<String> = r.get(13)?;
    Ok(RunRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        alias: r.get(2)?,
        bundle_version: r.get(3)?,
        function: r.get(4)?,
        idempotency_key: r.get(5)?,
        received_at: r.get(6)?,
        started_at: r.get(7)?,
        finished_at: r.get(8)?,
        duration_ms: r.get(9)?,
        outcome: r.get(10)?,
        http_status: r.get(11)?,
        input_sha256: r.get(12)?,
        // Stored by the server as JSON text; anything else would be a corrupted row.
        result: result.and_then(|t| serde_json::from_str(&t).ok()),
        result_sha256: r.get(14)?,
        error: r.get(15)?,
        trace_sha256: r.get(16)?,
        trace_size: r.get(17)?,
        trace_pruned: r.get(18)?,
        host_version: r.get(19)?,
        runtime_sha256: r.get(20)?,
        replica: r.get(21)?,
        side: r.get(22)?,
        shadow_of: r.get(23)?,
    })
}

fn evaluation_summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<EvaluationSummary> {
    Ok(EvaluationSummary {
        id: r.get(0)?,
        candidate: r.get(1)?,
        baseline: r.get(2)?,
        status: r.get(3)?,
        total: r.get(4)?,
        same: r.get(5)?,
        changed: r.get(6)?,
        newly_failing: r.get(7)?,
        fixed: r.get(8)?,
        not_replayable: r.get(9)?,
        finished_at: r.get(10)?,
    })
}

fn bundle_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BundleRow> {
    let functions: String = r.get(1)?;
    Ok(BundleRow {
        version: r.get(0)?,
        functions: serde_json::from_str(&functions).unwrap_or_default(),
        label: r.get(2)?,
        notebook: r.get(3)?,
        size: r.get(4)?,
        deployed_at: r.get(5)?,
    })
}

/// A tenant's live traces, for [`Sqlite::traces`]: `?1` the tenant, `?3` how many, and with
/// [`PAST_RETENTION`] `?2` the age as SQLite's `-N seconds`. Its terms are those of the
/// `runs_live_traces` index, which it reads in order.
const LIVE_TRACES: &str = "SELECT id, trace_size FROM runs INDEXED BY runs_live_traces
    WHERE tenant = ?1 AND trace_size IS NOT NULL AND trace_pruned = 0";
const PAST_RETENTION: &str = "AND finished_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?2)";
const OLDEST: &str = "ORDER BY finished_at, id LIMIT ?3";

/// Adds `bytes` (negative: takes them away) to the tenant's live trace bytes, in the slot of
/// run `id` (see `trace_bytes` in the schema).
fn count_trace_bytes(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    id: &str,
    bytes: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO trace_bytes (tenant, slot, bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT (tenant, slot) DO UPDATE SET bytes = trace_bytes.bytes + excluded.bytes",
    )?
    .execute(params![tenant, super::trace_slot(id), bytes])
    .map(drop)
}

/// Applies the migrations the file has not had, each in its own transaction (SQLite's
/// write lock keeps two servers on one file from both applying one). A file from before
/// version 2 kept bundle files and traces in the data folder: they move into the file.
fn migrate(conn: &mut Connection, data: &Path) -> Result<()> {
    let done: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    check_version(done)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now: usize = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if now > i {
            continue; // another process applied it while this one waited for the lock
        }
        tx.execute_batch(&Dialect::Sqlite.sql(sql))?;
        if i == 1 {
            import_files(&tx, data)?;
        }
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Moves a version-1 data folder's files into the store: `bundles/VERSION.bundle.json` and
/// `traces/TENANT/RUN.trace`. A file a row names but that is missing leaves the trace
/// marked pruned (it is gone either way). The files stay where they were: nothing reads them
/// any more, and removing them is left to the operator.
fn import_files(tx: &rusqlite::Transaction<'_>, data: &Path) -> Result<()> {
    let versions: Vec<String> = tx
        .prepare("SELECT DISTINCT version FROM bundles")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for version in versions {
        let path = data.join("bundles").join(format!("{version}.bundle.json"));
        if let Ok(bytes) = std::fs::read(&path) {
            tx.execute(
                "INSERT OR IGNORE INTO bundle_files (version, data) VALUES (?1, ?2)",
                params![version, bytes],
            )?;
        }
    }
    let traces: Vec<(String, String)> = tx
        .prepare("SELECT id, tenant FROM runs WHERE trace_size IS NOT NULL AND trace_pruned = 0")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (id, tenant) in traces {
        let path = data
            .join("traces")
            .join(&tenant)
            .join(format!("{id}.trace"));
        match std::fs::read(&path) {
            Ok(bytes) => tx.execute(
                "INSERT INTO traces (run, data) VALUES (?1, ?2)",
                params![id, bytes],
            )?,
            Err(_) => tx.execute("UPDATE runs SET trace_pruned = 1 WHERE id = ?1", [&id])?,
        };
    }
    Ok(())
}

// The UI's reads of evaluations: an `evaluations` row in [`super::EVALUATION_ROW_COLUMNS`]' order.
fn evaluation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<super::EvaluationRow> {
    let selection: String = r.get(5)?;
    Ok(super::EvaluationRow {
        id: r.get(0)?,
        candidate: r.get(1)?,
        against: r.get(2)?,
        baseline: r.get(3)?,
        function: r.get(4)?,
        selection: serde_json::from_str(&selection).unwrap_or_default(),
        tolerance: r.get(6)?,
        status: r.get(7)?,
        total: r.get(8)?,
        done: r.get(9)?,
        same: r.get(10)?,
        changed: r.get(11)?,
        newly_failing: r.get(12)?,
        fixed: r.get(13)?,
        not_replayable: r.get(14)?,
        error: r.get(15)?,
        created_at: r.get(16)?,
        finished_at: r.get(17)?,
        replica: r.get(18)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_waits_are_short_at_first_and_end_once_they_add_up_to_lock_wait() {
        assert_eq!(lock_wait(0), Some(SHORT_WAIT));
        let waits: Vec<Duration> = (0..).map_while(lock_wait).collect();
        let waited: Duration = waits.iter().sum();
        assert!(
            (LOCK_WAIT..LOCK_WAIT + LONG_WAIT).contains(&waited),
            "{waited:?}"
        );
        assert_eq!(lock_wait(u32::MAX), None);
    }

    #[test]
    fn a_statement_waits_for_a_lock_another_connection_holds_briefly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.db");
        let store = Sqlite::open(&path).unwrap();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            other.execute_batch("COMMIT").unwrap();
        });
        store
            .with(|c| c.execute("INSERT INTO admissions (tenant, at_ms) VALUES ('a', 1)", []))
            .expect("the insert waits for the other connection's write lock");
        holder.join().unwrap();
    }

    /// Under a steady stream of commits the log never ends folded, so only the
    /// checkpointer's restart keeps it from growing for ever.
    #[test]
    fn the_write_ahead_log_stays_bounded_under_a_steady_stream_of_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.db");
        let store = Sqlite::open(&path).unwrap();
        // Commits with moments between them, as calls make (a writer that never lets go of
        // the lock leaves no moment to restart the log in): at most 32 MB a second, so each
        // round of the checkpointer finds a few MB more, and a restart it must skip (the
        // writer busy) adds only a few to the log.
        let blob = vec![7u8; 64 << 10];
        let mut written = 0;
        for i in 0.. {
            std::thread::sleep(Duration::from_millis(2));
            store
                .with(|c| {
                    c.execute(
                        "INSERT INTO traces (run, data) VALUES (?1, ?2)",
                        params![i.to_string(), blob],
                    )?;
                    c.execute("DELETE FROM traces WHERE run = ?1", [(i - 1).to_string()])
                })
                .unwrap();
            written += blob.len() as i64;
            if written > 2 * WAL_KEPT {
                break;
            }
        }
        let wal = std::fs::metadata(dir.path().join("host.db-wal"))
            .unwrap()
            .len() as i64;
        assert!(
            wal <= WAL_KEPT + RESTART_AT,
            "the log holds {wal} bytes after {written} were written"
        );
    }
}
