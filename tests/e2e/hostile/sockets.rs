//! The GraphQL WebSocket lifecycle (graphql-transport-ws close codes),
//! socket caps, keep-alive, and revocation reaching open sockets.

use std::time::Duration;

use api::auth::Role;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{TestApp, WsClient};

const EVENTS: &str = "subscription { objectEvents { kind key } }";

fn auth(token: &str) -> serde_json::Value {
    json!({"Authorization": format!("Bearer {token}")})
}

#[tokio::test]
async fn a_socket_that_never_sends_connection_init_is_closed_with_4408() {
    let app =
        TestApp::spawn_with(|c| c.websocket.ws_init_timeout = Duration::from_millis(200)).await;
    let mut ws = WsClient::open(&app.node.base, "/graphql/ws").await;
    assert_eq!(ws.closed().await, 4408);
    assert_eq!(app.get("/healthz", None).await.status, 200);
}

#[tokio::test]
async fn subscribe_before_the_ack_closes_with_4401() {
    let app = TestApp::spawn().await;
    let mut ws = WsClient::open(&app.node.base, "/graphql/ws").await;
    ws.subscribe("1", EVENTS, json!({})).await;
    assert_eq!(ws.closed().await, 4401);
}

#[tokio::test]
async fn an_invalid_token_at_init_closes_with_4403() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for token in ["garbage", &format!("{}x", u.token)] {
        let mut ws = WsClient::open(&app.node.base, "/graphql/ws").await;
        ws.send(json!({"type": "connection_init", "payload": auth(token)}))
            .await;
        assert_eq!(ws.closed().await, 4403, "token {token}");
    }
}

#[tokio::test]
async fn a_repeated_operation_id_closes_with_4409() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", auth(&u.token)).await;
    ws.subscribe("same", EVENTS, json!({})).await;
    ws.subscribe("same", EVENTS, json!({})).await;
    assert_eq!(ws.closed().await, 4409);
}

#[tokio::test]
async fn operations_beyond_the_per_socket_cap_get_an_error_and_the_others_go_on() {
    let app = TestApp::spawn_with(|c| c.websocket.ws_max_operations = 2).await;
    let u = app.writer().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", auth(&u.token)).await;
    ws.subscribe("1", EVENTS, json!({})).await;
    ws.subscribe("2", EVENTS, json!({})).await;
    ws.subscribe("3", EVENTS, json!({})).await;
    let refused = ws.next().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["id"], "3");
    assert_eq!(refused["payload"][0]["extensions"]["code"], "RATE_LIMITED");
    // Completing one frees its place.
    ws.send(json!({"type": "complete", "id": "1"})).await;
    ws.subscribe("4", "query { me { username } }", json!({}))
        .await;
    let answer = next_for(&mut ws, "4").await;
    assert_eq!(
        answer["payload"]["data"]["me"]["username"],
        u.username.as_str()
    );
}

#[tokio::test]
async fn sockets_beyond_the_per_user_cap_are_closed_with_4429() {
    let app = TestApp::spawn_with(|c| c.websocket.ws_max_connections_per_user = 2).await;
    let u = app.writer().await;
    let _a = WsClient::connect(&app.node.base, "/graphql/ws", auth(&u.token)).await;
    let b = WsClient::connect(&app.node.base, "/graphql/ws", auth(&u.token)).await;
    let mut c = WsClient::open(&app.node.base, "/graphql/ws").await;
    c.send(json!({"type": "connection_init", "payload": auth(&u.token)}))
        .await;
    assert_eq!(c.closed().await, 4429);
    // Another user is not affected, and a closed socket frees its place.
    let other = app.writer().await;
    let _d = WsClient::connect(&app.node.base, "/graphql/ws", auth(&other.token)).await;
    drop(b);
    let mut again = None;
    for _ in 0..100 {
        let mut e = WsClient::open(&app.node.base, "/graphql/ws").await;
        e.send(json!({"type": "connection_init", "payload": auth(&u.token)}))
            .await;
        let msg = e.next().await;
        if msg["type"] == "connection_ack" {
            again = Some(e);
            break;
        }
        assert_eq!(msg["code"], 4429, "{msg}");
        tokio::task::yield_now().await;
    }
    assert!(again.is_some(), "the closed socket's place was freed");
}

