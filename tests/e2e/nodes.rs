//! Several nodes on one PostgreSQL database act as one server; on SQLite a
//! second server on the same file is refused.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::json;

use crate::support::{TestApp, object_path};

#[tokio::test]
#[cfg_attr(
    kvql_test_postgres,
    ignore = "SQLite only: on PostgreSQL several nodes share one database"
)]
async fn a_second_server_on_the_same_sqlite_file_is_refused() {
    let app = TestApp::spawn().await;
    assert!(!app.node.state.db().is_postgres());
    let err = api::app::App::build(app.config.clone(), app.clock.clone())
        .await
        .err()
        .expect("a second server must be refused");
    assert!(
        format!("{err:#}").contains("another kvql server is already serving"),
        "{err:#}"
    );
    // The first one keeps serving.
    assert_eq!(app.get("/healthz", None).await.status, 200);
}

#[tokio::test]
#[cfg_attr(
    not(kvql_test_postgres),
    ignore = "several nodes need PostgreSQL: set KVQL_TEST_DATABASE_URL"
)]
async fn two_nodes_share_tokens_and_data() {
    let app = TestApp::spawn().await;
    assert!(app.node.state.db().is_postgres());
    let b = app.second_node().await;
    let u = app.writer().await;

    // A token issued by node A works on node B.
    let on_b = |path: &str| format!("{}{}", b.base, path);
    let r = app
        .send(
            app.client
                .post(on_b("/api/object"))
                .bearer_auth(&u.token)
                .json(&json!({"key": "shared", "data": "written on B"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);

    // A write through B is read through A.
    assert_eq!(app.read(&u, "shared").await.body["data"], "written on B");

    // A token issued by B works on A.
    let login = app
        .send(
            app.client
                .post(on_b("/login"))
                .json(&json!({"username": u.username, "password": crate::support::PASSWORD})),
        )
        .await;
    let token_b = login.body["access_token"].as_str().unwrap().to_owned();
    let r = app.get(&object_path("shared"), Some(&token_b)).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(kvql_test_postgres),
    ignore = "several nodes need PostgreSQL: set KVQL_TEST_DATABASE_URL"
)]
async fn concurrent_creates_across_two_nodes_give_exactly_one_winner() {
    let app = TestApp::spawn().await;
    assert!(app.node.state.db().is_postgres());
    let b = app.second_node().await;
    let u = app.writer().await;
    let bases = [app.node.base.clone(), b.base.clone()];
    let attempts = (0..32).map(|i| {
        let url = format!("{}/api/object", bases[i % 2]);
        app.send(
            app.client
                .post(url)
                .bearer_auth(&u.token)
                .json(&json!({"key": "race", "data": i})),
        )
    });
    let results = join_all(attempts).await;
    assert_eq!(results.iter().filter(|r| r.status == 201).count(), 1);
    assert_eq!(results.iter().filter(|r| r.status == 409).count(), 31);
}

#[tokio::test]
#[cfg_attr(
    not(kvql_test_postgres),
    ignore = "several nodes need PostgreSQL: set KVQL_TEST_DATABASE_URL"
)]
async fn nodes_started_on_one_database_sign_with_keys_both_accept() {
    let app = TestApp::spawn().await;
    assert!(app.node.state.db().is_postgres());
    let b = app.second_node().await;
    let c = app.second_node().await;
    let u = app.writer().await;
    for node in [&b, &c] {
        let r = app
            .send(
                app.client
                    .get(format!("{}/api/objects", node.base))
                    .bearer_auth(&u.token),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
}

#[tokio::test]
#[cfg_attr(
    not(kvql_test_postgres),
    ignore = "several nodes need PostgreSQL: set KVQL_TEST_DATABASE_URL"
)]
async fn a_key_rotation_reaches_every_node_and_revoking_old_keys_applies_everywhere() {
    let app = TestApp::spawn().await;
    assert!(app.node.state.db().is_postgres());
    let b = app.second_node().await;
    let u = app.writer().await;
    let kid = |t: &str| jsonwebtoken::decode_header(t).unwrap().kid.unwrap();
    let get_on = |base: &str, token: &str| {
        app.send(
            app.client
                .get(format!("{base}/api/objects"))
                .bearer_auth(token),
        )
    };
    let login_on = |base: &str| {
        app.send(
            app.client
                .post(format!("{base}/login"))
                .json(&json!({"username": u.username, "password": crate::support::PASSWORD})),
        )
    };
    let old = u.token.clone();
    // Both nodes have verified (and cached) the old token.
    assert_eq!(get_on(&b.base, &old).await.status, 200);

    // A rotation made elsewhere (here: as `kvql key rotate` does).
    let second =
        api::auth::rotate_signing_key(app.node.state.db(), &app.clock, app.config.token_ttl, false)
            .await
            .unwrap();
    app.clock.advance(Duration::from_secs(1));
    // Node B signs with the new key; node A accepts it, and both still accept the old token.
    let on_b = login_on(&b.base).await;
    assert_eq!(on_b.status, 200, "{}", on_b.text);
    let from_b = on_b.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(kid(&from_b), second);
    let on_a = login_on(&app.node.base).await;
    assert_eq!(kid(on_a.body["access_token"].as_str().unwrap()), second);
    for base in [&app.node.base, &b.base] {
        for token in [&old, &from_b] {
            let r = get_on(base, token).await;
            assert_eq!(r.status, 200, "{base}: {}", r.text);
        }
    }

    // Revoking: every token of an older key is refused on every node.
    let third =
        api::auth::rotate_signing_key(app.node.state.db(), &app.clock, app.config.token_ttl, true)
            .await
            .unwrap();
    app.clock.advance(Duration::from_secs(1));
    for base in [&app.node.base, &b.base] {
        for token in [&old, &from_b] {
            get_on(base, token)
                .await
                .assert_error(401, "UNAUTHENTICATED");
        }
    }
    let on_a = login_on(&app.node.base).await;
    let from_a = on_a.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(kid(&from_a), third);
    assert_eq!(get_on(&b.base, &from_a).await.status, 200);
}

