//! The PostgreSQL backend: what several replicas share (`store = "postgres://..."`).
//!
//! A pool of connections (deadpool over tokio-postgres) that reconnects by itself: while
//! the database is down every method fails fast (the pool's wait and connect timeouts), the
//! server answers 503, and the first call after the database returns gets a fresh
//! connection. Migrations run at start in one transaction under an advisory lock, so two
//! replicas starting together migrate once; the version is the row of `schema_version`.
//! Work that must not interleave across replicas (a tenant's quota window, a key's
//! `returned` row) takes a transaction-scoped advisory lock of its own.

use std::time::Duration;

use anyhow::{Context, Result};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{
    AliasRow, AliasTarget, BundleRow, Canary, Completed, Dialect, EVALUATION_COLUMNS,
    EVALUATION_STOPPED, Entry, EvaluationSummary, Finished, Gate, MIGRATIONS, MINUTE_MS, MoveRow,
    NewBundle, NewEvaluation, NewRun, RUN_COLUMNS, RunFilter, RunRow, Usage, check_version,
    class_counts, redact,
};

const NOW: &str =
    "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";
/// `NOW` less `$10` milliseconds (NULL when `$10` is).
const STARTED: &str = "to_char((clock_timestamp() - $10::float8 * interval '1 millisecond')
     AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";
const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// The advisory lock spaces (the first key of `pg_advisory_xact_lock(int, int)`).
const LOCK_MIGRATIONS: i32 = 0x686f_7374; // "host"
const LOCK_ADMISSIONS: i32 = LOCK_MIGRATIONS + 1;
const LOCK_IDEMPOTENCY: i32 = LOCK_MIGRATIONS + 2;

/// How long a request waits for a connection, or for a new one to be made, before the
/// store counts as unavailable: a call answers 503 promptly rather than hang while the
/// database is down.
const WAIT: Duration = Duration::from_secs(3);
/// Connections per replica: calls need a few statements each, on short transactions.
const POOL_SIZE: usize = 16;

pub struct Postgres {
    pool: Pool,
    url: String,
}

type Params<'a> = [&'a (dyn ToSql + Sync)];

impl Postgres {
    /// Connects and brings the schema up to date.
    pub async fn open(url: &str) -> Result<Postgres> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .with_context(|| format!("`{}` is not a PostgreSQL URL", redact(url)))?;
        config.connect_timeout(WAIT);
        if config.get_application_name().is_none() {
            config.application_name("host serve");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(WAIT))
            .create_timeout(Some(WAIT))
            .recycle_timeout(Some(WAIT))
            .build()
            .context("failed to make the PostgreSQL connection pool")?;
        let store = Postgres {
            pool,
            url: redact(url),
        };
        store
            .migrate()
            .await
            .with_context(|| format!("failed to migrate the run store `{}`", store.url))?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client> {
        self.pool
            .get()
            .await
            .with_context(|| format!("run store `{}`", self.url))
    }

    async fn query(&self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.context(self.url.clone())?;
        client
            .query(&statement, params)
            .await
            .with_context(|| format!("run store `{}`", self.url))
    }

    async fn query_opt(&self, sql: &str, params: &Params<'_>) -> Result<Option<Row>> {
        Ok(self.query(sql, params).await?.into_iter().next())
    }

