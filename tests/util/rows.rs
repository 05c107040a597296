//! A request row in any state, inserted as an application, a user's SQL or
//! a crashed daemon would leave it, on any backend: instead of an `INSERT`
//! written out by hand in each test.

use taskrunner::request::RequestId;

use super::{quote, Backend, TestDb};

/// The database's clock `seconds` from now (before it when negative), in
/// the backend's SQL: timestamps a row is compared against by the daemon.
pub fn sql_now_plus(backend: Backend, seconds: i64) -> String {
    let (sign, seconds) = if seconds < 0 {
        ('-', -seconds)
    } else {
        ('+', seconds)
    };
    match backend {
        Backend::Sqlite => {
            format!("strftime('%Y-%m-%d %H:%M:%f', 'now', '{sign}{seconds} seconds')")
        }
        Backend::Postgres => format!("(now() {sign} interval '{seconds} seconds')"),
        Backend::MySql => format!("(UTC_TIMESTAMP(6) {sign} INTERVAL {seconds} SECOND)"),
    }
}

/// The database's clock `seconds` ago, in the backend's SQL.
pub fn sql_ago(backend: Backend, seconds: i64) -> String {
    sql_now_plus(backend, -seconds)
}

/// A request row to insert with [`TestDb::insert_row`]: the columns not set
/// take the table's defaults (a PENDING row, ready to run).
#[derive(Debug, Clone)]
pub struct NewRow {
    /// (column, SQL expression), in the order set; a column set twice keeps
    /// its last value.
    columns: Vec<(String, String)>,
}

impl NewRow {
    /// A row of task type `task`.
    pub fn new(task: &str) -> NewRow {
        NewRow {
            columns: vec![("task_class_name".to_string(), quote(task))],
        }
    }

    /// Sets `column` to a SQL expression, as it is.
    pub fn sql(mut self, column: &str, expression: impl Into<String>) -> NewRow {
        let expression = expression.into();
        match self.columns.iter_mut().find(|(name, _)| name == column) {
            Some((_, value)) => *value = expression,
            None => self.columns.push((column.to_string(), expression)),
        }
        self
    }

    /// Sets `column` to a text value (quoted here).
    pub fn text(self, column: &str, value: &str) -> NewRow {
        self.sql(column, quote(value))
    }

    /// Sets `column` to a number.
    pub fn number(self, column: &str, value: i64) -> NewRow {
        self.sql(column, value.to_string())
    }

    /// The options (YAML text).
    pub fn options(self, yaml: &str) -> NewRow {
        self.text("options", yaml)
    }

    pub fn try_limit(self, limit: i64) -> NewRow {
        self.number("try_limit", limit)
    }

    pub fn queue(self, queue: &str) -> NewRow {
        self.text("queue", queue)
    }

    pub fn priority(self, priority: i64) -> NewRow {
        self.number("priority", priority)
    }

    pub fn unique_key(self, key: &str) -> NewRow {
        self.text("unique_key", key)
    }

    /// Runs only on the daemon of this node name.
    pub fn node(self, node: &str) -> NewRow {
        self.text("node", node)
    }

    /// Runs anywhere but on this node name.
    pub fn not_node(self, node: &str) -> NewRow {
        self.text("not_node", node)
    }

    /// Runs again every `seconds` after each try.
    pub fn period(self, seconds: i64) -> NewRow {
        self.number("period", seconds)
    }

    /// A member of batch `batch`.
    pub fn batch(self, batch: i64) -> NewRow {
        self.number("batch_id", batch)
    }

    /// The callback task to enqueue when the row finishes.
    pub fn on_success(self, task: &str) -> NewRow {
        self.text("on_success", task)
    }

    /// The callback task to enqueue when the row fails for good.
    pub fn on_failure(self, task: &str) -> NewRow {
        self.text("on_failure", task)
    }

    /// A callback, caused by the outcome of request `parent`.
    pub fn callback_of(self, parent: RequestId) -> NewRow {
        self.number("callback_of", parent.0)
    }

    /// A batch's callback, caused by the end of batch `batch`.
    pub fn callback_of_batch(self, batch: i64) -> NewRow {
        self.number("callback_of_batch", batch)
    }

    /// The host shown as running (or having run) the row.
    pub fn host(self, host: &str) -> NewRow {
        self.text("host", host)
    }

    /// Sets `result` (RUNNING, FAILED, …) alone, without the columns that
    /// go with it.
    pub fn result(self, result: &str) -> NewRow {
        self.text("result", result)
    }

    pub fn result_text(self, text: &str) -> NewRow {
        self.text("result_text", text)
    }

