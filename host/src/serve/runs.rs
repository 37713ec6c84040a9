//! `/v1/runs`: the tenant's logged calls, and their traces.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::App;
use super::auth::Caller;
use super::error::ApiError;
use super::store::{RunFilter, RunRow};

/// `GET /v1/runs?function=&alias=&version=&outcome=&since=&limit=&after=`: newest first;
/// `next` is the `after` of the next page (absent on the last).
pub async fn list(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    filter: Result<Query<RunFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(filter) = filter.map_err(|e| ApiError::bad_input(e.body_text()))?;
    let limit = filter.limit() as usize;
    let runs = app.store.runs(tenant.name(), &filter).await?;
    let next = (runs.len() == limit)
        .then(|| runs.last().map(|r| r.id.clone()))
        .flatten();
    Ok(Json(json!({"runs": runs, "next": next})))
}

/// `GET /v1/runs/ID`.
pub async fn show(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Json<RunRow>, ApiError> {
    Ok(Json(find(&app, tenant.name(), &id).await?))
}

/// `GET /v1/runs/ID/trace`: the trace file, as `host replay` reads it.
pub async fn trace(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = trace_file(&app, tenant.name(), &id).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// A tenant's run's trace file, or a 404 saying why there is none (also the UI's download).
pub async fn trace_file(app: &App, tenant: &str, id: &str) -> Result<Vec<u8>, ApiError> {
    let run = find(app, tenant, id).await?;
    if run.trace_pruned {
        return Err(ApiError::not_found(format!(
            "run {id}'s trace was pruned (retention or storage quota)"
        )));
    }
    if run.trace_sha256.is_none() {
        return Err(ApiError::not_found(format!(
            "run {id} has no trace: it ended before its function ran ({})",
            run.outcome.as_deref().unwrap_or("still running")
        )));
    }
    // Pruned between the two reads: the row says so now.
    app.store
        .trace(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("run {id}'s trace was just pruned")))
}

async fn find(app: &App, tenant: &str, id: &str) -> Result<RunRow, ApiError> {
    app.store
        .run(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no run `{id}`")))
}
