//! Database connections. SQLite gets a read pool plus one dedicated writer
//! connection (SQLite allows one writer at a time; queuing writes in the pool
//! instead of in SQLite's busy handler keeps latency flat). PostgreSQL uses one
//! pool for both.

use std::time::Duration;

use anyhow::Context;
use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, DbErr, SqliteTransactionMode, TransactionOptions, TransactionTrait,
};

use crate::config::{DatabaseArgs, SqliteSync};

/// Prepared statements kept per connection: multi-row writes of every size
/// up to 256 rows, for creates and for puts, plus the rest.
const STATEMENT_CACHE: usize = 600;

/// A pooled connection is pinged before use only after it has been idle
/// this long (one that broke meanwhile, say in a PostgreSQL restart, is then
/// replaced instead of failing a request). Pinging on every use would cost
/// each statement a second round trip to the database, or on SQLite to its
/// worker thread: measured, a third of a PostgreSQL GET's throughput.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(2);

/// WAL pages after which a committing connection copies the log into the
/// database itself, inside its commit. The background checkpointer (see
/// `Db::start_checkpointer`) normally does that work: at 10,000 pages
/// (10 MiB), sustained writes outran its 200 ms period and the committer
/// checkpointed in the commit path, measured as REST PUT p99 8–12 ms against
/// 3.5–7 ms at 100,000 (alternating runs, 10,000 keys, c=32 and 64). The log
/// can grow to about this many pages (100 MiB with 1 KiB pages) only while
/// the background checkpoint cannot keep up, e.g. behind a long read.
pub(crate) const WAL_AUTOCHECKPOINT_PAGES: u32 = 100_000;

/// Pools never retire connections by idle time or age: with either limit,
/// sqlx 0.9.0 runs a reaper task that loops `for _ in 0..num_idle`, and
/// `num_idle` wraps below zero for an instant when a connection is taken
/// while another is being returned. A reaper that reads it then spins on a
/// runtime thread practically forever (seen: `kvql user remove` at 100% CPU
/// for 14 minutes, unable to exit). Broken connections are still replaced:
/// see `PING_IF_IDLE_FOR`.
fn without_reaper(opts: &mut ConnectOptions) -> &mut ConnectOptions {
    opts.idle_timeout(None).max_lifetime(None)
}

#[derive(Clone, Debug)]
pub struct Db {
    pub read: DatabaseConnection,
    pub write: DatabaseConnection,
    pub backend: DatabaseBackend,
    /// The SQLite database file, for connections outside sqlx's pools (the
    /// store's readers); `None` on PostgreSQL.
    pub sqlite_file: Option<std::path::PathBuf>,
    /// `KVQL_SQLITE_SYNCHRONOUS`, for the store's own SQLite writer.
    pub sqlite_synchronous: SqliteSync,
    /// `KVQL_SQLITE_MMAP_BYTES`, for the store's reader connections.
    pub sqlite_mmap_bytes: u64,
    /// `KVQL_SQLITE_READS_IN_PLACE`, for the store's readers.
    pub sqlite_reads_in_place: bool,
    /// `KVQL_DATABASE_COMMITTERS`: committer tasks on PostgreSQL.
    pub committers: usize,
}

