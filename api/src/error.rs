//! The one error type of the API, shared by REST and GraphQL.
//!
//! Each variant fixes its HTTP status and its `code`; the message is a sentence
//! for a human. Internal causes are logged with the request id and never sent
//! to the client.

use std::fmt;

use poem::http::{StatusCode, header};
use poem::{IntoResponse, Response};
use poem_openapi::payload::Json;
use poem_openapi::registry::{MetaResponses, Registry};
use poem_openapi::{ApiResponse, Object};

tokio::task_local! {
    /// The id of the request being served, set by the request middleware.
    pub static REQUEST_ID: String;
}

/// The current request id, if any.
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 401 `UNAUTHENTICATED`: no token, a bad or expired token, or wrong credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// 403 `FORBIDDEN`: authenticated, but the role does not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// 403 `QUOTA_EXCEEDED`: the tenant is at one of its limits (its keys or
    /// their bytes, users per tenant, API keys); nothing was written. Not retried by waiting: remove
    /// something, or have the operator raise the limit.
    #[error("{0}")]
    QuotaExceeded(String),
    /// 404 `NOT_FOUND`: no live value under this key (absent, expired or
    /// another tenant's, all alike), or no such route.
    #[error("{0}")]
    NotFound(String),
    /// 405 `METHOD_NOT_ALLOWED`: the route exists but not with this method.
    #[error("this route does not accept the {0} method")]
    MethodNotAllowed(String),
    /// 409 `ALREADY_EXISTS`: a create met a live value under the key.
    #[error("{0}")]
    AlreadyExists(String),
    /// 412 `VERSION_MISMATCH`: a conditional write or delete named a version
    /// that is no longer current.
    #[error("{0}")]
    VersionMismatch(String),
    /// 400 `INVALID_INPUT`: malformed or out-of-range input; the message names the field.
    #[error("{}", match field { Some(f) => format!("invalid {f}: {message}"), None => message.clone() })]
    InvalidInput {
        field: Option<String>,
        message: String,
    },
    /// 415 `INVALID_INPUT`: the body is not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 413 `PAYLOAD_TOO_LARGE`: a value, a batch or a request body over its limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 429 `RATE_LIMITED`: too many attempts (failed logins) or too much
    /// work queued; retry after `retry_after` seconds (the `Retry-After` header).
    #[error("{message}")]
    RateLimited { message: String, retry_after: u64 },
    /// 503 `TIMEOUT`: the request ran past the server's time budget
    /// (`KVQL_REQUEST_TIMEOUT`); a write may or may not have been applied.
    #[error("{0}")]
    Timeout(String),
    /// `EVENTS_LOST` (GraphQL subscriptions only): the subscriber fell so
    /// far behind that the change log was compacted past what it had still
    /// to receive; the stream ends. `oldest_revision` as for `COMPACTED`.
    #[error(
        "this subscription fell behind further than the change log reaches; re-read the data and subscribe again with afterRevision {oldest_revision} or later"
    )]
    EventsLost { oldest_revision: i64 },
    /// 410 `COMPACTED`: a feed was resumed after a revision whose later
    /// changes are no longer all in the change log; `oldest_revision` is the
    /// oldest revision a feed can resume after. Re-read the data, then
    /// follow the feed from the revision that read returned.
    #[error(
        "the change log no longer holds every change after this revision; re-read the data, then resume after revision {oldest_revision} or later"
    )]
    Compacted { oldest_revision: i64 },
    /// An item of an atomic batch failed: the status and code are the item's,
    /// the message names its index and key. Nothing of the batch was written.
    #[error("item {index} (key {key:?}): {source}")]
    BatchItem {
        index: usize,
        key: String,
        source: Box<ApiError>,
    },
    /// 500 `INTERNAL`: logged with the request id; the client sees only the id.
    #[error("internal error")]
    Internal(std::sync::Arc<anyhow::Error>),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidInput {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(std::sync::Arc::new(err.into()))
    }

    pub fn not_found() -> Self {
        ApiError::NotFound("no value is stored under this key".into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::QuotaExceeded(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::AlreadyExists(_) => StatusCode::CONFLICT,
            ApiError::VersionMismatch(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::InvalidInput { .. } => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BatchItem { source, .. } => source.status(),
            ApiError::EventsLost { .. } | ApiError::Compacted { .. } => StatusCode::GONE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated(_) => "UNAUTHENTICATED",
            ApiError::Forbidden(_) => "FORBIDDEN",
            ApiError::QuotaExceeded(_) => "QUOTA_EXCEEDED",
            ApiError::NotFound(_) => "NOT_FOUND",
            ApiError::MethodNotAllowed(_) => "METHOD_NOT_ALLOWED",
            ApiError::AlreadyExists(_) => "ALREADY_EXISTS",
            ApiError::VersionMismatch(_) => "VERSION_MISMATCH",
            ApiError::InvalidInput { .. } | ApiError::UnsupportedMediaType(_) => "INVALID_INPUT",
            ApiError::PayloadTooLarge(_) => "PAYLOAD_TOO_LARGE",
            ApiError::RateLimited { .. } => "RATE_LIMITED",
            ApiError::Timeout(_) => "TIMEOUT",
            ApiError::BatchItem { source, .. } => source.code(),
            ApiError::EventsLost { .. } => "EVENTS_LOST",
            ApiError::Compacted { .. } => "COMPACTED",
            ApiError::Internal(_) => "INTERNAL",
        }
    }

    /// The field the error is about, when it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ApiError::InvalidInput { field, .. } => field.as_deref(),
            ApiError::BatchItem { source, .. } => source.field(),
            _ => None,
        }
    }

    /// The body sent to clients. Logs internal errors (with their cause) once.
    pub fn body(&self) -> ErrorBody {
        let request_id = request_id();
        if let ApiError::Internal(cause) = self {
            tracing::error!(error = ?cause, "internal error");
        }
        let error = match self {
            ApiError::Internal(_) => match &request_id {
                Some(id) => format!("internal error; quote request id {id} when reporting it"),
                None => "internal error".to_owned(),
            },
            other => other.to_string(),
        };
        let (index, key) = match self {
            ApiError::BatchItem { index, key, .. } => (Some(*index as u64), Some(key.clone())),
            _ => (None, None),
        };
        ErrorBody {
            code: self.code().to_owned(),
            field: self.field().map(str::to_owned),
            index,
            key,
            request_id: matches!(self, ApiError::Internal(_))
                .then_some(request_id)
                .flatten(),
            msg: matches!(self, ApiError::Unauthenticated(_)).then(|| error.clone()),
            oldest_revision: match self {
                ApiError::Compacted { oldest_revision }
                | ApiError::EventsLost { oldest_revision } => Some(*oldest_revision),
                _ => None,
            },
            error,
        }
    }

    /// Turns an error raised by poem or poem-openapi (bad JSON, wrong content
    /// type, unknown route, ...) into ours, so that every answer is JSON.
    pub fn from_poem(err: poem::Error) -> Self {
        if err.is::<ApiError>() {
            if let Ok(api) = err.downcast::<ApiError>() {
                return api;
            }
            unreachable!("checked with is::<ApiError>()");
        }
        if let Some(param) = err.downcast_ref::<poem_openapi::error::ParseParamError>() {
            return ApiError::invalid(param.name, parameter_message(&param.reason));
        }
        if err.is::<poem::error::ParsePathError>() {
            return ApiError::InvalidInput {
                field: None,
                message: "invalid path: a segment is not percent-encoded UTF-8".into(),
            };
        }
        let message = err.to_string();
        match err.status() {
            StatusCode::BAD_REQUEST => ApiError::InvalidInput {
                field: None,
                message: tidy_framework_message(&message),
            },
            StatusCode::UNAUTHORIZED => ApiError::Unauthenticated(
                "a valid bearer token is required: send `Authorization: Bearer <access_token>` from POST /login".into(),
            ),
            StatusCode::FORBIDDEN => ApiError::Forbidden(message),
            StatusCode::NOT_FOUND => ApiError::NotFound("no such route".into()),
            StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed("requested".into()),
            StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge("the request body is larger than this server accepts".into())
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(
                "the request body must be JSON, sent with `Content-Type: application/json`".into(),
            ),
            status if status.is_server_error() => ApiError::internal(anyhow::anyhow!("{message}")),
            _ => ApiError::InvalidInput {
                field: None,
                message: tidy_framework_message(&message),
            },
        }
    }
}

