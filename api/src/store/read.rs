//! How point reads reach the database: read coalescing.
//!
//! A `get` that the cache cannot answer queues its (tenant, key). A few
//! readers share the queue; each takes every lookup waiting at that moment
//! and asks for all of them in one statement per tenant (see
//! `sql::select_keys_*`), then answers each caller. Under load one round
//! trip to the database serves many requests; a lone request waits for
//! nothing, as its batch is itself. A statement only ever names one tenant,
//! and answers are matched by tenant and key, so a lookup never sees another
//! tenant's row.
//!
//! On PostgreSQL the readers are tasks on sqlx's pool. On SQLite each reader
//! is a thread with its own connection to the file, which waits for the
//! file as long as sqlx's connections do.
//!
//! On SQLite (unless `KVQL_SQLITE_READS_IN_PLACE=false`) a read is first
//! tried where the request runs, so the queue only sees what that cannot
//! answer: each thread that reads keeps its own connection to the file,
//! which answers one key in a few microseconds through the memory map, with
//! no hop to a reader thread and back (each hop is two thread wake-ups, and
//! those bounded reads that miss the cache). These connections have no busy
//! timeout: a read that finds the file busy (SQLite's `SQLITE_BUSY`, as
//! while a crashed process's log is recovered) goes to the queue, and so
//! does every read of a thread that could not open its connection, until it
//! tries again a second later. The price is that a read blocks its thread
//! while it runs: a disk read, for a page the kernel does not hold in memory.
//!
//! A thread's connection to a store that has been dropped is closed at the
//! thread's next read in place, or when the thread ends.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{Object, queue, sql};
use crate::auth::TenantId;
use crate::clock::Clock;
use crate::db::Db;
use crate::error::ApiError;

type Answer = Result<Option<Object>, ApiError>;

struct Lookup {
    tenant: TenantId,
    key: String,
    reply: oneshot::Sender<Answer>,
}

/// The readers' queue, and on SQLite the file for reads on the caller's thread.
#[derive(Clone)]
pub(super) struct Reader {
    tx: mpsc::Sender<Lookup>,
    here: Option<Arc<File>>,
}

/// The SQLite file that threads read in place. Its `Arc` is the identity of
/// the store for the threads' connections.
struct File {
    path: PathBuf,
    mmap_bytes: u64,
}

/// A thread's connection to one store's file.
struct Place {
    store: Weak<File>,
    /// `Err(when)`: the open failed; try again after `when`.
    conn: Result<rusqlite::Connection, Instant>,
}

/// How long a thread that could not open its connection leaves reads to the queue.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

thread_local! {
    /// This thread's connections, one per open SQLite store (a test process
    /// runs several).
    static PLACES: RefCell<Vec<Place>> = const { RefCell::new(Vec::new()) };
}

impl File {
    /// The live value under `key`, read on this thread; `None` when the read
    /// must go to the queue instead (see the module's documentation).
    fn get(self: &Arc<Self>, tenant: TenantId, key: &str, now: i64) -> Option<Answer> {
        PLACES
            .try_with(|places| {
                let mut places = places.try_borrow_mut().ok()?;
                places.retain(|p| p.store.strong_count() > 0);
                let mine = |p: &Place| std::ptr::eq(p.store.as_ptr(), Arc::as_ptr(self));
                let at = match places.iter().position(mine) {
                    Some(at) => at,
                    None => {
                        places.push(Place {
                            store: Arc::downgrade(self),
                            conn: Err(Instant::now()),
                        });
                        places.len() - 1
                    }
                };
                let place = &mut places[at];
                if let Err(when) = place.conn {
                    if Instant::now() < when {
                        return None;
                    }
                    place.conn = self.open().map_err(|e| {
                        tracing::warn!(
                            error = %e,
                            "cannot open a SQLite connection to read in place; this thread's \
                             reads go to the reader threads for a second"
                        );
                        Instant::now() + REOPEN_AFTER
                    });
                }
                let conn = place.conn.as_ref().ok()?;
                match sql::select_key_sqlite(conn, tenant, key, now) {
                    Err(rusqlite::Error::SqliteFailure(f, _))
                        if matches!(
                            f.code,
                            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                        ) =>
                    {
                        None
                    }
                    found => Some(found.map_err(|e| ApiError::internal(anyhow::Error::new(e)))),
                }
            })
            .ok()
            .flatten()
    }

    fn open(&self) -> rusqlite::Result<rusqlite::Connection> {
        let conn = sql::open_sqlite_reader(&self.path, self.mmap_bytes)?;
        conn.busy_timeout(Duration::ZERO)?;
        Ok(conn)
    }
}

