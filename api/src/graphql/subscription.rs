use std::sync::Arc;

use async_graphql::{Context, Subscription};
use futures_util::Stream;

use super::types::{ObjectEvent, Revision};
use super::{ContextExt, SocketAuth};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::store::{self, Watch};

pub struct Subscription;

/// Changes as they are committed. Needs an access token in the
/// `connection_init` payload.
#[Subscription]
impl Subscription {
    /// Changes to your tenant's keys: PUT (created or replaced, with the
    /// value), DELETE, and EXPIRE (when the sweeper removes an expired
    /// value), each with its `revision`. Give `key` for one key or `prefix`
    /// for the keys starting with it; neither for every key. Changes made on
    /// any node arrive, in revision order.
    ///
    /// Without `afterRevision` the stream starts with the next change. With
    /// it, it first delivers every retained change after that revision, then
    /// live changes, with no gap and no duplicate: to resume after a
    /// disconnect, pass the `revision` of the last event you processed (or
    /// of a value you read). `COMPACTED` (with `extensions.oldestRevision`)
    /// when the log no longer holds every change after that revision:
    /// re-read the data and subscribe after the revision it carries.
    ///
    /// A subscriber that falls behind catches up from the change log; only
    /// if the log is compacted past it does the stream end, with
    /// `EVENTS_LOST`. The stream also ends when the access token expires.
    /// Each subscription is one of your change feeds: past the most one user
    /// may hold open on a node (256 by default), `RATE_LIMITED`.
    async fn object_events(
        &self,
        ctx: &Context<'_>,
        key: Option<String>,
        prefix: Option<String>,
        after_revision: Option<Revision>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<ObjectEvent>>> {
        let principal: Arc<Principal> = ctx.principal()?.clone();
        let watch = Watch::parse(key, prefix)?;
        let after = after_revision
            .map(|r| store::Revision::parse("afterRevision", r.0))
            .transpose()?;
        let store = ctx.state().store().clone();
        let recheck = ctx
            .data_opt::<SocketAuth>()
            .map(|SocketAuth(token)| (ctx.state().auth().clone(), token.clone()));
        let feed = store
            .feed(&principal, watch, after)
            .await?
            .for_caller(&principal, recheck);
        Ok(futures_util::stream::unfold(feed, move |mut feed| {
            let store = store.clone();
            async move {
                let event = match feed.next().await? {
                    Ok(change) => Ok(ObjectEvent::from_change(change, store.clock().now_ms())),
                    // Compacted past a subscriber that had fallen behind.
                    Err(ApiError::Compacted { oldest_revision }) => {
                        Err(ApiError::EventsLost { oldest_revision })
                    }
                    Err(e) => Err(e),
                };
                Some((event.map_err(async_graphql::Error::from), feed))
            }
        }))
    }
}
