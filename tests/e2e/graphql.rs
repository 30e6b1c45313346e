//! GraphQL queries and mutations: the same rules and codes as REST.

use api::auth::Role;
use serde_json::json;

use crate::support::{ADMIN_PASSWORD, TestApp, object_path};

const CREATE: &str = "mutation($input: CreateObjectInput!) { createObject(input: $input) { key data version ttl expiresAt createdAt updatedAt } }";
const PUT: &str = "mutation($input: PutObjectInput!) { putObject(input: $input) { created object { key data version ttl } } }";
const GET: &str = "query($key: String!) { object(key: $key) { key data version ttl expiresAt } }";
const DELETE: &str =
    "mutation($key: String!, $v: Version) { deleteObject(key: $key, expectedVersion: $v) }";

#[tokio::test]
async fn login_mutation_returns_a_token_that_works_on_rest_and_graphql() {
    let app = TestApp::spawn().await;
    let r = app
        .gql(
            None,
            "mutation($u: String!, $p: String!) { login(username: $u, password: $p) { accessToken tokenType expiresIn } }",
            json!({"u": "admin", "p": ADMIN_PASSWORD}),
        )
        .await;
    let login = &r.gql_data()["login"];
    assert_eq!(login["tokenType"], "Bearer");
    assert_eq!(login["expiresIn"], 3600);
    let token = login["accessToken"].as_str().unwrap();
    assert_eq!(app.get("/api/objects", Some(token)).await.status, 200);
    let me = app
        .gql(
            Some(token),
            "{ me { username tenant role canWrite tokenExpiresAt } }",
            json!({}),
        )
        .await;
    let me = &me.gql_data()["me"];
    assert_eq!(me["username"], "admin");
    assert_eq!(me["tenant"], "default");
    assert_eq!(me["role"], "OWNER");
    assert_eq!(me["canWrite"], true);
    assert!(me["tokenExpiresAt"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn login_mutation_refuses_bad_credentials_alike() {
    let app = TestApp::spawn().await;
    let q =
        "mutation($u: String!, $p: String!) { login(username: $u, password: $p) { accessToken } }";
    let wrong = app
        .gql(None, q, json!({"u": "admin", "p": "wrong password"}))
        .await;
    let unknown = app
        .gql(None, q, json!({"u": "nobody", "p": "wrong password"}))
        .await;
    assert_eq!(wrong.gql_error_code(), "UNAUTHENTICATED");
    assert_eq!(unknown.gql_error_code(), "UNAUTHENTICATED");
    assert_eq!(
        wrong.body["errors"][0]["message"],
        unknown.body["errors"][0]["message"]
    );
}

#[tokio::test]
async fn create_read_put_delete_through_graphql() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    let created = app
        .gql(
            t,
            CREATE,
            json!({"input": {"key": "g/1", "data": {"a": [1, 2]}, "ttl": 60}}),
        )
        .await;
    let o = &created.gql_data()["createObject"];
    assert_eq!(o["key"], "g/1");
    assert_eq!(o["data"], json!({"a": [1, 2]}));
    assert_eq!(o["version"], "1", "versions are strings");
    assert_eq!(o["ttl"], 60);

    // Written through GraphQL, read through REST, and the other way round.
    assert_eq!(app.read(&u, "g/1").await.body["data"], json!({"a": [1, 2]}));
    app.put(&object_path("r"), t, &json!({"data": "from rest"}))
        .await;
    let read = app.gql(t, GET, json!({"key": "r"})).await;
    assert_eq!(read.gql_data()["object"]["data"], "from rest");

    let put = app
        .gql(
            t,
            PUT,
            json!({"input": {"key": "g/1", "data": null, "expectedVersion": "1"}}),
        )
        .await;
    let p = &put.gql_data()["putObject"];
    assert_eq!(p["created"], false);
    assert_eq!(p["object"]["version"], "2");
    assert_eq!(p["object"]["data"], json!(null));
    assert_eq!(p["object"]["ttl"], json!(null));
    let fresh = app
        .gql(t, PUT, json!({"input": {"key": "g/2", "data": 5}}))
        .await;
    assert_eq!(fresh.gql_data()["putObject"]["created"], true);

    let del = app.gql(t, DELETE, json!({"key": "g/1", "v": 2})).await;
    assert_eq!(del.gql_data()["deleteObject"], true);
    let gone = app.gql(t, GET, json!({"key": "g/1"})).await;
    assert_eq!(gone.gql_data()["object"], json!(null));
}

#[tokio::test]
async fn graphql_write_errors_carry_codes_and_change_nothing() {
    let app = TestApp::spawn_with(|c| c.max_value_bytes = 100).await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    app.gql(t, CREATE, json!({"input": {"key": "k", "data": 1}}))
        .await;
    app.gql(t, PUT, json!({"input": {"key": "k", "data": 2}}))
        .await;
    let before = app.snapshot().await;

    let cases = [
        (
            CREATE,
            json!({"input": {"key": "k", "data": 3}}),
            "ALREADY_EXISTS",
        ),
        (
            PUT,
            json!({"input": {"key": "k", "data": 3, "expectedVersion": "1"}}),
            "VERSION_MISMATCH",
        ),
        (
            PUT,
            json!({"input": {"key": "missing", "data": 3, "expectedVersion": "1"}}),
            "NOT_FOUND",
        ),
        (DELETE, json!({"key": "missing"}), "NOT_FOUND"),
        (DELETE, json!({"key": "k", "v": "1"}), "VERSION_MISMATCH"),
        (
            CREATE,
            json!({"input": {"key": "", "data": 3}}),
            "INVALID_INPUT",
        ),
        (
            CREATE,
            json!({"input": {"key": "n", "data": 3, "ttl": 0}}),
            "INVALID_INPUT",
        ),
        (CREATE, json!({"input": {"key": "n"}}), "INVALID_INPUT"),
        (
            CREATE,
            json!({"input": {"key": "n", "data": "x".repeat(200)}}),
            "PAYLOAD_TOO_LARGE",
        ),
        (
            PUT,
            json!({"input": {"key": "k", "data": 3, "expectedVersion": "abc"}}),
            "INVALID_INPUT",
        ),
    ];
    for (query, vars, code) in cases {
        let r = app.gql(t, query, vars.clone()).await;
        assert_eq!(r.gql_error_code(), code, "{vars}: {}", r.text);
        assert!(
            r.body["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let r = app
        .gql(
            t,
            CREATE,
            json!({"input": {"key": "n", "data": 3, "ttl": 0}}),
        )
        .await;
    assert_eq!(r.body["errors"][0]["extensions"]["field"], "ttl");
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn graphql_without_a_valid_token_is_unauthenticated_and_changes_nothing() {
    let app = TestApp::spawn().await;
    for token in [None, Some("not-a-token")] {
        for (q, vars) in [
            (GET, json!({"key": "k"})),
            (CREATE, json!({"input": {"key": "k", "data": 1}})),
            ("{ me { username } }", json!({})),
            ("{ listObjects { edges { cursor } } }", json!({})),
        ] {
            let r = app.gql(token, q, vars).await;
            assert_eq!(r.gql_error_code(), "UNAUTHENTICATED", "{}", r.text);
        }
    }
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn a_reader_gets_forbidden_on_graphql_writes() {
    let app = TestApp::spawn().await;
    let w = app.writer().await;
    let r = app.user("acme", Role::Reader).await;
    app.gql(
        Some(&w.token),
        CREATE,
        json!({"input": {"key": "k", "data": 1}}),
    )
    .await;
    let before = app.snapshot().await;
    let t = Some(r.token.as_str());
    assert_eq!(
        app.gql(t, GET, json!({"key": "k"})).await.gql_data()["object"]["data"],
        1
    );
    for (q, vars) in [
        (CREATE, json!({"input": {"key": "n", "data": 1}})),
        (PUT, json!({"input": {"key": "k", "data": 2}})),
        (DELETE, json!({"key": "k"})),
        (
            "mutation { batchCreate(items: [{key: \"b\", data: 1}]) { succeeded } }",
            json!({}),
        ),
        (
            "mutation { batchPut(items: [{key: \"b\", data: 1}]) { succeeded } }",
            json!({}),
        ),
        (
            "mutation { batchDelete(keys: [\"k\"]) { succeeded } }",
            json!({}),
        ),
    ] {
        assert_eq!(app.gql(t, q, vars).await.gql_error_code(), "FORBIDDEN");
    }
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn another_tenants_key_looks_missing_through_graphql() {
    let app = TestApp::spawn().await;
    let alice = app.user("alpha", Role::Writer).await;
    let bob = app.user("beta", Role::Writer).await;
    app.gql(
        Some(&alice.token),
        CREATE,
        json!({"input": {"key": "secret", "data": 1}}),
    )
    .await;
    let before = app.snapshot().await;
    let t = Some(bob.token.as_str());
    assert_eq!(
        app.gql(t, GET, json!({"key": "secret"})).await.gql_data()["object"],
        json!(null)
    );
    let objects = app
        .gql(
            t,
            "query($k: [String!]!) { objects(keys: $k) { key } }",
            json!({"k": ["secret"]}),
        )
        .await;
    assert_eq!(objects.gql_data()["objects"], json!([null]));
    let put_other = app
        .gql(
            t,
            PUT,
            json!({"input": {"key": "secret", "data": 2, "expectedVersion": "1"}}),
        )
        .await;
    let put_missing = app
        .gql(
            t,
            PUT,
            json!({"input": {"key": "nothing", "data": 2, "expectedVersion": "1"}}),
        )
        .await;
    assert_eq!(put_other.gql_error_code(), "NOT_FOUND");
    assert_eq!(
        put_other.body["errors"][0]["message"],
        put_missing.body["errors"][0]["message"]
    );
    assert_eq!(
        app.gql(t, DELETE, json!({"key": "secret"}))
            .await
            .gql_error_code(),
        "NOT_FOUND"
    );
    let list = app
        .gql(t, "{ listObjects { edges { node { key } } } }", json!({}))
        .await;
    assert_eq!(list.gql_data()["listObjects"]["edges"], json!([]));
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn objects_returns_values_in_order_with_null_for_missing() {
    let app = TestApp::spawn_with(|c| c.max_batch_items = 3).await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    for k in ["a", "c"] {
        app.gql(t, CREATE, json!({"input": {"key": k, "data": k}}))
            .await;
    }
    let q = "query($k: [String!]!) { objects(keys: $k) { key data } }";
    let r = app.gql(t, q, json!({"k": ["c", "b", "a"]})).await;
    assert_eq!(
        r.gql_data()["objects"],
        json!([{"key": "c", "data": "c"}, null, {"key": "a", "data": "a"}])
    );
    let too_many = app.gql(t, q, json!({"k": ["a", "b", "c", "d"]})).await;
    assert_eq!(too_many.gql_error_code(), "PAYLOAD_TOO_LARGE");
    let bad = app.gql(t, q, json!({"k": ["a", ""]})).await;
    assert_eq!(bad.gql_error_code(), "INVALID_INPUT");
    assert_eq!(bad.body["errors"][0]["extensions"]["field"], "keys[1]");
}

#[tokio::test]
async fn list_objects_pages_through_a_prefix() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    let items: Vec<_> = (0..7)
        .map(|i| json!({"key": format!("p/{i}"), "data": i}))
        .collect();
    let mut all = items.clone();
    all.push(json!({"key": "q/0", "data": "other prefix"}));
    app.gql(
        t,
        "mutation($items: [CreateObjectInput!]!) { batchCreate(items: $items) { succeeded } }",
        json!({"items": all}),
    )
    .await;
    let q = "query($after: String) { listObjects(prefix: \"p/\", first: 3, after: $after) {
        edges { cursor node { key data version } } pageInfo { hasNextPage endCursor hasPreviousPage startCursor } } }";
    let mut after = json!(null);
    let mut keys = Vec::new();
    let mut pages = 0;
    loop {
        let r = app.gql(t, q, json!({"after": after})).await;
        let conn = &r.gql_data()["listObjects"];
        pages += 1;
        for e in conn["edges"].as_array().unwrap() {
            keys.push(e["node"]["key"].as_str().unwrap().to_owned());
            assert_eq!(e["node"]["version"], "1");
        }
        let info = &conn["pageInfo"];
        assert_eq!(
            info["endCursor"],
            conn["edges"].as_array().unwrap().last().unwrap()["cursor"]
        );
        if info["hasNextPage"] == false {
            break;
        }
        after = info["endCursor"].clone();
    }
    assert_eq!(pages, 3);
    assert_eq!(keys, (0..7).map(|i| format!("p/{i}")).collect::<Vec<_>>());
    let bad = app
        .gql(
            t,
            "{ listObjects(first: 0) { edges { cursor } } }",
            json!({}),
        )
        .await;
    assert_eq!(bad.gql_error_code(), "INVALID_INPUT");
    assert_eq!(bad.body["errors"][0]["extensions"]["field"], "first");
}

#[tokio::test]
async fn batch_create_reports_per_item_and_atomic_is_all_or_nothing() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    app.gql(t, CREATE, json!({"input": {"key": "taken", "data": 0}}))
        .await;
    let q = "mutation($items: [CreateObjectInput!]!, $atomic: Boolean!) {
        batchCreate(items: $items, atomic: $atomic) {
            succeeded failed results { index key ok code message object { key version } } } }";
    let items = json!([{"key": "a", "data": 1}, {"key": "taken", "data": 2}, {"key": "b", "data": 3, "ttl": -1}]);

    let before = app.snapshot().await;
    let atomic = app.gql(t, q, json!({"items": items, "atomic": true})).await;
    assert_eq!(atomic.gql_error_code(), "ALREADY_EXISTS");
    assert_eq!(atomic.body["errors"][0]["extensions"]["index"], 1);
    assert_eq!(atomic.body["errors"][0]["extensions"]["key"], "taken");
    assert_eq!(app.snapshot().await, before);

    let per_item = app
        .gql(t, q, json!({"items": items, "atomic": false}))
        .await;
    let b = &per_item.gql_data()["batchCreate"];
    assert_eq!(b["succeeded"], 1);
    assert_eq!(b["failed"], 2);
    assert_eq!(b["results"][0]["ok"], true);
    assert_eq!(b["results"][0]["object"]["version"], "1");
    assert_eq!(b["results"][1]["code"], "ALREADY_EXISTS");
    assert_eq!(b["results"][2]["code"], "INVALID_INPUT");
    assert_eq!(app.row_count().await, 2);
}

#[tokio::test]
async fn batch_put_is_atomic_by_default_and_honours_expected_versions() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    app.gql(t, CREATE, json!({"input": {"key": "x", "data": 0}}))
        .await;
    let q = "mutation($items: [PutObjectInput!]!) { batchPut(items: $items) { succeeded results { created object { version } } } }";
    let before = app.snapshot().await;
    let stale = app
        .gql(t, q, json!({"items": [{"key": "new", "data": 1}, {"key": "x", "data": 2, "expectedVersion": "7"}]}))
        .await;
    assert_eq!(stale.gql_error_code(), "VERSION_MISMATCH");
    assert_eq!(stale.body["errors"][0]["extensions"]["index"], 1);
    assert_eq!(app.snapshot().await, before);

    let ok = app
        .gql(t, q, json!({"items": [{"key": "new", "data": 1}, {"key": "x", "data": 2, "expectedVersion": "1"}]}))
        .await;
    let b = &ok.gql_data()["batchPut"];
    assert_eq!(b["succeeded"], 2);
    assert_eq!(b["results"][0]["created"], true);
    assert_eq!(b["results"][1]["created"], false);
    assert_eq!(b["results"][1]["object"]["version"], "2");
}

#[tokio::test]
async fn batch_delete_reports_missing_keys() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    app.gql(t, CREATE, json!({"input": {"key": "a", "data": 1}}))
        .await;
    let r = app
        .gql(t, "mutation { batchDelete(keys: [\"a\", \"zz\"]) { succeeded failed results { ok code } } }", json!({}))
        .await;
    let b = &r.gql_data()["batchDelete"];
    assert_eq!(b["succeeded"], 1);
    assert_eq!(b["results"][1]["code"], "NOT_FOUND");
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn graphiql_is_served_on_get_with_its_subscription_url() {
    let app = TestApp::spawn().await;
    let r = app
        .send(
            app.request(reqwest::Method::GET, "/graphql", None)
                .header("accept", "text/html"),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.text.contains("graphiql"));
    assert!(r.text.contains("/graphql/ws"));
}

#[tokio::test]
async fn the_schema_matches_the_checked_in_schema_graphql() {
    let checked_in =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql"))
            .expect("schema.graphql at the repository root");
    assert!(
        api::graphql::sdl() == checked_in,
        "schema.graphql is out of date with the code; regenerate it with:\n    cargo run -- schema > schema.graphql"
    );
}

#[tokio::test]
async fn a_malformed_graphql_request_is_a_json_400() {
    let app = TestApp::spawn().await;
    let r = app
        .send(
            app.request(reqwest::Method::POST, "/graphql", None)
                .header("content-type", "application/json")
                .body("{not json"),
        )
        .await;
    r.assert_error(400, "INVALID_INPUT");
    let syntax = app.gql(None, "{ object(key: ", json!({})).await;
    assert_eq!(syntax.gql_error_code(), "INVALID_INPUT");
    let unknown = app.gql(None, "{ nosuchfield }", json!({})).await;
    assert_eq!(unknown.gql_error_code(), "INVALID_INPUT");
}

#[tokio::test]
async fn objects_reads_many_keys_in_order() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    let items: Vec<_> = (0..300)
        .step_by(2)
        .map(|i| json!({"key": format!("m{i:03}"), "data": i}))
        .collect();
    app.post("/api/batch/object", t, &json!(items)).await;
    let keys: Vec<String> = (0..300).rev().map(|i| format!("m{i:03}")).collect();
    let r = app
        .gql(
            t,
            "query($k: [String!]!) { objects(keys: $k) { data } }",
            json!({"k": keys}),
        )
        .await;
    let got = r.gql_data()["objects"].as_array().unwrap().clone();
    assert_eq!(got.len(), 300);
    for (n, (key, value)) in keys.iter().zip(&got).enumerate() {
        let i: i64 = key[1..].parse().unwrap();
        if i % 2 == 0 {
            assert_eq!(value["data"], i, "position {n}");
        } else {
            assert_eq!(value, &json!(null), "position {n}");
        }
    }
}

#[tokio::test]
async fn kv_object_ids_are_the_key_across_every_read_and_write() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    let id_of = |r: &crate::support::Resp, path: &[&str]| {
        let mut v = r.gql_data();
        for p in path {
            v = match p.parse::<usize>() {
                Ok(i) => &v[i],
                Err(_) => &v[*p],
            };
        }
        assert_eq!(v["__typename"], "KvObject", "{}", r.text);
        v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id at {path:?}: {}", r.text))
            .to_owned()
    };
    let fields = "__typename id key version";

    let created = app
        .gql(
            t,
            &format!(
                "mutation {{ createObject(input: {{key: \"a/1\", data: 1}}) {{ {fields} }} }}"
            ),
            json!({}),
        )
        .await;
    let id = id_of(&created, &["createObject"]);
    assert_eq!(id, "a/1");

    let put = app
        .gql(
            t,
            &format!("mutation {{ putObject(input: {{key: \"a/1\", data: 2}}) {{ object {{ {fields} }} }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(id_of(&put, &["putObject", "object"]), id);

    let read = app
        .gql(
            t,
            &format!("{{ object(key: \"a/1\") {{ {fields} }} objects(keys: [\"a/1\"]) {{ {fields} }} listObjects(prefix: \"a/\") {{ edges {{ node {{ {fields} }} }} }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(id_of(&read, &["object"]), id);
    let data = read.gql_data();
    assert_eq!(data["objects"][0]["id"], id.as_str(), "{}", read.text);
    assert_eq!(
        data["listObjects"]["edges"][0]["node"]["id"],
        id.as_str(),
        "{}",
        read.text
    );

    let batch = app
        .gql(
            t,
            &format!("mutation {{ c: batchCreate(items: [{{key: \"a/2\", data: 1}}]) {{ results {{ object {{ {fields} }} }} }} p: batchPut(items: [{{key: \"a/1\", data: 3}}]) {{ results {{ object {{ {fields} }} }} }} }}"),
            json!({}),
        )
        .await;
    let other = id_of(&batch, &["c", "results", "0", "object"]);
    assert_eq!(other, "a/2");
    assert_ne!(other, id);
    let data = batch.gql_data();
    assert_eq!(data["p"]["results"][0]["object"]["id"], id.as_str());
    assert_eq!(data["p"]["results"][0]["object"]["version"], "3");
}

#[tokio::test]
async fn every_kind_of_json_value_reads_back_through_graphql_as_stored() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    let values = [
        json!({"b": 1, "a": [true, false, null], "nested": {"z": {"y": []}, "e": {}}}),
        json!([
            1,
            -2,
            3.5,
            1e300,
            18446744073709551615u64,
            -9223372036854775808i64
        ]),
        json!("quotes \" backslash \\ newline \n tab \t unicode é ✓ 😀 \u{0001}"),
        json!(0),
        json!(false),
        json!(""),
        json!({"": "empty key", "$": "dollar", "a:b": "colon"}),
    ];
    for (i, v) in values.iter().enumerate() {
        let key = format!("v/{i}");
        app.put(&object_path(&key), t, &json!({ "data": v })).await;
        let rest = app.read(&u, &key).await.body["data"].clone();
        assert_eq!(&rest, v, "REST reads back value {i}");
        let one = app.gql(t, GET, json!({"key": key})).await;
        assert_eq!(&one.gql_data()["object"]["data"], v, "object, value {i}");
        let many = app
            .gql(
                t,
                "query($k: [String!]!) { objects(keys: $k) { data } }",
                json!({"k": [key]}),
            )
            .await;
        assert_eq!(
            &many.gql_data()["objects"][0]["data"],
            v,
            "objects, value {i}"
        );
    }
}

#[tokio::test]
async fn a_body_that_is_neither_an_operation_nor_a_batch_is_a_400_and_runs_nothing() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let create = r#"{"query":"mutation { createObject(input: {key: \"x\", data: 1}) { key } }"}"#;
    for body in [
        "\"a string\"".to_owned(),
        "42".to_owned(),
        "[]".to_owned(),
        format!("[{create}, 5]"),
        format!("  \n[{create}"),
    ] {
        let r = app.post_text("/graphql", &u.token, body.clone()).await;
        r.assert_error(400, "INVALID_INPUT");
    }
    assert_eq!(app.read(&u, "x").await.status, 404, "nothing was created");
    // The same operation, alone and as a one-element batch after whitespace, runs.
    for (body, key) in [
        (create.to_owned(), "x"),
        (
            format!(" \t[{}]", create.replace("\\\"x\\\"", "\\\"y\\\"")),
            "y",
        ),
    ] {
        let r = app.post_text("/graphql", &u.token, body).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(app.read(&u, key).await.status, 200);
    }
}

/// `(operations answered by the fast path, queries)` so far.
async fn fast_and_queries(app: &TestApp) -> (f64, f64) {
    let (scrape, _) = crate::metrics::scrape(app, None).await;
    let get = |name, labels: &[(&str, &str)]| {
        crate::metrics::value(&scrape, name, labels).unwrap_or_default()
    };
    (
        get("kvql_graphql_fast_path_total", &[]),
        get("kvql_graphql_operations_total", &[("type", "query")]),
    )
}

#[tokio::test]
async fn the_fast_path_answers_every_object_field_as_the_executor_does() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let token = Some(u.token.as_str());
    app.create(
        &u,
        "full",
        json!({"a": [1, "x", null], "b": {"c": 1.5}}),
        Some(100),
    )
    .await;
    app.create(&u, "nothing", json!(null), None).await;
    let all = "__typename id key data version revision ttl expiresAt createdAt updatedAt";
    let queries = [
        format!("query($k: String!) {{ object(key: $k) {{ {all} }} }}"),
        format!("query Named($k: String!) {{ o: object(key: $k) {{ v: version {all} }} }}"),
        "{ object(key: \"full\") { data key } }".to_owned(),
    ];
    let mut pairs = 0.0;
    for (i, query) in queries.iter().enumerate() {
        for key in ["full", "nothing", "absent"] {
            // A text of its own per case: its first run is the executor's.
            let text = format!("{query} # {key}");
            let mut body = json!({"query": text});
            if i < 2 {
                body["variables"] = json!({"k": key});
            }
            if i == 1 {
                body["operationName"] = json!("Named");
            }
            let (fast_before, _) = fast_and_queries(&app).await;
            let executor = app.post("/graphql", token, &body).await;
            let fast = app.post("/graphql", token, &body).await;
            let (fast_after, _) = fast_and_queries(&app).await;
            assert_eq!(
                fast_after - fast_before,
                1.0,
                "{text}: the second went fast"
            );
            assert_eq!(executor.status, 200, "{}", executor.text);
            assert!(executor.body.get("errors").is_none(), "{}", executor.text);
            assert_eq!(fast.text, executor.text, "{text}");
            pairs += 1.0;
        }
    }
    let (fast, queries_counted) = fast_and_queries(&app).await;
    assert_eq!(fast, pairs);
    assert_eq!(
        queries_counted,
        2.0 * pairs,
        "fast answers count as queries"
    );

    // What the fast path does not take, the executor answers as always.
    let plain = "query($k: String!) { object(key: $k) { key } }";
    for _ in 0..2 {
        let r = app.gql(token, plain, json!({"k": "full"})).await;
        assert_eq!(r.body["data"]["object"]["key"], "full", "{}", r.text);
    }
    let (fast_before, _) = fast_and_queries(&app).await;
    let anonymous = app.gql(None, plain, json!({"k": "full"})).await;
    assert_eq!(anonymous.gql_error_code(), "UNAUTHENTICATED");
    let bad_key = app.gql(token, plain, json!({"k": ""})).await;
    assert_eq!(bad_key.gql_error_code(), "INVALID_INPUT");
    let not_a_string = app.gql(token, plain, json!({"k": 7})).await;
    assert_eq!(not_a_string.gql_error_code(), "INVALID_INPUT");
    let missing = app.gql(token, plain, json!({})).await;
    assert_eq!(missing.gql_error_code(), "INVALID_INPUT");
    let (fast_after, _) = fast_and_queries(&app).await;
    assert_eq!(fast_after, fast_before, "none of these went fast");
}

/// Sends `body` to `/graphql` twice (the second may take the fast path);
/// asserts both answers are the same and gives it, with how many of the
/// two the fast path answered.
async fn twice(app: &TestApp, token: &str, body: &serde_json::Value) -> (serde_json::Value, f64) {
    let (before, _) = fast_and_queries(app).await;
    let first = app.post("/graphql", Some(token), body).await;
    let second = app.post("/graphql", Some(token), body).await;
    let (after, _) = fast_and_queries(app).await;
    assert_eq!(first.text, second.text, "{body}");
    (second.body, after - before)
}

#[tokio::test]
async fn the_fast_path_keeps_scopes_tenants_and_expiry_and_leaves_other_requests_alone() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let stranger = app.user("other", Role::Writer).await;
    app.create(&owner, "p/in", json!("in"), None).await;
    app.create(&owner, "out", json!("out"), None).await;
    app.create(&owner, "soon", json!("soon"), Some(1)).await;
    app.create(&stranger, "secret", json!("theirs"), None).await;
    let minted = app
        .post(
            "/api/keys",
            Some(&owner.token),
            &json!({"name": "scoped", "scope": "read", "prefix": "p/"}),
        )
        .await;
    assert_eq!(minted.status, 201, "{}", minted.text);
    let scoped = minted.body["token"].as_str().expect("token").to_owned();
    let q = "query Q($k: String!) { object(key: $k) { key data } }";
    let read = |k: &str| json!({"query": q, "variables": {"k": k}});

    // Taken by the fast path, with the executor's answers.
    let (inside, fast) = twice(&app, &scoped, &read("p/in")).await;
    assert_eq!(
        inside["data"]["object"],
        json!({"key": "p/in", "data": "in"})
    );
    assert_eq!(
        fast, 1.0,
        "a named document without operationName goes fast"
    );
    app.clock.advance(std::time::Duration::from_secs(2));
    for (token, key, what) in [
        (&scoped, "out", "outside the key's prefix"),
        (&owner.token, "secret", "another tenant's key"),
        (&owner.token, "soon", "an expired value"),
    ] {
        let (answer, fast) = twice(&app, token, &read(key)).await;
        assert_eq!(answer, json!({"data": {"object": null}}), "{what}");
        assert_eq!(fast, 2.0, "{what}");
    }
    let (before, _) = fast_and_queries(&app).await;
    for _ in 0..2 {
        let got: serde_json::Value = app
            .client
            .get(app.url("/graphql"))
            .query(&[("query", q), ("variables", r#"{"k":"out"}"#)])
            .bearer_auth(&owner.token)
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("JSON");
        assert_eq!(got["data"]["object"]["data"], "out");
    }
    let (after, _) = fast_and_queries(&app).await;
    assert_eq!(after - before, 2.0, "a GET goes fast too");

    // Left to the executor, which answers as always.
    for (body, want) in [
        (
            json!({"query": q, "variables": {"k": "out"}, "operationName": "Other"}),
            json!("INVALID_INPUT"),
        ),
        (
            json!({"query": q, "variables": {"k": "out", "extra": 1}}),
            json!(null),
        ),
        (
            json!({"query": q, "variables": {"k": "out"}, "extensions": {"x": 1}}),
            json!(null),
        ),
    ] {
        let (answer, fast) = twice(&app, &owner.token, &body).await;
        assert_eq!(fast, 0.0, "{body}");
        assert_eq!(
            answer["errors"][0]["extensions"]["code"], want,
            "{body}: {answer}"
        );
        if want.is_null() {
            assert_eq!(answer["data"]["object"]["data"], "out", "{body}");
        }
    }
    let (batch, fast) = twice(&app, &owner.token, &json!([read("out")])).await;
    assert_eq!(fast, 0.0);
    assert_eq!(batch[0]["data"]["object"]["data"], "out");
}

#[tokio::test]
async fn a_read_the_store_fails_on_the_fast_path_is_answered_by_the_executor_without_a_second_read()
{
    use sea_orm::ConnectionTrait;
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let q = "query($k: String!) { object(key: $k) { key } }";
    let ok = app.gql(Some(&u.token), q, json!({"k": "a"})).await;
    assert_eq!(ok.body, json!({"data": {"object": null}}));
    // The values' table is gone: every read fails in the database.
    app.node
        .state
        .db()
        .write
        .execute_unprepared("DROP TABLE object")
        .await
        .expect("drop the table");
    let gets = |scrape: &prometheus_parse::Scrape| {
        crate::metrics::value(scrape, "kvql_store_operations_total", &[("op", "get")])
            .unwrap_or_default()
    };
    let (before, _) = crate::metrics::scrape(&app, None).await;
    let (fast_before, _) = fast_and_queries(&app).await;
    let failed = app.gql(Some(&u.token), q, json!({"k": "b"})).await;
    assert_eq!(failed.gql_error_code(), "INTERNAL", "{}", failed.text);
    assert_eq!(failed.body["errors"][0]["path"], json!(["object"]));
    let (after, _) = crate::metrics::scrape(&app, None).await;
    let (fast_after, _) = fast_and_queries(&app).await;
    assert_eq!(
        gets(&after) - gets(&before),
        1.0,
        "read once, not again by the executor"
    );
    assert_eq!(fast_after, fast_before);
}
