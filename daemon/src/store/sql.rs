//! Every SQL statement taskrunner runs, written once with `$N` parameters and
//! rendered for each backend's dialect (SQLite binds `$N` by number too).
//!
//! The runnable rule (SPEC.md) is [`RUNNABLE`]; the claim query is
//! [`Sql::claim`]. Time comparisons always use the database's clock.

use std::sync::LazyLock;

/// What differs between SQLite and PostgreSQL.
pub struct Dialect {
    /// The current time, as stored in timestamp columns.
    now: &'static str,
    /// `now + $N seconds` (`{}` is the parameter).
    now_plus_seconds: &'static str,
    /// A timestamp column rendered as `YYYY-MM-DD HH:MM:SS.SSS` text.
    show_time: &'static str,
    /// A timestamp as seconds since the epoch (float).
    epoch_seconds: &'static str,
    /// A text parameter read as a timestamp.
    parse_time: &'static str,
    /// Picks the ids to claim: `{}` is the ordered, limited runnable select.
    claim_ids: &'static str,
    /// Row lock clause for the claim's select.
    skip_locked: &'static str,
    /// An integer column as a 64-bit integer.
    int64: &'static str,
    /// Whether many rows can be updated from bound arrays (`unnest`).
    array_batches: bool,
    /// The elements of a JSON array of strings parameter, as a subquery.
    json_strings: &'static str,
    /// `ts` plus a number of seconds, exact to the millisecond.
    plus_seconds: &'static str,
    /// Seconds from timestamp `a` to `b`.
    seconds_between: &'static str,
    /// The largest integer not above a positive number.
    floor: &'static str,
    // Issue 7 (unique requests, cron slots): skipping unique-index conflicts.
    /// `INSERT`, or SQLite's `INSERT OR IGNORE`.
    insert_or_ignore: &'static str,
    /// PostgreSQL's `ON CONFLICT DO NOTHING`, or nothing.
    on_conflict_ignore: &'static str,
}

pub static SQLITE: LazyLock<Sql> = LazyLock::new(|| {
    Sql::render(&Dialect {
        now: "strftime('%Y-%m-%d %H:%M:%f', 'now')",
        now_plus_seconds: "strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.3f seconds', {}))",
        show_time: "CAST({} AS TEXT)",
        epoch_seconds: "((julianday({}) - 2440587.5) * 86400.0)",
        parse_time: "strftime('%Y-%m-%d %H:%M:%f', {})",
        claim_ids: "id IN ({})",
        skip_locked: "",
        int64: "{}",
        array_batches: false,
        json_strings: "SELECT value FROM json_each({})",
        plus_seconds: "strftime('%Y-%m-%d %H:%M:%f', {ts}, printf('%+.3f seconds', {secs}))",
        seconds_between: "((julianday({b}) - julianday({a})) * 86400.0)",
        floor: "CAST({} AS INTEGER)",
        insert_or_ignore: "INSERT OR IGNORE",
        on_conflict_ignore: "",
    })
});

/// MariaDB and MySQL: timestamps are `DATETIME(6)` holding UTC (the
/// database's clock read as `UTC_TIMESTAMP(6)`, whatever the session's time
/// zone). Statements that need another shape there (no `RETURNING`, no
/// `UPDATE … FROM`, no subquery on the table being changed) are replaced by
/// [`Sql::for_mysql`].
pub static MYSQL: LazyLock<Sql> = LazyLock::new(|| {
    Sql::render(&Dialect {
        now: "UTC_TIMESTAMP(6)",
        now_plus_seconds: "TIMESTAMPADD(MICROSECOND, ROUND(({}) * 1000000), UTC_TIMESTAMP(6))",
        show_time: "LEFT(DATE_FORMAT({}, '%Y-%m-%d %H:%i:%s.%f'), 23)",
        epoch_seconds: "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {}) / 1e6)",
        parse_time: "CAST(REPLACE(REPLACE({}, 'T', ' '), 'Z', '') AS DATETIME(6))",
        claim_ids: "id IN ({})",
        skip_locked: "FOR UPDATE SKIP LOCKED",
        int64: "CAST({} AS SIGNED)",
        array_batches: false,
        json_strings:
            "SELECT j.v FROM JSON_TABLE({}, '$[*]' COLUMNS (v VARCHAR(255) PATH '$')) AS j",
        plus_seconds: "TIMESTAMPADD(MICROSECOND, ROUND(({secs}) * 1000000), {ts})",
        seconds_between: "(TIMESTAMPDIFF(MICROSECOND, {a}, {b}) / 1e6)",
        floor: "FLOOR({})",
        insert_or_ignore: "INSERT IGNORE",
        on_conflict_ignore: "",
    })
    .for_mysql()
});

