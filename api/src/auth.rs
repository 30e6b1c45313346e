//! Passwords, tokens and the [`Principal`].
//!
//! A [`TenantId`] can only be made here, from a verified token: code that has
//! not authenticated cannot name a tenant. Store reads take a [`ReadScope`]
//! ([`Principal::read_scope`]) and writes a [`Writer`] ([`Principal::writer`]),
//! which also carry the key prefix an API key is restricted to.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use anyhow::Context;
use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use entity::{api_key, signing_key, tenant, user};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, Set,
};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::config::Config;
use crate::db::Db;
use crate::error::ApiError;
use crate::metrics::{Login, Metrics};
use crate::store::quota::TenantQuota;
use crate::store::{Prefix, Watch};
use crate::throttle::{Limits, LoginThrottle, TrustedProxies};

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

/// How often a node notes an API key's use, at most (ms).
const KEY_USE_EVERY_MS: i64 = 60_000;

/// The expiry of a credential that does not expire (an API key made without
/// a `ttl`): 9999-12-31T23:59:59.999Z.
pub const NEVER: i64 = 253_402_300_799_999;

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
    /// The tenant's own request rate, if it has one (see `ratelimit`).
    pub rate: crate::ratelimit::TenantRate,
    /// The tenant's own storage limits, if it has any (see `store::quota`).
    pub quota: TenantQuota,
    /// The API key the request came with, if it did not come with an access
    /// token (see `admin::keys`); `user_id` is then its id, negated.
    pub api_key: Option<i64>,
    /// The key prefix that API key is restricted to; `None` for every key
    /// of the tenant (users, unrestricted keys).
    within: Option<Prefix>,
}

/// Proof that the caller may read its tenant's keys: all of them, or those
/// under the prefix its API key is restricted to. Every store read takes
/// one and answers keys outside it as if they did not exist.
#[derive(Clone, Copy, Debug)]
pub struct ReadScope<'a> {
    tenant: TenantId,
    within: Option<&'a Prefix>,
}

impl<'a> ReadScope<'a> {
    pub fn tenant(&self) -> TenantId {
        self.tenant
    }

    /// Whether the caller may see `key`.
    pub fn sees(&self, key: &str) -> bool {
        self.within.is_none_or(|p| key.starts_with(p.as_str()))
    }

    /// The keys under `prefix` the caller may see, as one prefix (the
    /// longer of the two when one starts with the other); `None` when it
    /// may see none of them.
    pub fn narrow(&self, prefix: &Prefix) -> Option<Prefix> {
        let Some(within) = self.within else {
            return Some(prefix.clone());
        };
        if prefix.as_str().starts_with(within.as_str()) {
            Some(prefix.clone())
        } else if within.as_str().starts_with(prefix.as_str()) {
            Some(within.clone())
        } else {
            None
        }
    }

    /// What of `watch` the caller may see: [`Watch::Nothing`] when none of it.
    pub fn narrow_watch(&self, watch: Watch) -> Watch {
        match watch {
            Watch::Key(k) if self.sees(k.as_str()) => Watch::Key(k),
            Watch::Prefix(p) => self.narrow(&p).map_or(Watch::Nothing, Watch::Prefix),
            Watch::Key(_) | Watch::Nothing => Watch::Nothing,
        }
    }

    /// For the store's own tests, which have no tokens.
    #[cfg(test)]
    pub(crate) fn for_store_tests(tenant: TenantId, within: Option<&'a Prefix>) -> Self {
        ReadScope { tenant, within }
    }
}

/// Proof that the caller may write to `tenant`: the keys under `within`, or
/// all of them.
#[derive(Clone, Copy, Debug)]
pub struct Writer<'a> {
    tenant: &'a TenantId,
    within: Option<&'a Prefix>,
    quota: TenantQuota,
}

impl Writer<'_> {
    pub fn tenant(&self) -> TenantId {
        *self.tenant
    }

    /// The tenant's own storage limits (the servers' defaults apply where
    /// it has none).
    pub fn quota(&self) -> TenantQuota {
        self.quota
    }

    /// `FORBIDDEN` for a key outside the prefix the caller's API key is
    /// restricted to. (A deletion there answers `NOT_FOUND` instead, as for
    /// a key without a value: see `Store`.)
    pub fn may_write(&self, key: &str) -> Result<(), ApiError> {
        match self.within {
            Some(p) if !key.starts_with(p.as_str()) => Err(ApiError::Forbidden(format!(
                "this API key writes only keys that start with {:?}",
                p.as_str()
            ))),
            _ => Ok(()),
        }
    }
}

