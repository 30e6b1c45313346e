//! Several nodes on one PostgreSQL database act as one server; on SQLite a
//! second server on the same file is refused.

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
