use sea_orm::entity::prelude::*;

/// An API key: a long-lived bearer token of a tenant, for an app.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_key")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub tenant_id: i64,
    /// Unique within the tenant.
    pub name: String,
    /// `read` or `read_write`.
    pub scope: String,
    /// Reserved for keys restricted to a key prefix; always `None` so far.
    pub prefix: Option<String>,
    /// Lowercase hex SHA-256 of the token's secret part.
    pub secret_hash: String,
    /// The username of the owner who made it.
    pub created_by: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    /// Updated at most once a minute per node.
    pub last_used_at: Option<i64>,
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