/// What poem-openapi says of a query parameter or header of a plain type
/// (`failed to parse "integer_int64": invalid digit found in string
/// (occurred while parsing "Limit") ...`), said in the client's terms: what
/// the value must be, then the parser's reason.
fn parameter_message(reason: &str) -> String {
    let reason = reason
        .find(" (occurred while parsing ")
        .map_or(reason, |at| &reason[..at]);
    let Some((type_name, detail)) = reason
        .strip_prefix("failed to parse \"")
        .and_then(|rest| rest.split_once("\": "))
    else {
        return reason.to_owned();
    };
    let expected = match type_name {
        t if t.starts_with("integer") => "an integer",
        t if t.starts_with("number") => "a number",
        "boolean" => return "must be `true` or `false`".into(),
        t if t.starts_with("string") => "text",
        other => other,
    };
    format!("must be {expected} ({detail})")
}

/// poem-openapi's messages start with a generic preamble; keep the useful part.
fn tidy_framework_message(message: &str) -> String {
    let m = message
        .strip_prefix("parse request payload error: ")
        .unwrap_or(message);
    if m.is_empty() {
        "the request could not be parsed".into()
    } else {
        m.to_owned()
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(err: sea_orm::DbErr) -> Self {
        crate::metrics::db_error(&err);
        ApiError::internal(err)
    }
}

/// Every error answer: `{"error": "<sentence>", "code": "<CODE>"}`, plus
/// `field`, `index`/`key` (a batch that failed as a whole), `request_id`
/// (internal errors) or `msg` (401) when they apply.
#[derive(Debug, Clone, serde::Serialize, Object)]
pub struct ErrorBody {
    /// What went wrong, as a sentence for a human.
    pub error: String,
    /// Stable machine-readable code: UNAUTHENTICATED, FORBIDDEN, NOT_FOUND,
    /// METHOD_NOT_ALLOWED, ALREADY_EXISTS, VERSION_MISMATCH, INVALID_INPUT,
    /// PAYLOAD_TOO_LARGE, RATE_LIMITED, QUOTA_EXCEEDED, TIMEOUT, COMPACTED or
    /// INTERNAL.
    pub code: String,
    /// The input field at fault, for INVALID_INPUT.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For a batch that failed as a whole: the position of the item at fault
    /// (absent for QUOTA_EXCEEDED, which no single item causes).
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    /// For a batch that failed as a whole: the key of the item at fault.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// For INTERNAL: the id to quote when reporting it (also in `X-Request-Id`).
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// For UNAUTHENTICATED: the same sentence as `error`, under the name the
    /// original Flask service gave it, for clients written against that service.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msg: Option<String>,
    /// For COMPACTED and EVENTS_LOST: the oldest revision a feed can resume after.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_revision: Option<i64>,
}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        ApiError::status(self)
    }

    fn as_response(&self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut resp = Response::builder()
            .status(self.status())
            .content_type("application/json; charset=utf-8")
            .body(body);
        match self {
            ApiError::Unauthenticated(_) => {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            ApiError::RateLimited { retry_after, .. } => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from(*retry_after));
            }
            _ => {}
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        poem::error::ResponseError::as_response(&self)
    }
}

