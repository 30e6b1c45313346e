//! Revisions and the change feed: `/api/changes` (with long-poll),
//! `/api/watch` (Server-Sent Events), key history, and `objectEvents` resumed
//! with `afterRevision`.

use std::time::Duration;

use api::auth::Role;
use serde_json::{Value, json};

use crate::support::{TestApp, User, WsClient, object_path};

fn revision(v: &Value) -> i64 {
    v["revision"]
        .as_i64()
        .unwrap_or_else(|| panic!("no revision in {v}"))
}

/// `(revision, kind, key)` of each entry of a `changes` array.
fn summary(changes: &Value) -> Vec<(i64, String, String)> {
    changes
        .as_array()
        .expect("changes array")
        .iter()
        .map(|c| {
            (
                revision(c),
                c["kind"].as_str().unwrap().to_owned(),
                c["key"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn changes(app: &TestApp, u: &User, query: &str) -> crate::support::Resp {
    app.get(&format!("/api/changes?{query}"), Some(&u.token))
        .await
}

#[tokio::test]
async fn every_write_answers_with_a_revision_that_grows_in_commit_order() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let created = app.create(&u, "a", json!(1), None).await;
    assert_eq!(created.status, 201);
    let r1 = revision(&created.body);
    let put = app
        .put(&object_path("a"), Some(&u.token), &json!({"data": 2}))
        .await;
    let r2 = revision(&put.body);
    let read = app.read(&u, "a").await;
    assert_eq!(
        revision(&read.body),
        r2,
        "the object carries its last write's revision"
    );
    let batch = app
        .post(
            "/api/batch/object",
            Some(&u.token),
            &json!([{"key": "b", "data": 1}, {"key": "c", "data": 1}]),
        )
        .await;
    let (r3, r4) = (
        revision(&batch.body["results"][0]),
        revision(&batch.body["results"][1]),
    );
    let deleted = app.delete(&object_path("a"), Some(&u.token)).await;
    assert_eq!(deleted.status, 200);
    let r5 = revision(&deleted.body);
    let gql = app
        .gql(
            Some(&u.token),
            "mutation { putObject(input: {key: \"d\", data: 1}) { object { revision } } }",
            json!({}),
        )
        .await;
    let r6: i64 = gql.gql_data()["putObject"]["object"]["revision"]
        .as_str()
        .expect("revisions are strings in GraphQL")
        .parse()
        .unwrap();
    let all = [r1, r2, r3.max(r4), r5, r6];
    assert!(r1 >= 1);
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "revisions grow with each commit: {all:?}"
    );
    assert_ne!(r3, r4, "each change of a batch has its own revision");
}

#[tokio::test]
async fn revisions_are_per_tenant_and_a_feed_never_carries_another_tenants_change() {
    let app = TestApp::spawn().await;
    let a = app.user("tenant-a", Role::Writer).await;
    let b = app.user("tenant-b", Role::Writer).await;
    for i in 0..5 {
        app.create(&b, &format!("b{i}"), json!(i), None).await;
    }
    let first = app.create(&a, "mine", json!(1), None).await;
    assert_eq!(
        revision(&first.body),
        1,
        "another tenant's writes do not move this tenant's revisions"
    );
    let page = changes(&app, &a, "after=0").await;
    assert_eq!(page.status, 200, "{}", page.text);
    assert_eq!(
        summary(&page.body["changes"]),
        vec![(1, "PUT".into(), "mine".into())]
    );
    assert_eq!(page.body["last_revision"], 1);
}

#[tokio::test]
async fn changes_lists_puts_deletes_and_expiries_in_revision_order() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "k/1", json!({"n": 1}), None).await;
    app.create(&u, "k/2", json!("short-lived"), Some(1)).await;
    app.put(
        &object_path("k/1"),
        Some(&u.token),
        &json!({"data": {"n": 2}}),
    )
    .await;
    app.delete(&object_path("k/1"), Some(&u.token)).await;
    app.clock.advance(Duration::from_secs(2));
    app.sweeps(2).await;

    let page = changes(&app, &u, "after=0").await;
    assert_eq!(page.status, 200, "{}", page.text);
    let entries = page.body["changes"].as_array().unwrap();
    assert_eq!(
        summary(&page.body["changes"])
            .into_iter()
            .map(|(_, kind, key)| (kind, key))
            .collect::<Vec<_>>(),
        vec![
            ("PUT".into(), "k/1".into()),
            ("PUT".into(), "k/2".into()),
            ("PUT".into(), "k/1".into()),
            ("DELETE".into(), "k/1".into()),
            ("EXPIRE".into(), "k/2".into()),
        ]
    );
    assert_eq!(entries[0]["data"], json!({"n": 1}));
    assert_eq!(entries[0]["version"], 1);
    assert_eq!(entries[2]["data"], json!({"n": 2}));
    assert_eq!(entries[2]["version"], 2);
    assert_eq!(entries[3]["data"], Value::Null);
    assert_eq!(
        entries[3]["version"], 2,
        "a delete names the version deleted"
    );
    assert_eq!(entries[4]["version"], 1);
    let revisions: Vec<i64> = entries.iter().map(revision).collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
    assert_eq!(page.body["last_revision"], *revisions.last().unwrap());

    // Nothing after the last one.
    let rest = changes(&app, &u, &format!("after={}", revisions[4])).await;
    assert_eq!(rest.body["changes"], json!([]));
    assert_eq!(rest.body["last_revision"], revisions[4]);
}

#[tokio::test]
async fn changes_follow_one_key_or_a_prefix_and_refuse_both() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for key in ["a/1", "a/2", "b/1", "a"] {
        app.create(&u, key, json!(key), None).await;
    }
    let prefix = changes(&app, &u, "prefix=a%2F&after=0").await;
    let keys: Vec<String> = summary(&prefix.body["changes"])
        .into_iter()
        .map(|(_, _, k)| k)
        .collect();
    assert_eq!(keys, ["a/1", "a/2"]);
    assert_eq!(
        prefix.body["last_revision"], 4,
        "the whole log was read, so the next page starts at the latest revision"
    );
    let one = changes(&app, &u, "key=b%2F1&after=0").await;
    assert_eq!(
        summary(&one.body["changes"]),
        vec![(3, "PUT".into(), "b/1".into())]
    );
    let before = app.snapshot().await;
    let both = changes(&app, &u, "key=a&prefix=a").await;
    both.assert_error(400, "INVALID_INPUT");
    assert_eq!(both.body["field"], "key");
    for bad in [
        "after=-1",
        "after=x",
        "limit=0",
        "limit=1001",
        "limit=ten",
        "wait=61",
        "wait=-1",
        "wait=1.5",
    ] {
        let r = changes(&app, &u, bad).await;
        r.assert_error(400, "INVALID_INPUT");
        let field = bad.split('=').next().unwrap_or_default();
        assert_eq!(r.body["field"], field, "{bad}: {}", r.text);
    }
    let ahead = changes(&app, &u, "after=99").await;
    ahead.assert_error(400, "INVALID_INPUT");
    assert_eq!(ahead.body["field"], "after");
    app.get("/api/changes", None)
        .await
        .assert_error(401, "UNAUTHENTICATED");
    assert_eq!(
        app.snapshot().await,
        before,
        "reading the feed changes nothing"
    );
}

