//! The SQLite committer's own connection: a `rusqlite` connection to the
//! database file, driven from the committer's thread. It implements
//! `sql::WriteConn`, as sqlx's connections do, so that the write path and
//! its SQL (`write`, `sql`) are the same code on both backends.
//!
//! Through sqlx, each statement of a group commit went from the committer
//! task to sqlx's worker thread for the connection and back: a thread
//! wake-up per statement. Here a statement runs where the group is applied,
//! and none of its futures ever waits.

use std::path::Path;
use std::sync::{Arc, Mutex};

use sea_orm::prelude::async_trait::async_trait;
use sea_orm::{DatabaseBackend, DbErr, RuntimeErr, Statement, Value};

use super::sql::{WriteConn, WriteRow};

use crate::config::SqliteSync;
use crate::error::ApiError;

/// The committer's connection. The mutex is never contended (one thread
/// uses it); it makes the connection `Sync`, as `WriteConn` requires.
pub(super) struct SqliteWriter {
    conn: Mutex<rusqlite::Connection>,
}

/// Prepared statements kept: multi-row writes of every size up to 256 rows,
/// for creates and for puts, plus the rest (as on sqlx's connections).
const STATEMENT_CACHE: usize = 600;

impl SqliteWriter {
    /// Opens the database file with the settings of sqlx's writer connection
    /// (see `db::sqlite_options`): WAL, the configured `synchronous`, foreign
    /// keys, a 10 s busy timeout, checkpoints left to the background.
    pub(super) fn open(path: &Path, sync: SqliteSync) -> rusqlite::Result<SqliteWriter> {
        let conn = super::sql::open_sqlite(path)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            match sync {
                SqliteSync::Normal => "NORMAL",
                SqliteSync::Full => "FULL",
            },
        )?;
        conn.pragma_update(None, "foreign_keys", true)?;
        // A multi-row write inside a group's transaction keeps a statement
        // journal (the pages it changed, to undo that statement alone),
        // which past 64 KiB SQLite spills to a temporary file: kept in
        // memory, a group of PUTs costs a third fewer writes to files.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.pragma_update(
            None,
            "wal_autocheckpoint",
            crate::db::WAL_AUTOCHECKPOINT_PAGES,
        )?;
        Ok(SqliteWriter {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T, DbErr> {
        let conn = self.conn.lock().map_err(|_| {
            DbErr::Conn(RuntimeErr::Internal("the SQLite writer is poisoned".into()))
        })?;
        f(&conn).map_err(db_err)
    }

    /// Ends the open transaction, if any, without writing it. Whether the
    /// connection is now outside any transaction.
    fn roll_back_if_open(&self) -> bool {
        self.with(|conn| {
            if !conn.is_autocommit() {
                conn.execute_batch("ROLLBACK")?;
            }
            Ok(conn.is_autocommit())
        })
        .unwrap_or(false)
    }

    /// Rolls back a transaction that nothing should have left open (a
    /// dropped `SqliteTxn`, or one found before a group), saying so.
    pub(super) fn end_stray_transaction(&self) {
        let open = self.with(|conn| Ok(!conn.is_autocommit())).unwrap_or(true);
        if open {
            tracing::error!("the SQLite writer had a transaction open; rolling it back");
            self.roll_back_if_open();
        }
    }

    /// Begins a transaction that takes the write lock at once.
    pub(super) fn begin(&self) -> Result<(), DbErr> {
        self.with(|conn| conn.execute_batch("BEGIN IMMEDIATE"))
    }

    /// Commits; if SQLite refuses (a deferred constraint, a full disk), the
    /// transaction is rolled back, so that nothing of it is written. If it
    /// cannot be, the error says the outcome is unknown.
    pub(super) fn commit(&self) -> Result<(), DbErr> {
        let result = self.with(|conn| conn.execute_batch("COMMIT"));
        if result.is_err() && !self.roll_back_if_open() {
            return Err(DbErr::Exec(RuntimeErr::Internal(
                "the SQLite writer could not end a transaction whose COMMIT failed".into(),
            )));
        }
        result
    }

    pub(super) fn rollback(&self) -> Result<(), DbErr> {
        self.with(|conn| conn.execute_batch("ROLLBACK"))
    }
}

/// Binds `stmt`'s values: `$n` by its number, as sqlx does, `?` in order.
fn bind(prepared: &mut rusqlite::Statement<'_>, stmt: &Statement) -> rusqlite::Result<()> {
    let values = stmt.values.as_ref().map(|v| v.0.as_slice()).unwrap_or(&[]);
    for i in 1..=prepared.parameter_count() {
        let index = match prepared.parameter_name(i) {
            Some(name) => name[1..]
                .parse::<usize>()
                .map_err(|_| rusqlite::Error::InvalidParameterName(name.to_owned()))?,
            None => i,
        };
        let value = values
            .get(index.wrapping_sub(1))
            .ok_or(rusqlite::Error::InvalidParameterCount(index, values.len()))?;
        bind_one(prepared, i, value)?;
    }
    Ok(())
}

fn bind_one(
    prepared: &mut rusqlite::Statement<'_>,
    i: usize,
    value: &Value,
) -> rusqlite::Result<()> {
    match value {
        Value::Bool(v) => prepared.raw_bind_parameter(i, v),
        Value::Int(v) => prepared.raw_bind_parameter(i, v),
        Value::BigInt(v) => prepared.raw_bind_parameter(i, v),
        Value::Unsigned(v) => prepared.raw_bind_parameter(i, v),
        Value::Double(v) => prepared.raw_bind_parameter(i, v),
        Value::String(v) => prepared.raw_bind_parameter(i, v),
        Value::Bytes(v) => prepared.raw_bind_parameter(i, v),
        other => Err(rusqlite::Error::ToSqlConversionFailure(
            format!("the SQLite writer cannot bind {other:?}").into(),
        )),
    }
}

/// A column as sea-orm's value. It never fails, so that a row is never left
/// half read (an autocommitted statement reset early commits). NULL reads as
/// a null integer (the store's statements only return nullable integers),
/// text that is not UTF-8 as bytes.
fn column(row: &rusqlite::Row<'_>, i: usize) -> Value {
    use rusqlite::types::ValueRef;
    match row.get_ref(i) {
        Ok(ValueRef::Null) | Err(_) => Value::BigInt(None),
        Ok(ValueRef::Integer(v)) => Value::BigInt(Some(v)),
        Ok(ValueRef::Real(v)) => Value::Double(Some(v)),
        Ok(ValueRef::Text(t)) => match std::str::from_utf8(t) {
            Ok(t) => Value::String(Some(t.to_owned())),
            Err(_) => Value::Bytes(Some(t.to_vec())),
        },
        Ok(ValueRef::Blob(b)) => Value::Bytes(Some(b.to_vec())),
    }
}

/// Prefix of the errors SQLite itself answered, having rolled back what
/// failed (see [`refused_by_sqlite`]).
const REFUSED: &str = "SQLite refused: ";

fn db_err(e: rusqlite::Error) -> DbErr {
    use rusqlite::ErrorCode;
    let refused = matches!(
        &e,
        rusqlite::Error::SqliteFailure(f, _)
            if !matches!(f.code, ErrorCode::SystemIoFailure | ErrorCode::DatabaseCorrupt)
    );
    DbErr::Exec(RuntimeErr::Internal(if refused {
        format!("{REFUSED}{e}")
    } else {
        format!("SQLite writer: {e}")
    }))
}

/// Whether SQLite answered `err` itself and wrote nothing of the failed
/// statement, or of the transaction whose `COMMIT` failed (rolled back by
/// `SqliteWriter::commit`). Not so for an I/O error or a corrupt file,
/// which may strike after a commit frame reached the log, nor for a
/// failure on kvql's side of the connection.
pub(super) fn refused_by_sqlite(err: &ApiError) -> bool {
    let ApiError::Internal(cause) = err else {
        return false;
    };
    matches!(
        cause.downcast_ref::<DbErr>(),
        Some(DbErr::Exec(RuntimeErr::Internal(m))) if m.starts_with(REFUSED)
    )
}

#[async_trait]
impl WriteConn for SqliteWriter {
    type Row = Row;

    fn backend(&self) -> DatabaseBackend {
        DatabaseBackend::Sqlite
    }

    /// Steps the statement to its end: outside a transaction SQLite commits
    /// only then (see `sql::returning_one`).
    async fn query(&self, stmt: Statement) -> Result<Vec<Row>, DbErr> {
        self.with(|conn| {
            let mut prepared = conn.prepare_cached(&stmt.sql)?;
            bind(&mut prepared, &stmt)?;
            let names: Arc<[String]> = prepared
                .column_names()
                .into_iter()
                .map(str::to_owned)
                .collect();
            let mut rows = prepared.raw_query();
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(Row {
                    names: names.clone(),
                    values: (0..names.len()).map(|i| column(row, i)).collect(),
                });
            }
            Ok(out)
        })
    }

    async fn execute(&self, sql: &str) -> Result<(), DbErr> {
        self.with(|conn| conn.execute_batch(sql))
    }
}

