//! Claims: which runnable rows a daemon takes, in one statement (see
//! [`Sql::claim`](super::sql::Sql::claim)), with the claim token that fences
//! every later write about the try; and when the next delayed row falls due.

use anyhow::Result;
use sqlx::query;

use super::{begin_write, Backend, Pool, RowExt, Store};
use crate::instance::ClaimToken;
use crate::request::{Claimed, RequestId};

/// The pool a claim runs on: the store's own, except PostgreSQL's claims
/// of one queue or type (see `Store::claim_pool`).
trait ClaimOn {
    fn claim_on<'a>(&'a self, _store: &'a Store, _filter: &ClaimFilter<'_>) -> &'a Self {
        self
    }
}

impl ClaimOn for sqlx::SqlitePool {}

impl ClaimOn for sqlx::MySqlPool {}

impl ClaimOn for sqlx::PgPool {
    fn claim_on<'a>(&'a self, store: &'a Store, filter: &ClaimFilter<'_>) -> &'a Self {
        store.claim_pool(self, filter)
    }
}

/// Who claims: the claim token that fences every later write about each
/// try, the daemon instance and its host (written on each claimed row).
#[derive(Debug, Clone, Copy)]
pub struct Claimant<'a> {
    pub token: &'a ClaimToken,
    pub instance: &'a str,
    pub host: &'a str,
}

/// Which runnable rows a claim may take.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClaimFilter<'a> {
    /// This daemon's node name: rows pinned elsewhere, or barred from here, are skipped.
    pub(crate) node: &'a str,
    /// Only this queue (`None`: any).
    pub(crate) queue: Option<&'a str>,
    /// Only this task type (`None`: any).
    pub(crate) task: Option<&'a str>,
    /// Task types to leave alone (those with a concurrency limit, claimed
    /// apart, and paused ones).
    pub(crate) excluded_tasks: &'a [String],
    /// Queues to leave alone (paused ones).
    pub(crate) excluded_queues: &'a [String],
    /// Only these queues (or task types), each read through its own index
    /// (`queue` and `task` are then `None`): the claim of a daemon serving
    /// every queue while some are paused (or while some types are left
    /// out), which would otherwise walk past the rows it leaves out.
    pub(crate) apart: Option<(ApartBy, &'a [String])>,
    /// Options longer than this come back left out (their length alone),
    /// even under `max_options`: a claim that takes rows ahead of its free
    /// slots, so that rows waiting for a slot never hold large options in
    /// the daemon's memory. `None`: `max_options`.
    pub(crate) options_inline: Option<u64>,
}

/// What a claim reads apart, each through its own index
/// ([`ClaimFilter::apart`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApartBy {
    Queue,
    Type,
}

impl ClaimFilter<'_> {
    /// Whether the claim takes one queue's rows, and one type's (an empty
    /// name takes any): which claim statement runs, and on PostgreSQL on
    /// which connection.
    pub(crate) fn narrows_to(&self) -> (bool, bool) {
        let named = |name: Option<&str>| name.is_some_and(|name| !name.is_empty());
        (named(self.queue), named(self.task))
    }
}

pub(super) fn claimed_from_row(
    row: &impl RowExt,
    claim_token: &ClaimToken,
) -> sqlx::Result<(i64, Claimed)> {
    Ok((
        row.int(5)?,
        Claimed {
            id: RequestId(row.int(0)?),
            task_class_name: row.text(1)?,
            options: row.opt_bytes(2)?.unwrap_or_default(),
            tries: row.int(3)?,
            try_limit: row.int(4)?,
            claim_token: claim_token.clone(),
            queue: row.text(6)?,
            periodic: row.int(7)? > 0,
            // Not a number when a time was infinite (PostgreSQL).
            waited: row
                .opt_float(8)?
                .filter(|waited| waited.is_finite())
                .unwrap_or(0.0),
            batch_id: row.opt_int(9)?,
            callback_of_batch: row.opt_int(10)?,
            has_callbacks: row.int(11)? > 0,
            options_length: row.int(12)?.max(0) as u64,
            cancel_requested: row.int(13)? > 0,
        },
    ))
}

