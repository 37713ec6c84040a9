//! `/v1/aliases`: names that point at deployed versions, moved atomically, every move kept.
//!
//! An alias may also split its calls with a canary version (a percentage, sticky per
//! `Idempotency-Key` or per input) and run each call again on a shadow version after the
//! answer is sent; `GET /v1/aliases/NAME/compare` summarises those runs against the
//! primary's. A move may require a passing evaluation of the new version against the one the
//! alias points at now (`require_evaluation`): without one it is refused with 409.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use axum::http::StatusCode;

use super::auth::{Caller, TenantState};
use super::error::ApiError;
use super::runner::differences;
use super::store::{AliasTarget, Canary, Gate, RunFilter, RunRow};
use super::{App, body};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveRequest {
    version: String,
    canary: Option<Canary>,
    shadow: Option<Shadow>,
    require_evaluation: Option<Requirement>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Shadow {
    version: String,
}

/// What a gated move needs: an evaluation of the new version against the current one with
/// at most this many changed and newly failing runs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Requirement {
    #[serde(default)]
    max_changed: u64,
    #[serde(default)]
    max_failing: u64,
}

/// 404 unless `version` is one of the tenant's bundles.
async fn check_version(app: &App, tenant: &TenantState, version: &str) -> Result<(), ApiError> {
    if app.store.bundle(tenant.name(), version).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "no bundle `{version}`: deploy it first"
        )));
    }
    Ok(())
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
        ApiError::bad_input(format!(
            "the body must be {{\"version\": VERSION, \"canary\": {{\"version\": V, \"percent\": P, \
             \"sticky\": \"key\"|\"input\"}}, \"shadow\": {{\"version\": V}}, \
             \"require_evaluation\": {{\"max_changed\": N, \"max_failing\": N}}}} \
             (all but version optional): {e}"
        ))
    })?;
    check_version(&app, &tenant, &request.version).await?;
    if let Some(canary) = &request.canary {
        if !(0.0..=100.0).contains(&canary.percent) {
            return Err(ApiError::bad_input(format!(
                "canary.percent must be between 0 and 100, not {}",
                canary.percent
            )));
        }
        check_version(&app, &tenant, &canary.version).await?;
    }
    if let Some(shadow) = &request.shadow {
        check_version(&app, &tenant, &shadow.version).await?;
    }
    let current = app.store.alias(tenant.name(), &name).await?;
    let mut evaluation = None;
    if let (Some(need), Some(current)) = (&request.require_evaluation, &current)
        && current.version != request.version
    {
        match app
            .store
            .gate(
                tenant.name(),
                &request.version,
                &current.version,
                need.max_changed,
                need.max_failing,
            )
            .await?
        {
            Gate::Passed(e) => evaluation = Some(e.id),
            Gate::Refused(latest) => {
                let message = match &latest {
                    Some(e) => format!(
                        "the latest evaluation of {} against {} ({}, {}) has {} changed and {} \
                         newly failing runs, over the {} and {} allowed",
                        request.version,
                        current.version,
                        e.id,
                        e.status,
                        e.changed,
                        e.newly_failing,
                        need.max_changed,
                        need.max_failing
                    ),
                    None => format!(
                        "no evaluation of {} against {}, the version `{name}` points at: run \
                         `host evaluate` or POST /v1/evaluations first",
                        request.version, current.version
                    ),
                };
                let mut e = ApiError::new(StatusCode::CONFLICT, "evaluation_required", message);
                e.error["evaluation"] = json!(latest);
                return Err(e);
            }
        }
    }
    let target = AliasTarget {
        version: request.version,
        canary: request.canary,
        shadow: request.shadow.map(|s| s.version),
    };
    let previous = app
        .store
        .move_alias(tenant.name(), &name, &target, evaluation.as_deref())
        .await?;
    let mut answer = json!({"alias": name, "version": target.version, "previous": previous});
    if let Some(canary) = &target.canary {
        answer["canary"] = json!(canary);
    }
    if let Some(shadow) = &target.shadow {
        answer["shadow"] = json!(shadow);
    }
    if let Some(evaluation) = evaluation {
        answer["evaluation"] = json!(evaluation);
    }
    Ok(Json(answer))
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

