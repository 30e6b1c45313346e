//! Wake-ups for change feeds.
//!
//! The change log is the truth (see `feed`); events only tell feeds that a
//! tenant's key changed, so that they read the log at once instead of at
//! their next recheck. Every committed write publishes its events to an
//! in-process broadcast channel. On PostgreSQL they also go to every other
//! node with `NOTIFY` (tenant, key and revision; never values) and arrive
//! there through `LISTEN`. A lost notification only delays a feed until its
//! recheck: nothing depends on the notifications or the `LISTEN` connection.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::db::Db;

const CHANNEL: &str = "kvql_events";
/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7500;
/// The least time between the starts of two NOTIFY transactions of one
/// node: under load a feed on another node may wake up to this much later,
/// and PostgreSQL commits at most 200 notification transactions a second per
/// node (each with many notifications) instead of one per group commit.
const NOTIFY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A value was created or replaced.
    #[serde(rename = "P")]
    Put,
    /// A value was deleted by a client.
    #[serde(rename = "D")]
    Delete,
    /// The sweeper removed an expired value.
    #[serde(rename = "E")]
    Expire,
}

/// A committed change to one key.
#[derive(Clone, Debug)]
pub struct Event {
    /// The tenant's database id. Feeds compare it with their own.
    pub tenant: i64,
    pub key: String,
    /// The change's revision (see `revision`).
    pub revision: i64,
}

/// The event bus of one node.
#[derive(Clone)]
pub struct Events {
    local: broadcast::Sender<Arc<Event>>,
    remote: Option<mpsc::UnboundedSender<Vec<Event>>>,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    /// The node that published, so it does not deliver its own events twice.
    n: String,
    e: Vec<WireEvent>,
}

#[derive(Serialize, Deserialize)]
struct WireEvent {
    t: i64,
    k: String,
    r: i64,
}

impl Events {
    /// A bus for this process only (SQLite, or tests).
    pub fn local(capacity: usize) -> Events {
        let (local, _) = broadcast::channel(capacity.max(1));
        Events {
            local,
            remote: None,
        }
    }

    /// The bus for `db`: in-process on SQLite; on PostgreSQL also across
    /// nodes, with a `LISTEN` task and a `NOTIFY` task.
    pub async fn start(db: &Db, capacity: usize) -> anyhow::Result<Events> {
        let mut events = Events::local(capacity);
        if !db.is_postgres() {
            return Ok(events);
        }
        let node = uuid::Uuid::new_v4().simple().to_string();
        let pool = db.write.get_postgres_connection_pool().clone();
        let mut listener = sea_orm::sqlx::postgres::PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        let local = events.local.clone();
        let own = payload_head(&node);
        tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    // This node's own notifications, and any while nobody
                    // here is subscribed, are dropped unread.
                    Ok(n) if n.payload().starts_with(&own) || local.receiver_count() == 0 => {}
                    Ok(n) => match serde_json::from_str::<Wire>(n.payload()) {
                        Ok(wire) => {
                            for e in wire.e {
                                let _ = local.send(Arc::new(Event {
                                    tenant: e.t,
                                    key: e.k,
                                    revision: e.r,
                                }));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "ignoring a malformed event notification")
                        }
                    },
                    Err(e) => {
                        // PgListener reconnects on the next recv. Notifications
                        // sent meanwhile are lost; feeds find their changes in
                        // the log at their next recheck.
                        tracing::warn!(error = %e, "event LISTEN connection lost; reconnecting");
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
            }
        });
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Event>>();
        tokio::spawn(async move {
            // A connection of its own, whose commits do not wait for fsync:
            // notifications are best effort, and every queued event goes out
            // in one statement (one transaction) instead of one each. Under
            // load that would still be a transaction per group commit, so a
            // batch waits until NOTIFY_INTERVAL has passed since the last one
            // and takes everything queued meanwhile; at a lower rate it goes
            // at once.
            let mut conn = None;
            let mut next = tokio::time::Instant::now();
            while let Some(mut batch) = rx.recv().await {
                tokio::time::sleep_until(next).await;
                next = tokio::time::Instant::now() + NOTIFY_INTERVAL;
                while let Ok(more) = rx.try_recv() {
                    batch.extend(more);
                }
                let payloads = payloads(&node, batch);
                if let Err(e) = notify(&pool, &mut conn, &payloads).await {
                    conn = None;
                    tracing::warn!(error = %e, lost = payloads.len(), "could not NOTIFY other nodes of changes");
                }
            }
        });
        events.remote = Some(tx);
        Ok(events)
    }

    /// Publishes committed changes. Never blocks: slow subscribers fall behind
    /// instead of holding up writers.
    pub fn publish(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        if let Some(remote) = &self.remote {
            let _ = remote.send(events.clone());
        }
        for e in events {
            // An error only means that nobody is subscribed.
            let _ = self.local.send(Arc::new(e));
        }
    }

    /// Whether anyone may receive events: a local subscriber, or other nodes.
    pub fn is_watched(&self) -> bool {
        self.remote.is_some() || self.local.receiver_count() > 0
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.local.subscribe()
    }
}