/// Binds `$1..$10` of [`Sql::claim`](super::sql::Sql::claim): who claims
/// (a [`Claimant`]), how many rows, the filter's node and queue, the
/// task type ('' for any), the excluded types (a JSON array), the
/// options cap and the excluded queues (a JSON array) (a macro, so that it
/// serves the pool and a transaction alike).
macro_rules! bind_claim {
    ($query:expr, $by:expr, $limit:expr, $filter:expr, $task:expr, $excluded:expr, $cap:expr, $queues:expr $(,)?) => {{
        let (by, filter): (Claimant<'_>, &ClaimFilter<'_>) = ($by, $filter);
        $query
            .bind(by.token.as_str())
            .bind(by.instance)
            .bind(by.host)
            .bind($limit)
            .bind(filter.node)
            .bind(filter.queue.unwrap_or(""))
            .bind($task)
            .bind($excluded)
            .bind($cap)
            .bind($queues)
    }};
}

/// Claimed rows in claim order: by priority, highest first, then id
/// (`RETURNING` has no order on PostgreSQL, and MySQL's claim reads the
/// rows apart). Reversed, not negated: SQLite holds `i64::MIN` too.
fn in_claim_order(mut rows: Vec<(i64, Claimed)>) -> Vec<Claimed> {
    rows.sort_by_key(|(priority, claimed)| (std::cmp::Reverse(*priority), claimed.id));
    rows.into_iter().map(|(_, claimed)| claimed).collect()
}

impl Store {
    /// Claims up to `limit` runnable rows of any queue and type, in one
    /// statement (see [`Sql::claim`](super::sql::Sql::claim)), returned in claim order.
    /// A delayed row is among them only once released (see
    /// [`release_delays`](Store::release_delays), which the daemon's scheduler runs).
    pub async fn claim(&self, by: Claimant<'_>, limit: usize) -> Result<Vec<Claimed>> {
        let filter = ClaimFilter {
            node: by.host,
            ..Default::default()
        };
        self.claim_filtered(by, limit, &filter).await
    }

