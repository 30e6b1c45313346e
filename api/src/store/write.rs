//! How writes reach the database.
//!
//! A request's writes form a job: one or more operations for one tenant,
//! applied in order (by key, writes to one key in request order, wherever a
//! job has statements of its own: concurrent transactions then lock rows in
//! one order), each failing on its own or (atomic) all together. Every job
//! goes to a committer task that applies the jobs queued at that moment in
//! one transaction: group commit, one commit (one fsync) for many concurrent
//! writers, and multi-row statements for their writes. SQLite, which has one
//! writer at a time, gets one committer that owns the writer connection;
//! PostgreSQL gets a few, sharing the queue, so that one group's round trips
//! overlap the next group's. Jobs never see each other's failures: an atomic
//! job rolls back to its own savepoint, and if the group's transaction itself
//! fails before its commit, each job is run again alone (on PostgreSQL, a
//! transaction aborted to break a deadlock is retried). Every transaction
//! reserves its revisions from its tenants' counters and logs its changes.
//! On PostgreSQL a group (or job) of plain creations or puts of distinct
//! keys skips the transaction: it is one call, see [`Run`].

use std::collections::HashMap;

use sea_orm::prelude::async_trait::async_trait;
use sea_orm::{DatabaseConnection, DatabaseTransaction, DbErr, TransactionTrait};
use tokio::sync::{mpsc, oneshot};

use super::events::EventKind;
use super::quota::{Quota, Usage};
use super::sql::WriteConn;
use super::sqlite::{self, SqliteTxn, SqliteWriter};
use super::types::{Change, Expect, Key};
use super::{Item, Object, queue, sql};
use crate::auth::TenantId;
use crate::clock::Clock;
use crate::error::ApiError;

/// A connection that groups are applied on: sqlx's pool on PostgreSQL (and
/// SQLite in unit tests), or the SQLite committer's own connection.
#[async_trait]
pub(super) trait GroupConn: WriteConn {
    type Txn<'a>: WriteConn
    where
        Self: 'a;

    async fn begin_txn(&self) -> Result<Self::Txn<'_>, DbErr>;

    async fn commit_txn<'a>(txn: Self::Txn<'a>) -> Result<(), DbErr>;

    async fn rollback_txn<'a>(txn: Self::Txn<'a>) -> Result<(), DbErr>;

    /// Whether a failed `COMMIT` (or autocommitted statement) left nothing
    /// written.
    fn refused(&self, err: &ApiError) -> bool;

    /// Called before each group: a connection of its own makes sure no
    /// transaction was left open.
    fn before_group(&self) {}

    /// sqlx's pool, on PostgreSQL: runs of plain writes go there as one
    /// statement (see `sql::write_run_postgres`).
    fn postgres(&self) -> Option<&sea_orm::sqlx::PgPool> {
        None
    }
}

#[async_trait]
impl GroupConn for DatabaseConnection {
    type Txn<'a> = DatabaseTransaction;

    async fn begin_txn(&self) -> Result<DatabaseTransaction, DbErr> {
        self.begin().await
    }

    async fn commit_txn<'a>(txn: DatabaseTransaction) -> Result<(), DbErr> {
        txn.commit().await
    }

    async fn rollback_txn<'a>(txn: DatabaseTransaction) -> Result<(), DbErr> {
        txn.rollback().await
    }

    fn refused(&self, err: &ApiError) -> bool {
        refused_by_database(err)
    }

    fn postgres(&self) -> Option<&sea_orm::sqlx::PgPool> {
        (self.get_database_backend() == sea_orm::DatabaseBackend::Postgres)
            .then(|| self.get_postgres_connection_pool())
    }
}

#[async_trait]
impl GroupConn for SqliteWriter {
    type Txn<'a> = SqliteTxn<'a>;

    async fn begin_txn(&self) -> Result<SqliteTxn<'_>, DbErr> {
        self.begin().map(|()| SqliteTxn(self))
    }

    async fn commit_txn<'a>(txn: SqliteTxn<'a>) -> Result<(), DbErr> {
        txn.0.commit()
    }

    async fn rollback_txn<'a>(txn: SqliteTxn<'a>) -> Result<(), DbErr> {
        txn.0.rollback()
    }

    /// SQLite answered, and a failed `COMMIT` is rolled back
    /// (`SqliteWriter::commit`).
    fn refused(&self, err: &ApiError) -> bool {
        sqlite::refused_by_sqlite(err)
    }

    fn before_group(&self) {
        self.end_stray_transaction();
    }
}

/// One write.
#[derive(Clone, Debug)]
pub(super) enum Op {
    Create(Item),
    Put(Item, Expect),
    Delete(Key, Option<i64>),
}

/// What a successful write did.
#[derive(Clone, Debug)]
pub(super) enum Outcome {
    Written {
        object: Object,
        created: bool,
    },
    Deleted {
        key: String,
        version: i64,
        revision: i64,
    },
}

impl Outcome {
    /// The change this write logs.
    fn change(&self, now: i64) -> Change {
        match self {
            Outcome::Written { object, .. } => Change::put(object),
            Outcome::Deleted {
                key,
                version,
                revision,
            } => Change::gone(EventKind::Delete, *revision, key.clone(), *version, now),
        }
    }
}

/// The revisions reserved for one transaction's operations (see
/// `sql::reserve_revisions`), handed out in the order the operations run.
struct Revisions(HashMap<i64, i64>);

/// Most expired rows of its tenant a write that may break a quota removes
/// first (the sweeper's default batch); beyond, the rest count until the
/// sweeper removes them.
const QUOTA_SWEEP_LIMIT: u32 = 1_000;

/// What one tenant's operations in a transaction need from its counter.
#[derive(Default)]
struct Demand {
    ops: i64,
    /// The writes' keys and bytes, at most: what they may add.
    keys: i64,
    bytes: i64,
    quota: Option<Quota>,
}