/// Every error answer as documented in OpenAPI; each route declares the ones
/// it can give through [`Errors`].
#[derive(ApiResponse)]
#[allow(dead_code)]
enum ErrorResponses {
    /// INVALID_INPUT: malformed JSON, a missing or mistyped field, or a value
    /// out of range; `field` names the input at fault.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// UNAUTHENTICATED: a missing, malformed, expired or revoked token (or, at
    /// login, wrong credentials).
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>, #[oai(header = "WWW-Authenticate")] String),
    /// FORBIDDEN: the token's role does not allow this (a `reader` writing,
    /// anyone but an owner administering users), or QUOTA_EXCEEDED: the
    /// tenant is at one of its limits (keys or bytes stored, see
    /// `GET /api/usage`; users; API keys); nothing was written.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// NOT_FOUND: no live value under the key (absent, expired or another
    /// tenant's, all alike).
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// ALREADY_EXISTS: a live value is already stored under the key.
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// VERSION_MISMATCH: `If-Match` named a version that is no longer current.
    #[oai(status = 412)]
    PreconditionFailed(Json<ErrorBody>),
    /// COMPACTED: the change log no longer holds every change after the
    /// revision asked for; `oldest_revision` is the oldest one a feed can
    /// resume after. Re-read the data and follow from its revision.
    #[oai(status = 410)]
    Gone(Json<ErrorBody>),
    /// PAYLOAD_TOO_LARGE: a value, a batch or the request body over its limit.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// INVALID_INPUT: the body is not sent as `application/json`.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// RATE_LIMITED: too many attempts; retry after `Retry-After` seconds.
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
    /// INTERNAL: logged server-side under `request_id`; quote it when reporting.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// TIMEOUT: the request ran past the server's time budget and was
    /// stopped; a write may or may not have been applied.
    #[oai(status = 503)]
    Timeout(Json<ErrorBody>),
}

