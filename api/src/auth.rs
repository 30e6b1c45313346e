//! Passwords, tokens and the [`Principal`].
//!
//! A [`TenantId`] can only be made here, from a verified token, and every store
//! function takes one: code that has not authenticated cannot name a tenant.
//! Writes take a [`Writer`], which only [`Principal::writer`] hands out.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use anyhow::Context;
use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use entity::{signing_key, tenant, user};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set, TransactionTrait,
};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::config::Config;
use crate::db::Db;
use crate::error::ApiError;

/// A tenant, as named by a verified token. Not constructible outside `auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TenantId(i64);

impl TenantId {
    pub(crate) fn get(self) -> i64 {
        self.0
    }

    /// For the store's own tests, which have no tokens.
    #[cfg(test)]
    pub(crate) fn for_store_tests(id: i64) -> TenantId {
        TenantId(id)
    }
}

/// What a user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Reads and writes; reserved for tenant administration.
    Owner,
    /// Reads and writes.
    Writer,
    /// Reads only.
    Reader,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Writer => "writer",
            Role::Reader => "reader",
        }
    }

    pub fn parse(s: &str) -> Result<Role, String> {
        match s {
            "owner" => Ok(Role::Owner),
            "writer" => Ok(Role::Writer),
            "reader" => Ok(Role::Reader),
            other => Err(format!(
                "unknown role {other:?}: use owner, writer or reader"
            )),
        }
    }

    fn can_write(self) -> bool {
        matches!(self, Role::Owner | Role::Writer)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated caller of one request.
#[derive(Clone, Debug)]
pub struct Principal {
    tenant: TenantId,
    pub tenant_name: String,
    pub user_id: i64,
    pub username: String,
    pub role: Role,
    /// When the token expires, Unix milliseconds.
    pub expires_at: i64,
}

/// Proof that the caller may write to `tenant`.
#[derive(Clone, Copy, Debug)]
pub struct Writer<'a> {
    tenant: &'a TenantId,
}

impl Writer<'_> {
    pub fn tenant(&self) -> TenantId {
        *self.tenant
    }
}

impl Principal {
    pub fn tenant(&self) -> TenantId {
        self.tenant
    }

    /// The write permission, or `FORBIDDEN` for a reader. The one place roles are checked.
    pub fn writer(&self) -> Result<Writer<'_>, ApiError> {
        if self.role.can_write() {
            Ok(Writer {
                tenant: &self.tenant,
            })
        } else {
            Err(ApiError::Forbidden(format!(
                "role {} may read but not write",
                self.role
            )))
        }
    }
}

/// An access token as returned by login.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    pub access_token: String,
    /// Seconds until the token expires.
    pub expires_in: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// Username.
    sub: String,
    /// Tenant name.
    tid: String,
    /// User id; a user removed and re-created under the same name gets a new one.
    uid: i64,
    role: String,
    iat: i64,
    exp: i64,
    iss: String,
    aud: String,
}

/// At most one argon2 computation per CPU at a time: each takes ~19 MiB and
/// tens of milliseconds, so a burst of logins queues here instead of
/// multiplying memory use.
static HASHING: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
    tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
});

/// Runs an argon2 computation on the blocking pool, one per CPU at a time.
pub async fn hashing<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let _permit = HASHING
        .acquire()
        .await
        .context("hashing semaphore closed")?;
    tokio::task::spawn_blocking(work)
        .await
        .context("hashing task failed")
}

/// Hashes a password with argon2id (default parameters, random salt) into a PHC string.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing the password failed: {e}"))
}

/// Checks a password against a PHC string; false on mismatch or a malformed hash.
pub fn verify_password(password: &str, phc: &str) -> bool {
    Argon2::default()
        .verify_password(password.as_bytes(), phc)
        .is_ok()
}

/// Refuses passwords that are too short to be worth hashing.
pub fn check_password_strength(password: &str) -> Result<(), String> {
    if password.chars().count() < 8 {
        Err("the password must have at least 8 characters".into())
    } else {
        Ok(())
    }
}

struct SigningKeys {
    /// The key new tokens are signed with.
    current: (String, EncodingKey),
    /// Every key not retired, by kid.
    verify: HashMap<String, DecodingKey>,
    loaded_at: std::time::Instant,
}

/// Token issue and verification, and login.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<AuthInner>,
}

struct AuthInner {
    db: Db,
    clock: Clock,
    keys: RwLock<SigningKeys>,
    /// Tokens verified recently, so that a request with a known token costs
    /// a hash lookup instead of a signature check and a database query.
    verified: RwLock<HashMap<Box<str>, Verified, foldhash::fast::RandomState>>,
    cache_ttl_ms: i64,
    validation: Validation,
    issuer: String,
    audience: String,
    token_ttl: Duration,
    /// Hash checked when the username is unknown, so that such a login takes
    /// as long as a wrong password.
    dummy_hash: String,
}

