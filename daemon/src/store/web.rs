//! The queries of the web page and of `/metrics`. Each reads a bounded
//! number of index entries, whatever the size of the table: counts stop at a
//! cap (shown as "N+"), lists are paged by key, and a filter that no index
//! serves (host, text) looks at a bounded window of rows per page. Never a
//! table-wide `COUNT(*)`.
//!
//! The indexes they rely on are in migration 0006 (`task_runner_requests_open`,
//! `…_runnable_by_queue`, `…_by_result`, `…_by_type`, `…_by_queue`) and 0001
//! (`…_running`, `…_completed`).

use anyhow::Result;
use sqlx::query;

use super::{request_from_row, Backend, Change, Pool, RowExt, Seen, Store};
use crate::request::{Request, RequestId};

/// Rows a filter that no index serves looks at per page.
pub(crate) const SCAN_WINDOW: i64 = 10_000;

/// Rows of one page of requests.
pub(crate) const PAGE_SIZE: i64 = 50;

/// At most this many rows are changed by one bulk action.
pub(crate) const BULK_LIMIT: i64 = 10_000;

/// A queue's lag is the longest wait among its first this many runnable
/// rows by id (a bounded read on a table of millions).
const LAG_AMONG: i64 = 1_000;

/// The part of the runnable rule that partial indexes carry (sql::RUNNABLE).
use super::sql::RUNNABLE;

/// Not final: waiting, running, failed, exhausted (the predicate of
/// `task_runner_requests_open`, written identically).
const OPEN: &str = "(result IS NULL OR result NOT IN ('FINISHED', 'CANCELLED', 'REJECTED'))";

/// The rows not final ([`OPEN`]) in three parts, each counted up to its own
/// cap: running, exhausted, and the rest (waiting, delayed, failed with
/// tries left). With one cap over them all, a backlog of exhausted rows
/// (kept for weeks) took the whole count: the overview and `/metrics` read
/// no running and no waiting row, and a type with only those was missing.
/// Each is read with [`OPEN`] too: its partial index on SQLite serves them
/// (without, each read every row of the queue, finished ones too).
const OPEN_PARTS: [&str; 3] = [
    // In the order of [`Capped`]'s fields.
    "result = 'RUNNING'",
    "result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries >= try_limit",
    "(result IS NULL OR (result NOT IN ('FINISHED', 'CANCELLED', 'REJECTED', 'RUNNING') \
       AND NOT (result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries >= try_limit)))",
];

/// How a row that is not final counts on the overview.
const KIND: &str = "CASE WHEN result = 'RUNNING' THEN 'running' \
      WHEN result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries >= try_limit THEN 'exhausted' \
      WHEN result IN ('FAILED', 'CRASHED', 'TIMEOUT') THEN 'failed' \
      ELSE 'waiting' END";

/// Counts of the rows of one queue and type that are not final.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct OpenCounts {
    pub(crate) task: String,
    pub(crate) waiting: i64,
    pub(crate) running: i64,
    pub(crate) failed: i64,
    pub(crate) exhausted: i64,
}

/// Which of a queue's counts stopped at the cap, by [`OPEN_PARTS`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Capped {
    pub(crate) running: bool,
    pub(crate) exhausted: bool,
    /// Waiting and failed (with tries left).
    pub(crate) others: bool,
}

/// One queue's open rows, by type, and its lag.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueueStats {
    pub(crate) queue: String,
    pub(crate) by_type: Vec<OpenCounts>,
    /// The counts that stopped at the cap (the true numbers are larger).
    pub(crate) capped: Capped,
    /// Seconds since the queue's first runnable row became runnable (0 when none).
    pub(crate) lag_seconds: f64,
}

impl QueueStats {
    pub(crate) fn total(&self) -> OpenCounts {
        let mut total = OpenCounts::default();
        for counts in &self.by_type {
            total.waiting += counts.waiting;
            total.running += counts.running;
            total.failed += counts.failed;
            total.exhausted += counts.exhausted;
        }
        total
    }
}

