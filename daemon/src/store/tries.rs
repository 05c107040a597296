//! Writes about a try (pid, progress, outcome), each fenced by the try's
//! claim token, in as few round trips as the backend allows; and the
//! heartbeat that renews the leases of the rows a daemon holds.

use std::collections::HashSet;

use anyhow::Result;
use sqlx::postgres::PgPool;
use sqlx::query;

use super::sql::Sql;
use super::{begin_write, mysql, Ending, Locks, Pool, RowExt, RowLocked, Store};
use crate::instance::ClaimToken;
use crate::request::{RequestId, State};

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
            Write::Outcome(outcome) => query(sql.record_plain_outcome.as_str())
                .bind(outcome.state.as_str())
                .bind(outcome.result_text.as_str())
                .bind(i64::from(outcome.give_back_try))
                .bind(outcome.retry_after)
                .bind(outcome.id.0)
                .bind(outcome.claim_token.as_str()),
        }
    }};
}

/// One write about a try, fenced by its claim token.
#[derive(Debug, Clone)]
pub enum Write {
    /// The process was spawned: pid and the identity the reaper checks.
    Pid {
        id: RequestId,
        claim_token: ClaimToken,
        pid: i64,
        boot_id: String,
        start_ticks: i64,
    },
    Progress {
        id: RequestId,
        claim_token: ClaimToken,
        text: String,
    },
    Outcome(Outcome),
}

impl Write {
    pub(crate) fn id(&self) -> RequestId {
        match self {
            Write::Pid { id, .. } | Write::Progress { id, .. } => *id,
            Write::Outcome(outcome) => outcome.id,
        }
    }

    /// The claim the write is fenced by.
    pub(crate) fn claim_token(&self) -> &ClaimToken {
        match self {
            Write::Pid { claim_token, .. } | Write::Progress { claim_token, .. } => claim_token,
            Write::Outcome(outcome) => &outcome.claim_token,
        }
    }

    /// Whether `other` is about the same try (its row, under its claim).
    pub(crate) fn of_same_try(&self, other: &Write) -> bool {
        self.id() == other.id() && self.claim_token() == other.claim_token()
    }

    /// What it writes, for a log line.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Write::Pid { .. } => "pid",
            Write::Progress { .. } => "progress",
            Write::Outcome(_) => "outcome",
        }
    }
}

/// How a try ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: RequestId,
    pub claim_token: ClaimToken,
    pub state: State,
    pub result_text: String,
    /// Seconds until the row may run again; `None` clears `delay_until`.
    pub retry_after: Option<f64>,
    /// The try does not count (INTERRUPTED): `tries` goes back down by one.
    pub give_back_try: bool,
    /// This outcome may end the request with follow-ups (its batch, its
    /// flow, its callbacks, `on_exhausted`, its next periodic occurrence),
    /// if only through a cancel written while it ran: it is
    /// written by [`Store::finalize`], in a transaction of its own, rather
    /// than in the recorder's one-statement batch.
    pub composed: bool,
}

/// For each write, whether an outcome of the same claim comes before it.
fn writes_after_their_outcome(writes: &[Write]) -> Vec<bool> {
    let mut ended: HashSet<(RequestId, &ClaimToken)> = HashSet::new();
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

/// A heartbeat renewal: a row this daemon still holds.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) id: RequestId,
    pub(crate) claim_token: ClaimToken,
    pub(crate) cancel_requested: bool,
    /// Whether this renewal renewed its lease: not if another session held
    /// the row locked (the renewal skips such a row rather than wait).
    pub(crate) renewed: bool,
}

