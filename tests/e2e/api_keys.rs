//! API keys: owners mint, list and revoke long-lived bearer tokens for
//! apps; a key reads (and with `read_write` writes) its tenant's values on
//! every door, or only those under its prefix, and administers nothing.

use std::time::Duration;

use api::auth::Role;
use serde_json::{Value, json};

use crate::changes::Sse;
use crate::support::{PASSWORD, TestApp, User, WsClient};

/// Makes a key as `owner`; asserts the 201.
async fn mint(app: &TestApp, owner: &User, body: Value) -> Value {
    let r = app.post("/api/keys", Some(&owner.token), &body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body
}

/// A key of `owner`'s tenant as a `User`, to send requests with.
async fn key_user(app: &TestApp, owner: &User, name: &str, scope: &str) -> (String, User) {
    let made = mint(app, owner, json!({"name": name, "scope": scope})).await;
    let id = made["id"].as_str().expect("id").to_owned();
    let token = made["token"].as_str().expect("token").to_owned();
    (
        id,
        User {
            username: format!("apikey:{name}"),
            token,
        },
    )
}

/// Waits (up to 5 s) until the node holds `n` change feeds open: a
/// long-poll is then waiting.
async fn wait_for_feeds(app: &TestApp, n: u64, what: &str) {
    let store = app.node.state.store();
    for _ in 0..1000 {
        if store.open_feeds() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(store.open_feeds(), n, "{what}");
}

/// The names of `owner`'s tenant's keys, as listed.
async fn key_names(app: &TestApp, owner: &User) -> Vec<String> {
    let r = app.get("/api/keys", Some(&owner.token)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["name"].as_str().expect("name").to_owned())
        .collect()
}

#[tokio::test]
async fn an_owner_makes_lists_uses_and_revokes_an_api_key() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let made = mint(
        &app,
        &owner,
        json!({"name": "deploy bot", "scope": "read_write", "ttl": 3600}),
    )
    .await;
    let token = made["token"].as_str().expect("token");
    assert!(token.starts_with(&format!("kvql_{}_", made["id"].as_str().unwrap())));
    assert_eq!(made["name"], "deploy bot");
    assert_eq!(made["scope"], "read_write");
    assert_eq!(made["prefix"], Value::Null);
    assert_eq!(made["created_by"], owner.username.as_str());
    assert!(
        made["expires_at"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z'))
    );

    let listed = app.get("/api/keys", Some(&owner.token)).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    let keys = listed.body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["id"], made["id"]);
    assert_eq!(keys[0]["last_used_at"], Value::Null);
    assert!(
        !listed.text.contains(token),
        "a listing never shows a token"
    );

    let bot = User {
        username: "apikey:deploy bot".into(),
        token: token.to_owned(),
    };
    assert_eq!(app.create(&bot, "k", json!(1), None).await.status, 201);
    assert_eq!(app.read(&owner, "k").await.body["data"], 1);
    let me = app
        .gql(
            Some(token),
            "{ me { username tenant role canWrite } }",
            json!({}),
        )
        .await;
    assert_eq!(
        me.gql_data()["me"],
        json!({"username": "apikey:deploy bot", "tenant": "acme", "role": "WRITER", "canWrite": true})
    );
    // Its use is noted (by a task of its own, so the listing may lag).
    let mut noted = Value::Null;
    for _ in 0..500 {
        noted =
            app.get("/api/keys", Some(&owner.token)).await.body["keys"][0]["last_used_at"].clone();
        if !noted.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(noted.as_str().is_some_and(|s| s.ends_with('Z')), "{noted}");

    let id = made["id"].as_str().unwrap();
    let revoked = app
        .delete(&format!("/api/keys/{id}"), Some(&owner.token))
        .await;
    assert_eq!(revoked.status, 204, "{}", revoked.text);
    // On the node that revoked it, at once.
    app.read(&bot, "k")
        .await
        .assert_error(401, "UNAUTHENTICATED");
    assert!(key_names(&app, &owner).await.is_empty());
    app.delete(&format!("/api/keys/{id}"), Some(&owner.token))
        .await
        .assert_error(404, "NOT_FOUND");
}

#[tokio::test]
async fn a_read_key_reads_and_is_refused_every_write_with_nothing_written() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    app.create(&owner, "k", json!("v"), None).await;
    let (_, reader) = key_user(&app, &owner, "dashboard", "read").await;
    assert_eq!(app.read(&reader, "k").await.body["data"], "v");
    let before = app.snapshot().await;
    app.create(&reader, "new", json!(1), None)
        .await
        .assert_error(403, "FORBIDDEN");
    app.put("/api/object/k", Some(&reader.token), &json!({"data": 2}))
        .await
        .assert_error(403, "FORBIDDEN");
    app.delete("/api/object/k", Some(&reader.token))
        .await
        .assert_error(403, "FORBIDDEN");
    let gql = app
        .gql(
            Some(&reader.token),
            "mutation { putObject(input: {key: \"k\", data: 3}) { created } }",
            json!({}),
        )
        .await;
    assert_eq!(gql.gql_error_code(), "FORBIDDEN");
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn a_key_administers_nothing_and_has_no_password() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let (_, key) = key_user(&app, &owner, "app", "read_write").await;
    let t = Some(key.token.as_str());
    app.get("/api/users", t)
        .await
        .assert_error(403, "FORBIDDEN");
    app.post(
        "/api/users",
        t,
        &json!({"username": "mallory", "password": PASSWORD, "role": "owner"}),
    )
    .await
    .assert_error(403, "FORBIDDEN");
    app.get("/api/keys", t).await.assert_error(403, "FORBIDDEN");
    app.post(
        "/api/keys",
        t,
        &json!({"name": "more", "scope": "read_write"}),
    )
    .await
    .assert_error(403, "FORBIDDEN");
    app.post(
        "/api/me/password",
        t,
        &json!({"current_password": PASSWORD, "new_password": "a brand new password"}),
    )
    .await
    .assert_error(403, "FORBIDDEN");
    assert_eq!(key_names(&app, &owner).await, ["app"]);
    let users = api::users::list_users(app.node.state.db(), Some("acme"))
        .await
        .unwrap();
    assert_eq!(users.len(), 1, "no user was added");
    app.login(&owner.username, PASSWORD).await;
}

#[tokio::test]
async fn writers_and_readers_cannot_make_list_or_revoke_keys() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let (id, _) = key_user(&app, &owner, "app", "read").await;
    for role in [Role::Writer, Role::Reader] {
        let u = app.user("acme", role).await;
        let t = Some(u.token.as_str());
        app.get("/api/keys", t).await.assert_error(403, "FORBIDDEN");
        app.post("/api/keys", t, &json!({"name": "mine", "scope": "read"}))
            .await
            .assert_error(403, "FORBIDDEN");
        app.delete(&format!("/api/keys/{id}"), t)
            .await
            .assert_error(403, "FORBIDDEN");
        let gql = app
            .gql(
                t,
                "mutation { createApiKey(input: {name: \"mine\", scope: READ}) { token } }",
                json!({}),
            )
            .await;
        assert_eq!(gql.gql_error_code(), "FORBIDDEN");
    }
    assert_eq!(key_names(&app, &owner).await, ["app"]);
}

