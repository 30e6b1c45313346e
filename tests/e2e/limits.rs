//! Per-tenant request rates (`KVQL_TENANT_RATE`, `kvql tenant set-rate`).

use std::time::Duration;

use api::auth::Role;
use api::ratelimit::{Rate, TenantRate};
use serde_json::json;

use crate::support::{TestApp, WsClient};

/// The keys `GET /api/objects` lists for `token`, which it must answer.
async fn listed_keys(app: &TestApp, token: Option<&str>) -> Vec<String> {
    let listed = app.get("/api/objects", token).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    listed.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap().to_owned())
        .collect()
}

/// Two requests per second, three at once.
async fn limited_app() -> TestApp {
    TestApp::spawn_with(|c| {
        c.tenant_rate = Some(2);
        c.tenant_burst = Some(3);
    })
    .await
}

#[tokio::test]
async fn a_tenant_over_its_rate_gets_429_with_retry_after_until_its_bucket_refills() {
    let app = limited_app().await;
    let alice = app.user("alpha", Role::Writer).await;
    let bob = app.user("beta", Role::Writer).await;
    let t = Some(alice.token.as_str());

    // REST and GraphQL over HTTP draw on the same bucket.
    assert_eq!(app.get("/api/objects", t).await.status, 200);
    let gql = app.gql(t, "{ me { username } }", json!({})).await;
    assert_eq!(gql.gql_data()["me"]["username"], alice.username.as_str());
    assert_eq!(app.create(&alice, "kept", json!(1), None).await.status, 201);

    let refused = app.create(&alice, "refused", json!(2), None).await;
    refused.assert_error(429, "RATE_LIMITED");
    assert_eq!(refused.header("retry-after"), Some("1"));
    refused.assert_mentions("2 per second, 3 at once");
    let refused = app.gql(t, "{ me { username } }", json!({})).await;
    assert_eq!(refused.status, 429, "{}", refused.text);
    assert_eq!(refused.body["code"], "RATE_LIMITED");

    // Another tenant, anonymous requests and logins are not counted.
    assert_eq!(app.get("/api/objects", Some(&bob.token)).await.status, 200);
    assert_eq!(app.get("/healthz", None).await.status, 200);
    app.login(&alice.username, crate::support::PASSWORD).await;

    // Half a second refills one request.
    app.clock.advance(Duration::from_millis(500));
    let keys = listed_keys(&app, t).await;
    assert_eq!(keys, ["kept"], "the refused create wrote nothing");
    app.get("/api/objects", t)
        .await
        .assert_error(429, "RATE_LIMITED");
}

#[tokio::test]
async fn each_operation_of_a_graphql_batch_counts_against_the_tenant_rate() {
    let app = limited_app().await;
    let alice = app.user("alpha", Role::Writer).await;
    let t = Some(alice.token.as_str());
    let me = json!({"query": "{ me { username } }"});

    // Three operations take the whole burst of three.
    let answered = app.post("/graphql", t, &json!([me, me, me])).await;
    assert_eq!(answered.status, 200, "{}", answered.text);
    assert_eq!(answered.body.as_array().map(Vec::len), Some(3));
    app.get("/api/objects", t)
        .await
        .assert_error(429, "RATE_LIMITED");

    // A batch is admitted when a request would be, and owes the rest, down
    // to one burst below empty: one token refilled, a batch of five would
    // leave the bucket four below empty, but it stops at three, which takes
    // two seconds at two per second to repay.
    app.clock.advance(Duration::from_millis(500));
    let create = |key: &str| {
        json!({
            "query": "mutation($k: String!) { createObject(input: {key: $k, data: 1}) { key } }",
            "variables": {"k": key},
        })
    };
    let batch: Vec<_> = (0..5).map(|i| create(&format!("b{i}"))).collect();
    let answered = app.post("/graphql", t, &json!(batch)).await;
    assert_eq!(answered.status, 200, "{}", answered.text);
    let refused = app
        .post("/graphql", t, &json!([create("late-1"), create("late-2")]))
        .await;
    refused.assert_error(429, "RATE_LIMITED");
    assert_eq!(refused.header("retry-after"), Some("2"));
    app.clock.advance(Duration::from_millis(1500));
    app.get("/api/objects", t)
        .await
        .assert_error(429, "RATE_LIMITED");
    app.clock.advance(Duration::from_millis(500));
    let keys = listed_keys(&app, t).await;
    assert_eq!(
        keys,
        ["b0", "b1", "b2", "b3", "b4"],
        "the refused batch wrote nothing"
    );
}

