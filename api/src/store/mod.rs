//! The domain: the only code that reads or writes objects.
//!
//! Every function takes the caller as a [`ReadScope`] (reads) or a [`Writer`]
//! (writes), which only verified authentication can produce. Both name the
//! tenant and, for an API key restricted to a key prefix, that prefix: keys
//! outside it read as absent, deleting one answers `NOT_FOUND` and writing
//! one `FORBIDDEN`, here and nowhere else. Inputs arrive parsed ([`Key`],
//! [`Data`], [`Ttl`], ...). Both REST and GraphQL call these functions; no
//! rule about objects lives anywhere else.
//!
//! Time is the server clock in Unix milliseconds, so expiry is exact to the
//! millisecond. Writes go through committer tasks (group commit, see
//! `write`). Point reads that the cache (SQLite only, see `cache`; on
//! PostgreSQL several nodes write) cannot answer are read in place on
//! SQLite, else through reader tasks (read coalescing, see `read`).

mod cache;
pub mod events;
mod feed;
mod queue;
pub mod quota;
mod read;
mod sql;
mod sqlite;
mod types;
mod write;

use std::sync::Arc;

use anyhow::Context;

pub use types::{
    Change, Cursor, Data, Expect, Key, Limit, Object, Prefix, Revision, Ttl, Wait, Watch,
    parse_version,
};

use sea_orm::DatabaseBackend;

use crate::auth::{Principal, ReadScope, TenantId, Writer};
use crate::clock::Clock;
use crate::db::Db;
use crate::error::ApiError;
use crate::metrics::{Metrics, StoreOp};
use cache::{Cache, Lookup};
use events::{Event, Events};
pub use feed::{CallerFeed, Feed};
/// The condition that a row of `object` is live, for the operator's
/// queries outside the store (`users`).
pub(crate) use sql::live as live_condition;
use write::{Committer, Job, JobResult, Op, Outcome, Upkeep, Upkept};

/// Reader tasks (see `read`): each holds a read connection while its
/// statement runs, and the next collects lookups meanwhile.
const READERS: usize = 4;

/// Configured limits on values, batches, the change log and feeds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_value_bytes: u64,
    pub max_batch_items: u64,
    /// How long the change log keeps a change.
    pub changes_retention: std::time::Duration,
    /// Most changes the log keeps per tenant.
    pub changes_max_per_tenant: u64,
    /// Most change feeds open on this node.
    pub max_feeds: u64,
    /// Most change feeds one user holds open on this node.
    pub max_feeds_per_user: u64,
    /// The limits of tenants that have none of their own.
    pub default_quota: quota::Quota,
}

/// A value to write, parsed.
#[derive(Clone, Debug)]
pub struct Item {
    pub key: Key,
    pub data: Data,
    pub ttl: Option<Ttl>,
}

impl Item {
    /// The bytes it counts for in its tenant's quota: the key's UTF-8 bytes
    /// plus the data's compact JSON text.
    pub fn size(&self) -> i64 {
        (self.key.as_str().len() + self.data.as_str().len()) as i64
    }
}

/// The outcome of a put: the object and whether it was created.
#[derive(Clone, Debug)]
pub struct Put {
    pub object: Object,
    pub created: bool,
}

/// One page of a listing.
#[derive(Clone, Debug)]
pub struct Page {
    pub objects: Vec<Object>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

/// One batch item: the key as the client sent it (for the results) and the
/// parsed input, or why it could not be parsed.
pub type BatchInput<T> = (String, Result<T, ApiError>);

/// One item of a batch's outcome.
#[derive(Debug)]
pub struct BatchItem<T> {
    /// Position of the item in the request, from 0.
    pub index: usize,
    /// The key as the client sent it.
    pub key: String,
    /// What the item did, or why it failed (and wrote nothing).
    pub result: Result<T, ApiError>,
}

/// What a batch did, item by item in request order.
#[derive(Debug)]
pub struct BatchOutcome<T> {
    pub items: Vec<BatchItem<T>>,
    /// How many items were written.
    pub succeeded: usize,
    /// How many items failed (and wrote nothing).
    pub failed: usize,
}

impl<T> BatchOutcome<T> {
    fn new(keys: Vec<String>, results: impl IntoIterator<Item = Result<T, ApiError>>) -> Self {
        Self::counted(
            keys.into_iter()
                .zip(results)
                .enumerate()
                .map(|(index, (key, result))| BatchItem { index, key, result })
                .collect(),
        )
    }

