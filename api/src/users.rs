//! User and tenant administration, used by the `kvql user` commands, by the
//! first-start bootstrap and by tests.

use anyhow::{Context, bail};
use entity::{tenant, user};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, Set,
};

use crate::auth::{Role, check_password_strength, hash_password, hashing};
use crate::clock::Clock;
use crate::db::Db;
use crate::ratelimit::TenantRate;
use crate::store::quota::{QuotaLimit, TenantQuota};

/// A user as listed by `kvql user list`.
#[derive(Clone, Debug)]
pub struct UserInfo {
    pub username: String,
    pub tenant: String,
    pub role: Role,
    pub disabled: bool,
    pub created_at: i64,
}

/// A tenant as `kvql tenant list` and `kvql tenant show` describe it.
#[derive(Clone, Debug)]
pub struct TenantInfo {
    pub name: String,
    pub created_at: i64,
    pub users: i64,
    /// Keys holding a live (not expired) value now.
    pub live_keys: i64,
    /// The tenant's latest revision, and the last one compaction removed
    /// from the change log.
    pub revision: i64,
    pub compacted_revision: i64,
    /// Its own request rate, if it has one.
    pub rate: TenantRate,
    /// The bytes of its live values (see `store::quota`).
    pub live_bytes: i64,
    /// Its own storage limits, if it has any.
    pub quota: TenantQuota,
}

/// Every tenant, by name, or the one named `only` (none if it does not
/// exist). Counting live keys reads each tenant's keys: seconds for
/// millions of keys.
pub async fn list_tenants(
    db: &Db,
    clock: &Clock,
    only: Option<&str>,
) -> anyhow::Result<Vec<TenantInfo>> {
    use sea_orm::{ConnectionTrait, Statement};
    // `$n` placeholders: PostgreSQL's, and SQLite accepts them too.
    let filter = if only.is_some() {
        "WHERE t.name = $2"
    } else {
        ""
    };
    let live = crate::store::live_condition("$1");
    let sql = format!(
        r#"SELECT t.name, t.created_at, t.revision, t.compacted_revision, t.rate_limit, t.rate_burst,
             t.max_keys, t.max_bytes,
             (SELECT count(*) FROM "user" u WHERE u.tenant_id = t.id) AS users,
             (SELECT count(*) FROM object o WHERE o.tenant_id = t.id AND {live}) AS live_keys,
             (SELECT CAST(COALESCE(sum(o.size), 0) AS BIGINT) FROM object o
                WHERE o.tenant_id = t.id AND {live}) AS live_bytes
           FROM tenant t {filter} ORDER BY t.name"#
    );
    let mut values: Vec<sea_orm::Value> = vec![clock.now_ms().into()];
    if let Some(name) = only {
        values.push(name.into());
    }
    let rows = db
        .read
        .query_all_raw(Statement::from_sql_and_values(db.backend, sql, values))
        .await?;
    rows.iter()
        .map(|row| {
            Ok(TenantInfo {
                name: row.try_get("", "name")?,
                created_at: row.try_get("", "created_at")?,
                users: row.try_get("", "users")?,
                live_keys: row.try_get("", "live_keys")?,
                revision: row.try_get("", "revision")?,
                compacted_revision: row.try_get("", "compacted_revision")?,
                rate: TenantRate::from_columns(
                    row.try_get("", "rate_limit")?,
                    row.try_get("", "rate_burst")?,
                ),
                live_bytes: row.try_get("", "live_bytes")?,
                quota: TenantQuota::from_columns(
                    row.try_get("", "max_keys")?,
                    row.try_get("", "max_bytes")?,
                ),
            })
        })
        .collect()
}

/// Sets a tenant's own request rate (see `ratelimit`). Servers read it when
/// they verify a token, so it applies within the auth cache TTL.
pub async fn set_tenant_rate(db: &Db, tenant_name: &str, rate: TenantRate) -> anyhow::Result<()> {
    let (limit, burst) = rate.to_columns();
    update_one(
        db,
        tenant::Entity::update_many()
            .col_expr(tenant::Column::RateLimit, Expr::value(limit))
            .col_expr(tenant::Column::RateBurst, Expr::value(burst))
            .filter(tenant::Column::Name.eq(tenant_name)),
        || format!("no tenant named {tenant_name:?} (see `kvql tenant list`)"),
    )
    .await
}

