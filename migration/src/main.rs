use sea_orm_migration::prelude::*;

/// `cargo run -p migration -- up` (or `down`, `status`, `fresh`, ...).
///
/// The database is `DATABASE_URL` if set, else `KVQL_DATABASE_URL`, else the
/// same default SQLite file the server uses.
#[tokio::main]
async fn main() {
    if std::env::var_os("DATABASE_URL").is_none() {
        let url = std::env::var("KVQL_DATABASE_URL")
            .unwrap_or_else(|_| "sqlite://kvql.db?mode=rwc".to_owned());
        // SAFETY: single-threaded at this point; nothing else reads the environment yet.
        unsafe { std::env::set_var("DATABASE_URL", url) };
    }
    cli::run_cli(migration::Migrator).await;
}