/// A verified token: good until `valid_until` (Unix ms), the earlier of its
/// expiry and the end of the cache window.
struct Verified {
    principal: Arc<Principal>,
    valid_until: i64,
}

/// Most tokens remembered; beyond it, entries past their window are dropped,
/// then all of them.
const MAX_CACHED_TOKENS: usize = 10_000;

const ALGORITHM: Algorithm = Algorithm::HS256;
const UNKNOWN_KID_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

fn bad_credentials() -> ApiError {
    ApiError::Unauthenticated("invalid username or password".into())
}

fn bad_token() -> ApiError {
    ApiError::Unauthenticated("the access token is invalid or has expired; log in again".into())
}

impl Auth {
    /// Loads the signing keys, creating the first one if the database has none.
    pub async fn init(db: Db, config: &Config, clock: Clock) -> anyhow::Result<Auth> {
        let keys = load_or_create_keys(&db, &clock).await?;
        let mut validation = Validation::new(ALGORITHM);
        validation.set_issuer(&[&config.token_issuer]);
        validation.set_audience(&[&config.token_audience]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "iss", "aud"]);
        // Expiry is checked against the server clock in `authenticate`, exactly.
        validation.validate_exp = false;
        validation.leeway = 0;
        let dummy_hash = hashing(|| hash_password("kvql dummy password")).await??;
        Ok(Auth {
            inner: Arc::new(AuthInner {
                db,
                clock,
                keys: RwLock::new(keys),
                verified: RwLock::new(HashMap::default()),
                cache_ttl_ms: config.auth_cache_ttl.as_millis() as i64,
                validation,
                issuer: config.token_issuer.clone(),
                audience: config.token_audience.clone(),
                token_ttl: config.token_ttl,
                dummy_hash,
            }),
        })
    }

    /// Checks a username and password and issues a token. Unknown users,
    /// disabled users and wrong passwords get the same error after the same work.
    pub async fn login(&self, username: &str, password: &str) -> Result<IssuedToken, ApiError> {
        let found = user::Entity::find()
            .filter(user::Column::Username.eq(username))
            .find_also_related(tenant::Entity)
            .one(&self.inner.db.read)
            .await?;
        let hash = match &found {
            Some((u, Some(_))) if !u.disabled => u.password_hash.clone(),
            _ => self.inner.dummy_hash.clone(),
        };
        let password = password.to_owned();
        let ok = hashing(move || verify_password(&password, &hash))
            .await
            .map_err(ApiError::internal)?;
        match found {
            Some((u, Some(t))) if ok && !u.disabled => self.issue(&u, &t),
            _ => Err(bad_credentials()),
        }
    }

    fn issue(&self, u: &user::Model, t: &tenant::Model) -> Result<IssuedToken, ApiError> {
        let now = self.inner.clock.now_ms() / 1000;
        let ttl = self.inner.token_ttl.as_secs().max(1);
        let claims = Claims {
            sub: u.username.clone(),
            tid: t.name.clone(),
            uid: u.id,
            role: u.role.clone(),
            iat: now,
            exp: now + ttl as i64,
            iss: self.inner.issuer.clone(),
            aud: self.inner.audience.clone(),
        };
        let keys = self.inner.keys.read().map_err(|_| poisoned())?;
        let (kid, key) = &keys.current;
        let mut header = Header::new(ALGORITHM);
        header.kid = Some(kid.clone());
        let access_token =
            jsonwebtoken::encode(&header, &claims, key).map_err(ApiError::internal)?;
        Ok(IssuedToken {
            access_token,
            expires_in: ttl,
        })
    }

    /// Verifies a bearer token (algorithm pinned, signature, `exp`, `iss`,
    /// `aud`) and that its user still exists and is enabled. A token verified
    /// less than `--auth-cache-ttl` ago is trusted without checking again,
    /// until it expires.
    pub async fn authenticate(&self, token: &str) -> Result<Arc<Principal>, ApiError> {
        let now = self.inner.clock.now_ms();
        if let Some(hit) = self
            .inner
            .verified
            .read()
            .map_err(|_| poisoned())?
            .get(token)
            .filter(|v| now < v.valid_until)
        {
            return Ok(hit.principal.clone());
        }
        let principal = Arc::new(self.verify(token).await?);
        if self.inner.cache_ttl_ms > 0 {
            let valid_until = principal.expires_at.min(now + self.inner.cache_ttl_ms);
            let mut cache = self.inner.verified.write().map_err(|_| poisoned())?;
            if cache.len() >= MAX_CACHED_TOKENS {
                cache.retain(|_, v| now < v.valid_until);
                if cache.len() >= MAX_CACHED_TOKENS {
                    cache.clear();
                }
            }
            cache.insert(
                token.into(),
                Verified {
                    principal: principal.clone(),
                    valid_until,
                },
            );
        }
        Ok(principal)
    }

    async fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| bad_token())?;
        if header.alg != ALGORITHM {
            return Err(bad_token());
        }
        let kid = header.kid.ok_or_else(bad_token)?;
        let key = match self.decoding_key(&kid)? {
            Some(key) => key,
            None => {
                self.reload_keys_if_stale().await?;
                self.decoding_key(&kid)?.ok_or_else(bad_token)?
            }
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &self.inner.validation)
            .map_err(|_| bad_token())?
            .claims;
        let now = self.inner.clock.now_ms();
        if claims.exp.saturating_mul(1000) <= now {
            return Err(bad_token());
        }
        let found = user::Entity::find_by_id(claims.uid)
            .find_also_related(tenant::Entity)
            .one(&self.inner.db.read)
            .await?;
        match found {
            Some((u, Some(t)))
                if !u.disabled && u.username == claims.sub && t.name == claims.tid =>
            {
                Ok(Principal {
                    tenant: TenantId(t.id),
                    tenant_name: t.name,
                    user_id: u.id,
                    role: Role::parse(&u.role)
                        .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?,
                    username: u.username,
                    expires_at: claims.exp * 1000,
                })
            }
            _ => Err(bad_token()),
        }
    }

    fn decoding_key(&self, kid: &str) -> Result<Option<DecodingKey>, ApiError> {
        let keys = self.inner.keys.read().map_err(|_| poisoned())?;
        Ok(keys.verify.get(kid).cloned())
    }

    /// Another node may have created a key this one has not seen yet.
    async fn reload_keys_if_stale(&self) -> Result<(), ApiError> {
        let stale = {
            let keys = self.inner.keys.read().map_err(|_| poisoned())?;
            keys.loaded_at.elapsed() >= UNKNOWN_KID_RELOAD_INTERVAL
        };
        if stale {
            let fresh = load_keys(&self.inner.db)
                .await
                .map_err(ApiError::internal)?;
            if let Some(fresh) = fresh {
                *self.inner.keys.write().map_err(|_| poisoned())? = fresh;
            }
        }
        Ok(())
    }
}

