use sea_orm::entity::prelude::*;

/// A token signing key shared by every node through the database. The newest
/// key without `retired_at` signs; any key not retired verifies.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "signing_key")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub kid: String,
    /// JWT algorithm name, e.g. `HS256`.
    pub algorithm: String,
    /// Raw key material.
    pub secret: Vec<u8>,
    pub created_at: i64,
    pub retired_at: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
