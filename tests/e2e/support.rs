//! `TestApp`: spawns the server in-process and talks HTTP to it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use api::app::{App, AppState};
use api::auth::Role;
use api::clock::Clock;
use api::config::Config;
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";
pub const PASSWORD: &str = "correct horse battery staple";

/// A database for one test, removed when dropped.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

impl TestDb {
    /// A fresh database with the first `steps` migrations applied, as an
    /// older kvql left it, and a connection to it: for migration tests.
    pub async fn migrated_to(steps: u32) -> (TestDb, sea_orm::DatabaseConnection) {
        use migration::{Migrator, MigratorTrait};
        let db = TestDb::new().await;
        let conn = Database::connect(&db.url).await.expect("connect");
        Migrator::up(&conn, Some(steps))
            .await
            .expect("the earlier migrations");
        (db, conn)
    }

    pub async fn new() -> TestDb {
        match std::env::var("KVQL_TEST_DATABASE_URL") {
            Ok(admin_url) if !admin_url.is_empty() => {
                let name = format!("kvql_test_{}", uuid::Uuid::new_v4().simple());
                let admin = Database::connect(&admin_url)
                    .await
                    .expect("connect to KVQL_TEST_DATABASE_URL");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                admin.close().await.ok();
                let url = replace_db_name(&admin_url, &name);
                TestDb {
                    url,
                    _dir: None,
                    postgres: Some((admin_url, name)),
                }
            }
            _ => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("kvql.db").display());
                TestDb {
                    url,
                    _dir: Some(dir),
                    postgres: None,
                }
            }
        }
    }
}

fn replace_db_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..path_start], name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin_url, name)) = self.postgres.take() {
            // Drop runs inside the test's runtime; use a runtime of our own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    if let Ok(admin) = Database::connect(&admin_url).await {
                        let _ = admin
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .await;
                        admin.close().await.ok();
                    }
                });
            })
            .join();
        }
    }
}

/// The configuration tests start from.
pub fn test_config(url: &str) -> Config {
    let mut config = Config::from_env().expect("default config");
    config.database.database_url = url.to_owned();
    config.database.database_max_connections = 4;
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.bootstrap_admin_password = Some(ADMIN_PASSWORD.into());
    config.sweep_interval = Duration::from_millis(50);
    config
}

/// A running node.
pub struct Node {
    pub base: String,
    pub state: AppState,
    pub sweeps: watch::Receiver<u64>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Node {
    pub async fn start(config: Config, clock: Clock) -> Node {
        let app = App::build(config, clock).await.expect("build app");
        let state = app.state.clone();
        let sweeps = app.sweeper.passes();
        let (addr_tx, addr_rx) = oneshot::channel::<SocketAddr>();
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(
            move |addr| {
                let _ = addr_tx.send(addr);
            },
            async move {
                let _ = shutdown_rx.await;
            },
        ));
        let addr = addr_rx.await.expect("server bound");
        Node {
            base: format!("http://{addr}"),
            state,
            sweeps,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }
}

impl Node {
    /// Stops the node and waits until its server has let go of the database.
    pub async fn stop(mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A server on a fresh database, with a clock that tests move by hand.
pub struct TestApp {
    pub node: Node,
    pub clock: Clock,
    pub client: reqwest::Client,
    pub config: Config,
    // Declared last: dropped after the node has stopped.
    pub db: TestDb,
}

/// A logged-in user.
#[derive(Clone, Debug)]
pub struct User {
    pub username: String,
    pub token: String,
}

/// An HTTP answer with its body parsed as JSON (or `Value::Null` when empty).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts that the error message mentions `words`.
    #[track_caller]
    pub fn assert_mentions(&self, words: &str) {
        let message = self.body["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(words),
            "expected {words:?} in {}",
            self.text
        );
    }

    /// Asserts an error answer: status, JSON content type, `code`, a message.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.text
        );
        assert!(
            self.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "error answers are JSON, got {:?}: {}",
            self.header("content-type"),
            self.text
        );
        assert_eq!(self.body["code"], code, "body: {}", self.text);
        assert!(
            self.body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "error message missing: {}",
            self.text
        );
    }
}

impl User {
    /// The `connection_init` payload that authenticates a WebSocket as this user.
    pub fn ws_auth(&self) -> Value {
        json!({"Authorization": format!("Bearer {}", self.token)})
    }
}

