//! The domain: the only code that reads or writes objects.
//!
//! Every function takes the tenant as a [`TenantId`] (reads) or a [`Writer`]
//! (writes), which only verified authentication can produce. Inputs arrive
//! parsed ([`Key`], [`Data`], [`Ttl`], ...). Both REST and GraphQL call these
//! functions; no rule about objects lives anywhere else.
//!
//! Time is the server clock in Unix milliseconds, so expiry is exact to the
//! millisecond. Writes go through committer tasks (group commit, see
//! `write`). Point reads that the cache (SQLite only, see `cache`; on
//! PostgreSQL several nodes write) cannot answer go through reader tasks
//! (read coalescing, see `read`).

mod cache;
pub mod events;
mod queue;
mod read;
mod sql;
mod sqlite;
mod types;
mod write;

use std::sync::Arc;

use anyhow::Context;

pub use types::{Cursor, Data, Expect, Key, Limit, Object, Prefix, Ttl, parse_version};

use sea_orm::{ConnectionTrait, DatabaseBackend};
pub(crate) use sql::seconds_left;

use crate::auth::{TenantId, Writer};
use crate::clock::Clock;
use crate::db::Db;
use crate::error::ApiError;
use cache::{Cache, Lookup};
use events::{Event, EventKind, Events};
use sql::{Sql, object_from_row};
use write::{Committer, Job, JobResult, Op, Outcome};

/// Reader tasks (see `read`): each holds a read connection while its
/// statement runs, and the next collects lookups meanwhile.
const READERS: usize = 4;

/// Configured limits on values and batches.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_value_bytes: u64,
    pub max_batch_items: u64,
}

/// A value to write, parsed.
#[derive(Clone, Debug)]
pub struct Item {
    pub key: Key,
    pub data: Data,
    pub ttl: Option<Ttl>,
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
                    kind: EventKind::Put,
                    key: object.key.clone(),
                    version: object.version,
                    object: Some(object.clone()),
                },
                Outcome::Deleted { key, version } => Event {
                    tenant: tenant.get(),
                    kind: EventKind::Delete,
                    key: key.clone(),
                    version: *version,
                    object: None,
                },
            })
            .collect(),
    );
}

/// Publishes the sweeper's deletions and drops them from the cache.
fn after_sweep(events: &Events, cache: Option<&Cache>, expired: &[sql::Expired]) {
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
                kind: EventKind::Expire,
                key: e.key.clone(),
                version: e.version,
                object: None,
            })
            .collect(),
    );
}

