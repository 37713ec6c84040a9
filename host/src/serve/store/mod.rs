//! The run store: everything replicas share, behind one interface with two backends.
//!
//! [`Store`] is what the server calls; [`sqlite`] (one file, `host.db`, the embedded default)
//! and [`postgres`] (`store = "postgres://..."`, for several replicas) implement the same
//! methods over the same schema, brought up to date at start by the same versioned
//! [`MIGRATIONS`]. Bundle files and traces are rows too (`bundle_files`, `traces`), so every
//! replica reads what any replica wrote, a trace is committed in the same transaction as
//! the row that points at it, and one backup holds everything (docs/deploy.md says why
//! this beats a shared folder or object storage at the volumes measured).
//!
//! Schema (version 2, then 3 and 4 below):
//!
//! - `bundles(tenant, version, functions, label, notebook, size, deployed_at)`: the bundles a
//!   tenant deployed; `size` (of the stored bundle file) counts towards the tenant's
//!   storage. `functions` is a JSON array.
//! - `bundle_files(version, data)`: each bundle file once, shared by tenants that deploy the
//!   same content.
//! - `aliases(tenant, name, version, moved_at)`: where each alias points now.
//! - `alias_moves(id, tenant, alias, from_version, to_version, moved_at)`: every move, kept,
//!   in order (`id`).
//! - `runs`: one row per accepted call, written when the call is accepted and completed when
//!   it ends; a row whose `outcome` is still NULL was cut short by a crash and is marked
//!   `interrupted` (by its replica's next start, or by any replica once its replica stopped
//!   beating, see `replicas`). Columns: `id` (UUIDv7, so ids sort by time), `tenant`, `alias`
//!   (when called by alias), `bundle_version`, `function`, `idempotency_key` (the client's
//!   `Idempotency-Key` header; at most one `returned` row per tenant and key), `received_at`,
//!   `started_at` (when a worker took the call up, written with its end: one statement less
//!   a call), `finished_at` (UTC, RFC 3339 with milliseconds), `duration_ms` (the call
//!   in the sandbox), `outcome` (`returned|raised|limit|bad_input|internal|interrupted`, and
//!   `duplicate` for a retried call that finished after another with its key returned),
//!   `http_status`, `input_sha256` (of the request body), `result` (the value's JSON, NULL
//!   when over [`RESULT_CAP`] bytes), `result_sha256`, `error` (the message), `trace_sha256`
//!   and `trace_size` (of its `traces` row), `trace_pruned` (1 once retention or the storage
//!   quota removed the trace), `host_version`, `runtime_sha256`, `replica` (which replica
//!   served it).
//! - `traces(run, data)`: each run's trace file, as `host replay` reads it.
//! - `admissions(tenant, at_ms)`: when each tenant's calls of the last minute were admitted,
//!   for `calls_per_minute` across replicas.
//! - `replicas(name, seen_at_ms)`: each replica's last heartbeat.
//!
//! Version 3 adds what deploying from evidence needs (issue 14):
//!
//! - `aliases.canary_version`, `canary_percent` (0-100), `canary_sticky` (`key` or `input`:
//!   what keeps a client on one side) and `shadow_version`; `alias_moves` records the same
//!   with each move, and `evaluation` (the evaluation that let a gated move through).
//! - `runs.side` (`primary`, `canary` or `shadow`, for calls through an alias that splits or
//!   shadows) and `runs.shadow_of` (a shadow run's primary run).
//! - `evaluations(id, tenant, candidate, against, baseline, function, selection, tolerance,
//!   status, total, done, same, changed, newly_failing, fixed, not_replayable, error,
//!   created_at, finished_at, replica)`: a candidate version run on logged calls of
//!   `against` (an alias or version as asked; `baseline` the version it resolved to);
//!   `selection` is the JSON of what was asked (`last`, `since`, `runs`); `status` is
//!   `running`, `done` or `failed`.
//! - `evaluation_runs(evaluation, run, class, detail)`: each run's class (`same`,
//!   `changed`, `newly_failing`, `fixed`, `not_replayable`) and its report entry (JSON).
//!
//! Version 4 makes the storage checks every call runs cost the same however many runs a
//! tenant has logged (they summed and scanned all of its runs: a call took half a second
//! at 400,000):
//!
//! - `trace_bytes(tenant, slot, bytes)`: the bytes of a tenant's traces not yet pruned,
//!   kept by the statements that store and prune traces, in the same transaction. A tenant's
//!   total is the sum of its rows; each run counts in the slot of its id's last hex digit,
//!   so concurrent calls of one tenant (on PostgreSQL, from several replicas) update one of
//!   16 rows rather than all wait on one.
//! - `runs_live_traces`, an index of the traces not yet pruned by tenant and `finished_at`:
//!   retention finds the traces past it, and the storage quota the oldest ones, without
//!   reading the others.
//!
//! Times are the database's own, taken when each statement runs, so rows from every replica
//! sort and compare on one clock.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::bundle::{parse_rfc3339, rfc3339_ms};
use crate::evaluate::Class;
use crate::policy::period_back;

