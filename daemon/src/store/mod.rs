//! Every query taskrunner runs, for SQLite, PostgreSQL and MariaDB/MySQL.
//! Callers see one [`Store`]; the statements themselves are in [`sql`], the
//! claim among them ([`mysql`] for what MySQL's dialect needs besides).
//!
//! Architecture invariant: every write about a try (pid, heartbeat, progress,
//! outcome) is fenced by the claim token written when the row was claimed, and
//! applies only while the row is still `RUNNING` under that token. A daemon
//! that lost its claim (reaped after a partition, say) cannot overwrite a
//! later try: its write matches no row, and the caller is told so.

pub mod diagnose;
pub mod mysql;
mod repair;
pub mod sql;
pub mod url;

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{query, Row};

use crate::request::{Claimed, Request, RequestId, State};
use sql::Sql;

/// The column default of `try_limit`, used when `enqueue` is given none.
pub const DEFAULT_TRY_LIMIT: i64 = 5;

/// Name of taskrunner's own migration bookkeeping table (never `_sqlx_migrations`,
/// which may belong to the application sharing the database).
const MIGRATIONS_TABLE: &str = "task_runner_schema_migrations";

/// The daemon's writer connection checkpoints only once the log is this many
/// pages long (SQLite's default is 1,000), which it reaches only if the
/// daemon's checkpointer falls behind.
pub const WRITER_AUTOCHECKPOINT: u32 = 16_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// MariaDB ≥ 10.6 or MySQL ≥ 8.0.1 (`mysql://`, `mariadb://`).
    MySql,
}

/// What [`Store::migrate`] did: schema versions before (None: no schema) and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub before: Option<i64>,
    pub after: i64,
    /// What was repaired first (tables loaded from a Rails schema.rb).
    pub repaired: Option<String>,
}

impl std::fmt::Display for Migration {
    /// "created (version 3)", "upgraded from version 2 to 3", "up to date (version 3)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(repaired) = &self.repaired {
            return write!(f, "{repaired} (version {})", self.after);
        }
        match self.before {
            None => write!(f, "created (version {})", self.after),
            Some(before) if before < self.after => {
                write!(f, "upgraded from version {before} to {}", self.after)
            }
            Some(_) => write!(f, "up to date (version {})", self.after),
        }
    }
}

/// Who opens the store: only the daemon and `migrate` may create a SQLite file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Daemon,
    Migrate,
    Cli,
}

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    MySql(MySqlPool),
}

/// A connection pool to the request table, and the statements for its dialect.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    sql: &'static Sql,
    /// The database URL with any password hidden, for messages.
    pub display_url: String,
    /// Statements sent by the daemon's own work (claims, writes about tries,
    /// heartbeats, reaping, delay look-ups; BEGIN and COMMIT count), for
    /// `status` and the benchmark: each is one database round trip.
    statements: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The config's `on_exhausted:` hooks, applied by every finalization
    /// (set by the daemon at start and on reload, and by the CLI).
    hooks: std::sync::Arc<std::sync::RwLock<std::sync::Arc<Hooks>>>,
    /// Claims leave out options longer than this (`max_options`).
    max_options: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// MariaDB/MySQL: transactions run again after a deadlock or a
    /// lock-wait timeout (see [`mysql::retry_locks`]), for `status`.
    lock_retries: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Runs `$body` with `$pool` bound to the backend's own pool type. The body is
/// compiled once per backend, so sqlx sees concrete types in each arm. In
/// the MySQL arm `query` is [`mysql::query`], which binds `$N` parameters
/// by number as the other two do.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
            Pool::MySql($pool) => {
                #[allow(unused_imports)]
                use $crate::store::mysql::query;
                $body
            }
        }
    };
    // A statement that takes another shape on MySQL (see `mysql.rs`).
    ($store:expr, $pool:ident => $body:expr, mysql $mysql:ident => $mysql_body:expr) => {
        match &$store.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
            Pool::MySql($mysql) => $mysql_body,
        }
    };
}

/// Binds `$1..$14` of [`Sql::enqueue`] and [`Sql::enqueue_unique`] (a
/// macro, so that it serves sqlx's queries and MySQL's alike).
macro_rules! bind_new_request {
    ($query:expr, $request:expr, $unique_key:expr $(,)?) => {{
        let request: &NewRequest = $request;
        let unique_key: Option<&str> = $unique_key;
        $query
            .bind(request.task_class_name.as_str())
            .bind(request.options.as_deref())
            .bind(request.try_limit.unwrap_or(DEFAULT_TRY_LIMIT))
            .bind(request.delay_seconds)
            .bind(request.at.as_deref())
            .bind(request.priority)
            .bind(unique_key)
            .bind(request.queue.as_deref())
            .bind(request.node.as_deref())
            .bind(request.not_node.as_deref())
            .bind(request.period)
            .bind(request.batch_id)
            .bind(request.on_success.as_deref())
            .bind(request.on_failure.as_deref())
    }};
}

/// The one-row statement for a write (SQLite and MySQL, and progress
/// everywhere); `query` is the backend's (see `on_pool!`).
macro_rules! single_write_query {
    ($sql:expr, $write:expr) => {{
        let sql: &'static Sql = $sql;
        match $write {
            Write::Pid {
                id,
                claim_token,
                pid,
                boot_id,
                start_ticks,
            } => query(sql.record_pid.as_str())
                .bind(*pid)
                .bind(boot_id.as_str())
                .bind(*start_ticks)
                .bind(id.0)
                .bind(claim_token.as_str()),
            Write::Progress {
                id,
                claim_token,
                text,
            } => query(sql.record_progress.as_str())
                .bind(text.as_str())
                .bind(id.0)
                .bind(claim_token.as_str()),
            Write::Outcome(outcome) => query(sql.record_outcome.as_str())
                .bind(outcome.state.as_str())
                .bind(outcome.result_text.as_str())
                .bind(i64::from(outcome.give_back_try))
                .bind(outcome.retry_after)
                .bind(outcome.id.0)
                .bind(outcome.claim_token.as_str()),
        }
    }};
}

pub mod compose;
pub mod daemons;
pub mod flow;
pub mod web;

pub use compose::{Batch, BatchChange, Counts, Ending, Hooks, NewBatch};
pub use flow::{Flow, FlowBoard, FlowChange, StepBoard, StepRow};

/// The database's schema is not the one this binary was built for
/// (`--no-migrate`): retrying cannot fix it.
#[derive(Debug)]
pub struct SchemaMismatch(pub String);

impl std::fmt::Display for SchemaMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SchemaMismatch {}

/// One write about a try, fenced by its claim token.
#[derive(Debug, Clone)]
pub enum Write {
    /// The process was spawned: pid and the identity the reaper checks.
    Pid {
        id: RequestId,
        claim_token: String,
        pid: i64,
        boot_id: String,
        start_ticks: i64,
    },
    Progress {
        id: RequestId,
        claim_token: String,
        text: String,
    },
    Outcome(Outcome),
}

