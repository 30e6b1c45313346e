use std::sync::Arc;

use async_graphql::{Context, Subscription};
use futures_util::Stream;
use tokio::sync::broadcast::{self, error::RecvError};

use super::types::{KvObject, ObjectEvent, Version};
use super::{ContextExt, SocketAuth};
use crate::auth::Auth;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::store::events::{Event, EventKind};
use crate::store::{Key, Prefix, Store};

pub struct Subscription;

enum Filter {
    Key(String),
    Prefix(String),
}

impl Filter {
    fn matches(&self, key: &str) -> bool {
        match self {
            Filter::Key(k) => k == key,
            Filter::Prefix(p) => key.starts_with(p.as_str()),
        }
    }
}

struct Watch {
    rx: broadcast::Receiver<Arc<Event>>,
    store: Store,
    principal: Arc<Principal>,
    filter: Filter,
    deadline: tokio::time::Instant,
    /// Over a WebSocket: the token, verified again (cached) before each
    /// event, so that a revoked user receives nothing more.
    recheck: Option<(Auth, String)>,
    done: bool,
}

impl Watch {
    async fn next(&mut self) -> Option<Result<ObjectEvent, ApiError>> {
        if self.done {
            return None;
        }
        loop {
            let received = tokio::select! {
                _ = tokio::time::sleep_until(self.deadline) => {
                    self.done = true;
                    return Some(Err(ApiError::Unauthenticated(
                        "the access token expired; subscribe again with a new token".into(),
                    )));
                }
                r = self.rx.recv() => r,
            };
            match received {
                Ok(event) => {
                    if event.tenant != self.principal.tenant().get()
                        || !self.filter.matches(&event.key)
                    {
                        continue;
                    }
                    // Only a refused token ends the stream; a failed check
                    // (the database away for a moment) delivers as before.
                    if let Some((auth, token)) = &self.recheck
                        && let Err(e @ ApiError::Unauthenticated(_)) =
                            auth.authenticate(token).await
                    {
                        self.done = true;
                        return Some(Err(e));
                    }
                    return Some(self.deliver(&event).await);
                }
                Err(RecvError::Lagged(missed)) => {
                    self.done = true;
                    return Some(Err(ApiError::EventsLost(missed)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }

    async fn deliver(&self, event: &Event) -> Result<ObjectEvent, ApiError> {
        let object = match (&event.object, event.kind) {
            (Some(o), _) => Some(o.clone()),
            // A large value written on another node: read it, if still at that version.
            (None, EventKind::Put) => {
                let key = Key::parse(event.key.clone())?;
                self.store
                    .get(self.principal.tenant(), &key)
                    .await?
                    .filter(|o| o.version == event.version)
            }
            (None, _) => None,
        };
        Ok(ObjectEvent {
            kind: event.kind.into(),
            key: event.key.clone(),
            version: Version(event.version),
            object: object.map(KvObject),
        })
    }
}

/// Live changes. Needs an access token in the `connection_init` payload.
#[Subscription]
impl Subscription {
    /// Changes to your tenant's keys as they happen: PUT (created or
    /// replaced, with the value), DELETE, and EXPIRE (when the sweeper removes
    /// an expired value). Give `key` for one key or `prefix` for the keys
    /// starting with it; neither for every key. Changes made on any node
    /// arrive. A subscriber that falls more than the server's buffer behind
    /// gets an `EVENTS_LOST` error and the stream ends: re-read and
    /// subscribe again. The stream also ends when the access token expires.
    async fn object_events(
        &self,
        ctx: &Context<'_>,
        key: Option<String>,
        prefix: Option<String>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<ObjectEvent>>> {
        let principal = ctx.principal()?.clone();
        let filter = match (key, prefix) {
            (Some(_), Some(_)) => {
                return Err(
                    ApiError::invalid("prefix", "give either key or prefix, not both").into(),
                );
            }
            (Some(k), None) => Filter::Key(Key::parse(k)?.into_string()),
            (None, p) => Filter::Prefix(Prefix::parse(p)?.as_str().to_owned()),
        };
        let store = ctx.state().store().clone();
        let recheck = ctx
            .data_opt::<SocketAuth>()
            .map(|SocketAuth(token)| (ctx.state().auth().clone(), token.clone()));
        let left_ms = (principal.expires_at - store.clock().now_ms()).max(0) as u64;
        let watch = Watch {
            rx: store.events().subscribe(),
            deadline: tokio::time::Instant::now() + std::time::Duration::from_millis(left_ms),
            store,
            principal,
            filter,
            recheck,
            done: false,
        };
        Ok(futures_util::stream::unfold(watch, |mut w| async move {
            let item = w.next().await?;
            Some((item.map_err(async_graphql::Error::from), w))
        }))
    }
}
