//! Every SQL statement taskrunner runs, written once with `$N` parameters and
//! rendered for each backend's dialect (SQLite binds `$N` by number too).
//!
//! The runnable rule (SPEC.md) is [`RUNNABLE`]; the claim query is
//! [`Sql::claim`], which takes a delayed row only once a daemon has
//! released it ([`RELEASED`], [`Sql::release_delays`]). Time comparisons
//! always use the database's clock.

use std::sync::OnceLock;

use super::{ApartBy, Backend, Prunable};

/// How one backend spells what the statements need: the clock, time
/// arithmetic, casts, row locks, skipped duplicates, `RETURNING`, and
/// subqueries on the table a statement changes. Every statement of the
/// store, here and in its other files, takes these spellings from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dialect(pub(crate) Backend);

impl Dialect {
    /// The current time, as stored in timestamp columns (MariaDB/MySQL:
    /// `DATETIME(6)` holding UTC, whatever the session's time zone).
    pub(crate) fn now(self) -> &'static str {
        match self.0 {
            Backend::Sqlite => "strftime('%Y-%m-%d %H:%M:%f', 'now')",
            Backend::Postgres => "now()",
            Backend::MySql => "UTC_TIMESTAMP(6)",
        }
    }

    /// The time when the statement runs: on PostgreSQL not `now()`, which is
    /// the transaction's start (the others' [`now`](Dialect::now) is the
    /// statement's already).
    pub(crate) fn clock(self) -> &'static str {
        match self.0 {
            Backend::Postgres => "clock_timestamp()",
            Backend::Sqlite | Backend::MySql => self.now(),
        }
    }

    /// The current time plus `seconds` (an expression; negative: earlier).
    pub(crate) fn now_plus(self, seconds: &str) -> String {
        match self.0 {
            Backend::Sqlite => {
                format!("strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.3f seconds', {seconds}))")
            }
            Backend::Postgres | Backend::MySql => self.plus_seconds(self.now(), seconds),
        }
    }

    /// Timestamp `time` plus `seconds`, exact to the millisecond.
    pub(crate) fn plus_seconds(self, time: &str, seconds: &str) -> String {
        match self.0 {
            Backend::Sqlite => {
                format!("strftime('%Y-%m-%d %H:%M:%f', {time}, printf('%+.3f seconds', {seconds}))")
            }
            Backend::Postgres => format!("({time} + make_interval(secs => {seconds}))"),
            Backend::MySql => {
                format!("TIMESTAMPADD(MICROSECOND, ROUND(({seconds}) * 1000000), {time})")
            }
        }
    }

    /// Seconds from timestamp `from` to timestamp `to` (a float). On
    /// PostgreSQL the difference of the two as seconds, not of the two
    /// times: an application may write `'-infinity'`, and PostgreSQL
    /// refuses to subtract an infinite timestamp (the claim that measured
    /// such a row's wait failed, and so did every claim after it); its
    /// seconds are infinite, their difference too (or NaN).
    pub(crate) fn seconds_between(self, from: &str, to: &str) -> String {
        match self.0 {
            Backend::Sqlite => format!("((julianday({to}) - julianday({from})) * 86400.0)"),
            Backend::Postgres => {
                format!("(extract(epoch from {to})::float8 - extract(epoch from {from})::float8)")
            }
            Backend::MySql => format!("(TIMESTAMPDIFF(MICROSECOND, {from}, {to}) / 1e6)"),
        }
    }

    /// A timestamp as seconds since the epoch (a float).
    pub(crate) fn epoch_seconds(self, time: &str) -> String {
        match self.0 {
            Backend::Sqlite => format!("((julianday({time}) - 2440587.5) * 86400.0)"),
            Backend::Postgres => format!("extract(epoch from {time})::float8"),
            Backend::MySql => {
                format!("(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {time}) / 1e6)")
            }
        }
    }

    /// A timestamp as `YYYY-MM-DD HH:MM:SS.SSS` text (UTC).
    pub(crate) fn show_time(self, time: &str) -> String {
        match self.0 {
            Backend::Sqlite => format!("CAST({time} AS TEXT)"),
            Backend::Postgres => {
                format!("to_char({time} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS')")
            }
            Backend::MySql => format!("LEFT(DATE_FORMAT({time}, '%Y-%m-%d %H:%i:%s.%f'), 23)"),
        }
    }

    /// A text parameter (RFC 3339 or `YYYY-MM-DD HH:MM:SS`) read as a timestamp.
    pub(crate) fn parse_time(self, text: &str) -> String {
        match self.0 {
            Backend::Sqlite => format!("strftime('%Y-%m-%d %H:%M:%f', {text})"),
            Backend::Postgres => format!("CAST({text} AS timestamptz)"),
            Backend::MySql => {
                format!("CAST(REPLACE(REPLACE({text}, 'T', ' '), 'Z', '') AS DATETIME(6))")
            }
        }
    }

    /// An integer expression as a 64-bit integer (PostgreSQL: in parentheses,
    /// so that the cast applies to the whole expression).
    pub(crate) fn int64(self, expression: &str) -> String {
        match self.0 {
            Backend::Sqlite => expression.to_string(),
            Backend::Postgres => format!("({expression})::bigint"),
            Backend::MySql => format!("CAST({expression} AS SIGNED)"),
        }
    }

    /// The largest integer not above a positive number.
    pub(crate) fn floor(self, number: &str) -> String {
        match self.0 {
            Backend::Sqlite => format!("CAST({number} AS INTEGER)"),
            Backend::Postgres => format!("floor({number})"),
            Backend::MySql => format!("FLOOR({number})"),
        }
    }

    /// Whether text `needle` occurs in text `haystack`.
    pub(crate) fn contains(self, haystack: &str, needle: &str) -> String {
        match self.0 {
            Backend::Sqlite => format!("instr({haystack}, {needle}) > 0"),
            Backend::Postgres => format!("strpos({haystack}, {needle}) > 0"),
            Backend::MySql => format!("LOCATE({needle}, {haystack}) > 0"),
        }
    }

    /// The elements of a parameter holding a JSON array of strings, as a subquery.
    pub(crate) fn json_strings(self, parameter: &str) -> String {
        match self.0 {
            Backend::Sqlite => format!("SELECT value FROM json_each({parameter})"),
            Backend::Postgres => {
                format!("SELECT jsonb_array_elements_text(CAST({parameter} AS jsonb))")
            }
            Backend::MySql => format!(
                "SELECT j.v FROM JSON_TABLE({parameter}, '$[*]' COLUMNS (v {JSON_TEXT_255} PATH '$')) AS j"
            ),
        }
    }

    /// An integer parameter that may be NULL, typed where the server cannot
    /// tell its type from `$N IS NULL` alone (PostgreSQL).
    pub(crate) fn nullable_int(self, parameter: &str) -> String {
        match self.0 {
            Backend::Postgres => format!("{parameter}::bigint"),
            Backend::Sqlite | Backend::MySql => parameter.to_string(),
        }
    }

    /// `INSERT` that skips a row whose unique key is taken, with
    /// [`on_conflict_ignore`](Dialect::on_conflict_ignore) after its values.
    pub(crate) fn insert_or_ignore(self) -> &'static str {
        match self.0 {
            Backend::Sqlite => "INSERT OR IGNORE",
            Backend::Postgres | Backend::MySql => "INSERT",
        }
    }

    /// What follows the values of [`insert_or_ignore`](Dialect::insert_or_ignore).
    /// MariaDB/MySQL: a duplicate leaves the holder as it is (`INSERT
    /// IGNORE` would turn every error into a warning, and strict mode is
    /// what keeps a value that does not fit from being truncated); the
    /// affected row count is then 1, not 0, so the cron slot's insert, which
    /// counts on 0, is `INSERT IGNORE` there (see `Sql::for_mysql`).
    pub(crate) fn on_conflict_ignore(self) -> &'static str {
        match self.0 {
            Backend::Sqlite => "",
            Backend::Postgres => "ON CONFLICT DO NOTHING",
            Backend::MySql => "ON DUPLICATE KEY UPDATE id = id",
        }
    }

    /// `RETURNING` the id column of an insert; nothing on MariaDB/MySQL,
    /// where the id is read from `LAST_INSERT_ID()`.
    pub(crate) fn returning_id(self, column: &str) -> String {
        match self.0 {
            Backend::MySql => String::new(),
            Backend::Sqlite | Backend::Postgres => format!("RETURNING {}", self.int64(column)),
        }
    }

    /// Locks the rows a select reads until the transaction ends (SQLite's
    /// `BEGIN IMMEDIATE` already excludes every other writer).
    pub(crate) fn for_update(self) -> &'static str {
        match self.0 {
            Backend::Sqlite => "",
            Backend::Postgres | Backend::MySql => "FOR UPDATE",
        }
    }

    /// [`for_update`](Dialect::for_update), failing at once where another
    /// session holds a row.
    pub(crate) fn for_update_nowait(self) -> &'static str {
        match self.0 {
            Backend::Sqlite => "",
            Backend::Postgres | Backend::MySql => "FOR UPDATE NOWAIT",
        }
    }

    /// Locks the rows a select reads, passing over rows others hold locked.
    /// Every such select is of rows the statement then updates, never their
    /// key: on PostgreSQL `FOR NO KEY UPDATE`, the lock such an update takes,
    /// which an application's INSERT into a table with a foreign key to the
    /// row (`FOR KEY SHARE`, held until its commit) does not hold up (with
    /// `FOR UPDATE`, the renewal passed over the row, and its try was killed
    /// at the fencing deadline).
    pub(crate) fn skip_locked(self) -> &'static str {
        match self.0 {
            Backend::Sqlite => "",
            Backend::Postgres => "FOR NO KEY UPDATE SKIP LOCKED",
            Backend::MySql => "FOR UPDATE SKIP LOCKED",
        }
    }

    /// Locks one request row (`$1`) for the write that follows in the same
    /// transaction, waiting for another session's lock or, with `nowait`,
    /// failing at once (PostgreSQL's `lock_not_available`, MariaDB/MySQL's
    /// lock wait timeout). On PostgreSQL `FOR NO KEY UPDATE`, the lock the
    /// write itself takes (see [`skip_locked`](Dialect::skip_locked)).
    /// SQLite has no row locks: nothing.
    fn lock_request(self, nowait: bool) -> String {
        let mode = match (self.0, nowait) {
            (Backend::Sqlite, _) => return String::new(),
            (Backend::Postgres, false) => "FOR NO KEY UPDATE",
            (Backend::Postgres, true) => "FOR NO KEY UPDATE NOWAIT",
            (Backend::MySql, false) => "FOR UPDATE",
            (Backend::MySql, true) => "FOR UPDATE NOWAIT",
        };
        format!("SELECT id FROM task_runner_requests WHERE id = $1 {mode}")
    }

    /// PostgreSQL: a condition on `column` that passes over the rows `ids`
    /// names (a condition on `id`) that another session holds locked, so that the
    /// recorder's write does not wait for them: an application's
    /// transaction that holds one running row (`SELECT … FOR UPDATE`,
    /// Rails' `with_lock`) held up every outcome of the daemon behind it.
    /// The rows passed over are looked up and set aside (see
    /// `Store::record_or_set_aside`). MariaDB/MySQL cannot read the table a
    /// statement changes (error 1093): its writes lock their rows first
    /// (`Sql::lock_requests_skipping`); SQLite has no row locks: nothing.
    fn unlocked(self, column: &str, ids: &str) -> String {
        match self.0 {
            // `= ANY(ARRAY(…))`: the locking select runs once, as an
            // InitPlan. `IN (…)` made it the inner side of a nested loop,
            // run again (and its rows locked again) for each row of a batch:
            // a batch of 459 outcomes took 1.5 s, and the drain at
            // `max_concurrent` 8 fell to 30% of the spawn ceiling.
            Backend::Postgres => format!(
                " AND {column} = ANY(ARRAY(SELECT id FROM task_runner_requests WHERE {ids} {}))",
                self.skip_locked()
            ),
            Backend::Sqlite | Backend::MySql => String::new(),
        }
    }

    /// A select that a statement may read while it changes the table it
    /// reads: MariaDB/MySQL neither read, in a subquery, the table being
    /// changed (error 1093) nor take `LIMIT` in `IN (…)`, so the select
    /// goes through a derived table there.
    pub(crate) fn while_changing(self, select: &str) -> String {
        match self.0 {
            Backend::MySql => format!("SELECT * FROM ({select}) AS chosen"),
            Backend::Sqlite | Backend::Postgres => select.to_string(),
        }
    }

    /// The statement that deletes up to `$2` rows of `kind` that ended more
    /// than `$1` seconds ago (requests of the state `$3` for FINISHED,
    /// CANCELLED and REJECTED), leaving out what `kept` (a condition on the
    /// kind's table, see `Store::kept_by_foreign_keys`) holds. Requests:
    /// never a member of an open batch or flow. Batches and flows: once no
    /// request refers to them.
    pub(crate) fn prune_statement(self, kind: Prunable, kept: Option<&str>) -> String {
        let ended_before = self.now_plus("-$1");
        let condition = match kind {
            Prunable::Finished | Prunable::Cancelled | Prunable::Rejected => format!(
                "result = $3 AND result IN ('FINISHED', 'CANCELLED', 'REJECTED') \
                 AND completed_at < {ended_before} AND {OUTSIDE_OPEN_PARENTS}"
            ),
            Prunable::Exhausted => format!(
                "result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries >= try_limit \
                 AND completed_at < {ended_before} AND {OUTSIDE_OPEN_PARENTS}"
            ),
            // Not a batch's children (`parent_batch_id`): MySQL cannot read
            // the table it deletes from; a child keeps the id of a parent gone.
            Prunable::EndedBatches => format!(
                "state IS NOT NULL AND finished_at < {ended_before} \
                 AND NOT EXISTS (SELECT 1 FROM task_runner_requests r \
                                  WHERE r.batch_id = task_runner_batches.id) \
                 AND NOT EXISTS (SELECT 1 FROM task_runner_requests r \
                                  WHERE r.callback_of_batch = task_runner_batches.id)"
            ),
            Prunable::EndedFlows => format!(
                "state IS NOT NULL AND state NOT IN ('RUNNING', 'REVERTING') \
                 AND finished_at < {ended_before} \
                 AND NOT EXISTS (SELECT 1 FROM task_runner_requests r \
                                  WHERE r.flow_id = task_runner_flows.id)"
            ),
        };
        let kept = kept
            .map(|kept| format!(" AND NOT ({kept})"))
            .unwrap_or_default();
        self.delete_some(kind.table(), &format!("{condition}{kept}"), "$2")
    }

    /// Deletes at most `limit` rows of `table` that match `condition`, so
    /// that a large deletion goes in small transactions (MariaDB/MySQL take
    /// `LIMIT` on `DELETE` itself, and no `LIMIT` in `IN (…)`).
    ///
    /// The outer `WHERE` repeats `condition`: on PostgreSQL a row that
    /// another transaction changed while the delete waited for its lock is
    /// checked again against the outer `WHERE` alone, and with the id only
    /// there a row retried meanwhile (runnable again) was deleted.
    pub(crate) fn delete_some(self, table: &str, condition: &str, limit: &str) -> String {
        match self.0 {
            Backend::MySql => format!("DELETE FROM {table} WHERE {condition} LIMIT {limit}"),
            Backend::Sqlite | Backend::Postgres => format!(
                "DELETE FROM {table} \
                  WHERE id IN (SELECT id FROM {table} WHERE {condition} LIMIT {limit}) \
                    AND {condition}"
            ),
        }
    }

    /// SQLite: `INDEXED BY index` after a table name, the query plan pinned.
    /// SQLite plans without statistics (no ANALYZE runs): it took the
    /// claim's `result IS NULL OR result IN (…)` to the `(result, id)` index
    /// of the web page (migration 0006), read every runnable row and sorted
    /// them all for a `LIMIT` of a few (2 ms a claim with 5,000 rows
    /// waiting), where the runnable index (migration 0003) is in claim order
    /// and stops at the limit (0.05 ms). Each claim is pinned to the index
    /// that holds exactly the rows it may take in claim order: the runnable
    /// index, or for a claim of one queue or type that of migration 0010.
    /// PostgreSQL and MariaDB plan from statistics: nothing.
    fn indexed_by(self, index: &str) -> String {
        match self.0 {
            Backend::Sqlite => format!("INDEXED BY {index}"),
            Backend::Postgres | Backend::MySql => String::new(),
        }
    }

    /// SQLite: `NOT INDEXED` after the table a batch of writes updates, so
    /// that each row of the batch finds its row by id (the rowid): SQLite,
    /// planning without statistics, otherwise read every RUNNING row through
    /// the `(result, id)` index and, for each, the whole batch. Nothing
    /// elsewhere.
    fn by_id_only(self) -> &'static str {
        match self.0 {
            Backend::Sqlite => "NOT INDEXED",
            Backend::Postgres | Backend::MySql => "",
        }
    }

    /// Picks the ids to claim: `select` is the ordered, limited runnable select.
    fn claim_ids(self, select: &str) -> String {
        match self.0 {
            Backend::Postgres => format!("id = ANY(ARRAY({select}))"),
            Backend::Sqlite | Backend::MySql => format!("id IN ({select})"),
        }
    }

    /// Whether many rows can be updated from bound arrays (`unnest`).
    fn array_batches(self) -> bool {
        self.0 == Backend::Postgres
    }
}

