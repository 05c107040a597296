//! What `taskrunner-cli` prints: `list`'s table, `show`'s fields,
//! `status`, `tasks`; the columns the batch and flow tables share. Pure:
//! values in, text out.

use anyhow::{bail, Result};

use crate::config::Config;
use crate::request::Request;
use crate::task_types::Registry;

/// `list`'s table: aligned columns, one line per request.
pub(super) fn render_table(rows: &[Request]) -> String {
    let header = [
        "ID", "TASK", "STATE", "TRIES", "PID", "HOST", "CREATED", "SUMMARY",
    ];
    let mut lines: Vec<[String; 8]> = vec![header.map(String::from)];
    for row in rows {
        // When a delayed row (or a failed one waiting for its retry) is due.
        let due = row
            .delay_until
            .as_deref()
            .map(|t| format!("due {}", t.chars().take(19).collect::<String>()));
        let never_runs = row.never_runs();
        let state = match row.result.as_deref() {
            _ if never_runs.is_some() => format!(
                "{} (never runs)",
                row.result.as_deref().unwrap_or("pending")
            ),
            Some(result) => {
                let exhausted = matches!(result, "FAILED" | "CRASHED" | "TIMEOUT")
                    && row.tries >= row.try_limit;
                let retrying = matches!(result, "FAILED" | "CRASHED" | "TIMEOUT" | "INTERRUPTED")
                    && !exhausted;
                match &due {
                    _ if exhausted => format!("{result} (exhausted)"),
                    Some(due) if retrying => format!("{result} (retry {due})"),
                    _ => result.to_string(),
                }
            }
            None if row.node.is_some() => format!(
                "pending (waits for node {})",
                row.node.as_deref().unwrap_or_default()
            ),
            None => match &due {
                Some(due) => format!("pending ({due})"),
                None => "pending".to_string(),
            },
        };
        let summary = row
            .progress
            .as_deref()
            .filter(|_| row.result.as_deref() == Some("RUNNING"))
            .map(|p| format!("progress: {p}"))
            .or_else(|| row.result_text.as_deref().map(summary_of))
            .unwrap_or_default();
        // Where the row belongs: its batch or flow, or what created it (a callback).
        let link = match (row.batch_id, row.callback_of, row.callback_of_batch) {
            (Some(batch), _, _) => format!("[batch {batch}] "),
            (None, _, Some(batch)) => format!("[callback of batch {batch}] "),
            (None, Some(parent), None) => format!("[callback of {parent}] "),
            (None, None, None) => match (row.flow_id, row.flow_step) {
                (Some(flow), Some(step)) => format!(
                    "[flow {flow} step {}{}] ",
                    step.saturating_add(1),
                    if row.flow_action.as_deref() == Some("revert") {
                        " revert"
                    } else {
                        ""
                    }
                ),
                (Some(flow), None) => format!("[flow {flow}] "),
                _ => String::new(),
            },
        };
        // Why a row can never run is said whole.
        let summary = match &never_runs {
            Some(reason) => crate::escape::one_line(&format!("{link}never runs: {reason}")),
            None => truncate(&crate::escape::one_line(&format!("{link}{summary}")), 60),
        };
        lines.push([
            row.id.to_string(),
            truncate(&crate::escape::one_line(&row.task_class_name), 60),
            crate::escape::one_line(&state),
            format!("{}/{}", row.tries, row.try_limit),
            row.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            crate::escape::one_line(row.host.as_deref().unwrap_or("-")),
            row.created_at
                .as_deref()
                .map(|t| t.chars().take(19).collect())
                .unwrap_or_default(),
            summary,
        ]);
    }
    let mut out = render_columns(&lines);
    if rows.is_empty() {
        out += "(no requests)\n";
    }
    out
}

