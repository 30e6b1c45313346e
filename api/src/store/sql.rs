//! The SQL of the store, written once for both backends: `$n` parameters,
//! `ON CONFLICT` and `RETURNING` work on SQLite and PostgreSQL alike.

use std::path::Path;
use std::sync::LazyLock;

use sea_orm::prelude::async_trait::async_trait;
use sea_orm::{ConnectionTrait, DatabaseBackend, DbErr, QueryResult, Statement, Value};

use super::events::EventKind;
use super::quota::Usage;
use super::types::{Change, Data, Expect, Key, Prefix, Watch};
use super::{Item, Object};
use crate::auth::TenantId;
use crate::db::Db;
use crate::error::ApiError;

/// Where the write path's statements run: sqlx's connections and
/// transactions (via sea-orm), or the SQLite committer's own connection
/// (`sqlite::SqliteWriter`).
#[async_trait]
pub(super) trait WriteConn: Send + Sync {
    type Row: WriteRow + Send;

    fn backend(&self) -> DatabaseBackend;

    /// Runs a statement to its end and returns its rows.
    async fn query(&self, stmt: Statement) -> Result<Vec<Self::Row>, DbErr>;

    /// Runs SQL without parameters (transaction control).
    async fn execute(&self, sql: &str) -> Result<(), DbErr>;
}

/// The columns the write path reads from what its statements return.
pub(super) trait WriteRow {
    fn int(&self, col: &str) -> Result<i64, DbErr>;
    fn text(&self, col: &str) -> Result<String, DbErr>;
}

#[async_trait]
impl<C: ConnectionTrait + Send + Sync> WriteConn for C {
    type Row = QueryResult;

    fn backend(&self) -> DatabaseBackend {
        self.get_database_backend()
    }

    async fn query(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.query_all_raw(stmt).await
    }

    async fn execute(&self, sql: &str) -> Result<(), DbErr> {
        self.execute_unprepared(sql).await.map(|_| ())
    }
}

impl WriteRow for QueryResult {
    fn int(&self, col: &str) -> Result<i64, DbErr> {
        self.try_get("", col)
    }

    fn text(&self, col: &str) -> Result<String, DbErr> {
        self.try_get("", col)
    }
}

pub(super) const COLUMNS: &str = r#""key", version, revision, expires_at, created_at, updated_at"#;

/// A statement under construction: text with `$n` placeholders and its values.
pub(super) struct Sql {
    backend: DatabaseBackend,
    text: String,
    values: Vec<Value>,
}

impl Sql {
    pub(super) fn new(backend: DatabaseBackend) -> Self {
        Sql {
            backend,
            text: String::new(),
            values: Vec::new(),
        }
    }

    /// Binds a value and returns its placeholder.
    pub(super) fn arg(&mut self, v: impl Into<Value>) -> String {
        self.values.push(v.into());
        format!("${}", self.values.len())
    }

    /// Binds a value for the next placeholder of the text: `?` on SQLite,
    /// `$n` on PostgreSQL. For statements with many parameters: SQLite binds
    /// anonymous `?` in constant time but looks up each named one (`$n`)
    /// through a list. Placeholders made by `next` must appear in the text in
    /// the order they were made, and a statement must not mix `next` and `arg`.
    pub(super) fn next(&mut self, v: impl Into<Value>) -> String {
        match self.backend {
            DatabaseBackend::Postgres => self.arg(v),
            _ => {
                self.values.push(v.into());
                "?".to_owned()
            }
        }
    }

    /// Binds each value, and returns their placeholders as a list for `IN (...)`.
    pub(super) fn list<V: Into<Value> + Copy>(&mut self, values: &[V]) -> String {
        let placeholders: Vec<String> = values.iter().map(|v| self.arg(*v)).collect();
        placeholders.join(", ")
    }

    /// Binds JSON text as the `data` column's type (JSONB on PostgreSQL).
    fn json_arg(&mut self, data: &Data) -> String {
        let p = self.arg(data.as_str());
        json_cast(self.backend, p)
    }

    pub(super) fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }

    pub(super) fn build(self) -> Statement {
        Statement::from_sql_and_values(self.backend, self.text, self.values)
    }

    /// `SELECT` of the live objects of `tenant`; more conditions may follow.
    pub(super) fn select_live(backend: DatabaseBackend, tenant: TenantId, now: i64) -> Sql {
        let mut sql = Sql::new(backend);
        let data = data_as_text(backend);
        let t = sql.next(tenant.get());
        let n = sql.next(now);
        sql.push(&format!(
            "SELECT {COLUMNS}, {data} FROM object WHERE tenant_id = {t} \
             AND {}",
            live(&n)
        ));
        sql
    }
}

/// The `data` column as JSON text (JSONB is cast on PostgreSQL).
fn data_as_text(backend: DatabaseBackend) -> &'static str {
    match backend {
        DatabaseBackend::Postgres => "data::text AS data",
        _ => "data",
    }
}

fn json_cast(backend: DatabaseBackend, placeholder: String) -> String {
    match backend {
        DatabaseBackend::Postgres => format!("{placeholder}::jsonb"),
        _ => placeholder,
    }
}

/// The condition that a row of `object` is live at `now` (a placeholder).
pub(crate) fn live(now: &str) -> String {
    format!("(expires_at IS NULL OR expires_at > {now})")
}

/// The condition that a row has expired at `now` (a placeholder), for
/// `table.` (`"object."` in `ON CONFLICT`, else `""`): the negation of [`live`].
pub(super) fn expired(table: &str, now: &str) -> String {
    format!("{table}expires_at IS NOT NULL AND {table}expires_at <= {now}")
}

/// An [`Object`] from a row of [`COLUMNS`] plus `data`, read with the
/// driver's by-name getter (`row.try_get` on sqlx, `row.get` on rusqlite).
macro_rules! object_from_columns {
    ($row:ident . $get:ident, $now:expr) => {
        object_from_parts(
            $row.$get("key")?,
            $row.$get("data")?,
            $row.$get("version")?,
            $row.$get("revision")?,
            $row.$get("expires_at")?,
            $row.$get("created_at")?,
            $row.$get("updated_at")?,
            $now,
        )
    };
}

/// A failure of a statement run on sqlx directly, as sea-orm reports one
/// (so that `write::is_transient` and the commit checks read its code).
fn sqlx_failure(e: sea_orm::sqlx::Error) -> ApiError {
    let err = DbErr::Query(sea_orm::RuntimeErr::SqlxError(e.into()));
    crate::metrics::db_error(&err);
    ApiError::internal(anyhow::Error::new(err))
}