pub mod postgres;
pub mod sqlite;

/// A run's stored result is capped: the trace holds the whole of it.
pub const RESULT_CAP: usize = 64 << 10;

/// The schema's migrations, in order: migration `i` takes a store from version `i` to `i + 1`.
/// Written once for both backends; [`Dialect::sql`] fills in the few types they spell
/// differently (`{serial}`, `{real}`, `{big}`, `{blob}`).
pub const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE bundles (
        tenant TEXT NOT NULL,
        version TEXT NOT NULL,
        functions TEXT NOT NULL,
        label TEXT,
        notebook TEXT NOT NULL,
        size {big} NOT NULL,
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
        id {serial},
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
        duration_ms {real},
        outcome TEXT,
        http_status INTEGER,
        input_sha256 TEXT NOT NULL,
        result TEXT,
        result_sha256 TEXT,
        error TEXT,
        trace_sha256 TEXT,
        trace_size {big},
        trace_pruned INTEGER NOT NULL DEFAULT 0,
        host_version TEXT NOT NULL,
        runtime_sha256 TEXT NOT NULL
    );
    CREATE INDEX runs_by_tenant ON runs (tenant, id);
    ",
    "
    ALTER TABLE runs ADD COLUMN replica TEXT;
    CREATE UNIQUE INDEX runs_returned_once ON runs (tenant, idempotency_key)
        WHERE outcome = 'returned' AND idempotency_key IS NOT NULL;
    CREATE INDEX runs_in_flight ON runs (replica) WHERE outcome IS NULL;
    CREATE TABLE bundle_files (
        version TEXT PRIMARY KEY,
        data {blob} NOT NULL
    );
    CREATE TABLE traces (
        run TEXT PRIMARY KEY,
        data {blob} NOT NULL
    );
    CREATE TABLE admissions (
        tenant TEXT NOT NULL,
        at_ms {big} NOT NULL
    );
    CREATE INDEX admissions_by_tenant ON admissions (tenant, at_ms);
    CREATE TABLE replicas (
        name TEXT PRIMARY KEY,
        seen_at_ms {big} NOT NULL
    );
    ",
    "
    ALTER TABLE aliases ADD COLUMN canary_version TEXT;
    ALTER TABLE aliases ADD COLUMN canary_percent {real};
    ALTER TABLE aliases ADD COLUMN canary_sticky TEXT;
    ALTER TABLE aliases ADD COLUMN shadow_version TEXT;
    ALTER TABLE alias_moves ADD COLUMN canary_version TEXT;
    ALTER TABLE alias_moves ADD COLUMN canary_percent {real};
    ALTER TABLE alias_moves ADD COLUMN shadow_version TEXT;
    ALTER TABLE alias_moves ADD COLUMN evaluation TEXT;
    ALTER TABLE runs ADD COLUMN side TEXT;
    ALTER TABLE runs ADD COLUMN shadow_of TEXT;
    CREATE INDEX runs_by_shadow ON runs (shadow_of) WHERE shadow_of IS NOT NULL;
    CREATE TABLE evaluations (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        candidate TEXT NOT NULL,
        against TEXT NOT NULL,
        baseline TEXT,
        function TEXT,
        selection TEXT NOT NULL,
        tolerance {real},
        status TEXT NOT NULL,
        total {big} NOT NULL DEFAULT 0,
        done {big} NOT NULL DEFAULT 0,
        same {big} NOT NULL DEFAULT 0,
        changed {big} NOT NULL DEFAULT 0,
        newly_failing {big} NOT NULL DEFAULT 0,
        fixed {big} NOT NULL DEFAULT 0,
        not_replayable {big} NOT NULL DEFAULT 0,
        error TEXT,
        created_at TEXT NOT NULL,
        finished_at TEXT,
        replica TEXT
    );
    CREATE INDEX evaluations_by_tenant ON evaluations (tenant, id);
    CREATE TABLE evaluation_runs (
        evaluation TEXT NOT NULL,
        run TEXT NOT NULL,
        class TEXT NOT NULL,
        detail TEXT NOT NULL,
        PRIMARY KEY (evaluation, run)
    );
    ",
    "
    CREATE TABLE trace_bytes (
        tenant TEXT NOT NULL,
        slot INTEGER NOT NULL,
        bytes {big} NOT NULL,
        PRIMARY KEY (tenant, slot)
    );
    INSERT INTO trace_bytes (tenant, slot, bytes)
        SELECT tenant, 0, sum(trace_size) FROM runs
        WHERE trace_size IS NOT NULL AND trace_pruned = 0 GROUP BY tenant;
    CREATE INDEX runs_live_traces ON runs (tenant, finished_at, id)
        WHERE trace_size IS NOT NULL AND trace_pruned = 0;
    ",
];