    pub fn tries(self, tries: i64) -> NewRow {
        self.number("tries", tries)
    }

    /// Delayed until a time written as text (`2099-01-02 03:04:05`).
    pub fn delay_until(self, at: &str) -> NewRow {
        self.text("delay_until", at)
    }

    /// Created `seconds` ago on the database's clock.
    pub fn created_ago(self, backend: Backend, seconds: i64) -> NewRow {
        self.sql("created_at", sql_ago(backend, seconds))
    }

    /// Delayed until `seconds` from now on the database's clock.
    pub fn delayed(self, backend: Backend, seconds: i64) -> NewRow {
        self.sql("delay_until", sql_now_plus(backend, seconds))
    }

    /// Ended in `result` (FINISHED, FAILED, …) `seconds` ago, after `tries` tries.
    pub fn ended(self, backend: Backend, result: &str, tries: i64, seconds: i64) -> NewRow {
        self.text("result", result)
            .number("tries", tries)
            .sql("completed_at", sql_ago(backend, seconds))
    }

    /// Failed with no try left (`tries` = `try_limit`), `seconds` ago.
    pub fn exhausted(self, backend: Backend, try_limit: i64, seconds: i64) -> NewRow {
        self.try_limit(try_limit)
            .ended(backend, "FAILED", try_limit, seconds)
    }

    /// RUNNING on `host` under the claim `claimed_by`/`claim_token`, as
    /// pid `pid`, started and last renewed `seconds` ago: a stale lease when
    /// that is longer than the daemons' `lease_timeout`, the row of a
    /// crashed daemon when `pid` is gone.
    pub fn running(
        self,
        backend: Backend,
        host: &str,
        claimed_by: &str,
        claim_token: &str,
        pid: i64,
        seconds: i64,
    ) -> NewRow {
        self.running_unclaimed(backend, host, pid, seconds)
            .text("claim_token", claim_token)
            .text("claimed_by", claimed_by)
    }

    /// RUNNING on `host` as pid `pid`, started and last renewed `seconds`
    /// ago, in its first try, with no claim recorded: a row written by hand
    /// (or by a version that recorded none).
    pub fn running_unclaimed(self, backend: Backend, host: &str, pid: i64, seconds: i64) -> NewRow {
        let at = sql_ago(backend, seconds);
        self.text("result", "RUNNING")
            .number("pid", pid)
            .text("host", host)
            .sql("started_at", at.clone())
            .sql("heartbeat_at", at)
            .number("tries", 1)
    }

    fn names(&self) -> String {
        let names: Vec<&str> = self.columns.iter().map(|(name, _)| name.as_str()).collect();
        names.join(", ")
    }

    fn values(&self) -> String {
        let values: Vec<&str> = self
            .columns
            .iter()
            .map(|(_, value)| value.as_str())
            .collect();
        values.join(", ")
    }

    /// The `INSERT … RETURNING id` statement.
    pub fn insert_sql(&self) -> String {
        format!(
            "INSERT INTO task_runner_requests ({}) VALUES ({}) RETURNING id",
            self.names(),
            self.values()
        )
    }
}

impl TestDb {
    /// Inserts `row` as an application would, and returns its id.
    pub async fn insert_row(&self, row: NewRow) -> RequestId {
        self.insert(&row.insert_sql()).await
    }

    /// Inserts `rows` (each setting the same columns) in one statement, as
    /// an application inserting several at once: they appear together.
    pub async fn insert_rows(&self, rows: impl IntoIterator<Item = NewRow>) {
        let rows: Vec<NewRow> = rows.into_iter().collect();
        let Some(first) = rows.first() else {
            return;
        };
        let names = first.names();
        let values: Vec<String> = rows
            .iter()
            .map(|row| {
                assert_eq!(
                    row.names(),
                    names,
                    "rows inserted together set the same columns"
                );
                format!("({})", row.values())
            })
            .collect();
        self.execute(&format!(
            "INSERT INTO task_runner_requests ({names}) VALUES {}",
            values.join(", ")
        ))
        .await;
    }

    /// Inserts `count` copies of `row` in one statement, numbered 1 to
    /// `count` in insertion order: a column set with [`NewRow::sql`] may
    /// use the number as `i` (`'member: ' || i`).
    pub async fn insert_copies(&self, row: NewRow, count: usize) {
        self.execute(&format!(
            "INSERT INTO task_runner_requests ({}) SELECT {} FROM {}",
            row.names(),
            row.values(),
            super::series(self.backend, count)
        ))
        .await;
    }
}
