use sea_orm::entity::prelude::*;

/// A user who can log in. `username` is unique across all tenants, so a login
/// names exactly one tenant.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "user")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub tenant_id: i64,
    #[sea_orm(unique)]
    pub username: String,
    /// argon2id hash in PHC string form.
    pub password_hash: String,
    /// `owner`, `writer` or `reader`.
    pub role: String,
    pub created_at: i64,
    pub disabled: bool,
    /// Bumped when the password changes; a token issued under an earlier
    /// generation is refused.
    pub token_generation: i64,
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