#[tokio::test]
async fn paging_with_last_revision_sees_every_change_exactly_once() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let mut written = Vec::new();
    for i in 0..25 {
        let r = app.create(&u, &format!("p{i:02}"), json!(i), None).await;
        written.push(revision(&r.body));
    }
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = changes(&app, &u, &format!("after={after}&limit=7")).await;
        assert_eq!(page.status, 200, "{}", page.text);
        let entries = summary(&page.body["changes"]);
        if entries.is_empty() {
            break;
        }
        assert!(entries.len() <= 7);
        seen.extend(entries.iter().map(|(r, _, _)| *r));
        after = page.body["last_revision"].as_i64().unwrap();
    }
    assert_eq!(seen, written);
}

#[tokio::test]
async fn a_long_poll_returns_when_a_write_lands() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let start = app.create(&u, "before", json!(0), None).await;
    let after = revision(&start.body);
    let url = app.url(&format!(
        "/api/changes?prefix=watched%2F&after={after}&wait=60"
    ));
    let poll = tokio::spawn(app.client.get(url).bearer_auth(&u.token).send());
    // A write elsewhere does not end the wait; one under the prefix does.
    app.create(&u, "elsewhere", json!(1), None).await;
    let landed = app.create(&u, "watched/x", json!({"hello": 1}), None).await;
    let resp = poll.await.unwrap().expect("long-poll answer");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        summary(&body["changes"]),
        vec![(revision(&landed.body), "PUT".into(), "watched/x".into())]
    );
    assert_eq!(body["changes"][0]["data"], json!({"hello": 1}));
}

#[tokio::test]
async fn a_long_poll_with_nothing_to_say_answers_an_empty_page_when_its_wait_ends() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let page = changes(&app, &u, "after=0&wait=1").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.body, json!({"changes": [], "last_revision": 0}));
}

