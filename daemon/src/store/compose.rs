//! What a final outcome causes, written in the transaction that records it:
//! a request's callbacks (`on_success`, `on_failure`, the config's
//! `on_exhausted`), its periodic next occurrence, and its batch's counts,
//! fail-fast cancellation, end and callback.
//!
//! One path: [`Store::finalize`] is the only writer of an outcome that may
//! end a request with follow-ups (the daemon's fenced outcome, the reaper's
//! exhaustion, a user's cancel), and every batch change that may end a
//! batch (a member's end, `seal`, the repair pass) goes through
//! [`Store::settle`] inside such a transaction. Rows without follow-ups keep
//! the recorder's one-statement batches (`Store::record`).
//!
//! Why it is exact. The transaction first locks the parent batch row
//! (PostgreSQL `SELECT … FOR UPDATE`; SQLite's `BEGIN IMMEDIATE` already
//! excludes every other writer), then writes the member's outcome, updates
//! the counts, and decides. Whoever finalizes a batch's last member takes
//! the lock after every other member's finalizer has committed, so it sees
//! them all final; "all members done?" is never read from rows without that
//! lock (two last finishers would each see the other unfinished, and no
//! callback would ever be made). A batch's callback is created only while
//! its `state` is NULL, in the transaction that sets it; a request's
//! callback (and its next occurrence) only if `task_runner_follow_ups`
//! has no note that the request made it before, under the request's own
//! row lock. The note is written with the row it notes and lives as long
//! as the request, however soon retention deletes the row made. So each
//! callback row is created
//! exactly once, whatever crashes: a transaction that did not commit left
//! nothing, and its outcome is written again (or the row reaped) later.
//!
//! Lock order, everywhere: the batch row, then request rows. The member
//! insert trigger (migration 0005) takes the batch row too, after inserting
//! a row no one else can see yet.

use anyhow::Result;
use serde_yaml::{Mapping, Value};
use sqlx::mysql::MySqlRow;
use sqlx::postgres::PgRow;
use sqlx::query;
use sqlx::sqlite::SqliteRow;

use super::sql::{cancel_unstarted, lock_unstarted_nowait, unfinished, Dialect, Statements};
use super::{begin_write, Outcome, Pool, RowExt, Store};
use crate::instance::ClaimToken;
use crate::request::{RequestId, State};

/// How a request may become final; each is written by [`Store::finalize`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ending<'a> {
    /// A try's outcome, fenced by its claim token (the daemon's recorder,
    /// `run --id --record`).
    Outcome(&'a Outcome),
    /// The reaper found the try's process or daemon gone (fenced on the
    /// token it read); exhausted when no tries are left. With `give_back`
    /// the try does not count and the row is INTERRUPTED.
    Crashed {
        id: RequestId,
        claim_token: Option<&'a ClaimToken>,
        reason: &'a str,
        give_back: bool,
        /// For a row taken for its lapsed lease, the lease it was judged
        /// by: judged again under the row's lock, so that a renewal since
        /// the reaper's read keeps the row.
        lapsed: Option<std::time::Duration>,
    },
    /// A user cancelled a row that is not running.
    Cancelled(RequestId),
}

impl Ending<'_> {
    fn id(&self) -> RequestId {
        match self {
            Ending::Outcome(outcome) => outcome.id,
            Ending::Crashed { id, .. } | Ending::Cancelled(id) => *id,
        }
    }
}

/// What a write does when another session holds a row it writes under:
/// the request's own row, or its batch's or flow's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Locks {
    /// Waits for it (bounded as every call is).
    Wait,
    /// Writes nothing and says so ([`RowLocked`]): the recorder sets the
    /// write aside and records the others meanwhile. An application's
    /// transaction that adds members to a batch holds the batch's row until
    /// it commits (the insert counts the member there), one that changes a
    /// flow's row holds that row, one that reads a request `FOR UPDATE`
    /// (Rails' `with_lock`) holds the request's row, and waiting for any of
    /// them held up every outcome of the daemon.
    SetAside,
}

/// A row a write waits for when another session holds it: the request's
/// own, or the batch's or flow's row its end is written under the lock of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeldRow {
    Request(i64),
    Batch(i64),
    Flow(i64),
}

impl std::fmt::Display for HeldRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeldRow::Request(id) => write!(f, "request {id}"),
            HeldRow::Batch(id) => write!(f, "batch {id}"),
            HeldRow::Flow(id) => write!(f, "flow {id}"),
        }
    }
}

/// A write found a row it needs locked by another session and wrote
/// nothing ([`Locks::SetAside`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowLocked(pub(crate) HeldRow);

impl std::fmt::Display for RowLocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is locked by another session", self.0)
    }
}

impl std::error::Error for RowLocked {}

/// Locks `row` in `tx` with `wait` (its `SELECT … FOR UPDATE`), or with
/// [`Locks::SetAside`] with `nowait`, failing with [`RowLocked`] when
/// another session holds it. Whether the row was there.
pub(super) async fn lock_row(
    tx: &mut Tx,
    row: HeldRow,
    locks: Locks,
    wait: &'static str,
    nowait: &'static str,
) -> Result<bool> {
    let id = match row {
        HeldRow::Request(id) | HeldRow::Batch(id) | HeldRow::Flow(id) => id,
    };
    let rows = match locks {
        Locks::Wait => tx.fetch(wait, &[Int(id)]).await?,
        Locks::SetAside => match tx.fetch(nowait, &[Int(id)]).await {
            Err(error) if lock_not_available(&error) => return Err(RowLocked(row).into()),
            other => other?,
        },
    };
    Ok(!rows.is_empty())
}

/// A write's result, a [`RowLocked`] refusal taken out of the errors.
pub(super) fn unless_locked(written: Result<bool>) -> Result<Result<bool, RowLocked>> {
    match written {
        Ok(applied) => Ok(Ok(applied)),
        Err(error) => match error.downcast::<RowLocked>() {
            Ok(locked) => Ok(Err(locked)),
            Err(error) => Err(error),
        },
    }
}

/// Whether `error` is the refusal of a `NOWAIT` lock: PostgreSQL's
/// `lock_not_available`, MySQL's `ER_LOCK_NOWAIT`, MariaDB's lock wait
/// timeout (which its `NOWAIT` raises).
fn lock_not_available(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(error) = error else {
        return false;
    };
    if let Some(error) = error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return matches!(error.number(), 3572 | 1205);
    }
    error.code().as_deref() == Some("55P03")
}

/// The config's `on_exhausted:` hooks (top level, and per task type).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Hooks {
    pub(crate) on_exhausted: Option<String>,
    pub(crate) on_exhausted_by_type: std::collections::BTreeMap<String, String>,
}

impl Hooks {
    /// The type to run when a request of `task` is exhausted or REJECTED.
    /// Never for a request of that hook type itself (an alert that fails
    /// must not raise an alert about itself, forever).
    pub(crate) fn on_exhausted_for(&self, task: &str) -> Option<&str> {
        self.on_exhausted_by_type
            .get(task)
            .or(self.on_exhausted.as_ref())
            .map(String::as_str)
            .filter(|hook| *hook != task)
    }
}

/// Where a final member is counted in its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bucket {
    Finished,
    /// Exhausted, REJECTED (or a state taskrunner does not know).
    Failed,
    Cancelled,
}

impl Bucket {
    fn parse(text: &str) -> Option<Bucket> {
        match text {
            "finished" => Some(Bucket::Finished),
            "failed" => Some(Bucket::Failed),
            "cancelled" => Some(Bucket::Cancelled),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Bucket::Finished => "finished",
            Bucket::Failed => "failed",
            Bucket::Cancelled => "cancelled",
        }
    }
}

/// A request row as its end is judged.
#[derive(Debug, Clone)]
struct Ended {
    id: i64,
    task: String,
    options: Option<String>,
    result: Option<String>,
    result_text: Option<String>,
    batch_id: Option<i64>,
    on_success: Option<String>,
    on_failure: Option<String>,
    period: i64,
    /// `None` while the row is not final.
    bucket: Option<Bucket>,
    /// Its options were longer than a callback's may be: not loaded.
    options_left_out: bool,
}

/// A batch row, locked.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Batch {
    pub(crate) id: i64,
    pub(crate) created_at: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) options: Option<String>,
    pub(crate) on_complete: Option<String>,
    pub(crate) on_failure: Option<String>,
    pub(crate) fail_fast: bool,
    pub(crate) sealed_at: Option<String>,
    pub(crate) state: Option<String>,
    pub(crate) finished_at: Option<String>,
    pub(crate) counts: Counts,
    pub(crate) parent_batch_id: Option<i64>,
}