/// What reserving did besides the revisions: the tenants whose writes
/// might break their quota ("tight": only their writes are checked), their
/// usage once their counters were locked and their expired rows removed,
/// and the rows so expired.
#[derive(Default)]
struct Prepared {
    usage: HashMap<i64, Usage>,
    swept: Vec<sql::Expired>,
}

impl Prepared {
    fn tight(&self, tenant: TenantId) -> bool {
        self.usage.contains_key(&tenant.get())
    }
}

impl Revisions {
    /// Reserves one revision per tenant given (once per change it makes),
    /// tenant by tenant in id order, so that transactions lock the counters
    /// in one order.
    async fn reserve_for<C: WriteConn>(
        conn: &C,
        tenants: impl Iterator<Item = i64>,
    ) -> Result<Revisions, ApiError> {
        let mut counts = std::collections::BTreeMap::<i64, i64>::new();
        for t in tenants {
            *counts.entry(t).or_default() += 1;
        }
        let mut next = HashMap::with_capacity(counts.len());
        for (tenant, n) in counts {
            next.insert(tenant, sql::reserve_revisions(conn, tenant, n).await?);
        }
        Ok(Revisions(next))
    }

    /// Reserves one revision per operation, tenant by tenant in id order (so
    /// that transactions lock the counters in one order). A tenant with a
    /// quota that these writes might break first has its expired rows
    /// removed (logged as expiries, at revisions before the writes'), so that
    /// its usage counts live values only; if they still might, it is tight.
    async fn reserve<'a, C: WriteConn>(
        conn: &C,
        steps: impl Iterator<Item = &'a Step<'a>>,
        now: i64,
    ) -> Result<(Revisions, Prepared), ApiError> {
        let mut demands = std::collections::BTreeMap::<i64, Demand>::new();
        for step in steps {
            let Ok(op) = step.op else { continue };
            let d = demands.entry(step.tenant.get()).or_default();
            d.ops += 1;
            if let Op::Create(item) | Op::Put(item, _) = op {
                d.keys += 1;
                d.bytes = d.bytes.saturating_add(item.size());
            }
            // Jobs of one tenant may carry different quotas (principals
            // verified on either side of a change): the strictest decides
            // whether the tenant is tight; each write is then checked
            // against its own job's.
            if let Some(q) = step.quota {
                d.quota = Some(d.quota.map_or(*q, |d| d.tightest(*q)));
            }
        }
        let mut next = HashMap::with_capacity(demands.len());
        let mut prepared = Prepared::default();
        for (tenant, d) in demands {
            let mut first = sql::reserve_revisions(conn, tenant, d.ops).await?;
            if let Some(quota) = d.quota {
                let mut usage = sql::usage(conn, tenant).await?;
                let mut expired = Vec::new();
                if quota.may_exceed(usage, d.keys, d.bytes) {
                    expired = sql::sweep_tenant(conn, tenant, QUOTA_SWEEP_LIMIT, now).await?;
                }
                if !expired.is_empty() {
                    // The writes take revisions after the expiries: a key
                    // expired here may be written again below.
                    let m = expired.len() as i64;
                    let start = sql::reserve_revisions(conn, tenant, m + d.ops).await?;
                    for (i, e) in expired.iter_mut().enumerate() {
                        e.revision = start + i as i64;
                    }
                    first = start + m;
                    record(conn, &expiries(&expired, now)).await?;
                    usage = sql::usage(conn, tenant).await?;
                    prepared.swept.append(&mut expired);
                }
                if quota.may_exceed(usage, d.keys, d.bytes) {
                    prepared.usage.insert(tenant, usage);
                }
            }
            next.insert(tenant, first);
        }
        Ok((Revisions(next), prepared))
    }

    fn next(&mut self, tenant: i64) -> i64 {
        let next = self.0.entry(tenant).or_insert(1);
        *next += 1;
        *next - 1
    }
}

/// The result of a job: one result per operation, or the whole job's failure
/// (an atomic job's first failing operation).
pub(super) type JobResult = Result<Vec<Result<Outcome, ApiError>>, ApiError>;

/// The writes of one request.
pub(super) struct Job {
    pub tenant: TenantId,
    /// The key as the client sent it, and the operation or why it could not be parsed.
    pub ops: Vec<(String, Result<Op, ApiError>)>,
    pub atomic: bool,
    /// The tenant's limits, if it has any: each operation (or an atomic
    /// job as a whole) that would break one fails with `QUOTA_EXCEEDED`
    /// and writes nothing.
    pub quota: Option<Quota>,
}

/// One operation of a transaction, with its job's tenant and quota.
#[derive(Clone, Copy)]
struct Step<'a> {
    tenant: TenantId,
    key: &'a str,
    op: Result<&'a Op, &'a ApiError>,
    quota: Option<&'a Quota>,
}

impl Job {
    fn steps(&self) -> impl Iterator<Item = Step<'_>> {
        self.ops.iter().map(|(key, op)| Step {
            tenant: self.tenant,
            key: key.as_str(),
            op: op.as_ref(),
            quota: self.quota.as_ref(),
        })
    }
}

/// Expiry changes for rows removed at their revisions.
fn expiries(expired: &[sql::Expired], now: i64) -> Vec<(i64, Change)> {
    expired
        .iter()
        .map(|e| {
            let change = Change::gone(EventKind::Expire, e.revision, e.key.clone(), e.version, now);
            (e.tenant, change)
        })
        .collect()
}

