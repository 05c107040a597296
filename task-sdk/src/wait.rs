//! Waiting for a request's final result from a Rust application (cargo
//! feature `enqueue`), the same wait as `taskrunner-cli wait`, without
//! polling the table:
//!
//! - on PostgreSQL it LISTENs on `task_runner_results`, which a trigger
//!   NOTIFYs with the request id whenever `result` changes to anything but
//!   RUNNING, and re-reads the row only on a notification naming the id (or
//!   after a reconnect, and every 5 s as a safety net);
//! - on SQLite it checks `PRAGMA data_version` every 50 ms on a connection of
//!   its own (a check that reads no table) and re-reads the row only when
//!   another connection has committed.
//!
//! The row is always read once after the listener is set up, so a request
//! that ended before (or while) the wait started is never missed. The wait
//! uses a dedicated connection opened with the pool's options, never one of
//! the pool's own, so it does not starve a small pool.
//!
//! ```no_run
//! use std::time::Duration;
//! use task_sdk::{wait_for, Enqueue, FinalState, WaitError};
//!
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! // Insert and wait in one call ...
//! let done = Enqueue::named("Slugify", &[("title", "Hello")])
//!     .insert_and_wait(&pool, Duration::from_secs(30))
//!     .await?;
//! assert_eq!(done.state, FinalState::Finished);
//! println!("{}", done.result_text.unwrap_or_default());
//!
//! // ... or wait for an id inserted earlier (perhaps in a transaction).
//! let id = Enqueue::named("Slugify", &[("title", "Bye")]).insert(&pool).await?;
//! match wait_for(&pool, id, Duration::from_secs(30)).await {
//!     Ok(done) if done.is_success() => println!("done: {:?}", done.result_text),
//!     Ok(done) => println!("{} after {} tries", done.state, done.tries),
//!     Err(WaitError::TimedOut { id, .. }) => println!("{id} is still going"),
//!     Err(error) => return Err(error.into()),
//! }
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection, MySqlPool, PgPool, SqlitePool};

use crate::enqueue::{Enqueue, Error as EnqueueError};

/// The NOTIFY channel written by the trigger in the PostgreSQL migration.
pub const CHANNEL: &str = "task_runner_results";

/// How often SQLite's data version is checked.
const SQLITE_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// A safety net on PostgreSQL: the row is re-read this often even without a
/// notification.
const POSTGRES_RECHECK: Duration = Duration::from_secs(5);

/// How often the row is read on MariaDB/MySQL (no NOTIFY there): one
/// primary-key look-up.
const MYSQL_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// The same read, in MySQL's spelling.
const MYSQL_SELECT: &str =
    "SELECT result, result_text, CAST(tries AS SIGNED), CAST(try_limit AS SIGNED) \
       FROM task_runner_requests WHERE id = ?";

/// The row's columns the wait reads; `tries` and `try_limit` cast so that
/// both backends decode them as `i64`.
const SELECT: &str =
    "SELECT result, result_text, CAST(tries AS BIGINT), CAST(try_limit AS BIGINT) \
                      FROM task_runner_requests WHERE id = $1";

type Row = (Option<String>, Option<String>, i64, i64);

/// A final `result`: nothing more happens to the request unless someone
/// retries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FinalState {
    /// The task succeeded; `result_text` is its output.
    Finished,
    /// Cancelled before or while it ran.
    Cancelled,
    /// The task refused its options (exit status 65); not retried.
    Rejected,
    /// The last try failed and no tries remain.
    Failed,
    /// The last try's daemon died with it and no tries remain.
    Crashed,
    /// The last try timed out and no tries remain.
    Timeout,
}