/// A batch's members by where they stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Counts {
    pub(crate) total: i64,
    /// Not final yet (never run, running, or to be retried).
    pub(crate) pending: i64,
    pub(crate) finished: i64,
    /// Exhausted or REJECTED.
    pub(crate) failed: i64,
    pub(crate) cancelled: i64,
}

/// The member a failed batch names in its callback's summary.
#[derive(Debug, Clone)]
struct Failing {
    id: i64,
    task: String,
    result: Option<String>,
    result_text: Option<String>,
}

/// A new batch (`batch create`).
#[derive(Debug, Clone, Default)]
pub(crate) struct NewBatch {
    pub(crate) name: Option<String>,
    pub(crate) options: Option<String>,
    pub(crate) on_complete: Option<String>,
    pub(crate) on_failure: Option<String>,
    pub(crate) fail_fast: bool,
    /// Sealed at once (no member may be added after... only while not final).
    pub(crate) sealed: bool,
    pub(crate) parent_batch_id: Option<i64>,
}

/// What `batch cancel` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BatchChange {
    /// Done; the number of members it cancelled.
    Done(u64),
    NotFound,
    /// The batch is already final, in this state.
    AlreadyFinal(String),
}

// ---- statements ----

pub(super) struct ComposeSql {
    batch_of: String,
    lock_batch: String,
    /// [`lock_batch`](ComposeSql::lock_batch) failing at once when another
    /// session holds the row (PostgreSQL and MariaDB/MySQL `NOWAIT`).
    lock_batch_nowait: String,
    ended_row: String,
    count_member: String,
    batch_row: String,
    recount: String,
    set_counts: String,
    cancel_unstarted: String,
    /// Locks the members `cancel_unstarted` cancels, NOWAIT (empty on
    /// SQLite).
    lock_unstarted_nowait: String,
    cancel_after_end: String,
    end_batch: String,
    first_failure: String,
    follow_up_made: String,
    callback_row: String,
    note_follow_up: String,
    insert_callback: String,
    repair_candidates: String,
    create_batch: String,
    seal: String,
    list_batches: String,
    callbacks_of_batch: String,
    callbacks_of_request: String,
    members_by_state: String,
}

/// A callback row in short: (id, task type, result, unique_key).
pub(crate) type CallbackRow = (i64, String, Option<String>, Option<String>);

static COMPOSE: Statements<ComposeSql> = Statements::new(ComposeSql::render);

impl ComposeSql {
    fn render(d: Dialect) -> ComposeSql {
        let now = d.now();
        let (insert_or_ignore, on_conflict_ignore) = (d.insert_or_ignore(), d.on_conflict_ignore());
        let open = unfinished("");
        let bucket = format!(
            "CASE WHEN {open} THEN 'pending' WHEN result = 'FINISHED' THEN 'finished' \
                  WHEN result = 'CANCELLED' THEN 'cancelled' ELSE 'failed' END"
        );
        let batch_columns = [
            d.int64("id"),
            d.show_time("created_at"),
            "name".into(),
            "options".into(),
            "on_complete".into(),
            "on_failure".into(),
            d.int64("CASE WHEN fail_fast THEN 1 ELSE 0 END"),
            d.show_time("sealed_at"),
            "state".into(),
            d.show_time("finished_at"),
            d.int64("total"),
            d.int64("pending"),
            d.int64("finished"),
            d.int64("failed"),
            d.int64("cancelled"),
            d.int64("parent_batch_id"),
        ]
        .join(", ");
        ComposeSql {
            batch_of: format!(
                "SELECT {}, {} FROM task_runner_requests WHERE id = $1",
                d.int64("batch_id"),
                d.int64("flow_id")
            ),
            lock_batch: format!(
                "SELECT {} FROM task_runner_batches WHERE id = $1 {}",
                d.int64("id"),
                d.for_update()
            ),
            lock_batch_nowait: format!(
                "SELECT {} FROM task_runner_batches WHERE id = $1 {}",
                d.int64("id"),
                d.for_update_nowait()
            ),
            // Options longer than `$2` (what a callback's options may hold)
            // are left out, and said to be: a callback cannot carry them,
            // and a row's options are not loaded past `max_options` (an
            // application's 200 MiB, parsed for a callback, took gigabytes
            // and stalled the daemon's one thread).
            ended_row: format!(
                "SELECT {}, task_class_name, \
                        CASE WHEN octet_length(options) > $2 THEN NULL ELSE options END, \
                        result, result_text, {}, on_success, on_failure, {}, {bucket}, \
                        {} \
                   FROM task_runner_requests WHERE id = $1",
                d.int64("id"),
                d.int64("batch_id"),
                d.int64("coalesce(period, 0)"),
                d.int64("CASE WHEN octet_length(options) > $2 THEN 1 ELSE 0 END")
            ),
            // A counter an application wrote at its column's limit stays
            // there (the end recounts from the members): one step past it
            // failed the finalization at every retry, and every outcome of
            // the daemon waited behind it.
            count_member: {
                let limit = match d.0 {
                    super::Backend::Sqlite => i64::MAX,
                    super::Backend::Postgres | super::Backend::MySql => i64::from(i32::MAX),
                };
                let up = |column: &str, bucket: &str| {
                    format!(
                        "{column} = CASE WHEN $2 = '{bucket}' AND {column} < {limit} \
                                         THEN {column} + 1 ELSE {column} END"
                    )
                };
                format!(
                    "UPDATE task_runner_batches \
                        SET pending = CASE WHEN pending > -{limit} THEN pending - 1 ELSE pending END, \
                            {}, {}, {} \
                      WHERE id = $1",
                    up("finished", "finished"),
                    up("failed", "failed"),
                    up("cancelled", "cancelled")
                )
            },
            batch_row: format!("SELECT {batch_columns} FROM task_runner_batches WHERE id = $1"),
            recount: format!(
                "SELECT {bucket}, {} FROM task_runner_requests WHERE batch_id = $1 GROUP BY 1",
                d.int64("count(*)")
            ),
            set_counts: "UPDATE task_runner_batches \
                SET total = $2, pending = $3, finished = $4, failed = $5, cancelled = $6 WHERE id = $1"
                .to_string(),
            cancel_unstarted: cancel_unstarted(d, "batch_id"),
            lock_unstarted_nowait: lock_unstarted_nowait(d, "batch_id"),
            // Runnable again, and claimed before its batch ended (a row
            // retried by hand after the end is claimed later, and runs).
            // A claim racing the end's transaction either took its rows
            // before the end's cancel of the unstarted ones reached them, so
            // before `end_batch` ran, or found them cancelled.
            cancel_after_end: format!(
                "UPDATE task_runner_requests \
                    SET result = 'CANCELLED', result_text = $2, completed_at = {now} \
                  WHERE id = $1 AND pid IS NULL AND tries < try_limit \
                    AND result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') \
                    AND EXISTS (SELECT 1 FROM task_runner_batches b \
                                 WHERE b.id = task_runner_requests.batch_id AND b.state IS NOT NULL \
                                   AND b.finished_at >= task_runner_requests.started_at)"
            ),
            // The end's own time, not its transaction's start: a claim that
            // took a member before the end has a `started_at` before it, even
            // on PostgreSQL, where the claim may begin after that transaction
            // did (see `cancel_after_end`).
            end_batch: format!(
                "UPDATE task_runner_batches SET state = $2, finished_at = {} \
                  WHERE id = $1 AND state IS NULL",
                d.clock()
            ),
            first_failure: format!(
                "SELECT {}, task_class_name, result, result_text FROM task_runner_requests \
                  WHERE batch_id = $1 AND NOT {open} AND result <> 'FINISHED' \
                  ORDER BY CASE WHEN result = 'CANCELLED' THEN 1 ELSE 0 END, id LIMIT 1",
                d.int64("id")
            ),
            // Made before: noted (migration 0017, MariaDB's 0018), or its row is here
            // (made by a daemon older than that migration).
            follow_up_made: format!(
                "SELECT {}",
                d.int64(
                    "(SELECT count(*) FROM task_runner_follow_ups \
                       WHERE request_id = $1 AND cause = $2) \
                     + (SELECT count(*) FROM task_runner_requests \
                         WHERE callback_of = $1 AND unique_key = $3)"
                )
            ),
            callback_row: format!(
                "SELECT {} FROM task_runner_requests WHERE callback_of = $1 AND unique_key = $2",
                d.int64("count(*)")
            ),
            note_follow_up: format!(
                "{insert_or_ignore} INTO task_runner_follow_ups (request_id, cause) \
                 VALUES ($1, $2) {}",
                on_conflict_ignore.replace("id = id", "request_id = request_id")
            ),
            insert_callback: format!(
                "{insert_or_ignore} INTO task_runner_requests \
                   (task_class_name, options, callback_of, callback_of_batch, unique_key) \
                 VALUES ($1, $2, $3, $4, $5) {on_conflict_ignore} {}",
                d.returning_id("id")
            ),
            repair_candidates: format!(
                "SELECT {} FROM task_runner_batches b \
                  WHERE state IS NULL AND sealed_at IS NOT NULL \
                    AND (pending <= 0 OR (fail_fast AND (failed > 0 OR cancelled > 0)) \
                         OR NOT EXISTS (SELECT 1 FROM task_runner_requests r \
                                         WHERE r.batch_id = b.id AND {})) \
                  ORDER BY id LIMIT 100",
                d.int64("id"),
                unfinished("r.")
            ),
            create_batch: format!(
                "INSERT INTO task_runner_batches \
                   (name, options, on_complete, on_failure, fail_fast, sealed_at, parent_batch_id) \
                 VALUES ($1, $2, $3, $4, $5 = 1, CASE WHEN $6 = 1 THEN {now} ELSE NULL END, $7) {}",
                d.returning_id("id")
            ),
            seal: format!(
                "UPDATE task_runner_batches SET sealed_at = {now} WHERE id = $1 AND sealed_at IS NULL"
            ),
            list_batches: format!(
                "SELECT {batch_columns} FROM task_runner_batches ORDER BY id DESC LIMIT $1"
            ),
            callbacks_of_batch: format!(
                "SELECT {}, task_class_name, result, unique_key FROM task_runner_requests \
                  WHERE callback_of_batch = $1 ORDER BY id",
                d.int64("id")
            ),
            callbacks_of_request: format!(
                "SELECT {}, task_class_name, result, unique_key FROM task_runner_requests \
                  WHERE callback_of = $1 ORDER BY id",
                d.int64("id")
            ),
            members_by_state: format!(
                "SELECT coalesce(result, 'PENDING'), \
                        {}, {} \
                   FROM task_runner_requests WHERE batch_id = $1 GROUP BY 1, 2 ORDER BY 1, 2",
                d.int64("CASE WHEN result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries >= try_limit THEN 1 ELSE 0 END"),
                d.int64("count(*)")
            ),
        }
    }
}

