//! Time-to-live: exact expiry, re-creation, the sweeper.

use std::time::Duration;

use serde_json::json;

use crate::support::{TestApp, object_path};

#[tokio::test]
async fn a_value_expires_exactly_when_its_ttl_runs_out() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    assert_eq!(
        app.create(&u, "t", json!("soon gone"), Some(2))
            .await
            .status,
        201
    );
    assert_eq!(app.read(&u, "t").await.body["ttl"], 2);

    app.clock.advance(Duration::from_millis(1001));
    let r = app.read(&u, "t").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["ttl"], 1, "seconds left round up");

    app.clock.advance(Duration::from_millis(998));
    assert_eq!(app.read(&u, "t").await.status, 200, "1 ms before expiry");

    app.clock.advance(Duration::from_millis(1));
    app.read(&u, "t").await.assert_error(404, "NOT_FOUND");
}

#[tokio::test]
async fn an_expired_key_can_be_created_again() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "t", json!("old"), Some(1)).await;
    app.clock.advance(Duration::from_secs(1));
    let r = app.create(&u, "t", json!("new"), None).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        r.body["version"], 2,
        "the expired value's version is not reused"
    );
    let read = app.read(&u, "t").await;
    assert_eq!(read.body["data"], "new");
    assert_eq!(read.body["ttl"], json!(null));
    assert_eq!(read.body["created_at"], r.body["created_at"]);
}

#[tokio::test]
async fn an_unconditional_put_over_an_expired_key_creates_it() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "t", json!("old"), Some(1)).await;
    app.put(&object_path("t"), Some(&u.token), &json!({"data": "x"}))
        .await;
    app.put(
        &object_path("t"),
        Some(&u.token),
        &json!({"data": "y", "ttl": 1}),
    )
    .await;
    app.clock.advance(Duration::from_secs(1));
    let r = app
        .put(&object_path("t"), Some(&u.token), &json!({"data": "new"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        r.body["version"], 4,
        "the expired value's versions are not reused"
    );
}

#[tokio::test]
async fn an_expired_value_cannot_be_deleted_or_updated_conditionally() {
    // No sweeping during this test: the expired row must still be stored.
    let app = TestApp::spawn_with(|c| c.sweep_interval = Duration::from_secs(3600)).await;
    let u = app.writer().await;
    app.create(&u, "t", json!("old"), Some(1)).await;
    app.clock.advance(Duration::from_secs(5));
    let before = app.snapshot().await;
    assert_eq!(before.len(), 1, "the expired row is still stored");

    app.delete(&object_path("t"), Some(&u.token))
        .await
        .assert_error(404, "NOT_FOUND");
    for tag in ["\"1\"", "*"] {
        app.send(
            app.request(reqwest::Method::PUT, &object_path("t"), Some(&u.token))
                .header("If-Match", tag)
                .json(&json!({"data": "revived"})),
        )
        .await
        .assert_error(404, "NOT_FOUND");
    }
    assert_eq!(app.snapshot().await, before);
    let list = app.get("/api/objects", Some(&u.token)).await;
    assert_eq!(list.body["items"], json!([]));
}

#[tokio::test]
async fn the_sweeper_removes_expired_rows_and_keeps_live_ones() {
    let app = TestApp::spawn_with(|c| c.sweep_batch = 7).await;
    let u = app.writer().await;
    let items: Vec<_> = (0..30)
        .map(|i| json!({"key": format!("short-{i}"), "data": i, "ttl": 1}))
        .collect();
    app.post("/api/batch/object", Some(&u.token), &json!(items))
        .await;
    app.create(&u, "long", json!("stays"), Some(3600)).await;
    app.create(&u, "forever", json!("stays"), None).await;
    app.sweeps(2).await;
    assert_eq!(app.row_count().await, 32, "nothing has expired yet");

    app.clock.advance(Duration::from_secs(1));
    app.sweeps(2).await;
    let rows = app.snapshot().await;
    let keys: Vec<&str> = rows.iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["forever", "long"]);
}

#[tokio::test]
async fn ttl_out_of_range_is_refused_with_400_naming_the_field() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for ttl in [
        json!(0),
        json!(-1),
        json!(315_360_001),
        json!(1.5),
        json!("10"),
    ] {
        let r = app
            .post(
                "/api/object",
                Some(&u.token),
                &json!({"key": "k", "data": 1, "ttl": ttl}),
            )
            .await;
        r.assert_error(400, "INVALID_INPUT");
        assert!(
            r.text.contains("ttl"),
            "message names the field: {}",
            r.text
        );
        let r = app
            .put(
                &object_path("k"),
                Some(&u.token),
                &json!({"data": 1, "ttl": ttl}),
            )
            .await;
        r.assert_error(400, "INVALID_INPUT");
    }
    assert_eq!(app.row_count().await, 0);
    let max = app.create(&u, "k", json!(1), Some(315_360_000)).await;
    assert_eq!(max.status, 201);
}