#[tokio::test]
async fn sockets_beyond_the_node_cap_are_refused_with_429() {
    let app = TestApp::spawn_with(|c| c.websocket.ws_max_connections = 2).await;
    let _a = WsClient::open(&app.node.base, "/graphql/ws").await;
    let _b = WsClient::open(&app.node.base, "/graphql/ws").await;
    let refused = WsClient::try_open(&app.node.base, "/graphql/ws").await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429);
            assert_eq!(
                resp.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()),
                Some("1")
            );
        }
        Err(other) => panic!("expected a 429, got {other}"),
        Ok(_) => panic!("a third socket was accepted"),
    }
    assert_eq!(app.get("/healthz", None).await.status, 200);
}

/// Opens a graphql-transport-ws socket by hand and sends `connection_init`:
/// a peer that then never reads, so it never answers a ping.
async fn silent_peer(base: &str, token: &str) -> tokio::net::TcpStream {
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "GET /graphql/ws HTTP/1.1\r\nhost: {addr}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\
         sec-websocket-protocol: graphql-transport-ws\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let init = json!({"type": "connection_init", "payload": auth(token)}).to_string();
    // A masked text frame (clients must mask); the mask is zero, so the
    // payload goes as it is.
    let mut frame = vec![0x81u8];
    let len = init.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(init.as_bytes());
    stream.write_all(&frame).await.expect("write frame");
    stream
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped() {
    let app = TestApp::spawn_with(|c| c.websocket.ws_keepalive = Duration::from_millis(100)).await;
    let u = app.writer().await;
    let mut stream = silent_peer(&app.node.base, &u.token).await;
    // Read (without answering) until the server hangs up.
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    let hung_up = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(hung_up.is_ok(), "the server kept a silent peer");
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("connection_ack"), "{text}");
    // A ping frame (opcode 0x9) was sent before giving up.
    assert!(seen.contains(&0x89), "no ping was sent");
}

/// The next `next` message of operation `id`, skipping other messages.
async fn next_for(ws: &mut WsClient, id: &str) -> serde_json::Value {
    loop {
        let msg = ws.next().await;
        if msg["type"] == "next" && msg["id"] == id {
            return msg;
        }
        assert_ne!(msg["type"], "closed", "{msg}");
    }
}

/// Runs `putObject` over the socket and returns the answer's error code, or
/// `closed:<code>` if the server closed the socket instead.
async fn put_over_socket(ws: &mut WsClient, id: &str, key: &str) -> String {
    ws.subscribe(
        id,
        "mutation($k: String!) { putObject(input: {key: $k, data: 1}) { created } }",
        json!({"k": key}),
    )
    .await;
    loop {
        let msg = ws.next().await;
        match msg["type"].as_str() {
            Some("closed") => return format!("closed:{}", msg["code"]),
            Some("next") if msg["id"] == id => {
                return msg["payload"]["errors"][0]["extensions"]["code"]
                    .as_str()
                    .unwrap_or("ok")
                    .to_owned();
            }
            _ => continue,
        }
    }
}

#[tokio::test]
async fn removing_a_user_stops_their_open_socket_and_its_writes() {
    let app = TestApp::spawn_with(|c| c.auth_cache_ttl = Duration::ZERO).await;
    let carol = app.writer().await;
    let witness = app.writer().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", auth(&carol.token)).await;
    ws.subscribe("events", EVENTS, json!({})).await;
    assert_eq!(put_over_socket(&mut ws, "1", "before").await, "ok");
    api::users::remove_user(app.node.state.db(), &carol.username)
        .await
        .expect("remove user");
    let after = put_over_socket(&mut ws, "2", "after").await;
    assert!(
        after == "UNAUTHENTICATED" || after == "closed:4403",
        "a removed user's write was {after}"
    );
    assert_eq!(
        app.read(&witness, "after").await.status,
        404,
        "nothing was written"
    );
    assert_eq!(app.read(&witness, "before").await.status, 200);
    if after != "closed:4403" {
        assert_eq!(ws.closed().await, 4403);
    }
}

