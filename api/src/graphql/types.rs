//! GraphQL types. They are API types, separate from the entities: a column
//! rename does not change the schema.

use async_graphql::{
    ComplexObject, Enum, ID, InputObject, InputValueError, InputValueResult, Json, MaybeUndefined,
    Object, OutputType, Positioned, Scalar, ScalarType, ServerResult, SimpleObject, Value,
};
use async_graphql::{Context, ContextSelectionSet, parser::types::Field, registry::Registry};
use async_graphql::{Name, indexmap::IndexMap};
use async_graphql_value::RAW_VALUE_TOKEN;
use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use super::ContextExt;
use crate::clock::rfc3339;
use crate::error::ApiError;
use crate::store;

/// A 64-bit version number, sent as a decimal string (e.g. `"3"`) so that
/// JavaScript clients never lose precision. Inputs accept the string or an Int.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version(pub i64);

/// A 64-bit version number, sent as a decimal string (e.g. `"3"`) so that
/// JavaScript clients never lose precision. Inputs accept the string or an Int.
#[Scalar(name = "Version")]
impl ScalarType for Version {
    fn parse(value: Value) -> InputValueResult<Self> {
        let raw = match &value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return Err(InputValueError::expected_type(value)),
        };
        store::parse_version("expectedVersion", &raw)
            .map(Version)
            .map_err(|e| InputValueError::custom(e.to_string()))
    }

    fn to_value(&self) -> Value {
        Value::String(self.0.to_string())
    }
}

/// A revision of your data: a 64-bit number, strictly increasing in commit
/// order across all your keys, sent as a decimal string (e.g. `"42"`).
/// Inputs accept the string or an Int.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Revision(pub i64);

/// A revision of your data: a 64-bit number, strictly increasing in commit
/// order across all your keys, sent as a decimal string (e.g. `"42"`).
/// Inputs accept the string or an Int.
#[Scalar(name = "Revision")]
impl ScalarType for Revision {
    fn parse(value: Value) -> InputValueResult<Self> {
        let raw = match &value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return Err(InputValueError::expected_type(value)),
        };
        store::Revision::parse_text("revision", &raw)
            .map(|r| Revision(r.get()))
            .map_err(|e| InputValueError::custom(e.to_string()))
    }

    fn to_value(&self) -> Value {
        Value::String(self.0.to_string())
    }
}

/// A 64-bit count (keys, bytes), sent as a decimal string (e.g. `"1048576"`)
/// so that JavaScript clients never lose precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Count(pub u64);

/// A 64-bit count (keys, bytes), sent as a decimal string (e.g. `"1048576"`)
/// so that JavaScript clients never lose precision. Inputs accept the
/// string or an Int.
#[Scalar(name = "Count")]
impl ScalarType for Count {
    fn parse(value: Value) -> InputValueResult<Self> {
        let raw = match &value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return Err(InputValueError::expected_type(value)),
        };
        raw.parse::<u64>()
            .map(Count)
            .map_err(|_| InputValueError::custom("expected a count: digits, 0 or more"))
    }

    fn to_value(&self) -> Value {
        Value::String(self.0.to_string())
    }
}

/// A point in time, RFC 3339 in UTC with milliseconds, e.g. `2026-11-24T10:00:00.000Z`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime(pub i64);

/// A point in time, RFC 3339 in UTC with milliseconds, e.g. `2026-11-24T10:00:00.000Z`.
#[Scalar(name = "DateTime")]
impl ScalarType for DateTime {
    fn parse(value: Value) -> InputValueResult<Self> {
        match &value {
            Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
                .map(|d| DateTime(d.timestamp_millis()))
                .map_err(|e| InputValueError::custom(e.to_string())),
            _ => Err(InputValueError::expected_type(value)),
        }
    }

    fn to_value(&self) -> Value {
        Value::String(rfc3339(self.0))
    }
}

/// A value stored under a key of your tenant.
pub struct KvObject(pub store::Object);