fn poisoned() -> ApiError {
    ApiError::internal(anyhow::anyhow!("signing key lock poisoned"))
}

async fn load_keys(db: &Db) -> anyhow::Result<Option<SigningKeys>> {
    let rows = signing_key::Entity::find()
        .filter(signing_key::Column::RetiredAt.is_null())
        .filter(signing_key::Column::Algorithm.eq("HS256"))
        .order_by_desc(signing_key::Column::CreatedAt)
        .order_by_desc(signing_key::Column::Kid)
        .all(&db.write)
        .await
        .context("cannot read signing keys")?;
    let Some(newest) = rows.first() else {
        return Ok(None);
    };
    let current = (newest.kid.clone(), EncodingKey::from_secret(&newest.secret));
    let verify = rows
        .iter()
        .map(|k| (k.kid.clone(), DecodingKey::from_secret(&k.secret)))
        .collect();
    Ok(Some(SigningKeys {
        current,
        verify,
        loaded_at: std::time::Instant::now(),
    }))
}

async fn load_or_create_keys(db: &Db, clock: &Clock) -> anyhow::Result<SigningKeys> {
    if let Some(keys) = load_keys(db).await? {
        return Ok(keys);
    }
    let mut secret = vec![0u8; 64];
    rand::rng().fill_bytes(&mut secret);
    let kid = uuid::Uuid::new_v4().simple().to_string();
    // In a transaction, so that a failed commit is reported (see `users::set_password`).
    let txn = db.write.begin().await?;
    signing_key::ActiveModel {
        kid: Set(kid.clone()),
        algorithm: Set("HS256".into()),
        secret: Set(secret),
        created_at: Set(clock.now_ms()),
        retired_at: Set(None),
    }
    .insert(&txn)
    .await
    .context("cannot store the signing key")?;
    txn.commit().await.context("cannot store the signing key")?;
    tracing::info!(kid, "created a new token signing key");
    // Another node starting at the same moment may have inserted one too; every
    // node signs with the newest and verifies with all of them.
    load_keys(db)
        .await?
        .context("the signing key just stored is missing")
}
