//! The flow step machine: each execute and each revert is a request row,
//! and the row that comes next (the next step, the first or next revert, a
//! restart for `retry.times`) or the flow's end is written by the
//! transaction that records the current row's final outcome
//! ([`Store::finalize`]), under the lock of the flow row.
//!
//! Why it is exact. The flow row holds its position (`attempt`,
//! `current_step`, `state`: RUNNING executes, REVERTING reverts); the row
//! at that position is found by its `unique_key`
//! (`flow:ID:ATTEMPT:STEP:ACTION`, see [`crate::flow::unique_key`]), never
//! by "the row that just ended". [`Store::advance_flow`] looks at that row
//! under the lock: open, nothing to do; final, move the position on and
//! create the next row (`INSERT … ON CONFLICT DO NOTHING` on its key);
//! missing (deleted by hand), create it. So a row that ends twice, a stale
//! row from an earlier attempt, two daemons advancing the same flow, or a
//! crash between any two statements, can neither skip a step nor create
//! one twice: whoever takes the lock next sees the committed position.
//!
//! Lock order: the flow row, then a batch row, then request rows.

use std::collections::BTreeMap;

use anyhow::Result;
use serde_yaml::{Mapping, Value};
use sqlx::query;

use super::compose::{AnyRow, Param, Tx};
use super::sql::{cancel_unstarted, unfinished, Dialect, Statements};
use super::{Locks, Pool, RowExt, Store};
use crate::flow::{self, Action, Definition};
use Param::{Int, OptInt, OptText, Text};

/// How long a flow whose name a daemon does not know is left to the
/// daemons that know it (a rolling deploy: the daemons not yet upgraded
/// know nothing of a new flow), from when that daemon first saw it, before
/// it ends the flow FAILED. A name no daemon knows (a typo in plain SQL)
/// fails after that long too; `flow post` refuses it at once. Measured by
/// each daemon's own clock, not from `created_at`: a flow set back to
/// `state` NULL is waited for afresh, and MariaDB stores an application
/// session's `created_at` in that session's time zone.
pub(crate) const UNKNOWN_FLOW_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Room left in a composed row's options beside a flow's store: the
/// summary that the flow's `on_exhausted` alert adds to it.
const ALERT_ROOM: usize = 4 << 10;

/// A flow row.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Flow {
    pub(crate) id: i64,
    pub(crate) created_at: Option<String>,
    pub(crate) name: String,
    pub options: Option<String>,
    /// NULL until a daemon takes it; then RUNNING, REVERTING, FINISHED,
    /// REVERTED, FAILED or CANCELLED.
    pub state: Option<String>,
    pub attempt: i64,
    pub(crate) current_step: Option<i64>,
    pub store: Option<String>,
    pub definition: Option<String>,
    pub(crate) finished_at: Option<String>,
    pub result_text: Option<String>,
    pub(crate) cancel_requested: bool,
}

impl Flow {
    fn is_active(&self) -> bool {
        matches!(self.state.as_deref(), Some("RUNNING" | "REVERTING"))
    }
}

/// One request row of a flow, as the board shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepRow {
    pub(crate) id: i64,
    pub(crate) attempt: Option<i64>,
    /// NULL (never run), RUNNING, FINISHED, …
    pub result: Option<String>,
    /// Failed with no try left.
    pub(crate) exhausted: bool,
    pub(crate) host: Option<String>,
    pub(crate) tries: i64,
    pub(crate) try_limit: i64,
}

/// One step on the board: its declaration and its rows of the current attempt.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepBoard {
    pub(crate) index: usize,
    pub(crate) name: String,
    pub(crate) task: String,
    pub(crate) revert_task: Option<String>,
    pub(crate) provides: Option<String>,
    /// What the step provided (in the store), on one line.
    pub(crate) provided: Option<String>,
    pub execute: Option<StepRow>,
    pub revert: Option<StepRow>,
    /// Executes of this step in all attempts (an earlier attempt's included).
    pub executes_all_attempts: i64,
    /// This is the flow's current position.
    pub(crate) current: bool,
}

/// The board of one flow (`flow show`, the web page's flow page).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FlowBoard {
    pub(crate) flow: Flow,
    /// From the snapshot taken at start (empty until a daemon takes the flow).
    pub steps: Vec<StepBoard>,
    /// `retry.times` of the snapshot.
    pub(crate) retry_times: u32,
}

/// What `flow cancel` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FlowChange {
    /// Done; the flow's state now.
    Done(String),
    NotFound,
    AlreadyFinal(String),
}

pub(super) struct FlowSql {
    lock_flow: String,
    lock_flow_nowait: String,
    insert_flow: String,
    flow_row: String,
    list_flows: String,
    pub(super) step_by_key: String,
    insert_step: String,
    move_flow: String,
    end_flow: String,
    take_flow: String,
    untaken: String,
    untaken_unknown: String,
    stuck: String,
    step_rows: String,
    cancel_unstarted: String,
    cancel_running: String,
    cancel_requested: String,
    insert_alert: String,
}

