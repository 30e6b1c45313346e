//! Batches: per-item results by default, all-or-nothing with `atomic=true`.

use serde_json::json;

use crate::support::TestApp;

#[tokio::test]
async fn a_batch_reports_each_item_in_order_and_writes_only_the_good_ones() {
    let app = TestApp::spawn_with(|c| c.max_value_bytes = 100).await;
    let u = app.writer().await;
    app.create(&u, "taken", json!("original"), None).await;
    let r = app
        .post(
            "/api/batch/object",
            Some(&u.token),
            &json!([
                {"key": "a", "data": 1},
                {"key": "taken", "data": "overwrite?"},
                {"key": "", "data": 2},
                {"key": "b", "data": 3, "ttl": 0},
                {"key": "big", "data": "x".repeat(200)},
                {"key": "c", "data": {"ok": true}, "ttl": 60},
                {"key": "a", "data": "duplicate in the batch"}
            ]),
        )
        .await;
    assert_eq!(r.status, 200, "some items failed: {}", r.text);
    assert_eq!(r.body["message"], "Batch create complete");
    let results = r.body["results"].as_array().unwrap();
    let summary: Vec<(String, bool, u64, Option<&str>)> = results
        .iter()
        .map(|i| {
            (
                i["key"].as_str().unwrap().to_owned(),
                i["ok"].as_bool().unwrap(),
                i["status"].as_u64().unwrap(),
                i["code"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a".into(), true, 201, None),
            ("taken".into(), false, 409, Some("ALREADY_EXISTS")),
            ("".into(), false, 400, Some("INVALID_INPUT")),
            ("b".into(), false, 400, Some("INVALID_INPUT")),
            ("big".into(), false, 413, Some("PAYLOAD_TOO_LARGE")),
            ("c".into(), true, 201, None),
            ("a".into(), false, 409, Some("ALREADY_EXISTS")),
        ]
    );
    for (i, item) in results.iter().enumerate() {
        assert_eq!(item["index"], i);
    }
    assert_eq!(r.body["succeeded"], 2);
    assert_eq!(r.body["failed"], 5);
    let rows = app.snapshot().await;
    let keys: Vec<&str> = rows.iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["a", "c", "taken"]);
    assert_eq!(app.read(&u, "a").await.body["data"], 1);
    assert_eq!(app.read(&u, "taken").await.body["data"], "original");
    assert_eq!(app.read(&u, "c").await.body["ttl"], 60);
}

#[tokio::test]
async fn an_atomic_batch_writes_everything_when_every_item_is_good() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let r = app
        .post(
            "/api/batch/object?atomic=true",
            Some(&u.token),
            &json!([{"key": "x", "data": 1}, {"key": "y", "data": 2}]),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["message"], "Batch create complete");
    assert_eq!(r.body["succeeded"], 2);
    assert_eq!(app.row_count().await, 2);
}

