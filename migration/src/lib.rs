//! kvql's schema migrations. One file per migration; the file name is the
//! migration's name. Run them with `kvql migrate` or `cargo run -p migration -- up`.

pub use sea_orm_migration::prelude::*;

mod m20261124_000001_create_tenant;
mod m20261124_000002_create_user;
mod m20261124_000003_create_object;
mod m20261124_000004_create_signing_key;
mod m20261125_000005_user_token_generation;
mod m20261126_000006_revisions;
mod m20261127_000007_tenant_rate_limit;
mod m20261127_000008_api_key;
mod m20261207_000009_quotas;
mod m20261208_000010_partial_expiry_index;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_create_tenant::Migration),
            Box::new(m20261124_000002_create_user::Migration),
            Box::new(m20261124_000003_create_object::Migration),
            Box::new(m20261124_000004_create_signing_key::Migration),
            Box::new(m20261125_000005_user_token_generation::Migration),
            Box::new(m20261126_000006_revisions::Migration),
            Box::new(m20261127_000007_tenant_rate_limit::Migration),
            Box::new(m20261127_000008_api_key::Migration),
            Box::new(m20261207_000009_quotas::Migration),
            Box::new(m20261208_000010_partial_expiry_index::Migration),
        ]
    }
}