static USER_SEQ: AtomicU64 = AtomicU64::new(0);

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
        let db = TestDb::new().await;
        let mut config = test_config(&db.url);
        adjust(&mut config);
        let clock = Clock::manual();
        let node = Node::start(config.clone(), clock.clone()).await;
        TestApp {
            node,
            clock,
            client: reqwest::Client::new(),
            config,
            db,
        }
    }

    /// Stops the server and starts a new one on the same database (a
    /// restart), with the same configuration and clock.
    pub async fn restart(&mut self) {
        let placeholder = Node {
            base: self.node.base.clone(),
            state: self.node.state.clone(),
            sweeps: self.node.sweeps.clone(),
            shutdown: None,
            task: None,
        };
        let old = std::mem::replace(&mut self.node, placeholder);
        old.stop().await;
        let fresh = Node::start(self.config.clone(), self.clock.clone()).await;
        self.node = fresh;
    }

    /// Another server on the same database (a second node), sharing the clock.
    pub async fn second_node(&self) -> Node {
        Node::start(self.config.clone(), self.clock.clone()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.node.base, path)
    }

    /// Creates a user in `tenant` with `role` and logs in over HTTP.
    pub async fn user(&self, tenant: &str, role: Role) -> User {
        let n = USER_SEQ.fetch_add(1, Ordering::SeqCst);
        let username = format!("{}-{}-{n}", tenant, role.as_str());
        api::users::add_user(
            self.node.state.db(),
            &self.clock,
            &username,
            tenant,
            role,
            PASSWORD,
        )
        .await
        .expect("add user");
        let token = self.login(&username, PASSWORD).await;
        User { username, token }
    }

    /// A writer in tenant `acme`.
    pub async fn writer(&self) -> User {
        self.user("acme", Role::Writer).await
    }

    pub async fn login(&self, username: &str, password: &str) -> String {
        let r = self
            .post(
                "/login",
                None,
                &json!({"username": username, "password": password}),
            )
            .await;
        assert_eq!(r.status, 200, "login failed: {}", r.text);
        r.body["access_token"].as_str().expect("token").to_owned()
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::Null)
        };
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.send(self.request(reqwest::Method::GET, path, token))
            .await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Resp {
        self.send(self.request(reqwest::Method::DELETE, path, token))
            .await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Resp {
        self.send(self.request(reqwest::Method::POST, path, token).json(body))
            .await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: &Value) -> Resp {
        self.send(self.request(reqwest::Method::PUT, path, token).json(body))
            .await
    }

    /// `POST /api/object`.
    pub async fn create(&self, user: &User, key: &str, data: Value, ttl: Option<i64>) -> Resp {
        let mut body = json!({"key": key, "data": data});
        if let Some(t) = ttl {
            body["ttl"] = json!(t);
        }
        self.post("/api/object", Some(&user.token), &body).await
    }

    /// `GET /api/object/{key}` with the key percent-encoded.
    pub async fn read(&self, user: &User, key: &str) -> Resp {
        self.get(&object_path(key), Some(&user.token)).await
    }

    /// Every stored row of every tenant, expired or not, for "nothing changed" checks.
    pub async fn snapshot(&self) -> Vec<Value> {
        let db = self.node.state.db();
        let sql = if db.is_postgres() {
            r#"SELECT tenant_id, "key", data::text AS data, version, expires_at, updated_at FROM object ORDER BY tenant_id, "key""#
        } else {
            r#"SELECT tenant_id, "key", data, version, expires_at, updated_at FROM object ORDER BY tenant_id, "key""#
        };
        let rows = db
            .read
            .query_all_raw(Statement::from_string(db.backend, sql))
            .await
            .expect("snapshot");
        rows.iter()
            .map(|r| {
                json!({
                    "tenant_id": r.try_get::<i64>("", "tenant_id").unwrap(),
                    "key": r.try_get::<String>("", "key").unwrap(),
                    "data": r.try_get::<String>("", "data").unwrap(),
                    "version": r.try_get::<i64>("", "version").unwrap(),
                    "expires_at": r.try_get::<Option<i64>>("", "expires_at").unwrap(),
                    "updated_at": r.try_get::<i64>("", "updated_at").unwrap(),
                })
            })
            .collect()
    }

    /// Rows in the object table, expired ones included.
    pub async fn row_count(&self) -> usize {
        self.snapshot().await.len()
    }

    /// Waits until the sweeper has completed `n` more passes.
    pub async fn sweeps(&self, n: u64) {
        let mut rx = self.node.sweeps.clone();
        let start = *rx.borrow_and_update();
        tokio::time::timeout(Duration::from_secs(30), async {
            while *rx.borrow_and_update() < start + n {
                rx.changed().await.expect("sweeper stopped");
            }
        })
        .await
        .expect("sweeper passes");
    }
}

/// `/api/object/{key}` with the key percent-encoded as a path segment.
pub fn object_path(key: &str) -> String {
    format!("/api/object/{}", encode_segment(key))
}

