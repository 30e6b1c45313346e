//! `objectEvents` over a real WebSocket (graphql-transport-ws).

use std::time::Duration;

use api::auth::Role;
use serde_json::{Value, json};

use crate::support::{TestApp, User, WsClient, object_path};

const EVENTS: &str = "subscription($key: String, $prefix: String) {
    objectEvents(key: $key, prefix: $prefix) { kind key version object { key data version } } }";

/// Writes `probe` until its PUT event arrives on `id`: from then on the
/// subscription is live.
async fn wait_until_live(app: &TestApp, u: &User, ws: &mut WsClient, id: &str, probe: &str) {
    for _ in 0..100 {
        app.put(
            &object_path(probe),
            Some(&u.token),
            &json!({"data": "probe"}),
        )
        .await;
        if let Some(msg) = ws.try_next(Duration::from_millis(100)).await {
            assert_eq!(msg["id"], id, "{msg}");
            assert_eq!(msg["type"], "next", "{msg}");
            assert_eq!(msg["payload"]["data"]["objectEvents"]["key"], probe);
            // Drain events of further probes already in flight.
            while let Some(more) = ws.try_next(Duration::from_millis(50)).await {
                assert_eq!(
                    more["payload"]["data"]["objectEvents"]["key"], probe,
                    "{more}"
                );
            }
            return;
        }
    }
    panic!("the subscription never became live");
}

fn event(msg: &Value) -> &Value {
    assert_eq!(msg["type"], "next", "{msg}");
    &msg["payload"]["data"]["objectEvents"]
}

#[tokio::test]
async fn a_subscriber_sees_put_delete_and_expire_events_from_rest_and_graphql() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", u.ws_auth()).await;
    ws.subscribe("1", EVENTS, json!({"prefix": "w/"})).await;
    wait_until_live(&app, &u, &mut ws, "1", "w/probe").await;

    // PUT through REST.
    app.create(&u, "w/a", json!({"n": 1}), Some(5)).await;
    let put = ws.next().await;
    assert_eq!(
        event(&put),
        &json!({"kind": "PUT", "key": "w/a", "version": "1", "object": {"key": "w/a", "data": {"n": 1}, "version": "1"}})
    );
    // PUT through GraphQL.
    app.gql(
        Some(&u.token),
        "mutation { putObject(input: {key: \"w/b\", data: 2}) { created } }",
        json!({}),
    )
    .await;
    assert_eq!(event(&ws.next().await)["key"], "w/b");
    // A key outside the prefix is not delivered.
    app.create(&u, "elsewhere", json!(0), None).await;
    // DELETE.
    app.delete(&object_path("w/b"), Some(&u.token)).await;
    let del = ws.next().await;
    assert_eq!(
        event(&del),
        &json!({"kind": "DELETE", "key": "w/b", "version": "1", "object": null})
    );
    // EXPIRE, when the sweeper removes w/a.
    app.clock.advance(Duration::from_secs(5));
    let exp = ws.next().await;
    assert_eq!(
        event(&exp),
        &json!({"kind": "EXPIRE", "key": "w/a", "version": "1", "object": null})
    );
}

#[tokio::test]
async fn a_subscriber_never_sees_another_tenants_events() {
    let app = TestApp::spawn().await;
    let alice = app.user("alpha", Role::Writer).await;
    let bob = app.user("beta", Role::Writer).await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", alice.ws_auth()).await;
    ws.subscribe("s", EVENTS, json!({})).await;
    wait_until_live(&app, &alice, &mut ws, "s", "probe").await;

    for i in 0..5 {
        app.create(&bob, &format!("bob-{i}"), json!(i), None).await;
        app.create(&bob, "probe", json!(i), None).await;
        app.delete(&object_path("probe"), Some(&bob.token)).await;
    }
    app.create(&alice, "mine", json!("a"), None).await;
    let first = ws.next().await;
    assert_eq!(
        event(&first)["key"],
        "mine",
        "the first event alice sees is her own: {first}"
    );
}

#[tokio::test]
async fn a_key_subscription_sees_only_that_key() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", u.ws_auth()).await;
    ws.subscribe("k", EVENTS, json!({"key": "one"})).await;
    wait_until_live(&app, &u, &mut ws, "k", "one").await;
    app.create(&u, "one-more", json!(1), None).await;
    app.put(
        &object_path("one"),
        Some(&u.token),
        &json!({"data": "last"}),
    )
    .await;
    let e = ws.next().await;
    assert_eq!(event(&e)["key"], "one");
    assert_eq!(event(&e)["object"]["data"], "last");
}