/// A stored value on its way out, as the `JSON` scalar. Its JSON text goes
/// into the answer as it is, not parsed into a tree of values and written
/// out again: async-graphql's `raw_value` writes an object whose only entry
/// is serde_json's raw-value token as that entry's text. Clients cannot
/// send that token as a key (`input::check_json` refuses it), so only this
/// type makes such objects.
pub struct StoredJson(Arc<str>);

impl OutputType for StoredJson {
    fn type_name() -> Cow<'static, str> {
        <Json<serde_json::Value> as OutputType>::type_name()
    }

    fn create_type_info(registry: &mut Registry) -> String {
        <Json<serde_json::Value> as OutputType>::create_type_info(registry)
    }

    async fn resolve(
        &self,
        _ctx: &ContextSelectionSet<'_>,
        _field: &Positioned<Field>,
    ) -> ServerResult<Value> {
        Ok(self.value())
    }
}

impl StoredJson {
    fn value(&self) -> Value {
        static RAW: LazyLock<Name> = LazyLock::new(|| Name::new(RAW_VALUE_TOKEN));
        let mut raw = IndexMap::with_capacity(1);
        raw.insert(RAW.clone(), Value::String(self.0.to_string()));
        Value::Object(raw)
    }
}

/// A field of `KvObject` without arguments, as the fast path
/// (`graphql::fast`) names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KvObjectField {
    Typename,
    Id,
    Key,
    Data,
    Version,
    Revision,
    Ttl,
    ExpiresAt,
    CreatedAt,
    UpdatedAt,
}

impl KvObjectField {
    pub(crate) fn of(name: &str) -> Option<KvObjectField> {
        Some(match name {
            "__typename" => KvObjectField::Typename,
            "id" => KvObjectField::Id,
            "key" => KvObjectField::Key,
            "data" => KvObjectField::Data,
            "version" => KvObjectField::Version,
            "revision" => KvObjectField::Revision,
            "ttl" => KvObjectField::Ttl,
            "expiresAt" => KvObjectField::ExpiresAt,
            "createdAt" => KvObjectField::CreatedAt,
            "updatedAt" => KvObjectField::UpdatedAt,
            _ => return None,
        })
    }
}

impl KvObject {
    /// `data`: the stored JSON, or null when it is JSON `null`.
    fn stored_data(&self) -> Option<StoredJson> {
        (&*self.0.data != "null").then(|| StoredJson(self.0.data.clone()))
    }

    /// The value of `field` as its resolver below gives it, made a value by
    /// the same scalar conversions; the e2e test
    /// `graphql::the_fast_path_answers_every_object_field_as_the_executor_does`
    /// compares the two on every field.
    pub(crate) fn field_value(&self, field: KvObjectField) -> Value {
        let o = &self.0;
        let or_null = |v: Option<Value>| v.unwrap_or(Value::Null);
        match field {
            KvObjectField::Typename => Value::String("KvObject".into()),
            KvObjectField::Id => ID(o.key.clone()).to_value(),
            KvObjectField::Key => Value::String(o.key.clone()),
            KvObjectField::Data => or_null(self.stored_data().map(|d| d.value())),
            KvObjectField::Version => Version(o.version).to_value(),
            KvObjectField::Revision => Revision(o.revision).to_value(),
            KvObjectField::Ttl => or_null(o.ttl.map(Value::from)),
            KvObjectField::ExpiresAt => or_null(o.expires_at.map(|t| DateTime(t).to_value())),
            KvObjectField::CreatedAt => DateTime(o.created_at).to_value(),
            KvObjectField::UpdatedAt => DateTime(o.updated_at).to_value(),
        }
    }
}

/// A value stored under a key of your tenant.
#[Object]
impl KvObject {
    /// The object's identity for client caches: its key, unchanged. A key is
    /// unique within your tenant and an object never changes key, so Apollo
    /// Client, urql and Relay normalise objects with no configuration
    /// (Apollo's cache id is `KvObject:<key>`), and a client can name an
    /// object it has not fetched, e.g. to evict it after `deleteObject`.
    /// A key deleted and created again keeps its id.
    async fn id(&self) -> ID {
        ID(self.0.key.clone())
    }

