//! `/healthz`, `/readyz` and `/metrics`: for load balancers and Prometheus, without a token.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::App;
use super::error::ApiError;

/// Alive: the process answers.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready for calls: the runtime is compiled, the store answers, and no shutdown began.
pub async fn readyz(State(app): State<Arc<App>>) -> Result<&'static str, ApiError> {
    app.accepting()?;
    app.runner()?;
    app.store.ping().await?;
    Ok("ready\n")
}

/// Prometheus text format: `host_calls_total{tenant,function,outcome}`,
/// `host_call_seconds{tenant,function}` (a histogram of whole requests), `host_calls_running`,
/// `host_calls_queued`, `host_limit_hits_total{tenant,limit}`, `host_store_errors_total`.
pub async fn metrics(State(app): State<Arc<App>>) -> (StatusCode, String) {
    (StatusCode::OK, app.metrics.render())
}