    fn counted(items: Vec<BatchItem<T>>) -> Self {
        let succeeded = items.iter().filter(|i| i.result.is_ok()).count();
        BatchOutcome {
            failed: items.len() - succeeded,
            items,
            succeeded,
        }
    }

    /// The same items with each success turned into a `U` (or a failure).
    fn map<U>(self, f: impl Fn(T) -> Result<U, ApiError>) -> BatchOutcome<U> {
        BatchOutcome::counted(
            self.items
                .into_iter()
                .map(|i| BatchItem {
                    index: i.index,
                    key: i.key,
                    result: i.result.and_then(&f),
                })
                .collect(),
        )
    }
}

/// A page of a change feed.
#[derive(Clone, Debug)]
pub struct ChangePage {
    /// The changes after the requested revision, in revision order.
    pub changes: Vec<Change>,
    /// What to resume after next: the last change's revision, or, when every
    /// change up to now was read, the tenant's latest revision.
    pub last_revision: i64,
}

/// A page of one key's history, newest first.
#[derive(Clone, Debug)]
pub struct HistoryPage {
    pub changes: Vec<Change>,
    /// Where the next (older) page starts; `None` on the last page.
    pub next: Option<Revision>,
}

/// Most bytes of values in one page of a feed (at least one change is
/// always sent): a page of 1,000 changes of 1 MiB values would otherwise
/// be a gigabyte.
const MAX_FEED_PAGE_BYTES: usize = 4 << 20;

/// Most bytes of objects (keys and compact values, as quotas count them) a
/// page of a listing holds, its first object aside: a page of `limit`
/// large values would otherwise be built whole in memory, once per
/// concurrent request (1,000 values of 1 MiB made a 315 MB answer and
/// 1.1 GB of memory). A page cut short still has a cursor to the rest.
const MAX_PAGE_BYTES: usize = 4 << 20;

/// Rows a feed page reads per statement while it fills up: at first
/// [`FIRST_FEED_CHUNK`], then as many as the values read so far say will
/// fit in what is left of [`MAX_FEED_PAGE_BYTES`], up to this. A fixed 64
/// read 32 MB of 500 KB values to send 4 MiB, on every poll of every feed.
const FEED_CHUNK: u32 = 64;
const FIRST_FEED_CHUNK: u32 = 8;

/// Revisions of a tenant's log one page of a key's history walks.
const HISTORY_WINDOW: i64 = 10_000;

/// Whether a batch is all-or-nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Atomicity {
    /// Each item succeeds or fails on its own; failed items write nothing.
    PerItem,
    /// The first failing item fails the whole batch; nothing is written.
    Atomic,
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    clock: Clock,
    limits: Limits,
    events: Events,
    cache: Option<Arc<Cache>>,
    committer: Committer,
    reader: read::Reader,
    feeds: feed::OpenFeeds,
    metrics: Metrics,
}

/// Publishes a job's committed writes and records them in the cache.
fn after_commit(events: &Events, cache: Option<&Cache>, job: &Job, result: &JobResult) {
    let tenant = job.tenant;
    let results = match result {
        Ok(results) => results,
        Err(ApiError::Internal(_)) => {
            // A database failure: the job's writes may have been committed.
            if let Some(cache) = cache {
                cache.uncertain(tenant.get(), job.ops.iter().map(|(key, _)| key.as_str()));
            }
            return;
        }
        Err(_) => return,
    };
    let done = || results.iter().filter_map(|r| r.as_ref().ok());
    if let Some(cache) = cache {
        cache.committed(
            tenant.get(),
            done().map(|o| match o {
                Outcome::Written { object, .. } => (object.key.as_str(), Some(object)),
                Outcome::Deleted { key, .. } => (key.as_str(), None),
            }),
        );
    }
    if !events.is_watched() {
        return;
    }
    events.publish(
        done()
            .map(|o| match o {
                Outcome::Written { object, .. } => Event {
                    tenant: tenant.get(),
                    key: object.key.clone(),
                    revision: object.revision,
                },
                Outcome::Deleted { key, revision, .. } => Event {
                    tenant: tenant.get(),
                    key: key.clone(),
                    revision: *revision,
                },
            })
            .collect(),
    );
}

