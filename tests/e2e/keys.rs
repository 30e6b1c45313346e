//! Keys are any 1 to 512 bytes of UTF-8 without control characters.

use serde_json::json;

use crate::support::{TestApp, encode_segment, object_path};

#[tokio::test]
async fn keys_with_slashes_spaces_percent_and_unicode_round_trip() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let keys = [
        "a/b",
        "/leading/slash",
        "trailing/",
        "with space",
        "100%",
        "%2F-literal",
        "what?&x=y#frag",
        "ключ",
        "日本語/キー",
        "emoji 🔑",
        "+plus+",
    ];
    for (i, key) in keys.iter().enumerate() {
        let r = app.create(&u, key, json!(i), None).await;
        assert_eq!(r.status, 201, "create {key:?}: {}", r.text);
        assert_eq!(r.body["key"], *key);
        let read = app.read(&u, key).await;
        assert_eq!(read.status, 200, "read {key:?}: {}", read.text);
        assert_eq!(read.body["key"], *key);
        assert_eq!(read.body["data"], i);
    }
    let list = app.get("/api/objects", Some(&u.token)).await;
    let mut listed: Vec<String> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap().to_owned())
        .collect();
    let mut expected: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    expected.sort();
    assert_eq!(listed, expected, "listed in byte order");
    listed.sort();
    for key in keys {
        assert_eq!(
            app.delete(&object_path(key), Some(&u.token)).await.status,
            200
        );
    }
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn an_encoded_slash_in_the_path_is_part_of_the_key() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "a/b", json!("slash"), None).await;
    let r = app.get("/api/object/a%2Fb", Some(&u.token)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["key"], "a/b");
    let put = app
        .put("/api/object/c%2Fd", Some(&u.token), &json!({"data": 1}))
        .await;
    assert_eq!(put.body["key"], "c/d");
}

#[tokio::test]
async fn a_path_key_that_does_not_decode_to_utf8_gets_400_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let before = app.snapshot().await;
    for r in [
        app.get("/api/object/%FF", Some(&u.token)).await,
        app.put("/api/object/a%FFb", Some(&u.token), &json!({"data": 1}))
            .await,
        app.delete("/api/object/%C3", Some(&u.token)).await,
    ] {
        r.assert_error(400, "INVALID_INPUT");
        assert_eq!(
            r.body["error"],
            "invalid path: a segment is not percent-encoded UTF-8"
        );
    }
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn keys_of_512_bytes_are_accepted_and_513_refused() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let max = "é".repeat(256);
    assert_eq!(max.len(), 512);
    assert_eq!(app.create(&u, &max, json!(1), None).await.status, 201);
    assert_eq!(app.read(&u, &max).await.status, 200);
    let before = app.snapshot().await;

    let over = format!("{max}x");
    let r = app.create(&u, &over, json!(1), None).await;
    r.assert_error(400, "INVALID_INPUT");
    assert_eq!(r.body["field"], "key");
    app.put(&object_path(&over), Some(&u.token), &json!({"data": 1}))
        .await
        .assert_error(400, "INVALID_INPUT");
    app.read(&u, &over).await.assert_error(400, "INVALID_INPUT");
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn empty_keys_and_control_characters_are_refused() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for key in [
        "",
        "line\nbreak",
        "tab\there",
        "nul\u{0}",
        "bell\u{7}",
        "c1\u{85}",
    ] {
        let r = app.create(&u, key, json!(1), None).await;
        r.assert_error(400, "INVALID_INPUT");
        assert_eq!(r.body["field"], "key", "{}", r.text);
    }
    let r = app
        .put(
            &format!("/api/object/{}", encode_segment("a\nb")),
            Some(&u.token),
            &json!({"data": 1}),
        )
        .await;
    r.assert_error(400, "INVALID_INPUT");
    assert_eq!(app.row_count().await, 0);
}