pub static POSTGRES: LazyLock<Sql> = LazyLock::new(|| {
    Sql::render(&Dialect {
        now: "now()",
        now_plus_seconds: "(now() + make_interval(secs => {}))",
        show_time: "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS')",
        epoch_seconds: "extract(epoch from {})::float8",
        parse_time: "CAST({} AS timestamptz)",
        claim_ids: "id = ANY(ARRAY({}))",
        skip_locked: "FOR UPDATE SKIP LOCKED",
        int64: "{}::bigint",
        array_batches: true,
        json_strings: "SELECT jsonb_array_elements_text(CAST({} AS jsonb))",
        plus_seconds: "({ts} + make_interval(secs => {secs}))",
        seconds_between: "extract(epoch from ({b} - {a}))::float8",
        floor: "floor({})",
        insert_or_ignore: "INSERT",
        on_conflict_ignore: "ON CONFLICT DO NOTHING",
    })
});

/// The runnable rule of SPEC.md, minus the delay (added where it applies).
/// It is the predicate of the partial index `task_runner_requests_runnable`
/// (migration 0003), written identically so that planners use the index.
pub const RUNNABLE: &str = "pid IS NULL \
     AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED')) \
     AND tries < try_limit";

/// Whether a cancel overrides the outcome `result` of a try: a cancel, once
/// accepted (`cancel_requested_at` set while the row ran), means no further
/// try. Only FINISHED stands (the work is done); any other outcome, however
/// the try ended before its daemon could stop it, makes the row CANCELLED.
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

/// The `result_text` an outcome write stores: a try that ended on its own
/// after a cancel keeps its outcome after the word "cancelled".
fn cancel_text(row: &str, result: &str, result_text: &str) -> String {
    format!(
        "CASE WHEN {} AND {result} <> 'CANCELLED' \
              THEN 'cancelled by a user; the running try ended ' || {result} || ': ' || coalesce({result_text}, '') \
              ELSE {result_text} END",
        cancel_overrides(row, result)
    )
}

/// Runnable rows come first by priority, then first-come first-served.
const CLAIM_ORDER: &str = "ORDER BY priority DESC, id";

