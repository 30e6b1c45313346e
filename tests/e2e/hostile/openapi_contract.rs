//! The OpenAPI document is the truth: what it declares (statuses, nullable
//! fields, ranges, methods) is what the server does. Each test reads the
//! served `/openapi.json` and checks the server against it.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::support::{Resp, TestApp, object_path};

async fn document(app: &TestApp) -> Value {
    let r = app.get("/openapi.json", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    &doc["components"]["schemas"][name]
}

fn declared_statuses(doc: &Value, path: &str, method: &str) -> BTreeSet<String> {
    doc["paths"][path][method]["responses"]
        .as_object()
        .unwrap_or_else(|| panic!("{method} {path} is documented"))
        .keys()
        .cloned()
        .collect()
}

/// Every documented operation as (path, lower-case method).
fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            ops.push((path.clone(), method.clone()));
        }
    }
    ops
}

/// A concrete request path for a documented path template.
fn concrete(path: &str) -> String {
    path.replace("{key}", "some-key")
}

#[track_caller]
fn assert_405(r: &Resp, allow: &str) {
    r.assert_error(405, "METHOD_NOT_ALLOWED");
    assert_eq!(r.header("allow"), Some(allow), "Allow of {}", r.text);
}

#[tokio::test]
async fn a_405_answer_lists_the_allowed_methods() {
    let app = TestApp::spawn().await;
    for (method, path, allow) in [
        ("TRACE", "/login", "POST"),
        ("DELETE", "/healthz", "GET, HEAD"),
        ("PATCH", "/api/object/a%2Fb", "GET, PUT, DELETE, HEAD"),
        ("GET", "/api/batch/object", "POST, PUT"),
        ("DELETE", "/graphql", "GET, HEAD, POST"),
        ("POST", "/graphql/ws", "GET, HEAD"),
        ("POST", "/favicon.svg", "GET, HEAD"),
        ("PUT", "/favicon.ico", "GET, HEAD"),
        ("POST", "/openapi.json", "GET, HEAD"),
        ("DELETE", "/docs", "GET, HEAD"),
        (
            "POST",
            "/docs/assets/swagger-ui-5.35.0/swagger-ui.css",
            "GET, HEAD",
        ),
        (
            "PUT",
            "/graphql/assets/graphiql-4.1.2/graphiql.min.js",
            "GET, HEAD",
        ),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = app.send(app.request(method, path, None)).await;
        assert_405(&r, allow);
    }
}

#[tokio::test]
async fn the_allow_header_of_every_documented_path_names_exactly_its_documented_methods() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let mut methods: BTreeSet<String> = item
            .as_object()
            .expect("path item")
            .keys()
            .map(|m| m.to_uppercase())
            .collect();
        if methods.contains("GET") {
            methods.insert("HEAD".into());
        }
        // A method the path does not take answers 405 with the Allow header.
        let other = ["PATCH", "PUT", "DELETE", "POST"]
            .into_iter()
            .find(|m| !methods.contains(*m))
            .unwrap_or_else(|| panic!("{path} takes every method tried"));
        let other = reqwest::Method::from_bytes(other.as_bytes()).unwrap();
        let r = app.send(app.request(other, &concrete(path), None)).await;
        r.assert_error(405, "METHOD_NOT_ALLOWED");
        let allowed: BTreeSet<String> = r
            .header("allow")
            .unwrap_or_else(|| panic!("{path}: 405 without Allow"))
            .split(", ")
            .map(str::to_owned)
            .collect();
        assert_eq!(allowed, methods, "{path}");
    }
}

#[tokio::test]
async fn null_fields_are_declared_nullable_in_the_openapi_document() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    for (name, field) in [
        ("ObjectView", "ttl"),
        ("ObjectView", "expires_at"),
        ("WriteResult", "ttl"),
        ("WriteResult", "expires_at"),
        ("ObjectPage", "next_cursor"),
        ("CreateObjectRequest", "ttl"),
        ("PutObjectRequest", "ttl"),
    ] {
        assert_eq!(
            schema(&doc, name)["properties"][field]["nullable"],
            true,
            "{name}.{field}"
        );
    }
    // And the server does send those nulls.
    let u = app.writer().await;
    let created = app.create(&u, "forever", json!(null), None).await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(created.body["ttl"], Value::Null);
    assert_eq!(created.body["expires_at"], Value::Null);
    let read = app.read(&u, "forever").await;
    assert_eq!(read.status, 200, "{}", read.text);
    assert_eq!(read.body["ttl"], Value::Null);
    assert_eq!(read.body["expires_at"], Value::Null);
    assert_eq!(read.body["data"], Value::Null);
    let page = app.get("/api/objects", Some(&u.token)).await;
    assert_eq!(page.status, 200, "{}", page.text);
    assert_eq!(page.body["next_cursor"], Value::Null);
}

