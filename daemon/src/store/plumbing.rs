//! Opening the store and keeping it fit to use: the pools (one SQLite
//! writer, small PostgreSQL and MySQL pools), the schema's migrations and
//! the checks made at start (server encoding and version, `--no-migrate`),
//! the statement counters, and the SQLite connection kept beside the pool.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::{diagnose, mysql, sql, url, ClaimFilter, Pool, Store};

/// Name of taskrunner's own migration bookkeeping table (never `_sqlx_migrations`,
/// which may belong to the application sharing the database).
pub(super) const MIGRATIONS_TABLE: &str = "task_runner_schema_migrations";

/// The daemon's writer connection checkpoints only once the log is this many
/// pages long (SQLite's default is 1,000), which it reaches only if the
/// daemon's checkpointer falls behind.
pub(crate) const WRITER_AUTOCHECKPOINT: u32 = 16_000;

/// The size taskrunner's SQLite connections cut the write-ahead log back to
/// when they start it over. SQLite reuses the log's file from its start
/// once everything in it is checkpointed, and keeps the file at the largest
/// size it ever reached: a burst (an application's large transaction, a long
/// read holding the checkpoints back) left `-wal` at that size for good.
/// 64 MiB: the log of [`WRITER_AUTOCHECKPOINT`] pages of 4 KiB, which a
/// daemon whose checkpointer keeps up never reaches.
const WAL_SIZE_LIMIT: u64 = 64 << 20;

/// What [`Store::migrate`] did: schema versions before (None: no schema) and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub(crate) before: Option<i64>,
    pub(crate) after: i64,
    /// What was repaired first (tables loaded from a Rails schema.rb).
    pub(crate) repaired: Option<String>,
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

/// How often [`Store::migrate_unless`] says that its migrations still run
/// (the daemon tells systemd, which would stop a start that takes longer
/// than its `TimeoutStartSec=`).
pub const MIGRATING_EVERY: Duration = Duration::from_secs(20);

