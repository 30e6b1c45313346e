//! Password guessing, floods of logins, spoofed client addresses, and tokens
//! that must stop working: after a password change or a key rotation.

use std::time::Duration;

use api::auth::Role;
use api::config::Config;
use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::support::{PASSWORD, Resp, TestApp};

/// Small limits, so that a test needs only a few attempts.
fn small_limits(c: &mut Config) {
    c.login_max_failures = 3;
    c.login_max_failures_per_address = 5;
    c.login_failure_window = Duration::from_secs(60);
}

async fn login_from(app: &TestApp, username: &str, password: &str, xff: Option<&str>) -> Resp {
    let mut req = app
        .client
        .post(app.url("/login"))
        .json(&json!({"username": username, "password": password}));
    if let Some(xff) = xff {
        req = req.header("x-forwarded-for", xff);
    }
    app.send(req).await
}

async fn login(app: &TestApp, username: &str, password: &str) -> Resp {
    login_from(app, username, password, None).await
}

#[track_caller]
fn assert_throttled(r: &Resp, retry_after: &str) {
    r.assert_error(429, "RATE_LIMITED");
    assert_eq!(r.header("retry-after"), Some(retry_after), "{}", r.text);
}

async fn assert_still_serving(app: &TestApp) {
    assert_eq!(app.get("/healthz", None).await.status, 200);
}

fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("a JWT")
        .kid
        .expect("a kid")
}