/// Each node commits groups of concurrent writes; two nodes writing the same
/// keys at once can make PostgreSQL abort one group to break a deadlock.
/// The group is then run again write by write: nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(kvql_test_postgres),
    ignore = "several nodes need PostgreSQL: set KVQL_TEST_DATABASE_URL"
)]
async fn two_nodes_writing_the_same_keys_in_opposite_orders_lose_nothing() {
    let app = TestApp::spawn().await;
    let b = app.second_node().await;
    let u = app.writer().await;
    const KEYS: usize = 24;
    const ROUNDS: usize = 3;
    let keys: Vec<String> = (0..KEYS).map(|i| format!("hot-{i:02}")).collect();
    let writer = |base: String, reverse: bool| {
        let (app, u, keys) = (&app, &u, &keys);
        async move {
            for _ in 0..ROUNDS {
                let order: Vec<&String> = if reverse {
                    keys.iter().rev().collect()
                } else {
                    keys.iter().collect()
                };
                // Every key of the round at once: the node groups them.
                let puts = order.into_iter().map(|k| {
                    app.send(
                        app.client
                            .put(format!("{base}{}", object_path(k)))
                            .bearer_auth(&u.token)
                            .json(&json!({"data": base})),
                    )
                });
                for r in join_all(puts).await {
                    assert!(r.status == 200 || r.status == 201, "{}", r.text);
                }
            }
        }
    };
    futures_util::join!(
        writer(app.node.base.clone(), false),
        writer(b.base.clone(), true)
    );
    for key in &keys {
        let r = app.read(&u, key).await;
        assert_eq!(r.body["version"], 2 * ROUNDS, "{key}: {}", r.text);
    }
}

/// sqlx percent-decodes the path of a SQLite URL; the readers' own
/// connections open the file SQLite itself reports, so they read the same
/// database whatever the URL's spelling.
#[tokio::test]
#[cfg_attr(
    kvql_test_postgres,
    ignore = "SQLite only: the file of a percent-encoded sqlite:// URL"
)]
async fn a_sqlite_url_with_percent_escapes_serves_reads_that_miss_the_cache() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("kv%20ql%25.db").display()
    );
    let app = TestApp::spawn_with(|c| {
        c.database.database_url = url;
        c.cache_bytes = 0;
    })
    .await;
    assert!(
        dir.path().join("kv ql%.db").exists(),
        "sqlx decodes the path"
    );
    let u = app.writer().await;
    let created = app.create(&u, "k", json!({"a": 1}), None).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let read = app.read(&u, "k").await;
    assert_eq!(read.status, 200, "{}", read.text);
    assert_eq!(read.body["data"], json!({"a": 1}));
    app.read(&u, "missing").await.assert_error(404, "NOT_FOUND");
}
