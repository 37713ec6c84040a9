//! `/v1/evaluations`: a deployed candidate version run on the tenant's logged calls of an
//! alias or a version, in the background, each run classed as `host evaluate` classes it
//! (`same`, `changed`, `newly_failing`, `fixed`, `not_replayable`).
//!
//! `POST` resolves what the candidate is evaluated against (an alias's current version, or a
//! version), selects the runs at once (so the answer says how many), records the evaluation
//! `running` and answers 202. The runs are then replayed on the worker pool, one background
//! job per run ([`super::workers`]): calls go first, so a call waits at most one replay for a
//! worker, never a whole evaluation, while evaluations use every worker calls leave idle and
//! share their tenant's `concurrency` with its calls. (One job per evaluation replaying on
//! its own threads would either hold a worker for minutes or run past the pool's count of
//! what runs.) Each job stores its run's entry and the evaluation's progress in one
//! transaction; the job that stores the last one marks the evaluation `done`. An evaluation
//! its replica's stop cut short is marked `failed` at the stop, or at the replica's next start.
//!
//! A move of an alias gated on an evaluation (`require_evaluation`, see [`super::aliases`])
//! looks for a `done` one of the new version against the version the alias points at.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{Caller, TenantState};
use super::detached::finish_even_if_dropped;
use super::error::ApiError;
use super::runner::{Tolerance, is_class};
use super::store::{Entry, EvaluationRow, NewEvaluation, RunFilter, RunRow};
use super::{App, body};
use crate::bundle::rfc3339_ms;
use crate::policy::period_back;

/// The most runs one evaluation classes.
const MAX_RUNS: usize = 10_000;
/// The runs an evaluation takes when the request names none: the newest 100.
const DEFAULT_LAST: usize = 100;

const SHAPE: &str = "{\"candidate\": VERSION, \"against\": ALIAS_OR_VERSION, \"function\": NAME, \
     \"last\": N | \"since\": \"24h\" | \"runs\": [RUN_ID, ...], \"tolerance\": REL} (function, \
     last, since, runs and tolerance optional)";

/// `POST /v1/evaluations`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRequest {
    /// The version to evaluate.
    candidate: String,
    /// An alias (its current version is the baseline) or a version.
    against: String,
    /// Only runs of this function [default: every function of the candidate].
    function: Option<String>,
    last: Option<usize>,
    since: Option<String>,
    runs: Option<Vec<String>>,
    /// Floats whose relative difference is at most this are the same [default: 0, exact].
    tolerance: Option<f64>,
}

/// Which runs, as asked.
enum Selection {
    /// The newest N.
    Last(usize),
    /// Those received since this time (RFC 3339), at most [`MAX_RUNS`].
    Since(String),
    /// These.
    Runs(Vec<String>),
}

impl Selection {
    fn of(request: &NewRequest) -> Result<(Selection, Value), ApiError> {
        let (last, since, runs) = (request.last, &request.since, &request.runs);
        let asked = [last.is_some(), since.is_some(), runs.is_some()];
        if asked.iter().filter(|&&a| a).count() > 1 {
            return Err(ApiError::bad_input(
                "give at most one of last, since and runs",
            ));
        }
        let too_many = |n: usize, key: &str| {
            ApiError::bad_input(format!(
                "{key}: {n} runs is more than an evaluation takes ({MAX_RUNS})"
            ))
        };
        if let Some(period) = since {
            let from = period_back(period).map_err(|_| {
                ApiError::bad_input(format!(
                    "since: `{period}` is not a period back from now (24h, 7d, 30m)"
                ))
            })?;
            let from = rfc3339_ms(from);
            let selection = json!({"since": period, "from": from});
            return Ok((Selection::Since(from), selection));
        }
        if let Some(ids) = runs {
            if ids.is_empty() {
                return Err(ApiError::bad_input("runs: name at least one run"));
            }
            if ids.len() > MAX_RUNS {
                return Err(too_many(ids.len(), "runs"));
            }
            return Ok((Selection::Runs(ids.clone()), json!({"runs": ids})));
        }
        let last = last.unwrap_or(DEFAULT_LAST);
        if last == 0 {
            return Err(ApiError::bad_input("last: must be at least 1"));
        }
        if last > MAX_RUNS {
            return Err(too_many(last, "last"));
        }
        Ok((Selection::Last(last), json!({"last": last})))
    }
}

/// A run the evaluation classes.
struct Selected {
    id: String,
    function: String,
    /// Whether its trace is in the store (read when its turn comes), or why not.
    trace: Result<(), String>,
}