#[tokio::test]
async fn a_revision_older_than_the_log_is_410_compacted_with_the_oldest_revision() {
    let app = TestApp::spawn_with(|c| c.changes_max_per_tenant = 3).await;
    let u = app.writer().await;
    for i in 0..6 {
        app.create(&u, &format!("c{i}"), json!(i), None).await;
    }
    app.sweeps(2).await;
    let before = app.snapshot().await;
    let gone = changes(&app, &u, "after=0").await;
    gone.assert_error(410, "COMPACTED");
    assert_eq!(gone.body["oldest_revision"], 3);
    assert_eq!(app.snapshot().await, before);
    // Without `after`: from the oldest change still held.
    let held = changes(&app, &u, "").await;
    assert_eq!(
        summary(&held.body["changes"])
            .iter()
            .map(|(r, _, _)| *r)
            .collect::<Vec<_>>(),
        [4, 5, 6]
    );
    let resumed = changes(&app, &u, "after=3").await;
    assert_eq!(resumed.body["changes"], held.body["changes"]);

    // The same over GraphQL, at subscribe time.
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", u.ws_auth()).await;
    ws.subscribe(
        "old",
        "subscription { objectEvents(afterRevision: \"1\") { revision } }",
        json!({}),
    )
    .await;
    let msg = ws.next().await;
    let error = &msg["payload"]["errors"][0];
    assert_eq!(error["extensions"]["code"], "COMPACTED", "{msg}");
    assert_eq!(error["extensions"]["oldestRevision"], "3");
    assert_eq!(ws.next().await["type"], "complete");
}

#[tokio::test]
async fn changes_older_than_the_retention_are_compacted() {
    let app = TestApp::spawn_with(|c| c.changes_retention = Duration::from_secs(60)).await;
    let u = app.writer().await;
    app.create(&u, "old", json!(1), None).await;
    app.clock.advance(Duration::from_secs(61));
    let young = app.create(&u, "young", json!(2), None).await;
    app.sweeps(2).await;
    let held = changes(&app, &u, "").await;
    assert_eq!(
        summary(&held.body["changes"]),
        vec![(revision(&young.body), "PUT".into(), "young".into())]
    );
    changes(&app, &u, "after=0")
        .await
        .assert_error(410, "COMPACTED");
}

#[tokio::test]
async fn history_lists_a_keys_changes_newest_first_over_rest_and_graphql() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "h/k", json!(1), None).await;
    app.create(&u, "h/other", json!(0), None).await;
    app.put(&object_path("h/k"), Some(&u.token), &json!({"data": 2}))
        .await;
    app.delete(&object_path("h/k"), Some(&u.token)).await;
    app.create(&u, "h/k", json!(3), None).await;

    let first = app
        .get("/api/object/h%2Fk/history?limit=2", Some(&u.token))
        .await;
    assert_eq!(first.status, 200, "{}", first.text);
    let kinds = |v: &Value| -> Vec<(String, Value)> {
        v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["kind"].as_str().unwrap().to_owned(), c["data"].clone()))
            .collect()
    };
    assert_eq!(
        kinds(&first.body),
        vec![("PUT".into(), json!(3)), ("DELETE".into(), Value::Null)]
    );
    let cursor = first.body["next_cursor"].as_str().expect("more").to_owned();
    let second = app
        .get(
            &format!("/api/object/h%2Fk/history?limit=2&cursor={cursor}"),
            Some(&u.token),
        )
        .await;
    assert_eq!(
        kinds(&second.body),
        vec![("PUT".into(), json!(2)), ("PUT".into(), json!(1))]
    );
    assert_eq!(second.body["next_cursor"], Value::Null);

    let gql = app
        .gql(
            Some(&u.token),
            "query($after: String) { objectHistory(key: \"h/k\", first: 3, after: $after) {
                edges { cursor node { kind version revision object { data } } }
                pageInfo { hasNextPage endCursor } } }",
            json!({}),
        )
        .await;
    let history = &gql.gql_data()["objectHistory"];
    let edges = history["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 3);
    assert_eq!(edges[0]["node"]["kind"], "PUT");
    assert_eq!(
        edges[0]["node"]["version"], "3",
        "versions continue after a delete"
    );
    assert_eq!(edges[0]["node"]["object"]["data"], json!(3));
    assert_eq!(edges[1]["node"]["kind"], "DELETE");
    assert_eq!(edges[1]["node"]["object"], Value::Null);
    assert_eq!(history["pageInfo"]["hasNextPage"], true);

    let none = app.get("/api/object/never/history", Some(&u.token)).await;
    assert_eq!(none.body, json!({"changes": [], "next_cursor": null}));
    let other = app.user("someone-else", Role::Writer).await;
    let theirs = app
        .get("/api/object/h%2Fk/history", Some(&other.token))
        .await;
    assert_eq!(
        theirs.body,
        json!({"changes": [], "next_cursor": null}),
        "another tenant's history is as empty as a key never written"
    );
    app.get("/api/object/h%2Fk/history?cursor=abc", Some(&u.token))
        .await
        .assert_error(400, "INVALID_INPUT");
}

/// A minimal Server-Sent Events reader.
pub(crate) struct Sse {
    resp: reqwest::Response,
    buf: String,
}

#[derive(Debug)]
pub(crate) struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