/// `work`, with `tell` called as it begins and every [`MIGRATING_EVERY`]
/// until it ends.
async fn telling<T>(work: impl std::future::Future<Output = T>, tell: impl Fn()) -> T {
    let every = crate::test_hooks::shortened(MIGRATING_EVERY, "TASKRUNNER_TEST_MIGRATING_EVERY_MS");
    tokio::pin!(work);
    loop {
        tell();
        tokio::select! {
            done = &mut work => return done,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// This process's turn to check and migrate the schema, so that processes
/// migrating at once take turns: the repair's check (see `repair.rs`) must
/// not read a schema another process is halfway through upgrading.
/// PostgreSQL: a session advisory lock, MariaDB/MySQL: `GET_LOCK` on a name
/// of the database's own, each held on a connection of its own (sqlx's
/// migrator takes its own lock again inside). SQLite: the switch to
/// write-ahead logging ([`Store::use_write_ahead_log`]); its migrations
/// take turns by its write lock (see [`Store::run_migrations`]).
/// A process that finds the turn taken says so once, then waits for it.
pub(super) enum MigrationTurn {
    Sqlite,
    Postgres(sqlx::PgConnection),
    MySql(sqlx::MySqlConnection),
}

impl MigrationTurn {
    async fn take(store: &Store) -> Result<MigrationTurn> {
        let waiting = || {
            tracing::info!(
                "waiting for another process to end its migration of {}",
                store.display_url
            )
        };
        match &store.pool {
            Pool::Sqlite(_) => {
                store.use_write_ahead_log().await?;
                Ok(MigrationTurn::Sqlite)
            }
            Pool::Postgres(pool) => {
                let mut connection = pool.acquire().await?.detach();
                const KEY: &str = "hashtext('taskrunner:migrate')";
                let taken: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT pg_try_advisory_lock({KEY})"
                )))
                .fetch_one(&mut connection)
                .await?;
                if !taken {
                    waiting();
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "SELECT pg_advisory_lock({KEY})"
                    )))
                    .execute(&mut connection)
                    .await?;
                }
                Ok(MigrationTurn::Postgres(connection))
            }
            Pool::MySql(pool) => {
                let mut connection = pool.acquire().await?.detach();
                // Lock names are the server's: this database's own (at most 64 characters).
                const NAME: &str = "CONCAT('taskrunner:migrate:', LEFT(SHA1(DATABASE()), 32))";
                let lock =
                    |wait: u32| sqlx::AssertSqlSafe(format!("SELECT GET_LOCK({NAME}, {wait})"));
                let taken: Option<i64> = sqlx::query_scalar(lock(0))
                    .fetch_one(&mut connection)
                    .await?;
                if taken != Some(1) {
                    waiting();
                    // A day: for ever, in MySQL's and MariaDB's one spelling.
                    let taken: Option<i64> = sqlx::query_scalar(lock(86_400))
                        .fetch_one(&mut connection)
                        .await?;
                    if taken != Some(1) {
                        anyhow::bail!("another process's migration held the lock for a day");
                    }
                }
                Ok(MigrationTurn::MySql(connection))
            }
        }
    }

    /// Ends the turn: closing the session releases its lock (as does the
    /// process's end, should it die first).
    async fn end(self) {
        match self {
            MigrationTurn::Sqlite => {}
            MigrationTurn::Postgres(connection) => {
                let _ = sqlx::Connection::close(connection).await;
            }
            MigrationTurn::MySql(connection) => {
                let _ = sqlx::Connection::close(connection).await;
            }
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

/// The migrations among `applied` (to a database) that `migrator` does not
/// know: a newer release's.
fn unknown_migrations(
    migrator: &sqlx::migrate::Migrator,
    applied: &std::collections::BTreeSet<i64>,
) -> Vec<i64> {
    applied
        .iter()
        .copied()
        .filter(|version| !migrator.iter().any(|m| m.version == *version))
        .collect()
}

/// Migration versions as the migration files number them: `0011, 0012`.
fn version_list(versions: &[i64]) -> String {
    versions
        .iter()
        .map(|v| format!("{v:04}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The database's schema is not the one this binary was built for (older
/// with `--no-migrate`, or a newer release's): retrying cannot fix it.
#[derive(Debug)]
pub(crate) struct SchemaMismatch(pub(crate) String);

impl std::fmt::Display for SchemaMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SchemaMismatch {}

/// A SQLite connection of its own, beside the pool's one writer, for work
/// that must neither wait for the writer nor hold it up (the change check,
/// checkpoints). Opened when first needed, and again after an error.
pub(crate) struct SideConnection {
    options: Option<SqliteConnectOptions>,
    open: Option<sqlx::SqliteConnection>,
}

impl SideConnection {
    pub(crate) fn new(url: &str) -> SideConnection {
        SideConnection {
            options: SqliteConnectOptions::from_str(url).ok(),
            open: None,
        }
    }

    /// The connection, opened if need be; `None` while it cannot be.
    pub(crate) async fn get(&mut self) -> Option<&mut sqlx::SqliteConnection> {
        use sqlx::ConnectOptions;
        if self.open.is_none() {
            self.open = self.options.as_ref()?.connect().await.ok();
        }
        self.open.as_mut()
    }

    /// Whether a connection is open now.
    pub(crate) fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// After an error: the next [`get`](Self::get) opens a new connection.
    pub(crate) fn failed(&mut self, error: &sqlx::Error) {
        tracing::debug!("SQLite side connection: {error}");
        self.open = None;
    }

    pub(crate) async fn close(self) {
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
        let mut queue_claims = None;
        let gave_up = GaveUp::default();
        let answer_bound: std::sync::Arc<std::sync::atomic::AtomicU64> = Default::default();
        let daemon = purpose == Purpose::Daemon;
        let pool = if url.starts_with("sqlite:") {
            if let Some(path) = diagnose::sqlite_path(url) {
                diagnose::check_sqlite_access(&path, purpose)?;
            }
            let options = SqliteConnectOptions::from_str(url)
                .with_context(|| format!("invalid SQLite URL {display_url}"))?
                .create_if_missing(purpose != Purpose::Cli)
                // The daemon's own writes in WAL mode are safe at NORMAL: a
                // commit lost to a power cut is a claim (the row waits again)
                // or an outcome (the row is reaped and runs again). A row the
                // CLI said it enqueued (`enqueue`, `batch`, `flow start`) must
                // survive one, as an application's does with SQLite's
                // default, FULL: before, it used NORMAL too.
                .synchronous(if daemon {
                    SqliteSynchronous::Normal
                } else {
                    SqliteSynchronous::Full
                })
                .busy_timeout(sqlite_busy_timeout())
                .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string());
            // The daemon checkpoints on a connection of its own (see daemon/checkpoint.rs).
            let options = if daemon {
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
                        Box::pin(async move {
                            stable_query_plans(connection).await?;
                            retry_locks_promptly(connection).await
                        })
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
                gave_up
                    .checks(
                        MySqlPoolOptions::new()
                            .max_connections(if daemon { 4 } else { 2 })
                            .acquire_timeout(Duration::from_secs(5)),
                    )
                    .after_connect({
                        let answer_bound = answer_bound.clone();
                        move |connection, _| {
                            let bound = if daemon { bound_ms(&answer_bound) } else { 0 };
                            Box::pin(async move {
                                mysql::configure_session(connection).await?;
                                mysql::end_abandoned_transactions(connection, bound).await
                            })
                        }
                    })
                    .connect_lazy_with(options),
            )
        } else {
            let options = PgConnectOptions::from_str(url)
                .with_context(|| format!("invalid PostgreSQL URL {display_url}"))?
                .application_name("taskrunner")
                // Not sent: PgBouncer refuses a start-up parameter it does not
                // track unless told to ignore it, and since PostgreSQL 12 the
                // server's default (1) already writes floats exactly.
                .extra_float_digits(None);
            let pool = gave_up.checks(
                PgPoolOptions::new()
                    .max_connections(if daemon { 4 } else { 2 })
                    .acquire_timeout(Duration::from_secs(5)),
            );
            // The daemon's own statements are written for one plan each; the
            // web page's and the CLI's filters are not (see `generic_plans`).
            let pool = if daemon {
                // Claims of one queue or type are planned for it (see
                // `claim_pool`), on a connection of their own, opened at
                // the first one.
                let bound = answer_bound.clone();
                queue_claims = Some(
                    gave_up
                        .checks(
                            PgPoolOptions::new()
                                .max_connections(1)
                                .acquire_timeout(Duration::from_secs(5)),
                        )
                        .after_connect(move |connection, _| {
                            let bound = bound_ms(&bound);
                            Box::pin(async move {
                                read_committed(connection).await?;
                                end_abandoned_transactions(connection, bound).await
                            })
                        })
                        .connect_lazy_with(options.clone()),
                );
                let bound = answer_bound.clone();
                pool.after_connect(move |connection, _| {
                    let bound = bound_ms(&bound);
                    Box::pin(async move {
                        read_committed(connection).await?;
                        generic_plans(connection).await?;
                        end_abandoned_transactions(connection, bound).await
                    })
                })
            } else {
                pool.after_connect(|connection, _| Box::pin(read_committed(connection)))
            };
            Pool::Postgres(pool.connect_lazy_with(options))
        };
        Ok(Store {
            sql: sql::SQL.of(pool.backend()),
            pool,
            display_url,
            statements: Default::default(),
            hooks: Default::default(),
            // No cap until the daemon sets its `max_options`.
            max_options: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX)),
            lock_retries: Default::default(),
            unknown_flows: Default::default(),
            many_queues_until: Default::default(),
            left_out_backlog: Default::default(),
            queue_claims,
            answer_bound,
            gave_up,
        })
    }

    /// How long a PostgreSQL or MariaDB/MySQL server may take to answer
    /// one of the daemon's calls made through [`Store::answered`] (the
    /// daemon sets its `lease_timeout`, at start and on reload).
    pub(crate) fn set_answer_bound(&self, bound: Duration) {
        let millis = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        self.answer_bound
            .store(millis, std::sync::atomic::Ordering::Relaxed);
    }

    /// `call`, given up as failed ([`NoAnswer`]) if a PostgreSQL or
    /// MariaDB/MySQL server has not answered it within the bound set by
    /// [`set_answer_bound`](Self::set_answer_bound). A connection whose
    /// peer went away without a word (a failover without a reset, a
    /// network that drops packets) waits for ever, or until the kernel
    /// gives up on it a quarter of an hour later: given up, the call's
    /// connection is closed (see [`GaveUp`]) and the caller retries on a
    /// new one. SQLite is not bounded: its waits are for locks, which
    /// `busy_timeout` bounds already.
    ///
    /// Every call given up this way is one transaction or several, each
    /// whole or not at all, and every write in them is fenced by a claim
    /// token or keyed by its cause, so that the caller's retry applies
    /// nothing twice; a claim whose answer was lost leaves rows this daemon
    /// holds but never started, which its heartbeat gives back.
    pub(crate) async fn answered<T>(
        &self,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let millis = self.answer_bound.load(std::sync::atomic::Ordering::Relaxed);
        if millis == 0 || self.backend() == super::Backend::Sqlite {
            return call.await;
        }
        let bound = Duration::from_millis(millis);
        tokio::pin!(call);
        tokio::select! {
            done = &mut call => done,
            _ = tokio::time::sleep(bound) => {
                // Before `call` is dropped, and its connection with it.
                self.gave_up.now();
                Err(NoAnswer(bound).into())
            }
        }
    }

    /// A connection of the daemon's is about to be dropped in the middle
    /// of a call that got no answer: see [`GaveUp`].
    pub(crate) fn giving_up_on_a_connection(&self) {
        self.gave_up.now();
    }
}

/// A call the database did not answer within its bound (`lease_timeout`).
#[derive(Debug)]
struct NoAnswer(Duration);

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the database did not answer within {} (lease_timeout): the call is given up and its connection closed",
            crate::units::format_duration(self.0)
        )
    }
}

