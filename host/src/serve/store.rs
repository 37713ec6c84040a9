//! The run store: one SQLite file, `host.db`, in WAL mode, with explicit SQL.
//!
//! Schema (version 1; [`MIGRATIONS`] brings any older file up to date at start, and
//! `PRAGMA user_version` says which migrations a file has had):
//!
//! - `bundles(tenant, version, functions, label, notebook, size, deployed_at)`: the bundles a
//!   tenant deployed. The bundle file itself is `bundles/VERSION.bundle.json` in the data
//!   folder, shared by tenants that deploy the same content; `size` counts towards each
//!   tenant's storage. `functions` is a JSON array.
//! - `aliases(tenant, name, version, moved_at)`: where each alias points now.
//! - `alias_moves(id, tenant, alias, from_version, to_version, moved_at)`: every move, kept,
//!   in order (`id`).
//! - `runs`: one row per accepted call, written when the call is accepted and completed when
//!   it ends; a row whose `outcome` is still NULL at start was cut short by a crash and is
//!   marked `interrupted`. Columns: `id` (UUIDv7, so ids sort by time), `tenant`, `alias`
//!   (when called by alias), `bundle_version`, `function`, `idempotency_key` (the client's
//!   `Idempotency-Key` header), `received_at`, `started_at`, `finished_at` (UTC, RFC 3339 with
//!   milliseconds), `duration_ms` (the call in the sandbox), `outcome`
//!   (`returned|raised|limit|bad_input|internal|interrupted`), `http_status`, `input_sha256`
//!   (of the request body), `result` (the value's JSON, NULL when over [`RESULT_CAP`] bytes),
//!   `result_sha256`, `error` (the message), `trace_sha256` and `trace_size` (the trace file
//!   `traces/TENANT/ID.trace`, written before the row names it), `trace_pruned` (1 once
//!   retention or the storage quota removed the trace), `host_version`, `runtime_sha256`.
//!
//! Times are SQLite's own (`strftime('%Y-%m-%dT%H:%M:%fZ')`), taken when each statement runs,
//! so they sort and compare as text.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// A run's stored result is capped: the trace holds the whole of it.
pub const RESULT_CAP: usize = 64 << 10;

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// The schema's migrations, in order: migration `i` takes a file from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &["
    CREATE TABLE bundles (
        tenant TEXT NOT NULL,
        version TEXT NOT NULL,
        functions TEXT NOT NULL,
        label TEXT,
        notebook TEXT NOT NULL,
        size INTEGER NOT NULL,
        deployed_at TEXT NOT NULL,
        PRIMARY KEY (tenant, version)
    );
    CREATE TABLE aliases (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        moved_at TEXT NOT NULL,
        PRIMARY KEY (tenant, name)
    );
    CREATE TABLE alias_moves (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant TEXT NOT NULL,
        alias TEXT NOT NULL,
        from_version TEXT,
        to_version TEXT NOT NULL,
        moved_at TEXT NOT NULL
    );
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        alias TEXT,
        bundle_version TEXT,
        function TEXT NOT NULL,
        idempotency_key TEXT,
        received_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        duration_ms REAL,
        outcome TEXT,
        http_status INTEGER,
        input_sha256 TEXT NOT NULL,
        result TEXT,
        result_sha256 TEXT,
        error TEXT,
        trace_sha256 TEXT,
        trace_size INTEGER,
        trace_pruned INTEGER NOT NULL DEFAULT 0,
        host_version TEXT NOT NULL,
        runtime_sha256 TEXT NOT NULL
    );
    CREATE INDEX runs_by_tenant ON runs (tenant, id);
"];

/// The store: one connection, used by one thread at a time (SQLite serialises writers anyway).
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// A deployed bundle, as `GET /v1/bundles` lists it.
#[derive(Debug, Serialize)]
pub struct BundleRow {
    pub version: String,
    pub functions: Vec<String>,
    pub label: Option<String>,
    pub notebook: String,
    pub size: u64,
    pub deployed_at: String,
}