#[tokio::test]
async fn another_tenants_key_looks_missing_and_a_key_sees_only_its_tenant() {
    let app = TestApp::spawn().await;
    let acme = app.user("acme", Role::Owner).await;
    let globex = app.user("globex", Role::Owner).await;
    app.create(&globex, "secret", json!("globex only"), None)
        .await;
    let (id, key) = key_user(&app, &acme, "app", "read_write").await;
    for path in [
        format!("/api/keys/{id}"),
        "/api/keys/nope".into(),
        "/api/keys/99999".into(),
    ] {
        app.delete(&path, Some(&globex.token))
            .await
            .assert_error(404, "NOT_FOUND");
    }
    assert!(key_names(&app, &globex).await.is_empty());
    assert_eq!(key_names(&app, &acme).await, ["app"]);
    // acme's key still works, and only on acme's data.
    app.read(&key, "secret")
        .await
        .assert_error(404, "NOT_FOUND");
    assert_eq!(
        app.create(&key, "secret", json!("acme's"), None)
            .await
            .status,
        201
    );
    assert_eq!(
        app.read(&globex, "secret").await.body["data"],
        "globex only"
    );
}

#[tokio::test]
async fn bad_key_requests_are_400_and_make_nothing() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    for body in [
        json!({"scope": "read"}),
        json!({"name": "", "scope": "read"}),
        json!({"name": "   ", "scope": "read"}),
        json!({"name": "tab\there", "scope": "read"}),
        json!({"name": "n".repeat(101), "scope": "read"}),
        json!({"name": "k", "scope": "admin"}),
        json!({"name": "k"}),
        json!({"name": "k", "scope": "read", "prefix": "a\u{1}b"}),
        json!({"name": "k", "scope": "read", "prefix": "p".repeat(513)}),
        json!({"name": "k", "scope": "read", "prefix": 7}),
        json!({"name": "k", "scope": "read", "ttl": 0}),
        json!({"name": "k", "scope": "read", "ttl": 316_224_001}),
        json!({"name": "k", "scope": "read", "ttl": "soon"}),
        json!(["k"]),
    ] {
        app.post("/api/keys", Some(&owner.token), &body)
            .await
            .assert_error(400, "INVALID_INPUT");
    }
    let gql = app
        .gql(
            Some(&owner.token),
            "mutation { createApiKey(input: {name: \"k\", scope: READ, prefix: \"a\\nb\"}) { token } }",
            json!({}),
        )
        .await;
    assert_eq!(gql.gql_error_code(), "INVALID_INPUT");
    assert!(key_names(&app, &owner).await.is_empty());
    // An empty prefix is every key: the same as none.
    let made = mint(
        &app,
        &owner,
        json!({"name": "k", "scope": "read", "prefix": ""}),
    )
    .await;
    assert_eq!(made["prefix"], Value::Null);
}