impl FinalState {
    /// The `result` column's spelling (`FINISHED`, `FAILED`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            FinalState::Finished => "FINISHED",
            FinalState::Cancelled => "CANCELLED",
            FinalState::Rejected => "REJECTED",
            FinalState::Failed => "FAILED",
            FinalState::Crashed => "CRASHED",
            FinalState::Timeout => "TIMEOUT",
        }
    }

    /// The state of a row's `result`, if it is final with these tries
    /// (FAILED, CRASHED and TIMEOUT only once `tries >= try_limit`).
    fn of(result: Option<&str>, tries: i64, try_limit: i64) -> Option<FinalState> {
        let exhausted = tries >= try_limit;
        match result? {
            "FINISHED" => Some(FinalState::Finished),
            "CANCELLED" => Some(FinalState::Cancelled),
            "REJECTED" => Some(FinalState::Rejected),
            "FAILED" if exhausted => Some(FinalState::Failed),
            "CRASHED" if exhausted => Some(FinalState::Crashed),
            "TIMEOUT" if exhausted => Some(FinalState::Timeout),
            _ => None,
        }
    }
}

impl fmt::Display for FinalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request in its final state, as [`wait_for`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Finished {
    /// The request's id.
    pub id: i64,
    /// Its final `result`.
    pub state: FinalState,
    /// The task's output when FINISHED; otherwise why it ended (the reason
    /// line and the tail of standard error, or the cancel reason).
    pub result_text: Option<String>,
    /// Tries made.
    pub tries: u32,
    /// Tries allowed.
    pub try_limit: u32,
}

impl Finished {
    /// Whether the request FINISHED.
    pub fn is_success(&self) -> bool {
        self.state == FinalState::Finished
    }

    fn from_row(id: i64, (result, result_text, tries, try_limit): Row) -> Option<Finished> {
        let state = FinalState::of(result.as_deref(), tries, try_limit)?;
        Some(Finished {
            id,
            state,
            result_text,
            tries: u32::try_from(tries).unwrap_or(0),
            try_limit: u32::try_from(try_limit).unwrap_or(0),
        })
    }
}

/// Why [`wait_for`] returned without a final result.
#[derive(Debug)]
#[non_exhaustive]
pub enum WaitError {
    /// `waited` passed first; the request may still end later, so wait for
    /// `id` again if it matters.
    TimedOut {
        /// The request waited for.
        id: i64,
        /// The timeout that passed.
        waited: Duration,
    },
    /// There is no request with this id (or it was deleted while waited for).
    NotFound(i64),
    /// The database refused or could not be reached.
    Database(sqlx::Error),
    /// The URL names no supported database.
    Url(String),
    /// [`Enqueue::insert_and_wait`] could not insert the request.
    Insert(EnqueueError),
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::TimedOut { id, waited } => {
                write!(f, "request {id} is not done after {waited:?}")
            }
            WaitError::NotFound(id) => write!(f, "no request {id}"),
            WaitError::Database(_) => f.write_str("waiting for a request's result"),
            WaitError::Url(message) => f.write_str(message),
            WaitError::Insert(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for WaitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WaitError::Database(error) => Some(error),
            WaitError::Insert(error) => error.source(),
            _ => None,
        }
    }
}

impl From<sqlx::Error> for WaitError {
    fn from(error: sqlx::Error) -> WaitError {
        WaitError::Database(error)
    }
}