#[tokio::test]
async fn failed_logins_beyond_the_limit_get_429_with_retry_after() {
    let app = TestApp::spawn_with(small_limits).await;
    let u = app.writer().await;
    for _ in 0..3 {
        login(&app, &u.username, "wrong password")
            .await
            .assert_error(401, "UNAUTHENTICATED");
    }
    assert_throttled(&login(&app, &u.username, "wrong password").await, "60");
    app.clock.advance(Duration::from_secs(20));
    assert_throttled(&login(&app, &u.username, "wrong password").await, "40");
    assert_still_serving(&app).await;
    // Other users are not affected.
    let other = app.writer().await;
    assert_eq!(
        app.get("/api/objects", Some(&other.token)).await.status,
        200
    );
    // Once the window has passed, the right password works again.
    app.clock.advance(Duration::from_secs(40));
    assert_eq!(login(&app, &u.username, PASSWORD).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_guesses_cannot_slip_past_the_limit() {
    let app = TestApp::spawn_with(|c| {
        small_limits(c);
        c.login_max_failures_per_address = 100;
    })
    .await;
    let u = app.writer().await;
    // Once a guess has failed, the guesses in flight count against the limit
    // (3): of 20 sent at once, exactly 2 more are checked.
    login(&app, &u.username, "wrong password")
        .await
        .assert_error(401, "UNAUTHENTICATED");
    let answers = join_all((0..20).map(|_| login(&app, &u.username, "wrong password"))).await;
    let checked = answers.iter().filter(|r| r.status == 401).count();
    let refused = answers.iter().filter(|r| r.status == 429).count();
    assert_eq!((checked, refused), (2, 18), "{answers:?}");
    assert_still_serving(&app).await;
}

#[tokio::test]
async fn many_correct_logins_of_one_user_at_once_are_not_throttled() {
    let app = TestApp::spawn_with(small_limits).await;
    let u = app.writer().await;
    let answers = join_all((0..12).map(|_| login(&app, &u.username, PASSWORD))).await;
    for r in &answers {
        assert_eq!(r.status, 200, "{}", r.text);
    }
}

#[tokio::test]
async fn throttling_answers_the_same_for_unknown_and_known_users() {
    let app = TestApp::spawn_with(|c| {
        small_limits(c);
        c.login_max_failures_per_address = 100;
    })
    .await;
    let u = app.writer().await;
    for name in [u.username.as_str(), "nobody-at-all"] {
        for _ in 0..3 {
            login(&app, name, "wrong password")
                .await
                .assert_error(401, "UNAUTHENTICATED");
        }
    }
    let known = login(&app, &u.username, "wrong password").await;
    let unknown = login(&app, "nobody-at-all", "wrong password").await;
    assert_throttled(&known, "60");
    assert_throttled(&unknown, "60");
    assert_eq!(known.text, unknown.text);
}

#[tokio::test]
async fn a_throttled_username_is_refused_even_for_the_right_password() {
    let app = TestApp::spawn_with(small_limits).await;
    let u = app.writer().await;
    for _ in 0..3 {
        login(&app, &u.username, "wrong password").await;
    }
    assert_throttled(&login(&app, &u.username, PASSWORD).await, "60");
    // Tokens already issued keep working: throttling guards logins only.
    assert_eq!(app.get("/api/objects", Some(&u.token)).await.status, 200);
}

#[tokio::test]
async fn a_throttled_address_is_refused_even_for_the_right_password() {
    let app = TestApp::spawn_with(small_limits).await;
    let u = app.writer().await;
    // A spray: one failure per username, five in all from one address.
    for i in 0..5 {
        login(&app, &format!("guess-{i}"), "wrong password")
            .await
            .assert_error(401, "UNAUTHENTICATED");
    }
    assert_throttled(&login(&app, &u.username, PASSWORD).await, "60");
    assert_throttled(&login(&app, "guess-99", "wrong password").await, "60");
    assert_still_serving(&app).await;
}

#[tokio::test]
async fn a_successful_login_clears_the_usernames_failures() {
    let app = TestApp::spawn_with(|c| {
        small_limits(c);
        c.login_max_failures_per_address = 100;
    })
    .await;
    let u = app.writer().await;
    for _ in 0..3 {
        for _ in 0..2 {
            login(&app, &u.username, "wrong password")
                .await
                .assert_error(401, "UNAUTHENTICATED");
        }
        assert_eq!(login(&app, &u.username, PASSWORD).await.status, 200);
    }
}

#[tokio::test]
async fn x_forwarded_for_is_ignored_from_an_untrusted_peer() {
    let app = TestApp::spawn_with(small_limits).await;
    let u = app.writer().await;
    // Each attempt claims another address; all come from 127.0.0.1.
    for i in 0..5 {
        login_from(
            &app,
            &format!("guess-{i}"),
            "wrong password",
            Some(&format!("203.0.113.{i}")),
        )
        .await
        .assert_error(401, "UNAUTHENTICATED");
    }
    let r = login_from(&app, &u.username, PASSWORD, Some("198.51.100.1")).await;
    assert_throttled(&r, "60");
}

#[tokio::test]
async fn x_forwarded_for_is_used_only_from_a_trusted_proxy() {
    let app = TestApp::spawn_with(|c| {
        small_limits(c);
        c.trusted_proxies = "127.0.0.0/8".parse().unwrap();
    })
    .await;
    let u = app.writer().await;
    for i in 0..5 {
        login_from(
            &app,
            &format!("guess-{i}"),
            "wrong password",
            Some("203.0.113.7"),
        )
        .await
        .assert_error(401, "UNAUTHENTICATED");
    }
    // The guesser is throttled, also when it prepends an address of its choice:
    // only the entry the trusted proxy appended counts.
    let r = login_from(&app, &u.username, PASSWORD, Some("203.0.113.7")).await;
    assert_throttled(&r, "60");
    let r = login_from(
        &app,
        &u.username,
        PASSWORD,
        Some("198.51.100.9, 203.0.113.7"),
    )
    .await;
    assert_throttled(&r, "60");
    // Another client behind the same proxy is not.
    let r = login_from(&app, &u.username, PASSWORD, Some("198.51.100.9")).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn graphql_login_is_throttled_like_rest_and_counts_the_same_failures() {
    let app = TestApp::spawn_with(small_limits).await;
    let u = app.writer().await;
    let gql_login = |password: &'static str| {
        let username = u.username.clone();
        let app = &app;
        async move {
            app.gql(
                None,
                "mutation($u: String!, $p: String!) { login(username: $u, password: $p) { accessToken } }",
                json!({"u": username, "p": password}),
            )
            .await
        }
    };
    // Failures through both doors add up.
    login(&app, &u.username, "wrong password").await;
    assert_eq!(
        gql_login("wrong password").await.gql_error_code(),
        "UNAUTHENTICATED"
    );
    login(&app, &u.username, "wrong password").await;
    let r = gql_login(PASSWORD).await;
    assert_eq!(r.gql_error_code(), "RATE_LIMITED");
    assert_eq!(r.body["errors"][0]["extensions"]["retryAfter"], json!(60));
    let rest = login(&app, &u.username, PASSWORD).await;
    assert_throttled(&rest, "60");
    assert_eq!(rest.body["code"], r.body["errors"][0]["extensions"]["code"]);
    assert_eq!(
        rest.body["error"], r.body["errors"][0]["message"],
        "the same sentence through both doors"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logins_beyond_the_hashing_queue_get_429_at_once() {
    let app = TestApp::spawn_with(|c| {
        c.login_max_queued = 0;
        c.login_max_failures = 1000;
        c.login_max_failures_per_address = 1000;
    })
    .await;
    api::users::add_user(
        app.node.state.db(),
        &app.clock,
        "flood",
        "acme",
        Role::Writer,
        PASSWORD,
    )
    .await
    .unwrap();
    let answers = join_all((0..24).map(|_| login(&app, "flood", PASSWORD))).await;
    let mut refused = 0;
    for r in &answers {
        if r.status == 429 {
            assert_throttled(r, "1");
            refused += 1;
        } else {
            assert_eq!(r.status, 200, "{}", r.text);
        }
    }
    assert!(
        refused > 0,
        "with no queue, 24 concurrent logins cannot all find a free hashing slot"
    );
    assert_still_serving(&app).await;
    // A refusal is not a failed login: the user is not throttled afterwards.
    let mut ok = false;
    for _ in 0..20 {
        if login(&app, "flood", PASSWORD).await.status == 200 {
            ok = true;
            break;
        }
    }
    assert!(ok, "a login alone eventually gets a hashing slot");
}

#[tokio::test]
async fn a_password_change_revokes_tokens_already_issued() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let other = app.writer().await;
    assert_eq!(app.get("/api/objects", Some(&u.token)).await.status, 200);
    api::users::set_password(app.node.state.db(), &u.username, "a brand new password")
        .await
        .unwrap();
    app.clock.advance(app.config.auth_cache_ttl);
    app.get("/api/objects", Some(&u.token))
        .await
        .assert_error(401, "UNAUTHENTICATED");
    // Other users keep their tokens; the new password gives a working one.
    assert_eq!(
        app.get("/api/objects", Some(&other.token)).await.status,
        200
    );
    let fresh = app.login(&u.username, "a brand new password").await;
    assert_eq!(app.get("/api/objects", Some(&fresh)).await.status, 200);
    let claims: Value = jsonwebtoken::dangerous::insecure_decode(&fresh)
        .unwrap()
        .claims;
    assert_eq!(claims["gen"], 1);
}

#[tokio::test]
async fn a_token_without_a_generation_claim_counts_as_generation_zero() {
    use entity::signing_key;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use sea_orm::EntityTrait;
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let key = signing_key::Entity::find()
        .one(&app.node.state.db().read)
        .await
        .unwrap()
        .unwrap();
    let mut claims: Value = jsonwebtoken::dangerous::insecure_decode(&u.token)
        .unwrap()
        .claims;
    claims.as_object_mut().unwrap().remove("gen");
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.kid.clone());
    let old_style =
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&key.secret)).unwrap();
    assert_eq!(app.get("/api/objects", Some(&old_style)).await.status, 200);
    api::users::set_password(app.node.state.db(), &u.username, "a brand new password")
        .await
        .unwrap();
    app.clock.advance(app.config.auth_cache_ttl);
    app.get("/api/objects", Some(&old_style))
        .await
        .assert_error(401, "UNAUTHENTICATED");
}

