//! GraphQL operation limits: refused before any resolver runs.

use serde_json::json;

use crate::support::TestApp;

/// Four levels deep: listObjects, edges, node, key.
const DEPTH_4: &str = "{ listObjects { edges { node { key } } } }";

#[tokio::test]
async fn a_query_deeper_than_the_limit_is_refused() {
    let app = TestApp::spawn_with(|c| c.graphql.graphql_max_depth = 3).await;
    let u = app.writer().await;
    let r = app.gql(Some(&u.token), DEPTH_4, json!({})).await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    assert!(
        r.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("deep"),
        "{}",
        r.text
    );
    assert_eq!(r.body["data"], json!(null));
    let ok = app
        .gql(Some(&u.token), "{ me { username } }", json!({}))
        .await;
    ok.gql_data();
}

#[tokio::test]
async fn a_query_more_complex_than_the_limit_is_refused() {
    let app = TestApp::spawn_with(|c| c.graphql.graphql_max_complexity = 5).await;
    let u = app.writer().await;
    let r = app
        .gql(
            Some(&u.token),
            "{ listObjects { edges { cursor node { key data version ttl createdAt updatedAt } } } }",
            json!({}),
        )
        .await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    assert!(
        r.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("complex"),
        "{}",
        r.text
    );
}

#[tokio::test]
async fn too_many_aliases_are_refused_before_any_write() {
    let app = TestApp::spawn_with(|c| c.graphql.graphql_max_aliases = 3).await;
    let u = app.writer().await;
    let mutation = |n: usize| {
        let fields: Vec<String> = (0..n)
            .map(|i| format!("a{i}: createObject(input: {{key: \"k{i}\", data: {i}}}) {{ key }}"))
            .collect();
        format!("mutation {{ {} }}", fields.join(" "))
    };
    let r = app.gql(Some(&u.token), &mutation(4), json!({})).await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    assert!(
        r.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("aliases"),
        "{}",
        r.text
    );
    assert_eq!(app.row_count().await, 0, "no resolver ran");
    let ok = app.gql(Some(&u.token), &mutation(3), json!({})).await;
    ok.gql_data();
    assert_eq!(app.row_count().await, 3);
}

#[tokio::test]
async fn too_many_root_fields_are_refused_even_through_fragments() {
    let app = TestApp::spawn_with(|c| c.graphql.graphql_max_root_fields = 2).await;
    let u = app.writer().await;
    let r = app
        .gql(
            Some(&u.token),
            "query { me { username } ...More } fragment More on Query { object(key: \"a\") { key } listObjects { edges { cursor } } }",
            json!({}),
        )
        .await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    assert!(
        r.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("top-level"),
        "{}",
        r.text
    );
}

#[tokio::test]
async fn an_oversized_query_text_is_refused() {
    let app = TestApp::spawn_with(|c| c.graphql.graphql_max_query_bytes = 200).await;
    let u = app.writer().await;
    let long = format!("{{ me {{ username }} }} # {}", "x".repeat(300));
    let r = app.gql(Some(&u.token), &long, json!({})).await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT");
    assert!(
        r.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("bytes"),
        "{}",
        r.text
    );
}

#[tokio::test]
async fn introspection_works_by_default_and_can_be_turned_off() {
    let on = TestApp::spawn().await;
    let q = "{ __schema { queryType { name } } }";
    assert_eq!(
        on.gql(None, q, json!({})).await.gql_data()["__schema"]["queryType"]["name"],
        "Query"
    );
    let off = TestApp::spawn_with(|c| c.graphql.graphql_introspection = false).await;
    let r = off.gql(None, q, json!({})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["__schema"], json!(null), "{}", r.text);
}

#[tokio::test]
async fn graphiqls_full_introspection_query_passes_the_default_limits() {
    let app = TestApp::spawn().await;
    let r = app.gql(None, INTROSPECTION, json!({})).await;
    let data = r.gql_data();
    assert!(data["__schema"]["types"].as_array().unwrap().len() > 10);
}