impl Principal {
    pub fn tenant(&self) -> TenantId {
        self.tenant
    }

    /// The read permission: every caller has one, scoped to its API key's
    /// prefix if any.
    pub fn read_scope(&self) -> ReadScope<'_> {
        ReadScope {
            tenant: self.tenant,
            within: self.within.as_ref(),
        }
    }

    /// The write permission, or `FORBIDDEN` for a reader. The one place roles are checked.
    pub fn writer(&self) -> Result<Writer<'_>, ApiError> {
        if self.role.can_write() {
            Ok(Writer {
                tenant: &self.tenant,
                within: self.within.as_ref(),
                quota: self.quota,
            })
        } else {
            Err(ApiError::Forbidden(format!(
                "role {} may read but not write",
                self.role
            )))
        }
    }
}

/// Proof that the caller is an owner of their tenant: what tenant
/// administration (`admin`) takes.
#[derive(Clone, Copy, Debug)]
pub struct Owner<'a> {
    principal: &'a Principal,
}

impl Owner<'_> {
    pub fn tenant(&self) -> TenantId {
        self.principal.tenant
    }

    pub fn user_id(&self) -> i64 {
        self.principal.user_id
    }

    pub fn username(&self) -> &str {
        &self.principal.username
    }
}

impl Principal {
    /// The administration permission, or `FORBIDDEN` for a writer or a
    /// reader. The one place it is checked from a token; `admin` checks
    /// again in the database, in the transaction of each change.
    pub fn owner(&self) -> Result<Owner<'_>, ApiError> {
        if self.role == Role::Owner {
            Ok(Owner { principal: self })
        } else {
            Err(ApiError::Forbidden(format!(
                "role {} cannot administer the tenant's users; only an owner can",
                self.role
            )))
        }
    }
}

/// Forgets a user's or an API key's verifications on this node when dropped.
pub(crate) struct ForgetWhenDone<'a> {
    auth: &'a Auth,
    who: Forgotten,
}

enum Forgotten {
    User(i64),
    ApiKey(i64),
}

impl Forgotten {
    fn verified(&self, principal: &Principal) -> bool {
        match *self {
            Forgotten::User(id) => principal.user_id == id,
            Forgotten::ApiKey(id) => principal.api_key == Some(id),
        }
    }
}

impl Drop for ForgetWhenDone<'_> {
    fn drop(&mut self) {
        self.auth.forget(|p| self.who.verified(p));
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
    /// The user's token generation at issue; a password change bumps it and
    /// so revokes every earlier token. Tokens from before this claim existed
    /// read as generation 0.
    #[serde(default)]
    r#gen: i64,
}

/// At most one argon2 computation per CPU at a time: each takes ~19 MiB and
/// tens of milliseconds, so a burst of logins queues here instead of
/// multiplying memory use. Each node's logins have their own slots
/// ([`Auth`]), which tenant administration over the API uses too; the
/// CLI's user commands share [`GLOBAL_HASHING`].
pub(crate) struct Hashing {
    permits: Arc<tokio::sync::Semaphore>,
    /// Computations waiting for a permit through [`Hashing::run_or_refuse`].
    waiting: AtomicUsize,
}

static GLOBAL_HASHING: LazyLock<Hashing> = LazyLock::new(Hashing::per_cpu);

impl Hashing {
    fn per_cpu() -> Hashing {
        Hashing {
            permits: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Like [`hashing`], but when `max_waiting` computations already wait
    /// for a permit, refuses at once with 429 `RATE_LIMITED`
    /// (`Retry-After: 1`): a flood of logins then costs neither memory nor
    /// time of other requests.
    async fn run_or_refuse<T: Send + 'static>(
        &self,
        max_waiting: usize,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let permit =
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(tokio::sync::TryAcquireError::Closed) => {
                    return Err(ApiError::internal(anyhow::anyhow!(
                        "hashing semaphore closed"
                    )));
                }
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    if self.waiting.fetch_add(1, Ordering::SeqCst) >= max_waiting {
                        self.waiting.fetch_sub(1, Ordering::SeqCst);
                        return Err(ApiError::RateLimited {
                            message: "the server is busy checking passwords; try again in a second"
                                .into(),
                            retry_after: 1,
                        });
                    }
                    let _waiting = Waiting(&self.waiting);
                    self.permits.clone().acquire_owned().await.map_err(|e| {
                        ApiError::internal(anyhow::anyhow!("hashing semaphore: {e}"))
                    })?
                }
            };
        run_hashing(permit, work)
            .await
            .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))
    }
}