/// The expiry index holds only rows that expire: an upsert assigns
/// `expires_at` every time, and SQLite rewrites the entry of an assigned
/// column even when it stays NULL, which doubled the pages a PUT changed.
#[tokio::test]
async fn the_expiry_index_holds_only_rows_that_expire_and_serves_the_sweeper() {
    use migration::{Migrator, MigratorTrait};
    use sea_orm::{ConnectionTrait, DatabaseBackend, Statement, TransactionTrait};

    let (_db, conn) = crate::support::TestDb::migrated_to(9).await;
    let backend = conn.get_database_backend();
    let json = if backend == DatabaseBackend::Postgres {
        "::jsonb"
    } else {
        ""
    };
    conn.execute_unprepared(&format!(
        r#"INSERT INTO tenant (id, name, created_at) VALUES (7, 'old', 0);
           INSERT INTO object (tenant_id, "key", data, size, version, expires_at, created_at, updated_at)
           VALUES (7, 'gone', '1'{json}, 5, 1, 5, 0, 0),
                  (7, 'later', '2'{json}, 6, 1, 50, 0, 0),
                  (7, 'never', '3'{json}, 6, 1, NULL, 0, 0)"#
    ))
    .await
    .expect("rows written before the migration");
    Migrator::up(&conn, None).await.expect("the migration");

    let one = |sql: &str| {
        let conn = &conn;
        let stmt = Statement::from_string(backend, sql.to_owned());
        async move { conn.query_all_raw(stmt).await.expect("query") }
    };
    let definition_of = |index: &str| {
        if backend == DatabaseBackend::Postgres {
            format!("SELECT indexdef AS d FROM pg_indexes WHERE indexname = '{index}'")
        } else {
            format!("SELECT sql AS d FROM sqlite_master WHERE name = '{index}'")
        }
    };
    let rows = one(&definition_of("idx_object_expiry")).await;
    assert_eq!(rows.len(), 1, "the new index exists");
    let text: String = rows[0].try_get("", "d").expect("definition");
    assert!(
        text.contains("expires_at IS NOT NULL"),
        "a partial index: {text}"
    );
    assert!(
        one(&definition_of("idx_object_expires_at"))
            .await
            .is_empty(),
        "the full index is gone"
    );

    // The sweeper's probe, with its bound as a parameter, as the store sends it.
    let probe = "SELECT tenant_id FROM object
                 WHERE expires_at IS NOT NULL AND expires_at <= $1 ORDER BY expires_at LIMIT 10";
    let plan: Vec<String> = if backend == DatabaseBackend::Postgres {
        // Three rows: only with sequential scans off does the planner show
        // whether it can use the index at all.
        let txn = conn.begin().await.expect("begin");
        txn.execute_unprepared("SET LOCAL enable_seqscan = off")
            .await
            .expect("set");
        let rows = txn
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                format!("EXPLAIN {probe}"),
                [10i64.into()],
            ))
            .await
            .expect("explain");
        txn.rollback().await.expect("rollback");
        rows.iter()
            .map(|r| r.try_get::<String>("", "QUERY PLAN").expect("plan"))
            .collect()
    } else {
        conn.query_all_raw(Statement::from_sql_and_values(
            backend,
            format!("EXPLAIN QUERY PLAN {}", probe.replace("$1", "?")),
            [10i64.into()],
        ))
        .await
        .expect("explain")
        .iter()
        .map(|r| r.try_get::<String>("", "detail").expect("detail"))
        .collect()
    };
    assert!(
        plan.iter().any(|d| d.contains("idx_object_expiry")),
        "the sweeper's probe uses the partial index: {plan:?}"
    );
    let expired = one(
        r#"SELECT "key" FROM object WHERE expires_at IS NOT NULL AND expires_at <= 10
           ORDER BY expires_at"#,
    )
    .await;
    let keys: Vec<String> = expired
        .iter()
        .map(|r| r.try_get::<String>("", "key").expect("key"))
        .collect();
    assert_eq!(keys, ["gone"]);
    conn.close().await.ok();
}