pub(super) static FLOW: Statements<FlowSql> = Statements::new(FlowSql::render);

impl FlowSql {
    fn render(d: Dialect) -> FlowSql {
        let now = d.now();
        let (insert_or_ignore, on_conflict_ignore) = (d.insert_or_ignore(), d.on_conflict_ignore());
        let columns = [
            d.int64("id"),
            d.show_time("created_at"),
            "flow_name".into(),
            "options".into(),
            "state".into(),
            d.int64("attempt"),
            d.int64("current_step"),
            "store".into(),
            "definition".into(),
            d.show_time("finished_at"),
            "result_text".into(),
            d.int64("CASE WHEN cancel_requested_at IS NULL THEN 0 ELSE 1 END"),
        ]
        .join(", ");
        FlowSql {
            lock_flow: format!(
                "SELECT {} FROM task_runner_flows WHERE id = $1 {}",
                d.int64("id"),
                d.for_update()
            ),
            lock_flow_nowait: format!(
                "SELECT {} FROM task_runner_flows WHERE id = $1 {}",
                d.int64("id"),
                d.for_update_nowait()
            ),
            insert_flow: format!(
                "INSERT INTO task_runner_flows (flow_name, options) VALUES ($1, $2) {}",
                d.returning_id("id")
            ),
            flow_row: format!("SELECT {columns} FROM task_runner_flows WHERE id = $1"),
            list_flows: format!(
                "SELECT {columns} FROM task_runner_flows WHERE ($2 IS NULL OR id < $2) ORDER BY id DESC LIMIT $1"
            ),
            // Through the flow's rows (`flow_id`'s index): the unique key's
            // index holds only open rows, and without the flow this read
            // every row of the table, under the flow's lock, at each step's
            // end. The latest row, should plain SQL have copied one.
            step_by_key: format!(
                "SELECT {}, result, result_text, {}, {} FROM task_runner_requests \
                  WHERE flow_id = $2 AND unique_key = $1 ORDER BY id DESC LIMIT 1",
                d.int64("id"),
                d.int64(&format!("CASE WHEN {} THEN 1 ELSE 0 END", unfinished(""))),
                d.int64("CASE WHEN started_at IS NULL THEN 0 ELSE 1 END")
            ),
            insert_step: format!(
                "{insert_or_ignore} INTO task_runner_requests \
                   (task_class_name, options, flow_id, flow_step, flow_action, unique_key, try_limit) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) {on_conflict_ignore}"
            ),
            move_flow: "UPDATE task_runner_flows \
                SET state = $2, attempt = $3, current_step = $4, store = $5, result_text = $6 \
              WHERE id = $1"
                .to_string(),
            end_flow: format!(
                "UPDATE task_runner_flows SET state = $2, result_text = $3, finished_at = {now} \
                  WHERE id = $1"
            ),
            take_flow: "UPDATE task_runner_flows \
                SET state = 'RUNNING', attempt = 1, current_step = 0, store = $2, definition = $3 \
              WHERE id = $1 AND state IS NULL"
                .to_string(),
            // Flows of the names `$1` (a JSON array) that no daemon took.
            untaken: format!(
                "SELECT {} FROM task_runner_flows \
                  WHERE state IS NULL AND flow_name IN ({}) ORDER BY id LIMIT 100",
                d.int64("id"),
                d.json_strings("$1")
            ),
            // And those of other names.
            untaken_unknown: format!(
                "SELECT {}, flow_name FROM task_runner_flows \
                  WHERE state IS NULL AND flow_name NOT IN ({}) ORDER BY id LIMIT 100",
                d.int64("id"),
                d.json_strings("$1")
            ),
            // Active flows with no open row: their current row ended
            // without advancing them (plain SQL wrote it, or deleted it).
            stuck: format!(
                "SELECT {} FROM task_runner_flows f \
                  WHERE (state = 'RUNNING' OR state = 'REVERTING') \
                    AND NOT EXISTS (SELECT 1 FROM task_runner_requests r \
                                     WHERE r.flow_id = f.id AND {}) \
                  ORDER BY id LIMIT 100",
                d.int64("id"),
                unfinished("r.")
            ),
            step_rows: format!(
                "SELECT {}, {}, flow_action, unique_key, result, host, {}, {}, {} \
                   FROM task_runner_requests WHERE flow_id = $1 ORDER BY id",
                d.int64("id"),
                d.int64("coalesce(flow_step, -1)"),
                d.int64("tries"),
                d.int64("try_limit"),
                d.int64("CASE WHEN result IN ('FAILED', 'CRASHED', 'TIMEOUT') AND tries >= try_limit THEN 1 ELSE 0 END"),
            ),
            cancel_unstarted: cancel_unstarted(d, "flow_id"),
            cancel_running: format!(
                "UPDATE task_runner_requests SET cancel_requested_at = {now} \
                  WHERE flow_id = $1 AND result = 'RUNNING' AND cancel_requested_at IS NULL"
            ),
            cancel_requested: format!(
                "UPDATE task_runner_flows SET cancel_requested_at = {now} WHERE id = $1"
            ),
            insert_alert: format!(
                "{insert_or_ignore} INTO task_runner_requests \
                   (task_class_name, options, callback_of, flow_id, unique_key) \
                 VALUES ($1, $2, $3, $4, $5) {on_conflict_ignore}"
            ),
        }
    }
}

