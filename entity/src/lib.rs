//! sea-orm entities for kvql's tables.
//!
//! These are storage types only; the API never exposes them directly (see
//! `api::store` and the GraphQL/REST types), so a column rename stays inside
//! the server. All timestamps are Unix epoch milliseconds (`i64`), which both
//! SQLite and PostgreSQL compare exactly.

pub mod api_key;
pub mod object;
pub mod signing_key;
pub mod tenant;
pub mod user;

pub mod prelude {
    pub use super::api_key::Entity as ApiKey;
    pub use super::object::Entity as Object;
    pub use super::signing_key::Entity as SigningKey;
    pub use super::tenant::Entity as Tenant;
    pub use super::user::Entity as User;
}
