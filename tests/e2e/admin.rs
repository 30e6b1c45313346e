//! Tenant administration over the API: owners manage their tenant's users,
//! everyone changes their own password.

use api::auth::Role;
use serde_json::{Value, json};

use crate::support::{PASSWORD, TestApp, User};

const NEW_PASSWORD: &str = "a brand new password";

/// `(username, role)` of every user of `tenant`, read from the database.
async fn members(app: &TestApp, tenant: &str) -> Vec<(String, String)> {
    api::users::list_users(app.node.state.db(), Some(tenant))
        .await
        .expect("list users")
        .into_iter()
        .map(|u| (u.username, u.role.as_str().to_owned()))
        .collect()
}

async fn login_status(app: &TestApp, username: &str, password: &str) -> u16 {
    app.post(
        "/login",
        None,
        &json!({"username": username, "password": password}),
    )
    .await
    .status
}

async fn patch(app: &TestApp, token: &str, username: &str, body: &Value) -> crate::support::Resp {
    app.send(
        app.request(
            reqwest::Method::PATCH,
            &format!("/api/users/{username}"),
            Some(token),
        )
        .json(body),
    )
    .await
}

/// Whether `user`'s token may write (201), is refused the write (403) or
/// is no longer accepted (401).
async fn write_status(app: &TestApp, user: &User, key: &str) -> u16 {
    app.post(
        "/api/object",
        Some(&user.token),
        &json!({"key": key, "data": 1}),
    )
    .await
    .status
}

#[tokio::test]
async fn an_owner_adds_lists_changes_and_removes_users_of_its_tenant() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let t = Some(owner.token.as_str());

    let added = app
        .post(
            "/api/users",
            t,
            &json!({"username": "ann", "password": PASSWORD, "role": "writer"}),
        )
        .await;
    assert_eq!(added.status, 201, "{}", added.text);
    assert_eq!(added.body["username"], "ann");
    assert_eq!(added.body["role"], "writer");
    assert_eq!(added.body["disabled"], false);
    assert!(
        added.body["created_at"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z'))
    );
    let ann = User {
        username: "ann".into(),
        token: app.login("ann", PASSWORD).await,
    };
    assert_eq!(write_status(&app, &ann, "by-ann").await, 201);

    let listed = app.get("/api/users", t).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    let names: Vec<(&str, &str)> = listed.body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["username"].as_str().unwrap(), u["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        vec![(owner.username.as_str(), "owner"), ("ann", "writer")]
    );

    // A role change applies to tokens already issued (at once on this node).
    let demoted = patch(&app, &owner.token, "ann", &json!({"role": "reader"})).await;
    assert_eq!(demoted.status, 200, "{}", demoted.text);
    assert_eq!(demoted.body["role"], "reader");
    assert_eq!(write_status(&app, &ann, "by-reader").await, 403);
    assert_eq!(app.read(&ann, "by-ann").await.status, 200);

    // A password reset revokes the user's tokens.
    let reset = patch(
        &app,
        &owner.token,
        "ann",
        &json!({"password": NEW_PASSWORD}),
    )
    .await;
    assert_eq!(reset.status, 200, "{}", reset.text);
    assert_eq!(app.read(&ann, "by-ann").await.status, 401);
    assert_eq!(login_status(&app, "ann", PASSWORD).await, 401);
    let ann = User {
        username: "ann".into(),
        token: app.login("ann", NEW_PASSWORD).await,
    };
    assert_eq!(app.read(&ann, "by-ann").await.status, 200);

    let removed = app.delete("/api/users/ann", t).await;
    assert_eq!(removed.status, 204, "{}", removed.text);
    assert_eq!(app.read(&ann, "by-ann").await.status, 401);
    assert_eq!(login_status(&app, "ann", NEW_PASSWORD).await, 401);
    assert_eq!(
        members(&app, "acme").await,
        vec![(owner.username.clone(), "owner".into())]
    );
    // The tenant's data stays.
    assert_eq!(app.read(&owner, "by-ann").await.status, 200);
}

