//! How point reads reach the database: read coalescing.
//!
//! A `get` that the cache cannot answer queues its (tenant, key). A few
//! reader tasks share the queue; each takes every lookup waiting at that
//! moment and asks for all of them in one statement per tenant (see
//! `sql::select_keys`), then answers each caller. Under load one round trip to the
//! database (or on SQLite one hop to its worker thread) serves many
//! requests; a lone request waits for nothing, as its batch is itself. A
//! statement only ever names one tenant, and answers are matched by tenant
//! and key, so a lookup never sees another tenant's row.

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
    /// Starts `tasks` readers on `db`'s read pool.
    pub(super) fn start(db: Db, clock: Clock, tasks: usize) -> Reader {
        let (tx, rx) = queue::channel::<Lookup>(4096);
        let max = sql::max_rows_per_statement(db.backend);
        for _ in 0..tasks.max(1) {
            let (rx, db, clock) = (rx.clone(), db.clone(), clock.clone());
            tokio::spawn(async move {
                while let Some(batch) = rx.next_group(max, |_| 1).await {
                    answer(&db, clock.now_ms(), batch).await;
                }
            });
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

async fn answer(db: &Db, now: i64, batch: Vec<Lookup>) {
    let mut by_tenant: HashMap<i64, (TenantId, Vec<Lookup>)> = HashMap::new();
    for lookup in batch {
        by_tenant
            .entry(lookup.tenant.get())
            .or_insert_with(|| (lookup.tenant, Vec::new()))
            .1
            .push(lookup);
    }
    // When the database cannot be reached, the other tenants' lookups fail
    // at once instead of each waiting for the pool's timeout in turn.
    let mut unreachable: Option<ApiError> = None;
    for (tenant, lookups) in by_tenant.into_values() {
        let mut keys: Vec<&str> = lookups.iter().map(|l| l.key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        let found = match &unreachable {
            Some(e) => Err(e.clone()),
            None => sql::select_keys(db, tenant, &keys, now).await,
        };
        match found {
            Ok(found) => {
                let found: HashMap<String, Object> =
                    found.into_iter().map(|o| (o.key.clone(), o)).collect();
                for lookup in lookups {
                    let _ = lookup.reply.send(Ok(found.get(&lookup.key).cloned()));
                }
            }
            Err(e) => {
                if super::write::unreachable(&e) {
                    unreachable = Some(e.clone());
                }
                for lookup in lookups {
                    let _ = lookup.reply.send(Err(e.clone()));
                }
            }
        }
    }
}