/// What a tenant's storage holds, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Its deployed bundles' files: kept until removed.
    pub bundles: u64,
    /// Its traces not yet pruned: what pruning can free.
    pub traces: u64,
}

/// The `trace_bytes` row a run's trace counts in: its id's last hex digit (see the schema).
fn trace_slot(run: &str) -> i32 {
    run.chars()
        .next_back()
        .and_then(|c| c.to_digit(16))
        .map_or(0, |d| d as i32)
}

/// The SQL spellings that differ between the backends.
#[derive(Clone, Copy)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// A migration's SQL in this dialect.
    pub fn sql(self, migration: &str) -> String {
        let (serial, real, big, blob) = match self {
            Dialect::Sqlite => (
                "INTEGER PRIMARY KEY AUTOINCREMENT",
                "REAL",
                "INTEGER",
                "BLOB",
            ),
            Dialect::Postgres => (
                "BIGSERIAL PRIMARY KEY",
                "DOUBLE PRECISION",
                "BIGINT",
                "BYTEA",
            ),
        };
        migration
            .replace("{serial}", serial)
            .replace("{real}", real)
            .replace("{big}", big)
            .replace("{blob}", blob)
    }
}

/// Refuses a store whose schema is newer than this host knows.
fn check_version(done: usize) -> Result<()> {
    if done > MIGRATIONS.len() {
        bail!(
            "its schema is version {done}, newer than this host's ({}): use a newer host",
            MIGRATIONS.len()
        );
    }
    Ok(())
}

/// Where the store is: `sqlite` (the default, `host.db` in the data folder) or a
/// `postgres://` (or `postgresql://`) URL.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    Sqlite,
    Postgres(String),
}

impl Location {
    /// Parses the config's `store` or `--store`.
    pub fn parse(text: &str) -> Result<Location> {
        if text == "sqlite" {
            Ok(Location::Sqlite)
        } else if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            text.parse::<tokio_postgres::Config>().map_err(|e| {
                crate::error::bad_input(format!("`{}` is not a PostgreSQL URL: {e}", redact(text)))
            })?;
            Ok(Location::Postgres(text.to_owned()))
        } else {
            Err(crate::error::bad_input(format!(
                "`{}` is not a store: use `sqlite` or a `postgres://` URL",
                redact(text)
            )))
        }
    }
}

/// A URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let user = &url[s + 3..at];
            match user.split_once(':') {
                Some((name, _)) => format!("{}{name}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
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

/// Where an alias sends calls: its version, and optionally a canary that takes a share of
/// them and a shadow that runs each of them again, unanswered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AliasTarget {
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<String>,
}

/// A canary: `percent` of an alias's calls go to `version` instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    pub version: String,
    pub percent: f64,
    #[serde(default)]
    pub sticky: Sticky,
}

