//! Quotas: how much each tenant stores, kept exact by the database, and the
//! limits an operator sets (see `api::store::quota`).
//!
//! - `object.size`: the bytes a value counts for: its key's UTF-8 bytes plus
//!   its data's compact JSON text (as the store writes it). Rows written
//!   before this migration are sized from their stored text (on PostgreSQL,
//!   JSONB's text form, a little longer than the compact one) until they are
//!   written again.
//! - `tenant.used_keys`, `tenant.used_bytes`: the number of rows of the
//!   tenant in `object` and the sum of their sizes, expired rows included
//!   until they are swept. Triggers on `object` keep them, in the
//!   transaction of each write: per row on SQLite; on PostgreSQL, per
//!   statement for insertions and deletions (transition tables: one counter
//!   update for a group's rows) and per row for a change of size (a `WHEN`
//!   condition, evaluated without calling the function, skips the common
//!   rewrite of a value of the same size). Every writer already holds its
//!   tenants' counter rows, so the triggers wait for nobody new.
//! - `tenant.max_keys`, `tenant.max_bytes`: the tenant's own limits. NULL
//!   keeps the servers' defaults (`KVQL_DEFAULT_MAX_KEYS`,
//!   `KVQL_DEFAULT_MAX_BYTES`); a negative value lifts the limit; 0 allows
//!   nothing more to be stored.
//! - `idx_object_tenant_expiry`: `(tenant_id, expires_at)` of the rows that
//!   expire, so that a tenant's expired rows are found without reading its
//!   other keys or other tenants' expired rows (usage, and the sweep a
//!   write near its quota makes). Rows without a TTL are not in it.
//!
//! It runs in one transaction on both backends: rows written between the
//! backfill and the triggers would otherwise be miscounted for good. Nodes
//! of an older kvql must be stopped first: their writes do not set `size`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let postgres = manager.get_database_backend() == DatabaseBackend::Postgres;
        let add = |table: Quotas, column: Quotas, counter: bool| {
            let mut def = ColumnDef::new(column);
            def.big_integer();
            if counter {
                def.not_null().default(0);
            } else {
                def.null();
            }
            Table::alter().table(table).add_column(def).to_owned()
        };
        for (table, column, counter) in COLUMNS {
            manager.alter_table(add(table, column, counter)).await?;
        }
        let conn = manager.get_connection();
        let (size_of_rows, triggers) = if postgres {
            (
                r#"UPDATE object SET size = octet_length("key") + octet_length(data::text)"#,
                POSTGRES_TRIGGERS,
            )
        } else {
            (
                r#"UPDATE object SET size = length(CAST("key" AS BLOB)) + length(CAST(data AS BLOB))"#,
                SQLITE_TRIGGERS,
            )
        };
        conn.execute_unprepared(size_of_rows).await?;
        conn.execute_unprepared(
            "UPDATE tenant SET
               used_keys = (SELECT count(*) FROM object WHERE object.tenant_id = tenant.id),
               used_bytes = (SELECT COALESCE(sum(size), 0) FROM object
                             WHERE object.tenant_id = tenant.id)",
        )
        .await?;
        conn.execute_unprepared(triggers).await?;
        conn.execute_unprepared(
            "CREATE INDEX idx_object_tenant_expiry ON object (tenant_id, expires_at)
             WHERE expires_at IS NOT NULL",
        )
        .await?;
        if postgres {
            conn.execute_unprepared(&write_run_with_sizes()?).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let conn = manager.get_connection();
        conn.execute_unprepared("DROP INDEX IF EXISTS idx_object_tenant_expiry")
            .await?;
        for t in [
            "kvql_usage_insert",
            "kvql_usage_update",
            "kvql_usage_delete",
        ] {
            let drop = if manager.get_database_backend() == DatabaseBackend::Postgres {
                format!("DROP TRIGGER IF EXISTS {t} ON object")
            } else {
                format!("DROP TRIGGER IF EXISTS {t}")
            };
            conn.execute_unprepared(&drop).await?;
        }
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            conn.execute_unprepared(super::m20261126_000006_revisions::WRITE_RUN)
                .await?;
            conn.execute_unprepared(
                "DROP FUNCTION IF EXISTS kvql_usage_added();
                 DROP FUNCTION IF EXISTS kvql_usage_resized();
                 DROP FUNCTION IF EXISTS kvql_usage_removed();",
            )
            .await?;
        }
        for (table, column, _) in COLUMNS.into_iter().rev() {
            manager
                .alter_table(Table::alter().table(table).drop_column(column).to_owned())
                .await?;
        }
        Ok(())
    }
}

