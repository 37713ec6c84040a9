//! `POST /v1/call/ALIAS_OR_VERSION/FUNCTION`: one call, logged before it is answered.
//!
//! A call is accepted once its token, quota, body and queue place are good: refusals before
//! that (401, 413, 429, 503) leave no row. From acceptance on, exactly one `runs` row records
//! it: written first (so a crash leaves it to be marked `interrupted`), completed after the
//! trace is stored (in the same transaction) and before the response is sent.
//!
//! A client's `Idempotency-Key` makes retries safe, on this replica or another: a key whose
//! earlier call (same tenant, same body) returned gets that run's result back, and runs
//! nothing; a key whose earlier call failed or was cut short runs again. Two calls with one
//! key running at once both run, and the one that finishes second is recorded `duplicate`
//! and answers the first one's result: a key never has two `returned` rows.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::auth::{Caller, TenantState, admit};
use super::bundles::busy;
use super::detached::finish_even_if_dropped;
use super::error::ApiError;
use super::runner::recorded_result;
use super::store::{Completed, Finished, NewRun, RESULT_CAP, RunRow, Sticky};
use super::workers::Ticket;
use super::{App, body};
use crate::door::Arguments;

/// What a call left to record.
#[derive(Default)]
struct Record {
    duration_ms: Option<f64>,
    /// When a worker took the call up, if one did.
    started: Option<Instant>,
    result: Option<Value>,
    /// The trace file and its sha256.
    trace: Option<(Vec<u8>, String)>,
    error: Option<ApiError>,
    /// The run whose result answers the call, when not this call's own: the first of two
    /// calls with one `Idempotency-Key`.
    run: Option<String>,
}

impl Record {
    fn failed(error: ApiError) -> Record {
        Record {
            error: Some(error),
            ..Record::default()
        }
    }
}

pub async fn call(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Path((target, function)): Path<(String, String)>,
    headers: HeaderMap,
    request: Body,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    app.accepting()?;
    let runtime_sha256 = app.runner()?.runtime_sha256().to_owned();
    admit(&app, &tenant).await?;
    let bytes = body::read(request, tenant.config.max_body, app.body_timeout).await?;
    let input_sha256 = hex::encode(Sha256::digest(&bytes));
    let key = idempotency_key(&headers)?;
    if let Some(key) = &key
        && let Some(earlier) = app.store.returned_run(tenant.name(), key).await?
    {
        return answer_again(&app, &tenant, earlier, &input_sha256).await;
    }
    app.check_storage(&tenant, 0).await?;
    let ticket = app
        .pool
        .reserve(tenant.index)
        .ok_or_else(|| busy(tenant.name()))?;
    let resolved = resolve(
        &app,
        &tenant,
        &target,
        &function,
        key.as_deref(),
        &input_sha256,
    )
    .await;
    if let Ok(r) = &resolved {
        app.fetch(&r.version).await?;
    }
    let (alias, version, side) = match &resolved {
        Ok(r) => (r.alias.clone(), Some(r.version.clone()), r.side),
        Err(_) => (None, None, None),
    };
    let id = uuid::Uuid::now_v7().to_string();
    // From the row's first write on, the call finishes even if this handler is dropped (a
    // client that hangs up): a row is never left written but not completed (with PostgreSQL
    // the insert itself is an await).
    let logged = finish_even_if_dropped({
        let (app, tenant, id) = (app.clone(), tenant.clone(), id.clone());
        let (function, key) = (function.clone(), key.clone());
        let (input_sha256, runtime_sha256) = (input_sha256.clone(), runtime_sha256.clone());
        let version = version.clone();
        async move {
            app.store
                .start_run(&NewRun {
                    id: &id,
                    tenant: tenant.name(),
                    alias: alias.as_deref(),
                    bundle_version: version.as_deref(),
                    function: &function,
                    idempotency_key: key.as_deref(),
                    input_sha256: &input_sha256,
                    runtime_sha256: &runtime_sha256,
                    replica: &app.replica,
                    side,
                    shadow_of: None,
                })
                .await?;
            let accepted = Accepted {
                app,
                tenant,
                id,
                function,
                key,
                received,
            };
            Ok::<_, ApiError>(match (resolved, arguments(&bytes)) {
                (Err(e), _) | (_, Err(e)) => (accepted.finish(Record::failed(e)).await, None),
                (Ok(resolved), Ok(arguments)) => {
                    let arguments = Arc::new(arguments);
                    let shadow = resolved.shadow.clone().map(|v| (v, arguments.clone()));
                    let record = accepted
                        .run_and_finish(ticket, resolved.version, arguments)
                        .await;
                    (record, shadow)
                }
            })
        }
    });
    let (record, shadow) = logged.await?;
    // The shadow runs after the answer is on its way, never delays or changes it.
    if let (Some((shadow_version, arguments)), Ok(_)) = (shadow, &record) {
        let shadow = Shadow {
            app: app.clone(),
            tenant: tenant.clone(),
            alias: target.clone(),
            version: shadow_version,
            function,
            input_sha256,
            runtime_sha256,
            primary: id.clone(),
        };
        tokio::spawn(shadow.run(arguments));
    }
    let record = record.map_err(|mut e| {
        e.run = Some(id.clone());
        e
    })?;
    match record.error {
        None => Ok(returned(
            record.result,
            version.as_deref(),
            record.run.as_deref().unwrap_or(&id),
            record.duration_ms,
        )),
        Some(mut e) => {
            e.bundle = version;
            e.run = Some(id);
            Err(e)
        }
    }
}

