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
//!   the retention window; the tenant and the revision lead its key. It has
//!   no foreign key to `tenant`: only writers holding the tenant's counter
//!   lock insert into it, and a key check per logged change cost PostgreSQL
//!   a fifth of a write (tenants are never deleted). Its key,
//!   `(tenant_id, revision)`, is its only index (on SQLite the table itself,
//!   `WITHOUT ROWID`): every write pays one insert into the log, and
//!   compaction by age reads each tenant's oldest entries along that key.

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
        let mut log = Table::create();
        if !postgres {
            // One B-tree per logged change, not a row plus its key's index.
            log.extra("WITHOUT ROWID");
        }
        manager
            .create_table(
                log.table(ChangeLog::Table)
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
        if postgres {
            manager
                .get_connection()
                .execute_unprepared(WRITE_RUN)
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(
                    "DROP FUNCTION IF EXISTS kvql_write_run(bigint[], text[], text[], bigint[], bigint[], bigint, boolean)",
                )
                .await?;
        }
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

/// PostgreSQL: a run of creations (`p_create_only`) or unconditional puts of
/// distinct keys, sorted by tenant, as one call (see the store's
/// `sql::write_run_postgres`, which says what it does and why). Its
/// statements take snapshots of their own: the write that follows the
/// counters' locks sees the tombstones of every transaction that committed
/// while it waited, which one statement, whose snapshot predates its locks,
/// would not.
pub(crate) const WRITE_RUN: &str = r#"
CREATE OR REPLACE FUNCTION kvql_write_run(
    p_tenants bigint[], p_keys text[], p_data text[], p_expires bigint[],
    p_offsets bigint[], p_now bigint, p_create_only boolean)
RETURNS TABLE (r_tenant bigint, r_key text, r_version bigint, r_revision bigint,
               r_created_at bigint, r_created_revision bigint)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    grp record;
    first_revision bigint;
    floor_revision bigint;
    ids bigint[] := '{}';
    firsts bigint[] := '{}';
    floors bigint[] := '{}';
BEGIN
    -- Revisions, from each tenant's counter, locked in tenant id order.
    FOR grp IN SELECT u.t, count(*) AS n FROM unnest(p_tenants) AS u(t) GROUP BY u.t ORDER BY u.t
    LOOP
        UPDATE tenant SET revision = tenant.revision + grp.n WHERE tenant.id = grp.t
        RETURNING tenant.revision - grp.n + 1, tenant.compacted_revision
        INTO first_revision, floor_revision;
        IF NOT FOUND THEN
            RAISE foreign_key_violation USING MESSAGE = 'no such tenant';
        END IF;
        ids := ids || grp.t;
        firsts := firsts || first_revision;
        floors := floors || floor_revision;
    END LOOP;
    RETURN QUERY
    WITH input AS (
        SELECT * FROM unnest(p_tenants, p_keys, p_data, p_expires, p_offsets)
            AS i(t, k, d, e, off)),
    rev AS (SELECT * FROM unnest(ids, firsts, floors) AS r(id, first, floor)),
    up AS (
        INSERT INTO object
            (tenant_id, "key", data, version, revision, created_revision, expires_at,
             created_at, updated_at)
        SELECT i.t, i.k, i.d::jsonb,
               GREATEST(1, COALESCE(ts.version, 0) + 1, rev.floor + 1),
               rev.first + i.off, rev.first + i.off, i.e, p_now, p_now
        FROM input AS i JOIN rev ON rev.id = i.t
        LEFT JOIN object_tombstone AS ts ON ts.tenant_id = i.t AND ts."key" = i.k
        ON CONFLICT (tenant_id, "key") DO UPDATE SET
            data = excluded.data, revision = excluded.revision,
            expires_at = excluded.expires_at, updated_at = excluded.updated_at,
            version = CASE WHEN object.expires_at <= p_now
                           THEN GREATEST(object.version + 1, excluded.version)
                           ELSE object.version + 1 END,
            created_at = CASE WHEN object.expires_at <= p_now
                              THEN excluded.created_at ELSE object.created_at END,
            created_revision = CASE WHEN object.expires_at <= p_now
                                    THEN excluded.created_revision
                                    ELSE object.created_revision END
        WHERE NOT p_create_only OR object.expires_at <= p_now
        RETURNING object.tenant_id, object."key", object.data, object.version,
                  object.revision, object.expires_at, object.created_at,
                  object.created_revision),
    logged AS (
        INSERT INTO change_log
            (tenant_id, revision, kind, "key", version, data, expires_at, created_at, at)
        SELECT up.tenant_id, up.revision, 1, up."key", up.version, up.data, up.expires_at,
               up.created_at, p_now
        FROM up)
    SELECT up.tenant_id, up."key"::text, up.version, up.revision, up.created_at,
           up.created_revision
    FROM up;
END
$fn$"#;

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
