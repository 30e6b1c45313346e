//! Tenant administration over the API, for both doors: an owner lists,
//! adds, changes and removes the users of their own tenant, and every user
//! changes their own password. The CLI (`users`) stays the operator's tool
//! for every tenant.
//!
//! The rules, in one place:
//! - Only an owner administers, and only their own tenant: a user of another
//!   tenant answers `NOT_FOUND`, like a name nobody has.
//! - Every change runs in a transaction that first locks the tenant's row and
//!   checks, in the database, that the caller is still an enabled owner, so
//!   that a demotion applies to administration at once whatever the auth
//!   cache holds, and two owners acting at once take turns.
//! - An owner changes neither their own role nor, here, their own password
//!   (`changePassword` asks for the current one), and cannot remove
//!   themselves (`FORBIDDEN`): another owner can. A stolen token then cannot
//!   lock the owner out, and no request locks its caller out by mistake.
//! - So a tenant keeps an enabled owner: a change is made by an owner who is
//!   enabled at that moment (checked under the tenant's lock) and does not
//!   touch them. The last owner can be neither demoted nor removed, and two
//!   owners demoting each other at once leave one of them owner.
//! - Roles end at `owner`: nobody is raised above it.
//! - A new password, set by an owner or by the user, revokes every token the
//!   user had (as `kvql user passwd` does); on this node at once, on others
//!   within the auth cache TTL. So do a role change and a removal.

pub mod keys;

use entity::user;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseTransaction,
    EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, Set, Statement,
};

use crate::auth::{Auth, IssuedToken, Owner, Principal, Role, TenantId, check_password_strength};
use crate::clock::Clock;
use crate::db::Db;
use crate::error::ApiError;

/// A username as the API accepts it for a new user: 1 to 64 characters from
/// letters, digits and `._@-` (as `kvql user add`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    pub fn parse(raw: &str) -> Result<Username, ApiError> {
        crate::users::check_username(raw).map_err(|e| ApiError::InvalidInput {
            field: Some("username".into()),
            message: e.to_string(),
        })?;
        Ok(Username(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password strong enough to be set (at least 8 characters).
#[derive(Clone)]
pub struct NewPassword(String);

impl NewPassword {
    /// `field` names the input in the error.
    pub fn parse(raw: &str, field: &str) -> Result<NewPassword, ApiError> {
        check_password_strength(raw).map_err(|message| ApiError::InvalidInput {
            field: Some(field.into()),
            message,
        })?;
        Ok(NewPassword(raw.to_owned()))
    }
}

impl std::fmt::Debug for NewPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewPassword(..)")
    }
}

/// A user of the caller's tenant, as its owners see it.
#[derive(Clone, Debug)]
pub struct Member {
    pub username: String,
    pub role: Role,
    /// Disabled users cannot log in (`kvql user` sets it).
    pub disabled: bool,
    /// Unix milliseconds.
    pub created_at: i64,
}

impl TryFrom<user::Model> for Member {
    type Error = ApiError;

    fn try_from(u: user::Model) -> Result<Member, ApiError> {
        Ok(Member {
            role: Role::parse(&u.role).map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?,
            username: u.username,
            disabled: u.disabled,
            created_at: u.created_at,
        })
    }
}

/// What `update` changes; what is `None` stays (nothing: a no-op).
#[derive(Clone, Debug, Default)]
pub struct MemberChange {
    pub role: Option<Role>,
    pub password: Option<NewPassword>,
}

impl MemberChange {
    /// A change from the doors' optional fields (the password's is `password`).
    pub fn parse(role: Option<Role>, password: Option<&str>) -> Result<MemberChange, ApiError> {
        Ok(MemberChange {
            role,
            password: password
                .map(|p| NewPassword::parse(p, "password"))
                .transpose()?,
        })
    }
}

/// Tenant administration on one node (see the module's rules).
pub struct Admin<'a> {
    db: &'a Db,
    clock: &'a Clock,
    auth: &'a Auth,
    /// `KVQL_MAX_USERS_PER_TENANT`.
    max_users: u64,
}

/// `username` is named only when it is a valid username (then at most 64
/// harmless characters).
fn no_such_user(username: Option<&str>) -> ApiError {
    ApiError::NotFound(match username {
        Some(name) => format!("no user named {name:?} in your tenant"),
        None => "no user by that name in your tenant".into(),
    })
}

