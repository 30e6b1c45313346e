//! The OpenAPI document is served, and the checked-in copy matches the code.

use crate::support::TestApp;

#[tokio::test]
async fn the_served_openapi_document_matches_the_checked_in_openapi_json() {
    let app = TestApp::spawn().await;
    let served = app.get("/openapi.json", None).await;
    assert_eq!(served.status, 200);
    let checked_in: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"))
            .expect("openapi.json at the repository root"),
    )
    .expect("openapi.json is JSON");
    assert!(
        served.body == checked_in,
        "openapi.json is out of date with the code; regenerate it with:\n    cargo run -- openapi > openapi.json"
    );
    for path in [
        "/login",
        "/api/object",
        "/api/object/{key}",
        "/api/objects",
        "/api/batch/object",
        "/api/batch/delete",
    ] {
        assert!(served.body["paths"][path].is_object(), "{path} documented");
    }
}

#[tokio::test]
async fn swagger_ui_is_served_at_docs() {
    let app = TestApp::spawn().await;
    let r = app.get("/docs", None).await;
    assert_eq!(r.status, 200);
    assert!(r.text.to_lowercase().contains("swagger"));
}
