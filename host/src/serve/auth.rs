//! Who is calling: a bearer token, digested and compared in constant time with every
//! tenant's digests; and each tenant's calls-per-minute quota.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::App;
use super::config::Tenant;
use super::error::ApiError;
use crate::policy::Limits;

/// Limits wide enough for any tenant's calls: what a bundle reloaded without knowing its
/// callers is pre-initialised under.
pub fn widest_limits(tenants: &[Arc<TenantState>]) -> Limits {
    tenants
        .iter()
        .map(|t| t.config.limits)
        .reduce(Limits::widest)
        .unwrap_or_default()
}

/// A tenant as the server runs it.
pub struct TenantState {
    /// Its position in the config: the worker pool's queue index.
    pub index: usize,
    pub config: Tenant,
}

impl TenantState {
    pub fn new(index: usize, config: Tenant) -> TenantState {
        TenantState { index, config }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }
}

/// Counts one call against the tenant's `calls_per_minute`, over every replica (the store
/// keeps the window: a sliding minute, exact, since admissions of one tenant take turns);
/// over it, a 429 saying when to retry.
pub async fn admit(app: &App, tenant: &TenantState) -> Result<(), ApiError> {
    let Some(quota) = tenant.config.calls_per_minute else {
        return Ok(());
    };
    let Some(wait_ms) = app.store.admit(tenant.name(), quota).await? else {
        return Ok(());
    };
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "quota",
        format!(
            "tenant `{}` is over its quota of {quota} calls per minute",
            tenant.name()
        ),
    );
    e.retry_after = Some(wait_ms.div_ceil(1000).max(1));
    Err(e)
}

/// The tenant whose token the request carries.
pub struct Caller(pub Arc<TenantState>);

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Caller, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(ApiError::unauthorized)?;
        find(&app.tenants, token.trim())
            .map(Caller)
            .ok_or_else(ApiError::unauthorized)
    }
}

/// The tenant that has this token. Every digest of every tenant is compared, each in constant
/// time, so the answer's timing says nothing about which digest came close.
pub fn find(tenants: &[Arc<TenantState>], token: &str) -> Option<Arc<TenantState>> {
    let digest = Sha256::digest(token.as_bytes());
    let mut found = None;
    for tenant in tenants {
        for known in &tenant.config.tokens_sha256 {
            if bool::from(known.ct_eq(digest.as_slice())) {
                found = Some(tenant.clone());
            }
        }
    }
    found
}

/// A new random token: 256 bits from the operating system, as hex.
pub fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The hex SHA-256 digest of a token, as `tokens_sha256` lists it.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn getrandom(bytes: &mut [u8]) -> anyhow::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(bytes))
        .map_err(|e| anyhow::anyhow!("failed to read /dev/urandom: {e}"))
}