/// A daemon seen through the rows it runs.
#[derive(Debug, Clone)]
pub(crate) struct DaemonRow {
    pub(crate) host: String,
    pub(crate) instance: String,
    /// `up`, `silent` (no heartbeat for longer than asked), `stopped`, or
    /// `unregistered` (seen only through the rows it runs: a daemon older
    /// than migration 0009).
    pub(crate) state: &'static str,
    pub(crate) node_name: Option<String>,
    pub(crate) pid: Option<i64>,
    pub(crate) version: Option<String>,
    pub(crate) max_concurrent: Option<i64>,
    /// Rows RUNNING under this instance now.
    pub(crate) running: i64,
    pub(crate) started_at: Option<String>,
    pub(crate) last_heartbeat: Option<String>,
    pub(crate) heartbeat_age_seconds: Option<f64>,
}

/// Tries that ended in one minute of the last hour, by outcome.
#[derive(Debug, Clone)]
pub(crate) struct MinuteBucket {
    /// 0 is the current minute, 59 an hour ago.
    pub(crate) minutes_ago: i64,
    pub(crate) result: String,
    pub(crate) count: i64,
    /// The longest wait before start among them, seconds.
    pub(crate) max_wait_seconds: f64,
}

/// A schedule's slots as recorded in `task_runner_schedule_slots`.
#[derive(Debug, Clone)]
pub(crate) struct ScheduleSlots {
    pub(crate) schedule: String,
    /// Seconds since the Unix epoch.
    pub(crate) last_slot: Option<f64>,
    pub(crate) last_request: Option<i64>,
}

/// A batch (`task_runner_batches`, when the table exists) and its progress.
#[derive(Debug, Clone)]
pub(crate) struct BatchRow {
    pub(crate) id: i64,
    pub(crate) created_at: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) state: Option<String>,
    pub(crate) sealed_at: Option<String>,
    pub(crate) finished_at: Option<String>,
    pub(crate) total: i64,
    pub(crate) pending: i64,
    pub(crate) finished: i64,
    pub(crate) failed: i64,
    pub(crate) cancelled: i64,
    pub(crate) on_complete: Option<String>,
    pub(crate) on_failure: Option<String>,
}

/// Which requests a page lists (and a bulk action changes).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RequestFilter {
    /// Members of this batch (`batch_id`; only where batches exist).
    pub(crate) batch: Option<i64>,
    /// Step and revert rows of this flow (`flow_id`).
    pub(crate) flow: Option<i64>,
    /// A state of SPEC.md, or `PENDING` for never run.
    pub(crate) state: Option<String>,
    pub(crate) task: Option<String>,
    pub(crate) queue: Option<String>,
    pub(crate) host: Option<String>,
    pub(crate) text: Option<String>,
}

/// What a bulk action did to the rows its preview counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BulkApplied {
    pub(crate) changed: u64,
    /// Refused by `retry` or `cancel` (they changed meanwhile, or a rule
    /// refused them).
    pub(crate) refused: u64,
    /// No longer matching the filter when the action came (changed since
    /// the preview): left alone.
    pub(crate) gone: u64,
}

/// One page of requests, newest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestPage {
    pub(crate) rows: Vec<Request>,
    /// Where the next (older) page starts: ids below this one.
    pub(crate) next_before: Option<i64>,
    /// The window of rows looked at ended before the page was full.
    pub(crate) window_ended: bool,
}

/// A bulk action on the rows a filter selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BulkAction {
    Retry,
    Cancel,
}

/// Our statements are built from fixed fragments; values always go in binds.
fn audited(sql: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(sql.to_string())
}

/// A SQL term with `$N` for its one parameter (if any), and that parameter.
type Term = (String, Bind);

enum Bind {
    Int(i64),
    Text(String),
}

macro_rules! bind_all {
    ($query:expr, $binds:expr) => {{
        let mut query = $query;
        for bind in $binds {
            query = match bind {
                Bind::Int(value) => query.bind(*value),
                Bind::Text(value) => query.bind(value.as_str()),
            };
        }
        query
    }};
}