impl Store {
    /// Applies writes; for each, whether it still held its claim (false: the
    /// row was taken from this try, and nothing changed). Outcomes with
    /// follow-ups ([`Outcome::composed`]) each go through
    /// [`finalize`](Store::finalize), in a transaction of its own; the rest
    /// in one transaction (on PostgreSQL, pids and outcomes in one array
    /// statement each, so a batch costs a handful of round trips however many
    /// tries it records; a batch of outcomes alone is one statement on SQLite
    /// and PostgreSQL, four on MariaDB/MySQL).
    ///
    /// Writes apply in the order given. A write queued after the outcome of
    /// its own claim (a give-back of a row whose outcome was still queued,
    /// say) would match nothing once that outcome applied; in one batch
    /// statement it could win instead, and finished work would run again.
    /// It is left out and reported not applied.
    pub async fn record(&self, writes: &[Write]) -> Result<Vec<bool>> {
        let applied = self.record_with(writes, Locks::Wait).await?;
        Ok(applied
            .into_iter()
            .map(|applied| applied == Ok(true))
            .collect())
    }

    /// Whether `outcome` is what row `id` holds now, under its claim: the
    /// outcome of a write whose answer was lost (the server committed it,
    /// the connection failed before saying so), which a second write finds
    /// no longer RUNNING: its state and text exactly, or the CANCELLED a
    /// cancel that came meanwhile makes of them. A reaper's mark under the
    /// same claim is not (before, any row whose text contained the
    /// outcome's passed: an empty output, or a short one the reaper's text
    /// happened to contain, and `run --record` said FINISHED of a row the
    /// reaper had marked CRASHED).
    pub(crate) async fn holds_outcome(&self, outcome: &Outcome) -> Result<bool> {
        let sql = "SELECT result, result_text FROM task_runner_requests \
                    WHERE id = $1 AND claim_token = $2 AND result <> 'RUNNING'";
        let held = on_pool!(self, pool => {
            let query = query(sqlx::AssertSqlSafe(sql))
                .bind(outcome.id.0)
                .bind(outcome.claim_token.as_str());
            match query.fetch_all(pool).await?.first() {
                Some(row) => Some((row.opt_text(0)?.unwrap_or_default(), row.opt_text(1)?.unwrap_or_default())),
                None => None,
            }
        });
        let state = outcome.state.as_str();
        let text = &outcome.result_text;
        // As written, or as a cancel made it, or as the end of its batch did
        // (no further try once the batch ended).
        Ok(held.is_some_and(|(result, held)| {
            (result == state && held == *text)
                || (result == "CANCELLED"
                    && (held == format!("{}{state}: {text}", super::sql::CANCELLED_WHILE_RUNNING)
                        || held
                            .strip_prefix("cancelled: batch ")
                            .and_then(|rest| rest.split_once(' '))
                            .and_then(|(batch, _)| batch.parse::<i64>().ok())
                            .is_some_and(|batch| {
                                held == super::compose::no_further_try(batch, text)
                            })))
        }))
    }

    /// [`record`](Store::record), but an outcome whose batch row another
    /// session holds locked is not waited for: `Err` for it, nothing
    /// written (see [`Locks::SetAside`]). The daemon's recorder tries it
    /// again later.
    pub(crate) async fn record_or_set_aside(
        &self,
        writes: &[Write],
    ) -> Result<Vec<Result<bool, RowLocked>>> {
        self.record_with(writes, Locks::SetAside).await
    }

    async fn record_with(
        &self,
        writes: &[Write],
        locks: Locks,
    ) -> Result<Vec<Result<bool, RowLocked>>> {
        let late = writes_after_their_outcome(writes);
        if !late.iter().any(|late| *late) {
            return self.record_in_order(writes, locks).await;
        }
        let kept: Vec<Write> = writes
            .iter()
            .zip(&late)
            .filter(|(_, late)| !**late)
            .map(|(write, _)| write.clone())
            .collect();
        let mut applied = self.record_in_order(&kept, locks).await?.into_iter();
        Ok(late
            .iter()
            .map(|late| match late {
                true => Ok(false),
                false => applied.next().unwrap_or(Ok(false)),
            })
            .collect())
    }