#[tokio::test]
async fn the_documented_ttl_range_is_exactly_what_the_server_accepts() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    let ttl = &schema(&doc, "CreateObjectRequest")["properties"]["ttl"];
    assert_eq!(ttl["minimum"], 1.0);
    assert_eq!(ttl["maximum"], 315_360_000.0);
    let put_ttl = &schema(&doc, "PutObjectRequest")["properties"]["ttl"];
    assert_eq!(
        (&put_ttl["minimum"], &put_ttl["maximum"]),
        (&ttl["minimum"], &ttl["maximum"])
    );
    let u = app.writer().await;
    for (i, accepted) in [1, 315_360_000].into_iter().enumerate() {
        let r = app
            .create(&u, &format!("ok{i}"), json!(1), Some(accepted))
            .await;
        assert_eq!(r.status, 201, "ttl {accepted}: {}", r.text);
    }
    for refused in [0, -1, 315_360_001] {
        let r = app.create(&u, "refused", json!(1), Some(refused)).await;
        r.assert_error(400, "INVALID_INPUT");
        assert_eq!(r.body["field"], "ttl", "{}", r.text);
    }
}

#[tokio::test]
async fn the_documented_key_rules_are_what_the_server_accepts() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    let key = &schema(&doc, "CreateObjectRequest")["properties"]["key"];
    assert_eq!(key["minLength"], 1);
    assert_eq!(key["maxLength"], 512);
    assert_eq!(key["pattern"], "^[^\\u0000-\\u001F\\u007F-\\u009F]*$");
    let path_key = doc["paths"]["/api/object/{key}"]["get"]["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .find(|p| p["name"] == "key")
        .expect("key parameter")["schema"]
        .clone();
    assert_eq!(path_key["pattern"], key["pattern"]);
    assert_eq!(path_key["maxLength"], key["maxLength"]);

    let u = app.writer().await;
    let longest = "k".repeat(512);
    let r = app.create(&u, &longest, json!(1), None).await;
    assert_eq!(r.status, 201, "{}", r.text);
    for refused in [
        "".to_owned(),
        "k".repeat(513),
        "a\u{7f}b".into(),
        "a\u{85}b".into(),
    ] {
        let r = app.create(&u, &refused, json!(1), None).await;
        r.assert_error(400, "INVALID_INPUT");
        assert_eq!(r.body["field"], "key", "{}", r.text);
    }
    // Other non-ASCII characters are fine.
    let r = app.create(&u, "a\u{a0}b/ü", json!(1), None).await;
    assert_eq!(r.status, 201, "{}", r.text);
}

#[tokio::test]
async fn the_documented_limit_range_is_what_the_server_accepts() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    let limit = doc["paths"]["/api/objects"]["get"]["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .find(|p| p["name"] == "limit")
        .expect("limit parameter")["schema"]
        .clone();
    assert_eq!(limit["minimum"], 1.0);
    assert_eq!(limit["maximum"], 1000.0);
    let u = app.writer().await;
    for ok in [1, 1000] {
        let r = app
            .get(&format!("/api/objects?limit={ok}"), Some(&u.token))
            .await;
        assert_eq!(r.status, 200, "limit {ok}: {}", r.text);
    }
    for refused in ["0", "1001", "-9223372036854775808", "x"] {
        let r = app
            .get(&format!("/api/objects?limit={refused}"), Some(&u.token))
            .await;
        r.assert_error(400, "INVALID_INPUT");
    }
}