/// The live objects of `tenant` under `keys` (at most
/// [`max_rows_per_statement`]), in no particular order.
pub(super) async fn select_live_keys(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    keys: &[&Key],
    now: i64,
) -> Result<Vec<Object>, ApiError> {
    let mut sql = Sql::select_live(conn.get_database_backend(), tenant, now);
    let placeholders: Vec<String> = keys.iter().map(|k| sql.next(k.as_str())).collect();
    sql.push(&format!(r#" AND "key" IN ({})"#, placeholders.join(", ")));
    rows_to_objects(conn.query_all_raw(sql.build()).await?, now)
}

/// At most `fetch` live objects of `tenant` whose keys start with `prefix`,
/// in byte order of keys, after the key `after` if given, cut short (but
/// never before the first) where their sizes (see the quotas migration) pass
/// `max_bytes`; and how many there were before that cut. The cut is made on
/// keys and sizes alone, so the values of the objects left out are never
/// read.
pub(super) async fn list_live(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    prefix: &Prefix,
    after: Option<&str>,
    fetch: u32,
    max_bytes: usize,
    now: i64,
) -> Result<(Vec<Object>, usize), ApiError> {
    let backend = conn.get_database_backend();
    let mut sql = Sql::new(backend);
    let t = sql.next(tenant.get());
    let n = sql.next(now);
    let lower = sql.next(prefix.as_str());
    sql.push(&format!(
        r#"WITH page AS (
             SELECT "key", sum(size) OVER (ORDER BY "key") - size AS before FROM object
             WHERE tenant_id = {t} AND {} AND "key" >= {lower}"#,
        live(&n)
    ));
    if let Some(upper) = prefix.upper_bound() {
        let u = sql.next(upper);
        sql.push(&format!(r#" AND "key" < {u}"#));
    }
    if let Some(after) = after {
        let a = sql.next(after);
        sql.push(&format!(r#" AND "key" > {a}"#));
    }
    let f = sql.next(i64::from(fetch));
    let t = sql.next(tenant.get());
    let b = sql.next(i64::try_from(max_bytes).unwrap_or(i64::MAX));
    sql.push(&format!(
        r#" ORDER BY "key" LIMIT {f})
           SELECT {COLUMNS}, {}, (SELECT count(*) FROM page) AS fetched FROM object
           WHERE tenant_id = {t} AND "key" IN (SELECT "key" FROM page WHERE before < {b})
           ORDER BY "key""#,
        data_as_text(backend)
    ));
    let rows = conn.query_all_raw(sql.build()).await?;
    let fetched = match rows.first() {
        Some(row) => usize::try_from(row.try_get::<i64>("", "fetched")?).unwrap_or(usize::MAX),
        None => 0,
    };
    Ok((rows_to_objects(rows, now)?, fetched))
}

fn rows_to_objects(rows: Vec<QueryResult>, now: i64) -> Result<Vec<Object>, ApiError> {
    Ok(rows
        .iter()
        .map(|r| object_from_row(r, now))
        .collect::<Result<Vec<_>, DbErr>>()?)
}

/// The live objects of `tenant` under `keys` (distinct), in one statement,
/// straight on sqlx: the hot path of point reads on PostgreSQL (see `read`).
pub(super) async fn select_keys_postgres(
    db: &Db,
    tenant: TenantId,
    keys: &[&str],
    now: i64,
) -> Result<Vec<Object>, ApiError> {
    use sea_orm::sqlx::{self, AssertSqlSafe, Row};
    // Built once: this runs for every batch of GETs.
    static STATEMENT: LazyLock<String> = LazyLock::new(|| {
        // One index probe per key whatever the statistics say: a subquery
        // with LIMIT is never flattened into a join, so the planner cannot
        // trade the probes for a scan of the tenant.
        format!(
            r#"SELECT o.* FROM unnest($2::text[]) AS wanted(k), LATERAL (
                 SELECT {COLUMNS}, data::text AS data FROM object
                 WHERE tenant_id = $1 AND "key" = wanted.k AND {} LIMIT 1) AS o"#,
            live("$3")
        )
    });
    let rows = sqlx::query(AssertSqlSafe(STATEMENT.as_str()))
        .bind(tenant.get())
        .bind(keys)
        .bind(now)
        .fetch_all(db.read.get_postgres_connection_pool())
        .await
        .map_err(sqlx_failure)?;
    rows.iter()
        .map(|r| Ok(object_from_columns!(r.try_get, now)))
        .collect::<Result<Vec<Object>, sqlx::Error>>()
        .map_err(sqlx_failure)
}

/// A connection of one of the SQLite reader threads (see `read`): its own
/// connection to the database file, outside sqlx's pool, so that a batch of
/// GETs costs no hop to a pool's worker thread. It only reads; in WAL mode
/// each statement sees every write committed before it began.
/// The first `mmap_bytes` of the file are read through a memory map.
pub(super) fn open_sqlite_reader(
    path: &Path,
    mmap_bytes: u64,
) -> rusqlite::Result<rusqlite::Connection> {
    let conn = open_sqlite(path)?;
    conn.pragma_update(None, "query_only", true)?;
    conn.pragma_update(
        None,
        "mmap_size",
        i64::try_from(mmap_bytes).unwrap_or(i64::MAX),
    )?;
    Ok(conn)
}

/// A `rusqlite` connection to an existing database file, with the busy
/// timeout of sqlx's connections (see `db`).
pub(super) fn open_sqlite(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

/// [`select_keys_postgres`] on SQLite, on a reader thread's connection.
pub(super) fn select_keys_sqlite(
    conn: &rusqlite::Connection,
    tenant: TenantId,
    keys: &[&str],
    now: i64,
) -> Result<Vec<Object>, ApiError> {
    static STATEMENT: LazyLock<String> = LazyLock::new(|| {
        format!(
            r#"SELECT {COLUMNS}, data FROM object
               WHERE tenant_id = ?1 AND "key" IN (SELECT value FROM json_each(?2)) AND {}"#,
            live("?3")
        )
    });
    let fail = |e: rusqlite::Error| ApiError::internal(anyhow::Error::new(e));
    let keys =
        serde_json::to_string(keys).map_err(|e| ApiError::internal(anyhow::Error::new(e)))?;
    let mut statement = conn.prepare_cached(&STATEMENT).map_err(fail)?;
    let rows = statement
        .query_map(rusqlite::params![tenant.get(), keys, now], |r| {
            Ok(object_from_columns!(r.get, now))
        })
        .map_err(fail)?;
    rows.collect::<Result<Vec<Object>, _>>().map_err(fail)
}

/// The live object of `tenant` under `key`, on a SQLite connection of the
/// calling thread (see `read`): one index probe.
pub(super) fn select_key_sqlite(
    conn: &rusqlite::Connection,
    tenant: TenantId,
    key: &str,
    now: i64,
) -> rusqlite::Result<Option<Object>> {
    use rusqlite::OptionalExtension;
    static STATEMENT: LazyLock<String> = LazyLock::new(|| {
        format!(
            r#"SELECT {COLUMNS}, data FROM object WHERE tenant_id = ?1 AND "key" = ?2 AND {}"#,
            live("?3")
        )
    });
    conn.prepare_cached(&STATEMENT)?
        .query_row(rusqlite::params![tenant.get(), key, now], |r| {
            Ok(object_from_columns!(r.get, now))
        })
        .optional()
}

/// One argument per column of [`COLUMNS`] and `data`, plus the time.
#[allow(clippy::too_many_arguments)]
fn object_from_parts(
    key: String,
    data: String,
    version: i64,
    revision: i64,
    expires_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
    now: i64,
) -> Object {
    Object {
        key,
        data: crate::input::canonical_numbers(data).into(),
        version,
        revision,
        ttl: expires_at.map(|e| seconds_left(e, now)),
        expires_at,
        created_at,
        updated_at,
    }
}

/// Seconds left until `expires_at`, rounded up, as clients see `ttl`.
pub(crate) fn seconds_left(expires_at: i64, now: i64) -> i64 {
    let ms = (expires_at - now).max(0);
    (ms + 999) / 1000
}

pub(super) fn object_from_row(row: &QueryResult, now: i64) -> Result<Object, DbErr> {
    Ok(object_from_parts(
        row.try_get("", "key")?,
        row.try_get("", "data")?,
        row.try_get("", "version")?,
        row.try_get("", "revision")?,
        row.try_get("", "expires_at")?,
        row.try_get("", "created_at")?,
        row.try_get("", "updated_at")?,
        now,
    ))
}

fn expires_at(item: &Item, now: i64) -> Option<i64> {
    item.ttl.map(|t| now + t.millis())
}

fn written(item: &Item, row: &impl WriteRow, revision: i64, now: i64) -> Result<Object, DbErr> {
    Ok(object_written(
        item,
        row.int("version")?,
        revision,
        row.int("created_at")?,
        now,
    ))
}

fn object_written(item: &Item, version: i64, revision: i64, created_at: i64, now: i64) -> Object {
    let expires_at = expires_at(item, now);
    Object {
        key: item.key.as_str().to_owned(),
        data: item.data.as_str().into(),
        version,
        revision,
        ttl: expires_at.map(|e| seconds_left(e, now)),
        expires_at,
        created_at,
        updated_at: now,
    }
}

fn already_exists() -> ApiError {
    ApiError::AlreadyExists("a value is already stored under this key".into())
}

fn version_mismatch(expected: i64) -> ApiError {
    ApiError::VersionMismatch(format!(
        "the value is no longer at version {expected}; read it again and retry"
    ))
}

/// Raises the version of rows just created (at version 1, or over an
/// expired value) above every version their key had before: above its
/// tombstone's (it was deleted, or expired and swept), and above the
/// tenant's compacted revision. A version is never more than the revision
/// that wrote it, and compaction drops only tombstones of revisions it has
/// passed, so every version a key without a tombstone ever had is at most
/// that revision; with nothing compacted and no tombstone a new key stays
/// at version 1. A version therefore never comes back after a delete or an expiry, and
/// an `If-Match` or `expectedVersion` taken before one never matches the
/// value created after it (no ABA). Only created rows pay for this, and
/// only those with a tombstone or in a compacted tenant are written again;
/// in a tenant with no tombstone that was never compacted, one probe of the
/// tenant is all.
/// Returns the versions that changed.
pub(super) async fn continue_versions<C: WriteConn>(
    conn: &C,
    created: &[(i64, &str)],
) -> Result<std::collections::HashMap<(i64, String), i64>, ApiError> {
    let backend = conn.backend();
    let greatest = match backend {
        DatabaseBackend::Postgres => "GREATEST",
        _ => "max",
    };
    let mut raised = std::collections::HashMap::new();
    // Most tenants have neither: one probe spares a lookup per created row.
    let tenants: std::collections::BTreeSet<i64> = created.iter().map(|(t, _)| *t).collect();
    if tenants.is_empty() {
        return Ok(raised);
    }
    let mut sql = Sql::new(backend);
    let ids = sql.list(&tenants.into_iter().collect::<Vec<_>>());
    sql.push(&format!(
        "SELECT 1 AS due FROM tenant WHERE id IN ({ids}) AND (compacted_revision > 0
           OR EXISTS (SELECT 1 FROM object_tombstone t WHERE t.tenant_id = tenant.id))
         LIMIT 1"
    ));
    if conn.query(sql.build()).await?.is_empty() {
        return Ok(raised);
    }
    for chunk in created.chunks(max_rows_per_statement(backend)) {
        let mut sql = Sql::new(backend);
        let rows: Vec<String> = chunk
            .iter()
            .map(|(t, k)| {
                let (t, k) = (sql.next(*t), sql.next(*k));
                format!("({t}, {k})")
            })
            .collect();
        let tomb = r#"FROM object_tombstone t
                      WHERE t.tenant_id = object.tenant_id AND t."key" = object."key""#;
        let floor = "(SELECT compacted_revision FROM tenant WHERE tenant.id = object.tenant_id)";
        sql.push(&format!(
            r#"UPDATE object SET version = {greatest}(version,
                 COALESCE((SELECT t.version {tomb}), 0) + 1, {floor} + 1)
               WHERE (tenant_id, "key") IN (VALUES {})
                 AND (EXISTS (SELECT 1 {tomb}) OR {floor} > 0)
               RETURNING tenant_id, "key", version"#,
            rows.join(", ")
        ));
        for row in conn.query(sql.build()).await? {
            raised.insert(
                (row.int("tenant_id")?, row.text("key")?),
                row.int("version")?,
            );
        }
    }
    Ok(raised)
}

/// Records that keys are gone at a version, as of a revision (see
/// [`continue_versions`]): `(tenant, key, version, revision)`.
pub(super) async fn write_tombstones<C: WriteConn>(
    conn: &C,
    gone: &[(i64, &str, i64, i64)],
) -> Result<(), ApiError> {
    let backend = conn.backend();
    for chunk in gone.chunks(max_rows_per_statement(backend)) {
        let mut sql = Sql::new(backend);
        let values: Vec<String> = chunk
            .iter()
            .map(|(t, k, v, r)| {
                let (t, k, v, r) = (sql.next(*t), sql.next(*k), sql.next(*v), sql.next(*r));
                format!("({t}, {k}, {v}, {r})")
            })
            .collect();
        sql.push(&format!(
            r#"INSERT INTO object_tombstone (tenant_id, "key", version, revision) VALUES {}
               ON CONFLICT (tenant_id, "key") DO UPDATE SET
                 version = excluded.version, revision = excluded.revision"#,
            values.join(", ")
        ));
        conn.query(sql.build()).await?;
    }
    Ok(())
}

/// What a replacing write sets besides the data (`DO UPDATE SET`): the next
/// version and, over an expired value (`expired_1`, `expired_2`: its
/// condition), a new creation.
fn replace_assignments(expired_1: &str, expired_2: &str) -> String {
    format!(
        "version = object.version + 1, \
         created_at = CASE WHEN {expired_1} THEN excluded.created_at ELSE object.created_at END, \
         created_revision = CASE WHEN {expired_2} THEN excluded.created_revision \
                                 ELSE object.created_revision END"
    )
}

/// What a creation over an expired value sets besides the data.
const RECREATE_ASSIGNMENTS: &str = "version = object.version + 1, \
     created_at = excluded.created_at, created_revision = excluded.created_revision";

/// The columns an insert names and the upsert's common assignments.
const INSERT_HEAD: &str = r#"INSERT INTO object
    (tenant_id, "key", data, size, version, revision, created_revision, expires_at, created_at,
     updated_at)"#;
const UPSERT_COMMON: &str = r#"ON CONFLICT (tenant_id, "key") DO UPDATE SET
    data = excluded.data, size = excluded.size, revision = excluded.revision,
    expires_at = excluded.expires_at,
    updated_at = excluded.updated_at,"#;

/// `INSERT` of a new row, up to `DO UPDATE SET` and its common assignments.
fn insert(sql: &mut Sql, tenant: TenantId, item: &Item, revision: i64, now: i64) -> String {
    let t = sql.arg(tenant.get());
    let k = sql.arg(item.key.as_str());
    let d = sql.json_arg(&item.data);
    let s = sql.arg(item.size());
    let r = sql.arg(revision);
    let e = sql.arg(expires_at(item, now));
    let n = sql.arg(now);
    format!("{INSERT_HEAD} VALUES ({t}, {k}, {d}, {s}, 1, {r}, {r}, {e}, {n}, {n}) {UPSERT_COMMON}")
}

/// Runs a write with `RETURNING` and gives its first row. The statement is
/// stepped to its end: outside a transaction SQLite commits when the statement
/// finishes, and a commit that fails (disk full, I/O error, a deferred
/// constraint) is reported only there. Fetching a single row would reset the
/// statement early and lose that error, acknowledging an uncommitted write.
async fn returning_one<C: WriteConn>(conn: &C, sql: Sql) -> Result<Option<C::Row>, DbErr> {
    Ok(conn.query(sql.build()).await?.into_iter().next())
}

/// Creates a value; `ALREADY_EXISTS` over a live one, replaces an expired one.
pub(super) async fn create<C: WriteConn>(
    conn: &C,
    tenant: TenantId,
    item: &Item,
    revision: i64,
    now: i64,
) -> Result<Object, ApiError> {
    let mut sql = Sql::new(conn.backend());
    let head = insert(&mut sql, tenant, item, revision, now);
    let n = sql.arg(now);
    sql.push(&head).push(&format!(
        r#" {RECREATE_ASSIGNMENTS}
           WHERE {}
           RETURNING version, created_at"#,
        expired("object.", &n)
    ));
    let Some(row) = returning_one(conn, sql).await? else {
        return Err(already_exists());
    };
    let mut object = written(item, &row, revision, now)?;
    continue_version(conn, tenant, &mut object).await?;
    Ok(object)
}

/// [`continue_versions`] for one object just created.
async fn continue_version<C: WriteConn>(
    conn: &C,
    tenant: TenantId,
    object: &mut Object,
) -> Result<(), ApiError> {
    let raised = continue_versions(conn, &[(tenant.get(), object.key.as_str())]).await?;
    if let Some(v) = raised.get(&(tenant.get(), object.key.clone())) {
        object.version = *v;
    }
    Ok(())
}

/// Rows per multi-row statement. Each row count is its own prepared
/// statement; connections cache enough of them (see `db`). PostgreSQL gets
/// smaller statements: with sqlx, statements of over ~100 rows stall about
/// 40 ms each on the socket (measured on loopback), while 64 rows do not.
pub(super) fn max_rows_per_statement(backend: DatabaseBackend) -> usize {
    match backend {
        DatabaseBackend::Postgres => 64,
        _ => 256,
    }
}

/// A value to write at a revision.
pub(super) type Row<'a> = (TenantId, &'a Item, i64);

/// Creates (`create_only`) or creates-or-replaces several values of distinct
/// `(tenant, key)` in as few statements as possible. One result per row, in
/// order: the object and whether it was created, or `ALREADY_EXISTS`.
pub(super) async fn write_many<C: WriteConn>(
    conn: &C,
    create_only: bool,
    rows: &[Row<'_>],
    now: i64,
) -> Result<Vec<Result<(Object, bool), ApiError>>, ApiError> {
    let mut out = Vec::with_capacity(rows.len());
    let max_rows = max_rows_per_statement(conn.backend());
    for chunk in rows.chunks(max_rows) {
        out.extend(write_chunk(conn, create_only, chunk, now).await?);
    }
    Ok(out)
}

async fn write_chunk<C: WriteConn>(
    conn: &C,
    create_only: bool,
    rows: &[Row<'_>],
    now: i64,
) -> Result<Vec<Result<(Object, bool), ApiError>>, ApiError> {
    let backend = conn.backend();
    let mut sql = Sql::new(backend);
    let values: Vec<String> = rows
        .iter()
        .map(|(tenant, item, revision)| {
            let t = sql.next(tenant.get());
            let k = sql.next(item.key.as_str());
            let d = json_cast(backend, sql.next(item.data.as_str()));
            let s = sql.next(item.size());
            let r = sql.next(*revision);
            let cr = sql.next(*revision);
            let e = sql.next(expires_at(item, now));
            let c = sql.next(now);
            let u = sql.next(now);
            format!("({t}, {k}, {d}, {s}, 1, {r}, {cr}, {e}, {c}, {u})")
        })
        .collect();
    let mut expired = || {
        let n = sql.next(now);
        expired("object.", &n)
    };
    let on_conflict = if create_only {
        format!("{RECREATE_ASSIGNMENTS} WHERE {}", expired())
    } else {
        let (a, b) = (expired(), expired());
        replace_assignments(&a, &b)
    };
    sql.push(&format!(
        r#"{INSERT_HEAD} VALUES {} {UPSERT_COMMON} {on_conflict}
           RETURNING tenant_id, "key", version, created_at, created_revision"#,
        values.join(", ")
    ));
    let returned = conn.query(sql.build()).await?;
    let mut written_rows = std::collections::HashMap::with_capacity(returned.len());
    for row in &returned {
        let tenant = row.int("tenant_id")?;
        let key = row.text("key")?;
        let version = row.int("version")?;
        let created_at = row.int("created_at")?;
        let created_revision = row.int("created_revision")?;
        written_rows.insert((tenant, key), (version, created_at, created_revision));
    }
    let created: Vec<(i64, &str)> = rows
        .iter()
        .filter(|(tenant, item, revision)| {
            written_rows
                .get(&(tenant.get(), item.key.as_str().to_owned()))
                .is_some_and(|w| w.2 == *revision)
        })
        .map(|(tenant, item, _)| (tenant.get(), item.key.as_str()))
        .collect();
    for (row, version) in continue_versions(conn, &created).await? {
        if let Some(w) = written_rows.get_mut(&row) {
            w.0 = version;
        }
    }
    Ok(rows
        .iter()
        .map(|(tenant, item, revision)| {
            match written_rows.get(&(tenant.get(), item.key.as_str().to_owned())) {
                Some(&(version, created_at, created_revision)) => Ok((
                    object_written(item, version, *revision, created_at, now),
                    created_revision == *revision,
                )),
                None if create_only => Err(already_exists()),
                None => Err(ApiError::internal(anyhow::anyhow!(
                    "upsert returned no row"
                ))),
            }
        })
        .collect())
}

/// A run of writes (see [`write_many`]) to distinct `(tenant, key)`, sorted
/// by tenant, in one call of the migrations' `kvql_write_run`, run on its
/// own (autocommitted): it reserves the revisions, locking the tenants'
/// counters in id order; then, in a statement whose snapshot follows those
/// locks, writes the rows, continuing the versions of the rows it creates
/// (as [`continue_versions`] does) and logs the changes. One round trip
/// for what a transaction of [`write_many`] and its neighbours takes five.
/// `kind = 1` in its log insert is [`kind_code`]`(EventKind::Put)`; the
/// condition `object.expires_at <= p_now` is [`expired`]`("object.")`.
///
/// A run longer than [`max_rows_per_statement`] is cut into calls of that
/// many rows in one transaction: one message of a thousand values stalls
/// on the socket (see there), and a 1,000-item batch ran at a third of the
/// speed of chunked statements.
pub(super) async fn write_run_postgres(
    pool: &sea_orm::sqlx::PgPool,
    create_only: bool,
    rows: &[(TenantId, &Item)],
    now: i64,
) -> Result<Vec<Result<(Object, bool), ApiError>>, ApiError> {
    let max = max_rows_per_statement(DatabaseBackend::Postgres);
    if rows.len() <= max {
        return write_run_call(pool, create_only, rows, now).await;
    }
    let mut txn = pool.begin().await.map_err(sqlx_failure)?;
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(max) {
        out.extend(write_run_call(&mut *txn, create_only, chunk, now).await?);
    }
    txn.commit().await.map_err(sqlx_failure)?;
    Ok(out)
}

/// One call of `kvql_write_run` (see [`write_run_postgres`]).
async fn write_run_call<'e>(
    executor: impl sea_orm::sqlx::PgExecutor<'e>,
    create_only: bool,
    rows: &[(TenantId, &Item)],
    now: i64,
) -> Result<Vec<Result<(Object, bool), ApiError>>, ApiError> {
    use sea_orm::sqlx::{self, Row};
    const STATEMENT: &str = "SELECT * FROM kvql_write_run($1, $2, $3, $4, $5, $6, $7)";
    let mut tenants = Vec::with_capacity(rows.len());
    let mut keys = Vec::with_capacity(rows.len());
    let mut data = Vec::with_capacity(rows.len());
    let mut expiries = Vec::with_capacity(rows.len());
    let mut offsets = Vec::with_capacity(rows.len());
    debug_assert!(
        rows.windows(2).all(|w| w[0].0.get() <= w[1].0.get()),
        "a run's rows are sorted by tenant: revisions are counted per tenant along them"
    );
    let mut off = 0_i64;
    for (i, (tenant, item)) in rows.iter().enumerate() {
        off = match i {
            0 => 0,
            _ if rows[i - 1].0 != *tenant => 0,
            _ => off + 1,
        };
        tenants.push(tenant.get());
        keys.push(item.key.as_str());
        data.push(item.data.as_str());
        expiries.push(expires_at(item, now));
        offsets.push(off);
    }
    let returned = sqlx::query(STATEMENT)
        .bind(&tenants)
        .bind(&keys)
        .bind(&data)
        .bind(&expiries)
        .bind(&offsets)
        .bind(now)
        .bind(create_only)
        .fetch_all(executor)
        .await
        .map_err(sqlx_failure)?;
    let mut written = std::collections::HashMap::with_capacity(returned.len());
    for row in &returned {
        let get = || -> Result<_, sqlx::Error> {
            Ok((
                (
                    row.try_get::<i64, _>("r_tenant")?,
                    row.try_get::<String, _>("r_key")?,
                ),
                (
                    row.try_get::<i64, _>("r_version")?,
                    row.try_get::<i64, _>("r_revision")?,
                    row.try_get::<i64, _>("r_created_at")?,
                    row.try_get::<i64, _>("r_created_revision")?,
                ),
            ))
        };
        let (at, what) = get().map_err(sqlx_failure)?;
        written.insert(at, what);
    }
    // A put always returns its row; if one did not, what was written is
    // unknown, and the whole run fails (an atomic job must not report part).
    if !create_only && written.len() != rows.len() {
        return Err(ApiError::internal(anyhow::anyhow!(
            "kvql_write_run returned {} rows for {} puts",
            written.len(),
            rows.len()
        )));
    }
    Ok(rows
        .iter()
        .map(
            |(tenant, item)| match written.get(&(tenant.get(), item.key.as_str().to_owned())) {
                Some(&(version, revision, created_at, created_revision)) => Ok((
                    object_written(item, version, revision, created_at, now),
                    created_revision == revision,
                )),
                None => Err(already_exists()),
            },
        )
        .collect())
}

/// Writes a value as `expect` allows; the object and whether it was created.
pub(super) async fn put<C: WriteConn>(
    conn: &C,
    tenant: TenantId,
    item: &Item,
    expect: Expect,
    revision: i64,
    now: i64,
) -> Result<(Object, bool), ApiError> {
    let backend = conn.backend();
    let expected_version = match expect {
        Expect::Absent => {
            return create(conn, tenant, item, revision, now)
                .await
                .map(|o| (o, true));
        }
        Expect::Any => {
            let mut sql = Sql::new(backend);
            let head = insert(&mut sql, tenant, item, revision, now);
            let n = sql.arg(now);
            let expired = expired("object.", &n);
            sql.push(&head).push(&format!(
                " {} RETURNING version, created_at, created_revision",
                replace_assignments(&expired, &expired)
            ));
            let row = returning_one(conn, sql)
                .await?
                .ok_or_else(|| ApiError::internal(anyhow::anyhow!("upsert returned no row")))?;
            let mut object = written(item, &row, revision, now)?;
            let created = row.int("created_revision")? == revision;
            if created {
                continue_version(conn, tenant, &mut object).await?;
            }
            return Ok((object, created));
        }
        Expect::Exists => None,
        Expect::Version(v) => Some(v),
    };
    let mut sql = Sql::new(backend);
    let d = sql.json_arg(&item.data);
    let s = sql.arg(item.size());
    let r = sql.arg(revision);
    let e = sql.arg(expires_at(item, now));
    let n = sql.arg(now);
    let t = sql.arg(tenant.get());
    let k = sql.arg(item.key.as_str());
    sql.push(&format!(
        r#"UPDATE object SET data = {d}, size = {s}, revision = {r}, expires_at = {e}, updated_at = {n},
             version = version + 1
           WHERE tenant_id = {t} AND "key" = {k} AND {}"#,
        live(&n)
    ));
    if let Some(v) = expected_version {
        let v = sql.arg(v);
        sql.push(&format!(" AND version = {v}"));
    }
    sql.push(" RETURNING version, created_at");
    match returning_one(conn, sql).await? {
        Some(row) => Ok((written(item, &row, revision, now)?, false)),
        None => Err(missing_or_moved(conn, tenant, &item.key, expected_version, now).await),
    }
}

/// Deletes the live value under `key` (at `expected`, if given); its version.
pub(super) async fn delete<C: WriteConn>(
    conn: &C,
    tenant: TenantId,
    key: &Key,
    expected: Option<i64>,
    now: i64,
) -> Result<i64, ApiError> {
    let mut sql = Sql::new(conn.backend());
    let t = sql.arg(tenant.get());
    let k = sql.arg(key.as_str());
    let n = sql.arg(now);
    sql.push(&format!(
        r#"DELETE FROM object WHERE tenant_id = {t} AND "key" = {k}
           AND {}"#,
        live(&n)
    ));
    if let Some(v) = expected {
        let v = sql.arg(v);
        sql.push(&format!(" AND version = {v}"));
    }
    sql.push(" RETURNING version");
    match returning_one(conn, sql).await? {
        Some(row) => Ok(row.int("version")?),
        None => Err(missing_or_moved(conn, tenant, key, expected, now).await),
    }
}

/// Why a conditional write matched no row: no live value (`NOT_FOUND`) or a
/// live value at another version (`VERSION_MISMATCH`).
async fn missing_or_moved<C: WriteConn>(
    conn: &C,
    tenant: TenantId,
    key: &Key,
    expected: Option<i64>,
    now: i64,
) -> ApiError {
    let Some(expected) = expected else {
        return ApiError::not_found();
    };
    let mut sql = Sql::new(conn.backend());
    let t = sql.arg(tenant.get());
    let k = sql.arg(key.as_str());
    let n = sql.arg(now);
    sql.push(&format!(
        r#"SELECT version FROM object WHERE tenant_id = {t} AND "key" = {k}
           AND {}"#,
        live(&n)
    ));
    match conn.query(sql.build()).await {
        Ok(rows) if rows.is_empty() => ApiError::not_found(),
        Ok(_) => version_mismatch(expected),
        Err(e) => e.into(),
    }
}

/// A row the sweeper deleted.
pub(super) struct Expired {
    pub tenant: i64,
    pub key: String,
    pub version: i64,
    /// The revision of the expiry, given once the rows are logged.
    pub revision: i64,
}

/// Deletes up to `limit` expired rows in one statement. Safe on several
/// nodes at once (PostgreSQL skips rows another node is deleting).
///
/// The tenants of the oldest expired rows are found first and their revision
/// counters locked, in id order, before any row is: writers lock a counter
/// before its tenant's rows too, so a sweep and a write never wait for each
/// other in a cycle. Runs inside a transaction, which logs the expiries.
pub(super) async fn sweep<C: WriteConn>(
    conn: &C,
    limit: u32,
    now: i64,
) -> Result<Vec<Expired>, ApiError> {
    let backend = conn.backend();
    let mut sql = Sql::new(backend);
    let n = sql.arg(now);
    let l = sql.arg(i64::from(limit));
    sql.push(&format!(
        r#"SELECT DISTINCT tenant_id FROM (
             SELECT tenant_id FROM object WHERE {} ORDER BY expires_at LIMIT {l}) AS c
           ORDER BY tenant_id"#,
        expired("", &n)
    ));
    let tenants = conn
        .query(sql.build())
        .await?
        .iter()
        .map(|r| r.int("tenant_id"))
        .collect::<Result<Vec<i64>, DbErr>>()?;
    if tenants.is_empty() {
        return Ok(Vec::new());
    }
    let (lock, skip) = match backend {
        DatabaseBackend::Postgres => (" FOR UPDATE", " FOR UPDATE SKIP LOCKED"),
        _ => ("", ""),
    };
    let mut sql = Sql::new(backend);
    let ids = sql.list(&tenants);
    sql.push(&format!(
        "SELECT id FROM tenant WHERE id IN ({ids}) ORDER BY id{lock}"
    ));
    conn.query(sql.build()).await?;
    let mut sql = Sql::new(backend);
    let ids = sql.list(&tenants);
    let n = sql.arg(now);
    let l = sql.arg(i64::from(limit));
    sql.push(&format!(
        r#"DELETE FROM object WHERE (tenant_id, "key") IN (
             SELECT tenant_id, "key" FROM object
             WHERE tenant_id IN ({ids}) AND {expired}
             ORDER BY expires_at LIMIT {l}{skip})
           AND {expired}
           RETURNING tenant_id, "key", version"#,
        expired = expired("", &n)
    ));
    expired_rows(conn.query(sql.build()).await?)
}

fn expired_rows<R: WriteRow>(rows: Vec<R>) -> Result<Vec<Expired>, ApiError> {
    rows.iter()
        .map(|r| {
            Ok(Expired {
                tenant: r.int("tenant_id")?,
                key: r.text("key")?,
                version: r.int("version")?,
                revision: 0,
            })
        })
        .collect()
}

/// Deletes up to `limit` expired rows of one tenant, whose counter the
/// transaction already holds (see `write`: a write that may break its
/// tenant's quota first removes what no longer counts). Found through the
/// tenant's expiry index, not through its keys.
pub(super) async fn sweep_tenant<C: WriteConn>(
    conn: &C,
    tenant: i64,
    limit: u32,
    now: i64,
) -> Result<Vec<Expired>, ApiError> {
    let backend = conn.backend();
    let mut sql = Sql::new(backend);
    let t = sql.arg(tenant);
    let n = sql.arg(now);
    let l = sql.arg(i64::from(limit));
    let by_expiry = tenant_expiry_index(backend);
    sql.push(&format!(
        r#"DELETE FROM object WHERE (tenant_id, "key") IN (
             SELECT tenant_id, "key" FROM object{by_expiry}
             WHERE {} AND tenant_id = {t}
             ORDER BY expires_at LIMIT {l})
           RETURNING tenant_id, "key", version"#,
        expired("", &n)
    ));
    expired_rows(conn.query(sql.build()).await?)
}

/// What `tenant` stores now, expired rows not yet swept included (see the
/// quotas migration). In a write transaction, after its counter is locked.
pub(super) async fn usage<C: WriteConn>(conn: &C, tenant: i64) -> Result<Usage, ApiError> {
    let mut sql = Sql::new(conn.backend());
    let t = sql.arg(tenant);
    sql.push(&format!(
        "SELECT used_keys, used_bytes FROM tenant WHERE id = {t}"
    ));
    match conn.query(sql.build()).await?.first() {
        Some(row) => Ok(Usage {
            keys: row.int("used_keys")?,
            bytes: row.int("used_bytes")?,
        }),
        None => Ok(Usage::default()),
    }
}

/// SQLite: the index of a tenant's rows that expire (see the quotas
/// migration), named so that a tenant of many keys is not read by its key.
fn tenant_expiry_index(backend: DatabaseBackend) -> &'static str {
    match backend {
        DatabaseBackend::Sqlite => " INDEXED BY idx_object_tenant_expiry",
        _ => "",
    }
}