    /// The key: 1 to 512 bytes of UTF-8 without control characters.
    async fn key(&self) -> &str {
        &self.0.key
    }

    /// The stored JSON value; null when the value is JSON `null`.
    async fn data(&self) -> Option<StoredJson> {
        self.stored_data()
    }

    /// Grows by one on every write. A new key starts at 1; a key created
    /// again after a delete or an expiry goes on above every version it had,
    /// so an old `expectedVersion` never matches it.
    /// Pass it as `expectedVersion` to write only if nobody else has.
    async fn version(&self) -> Version {
        Version(self.0.version)
    }

    /// The revision of the change that wrote this value ("0" for values
    /// written before revisions existed). Pass it as `afterRevision` to
    /// `objectEvents` to follow every later change.
    async fn revision(&self) -> Revision {
        Revision(self.0.revision)
    }

    /// Whole seconds left before the value expires, rounded up; null if it never expires.
    async fn ttl(&self) -> Option<i64> {
        self.0.ttl
    }

    /// When the value expires; null if it never expires.
    async fn expires_at(&self) -> Option<DateTime> {
        self.0.expires_at.map(DateTime)
    }

    /// When the key was created.
    async fn created_at(&self) -> DateTime {
        DateTime(self.0.created_at)
    }

    /// When the value was last written.
    async fn updated_at(&self) -> DateTime {
        DateTime(self.0.updated_at)
    }
}

/// A value to create.
#[derive(InputObject)]
pub struct CreateObjectInput {
    /// 1 to 512 bytes of UTF-8 without control characters.
    pub key: String,
    /// Required: any JSON value. An explicit null stores JSON `null`.
    pub data: MaybeUndefined<Json<serde_json::Value>>,
    /// Seconds until the value expires, 1 to 315360000; omit for never.
    pub ttl: Option<i64>,
}

/// A value to create or replace.
#[derive(InputObject)]
pub struct PutObjectInput {
    /// 1 to 512 bytes of UTF-8 without control characters.
    pub key: String,
    /// Required: any JSON value. An explicit null stores JSON `null`.
    pub data: MaybeUndefined<Json<serde_json::Value>>,
    /// Seconds until the value expires, 1 to 315360000; omit for never. A put
    /// replaces the TTL along with the data.
    pub ttl: Option<i64>,
    /// Write only if the current version is this one (`VERSION_MISMATCH`
    /// otherwise, `NOT_FOUND` if there is no value). Omit to create or replace.
    pub expected_version: Option<Version>,
}

/// The JSON value of an input's `data`, which must be present.
pub fn input_data(
    data: &MaybeUndefined<Json<serde_json::Value>>,
) -> Result<serde_json::Value, ApiError> {
    match data {
        MaybeUndefined::Undefined => Err(ApiError::invalid(
            "data",
            "required (any JSON value; null stores JSON null)",
        )),
        MaybeUndefined::Null => Ok(serde_json::Value::Null),
        MaybeUndefined::Value(Json(v)) => Ok(v.clone()),
    }
}

/// A bearer token.
#[derive(SimpleObject)]
pub struct LoginPayload {
    /// Send it as `Authorization: Bearer <accessToken>`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the token expires.
    pub expires_in: u64,
}

impl From<crate::auth::IssuedToken> for LoginPayload {
    fn from(token: crate::auth::IssuedToken) -> Self {
        LoginPayload {
            access_token: token.access_token,
            token_type: "Bearer".into(),
            expires_in: token.expires_in,
        }
    }
}

/// The outcome of `putObject`.
#[derive(SimpleObject)]
pub struct PutObjectPayload {
    /// The value as now stored.
    pub object: KvObject,
    /// True if the key had no live value and was created; false if replaced.
    pub created: bool,
}

