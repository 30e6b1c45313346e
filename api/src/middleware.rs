//! What every request goes through: a request id, a body size limit (small
//! unless the request carries a valid token), a time budget, a tracing span,
//! and the guarantee that every error answer is our JSON.

use std::sync::Arc;
use std::time::Instant;

use poem::http::{HeaderValue, Method, StatusCode, header};
use poem::{Body, Endpoint, IntoResponse, PathPattern, Request, Response};
use tracing::Instrument;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, REQUEST_ID};

/// The principal of a request whose bearer token the middleware verified,
/// in the request's extensions, so the doors need not verify it again.
#[derive(Clone)]
pub struct Verified(pub Arc<Principal>);

const REQUEST_ID_HEADER: &str = "x-request-id";

/// Wraps the whole app. Never returns `Err`: errors become JSON answers here.
pub async fn around<E: Endpoint>(
    ep: Arc<E>,
    mut req: Request,
    state: AppState,
) -> poem::Result<Response> {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    // No path: it may hold a key. The access line names the route instead.
    let span = tracing::info_span!("request", request_id = %id, method = %req.method());
    let method = req.method().clone();
    // Cheap to clone (shared bytes); a 405 needs the path for its `Allow`.
    let uri = req.uri().clone();
    let started = Instant::now();
    REQUEST_ID
        .scope(id.clone(), async move {
            let config = state.config();
            // A long-poll of `/api/changes` may wait for a change before
            // its work begins.
            let budget = if uri.path() == "/api/changes" {
                config.request_timeout + crate::store::Wait::MAX.duration()
            } else {
                config.request_timeout
            };
            let deadline = tokio::time::Instant::now() + budget;
            let over_budget = || -> poem::Error {
                ApiError::Timeout(format!(
                    "the request took longer than this server's time budget ({}); \
                     a write may or may not have been applied",
                    humantime::format_duration(budget)
                ))
                .into()
            };
            // Only a caller with a valid token may send a large body: anyone
            // else is refused before more than a small body is read. A token
            // that could not be checked (the database is unavailable) fails
            // the request rather than making its caller anonymous.
            let (caller, unverified) =
                match tokio::time::timeout_at(deadline, verify_bearer(&state, &req)).await {
                    Ok(Ok(caller)) => (caller, None),
                    Ok(Err(e)) => (None, Some(e.into())),
                    Err(_) => (None, Some(over_budget())),
                };
            // A tenant over its request rate is refused before any work.
            let admitted = caller
                .as_deref()
                .map_or(Ok(()), |principal| state.limiter().admit(principal));
            let body_limit = match &caller {
                Some(principal) => {
                    req.extensions_mut().insert(Verified(principal.clone()));
                    config.body_limit()
                }
                None => config.max_anonymous_body_bytes.min(config.body_limit()),
            };
            // Reading the body counts against the time budget too, so a slow
            // client cannot hold a request open by trickling its body.
            let work = async {
                conditions_are_text(&req)?;
                limit_body(&mut req, body_limit).await?;
                ep.call(req).await.map(IntoResponse::into_response)
            };
            let result = match (unverified, admitted) {
                (Some(failed), _) => Err(failed),
                (None, Err(refused)) => Err(refused.into()),
                (None, Ok(())) => match tokio::time::timeout_at(deadline, work).await {
                    Ok(result) => result,
                    Err(_) => Err(over_budget()),
                },
            };
            let route = match &result {
                Ok(resp) => resp.data::<PathPattern>(),
                Err(err) => err.data::<PathPattern>(),
            }
            .map(|p| route_template(&p.0));
            let mut resp = match result {
                Ok(resp) if needs_json(&resp) => json_error(&method, uri.path(), resp.status()),
                Ok(resp) => resp,
                Err(err) => {
                    let status = err.status();
                    if err.is::<ApiError>() {
                        err.into_response()
                    } else if status == StatusCode::METHOD_NOT_ALLOWED
                        || status == StatusCode::NOT_FOUND
                    {
                        json_error(&method, uri.path(), status)
                    } else {
                        ApiError::from_poem(err).into_response()
                    }
                }
            };
            if let Ok(v) = HeaderValue::from_str(&id) {
                resp.headers_mut().insert(REQUEST_ID_HEADER, v);
            }
            let status = resp.status().as_u16();
            let elapsed = started.elapsed();
            let latency_ms = elapsed.as_secs_f64() * 1000.0;
            let route = route.unwrap_or("(none)");
            state
                .metrics()
                .http_request(route, &method, resp.status(), elapsed);
            let tenant = caller.as_deref().map(|p| p.tenant_name.as_str());
            let user = caller.as_deref().map(|p| p.username.as_str());
            if status >= 500 {
                tracing::warn!(target: "kvql::access", route, status, latency_ms, tenant, user, "request failed");
            } else {
                tracing::info!(target: "kvql::access", route, status, latency_ms, tenant, user, "request");
            }
            Ok(resp)
        })
        .instrument(span)
        .await
}