/// `kvql_write_run` (see the revisions migration), now also writing each
/// row's `size` from the text it is given: the key's and the compact JSON's
/// bytes, as the store computes them.
fn write_run_with_sizes() -> Result<String, DbErr> {
    let mut text = super::m20261126_000006_revisions::WRITE_RUN.to_owned();
    for (from, to) in [
        (
            "(tenant_id, \"key\", data, version,",
            "(tenant_id, \"key\", data, size, version,",
        ),
        (
            "SELECT i.t, i.k, i.d::jsonb,",
            "SELECT i.t, i.k, i.d::jsonb, octet_length(i.k) + octet_length(i.d),",
        ),
        (
            "data = excluded.data, revision = excluded.revision,",
            "data = excluded.data, size = excluded.size, revision = excluded.revision,",
        ),
    ] {
        if text.matches(from).count() != 1 {
            return Err(DbErr::Migration(format!(
                "kvql_write_run: expected {from:?} once"
            )));
        }
        text = text.replace(from, to);
    }
    Ok(text)
}

const SQLITE_TRIGGERS: &str = r#"
CREATE TRIGGER kvql_usage_insert AFTER INSERT ON object BEGIN
    UPDATE tenant SET used_keys = used_keys + 1, used_bytes = used_bytes + NEW.size
    WHERE id = NEW.tenant_id;
END;
CREATE TRIGGER kvql_usage_update AFTER UPDATE OF size ON object
WHEN NEW.size <> OLD.size BEGIN
    UPDATE tenant SET used_bytes = used_bytes + NEW.size - OLD.size
    WHERE id = NEW.tenant_id;
END;
CREATE TRIGGER kvql_usage_delete AFTER DELETE ON object BEGIN
    UPDATE tenant SET used_keys = used_keys - 1, used_bytes = used_bytes - OLD.size
    WHERE id = OLD.tenant_id;
END;
"#;

const POSTGRES_TRIGGERS: &str = r#"
CREATE FUNCTION kvql_usage_added() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    UPDATE tenant SET used_keys = tenant.used_keys + d.n, used_bytes = tenant.used_bytes + d.b
    FROM (SELECT tenant_id, count(*) AS n, sum(size) AS b FROM kvql_new GROUP BY tenant_id) AS d
    WHERE tenant.id = d.tenant_id;
    RETURN NULL;
END
$fn$;
CREATE FUNCTION kvql_usage_resized() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    UPDATE tenant SET used_bytes = tenant.used_bytes + NEW.size - OLD.size
    WHERE tenant.id = NEW.tenant_id;
    RETURN NULL;
END
$fn$;
CREATE FUNCTION kvql_usage_removed() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    UPDATE tenant SET used_keys = tenant.used_keys - d.n, used_bytes = tenant.used_bytes - d.b
    FROM (SELECT tenant_id, count(*) AS n, sum(size) AS b FROM kvql_old GROUP BY tenant_id) AS d
    WHERE tenant.id = d.tenant_id;
    RETURN NULL;
END
$fn$;
CREATE TRIGGER kvql_usage_insert AFTER INSERT ON object
    REFERENCING NEW TABLE AS kvql_new
    FOR EACH STATEMENT EXECUTE FUNCTION kvql_usage_added();
CREATE TRIGGER kvql_usage_update AFTER UPDATE OF size ON object
    FOR EACH ROW WHEN (OLD.size IS DISTINCT FROM NEW.size)
    EXECUTE FUNCTION kvql_usage_resized();
CREATE TRIGGER kvql_usage_delete AFTER DELETE ON object
    REFERENCING OLD TABLE AS kvql_old
    FOR EACH STATEMENT EXECUTE FUNCTION kvql_usage_removed();
"#;

/// `(table, column, counter)`: a counter is `BIGINT NOT NULL DEFAULT 0`, a
/// limit a nullable `BIGINT`.
const COLUMNS: [(Quotas, Quotas, bool); 5] = [
    (Quotas::Object, Quotas::Size, true),
    (Quotas::Tenant, Quotas::UsedKeys, true),
    (Quotas::Tenant, Quotas::UsedBytes, true),
    (Quotas::Tenant, Quotas::MaxKeys, false),
    (Quotas::Tenant, Quotas::MaxBytes, false),
];

#[derive(DeriveIden, Clone, Copy)]
enum Quotas {
    Tenant,
    Object,
    Size,
    UsedKeys,
    UsedBytes,
    MaxKeys,
    MaxBytes,
}