/// Publishes the sweeper's deletions and drops them from the cache.
fn after_sweep(
    events: &Events,
    cache: Option<&Cache>,
    metrics: &Metrics,
    expired: &[sql::Expired],
) {
    metrics.expired(expired.len());
    if let Some(cache) = cache {
        for e in expired {
            cache.forget(e.tenant, &e.key);
        }
    }
    events.publish(
        expired
            .iter()
            .map(|e| Event {
                tenant: e.tenant,
                key: e.key.clone(),
                revision: e.revision,
            })
            .collect(),
    );
}

/// Whether a feed can resume after `after`, given the tenant's latest and
/// compacted revisions: `COMPACTED` if changes after it are no longer all
/// logged, `INVALID_INPUT` if it is past the latest revision.
fn resumable(after: Revision, latest: i64, compacted: i64) -> Result<(), ApiError> {
    if after.get() < compacted {
        return Err(ApiError::Compacted {
            oldest_revision: compacted,
        });
    }
    if after.get() > latest {
        return Err(ApiError::invalid(
            "after",
            format!(
                "revision {} is past the latest revision of your data ({latest})",
                after.get()
            ),
        ));
    }
    Ok(())
}

/// `op` if `writer` may make it: outside the prefix its API key is
/// restricted to, a deletion answers `NOT_FOUND` (as for a key without a
/// value, which it reads as) and any other write `FORBIDDEN`.
fn within(writer: Writer<'_>, op: Op) -> Result<Op, ApiError> {
    let key = match &op {
        Op::Create(item) | Op::Put(item, _) => &item.key,
        Op::Delete(key, _) => key,
    };
    match writer.may_write(key.as_str()) {
        Ok(()) => Ok(op),
        Err(_) if matches!(op, Op::Delete(..)) => Err(ApiError::not_found()),
        Err(e) => Err(e),
    }
}

fn unexpected() -> ApiError {
    ApiError::internal(anyhow::anyhow!("a write returned an unexpected outcome"))
}

impl Outcome {
    /// What a create or put wrote.
    fn into_put(self) -> Result<Put, ApiError> {
        match self {
            Outcome::Written { object, created } => Ok(Put { object, created }),
            Outcome::Deleted { .. } => Err(unexpected()),
        }
    }

    /// The revision of a deletion.
    fn into_deletion(self) -> Result<i64, ApiError> {
        match self {
            Outcome::Deleted { revision, .. } => Ok(revision),
            Outcome::Written { .. } => Err(unexpected()),
        }
    }
}

impl Store {
    /// `cache_bytes` sizes the SQLite read cache (0: none); PostgreSQL has none.
    /// Fails if SQLite's committer cannot open the database file.
    pub fn new(
        db: Db,
        clock: Clock,
        limits: Limits,
        events: Events,
        cache_bytes: u64,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let sqlite = db.backend == DatabaseBackend::Sqlite;
        let cache = (sqlite && cache_bytes > 0).then(|| Arc::new(Cache::new(cache_bytes)));
        let hooks = {
            let (events, cache) = (events.clone(), cache.clone());
            let (events2, cache2, metrics2) = (events.clone(), cache.clone(), metrics.clone());
            let metrics3 = metrics.clone();
            write::Hooks {
                written: Box::new(move |job, result| {
                    after_commit(&events, cache.as_deref(), job, result)
                }),
                swept: Box::new(move |expired| {
                    after_sweep(&events2, cache2.as_deref(), &metrics2, expired)
                }),
                grouped: Box::new(move |writes| metrics3.group_commit(writes)),
            }
        };
        let committer = match &db.sqlite_file {
            Some(path) => {
                let writer = sqlite::SqliteWriter::open(path, db.sqlite_synchronous)
                    .with_context(|| format!("cannot open {} for writing", path.display()))?;
                Committer::start_sqlite(writer, clock.clone(), hooks)
                    .context("cannot start the committer thread")?
            }
            None => Committer::start(db.write.clone(), clock.clone(), hooks, db.committers),
        };
        let reader = read::Reader::start(db.clone(), clock.clone(), READERS);
        Ok(Store {
            inner: Arc::new(Inner {
                reader,
                db,
                clock,
                limits,
                events,
                cache,
                committer,
                feeds: feed::OpenFeeds::default(),
                metrics,
            }),
        })
    }

