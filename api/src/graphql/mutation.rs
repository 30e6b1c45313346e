use async_graphql::{Context, Object};

use super::ContextExt;
use super::types::{
    AddUserInput, BatchPayload, CreateApiKeyInput, CreateObjectInput, CreatedApiKey, KvObject,
    LoginPayload, PutObjectInput, PutObjectPayload, TenantUser, UpdateUserInput, Version,
    input_data,
};
use crate::admin::keys::NewApiKey;
use crate::admin::{MemberChange, NewPassword, Username};
use crate::auth::ClientAddr;
use crate::error::ApiError;
use crate::store::{Atomicity, BatchInput, Expect, Item, Key, Store};

pub struct Mutation;

fn atomicity(atomic: bool) -> Atomicity {
    if atomic {
        Atomicity::Atomic
    } else {
        Atomicity::PerItem
    }
}

fn create_item(store: &Store, input: &CreateObjectInput) -> Result<Item, ApiError> {
    store.item(input.key.clone(), &input_data(&input.data)?, input.ttl)
}

fn put_item(store: &Store, input: &PutObjectInput) -> Result<(Item, Expect), ApiError> {
    let item = store.item(input.key.clone(), &input_data(&input.data)?, input.ttl)?;
    let expect = match input.expected_version {
        Some(Version(v)) => Expect::Version(v),
        None => Expect::Any,
    };
    Ok((item, expect))
}

/// Writes, `login`, and the administration of your tenant's users. Writes
/// need a token whose role is owner or writer; user administration, an owner.
#[Object]
impl Mutation {
    /// Exchanges a username and password for a bearer token; no token needed.
    /// An unknown user and a wrong password get the same `UNAUTHENTICATED` error.
    /// After too many failed logins for the username or from the client
    /// address, `RATE_LIMITED` with `extensions.retryAfter` (seconds).
    async fn login(
        &self,
        ctx: &Context<'_>,
        username: String,
        password: String,
    ) -> async_graphql::Result<LoginPayload> {
        // Over HTTP the request's address, over a WebSocket the socket's.
        let client = ctx.data_opt::<ClientAddr>().and_then(|c| c.0);
        let token = ctx
            .state()
            .auth()
            .login(&username, &password, client)
            .await?;
        Ok(token.into())
    }

    /// Adds a user to your tenant. Owners only (`FORBIDDEN` otherwise). The
    /// new user logs in with `login` and works in your tenant.
    /// `ALREADY_EXISTS` if the username is taken (in any tenant);
    /// `QUOTA_EXCEEDED` if the tenant has `KVQL_MAX_USERS_PER_TENANT` users.
    async fn add_user(
        &self,
        ctx: &Context<'_>,
        input: AddUserInput,
    ) -> async_graphql::Result<TenantUser> {
        let owner = ctx.principal()?.owner()?;
        let username = Username::parse(&input.username)?;
        let password = NewPassword::parse(&input.password, "password")?;
        let member = ctx
            .state()
            .admin()
            .add(owner, username, password, input.role.into())
            .await?;
        Ok(member.into())
    }

    /// Sets the role, the password or both of a user of your tenant; a new
    /// password revokes the user's tokens. Owners only. `NOT_FOUND` for a
    /// user of another tenant, as for a name nobody has. `FORBIDDEN` for your
    /// own role and password (use `changePassword`): a tenant keeps an owner.
    async fn update_user(
        &self,
        ctx: &Context<'_>,
        username: String,
        input: UpdateUserInput,
    ) -> async_graphql::Result<TenantUser> {
        let owner = ctx.principal()?.owner()?;
        let change = MemberChange::parse(input.role.map(Into::into), input.password.as_deref())?;
        let member = ctx.state().admin().update(owner, &username, change).await?;
        Ok(member.into())
    }

    /// Removes a user from your tenant; their tokens stop working and the
    /// tenant's data stays. Owners only. `NOT_FOUND` for a user of another
    /// tenant; `FORBIDDEN` for yourself (a tenant keeps an owner). Always true.
    async fn remove_user(
        &self,
        ctx: &Context<'_>,
        username: String,
    ) -> async_graphql::Result<bool> {
        let owner = ctx.principal()?.owner()?;
        ctx.state().admin().remove(owner, &username).await?;
        Ok(true)
    }

    /// Changes your own password. Checks `currentPassword` (`FORBIDDEN` if
    /// wrong; wrong attempts count against the login limits, `RATE_LIMITED`),
    /// then revokes every token issued to you before, this one included: use
    /// the token in the answer from now on.
    async fn change_password(
        &self,
        ctx: &Context<'_>,
        current_password: String,
        new_password: String,
    ) -> async_graphql::Result<LoginPayload> {
        let principal = ctx.principal()?;
        let new = NewPassword::parse(&new_password, "newPassword")?;
        let client = ctx.data_opt::<ClientAddr>().and_then(|c| c.0);
        let token = ctx
            .state()
            .admin()
            .change_password(principal, &current_password, new, client)
            .await?;
        Ok(token.into())
    }

    /// Makes an API key for an app. Owners only. The answer's `token` works
    /// as a bearer token on every door, with role `READER` (scope `READ`)
    /// or `WRITER` (`READ_WRITE`), until it expires or is revoked; it is
    /// shown only here. `ALREADY_EXISTS` for a name the tenant has;
    /// `QUOTA_EXCEEDED` when it holds 100 keys.
    async fn create_api_key(
        &self,
        ctx: &Context<'_>,
        input: CreateApiKeyInput,
    ) -> async_graphql::Result<CreatedApiKey> {
        let owner = ctx.principal()?.owner()?;
        let new = NewApiKey::parse(
            &input.name,
            input.scope.into(),
            input.prefix.as_deref(),
            input.ttl,
        )?;
        let minted = ctx.state().admin().create_api_key(owner, new).await?;
        Ok(CreatedApiKey {
            token: minted.token,
            key: minted.key.into(),
        })
    }