impl Selected {
    fn of(row: &RunRow) -> Selected {
        let trace = if row.trace_pruned {
            Err("its trace was pruned (retention or storage quota)".to_owned())
        } else if row.trace_sha256.is_none() {
            Err(format!(
                "it has no trace: it ended before its function ran ({})",
                row.outcome.as_deref().unwrap_or("still running")
            ))
        } else {
            Ok(())
        };
        Selected {
            id: row.id.clone(),
            function: row.function.clone(),
            trace,
        }
    }
}

/// What the candidate is evaluated against.
struct Against<'a> {
    /// The alias asked for, when one was.
    alias: Option<&'a str>,
    /// The version whose runs are replayed.
    baseline: String,
    /// The functions whose runs count.
    functions: Vec<String>,
}

impl Against<'_> {
    /// Whether a run is one of the baseline's calls: answered by the baseline version, through
    /// the alias when one was asked, and not a shadow's repeat of a call (nor, for an alias,
    /// a canary's call, which another version answered).
    fn has(&self, row: &RunRow) -> bool {
        let side = row.side.as_deref();
        row.bundle_version.as_deref() == Some(self.baseline.as_str())
            && self.functions.contains(&row.function)
            && side != Some("shadow")
            && match self.alias {
                Some(alias) => row.alias.as_deref() == Some(alias) && side != Some("canary"),
                None => true,
            }
    }

    /// What `against` names, for messages: `prod (version V)` or `version V`.
    fn describe(&self) -> String {
        match self.alias {
            Some(alias) => format!("`{alias}` (version {})", self.baseline),
            None => format!("version {}", self.baseline),
        }
    }
}

/// `POST /v1/evaluations`: 202 with the evaluation's summary (`status: running`) and its
/// `Location`; 400 for a malformed body, 404 for a candidate, alias, version, function or
/// run the tenant does not have, or when there is no run to evaluate on.
pub async fn create(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    request: Body,
) -> Result<Response, ApiError> {
    app.accepting()?;
    app.runner()?;
    let bytes = body::read(request, tenant.config.max_body, app.body_timeout).await?;
    let request: NewRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_input(format!("the body must be {SHAPE}: {e}")))?;
    let tolerance = Tolerance::new(request.tolerance.unwrap_or(0.0))?;
    let (selection, asked) = Selection::of(&request)?;
    let candidate = app
        .store
        .bundle(tenant.name(), &request.candidate)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no bundle `{}` to evaluate: deploy it first",
                request.candidate
            ))
        })?;
    let functions = match &request.function {
        Some(f) if !candidate.functions.contains(f) => {
            return Err(ApiError::not_found(format!(
                "bundle {} of {} offers {}, not `{f}`",
                candidate.version,
                candidate.notebook,
                candidate.functions.join(", ")
            )));
        }
        Some(f) => vec![f.clone()],
        None => candidate.functions.clone(),
    };
    let against = match app.store.alias(tenant.name(), &request.against).await? {
        Some(target) => Against {
            alias: Some(&request.against),
            baseline: target.version,
            functions,
        },
        None if app
            .store
            .bundle(tenant.name(), &request.against)
            .await?
            .is_some() =>
        {
            Against {
                alias: None,
                baseline: request.against.clone(),
                functions,
            }
        }
        None => {
            return Err(ApiError::not_found(format!(
                "no alias or version `{}` to evaluate against",
                request.against
            )));
        }
    };
    let runs = select(&app, &tenant, &against, &selection).await?;
    if runs.is_empty() {
        return Err(ApiError::not_found(format!(
            "no run of {}{} with a trace to evaluate on",
            against.describe(),
            match &request.function {
                Some(f) => format!(" calling `{f}`"),
                None => format!(" calling {}", against.functions.join(", ")),
            }
        )));
    }
    app.fetch(&candidate.version).await?;
    let id = uuid::Uuid::now_v7().to_string();
    // As a call's (see `calls`): from its row's first write on, an evaluation starts even if
    // this handler is dropped (a client that hangs up while the row is written), never left
    // `running` with no run queued.
    let started = finish_even_if_dropped({
        let against_asked = request.against.clone();
        let function = request.function.clone();
        let selection = asked.to_string();
        let baseline = against.baseline.clone();
        let evaluation = Arc::new(Evaluation {
            app: app.clone(),
            tenant: tenant.clone(),
            id: id.clone(),
            candidate: candidate.version.clone(),
            tolerance,
            left: AtomicUsize::new(runs.len()),
            classed: AtomicUsize::new(0),
            pending: Mutex::new(Vec::new()),
            runs,
            stopped: AtomicBool::new(false),
        });
        async move {
            let (app, tenant) = (&evaluation.app, &evaluation.tenant);
            app.store
                .start_evaluation(&NewEvaluation {
                    id: &evaluation.id,
                    tenant: tenant.name(),
                    candidate: &evaluation.candidate,
                    against: &against_asked,
                    baseline: &baseline,
                    function: function.as_deref(),
                    selection: &selection,
                    tolerance: evaluation.tolerance.relative(),
                    total: evaluation.runs.len() as u64,
                    replica: &app.replica,
                })
                .await?;
            // Read before its runs are queued: the answer shows it as it starts.
            let state = find(app, tenant.name(), &evaluation.id).await;
            for index in 0..evaluation.runs.len() {
                let evaluation = evaluation.clone();
                app.pool
                    .background(tenant.index, move || evaluation.step(index));
            }
            state
        }
    });
    let state = started.await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/evaluations/{id}"))],
        Json(state),
    )
        .into_response())
}

