//! Housekeeping: retention's deletion of old final rows in small batches,
//! and the cron schedules' slots (one request per slot across all daemons,
//! timed by the database's clock).

use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::query;

use super::sql::Dialect;
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

impl Prunable {
    /// The table its rows are in.
    pub(crate) fn table(self) -> &'static str {
        match self {
            Prunable::Finished | Prunable::Cancelled | Prunable::Rejected | Prunable::Exhausted => {
                "task_runner_requests"
            }
            Prunable::EndedBatches => "task_runner_batches",
            Prunable::EndedFlows => "task_runner_flows",
        }
    }
}

impl Store {
    /// Deletes up to `batch` rows of `kind` completed more than `age` ago,
    /// but none that `kept` (from [`Store::kept_by_foreign_keys`] of the
    /// kind's table) holds.
    pub(crate) async fn prune(
        &self,
        kind: Prunable,
        age: Duration,
        batch: i64,
        kept: Option<&str>,
    ) -> Result<u64> {
        let keeping = kept.map(|kept| Dialect(self.backend()).prune_statement(kind, Some(kept)));
        let statement = match (&keeping, kind) {
            (Some(keeping), _) => keeping.as_str(),
            (None, Prunable::Exhausted) => &self.sql.prune_exhausted,
            (None, Prunable::EndedBatches) => &self.sql.prune_batches,
            (None, Prunable::EndedFlows) => &self.sql.prune_flows,
            (None, Prunable::Finished | Prunable::Cancelled | Prunable::Rejected) => {
                &self.sql.prune_state
            }
        };
        let state = match kind {
            Prunable::Finished => Some("FINISHED"),
            Prunable::Cancelled => Some("CANCELLED"),
            Prunable::Rejected => Some("REJECTED"),
            Prunable::Exhausted | Prunable::EndedBatches | Prunable::EndedFlows => None,
        };
        Ok(on_pool!(self, pool => {
            let mut query = query(sqlx::AssertSqlSafe(statement))
                .bind(age.as_secs_f64())
                .bind(batch);
            if let Some(state) = state {
                query = query.bind(state);
            }
            query.execute(pool).await?.rows_affected()
        }))
    }

    /// A condition on the rows of `table` (taskrunner's) that an
    /// application's foreign key still references (one without `ON DELETE
    /// CASCADE` or `SET NULL`): deleting one of them would fail, and with it
    /// the whole batch of deletes, so that one such row stopped all
    /// retention. `None` when no such key exists.
    pub(crate) async fn kept_by_foreign_keys(&self, table: &str) -> Result<Option<String>> {
        // (referencing table, its column, the requests' column)
        let keys: Vec<(String, String, String)> = match &self.pool {
            Pool::Sqlite(pool) => sqlx::query_as(
                "SELECT m.name, f.\"from\", coalesce(f.\"to\", 'id') \
                   FROM sqlite_master m JOIN pragma_foreign_key_list(m.name) f \
                  WHERE m.type = 'table' AND f.\"table\" = $1 \
                    AND f.on_delete NOT IN ('CASCADE', 'SET NULL') \
                    AND NOT EXISTS (SELECT 1 FROM pragma_foreign_key_list(m.name) g \
                                     WHERE g.id = f.id AND g.seq > 0)",
            )
            .bind(table)
            .fetch_all(pool)
            .await?,
            Pool::Postgres(pool) => sqlx::query_as(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(t.relname), a.attname::text, r.attname::text \
                   FROM pg_constraint c \
                   JOIN pg_class t ON t.oid = c.conrelid \
                   JOIN pg_namespace n ON n.oid = t.relnamespace \
                   JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1] \
                   JOIN pg_attribute r ON r.attrelid = c.confrelid AND r.attnum = c.confkey[1] \
                  WHERE c.contype = 'f' AND c.confrelid = to_regclass($1) \
                    AND cardinality(c.conkey) = 1 AND c.confdeltype NOT IN ('c', 'n')",
            )
            .bind(table)
            .fetch_all(pool)
            .await?,
            Pool::MySql(pool) => mysql::query(
                "SELECT k.table_name, k.column_name, k.referenced_column_name \
                   FROM information_schema.key_column_usage k \
                   JOIN information_schema.referential_constraints r \
                     ON r.constraint_schema = k.constraint_schema \
                    AND r.constraint_name = k.constraint_name AND r.table_name = k.table_name \
                  WHERE k.table_schema = DATABASE() AND k.referenced_table_name = $1 \
                    AND r.delete_rule NOT IN ('CASCADE', 'SET NULL')",
            )
            .bind(table)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|row| Ok((row.text(0)?, row.text(1)?, row.text(2)?)))
            .collect::<sqlx::Result<_>>()?,
        };
        if keys.is_empty() {
            return Ok(None);
        }
        let quote = |name: &str| match self.pool {
            Pool::MySql(_) => format!("`{}`", name.replace('`', "``")),
            Pool::Sqlite(_) | Pool::Postgres(_) => format!("\"{}\"", name.replace('"', "\"\"")),
        };
        let conditions: Vec<String> = keys
            .iter()
            .map(|(referencing, column, referenced)| {
                // PostgreSQL's name comes quoted, with its schema.
                let referencing = match self.pool {
                    Pool::Postgres(_) => referencing.clone(),
                    Pool::Sqlite(_) | Pool::MySql(_) => quote(referencing),
                };
                format!(
                    "EXISTS (SELECT 1 FROM {referencing} k WHERE k.{} = {table}.{})",
                    quote(column),
                    quote(referenced)
                )
            })
            .collect();
        Ok(Some(conditions.join(" OR ")))
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
                super::rows::inserted_id(&inserted.fetch_all(&mut *transaction).await?)?)
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