#[tokio::test]
async fn each_route_declares_exactly_the_error_statuses_it_can_give() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    let set = |statuses: &[&str]| {
        statuses
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    };
    for (path, method, statuses) in [
        (
            "/login",
            "post",
            set(&["200", "400", "401", "413", "415", "429", "500", "503"]),
        ),
        (
            "/api/object",
            "post",
            set(&[
                "201", "400", "401", "403", "409", "413", "415", "500", "503",
            ]),
        ),
        (
            "/api/object/{key}",
            "get",
            set(&["200", "304", "400", "401", "404", "500", "503"]),
        ),
        (
            "/api/object/{key}",
            "put",
            set(&[
                "200", "201", "400", "401", "403", "404", "409", "412", "413", "415", "500", "503",
            ]),
        ),
        (
            "/api/object/{key}",
            "delete",
            set(&["200", "400", "401", "403", "404", "412", "500", "503"]),
        ),
        (
            "/api/objects",
            "get",
            set(&["200", "400", "401", "500", "503"]),
        ),
        ("/healthz", "get", set(&["200"])),
        ("/readyz", "get", set(&["200", "503"])),
    ] {
        assert_eq!(
            declared_statuses(&doc, path, method),
            statuses,
            "{method} {path}"
        );
    }
    for (path, method) in operations(&doc) {
        let declared = declared_statuses(&doc, &path, &method);
        if path.starts_with("/api") {
            assert!(declared.contains("401"), "{method} {path} declares 401");
        }
        if path.starts_with("/api") && method != "get" {
            assert!(declared.contains("403"), "{method} {path} declares 403");
        }
        for error in declared
            .iter()
            .filter(|s| s.as_str() >= "400" && !(path == "/readyz" && s.as_str() == "503"))
        {
            let content = &doc["paths"][&path][&method]["responses"][error]["content"];
            let media = content.as_object().expect("error content");
            assert!(
                media.keys().all(|m| m.starts_with("application/json")),
                "{method} {path} {error} is JSON"
            );
        }
    }
    let has_header = |response: &Value, name: &str| {
        response["headers"]
            .as_object()
            .is_some_and(|h| h.keys().any(|k| k.eq_ignore_ascii_case(name)))
    };
    let login_429 = &doc["paths"]["/login"]["post"]["responses"]["429"];
    assert!(has_header(login_429, "Retry-After"), "{login_429}");
    let unauthorized = &doc["paths"]["/api/object"]["post"]["responses"]["401"];
    assert!(
        has_header(unauthorized, "WWW-Authenticate"),
        "{unauthorized}"
    );
}

#[tokio::test]
async fn every_route_under_api_answers_401_without_a_token() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    for (path, method) in operations(&doc) {
        if !path.starts_with("/api") {
            continue;
        }
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let r = app
            .send(
                app.request(method.clone(), &concrete(&path), None)
                    .json(&json!([])),
            )
            .await;
        r.assert_error(401, "UNAUTHENTICATED");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer"),
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn if_match_outside_its_documented_pattern_is_refused_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "k", json!(1), None).await;
    let before = app.snapshot().await;
    for tag in ["", "0", "01", "+1", "\"1", "W/\"1\"", "1000000000000000000"] {
        let r = app
            .send(
                app.request(reqwest::Method::PUT, &object_path("k"), Some(&u.token))
                    .header("If-Match", tag)
                    .json(&json!({"data": 2})),
            )
            .await;
        r.assert_error(400, "INVALID_INPUT");
        assert_eq!(r.body["field"], "If-Match", "{tag:?}: {}", r.text);
    }
    let r = app
        .send(
            app.request(reqwest::Method::PUT, &object_path("k"), Some(&u.token))
                .header("If-None-Match", "\"1\"")
                .json(&json!({"data": 2})),
        )
        .await;
    r.assert_error(400, "INVALID_INPUT");
    assert_eq!(r.body["field"], "If-None-Match");
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn if_match_with_if_none_match_never_writes_and_answers_the_first_failed_condition() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "k", json!(1), None).await;
    let before = app.snapshot().await;
    for (key, if_match, status, code) in [
        ("absent", "\"1\"", 404, "NOT_FOUND"),
        ("absent", "*", 404, "NOT_FOUND"),
        ("k", "\"7\"", 412, "VERSION_MISMATCH"),
        ("k", "\"1\"", 409, "ALREADY_EXISTS"),
        ("k", "*", 409, "ALREADY_EXISTS"),
    ] {
        let r = app
            .send(
                app.request(reqwest::Method::PUT, &object_path(key), Some(&u.token))
                    .header("If-Match", if_match)
                    .header("If-None-Match", "*")
                    .json(&json!({"data": 2})),
            )
            .await;
        r.assert_error(status, code);
    }
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn a_cursor_of_the_documented_shape_that_names_no_key_is_refused_with_400() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    // "AA" is base64url for a NUL, "_w" for a byte that is not UTF-8: well
    // shaped, never issued. PostgreSQL cannot compare against a NUL at all.
    for cursor in ["AA", "_w", "not base64!"] {
        let r = app
            .get(&format!("/api/objects?cursor={cursor}"), Some(&u.token))
            .await;
        r.assert_error(400, "INVALID_INPUT");
        assert_eq!(r.body["field"], "cursor", "{}", r.text);
    }
}