#[tokio::test]
async fn rotation_keeps_old_tokens_valid_and_signs_with_the_new_key() {
    let app = TestApp::spawn().await;
    let db = app.node.state.db();
    let u = app.writer().await;
    let first = kid(&u.token);
    let second = api::auth::rotate_signing_key(db, &app.clock, app.config.token_ttl, false)
        .await
        .unwrap();
    assert_ne!(first, second);
    // Nodes reload their keys within a second.
    app.clock.advance(Duration::from_secs(1));
    assert_eq!(app.get("/api/objects", Some(&u.token)).await.status, 200);
    let fresh = app.login(&u.username, PASSWORD).await;
    assert_eq!(kid(&fresh), second);
    assert_eq!(app.get("/api/objects", Some(&fresh)).await.status, 200);
    // The old key still verifies just before its tokens run out.
    app.clock
        .advance(app.config.token_ttl - Duration::from_secs(2));
    assert_eq!(app.get("/api/objects", Some(&u.token)).await.status, 200);
    let keys = api::auth::list_signing_keys(db).await.unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().any(|k| k.kid == second && k.signing));
    assert!(
        keys.iter()
            .any(|k| k.kid == first && !k.signing && k.retired_at.is_some())
    );
}

#[tokio::test]
async fn rotation_with_revoke_old_refuses_tokens_of_older_keys() {
    let app = TestApp::spawn().await;
    let db = app.node.state.db();
    let u = app.writer().await;
    let other = app.writer().await;
    assert_eq!(app.get("/api/objects", Some(&u.token)).await.status, 200);
    let newest = api::auth::rotate_signing_key(db, &app.clock, app.config.token_ttl, true)
        .await
        .unwrap();
    app.clock.advance(Duration::from_secs(1));
    for token in [&u.token, &other.token] {
        app.get("/api/objects", Some(token))
            .await
            .assert_error(401, "UNAUTHENTICATED");
    }
    let fresh = app.login(&u.username, PASSWORD).await;
    assert_eq!(kid(&fresh), newest);
    assert_eq!(app.get("/api/objects", Some(&fresh)).await.status, 200);
}