impl Store {
    /// The queues that have rows not final, in name order (at most `limit`):
    /// one index look-up per queue, by the least name above the previous one.
    pub(crate) async fn open_queues(&self, limit: usize) -> Result<Vec<String>> {
        let first = format!("SELECT min(queue) FROM task_runner_requests WHERE {OPEN}");
        let next =
            format!("SELECT min(queue) FROM task_runner_requests WHERE {OPEN} AND queue > $1");
        let mut queues: Vec<String> = Vec::new();
        while queues.len() < limit {
            let found: Option<String> = on_pool!(self, pool => {
                let query = match queues.last() {
                    None => query(audited(&first)),
                    Some(previous) => query(audited(&next)).bind(previous.as_str()),
                };
                query.fetch_one(pool).await?.opt_text(0)?
            });
            match found {
                Some(queue) => queues.push(queue),
                None => break,
            }
        }
        Ok(queues)
    }

    /// A queue's open rows by type (at most `cap` rows counted of each of
    /// [`OPEN_PARTS`]) and its lag.
    pub(crate) async fn queue_stats(&self, queue: &str, cap: i64) -> Result<QueueStats> {
        let now = self.dialect().now();
        // The longest wait since a row became runnable (its creation, or
        // its delay's end: a retry's backoff), among the first rows by id:
        // a bounded read. Before, the wait of the lowest id alone, which is
        // often a retried row whose backoff just ended, and the lag read
        // seconds while a backlog behind it waited minutes.
        let lag = format!(
            "SELECT {} - min({}) FROM ( \
               SELECT coalesce(delay_until, created_at) AS became FROM task_runner_requests \
                WHERE queue = $1 AND {RUNNABLE} AND (delay_until IS NULL OR delay_until <= {now}) \
                ORDER BY id LIMIT {LAG_AMONG}) AS due",
            self.dialect().epoch_seconds(now),
            // Each row's time as a number first: SQLite's are text.
            self.dialect().epoch_seconds("became")
        );
        let mut stats = QueueStats {
            queue: queue.to_string(),
            ..QueueStats::default()
        };
        let mut by_type: std::collections::BTreeMap<String, OpenCounts> = Default::default();
        for (n, part) in OPEN_PARTS.into_iter().enumerate() {
            let counts = format!(
                "SELECT task_class_name, kind, {} FROM ( \
                   SELECT task_class_name, {KIND} AS kind FROM task_runner_requests \
                    WHERE queue = $1 AND {OPEN} AND {part} LIMIT $2) AS open_rows \
                 GROUP BY task_class_name, kind",
                self.dialect().int64("count(*)")
            );
            let rows: Vec<(String, String, i64)> = on_pool!(self, pool => {
                query(audited(&counts)).bind(queue).bind(cap).fetch_all(pool).await?
                    .iter()
                    .map(|row| Ok((row.text(0)?, row.text(1)?, row.int(2)?)))
                    .collect::<sqlx::Result<_>>()?
            });
            let mut counted = 0;
            for (task, kind, count) in rows {
                counted += count;
                let entry = by_type.entry(task.clone()).or_insert_with(|| OpenCounts {
                    task,
                    ..OpenCounts::default()
                });
                match kind.as_str() {
                    "running" => entry.running += count,
                    "exhausted" => entry.exhausted += count,
                    "failed" => entry.failed += count,
                    _ => entry.waiting += count,
                }
            }
            let capped = counted >= cap;
            match n {
                0 => stats.capped.running = capped,
                1 => stats.capped.exhausted = capped,
                _ => stats.capped.others = capped,
            }
        }
        stats.by_type = by_type.into_values().collect();
        stats.lag_seconds = on_pool!(self, pool => {
            match query(audited(&lag)).bind(queue).fetch_all(pool).await?.first() {
                Some(row) => row.opt_float(0)?.unwrap_or(0.0).max(0.0),
                None => 0.0,
            }
        });
        Ok(stats)
    }

    /// Every queue's stats (at most `max_queues` queues, `cap` rows each).
    pub(crate) async fn all_queue_stats(
        &self,
        max_queues: usize,
        cap: i64,
    ) -> Result<Vec<QueueStats>> {
        let mut all = Vec::new();
        for queue in self.open_queues(max_queues).await? {
            all.push(self.queue_stats(&queue, cap).await?);
        }
        Ok(all)
    }

