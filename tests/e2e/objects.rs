//! Single-object create, read, put and delete, with versions and ETags.

use serde_json::json;

use crate::support::{TestApp, object_path};

#[tokio::test]
async fn create_returns_409_when_key_exists_and_keeps_the_value() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    assert_eq!(app.create(&u, "k", json!("first"), None).await.status, 201);
    let before = app.snapshot().await;

    let r = app.create(&u, "k", json!("second"), Some(60)).await;
    r.assert_error(409, "ALREADY_EXISTS");
    assert_eq!(app.snapshot().await, before);
    assert_eq!(app.read(&u, "k").await.body["data"], "first");
}

#[tokio::test]
async fn create_stores_any_json_value() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let values = [
        json!(null),
        json!(true),
        json!(-12.5),
        json!("text with \"quotes\" and ünïcode"),
        json!([1, [2, {"three": 3}]]),
        json!({"nested": {"deep": [null, false]}}),
    ];
    for (i, v) in values.iter().enumerate() {
        let key = format!("v{i}");
        assert_eq!(app.create(&u, &key, v.clone(), None).await.status, 201);
        assert_eq!(&app.read(&u, &key).await.body["data"], v);
    }
}

#[tokio::test]
async fn get_returns_404_for_a_missing_key() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.read(&u, "nothing-here")
        .await
        .assert_error(404, "NOT_FOUND");
}

#[tokio::test]
async fn put_creates_with_201_then_replaces_with_200_and_bumps_the_version() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let path = object_path("p");
    let first = app.put(&path, Some(&u.token), &json!({"data": 1})).await;
    assert_eq!(first.status, 201, "{}", first.text);
    assert_eq!(first.body["version"], 1);
    assert_eq!(first.header("etag"), Some("\"1\""));
    assert_eq!(first.body["message"], "Key-Value pair created");

    let second = app
        .put(&path, Some(&u.token), &json!({"data": 2, "ttl": 30}))
        .await;
    assert_eq!(second.status, 200, "{}", second.text);
    assert_eq!(second.body["version"], 2);
    assert_eq!(second.header("etag"), Some("\"2\""));
    assert_eq!(second.body["created_at"], first.body["created_at"]);

    let read = app.read(&u, "p").await;
    assert_eq!(read.body["data"], 2);
    assert_eq!(read.body["version"], 2);
    assert_eq!(read.body["ttl"], 30);

    // A PUT without ttl clears the expiry along with replacing the data.
    let third = app.put(&path, Some(&u.token), &json!({"data": 3})).await;
    assert_eq!(third.status, 200);
    assert_eq!(app.read(&u, "p").await.body["ttl"], json!(null));
}

