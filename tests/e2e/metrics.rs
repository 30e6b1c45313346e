//! `GET /metrics`, read with a Prometheus text parser as a scraper reads it.

use api::auth::Role;
use prometheus_parse::{Scrape, Value as Sampled};
use serde_json::json;

use crate::support::{PASSWORD, TestApp, WsClient, object_path};

/// The scrape, parsed; panics unless it is valid Prometheus text.
pub(crate) async fn scrape(app: &TestApp, token: Option<&str>) -> (Scrape, String) {
    let mut req = app.client.get(app.url("/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("scrape");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = resp.text().await.expect("text");
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text");
    (scrape, text)
}

/// The value of the sample `name` whose labels include `labels`.
pub(crate) fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Sampled::Counter(v) | Sampled::Gauge(v) | Sampled::Untyped(v) => *v,
            Sampled::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            Sampled::Summary(_) => f64::NAN,
        })
}

const REQUESTS: &str = "kvql_http_request_duration_seconds_count";

#[tokio::test]
async fn metrics_count_requests_by_route_and_logins_by_outcome_and_move_with_them() {
    let app = TestApp::spawn().await;
    let u = app.user("metrics-tenant", Role::Writer).await;
    let wrong = app
        .post(
            "/login",
            None,
            &json!({"username": u.username, "password": format!("{PASSWORD}x")}),
        )
        .await;
    assert_eq!(wrong.status, 401);
    let path = object_path("metrics-private-key");
    assert_eq!(
        app.put(&path, Some(&u.token), &json!({"data": 1}))
            .await
            .status,
        201
    );
    assert_eq!(app.get(&path, Some(&u.token)).await.status, 200);
    let _ws = WsClient::connect(&app.node.base, "/graphql/ws", u.ws_auth()).await;

    let (before, text) = scrape(&app, None).await;
    let put = [
        ("route", "/api/object/*"),
        ("method", "PUT"),
        ("status", "201"),
    ];
    assert_eq!(value(&before, REQUESTS, &put), Some(1.0));
    let get = [
        ("route", "/api/object/*"),
        ("method", "GET"),
        ("status", "200"),
    ];
    assert_eq!(value(&before, REQUESTS, &get), Some(1.0));
    let login = [("route", "/login"), ("method", "POST"), ("status", "401")];
    assert_eq!(value(&before, REQUESTS, &login), Some(1.0));
    assert_eq!(
        value(
            &before,
            "kvql_http_request_duration_seconds_count",
            &[("route", "/api/object/*"), ("method", "PUT")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&before, "kvql_logins_total", &[("outcome", "failed")]),
        Some(1.0)
    );
    assert!(value(&before, "kvql_logins_total", &[("outcome", "succeeded")]) >= Some(1.0));
    assert_eq!(value(&before, "kvql_websockets_open", &[]), Some(1.0));
    assert!(value(&before, "kvql_db_pool_connections", &[("state", "idle")]).is_some());
    for process_wide in [
        "kvql_db_pool_acquire_seconds_count",
        "kvql_db_pool_acquire_timeouts_total",
    ] {
        assert!(
            value(&before, process_wide, &[]).is_some(),
            "{process_wide}"
        );
    }
    for private in ["metrics-private-key", u.username.as_str(), "metrics-tenant"] {
        assert!(!text.contains(private), "{private:?} in /metrics");
    }

    assert_eq!(
        app.put(&path, Some(&u.token), &json!({"data": 2}))
            .await
            .status,
        200
    );
    // A method of the client's invention is no label of its own.
    let invented = reqwest::Method::from_bytes(b"INVENTED").unwrap();
    let odd = app
        .send(app.client.request(invented, app.url("/healthz")))
        .await;
    assert!(odd.status >= 400, "{}", odd.status);
    let (after, text) = scrape(&app, None).await;
    assert!(!text.contains("INVENTED"));
    assert!(value(&after, REQUESTS, &[("method", "other")]).is_some());
    let replaced = [
        ("route", "/api/object/*"),
        ("method", "PUT"),
        ("status", "200"),
    ];
    assert_eq!(value(&after, REQUESTS, &replaced), Some(1.0));
    assert_eq!(value(&after, REQUESTS, &put), Some(1.0));
    let scrapes = [("route", "/metrics"), ("method", "GET"), ("status", "200")];
    assert_eq!(value(&after, REQUESTS, &scrapes), Some(1.0));
}

#[tokio::test]
async fn metrics_with_a_token_answer_only_that_token() {
    let app = TestApp::spawn_with(|c| c.metrics_token = Some("scrape-secret".into())).await;
    let u = app.writer().await;
    for token in [None, Some(u.token.as_str()), Some("scrape-secreT")] {
        app.get("/metrics", token)
            .await
            .assert_error(401, "UNAUTHENTICATED");
    }
    let (scrape, _) = scrape(&app, Some("scrape-secret")).await;
    assert!(value(&scrape, "kvql_logins_total", &[("outcome", "succeeded")]).is_some());
}

#[tokio::test]
async fn store_metrics_count_group_commits_cache_lookups_and_swept_values() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for i in 0..3 {
        let ttl = (i == 0).then_some(1);
        assert_eq!(
            app.create(&u, &format!("m/{i}"), json!(i), ttl)
                .await
                .status,
            201
        );
    }
    for _ in 0..2 {
        assert_eq!(app.read(&u, "m/1").await.status, 200);
    }
    app.clock.advance(std::time::Duration::from_millis(1500));
    app.sweeps(2).await;
    assert_eq!(app.read(&u, "m/0").await.status, 404);

    let (scrape, _) = scrape(&app, None).await;
    let groups = value(&scrape, "kvql_group_commit_writes_count", &[]).expect("groups");
    let writes = value(&scrape, "kvql_group_commit_writes_sum", &[]).expect("writes");
    assert!((1.0..=3.0).contains(&groups), "{groups} groups");
    assert_eq!(writes, 3.0);
    assert_eq!(value(&scrape, "kvql_sweeper_expired_total", &[]), Some(1.0));
    // Swept: nothing expired waits.
    assert_eq!(value(&scrape, "kvql_sweeper_lag_seconds", &[]), Some(0.0));
    let op = |name: &str| value(&scrape, "kvql_store_operations_total", &[("op", name)]);
    assert_eq!(op("create"), Some(3.0));
    assert_eq!(op("get"), Some(3.0));
    assert_eq!(op("batch_put"), Some(0.0));
    let hits = value(&scrape, "kvql_cache_lookups_total", &[("result", "hit")]);
    let misses = value(&scrape, "kvql_cache_lookups_total", &[("result", "miss")]);
    let lookups = hits.unwrap_or(0.0) + misses.unwrap_or(0.0);
    if app.db.url.starts_with("sqlite:") {
        // Three point reads, each looked up in the cache.
        assert_eq!(lookups, 3.0, "hits {hits:?}, misses {misses:?}");
    } else {
        assert_eq!(lookups, 0.0, "PostgreSQL has no read cache");
    }
}

