//! `GET /api/usage`: what the caller's tenant stores, against its quota.

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};

use super::{BearerAuth, Tag};
use crate::app::AppState;
use crate::error::{ErrorStatuses, Errors};

/// What a tenant stores in live values.
#[derive(Object)]
struct UsageView {
    /// Keys holding a live value.
    keys: i64,
    /// Their bytes: each key's UTF-8 bytes plus its value's compact JSON.
    bytes: i64,
}

/// A tenant's limits in force (its own, or the servers' defaults).
#[derive(Object)]
struct QuotaView {
    /// Most keys it may keep; `null`: no limit.
    #[oai(nullable)]
    max_keys: Option<u64>,
    /// Most bytes they may hold; `null`: no limit.
    #[oai(nullable)]
    max_bytes: Option<u64>,
}

#[derive(Object)]
struct UsageResponse {
    usage: UsageView,
    quota: QuotaView,
}

super::error_statuses! {
    UsageErrors = [401, 429, 500, 503];
}

pub struct UsageApi;

#[OpenApi]
impl UsageApi {
    /// Your tenant's usage and quota
    ///
    /// Any caller of the tenant, readers and API keys included (a key
    /// restricted to a prefix sees the whole tenant's figures). A write that
    /// would take `usage` past `quota` answers 403 `QUOTA_EXCEEDED` and
    /// writes nothing. Values that have expired are not counted here; a
    /// write near the quota removes up to 1,000 of them first, and the
    /// sweeper the rest.
    #[oai(path = "/api/usage", method = "get", tag = "Tag::Usage")]
    async fn usage(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
    ) -> Result<Json<UsageResponse>, Errors<UsageErrors>> {
        let usage = state.store().usage(&auth.0).await?;
        let quota = state.store().quota(&auth.0);
        Ok(Json(UsageResponse {
            usage: UsageView {
                keys: usage.keys,
                bytes: usage.bytes,
            },
            quota: QuotaView {
                max_keys: quota.max_keys,
                max_bytes: quota.max_bytes,
            },
        }))
    }
}