/// One item's outcome in a batch.
#[derive(SimpleObject)]
pub struct BatchItemResult {
    /// Position of the item in the request.
    pub index: i32,
    /// The item's key, as sent.
    pub key: String,
    /// Whether this item was applied.
    pub ok: bool,
    /// The error code when `ok` is false (`ALREADY_EXISTS`, `NOT_FOUND`, ...).
    pub code: Option<String>,
    /// The error message when `ok` is false.
    pub message: Option<String>,
    /// For batchPut: whether the key was created (true) or replaced (false).
    pub created: Option<bool>,
    /// For batchCreate and batchPut: the value as now stored.
    pub object: Option<KvObject>,
    /// The revision of this item's change, when `ok` is true.
    pub revision: Option<Revision>,
}

/// Per-item results of a batch, in request order.
#[derive(SimpleObject)]
pub struct BatchPayload {
    /// One result per item, in request order.
    pub results: Vec<BatchItemResult>,
    /// How many items were applied.
    pub succeeded: i32,
    /// How many items failed (and wrote nothing).
    pub failed: i32,
}

impl BatchPayload {
    /// `done` gives a successful item's `created`, `object` and revision.
    pub fn new<T>(
        outcome: store::BatchOutcome<T>,
        done: impl Fn(T) -> (Option<bool>, Option<store::Object>, i64),
    ) -> Self {
        BatchPayload {
            succeeded: outcome.succeeded as i32,
            failed: outcome.failed as i32,
            results: outcome
                .items
                .into_iter()
                .map(|item| {
                    let (index, key) = (item.index as i32, item.key);
                    match item.result {
                        Ok(value) => {
                            let (created, object, revision) = done(value);
                            BatchItemResult {
                                index,
                                key,
                                ok: true,
                                code: None,
                                message: None,
                                created,
                                object: object.map(KvObject),
                                revision: Some(Revision(revision)),
                            }
                        }
                        Err(e) => BatchItemResult {
                            index,
                            key,
                            ok: false,
                            code: Some(e.code().to_owned()),
                            message: Some(e.to_string()),
                            created: None,
                            object: None,
                            revision: None,
                        },
                    }
                })
                .collect(),
        }
    }
}

/// A page of values.
#[derive(SimpleObject)]
pub struct KvObjectConnection {
    /// The values of this page, in byte order of keys.
    pub edges: Vec<KvObjectEdge>,
    /// Whether there is a next page, and where it starts.
    pub page_info: PageInfo,
}

/// A value and its position in the listing.
#[derive(SimpleObject)]
pub struct KvObjectEdge {
    /// The value.
    pub node: KvObject,
    /// Pass as `after` to continue after this value.
    pub cursor: String,
}

/// Where a page sits in the listing.
#[derive(SimpleObject)]
pub struct PageInfo {
    /// Whether more values follow; pass `endCursor` as `after` to get them.
    pub has_next_page: bool,
    /// The cursor of the last edge; null on an empty page.
    pub end_cursor: Option<String>,
    /// Always false: listings go forward only.
    pub has_previous_page: bool,
    /// The cursor of the first edge; null on an empty page.
    pub start_cursor: Option<String>,
}

/// What a user may do.
#[derive(Enum, Copy, Clone, Eq, PartialEq)]
pub enum Role {
    /// Reads and writes (the bootstrap `admin` is an owner).
    Owner,
    /// Reads and writes.
    Writer,
    /// Reads only.
    Reader,
}

impl From<crate::auth::Role> for Role {
    fn from(r: crate::auth::Role) -> Self {
        match r {
            crate::auth::Role::Owner => Role::Owner,
            crate::auth::Role::Writer => Role::Writer,
            crate::auth::Role::Reader => Role::Reader,
        }
    }
}

impl From<Role> for crate::auth::Role {
    fn from(r: Role) -> Self {
        match r {
            Role::Owner => crate::auth::Role::Owner,
            Role::Writer => crate::auth::Role::Writer,
            Role::Reader => crate::auth::Role::Reader,
        }
    }
}

/// A user of your tenant, as its owners see it.
#[derive(SimpleObject)]
pub struct TenantUser {
    /// The name the user logs in with.
    pub username: String,
    pub role: Role,
    /// A disabled user cannot log in (set by the operator's `kvql user`).
    pub disabled: bool,
    /// When the user was added.
    pub created_at: DateTime,
}