impl Write {
    pub fn id(&self) -> RequestId {
        match self {
            Write::Pid { id, .. } | Write::Progress { id, .. } => *id,
            Write::Outcome(outcome) => outcome.id,
        }
    }

    /// The claim the write is fenced by.
    pub fn claim_token(&self) -> &str {
        match self {
            Write::Pid { claim_token, .. } | Write::Progress { claim_token, .. } => claim_token,
            Write::Outcome(outcome) => &outcome.claim_token,
        }
    }
}

/// How a try ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: RequestId,
    pub claim_token: String,
    pub state: State,
    pub result_text: String,
    /// Seconds until the row may run again; `None` clears `delay_until`.
    pub retry_after: Option<f64>,
    /// The try does not count (INTERRUPTED): `tries` goes back down by one.
    pub give_back_try: bool,
    /// This outcome may end the request with follow-ups (its batch, its
    /// callbacks, `on_exhausted`, its next periodic occurrence): it is
    /// written by [`Store::finalize`], in a transaction of its own, rather
    /// than in the recorder's one-statement batch.
    pub composed: bool,
}

/// For each write, whether an outcome of the same claim comes before it.
fn writes_after_their_outcome(writes: &[Write]) -> Vec<bool> {
    let mut ended: HashSet<(RequestId, &str)> = HashSet::new();
    writes
        .iter()
        .map(|write| {
            let claim = (write.id(), write.claim_token());
            let late = ended.contains(&claim);
            if matches!(write, Write::Outcome(_)) {
                ended.insert(claim);
            }
            late
        })
        .collect()
}

/// A RUNNING row of this host, as the reaper probes it.
#[derive(Debug, Clone)]
pub struct RunningRow {
    pub id: RequestId,
    pub pid: i64,
    pub boot_id: Option<String>,
    pub start_ticks: Option<i64>,
    /// `started_at` as seconds since the epoch.
    pub started_at: Option<f64>,
    pub claim_token: Option<String>,
    pub claimed_by: String,
}

/// A RUNNING row whose heartbeat is older than the lease.
#[derive(Debug, Clone)]
pub struct LapsedRow {
    pub id: RequestId,
    pub host: String,
    pub claim_token: Option<String>,
    pub heartbeat_at: Option<String>,
}

/// A heartbeat renewal: a row this daemon still holds.
#[derive(Debug, Clone)]
pub struct Held {
    pub id: RequestId,
    pub claim_token: String,
    pub cancel_requested: bool,
}

/// Which runnable rows a claim may take.
#[derive(Debug, Clone, Default)]
pub struct ClaimFilter<'a> {
    /// This daemon's node name: rows pinned elsewhere, or barred from here, are skipped.
    pub node: &'a str,
    /// Only this queue (`None`: any).
    pub queue: Option<&'a str>,
    /// Only this task type (`None`: any).
    pub task: Option<&'a str>,
    /// Task types to leave alone (those with a concurrency limit, claimed apart).
    pub excluded_tasks: &'a [String],
}

/// A request to insert.
#[derive(Debug, Clone, Default)]
pub struct NewRequest {
    pub task_class_name: String,
    pub options: Option<String>,
    pub try_limit: Option<i64>,
    pub delay_seconds: Option<f64>,
    /// An absolute time, RFC 3339 (`2026-11-24T07:00:00Z`).
    pub at: Option<String>,
    pub priority: i64,
    /// At most one pending or running request per key: while one exists,
    /// `enqueue` inserts nothing and returns its id.
    pub unique_key: Option<String>,
    /// None: the column default (`default`).
    pub queue: Option<String>,
    /// Run only on the daemon of this node name.
    pub node: Option<String>,
    /// Never run on the daemon of this node name.
    pub not_node: Option<String>,
    /// Seconds: when a try ends, the next occurrence is inserted this long after.
    pub period: Option<i64>,
    /// A member of this batch (refused if the batch is final).
    pub batch_id: Option<i64>,
    /// Task type run once when the request FINISHED.
    pub on_success: Option<String>,
    /// Task type run once when the request is exhausted or REJECTED.
    pub on_failure: Option<String>,
}

/// Which rows `list` shows.
#[derive(Debug, Clone, Copy)]
pub enum ListFilter {
    All,
    /// `result` IS NULL: never run.
    Pending,
    Result(State),
}

/// Which rows `list` (and `retry`/`cancel` with a filter) select.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// A `result`, or `pending`, `retrying`, `exhausted`; None for any.
    pub state: Option<String>,
    pub task: Option<String>,
    pub queue: Option<String>,
    pub host: Option<String>,
    /// Only this batch's members and its callback.
    pub batch: Option<i64>,
    /// Only this flow's step and revert rows.
    pub flow: Option<i64>,
    /// At most this many rows, newest first.
    pub limit: i64,
}

/// The answer to `retry` and `cancel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Done,
    /// A running row: cancel recorded `cancel_requested_at` for its daemon.
    Requested,
    NotFound,
    /// The row is in this state, which does not allow the change.
    Refused(Option<String>),
}

