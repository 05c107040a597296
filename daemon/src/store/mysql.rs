//! MariaDB (≥ 10.6) and MySQL (≥ 8.0.1): what their dialect needs beyond
//! the statements of [`super::sql`].
//!
//! - Parameters: the statements are written once with `$N`; MySQL only
//!   knows positional `?`, each bound once in order. [`query`] rewrites a
//!   statement (cached) and binds its values in the order and number the
//!   `?`s need, so the callers bind `$1, $2, …` as on the other backends.
//! - No `UPDATE … RETURNING` (neither MariaDB 10.11 nor MySQL 8 has it): the
//!   claim is `SELECT … FOR UPDATE SKIP LOCKED`, then `UPDATE` by primary
//!   key, then a read of the claimed rows, in one short READ COMMITTED
//!   transaction ([`claim`]). A batch of outcomes locks its rows, then
//!   writes them in one `UPDATE … JOIN JSON_TABLE`
//!   (`Store::record_outcomes_mysql`). Inserts read `LAST_INSERT_ID()`.
//! - Deadlocks (1213) and lock-wait timeouts (1205) are part of InnoDB's
//!   normal life under concurrent claims: such a transaction is retried
//!   after a random pause ([`retry_locks`]) and counted (`status`).
//! - No partial indexes: a stored generated column `claim_rank` (`-priority`
//!   for a runnable row, NULL otherwise) carries the runnable rule, so the
//!   claim reads the range `claim_rank IS NOT NULL` of one index in claim
//!   order with no filesort; `active_unique_key` carries the unique rule.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use sqlx::mysql::{MySql, MySqlArguments, MySqlDatabaseError, MySqlQueryResult, MySqlRow};
use sqlx::{Arguments, Row};

use super::{ClaimFilter, Claimant, RowExt, Store};
use crate::request::Claimed;
use sqlx::{Acquire, MySqlPool};

/// The oldest servers whose `SKIP LOCKED` and JSON functions the
/// statements rely on.
pub(crate) const MARIADB_MINIMUM: (u32, u32) = (10, 6);
pub(crate) const MYSQL_MINIMUM: (u32, u32, u32) = (8, 0, 1);

/// A value bound to a statement, kept so that it can be bound at each `?`
/// that stands for its `$N`.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    Int(Option<i64>),
    Float(Option<f64>),
    Text(Option<String>),
}

/// What `bind` accepts: the types the store binds.
pub(crate) trait Bind {
    fn value(self) -> Value;
}

macro_rules! bind_as {
    ($variant:ident, $($ty:ty => $convert:expr),* $(,)?) => {
        $(impl Bind for $ty {
            #[allow(clippy::redundant_closure_call)]
            fn value(self) -> Value {
                Value::$variant(($convert)(self))
            }
        })*
    };
}

bind_as!(Int,
    i64 => Some,
    Option<i64> => |v| v,
    i32 => |v: i32| Some(i64::from(v)),
    u32 => |v: u32| Some(i64::from(v)),
    bool => |v: bool| Some(i64::from(v)),
);
bind_as!(Float,
    f64 => Some,
    Option<f64> => |v| v,
);
bind_as!(Text,
    &str => |v: &str| Some(v.to_string()),
    Option<&str> => |v: Option<&str>| v.map(str::to_string),
    String => Some,
    &String => |v: &String| Some(v.clone()),
    Option<String> => |v| v,
);

/// A statement rewritten for MySQL: `?` for each `$N`, and which N each is.
struct Positional {
    sql: String,
    order: Vec<usize>,
}