#[tokio::test]
async fn writers_and_readers_cannot_administer_users_and_nothing_changes() {
    let app = TestApp::spawn().await;
    let _owner = app.user("acme", Role::Owner).await;
    let writer = app.user("acme", Role::Writer).await;
    let reader = app.user("acme", Role::Reader).await;
    let before = members(&app, "acme").await;

    for user in [&writer, &reader] {
        let t = Some(user.token.as_str());
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
        let other = if user.username == writer.username {
            &reader
        } else {
            &writer
        };
        for body in [json!({"role": "owner"}), json!({"password": NEW_PASSWORD})] {
            patch(&app, &user.token, &user.username, &body)
                .await
                .assert_error(403, "FORBIDDEN");
            patch(&app, &user.token, &other.username, &body)
                .await
                .assert_error(403, "FORBIDDEN");
        }
        app.delete(&format!("/api/users/{}", other.username), t)
            .await
            .assert_error(403, "FORBIDDEN");

        let gql = app.gql(t, "{ users { username } }", json!({})).await;
        assert_eq!(gql.gql_error_code(), "FORBIDDEN");
        let gql = app
            .gql(
                t,
                "mutation($u: String!) { updateUser(username: $u, input: {role: OWNER}) { role } }",
                json!({"u": user.username}),
            )
            .await;
        assert_eq!(gql.gql_error_code(), "FORBIDDEN");
        let gql = app
            .gql(
                t,
                "mutation($u: String!) { removeUser(username: $u) }",
                json!({"u": other.username}),
            )
            .await;
        assert_eq!(gql.gql_error_code(), "FORBIDDEN");
    }
    assert_eq!(members(&app, "acme").await, before);
    assert_eq!(login_status(&app, &writer.username, PASSWORD).await, 200);
    assert_eq!(login_status(&app, &reader.username, PASSWORD).await, 200);
}

#[tokio::test]
async fn another_tenants_users_answer_like_users_nobody_has_and_stay_unchanged() {
    let app = TestApp::spawn().await;
    let owner = app.user("alpha", Role::Owner).await;
    let victim = app.user("beta", Role::Owner).await;
    let t = Some(owner.token.as_str());
    let before = members(&app, "beta").await;

    for name in [victim.username.as_str(), "nobody-has-this-name"] {
        let r = patch(&app, &owner.token, name, &json!({"role": "reader"})).await;
        r.assert_error(404, "NOT_FOUND");
        assert_eq!(
            r.body["error"],
            format!("no user named {name:?} in your tenant")
        );
        let r = patch(&app, &owner.token, name, &json!({"password": NEW_PASSWORD})).await;
        r.assert_error(404, "NOT_FOUND");
        app.delete(&format!("/api/users/{name}"), t)
            .await
            .assert_error(404, "NOT_FOUND");
        let gql = app
            .gql(
                t,
                "mutation($u: String!) { removeUser(username: $u) }",
                json!({"u": name}),
            )
            .await;
        assert_eq!(gql.gql_error_code(), "NOT_FOUND");
    }
    let listed = app.get("/api/users", t).await;
    assert_eq!(
        listed.body["users"].as_array().unwrap().len(),
        1,
        "{}",
        listed.text
    );
    assert_eq!(listed.body["users"][0]["username"], owner.username.as_str());

    // Usernames are unique across tenants: a taken one is refused, and the
    // other tenant's user keeps its tenant and password.
    app.post(
        "/api/users",
        t,
        &json!({"username": victim.username, "password": NEW_PASSWORD, "role": "writer"}),
    )
    .await
    .assert_error(409, "ALREADY_EXISTS");
    assert_eq!(members(&app, "beta").await, before);
    assert_eq!(members(&app, "alpha").await.len(), 1);
    assert_eq!(login_status(&app, &victim.username, PASSWORD).await, 200);
    assert_eq!(app.read(&victim, "anything").await.status, 404);
}

#[tokio::test]
async fn bad_input_is_refused_with_400_naming_the_field_and_adds_nobody() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let writer = app.user("acme", Role::Writer).await;
    let t = Some(owner.token.as_str());
    let before = members(&app, "acme").await;

    let cases = [
        (
            json!({"username": "has space", "password": PASSWORD, "role": "writer"}),
            "username",
        ),
        (
            json!({"username": "", "password": PASSWORD, "role": "writer"}),
            "username",
        ),
        (
            json!({"username": "x".repeat(65), "password": PASSWORD, "role": "writer"}),
            "username",
        ),
        (
            json!({"username": "short-pw", "password": "1234567", "role": "writer"}),
            "password",
        ),
        (
            json!({"username": "admin2", "password": PASSWORD, "role": "admin"}),
            "role",
        ),
    ];
    for (body, field) in cases {
        let r = app.post("/api/users", t, &body).await;
        r.assert_error(400, "INVALID_INPUT");
        assert_eq!(r.body["field"], field, "{}", r.text);
    }
    let r = app
        .post(
            "/api/users",
            t,
            &json!({"username": "norole", "password": PASSWORD}),
        )
        .await;
    r.assert_error(400, "INVALID_INPUT");
    r.assert_mentions("missing field `role`");
    for nothing in [json!({}), json!({"role": null, "password": null})] {
        let r = patch(&app, &owner.token, &writer.username, &nothing).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["role"], "writer", "{nothing} changes nothing");
    }
    let r = patch(
        &app,
        &owner.token,
        &writer.username,
        &json!({"role": "superowner"}),
    )
    .await;
    r.assert_error(400, "INVALID_INPUT");
    let r = patch(
        &app,
        &owner.token,
        &writer.username,
        &json!({"password": "short"}),
    )
    .await;
    r.assert_error(400, "INVALID_INPUT");
    assert_eq!(r.body["field"], "password");

    assert_eq!(members(&app, "acme").await, before);
    assert_eq!(login_status(&app, &writer.username, PASSWORD).await, 200);
}