/// Reads columns leniently: a malformed row written by an application
/// (non-UTF-8 bytes, text in an integer column) must never fail a whole claim.
trait RowExt {
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

fn claimed_from_row(row: &impl RowExt, claim_token: &str) -> sqlx::Result<(i64, Claimed)> {
    Ok((
        row.int(5)?,
        Claimed {
            id: RequestId(row.int(0)?),
            task_class_name: row.text(1)?,
            options: row.opt_bytes(2)?.unwrap_or_default(),
            tries: row.int(3)?,
            try_limit: row.int(4)?,
            claim_token: claim_token.to_string(),
            queue: row.text(6)?,
            periodic: row.int(7)? > 0,
            waited: row.opt_float(8)?.unwrap_or(0.0),
            batch_id: row.opt_int(9)?,
            callback_of_batch: row.opt_int(10)?,
            has_callbacks: row.int(11)? > 0,
            options_length: row.int(12)?.max(0) as u64,
        },
    ))
}

fn request_from_row(row: &impl RowExt) -> sqlx::Result<Request> {
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

/// A SQLite connection of its own, beside the pool's one writer, for work
/// that must neither wait for the writer nor hold it up (the change check,
/// checkpoints). Opened when first needed, and again after an error.
pub struct SideConnection {
    options: Option<SqliteConnectOptions>,
    open: Option<sqlx::SqliteConnection>,
}

impl SideConnection {
    pub fn new(url: &str) -> SideConnection {
        SideConnection {
            options: SqliteConnectOptions::from_str(url).ok(),
            open: None,
        }
    }

    /// The connection, opened if need be; `None` while it cannot be.
    pub async fn get(&mut self) -> Option<&mut sqlx::SqliteConnection> {
        use sqlx::ConnectOptions;
        if self.open.is_none() {
            self.open = self.options.as_ref()?.connect().await.ok();
        }
        self.open.as_mut()
    }

    /// After an error: the next [`get`](Self::get) opens a new connection.
    pub fn failed(&mut self, error: &sqlx::Error) {
        tracing::debug!("SQLite side connection: {error}");
        self.open = None;
    }

    pub async fn close(self) {
        use sqlx::Connection;
        if let Some(open) = self.open {
            let _ = open.close().await;
        }
    }
}

impl Store {
    /// Opens a pool without connecting yet: the daemon starts, and retries,
    /// even while the database is unreachable.
    pub fn open(url: &str, purpose: Purpose) -> Result<Store> {
        let display_url = url::redact_url(url);
        let pool = if url.starts_with("sqlite:") {
            if let Some(path) = diagnose::sqlite_path(url) {
                diagnose::check_sqlite_access(&path, purpose)?;
            }
            let options = SqliteConnectOptions::from_str(url)
                .with_context(|| format!("invalid SQLite URL {display_url}"))?
                .create_if_missing(purpose != Purpose::Cli)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5));
            // The daemon checkpoints on a connection of its own (see daemon/checkpoint.rs).
            let options = if purpose == Purpose::Daemon {
                options.pragma("wal_autocheckpoint", WRITER_AUTOCHECKPOINT.to_string())
            } else {
                options
            };
            // One connection: SQLite has one writer at a time anyway, and a
            // single connection keeps every claim a plain `UPDATE … RETURNING`
            // that takes the write lock up front (no BUSY_SNAPSHOT upgrades).
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(30))
                    .after_connect(|connection, _| {
                        Box::pin(async move { stable_query_plans(connection).await })
                    })
                    .connect_lazy_with(options),
            )
        } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            let url = url.replacen("mariadb:", "mysql:", 1);
            let options = MySqlConnectOptions::from_str(&url)
                .with_context(|| format!("invalid MySQL URL {display_url}"))?
                // Case-sensitive comparisons everywhere, as on the other two:
                // `noop` is not `NoOp`.
                .charset("utf8mb4")
                .collation("utf8mb4_bin")
                .timezone(Some("+00:00".to_string()));
            Pool::MySql(
                MySqlPoolOptions::new()
                    .max_connections(if purpose == Purpose::Daemon { 4 } else { 2 })
                    .acquire_timeout(Duration::from_secs(5))
                    .after_connect(|connection, _| {
                        Box::pin(async move { mysql::configure_session(connection).await })
                    })
                    .connect_lazy_with(options),
            )
        } else {
            let options = PgConnectOptions::from_str(url)
                .with_context(|| format!("invalid PostgreSQL URL {display_url}"))?
                .application_name("taskrunner");
            Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(if purpose == Purpose::Daemon { 4 } else { 2 })
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_lazy_with(options),
            )
        };
        let sql: &'static Sql = match pool {
            Pool::Sqlite(_) => &sql::SQLITE,
            Pool::Postgres(_) => &sql::POSTGRES,
            Pool::MySql(_) => &sql::MYSQL,
        };
        Ok(Store {
            pool,
            sql,
            display_url,
            statements: Default::default(),
            hooks: Default::default(),
            // No cap until the daemon sets its `max_options`.
            max_options: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX)),
            lock_retries: Default::default(),
        })
    }

    /// Statements sent so far by the daemon's own work (see the field).
    pub fn statements_sent(&self) -> u64 {
        self.statements.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts `n` statements sent (round trips).
    pub fn count_statements(&self, n: u64) {
        self.statements
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
            Pool::MySql(_) => Backend::MySql,
        }
    }

    /// MariaDB/MySQL: transactions run again after a deadlock (1213) or a
    /// lock-wait timeout (1205) so far.
    pub fn lock_retries(&self) -> u64 {
        self.lock_retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The MariaDB/MySQL pool, for the wake-up check.
    pub fn mysql_pool(&self) -> Option<&MySqlPool> {
        match &self.pool {
            Pool::MySql(pool) => Some(pool),
            _ => None,
        }
    }

    /// The PostgreSQL pool, for LISTEN.
    pub fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.pool {
            Pool::Postgres(pool) => Some(pool),
            _ => None,
        }
    }

    /// The SQLite pool, for cheap change detection.
    pub fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.pool {
            Pool::Sqlite(pool) => Some(pool),
            _ => None,
        }
    }

    /// Creates or upgrades the schema. Safe to run from several daemons at
    /// once (sqlx takes an advisory lock on PostgreSQL; SQLite serialises
    /// writers). Returns the schema version before and after.
    pub async fn migrate(&self) -> Result<Migration> {
        let context = || format!("migrating the schema of {}", self.display_url);
        let before = self.schema_version().await;
        let mut migrator = self.migrator();
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        let repaired = self
            .repair_if_needed(&migrator)
            .await
            .with_context(context)?;
        match &self.pool {
            Pool::Sqlite(pool) => migrator.run(pool).await.with_context(context)?,
            Pool::Postgres(pool) => migrator.run(pool).await.with_context(context)?,
            Pool::MySql(pool) => migrator.run(pool).await.with_context(context)?,
        }
        let after = self.schema_version().await.unwrap_or(0);
        Ok(Migration {
            before: if repaired.is_some() { None } else { before },
            after,
            repaired,
        })
    }

    /// This backend's migrations (one version means the same schema on every backend).
    fn migrator(&self) -> sqlx::migrate::Migrator {
        match &self.pool {
            Pool::Sqlite(_) => sqlx::migrate!("../migrations/sqlite"),
            Pool::Postgres(_) => sqlx::migrate!("../migrations/postgres"),
            Pool::MySql(_) => sqlx::migrate!("../migrations/mysql"),
        }
    }

    /// The highest migration applied, or None before the first one.
    async fn schema_version(&self) -> Option<i64> {
        let statement = format!("SELECT max(version) FROM {MIGRATIONS_TABLE} WHERE success");
        let statement = sqlx::AssertSqlSafe(statement);
        on_pool!(self, pool => {
            sqlx::query_scalar::<_, Option<i64>>(statement).fetch_one(pool).await.ok()?
        })
    }

    /// PostgreSQL: the database must store UTF-8. With another server
    /// encoding (SQL_ASCII above all) a row holding bytes that are not UTF-8
    /// cannot be read, and would stop every claim; refused at start.
    /// MariaDB/MySQL: a server older than the minimum is refused at start,
    /// naming the version found and the one needed.
    pub async fn check_encoding(&self) -> Result<()> {
        if let Pool::MySql(pool) = &self.pool {
            let version: String = sqlx::query_scalar("SELECT VERSION()")
                .fetch_one(pool)
                .await
                .with_context(|| format!("reading the server version of {}", self.display_url))?;
            return match mysql::version_refusal(&version) {
                None => Ok(()),
                Some(refusal) => {
                    Err(SchemaMismatch(format!("{}: {refusal}", self.display_url)).into())
                }
            };
        }
        let Pool::Postgres(pool) = &self.pool else {
            return Ok(());
        };
        let encoding: String = sqlx::query_scalar("SHOW server_encoding")
            .fetch_one(pool)
            .await
            .with_context(|| format!("reading the server encoding of {}", self.display_url))?;
        if encoding.eq_ignore_ascii_case("UTF8") {
            return Ok(());
        }
        Err(SchemaMismatch(format!(
            "{} has server_encoding {encoding}: taskrunner needs UTF8 (a row that cannot be read as UTF-8 would stop every claim); create the database with ENCODING 'UTF8'",
            self.display_url
        ))
        .into())
    }

    /// With `--no-migrate`: compares the migrations applied to the database
    /// with this binary's. A schema that is missing, older or newer is a
    /// [`SchemaMismatch`] naming what differs; a database that cannot be
    /// reached is a plain error (retried).
    pub async fn check_schema(&self) -> Result<()> {
        self.check_encoding().await?;
        let migrator = self.migrator();
        let known: Vec<i64> = migrator
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .map(|m| m.version)
            .collect();
        let statement =
            format!("SELECT version FROM {MIGRATIONS_TABLE} WHERE success ORDER BY version");
        let applied: sqlx::Result<Vec<i64>> = on_pool!(self, pool => {
            sqlx::query_scalar(sqlx::AssertSqlSafe(statement)).fetch_all(pool).await
        });
        let applied = match applied {
            Ok(applied) => applied,
            Err(sqlx::Error::Database(error))
                if error.code().as_deref() == Some("42P01")
                    || error.code().as_deref() == Some("42S02")
                    || error.message().contains("no such table") =>
            {
                return Err(SchemaMismatch(format!(
                    "{} has no taskrunner schema (no table {MIGRATIONS_TABLE}): run `taskrunner-cli migrate`, or start without --no-migrate",
                    self.display_url
                ))
                .into());
            }
            Err(error) => {
                return Err(anyhow::Error::new(error).context(format!(
                    "reading the schema version of {}",
                    self.display_url
                )))
            }
        };
        let list = |versions: Vec<i64>| {
            versions
                .iter()
                .map(|v| format!("{v:04}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let missing: Vec<i64> = known
            .iter()
            .copied()
            .filter(|v| !applied.contains(v))
            .collect();
        let newer: Vec<i64> = applied
            .iter()
            .copied()
            .filter(|v| !known.contains(v))
            .collect();
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!(
                "is missing migration(s) {} that this taskrunnerd needs (run `taskrunner-cli migrate`, or start without --no-migrate)",
                list(missing)
            ));
        }
        if !newer.is_empty() {
            problems.push(format!(
                "has migration(s) {} newer than this taskrunnerd knows (upgrade taskrunnerd)",
                list(newer)
            ));
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(SchemaMismatch(format!(
            "the schema of {} {}",
            self.display_url,
            problems.join(", and ")
        ))
        .into())
    }

    /// Claims up to `limit` runnable rows of any queue and type, in one
    /// statement (see [`Sql::claim`]), returned in claim order.
    pub async fn claim(
        &self,
        host: &str,
        instance: &str,
        claim_token: &str,
        limit: usize,
    ) -> Result<Vec<Claimed>> {
        self.claim_filtered(
            host,
            instance,
            claim_token,
            limit,
            &ClaimFilter {
                node: host,
                ..Default::default()
            },
        )
        .await
    }

    /// Claims leave out options longer than `max_options` bytes (the row's
    /// try is then rejected without the value ever being read).
    pub fn set_max_options(&self, max_options: u64) {
        self.max_options
            .store(max_options, std::sync::atomic::Ordering::Relaxed);
    }

    fn options_cap(&self) -> i64 {
        self.max_options
            .load(std::sync::atomic::Ordering::Relaxed)
            .min(i64::MAX as u64) as i64
    }

    /// Claims up to `limit` runnable rows that pass `filter`, in one statement.
    pub async fn claim_filtered(
        &self,
        host: &str,
        instance: &str,
        claim_token: &str,
        limit: usize,
        filter: &ClaimFilter<'_>,
    ) -> Result<Vec<Claimed>> {
        self.count_statements(1);
        let excluded = serde_json::to_string(filter.excluded_tasks)?;
        if let Pool::MySql(pool) = &self.pool {
            let mut rows = self
                .claim_mysql(pool, (claim_token, instance, host), limit, filter, None)
                .await?;
            rows.sort_by_key(|(priority, claimed)| (-priority, claimed.id));
            return Ok(rows.into_iter().map(|(_, claimed)| claimed).collect());
        }
        let mut rows: Vec<(i64, Claimed)> = on_pool!(self, pool => {
            let query = query(self.sql.claim.as_str())
                .bind(claim_token)
                .bind(instance)
                .bind(host)
                .bind(limit as i64)
                .bind(filter.node)
                .bind(filter.queue.unwrap_or(""))
                .bind(filter.task.unwrap_or(""))
                .bind(excluded.as_str())
                .bind(self.options_cap());
            query.fetch_all(pool).await?
                .iter()
                .map(|row| claimed_from_row(row, claim_token))
                .collect::<sqlx::Result<_>>()?
        });
        // RETURNING has no order on PostgreSQL: restore priority, then id.
        rows.sort_by_key(|(priority, claimed)| (-priority, claimed.id));
        Ok(rows.into_iter().map(|(_, claimed)| claimed).collect())
    }

    /// Claims rows of `task`, a type with a concurrency limit across all
    /// daemons: under a lock per type (PostgreSQL advisory lock; SQLite's
    /// single writer), counts its running rows and claims at most the rest.
    pub async fn claim_limited(
        &self,
        host: &str,
        instance: &str,
        claim_token: &str,
        limit: usize,
        filter: &ClaimFilter<'_>,
        type_limit: u32,
    ) -> Result<Vec<Claimed>> {
        let task = filter.task.expect("claim_limited needs a task type");
        let sql = self.sql;
        if let Pool::MySql(pool) = &self.pool {
            let mut rows = self
                .claim_mysql(
                    pool,
                    (claim_token, instance, host),
                    limit,
                    filter,
                    Some(type_limit),
                )
                .await?;
            rows.sort_by_key(|(priority, claimed)| (-priority, claimed.id));
            return Ok(rows.into_iter().map(|(_, claimed)| claimed).collect());
        }
        let mut rows: Vec<(i64, Claimed)> = on_pool!(self, pool => {
            let mut transaction = begin_write(pool).await?;
            if let Some(lock) = &sql.lock_type {
                query(lock.as_str()).bind(task).execute(&mut *transaction).await?;
            }
            let running: i64 = {
                let rows = query(sql.running_of_type.as_str()).bind(task).fetch_all(&mut *transaction).await?;
                rows.first().map(|row| row.int(0)).transpose()?.unwrap_or(0)
            };
            let room = (i64::from(type_limit) - running).clamp(0, limit as i64);
            // BEGIN, the lock, the count, the claim, COMMIT.
            self.count_statements(2 + u64::from(sql.lock_type.is_some()) + 1 + u64::from(room > 0));
            let claimed = if room == 0 {
                Vec::new()
            } else {
                query(sql.claim.as_str())
                    .bind(claim_token)
                    .bind(instance)
                    .bind(host)
                    .bind(room)
                    .bind(filter.node)
                    .bind(filter.queue.unwrap_or(""))
                    .bind(task)
                    .bind("[]")
                    .bind(self.options_cap())
                    .fetch_all(&mut *transaction)
                    .await?
                    .iter()
                    .map(|row| claimed_from_row(row, claim_token))
                    .collect::<sqlx::Result<Vec<_>>>()?
            };
            transaction.commit().await?;
            claimed
        });
        rows.sort_by_key(|(priority, claimed)| (-priority, claimed.id));
        Ok(rows.into_iter().map(|(_, claimed)| claimed).collect())
    }

    /// Claims one given row if it is runnable (its delay ignored).
    pub async fn claim_one(
        &self,
        id: RequestId,
        host: &str,
        instance: &str,
        claim_token: &str,
    ) -> Result<Option<Claimed>> {
        if let Pool::MySql(pool) = &self.pool {
            return self
                .claim_one_mysql(pool, id.0, (claim_token, instance, host))
                .await;
        }
        let rows = on_pool!(self, pool => {
            let query = query(self.sql.claim_one.as_str())
                .bind(claim_token)
                .bind(instance)
                .bind(host)
                .bind(id.0)
                .bind(self.options_cap());
            query.fetch_all(pool).await?
                .iter()
                .map(|row| claimed_from_row(row, claim_token))
                .collect::<sqlx::Result<Vec<_>>>()?
        });
        Ok(rows.into_iter().next().map(|(_, claimed)| claimed))
    }

    /// Applies writes; for each, whether it still held its claim (false: the
    /// row was taken from this try, and nothing changed). Outcomes with
    /// follow-ups ([`Outcome::composed`]) each go through
    /// [`finalize`](Store::finalize), in a transaction of its own; the rest
    /// in one transaction (on PostgreSQL, pids and outcomes in one array
    /// statement each, so a batch costs a handful of round trips however many
    /// tries it records).
    ///
    /// Writes apply in the order given. A write queued after the outcome of
    /// its own claim (a give-back of a row whose outcome was still queued,
    /// say) would match nothing once that outcome applied; in one batch
    /// statement it could win instead, and finished work would run again.
    /// It is left out and reported not applied.
    pub async fn record(&self, writes: &[Write]) -> Result<Vec<bool>> {
        let late = writes_after_their_outcome(writes);
        if !late.iter().any(|late| *late) {
            return self.record_in_order(writes).await;
        }
        let kept: Vec<Write> = writes
            .iter()
            .zip(&late)
            .filter(|(_, late)| !**late)
            .map(|(write, _)| write.clone())
            .collect();
        let mut applied = self.record_in_order(&kept).await?.into_iter();
        Ok(late
            .iter()
            .map(|late| !late && applied.next().unwrap_or(false))
            .collect())
    }

    async fn record_in_order(&self, writes: &[Write]) -> Result<Vec<bool>> {
        let is_composed =
            |write: &Write| matches!(write, Write::Outcome(outcome) if outcome.composed);
        if !writes.iter().any(is_composed) {
            return self.record_plain(writes).await;
        }
        // In order: a write queued after an outcome (a give-back of the same
        // row, say) must not be applied before it.
        let mut applied = Vec::with_capacity(writes.len());
        let mut rest = writes;
        while !rest.is_empty() {
            let plain = rest.iter().take_while(|w| !is_composed(w)).count();
            if plain > 0 {
                applied.extend(self.record_plain(&rest[..plain]).await?);
                rest = &rest[plain..];
            } else if let Write::Outcome(outcome) = &rest[0] {
                applied.push(self.finalize(Ending::Outcome(outcome)).await?);
                rest = &rest[1..];
            }
        }
        Ok(applied)
    }

    /// Writes without follow-ups (see [`record`](Store::record)).
    async fn record_plain(&self, writes: &[Write]) -> Result<Vec<bool>> {
        let sql = self.sql;
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        if let Pool::MySql(_) = &self.pool {
            // No `UPDATE … FROM` and no `RETURNING`: one statement per write,
            // in one transaction, run again after a lock conflict.
            return mysql::retry_locks(&self.lock_retries, || self.record_each(writes)).await;
        }
        // One write alone needs no transaction: a single statement is atomic,
        // and BEGIN and COMMIT would triple its round trips.
        if let [write] = writes {
            self.count_statements(1);
            let took = on_pool!(self, pool => {
                single_write_query!(sql, write).execute(pool).await?.rows_affected() == 1
            });
            return Ok(vec![took]);
        }
        // Outcomes only (the common batch at high load): one statement,
        // atomic on its own.
        let outcomes: Option<Vec<&Outcome>> = writes
            .iter()
            .map(|write| match write {
                Write::Outcome(outcome) => Some(outcome),
                _ => None,
            })
            .collect();
        if let Some(outcomes) = outcomes {
            let applied = self.record_outcomes(&outcomes).await?;
            return Ok(outcomes.iter().map(|o| applied.contains(&o.id.0)).collect());
        }
        if let (Pool::Postgres(pool), Some(pids_sql)) = (&self.pool, &self.sql.record_pids_batch) {
            // BEGIN, one statement per kind of write (progress: one each), COMMIT.
            let progress = writes
                .iter()
                .filter(|w| matches!(w, Write::Progress { .. }))
                .count();
            self.count_statements(4 + progress as u64);
            return record_postgres_batch(pool, self.sql, pids_sql, writes).await;
        }
        self.record_each(writes).await
    }

    /// One statement per write, in one transaction (one alone: without).
    async fn record_each(&self, writes: &[Write]) -> Result<Vec<bool>> {
        let sql = self.sql;
        if let [write] = writes {
            self.count_statements(1);
            let took = on_pool!(self, pool => {
                single_write_query!(sql, write).execute(pool).await?.rows_affected() == 1
            });
            return Ok(vec![took]);
        }
        let mut applied = Vec::with_capacity(writes.len());
        on_pool!(self, pool => {
            let mut transaction = begin_write(pool).await?;
            self.count_statements(2 + writes.len() as u64);
            for write in writes {
                let query = single_write_query!(sql, write);
                applied.push(query.execute(&mut *transaction).await?.rows_affected() == 1);
            }
            transaction.commit().await?;
        });
        Ok(applied)
    }

    /// Records outcomes without follow-ups in one statement; returns the ids
    /// it applied to.
    async fn record_outcomes(&self, outcomes: &[&Outcome]) -> Result<HashSet<i64>> {
        self.count_statements(1);
        let statement = self.sql.record_outcomes_batch.as_str();
        let rows = match &self.pool {
            Pool::Postgres(pool) => bind_outcome_arrays(query(statement), outcomes)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| row.int(0))
                .collect::<sqlx::Result<_>>()?,
            Pool::Sqlite(pool) => {
                let rows: Vec<serde_json::Value> = outcomes
                    .iter()
                    .map(|o| {
                        serde_json::json!([
                            o.id.0,
                            o.claim_token,
                            o.state.as_str(),
                            o.result_text,
                            i64::from(o.give_back_try),
                            o.retry_after
                        ])
                    })
                    .collect();
                query(statement)
                    .bind(serde_json::Value::Array(rows).to_string())
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|row| row.int(0))
                    .collect::<sqlx::Result<_>>()?
            }
            // `record_plain` writes them one by one there.
            Pool::MySql(_) => {
                anyhow::bail!("outcome batches are not written in one statement on MySQL")
            }
        };
        Ok(rows)
    }

    /// Renews `heartbeat_at` on every row `instance` holds (one statement),
    /// then reads which rows it still holds and which a user asked to cancel.
    pub async fn renew_heartbeats(&self, instance: &str) -> Result<Vec<Held>> {
        if let Pool::MySql(_) = &self.pool {
            return mysql::retry_locks(&self.lock_retries, || self.renew_heartbeats_once(instance))
                .await;
        }
        self.renew_heartbeats_once(instance).await
    }

    async fn renew_heartbeats_once(&self, instance: &str) -> Result<Vec<Held>> {
        self.count_statements(2);
        Ok(on_pool!(self, pool => {
            query(self.sql.renew_heartbeats.as_str()).bind(instance).execute(pool).await?;
            let query = query(self.sql.held_by.as_str()).bind(instance);
            query.fetch_all(pool).await?
                .iter()
                .map(|row| Ok(Held {
                    id: RequestId(row.int(0)?),
                    claim_token: row.text(1)?,
                    cancel_requested: row.int(2)? != 0,
                }))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// RUNNING rows of `host` with a pid, except those held by `exclude_instance`.
    pub async fn running_on_host(
        &self,
        host: &str,
        exclude_instance: &str,
    ) -> Result<Vec<RunningRow>> {
        self.count_statements(1);
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.running_on_host.as_str())
                .bind(host)
                .bind(exclude_instance);
            query.fetch_all(pool).await?
                .iter()
                .map(|row| Ok(RunningRow {
                    id: RequestId(row.int(0)?),
                    pid: row.int(1)?,
                    boot_id: row.opt_text(2)?,
                    start_ticks: row.opt_int(3)?,
                    started_at: row.opt_float(4)?,
                    claim_token: row.opt_text(5)?,
                    claimed_by: row.text(6)?,
                }))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// RUNNING rows of `host` without a pid, except those held by
    /// `exclude_instance`: (id, claim token, claimed_by).
    pub async fn unstarted_on_host(
        &self,
        host: &str,
        exclude_instance: &str,
    ) -> Result<Vec<(RequestId, Option<String>, String)>> {
        self.count_statements(1);
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.unstarted_on_host.as_str())
                .bind(host)
                .bind(exclude_instance);
            query.fetch_all(pool).await?
                .iter()
                .map(|row| Ok((RequestId(row.int(0)?), row.opt_text(1)?, row.text(2)?)))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// RUNNING rows (any host) whose heartbeat is older than `lease`.
    pub async fn lapsed_leases(
        &self,
        lease: Duration,
        exclude_instance: &str,
    ) -> Result<Vec<LapsedRow>> {
        self.count_statements(1);
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.lapsed_leases.as_str())
                .bind(lease.as_secs_f64())
                .bind(exclude_instance);
            query.fetch_all(pool).await?
                .iter()
                .map(|row| Ok(LapsedRow {
                    id: RequestId(row.int(0)?),
                    host: row.text(1)?,
                    claim_token: row.opt_text(2)?,
                    heartbeat_at: row.opt_text(3)?,
                }))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// Marks a row CRASHED if it still carries the claim token read before;
    /// it runs again at once (its try counts), or, with no tries left, is
    /// exhausted: written by [`finalize`](Store::finalize) with what that causes.
    pub async fn mark_crashed(
        &self,
        id: RequestId,
        claim_token: Option<&str>,
        reason: &str,
    ) -> Result<bool> {
        self.finalize(Ending::Crashed {
            id,
            claim_token,
            reason,
        })
        .await
    }

    /// Seconds until the earliest delayed runnable row is due, if any.
    pub async fn seconds_until_next_delay(&self) -> Result<Option<f64>> {
        self.count_statements(1);
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.next_delay.as_str());
            match query.fetch_all(pool).await?.first() {
                Some(row) => row.opt_float(0)?,
                None => None,
            }
        }))
    }

    pub async fn enqueue(&self, request: &NewRequest) -> Result<RequestId> {
        if let Some(unique_key) = &request.unique_key {
            return self.enqueue_unique(request, unique_key).await;
        }
        let id = on_pool!(self, pool => {
            let query = bind_new_request!(query(self.sql.enqueue.as_str()), request, None);
            query.fetch_all(pool).await?[0].int(0)?
        }, mysql pool => {
            let query = bind_new_request!(mysql::query(self.sql.enqueue.as_str()), request, None);
            query.execute(pool).await?.last_insert_id() as i64
        });
        Ok(RequestId(id))
    }

    pub async fn show(&self, id: RequestId) -> Result<Option<Request>> {
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.show.as_str()).bind(id.0);
            match query.fetch_all(pool).await?.first() {
                Some(row) => Some(request_from_row(row)?),
                None => None,
            }
        }))
    }

    pub async fn list(&self, filter: ListFilter, limit: i64) -> Result<Vec<Request>> {
        let sql = self.sql;
        Ok(on_pool!(self, pool => {
            let query = match filter {
                ListFilter::All => query(sql.list_all.as_str()).bind(limit),
                ListFilter::Pending => query(sql.list_pending.as_str()).bind(limit),
                ListFilter::Result(state) => query(sql.list_by_result.as_str())
                    .bind(limit)
                    .bind(state.as_str()),
            };
            query.fetch_all(pool).await?
                .iter()
                .map(request_from_row)
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// The rows `query` selects, newest first.
    pub async fn list_where(&self, list: &ListQuery) -> Result<Vec<Request>> {
        let text = |value: &Option<String>| value.clone().unwrap_or_default();
        Ok(on_pool!(self, pool => {
            query(self.sql.list_where.as_str())
                .bind(list.limit)
                .bind(text(&list.task))
                .bind(text(&list.queue))
                .bind(text(&list.host))
                .bind(text(&list.state))
                .bind(list.batch.unwrap_or(0))
                .bind(list.flow.unwrap_or(0))
                .fetch_all(pool)
                .await?
                .iter()
                .map(request_from_row)
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// Makes a row runnable again (`retry`); refused while it runs. A
    /// member's batch is recounted (a batch that already ended stays ended:
    /// its callback is not made again).
    pub async fn retry(&self, id: RequestId) -> Result<Change> {
        if self.execute_by_id(self.sql.retry.as_str(), id).await? {
            if let Some(batch_id) = self.show(id).await?.and_then(|row| row.batch_id) {
                self.recount_batch(batch_id).await?;
            }
            return Ok(Change::Done);
        }
        self.explain_refusal(id).await
    }

    /// Cancels a pending row at once (through [`finalize`](Store::finalize):
    /// its batch counts it), or asks the daemon running it to stop it.
    pub async fn cancel(&self, id: RequestId) -> Result<Change> {
        if self.finalize(Ending::Cancelled(id)).await? {
            return Ok(Change::Done);
        }
        if self
            .execute_by_id(self.sql.cancel_running.as_str(), id)
            .await?
        {
            return Ok(Change::Requested);
        }
        self.explain_refusal(id).await
    }

    /// Deletes final and exhausted rows completed more than `older_than` ago,
    /// in batches of `batch` rows so that claims never wait long.
    pub async fn purge(&self, older_than: Duration, batch: i64) -> Result<u64> {
        let mut total = 0;
        loop {
            let deleted = on_pool!(self, pool => {
                let query = query(self.sql.purge.as_str())
                    .bind(older_than.as_secs_f64())
                    .bind(batch);
                query.execute(pool).await?.rows_affected()
            });
            total += deleted;
            if deleted < batch as u64 {
                return Ok(total);
            }
        }
    }

    async fn execute_by_id(&self, statement: &'static str, id: RequestId) -> Result<bool> {
        Ok(on_pool!(self, pool => {
            let query = query(statement).bind(id.0);
            query.execute(pool).await?.rows_affected() == 1
        }))
    }

    async fn explain_refusal(&self, id: RequestId) -> Result<Change> {
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.state_of.as_str()).bind(id.0);
            match query.fetch_all(pool).await?.first() {
                Some(row) => Change::Refused(row.opt_text(0)?),
                None => Change::NotFound,
            }
        }))
    }

    /// How many rows are in each state (`PENDING`: never run).
    pub async fn count_by_result(&self) -> Result<Vec<(String, i64)>> {
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.count_by_result.as_str());
            query.fetch_all(pool).await?
                .iter()
                .map(|row| Ok((row.text(0)?, row.int(1)?)))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }
}

/// Binds the columns of `outcomes` as arrays, in the order of the
/// PostgreSQL batch statement's `unnest()`.
fn bind_outcome_arrays<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    outcomes: &[&'q Outcome],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    fn column<'a, T>(outcomes: &[&'a Outcome], field: impl Fn(&'a Outcome) -> T) -> Vec<T> {
        outcomes.iter().map(|outcome| field(outcome)).collect()
    }
    query
        .bind(column(outcomes, |o| o.id.0))
        .bind(column(outcomes, |o| o.claim_token.as_str()))
        .bind(column(outcomes, |o| o.state.as_str()))
        .bind(column(outcomes, |o| o.result_text.as_str()))
        .bind(column(outcomes, |o| i64::from(o.give_back_try)))
        .bind(column(outcomes, |o| o.retry_after))
}

async fn record_postgres_batch(
    pool: &PgPool,
    sql: &'static Sql,
    pids_sql: &'static str,
    writes: &[Write],
) -> Result<Vec<bool>> {
    let mut transaction = pool.begin().await?;
    let (mut ids, mut tokens, mut pids, mut boots, mut ticks) =
        (vec![], vec![], vec![], vec![], vec![]);
    for write in writes {
        if let Write::Pid {
            id,
            claim_token,
            pid,
            boot_id,
            start_ticks,
        } = write
        {
            ids.push(id.0);
            tokens.push(claim_token.as_str());
            pids.push(*pid);
            boots.push(boot_id.as_str());
            ticks.push(*start_ticks);
        }
    }
    let mut pids_applied = HashSet::new();
    if !ids.is_empty() {
        let rows = query(pids_sql)
            .bind(&ids)
            .bind(&tokens)
            .bind(&pids)
            .bind(&boots)
            .bind(&ticks)
            .fetch_all(&mut *transaction)
            .await?;
        for row in &rows {
            pids_applied.insert(row.int(0)?);
        }
    }
    let mut progress_applied = HashSet::new();
    for write in writes {
        if let Write::Progress { id, .. } = write {
            if single_write_query!(sql, write)
                .execute(&mut *transaction)
                .await?
                .rows_affected()
                == 1
            {
                progress_applied.insert(id.0);
            }
        }
    }
    let outcomes: Vec<&Outcome> = writes
        .iter()
        .filter_map(|w| match w {
            Write::Outcome(outcome) => Some(outcome),
            _ => None,
        })
        .collect();
    let mut outcomes_applied = HashSet::new();
    if !outcomes.is_empty() {
        let rows = bind_outcome_arrays(query(sql.record_outcomes_batch.as_str()), &outcomes)
            .fetch_all(&mut *transaction)
            .await?;
        for row in &rows {
            outcomes_applied.insert(row.int(0)?);
        }
    }
    transaction.commit().await?;
    Ok(writes
        .iter()
        .map(|write| match write {
            Write::Pid { id, .. } => pids_applied.contains(&id.0),
            Write::Progress { id, .. } => progress_applied.contains(&id.0),
            Write::Outcome(outcome) => outcomes_applied.contains(&outcome.id.0),
        })
        .collect())
}

/// Turns on SQLite's query planner stability guarantee for a connection.
///
/// Without it SQLite re-prepares a statement on its next step whenever a
/// bound value the planner looked at has changed: the claim's `LIMIT $4`, and
/// parameters compared with the partial indexes' predicates. That re-parsing
/// was half of the SQLite thread's CPU time per task (profiled while draining
/// NoOp rows). Our statements are written for one plan (the partial indexes),
/// so a plan that ignores bound values is the right one.
async fn stable_query_plans(connection: &mut sqlx::SqliteConnection) -> sqlx::Result<()> {
    let mut handle = connection.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    // SAFETY: a valid connection handle, held locked for the call; the
    // option takes an int and a nullable int pointer.
    let code = unsafe {
        libsqlite3_sys::sqlite3_db_config(
            db,
            libsqlite3_sys::SQLITE_DBCONFIG_ENABLE_QPSG,
            1 as libc::c_int,
            std::ptr::null_mut::<libc::c_int>(),
        )
    };
    if code != libsqlite3_sys::SQLITE_OK {
        return Err(sqlx::Error::Protocol(format!(
            "SQLite refused the query planner stability setting (code {code})"
        )));
    }
    Ok(())
}

/// Starts a write transaction. On SQLite `BEGIN IMMEDIATE` takes the write
/// lock up front, so busy_timeout applies and no snapshot upgrade can fail.
async fn begin_write<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> sqlx::Result<sqlx::Transaction<'static, DB>> {
    if DB::NAME == "SQLite" {
        pool.begin_with("BEGIN IMMEDIATE").await
    } else {
        pool.begin().await
    }
}

// ---- Issue 7: unique requests, retention, cron schedules ----

/// A kind of final row that retention may delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prunable {
    Finished,
    Cancelled,
    Rejected,
    /// FAILED, CRASHED or TIMEOUT with no tries left.
    Exhausted,
}

