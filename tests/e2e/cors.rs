//! Browser apps on other origins (CORS): preflights on every door, the
//! headers on every answer (errors included), a restricted list, and off.

use std::process::Command;

use api::cors::CorsOrigins;
use reqwest::Method;
use serde_json::json;

use crate::support::{ADMIN_PASSWORD, Resp, TestApp, object_path};

const APP_ORIGIN: &str = "https://app.example.com";
const OTHER_ORIGIN: &str = "https://evil.example.net";

/// Every door a browser app may call, with a method it would use there.
const DOORS: &[(&str, &str)] = &[
    ("/login", "POST"),
    ("/graphql", "POST"),
    ("/graphql/ws", "GET"),
    ("/api/object", "POST"),
    ("/api/object/a%2Fb", "PUT"),
    ("/api/object/a%2Fb", "DELETE"),
    ("/api/objects", "GET"),
    ("/api/batch/object", "POST"),
    ("/api/batch/delete", "POST"),
    ("/openapi.json", "GET"),
    ("/healthz", "GET"),
    ("/readyz", "GET"),
];

async fn preflight(app: &TestApp, path: &str, origin: &str, method: &str) -> Resp {
    app.send(
        app.client
            .request(Method::OPTIONS, app.url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header(
                "access-control-request-headers",
                "authorization, content-type, if-match, apollo-require-preflight",
            ),
    )
    .await
}

/// Sends `req` from the browser origin `origin`.
async fn from(app: &TestApp, origin: &str, req: reqwest::RequestBuilder) -> Resp {
    app.send(req.header("origin", origin)).await
}

#[track_caller]
fn assert_no_credentials(r: &Resp) {
    assert_eq!(
        r.header("access-control-allow-credentials"),
        None,
        "kvql never allows credentials: {:?}",
        r.headers
    );
}

/// The comma-separated names in header `name`, lower-cased.
fn names(r: &Resp, name: &str) -> Vec<String> {
    r.header(name)
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

#[track_caller]
fn assert_readable(r: &Resp, allow_origin: &str) {
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(allow_origin),
        "{:?}",
        r.headers
    );
    let exposed = names(r, "access-control-expose-headers");
    for h in ["etag", "x-request-id", "retry-after", "www-authenticate"] {
        assert!(
            exposed.contains(&h.to_owned()),
            "{h} not exposed: {exposed:?}"
        );
    }
    assert_no_credentials(r);
}

fn vary_has_origin(r: &Resp) -> bool {
    r.headers
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case("origin"))
}

#[tokio::test]
async fn preflight_answers_204_with_methods_and_headers_on_every_door() {
    let app = TestApp::spawn().await;
    for (path, method) in DOORS {
        let r = preflight(&app, path, APP_ORIGIN, method).await;
        assert_eq!(r.status, 204, "{method} {path}: {}", r.text);
        assert!(r.text.is_empty(), "{path}: {}", r.text);
        assert_eq!(r.header("access-control-allow-origin"), Some("*"), "{path}");
        let methods = names(&r, "access-control-allow-methods");
        for m in ["get", "head", "post", "put", "patch", "delete"] {
            assert!(methods.contains(&m.to_owned()), "{path}: {methods:?}");
        }
        let headers = names(&r, "access-control-allow-headers");
        for h in [
            "authorization",
            "content-type",
            "if-match",
            "if-none-match",
            "x-request-id",
            "apollo-require-preflight",
            "x-apollo-operation-name",
        ] {
            assert!(headers.contains(&h.to_owned()), "{path}: {headers:?}");
        }
        assert_eq!(r.header("access-control-max-age"), Some("86400"));
        assert_no_credentials(&r);
    }
}