/// Every error status, for a route that has not said which it gives: prefer
/// [`Errors`], which declares only those (schemathesis flags the others).
impl ApiResponse for ApiError {
    fn meta() -> MetaResponses {
        ErrorResponses::meta()
    }

    fn register(registry: &mut Registry) {
        ErrorResponses::register(registry);
    }
}

/// The error statuses one route can answer with, as it declares them in
/// OpenAPI: the document must list every status a route gives, and only those.
pub trait ErrorStatuses: Send + Sync + 'static {
    const STATUSES: &'static [u16];
}

/// An [`ApiError`] returned by a route that declares the statuses `S` lists.
/// Only the declaration differs: the answer is the error's own.
pub struct Errors<S>(pub ApiError, std::marker::PhantomData<fn() -> S>);

impl<S> From<ApiError> for Errors<S> {
    fn from(err: ApiError) -> Self {
        Errors(err, std::marker::PhantomData)
    }
}

impl<S> From<Errors<S>> for poem::Error {
    fn from(err: Errors<S>) -> Self {
        err.0.into()
    }
}

impl<S: Send> IntoResponse for Errors<S> {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}

impl<S: ErrorStatuses> ApiResponse for Errors<S> {
    fn meta() -> MetaResponses {
        let mut meta = ErrorResponses::meta();
        meta.responses
            .retain(|r| r.status.is_some_and(|s| S::STATUSES.contains(&s)));
        meta
    }

    fn register(registry: &mut Registry) {
        ErrorResponses::register(registry);
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.error, self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_messages_say_what_the_value_must_be() {
        assert_eq!(
            parameter_message(
                "failed to parse \"integer_int64\": invalid digit found in string \
                 (occurred while parsing \"Limit\") (occurred while parsing \"optional_Limit\")"
            ),
            "must be an integer (invalid digit found in string)"
        );
        assert_eq!(
            parameter_message(
                "failed to parse \"boolean\": provided string was not `true` or `false` \
                 (occurred while parsing \"optional_boolean\")"
            ),
            "must be `true` or `false`"
        );
        assert_eq!(
            parameter_message("the value is required"),
            "the value is required"
        );
    }

    #[test]
    fn a_parameter_that_does_not_parse_names_its_field() {
        let err = poem::Error::from(poem_openapi::error::ParseParamError {
            name: "limit",
            reason: "failed to parse \"integer_int64\": number too large to fit in target type"
                .into(),
        });
        let api = ApiError::from_poem(err);
        assert_eq!(api.field(), Some("limit"));
        assert_eq!(
            api.to_string(),
            "invalid limit: must be an integer (number too large to fit in target type)"
        );
    }
}