#[tokio::test]
async fn a_user_demoted_to_reader_can_no_longer_write_over_an_open_socket() {
    let app = TestApp::spawn_with(|c| c.auth_cache_ttl = Duration::ZERO).await;
    let dave = app.user("acme", Role::Writer).await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", auth(&dave.token)).await;
    assert_eq!(put_over_socket(&mut ws, "1", "k").await, "ok");
    api::users::set_role(app.node.state.db(), &dave.username, Role::Reader)
        .await
        .expect("demote");
    assert_eq!(put_over_socket(&mut ws, "2", "k2").await, "FORBIDDEN");
    assert_eq!(app.read(&dave, "k2").await.status, 404);
    // Reads still work.
    ws.subscribe("3", "query { object(key: \"k\") { data } }", json!({}))
        .await;
    let answer = next_for(&mut ws, "3").await;
    assert_eq!(answer["payload"]["data"]["object"]["data"], 1, "{answer}");
}

#[tokio::test]
async fn a_password_change_closes_open_sockets_and_ends_their_subscriptions() {
    let app = TestApp::spawn_with(|c| c.auth_cache_ttl = Duration::ZERO).await;
    let erin = app.writer().await;
    let witness = app.writer().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", auth(&erin.token)).await;
    ws.subscribe("events", EVENTS, json!({})).await;
    assert_eq!(put_over_socket(&mut ws, "1", "before").await, "ok");
    api::users::set_password(app.node.state.db(), &erin.username, "a brand new password")
        .await
        .expect("set password");
    // A write by someone else: the revoked subscriber must not receive it.
    assert_eq!(
        app.create(&witness, "secret", json!(1), None).await.status,
        201
    );
    loop {
        let msg = ws.next().await;
        if msg["type"] == "closed" {
            assert_eq!(msg["code"], 4403, "{msg}");
            break;
        }
        let event = &msg["payload"]["data"]["objectEvents"];
        assert_ne!(event["key"], "secret", "a revoked socket received {msg}");
    }
    // The old token is refused over HTTP too; the new password works.
    app.get("/api/objects", Some(&erin.token))
        .await
        .assert_error(401, "UNAUTHENTICATED");
    app.login(&erin.username, "a brand new password").await;
}

#[tokio::test]
async fn sockets_without_an_accepted_token_are_capped_per_node() {
    let app = TestApp::spawn_with(|c| c.websocket.ws_max_anonymous_connections = 2).await;
    let u = app.writer().await;
    let mut a = WsClient::open(&app.node.base, "/graphql/ws").await;
    let _b = WsClient::open(&app.node.base, "/graphql/ws").await;
    match WsClient::try_open(&app.node.base, "/graphql/ws").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429)
        }
        Err(other) => panic!("expected a 429, got {other}"),
        Ok(_) => panic!("a third anonymous socket was accepted"),
    }
    // Once one of them authenticates, it no longer counts as anonymous.
    a.send(json!({"type": "connection_init", "payload": auth(&u.token)}))
        .await;
    assert_eq!(a.next().await["type"], "connection_ack");
    let _c = WsClient::connect(&app.node.base, "/graphql/ws", auth(&u.token)).await;
}

#[tokio::test]
async fn an_overlong_operation_id_or_message_closes_with_4400() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", auth(&u.token)).await;
    ws.subscribe(&"i".repeat(129), EVENTS, json!({})).await;
    assert_eq!(ws.closed().await, 4400);
    // Before authentication, messages are held to the anonymous body limit.
    let mut anon = WsClient::open(&app.node.base, "/graphql/ws").await;
    let padding = "x".repeat(app.config.max_anonymous_body_bytes as usize);
    anon.send(json!({"type": "connection_init", "payload": {"padding": padding}}))
        .await;
    assert_eq!(anon.closed().await, 4400);
}