fn flow_from_row(row: &impl RowExt) -> sqlx::Result<Flow> {
    Ok(Flow {
        id: row.int(0)?,
        created_at: row.opt_text(1)?,
        name: row.text(2)?,
        options: row.opt_text(3)?,
        state: row.opt_text(4)?,
        attempt: row.int(5)?,
        current_step: row.opt_int(6)?,
        store: row.opt_text(7)?,
        definition: row.opt_text(8)?,
        finished_at: row.opt_text(9)?,
        result_text: row.opt_text(10)?,
        cancel_requested: row.int(11)? != 0,
    })
}

fn yaml_text(mapping: &Mapping) -> String {
    serde_yaml::to_string(&Value::Mapping(mapping.clone())).unwrap_or_default()
}

fn parse_store(text: Option<&str>) -> Mapping {
    text.and_then(|t| serde_yaml::from_str::<Value>(t).ok())
        .and_then(|v| match v {
            Value::Mapping(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default()
}

/// The row at a flow's position, as the step machine judges it.
struct AtPosition {
    id: i64,
    result: Option<String>,
    result_text: Option<String>,
    open: bool,
    /// A try of it was claimed once at least (`started_at` is set by the
    /// claim alone): it may have done part of its work.
    started: bool,
}

/// The longest chain of moves one advance makes (each move either creates
/// a row, which stops it, or ends the flow); a bound against rows made by
/// hand with the keys of later positions.
const MAX_MOVES: usize = 1000;

impl Store {
    fn flow_sql(&self) -> &'static FlowSql {
        FLOW.of(self.backend())
    }

    /// Whether a flow's `store` (as YAML) is more than it may hold, and if
    /// so by how much, in words: at most what a composed row may carry (its
    /// steps' options are the store), less [`ALERT_ROOM`].
    fn store_over_its_bound(&self, store: &str) -> Option<String> {
        let bound = self.composed_max().saturating_sub(ALERT_ROOM);
        (store.len() > bound).then(|| {
            format!(
                "{}, more than a flow's store may hold ({})",
                crate::units::format_size(store.len() as u64),
                crate::units::format_size(bound as u64),
            )
        })
    }

    pub(super) async fn lock_flow(&self, tx: &mut Tx, flow_id: i64) -> Result<bool> {
        self.lock_flow_for_ending(tx, flow_id, Locks::Wait).await
    }

    /// [`lock_flow`](Store::lock_flow) for a request's end: with
    /// [`Locks::SetAside`], fails with [`super::RowLocked`] when another
    /// session holds the flow's row.
    pub(super) async fn lock_flow_for_ending(
        &self,
        tx: &mut Tx,
        flow_id: i64,
        locks: Locks,
    ) -> Result<bool> {
        let f = self.flow_sql();
        let (wait, nowait) = (&f.lock_flow, &f.lock_flow_nowait);
        super::compose::lock_row(
            tx,
            super::compose::HeldRow::Flow(flow_id),
            locks,
            wait,
            nowait,
        )
        .await
    }

    async fn flow_in(&self, tx: &mut Tx, flow_id: i64) -> Result<Option<Flow>> {
        let rows = tx.fetch(&self.flow_sql().flow_row, &[Int(flow_id)]).await?;
        Ok(match rows.first() {
            Some(row) => Some(flow_from_row(row)?),
            None => None,
        })
    }

    /// Moves flow `flow_id` (locked by the caller) on from its current
    /// position as far as the rows allow: see the module's comment.
    pub(super) async fn advance_flow(&self, tx: &mut Tx, flow_id: i64) -> Result<()> {
        let f = self.flow_sql();
        for _ in 0..MAX_MOVES {
            let Some(flow) = self.flow_in(tx, flow_id).await? else {
                return Ok(());
            };
            if !flow.is_active() {
                return Ok(());
            }
            let definition: Definition = match flow
                .definition
                .as_deref()
                .map(serde_yaml::from_str::<Definition>)
            {
                Some(Ok(definition)) if !definition.steps.is_empty() => definition,
                _ => {
                    let why = "FAILED: its stored definition is not readable";
                    tracing::error!(flow = flow.id, name = %flow.name, "flow {} ({}) {why}", flow.id, flow.name);
                    tx.execute(&f.end_flow, &[Int(flow.id), Text("FAILED"), Text(why)])
                        .await?;
                    return Ok(());
                }
            };
            let steps = &definition.steps;
            let step = flow
                .current_step
                .unwrap_or(0)
                .clamp(0, steps.len() as i64 - 1) as usize;
            let action = if flow.state.as_deref() == Some("REVERTING") {
                Action::Revert
            } else {
                Action::Execute
            };
            let key = flow::unique_key(flow.id, flow.attempt, step, action);
            let rows = tx
                .fetch(&f.step_by_key, &[Text(&key), Int(flow.id)])
                .await?;
            let Some(at) = rows.first().map(at_position).transpose()? else {
                // Missing (never made, or deleted by hand): make it.
                let task = match action {
                    Action::Execute => Some(steps[step].task.as_str()),
                    Action::Revert => steps[step].revert.as_deref(),
                };
                let Some(task) = task else {
                    // A revert position whose step has none (a definition
                    // edited by hand): go on to the next revert.
                    self.next_revert(tx, &flow, &definition, step as i64 - 1)
                        .await?;
                    continue;
                };
                self.insert_step(tx, &flow, &definition, step, action, task)
                    .await?;
                return Ok(());
            };
            if at.open {
                return Ok(());
            }
            let finished = at.result.as_deref() == Some("FINISHED");
            match (action, finished) {
                (Action::Execute, true) => {
                    let mut store = parse_store(flow.store.as_deref());
                    if let Some(provides) = &steps[step].provides {
                        let stdout = at.result_text.as_deref().unwrap_or("");
                        store.insert(provides.clone().into(), flow::provided_value(stdout));
                    }
                    let store = yaml_text(&store);
                    if let Some(over) = self.store_over_its_bound(&store) {
                        // What the step provided cannot be kept: the step
                        // did its work, and the flow cannot go on. Revert
                        // it, then the earlier ones, with the store as it was.
                        let why = format!(
                            "step {} ({}) finished, but what it provided makes the flow's store {over}",
                            step + 1,
                            steps[step].name,
                        );
                        self.next_revert(tx, &reverting(&flow, why), &definition, step as i64)
                            .await?;
                        continue;
                    }
                    if flow.cancel_requested {
                        // `flow cancel --revert` came while the step ran, and
                        // it finished before it was stopped: its work is
                        // reverted with the earlier steps' (with what it
                        // provided), and no later step starts, the last one's
                        // end included.
                        let why = format!(
                            "step {} ({}) finished after the flow was cancelled",
                            step + 1,
                            steps[step].name,
                        );
                        let cancelled = Flow {
                            store: Some(store),
                            ..reverting(&flow, why)
                        };
                        self.next_revert(tx, &cancelled, &definition, step as i64)
                            .await?;
                        continue;
                    }
                    if step + 1 < steps.len() {
                        tx.execute(
                            &f.move_flow,
                            &[
                                Int(flow.id),
                                Text("RUNNING"),
                                Int(flow.attempt),
                                Int(step as i64 + 1),
                                Text(&store),
                                OptText(flow.result_text.as_deref()),
                            ],
                        )
                        .await?;
                        let moved = Flow {
                            store: Some(store),
                            ..flow.clone()
                        };
                        let next = &steps[step + 1];
                        self.insert_step(
                            tx,
                            &moved,
                            &definition,
                            step + 1,
                            Action::Execute,
                            &next.task,
                        )
                        .await?;
                    } else {
                        tx.execute(
                            &f.move_flow,
                            &[
                                Int(flow.id),
                                Text("RUNNING"),
                                Int(flow.attempt),
                                Int(step as i64),
                                Text(&store),
                                OptText(None),
                            ],
                        )
                        .await?;
                        let text = format!(
                            "{} step{} finished (attempt {})",
                            steps.len(),
                            if steps.len() == 1 { "" } else { "s" },
                            flow.attempt
                        );
                        tx.execute(&f.end_flow, &[Int(flow.id), Text("FINISHED"), Text(&text)])
                            .await?;
                    }
                }
                (Action::Execute, false) => {
                    // The step ended for good without FINISHED: revert it
                    // if a try of it ever started (it may have done part of
                    // its work), then the earlier ones. One that never
                    // started (cancelled while it waited, `flow cancel
                    // --revert`) is not reverted: its revert would undo
                    // what was there before the flow (an earlier install,
                    // or the revert of an earlier attempt, run twice).
                    let from = if at.started {
                        step as i64
                    } else {
                        step as i64 - 1
                    };
                    let why = format!(
                        "step {} ({}) ended {}: {}",
                        step + 1,
                        steps[step].name,
                        at.result.as_deref().unwrap_or("?"),
                        first_line(at.result_text.as_deref())
                    );
                    self.next_revert(tx, &reverting(&flow, why), &definition, from)
                        .await?;
                }
                (Action::Revert, true) => {
                    self.next_revert(tx, &flow, &definition, step as i64 - 1)
                        .await?;
                }
                (Action::Revert, false) => {
                    let why = format!(
                        "revert of step {} ({}, {}) ended {}: {}; reverts stopped, a person must look (after: {})",
                        step + 1,
                        steps[step].name,
                        steps[step].revert.as_deref().unwrap_or("?"),
                        at.result.as_deref().unwrap_or("?"),
                        first_line(at.result_text.as_deref()),
                        flow.result_text.as_deref().unwrap_or("-")
                    );
                    tracing::error!(
                        flow = flow.id,
                        name = %flow.name,
                        request = at.id,
                        "flow {} ({}) FAILED: {why}",
                        flow.id,
                        flow.name
                    );
                    tx.execute(&f.end_flow, &[Int(flow.id), Text("FAILED"), Text(&why)])
                        .await?;
                    if let Some(task) = &definition.on_exhausted {
                        let mut summary = Mapping::new();
                        summary.insert("id".into(), flow.id.into());
                        summary.insert("name".into(), flow.name.clone().into());
                        summary.insert("state".into(), "FAILED".into());
                        summary.insert("attempt".into(), flow.attempt.into());
                        summary.insert("step".into(), steps[step].name.clone().into());
                        summary.insert("request".into(), at.id.into());
                        summary.insert("result_text".into(), why.into());
                        let mut options = parse_store(flow.store.as_deref());
                        options.insert("flow".into(), Value::Mapping(summary));
                        let key = format!("flow:{}:exhausted", flow.id);
                        self.insert_follow_up(
                            tx,
                            || format!("flow {}'s on_exhausted alert {task}", flow.id),
                            &f.insert_alert,
                            &[
                                Text(task),
                                Text(&yaml_text(&options)),
                                OptInt(Some(at.id)),
                                Int(flow.id),
                                Text(&key),
                            ],
                        )
                        .await?;
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Sets `flow` to revert the nearest step at or below `from` that has a
    /// revert and creates its row; when none is left, the reverts are done:
    /// the flow starts again (`retry.times`) or ends REVERTED (CANCELLED
    /// after `flow cancel --revert`).
    async fn next_revert(
        &self,
        tx: &mut Tx,
        flow: &Flow,
        definition: &Definition,
        from: i64,
    ) -> Result<()> {
        let f = self.flow_sql();
        let steps = &definition.steps;
        let next = (0..=from.min(steps.len() as i64 - 1))
            .rev()
            .find(|&index| steps[index as usize].revert.is_some());
        if let Some(index) = next {
            let index = index as usize;
            tx.execute(
                &f.move_flow,
                &[
                    Int(flow.id),
                    Text("REVERTING"),
                    Int(flow.attempt),
                    Int(index as i64),
                    OptText(flow.store.as_deref()),
                    OptText(flow.result_text.as_deref()),
                ],
            )
            .await?;
            let task = steps[index].revert.clone().unwrap_or_default();
            return self
                .insert_step(tx, flow, definition, index, Action::Revert, &task)
                .await;
        }
        let why = flow.result_text.as_deref().unwrap_or("a step failed");
        if flow.cancel_requested {
            let text = format!("cancelled; reverted ({why})");
            tx.execute(&f.end_flow, &[Int(flow.id), Text("CANCELLED"), Text(&text)])
                .await?;
            return Ok(());
        }
        if flow.attempt <= i64::from(definition.retry.times) {
            // Start again from the first step, with the store it started with.
            let store = definition
                .initial_store(flow.options.as_deref())
                .unwrap_or_default();
            let text = format!("attempt {} reverted ({why}); running again", flow.attempt);
            tx.execute(
                &f.move_flow,
                &[
                    Int(flow.id),
                    Text("RUNNING"),
                    Int(flow.attempt + 1),
                    Int(0),
                    Text(&yaml_text(&store)),
                    Text(&text),
                ],
            )
            .await?;
            let again = Flow {
                attempt: flow.attempt + 1,
                store: Some(yaml_text(&store)),
                ..flow.clone()
            };
            return self
                .insert_step(tx, &again, definition, 0, Action::Execute, &steps[0].task)
                .await;
        }
        let text = format!("reverted: {why}");
        tx.execute(&f.end_flow, &[Int(flow.id), Text("REVERTED"), Text(&text)])
            .await?;
        Ok(())
    }

    /// Creates the row of a position, with the flow's store as its options.
    /// A row the database refuses for its data (a stored definition edited
    /// to a `try_limit` or task name its rules do not allow) ends the flow
    /// FAILED, saying why: inserted plainly, the refusal failed the whole
    /// transaction, the outcome that moved the flow on with it, and every
    /// outcome the recorder held behind it, at each retry for ever.
    async fn insert_step(
        &self,
        tx: &mut Tx,
        flow: &Flow,
        definition: &Definition,
        step: usize,
        action: Action,
        task: &str,
    ) -> Result<()> {
        let f = self.flow_sql();
        let key = flow::unique_key(flow.id, flow.attempt, step, action);
        let try_limit = definition.steps[step]
            .try_limit
            .unwrap_or(super::DEFAULT_TRY_LIMIT);
        self.count_statements(2);
        let made = tx
            .insert_follow_up(
                &f.insert_step,
                &[
                    Text(task),
                    OptText(flow.store.as_deref()),
                    Int(flow.id),
                    Int(step as i64),
                    Text(action.as_str()),
                    Text(&key),
                    Int(try_limit),
                ],
            )
            .await?;
        if let Err(refusal) = made {
            let why = format!(
                "the row of step {} ({}, {}) was refused by the database: {}",
                step + 1,
                definition.steps[step].name,
                action.as_str(),
                crate::escape::error_line(&refusal.into())
            );
            tracing::error!(flow = flow.id, name = %flow.name, "flow {} ({}) FAILED: {why}", flow.id, flow.name);
            tx.execute(&f.end_flow, &[Int(flow.id), Text("FAILED"), Text(&why)])
                .await?;
        }
        Ok(())
    }

    /// Takes flows that no daemon has taken yet (state NULL: inserted by
    /// plain SQL or `flow post`): snapshots the definition from `flows`,
    /// fills the store, creates the first step's row. A flow whose options
    /// do not fit ends FAILED saying why. A flow whose name is not in
    /// `flows` is left to the daemons that know it for [`UNKNOWN_FLOW_WAIT`]
    /// from when this daemon first saw it (in a rolling deploy the daemons
    /// not yet upgraded failed the new flows they came upon first, for
    /// all), then ends FAILED saying so. Returns how many flows it took or
    /// failed.
    pub(crate) async fn take_flows(&self, flows: &BTreeMap<String, Definition>) -> Result<usize> {
        let f = self.flow_sql();
        let names = serde_json::to_string(&flows.keys().collect::<Vec<_>>())?;
        self.count_statements(2);
        let (mut candidates, unknown): (Vec<i64>, Vec<(i64, String)>) = on_pool!(self, pool => {
            let known = query(f.untaken.as_str())
                .bind(names.as_str())
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| row.int(0))
                .collect::<sqlx::Result<_>>()?;
            let unknown = query(f.untaken_unknown.as_str())
                .bind(names.as_str())
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| Ok((row.int(0)?, row.text(1)?)))
                .collect::<sqlx::Result<_>>()?;
            (known, unknown)
        });
        let wait =
            crate::test_hooks::shortened(UNKNOWN_FLOW_WAIT, "TASKRUNNER_TEST_UNKNOWN_FLOW_WAIT_MS");
        let due = {
            let mut seen = self
                .unknown_flows
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            seen.retain(|id, _| unknown.iter().any(|(other, _)| other == id));
            let mut due = Vec::new();
            for (id, name) in &unknown {
                let since = *seen.entry(*id).or_insert_with(|| {
                    tracing::warn!(
                        flow = id,
                        "flow {id} ({name}) is unknown to this daemon: left to a daemon that knows it (a rolling deploy?), and failed if none has taken it in {}",
                        crate::units::format_duration(wait)
                    );
                    std::time::Instant::now()
                });
                if since.elapsed() >= wait {
                    due.push(*id);
                }
            }
            due
        };
        candidates.extend(&due);
        for flow_id in &candidates {
            let mut tx = Tx::begin(self).await?;
            self.count_statements(5);
            if !self.lock_flow(&mut tx, *flow_id).await? {
                continue;
            }
            let Some(flow) = self.flow_in(&mut tx, *flow_id).await? else {
                continue;
            };
            if flow.state.is_some() {
                continue;
            }
            let Some(definition) = flows.get(&flow.name) else {
                if !due.contains(flow_id) {
                    // Renamed since it was read: left for now.
                    continue;
                }
                let known: Vec<&str> = flows.keys().map(String::as_str).collect();
                let why = format!(
                    "unknown flow `{}` (known: {}); no daemon that knows it took it within {}",
                    flow.name,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    },
                    crate::units::format_duration(wait)
                );
                tracing::error!(flow = flow.id, "flow {} FAILED: {why}", flow.id);
                tx.execute(&f.end_flow, &[Int(flow.id), Text("FAILED"), Text(&why)])
                    .await?;
                tx.commit().await?;
                continue;
            };
            // Options over the store's bound are not parsed (an
            // application's 200 MiB took gigabytes, on the daemon's thread).
            let options = flow.options.as_deref();
            let store = match options.and_then(|text| self.store_over_its_bound(text)) {
                Some(over) => Err(format!("its options are {over}")),
                None => definition
                    .initial_store(options)
                    .map(|store| yaml_text(&store))
                    .and_then(|store| match self.store_over_its_bound(&store) {
                        Some(over) => Err(format!("its options make its store {over}")),
                        None => Ok(store),
                    }),
            };
            let store = match store {
                Ok(store) => store,
                Err(why) => {
                    tracing::error!(flow = flow.id, name = %flow.name, "flow {} ({}) FAILED: {why}", flow.id, flow.name);
                    tx.execute(&f.end_flow, &[Int(flow.id), Text("FAILED"), Text(&why)])
                        .await?;
                    tx.commit().await?;
                    continue;
                }
            };
            let snapshot = serde_yaml::to_string(definition).unwrap_or_default();
            tx.execute(&f.take_flow, &[Int(flow.id), Text(&store), Text(&snapshot)])
                .await?;
            self.advance_flow(&mut tx, flow.id).await?;
            tx.commit().await?;
            tracing::info!(flow = flow.id, name = %flow.name, "flow {} ({}) started", flow.id, flow.name);
        }
        Ok(candidates.len())
    }

    /// The flow ids a statement without parameters selects.
    async fn flow_ids(&self, statement: &'static str) -> Result<Vec<i64>> {
        self.count_statements(1);
        Ok(on_pool!(self, pool => {
            query(statement)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| row.int(0))
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// The repair pass for flows: advances active flows that have no open
    /// row (their current row was ended, retried or deleted by plain SQL,
    /// outside [`Store::finalize`]). Returns how many it looked at.
    pub(crate) async fn repair_flows(&self) -> Result<usize> {
        let candidates = self.flow_ids(&self.flow_sql().stuck).await?;
        for flow_id in &candidates {
            let mut tx = Tx::begin(self).await?;
            self.count_statements(6);
            if self.lock_flow(&mut tx, *flow_id).await? {
                self.advance_flow(&mut tx, *flow_id).await?;
            }
            tx.commit().await?;
        }
        Ok(candidates.len())
    }

    /// Inserts a flow (`flow post`, the SDK) and returns its id; a daemon takes it.
    pub(crate) async fn post_flow(&self, name: &str, options: Option<&str>) -> Result<i64> {
        let sql = self.flow_sql().insert_flow.as_str();
        Ok(on_pool!(self, pool => {
            super::rows::inserted_id(&query(sql).bind(name).bind(options).fetch_all(pool).await?)?
        }, mysql pool => {
            // No RETURNING there: the id of the insert.
            super::mysql::query(sql)
                .bind(name)
                .bind(options)
                .execute(pool)
                .await?
                .last_insert_id() as i64
        }))
    }

    /// One flow, as stored.
    pub async fn flow(&self, flow_id: i64) -> Result<Option<Flow>> {
        let f = self.flow_sql();
        Ok(on_pool!(self, pool => {
            let rows = query(f.flow_row.as_str()).bind(flow_id).fetch_all(pool).await?;
            match rows.first() {
                Some(row) => Some(flow_from_row(row)?),
                None => None,
            }
        }))
    }

    /// The newest flows (older than the flow `before`, for paging).
    pub(crate) async fn list_flows(&self, before: Option<i64>, limit: i64) -> Result<Vec<Flow>> {
        let f = self.flow_sql();
        Ok(on_pool!(self, pool => {
            query(f.list_flows.as_str())
                .bind(limit)
                .bind(before)
                .fetch_all(pool)
                .await?
                .iter()
                .map(flow_from_row)
                .collect::<sqlx::Result<_>>()?
        }))
    }

    /// The board of one flow: the flow, its state and attempt, and each
    /// step with its execute and revert rows of the current attempt (state,
    /// host, tries) and what it provided. `None`: no such flow. The one
    /// source of `flow show` and the web page's flow board.
    pub async fn flow_board(&self, flow_id: i64) -> Result<Option<FlowBoard>> {
        let f = self.flow_sql();
        let Some(flow) = self.flow(flow_id).await? else {
            return Ok(None);
        };
        // (step, action, row) of every row of the flow, oldest first.
        let rows: Vec<(i64, Option<String>, StepRow)> = on_pool!(self, pool => {
            query(f.step_rows.as_str())
                .bind(flow_id)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| {
                    let key = row.opt_text(3)?;
                    Ok((
                        row.int(1)?,
                        row.opt_text(2)?,
                        StepRow {
                            id: row.int(0)?,
                            attempt: key.as_deref().and_then(flow::attempt_of_key),
                            result: row.opt_text(4)?,
                            host: row.opt_text(5)?,
                            tries: row.int(6)?,
                            try_limit: row.int(7)?,
                            exhausted: row.int(8)? != 0,
                        },
                    ))
                })
                .collect::<sqlx::Result<_>>()?
        });
        let definition: Option<Definition> = flow
            .definition
            .as_deref()
            .and_then(|text| serde_yaml::from_str(text).ok());
        let store = parse_store(flow.store.as_deref());
        let mut board = FlowBoard {
            retry_times: definition.as_ref().map_or(0, |d| d.retry.times),
            flow: flow.clone(),
            steps: Vec::new(),
        };
        let Some(definition) = definition else {
            return Ok(Some(board));
        };
        for (index, step) in definition.steps.iter().enumerate() {
            let of_step = |action: &str| {
                rows.iter()
                    .filter(|(s, a, row)| {
                        *s == index as i64
                            && a.as_deref() == Some(action)
                            && row.attempt == Some(flow.attempt)
                    })
                    .map(|(.., row)| row.clone())
                    .next_back()
            };
            let current = flow.is_active() && flow.current_step == Some(index as i64);
            board.steps.push(StepBoard {
                index,
                name: step.name.clone(),
                task: step.task.clone(),
                revert_task: step.revert.clone(),
                provides: step.provides.clone(),
                provided: step
                    .provides
                    .as_ref()
                    .and_then(|key| store.get(key.as_str()))
                    .map(flow::short_yaml),
                execute: of_step("execute"),
                revert: of_step("revert"),
                executes_all_attempts: rows
                    .iter()
                    .filter(|(s, a, _)| *s == index as i64 && a.as_deref() == Some("execute"))
                    .count() as i64,
                current,
            });
        }
        Ok(Some(board))
    }

    /// Cancels a flow. Without `revert`: it ends CANCELLED at once, its
    /// unstarted row is cancelled and a running one is asked to stop (its
    /// end advances nothing). With `revert`: its current execute is
    /// cancelled the same way, and once it has ended the flow reverts its
    /// steps (that one's first) and ends CANCELLED, never starting again.
    pub(crate) async fn cancel_flow(&self, flow_id: i64, revert: bool) -> Result<FlowChange> {
        let f = self.flow_sql();
        let mut tx = Tx::begin(self).await?;
        if !self.lock_flow(&mut tx, flow_id).await? {
            return Ok(FlowChange::NotFound);
        }
        let Some(flow) = self.flow_in(&mut tx, flow_id).await? else {
            return Ok(FlowChange::NotFound);
        };
        if let Some("FINISHED" | "REVERTED" | "FAILED" | "CANCELLED") = flow.state.as_deref() {
            return Ok(FlowChange::AlreadyFinal(flow.state.unwrap_or_default()));
        }
        let reverting = flow.state.as_deref() == Some("REVERTING");
        if !revert || flow.state.is_none() {
            tx.execute(
                &f.end_flow,
                &[Int(flow_id), Text("CANCELLED"), Text("cancelled by a user")],
            )
            .await?;
            tx.execute(&f.cancel_requested, &[Int(flow_id)]).await?;
            tx.execute(
                &f.cancel_unstarted,
                &[Int(flow_id), Text("cancelled with its flow")],
            )
            .await?;
            tx.execute(&f.cancel_running, &[Int(flow_id)]).await?;
        } else {
            tx.execute(&f.cancel_requested, &[Int(flow_id)]).await?;
            if !reverting {
                // Only the current execute: a revert already running goes on.
                tx.execute(
                    &f.cancel_unstarted,
                    &[Int(flow_id), Text("cancelled with its flow (reverting)")],
                )
                .await?;
                tx.execute(&f.cancel_running, &[Int(flow_id)]).await?;
            }
            self.advance_flow(&mut tx, flow_id).await?;
        }
        let state = self
            .flow_in(&mut tx, flow_id)
            .await?
            .and_then(|f| f.state)
            .unwrap_or_default();
        tx.commit().await?;
        Ok(FlowChange::Done(state))
    }
}

fn at_position(row: &AnyRow) -> sqlx::Result<AtPosition> {
    Ok(AtPosition {
        id: row.int(0)?,
        result: row.opt_text(1)?,
        result_text: row.opt_text(2)?,
        open: row.int(3)? != 0,
        started: row.int(4)? != 0,
    })
}

/// `flow`, reverting for `why`.
fn reverting(flow: &Flow, why: String) -> Flow {
    Flow {
        state: Some("REVERTING".into()),
        result_text: Some(why),
        ..flow.clone()
    }
}

fn first_line(text: Option<&str>) -> String {
    let line = text.unwrap_or("").lines().next().unwrap_or("");
    if line.chars().count() > 200 {
        format!("{}…", line.chars().take(199).collect::<String>())
    } else {
        line.to_string()
    }
}