/// Rewrites `$N` parameters (outside string literals) to `?`.
fn positional(sql: &str) -> Positional {
    let mut out = String::with_capacity(sql.len());
    let mut order = Vec::new();
    let mut in_string = false;
    let mut chars = sql.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c == '\'' {
            in_string = !in_string;
        }
        if c == '$' && !in_string {
            let mut number = String::new();
            while let Some(&(_, d)) = chars.peek() {
                if d.is_ascii_digit() {
                    number.push(d);
                    chars.next();
                } else {
                    break;
                }
            }
            if let Ok(n) = number.parse::<usize>() {
                out.push('?');
                order.push(n);
                continue;
            }
            out.push('$');
            out.push_str(&number);
            continue;
        }
        out.push(c);
    }
    Positional { sql: out, order }
}

/// The spellings MySQL needs for what the shared statements write the
/// PostgreSQL way: `a IS [NOT] DISTINCT FROM b` is `[NOT] (a <=> b)`, and
/// the runnable rule ([`super::sql::RUNNABLE`]) is the generated column
/// `claim_rank`, so that its index serves it.
fn respell(sql: &str) -> String {
    let mut sql = sql.replace(super::sql::RUNNABLE, "claim_rank IS NOT NULL");
    for (words, negate) in [
        (" IS NOT DISTINCT FROM ", ""),
        (" IS DISTINCT FROM ", "NOT "),
    ] {
        while let Some(at) = sql.find(words) {
            let left_start = sql[..at]
                .rfind(|c: char| c.is_whitespace() || c == '(')
                .map_or(0, |i| i + 1);
            let right_start = at + words.len();
            let right_end = sql[right_start..]
                .find(|c: char| c.is_whitespace() || c == ')')
                .map_or(sql.len(), |i| right_start + i);
            let spelled = format!(
                "{negate}({} <=> {})",
                &sql[left_start..at],
                &sql[right_start..right_end]
            );
            sql.replace_range(left_start..right_end, &spelled);
        }
    }
    sql
}

fn rewritten(sql: &str) -> Arc<Positional> {
    static CACHE: LazyLock<Mutex<HashMap<String, Arc<Positional>>>> =
        LazyLock::new(Default::default);
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(found) = cache.get(sql) {
        return found.clone();
    }
    let statement = Arc::new(positional(&respell(sql)));
    // Statements are a fixed set, plus a few shapes built per call (the
    // claim's id list); a bound keeps a bug from growing it without end.
    if cache.len() > 10_000 {
        cache.clear();
    }
    cache.insert(sql.to_string(), statement.clone());
    statement
}

/// A statement with `$N` parameters, bound by number as on the other backends.
pub(crate) struct Query {
    statement: Arc<Positional>,
    values: Vec<Value>,
}

/// Starts a statement (the MySQL arm's `query` in `on_pool!`).
/// The name of task type `$1`'s claim lock (`GET_LOCK`): lock names are the
/// server's, so the database's own, as the migration's is. Before, it was
/// `taskrunner:` and the type's SHA1 alone, and the claims of a type of one
/// name waited for each other across every database on the server (two
/// applications', or a test's and another's). At most 64 characters.
macro_rules! type_lock {
    () => {
        "CONCAT('taskrunner:', SHA1(CONCAT(DATABASE(), ':', $1)))"
    };
}

pub(crate) fn query(sql: impl sqlx::SqlSafeStr) -> Query {
    let sql = sql.into_sql_str();
    Query {
        statement: rewritten(sql.as_str()),
        values: Vec::new(),
    }
}

impl Query {
    /// Binds the next parameter: `$1`, then `$2`, …
    pub(crate) fn bind(mut self, value: impl Bind) -> Query {
        self.values.push(value.value());
        self
    }