#[tokio::test]
async fn a_name_taken_in_the_tenant_is_409_and_one_key_too_many_is_quota_exceeded() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    mint(&app, &owner, json!({"name": "app", "scope": "read"})).await;
    app.post(
        "/api/keys",
        Some(&owner.token),
        &json!({"name": "app", "scope": "read_write"}),
    )
    .await
    .assert_error(409, "ALREADY_EXISTS");
    // Another tenant may use the name.
    let other = app.user("globex", Role::Owner).await;
    mint(&app, &other, json!({"name": "app", "scope": "read"})).await;

    for n in 1..api::admin::keys::MAX_API_KEYS_PER_TENANT {
        mint(
            &app,
            &owner,
            json!({"name": format!("app {n}"), "scope": "read"}),
        )
        .await;
    }
    app.post(
        "/api/keys",
        Some(&owner.token),
        &json!({"name": "one too many", "scope": "read"}),
    )
    .await
    .assert_error(403, "QUOTA_EXCEEDED");
    let names = key_names(&app, &owner).await;
    assert_eq!(
        names.len() as u64,
        api::admin::keys::MAX_API_KEYS_PER_TENANT
    );
    assert!(!names.iter().any(|n| n == "one too many"));
}

#[tokio::test]
async fn an_expired_key_is_refused_and_a_forged_secret_never_works() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let made = mint(
        &app,
        &owner,
        json!({"name": "short", "scope": "read", "ttl": 60}),
    )
    .await;
    let token = made["token"].as_str().unwrap();
    assert_eq!(app.get("/api/objects", Some(token)).await.status, 200);

    // The right id with another secret, a secret cut short, and the prefix alone.
    let (head, secret) = token.rsplit_once('_').unwrap();
    let flipped: String = secret
        .chars()
        .map(|c| if c == 'A' { 'B' } else { 'A' })
        .collect();
    for forged in [
        format!("{head}_{flipped}"),
        format!("{head}_{}", &secret[1..]),
        "kvql_".to_owned(),
    ] {
        app.get("/api/objects", Some(&forged))
            .await
            .assert_error(401, "UNAUTHENTICATED");
    }

    // Another key's id with this key's secret.
    let other = mint(&app, &owner, json!({"name": "other", "scope": "read"})).await;
    let swapped = format!("kvql_{}_{secret}", other["id"].as_str().unwrap());
    app.get("/api/objects", Some(&swapped))
        .await
        .assert_error(401, "UNAUTHENTICATED");

    app.clock.advance(Duration::from_secs(61));
    app.get("/api/objects", Some(token))
        .await
        .assert_error(401, "UNAUTHENTICATED");
}