    async fn record_in_order(
        &self,
        writes: &[Write],
        locks: Locks,
    ) -> Result<Vec<Result<bool, RowLocked>>> {
        let is_composed =
            |write: &Write| matches!(write, Write::Outcome(outcome) if outcome.composed);
        if !writes.iter().any(is_composed) {
            return self.record_plain_or_finalize(writes, locks).await;
        }
        // In order: a write queued after an outcome (a give-back of the same
        // row, say) must not be applied before it.
        let mut applied = Vec::with_capacity(writes.len());
        let mut rest = writes;
        while !rest.is_empty() {
            let plain = rest.iter().take_while(|w| !is_composed(w)).count();
            if plain > 0 {
                applied.extend(self.record_plain_or_finalize(&rest[..plain], locks).await?);
                rest = &rest[plain..];
            } else if let Write::Outcome(outcome) = &rest[0] {
                applied.push(self.finalize_with(Ending::Outcome(outcome), locks).await?);
                rest = &rest[1..];
            }
        }
        Ok(applied)
    }

    /// Writes without follow-ups; a write the plain write did not apply to
    /// while its claim still holds goes on alone, its row locked first: an
    /// outcome to the finalization path, which writes it if its row gained
    /// something its end causes after the claim (a callback, a period, a
    /// batch: see `causes_nothing` in sql.rs); any write whose row another
    /// session held locked (the plain write passes over such rows: see
    /// `Dialect::unlocked`), with [`Locks::SetAside`] to be set aside.
    ///
    /// Whether the claim still holds is looked up first (one statement per
    /// write not applied, mostly a claim lost to a reaper): the
    /// transactions are for the rows that need them.
    async fn record_plain_or_finalize(
        &self,
        writes: &[Write],
        locks: Locks,
    ) -> Result<Vec<Result<bool, RowLocked>>> {
        let mut applied: Vec<Result<bool, RowLocked>> = self
            .record_plain(writes)
            .await?
            .into_iter()
            .map(Ok)
            .collect();
        for index in 0..writes.len() {
            if applied[index] != Ok(false) {
                continue;
            }
            let write = &writes[index];
            // A progress line that a later one of its try, applied, has
            // replaced: written alone now, it would overwrite the newer.
            let replaced = matches!(write, Write::Progress { .. })
                && writes[index + 1..]
                    .iter()
                    .zip(&applied[index + 1..])
                    .any(|(later, applied)| {
                        matches!(later, Write::Progress { .. })
                            && later.of_same_try(write)
                            && *applied == Ok(true)
                    });
            if replaced {
                applied[index] = Ok(true);
                continue;
            }
            // An earlier write of its try waits for the row's lock: this one
            // waits behind it, in their order.
            let behind =
                writes[..index]
                    .iter()
                    .zip(&applied[..index])
                    .find_map(|(earlier, applied)| match applied {
                        Err(locked) if earlier.of_same_try(write) => Some(*locked),
                        _ => None,
                    });
            if let Some(locked) = behind {
                applied[index] = Err(locked);
                continue;
            }
            self.count_statements(1);
            let held = on_pool!(self, pool => {
                query(self.sql.held_by_claim.as_str())
                    .bind(write.id().0)
                    .bind(write.claim_token().as_str())
                    .fetch_all(pool)
                    .await?
                    .first()
                    .map(|row| row.int(0))
                    .transpose()?
                    .unwrap_or(0)
                    > 0
            });
            if held {
                applied[index] = match write {
                    Write::Outcome(outcome) => {
                        self.finalize_with(Ending::Outcome(outcome), locks).await?
                    }
                    _ => self.write_alone(write, locks).await?,
                };
            }
        }
        Ok(applied)
    }