/// A set of statements in each backend's dialect, each rendered on its
/// first use: how every file of the store keeps its statements ([`SQL`]
/// here, the batches' in compose.rs, the flows' in flow.rs).
pub struct Statements<T: 'static> {
    render: fn(Dialect) -> T,
    sqlite: OnceLock<T>,
    postgres: OnceLock<T>,
    mysql: OnceLock<T>,
}

impl<T> Statements<T> {
    /// The statements that `render` writes for a dialect.
    pub(crate) const fn new(render: fn(Dialect) -> T) -> Statements<T> {
        Statements {
            render,
            sqlite: OnceLock::new(),
            postgres: OnceLock::new(),
            mysql: OnceLock::new(),
        }
    }

    /// The statements in `backend`'s dialect.
    pub fn of(&self, backend: Backend) -> &T {
        let rendered = match backend {
            Backend::Sqlite => &self.sqlite,
            Backend::Postgres => &self.postgres,
            Backend::MySql => &self.mysql,
        };
        rendered.get_or_init(|| (self.render)(Dialect(backend)))
    }
}

/// The store's statements (MariaDB and MySQL: those that need another
/// shape there, with no `RETURNING` and no `UPDATE … FROM`, replaced by
/// `Sql::for_mysql`).
pub static SQL: Statements<Sql> = Statements::new(|d| match d.0 {
    Backend::MySql => Sql::render(d).for_mysql(),
    Backend::Sqlite | Backend::Postgres => Sql::render(d),
});

/// `retry`'s statement ($1: the id). Not a flow's step or revert: they
/// run only as the flow moves, and a FINISHED step never runs again (see
/// `Change::InFlow`). A flow's `on_exhausted` alert (`flow_step` NULL) is a
/// callback like any other.
const RETRY: &str = "UPDATE task_runner_requests \
       SET pid = NULL, result = NULL, tries = 0, delay_until = NULL, cancel_requested_at = NULL \
     WHERE id = $1 AND result IS DISTINCT FROM 'RUNNING' \
       AND (flow_id IS NULL OR flow_step IS NULL)";

/// A text column of a MariaDB/MySQL `JSON_TABLE`, of the tables' own
/// character set and collation: without, it takes the database's default
/// (`latin1` on a server left at its defaults), and every character that
/// does not fit became `?` (an outcome's text written in a batch; a paused
/// type or queue named in Japanese matched no row, and ran).
const JSON_TEXT_255: &str = "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin";

/// The filter of `list`, `retry` and `cancel` (`$2` type, `$3` queue, `$4`
/// host, `$5` state or a word for several, `$6` batch, `$7` flow: each ''
/// or 0 for any), newest first, at most `$1` rows.
fn list_filter() -> String {
    format!(
        "WHERE ($2 = '' OR task_class_name = $2) AND ($3 = '' OR queue = $3) \
           AND ($4 = '' OR host = $4) \
           AND ($6 = 0 OR batch_id = $6 OR callback_of_batch = $6) \
           AND ($7 = 0 OR flow_id = $7) \
           AND ($5 = '' \
                OR ($5 = 'pending' AND result IS NULL) \
                OR ($5 = 'retrying' AND {RUNNABLE} AND result IS NOT NULL) \
                OR ($5 = 'exhausted' AND result IN ('FAILED', 'CRASHED', 'TIMEOUT') \
                    AND tries >= try_limit) \
                OR result = $5) \
         ORDER BY id DESC LIMIT $1"
    )
}

