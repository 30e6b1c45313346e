//! GraphQL over HTTP, as the GraphQL Foundation's spec describes it: requests
//! by POST (JSON, one operation or a batch) and by GET (queries only), and
//! answers in the media type the client accepts. A client that accepts
//! `application/graphql-response+json` gets 4xx and no `data` when a request
//! fails before execution (parse, validation, variables, limits); a client
//! that accepts only `application/json` gets 200 for those, as GraphQL
//! servers always answered.

use async_graphql::{BatchRequest, BatchResponse};
use poem::http::{HeaderMap, HeaderValue, StatusCode, header};
use poem::{Body, Request, Response};
use serde::Deserialize;

use super::policy;
use crate::config::Config;
use crate::error::ApiError;
use crate::input;
use crate::middleware::Verified;

const GRAPHQL_RESPONSE: &str = "application/graphql-response+json";

/// The media type of an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Media {
    GraphqlResponse,
    Json,
}

impl Media {
    fn content_type(self) -> &'static str {
        match self {
            Media::GraphqlResponse => "application/graphql-response+json; charset=utf-8",
            Media::Json => "application/json; charset=utf-8",
        }
    }
}

/// How much a client wants each of the media types kvql can answer with,
/// from its `Accept` header (RFC 9110 q-values, the most specific range
/// deciding).
#[derive(Debug, PartialEq)]
struct Accepts {
    /// Only an explicit `application/graphql-response+json` counts: a client
    /// that sends `*/*` may not know the type.
    graphql_response: f32,
    json: f32,
    html: f32,
    /// `application/json` or `application/graphql-response+json` named
    /// explicitly.
    explicit_json: f32,
}

fn accepts(headers: &HeaderMap) -> Accepts {
    if headers.get(header::ACCEPT).is_none() {
        return Accepts {
            graphql_response: 0.0,
            json: 1.0,
            html: 0.0,
            explicit_json: 1.0,
        };
    }
    // (specificity, q) of the best match for each target so far.
    let mut graphql = (0u8, 0.0f32);
    let mut json = (0u8, 0.0f32);
    let mut html = (0u8, 0.0f32);
    let mut explicit = 0.0f32;
    for (media, q) in crate::headers::weighted(headers, &header::ACCEPT) {
        let Some((ty, sub)) = media.split_once('/') else {
            continue;
        };
        let offer = |target: &mut (u8, f32), want_ty: &str, want_sub: &str| {
            let specificity = match (ty == want_ty, sub == want_sub) {
                (true, true) => 3,
                (true, false) if sub == "*" => 2,
                _ if ty == "*" && sub == "*" => 1,
                _ => return,
            };
            if specificity > target.0 {
                *target = (specificity, q);
            }
        };
        offer(&mut json, "application", "json");
        offer(&mut html, "text", "html");
        if media == GRAPHQL_RESPONSE {
            graphql = (3, q);
        }
        if media == "application/json" || media == GRAPHQL_RESPONSE {
            explicit = explicit.max(q);
        }
    }
    Accepts {
        graphql_response: graphql.1,
        json: json.1,
        html: html.1,
        explicit_json: explicit,
    }
}

/// The media type to answer with: `application/graphql-response+json` when
/// the client names it at least as gladly as `application/json`, else
/// `application/json` (also when the client accepts neither: the spec allows
/// it, and a readable error beats a bare 406).
pub(super) fn media(req: &Request) -> Media {
    media_for(req.headers())
}

fn media_for(headers: &HeaderMap) -> Media {
    let a = accepts(headers);
    if a.graphql_response > 0.0 && a.graphql_response >= a.json {
        Media::GraphqlResponse
    } else {
        Media::Json
    }
}

/// Whether a GET wants the GraphiQL page rather than a GraphQL answer: a
/// browser navigating to `/graphql` prefers `text/html` to anything JSON.
pub(super) fn wants_html(req: &Request) -> bool {
    html_for(req.headers())
}

fn html_for(headers: &HeaderMap) -> bool {
    let a = accepts(headers);
    a.html > 0.0 && a.html > a.explicit_json.max(a.json)
}