    /// A pid or progress write in a transaction of its own, its row locked
    /// first: waited for, or with [`Locks::SetAside`] `Err` when another
    /// session holds it (nothing written).
    async fn write_alone(&self, write: &Write, locks: Locks) -> Result<Result<bool, RowLocked>> {
        use super::compose::{Param::*, Tx};
        let once = || async {
            let mut tx = Tx::begin(self).await?;
            // BEGIN and the lock (none on SQLite), then the write and COMMIT.
            self.count_statements(1 + u64::from(!self.sql.lock_request.is_empty()));
            self.lock_request(&mut tx, write.id(), locks).await?;
            self.count_statements(2);
            let written = match write {
                Write::Pid {
                    id,
                    claim_token,
                    pid,
                    boot_id,
                    start_ticks,
                } => {
                    let params = [
                        Int(*pid),
                        Text(boot_id),
                        Int(*start_ticks),
                        Int(id.0),
                        Text(claim_token.as_str()),
                    ];
                    tx.execute(&self.sql.record_pid, &params).await?
                }
                Write::Progress {
                    id,
                    claim_token,
                    text,
                } => {
                    let params = [Text(text), Int(id.0), Text(claim_token.as_str())];
                    tx.execute(&self.sql.record_progress, &params).await?
                }
                Write::Outcome(_) => {
                    anyhow::bail!("an outcome is written by the finalization path")
                }
            };
            tx.commit().await?;
            Ok(written == 1)
        };
        let written = match &self.pool {
            Pool::MySql(_) => mysql::retry_locks(&self.lock_retries, once).await,
            _ => once().await,
        };
        super::compose::unless_locked(written)
    }