impl Prunable {
    /// Its key under `retention:` in the config.
    pub fn config_key(self) -> &'static str {
        match self {
            Prunable::Finished => "finished",
            Prunable::Cancelled => "cancelled",
            Prunable::Rejected => "rejected",
            Prunable::Exhausted => "exhausted",
        }
    }
}

impl Store {
    /// Inserts a request with a unique key, or returns the id of the pending
    /// or running request that holds the key. The unique index decides
    /// (`INSERT OR IGNORE` / `ON CONFLICT DO NOTHING`), so two enqueues at
    /// once never both insert.
    async fn enqueue_unique(&self, request: &NewRequest, unique_key: &str) -> Result<RequestId> {
        // The holder may end between the two statements: then insert again.
        for _ in 0..5 {
            let inserted = on_pool!(self, pool => {
                let query = bind_new_request!(
                    query(self.sql.enqueue_unique.as_str()),
                    request,
                    Some(unique_key),
                );
                match query.fetch_all(pool).await?.first() {
                    Some(row) => Some(row.int(0)?),
                    None => None,
                }
            }, mysql pool => {
                // A duplicate makes LAST_INSERT_ID() the holder's id.
                let query = bind_new_request!(
                    mysql::query(self.sql.enqueue_unique.as_str()),
                    request,
                    Some(unique_key),
                );
                Some(query.execute(pool).await?.last_insert_id() as i64).filter(|id| *id > 0)
            });
            if let Some(id) = inserted {
                return Ok(RequestId(id));
            }
            let holder = on_pool!(self, pool => {
            let query = query(self.sql.holder_of_unique_key.as_str()).bind(unique_key);
                match query.fetch_all(pool).await?.first() {
                    Some(row) => Some(row.int(0)?),
                    None => None,
                }
            });
            if let Some(id) = holder {
                return Ok(RequestId(id));
            }
        }
        anyhow::bail!("unique key `{unique_key}`: its holder keeps changing; try again")
    }