pub fn encode_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[test]
fn replace_db_name_keeps_the_rest_of_the_url() {
    assert_eq!(
        replace_db_name("postgres://postgres@127.0.0.1:5432/test", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        replace_db_name("postgres://u:p@h/test?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
}

impl TestApp {
    /// `POST path` with a JSON body given as text (for bodies that
    /// `serde_json::Value` cannot hold or would change), with a bearer token.
    pub async fn post_text(&self, path: &str, token: &str, body: impl Into<String>) -> Resp {
        self.send_text(reqwest::Method::POST, path, token, body)
            .await
    }

    /// [`TestApp::post_text`] with any method.
    pub async fn send_text(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: impl Into<String>,
    ) -> Resp {
        self.send(
            self.client
                .request(method, self.url(path))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body.into()),
        )
        .await
    }

    /// `POST /graphql` with a query and variables.
    pub async fn gql(&self, token: Option<&str>, query: &str, variables: Value) -> Resp {
        self.post(
            "/graphql",
            token,
            &json!({"query": query, "variables": variables}),
        )
        .await
    }
}

impl Resp {
    /// The `extensions.code` of the first GraphQL error.
    #[track_caller]
    pub fn gql_error_code(&self) -> &str {
        assert_eq!(
            self.status, 200,
            "GraphQL errors come with HTTP 200: {}",
            self.text
        );
        self.body["errors"][0]["extensions"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {}", self.text))
    }

    /// `data` of a GraphQL answer without errors.
    #[track_caller]
    pub fn gql_data(&self) -> &Value {
        assert_eq!(self.status, 200, "{}", self.text);
        assert!(
            self.body.get("errors").is_none(),
            "unexpected errors: {}",
            self.text
        );
        &self.body["data"]
    }
}

/// A graphql-transport-ws client.
pub struct WsClient {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl WsClient {
    /// Connects to `base` + `path` and completes `connection_init` with `payload`.
    pub async fn connect(base: &str, path: &str, payload: Value) -> WsClient {
        let mut client = WsClient::open(base, path).await;
        client
            .send(json!({"type": "connection_init", "payload": payload}))
            .await;
        let ack = client.next().await;
        assert_eq!(ack["type"], "connection_ack", "{ack}");
        client
    }

    /// Connects to `base` + `path` speaking graphql-transport-ws, without
    /// sending anything.
    pub async fn open(base: &str, path: &str) -> WsClient {
        WsClient::try_open(base, path)
            .await
            .expect("websocket connect")
    }

    /// Like [`WsClient::open`], but a refused upgrade is returned.
    pub async fn try_open(
        base: &str,
        path: &str,
    ) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("{}{}", base.replacen("http://", "ws://", 1), path);
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        let (ws, resp) = tokio_tungstenite::connect_async(request).await?;
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok()),
            Some("graphql-transport-ws")
        );
        Ok(WsClient { ws })
    }

    pub async fn send(&mut self, message: Value) {
        use futures_util::SinkExt;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Text(
                message.to_string().into(),
            ))
            .await
            .expect("websocket send");
    }

    pub async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        self.send(json!({
            "id": id,
            "type": "subscribe",
            "payload": {"query": query, "variables": variables}
        }))
        .await;
    }

    /// The next protocol message (pings are answered), within 10 seconds.
    pub async fn next(&mut self) -> Value {
        self.try_next(Duration::from_secs(10))
            .await
            .expect("a websocket message within 10 s")
    }

    /// Reads until the server closes the socket and returns the close code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            let msg = self.next().await;
            if msg["type"] == "closed" {
                return msg["code"].as_u64().expect("close code") as u16;
            }
        }
    }

    /// The next protocol message within `wait`, or `None`.
    pub async fn try_next(&mut self, wait: Duration) -> Option<Value> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let msg = tokio::time::timeout(wait, self.ws.next()).await.ok()?;
            let Some(Ok(msg)) = msg else {
                // The peer went away without a close frame.
                return Some(json!({"type": "closed", "code": 1006, "reason": ""}));
            };
            match msg {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).expect("JSON message");
                    if v["type"] == "ping" {
                        self.send(json!({"type": "pong"})).await;
                        continue;
                    }
                    return Some(v);
                }
                Message::Close(frame) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Some(json!({"type": "closed", "code": code, "reason": reason}));
                }
                _ => continue,
            }
        }
    }
}

impl TestApp {
    /// `POST path` whose body never finishes arriving: the headers announce
    /// 100 bytes, 10 are sent and the connection is held open. Returns the
    /// answer the server gives meanwhile, once its time budget runs out; no
    /// outcome depends on how fast anything runs.
    pub async fn post_stalled(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.node.base.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n"
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n{\"username");
        stream.write_all(head.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let read = async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
                let text = String::from_utf8_lossy(&answer);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    });
                    if length.is_some_and(|n| body.len() >= n) {
                        break;
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("an answer within 30 s");
        let text = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("a complete answer");
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        let mut header_map = reqwest::header::HeaderMap::new();
        for line in lines {
            if let Some((k, v)) = line.split_once(':')
                && let (Ok(k), Ok(v)) = (
                    reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()),
                    reqwest::header::HeaderValue::from_str(v.trim()),
                )
            {
                header_map.append(k, v);
            }
        }
        Resp {
            status,
            headers: header_map,
            body: serde_json::from_str(body).unwrap_or(Value::Null),
            text: body.to_owned(),
        }
    }
}