/// Runs an argon2 computation on the blocking pool, one per CPU at a time,
/// waiting as long as it takes (the CLI's user commands).
pub async fn hashing<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let permit = GLOBAL_HASHING
        .permits
        .clone()
        .acquire_owned()
        .await
        .context("hashing semaphore closed")?;
    run_hashing(permit, work).await.map_err(anyhow::Error::msg)
}

/// Called on the hashing thread after each hash, when set: gives the
/// hash's memory (19 MiB for argon2's defaults) back to the operating
/// system. A blocking thread may sit idle for seconds after a hash, and an
/// allocator that purges lazily would keep the memory until it runs again.
/// The binary sets it for its allocator.
pub static RELEASE_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Runs `work` on the blocking pool holding `permit` until it ends, even
/// when the request that started it is dropped (a client that hangs up must
/// not free a slot while its computation still runs).
async fn run_hashing<T: Send + 'static>(
    permit: tokio::sync::OwnedSemaphorePermit,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let out = work();
        if let Some(release) = RELEASE_MEMORY.get() {
            release();
        }
        out
    })
    .await
    .map_err(|e| format!("hashing task failed: {e}"))
}

/// The token of an `Authorization: Bearer <token>` header value (scheme in
/// any case), or `None` for any other value.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
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

impl SigningKeys {
    fn loaded_now(&mut self, now_ms: i64) {
        self.loaded_at_ms = now_ms;
        self.loaded_at = std::time::Instant::now();
    }
}

struct SigningKeys {
    /// The key new tokens are signed with.
    current: (String, EncodingKey),
    /// Every key that verifies, by kid, with when it stops verifying (Unix ms).
    verify: HashMap<String, (DecodingKey, Option<i64>)>,
    /// When loaded, by the server clock (which tests move) and by the
    /// monotonic clock (which they do not).
    loaded_at_ms: i64,
    loaded_at: std::time::Instant,
}

impl SigningKeys {
    fn stale(&self, now_ms: i64) -> bool {
        now_ms.saturating_sub(self.loaded_at_ms) >= KEY_RELOAD_INTERVAL.as_millis() as i64
            || self.loaded_at.elapsed() >= KEY_RELOAD_INTERVAL
    }
}

/// The client address of a GraphQL request, put in the request data by the
/// HTTP handler for the `login` mutation.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub Option<IpAddr>);

/// A signing key as listed by `kvql key list`.
#[derive(Clone, Debug)]
pub struct KeyInfo {
    pub kid: String,
    pub created_at: i64,
    /// When it stops verifying; `None`: not retired.
    pub retired_at: Option<i64>,
    /// Whether new tokens are signed with it.
    pub signing: bool,
}

/// Token issue and verification, and login.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<AuthInner>,
}

