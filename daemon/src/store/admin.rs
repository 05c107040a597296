//! The commands people and applications give: enqueue (plain or with a
//! unique key), show, list, retry, cancel, and the counts by state (purge
//! is a prune pass, `crate::prune`).

use anyhow::Result;
use sqlx::query;

use super::{mysql, request_from_row, Ending, Pool, RowExt, Store};
use crate::request::{Request, RequestId, State};

/// The column default of `try_limit`, used when `enqueue` is given none.
pub(crate) const DEFAULT_TRY_LIMIT: i64 = 5;

/// Binds `$1..$14` of [`Sql::enqueue`](super::sql::Sql::enqueue) and
/// [`Sql::enqueue_unique`](super::sql::Sql::enqueue_unique) (a
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

/// A request to insert.
#[derive(Debug, Clone, Default)]
pub(crate) struct NewRequest {
    pub(crate) task_class_name: String,
    pub(crate) options: Option<String>,
    pub(crate) try_limit: Option<i64>,
    pub(crate) delay_seconds: Option<f64>,
    /// An absolute time, RFC 3339 (`2026-11-24T07:00:00Z`).
    pub(crate) at: Option<String>,
    pub(crate) priority: i64,
    /// At most one pending or running request per key: while one exists,
    /// `enqueue` inserts nothing and returns its id.
    pub(crate) unique_key: Option<String>,
    /// None: the column default (`default`).
    pub(crate) queue: Option<String>,
    /// Run only on the daemon of this node name.
    pub(crate) node: Option<String>,
    /// Never run on the daemon of this node name.
    pub(crate) not_node: Option<String>,
    /// Seconds: when a try ends, the next occurrence is inserted this long after.
    pub(crate) period: Option<i64>,
    /// A member of this batch (refused if the batch is final).
    pub(crate) batch_id: Option<i64>,
    /// Task type run once when the request FINISHED.
    pub(crate) on_success: Option<String>,
    /// Task type run once when the request is exhausted or REJECTED.
    pub(crate) on_failure: Option<String>,
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
pub(crate) struct ListQuery {
    /// A `result`, or `pending`, `retrying`, `exhausted`; None for any.
    pub(crate) state: Option<String>,
    pub(crate) task: Option<String>,
    pub(crate) queue: Option<String>,
    pub(crate) host: Option<String>,
    /// Only this batch's members and its callback.
    pub(crate) batch: Option<i64>,
    /// Only this flow's step and revert rows.
    pub(crate) flow: Option<i64>,
    /// At most this many rows, newest first.
    pub(crate) limit: i64,
}

/// The answer to `retry` and `cancel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Done,
    /// A running row: cancel recorded `cancel_requested_at` for its daemon.
    Requested,
    NotFound,
    /// The row is in this state, which does not allow the change.
    Refused(Option<String>),
    /// `retry`: another request not yet ended holds the row's `unique_key`
    /// (the newest other row with it, when one is found).
    KeyHeld {
        key: String,
        by: Option<i64>,
    },
    /// `retry`: the row is a step or a revert of this flow, which runs only
    /// as its flow moves (before, `retry --flow` ran every step and revert
    /// of a finished flow again, at once and in no order).
    InFlow(i64),
    /// `retry` of a row as it was seen ([`Seen`]): it has moved on since
    /// (its state now, `None` for pending, and its tries).
    Moved {
        state: Option<String>,
        tries: i64,
    },
}

/// A row's state (`PENDING` for none) and tries as an operator saw them
/// (a web page, a bulk action's selection): a retry made from that view
/// applies only while the row is still so. (Before, a row the page showed
/// FAILED that its daemon's own retry had FINISHED meanwhile was reset
/// and ran again.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) state: String,
    pub(crate) tries: i64,
}

/// Why `retry` of request `id` was refused ([`Change::InFlow`]).
pub(crate) fn in_flow_text(id: RequestId, flow: i64) -> String {
    format!(
        "request {id} was not retried: it is a row of flow {flow}, whose steps and reverts run only as the flow moves (a FINISHED step never runs again); see `flow show {flow}`"
    )
}

/// Why `retry` of request `id` was refused ([`Change::KeyHeld`]): `by`,
/// the request not ended that holds its unique `key`.
pub(crate) fn key_held_text(id: RequestId, key: &str, by: Option<i64>) -> String {
    let holder = by.map_or("another request".to_string(), |by| format!("request {by}"));
    format!(
        "request {id} was not retried: {holder}, not ended yet, holds its unique_key `{}` (at most one pending or running request per key); cancel or wait for it first",
        crate::escape::one_line(key)
    )
}

/// Statement `sql` of the list's filter (see `sql::list_filter`), with
/// `list`'s values bound: `$1` the limit, `$2`…`$7` the filter ('' or 0
/// for any).
macro_rules! bound_to_list {
    ($sql:expr, $list:expr) => {{
        let list: &ListQuery = $list;
        let text = |value: &Option<String>| value.clone().unwrap_or_default();
        query($sql)
            .bind(list.limit)
            .bind(text(&list.task))
            .bind(text(&list.queue))
            .bind(text(&list.host))
            .bind(text(&list.state))
            .bind(list.batch.unwrap_or(0))
            .bind(list.flow.unwrap_or(0))
    }};
}