/// A call to run again on its alias's shadow version: logged beside the primary's run, never
/// answered, and charged to the tenant like any call (its quota, its queue, its limits). When
/// the tenant has no room for it, it is skipped and counted in
/// `host_shadow_skipped_total`: a shadow never takes a place a real call needs.
struct Shadow {
    app: Arc<App>,
    tenant: Arc<TenantState>,
    alias: String,
    version: String,
    function: String,
    input_sha256: String,
    runtime_sha256: String,
    primary: String,
}

impl Shadow {
    async fn run(self, arguments: Arc<Arguments>) {
        let skipped = |why: &str| {
            metrics::counter!(
                "host_shadow_skipped_total",
                "tenant" => self.tenant.name().to_owned(),
                "why" => why.to_owned()
            )
            .increment(1);
        };
        if admit(&self.app, &self.tenant).await.is_err() {
            return skipped("quota");
        }
        let Some(ticket) = self.app.pool.reserve(self.tenant.index) else {
            return skipped("busy");
        };
        if self.app.fetch(&self.version).await.is_err() {
            return skipped("store");
        }
        let id = uuid::Uuid::now_v7().to_string();
        let started = self
            .app
            .store
            .start_run(&NewRun {
                id: &id,
                tenant: self.tenant.name(),
                alias: Some(&self.alias),
                bundle_version: Some(&self.version),
                function: &self.function,
                // Not the primary's key: a shadow's result must never answer a retry.
                idempotency_key: None,
                input_sha256: &self.input_sha256,
                runtime_sha256: &self.runtime_sha256,
                replica: &self.app.replica,
                side: Some("shadow"),
                shadow_of: Some(&self.primary),
            })
            .await;
        if started.is_err() {
            return skipped("store");
        }
        let accepted = Accepted {
            app: self.app.clone(),
            tenant: self.tenant.clone(),
            id,
            function: self.function.clone(),
            key: None,
            received: Instant::now(),
        };
        let _ = accepted
            .run_and_finish(ticket, self.version.clone(), arguments)
            .await;
    }
}

/// The 200 answer of a call that returned: its run id is also the `Host-Run` header.
fn returned(result: Option<Value>, bundle: Option<&str>, run: &str, ms: Option<f64>) -> Response {
    let mut response = Json(json!({
        "result": result,
        "bundle": bundle,
        "run": run,
        "duration_ms": ms,
    }))
    .into_response();
    if let Ok(value) = run.parse() {
        response.headers_mut().insert("host-run", value);
    }
    response
}

/// A retried call whose key already returned: the stored answer, if the body is the same.
async fn answer_again(
    app: &App,
    tenant: &TenantState,
    earlier: RunRow,
    input_sha256: &str,
) -> Result<Response, ApiError> {
    if earlier.input_sha256 != input_sha256 {
        let mut e = ApiError::new(
            StatusCode::CONFLICT,
            "idempotency",
            format!(
                "this Idempotency-Key was used by run {} with another body: use a new key \
                 for a new call",
                earlier.id
            ),
        );
        e.run = Some(earlier.id);
        return Err(e);
    }
    let result = stored_result(app, &earlier).await?;
    metrics::counter!(
        "host_calls_answered_again_total",
        "tenant" => tenant.name().to_owned()
    )
    .increment(1);
    let mut response = returned(
        Some(result),
        earlier.bundle_version.as_deref(),
        &earlier.id,
        earlier.duration_ms,
    );
    response.headers_mut().insert(
        "idempotent-replayed",
        axum::http::HeaderValue::from_static("true"),
    );
    Ok(response)
}

/// A returned run's result: from its row, or (over [`RESULT_CAP`]) from its trace.
async fn stored_result(app: &App, run: &RunRow) -> Result<Value, ApiError> {
    if let Some(result) = &run.result {
        return Ok(result.clone());
    }
    let trace = app
        .store
        .trace(&run.tenant, &run.id)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::GONE,
                "pruned",
                format!(
                    "run {} returned a result too large to keep in its row, and its trace \
                     was pruned: call again with a new Idempotency-Key",
                    run.id
                ),
            )
        })?;
    Ok(recorded_result(&trace)?)
}

