//! GraphQL documents built to crash, stall or confuse the server, sent
//! without a token where that is what an attacker would do.

use serde_json::json;

use crate::support::{TestApp, object_path};

fn nested(open: &str, close: &str, n: usize) -> String {
    format!("{}1{}", open.repeat(n), close.repeat(n))
}

/// The server still answers, and an authenticated read still works.
async fn still_serving(app: &TestApp) {
    assert_eq!(app.get("/healthz", None).await.status, 200);
    let u = app.writer().await;
    assert_eq!(app.read(&u, "never-written").await.status, 404);
}

#[tokio::test]
async fn a_deeply_nested_list_literal_is_refused_and_the_server_keeps_answering() {
    let app = TestApp::spawn().await;
    let query = format!("{{object(key:{}){{key}}}}", nested("[", "]", 1600));
    let r = app.gql(None, &query, json!({})).await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    let message = r.body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("nested more than 64 levels"), "{message}");
    still_serving(&app).await;
}

#[tokio::test]
async fn deeply_nested_object_literals_in_data_and_variable_defaults_are_refused() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let data = format!("{}1{}", "{a:".repeat(2000), "}".repeat(2000));
    let mutation = format!("mutation{{createObject(input:{{key:\"deep\",data:{data}}}){{key}}}}");
    let r = app.gql(Some(&u.token), &mutation, json!({})).await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    assert_eq!(
        app.read(&u, "deep").await.status,
        404,
        "nothing was written"
    );

    let defaults = format!(
        "query($keys: [String!] = {}) {{ objects(keys: $keys) {{ key }} }}",
        nested("[", "]", 2000)
    );
    let r = app.gql(None, &defaults, json!({})).await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");

    let selections = format!("{}{}", "{me".repeat(3000), "}".repeat(3000));
    let r = app.gql(None, &selections, json!({})).await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    still_serving(&app).await;
}

#[tokio::test]
async fn a_value_nested_up_to_the_limit_is_stored_and_read_back() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    // `mutation{createObject(input:{` opens 3 levels; 61 lists make 64.
    let mutation = format!(
        "mutation{{createObject(input:{{key:\"deep\",data:{}}}){{key}}}}",
        nested("[", "]", 61)
    );
    let r = app.gql(Some(&u.token), &mutation, json!({})).await;
    assert_eq!(r.gql_data()["createObject"]["key"], "deep");
    let read = app.read(&u, "deep").await;
    assert_eq!(read.status, 200);
    let expected: serde_json::Value = serde_json::from_str(&nested("[", "]", 61)).unwrap();
    assert_eq!(read.body["data"], expected);
}

#[tokio::test]
async fn deeply_nested_json_variables_are_refused_before_parsing() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let body = format!(
        r#"{{"query":"mutation($d: JSON!){{createObject(input:{{key:\"v\",data:$d}}){{key}}}}","variables":{{"d":{}}}}}"#,
        nested("[", "]", 5000)
    );
    let r = app.post_text("/graphql", &u.token, body).await;
    r.assert_error(400, "INVALID_INPUT");
    r.assert_mentions("64 levels");
    assert_eq!(app.read(&u, "v").await.status, 404, "nothing was written");
    still_serving(&app).await;
}

#[tokio::test]
async fn a_deeply_nested_rest_body_is_refused_and_nothing_is_written() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let body = format!(r#"{{"key":"k","data":{}}}"#, nested("[", "]", 100_000));
    let r = app.post_text("/api/object", &u.token, body).await;
    r.assert_error(400, "INVALID_INPUT");
    r.assert_mentions("64 levels");
    assert_eq!(app.read(&u, "k").await.status, 404);
    assert_eq!(app.row_count().await, 0);
    still_serving(&app).await;
}

/// `fragment F{n} on Query {...F{n-1} ...F{n-1}}`: 2^31 selections once
/// expanded, about 1 KB of text.
fn doubling_fragments(levels: usize) -> String {
    let mut q = String::from("query { ...F31 }\nfragment F0 on Query { __typename }\n");
    for i in 1..=levels {
        q.push_str(&format!(
            "fragment F{i} on Query {{ ...F{p} ...F{p} }}\n",
            p = i - 1
        ));
    }
    q
}