/// What keeps a client on one side of a canary: its `Idempotency-Key` (falling back to the
/// input when a call has none), or the input itself (the same input, the same side).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sticky {
    #[default]
    Key,
    Input,
}

impl Sticky {
    pub fn as_str(self) -> &'static str {
        match self {
            Sticky::Key => "key",
            Sticky::Input => "input",
        }
    }

    pub fn parse(text: Option<&str>) -> Sticky {
        match text {
            Some("input") => Sticky::Input,
            _ => Sticky::Key,
        }
    }
}

impl AliasTarget {
    /// An alias that only points at `version`.
    pub fn plain(version: &str) -> AliasTarget {
        AliasTarget {
            version: version.to_owned(),
            canary: None,
            shadow: None,
        }
    }

    /// Rebuilt from the columns the backends store.
    fn from_columns(
        version: String,
        canary_version: Option<String>,
        canary_percent: Option<f64>,
        canary_sticky: Option<String>,
        shadow: Option<String>,
    ) -> AliasTarget {
        AliasTarget {
            version,
            canary: canary_version.map(|version| Canary {
                version,
                percent: canary_percent.unwrap_or(0.0),
                sticky: Sticky::parse(canary_sticky.as_deref()),
            }),
            shadow,
        }
    }
}

/// An alias, as `GET /v1/aliases` lists it.
#[derive(Debug, Serialize)]
pub struct AliasRow {
    pub alias: String,
    #[serde(flatten)]
    pub target: AliasTarget,
    pub moved_at: String,
}

/// One move of an alias.
#[derive(Debug, Serialize)]
pub struct MoveRow {
    pub alias: String,
    pub tenant: String,
    pub from: Option<String>,
    pub to: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<String>,
    /// The evaluation a gated move was let through on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<String>,
    pub moved_at: String,
}

/// A deploy, as it is recorded.
pub struct NewBundle<'a> {
    pub tenant: &'a str,
    pub version: &'a str,
    pub functions: &'a [String],
    pub label: Option<&'a str>,
    pub notebook: &'a str,
    /// The bundle file.
    pub file: &'a [u8],
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
    pub replica: &'a str,
    /// Which side of an alias's canary or shadow served it.
    pub side: Option<&'a str>,
    /// A shadow run's primary run.
    pub shadow_of: Option<&'a str>,
}

/// How a call ended.
pub struct Finished<'a> {
    /// The run's tenant and `Idempotency-Key`, as its row has them: a returned call with a
    /// key checks that no other call with it returned first.
    pub tenant: &'a str,
    pub idempotency_key: Option<&'a str>,
    /// How long ago a worker took the call up (its `started_at`), if one did.
    pub running_ms: Option<f64>,
    pub duration_ms: Option<f64>,
    pub outcome: &'a str,
    pub http_status: u16,
    pub result: Option<&'a str>,
    pub result_sha256: Option<&'a str>,
    pub error: Option<&'a str>,
    /// The trace file and its sha256, stored with the row in one transaction.
    pub trace: Option<(&'a [u8], &'a str)>,
}

/// What [`Store::finish_run`] did.
#[derive(Debug, PartialEq)]
pub enum Completed {
    /// The row now says how the call ended.
    Recorded,
    /// The call returned, but another call with its `Idempotency-Key` had returned first:
    /// the row says `duplicate`, and that run's result is the answer.
    Duplicate(String),
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
    pub replica: Option<String>,
    pub side: Option<String>,
    pub shadow_of: Option<String>,
}

const RUN_COLUMNS: &str = "id, tenant, alias, bundle_version, function, idempotency_key,
    received_at, started_at, finished_at, duration_ms, outcome, http_status, input_sha256,
    result, result_sha256, error, trace_sha256, trace_size, trace_pruned, host_version,
    runtime_sha256, replica, side, shadow_of";

/// The outcomes a run's row can have (`outcome` is NULL while it runs).
pub const OUTCOMES: [&str; 7] = [
    "returned",
    "raised",
    "limit",
    "bad_input",
    "internal",
    "interrupted",
    "duplicate",
];

/// The sides a call through an alias can take.
pub const SIDES: [&str; 3] = ["primary", "canary", "shadow"];

