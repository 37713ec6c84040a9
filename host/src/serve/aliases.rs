//! `/v1/aliases`: names that point at deployed versions, moved atomically, every move kept.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Caller;
use super::error::ApiError;
use super::{App, body};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveRequest {
    version: String,
}

/// `PUT /v1/aliases/NAME` with `{"version": V}`: points the alias at one of the tenant's
/// versions; answers `{"alias", "version", "previous"}`. Rollback is moving it back.
pub async fn move_alias(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Path(name): Path<String>,
    request: Body,
) -> Result<Json<Value>, ApiError> {
    check_name(&name)?;
    let bytes = body::read(request, tenant.config.max_body, app.body_timeout).await?;
    let request: MoveRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_input(format!("the body must be {{\"version\": VERSION}}: {e}"))
    })?;
    if app
        .store
        .bundle(tenant.name(), &request.version)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found(format!(
            "no bundle `{}`: deploy it first",
            request.version
        )));
    }
    let previous = app
        .store
        .move_alias(tenant.name(), &name, &request.version)
        .await?;
    Ok(Json(
        json!({"alias": name, "version": request.version, "previous": previous}),
    ))
}

/// `GET /v1/aliases`: the tenant's aliases and where they point.
pub async fn list(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"aliases": app.store.aliases(tenant.name()).await?}),
    ))
}

/// `GET /v1/aliases/NAME/history`: every move, oldest first.
pub async fn history(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let moves = app.store.alias_history(tenant.name(), &name).await?;
    if moves.is_empty() {
        return Err(ApiError::not_found(format!("no alias `{name}`")));
    }
    Ok(Json(json!({"alias": name, "moves": moves})))
}

/// Alias names are path segments and must never be taken for a version (64 hex digits).
fn check_name(name: &str) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !(name.len() == 64 && name.chars().all(|c| c.is_ascii_hexdigit()));
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_input(format!(
            "`{name}` cannot be an alias: use up to 64 letters, digits, `-`, `_` and `.`, not a version"
        )))
    }
}