async fn exec<C: WriteConn>(
    conn: &C,
    tenant: TenantId,
    op: &Op,
    revision: i64,
    now: i64,
) -> Result<Outcome, ApiError> {
    match op {
        Op::Create(item) => sql::create(conn, tenant, item, revision, now)
            .await
            .map(|object| Outcome::Written {
                object,
                created: true,
            }),
        Op::Put(item, expect) => sql::put(conn, tenant, item, *expect, revision, now)
            .await
            .map(|(object, created)| Outcome::Written { object, created }),
        Op::Delete(key, expected) => {
            sql::delete(conn, tenant, key, *expected, now)
                .await
                .map(|version| Outcome::Deleted {
                    key: key.as_str().to_owned(),
                    version,
                    revision,
                })
        }
    }
}

/// A creation, or a put without conditions: the writes that can share one
/// multi-row statement.
fn mergeable(op: &Op) -> Option<(bool, &Item)> {
    match op {
        Op::Create(item) | Op::Put(item, Expect::Absent) => Some((true, item)),
        Op::Put(item, Expect::Any) => Some((false, item)),
        _ => None,
    }
}

/// Executes operations in order, merging runs of same-kind mergeable writes
/// to distinct keys into multi-row statements. With `per_op_quota`, each
/// write with a quota of a tight tenant (see [`Prepared`]) runs alone on a
/// savepoint, undone if it broke the quota (`usage`: the tenants' usage so
/// far). `Err` only for database failures.
async fn exec_seq<C: WriteConn>(
    conn: &C,
    ops: &[Step<'_>],
    revisions: &mut Revisions,
    prepared: &Prepared,
    per_op_quota: bool,
    now: i64,
) -> Result<Vec<Result<Outcome, ApiError>>, ApiError> {
    let mut results: Vec<Result<Outcome, ApiError>> = Vec::with_capacity(ops.len());
    let mut usage = prepared.usage.clone();
    let checked =
        |step: &Step<'_>| per_op_quota && step.quota.is_some() && prepared.tight(step.tenant);
    let mut i = 0;
    while i < ops.len() {
        let run_kind = match &ops[i].op {
            Ok(op) if !checked(&ops[i]) => mergeable(op).map(|(create, _)| create),
            _ => None,
        };
        let mut run: Vec<sql::Row<'_>> = Vec::new();
        if let Some(create) = run_kind {
            let mut seen = std::collections::HashSet::new();
            for step in &ops[i..] {
                match step.op.ok().filter(|_| !checked(step)).and_then(mergeable) {
                    Some((c, item))
                        if c == create && seen.insert((step.tenant.get(), item.key.as_str())) =>
                    {
                        run.push((step.tenant, item, 0))
                    }
                    _ => break,
                }
            }
        }
        if run.len() >= 2 {
            for row in &mut run {
                row.2 = revisions.next(row.0.get());
                // Unchecked writes move the usage: read it again if needed.
                usage.remove(&row.0.get());
            }
            let create = run_kind == Some(true);
            let n = run.len();
            for r in sql::write_many(conn, create, &run, now).await? {
                results.push(r.map(|(object, created)| Outcome::Written { object, created }));
            }
            i += n;
        } else {
            let step = &ops[i];
            let result = match step.op {
                Ok(op) => {
                    let revision = revisions.next(step.tenant.get());
                    match step.quota.filter(|_| checked(step)) {
                        Some(quota) => {
                            exec_within(conn, step.tenant, op, quota, &mut usage, revision, now)
                                .await
                        }
                        None => {
                            usage.remove(&step.tenant.get());
                            exec(conn, step.tenant, op, revision, now).await
                        }
                    }
                }
                Err(e) => Err(e.clone()),
            };
            if let Err(e @ ApiError::Internal(_)) = result {
                return Err(e);
            }
            results.push(result);
            i += 1;
        }
    }
    Ok(results)
}

/// Executes one operation of a tenant with a quota on a savepoint, undone
/// with `QUOTA_EXCEEDED` if it broke the quota. `usage` holds the tenant's
/// usage before it (read if missing) and is brought up to date.
async fn exec_within<C: WriteConn>(
    conn: &C,
    tenant: TenantId,
    op: &Op,
    quota: &Quota,
    usage: &mut HashMap<i64, Usage>,
    revision: i64,
    now: i64,
) -> Result<Outcome, ApiError> {
    if let Op::Delete(..) = op {
        usage.remove(&tenant.get());
        return exec(conn, tenant, op, revision, now).await;
    }
    let before = match usage.get(&tenant.get()) {
        Some(u) => *u,
        None => sql::usage(conn, tenant.get()).await?,
    };
    conn.execute("SAVEPOINT kvql_quota").await?;
    let result = match exec(conn, tenant, op, revision, now).await {
        // PostgreSQL takes nothing but a rollback after a failed statement:
        // the caller rolls the transaction back, and sees why.
        Err(e @ ApiError::Internal(_)) => return Err(e),
        Ok(outcome) => {
            let after = sql::usage(conn, tenant.get()).await?;
            match quota.check(before, after) {
                Ok(()) => {
                    usage.insert(tenant.get(), after);
                    Ok(outcome)
                }
                Err(refused) => {
                    conn.execute("ROLLBACK TO SAVEPOINT kvql_quota").await?;
                    usage.insert(tenant.get(), before);
                    Err(refused)
                }
            }
        }
        Err(e) => Err(e),
    };
    conn.execute("RELEASE SAVEPOINT kvql_quota").await?;
    result
}

/// Appends committed changes of `(tenant, change)` to the change log, and
/// leaves a tombstone for each key deleted or expired (see
/// `sql::continue_versions`), in the transaction that made them.
async fn record<C: WriteConn>(conn: &C, changes: &[(i64, Change)]) -> Result<(), ApiError> {
    let logged: Vec<(i64, &Change)> = changes.iter().map(|(t, c)| (*t, c)).collect();
    sql::log_changes(conn, &logged).await?;
    let gone: Vec<(i64, &str, i64, i64)> = changes
        .iter()
        .filter(|(_, c)| c.kind != EventKind::Put)
        .map(|(t, c)| (*t, c.key.as_str(), c.version, c.revision))
        .collect();
    sql::write_tombstones(conn, &gone).await
}

/// What [`exec_in_key_order`] did: one result per operation, in the order
/// given, and what reserving its revisions prepared (the rows it expired
/// first, and the usage of each tight tenant before its writes).
struct Done {
    results: Vec<Result<Outcome, ApiError>>,
    prepared: Prepared,
}

/// Executes operations in `(tenant, key)` order, those on one key in the
/// order given, so that every transaction locks rows in one order
/// (PostgreSQL), each at a revision of its own, and logs the changes made.
/// With `per_op_quota`, each write of a tenant with a quota is checked
/// against it alone (see [`exec_seq`]). Runs inside a transaction. `Err`
/// only for database failures.
async fn exec_in_key_order<C: WriteConn>(
    conn: &C,
    ops: &[Step<'_>],
    per_op_quota: bool,
    now: i64,
) -> Result<Done, ApiError> {
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by_key(|&i| (ops[i].tenant.get(), ops[i].key));
    let sorted: Vec<Step<'_>> = order.iter().map(|&i| ops[i]).collect();
    let (mut revisions, prepared) = Revisions::reserve(conn, sorted.iter(), now).await?;
    let results = exec_seq(conn, &sorted, &mut revisions, &prepared, per_op_quota, now).await?;
    let changes: Vec<(i64, Change)> = sorted
        .iter()
        .zip(&results)
        .filter_map(|(step, r)| Some((step.tenant.get(), r.as_ref().ok()?.change(now))))
        .collect();
    record(conn, &changes).await?;
    let mut by_index: Vec<Option<Result<Outcome, ApiError>>> = Vec::new();
    by_index.resize_with(ops.len(), || None);
    for (position, result) in results.into_iter().enumerate() {
        by_index[order[position]] = Some(result);
    }
    Ok(Done {
        results: filled(by_index),
        prepared,
    })
}

/// Results put back in their operations' places; a place left empty is an
/// internal error.
fn filled(slots: Vec<Option<Result<Outcome, ApiError>>>) -> Vec<Result<Outcome, ApiError>> {
    slots
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(ApiError::internal(anyhow::anyhow!(
                    "an operation got no result"
                )))
            })
        })
        .collect()
}