#[tokio::test]
#[cfg_attr(
    not(kvql_test_postgres),
    ignore = "several nodes need PostgreSQL: set KVQL_TEST_DATABASE_URL"
)]
async fn a_key_revoked_on_one_node_stops_on_another_within_the_auth_cache_ttl() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let (id, key) = key_user(&app, &owner, "app", "read").await;
    let second = app.second_node().await;
    let on_second = |token: &str| {
        app.client
            .get(format!("{}/api/objects", second.base))
            .bearer_auth(token.to_owned())
    };
    assert_eq!(app.send(on_second(&key.token)).await.status, 200);
    let revoked = app
        .delete(&format!("/api/keys/{id}"), Some(&owner.token))
        .await;
    assert_eq!(revoked.status, 204, "{}", revoked.text);
    app.get("/api/objects", Some(&key.token))
        .await
        .assert_error(401, "UNAUTHENTICATED");
    app.clock.advance(app.config.auth_cache_ttl);
    app.send(on_second(&key.token))
        .await
        .assert_error(401, "UNAUTHENTICATED");
    second.stop().await;
}

#[tokio::test]
async fn graphql_makes_lists_and_revokes_keys_and_a_key_subscribes_over_a_websocket() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let t = Some(owner.token.as_str());
    let made = app
        .gql(
            t,
            "mutation { createApiKey(input: {name: \"feed\", scope: READ, ttl: 3600}) \
             { token key { id name scope prefix createdBy expiresAt lastUsedAt } } }",
            json!({}),
        )
        .await;
    let created = made.gql_data()["createApiKey"].clone();
    assert_eq!(created["key"]["name"], "feed");
    assert_eq!(created["key"]["scope"], "READ");
    assert_eq!(created["key"]["prefix"], Value::Null);
    assert_eq!(created["key"]["createdBy"], owner.username.as_str());
    let listed = app.gql(t, "{ apiKeys { id name } }", json!({})).await;
    assert_eq!(
        listed.gql_data()["apiKeys"],
        json!([{"id": created["key"]["id"], "name": "feed"}])
    );

    app.create(&owner, "news/1", json!("hello"), None).await;
    let key = User {
        username: "apikey:feed".into(),
        token: created["token"].as_str().unwrap().to_owned(),
    };
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", key.ws_auth()).await;
    ws.subscribe(
        "1",
        "subscription { objectEvents(prefix: \"news/\", afterRevision: \"0\") { kind key } }",
        json!({}),
    )
    .await;
    let event = ws.next().await;
    assert_eq!(
        event["payload"]["data"]["objectEvents"],
        json!({"kind": "PUT", "key": "news/1"}),
        "{event}"
    );

    let revoked = app
        .gql(
            t,
            "mutation($id: ID!) { revokeApiKey(id: $id) }",
            json!({"id": created["key"]["id"]}),
        )
        .await;
    assert_eq!(revoked.gql_data()["revokeApiKey"], true);
    let again = app
        .gql(
            t,
            "mutation($id: ID!) { revokeApiKey(id: $id) }",
            json!({"id": created["key"]["id"]}),
        )
        .await;
    assert_eq!(again.gql_error_code(), "NOT_FOUND");
    let refused = app
        .gql(Some(&key.token), "{ me { username } }", json!({}))
        .await;
    assert_eq!(refused.gql_error_code(), "UNAUTHENTICATED");
}

