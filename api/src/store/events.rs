//! Change events for subscriptions.
//!
//! Every committed write publishes events to an in-process broadcast channel.
//! On PostgreSQL they are also sent with `NOTIFY` and received with `LISTEN`
//! by every other node, so a subscriber on node A sees writes made on node B.
//! Delivery is at most once: a subscriber that falls more than the buffer
//! behind is told so and must re-read; events made while a node's `LISTEN`
//! connection was down are lost to that node's subscribers.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use super::Object;
use crate::clock::Clock;
use crate::db::Db;

const CHANNEL: &str = "kvql_events";
/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7500;

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

/// One change to one key.
#[derive(Clone, Debug)]
pub struct Event {
    /// The tenant's database id. Subscribers compare it with their own.
    pub tenant: i64,
    pub kind: EventKind,
    pub key: String,
    /// The version written, deleted or expired.
    pub version: i64,
    /// The value written, for `Put`; `None` when it came from another node
    /// and was too large to travel with the notification.
    pub object: Option<Object>,
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
    k: EventKind,
    key: String,
    v: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    o: Option<WireObject>,
}

#[derive(Serialize, Deserialize)]
struct WireObject {
    d: String,
    x: Option<i64>,
    c: i64,
    u: i64,
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
    pub async fn start(db: &Db, clock: Clock, capacity: usize) -> anyhow::Result<Events> {
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
                                let _ = local.send(Arc::new(from_wire(e, &clock)));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "ignoring a malformed event notification")
                        }
                    },
                    Err(e) => {
                        // PgListener reconnects on the next recv; events sent meanwhile are lost.
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
            // in one statement (one transaction) instead of one each.
            let mut conn = None;
            while let Some(mut batch) = rx.recv().await {
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

fn to_wire(e: Event) -> WireEvent {
    WireEvent {
        t: e.tenant,
        k: e.kind,
        key: e.key,
        v: e.version,
        o: e.object.map(|o| WireObject {
            d: o.data.to_string(),
            x: o.expires_at,
            c: o.created_at,
            u: o.updated_at,
        }),
    }
}

fn from_wire(e: WireEvent, clock: &Clock) -> Event {
    let now = clock.now_ms();
    Event {
        tenant: e.t,
        kind: e.k,
        object: e.o.map(|o| Object {
            key: e.key.clone(),
            data: o.d.into(),
            version: e.v,
            ttl: o.x.map(|x| crate::store::seconds_left(x, now)),
            expires_at: o.x,
            created_at: o.c,
            updated_at: o.u,
        }),
        key: e.key,
        version: e.v,
    }
}

/// How every payload of `node` begins: `Wire` with its fields in order.
fn payload_head(node: &str) -> String {
    format!("{{\"n\":{},\"e\":[", serde_json::Value::from(node))
}

/// Packs events into NOTIFY payloads under the size limit, in order, each
/// event rendered once. A value too large to travel is left out; receivers
/// read it from the database.
fn payloads(node: &str, events: Vec<Event>) -> Vec<String> {
    const TAIL: &str = "]}";
    let head = payload_head(node);
    let room = MAX_PAYLOAD.saturating_sub(head.len() + TAIL.len());
    let mut out = Vec::new();
    let mut current = head.clone();
    for event in events {
        let mut wire = to_wire(event);
        let mut rendered = serde_json::to_string(&wire).unwrap_or_default();
        if rendered.len() > room {
            wire.o = None;
            rendered = serde_json::to_string(&wire).unwrap_or_default();
        }
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

    fn put(key: &str, data_len: usize) -> Event {
        Event {
            tenant: 1,
            kind: EventKind::Put,
            key: key.into(),
            version: 1,
            object: Some(Object {
                key: key.into(),
                data: format!("\"{}\"", "x".repeat(data_len)).into(),
                version: 1,
                ttl: None,
                expires_at: None,
                created_at: 0,
                updated_at: 0,
            }),
        }
    }

    #[test]
    fn payloads_stay_under_the_notify_limit_and_keep_order() {
        let events: Vec<Event> = (0..50).map(|i| put(&format!("k{i:02}"), 1000)).collect();
        let payloads = payloads("node", events);
        assert!(payloads.len() > 1);
        let mut keys = Vec::new();
        for p in &payloads {
            assert!(p.len() <= MAX_PAYLOAD, "{} bytes", p.len());
            let wire: Wire = serde_json::from_str(p).unwrap();
            keys.extend(wire.e.into_iter().map(|e| e.key));
        }
        let expected: Vec<String> = (0..50).map(|i| format!("k{i:02}")).collect();
        assert_eq!(keys, expected);
    }

    #[test]
    fn payloads_begin_with_their_nodes_head_and_no_other() {
        let events: Vec<Event> = (0..30).map(|i| put(&format!("k{i}"), 500)).collect();
        let payloads = payloads("a1", events);
        assert!(payloads.len() > 1);
        for p in &payloads {
            assert!(p.starts_with(&payload_head("a1")), "{p}");
            assert!(!p.starts_with(&payload_head("a")), "{p}");
            assert_eq!(serde_json::from_str::<Wire>(p).unwrap().n, "a1");
        }
    }

    #[test]
    fn a_large_value_travels_without_its_data() {
        let payloads = payloads("node", vec![put("big", 20_000), put("small", 10)]);
        let wire: Vec<WireEvent> = payloads
            .iter()
            .flat_map(|p| serde_json::from_str::<Wire>(p).unwrap().e)
            .collect();
        assert!(wire[0].o.is_none());
        assert!(wire[1].o.is_some());
    }
}