/// The writer inside a transaction it began: the same connection. Dropped
/// without a commit, it rolls the transaction back.
pub(super) struct SqliteTxn<'a>(pub(super) &'a SqliteWriter);

impl Drop for SqliteTxn<'_> {
    fn drop(&mut self) {
        self.0.end_stray_transaction();
    }
}

#[async_trait]
impl WriteConn for SqliteTxn<'_> {
    type Row = Row;

    fn backend(&self) -> DatabaseBackend {
        DatabaseBackend::Sqlite
    }

    async fn query(&self, stmt: Statement) -> Result<Vec<Row>, DbErr> {
        self.0.query(stmt).await
    }

    async fn execute(&self, sql: &str) -> Result<(), DbErr> {
        self.0.execute(sql).await
    }
}

/// A row a statement of the writer returned.
pub(super) struct Row {
    names: Arc<[String]>,
    values: Vec<Value>,
}

impl Row {
    fn get(&self, col: &str) -> Result<&Value, DbErr> {
        self.names
            .iter()
            .position(|n| n == col)
            .and_then(|i| self.values.get(i))
            .ok_or_else(|| DbErr::Type(format!("no column {col} in the row")))
    }
}

impl WriteRow for Row {
    fn int(&self, col: &str) -> Result<i64, DbErr> {
        match self.get(col)? {
            Value::Int(Some(v)) => Ok(i64::from(*v)),
            Value::BigInt(Some(v)) => Ok(*v),
            other => Err(DbErr::Type(format!(
                "column {col} is {other:?}, not an integer"
            ))),
        }
    }

    fn text(&self, col: &str) -> Result<String, DbErr> {
        match self.get(col)? {
            Value::String(Some(v)) => Ok(v.clone()),
            other => Err(DbErr::Type(format!("column {col} is {other:?}, not text"))),
        }
    }
}
