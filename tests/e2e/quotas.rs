//! Quotas: a tenant's live keys and their bytes, limited by the servers'
//! defaults (`KVQL_DEFAULT_MAX_KEYS`, `KVQL_DEFAULT_MAX_BYTES`) or its own
//! (`kvql tenant set-quota`); exact under concurrency and across nodes.

use std::time::Duration;

use api::auth::Role;
use api::store::quota::QuotaLimit;
use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::support::{PASSWORD, TestApp, User, object_path};

/// A writer of a new tenant `tenant` with its own limits, logged in after
/// they were set.
async fn limited(
    app: &TestApp,
    tenant: &str,
    max_keys: Option<QuotaLimit>,
    max_bytes: Option<QuotaLimit>,
) -> User {
    let u = app.user(tenant, Role::Writer).await;
    api::users::set_tenant_quota(app.node.state.db(), tenant, max_keys, max_bytes)
        .await
        .expect("set quota");
    let token = app.login(&u.username, PASSWORD).await;
    User { token, ..u }
}

/// `GET /api/usage`, asserted 200.
async fn usage(app: &TestApp, u: &User) -> Value {
    let r = app.get("/api/usage", Some(&u.token)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

/// The bytes a value counts for: its key's plus its compact JSON's.
fn size(key: &str, data: &Value) -> i64 {
    (key.len() + data.to_string().len()) as i64
}

#[tokio::test]
async fn usage_and_quota_are_the_same_over_rest_and_graphql() {
    let app = TestApp::spawn_with(|c| c.default_max_keys = Some(5)).await;
    let u = app.writer().await;
    let empty = usage(&app, &u).await;
    assert_eq!(
        empty,
        json!({"usage": {"keys": 0, "bytes": 0}, "quota": {"max_keys": 5, "max_bytes": null}})
    );
    let (a, b) = (json!({"name": "ünïcode"}), json!([1, 2, 3]));
    assert_eq!(app.create(&u, "a", a.clone(), None).await.status, 201);
    assert_eq!(app.create(&u, "bé", b.clone(), None).await.status, 201);
    let bytes = size("a", &a) + size("bé", &b);
    assert_eq!(
        usage(&app, &u).await,
        json!({"usage": {"keys": 2, "bytes": bytes}, "quota": {"max_keys": 5, "max_bytes": null}})
    );
    let r = app
        .gql(
            Some(&u.token),
            "{ me { usage { keys bytes } quota { maxKeys maxBytes } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        r.gql_data()["me"],
        json!({"usage": {"keys": "2", "bytes": bytes.to_string()},
               "quota": {"maxKeys": "5", "maxBytes": null}})
    );
    // Replacing a value counts its new size; deleting one gives it back.
    let r = app
        .put(&object_path("a"), Some(&u.token), &json!({"data": "x"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        app.delete(&object_path("bé"), Some(&u.token)).await.status,
        200
    );
    assert_eq!(
        usage(&app, &u).await["usage"],
        json!({"keys": 1, "bytes": size("a", &json!("x"))})
    );
    // Another tenant's usage is its own.
    let other = app.user("other", Role::Reader).await;
    assert_eq!(
        usage(&app, &other).await["usage"],
        json!({"keys": 0, "bytes": 0})
    );
}

#[tokio::test]
async fn a_create_beyond_max_keys_answers_403_quota_exceeded_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let u = limited(&app, "small", Some(QuotaLimit::Max(2)), None).await;
    assert_eq!(app.create(&u, "a", json!(1), None).await.status, 201);
    assert_eq!(app.create(&u, "b", json!(2), None).await.status, 201);
    let before = app.snapshot().await;
    let r = app.create(&u, "c", json!(3), None).await;
    r.assert_error(403, "QUOTA_EXCEEDED");
    r.assert_mentions("2 keys");
    let r = app
        .put(&object_path("c"), Some(&u.token), &json!({"data": 3}))
        .await;
    r.assert_error(403, "QUOTA_EXCEEDED");
    let r = app
        .gql(
            Some(&u.token),
            "mutation { createObject(input: {key: \"c\", data: 3}) { key } }",
            json!({}),
        )
        .await;
    assert_eq!(r.gql_error_code(), "QUOTA_EXCEEDED", "{}", r.text);
    assert_eq!(app.snapshot().await, before);
    assert_eq!(app.read(&u, "c").await.status, 404);
    // Replacing a value adds no key; freeing one makes room.
    let r = app
        .put(&object_path("a"), Some(&u.token), &json!({"data": 10}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        app.delete(&object_path("b"), Some(&u.token)).await.status,
        200
    );
    assert_eq!(app.create(&u, "c", json!(3), None).await.status, 201);
    assert_eq!(usage(&app, &u).await["usage"]["keys"], 2);
}

#[tokio::test]
async fn a_write_beyond_max_bytes_is_refused_and_the_old_value_stays() {
    let app = TestApp::spawn().await;
    let small = json!("0123456789");
    let max = size("k", &small) + 5;
    let u = limited(&app, "bytes", None, Some(QuotaLimit::Max(max as u64))).await;
    assert_eq!(app.create(&u, "k", small.clone(), None).await.status, 201);
    let before = app.snapshot().await;
    let r = app
        .put(
            &object_path("k"),
            Some(&u.token),
            &json!({"data": "0123456789012345"}),
        )
        .await;
    r.assert_error(403, "QUOTA_EXCEEDED");
    r.assert_mentions("bytes");
    assert_eq!(app.snapshot().await, before);
    assert_eq!(app.read(&u, "k").await.body["data"], small);
    // Up to the limit exactly is allowed.
    let fits = json!("012345678901234");
    assert_eq!(size("k", &fits), max);
    let r = app
        .put(&object_path("k"), Some(&u.token), &json!({"data": fits}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(usage(&app, &u).await["usage"]["bytes"], max);
}

#[tokio::test]
async fn a_per_item_batch_writes_the_items_that_fit_and_refuses_the_rest() {
    let app = TestApp::spawn().await;
    let u = limited(&app, "batchy", Some(QuotaLimit::Max(3)), None).await;
    assert_eq!(app.create(&u, "a", json!(0), None).await.status, 201);
    let r = app
        .post(
            "/api/batch/object",
            Some(&u.token),
            &json!([
                {"key": "b", "data": 1},
                {"key": "c", "data": 2},
                {"key": "d", "data": 3},
                {"key": "e", "data": 4}
            ]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let outcome: Vec<(u64, Option<&str>)> = r.body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|i| (i["status"].as_u64().expect("status"), i["code"].as_str()))
        .collect();
    assert_eq!(
        outcome,
        vec![
            (201, None),
            (201, None),
            (403, Some("QUOTA_EXCEEDED")),
            (403, Some("QUOTA_EXCEEDED"))
        ]
    );
    let keys: Vec<String> = app
        .snapshot()
        .await
        .iter()
        .map(|r| r["key"].as_str().expect("key").to_owned())
        .collect();
    assert_eq!(keys, ["a", "b", "c"]);
}

#[tokio::test]
async fn an_atomic_batch_beyond_the_quota_writes_nothing() {
    let app = TestApp::spawn().await;
    let u = limited(&app, "atomic", Some(QuotaLimit::Max(3)), None).await;
    assert_eq!(app.create(&u, "a", json!(0), None).await.status, 201);
    let before = app.snapshot().await;
    for method in [reqwest::Method::POST, reqwest::Method::PUT] {
        let body = json!([
            {"key": "b", "data": 1},
            {"key": "c", "data": 2},
            {"key": "d", "data": 3}
        ]);
        let r = app
            .send(
                app.request(
                    method.clone(),
                    "/api/batch/object?atomic=true",
                    Some(&u.token),
                )
                .json(&body),
            )
            .await;
        r.assert_error(403, "QUOTA_EXCEEDED");
        assert_eq!(app.snapshot().await, before, "{method}");
    }
    // Within the quota, the same kind of batch goes through whole.
    let r = app
        .post(
            "/api/batch/object?atomic=true",
            Some(&u.token),
            &json!([{"key": "b", "data": 1}, {"key": "c", "data": 2}]),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(app.row_count().await, 3);
}

#[tokio::test]
async fn expired_values_do_not_count_even_before_the_sweeper_removes_them() {
    let app = TestApp::spawn_with(|c| c.sweep_interval = Duration::from_secs(3600)).await;
    let u = limited(&app, "expiring", Some(QuotaLimit::Max(2)), None).await;
    assert_eq!(app.create(&u, "a", json!(1), Some(1)).await.status, 201);
    assert_eq!(app.create(&u, "b", json!(2), None).await.status, 201);
    app.clock.advance(Duration::from_secs(2));
    assert_eq!(usage(&app, &u).await["usage"]["keys"], 1);
    assert_eq!(app.row_count().await, 2, "the sweeper has not run");
    let r = app.create(&u, "c", json!(3), None).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        app.row_count().await,
        2,
        "the write removed the expired value"
    );
    assert_eq!(usage(&app, &u).await["usage"]["keys"], 2);
    // The feed has the expiry, before the write that needed its room.
    let r = app.get("/api/changes", Some(&u.token)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let changes: Vec<(String, String)> = r.body["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().unwrap().to_owned(),
                c["key"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let pairs: Vec<(&str, &str)> = changes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [("PUT", "a"), ("PUT", "b"), ("EXPIRE", "a"), ("PUT", "c")]
    );
}

#[tokio::test]
async fn a_tenant_over_a_lowered_limit_may_shrink_but_not_grow() {
    let app = TestApp::spawn().await;
    let u = app.user("lowered", Role::Writer).await;
    for k in ["a", "b", "c"] {
        assert_eq!(
            app.create(&u, k, json!("0123456789"), None).await.status,
            201
        );
    }
    let u = limited(
        &app,
        "lowered",
        Some(QuotaLimit::Max(1)),
        Some(QuotaLimit::Max(10)),
    )
    .await;
    let r = app
        .put(
            &object_path("a"),
            Some(&u.token),
            &json!({"data": "01234567890"}),
        )
        .await;
    r.assert_error(403, "QUOTA_EXCEEDED");
    let r = app
        .put(&object_path("a"), Some(&u.token), &json!({"data": "0"}))
        .await;
    assert_eq!(r.status, 200, "a smaller value: {}", r.text);
    assert_eq!(
        app.delete(&object_path("b"), Some(&u.token)).await.status,
        200
    );
    app.create(&u, "d", json!(1), None)
        .await
        .assert_error(403, "QUOTA_EXCEEDED");
    // `none` lifts a limit, `default` goes back to the servers' (none here).
    let u = limited(
        &app,
        "lowered",
        Some(QuotaLimit::Unlimited),
        Some(QuotaLimit::Default),
    )
    .await;
    assert_eq!(app.create(&u, "d", json!(1), None).await.status, 201);
    assert_eq!(
        usage(&app, &u).await["quota"],
        json!({"max_keys": null, "max_bytes": null})
    );
}

#[tokio::test]
async fn a_tenants_own_limit_overrides_the_servers_default() {
    let app = TestApp::spawn_with(|c| c.default_max_keys = Some(1)).await;
    let plain = app.user("plain", Role::Writer).await;
    assert_eq!(app.create(&plain, "a", json!(1), None).await.status, 201);
    app.create(&plain, "b", json!(1), None)
        .await
        .assert_error(403, "QUOTA_EXCEEDED");
    let big = limited(&app, "big", Some(QuotaLimit::Max(3)), None).await;
    for k in ["a", "b", "c"] {
        assert_eq!(app.create(&big, k, json!(1), None).await.status, 201);
    }
    let free = limited(&app, "free", Some(QuotaLimit::Unlimited), None).await;
    for k in ["a", "b", "c", "d"] {
        assert_eq!(app.create(&free, k, json!(1), None).await.status, 201);
    }
}

/// `writers` concurrent creates of distinct keys of equal size, spread over
/// `bases`; the statuses seen.
async fn race(app: &TestApp, bases: &[String], u: &User, writers: usize) -> Vec<u16> {
    let tasks = (0..writers).map(|i| {
        let url = format!("{}/api/object", bases[i % bases.len()]);
        let (client, token) = (app.client.clone(), u.token.clone());
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"key": format!("k{i:03}"), "data": i % 10}))
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        })
    });
    join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect()
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_writers_fill_max_keys_exactly() {
    let app = TestApp::spawn_with(|c| c.database.database_max_connections = 16).await;
    let u = limited(&app, "racing", Some(QuotaLimit::Max(10)), None).await;
    let statuses = race(&app, std::slice::from_ref(&app.node.base), &u, 64).await;
    assert_eq!(count(&statuses, 201), 10, "{statuses:?}");
    assert_eq!(count(&statuses, 403), 54, "{statuses:?}");
    assert_eq!(app.row_count().await, 10);
    assert_eq!(usage(&app, &u).await["usage"]["keys"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_writers_fill_max_bytes_exactly() {
    let app = TestApp::spawn_with(|c| c.database.database_max_connections = 16).await;
    let each = size("k000", &json!(0));
    let u = limited(&app, "racing", None, Some(QuotaLimit::Max(7 * each as u64))).await;
    let statuses = race(&app, std::slice::from_ref(&app.node.base), &u, 64).await;
    assert_eq!(count(&statuses, 201), 7, "{statuses:?}");
    assert_eq!(app.row_count().await, 7);
    assert_eq!(usage(&app, &u).await["usage"]["bytes"], 7 * each);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(kvql_test_postgres),
    ignore = "several nodes need PostgreSQL: set KVQL_TEST_DATABASE_URL"
)]
async fn two_nodes_enforce_one_quota_exactly() {
    let app = TestApp::spawn_with(|c| c.database.database_max_connections = 16).await;
    assert!(app.node.state.db().is_postgres());
    let b = app.second_node().await;
    let u = limited(&app, "shared", Some(QuotaLimit::Max(10)), None).await;
    let statuses = race(&app, &[app.node.base.clone(), b.base.clone()], &u, 64).await;
    assert_eq!(count(&statuses, 201), 10, "{statuses:?}");
    assert_eq!(count(&statuses, 403), 54, "{statuses:?}");
    assert_eq!(app.row_count().await, 10);
    let on_b = app
        .send(
            app.client
                .get(format!("{}/api/usage", b.base))
                .bearer_auth(&u.token),
        )
        .await;
    assert_eq!(on_b.body["usage"]["keys"], 10, "{}", on_b.text);
}

#[tokio::test]
async fn usage_follows_every_kind_of_write_for_a_tenant_without_limits() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let mut expected: std::collections::BTreeMap<String, Value> = Default::default();
    let items: Vec<Value> = (0..40)
        .map(|i| json!({"key": format!("k{i:02}"), "data": {"n": i, "s": "x".repeat(i)}}))
        .collect();
    let r = app
        .post("/api/batch/object", Some(&u.token), &json!(items))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    for item in &items {
        expected.insert(item["key"].as_str().unwrap().into(), item["data"].clone());
    }
    // Puts replacing half and creating ten more, in one batch and alone.
    let puts: Vec<Value> = (20..50)
        .map(|i| json!({"key": format!("k{i:02}"), "data": [i, "ü".repeat(i % 7)]}))
        .collect();
    let r = app
        .put("/api/batch/object", Some(&u.token), &json!(puts))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for item in &puts {
        expected.insert(item["key"].as_str().unwrap().into(), item["data"].clone());
    }
    let r = app
        .put(&object_path("k03"), Some(&u.token), &json!({"data": null}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    expected.insert("k03".into(), Value::Null);
    let r = app
        .post(
            "/api/batch/delete",
            Some(&u.token),
            &json!(["k00", "k01", "k45", "missing"]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for k in ["k00", "k01", "k45"] {
        expected.remove(k);
    }
    // A value that expires stops counting, swept or not.
    assert_eq!(
        app.create(&u, "brief", json!("soon gone"), Some(1))
            .await
            .status,
        201
    );
    app.clock.advance(Duration::from_secs(2));
    let bytes: i64 = expected.iter().map(|(k, v)| size(k, v)).sum();
    let want = json!({"keys": expected.len(), "bytes": bytes});
    assert_eq!(usage(&app, &u).await["usage"], want);
    app.sweeps(2).await;
    assert_eq!(app.row_count().await, expected.len());
    assert_eq!(usage(&app, &u).await["usage"], want);
}

#[tokio::test]
async fn the_quota_migration_counts_what_tenants_already_store() {
    use migration::{Migrator, MigratorTrait};
    use sea_orm::ConnectionTrait;

    let (_db, conn) = crate::support::TestDb::migrated_to(8).await;
    let json = if conn.get_database_backend() == sea_orm::DatabaseBackend::Postgres {
        "::jsonb"
    } else {
        ""
    };
    conn.execute_unprepared(&format!(
        r#"INSERT INTO tenant (id, name, created_at) VALUES (7, 'old', 0), (8, 'empty', 0);
           INSERT INTO object (tenant_id, "key", data, version, expires_at, created_at, updated_at)
           VALUES (7, 'a', '"hello"'{json}, 1, NULL, 0, 0),
                  (7, 'bé', '12345'{json}, 1, NULL, 0, 0),
                  (7, 'c', 'true'{json}, 1, 1, 0, 0)"#
    ))
    .await
    .expect("rows of an older kvql");
    Migrator::up(&conn, None)
        .await
        .expect("the quota migration");
    let counted = |name: &str| {
        let conn = &conn;
        let sql = format!("SELECT used_keys, used_bytes FROM tenant WHERE name = '{name}'");
        async move {
            let row = conn
                .query_one_raw(sea_orm::Statement::from_string(
                    conn.get_database_backend(),
                    sql,
                ))
                .await
                .expect("query")
                .expect("tenant");
            (
                row.try_get::<i64>("", "used_keys").expect("keys"),
                row.try_get::<i64>("", "used_bytes").expect("bytes"),
            )
        }
    };
    // Every row counts, the expired one too until it is swept.
    let bytes = size("a", &json!("hello")) + size("bé", &json!(12345)) + size("c", &json!(true));
    assert_eq!(counted("old").await, (3, bytes));
    assert_eq!(counted("empty").await, (0, 0));
    conn.execute_unprepared(r#"DELETE FROM object WHERE "key" = 'c'"#)
        .await
        .expect("delete");
    assert_eq!(counted("old").await.0, 2, "the triggers keep counting");
    conn.close().await.ok();
}