/// `GET /v1/runs`'s filters, all optional. Each is checked as it is read, so a filter that
/// could match nothing by its form (a misspelt outcome, a time that is not one) is a 400
/// that says so, not an empty page.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFilter {
    pub function: Option<String>,
    pub alias: Option<String>,
    pub version: Option<String>,
    /// One of [`OUTCOMES`].
    #[serde(default, deserialize_with = "outcome")]
    pub outcome: Option<String>,
    /// One of [`SIDES`].
    #[serde(default, deserialize_with = "side")]
    pub side: Option<String>,
    /// Runs received at or after this time: given as RFC 3339 (`2026-12-07T09:30:00Z`, with
    /// an offset, or a date) or as a period back from now (`24h`, `30m`, `7d`), kept in the
    /// rows' own form ([`rfc3339_ms`]) so that it compares with them as text.
    #[serde(default, deserialize_with = "since")]
    pub since: Option<String>,
    /// At most this many runs (default 100, at most 1000).
    #[serde(default, deserialize_with = "limit")]
    pub limit: Option<u32>,
    /// The page after this run id (the last id of the previous page): runs are newest first.
    #[serde(default, deserialize_with = "run_id")]
    pub after: Option<String>,
}

/// A filter's value, checked by `check`; its error is the 400's message.
fn checked<'de, D, T>(
    d: D,
    check: impl FnOnce(String) -> Result<T, String>,
) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Option::<String>::deserialize(d)?
        .map(|text| check(text).map_err(serde::de::Error::custom))
        .transpose()
}

fn one_of(text: String, allowed: &[&str]) -> Result<String, String> {
    if allowed.contains(&text.as_str()) {
        Ok(text)
    } else {
        Err(format!("`{text}` is not one of {}", allowed.join(", ")))
    }
}

/// `text` if it is one of [`OUTCOMES`]; else what is.
pub fn parse_outcome(text: String) -> Result<String, String> {
    one_of(text, &OUTCOMES)
}

/// A run id in the form the rows keep it (UUID, lowercase, hyphenated).
pub fn parse_run_id(text: String) -> Result<String, String> {
    uuid::Uuid::parse_str(&text)
        .map(|id| id.hyphenated().to_string())
        .map_err(|_| format!("`{text}` is not a run id (the `next` of the page before)"))
}

fn outcome<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, parse_outcome)
}

fn side<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, |t| one_of(t, &SIDES))
}

fn since<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, |text| {
        period_back(&text)
            .ok()
            .or_else(|| parse_rfc3339(&text))
            .map(rfc3339_ms)
            .ok_or_else(|| {
                format!(
                    "`{text}` is neither a time (RFC 3339: 2026-12-07T09:30:00Z, with an offset, \
                 or a date) nor a period back from now (24h, 30m, 7d)"
                )
            })
    })
}

fn limit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    checked(d, |text| match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "`{text}` is not a number of runs from 1 (at most 1000 a page)"
        )),
    })
}

fn run_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, parse_run_id)
}

impl RunFilter {
    pub fn limit(&self) -> u32 {
        self.limit.unwrap_or(100).min(1000)
    }
}

/// An evaluation's summary, as a gated alias move sees it.
#[derive(Debug, Clone, Serialize)]
pub struct EvaluationSummary {
    pub id: String,
    pub candidate: String,
    pub baseline: Option<String>,
    pub status: String,
    pub total: u64,
    pub same: u64,
    pub changed: u64,
    pub newly_failing: u64,
    pub fixed: u64,
    pub not_replayable: u64,
    pub finished_at: Option<String>,
}

/// What [`Store::gate`] found.
#[derive(Debug)]
pub enum Gate {
    /// A passing evaluation.
    Passed(EvaluationSummary),
    /// None passes; the latest of this candidate against this baseline, if any.
    Refused(Option<EvaluationSummary>),
}

const EVALUATION_COLUMNS: &str = "id, candidate, baseline, status, total, same, changed,
    newly_failing, fixed, not_replayable, finished_at";

/// An evaluation as `POST /v1/evaluations` records it, `running`.
pub struct NewEvaluation<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    /// The candidate version.
    pub candidate: &'a str,
    /// The alias or version asked for, and the version it resolved to.
    pub against: &'a str,
    pub baseline: &'a str,
    pub function: Option<&'a str>,
    /// What was asked (`last`, `since` or `runs`), as JSON.
    pub selection: &'a str,
    pub tolerance: f64,
    /// How many runs it classes.
    pub total: u64,
    /// The replica that runs it, which marks it failed if it stops first.
    pub replica: &'a str,
}