/// The database [`wait_for`] watches: the application's pool (its connect
/// options are used for one dedicated connection, not one of its
/// connections) or a URL (`sqlite://…` or `postgres://…`, the URL the
/// daemon uses). Made with `.into()` from `&SqlitePool`, `&PgPool`, `&str`
/// or `&String`.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Target<'a> {
    /// A SQLite pool (a file: an in-memory database is not the daemon's).
    Sqlite(&'a SqlitePool),
    /// A PostgreSQL pool.
    Postgres(&'a PgPool),
    /// A MariaDB/MySQL pool.
    MySql(&'a MySqlPool),
    /// A database URL.
    Url(&'a str),
}

impl<'a> From<&'a SqlitePool> for Target<'a> {
    fn from(pool: &'a SqlitePool) -> Target<'a> {
        Target::Sqlite(pool)
    }
}

impl<'a> From<&'a PgPool> for Target<'a> {
    fn from(pool: &'a PgPool) -> Target<'a> {
        Target::Postgres(pool)
    }
}

impl<'a> From<&'a MySqlPool> for Target<'a> {
    fn from(pool: &'a MySqlPool) -> Target<'a> {
        Target::MySql(pool)
    }
}

impl<'a> From<&'a str> for Target<'a> {
    fn from(url: &'a str) -> Target<'a> {
        Target::Url(url)
    }
}

impl<'a> From<&'a String> for Target<'a> {
    fn from(url: &'a String) -> Target<'a> {
        Target::Url(url)
    }
}

/// Connect options for one dedicated connection.
enum Options {
    Sqlite(SqliteConnectOptions),
    Postgres(PgConnectOptions),
    MySql(MySqlConnectOptions),
}

impl Target<'_> {
    fn options(self) -> Result<Options, WaitError> {
        match self {
            Target::Sqlite(pool) => Ok(Options::Sqlite((*pool.connect_options()).clone())),
            Target::Postgres(pool) => Ok(Options::Postgres((*pool.connect_options()).clone())),
            Target::MySql(pool) => Ok(Options::MySql((*pool.connect_options()).clone())),
            Target::Url(url) if url.starts_with("sqlite:") => Ok(Options::Sqlite(
                SqliteConnectOptions::from_str(url)?.create_if_missing(false),
            )),
            Target::Url(url) if url.starts_with("postgres:") || url.starts_with("postgresql:") => {
                Ok(Options::Postgres(PgConnectOptions::from_str(url)?))
            }
            Target::Url(url) if url.starts_with("mysql:") || url.starts_with("mariadb:") => {
                Ok(Options::MySql(MySqlConnectOptions::from_str(
                    &url.replacen("mariadb:", "mysql:", 1),
                )?))
            }
            Target::Url(url) => {
                // Only the scheme: the rest may hold a password.
                let scheme = url.split(':').next().unwrap_or_default();
                Err(WaitError::Url(format!(
                    "unsupported database URL scheme `{scheme}`: use sqlite://, postgres:// or mysql://"
                )))
            }
        }
    }
}

/// Waits until request `id` is final (FINISHED, CANCELLED, REJECTED, or
/// FAILED, CRASHED or TIMEOUT with no tries left) and returns it.
///
/// `target` is the application's `&SqlitePool` or `&PgPool`, or a database
/// URL. `timeout` is a [`Duration`] or `None` (wait as long as it takes); on
/// timeout the error is [`WaitError::TimedOut`]. A request that does not
/// exist is [`WaitError::NotFound`].
///
/// It notices the end within milliseconds on PostgreSQL (a notification) and
/// within about 50 ms on SQLite, and reads the row only when something may
/// have changed.
pub async fn wait_for<'a>(
    target: impl Into<Target<'a>>,
    id: i64,
    timeout: impl Into<Option<Duration>>,
) -> Result<Finished, WaitError> {
    let options = target.into().options()?;
    let waiting = async move {
        match options {
            Options::Sqlite(options) => wait_sqlite(options, id).await,
            Options::Postgres(options) => wait_postgres(options, id).await,
            Options::MySql(options) => wait_mysql(options, id).await,
        }
    };
    match timeout.into() {
        Some(waited) => tokio::time::timeout(waited, waiting)
            .await
            .unwrap_or(Err(WaitError::TimedOut { id, waited })),
        None => waiting.await,
    }
}

/// `Some` once the row is final; a missing row is an error.
fn check(id: i64, row: Option<Row>) -> Result<Option<Finished>, WaitError> {
    match row {
        None => Err(WaitError::NotFound(id)),
        Some(row) => Ok(Finished::from_row(id, row)),
    }
}

async fn wait_postgres(options: PgConnectOptions, id: i64) -> Result<Finished, WaitError> {
    // A pool of one, as `PgListener::connect` makes: it reconnects the
    // listener, and keeps the application's pool out of it.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with(options)
        .await?;
    let result = async {
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        let payload = id.to_string();
        loop {
            let row = sqlx::query_as::<_, Row>(SELECT)
                .bind(id)
                .fetch_optional(&mut listener)
                .await?;
            if let Some(finished) = check(id, row)? {
                return Ok(finished);
            }
            // Until a notification for this id arrives (others are
            // skipped), and no later than the re-read: counted once, so that
            // other rows' notifications do not put it off (before, on a busy
            // table, a row deleted or changed without one was never read
            // again, and a wait without a timeout waited for ever).
            let reread_at = tokio::time::Instant::now() + POSTGRES_RECHECK;
            loop {
                match tokio::time::timeout_at(reread_at, listener.try_recv()).await {
                    Ok(Ok(Some(notification))) if notification.payload() == payload => break,
                    Ok(Ok(Some(_))) => continue,
                    // The connection dropped (it reconnects and LISTENs
                    // again on the next call), or the safety net: read the
                    // row in case a notification was lost.
                    Ok(Ok(None)) | Err(_) => break,
                    Ok(Err(error)) => return Err(error.into()),
                }
            }
        }
    }
    .await;
    pool.close().await;
    result
}

/// A MariaDB/MySQL session to read rows as they are committed: with
/// autocommit on whatever the server's default. On a server set to
/// `autocommit = 0`, the first read opened a transaction nothing ended, and
/// every later read saw its snapshot (REPEATABLE READ): a wait never saw
/// its request or flow end.
async fn mysql_reader(options: &MySqlConnectOptions) -> Result<MySqlConnection, sqlx::Error> {
    let mut connection = options.connect().await?;
    sqlx::raw_sql("SET SESSION autocommit = 1")
        .execute(&mut connection)
        .await?;
    Ok(connection)
}

async fn wait_mysql(options: MySqlConnectOptions, id: i64) -> Result<Finished, WaitError> {
    let mut connection = mysql_reader(&options).await?;
    let result = async {
        loop {
            let row = sqlx::query_as::<_, Row>(MYSQL_SELECT)
                .bind(id)
                .fetch_optional(&mut connection)
                .await?;
            if let Some(finished) = check(id, row)? {
                return Ok(finished);
            }
            tokio::time::sleep(MYSQL_CHECK_INTERVAL).await;
        }
    }
    .await;
    let _ = connection.close().await;
    result
}

async fn wait_sqlite(options: SqliteConnectOptions, id: i64) -> Result<Finished, WaitError> {
    let mut connection: SqliteConnection = options.connect().await?;
    let result = async {
        let mut last_version: Option<i64> = None;
        loop {
            let version: i64 = sqlx::query_scalar("PRAGMA data_version")
                .fetch_one(&mut connection)
                .await?;
            if last_version != Some(version) {
                // Read after taking the version: a commit in between changes
                // the version again, and the next check reads once more.
                let row = sqlx::query_as::<_, Row>(SELECT)
                    .bind(id)
                    .fetch_optional(&mut connection)
                    .await?;
                if let Some(finished) = check(id, row)? {
                    return Ok(finished);
                }
                last_version = Some(version);
            }
            tokio::time::sleep(SQLITE_CHECK_INTERVAL).await;
        }
    }
    .await;
    let _ = connection.close().await;
    result
}

impl Enqueue {
    /// Inserts the request through `target` (the application's
    /// `&SqlitePool` or `&PgPool`, or a database URL) and waits for its
    /// final result, as [`wait_for`] does; `timeout` bounds the wait after
    /// the insert ([`WaitError::TimedOut`] carries the id, to wait again).
    /// To insert inside a transaction, [`insert`](Enqueue::insert) there and
    /// call [`wait_for`] after the commit.
    pub async fn insert_and_wait<'a>(
        &self,
        target: impl Into<Target<'a>>,
        timeout: impl Into<Option<Duration>>,
    ) -> Result<Finished, WaitError> {
        let target = target.into();
        let id = match target {
            Target::Sqlite(pool) => self.insert(pool).await,
            Target::Postgres(pool) => self.insert(pool).await,
            Target::MySql(pool) => self.insert(pool).await,
            Target::Url(url) => self.insert_url(url).await,
        }
        .map_err(WaitError::Insert)?;
        wait_for(target, id, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn final_states() {
        let state = |result: Option<&str>, tries| FinalState::of(result, tries, 3);
        assert_eq!(state(Some("FINISHED"), 1), Some(FinalState::Finished));
        assert_eq!(state(Some("CANCELLED"), 0), Some(FinalState::Cancelled));
        assert_eq!(state(Some("REJECTED"), 1), Some(FinalState::Rejected));
        assert_eq!(state(Some("FAILED"), 3), Some(FinalState::Failed));
        assert_eq!(state(Some("CRASHED"), 4), Some(FinalState::Crashed));
        assert_eq!(state(Some("TIMEOUT"), 3), Some(FinalState::Timeout));
        assert_eq!(state(Some("FAILED"), 2), None);
        assert_eq!(state(Some("TIMEOUT"), 1), None);
        assert_eq!(state(Some("RUNNING"), 3), None);
        assert_eq!(state(Some("INTERRUPTED"), 3), None);
        assert_eq!(state(None, 0), None);
    }

    /// A SQLite file (the wait opens a connection of its own, which an
    /// in-memory database would not share) with the columns the wait reads.
    struct File(std::path::PathBuf);

    impl File {
        async fn new(name: &str) -> (File, SqlitePool) {
            let path = std::env::temp_dir()
                .join(format!("task-sdk-wait-{name}-{}.db", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let options = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true);
            let pool = SqlitePool::connect_with(options).await.unwrap();
            sqlx::query(
                "CREATE TABLE task_runner_requests (id INTEGER PRIMARY KEY AUTOINCREMENT, \
                 task_class_name TEXT NOT NULL, options TEXT, result TEXT, result_text TEXT, \
                 tries INTEGER NOT NULL DEFAULT 0, try_limit INTEGER NOT NULL DEFAULT 5, \
                 priority INTEGER NOT NULL DEFAULT 0, delay_until DATETIME)",
            )
            .execute(&pool)
            .await
            .unwrap();
            (File(path), pool)
        }
    }

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[tokio::test]
    async fn sqlite_wait_sees_a_commit_from_another_connection() {
        let (_file, pool) = File::new("commit").await;
        let id = Enqueue::named("X", &())
            .try_limit(2)
            .insert(&pool)
            .await
            .unwrap();
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { wait_for(&pool, id, Duration::from_secs(10)).await })
        };
        let update = |sql: &'static str| {
            let pool = pool.clone();
            async move {
                sqlx::query(sql).bind(id).execute(&pool).await.unwrap();
            }
        };
        tokio::time::sleep(Duration::from_millis(120)).await;
        // A failure with a try left is not final.
        update("UPDATE task_runner_requests SET result = 'FAILED', tries = 1 WHERE id = $1").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!waiter.is_finished());
        update("UPDATE task_runner_requests SET result = 'RUNNING', tries = 2 WHERE id = $1").await;
        let ended = Instant::now();
        update(
            "UPDATE task_runner_requests SET result = 'FINISHED', result_text = 'ok' WHERE id = $1",
        )
        .await;
        let finished = waiter.await.unwrap().unwrap();
        assert!(
            ended.elapsed() < Duration::from_millis(500),
            "{:?}",
            ended.elapsed()
        );
        assert_eq!(
            finished,
            Finished {
                id,
                state: FinalState::Finished,
                result_text: Some("ok".into()),
                tries: 2,
                try_limit: 2,
            }
        );
    }

    #[tokio::test]
    async fn a_missing_request_a_timeout_and_a_foreign_url_are_errors() {
        let (_file, pool) = File::new("errors").await;
        let error = wait_for(&pool, 42, None).await.unwrap_err();
        assert!(matches!(error, WaitError::NotFound(42)), "{error}");
        let id = Enqueue::named("X", &()).insert(&pool).await.unwrap();
        let started = Instant::now();
        let error = wait_for(&pool, id, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(
            matches!(error, WaitError::TimedOut { id: timed_out, .. } if timed_out == id),
            "{error}"
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        let error = wait_for("oracle://root:secret@db/app", 1, None)
            .await
            .unwrap_err();
        assert!(matches!(error, WaitError::Url(_)));
        assert!(!error.to_string().contains("secret"), "{error}");
    }
}

/// How a flow ended ([`wait_for_flow`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlowEnd {
    /// The flow's id.
    pub id: i64,
    /// FINISHED, REVERTED, FAILED or CANCELLED.
    pub state: String,
    /// Why it ended so (for FINISHED: how many steps, which attempt).
    pub result_text: Option<String>,
    /// The store at its end (YAML): its options and what each step provided.
    pub store: Option<String>,
    /// 1 for the first run; more after restarts for `retry.times`.
    pub attempt: i64,
}