/// What a call resolved to.
struct Resolved {
    /// The alias called, when the target was one.
    alias: Option<String>,
    /// The version that runs the call.
    version: String,
    /// `primary` or `canary`, when the alias splits or shadows its calls.
    side: Option<&'static str>,
    /// The version to run the call again on, unanswered.
    shadow: Option<String>,
}

/// The version to call (the alias's, or its canary's for this call's share), and the
/// shadow to run it again on; 404 when the target is neither an alias nor a version of this
/// tenant, or the version does not offer the function. A canary splits on the call's
/// `Idempotency-Key` (or, without one, and for `sticky: input`, on its input's sha256).
async fn resolve(
    app: &App,
    tenant: &TenantState,
    target: &str,
    function: &str,
    key: Option<&str>,
    input_sha256: &str,
) -> Result<Resolved, ApiError> {
    let sticky = |s: Sticky| match (s, key) {
        (Sticky::Key, Some(key)) => key,
        _ => input_sha256,
    };
    let resolved = match app.store.alias(tenant.name(), target).await? {
        Some(alias) => {
            let (version, side) = match &alias.canary {
                Some(c) if in_canary(target, sticky(c.sticky), c.percent) => {
                    (c.version.clone(), Some("canary"))
                }
                Some(_) => (alias.version.clone(), Some("primary")),
                None if alias.shadow.is_some() => (alias.version.clone(), Some("primary")),
                None => (alias.version.clone(), None),
            };
            Resolved {
                alias: Some(target.to_owned()),
                version,
                side,
                shadow: alias.shadow,
            }
        }
        None => Resolved {
            alias: None,
            version: target.to_owned(),
            side: None,
            shadow: None,
        },
    };
    let version = &resolved.version;
    let bundle = app
        .store
        .bundle(tenant.name(), version)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no alias or version `{target}`")))?;
    if !bundle.functions.iter().any(|f| f == function) {
        let mut e = ApiError::not_found(format!(
            "bundle {version} of {} offers {}, not `{function}`",
            bundle.notebook,
            bundle.functions.join(", ")
        ));
        e.bundle = Some(version.clone());
        return Err(e);
    }
    Ok(resolved)
}

/// Whether a call falls in a canary's `percent`: by a hash of the alias and the sticky
/// value, so the same key (or input) lands on the same side every time, and the shares
/// come out near the percentage over many calls.
fn in_canary(alias: &str, sticky: &str, percent: f64) -> bool {
    let digest = Sha256::digest(format!("{alias}\n{sticky}").as_bytes());
    let bucket = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) % 10_000;
    (bucket as f64) < percent * 100.0
}

/// The body: `{"args": [...], "kwargs": {...}}`, both optional; an empty body is no arguments.
fn arguments(bytes: &Bytes) -> Result<Arguments, ApiError> {
    if bytes.is_empty() {
        return Ok(Arguments::default());
    }
    let shape = "the body must be {\"args\": [...], \"kwargs\": {...}}";
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_input(format!("the body is not valid JSON: {e}")))?;
    if let Value::Object(o) = &value
        && let Some(k) = o.keys().find(|k| *k != "args" && *k != "kwargs")
    {
        return Err(ApiError::bad_input(format!("unknown key `{k}`: {shape}")));
    }
    serde_json::from_value(value).map_err(|e| ApiError::bad_input(format!("{shape}: {e}")))
}

/// An accepted call: its row is written, and [`Accepted::finish`] completes it.
struct Accepted {
    app: Arc<App>,
    tenant: Arc<TenantState>,
    id: String,
    function: String,
    /// The call's `Idempotency-Key`, if it has one.
    key: Option<String>,
    received: Instant,
}

impl Accepted {
    /// Runs the call in the ticket's place on a worker, then completes its row here. The
    /// worker only computes: with PostgreSQL, completing a row is a few round trips to the
    /// database, during which a worker that waited for them would leave its core idle (a
    /// fifth of the machine under a steady load of pandas calls). The call counts as in
    /// flight until its row is complete, so a stop waits for it.
    async fn run_and_finish(
        self,
        ticket: Ticket,
        version: String,
        arguments: Arc<Arguments>,
    ) -> Result<Record, ApiError> {
        let app = self.app.clone();
        let _in_flight = app.in_flight();
        let ran = ticket
            .run(move || {
                let record = execute(&self, &version, &arguments);
                (self, record)
            })
            .await;
        match ran {
            Ok((call, record)) => call.finish(record).await,
            Err(_) => Err(ApiError::internal(&anyhow::anyhow!(
                "the call's worker panicked"
            ))),
        }
    }