    /// Deletes up to `batch` rows of `kind` completed more than `age` ago.
    pub async fn prune(&self, kind: Prunable, age: Duration, batch: i64) -> Result<u64> {
        let sql = self.sql;
        Ok(on_pool!(self, pool => {
            let query = match kind {
                Prunable::Exhausted => query(sql.prune_exhausted.as_str())
                    .bind(age.as_secs_f64())
                    .bind(batch),
                Prunable::Finished | Prunable::Cancelled | Prunable::Rejected => {
                    let state = match kind {
                        Prunable::Finished => "FINISHED",
                        Prunable::Cancelled => "CANCELLED",
                        _ => "REJECTED",
                    };
                    query(sql.prune_state.as_str())
                        .bind(age.as_secs_f64())
                        .bind(batch)
                        .bind(state)
                }
            };
            query.execute(pool).await?.rows_affected()
        }))
    }

    /// The database's clock, as seconds since the epoch (every daemon
    /// agrees on it, whatever their own clocks say).
    pub async fn database_now(&self) -> Result<f64> {
        let now: Option<f64> = on_pool!(self, pool => {
            let query = query(self.sql.database_now.as_str());
            match query.fetch_all(pool).await?.first() {
                Some(row) => row.opt_float(0)?,
                None => None,
            }
        });
        now.context("reading the database's clock")
    }