/// Sets a tenant's own storage limits; `None` leaves a limit as it is.
/// Running servers apply them within the auth cache TTL.
pub async fn set_tenant_quota(
    db: &Db,
    tenant_name: &str,
    max_keys: Option<QuotaLimit>,
    max_bytes: Option<QuotaLimit>,
) -> anyhow::Result<()> {
    if max_keys.is_none() && max_bytes.is_none() {
        bail!("nothing to set: give a limit on keys, bytes or both");
    }
    let mut update = tenant::Entity::update_many().filter(tenant::Column::Name.eq(tenant_name));
    if let Some(limit) = max_keys {
        update = update.col_expr(tenant::Column::MaxKeys, Expr::value(limit.to_column()));
    }
    if let Some(limit) = max_bytes {
        update = update.col_expr(tenant::Column::MaxBytes, Expr::value(limit.to_column()));
    }
    update_one(db, update, || {
        format!("no tenant named {tenant_name:?} (see `kvql tenant list`)")
    })
    .await
}

/// Usernames: 1 to 64 characters from letters, digits and `._@-`.
pub fn check_username(name: &str) -> anyhow::Result<()> {
    check_name("username", name, "._@-")
}

/// Tenant names: 1 to 64 characters from letters, digits and `._-`.
pub fn check_tenant_name(name: &str) -> anyhow::Result<()> {
    check_name("tenant name", name, "._-")
}

fn check_name(what: &str, name: &str, extra: &str) -> anyhow::Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || extra.contains(c);
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok_char) {
        bail!("invalid {what} {name:?}: use 1 to 64 characters from letters, digits and {extra}");
    }
    Ok(())
}

async fn hash(password: &str) -> anyhow::Result<String> {
    check_password_strength(password).map_err(anyhow::Error::msg)?;
    let password = password.to_owned();
    hashing(move || hash_password(&password)).await?
}

/// Creates a user, and its tenant if the tenant does not exist yet.
pub async fn add_user(
    db: &Db,
    clock: &Clock,
    username: &str,
    tenant_name: &str,
    role: Role,
    password: &str,
) -> anyhow::Result<()> {
    check_username(username)?;
    check_tenant_name(tenant_name)?;
    let password_hash = hash(password).await?;
    let now = clock.now_ms();
    let txn = db.begin_write().await?;
    if user::Entity::find()
        .filter(user::Column::Username.eq(username))
        .one(&txn)
        .await?
        .is_some()
    {
        bail!("user {username:?} already exists (usernames are unique across tenants)");
    }
    let tenant_id = match tenant::Entity::find()
        .filter(tenant::Column::Name.eq(tenant_name))
        .one(&txn)
        .await?
    {
        Some(t) => t.id,
        None => {
            tenant::ActiveModel {
                name: Set(tenant_name.to_owned()),
                created_at: Set(now),
                ..Default::default()
            }
            .insert(&txn)
            .await
            .context("cannot create the tenant")?
            .id
        }
    };
    user::ActiveModel {
        tenant_id: Set(tenant_id),
        username: Set(username.to_owned()),
        password_hash: Set(password_hash),
        role: Set(role.as_str().to_owned()),
        created_at: Set(now),
        disabled: Set(false),
        token_generation: Set(0),
        ..Default::default()
    }
    .insert(&txn)
    .await
    .with_context(|| format!("cannot create user {username:?}"))?;
    txn.commit().await?;
    Ok(())
}

/// Lists users, optionally of one tenant, by username.
pub async fn list_users(db: &Db, tenant_name: Option<&str>) -> anyhow::Result<Vec<UserInfo>> {
    let mut query = user::Entity::find()
        .find_also_related(tenant::Entity)
        .order_by_asc(user::Column::Username);
    if let Some(t) = tenant_name {
        query = query.filter(tenant::Column::Name.eq(t));
    }
    let rows = query.all(&db.read).await?;
    rows.into_iter()
        .map(|(u, t)| {
            Ok(UserInfo {
                role: Role::parse(&u.role).map_err(anyhow::Error::msg)?,
                username: u.username,
                tenant: t.map(|t| t.name).unwrap_or_default(),
                disabled: u.disabled,
                created_at: u.created_at,
            })
        })
        .collect()
}

