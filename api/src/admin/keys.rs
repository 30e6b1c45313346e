//! API keys: long-lived bearer tokens an owner mints for an app, for both
//! doors (REST `/api/keys`, GraphQL `apiKeys`, `createApiKey`,
//! `revokeApiKey`) and verified by `Auth` like an access token.
//!
//! - A token reads `kvql_<id>_<secret>`: the row's id, then 32 random bytes
//!   in unpadded base64url. Only the secret's SHA-256 is stored: the token
//!   is shown once, when it is made. (A fast hash is enough for 256 random
//!   bits; argon2 is for passwords people choose.)
//! - A key acts as a user of its tenant with role `reader` (scope `read`)
//!   or `writer` (scope `read_write`): never as an owner, so a key
//!   administers nothing, mints no key and changes no password.
//! - It belongs to the tenant, not to the owner who made it: removing that
//!   owner leaves it working. Revoking it deletes it: on this node at once,
//!   elsewhere within `KVQL_AUTH_CACHE_TTL`.
//! - Names are unique within a tenant; a tenant holds at most
//!   `MAX_API_KEYS_PER_TENANT` keys (403 `QUOTA_EXCEEDED` beyond).
//! - A key may be restricted to a key prefix: its requests see and write
//!   only keys that start with it (`auth::ReadScope`, `auth::Writer`).

use base64::Engine;
use entity::api_key;
use rand::RngCore;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, Set,
};
use sha2::{Digest, Sha256};

use super::Admin;
use crate::auth::{Owner, Role};
use crate::error::ApiError;
use crate::store::Prefix;

/// Most API keys a tenant may hold.
pub const MAX_API_KEYS_PER_TENANT: u64 = 100;

/// Longest `ttl` of a key, in seconds: ten years.
pub const MAX_KEY_TTL_SECONDS: i64 = 10 * 366 * 24 * 3600;

const TOKEN_PREFIX: &str = "kvql_";
/// 32 bytes in unpadded base64url.
const SECRET_CHARS: usize = 43;

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyScope {
    /// Read values and follow changes (role `reader`).
    Read,
    /// Also write them (role `writer`).
    ReadWrite,
}

impl KeyScope {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyScope::Read => "read",
            KeyScope::ReadWrite => "read_write",
        }
    }

    pub(crate) fn from_column(s: &str) -> Result<KeyScope, ApiError> {
        match s {
            "read" => Ok(KeyScope::Read),
            "read_write" => Ok(KeyScope::ReadWrite),
            other => Err(ApiError::internal(anyhow::anyhow!(
                "unknown API key scope {other:?}"
            ))),
        }
    }

    /// The role a request made with such a key has.
    pub fn role(self) -> Role {
        match self {
            KeyScope::Read => Role::Reader,
            KeyScope::ReadWrite => Role::Writer,
        }
    }
}

/// A valid request for a new key: a name of 1 to 100 characters without
/// control characters and not blank, an optional key prefix (empty: none)
/// and an optional lifetime of 1 s to ten years.
#[derive(Clone, Debug)]
pub struct NewApiKey {
    name: String,
    scope: KeyScope,
    prefix: Option<Prefix>,
    ttl_seconds: Option<i64>,
}