/// The runnable rule of SPEC.md, minus the delay (added where it applies).
/// It is the predicate of the partial index `task_runner_requests_runnable`
/// (migration 0003), written identically so that planners use the index.
pub(crate) const RUNNABLE: &str = "pid IS NULL \
     AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED')) \
     AND tries < try_limit";

/// A runnable row whose delay is not ahead: it has none, or a daemon has
/// seen it pass and released the row (`delay_passed_at`, migration 0011,
/// [`Sql::release_delays`]). With [`RUNNABLE`], the predicate of the claim's
/// partial indexes: rows delayed into the future are not in them, so a
/// claim never walks past them.
pub(crate) const RELEASED: &str = "(delay_until IS NULL OR delay_until <= delay_passed_at)";

/// A runnable row still waiting for its delay (or due, and not released
/// yet). With [`RUNNABLE`], the predicate of `task_runner_requests_waiting`
/// (migration 0011), by `delay_until`.
pub(crate) const WAITING: &str =
    "delay_until IS NOT NULL AND (delay_passed_at IS NULL OR delay_until > delay_passed_at)";

/// How many due rows one release makes claimable.
pub(crate) const RELEASE_AT_ONCE: i64 = 1000;

/// Not final yet: never run, running, or to be run again (`row` qualifies
/// the columns: `r.`). The predicate of the partial indexes
/// `task_runner_requests_unique_key` (migration 0002) and
/// `task_runner_requests_batch_open` (0005), written identically so that
/// planners use them.
pub(super) fn unfinished(row: &str) -> String {
    format!(
        "({row}result IS NULL OR {row}result = 'RUNNING' \
          OR ({row}result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND {row}tries < {row}try_limit))"
    )
}

/// Cancels the rows of a batch or a flow (`owner`: the column naming it,
/// `$1`) that have not started: never run, or waiting for their next try;
/// `$2` is their result_text. A claimed row (RUNNING, with or without a
/// pid yet) finishes.
pub(super) fn cancel_unstarted(d: Dialect, owner: &str) -> String {
    format!(
        "UPDATE task_runner_requests \
            SET result = 'CANCELLED', result_text = $2, completed_at = {} \
          WHERE {}",
        d.now(),
        unstarted_of(owner)
    )
}

/// Locks the rows [`cancel_unstarted`] cancels, failing at once where
/// another session holds one (empty on SQLite, whose transaction excludes
/// every other writer): for a finalization that must not wait for an
/// application's lock on a member it would cancel.
pub(super) fn lock_unstarted_nowait(d: Dialect, owner: &str) -> String {
    match d.for_update_nowait() {
        "" => String::new(),
        nowait => format!(
            "SELECT id FROM task_runner_requests WHERE {} {nowait}",
            unstarted_of(owner)
        ),
    }
}

/// The rows of the batch or flow `$1` (`owner`: the column naming it) that
/// have not started: never run, or waiting for their next try.
fn unstarted_of(owner: &str) -> String {
    format!(
        "{owner} = $1 AND pid IS NULL \
            AND (result IS NULL \
                 OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND tries < try_limit))"
    )
}

/// The condition on a final row that `purge` and the retention pruner may
/// delete: not a member of a batch, nor a step row of a flow, that is still
/// open. A batch's end is judged from its members under its lock (a failed
/// member deleted first let it end FINISHED, with `on_complete`), and a
/// flow's board is read from its step rows. They go once their batch or
/// flow has ended.
const OUTSIDE_OPEN_PARENTS: &str = "(batch_id IS NULL OR NOT EXISTS \
        (SELECT 1 FROM task_runner_batches b \
          WHERE b.id = task_runner_requests.batch_id AND b.state IS NULL)) \
    AND (flow_id IS NULL OR NOT EXISTS \
        (SELECT 1 FROM task_runner_flows f \
          WHERE f.id = task_runner_requests.flow_id \
            AND (f.state IS NULL OR f.state IN ('RUNNING', 'REVERTING'))))";

/// Whether a cancel overrides the outcome `result` of a try: a cancel, once
/// accepted (`cancel_requested_at` set while the row ran), means no further
/// try. Only FINISHED stands (the work is done); any other outcome, however
/// the try ended before its daemon could stop it, makes the row CANCELLED.
/// `tries` after a try is given back (`give_back`: 1, or 0 for a try that
/// counts). Never below 0: a row an application wrote as RUNNING, or whose
/// `tries` it set to 0 while it ran, has no try of its own to give back,
/// and the tables refuse a negative count (migration 0013), which failed the
/// write of every outcome and reap beside it.
fn tries_given_back(tries: &str, give_back: &str) -> String {
    format!("(CASE WHEN {tries} >= {give_back} THEN {tries} - {give_back} ELSE 0 END)")
}

/// `row` qualifies the table's columns (`t.` in the batch statements).
fn cancel_overrides(row: &str, result: &str) -> String {
    format!("({row}cancel_requested_at IS NOT NULL AND {result} <> 'FINISHED')")
}

/// The `result` an outcome write stores: see [`cancel_overrides`].
fn cancel_result(row: &str, result: &str) -> String {
    format!(
        "CASE WHEN {} THEN 'CANCELLED' ELSE {result} END",
        cancel_overrides(row, result)
    )
}

/// What a cancel makes of the text of a try that ended on its own after it:
/// this, the try's state, `: `, its text (see [`cancel_text`]).
pub(crate) const CANCELLED_WHILE_RUNNING: &str = "cancelled by a user; the running try ended ";

/// The `result_text` an outcome write stores: a try that ended on its own
/// after a cancel keeps its outcome after the word "cancelled".
fn cancel_text(row: &str, result: &str, result_text: &str) -> String {
    format!(
        "CASE WHEN {} AND {result} <> 'CANCELLED' \
              THEN '{CANCELLED_WHILE_RUNNING}' || {result} || ': ' || coalesce({result_text}, '') \
              ELSE {result_text} END",
        cancel_overrides(row, result)
    )
}

/// A row still without anything its end causes (`row` a table prefix):
/// no callback, no period, no batch, no flow. The plain outcome writes
/// apply only to such a row: one claimed so whose application gave it a
/// callback, a period or a batch after the claim (`create!` then
/// `update!`) is not written there, and the recorder writes it on the
/// finalization path instead, with what its end causes (before, the
/// outcome was written plainly and the callback was never made).
fn causes_nothing(row: &str) -> String {
    format!(
        "{row}on_success IS NULL AND {row}on_failure IS NULL AND coalesce({row}period, 0) <= 0 \
         AND {row}batch_id IS NULL AND {row}flow_id IS NULL"
    )
}

/// How the result text of a try the reaper gave back starts.
pub(crate) const NOT_COUNTED: &str = "not counted: ";

/// The state the reaper writes: CRASHED, or INTERRUPTED when it gives the
/// try back (`$4` = 1).
/// The lease (milliseconds) a request row's holder wrote into its daemon's
/// row (NULL for none), in a statement on `task_runner_requests`.
const HOLDERS_LEASE_MS: &str = "(SELECT holder.lease_ms FROM task_runner_daemons AS holder \
                                 WHERE holder.instance = task_runner_requests.claimed_by)";

const REAPED_RESULT: &str = "(CASE WHEN $4 = 1 THEN 'INTERRUPTED' ELSE 'CRASHED' END)";

/// At most this many queues (or task types) are claimed apart, each
/// through its own index, by a daemon serving every queue while some are
/// paused (or while some types are left out of its claim)
/// ([`Sql::claim_apart`]); with more, its claim walks the runnable index
/// past the rows it leaves out.
pub(crate) const APART_AT_MOST: usize = 32;

/// Task types left out of a claim (paused, or claimed apart for their
/// concurrency limit) make it claim the others apart only while they hold
/// at least this many runnable rows: fewer cost a walk nothing worth a
/// statement more per claim ([`Sql::left_out_backlog`]).
pub(crate) const BACKLOG_WORTH_APART: usize = 100;

/// Runnable rows come first by priority, then first-come first-served.
const CLAIM_ORDER: &str = "ORDER BY priority DESC, id";