/// A job's result, and the rows its transaction expired before its writes
/// (see [`Revisions::reserve`]): they are reported before it.
type Applied = (JobResult, Vec<sql::Expired>);

/// Applies a job's operations in order on `conn`. `Err` means the database
/// failed and the caller must roll back; `Ok((Err(_), _))` is an atomic job
/// that failed and wrote nothing (rolled back to `savepoint`, when given).
async fn apply<C: WriteConn>(
    conn: &C,
    job: &Job,
    now: i64,
    savepoint: bool,
) -> Result<Applied, ApiError> {
    let savepoint = savepoint && job.atomic;
    if savepoint {
        conn.execute("SAVEPOINT kvql_job").await?;
    }
    // Operations run in key order, and writes to one key in request order:
    // concurrent jobs over the same keys then lock rows in the same order and
    // cannot deadlock (PostgreSQL). An atomic job runs to the end so that
    // its first failing item in request order is the one reported; its
    // quota is checked once, on what all its writes together did.
    let ops: Vec<_> = job.steps().collect();
    let done = exec_in_key_order(conn, &ops, !job.atomic, now).await?;
    let failure = if !job.atomic {
        None
    } else if let Some(index) = done.results.iter().position(Result::is_err) {
        let source = done.results[index]
            .as_ref()
            .err()
            .cloned()
            .unwrap_or_else(|| ApiError::internal(anyhow::anyhow!("lost a batch error")));
        Some(ApiError::BatchItem {
            index,
            key: job.ops[index].0.clone(),
            source: Box::new(source),
        })
    } else if let (Some(quota), Some(before)) =
        (job.quota, done.prepared.usage.get(&job.tenant.get()))
    {
        let after = sql::usage(conn, job.tenant.get()).await?;
        quota.check(*before, after).err()
    } else {
        None
    };
    if let Some(failure) = failure {
        if savepoint {
            conn.execute("ROLLBACK TO SAVEPOINT kvql_job").await?;
            conn.execute("RELEASE SAVEPOINT kvql_job").await?;
        }
        return Ok((Err(failure), Vec::new()));
    }
    if savepoint {
        conn.execute("RELEASE SAVEPOINT kvql_job").await?;
    }
    Ok((Ok(done.results), done.prepared.swept))
}

/// The sqlx error under an internal error, if that is what it is.
fn sqlx_error(err: &ApiError) -> Option<&sea_orm::sqlx::Error> {
    use sea_orm::{DbErr, RuntimeErr};
    let ApiError::Internal(cause) = err else {
        return None;
    };
    match cause.downcast_ref::<DbErr>()? {
        DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e))
        | DbErr::Conn(RuntimeErr::SqlxError(e)) => Some(e),
        _ => None,
    }
}