#[tokio::test]
async fn an_idle_feed_opened_with_a_key_that_never_expires_ends_when_the_key_is_revoked() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let (id, key) = key_user(&app, &owner, "watcher", "read").await;
    let me = app
        .gql(Some(&key.token), "{ me { tokenExpiresAt } }", json!({}))
        .await;
    assert_eq!(
        me.gql_data()["me"]["tokenExpiresAt"],
        "9999-12-31T23:59:59.999Z"
    );
    let mut resp = app
        .client
        .get(app.url("/api/watch"))
        .bearer_auth(&key.token)
        .send()
        .await
        .expect("watch");
    assert_eq!(resp.status(), 200);
    let revoked = app
        .delete(&format!("/api/keys/{id}"), Some(&owner.token))
        .await;
    assert_eq!(revoked.status, 204, "{}", revoked.text);
    // Nothing is written: the feed notices on its own (every 5 s).
    let mut seen = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(chunk) = resp.chunk().await.expect("stream") {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains("event: error") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ended, Ok(true), "{seen}");
    assert!(seen.contains("UNAUTHENTICATED"), "{seen}");
}

#[tokio::test]
async fn a_key_is_refused_every_administration_field_over_graphql() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let (_, key) = key_user(&app, &owner, "app", "read_write").await;
    for query in [
        "{ apiKeys { id } }",
        "{ users { username } }",
        "mutation { createApiKey(input: {name: \"more\", scope: READ_WRITE}) { token } }",
        "mutation { revokeApiKey(id: \"1\") }",
        "mutation { addUser(input: {username: \"mallory\", password: \"long enough pw\", role: OWNER}) { username } }",
        "mutation { changePassword(currentPassword: \"x\", newPassword: \"long enough pw\") { accessToken } }",
    ] {
        let r = app.gql(Some(&key.token), query, json!({})).await;
        assert_eq!(r.gql_error_code(), "FORBIDDEN", "{query}: {}", r.text);
    }
    assert_eq!(key_names(&app, &owner).await, ["app"]);
    let users = api::users::list_users(app.node.state.db(), Some("acme"))
        .await
        .unwrap();
    assert_eq!(users.len(), 1, "no user was added");
}

/// A `read_write` key of `owner`'s tenant restricted to `prefix`.
async fn prefix_key(app: &TestApp, owner: &User, name: &str, prefix: &str) -> User {
    let made = mint(
        app,
        owner,
        json!({"name": name, "scope": "read_write", "prefix": prefix}),
    )
    .await;
    assert_eq!(made["prefix"], prefix);
    User {
        username: format!("apikey:{name}"),
        token: made["token"].as_str().expect("token").to_owned(),
    }
}