    /// The change events of this node, for subscriptions.
    pub fn events(&self) -> &Events {
        &self.inner.events
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// Parses one value to write: key, JSON data within the size limit, optional TTL.
    pub fn item(
        &self,
        key: impl Into<String>,
        data: &serde_json::Value,
        ttl: Option<i64>,
    ) -> Result<Item, ApiError> {
        Ok(Item {
            key: Key::parse(key)?,
            data: Data::parse(data, self.inner.limits.max_value_bytes)?,
            ttl: Ttl::parse_opt(ttl)?,
        })
    }

    /// Refuses batches over the configured item count.
    pub fn check_batch_len(&self, len: usize) -> Result<(), ApiError> {
        if len as u64 > self.inner.limits.max_batch_items {
            Err(ApiError::PayloadTooLarge(format!(
                "a batch may hold at most {} items, got {len}",
                self.inner.limits.max_batch_items
            )))
        } else {
            Ok(())
        }
    }

    fn backend(&self) -> DatabaseBackend {
        self.inner.db.backend
    }

    /// The live value under `key`, if any.
    pub async fn get(&self, scope: ReadScope<'_>, key: &Key) -> Result<Option<Object>, ApiError> {
        self.inner.metrics.store_op(StoreOp::Get);
        if !scope.sees(key.as_str()) {
            return Ok(None);
        }
        let tenant = scope.tenant();
        let now = self.inner.clock.now_ms();
        let cache = self.inner.cache.as_deref();
        let lookup = cache.map(|c| (c, c.lookup(tenant.get(), key.as_str(), now)));
        if let Some((_, found)) = &lookup {
            self.inner.metrics.cache(!matches!(found, Lookup::Unknown));
        }
        let started = match lookup {
            Some((_, Lookup::Live(o))) => return Ok(Some(o)),
            Some((_, Lookup::Gone)) => return Ok(None),
            Some((c, Lookup::Unknown)) => Some(c.read_started()),
            None => None,
        };
        let found = self.inner.reader.get(tenant, key.as_str(), now).await?;
        if let (Some(c), Some(started)) = (cache, started) {
            c.fill(started, tenant.get(), key.as_str(), found.as_ref());
        }
        Ok(found)
    }

    /// The live values under `keys`, in the same order, `None` where missing.
    pub async fn get_many(
        &self,
        scope: ReadScope<'_>,
        keys: &[Key],
    ) -> Result<Vec<Option<Object>>, ApiError> {
        self.inner.metrics.store_op(StoreOp::GetMany);
        self.check_batch_len(keys.len())?;
        let tenant = scope.tenant();
        let seen: Vec<&Key> = keys.iter().filter(|k| scope.sees(k.as_str())).collect();
        let now = self.inner.clock.now_ms();
        let mut found = std::collections::HashMap::with_capacity(seen.len());
        for chunk in seen.chunks(sql::max_rows_per_statement(self.backend())) {
            for o in sql::select_live_keys(&self.inner.db.read, tenant, chunk, now).await? {
                found.insert(o.key.clone(), o);
            }
        }
        Ok(keys
            .iter()
            .map(|k| found.get(k.as_str()).cloned())
            .collect())
    }

    /// Live values whose keys start with `prefix`, in byte order of keys,
    /// after `cursor`, at most `limit` of them.
    pub async fn list(
        &self,
        scope: ReadScope<'_>,
        prefix: &Prefix,
        limit: Limit,
        cursor: Option<&Cursor>,
    ) -> Result<Page, ApiError> {
        self.inner.metrics.store_op(StoreOp::List);
        let Some(prefix) = scope.narrow(prefix) else {
            return Ok(Page {
                objects: Vec::new(),
                next: None,
            });
        };
        let now = self.inner.clock.now_ms();
        let (mut objects, fetched) = sql::list_live(
            &self.inner.db.read,
            scope.tenant(),
            &prefix,
            cursor.map(Cursor::key),
            limit.get() + 1,
            MAX_PAGE_BYTES,
            now,
        )
        .await?;
        // More follow if the page was cut by size, or by its limit (one
        // object more than the limit was asked for).
        let more = objects.len() < fetched || objects.len() > limit.get() as usize;
        objects.truncate(limit.get() as usize);
        let next = if more {
            objects.last().map(|o| Cursor::after(&o.key))
        } else {
            None
        };
        Ok(Page { objects, next })
    }

    /// The changes of `tenant` after revision `after` to the keys `watch`
    /// follows, in revision order: at most `limit`, and no more than
    /// [`MAX_FEED_PAGE_BYTES`] of values (but at least one change).
    /// `COMPACTED` if some changes after `after` are no longer logged;
    /// `INVALID_INPUT` if `after` is past the tenant's latest revision.
    pub async fn changes(
        &self,
        scope: ReadScope<'_>,
        watch: Watch,
        after: Revision,
        limit: Limit,
    ) -> Result<ChangePage, ApiError> {
        self.inner.metrics.store_op(StoreOp::Changes);
        let watch = scope.narrow_watch(watch);
        self.read_changes(scope.tenant(), &watch, after, limit)
            .await
    }

    /// [`Store::changes`] for the store's own polls (feeds, long-polls),
    /// which are not counted as operations asked of it.
    async fn read_changes(
        &self,
        tenant: TenantId,
        watch: &Watch,
        after: Revision,
        limit: Limit,
    ) -> Result<ChangePage, ApiError> {
        let db = &self.inner.db.read;
        // Read first: every change up to `latest` has committed, so the
        // reads below see all of them.
        let (latest, compacted) = sql::revisions(db, tenant).await?;
        resumable(after, latest, compacted)?;
        let limit = limit.get() as usize;
        let mut changes: Vec<Change> = Vec::new();
        let mut bytes = 0;
        let mut from = after.get();
        let mut full = false;
        let mut chunk_rows = FIRST_FEED_CHUNK;
        'pages: loop {
            let want = chunk_rows.min((limit - changes.len()) as u32);
            let chunk = sql::changes_after(db, tenant, from, watch, want).await?;
            let ended = chunk.len() < want as usize;
            for change in chunk {
                let size = change.data.as_deref().map_or(0, str::len);
                if !changes.is_empty() && bytes + size > MAX_FEED_PAGE_BYTES {
                    full = true;
                    break 'pages;
                }
                bytes += size;
                from = change.revision;
                changes.push(change);
            }
            if ended {
                break;
            }
            if changes.len() >= limit {
                full = true;
                break;
            }
            let average = (bytes / changes.len().max(1)).max(1);
            let fit = (MAX_FEED_PAGE_BYTES.saturating_sub(bytes) / average).saturating_add(1);
            chunk_rows = u32::try_from(fit)
                .unwrap_or(FEED_CHUNK)
                .clamp(1, FEED_CHUNK);
        }
        // Compaction only moves forward: if it has not passed `after` now,
        // it had not when the changes were read.
        let (_, compacted) = sql::revisions(db, tenant).await?;
        resumable(after, latest, compacted)?;
        let last_revision = match changes.last() {
            Some(c) if full => c.revision,
            Some(c) => c.revision.max(latest),
            None => latest.max(after.get()),
        };
        Ok(ChangePage {
            changes,
            last_revision,
        })
    }

