//! The domain: the only code that reads or writes objects.
//!
//! Every function takes the tenant as a [`TenantId`] (reads) or a [`Writer`]
//! (writes), which only verified authentication can produce. Inputs arrive
//! parsed ([`Key`], [`Data`], [`Ttl`], ...). Both REST and GraphQL call these
//! functions; no rule about objects lives anywhere else.
//!
//! The SQL is written once for both backends: `$n` parameters, `ON CONFLICT`
//! and `RETURNING` work on SQLite and PostgreSQL alike. Time is the server
//! clock in Unix milliseconds, so expiry is exact to the millisecond.

mod types;

pub use types::{Cursor, Data, Expect, Key, Limit, Prefix, Ttl, parse_version};

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseTransaction, DbErr, QueryResult, Statement,
    TransactionTrait, Value,
};

use crate::auth::{TenantId, Writer};
use crate::clock::Clock;
use crate::db::Db;
use crate::error::ApiError;
use crate::events::{Event, EventKind, Events};

/// Configured limits on values and batches.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_value_bytes: u64,
    pub max_batch_items: u64,
}

/// A live value, as read or just written.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub key: String,
    /// The value as compact JSON text.
    pub data: String,
    pub version: i64,
    /// Whole seconds left before expiry, rounded up; `None` if it never expires.
    pub ttl: Option<i64>,
    pub expires_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Object {
    /// The value as a JSON tree.
    pub fn data_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
    }

    /// The strong ETag for this version, e.g. `"3"`.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.version)
    }
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

/// Whether a batch is all-or-nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Atomicity {
    /// Each item succeeds or fails on its own; failed items write nothing.
    PerItem,
    /// The first failing item fails the whole batch; nothing is written.
    Atomic,
}

type BatchOp<'a, O> = std::pin::Pin<Box<dyn Future<Output = Result<O, ApiError>> + Send + 'a>>;

#[derive(Clone)]
pub struct Store {
    db: Db,
    clock: Clock,
    limits: Limits,
    events: Events,
}

const COLUMNS: &str = r#""key", version, expires_at, created_at, updated_at"#;

/// A statement under construction: text with `$n` placeholders and its values.
struct Sql {
    backend: DatabaseBackend,
    text: String,
    values: Vec<Value>,
}

impl Sql {
    fn new(backend: DatabaseBackend) -> Self {
        Sql {
            backend,
            text: String::new(),
            values: Vec::new(),
        }
    }

    /// Binds a value and returns its placeholder.
    fn arg(&mut self, v: impl Into<Value>) -> String {
        self.values.push(v.into());
        format!("${}", self.values.len())
    }

    /// Binds JSON text as the `data` column's type (JSONB on PostgreSQL).
    fn json_arg(&mut self, data: &Data) -> String {
        let p = self.arg(data.as_str());
        match self.backend {
            DatabaseBackend::Postgres => format!("{p}::jsonb"),
            _ => p,
        }
    }

    fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }

    fn build(self) -> Statement {
        Statement::from_sql_and_values(self.backend, self.text, self.values)
    }
}

/// The `data` column as JSON text.
fn data_column(backend: DatabaseBackend) -> &'static str {
    match backend {
        DatabaseBackend::Postgres => "data::text AS data",
        _ => "data",
    }
}

impl Store {
    pub fn new(db: Db, clock: Clock, limits: Limits, events: Events) -> Self {
        Store {
            db,
            clock,
            limits,
            events,
        }
    }

    /// The change events of this node, for subscriptions.
    pub fn events(&self) -> &Events {
        &self.events
    }