/// Every statement, rendered for one dialect.
pub struct Sql {
    /// Claims up to `$4` runnable rows for daemon instance `$2` on host `$3`
    /// with claim token `$1`, in one atomic statement. Filters: node name
    /// `$5` (rows pinned elsewhere, or barred from here, are skipped), queue
    /// `$6` and task type `$7` ('' for any), and task types `$8` (a JSON
    /// array) left to `claim_limited`; options longer than `$9` bytes are
    /// left out (their length only comes back) (SQLite: one
    /// `UPDATE … RETURNING` on the writer connection; PostgreSQL: `FOR UPDATE
    /// SKIP LOCKED`, so concurrent daemons never wait on or take the same row).
    /// Writes RUNNING, tries + 1, started_at, host, heartbeat_at before any
    /// process starts.
    pub claim: String,
    /// MariaDB/MySQL's claim, in three statements of one transaction (see
    /// `store::mysql`): the ids, locked and skipping rows locked by others
    /// (parameters as in [`claim`](Sql::claim), `$8` onwards: the excluded
    /// types; `{excluded}` stands for their list).
    pub claim_select: String,
    /// Then the claim's `SET` on those ids (`$1..$3` as in the claim, the
    /// ids from `$4`; `{ids}` stands for their list)…
    pub claim_update: String,
    /// …and the claimed rows, as the claim returns them (ids from `$1`;
    /// `{cap}` stands for the options cap, a number).
    pub claimed_rows: String,
    /// The same claim for one given row (`$4` is its id, `$5` the options
    /// cap), ignoring its delay:
    /// `taskrunner-cli run --id --record`.
    pub claim_one: String,
    /// How many rows of task type `$1` run now, on any daemon.
    pub running_of_type: String,
    /// PostgreSQL only: serialises claims of task type `$1` across daemons
    /// until the transaction ends (SQLite serialises every writer anyway).
    pub lock_type: Option<String>,
    /// Inserts the next occurrence of periodic row `$1` if its try ended
    /// (finished or exhausted): planned one period after its planned start,
    /// or, after downtime, at the latest slot already due (one catch-up run).
    pub insert_next_occurrence: String,
    /// Fenced: records the spawned process of claim `$5` on row `$4`.
    pub record_pid: String,
    /// Fenced: records the outcome of claim `$6` on row `$5`.
    pub record_outcome: String,
    /// PostgreSQL only: many `record_pid`s in one statement (arrays `$1..$5`:
    /// id, token, pid, boot id, start ticks), returning the ids it applied to.
    pub record_pids_batch: Option<String>,
    /// Many `record_outcome`s in one statement, returning the ids it applied
    /// to. PostgreSQL: arrays `$1..$6` (id, token, result, result_text, give
    /// back, retry after); SQLite: `$1` a JSON array of such arrays.
    pub record_outcomes_batch: String,
    /// Fenced: the latest progress line.
    pub record_progress: String,
    /// Renews the heartbeat of every row daemon instance `$1` runs. On
    /// PostgreSQL it skips rows locked at the moment (the recorder is writing
    /// their outcome): waiting on them could deadlock with its transaction.
    pub renew_heartbeats: String,
    /// The rows daemon instance `$1` holds (RUNNING under its claims), and
    /// which of them a user asked to cancel. Reads, locks nothing.
    pub held_by: String,
    /// Rows on host `$1` that are RUNNING with a pid, not held by instance `$2`.
    pub running_on_host: String,
    /// Rows on host `$1` that are RUNNING without a pid (claimed, process not
    /// started or not yet announced), not held by instance `$2`.
    pub unstarted_on_host: String,
    /// RUNNING rows whose heartbeat is older than `$1` seconds, not held by instance `$2`.
    pub lapsed_leases: String,
    /// Fenced on the token read before: marks a row the reaper found dead.
    pub mark_crashed: String,
    /// Seconds until the earliest delayed row becomes runnable.
    pub next_delay: String,
    pub enqueue: String,
    pub show: String,
    /// Every column of `Request`, from the table (add a WHERE clause).
    pub select_requests: String,
    /// Rows newest first, at most `$1`, filtered by task type `$2`, queue
    /// `$3`, host `$4` ('' for any), state `$5` ('' for any; a `result`, or
    /// `pending` (never run), `retrying` (failed, will run again),
    /// `exhausted`).
    pub list_where: String,
    pub list_all: String,
    pub list_pending: String,
    pub list_by_result: String,
    pub retry: String,
    pub cancel_pending: String,
    pub cancel_running: String,
    pub state_of: String,
    pub count_by_result: String,
    pub purge: String,
    // ---- Issue 7: unique requests, retention, cron schedules ----
    /// Inserts task `$1` with options `$2`, try_limit `$3`, delay `$4` seconds
    /// or at time `$5`, priority `$6`, unique key `$7`, queue `$8` (NULL:
    /// `default`), node `$9`, not_node `$10`, period `$11` seconds.
    /// `enqueue` with unique key `$7`: inserts nothing (returns no row) while
    /// a pending or running request has that key (the partial unique index).
    pub enqueue_unique: String,
    /// The pending or running request holding unique key `$1`.
    pub holder_of_unique_key: String,
    /// Deletes up to `$2` rows in final state `$3` completed more than `$1`
    /// seconds ago.
    pub prune_state: String,
    /// Deletes up to `$2` exhausted rows completed more than `$1` seconds ago.
    pub prune_exhausted: String,
    /// The database's clock, as seconds since the epoch.
    pub database_now: String,
    /// The latest slot enqueued for schedule `$1`, as seconds since the epoch.
    pub last_slot: String,
    /// Claims slot `$2` of schedule `$1`; affects no row if it was taken.
    pub insert_slot: String,
    /// Inserts the request of slot `$6` of schedule `$5`: task `$1`, options
    /// `$2`, try_limit `$3`, priority `$4`; planned and delayed to the slot.
    pub enqueue_scheduled: String,
    /// Records request `$1` on slot `$3` of schedule `$2`.
    pub set_slot_request: String,
    /// Forgets slots of schedule `$1` older than an hour, except the latest.
    pub forget_old_slots: String,
}