/// Replaces a user's password and revokes the tokens already issued to them:
/// the new hash and the bumped token generation are written in one
/// transaction, and servers refuse an older generation once their auth cache
/// (`KVQL_AUTH_CACHE_TTL`) has let go of the token.
pub async fn set_password(db: &Db, username: &str, password: &str) -> anyhow::Result<()> {
    find(db, username).await?;
    let password_hash = hash(password).await?;
    update_user(db, username, new_password(password_hash)).await
}

/// The update that sets a new password hash and bumps the token
/// generation, revoking every token issued before (to be filtered).
pub(crate) fn new_password(password_hash: String) -> sea_orm::UpdateMany<user::Entity> {
    user::Entity::update_many()
        .col_expr(user::Column::PasswordHash, Expr::value(password_hash))
        .col_expr(
            user::Column::TokenGeneration,
            Expr::col(user::Column::TokenGeneration).add(1),
        )
}

/// Changes a user's role. Servers read the role from the database when they
/// verify a token, so it applies within the auth cache TTL.
pub async fn set_role(db: &Db, username: &str, role: Role) -> anyhow::Result<()> {
    update_user(
        db,
        username,
        user::Entity::update_many().col_expr(user::Column::Role, Expr::value(role.as_str())),
    )
    .await
}

/// Applies `update` to the user named `username` (see [`update_one`]).
async fn update_user(
    db: &Db,
    username: &str,
    update: sea_orm::UpdateMany<user::Entity>,
) -> anyhow::Result<()> {
    update_one(
        db,
        update.filter(user::Column::Username.eq(username)),
        || format!("no user named {username:?}"),
    )
    .await
}

/// Applies `update`, which must match exactly one row (else the error
/// `missing` says), in a transaction: outside one, SQLite reports a failed
/// commit of an UPDATE only after sea-orm has moved on.
async fn update_one<E: sea_orm::EntityTrait>(
    db: &Db,
    update: sea_orm::UpdateMany<E>,
    missing: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    let txn = db.begin_write().await?;
    if update.exec(&txn).await?.rows_affected != 1 {
        bail!("{}", missing());
    }
    txn.commit().await?;
    Ok(())
}

/// Deletes a user; their tokens stop working once the servers' auth caches
/// expire (`KVQL_AUTH_CACHE_TTL`). The tenant and its data stay.
pub async fn remove_user(db: &Db, username: &str) -> anyhow::Result<()> {
    let found = find(db, username).await?;
    user::Entity::delete_by_id(found.id).exec(&db.write).await?;
    Ok(())
}

async fn find(db: &Db, username: &str) -> anyhow::Result<user::Model> {
    user::Entity::find()
        .filter(user::Column::Username.eq(username))
        .one(&db.write)
        .await?
        .with_context(|| format!("no user named {username:?}"))
}

/// On a database with no users, creates `admin` (role owner) in tenant
/// `default`. Returns the generated password when none was configured.
pub async fn bootstrap_admin(
    db: &Db,
    clock: &Clock,
    configured_password: Option<&str>,
) -> anyhow::Result<Option<String>> {
    if user::Entity::find().count(&db.write).await? > 0 {
        return Ok(None);
    }
    let (password, generated) = match configured_password {
        Some(p) => (p.to_owned(), false),
        None => (random_password(), true),
    };
    match add_user(db, clock, "admin", "default", Role::Owner, &password).await {
        Ok(()) => Ok(generated.then_some(password)),
        // Another node bootstrapped at the same moment.
        Err(_) if user::Entity::find().count(&db.write).await? > 0 => Ok(None),
        Err(e) => Err(e.context("cannot create the bootstrap admin user")),
    }
}

fn random_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_username("alice").is_ok());
        assert!(check_username("a.b-c_d@example.com").is_ok());
        assert!(check_username("").is_err());
        assert!(check_username("has space").is_err());
        assert!(check_username(&"x".repeat(65)).is_err());
        assert!(check_tenant_name("acme-prod").is_ok());
        assert!(check_tenant_name("a@b").is_err());
    }

    #[test]
    fn random_passwords_are_long_enough() {
        let p = random_password();
        assert_eq!(p.len(), 20);
        assert!(check_password_strength(&p).is_ok());
        assert_ne!(p, random_password());
    }
}