/// An alias, as `GET /v1/aliases` lists it.
#[derive(Debug, Serialize)]
pub struct AliasRow {
    pub alias: String,
    pub version: String,
    pub moved_at: String,
}

/// One move of an alias.
#[derive(Debug, Serialize)]
pub struct MoveRow {
    pub alias: String,
    pub tenant: String,
    pub from: Option<String>,
    pub to: String,
    pub moved_at: String,
}

/// A call as it is accepted.
pub struct NewRun<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    pub alias: Option<&'a str>,
    pub bundle_version: Option<&'a str>,
    pub function: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub input_sha256: &'a str,
    pub runtime_sha256: &'a str,
}

/// How a call ended.
pub struct Finished<'a> {
    pub duration_ms: Option<f64>,
    pub outcome: &'a str,
    pub http_status: u16,
    pub result: Option<&'a str>,
    pub result_sha256: Option<&'a str>,
    pub error: Option<&'a str>,
    pub trace_sha256: Option<&'a str>,
    pub trace_size: Option<u64>,
}

/// A `runs` row, as `GET /v1/runs` shows it.
#[derive(Debug, Serialize)]
pub struct RunRow {
    pub id: String,
    pub tenant: String,
    pub alias: Option<String>,
    pub bundle_version: Option<String>,
    pub function: String,
    pub idempotency_key: Option<String>,
    pub received_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_ms: Option<f64>,
    pub outcome: Option<String>,
    pub http_status: Option<u16>,
    pub input_sha256: String,
    pub result: Option<serde_json::Value>,
    pub result_sha256: Option<String>,
    pub error: Option<String>,
    pub trace_sha256: Option<String>,
    pub trace_size: Option<u64>,
    pub trace_pruned: bool,
    pub host_version: String,
    pub runtime_sha256: String,
}

/// `GET /v1/runs`'s filters, all optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFilter {
    pub function: Option<String>,
    pub alias: Option<String>,
    pub version: Option<String>,
    pub outcome: Option<String>,
    /// Runs received at or after this time (RFC 3339, as the rows show times).
    pub since: Option<String>,
    /// At most this many runs (default 100, at most 1000).
    pub limit: Option<u32>,
    /// The page after this run id (the last id of the previous page): runs are newest first.
    pub after: Option<String>,
}

