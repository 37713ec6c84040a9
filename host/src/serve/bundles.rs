//! `/v1/bundles`: deploy a notebook or a bundle file, list and inspect what was deployed.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::auth::Caller;
use super::error::ApiError;
use super::runner::deploy_limit;
use super::store::NewBundle;
use super::{App, body};
use crate::engine::write_cache_file;

/// The name a notebook gets in tracebacks when the deploy does not give one (`?name=`).
const DEFAULT_NAME: &str = "notebook.ipynb";

/// `POST /v1/bundles?function=NAME&...&label=TEXT&name=FILE.ipynb`, the body a notebook or a
/// bundle file: makes the bundle as `host bundle` does, pre-initialises it, stores it.
/// 201 with `{"version", "functions", "notebook", "label"}`; 200 when the tenant already had
/// that version.
pub async fn deploy(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Query(query): Query<Vec<(String, String)>>,
    request: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    app.accepting()?;
    app.runner()?;
    let mut functions = Vec::new();
    let (mut label, mut name) = (None, DEFAULT_NAME.to_owned());
    for (key, value) in query {
        match key.as_str() {
            "function" => functions.push(value),
            "label" => label = Some(value),
            "name" => name = value,
            other => {
                return Err(ApiError::bad_input(format!(
                    "unknown query parameter `{other}`: expected function, label or name"
                )));
            }
        }
    }
    let bytes = body::read(request, tenant.config.max_body, app.body_timeout).await?;
    // A tenant already full gets its 507 before the build; what is charged is the bundle
    // file the server keeps (a notebook's outputs and exploration cells are not kept), known
    // only once the bundle is made.
    app.check_storage(&tenant, 0).await?;
    let ticket = app
        .pool
        .reserve(tenant.index)
        .ok_or_else(|| busy(tenant.name()))?;
    let worker = app.clone();
    let deployed = ticket
        .run(move || -> Result<(bool, Value), ApiError> {
            let runner = worker.runner()?;
            let (ready, file) = runner
                .deploy(
                    &name,
                    &bytes,
                    &functions,
                    label.as_deref(),
                    &tenant.config.limits,
                )
                .map_err(|e| match deploy_limit(&e) {
                    Some(error) => ApiError::call_failed(error),
                    None => e.into(),
                })?;
            // What the tenant keeps is the stored bundle file, not the body it sent.
            let had = worker
                .block_on(worker.store.bundle(tenant.name(), ready.version()))?
                .is_some();
            let incoming = if had { 0 } else { file.len() as u64 };
            worker.block_on(worker.check_storage(&tenant, incoming))?;
            let path = worker.bundle_path(ready.version());
            if !path.exists() {
                write_cache_file(&path, &file)?;
            }
            let created = worker.block_on(worker.store.insert_bundle(&NewBundle {
                tenant: tenant.name(),
                version: ready.version(),
                functions: ready.functions(),
                label: ready.label(),
                notebook: ready.notebook(),
                file: &file,
            }))?;
            let answer = json!({
                "version": ready.version(),
                "functions": ready.functions(),
                "notebook": ready.notebook(),
                "label": ready.label(),
            });
            worker.keep(Arc::new(ready));
            Ok((created, answer))
        })
        .await
        .map_err(|_| ApiError::internal(&anyhow::anyhow!("the deploy's worker panicked")))?;
    let (created, answer) = deployed?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(answer)))
}

/// `GET /v1/bundles`: the tenant's bundles, newest first.
pub async fn list(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"bundles": app.store.bundles(tenant.name()).await?}),
    ))
}

/// `GET /v1/bundles/VERSION`: the bundle's manifest and what the tenant's deploy recorded.
pub async fn show(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Path(version): Path<String>,
) -> Result<Json<Value>, ApiError> {
    app.runner()?;
    let row = app
        .store
        .bundle(tenant.name(), &version)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no bundle `{version}`")))?;
    app.fetch(&row.version).await?;
    let (worker, v) = (app.clone(), row.version.clone());
    let ready = tokio::task::spawn_blocking(move || worker.ready(&v))
        .await
        .map_err(|e| ApiError::internal(&e.into()))??;
    let mut inspect = ready.inspect();
    inspect["deployed"] = json!(row);
    Ok(Json(inspect))
}

/// The 429 for a tenant with `concurrency + queue` calls already running or waiting.
pub fn busy(tenant: &str) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "busy",
        format!("tenant `{tenant}` has as many calls running and queued as it may: retry later"),
    )
}