// ---- one transaction, on either backend ----

/// A write transaction on either backend, so that the finalization logic
/// is written once.
pub(super) enum Tx {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    MySql(sqlx::Transaction<'static, sqlx::MySql>),
}

/// A bound parameter.
#[derive(Debug, Clone, Copy)]
pub(super) enum Param<'a> {
    Int(i64),
    OptInt(Option<i64>),
    Text(&'a str),
    OptText(Option<&'a str>),
    OptFloat(Option<f64>),
}

use Param::{Int, OptInt, OptText, Text};

/// A row from either backend.
pub(super) enum AnyRow {
    Sqlite(SqliteRow),
    Postgres(PgRow),
    MySql(MySqlRow),
}

impl RowExt for AnyRow {
    fn int(&self, index: usize) -> sqlx::Result<i64> {
        match self {
            AnyRow::Sqlite(row) => row.int(index),
            AnyRow::Postgres(row) => row.int(index),
            AnyRow::MySql(row) => row.int(index),
        }
    }
    fn opt_int(&self, index: usize) -> sqlx::Result<Option<i64>> {
        match self {
            AnyRow::Sqlite(row) => row.opt_int(index),
            AnyRow::Postgres(row) => row.opt_int(index),
            AnyRow::MySql(row) => row.opt_int(index),
        }
    }
    fn opt_float(&self, index: usize) -> sqlx::Result<Option<f64>> {
        match self {
            AnyRow::Sqlite(row) => row.opt_float(index),
            AnyRow::Postgres(row) => row.opt_float(index),
            AnyRow::MySql(row) => row.opt_float(index),
        }
    }
    fn opt_bytes(&self, index: usize) -> sqlx::Result<Option<Vec<u8>>> {
        match self {
            AnyRow::Sqlite(row) => row.opt_bytes(index),
            AnyRow::Postgres(row) => row.opt_bytes(index),
            AnyRow::MySql(row) => row.opt_bytes(index),
        }
    }
}

macro_rules! bound {
    ($query:expr, $params:expr) => {{
        let mut query = $query;
        for param in $params {
            query = match *param {
                Param::Int(v) => query.bind(v),
                Param::OptInt(v) => query.bind(v),
                Param::Text(v) => query.bind(v),
                Param::OptText(v) => query.bind(v),
                Param::OptFloat(v) => query.bind(v),
            };
        }
        query
    }};
}

impl Tx {
    pub(super) async fn begin(store: &Store) -> sqlx::Result<Tx> {
        Ok(match &store.pool {
            Pool::Sqlite(pool) => Tx::Sqlite(begin_write(pool).await?),
            Pool::Postgres(pool) => Tx::Postgres(begin_write(pool).await?),
            Pool::MySql(pool) => Tx::MySql(begin_write(pool).await?),
        })
    }

    pub(super) async fn execute(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> sqlx::Result<u64> {
        Ok(match self {
            Tx::Sqlite(tx) => bound!(query(sql), params)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            Tx::Postgres(tx) => bound!(query(sql), params)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            Tx::MySql(tx) => bound!(super::mysql::query(sql), params)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
        })
    }

    pub(super) async fn fetch(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> sqlx::Result<Vec<AnyRow>> {
        Ok(match self {
            Tx::Sqlite(tx) => bound!(query(sql), params)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(AnyRow::Sqlite)
                .collect(),
            Tx::Postgres(tx) => bound!(query(sql), params)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(AnyRow::Postgres)
                .collect(),
            Tx::MySql(tx) => bound!(super::mysql::query(sql), params)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(AnyRow::MySql)
                .collect(),
        })
    }

    /// The number the one-row, one-column `sql` answers (0 for no row).
    pub(super) async fn count(&mut self, sql: &'static str, params: &[Param<'_>]) -> Result<i64> {
        Ok(self
            .fetch(sql, params)
            .await?
            .first()
            .map(|row| row.int(0))
            .transpose()?
            .unwrap_or(0))
    }

    /// Runs `sql`, the insert of a row that an ending causes (a callback, a
    /// periodic row's next occurrence), in a savepoint. When the database
    /// refuses that row for its data (a type name longer than its rules
    /// allow, a time it cannot hold), the insert alone is undone and the
    /// refusal returned: the ending itself is still written, and so is every
    /// other try's outcome the recorder holds, which the failed transaction
    /// held back for ever before. Any other error is the caller's. Gives
    /// the number of rows made (none when the statement's own condition or
    /// an ignored conflict left it out).
    pub(super) async fn insert_follow_up(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> sqlx::Result<Result<u64, sqlx::Error>> {
        self.execute("SAVEPOINT taskrunner_follow_up", &[]).await?;
        let made = match self.execute(sql, params).await {
            Ok(made) => Ok(made),
            Err(error) if refused_for_its_data(&error) => {
                self.execute("ROLLBACK TO SAVEPOINT taskrunner_follow_up", &[])
                    .await?;
                Err(error)
            }
            Err(error) => return Err(error),
        };
        self.execute("RELEASE SAVEPOINT taskrunner_follow_up", &[])
            .await?;
        Ok(made)
    }

    pub(super) async fn commit(self) -> sqlx::Result<()> {
        match self {
            Tx::Sqlite(tx) => tx.commit().await,
            Tx::Postgres(tx) => tx.commit().await,
            Tx::MySql(tx) => tx.commit().await,
        }
    }
}

/// Whether the database refused a statement for the values it was given,
/// which running it again cannot change: a value too long, out of range or
/// of the wrong kind, a constraint, a trigger's refusal. Not a lost
/// connection, a lock, a full disk, nor a statement the server cannot read
/// (MariaDB files an ambiguous column under SQLSTATE 23000 too, so it is
/// told by its error numbers).
pub(super) fn refused_for_its_data(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(error) = error else {
        return false;
    };
    let code = error.code().unwrap_or_default();
    if error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        // Extended result codes: the primary code is the low byte.
        // SQLITE_TOOBIG, SQLITE_CONSTRAINT (a trigger's RAISE included),
        // SQLITE_MISMATCH.
        return code
            .parse::<i32>()
            .is_ok_and(|code| matches!(code & 0xff, 18..=20));
    }
    if let Some(error) = error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        // Not null, duplicate, foreign keys, out of range, wrong value,
        // too long, a trigger's SIGNAL, datetime overflow, check
        // constraints (MySQL, MariaDB).
        return matches!(
            error.number(),
            1048 | 1062
                | 1216
                | 1217
                | 1264
                | 1292
                | 1366
                | 1406
                | 1441
                | 1451
                | 1452
                | 1644
                | 1690
                | 3819
                | 4025
        );
    }
    // PostgreSQL: data exceptions, integrity constraints, a trigger's RAISE.
    code.starts_with("22") || code.starts_with("23") || code == "P0001"
}

fn batch_from_row(row: &impl RowExt) -> sqlx::Result<Batch> {
    Ok(Batch {
        id: row.int(0)?,
        created_at: row.opt_text(1)?,
        name: row.opt_text(2)?,
        options: row.opt_text(3)?,
        on_complete: row.opt_text(4)?,
        on_failure: row.opt_text(5)?,
        fail_fast: row.int(6)? != 0,
        sealed_at: row.opt_text(7)?,
        state: row.opt_text(8)?,
        finished_at: row.opt_text(9)?,
        counts: Counts {
            total: row.int(10)?,
            pending: row.int(11)?,
            finished: row.int(12)?,
            failed: row.int(13)?,
            cancelled: row.int(14)?,
        },
        parent_batch_id: row.opt_int(15)?,
    })
}

/// The most a row the daemon composes may carry in its options (a
/// callback's, a flow's store) on MariaDB and MySQL, whatever
/// `max_options`: a statement past `max_allowed_packet` (16 MiB by default)
/// is refused and its connection closed, so an outcome whose follow-up
/// could not be written would be retried for ever; half of it leaves room
/// for the rest of the statement and for text stored three bytes a byte.
const MYSQL_COMPOSED_MAX: u64 = super::mysql::MIN_PACKET as u64 / 2;

impl Store {
    /// The most a composed row's options may hold: `max_options`, so that
    /// the row can be claimed, and on MariaDB [`MYSQL_COMPOSED_MAX`].
    pub(super) fn composed_max(&self) -> usize {
        let max = self.options_cap() as u64;
        let max = match self.backend() {
            super::Backend::MySql => max.min(MYSQL_COMPOSED_MAX),
            _ => max,
        };
        max.min(usize::MAX as u64) as usize
    }
}

/// A callback's options: `base` (the parent's or the batch's options, when
/// they are a YAML mapping) with `key:` (the summary) added, in at most
/// `max` bytes. When they would be more, the summary's `options` (the
/// parent's options as text) are left out, then its `result_text` (or its
/// failure's) keeps only its end, then `base` is not merged in; the
/// summary's `cut:` names each (`options`, `result_text`, `merged`). The
/// callback then runs with what fits, and its summary's `id` names the row
/// that holds the rest.
fn callback_options(base: Option<&str>, key: &str, summary: Mapping, max: usize) -> String {
    let mut merged = base
        .and_then(|text| serde_yaml::from_str::<Value>(text).ok())
        .and_then(|value| match value {
            Value::Mapping(mapping) => Some(mapping),
            Value::Tagged(tagged) => match tagged.value {
                Value::Mapping(mapping) => Some(mapping),
                _ => None,
            },
            _ => None,
        })
        .unwrap_or_default();
    // A block mapping is its entries one after another: the merged options
    // are written once, the summary's entry after them (and as often as
    // cutting takes). Megabytes of options cost one parse and one write.
    merged.remove(key);
    let mut head = if merged.is_empty() {
        String::new()
    } else {
        serde_yaml::to_string(&Value::Mapping(merged)).unwrap_or_default()
    };
    let tail = |summary: &Mapping| {
        let mut entry = Mapping::new();
        entry.insert(key.into(), Value::Mapping(summary.clone()));
        serde_yaml::to_string(&Value::Mapping(entry)).unwrap_or_default()
    };
    let text_length = |summary: &mut Mapping, name: &str| match name {
        "options" => summary
            .get(name)
            .and_then(Value::as_str)
            .map_or(0, str::len),
        _ => result_text_of(summary)
            .and_then(|value| value.as_str())
            .map_or(0, str::len),
    };
    let mut summary = summary;
    // Each text is at least its length in YAML: skip what cannot fit.
    let mut at_least = head.len() + text_length(&mut summary, "options");
    at_least += text_length(&mut summary, "result_text");
    if at_least <= max {
        let whole = head.clone() + &tail(&summary);
        if whole.len() <= max {
            return whole;
        }
    }
    // What the caller cut already (options it did not load) stays named.
    let cut_before: Vec<String> = match summary.get("cut") {
        Some(Value::Sequence(names)) => names
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    let mut cut: Vec<&str> = cut_before.iter().map(String::as_str).collect();
    let mark = |summary: &mut Mapping, cut: &[&str]| {
        let names = cut.iter().map(|name| Value::from(*name)).collect();
        summary.insert("cut".into(), Value::Sequence(names));
    };
    if summary.get("options").is_some_and(|value| !value.is_null()) {
        summary.insert("options".into(), Value::Null);
        cut.push("options");
        mark(&mut summary, &cut);
        if head.len() + text_length(&mut summary, "result_text") <= max {
            let fits = head.clone() + &tail(&summary);
            if fits.len() <= max {
                return fits;
            }
        }
    }
    let text = match result_text_of(&mut summary) {
        Some(Value::String(text)) if !text.is_empty() => std::mem::take(text),
        _ => String::new(),
    };
    if !text.is_empty() {
        cut.push("result_text");
        mark(&mut summary, &cut);
    }
    if head.len() + tail(&summary).len() > max && !head.is_empty() {
        head.clear();
        cut.push("merged");
        mark(&mut summary, &cut);
    }
    if text.is_empty() {
        return head + &tail(&summary);
    }
    // The end of the text, as much as fits. Escapes and indentation may
    // make it longer in YAML than in bytes: then shorten it in proportion,
    // and try again.
    let rest = head.len() + tail(&summary).len();
    let target = max.saturating_sub(rest);
    let mut room = target.saturating_sub("…".len());
    loop {
        let mut start = text.len().saturating_sub(room);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        if let Some(slot) = result_text_of(&mut summary) {
            *slot = Value::String(format!("…{}", &text[start..]));
        }
        let entry = tail(&summary);
        if head.len() + entry.len() <= max || room == 0 {
            return head + &entry;
        }
        let written = (head.len() + entry.len()).saturating_sub(rest).max(1);
        let scaled = (room as u128 * target as u128 / written as u128) as usize;
        room = scaled.min(room - 1);
    }
}

/// The `result_text` of a callback's summary: the parent's, or the failing
/// member's of a batch.
fn result_text_of(summary: &mut Mapping) -> Option<&mut Value> {
    if summary.contains_key("result_text") {
        return summary.get_mut("result_text");
    }
    match summary.get_mut("failure") {
        Some(Value::Mapping(failure)) => failure.get_mut("result_text"),
        _ => None,
    }
}

/// A task type name from a row, for a log line: escaped, and shortened
/// past 64 characters.
fn type_name(task: &str) -> String {
    let shown: String = task.chars().take(64).collect();
    let more = if shown.len() < task.len() { "…" } else { "" };
    format!("`{}{more}`", crate::escape::one_line(&shown))
}

fn text_value(text: &Option<String>) -> Value {
    text.as_ref()
        .map_or(Value::Null, |text| Value::String(text.clone()))
}

impl Store {
    fn compose(&self) -> &'static ComposeSql {
        COMPOSE.of(self.backend())
    }

    /// The config's `on_exhausted:` hooks, which every finalization applies.
    pub(crate) fn set_hooks(&self, hooks: Hooks) {
        *self.hooks.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(hooks);
    }

    fn hooks(&self) -> std::sync::Arc<Hooks> {
        self.hooks.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The one finalization path: writes `ending` and, if the request is
    /// now final, everything that causes, in one transaction under the lock
    /// of its batch row. Returns whether the write applied (false: the row
    /// was no longer this try's claim, or not cancellable; nothing changed).
    pub(crate) async fn finalize(&self, ending: Ending<'_>) -> Result<bool> {
        Ok(matches!(
            self.finalize_with(ending, Locks::Wait).await?,
            Ok(true)
        ))
    }

    /// [`finalize`](Store::finalize); with [`Locks::SetAside`], `Ok(Err(…))`
    /// when another session held the batch's or flow's row: nothing was
    /// written.
    pub(crate) async fn finalize_with(
        &self,
        ending: Ending<'_>,
        locks: Locks,
    ) -> Result<Result<bool, RowLocked>> {
        let written = if let Pool::MySql(_) = &self.pool {
            // InnoDB may pick this transaction as a deadlock's victim.
            super::mysql::retry_locks(&self.lock_retries, || self.finalize_once(&ending, locks))
                .await
        } else {
            self.finalize_once(&ending, locks).await
        };
        unless_locked(written)
    }

    /// Locks batch `batch_id`'s row in `tx`, or with [`Locks::SetAside`]
    /// fails with [`RowLocked`] when another session holds it.
    async fn lock_batch(&self, tx: &mut Tx, batch_id: i64, locks: Locks) -> Result<()> {
        let c = self.compose();
        let (wait, nowait) = (&c.lock_batch, &c.lock_batch_nowait);
        lock_row(tx, HeldRow::Batch(batch_id), locks, wait, nowait).await?;
        Ok(())
    }

    /// Locks request `id`'s row in `tx` (on SQLite, whose transaction
    /// excludes every other writer, nothing), or with [`Locks::SetAside`]
    /// fails with [`RowLocked`] when another session holds it.
    pub(super) async fn lock_request(
        &self,
        tx: &mut Tx,
        id: RequestId,
        locks: Locks,
    ) -> Result<()> {
        let sql = self.sql;
        if sql.lock_request.is_empty() {
            return Ok(());
        }
        let (wait, nowait) = (&sql.lock_request, &sql.lock_request_nowait);
        lock_row(tx, HeldRow::Request(id.0), locks, wait, nowait).await?;
        Ok(())
    }

    async fn finalize_once(&self, ending: &Ending<'_>, locks: Locks) -> Result<bool> {
        let c = self.compose();
        let id = ending.id();
        // Which parents to lock first (lock order: the flow, the batch,
        // then the request).
        let (batch_id, flow_id) = on_pool!(self, pool => {
            let rows = query(c.batch_of.as_str()).bind(id.0).fetch_all(pool).await?;
            match rows.first() {
                Some(row) => (row.opt_int(0)?, row.opt_int(1)?),
                None => return Ok(false),
            }
        });
        // A test's window between the look-up and the transaction.
        crate::test_hooks::wait_for_file_when_told("TASKRUNNER_TEST_FINALIZE_AFTER_LOOKUP").await;
        let mut tx = Tx::begin(self).await?;
        // Waiting, the write itself waits for the request's row; set aside,
        // the row is locked first, NOWAIT (SQLite has no row locks).
        let lock_row_first = locks == Locks::SetAside && !self.sql.lock_request.is_empty();
        // BEGIN, the look-up, the locks, the write, the read, COMMIT.
        self.count_statements(
            5 + u64::from(batch_id.is_some())
                + u64::from(lock_row_first)
                + 4 * u64::from(flow_id.is_some()),
        );
        if let Some(flow_id) = flow_id {
            self.lock_flow_for_ending(&mut tx, flow_id, locks).await?;
        }
        if let Some(batch_id) = batch_id {
            self.lock_batch(&mut tx, batch_id, locks).await?;
        }
        if lock_row_first {
            self.lock_request(&mut tx, id, locks).await?;
        }
        let sql = self.sql;
        let applied = match ending {
            Ending::Outcome(outcome) => {
                tx.execute(
                    &sql.record_outcome,
                    &[
                        Text(outcome.state.as_str()),
                        Text(&outcome.result_text),
                        Int(i64::from(outcome.give_back_try)),
                        Param::OptFloat(outcome.retry_after),
                        Int(id.0),
                        Text(outcome.claim_token.as_str()),
                    ],
                )
                .await?
            }
            Ending::Crashed {
                claim_token,
                reason,
                give_back,
                lapsed,
                ..
            } => {
                tx.execute(
                    &sql.mark_crashed,
                    &[
                        Text(reason),
                        Int(id.0),
                        OptText(claim_token.map(ClaimToken::as_str)),
                        Int(i64::from(*give_back)),
                        Param::OptFloat(lapsed.map(|lease| lease.as_secs_f64())),
                    ],
                )
                .await?
            }
            Ending::Cancelled(_) => tx.execute(&sql.cancel_pending, &[Int(id.0)]).await?,
        } == 1;
        if let (true, Some(batch_id)) = (applied, batch_id) {
            self.no_try_after_the_batch(&mut tx, ending, batch_id)
                .await?;
        }
        if applied {
            let final_now = self.follow_up(&mut tx, ending, batch_id, locks).await?;
            if let (Some(flow_id), true) = (flow_id, final_now) {
                // The flow's next row (or its end), from its position.
                self.advance_flow(&mut tx, flow_id).await?;
            }
        }
        tx.commit().await?;
        Ok(applied)
    }

    /// A member whose batch has ended (fail-fast, or `batch cancel`) while
    /// it was claimed (running, or claimed ahead of a free slot) runs to its
    /// end, but is not tried again: an ending that would make it runnable
    /// (a failure with tries left, a crash, a timeout, a give-back before it
    /// started) makes it CANCELLED, the try's own text kept below the reason.
    async fn no_try_after_the_batch(
        &self,
        tx: &mut Tx,
        ending: &Ending<'_>,
        batch_id: i64,
    ) -> Result<bool> {
        let text = match ending {
            Ending::Outcome(outcome)
                if matches!(
                    outcome.state,
                    State::Failed | State::Crashed | State::Timeout | State::Interrupted
                ) =>
            {
                outcome.result_text.as_str()
            }
            Ending::Crashed { reason, .. } => reason,
            _ => return Ok(false),
        };
        let why = no_further_try(batch_id, text);
        self.count_statements(1);
        let cancelled = tx
            .execute(
                &self.compose().cancel_after_end,
                &[Int(ending.id().0), Text(&why)],
            )
            .await?;
        Ok(cancelled == 1)
    }

    /// Request `id` as its end left it, in `tx`.
    async fn ended_row(&self, tx: &mut Tx, id: RequestId) -> Result<Option<Ended>> {
        let cap = i64::try_from(self.composed_max()).unwrap_or(i64::MAX);
        let rows = tx
            .fetch(&self.compose().ended_row, &[Int(id.0), Int(cap)])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        Ok(Some(Ended {
            id: row.int(0)?,
            task: row.text(1)?,
            options: row.opt_text(2)?,
            result: row.opt_text(3)?,
            result_text: row.opt_text(4)?,
            batch_id: row.opt_int(5)?,
            on_success: row.opt_text(6)?,
            on_failure: row.opt_text(7)?,
            period: row.int(8)?,
            bucket: Bucket::parse(&row.text(9)?),
            options_left_out: row.int(10)? != 0,
        }))
    }

    /// Whatever the end of the `ending`'s request causes, if it is final now
    /// (then returns true; its flow is advanced by the caller).
    async fn follow_up(
        &self,
        tx: &mut Tx,
        ending: &Ending<'_>,
        locked: Option<i64>,
        locks: Locks,
    ) -> Result<bool> {
        let Some(mut ended) = self.ended_row(tx, ending.id()).await? else {
            return Ok(false);
        };
        if let Some(batch_id) = ended.batch_id.filter(|&joined| locked != Some(joined)) {
            // The row joined a batch after it was looked up (an UPDATE of its
            // `batch_id` while it ran): that batch's lock, and no further try
            // if the batch ended meanwhile, as for any member.
            self.lock_batch(tx, batch_id, locks).await?;
            if self.no_try_after_the_batch(tx, ending, batch_id).await? {
                let Some(again) = self.ended_row(tx, ending.id()).await? else {
                    return Ok(false);
                };
                ended = again;
            }
        }
        let c = self.compose();
        let Some(bucket) = ended.bucket else {
            return Ok(false);
        };
        if ended.period > 0
            && self
                .insert_follow_up(
                    tx,
                    || format!("request {}'s next occurrence", ended.id),
                    &self.sql.insert_next_occurrence,
                    &[Int(ended.id)],
                )
                .await?
        {
            self.note_follow_up(tx, ended.id, "next").await?;
        }
        match bucket {
            Bucket::Finished => {
                if let Some(task) = &ended.on_success {
                    self.request_callback(tx, &ended, task, "success").await?;
                }
            }
            Bucket::Failed => {
                if let Some(task) = &ended.on_failure {
                    self.request_callback(tx, &ended, task, "failure").await?;
                }
                let hooks = self.hooks();
                if let Some(task) = hooks.on_exhausted_for(&ended.task) {
                    self.request_callback(tx, &ended, task, "exhausted").await?;
                }
            }
            // A cancel runs no callback of the request's own.
            Bucket::Cancelled => {}
        }
        if let Some(batch_id) = ended.batch_id {
            let ended_before = self
                .batch_in(tx, batch_id)
                .await?
                .is_some_and(|batch| batch.state.is_some());
            if ended_before {
                // A member of an ended batch (it ran on, or was retried by
                // hand): recount, so that counts stay exact; no callback.
                let counts = self.recount(tx, batch_id).await?;
                self.write_counts(tx, batch_id, &counts).await?;
            } else {
                tx.execute(&c.count_member, &[Int(batch_id), Text(bucket.as_str())])
                    .await?;
                self.settle(tx, batch_id, Some(&ended), locks).await?;
            }
        }
        Ok(true)
    }

    /// Inserts callback `task` of request `parent` for `cause` (`success`,
    /// `failure`, `exhausted`) unless it was created before (the parent was
    /// retried by hand and ended again), as its note says even when the
    /// callback's row is gone; the row's `unique_key` names the cause.
    async fn request_callback(
        &self,
        tx: &mut Tx,
        parent: &Ended,
        task: &str,
        cause: &str,
    ) -> Result<()> {
        let c = self.compose();
        let key = format!("request:{}:{cause}", parent.id);
        let exists = tx
            .count(
                &c.follow_up_made,
                &[Int(parent.id), Text(cause), Text(&key)],
            )
            .await?
            > 0;
        if exists {
            return Ok(());
        }
        let mut summary = Mapping::new();
        summary.insert("id".into(), parent.id.into());
        summary.insert("task".into(), parent.task.clone().into());
        summary.insert("options".into(), text_value(&parent.options));
        summary.insert("result".into(), text_value(&parent.result));
        summary.insert("result_text".into(), text_value(&parent.result_text));
        if parent.options_left_out {
            let cut = ["options", "merged"].map(Value::from).to_vec();
            summary.insert("cut".into(), Value::Sequence(cut));
        }
        let options = callback_options(
            parent.options.as_deref(),
            "parent",
            summary,
            self.composed_max(),
        );
        let made = self
            .insert_follow_up(
                tx,
                || {
                    format!(
                        "request {}'s on_{cause} callback {}",
                        parent.id,
                        type_name(task)
                    )
                },
                &c.insert_callback,
                &[
                    Text(task),
                    Text(&options),
                    OptInt(Some(parent.id)),
                    OptInt(None),
                    Text(&key),
                ],
            )
            .await?;
        // MariaDB/MySQL count a duplicate key as a row changed (the insert
        // then leaves an application's row holding the key as it is): the
        // callback's own row is looked for there.
        let made = made
            && (self.backend() != super::Backend::MySql
                || tx
                    .count(&c.callback_row, &[Int(parent.id), Text(&key)])
                    .await?
                    > 0);
        if made {
            self.note_follow_up(tx, parent.id, cause).await?;
        }
        Ok(())
    }

    /// Inserts a row that an ending causes, in a savepoint (see
    /// [`Tx::insert_follow_up`]); true when it was made. A row the database
    /// refuses for its data is not made; that is logged, once, with the
    /// database's reason, and the rest of the ending is written.
    pub(super) async fn insert_follow_up(
        &self,
        tx: &mut Tx,
        what: impl FnOnce() -> String,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> Result<bool> {
        self.count_statements(2);
        match tx.insert_follow_up(sql, params).await? {
            Ok(made) => Ok(made > 0),
            Err(refusal) => {
                tracing::error!(
                    "{} was not created: the database refused it: {}",
                    what(),
                    crate::escape::error_line(&refusal.into())
                );
                Ok(false)
            }
        }
    }

    /// Notes, in `task_runner_follow_ups` (migration 0017, MariaDB's 0018), that request
    /// `id`'s end made its follow-up `cause` (`next`, `success`, `failure`,
    /// `exhausted`). The note outlives the row made (retention may delete
    /// a finished callback long before its cause), and holds back a second
    /// one when the request, retried by hand, ends again.
    async fn note_follow_up(&self, tx: &mut Tx, id: i64, cause: &str) -> Result<()> {
        self.count_statements(1);
        tx.execute(&self.compose().note_follow_up, &[Int(id), Text(cause)])
            .await?;
        Ok(())
    }

    /// Decides whether batch `batch_id` (locked by the caller) ends now, and
    /// if so ends it: fail-fast cancels its unstarted members; its state,
    /// end time and callback are written. `cause` is the member whose end
    /// led here, if any. With [`Locks::SetAside`], a member to cancel that
    /// another session holds locked is not waited for: [`RowLocked`] (the
    /// batch), nothing written.
    async fn settle(
        &self,
        tx: &mut Tx,
        batch_id: i64,
        cause: Option<&Ended>,
        locks: Locks,
    ) -> Result<()> {
        let c = self.compose();
        let Some(mut batch) = self.batch_in(tx, batch_id).await? else {
            return Ok(());
        };
        if batch.state.is_some() || batch.sealed_at.is_none() {
            return Ok(());
        }
        let counts = &mut batch.counts;
        if batch.fail_fast && counts.failed.saturating_add(counts.cancelled) > 0 {
            // Confirm from the members (plain SQL may have retried a failed
            // one): a batch is never failed on counts alone.
            let recounted = self.recount(tx, batch_id).await?;
            if recounted != *counts {
                self.write_counts(tx, batch_id, &recounted).await?;
                *counts = recounted;
            }
        }
        if batch.fail_fast && counts.failed.saturating_add(counts.cancelled) > 0 {
            let failing = match cause {
                Some(ended) if ended.bucket != Some(Bucket::Finished) => Some(Failing {
                    id: ended.id,
                    task: ended.task.clone(),
                    result: ended.result.clone(),
                    result_text: ended.result_text.clone(),
                }),
                _ => self.first_failure(tx, batch_id).await?,
            };
            let why = match &failing {
                Some(f) => format!(
                    "cancelled: batch {batch_id} failed (request {} {})",
                    f.id,
                    f.result.as_deref().unwrap_or("failed")
                ),
                None => format!("cancelled: batch {batch_id} failed"),
            };
            // An application holding a member locked (its own transaction
            // on the row) made the cancel wait, and with it the recorder's
            // every later write and the reaper's pass.
            if locks == Locks::SetAside && !c.lock_unstarted_nowait.is_empty() {
                match tx.fetch(&c.lock_unstarted_nowait, &[Int(batch_id)]).await {
                    Err(error) if lock_not_available(&error) => {
                        return Err(RowLocked(HeldRow::Batch(batch_id)).into())
                    }
                    other => other?,
                };
            }
            tx.execute(&c.cancel_unstarted, &[Int(batch_id), Text(&why)])
                .await?;
            // From the members: counts an application wrote at their
            // column's limit must not be stepped past it.
            *counts = self.recount(tx, batch_id).await?;
            self.write_counts(tx, batch_id, counts).await?;
            return self
                .end_batch(tx, &batch, "FAILED", failing, cause.map(|e| e.id))
                .await;
        }
        if counts.pending > 0 {
            return Ok(());
        }
        // Every member is final by the counts: recount from the members
        // themselves (under the batch's lock), which also mends counts that
        // plain SQL put out of step (a member retried or deleted by hand).
        let recounted = self.recount(tx, batch_id).await?;
        if recounted != *counts {
            self.write_counts(tx, batch_id, &recounted).await?;
            *counts = recounted;
        }
        if counts.pending > 0 {
            return Ok(());
        }
        if counts.finished == counts.total {
            self.end_batch(tx, &batch, "FINISHED", None, cause.map(|e| e.id))
                .await
        } else {
            let failing = self.first_failure(tx, batch_id).await?;
            self.end_batch(tx, &batch, "FAILED", failing, cause.map(|e| e.id))
                .await
        }
    }

    async fn batch_in(&self, tx: &mut Tx, batch_id: i64) -> Result<Option<Batch>> {
        let rows = tx
            .fetch(&self.compose().batch_row, &[Int(batch_id)])
            .await?;
        Ok(match rows.first() {
            Some(row) => Some(batch_from_row(row)?),
            None => None,
        })
    }

    async fn first_failure(&self, tx: &mut Tx, batch_id: i64) -> Result<Option<Failing>> {
        let rows = tx
            .fetch(&self.compose().first_failure, &[Int(batch_id)])
            .await?;
        Ok(match rows.first() {
            Some(row) => Some(Failing {
                id: row.int(0)?,
                task: row.text(1)?,
                result: row.opt_text(2)?,
                result_text: row.opt_text(3)?,
            }),
            None => None,
        })
    }

    async fn recount(&self, tx: &mut Tx, batch_id: i64) -> Result<Counts> {
        let mut counts = Counts::default();
        for row in tx.fetch(&self.compose().recount, &[Int(batch_id)]).await? {
            let n = row.int(1)?;
            counts.total += n;
            match row.text(0)?.as_str() {
                "pending" => counts.pending += n,
                "finished" => counts.finished += n,
                "cancelled" => counts.cancelled += n,
                _ => counts.failed += n,
            }
        }
        Ok(counts)
    }

    async fn write_counts(&self, tx: &mut Tx, batch_id: i64, counts: &Counts) -> Result<()> {
        tx.execute(
            &self.compose().set_counts,
            &[
                Int(batch_id),
                Int(counts.total),
                Int(counts.pending),
                Int(counts.finished),
                Int(counts.failed),
                Int(counts.cancelled),
            ],
        )
        .await?;
        Ok(())
    }

    /// Sets the batch's final state and creates its callback (`on_complete`
    /// after FINISHED, `on_failure` after FAILED; none after CANCELLED).
    async fn end_batch(
        &self,
        tx: &mut Tx,
        batch: &Batch,
        state: &str,
        failing: Option<Failing>,
        cause: Option<i64>,
    ) -> Result<()> {
        let c = self.compose();
        if tx
            .execute(&c.end_batch, &[Int(batch.id), Text(state)])
            .await?
            == 0
        {
            return Ok(());
        }
        let (task, why) = match state {
            "FINISHED" => (&batch.on_complete, "complete"),
            "FAILED" => (&batch.on_failure, "failure"),
            _ => return Ok(()),
        };
        let Some(task) = task else {
            return Ok(());
        };
        let counts = &batch.counts;
        let mut summary = Mapping::new();
        summary.insert("id".into(), batch.id.into());
        summary.insert("name".into(), text_value(&batch.name));
        summary.insert("state".into(), state.into());
        summary.insert("total".into(), counts.total.into());
        summary.insert("pending".into(), counts.pending.into());
        summary.insert("finished".into(), counts.finished.into());
        summary.insert("failed".into(), counts.failed.into());
        summary.insert("cancelled".into(), counts.cancelled.into());
        if let Some(parent) = batch.parent_batch_id {
            summary.insert("parent_batch_id".into(), parent.into());
        }
        if let Some(failing) = failing {
            let mut failure = Mapping::new();
            failure.insert("id".into(), failing.id.into());
            failure.insert("task".into(), failing.task.into());
            failure.insert("result".into(), text_value(&failing.result));
            failure.insert("result_text".into(), text_value(&failing.result_text));
            summary.insert("failure".into(), Value::Mapping(failure));
        }
        let options = callback_options(
            batch.options.as_deref(),
            "batch",
            summary,
            self.composed_max(),
        );
        let key = format!("batch:{}:{why}", batch.id);
        self.insert_follow_up(
            tx,
            || format!("batch {}'s on_{why} callback {}", batch.id, type_name(task)),
            &c.insert_callback,
            &[
                Text(task),
                Text(&options),
                OptInt(cause),
                OptInt(Some(batch.id)),
                Text(&key),
            ],
        )
        .await?;
        Ok(())
    }

    /// The repair pass (each poll and wake-up of the daemon): ends sealed
    /// batches that only a plain-SQL write left unended (sealed by hand
    /// after their last member ended; a fail-fast failure found at seal
    /// time), and recounts batches whose counts disagree with their
    /// members. Returns how many batches it looked at.
    pub(crate) async fn repair_batches(&self) -> Result<usize> {
        let c = self.compose();
        self.count_statements(1);
        let candidates: Vec<i64> = on_pool!(self, pool => {
            query(c.repair_candidates.as_str())
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| row.int(0))
                .collect::<sqlx::Result<_>>()?
        });
        for &batch_id in &candidates {
            let mut tx = Tx::begin(self).await?;
            self.count_statements(6);
            // A batch (or a member to cancel) another session holds locked
            // is left to a later pass: the scheduler runs this pass before
            // it claims, and waited for an application's transaction.
            let repaired = async {
                self.lock_batch(&mut tx, batch_id, Locks::SetAside).await?;
                let recounted = self.recount(&mut tx, batch_id).await?;
                if let Some(batch) = self.batch_in(&mut tx, batch_id).await? {
                    if batch.counts != recounted {
                        self.write_counts(&mut tx, batch_id, &recounted).await?;
                    }
                }
                self.settle(&mut tx, batch_id, None, Locks::SetAside).await
            };
            match unless_locked(repaired.await.map(|()| true))? {
                Ok(_) => tx.commit().await?,
                Err(locked) => {
                    tracing::debug!("batch {batch_id} not repaired in this pass: {locked}")
                }
            }
        }
        Ok(candidates.len())
    }

    /// Inserts a batch and returns its id.
    pub(crate) async fn create_batch(&self, batch: &NewBatch) -> Result<i64> {
        let c = self.compose();
        // The body once, for sqlx's queries and MySQL's alike.
        macro_rules! bind_batch {
            ($query:expr) => {
                $query
                    .bind(batch.name.as_deref())
                    .bind(batch.options.as_deref())
                    .bind(batch.on_complete.as_deref())
                    .bind(batch.on_failure.as_deref())
                    .bind(i64::from(batch.fail_fast))
                    .bind(i64::from(batch.sealed))
                    .bind(batch.parent_batch_id)
            };
        }
        Ok(on_pool!(self, pool => {
            super::rows::inserted_id(&bind_batch!(query(c.create_batch.as_str())).fetch_all(pool).await?)?
        }, mysql pool => {
            bind_batch!(super::mysql::query(c.create_batch.as_str()))
                .execute(pool)
                .await?
                .last_insert_id() as i64
        }))
    }

    /// Seals a batch (no callback before it is sealed); it ends at once if
    /// its members already have. `None`: no such batch.
    pub(crate) async fn seal_batch(&self, batch_id: i64) -> Result<Option<Batch>> {
        let c = self.compose();
        let mut tx = Tx::begin(self).await?;
        if tx.fetch(&c.lock_batch, &[Int(batch_id)]).await?.is_empty() {
            return Ok(None);
        }
        tx.execute(&c.seal, &[Int(batch_id)]).await?;
        self.settle(&mut tx, batch_id, None, Locks::Wait).await?;
        let batch = self.batch_in(&mut tx, batch_id).await?;
        tx.commit().await?;
        Ok(batch)
    }

    /// Cancels a batch: its unstarted members are CANCELLED, running ones
    /// finish, and it ends CANCELLED without a callback.
    pub(crate) async fn cancel_batch(&self, batch_id: i64) -> Result<BatchChange> {
        let c = self.compose();
        let mut tx = Tx::begin(self).await?;
        if tx.fetch(&c.lock_batch, &[Int(batch_id)]).await?.is_empty() {
            return Ok(BatchChange::NotFound);
        }
        let Some(mut batch) = self.batch_in(&mut tx, batch_id).await? else {
            return Ok(BatchChange::NotFound);
        };
        if let Some(state) = batch.state {
            return Ok(BatchChange::AlreadyFinal(state));
        }
        let why = format!("cancelled with batch {batch_id}");
        let cancelled = tx
            .execute(&c.cancel_unstarted, &[Int(batch_id), Text(&why)])
            .await?;
        // From the members: counts an application wrote at their column's
        // limit must not be stepped past it.
        batch.counts = self.recount(&mut tx, batch_id).await?;
        self.write_counts(&mut tx, batch_id, &batch.counts).await?;
        self.end_batch(&mut tx, &batch, "CANCELLED", None, None)
            .await?;
        tx.commit().await?;
        Ok(BatchChange::Done(cancelled))
    }

    /// One batch, as stored.
    pub(crate) async fn batch(&self, batch_id: i64) -> Result<Option<Batch>> {
        let c = self.compose();
        Ok(on_pool!(self, pool => {
            let rows = query(c.batch_row.as_str()).bind(batch_id).fetch_all(pool).await?;
            match rows.first() {
                Some(row) => Some(batch_from_row(row)?),
                None => None,
            }
        }))
    }

    /// The newest batches.
    pub(crate) async fn list_batches(&self, limit: i64) -> Result<Vec<Batch>> {
        let c = self.compose();
        Ok(on_pool!(self, pool => {
            query(c.list_batches.as_str())
                .bind(limit)
                .fetch_all(pool)
                .await?
                .iter()
                .map(batch_from_row)
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// A batch's members by state (`PENDING`: never run; exhausted rows
    /// apart from those still to be retried): (state, exhausted, count).
    pub(crate) async fn batch_members_by_state(
        &self,
        batch_id: i64,
    ) -> Result<Vec<(String, bool, i64)>> {
        let c = self.compose();
        Ok(on_pool!(self, pool => {
            query(c.members_by_state.as_str())
                .bind(batch_id)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| Ok((row.text(0)?, row.int(1)? != 0, row.int(2)?)))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// The callbacks a batch's end created: (id, task, result, unique_key).
    pub(crate) async fn batch_callbacks(&self, batch_id: i64) -> Result<Vec<CallbackRow>> {
        self.callbacks(&self.compose().callbacks_of_batch, batch_id)
            .await
    }

    /// The callbacks a request's final outcome created (its `on_success`
    /// or `on_failure`): (id, task, result, unique_key).
    pub(crate) async fn request_callbacks(&self, request_id: i64) -> Result<Vec<CallbackRow>> {
        self.callbacks(&self.compose().callbacks_of_request, request_id)
            .await
    }

    async fn callbacks(&self, statement: &'static str, of: i64) -> Result<Vec<CallbackRow>> {
        Ok(on_pool!(self, pool => {
            query(statement)
                .bind(of)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| Ok((row.int(0)?, row.text(1)?, row.opt_text(2)?, row.opt_text(3)?)))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// After `retry` of a member: its batch's counts, recounted under the
    /// batch's lock.
    pub(super) async fn recount_batch(&self, batch_id: i64) -> Result<()> {
        let mut tx = Tx::begin(self).await?;
        tx.execute(&self.compose().lock_batch, &[Int(batch_id)])
            .await?;
        let counts = self.recount(&mut tx, batch_id).await?;
        self.write_counts(&mut tx, batch_id, &counts).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The text of a try that its batch's end made CANCELLED (see
/// `Store::no_try_after_the_batch`): the reason, then the try's own text.
pub(super) fn no_further_try(batch_id: i64, text: &str) -> String {
    format!("cancelled: batch {batch_id} has ended, so no further try\n{text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_options_merge_the_summary_into_a_mapping() {
        let mut summary = Mapping::new();
        summary.insert("id".into(), 7.into());
        let yaml = callback_options(
            Some("film: a.mp4\nfps: 24\n"),
            "batch",
            summary.clone(),
            usize::MAX,
        );
        let value: Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(value["film"], Value::from("a.mp4"));
        assert_eq!(value["batch"]["id"], Value::from(7));
        // A key of the summary's name is replaced by the summary.
        let yaml = callback_options(Some("batch: 1\nfps: 24\n"), "batch", summary.clone(), 999);
        let value: Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(value["batch"]["id"], Value::from(7));
        assert_eq!(value["fps"], Value::from(24));
        // Options that are not a mapping (or not YAML) give the summary alone.
        for base in [None, Some("[1, 2]"), Some("key: [unclosed")] {
            let yaml = callback_options(base, "batch", summary.clone(), usize::MAX);
            let value: Value = serde_yaml::from_str(&yaml).unwrap();
            assert_eq!(value.as_mapping().unwrap().len(), 1, "{base:?}");
        }
    }

    /// A request callback's summary of a parent with `options` and an
    /// output of `output` bytes ending in `the end`.
    fn parent_summary(options: &str, output: usize, filler: char) -> Mapping {
        let mut summary = Mapping::new();
        summary.insert("id".into(), 7.into());
        summary.insert("task".into(), "Render".into());
        summary.insert("options".into(), options.into());
        summary.insert("result".into(), "FINISHED".into());
        let text: String = std::iter::repeat_n(filler, output).collect();
        summary.insert("result_text".into(), format!("{text}the end").into());
        summary
    }

    #[test]
    fn callback_options_past_their_bound_leave_out_the_parents_options_then_cut_its_text() {
        let options = format!("note: {}\n", "y".repeat(30_000));
        let summary = parent_summary(&options, 30_000, 'x');
        let whole = callback_options(Some(&options), "parent", summary.clone(), usize::MAX);
        assert!(whole.len() > 90_000, "{}", whole.len());
        // Without the parent's options as text it fits: nothing else is cut.
        let fits = callback_options(Some(&options), "parent", summary.clone(), 70_000);
        assert!(fits.len() <= 70_000, "{}", fits.len());
        let value: Value = serde_yaml::from_str(&fits).unwrap();
        assert_eq!(value["note"], Value::from("y".repeat(30_000)));
        assert_eq!(value["parent"]["options"], Value::Null);
        assert_eq!(value["parent"]["cut"], Value::from(vec!["options"]));
        assert_eq!(
            value["parent"]["result_text"].as_str().unwrap().len(),
            30_007
        );
        // Less room: the text keeps its end, as much as fits.
        let cut = callback_options(Some(&options), "parent", summary.clone(), 50_000);
        assert!(cut.len() <= 50_000 && cut.len() > 49_000, "{}", cut.len());
        let value: Value = serde_yaml::from_str(&cut).unwrap();
        assert_eq!(value["note"], Value::from("y".repeat(30_000)));
        let text = value["parent"]["result_text"].as_str().unwrap();
        assert!(
            text.starts_with("…x") && text.ends_with("xthe end"),
            "{text}"
        );
        assert_eq!(
            value["parent"]["cut"],
            Value::from(vec!["options", "result_text"])
        );
        assert_eq!(value["parent"]["id"], Value::from(7));
        // Less than the merged options alone: they are not merged in.
        let bare = callback_options(Some(&options), "parent", summary, 20_000);
        assert!(
            bare.len() <= 20_000 && bare.len() > 19_000,
            "{}",
            bare.len()
        );
        let value: Value = serde_yaml::from_str(&bare).unwrap();
        assert_eq!(value.get("note"), None);
        assert_eq!(
            value["parent"]["cut"],
            Value::from(vec!["options", "result_text", "merged"])
        );
        assert!(value["parent"]["result_text"]
            .as_str()
            .unwrap()
            .ends_with("the end"));
    }

    #[test]
    fn callback_options_cut_text_that_yaml_escapes_and_a_batch_failures_text() {
        // Each control character is four bytes in YAML (`\x01`).
        let summary = parent_summary("a: 1", 40_000, '\u{1}');
        let cut = callback_options(Some("a: 1"), "parent", summary, 30_000);
        assert!(cut.len() <= 30_000 && cut.len() > 29_000, "{}", cut.len());
        let value: Value = serde_yaml::from_str(&cut).unwrap();
        assert!(value["parent"]["result_text"]
            .as_str()
            .unwrap()
            .ends_with("\u{1}the end"));
        // A batch's summary holds the failing member's text.
        let mut failure = Mapping::new();
        failure.insert("id".into(), 9.into());
        failure.insert("result_text".into(), "é".repeat(20_000).into());
        let mut summary = Mapping::new();
        summary.insert("id".into(), 3.into());
        summary.insert("failure".into(), Value::Mapping(failure));
        let cut = callback_options(Some("film: a.mp4"), "batch", summary, 10_000);
        assert!(cut.len() <= 10_000, "{}", cut.len());
        let value: Value = serde_yaml::from_str(&cut).unwrap();
        assert_eq!(value["film"], Value::from("a.mp4"));
        assert_eq!(value["batch"]["cut"], Value::from(vec!["result_text"]));
        assert!(value["batch"]["failure"]["result_text"]
            .as_str()
            .unwrap()
            .ends_with("éé"));
    }

    #[test]
    fn on_exhausted_prefers_the_type_and_never_alerts_about_itself() {
        let hooks = Hooks {
            on_exhausted: Some("Alert".into()),
            on_exhausted_by_type: [("Render".to_string(), "Page".to_string())].into(),
        };
        assert_eq!(hooks.on_exhausted_for("Render"), Some("Page"));
        assert_eq!(hooks.on_exhausted_for("Other"), Some("Alert"));
        assert_eq!(hooks.on_exhausted_for("Alert"), None);
    }
}
