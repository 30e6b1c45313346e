//! GraphQL over WebSocket: the connection's lifecycle around async-graphql's
//! protocol engine. async-graphql speaks graphql-transport-ws (and the legacy
//! graphql-ws) and runs the operations; this loop sits between it and the
//! socket and enforces what the protocol and our budgets require:
//!
//! - `connection_init` within `KVQL_WS_INIT_TIMEOUT`, else close 4408;
//! - a token present but invalid at init: close 4403; `subscribe` before the
//!   ack: close 4401; a repeated operation id: close 4409;
//! - sockets capped per node (429 at the upgrade) and per user (close 4429);
//!   operations capped per socket (an `error` for the refused id);
//! - every message's size and nesting bounded before it is parsed;
//! - pings every `KVQL_WS_KEEPALIVE`; a peer silent for two intervals is dropped;
//! - the token re-checked (the same cached check as HTTP requests) every
//!   auth-cache window: a removed user, a changed password or an expired
//!   token closes the socket with 4403, ending its subscriptions.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_graphql::Data;
use async_graphql::http::{
    WebSocket as ProtocolEngine, WebSocketProtocols as Protocols, WsMessage,
};
use futures_util::{SinkExt, StreamExt};
use poem::web::websocket::{CloseCode, Message, WebSocketStream};
use tokio::time::Instant;

use super::{Caller, KvSchema, SocketAuth, init_authorization};
use crate::app::AppState;
use crate::auth::ClientAddr;
use crate::error::ApiError;
use crate::input;
use crate::slots::{Count, CountSlot, PerUser, UserSlot};

/// Open sockets of one node: in total, not (yet) authenticated, and per user.
#[derive(Default)]
pub struct Sockets {
    open: Arc<Count>,
    anonymous: Arc<Count>,
    per_user: Arc<PerUser>,
}

/// One open socket's places in [`Sockets`]; given back when dropped.
pub struct Slot {
    _open: CountSlot,
    /// Held until a token is accepted at `connection_init`.
    anonymous: Option<CountSlot>,
    user: Option<UserSlot>,
    per_user: Arc<PerUser>,
}

impl Sockets {
    /// Sockets open now.
    pub fn open_count(&self) -> u64 {
        self.open.get()
    }

    /// A slot for a new socket, unless the node already has `max` sockets
    /// open or `max_anonymous` not authenticated yet.
    pub fn open(&self, max: u64, max_anonymous: u64) -> Option<Slot> {
        let open = self.open.claim(max)?;
        let anonymous = self.anonymous.claim(max_anonymous)?;
        Some(Slot {
            _open: open,
            anonymous: Some(anonymous),
            user: None,
            per_user: self.per_user.clone(),
        })
    }
}

impl Slot {
    /// Counts this socket against `user`; false if they have `max` open already.
    fn claim_user(&mut self, user: i64, max: u64) -> bool {
        let Some(place) = self.per_user.claim(user, max) else {
            return false;
        };
        self.user = Some(place);
        self.anonymous = None;
        true
    }
}

/// The fields of a client message that the lifecycle needs.
#[derive(serde::Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
}

#[derive(serde::Deserialize)]
struct InitMessage {
    #[serde(default)]
    payload: serde_json::Value,
}

/// Longest operation id accepted.
const MAX_ID_BYTES: usize = 128;

/// Messages waiting for the protocol engine; it drains them whenever it is
/// polled, so more waiting means a client flooding the socket.
const QUEUE: usize = 256;

enum Step {
    Continue,
    /// A message of our own to the client.
    Reply(String),
    Close(u16, String),
}

struct Connection {
    state: AppState,
    protocol: Protocols,
    slot: Slot,
    upgrade_authorization: Option<String>,
    /// The client's address, for login throttling over the socket.
    client: Option<ClientAddr>,
    to_engine: tokio::sync::mpsc::Sender<String>,
    init_data: Arc<Mutex<Option<Data>>>,
    initialised: bool,
    acknowledged: bool,
    token: Option<String>,
    /// The caller named by the token at `connection_init`: each operation
    /// it starts counts against its tenant's request rate.
    principal: Option<Arc<crate::auth::Principal>>,
    active: HashSet<String>,
}