/// The runs `selection` names among the baseline's, newest first: those that finished with
/// a trace (or whose trace was pruned, classed `not_replayable`); named runs as they are.
async fn select(
    app: &App,
    tenant: &TenantState,
    against: &Against<'_>,
    selection: &Selection,
) -> Result<Vec<Selected>, ApiError> {
    let (since, last) = match selection {
        Selection::Runs(ids) => {
            let mut runs = Vec::with_capacity(ids.len());
            for id in ids {
                let row = app
                    .store
                    .run(tenant.name(), id)
                    .await?
                    .ok_or_else(|| ApiError::not_found(format!("runs: no run `{id}`")))?;
                if !against.has(&row) {
                    return Err(ApiError::bad_input(format!(
                        "runs: run {id} ({} of version {}{}) is not a call of {}{}",
                        row.function,
                        row.bundle_version.as_deref().unwrap_or("(none)"),
                        row.side
                            .as_deref()
                            .map(|s| format!(", {s} side"))
                            .unwrap_or_default(),
                        against.describe(),
                        match against.functions.as_slice() {
                            [f] => format!(" calling `{f}`"),
                            _ => String::new(),
                        }
                    )));
                }
                runs.push(Selected::of(&row));
            }
            return Ok(runs);
        }
        Selection::Last(n) => (None, *n),
        Selection::Since(from) => (Some(from.clone()), MAX_RUNS),
    };
    let mut filter = RunFilter {
        alias: against.alias.map(str::to_owned),
        version: Some(against.baseline.clone()),
        function: match against.functions.as_slice() {
            [f] => Some(f.clone()),
            _ => None,
        },
        since,
        limit: Some(1000),
        ..RunFilter::default()
    };
    let mut runs = Vec::new();
    loop {
        let page = app.store.runs(tenant.name(), &filter).await?;
        let full = page.len() == filter.limit() as usize;
        for row in &page {
            let replayable = row.trace_sha256.is_some() || row.trace_pruned;
            if replayable && against.has(row) && runs.len() < last {
                runs.push(Selected::of(row));
            }
        }
        match page.last() {
            Some(row) if full && runs.len() < last => filter.after = Some(row.id.clone()),
            _ => return Ok(runs),
        }
    }
}

/// Entries stored in one transaction: progress still moves several times a second, and
/// the store's writes are not one per run.
const BATCH: usize = 16;

/// A running evaluation, shared by its jobs.
struct Evaluation {
    app: Arc<App>,
    tenant: Arc<TenantState>,
    id: String,
    candidate: String,
    tolerance: Tolerance,
    runs: Vec<Selected>,
    /// Runs not yet stored: the job that stores the last one ends the evaluation.
    left: AtomicUsize,
    /// Runs classed so far, stored or not; the job that classes the last stores what is
    /// pending.
    classed: AtomicUsize,
    /// Entries classed and not yet stored: stored [`BATCH`] at a time, one transaction each,
    /// not one per run.
    pending: Mutex<Vec<Entry>>,
    /// Set once it failed or the server began to stop: the jobs left do nothing.
    stopped: AtomicBool,
}