/// One run of an evaluation, classed: its id, class and report entry (JSON).
pub struct Entry {
    pub run: String,
    pub class: &'static str,
    pub detail: String,
}

/// How many runs of each class `entries` hold, in [`Class::ALL`]'s order, which is the
/// order of the `evaluations` columns `same`, `changed`, `newly_failing`, `fixed`,
/// `not_replayable`.
pub fn class_counts(entries: &[Entry]) -> [i64; 5] {
    let mut counts = [0; 5];
    for e in entries {
        if let Some(i) = Class::ALL.iter().position(|c| c.name() == e.class) {
            counts[i] += 1;
        }
    }
    counts
}

/// The error of an evaluation its replica's stop cut short.
pub const EVALUATION_STOPPED: &str =
    "the server stopped before the evaluation ended: start it again";

/// The window of `calls_per_minute`.
pub const MINUTE_MS: i64 = 60_000;

/// The store, on either backend. Every method is the same on both.
pub enum Store {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

/// Calls the same method on whichever backend this is.
macro_rules! each {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            Store::Sqlite($b) => $e,
            Store::Postgres($b) => $e,
        }
    };
}

impl Store {
    /// Opens the store at `location` (`data` holds the SQLite file), creating or migrating
    /// its schema.
    pub async fn open(location: &Location, data: &Path) -> Result<Store> {
        Ok(match location {
            Location::Sqlite => Store::Sqlite(sqlite::Sqlite::open(&data.join("host.db"))?),
            Location::Postgres(url) => Store::Postgres(postgres::Postgres::open(url).await?),
        })
    }

