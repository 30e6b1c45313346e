//! Revisions and the change log (see `api::store::revision`).
//!
//! - `tenant.revision`: the last revision handed out to the tenant's changes.
//!   Write transactions raise it, so they take their revisions in commit order.
//! - `tenant.compacted_revision`: the last revision removed from the change
//!   log by compaction (0: none); a feed resumed from before it has lost changes.
//! - `object.revision`: the revision of the change that wrote the row, and
//!   `object.created_revision` that of the write that created it; rows
//!   written before this migration keep 0.
//! - `change_log`: one row per committed change (put, delete, expiry), kept for
//!   the retention window; the tenant and the revision lead its key.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use super::m20261124_000001_create_tenant::Tenant;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let postgres = manager.get_database_backend() == DatabaseBackend::Postgres;
        for (table, column) in COUNTERS {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .add_column(ColumnDef::new(column).big_integer().not_null().default(0))
                        .to_owned(),
                )
                .await?;
        }
        let mut key = ColumnDef::new(ChangeLog::Key);
        key.string_len(512).not_null();
        let mut data = ColumnDef::new(ChangeLog::Data);
        data.null();
        if postgres {
            key.extra("COLLATE \"C\"");
            data.json_binary();
        } else {
            data.text();
        }
        manager
            .create_table(
                Table::create()
                    .table(ChangeLog::Table)
                    .col(ColumnDef::new(ChangeLog::TenantId).big_integer().not_null())
                    .col(ColumnDef::new(ChangeLog::Revision).big_integer().not_null())
                    .col(ColumnDef::new(ChangeLog::Kind).small_integer().not_null())
                    .col(key)
                    .col(ColumnDef::new(ChangeLog::Version).big_integer().not_null())
                    .col(data)
                    .col(ColumnDef::new(ChangeLog::ExpiresAt).big_integer().null())
                    .col(ColumnDef::new(ChangeLog::CreatedAt).big_integer().null())
                    .col(ColumnDef::new(ChangeLog::At).big_integer().not_null())
                    .primary_key(
                        Index::create()
                            .col(ChangeLog::TenantId)
                            .col(ChangeLog::Revision),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_change_log_tenant")
                            .from(ChangeLog::Table, ChangeLog::TenantId)
                            .to(Tenant::Table, Tenant::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // The last version of keys deleted or expired, until compaction
        // passes them: a key created again goes on above it (no ABA).
        let mut tkey = ColumnDef::new(Tombstone::Key);
        tkey.string_len(512).not_null();
        if postgres {
            tkey.extra("COLLATE \"C\"");
        }
        manager
            .create_table(
                Table::create()
                    .table(Tombstone::Table)
                    .col(ColumnDef::new(Tombstone::TenantId).big_integer().not_null())
                    .col(tkey)
                    .col(ColumnDef::new(Tombstone::Version).big_integer().not_null())
                    .col(ColumnDef::new(Tombstone::Revision).big_integer().not_null())
                    .primary_key(Index::create().col(Tombstone::TenantId).col(Tombstone::Key))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_object_tombstone_tenant")
                            .from(Tombstone::Table, Tombstone::TenantId)
                            .to(Tenant::Table, Tenant::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_change_log_at")
                    .table(ChangeLog::Table)
                    .col(ChangeLog::At)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Tombstone::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ChangeLog::Table).to_owned())
            .await?;
        for (table, column) in COUNTERS.into_iter().rev() {
            manager
                .alter_table(Table::alter().table(table).drop_column(column).to_owned())
                .await?;
        }
        Ok(())
    }
}

/// The counter columns this migration adds, `(table, column)`, each a
/// `BIGINT NOT NULL DEFAULT 0`.
const COUNTERS: [(Revisions, Revisions); 4] = [
    (Revisions::Tenant, Revisions::Revision),
    (Revisions::Tenant, Revisions::CompactedRevision),
    (Revisions::Object, Revisions::Revision),
    (Revisions::Object, Revisions::CreatedRevision),
];

#[derive(DeriveIden, Clone, Copy)]
enum Revisions {
    Tenant,
    Object,
    Revision,
    CompactedRevision,
    CreatedRevision,
}

#[derive(DeriveIden)]
enum ChangeLog {
    Table,
    TenantId,
    Revision,
    Kind,
    Key,
    Version,
    Data,
    ExpiresAt,
    CreatedAt,
    At,
}

#[derive(DeriveIden)]
enum Tombstone {
    #[sea_orm(iden = "object_tombstone")]
    Table,
    TenantId,
    Key,
    Version,
    Revision,
}