    fn build(self) -> sqlx::Result<sqlx::query::Query<'static, MySql, MySqlArguments>> {
        let mut arguments = MySqlArguments::default();
        for &n in &self.statement.order {
            match self.values.get(n.wrapping_sub(1)) {
                Some(Value::Int(v)) => arguments.add(*v),
                Some(Value::Float(v)) => arguments.add(*v),
                Some(Value::Text(v)) => arguments.add(v.clone()),
                None => Err(format!("parameter ${n} is not bound").into()),
            }
            .map_err(sqlx::Error::Encode)?;
        }
        let sql = sqlx::AssertSqlSafe(self.statement.sql.clone());
        Ok(sqlx::query_with(sql, arguments))
    }

    pub(crate) async fn execute<'e, E>(self, executor: E) -> sqlx::Result<MySqlQueryResult>
    where
        E: sqlx::Executor<'e, Database = MySql>,
    {
        self.build()?.execute(executor).await
    }

    pub(crate) async fn fetch_all<'e, E>(self, executor: E) -> sqlx::Result<Vec<MySqlRow>>
    where
        E: sqlx::Executor<'e, Database = MySql>,
    {
        self.build()?.fetch_all(executor).await
    }

    pub(crate) async fn fetch_one<'e, E>(self, executor: E) -> sqlx::Result<MySqlRow>
    where
        E: sqlx::Executor<'e, Database = MySql>,
    {
        self.build()?.fetch_one(executor).await
    }
}

impl RowExt for MySqlRow {
    // Lenient: an integer may come back as any integer type, unsigned, or
    // a decimal (sums); a float as a double, a decimal or an integer.
    fn int(&self, index: usize) -> sqlx::Result<i64> {
        Ok(self.opt_int(index)?.unwrap_or(0))
    }
    fn opt_int(&self, index: usize) -> sqlx::Result<Option<i64>> {
        if let Ok(value) = self.try_get::<Option<i64>, _>(index) {
            return Ok(value);
        }
        if let Ok(value) = self.try_get::<Option<u64>, _>(index) {
            return Ok(value.map(|v| i64::try_from(v).unwrap_or(i64::MAX)));
        }
        if let Ok(value) = self.try_get::<Option<f64>, _>(index) {
            return Ok(value.map(|v| v as i64));
        }
        Ok(self
            .opt_text(index)?
            .and_then(|text| text.trim().parse::<f64>().ok())
            .map(|v| v as i64))
    }
    fn opt_float(&self, index: usize) -> sqlx::Result<Option<f64>> {
        if let Ok(value) = self.try_get::<Option<f64>, _>(index) {
            return Ok(value);
        }
        if let Ok(value) = self.try_get::<Option<i64>, _>(index) {
            return Ok(value.map(|v| v as f64));
        }
        Ok(self
            .opt_text(index)?
            .and_then(|text| text.trim().parse::<f64>().ok()))
    }
    fn opt_bytes(&self, index: usize) -> sqlx::Result<Option<Vec<u8>>> {
        match self.try_get::<Option<Vec<u8>>, _>(index) {
            Ok(value) => Ok(value),
            Err(error) => match self.try_get::<Option<i64>, _>(index) {
                Ok(value) => Ok(value.map(|v| v.to_string().into_bytes())),
                Err(_) => Err(error),
            },
        }
    }
}

/// Whether `error` is a deadlock (1213) or a lock-wait timeout (1205):
/// InnoDB rolled the statement or transaction back, and running the
/// transaction again is the remedy.
pub(crate) fn is_lock_conflict(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .and_then(|error| match error {
                sqlx::Error::Database(error) => error.try_downcast_ref::<MySqlDatabaseError>(),
                _ => None,
            })
            .is_some_and(|error| matches!(error.number(), 1213 | 1205))
    })
}

/// How many times a transaction that hit a deadlock or lock-wait timeout
/// is run again before the error is the caller's.
const LOCK_RETRIES: u32 = 20;

/// Runs `transaction` again after a deadlock or lock-wait timeout, after a
/// random pause that grows with each attempt, counting each in `counter`.
pub(crate) async fn retry_locks<T, F, Fut>(
    counter: &AtomicU64,
    mut transaction: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut attempt = 0;
    loop {
        match transaction().await {
            Err(error) if attempt < LOCK_RETRIES && is_lock_conflict(&error) => {
                attempt += 1;
                counter.fetch_add(1, Ordering::Relaxed);
                let ceiling = 2u64.saturating_pow(attempt.min(6)).min(50);
                let pause = rand_below(ceiling * 1000) + 200;
                tracing::debug!(
                    "lock conflict, retrying in {pause} µs (attempt {attempt}): {}",
                    crate::error_line(&error)
                );
                tokio::time::sleep(Duration::from_micros(pause)).await;
            }
            other => return other,
        }
    }
}