impl From<crate::admin::Member> for TenantUser {
    fn from(m: crate::admin::Member) -> Self {
        TenantUser {
            username: m.username,
            role: m.role.into(),
            disabled: m.disabled,
            created_at: DateTime(m.created_at),
        }
    }
}

/// A user to add to your tenant.
#[derive(InputObject)]
pub struct AddUserInput {
    /// 1 to 64 characters from letters, digits and `._@-`; unique across all
    /// tenants (`ALREADY_EXISTS` if taken).
    pub username: String,
    /// At least 8 characters.
    pub password: String,
    pub role: Role,
}

/// What to change of a user; fields left out stay as they are.
#[derive(InputObject)]
pub struct UpdateUserInput {
    /// The new role.
    pub role: Option<Role>,
    /// A new password (at least 8 characters); it revokes the user's tokens.
    pub password: Option<String>,
}

/// What an API key may do.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum ApiKeyScope {
    /// Read values and follow changes (as a `READER`).
    Read,
    /// Also write them (as a `WRITER`).
    ReadWrite,
}

impl From<ApiKeyScope> for crate::admin::keys::KeyScope {
    fn from(s: ApiKeyScope) -> Self {
        match s {
            ApiKeyScope::Read => crate::admin::keys::KeyScope::Read,
            ApiKeyScope::ReadWrite => crate::admin::keys::KeyScope::ReadWrite,
        }
    }
}

impl From<crate::admin::keys::KeyScope> for ApiKeyScope {
    fn from(s: crate::admin::keys::KeyScope) -> Self {
        match s {
            crate::admin::keys::KeyScope::Read => ApiKeyScope::Read,
            crate::admin::keys::KeyScope::ReadWrite => ApiKeyScope::ReadWrite,
        }
    }
}

/// An API key of your tenant (its token is shown only by `createApiKey`).
#[derive(SimpleObject)]
pub struct ApiKey {
    /// What `revokeApiKey` takes.
    pub id: ID,
    pub name: String,
    pub scope: ApiKeyScope,
    /// The key prefix the key is restricted to; null for every key of the
    /// tenant.
    pub prefix: Option<String>,
    /// The owner who made it.
    pub created_by: String,
    pub created_at: DateTime,
    /// When it stops working; null: never.
    pub expires_at: Option<DateTime>,
    /// When a request last used it, to within a minute; null: never.
    pub last_used_at: Option<DateTime>,
}

impl From<crate::admin::keys::ApiKeyInfo> for ApiKey {
    fn from(k: crate::admin::keys::ApiKeyInfo) -> Self {
        ApiKey {
            id: ID(k.id.to_string()),
            name: k.name,
            scope: k.scope.into(),
            prefix: k.prefix,
            created_by: k.created_by,
            created_at: DateTime(k.created_at),
            expires_at: k.expires_at.map(DateTime),
            last_used_at: k.last_used_at.map(DateTime),
        }
    }
}

/// A key just made, with its token.
#[derive(SimpleObject)]
pub struct CreatedApiKey {
    /// Send it as `Authorization: Bearer <token>` (or in `connection_init`).
    /// Shown this once: store it now.
    pub token: String,
    pub key: ApiKey,
}

/// A key to make.
#[derive(InputObject)]
pub struct CreateApiKeyInput {
    /// 1 to 100 characters, unique within your tenant (`ALREADY_EXISTS`).
    pub name: String,
    pub scope: ApiKeyScope,
    /// Restricts the key to the keys that start with this prefix (at most
    /// 512 bytes, no control characters): requests made with it see and
    /// write nothing else. Reads, lists, batches and subscriptions answer
    /// keys outside it as absent; deleting one answers `NOT_FOUND` and
    /// writing one `FORBIDDEN`. Null or `""`: every key of the tenant.
    pub prefix: Option<String>,
    /// Seconds until the key stops working (1 to ten years); null for a key
    /// that does not expire.
    pub ttl: Option<i64>,
}