impl Db {
    /// Opens the database, creating a SQLite file if needed. Does not migrate.
    pub async fn connect(args: &DatabaseArgs) -> anyhow::Result<Db> {
        let url = args.database_url.as_str();
        if url.starts_with("sqlite:") {
            let write = Database::connect(sqlite_options(url, 1, args.sqlite_synchronous, 0))
                .await
                .with_context(|| format!("cannot open {}", args.redacted_url()))?;
            let Some(file) = main_file(&write).await? else {
                anyhow::bail!(
                    "in-memory SQLite ({}) is not supported: kvql's reader and writer \
                     connections would each get a database of their own; use a file \
                     such as sqlite://kvql.db?mode=rwc",
                    args.redacted_url()
                );
            };
            // The writer has created the file and switched it to WAL; readers may now open it.
            let read = Database::connect(sqlite_options(
                url,
                args.database_max_connections.max(1),
                args.sqlite_synchronous,
                args.sqlite_mmap_bytes,
            ))
            .await
            .with_context(|| format!("cannot open {}", args.redacted_url()))?;
            Ok(Db {
                read,
                write,
                backend: DatabaseBackend::Sqlite,
                sqlite_file: Some(file),
                sqlite_synchronous: args.sqlite_synchronous,
                sqlite_mmap_bytes: args.sqlite_mmap_bytes,
                sqlite_reads_in_place: args.sqlite_reads_in_place,
                committers: usize::from(args.database_committers),
            })
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let mut opts = ConnectOptions::new(url);
            without_reaper(&mut opts)
                .max_connections(args.database_max_connections.max(2))
                .min_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .test_before_acquire_if_idle_for(PING_IF_IDLE_FOR)
                .sqlx_logging(false)
                .map_sqlx_postgres_opts(|o| o.statement_cache_capacity(STATEMENT_CACHE))
                .map_sqlx_postgres_pool_opts(|o| o.acquire_time_level(ACQUIRE_EVENTS));
            let pool = Database::connect(opts)
                .await
                .with_context(|| format!("cannot connect to {}", args.redacted_url()))?;
            Ok(Db {
                read: pool.clone(),
                write: pool,
                backend: DatabaseBackend::Postgres,
                sqlite_file: None,
                sqlite_synchronous: args.sqlite_synchronous,
                sqlite_mmap_bytes: args.sqlite_mmap_bytes,
                sqlite_reads_in_place: args.sqlite_reads_in_place,
                committers: usize::from(args.database_committers),
            })
        } else {
            anyhow::bail!(
                "unsupported database URL {}: use sqlite://PATH?mode=rwc or postgres://USER@HOST/DB",
                args.redacted_url()
            )
        }
    }

    /// Applies pending migrations. On PostgreSQL an advisory lock makes
    /// concurrent starts of several nodes take turns.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        match self.backend {
            DatabaseBackend::Postgres => {
                let pool = self.write.get_postgres_connection_pool();
                let mut lock = pool.acquire().await.context("cannot reach PostgreSQL")?;
                use sea_orm::sqlx::Executor;
                lock.execute("SELECT pg_advisory_lock(7262457301)").await?;
                let result = Migrator::up(&self.write, None).await;
                lock.execute("SELECT pg_advisory_unlock(7262457301)")
                    .await?;
                result.context("migration failed")
            }
            _ => Migrator::up(&self.write, None)
                .await
                .context("migration failed"),
        }
    }

    /// Begins a transaction on the write connection, for the writes that do
    /// not go through the store's committer (users, API keys, signing keys).
    /// On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`),
    /// waiting for it up to the busy timeout: a deferred transaction that
    /// reads before it writes is refused at once ("database is locked") if
    /// another connection, such as the committer, commits in between.
    pub async fn begin_write(&self) -> Result<DatabaseTransaction, DbErr> {
        let sqlite_transaction_mode =
            (self.backend == DatabaseBackend::Sqlite).then_some(SqliteTransactionMode::Immediate);
        self.write
            .begin_with_options(TransactionOptions {
                isolation_level: None,
                access_mode: None,
                sqlite_transaction_mode,
            })
            .await
    }

    /// Whether the database answers a trivial query.
    pub async fn ping(&self) -> bool {
        self.read.execute_unprepared("SELECT 1").await.is_ok()
    }

    /// On SQLite, copies the write-ahead log into the database file every
    /// `interval` from a read connection (a PASSIVE checkpoint blocks
    /// nobody), so that commits never wait for a checkpoint and its fsync.
    pub fn start_checkpointer(&self, interval: Duration) -> Option<tokio::task::JoinHandle<()>> {
        if self.backend != DatabaseBackend::Sqlite {
            return None;
        }
        let read = self.read.clone();
        Some(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if let Err(e) = read
                    .execute_unprepared("PRAGMA wal_checkpoint(PASSIVE)")
                    .await
                {
                    tracing::warn!(error = %e, "WAL checkpoint failed");
                }
            }
        }))
    }

    pub fn is_postgres(&self) -> bool {
        self.backend == DatabaseBackend::Postgres
    }

    /// Connections of the read pool (on PostgreSQL, the node's only pool):
    /// `(in use, idle)`.
    pub fn pool_connections(&self) -> (u64, u64) {
        let (size, idle) = if self.is_postgres() {
            let pool = self.read.get_postgres_connection_pool();
            (pool.size(), pool.num_idle())
        } else {
            let pool = self.read.get_sqlite_connection_pool();
            (pool.size(), pool.num_idle())
        };
        let idle = idle as u64;
        (u64::from(size).saturating_sub(idle), idle)
    }
}