#[tokio::test]
async fn a_prefix_key_reads_lists_and_follows_only_keys_under_its_prefix_over_rest() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    for k in ["app", "app/a", "app/b", "apq", "other/x"] {
        assert_eq!(app.create(&owner, k, json!(k), None).await.status, 201);
    }
    let key = prefix_key(&app, &owner, "app", "app/").await;
    let listed = app.get("/api/keys", Some(&owner.token)).await;
    assert_eq!(listed.body["keys"][0]["prefix"], "app/");

    assert_eq!(app.read(&key, "app/a").await.body["data"], "app/a");
    // Outside the prefix, a stored value answers as a missing one does.
    let outside = app.read(&key, "other/x").await;
    outside.assert_error(404, "NOT_FOUND");
    assert_eq!(outside.body, app.read(&key, "app/none").await.body);
    app.read(&key, "app").await.assert_error(404, "NOT_FOUND");

    let keys_of = |r: &crate::support::Resp| -> Vec<String> {
        r.body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|o| o["key"].as_str().unwrap().to_owned())
            .collect()
    };
    for (asked, seen) in [
        ("", vec!["app/a", "app/b"]),
        ("ap", vec!["app/a", "app/b"]),
        ("app/b", vec!["app/b"]),
        ("apq", vec![]),
        ("other/", vec![]),
    ] {
        let r = app
            .get(&format!("/api/objects?prefix={asked}"), Some(&key.token))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(keys_of(&r), seen, "prefix {asked:?}");
    }
    // Pages of a narrowed listing still end.
    let first = app.get("/api/objects?limit=1", Some(&key.token)).await;
    assert_eq!(keys_of(&first), ["app/a"]);
    let cursor = first.body["next_cursor"].as_str().expect("a next page");
    let second = app
        .get(
            &format!("/api/objects?limit=1&cursor={cursor}"),
            Some(&key.token),
        )
        .await;
    assert_eq!(keys_of(&second), ["app/b"]);
    assert_eq!(second.body["next_cursor"], Value::Null);

    // The change log: every change of the tenant is logged, the key sees its own.
    let changed = |r: &crate::support::Resp| -> Vec<String> {
        r.body["changes"]
            .as_array()
            .expect("changes")
            .iter()
            .map(|c| c["key"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = app.get("/api/changes?after=0", Some(&key.token)).await;
    assert_eq!(all.status, 200, "{}", all.text);
    assert_eq!(changed(&all), ["app/a", "app/b"]);
    let other = app
        .get("/api/changes?after=0&key=other/x", Some(&key.token))
        .await;
    assert_eq!(changed(&other), Vec::<String>::new());
    let history = app
        .get("/api/object/other%2Fx/history", Some(&key.token))
        .await;
    assert_eq!(history.status, 200, "{}", history.text);
    assert_eq!(history.body["changes"], json!([]));
    let own = app
        .get("/api/object/app%2Fa/history", Some(&key.token))
        .await;
    assert_eq!(own.body["changes"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn a_prefix_key_writes_only_under_its_prefix_and_nothing_changes_outside() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    app.create(&owner, "other/x", json!("keep"), None).await;
    app.create(&owner, "app/old", json!("old"), None).await;
    let key = prefix_key(&app, &owner, "app", "app/").await;
    let before = app.snapshot().await;

    app.create(&key, "other/new", json!(1), None)
        .await
        .assert_error(403, "FORBIDDEN");
    app.put(
        "/api/object/other%2Fx",
        Some(&key.token),
        &json!({"data": 2}),
    )
    .await
    .assert_error(403, "FORBIDDEN");
    app.put(
        "/api/object/other%2Fnew",
        Some(&key.token),
        &json!({"data": 2}),
    )
    .await
    .assert_error(403, "FORBIDDEN");
    // Deleting outside answers as deleting a missing key does, stored or not.
    app.delete("/api/object/other%2Fx", Some(&key.token))
        .await
        .assert_error(404, "NOT_FOUND");
    app.delete("/api/object/other%2Fnone", Some(&key.token))
        .await
        .assert_error(404, "NOT_FOUND");
    // Conditional writes outside are refused before their conditions are read.
    let both = app
        .send(
            app.request(
                reqwest::Method::PUT,
                "/api/object/other%2Fx",
                Some(&key.token),
            )
            .header("If-Match", "\"1\"")
            .header("If-None-Match", "*")
            .json(&json!({"data": 3})),
        )
        .await;
    both.assert_error(403, "FORBIDDEN");
    // An atomic batch with one item outside writes nothing.
    let atomic = app
        .post(
            "/api/batch/object?atomic=true",
            Some(&key.token),
            &json!([{"key": "app/1", "data": 1}, {"key": "other/1", "data": 1}]),
        )
        .await;
    atomic.assert_error(403, "FORBIDDEN");
    assert_eq!(atomic.body["index"], 1);
    let atomic_delete = app
        .post(
            "/api/batch/delete?atomic=true",
            Some(&key.token),
            &json!(["app/old", "other/x"]),
        )
        .await;
    atomic_delete.assert_error(404, "NOT_FOUND");
    assert_eq!(atomic_delete.body["index"], 1);
    assert_eq!(app.snapshot().await, before);

    // Per item: the items inside are written, those outside fail alone.
    let mixed = app
        .put(
            "/api/batch/object",
            Some(&key.token),
            &json!([{"key": "app/1", "data": 1}, {"key": "other/x", "data": 9}]),
        )
        .await;
    assert_eq!(mixed.status, 200, "{}", mixed.text);
    assert_eq!(mixed.body["succeeded"], 1);
    assert_eq!(mixed.body["results"][1]["status"], 403);
    assert_eq!(mixed.body["results"][1]["code"], "FORBIDDEN");
    let deleted = app
        .post(
            "/api/batch/delete",
            Some(&key.token),
            &json!(["app/old", "other/x"]),
        )
        .await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_eq!(deleted.body["results"][0]["status"], 200);
    assert_eq!(deleted.body["results"][1]["status"], 404);
    assert_eq!(app.read(&owner, "other/x").await.body["data"], "keep");
    assert_eq!(app.read(&owner, "app/1").await.body["data"], 1);
    app.read(&owner, "app/old")
        .await
        .assert_error(404, "NOT_FOUND");
    // Inside, everything a writer may do works.
    assert_eq!(app.create(&key, "app/2", json!(2), None).await.status, 201);
    let r = app
        .put("/api/object/app%2F2", Some(&key.token), &json!({"data": 3}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = app.delete("/api/object/app%2F2", Some(&key.token)).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn a_prefix_key_sees_only_its_prefix_over_graphql_and_its_subscriptions() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    app.create(&owner, "app/a", json!(1), None).await;
    app.create(&owner, "other/x", json!(2), None).await;
    let made = app
        .gql(
            Some(&owner.token),
            "mutation { createApiKey(input: {name: \"g\", scope: READ_WRITE, prefix: \"app/\"}) \
             { token key { prefix } } }",
            json!({}),
        )
        .await;
    let created = &made.gql_data()["createApiKey"];
    assert_eq!(created["key"]["prefix"], "app/");
    let token = created["token"].as_str().unwrap().to_owned();
    let t = Some(token.as_str());

    let read = app
        .gql(
            t,
            "{ a: object(key: \"app/a\") { data } x: object(key: \"other/x\") { data } \
             objects(keys: [\"other/x\", \"app/a\"]) { key } \
             listObjects { edges { node { key } } } \
             objectHistory(key: \"other/x\") { edges { cursor } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        read.gql_data(),
        &json!({
            "a": {"data": 1},
            "x": null,
            "objects": [null, {"key": "app/a"}],
            "listObjects": {"edges": [{"node": {"key": "app/a"}}]},
            "objectHistory": {"edges": []},
        })
    );

    let before = app.snapshot().await;
    for mutation in [
        "mutation { createObject(input: {key: \"other/n\", data: 1}) { key } }",
        "mutation { putObject(input: {key: \"other/x\", data: 1}) { created } }",
        "mutation { batchPut(items: [{key: \"app/n\", data: 1}, {key: \"other/n\", data: 1}]) { succeeded } }",
    ] {
        let r = app.gql(t, mutation, json!({})).await;
        assert_eq!(r.gql_error_code(), "FORBIDDEN", "{mutation}: {}", r.text);
    }
    let deleted = app
        .gql(t, "mutation { deleteObject(key: \"other/x\") }", json!({}))
        .await;
    assert_eq!(deleted.gql_error_code(), "NOT_FOUND");
    assert_eq!(app.snapshot().await, before);

    // A subscription to every key gets the changes under the prefix only,
    // from the log and live.
    let key = User {
        username: "apikey:g".into(),
        token: token.clone(),
    };
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", key.ws_auth()).await;
    ws.subscribe(
        "1",
        "subscription { objectEvents(afterRevision: \"0\") { kind key } }",
        json!({}),
    )
    .await;
    let first = ws.next().await;
    assert_eq!(
        first["payload"]["data"]["objectEvents"],
        json!({"kind": "PUT", "key": "app/a"}),
        "{first}"
    );
    app.create(&owner, "other/live", json!(3), None).await;
    app.create(&owner, "app/live", json!(4), None).await;
    let live = ws.next().await;
    assert_eq!(
        live["payload"]["data"]["objectEvents"],
        json!({"kind": "PUT", "key": "app/live"}),
        "{live}"
    );
    // One outside the prefix gets nothing, ever.
    ws.subscribe(
        "2",
        "subscription { objectEvents(key: \"other/x\", afterRevision: \"0\") { key } }",
        json!({}),
    )
    .await;
    app.put(
        "/api/object/other%2Fx",
        Some(&owner.token),
        &json!({"data": 5}),
    )
    .await;
    app.create(&owner, "app/last", json!(6), None).await;
    let next = ws.next().await;
    assert_eq!(next["id"], "1", "{next}");
    assert_eq!(
        next["payload"]["data"]["objectEvents"],
        json!({"kind": "PUT", "key": "app/last"})
    );
}

#[tokio::test]
async fn a_long_poll_waiting_when_its_key_is_revoked_answers_401_not_the_change() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let (id, key) = key_user(&app, &owner, "poller", "read").await;
    let poll = {
        let req = app
            .request(
                reqwest::Method::GET,
                "/api/changes?after=0&wait=30",
                Some(&key.token),
            )
            .send();
        tokio::spawn(req)
    };
    wait_for_feeds(&app, 1, "the long-poll is waiting").await;
    let revoked = app
        .delete(&format!("/api/keys/{id}"), Some(&owner.token))
        .await;
    assert_eq!(revoked.status, 204, "{}", revoked.text);
    app.create(&owner, "news", json!("secret"), None).await;
    let answer = poll.await.expect("task").expect("response");
    assert_eq!(answer.status(), 401);
    let body: Value = answer.json().await.expect("json");
    assert_eq!(body["code"], "UNAUTHENTICATED");
}

#[tokio::test]
async fn a_read_prefix_key_follows_only_its_prefix_over_sse_and_long_polls() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    // Prefixes compare as UTF-8 bytes: "é/" is neither "e/" nor "ê/".
    for k in ["e/1", "é/1", "ê/1"] {
        app.create(&owner, k, json!(k), None).await;
    }
    let made = mint(
        &app,
        &owner,
        json!({"name": "accents", "scope": "read", "prefix": "é/"}),
    )
    .await;
    let key = User {
        username: "apikey:accents".into(),
        token: made["token"].as_str().unwrap().to_owned(),
    };
    app.create(&key, "é/mine", json!(0), None)
        .await
        .assert_error(403, "FORBIDDEN");

    let mut sse = Sse::open(&app, &key, "after=0", None).await;
    assert_eq!(sse.next().await.data["key"], "é/1");
    app.create(&owner, "ê/2", json!(2), None).await;
    let inside = app.create(&owner, "é/2", json!(2), None).await;
    let e = sse.next().await;
    assert_eq!(e.data["key"], "é/2");
    assert_eq!(e.id, Some(inside.body["revision"].to_string()));

    // A long-poll wakes for changes outside the prefix but answers only
    // with one inside it.
    let after = inside.body["revision"].to_string();
    let poll = tokio::spawn(
        app.request(
            reqwest::Method::GET,
            &format!("/api/changes?after={after}&wait=30"),
            Some(&key.token),
        )
        .send(),
    );
    wait_for_feeds(&app, 2, "the SSE stream and the long-poll").await;
    app.create(&owner, "ê/3", json!(3), None).await;
    app.create(&owner, "é/3", json!(3), None).await;
    let answer = poll.await.expect("task").expect("response");
    assert_eq!(answer.status(), 200);
    let page: Value = answer.json().await.expect("json");
    let keys: Vec<&str> = page["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["é/3"]);
}
