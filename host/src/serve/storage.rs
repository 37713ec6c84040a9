//! Each tenant's storage quota and trace retention.
//!
//! Traces are pruned oldest first: those older than `retention`, and then, when the tenant's
//! bundles and traces are still over `storage`, as many more as it takes. Their rows stay,
//! marked `trace_pruned`. When even that is not enough (the bundles alone fill the quota),
//! deploys and calls are refused with 507: a call is never run without being recorded.
//!
//! Over several replicas the quota is as exact as the store's sums at the moment of each
//! check: two replicas may both admit a call that together goes over by one trace, which the
//! next check prunes.

use anyhow::Result;
use axum::http::StatusCode;

use super::App;
use super::auth::TenantState;
use super::error::ApiError;

impl App {
    /// Makes room for `incoming` more bytes of the tenant's, or refuses with 507.
    pub(super) async fn check_storage(
        &self,
        tenant: &TenantState,
        incoming: u64,
    ) -> Result<(), ApiError> {
        let name = tenant.name();
        if let Some(retention) = tenant.config.retention {
            for (id, _) in self.store.traces(name, Some(retention)).await? {
                self.store.prune(&id).await?;
            }
        }
        let Some(quota) = tenant.config.storage else {
            return Ok(());
        };
        let mut usage = self.store.usage(name).await?;
        if usage + incoming > quota {
            for (id, size) in self.store.traces(name, None).await? {
                self.store.prune(&id).await?;
                usage = usage.saturating_sub(size);
                if usage + incoming <= quota {
                    break;
                }
            }
        }
        if usage + incoming > quota {
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "storage",
                format!(
                    "tenant `{name}` keeps {usage} bytes of its {quota}-byte storage in bundles \
                     and traces it cannot prune: raise `storage` or remove bundles"
                ),
            ));
        }
        Ok(())
    }
}