/// What `tenant`'s live values take: its counters less its expired rows not
/// yet swept (found as in [`sweep_tenant`]).
pub(super) async fn live_usage(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    now: i64,
) -> Result<Usage, ApiError> {
    let backend = conn.get_database_backend();
    let mut sql = Sql::new(backend);
    let t = sql.arg(tenant.get());
    let n = sql.arg(now);
    let t2 = sql.arg(tenant.get());
    let by_expiry = tenant_expiry_index(backend);
    sql.push(&format!(
        "SELECT t.used_keys - e.keys AS used_keys, t.used_bytes - e.bytes AS used_bytes
         FROM tenant t,
              (SELECT count(*) AS keys, CAST(COALESCE(sum(size), 0) AS BIGINT) AS bytes
               FROM object{by_expiry} WHERE {} AND tenant_id = {t}) AS e
         WHERE t.id = {t2}",
        expired("", &n)
    ));
    match conn.query_all_raw(sql.build()).await?.first() {
        Some(row) => Ok(Usage {
            keys: row.try_get("", "used_keys")?,
            bytes: row.try_get("", "used_bytes")?,
        }),
        None => Ok(Usage::default()),
    }
}

/// Raises `tenant`'s revision counter by `n` and returns the first of the
/// `n` revisions so reserved. The counter's row stays locked until the
/// transaction ends, so the transactions of one tenant take their revisions
/// in the order they commit. A tenant that does not exist reserves from 1:
/// its writes then fail on their foreign key.
pub(super) async fn reserve_revisions<C: WriteConn>(
    conn: &C,
    tenant: i64,
    n: i64,
) -> Result<i64, ApiError> {
    let mut sql = Sql::new(conn.backend());
    let count = sql.arg(n);
    let t = sql.arg(tenant);
    sql.push(&format!(
        "UPDATE tenant SET revision = revision + {count} WHERE id = {t} RETURNING revision"
    ));
    match conn.query(sql.build()).await?.first() {
        Some(row) => Ok(row.int("revision")? - n + 1),
        None => Ok(1),
    }
}

