//! The README's curl walkthrough, step by step.

use serde_json::json;

use crate::support::{ADMIN_PASSWORD, TestApp};

#[tokio::test]
async fn the_readme_walkthrough_works_for_the_bootstrap_admin() {
    let app = TestApp::spawn().await;

    let login = app
        .post(
            "/login",
            None,
            &json!({"username": "admin", "password": ADMIN_PASSWORD}),
        )
        .await;
    assert_eq!(login.status, 200, "{}", login.text);
    assert_eq!(login.body["token_type"], "Bearer");
    assert_eq!(login.body["expires_in"], 3600);
    let token = login.body["access_token"].as_str().unwrap().to_owned();

    let created = app
        .post(
            "/api/object",
            Some(&token),
            &json!({"key": "exampleKey", "data": {"info": "exampleData"}, "ttl": 3600}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(created.body["message"], "Key-Value pair created");

    let read = app.get("/api/object/exampleKey", Some(&token)).await;
    assert_eq!(read.status, 200, "{}", read.text);
    assert_eq!(read.body["key"], "exampleKey");
    assert_eq!(read.body["data"], json!({"info": "exampleData"}));
    assert_eq!(read.body["version"], 1);
    assert_eq!(read.body["ttl"], 3600);
    assert_eq!(read.header("etag"), Some("\"1\""));
    for field in ["expires_at", "created_at", "updated_at"] {
        assert!(
            read.body[field].is_string(),
            "{field} missing: {}",
            read.text
        );
    }

    let deleted = app.delete("/api/object/exampleKey", Some(&token)).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_eq!(deleted.body["message"], "Key-Value pair deleted");
    assert_eq!(
        app.get("/api/object/exampleKey", Some(&token)).await.status,
        404
    );

    let batch = app
        .post(
            "/api/batch/object",
            Some(&token),
            &json!([
                {"key": "key1", "data": {"info": "data1"}, "ttl": 3600},
                {"key": "key2", "data": {"info": "data2"}}
            ]),
        )
        .await;
    assert_eq!(batch.status, 201, "{}", batch.text);
    assert_eq!(batch.body["message"], "Batch create complete");
    assert_eq!(batch.body["succeeded"], 2);
    assert_eq!(batch.body["failed"], 0);
    let read2 = app.get("/api/object/key2", Some(&token)).await;
    assert_eq!(read2.body["data"], json!({"info": "data2"}));
    assert_eq!(read2.body["ttl"], json!(null));
}

#[tokio::test]
async fn health_and_readiness_probes_answer() {
    let app = TestApp::spawn().await;
    let h = app.get("/healthz", None).await;
    assert_eq!((h.status, &h.body["status"]), (200, &json!("ok")));
    let r = app.get("/readyz", None).await;
    assert_eq!((r.status, &r.body["status"]), (200, &json!("ready")));
}
