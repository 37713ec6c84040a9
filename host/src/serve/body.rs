//! Reading a request body under the tenant's size cap and a time limit, before the request
//! takes a worker: a client that sends its body slowly holds a connection, never a worker.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::error::ApiError;

/// The whole body, or 413 over `max_body`, 408 when it does not arrive within `timeout`
/// (the config's `body_timeout`).
pub async fn read(body: Body, max_body: u64, timeout: Duration) -> Result<Bytes, ApiError> {
    let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await;
    match collected {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is over this tenant's max_body ({max_body} bytes)"),
        )),
        Ok(Err(e)) => Err(ApiError::bad_input(format!(
            "failed to read the request body: {e}"
        ))),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {:.1}s (body_timeout)",
                timeout.as_secs_f64()
            ),
        )),
    }
}
