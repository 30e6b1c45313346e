//! Tenant administration routes (`/api/users`, `/api/me/password`): thin
//! over `admin`, which holds the rules.

use poem::Request;
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi};

use super::body::{self, JsonBody};
use super::{BearerAuth, Tag, TokenResponse};
use crate::admin::{Member, MemberChange, NewPassword, Username};
use crate::app::AppState;
use crate::auth::Role;
use crate::clock::rfc3339;
use crate::error::{ErrorStatuses, Errors};

/// What a user may do: `owner` reads, writes and administers the tenant's
/// users; `writer` reads and writes; `reader` only reads.
#[derive(Enum, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
enum RoleName {
    Owner,
    Writer,
    Reader,
}

impl From<RoleName> for Role {
    fn from(r: RoleName) -> Role {
        match r {
            RoleName::Owner => Role::Owner,
            RoleName::Writer => Role::Writer,
            RoleName::Reader => Role::Reader,
        }
    }
}

impl From<Role> for RoleName {
    fn from(r: Role) -> RoleName {
        match r {
            Role::Owner => RoleName::Owner,
            Role::Writer => RoleName::Writer,
            Role::Reader => RoleName::Reader,
        }
    }
}

/// A user of your tenant.
#[derive(Object)]
struct UserView {
    /// The name the user logs in with.
    username: String,
    role: RoleName,
    /// A disabled user cannot log in (set by the operator's `kvql user`).
    disabled: bool,
    /// When the user was added (RFC 3339, UTC).
    created_at: String,
}

impl From<Member> for UserView {
    fn from(m: Member) -> UserView {
        UserView {
            username: m.username,
            role: m.role.into(),
            disabled: m.disabled,
            created_at: rfc3339(m.created_at),
        }
    }
}

/// The users of your tenant, by username.
#[derive(Object)]
struct UserList {
    users: Vec<UserView>,
}

/// A user to add to your tenant.
#[derive(Object, serde::Deserialize)]
#[serde(remote = "Self")]
struct AddUserRequest {
    /// 1 to 64 characters from letters, digits and `._@-`; unique across
    /// all tenants (409 `ALREADY_EXISTS` if taken).
    #[oai(validator(pattern = r"^[A-Za-z0-9._@-]{1,64}$"))]
    username: String,
    /// At least 8 characters.
    #[oai(validator(min_length = 8))]
    password: String,
    role: RoleName,
}

/// What to change of a user; members left out stay as they are (`{}`
/// changes nothing).
#[derive(Object, serde::Deserialize)]
#[serde(remote = "Self")]
struct UpdateUserRequest {
    /// The new role; omit it or send null to keep the role.
    #[oai(nullable)]
    role: Option<RoleName>,
    /// A new password (at least 8 characters); it revokes the user's tokens.
    /// Omit it or send null to keep the password.
    #[oai(nullable, validator(min_length = 8))]
    password: Option<String>,
}

/// Your current password and the new one.
#[derive(Object, serde::Deserialize)]
#[serde(remote = "Self")]
struct ChangePasswordRequest {
    current_password: String,
    /// At least 8 characters.
    #[oai(validator(min_length = 8))]
    new_password: String,
}

body::objects_only!(AddUserRequest, UpdateUserRequest, ChangePasswordRequest);

#[derive(ApiResponse)]
enum AddUserResponse {
    /// The user was added.
    #[oai(status = 201)]
    Created(Json<UserView>),
}

#[derive(ApiResponse)]
enum RemoveUserResponse {
    /// The user was removed.
    #[oai(status = 204)]
    Removed,
}

super::error_statuses! {
    ListUsersErrors = [401, 403, 500, 503];
    /// 429 when too many password hashes already wait.
    AddUserErrors = [400, 401, 403, 409, 413, 415, 429, 500, 503];
    UpdateUserErrors = [400, 401, 403, 404, 413, 415, 429, 500, 503];
    RemoveUserErrors = [400, 401, 403, 404, 500, 503];
    /// 403: `current_password` is wrong; 429: too many wrong attempts.
    ChangePasswordErrors = [400, 401, 403, 413, 415, 429, 500, 503];
}

