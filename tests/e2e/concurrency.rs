//! Concurrent writers: exactly one create wins, no conditional update is lost.

use futures_util::future::join_all;
use serde_json::json;

use crate::support::{TestApp, object_path};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_creates_of_one_key_give_exactly_one_201() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let attempts = (0..64).map(|i| app.create(&u, "contended", json!(i), None));
    let results = join_all(attempts).await;
    let created: Vec<_> = results.iter().filter(|r| r.status == 201).collect();
    let conflicts = results.iter().filter(|r| r.status == 409).count();
    assert_eq!(
        created.len(),
        1,
        "statuses: {:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(conflicts, 63);
    for r in results.iter().filter(|r| r.status == 409) {
        r.assert_error(409, "ALREADY_EXISTS");
    }
    let read = app.read(&u, "contended").await;
    assert_eq!(read.body["version"], 1);
    assert_eq!(app.row_count().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_if_match_increments_lose_nothing() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "counter", json!(0), None).await;
    const WORKERS: usize = 8;
    const EACH: usize = 10;
    let worker = || async {
        let mut conflicts = 0;
        for _ in 0..EACH {
            loop {
                let read = app.read(&u, "counter").await;
                let etag = read.header("etag").unwrap().to_owned();
                let n = read.body["data"].as_i64().unwrap();
                let r = app
                    .send(
                        app.request(
                            reqwest::Method::PUT,
                            &object_path("counter"),
                            Some(&u.token),
                        )
                        .header("If-Match", etag)
                        .json(&json!({"data": n + 1})),
                    )
                    .await;
                match r.status {
                    200 => break,
                    412 => {
                        r.assert_error(412, "VERSION_MISMATCH");
                        conflicts += 1;
                    }
                    other => panic!("unexpected {other}: {}", r.text),
                }
            }
        }
        conflicts
    };
    let conflicts: usize = join_all((0..WORKERS).map(|_| worker()))
        .await
        .into_iter()
        .sum();
    let read = app.read(&u, "counter").await;
    assert_eq!(read.body["data"], WORKERS * EACH);
    assert_eq!(read.body["version"], WORKERS * EACH + 1);
    // Not a requirement, but if no attempt ever conflicted the test proved little.
    println!("{conflicts} conflicting attempts were retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_unconditional_puts_each_bump_the_version_once() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let path = object_path("hot");
    let bodies: Vec<_> = (0..32).map(|i| json!({"data": i})).collect();
    let puts = bodies.iter().map(|b| app.put(&path, Some(&u.token), b));
    let results = join_all(puts).await;
    assert_eq!(results.iter().filter(|r| r.status == 201).count(), 1);
    assert_eq!(results.iter().filter(|r| r.status == 200).count(), 31);
    let mut versions: Vec<i64> = results
        .iter()
        .map(|r| r.body["version"].as_i64().unwrap())
        .collect();
    versions.sort();
    assert_eq!(versions, (1..=32).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_over_the_same_keys_in_opposite_orders_all_succeed() {
    let app = with_concurrent_groups().await;
    let u = app.writer().await;
    const KEYS: usize = 150;
    const ROUNDS: usize = 4;
    let forward: Vec<String> = (0..KEYS).map(|i| format!("shared-{i:03}")).collect();
    let backward: Vec<String> = forward.iter().rev().cloned().collect();
    let put =
        "mutation($items: [PutObjectInput!]!) { batchPut(items: $items) { succeeded failed } }";
    let putter = |keys: &Vec<String>, tag: &'static str| {
        let items: Vec<_> = keys
            .iter()
            .map(|k| json!({"key": k, "data": tag}))
            .collect();
        let (app, u) = (&app, &u);
        async move {
            for _ in 0..ROUNDS {
                let r = app
                    .gql(Some(&u.token), put, json!({ "items": items }))
                    .await;
                assert_eq!(
                    r.gql_data()["batchPut"],
                    json!({"succeeded": KEYS, "failed": 0}),
                    "{}",
                    r.text
                );
            }
        }
    };
    futures_util::join!(putter(&forward, "forward"), putter(&backward, "backward"));
    for key in [&forward[0], &forward[KEYS - 1]] {
        assert_eq!(app.read(&u, key).await.body["version"], 2 * ROUNDS);
    }

    let delete =
        "mutation($keys: [String!]!) { batchDelete(keys: $keys) { results { key ok code } } }";
    let deleter = |keys: &Vec<String>| {
        let (app, u) = (&app, &u);
        let keys = keys.clone();
        async move {
            let r = app
                .gql(Some(&u.token), delete, json!({ "keys": keys }))
                .await;
            r.gql_data()["batchDelete"]["results"]
                .as_array()
                .expect("results")
                .clone()
        }
    };
    let (a, b) = futures_util::join!(deleter(&forward), deleter(&backward));
    for key in &forward {
        let outcomes: Vec<_> = a
            .iter()
            .chain(b.iter())
            .filter(|r| r["key"] == json!(key))
            .collect();
        assert_eq!(outcomes.len(), 2);
        let deleted = outcomes.iter().filter(|r| r["ok"] == json!(true)).count();
        assert_eq!(
            deleted, 1,
            "{key} deleted by exactly one batch: {outcomes:?}"
        );
        assert!(
            outcomes
                .iter()
                .any(|r| r["ok"] == json!(false) && r["code"] == "NOT_FOUND")
        );
    }
    assert_eq!(app.row_count().await, 0);
}

/// Concurrent writes share group transactions (group commit, on both
/// backends); one writer's failure must not touch another's write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_fail_independently_and_every_success_is_stored() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for i in 0..16 {
        app.create(&u, &format!("exists-{i:02}"), json!("old"), None)
            .await;
    }
    let before = app.snapshot().await;

    let new: Vec<String> = (0..32).map(|i| format!("new-{i:02}")).collect();
    let existing: Vec<String> = (0..16).map(|i| format!("exists-{i:02}")).collect();
    let absent: Vec<String> = (0..16)
        .map(|i| object_path(&format!("missing-{i:02}")))
        .collect();
    let creates = new
        .iter()
        .enumerate()
        .map(|(i, k)| app.create(&u, k, json!(i), None));
    let conflicts = existing
        .iter()
        .map(|k| app.create(&u, k, json!("lost"), None));
    let stale = existing.iter().map(|k| {
        app.send(
            app.request(reqwest::Method::PUT, &object_path(k), Some(&u.token))
                .header("If-Match", "\"99\"")
                .json(&json!({"data": "lost"})),
        )
    });
    let missing = absent.iter().map(|p| app.delete(p, Some(&u.token)));
    let (creates, conflicts, stale, missing) = futures_util::join!(
        join_all(creates),
        join_all(conflicts),
        join_all(stale),
        join_all(missing)
    );
    for r in &creates {
        assert_eq!(r.status, 201, "{}", r.text);
    }
    for r in &conflicts {
        r.assert_error(409, "ALREADY_EXISTS");
    }
    for r in &stale {
        r.assert_error(412, "VERSION_MISMATCH");
    }
    for r in &missing {
        r.assert_error(404, "NOT_FOUND");
    }

    let after = app.snapshot().await;
    assert_eq!(after.len(), 48);
    for old in &before {
        assert!(after.contains(old), "{old} changed");
    }
    for i in 0..32 {
        let read = app.read(&u, &format!("new-{i:02}")).await;
        assert_eq!(read.body["data"], i, "{}", read.text);
        assert_eq!(read.body["version"], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_atomic_batches_are_each_all_or_nothing() {
    let app = with_concurrent_groups().await;
    let u = app.writer().await;
    app.create(&u, "taken", json!("original"), None).await;
    let batch = |i: usize| {
        let mut items: Vec<_> = (0..4)
            .map(|j| json!({"key": format!("b{i:02}-{j}"), "data": j}))
            .collect();
        if i % 2 == 1 {
            items.insert(2, json!({"key": "taken", "data": "lost"}));
        }
        let (app, u) = (&app, &u);
        async move {
            app.post(
                "/api/batch/object?atomic=true",
                Some(&u.token),
                &json!(items),
            )
            .await
        }
    };
    let single: Vec<String> = (0..16).map(|i| format!("single-{i:02}")).collect();
    let singles = single
        .iter()
        .enumerate()
        .map(|(i, k)| app.create(&u, k, json!(i), None));
    let (batches, singles) = futures_util::join!(join_all((0..16).map(batch)), join_all(singles));
    for (i, r) in batches.iter().enumerate() {
        if i % 2 == 1 {
            r.assert_error(409, "ALREADY_EXISTS");
            assert_eq!(r.body["index"], 2, "{}", r.text);
            assert_eq!(r.body["key"], "taken");
        } else {
            assert_eq!(r.status, 201, "{}", r.text);
            assert_eq!(r.body["succeeded"], 4);
        }
    }
    for r in &singles {
        assert_eq!(r.status, 201, "{}", r.text);
    }
    for i in 0..16 {
        for j in 0..4 {
            let read = app.read(&u, &format!("b{i:02}-{j}")).await;
            if i % 2 == 1 {
                read.assert_error(404, "NOT_FOUND");
            } else {
                assert_eq!(read.body["data"], j, "{}", read.text);
            }
        }
    }
    assert_eq!(app.read(&u, "taken").await.body["data"], "original");
    assert_eq!(app.row_count().await, 1 + 8 * 4 + 16);
}

/// Single writes, per-item batches and atomic batches over the same keys in
/// opposite orders, all at once: on PostgreSQL concurrent groups must lock
/// rows in one order (or be retried), and no write may be lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_writers_over_the_same_keys_in_opposite_orders_lose_nothing() {
    let app = with_concurrent_groups().await;
    let u = app.writer().await;
    const KEYS: usize = 40;
    let forward: Vec<String> = (0..KEYS).map(|i| format!("k-{i:02}")).collect();
    let backward: Vec<String> = forward.iter().rev().cloned().collect();
    let batch = |keys: &Vec<String>, atomic: bool| {
        let items: Vec<_> = keys.iter().map(|k| json!({"key": k, "data": 1})).collect();
        let (app, u) = (&app, &u);
        let path = if atomic {
            "/api/batch/object?atomic=true"
        } else {
            "/api/batch/object"
        };
        async move {
            let r = app
                .send(
                    app.request(reqwest::Method::PUT, path, Some(&u.token))
                        .json(&json!(items)),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
        }
    };
    let singles = forward.iter().chain(backward.iter()).map(|k| {
        let (app, u) = (&app, &u);
        async move {
            let r = app
                .put(&object_path(k), Some(&u.token), &json!({"data": 1}))
                .await;
            assert!(r.status == 200 || r.status == 201, "{}", r.text);
        }
    });
    futures_util::join!(
        batch(&forward, false),
        batch(&backward, false),
        batch(&forward, true),
        batch(&backward, true),
        join_all(singles)
    );
    // Every key was written by four batches and two single puts.
    for key in &forward {
        assert_eq!(app.read(&u, key).await.body["version"], 6, "{key}");
    }
}

/// With the read cache off every GET goes to the database (on SQLite, in
/// place on the request's thread or, with `in_place` off, through the reader
/// threads): a read that starts after a write was acknowledged sees that
/// write, also while other writers and readers run.
async fn cache_off_reads_see_acknowledged_writes(in_place: bool) {
    let app = TestApp::spawn_with(|c| {
        c.cache_bytes = 0;
        c.database.sqlite_reads_in_place = in_place;
    })
    .await;
    let u = app.writer().await;
    let (app, u) = (&app, &u);
    let writers = (0..8).map(|w| async move {
        let key = format!("rw/{w}");
        for n in 1..=25 {
            let put = app
                .put(
                    &object_path(&key),
                    Some(&u.token),
                    &json!({"data": {"n": n}}),
                )
                .await;
            assert!(put.status == 200 || put.status == 201, "{}", put.text);
            let read = app.read(u, &key).await;
            assert_eq!(read.status, 200, "{}", read.text);
            assert_eq!(
                read.body["version"], n,
                "{key}: the read saw an older write"
            );
            assert_eq!(read.body["data"], json!({"n": n}));
            app.read(u, &format!("rw/missing/{w}"))
                .await
                .assert_error(404, "NOT_FOUND");
        }
    });
    join_all(writers).await;
    let deleted = app.delete(&object_path("rw/0"), Some(&u.token)).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    app.read(u, "rw/0").await.assert_error(404, "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_cache_off_a_read_after_an_acknowledged_write_sees_it() {
    cache_off_reads_see_acknowledged_writes(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_cache_and_reads_in_place_off_a_read_after_an_acknowledged_write_sees_it() {
    cache_off_reads_see_acknowledged_writes(false).await;
}

/// A server whose groups of writes run concurrently on PostgreSQL (several
/// committers, where the default is one), so that they must lock rows in one
/// order; SQLite has one committer whatever the setting.
async fn with_concurrent_groups() -> TestApp {
    TestApp::spawn_with(|c| c.database.database_committers = 4).await
}
