//! Requests that are not valid HTTP still get a JSON error body.

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::TestApp;

/// A plain TCP connection to the app.
async fn connect(app: &TestApp) -> tokio::net::TcpStream {
    let addr = app.node.base.trim_start_matches("http://");
    tokio::net::TcpStream::connect(addr).await.expect("connect")
}

/// A connection that has sent `bytes`.
async fn sent(app: &TestApp, bytes: &[u8]) -> tokio::net::TcpStream {
    let mut stream = connect(app).await;
    stream.write_all(bytes).await.expect("write");
    stream
}

/// Waits (up to 10 s) for the server to close `stream`; what it sent first.
async fn closed_by_server(mut stream: tokio::net::TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await;
    assert!(read.is_ok(), "the connection is still open after 10 s");
    answer
}

/// Sends raw bytes and returns the status and JSON body of the answer.
async fn raw(app: &TestApp, request: &[u8]) -> (u16, Option<String>, Value) {
    let mut stream = connect(app).await;
    // The server may answer before it has read everything.
    let _ = stream.write_all(request).await;
    let answer = closed_by_server(stream).await;
    let text = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let content_type = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-type")
            .then(|| v.trim().to_owned())
    });
    (
        status,
        content_type,
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_raw_0xff_byte_in_the_path_gets_a_json_400() {
    let app = TestApp::spawn().await;
    let (status, content_type, body) =
        raw(&app, b"GET /api/object/\xff HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(status, 400, "{body}");
    assert!(content_type.is_some_and(|c| c.starts_with("application/json")));
    assert_eq!(body["code"], "INVALID_INPUT", "{body}");
    assert_eq!(app.get("/healthz", None).await.status, 200);
}

#[tokio::test]
async fn a_600_kb_header_gets_a_json_431() {
    let app = TestApp::spawn().await;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(600 * 1024)
    );
    let (status, content_type, body) = raw(&app, request.as_bytes()).await;
    assert_eq!(status, 431, "{body}");
    assert!(content_type.is_some_and(|c| c.starts_with("application/json")));
    assert_eq!(body["code"], "PAYLOAD_TOO_LARGE", "{body}");
    assert_eq!(app.get("/healthz", None).await.status, 200);
}

#[tokio::test]
async fn a_request_past_the_time_budget_gets_503_timeout() {
    // The body never finishes arriving, so the request cannot end in time.
    let app =
        TestApp::spawn_with(|c| c.request_timeout = std::time::Duration::from_millis(200)).await;
    let r = app.post_stalled("/login", &[]).await;
    r.assert_error(503, "TIMEOUT");
    r.assert_mentions("time budget");
    assert_eq!(app.get("/healthz", None).await.status, 200);
}

#[tokio::test]
async fn a_token_that_cannot_be_checked_fails_the_request_instead_of_making_it_anonymous() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    // The table that tokens are checked against is gone: every check fails
    // in the database, as when it is unavailable.
    use sea_orm::ConnectionTrait;
    app.node
        .state
        .db()
        .write
        .execute_unprepared(r#"ALTER TABLE "user" RENAME TO user_gone"#)
        .await
        .expect("rename the table");
    // Over the anonymous body limit: an anonymous caller would get 413.
    let big = serde_json::json!({"data": "x".repeat(100_000)});
    let r = app
        .put(&crate::support::object_path("big"), Some(&u.token), &big)
        .await;
    r.assert_error(500, "INTERNAL");
}

/// A connection that has sent part of a request head and then nothing.
async fn stalled(app: &TestApp) -> tokio::net::TcpStream {
    sent(app, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await
}

#[tokio::test]
async fn a_connection_without_a_complete_request_head_is_closed_after_the_header_timeout() {
    let app =
        TestApp::spawn_with(|c| c.header_read_timeout = std::time::Duration::from_millis(300))
            .await;
    let started = std::time::Instant::now();
    let answer = closed_by_server(stalled(&app).await).await;
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "closed before the timeout"
    );
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    // A request sent in time is answered as always, however long it stays.
    let r = app.get("/healthz", None).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_connection_past_the_cap_waits_for_a_slot_and_is_then_served() {
    let app = TestApp::spawn_with(|c| {
        c.max_connections = 1;
        c.header_read_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    // The one slot is taken by a connection that sends no complete head:
    // the next one waits until it is closed, then is served.
    let hog = stalled(&app).await;
    let waiting = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/healthz");
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    closed_by_server(hog).await;
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("served within 10 s")
        .expect("task")
        .expect("request");
    assert_eq!(status, 200);
}

/// A connection from another loopback address than the test client's.
async fn connect_from(app: &TestApp, ip: &str, bytes: &[u8]) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{ip}:0").parse().expect("address"))
        .expect("bind");
    let addr = app.node.base.trim_start_matches("http://");
    let mut stream = socket
        .connect(addr.parse().expect("server address"))
        .await
        .expect("connect");
    stream.write_all(bytes).await.expect("write");
    stream
}

/// A request head without its end, and a whole request.
const HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";
const FULL: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Asserts that a request from `ip` is answered 200.
async fn served_from(app: &TestApp, ip: &str) {
    let answer = closed_by_server(connect_from(app, ip, FULL).await).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{ip}: {}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn a_connection_past_its_addresss_cap_is_closed_and_other_addresses_are_served() {
    let app = TestApp::spawn_with(|c| {
        c.max_connections_per_address = 2;
        c.header_read_timeout = std::time::Duration::from_secs(5);
    })
    .await;
    let held = [
        connect_from(&app, "127.0.0.2", HEAD).await,
        connect_from(&app, "127.0.0.2", HEAD).await,
    ];
    // A third from that address is closed unanswered...
    let refused = closed_by_server(connect_from(&app, "127.0.0.2", FULL).await).await;
    assert!(refused.is_empty(), "{}", String::from_utf8_lossy(&refused));
    // ...while other addresses are served.
    served_from(&app, "127.0.0.3").await;
    assert_eq!(app.get("/healthz", None).await.status, 200);
    // Once the held ones are closed (here by the header timeout), the
    // address gets its slots back.
    for stream in held {
        closed_by_server(stream).await;
    }
    served_from(&app, "127.0.0.2").await;
}

#[tokio::test]
async fn a_trusted_proxy_is_not_held_to_the_cap_per_address() {
    let app = TestApp::spawn_with(|c| {
        c.max_connections_per_address = 1;
        c.trusted_proxies = "127.0.0.4/32".parse().expect("proxies");
    })
    .await;
    let _held = connect_from(&app, "127.0.0.4", HEAD).await;
    served_from(&app, "127.0.0.4").await;
}

#[tokio::test]
async fn empty_lines_before_a_request_line_do_not_stop_the_header_timeout() {
    let app =
        TestApp::spawn_with(|c| c.header_read_timeout = std::time::Duration::from_millis(300))
            .await;
    let stream = sent(&app, b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    let answer = closed_by_server(stream).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let app = TestApp::spawn_with(|c| c.idle_timeout = std::time::Duration::from_millis(300)).await;
    let stream = sent(&app, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // Answered, then closed once the connection has stayed idle.
    let answer = closed_by_server(stream).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn a_silent_http2_connection_is_closed_after_the_idle_timeout() {
    let app = TestApp::spawn_with(|c| c.idle_timeout = std::time::Duration::from_millis(300)).await;
    // The HTTP/2 preface holds an empty line, then nothing more comes.
    let stream = sent(&app, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    closed_by_server(stream).await;
    let r = app.get("/healthz", None).await;
    assert_eq!(r.status, 200);
}
