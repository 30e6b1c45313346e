//! Every error is JSON with the right status, including the framework's own.

use sea_orm::ConnectionTrait;
use serde_json::json;

use crate::support::{TestApp, object_path};

#[tokio::test]
async fn malformed_json_gets_400_invalid_input() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let r = app
        .send(
            app.request(reqwest::Method::POST, "/api/object", Some(&u.token))
                .header("content-type", "application/json")
                .body("{\"key\": \"k\", \"data\": "),
        )
        .await;
    r.assert_error(400, "INVALID_INPUT");
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn a_wrong_content_type_gets_415_invalid_input() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let r = app
        .send(
            app.request(reqwest::Method::POST, "/api/object", Some(&u.token))
                .header("content-type", "text/plain")
                .body(r#"{"key": "k", "data": 1}"#),
        )
        .await;
    r.assert_error(415, "INVALID_INPUT");
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn a_missing_field_gets_400_naming_it() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for (body, field) in [
        (json!({"data": 1}), "key"),
        (json!({"key": "k"}), "data"),
        (json!({"key": 5, "data": 1}), "key"),
    ] {
        let r = app.post("/api/object", Some(&u.token), &body).await;
        r.assert_error(400, "INVALID_INPUT");
        assert!(r.text.contains(field), "names {field}: {}", r.text);
    }
    let r = app
        .put(&object_path("k"), Some(&u.token), &json!({"ttl": 5}))
        .await;
    r.assert_error(400, "INVALID_INPUT");
    assert!(r.text.contains("data"), "{}", r.text);
    let r = app
        .post("/login", None, &json!({"username": "admin"}))
        .await;
    r.assert_error(400, "INVALID_INPUT");
    assert!(r.text.contains("password"), "{}", r.text);
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn an_explicit_null_is_a_value() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let r = app
        .post(
            "/api/object",
            Some(&u.token),
            &json!({"key": "n", "data": null}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(app.read(&u, "n").await.body["data"], json!(null));
}

#[tokio::test]
async fn an_unknown_route_gets_404_and_a_wrong_method_405_both_json() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.get("/no/such/route", Some(&u.token))
        .await
        .assert_error(404, "NOT_FOUND");
    app.get("/api/batch/object", Some(&u.token))
        .await
        .assert_error(405, "METHOD_NOT_ALLOWED");
    app.send(app.request(reqwest::Method::PATCH, &object_path("k"), Some(&u.token)))
        .await
        .assert_error(405, "METHOD_NOT_ALLOWED");
}

#[tokio::test]
async fn a_value_over_the_limit_gets_413_and_nothing_is_written() {
    let app = TestApp::spawn_with(|c| c.max_value_bytes = 1000).await;
    let u = app.writer().await;
    let big = json!("x".repeat(1000));
    app.create(&u, "big", big.clone(), None)
        .await
        .assert_error(413, "PAYLOAD_TOO_LARGE");
    app.put(&object_path("big"), Some(&u.token), &json!({"data": big}))
        .await
        .assert_error(413, "PAYLOAD_TOO_LARGE");
    assert_eq!(app.row_count().await, 0);
    // 998 characters and two quotes make exactly 1000 bytes of JSON.
    let fits = app.create(&u, "fits", json!("x".repeat(998)), None).await;
    assert_eq!(fits.status, 201, "{}", fits.text);
}

#[tokio::test]
async fn a_body_over_the_request_limit_gets_413_with_or_without_a_length() {
    let app = TestApp::spawn_with(|c| c.max_body_bytes = Some(10_000)).await;
    let u = app.writer().await;
    let body = json!({"key": "k", "data": "x".repeat(20_000)}).to_string();
    let r = app
        .send(
            app.request(reqwest::Method::POST, "/api/object", Some(&u.token))
                .header("content-type", "application/json")
                .body(body.clone()),
        )
        .await;
    r.assert_error(413, "PAYLOAD_TOO_LARGE");
    let chunks: Vec<Result<String, std::io::Error>> = body
        .as_bytes()
        .chunks(1000)
        .map(|c| Ok(String::from_utf8(c.to_vec()).unwrap()))
        .collect();
    let r = app
        .send(
            app.request(reqwest::Method::POST, "/api/object", Some(&u.token))
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                    chunks,
                ))),
        )
        .await;
    r.assert_error(413, "PAYLOAD_TOO_LARGE");
    assert_eq!(app.row_count().await, 0);
    // A small chunked body still works.
    let small = json!({"key": "k", "data": 1}).to_string();
    let r = app
        .send(
            app.request(reqwest::Method::POST, "/api/object", Some(&u.token))
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                    vec![Ok::<_, std::io::Error>(small)],
                ))),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
}

#[tokio::test]
async fn strings_with_nul_are_refused_on_every_backend() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let r = app.create(&u, "k", json!({"a": "x\u{0}y"}), None).await;
    r.assert_error(400, "INVALID_INPUT");
    assert_eq!(r.body["field"], "data");
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn an_internal_error_gets_500_with_a_request_id_and_no_cause() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let db = app.node.state.db();
    db.write
        .execute_unprepared("ALTER TABLE object RENAME TO object_gone")
        .await
        .unwrap();
    let r = app.read(&u, "k").await;
    r.assert_error(500, "INTERNAL");
    let id = r.header("x-request-id").unwrap().to_owned();
    assert_eq!(r.body["request_id"], id.as_str());
    assert!(r.body["error"].as_str().unwrap().contains(&id));
    let lower = r.text.to_lowercase();
    for leak in ["object", "table", "sql", "relation"] {
        assert!(!lower.contains(leak), "cause leaked ({leak}): {}", r.text);
    }
}

#[tokio::test]
async fn every_answer_carries_a_request_id_and_a_valid_one_is_echoed() {
    let app = TestApp::spawn().await;
    let r = app.get("/healthz", None).await;
    assert!(r.header("x-request-id").is_some_and(|v| v.len() >= 16));
    let r = app
        .send(
            app.request(reqwest::Method::GET, "/nope", None)
                .header("x-request-id", "trace-123"),
        )
        .await;
    assert_eq!(r.header("x-request-id"), Some("trace-123"));
}