impl FlowEnd {
    /// Whether the flow FINISHED.
    pub fn is_success(&self) -> bool {
        self.state == "FINISHED"
    }

    /// The store, deserialized into the caller's type (a typed store).
    pub fn store_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_yaml::Error> {
        serde_yaml::from_str(self.store.as_deref().unwrap_or("{}"))
    }
}

/// How often [`wait_for_flow`] reads the flow row.
const FLOW_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// Waits until flow `id` (a row of `task_runner_flows`) has ended
/// (FINISHED, REVERTED, FAILED or CANCELLED) and returns how. `target` and
/// `timeout` are as for [`wait_for`]; a flow that does not exist is
/// [`WaitError::NotFound`]. It reads the flow row every 50 ms on one
/// dedicated connection.
pub async fn wait_for_flow<'a>(
    target: impl Into<Target<'a>>,
    id: i64,
    timeout: impl Into<Option<Duration>>,
) -> Result<FlowEnd, WaitError> {
    let options = target.into().options()?;
    const SQL: &str = "SELECT state, result_text, store, CAST(attempt AS BIGINT) FROM task_runner_flows WHERE id = $1";
    let waiting = async move {
        type FlowRow = (Option<String>, Option<String>, Option<String>, i64);
        let end = |row: Option<FlowRow>| -> Result<Option<FlowEnd>, WaitError> {
            let Some((state, result_text, store, attempt)) = row else {
                return Err(WaitError::NotFound(id));
            };
            Ok(match state.as_deref() {
                Some("FINISHED" | "REVERTED" | "FAILED" | "CANCELLED") => Some(FlowEnd {
                    id,
                    state: state.unwrap_or_default(),
                    result_text,
                    store,
                    attempt,
                }),
                _ => None,
            })
        };
        match options {
            Options::Sqlite(options) => {
                let mut connection = options.connect().await?;
                loop {
                    let row: Option<FlowRow> = sqlx::query_as(SQL)
                        .bind(id)
                        .fetch_optional(&mut connection)
                        .await?;
                    if let Some(ended) = end(row)? {
                        let _ = connection.close().await;
                        return Ok(ended);
                    }
                    tokio::time::sleep(FLOW_CHECK_INTERVAL).await;
                }
            }
            Options::Postgres(options) => {
                let mut connection = options.connect().await?;
                loop {
                    let row: Option<FlowRow> = sqlx::query_as(SQL)
                        .bind(id)
                        .fetch_optional(&mut connection)
                        .await?;
                    if let Some(ended) = end(row)? {
                        let _ = connection.close().await;
                        return Ok(ended);
                    }
                    tokio::time::sleep(FLOW_CHECK_INTERVAL).await;
                }
            }
            Options::MySql(options) => {
                const MYSQL_SQL: &str =
                    "SELECT state, result_text, store, CAST(attempt AS SIGNED) \
                                           FROM task_runner_flows WHERE id = ?";
                let mut connection = mysql_reader(&options).await?;
                loop {
                    let row: Option<FlowRow> = sqlx::query_as(MYSQL_SQL)
                        .bind(id)
                        .fetch_optional(&mut connection)
                        .await?;
                    if let Some(ended) = end(row)? {
                        let _ = connection.close().await;
                        return Ok(ended);
                    }
                    tokio::time::sleep(FLOW_CHECK_INTERVAL).await;
                }
            }
        }
    };
    match timeout.into() {
        Some(waited) => tokio::time::timeout(waited, waiting)
            .await
            .unwrap_or(Err(WaitError::TimedOut { id, waited })),
        None => waiting.await,
    }
}