impl std::error::Error for NoAnswer {}

/// How long a PostgreSQL or MariaDB/MySQL connection may take to answer a
/// ping: when it comes back to the pool, and (the LISTEN connection) now
/// and then (see [`within_ping_bound`]).
const PING_BOUND: Duration = Duration::from_secs(5);

/// How long an idle connection may take to answer its ping before the
/// pool hands it out (see [`GaveUp::ping_check`]): under the acquire's
/// own 5 s, so that a new connection can be opened in its place.
const ACQUIRE_PING_BOUND: Duration = Duration::from_secs(2);

/// `ping` (a ping, or a statement as cheap), an error if it does not
/// answer within [`PING_BOUND`].
pub(crate) async fn within_ping_bound<T>(
    ping: impl std::future::Future<Output = sqlx::Result<T>>,
) -> sqlx::Result<T> {
    within(PING_BOUND, ping).await
}

/// `ping`, an error if it does not answer within `bound`.
async fn within<T>(
    bound: Duration,
    ping: impl std::future::Future<Output = sqlx::Result<T>>,
) -> sqlx::Result<T> {
    tokio::time::timeout(bound, ping).await.map_err(|_| {
        sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the connection did not answer a ping within {}",
                crate::units::format_duration(bound)
            ),
        ))
    })?
}

/// When the daemon last gave up on a call (see [`Store::answered`]). A
/// connection dropped in the middle of a call comes back to its pool
/// waiting for an answer, and sqlx's own check of it then (a ping) would
/// wait for ever for a peer that went away without a word, holding one of
/// the pool's few places. So for a while after a call was given up, each
/// connection coming back is first pinged with a bound, and closed if it
/// does not answer within [`PING_BOUND`] (an error, not `false`: sqlx then
/// closes it without the goodbye a graceful close would wait on). At other
/// times this check costs nothing: it would be one more round trip for
/// every connection's every return (about a tenth more daemon CPU per task
/// on PostgreSQL at `max_concurrent` 2).
#[derive(Clone, Default)]
pub(super) struct GaveUp(std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>);