/// Whether the database aborted the transaction only because of other
/// transactions (PostgreSQL's deadlock_detected or serialization_failure),
/// so that running it again can succeed and nothing of it was written.
fn is_transient(err: &ApiError) -> bool {
    sqlx_error(err)
        .and_then(|e| e.as_database_error())
        .and_then(|d| d.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}

/// Whether a failed `COMMIT` (or autocommitted statement) was refused by the
/// database, which then rolled the transaction back. Any other failure
/// leaves the outcome unknown: the connection broke, or PostgreSQL ended the
/// session (SQLSTATE classes 08 connection, 57 operator intervention, 58
/// system, XX internal), which it may do after committing locally.
fn refused_by_database(err: &ApiError) -> bool {
    let Some(db) = sqlx_error(err).and_then(|e| e.as_database_error()) else {
        return false;
    };
    let code = db.code();
    let class = code.as_deref().filter(|c| c.len() == 5).map(|c| &c[..2]);
    !matches!(class, Some("08" | "57" | "58" | "XX"))
}

/// Whether a failure came from reaching the database (no connection, the
/// pool's timeout, a broken socket) rather than from what was asked of it:
/// the next request would most likely fail the same way.
pub(super) fn unreachable(err: &ApiError) -> bool {
    sqlx_error(err).is_some_and(|e| e.as_database_error().is_none())
}

/// Times a job is tried when PostgreSQL keeps choosing it as a deadlock victim.
const MAX_ATTEMPTS: u32 = 5;

/// Runs one job on its own: a single operation as one statement, several in
/// one transaction. A transaction PostgreSQL aborted to break a deadlock
/// (e.g. two batches touching the same keys in opposite orders) is run again.
async fn run_alone<C: GroupConn>(conn: &C, job: &Job, clock: &Clock) -> Applied {
    let mut attempt = 1;
    loop {
        let result = run_alone_once(conn, job, clock.now_ms()).await;
        match &result.0 {
            Err(e) if attempt < MAX_ATTEMPTS && is_transient(e) => {
                tracing::debug!(
                    attempt,
                    "transaction aborted by PostgreSQL (deadlock or serialization); retrying"
                );
                attempt += 1;
            }
            _ => return result,
        }
    }
}

async fn run_alone_once<C: GroupConn>(conn: &C, job: &Job, now: i64) -> Applied {
    if let Some(pool) = conn.postgres()
        && let Some(run) = Run::of(&[job])
    {
        let result = match run.write(pool, now).await {
            Ok(mut results) => results
                .pop()
                .unwrap_or_else(|| Err(ApiError::internal(anyhow::anyhow!("a job got no result")))),
            Err(e) => Err(e),
        };
        return (result, Vec::new());
    }
    // Even one write is a transaction: its revision and its change log
    // entry commit with it.
    let txn = match conn.begin_txn().await {
        Ok(txn) => txn,
        Err(e) => return (Err(e.into()), Vec::new()),
    };
    match apply(&txn, job, now, false).await {
        Ok((Ok(results), swept)) => match C::commit_txn(txn).await {
            Ok(()) => (Ok(results), swept),
            Err(e) => (Err(e.into()), Vec::new()),
        },
        Ok((Err(failed), _)) => match C::rollback_txn(txn).await {
            Ok(()) => (Err(failed), Vec::new()),
            Err(e) => (Err(e.into()), Vec::new()),
        },
        Err(e) => {
            let _ = C::rollback_txn(txn).await;
            (Err(e), Vec::new())
        }
    }
}

/// Called by the committer after each commit, in commit order, before the
/// writers hear back; also for a job that failed, whose writes may or may
/// not have been committed when the failure is a database error.
pub(super) type AfterCommit = Box<dyn Fn(&Job, &JobResult) + Send + Sync>;

/// Called by the committer after a sweep deleted rows, before the sweeper
/// hears back: in commit order with the writes around it.
pub(super) type AfterSweep = Box<dyn Fn(&[sql::Expired]) + Send + Sync>;

/// What a committer reports to the rest of the store, in commit order.
pub(super) struct Hooks {
    pub written: AfterCommit,
    pub swept: AfterSweep,
    /// The number of writes each group commit carried.
    pub grouped: Box<dyn Fn(usize) + Send + Sync>,
}

/// What the committers are asked to do.
enum Queued {
    Write {
        job: Job,
        reply: oneshot::Sender<JobResult>,
    },
    /// The sweeper's work on SQLite, on the committer's connection: SQLite
    /// keeps a single writer, and the expiries are published in commit
    /// order with the writes around them.
    Sweep {
        task: Upkeep,
        reply: oneshot::Sender<Result<usize, ApiError>>,
    },
}

/// The sweeper's work, each run in a transaction of its own.
#[derive(Clone, Copy, Debug)]
pub(super) enum Upkeep {
    /// Delete up to `limit` expired rows and log their expiries.
    Expire { limit: u32 },
    /// Remove up to `limit` change log entries made before `cutoff` (Unix
    /// ms) or beyond the newest `max_per_tenant` of their tenant.
    Compact {
        cutoff: i64,
        max_per_tenant: i64,
        limit: u32,
    },
}

/// What an [`Upkeep`] did.
pub(super) enum Upkept {
    Expired(Vec<sql::Expired>),
    Compacted(usize),
}

/// Runs `task` in a transaction of its own.
pub(super) async fn upkeep<C: GroupConn>(
    conn: &C,
    task: Upkeep,
    now: i64,
) -> Result<Upkept, ApiError> {
    let due = match task {
        Upkeep::Expire { .. } => sql::upkeep_due(conn, Some(now), None).await?,
        Upkeep::Compact {
            cutoff,
            max_per_tenant,
            ..
        } => sql::upkeep_due(conn, None, Some((cutoff, max_per_tenant))).await?,
    };
    if !due {
        return Ok(match task {
            Upkeep::Expire { .. } => Upkept::Expired(Vec::new()),
            Upkeep::Compact { .. } => Upkept::Compacted(0),
        });
    }
    let txn = conn.begin_txn().await?;
    let done = match task {
        Upkeep::Expire { limit } => expire_in(&txn, limit, now).await.map(Upkept::Expired),
        Upkeep::Compact {
            cutoff,
            max_per_tenant,
            limit,
        } => sql::compact(&txn, cutoff, max_per_tenant, limit)
            .await
            .map(Upkept::Compacted),
    };
    match done {
        Ok(done) => {
            C::commit_txn(txn).await?;
            Ok(done)
        }
        Err(e) => {
            let _ = C::rollback_txn(txn).await;
            Err(e)
        }
    }
}

/// Deletes up to `limit` expired rows and logs an `Expire` change for each,
/// at a revision of its tenant.
async fn expire_in<C: WriteConn>(
    conn: &C,
    limit: u32,
    now: i64,
) -> Result<Vec<sql::Expired>, ApiError> {
    let mut expired = sql::sweep(conn, limit, now).await?;
    if expired.is_empty() {
        return Ok(expired);
    }
    expired.sort_by(|a, b| (a.tenant, &a.key).cmp(&(b.tenant, &b.key)));
    let mut revisions = Revisions::reserve_for(conn, expired.iter().map(|e| e.tenant)).await?;
    for e in expired.iter_mut() {
        e.revision = revisions.next(e.tenant);
    }
    record(conn, &expiries(&expired, now)).await?;
    Ok(expired)
}

impl Queued {
    fn weight(&self) -> usize {
        match self {
            Queued::Write { job, .. } => job.ops.len(),
            Queued::Sweep { .. } => 1,
        }
    }
}

/// The committers' queue.
#[derive(Clone)]
pub(super) struct Committer {
    tx: mpsc::Sender<Queued>,
}

/// Most operations applied in one group transaction.
const MAX_GROUP_OPS: usize = 4096;

impl Committer {
    /// Starts `tasks` committers on `conn` sharing one queue. `after` runs
    /// in each committer's commit order; with several committers, groups of
    /// different committers may commit in either order.
    pub(super) fn start(
        conn: DatabaseConnection,
        clock: Clock,
        hooks: Hooks,
        tasks: usize,
    ) -> Committer {
        let (tx, rx) = queue::channel::<Queued>(4096);
        let hooks = std::sync::Arc::new(hooks);
        for _ in 0..tasks.max(1) {
            let (rx, hooks, conn, clock) = (rx.clone(), hooks.clone(), conn.clone(), clock.clone());
            tokio::spawn(async move {
                while let Some(group) = rx.next_group(MAX_GROUP_OPS, Queued::weight).await {
                    work(&conn, &clock, group, &hooks).await;
                }
            });
        }
        Committer { tx }
    }

    /// Starts the SQLite committer: a thread that owns its own connection to
    /// the database file, so that a group's statements run where the group
    /// is applied (see `sqlite`). Nothing it runs waits (its statements are
    /// synchronous calls into SQLite), so each group's future completes in
    /// one pass of `block_on`.
    pub(super) fn start_sqlite(
        writer: SqliteWriter,
        clock: Clock,
        hooks: Hooks,
    ) -> std::io::Result<Committer> {
        let (tx, rx) = queue::channel::<Queued>(4096);
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("kvql-committer".into())
            .spawn(move || {
                while let Some(group) = rx.blocking_next_group(MAX_GROUP_OPS, Queued::weight) {
                    runtime.block_on(work(&writer, &clock, group, &hooks));
                }
            })?;
        Ok(Committer { tx })
    }

    /// Queues what `make` builds around a reply channel and waits for the reply.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Queued,
    ) -> Result<T, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| ApiError::internal(anyhow::anyhow!("the committer has stopped")))?;
        rx.await
            .map_err(|_| ApiError::internal(anyhow::anyhow!("the committer dropped a request")))?
    }

    pub(super) async fn submit(&self, job: Job) -> JobResult {
        self.ask(|reply| Queued::Write { job, reply }).await
    }

    /// Runs `task` (see `upkeep`), reporting expiries through
    /// `Hooks::swept`; how many rows or entries it removed.
    pub(super) async fn upkeep(&self, task: Upkeep) -> Result<usize, ApiError> {
        self.ask(|reply| Queued::Sweep { task, reply }).await
    }
}