/// A random number below `n` (jitter; no need for a good generator).
fn rand_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    hasher.finish() % n.max(1)
}

/// `VERSION()` → whether it is MariaDB, and (major, minor, patch).
pub(crate) fn parse_version(version: &str) -> (bool, (u32, u32, u32)) {
    let mariadb = version.to_ascii_lowercase().contains("mariadb");
    // "5.5.5-10.11.6-MariaDB" (old replication prefix) names MariaDB after it.
    let text = version.strip_prefix("5.5.5-").unwrap_or(version);
    let mut numbers = text
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let major = numbers.next().unwrap_or(0);
    let minor = numbers.next().unwrap_or(0);
    let patch = numbers.next().unwrap_or(0);
    (mariadb, (major, minor, patch))
}

/// `None` if the server is new enough, else the one line that says why not.
pub(crate) fn version_refusal(version: &str) -> Option<String> {
    let (mariadb, (major, minor, patch)) = parse_version(version);
    if mariadb {
        let (need_major, need_minor) = MARIADB_MINIMUM;
        ((major, minor) < MARIADB_MINIMUM).then(|| {
            format!("the server is MariaDB {major}.{minor}.{patch} ({version}): taskrunner needs MariaDB {need_major}.{need_minor} or newer (FOR UPDATE SKIP LOCKED)")
        })
    } else {
        let (need_major, need_minor, need_patch) = MYSQL_MINIMUM;
        ((major, minor, patch) < MYSQL_MINIMUM).then(|| {
            format!("the server is MySQL {major}.{minor}.{patch} ({version}): taskrunner needs MySQL {need_major}.{need_minor}.{need_patch} or newer (FOR UPDATE SKIP LOCKED)")
        })
    }
}

/// The smallest `max_allowed_packet` taskrunner works with: MariaDB's
/// default. A statement past it is refused and its connection closed, so
/// an outcome too large for it would be retried for ever. What the daemon
/// writes is bounded under it: one result text (`output_tail` at most
/// 4 MiB, each byte that is not UTF-8 stored as three), outcomes written
/// together (2 MiB of text), a row it composes (8 MiB).
pub(crate) const MIN_PACKET: i64 = 16 << 20;

/// `None` if the server's `max_allowed_packet` (`packet`, bytes) is large
/// enough, else the one line that says why not.
pub(crate) fn packet_refusal(packet: i64) -> Option<String> {
    (packet < MIN_PACKET).then(|| {
        format!(
            "the server's max_allowed_packet is {}: taskrunner needs at least {} (a result text may take 12MiB, a callback's options 8MiB); set max_allowed_packet = 16M in the server's config (MariaDB's default)",
            crate::units::format_size(packet.max(0) as u64),
            crate::units::format_size(MIN_PACKET as u64)
        )
    })
}

/// Each connection: a strict `sql_mode` (a value that does not fit is an
/// error, never silently truncated), `||` as concatenation (the shared
/// statements use it), READ COMMITTED, so that the claim's locking read
/// takes no gap locks and sees rows committed since its transaction began,
/// and autocommit on: a server whose default is off (`autocommit = 0` in
/// its config) left each single statement in a transaction never
/// committed, so that `taskrunner-cli enqueue` printed an id and the row
/// was gone when it disconnected. (sqlx sets the time zone to UTC and the
/// names to utf8mb4.)
pub(crate) async fn configure_session(connection: &mut sqlx::MySqlConnection) -> sqlx::Result<()> {
    sqlx::raw_sql(
        "SET SESSION sql_mode = 'STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ZERO_DATE,\
             NO_ZERO_IN_DATE,NO_ENGINE_SUBSTITUTION,PIPES_AS_CONCAT', \
             SESSION innodb_lock_wait_timeout = 10, SESSION autocommit = 1; \
         SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
    )
    .execute(connection)
    .await
    .map(|_| ())
}

