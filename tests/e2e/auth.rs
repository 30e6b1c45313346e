//! Login, tokens, roles.

use std::time::{Duration, Instant};

use api::auth::Role;
use entity::signing_key;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sea_orm::EntityTrait;
use serde_json::json;

use crate::support::{PASSWORD, TestApp, object_path};

#[tokio::test]
async fn login_returns_a_bearer_token_with_the_documented_claims() {
    let app = TestApp::spawn().await;
    let u = app.user("acme", Role::Writer).await;
    let header = jsonwebtoken::decode_header(&u.token).unwrap();
    assert_eq!(header.alg, Algorithm::HS256);
    assert!(header.kid.is_some(), "tokens name their signing key");
    let claims: serde_json::Value = jsonwebtoken::dangerous::insecure_decode(&u.token)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], u.username);
    assert_eq!(claims["tid"], "acme");
    assert_eq!(claims["role"], "writer");
    assert_eq!(claims["iss"], "kvql");
    assert_eq!(claims["aud"], "kvql");
    let iat = claims["iat"].as_i64().unwrap();
    assert_eq!(claims["exp"].as_i64().unwrap() - iat, 3600);
}

#[tokio::test]
async fn login_answers_an_unknown_user_and_a_wrong_password_identically() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let wrong = app
        .post(
            "/login",
            None,
            &json!({"username": u.username, "password": "wrong password"}),
        )
        .await;
    let unknown = app
        .post(
            "/login",
            None,
            &json!({"username": "nobody", "password": PASSWORD}),
        )
        .await;
    wrong.assert_error(401, "UNAUTHENTICATED");
    assert_eq!(wrong.status, unknown.status);
    assert_eq!(wrong.text, unknown.text);
    assert_eq!(unknown.header("www-authenticate"), Some("Bearer"));
}

#[tokio::test]
async fn login_for_an_unknown_user_does_the_same_hashing_work() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut wrong = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        app.post(
            "/login",
            None,
            &json!({"username": u.username, "password": "nope nope"}),
        )
        .await;
        wrong.push(t.elapsed());
        let t = Instant::now();
        app.post(
            "/login",
            None,
            &json!({"username": "ghost", "password": "nope nope"}),
        )
        .await;
        unknown.push(t.elapsed());
    }
    // Without the dummy hash an unknown user answers in well under a tenth of
    // the time; this bound is loose enough for any machine load.
    let (wrong, unknown) = (median(wrong), median(unknown));
    assert!(
        unknown * 3 >= wrong,
        "unknown user took {unknown:?}, wrong password {wrong:?}"
    );
}

#[tokio::test]
async fn requests_without_a_token_get_401_with_www_authenticate() {
    let app = TestApp::spawn().await;
    for r in [
        app.get("/api/object/k", None).await,
        app.post("/api/object", None, &json!({"key": "k", "data": 1}))
            .await,
        app.get("/api/objects", None).await,
    ] {
        r.assert_error(401, "UNAUTHENTICATED");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn garbage_and_forged_tokens_get_401() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let claims: serde_json::Value = jsonwebtoken::dangerous::insecure_decode(&u.token)
        .unwrap()
        .claims;
    let kid = jsonwebtoken::decode_header(&u.token).unwrap().kid;
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.clone();
    let forged = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(b"not the server's key"),
    )
    .unwrap();
    let mut tampered = u.token.clone();
    tampered.replace_range(tampered.len() - 4.., "AAAA");
    // An unsigned token claiming `alg: none`.
    let b64 = |v: &serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": kid})),
        b64(&claims)
    );
    for token in ["garbage", "a.b.c", &forged, &tampered, &none] {
        let r = app.get(&object_path("k"), Some(token)).await;
        r.assert_error(401, "UNAUTHENTICATED");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
}

#[tokio::test]
async fn tokens_with_a_wrong_issuer_or_audience_get_401() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let key = signing_key::Entity::find()
        .one(&app.node.state.db().read)
        .await
        .unwrap()
        .unwrap();
    let claims: serde_json::Value = jsonwebtoken::dangerous::insecure_decode(&u.token)
        .unwrap()
        .claims;
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.kid.clone());
    let sign = |claims: &serde_json::Value| {
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(&key.secret)).unwrap()
    };
    // Re-signing the genuine claims works: the test builds tokens correctly.
    assert_eq!(
        app.get("/api/objects", Some(&sign(&claims))).await.status,
        200
    );
    for (field, value) in [("iss", "someone-else"), ("aud", "another-service")] {
        let mut bad = claims.clone();
        bad[field] = json!(value);
        app.get("/api/objects", Some(&sign(&bad)))
            .await
            .assert_error(401, "UNAUTHENTICATED");
    }
}

#[tokio::test]
async fn an_expired_token_gets_401() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    assert_eq!(app.get("/api/objects", Some(&u.token)).await.status, 200);
    app.clock.advance(Duration::from_secs(3599));
    assert_eq!(app.get("/api/objects", Some(&u.token)).await.status, 200);
    app.clock.advance(Duration::from_secs(1));
    app.get("/api/objects", Some(&u.token))
        .await
        .assert_error(401, "UNAUTHENTICATED");
}