#[tokio::test]
async fn an_atomic_batch_with_a_conflict_writes_nothing_and_names_the_item() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "taken", json!("original"), None).await;
    let before = app.snapshot().await;
    let r = app
        .post(
            "/api/batch/object?atomic=true",
            Some(&u.token),
            &json!([
                {"key": "x", "data": 1},
                {"key": "y", "data": 2},
                {"key": "taken", "data": 3},
                {"key": "z", "data": 4}
            ]),
        )
        .await;
    r.assert_error(409, "ALREADY_EXISTS");
    assert_eq!(r.body["index"], 2);
    assert_eq!(r.body["key"], "taken");
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn an_atomic_batch_with_an_invalid_item_writes_nothing() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let r = app
        .post(
            "/api/batch/object?atomic=true",
            Some(&u.token),
            &json!([{"key": "x", "data": 1}, {"key": "bad", "data": 2, "ttl": -3}]),
        )
        .await;
    r.assert_error(400, "INVALID_INPUT");
    assert_eq!(r.body["index"], 1);
    assert_eq!(r.body["field"], "ttl");
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn a_batch_whose_atomic_flag_is_not_a_boolean_gets_400_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for path in [
        "/api/batch/object?atomic=maybe",
        "/api/batch/object?atomic=1",
    ] {
        let r = app
            .post(path, Some(&u.token), &json!([{"key": "x", "data": 1}]))
            .await;
        r.assert_error(400, "INVALID_INPUT");
        assert_eq!(r.body["field"], "atomic", "{path}: {}", r.text);
        assert_eq!(r.body["error"], "invalid atomic: must be `true` or `false`");
    }
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn a_batch_over_the_item_limit_gets_413_and_writes_nothing() {
    let app = TestApp::spawn_with(|c| c.max_batch_items = 3).await;
    let u = app.writer().await;
    let items: Vec<_> = (0..4)
        .map(|i| json!({"key": format!("k{i}"), "data": i}))
        .collect();
    for path in ["/api/batch/object", "/api/batch/object?atomic=true"] {
        app.post(path, Some(&u.token), &json!(items))
            .await
            .assert_error(413, "PAYLOAD_TOO_LARGE");
    }
    app.put("/api/batch/object", Some(&u.token), &json!(items))
        .await
        .assert_error(413, "PAYLOAD_TOO_LARGE");
    app.post(
        "/api/batch/delete",
        Some(&u.token),
        &json!(["a", "b", "c", "d"]),
    )
    .await
    .assert_error(413, "PAYLOAD_TOO_LARGE");
    assert_eq!(app.row_count().await, 0);
    let ok = app
        .post("/api/batch/object", Some(&u.token), &json!(items[..3]))
        .await;
    assert_eq!(ok.body["succeeded"], 3);
}

#[tokio::test]
async fn a_batch_put_creates_and_replaces() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "old", json!(1), None).await;
    let r = app
        .put(
            "/api/batch/object",
            Some(&u.token),
            &json!([{"key": "old", "data": 2}, {"key": "new", "data": 3, "ttl": 10}]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["results"][0]["status"], 200);
    assert_eq!(r.body["results"][0]["version"], 2);
    assert_eq!(r.body["results"][1]["status"], 201);
    assert_eq!(r.body["results"][1]["version"], 1);
    assert_eq!(app.read(&u, "old").await.body["data"], 2);
    assert_eq!(app.read(&u, "new").await.body["ttl"], 10);
}

#[tokio::test]
async fn a_batch_delete_reports_missing_keys_and_deletes_the_rest() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for k in ["a", "b"] {
        app.create(&u, k, json!(1), None).await;
    }
    let r = app
        .post(
            "/api/batch/delete",
            Some(&u.token),
            &json!(["a", "missing", "b", ""]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let codes: Vec<_> = r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["ok"].as_bool().unwrap(),
                i["code"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            (true, None),
            (false, Some("NOT_FOUND".into())),
            (true, None),
            (false, Some("INVALID_INPUT".into())),
        ]
    );
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn an_atomic_batch_delete_with_a_missing_key_deletes_nothing() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "a", json!(1), None).await;
    let before = app.snapshot().await;
    let r = app
        .post(
            "/api/batch/delete?atomic=true",
            Some(&u.token),
            &json!(["a", "missing"]),
        )
        .await;
    r.assert_error(404, "NOT_FOUND");
    assert_eq!(r.body["index"], 1);
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn a_large_batch_keeps_per_item_results_across_statement_boundaries() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for k in [100, 300, 599] {
        app.create(&u, &format!("k{k:03}"), json!("old"), None)
            .await;
    }
    let items: Vec<_> = (0..600)
        .map(|i| json!({"key": format!("k{i:03}"), "data": i}))
        .collect();
    let r = app
        .post("/api/batch/object", Some(&u.token), &json!(items))
        .await;
    assert_eq!(
        r.body["succeeded"],
        597,
        "{}",
        &r.text[..200.min(r.text.len())]
    );
    let results = r.body["results"].as_array().unwrap();
    for (i, item) in results.iter().enumerate() {
        let conflict = [100, 300, 599].contains(&i);
        assert_eq!(item["index"], i);
        assert_eq!(item["ok"], !conflict, "item {i}: {item}");
        if conflict {
            assert_eq!(item["code"], "ALREADY_EXISTS");
        }
    }
    assert_eq!(app.read(&u, "k300").await.body["data"], "old");
    assert_eq!(app.read(&u, "k301").await.body["data"], 301);

    let put = app
        .put("/api/batch/object", Some(&u.token), &json!(items))
        .await;
    assert_eq!(put.body["succeeded"], 600);
    for (i, item) in put.body["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(item["status"], 200, "item {i}: {item}");
        assert_eq!(item["version"], 2, "item {i}: {item}");
    }
    assert_eq!(app.read(&u, "k599").await.body["data"], 599);
    assert_eq!(app.row_count().await, 600);
}

