//! `GET /api/objects`: prefixes, order, pages.

use serde_json::json;

use crate::support::{TestApp, User};

async fn list(app: &TestApp, u: &User, query: &str) -> crate::support::Resp {
    app.get(&format!("/api/objects{query}"), Some(&u.token))
        .await
}

fn keys(r: &crate::support::Resp) -> Vec<String> {
    r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn listing_pages_through_a_prefix_in_key_order() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let mut items: Vec<_> = (0..25)
        .map(|i| json!({"key": format!("user/{i:02}"), "data": i}))
        .collect();
    items.push(json!({"key": "user", "data": "not under user/"}));
    items.push(json!({"key": "user0", "data": "after the prefix"}));
    items.push(json!({"key": "usea", "data": "before the prefix"}));
    let r = app
        .post("/api/batch/object", Some(&u.token), &json!(items))
        .await;
    assert_eq!(r.body["succeeded"], 28);

    let mut seen = Vec::new();
    let mut query = "?prefix=user%2F&limit=10".to_owned();
    let mut pages = 0;
    loop {
        let page = list(&app, &u, &query).await;
        assert_eq!(page.status, 200, "{}", page.text);
        pages += 1;
        seen.extend(keys(&page));
        match page.body["next_cursor"].as_str() {
            Some(c) => query = format!("?prefix=user%2F&limit=10&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..25).map(|i| format!("user/{i:02}")).collect();
    assert_eq!(seen, expected);
    let first = list(&app, &u, "?prefix=user%2F&limit=1").await;
    assert_eq!(first.body["items"][0]["data"], 0);
    assert_eq!(first.body["items"][0]["version"], 1);
}

#[tokio::test]
async fn a_page_of_large_values_is_cut_at_4_mib_and_its_cursor_goes_on_from_there() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    // Ten values of 600 KB: a page of all ten would hold 6 MB.
    let big = "x".repeat(600_000);
    for i in 0..10 {
        let r = app
            .put(
                &crate::support::object_path(&format!("big/{i}")),
                Some(&u.token),
                &json!({"data": big}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let mut pages = Vec::new();
    let mut query = "?prefix=big%2F&limit=1000".to_owned();
    loop {
        let page = list(&app, &u, &query).await;
        assert_eq!(page.status, 200, "{}", page.text);
        pages.push(keys(&page));
        assert!(
            page.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|o| o["data"] == big),
            "every value is whole"
        );
        match page.body["next_cursor"].as_str() {
            Some(c) => query = format!("?prefix=big%2F&limit=1000&cursor={c}"),
            None => break,
        }
    }
    // Objects start within the first 4 MiB: seven of 600,006 bytes.
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![7, 3]);
    let expected: Vec<String> = (0..10).map(|i| format!("big/{i}")).collect();
    assert_eq!(pages.concat(), expected);
    // A page cut by its limit keeps its cursor as before.
    let one = list(&app, &u, "?prefix=big%2F&limit=1").await;
    assert_eq!(keys(&one), vec!["big/0"]);
    assert!(one.body["next_cursor"].is_string());
}

#[tokio::test]
async fn listing_without_a_prefix_returns_everything_with_a_default_page_of_100() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let items: Vec<_> = (0..120)
        .map(|i| json!({"key": format!("k{i:03}"), "data": i}))
        .collect();
    app.post("/api/batch/object", Some(&u.token), &json!(items))
        .await;
    let page = list(&app, &u, "").await;
    assert_eq!(keys(&page).len(), 100);
    let next = page.body["next_cursor"].as_str().unwrap();
    let rest = list(&app, &u, &format!("?cursor={next}")).await;
    assert_eq!(keys(&rest).len(), 20);
    assert_eq!(rest.body["next_cursor"], json!(null));
}

#[tokio::test]
async fn an_exactly_full_last_page_has_no_next_cursor() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let items: Vec<_> = (0..4)
        .map(|i| json!({"key": format!("k{i}"), "data": i}))
        .collect();
    app.post("/api/batch/object", Some(&u.token), &json!(items))
        .await;
    let page = list(&app, &u, "?limit=4").await;
    assert_eq!(keys(&page).len(), 4);
    assert_eq!(page.body["next_cursor"], json!(null));
}

#[tokio::test]
async fn unicode_prefixes_select_exactly_their_keys() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let all = ["é", "é/1", "éz", "ê", "e", "f", "\u{ff}x", "\u{100}"];
    let items: Vec<_> = all.iter().map(|k| json!({"key": k, "data": 1})).collect();
    app.post("/api/batch/object", Some(&u.token), &json!(items))
        .await;
    let r = list(&app, &u, "?prefix=%C3%A9").await;
    assert_eq!(keys(&r), ["é", "é/1", "éz"]);
    let r = list(&app, &u, "?prefix=%C3%BF").await;
    assert_eq!(keys(&r), ["\u{ff}x"]);
}

#[tokio::test]
async fn bad_limits_and_cursors_are_refused_with_400() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for (query, field) in [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=ten", "limit"),
        ("?limit=99999999999999999999", "limit"),
        ("?cursor=%21%21", "cursor"),
    ] {
        let r = list(&app, &u, query).await;
        r.assert_error(400, "INVALID_INPUT");
        assert_eq!(r.body["field"], field, "{query}: {}", r.text);
    }
    let r = list(&app, &u, "?limit=ten").await;
    assert_eq!(
        r.body["error"], "invalid limit: must be an integer (invalid digit found in string)",
        "a parameter that is not a number is named, in the client's terms"
    );
    assert_eq!(list(&app, &u, "?limit=1000").await.status, 200);
}
