//! Housekeeping: retention's deletion of old final rows in small batches,
//! and the cron schedules' slots (one request per slot across all daemons,
//! timed by the database's clock).

use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::query;

use super::{begin_write, mysql, Pool, RowExt, Store, DEFAULT_TRY_LIMIT};
use crate::request::RequestId;

/// A kind of final row that retention may delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prunable {
    Finished,
    Cancelled,
    Rejected,
    /// FAILED, CRASHED or TIMEOUT with no tries left.
    Exhausted,
    /// Batches (`task_runner_batches`) ended that long ago, once no request
    /// is a member of one or a callback of its end any more.
    EndedBatches,
    /// Flows (`task_runner_flows`) ended that long ago, once none of their
    /// step rows is left.
    EndedFlows,
}

impl Store {
    /// Deletes up to `batch` rows of `kind` completed more than `age` ago.
    pub(crate) async fn prune(&self, kind: Prunable, age: Duration, batch: i64) -> Result<u64> {
        let sql = self.sql;
        Ok(on_pool!(self, pool => {
            let query = match kind {
                Prunable::Exhausted => query(sql.prune_exhausted.as_str())
                    .bind(age.as_secs_f64())
                    .bind(batch),
                Prunable::EndedBatches => query(sql.prune_batches.as_str())
                    .bind(age.as_secs_f64())
                    .bind(batch),
                Prunable::EndedFlows => query(sql.prune_flows.as_str())
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
    pub(crate) async fn database_now(&self) -> Result<f64> {
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
    pub(crate) async fn last_slot(&self, schedule: &str) -> Result<Option<f64>> {
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
    pub(crate) async fn enqueue_slot(
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
    pub(crate) async fn forget_old_slots(&self, schedule: &str) -> Result<u64> {
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.forget_old_slots.as_str()).bind(schedule);
            query.execute(pool).await?.rows_affected()
        }))
    }
}
