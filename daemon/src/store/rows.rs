//! Reading rows: columns read leniently (an application may have written
//! anything), and a whole request row as [`Request`].

use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use crate::request::Request;

/// Reads columns leniently: a malformed row written by an application
/// (non-UTF-8 bytes, text in an integer column) must never fail a whole claim.
pub(super) trait RowExt {
    fn int(&self, index: usize) -> sqlx::Result<i64>;
    fn opt_int(&self, index: usize) -> sqlx::Result<Option<i64>>;
    fn opt_float(&self, index: usize) -> sqlx::Result<Option<f64>>;
    fn opt_bytes(&self, index: usize) -> sqlx::Result<Option<Vec<u8>>>;
    fn opt_text(&self, index: usize) -> sqlx::Result<Option<String>> {
        Ok(self
            .opt_bytes(index)?
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }
    fn text(&self, index: usize) -> sqlx::Result<String> {
        Ok(self.opt_text(index)?.unwrap_or_default())
    }
}

impl RowExt for SqliteRow {
    // SQLite's dynamic typing: an application may store anything anywhere,
    // so read with SQLite's own conversions rather than sqlx's type checks.
    fn int(&self, index: usize) -> sqlx::Result<i64> {
        Ok(self.opt_int(index)?.unwrap_or(0))
    }
    fn opt_int(&self, index: usize) -> sqlx::Result<Option<i64>> {
        self.try_get_unchecked(index)
    }
    fn opt_float(&self, index: usize) -> sqlx::Result<Option<f64>> {
        self.try_get_unchecked(index)
    }
    fn opt_bytes(&self, index: usize) -> sqlx::Result<Option<Vec<u8>>> {
        self.try_get_unchecked(index)
    }
}

impl RowExt for PgRow {
    fn int(&self, index: usize) -> sqlx::Result<i64> {
        self.try_get(index)
    }
    fn opt_int(&self, index: usize) -> sqlx::Result<Option<i64>> {
        self.try_get(index)
    }
    fn opt_float(&self, index: usize) -> sqlx::Result<Option<f64>> {
        self.try_get(index)
    }
    fn opt_bytes(&self, index: usize) -> sqlx::Result<Option<Vec<u8>>> {
        Ok(self
            .try_get::<Option<String>, _>(index)?
            .map(String::into_bytes))
    }
}

pub(super) fn request_from_row(row: &impl RowExt) -> sqlx::Result<Request> {
    Ok(Request {
        id: row.int(0)?,
        created_at: row.opt_text(1)?,
        task_class_name: row.text(2)?,
        options: row.opt_text(3)?,
        pid: row.opt_int(4)?,
        host: row.opt_text(5)?,
        started_at: row.opt_text(6)?,
        completed_at: row.opt_text(7)?,
        heartbeat_at: row.opt_text(8)?,
        result: row.opt_text(9)?,
        result_text: row.opt_text(10)?,
        tries: row.int(11)?,
        try_limit: row.int(12)?,
        delay_until: row.opt_text(13)?,
        priority: row.int(14)?,
        claimed_by: row.opt_text(15)?,
        cancel_requested_at: row.opt_text(16)?,
        progress: row.opt_text(17)?,
        queue: row.text(18)?,
        node: row.opt_text(19)?,
        not_node: row.opt_text(20)?,
        period: row.opt_int(21)?,
        planned_at: row.opt_text(22)?,
        unique_key: row.opt_text(23)?,
        schedule: row.opt_text(24)?,
        batch_id: row.opt_int(25)?,
        on_success: row.opt_text(26)?,
        on_failure: row.opt_text(27)?,
        callback_of: row.opt_int(28)?,
        callback_of_batch: row.opt_int(29)?,
        flow_id: row.opt_int(30)?,
        flow_step: row.opt_int(31)?,
        flow_action: row.opt_text(32)?,
    })
}

/// An INSERT whose `RETURNING` gave no row back: a trigger of the
/// application's skipped the row without an error (SQLite's
/// `RAISE(IGNORE)`, a PostgreSQL `BEFORE INSERT` trigger returning NULL).
/// The database's refusal ([`super::refused_by_the_database`]), never a
/// panic: a schedule's request so skipped stopped the daemon at every start.
#[derive(Debug)]
pub(crate) struct RowSkipped;

impl std::fmt::Display for RowSkipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the database stored no row (a trigger skipped the INSERT: SQLite's RAISE(IGNORE), or a PostgreSQL BEFORE INSERT trigger returning NULL)")
    }
}

impl std::error::Error for RowSkipped {}

/// The id an INSERT's `RETURNING` gave back, or [`RowSkipped`].
pub(super) fn inserted_id<R: RowExt>(rows: &[R]) -> anyhow::Result<i64> {
    match rows.first() {
        Some(row) => Ok(row.int(0)?),
        None => Err(RowSkipped.into()),
    }
}