#[tokio::test]
async fn an_owner_cannot_demote_or_remove_itself_so_the_last_owner_stays() {
    let app = TestApp::spawn().await;
    let first = app.user("acme", Role::Owner).await;
    let before = members(&app, "acme").await;

    for body in [json!({"role": "writer"}), json!({"password": NEW_PASSWORD})] {
        patch(&app, &first.token, &first.username, &body)
            .await
            .assert_error(403, "FORBIDDEN");
    }
    app.delete(
        &format!("/api/users/{}", first.username),
        Some(&first.token),
    )
    .await
    .assert_error(403, "FORBIDDEN");
    let gql = app
        .gql(
            Some(&first.token),
            "mutation($u: String!) { updateUser(username: $u, input: {role: READER}) { role } }",
            json!({"u": first.username}),
        )
        .await;
    assert_eq!(gql.gql_error_code(), "FORBIDDEN");
    assert_eq!(members(&app, "acme").await, before);
    assert_eq!(login_status(&app, &first.username, PASSWORD).await, 200);

    // Another owner can demote it; then the first is no owner any more, at once.
    let second = app.user("acme", Role::Owner).await;
    let r = patch(
        &app,
        &second.token,
        &first.username,
        &json!({"role": "writer"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    app.get("/api/users", Some(&first.token))
        .await
        .assert_error(403, "FORBIDDEN");
    patch(
        &app,
        &first.token,
        &second.username,
        &json!({"role": "reader"}),
    )
    .await
    .assert_error(403, "FORBIDDEN");
    assert_eq!(
        members(&app, "acme").await,
        vec![
            (first.username.clone(), "writer".into()),
            (second.username.clone(), "owner".into())
        ]
    );
}

#[tokio::test]
async fn an_owner_demoted_elsewhere_can_change_nothing_though_its_token_is_cached() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let writer = app.user("acme", Role::Writer).await;
    // The token is verified and cached as an owner's.
    assert_eq!(app.get("/api/users", Some(&owner.token)).await.status, 200);
    // The operator demotes it; this node's auth cache is not told.
    api::users::set_role(app.node.state.db(), &owner.username, Role::Writer)
        .await
        .unwrap();
    let before = members(&app, "acme").await;
    for body in [json!({"role": "owner"}), json!({"password": NEW_PASSWORD})] {
        let r = patch(&app, &owner.token, &writer.username, &body).await;
        r.assert_error(403, "FORBIDDEN");
        r.assert_mentions("no longer an owner");
    }
    app.delete(
        &format!("/api/users/{}", writer.username),
        Some(&owner.token),
    )
    .await
    .assert_error(403, "FORBIDDEN");
    app.post(
        "/api/users",
        Some(&owner.token),
        &json!({"username": "newcomer", "password": PASSWORD, "role": "owner"}),
    )
    .await
    .assert_error(403, "FORBIDDEN");
    assert_eq!(members(&app, "acme").await, before);
    assert_eq!(login_status(&app, &writer.username, PASSWORD).await, 200);
}

#[tokio::test]
async fn a_path_that_is_no_username_answers_404_without_echoing_it() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let long = "x".repeat(300);
    for name in ["has%20space", long.as_str(), "%C3%BC"] {
        let r = patch(&app, &owner.token, name, &json!({"role": "reader"})).await;
        r.assert_error(404, "NOT_FOUND");
        assert_eq!(r.body["error"], "no user by that name in your tenant");
        app.delete(&format!("/api/users/{name}"), Some(&owner.token))
            .await
            .assert_error(404, "NOT_FOUND");
    }
}

#[tokio::test]
async fn two_owners_demoting_each_other_at_once_leave_exactly_one_owner() {
    let app = TestApp::spawn().await;
    for round in 0..5 {
        let tenant = format!("race{round}");
        let a = app.user(&tenant, Role::Owner).await;
        let b = app.user(&tenant, Role::Owner).await;
        let demote = json!({"role": "reader"});
        let (ra, rb) = tokio::join!(
            patch(&app, &a.token, &b.username, &demote),
            patch(&app, &b.token, &a.username, &demote),
        );
        let mut statuses = [ra.status, rb.status];
        statuses.sort();
        assert_eq!(statuses, [200, 403], "{} / {}", ra.text, rb.text);
        for r in [&ra, &rb] {
            if r.status == 403 {
                r.assert_error(403, "FORBIDDEN");
            }
        }
        let owners = members(&app, &tenant)
            .await
            .into_iter()
            .filter(|(_, role)| role == "owner")
            .count();
        assert_eq!(owners, 1, "round {round}");
    }
}

#[tokio::test]
async fn changing_your_own_password_needs_the_current_one_and_revokes_your_tokens() {
    let app = TestApp::spawn().await;
    let writer = app.user("acme", Role::Writer).await;
    let second_token = app.login(&writer.username, PASSWORD).await;
    let t = Some(writer.token.as_str());

    let wrong = app
        .post(
            "/api/me/password",
            t,
            &json!({"current_password": "not my password", "new_password": NEW_PASSWORD}),
        )
        .await;
    wrong.assert_error(403, "FORBIDDEN");
    let weak = app
        .post(
            "/api/me/password",
            t,
            &json!({"current_password": PASSWORD, "new_password": "short"}),
        )
        .await;
    weak.assert_error(400, "INVALID_INPUT");
    assert_eq!(weak.body["field"], "new_password");
    app.post(
        "/api/me/password",
        None,
        &json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
    )
    .await
    .assert_error(401, "UNAUTHENTICATED");
    // Nothing changed.
    assert_eq!(login_status(&app, &writer.username, PASSWORD).await, 200);
    assert_eq!(app.get("/api/objects", t).await.status, 200);

    let changed = app
        .post(
            "/api/me/password",
            t,
            &json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
        )
        .await;
    assert_eq!(changed.status, 200, "{}", changed.text);
    assert_eq!(changed.body["token_type"], "Bearer");
    let fresh = changed.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(app.get("/api/objects", t).await.status, 401);
    assert_eq!(
        app.get("/api/objects", Some(&second_token)).await.status,
        401
    );
    assert_eq!(app.get("/api/objects", Some(&fresh)).await.status, 200);
    assert_eq!(login_status(&app, &writer.username, PASSWORD).await, 401);
    assert_eq!(
        login_status(&app, &writer.username, NEW_PASSWORD).await,
        200
    );
}

#[tokio::test]
async fn wrong_current_passwords_count_against_the_login_limit() {
    let app = TestApp::spawn_with(|c| c.login_max_failures = 3).await;
    let writer = app.user("acme", Role::Writer).await;
    let t = Some(writer.token.as_str());
    let body = json!({"current_password": "guess", "new_password": NEW_PASSWORD});
    for _ in 0..3 {
        app.post("/api/me/password", t, &body)
            .await
            .assert_error(403, "FORBIDDEN");
    }
    let limited = app.post("/api/me/password", t, &body).await;
    limited.assert_error(429, "RATE_LIMITED");
    assert!(limited.header("retry-after").is_some());
    let right = app
        .post(
            "/api/me/password",
            t,
            &json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
        )
        .await;
    right.assert_error(429, "RATE_LIMITED");
    assert_eq!(app.get("/api/objects", t).await.status, 200);
}

#[tokio::test]
async fn graphql_owners_administer_users_with_the_same_rules() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let t = Some(owner.token.as_str());

    let add =
        "mutation($i: AddUserInput!) { addUser(input: $i) { username role disabled createdAt } }";
    let r = app
        .gql(
            t,
            add,
            json!({"i": {"username": "gina", "password": PASSWORD, "role": "READER"}}),
        )
        .await;
    let added = &r.gql_data()["addUser"];
    assert_eq!(added["username"], "gina");
    assert_eq!(added["role"], "READER");
    let before = members(&app, "acme").await;
    let r = app
        .gql(
            t,
            add,
            json!({"i": {"username": "gina", "password": NEW_PASSWORD, "role": "OWNER"}}),
        )
        .await;
    assert_eq!(r.gql_error_code(), "ALREADY_EXISTS");
    assert_eq!(login_status(&app, "gina", PASSWORD).await, 200);
    let r = app
        .gql(
            t,
            add,
            json!({"i": {"username": "bad name", "password": PASSWORD, "role": "READER"}}),
        )
        .await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    assert_eq!(members(&app, "acme").await, before);

    let r = app.gql(t, "{ users { username role } }", json!({})).await;
    assert_eq!(
        r.gql_data()["users"],
        json!([{"username": owner.username, "role": "OWNER"}, {"username": "gina", "role": "READER"}])
    );

    let update = "mutation($u: String!, $i: UpdateUserInput!) { updateUser(username: $u, input: $i) { role } }";
    let r = app
        .gql(t, update, json!({"u": "gina", "i": {"role": "WRITER"}}))
        .await;
    assert_eq!(r.gql_data()["updateUser"]["role"], "WRITER");
    let before = members(&app, "acme").await;
    let r = app.gql(t, update, json!({"u": "gina", "i": {}})).await;
    assert_eq!(r.gql_data()["updateUser"]["role"], "WRITER");
    let r = app
        .gql(t, update, json!({"u": "gina", "i": {"password": "short"}}))
        .await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    let outsider = app.user("elsewhere", Role::Writer).await;
    let r = app
        .gql(
            t,
            update,
            json!({"u": outsider.username, "i": {"role": "OWNER"}}),
        )
        .await;
    assert_eq!(r.gql_error_code(), "NOT_FOUND");
    assert_eq!(members(&app, "acme").await, before);
    assert_eq!(
        members(&app, "elsewhere").await,
        vec![(outsider.username.clone(), "writer".into())]
    );

    let gina = app.login("gina", PASSWORD).await;
    let change = "mutation($c: String!, $n: String!) { changePassword(currentPassword: $c, newPassword: $n) { accessToken tokenType } }";
    let r = app
        .gql(
            Some(&gina),
            change,
            json!({"c": "wrong password", "n": NEW_PASSWORD}),
        )
        .await;
    assert_eq!(r.gql_error_code(), "FORBIDDEN");
    assert_eq!(login_status(&app, "gina", PASSWORD).await, 200);
    let r = app
        .gql(
            Some(&gina),
            change,
            json!({"c": PASSWORD, "n": NEW_PASSWORD}),
        )
        .await;
    let fresh = r.gql_data()["changePassword"]["accessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(app.get("/api/objects", Some(&gina)).await.status, 401);
    assert_eq!(app.get("/api/objects", Some(&fresh)).await.status, 200);

    let r = app
        .gql(t, "mutation { removeUser(username: \"gina\") }", json!({}))
        .await;
    assert_eq!(r.gql_data()["removeUser"], true);
    assert_eq!(app.get("/api/objects", Some(&fresh)).await.status, 401);
    assert_eq!(
        members(&app, "acme").await,
        vec![(owner.username.clone(), "owner".into())]
    );
}

#[tokio::test]
async fn a_tenant_at_its_user_limit_gets_403_quota_exceeded_and_no_user() {
    let app = TestApp::spawn_with(|c| c.max_users_per_tenant = 2).await;
    let owner = app.user("acme", Role::Owner).await;
    let t = Some(owner.token.as_str());
    let add = |name: &str| json!({"username": name, "password": PASSWORD, "role": "reader"});
    assert_eq!(app.post("/api/users", t, &add("second")).await.status, 201);
    let before = members(&app, "acme").await;

    let refused = app.post("/api/users", t, &add("third")).await;
    refused.assert_error(403, "QUOTA_EXCEEDED");
    refused.assert_mentions("KVQL_MAX_USERS_PER_TENANT is 2");
    let gql = app
        .gql(
            t,
            "mutation { addUser(input: {username: \"third\", password: \"a long password\", role: READER}) { username } }",
            json!({}),
        )
        .await;
    assert_eq!(gql.gql_error_code(), "QUOTA_EXCEEDED");
    assert_eq!(members(&app, "acme").await, before);
    assert_eq!(login_status(&app, "third", PASSWORD).await, 401);

    // Removing one makes room.
    assert_eq!(app.delete("/api/users/second", t).await.status, 204);
    assert_eq!(app.post("/api/users", t, &add("third")).await.status, 201);
}