impl Sse {
    pub(crate) async fn open(
        app: &TestApp,
        u: &User,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Sse {
        let mut req = app
            .client
            .get(app.url(&format!("/api/watch?{query}")))
            .bearer_auth(&u.token);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req.send().await.expect("watch");
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Sse {
            resp,
            buf: String::new(),
        }
    }

    /// The next event (comments and heartbeats skipped), within 10 seconds.
    pub(crate) async fn next(&mut self) -> SseEvent {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    let (mut id, mut event, mut data) = (None, "message".to_owned(), None);
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            id = Some(v.trim().to_owned());
                        } else if let Some(v) = line.strip_prefix("event:") {
                            event = v.trim().to_owned();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data = Some(serde_json::from_str(v.trim()).expect("JSON data"));
                        }
                    }
                    if let Some(data) = data {
                        return SseEvent { id, event, data };
                    }
                    continue;
                }
                let chunk = self
                    .resp
                    .chunk()
                    .await
                    .expect("stream")
                    .expect("the stream stays open");
                self.buf.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await
        .expect("an event within 10 s")
    }
}

#[tokio::test]
async fn watch_streams_changes_and_resumes_from_last_event_id() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let first = app.create(&u, "s/1", json!(1), None).await;
    let mut sse = Sse::open(&app, &u, "prefix=s%2F&after=0", None).await;
    let e = sse.next().await;
    assert_eq!(
        e.id.as_deref(),
        Some(revision(&first.body).to_string().as_str())
    );
    assert_eq!(e.event, "PUT");
    assert_eq!(
        e.data,
        json!({"revision": revision(&first.body), "kind": "PUT", "key": "s/1", "version": 1, "data": 1})
    );
    // Live changes follow.
    app.create(&u, "other", json!(0), None).await;
    let second = app.create(&u, "s/2", json!(2), None).await;
    let e = sse.next().await;
    assert_eq!(e.data["key"], "s/2");
    assert_eq!(e.data["revision"], revision(&second.body));
    drop(sse);

    // Changes made while disconnected arrive after a reconnect with
    // Last-Event-ID, which wins over `after`.
    app.delete(&object_path("s/1"), Some(&u.token)).await;
    let third = app.create(&u, "s/3", json!(3), None).await;
    let last = revision(&second.body).to_string();
    let mut sse = Sse::open(&app, &u, "prefix=s%2F&after=0", Some(&last)).await;
    let e = sse.next().await;
    assert_eq!(
        (e.event.as_str(), e.data["key"].as_str()),
        ("DELETE", Some("s/1"))
    );
    let e = sse.next().await;
    assert_eq!(e.data["revision"], revision(&third.body));

    // Without `after`: from now on.
    let mut live = Sse::open(&app, &u, "key=s%2F4", None).await;
    let fourth = app.create(&u, "s/4", json!(4), None).await;
    let e = live.next().await;
    assert_eq!(e.data["revision"], revision(&fourth.body));
}

#[tokio::test]
async fn watch_refuses_bad_input_and_compacted_revisions_before_it_starts() {
    let app = TestApp::spawn_with(|c| c.changes_max_per_tenant = 1).await;
    let u = app.writer().await;
    for i in 0..3 {
        app.create(&u, &format!("w{i}"), json!(i), None).await;
    }
    app.sweeps(2).await;
    app.get("/api/watch?after=0", Some(&u.token))
        .await
        .assert_error(410, "COMPACTED");
    let bad_id = app
        .send(
            app.client
                .get(app.url("/api/watch"))
                .bearer_auth(&u.token)
                .header("Last-Event-ID", "not-a-revision"),
        )
        .await;
    bad_id.assert_error(400, "INVALID_INPUT");
    assert_eq!(bad_id.body["field"], "Last-Event-ID");
    // Not text: refused, not skipped as if absent (which would start live).
    let not_text = app
        .send(
            app.client
                .get(app.url("/api/watch"))
                .bearer_auth(&u.token)
                .header(
                    "Last-Event-ID",
                    reqwest::header::HeaderValue::from_bytes(b"3\xe9").expect("header"),
                ),
        )
        .await;
    not_text.assert_error(400, "INVALID_INPUT");
    assert_eq!(not_text.body["field"], "Last-Event-ID");
    app.get("/api/watch?key=a&prefix=a", Some(&u.token))
        .await
        .assert_error(400, "INVALID_INPUT");
    app.get("/api/watch", None)
        .await
        .assert_error(401, "UNAUTHENTICATED");
}

const EVENTS_AFTER: &str = "subscription($after: Revision, $prefix: String) {
    objectEvents(prefix: $prefix, afterRevision: $after) { kind key version revision object { data } } }";

#[tokio::test]
async fn a_subscription_with_after_revision_replays_then_goes_live_without_gap_or_repeat() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let mut written = Vec::new();
    for i in 0..3 {
        let r = app.create(&u, &format!("g/{i}"), json!(i), None).await;
        written.push(revision(&r.body));
    }
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", u.ws_auth()).await;
    ws.subscribe(
        "r",
        EVENTS_AFTER,
        json!({"after": written[0].to_string(), "prefix": "g/"}),
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let msg = ws.next().await;
        assert_eq!(msg["type"], "next", "{msg}");
        got.push(msg["payload"]["data"]["objectEvents"].clone());
    }
    // Live, once the replay is done.
    let live = app.create(&u, "g/3", json!(3), None).await;
    let msg = ws.next().await;
    got.push(msg["payload"]["data"]["objectEvents"].clone());
    let revisions: Vec<i64> = got
        .iter()
        .map(|e| e["revision"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        revisions,
        vec![written[1], written[2], revision(&live.body)]
    );
    assert_eq!(got[0]["object"]["data"], json!(1));
    assert!(
        ws.try_next(Duration::from_millis(300)).await.is_none(),
        "nothing is delivered twice"
    );
}