/// The caller, as named by the access token.
#[derive(SimpleObject)]
#[graphql(complex)]
pub struct Me {
    /// The user the token was issued to.
    pub username: String,
    /// The tenant whose data this token reads and writes.
    pub tenant: String,
    /// What the user may do; readers cannot write.
    pub role: Role,
    /// When the access token expires.
    pub token_expires_at: DateTime,
}

#[ComplexObject]
impl Me {
    /// Whether this token may write.
    async fn can_write(&self) -> bool {
        self.role != Role::Reader
    }

    /// What your tenant stores in live values (the whole tenant, even for
    /// an API key restricted to a prefix).
    async fn usage(&self, ctx: &Context<'_>) -> async_graphql::Result<Usage> {
        let usage = ctx.state().store().usage(ctx.principal()?).await?;
        let count = |n: i64| Count(u64::try_from(n).unwrap_or(0));
        Ok(Usage {
            keys: count(usage.keys),
            bytes: count(usage.bytes),
        })
    }

    /// Your tenant's limits in force: a write that would take `usage` past
    /// them fails with `QUOTA_EXCEEDED` and writes nothing.
    async fn quota(&self, ctx: &Context<'_>) -> async_graphql::Result<Quota> {
        let quota = ctx.state().store().quota(ctx.principal()?);
        Ok(Quota {
            max_keys: quota.max_keys.map(Count),
            max_bytes: quota.max_bytes.map(Count),
        })
    }
}

/// What a tenant stores in live values.
#[derive(SimpleObject)]
pub struct Usage {
    /// Keys holding a live value.
    pub keys: Count,
    /// Their bytes: each key's UTF-8 bytes plus its value's compact JSON.
    pub bytes: Count,
}

/// A tenant's limits in force (its own, or the servers' defaults).
#[derive(SimpleObject)]
pub struct Quota {
    /// Most keys it may keep; null: no limit.
    pub max_keys: Option<Count>,
    /// Most bytes its values may hold; null: no limit.
    pub max_bytes: Option<Count>,
}

/// What happened to a key.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum EventKind {
    /// The value was created or replaced.
    Put,
    /// The value was deleted by a client.
    Delete,
    /// The value expired and the sweeper removed it.
    Expire,
}

impl From<crate::store::events::EventKind> for EventKind {
    fn from(k: crate::store::events::EventKind) -> Self {
        match k {
            crate::store::events::EventKind::Put => EventKind::Put,
            crate::store::events::EventKind::Delete => EventKind::Delete,
            crate::store::events::EventKind::Expire => EventKind::Expire,
        }
    }
}

/// A change to one key of your tenant.
#[derive(SimpleObject)]
pub struct ObjectEvent {
    /// What happened.
    pub kind: EventKind,
    /// The key it happened to.
    pub key: String,
    /// The version written (PUT), deleted (DELETE) or expired (EXPIRE).
    pub version: Version,
    /// The change's revision: strictly increasing across all your keys, in
    /// commit order. Pass it as `afterRevision` to resume after this change.
    pub revision: Revision,
    /// For PUT: the value written. Null for DELETE and EXPIRE.
    pub object: Option<KvObject>,
}

impl ObjectEvent {
    /// The event of a logged change, its value seen at `now`.
    pub fn from_change(change: store::Change, now: i64) -> Self {
        ObjectEvent {
            kind: change.kind.into(),
            key: change.key.clone(),
            version: Version(change.version),
            revision: Revision(change.revision),
            object: change.object(now).map(KvObject),
        }
    }
}

/// A page of one key's history, newest first.
#[derive(SimpleObject)]
pub struct ObjectChangeConnection {
    /// The changes of this page, newest first.
    pub edges: Vec<ObjectChangeEdge>,
    /// Whether older changes follow, and where they start.
    pub page_info: PageInfo,
}

/// A change and its position in the history.
#[derive(SimpleObject)]
pub struct ObjectChangeEdge {
    /// The change.
    pub node: ObjectEvent,
    /// Pass as `after` to continue with older changes.
    pub cursor: String,
}