    /// Writes without follow-ups (see [`record`](Store::record)).
    async fn record_plain(&self, writes: &[Write]) -> Result<Vec<bool>> {
        let sql = self.sql;
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        // Outcomes only (the common batch at high load).
        let outcomes: Option<Vec<&Outcome>> = writes
            .iter()
            .map(|write| match write {
                Write::Outcome(outcome) => Some(outcome),
                _ => None,
            })
            .collect();
        if let Pool::MySql(pool) = &self.pool {
            // Several outcomes: four statements, however many (see
            // `record_outcomes_mysql`); anything else one statement per
            // write, in one transaction. Run again after a lock conflict.
            if let Some(outcomes) = outcomes.filter(|outcomes| outcomes.len() > 1) {
                let applied = mysql::retry_locks(&self.lock_retries, || {
                    self.record_outcomes_mysql(pool, &outcomes)
                })
                .await?;
                return Ok(outcomes
                    .iter()
                    .map(|o| applied.contains(&(o.id.0, o.claim_token.as_str().to_string())))
                    .collect());
            }
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
        // Outcomes only: one statement, atomic on its own.
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

    /// One statement per write, in one transaction (one alone: without). On
    /// MariaDB/MySQL, always in one, whose first statement locks the rows
    /// no other session holds: the writes to the others apply to nothing
    /// (see [`record_plain_or_finalize`](Store::record_plain_or_finalize)).
    async fn record_each(&self, writes: &[Write]) -> Result<Vec<bool>> {
        let sql = self.sql;
        if let Pool::MySql(pool) = &self.pool {
            use mysql::query;
            let mut transaction = pool.begin().await?;
            // BEGIN, the lock, COMMIT, and the writes to the rows it locked.
            self.count_statements(3);
            let lock = sql
                .lock_requests_skipping
                .replace("{ids}", &mysql::parameter_list(1, writes.len()));
            let mut lock = query(sqlx::AssertSqlSafe(lock));
            for write in writes {
                lock = lock.bind(write.id().0);
            }
            let unlocked: HashSet<i64> = lock
                .fetch_all(&mut *transaction)
                .await?
                .iter()
                .map(|row| row.int(0))
                .collect::<sqlx::Result<_>>()?;
            let mut applied = Vec::with_capacity(writes.len());
            for write in writes {
                if !unlocked.contains(&write.id().0) {
                    applied.push(false);
                    continue;
                }
                self.count_statements(1);
                let query = single_write_query!(sql, write);
                applied.push(query.execute(&mut *transaction).await?.rows_affected() == 1);
            }
            transaction.commit().await?;
            return Ok(applied);
        }
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

    /// MariaDB/MySQL: records outcomes without follow-ups in one READ COMMITTED transaction
    /// of four statements however many they are (one per outcome before:
    /// 1.3 to 1.9 statements per task while draining NoOp rows): locks the
    /// rows still RUNNING under the claims the outcomes name, in id order,
    /// passing over rows another session holds locked, then writes the
    /// outcomes of the rows it locked in one `UPDATE … JOIN`. There is no
    /// `UPDATE … RETURNING` to tell which rows an update changed; the
    /// locked rows are those, as no other transaction can change them before
    /// the commit, and no other row can come to match (a claim token is
    /// written once, by the claim). Returns the (id, claim token) of each
    /// outcome applied; the others are looked up, and set aside where their
    /// row was locked (see `Store::record_plain_or_finalize`).
    async fn record_outcomes_mysql(
        &self,
        pool: &sqlx::MySqlPool,
        outcomes: &[&Outcome],
    ) -> anyhow::Result<std::collections::HashSet<(i64, String)>> {
        let mut transaction = pool.begin().await?;
        // BEGIN, the lock, the update, COMMIT.
        self.count_statements(4);
        let held = mysql::query(self.sql.outcome_rows_held.as_str())
            .bind(outcome_rows_json(outcomes))
            .fetch_all(&mut *transaction)
            .await?
            .iter()
            .map(|row| Ok((row.int(0)?, row.text(1)?)))
            .collect::<sqlx::Result<std::collections::HashSet<_>>>()?;
        if !held.is_empty() {
            let locked: Vec<&Outcome> = outcomes
                .iter()
                .copied()
                .filter(|o| held.contains(&(o.id.0, o.claim_token.as_str().to_string())))
                .collect();
            let update = self
                .sql
                .record_outcomes_batch
                .replace("{ids}", &mysql::parameter_list(2, locked.len()));
            let mut update =
                mysql::query(sqlx::AssertSqlSafe(update)).bind(outcome_rows_json(&locked));
            for outcome in &locked {
                update = update.bind(outcome.id.0);
            }
            let written = update.execute(&mut *transaction).await?.rows_affected();
            if written != held.len() as u64 {
                tracing::warn!(
                    "a batch of {} outcomes locked {} rows but wrote {written}",
                    outcomes.len(),
                    held.len()
                );
            }
        }
        transaction.commit().await?;
        Ok(held)
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
            Pool::Sqlite(pool) => query(statement)
                .bind(outcome_rows_json(outcomes))
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| row.int(0))
                .collect::<sqlx::Result<_>>()?,
            // `record_plain` writes them with `record_outcomes_mysql` there.
            Pool::MySql(_) => {
                anyhow::bail!("outcome batches are not written in one statement on MySQL")
            }
        };
        Ok(rows)
    }

    /// Renews `heartbeat_at` on every row `instance` holds (one
    /// statement; two on MariaDB/MySQL, see `Sql::for_mysql`), then reads
    /// which rows it still holds, which it renewed, and which a user asked
    /// to cancel. The renewal skips a row another session holds locked, so
    /// as not to wait for an application's transaction: the others are
    /// renewed, and the heartbeat stops that row's try alone before its
    /// lease lapses.
    pub(crate) async fn renew_heartbeats(&self, instance: &str) -> Result<Vec<Held>> {
        if let Pool::MySql(_) = &self.pool {
            return mysql::retry_locks(&self.lock_retries, || self.renew_heartbeats_once(instance))
                .await;
        }
        self.renew_heartbeats_once(instance).await
    }

    async fn renew_heartbeats_once(&self, instance: &str) -> Result<Vec<Held>> {
        self.count_statements(2);
        let renewed: HashSet<i64> = on_pool!(self, pool => {
            query(self.sql.renew_heartbeats.as_str())
                .bind(instance)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| row.int(0))
                .collect::<sqlx::Result<_>>()?
        }, mysql pool => {
            let free: HashSet<i64> = mysql::query(self.sql.renew_heartbeats.as_str())
                .bind(instance)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| row.int(0))
                .collect::<sqlx::Result<_>>()?;
            if !free.is_empty() {
                self.count_statements(1);
                let ids: Vec<String> = free.iter().map(i64::to_string).collect();
                // By primary key: a plan through the (claimed_by, result)
                // index could lock, and wait for, the row passed over.
                let renew = format!(
                    "UPDATE task_runner_requests FORCE INDEX (PRIMARY) SET heartbeat_at = {} \
                      WHERE id IN ({}) AND claimed_by = $1 AND result = 'RUNNING'",
                    self.dialect().now(),
                    ids.join(", ")
                );
                mysql::query(sqlx::AssertSqlSafe(renew)).bind(instance).execute(pool).await?;
            }
            free
        });
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.held_by.as_str()).bind(instance);
            query.fetch_all(pool).await?
                .iter()
                .map(|row| {
                    let id = row.int(0)?;
                    Ok(Held {
                        id: RequestId(id),
                        claim_token: ClaimToken::from_row(row.text(1)?),
                        cancel_requested: row.int(2)? != 0,
                        renewed: renewed.contains(&id),
                    })
                })
                .collect::<sqlx::Result<_>>()?
        }))
    }
}

