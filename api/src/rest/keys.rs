//! API key routes (`/api/keys`): thin over `admin::keys`, which holds the
//! rules.

use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi};

use super::body::{self, JsonBody};
use super::{BearerAuth, Tag};
use crate::admin::keys::{ApiKeyInfo, KeyScope, MintedKey, NewApiKey};
use crate::app::AppState;
use crate::clock::rfc3339;
use crate::error::{ErrorStatuses, Errors};

/// What a key may do: `read` values and changes (as a `reader`), or also
/// write them (`read_write`, as a `writer`). A key never administers.
#[derive(Enum, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
enum ScopeName {
    Read,
    ReadWrite,
}

impl From<ScopeName> for KeyScope {
    fn from(s: ScopeName) -> KeyScope {
        match s {
            ScopeName::Read => KeyScope::Read,
            ScopeName::ReadWrite => KeyScope::ReadWrite,
        }
    }
}

impl From<KeyScope> for ScopeName {
    fn from(s: KeyScope) -> ScopeName {
        match s {
            KeyScope::Read => ScopeName::Read,
            KeyScope::ReadWrite => ScopeName::ReadWrite,
        }
    }
}

/// An API key of your tenant (its token is shown only when it is made).
#[derive(Object)]
struct ApiKeyView {
    /// What `DELETE /api/keys/{id}` takes.
    id: String,
    name: String,
    scope: ScopeName,
    /// The key prefix the key is restricted to; null for every key of the
    /// tenant.
    #[oai(nullable)]
    prefix: Option<String>,
    /// The owner who made it.
    created_by: String,
    /// RFC 3339, UTC.
    created_at: String,
    /// When it stops working (RFC 3339, UTC); null: never.
    #[oai(nullable)]
    expires_at: Option<String>,
    /// When a request last used it, to within a minute; null: never.
    #[oai(nullable)]
    last_used_at: Option<String>,
}

impl From<ApiKeyInfo> for ApiKeyView {
    fn from(k: ApiKeyInfo) -> ApiKeyView {
        ApiKeyView {
            id: k.id.to_string(),
            name: k.name,
            scope: k.scope.into(),
            prefix: k.prefix,
            created_by: k.created_by,
            created_at: rfc3339(k.created_at),
            expires_at: k.expires_at.map(rfc3339),
            last_used_at: k.last_used_at.map(rfc3339),
        }
    }
}

/// A key just made. `token` is shown this once: send it as
/// `Authorization: Bearer <token>`.
#[derive(Object)]
struct CreatedApiKey {
    id: String,
    /// The secret: store it now, it cannot be shown again.
    token: String,
    name: String,
    scope: ScopeName,
    #[oai(nullable)]
    prefix: Option<String>,
    created_by: String,
    created_at: String,
    #[oai(nullable)]
    expires_at: Option<String>,
}

impl From<MintedKey> for CreatedApiKey {
    fn from(m: MintedKey) -> CreatedApiKey {
        let k = ApiKeyView::from(m.key);
        CreatedApiKey {
            id: k.id,
            token: m.token,
            name: k.name,
            scope: k.scope,
            prefix: k.prefix,
            created_by: k.created_by,
            created_at: k.created_at,
            expires_at: k.expires_at,
        }
    }
}

/// Your tenant's API keys, oldest first.
#[derive(Object)]
struct ApiKeyList {
    keys: Vec<ApiKeyView>,
}

/// A key to make.
#[derive(Object, serde::Deserialize)]
#[serde(remote = "Self")]
struct CreateApiKeyRequest {
    /// 1 to 100 characters, not all blank, without control characters;
    /// unique within your tenant (409 `ALREADY_EXISTS`).
    #[oai(validator(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    ))]
    name: String,
    scope: ScopeName,
    /// Restricts the key to the keys that start with this prefix (at most
    /// 512 bytes, no control characters): requests made with it see and
    /// write nothing else. Reads, lists, batches and change feeds answer
    /// keys outside it as absent; deleting one answers 404 and writing one
    /// 403. Omit it, or send null or `""`, for every key of the tenant.
    #[oai(
        nullable,
        validator(max_length = 512, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$")
    )]
    prefix: Option<String>,
    /// Seconds until the key stops working (1 to 316224000, ten years);
    /// omit it or send null for a key that does not expire.
    #[oai(
        nullable,
        validator(minimum(value = "1"), maximum(value = "316224000"))
    )]
    ttl: Option<i64>,
}

body::objects_only!(CreateApiKeyRequest);

#[derive(ApiResponse)]
enum CreateApiKeyResponse {
    /// The key was made.
    #[oai(status = 201)]
    Created(Json<CreatedApiKey>),
}

#[derive(ApiResponse)]
enum RevokeApiKeyResponse {
    /// The key was revoked.
    #[oai(status = 204)]
    Revoked,
}

super::error_statuses! {
    ListApiKeysErrors = [401, 403, 500, 503];
    /// 403 `QUOTA_EXCEEDED` when the tenant holds 100 keys.
    CreateApiKeyErrors = [400, 401, 403, 409, 413, 415, 500, 503];
    RevokeApiKeyErrors = [400, 401, 403, 404, 500, 503];
}

pub struct KeysApi;

#[OpenApi]
impl KeysApi {
    /// List your tenant's API keys
    ///
    /// Owners only (403 `FORBIDDEN` otherwise). Never shows a key's token.
    #[oai(path = "/api/keys", method = "get", tag = "Tag::Keys")]
    async fn list_api_keys(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
    ) -> Result<Json<ApiKeyList>, Errors<ListApiKeysErrors>> {
        let owner = auth.0.owner()?;
        let keys = state.admin().api_keys(owner).await?;
        Ok(Json(ApiKeyList {
            keys: keys.into_iter().map(ApiKeyView::from).collect(),
        }))
    }

    /// Make an API key
    ///
    /// Owners only. The answer's `token` works as `Authorization: Bearer`
    /// on every route, GraphQL and WebSockets, with role `reader` (scope
    /// `read`) or `writer` (`read_write`), until it expires or is revoked.
    /// It is shown only here.
    #[oai(path = "/api/keys", method = "post", tag = "Tag::Keys")]
    async fn create_api_key(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        body: JsonBody<CreateApiKeyRequest>,
    ) -> Result<CreateApiKeyResponse, Errors<CreateApiKeyErrors>> {
        let owner = auth.0.owner()?;
        let body = body.0;
        let new = NewApiKey::parse(
            &body.name,
            body.scope.into(),
            body.prefix.as_deref(),
            body.ttl,
        )?;
        let minted = state.admin().create_api_key(owner, new).await?;
        Ok(CreateApiKeyResponse::Created(Json(minted.into())))
    }

    /// Revoke an API key
    ///
    /// Owners only. The key stops working at once on this node and within
    /// `KVQL_AUTH_CACHE_TTL` on others. 404 `NOT_FOUND` for another
    /// tenant's key, as for an id nobody has.
    #[oai(path = "/api/keys/:id", method = "delete", tag = "Tag::Keys")]
    async fn revoke_api_key(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<RevokeApiKeyResponse, Errors<RevokeApiKeyErrors>> {
        let owner = auth.0.owner()?;
        state.admin().revoke_api_key(owner, &id.0).await?;
        Ok(RevokeApiKeyResponse::Revoked)
    }
}