    fn publish_put(&self, tenant: TenantId, object: &Object) {
        self.events.publish(vec![put_event(tenant, object)]);
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
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
            data: Data::parse(data, self.limits.max_value_bytes)?,
            ttl: Ttl::parse_opt(ttl)?,
        })
    }

    /// Refuses batches over the configured item count.
    pub fn check_batch_len(&self, len: usize) -> Result<(), ApiError> {
        if len as u64 > self.limits.max_batch_items {
            Err(ApiError::PayloadTooLarge(format!(
                "a batch may hold at most {} items, got {len}",
                self.limits.max_batch_items
            )))
        } else {
            Ok(())
        }
    }

    fn backend(&self) -> DatabaseBackend {
        self.db.backend
    }

    fn select(&self, sql: &mut Sql, tenant: TenantId, now: i64) {
        let data = data_column(self.backend());
        let t = sql.arg(tenant.get());
        let n = sql.arg(now);
        sql.push(&format!(
            "SELECT {COLUMNS}, {data} FROM object WHERE tenant_id = {t} \
             AND (expires_at IS NULL OR expires_at > {n})"
        ));
    }

    fn object_from_row(&self, row: &QueryResult, now: i64) -> Result<Object, DbErr> {
        let expires_at: Option<i64> = row.try_get("", "expires_at")?;
        Ok(Object {
            key: row.try_get("", "key")?,
            data: row.try_get("", "data")?,
            version: row.try_get("", "version")?,
            ttl: expires_at.map(|e| seconds_left(e, now)),
            expires_at,
            created_at: row.try_get("", "created_at")?,
            updated_at: row.try_get("", "updated_at")?,
        })
    }

    /// The live value under `key`, if any.
    pub async fn get(&self, tenant: TenantId, key: &Key) -> Result<Option<Object>, ApiError> {
        let now = self.clock.now_ms();
        let mut sql = Sql::new(self.backend());
        self.select(&mut sql, tenant, now);
        let k = sql.arg(key.as_str());
        sql.push(&format!(r#" AND "key" = {k}"#));
        let row = self.db.read.query_one_raw(sql.build()).await?;
        Ok(row.map(|r| self.object_from_row(&r, now)).transpose()?)
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
        let now = self.clock.now_ms();
        let mut sql = Sql::new(self.backend());
        self.select(&mut sql, tenant, now);
        let placeholders: Vec<String> = keys.iter().map(|k| sql.arg(k.as_str())).collect();
        sql.push(&format!(r#" AND "key" IN ({})"#, placeholders.join(", ")));
        let rows = self.db.read.query_all_raw(sql.build()).await?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let o = self.object_from_row(row, now)?;
            found.insert(o.key.clone(), o);
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
        let now = self.clock.now_ms();
        let mut sql = Sql::new(self.backend());
        self.select(&mut sql, tenant, now);
        let lower = sql.arg(prefix.as_str());
        sql.push(&format!(r#" AND "key" >= {lower}"#));
        if let Some(upper) = prefix.upper_bound() {
            let u = sql.arg(upper);
            sql.push(&format!(r#" AND "key" < {u}"#));
        }
        if let Some(c) = cursor {
            let a = sql.arg(c.key());
            sql.push(&format!(r#" AND "key" > {a}"#));
        }
        let fetch = sql.arg(i64::from(limit.get()) + 1);
        sql.push(&format!(r#" ORDER BY "key" LIMIT {fetch}"#));
        let rows = self.db.read.query_all_raw(sql.build()).await?;
        let mut objects = rows
            .iter()
            .map(|r| self.object_from_row(r, now))
            .collect::<Result<Vec<_>, _>>()?;
        let next = if objects.len() > limit.get() as usize {
            objects.truncate(limit.get() as usize);
            objects.last().map(|o| Cursor::after(&o.key))
        } else {
            None
        };
        Ok(Page { objects, next })
    }

    /// Creates a value; `ALREADY_EXISTS` if a live one is stored under the key.
    /// An expired value under the key is replaced as if it were absent.
    pub async fn create(&self, writer: Writer<'_>, item: &Item) -> Result<Object, ApiError> {
        let now = self.clock.now_ms();
        let object = create_in(&self.db.write, writer.tenant(), item, now).await?;
        self.publish_put(writer.tenant(), &object);
        Ok(object)
    }

    /// Writes a value as `expect` allows: create-or-replace, replace only
    /// (optionally at a version), or create only.
    pub async fn put(
        &self,
        writer: Writer<'_>,
        item: &Item,
        expect: Expect,
    ) -> Result<Put, ApiError> {
        let now = self.clock.now_ms();
        let put = put_in(&self.db.write, writer.tenant(), item, expect, now).await?;
        self.publish_put(writer.tenant(), &put.object);
        Ok(put)
    }

    /// Deletes the live value under `key` (at `expected` version, if given).
    pub async fn delete(
        &self,
        writer: Writer<'_>,
        key: &Key,
        expected: Option<i64>,
    ) -> Result<(), ApiError> {
        let now = self.clock.now_ms();
        let version = delete_in(&self.db.write, writer.tenant(), key, expected, now).await?;
        self.events
            .publish(vec![delete_event(writer.tenant(), key, version)]);
        Ok(())
    }

    /// Creates several values in one transaction, with one result per item in
    /// order. Items that failed to parse arrive as `Err` and keep their error.
    pub async fn batch_create(
        &self,
        writer: Writer<'_>,
        items: Vec<BatchInput<Item>>,
        atomicity: Atomicity,
    ) -> Result<Vec<Result<Object, ApiError>>, ApiError> {
        let tenant = writer.tenant();
        let results = self
            .batch(writer, items, atomicity, |txn, tenant, item, now| {
                Box::pin(create_in(txn, tenant, item, now))
            })
            .await?;
        self.events.publish(
            results
                .iter()
                .flatten()
                .map(|o| put_event(tenant, o))
                .collect(),
        );
        Ok(results)
    }

    /// Writes several values in one transaction, each as its `Expect`
    /// allows, with one result per item.
    pub async fn batch_put(
        &self,
        writer: Writer<'_>,
        items: Vec<BatchInput<(Item, Expect)>>,
        atomicity: Atomicity,
    ) -> Result<Vec<Result<Put, ApiError>>, ApiError> {
        let tenant = writer.tenant();
        let results = self
            .batch(
                writer,
                items,
                atomicity,
                |txn, tenant, (item, expect), now| {
                    Box::pin(put_in(txn, tenant, item, *expect, now))
                },
            )
            .await?;
        self.events.publish(
            results
                .iter()
                .flatten()
                .map(|p| put_event(tenant, &p.object))
                .collect(),
        );
        Ok(results)
    }

    /// Deletes several keys in one transaction; `NOT_FOUND` for keys with no live value.
    pub async fn batch_delete(
        &self,
        writer: Writer<'_>,
        keys: Vec<BatchInput<Key>>,
        atomicity: Atomicity,
    ) -> Result<Vec<Result<(), ApiError>>, ApiError> {
        let tenant = writer.tenant();
        let parsed: Vec<Option<Key>> = keys.iter().map(|(_, k)| k.as_ref().ok().cloned()).collect();
        let results = self
            .batch(writer, keys, atomicity, |txn, tenant, key, now| {
                Box::pin(delete_in(txn, tenant, key, None, now))
            })
            .await?;
        self.events.publish(
            results
                .iter()
                .zip(&parsed)
                .filter_map(|(r, k)| match (r, k) {
                    (Ok(version), Some(key)) => Some(delete_event(tenant, key, *version)),
                    _ => None,
                })
                .collect(),
        );
        Ok(results.into_iter().map(|r| r.map(|_| ())).collect())
    }

    async fn batch<I, O, F>(
        &self,
        writer: Writer<'_>,
        items: Vec<BatchInput<I>>,
        atomicity: Atomicity,
        op: F,
    ) -> Result<Vec<Result<O, ApiError>>, ApiError>
    where
        F: for<'a> Fn(&'a DatabaseTransaction, TenantId, &'a I, i64) -> BatchOp<'a, O>,
    {
        self.check_batch_len(items.len())?;
        let tenant = writer.tenant();
        let len = items.len();
        let now = self.clock.now_ms();
        let txn = self.db.write.begin().await?;
        let mut results = Vec::with_capacity(len);
        for (index, (key, parsed)) in items.into_iter().enumerate() {
            let outcome = match parsed {
                Ok(item) => op(&txn, tenant, &item, now).await,
                Err(e) => Err(e),
            };
            match outcome {
                Err(e @ ApiError::Internal(_)) => return Err(e),
                Err(e) if atomicity == Atomicity::Atomic => {
                    txn.rollback().await?;
                    return Err(ApiError::BatchItem {
                        index,
                        key,
                        source: Box::new(e),
                    });
                }
                other => results.push(other),
            }
        }
        txn.commit().await?;
        Ok(results)
    }

    /// Deletes up to `limit` expired rows of any tenant in one statement and
    /// publishes an `Expire` event for each. Returns how many were deleted.
    /// Safe to run on several nodes at once.
    pub async fn sweep(&self, limit: u32) -> Result<usize, ApiError> {
        let now = self.clock.now_ms();
        let mut sql = Sql::new(self.backend());
        let n1 = sql.arg(now);
        let l = sql.arg(i64::from(limit));
        let lock = match self.backend() {
            DatabaseBackend::Postgres => " FOR UPDATE SKIP LOCKED",
            _ => "",
        };
        sql.push(&format!(
            r#"DELETE FROM object WHERE (tenant_id, "key") IN (
                 SELECT tenant_id, "key" FROM object
                 WHERE expires_at IS NOT NULL AND expires_at <= {n1}
                 ORDER BY expires_at LIMIT {l}{lock})
               AND expires_at IS NOT NULL AND expires_at <= {n1}
               RETURNING tenant_id, "key", version"#
        ));
        let rows = self.db.write.query_all_raw(sql.build()).await?;
        let events = rows
            .iter()
            .map(|r| {
                Ok(Event {
                    tenant: r.try_get("", "tenant_id")?,
                    kind: EventKind::Expire,
                    key: r.try_get("", "key")?,
                    version: r.try_get("", "version")?,
                    object: None,
                })
            })
            .collect::<Result<Vec<_>, DbErr>>()?;
        let n = events.len();
        self.events.publish(events);
        Ok(n)
    }
}

fn put_event(tenant: TenantId, object: &Object) -> Event {
    Event {
        tenant: tenant.get(),
        kind: EventKind::Put,
        key: object.key.clone(),
        version: object.version,
        object: Some(object.clone()),
    }
}

fn delete_event(tenant: TenantId, key: &Key, version: i64) -> Event {
    Event {
        tenant: tenant.get(),
        kind: EventKind::Delete,
        key: key.as_str().to_owned(),
        version,
        object: None,
    }
}

/// Seconds left until `expires_at`, rounded up, as clients see `ttl`.
pub(crate) fn seconds_left(expires_at: i64, now: i64) -> i64 {
    let ms = (expires_at - now).max(0);
    (ms + 999) / 1000
}

fn expires_at(item: &Item, now: i64) -> Option<i64> {
    item.ttl.map(|t| now + t.millis())
}

fn written(item: &Item, row: &QueryResult, now: i64) -> Result<Object, DbErr> {
    let expires_at = expires_at(item, now);
    Ok(Object {
        key: item.key.as_str().to_owned(),
        data: item.data.as_str().to_owned(),
        version: row.try_get("", "version")?,
        ttl: expires_at.map(|e| seconds_left(e, now)),
        expires_at,
        created_at: row.try_get("", "created_at")?,
        updated_at: now,
    })
}

fn already_exists() -> ApiError {
    ApiError::AlreadyExists("a value is already stored under this key".into())
}

fn version_mismatch(expected: i64) -> ApiError {
    ApiError::VersionMismatch(format!(
        "the value is no longer at version {expected}; read it again and retry"
    ))
}

/// `INSERT` of a new row; `on_conflict` decides what happens to an existing one.
fn insert(sql: &mut Sql, tenant: TenantId, item: &Item, now: i64) -> String {
    let t = sql.arg(tenant.get());
    let k = sql.arg(item.key.as_str());
    let d = sql.json_arg(&item.data);
    let e = sql.arg(expires_at(item, now));
    let n = sql.arg(now);
    format!(
        r#"INSERT INTO object (tenant_id, "key", data, version, expires_at, created_at, updated_at)
           VALUES ({t}, {k}, {d}, 1, {e}, {n}, {n})
           ON CONFLICT (tenant_id, "key") DO UPDATE SET
             data = excluded.data, expires_at = excluded.expires_at, updated_at = excluded.updated_at,"#
    )
}

async fn create_in<C: ConnectionTrait>(
    conn: &C,
    tenant: TenantId,
    item: &Item,
    now: i64,
) -> Result<Object, ApiError> {
    let mut sql = Sql::new(conn.get_database_backend());
    let head = insert(&mut sql, tenant, item, now);
    let n = sql.arg(now);
    sql.push(&head).push(&format!(
        r#" version = 1, created_at = excluded.created_at
           WHERE object.expires_at IS NOT NULL AND object.expires_at <= {n}
           RETURNING version, created_at"#
    ));
    match conn.query_one_raw(sql.build()).await? {
        Some(row) => Ok(written(item, &row, now)?),
        None => Err(already_exists()),
    }
}

async fn put_in<C: ConnectionTrait>(
    conn: &C,
    tenant: TenantId,
    item: &Item,
    expect: Expect,
    now: i64,
) -> Result<Put, ApiError> {
    let backend = conn.get_database_backend();
    let expected_version = match expect {
        Expect::Absent => {
            return create_in(conn, tenant, item, now).await.map(|object| Put {
                object,
                created: true,
            });
        }
        Expect::Any => {
            let mut sql = Sql::new(backend);
            let head = insert(&mut sql, tenant, item, now);
            let n = sql.arg(now);
            let expired = format!("object.expires_at IS NOT NULL AND object.expires_at <= {n}");
            sql.push(&head).push(&format!(
                r#" version = CASE WHEN {expired} THEN 1 ELSE object.version + 1 END,
                   created_at = CASE WHEN {expired} THEN excluded.created_at ELSE object.created_at END
                   RETURNING version, created_at"#
            ));
            let row = conn
                .query_one_raw(sql.build())
                .await?
                .ok_or_else(|| ApiError::internal(anyhow::anyhow!("upsert returned no row")))?;
            let object = written(item, &row, now)?;
            let created = object.version == 1;
            return Ok(Put { object, created });
        }
        Expect::Exists => None,
        Expect::Version(v) => Some(v),
    };
    let mut sql = Sql::new(backend);
    let d = sql.json_arg(&item.data);
    let e = sql.arg(expires_at(item, now));
    let n = sql.arg(now);
    let t = sql.arg(tenant.get());
    let k = sql.arg(item.key.as_str());
    sql.push(&format!(
        r#"UPDATE object SET data = {d}, expires_at = {e}, updated_at = {n}, version = version + 1
           WHERE tenant_id = {t} AND "key" = {k} AND (expires_at IS NULL OR expires_at > {n})"#
    ));
    if let Some(v) = expected_version {
        let v = sql.arg(v);
        sql.push(&format!(" AND version = {v}"));
    }
    sql.push(" RETURNING version, created_at");
    match conn.query_one_raw(sql.build()).await? {
        Some(row) => Ok(Put {
            object: written(item, &row, now)?,
            created: false,
        }),
        None => Err(missing_or_moved(conn, tenant, &item.key, expected_version, now).await),
    }
}

async fn delete_in<C: ConnectionTrait>(
    conn: &C,
    tenant: TenantId,
    key: &Key,
    expected: Option<i64>,
    now: i64,
) -> Result<i64, ApiError> {
    let mut sql = Sql::new(conn.get_database_backend());
    let t = sql.arg(tenant.get());
    let k = sql.arg(key.as_str());
    let n = sql.arg(now);
    sql.push(&format!(
        r#"DELETE FROM object WHERE tenant_id = {t} AND "key" = {k}
           AND (expires_at IS NULL OR expires_at > {n})"#
    ));
    if let Some(v) = expected {
        let v = sql.arg(v);
        sql.push(&format!(" AND version = {v}"));
    }
    sql.push(" RETURNING version");
    match conn.query_one_raw(sql.build()).await? {
        Some(row) => Ok(row.try_get("", "version")?),
        None => Err(missing_or_moved(conn, tenant, key, expected, now).await),
    }
}

/// Why a conditional write matched no row: no live value (`NOT_FOUND`) or a
/// live value at another version (`VERSION_MISMATCH`).
async fn missing_or_moved<C: ConnectionTrait>(
    conn: &C,
    tenant: TenantId,
    key: &Key,
    expected: Option<i64>,
    now: i64,
) -> ApiError {
    let Some(expected) = expected else {
        return ApiError::not_found();
    };
    let mut sql = Sql::new(conn.get_database_backend());
    let t = sql.arg(tenant.get());
    let k = sql.arg(key.as_str());
    let n = sql.arg(now);
    sql.push(&format!(
        r#"SELECT version FROM object WHERE tenant_id = {t} AND "key" = {k}
           AND (expires_at IS NULL OR expires_at > {n})"#
    ));
    match conn.query_one_raw(sql.build()).await {
        Ok(Some(_)) => version_mismatch(expected),
        Ok(None) => ApiError::not_found(),
        Err(e) => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::seconds_left;

    #[test]
    fn ttl_left_rounds_up_to_whole_seconds() {
        assert_eq!(seconds_left(10_000, 10_000), 0);
        assert_eq!(seconds_left(10_001, 10_000), 1);
        assert_eq!(seconds_left(11_000, 10_000), 1);
        assert_eq!(seconds_left(11_001, 10_000), 2);
        assert_eq!(seconds_left(5_000, 10_000), 0);
    }
}