async fn notify(
    pool: &sea_orm::sqlx::PgPool,
    conn: &mut Option<sea_orm::sqlx::pool::PoolConnection<sea_orm::sqlx::Postgres>>,
    payloads: &[String],
) -> Result<(), sea_orm::sqlx::Error> {
    if conn.is_none() {
        let mut fresh = pool.acquire().await?;
        sea_orm::sqlx::query("SET synchronous_commit = off")
            .execute(&mut *fresh)
            .await?;
        *conn = Some(fresh);
    }
    let Some(c) = conn.as_mut() else {
        return Ok(());
    };
    // unnest yields the payloads in array order, and NOTIFYs of one
    // transaction are delivered in the order they were made.
    sea_orm::sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
        .bind(CHANNEL)
        .bind(payloads)
        .execute(&mut **c)
        .await?;
    Ok(())
}

/// How every payload of `node` begins: `Wire` with its fields in order.
fn payload_head(node: &str) -> String {
    format!("{{\"n\":{},\"e\":[", serde_json::Value::from(node))
}

/// Packs events into NOTIFY payloads under the size limit, in order, each
/// event rendered once.
fn payloads(node: &str, events: Vec<Event>) -> Vec<String> {
    const TAIL: &str = "]}";
    let head = payload_head(node);
    let room = MAX_PAYLOAD.saturating_sub(head.len() + TAIL.len());
    let mut out = Vec::new();
    let mut current = head.clone();
    for event in events {
        let wire = WireEvent {
            t: event.tenant,
            k: event.key,
            r: event.revision,
        };
        // A key is at most 512 bytes, so every event fits a payload.
        let rendered = serde_json::to_string(&wire).unwrap_or_default();
        debug_assert!(rendered.len() <= room);
        if current.len() > head.len() {
            if current.len() + 1 + rendered.len() + TAIL.len() > MAX_PAYLOAD {
                current.push_str(TAIL);
                out.push(std::mem::replace(&mut current, head.clone()));
            } else {
                current.push(',');
            }
        }
        current.push_str(&rendered);
    }
    if current.len() > head.len() {
        current.push_str(TAIL);
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str) -> Event {
        Event {
            tenant: 1,
            key: key.into(),
            revision: 1,
        }
    }

    #[test]
    fn payloads_stay_under_the_notify_limit_and_keep_order() {
        let events: Vec<Event> = (0..50)
            .map(|i| put(&format!("{}{i:02}", "k".repeat(500))))
            .collect();
        let payloads = payloads("node", events);
        assert!(payloads.len() > 1);
        let mut keys = Vec::new();
        for p in &payloads {
            assert!(p.len() <= MAX_PAYLOAD, "{} bytes", p.len());
            let wire: Wire = serde_json::from_str(p).unwrap();
            keys.extend(wire.e.into_iter().map(|e| e.k));
        }
        let expected: Vec<String> = (0..50)
            .map(|i| format!("{}{i:02}", "k".repeat(500)))
            .collect();
        assert_eq!(keys, expected);
    }

    #[test]
    fn payloads_begin_with_their_nodes_head_and_no_other() {
        let events: Vec<Event> = (0..30)
            .map(|i| put(&format!("{}{i}", "k".repeat(400))))
            .collect();
        let payloads = payloads("a1", events);
        assert!(payloads.len() > 1);
        for p in &payloads {
            assert!(p.starts_with(&payload_head("a1")), "{p}");
            assert!(!p.starts_with(&payload_head("a")), "{p}");
            assert_eq!(serde_json::from_str::<Wire>(p).unwrap().n, "a1");
        }
    }
}