impl Reader {
    /// Starts `readers` readers: threads with their own connections on
    /// SQLite, tasks on `db`'s read pool on PostgreSQL; on SQLite, reads in
    /// place too unless `db` says otherwise.
    pub(super) fn start(db: Db, clock: Clock, readers: usize) -> Reader {
        let (tx, rx) = queue::channel::<Lookup>(4096);
        let max = sql::max_rows_per_statement(db.backend);
        let in_place = db.sqlite_file.clone().filter(|_| db.sqlite_reads_in_place);
        let here = in_place.map(|path| {
            Arc::new(File {
                path,
                mmap_bytes: db.sqlite_mmap_bytes,
            })
        });
        for n in 0..readers.max(1) {
            let (rx, db, clock) = (rx.clone(), db.clone(), clock.clone());
            match db.sqlite_file.clone() {
                Some(path) => {
                    let mmap_bytes = db.sqlite_mmap_bytes;
                    let spawned = std::thread::Builder::new()
                        .name(format!("kvql-reader-{n}"))
                        .spawn(move || {
                            let mut conn = None;
                            while let Some(batch) = rx.blocking_next_group(max, |_| 1) {
                                read_sqlite(&path, mmap_bytes, &mut conn, clock.now_ms(), batch);
                            }
                        });
                    if let Err(e) = spawned {
                        tracing::error!(error = %e, "cannot start a reader thread");
                    }
                }
                None => {
                    tokio::spawn(async move {
                        while let Some(batch) = rx.next_group(max, |_| 1).await {
                            read_postgres(&db, clock.now_ms(), batch).await;
                        }
                    });
                }
            }
        }
        Reader { tx, here }
    }

    /// The live value under `key`, if any. A read in place checks expiry at
    /// `now`; a reader, at the time it reads.
    pub(super) async fn get(&self, tenant: TenantId, key: &str, now: i64) -> Answer {
        if let Some(answer) = self.here.as_ref().and_then(|f| f.get(tenant, key, now)) {
            return answer;
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Lookup {
                tenant,
                key: key.to_owned(),
                reply,
            })
            .await
            .map_err(|_| ApiError::internal(anyhow::anyhow!("the readers have stopped")))?;
        rx.await
            .map_err(|_| ApiError::internal(anyhow::anyhow!("a reader dropped a lookup")))?
    }
}

/// The lookups of a batch, by tenant.
fn by_tenant(batch: Vec<Lookup>) -> Vec<(TenantId, Vec<Lookup>)> {
    let mut by_tenant: HashMap<i64, (TenantId, Vec<Lookup>)> = HashMap::new();
    for lookup in batch {
        by_tenant
            .entry(lookup.tenant.get())
            .or_insert_with(|| (lookup.tenant, Vec::new()))
            .1
            .push(lookup);
    }
    by_tenant.into_values().collect()
}