/// Every statement, rendered for one dialect.
pub struct Sql {
    /// Claims up to `$4` runnable rows for daemon instance `$2` on host `$3`
    /// with claim token `$1`, in one atomic statement. Filters: node name
    /// `$5` (rows pinned elsewhere, or barred from here, are skipped), queue
    /// `$6` and task type `$7` ('' for any), task types `$8` (a JSON
    /// array) left to `claim_limited` or paused, and queues `$10` (a JSON
    /// array) paused; options longer than `$9` bytes are left out (their
    /// length only comes back) (SQLite: one
    /// `UPDATE … RETURNING` on the writer connection; PostgreSQL: `FOR UPDATE
    /// SKIP LOCKED`, so concurrent daemons never wait on or take the same row).
    /// Writes RUNNING, tries + 1, started_at, host, heartbeat_at before any
    /// process starts. This one is for claims of any queue and type (SQLite:
    /// pinned to the runnable index, in claim order, see `indexed_by`);
    /// claims of one queue or one type run [`claim_of_queue`](Sql::claim_of_queue)
    /// and [`claim_of_type`](Sql::claim_of_type) (see [`Sql::claim_for`]).
    pub claim: String,
    /// The claim of one queue (`$6` not ''): the same, through the runnable
    /// rows of that queue in claim order (SQLite: pinned to the index
    /// `runnable_of_queue`, migration 0010). Through the runnable index, a
    /// claim of a queue of 100 rows behind 200,000 of another read all
    /// 200,000 (37 ms); through the web page's `runnable_by_queue` (in id
    /// order), a claim of the queue of 200,000 sorted them all (60 ms).
    pub(crate) claim_of_queue: String,
    /// The claim of one task type (`$7` not ''; a type with a concurrency
    /// limit), of any queue or of `$6`: through the runnable rows of that
    /// type in claim order (SQLite: pinned to `runnable_of_type`, migration
    /// 0010), for the same reasons.
    pub(crate) claim_of_type: String,
    /// The claim of several given queues (or task types) at once, in
    /// claim order across them (a daemon serving every queue while some
    /// are paused, or while types are left out of its claim, see
    /// `Store::claim_filtered`): the first `$4` rows of each through its
    /// own index, the best `$4` of those claimed. Parameters as in
    /// [`claim`](Sql::claim), the names from `$11`; `{branches}` stands for
    /// one [`claim_of_queues_branch`](Sql::claim_of_queues_branch) (or
    /// [`claim_of_types_branch`](Sql::claim_of_types_branch)) per name,
    /// joined by `UNION ALL`. (MySQL: the first statement of its claim,
    /// the ids, as `claim_select`; `{excluded}` as there.)
    pub claim_apart: String,
    /// One queue's branch of [`claim_apart`](Sql::claim_apart); `{name}`
    /// stands for its parameter.
    pub(crate) claim_of_queues_branch: String,
    /// One task type's branch of [`claim_apart`](Sql::claim_apart), through
    /// `runnable_of_type`; `{name}` stands for its parameter. (MySQL: not
    /// used, its claims walk past the types they leave out.)
    pub(crate) claim_of_types_branch: String,
    /// The queues that have runnable rows (released, whatever their node
    /// or type), by name, at most [`APART_AT_MOST`] + 1: one index probe
    /// per queue (a skip scan of `runnable_of_queue`). MySQL: the first
    /// queue after `$1` that has any row (see `Store::queues_with_rows_mysql`).
    pub runnable_queues: String,
    /// The same for task types (a skip scan of `runnable_of_type`). MySQL:
    /// not used.
    pub runnable_types: String,
    /// How many runnable rows the task types `$1` (a JSON array) hold, up
    /// to [`BACKLOG_WORTH_APART`]: at most that many entries of
    /// `runnable_of_type` read. MySQL: not used.
    pub(crate) left_out_backlog: String,
    /// MariaDB/MySQL's claim, in three statements of one transaction (see
    /// `store::mysql`): the ids, locked and skipping rows locked by others
    /// (parameters as in [`claim`](Sql::claim), `$8` onwards: the excluded
    /// types, then the excluded queues; `{excluded}` and `{excluded_queues}`
    /// stand for their lists).
    pub claim_select: String,
    /// Then the claim's `SET` on those ids (`$1..$3` as in the claim, the
    /// ids from `$4`; `{ids}` stands for their list)…
    pub(crate) claim_update: String,
    /// …and the claimed rows, as the claim returns them (ids from `$1`;
    /// `{cap}` stands for the options cap, a number).
    pub(crate) claimed_rows: String,
    /// The same claim for one given row (`$4` is its id, `$5` the options
    /// cap), ignoring its delay:
    /// `taskrunner-cli run --id --record`.
    pub(crate) claim_one: String,
    /// How many rows of task type `$1` run now, on any daemon.
    pub(crate) running_of_type: String,
    /// PostgreSQL only: serialises claims of task type `$1` across daemons
    /// until the transaction ends (SQLite serialises every writer anyway).
    pub(crate) lock_type: Option<String>,
    /// Inserts the next occurrence of periodic row `$1` if its try ended
    /// (finished or exhausted): planned one period after its planned start,
    /// or, after downtime, at the latest slot already due (one catch-up run).
    pub(crate) insert_next_occurrence: String,
    /// Fenced: records the spawned process of claim `$5` on row `$4`.
    pub(crate) record_pid: String,
    /// Fenced: records the outcome of claim `$6` on row `$5`.
    pub(crate) record_outcome: String,
    /// [`record_outcome`](Sql::record_outcome) of a row whose end causes
    /// nothing (see [`causes_nothing`]): the recorder's plain writes.
    pub(crate) record_plain_outcome: String,
    /// Locks request row `$1`, waiting for another session's lock (empty
    /// on SQLite).
    pub(crate) lock_request: String,
    /// [`lock_request`](Sql::lock_request), failing at once where another
    /// session holds the row.
    pub(crate) lock_request_nowait: String,
    /// MariaDB/MySQL only (elsewhere empty): locks the rows of the ids
    /// `{ids}` (an `IN` list) that no other session holds, returning their
    /// ids; the recorder's writes then write those alone.
    pub(crate) lock_requests_skipping: String,
    /// 1 if row `$1` is RUNNING under claim `$2`, else 0.
    pub(crate) held_by_claim: String,
    /// PostgreSQL only: many `record_pid`s in one statement (arrays `$1..$5`:
    /// id, token, pid, boot id, start ticks), returning the ids it applied to.
    pub(crate) record_pids_batch: Option<String>,
    /// Many `record_outcome`s in one statement, returning the ids it applied
    /// to. PostgreSQL: arrays `$1..$6` (id, token, result, result_text, give
    /// back, retry after); SQLite: `$1` a JSON array of such arrays.
    pub record_outcomes_batch: String,
    /// MariaDB/MySQL only (elsewhere empty): locks the rows that a batch of
    /// outcomes (`$1`, a JSON array of rows as on SQLite) applies to, in id
    /// order, and returns their ids and claim tokens: the rows still RUNNING
    /// under the claim their outcome names. Its `record_outcomes_batch` is an
    /// `UPDATE … JOIN` on the same rows, which returns nothing.
    pub(crate) outcome_rows_held: String,
    /// Fenced: the latest progress line.
    pub(crate) record_progress: String,
    /// Renews the heartbeat of every row daemon instance `$1` runs. On
    /// PostgreSQL it skips rows locked at the moment (the recorder is writing
    /// their outcome): waiting on them could deadlock with its transaction.
    pub(crate) renew_heartbeats: String,
    /// The rows daemon instance `$1` holds (RUNNING under its claims), and
    /// which of them a user asked to cancel. Reads, locks nothing.
    pub(crate) held_by: String,
    /// Rows on host `$1` that are RUNNING with a pid, not held by instance `$2`.
    pub(crate) running_on_host: String,
    /// Rows on host `$1` that are RUNNING without a pid (claimed, process not
    /// started or not yet announced), not held by instance `$2`, with
    /// whether the reaper gave their try before back.
    pub(crate) unstarted_on_host: String,
    /// RUNNING rows whose heartbeat is older than `$1` seconds, not held by
    /// instance `$2`, with whether a pid was recorded and whether the reaper
    /// gave their try before back.
    pub(crate) lapsed_leases: String,
    /// Fenced on the token read before (`$2`, `$3`): marks a row the reaper
    /// found dead CRASHED, or with `$4` = 1 gives its try back (INTERRUPTED,
    /// not counted); `$1` is the result_text. With `$5` (seconds), only
    /// while the row's lease, judged by that lease, has still lapsed.
    pub(crate) mark_crashed: String,
    /// Seconds until the earliest delayed row that waits comes due (at
    /// most 0 for a due one not released yet).
    pub(crate) next_delay: String,
    /// Releases up to [`RELEASE_AT_ONCE`] due delayed rows into the claim's
    /// indexes (see [`RELEASED`]): their `delay_passed_at` is now. (MySQL:
    /// selects and locks their ids, for `Store::release_delays_mysql`.)
    pub(crate) release_delays: String,
    pub(crate) enqueue: String,
    pub(crate) show: String,
    /// Every column of `Request`, from the table (add a WHERE clause), for
    /// a list of rows: the first 1,000 characters of `options` and
    /// `result_text`.
    pub(crate) select_listed: String,
    /// Rows newest first, at most `$1`, filtered by task type `$2`, queue
    /// `$3`, host `$4` ('' for any), state `$5` ('' for any; a `result`, or
    /// `pending` (never run), `retrying` (failed, will run again),
    /// `exhausted`).
    pub(crate) list_where: String,
    /// [`list_where`](Sql::list_where)'s rows, only their id, result and
    /// tries: what `retry` and `cancel` of a filter act on.
    pub(crate) select_where: String,
    pub(crate) list_all: String,
    pub(crate) list_pending: String,
    pub(crate) list_by_result: String,
    pub(crate) retry: String,
    /// `retry`, only while the row is in the state and at the tries an
    /// operator saw ($2: the state, `PENDING` for none; $3: the tries).
    pub(crate) retry_as_seen: String,
    pub(crate) cancel_pending: String,
    pub(crate) cancel_running: String,
    pub(crate) state_of: String,
    /// Row `$1`'s unique key, and the newest other row with that key.
    pub(crate) key_holder: String,
    pub(crate) count_by_result: String,
    // ---- Issue 7: unique requests, retention, cron schedules ----
    /// Inserts task `$1` with options `$2`, try_limit `$3`, delay `$4` seconds
    /// or at time `$5`, priority `$6`, unique key `$7`, queue `$8` (NULL:
    /// `default`), node `$9`, not_node `$10`, period `$11` seconds.
    /// `enqueue` with unique key `$7`: inserts nothing (returns no row) while
    /// a pending or running request has that key (the partial unique index).
    pub(crate) enqueue_unique: String,
    /// The pending or running request holding unique key `$1`.
    pub(crate) holder_of_unique_key: String,
    /// Deletes up to `$2` rows in final state `$3` completed more than `$1`
    /// seconds ago.
    pub(crate) prune_state: String,
    /// Deletes up to `$2` exhausted rows completed more than `$1` seconds ago.
    pub(crate) prune_exhausted: String,
    /// Deletes up to `$2` batches ended more than `$1` seconds ago that no
    /// request belongs to or was made by any more.
    pub(crate) prune_batches: String,
    /// Deletes up to `$2` flows ended more than `$1` seconds ago with no
    /// step row left.
    pub(crate) prune_flows: String,
    /// The database's clock, as seconds since the epoch.
    pub(crate) database_now: String,
    /// The latest slot enqueued for schedule `$1`, as seconds since the epoch.
    pub(crate) last_slot: String,
    /// Claims slot `$2` of schedule `$1`; affects no row if it was taken, or
    /// if a later slot of the schedule was.
    pub(crate) insert_slot: String,
    /// Inserts the request of slot `$6` of schedule `$5`: task `$1`, options
    /// `$2`, try_limit `$3`, priority `$4`; planned and delayed to the slot.
    pub(crate) enqueue_scheduled: String,
    /// Records request `$1` on slot `$3` of schedule `$2`.
    pub(crate) set_slot_request: String,
    /// Forgets slots of schedule `$1` older than an hour, except the latest.
    pub(crate) forget_old_slots: String,
}