/// What [`GaveUp::ping_check`] answers for a connection: whether to keep it.
type ReleaseCheck<'c> = std::pin::Pin<
    Box<dyn std::future::Future<Output = std::result::Result<bool, sqlx::Error>> + Send + 'c>,
>;

impl GaveUp {
    /// How long after a call was given up returned connections are checked.
    const CHECKED_FOR: Duration = Duration::from_secs(30);

    fn now(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    }

    fn recently(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < Self::CHECKED_FOR)
    }

    /// Whether a connection idle for `idle_for` was idle already when a
    /// call was given up or a connection failed its ping, recently. After
    /// a silent failover every such connection is as dead as that one.
    fn idle_through_a_give_up(&self, idle_for: Duration) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < Self::CHECKED_FOR && idle_for > at.elapsed())
    }

    /// `options` with the daemon's checks of a PostgreSQL or MariaDB/MySQL
    /// pool's connections, when they are handed out and when they come back.
    fn checks<DB: sqlx::Database>(
        &self,
        options: sqlx::pool::PoolOptions<DB>,
    ) -> sqlx::pool::PoolOptions<DB> {
        options
            .test_before_acquire(false)
            .before_acquire(self.ping_check(Check::Acquire))
            .after_release(self.ping_check(Check::Release))
    }

    /// A pool hook that pings a connection with a bound, and closes it
    /// (an error, not `false`: sqlx then closes it without the goodbye a
    /// graceful close would wait on) if it does not answer:
    /// - before the pool hands an idle connection out, always, within
    ///   [`ACQUIRE_PING_BOUND`], in place of sqlx's own ping, whose only
    ///   bound is the whole acquire's 5 s. After a silent failover every
    ///   idle connection of the pool is dead alike: sqlx's ping made an
    ///   acquire fail after 5 s for each one, a "pool timed out" error, a
    ///   backoff and a retry; now the acquire goes on with a new one;
    /// - when a connection comes back, only for [`Self::CHECKED_FOR`] after
    ///   a call was given up (or a connection failed a check), within
    ///   [`PING_BOUND`].
    ///
    /// A connection that fails either makes the others suspect too: one
    /// that was idle already then is closed when next handed out, without
    /// a ping (after a silent failover each idle connection cost the
    /// acquire its 2 s ping in turn: 6 s and more before a claim ran, over
    /// the tests' 30 s under load).
    fn ping_check<C: sqlx::Connection>(
        &self,
        check: Check,
    ) -> impl for<'c> Fn(&'c mut C, sqlx::pool::PoolConnectionMetadata) -> ReleaseCheck<'c>
           + Send
           + Sync
           + 'static {
        let gave_up = self.clone();
        move |connection, metadata| {
            if matches!(check, Check::Acquire) && gave_up.idle_through_a_give_up(metadata.idle_for)
            {
                return Box::pin(std::future::ready(Err(sqlx::Error::Io(
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "idle since before a connection went silent: closed without a ping",
                    ),
                )))) as ReleaseCheck<'_>;
            }
            let bound = match check {
                Check::Acquire => Some(ACQUIRE_PING_BOUND),
                Check::Release => gave_up.recently().then_some(PING_BOUND),
            };
            let gave_up = gave_up.clone();
            Box::pin(async move {
                if let Some(bound) = bound {
                    match within(bound, connection.ping()).await {
                        Ok(()) => {}
                        // The server said it closed it (PostgreSQL's
                        // `idle_session_timeout`, an administrator's kill)
                        // or the socket is closed: nothing to wait on, so
                        // let sqlx close it quietly (an error is a warning
                        // line in the log each time) and open another.
                        Err(error) if closed_by_the_server(&error) => return Ok(false),
                        Err(error) => {
                            gave_up.now();
                            return Err(error);
                        }
                    }
                }
                Ok(true)
            })
        }
    }
}

/// Whether the database refused a statement for the values it was given
/// (a constraint, a trigger's refusal, a value it does not store; see
/// `compose::refused_for_its_data`), not for its own state (out, read-only
/// after a failover, a deadlock, a lock wait), which passes.
pub(crate) fn refused_by_the_database(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<super::rows::RowSkipped>()
            || cause
                .downcast_ref::<sqlx::Error>()
                .is_some_and(super::compose::refused_for_its_data)
    })
}

/// Whether a connection's ping failed because the server closed it (an
/// answer saying so, or the socket closed), not because it went silent.
fn closed_by_the_server(error: &sqlx::Error) -> bool {
    use std::io::ErrorKind;
    match error {
        sqlx::Error::Database(_) => true,
        sqlx::Error::Io(error) => matches!(
            error.kind(),
            ErrorKind::UnexpectedEof
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
        ),
        _ => false,
    }
}

/// When [`GaveUp::ping_check`] checks a connection.
#[derive(Clone, Copy)]
enum Check {
    /// Before the pool hands it out.
    Acquire,
    /// When it comes back to the pool.
    Release,
}

