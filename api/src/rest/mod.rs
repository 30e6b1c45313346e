//! The REST door: routes compatible with the seed service's README, described
//! by OpenAPI. Thin: parse at the edge, call `store`, shape the answer.

mod allow;
mod body;
mod changes;
mod keys;
mod params;
mod usage;
mod users;

pub use allow::{all_methods, allowed_methods};

use std::borrow::Cow;
use std::sync::Arc;

use poem::Request;
use poem::web::Data;
use poem_openapi::auth::Bearer;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
use poem_openapi::{ApiResponse, Object, OpenApi, SecurityScheme, Tags};

use crate::app::AppState;
use crate::auth::Principal;
use crate::clock::rfc3339;
use crate::error::{ApiError, ErrorStatuses, Errors};
use crate::middleware::Verified;
use crate::store::{self, Atomicity, Cursor, Expect, Limit, Prefix, Revision, Wait, Watch};
use body::{JsonBody, RawJson};
use changes::{ChangePageView, HistoryPageView, WatchItem, WatchStream};
use params::{
    CreateOnly, CursorText, HistoryCursorText, IfMatch, KeyText, LimitParam, PrefixText,
    RevisionParam, WaitParam,
};

#[derive(Tags)]
enum Tag {
    /// Logging in.
    Auth,
    /// Reading and writing values.
    Objects,
    /// Several values in one call.
    Batch,
    /// Revisions, the change feed and key history.
    Changes,
    /// Administering your tenant's users (owners), and your own password.
    Users,
    /// API keys for apps (owners).
    Keys,
    /// Your tenant's usage and quota.
    Usage,
    /// Liveness and readiness probes.
    Health,
}

/// A bearer token from `POST /login`, or an API key from `POST /api/keys`:
/// `Authorization: Bearer <token>`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_bearer")]
pub struct BearerAuth(Arc<Principal>);

async fn check_bearer(req: &Request, bearer: Bearer) -> poem::Result<Arc<Principal>> {
    if let Some(Verified(principal)) = req.extensions().get::<Verified>() {
        return Ok(principal.clone());
    }
    let state = req
        .data::<AppState>()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("app state missing")))?;
    // The middleware could not verify the token (a transient failure):
    // verified and counted against the tenant's rate here, as GraphQL does.
    let principal = state.auth().authenticate(&bearer.token).await?;
    state.limiter().admit(&principal)?;
    Ok(principal)
}

/// Any JSON value; unlike `serde_json::Value`, a missing field is an error, not `null`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(transparent)]
pub struct JsonValue(pub serde_json::Value);

impl Type for JsonValue {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "any".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema::ANY))
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(self)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl ParseFromJSON for JsonValue {
    fn parse_from_json(value: Option<serde_json::Value>) -> ParseResult<Self> {
        value
            .map(JsonValue)
            .ok_or_else(|| ParseError::custom("required (any JSON value, null included)"))
    }
}

impl ToJSON for JsonValue {
    fn to_json(&self) -> Option<serde_json::Value> {
        Some(self.0.clone())
    }
}

/// Credentials.
#[derive(Object, serde::Deserialize)]
#[serde(remote = "Self")]
#[oai(example)]
struct LoginRequest {
    /// The user's name, as created with `kvql user add`.
    username: String,
    /// The user's password.
    password: String,
}

impl poem_openapi::types::Example for LoginRequest {
    fn example() -> Self {
        LoginRequest {
            username: "admin".into(),
            password: "the password printed at first start".into(),
        }
    }
}

fn example_data() -> JsonValue {
    JsonValue(serde_json::json!({"info": "exampleData"}))
}

impl poem_openapi::types::Example for CreateObjectRequest {
    fn example() -> Self {
        CreateObjectRequest {
            key: KeyText("exampleKey".into()),
            data: example_data(),
            ttl: Some(3600),
        }
    }
}

impl poem_openapi::types::Example for PutObjectRequest {
    fn example() -> Self {
        PutObjectRequest {
            data: example_data(),
            ttl: None,
        }
    }
}

/// A bearer token for the `Authorization` header.
#[derive(Object)]
pub(crate) struct TokenResponse {
    /// The JWT to send as `Authorization: Bearer <access_token>`.
    access_token: String,
    /// Always `Bearer`.
    token_type: String,
    /// Seconds until the token expires.
    expires_in: u64,
}

impl TokenResponse {
    fn bearer(token: crate::auth::IssuedToken) -> TokenResponse {
        TokenResponse {
            access_token: token.access_token,
            token_type: "Bearer".into(),
            expires_in: token.expires_in,
        }
    }
}

/// A value to create.
#[derive(Object, serde::Deserialize)]
#[serde(remote = "Self")]
#[oai(example)]
struct CreateObjectRequest {
    /// 1 to 512 bytes of UTF-8 without control characters.
    key: KeyText,
    /// Any JSON value (object, array, string, number, boolean or null), at
    /// most 1 MiB as compact JSON (413 `PAYLOAD_TOO_LARGE` above); strings
    /// may not contain the NUL character.
    data: JsonValue,
    /// Seconds until the value expires, 1 to 315360000 (ten years); omit or
    /// null for never.
    #[oai(
        nullable,
        validator(minimum(value = "1"), maximum(value = "315360000"))
    )]
    ttl: Option<i64>,
}