#[tokio::test]
async fn a_client_resumes_after_a_restart_of_the_node_it_talked_to() {
    let mut app = TestApp::spawn().await;
    let u = app.writer().await;
    let seen = app.create(&u, "n/1", json!(1), None).await;
    let after = revision(&seen.body);
    let missed = app.create(&u, "n/2", json!(2), None).await;
    app.restart().await;
    let page = changes(&app, &u, &format!("after={after}")).await;
    assert_eq!(page.status, 200, "{}", page.text);
    assert_eq!(
        summary(&page.body["changes"]),
        vec![(revision(&missed.body), "PUT".into(), "n/2".into())]
    );
}

#[tokio::test]
async fn a_version_taken_before_a_delete_never_matches_the_value_created_after_it() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let first = app.create(&u, "aba", json!("A"), None).await;
    assert_eq!(first.body["version"], 1, "a new key starts at 1");
    let etag = first.header("etag").unwrap().to_owned();
    assert_eq!(etag, "\"1\"");
    app.delete(&object_path("aba"), Some(&u.token)).await;
    let again = app.create(&u, "aba", json!("B"), None).await;
    assert_eq!(again.status, 201);
    assert_eq!(
        again.body["version"], 2,
        "the version continues after the delete"
    );

    let before = app.snapshot().await;
    let stale = app
        .send(
            app.client
                .put(app.url(&object_path("aba")))
                .bearer_auth(&u.token)
                .header("If-Match", &etag)
                .json(&json!({"data": "C"})),
        )
        .await;
    stale.assert_error(412, "VERSION_MISMATCH");
    let stale_delete = app
        .send(
            app.client
                .delete(app.url(&object_path("aba")))
                .bearer_auth(&u.token)
                .header("If-Match", &etag),
        )
        .await;
    stale_delete.assert_error(412, "VERSION_MISMATCH");
    let gql = app
        .gql(
            Some(&u.token),
            "mutation { putObject(input: {key: \"aba\", data: \"C\", expectedVersion: \"1\"}) { created } }",
            json!({}),
        )
        .await;
    assert_eq!(gql.gql_error_code(), "VERSION_MISMATCH");
    assert_eq!(app.snapshot().await, before, "nothing was written");
    assert_eq!(app.read(&u, "aba").await.body["data"], "B");
}

#[tokio::test]
async fn a_version_taken_before_an_expiry_never_matches_the_value_created_after_it() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    // Expired but not yet swept: the row is replaced.
    app.create(&u, "e1", json!(1), Some(1)).await;
    app.clock.advance(Duration::from_secs(2));
    let replaced = app
        .put(&object_path("e1"), Some(&u.token), &json!({"data": 2}))
        .await;
    assert_eq!(replaced.status, 201, "an expired value counts as absent");
    assert_eq!(replaced.body["version"], 2);
    // Expired and swept: the version continues from the log.
    app.create(&u, "e2", json!(1), Some(1)).await;
    app.clock.advance(Duration::from_secs(2));
    app.sweeps(2).await;
    assert_eq!(app.read(&u, "e2").await.status, 404);
    let created = app.create(&u, "e2", json!(2), None).await;
    assert_eq!(created.status, 201);
    assert_eq!(created.body["version"], 2);
}

#[tokio::test]
async fn after_compaction_a_recreated_key_starts_above_every_version_it_had() {
    let app = TestApp::spawn_with(|c| c.changes_max_per_tenant = 1).await;
    let u = app.writer().await;
    app.create(&u, "c", json!(1), None).await;
    for i in 0..3 {
        app.put(&object_path("c"), Some(&u.token), &json!({"data": i}))
            .await;
    }
    let deleted = app.delete(&object_path("c"), Some(&u.token)).await;
    app.create(&u, "filler", json!(0), None).await;
    app.sweeps(2).await;
    let history = app.get("/api/object/c/history", Some(&u.token)).await;
    assert_eq!(
        history.body["changes"],
        json!([]),
        "the key's history is gone"
    );
    let again = app.create(&u, "c", json!("new"), None).await;
    let version = again.body["version"].as_i64().unwrap();
    assert!(
        version > 4 && version <= revision(&again.body),
        "version {version} is above the 4 the key had (deleted at revision {})",
        revision(&deleted.body)
    );
}

/// `(revision, kind, key, version)` of a change, from `/api/changes` or from
/// an `objectEvents` event.
type Seen = (i64, String, String, i64);