    /// [`Store::changes`], waiting up to `wait` for a change when there is
    /// none yet: a blocking query (see `feed` for how it wakes). While it
    /// waits it counts as one of the caller's feeds: `RATE_LIMITED` instead
    /// of waiting when they hold as many as the limits allow.
    pub async fn wait_for_changes(
        &self,
        principal: &Principal,
        watch: Watch,
        mut after: Revision,
        limit: Limit,
        wait: Wait,
    ) -> Result<ChangePage, ApiError> {
        self.inner.metrics.store_op(StoreOp::Changes);
        let watch = &principal.read_scope().narrow_watch(watch);
        let tenant = principal.tenant();
        let deadline = tokio::time::Instant::now() + wait.duration();
        // Subscribed before the first read, so no change can slip between.
        let mut events = self.inner.events.subscribe();
        // Claimed once the request is about to wait, held until it answers.
        let mut place = None;
        loop {
            let page = self.read_changes(tenant, watch, after, limit).await?;
            let now = tokio::time::Instant::now();
            if !page.changes.is_empty() || now >= deadline {
                return Ok(page);
            }
            if place.is_none() {
                place = Some(self.claim_feed(principal)?);
            }
            after = Revision::parse("after", page.last_revision)?;
            feed::wake(&mut events, tenant, watch, deadline).await;
        }
    }