impl Sql {
    /// [`claim_apart`](Sql::claim_apart) for `names` queues or task types
    /// (`by`), whose names are the parameters from `$first` on.
    pub fn claim_apart_statement(&self, by: ApartBy, names: usize, first: usize) -> String {
        let branch = match by {
            ApartBy::Queue => &self.claim_of_queues_branch,
            ApartBy::Type => &self.claim_of_types_branch,
        };
        let branches: Vec<String> = (first..first + names)
            .map(|n| branch.replace("{name}", &format!("${n}")))
            .collect();
        self.claim_apart
            .replace("{branches}", &branches.join(" UNION ALL "))
    }

    /// [`runnable_queues`](Sql::runnable_queues) or
    /// [`runnable_types`](Sql::runnable_types).
    pub fn runnable(&self, by: ApartBy) -> &str {
        match by {
            ApartBy::Queue => &self.runnable_queues,
            ApartBy::Type => &self.runnable_types,
        }
    }

    /// The claim statement for `filter`: of one type if it names one, else
    /// of one queue if it names one, else of any (see [`Sql::claim`]).
    pub(crate) fn claim_for(&self, filter: &crate::store::ClaimFilter<'_>) -> &str {
        match filter.narrows_to() {
            (_, true) => &self.claim_of_type,
            (true, false) => &self.claim_of_queue,
            (false, false) => &self.claim,
        }
    }

    /// MariaDB/MySQL's shapes of the statements that cannot be written the
    /// same (`IS DISTINCT FROM` and the runnable rule are respelled by
    /// `store::mysql::query`).
    fn for_mysql(mut self) -> Sql {
        let d = Dialect(Backend::MySql);
        // The unique rule is the generated column `active_unique_key` and its
        // unique index; a duplicate leaves the holder as it is and makes
        // LAST_INSERT_ID() its id.
        self.enqueue_unique = format!(
            "{} ON DUPLICATE KEY UPDATE id = LAST_INSERT_ID(id)",
            self.enqueue.trim_end()
        );
        // The waiting rows are the generated column `waiting_until` and
        // its index (migration 0011).
        self.next_delay = format!(
            "SELECT {} - {} FROM task_runner_requests WHERE waiting_until IS NOT NULL",
            d.epoch_seconds("min(waiting_until)"),
            d.epoch_seconds(d.now())
        );
        // The release's first half: the due rows, locked, skipping those
        // another writer holds (an UPDATE alone would wait for them); then
        // `Store::release_delays_mysql` writes them by primary key.
        // The claim of several queues apart, as `claim_select` is the
        // claim: the ids, locked, each queue's first rows through its own
        // index, named (MariaDB's optimizer read the runnable index
        // otherwise: 122 ms a claim behind 20,000 paused rows). The
        // excluded types are left out as in `claim_select`.
        self.claim_apart = "{branches} ORDER BY ready_rank, id LIMIT $4".to_string();
        self.claim_of_queues_branch = format!(
            "(SELECT id, ready_rank FROM task_runner_requests \
                FORCE INDEX (task_runner_requests_ready_of_queue) \
               WHERE queue = {{name}} AND ready_rank IS NOT NULL \
                 AND (delay_until IS NULL OR delay_until <= {now}) \
                 AND (node IS NULL OR node = $5) AND (not_node IS NULL OR not_node <> $5) \
                 AND task_class_name NOT IN ({{excluded}}) \
               ORDER BY ready_rank, id LIMIT $4 {})",
            d.skip_locked(),
            now = d.now()
        );
        // The queue after `$1` that has any row (see
        // `Store::queues_with_rows_mysql`), one probe of `by_queue`.
        self.runnable_queues =
            "SELECT queue FROM task_runner_requests WHERE queue > $1 ORDER BY queue LIMIT 1"
                .to_string();
        self.release_delays = format!(
            "SELECT id FROM task_runner_requests WHERE waiting_until <= {now} \
              ORDER BY waiting_until LIMIT {RELEASE_AT_ONCE} {}",
            d.skip_locked(),
            now = d.now()
        );
        // A statement may not read, in a subquery, the table it changes
        // (error 1093); SKIP LOCKED cannot pass through a derived table. So
        // the renewal is two statements, neither in a transaction: this one
        // reads the ids no other session holds locked (its locks end with
        // it, under autocommit), then `Store::renew_heartbeats` updates
        // those rows. (Before, one UPDATE of every held row waited for a
        // row an application held locked, renewed nothing, and the daemon
        // fenced itself off, killing all its tasks. A transaction around
        // the two held its locks across a round trip: a connection gone
        // silent between them kept the rows locked, unrenewable.)
        self.renew_heartbeats = format!(
            "SELECT {} FROM task_runner_requests \
              WHERE claimed_by = $1 AND result = 'RUNNING' {}",
            d.int64("id"),
            d.skip_locked()
        );
        // The caller counts the row this inserts (none: another daemon took
        // the slot), and a duplicate key update counts one there (sqlx asks
        // for found rows): `INSERT IGNORE`, whose two values always fit.
        self.insert_slot = format!(
            "INSERT IGNORE INTO task_runner_schedule_slots (schedule, slot) \
             SELECT $1, {slot} FROM DUAL \
              WHERE NOT EXISTS (SELECT 1 FROM task_runner_schedule_slots \
                                 WHERE schedule = $1 AND slot > {slot})",
            slot = d.parse_time("$2")
        );
        // A batch of outcomes: the rows of the JSON array `$1` as a table
        // (id, claim token, result, result_text, give back, retry after),
        // joined to the rows they are fenced on. The rows are locked first,
        // which tells which ones the update then changes; the update names
        // them (`{ids}`, their ids' parameters from `$2`): joined to the
        // JSON table alone, it read, and waited for, a row of the table an
        // application held locked that was not in the batch.
        let outcome_rows = format!(
            "JSON_TABLE($1, '$[*]' COLUMNS (\
               id BIGINT PATH '$[0]', claim_token {JSON_TEXT_255} PATH '$[1]', \
               result {JSON_TEXT_255} PATH '$[2]', \
               result_text MEDIUMTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[3]', \
               give_back BIGINT PATH '$[4]', retry_after DOUBLE PATH '$[5]')) AS v \
             ON t.id = v.id AND t.claim_token = v.claim_token"
        );
        // Rows another session holds locked (an application's transaction)
        // are passed over: their outcomes are set aside, not waited for.
        self.outcome_rows_held = format!(
            "SELECT t.id, t.claim_token FROM task_runner_requests AS t JOIN {outcome_rows} \
              WHERE t.result = 'RUNNING' AND {} ORDER BY t.id {}",
            causes_nothing("t."),
            d.skip_locked()
        );
        self.lock_requests_skipping = format!(
            "SELECT {} FROM task_runner_requests WHERE id IN ({{ids}}) ORDER BY id {}",
            d.int64("id"),
            d.skip_locked()
        );
        self.record_outcomes_batch = format!(
            "UPDATE task_runner_requests AS t JOIN {outcome_rows} \
                SET t.result = {}, t.result_text = {}, t.completed_at = {}, t.pid = NULL, \
                    t.tries = {}, \
                    t.delay_until = CASE WHEN v.retry_after IS NULL OR {} THEN NULL ELSE {} END \
              WHERE t.result = 'RUNNING' AND {} AND t.id IN ({{ids}})",
            cancel_result("t.", "v.result"),
            cancel_text("t.", "v.result", "v.result_text"),
            d.now(),
            tries_given_back("t.tries", "v.give_back"),
            cancel_overrides("t.", "v.result"),
            d.now_plus("v.retry_after"),
            causes_nothing("t.")
        );
        self
    }