    /// The daemons heard from in the last day (their own rows, migration
    /// 0009), and any other instance that holds RUNNING rows; with the rows
    /// each runs now. A daemon whose latest heartbeat is older than
    /// `silent_after` is `silent`.
    pub(crate) async fn daemons(
        &self,
        silent_after: std::time::Duration,
    ) -> Result<Vec<DaemonRow>> {
        let now = self.dialect().now();
        let holders = format!(
            "SELECT coalesce(host, ''), coalesce(claimed_by, ''), {}, {}, {} - {} \
               FROM task_runner_requests WHERE result = 'RUNNING' \
              GROUP BY host, claimed_by ORDER BY 1, 2 LIMIT 200",
            self.dialect().int64("count(*)"),
            self.dialect().show_time("max(heartbeat_at)"),
            self.dialect().epoch_seconds(now),
            self.dialect().epoch_seconds("max(heartbeat_at)")
        );
        // (host, instance, rows running, latest heartbeat, its age)
        type Holder = (String, String, i64, Option<String>, Option<f64>);
        let holders: Vec<Holder> = on_pool!(self, pool => {
            query(audited(&holders)).fetch_all(pool).await?
                .iter()
                .map(|row| Ok((row.text(0)?, row.text(1)?, row.int(2)?, row.opt_text(3)?, row.opt_float(4)?)))
                .collect::<sqlx::Result<_>>()?
        });
        let mut daemons = Vec::new();
        if self.table_exists("task_runner_daemons").await? {
            let day_ago = self.dialect().now_plus("-86400");
            let registered = format!(
                "SELECT host, instance, node_name, {}, version, {}, {}, {}, {} - {}, {} \
                   FROM task_runner_daemons WHERE heartbeat_at > {day_ago} \
                  ORDER BY host, started_at DESC LIMIT 200",
                self.dialect().int64("pid"),
                self.dialect().int64("max_concurrent"),
                self.dialect().show_time("started_at"),
                self.dialect().show_time("heartbeat_at"),
                self.dialect().epoch_seconds(now),
                self.dialect().epoch_seconds("heartbeat_at"),
                self.dialect()
                    .int64("CASE WHEN stopped_at IS NULL THEN 0 ELSE 1 END"),
            );
            daemons = on_pool!(self, pool => {
                query(audited(&registered)).fetch_all(pool).await?
                    .iter()
                    .map(|row| {
                        let age = row.opt_float(8)?;
                        let stopped = row.int(9)? != 0;
                        Ok(DaemonRow {
                            host: row.text(0)?,
                            instance: row.text(1)?,
                            state: if stopped {
                                "stopped"
                            } else if age.is_some_and(|age| age > silent_after.as_secs_f64()) {
                                "silent"
                            } else {
                                "up"
                            },
                            node_name: row.opt_text(2)?,
                            pid: row.opt_int(3)?,
                            version: row.opt_text(4)?,
                            max_concurrent: row.opt_int(5)?,
                            running: 0,
                            started_at: row.opt_text(6)?,
                            last_heartbeat: row.opt_text(7)?,
                            heartbeat_age_seconds: age,
                        })
                    })
                    .collect::<sqlx::Result<Vec<_>>>()?
            });
        }
        for (host, instance, running, last_heartbeat, age) in holders {
            match daemons.iter_mut().find(|d| d.instance == instance) {
                Some(daemon) => daemon.running = running,
                None => daemons.push(DaemonRow {
                    host,
                    instance,
                    state: "unregistered",
                    node_name: None,
                    pid: None,
                    version: None,
                    max_concurrent: None,
                    running,
                    started_at: None,
                    last_heartbeat,
                    heartbeat_age_seconds: age,
                }),
            }
        }
        Ok(daemons)
    }