    /// Which backend this is, for the log.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "SQLite",
            Store::Postgres(_) => "PostgreSQL",
        }
    }

    /// Whether the store answers (for `/readyz`).
    pub async fn ping(&self) -> Result<()> {
        each!(self, b => b.ping().await)
    }

    /// What to do at a clean stop (SQLite folds its write-ahead log into the file).
    pub async fn close(&self) -> Result<()> {
        each!(self, b => b.close().await)
    }

    /// Marks the runs this replica (or, for rows from before replicas were named, any
    /// server) left unfinished when it stopped, and says how many there were.
    pub async fn mark_interrupted(&self, replica: &str) -> Result<usize> {
        each!(self, b => b.mark_interrupted(replica).await)
    }

    /// Notes that `replica` is alive; marks interrupted the unfinished runs of replicas
    /// silent for longer than `silent`, and failed ([`EVALUATION_STOPPED`]) their running
    /// evaluations; forgets admissions older than a minute. Returns how many runs and
    /// evaluations it marked.
    pub async fn heartbeat(&self, replica: &str, silent: Duration) -> Result<usize> {
        each!(self, b => b.heartbeat(replica, silent).await)
    }

    /// Records a tenant's deploy (and the bundle file, once per version); false when the
    /// tenant already had this version.
    pub async fn insert_bundle(&self, bundle: &NewBundle<'_>) -> Result<bool> {
        each!(self, b => b.insert_bundle(bundle).await)
    }

    /// A version's bundle file.
    pub async fn bundle_file(&self, version: &str) -> Result<Option<Vec<u8>>> {
        each!(self, b => b.bundle_file(version).await)
    }

    /// A tenant's bundles, newest first.
    pub async fn bundles(&self, tenant: &str) -> Result<Vec<BundleRow>> {
        each!(self, b => b.bundles(tenant).await)
    }

    /// One of a tenant's bundles.
    pub async fn bundle(&self, tenant: &str, version: &str) -> Result<Option<BundleRow>> {
        each!(self, b => b.bundle(tenant, version).await)
    }

    /// Every deployed version, of any tenant: what a replica loads.
    pub async fn versions(&self) -> Result<Vec<String>> {
        each!(self, b => b.versions().await)
    }

    /// Points a tenant's alias at `version` and records the move, in one transaction: two
    /// moves at once are both recorded, in the order they took effect. Returns the version
    /// it pointed at before.
    /// `evaluation` is the evaluation a gated move was let through on.
    pub async fn move_alias(
        &self,
        tenant: &str,
        alias: &str,
        target: &AliasTarget,
        evaluation: Option<&str>,
    ) -> Result<Option<String>> {
        each!(self, b => b.move_alias(tenant, alias, target, evaluation).await)
    }

    /// Where a tenant's alias points.
    pub async fn alias(&self, tenant: &str, alias: &str) -> Result<Option<AliasTarget>> {
        each!(self, b => b.alias(tenant, alias).await)
    }

    /// A tenant's aliases, by name.
    pub async fn aliases(&self, tenant: &str) -> Result<Vec<AliasRow>> {
        each!(self, b => b.aliases(tenant).await)
    }

    /// Every move of a tenant's alias, oldest first.
    pub async fn alias_history(&self, tenant: &str, alias: &str) -> Result<Vec<MoveRow>> {
        each!(self, b => b.alias_history(tenant, alias).await)
    }

    /// Admits one of a tenant's calls under `quota` calls per minute, counted over every
    /// replica: `None` when admitted, else the milliseconds until a place frees up.
    pub async fn admit(&self, tenant: &str, quota: u32) -> Result<Option<u64>> {
        each!(self, b => b.admit(tenant, quota).await)
    }

    /// The latest finished evaluation of `candidate` against `baseline` (a version) with at
    /// most `max_changed` changed and `max_failing` newly failing runs, if there is one;
    /// else the latest of any outcome, for the refusal to show.
    pub async fn gate(
        &self,
        tenant: &str,
        candidate: &str,
        baseline: &str,
        max_changed: u64,
        max_failing: u64,
    ) -> Result<Gate> {
        each!(self, b => b.gate(tenant, candidate, baseline, max_changed, max_failing).await)
    }

    /// Records a new evaluation, `running`.
    pub async fn start_evaluation(&self, e: &NewEvaluation<'_>) -> Result<()> {
        each!(self, b => b.start_evaluation(e).await)
    }

    /// Stores runs' classes and report entries (JSON) and counts them in their evaluation's
    /// progress, in one transaction; false, storing nothing, once the evaluation is no longer
    /// running.
    pub async fn evaluation_entries(&self, evaluation: &str, entries: &[Entry]) -> Result<bool> {
        each!(self, b => b.evaluation_entries(evaluation, entries).await)
    }

    /// Ends a running evaluation: `done`, or `failed` with `error`.
    pub async fn finish_evaluation(&self, id: &str, error: Option<&str>) -> Result<()> {
        each!(self, b => b.finish_evaluation(id, error).await)
    }

    /// Marks failed ([`EVALUATION_STOPPED`]) the evaluations `replica` left running when it
    /// stopped, and says how many there were.
    pub async fn fail_evaluations(&self, replica: &str) -> Result<usize> {
        each!(self, b => b.fail_evaluations(replica).await)
    }

    /// The run of a tenant's that returned for this `Idempotency-Key`, if one did.
    pub async fn returned_run(&self, tenant: &str, key: &str) -> Result<Option<RunRow>> {
        each!(self, b => b.returned_run(tenant, key).await)
    }

    /// Writes an accepted call's row, before anything runs.
    pub async fn start_run(&self, run: &NewRun<'_>) -> Result<()> {
        each!(self, b => b.start_run(run).await)
    }

    /// Completes a run's row, with its trace, in one transaction.
    pub async fn finish_run(&self, id: &str, f: &Finished<'_>) -> Result<Completed> {
        each!(self, b => b.finish_run(id, f).await)
    }

    /// Marks one unfinished run interrupted (answered 503), saying why.
    pub async fn interrupt(&self, id: &str, error: &str) -> Result<()> {
        each!(self, b => b.interrupt(id, error).await)
    }

    /// A page of a tenant's runs, newest first.
    pub async fn runs(&self, tenant: &str, f: &RunFilter) -> Result<Vec<RunRow>> {
        each!(self, b => b.runs(tenant, f).await)
    }

    /// One of a tenant's runs.
    pub async fn run(&self, tenant: &str, id: &str) -> Result<Option<RunRow>> {
        each!(self, b => b.run(tenant, id).await)
    }

    /// One of a tenant's runs' trace file, unless it was pruned.
    pub async fn trace(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>> {
        each!(self, b => b.trace(tenant, id).await)
    }

    /// Bytes a tenant keeps: its bundles' files and its traces not yet pruned.
    pub async fn usage(&self, tenant: &str) -> Result<Usage> {
        each!(self, b => b.usage(tenant).await)
    }

    /// A tenant's `limit` oldest traces (by when their calls finished), with their sizes:
    /// of those finished more than `age` ago when it is given, else of all.
    pub async fn traces(
        &self,
        tenant: &str,
        age: Option<Duration>,
        limit: u32,
    ) -> Result<Vec<(String, u64)>> {
        each!(self, b => b.traces(tenant, age, limit).await)
    }

    /// Removes a run's trace and marks its row pruned, in one transaction; the row stays.
    /// A trace already pruned (by another call making room at the same time) is left be.
    pub async fn prune(&self, id: &str) -> Result<()> {
        each!(self, b => b.prune(id).await)
    }

    // The UI's reads of evaluations.

    /// A tenant's evaluations, newest first.
    pub async fn evaluations(&self, tenant: &str) -> Result<Vec<EvaluationRow>> {
        each!(self, b => b.evaluations(tenant).await)
    }

    /// One of a tenant's evaluations.
    pub async fn evaluation(&self, tenant: &str, id: &str) -> Result<Option<EvaluationRow>> {
        each!(self, b => b.evaluation(tenant, id).await)
    }

    /// An evaluation's classed runs, in run order (oldest first). Not by tenant: ask
    /// [`Store::evaluation`] first, which is.
    pub async fn evaluation_runs(&self, id: &str) -> Result<Vec<EvaluationRunRow>> {
        each!(self, b => b.evaluation_runs(id).await)
    }
}