fn seen_from_event(e: &Value) -> Seen {
    let num = |v: &Value| -> i64 {
        v.as_str()
            .map(|s| s.parse().unwrap())
            .or_else(|| v.as_i64())
            .unwrap()
    };
    (
        num(&e["revision"]),
        e["kind"].as_str().unwrap().to_owned(),
        e["key"].as_str().unwrap().to_owned(),
        num(&e["version"]),
    )
}

/// Every logged change under `prefix`, in revision order.
async fn committed(app: &TestApp, u: &User, prefix: &str) -> Vec<Seen> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = changes(app, u, &format!("prefix={prefix}&after={after}&limit=1000")).await;
        assert_eq!(page.status, 200, "{}", page.text);
        let entries = page.body["changes"].as_array().unwrap().clone();
        if entries.is_empty() {
            return all;
        }
        all.extend(entries.iter().map(seen_from_event));
        after = page.body["last_revision"].as_i64().unwrap();
    }
}

/// Concurrent writers through REST and GraphQL (on PostgreSQL through two
/// nodes) and a subscriber that disconnects at pseudo-random points and
/// resumes with `afterRevision` (on PostgreSQL alternating between the
/// nodes): what it collects is exactly the committed sequence of its prefix.
#[tokio::test]
async fn a_subscriber_that_keeps_reconnecting_collects_exactly_the_committed_sequence() {
    let app = TestApp::spawn().await;
    let other = if app.node.state.db().is_postgres() {
        Some(app.second_node().await)
    } else {
        None
    };
    let bases: Vec<String> = std::iter::once(app.node.base.clone())
        .chain(other.as_ref().map(|n| n.base.clone()))
        .collect();
    let u = app.writer().await;
    let start = app.create(&u, "start", json!(0), None).await;
    let from = revision(&start.body);

    let rest_writer = {
        let (client, base, token) = (app.client.clone(), bases[0].clone(), u.token.clone());
        tokio::spawn(async move {
            for i in 0..60 {
                let key = format!("p%2F{}", i % 7);
                let url = format!("{base}/api/object/{key}");
                let req = match i % 5 {
                    3 => client.delete(url),
                    _ => client.put(url).json(&json!({"data": i})),
                };
                req.bearer_auth(&token).send().await.expect("rest write");
                if i % 4 == 0 {
                    let url = format!("{base}/api/object/elsewhere");
                    client
                        .put(url)
                        .bearer_auth(&token)
                        .json(&json!({"data": i}))
                        .send()
                        .await
                        .expect("rest write");
                }
            }
        })
    };
    let gql_writer = {
        let (client, base, token) = (
            app.client.clone(),
            bases.last().unwrap().clone(),
            u.token.clone(),
        );
        tokio::spawn(async move {
            for i in 0..60 {
                let query = if i % 6 == 5 {
                    format!(
                        "mutation {{ batchDelete(keys: [\"p/g{}\"]) {{ succeeded }} }}",
                        i % 5
                    )
                } else {
                    format!(
                        "mutation {{ batchPut(items: [{{key: \"p/g{}\", data: {i}}}, {{key: \"p/h\", data: {i}}}]) {{ succeeded }} }}",
                        i % 5
                    )
                };
                client
                    .post(format!("{base}/graphql"))
                    .bearer_auth(&token)
                    .json(&json!({"query": query}))
                    .send()
                    .await
                    .expect("graphql write");
            }
        })
    };

    let mut collected: Vec<Seen> = Vec::new();
    let mut after = from;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut connection = 0;
    let writers_done = |collected: &Vec<Seen>, target: &Option<Vec<Seen>>| {
        target.as_ref().is_some_and(|t| collected.len() >= t.len())
    };
    let mut target: Option<Vec<Seen>> = None;
    let mut writers = Some((rest_writer, gql_writer));
    while !writers_done(&collected, &target) {
        let base = &bases[connection % bases.len()];
        connection += 1;
        let mut ws = WsClient::connect(base, "/graphql/ws", u.ws_auth()).await;
        ws.subscribe(
            "p",
            "subscription($after: Revision) { objectEvents(prefix: \"p/\", afterRevision: $after) { kind key version revision } }",
            json!({"after": after.to_string()}),
        )
        .await;
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let take = 1 + (seed >> 33) % 9;
        for _ in 0..take {
            let Some(msg) = ws.try_next(Duration::from_secs(3)).await else {
                break;
            };
            assert_eq!(msg["type"], "next", "{msg}");
            let e = seen_from_event(&msg["payload"]["data"]["objectEvents"]);
            after = e.0;
            collected.push(e);
        }
        drop(ws);
        if target.is_none()
            && let Some((a, b)) = writers.take()
        {
            if a.is_finished() && b.is_finished() {
                a.await.unwrap();
                b.await.unwrap();
                target = Some(committed(&app, &u, "p%2F").await);
            } else {
                writers = Some((a, b));
            }
        }
    }
    let target = target.unwrap();
    let expected: Vec<Seen> = target.into_iter().filter(|s| s.0 > from).collect();
    assert!(
        expected.len() > 100,
        "the writers made {} changes",
        expected.len()
    );
    assert_eq!(collected, expected);
}

