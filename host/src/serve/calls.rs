//! `POST /v1/call/ALIAS_OR_VERSION/FUNCTION`: one call, logged before it is answered.
//!
//! A call is accepted once its token, quota, body and queue place are good: refusals before
//! that (401, 413, 429, 503) leave no row. From acceptance on, exactly one `runs` row records
//! it: written first (so a crash leaves it to be marked `interrupted`), completed after the
//! trace is on disk and before the response is sent.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::auth::{Caller, TenantState};
use super::bundles::busy;
use super::error::ApiError;
use super::store::{Finished, NewRun, RESULT_CAP};
use super::{App, body};
use crate::door::Arguments;
use crate::files::{create_private_dir, write_private};

/// What a call left to record.
#[derive(Default)]
struct Record {
    duration_ms: Option<f64>,
    result: Option<Value>,
    /// sha256 and size of the trace file, once it is written.
    trace: Option<(String, u64)>,
    error: Option<ApiError>,
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
    tenant.admit()?;
    let bytes = body::read(request, tenant.config.max_body, app.body_timeout).await?;
    app.check_storage(&tenant, 0)?;
    let ticket = app
        .pool
        .reserve(tenant.index)
        .ok_or_else(|| busy(tenant.name()))?;
    let target = resolve(&app, &tenant, &target, &function);
    let (alias, version) = match &target {
        Ok((alias, version)) => (alias.as_deref(), Some(version.as_str())),
        Err(_) => (None, None),
    };
    let id = uuid::Uuid::now_v7().to_string();
    app.store.start_run(&NewRun {
        id: &id,
        tenant: tenant.name(),
        alias,
        bundle_version: version,
        function: &function,
        idempotency_key: headers.get("idempotency-key").and_then(|v| v.to_str().ok()),
        input_sha256: &hex::encode(Sha256::digest(&bytes)),
        runtime_sha256: &runtime_sha256,
    })?;
    let version = version.map(str::to_owned);
    let accepted = Accepted {
        app: app.clone(),
        tenant: tenant.clone(),
        id: id.clone(),
        function,
        received,
    };
    let record = match (target, arguments(&bytes)) {
        (Err(e), _) | (_, Err(e)) => accepted.finish(Record::failed(e)),
        // The worker completes the row itself: a client that hangs up mid-call drops this
        // handler, never the call's record.
        (Ok((_, version)), Ok(arguments)) => ticket
            .run(move || {
                let record = execute(&accepted, &version, &arguments);
                accepted.finish(record)
            })
            .await
            .unwrap_or_else(|_| {
                Err(ApiError::internal(&anyhow::anyhow!(
                    "the call's worker panicked"
                )))
            }),
    };
    let record = record.map_err(|mut e| {
        e.run = Some(id.clone());
        e
    })?;
    match record.error {
        None => {
            let mut response = Json(json!({
                "result": record.result,
                "bundle": version,
                "run": id,
                "duration_ms": record.duration_ms,
            }))
            .into_response();
            response
                .headers_mut()
                .insert("host-run", id.parse().expect("a uuid is a header value"));
            Ok(response)
        }
        Some(mut e) => {
            e.bundle = version;
            e.run = Some(id);
            Err(e)
        }
    }
}

/// The alias (when the target is one of the tenant's aliases) and the version to call; 404
/// when the target is neither an alias nor a version of this tenant, or the version does
/// not offer the function.
fn resolve(
    app: &App,
    tenant: &TenantState,
    target: &str,
    function: &str,
) -> Result<(Option<String>, String), ApiError> {
    let (alias, version) = match app.store.alias(tenant.name(), target)? {
        Some(version) => (Some(target.to_owned()), version),
        None => (None, target.to_owned()),
    };
    let bundle = app
        .store
        .bundle(tenant.name(), &version)?
        .ok_or_else(|| ApiError::not_found(format!("no alias or version `{target}`")))?;
    if !bundle.functions.iter().any(|f| f == function) {
        let mut e = ApiError::not_found(format!(
            "bundle {version} of {} offers {}, not `{function}`",
            bundle.notebook,
            bundle.functions.join(", ")
        ));
        e.bundle = Some(version);
        return Err(e);
    }
    Ok((alias, version))
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
    received: Instant,
}

impl Accepted {
    /// Completes the call's row, makes room in the tenant's storage for what it added, and
    /// counts it in the metrics.
    fn finish(&self, record: Record) -> Result<Record, ApiError> {
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
        app.store.finish_run(
            &self.id,
            &Finished {
                duration_ms: record.duration_ms,
                outcome,
                http_status: status.as_u16(),
                result: result_text.as_deref().filter(|t| t.len() <= RESULT_CAP),
                result_sha256: result_sha256.as_deref(),
                error: message.as_deref(),
                trace_sha256: record.trace.as_ref().map(|t| t.0.as_str()),
                trace_size: record.trace.as_ref().map(|t| t.1),
            },
        )?;
        // The call's trace may have taken the tenant over its storage: older traces make
        // room now, so the quota holds between calls (the next call is refused if they
        // cannot).
        if let Err(e) = app.check_storage(tenant, 0) {
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
        id,
        function,
        ..
    } = call;
    let run = || -> Result<Record, ApiError> {
        app.store.run_started(id)?;
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
        let path = app.trace_path(tenant.name(), id);
        let written = path
            .parent()
            .map_or(Ok(()), create_private_dir)
            .and_then(|()| write_private(&path, &done.trace));
        if let Err(e) = written {
            return Err(ApiError::unavailable(format!(
                "the call ran, but its trace could not be stored: {e:#}"
            )));
        }
        Ok(Record {
            duration_ms: Some(duration_ms),
            result: done.result,
            trace: Some((
                hex::encode(Sha256::digest(&done.trace)),
                done.trace.len() as u64,
            )),
            error: done.error.map(ApiError::call_failed),
        })
    };
    run().unwrap_or_else(Record::failed)
}