#[tokio::test]
async fn graphql_metrics_count_operations_by_type_and_errors_by_code() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for _ in 0..2 {
        let r = app
            .gql(Some(&u.token), "{ me { username } }", json!({}))
            .await;
        assert_eq!(r.status, 200);
    }
    let put = app
        .gql(
            Some(&u.token),
            "mutation { putObject(input: {key: \"g\", data: 1}) { created } }",
            json!({}),
        )
        .await;
    assert_eq!(put.gql_data()["putObject"]["created"], true);
    let broken = app.gql(Some(&u.token), "{ me { ", json!({})).await;
    assert_eq!(broken.gql_error_code(), "INVALID_INPUT");
    let refused = app
        .gql(
            None,
            "mutation { putObject(input: {key: \"g\", data: 2}) { created } }",
            json!({}),
        )
        .await;
    assert_eq!(refused.gql_error_code(), "UNAUTHENTICATED");
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", u.ws_auth()).await;
    // From revision 0 under the prefix: the create is delivered whether it
    // commits before the subscription starts or after.
    ws.subscribe(
        "s",
        "subscription { objectEvents(prefix: \"after-\", afterRevision: \"0\") { key } }",
        json!({}),
    )
    .await;
    let created = app.create(&u, "after-subscribe", json!(1), None).await;
    assert_eq!(created.status, 201);
    assert_eq!(ws.next().await["type"], "next");

    let (scrape, _) = scrape(&app, None).await;
    let ops = |ty| value(&scrape, "kvql_graphql_operations_total", &[("type", ty)]);
    assert_eq!(ops("query"), Some(2.0));
    assert_eq!(ops("mutation"), Some(2.0));
    assert_eq!(ops("subscription"), Some(1.0));
    let errors = |code| value(&scrape, "kvql_graphql_errors_total", &[("code", code)]);
    assert_eq!(errors("INVALID_INPUT"), Some(1.0));
    assert_eq!(errors("UNAUTHENTICATED"), Some(1.0));
    assert_eq!(
        value(&scrape, "kvql_feed_changes_delivered_total", &[]),
        Some(1.0)
    );
    assert_eq!(value(&scrape, "kvql_change_feeds_open", &[]), Some(1.0));
}

#[tokio::test]
async fn the_sweeper_lag_shows_how_long_an_expired_value_has_waited() {
    let app =
        TestApp::spawn_with(|c| c.sweep_interval = std::time::Duration::from_secs(3600)).await;
    let u = app.writer().await;
    assert_eq!(app.create(&u, "soon", json!(1), Some(1)).await.status, 201);
    let (scrape_live, _) = scrape(&app, None).await;
    assert_eq!(
        value(&scrape_live, "kvql_sweeper_lag_seconds", &[]),
        Some(0.0)
    );
    app.clock.advance(std::time::Duration::from_millis(3500));
    let (waiting, _) = scrape(&app, None).await;
    assert_eq!(value(&waiting, "kvql_sweeper_lag_seconds", &[]), Some(2.5));
}

#[test]
fn an_empty_metrics_token_is_refused_at_startup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("kvql.db").display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvql"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("KVQL_METRICS_TOKEN", "")
        .env("KVQL_DATABASE_URL", url)
        .output()
        .expect("run kvql");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("KVQL_METRICS_TOKEN") || stderr.contains("--metrics-token"),
        "{stderr}"
    );
}

#[tokio::test]
async fn requests_refused_for_the_tenant_rate_are_counted() {
    let app = TestApp::spawn_with(|c| {
        c.tenant_rate = Some(1);
        c.tenant_burst = Some(1);
    })
    .await;
    let u = app.writer().await;
    let (before, _) = scrape(&app, None).await;
    assert_eq!(
        value(&before, "kvql_tenant_rate_limited_total", &[]),
        Some(0.0)
    );
    assert_eq!(app.read(&u, "k").await.status, 404);
    assert_eq!(app.read(&u, "k").await.status, 429);
    assert_eq!(app.read(&u, "k").await.status, 429);
    let (after, _) = scrape(&app, None).await;
    assert_eq!(
        value(&after, "kvql_tenant_rate_limited_total", &[]),
        Some(2.0)
    );
    // Refused before the store: one get was asked of it.
    assert_eq!(
        value(&after, "kvql_store_operations_total", &[("op", "get")]),
        Some(1.0)
    );
}