/// A POST body: one operation (a JSON object) or a batch (a JSON array of
/// at most `max_batch` objects).
pub(super) async fn read_post(
    req: &Request,
    body: Body,
    max_depth: usize,
    max_batch: usize,
) -> Result<BatchRequest, ApiError> {
    let content_type = req.content_type().unwrap_or("");
    let params = content_type.split_once(';').map_or("", |(_, p)| p);
    let charset_ok = params
        .split(';')
        .filter_map(|p| p.split_once('='))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("charset"))
        .all(|(_, v)| {
            let v = v.trim().trim_matches('"');
            v.eq_ignore_ascii_case("utf-8") || v.eq_ignore_ascii_case("utf8")
        });
    if crate::headers::essence(content_type) != "application/json" || !charset_ok {
        return Err(ApiError::UnsupportedMediaType(
            "send GraphQL requests as `Content-Type: application/json` (UTF-8); \
             GET /graphql?query=... also runs queries; uploads are not supported"
                .into(),
        ));
    }
    let bytes = body
        .into_bytes()
        .await
        .map_err(|e| ApiError::invalid("body", format!("could not be read: {e}")))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::InvalidInput {
            field: None,
            message: "the request has no body; send {\"query\": \"...\"}".into(),
        });
    }
    input::check_json(&bytes, max_depth, "GraphQL request")?;
    // A batch is an array: the first byte decides, so the body is read once
    // into its type (serde's untagged `BatchRequest` first copies it whole
    // into a generic tree, then tries each form).
    let is_batch = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let batch = if is_batch {
        serde_json::from_slice::<Vec<async_graphql::Request>>(&bytes).map(BatchRequest::Batch)
    } else {
        serde_json::from_slice::<async_graphql::Request>(&bytes).map(BatchRequest::Single)
    }
    .map_err(|e| ApiError::InvalidInput {
        field: None,
        message: format!(
            "the body is not a GraphQL request (an object with a string `query`, \
             or an array of them): {e}"
        ),
    })?;
    check_batch(batch, max_batch)
}

fn check_batch(batch: BatchRequest, max_batch: usize) -> Result<BatchRequest, ApiError> {
    match &batch {
        BatchRequest::Single(r) => check_single(r)?,
        BatchRequest::Batch(rs) => {
            if rs.is_empty() {
                return Err(ApiError::invalid(
                    "body",
                    "a batch holds at least one operation",
                ));
            }
            if rs.len() > max_batch {
                return Err(ApiError::invalid(
                    "body",
                    format!(
                        "a batch holds at most {max_batch} operations (KVQL_GRAPHQL_MAX_BATCH); \
                         this one holds {}",
                        rs.len()
                    ),
                ));
            }
            rs.iter().try_for_each(check_single)?;
        }
    }
    Ok(batch)
}

/// A request needs a query, or the hash of one it sent before.
fn check_single(r: &async_graphql::Request) -> Result<(), ApiError> {
    if r.query.is_empty() && !r.extensions.contains_key(policy::PERSISTED_QUERY) {
        return Err(ApiError::invalid(
            "query",
            "the request has no `query` (a string holding a GraphQL document)",
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetParams {
    query: Option<String>,
    #[serde(rename = "operationName")]
    operation_name: Option<String>,
    variables: Option<String>,
    extensions: Option<String>,
}

/// A GET request: `?query=&operationName=&variables=&extensions=`, the last
/// two as JSON text. Without a valid token the query string gets the
/// anonymous body budget, as a POST body would.
pub(super) fn read_get(req: &Request, config: &Config) -> Result<BatchRequest, ApiError> {
    let max_depth = config.max_json_depth;
    let query_len = req.uri().query().map_or(0, str::len) as u64;
    if req.extensions().get::<Verified>().is_none() && query_len > config.max_anonymous_body_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "the query string is {query_len} bytes; without a valid token the limit is {} \
             (KVQL_MAX_ANONYMOUS_BODY_BYTES)",
            config.max_anonymous_body_bytes
        )));
    }
    let params = req.params::<GetParams>().map_err(|e| {
        ApiError::invalid(
            "query string",
            format!(
                "expected `query`, `operationName`, `variables` and `extensions` parameters: {e}"
            ),
        )
    })?;
    let json = |name: &str, text: Option<String>| -> Result<serde_json::Value, ApiError> {
        match text.filter(|t| !t.trim().is_empty()) {
            None => Ok(serde_json::Value::Null),
            Some(text) => {
                input::check_json(text.as_bytes(), max_depth, name)?;
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| ApiError::invalid(name, format!("must be a JSON object: {e}")))?;
                if value.is_object() {
                    Ok(value)
                } else {
                    Err(ApiError::invalid(name, "must be a JSON object"))
                }
            }
        }
    };
    let request = serde_json::json!({
        "query": params.query.unwrap_or_default(),
        "operationName": params.operation_name,
        "variables": json("variables", params.variables)?,
        "extensions": json("extensions", params.extensions)?,
    });
    let request = serde_json::from_value::<async_graphql::Request>(request)
        .map_err(|e| ApiError::invalid("query string", e.to_string()))?;
    check_single(&request)?;
    Ok(BatchRequest::Single(request))
}

