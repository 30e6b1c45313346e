//! One tenant can never see, guess or change another's data.

use api::auth::Role;
use serde_json::json;

use crate::support::{TestApp, object_path};

#[tokio::test]
async fn another_tenants_key_answers_exactly_like_a_missing_key() {
    let app = TestApp::spawn().await;
    let alice = app.user("alpha", Role::Writer).await;
    let bob = app.user("beta", Role::Writer).await;
    app.create(&alice, "secret", json!({"pin": 1234}), None)
        .await;
    let before = app.snapshot().await;

    let same = |a: &crate::support::Resp, b: &crate::support::Resp| {
        assert_eq!(a.status, b.status);
        assert_eq!(a.text, b.text);
    };
    let t = Some(bob.token.as_str());

    let get_other = app.read(&bob, "secret").await;
    let get_missing = app.read(&bob, "no-such-key").await;
    get_other.assert_error(404, "NOT_FOUND");
    same(&get_other, &get_missing);

    let put_if = |key: &str| {
        app.request(reqwest::Method::PUT, &object_path(key), t)
            .header("If-Match", "\"1\"")
            .json(&json!({"data": "stolen"}))
    };
    let put_other = app.send(put_if("secret")).await;
    let put_missing = app.send(put_if("no-such-key")).await;
    put_other.assert_error(404, "NOT_FOUND");
    same(&put_other, &put_missing);

    let del_other = app.delete(&object_path("secret"), t).await;
    let del_missing = app.delete(&object_path("no-such-key"), t).await;
    del_other.assert_error(404, "NOT_FOUND");
    same(&del_other, &del_missing);

    let batch = app.post("/api/batch/delete", t, &json!(["secret"])).await;
    assert_eq!(batch.body["results"][0]["code"], "NOT_FOUND");

    let list = app.get("/api/objects", t).await;
    assert_eq!(list.body["items"], json!([]));

    assert_eq!(app.snapshot().await, before);
    assert_eq!(
        app.read(&alice, "secret").await.body["data"],
        json!({"pin": 1234})
    );
}

#[tokio::test]
async fn the_same_key_in_two_tenants_holds_two_values() {
    let app = TestApp::spawn().await;
    let alice = app.user("alpha", Role::Writer).await;
    let bob = app.user("beta", Role::Writer).await;
    assert_eq!(
        app.create(&alice, "shared-name", json!("a"), None)
            .await
            .status,
        201
    );
    assert_eq!(
        app.create(&bob, "shared-name", json!("b"), None)
            .await
            .status,
        201
    );
    app.put(
        &object_path("shared-name"),
        Some(&bob.token),
        &json!({"data": "b2"}),
    )
    .await;
    assert_eq!(app.read(&alice, "shared-name").await.body["data"], "a");
    assert_eq!(app.read(&alice, "shared-name").await.body["version"], 1);
    assert_eq!(app.read(&bob, "shared-name").await.body["data"], "b2");
    assert_eq!(
        app.delete(&object_path("shared-name"), Some(&alice.token))
            .await
            .status,
        200
    );
    assert_eq!(app.read(&bob, "shared-name").await.body["data"], "b2");
}

#[tokio::test]
async fn users_of_one_tenant_share_its_data() {
    let app = TestApp::spawn().await;
    let a = app.user("team", Role::Writer).await;
    let b = app.user("team", Role::Reader).await;
    app.create(&a, "k", json!(1), None).await;
    assert_eq!(app.read(&b, "k").await.body["data"], 1);
}

/// Concurrent point reads that miss the cache are read in place (SQLite) or
/// coalesced into shared statements (read coalescing: PostgreSQL, or SQLite
/// with `in_place` off); each must still get its own tenant's value, or 404.
async fn concurrent_reads_by_two_tenants(in_place: bool) {
    let app = TestApp::spawn_with(|c| {
        c.cache_bytes = 0;
        c.database.sqlite_reads_in_place = in_place;
    })
    .await;
    let alice = app.user("alpha", Role::Writer).await;
    let bob = app.user("beta", Role::Writer).await;
    let keys: Vec<String> = (0..32).map(|i| format!("k{i:02}")).collect();
    for (i, key) in keys.iter().enumerate() {
        app.create(&alice, key, json!({"owner": "alice", "i": i}), None)
            .await;
        if i % 2 == 0 {
            app.create(&bob, key, json!({"owner": "bob", "i": i}), None)
                .await;
        }
    }
    let app = &app;
    for _ in 0..4 {
        let reads = keys
            .iter()
            .flat_map(|k| [(&alice, k), (&bob, k)])
            .map(|(user, key)| async move { (user, key, app.read(user, key).await) });
        for (user, key, r) in futures_util::future::join_all(reads).await {
            let i: usize = key[1..].parse().expect("index");
            if std::ptr::eq(user, &bob) && i % 2 == 1 {
                r.assert_error(404, "NOT_FOUND");
            } else {
                let owner = if std::ptr::eq(user, &alice) {
                    "alice"
                } else {
                    "bob"
                };
                assert_eq!(r.status, 200, "{}", r.text);
                assert_eq!(r.body["data"], json!({"owner": owner, "i": i}));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reads_of_the_same_keys_by_two_tenants_each_get_their_own() {
    concurrent_reads_by_two_tenants(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coalesced_reads_of_the_same_keys_by_two_tenants_each_get_their_own() {
    concurrent_reads_by_two_tenants(false).await;
}
