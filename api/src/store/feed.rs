//! Change feeds: the changes of one tenant's keys in revision order, read
//! from the change log. A feed never depends on an event arriving: events
//! (this node's, and other nodes' through `LISTEN` on PostgreSQL) only wake
//! it early, and it looks at the log every [`RECHECK`] whatever arrives. So
//! a feed resumed after revision `r` delivers every later change exactly
//! once, in order, across reconnects, restarts and nodes, for as long as the
//! log holds them (`COMPACTED` once it does not).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::events::Event;
use super::types::{Change, Limit, Revision, Watch};
use super::{ChangePage, Limits, Store};
use crate::auth::{Auth, Principal, TenantId};
use crate::error::ApiError;
use crate::slots::{Count, CountSlot, PerUser, UserSlot};

/// How often a waiting feed looks at the change log even when no event woke it.
pub(super) const RECHECK: Duration = Duration::from_secs(1);

/// Waits until an event of `tenant` that `watch` follows arrives, the next
/// recheck, or `deadline`, whichever is first.
pub(super) async fn wake(
    events: &mut broadcast::Receiver<Arc<Event>>,
    tenant: TenantId,
    watch: &Watch,
    deadline: Instant,
) {
    let until = deadline.min(Instant::now() + RECHECK);
    loop {
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Ok(e)) if e.tenant != tenant.get() || !watch.matches(&e.key) => {}
            // Nobody publishes any more (shutting down): wait out the recheck.
            Ok(Err(broadcast::error::RecvError::Closed)) => {
                tokio::time::sleep_until(until).await;
                return;
            }
            // A matching event, missed events (the log has them), or time.
            _ => return,
        }
    }
}

/// The feeds open on this node, in all and per user: each reads the log at
/// least every [`RECHECK`], so their number is bounded before one opens.
#[derive(Default)]
pub(super) struct OpenFeeds {
    all: Arc<Count>,
    per_user: Arc<PerUser>,
}

/// One open feed's places in [`OpenFeeds`]; given back when dropped.
pub(super) struct FeedPlace {
    _user: UserSlot,
    _all: CountSlot,
}

impl OpenFeeds {
    /// Feeds open now.
    pub(super) fn open(&self) -> u64 {
        self.all.get()
    }

    /// Places for one more feed of `user`; `RATE_LIMITED` when they, or the
    /// node, hold as many as `limits` allow.
    pub(super) fn claim(&self, user: i64, limits: &Limits) -> Result<FeedPlace, ApiError> {
        let max = limits.max_feeds_per_user;
        let user = self
            .per_user
            .claim(user, max)
            .ok_or_else(|| ApiError::RateLimited {
                message: format!(
                    "too many change feeds: at most {max} open at once per user on this node \
                     (watch streams, waiting change requests and subscriptions); close one first"
                ),
                retry_after: 1,
            })?;
        let max = limits.max_feeds;
        let all = self.all.claim(max).ok_or_else(|| ApiError::RateLimited {
            message: format!(
                "this node has {max} change feeds open, as many as it serves; retry later"
            ),
            retry_after: 1,
        })?;
        Ok(FeedPlace {
            _user: user,
            _all: all,
        })
    }
}

/// A feed of changes after a revision; see the module's documentation.
pub struct Feed {
    _place: FeedPlace,
    store: Store,
    tenant: TenantId,
    watch: Watch,
    after: Revision,
    ready: VecDeque<Change>,
    events: broadcast::Receiver<Arc<Event>>,
}

impl Feed {
    pub(super) fn new(
        place: FeedPlace,
        store: Store,
        tenant: TenantId,
        watch: Watch,
        after: Revision,
    ) -> Feed {
        // Subscribed before the first read, so no change slips in between.
        let events = store.events().subscribe();
        Feed {
            _place: place,
            store,
            tenant,
            watch,
            after,
            ready: VecDeque::new(),
            events,
        }
    }

    /// The revision of the last change delivered (or the starting point).
    pub fn after(&self) -> Revision {
        self.after
    }

