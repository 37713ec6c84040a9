//! Who is calling: a bearer token, digested and compared in constant time with every
//! tenant's digests; and each tenant's calls-per-minute quota.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// A tenant as the server runs it: its settings and its quota's window.
pub struct TenantState {
    /// Its position in the config: the worker pool's queue index.
    pub index: usize,
    pub config: Tenant,
    /// When its calls of the last minute were accepted, oldest first.
    window: Mutex<VecDeque<Instant>>,
}

impl TenantState {
    pub fn new(index: usize, config: Tenant) -> TenantState {
        TenantState {
            index,
            config,
            window: Mutex::new(VecDeque::new()),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Counts one call against `calls_per_minute`; over it, a 429 saying when to retry.
    pub fn admit(&self) -> Result<(), ApiError> {
        let Some(quota) = self.config.calls_per_minute else {
            return Ok(());
        };
        const MINUTE: Duration = Duration::from_secs(60);
        let now = Instant::now();
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= MINUTE)
        {
            window.pop_front();
        }
        if window.len() >= quota as usize {
            let wait = MINUTE.saturating_sub(now.duration_since(window[0]));
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "quota",
                format!(
                    "tenant `{}` is over its quota of {quota} calls per minute",
                    self.name()
                ),
            );
            e.retry_after = Some(wait.as_secs().max(1));
            return Err(e);
        }
        window.push_back(now);
        Ok(())
    }
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