impl Evaluation {
    /// The job of run `index`, on a worker: replay it, store its entry, and end the
    /// evaluation after the last.
    fn step(&self, index: usize) {
        if self.stopped.load(Ordering::Relaxed) {
            return;
        }
        if self.app.draining.load(Ordering::Relaxed) {
            // The stop marks the evaluation failed (or the next start does, after a crash).
            self.stopped.store(true, Ordering::Relaxed);
            return;
        }
        let run = &self.runs[index];
        let classed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.classify(run)))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a bug in host: run {} panicked", run.id)));
        let entry = match classed {
            Ok(entry) => entry,
            Err(e) => return self.end(Some(&format!("run {}: {e:#}", run.id))),
        };
        let last = self.classed.fetch_add(1, Ordering::AcqRel) + 1 == self.runs.len();
        let batch = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.push(entry);
            if last || pending.len() >= BATCH {
                std::mem::take(&mut *pending)
            } else {
                return;
            }
        };
        let app = &self.app;
        match app.block_on(app.store.evaluation_entries(&self.id, &batch)) {
            Ok(true) if self.left.fetch_sub(batch.len(), Ordering::AcqRel) == batch.len() => {
                self.end(None)
            }
            Ok(true) => {}
            // Marked failed meanwhile: by a stop, or by another run's failure.
            Ok(false) => self.stopped.store(true, Ordering::Relaxed),
            Err(e) => self.end(Some(&format!("storing its entries: {e:#}"))),
        }
    }

    /// Replays one run on the candidate: its entry, to store.
    fn classify(&self, run: &Selected) -> anyhow::Result<Entry> {
        let app = &self.app;
        let runner = app
            .runner
            .get()
            .context("the runtime is not compiled yet")?;
        let candidate = app.ready(&self.candidate)?;
        let bytes = match &run.trace {
            Ok(()) => app.block_on(app.store.trace(self.tenant.name(), &run.id))?,
            Err(_) => None,
        };
        let trace = match (&run.trace, &bytes) {
            (Err(why), _) => Err(why.clone()),
            (Ok(()), Some(bytes)) => Ok(bytes.as_slice()),
            (Ok(()), None) => Err("its trace was pruned (retention or storage quota) before \
                                   the evaluation reached it"
                .to_owned()),
        };
        let evaluated =
            runner.evaluate(&candidate, &run.id, &run.function, trace, self.tolerance)?;
        Ok(Entry {
            run: run.id.clone(),
            class: evaluated.class,
            detail: evaluated.entry.to_string(),
        })
    }

    /// Marks the evaluation `done`, or `failed` with `error` (once: later jobs do nothing).
    fn end(&self, error: Option<&str>) {
        if self.stopped.swap(true, Ordering::AcqRel) && error.is_some() {
            return;
        }
        if let Some(error) = error {
            eprintln!("host: evaluation {} failed: {error}", self.id);
        }
        let app = &self.app;
        if let Err(e) = app.block_on(app.store.finish_evaluation(&self.id, error)) {
            // Left `running`: the replica's next start marks it failed.
            eprintln!("host: evaluation {}: the run store failed: {e:#}", self.id);
        }
    }
}

/// `GET /v1/evaluations`: the tenant's evaluations, newest first, as their summaries (no
/// runs).
pub async fn list(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"evaluations": app.store.evaluations(tenant.name()).await?}),
    ))
}

/// `GET /v1/evaluations/ID`'s query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowQuery {
    /// Only the runs of this class.
    class: Option<String>,
    /// `false`: the summary alone, for polling.
    runs: Option<bool>,
}

/// `GET /v1/evaluations/ID?class=&runs=`: the summary, the candidate's notebook, and `runs`,
/// each run's report entry (as `host evaluate --json` writes them), newest run first.
pub async fn show(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
    query: Result<Query<ShowQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_input(e.body_text()))?;
    if let Some(class) = query.class.as_deref().filter(|c| !is_class(c)) {
        return Err(ApiError::bad_input(format!(
            "class: `{class}` is not one of same, changed, newly_failing, fixed, not_replayable"
        )));
    }
    let state = find(&app, tenant.name(), &id).await?;
    let notebook = app
        .store
        .bundle(tenant.name(), &state.candidate)
        .await?
        .map(|b| b.notebook);
    let mut answer = json!(state);
    answer["notebook"] = json!(notebook);
    if query.runs != Some(false) {
        let runs: Vec<Value> = app
            .store
            .evaluation_runs(&state.id)
            .await?
            .into_iter()
            .rev()
            .filter(|r| query.class.as_ref().is_none_or(|c| *c == r.class))
            .map(|r| r.detail)
            .collect();
        answer["runs"] = json!(runs);
    }
    Ok(Json(answer))
}

/// One of the tenant's evaluations, or 404 (another tenant's too).
async fn find(app: &App, tenant: &str, id: &str) -> Result<EvaluationRow, ApiError> {
    app.store
        .evaluation(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no evaluation `{id}`")))
}
