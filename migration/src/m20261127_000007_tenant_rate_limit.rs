//! A tenant's own request rate, overriding the node's `KVQL_TENANT_RATE`:
//! `tenant.rate_limit` in requests per second (NULL: the node's setting; 0:
//! no limit) and `tenant.rate_burst` (NULL: as many as the rate).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [Tenant::RateLimit, Tenant::RateBurst] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Tenant::Table)
                        .add_column(ColumnDef::new(column).big_integer().null())
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [Tenant::RateBurst, Tenant::RateLimit] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Tenant::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Tenant {
    Table,
    RateLimit,
    RateBurst,
}