    /// Revokes an API key of your tenant: it stops working at once on this
    /// node, within `KVQL_AUTH_CACHE_TTL` on others. Owners only.
    /// `NOT_FOUND` for another tenant's key, as for an id nobody has.
    /// Always true.
    async fn revoke_api_key(
        &self,
        ctx: &Context<'_>,
        id: async_graphql::ID,
    ) -> async_graphql::Result<bool> {
        let owner = ctx.principal()?.owner()?;
        ctx.state().admin().revoke_api_key(owner, &id).await?;
        Ok(true)
    }

    /// Creates a value; `ALREADY_EXISTS` if the key holds a live one (an
    /// expired value counts as absent), `QUOTA_EXCEEDED` if it would take the
    /// tenant past its quota.
    async fn create_object(
        &self,
        ctx: &Context<'_>,
        input: CreateObjectInput,
    ) -> async_graphql::Result<KvObject> {
        let writer = ctx.principal()?.writer()?;
        let store = ctx.state().store();
        let item = create_item(store, &input)?;
        Ok(KvObject(store.create(writer, item).await?))
    }

    /// Creates or replaces a value. With `expectedVersion`, replaces only
    /// that version (`VERSION_MISMATCH` otherwise, `NOT_FOUND` if absent).
    /// `QUOTA_EXCEEDED` if it would take the tenant past its quota (see
    /// `me { usage quota }`); nothing is written.
    async fn put_object(
        &self,
        ctx: &Context<'_>,
        input: PutObjectInput,
    ) -> async_graphql::Result<PutObjectPayload> {
        let writer = ctx.principal()?.writer()?;
        let store = ctx.state().store();
        let (item, expect) = put_item(store, &input)?;
        let put = store.put(writer, item, expect).await?;
        Ok(PutObjectPayload {
            object: KvObject(put.object),
            created: put.created,
        })
    }

    /// Deletes the live value under `key`: true when deleted, `NOT_FOUND`
    /// when there is none. With `expectedVersion`, deletes only that version.
    /// A client cache evicts the object by its id, which is the key (Apollo:
    /// `cache.evict({id: cache.identify({__typename: "KvObject", id: key})})`).
    async fn delete_object(
        &self,
        ctx: &Context<'_>,
        key: String,
        expected_version: Option<Version>,
    ) -> async_graphql::Result<bool> {
        let writer = ctx.principal()?.writer()?;
        let key = Key::parse(key)?;
        ctx.state()
            .store()
            .delete(writer, &key, expected_version.map(|v| v.0))
            .await?;
        Ok(true)
    }

    /// Creates several values in one transaction, with one result per item.
    /// By default each item succeeds or fails on its own (items are applied
    /// in key order, which decides which fit within the tenant's quota).
    /// With `atomic: true` the first failing item fails the whole call (its
    /// code, plus `index` and `key` in the error's extensions) and nothing is
    /// written; a batch that would take the tenant past its quota fails with
    /// `QUOTA_EXCEEDED` and no `index`.
    async fn batch_create(
        &self,
        ctx: &Context<'_>,
        items: Vec<CreateObjectInput>,
        #[graphql(default = false)] atomic: bool,
    ) -> async_graphql::Result<BatchPayload> {
        let writer = ctx.principal()?.writer()?;
        let store = ctx.state().store();
        store.check_batch_len(items.len())?;
        let inputs: Vec<BatchInput<Item>> = items
            .iter()
            .map(|i| (i.key.clone(), create_item(store, i)))
            .collect();
        let outcome = store
            .batch_create(writer, inputs, atomicity(atomic))
            .await?;
        Ok(BatchPayload::new(outcome, |o| {
            let revision = o.revision;
            (None, Some(o), revision)
        }))
    }

    /// Creates or replaces several values in one transaction, each honouring
    /// its `expectedVersion`. All-or-nothing unless `atomic: false`.
    async fn batch_put(
        &self,
        ctx: &Context<'_>,
        items: Vec<PutObjectInput>,
        #[graphql(default = true)] atomic: bool,
    ) -> async_graphql::Result<BatchPayload> {
        let writer = ctx.principal()?.writer()?;
        let store = ctx.state().store();
        store.check_batch_len(items.len())?;
        let inputs: Vec<BatchInput<(Item, Expect)>> = items
            .iter()
            .map(|i| (i.key.clone(), put_item(store, i)))
            .collect();
        let outcome = store.batch_put(writer, inputs, atomicity(atomic)).await?;
        Ok(BatchPayload::new(outcome, |p| {
            let revision = p.object.revision;
            (Some(p.created), Some(p.object), revision)
        }))
    }

    /// Deletes several keys in one transaction, with one result per key
    /// (`NOT_FOUND` for keys without a live value). With `atomic: true`,
    /// all-or-nothing.
    async fn batch_delete(
        &self,
        ctx: &Context<'_>,
        keys: Vec<String>,
        #[graphql(default = false)] atomic: bool,
    ) -> async_graphql::Result<BatchPayload> {
        let writer = ctx.principal()?.writer()?;
        let store = ctx.state().store();
        store.check_batch_len(keys.len())?;
        let inputs: Vec<BatchInput<Key>> = keys
            .into_iter()
            .map(|k| (k.clone(), Key::parse(k)))
            .collect();
        let outcome = store
            .batch_delete(writer, inputs, atomicity(atomic))
            .await?;
        Ok(BatchPayload::new(outcome, |revision| {
            (None, None, revision)
        }))
    }
}