/// The file of a SQLite connection's main database as SQLite opened it (the
/// URL's path decoded, made absolute), or `None` when it is in memory,
/// whatever the URL's spelling (`:memory:`, `mode=memory`, `vfs=memdb`...).
async fn main_file(conn: &DatabaseConnection) -> anyhow::Result<Option<std::path::PathBuf>> {
    let rows = conn
        .query_all_raw(sea_orm::Statement::from_string(
            DatabaseBackend::Sqlite,
            "PRAGMA database_list",
        ))
        .await?;
    for row in rows {
        let name: String = row.try_get("", "name")?;
        if name == "main" {
            let file: String = row.try_get("", "file").unwrap_or_default();
            return Ok((!file.is_empty()).then(|| file.into()));
        }
    }
    Ok(None)
}

/// The path of a SQLite database URL's file, if it names one.
fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or("");
    if path.is_empty() || path.starts_with(":memory:") {
        return None;
    }
    // As sqlx reads it: percent-decoded, so that `?` and `#` can be in a name.
    let decoded = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .ok()?;
    Some(decoded.as_ref().into())
}

/// On SQLite, one kvql server owns the database file: its write queue and
/// cache must see every write. Holds an exclusive lock on `<file>-kvql.lock`
/// for as long as the returned file lives; a second server on the same file
/// is refused. (The `kvql user` commands do not take it.) `None` on PostgreSQL.
pub fn lock_for_server(args: &DatabaseArgs) -> anyhow::Result<Option<std::fs::File>> {
    let Some(path) = sqlite_path(&args.database_url) else {
        return Ok(None);
    };
    let mut lock_path = path.clone().into_os_string();
    lock_path.push("-kvql.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", std::path::Path::new(&lock_path).display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another kvql server is already serving {}: on SQLite one server owns the \
             database (use PostgreSQL to run several nodes)",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(e)
            .with_context(|| format!("cannot lock {}", std::path::Path::new(&lock_path).display())),
    }
}

/// The level of the event sqlx emits for each connection its pools hand
/// out, which `metrics::pool_wait_layer` turns into
/// `kvql_db_pool_acquire_seconds` (logs show it only at `trace`).
const ACQUIRE_EVENTS: log::LevelFilter = log::LevelFilter::Trace;

fn sqlite_options(
    url: &str,
    max_connections: u32,
    sync: SqliteSync,
    mmap_bytes: u64,
) -> ConnectOptions {
    let mut opts = ConnectOptions::new(url);
    without_reaper(&mut opts)
        .max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .test_before_acquire_if_idle_for(PING_IF_IDLE_FOR)
        .sqlx_logging(false)
        .map_sqlx_sqlite_pool_opts(|o| o.acquire_time_level(ACQUIRE_EVENTS))
        .map_sqlx_sqlite_opts(move |o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .synchronous(match sync {
                    SqliteSync::Normal => SqliteSynchronous::Normal,
                    SqliteSync::Full => SqliteSynchronous::Full,
                })
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string())
                .page_size(1024)
                .pragma("mmap_size", mmap_bytes.to_string())
                .statement_cache_capacity(STATEMENT_CACHE)
        });
    opts
}

#[cfg(test)]
mod tests {
    use super::sqlite_path;

    #[test]
    fn sqlite_paths_come_from_the_url() {
        assert_eq!(
            sqlite_path("sqlite://kvql.db?mode=rwc"),
            Some("kvql.db".into())
        );
        assert_eq!(sqlite_path("sqlite:///tmp/a.db"), Some("/tmp/a.db".into()));
        assert_eq!(
            sqlite_path("sqlite:///tmp/a%20b%3F.db?mode=rwc"),
            Some("/tmp/a b?.db".into())
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://h/db"), None);
    }
}
