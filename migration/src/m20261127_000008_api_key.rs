//! API keys: long-lived bearer tokens an owner mints for an app (see
//! `api::admin::keys`). Only a SHA-256 of the secret is kept; the token is
//! shown once. A key belongs to its tenant (dropped with it), not to the
//! owner who made it.

use sea_orm_migration::prelude::*;

use super::m20261124_000001_create_tenant::Tenant;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ApiKey::Table)
                    .col(
                        ColumnDef::new(ApiKey::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(ApiKey::TenantId).big_integer().not_null())
                    .col(ColumnDef::new(ApiKey::Name).string_len(100).not_null())
                    .col(ColumnDef::new(ApiKey::Scope).string_len(16).not_null())
                    .col(ColumnDef::new(ApiKey::Prefix).string_len(512).null())
                    .col(ColumnDef::new(ApiKey::SecretHash).string_len(64).not_null())
                    .col(ColumnDef::new(ApiKey::CreatedBy).string_len(64).not_null())
                    .col(ColumnDef::new(ApiKey::CreatedAt).big_integer().not_null())
                    .col(ColumnDef::new(ApiKey::ExpiresAt).big_integer().null())
                    .col(ColumnDef::new(ApiKey::LastUsedAt).big_integer().null())
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_api_key_tenant")
                            .from(ApiKey::Table, ApiKey::TenantId)
                            .to(Tenant::Table, Tenant::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_api_key_tenant_name")
                    .table(ApiKey::Table)
                    .col(ApiKey::TenantId)
                    .col(ApiKey::Name)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ApiKey::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum ApiKey {
    Table,
    Id,
    TenantId,
    Name,
    Scope,
    Prefix,
    SecretHash,
    CreatedBy,
    CreatedAt,
    ExpiresAt,
    LastUsedAt,
}
