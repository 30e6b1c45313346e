//! Numbers come back exactly as written, through REST, GraphQL and events:
//! property tests over random JSON values, and integers beyond 64 bits are
//! refused rather than rounded.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Value, json};

use crate::support::{TestApp, WsClient, object_path};

/// Random JSON: every kind of number (any finite double, any i64 and u64),
/// strings, booleans, null, and arrays and objects of them a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        (0.0f64..1.0).prop_map(|f| json!(f)),
        "[^\u{0}]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `n` values drawn from a fixed seed, so a failure names a value that
/// reproduces.
fn samples(n: usize) -> Vec<Value> {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let strategy = json_value();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).expect("a value").current())
        .collect()
}

/// Two JSON values are the same, numbers compared as written (an integer
/// and the equal float count as equal only where JSON makes them so).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
                (Some(p), Some(q), _, _) => p == q,
                (_, _, Some(p), Some(q)) => p == q,
                _ => {
                    x.as_f64().map(f64::to_bits) == y.as_f64().map(f64::to_bits)
                        || (x.as_f64() == Some(0.0) && y.as_f64() == Some(0.0))
                }
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[tokio::test]
async fn random_json_values_read_back_exactly_through_rest() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for (i, value) in samples(150).into_iter().enumerate() {
        let key = format!("v{i}");
        let r = app.create(&u, &key, value.clone(), None).await;
        assert_eq!(r.status, 201, "{value}: {}", r.text);
        let read = app.read(&u, &key).await;
        assert!(
            same(&read.body["data"], &value),
            "wrote {value}, read {}",
            read.body["data"]
        );
    }
}

#[tokio::test]
async fn random_json_values_read_back_exactly_through_graphql() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for (i, value) in samples(100).into_iter().enumerate() {
        let key = format!("g{i}");
        let r = app
            .gql(
                Some(&u.token),
                "mutation($k: String!, $d: JSON!) { putObject(input: {key: $k, data: $d}) { object { data } } }",
                json!({"k": key, "d": value}),
            )
            .await;
        let written = &r.gql_data()["putObject"]["object"]["data"];
        assert!(same(written, &value), "wrote {value}, answered {written}");
        let r = app
            .gql(
                Some(&u.token),
                "query($k: String!) { object(key: $k) { data } }",
                json!({"k": key}),
            )
            .await;
        let read = &r.gql_data()["object"]["data"];
        assert!(same(read, &value), "wrote {value}, read {read}");
    }
}

#[tokio::test]
async fn doubles_that_used_to_change_arrive_unchanged_in_events() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", u.ws_auth()).await;
    ws.subscribe(
        "e",
        "subscription { objectEvents(prefix: \"n\") { key object { data } } }",
        json!({}),
    )
    .await;
    let values = [
        json!(0.9773585223395943),
        json!(5e-324),
        json!(1.7976931348623157e308),
        json!(-0.1),
        json!(9007199254740993u64),
        json!(-9223372036854775808i64),
        json!(18446744073709551615u64),
    ];
    // The subscription is live once an event for a probe write arrives.
    loop {
        assert_eq!(
            app.put(&object_path("nprobe"), Some(&u.token), &json!({"data": 0}))
                .await
                .status
                / 100,
            2
        );
        if let Some(msg) = ws.try_next(std::time::Duration::from_millis(200)).await {
            assert_eq!(
                msg["payload"]["data"]["objectEvents"]["key"], "nprobe",
                "{msg}"
            );
            break;
        }
    }
    for (i, value) in values.iter().enumerate() {
        let key = format!("n{i}");
        let r = app.create(&u, &key, value.clone(), None).await;
        assert_eq!(r.status, 201, "{}", r.text);
        // Skip the events of any probe writes still on their way.
        let msg = loop {
            let msg = ws.next().await;
            if msg["payload"]["data"]["objectEvents"]["key"] != "nprobe" {
                break msg;
            }
        };
        let event = &msg["payload"]["data"]["objectEvents"];
        assert_eq!(event["key"], key.as_str(), "{msg}");
        assert!(
            same(&event["object"]["data"], value),
            "wrote {value}, event had {event}"
        );
    }
}

#[tokio::test]
async fn integers_beyond_64_bits_are_refused_not_rounded() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let body = r#"{"key": "big", "data": {"n": 123456789012345678901234567890}}"#;
    let r = app.post_text("/api/object", &u.token, body).await;
    r.assert_error(400, "INVALID_INPUT");
    r.assert_mentions("64 bits");
    assert_eq!(app.read(&u, "big").await.status, 404, "nothing was written");

    let gql = r#"{"query": "mutation($d: JSON!) { createObject(input: {key: \"big\", data: $d}) { key } }", "variables": {"d": -98765432109876543210}}"#;
    let r = app.post_text("/graphql", &u.token, gql).await;
    r.assert_error(400, "INVALID_INPUT");
    assert_eq!(app.read(&u, "big").await.status, 404, "nothing was written");
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn extreme_doubles_read_back_in_short_form_and_can_be_written_back() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let written = json!([1e300, 5e-324, -1.7976931348623157e308, 1e-7]);
    assert_eq!(app.create(&u, "x", written.clone(), None).await.status, 201);
    let read = app.read(&u, "x").await;
    assert!(same(&read.body["data"], &written), "{}", read.text);
    // PostgreSQL prints numbers in plain notation; kvql answers in the
    // short form, which a client can send back as it is.
    assert!(read.text.len() < 400, "{}", read.text);
    let back = app
        .put(
            &object_path("x"),
            Some(&u.token),
            &json!({"data": read.body["data"]}),
        )
        .await;
    assert_eq!(back.status, 200, "{}", back.text);
}