    /// A feed of the changes after `after` to the keys `watch` follows; from
    /// the latest revision (live changes only) when `after` is `None`.
    /// `COMPACTED` at once if the log no longer holds every change after it;
    /// `RATE_LIMITED` if the caller (or the node) has as many feeds open as
    /// the limits allow.
    pub async fn feed(
        &self,
        principal: &Principal,
        watch: Watch,
        after: Option<Revision>,
    ) -> Result<Feed, ApiError> {
        self.inner.metrics.store_op(StoreOp::Feed);
        let watch = principal.read_scope().narrow_watch(watch);
        let place = self.claim_feed(principal)?;
        let tenant = principal.tenant();
        let (latest, compacted) = sql::revisions(&self.inner.db.read, tenant).await?;
        let after = match after {
            Some(a) => {
                resumable(a, latest, compacted)?;
                a
            }
            None => Revision::parse("after", latest)?,
        };
        Ok(Feed::new(place, self.clone(), tenant, watch, after))
    }

    /// How long ago the longest-expired value the sweeper has not deleted
    /// yet expired; zero when none waits.
    pub async fn sweep_lag(&self) -> Result<std::time::Duration, ApiError> {
        let now = self.inner.clock.now_ms();
        let oldest = sql::oldest_expired(&self.inner.db.read, now).await?;
        let ms = oldest.map_or(0, |at| now.saturating_sub(at).max(0));
        Ok(std::time::Duration::from_millis(ms as u64))
    }

    /// Change feeds open on this node now.
    pub fn open_feeds(&self) -> u64 {
        self.inner.feeds.open()
    }

    fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    fn claim_feed(&self, principal: &Principal) -> Result<feed::FeedPlace, ApiError> {
        self.inner
            .feeds
            .claim(principal.user_id, &self.inner.limits)
    }

    /// The revision before the oldest change the log holds for `tenant`:
    /// the first `after` a feed can resume from.
    pub async fn oldest_revision(&self, tenant: TenantId) -> Result<Revision, ApiError> {
        let (_, compacted) = sql::revisions(&self.inner.db.read, tenant).await?;
        Revision::parse("after", compacted)
    }