impl Store {
    /// Opens (or creates) the store and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
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
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)
            .with_context(|| format!("failed to migrate the run store `{}`", path.display()))?;
        Ok(Store {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut conn).with_context(|| format!("run store `{}`", self.path.display()))
    }

    /// Whether the store answers (for `/readyz`).
    pub fn ping(&self) -> Result<()> {
        self.with(|c| c.query_row("SELECT count(*) FROM runs", [], |_| Ok(())))
    }

    /// Folds the write-ahead log into the database file, at a clean stop.
    pub fn checkpoint(&self) -> Result<()> {
        self.with(|c| c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)"))
    }

    /// Marks the runs a crash cut short, and says how many there were.
    pub fn mark_interrupted(&self) -> Result<usize> {
        self.with(|c| {
            c.execute(
                &format!(
                    "UPDATE runs SET outcome = 'interrupted', finished_at = {NOW},
                     error = 'the server stopped before the call ended'
                     WHERE outcome IS NULL"
                ),
                [],
            )
        })
    }

    /// Records a tenant's deploy; false when the tenant already had this version.
    pub fn insert_bundle(
        &self,
        tenant: &str,
        version: &str,
        functions: &[String],
        label: Option<&str>,
        notebook: &str,
        size: u64,
    ) -> Result<bool> {
        let functions = serde_json::to_string(functions)?;
        self.with(|c| {
            c.execute(
                &format!(
                    "INSERT OR IGNORE INTO bundles
                     (tenant, version, functions, label, notebook, size, deployed_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, {NOW})"
                ),
                params![tenant, version, functions, label, notebook, size],
            )
        })
        .map(|n| n == 1)
    }

    /// A tenant's bundles, newest first.
    pub fn bundles(&self, tenant: &str) -> Result<Vec<BundleRow>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT version, functions, label, notebook, size, deployed_at FROM bundles
                 WHERE tenant = ?1 ORDER BY deployed_at DESC, version",
            )?;
            s.query_map([tenant], bundle_row)?.collect()
        })
    }

    /// One of a tenant's bundles.
    pub fn bundle(&self, tenant: &str, version: &str) -> Result<Option<BundleRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT version, functions, label, notebook, size, deployed_at FROM bundles
                 WHERE tenant = ?1 AND version = ?2",
                [tenant, version],
                bundle_row,
            )
            .optional()
        })
    }

    /// Every deployed version, of any tenant: what a restarted server loads.
    pub fn versions(&self) -> Result<Vec<String>> {
        self.with(|c| {
            let mut s = c.prepare("SELECT DISTINCT version FROM bundles")?;
            s.query_map([], |r| r.get(0))?.collect()
        })
    }

    /// Points a tenant's alias at `version` and records the move, in one transaction: two
    /// moves at once are both recorded, in the order they took effect. Returns the version
    /// it pointed at before.
    pub fn move_alias(&self, tenant: &str, alias: &str, version: &str) -> Result<Option<String>> {
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
                    "INSERT INTO aliases (tenant, name, version, moved_at) VALUES (?1, ?2, ?3, {NOW})
                     ON CONFLICT (tenant, name) DO UPDATE SET version = ?3, moved_at = {NOW}"
                ),
                [tenant, alias, version],
            )?;
            tx.execute(
                &format!(
                    "INSERT INTO alias_moves (tenant, alias, from_version, to_version, moved_at)
                     VALUES (?1, ?2, ?3, ?4, {NOW})"
                ),
                params![tenant, alias, previous, version],
            )?;
            tx.commit()?;
            Ok(previous)
        })
    }

    /// Where a tenant's alias points.
    pub fn alias(&self, tenant: &str, alias: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row(
                "SELECT version FROM aliases WHERE tenant = ?1 AND name = ?2",
                [tenant, alias],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// A tenant's aliases, by name.
    pub fn aliases(&self, tenant: &str) -> Result<Vec<AliasRow>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT name, version, moved_at FROM aliases WHERE tenant = ?1 ORDER BY name",
            )?;
            s.query_map([tenant], |r| {
                Ok(AliasRow {
                    alias: r.get(0)?,
                    version: r.get(1)?,
                    moved_at: r.get(2)?,
                })
            })?
            .collect()
        })
    }

    /// Every move of a tenant's alias, oldest first.
    pub fn alias_history(&self, tenant: &str, alias: &str) -> Result<Vec<MoveRow>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT alias, tenant, from_version, to_version, moved_at FROM alias_moves
                 WHERE tenant = ?1 AND alias = ?2 ORDER BY id",
            )?;
            s.query_map([tenant, alias], |r| {
                Ok(MoveRow {
                    alias: r.get(0)?,
                    tenant: r.get(1)?,
                    from: r.get(2)?,
                    to: r.get(3)?,
                    moved_at: r.get(4)?,
                })
            })?
            .collect()
        })
    }

    /// Writes an accepted call's row, before anything runs.
    pub fn start_run(&self, run: &NewRun<'_>) -> Result<()> {
        self.with(|c| {
            c.execute(
                &format!(
                    "INSERT INTO runs (id, tenant, alias, bundle_version, function, idempotency_key,
                     received_at, input_sha256, host_version, runtime_sha256)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, {NOW}, ?7, ?8, ?9)"
                ),
                params![
                    run.id,
                    run.tenant,
                    run.alias,
                    run.bundle_version,
                    run.function,
                    run.idempotency_key,
                    run.input_sha256,
                    env!("CARGO_PKG_VERSION"),
                    run.runtime_sha256,
                ],
            )
        })
        .map(drop)
    }

    /// Notes that a worker took the call.
    pub fn run_started(&self, id: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                &format!("UPDATE runs SET started_at = {NOW} WHERE id = ?1"),
                [id],
            )
        })
        .map(drop)
    }

    /// Completes a run's row. Its trace, if any, is already on disk.
    pub fn finish_run(&self, id: &str, f: &Finished<'_>) -> Result<()> {
        self.with(|c| {
            c.execute(
                &format!(
                    "UPDATE runs SET finished_at = {NOW}, duration_ms = ?2, outcome = ?3,
                     http_status = ?4, result = ?5, result_sha256 = ?6, error = ?7,
                     trace_sha256 = ?8, trace_size = ?9
                     WHERE id = ?1"
                ),
                params![
                    id,
                    f.duration_ms,
                    f.outcome,
                    f.http_status,
                    f.result,
                    f.result_sha256,
                    f.error,
                    f.trace_sha256,
                    f.trace_size,
                ],
            )
        })
        .map(drop)
    }

    /// A page of a tenant's runs, newest first.
    pub fn runs(&self, tenant: &str, f: &RunFilter) -> Result<Vec<RunRow>> {
        let limit = f.limit.unwrap_or(100).min(1000);
        self.with(|c| {
            let mut s = c.prepare(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE tenant = ?1
                 AND (?2 IS NULL OR function = ?2) AND (?3 IS NULL OR alias = ?3)
                 AND (?4 IS NULL OR bundle_version = ?4) AND (?5 IS NULL OR outcome = ?5)
                 AND (?6 IS NULL OR received_at >= ?6) AND (?7 IS NULL OR id < ?7)
                 ORDER BY id DESC LIMIT ?8"
            ))?;
            s.query_map(
                params![
                    tenant, f.function, f.alias, f.version, f.outcome, f.since, f.after, limit
                ],
                run_row,
            )?
            .collect()
        })
    }

    /// One of a tenant's runs.
    pub fn run(&self, tenant: &str, id: &str) -> Result<Option<RunRow>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE tenant = ?1 AND id = ?2"),
                [tenant, id],
                run_row,
            )
            .optional()
        })
    }

    /// Bytes a tenant keeps: its bundles' files and its traces not yet pruned.
    pub fn usage(&self, tenant: &str) -> Result<u64> {
        self.with(|c| {
            c.query_row(
                "SELECT (SELECT coalesce(sum(size), 0) FROM bundles WHERE tenant = ?1)
                      + (SELECT coalesce(sum(trace_size), 0) FROM runs
                         WHERE tenant = ?1 AND trace_pruned = 0)",
                [tenant],
                |r| r.get(0),
            )
        })
    }

    /// A tenant's traces, oldest first, with their sizes: those finished before `before`
    /// (RFC 3339) when it is given, else all of them.
    pub fn traces(&self, tenant: &str, before: Option<&str>) -> Result<Vec<(String, u64)>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT id, trace_size FROM runs
                 WHERE tenant = ?1 AND trace_size IS NOT NULL AND trace_pruned = 0
                 AND (?2 IS NULL OR finished_at < ?2) ORDER BY id",
            )?;
            s.query_map(params![tenant, before], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
    }

    /// Notes that a run's trace was removed; the row stays.
    pub fn mark_pruned(&self, id: &str) -> Result<()> {
        self.with(|c| c.execute("UPDATE runs SET trace_pruned = 1 WHERE id = ?1", [id]))
            .map(drop)
    }

    /// The time `age` ago, as the rows write times.
    pub fn ago(&self, age: std::time::Duration) -> Result<String> {
        self.with(|c| {
            c.query_row(
                "SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1)",
                [format!("-{} seconds", age.as_secs())],
                |r| r.get(0),
            )
        })
    }
}

const RUN_COLUMNS: &str = "id, tenant, alias, bundle_version, function, idempotency_key,
    received_at, started_at, finished_at, duration_ms, outcome, http_status, input_sha256,
    result, result_sha256, error, trace_sha256, trace_size, trace_pruned, host_version,
    runtime_sha256";

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

/// Applies the migrations the file has not had, each in its own transaction.
fn migrate(conn: &mut Connection) -> Result<()> {
    let done: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if done > MIGRATIONS.len() {
        anyhow::bail!(
            "its schema is version {done}, newer than this host's ({}): use a newer host",
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}