fn kind_code(kind: EventKind) -> i64 {
    match kind {
        EventKind::Put => 1,
        EventKind::Delete => 2,
        EventKind::Expire => 3,
    }
}

fn kind_from_code(code: i64) -> Result<EventKind, DbErr> {
    match code {
        1 => Ok(EventKind::Put),
        2 => Ok(EventKind::Delete),
        3 => Ok(EventKind::Expire),
        other => Err(DbErr::Custom(format!("unknown change kind {other}"))),
    }
}

/// Appends committed changes of `tenant`s to the change log, in the
/// transaction that made them.
pub(super) async fn log_changes<C: WriteConn>(
    conn: &C,
    changes: &[(i64, &Change)],
) -> Result<(), ApiError> {
    let backend = conn.backend();
    for chunk in changes.chunks(max_rows_per_statement(backend)) {
        let mut sql = Sql::new(backend);
        let values: Vec<String> = chunk
            .iter()
            .map(|(tenant, c)| {
                let t = sql.next(*tenant);
                let r = sql.next(c.revision);
                let kind = sql.next(kind_code(c.kind));
                let k = sql.next(c.key.as_str());
                let v = sql.next(c.version);
                let d = json_cast(backend, sql.next(c.data.as_deref().map(str::to_owned)));
                let e = sql.next(c.expires_at);
                let c_at = sql.next(c.created_at);
                let at = sql.next(c.at);
                format!("({t}, {r}, {kind}, {k}, {v}, {d}, {e}, {c_at}, {at})")
            })
            .collect();
        sql.push(&format!(
            r#"INSERT INTO change_log (tenant_id, revision, kind, "key", version, data, expires_at, created_at, at)
               VALUES {}"#,
            values.join(", ")
        ));
        conn.query(sql.build()).await?;
    }
    Ok(())
}