    /// The next change, waiting for one as long as it takes. `COMPACTED`
    /// when changes the feed still has to deliver are no longer logged.
    pub async fn next(&mut self) -> Result<Change, ApiError> {
        loop {
            if let Some(change) = self.ready.pop_front() {
                self.after = Revision::parse("after", change.revision)?;
                self.store.metrics().feed_delivered();
                return Ok(change);
            }
            let page = self
                .store
                .read_changes(
                    self.tenant,
                    &self.watch,
                    self.after,
                    Limit::parse("limit", Some(Limit::MAX))?,
                )
                .await;
            if let Err(ApiError::Compacted { .. }) = &page {
                self.store.metrics().feed_lost();
            }
            let ChangePage {
                changes,
                last_revision,
            } = page?;
            if changes.is_empty() {
                self.after = Revision::parse("after", last_revision)?;
                wake(
                    &mut self.events,
                    self.tenant,
                    &self.watch,
                    Instant::now() + RECHECK,
                )
                .await;
            } else {
                self.ready = changes.into();
            }
        }
    }
}

const CENTURY_MS: i64 = 100 * 366 * 24 * 3600 * 1000;

/// A feed held open for one caller: it ends when the caller's access token
/// expires and, given the token, as soon as the token is refused (the user
/// removed, the token revoked), checked (cached) before each change and every
/// `IDLE_RECHECK` while none comes.
pub struct CallerFeed {
    feed: Feed,
    deadline: Instant,
    recheck: Option<(Auth, String)>,
    done: bool,
}

impl Feed {
    /// This feed for `principal`, rechecking `token` with `auth` if given.
    pub fn for_caller(self, principal: &Principal, recheck: Option<(Auth, String)>) -> CallerFeed {
        // An API key without expiry ends at `auth::NEVER`; a century is
        // forever enough, and keeps the `Instant` from overflowing.
        let left_ms =
            (principal.expires_at - self.store.clock().now_ms()).clamp(0, CENTURY_MS) as u64;
        CallerFeed {
            deadline: Instant::now() + Duration::from_millis(left_ms),
            feed: self,
            recheck,
            done: false,
        }
    }
}

impl CallerFeed {
    /// The next change, or the error that ends the feed; `None` once it has.
    /// With a token to recheck, an idle feed also rechecks it every
    /// `IDLE_RECHECK`, so that a revoked credential that never expires (an
    /// API key) does not hold a quiet feed open.
    pub async fn next(&mut self) -> Option<Result<Change, ApiError>> {
        if self.done {
            return None;
        }
        let CallerFeed {
            feed,
            deadline,
            recheck,
            ..
        } = self;
        let next_change = feed.next();
        tokio::pin!(next_change);
        let mut idle = tokio::time::interval_at(Instant::now() + IDLE_RECHECK, IDLE_RECHECK);
        let next = loop {
            tokio::select! {
                _ = tokio::time::sleep_until(*deadline) => break Err(ApiError::Unauthenticated(
                    "the access token expired; reconnect with a new token and resume after the \
                     last revision received"
                        .into(),
                )),
                next = &mut next_change => break next,
                _ = idle.tick(), if recheck.is_some() => {
                    if let Some(e) = refused(recheck.as_ref()).await {
                        break Err(e);
                    }
                }
            }
        };
        let next = match next {
            Ok(change) => match refused(recheck.as_ref()).await {
                Some(e) => Err(e),
                None => Ok(change),
            },
            failed => failed,
        };
        self.done = next.is_err();
        Some(next)
    }
}

/// The error that ends a feed whose caller's token (`recheck`, if any) is now
/// refused. Only a refusal does: a failed check (the database away for a
/// moment) lets the feed go on.
async fn refused(recheck: Option<&(Auth, String)>) -> Option<ApiError> {
    let (auth, token) = recheck?;
    match auth.authenticate(token).await {
        Err(e @ ApiError::Unauthenticated(_)) => Some(e),
        _ => None,
    }
}

/// How often an idle feed rechecks its caller's token.
const IDLE_RECHECK: Duration = Duration::from_secs(5);