#[tokio::test]
async fn a_subscription_without_a_token_gets_unauthenticated() {
    let app = TestApp::spawn().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", json!({})).await;
    ws.subscribe("x", EVENTS, json!({})).await;
    let msg = ws.next().await;
    assert_eq!(msg["type"], "next", "{msg}");
    assert_eq!(
        msg["payload"]["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
        "{msg}"
    );
    // A token that does not verify is refused at init (graphql-transport-ws: 4403).
    let mut bad = WsClient::open(&app.node.base, "/graphql/ws").await;
    bad.send(json!({"type": "connection_init", "payload": {"Authorization": "Bearer nope"}}))
        .await;
    assert_eq!(bad.closed().await, 4403);
}

#[tokio::test]
async fn a_subscription_must_select_exactly_one_top_level_field() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", u.ws_auth()).await;
    for (id, query) in [
        (
            "two",
            "subscription { a: objectEvents(key: \"a\") { key } b: objectEvents(key: \"b\") { key } }",
        ),
        (
            "fragment",
            "subscription Both { ...A objectEvents(key: \"b\") { key } } \
             fragment A on Subscription { a: objectEvents(key: \"a\") { key } }",
        ),
    ] {
        ws.subscribe(id, query, json!({})).await;
        let msg = ws.next().await;
        assert_eq!(msg["id"], id, "{msg}");
        let error = &msg["payload"]["errors"][0];
        assert_eq!(error["extensions"]["code"], "INVALID_INPUT", "{msg}");
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("exactly one top-level field")),
            "{msg}"
        );
        assert_eq!(ws.next().await, json!({"type": "complete", "id": id}));
    }
    // One field, selected directly, is the rule: async-graphql would end a
    // stream whose field stands in a fragment at once, and run a skipped one.
    for (id, query, says) in [
        (
            "in-fragment",
            "subscription { ... { objectEvents(key: \"a\") { key } } }",
            "not through a fragment",
        ),
        (
            "twice",
            "subscription { objectEvents(key: \"a\") { key } objectEvents(key: \"a\") { version } }",
            "directly, once",
        ),
        (
            "skipped",
            "subscription { objectEvents(key: \"a\") @skip(if: true) { key } }",
            "@skip or @include",
        ),
    ] {
        ws.subscribe(id, query, json!({})).await;
        let msg = ws.next().await;
        let error = &msg["payload"]["errors"][0];
        assert_eq!(error["extensions"]["code"], "INVALID_INPUT", "{msg}");
        assert!(
            error["message"].as_str().is_some_and(|m| m.contains(says)),
            "{msg}"
        );
        assert_eq!(ws.next().await, json!({"type": "complete", "id": id}));
    }
    // From revision 0, so that the write is seen whenever the stream starts.
    app.create(&u, "a", json!(1), None).await;
    ws.subscribe(
        "one",
        "subscription { objectEvents(key: \"a\", afterRevision: \"0\") { key version } }",
        json!({}),
    )
    .await;
    let put = ws.next().await;
    assert_eq!(put["id"], "one", "{put}");
    assert_eq!(
        put["payload"]["data"]["objectEvents"],
        json!({"key": "a", "version": "1"})
    );
    // Over HTTP, where subscriptions do not run, the rule is reported too.
    let r = app
        .gql(
            Some(&u.token),
            "subscription { a: objectEvents(key: \"a\") { key } b: objectEvents(key: \"b\") { key } }",
            json!({}),
        )
        .await;
    assert_eq!(
        r.body["errors"][0]["extensions"]["code"], "INVALID_INPUT",
        "{}",
        r.text
    );
    assert!(
        r.body["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("exactly one top-level field")),
        "{}",
        r.text
    );
    // An unknown fragment is reported as such, not counted as no field.
    let r = app
        .gql(Some(&u.token), "subscription { ...Missing }", json!({}))
        .await;
    assert!(
        r.body["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Missing") && !m.contains("top-level")),
        "{}",
        r.text
    );
}