#[tokio::test]
async fn the_token_ttl_is_configurable() {
    let app = TestApp::spawn_with(|c| c.token_ttl = Duration::from_secs(60)).await;
    let u = app.writer().await;
    let claims: serde_json::Value = jsonwebtoken::dangerous::insecure_decode(&u.token)
        .unwrap()
        .claims;
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        60
    );
    app.clock.advance(Duration::from_secs(60));
    app.get("/api/objects", Some(&u.token))
        .await
        .assert_error(401, "UNAUTHENTICATED");
}

#[tokio::test]
async fn a_removed_users_token_stops_working() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    assert_eq!(app.get("/api/objects", Some(&u.token)).await.status, 200);
    api::users::remove_user(app.node.state.db(), &u.username)
        .await
        .unwrap();
    // Verified tokens are trusted for the auth cache window, then checked again.
    app.clock.advance(app.config.auth_cache_ttl);
    app.get("/api/objects", Some(&u.token))
        .await
        .assert_error(401, "UNAUTHENTICATED");
}

#[tokio::test]
async fn a_user_removed_and_recreated_under_the_same_name_does_not_revive_old_tokens() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let db = app.node.state.db();
    api::users::remove_user(db, &u.username).await.unwrap();
    api::users::add_user(db, &app.clock, &u.username, "other", Role::Writer, PASSWORD)
        .await
        .unwrap();
    app.clock.advance(app.config.auth_cache_ttl);
    app.get("/api/objects", Some(&u.token))
        .await
        .assert_error(401, "UNAUTHENTICATED");
}

#[tokio::test]
async fn a_reader_can_read_but_gets_403_on_every_write() {
    let app = TestApp::spawn().await;
    let w = app.user("acme", Role::Writer).await;
    let r = app.user("acme", Role::Reader).await;
    app.create(&w, "k", json!("v"), None).await;
    let before = app.snapshot().await;

    assert_eq!(app.read(&r, "k").await.body["data"], "v");
    assert_eq!(app.get("/api/objects", Some(&r.token)).await.status, 200);
    let t = Some(r.token.as_str());
    for resp in [
        app.create(&r, "new", json!(1), None).await,
        app.put(&object_path("k"), t, &json!({"data": 2})).await,
        app.delete(&object_path("k"), t).await,
        app.post("/api/batch/object", t, &json!([{"key": "b", "data": 1}]))
            .await,
        app.put("/api/batch/object", t, &json!([{"key": "b", "data": 1}]))
            .await,
        app.post("/api/batch/delete", t, &json!(["k"])).await,
    ] {
        resp.assert_error(403, "FORBIDDEN");
    }
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn owners_and_writers_can_write() {
    let app = TestApp::spawn().await;
    for role in [Role::Owner, Role::Writer] {
        let u = app.user("acme", role).await;
        let key = format!("by-{}", role.as_str());
        assert_eq!(app.create(&u, &key, json!(1), None).await.status, 201);
    }
}

#[tokio::test]
async fn with_the_auth_cache_off_a_removed_user_is_refused_at_once() {
    let app = TestApp::spawn_with(|c| c.auth_cache_ttl = Duration::ZERO).await;
    let u = app.writer().await;
    assert_eq!(app.get("/api/objects", Some(&u.token)).await.status, 200);
    api::users::remove_user(app.node.state.db(), &u.username)
        .await
        .unwrap();
    app.get("/api/objects", Some(&u.token))
        .await
        .assert_error(401, "UNAUTHENTICATED");
}

#[tokio::test]
async fn a_role_change_takes_effect_after_the_auth_cache_window() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    assert_eq!(app.create(&u, "before", json!(1), None).await.status, 201);
    let db = app.node.state.db();
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, sea_query::Expr};
    entity::user::Entity::update_many()
        .col_expr(entity::user::Column::Role, Expr::value("reader"))
        .filter(entity::user::Column::Username.eq(&u.username))
        .exec(&db.write)
        .await
        .unwrap();
    app.clock.advance(app.config.auth_cache_ttl);
    app.create(&u, "after", json!(1), None)
        .await
        .assert_error(403, "FORBIDDEN");
}

#[tokio::test]
async fn a_401_carries_msg_as_the_original_service_did() {
    let app = TestApp::spawn().await;
    let before = app.snapshot().await;
    let r = app
        .post(
            "/login",
            None,
            &json!({"username": "admin", "password": "not the password"}),
        )
        .await;
    r.assert_error(401, "UNAUTHENTICATED");
    assert_eq!(r.body["msg"], r.body["error"], "{}", r.text);
    let r = app
        .post("/api/object", None, &json!({"key": "k", "data": 1}))
        .await;
    r.assert_error(401, "UNAUTHENTICATED");
    assert_eq!(r.body["msg"], r.body["error"], "{}", r.text);
    let u = app.writer().await;
    let r = app.read(&u, "absent").await;
    r.assert_error(404, "NOT_FOUND");
    assert_eq!(r.body.get("msg"), None, "only 401s carry msg: {}", r.text);
    assert_eq!(app.snapshot().await, before);
}