fn distinct_keys(lookups: &[Lookup]) -> Vec<&str> {
    let mut keys: Vec<&str> = lookups.iter().map(|l| l.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Answers one tenant's lookups from what its statement found.
fn reply(lookups: Vec<Lookup>, found: Result<Vec<Object>, ApiError>) {
    match found {
        Ok(found) => {
            let found: HashMap<String, Object> =
                found.into_iter().map(|o| (o.key.clone(), o)).collect();
            for lookup in lookups {
                let _ = lookup.reply.send(Ok(found.get(&lookup.key).cloned()));
            }
        }
        Err(e) => {
            for lookup in lookups {
                let _ = lookup.reply.send(Err(e.clone()));
            }
        }
    }
}

async fn read_postgres(db: &Db, now: i64, batch: Vec<Lookup>) {
    // When the database cannot be reached, the other tenants' lookups fail
    // at once instead of each waiting for the pool's timeout in turn.
    let mut unreachable: Option<ApiError> = None;
    for (tenant, lookups) in by_tenant(batch) {
        let found = match &unreachable {
            Some(e) => Err(e.clone()),
            None => sql::select_keys_postgres(db, tenant, &distinct_keys(&lookups), now).await,
        };
        if let Err(e) = &found
            && super::write::unreachable(e)
        {
            unreachable = Some(e.clone());
        }
        reply(lookups, found);
    }
}

/// Reads a batch on a SQLite reader thread, opening its connection first if
/// it has none (a failed open is tried again with the next batch).
fn read_sqlite(
    path: &std::path::Path,
    mmap_bytes: u64,
    conn: &mut Option<rusqlite::Connection>,
    now: i64,
    batch: Vec<Lookup>,
) {
    let conn = match conn {
        Some(conn) => conn,
        None => match sql::open_sqlite_reader(path, mmap_bytes) {
            Ok(opened) => conn.insert(opened),
            Err(e) => {
                let e = ApiError::internal(
                    anyhow::Error::new(e).context("cannot open a reader connection"),
                );
                for (_, lookups) in by_tenant(batch) {
                    reply(lookups, Err(e.clone()));
                }
                return;
            }
        },
    };
    for (tenant, lookups) in by_tenant(batch) {
        let found = sql::select_keys_sqlite(conn, tenant, &distinct_keys(&lookups), now);
        reply(lookups, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql::tests::{remove_database_files, sqlite_with_deferred_checks};
    use sea_orm::{ConnectionTrait, DatabaseConnection};
    use std::future::Future;

    /// A migrated SQLite file holding one object, `k` of tenant 1 at version
    /// 3, and a `Db` on it.
    async fn one_object(reads_in_place: bool) -> (DatabaseConnection, PathBuf, Db) {
        let (conn, path) = sqlite_with_deferred_checks().await;
        conn.execute_unprepared("INSERT INTO tenant (id, name, created_at) VALUES (1, 't', 0)")
            .await
            .expect("tenant");
        conn.execute_unprepared(
            "INSERT INTO object (tenant_id, \"key\", data, version, created_at, updated_at) \
             VALUES (1, 'k', '{\"a\":1}', 3, 0, 0)",
        )
        .await
        .expect("object");
        let db = Db {
            read: conn.clone(),
            write: conn.clone(),
            backend: sea_orm::DatabaseBackend::Sqlite,
            sqlite_file: Some(path.clone()),
            sqlite_synchronous: crate::config::SqliteSync::Normal,
            sqlite_mmap_bytes: 1 << 20,
            sqlite_reads_in_place: reads_in_place,
            committers: 1,
        };
        (conn, path, db)
    }

    fn version(answer: Option<Answer>) -> Option<i64> {
        answer
            .expect("read in place")
            .expect("no error")
            .map(|o| o.version)
    }

    async fn journal_mode(conn: &DatabaseConnection) -> String {
        conn.query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Sqlite,
            "PRAGMA journal_mode",
        ))
        .await
        .expect("journal_mode")
        .expect("a row")
        .try_get_by_index(0)
        .expect("text")
    }

    /// Another connection holds the file locked: a read in place does not
    /// wait for it but goes to the queue, whose reader thread waits and
    /// answers once the lock is gone. In WAL mode only the recovery of a
    /// crashed process's log makes readers busy, which a test cannot hold
    /// open; this file is in rollback-journal mode, where a writer's
    /// exclusive lock gives readers the same `SQLITE_BUSY`.
    #[tokio::test(flavor = "current_thread")]
    async fn a_read_that_finds_the_file_locked_waits_on_a_reader_thread_not_in_place() {
        let (conn, path, db) = one_object(true).await;
        assert_ne!(journal_mode(&conn).await, "wal");
        let reader = Reader::start(db, Clock::manual(), 1);
        let here = reader.here.clone().expect("SQLite reads in place");
        let tenant = TenantId::for_store_tests(1);
        let read_in_place = || here.get(tenant, "k", 0);
        assert_eq!(version(read_in_place()), Some(3));

        let lock = sql::open_sqlite(&path).expect("open");
        lock.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .expect("exclusive mode");
        lock.execute_batch("BEGIN EXCLUSIVE; UPDATE object SET version = 4; COMMIT")
            .expect("the lock is taken at the first write and kept");
        assert!(
            read_in_place().is_none(),
            "a read in place waited for the lock or failed"
        );

        let found = {
            let mut queued = std::pin::pin!(reader.get(tenant, "k", 0));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(
                queued.as_mut().poll(&mut cx).is_pending(),
                "the read did not wait for the reader thread"
            );
            drop(lock);
            queued.await.expect("answered once the lock is gone")
        };
        assert_eq!(found.map(|o| o.version), Some(4));
        assert_eq!(version(read_in_place()), Some(4));

        drop((reader, here, conn));
        remove_database_files(&path);
    }

    /// In WAL mode, as kvql runs, a thread's connection keeps no snapshot
    /// between reads: it sees a write committed after its last read, and a
    /// checkpoint can take the whole log back into the file.
    #[tokio::test(flavor = "current_thread")]
    async fn a_read_in_place_sees_later_writes_and_holds_back_no_checkpoint() {
        let (conn, path, db) = one_object(true).await;
        conn.execute_unprepared("PRAGMA journal_mode = WAL")
            .await
            .expect("WAL");
        assert_eq!(journal_mode(&conn).await, "wal");
        let reader = Reader::start(db, Clock::manual(), 1);
        let here = reader.here.clone().expect("SQLite reads in place");
        let tenant = TenantId::for_store_tests(1);
        assert_eq!(version(here.get(tenant, "k", 0)), Some(3));
        conn.execute_unprepared("UPDATE object SET version = 4")
            .await
            .expect("update");
        assert_eq!(version(here.get(tenant, "k", 0)), Some(4));
        assert_eq!(version(here.get(tenant, "absent", 0)), None);
        let checkpoint = conn
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Sqlite,
                "PRAGMA wal_checkpoint(TRUNCATE)",
            ))
            .await
            .expect("checkpoint")
            .expect("a row");
        let busy: i64 = checkpoint.try_get_by_index(0).expect("busy");
        assert_eq!(
            busy, 0,
            "a connection reading in place held back the checkpoint"
        );
        drop((reader, here, conn));
        remove_database_files(&path);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn with_reads_in_place_off_every_read_goes_to_the_reader_threads() {
        let (conn, path, db) = one_object(false).await;
        let reader = Reader::start(db, Clock::manual(), 1);
        assert!(reader.here.is_none());
        let tenant = TenantId::for_store_tests(1);
        let found = reader.get(tenant, "k", 0).await.expect("read");
        assert_eq!(found.map(|o| o.version), Some(3));
        drop((reader, conn));
        remove_database_files(&path);
    }
}