/// The HTTP answer for what the schema answered.
pub(super) fn answer(resp: BatchResponse, media: Media, get: bool) -> Response {
    let (status, body) = match resp {
        BatchResponse::Single(mut r) => {
            let request_error = r.http_headers.remove(policy::REQUEST_ERROR).is_some();
            let wrong_method = request_error
                && r.errors.iter().any(|e| {
                    e.extensions
                        .as_ref()
                        .and_then(|x| x.get("code"))
                        .is_some_and(|c| *c == async_graphql::Value::from("METHOD_NOT_ALLOWED"))
                });
            let status = if wrong_method {
                StatusCode::METHOD_NOT_ALLOWED
            } else if request_error && media == Media::GraphqlResponse {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::OK
            };
            // The spec: a request error has no `data` entry at all.
            let body = if request_error && media == Media::GraphqlResponse {
                serde_json::to_vec(&RequestErrors {
                    errors: &r.errors,
                    extensions: &r.extensions,
                })
            } else {
                serde_json::to_vec(&r)
            };
            (status, body)
        }
        BatchResponse::Batch(mut rs) => {
            for r in &mut rs {
                r.http_headers.remove(policy::REQUEST_ERROR);
            }
            (StatusCode::OK, serde_json::to_vec(&rs))
        }
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => return poem::IntoResponse::into_response(ApiError::internal(e)),
    };
    let mut out = Response::builder()
        .status(status)
        .content_type(media.content_type())
        .body(body);
    let headers = out.headers_mut();
    headers.insert(header::VARY, HeaderValue::from_static("Accept"));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
    }
    if get {
        vary_for_get(headers);
    }
    out
}

/// `GET /graphql` answers with the page or GraphQL by `Accept`, and with
/// each tenant's own data by `Authorization`: a shared cache must key on both.
pub(super) fn vary_for_get(headers: &mut poem::http::HeaderMap) {
    headers.remove(header::VARY);
    headers.insert(
        header::VARY,
        HeaderValue::from_static("Accept, Authorization"),
    );
}

#[derive(serde::Serialize)]
struct RequestErrors<'a> {
    errors: &'a [async_graphql::ServerError],
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    extensions: &'a std::collections::BTreeMap<String, async_graphql::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_accept(accept: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(a) = accept {
            headers.insert(header::ACCEPT, HeaderValue::from_str(a).unwrap());
        }
        headers
    }

    fn pick(accept: Option<&str>) -> Media {
        media_for(&with_accept(accept))
    }

    fn html(accept: Option<&str>) -> bool {
        html_for(&with_accept(accept))
    }

    #[test]
    fn the_answer_type_follows_the_accept_header() {
        assert_eq!(pick(None), Media::Json);
        assert_eq!(pick(Some("")), Media::Json);
        assert_eq!(pick(Some("*/*")), Media::Json);
        assert_eq!(pick(Some("application/json")), Media::Json);
        assert_eq!(pick(Some(GRAPHQL_RESPONSE)), Media::GraphqlResponse);
        assert_eq!(
            pick(Some(
                "application/graphql-response+json,application/json;q=0.9"
            )),
            Media::GraphqlResponse
        );
        assert_eq!(
            pick(Some(
                "application/json, application/graphql-response+json;q=0.5"
            )),
            Media::Json
        );
        assert_eq!(
            pick(Some("application/graphql-response+json;q=0")),
            Media::Json
        );
        assert_eq!(pick(Some("text/html")), Media::Json);
        assert_eq!(pick(Some("garbage;;;q=x,,")), Media::Json);
    }

    #[test]
    fn browsers_get_the_page_and_programs_get_json() {
        let chromium = "text/html,application/xhtml+xml,application/xml;q=0.9,\
                        image/avif,image/webp,*/*;q=0.8";
        assert!(html(Some(chromium)));
        assert!(html(Some("text/html")));
        assert!(!html(None));
        assert!(!html(Some("*/*")));
        assert!(!html(Some("application/json")));
        assert!(!html(Some("application/json, text/html")));
        assert!(!html(Some(GRAPHQL_RESPONSE)));
    }
}