/// The daemon's sessions: the server ends one that sits in an open
/// transaction for `bound_ms` (its `lease_timeout`), so that a transaction
/// whose connection went silent does not hold its row locks for hours (see
/// `Store::answered`). MariaDB's `idle_transaction_timeout`; MySQL has no
/// such setting, and there such a session lasts until `wait_timeout`.
pub(crate) async fn end_abandoned_transactions(
    connection: &mut sqlx::MySqlConnection,
    bound_ms: u64,
) -> sqlx::Result<()> {
    if bound_ms == 0 {
        return Ok(());
    }
    let seconds = bound_ms.div_ceil(1000).max(1);
    let set = format!("SET SESSION idle_transaction_timeout = {seconds}");
    match sqlx::raw_sql(sqlx::AssertSqlSafe(set))
        .execute(connection)
        .await
    {
        Ok(_) => Ok(()),
        // MySQL: unknown system variable.
        Err(sqlx::Error::Database(error))
            if error
                .try_downcast_ref::<MySqlDatabaseError>()
                .is_some_and(|error| error.number() == 1193) =>
        {
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Reads the first column of the first row as an integer.
pub(crate) fn first_int(rows: &[MySqlRow]) -> sqlx::Result<Option<i64>> {
    match rows.first() {
        Some(row) => row.opt_int(0),
        None => Ok(None),
    }
}

/// `$first, $first+1, …` for `n` parameters: an `IN (…)` list.
pub(crate) fn parameter_list(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---- the statements that take another shape on MySQL ----

impl Store {
    /// The release of due delayed rows on MariaDB/MySQL (see
    /// `Store::release_delays`): in one READ COMMITTED transaction, lock up
    /// to `RELEASE_AT_ONCE` due ids, skipping rows another writer holds
    /// locked, then write them by primary key. Run again after a deadlock
    /// or lock-wait timeout.
    pub(super) async fn release_delays_mysql(&self, pool: &MySqlPool) -> anyhow::Result<u64> {
        retry_locks(&self.lock_retries, || async {
            let mut transaction = pool.begin().await?;
            let ids: Vec<i64> = query(self.sql.release_delays.as_str())
                .fetch_all(&mut *transaction)
                .await?
                .iter()
                .map(|row| row.int(0))
                .collect::<sqlx::Result<_>>()?;
            let mut released = 0;
            if !ids.is_empty() {
                let update = format!(
                    "UPDATE task_runner_requests SET delay_passed_at = UTC_TIMESTAMP(6) WHERE id IN ({})",
                    parameter_list(1, ids.len())
                );
                let mut update = query(sqlx::AssertSqlSafe(update));
                for id in &ids {
                    update = update.bind(*id);
                }
                released = update.execute(&mut *transaction).await?.rows_affected();
            }
            transaction.commit().await?;
            Ok(released)
        })
        .await
    }

    /// The claim on MariaDB/MySQL: in one READ COMMITTED transaction, lock
    /// up to `limit` runnable ids in claim order, skipping rows other
    /// daemons hold locked; write the claim on them by primary key; read
    /// them back. With `type_limit`, a named lock per task type serialises
    /// the count of its running rows and the claim across daemons. Run
    /// again after a deadlock or lock-wait timeout.
    pub(super) async fn claim_mysql(
        &self,
        pool: &MySqlPool,
        by: Claimant<'_>,
        limit: usize,
        filter: &ClaimFilter<'_>,
        type_limit: Option<u32>,
    ) -> anyhow::Result<Vec<(i64, Claimed)>> {
        retry_locks(&self.lock_retries, || async {
            let lock = match (type_limit, filter.task) {
                (Some(_), Some(task)) => Some(task),
                _ => None,
            };
            let mut connection = TypeLockHolder {
                connection: pool.acquire().await?,
                released: lock.is_none(),
            };
            let connection = &mut connection;
            if let Some(task) = lock {
                // Waits for another daemon's claim of this type, in whole
                // seconds (see `type_lock_wait`).
                let wait = self.type_lock_wait().as_secs();
                let got: Option<i64> = query(concat!("SELECT GET_LOCK(", type_lock!(), ", $2)"))
                    .bind(task)
                    .bind(wait as i64)
                    .fetch_one(&mut *connection.connection)
                    .await?
                    .try_get(0)?;
                if got != Some(1) {
                    connection.released = true;
                    // Claiming without the lock could run more of the type
                    // at once than its limit. Its rows wait for a later claim.
                    tracing::warn!(
                        "the claim of {task} waited {wait} s for another daemon's claim of that type (its lock): claiming none of its rows this time"
                    );
                    return Ok(Vec::new());
                }
            }
            let claimed = self
                .claim_mysql_transaction(&mut connection.connection, by, limit, filter, type_limit)
                .await;
            if let Some(task) = lock {
                let released = query(concat!("DO RELEASE_LOCK(", type_lock!(), ")"))
                    .bind(task)
                    .execute(&mut *connection.connection)
                    .await;
                // A connection that may still hold the lock is not reused.
                connection.released = released.is_ok();
            }
            claimed
        })
        .await
    }

    async fn claim_mysql_transaction(
        &self,
        connection: &mut sqlx::MySqlConnection,
        by: Claimant<'_>,
        limit: usize,
        filter: &ClaimFilter<'_>,
        type_limit: Option<u32>,
    ) -> anyhow::Result<Vec<(i64, Claimed)>> {
        let sql = self.sql;
        let mut transaction = connection.begin().await?;
        let mut room = limit as i64;
        if let (Some(type_limit), Some(task)) = (type_limit, filter.task) {
            let rows = query(sql.running_of_type.as_str())
                .bind(task)
                .fetch_all(&mut *transaction)
                .await?;
            let running = first_int(&rows)?.unwrap_or(0);
            room = (i64::from(type_limit) - running).clamp(0, limit as i64);
            self.count_statements(2);
        }
        if room == 0 {
            transaction.commit().await?;
            return Ok(Vec::new());
        }
        // A limited type's own claim names it: nothing else to leave out.
        let excluded_tasks: &[String] = if type_limit.is_some() {
            &[]
        } else {
            filter.excluded_tasks
        };
        // Several queues apart (see `ClaimFilter::apart`; never types
        // here): their names after the excluded types, and no queue to
        // leave out.
        let apart = filter.apart.map_or(&[][..], |(_, names)| names);
        let (statement, excluded_queues) = match filter.apart {
            None => (sql.claim_select.clone(), filter.excluded_queues),
            Some((by, names)) => {
                let first = 8 + excluded_tasks.len();
                let statement = sql.claim_apart_statement(by, names.len(), first);
                (statement, &[][..])
            }
        };
        let mut select = if excluded_tasks.is_empty() {
            statement.replace("AND task_class_name NOT IN ({excluded})", "")
        } else {
            statement.replace("{excluded}", &parameter_list(8, excluded_tasks.len()))
        };
        select = if excluded_queues.is_empty() {
            select.replace("AND queue NOT IN ({excluded_queues})", "")
        } else {
            select.replace(
                "{excluded_queues}",
                &parameter_list(8 + excluded_tasks.len(), excluded_queues.len()),
            )
        };
        let mut select_ids = query(sqlx::AssertSqlSafe(select))
            .bind(by.token.as_str())
            .bind(by.instance)
            .bind(by.host)
            .bind(room)
            .bind(filter.node)
            .bind(filter.queue.unwrap_or(""))
            .bind(filter.task.unwrap_or(""));
        for name in excluded_tasks.iter().chain(excluded_queues).chain(apart) {
            select_ids = select_ids.bind(name.as_str());
        }
        let ids: Vec<i64> = select_ids
            .fetch_all(&mut *transaction)
            .await?
            .iter()
            .map(|row| row.int(0))
            .collect::<sqlx::Result<_>>()?;
        if ids.is_empty() {
            self.count_statements(3);
            transaction.commit().await?;
            return Ok(Vec::new());
        }
        let update = sql
            .claim_update
            .replace("{ids}", &parameter_list(4, ids.len()));
        let mut update = query(sqlx::AssertSqlSafe(update))
            .bind(by.token.as_str())
            .bind(by.instance)
            .bind(by.host);
        for id in &ids {
            update = update.bind(*id);
        }
        update.execute(&mut *transaction).await?;
        let read = sql
            .claimed_rows
            .replace("{ids}", &parameter_list(1, ids.len()))
            .replace("{cap}", &self.inline_cap(filter).to_string());
        let mut read = query(sqlx::AssertSqlSafe(read));
        for id in &ids {
            read = read.bind(*id);
        }
        let rows = read
            .fetch_all(&mut *transaction)
            .await?
            .iter()
            .map(|row| super::claimed_from_row(row, by.token))
            .collect::<sqlx::Result<Vec<_>>>()?;
        transaction.commit().await?;
        // BEGIN, select, update, read, COMMIT.
        self.count_statements(5);
        Ok(rows)
    }

    /// The queues that have any row, runnable or not, by name, or `None`
    /// if there are more than `limit`: a skip scan of `by_queue` done here,
    /// a statement (one index probe) per queue. In one statement MariaDB
    /// 10.11 read the whole index: the recursive skip scan the other
    /// backends run always, and `SELECT DISTINCT queue` (a loose index scan
    /// when prepared) once its prepared statement ran again after the
    /// table had changed (50 ms a claim on the benchmark's table). A queue
    /// without runnable rows costs its branch of the claim one probe. A
    /// table found with more than `limit` queues is not scanned again for
    /// a minute: its claims walk, without `limit` statements first.
    pub(super) async fn queues_with_rows_mysql(
        &self,
        pool: &sqlx::MySqlPool,
        limit: usize,
    ) -> anyhow::Result<Option<Vec<String>>> {
        const RESCAN_AFTER: std::time::Duration = std::time::Duration::from_secs(60);
        let many = || {
            self.many_queues_until
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        if many().is_some_and(|until| std::time::Instant::now() < until) {
            return Ok(None);
        }
        let mut connection = pool.acquire().await?;
        let mut queues: Vec<String> = Vec::new();
        loop {
            self.count_statements(1);
            // The first by `min` (a queue named '' included), then each next.
            let rows = match queues.last() {
                None => query("SELECT min(queue) FROM task_runner_requests"),
                Some(after) => query(self.sql.runnable_queues.as_str()).bind(after.as_str()),
            }
            .fetch_all(&mut *connection)
            .await?;
            let Some(queue) = rows
                .first()
                .map(|row| row.opt_text(0))
                .transpose()?
                .flatten()
            else {
                return Ok(Some(queues));
            };
            queues.push(queue);
            if queues.len() > limit {
                *many() = Some(std::time::Instant::now() + RESCAN_AFTER);
                return Ok(None);
            }
        }
    }

    /// `claim_one` on MariaDB/MySQL: the claim's `UPDATE` on one row if it
    /// is runnable, and the row read back, in one transaction.
    pub(super) async fn claim_one_mysql(
        &self,
        pool: &MySqlPool,
        id: i64,
        by: Claimant<'_>,
    ) -> anyhow::Result<Option<Claimed>> {
        let sql = self.sql;
        retry_locks(&self.lock_retries, || async {
            let mut transaction = pool.begin().await?;
            let update = sql
                .claim_one
                .split(" RETURNING ")
                .next()
                .unwrap_or_default();
            let took = query(sqlx::AssertSqlSafe(update.to_string()))
                .bind(by.token.as_str())
                .bind(by.instance)
                .bind(by.host)
                .bind(id)
                .execute(&mut *transaction)
                .await?
                .rows_affected()
                == 1;
            let claimed = if took {
                let read = sql
                    .claimed_rows
                    .replace("{ids}", "$1")
                    .replace("{cap}", &self.options_cap().to_string());
                let rows = query(sqlx::AssertSqlSafe(read))
                    .bind(id)
                    .fetch_all(&mut *transaction)
                    .await?;
                match rows.first() {
                    Some(row) => Some(super::claimed_from_row(row, by.token)?.1),
                    None => None,
                }
            } else {
                None
            };
            transaction.commit().await?;
            Ok(claimed)
        })
        .await
    }
}

/// A pooled connection that may hold a task type's named lock (`GET_LOCK`,
/// which belongs to the session, not to a transaction): dropped before its
/// release (`released`), it is closed instead of going back to the pool.
/// A claim given up while it held the lock (its call outlived
/// `lease_timeout`: a metadata lock held up its statement) dropped the
/// connection mid-way: the pool took it back still holding the lock, and
/// every daemon's claim of that type waited for it, and claimed none of
/// its rows, for as long as the connection lived (up to 30 minutes).
struct TypeLockHolder {
    connection: sqlx::pool::PoolConnection<sqlx::MySql>,
    released: bool,
}

impl Drop for TypeLockHolder {
    fn drop(&mut self) {
        if !self.released {
            self.connection.close_on_drop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_parameters_become_positional_in_order_and_repeated() {
        let p = positional("SELECT '$1', $2 FROM t WHERE a = $1 AND b = $12 AND c = '$[*]'");
        assert_eq!(
            p.sql,
            "SELECT '$1', ? FROM t WHERE a = ? AND b = ? AND c = '$[*]'"
        );
        assert_eq!(p.order, vec![2, 1, 12]);
    }

    #[test]
    fn distinct_from_and_the_runnable_rule_are_respelled() {
        assert_eq!(
            respell(
                "WHERE (claimed_by IS DISTINCT FROM $2) AND claim_token IS NOT DISTINCT FROM $3"
            ),
            "WHERE (NOT (claimed_by <=> $2)) AND (claim_token <=> $3)"
        );
        let runnable = format!("SELECT 1 WHERE {} AND x", super::super::sql::RUNNABLE);
        assert_eq!(
            respell(&runnable),
            "SELECT 1 WHERE claim_rank IS NOT NULL AND x"
        );
    }

    #[test]
    fn versions_below_the_minimum_are_refused_naming_both() {
        assert!(version_refusal("10.11.19-MariaDB-0+deb12u1").is_none());
        assert!(version_refusal("8.0.36").is_none());
        assert!(version_refusal("8.4.0").is_none());
        let old = version_refusal("10.5.23-MariaDB").unwrap();
        assert!(
            old.contains("MariaDB 10.5.23") && old.contains("10.6 or newer"),
            "{old}"
        );
        let old = version_refusal("5.7.44-log").unwrap();
        assert!(
            old.contains("MySQL 5.7.44") && old.contains("8.0.1 or newer"),
            "{old}"
        );
        assert!(version_refusal("5.5.5-10.4.1-MariaDB").is_some());
    }

    #[test]
    fn a_max_allowed_packet_under_16_mib_is_refused_naming_both() {
        assert!(packet_refusal(16 << 20).is_none());
        assert!(packet_refusal(64 << 20).is_none());
        let small = packet_refusal(4 << 20).unwrap();
        assert!(
            small.contains("max_allowed_packet is 4MiB") && small.contains("at least 16MiB"),
            "{small}"
        );
    }
}