#[tokio::test]
async fn operations_started_on_a_websocket_count_against_the_tenant_rate() {
    let app = limited_app().await;
    let alice = app.user("alpha", Role::Reader).await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", alice.ws_auth()).await;
    for i in 0..3 {
        let id = format!("q{i}");
        ws.subscribe(&id, "{ me { username } }", json!({})).await;
        let next = ws.next().await;
        assert_eq!(next["type"], "next", "{next}");
        assert_eq!(next["id"], id.as_str());
        assert_eq!(ws.next().await["type"], "complete");
    }
    ws.subscribe("q3", "{ me { username } }", json!({})).await;
    let refused = ws.next().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["id"], "q3");
    assert_eq!(refused["payload"][0]["extensions"]["code"], "RATE_LIMITED");
    assert_eq!(refused["payload"][0]["extensions"]["retryAfter"], 1);

    // The socket stays, and the operation runs once the bucket refills.
    app.clock.advance(Duration::from_secs(1));
    ws.subscribe("q4", "{ me { username } }", json!({})).await;
    let next = ws.next().await;
    assert_eq!(next["type"], "next", "{next}");
    assert_eq!(
        next["payload"]["data"]["me"]["username"],
        alice.username.as_str()
    );
}

#[tokio::test]
async fn a_tenants_own_rate_overrides_the_nodes_and_none_lifts_it() {
    let app = limited_app().await;
    let db = app.node.state.db();
    let alice = app.user("alpha", Role::Writer).await;
    let t = Some(alice.token.as_str());

    api::users::set_tenant_rate(db, "alpha", TenantRate::Unlimited)
        .await
        .unwrap();
    // Past the auth cache, the next verification reads the tenant's rate.
    app.clock.advance(Duration::from_secs(2));
    for _ in 0..10 {
        assert_eq!(app.get("/api/objects", t).await.status, 200);
    }

    api::users::set_tenant_rate(
        db,
        "alpha",
        TenantRate::Own(Rate {
            per_second: 1,
            burst: 1,
        }),
    )
    .await
    .unwrap();
    app.clock.advance(Duration::from_secs(2));
    assert_eq!(app.get("/api/objects", t).await.status, 200);
    let refused = app.get("/api/objects", t).await;
    refused.assert_error(429, "RATE_LIMITED");
    refused.assert_mentions("1 per second, 1 at once");

    api::users::set_tenant_rate(db, "alpha", TenantRate::NodeDefault)
        .await
        .unwrap();
    app.clock.advance(Duration::from_secs(2));
    // The change keeps what the bucket held (one token, refilled at the old
    // rate of 1 per second, at most its burst of 1): switching rates does
    // not refill it.
    assert_eq!(app.get("/api/objects", t).await.status, 200);
    app.get("/api/objects", t)
        .await
        .assert_error(429, "RATE_LIMITED");
    // From there it refills at 2 per second, up to 3.
    app.clock.advance(Duration::from_secs(2));
    for _ in 0..3 {
        assert_eq!(app.get("/api/objects", t).await.status, 200);
    }
    app.get("/api/objects", t)
        .await
        .assert_error(429, "RATE_LIMITED");

    let missing = api::users::set_tenant_rate(db, "no-such-tenant", TenantRate::Unlimited).await;
    assert!(
        missing
            .unwrap_err()
            .to_string()
            .contains("no tenant named \"no-such-tenant\"")
    );
}

#[tokio::test]
async fn without_a_rate_nothing_is_limited() {
    let app = TestApp::spawn().await;
    let alice = app.user("alpha", Role::Writer).await;
    for _ in 0..50 {
        assert_eq!(
            app.get("/api/objects", Some(&alice.token)).await.status,
            200
        );
    }
}
