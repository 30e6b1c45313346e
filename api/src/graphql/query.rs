use async_graphql::{Context, Object};

use super::ContextExt;
use super::fast::Prefetched;
use super::types::{
    ApiKey, DateTime, KvObject, KvObjectConnection, KvObjectEdge, Me, ObjectChangeConnection,
    ObjectChangeEdge, ObjectEvent, PageInfo, TenantUser,
};
use crate::error::ApiError;
use crate::store::{Cursor, Key, Limit, Prefix, Revision};

pub struct Query;

/// Reads. Every field needs an access token.
#[Object]
impl Query {
    /// The live value under `key`, or null if there is none (absent or expired).
    async fn object(
        &self,
        ctx: &Context<'_>,
        key: String,
    ) -> async_graphql::Result<Option<KvObject>> {
        let principal = ctx.principal()?;
        let key = Key::parse(key)?;
        if let Some(failed) = ctx.data_opt::<Prefetched>()
            && failed.key == key
        {
            return Err(failed.error.clone().into());
        }
        let found = ctx
            .state()
            .store()
            .get(principal.read_scope(), &key)
            .await?;
        Ok(found.map(KvObject))
    }

    /// The live values under `keys`, in the same order, null where there is
    /// none. At most the batch limit (1000 by default) keys.
    async fn objects(
        &self,
        ctx: &Context<'_>,
        keys: Vec<String>,
    ) -> async_graphql::Result<Vec<Option<KvObject>>> {
        let principal = ctx.principal()?;
        let store = ctx.state().store();
        store.check_batch_len(keys.len())?;
        let keys = keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| {
                Key::parse(k).map_err(|e| match e {
                    ApiError::InvalidInput { message, .. } => {
                        ApiError::invalid(format!("keys[{i}]"), message)
                    }
                    other => other,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let found = store.get_many(principal.read_scope(), &keys).await?;
        Ok(found.into_iter().map(|o| o.map(KvObject)).collect())
    }

    /// Live values whose keys start with `prefix`, in byte order of keys.
    /// `first` is the largest page (1 to 1000, default 100); a page also
    /// stops at about 4 MiB of keys and values (at least one object), so it
    /// may hold fewer with `pageInfo.hasNextPage` true. Pass
    /// `pageInfo.endCursor` as `after` for the next page.
    async fn list_objects(
        &self,
        ctx: &Context<'_>,
        prefix: Option<String>,
        first: Option<i64>,
        after: Option<String>,
    ) -> async_graphql::Result<KvObjectConnection> {
        let principal = ctx.principal()?;
        let prefix = Prefix::parse(prefix)?;
        let limit = Limit::parse("first", first)?;
        let after = after.as_deref().map(Cursor::parse).transpose()?;
        let page = ctx
            .state()
            .store()
            .list(principal.read_scope(), &prefix, limit, after.as_ref())
            .await?;
        let edges: Vec<KvObjectEdge> = page
            .objects
            .into_iter()
            .map(|o| KvObjectEdge {
                cursor: Cursor::after(&o.key).encode(),
                node: KvObject(o),
            })
            .collect();
        Ok(KvObjectConnection {
            page_info: PageInfo {
                has_next_page: page.next.is_some(),
                end_cursor: edges.last().map(|e| e.cursor.clone()),
                has_previous_page: false,
                start_cursor: edges.first().map(|e| e.cursor.clone()),
            },
            edges,
        })
    }

    /// The retained changes of `key`, newest first: every PUT (with the
    /// value), DELETE and EXPIRE the change log still holds (see the
    /// server's `KVQL_CHANGES_RETENTION`). `first` is the page size (1 to
    /// 1000, default 100); pass `pageInfo.endCursor` as `after` for older
    /// changes while `hasNextPage` is true. Each page looks through at most
    /// 10,000 revisions of your data, so a page of a rarely changed key may
    /// hold fewer changes, even none, and still have a next page. A key
    /// with no retained change has an empty history.
    async fn object_history(
        &self,
        ctx: &Context<'_>,
        key: String,
        first: Option<i64>,
        after: Option<String>,
    ) -> async_graphql::Result<ObjectChangeConnection> {
        let principal = ctx.principal()?;
        let key = Key::parse(key)?;
        let limit = Limit::parse("first", first)?;
        let before = after
            .as_deref()
            .map(|a| Revision::parse_text("after", a))
            .transpose()?;
        let store = ctx.state().store();
        let page = store
            .history(principal.read_scope(), &key, limit, before)
            .await?;
        let now = store.clock().now_ms();
        let edges: Vec<ObjectChangeEdge> = page
            .changes
            .into_iter()
            .map(|c| ObjectChangeEdge {
                cursor: c.revision.to_string(),
                node: ObjectEvent::from_change(c, now),
            })
            .collect();
        Ok(ObjectChangeConnection {
            page_info: PageInfo {
                has_next_page: page.next.is_some(),
                // Where the next page starts, which is past the last edge
                // when the page's walk ended first.
                end_cursor: page
                    .next
                    .map(|r| r.get().to_string())
                    .or_else(|| edges.last().map(|e| e.cursor.clone())),
                has_previous_page: false,
                start_cursor: edges.first().map(|e| e.cursor.clone()),
            },
            edges,
        })
    }

    /// The users of your tenant, by username. Owners only (`FORBIDDEN` for
    /// writers and readers).
    async fn users(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<TenantUser>> {
        let owner = ctx.principal()?.owner()?;
        let users = ctx.state().admin().list(owner).await?;
        Ok(users.into_iter().map(TenantUser::from).collect())
    }

    /// Your tenant's API keys, oldest first; never their tokens. Owners only.
    async fn api_keys(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<ApiKey>> {
        let owner = ctx.principal()?.owner()?;
        let keys = ctx.state().admin().api_keys(owner).await?;
        Ok(keys.into_iter().map(ApiKey::from).collect())
    }

    /// Who the access token belongs to.
    async fn me(&self, ctx: &Context<'_>) -> async_graphql::Result<Me> {
        let p = ctx.principal()?;
        Ok(Me {
            username: p.username.clone(),
            tenant: p.tenant_name.clone(),
            role: p.role.into(),
            token_expires_at: DateTime(p.expires_at),
        })
    }
}