    async fn execute(&self, sql: &str, params: &Params<'_>) -> Result<u64> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.context(self.url.clone())?;
        client
            .execute(&statement, params)
            .await
            .with_context(|| format!("run store `{}`", self.url))
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&LOCK_MIGRATIONS])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .await?;
        let done: Option<i32> = tx
            .query_opt("SELECT version FROM schema_version", &[])
            .await?
            .map(|r| r.get(0));
        let done = done.unwrap_or(0) as usize;
        check_version(done)?;
        for sql in &MIGRATIONS[done..] {
            tx.batch_execute(&Dialect::Postgres.sql(sql)).await?;
        }
        tx.execute("DELETE FROM schema_version", &[]).await?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&(MIGRATIONS.len() as i32)],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        self.query("SELECT 1", &[]).await.map(drop)
    }

    pub async fn close(&self) -> Result<()> {
        self.pool.close();
        Ok(())
    }

    pub async fn mark_interrupted(&self, replica: &str) -> Result<usize> {
        self.execute(
            &format!(
                "UPDATE runs SET outcome = 'interrupted', finished_at = {NOW},
                 error = 'the server stopped before the call ended'
                 WHERE outcome IS NULL AND (replica = $1 OR replica IS NULL)"
            ),
            &[&replica],
        )
        .await
        .map(|n| n as usize)
    }

    pub async fn heartbeat(&self, replica: &str, silent: Duration) -> Result<usize> {
        let silent = silent.as_millis() as i64;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            &format!(
                "INSERT INTO replicas (name, seen_at_ms) VALUES ($1, {NOW_MS})
                 ON CONFLICT (name) DO UPDATE SET seen_at_ms = excluded.seen_at_ms"
            ),
            &[&replica],
        )
        .await?;
        let marked = tx
            .execute(
                &format!(
                    "UPDATE runs SET outcome = 'interrupted', finished_at = {NOW},
                     error = 'its replica stopped before the call ended'
                     WHERE outcome IS NULL AND replica IN
                     (SELECT name FROM replicas WHERE seen_at_ms < {NOW_MS} - $1)"
                ),
                &[&silent],
            )
            .await?;
        let failed = tx
            .execute(
                &format!(
                    "UPDATE evaluations SET status = 'failed', finished_at = {NOW}, error = $2
                     WHERE status = 'running' AND replica IN
                     (SELECT name FROM replicas WHERE seen_at_ms < {NOW_MS} - $1)"
                ),
                &[&silent, &EVALUATION_STOPPED],
            )
            .await?;
        tx.execute(
            &format!("DELETE FROM admissions WHERE at_ms < {NOW_MS} - $1"),
            &[&MINUTE_MS],
        )
        .await?;
        tx.commit().await?;
        Ok((marked + failed) as usize)
    }

    pub async fn insert_bundle(&self, b: &NewBundle<'_>) -> Result<bool> {
        let functions = serde_json::to_string(b.functions)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO bundle_files (version, data) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&b.version, &b.file],
        )
        .await?;
        let n = tx
            .execute(
                &format!(
                    "INSERT INTO bundles
                     (tenant, version, functions, label, notebook, size, deployed_at)
                     VALUES ($1, $2, $3, $4, $5, $6, {NOW}) ON CONFLICT DO NOTHING"
                ),
                &[
                    &b.tenant,
                    &b.version,
                    &functions,
                    &b.label,
                    &b.notebook,
                    &(b.file.len() as i64),
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(n == 1)
    }

    pub async fn bundle_file(&self, version: &str) -> Result<Option<Vec<u8>>> {
        let row = self
            .query_opt(
                "SELECT data FROM bundle_files WHERE version = $1",
                &[&version],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn bundles(&self, tenant: &str) -> Result<Vec<BundleRow>> {
        let rows = self
            .query(
                "SELECT version, functions, label, notebook, size, deployed_at FROM bundles
                 WHERE tenant = $1 ORDER BY deployed_at DESC, version",
                &[&tenant],
            )
            .await?;
        Ok(rows.iter().map(bundle_row).collect())
    }

    pub async fn bundle(&self, tenant: &str, version: &str) -> Result<Option<BundleRow>> {
        let row = self
            .query_opt(
                "SELECT version, functions, label, notebook, size, deployed_at FROM bundles
                 WHERE tenant = $1 AND version = $2",
                &[&tenant, &version],
            )
            .await?;
        Ok(row.as_ref().map(bundle_row))
    }

    pub async fn versions(&self) -> Result<Vec<String>> {
        let rows = self
            .query("SELECT DISTINCT version FROM bundles", &[])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
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
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            &format!(
                "INSERT INTO aliases (tenant, name, version, moved_at, canary_version,
                 canary_percent, canary_sticky, shadow_version)
                 VALUES ($1, $2, $3, {NOW}, $4, $5, $6, $7)
                 ON CONFLICT (tenant, name) DO UPDATE SET version = $3, moved_at = {NOW},
                 canary_version = $4, canary_percent = $5, canary_sticky = $6,
                 shadow_version = $7"
            ),
            &[
                &tenant,
                &alias,
                &target.version,
                &cv,
                &cp,
                &cs,
                &target.shadow,
            ],
        )
        .await?;
        // The upsert holds the alias's row lock until commit, so a move that took effect
        // first has committed by now, and this statement (read committed) sees its record.
        let previous: Option<String> = tx
            .query_opt(
                "SELECT to_version FROM alias_moves WHERE tenant = $1 AND alias = $2
                 ORDER BY id DESC LIMIT 1",
                &[&tenant, &alias],
            )
            .await?
            .map(|r| r.get(0));
        tx.execute(
            &format!(
                "INSERT INTO alias_moves (tenant, alias, from_version, to_version, moved_at,
                 canary_version, canary_percent, shadow_version, evaluation)
                 VALUES ($1, $2, $3, $4, {NOW}, $5, $6, $7, $8)"
            ),
            &[
                &tenant,
                &alias,
                &previous,
                &target.version,
                &cv,
                &cp,
                &target.shadow,
                &evaluation,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(previous)
    }

    pub async fn alias(&self, tenant: &str, alias: &str) -> Result<Option<AliasTarget>> {
        let row = self
            .query_opt(
                "SELECT version, canary_version, canary_percent, canary_sticky, shadow_version
                 FROM aliases WHERE tenant = $1 AND name = $2",
                &[&tenant, &alias],
            )
            .await?;
        Ok(
            row.map(|r| {
                AliasTarget::from_columns(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
            }),
        )
    }

    pub async fn aliases(&self, tenant: &str) -> Result<Vec<AliasRow>> {
        let rows = self
            .query(
                "SELECT name, version, moved_at, canary_version, canary_percent, canary_sticky,
                 shadow_version FROM aliases WHERE tenant = $1 ORDER BY name",
                &[&tenant],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| AliasRow {
                alias: r.get(0),
                target: AliasTarget::from_columns(r.get(1), r.get(3), r.get(4), r.get(5), r.get(6)),
                moved_at: r.get(2),
            })
            .collect())
    }

    pub async fn alias_history(&self, tenant: &str, alias: &str) -> Result<Vec<MoveRow>> {
        let rows = self
            .query(
                "SELECT alias, tenant, from_version, to_version, moved_at, canary_version,
                 canary_percent, shadow_version, evaluation FROM alias_moves
                 WHERE tenant = $1 AND alias = $2 ORDER BY id",
                &[&tenant, &alias],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| MoveRow {
                alias: r.get(0),
                tenant: r.get(1),
                from: r.get(2),
                to: r.get(3),
                moved_at: r.get(4),
                canary: r.get::<_, Option<String>>(5).map(|version| Canary {
                    version,
                    percent: r.get::<_, Option<f64>>(6).unwrap_or(0.0),
                    sticky: Default::default(),
                }),
                shadow: r.get(7),
                evaluation: r.get(8),
            })
            .collect())
    }

    pub async fn admit(&self, tenant: &str, quota: u32) -> Result<Option<u64>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // One admission at a time per tenant, over every replica: the count below then sees
        // every admission committed before it.
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&LOCK_ADMISSIONS, &tenant],
        )
        .await?;
        let row = tx
            .query_one(
                &format!(
                    "SELECT count(*), min(at_ms), {NOW_MS} FROM admissions
                     WHERE tenant = $1 AND at_ms > {NOW_MS} - $2"
                ),
                &[&tenant, &MINUTE_MS],
            )
            .await?;
        let (count, oldest, now): (i64, Option<i64>, i64) = (row.get(0), row.get(1), row.get(2));
        if count >= i64::from(quota) {
            let wait = oldest.map_or(MINUTE_MS, |t| t + MINUTE_MS - now);
            return Ok(Some(wait.max(1) as u64));
        }
        tx.execute(
            "INSERT INTO admissions (tenant, at_ms) VALUES ($1, $2)",
            &[&tenant, &now],
        )
        .await?;
        tx.commit().await?;
        Ok(None)
    }

    pub async fn gate(
        &self,
        tenant: &str,
        candidate: &str,
        baseline: &str,
        max_changed: u64,
        max_failing: u64,
    ) -> Result<Gate> {
        let passed = self
            .query_opt(
                &format!(
                    "SELECT {EVALUATION_COLUMNS} FROM evaluations
                     WHERE tenant = $1 AND candidate = $2 AND baseline = $3
                     AND status = 'done' AND changed <= $4 AND newly_failing <= $5
                     ORDER BY id DESC LIMIT 1"
                ),
                &[
                    &tenant,
                    &candidate,
                    &baseline,
                    &(max_changed as i64),
                    &(max_failing as i64),
                ],
            )
            .await?;
        if let Some(row) = passed {
            return Ok(Gate::Passed(evaluation_summary(&row)));
        }
        let latest = self
            .query_opt(
                &format!(
                    "SELECT {EVALUATION_COLUMNS} FROM evaluations
                     WHERE tenant = $1 AND candidate = $2 AND baseline = $3
                     ORDER BY id DESC LIMIT 1"
                ),
                &[&tenant, &candidate, &baseline],
            )
            .await?;
        Ok(Gate::Refused(latest.as_ref().map(evaluation_summary)))
    }

    pub async fn start_evaluation(&self, e: &NewEvaluation<'_>) -> Result<()> {
        self.execute(
            &format!(
                "INSERT INTO evaluations (id, tenant, candidate, against, baseline, function,
                 selection, tolerance, status, total, created_at, replica)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'running', $9, {NOW}, $10)"
            ),
            &[
                &e.id,
                &e.tenant,
                &e.candidate,
                &e.against,
                &e.baseline,
                &e.function,
                &e.selection,
                &e.tolerance,
                &(e.total as i64),
                &e.replica,
            ],
        )
        .await
        .map(drop)
    }

    pub async fn evaluation_entries(&self, evaluation: &str, entries: &[Entry]) -> Result<bool> {
        let [same, changed, newly_failing, fixed, not_replayable] = class_counts(entries);
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let counted = tx
            .execute(
                "UPDATE evaluations SET done = done + $2, same = same + $3,
                 changed = changed + $4, newly_failing = newly_failing + $5,
                 fixed = fixed + $6, not_replayable = not_replayable + $7
                 WHERE id = $1 AND status = 'running'",
                &[
                    &evaluation,
                    &(entries.len() as i64),
                    &same,
                    &changed,
                    &newly_failing,
                    &fixed,
                    &not_replayable,
                ],
            )
            .await?;
        if counted == 1 {
            let insert = tx
                .prepare(
                    "INSERT INTO evaluation_runs (evaluation, run, class, detail)
                     VALUES ($1, $2, $3, $4)",
                )
                .await?;
            for e in entries {
                tx.execute(&insert, &[&evaluation, &e.run, &e.class, &e.detail])
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(counted == 1)
    }

    pub async fn finish_evaluation(&self, id: &str, error: Option<&str>) -> Result<()> {
        self.execute(
            &format!(
                "UPDATE evaluations SET finished_at = {NOW}, error = $2::text,
                 status = CASE WHEN $2::text IS NULL THEN 'done' ELSE 'failed' END
                 WHERE id = $1 AND status = 'running'"
            ),
            &[&id, &error],
        )
        .await
        .map(drop)
    }

    pub async fn fail_evaluations(&self, replica: &str) -> Result<usize> {
        self.execute(
            &format!(
                "UPDATE evaluations SET status = 'failed', finished_at = {NOW}, error = $2
                 WHERE status = 'running' AND replica = $1"
            ),
            &[&replica, &EVALUATION_STOPPED],
        )
        .await
        .map(|n| n as usize)
    }

    pub async fn returned_run(&self, tenant: &str, key: &str) -> Result<Option<RunRow>> {
        let row = self
            .query_opt(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE tenant = $1 AND idempotency_key = $2
                     AND outcome = 'returned'"
                ),
                &[&tenant, &key],
            )
            .await?;
        Ok(row.as_ref().map(run_row))
    }

    pub async fn start_run(&self, run: &NewRun<'_>) -> Result<()> {
        self.execute(
            &format!(
                "INSERT INTO runs (id, tenant, alias, bundle_version, function, idempotency_key,
                 received_at, input_sha256, host_version, runtime_sha256, replica, side,
                 shadow_of)
                 VALUES ($1, $2, $3, $4, $5, $6, {NOW}, $7, $8, $9, $10, $11, $12)"
            ),
            &[
                &run.id,
                &run.tenant,
                &run.alias,
                &run.bundle_version,
                &run.function,
                &run.idempotency_key,
                &run.input_sha256,
                &env!("CARGO_PKG_VERSION"),
                &run.runtime_sha256,
                &run.replica,
                &run.side,
                &run.shadow_of,
            ],
        )
        .await
        .map(drop)
    }

    pub async fn finish_run(&self, id: &str, f: &Finished<'_>) -> Result<Completed> {
        let statement = complete_statement();
        let Some(key) = f.idempotency_key.filter(|_| f.outcome == "returned") else {
            // One statement is a transaction of its own.
            let row = Completion::new(id, f, f.outcome, f.error.map(str::to_owned));
            self.execute(&statement, &row.params()).await?;
            return Ok(Completed::Recorded);
        };
        // A retried call may have returned first under the same key, on any replica: under
        // the key's lock, this one then becomes the duplicate and the earlier result stands.
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2 || E'\\n' || $3))",
            &[&LOCK_IDEMPOTENCY, &f.tenant, &key],
        )
        .await?;
        let earlier: Option<String> = tx
            .query_opt(
                "SELECT id FROM runs WHERE tenant = $1 AND idempotency_key = $2
                 AND outcome = 'returned'",
                &[&f.tenant, &key],
            )
            .await?
            .map(|r| r.get(0));
        let row = match &earlier {
            Some(e) => Completion::new(
                id,
                f,
                "duplicate",
                Some(format!(
                    "run {e} with the same Idempotency-Key returned first: its result was the answer"
                )),
            ),
            None => Completion::new(id, f, f.outcome, f.error.map(str::to_owned)),
        };
        let prepared = tx.prepare_cached(&statement).await?;
        tx.execute(&prepared, &row.params()).await?;
        tx.commit().await?;
        Ok(earlier.map_or(Completed::Recorded, Completed::Duplicate))
    }

    pub async fn interrupt(&self, id: &str, error: &str) -> Result<()> {
        self.execute(
            &format!(
                "UPDATE runs SET outcome = 'interrupted', http_status = 503,
                 finished_at = {NOW}, error = $2 WHERE id = $1 AND outcome IS NULL"
            ),
            &[&id, &error],
        )
        .await
        .map(drop)
    }

    pub async fn runs(&self, tenant: &str, f: &RunFilter) -> Result<Vec<RunRow>> {
        let rows = self
            .query(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE tenant = $1
                     AND ($2::text IS NULL OR function = $2) AND ($3::text IS NULL OR alias = $3)
                     AND ($4::text IS NULL OR bundle_version = $4)
                     AND ($5::text IS NULL OR outcome = $5)
                     AND ($6::text IS NULL OR received_at >= $6)
                     AND ($7::text IS NULL OR id < $7)
                     AND ($9::text IS NULL OR side = $9)
                     ORDER BY id DESC LIMIT $8"
                ),
                &[
                    &tenant,
                    &f.function,
                    &f.alias,
                    &f.version,
                    &f.outcome,
                    &f.since,
                    &f.after,
                    &i64::from(f.limit()),
                    &f.side,
                ],
            )
            .await?;
        Ok(rows.iter().map(run_row).collect())
    }

    pub async fn run(&self, tenant: &str, id: &str) -> Result<Option<RunRow>> {
        let row = self
            .query_opt(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE tenant = $1 AND id = $2"),
                &[&tenant, &id],
            )
            .await?;
        Ok(row.as_ref().map(run_row))
    }

    pub async fn trace(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>> {
        let row = self
            .query_opt(
                "SELECT t.data FROM traces t JOIN runs r ON r.id = t.run
                 WHERE r.tenant = $1 AND t.run = $2",
                &[&tenant, &id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn usage(&self, tenant: &str) -> Result<Usage> {
        let row = self
            .query_opt(
                "SELECT (SELECT coalesce(sum(size), 0) FROM bundles WHERE tenant = $1)::bigint,
                        (SELECT coalesce(sum(bytes), 0) FROM trace_bytes WHERE tenant = $1)::bigint",
                &[&tenant],
            )
            .await?;
        let bytes = |i: usize| row.as_ref().map_or(0, |r| r.get::<_, i64>(i)) as u64;
        Ok(Usage {
            bundles: bytes(0),
            traces: bytes(1),
        })
    }

    pub async fn traces(
        &self,
        tenant: &str,
        age: Option<Duration>,
        limit: u32,
    ) -> Result<Vec<(String, u64)>> {
        // Two statements, not one with `$2 IS NULL OR ...`: a plan PostgreSQL makes once for
        // any parameters could not use `runs_live_traces` for the age.
        let live = "SELECT id, trace_size FROM runs
                    WHERE tenant = $1 AND trace_size IS NOT NULL AND trace_pruned = 0";
        let oldest = "ORDER BY finished_at, id LIMIT $2";
        let limit = i64::from(limit);
        let rows = match age {
            Some(age) => {
                let past = "AND finished_at < to_char(
                     (clock_timestamp() - make_interval(secs => $3)) AT TIME ZONE 'UTC',
                     'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";
                self.query(
                    &format!("{live} {past} {oldest}"),
                    &[&tenant, &limit, &age.as_secs_f64()],
                )
                .await?
            }
            None => {
                self.query(&format!("{live} {oldest}"), &[&tenant, &limit])
                    .await?
            }
        };
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    pub async fn prune(&self, id: &str) -> Result<()> {
        // One statement, so one transaction: the row marked, the trace deleted and its bytes
        // taken off the count, or nothing when the trace was already pruned.
        self.execute(
            "WITH pruned AS (
                 UPDATE runs SET trace_pruned = 1
                 WHERE id = $1 AND trace_pruned = 0 AND trace_size IS NOT NULL
                 RETURNING tenant, trace_size),
             deleted AS (DELETE FROM traces WHERE run = $1 AND EXISTS (SELECT 1 FROM pruned))
             INSERT INTO trace_bytes (tenant, slot, bytes)
             SELECT tenant, $2::int, -trace_size FROM pruned
             ON CONFLICT (tenant, slot) DO UPDATE SET bytes = trace_bytes.bytes + excluded.bytes",
            &[&id, &super::trace_slot(id)],
        )
        .await?;
        Ok(())
    }

    // The UI's reads of evaluations.

    pub async fn evaluations(&self, tenant: &str) -> Result<Vec<super::EvaluationRow>> {
        let rows = self
            .query(
                &format!(
                    "SELECT {} FROM evaluations WHERE tenant = $1 ORDER BY created_at DESC, id DESC",
                    super::EVALUATION_ROW_COLUMNS
                ),
                &[&tenant],
            )
            .await?;
        Ok(rows.iter().map(evaluation_row).collect())
    }

    pub async fn evaluation(&self, tenant: &str, id: &str) -> Result<Option<super::EvaluationRow>> {
        let row = self
            .query_opt(
                &format!(
                    "SELECT {} FROM evaluations WHERE tenant = $1 AND id = $2",
                    super::EVALUATION_ROW_COLUMNS
                ),
                &[&tenant, &id],
            )
            .await?;
        Ok(row.as_ref().map(evaluation_row))
    }

    pub async fn evaluation_runs(&self, id: &str) -> Result<Vec<super::EvaluationRunRow>> {
        let rows = self
            .query(
                "SELECT run, class, detail FROM evaluation_runs WHERE evaluation = $1 ORDER BY run",
                &[&id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| super::EvaluationRunRow {
                run: r.get(0),
                class: r.get(1),
                detail: serde_json::from_str(r.get(2)).unwrap_or_default(),
            })
            .collect())
    }
}

/// Completes a run's row, and stores and counts its trace when it has one: one statement,
/// so one round trip for a call without a key, where a transaction of three statements took
/// six (each statement prepared anew). Its parameters are [`Completion::params`].
fn complete_statement() -> String {
    format!(
        "WITH stored AS (
             INSERT INTO traces (run, data) SELECT $1, $11::bytea WHERE $11 IS NOT NULL
             RETURNING run),
         counted AS (
             INSERT INTO trace_bytes (tenant, slot, bytes)
             SELECT $12::text, $13::int, $9::bigint FROM stored
             ON CONFLICT (tenant, slot) DO UPDATE SET bytes = trace_bytes.bytes + excluded.bytes)
         UPDATE runs SET finished_at = {NOW}, duration_ms = $2, outcome = $3,
         http_status = $4, result = $5, result_sha256 = $6, error = $7,
         trace_sha256 = $8, trace_size = $9, started_at = {STARTED}
         WHERE id = $1"
    )
}

/// What [`complete_statement`] writes for one run.
struct Completion<'a> {
    id: &'a str,
    f: &'a Finished<'a>,
    outcome: &'a str,
    error: Option<String>,
    http_status: i32,
    trace: Option<&'a [u8]>,
    trace_sha256: Option<&'a str>,
    trace_size: Option<i64>,
    slot: i32,
}

impl<'a> Completion<'a> {
    fn new(id: &'a str, f: &'a Finished<'a>, outcome: &'a str, error: Option<String>) -> Self {
        let (trace, trace_sha256) = f.trace.unzip();
        Completion {
            id,
            f,
            outcome,
            error,
            http_status: i32::from(f.http_status),
            trace,
            trace_sha256,
            trace_size: trace.map(|t| t.len() as i64),
            slot: super::trace_slot(id),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 13] {
        [
            &self.id,
            &self.f.duration_ms,
            &self.outcome,
            &self.http_status,
            &self.f.result,
            &self.f.result_sha256,
            &self.error,
            &self.trace_sha256,
            &self.trace_size,
            &self.f.running_ms,
            &self.trace,
            &self.f.tenant,
            &self.slot,
        ]
    }
}

fn run_row(r: &Row) -> RunRow {
    let result: Option<String> = r.get(13);
    RunRow {
        id: r.get(0),
        tenant: r.get(1),
        alias: r.get(2),
        bundle_version: r.get(3),
        function: r.get(4),
        idempotency_key: r.get(5),
        received_at: r.get(6),
        started_at: r.get(7),
        finished_at: r.get(8),
        duration_ms: r.get(9),
        outcome: r.get(10),
        http_status: r.get::<_, Option<i32>>(11).map(|s| s as u16),
        input_sha256: r.get(12),
        // Stored by the server as JSON text; anything else would be a corrupted row.
        result: result.and_then(|t| serde_json::from_str(&t).ok()),
        result_sha256: r.get(14),
        error: r.get(15),
        trace_sha256: r.get(16),
        trace_size: r.get::<_, Option<i64>>(17).map(|s| s as u64),
        trace_pruned: r.get::<_, i32>(18) != 0,
        host_version: r.get(19),
        runtime_sha256: r.get(20),
        replica: r.get(21),
        side: r.get(22),
        shadow_of: r.get(23),
    }
}

fn evaluation_summary(r: &Row) -> EvaluationSummary {
    let count = |i: usize| r.get::<_, i64>(i) as u64;
    EvaluationSummary {
        id: r.get(0),
        candidate: r.get(1),
        baseline: r.get(2),
        status: r.get(3),
        total: count(4),
        same: count(5),
        changed: count(6),
        newly_failing: count(7),
        fixed: count(8),
        not_replayable: count(9),
        finished_at: r.get(10),
    }
}

fn bundle_row(r: &Row) -> BundleRow {
    let functions: String = r.get(1);
    BundleRow {
        version: r.get(0),
        functions: serde_json::from_str(&functions).unwrap_or_default(),
        label: r.get(2),
        notebook: r.get(3),
        size: r.get::<_, i64>(4) as u64,
        deployed_at: r.get(5),
    }
}

// The UI's reads of evaluations: an `evaluations` row in [`super::EVALUATION_ROW_COLUMNS`]' order.
fn evaluation_row(r: &Row) -> super::EvaluationRow {
    let selection: &str = r.get(5);
    super::EvaluationRow {
        id: r.get(0),
        candidate: r.get(1),
        against: r.get(2),
        baseline: r.get(3),
        function: r.get(4),
        selection: serde_json::from_str(selection).unwrap_or_default(),
        tolerance: r.get(6),
        status: r.get(7),
        total: r.get(8),
        done: r.get(9),
        same: r.get(10),
        changed: r.get(11),
        newly_failing: r.get(12),
        fixed: r.get(13),
        not_replayable: r.get(14),
        error: r.get(15),
        created_at: r.get(16),
        finished_at: r.get(17),
        replica: r.get(18),
    }
}