    /// Completes the call's row, makes room in the tenant's storage for what it added, and
    /// counts it in the metrics.
    async fn finish(&self, mut record: Record) -> Result<Record, ApiError> {
        let (app, tenant) = (&self.app, &self.tenant);
        let (status, outcome) = match &record.error {
            None => (StatusCode::OK, "returned"),
            Some(e) => (e.status, e.outcome()),
        };
        let result_text = record.result.as_ref().map(Value::to_string);
        let result_sha256 = result_text
            .as_ref()
            .map(|t| hex::encode(Sha256::digest(t.as_bytes())));
        let message = record.error.as_ref().map(ApiError::message);
        let completed = match app
            .store
            .finish_run(
                &self.id,
                &Finished {
                    tenant: tenant.name(),
                    idempotency_key: self.key.as_deref(),
                    running_ms: record.started.map(|t| t.elapsed().as_secs_f64() * 1000.0),
                    duration_ms: record.duration_ms,
                    outcome,
                    http_status: status.as_u16(),
                    result: result_text.as_deref().filter(|t| t.len() <= RESULT_CAP),
                    result_sha256: result_sha256.as_deref(),
                    error: message.as_deref(),
                    trace: record
                        .trace
                        .as_ref()
                        .map(|(data, sha)| (data.as_slice(), sha.as_str())),
                },
            )
            .await
        {
            Ok(completed) => completed,
            Err(e) => {
                // The store failed as the call ended: the client gets a 503, and the row
                // says so once the store answers again.
                app.unfinished(&self.id);
                return Err(e.into());
            }
        };
        if let Completed::Duplicate(earlier) = completed {
            let row = app.store.run(tenant.name(), &earlier).await?;
            record.result = match row {
                Some(row) => Some(stored_result(app, &row).await?),
                None => None,
            };
            record.run = Some(earlier);
        }
        // The call's trace may have taken the tenant over its storage: older traces make
        // room now, so the quota holds between calls (the next call is refused if they
        // cannot).
        if let Err(e) = app.check_storage(tenant, 0).await {
            eprintln!("host: tenant `{}`: {}", tenant.name(), e.message());
        }
        let labels = [
            ("tenant", tenant.name().to_owned()),
            ("function", self.function.clone()),
            ("outcome", outcome.to_owned()),
        ];
        metrics::counter!("host_calls_total", &labels[..]).increment(1);
        metrics::histogram!("host_call_seconds", &labels[..2])
            .record(self.received.elapsed().as_secs_f64());
        if let Some(limit) = record
            .error
            .as_ref()
            .and_then(|e| e.error["limit"].as_str())
        {
            metrics::counter!(
                "host_limit_hits_total",
                "tenant" => tenant.name().to_owned(),
                "limit" => limit.to_owned()
            )
            .increment(1);
        }
        Ok(record)
    }
}

/// The call itself, on a worker: run it, write its trace, say what to record.
fn execute(call: &Accepted, version: &str, arguments: &Arguments) -> Record {
    let Accepted {
        app,
        tenant,
        function,
        ..
    } = call;
    // When it was taken up is written with the row's end, not in a statement of its own.
    let taken = Instant::now();
    let run = || -> Result<Record, ApiError> {
        let ready = app.ready(version)?;
        let runner = app.runner()?;
        let started = Instant::now();
        let done = runner.call(
            &ready,
            &tenant.config.grants,
            tenant.config.limits,
            function,
            arguments,
        )?;
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(Record {
            duration_ms: Some(duration_ms),
            result: done.result,
            trace: Some((done.trace, done.trace_sha256)),
            error: done.error.map(ApiError::call_failed),
            ..Record::default()
        })
    };
    Record {
        started: Some(taken),
        ..run().unwrap_or_else(Record::failed)
    }
}

/// The longest `Idempotency-Key` kept with a run (Stripe's limit: a UUID or a hash fits).
const MAX_KEY: usize = 255;

/// The call's `Idempotency-Key`, if it has one. A key that cannot be kept as given (not
/// printable ASCII, or longer than [`MAX_KEY`]) is refused: ignoring it would run a retried
/// call twice, and keeping a megabyte of it in every row would fill the store.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key)
            if !key.is_empty()
                && key.len() <= MAX_KEY
                && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') =>
        {
            Ok(Some(key.to_owned()))
        }
        _ => Err(ApiError::bad_input(format!(
            "Idempotency-Key: use 1 to {MAX_KEY} printable ASCII characters (a UUID, say); \
             this one has {} bytes",
            value.len()
        ))),
    }
}
