//! Each tenant's storage quota and trace retention.
//!
//! Traces are pruned oldest first: those older than `retention` (checked as each call
//! starts and ends and at each deploy, up to [`PRUNED_AT_ONCE`] at a time, and at every
//! replica's heartbeat for every tenant, so a tenant that stops calling still has its
//! traces pruned on time: see [`App::apply_retention`]), and then, when the tenant's bundles
//! and traces are still over `storage`, as many more as it takes. Their rows stay, marked
//! `trace_pruned`. When even that is not enough (the bundles alone fill the quota), deploys
//! and calls are refused with 507: a call is never run without being recorded. A deploy or
//! call that would not fit with every trace pruned is refused first, its traces kept: they
//! are the tenant's record of production, not to be lost for nothing.
//!
//! Every check reads counters and an index the store keeps for it (`trace_bytes`,
//! `runs_live_traces`), never the tenant's whole history, so a call costs the same with ten
//! runs logged or ten million.
//!
//! Over several replicas the quota is as exact as the store's sums at the moment of each
//! check: two replicas may both admit a call that together goes over by one trace, which the
//! next check prunes.

use anyhow::Result;
use axum::http::StatusCode;

use super::App;
use super::auth::TenantState;
use super::error::ApiError;

/// How many traces one look-up finds to prune. Retention prunes at most this many per check,
/// so a tenant far past it (a retention just configured on a long history) is brought back
/// over its next calls, none of which waits for all of it; the quota prunes in steps of this
/// many until the tenant is under it.
const PRUNED_AT_ONCE: u32 = 100;

/// How many look-ups of [`PRUNED_AT_ONCE`] a heartbeat's sweep makes per tenant at most: a
/// tenant far past its retention and no longer calling catches up at this pace (15,000
/// traces a minute at a beat every two seconds) without one sweep holding the store for
/// minutes.
const SWEPT_AT_ONCE: u32 = 5;

impl App {
    /// Prunes the traces past retention of every tenant that has one, whether it calls or
    /// not: the checks around calls and deploys only see tenants that keep calling, and a
    /// retention is a promise about how long production inputs are kept. Run at each
    /// heartbeat (see `App::follow`).
    pub(super) async fn apply_retention(&self) -> Result<()> {
        for tenant in &self.tenants {
            for _ in 0..SWEPT_AT_ONCE {
                if self.prune_expired(tenant).await? < PRUNED_AT_ONCE as usize {
                    break;
                }
                // A long catch-up leaves the runtime to the requests between look-ups.
                tokio::task::yield_now().await;
            }
        }
        Ok(())
    }

    /// Prunes up to [`PRUNED_AT_ONCE`] of the tenant's traces past its retention, oldest
    /// first; how many.
    async fn prune_expired(&self, tenant: &TenantState) -> Result<usize> {
        let Some(retention) = tenant.config.retention else {
            return Ok(0);
        };
        let expired = self
            .store
            .traces(tenant.name(), Some(retention), PRUNED_AT_ONCE)
            .await?;
        for (id, _) in &expired {
            self.store.prune(id).await?;
        }
        Ok(expired.len())
    }

    /// Makes room for `incoming` more bytes of the tenant's, or refuses with 507.
    pub(super) async fn check_storage(
        &self,
        tenant: &TenantState,
        incoming: u64,
    ) -> Result<(), ApiError> {
        let name = tenant.name();
        self.prune_expired(tenant).await?;
        let Some(quota) = tenant.config.storage else {
            return Ok(());
        };
        let usage = self.store.usage(name).await?;
        if usage.bundles + incoming > quota {
            // Pruning every trace would not make room: refused with the traces kept.
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "storage",
                format!(
                    "tenant `{name}` keeps {} bytes of bundles, and {incoming} more do not fit \
                     its {quota}-byte storage even with every trace pruned: raise `storage` or \
                     remove bundles",
                    usage.bundles
                ),
            ));
        }
        let mut kept = usage.bundles + usage.traces;
        'making_room: while kept + incoming > quota {
            let oldest = self.store.traces(name, None, PRUNED_AT_ONCE).await?;
            for (id, size) in &oldest {
                self.store.prune(id).await?;
                kept = kept.saturating_sub(*size);
                if kept + incoming <= quota {
                    break 'making_room;
                }
            }
            if oldest.len() < PRUNED_AT_ONCE as usize {
                break;
            }
        }
        if kept + incoming > quota {
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "storage",
                format!(
                    "tenant `{name}` keeps {kept} bytes of its {quota}-byte storage in bundles \
                     and traces it cannot prune: raise `storage` or remove bundles"
                ),
            ));
        }
        Ok(())
    }
}