    fn render(d: Dialect) -> Sql {
        let now = d.now();
        let plus = |seconds: &str| d.now_plus(seconds);
        let show = |column: &str| d.show_time(column);
        let int = |column: &str| d.int64(column);
        // Whether a RUNNING row's lease has lapsed by the database's clock,
        // judged by the longer of `lease` (a parameter, seconds) and the one
        // the row's holder wrote into its daemon's row: a holder with the
        // longer lease renews less often, and its rows are not reaped
        // between two of its renewals. A row whose holder still renews its
        // own row in `task_runner_daemons` is left to it: a daemon renews
        // that row only after a renewal of its rows succeeded, and a row
        // that renewal skipped (an application's transaction holds it
        // locked) it fences itself, by that row's own deadline, and records
        // (before, its lease lapsed while the lock was held, and a reaper's
        // mark, queued behind the same lock as the holder's outcome, could
        // come first: a finished try was recorded CRASHED and ran again).
        let lease_lapsed = |lease: &str| {
            let lease = format!(
                "coalesce(CASE WHEN {HOLDERS_LEASE_MS} / 1000.0 > {lease} THEN {HOLDERS_LEASE_MS} / 1000.0 END, {lease})"
            );
            let before = plus(&format!("-{lease}"));
            format!(
                "(heartbeat_at IS NULL OR heartbeat_at < {before}) \
                 AND NOT EXISTS (SELECT 1 FROM task_runner_daemons AS holder \
                                  WHERE holder.instance = task_runner_requests.claimed_by \
                                    AND holder.stopped_at IS NULL AND holder.heartbeat_at >= {before})"
            )
        };
        // Whether the reaper gave the row's try before back (see
        // `crate::reaper`): read without loading the text.
        let given_back_before = format!(
            "(CASE WHEN substr(result_text, 1, {}) = '{NOT_COUNTED}' THEN 1 ELSE 0 END)",
            NOT_COUNTED.len()
        );
        // The claim's rule: runnable and released (the partial indexes'
        // predicate), and the delay passed on the database's clock now too.
        let runnable_now =
            format!("{RUNNABLE} AND {RELEASED} AND (delay_until IS NULL OR delay_until <= {now})");
        // A cancel written since the row's last try ended (plain SQL on a
        // waiting row) is kept, and the try ends CANCELLED without starting;
        // one older than that end was for that try, which it ended, and is
        // cleared (a row retried by plain SQL runs). Before `completed_at`
        // is cleared: MariaDB's SET sees the values set to its left.
        // The lease is stamped when the claim runs: on PostgreSQL a limited
        // type's claim runs in a transaction after a wait for the type's
        // lock, and `now()` is the transaction's start.
        let clock = d.clock();
        let claim_set = format!(
            "SET result = 'RUNNING', tries = tries + 1, started_at = {clock}, heartbeat_at = {clock}, \
                 host = $3, claim_token = $1, claimed_by = $2, pid = NULL, pid_boot_id = NULL, \
                 pid_start_ticks = NULL, \
                 cancel_requested_at = CASE WHEN completed_at IS NULL OR cancel_requested_at > completed_at \
                                            THEN cancel_requested_at END, \
                 completed_at = NULL, progress = NULL, \
                 planned_at = coalesce(planned_at, delay_until, created_at)"
        );
        // Options longer than the cap (`max_options`, parameter `{cap}`)
        // are left out: only their length comes back, so a huge value is
        // never loaded by the daemon (SQLite and PostgreSQL read the length
        // without the value).
        let claimed_columns = |cap: &str| {
            format!(
            "{}, task_class_name,              CASE WHEN octet_length(options) > {cap} THEN NULL ELSE options END,              {}, {}, {}, queue, {}, {}, {}, {}, {}, {}, {}",
            int("id"),
            int("tries"),
            int("try_limit"),
            int("priority"),
            int("coalesce(period, 0)"),
            // How long the row waited (the metrics' wait before start).
            d.seconds_between("coalesce(delay_until, created_at)", "started_at"),
            int("batch_id"),
            int("callback_of_batch"),
            // A flow's step counts as having callbacks: its end advances the flow.
            int("(CASE WHEN on_success IS NOT NULL OR on_failure IS NOT NULL OR flow_id IS NOT NULL THEN 1 ELSE 0 END)"),
            int("coalesce(octet_length(options), 0)"),
            // A cancel written before the claim (plain SQL on a pending
            // row): the claim keeps it, and the try never starts.
            int("(CASE WHEN cancel_requested_at IS NOT NULL THEN 1 ELSE 0 END)")
        )
        };
        let claim_returning = |cap: &str| format!("RETURNING {}", claimed_columns(cap));
        // The claim through `index`, with the queue and type conditions
        // given (the parameters are the same in each).
        let claim_through = |index: &str, queue: &str, task: &str| {
            let select_runnable = format!(
                "SELECT id FROM task_runner_requests {} \
                  WHERE {runnable_now} \
                    AND (node IS NULL OR node = $5) AND (not_node IS NULL OR not_node <> $5) \
                    AND {queue} AND {task} \
                    AND task_class_name NOT IN ({}) AND queue NOT IN ({}) \
                  {CLAIM_ORDER} LIMIT $4 {}",
                d.indexed_by(index),
                d.json_strings("$8"),
                d.json_strings("$10"),
                d.skip_locked()
            );
            format!(
                "UPDATE task_runner_requests {claim_set} WHERE {} {}",
                d.claim_ids(&select_runnable),
                claim_returning("$9")
            )
        };
        let (any_queue, any_type) = (
            "($6 = '' OR queue = $6)",
            "($7 = '' OR task_class_name = $7)",
        );
        let claim = claim_through("task_runner_requests_runnable", any_queue, any_type);
        let claim_of_queue = claim_through(
            "task_runner_requests_runnable_of_queue",
            "queue = $6",
            any_type,
        );
        let claim_of_type = claim_through(
            "task_runner_requests_runnable_of_type",
            any_queue,
            "task_class_name = $7",
        );
        // One branch of `claim_apart`: the first rows of one queue (or
        // type), `{name}`, through its own index.
        let claim_apart_branch = |column: &str, index: &str| {
            format!(
                "SELECT id, priority FROM (SELECT id, priority FROM task_runner_requests {} \
                   WHERE {runnable_now} \
                     AND (node IS NULL OR node = $5) AND (not_node IS NULL OR not_node <> $5) \
                     AND {column} = {{name}} AND {any_queue} AND {any_type} \
                     AND task_class_name NOT IN ({}) AND queue NOT IN ({}) \
                   {CLAIM_ORDER} LIMIT $4 {}) AS b",
                d.indexed_by(index),
                d.json_strings("$8"),
                d.json_strings("$10"),
                d.skip_locked()
            )
        };
        let claim_of_queues_branch =
            claim_apart_branch("queue", "task_runner_requests_runnable_of_queue");
        let claim_of_types_branch =
            claim_apart_branch("task_class_name", "task_runner_requests_runnable_of_type");
        let claim_apart = format!(
            "UPDATE task_runner_requests {claim_set} WHERE {} {}",
            d.claim_ids("SELECT id FROM ({branches}) AS c ORDER BY priority DESC, id LIMIT $4"),
            claim_returning("$9")
        );
        // The values of `column` with runnable rows: a recursive skip scan
        // of `index`, one probe each.
        let runnable_of = |column: &str, index: &str| {
            let next_after = |after: &str| {
                format!(
                    "SELECT min({column}) FROM task_runner_requests {} WHERE {RUNNABLE} AND {RELEASED}{after}",
                    d.indexed_by(index)
                )
            };
            format!(
                "WITH RECURSIVE q(name) AS ( \
                   SELECT ({}) \
                   UNION ALL \
                   SELECT ({}) FROM q WHERE q.name IS NOT NULL) \
                 SELECT name FROM q WHERE name IS NOT NULL LIMIT {}",
                next_after(""),
                next_after(&format!(" AND {column} > q.name")),
                APART_AT_MOST + 1
            )
        };
        let runnable_queues = runnable_of("queue", "task_runner_requests_runnable_of_queue");
        let runnable_types =
            runnable_of("task_class_name", "task_runner_requests_runnable_of_type");
        let left_out_backlog = format!(
            "SELECT {} FROM (SELECT id FROM task_runner_requests {} \
               WHERE {RUNNABLE} AND {RELEASED} AND task_class_name IN ({}) \
               LIMIT {BACKLOG_WORTH_APART}) AS b",
            int("count(*)"),
            d.indexed_by("task_runner_requests_runnable_of_type"),
            d.json_strings("$1")
        );
        let claim_one = format!(
            "UPDATE task_runner_requests {claim_set} WHERE id = $4 AND {RUNNABLE} {}",
            claim_returning("$5")
        );
        // A batch of outcomes as a table `v`: PostgreSQL binds one array per
        // column, SQLite one JSON array of rows. (PostgreSQL needs the id
        // qualified in RETURNING, SQLite allows it only unqualified.)
        let (outcome_rows, returned_id) = if d.array_batches() {
            (
                "unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::float8[]) \
                 AS v(id, claim_token, result, result_text, give_back, retry_after)",
                "t.id",
            )
        } else {
            (
                "(SELECT value ->> 0 AS id, value ->> 1 AS claim_token, value ->> 2 AS result, \
                         value ->> 3 AS result_text, value ->> 4 AS give_back, value ->> 5 AS retry_after \
                    FROM json_each($1)) AS v",
                "id",
            )
        };
        let fence = "id = $ID AND claim_token = $TOKEN AND result = 'RUNNING'";
        let fenced = |id: &str, token: &str| fence.replace("$ID", id).replace("$TOKEN", token);
        let columns = [
            int("id"),
            show("created_at"),
            "task_class_name".into(),
            "options".into(),
            int("pid"),
            "host".into(),
            show("started_at"),
            show("completed_at"),
            show("heartbeat_at"),
            "result".into(),
            "result_text".into(),
            int("tries"),
            int("try_limit"),
            show("delay_until"),
            int("priority"),
            "claimed_by".into(),
            show("cancel_requested_at"),
            "progress".into(),
            "queue".into(),
            "node".into(),
            "not_node".into(),
            int("period"),
            show("planned_at"),
            "unique_key".into(),
            "schedule".into(),
            int("batch_id"),
            "on_success".into(),
            "on_failure".into(),
            int("callback_of"),
            int("callback_of_batch"),
            int("flow_id"),
            int("flow_step"),
            "flow_action".into(),
        ];
        // A list shows a text's first line: the first 1,000 characters of
        // each are read (a page of fifty rows of 100 MiB options was read
        // whole, on the daemon's thread).
        let listed = columns
            .iter()
            .map(|column| match column.as_str() {
                "options" | "result_text" => format!("substr({column}, 1, 1000)"),
                _ => column.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let columns = columns.join(", ");
        let select_requests = format!("SELECT {columns} FROM task_runner_requests");
        let batched = d.array_batches();
        let enqueue_columns =
            "task_class_name, options, try_limit, delay_until, priority, unique_key, \
             queue, node, not_node, period, batch_id, on_success, on_failure";
        let enqueue_values = format!(
            "$1, $2, $3, CASE WHEN $4 IS NOT NULL THEN {} WHEN $5 IS NOT NULL THEN {} ELSE NULL END, \
             $6, $7, coalesce($8, 'default'), $9, $10, $11, $12, $13, $14",
            plus("$4"),
            d.parse_time("$5"),
        );
        // The next occurrence is the first point of the row's grid (its
        // planned start plus whole periods) after its end. An occurrence
        // that ran late (its daemons were down overnight) stands for those
        // it missed: before, the next one was planned at the latest point
        // at or before its end, already due, and ran straight after it.
        let elapsed = d.seconds_between("planned_at", now);
        let slots_due = format!(
            "(CASE WHEN {elapsed} / period >= 0 THEN {} + 1 ELSE 1 END)",
            d.floor(&format!("{elapsed} / period"))
        );
        // A time past what the database holds (SQLite and MariaDB give
        // NULL, which would run the next occurrence at once, and the next,
        // without end) is the last time it holds: a period of a thousand
        // years waits, as asked. (PostgreSQL's range is far wider; its
        // refusal is `Tx::insert_follow_up`'s.)
        let next_planned = format!(
            "coalesce({}, {})",
            d.plus_seconds("planned_at", &format!("(period * {slots_due})")),
            d.parse_time("'9999-12-31T23:59:59Z'")
        );
        let outcome_text = match d.0 {
            Backend::MySql => format!(
                "(SELECT {} FROM (SELECT $2 AS outcome_text) AS outcome)",
                cancel_text("", "$1", "outcome.outcome_text")
            ),
            Backend::Sqlite | Backend::Postgres => cancel_text("", "$1", "$2"),
        };
        // The text is named once: MariaDB/MySQL's parameters are sent
        // once for each place they are named, and a text of 12 MB
        // (`output_tail`'s 4 MiB, not UTF-8) sent twice is past the
        // server's 16 MiB packet; the server closed the connection, and
        // the write was retried for ever.
        let record_outcome = format!(
            "UPDATE task_runner_requests \
                SET result = {}, result_text = {}, completed_at = {now}, pid = NULL, \
                    tries = {}, \
                    delay_until = CASE WHEN $4 IS NULL OR {} THEN NULL ELSE {} END \
              WHERE {}",
            cancel_result("", "$1"),
            outcome_text,
            tries_given_back("tries", "$3"),
            cancel_overrides("", "$1"),
            plus("$4"),
            fenced("$5", "$6")
        );
        Sql {
            // The runnable and released rule is the generated column
            // `ready_rank` (migration 0011 for MySQL), whose index is in claim order.
            claim_select: format!(
                "SELECT id FROM task_runner_requests \
                  WHERE ready_rank IS NOT NULL AND (delay_until IS NULL OR delay_until <= {now}) \
                    AND (node IS NULL OR node = $5) AND (not_node IS NULL OR not_node <> $5) \
                    AND ($6 = '' OR queue = $6) \
                    AND ($7 = '' OR task_class_name = $7) \
                    AND task_class_name NOT IN ({{excluded}}) \
                    AND queue NOT IN ({{excluded_queues}}) \
                  ORDER BY ready_rank, id LIMIT $4 {}",
                d.skip_locked()
            ),
            claim_update: format!("UPDATE task_runner_requests {claim_set} WHERE id IN ({{ids}})"),
            claimed_rows: format!(
                "SELECT {} FROM task_runner_requests WHERE id IN ({{ids}})",
                claimed_columns("{cap}")
            ),
            running_of_type: format!(
                "SELECT {} FROM task_runner_requests WHERE result = 'RUNNING' AND task_class_name = $1",
                int("count(*)")
            ),
            lock_type: batched.then(|| {
                "SELECT pg_advisory_xact_lock(hashtext('taskrunner:concurrency:' || $1))".to_string()
            }),
            // Once per row: a row retried by hand and ending again makes
            // no second chain. The occurrence made is noted apart
            // (`task_runner_follow_ups`, migration 0017, MariaDB's 0018), where retention
            // does not delete it while the row lives; `next_of` (migration
            // 0012) still names the cause, and stands for the note on rows
            // a daemon older than that migration made. Checked in the
            // transaction that wrote the row's end, so under its lock: no
            // other end of the same row can be recorded meanwhile. Each
            // occurrence carries the row's callbacks (before, only the
            // first occurrence's end made one). A cancel asked while the
            // try ran ends the series even when the try finished before the
            // cancel reached it (the claim clears a cancel older than the
            // row's last end, so one here came for this try): before, the
            // series went on, and only a cancel that won that race ended it.
            insert_next_occurrence: format!(
                "INSERT INTO task_runner_requests \
                   (task_class_name, options, try_limit, priority, queue, node, not_node, period, \
                    unique_key, schedule, on_success, on_failure, planned_at, delay_until, next_of) \
                 SELECT task_class_name, options, try_limit, priority, queue, node, not_node, period, \
                        unique_key, schedule, on_success, on_failure, {next_planned}, {next_planned}, id \
                   FROM task_runner_requests \
                  WHERE id = $1 AND period > 0 AND planned_at IS NOT NULL \
                    AND cancel_requested_at IS NULL \
                    AND (result = 'FINISHED' \
                         OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries >= try_limit)) \
                    AND NOT EXISTS (SELECT 1 FROM task_runner_follow_ups AS made \
                                     WHERE made.request_id = $1 AND made.cause = 'next') \
                    AND NOT EXISTS (SELECT 1 FROM task_runner_requests AS made WHERE made.next_of = $1)"
            ),
            record_pids_batch: batched.then(|| {
                format!(
                    "UPDATE task_runner_requests t \
                        SET pid = v.pid, pid_boot_id = v.boot_id, pid_start_ticks = v.start_ticks \
                       FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::bigint[]) \
                            AS v(id, claim_token, pid, boot_id, start_ticks) \
                      WHERE t.id = v.id AND t.claim_token = v.claim_token AND t.result = 'RUNNING' {} \
                      RETURNING t.id",
                    d.unlocked("t.id", "id = ANY($1)")
                )
            }),
            record_outcomes_batch: format!(
                "UPDATE task_runner_requests AS t {} \
                    SET result = {}, result_text = {}, completed_at = {now}, pid = NULL, \
                        tries = {}, \
                        delay_until = CASE WHEN v.retry_after IS NULL OR {} THEN NULL ELSE {} END \
                   FROM {outcome_rows} \
                  WHERE t.id = v.id AND t.claim_token = v.claim_token AND t.result = 'RUNNING' \
                    AND {} {} \
                  RETURNING {returned_id}",
                d.by_id_only(),
                cancel_result("t.", "v.result"),
                cancel_text("t.", "v.result", "v.result_text"),
                tries_given_back("t.tries", "v.give_back"),
                cancel_overrides("t.", "v.result"),
                plus("v.retry_after"),
                causes_nothing("t."),
                d.unlocked("t.id", "id = ANY($1)")
            ),
            claim,
            claim_of_queue,
            claim_of_type,
            claim_apart,
            claim_of_queues_branch,
            claim_of_types_branch,
            runnable_queues,
            runnable_types,
            left_out_backlog,
            claim_one,
            record_pid: format!(
                "UPDATE task_runner_requests SET pid = $1, pid_boot_id = $2, pid_start_ticks = $3 WHERE {} {}",
                fenced("$4", "$5"),
                d.unlocked("id", "id = $4")
            ),
            record_plain_outcome: format!(
                "{record_outcome} AND {} {}",
                causes_nothing(""),
                d.unlocked("id", "id = $5")
            ),
            lock_request: d.lock_request(false),
            lock_request_nowait: d.lock_request(true),
            lock_requests_skipping: String::new(),
            held_by_claim: format!(
                "SELECT {} FROM task_runner_requests WHERE {}",
                int("count(*)"),
                fenced("$1", "$2")
            ),
            record_outcome,
            outcome_rows_held: String::new(),
            record_progress: format!(
                "UPDATE task_runner_requests SET progress = $1 WHERE {} {}",
                fenced("$2", "$3"),
                d.unlocked("id", "id = $2")
            ),
            // Returns the rows it renewed: not one another session holds
            // locked (see `Store::renew_heartbeats`; MariaDB/MySQL reads
            // those rows first, then renews them).
            renew_heartbeats: format!(
                "UPDATE task_runner_requests SET heartbeat_at = {now} \
                  WHERE id IN (SELECT id FROM task_runner_requests \
                                WHERE claimed_by = $1 AND result = 'RUNNING' {}) \
                  RETURNING {}",
                d.skip_locked(),
                int("id")
            ),
            held_by: format!(
                "SELECT {}, claim_token, {} FROM task_runner_requests \
                  WHERE claimed_by = $1 AND result = 'RUNNING'",
                int("id"),
                int("(CASE WHEN cancel_requested_at IS NULL THEN 0 ELSE 1 END)")
            ),
            running_on_host: format!(
                "SELECT {}, {}, pid_boot_id, {}, {}, claim_token, coalesce(claimed_by, '') \
                   FROM task_runner_requests \
                  WHERE result = 'RUNNING' AND host = $1 AND pid IS NOT NULL \
                    AND claimed_by IS DISTINCT FROM $2 \
                  ORDER BY id",
                int("id"),
                int("pid"),
                int("pid_start_ticks"),
                d.epoch_seconds("started_at")
            ),
            unstarted_on_host: format!(
                "SELECT {}, claim_token, coalesce(claimed_by, ''), {} \
                   FROM task_runner_requests \
                  WHERE result = 'RUNNING' AND host = $1 AND pid IS NULL \
                    AND claimed_by IS DISTINCT FROM $2 \
                  ORDER BY id",
                int("id"),
                int(&given_back_before)
            ),
            lapsed_leases: format!(
                "SELECT {}, coalesce(host, ''), claim_token, {}, {}, {}, {}, coalesce(claimed_by, '') \
                   FROM task_runner_requests \
                  WHERE result = 'RUNNING' AND {} AND claimed_by IS DISTINCT FROM $2 \
                  ORDER BY id",
                int("id"),
                show("heartbeat_at"),
                int("(CASE WHEN pid IS NULL THEN 0 ELSE 1 END)"),
                int(&given_back_before),
                int(HOLDERS_LEASE_MS),
                lease_lapsed("$1")
            ),
            // A lapse judged by the reaper's read (`$5`, the lease it was
            // judged by) is judged again under the row's lock: a renewal
            // that came between the read and the mark keeps the row (it was
            // marked, and ran again beside the try its holder, told the
            // renewal had worked, ran on until its next one).
            mark_crashed: format!(
                "UPDATE task_runner_requests \
                    SET result = {}, result_text = {}, pid = NULL, completed_at = {now}, delay_until = NULL, \
                        tries = {} \
                  WHERE id = $2 AND claim_token IS NOT DISTINCT FROM $3 AND result = 'RUNNING' \
                    AND ($5 IS NULL OR {})",
                cancel_result("", REAPED_RESULT),
                cancel_text("", REAPED_RESULT, "$1"),
                tries_given_back("tries", "$4"),
                lease_lapsed("$5")
            ),
            next_delay: format!(
                "SELECT {} - {} FROM task_runner_requests {} WHERE {RUNNABLE} AND {WAITING}",
                d.epoch_seconds("min(delay_until)"),
                d.epoch_seconds(now),
                d.indexed_by("task_runner_requests_waiting"),
            ),
            release_delays: format!(
                "UPDATE task_runner_requests SET delay_passed_at = {now} \
                  WHERE id IN (SELECT id FROM task_runner_requests {} \
                                WHERE {RUNNABLE} AND {WAITING} AND delay_until <= {now} \
                                ORDER BY delay_until LIMIT {RELEASE_AT_ONCE} {})",
                d.indexed_by("task_runner_requests_waiting"),
                d.skip_locked()
            ),
            enqueue: format!(
                "INSERT INTO task_runner_requests ({enqueue_columns}) \
                 VALUES ({enqueue_values}) {}",
                d.returning_id("id")
            ),
            show: format!("{select_requests} WHERE id = $1"),
            select_listed: format!("SELECT {listed} FROM task_runner_requests"),
            list_where: format!("{select_requests} {}", list_filter()),
            select_where: format!(
                "SELECT {}, result, {} FROM task_runner_requests {}",
                int("id"),
                int("tries"),
                list_filter()
            ),
            list_all: format!("{select_requests} ORDER BY id DESC LIMIT $1"),
            list_pending: format!("{select_requests} WHERE result IS NULL ORDER BY id DESC LIMIT $1"),
            list_by_result: format!("{select_requests} WHERE result = $2 ORDER BY id DESC LIMIT $1"),
            retry: RETRY.to_string(),
            retry_as_seen: format!(
                "{RETRY} AND coalesce(result, 'PENDING') = $2 AND tries = $3"
            ),
            cancel_pending: format!(
                "UPDATE task_runner_requests \
                    SET result = 'CANCELLED', result_text = 'cancelled before it ran', completed_at = {now} \
                  WHERE id = $1 AND (result IS NULL \
                                     OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') \
                                         AND tries < try_limit) \
                                     OR result NOT IN ({}))",
                // A row from before migration 0004 whose result is no state
                // (`list` says "cancel or retry it"): before, `cancel` said
                // "request N is already : nothing to cancel".
                crate::request::State::ALL
                    .iter()
                    .map(|state| format!("'{}'", state.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            cancel_running: format!(
                "UPDATE task_runner_requests SET cancel_requested_at = {now} \
                  WHERE id = $1 AND result = 'RUNNING'"
            ),
            state_of: "SELECT result FROM task_runner_requests WHERE id = $1".to_string(),
            key_holder: "SELECT r.unique_key, \
                           (SELECT max(o.id) FROM task_runner_requests o \
                             WHERE o.unique_key = r.unique_key AND o.id <> r.id) \
                           FROM task_runner_requests r WHERE r.id = $1"
                .to_string(),
            count_by_result: format!(
                "SELECT coalesce(result, 'PENDING'), {} FROM task_runner_requests GROUP BY result ORDER BY 1",
                int("count(*)")
            ),
            // ---- Issue 7: unique requests, retention, cron schedules ----
            enqueue_unique: format!(
                "{} INTO task_runner_requests ({enqueue_columns}) \
                 VALUES ({enqueue_values}) \
                 {} {}",
                d.insert_or_ignore(),
                d.on_conflict_ignore(),
                d.returning_id("id")
            ),
            // The predicate of the unique index task_runner_requests_unique_key.
            holder_of_unique_key: format!(
                "SELECT {} FROM task_runner_requests \
                  WHERE unique_key = $1 AND {} \
                  ORDER BY id LIMIT 1",
                int("id"),
                unfinished("")
            ),
            prune_state: d.prune_statement(Prunable::Finished, None),
            prune_exhausted: d.prune_statement(Prunable::Exhausted, None),
            prune_batches: d.prune_statement(Prunable::EndedBatches, None),
            prune_flows: d.prune_statement(Prunable::EndedFlows, None),
            database_now: format!("SELECT {}", d.epoch_seconds(now)),
            last_slot: format!(
                "SELECT {} FROM task_runner_schedule_slots WHERE schedule = $1",
                d.epoch_seconds("max(slot)")
            ),
            // Not a slot older than one already taken: a daemon that read
            // the latest slot before another enqueued the missed ones and
            // forgot the old ones (an hour on) took those again.
            insert_slot: format!(
                "{} INTO task_runner_schedule_slots (schedule, slot) \
                 SELECT $1, {slot} \
                  WHERE NOT EXISTS (SELECT 1 FROM task_runner_schedule_slots \
                                     WHERE schedule = $1 AND slot > {slot}) {}",
                d.insert_or_ignore(),
                d.on_conflict_ignore(),
                slot = d.parse_time("$2")
            ),
            enqueue_scheduled: format!(
                "INSERT INTO task_runner_requests \
                   (task_class_name, options, try_limit, priority, schedule, planned_at, delay_until) \
                 VALUES ($1, $2, $3, $4, $5, {slot}, {slot}) {}",
                d.returning_id("id"),
                slot = d.parse_time("$6")
            ),
            set_slot_request: format!(
                "UPDATE task_runner_schedule_slots SET request_id = $1 WHERE schedule = $2 AND slot = {}",
                d.parse_time("$3")
            ),
            forget_old_slots: format!(
                "DELETE FROM task_runner_schedule_slots \
                  WHERE schedule = $1 AND slot < {} \
                    AND slot < ({})",
                plus("-3600"),
                d.while_changing(
                    "SELECT max(slot) FROM task_runner_schedule_slots WHERE schedule = $1"
                )
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ClaimFilter, Purpose, Store};

    /// The details of SQLite's plan for `statement`, its parameters bound
    /// to `binds` (text), on the daemon's own connection settings.
    async fn sqlite_plan(store: &Store, statement: &str, binds: &[&str]) -> Vec<String> {
        // The daemon's own statement, nothing from outside.
        let text = sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {statement}"));
        let mut query = sqlx::query_as::<_, (i64, i64, i64, String)>(text);
        for bind in binds {
            query = query.bind(bind.to_string());
        }
        let pool = store.sqlite_pool().expect("a SQLite store");
        let rows = query.fetch_all(pool).await.expect("the plan");
        rows.into_iter().map(|(_, _, _, detail)| detail).collect()
    }

    /// SQLite plans without statistics: the claim reads the runnable index
    /// in claim order and stops at its limit (not every runnable row,
    /// sorted), a claim of one queue or type reads that queue's or type's
    /// runnable rows in claim order (not the runnable index past every row
    /// of the others), and a batch of outcomes finds each row by id (not every
    /// RUNNING row, each against the whole batch), and a flow's row is
    /// found among its flow's rows.
    #[tokio::test]
    async fn sqlite_claims_through_the_runnable_index_and_writes_batches_by_id() {
        let path = std::env::temp_dir().join(format!("taskrunner-plans-{}.db", std::process::id()));
        let url = format!("sqlite://{}", path.display());
        let store = Store::open(&url, Purpose::Daemon).expect("open");
        store.migrate().await.expect("migrate");
        let sql = SQL.of(Backend::Sqlite);

        let claim = sqlite_plan(
            &store,
            &sql.claim,
            &[
                "token", "instance", "host", "8", "node", "", "", "[]", "1000",
            ],
        )
        .await;
        assert!(
            claim
                .iter()
                .any(|step| step.contains("USING INDEX task_runner_requests_runnable")),
            "{claim:?}"
        );
        assert!(
            !claim.iter().any(|step| step.contains("TEMP B-TREE")),
            "{claim:?}"
        );

        // A claim of one queue, or of one type (of any queue or of one),
        // reads that queue's or type's runnable rows in claim order: not
        // the runnable index past every other queue's or type's rows, nor
        // every runnable row of its own, sorted.
        for (queue, task, index, search) in [
            (Some("mail"), None, "runnable_of_queue", "(queue=?)"),
            (
                None,
                Some("Mail"),
                "runnable_of_type",
                "(task_class_name=?)",
            ),
            (
                Some("mail"),
                Some("Mail"),
                "runnable_of_type",
                "(task_class_name=?)",
            ),
        ] {
            let filter = ClaimFilter {
                node: "node",
                queue,
                task,
                excluded_tasks: &[],
                excluded_queues: &[],
                apart: None,
                options_inline: None,
            };
            let plan = sqlite_plan(
                &store,
                sql.claim_for(&filter),
                &[
                    "token",
                    "instance",
                    "host",
                    "8",
                    "node",
                    queue.unwrap_or(""),
                    task.unwrap_or(""),
                    "[]",
                    "1000",
                    "[]",
                ],
            )
            .await;
            let expected = format!("USING INDEX task_runner_requests_{index} {search}");
            assert!(
                plan.iter().any(|step| step.contains(&expected)),
                "{queue:?} {task:?}: {plan:?}"
            );
            assert!(
                !plan.iter().any(|step| step.contains("TEMP B-TREE")),
                "{queue:?} {task:?}: {plan:?}"
            );
        }

        // The claim of several queues apart (a queue paused), or types (a
        // type left out), reads each through its own index, and finding
        // them probes that index.
        for (by, index, column) in [
            (ApartBy::Queue, "runnable_of_queue", "queue"),
            (ApartBy::Type, "runnable_of_type", "task_class_name"),
        ] {
            let apart = sqlite_plan(
                &store,
                &sql.claim_apart_statement(by, 2, 11),
                &[
                    "token", "instance", "host", "8", "node", "", "", "[]", "1000", "[]", "a", "b",
                ],
            )
            .await;
            let through = format!("USING INDEX task_runner_requests_{index} ({column}=?)");
            assert_eq!(
                apart.iter().filter(|step| step.contains(&through)).count(),
                2,
                "{by:?}: {apart:?}"
            );
            if by == ApartBy::Type {
                let backlog = sqlite_plan(&store, &sql.left_out_backlog, &["[]"]).await;
                assert!(
                    backlog.iter().any(|step| step.contains(
                        "USING INDEX task_runner_requests_runnable_of_type (task_class_name=?)"
                    )),
                    "{backlog:?}"
                );
            }
            let found = sqlite_plan(&store, sql.runnable(by), &[]).await;
            assert!(
                found
                    .iter()
                    .all(|step| !step.contains("SCAN task_runner_requests")),
                "{by:?}: {found:?}"
            );
            assert!(
                found.iter().any(|step| step.contains(&format!(
                    "USING INDEX task_runner_requests_{index} ({column}>?)"
                ))),
                "{by:?}: {found:?}"
            );
        }

        let batch = sqlite_plan(&store, &sql.record_outcomes_batch, &["[]"]).await;
        assert!(
            batch
                .iter()
                .any(|step| step.contains("SEARCH t USING INTEGER PRIMARY KEY")),
            "{batch:?}"
        );

        // A flow's row at its position: through the flow's rows, not every
        // row of the table (the unique key's index holds only open rows).
        let step = sqlite_plan(
            &store,
            &super::super::flow::FLOW.of(Backend::Sqlite).step_by_key,
            &["flow:1:1:0:execute", "1"],
        )
        .await;
        assert!(
            step.iter()
                .any(|step| step.contains("USING INDEX task_runner_requests_flow")),
            "{step:?}"
        );
        assert!(
            !step
                .iter()
                .any(|step| step.contains("SCAN task_runner_requests")),
            "{step:?}"
        );
        store.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