struct AuthInner {
    db: Db,
    /// Counts logins by outcome.
    metrics: Metrics,
    clock: Clock,
    keys: RwLock<SigningKeys>,
    /// Held while reloading keys, so that concurrent requests that find them
    /// stale query the database once.
    reloading: tokio::sync::Mutex<()>,
    throttle: LoginThrottle,
    trusted_proxies: TrustedProxies,
    max_hashing_queue: usize,
    hashing: Hashing,
    /// Tokens verified recently, so that a request with a known token costs
    /// a hash lookup instead of a signature check and a database query.
    verified: RwLock<HashMap<Box<str>, Verified, foldhash::fast::RandomState>>,
    /// Bumped (under `verified`'s lock) each time verifications are
    /// forgotten: a verification that began before is not cached, since it
    /// may have read the user or key before the change.
    forgotten: std::sync::atomic::AtomicU64,
    cache_ttl_ms: i64,
    /// When this node last noted each API key's use (`last_used_at`), so
    /// that it writes one at most once a minute, whatever the cache does.
    key_uses: std::sync::Mutex<HashMap<i64, i64>>,
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
/// How old the loaded signing keys may get before signing or verifying
/// reloads them, so that a rotation made by `kvql key rotate` or another node
/// applies within about this time. One query per interval at most.
const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Older keys keep verifying for the token TTL plus this after a rotation:
/// room for nodes that sign with the old key until they reload, and for
/// clocks that differ a little between nodes.
const ROTATION_GRACE: Duration = Duration::from_secs(60);

fn bad_credentials() -> ApiError {
    ApiError::Unauthenticated("invalid username or password".into())
}

fn bad_token() -> ApiError {
    ApiError::Unauthenticated("the access token is invalid or has expired; log in again".into())
}

impl Auth {
    /// Loads the signing keys, creating the first one if the database has none.
    pub async fn init(
        db: Db,
        config: &Config,
        clock: Clock,
        metrics: Metrics,
    ) -> anyhow::Result<Auth> {
        let keys = load_or_create_keys(&db, &clock).await?;
        let throttle = LoginThrottle::new(
            Limits {
                per_username: config.login_max_failures,
                per_address: config.login_max_failures_per_address,
                window: config.login_failure_window,
            },
            clock.clone(),
        );
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
                reloading: tokio::sync::Mutex::new(()),
                throttle,
                trusted_proxies: config.trusted_proxies.clone(),
                max_hashing_queue: config.login_max_queued as usize,
                hashing: Hashing::per_cpu(),
                verified: RwLock::new(HashMap::default()),
                forgotten: std::sync::atomic::AtomicU64::new(0),
                key_uses: std::sync::Mutex::new(HashMap::new()),
                cache_ttl_ms: config.auth_cache_ttl.as_millis() as i64,
                validation,
                issuer: config.token_issuer.clone(),
                audience: config.token_audience.clone(),
                token_ttl: config.token_ttl,
                dummy_hash,
                metrics,
            }),
        })
    }

    /// The client address of a request: its TCP peer, or what a trusted
    /// proxy says in `X-Forwarded-For` (see `KVQL_TRUSTED_PROXIES`).
    pub fn client_addr(&self, req: &poem::Request) -> Option<IpAddr> {
        let peer = req.remote_addr().as_socket_addr().map(|a| a.ip());
        let forwarded = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        crate::throttle::client_addr(peer, forwarded, &self.inner.trusted_proxies)
    }

    /// Checks a username and password and issues a token; both doors log in
    /// through here. Unknown users, disabled users and wrong passwords get the
    /// same error after the same work. A username or client address with too
    /// many recent failures is refused before any database or hashing work,
    /// with the same answer whether or not the user exists.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        client: Option<IpAddr>,
    ) -> Result<IssuedToken, ApiError> {
        let result = self.attempt_login(username, password, client).await;
        // Wrong credentials are the only `UNAUTHENTICATED` a login answers;
        // `RATE_LIMITED` comes from the throttle or the hashing queue.
        let outcome = match &result {
            Ok(_) => Some(Login::Succeeded),
            Err(ApiError::Unauthenticated(_)) => Some(Login::Failed),
            Err(ApiError::RateLimited { .. }) => Some(Login::Throttled),
            Err(_) => None,
        };
        if let Some(outcome) = outcome {
            self.inner.metrics.login(outcome);
        }
        result
    }

    async fn attempt_login(
        &self,
        username: &str,
        password: &str,
        client: Option<IpAddr>,
    ) -> Result<IssuedToken, ApiError> {
        match self.throttled_check(username, password, client).await? {
            Some((u, t)) => self.issue(&u, &t).await,
            None => Err(bad_credentials()),
        }
    }

    /// [`Auth::check_password`] counted by the login throttle: refused up
    /// front when `username` or `client` has too many recent failures, then
    /// recorded as a success or a failure.
    async fn throttled_check(
        &self,
        username: &str,
        password: &str,
        client: Option<IpAddr>,
    ) -> Result<Option<(user::Model, tenant::Model)>, ApiError> {
        let attempt = self.inner.throttle.begin(username, client)?;
        let found = self.check_password(username, password).await?;
        if found.is_some() {
            attempt.succeeded();
        } else {
            attempt.failed();
        }
        Ok(found)
    }

    /// The user and tenant if the password is right and the user enabled.
    async fn check_password(
        &self,
        username: &str,
        password: &str,
    ) -> Result<Option<(user::Model, tenant::Model)>, ApiError> {
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
        let ok = self
            .inner
            .hashing
            .run_or_refuse(self.inner.max_hashing_queue, move || {
                verify_password(&password, &hash)
            })
            .await?;
        Ok(match found {
            Some((u, Some(t))) if ok && !u.disabled => Some((u, t)),
            _ => None,
        })
    }

    async fn issue(&self, u: &user::Model, t: &tenant::Model) -> Result<IssuedToken, ApiError> {
        self.reload_keys_if_stale().await?;
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
            r#gen: u.token_generation,
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

    /// Checks `principal`'s current password as a login would: throttled
    /// per username and client address, the same work whatever the answer.
    /// A wrong password is `FORBIDDEN` (the token itself is fine). Returns
    /// the hash it matched, so that a change can apply only while it is
    /// still the user's.
    pub(crate) async fn check_current_password(
        &self,
        principal: &Principal,
        password: &str,
        client: Option<IpAddr>,
    ) -> Result<String, ApiError> {
        match self
            .throttled_check(&principal.username, password, client)
            .await?
        {
            Some((u, _)) if u.id == principal.user_id => Ok(u.password_hash),
            _ => Err(ApiError::Forbidden(
                "current_password is not your password".into(),
            )),
        }
    }

    /// Hashes a new password on this node's hashing slots; `RATE_LIMITED`
    /// when too many hashes already wait (as for logins).
    pub(crate) async fn hash_new_password(&self, password: &str) -> Result<String, ApiError> {
        let password = password.to_owned();
        self.inner
            .hashing
            .run_or_refuse(self.inner.max_hashing_queue, move || {
                hash_password(&password)
            })
            .await?
            .map_err(ApiError::internal)
    }

    /// A guard that forgets this node's verifications of `user_id`'s tokens
    /// when it drops, so that a change to the user (role, password, removal)
    /// applies here at once; other nodes see it within the auth cache TTL.
    /// Armed before the change commits, it forgets even if the request is
    /// dropped while the commit is under way (and harmlessly if the commit
    /// fails).
    pub(crate) fn forget_user_when_done(&self, user_id: i64) -> ForgetWhenDone<'_> {
        ForgetWhenDone {
            auth: self,
            who: Forgotten::User(user_id),
        }
    }

    /// As [`Auth::forget_user_when_done`], for the API key `id` (revoked).
    pub(crate) fn forget_api_key_when_done(&self, id: i64) -> ForgetWhenDone<'_> {
        ForgetWhenDone {
            auth: self,
            who: Forgotten::ApiKey(id),
        }
    }

    /// Drops the cached verifications of the principals `gone` picks, and
    /// keeps verifications still in flight from being cached. A poisoned
    /// lock empties the cache instead.
    fn forget(&self, gone: impl Fn(&Principal) -> bool) {
        let mut cache = match self.inner.verified.write() {
            Ok(cache) => cache,
            Err(poisoned) => {
                let mut cache = poisoned.into_inner();
                cache.clear();
                self.inner.verified.clear_poison();
                cache
            }
        };
        self.inner.forgotten.fetch_add(1, Ordering::AcqRel);
        cache.retain(|_, v| !gone(&v.principal));
    }

    /// A token for the user `user_id`, as a login would issue it.
    pub(crate) async fn issue_for(&self, user_id: i64) -> Result<IssuedToken, ApiError> {
        let found = user::Entity::find_by_id(user_id)
            .find_also_related(tenant::Entity)
            .one(&self.inner.db.write)
            .await?;
        match found {
            Some((u, Some(t))) if !u.disabled => self.issue(&u, &t).await,
            _ => Err(bad_token()),
        }
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
        let forgotten = self.inner.forgotten.load(Ordering::Acquire);
        let principal = Arc::new(self.verify(token).await?);
        if self.inner.cache_ttl_ms > 0 {
            let valid_until = principal.expires_at.min(now + self.inner.cache_ttl_ms);
            let mut cache = self.inner.verified.write().map_err(|_| poisoned())?;
            if self.inner.forgotten.load(Ordering::Acquire) != forgotten {
                // A user or key changed while this verification ran; the
                // next request verifies again.
                return Ok(principal);
            }
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
        if let Some((id, secret)) = crate::admin::keys::split_token(token) {
            return self.verify_api_key(id, secret).await;
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| bad_token())?;
        if header.alg != ALGORITHM {
            return Err(bad_token());
        }
        let kid = header.kid.ok_or_else(bad_token)?;
        // Also picks up a key another node created, and a rotation that
        // retired the key of this token.
        self.reload_keys_if_stale().await?;
        let key = self
            .decoding_key(&kid, self.inner.clock.now_ms())?
            .ok_or_else(bad_token)?;
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
                if !u.disabled
                    && u.username == claims.sub
                    && t.name == claims.tid
                    && u.token_generation == claims.r#gen =>
            {
                Ok(Principal {
                    rate: crate::ratelimit::TenantRate::from_columns(t.rate_limit, t.rate_burst),
                    quota: TenantQuota::from_columns(t.max_keys, t.max_bytes),
                    tenant: TenantId(t.id),
                    tenant_name: t.name,
                    user_id: u.id,
                    role: Role::parse(&u.role)
                        .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?,
                    username: u.username,
                    expires_at: claims.exp * 1000,
                    api_key: None,
                    within: None,
                })
            }
            _ => Err(bad_token()),
        }
    }

    /// Verifies an API key (see `admin::keys`): it exists, its secret
    /// matches, it has not expired. Notes its use at most once a minute.
    async fn verify_api_key(&self, id: i64, secret: &str) -> Result<Principal, ApiError> {
        let found = api_key::Entity::find_by_id(id)
            .find_also_related(tenant::Entity)
            .one(&self.inner.db.read)
            .await?;
        let now = self.inner.clock.now_ms();
        let Some((key, Some(t))) = found else {
            return Err(bad_token());
        };
        if !crate::admin::keys::secret_matches(secret, &key.secret_hash)
            || key.expires_at.is_some_and(|at| at <= now)
        {
            return Err(bad_token());
        }
        let scope = crate::admin::keys::KeyScope::from_column(&key.scope)?;
        if key
            .last_used_at
            .is_none_or(|at| at <= now - KEY_USE_EVERY_MS)
            && self.note_key_use(id, now)
        {
            let db = self.inner.db.write.clone();
            tokio::spawn(async move {
                let noted = api_key::Entity::update_many()
                    .col_expr(api_key::Column::LastUsedAt, Expr::value(now))
                    .filter(api_key::Column::Id.eq(id))
                    .filter(
                        Condition::any()
                            .add(api_key::Column::LastUsedAt.is_null())
                            .add(api_key::Column::LastUsedAt.lte(now - KEY_USE_EVERY_MS)),
                    )
                    .exec(&db)
                    .await;
                if let Err(e) = noted {
                    tracing::debug!(error = %e, "cannot note an API key's use");
                }
            });
        }
        Ok(Principal {
            rate: crate::ratelimit::TenantRate::from_columns(t.rate_limit, t.rate_burst),
            quota: TenantQuota::from_columns(t.max_keys, t.max_bytes),
            tenant: TenantId(t.id),
            tenant_name: t.name,
            user_id: -key.id,
            username: format!("apikey:{}", key.name),
            role: scope.role(),
            expires_at: key.expires_at.unwrap_or(NEVER),
            api_key: Some(key.id),
            within: key
                .prefix
                .filter(|p| !p.is_empty())
                .map(|p| Prefix::parse(Some(p)))
                .transpose()?,
        })
    }

    /// Whether this node should note a use of key `id` at `now`: not if it
    /// did less than a minute ago (the map holds keys that verified, at most
    /// a tenant's 100 each).
    fn note_key_use(&self, id: i64, now: i64) -> bool {
        let Ok(mut uses) = self.inner.key_uses.lock() else {
            return false;
        };
        match uses.get(&id) {
            Some(&at) if at > now - KEY_USE_EVERY_MS => false,
            _ => {
                uses.insert(id, now);
                true
            }
        }
    }

    /// The key for `kid` if it still verifies at `now`: a retired key's end
    /// is checked at every verification, not only when keys are loaded.
    fn decoding_key(&self, kid: &str, now: i64) -> Result<Option<DecodingKey>, ApiError> {
        let keys = self.inner.keys.read().map_err(|_| poisoned())?;
        Ok(keys
            .verify
            .get(kid)
            .filter(|(_, retires)| retires.is_none_or(|at| now < at))
            .map(|(key, _)| key.clone()))
    }

    /// Another node or `kvql key rotate` may have created or retired keys.
    async fn reload_keys_if_stale(&self) -> Result<(), ApiError> {
        let is_stale = || -> Result<bool, ApiError> {
            let keys = self.inner.keys.read().map_err(|_| poisoned())?;
            Ok(keys.stale(self.inner.clock.now_ms()))
        };
        if !is_stale()? {
            return Ok(());
        }
        let _reloading = self.inner.reloading.lock().await;
        // Someone else may have reloaded while this request waited.
        if !is_stale()? {
            return Ok(());
        }
        let fresh = load_keys(&self.inner.db, &self.inner.clock).await;
        let mut keys = self.inner.keys.write().map_err(|_| poisoned())?;
        match fresh {
            Ok(Some(fresh)) => *keys = fresh,
            // No key signs (every one retired by hand), or the database does
            // not answer: keep what this node has, whose ends are still
            // checked, and look again a second later instead of sending every
            // waiting request to the database in turn.
            Ok(None) => keys.loaded_now(self.inner.clock.now_ms()),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot reload the signing keys; keeping the current ones");
                keys.loaded_now(self.inner.clock.now_ms());
            }
        }
        Ok(())
    }
}