#[tokio::test]
async fn preflights_need_no_token_and_never_count_as_login_attempts() {
    let app = TestApp::spawn_with(|c| {
        c.login_max_failures = 1;
        c.login_max_failures_per_address = 1;
    })
    .await;
    for _ in 0..5 {
        let r = preflight(&app, "/login", APP_ORIGIN, "POST").await;
        assert_eq!(r.status, 204, "{}", r.text);
    }
    let r = preflight(&app, "/api/object/k", APP_ORIGIN, "PUT").await;
    assert_eq!(r.status, 204, "{}", r.text);
    let r = from(
        &app,
        APP_ORIGIN,
        app.client
            .post(app.url("/login"))
            .json(&json!({"username": "admin", "password": ADMIN_PASSWORD})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_readable(&r, "*");
}

#[tokio::test]
async fn an_options_request_that_is_not_a_preflight_still_gets_405() {
    let app = TestApp::spawn().await;
    let r = from(
        &app,
        APP_ORIGIN,
        app.client.request(Method::OPTIONS, app.url("/healthz")),
    )
    .await;
    r.assert_error(405, "METHOD_NOT_ALLOWED");
    assert_readable(&r, "*");
}

#[tokio::test]
async fn actual_requests_get_allow_origin_and_expose_headers() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let r = from(
        &app,
        APP_ORIGIN,
        app.request(Method::POST, "/api/object", Some(&u.token))
            .json(&json!({"key": "k", "data": {"a": 1}})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_readable(&r, "*");
    let r = from(
        &app,
        APP_ORIGIN,
        app.request(Method::GET, &object_path("k"), Some(&u.token)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.header("etag").is_some());
    assert_readable(&r, "*");
    let r = from(
        &app,
        APP_ORIGIN,
        app.request(Method::POST, "/graphql", Some(&u.token))
            .json(&json!({"query": "{ object(key: \"k\") { key } }"})),
    )
    .await;
    assert_eq!(r.body["data"]["object"]["key"], "k", "{}", r.text);
    assert_readable(&r, "*");
    for path in ["/openapi.json", "/healthz"] {
        let r = from(&app, APP_ORIGIN, app.client.get(app.url(path))).await;
        assert_eq!(r.status, 200, "{path}");
        assert_readable(&r, "*");
    }
}

#[tokio::test]
async fn error_answers_carry_the_cors_headers_so_apps_can_read_the_code() {
    let app = TestApp::spawn_with(|c| {
        c.login_max_failures = 1;
    })
    .await;
    let u = app.writer().await;

    let r = from(&app, APP_ORIGIN, app.client.get(app.url(&object_path("k")))).await;
    r.assert_error(401, "UNAUTHENTICATED");
    assert_readable(&r, "*");

    let r = from(
        &app,
        APP_ORIGIN,
        app.request(Method::GET, &object_path("absent"), Some(&u.token)),
    )
    .await;
    r.assert_error(404, "NOT_FOUND");
    assert_readable(&r, "*");

    let r = from(&app, APP_ORIGIN, app.client.get(app.url("/no/such/route"))).await;
    r.assert_error(404, "NOT_FOUND");
    assert_readable(&r, "*");

    let r = from(&app, APP_ORIGIN, app.client.delete(app.url("/healthz"))).await;
    r.assert_error(405, "METHOD_NOT_ALLOWED");
    assert_readable(&r, "*");

    let r = from(
        &app,
        APP_ORIGIN,
        app.client
            .post(app.url("/login"))
            .header("content-type", "application/json")
            .body(vec![b' '; 200 * 1024]),
    )
    .await;
    r.assert_error(413, "PAYLOAD_TOO_LARGE");
    assert_readable(&r, "*");

    let wrong = json!({"username": u.username, "password": "not the password"});
    for _ in 0..2 {
        app.post("/login", None, &wrong).await;
    }
    let r = from(
        &app,
        APP_ORIGIN,
        app.client.post(app.url("/login")).json(&wrong),
    )
    .await;
    r.assert_error(429, "RATE_LIMITED");
    assert!(r.header("retry-after").is_some());
    assert_readable(&r, "*");
}

#[tokio::test]
async fn a_timed_out_request_carries_the_cors_headers() {
    // The body never finishes arriving, so the request cannot end in time.
    let app =
        TestApp::spawn_with(|c| c.request_timeout = std::time::Duration::from_millis(200)).await;
    let r = app.post_stalled("/login", &[("origin", APP_ORIGIN)]).await;
    r.assert_error(503, "TIMEOUT");
    assert_readable(&r, "*");
}

fn restricted() -> CorsOrigins {
    api::cors::parse_origins(&format!("{APP_ORIGIN},http://localhost:3000")).expect("origins")
}

#[tokio::test]
async fn a_restricted_list_allows_only_listed_origins() {
    let app = TestApp::spawn_with(|c| c.cors_origins = restricted()).await;
    let u = app.writer().await;

    for origin in [APP_ORIGIN, "http://localhost:3000"] {
        let r = preflight(&app, "/api/object", origin, "POST").await;
        assert_eq!(r.status, 204, "{origin}: {}", r.text);
        assert_eq!(r.header("access-control-allow-origin"), Some(origin));
        assert!(vary_has_origin(&r), "{:?}", r.headers);
        assert_no_credentials(&r);

        let r = from(
            &app,
            origin,
            app.request(Method::GET, &object_path("absent"), Some(&u.token)),
        )
        .await;
        r.assert_error(404, "NOT_FOUND");
        assert_readable(&r, origin);
        assert!(vary_has_origin(&r), "{:?}", r.headers);
    }

    for origin in [OTHER_ORIGIN, "http://localhost:3001", "null"] {
        let r = preflight(&app, "/api/object", origin, "POST").await;
        r.assert_error(403, "FORBIDDEN");
        assert_eq!(r.header("access-control-allow-origin"), None);
        assert_eq!(r.header("access-control-allow-methods"), None);
        assert!(vary_has_origin(&r), "{:?}", r.headers);
        assert_no_credentials(&r);
    }

    // A browser still sends a simple request; it cannot read the answer.
    let r = from(&app, OTHER_ORIGIN, app.client.get(app.url("/healthz"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_eq!(r.header("access-control-expose-headers"), None);
    assert!(vary_has_origin(&r), "{:?}", r.headers);

    let r = app.get("/healthz", None).await;
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert!(
        vary_has_origin(&r),
        "caches must key on Origin: {:?}",
        r.headers
    );
}

#[tokio::test]
async fn none_turns_cors_off_entirely() {
    let app = TestApp::spawn_with(|c| c.cors_origins = CorsOrigins::Off).await;
    let r = preflight(&app, "/api/object", APP_ORIGIN, "POST").await;
    r.assert_error(405, "METHOD_NOT_ALLOWED");
    let preflight_answer = r;
    let r = from(&app, APP_ORIGIN, app.client.get(app.url("/healthz"))).await;
    assert_eq!(r.status, 200);
    for r in [&preflight_answer, &r] {
        for (name, _) in r.headers.iter() {
            assert!(
                !name.as_str().starts_with("access-control-"),
                "{name} sent with CORS off"
            );
        }
    }
}

#[test]
fn a_malformed_origin_is_refused_at_startup_with_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvql"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("KVQL_CORS_ORIGINS", "https://app.example.com/")
        // Refused at start too, should the origin ever be accepted.
        .env("KVQL_DATABASE_URL", "sqlite::memory:")
        .output()
        .expect("run kvql");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("KVQL_CORS_ORIGINS") || stderr.contains("--cors-origins"),
        "{stderr}"
    );
    assert!(stderr.contains("not an origin"), "{stderr}");
}