    /// The queues (or task types, `by`) with runnable rows but `left_out`,
    /// which a claim of every other one reads apart, each through its own
    /// index ([`ClaimFilter::apart`]); `None` when more than
    /// [`APART_AT_MOST`](super::sql::APART_AT_MOST) have runnable rows (the
    /// claim then leaves `left_out` out as it walks the runnable index). On
    /// MariaDB/MySQL the queues that have any row, runnable or not (see
    /// `Store::queues_with_rows_mysql`), and never types: finding them
    /// there takes a statement per type, and its claims walk past the
    /// types they leave out.
    pub(crate) async fn apart(
        &self,
        by: ApartBy,
        left_out: &[String],
    ) -> Result<Option<Vec<String>>> {
        // Never types on MariaDB/MySQL (see above).
        if by == ApartBy::Type
            && (self.backend() == Backend::MySql || !self.left_out_backlog(left_out).await?)
        {
            return Ok(None);
        }
        let sql = self.sql.runnable(by);
        let runnable = on_pool!(self, pool => {
            self.count_statements(1);
            query(sqlx::AssertSqlSafe(sql))
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| row.text(0))
                .collect::<sqlx::Result<Vec<_>>>()?
        }, mysql pool => {
            match self.queues_with_rows_mysql(pool, super::sql::APART_AT_MOST).await? {
                Some(queues) => queues,
                None => return Ok(None),
            }
        });
        Ok((runnable.len() <= super::sql::APART_AT_MOST).then(|| {
            runnable
                .into_iter()
                .filter(|name| !left_out.contains(name))
                .collect()
        }))
    }

    /// Whether the task types `left_out` hold at least
    /// [`BACKLOG_WORTH_APART`](super::sql::BACKLOG_WORTH_APART) runnable
    /// rows, looked at once a second (a claim that walks past fewer pays
    /// less than finding the other types would cost it). Not asked on
    /// MariaDB/MySQL, whose claims walk.
    async fn left_out_backlog(&self, left_out: &[String]) -> Result<bool> {
        const LOOK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
        let seen = || {
            self.left_out_backlog
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        if let Some((at, backlog)) = *seen() {
            if at.elapsed() < LOOK_EVERY {
                return Ok(backlog);
            }
        }
        let names = serde_json::to_string(left_out)?;
        let sql = self.sql.left_out_backlog.as_str();
        let rows = on_pool!(self, pool => {
            self.count_statements(1);
            query(sqlx::AssertSqlSafe(sql))
                .bind(names.as_str())
                .fetch_all(pool)
                .await?
                .first()
                .map(|row| row.int(0))
                .transpose()?
                .unwrap_or(0)
        }, mysql _pool => {
            0 // (not asked there)
        });
        let backlog = rows >= super::sql::BACKLOG_WORTH_APART as i64;
        *seen() = Some((std::time::Instant::now(), backlog));
        Ok(backlog)
    }

    /// [`claim`](Store::claim), leaving out the rows of `left_out` (queues
    /// or task types, `by`): the claim of a daemon that serves every queue
    /// while those queues are paused (or those types left out), found and
    /// claimed apart as its scheduler does (for the benchmark, whose time
    /// includes the finding).
    pub async fn claim_outside(
        &self,
        by: Claimant<'_>,
        limit: usize,
        (apart_by, left_out): (ApartBy, &[String]),
    ) -> Result<Vec<Claimed>> {
        let open = self.apart(apart_by, left_out).await?;
        if open.as_ref().is_some_and(Vec::is_empty) {
            return Ok(Vec::new());
        }
        let (excluded_tasks, excluded_queues) = match apart_by {
            ApartBy::Queue => (&[][..], left_out),
            ApartBy::Type => (left_out, &[][..]),
        };
        let filter = ClaimFilter {
            node: by.host,
            excluded_tasks,
            excluded_queues,
            apart: open.as_deref().map(|names| (apart_by, names)),
            ..Default::default()
        };
        self.claim_filtered(by, limit, &filter).await
    }

    /// Claims leave out options longer than `max_options` bytes (the row's
    /// try is then rejected without the value ever being read).
    pub(crate) fn set_max_options(&self, max_options: u64) {
        self.max_options
            .store(max_options, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn options_cap(&self) -> i64 {
        self.max_options
            .load(std::sync::atomic::Ordering::Relaxed)
            .min(i64::MAX as u64) as i64
    }

    /// The longest options a claim through `filter` returns whole.
    pub(super) fn inline_cap(&self, filter: &ClaimFilter<'_>) -> i64 {
        let cap = self.options_cap();
        filter
            .options_inline
            .map_or(cap, |inline| cap.min(inline.min(i64::MAX as u64) as i64))
    }

    /// Claims up to `limit` runnable rows that pass `filter`, in one statement.
    pub(crate) async fn claim_filtered(
        &self,
        by: Claimant<'_>,
        limit: usize,
        filter: &ClaimFilter<'_>,
    ) -> Result<Vec<Claimed>> {
        self.count_statements(1);
        let excluded = serde_json::to_string(filter.excluded_tasks)?;
        let excluded_queues = serde_json::to_string(filter.excluded_queues)?;
        if let Pool::MySql(pool) = &self.pool {
            let rows = self.claim_mysql(pool, by, limit, filter, None).await?;
            return Ok(in_claim_order(rows));
        }
        // Several queues or types apart (see `ClaimFilter::apart`): their
        // names from `$11` on.
        let apart;
        let statement = match filter.apart {
            None => self.sql.claim_for(filter),
            Some((by, names)) => {
                apart = self.sql.claim_apart_statement(by, names.len(), 11);
                apart.as_str()
            }
        };
        let rows: Vec<(i64, Claimed)> = on_pool!(self, pool => {
            let mut query = bind_claim!(
                query(sqlx::AssertSqlSafe(statement)),
                by,
                limit as i64,
                filter,
                filter.task.unwrap_or(""),
                excluded.as_str(),
                self.inline_cap(filter),
                excluded_queues.as_str(),
            );
            for name in filter.apart.map_or(&[][..], |(_, names)| names) {
                query = query.bind(name.as_str());
            }
            query.fetch_all(pool.claim_on(self, filter)).await?
                .iter()
                .map(|row| claimed_from_row(row, by.token))
                .collect::<sqlx::Result<_>>()?
        });
        Ok(in_claim_order(rows))
    }

    /// How long a limited type's claim waits for another daemon's claim of
    /// that type (its lock: PostgreSQL's advisory lock, MariaDB's
    /// `GET_LOCK`): half the time the call may take (`lease_timeout`),
    /// between 1 and 10 s.
    pub(super) fn type_lock_wait(&self) -> std::time::Duration {
        use std::time::Duration;
        match self.answer_bound.load(std::sync::atomic::Ordering::Relaxed) {
            0 => Duration::from_secs(10),
            bound => Duration::from_millis(bound / 2)
                .clamp(Duration::from_secs(1), Duration::from_secs(10)),
        }
    }

    /// Claims rows of `task`, a type with a concurrency limit across all
    /// daemons: under a lock per type (PostgreSQL advisory lock; SQLite's
    /// single writer), counts its running rows and claims at most the rest.
    pub(crate) async fn claim_limited(
        &self,
        by: Claimant<'_>,
        limit: usize,
        filter: &ClaimFilter<'_>,
        type_limit: u32,
    ) -> Result<Vec<Claimed>> {
        let task = filter.task.expect("claim_limited needs a task type");
        let sql = self.sql;
        let excluded_queues = serde_json::to_string(filter.excluded_queues)?;
        if let Pool::MySql(pool) = &self.pool {
            let rows = self
                .claim_mysql(pool, by, limit, filter, Some(type_limit))
                .await?;
            return Ok(in_claim_order(rows));
        }
        let rows: Vec<(i64, Claimed)> = on_pool!(self, pool => {
            let mut transaction = begin_write(pool.claim_on(self, filter)).await?;
            if let Some(lock) = &sql.lock_type {
                // A peer gone silent holding the lock held up this claim,
                // and with it the whole claim round, every other type's
                // rows too, until the call was given up.
                let wait = self.type_lock_wait();
                query(sqlx::AssertSqlSafe(format!("SET LOCAL lock_timeout = {}", wait.as_millis())))
                    .execute(&mut *transaction)
                    .await?;
                let locked = query(lock.as_str()).bind(task).execute(&mut *transaction).await;
                if let Err(sqlx::Error::Database(error)) = &locked {
                    if error.code().as_deref() == Some("55P03") {
                        // Claiming without the lock could run more of the
                        // type at once than its limit. Its rows wait for a
                        // later claim.
                        tracing::warn!(
                            "the claim of {task} waited {} s for another daemon's claim of that type (its lock): claiming none of its rows this time",
                            wait.as_secs()
                        );
                        return Ok(Vec::new());
                    }
                }
                locked?;
            }
            let running: i64 = {
                let rows = query(sql.running_of_type.as_str()).bind(task).fetch_all(&mut *transaction).await?;
                rows.first().map(|row| row.int(0)).transpose()?.unwrap_or(0)
            };
            let room = (i64::from(type_limit) - running).clamp(0, limit as i64);
            // BEGIN, the lock's bound and the lock, the count, the claim, COMMIT.
            self.count_statements(2 + 2 * u64::from(sql.lock_type.is_some()) + 1 + u64::from(room > 0));
            let claimed = if room == 0 {
                Vec::new()
            } else {
                bind_claim!(
                    query(sql.claim_for(filter)),
                    by,
                    room,
                    filter,
                    task,
                    "[]",
                    self.inline_cap(filter),
                    excluded_queues.as_str(),
                )
                .fetch_all(&mut *transaction)
                    .await?
                    .iter()
                    .map(|row| claimed_from_row(row, by.token))
                    .collect::<sqlx::Result<Vec<_>>>()?
            };
            transaction.commit().await?;
            claimed
        });
        Ok(in_claim_order(rows))
    }

    /// Claims one given row if it is runnable (its delay ignored).
    pub(crate) async fn claim_one(
        &self,
        id: RequestId,
        by: Claimant<'_>,
    ) -> Result<Option<Claimed>> {
        if let Pool::MySql(pool) = &self.pool {
            return self.claim_one_mysql(pool, id.0, by).await;
        }
        let rows = on_pool!(self, pool => {
            let query = query(self.sql.claim_one.as_str())
                .bind(by.token.as_str())
                .bind(by.instance)
                .bind(by.host)
                .bind(id.0)
                .bind(self.options_cap());
            query.fetch_all(pool).await?
                .iter()
                .map(|row| claimed_from_row(row, by.token))
                .collect::<sqlx::Result<Vec<_>>>()?
        });
        Ok(rows.into_iter().next().map(|(_, claimed)| claimed))
    }

    /// Releases due delayed rows (at most [`RELEASE_AT_ONCE`] at a time)
    /// into the claim's indexes: a claim takes a delayed row only once a
    /// daemon has seen its delay pass (see [`RELEASED`]). Any daemon may do
    /// it for any row, and doing it twice changes nothing. Returns how many
    /// it released.
    ///
    /// [`RELEASE_AT_ONCE`]: super::sql::RELEASE_AT_ONCE
    /// [`RELEASED`]: super::sql::RELEASED
    pub(crate) async fn release_delays(&self) -> Result<u64> {
        self.count_statements(1);
        let statement = self.sql.release_delays.as_str();
        Ok(on_pool!(self, pool => {
            query(statement).execute(pool).await?.rows_affected()
        }, mysql pool => self.release_delays_mysql(pool).await?))
    }

    /// Seconds until the earliest delayed row that waits is due, if any (at
    /// most 0 for a due row not released yet).
    pub(crate) async fn seconds_until_next_delay(&self) -> Result<Option<f64>> {
        self.count_statements(1);
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.next_delay.as_str());
            match query.fetch_all(pool).await?.first() {
                Some(row) => row.opt_float(0)?,
                None => None,
            }
        }))
    }
}