/// The introspection query GraphiQL sends on load.
const INTROSPECTION: &str = r#"
query IntrospectionQuery {
  __schema {
    queryType { name } mutationType { name } subscriptionType { name }
    types { ...FullType }
    directives { name description locations args { ...InputValue } }
  }
}
fragment FullType on __Type {
  kind name description
  fields(includeDeprecated: true) { name description args { ...InputValue } type { ...TypeRef } isDeprecated deprecationReason }
  inputFields { ...InputValue }
  interfaces { ...TypeRef }
  enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason }
  possibleTypes { ...TypeRef }
}
fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue }
fragment TypeRef on __Type {
  kind name
  ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } }
}
"#;

/// Validation results are reused for a query text seen before, but only when
/// the variables certainly pass: bad variables still get the full
/// validation's answer, and nothing runs.
#[tokio::test]
async fn a_repeated_query_with_bad_variables_is_refused_like_a_new_one() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let put = "mutation($input: PutObjectInput!) { putObject(input: $input) { object { data version } } }";
    for n in 1..=2 {
        let r = app
            .gql(
                Some(&u.token),
                put,
                json!({"input": {"key": "a", "data": n}}),
            )
            .await;
        assert_eq!(
            r.gql_data()["putObject"]["object"]["version"],
            json!(n.to_string())
        );
    }
    for bad in [
        json!({"input": {"key": "a", "data": 3, "bogus": 1}}),
        json!({"input": {"key": 5, "data": 3}}),
        json!({"input": {"data": 3}}),
        json!({"input": null}),
        json!({"input": {"key": "a", "data": 3, "ttl": "soon"}}),
    ] {
        let r = app.gql(Some(&u.token), put, bad.clone()).await;
        assert_eq!(r.gql_error_code(), "INVALID_INPUT", "{bad}: {}", r.text);
        assert_eq!(r.body["data"], json!(null), "{bad}: {}", r.text);
        assert!(
            r.body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .starts_with("Invalid value for argument"),
            "{bad}: {}",
            r.text
        );
    }
    let read = app.read(&u, "a").await;
    assert_eq!(
        (read.body["data"].clone(), read.body["version"].clone()),
        (json!(2), json!(2))
    );

    let doc = "query Me { me { username } } query One($k: String!) { object(key: $k) { key } }";
    let named = |operation: &'static str, variables: serde_json::Value| {
        let body = json!({"query": doc, "operationName": operation, "variables": variables});
        let token = u.token.clone();
        let app = &app;
        async move { app.post("/graphql", Some(&token), &body).await }
    };
    for _ in 0..2 {
        let r = named("One", json!({"k": "a"})).await;
        assert_eq!(r.gql_data()["object"]["key"], "a");
        let r = named("Me", json!({})).await;
        assert_eq!(r.gql_data()["me"]["username"], json!(u.username));
    }
    let r = named("One", json!({"k": 7})).await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT", "{}", r.text);
    assert_eq!(r.body["data"], json!(null), "{}", r.text);
    let r = named("Nope", json!({})).await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT", "{}", r.text);

    // A nullable variable with a default, used where a value is required:
    // null is refused before anything runs, however often the text was seen.
    let audited = "mutation($k: String = \"x\") { a: putObject(input: {key: \"audit\", data: 1}) { object { version } } b: deleteObject(key: $k) }";
    let r = app.gql(Some(&u.token), audited, json!({})).await;
    assert_eq!(r.body["data"]["a"]["object"]["version"], "1", "{}", r.text);
    assert_eq!(r.gql_error_code(), "NOT_FOUND");
    let r = app.gql(Some(&u.token), audited, json!({"k": null})).await;
    assert_eq!(r.gql_error_code(), "INVALID_INPUT", "{}", r.text);
    assert_eq!(r.body["data"], json!(null), "{}", r.text);
    assert_eq!(app.read(&u, "audit").await.body["version"], 1);

    // Validation checks variables in every fragment, even those spread only
    // by another operation of the document.
    let two = "query A { me { username } } query B($k: String!) { ...F } fragment F on Query { object(key: $k) { key } }";
    let run = |variables: serde_json::Value| {
        let body = json!({"query": two, "operationName": "A", "variables": variables});
        let token = u.token.clone();
        let app = &app;
        async move { app.post("/graphql", Some(&token), &body).await }
    };
    let cold = run(json!({"k": 5})).await;
    for _ in 0..2 {
        run(json!({})).await.gql_data();
    }
    let warm = run(json!({"k": 5})).await;
    assert_eq!(warm.body, cold.body);
    assert_eq!(warm.gql_error_code(), "INVALID_INPUT", "{}", warm.text);
}