pub struct UsersApi;

#[OpenApi]
impl UsersApi {
    /// List your tenant's users
    ///
    /// Owners only (403 `FORBIDDEN` for writers and readers).
    #[oai(path = "/api/users", method = "get", tag = "Tag::Users")]
    async fn list_users(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
    ) -> Result<Json<UserList>, Errors<ListUsersErrors>> {
        let owner = auth.0.owner()?;
        let users = state.admin().list(owner).await?;
        Ok(Json(UserList {
            users: users.into_iter().map(UserView::from).collect(),
        }))
    }

    /// Add a user to your tenant
    ///
    /// Owners only. The new user logs in with `POST /login` and works in
    /// your tenant with the given role.
    #[oai(path = "/api/users", method = "post", tag = "Tag::Users")]
    async fn add_user(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        body: JsonBody<AddUserRequest>,
    ) -> Result<AddUserResponse, Errors<AddUserErrors>> {
        let owner = auth.0.owner()?;
        let body = body.0;
        let username = Username::parse(&body.username)?;
        let password = NewPassword::parse(&body.password, "password")?;
        let member = state
            .admin()
            .add(owner, username, password, body.role.into())
            .await?;
        Ok(AddUserResponse::Created(Json(member.into())))
    }

    /// Change a user of your tenant
    ///
    /// Owners only. Sets the user's role, password or both; a new password
    /// revokes the user's tokens. 404 `NOT_FOUND` for a user of another
    /// tenant, as for a name nobody has. 403 `FORBIDDEN` for your own role
    /// and password (use `POST /api/me/password`): a tenant keeps an owner.
    #[oai(path = "/api/users/:username", method = "patch", tag = "Tag::Users")]
    async fn update_user(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        username: Path<String>,
        body: JsonBody<UpdateUserRequest>,
    ) -> Result<Json<UserView>, Errors<UpdateUserErrors>> {
        let owner = auth.0.owner()?;
        let body = body.0;
        let change = MemberChange::parse(body.role.map(Role::from), body.password.as_deref())?;
        let member = state.admin().update(owner, &username.0, change).await?;
        Ok(Json(member.into()))
    }

    /// Remove a user from your tenant
    ///
    /// Owners only. The user's tokens stop working; the tenant's data stays.
    /// 404 `NOT_FOUND` for a user of another tenant. 403 `FORBIDDEN` for
    /// yourself: a tenant keeps an owner.
    #[oai(path = "/api/users/:username", method = "delete", tag = "Tag::Users")]
    async fn remove_user(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        username: Path<String>,
    ) -> Result<RemoveUserResponse, Errors<RemoveUserErrors>> {
        let owner = auth.0.owner()?;
        state.admin().remove(owner, &username.0).await?;
        Ok(RemoveUserResponse::Removed)
    }

    /// Change your password
    ///
    /// Any user. Checks `current_password` (403 `FORBIDDEN` if wrong; wrong
    /// attempts count against the login limits, 429 `RATE_LIMITED`), sets
    /// the new one and revokes every token issued to you before, this one
    /// included: use the token in the answer from now on.
    #[oai(path = "/api/me/password", method = "post", tag = "Tag::Users")]
    async fn change_password(
        &self,
        req: &Request,
        state: Data<&AppState>,
        auth: BearerAuth,
        body: JsonBody<ChangePasswordRequest>,
    ) -> Result<Json<TokenResponse>, Errors<ChangePasswordErrors>> {
        let body = body.0;
        let new = NewPassword::parse(&body.new_password, "new_password")?;
        let client = state.auth().client_addr(req);
        let token = state
            .admin()
            .change_password(&auth.0, &body.current_password, new, client)
            .await?;
        Ok(Json(TokenResponse::bearer(token)))
    }
}