impl NewApiKey {
    pub fn parse(
        name: &str,
        scope: KeyScope,
        prefix: Option<&str>,
        ttl_seconds: Option<i64>,
    ) -> Result<NewApiKey, ApiError> {
        let invalid = |field: &str, message: String| ApiError::InvalidInput {
            field: Some(field.into()),
            message,
        };
        if name.trim().is_empty() || name.chars().count() > 100 {
            return Err(invalid(
                "name",
                "a key's name has 1 to 100 characters and is not blank".into(),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(invalid(
                "name",
                "a key's name has no control characters".into(),
            ));
        }
        let prefix = Prefix::parse(prefix.map(str::to_owned))?;
        if let Some(ttl) = ttl_seconds
            && !(1..=MAX_KEY_TTL_SECONDS).contains(&ttl)
        {
            return Err(invalid(
                "ttl",
                format!(
                    "ttl is a number of seconds from 1 to {MAX_KEY_TTL_SECONDS} (ten years); leave it out for a key that does not expire"
                ),
            ));
        }
        Ok(NewApiKey {
            name: name.to_owned(),
            scope,
            prefix: (!prefix.as_str().is_empty()).then_some(prefix),
            ttl_seconds,
        })
    }
}

/// A key as its tenant's owners see it (never its secret).
#[derive(Clone, Debug)]
pub struct ApiKeyInfo {
    pub id: i64,
    pub name: String,
    pub scope: KeyScope,
    pub prefix: Option<String>,
    /// The owner who made it.
    pub created_by: String,
    /// Unix milliseconds, as the next three.
    pub created_at: i64,
    pub expires_at: Option<i64>,
    /// When a request last used it, to within a minute; `None`: never.
    pub last_used_at: Option<i64>,
}

impl TryFrom<api_key::Model> for ApiKeyInfo {
    type Error = ApiError;

    fn try_from(k: api_key::Model) -> Result<ApiKeyInfo, ApiError> {
        Ok(ApiKeyInfo {
            id: k.id,
            scope: KeyScope::from_column(&k.scope)?,
            name: k.name,
            prefix: k.prefix,
            created_by: k.created_by,
            created_at: k.created_at,
            expires_at: k.expires_at,
            last_used_at: k.last_used_at,
        })
    }
}

/// A key just made, with its token: the only time the token is shown.
#[derive(Clone, Debug)]
pub struct MintedKey {
    pub key: ApiKeyInfo,
    pub token: String,
}

/// The id and secret of a token shaped like an API key's, if it is one.
pub(crate) fn split_token(token: &str) -> Option<(i64, &str)> {
    let (id, secret) = token.strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
    let well_formed = (1..=18).contains(&id.len())
        && !id.starts_with('0')
        && id.bytes().all(|b| b.is_ascii_digit())
        && secret.len() == SECRET_CHARS
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !well_formed {
        return None;
    }
    Some((id.parse().ok()?, secret))
}

/// The stored form of a secret: its SHA-256 in lowercase hex.
pub(crate) fn secret_hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `secret` is the one `stored` was made from, in time that does
/// not depend on where they differ.
pub(crate) fn secret_matches(secret: &str, stored: &str) -> bool {
    let computed = secret_hash(secret);
    computed.len() == stored.len()
        && computed
            .bytes()
            .zip(stored.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn no_such_key() -> ApiError {
    ApiError::NotFound("no API key with this id in your tenant".into())
}

impl Admin<'_> {
    /// Makes a key for the owner's tenant and returns it with its token.
    pub async fn create_api_key(
        &self,
        owner: Owner<'_>,
        new: NewApiKey,
    ) -> Result<MintedKey, ApiError> {
        let tenant = owner.tenant().get();
        let txn = self.locked(owner).await?;
        let keys = api_key::Entity::find()
            .filter(api_key::Column::TenantId.eq(tenant))
            .count(&txn)
            .await?;
        if keys >= MAX_API_KEYS_PER_TENANT {
            txn.rollback().await?;
            return Err(ApiError::QuotaExceeded(format!(
                "your tenant has {keys} API keys, its most ({MAX_API_KEYS_PER_TENANT}); revoke one first"
            )));
        }
        let taken = api_key::Entity::find()
            .filter(api_key::Column::TenantId.eq(tenant))
            .filter(api_key::Column::Name.eq(new.name.as_str()))
            .count(&txn)
            .await?;
        if taken > 0 {
            txn.rollback().await?;
            return Err(ApiError::AlreadyExists(format!(
                "your tenant has an API key named {:?}; names are unique within a tenant",
                new.name
            )));
        }
        let secret = new_secret();
        let now = self.clock.now_ms();
        let inserted = api_key::ActiveModel {
            tenant_id: Set(tenant),
            name: Set(new.name),
            scope: Set(new.scope.as_str().to_owned()),
            prefix: Set(new.prefix.map(|p| p.as_str().to_owned())),
            secret_hash: Set(secret_hash(&secret)),
            created_by: Set(owner.username().to_owned()),
            created_at: Set(now),
            expires_at: Set(new.ttl_seconds.map(|s| now + s * 1000)),
            last_used_at: Set(None),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        txn.commit().await?;
        Ok(MintedKey {
            token: format!("{TOKEN_PREFIX}{}_{secret}", inserted.id),
            key: ApiKeyInfo::try_from(inserted)?,
        })
    }

    /// The keys of the owner's tenant, oldest first (expired ones included,
    /// until revoked).
    pub async fn api_keys(&self, owner: Owner<'_>) -> Result<Vec<ApiKeyInfo>, ApiError> {
        api_key::Entity::find()
            .filter(api_key::Column::TenantId.eq(owner.tenant().get()))
            .order_by_asc(api_key::Column::Id)
            .all(&self.db.read)
            .await?
            .into_iter()
            .map(ApiKeyInfo::try_from)
            .collect()
    }

    /// Revokes (deletes) the key `id` of the owner's tenant; `NOT_FOUND`
    /// for another tenant's key, as for an id nobody has.
    pub async fn revoke_api_key(&self, owner: Owner<'_>, id: &str) -> Result<(), ApiError> {
        let id: i64 = id.parse().map_err(|_| no_such_key())?;
        let txn = self.locked(owner).await?;
        let deleted = api_key::Entity::delete_many()
            .filter(api_key::Column::Id.eq(id))
            .filter(api_key::Column::TenantId.eq(owner.tenant().get()))
            .exec(&txn)
            .await?;
        if deleted.rows_affected == 0 {
            txn.rollback().await?;
            return Err(no_such_key());
        }
        let forget = self.auth.forget_api_key_when_done(id);
        txn.commit().await?;
        drop(forget);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_split_into_id_and_secret_only_when_well_formed() {
        let secret = "a".repeat(SECRET_CHARS);
        let token = format!("kvql_42_{secret}");
        assert_eq!(split_token(&token), Some((42, secret.as_str())));
        for bad in [
            "eyJhbGciOiJIUzI1NiJ9.e30.x".to_owned(),
            format!("kvql__{secret}"),
            format!("kvql_4x_{secret}"),
            format!("kvql_042_{secret}"),
            format!("kvql_0_{secret}"),
            format!("kvql_42_{}", "a".repeat(42)),
            format!("kvql_42_{}", "a".repeat(44)),
            format!("kvql_42_{}!", "a".repeat(42)),
            format!("kvql_{}_{secret}", "9".repeat(19)),
            "kvql_".to_owned(),
        ] {
            assert_eq!(split_token(&bad), None, "{bad}");
        }
    }

    #[test]
    fn a_new_secret_round_trips_through_its_hash() {
        let secret = new_secret();
        assert_eq!(secret.len(), SECRET_CHARS);
        let stored = secret_hash(&secret);
        assert_eq!(stored.len(), 64);
        assert!(secret_matches(&secret, &stored));
        assert!(!secret_matches(&new_secret(), &stored));
        assert!(split_token(&format!("kvql_7_{secret}")).is_some());
    }

    #[test]
    fn new_keys_need_a_name_a_sane_ttl_and_a_valid_prefix() {
        let field = |r: Result<NewApiKey, ApiError>| match r {
            Err(ApiError::InvalidInput { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert!(NewApiKey::parse("ci deploy", KeyScope::Read, None, Some(60)).is_ok());
        assert!(NewApiKey::parse("x", KeyScope::ReadWrite, None, None).is_ok());
        let no_prefix = NewApiKey::parse("x", KeyScope::ReadWrite, Some(""), None).unwrap();
        assert!(no_prefix.prefix.is_none());
        let app = NewApiKey::parse("k", KeyScope::Read, Some("app/"), None).unwrap();
        assert_eq!(app.prefix.as_ref().map(Prefix::as_str), Some("app/"));
        for bad in ["", "   ", "a\nb", &"n".repeat(101)] {
            assert_eq!(
                field(NewApiKey::parse(bad, KeyScope::Read, None, None)).as_deref(),
                Some("name")
            );
        }
        for bad in ["a\u{0}b", "tab\there", &"p".repeat(513)] {
            assert_eq!(
                field(NewApiKey::parse("k", KeyScope::Read, Some(bad), None)).as_deref(),
                Some("prefix")
            );
        }
        for ttl in [0, -1, MAX_KEY_TTL_SECONDS + 1] {
            assert_eq!(
                field(NewApiKey::parse("k", KeyScope::Read, None, Some(ttl))).as_deref(),
                Some("ttl")
            );
        }
    }
}
