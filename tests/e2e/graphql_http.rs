//! GraphQL over HTTP: media types and status codes, GET, batches and
//! Apollo's Automatic Persisted Queries.

use api::auth::Role;
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Resp, TestApp};

const GRAPHQL_RESPONSE: &str = "application/graphql-response+json";
const APOLLO_ACCEPT: &str = "application/graphql-response+json,application/json;q=0.9";

impl TestApp {
    /// `POST /graphql` with a JSON body and an `Accept` header.
    async fn gql_accept(&self, token: Option<&str>, accept: &str, body: &Value) -> Resp {
        self.send(
            self.request(Method::POST, "/graphql", token)
                .header("accept", accept)
                .json(body),
        )
        .await
    }

    /// `GET /graphql` with query-string parameters.
    async fn gql_get(&self, token: Option<&str>, accept: &str, params: &[(&str, &str)]) -> Resp {
        self.send(
            self.request(Method::GET, "/graphql", token)
                .header("accept", accept)
                .query(params),
        )
        .await
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn persisted(hash: &str) -> Value {
    json!({"persistedQuery": {"version": 1, "sha256Hash": hash}})
}

#[track_caller]
fn assert_request_error(r: &Resp, code: &str) {
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with(GRAPHQL_RESPONSE),
        "{:?}",
        r.headers
    );
    assert!(r.body.get("data").is_none(), "no data entry: {}", r.text);
    assert_eq!(
        r.body["errors"][0]["extensions"]["code"], code,
        "{}",
        r.text
    );
}

#[tokio::test]
async fn graphql_response_json_answers_parse_validation_and_variable_errors_with_400_and_no_data() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    let parse = app
        .gql_accept(t, GRAPHQL_RESPONSE, &json!({"query": "{ object(key: "}))
        .await;
    assert_request_error(&parse, "INVALID_INPUT");
    let validation = app
        .gql_accept(t, GRAPHQL_RESPONSE, &json!({"query": "{ nosuchfield }"}))
        .await;
    assert_request_error(&validation, "INVALID_INPUT");
    let variables = app
        .gql_accept(
            t,
            APOLLO_ACCEPT,
            &json!({
                "query": "mutation($k: String!) { createObject(input: {key: $k, data: 1}) { key } }",
                "variables": {"k": 42}
            }),
        )
        .await;
    assert_request_error(&variables, "INVALID_INPUT");
    let limits = app
        .gql_accept(
            t,
            GRAPHQL_RESPONSE,
            &json!({"query": format!("{{ {} }}", "a: __typename ".repeat(40))}),
        )
        .await;
    assert_request_error(&limits, "INVALID_INPUT");
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn graphql_response_json_answers_executed_operations_with_200() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let ok = app
        .gql_accept(
            Some(&u.token),
            APOLLO_ACCEPT,
            &json!({"query": "mutation { createObject(input: {key: \"k\", data: 1}) { key } }"}),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert!(
        ok.header("content-type")
            .unwrap()
            .starts_with(GRAPHQL_RESPONSE)
    );
    assert_eq!(ok.body["data"]["createObject"]["key"], "k");
    // A field error happens during execution: still 200, with `data`.
    let field_error = app
        .gql_accept(
            None,
            GRAPHQL_RESPONSE,
            &json!({"query": "{ object(key: \"k\") { data } }"}),
        )
        .await;
    assert_eq!(field_error.status, 200, "{}", field_error.text);
    assert!(field_error.body.get("data").is_some());
    assert_eq!(
        field_error.body["errors"][0]["extensions"]["code"],
        "UNAUTHENTICATED"
    );
}

#[tokio::test]
async fn an_operation_whose_fields_are_all_skipped_answers_an_empty_object() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    for (token, query) in [
        (None, "{ me @skip(if: true) { username } }"),
        (None, "{ __typename @include(if: false) }"),
        (
            None,
            "query { ...F } fragment F on Query { __typename @skip(if: true) }",
        ),
        (
            Some(u.token.as_str()),
            "mutation { createObject(input: {key: \"k\", data: 1}) @skip(if: true) { key } }",
        ),
    ] {
        let r = app.gql(token, query, json!({})).await;
        assert_eq!(r.status, 200, "{query}: {}", r.text);
        assert_eq!(r.body, json!({"data": {}}), "{query}");
    }
    assert_eq!(
        app.row_count().await,
        0,
        "the skipped mutation field did not run"
    );
}

