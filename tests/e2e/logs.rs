//! Logs as an operator meets them: `kvql serve` run as the real binary with
//! `KVQL_LOG_FORMAT=json`, its standard error read line by line.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{ADMIN_PASSWORD, TestDb};

#[tokio::test]
async fn json_logs_have_one_access_line_per_request_without_keys_or_tokens() {
    let db = TestDb::new().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvql"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("KVQL_DATABASE_URL", &db.url)
        .env("KVQL_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("KVQL_LOG_FORMAT", "json")
        .env("KVQL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kvql");
    let stderr = child.stderr.take().expect("stderr");
    let child = KillOnDrop(child);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("kvql started");
        let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        lines.push(line);
        if event["message"] == "kvql listening" {
            break event["addr"].as_str().expect("addr").to_owned();
        }
    };
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let login: Value = client
        .post(format!("{base}/login"))
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("login body");
    let token = login["access_token"].as_str().expect("token").to_owned();
    let put = client
        .put(format!("{base}/api/object/private-key-name"))
        .bearer_auth(&token)
        .json(&json!({"data": {"secret": "private-value"}}))
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 201);
    let put_id = put.headers()["x-request-id"].to_str().unwrap().to_owned();
    let missing = client
        .get(format!("{base}/api/object/absent-key-name"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(missing.status(), 404);
    // The login and the token's verification took connections from the
    // pool: the server's subscriber counts them whatever the log filter.
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let acquired: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kvql_db_pool_acquire_seconds_count "))
        .expect("kvql_db_pool_acquire_seconds_count")
        .trim()
        .parse()
        .expect("a count");
    assert!(acquired >= 1.0, "{acquired}");
    // Lines are written by a thread of their own: wait for the four
    // requests' lines before stopping the server.
    let is_access = |l: &str| l.contains(r#""target":"kvql::access""#);
    while lines.iter().filter(|l| is_access(l)).count() < 4 {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => lines.push(line),
            Err(e) => panic!("{e}: only these lines arrived:\n{}", lines.join("\n")),
        }
    }
    drop(child);
    lines.extend(rx.iter());

    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let access: Vec<&Value> = events
        .iter()
        .filter(|e| e["target"] == "kvql::access")
        .collect();
    assert_eq!(access.len(), 4, "one line per request: {access:?}");
    assert!(
        !lines.iter().any(|l| l.contains("sqlx::pool")),
        "the pool's events are not logged at info"
    );
    let put_line = access
        .iter()
        .find(|e| e["span"]["request_id"] == put_id.as_str())
        .expect("the PUT's line carries its request id");
    assert_eq!(put_line["level"], "INFO");
    assert_eq!(put_line["route"], "/api/object/*");
    assert_eq!(put_line["status"], 201);
    assert_eq!(put_line["span"]["method"], "PUT");
    assert_eq!(put_line["tenant"], "default");
    assert_eq!(put_line["user"], "admin");
    assert!(put_line["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0));
    assert!(
        access
            .iter()
            .any(|e| e["route"] == "/login" && e["status"] == 200)
    );
    assert!(
        access
            .iter()
            .any(|e| e["status"] == 404 && e["user"] == "admin")
    );
    let all = lines.join("\n");
    for secret in [
        "private-key-name",
        "absent-key-name",
        "private-value",
        token.as_str(),
        ADMIN_PASSWORD,
    ] {
        assert!(!all.contains(secret), "{secret:?} logged:\n{all}");
    }
}

/// The server process, killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
