use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use super::m20261124_000001_create_tenant::Tenant;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let postgres = manager.get_database_backend() == DatabaseBackend::Postgres;
        let mut key = ColumnDef::new(Object::Key);
        key.string_len(512).not_null();
        let mut data = ColumnDef::new(Object::Data);
        data.not_null();
        if postgres {
            // Byte order for keys, as on SQLite: ORDER BY and prefix ranges
            // must not depend on the server's locale.
            key.extra("COLLATE \"C\"");
            data.json_binary();
        } else {
            // JSON text; SQLite has no separate JSON type.
            data.text();
        }
        manager
            .create_table(
                Table::create()
                    .table(Object::Table)
                    .col(ColumnDef::new(Object::TenantId).big_integer().not_null())
                    .col(key)
                    .col(data)
                    .col(ColumnDef::new(Object::Version).big_integer().not_null())
                    .col(ColumnDef::new(Object::ExpiresAt).big_integer().null())
                    .col(ColumnDef::new(Object::CreatedAt).big_integer().not_null())
                    .col(ColumnDef::new(Object::UpdatedAt).big_integer().not_null())
                    .primary_key(Index::create().col(Object::TenantId).col(Object::Key))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_object_tenant")
                            .from(Object::Table, Object::TenantId)
                            .to(Tenant::Table, Tenant::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_object_expires_at")
                    .table(Object::Table)
                    .col(Object::ExpiresAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Object::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Object {
    Table,
    TenantId,
    Key,
    Data,
    Version,
    ExpiresAt,
    CreatedAt,
    UpdatedAt,
}
