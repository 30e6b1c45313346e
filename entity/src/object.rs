use sea_orm::entity::prelude::*;

/// A stored value. The primary key is `(tenant_id, key)`: the tenant leads every
/// key and index. `data` is JSONB on PostgreSQL and JSON text on SQLite.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "object")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: i64,
    #[sea_orm(primary_key, auto_increment = false)]
    pub key: String,
    #[sea_orm(column_type = "JsonBinary")]
    pub data: Json,
    /// Grows by one on every write. A new key starts at 1 (see the README on
    /// versions after a delete), and a version never comes back.
    pub version: i64,
    /// When the value stops being visible; `None` means it never expires.
    pub expires_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The revision of the change that wrote this value (0: written before
    /// revisions existed).
    pub revision: i64,
    /// The revision of the write that created this value.
    pub created_revision: i64,
    /// The bytes this value counts for in its tenant's quota: the key's
    /// UTF-8 bytes plus the data's compact JSON text.
    pub size: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::tenant::Entity",
        from = "Column::TenantId",
        to = "super::tenant::Column::Id",
        on_delete = "Cascade"
    )]
    Tenant,
}

impl Related<super::tenant::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Tenant.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