#[tokio::test]
async fn application_json_clients_keep_200_for_request_errors() {
    let app = TestApp::spawn().await;
    for accept in ["application/json", "*/*"] {
        let r = app
            .gql_accept(None, accept, &json!({"query": "{ nosuchfield }"}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(
            r.header("content-type")
                .unwrap()
                .starts_with("application/json")
        );
        assert_eq!(r.body["data"], Value::Null);
        assert_eq!(r.body["errors"][0]["extensions"]["code"], "INVALID_INPUT");
    }
}

#[tokio::test]
async fn a_post_that_is_not_json_gets_415_and_runs_nothing() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let body = r#"{"query":"mutation { createObject(input: {key: \"k\", data: 1}) { key } }"}"#;
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/graphql"),
        Some("application/json; charset=latin1"),
    ] {
        let mut req = app
            .request(Method::POST, "/graphql", Some(&u.token))
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let r = app.send(req).await;
        r.assert_error(415, "INVALID_INPUT");
    }
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn a_post_without_a_query_gets_400() {
    let app = TestApp::spawn().await;
    let empty = app
        .send(
            app.request(Method::POST, "/graphql", None)
                .header("content-type", "application/json"),
        )
        .await;
    empty.assert_error(400, "INVALID_INPUT");
    for body in [
        json!({"qeury": "{ __typename }"}),
        json!({"query": {"obj": "ect"}}),
        json!({"query": 0}),
        json!({"query": ["array"]}),
    ] {
        let r = app.post("/graphql", None, &body).await;
        r.assert_error(400, "INVALID_INPUT");
    }
}

#[tokio::test]
async fn get_runs_queries_with_variables_and_operation_name() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    app.create(&u, "g", json!({"v": 1}), None).await;
    let r = app
        .gql_get(
            Some(&u.token),
            "application/json",
            &[
                (
                    "query",
                    "query A { __typename } query B($k: String!) { object(key: $k) { key data } }",
                ),
                ("operationName", "B"),
                ("variables", r#"{"k": "g"}"#),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    assert_eq!(r.body["data"]["object"]["data"], json!({"v": 1}));
    let vary = r.header("vary").unwrap().to_ascii_lowercase();
    assert!(
        vary.contains("authorization") && vary.contains("accept"),
        "{vary}"
    );
    let plain = app
        .gql_get(None, "*/*", &[("query", "{ __typename }")])
        .await;
    assert_eq!(plain.status, 200, "{}", plain.text);
    assert_eq!(plain.body["data"]["__typename"], "Query");
}

#[tokio::test]
async fn a_mutation_over_get_gets_405_with_allow_post_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let mutation = "mutation { createObject(input: {key: \"m\", data: 1}) { key } }";
    for accept in [GRAPHQL_RESPONSE, "application/json"] {
        let r = app
            .gql_get(Some(&u.token), accept, &[("query", mutation)])
            .await;
        assert_eq!(r.status, 405, "{}", r.text);
        assert_eq!(r.header("allow"), Some("POST"));
        assert_eq!(
            r.body["errors"][0]["extensions"]["code"],
            "METHOD_NOT_ALLOWED"
        );
    }
    // Named among several operations, and again once the document is cached.
    let doc = format!("query Q {{ __typename }} {mutation}").replace("mutation {", "mutation M {");
    for _ in 0..2 {
        let r = app
            .gql_get(
                Some(&u.token),
                GRAPHQL_RESPONSE,
                &[("query", &doc), ("operationName", "M")],
            )
            .await;
        assert_eq!(r.status, 405, "{}", r.text);
    }
    let subscription = app
        .gql_get(
            Some(&u.token),
            GRAPHQL_RESPONSE,
            &[("query", "subscription { objectEvents { key } }")],
        )
        .await;
    assert_eq!(subscription.status, 405, "{}", subscription.text);
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn get_without_a_query_or_with_bad_parameters_gets_400() {
    let app = TestApp::spawn().await;
    let none = app.gql_get(None, "application/json", &[]).await;
    none.assert_error(400, "INVALID_INPUT");
    let bad_variables = app
        .gql_get(
            None,
            "application/json",
            &[("query", "{ __typename }"), ("variables", "{not json")],
        )
        .await;
    bad_variables.assert_error(400, "INVALID_INPUT");
    let unknown = app
        .gql_get(
            None,
            "application/json",
            &[("query", "{ __typename }"), ("qeury", "x")],
        )
        .await;
    unknown.assert_error(400, "INVALID_INPUT");
}

#[tokio::test]
async fn graphiql_is_served_only_to_clients_that_want_html() {
    let app = TestApp::spawn().await;
    let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    for path in ["/graphql", "/graphql/ws"] {
        let page = app
            .send(
                app.request(Method::GET, path, None)
                    .header("accept", browser),
            )
            .await;
        assert_eq!(page.status, 200);
        assert!(
            page.header("content-type")
                .unwrap()
                .starts_with("text/html")
        );
    }
    let program = app.get("/graphql", None).await;
    assert!(
        program
            .header("content-type")
            .unwrap()
            .starts_with("application/json"),
        "{}",
        program.text
    );
    // The page, an answer and an error share a URL: caches must key on Accept.
    let page = app
        .send(
            app.request(Method::GET, "/graphql?query=%7B__typename%7D", None)
                .header("accept", browser),
        )
        .await;
    let answer = app
        .gql_get(None, "application/json", &[("query", "{__typename}")])
        .await;
    for r in [&page, &answer, &program] {
        let vary = r.header("vary").unwrap_or_default().to_ascii_lowercase();
        assert!(
            vary.contains("accept") && vary.contains("authorization"),
            "{vary}"
        );
    }
}

#[tokio::test]
async fn an_anonymous_get_gets_the_anonymous_budget_for_its_query_string() {
    let app = TestApp::spawn_with(|c| c.max_anonymous_body_bytes = 4096).await;
    let u = app.writer().await;
    let variables = json!({"pad": "x".repeat(8 * 1024)}).to_string();
    let params = [
        ("query", "{ __typename }"),
        ("variables", variables.as_str()),
    ];
    let anonymous = app.gql_get(None, "application/json", &params).await;
    anonymous.assert_error(413, "PAYLOAD_TOO_LARGE");
    let with_token = app
        .gql_get(Some(&u.token), "application/json", &params)
        .await;
    assert_eq!(with_token.status, 200, "{}", with_token.text);
    assert_eq!(with_token.body["data"]["__typename"], "Query");
}

#[tokio::test]
async fn a_batch_answers_each_operation_in_order() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let r = app
        .post(
            "/graphql",
            Some(&u.token),
            &json!([
                {"query": "mutation { createObject(input: {key: \"b\", data: 7}) { key } }"},
                {"query": "query($k: String!) { object(key: $k) { data } }", "variables": {"k": "b"}},
                {"query": "{ nosuchfield }"},
                {"query": format!("{{ {} }}", "a: __typename ".repeat(40))},
                {"query": "{ me { username } }"},
            ]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let answers = r.body.as_array().expect("an array of answers");
    assert_eq!(answers.len(), 5);
    assert_eq!(answers[0]["data"]["createObject"]["key"], "b");
    assert_eq!(answers[1]["data"]["object"]["data"], 7);
    assert_eq!(
        answers[2]["errors"][0]["extensions"]["code"],
        "INVALID_INPUT"
    );
    // Every operation is held to the limits on its own.
    assert_eq!(
        answers[3]["errors"][0]["extensions"]["code"],
        "INVALID_INPUT"
    );
    assert_eq!(answers[4]["data"]["me"]["username"], u.username);
}

#[tokio::test]
async fn a_batch_over_the_cap_or_empty_is_refused_and_runs_nothing() {
    let app = TestApp::spawn_with(|c| c.graphql.graphql_max_batch = 3).await;
    let u = app.writer().await;
    let ops: Vec<Value> = (0..4)
        .map(|i| json!({"query": format!("mutation {{ createObject(input: {{key: \"k{i}\", data: 1}}) {{ key }} }}")}))
        .collect();
    let r = app.post("/graphql", Some(&u.token), &json!(ops)).await;
    r.assert_error(400, "INVALID_INPUT");
    r.assert_mentions("at most 3");
    let empty = app.post("/graphql", Some(&u.token), &json!([])).await;
    empty.assert_error(400, "INVALID_INPUT");
    let one_bad = app
        .post(
            "/graphql",
            Some(&u.token),
            &json!([ops[0], {"notquery": 1}]),
        )
        .await;
    one_bad.assert_error(400, "INVALID_INPUT");
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn persisted_queries_follow_apollos_protocol() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    app.create(&u, "p", json!("hello"), None).await;
    let query = "query Read($k: String!) { object(key: $k) { data } }";
    let hash = sha256_hex(query);
    let vars = json!({"k": "p"});

    // An unknown hash: the client is told to send the text.
    let unknown = app
        .gql_accept(
            t,
            "application/json",
            &json!({"variables": vars, "extensions": persisted(&hash)}),
        )
        .await;
    assert_eq!(unknown.status, 200, "{}", unknown.text);
    assert_eq!(
        unknown.body["errors"][0]["message"],
        "PersistedQueryNotFound"
    );
    assert_eq!(
        unknown.body["errors"][0]["extensions"]["code"],
        "PERSISTED_QUERY_NOT_FOUND"
    );
    let unknown = app
        .gql_accept(
            t,
            APOLLO_ACCEPT,
            &json!({"variables": vars, "extensions": persisted(&hash)}),
        )
        .await;
    assert_request_error(&unknown, "PERSISTED_QUERY_NOT_FOUND");

    // The text with its hash runs and is remembered...
    let full = app
        .gql_accept(
            t,
            APOLLO_ACCEPT,
            &json!({"query": query, "variables": vars, "extensions": persisted(&hash)}),
        )
        .await;
    assert_eq!(full.status, 200, "{}", full.text);
    assert_eq!(full.body["data"]["object"]["data"], "hello");

    // ...so the hash alone now runs it, by POST and by GET.
    let by_hash = app
        .gql_accept(
            t,
            APOLLO_ACCEPT,
            &json!({"variables": vars, "extensions": persisted(&hash)}),
        )
        .await;
    assert_eq!(by_hash.body, full.body);
    let by_get = app
        .gql_get(
            t,
            APOLLO_ACCEPT,
            &[
                ("variables", &vars.to_string()),
                ("extensions", &persisted(&hash).to_string()),
            ],
        )
        .await;
    assert_eq!(by_get.status, 200, "{}", by_get.text);
    assert_eq!(by_get.body, full.body);
    // Upper-case hex names the same query.
    let upper = app
        .gql_accept(
            t,
            APOLLO_ACCEPT,
            &json!({"variables": vars, "extensions": persisted(&hash.to_ascii_uppercase())}),
        )
        .await;
    assert_eq!(upper.body, full.body);
}

#[tokio::test]
async fn persisted_queries_check_the_hash_and_remember_only_accepted_documents() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    let query = "{ __typename }";
    let wrong = sha256_hex("{ me { username } }");
    let mismatch = app
        .gql_accept(
            t,
            APOLLO_ACCEPT,
            &json!({"query": query, "extensions": persisted(&wrong)}),
        )
        .await;
    assert_request_error(&mismatch, "INVALID_INPUT");
    let after = app
        .gql_accept(t, APOLLO_ACCEPT, &json!({"extensions": persisted(&wrong)}))
        .await;
    assert_request_error(&after, "PERSISTED_QUERY_NOT_FOUND");

    for ext in [
        json!({"persistedQuery": {"version": 2, "sha256Hash": sha256_hex(query)}}),
        json!({"persistedQuery": {"version": 1, "sha256Hash": "abc"}}),
        json!({"persistedQuery": "x"}),
    ] {
        let r = app
            .gql_accept(
                t,
                APOLLO_ACCEPT,
                &json!({"query": query, "extensions": ext}),
            )
            .await;
        assert_request_error(&r, "INVALID_INPUT");
    }

    // A document over the limits is refused and not remembered.
    let big = format!("{{ {} }}", "a: __typename ".repeat(40));
    let big_hash = sha256_hex(&big);
    let refused = app
        .gql_accept(
            t,
            APOLLO_ACCEPT,
            &json!({"query": big, "extensions": persisted(&big_hash)}),
        )
        .await;
    assert_request_error(&refused, "INVALID_INPUT");
    let later = app
        .gql_accept(
            t,
            APOLLO_ACCEPT,
            &json!({"extensions": persisted(&big_hash)}),
        )
        .await;
    assert_request_error(&later, "PERSISTED_QUERY_NOT_FOUND");
}

#[tokio::test]
async fn a_persisted_mutation_cannot_run_by_get() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let t = Some(u.token.as_str());
    let mutation = "mutation { createObject(input: {key: \"pm\", data: 1}) { key } }";
    let hash = sha256_hex(mutation);
    let first = app
        .gql_accept(
            t,
            APOLLO_ACCEPT,
            &json!({"query": mutation, "extensions": persisted(&hash)}),
        )
        .await;
    assert_eq!(first.status, 200, "{}", first.text);
    app.delete("/api/object/pm", t).await;
    let r = app
        .gql_get(
            t,
            APOLLO_ACCEPT,
            &[("extensions", &persisted(&hash).to_string())],
        )
        .await;
    assert_eq!(r.status, 405, "{}", r.text);
    assert_eq!(app.read(&u, "pm").await.status, 404, "nothing was written");
}

#[tokio::test]
async fn persisted_queries_can_be_turned_off() {
    let app = TestApp::spawn_with(|c| c.graphql.graphql_persisted_queries_bytes = 0).await;
    let query = "{ __typename }";
    let r = app
        .gql_accept(
            None,
            "application/json",
            &json!({"query": query, "extensions": persisted(&sha256_hex(query))}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["errors"][0]["message"], "PersistedQueryNotSupported");
    assert_eq!(
        r.body["errors"][0]["extensions"]["code"],
        "PERSISTED_QUERY_NOT_SUPPORTED"
    );
    let plain = app.gql(None, query, json!({})).await;
    assert_eq!(plain.gql_data()["__typename"], "Query");
}

#[tokio::test]
async fn persisted_queries_are_kept_per_tenant_and_never_for_anonymous_callers() {
    let app = TestApp::spawn().await;
    let acme = app.user("acme", api::auth::Role::Writer).await;
    let other = app.user("other", api::auth::Role::Writer).await;
    let query = "{ object(key: \"acme/merger\") { data } }";
    let hash = sha256_hex(query);
    let registered = app
        .gql_accept(
            Some(&acme.token),
            APOLLO_ACCEPT,
            &json!({"query": query, "extensions": persisted(&hash)}),
        )
        .await;
    assert_eq!(registered.status, 200, "{}", registered.text);
    let same_tenant = app
        .gql_accept(
            Some(&acme.token),
            APOLLO_ACCEPT,
            &json!({"extensions": persisted(&hash)}),
        )
        .await;
    assert_eq!(same_tenant.status, 200, "{}", same_tenant.text);
    // Whether a hash is known says nothing about what other tenants sent.
    for token in [Some(other.token.as_str()), None] {
        let r = app
            .gql_accept(
                token,
                APOLLO_ACCEPT,
                &json!({"extensions": persisted(&hash)}),
            )
            .await;
        assert_request_error(&r, "PERSISTED_QUERY_NOT_FOUND");
    }
    // An anonymous caller's document runs, and is not remembered.
    let login = "mutation { login(username: \"nobody\", password: \"guess\") { accessToken } }";
    let login_hash = sha256_hex(login);
    let ran = app
        .gql_accept(
            None,
            APOLLO_ACCEPT,
            &json!({"query": login, "extensions": persisted(&login_hash)}),
        )
        .await;
    assert_eq!(ran.status, 200, "{}", ran.text);
    assert_eq!(
        ran.body["errors"][0]["extensions"]["code"],
        "UNAUTHENTICATED"
    );
    for token in [None, Some(acme.token.as_str())] {
        let r = app
            .gql_accept(
                token,
                APOLLO_ACCEPT,
                &json!({"extensions": persisted(&login_hash)}),
            )
            .await;
        assert_request_error(&r, "PERSISTED_QUERY_NOT_FOUND");
    }
}

#[tokio::test]
async fn persisted_queries_are_each_callers_own() {
    let app = TestApp::spawn().await;
    let owner = app.user("acme", Role::Owner).await;
    let mint = |prefix: &'static str, name: &'static str| {
        let app = &app;
        let owner = &owner;
        async move {
            let r = app
                .post(
                    "/api/keys",
                    Some(&owner.token),
                    &json!({"name": name, "scope": "read_write", "prefix": prefix}),
                )
                .await;
            assert_eq!(r.status, 201, "{}", r.text);
            r.body["token"].as_str().unwrap().to_owned()
        }
    };
    let app_key = mint("app/", "one").await;
    let same_prefix = mint("app/", "two").await;
    // A mutation whose text holds a value outside the key's prefix.
    let secret = "mutation { putObject(input: {key: \"secret/pin\", data: \"4821\"}) { created } }";
    let hash = sha256_hex(secret);
    let sent = app
        .gql_accept(
            Some(&owner.token),
            APOLLO_ACCEPT,
            &json!({"query": secret, "extensions": persisted(&hash)}),
        )
        .await;
    assert_eq!(sent.status, 200, "{}", sent.text);
    let before = app.snapshot().await;
    let guessed = app
        .gql_accept(
            Some(&app_key),
            APOLLO_ACCEPT,
            &json!({"extensions": persisted(&hash)}),
        )
        .await;
    assert_request_error(&guessed, "PERSISTED_QUERY_NOT_FOUND");
    assert_eq!(app.snapshot().await, before);

    // Nor can another user of the tenant, who sees every key: the text of
    // a password change is no one else's to confirm.
    let writer = app.user("acme", Role::Writer).await;
    let guessed = app
        .gql_accept(
            Some(&writer.token),
            APOLLO_ACCEPT,
            &json!({"extensions": persisted(&hash)}),
        )
        .await;
    assert_request_error(&guessed, "PERSISTED_QUERY_NOT_FOUND");
    assert_eq!(app.snapshot().await, before);

    // A caller's own queries run by hash; even a key with the same prefix
    // must send the text once.
    let own = "{ listObjects { edges { node { key } } } }";
    let own_hash = sha256_hex(own);
    let r = app
        .gql_accept(
            Some(&app_key),
            APOLLO_ACCEPT,
            &json!({"query": own, "extensions": persisted(&own_hash)}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let again = app
        .gql_accept(
            Some(&app_key),
            APOLLO_ACCEPT,
            &json!({"extensions": persisted(&own_hash)}),
        )
        .await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body["data"]["listObjects"]["edges"], json!([]));
    let other_key = app
        .gql_accept(
            Some(&same_prefix),
            APOLLO_ACCEPT,
            &json!({"extensions": persisted(&own_hash)}),
        )
        .await;
    assert_request_error(&other_key, "PERSISTED_QUERY_NOT_FOUND");
}