impl Store {
    pub(crate) async fn enqueue(&self, request: &NewRequest) -> Result<RequestId> {
        if let Some(unique_key) = &request.unique_key {
            return self.enqueue_unique(request, unique_key).await;
        }
        let id = on_pool!(self, pool => {
            let query = bind_new_request!(query(self.sql.enqueue.as_str()), request, None);
            super::rows::inserted_id(&query.fetch_all(pool).await?)?
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

    /// Row `id`'s state (`PENDING` for a row never run), or `None` where no
    /// such row is: read alone, without its options and outputs.
    pub(crate) async fn state_of(&self, id: RequestId) -> Result<Option<String>> {
        let sql = "SELECT coalesce(result, 'PENDING') FROM task_runner_requests WHERE id = $1";
        Ok(on_pool!(self, pool => {
            match query(sql).bind(id.0).fetch_all(pool).await?.first() {
                Some(row) => Some(row.text(0)?),
                None => None,
            }
        }))
    }

    /// The rows [`list_where`](Store::list_where) lists, only their id,
    /// result and tries: `retry` and `cancel` of a filter act on
    /// thousands of rows whose options and outputs they need not read
    /// (before, they read every column of every row at once: 200,000
    /// failed rows with 64 KiB outputs each were 13 GB in the CLI).
    pub(crate) async fn select_where(
        &self,
        list: &ListQuery,
    ) -> Result<Vec<(RequestId, Option<String>, i64)>> {
        Ok(on_pool!(self, pool => {
            bound_to_list!(self.sql.select_where.as_str(), list)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| Ok((RequestId(row.int(0)?), row.opt_text(1)?, row.int(2)?)))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// The rows `list` selects, newest first.
    pub(crate) async fn list_where(&self, list: &ListQuery) -> Result<Vec<Request>> {
        Ok(on_pool!(self, pool => {
            bound_to_list!(self.sql.list_where.as_str(), list)
                .fetch_all(pool)
                .await?
                .iter()
                .map(request_from_row)
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// Makes a row runnable again (`retry`); refused while it runs, and,
    /// when `seen` is given, unless the row is still so ([`Change::Moved`]). A
    /// member's batch is recounted (a batch that already ended stays ended:
    /// its callback is not made again).
    pub(crate) async fn retry(&self, id: RequestId, seen: Option<&Seen>) -> Result<Change> {
        let updated = match seen {
            None => self.execute_by_id(self.sql.retry.as_str(), id).await,
            Some(seen) => self.retry_if_seen(id, seen).await,
        };
        match updated {
            Ok(true) => {
                if let Some(batch_id) = self.show(id).await?.and_then(|row| row.batch_id) {
                    self.recount_batch(batch_id).await?;
                }
                Ok(Change::Done)
            }
            Ok(false) => match self.show(id).await? {
                Some(row) if row.flow_step.is_some() && row.flow_id.is_some() => {
                    Ok(Change::InFlow(row.flow_id.unwrap_or_default()))
                }
                Some(row)
                    if seen.is_some_and(|seen| {
                        (row.result.as_deref().unwrap_or("PENDING"), row.tries)
                            != (seen.state.as_str(), seen.tries)
                    }) =>
                {
                    Ok(Change::Moved {
                        state: row.result,
                        tries: row.tries,
                    })
                }
                _ => self.explain_refusal(id).await,
            },
            // The row's unique key is held by a request that has not ended.
            Err(error) if is_unique_violation(&error) => {
                let (key, by) = on_pool!(self, pool => {
                    let rows = query(self.sql.key_holder.as_str()).bind(id.0).fetch_all(pool).await?;
                    match rows.first() {
                        Some(row) => (row.opt_text(0)?, row.opt_int(1)?),
                        None => (None, None),
                    }
                });
                Ok(Change::KeyHeld {
                    key: key.unwrap_or_default(),
                    by,
                })
            }
            Err(error) => Err(error),
        }
    }

    /// Cancels a pending row at once (through [`finalize`](Store::finalize):
    /// its batch counts it), or asks the daemon running it to stop it.
    pub(crate) async fn cancel(&self, id: RequestId) -> Result<Change> {
        // A try may end between the two statements (the row RUNNING for the
        // first, FAILED with tries left for the second): then both again.
        for _ in 0..3 {
            if self.finalize(Ending::Cancelled(id)).await? {
                return Ok(Change::Done);
            }
            if self
                .execute_by_id(self.sql.cancel_running.as_str(), id)
                .await?
            {
                return Ok(Change::Requested);
            }
        }
        self.explain_refusal(id).await
    }

    async fn retry_if_seen(&self, id: RequestId, seen: &Seen) -> Result<bool> {
        Ok(on_pool!(self, pool => {
            query(self.sql.retry_as_seen.as_str())
                .bind(id.0)
                .bind(seen.state.as_str())
                .bind(seen.tries)
                .execute(pool)
                .await?
                .rows_affected()
                == 1
        }))
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
    pub(crate) async fn count_by_result(&self) -> Result<Vec<(String, i64)>> {
        Ok(on_pool!(self, pool => {
            let query = query(self.sql.count_by_result.as_str());
            query.fetch_all(pool).await?
                .iter()
                .map(|row| Ok((row.text(0)?, row.int(1)?)))
                .collect::<sqlx::Result<_>>()?
        }))
    }

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
        // Five inserts ignored, and no holder found after any of them: most
        // likely nothing ever held the key, and the row was skipped (an
        // application's trigger: SQLite's `RAISE(IGNORE)`, a PostgreSQL
        // BEFORE trigger returning NULL), as a plain enqueue says it.
        anyhow::bail!(
            "unique key `{unique_key}`: the database stored no row, and no request holds the key \
             (a trigger of the application's may skip such rows; or its holder ended each time \
             this looked: try again)"
        )
    }
}

/// Whether `error` is a unique index's refusal (SQLite, PostgreSQL and
/// MariaDB alike).
fn is_unique_violation(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(error)) if error.kind() == sqlx::error::ErrorKind::UniqueViolation
        )
    })
}