#[tokio::test]
async fn a_batch_create_answers_201_with_the_original_message_when_every_item_is_created() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let r = app
        .post(
            "/api/batch/object",
            Some(&u.token),
            &json!([
                {"key": "key1", "data": {"info": "data1"}, "ttl": 3600},
                {"key": "key2", "data": {"info": "data2"}}
            ]),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["message"], "Batch create complete");
    assert_eq!(r.body["succeeded"], 2);
    assert_eq!(r.body["failed"], 0);
    assert_eq!(r.body["results"][1]["status"], 201);
    assert_eq!(app.read(&u, "key2").await.body["data"]["info"], "data2");

    let empty = app
        .post("/api/batch/object", Some(&u.token), &json!([]))
        .await;
    assert_eq!(empty.status, 201, "{}", empty.text);
    assert_eq!(empty.body["message"], "Batch create complete");
    assert_eq!(empty.body["results"], json!([]));
}

#[tokio::test]
async fn a_batch_create_with_an_existing_key_answers_200_and_keeps_the_existing_value() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "taken", json!("original"), None).await;
    let r = app
        .post(
            "/api/batch/object",
            Some(&u.token),
            &json!([{"key": "taken", "data": "overwrite?"}, {"key": "new", "data": 1}]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["message"], "Batch create complete");
    assert_eq!(r.body["succeeded"], 1);
    assert_eq!(r.body["results"][0]["code"], "ALREADY_EXISTS");
    assert_eq!(app.read(&u, "taken").await.body["data"], "original");
    assert_eq!(app.read(&u, "taken").await.body["version"], 1);
}

#[tokio::test]
async fn a_failed_batch_create_has_no_message_and_changes_nothing() {
    let app = TestApp::spawn_with(|c| c.max_batch_items = 2).await;
    let u = app.writer().await;
    app.create(&u, "taken", json!("original"), None).await;
    let before = app.snapshot().await;

    let atomic = app
        .post(
            "/api/batch/object?atomic=true",
            Some(&u.token),
            &json!([{"key": "new", "data": 1}, {"key": "taken", "data": 2}]),
        )
        .await;
    atomic.assert_error(409, "ALREADY_EXISTS");
    assert_eq!(atomic.body.get("message"), None, "{}", atomic.text);

    let too_many = app
        .post(
            "/api/batch/object",
            Some(&u.token),
            &json!([{"key": "a", "data": 1}, {"key": "b", "data": 1}, {"key": "c", "data": 1}]),
        )
        .await;
    too_many.assert_error(413, "PAYLOAD_TOO_LARGE");
    assert_eq!(too_many.body.get("message"), None);

    let anonymous = app
        .post("/api/batch/object", None, &json!([{"key": "a", "data": 1}]))
        .await;
    anonymous.assert_error(401, "UNAUTHENTICATED");

    assert_eq!(app.snapshot().await, before);
}