const CHANGE_COLUMNS: &str = r#"revision, kind, "key", version, expires_at, created_at, at"#;

fn change_from_row(row: &QueryResult) -> Result<Change, DbErr> {
    let data: Option<String> = row.try_get("", "data")?;
    Ok(Change {
        revision: row.try_get("", "revision")?,
        kind: kind_from_code(
            row.try_get::<i64>("", "kind")
                .or_else(|_| row.try_get::<i16>("", "kind").map(i64::from))?,
        )?,
        key: row.try_get("", "key")?,
        version: row.try_get("", "version")?,
        data: data.map(|d| crate::input::canonical_numbers(d).into()),
        expires_at: row.try_get("", "expires_at")?,
        created_at: row.try_get("", "created_at")?,
        at: row.try_get("", "at")?,
    })
}

/// `SELECT` of the logged changes of `tenant`; conditions follow.
fn select_changes(backend: DatabaseBackend, tenant: TenantId) -> Sql {
    let mut sql = Sql::new(backend);
    let data = data_as_text(backend);
    let t = sql.arg(tenant.get());
    sql.push(&format!(
        "SELECT {CHANGE_COLUMNS}, {data} FROM change_log WHERE tenant_id = {t}"
    ));
    sql
}

/// The logged changes of `tenant` after revision `after`, in revision order,
/// at most `limit`, of the keys `watch` follows.
pub(super) async fn changes_after(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    after: i64,
    watch: &Watch,
    limit: u32,
) -> Result<Vec<Change>, ApiError> {
    let mut sql = select_changes(conn.get_database_backend(), tenant);
    let a = sql.arg(after);
    sql.push(&format!(" AND revision > {a}"));
    push_watch(&mut sql, watch);
    let l = sql.arg(i64::from(limit));
    sql.push(&format!(" ORDER BY revision LIMIT {l}"));
    rows_to_changes(conn.query_all_raw(sql.build()).await?)
}