#[tokio::test]
async fn put_with_the_current_etag_replaces_the_value() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "c", json!("v1"), None).await;
    let etag = app.read(&u, "c").await.header("etag").unwrap().to_owned();
    let r = app
        .send(
            app.request(reqwest::Method::PUT, &object_path("c"), Some(&u.token))
                .header("If-Match", etag)
                .json(&json!({"data": "v2"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("etag"), Some("\"2\""));
    assert_eq!(app.read(&u, "c").await.body["data"], "v2");
}

#[tokio::test]
async fn put_returns_412_for_a_stale_etag_and_keeps_the_value() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "c", json!("v1"), None).await;
    app.put(&object_path("c"), Some(&u.token), &json!({"data": "v2"}))
        .await;
    let before = app.snapshot().await;

    let r = app
        .send(
            app.request(reqwest::Method::PUT, &object_path("c"), Some(&u.token))
                .header("If-Match", "\"1\"")
                .json(&json!({"data": "stale write"})),
        )
        .await;
    r.assert_error(412, "VERSION_MISMATCH");
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn put_with_if_match_returns_404_for_a_missing_key_and_creates_nothing() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for tag in ["\"1\"", "*"] {
        let r = app
            .send(
                app.request(reqwest::Method::PUT, &object_path("ghost"), Some(&u.token))
                    .header("If-Match", tag)
                    .json(&json!({"data": 1})),
            )
            .await;
        r.assert_error(404, "NOT_FOUND");
    }
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn put_with_if_none_match_star_creates_only() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let put = |data: i64| {
        app.request(reqwest::Method::PUT, &object_path("once"), Some(&u.token))
            .header("If-None-Match", "*")
            .json(&json!({"data": data}))
    };
    assert_eq!(app.send(put(1)).await.status, 201);
    let before = app.snapshot().await;
    app.send(put(2)).await.assert_error(409, "ALREADY_EXISTS");
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn put_returns_400_for_an_unparseable_if_match() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "c", json!(1), None).await;
    let before = app.snapshot().await;
    let r = app
        .send(
            app.request(reqwest::Method::PUT, &object_path("c"), Some(&u.token))
                .header("If-Match", "not-an-etag")
                .json(&json!({"data": 2})),
        )
        .await;
    r.assert_error(400, "INVALID_INPUT");
    assert_eq!(r.body["field"], "If-Match");
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn conditional_writes_return_400_for_conditions_that_are_not_text_and_change_nothing() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "c", json!(1), None).await;
    app.put(&object_path("c"), Some(&u.token), &json!({"data": 2}))
        .await;
    let before = app.snapshot().await;
    // Bytes that are not visible ASCII: a header parser that skipped them
    // would see no condition and write unconditionally.
    let header = |bytes: &[u8]| reqwest::header::HeaderValue::from_bytes(bytes).expect("header");
    for (method, name, value) in [
        (reqwest::Method::PUT, "If-Match", &b"\"1\xe9\""[..]),
        (reqwest::Method::PUT, "If-None-Match", &b"*\xe9"[..]),
        (reqwest::Method::DELETE, "If-Match", &b"\"1\xe9\""[..]),
    ] {
        let mut req = app
            .request(method.clone(), &object_path("c"), Some(&u.token))
            .header(name, header(value));
        if method == reqwest::Method::PUT {
            req = req.json(&json!({"data": "stale"}));
        }
        let r = app.send(req).await;
        r.assert_error(400, "INVALID_INPUT");
        assert_eq!(r.body["field"], name, "{method} with {name}");
    }
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn get_with_if_none_match_returns_304_for_the_current_version() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "c", json!(1), None).await;
    let r = app
        .send(
            app.request(reqwest::Method::GET, &object_path("c"), Some(&u.token))
                .header("If-None-Match", "\"1\""),
        )
        .await;
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some("\"1\""));
    app.put(&object_path("c"), Some(&u.token), &json!({"data": 2}))
        .await;
    let r = app
        .send(
            app.request(reqwest::Method::GET, &object_path("c"), Some(&u.token))
                .header("If-None-Match", "\"1\""),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"], 2);
}

#[tokio::test]
async fn delete_returns_404_for_a_missing_key() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "other", json!(1), None).await;
    let before = app.snapshot().await;
    app.delete(&object_path("missing"), Some(&u.token))
        .await
        .assert_error(404, "NOT_FOUND");
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn delete_with_a_stale_etag_returns_412_and_keeps_the_value() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "d", json!(1), None).await;
    app.put(&object_path("d"), Some(&u.token), &json!({"data": 2}))
        .await;
    let before = app.snapshot().await;
    let stale = app
        .send(
            app.request(reqwest::Method::DELETE, &object_path("d"), Some(&u.token))
                .header("If-Match", "\"1\""),
        )
        .await;
    stale.assert_error(412, "VERSION_MISMATCH");
    assert_eq!(app.snapshot().await, before);
    let current = app
        .send(
            app.request(reqwest::Method::DELETE, &object_path("d"), Some(&u.token))
                .header("If-Match", "\"2\""),
        )
        .await;
    assert_eq!(current.status, 200, "{}", current.text);
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn a_deleted_key_can_be_created_again_and_its_version_continues() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "again", json!(1), None).await;
    app.put(&object_path("again"), Some(&u.token), &json!({"data": 2}))
        .await;
    assert_eq!(
        app.delete(&object_path("again"), Some(&u.token))
            .await
            .status,
        200
    );
    let r = app.create(&u, "again", json!(3), None).await;
    assert_eq!(r.status, 201);
    // Versions 1 and 2 were the deleted value's: an ETag taken then must
    // not match the new value (no ABA).
    assert_eq!(r.body["version"], 3);
    assert_eq!(r.header("etag"), Some("\"3\""));
}