impl Sql {
    /// MariaDB/MySQL's shapes of the statements that cannot be written the
    /// same: an `INSERT` returns its id through `LAST_INSERT_ID()` rather
    /// than `RETURNING`; a statement may not read, in a subquery, the table
    /// it changes (error 1093), and `IN (… LIMIT)` is not supported, so
    /// deletes in batches are a plain `DELETE … LIMIT`. (`IS DISTINCT FROM`
    /// and the runnable rule are respelled by `store::mysql::query`.)
    fn for_mysql(mut self) -> Sql {
        fn without_returning(statement: &str) -> String {
            match statement.rfind(" RETURNING ") {
                Some(at) => statement[..at].to_string(),
                None => statement.to_string(),
            }
        }
        self.enqueue = without_returning(&self.enqueue);
        self.enqueue_scheduled = without_returning(&self.enqueue_scheduled);
        // The unique rule is the generated column `active_unique_key` and its
        // unique index; a duplicate leaves the holder as it is and makes
        // LAST_INSERT_ID() its id.
        self.enqueue_unique = format!(
            "{} ON DUPLICATE KEY UPDATE id = LAST_INSERT_ID(id)",
            without_returning(&self.enqueue).trim_end()
        );
        self.renew_heartbeats = "UPDATE task_runner_requests SET heartbeat_at = UTC_TIMESTAMP(6) \
              WHERE claimed_by = $1 AND result = 'RUNNING'"
            .to_string();
        let older_than =
            "completed_at < TIMESTAMPADD(MICROSECOND, ROUND(-$1 * 1000000), UTC_TIMESTAMP(6))";
        self.purge = format!(
            "DELETE FROM task_runner_requests \
              WHERE (result IN ('FINISHED', 'CANCELLED', 'REJECTED') \
                     OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries >= try_limit)) \
                AND {older_than} LIMIT $2"
        );
        self.prune_state = format!(
            "DELETE FROM task_runner_requests \
              WHERE result = $3 AND result IN ('FINISHED', 'CANCELLED', 'REJECTED') \
                AND {older_than} LIMIT $2"
        );
        self.prune_exhausted = format!(
            "DELETE FROM task_runner_requests \
              WHERE result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries >= try_limit \
                AND {older_than} LIMIT $2"
        );
        self.forget_old_slots = "DELETE FROM task_runner_schedule_slots \
              WHERE schedule = $1 AND slot < TIMESTAMPADD(SECOND, -3600, UTC_TIMESTAMP(6)) \
                AND slot < (SELECT latest FROM (SELECT max(slot) AS latest \
                                                  FROM task_runner_schedule_slots \
                                                 WHERE schedule = $1) AS m)"
            .to_string();
        self
    }