impl Store {
    /// Statements sent so far by the daemon's own work (see the field).
    pub fn statements_sent(&self) -> u64 {
        self.statements.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts `n` statements sent (round trips).
    pub(crate) fn count_statements(&self, n: u64) {
        self.statements
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// MariaDB/MySQL: transactions run again after a deadlock (1213) or a
    /// lock-wait timeout (1205) so far.
    pub(crate) fn lock_retries(&self) -> u64 {
        self.lock_retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The MariaDB/MySQL pool, for the wake-up check.
    pub(crate) fn mysql_pool(&self) -> Option<&MySqlPool> {
        match &self.pool {
            Pool::MySql(pool) => Some(pool),
            _ => None,
        }
    }

    /// The PostgreSQL pool, for LISTEN.
    pub(crate) fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.pool {
            Pool::Postgres(pool) => Some(pool),
            _ => None,
        }
    }

    /// The SQLite pool, for cheap change detection.
    pub(crate) fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.pool {
            Pool::Sqlite(pool) => Some(pool),
            _ => None,
        }
    }

    /// Creates or upgrades the schema. Safe to run from several processes at
    /// once (daemons started together, `taskrunner-cli migrate` beside
    /// them): they take turns (see [`MigrationTurn`]), and each reports what
    /// it did itself. Returns the schema version before and after.
    pub async fn migrate(&self) -> Result<Migration> {
        match self.migrate_unless(std::future::pending(), || {}).await? {
            Some(migration) => Ok(migration),
            None => unreachable!("a pending future never resolves"),
        }
    }

    /// [`migrate`](Store::migrate), unless `stop` comes while this process
    /// waits for its turn (a daemon told to stop, behind another process's
    /// long migration): then `None`, and nothing was done. Once its turn
    /// has come, the migrations run to their end, and `migrating` is
    /// called as they begin and every [`MIGRATING_EVERY`] until they end.
    pub async fn migrate_unless(
        &self,
        stop: impl std::future::Future<Output = ()>,
        migrating: impl Fn(),
    ) -> Result<Option<Migration>> {
        let context = || format!("migrating the schema of {}", self.display_url);
        let turn = tokio::select! {
            turn = MigrationTurn::take(self) => turn.with_context(context)?,
            () = stop => return Ok(None),
        };
        let migrated = async {
            let mut migrator = self.migrator();
            migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
            let applied = self.applied_versions().await?;
            // A newer release's schema (a rolling upgrade, an old binary
            // left behind) is not this binary's to judge: what it does not
            // find there may be what the newer migrations replaced, and a
            // repair would rebuild the tables without the newer columns.
            let unknown = unknown_migrations(&migrator, &applied);
            if !unknown.is_empty() {
                return Err(SchemaMismatch(format!(
                    "it has migration(s) {} that this taskrunner ({}) does not know, from a newer release: \
                     upgrade taskrunnerd and taskrunner-cli; nothing was changed",
                    version_list(&unknown),
                    env!("CARGO_PKG_VERSION")
                ))
                .into());
            }
            let repaired = self.repair_if_needed(&migrator, &applied).await?;
            let before = self.run_migrations(&migrator).await?;
            let after = self.schema_version().await.unwrap_or(0);
            anyhow::Ok(Migration {
                before: if repaired.is_some() { None } else { before },
                after,
                repaired,
            })
        };
        let migrated = telling(migrated, migrating).await.with_context(context);
        turn.end().await;
        migrated.map(Some)
    }

    /// Runs the migrations not applied yet; returns the version before them.
    ///
    /// SQLite has no lock between processes but its write lock: there the
    /// check and every migration run in one `BEGIN IMMEDIATE` transaction
    /// (each migration in a savepoint of it), so a second process waits, then
    /// finds them applied. Without it both would apply the first migration,
    /// and one fail (`table … already exists`, a duplicate version).
    pub(super) async fn run_migrations(
        &self,
        migrator: &sqlx::migrate::Migrator,
    ) -> Result<Option<i64>> {
        let version = format!("SELECT max(version) FROM {MIGRATIONS_TABLE} WHERE success");
        let version = sqlx::AssertSqlSafe(version);
        match &self.pool {
            Pool::Sqlite(pool) => {
                let mut connection = pool.acquire().await?;
                let mut transaction =
                    sqlx::Connection::begin_with(&mut *connection, "BEGIN IMMEDIATE").await?;
                let before = sqlx::query_scalar::<_, Option<i64>>(version)
                    .fetch_one(&mut *transaction)
                    .await
                    .ok()
                    .flatten();
                migrator.run(&mut *transaction).await?;
                transaction.commit().await?;
                Ok(before)
            }
            Pool::Postgres(pool) => {
                let before = self.schema_version().await;
                migrator.run(pool).await?;
                Ok(before)
            }
            Pool::MySql(pool) => {
                let before = self.schema_version().await;
                migrator.run(pool).await?;
                Ok(before)
            }
        }
    }

    /// SQLite: puts the file in write-ahead-log mode (kept in the file, so a
    /// no-op once done), waiting for other connections as long as any
    /// statement would ([`sqlite_busy_timeout`]). Done before the schema is
    /// made or checked, not as each connection opens.
    ///
    /// Leaving the rollback journal takes an exclusive lock that SQLite does
    /// not wait for with its busy handler: it answers "database is locked"
    /// at once while another connection writes (or also means to). Set as
    /// each connection opened, it failed `migrate` beside an application
    /// writing its first rows to a new file, and now and then one of the
    /// processes started together on a new file (two daemons and `migrate`
    /// from their init scripts). Here the pragma is tried again every
    /// millisecond.
    async fn use_write_ahead_log(&self) -> Result<()> {
        let Pool::Sqlite(pool) = &self.pool else {
            return Ok(());
        };
        let since = std::time::Instant::now();
        loop {
            match sqlx::query("PRAGMA journal_mode = WAL").execute(pool).await {
                Err(sqlx::Error::Database(error))
                    if is_sqlite_busy(error.code().as_deref())
                        && since.elapsed() < sqlite_busy_timeout() =>
                {
                    tokio::time::sleep(SQLITE_BUSY_RETRY).await;
                }
                outcome => return Ok(outcome.map(drop)?),
            }
        }
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
    pub(super) async fn schema_version(&self) -> Option<i64> {
        let statement = format!("SELECT max(version) FROM {MIGRATIONS_TABLE} WHERE success");
        let statement = sqlx::AssertSqlSafe(statement);
        on_pool!(self, pool => {
            sqlx::query_scalar::<_, Option<i64>>(statement).fetch_one(pool).await.ok()?
        })
    }

    /// PostgreSQL: the database must store UTF-8. With another server
    /// encoding (SQL_ASCII above all) a row holding bytes that are not UTF-8
    /// cannot be read, and would stop every claim; refused at start.
    /// MariaDB/MySQL: a server older than the minimum, or whose
    /// `max_allowed_packet` is under 16 MiB, is refused at start, naming
    /// what it found and what is needed.
    pub(crate) async fn check_encoding(&self) -> Result<()> {
        if let Pool::MySql(pool) = &self.pool {
            let (version, packet): (String, i64) =
                sqlx::query_as("SELECT VERSION(), CAST(@@max_allowed_packet AS SIGNED)")
                    .fetch_one(pool)
                    .await
                    .with_context(|| {
                        format!("reading the server version of {}", self.display_url)
                    })?;
            return match mysql::version_refusal(&version).or_else(|| mysql::packet_refusal(packet))
            {
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
    pub(crate) async fn check_schema(&self) -> Result<()> {
        self.check_encoding().await?;
        self.use_write_ahead_log().await?;
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
        let applied: std::collections::BTreeSet<i64> = match applied {
            Ok(applied) => applied.into_iter().collect(),
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
        let missing: Vec<i64> = known
            .iter()
            .copied()
            .filter(|v| !applied.contains(v))
            .collect();
        let newer = unknown_migrations(&migrator, &applied);
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!(
                "is missing migration(s) {} that this taskrunnerd needs (run `taskrunner-cli migrate`, or start without --no-migrate)",
                version_list(&missing)
            ));
        }
        if !newer.is_empty() {
            problems.push(format!(
                "has migration(s) {} newer than this taskrunnerd knows (upgrade taskrunnerd)",
                version_list(&newer)
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

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        if let Some(pool) = &self.queue_claims {
            pool.close().await;
        }
        on_pool!(self, pool => pool.close().await)
    }

    /// PostgreSQL: the pool a claim runs on. The daemon's connections plan
    /// each statement once, without its values (see `generic_plans`); a
    /// claim of one queue or one task type needs the plan for its values:
    /// it then reads that queue's or type's rows (index `runnable_by_queue`
    /// or `by_type`), where the plan without values reads the runnable index
    /// in claim order and passes over every row of the others (200,000
    /// rows, 85–150 ms, for a claim of a queue or type of 100 rows behind
    /// another's backlog, against 0.4 ms). Such claims go to a connection
    /// that keeps the server's default.
    pub(super) fn claim_pool<'a>(
        &'a self,
        pool: &'a PgPool,
        filter: &ClaimFilter<'_>,
    ) -> &'a PgPool {
        match &self.queue_claims {
            Some(filtered) if filter.narrows_to() != (false, false) => filtered,
            _ => pool,
        }
    }
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

/// An SQLite (extended) result code of the SQLITE_BUSY family: another
/// connection holds the lock the statement needed.
fn is_sqlite_busy(code: Option<&str>) -> bool {
    code.and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| code & 0xff == libsqlite3_sys::SQLITE_BUSY)
}

/// How long a statement on SQLite waits for another connection's lock
/// before it fails with "database is locked".
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// [`SQLITE_BUSY_TIMEOUT`], or in a debug build what
/// `TASKRUNNER_TEST_SQLITE_BUSY_TIMEOUT_MS` says: a test of a long-held
/// lock need not wait 5 s for each statement that fails.
fn sqlite_busy_timeout() -> Duration {
    static TIMEOUT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *TIMEOUT.get_or_init(|| {
        crate::test_hooks::shortened(
            SQLITE_BUSY_TIMEOUT,
            "TASKRUNNER_TEST_SQLITE_BUSY_TIMEOUT_MS",
        )
    })
}

/// How often it tries again meanwhile.
const SQLITE_BUSY_RETRY: Duration = Duration::from_millis(1);

/// Makes a connection wait for another connection's lock by trying again
/// every [`SQLITE_BUSY_RETRY`], up to [`SQLITE_BUSY_TIMEOUT`] ([`sqlite_busy_timeout`]).
///
/// SQLite's own `busy_timeout` sleeps longer and longer between tries (1, 2,
/// 5, 10, … 50, then 100 ms), so a waiter may sleep on for up to 100 ms after
/// the lock is free. The daemon's one connection then holds its next claim
/// behind that sleep. An application that inserts with SQLite's default
/// `synchronous=FULL` holds the write lock through the fsync of its commit,
/// and on a busy disk that fsync takes tens of milliseconds: the daemon's
/// outcome write waited for it, then overslept, and the row that commit had
/// just added started late.
async fn retry_locks_promptly(connection: &mut sqlx::SqliteConnection) -> sqlx::Result<()> {
    let mut handle = connection.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    // SAFETY: a valid connection handle, held locked for the call; the
    // handler is a plain function that ignores its (null) argument. It
    // replaces the handler `busy_timeout` installed.
    let code = unsafe {
        libsqlite3_sys::sqlite3_busy_handler(db, Some(retry_after_a_moment), std::ptr::null_mut())
    };
    if code != libsqlite3_sys::SQLITE_OK {
        return Err(sqlx::Error::Protocol(format!(
            "SQLite refused the busy handler (code {code})"
        )));
    }
    Ok(())
}

/// SQLite's busy handler (see [`retry_locks_promptly`]): `tries` is how many
/// times it was called for this lock already; 0 gives up.
///
/// The bound is [`SQLITE_BUSY_TIMEOUT`] of wall time since the first call,
/// not a count of sleeps: a sleep of 1 ms lasts longer on a loaded machine
/// (or under a coarse timer slack), and 5,000 of them at load 30 held the
/// daemon's one connection for a minute or more, every other statement of
/// the daemon (and `metrics` through its control socket) queued behind it.
extern "C" fn retry_after_a_moment(_: *mut libc::c_void, tries: libc::c_int) -> libc::c_int {
    thread_local! {
        /// When this thread's current wait for a lock began.
        static WAITING_SINCE: std::cell::Cell<Option<std::time::Instant>> =
            const { std::cell::Cell::new(None) };
    }
    // SQLite calls this on the thread that runs the statement (sqlx's worker
    // thread of the connection, never the runtime's), with `tries` 0 at the
    // first call of each wait.
    let now = std::time::Instant::now();
    let since = WAITING_SINCE.with(|since| match since.get() {
        Some(started) if tries > 0 => started,
        _ => {
            since.set(Some(now));
            now
        }
    });
    if now.duration_since(since) >= sqlite_busy_timeout() {
        return 0;
    }
    std::thread::sleep(SQLITE_BUSY_RETRY);
    1
}

/// Has PostgreSQL plan each prepared statement of a connection once.
///
/// By default the server plans a prepared statement afresh for its bound
/// values until a generic plan looks no dearer, which the claim's never
/// does (its `LIMIT $4` is costed as a tenth of the table): every claim was
/// planned again, on a table of sixteen indexes, most of them partial, 0.3 ms
/// of the server's CPU for a statement that then ran in 0.25 ms (profiled
/// while draining NoOp rows: 15 % of the server's CPU). The daemon's
/// statements are written for the plan they get without their values (the
/// runnable index in claim order, rows by id), as on SQLite
/// ([`stable_query_plans`]). A server without the setting (before
/// PostgreSQL 12) keeps its default.
/// The daemon's PostgreSQL sessions: the server ends one that sits in an
/// open transaction for `bound_ms` (its `lease_timeout`), so that a
/// transaction whose connection went silent (a network that drops packets:
/// the daemon gave the call up and closed its end, and nothing of that
/// reached the server) does not hold its row locks until the server's TCP
/// keepalive notices, hours later (see `Store::answered`).
async fn end_abandoned_transactions(
    connection: &mut sqlx::PgConnection,
    bound_ms: u64,
) -> sqlx::Result<()> {
    use sqlx::Executor;
    if bound_ms == 0 {
        return Ok(());
    }
    let set =
        format!("SELECT set_config('idle_in_transaction_session_timeout', '{bound_ms}ms', false)");
    connection.execute(sqlx::AssertSqlSafe(set)).await?;
    Ok(())
}

/// The daemon's bound on a call, in milliseconds (0: none set).
fn bound_ms(bound: &std::sync::atomic::AtomicU64) -> u64 {
    bound.load(std::sync::atomic::Ordering::Relaxed)
}

/// Every statement is written for READ COMMITTED (claims skip locked rows,
/// outcomes wait for their parent's lock and read it as committed): under a
/// database or role SERIALIZABLE by default, two daemons' claims, outcomes
/// and callbacks failed with serialization errors, each retried as an
/// outage. A statement, not a start-up parameter: PgBouncer refuses an
/// `options` naming a setting it does not track.
async fn read_committed(connection: &mut sqlx::PgConnection) -> sqlx::Result<()> {
    use sqlx::Executor;
    connection
        .execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .await?;
    Ok(())
}

async fn generic_plans(connection: &mut sqlx::PgConnection) -> sqlx::Result<()> {
    use sqlx::Executor;
    let set = "SELECT set_config('plan_cache_mode', 'force_generic_plan', false) \
                WHERE current_setting('server_version_num')::int >= 120000";
    connection.execute(set).await?;
    Ok(())
}

/// Starts a write transaction. On SQLite `BEGIN IMMEDIATE` takes the write
/// lock up front, so busy_timeout applies and no snapshot upgrade can fail.
pub(super) async fn begin_write<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> sqlx::Result<sqlx::Transaction<'static, DB>> {
    if DB::NAME == "SQLite" {
        pool.begin_with("BEGIN IMMEDIATE").await
    } else {
        pool.begin().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use sqlx::{ConnectOptions, Connection};

    use crate::store::{ClaimFilter, Pool, Purpose, Store};

    /// A write that waited for another connection's lock goes on within a few
    /// milliseconds of its release. With SQLite's own `busy_timeout` it would
    /// go on only at its next try, and with the lock held 430 ms that is at
    /// 528 ms: about 100 ms late. Best of three, so that one stall of a
    /// loaded machine does not fail it.
    #[tokio::test]
    async fn a_write_held_up_by_another_connection_goes_on_soon_after_the_lock_is_released() {
        let path = std::env::temp_dir().join(format!("taskrunner-busy-{}.db", std::process::id()));
        let url = format!("sqlite://{}", path.display());
        let store = Store::open(&url, Purpose::Daemon).expect("open");
        store.migrate().await.expect("migrate");
        let pool = store.sqlite_pool().expect("a SQLite store").clone();
        let mut latest = Vec::new();
        for _ in 0..3 {
            let mut other = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .connect()
                .await
                .expect("the other connection");
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut other)
                .await
                .expect("the other connection's write lock");
            let write = tokio::spawn({
                let pool = pool.clone();
                async move {
                    sqlx::query("INSERT INTO task_runner_requests (task_class_name, options) VALUES ('NoOp', '')")
                        .execute(&pool)
                        .await
                        .expect("the held-up write");
                    Instant::now()
                }
            });
            tokio::time::sleep(Duration::from_millis(430)).await;
            assert!(!write.is_finished(), "the write did not wait for the lock");
            sqlx::query("COMMIT")
                .execute(&mut other)
                .await
                .expect("commit");
            let released = Instant::now();
            let done = write.await.expect("the write's task");
            latest.push(done.saturating_duration_since(released));
            other.close().await.expect("close");
        }
        store.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let best = latest.iter().min().expect("three tries");
        assert!(
            *best < Duration::from_millis(50),
            "the write went on {best:?} after the lock was released (each try: {latest:?})"
        );
    }

    /// The plan cache mode of a connection of `store`'s PostgreSQL pool.
    async fn plan_cache_mode(store: &Store) -> String {
        let Pool::Postgres(pool) = &store.pool else {
            panic!("a PostgreSQL store");
        };
        sqlx::query_scalar("SELECT current_setting('plan_cache_mode')")
            .fetch_one(pool)
            .await
            .expect("the setting")
    }

    /// A row the CLI enqueues survives a power cut once it says so: its
    /// SQLite connection commits with `synchronous=FULL`, SQLite's default
    /// (an fsync of the log at each commit); the daemon's with NORMAL.
    #[tokio::test]
    async fn the_clis_sqlite_commits_are_durable_and_the_daemons_normal() {
        let path = std::env::temp_dir().join(format!("taskrunner-sync-{}.db", std::process::id()));
        let url = format!("sqlite://{}", path.display());
        for (purpose, expected) in [(Purpose::Daemon, 1), (Purpose::Cli, 2)] {
            let store = Store::open(&url, purpose).expect("open");
            let pool = store.sqlite_pool().expect("a SQLite store").clone();
            let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&pool)
                .await
                .expect("the setting");
            assert_eq!(synchronous, expected, "{purpose:?}");
            store.close().await;
        }
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    /// The daemon's PostgreSQL sessions plan each statement once (see
    /// `generic_plans`), except the one its claims of one queue or type run
    /// on; the CLI's and the web page's keep the server's choice, their
    /// filters being planned best for their values.
    #[tokio::test]
    async fn postgres_plans_the_daemons_statements_once() {
        let url = std::env::var("TASKRUNNER_TEST_DATABASE_URL").expect(
            "TASKRUNNER_TEST_DATABASE_URL is not set: run the suite with scripts/test, which starts a PostgreSQL server",
        );
        let daemon = Store::open(&url, Purpose::Daemon).expect("open");
        assert_eq!(plan_cache_mode(&daemon).await, "force_generic_plan");
        let Pool::Postgres(pool) = &daemon.pool else {
            panic!("a PostgreSQL store");
        };
        for (queue, task, mode) in [
            (None, None, "force_generic_plan"),
            (Some("mail"), None, "auto"),
            (None, Some("Thumbnail"), "auto"),
        ] {
            let filter = ClaimFilter {
                queue,
                task,
                ..Default::default()
            };
            let claims = daemon.claim_pool(pool, &filter);
            let setting: String = sqlx::query_scalar("SELECT current_setting('plan_cache_mode')")
                .fetch_one(claims)
                .await
                .expect("the setting");
            assert_eq!(setting, mode, "claims of queue {queue:?}, type {task:?}");
        }
        daemon.close().await;
        let cli = Store::open(&url, Purpose::Cli).expect("open");
        assert_eq!(plan_cache_mode(&cli).await, "auto");
        cli.close().await;
    }
}