/// `GET /v1/aliases/NAME/compare?limit=N`: the alias's shadow runs next to their primary
/// runs, classed as an evaluation classes them (`same`, `changed` with the differences,
/// `newly_failing`, `fixed`), and its canary's runs next to the primary's (outcomes and
/// median durations per side), over the last `limit` (100) runs of each.
pub async fn compare(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Path(name): Path<String>,
    Query(query): Query<CompareQuery>,
) -> Result<Json<Value>, ApiError> {
    let alias = app
        .store
        .alias(tenant.name(), &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no alias `{name}`")))?;
    let filter = |side: &str| RunFilter {
        alias: Some(name.clone()),
        side: Some(side.to_owned()),
        limit: query.limit,
        ..RunFilter::default()
    };
    let mut counts = std::collections::BTreeMap::from([
        ("same", 0),
        ("changed", 0),
        ("newly_failing", 0),
        ("fixed", 0),
    ]);
    let mut runs = Vec::new();
    for shadow in app.store.runs(tenant.name(), &filter("shadow")).await? {
        let Some(primary_id) = &shadow.shadow_of else {
            continue;
        };
        let Some(primary) = app.store.run(tenant.name(), primary_id).await? else {
            continue;
        };
        if shadow.outcome.is_none() || primary.outcome.is_none() {
            continue; // still running
        }
        let ok = |r: &RunRow| r.outcome.as_deref() == Some("returned");
        let (class, differences) = match (ok(&primary), ok(&shadow)) {
            (true, true) if primary.result_sha256 == shadow.result_sha256 => ("same", vec![]),
            (true, true) => match (&primary.result, &shadow.result) {
                (Some(a), Some(b)) => ("changed", differences(a, b)),
                _ => (
                    "changed",
                    vec!["the results differ (too large to keep in their rows)".to_owned()],
                ),
            },
            (true, false) => ("newly_failing", vec![]),
            (false, true) => ("fixed", vec![]),
            (false, false) => ("same", vec![]),
        };
        *counts.get_mut(class).expect("a known class") += 1;
        runs.push(json!({
            "class": class,
            "primary": {"run": primary.id, "version": primary.bundle_version,
                        "outcome": primary.outcome, "result": primary.result, "error": primary.error},
            "shadow": {"run": shadow.id, "version": shadow.bundle_version,
                       "outcome": shadow.outcome, "result": shadow.result, "error": shadow.error},
            "differences": differences,
        }));
    }
    let mut sides = serde_json::Map::new();
    for side in ["primary", "canary"] {
        let rows = app.store.runs(tenant.name(), &filter(side)).await?;
        let mut outcomes = std::collections::BTreeMap::<String, u64>::new();
        for r in &rows {
            *outcomes
                .entry(r.outcome.clone().unwrap_or_else(|| "running".into()))
                .or_default() += 1;
        }
        let mut durations: Vec<f64> = rows.iter().filter_map(|r| r.duration_ms).collect();
        durations.sort_by(f64::total_cmp);
        sides.insert(
            side.to_owned(),
            json!({
                "runs": rows.len(),
                "outcomes": outcomes,
                "median_ms": durations.get(durations.len() / 2),
            }),
        );
    }
    Ok(Json(json!({
        "alias": name,
        "version": alias.version,
        "shadow": {"version": alias.shadow, "summary": counts, "runs": runs},
        "canary": {"version": alias.canary.as_ref().map(|c| &c.version),
                   "percent": alias.canary.as_ref().map(|c| c.percent),
                   "sides": sides},
    })))
}

/// `compare`'s query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareQuery {
    limit: Option<u32>,
}