/// Applies the writes of a group as one group commit, then runs its sweeps,
/// and tells each caller its result once `hooks` have seen it.
async fn work<C: GroupConn>(conn: &C, clock: &Clock, group: Vec<Queued>, hooks: &Hooks) {
    conn.before_group();
    let mut writes = Vec::with_capacity(group.len());
    let mut sweeps = Vec::new();
    for queued in group {
        match queued {
            Queued::Write { job, reply } => writes.push((job, reply)),
            Queued::Sweep { task, reply } => sweeps.push((task, reply)),
        }
    }
    if !writes.is_empty() {
        let jobs: Vec<&Job> = writes.iter().map(|(job, _)| job).collect();
        (hooks.grouped)(jobs.len());
        let results = commit_group(conn, clock, &jobs).await;
        for ((job, reply), (result, swept)) in writes.into_iter().zip(results) {
            if !swept.is_empty() {
                (hooks.swept)(&swept);
            }
            (hooks.written)(&job, &result);
            let _ = reply.send(result);
        }
    }
    for (task, reply) in sweeps {
        let result = upkeep(conn, task, clock.now_ms())
            .await
            .map(|done| match done {
                Upkept::Expired(expired) => {
                    (hooks.swept)(&expired);
                    expired.len()
                }
                Upkept::Compacted(n) => n,
            });
        let _ = reply.send(result);
    }
}