/// Serves one upgraded socket until either side closes it.
pub async fn serve(
    socket: WebSocketStream,
    schema: KvSchema,
    protocol: Protocols,
    state: AppState,
    slot: Slot,
    upgrade_authorization: Option<String>,
    client: ClientAddr,
) {
    let config = state.config().websocket.clone();
    let (mut sink, mut source) = socket.split();
    let (to_engine, from_loop) = tokio::sync::mpsc::channel::<String>(QUEUE);
    let init_data: Arc<Mutex<Option<Data>>> = Arc::default();
    let slot_data = init_data.clone();
    let mut engine = ProtocolEngine::new(
        schema,
        tokio_stream::wrappers::ReceiverStream::new(from_loop),
        protocol,
    )
    .on_connection_init(move |_payload| async move {
        slot_data
            .lock()
            .ok()
            .and_then(|mut d| d.take())
            .ok_or_else(|| async_graphql::Error::new("the connection was not initialised"))
    });
    let mut conn = Connection {
        state,
        protocol,
        slot,
        upgrade_authorization,
        client: Some(client),
        to_engine,
        init_data,
        initialised: false,
        acknowledged: false,
        token: None,
        principal: None,
        active: HashSet::new(),
    };
    let init_deadline = tokio::time::sleep(config.ws_init_timeout);
    tokio::pin!(init_deadline);
    let mut keepalive =
        tokio::time::interval_at(Instant::now() + config.ws_keepalive, config.ws_keepalive);
    // Operations and events are checked one by one; this catches idle
    // sockets, a few times per cache window at most so that thousands of
    // them do not turn into a database query each per window.
    let recheck_every = (conn.state.config().auth_cache_ttl * 5)
        .clamp(Duration::from_secs(1), Duration::from_secs(5));
    let mut recheck = tokio::time::interval_at(Instant::now() + recheck_every, recheck_every);
    let mut last_heard = Instant::now();

    let close = loop {
        let step = tokio::select! {
            _ = &mut init_deadline, if !conn.initialised => {
                Step::Close(4408, "Connection initialisation timeout".into())
            }
            incoming = source.next() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                Some(Ok(message)) => {
                    last_heard = Instant::now();
                    match message {
                        Message::Text(text) => conn.received(text).await,
                        Message::Binary(_) => {
                            Step::Close(4400, "binary messages are not supported".into())
                        }
                        _ => Step::Continue,
                    }
                }
            },
            outgoing = engine.next() => match outgoing {
                None => break None,
                // The engine closes with 1002 on a message it cannot read;
                // graphql-transport-ws says 4400. Its reasons may quote input.
                Some(WsMessage::Close(code, reason)) => {
                    Step::Close(if code == 1002 { 4400 } else { code }, truncate(reason))
                }
                Some(WsMessage::Text(text)) => {
                    conn.sending(&text);
                    match sink.send(Message::Text(text)).await {
                        Ok(()) => Step::Continue,
                        Err(_) => break None,
                    }
                }
            },
            _ = keepalive.tick() => {
                if last_heard.elapsed() > config.ws_keepalive * 2 {
                    Step::Close(1011, "keep-alive timeout: the peer stopped answering".into())
                } else {
                    match sink.send(Message::Ping(Vec::new())).await {
                        Ok(()) => Step::Continue,
                        Err(_) => break None,
                    }
                }
            }
            _ = recheck.tick(), if conn.token.is_some() => conn.recheck().await,
        };
        match step {
            Step::Continue => {}
            Step::Reply(text) => {
                if sink.send(Message::Text(text)).await.is_err() {
                    break None;
                }
            }
            Step::Close(code, reason) => break Some((code, reason)),
        }
    };
    if let Some((code, reason)) = close {
        tracing::debug!(code, reason, "closing GraphQL WebSocket");
        let _ = sink
            .send(Message::Close(Some((CloseCode::from(code), reason))))
            .await;
    }
    let _ = sink.close().await;
}

