use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SigningKey::Table)
                    .col(
                        ColumnDef::new(SigningKey::Kid)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(SigningKey::Algorithm).string().not_null())
                    .col(ColumnDef::new(SigningKey::Secret).binary().not_null())
                    .col(
                        ColumnDef::new(SigningKey::CreatedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(SigningKey::RetiredAt).big_integer().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(SigningKey::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum SigningKey {
    Table,
    Kid,
    Algorithm,
    Secret,
    CreatedAt,
    RetiredAt,
}