impl<'a> Admin<'a> {
    pub fn new(db: &'a Db, clock: &'a Clock, auth: &'a Auth, max_users: u64) -> Admin<'a> {
        Admin {
            db,
            clock,
            auth,
            max_users,
        }
    }

    /// The users of the owner's tenant, by username.
    pub async fn list(&self, owner: Owner<'_>) -> Result<Vec<Member>, ApiError> {
        user::Entity::find()
            .filter(user::Column::TenantId.eq(owner.tenant().get()))
            .order_by_asc(user::Column::Username)
            .all(&self.db.read)
            .await?
            .into_iter()
            .map(Member::try_from)
            .collect()
    }

    /// Adds a user to the owner's tenant. Usernames are unique across
    /// tenants (a login names only the user): a taken one is
    /// `ALREADY_EXISTS`, whichever tenant has it. A tenant at
    /// `KVQL_MAX_USERS_PER_TENANT` users gets `QUOTA_EXCEEDED`.
    pub async fn add(
        &self,
        owner: Owner<'_>,
        username: Username,
        password: NewPassword,
        role: Role,
    ) -> Result<Member, ApiError> {
        let taken = || {
            ApiError::AlreadyExists(format!(
                "the username {:?} is taken; usernames are unique across tenants",
                username.as_str()
            ))
        };
        if self.find_any(username.as_str()).await?.is_some() {
            return Err(taken());
        }
        let password_hash = self.auth.hash_new_password(&password.0).await?;
        let txn = self.locked(owner).await?;
        let users = user::Entity::find()
            .filter(user::Column::TenantId.eq(owner.tenant().get()))
            .count(&txn)
            .await?;
        if users >= self.max_users {
            txn.rollback().await?;
            return Err(ApiError::QuotaExceeded(format!(
                "your tenant has {users} users, its most (KVQL_MAX_USERS_PER_TENANT is {}); remove one first",
                self.max_users
            )));
        }
        let inserted = user::ActiveModel {
            tenant_id: Set(owner.tenant().get()),
            username: Set(username.as_str().to_owned()),
            password_hash: Set(password_hash),
            role: Set(role.as_str().to_owned()),
            created_at: Set(self.clock.now_ms()),
            disabled: Set(false),
            token_generation: Set(0),
            ..Default::default()
        }
        .insert(&txn)
        .await;
        let inserted = match inserted {
            Ok(u) => u,
            Err(e) => {
                // The username's unique index refused it: another request
                // took the name since the check above. Frees the connection
                // (SQLite's administrative writes have one) before looking.
                txn.rollback().await?;
                if self.find_any(username.as_str()).await?.is_some() {
                    return Err(taken());
                }
                return Err(e.into());
            }
        };
        txn.commit().await?;
        Member::try_from(inserted)
    }

    /// Changes another user's role, password or both (neither: answers the
    /// user unchanged, as a merge patch of `{}` would). A new password
    /// revokes the user's tokens.
    pub async fn update(
        &self,
        owner: Owner<'_>,
        username: &str,
        change: MemberChange,
    ) -> Result<Member, ApiError> {
        let target = self.member_of(owner.tenant(), username).await?;
        if change.role.is_none() && change.password.is_none() {
            return Member::try_from(target);
        }
        if target.id == owner.user_id() {
            return Err(ApiError::Forbidden(if change.password.is_some() {
                "change your own password with POST /api/me/password (changePassword), which asks for the current one".into()
            } else {
                "an owner cannot change their own role (a tenant keeps an owner); another owner can"
                    .into()
            }));
        }
        let password_hash = match &change.password {
            Some(p) => Some(self.auth.hash_new_password(&p.0).await?),
            None => None,
        };
        let txn = self.locked(owner).await?;
        let target = self.member_in(&txn, owner.tenant(), username).await?;
        let mut update = match password_hash {
            Some(hash) => crate::users::new_password(hash),
            None => user::Entity::update_many(),
        }
        .filter(user::Column::Id.eq(target.id));
        if let Some(role) = change.role {
            update = update.col_expr(user::Column::Role, Expr::value(role.as_str()));
        }
        update.exec(&txn).await?;
        let updated = user::Entity::find_by_id(target.id)
            .one(&txn)
            .await?
            .ok_or_else(|| no_such_user(Some(username)))?;
        let forget = self.auth.forget_user_when_done(target.id);
        txn.commit().await?;
        drop(forget);
        Member::try_from(updated)
    }

    /// Removes another user of the owner's tenant; their tokens stop working.
    /// The tenant's data stays.
    pub async fn remove(&self, owner: Owner<'_>, username: &str) -> Result<(), ApiError> {
        let target = self.member_of(owner.tenant(), username).await?;
        if target.id == owner.user_id() {
            return Err(ApiError::Forbidden(
                "an owner cannot remove themselves (a tenant keeps an owner); another owner can"
                    .into(),
            ));
        }
        let txn = self.locked(owner).await?;
        let target = self.member_in(&txn, owner.tenant(), username).await?;
        user::Entity::delete_by_id(target.id).exec(&txn).await?;
        let forget = self.auth.forget_user_when_done(target.id);
        txn.commit().await?;
        drop(forget);
        Ok(())
    }

    /// Changes the caller's own password after checking the current one
    /// (throttled like a login), revokes every token issued to them before,
    /// and returns a new one.
    pub async fn change_password(
        &self,
        principal: &Principal,
        current: &str,
        new: NewPassword,
        client: Option<std::net::IpAddr>,
    ) -> Result<IssuedToken, ApiError> {
        if principal.api_key.is_some() {
            return Err(ApiError::Forbidden(
                "an API key has no password; log in as a user to change yours".into(),
            ));
        }
        let checked = self
            .auth
            .check_current_password(principal, current, client)
            .await?;
        let password_hash = self.auth.hash_new_password(&new.0).await?;
        let txn = self.db.begin_write().await?;
        // Only over the password just checked: an owner's reset (or another
        // change) made meanwhile wins, and this one is refused.
        let updated = crate::users::new_password(password_hash)
            .filter(user::Column::Id.eq(principal.user_id))
            .filter(user::Column::PasswordHash.eq(checked))
            .exec(&txn)
            .await?;
        if updated.rows_affected != 1 {
            return Err(ApiError::Forbidden(
                "your password was changed (or your user removed) meanwhile: current_password no longer applies"
                    .into(),
            ));
        }
        let forget = self.auth.forget_user_when_done(principal.user_id);
        txn.commit().await?;
        drop(forget);
        self.auth.issue_for(principal.user_id).await
    }

    /// A user of any tenant by name.
    async fn find_any(&self, username: &str) -> Result<Option<user::Model>, ApiError> {
        Ok(user::Entity::find()
            .filter(user::Column::Username.eq(username))
            .one(&self.db.write)
            .await?)
    }

    /// The user `username` of `tenant`, or `NOT_FOUND` (also when another
    /// tenant has that name).
    async fn member_of(&self, tenant: TenantId, username: &str) -> Result<user::Model, ApiError> {
        let username = Username::parse(username).map_err(|_| no_such_user(None))?;
        let username = username.as_str();
        match self.find_any(username).await? {
            Some(u) if u.tenant_id == tenant.get() => Ok(u),
            _ => Err(no_such_user(Some(username))),
        }
    }

    async fn member_in(
        &self,
        txn: &DatabaseTransaction,
        tenant: TenantId,
        username: &str,
    ) -> Result<user::Model, ApiError> {
        user::Entity::find()
            .filter(user::Column::Username.eq(username))
            .filter(user::Column::TenantId.eq(tenant.get()))
            .one(txn)
            .await?
            .ok_or_else(|| no_such_user(Some(username)))
    }

    /// A transaction holding the owner's tenant's administration lock
    /// (PostgreSQL: a transaction-scoped advisory lock keyed by the negated
    /// tenant id, apart from the migrations' positive key and from the row
    /// that writes update; SQLite: a write to the tenant row, which takes the
    /// database's write lock), in which the caller is still an enabled owner
    /// of the tenant.
    async fn locked(&self, owner: Owner<'_>) -> Result<DatabaseTransaction, ApiError> {
        let backend = self.db.backend;
        let txn = self.db.begin_write().await?;
        let lock = match backend {
            DatabaseBackend::Postgres => "SELECT pg_advisory_xact_lock(-($1::bigint))",
            _ => "UPDATE tenant SET created_at = created_at WHERE id = $1",
        };
        txn.execute_raw(Statement::from_sql_and_values(
            backend,
            lock,
            [owner.tenant().get().into()],
        ))
        .await?;
        let me = user::Entity::find_by_id(owner.user_id()).one(&txn).await?;
        match me {
            Some(u) if u.tenant_id == owner.tenant().get() && is_enabled_owner(&u) => Ok(txn),
            _ => Err(ApiError::Forbidden(
                "you are no longer an owner of this tenant".into(),
            )),
        }
    }
}

fn is_enabled_owner(u: &user::Model) -> bool {
    !u.disabled && u.role == Role::Owner.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_parse_like_the_cli_checks_them() {
        assert_eq!(Username::parse("ana.b@x-1").unwrap().as_str(), "ana.b@x-1");
        for bad in ["", "a b", "ü", &"a".repeat(65), "a/b"] {
            match Username::parse(bad) {
                Err(ApiError::InvalidInput { field, .. }) => {
                    assert_eq!(field.as_deref(), Some("username"))
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn new_passwords_need_eight_characters_and_name_their_field() {
        assert!(NewPassword::parse("12345678", "password").is_ok());
        match NewPassword::parse("1234567", "new_password") {
            Err(ApiError::InvalidInput { field, .. }) => {
                assert_eq!(field.as_deref(), Some("new_password"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            format!("{:?}", NewPassword::parse("secret-pw", "p").unwrap()),
            "NewPassword(..)"
        );
    }
}