/// `taskrunner-cli schedules`: one line a schedule.
pub(super) fn render_schedules(lines: &[crate::web::ScheduleLine]) -> String {
    if lines.is_empty() {
        return "(no schedules in the config, none recorded)\n".into();
    }
    let header = [
        "SCHEDULE",
        "WHEN",
        "TASK",
        "LATEST SLOT",
        "REQUEST",
        "NEXT SLOT",
    ];
    let mut table = vec![header.map(String::from).to_vec()];
    for line in lines {
        table.push(vec![
            line.name.clone(),
            line.spec
                .clone()
                .unwrap_or_else(|| "(not in this config)".into()),
            line.task.clone().unwrap_or_default(),
            line.latest.clone().unwrap_or_else(|| "-".into()),
            line.request.map_or_else(|| "-".into(), |id| id.to_string()),
            line.next.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    render_columns(&table)
}

/// Lines of cells as text columns, two spaces apart: each column as wide as
/// its widest cell, the last one unpadded, trailing blanks trimmed.
pub(super) fn render_columns<Row: AsRef<[String]>>(lines: &[Row]) -> String {
    let columns = lines.iter().map(|l| l.as_ref().len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            lines
                .iter()
                .filter_map(|l| l.as_ref().get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in lines {
        let line = line.as_ref();
        let cells: Vec<String> = line
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c + 1 == line.len() {
                    cell.clone()
                } else {
                    format!("{cell:<width$}", width = widths[c])
                }
            })
            .collect();
        out += cells.join("  ").trim_end();
        out += "\n";
    }
    out
}

/// The first line of a result_text; for a failed try ("exit status 1"
/// followed by the task's standard error), with the first line the task
/// itself wrote, which usually says what went wrong.
fn summary_of(result_text: &str) -> String {
    let mut lines = result_text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    match lines.next() {
        Some(own)
            if first.starts_with("exit status ") || first.starts_with("killed by signal ") =>
        {
            format!("{first}: {own}")
        }
        _ => first.to_string(),
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(max - 1).collect::<String>())
    }
}

/// `show`: every column, then the full result_text.
pub(super) fn render_show(r: &Request) -> String {
    let none = || "NULL".to_string();
    let text = |v: &Option<String>| v.clone().unwrap_or_else(none);
    let fields: Vec<(&str, String)> = vec![
        ("id", r.id.to_string()),
        ("task_class_name", r.task_class_name.clone()),
        ("result", text(&r.result)),
        ("tries", format!("{} of {}", r.tries, r.try_limit)),
        ("priority", r.priority.to_string()),
        ("created_at", text(&r.created_at)),
        ("delay_until", text(&r.delay_until)),
        ("started_at", text(&r.started_at)),
        ("heartbeat_at", text(&r.heartbeat_at)),
        ("completed_at", text(&r.completed_at)),
        ("host", text(&r.host)),
        ("pid", r.pid.map_or_else(none, |p| p.to_string())),
        ("claimed_by", text(&r.claimed_by)),
        ("cancel_requested_at", text(&r.cancel_requested_at)),
        ("progress", text(&r.progress)),
        ("queue", r.queue.clone()),
        ("node", text(&r.node)),
        ("not_node", text(&r.not_node)),
        ("period", r.period.map_or_else(none, |p| format!("{p}s"))),
        ("planned_at", text(&r.planned_at)),
        ("unique_key", text(&r.unique_key)),
        ("schedule", text(&r.schedule)),
        ("batch_id", r.batch_id.map_or_else(none, |b| b.to_string())),
        ("on_success", text(&r.on_success)),
        ("on_failure", text(&r.on_failure)),
        (
            "callback_of",
            r.callback_of.map_or_else(none, |p| p.to_string()),
        ),
        (
            "callback_of_batch",
            r.callback_of_batch.map_or_else(none, |b| b.to_string()),
        ),
        ("flow_id", r.flow_id.map_or_else(none, |f| f.to_string())),
        (
            "flow_step",
            match (r.flow_step, r.flow_action.as_deref()) {
                (Some(step), Some(action)) => format!("{step} ({action})"),
                (Some(step), None) => step.to_string(),
                _ => none(),
            },
        ),
        (
            "options",
            r.options
                .clone()
                .map_or_else(none, |o| o.trim_end().replace('\n', "\n    ")),
        ),
    ];
    let mut out = String::new();
    for (name, value) in fields {
        out += &format!("{name:<20} {}\n", crate::escape::lines(&value));
    }
    if let Some(reason) = r.never_runs() {
        out += &format!(
            "{:<20} {}\n",
            "never runs",
            crate::escape::one_line(&reason)
        );
    }
    out += "result_text:\n";
    if let Some(result_text) = &r.result_text {
        out += &crate::escape::lines(result_text);
        out += "\n";
    }
    out
}

pub(super) fn render_status(s: &crate::control::Status) -> String {
    let mut out = format!(
        "taskrunnerd {} (pid {}) on {}, up {:.0}s{}\ndatabase: {}{}\n{}running {} of {}:\n",
        s.version,
        s.pid,
        s.host,
        s.uptime_seconds,
        if s.stopping { ", stopping" } else { "" },
        s.database,
        s.outage
            .as_deref()
            .map(|outage| format!(", {}", crate::escape::one_line(outage)))
            .unwrap_or_default(),
        if s.limits.is_empty() {
            String::new()
        } else {
            format!("limits: {}\n", crate::escape::one_line(&s.limits))
        },
        s.running.len(),
        s.max_concurrent
    );
    for task in &s.running {
        out += &format!(
            "  {:>8}  {:<20} pid {:<8} try {}  {:.1}s{}\n",
            task.id,
            crate::escape::one_line(&task.task),
            task.pid.map_or("-".to_string(), |p| p.to_string()),
            task.r#try,
            task.seconds,
            task.progress
                .as_deref()
                .map(|p| format!("  progress: {}", crate::escape::one_line(p)))
                .unwrap_or_default()
        );
    }
    let counts: Vec<String> = s
        .counts
        .iter()
        .map(|(state, n)| format!("{} {n}", crate::escape::one_line(state)))
        .collect();
    out += &format!(
        "requests: {}\n",
        if let Some(why) = &s.counts_unread {
            format!("not read: {}", crate::escape::one_line(why))
        } else if counts.is_empty() {
            "none".into()
        } else {
            counts.join(", ")
        }
    );
    if !s.paused.is_empty() {
        out += &format!("paused (not claimed): {}\n", s.paused.join(", "));
    }
    if let Some(next) = s.next_poll_in_seconds {
        out += &format!("next poll in {next:.1}s\n");
    }
    out += &format!("database statements sent: {}\n", s.database_statements);
    if s.lock_retries > 0 {
        out += &format!(
            "lock retries: {} (transactions run again after a deadlock or lock-wait timeout)\n",
            s.lock_retries
        );
    }
    out
}

/// `tasks [NAME]`: every type with where it comes from and its settings,
/// or one type with its options.
pub(super) fn describe_tasks(
    config: &Config,
    registry: &Registry,
    name: Option<&str>,
) -> Result<String> {
    let settings_of = |name: &str| {
        let settings = config.settings_for(name);
        let mut parts = Vec::new();
        if let Some(timeout) = settings.timeout {
            parts.push(format!(
                "timeout {}",
                crate::units::format_duration(timeout)
            ));
        }
        if let Some(limit) = config.tasks.get(name).and_then(|t| t.concurrency) {
            parts.push(format!("concurrency {limit}"));
        }
        parts.push(format!("workdir {}", settings.workdir.display()));
        parts.join(", ")
    };
    let mut out = String::new();
    match name {
        None => {
            for name in registry.names(config) {
                out += &format!(
                    "{name}  ({}; {})\n",
                    registry.source(config, &name).unwrap_or_default(),
                    settings_of(&name)
                );
            }
            out += "(`taskrunner-cli tasks NAME` shows a type's options)\n";
        }
        Some(name) => {
            let Some(source) = registry.source(config, name) else {
                bail!(
                    "unknown task type `{name}`; known types: {}",
                    registry.names(config).join(", ")
                );
            };
            out += &format!("{name}  ({source}; {})\n", settings_of(name));
            out += &registry.describe_options(config, name)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_aligned() {
        let rows = vec![
            Request {
                id: 1,
                task_class_name: "NoOp".into(),
                result: Some("FINISHED".into()),
                tries: 1,
                try_limit: 5,
                result_text: Some("NOOP 1: OK!".into()),
                ..Default::default()
            },
            Request {
                id: 100,
                task_class_name: "Thumbnail".into(),
                tries: 0,
                try_limit: 5,
                ..Default::default()
            },
        ];
        let table = render_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        let column = |line: &str| {
            line.find("TASK")
                .or_else(|| line.find("NoOp"))
                .or_else(|| line.find("Thumbnail"))
        };
        assert_eq!(column(lines[0]), column(lines[1]));
        assert_eq!(column(lines[1]), column(lines[2]));
    }
}