fn poisoned() -> ApiError {
    ApiError::internal(anyhow::anyhow!("signing key lock poisoned"))
}

/// The keys that still verify at the clock's now; `None` when no key signs.
async fn load_keys(db: &Db, clock: &Clock) -> anyhow::Result<Option<SigningKeys>> {
    let now = clock.now_ms();
    let rows = signing_key::Entity::find()
        .filter(
            Condition::any()
                .add(signing_key::Column::RetiredAt.is_null())
                .add(signing_key::Column::RetiredAt.gt(now)),
        )
        .filter(signing_key::Column::Algorithm.eq("HS256"))
        .order_by_desc(signing_key::Column::CreatedAt)
        .order_by_desc(signing_key::Column::Kid)
        // A read connection: reloads run every second and must not queue
        // behind the SQLite writer.
        .all(&db.read)
        .await
        .context("cannot read signing keys")?;
    let Some(newest) = rows.iter().find(|k| k.retired_at.is_none()) else {
        return Ok(None);
    };
    let current = (newest.kid.clone(), EncodingKey::from_secret(&newest.secret));
    let verify = rows
        .iter()
        .map(|k| {
            (
                k.kid.clone(),
                (DecodingKey::from_secret(&k.secret), k.retired_at),
            )
        })
        .collect();
    Ok(Some(SigningKeys {
        current,
        verify,
        loaded_at_ms: now,
        loaded_at: std::time::Instant::now(),
    }))
}

