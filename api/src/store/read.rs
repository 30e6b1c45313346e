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
//! is a thread with its own connection to the file: a batch is read where
//! it is taken, with no hop to a pool's worker thread and back (each hop is
//! a thread wake-up, and those bounded reads that miss the cache).

use std::collections::HashMap;
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

/// The readers' queue.
#[derive(Clone)]
pub(super) struct Reader {
    tx: mpsc::Sender<Lookup>,
}

impl Reader {
    /// Starts `readers` readers: threads with their own connections on
    /// SQLite, tasks on `db`'s read pool on PostgreSQL.
    pub(super) fn start(db: Db, clock: Clock, readers: usize) -> Reader {
        let (tx, rx) = queue::channel::<Lookup>(4096);
        let max = sql::max_rows_per_statement(db.backend);
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
        Reader { tx }
    }

    /// The live value under `key`, if any.
    pub(super) async fn get(&self, tenant: TenantId, key: &str) -> Answer {
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