    fn render(d: &Dialect) -> Sql {
        let now = d.now;
        let plus = |param: &str| d.now_plus_seconds.replace("{}", param);
        let show = |column: &str| d.show_time.replace("{}", column);
        let int = |column: &str| d.int64.replace("{}", column);
        let runnable_now = format!("{RUNNABLE} AND (delay_until IS NULL OR delay_until <= {now})");
        let claim_set = format!(
            "SET result = 'RUNNING', tries = tries + 1, started_at = {now}, heartbeat_at = {now}, \
                 host = $3, claim_token = $1, claimed_by = $2, pid = NULL, pid_boot_id = NULL, \
                 pid_start_ticks = NULL, completed_at = NULL, cancel_requested_at = NULL, progress = NULL, \
                 planned_at = coalesce(planned_at, delay_until, created_at)"
        );
        // Options longer than the cap (`max_options`, parameter `{cap}`)
        // are left out: only their length comes back, so a huge value is
        // never loaded by the daemon (SQLite and PostgreSQL read the length
        // without the value).
        let claimed_columns = |cap: &str| {
            format!(
            "{}, task_class_name,              CASE WHEN octet_length(options) > {cap} THEN NULL ELSE options END,              {}, {}, {}, queue, {}, {}, {}, {}, {}, {}",
            int("id"),
            int("tries"),
            int("try_limit"),
            int("priority"),
            int("coalesce(period, 0)"),
            // How long the row waited (the metrics' wait before start).
            d.seconds_between
                .replace("{a}", "coalesce(delay_until, created_at)")
                .replace("{b}", "started_at"),
            int("batch_id"),
            int("callback_of_batch"),
            // A flow's step counts as having callbacks: its end advances the flow.
            int("(CASE WHEN on_success IS NOT NULL OR on_failure IS NOT NULL OR flow_id IS NOT NULL THEN 1 ELSE 0 END)"),
            int("coalesce(octet_length(options), 0)")
        )
        };
        let claim_returning = |cap: &str| format!("RETURNING {}", claimed_columns(cap));
        let select_runnable = format!(
            "SELECT id FROM task_runner_requests \
              WHERE {runnable_now} \
                AND (node IS NULL OR node = $5) AND (not_node IS NULL OR not_node <> $5) \
                AND ($6 = '' OR queue = $6) \
                AND ($7 = '' OR task_class_name = $7) \
                AND task_class_name NOT IN ({}) \
              {CLAIM_ORDER} LIMIT $4 {}",
            d.json_strings.replace("{}", "$8"),
            d.skip_locked
        );
        let claim = format!(
            "UPDATE task_runner_requests {claim_set} WHERE {} {}",
            d.claim_ids.replace("{}", &select_runnable),
            claim_returning("$9")
        );
        let claim_one = format!(
            "UPDATE task_runner_requests {claim_set} WHERE id = $4 AND {RUNNABLE} {}",
            claim_returning("$5")
        );
        // A batch of outcomes as a table `v`: PostgreSQL binds one array per
        // column, SQLite one JSON array of rows. (PostgreSQL needs the id
        // qualified in RETURNING, SQLite allows it only unqualified.)
        let (outcome_rows, returned_id) = if d.array_batches {
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
        ]
        .join(", ");
        let select_requests = format!("SELECT {columns} FROM task_runner_requests");
        let final_or_exhausted = "(result IN ('FINISHED', 'CANCELLED', 'REJECTED') \
              OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries >= try_limit))";
        let batched = d.array_batches;
        let enqueue_columns =
            "task_class_name, options, try_limit, delay_until, priority, unique_key, \
             queue, node, not_node, period, batch_id, on_success, on_failure";
        let enqueue_values = format!(
            "$1, $2, $3, CASE WHEN $4 IS NOT NULL THEN {} WHEN $5 IS NOT NULL THEN {} ELSE NULL END, \
             $6, $7, coalesce($8, 'default'), $9, $10, $11, $12, $13, $14",
            plus("$4"),
            d.parse_time.replace("{}", "$5"),
        );
        let elapsed = d
            .seconds_between
            .replace("{a}", "planned_at")
            .replace("{b}", now);
        let slots_due = format!(
            "(CASE WHEN {elapsed} / period >= 1 THEN {} ELSE 1 END)",
            d.floor.replace("{}", &format!("{elapsed} / period"))
        );
        let next_planned = d
            .plus_seconds
            .replace("{ts}", "planned_at")
            .replace("{secs}", &format!("(period * {slots_due})"));
        Sql {
            // The runnable rule is the generated column `claim_rank`
            // (migration 0001 for MySQL), whose index is in claim order.
            claim_select: format!(
                "SELECT id FROM task_runner_requests \
                  WHERE claim_rank IS NOT NULL AND (delay_until IS NULL OR delay_until <= {now}) \
                    AND (node IS NULL OR node = $5) AND (not_node IS NULL OR not_node <> $5) \
                    AND ($6 = '' OR queue = $6) \
                    AND ($7 = '' OR task_class_name = $7) \
                    AND task_class_name NOT IN ({{excluded}}) \
                  ORDER BY claim_rank, id LIMIT $4 {}",
                d.skip_locked
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
            insert_next_occurrence: format!(
                "INSERT INTO task_runner_requests \
                   (task_class_name, options, try_limit, priority, queue, node, not_node, period, \
                    unique_key, schedule, planned_at, delay_until) \
                 SELECT task_class_name, options, try_limit, priority, queue, node, not_node, period, \
                        unique_key, schedule, {next_planned}, {next_planned} \
                   FROM task_runner_requests \
                  WHERE id = $1 AND period > 0 AND planned_at IS NOT NULL \
                    AND (result = 'FINISHED' \
                         OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries >= try_limit))"
            ),
            record_pids_batch: batched.then(|| {
                "UPDATE task_runner_requests t \
                    SET pid = v.pid, pid_boot_id = v.boot_id, pid_start_ticks = v.start_ticks \
                   FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::bigint[]) \
                        AS v(id, claim_token, pid, boot_id, start_ticks) \
                  WHERE t.id = v.id AND t.claim_token = v.claim_token AND t.result = 'RUNNING' \
                  RETURNING t.id"
                    .to_string()
            }),
            record_outcomes_batch: format!(
                "UPDATE task_runner_requests AS t \
                    SET result = {}, result_text = {}, completed_at = {now}, pid = NULL, \
                        tries = t.tries - v.give_back, \
                        delay_until = CASE WHEN v.retry_after IS NULL OR {} THEN NULL ELSE {} END \
                   FROM {outcome_rows} \
                  WHERE t.id = v.id AND t.claim_token = v.claim_token AND t.result = 'RUNNING' \
                  RETURNING {returned_id}",
                cancel_result("t.", "v.result"),
                cancel_text("t.", "v.result", "v.result_text"),
                cancel_overrides("t.", "v.result"),
                plus("v.retry_after")
            ),
            claim,
            claim_one,
            record_pid: format!(
                "UPDATE task_runner_requests SET pid = $1, pid_boot_id = $2, pid_start_ticks = $3 WHERE {}",
                fenced("$4", "$5")
            ),
            record_outcome: format!(
                "UPDATE task_runner_requests \
                    SET result = {}, result_text = {}, completed_at = {now}, pid = NULL, \
                        tries = tries - $3, \
                        delay_until = CASE WHEN $4 IS NULL OR {} THEN NULL ELSE {} END \
                  WHERE {}",
                cancel_result("", "$1"),
                cancel_text("", "$1", "$2"),
                cancel_overrides("", "$1"),
                plus("$4"),
                fenced("$5", "$6")
            ),
            record_progress: format!(
                "UPDATE task_runner_requests SET progress = $1 WHERE {}",
                fenced("$2", "$3")
            ),
            renew_heartbeats: format!(
                "UPDATE task_runner_requests SET heartbeat_at = {now} \
                  WHERE id IN (SELECT id FROM task_runner_requests \
                                WHERE claimed_by = $1 AND result = 'RUNNING' {})",
                d.skip_locked
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
                d.epoch_seconds.replace("{}", "started_at")
            ),
            unstarted_on_host: format!(
                "SELECT {}, claim_token, coalesce(claimed_by, '') \
                   FROM task_runner_requests \
                  WHERE result = 'RUNNING' AND host = $1 AND pid IS NULL \
                    AND claimed_by IS DISTINCT FROM $2 \
                  ORDER BY id",
                int("id")
            ),
            lapsed_leases: format!(
                "SELECT {}, coalesce(host, ''), claim_token, {} \
                   FROM task_runner_requests \
                  WHERE result = 'RUNNING' \
                    AND (heartbeat_at IS NULL OR heartbeat_at < {}) \
                    AND claimed_by IS DISTINCT FROM $2 \
                  ORDER BY id",
                int("id"),
                show("heartbeat_at"),
                plus("-$1")
            ),
            mark_crashed: format!(
                "UPDATE task_runner_requests \
                    SET result = {}, result_text = {}, pid = NULL, completed_at = {now}, delay_until = NULL \
                  WHERE id = $2 AND claim_token IS NOT DISTINCT FROM $3 AND result = 'RUNNING'",
                cancel_result("", "'CRASHED'"),
                cancel_text("", "'CRASHED'", "$1")
            ),
            next_delay: format!(
                "SELECT {} - {} FROM task_runner_requests WHERE {RUNNABLE} AND delay_until > {now}",
                d.epoch_seconds.replace("{}", "min(delay_until)"),
                d.epoch_seconds.replace("{}", now)
            ),
            enqueue: format!(
                "INSERT INTO task_runner_requests ({enqueue_columns}) \
                 VALUES ({enqueue_values}) \
                 RETURNING {}",
                int("id")
            ),
            show: format!("{select_requests} WHERE id = $1"),
            select_requests: select_requests.clone(),
            list_where: format!(
                "{select_requests} \
                  WHERE ($2 = '' OR task_class_name = $2) AND ($3 = '' OR queue = $3) \
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
            ),
            list_all: format!("{select_requests} ORDER BY id DESC LIMIT $1"),
            list_pending: format!("{select_requests} WHERE result IS NULL ORDER BY id DESC LIMIT $1"),
            list_by_result: format!("{select_requests} WHERE result = $2 ORDER BY id DESC LIMIT $1"),
            retry: "UPDATE task_runner_requests \
                       SET pid = NULL, result = NULL, tries = 0, delay_until = NULL, cancel_requested_at = NULL \
                     WHERE id = $1 AND result IS DISTINCT FROM 'RUNNING'"
                .to_string(),
            cancel_pending: format!(
                "UPDATE task_runner_requests \
                    SET result = 'CANCELLED', result_text = 'cancelled before it ran', completed_at = {now} \
                  WHERE id = $1 AND (result IS NULL OR result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED'))"
            ),
            cancel_running: format!(
                "UPDATE task_runner_requests SET cancel_requested_at = {now} \
                  WHERE id = $1 AND result = 'RUNNING'"
            ),
            state_of: "SELECT result FROM task_runner_requests WHERE id = $1".to_string(),
            count_by_result: format!(
                "SELECT coalesce(result, 'PENDING'), {} FROM task_runner_requests GROUP BY result ORDER BY 1",
                int("count(*)")
            ),
            purge: format!(
                "DELETE FROM task_runner_requests WHERE id IN ( \
                   SELECT id FROM task_runner_requests \
                    WHERE {final_or_exhausted} AND completed_at < {} LIMIT $2)",
                plus("-$1")
            ),
            // ---- Issue 7: unique requests, retention, cron schedules ----
            enqueue_unique: format!(
                "{} INTO task_runner_requests ({enqueue_columns}) \
                 VALUES ({enqueue_values}) \
                 {} RETURNING {}",
                d.insert_or_ignore,
                d.on_conflict_ignore,
                int("id")
            ),
            // The predicate of the unique index task_runner_requests_unique_key.
            holder_of_unique_key: format!(
                "SELECT {} FROM task_runner_requests \
                  WHERE unique_key = $1 \
                    AND (result IS NULL OR result = 'RUNNING' \
                         OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND tries < try_limit)) \
                  ORDER BY id LIMIT 1",
                int("id")
            ),
            prune_state: format!(
                "DELETE FROM task_runner_requests WHERE id IN ( \
                   SELECT id FROM task_runner_requests \
                    WHERE result = $3 AND result IN ('FINISHED', 'CANCELLED', 'REJECTED') \
                      AND completed_at < {} LIMIT $2)",
                plus("-$1")
            ),
            prune_exhausted: format!(
                "DELETE FROM task_runner_requests WHERE id IN ( \
                   SELECT id FROM task_runner_requests \
                    WHERE result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries >= try_limit \
                      AND completed_at < {} LIMIT $2)",
                plus("-$1")
            ),
            database_now: format!("SELECT {}", d.epoch_seconds.replace("{}", now)),
            last_slot: format!(
                "SELECT {} FROM task_runner_schedule_slots WHERE schedule = $1",
                d.epoch_seconds.replace("{}", "max(slot)")
            ),
            insert_slot: format!(
                "{} INTO task_runner_schedule_slots (schedule, slot) VALUES ($1, {}) {}",
                d.insert_or_ignore,
                d.parse_time.replace("{}", "$2"),
                d.on_conflict_ignore
            ),
            enqueue_scheduled: format!(
                "INSERT INTO task_runner_requests \
                   (task_class_name, options, try_limit, priority, schedule, planned_at, delay_until) \
                 VALUES ($1, $2, $3, $4, $5, {slot}, {slot}) RETURNING {}",
                int("id"),
                slot = d.parse_time.replace("{}", "$6")
            ),
            set_slot_request: format!(
                "UPDATE task_runner_schedule_slots SET request_id = $1 WHERE schedule = $2 AND slot = {}",
                d.parse_time.replace("{}", "$3")
            ),
            forget_old_slots: format!(
                "DELETE FROM task_runner_schedule_slots \
                  WHERE schedule = $1 AND slot < {} \
                    AND slot < (SELECT max(slot) FROM task_runner_schedule_slots WHERE schedule = $1)",
                plus("-3600")
            ),
        }
    }
}