/// One item of a batch. Its `key` and `ttl` follow the rules of
/// `POST /api/object`, but are checked per item: an item that breaks them
/// fails alone (400 `INVALID_INPUT` in its result) and the others still
/// apply, unless the batch is atomic.
#[derive(Object, serde::Deserialize)]
#[serde(remote = "Self")]
struct BatchItemRequest {
    /// 1 to 512 bytes of UTF-8 without control characters (checked per item).
    key: String,
    /// Any JSON value, at most 1 MiB as compact JSON (checked per item).
    data: JsonValue,
    /// Seconds until the value expires, 1 to 315360000; omit or null for
    /// never (checked per item).
    #[oai(nullable)]
    ttl: Option<i64>,
}

/// A value to store under the key in the path.
#[derive(Object, serde::Deserialize)]
#[serde(remote = "Self")]
#[oai(example)]
struct PutObjectRequest {
    /// Any JSON value (object, array, string, number, boolean or null), at
    /// most 1 MiB as compact JSON (413 `PAYLOAD_TOO_LARGE` above); strings
    /// may not contain the NUL character.
    data: JsonValue,
    /// Seconds until the value expires, 1 to 315360000 (ten years); omit or
    /// null for never. A PUT replaces the TTL along with the data.
    #[oai(
        nullable,
        validator(minimum(value = "1"), maximum(value = "315360000"))
    )]
    ttl: Option<i64>,
}

body::objects_only!(
    LoginRequest,
    CreateObjectRequest,
    BatchItemRequest,
    PutObjectRequest
);

/// A stored value.
#[derive(Object)]
struct ObjectView {
    /// The key, as stored (not percent-encoded).
    key: String,
    /// The JSON value as stored.
    data: JsonValue,
    /// Grows by one on every write; the ETag is this number in quotes. A new
    /// key starts at 1; a key created again after a delete or an expiry goes
    /// on above every version it had, so an old ETag never matches it.
    version: i64,
    /// The revision of the change that wrote this value: strictly increasing
    /// per tenant in commit order (0 for values written before revisions
    /// existed). Resume `/api/changes` or `/api/watch` after it.
    revision: i64,
    /// Whole seconds left before the value expires (rounded up); null if it never expires.
    #[oai(nullable)]
    ttl: Option<i64>,
    /// When the value expires (RFC 3339, UTC); null if it never expires.
    #[oai(nullable)]
    expires_at: Option<String>,
    /// When the key was created (RFC 3339, UTC).
    created_at: String,
    /// When the value was last written (RFC 3339, UTC).
    updated_at: String,
}

/// `o` as the JSON of [`ObjectView`], with the stored value passed through
/// as it is instead of parsed and serialized again.
fn object_view_json(o: &store::Object) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(o.data.len() + o.key.len() + 192);
    let _ = write!(
        out,
        "{{\"key\":{},\"data\":{},\"version\":{},\"revision\":{},",
        json_string(&o.key),
        o.data,
        o.version,
        o.revision
    );
    push_times(&mut out, o);
    out
}