#[tokio::test]
#[cfg_attr(
    not(kvql_test_postgres),
    ignore = "several nodes need PostgreSQL: set KVQL_TEST_DATABASE_URL (on SQLite one server owns the database)"
)]
async fn a_watch_resumed_on_another_node_misses_nothing() {
    let app = TestApp::spawn().await;
    let b = app.second_node().await;
    let u = app.writer().await;
    let first = app.create(&u, "x/1", json!(1), None).await;
    let mut sse = Sse::open(&app, &u, "prefix=x%2F&after=0", None).await;
    assert_eq!(sse.next().await.data["revision"], revision(&first.body));
    drop(sse);
    // Written through node B while nobody watched.
    let on_b = app
        .send(
            app.client
                .put(format!("{}/api/object/x%2F2", b.base))
                .bearer_auth(&u.token)
                .json(&json!({"data": 2})),
        )
        .await;
    assert_eq!(on_b.status, 201);
    let resumed = app
        .client
        .get(format!("{}/api/watch?prefix=x%2F", b.base))
        .bearer_auth(&u.token)
        .header("Last-Event-ID", revision(&first.body).to_string())
        .send()
        .await
        .unwrap();
    let mut sse = Sse {
        resp: resumed,
        buf: String::new(),
    };
    let e = sse.next().await;
    assert_eq!(e.data["key"], "x/2");
    assert_eq!(e.data["revision"], revision(&on_b.body));
    // And a write on node A reaches the watcher on node B.
    let on_a = app.create(&u, "x/3", json!(3), None).await;
    assert_eq!(sse.next().await.data["revision"], revision(&on_a.body));
}

#[tokio::test]
async fn a_history_page_walks_a_bounded_stretch_of_the_log_and_says_where_to_go_on() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let old = app.create(&u, "rare", json!("old"), None).await;
    // More than one page's walk (10,000 revisions) of other keys' changes.
    for batch in 0..11 {
        let items: Vec<Value> = (0..1000)
            .map(|i| json!({"key": format!("busy/{batch}/{i}"), "data": i}))
            .collect();
        let r = app
            .put("/api/batch/object", Some(&u.token), &json!(items))
            .await;
        assert_eq!(r.body["succeeded"], 1000, "{}", r.text);
    }
    let mut found = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/object/rare/history?cursor={c}"),
            None => "/api/object/rare/history".to_owned(),
        };
        let page = app.get(&path, Some(&u.token)).await;
        assert_eq!(page.status, 200, "{}", page.text);
        pages += 1;
        found.extend(
            page.body["changes"]
                .as_array()
                .unwrap()
                .iter()
                .map(revision),
        );
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(found, vec![revision(&old.body)]);
    assert!(
        pages >= 2,
        "the first page stopped at its bound and said where to go on"
    );
}

/// On PostgreSQL a run of writes is one call that waits for the tenant's
/// revision counter before it writes. Here a delete by another transaction
/// (done by hand, as the store does it: counter, row, tombstone) holds the
/// counter while a create of the same key waits, and commits meanwhile: the
/// create must see that tombstone and continue the version, although the
/// call began before the delete committed.
#[tokio::test]
#[cfg_attr(
    not(kvql_test_postgres),
    ignore = "PostgreSQL only: SQLite has one writer, which never waits for another"
)]
async fn a_create_that_waited_for_a_concurrent_delete_continues_its_version() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let app = TestApp::spawn().await;
    assert!(app.node.state.db().is_postgres());
    // Connections of the test's own, beside the server's pools.
    let db = sea_orm::Database::connect(&app.db.url)
        .await
        .expect("connect");
    let u = app.writer().await;
    app.create(&u, "aba", json!("A"), None).await;
    let put = app
        .put(&object_path("aba"), Some(&u.token), &json!({"data": "B"}))
        .await;
    assert_eq!(put.body["version"], 2);

    let delete = db.begin().await.expect("begin");
    let row = delete
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "UPDATE tenant SET revision = revision + 1 WHERE name = 'acme' RETURNING id, revision",
        ))
        .await
        .expect("lock the counter")
        .expect("tenant acme");
    let (tenant, rev): (i64, i64) = (
        row.try_get("", "id").unwrap(),
        row.try_get("", "revision").unwrap(),
    );
    let create = tokio::spawn({
        let (client, url, token) = (app.client.clone(), app.url("/api/object"), u.token.clone());
        async move {
            let resp = client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"key": "aba", "data": "C"}))
                .send()
                .await
                .expect("create");
            (
                resp.status().as_u16(),
                resp.json::<Value>().await.expect("json"),
            )
        }
    });
    // Until the create waits for the counter's lock: polled, as nothing
    // announces it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND query LIKE '%kvql_write_run%'",
            ))
            .await
            .expect("pg_stat_activity")
            .expect("a row");
        if waiting.try_get::<i64>("", "n").unwrap() > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the create never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for sql in [
        format!(r#"DELETE FROM object WHERE tenant_id = {tenant} AND "key" = 'aba'"#),
        format!(
            r#"INSERT INTO object_tombstone (tenant_id, "key", version, revision)
               VALUES ({tenant}, 'aba', 2, {rev})"#
        ),
    ] {
        delete
            .execute_unprepared(&sql)
            .await
            .expect("delete by hand");
    }
    delete.commit().await.expect("commit the delete");
    let (status, body) = create.await.expect("create task");
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["version"], 3,
        "the version goes on above the tombstone committed while the create waited"
    );
    assert!(revision(&body) > rev);
}

