//! Every failure the API answers, mapped to a status and a JSON body in this one place.
//!
//! The body is `{"error": {"kind": ..., "message": ..., ...}, "bundle": ..., "run": ...}`;
//! `bundle` and `run` are there when the call got that far, and the run id is also the
//! `Host-Run` header. The statuses mirror `host run`'s exit codes:
//!
//! | status | kind | when |
//! | --- | --- | --- |
//! | 400 | `bad_input` | malformed JSON, wrong types, a notebook that cannot be bundled (exit 2) |
//! | 401 | `unauthorized` | no token, or one no tenant has |
//! | 404 | `not_found` | unknown alias, version, function or run (or another tenant's) |
//! | 408 | `body_timeout` | the request body did not arrive in time |
//! | 409 | `idempotency` | an `Idempotency-Key` already used with another body |
//! | 410 | `pruned` | a retried call's earlier result is gone with its pruned trace |
//! | 413 | `too_large` | the body is over the tenant's `max_body` |
//! | 422 | `raised`, `exited`, `limit` | the function raised (exit 1), or hit a limit (exit 3) |
//! | 429 | `quota`, `busy` | over `calls_per_minute` (with `Retry-After`), or over `concurrency + queue` |
//! | 503 | `unavailable` | draining, not ready yet, or the run store failing (the reason says which) |
//! | 507 | `storage` | the tenant's storage is full even after pruning old traces |
//! | 500 | `internal` | a bug in host or its runtime (exit 4) |

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::runner::is_user_error;
use super::store::is_store_error;

/// A failed request. Boxed: it travels in every handler's `Result`, mostly unused.
#[derive(Debug)]
pub struct ApiError(Box<Failure>);

/// What [`ApiError`] holds.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    /// `{"kind": ..., "message": ..., ...}`.
    pub error: Value,
    pub bundle: Option<String>,
    pub run: Option<String>,
    /// Seconds, for a 429 over quota.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> ApiError {
        ApiError::with(status, json!({"kind": kind, "message": message.into()}))
    }

    fn with(status: StatusCode, error: Value) -> ApiError {
        ApiError(Box::new(Failure {
            status,
            error,
            bundle: None,
            run: None,
            retry_after: None,
        }))
    }

    pub fn bad_input(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_input", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "give a tenant's token as `Authorization: Bearer TOKEN`",
        )
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn internal(e: &anyhow::Error) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error: {e:#}"),
        )
    }

    /// A function's failure, described by the runner (`raised`, `exited` or `limit`).
    pub fn call_failed(error: Value) -> ApiError {
        ApiError::with(StatusCode::UNPROCESSABLE_ENTITY, error)
    }

    /// The `runs.outcome` this failure stands for, when it ends an accepted call.
    pub fn outcome(&self) -> &'static str {
        match self.status {
            StatusCode::INTERNAL_SERVER_ERROR | StatusCode::SERVICE_UNAVAILABLE => "internal",
            StatusCode::UNPROCESSABLE_ENTITY if self.error["kind"] == "limit" => "limit",
            StatusCode::UNPROCESSABLE_ENTITY => "raised",
            _ => "bad_input",
        }
    }

    pub fn message(&self) -> String {
        self.error["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

impl std::ops::Deref for ApiError {
    type Target = Failure;

    fn deref(&self) -> &Failure {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut Failure {
        &mut self.0
    }
}

impl From<anyhow::Error> for ApiError {
    /// The user's errors are 400 with the message `host run` prints; a failing run store is
    /// 503 (the server keeps running, and answers again when the store does); anything else
    /// is a bug.
    fn from(e: anyhow::Error) -> ApiError {
        if is_user_error(&e) {
            ApiError::bad_input(format!("{e:#}"))
        } else if is_store_error(&e) {
            metrics::counter!("host_store_errors_total").increment(1);
            ApiError::unavailable(format!("the run store is unavailable: {e:#}"))
        } else {
            ApiError::internal(&e)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let Failure {
            status,
            error,
            bundle,
            run,
            retry_after,
        } = *self.0;
        let body = json!({"error": error, "bundle": bundle, "run": run});
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(run) = run.and_then(|r| HeaderValue::from_str(&r).ok()) {
            headers.insert("host-run", run);
        }
        if let Some(seconds) = retry_after {
            headers.insert("retry-after", HeaderValue::from(seconds));
        }
        response
    }
}