fn unexpected() -> ApiError {
    ApiError::internal(anyhow::anyhow!("a write returned an unexpected outcome"))
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
    ) -> anyhow::Result<Self> {
        let sqlite = db.backend == DatabaseBackend::Sqlite;
        let cache = (sqlite && cache_bytes > 0).then(|| Arc::new(Cache::new(cache_bytes)));
        let hooks = {
            let (events, cache) = (events.clone(), cache.clone());
            let (events2, cache2) = (events.clone(), cache.clone());
            write::Hooks {
                written: Box::new(move |job, result| {
                    after_commit(&events, cache.as_deref(), job, result)
                }),
                swept: Box::new(move |expired| after_sweep(&events2, cache2.as_deref(), expired)),
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
    pub async fn get(&self, tenant: TenantId, key: &Key) -> Result<Option<Object>, ApiError> {
        let now = self.inner.clock.now_ms();
        let cache = self.inner.cache.as_deref();
        let started = match cache.map(|c| (c, c.lookup(tenant.get(), key.as_str(), now))) {
            Some((_, Lookup::Live(o))) => return Ok(Some(o)),
            Some((_, Lookup::Gone)) => return Ok(None),
            Some((c, Lookup::Unknown)) => Some(c.read_started()),
            None => None,
        };
        let found = self.inner.reader.get(tenant, key.as_str()).await?;
        if let (Some(c), Some(started)) = (cache, started) {
            c.fill(started, tenant.get(), key.as_str(), found.as_ref());
        }
        Ok(found)
    }

    /// The live values under `keys`, in the same order, `None` where missing.
    pub async fn get_many(
        &self,
        tenant: TenantId,
        keys: &[Key],
    ) -> Result<Vec<Option<Object>>, ApiError> {
        self.check_batch_len(keys.len())?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.inner.clock.now_ms();
        let mut found = std::collections::HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(sql::max_rows_per_statement(self.backend())) {
            let mut sql = Sql::select_live(self.backend(), tenant, now);
            let placeholders: Vec<String> = chunk.iter().map(|k| sql.next(k.as_str())).collect();
            sql.push(&format!(r#" AND "key" IN ({})"#, placeholders.join(", ")));
            for row in self.inner.db.read.query_all_raw(sql.build()).await? {
                let o = object_from_row(&row, now)?;
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
        tenant: TenantId,
        prefix: &Prefix,
        limit: Limit,
        cursor: Option<&Cursor>,
    ) -> Result<Page, ApiError> {
        let now = self.inner.clock.now_ms();
        let mut sql = Sql::select_live(self.backend(), tenant, now);
        let lower = sql.next(prefix.as_str());
        sql.push(&format!(r#" AND "key" >= {lower}"#));
        if let Some(upper) = prefix.upper_bound() {
            let u = sql.next(upper);
            sql.push(&format!(r#" AND "key" < {u}"#));
        }
        if let Some(c) = cursor {
            let a = sql.next(c.key());
            sql.push(&format!(r#" AND "key" > {a}"#));
        }
        let fetch = sql.next(i64::from(limit.get()) + 1);
        sql.push(&format!(r#" ORDER BY "key" LIMIT {fetch}"#));
        let rows = self.inner.db.read.query_all_raw(sql.build()).await?;
        let mut objects = rows
            .iter()
            .map(|r| object_from_row(r, now))
            .collect::<Result<Vec<_>, _>>()?;
        let next = if objects.len() > limit.get() as usize {
            objects.truncate(limit.get() as usize);
            objects.last().map(|o| Cursor::after(&o.key))
        } else {
            None
        };
        Ok(Page { objects, next })
    }

    /// Applies a job through the committers (group commit, see `write`).
    async fn run(&self, job: Job) -> JobResult {
        self.inner.committer.submit(job).await
    }

    /// Runs one operation; its outcome or error.
    async fn run_one(&self, writer: Writer<'_>, key: String, op: Op) -> Result<Outcome, ApiError> {
        let job = Job {
            tenant: writer.tenant(),
            ops: vec![(key, Ok(op))],
            atomic: false,
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
                .map(|(key, parsed)| (key, parsed.map(&op)))
                .collect(),
            atomic: atomicity == Atomicity::Atomic,
        };
        Ok(BatchOutcome::new(keys, self.run(job).await?))
    }

    /// Creates a value; `ALREADY_EXISTS` if a live one is stored under the key.
    /// An expired value under the key is replaced as if it were absent.
    pub async fn create(&self, writer: Writer<'_>, item: Item) -> Result<Object, ApiError> {
        let key = item.key.as_str().to_owned();
        match self.run_one(writer, key, Op::Create(item)).await? {
            Outcome::Written { object, .. } => Ok(object),
            Outcome::Deleted { .. } => Err(unexpected()),
        }
    }

    /// Writes a value as `expect` allows: create-or-replace, replace only
    /// (optionally at a version), or create only.
    pub async fn put(
        &self,
        writer: Writer<'_>,
        item: Item,
        expect: Expect,
    ) -> Result<Put, ApiError> {
        let key = item.key.as_str().to_owned();
        match self.run_one(writer, key, Op::Put(item, expect)).await? {
            Outcome::Written { object, created } => Ok(Put { object, created }),
            Outcome::Deleted { .. } => Err(unexpected()),
        }
    }

    /// Deletes the live value under `key` (at `expected` version, if given).
    pub async fn delete(
        &self,
        writer: Writer<'_>,
        key: &Key,
        expected: Option<i64>,
    ) -> Result<(), ApiError> {
        self.run_one(
            writer,
            key.as_str().to_owned(),
            Op::Delete(key.clone(), expected),
        )
        .await
        .map(|_| ())
    }

    /// Creates several values in one transaction, with one result per item in
    /// order. Items that failed to parse arrive as `Err` and keep their error.
    pub async fn batch_create(
        &self,
        writer: Writer<'_>,
        items: Vec<BatchInput<Item>>,
        atomicity: Atomicity,
    ) -> Result<BatchOutcome<Object>, ApiError> {
        let outcome = self.run_batch(writer, items, atomicity, Op::Create).await?;
        Ok(outcome.map(|o| match o {
            Outcome::Written { object, .. } => Ok(object),
            Outcome::Deleted { .. } => Err(unexpected()),
        }))
    }

    /// Writes several values in one transaction, each as its `Expect`
    /// allows, with one result per item.
    pub async fn batch_put(
        &self,
        writer: Writer<'_>,
        items: Vec<BatchInput<(Item, Expect)>>,
        atomicity: Atomicity,
    ) -> Result<BatchOutcome<Put>, ApiError> {
        let outcome = self
            .run_batch(writer, items, atomicity, |(item, expect)| {
                Op::Put(item, expect)
            })
            .await?;
        Ok(outcome.map(|o| match o {
            Outcome::Written { object, created } => Ok(Put { object, created }),
            Outcome::Deleted { .. } => Err(unexpected()),
        }))
    }

    /// Deletes several keys in one transaction; `NOT_FOUND` for keys with no live value.
    pub async fn batch_delete(
        &self,
        writer: Writer<'_>,
        keys: Vec<BatchInput<Key>>,
        atomicity: Atomicity,
    ) -> Result<BatchOutcome<()>, ApiError> {
        let outcome = self
            .run_batch(writer, keys, atomicity, |key| Op::Delete(key, None))
            .await?;
        Ok(outcome.map(|_| Ok(())))
    }

    /// Deletes up to `limit` expired rows of any tenant in one statement and
    /// publishes an `Expire` event for each. Returns how many were deleted.
    /// Safe to run on several nodes at once.
    pub async fn sweep(&self, limit: u32) -> Result<usize, ApiError> {
        if self.inner.db.sqlite_file.is_some() {
            return self.inner.committer.sweep(limit).await;
        }
        // PostgreSQL: beside the committers, on the pool, so that a sweep
        // never holds up writes; there is no cache to keep in order.
        let expired = sql::sweep(&self.inner.db.write, limit, self.inner.clock.now_ms()).await?;
        after_sweep(&self.inner.events, None, &expired);
        Ok(expired.len())
    }
}