/// `outcomes` as a JSON array of rows (id, claim token, result,
/// result_text, give back, retry after): how SQLite and MariaDB/MySQL take
/// a batch of them as one parameter.
fn outcome_rows_json(outcomes: &[&Outcome]) -> String {
    let rows: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|o| {
            serde_json::json!([
                o.id.0,
                o.claim_token.as_str(),
                o.state.as_str(),
                o.result_text,
                i64::from(o.give_back_try),
                o.retry_after
            ])
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::ClaimToken;
    use crate::store::Purpose;

    /// A write whose answer was lost is checked against the row: held only
    /// as written (or as a cancel made it), not by a reaper's CRASHED under
    /// the same claim whose text happens to contain the outcome's.
    #[tokio::test]
    async fn an_outcome_is_held_as_written_not_by_a_reapers_mark_under_its_claim() {
        let path = std::env::temp_dir().join(format!("taskrunner-holds-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let store =
            Store::open(&format!("sqlite://{}", path.display()), Purpose::Daemon).expect("open");
        store.migrate().await.expect("migrate");
        let pool = store.sqlite_pool().expect("a SQLite store").clone();
        let set = |result: &str, text: &str| {
            let pool = pool.clone();
            let sql = format!(
                "UPDATE task_runner_requests SET result = '{result}', result_text = '{text}', claim_token = 'tok' WHERE id = 1"
            );
            async move {
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        };
        sqlx::query("INSERT INTO task_runner_requests (task_class_name, tries) VALUES ('NoOp', 1)")
            .execute(&pool)
            .await
            .unwrap();
        let outcome = |state: State, text: &str| Outcome {
            id: RequestId(1),
            claim_token: ClaimToken::from_row("tok".into()),
            state,
            result_text: text.into(),
            retry_after: None,
            give_back_try: false,
            composed: false,
        };
        let holds = |outcome: Outcome| {
            let store = store.clone();
            async move { store.holds_outcome(&outcome).await.unwrap() }
        };
        set("CRASHED", "its daemon died: reaped, boom").await;
        assert!(
            !holds(outcome(State::Finished, "")).await,
            "an empty output"
        );
        assert!(
            !holds(outcome(State::Failed, "boom")).await,
            "a text the reaper's holds"
        );
        set("FINISHED", "").await;
        assert!(holds(outcome(State::Finished, "")).await);
        set(
            "CANCELLED",
            "cancelled by a user; the running try ended FAILED: boom",
        )
        .await;
        assert!(holds(outcome(State::Failed, "boom")).await);
        assert!(!holds(outcome(State::Failed, "oom")).await);
        set(
            "CANCELLED",
            "cancelled: batch 7 has ended, so no further try\nboom",
        )
        .await;
        assert!(holds(outcome(State::Failed, "boom")).await);
        assert!(!holds(outcome(State::Failed, "oom")).await);
        let _ = std::fs::remove_file(&path);
    }
}