impl Connection {
    async fn received(&mut self, text: String) -> Step {
        let config = self.state.config();
        if self.token.is_none() && text.len() as u64 > config.max_anonymous_body_bytes {
            return Step::Close(
                4400,
                format!(
                    "messages are at most {} bytes before the connection is authenticated",
                    config.max_anonymous_body_bytes
                ),
            );
        }
        let max_depth = config.max_json_depth;
        if let Err(e) = input::check_json(text.as_bytes(), max_depth, "WebSocket message") {
            return Step::Close(4400, truncate(e.to_string()));
        }
        let Ok(envelope) = serde_json::from_str::<Envelope>(&text) else {
            return Step::Close(4400, "Invalid message received".into());
        };
        match envelope.kind.as_str() {
            "connection_init" if !self.initialised => {
                self.initialised = true;
                if let Err(step) = self.init(&text).await {
                    return step;
                }
            }
            "subscribe" | "start" => {
                // graphql-transport-ws forbids subscribing before the ack; the
                // legacy protocol's clients send `start` right after
                // `connection_init`, and the engine takes them in order.
                if !self.acknowledged
                    && (self.protocol == Protocols::GraphQLWS || !self.initialised)
                {
                    return Step::Close(4401, "Unauthorized".into());
                }
                let Some(id) = envelope.id else {
                    return Step::Close(4400, "Invalid message received: no id".into());
                };
                if id.len() > MAX_ID_BYTES {
                    return Step::Close(
                        4400,
                        format!("Invalid message received: ids are at most {MAX_ID_BYTES} bytes"),
                    );
                }
                if self.active.contains(&id) {
                    return Step::Close(
                        4409,
                        truncate(format!("Subscriber for {id} already exists")),
                    );
                }
                let max = self.state.config().websocket.ws_max_operations;
                if self.active.len() as u64 >= max {
                    return self.refuse_operation(
                        &id,
                        format!("too many operations on this connection: at most {max} at once"),
                        None,
                    );
                }
                if let Some(principal) = &self.principal
                    && let Err(ApiError::RateLimited {
                        message,
                        retry_after,
                    }) = self.state.limiter().admit(principal)
                {
                    return self.refuse_operation(&id, message, Some(retry_after));
                }
                self.active.insert(id);
            }
            "complete" | "stop" => {
                if let Some(id) = &envelope.id {
                    self.active.remove(id);
                }
            }
            "connection_init" | "ping" | "pong" | "connection_terminate" => {}
            _ => return Step::Close(4400, "Invalid message received".into()),
        }
        match self.to_engine.try_send(text) {
            Ok(()) => Step::Continue,
            Err(_) => Step::Close(
                1008,
                "messages arrive faster than they are processed".into(),
            ),
        }
    }

    /// Checks the token of a `connection_init` and prepares the connection's
    /// data for the protocol engine, which then acknowledges.
    async fn init(&mut self, text: &str) -> Result<(), Step> {
        let payload = serde_json::from_str::<InitMessage>(text)
            .map(|m| m.payload)
            .unwrap_or_default();
        let authorization = init_authorization(&payload).or(self.upgrade_authorization.take());
        let caller = Caller::from_authorization(&self.state, authorization.as_deref()).await;
        match &caller {
            Caller::Authenticated(principal) => {
                let max = self.state.config().websocket.ws_max_connections_per_user;
                if !self.slot.claim_user(principal.user_id, max) {
                    return Err(Step::Close(
                        4429,
                        format!("Too many connections: at most {max} per user"),
                    ));
                }
                self.token = authorization
                    .as_deref()
                    .and_then(crate::auth::bearer_token)
                    .map(str::to_owned);
                self.principal = Some(principal.clone());
            }
            Caller::Refused(message) => {
                return Err(Step::Close(4403, truncate(format!("Forbidden: {message}"))));
            }
            Caller::Failed => return Err(Step::Close(1011, "internal error".into())),
            Caller::Anonymous => {}
        }
        let mut data = Data::default();
        if let Some(token) = &self.token {
            data.insert(SocketAuth(token.clone()));
        }
        data.insert(caller);
        if let Some(client) = self.client.take() {
            data.insert(client);
        }
        if let Ok(mut slot) = self.init_data.lock() {
            *slot = Some(data);
        }
        Ok(())
    }

    /// Notes what the protocol engine tells the client.
    fn sending(&mut self, text: &str) {
        if text.starts_with(r#"{"type":"connection_ack""#) {
            self.acknowledged = true;
        } else if (text.starts_with(r#"{"type":"complete""#)
            || text.starts_with(r#"{"type":"error""#))
            && let Ok(envelope) = serde_json::from_str::<Envelope>(text)
            && let Some(id) = envelope.id
        {
            self.active.remove(&id);
        }
    }

    /// Refuses operation `id` with `RATE_LIMITED`; the connection stays.
    fn refuse_operation(&self, id: &str, message: String, retry_after: Option<u64>) -> Step {
        let mut extensions = serde_json::json!({"code": "RATE_LIMITED"});
        if let Some(seconds) = retry_after {
            extensions["retryAfter"] = seconds.into();
        }
        let error = serde_json::json!({"message": message, "extensions": extensions});
        Step::Reply(serde_json::json!({"type": "error", "id": id, "payload": [error]}).to_string())
    }

    /// Closes the socket once its token no longer verifies.
    async fn recheck(&mut self) -> Step {
        let Some(token) = &self.token else {
            return Step::Continue;
        };
        match self.state.auth().authenticate(token).await {
            Ok(principal) => {
                // Picks up a change of the tenant's request rate.
                self.principal = Some(principal);
                Step::Continue
            }
            Err(ApiError::Unauthenticated(m)) => {
                Step::Close(4403, truncate(format!("Forbidden: {m}")))
            }
            Err(_) => Step::Continue,
        }
    }
}

/// Close reasons are at most 123 bytes.
fn truncate(mut reason: String) -> String {
    if reason.len() > 120 {
        let mut end = 117;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push_str("...");
    }
    reason
}
