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
        let at = sql_ago(backend, seconds);
        self.text("result", "RUNNING")
            .number("pid", pid)
            .text("host", host)
            .sql("started_at", at.clone())
            .sql("heartbeat_at", at)
            .number("tries", 1)
            .text("claim_token", claim_token)
            .text("claimed_by", claimed_by)
    }

    /// The `INSERT … RETURNING id` statement.
    pub fn insert_sql(&self) -> String {
        let names: Vec<&str> = self.columns.iter().map(|(name, _)| name.as_str()).collect();
        let values: Vec<&str> = self
            .columns
            .iter()
            .map(|(_, value)| value.as_str())
            .collect();
        format!(
            "INSERT INTO task_runner_requests ({}) VALUES ({}) RETURNING id",
            names.join(", "),
            values.join(", ")
        )
    }
}

impl TestDb {
    /// Inserts `row` as an application would, and returns its id.
    pub async fn insert_row(&self, row: NewRow) -> RequestId {
        self.insert(&row.insert_sql()).await
    }
}