#[tokio::test]
async fn fragments_that_double_at_each_level_are_refused_before_they_are_expanded() {
    let app = TestApp::spawn().await;
    let query = doubling_fragments(31);
    assert!(query.len() < 2048);
    // Several at once: each is refused in time linear in its length.
    let answers =
        futures_util::future::join_all((0..3).map(|_| app.gql(None, &query, json!({})))).await;
    for r in answers {
        assert_eq!(r.gql_error_code(), "INVALID_INPUT");
        let message = r.body["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("once its fragments are expanded"),
            "{message}"
        );
    }
    // Spreads of an unknown fragment count as well.
    let unknown = doubling_fragments(31).replace("{ __typename }", "{ ...Missing }");
    let r = app.gql(None, &unknown, json!({})).await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    still_serving(&app).await;
}

#[tokio::test]
async fn a_fragment_that_spreads_itself_is_refused() {
    let app = TestApp::spawn().await;
    let r = app
        .gql(
            None,
            "query { ...A } fragment A on Query { ...B } fragment B on Query { ...A }",
            json!({}),
        )
        .await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    still_serving(&app).await;
}

#[tokio::test]
async fn unknown_misplaced_and_repeated_directives_are_refused() {
    let app = TestApp::spawn().await;
    for query in [
        "{ __typename @nonexistent }",
        "{ __typename @skip(if: false) @skip(if: false) }",
        "query @skip(if: false) { __typename }",
        "{ me @include(if: true) @include(if: true) { username } }",
    ] {
        let r = app.gql(None, query, json!({})).await;
        assert_eq!(r.gql_error_code(), "INVALID_INPUT", "{query}: {}", r.text);
        assert!(r.body["data"].is_null(), "{query}: {}", r.text);
    }
    let r = app
        .gql(None, "{ __typename @skip(if: false) }", json!({}))
        .await;
    assert_eq!(r.gql_data()["__typename"], "Query");
}

#[tokio::test]
async fn a_parse_error_does_not_echo_the_query_text() {
    let app = TestApp::spawn().await;
    let query = format!("{{ {} !!! }}", "field ".repeat(5000));
    let r = app.gql(None, &query, json!({})).await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    let message = r.body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.len() <= 310, "{} bytes: {message}", message.len());
    assert!(!message.contains("field field"), "{message}");
    assert!(r.body["errors"][0]["locations"].is_array(), "{}", r.text);
}

#[tokio::test]
async fn integers_beyond_64_bits_in_a_graphql_literal_are_refused() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let r = app
        .gql(
            Some(&u.token),
            "mutation{createObject(input:{key:\"big\",data:123456789012345678901234567890}){key}}",
            json!({}),
        )
        .await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    assert_eq!(
        app.get(&object_path("big"), Some(&u.token)).await.status,
        404
    );
}

#[tokio::test]
async fn the_selection_budget_covers_all_operations_of_a_document() {
    let app = TestApp::spawn().await;
    // F8 expands to 256 fields and 510 spreads: one operation fits in the
    // budget of 2,000 (and in the complexity limit of 500), three do not.
    let mut fragments = String::from("fragment F0 on Me { username }\n");
    for i in 1..=8 {
        fragments.push_str(&format!(
            "fragment F{i} on Me {{ ...F{p} ...F{p} }}\n",
            p = i - 1
        ));
    }
    let u = app.writer().await;
    let one = format!("query a {{ me {{ ...F8 }} }}\n{fragments}");
    let r = app.gql(Some(&u.token), &one, json!({})).await;
    assert_eq!(r.gql_data()["me"]["username"], u.username.as_str());
    let two = format!(
        "query a {{ me {{ ...F8 }} }}\nquery b {{ me {{ ...F8 }} }}\nquery c {{ me {{ ...F8 }} }}\n{fragments}"
    );
    let r = app
        .send(
            app.client
                .post(app.url("/graphql"))
                .json(&json!({"query": two, "operationName": "a"})),
        )
        .await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    let message = r.body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("the document selects"), "{message}");
}