/// A route as the router matched it, with `*` for each path parameter
/// (poem-openapi names them `:param0`, ...), without a trailing slash; no
/// path, and so no key, ever reaches a log line or a metric label. Each
/// pattern's template is made once: patterns come from the route table, so
/// there are as many as routes.
fn route_template(pattern: &str) -> &'static str {
    use std::collections::HashMap;
    use std::sync::{LazyLock, RwLock};
    static TEMPLATES: LazyLock<RwLock<HashMap<Box<str>, &'static str>>> =
        LazyLock::new(RwLock::default);
    if let Ok(known) = TEMPLATES.read()
        && let Some(template) = known.get(pattern)
    {
        return template;
    }
    let template: &'static str = Box::leak(template_of(pattern).into_boxed_str());
    if let Ok(mut known) = TEMPLATES.write() {
        known.insert(pattern.into(), template);
    }
    template
}

fn template_of(pattern: &str) -> String {
    let route = pattern
        .split('/')
        .map(|segment| {
            if segment.starts_with(':') {
                "*"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/");
    match route.trim_end_matches('/') {
        "" if route.is_empty() => "(none)".to_owned(),
        "" => "/".to_owned(),
        trimmed => trimmed.to_owned(),
    }
}

/// The principal of a valid `Authorization: Bearer` token, if there is one.
async fn verify_bearer(
    state: &AppState,
    req: &Request,
) -> Result<Option<Arc<Principal>>, ApiError> {
    let Some(token) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer_token)
    else {
        return Ok(None);
    };
    match state.auth().authenticate(token).await {
        Ok(principal) => Ok(Some(principal)),
        Err(e @ (ApiError::Internal(_) | ApiError::Timeout(_))) => Err(e),
        // A token that is refused is no token here: the route decides
        // whether it needs one (and answers 401 with the reason).
        Err(_) => Ok(None),
    }
}

/// The conditions a request states in headers (`If-Match`,
/// `If-None-Match`, `Last-Event-ID`) must be text (visible ASCII): the
/// routes' header parsing skips any other value as if it were absent, which
/// would turn a conditional write into an unconditional one.
fn conditions_are_text(req: &Request) -> Result<(), ApiError> {
    for name in ["If-Match", "If-None-Match", "Last-Event-ID"] {
        if req
            .headers()
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_err())
        {
            return Err(ApiError::invalid(name, "must be visible ASCII text"));
        }
    }
    Ok(())
}

/// A process-unique id: a random prefix chosen at start and a counter, so
/// that ids are unique across nodes without a system call per request.
fn new_request_id() -> String {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: LazyLock<u32> = LazyLock::new(rand::random);
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:08x}{:016x}",
        *PREFIX,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// An error status whose body is not JSON (the framework's own answers).
fn needs_json(resp: &Response) -> bool {
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(crate::headers::is_json);
    (status.is_client_error() || status.is_server_error()) && !json
}

fn json_error(method: &poem::http::Method, path: &str, status: StatusCode) -> Response {
    let err = match status {
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed(method.to_string()),
        StatusCode::NOT_FOUND => ApiError::NotFound("no such route".into()),
        other => ApiError::from_poem(poem::Error::from_status(other)),
    };
    let mut resp = err.into_response();
    // RFC 9110: a 405 lists the methods the path does accept.
    if status == StatusCode::METHOD_NOT_ALLOWED
        && let Some(v) =
            crate::rest::allowed_methods(path).and_then(|a| HeaderValue::from_str(&a).ok())
    {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    resp
}

/// Refuses bodies over `limit` bytes with 413, whether or not they announce
/// their length.
async fn limit_body(req: &mut Request, limit: u64) -> Result<(), ApiError> {
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "the request body is larger than this server accepts ({limit} bytes)"
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit => Err(too_large()),
        Some(_) => Ok(()),
        // No declared length (chunked HTTP/1.1, or HTTP/2 where a body may
        // come without either header): read it here, up to the limit.
        None if req.headers().contains_key(header::TRANSFER_ENCODING)
            || !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) =>
        {
            let body = req.take_body();
            match body.into_bytes_limit(limit as usize).await {
                Ok(bytes) => {
                    req.set_body(Body::from_bytes(bytes));
                    Ok(())
                }
                Err(poem::error::ReadBodyError::PayloadTooLarge) => Err(too_large()),
                Err(e) => Err(ApiError::invalid("body", format!("could not be read: {e}"))),
            }
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::{route_template, template_of};

    #[test]
    fn a_route_template_hides_path_parameters() {
        assert_eq!(route_template("/api/object/:param0"), "/api/object/*");
        assert_eq!(route_template("/api/object/:param0"), "/api/object/*");
        assert_eq!(template_of("/api/object/:param0"), "/api/object/*");
        assert_eq!(
            route_template("/api/object/:param0/history"),
            "/api/object/*/history"
        );
        assert_eq!(route_template("/graphql/"), "/graphql");
        assert_eq!(route_template("/"), "/");
        assert_eq!(route_template(""), "(none)");
    }
}