    /// The logged changes of `key`, newest first, before `before` (from the
    /// newest when `None`), `limit` per page. Each page walks at most
    /// [`HISTORY_WINDOW`] revisions of the tenant's log, so a page may hold
    /// fewer than `limit` changes (even none) and still have a next page.
    pub async fn history(
        &self,
        scope: ReadScope<'_>,
        key: &Key,
        limit: Limit,
        before: Option<Revision>,
    ) -> Result<HistoryPage, ApiError> {
        self.inner.metrics.store_op(StoreOp::History);
        let tenant = scope.tenant();
        let db = &self.inner.db.read;
        let (latest, compacted) = sql::revisions(db, tenant).await?;
        let before = before.map_or(latest + 1, |b| b.get().min(latest + 1));
        let from = before.saturating_sub(HISTORY_WINDOW).max(compacted + 1);
        let limit = limit.get();
        // A key the caller may not see pages like one never written.
        let mut changes = if scope.sees(key.as_str()) {
            sql::key_history(db, tenant, key.as_str(), from, before, limit + 1).await?
        } else {
            Vec::new()
        };
        let next = if changes.len() > limit as usize {
            changes.truncate(limit as usize);
            changes.last().map(|c| c.revision)
        } else if from > compacted + 1 {
            // The window ended before the log did.
            Some(from)
        } else {
            None
        };
        Ok(HistoryPage {
            changes,
            next: next.map(|r| Revision::parse("cursor", r)).transpose()?,
        })
    }

    /// Applies a job through the committers (group commit, see `write`).
    async fn run(&self, job: Job) -> JobResult {
        self.inner.committer.submit(job).await
    }

    /// The writer's tenant's limits in force, if it has any.
    fn quota_of(&self, writer: Writer<'_>) -> Option<quota::Quota> {
        Some(self.in_force(writer.quota())).filter(|q| !q.is_unlimited())
    }

    /// A tenant's own limits completed with the servers' defaults.
    fn in_force(&self, own: quota::TenantQuota) -> quota::Quota {
        own.resolve(self.inner.limits.default_quota)
    }

    /// What the caller's tenant stores in live values. Counts the whole
    /// tenant, whatever prefix an API key is restricted to (as revisions do).
    pub async fn usage(&self, caller: &Principal) -> Result<quota::Usage, ApiError> {
        let now = self.inner.clock.now_ms();
        sql::live_usage(&self.inner.db.read, caller.tenant(), now).await
    }

    /// The caller's tenant's limits in force.
    pub fn quota(&self, caller: &Principal) -> quota::Quota {
        self.in_force(caller.quota)
    }

    /// Runs one operation; its outcome or error.
    async fn run_one(&self, writer: Writer<'_>, key: String, op: Op) -> Result<Outcome, ApiError> {
        let op = within(writer, op)?;
        let job = Job {
            tenant: writer.tenant(),
            ops: vec![(key, Ok(op))],
            atomic: false,
            quota: self.quota_of(writer),
        };
        self.run(job)
            .await?
            .into_iter()
            .next()
            .ok_or_else(unexpected)?
    }

    async fn run_batch<T>(
        &self,
        writer: Writer<'_>,
        items: Vec<BatchInput<T>>,
        atomicity: Atomicity,
        op: impl Fn(T) -> Op,
    ) -> Result<BatchOutcome<Outcome>, ApiError> {
        self.check_batch_len(items.len())?;
        let keys: Vec<String> = items.iter().map(|(key, _)| key.clone()).collect();
        let job = Job {
            tenant: writer.tenant(),
            ops: items
                .into_iter()
                .map(|(key, parsed)| (key, parsed.map(&op).and_then(|op| within(writer, op))))
                .collect(),
            atomic: atomicity == Atomicity::Atomic,
            quota: self.quota_of(writer),
        };
        Ok(BatchOutcome::new(keys, self.run(job).await?))
    }

    /// Creates a value; `ALREADY_EXISTS` if a live one is stored under the key.
    /// An expired value under the key is replaced as if it were absent.
    pub async fn create(&self, writer: Writer<'_>, item: Item) -> Result<Object, ApiError> {
        self.inner.metrics.store_op(StoreOp::Create);
        let key = item.key.as_str().to_owned();
        self.run_one(writer, key, Op::Create(item))
            .await?
            .into_put()
            .map(|put| put.object)
    }

    /// Writes a value as `expect` allows: create-or-replace, replace only
    /// (optionally at a version), or create only.
    pub async fn put(
        &self,
        writer: Writer<'_>,
        item: Item,
        expect: Expect,
    ) -> Result<Put, ApiError> {
        self.inner.metrics.store_op(StoreOp::Put);
        let key = item.key.as_str().to_owned();
        self.run_one(writer, key, Op::Put(item, expect))
            .await?
            .into_put()
    }