/// Opens `/api/watch` as `u` once it is no longer refused: a closed stream
/// gives its place back when the server sees the connection gone, at the
/// second heartbeat after it closed. At most 5 seconds.
async fn watch_once_a_place_is_free(app: &TestApp, u: &User) -> Sse {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let resp = app
            .client
            .get(app.url("/api/watch?prefix=p%2F"))
            .bearer_auth(&u.token)
            .send()
            .await
            .expect("watch");
        if resp.status() != 429 {
            return Sse {
                resp,
                buf: String::new(),
            };
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the closed stream's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn feeds_past_the_per_user_and_node_caps_are_refused_with_429_rate_limited() {
    let app = TestApp::spawn_with(|c| {
        c.max_feeds_per_user = 2;
        c.max_feeds = 3;
        c.watch_heartbeat = Duration::from_millis(50);
    })
    .await;
    let u = app.writer().await;
    let first = app.create(&u, "p/1", json!(1), None).await;
    let a = Sse::open(&app, &u, "prefix=p%2F", None).await;
    let _b = Sse::open(&app, &u, "after=0", None).await;

    // Every door to a third feed of the same user is refused before it opens.
    let watch = app.get("/api/watch?after=0", Some(&u.token)).await;
    watch.assert_error(429, "RATE_LIMITED");
    assert_eq!(watch.header("retry-after"), Some("1"));
    let last = revision(&first.body);
    let poll = changes(&app, &u, &format!("after={last}&wait=30")).await;
    poll.assert_error(429, "RATE_LIMITED");
    let mut ws = WsClient::connect(&app.node.base, "/graphql/ws", u.ws_auth()).await;
    ws.subscribe("over", EVENTS_AFTER, json!({"prefix": "p/"}))
        .await;
    let msg = ws.next().await;
    assert_eq!(msg["type"], "next", "{msg}");
    assert_eq!(msg["payload"]["data"], Value::Null);
    let error = &msg["payload"]["errors"][0];
    assert_eq!(error["extensions"]["code"], "RATE_LIMITED", "{msg}");
    assert_eq!(ws.next().await["type"], "complete");
    // A page that does not have to wait needs no place.
    let page = changes(&app, &u, "after=0&wait=30").await;
    assert_eq!(page.status, 200);
    assert_eq!(summary(&page.body["changes"]).len(), 1);

    // Another user has places of their own, up to the node's cap.
    let v = app.user("other", Role::Writer).await;
    let _c = Sse::open(&app, &v, "after=0", None).await;
    let full = app.get("/api/watch", Some(&v.token)).await;
    full.assert_error(429, "RATE_LIMITED");
    full.assert_mentions("node");

    // Closing a stream gives its place back.
    drop(a);
    let mut again = watch_once_a_place_is_free(&app, &u).await;
    let second = app.create(&u, "p/2", json!(2), None).await;
    assert_eq!(again.next().await.data["revision"], revision(&second.body));
}

#[tokio::test]
async fn a_page_of_changes_of_large_values_stops_at_4_mib_and_the_next_goes_on_from_there() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    // Ten values of 600 KB, each logged with its change: 6 MB in all.
    let big = "x".repeat(600_000);
    let mut written = Vec::new();
    for i in 0..10 {
        let r = app
            .put(
                &object_path(&format!("big/{i}")),
                Some(&u.token),
                &json!({"data": big}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        written.push(revision(&r.body));
    }
    let first = changes(&app, &u, "after=0&limit=1000").await;
    assert_eq!(first.status, 200, "{}", first.text);
    let got: Vec<i64> = summary(&first.body["changes"])
        .iter()
        .map(|c| c.0)
        .collect();
    // Values of 600,002 bytes of JSON: six fit in 4 MiB, a seventh does not.
    assert_eq!(got, written[..6]);
    assert_eq!(first.body["last_revision"], written[5]);
    assert!(
        first.body["changes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["data"] == big)
    );
    let rest = changes(&app, &u, &format!("after={}&limit=1000", written[5])).await;
    let got: Vec<i64> = summary(&rest.body["changes"]).iter().map(|c| c.0).collect();
    assert_eq!(got, written[6..]);
}