    /// The latest slot enqueued for `schedule`, as seconds since the epoch.
    pub async fn last_slot(&self, schedule: &str) -> Result<Option<f64>> {
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.last_slot.as_str()).bind(schedule);
            match query.fetch_all(pool).await?.first() {
                Some(row) => row.opt_float(0)?,
                None => None,
            }
        }))
    }

    /// Enqueues slot `slot` (RFC 3339) of `schedule` unless some daemon
    /// already did: the slot row and the request are inserted in one
    /// transaction, the request only if the slot row was new. Returns the
    /// new request's id, or `None` if the slot was taken.
    pub async fn enqueue_slot(
        &self,
        schedule: &str,
        slot: &str,
        what: &crate::cron::Schedule,
    ) -> Result<Option<RequestId>> {
        let sql = self.sql;
        // The body, once per backend; `$id` reads the new request's id.
        macro_rules! in_transaction {
            ($pool:expr, $inserted:ident, $transaction:ident => $id:expr) => {{
                let mut $transaction = begin_write($pool).await?;
                let taken = query(sql.insert_slot.as_str())
                    .bind(schedule)
                    .bind(slot)
                    .execute(&mut *$transaction)
                    .await?
                    .rows_affected()
                    == 0;
                if taken {
                    $transaction.rollback().await?;
                    None
                } else {
                    let $inserted = query(sql.enqueue_scheduled.as_str())
                        .bind(what.task.as_str())
                        .bind(what.options.as_deref())
                        .bind(what.try_limit.unwrap_or(DEFAULT_TRY_LIMIT))
                        .bind(what.priority)
                        .bind(schedule)
                        .bind(slot);
                    let id: i64 = $id;
                    query(sql.set_slot_request.as_str())
                        .bind(id)
                        .bind(schedule)
                        .bind(slot)
                        .execute(&mut *$transaction)
                        .await?;
                    $transaction.commit().await?;
                    Some(RequestId(id))
                }
            }};
        }
        Ok(on_pool!(self, pool => {
            in_transaction!(pool, inserted, transaction =>
                inserted.fetch_all(&mut *transaction).await?[0].int(0)?)
        }, mysql pool => {
            use mysql::query;
            in_transaction!(pool, inserted, transaction =>
                inserted.execute(&mut *transaction).await?.last_insert_id() as i64)
        }))
    }

    /// Forgets slots of `schedule` older than an hour, keeping the latest
    /// (which is what tells a restarted daemon what it missed).
    pub async fn forget_old_slots(&self, schedule: &str) -> Result<u64> {
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.forget_old_slots.as_str()).bind(schedule);
            query.execute(pool).await?.rows_affected()
        }))
    }
}