/// Makes a new key sign tokens. Older keys that still verify keep verifying
/// for `token_ttl` (plus a minute's grace), so the tokens they signed run
/// out normally; with `revoke_old` they stop at once (a compromised key).
/// Nodes pick the change up within about a second. Returns the new kid.
pub async fn rotate_signing_key(
    db: &Db,
    clock: &Clock,
    token_ttl: Duration,
    revoke_old: bool,
) -> anyhow::Result<String> {
    let now = clock.now_ms();
    let txn = db.begin_write().await?;
    let older = if revoke_old {
        Condition::any()
            .add(signing_key::Column::RetiredAt.is_null())
            .add(signing_key::Column::RetiredAt.gt(now))
    } else {
        Condition::all().add(signing_key::Column::RetiredAt.is_null())
    };
    let retire_at = if revoke_old {
        now
    } else {
        let keep = token_ttl.saturating_add(ROTATION_GRACE).as_millis();
        now.saturating_add(i64::try_from(keep).unwrap_or(i64::MAX))
    };
    signing_key::Entity::update_many()
        .col_expr(signing_key::Column::RetiredAt, Expr::value(retire_at))
        .filter(older)
        .exec(&txn)
        .await
        .context("cannot retire the older signing keys")?;
    let kid = insert_key(&txn, clock).await?;
    txn.commit().await.context("cannot store the signing key")?;
    tracing::info!(kid, revoke_old, "rotated the token signing key");
    Ok(kid)
}