/// Applies a group of queued jobs, one result per job (with the rows
/// expired before it, see [`Applied`]).
async fn commit_group<C: GroupConn>(conn: &C, clock: &Clock, group: &[&Job]) -> Vec<Applied> {
    if group.len() == 1 {
        return vec![run_alone(conn, group[0], clock).await];
    }
    let one_statement = conn
        .postgres()
        .and_then(|pool| Run::of(group).map(|run| (pool, run)));
    let done = match one_statement {
        Some((pool, run)) => run
            .write(pool, clock.now_ms())
            .await
            .map(|results| results.into_iter().map(|r| (r, Vec::new())).collect())
            .map_err(|e| GroupFailure::at_commit(conn, e)),
        None => run_group(conn, group, clock.now_ms()).await,
    };
    let failure = match done {
        Ok(results) => return results,
        Err(failure) => failure,
    };
    match failure {
        GroupFailure::Unknown(e) | GroupFailure::NotStarted(e) => {
            tracing::error!(error = ?e, jobs = group.len(), "group commit failed; its writes are not run again");
            group.iter().map(|_| (Err(e.clone()), Vec::new())).collect()
        }
        GroupFailure::RolledBack(e) => {
            if is_transient(&e) {
                tracing::debug!(
                    jobs = group.len(),
                    "group transaction aborted by PostgreSQL; retrying each write alone"
                );
            } else {
                tracing::warn!(error = ?e, jobs = group.len(), "group commit failed; retrying each write alone");
            }
            let mut results: Vec<Applied> = Vec::with_capacity(group.len());
            for job in group {
                // When the database cannot be reached, the rest would each
                // wait for the pool's timeout in turn: they fail at once.
                let result = match results.last() {
                    Some((Err(e), _)) if unreachable(e) => (Err(e.clone()), Vec::new()),
                    _ => run_alone(conn, job, clock).await,
                };
                results.push(result);
            }
            results
        }
    }
}

/// The writes of one or more jobs that PostgreSQL can apply as one
/// statement (`sql::write_run_postgres`): creations, or puts without
/// conditions, of distinct keys. An atomic job qualifies only with puts,
/// which cannot fail one by one; a job with a quota does not (its writes
/// are checked against it in a transaction).
struct Run<'a> {
    create_only: bool,
    /// `(job, operation)` positions, sorted by `(tenant, key)`.
    order: Vec<(usize, usize)>,
    rows: Vec<(TenantId, &'a Item)>,
    /// Operations per job.
    sizes: Vec<usize>,
}

/// Most writes in one statement: beyond, a group takes the transaction path.
const MAX_RUN: usize = 1024;

impl<'a> Run<'a> {
    fn of(jobs: &[&'a Job]) -> Option<Run<'a>> {
        let mut create_only = None;
        let mut found = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            if job.quota.is_some() {
                return None;
            }
            for (o, (_, op)) in job.ops.iter().enumerate() {
                let (create, item) = mergeable(op.as_ref().ok()?)?;
                if *create_only.get_or_insert(create) != create || (create && job.atomic) {
                    return None;
                }
                found.push((job.tenant, item, (j, o)));
            }
        }
        if found.is_empty() || found.len() > MAX_RUN {
            return None;
        }
        found.sort_by(|a, b| (a.0.get(), a.1.key.as_str()).cmp(&(b.0.get(), b.1.key.as_str())));
        if found
            .windows(2)
            .any(|w| w[0].0 == w[1].0 && w[0].1.key.as_str() == w[1].1.key.as_str())
        {
            return None;
        }
        Some(Run {
            create_only: create_only?,
            order: found.iter().map(|f| f.2).collect(),
            rows: found.iter().map(|f| (f.0, f.1)).collect(),
            sizes: jobs.iter().map(|j| j.ops.len()).collect(),
        })
    }

    /// Writes the run; one result per job.
    async fn write(
        self,
        pool: &sea_orm::sqlx::PgPool,
        now: i64,
    ) -> Result<Vec<JobResult>, ApiError> {
        let written = sql::write_run_postgres(pool, self.create_only, &self.rows, now).await?;
        let mut results: Vec<Vec<Option<Result<Outcome, ApiError>>>> = self
            .sizes
            .iter()
            .map(|n| std::iter::repeat_with(|| None).take(*n).collect())
            .collect();
        for ((j, o), result) in self.order.into_iter().zip(written) {
            results[j][o] =
                Some(result.map(|(object, created)| Outcome::Written { object, created }));
        }
        Ok(results.into_iter().map(|ops| Ok(filled(ops))).collect())
    }
}

/// Why a group transaction wrote nothing, or may have.
enum GroupFailure {
    /// Rolled back: nothing of the group was written.
    RolledBack(ApiError),
    /// The commit failed without an answer from the database.
    Unknown(ApiError),
    /// The transaction could not begin: nothing was written.
    NotStarted(ApiError),
}

impl GroupFailure {
    /// A failed `COMMIT`: rolled back if the database refused it, else of
    /// unknown outcome.
    fn at_commit(conn: &impl GroupConn, e: ApiError) -> Self {
        if conn.refused(&e) {
            GroupFailure::RolledBack(e)
        } else {
            GroupFailure::Unknown(e)
        }
    }
}

/// Runs several jobs in one transaction. Consecutive jobs that are not
/// atomic are applied as one sequence of operations, so that their writes
/// share multi-row statements; an atomic job runs on its own savepoint.
async fn run_group<C: GroupConn>(
    conn: &C,
    jobs: &[&Job],
    now: i64,
) -> Result<Vec<Applied>, GroupFailure> {
    // A group that cannot even begin wrote nothing; its writes fail at once
    // rather than each waiting for the pool again.
    let txn = conn
        .begin_txn()
        .await
        .map_err(|e| GroupFailure::NotStarted(e.into()))?;
    match run_group_in(&txn, jobs, now).await {
        Ok(results) => match C::commit_txn(txn).await {
            Ok(()) => Ok(results),
            Err(e) => Err(GroupFailure::at_commit(conn, e.into())),
        },
        Err(e) => {
            let _ = C::rollback_txn(txn).await;
            Err(GroupFailure::RolledBack(e))
        }
    }
}

/// Runs the jobs of a group; the rows expired before a sequence of jobs'
/// writes are reported with its first job.
async fn run_group_in<C: WriteConn>(
    conn: &C,
    jobs: &[&Job],
    now: i64,
) -> Result<Vec<Applied>, ApiError> {
    let mut results = Vec::with_capacity(jobs.len());
    let mut i = 0;
    while i < jobs.len() {
        if jobs[i].atomic {
            results.push(apply(conn, jobs[i], now, true).await?);
            i += 1;
            continue;
        }
        let end = jobs[i..]
            .iter()
            .position(|j| j.atomic)
            .map_or(jobs.len(), |p| i + p);
        let ops: Vec<_> = jobs[i..end].iter().flat_map(|j| j.steps()).collect();
        let done = exec_in_key_order(conn, &ops, true, now).await?;
        let mut swept = done.prepared.swept;
        let mut flat = done.results.into_iter();
        for job in &jobs[i..end] {
            let results_of_job = Ok(flat.by_ref().take(job.ops.len()).collect());
            results.push((results_of_job, std::mem::take(&mut swept)));
        }
        i = end;
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql::tests::{
        remove_database_files, sqlite_with_deferred_checks, writer_with_deferred_checks,
    };
    use crate::store::types::Data;
    use sea_orm::ConnectionTrait;

    fn put(tenant: i64, key: &str) -> Job {
        let item = Item {
            key: Key::parse(key.to_owned()).expect("key"),
            data: Data::parse(&serde_json::json!(key), 1024).expect("data"),
            ttl: None,
        };
        Job {
            tenant: TenantId::for_store_tests(tenant),
            ops: vec![(key.to_owned(), Ok(Op::Put(item, Expect::Any)))],
            atomic: false,
            quota: None,
        }
    }

    fn create(tenant: i64, key: &str) -> Job {
        let mut job = put(tenant, key);
        if let Some((_, Ok(Op::Put(item, _)))) = job.ops.pop() {
            job.ops.push((key.to_owned(), Ok(Op::Create(item))));
        }
        job
    }

    async fn keys_stored(conn: &DatabaseConnection) -> Vec<(i64, String)> {
        let rows = conn
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Sqlite,
                r#"SELECT tenant_id, "key" FROM object ORDER BY "key""#,
            ))
            .await
            .expect("rows");
        rows.iter()
            .map(|r| {
                (
                    r.try_get("", "tenant_id").expect("t"),
                    r.try_get("", "key").expect("k"),
                )
            })
            .collect()
    }