/// The logged changes of one key with revisions in `from..before`, newest
/// first, at most `limit`: a walk of at most `before - from` log entries
/// along the log's key (there is no per-key index, which would cost every
/// write a random insert).
pub(super) async fn key_history(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    key: &str,
    from: i64,
    before: i64,
    limit: u32,
) -> Result<Vec<Change>, ApiError> {
    let mut sql = select_changes(conn.get_database_backend(), tenant);
    let (f, b) = (sql.arg(from), sql.arg(before));
    sql.push(&format!(" AND revision >= {f} AND revision < {b}"));
    let k = sql.arg(key);
    sql.push(&format!(r#" AND "key" = {k}"#));
    let l = sql.arg(i64::from(limit));
    sql.push(&format!(" ORDER BY revision DESC LIMIT {l}"));
    rows_to_changes(conn.query_all_raw(sql.build()).await?)
}

fn rows_to_changes(rows: Vec<QueryResult>) -> Result<Vec<Change>, ApiError> {
    Ok(rows
        .iter()
        .map(change_from_row)
        .collect::<Result<Vec<_>, DbErr>>()?)
}

/// The condition that a change's key is one `watch` follows.
fn push_watch(sql: &mut Sql, watch: &Watch) {
    match watch {
        Watch::Key(k) => {
            let k = sql.arg(k.as_str());
            sql.push(&format!(r#" AND "key" = {k}"#));
        }
        Watch::Prefix(p) if p.as_str().is_empty() => {}
        Watch::Nothing => {
            sql.push(" AND 1 = 0");
        }
        Watch::Prefix(p) => {
            let l = sql.arg(p.as_str());
            sql.push(&format!(r#" AND "key" >= {l}"#));
            if let Some(upper) = p.upper_bound() {
                let u = sql.arg(upper);
                sql.push(&format!(r#" AND "key" < {u}"#));
            }
        }
    }
}

/// The tenant's last revision and the last one compacted away.
pub(super) async fn revisions(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
) -> Result<(i64, i64), ApiError> {
    let mut sql = Sql::new(conn.get_database_backend());
    let t = sql.arg(tenant.get());
    sql.push(&format!(
        "SELECT revision, compacted_revision FROM tenant WHERE id = {t}"
    ));
    match conn.query_one_raw(sql.build()).await? {
        Some(row) => Ok((
            row.try_get("", "revision")?,
            row.try_get("", "compacted_revision")?,
        )),
        None => Ok((0, 0)),
    }
}

/// When the longest-expired value not yet swept expired (ms), if any: the
/// smallest `expires_at` at or before `now`, one probe of its index.
pub(super) async fn oldest_expired(
    conn: &impl ConnectionTrait,
    now: i64,
) -> Result<Option<i64>, ApiError> {
    let mut sql = Sql::new(conn.get_database_backend());
    let n = sql.arg(now);
    sql.push(&format!(
        "SELECT expires_at FROM object WHERE {} ORDER BY expires_at LIMIT 1",
        expired("", &n)
    ));
    match conn.query_one_raw(sql.build()).await? {
        Some(row) => Ok(Some(row.try_get("", "expires_at")?)),
        None => Ok(None),
    }
}

/// Whether there is anything to sweep or compact: read before a sweeper
/// transaction begins, so that an idle pass takes no write lock (on SQLite,
/// other writers such as `kvql user add` would wait for it).
pub(super) async fn upkeep_due<C: WriteConn>(
    conn: &C,
    expire_at: Option<i64>,
    compact: Option<(i64, i64)>,
) -> Result<bool, ApiError> {
    let mut sql = Sql::new(conn.backend());
    if let Some(now) = expire_at {
        let n = sql.arg(now);
        sql.push(&format!(
            "SELECT 1 AS due FROM object WHERE {} LIMIT 1",
            expired("", &n)
        ));
    } else if let Some((cutoff, max_per_tenant)) = compact {
        let m = sql.arg(max_per_tenant);
        let old = oldest_entry_before(&mut sql, cutoff);
        sql.push(&format!(
            "SELECT 1 AS due FROM tenant WHERE revision > compacted_revision
               AND (revision - compacted_revision > {m} OR {old})
             LIMIT 1"
        ));
    } else {
        return Ok(false);
    }
    Ok(!conn.query(sql.build()).await?.is_empty())
}

/// The condition that the oldest logged change of `tenant` (a row of the
/// `tenant` table) is older than `cutoff` (ms): one probe along the log's key.
fn oldest_entry_before(sql: &mut Sql, cutoff: i64) -> String {
    let c = sql.arg(cutoff);
    format!(
        "(SELECT at FROM change_log WHERE change_log.tenant_id = tenant.id
          ORDER BY revision LIMIT 1) < {c}"
    )
}

/// Records that compaction removed `tenant`'s log entries through `revision`.
fn compacted_through(
    removed: &mut std::collections::BTreeMap<i64, i64>,
    tenant: i64,
    revision: i64,
) {
    let last = removed.entry(tenant).or_insert(revision);
    *last = (*last).max(revision);
}

/// Removes up to `limit` log entries older than `cutoff` (ms) or beyond the
/// newest `max_per_tenant` of their tenant, tenant by tenant in id order and
/// each tenant's oldest first, and records the last revision removed per
/// tenant. Returns how many were removed.
pub(super) async fn compact<C: WriteConn>(
    conn: &C,
    cutoff: i64,
    max_per_tenant: i64,
    limit: u32,
) -> Result<usize, ApiError> {
    let backend = conn.backend();
    let mut removed: std::collections::BTreeMap<i64, i64> = std::collections::BTreeMap::new();
    let mut total = 0;
    // Too old: per tenant, along the log's key, the entries up to the last
    // one older than `cutoff` among its oldest (the log has no index on
    // `at`, which every write would pay for; `at` follows revision order but
    // for the clocks of different nodes). One probe per tenant with a log.
    let mut sql = Sql::new(backend);
    let old = oldest_entry_before(&mut sql, cutoff);
    let l = sql.arg(i64::from(limit));
    sql.push(&format!(
        "SELECT id FROM tenant WHERE revision > compacted_revision AND {old}
         ORDER BY id LIMIT {l}"
    ));
    for row in conn.query(sql.build()).await? {
        if total >= limit as usize {
            break;
        }
        let t = row.int("id")?;
        let mut sql = Sql::new(backend);
        let ta = sql.arg(t);
        let ca = sql.arg(cutoff);
        let la = sql.arg((limit as usize - total) as i64);
        sql.push(&format!(
            "DELETE FROM change_log WHERE tenant_id = {ta} AND revision <= (
               SELECT max(revision) FROM (
                 SELECT revision, at FROM change_log WHERE tenant_id = {ta}
                 ORDER BY revision LIMIT {la}) AS oldest
               WHERE at < {ca})
             RETURNING revision"
        ));
        for r in conn.query(sql.build()).await? {
            compacted_through(&mut removed, t, r.int("revision")?);
            total += 1;
        }
    }
    // Too many: revisions count entries (skipped revisions make fewer).
    let mut sql = Sql::new(backend);
    let m = sql.arg(max_per_tenant);
    let l = sql.arg(i64::from(limit));
    sql.push(&format!(
        "SELECT id, revision - {m} AS cut FROM tenant
         WHERE revision - compacted_revision > {m} ORDER BY id LIMIT {l}"
    ));
    for row in conn.query(sql.build()).await? {
        if total >= limit as usize {
            break;
        }
        let (t, cut) = (row.int("id")?, row.int("cut")?);
        let batch = limit as usize - total;
        let mut sql = Sql::new(backend);
        let ta = sql.arg(t);
        let ca = sql.arg(cut);
        let la = sql.arg(batch as i64);
        sql.push(&format!(
            "DELETE FROM change_log WHERE (tenant_id, revision) IN (
               SELECT tenant_id, revision FROM change_log
               WHERE tenant_id = {ta} AND revision <= {ca} ORDER BY revision LIMIT {la})
             RETURNING revision"
        ));
        let rows = conn.query(sql.build()).await?;
        total += rows.len();
        // A batch that was not full removed everything up to `cut`; a full
        // one, everything up to the last revision it removed.
        let through = if rows.len() < batch {
            cut
        } else {
            let mut last = 0;
            for r in &rows {
                last = last.max(r.int("revision")?);
            }
            last
        };
        compacted_through(&mut removed, t, through);
    }
    for (t, last) in removed {
        let mut sql = Sql::new(backend);
        let r = sql.arg(last);
        let ta = sql.arg(t);
        sql.push(&format!(
            "UPDATE tenant SET compacted_revision = {r} WHERE id = {ta} AND compacted_revision < {r}"
        ));
        conn.query(sql.build()).await?;
        // Tombstones the compacted revision now covers.
        let mut sql = Sql::new(backend);
        let ta = sql.arg(t);
        let r = sql.arg(last);
        let l = sql.arg(i64::from(limit));
        sql.push(&format!(
            r#"DELETE FROM object_tombstone WHERE (tenant_id, "key") IN (
                 SELECT tenant_id, "key" FROM object_tombstone
                 WHERE tenant_id = {ta} AND revision <= {r} LIMIT {l})"#
        ));
        conn.query(sql.build()).await?;
    }
    Ok(total)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use migration::{Migrator, MigratorTrait};
    use sea_orm::{ConnectOptions, Database};

    /// The SQLite committer's connection to `path`, with foreign keys checked
    /// only at COMMIT, as on [`sqlite_with_deferred_checks`].
    pub(in crate::store) async fn writer_with_deferred_checks(
        path: &std::path::Path,
    ) -> crate::store::sqlite::SqliteWriter {
        let writer =
            crate::store::sqlite::SqliteWriter::open(path, crate::config::SqliteSync::Normal)
                .expect("writer");
        writer
            .execute("PRAGMA defer_foreign_keys = ON")
            .await
            .expect("defer foreign keys");
        writer
    }

    /// Deletes a test's SQLite file and its WAL files.
    pub(in crate::store) fn remove_database_files(path: &std::path::Path) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    /// A migrated SQLite file with one connection whose foreign keys are
    /// checked only when a transaction commits, so a commit can fail.
    pub(in crate::store) async fn sqlite_with_deferred_checks()
    -> (sea_orm::DatabaseConnection, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "kvql-sql-{}-{}.db",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        let mut opts = ConnectOptions::new(format!("sqlite://{}?mode=rwc", path.display()));
        opts.max_connections(1)
            .min_connections(1)
            .sqlx_logging(false);
        let conn = Database::connect(opts).await.expect("open sqlite");
        Migrator::up(&conn, None).await.expect("migrate");
        conn.execute_unprepared("PRAGMA foreign_keys = ON")
            .await
            .expect("foreign keys");
        conn.execute_unprepared("PRAGMA defer_foreign_keys = ON")
            .await
            .expect("defer foreign keys");
        (conn, path)
    }

    async fn count_objects(conn: &sea_orm::DatabaseConnection) -> i64 {
        let row = conn
            .query_one_raw(Statement::from_string(
                DatabaseBackend::Sqlite,
                "SELECT COUNT(*) AS n FROM object",
            ))
            .await
            .expect("count")
            .expect("a row");
        row.try_get("", "n").expect("n")
    }

    #[tokio::test]
    async fn reader_connections_map_as_much_of_the_file_as_configured() {
        let (conn, path) = sqlite_with_deferred_checks().await;
        for bytes in [0_u64, 1 << 20, 1 << 30] {
            let reader = open_sqlite_reader(&path, bytes).expect("reader");
            let mapped: i64 = reader
                .query_row("PRAGMA mmap_size", [], |r| r.get(0))
                .expect("mmap_size");
            assert_eq!(mapped, i64::try_from(bytes).unwrap());
            let only: bool = reader
                .query_row("PRAGMA query_only", [], |r| r.get(0))
                .expect("query_only");
            assert!(only);
        }
        drop(conn);
        remove_database_files(&path);
    }

    #[tokio::test]
    async fn a_write_whose_commit_fails_is_an_error_not_an_acknowledgement() {
        let (conn, path) = sqlite_with_deferred_checks().await;
        let writer = writer_with_deferred_checks(&path).await;
        assert_commit_failures_are_errors(&conn, &conn).await;
        assert_commit_failures_are_errors(&writer, &conn).await;
        drop((writer, conn));
        remove_database_files(&path);
    }

    async fn assert_commit_failures_are_errors(
        conn: &impl WriteConn,
        check: &sea_orm::DatabaseConnection,
    ) {
        let no_such_tenant = TenantId::for_store_tests(424_242);
        let item = Item {
            key: Key::parse("k".to_owned()).expect("key"),
            data: Data::parse(&serde_json::json!({"a": 1}), 1024).expect("data"),
            ttl: None,
        };
        let created = create(conn, no_such_tenant, &item, 1, 1_000).await;
        assert!(created.is_err(), "create acknowledged: {created:?}");
        let put = put(conn, no_such_tenant, &item, Expect::Any, 2, 1_000).await;
        assert!(put.is_err(), "put acknowledged: {put:?}");
        assert_eq!(count_objects(check).await, 0);
    }

    #[test]
    fn ttl_left_rounds_up_to_whole_seconds() {
        assert_eq!(seconds_left(10_000, 10_000), 0);
        assert_eq!(seconds_left(10_001, 10_000), 1);
        assert_eq!(seconds_left(11_000, 10_000), 1);
        assert_eq!(seconds_left(11_001, 10_000), 2);
        assert_eq!(seconds_left(5_000, 10_000), 0);
    }
}