    /// Tries that ended in the last hour (at most 100,000 looked at), by
    /// minute and outcome, with the longest wait before start among them.
    /// A row counts once, for its latest try.
    pub(crate) async fn tries_last_hour(&self) -> Result<Vec<MinuteBucket>> {
        let d = self.dialect();
        let since = d.now_plus("-3600");
        let minutes_ago = d.int64(&d.floor(&format!(
            "{} / 60",
            d.seconds_between("completed_at", d.now())
        )));
        // An infinite time an application wrote (PostgreSQL) makes no wait
        // and no minute: its wait is left out, and a try "ended" in the
        // future is not of the last hour.
        let wait = d.seconds_between("coalesce(delay_until, created_at)", "started_at");
        let wait = format!("CASE WHEN {wait} BETWEEN -1e12 AND 1e12 THEN {wait} END");
        let now = d.now();
        let sql = format!(
            "SELECT minutes_ago, coalesce(result, ''), {}, max(wait) FROM ( \
               SELECT {minutes_ago} AS minutes_ago, result, {wait} AS wait \
                 FROM task_runner_requests WHERE completed_at > {since} AND completed_at <= {now} \
                ORDER BY completed_at DESC LIMIT 100000) AS recent \
              GROUP BY minutes_ago, result ORDER BY 1, 2",
            self.dialect().int64("count(*)")
        );
        Ok(on_pool!(self, pool => {
            query(audited(&sql)).fetch_all(pool).await?
                .iter()
                .map(|row| Ok(MinuteBucket {
                    minutes_ago: row.int(0)?,
                    result: row.text(1)?,
                    count: row.int(2)?,
                    max_wait_seconds: row.opt_float(3)?.unwrap_or(0.0).max(0.0),
                }))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// The latest slot of each schedule that ever enqueued one.
    pub(crate) async fn schedule_slots(&self) -> Result<Vec<ScheduleSlots>> {
        let sql = format!(
            "SELECT s.schedule, {}, s.request_id FROM task_runner_schedule_slots AS s \
              WHERE s.slot = (SELECT max(slot) FROM task_runner_schedule_slots WHERE schedule = s.schedule) \
              ORDER BY s.schedule LIMIT 500",
            self.dialect().epoch_seconds("s.slot")
        );
        Ok(on_pool!(self, pool => {
            query(audited(&sql)).fetch_all(pool).await?
                .iter()
                .map(|row| Ok(ScheduleSlots {
                    schedule: row.text(0)?,
                    last_slot: row.opt_float(1)?,
                    last_request: row.opt_int(2)?,
                }))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// The filter as SQL terms: the one an index serves first (state, type,
    /// queue), then the others.
    fn filter_terms(&self, filter: &RequestFilter) -> (Option<Term>, Vec<Term>) {
        let contains = |column: &str, n: &str| self.dialect().contains(column, n);
        let mut indexed = Vec::new();
        if let Some(batch) = filter.batch {
            indexed.push(("batch_id = $N".to_string(), Some(Bind::Int(batch))));
        }
        if let Some(flow) = filter.flow {
            indexed.push(("flow_id = $N".to_string(), Some(Bind::Int(flow))));
        }
        // The overview's kinds of open rows ([`KIND`]), whose counts link
        // here (before, its "failed" linked to every FAILED row, exhausted
        // ones too, and none CRASHED or TIMEOUT).
        let kind = match filter.state.as_deref() {
            Some("PENDING") => Some("result IS NULL"),
            Some("WAITING") => Some("(result IS NULL OR result = 'INTERRUPTED')"),
            Some("RETRYING") => {
                Some("result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries < try_limit")
            }
            Some("EXHAUSTED") => {
                Some("result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries >= try_limit")
            }
            _ => None,
        };
        match (kind, filter.state.as_deref()) {
            (Some(kind), _) => indexed.push((kind.to_string(), None)),
            (None, Some(state)) => {
                indexed.push(("result = $N".to_string(), Some(Bind::Text(state.into()))))
            }
            (None, None) => {}
        }
        if let Some(task) = &filter.task {
            indexed.push((
                "task_class_name = $N".into(),
                Some(Bind::Text(task.clone())),
            ));
        }
        if let Some(queue) = &filter.queue {
            indexed.push(("queue = $N".into(), Some(Bind::Text(queue.clone()))));
        }
        let mut others: Vec<(String, Option<Bind>)> = Vec::new();
        if let Some(host) = &filter.host {
            others.push(("host = $N".into(), Some(Bind::Text(host.clone()))));
        }
        if let Some(text) = &filter.text {
            let n = "$N";
            others.push((
                format!(
                    "({} OR {} OR {})",
                    contains("coalesce(options, '')", n),
                    contains("coalesce(result_text, '')", n),
                    contains("task_class_name", n)
                ),
                Some(Bind::Text(text.clone())),
            ));
        }
        let mut iter = indexed.into_iter();
        let first = iter.next();
        others.extend(iter);
        let fix = |(sql, bind): (String, Option<Bind>)| (sql, bind.unwrap_or(Bind::Int(0)));
        (first.map(fix), others.into_iter().map(fix).collect())
    }

    /// One page of requests matching `filter`, newest first, below id
    /// `before`. The rows an index picks (by state, else type, else queue,
    /// else all) are looked at in windows of [`SCAN_WINDOW`]; the other
    /// filters apply within the window, so a page costs a bounded read.
    pub(crate) async fn find_requests(
        &self,
        filter: &RequestFilter,
        before: Option<i64>,
    ) -> Result<RequestPage> {
        let (first, others) = self.filter_terms(filter);
        let mut binds: Vec<Bind> = Vec::new();
        let mut number = 0;
        let mut take = |sql: &str, bind: Bind, binds: &mut Vec<Bind>| -> String {
            let uses = sql.matches("$N").count();
            let mut out = sql.to_string();
            if uses > 0 {
                number += 1;
                out = out.replace("$N", &format!("${number}"));
                binds.push(bind);
            }
            out
        };
        let mut inner_terms = Vec::new();
        if let Some((sql, bind)) = first {
            inner_terms.push(take(&sql, bind, &mut binds));
        }
        if let Some(before) = before {
            inner_terms.push(take("id < $N", Bind::Int(before), &mut binds));
        }
        let inner_where = if inner_terms.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", inner_terms.join(" AND "))
        };
        if others.is_empty() {
            // Every filter is served by the index: read the page directly.
            let page = take("$N", Bind::Int(PAGE_SIZE + 1), &mut binds);
            let sql = format!(
                "{} {inner_where} ORDER BY id DESC LIMIT {page}",
                self.sql.select_listed
            );
            let mut rows: Vec<Request> = on_pool!(self, pool => {
                bind_all!(query(audited(&sql)), &binds).fetch_all(pool).await?
                    .iter()
                    .map(request_from_row)
                    .collect::<sqlx::Result<_>>()?
            });
            let more = rows.len() as i64 > PAGE_SIZE;
            rows.truncate(PAGE_SIZE as usize);
            let next_before = if more {
                rows.last().map(|r| r.id)
            } else {
                None
            };
            return Ok(RequestPage {
                rows,
                next_before,
                window_ended: false,
            });
        }
        let window = take("$N", Bind::Int(SCAN_WINDOW), &mut binds);
        // The window's own parameters come first: its count below reuses them.
        let inner_bind_count = binds.len();
        let inner = format!(
            "SELECT id FROM task_runner_requests {inner_where} ORDER BY id DESC LIMIT {window}"
        );
        let mut outer_terms = Vec::new();
        if let Some(before) = before {
            // Again outside: a merge join then starts the table at the cursor.
            outer_terms.push(take("id < $N", Bind::Int(before), &mut binds));
        }
        for (sql, bind) in others {
            outer_terms.push(take(&sql, bind, &mut binds));
        }
        let page = take("$N", Bind::Int(PAGE_SIZE + 1), &mut binds);
        // The window joined by key, in its own order, so that the planner
        // walks it (not the table) and stops at a full page.
        let sql = format!(
            "{} WHERE {} ORDER BY id DESC LIMIT {page}",
            self.sql.select_listed.replacen(
                " FROM task_runner_requests",
                &format!(" FROM ({inner}) AS w JOIN task_runner_requests USING (id)"),
                1
            ),
            outer_terms.join(" AND ")
        );
        let mut rows: Vec<Request> = on_pool!(self, pool => {
            bind_all!(query(audited(&sql)), &binds).fetch_all(pool).await?
                .iter()
                .map(request_from_row)
                .collect::<sqlx::Result<_>>()?
        });
        if rows.len() as i64 > PAGE_SIZE {
            rows.truncate(PAGE_SIZE as usize);
            let next_before = rows.last().map(|r| r.id);
            return Ok(RequestPage {
                rows,
                next_before,
                window_ended: false,
            });
        }
        // A short page: did the window end before the rows did?
        let window_sql = format!(
            "SELECT {}, {} FROM ({inner}) AS w",
            self.dialect().int64("count(*)"),
            self.dialect().int64("min(id)")
        );
        let inner_binds = &binds[..inner_bind_count];
        let (scanned, lowest): (i64, Option<i64>) = on_pool!(self, pool => {
            let row = bind_all!(query(audited(&window_sql)), inner_binds).fetch_one(pool).await?;
            (row.int(0)?, row.opt_int(1)?)
        });
        let window_ended = scanned >= SCAN_WINDOW;
        Ok(RequestPage {
            rows,
            next_before: if window_ended { lowest } else { None },
            window_ended,
        })
    }

    /// The ids a bulk action selects, newest first; only up to id `upto`
    /// when given (the highest its preview saw).
    fn bulk_select(
        &self,
        filter: &RequestFilter,
        action: BulkAction,
        upto: Option<i64>,
    ) -> (String, Vec<Bind>) {
        let (first, mut others) = self.filter_terms(filter);
        if let Some(upto) = upto {
            others.push(("id <= $N".to_string(), Bind::Int(upto)));
        }
        let eligible = match action {
            // Not a flow's steps and reverts: `retry` refuses them (see
            // `Change::InFlow`); its alert is retried like any row.
            BulkAction::Retry => {
                "result IS NOT NULL AND result <> 'RUNNING' AND (flow_id IS NULL OR flow_step IS NULL)"
            }
            // What `cancel` takes: not a row exhausted, which is final.
            BulkAction::Cancel => {
                "(result IS NULL OR result = 'RUNNING' \
                  OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND tries < try_limit))"
            }
        };
        let mut terms = vec![eligible.to_string()];
        let mut binds = Vec::new();
        for (sql, bind) in first.into_iter().chain(others) {
            if sql.contains("$N") {
                binds.push(bind);
                terms.push(sql.replace("$N", &format!("${}", binds.len())));
            } else {
                terms.push(sql);
            }
        }
        binds.push(Bind::Int(BULK_LIMIT));
        let sql = format!(
            "SELECT id, coalesce(result, 'PENDING'), {} FROM task_runner_requests WHERE {} ORDER BY id DESC LIMIT ${}",
            self.dialect().int64("tries"),
            terms.join(" AND "),
            binds.len()
        );
        (sql, binds)
    }

    /// The rows a bulk action would change (at most [`BULK_LIMIT`], newest
    /// first): its preview counts them, and the action, once confirmed,
    /// changes none but these.
    pub(crate) async fn bulk_preview(
        &self,
        filter: &RequestFilter,
        action: BulkAction,
    ) -> Result<Vec<i64>> {
        let rows = self.bulk_rows(filter, action, None).await?;
        Ok(rows.into_iter().map(|(id, _)| id).collect())
    }

    /// The rows a bulk action selects, each with its state and tries now.
    async fn bulk_rows(
        &self,
        filter: &RequestFilter,
        action: BulkAction,
        upto: Option<i64>,
    ) -> Result<Vec<(i64, Seen)>> {
        let (select, binds) = self.bulk_select(filter, action, upto);
        Ok(on_pool!(self, pool => {
            bind_all!(query(audited(&select)), &binds)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| Ok((row.int(0)?, Seen { state: row.text(1)?, tries: row.int(2)? })))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// Applies a bulk action to the rows of `previewed` (its preview's,
    /// [`Store::bulk_preview`]) that `filter` still selects, newest first,
    /// each as `retry` or `cancel` of that row alone does it
    /// ([`Store::retry`], [`Store::cancel`]): a batch member's batch is
    /// recounted, a pending row's cancel goes through the finalization
    /// path, a row whose unique key another holds is refused. (Before, one
    /// statement changed them all: batch counts went stale, a shared unique
    /// key failed the whole action, and a flow's rows ran again outside it.
    /// Later, rows the preview never counted were changed too.)
    pub(crate) async fn bulk_apply(
        &self,
        filter: &RequestFilter,
        action: BulkAction,
        previewed: &[i64],
    ) -> Result<BulkApplied> {
        let previewed: std::collections::HashSet<i64> = previewed.iter().copied().collect();
        let upto = previewed.iter().copied().max();
        let rows = match upto {
            Some(upto) => self.bulk_rows(filter, action, Some(upto)).await?,
            None => Vec::new(),
        };
        let rows: Vec<(i64, Seen)> = rows
            .into_iter()
            .filter(|(id, _)| previewed.contains(id))
            .collect();
        let gone = (previewed.len() - rows.len()) as u64;
        let (mut changed, mut refused) = (0, 0);
        for (id, seen) in rows {
            let id = RequestId(id);
            crate::test_hooks::pause_when_told("TASKRUNNER_TEST_BULK_ROW_DELAY_MS").await;
            let change = match action {
                // Only as it was when selected: a row whose daemon retried
                // it meanwhile, to its end, is not run again.
                BulkAction::Retry => self.retry(id, Some(&seen)).await?,
                BulkAction::Cancel => self.cancel(id).await?,
            };
            match change {
                Change::Done | Change::Requested => changed += 1,
                _ => refused += 1,
            }
        }
        Ok(BulkApplied {
            changed,
            refused,
            gone,
        })
    }

    /// Batches, newest first, below id `before` (one page and one more).
    pub(crate) async fn batches(&self, before: Option<i64>) -> Result<Vec<BatchRow>> {
        let sql = format!(
            "SELECT {}, {}, name, state, {}, {}, {}, {}, {}, {}, {}, on_complete, on_failure \
               FROM task_runner_batches WHERE ({before} IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
            self.dialect().int64("id"),
            self.dialect().show_time("created_at"),
            self.dialect().show_time("sealed_at"),
            self.dialect().show_time("finished_at"),
            self.dialect().int64("total"),
            self.dialect().int64("pending"),
            self.dialect().int64("finished"),
            self.dialect().int64("failed"),
            self.dialect().int64("cancelled"),
            before = self.dialect().nullable_int("$1"),
        );
        Ok(on_pool!(self, pool => {
            query(audited(&sql)).bind(before).bind(PAGE_SIZE + 1).fetch_all(pool).await?
                .iter()
                .map(|row| Ok(BatchRow {
                    id: row.int(0)?,
                    created_at: row.opt_text(1)?,
                    name: row.opt_text(2)?,
                    state: row.opt_text(3)?,
                    sealed_at: row.opt_text(4)?,
                    finished_at: row.opt_text(5)?,
                    total: row.int(6)?,
                    pending: row.int(7)?,
                    finished: row.int(8)?,
                    failed: row.int(9)?,
                    cancelled: row.int(10)?,
                    on_complete: row.opt_text(11)?,
                    on_failure: row.opt_text(12)?,
                }))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// Whether a table exists (pages for tables other issues add).
    pub(crate) async fn table_exists(&self, table: &str) -> Result<bool> {
        let sql = match self.backend() {
            Backend::Sqlite => {
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = $1"
            }
            // In the schema taskrunner's tables are made in, as the
            // migrations' other look-ups: a table of that name in another
            // schema (a second install beside one in `public`) is not it.
            Backend::Postgres => {
                "SELECT count(*)::bigint FROM pg_tables \
                  WHERE schemaname = current_schema() AND tablename = $1"
            }
            Backend::MySql => {
                "SELECT count(*) FROM information_schema.tables \
                  WHERE table_schema = DATABASE() AND table_name = $1"
            }
        };
        Ok(on_pool!(self, pool => {
            query(sql).bind(table).fetch_one(pool).await?.int(0)? > 0
        }))
    }
}