    /// The second job names a tenant that does not exist: its row breaks a
    /// foreign key checked only at COMMIT, which fails the whole group; the
    /// other jobs are then written alone. `own_writer`: on the SQLite
    /// committer's own connection, else on sqlx's.
    async fn refused_group_writes_the_others(third: Job, own_writer: bool) {
        assert!(!third.atomic);
        let (conn, path) = sqlite_with_deferred_checks().await;
        conn.execute_unprepared("INSERT INTO tenant (id, name, created_at) VALUES (1, 't', 0)")
            .await
            .expect("tenant");
        let (a, b) = (put(1, "a"), put(404, "b"));
        let group = [&a, &b, &third];
        let applied = if own_writer {
            let writer = writer_with_deferred_checks(&path).await;
            commit_group(&writer, &Clock::manual(), &group).await
        } else {
            commit_group(&conn, &Clock::manual(), &group).await
        };
        let results: Vec<JobResult> = applied.into_iter().map(|(r, _)| r).collect();
        assert_eq!(results.len(), 3);
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert!(results[1].is_err(), "{:?}", results[1]);
        assert!(results[2].is_ok(), "{:?}", results[2]);
        assert_eq!(
            keys_stored(&conn).await,
            vec![(1, "a".to_owned()), (1, "c".to_owned())]
        );
        drop(conn);
        remove_database_files(&path);
    }

    #[tokio::test]
    async fn a_group_of_puts_whose_commit_is_refused_writes_every_other_job_alone() {
        refused_group_writes_the_others(put(1, "c"), false).await;
    }

    #[tokio::test]
    async fn a_group_of_mixed_writes_whose_commit_is_refused_writes_every_other_job_alone() {
        refused_group_writes_the_others(create(1, "c"), false).await;
    }

    #[tokio::test]
    async fn on_the_sqlite_committers_connection_a_refused_group_of_puts_writes_the_others_alone() {
        refused_group_writes_the_others(put(1, "c"), true).await;
    }

    #[tokio::test]
    async fn on_the_sqlite_committers_connection_a_refused_group_of_mixed_writes_writes_the_others_alone()
     {
        refused_group_writes_the_others(create(1, "c"), true).await;
    }

    /// A `COMMIT` that SQLite refuses leaves the transaction open; the writer
    /// rolls it back, so that nothing of it is written and the connection
    /// can begin the next one.
    #[tokio::test]
    async fn the_sqlite_committers_connection_rolls_back_a_refused_commit() {
        let (conn, path) = sqlite_with_deferred_checks().await;
        let writer = writer_with_deferred_checks(&path).await;
        let txn = writer.begin_txn().await.expect("begin");
        txn.execute(
            "INSERT INTO object (tenant_id, \"key\", data, version, created_at, updated_at) \
             VALUES (404, 'x', '1', 1, 0, 0)",
        )
        .await
        .expect("insert");
        let refused = SqliteWriter::commit_txn(txn)
            .await
            .map_err(ApiError::from)
            .expect_err("the foreign key fails at COMMIT");
        assert!(writer.refused(&refused), "{refused:?}");
        assert_eq!(keys_stored(&conn).await, vec![]);
        let txn = writer.begin_txn().await.expect("a new transaction begins");
        SqliteWriter::rollback_txn(txn).await.expect("rollback");
        drop((writer, conn));
        remove_database_files(&path);
    }
}