/// Every signing key still in the database, newest first.
pub async fn list_signing_keys(db: &Db) -> anyhow::Result<Vec<KeyInfo>> {
    let rows = signing_key::Entity::find()
        .order_by_desc(signing_key::Column::CreatedAt)
        .order_by_desc(signing_key::Column::Kid)
        .all(&db.read)
        .await
        .context("cannot read signing keys")?;
    let signing = rows
        .iter()
        .find(|k| k.retired_at.is_none() && k.algorithm == "HS256")
        .map(|k| k.kid.clone());
    Ok(rows
        .into_iter()
        .map(|k| KeyInfo {
            signing: signing.as_deref() == Some(k.kid.as_str()),
            kid: k.kid,
            created_at: k.created_at,
            retired_at: k.retired_at,
        })
        .collect())
}

async fn insert_key(txn: &sea_orm::DatabaseTransaction, clock: &Clock) -> anyhow::Result<String> {
    let mut secret = vec![0u8; 64];
    rand::rng().fill_bytes(&mut secret);
    let kid = uuid::Uuid::new_v4().simple().to_string();
    signing_key::ActiveModel {
        kid: Set(kid.clone()),
        algorithm: Set("HS256".into()),
        secret: Set(secret),
        created_at: Set(clock.now_ms()),
        retired_at: Set(None),
    }
    .insert(txn)
    .await
    .context("cannot store the signing key")?;
    Ok(kid)
}