    /// Deletes the live value under `key` (at `expected` version, if
    /// given); the revision of the deletion.
    pub async fn delete(
        &self,
        writer: Writer<'_>,
        key: &Key,
        expected: Option<i64>,
    ) -> Result<i64, ApiError> {
        self.inner.metrics.store_op(StoreOp::Delete);
        self.run_one(
            writer,
            key.as_str().to_owned(),
            Op::Delete(key.clone(), expected),
        )
        .await?
        .into_deletion()
    }

    /// Creates several values in one transaction, with one result per item in
    /// order. Items that failed to parse arrive as `Err` and keep their error.
    pub async fn batch_create(
        &self,
        writer: Writer<'_>,
        items: Vec<BatchInput<Item>>,
        atomicity: Atomicity,
    ) -> Result<BatchOutcome<Object>, ApiError> {
        self.inner.metrics.store_op(StoreOp::BatchCreate);
        let outcome = self.run_batch(writer, items, atomicity, Op::Create).await?;
        Ok(outcome.map(|o| o.into_put().map(|put| put.object)))
    }

    /// Writes several values in one transaction, each as its `Expect`
    /// allows, with one result per item.
    pub async fn batch_put(
        &self,
        writer: Writer<'_>,
        items: Vec<BatchInput<(Item, Expect)>>,
        atomicity: Atomicity,
    ) -> Result<BatchOutcome<Put>, ApiError> {
        self.inner.metrics.store_op(StoreOp::BatchPut);
        let outcome = self
            .run_batch(writer, items, atomicity, |(item, expect)| {
                Op::Put(item, expect)
            })
            .await?;
        Ok(outcome.map(Outcome::into_put))
    }

    /// Deletes several keys in one transaction; `NOT_FOUND` for keys with
    /// no live value. Each deletion's outcome is its revision.
    pub async fn batch_delete(
        &self,
        writer: Writer<'_>,
        keys: Vec<BatchInput<Key>>,
        atomicity: Atomicity,
    ) -> Result<BatchOutcome<i64>, ApiError> {
        self.inner.metrics.store_op(StoreOp::BatchDelete);
        let outcome = self
            .run_batch(writer, keys, atomicity, |key| Op::Delete(key, None))
            .await?;
        Ok(outcome.map(Outcome::into_deletion))
    }

    /// Deletes up to `limit` expired rows of any tenant in one transaction,
    /// logs and publishes an `Expire` change for each. Returns how many were
    /// deleted. Safe to run on several nodes at once.
    pub async fn sweep(&self, limit: u32) -> Result<usize, ApiError> {
        self.upkeep(Upkeep::Expire { limit }).await
    }

    /// Removes up to `limit` change log entries older than the retention or
    /// beyond the most kept per tenant, oldest first. Returns how many.
    pub async fn compact(&self, limit: u32) -> Result<usize, ApiError> {
        let limits = self.inner.limits;
        let cutoff = self.inner.clock.now_ms().saturating_sub(
            i64::try_from(limits.changes_retention.as_millis()).unwrap_or(i64::MAX),
        );
        self.upkeep(Upkeep::Compact {
            cutoff,
            max_per_tenant: i64::try_from(limits.changes_max_per_tenant).unwrap_or(i64::MAX),
            limit,
        })
        .await
    }

    async fn upkeep(&self, task: Upkeep) -> Result<usize, ApiError> {
        if self.inner.db.sqlite_file.is_some() {
            return self.inner.committer.upkeep(task).await;
        }
        // PostgreSQL: beside the committers, on the pool, so that upkeep
        // never holds up writes; there is no cache to keep in order.
        match write::upkeep(&self.inner.db.write, task, self.inner.clock.now_ms()).await? {
            Upkept::Expired(expired) => {
                after_sweep(&self.inner.events, None, &self.inner.metrics, &expired);
                Ok(expired.len())
            }
            Upkept::Compacted(n) => Ok(n),
        }
    }
}