// The UI's reads of evaluations: the rows they return.

/// An `evaluations` row (see the schema above).
#[derive(Debug, Serialize)]
pub struct EvaluationRow {
    pub id: String,
    pub candidate: String,
    pub against: String,
    pub baseline: Option<String>,
    pub function: Option<String>,
    /// What was asked (`last`, `since`, `runs`), as stored; `null` if the stored text is not
    /// JSON.
    pub selection: serde_json::Value,
    pub tolerance: Option<f64>,
    pub status: String,
    pub total: i64,
    pub done: i64,
    pub same: i64,
    pub changed: i64,
    pub newly_failing: i64,
    pub fixed: i64,
    pub not_replayable: i64,
    pub error: Option<String>,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub replica: Option<String>,
}

const EVALUATION_ROW_COLUMNS: &str = "id, candidate, against, baseline, function, selection,
    tolerance, status, total, done, same, changed, newly_failing, fixed, not_replayable, error,
    created_at, finished_at, replica";

/// An `evaluation_runs` row.
#[derive(Debug, Serialize)]
pub struct EvaluationRunRow {
    pub run: String,
    pub class: String,
    /// The run's report entry; `null` if the stored text is not JSON.
    pub detail: serde_json::Value,
}

/// Whether an error came from the store's database (as opposed to the request or a bug):
/// the server answers 503 for these and keeps running.
pub fn is_store_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<rusqlite::Error>()
            || c.is::<tokio_postgres::Error>()
            || c.is::<deadpool_postgres::PoolError>()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_bad_ones_say_what_is_accepted() {
        assert_eq!(Location::parse("sqlite").unwrap(), Location::Sqlite);
        assert_eq!(
            Location::parse("postgres://u@h:5432/db").unwrap(),
            Location::Postgres("postgres://u@h:5432/db".into())
        );
        let e = Location::parse("mysql://u:secret@h/db").unwrap_err();
        assert!(format!("{e:#}").contains("use `sqlite` or a `postgres://` URL"));
        assert!(!format!("{e:#}").contains("secret"), "{e:#}");
        let e = Location::parse("postgres://u@h:notaport/db").unwrap_err();
        assert!(format!("{e:#}").contains("not a PostgreSQL URL"), "{e:#}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn the_dialects_differ_only_in_types() {
        for m in MIGRATIONS {
            for d in [Dialect::Sqlite, Dialect::Postgres] {
                assert!(!d.sql(m).contains('{'), "a placeholder is left in {m}");
            }
        }
    }
}
