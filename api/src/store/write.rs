//! How writes reach the database.
//!
//! A request's writes form a job: one or more operations for one tenant,
//! applied in order (by key, writes to one key in request order, wherever a
//! job has statements of its own: concurrent transactions then lock rows in
//! one order), each failing on its own or (atomic) all together. On
//! PostgreSQL a job runs in the request's task on the pool. On SQLite, which
//! has one writer at a time, every job goes to one committer task that owns
//! the writer connection and applies the jobs queued at that moment in one
//! transaction: group commit, one commit (one fsync with
//! `synchronous=FULL`) for many concurrent writers. Jobs never see each
//! other's failures: an atomic job rolls back to its own savepoint, and if the
//! group's transaction itself fails, each job is retried alone.

use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
use tokio::sync::{mpsc, oneshot};

use super::types::{Expect, Key};
use super::{Item, Object, sql};
use crate::auth::TenantId;
use crate::clock::Clock;
use crate::error::ApiError;

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
    Written { object: Object, created: bool },
    Deleted { key: String, version: i64 },
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
}

async fn exec<C: ConnectionTrait>(
    conn: &C,
    tenant: TenantId,
    op: &Op,
    now: i64,
) -> Result<Outcome, ApiError> {
    match op {
        Op::Create(item) => {
            sql::create(conn, tenant, item, now)
                .await
                .map(|object| Outcome::Written {
                    object,
                    created: true,
                })
        }
        Op::Put(item, expect) => sql::put(conn, tenant, item, *expect, now)
            .await
            .map(|(object, created)| Outcome::Written { object, created }),
        Op::Delete(key, expected) => {
            sql::delete(conn, tenant, key, *expected, now)
                .await
                .map(|version| Outcome::Deleted {
                    key: key.as_str().to_owned(),
                    version,
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
/// to distinct keys into multi-row statements. `Err` only for database
/// failures.
async fn exec_seq<C: ConnectionTrait>(
    conn: &C,
    ops: &[(TenantId, Result<&Op, &ApiError>)],
    now: i64,
) -> Result<Vec<Result<Outcome, ApiError>>, ApiError> {
    let mut results: Vec<Result<Outcome, ApiError>> = Vec::with_capacity(ops.len());
    let mut i = 0;
    while i < ops.len() {
        let run_kind = match &ops[i].1 {
            Ok(op) => mergeable(op).map(|(create, _)| create),
            Err(_) => None,
        };
        let mut run: Vec<(TenantId, &Item)> = Vec::new();
        if let Some(create) = run_kind {
            let mut seen = std::collections::HashSet::new();
            for (tenant, op) in &ops[i..] {
                match op.ok().and_then(|op| mergeable(op)) {
                    Some((c, item))
                        if c == create && seen.insert((tenant.get(), item.key.as_str())) =>
                    {
                        run.push((*tenant, item))
                    }
                    _ => break,
                }
            }
        }
        if run.len() >= 2 {
            let create = run_kind == Some(true);
            let n = run.len();
            for r in sql::write_many(conn, create, &run, now).await? {
                results.push(r.map(|(object, created)| Outcome::Written { object, created }));
            }
            i += n;
        } else {
            let (tenant, op) = &ops[i];
            let result = match op {
                Ok(op) => exec(conn, *tenant, op, now).await,
                Err(e) => Err((*e).clone()),
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

/// Applies a job's operations in order on `conn`. `Err` means the database
/// failed and the caller must roll back; `Ok(Err(_))` is an atomic job that
/// failed and wrote nothing (rolled back to `savepoint`, when given).
async fn apply<C: ConnectionTrait>(
    conn: &C,
    job: &Job,
    now: i64,
    savepoint: bool,
) -> Result<JobResult, ApiError> {
    let savepoint = savepoint && job.atomic;
    if savepoint {
        conn.execute_unprepared("SAVEPOINT kvql_job").await?;
    }
    // Operations run in key order, and writes to one key in request order:
    // concurrent jobs over the same keys then lock rows in the same order and
    // cannot deadlock (PostgreSQL). An atomic job runs to the end so that
    // its first failing item in request order is the one reported.
    let mut order: Vec<usize> = (0..job.ops.len()).collect();
    order.sort_by(|&a, &b| job.ops[a].0.cmp(&job.ops[b].0));
    let ops: Vec<_> = order
        .iter()
        .map(|&i| (job.tenant, job.ops[i].1.as_ref()))
        .collect();
    let mut by_index: Vec<Option<Result<Outcome, ApiError>>> = Vec::new();
    by_index.resize_with(ops.len(), || None);
    for (position, result) in exec_seq(conn, &ops, now).await?.into_iter().enumerate() {
        by_index[order[position]] = Some(result);
    }
    let results: Vec<Result<Outcome, ApiError>> = by_index
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(ApiError::internal(anyhow::anyhow!(
                    "an operation got no result"
                )))
            })
        })
        .collect();
    if job.atomic
        && let Some(index) = results.iter().position(Result::is_err)
    {
        if savepoint {
            conn.execute_unprepared("ROLLBACK TO SAVEPOINT kvql_job")
                .await?;
            conn.execute_unprepared("RELEASE SAVEPOINT kvql_job")
                .await?;
        }
        let source = results
            .into_iter()
            .nth(index)
            .and_then(Result::err)
            .unwrap_or_else(|| ApiError::internal(anyhow::anyhow!("lost a batch error")));
        return Ok(Err(ApiError::BatchItem {
            index,
            key: job.ops[index].0.clone(),
            source: Box::new(source),
        }));
    }
    if savepoint {
        conn.execute_unprepared("RELEASE SAVEPOINT kvql_job")
            .await?;
    }
    Ok(Ok(results))
}

/// Whether the database aborted the transaction only because of other
/// transactions (PostgreSQL's deadlock_detected or serialization_failure),
/// so that running it again can succeed and nothing of it was written.
pub(super) fn is_transient(err: &ApiError) -> bool {
    use sea_orm::{DbErr, RuntimeErr};
    let ApiError::Internal(cause) = err else {
        return false;
    };
    let Some(DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e))) =
        cause.downcast_ref::<DbErr>()
    else {
        return false;
    };
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}

/// Runs one job on its own: a single operation as one statement, several in
/// one transaction.
pub(super) async fn run_alone(conn: &DatabaseConnection, job: &Job, now: i64) -> JobResult {
    if job.ops.len() == 1 {
        return apply(conn, job, now, false).await?;
    }
    let txn = conn.begin().await?;
    match apply(&txn, job, now, false).await {
        Ok(Ok(results)) => {
            txn.commit().await?;
            Ok(results)
        }
        Ok(Err(failed)) => {
            txn.rollback().await?;
            Err(failed)
        }
        Err(e) => {
            let _ = txn.rollback().await;
            Err(e)
        }
    }
}

/// Called by the committer after each commit, in commit order, before the
/// writers hear back.
pub(super) type AfterCommit = Box<dyn Fn(TenantId, &JobResult) + Send + Sync>;

struct Queued {
    job: Job,
    reply: oneshot::Sender<JobResult>,
}

/// The SQLite committer's queue.
#[derive(Clone)]
pub(super) struct Committer {
    tx: mpsc::Sender<Queued>,
}

/// Most operations applied in one group transaction.
const MAX_GROUP_OPS: usize = 4096;

impl Committer {
    pub(super) fn start(conn: DatabaseConnection, clock: Clock, after: AfterCommit) -> Committer {
        let (tx, mut rx) = mpsc::channel::<Queued>(4096);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut ops = first.job.ops.len();
                let mut group = vec![first];
                while ops < MAX_GROUP_OPS {
                    match rx.try_recv() {
                        Ok(next) => {
                            ops += next.job.ops.len();
                            group.push(next);
                        }
                        Err(_) => break,
                    }
                }
                let now = clock.now_ms();
                let results = if group.len() == 1 {
                    vec![run_alone(&conn, &group[0].job, now).await]
                } else {
                    let refs: Vec<&Job> = group.iter().map(|q| &q.job).collect();
                    match run_group(&conn, &refs, now).await {
                        Ok(results) => results,
                        Err(e) => {
                            tracing::warn!(error = ?e, jobs = group.len(), "group commit failed; retrying each write alone");
                            let mut results = Vec::with_capacity(group.len());
                            for q in &group {
                                results.push(run_alone(&conn, &q.job, now).await);
                            }
                            results
                        }
                    }
                };
                for (q, result) in group.into_iter().zip(results) {
                    after(q.job.tenant, &result);
                    let _ = q.reply.send(result);
                }
            }
        });
        Committer { tx }
    }

    pub(super) async fn submit(&self, job: Job) -> JobResult {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Queued { job, reply })
            .await
            .map_err(|_| ApiError::internal(anyhow::anyhow!("the committer has stopped")))?;
        rx.await
            .map_err(|_| ApiError::internal(anyhow::anyhow!("the committer dropped a write")))?
    }
}

/// Runs several jobs in one transaction. Consecutive jobs that are not
/// atomic are applied as one sequence of operations, so that their writes
/// share multi-row statements; an atomic job runs on its own savepoint.
async fn run_group(
    conn: &DatabaseConnection,
    jobs: &[&Job],
    now: i64,
) -> Result<Vec<JobResult>, ApiError> {
    let txn = conn.begin().await?;
    match run_group_in(&txn, jobs, now).await {
        Ok(results) => {
            txn.commit().await?;
            Ok(results)
        }
        Err(e) => {
            let _ = txn.rollback().await;
            Err(e)
        }
    }
}

async fn run_group_in<C: ConnectionTrait>(
    conn: &C,
    jobs: &[&Job],
    now: i64,
) -> Result<Vec<JobResult>, ApiError> {
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
        let ops: Vec<_> = jobs[i..end]
            .iter()
            .flat_map(|j| j.ops.iter().map(|(_, op)| (j.tenant, op.as_ref())))
            .collect();
        let mut flat = exec_seq(conn, &ops, now).await?.into_iter();
        for job in &jobs[i..end] {
            results.push(Ok(flat.by_ref().take(job.ops.len()).collect()));
        }
        i = end;
    }
    Ok(results)
}