#[tokio::test]
async fn a_socket_without_a_token_can_log_in_and_nothing_else() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "k", json!(1), None).await;
    let before = app.snapshot().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", json!({})).await;
    ws.subscribe(
        "login",
        "mutation($u: String!, $p: String!) { login(username: $u, password: $p) { accessToken tokenType } }",
        json!({"u": u.username, "p": crate::support::PASSWORD}),
    )
    .await;
    let msg = ws.next().await;
    assert_eq!(msg["id"], "login", "{msg}");
    assert_eq!(
        msg["payload"]["data"]["login"]["tokenType"], "Bearer",
        "{msg}"
    );
    let token = msg["payload"]["data"]["login"]["accessToken"]
        .as_str()
        .expect("a token")
        .to_owned();
    assert_eq!(ws.next().await["type"], "complete");
    assert_eq!(app.get("/api/objects", Some(&token)).await.status, 200);

    for (id, op) in [
        ("read", "{ object(key: \"k\") { key } }"),
        ("me", "{ me { username } }"),
        (
            "write",
            "mutation { putObject(input: {key: \"k\", data: 2}) { created } }",
        ),
    ] {
        ws.subscribe(id, op, json!({})).await;
        let msg = ws.next().await;
        assert_eq!(msg["id"], id, "{msg}");
        assert_eq!(
            msg["payload"]["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
            "{id}: {msg}"
        );
        assert_eq!(ws.next().await["type"], "complete", "{id}");
    }
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn subscriptions_also_work_on_the_graphql_path() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql", u.ws_auth()).await;
    ws.subscribe("1", EVENTS, json!({})).await;
    wait_until_live(&app, &u, &mut ws, "1", "probe").await;
}

#[tokio::test]
async fn queries_and_mutations_also_work_over_the_websocket() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", u.ws_auth()).await;
    ws.subscribe(
        "m",
        "mutation { createObject(input: {key: \"ws\", data: 1}) { version } }",
        json!({}),
    )
    .await;
    let msg = ws.next().await;
    assert_eq!(
        msg["payload"]["data"]["createObject"]["version"], "1",
        "{msg}"
    );
    assert_eq!(ws.next().await["type"], "complete");
    assert_eq!(app.read(&u, "ws").await.body["data"], 1);
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_catches_up_from_the_log_and_writers_are_not_blocked() {
    let app = TestApp::spawn_with(|c| c.event_buffer = 4).await;
    let u = app.writer().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", u.ws_auth()).await;
    ws.subscribe("slow", EVENTS, json!({"prefix": "b"})).await;
    wait_until_live(&app, &u, &mut ws, "slow", "b-probe").await;
    // 50 writes in one batch: far more wake-ups than the buffer of 4 holds.
    let items: Vec<_> = (0..50)
        .map(|i| json!({"key": format!("b{i:02}"), "data": i}))
        .collect();
    let r = app
        .post("/api/batch/object", Some(&u.token), &json!(items))
        .await;
    assert_eq!(r.body["succeeded"], 50, "writers finish regardless");
    let mut keys = Vec::new();
    while keys.len() < 50 {
        let msg = ws.next().await;
        keys.push(event(&msg)["key"].as_str().unwrap().to_owned());
    }
    let expected: Vec<String> = (0..50).map(|i| format!("b{i:02}")).collect();
    assert_eq!(keys, expected, "every change, once, in revision order");
}

#[tokio::test]
#[cfg_attr(
    not(kvql_test_postgres),
    ignore = "cross-node events need PostgreSQL: set KVQL_TEST_DATABASE_URL (on SQLite each node is its own server)"
)]
async fn a_subscriber_on_one_node_sees_writes_made_on_another() {
    let app = TestApp::spawn().await;
    assert!(app.node.state.db().is_postgres());
    let b = app.second_node().await;
    let u = app.writer().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", u.ws_auth()).await;
    ws.subscribe("x", EVENTS, json!({"prefix": "cross/"})).await;
    wait_until_live(&app, &u, &mut ws, "x", "cross/probe").await;

    let on_b = |path: &str| format!("{}{}", b.base, path);
    let small = app
        .send(
            app.client
                .post(on_b("/api/object"))
                .bearer_auth(&u.token)
                .json(&json!({"key": "cross/1", "data": {"from": "B"}})),
        )
        .await;
    assert_eq!(small.status, 201);
    let e = ws.next().await;
    assert_eq!(
        event(&e),
        &json!({"kind": "PUT", "key": "cross/1", "version": "1", "object": {"key": "cross/1", "data": {"from": "B"}, "version": "1"}})
    );

    // A value too large for NOTIFY arrives too, read back from the database.
    let big = "x".repeat(20_000);
    app.send(
        app.client
            .post(on_b("/api/object"))
            .bearer_auth(&u.token)
            .json(&json!({"key": "cross/big", "data": big})),
    )
    .await;
    let e = ws.next().await;
    assert_eq!(event(&e)["key"], "cross/big");
    assert_eq!(event(&e)["object"]["data"], json!(big));

    app.send(
        app.client
            .delete(on_b("/api/object/cross%2F1"))
            .bearer_auth(&u.token),
    )
    .await;
    assert_eq!(event(&ws.next().await)["kind"], "DELETE");
}