async fn load_or_create_keys(db: &Db, clock: &Clock) -> anyhow::Result<SigningKeys> {
    if let Some(keys) = load_keys(db, clock).await? {
        return Ok(keys);
    }
    // In a transaction, so that a failed commit is reported (see `users::set_password`).
    let txn = db.begin_write().await?;
    let kid = insert_key(&txn, clock).await?;
    txn.commit().await.context("cannot store the signing key")?;
    tracing::info!(kid, "created a new token signing key");
    // Another node starting at the same moment may have inserted one too; every
    // node signs with the newest and verifies with all of them.
    load_keys(db, clock)
        .await?
        .context("the signing key just stored is missing")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Key;

    fn prefix(p: &str) -> Prefix {
        Prefix::parse(Some(p.to_owned())).unwrap()
    }

    fn narrowed(within: Option<&str>, asked: &str) -> Option<String> {
        let within = within.map(prefix);
        let scope = ReadScope::for_store_tests(TenantId(1), within.as_ref());
        scope.narrow(&prefix(asked)).map(|p| p.as_str().to_owned())
    }

    #[test]
    fn a_scope_narrows_a_prefix_to_what_both_allow() {
        assert_eq!(narrowed(None, "x/").as_deref(), Some("x/"));
        assert_eq!(narrowed(Some("app/"), "").as_deref(), Some("app/"));
        assert_eq!(narrowed(Some("app/"), "ap").as_deref(), Some("app/"));
        assert_eq!(
            narrowed(Some("app/"), "app/users/").as_deref(),
            Some("app/users/")
        );
        assert_eq!(narrowed(Some("app/"), "apq"), None);
        assert_eq!(narrowed(Some("app/"), "other/"), None);
    }

    #[test]
    fn a_scope_sees_and_watches_only_keys_under_its_prefix() {
        let app = prefix("app/");
        let scope = ReadScope::for_store_tests(TenantId(1), Some(&app));
        assert!(scope.sees("app/a"));
        assert!(scope.sees("app/"));
        assert!(!scope.sees("app"));
        assert!(!scope.sees("other/a"));
        let key = |k: &str| Watch::Key(Key::parse(k.to_owned()).unwrap());
        assert_eq!(scope.narrow_watch(key("app/a")), key("app/a"));
        assert_eq!(scope.narrow_watch(key("apx")), Watch::Nothing);
        assert_eq!(
            scope.narrow_watch(Watch::Prefix(prefix(""))),
            Watch::Prefix(prefix("app/"))
        );
        assert_eq!(
            scope.narrow_watch(Watch::Prefix(prefix("z"))),
            Watch::Nothing
        );
        let everything = ReadScope::for_store_tests(TenantId(1), None);
        assert!(everything.sees("anything"));
        assert_eq!(everything.narrow_watch(key("k")), key("k"));
    }

    #[test]
    fn a_restricted_writer_may_write_only_under_its_prefix() {
        let app = prefix("app/");
        let tenant = TenantId(1);
        let writer = Writer {
            tenant: &tenant,
            within: Some(&app),
            quota: TenantQuota::default(),
        };
        assert!(writer.may_write("app/x").is_ok());
        assert!(matches!(
            writer.may_write("other"),
            Err(ApiError::Forbidden(_))
        ));
        let anywhere = Writer {
            tenant: &tenant,
            within: None,
            quota: TenantQuota::default(),
        };
        assert!(anywhere.may_write("other").is_ok());
    }
}
