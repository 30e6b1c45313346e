use sea_orm::entity::prelude::*;

/// A tenant: the unit of isolation. Every object and user belongs to one.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "tenant")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub name: String,
    pub created_at: i64,
    /// The last revision given to a change of this tenant's data.
    pub revision: i64,
    /// The last revision removed from the change log by compaction.
    pub compacted_revision: i64,
    /// Requests per second this tenant may make on each node, overriding
    /// the node's setting: `None` keeps it, `Some(0)` lifts the limit.
    pub rate_limit: Option<i64>,
    /// The burst for `rate_limit`: `None` for as many as the rate.
    pub rate_burst: Option<i64>,
    /// Rows this tenant has in `object` (expired ones until swept), kept by
    /// triggers (see the quotas migration).
    pub used_keys: i64,
    /// The sum of those rows' `size`.
    pub used_bytes: i64,
    /// The tenant's own limit on `used_keys`: `None` keeps the servers'
    /// default, a negative value lifts the limit.
    pub max_keys: Option<i64>,
    /// The tenant's own limit on `used_bytes`, like `max_keys`.
    pub max_bytes: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::user::Entity")]
    User,
    #[sea_orm(has_many = "super::object::Entity")]
    Object,
}

impl Related<super::user::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::User.def()
    }
}

impl Related<super::object::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Object.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
