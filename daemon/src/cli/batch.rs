//! `taskrunner-cli batch …`: create, seal, list, show and cancel batches.

use anyhow::{bail, Result};
use clap::Subcommand;

use crate::store::{Batch, BatchChange, NewBatch, Store};

#[derive(Debug, Subcommand)]
pub(crate) enum BatchCommand {
    /// Insert a batch and print its id (sealed unless --open)
    Create {
        /// A name for people
        #[arg(long, value_name = "N")]
        name: Option<String>,
        /// The batch's arguments as YAML, handed to its callbacks
        #[arg(long, value_name = "YAML")]
        options: Option<String>,
        /// Task type run once when every member FINISHED
        #[arg(long, value_name = "TYPE")]
        on_complete: Option<String>,
        /// Task type run once when the batch failed
        #[arg(long, value_name = "TYPE")]
        on_failure: Option<String>,
        /// Let every member end before judging the batch (default: at the
        /// first member that ends without FINISHED, cancel the unstarted
        /// ones and run --on-failure)
        #[arg(long)]
        no_fail_fast: bool,
        /// Leave the batch open for members (`batch seal ID` when all are in)
        #[arg(long)]
        open: bool,
        /// The batch whose callback creates this one (chains; a callback
        /// finds its batch in TASKRUNNER_BATCH_ID)
        #[arg(long, value_name = "ID")]
        parent: Option<i64>,
    },
    /// Seal an open batch: no callback before it is sealed
    Seal {
        #[arg(value_name = "ID")]
        id: i64,
    },
    /// Batches with their progress, newest first
    List {
        /// At most this many batches
        #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
    /// One batch: its progress, its members by state, its callbacks
    Show {
        #[arg(value_name = "ID")]
        id: i64,
    },
    /// Cancel a batch's unstarted members (running ones finish); no callback
    Cancel {
        #[arg(value_name = "ID")]
        id: i64,
    },
}

/// Runs one `batch` command.
pub(crate) async fn run(store: &Store, command: BatchCommand) -> Result<()> {
    match command {
        BatchCommand::Create {
            name,
            options,
            on_complete,
            on_failure,
            no_fail_fast,
            open,
            parent,
        } => {
            if let Some(options) = &options {
                crate::request::check_options(options.as_bytes()).map_err(|e| {
                    crate::usage::UsageError(format!("--options: not valid YAML: {e}"))
                })?;
            }
            // As `enqueue` checks its callbacks' names (before, "" was
            // stored, and at the batch's end its callback failed as an
            // unknown type).
            crate::request::check_names(&[
                ("--on-complete", on_complete.as_ref()),
                ("--on-failure", on_failure.as_ref()),
            ])
            .map_err(crate::usage::UsageError)?;
            let id = store
                .create_batch(&NewBatch {
                    name,
                    options,
                    on_complete,
                    on_failure,
                    fail_fast: !no_fail_fast,
                    sealed: !open,
                    parent_batch_id: parent,
                })
                .await?;
            outln!("{id}");
        }
        BatchCommand::Seal { id } => match store.seal_batch(id).await? {
            Some(batch) => outln!("batch {id} sealed{}", ended(&batch)),
            None => bail!("no batch {id}"),
        },
        BatchCommand::List { limit } => {
            out!("{}", render_list(&store.list_batches(limit).await?));
        }
        BatchCommand::Show { id } => {
            let Some(batch) = store.batch(id).await? else {
                bail!("no batch {id}")
            };
            let members = store.batch_members_by_state(id).await?;
            let callbacks = store.batch_callbacks(id).await?;
            out!("{}", render_show(&batch, &members, &callbacks));
        }
        BatchCommand::Cancel { id } => match store.cancel_batch(id).await? {
            BatchChange::Done(cancelled) => {
                outln!("batch {id} cancelled: {cancelled} unstarted members cancelled, running ones finish")
            }
            BatchChange::NotFound => bail!("no batch {id}"),
            BatchChange::AlreadyFinal(state) => bail!("batch {id} is already {state}"),
        },
    }
    Ok(())
}

fn ended(batch: &Batch) -> String {
    match &batch.state {
        Some(state) => format!(": it ended {state} (its members had all ended)"),
        None => String::new(),
    }
}

/// The state for people: `open`, `running`, or the final state.
fn state_of(batch: &Batch) -> String {
    match (&batch.state, &batch.sealed_at) {
        (Some(state), _) => state.clone(),
        (None, None) => "open".to_string(),
        (None, Some(_)) => "running".to_string(),
    }
}

/// A progress bar of `width` characters: `#` finished, `x` failed,
/// `-` cancelled, `.` not final yet.
pub(crate) fn progress_bar(counts: &crate::store::Counts, width: usize) -> String {
    let total = counts.total.max(1) as f64;
    // At most the width: counters an application wrote by hand may say
    // anything (a count of 2^40 filled the memory with marks).
    let cells = |n: i64| (((n.max(0) as f64 / total) * width as f64).round() as usize).min(width);
    let mut bar = String::new();
    for (n, mark) in [
        (counts.finished, '#'),
        (counts.failed, 'x'),
        (counts.cancelled, '-'),
    ] {
        bar.extend(std::iter::repeat_n(mark, cells(n)));
    }
    let filled = bar.chars().count().min(width);
    let mut bar: String = bar.chars().take(width).collect();
    bar.extend(std::iter::repeat_n('.', width - filled));
    let done = counts.total.saturating_sub(counts.pending);
    format!("[{bar}] {done}/{} ended", counts.total)
}

fn render_list(batches: &[Batch]) -> String {
    let mut lines = vec![[
        "ID".to_string(),
        "NAME".into(),
        "STATE".into(),
        "PROGRESS".into(),
        "FINISHED".into(),
        "FAILED".into(),
        "CANCELLED".into(),
        "CREATED".into(),
    ]];
    for batch in batches {
        let c = &batch.counts;
        lines.push([
            batch.id.to_string(),
            batch.name.clone().unwrap_or_else(|| "-".into()),
            state_of(batch),
            progress_bar(c, 20),
            c.finished.to_string(),
            c.failed.to_string(),
            c.cancelled.to_string(),
            batch
                .created_at
                .as_deref()
                .map(|t| t.chars().take(19).collect())
                .unwrap_or_default(),
        ]);
    }
    let mut out = super::render::render_columns(&lines);
    if batches.is_empty() {
        out += "(no batches)\n";
    }
    out
}

fn render_show(
    batch: &Batch,
    members: &[(String, bool, i64)],
    callbacks: &[(i64, String, Option<String>, Option<String>)],
) -> String {
    let none = || "NULL".to_string();
    let c = &batch.counts;
    let mut out = format!(
        "batch {}{}: {}\n{}\n  {} finished, {} failed, {} cancelled, {} not ended, {} in all\n",
        batch.id,
        batch
            .name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default(),
        state_of(batch),
        progress_bar(c, 40),
        c.finished,
        c.failed,
        c.cancelled,
        c.pending,
        c.total
    );
    for (name, value) in [
        (
            "on_complete",
            batch.on_complete.clone().unwrap_or_else(none),
        ),
        ("on_failure", batch.on_failure.clone().unwrap_or_else(none)),
        ("fail_fast", batch.fail_fast.to_string()),
        ("created_at", batch.created_at.clone().unwrap_or_else(none)),
        ("sealed_at", batch.sealed_at.clone().unwrap_or_else(none)),
        (
            "finished_at",
            batch.finished_at.clone().unwrap_or_else(none),
        ),
        (
            "parent_batch_id",
            batch.parent_batch_id.map_or_else(none, |p| p.to_string()),
        ),
        (
            "options",
            batch
                .options
                .clone()
                .map_or_else(none, |o| o.trim_end().replace('\n', "\n    ")),
        ),
    ] {
        out += &format!("{name:<16} {value}\n");
    }
    out += "members by state:\n";
    if members.is_empty() {
        out += "  (none)\n";
    }
    for (state, exhausted, count) in members {
        let state = if *exhausted {
            format!("{state} (exhausted)")
        } else {
            state.clone()
        };
        out += &format!("  {state:<22} {count}\n");
    }
    out += "callbacks:\n";
    if callbacks.is_empty() {
        out += "  (none)\n";
    }
    for (id, task, result, key) in callbacks {
        out += &format!(
            "  {id}  {task}  {}  {}\n",
            result.as_deref().unwrap_or("pending"),
            key.as_deref().unwrap_or("")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Counts;

    #[test]
    fn the_progress_bar_shows_each_state_in_proportion() {
        let counts = Counts {
            total: 10,
            pending: 4,
            finished: 5,
            failed: 1,
            cancelled: 0,
        };
        assert_eq!(progress_bar(&counts, 10), "[#####x....] 6/10 ended");
        let empty = Counts::default();
        assert_eq!(progress_bar(&empty, 4), "[....] 0/0 ended");
    }

    /// Counters written by hand (plain SQL on `task_runner_batches`) draw a
    /// bar of the width asked, whatever they say (a count of 2^40 ran the
    /// CLI out of memory; a pending count of -2^63 overflowed).
    #[test]
    fn the_progress_bar_of_absurd_counters_keeps_its_width() {
        let counts = Counts {
            total: 1,
            pending: i64::MIN,
            finished: 1 << 40,
            failed: i64::MAX,
            cancelled: -5,
        };
        let bar = progress_bar(&counts, 10);
        assert!(bar.starts_with("[##########] "), "{bar}");
    }
}
