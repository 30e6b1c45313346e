use sea_orm::entity::prelude::*;

/// A token signing key shared by every node through the database. The newest
/// key without `retired_at` signs; a key verifies until `retired_at` (none:
/// forever), so that a rotation lets the tokens an older key signed run out.
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
    /// When the key stops verifying, Unix ms; set by `kvql key rotate`.
    pub retired_at: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