/// [`WriteResult`] for `o`, serialized as `RawJson` (see [`object_view_json`]).
fn write_result_json(o: &store::Object, created: bool) -> String {
    use std::fmt::Write;
    let message = if created {
        "Key-Value pair created"
    } else {
        "Key-Value pair updated"
    };
    let mut out = String::with_capacity(o.key.len() + 224);
    let _ = write!(
        out,
        "{{\"message\":\"{message}\",\"key\":{},\"version\":{},\"revision\":{},",
        json_string(&o.key),
        o.version,
        o.revision
    );
    push_times(&mut out, o);
    out
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The fields both views end with: `ttl`, `expires_at`, `created_at`,
/// `updated_at`, and the closing brace.
fn push_times(out: &mut String, o: &store::Object) {
    use std::fmt::Write;
    match o.ttl {
        Some(ttl) => {
            let _ = write!(out, "\"ttl\":{ttl}");
        }
        None => out.push_str("\"ttl\":null"),
    }
    match o.expires_at {
        Some(at) => {
            let _ = write!(out, ",\"expires_at\":\"{}\"", rfc3339(at));
        }
        None => out.push_str(",\"expires_at\":null"),
    }
    let _ = write!(
        out,
        ",\"created_at\":\"{}\",\"updated_at\":\"{}\"}}",
        rfc3339(o.created_at),
        rfc3339(o.updated_at)
    );
}

impl From<store::Object> for ObjectView {
    fn from(o: store::Object) -> Self {
        ObjectView {
            data: JsonValue(o.data_json()),
            key: o.key,
            version: o.version,
            revision: o.revision,
            ttl: o.ttl,
            expires_at: o.expires_at.map(rfc3339),
            created_at: rfc3339(o.created_at),
            updated_at: rfc3339(o.updated_at),
        }
    }
}

/// The outcome of a write.
#[derive(Object)]
struct WriteResult {
    /// `Key-Value pair created` or `Key-Value pair updated`.
    message: String,
    /// The key written.
    key: String,
    /// The version now stored.
    version: i64,
    /// The revision of this write (see `ObjectView.revision`).
    revision: i64,
    /// Whole seconds left before the value expires; null if it never expires.
    #[oai(nullable)]
    ttl: Option<i64>,
    /// When the value expires (RFC 3339, UTC); null if it never expires.
    #[oai(nullable)]
    expires_at: Option<String>,
    /// When the key was created (RFC 3339, UTC).
    created_at: String,
    /// When the value was last written (RFC 3339, UTC): now.
    updated_at: String,
}

/// The typed result, against which the test checks [`write_result_json`].
#[cfg(test)]
impl WriteResult {
    fn new(o: &store::Object, created: bool) -> Self {
        WriteResult {
            message: if created {
                "Key-Value pair created"
            } else {
                "Key-Value pair updated"
            }
            .into(),
            key: o.key.clone(),
            version: o.version,
            revision: o.revision,
            ttl: o.ttl,
            expires_at: o.expires_at.map(rfc3339),
            created_at: rfc3339(o.created_at),
            updated_at: rfc3339(o.updated_at),
        }
    }
}

/// The outcome of a delete.
#[derive(Object)]
struct DeleteResult {
    /// `Key-Value pair deleted`.
    message: String,
    /// The key deleted.
    key: String,
    /// The revision of the deletion.
    revision: i64,
}

/// One page of values.
#[derive(Object)]
struct ObjectPage {
    /// Values in byte order of their keys.
    items: Vec<ObjectView>,
    /// Pass as `cursor` to get the next page; null on the last page.
    #[oai(nullable)]
    next_cursor: Option<String>,
}

/// One item's outcome in a batch.
#[derive(Object)]
struct BatchItemResult {
    /// Position of the item in the request, from 0.
    index: u64,
    /// The item's key.
    key: String,
    /// Whether this item was written.
    ok: bool,
    /// The status this item would have had on its own (201, 200, 404, 409, ...).
    status: u16,
    /// The version written, for a successful create or put.
    #[oai(skip_serializing_if_is_none)]
    version: Option<i64>,
    /// The revision of this item's change, for a successful item.
    #[oai(skip_serializing_if_is_none)]
    revision: Option<i64>,
    /// The error code, for a failed item.
    #[oai(skip_serializing_if_is_none)]
    code: Option<String>,
    /// The error message, for a failed item.
    #[oai(skip_serializing_if_is_none)]
    error: Option<String>,
}

/// Per-item results, in request order.
#[derive(Object)]
struct BatchResult {
    /// One result per item, in request order.
    results: Vec<BatchItemResult>,
    /// How many items were written.
    succeeded: u64,
    /// How many items failed (and wrote nothing).
    failed: u64,
}

impl BatchResult {
    /// `ok` gives a successful item's status, version and revision.
    fn new<T>(outcome: store::BatchOutcome<T>, ok: impl Fn(&T) -> (u16, Option<i64>, i64)) -> Self {
        BatchResult {
            succeeded: outcome.succeeded as u64,
            failed: outcome.failed as u64,
            results: outcome
                .items
                .into_iter()
                .map(|item| {
                    let (index, key) = (item.index as u64, item.key);
                    match item.result {
                        Ok(value) => {
                            let (status, version, revision) = ok(&value);
                            BatchItemResult {
                                index,
                                key,
                                ok: true,
                                status,
                                version,
                                revision: Some(revision),
                                code: None,
                                error: None,
                            }
                        }
                        Err(e) => BatchItemResult {
                            index,
                            key,
                            ok: false,
                            status: e.status().as_u16(),
                            version: None,
                            revision: None,
                            code: Some(e.code().to_owned()),
                            error: Some(e.to_string()),
                        },
                    }
                })
                .collect(),
        }
    }
}

/// Per-item results of a batch create, in request order, with the message
/// the original service answered.
#[derive(Object)]
struct BatchCreateResult {
    /// Always `Batch create complete`, as the original service answered;
    /// `failed` and `results` tell whether every item was created.
    message: String,
    /// One result per item, in request order.
    results: Vec<BatchItemResult>,
    /// How many items were created.
    succeeded: u64,
    /// How many items failed (and wrote nothing).
    failed: u64,
}

impl From<BatchResult> for BatchCreateResult {
    fn from(r: BatchResult) -> Self {
        BatchCreateResult {
            message: "Batch create complete".into(),
            results: r.results,
            succeeded: r.succeeded,
            failed: r.failed,
        }
    }
}

#[derive(ApiResponse)]
enum BatchCreateResponse {
    /// Every item was created (always so for `atomic=true` and for an empty batch).
    #[oai(status = 201)]
    Created(Json<BatchCreateResult>),
    /// Some items failed, each with its own status and code; the others
    /// were created.
    #[oai(status = 200)]
    Partial(Json<BatchCreateResult>),
}

/// The state of this node.
#[derive(Object)]
struct Health {
    /// `ok`, `ready` or `unavailable`.
    status: String,
}

#[derive(ApiResponse)]
enum GetResponse {
    /// The value.
    #[oai(status = 200)]
    Ok(RawJson<ObjectView>, #[oai(header = "ETag")] String),
    /// `If-None-Match` named the current version.
    #[oai(status = 304)]
    NotModified(#[oai(header = "ETag")] String),
}

#[derive(ApiResponse)]
enum CreateResponse {
    /// Created.
    #[oai(status = 201)]
    Created(RawJson<WriteResult>, #[oai(header = "ETag")] String),
}

#[derive(ApiResponse)]
enum PutResponse {
    /// An existing value was replaced.
    #[oai(status = 200)]
    Replaced(RawJson<WriteResult>, #[oai(header = "ETag")] String),
    /// The key had no live value; it was created.
    #[oai(status = 201)]
    Created(RawJson<WriteResult>, #[oai(header = "ETag")] String),
}

#[derive(ApiResponse)]
enum ReadyResponse {
    /// The database answers.
    #[oai(status = 200)]
    Ready(Json<Health>),
    /// The database does not answer.
    #[oai(status = 503)]
    Unavailable(Json<Health>),
}

pub struct RestApi;

/// Every REST route: the values, and tenant administration.
pub type Apis = (RestApi, users::UsersApi, keys::KeysApi, usage::UsageApi);

/// Declares, per route, the error statuses it can answer with.
macro_rules! error_statuses {
    ($($(#[$attr:meta])* $name:ident = [$($status:literal),*];)*) => {
        $(
            $(#[$attr])*
            struct $name;
            impl ErrorStatuses for $name {
                const STATUSES: &'static [u16] = &[$($status),*];
            }
        )*
    };
}
use error_statuses;

// 503 (`TIMEOUT`, the request time budget) everywhere; 400 and 500 everywhere
// a request carries input or reaches the database; 401
// on every route that needs a token; 403 on writes (a reader's token); 413 and
// 415 where there is a JSON body; the rest as the route's semantics give them.
error_statuses! {
    LoginErrors = [400, 401, 413, 415, 429, 500, 503];
    CreateErrors = [400, 401, 403, 409, 413, 415, 500, 503];
    GetErrors = [400, 401, 404, 500, 503];
    PutErrors = [400, 401, 403, 404, 409, 412, 413, 415, 500, 503];
    DeleteErrors = [400, 401, 403, 404, 412, 500, 503];
    ListErrors = [400, 401, 500, 503];
    /// Atomic batches fail with the failing item's status: a create's 409.
    BatchCreateErrors = [400, 401, 403, 409, 413, 415, 500, 503];
    BatchPutErrors = [400, 401, 403, 413, 415, 500, 503];
    /// Atomic batches fail with the failing item's status: a delete's 404.
    BatchDeleteErrors = [400, 401, 403, 404, 413, 415, 500, 503];
    /// 410 `COMPACTED`: the log no longer holds every change after `after`.
    ChangesErrors = [400, 401, 410, 429, 500, 503];
    HistoryErrors = [400, 401, 500, 503];
}

#[derive(ApiResponse)]
enum ChangesResponse {
    /// The changes after `after` (none when `wait` ran out first).
    #[oai(status = 200)]
    Ok(RawJson<ChangePageView>),
}

#[derive(ApiResponse)]
enum HistoryResponse {
    /// The key's retained changes, newest first.
    #[oai(status = 200)]
    Ok(RawJson<HistoryPageView>),
}

fn parse_if_match(raw: Option<&IfMatch>) -> Result<Option<Expect>, ApiError> {
    raw.map(IfMatch::parse).transpose()
}

fn atomicity(atomic: Option<bool>) -> Atomicity {
    if atomic.unwrap_or(false) {
        Atomicity::Atomic
    } else {
        Atomicity::PerItem
    }
}

#[OpenApi]
impl RestApi {
    /// Log in
    ///
    /// Exchanges a username and password for a bearer token. An unknown user
    /// and a wrong password get the same 401. Too many failed attempts get
    /// 429 `RATE_LIMITED`: retry after `Retry-After` seconds.
    #[oai(path = "/login", method = "post", tag = "Tag::Auth")]
    async fn login(
        &self,
        req: &Request,
        state: Data<&AppState>,
        body: JsonBody<LoginRequest>,
    ) -> Result<Json<TokenResponse>, Errors<LoginErrors>> {
        let auth = state.auth();
        let client = auth.client_addr(req);
        let token = auth
            .login(&body.0.username, &body.0.password, client)
            .await?;
        Ok(Json(TokenResponse::bearer(token)))
    }

    /// Create a value
    ///
    /// Stores `data` under `key`, optionally expiring after `ttl` seconds.
    /// Fails with 409 `ALREADY_EXISTS` if the key holds a live value; an
    /// expired value counts as absent.
    #[oai(path = "/api/object", method = "post", tag = "Tag::Objects")]
    async fn create(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        body: JsonBody<CreateObjectRequest>,
    ) -> Result<CreateResponse, Errors<CreateErrors>> {
        let writer = auth.0.writer()?;
        let store = state.store();
        let body = body.0;
        let item = store.item(body.key.0, &body.data.0, body.ttl)?;
        let object = store.create(writer, item).await?;
        Ok(CreateResponse::Created(
            RawJson::new(write_result_json(&object, true)),
            object.etag(),
        ))
    }

    /// Read a value
    ///
    /// Returns the live value under `key` with its version in the `ETag`
    /// header. Keys are percent-decoded: `a%2Fb` is the key `a/b`. With
    /// `If-None-Match` naming the current ETag, answers 304 without a body.
    #[oai(path = "/api/object/:key", method = "get", tag = "Tag::Objects")]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        key: Path<KeyText>,
        #[oai(name = "If-None-Match")] if_none_match: Header<Option<String>>,
    ) -> Result<GetResponse, Errors<GetErrors>> {
        let key = key.0.parse()?;
        let object = state
            .store()
            .get(auth.0.read_scope(), &key)
            .await?
            .ok_or_else(ApiError::not_found)?;
        let etag = object.etag();
        let matches = if_none_match
            .0
            .as_deref()
            .is_some_and(|h| h.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
        if matches {
            return Ok(GetResponse::NotModified(etag));
        }
        Ok(GetResponse::Ok(
            RawJson::new(object_view_json(&object)),
            etag,
        ))
    }

    /// Create or replace a value
    ///
    /// Stores `data` under `key`: 201 if the key had no live value, 200 if
    /// one was replaced. `If-Match: "<version>"` replaces only that version
    /// (412 `VERSION_MISMATCH` otherwise, 404 if absent); `If-Match: *`
    /// replaces only an existing value; `If-None-Match: *` creates only (409
    /// `ALREADY_EXISTS` otherwise). Both together can never hold: nothing is
    /// written and the answer is the first that fails (404, 412, else 409).
    #[oai(path = "/api/object/:key", method = "put", tag = "Tag::Objects")]
    async fn put(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        key: Path<KeyText>,
        #[oai(name = "If-Match")] if_match: Header<Option<IfMatch>>,
        #[oai(name = "If-None-Match")] if_none_match: Header<Option<CreateOnly>>,
        body: JsonBody<PutObjectRequest>,
    ) -> Result<PutResponse, Errors<PutErrors>> {
        let writer = auth.0.writer()?;
        let store = state.store();
        let body = body.0;
        let item = store.item(key.0.0, &body.data.0, body.ttl)?;
        let expect = match (
            parse_if_match(if_match.0.as_ref())?,
            if_none_match
                .0
                .as_ref()
                .map(CreateOnly::parse)
                .transpose()?,
        ) {
            // If-Match needs a live value and If-None-Match: * its absence, so
            // nothing is written: answer with the first condition that fails,
            // in RFC 9110's order (If-Match first).
            (Some(expect), Some(_)) => {
                writer.may_write(item.key.as_str())?;
                let current = store.get(auth.0.read_scope(), &item.key).await?;
                return Err(match (expect, current) {
                    (_, None) => ApiError::not_found(),
                    (Expect::Version(v), Some(o)) if o.version != v => ApiError::VersionMismatch(
                        format!("the value is no longer at version {v}; read it again and retry"),
                    ),
                    _ => ApiError::AlreadyExists("a value is already stored under this key".into()),
                }
                .into());
            }
            (Some(expect), None) => expect,
            (None, Some(create_only)) => create_only,
            (None, None) => Expect::Any,
        };
        let put = store.put(writer, item, expect).await?;
        let etag = put.object.etag();
        let result = RawJson::new(write_result_json(&put.object, put.created));
        Ok(if put.created {
            PutResponse::Created(result, etag)
        } else {
            PutResponse::Replaced(result, etag)
        })
    }

    /// Delete a value
    ///
    /// Deletes the live value under `key`; 404 if there is none (an expired
    /// value counts as none). `If-Match: "<version>"` deletes only that version.
    #[oai(path = "/api/object/:key", method = "delete", tag = "Tag::Objects")]
    async fn delete(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        key: Path<KeyText>,
        #[oai(name = "If-Match")] if_match: Header<Option<IfMatch>>,
    ) -> Result<Json<DeleteResult>, Errors<DeleteErrors>> {
        let writer = auth.0.writer()?;
        let key = key.0.parse()?;
        let expected = match parse_if_match(if_match.0.as_ref())? {
            Some(Expect::Version(v)) => Some(v),
            _ => None,
        };
        let revision = state.store().delete(writer, &key, expected).await?;
        Ok(Json(DeleteResult {
            message: "Key-Value pair deleted".into(),
            key: key.into_string(),
            revision,
        }))
    }

    /// List values
    ///
    /// Live values whose keys start with `prefix`, in byte order of keys,
    /// at most `limit` per page (1 to 1000, default 100) and about 4 MiB of
    /// keys and values (at least one object): a page may hold fewer than
    /// `limit` and still have a `next_cursor`. Pass `next_cursor` back as
    /// `cursor` for the next page; it is `null` on the last one. A cursor
    /// this server did not issue is refused with 400.
    #[oai(path = "/api/objects", method = "get", tag = "Tag::Objects")]
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        prefix: Query<Option<PrefixText>>,
        limit: Query<Option<LimitParam>>,
        cursor: Query<Option<CursorText>>,
    ) -> Result<Json<ObjectPage>, Errors<ListErrors>> {
        let prefix = Prefix::parse(prefix.0.map(|p| p.0))?;
        let limit = Limit::parse("limit", limit.0.map(|l| l.0))?;
        let cursor = cursor.0.map(|c| Cursor::parse(&c.0)).transpose()?;
        let page = state
            .store()
            .list(auth.0.read_scope(), &prefix, limit, cursor.as_ref())
            .await?;
        Ok(Json(ObjectPage {
            items: page.objects.into_iter().map(ObjectView::from).collect(),
            next_cursor: page.next.map(|c| c.encode()),
        }))
    }

    /// Changes since a revision
    ///
    /// The retained changes of your keys after revision `after`, in revision
    /// order: every create, replace (`PUT`), delete (`DELETE`) and expiry
    /// (`EXPIRE`), with the value for `PUT`. `key` follows one key, `prefix`
    /// the keys under it (not both); neither, every key. At most `limit`
    /// changes (1 to 1000, default 100) and about 4 MiB of values per page.
    /// Pass `last_revision` back as `after` for the next page: following
    /// pages this way sees every change exactly once, in order. Without
    /// `after`, the page starts at the oldest change the log still holds.
    ///
    /// With `wait` (seconds, up to 60) and nothing to answer yet, the request
    /// is held until a change arrives or the time is up (then an empty page):
    /// a blocking query. Changes are kept for `KVQL_CHANGES_RETENTION`; 410
    /// `COMPACTED` when some changes after `after` are gone: re-read the data
    /// and follow from the revision it carries.
    #[oai(path = "/api/changes", method = "get", tag = "Tag::Changes")]
    #[allow(clippy::too_many_arguments)]
    async fn changes(
        &self,
        req: &Request,
        state: Data<&AppState>,
        auth: BearerAuth,
        prefix: Query<Option<PrefixText>>,
        key: Query<Option<KeyText>>,
        after: Query<Option<RevisionParam>>,
        limit: Query<Option<LimitParam>>,
        wait: Query<Option<WaitParam>>,
    ) -> Result<ChangesResponse, Errors<ChangesErrors>> {
        let watch = Watch::parse(key.0.map(|k| k.0), prefix.0.map(|p| p.0))?;
        let after = after.0.map(|a| Revision::parse("after", a.0)).transpose()?;
        let limit = Limit::parse("limit", limit.0.map(|l| l.0))?;
        let wait = Wait::parse(wait.0.map(|w| w.0))?;
        let store = state.store();
        let tenant = auth.0.tenant();
        let after = match after {
            Some(a) => a,
            None => store.oldest_revision(tenant).await?,
        };
        let page = store
            .wait_for_changes(&auth.0, watch, after, limit, wait)
            .await?;
        // A removed user or a revoked key that waited gets nothing: the
        // token is verified again (cached) before the answer.
        // Only a refusal counts: a failed check (the database away for a
        // moment) still answers with the page, as feeds go on.
        if !wait.duration().is_zero()
            && let Err(refused @ ApiError::Unauthenticated(_)) =
                state.auth().authenticate(&bearer_token(req)).await
        {
            return Err(refused.into());
        }
        Ok(ChangesResponse::Ok(RawJson::new(
            changes::change_page_json(&page),
        )))
    }

    /// Watch changes (Server-Sent Events)
    ///
    /// A `text/event-stream` of the changes of your keys after revision
    /// `after` (without it, from now on), then of every change as it is
    /// committed, on any node. Each event has `id:` the revision, `event:`
    /// the kind (`PUT`, `DELETE`, `EXPIRE`) and `data:` the change as one
    /// entry of `/api/changes`. A client that reconnects with
    /// `Last-Event-ID` (browsers' `EventSource` does) resumes after it,
    /// missing nothing and repeating nothing. A comment line is sent every 15
    /// seconds (`KVQL_WATCH_HEARTBEAT`) while nothing happens. Each stream is
    /// one of your change feeds: a user may hold at most 256 at once on a
    /// node (`KVQL_MAX_FEEDS_PER_USER`), then 429 `RATE_LIMITED`. `key` / `prefix` as in `/api/changes`.
    /// 410 `COMPACTED` when the log no longer holds every change after the
    /// revision; an error after the stream has begun (the token expired, or
    /// the log was compacted past a reader too slow to keep up) arrives as
    /// `event: error` with the error body, and the stream ends.
    #[oai(path = "/api/watch", method = "get", tag = "Tag::Changes")]
    #[allow(clippy::too_many_arguments)]
    async fn watch(
        &self,
        req: &Request,
        state: Data<&AppState>,
        auth: BearerAuth,
        prefix: Query<Option<PrefixText>>,
        key: Query<Option<KeyText>>,
        after: Query<Option<RevisionParam>>,
        #[oai(name = "Last-Event-ID")] last_event_id: Header<Option<String>>,
    ) -> Result<WatchStream, Errors<ChangesErrors>> {
        let watch = Watch::parse(key.0.map(|k| k.0), prefix.0.map(|p| p.0))?;
        let after = match last_event_id.0.as_deref().map(str::trim) {
            Some(id) if !id.is_empty() => Some(Revision::parse_text("Last-Event-ID", id)?),
            _ => after.0.map(|a| Revision::parse("after", a.0)).transpose()?,
        };
        let store = state.store();
        let principal = auth.0.clone();
        // The token, verified again (cached) before each change, so that a
        // removed user or a revoked token receives nothing more.
        let feed = store
            .feed(&principal, watch, after)
            .await?
            .for_caller(&principal, Some((state.auth().clone(), bearer_token(req))));
        let stream = futures_util::stream::unfold(feed, |mut feed| async move {
            let item = match feed.next().await? {
                Ok(change) => WatchItem::Change(change),
                Err(e) => WatchItem::Error(e),
            };
            Some((item, feed))
        });
        Ok(WatchStream {
            events: Box::pin(stream),
            heartbeat: state.config().watch_heartbeat,
        })
    }

    /// History of a key
    ///
    /// The retained changes of `key`, newest first: every `PUT` (with the
    /// value), `DELETE` and `EXPIRE`, at most `limit` per page (1 to 1000,
    /// default 100). Pass `next_cursor` back as `cursor` for older changes,
    /// until it is null. Each page looks through at most 10,000 revisions of
    /// your data, so a page of a rarely changed key may hold fewer changes,
    /// even none, and still have a `next_cursor`. A key with no retained
    /// change has an empty history.
    #[oai(
        path = "/api/object/:key/history",
        method = "get",
        tag = "Tag::Changes"
    )]
    async fn history(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        key: Path<KeyText>,
        limit: Query<Option<LimitParam>>,
        cursor: Query<Option<HistoryCursorText>>,
    ) -> Result<HistoryResponse, Errors<HistoryErrors>> {
        let key = key.0.parse()?;
        let limit = Limit::parse("limit", limit.0.map(|l| l.0))?;
        let before = cursor
            .0
            .map(|c| Revision::parse_text("cursor", &c.0))
            .transpose()?;
        let page = state
            .store()
            .history(auth.0.read_scope(), &key, limit, before)
            .await?;
        Ok(HistoryResponse::Ok(RawJson::new(
            changes::history_page_json(&page),
        )))
    }

    /// Create several values
    ///
    /// Creates each item as `POST /api/object` would, in one transaction,
    /// with one result per item in order: 201, or the item's own error (409
    /// `ALREADY_EXISTS`, 413 `PAYLOAD_TOO_LARGE`, ...), and the message
    /// `Batch create complete`. The call answers 201 when every item was
    /// created, 200 when some failed. A failed item writes nothing and the
    /// others still apply. With `atomic=true` the batch is all-or-nothing:
    /// the first failing item fails the whole call with its status and code,
    /// plus its `index` and `key`.
    ///
    /// At most 1000 items (`KVQL_MAX_BATCH_ITEMS`; 413 above). An item whose
    /// `key` or `ttl` breaks the rules above fails on its own (400 in its
    /// result), like any other failing item.
    #[oai(path = "/api/batch/object", method = "post", tag = "Tag::Batch")]
    async fn batch_create(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        atomic: Query<Option<bool>>,
        body: JsonBody<Vec<BatchItemRequest>>,
    ) -> Result<BatchCreateResponse, Errors<BatchCreateErrors>> {
        let writer = auth.0.writer()?;
        let store = state.store();
        store.check_batch_len(body.0.len())?;
        let items = body
            .0
            .into_iter()
            .map(|i| {
                let parsed = store.item(i.key.clone(), &i.data.0, i.ttl);
                (i.key, parsed)
            })
            .collect();
        let outcome = store
            .batch_create(writer, items, atomicity(atomic.0))
            .await?;
        let result = BatchCreateResult::from(BatchResult::new(outcome, |o| {
            (201, Some(o.version), o.revision)
        }));
        Ok(if result.failed == 0 {
            BatchCreateResponse::Created(Json(result))
        } else {
            BatchCreateResponse::Partial(Json(result))
        })
    }

    /// Create or replace several values
    ///
    /// Puts each item as `PUT /api/object/{key}` without conditions would, in
    /// one transaction, with one result per item (201 created, 200 replaced,
    /// or the item's error, e.g. 413). With `atomic=true` the batch is
    /// all-or-nothing.
    ///
    /// At most 1000 items (`KVQL_MAX_BATCH_ITEMS`; 413 above). An item whose
    /// `key` or `ttl` breaks the rules fails on its own (400 in its result).
    #[oai(path = "/api/batch/object", method = "put", tag = "Tag::Batch")]
    async fn batch_put(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        atomic: Query<Option<bool>>,
        body: JsonBody<Vec<BatchItemRequest>>,
    ) -> Result<Json<BatchResult>, Errors<BatchPutErrors>> {
        let writer = auth.0.writer()?;
        let store = state.store();
        store.check_batch_len(body.0.len())?;
        let items = body
            .0
            .into_iter()
            .map(|i| {
                let parsed = store
                    .item(i.key.clone(), &i.data.0, i.ttl)
                    .map(|item| (item, Expect::Any));
                (i.key, parsed)
            })
            .collect();
        let outcome = store.batch_put(writer, items, atomicity(atomic.0)).await?;
        Ok(Json(BatchResult::new(outcome, |p| {
            (
                if p.created { 201 } else { 200 },
                Some(p.object.version),
                p.object.revision,
            )
        })))
    }

    /// Delete several values
    ///
    /// Deletes each key in one transaction, with one result per key (200, or
    /// 404 `NOT_FOUND`). With `atomic=true` the batch is all-or-nothing.
    ///
    /// At most 1000 keys (`KVQL_MAX_BATCH_ITEMS`; 413 above). A key that
    /// breaks the key rules fails on its own (400 in its result).
    #[oai(path = "/api/batch/delete", method = "post", tag = "Tag::Batch")]
    async fn batch_delete(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        atomic: Query<Option<bool>>,
        body: JsonBody<Vec<String>>,
    ) -> Result<Json<BatchResult>, Errors<BatchDeleteErrors>> {
        let writer = auth.0.writer()?;
        let store = state.store();
        store.check_batch_len(body.0.len())?;
        let parsed = body
            .0
            .into_iter()
            .map(|k| (k.clone(), store::Key::parse(k)))
            .collect();
        let outcome = store
            .batch_delete(writer, parsed, atomicity(atomic.0))
            .await?;
        Ok(Json(BatchResult::new(outcome, |r| (200, None, *r))))
    }

    /// Liveness
    ///
    /// 200 while the process runs.
    #[oai(path = "/healthz", method = "get", tag = "Tag::Health")]
    async fn healthz(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
        })
    }

    /// Readiness
    ///
    /// 200 when the database answers, 503 otherwise.
    #[oai(path = "/readyz", method = "get", tag = "Tag::Health")]
    async fn readyz(&self, state: Data<&AppState>) -> ReadyResponse {
        if state.db().ping().await {
            ReadyResponse::Ready(Json(Health {
                status: "ready".into(),
            }))
        } else {
            ReadyResponse::Unavailable(Json(Health {
                status: "unavailable".into(),
            }))
        }
    }
}

/// The OpenAPI service for these routes.
pub fn service() -> poem_openapi::OpenApiService<Apis, ()> {
    poem_openapi::OpenApiService::new(
        (RestApi, users::UsersApi, keys::KeysApi, usage::UsageApi),
        "kvql",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "A multi-tenant JSON key-value store. Log in with `POST /login`, then send \
             `Authorization: Bearer <access_token>`. Every error is JSON \
             `{\"error\": \"...\", \"code\": \"...\"}`.",
    )
}

/// The OpenAPI document as checked in at `openapi.json`.
pub fn openapi_json() -> String {
    service().spec()
}

/// The bearer token of a request that `BearerAuth` accepted, to verify again
/// later (feeds, long-polls).
fn bearer_token(req: &Request) -> String {
    req.header(poem::http::header::AUTHORIZATION)
        .and_then(crate::auth::bearer_token)
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_object_and_write_result_json_equal_the_serialized_views() {
        let cases = [
            (None, None),
            (Some(5), Some(1_795_000_005_000)),
            (Some(5), None),
            (None, Some(1_795_000_005_000)),
        ];
        for (ttl, expires_at) in cases {
            let o = store::Object {
                key: "a \"quoted\" key/ü \\ \u{0} \u{1f} \u{2028}".into(),
                data: r#"{"b":[1,2,{"c":null}],"a":"x"}"#.into(),
                version: 42,
                revision: 7,
                ttl,
                expires_at,
                created_at: 1_795_000_000_000,
                updated_at: 1_795_000_000_123,
            };
            let raw: serde_json::Value = serde_json::from_str(&object_view_json(&o)).unwrap();
            for created in [true, false] {
                let written: serde_json::Value =
                    serde_json::from_str(&write_result_json(&o, created)).unwrap();
                let result = WriteResult::new(&o, created).to_json().unwrap();
                assert_eq!(written, result);
            }
            let view = ObjectView::from(o).to_json().unwrap();
            assert_eq!(raw, view);
        }
    }
}
