//! The pages, as maud templates: every value from a row is escaped by maud;
//! nothing here writes raw HTML except the server's own SVG chart (built
//! from numbers). No script, no inline style (the CSP forbids both).

use maud::{html, Markup, DOCTYPE};

use super::{Chrome, FilterQuery};
use crate::request::{Request, State};
use crate::store::compose::CallbackRow;
use crate::store::flow::{Flow, FlowBoard, StepRow};
use crate::store::web::{
    BatchRow, DaemonRow, MinuteBucket, QueueStats, RequestFilter, RequestPage, BULK_LIMIT,
    SCAN_WINDOW,
};
use crate::store::{Pause, PauseKind};

/// Counts on the overview stop here per queue (shown as "N+").
pub(crate) const OVERVIEW_COUNT_CAP: i64 = 10_000;

fn layout(chrome: &Chrome, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · taskrunner" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                nav {
                    strong { "taskrunner" }
                    a href="/" { "Overview" }
                    a href="/requests" { "Requests" }
                    a href="/batches" { "Batches" }
                    a href="/flows" { "Flows" }
                    a href="/daemons" { "Daemons" }
                    a href="/schedules" { "Schedules" }
                    a href="/metrics" { "Metrics" }
                    @if chrome.read_only { span.badge { "read-only" } }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

pub(crate) fn error_page(message: &str) -> Markup {
    layout(
        &Chrome {
            csrf: "",
            read_only: true,
        },
        "Error",
        html! { p.error { (message) } p { a href="/" { "Back to the overview" } } },
    )
}

pub(crate) fn message(chrome: &Chrome, text: &str) -> Markup {
    layout(
        chrome,
        "Done",
        html! { p.message { (text) } p { a href="/requests" { "Requests" } } },
    )
}

fn count(n: i64, capped: bool) -> String {
    if capped && n > 0 {
        format!("{n}+")
    } else {
        n.to_string()
    }
}

fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

fn requests_link(state: &str, task: &str, queue: &str) -> String {
    let mut query = form_urlencoded_pairs(&[("state", state), ("task", task), ("queue", queue)]);
    if !query.is_empty() {
        query.insert(0, '?');
    }
    format!("/requests{query}")
}

fn form_urlencoded_pairs(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

pub(crate) fn overview(
    chrome: &Chrome,
    queues: &[QueueStats],
    pauses: &[Pause],
    daemons: &[DaemonRow],
    minutes: &[MinuteBucket],
) -> Markup {
    let paused = |kind: PauseKind, name: &str| {
        pauses
            .iter()
            .any(|pause| pause.kind == kind && pause.name == name)
    };
    // A paused queue or type shows a badge; one that is not, a button that
    // pauses it (none on a read-only page).
    let pause_or_badge = |kind: PauseKind, name: &str, label: &str| {
        html! {
            @if paused(kind, name) {
                " " span.badge { "paused" }
            } @else if !chrome.read_only {
                " " (pause_button(chrome, "pause", kind, name, label))
            }
        }
    };
    layout(
        chrome,
        "Overview",
        html! {
            @if !pauses.is_empty() {
                section.paused {
                    h2 { "Paused" }
                    p.note { "No daemon claims these rows until they are resumed (from a second on, on every daemon); tries running go on." }
                    table {
                        thead { tr { th { "kind" } th { "name" } th { "since (UTC)" } th { "reason" } @if !chrome.read_only { th {} } } }
                        tbody {
                            @for pause in pauses {
                                tr {
                                    td { (pause.kind.word()) }
                                    td { (pause.name) }
                                    td { (pause.paused_at.get(..19).unwrap_or(&pause.paused_at)) }
                                    td { (pause.reason.as_deref().unwrap_or("")) }
                                    @if !chrome.read_only {
                                        td { (pause_button(chrome, "resume", pause.kind, &pause.name, "Resume")) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Queues" }
                @if queues.is_empty() {
                    p { "Nothing waiting, running or failed." }
                } @else {
                    table {
                        thead { tr { th { "queue" } th { "type" } th.num { "waiting" } th.num { "running" } th.num { "failed" } th.num { "exhausted" } th.num { "lag" } } }
                        tbody {
                            @for queue in queues {
                                @let total = queue.total();
                                tr.queue {
                                    td {
                                        a href=(requests_link("", "", &queue.queue)) { (queue.queue) }
                                        (pause_or_badge(PauseKind::Queue, &queue.queue, "pause queue"))
                                    }
                                    td { "all types" }
                                    td.num { a href=(requests_link("WAITING", "", &queue.queue)) { (count(total.waiting, queue.capped.others)) } }
                                    td.num { a href=(requests_link("RUNNING", "", &queue.queue)) { (count(total.running, queue.capped.running)) } }
                                    td.num { a href=(requests_link("RETRYING", "", &queue.queue)) { (count(total.failed, queue.capped.others)) } }
                                    td.num { a href=(requests_link("EXHAUSTED", "", &queue.queue)) { (count(total.exhausted, queue.capped.exhausted)) } }
                                    td.num { (seconds(queue.lag_seconds)) }
                                }
                                @for by_type in &queue.by_type {
                                    tr {
                                        td {}
                                        td {
                                            a href=(requests_link("", &by_type.task, &queue.queue)) { (by_type.task) }
                                            (pause_or_badge(PauseKind::Task, &by_type.task, "pause type"))
                                        }
                                        td.num { a href=(requests_link("WAITING", &by_type.task, &queue.queue)) { (count(by_type.waiting, queue.capped.others)) } }
                                        td.num { a href=(requests_link("RUNNING", &by_type.task, &queue.queue)) { (count(by_type.running, queue.capped.running)) } }
                                        td.num { a href=(requests_link("RETRYING", &by_type.task, &queue.queue)) { (count(by_type.failed, queue.capped.others)) } }
                                        td.num { a href=(requests_link("EXHAUSTED", &by_type.task, &queue.queue)) { (count(by_type.exhausted, queue.capped.exhausted)) } }
                                        td {}
                                    }
                                }
                            }
                        }
                    }
                    p.note { "Counts stop at " (OVERVIEW_COUNT_CAP) " rows per queue (shown as N+). Finished, cancelled and rejected rows are not counted. A type paused is paused in every queue." }
                }
                @if !chrome.read_only {
                    form.pause method="post" action="/pause" {
                        input type="hidden" name="csrf" value=(chrome.csrf);
                        label { "Pause the "
                            select name="kind" {
                                option value="queue" { "queue" }
                                option value="task" { "task type" }
                            }
                        }
                        " " label { "named " input name="name" required maxlength="255" size="16"; }
                        " " label { "because " input name="reason" size="32" placeholder="(optional)"; }
                        " " button type="submit" { "Pause" }
                    }
                }
            }
            section {
                h2 { "The last hour" }
                (super::chart::tries_and_lag(minutes))
            }
            section {
                h2 { "Daemons" }
                (daemon_table(daemons))
            }
        },
    )
}

fn daemon_table(daemons: &[DaemonRow]) -> Markup {
    html! {
        @if daemons.is_empty() {
            p { "No daemon heard from in the last day." }
        } @else {
            table {
                thead { tr {
                    th { "host" } th { "node" } th { "state" } th.num { "running" } th.num { "slots" }
                    th { "latest heartbeat" } th.num { "age" } th { "started" } th.num { "pid" } th { "version" } th { "daemon instance" }
                } }
                tbody {
                    @for daemon in daemons {
                        tr {
                            td { a href=(format!("/requests?state=RUNNING&host={}", percent_encode(&daemon.host))) { (daemon.host) } }
                            td { (daemon.node_name.as_deref().unwrap_or("")) }
                            td { span class=(format!("daemon {}", daemon.state)) { (daemon.state) } }
                            td.num { (daemon.running) }
                            td.num { (daemon.max_concurrent.map(|n| n.to_string()).unwrap_or_default()) }
                            td { (daemon.last_heartbeat.as_deref().unwrap_or("-")) }
                            td.num { (daemon.heartbeat_age_seconds.map(seconds).unwrap_or_default()) }
                            td { (daemon.started_at.as_deref().unwrap_or("")) }
                            td.num { (daemon.pid.map(|p| p.to_string()).unwrap_or_default()) }
                            td { (daemon.version.as_deref().unwrap_or("")) }
                            td.mono { (daemon.instance) }
                        }
                    }
                }
            }
        }
        p.note { "A daemon is silent when its latest heartbeat is older than the lease timeout; stopped when it stopped cleanly." }
    }
}

pub(crate) fn daemons(chrome: &Chrome, daemons: &[DaemonRow]) -> Markup {
    layout(chrome, "Daemons", daemon_table(daemons))
}

pub(crate) fn schedules(chrome: &Chrome, lines: &[super::ScheduleLine]) -> Markup {
    layout(
        chrome,
        "Schedules",
        html! {
            table {
                thead { tr { th { "schedule" } th { "when" } th { "task" } th { "latest slot" } th { "its request" } th { "next slot" } } }
                tbody {
                    @for line in lines {
                        tr {
                            td { (line.name) }
                            td.mono { (line.spec.as_deref().unwrap_or("(not in this config)")) }
                            td { (line.task.as_deref().unwrap_or_default()) }
                            td { (line.latest.as_deref().unwrap_or("-")) }
                            td { @if let Some(id) = line.request { a href=(format!("/requests/{id}")) { (id) } } }
                            td { (line.next.as_deref().unwrap_or("-")) }
                        }
                    }
                }
            }
        },
    )
}

fn state_label(result: Option<&str>) -> &str {
    result.unwrap_or("PENDING")
}

/// The states the list filters by: a result, PENDING (never run), and the
/// overview's kinds of open rows, whose counts link to them (WAITING: never
/// run or given back; RETRYING: failed with tries left; EXHAUSTED: failed
/// with none left).
fn states() -> Vec<&'static str> {
    let mut all = vec!["PENDING", "WAITING", "RETRYING", "EXHAUSTED"];
    all.extend(State::ALL.iter().map(|s| s.as_str()));
    all
}

pub(crate) fn requests(chrome: &Chrome, query: &FilterQuery, page: &RequestPage) -> Markup {
    let filter_pairs = [
        ("state", query.state.as_str()),
        ("task", query.task.as_str()),
        ("queue", query.queue.as_str()),
        ("host", query.host.as_str()),
        ("text", query.text.as_str()),
        ("batch", query.batch.as_str()),
        ("flow", query.flow.as_str()),
    ];
    let filters = form_urlencoded_pairs(&filter_pairs);
    let next_link = page.next_before.map(|before| {
        let mut link = format!("/requests?before={before}");
        if !filters.is_empty() {
            link.push('&');
            link.push_str(&filters);
        }
        link
    });
    layout(
        chrome,
        "Requests",
        html! {
            form.filters method="get" action="/requests" {
                label { "state " select name="state" {
                    option value="" { "any" }
                    @for state in states() {
                        option value=(state) selected[query.state.eq_ignore_ascii_case(state)] { (state) }
                    }
                } }
                label { "type " input name="task" value=(query.task) size="12"; }
                label { "queue " input name="queue" value=(query.queue) size="10"; }
                label { "host " input name="host" value=(query.host) size="10"; }
                label { "text " input name="text" value=(query.text) size="14"; }
                label { "batch " input name="batch" value=(query.batch) size="6"; }
                label { "flow " input name="flow" value=(query.flow) size="6"; }
                button type="submit" { "Filter" }
                a href="/requests" { "clear" }
            }
            @if !chrome.read_only {
                p.bulk {
                    "For every request this filter shows: "
                    a href=(format!("/bulk?action=retry&{filters}")) { "retry…" }
                    " "
                    a href=(format!("/bulk?action=cancel&{filters}")) { "cancel…" }
                    " (the count is shown first)"
                }
            }
            table.requests {
                thead { tr { th.num { "id" } th { "type" } th { "queue" } th { "state" } th.num { "tries" } th { "host" } th { "created" } th { "result text" } } }
                tbody {
                    @for row in &page.rows {
                        tr {
                            td.num { a href=(format!("/requests/{}", row.id)) { (row.id) } }
                            td { (row.task_class_name) }
                            td { (row.queue) }
                            td { span class=(format!("state {}", state_label(row.result.as_deref()).to_lowercase())) { (state_label(row.result.as_deref())) } }
                            td.num { (row.tries) "/" (row.try_limit) }
                            td { (row.host.as_deref().unwrap_or("")) }
                            td.time { (row.created_at.as_deref().unwrap_or("")) }
                            td.text { (first_line(row.result_text.as_deref().unwrap_or(""), 100)) }
                        }
                    }
                }
            }
            @if page.rows.is_empty() { p { "No request matches." } }
            @if page.window_ended {
                p.note { "Looked at " (SCAN_WINDOW) " rows for this page; older ones are on the next." }
            }
            @if let Some(link) = next_link {
                p { a.next href=(link) { "Older →" } }
            }
        },
    )
}

fn first_line(text: &str, limit: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.chars().count() > limit {
        format!("{}…", line.chars().take(limit).collect::<String>())
    } else {
        line.to_string()
    }
}

/// `seen`: the row's state and tries as shown (`FAILED:1`), for a retry
/// that applies only while the row is still so.
fn action_button(
    chrome: &Chrome,
    id: i64,
    action: &str,
    label: &str,
    seen: Option<&str>,
) -> Markup {
    html! {
        form.inline method="post" action=(format!("/requests/{id}/{action}")) {
            input type="hidden" name="csrf" value=(chrome.csrf);
            @if let Some(seen) = seen {
                input type="hidden" name="seen" value=(seen);
            }
            button type="submit" name="do" value=(action) { (label) }
        }
    }
}

/// A one-button form that pauses or resumes (`action`) a queue or type.
fn pause_button(chrome: &Chrome, action: &str, kind: PauseKind, name: &str, label: &str) -> Markup {
    html! {
        form.inline method="post" action=(format!("/{action}")) {
            input type="hidden" name="csrf" value=(chrome.csrf);
            input type="hidden" name="kind" value=(kind.word());
            input type="hidden" name="name" value=(name);
            button type="submit" { (label) }
        }
    }
}

pub(crate) fn request(chrome: &Chrome, row: &Request, callbacks: &[CallbackRow]) -> Markup {
    let state = state_label(row.result.as_deref()).to_string();
    let fields: Vec<(&str, String)> = vec![
        ("id", row.id.to_string()),
        ("state", state.clone()),
        ("task_class_name", row.task_class_name.clone()),
        ("queue", row.queue.clone()),
        ("priority", row.priority.to_string()),
        ("tries", format!("{} of {}", row.tries, row.try_limit)),
        ("created_at", row.created_at.clone().unwrap_or_default()),
        ("delay_until", row.delay_until.clone().unwrap_or_default()),
        ("started_at", row.started_at.clone().unwrap_or_default()),
        ("completed_at", row.completed_at.clone().unwrap_or_default()),
        ("heartbeat_at", row.heartbeat_at.clone().unwrap_or_default()),
        ("host", row.host.clone().unwrap_or_default()),
        ("pid", row.pid.map(|p| p.to_string()).unwrap_or_default()),
        ("claimed_by", row.claimed_by.clone().unwrap_or_default()),
        (
            "cancel_requested_at",
            row.cancel_requested_at.clone().unwrap_or_default(),
        ),
        ("progress", row.progress.clone().unwrap_or_default()),
        ("node", row.node.clone().unwrap_or_default()),
        ("not_node", row.not_node.clone().unwrap_or_default()),
        (
            "period",
            row.period.map(|p| format!("{p} s")).unwrap_or_default(),
        ),
        ("planned_at", row.planned_at.clone().unwrap_or_default()),
        ("unique_key", row.unique_key.clone().unwrap_or_default()),
        ("schedule", row.schedule.clone().unwrap_or_default()),
        ("on_success", row.on_success.clone().unwrap_or_default()),
        ("on_failure", row.on_failure.clone().unwrap_or_default()),
    ];
    // Where the row belongs, as links: its batch, or what created it.
    let links: Vec<(&str, String, i64)> = [
        ("batch_id", "batches", row.batch_id),
        ("flow_id", "flows", row.flow_id),
        ("callback_of", "requests", row.callback_of),
        ("callback_of_batch", "batches", row.callback_of_batch),
    ]
    .into_iter()
    .filter_map(|(name, page, id)| id.map(|id| (name, format!("/{page}/{id}"), id)))
    .collect();
    layout(
        chrome,
        &format!("Request {}", row.id),
        html! {
            @if !chrome.read_only {
                div.actions {
                    @if state != "RUNNING" {
                        (action_button(chrome, row.id, "retry", "Retry", Some(&format!("{state}:{}", row.tries))))
                    }
                    // What `cancel` takes: not a row exhausted, which is final.
                    @if matches!(state.as_str(), "PENDING" | "RUNNING")
                        || (matches!(state.as_str(), "FAILED" | "CRASHED" | "TIMEOUT" | "INTERRUPTED") && row.tries < row.try_limit) {
                        (action_button(chrome, row.id, "cancel", "Cancel", None))
                    }
                }
            }
            table.fields {
                tbody {
                    @for (name, value) in &fields {
                        tr { th { (name) } td { (value) } }
                    }
                    @for (name, href, id) in &links {
                        tr { th { (name) } td { a href=(href) { (id) } } }
                    }
                }
            }
            (callback_table(callbacks))
            h2 { "options" }
            pre { (row.options.as_deref().unwrap_or("")) }
            h2 { "result_text" }
            pre { (row.result_text.as_deref().unwrap_or("")) }
        },
    )
}

/// A bulk action's preview: how many rows it changes and its filter; the
/// form confirms those rows (`ids`): the action changes no other.
pub(crate) fn bulk_preview(
    chrome: &Chrome,
    query: &FilterQuery,
    filter: &RequestFilter,
    ids: &[i64],
) -> Markup {
    let count = ids.len() as i64;
    let ids = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let batch = filter.batch.map(|id| id.to_string());
    let flow = filter.flow.map(|id| id.to_string());
    layout(
        chrome,
        &format!("Bulk {}", query.action),
        html! {
            p.count {
                @if count >= BULK_LIMIT {
                    "At least " (count) " requests match; this action changes the newest " (BULK_LIMIT) " of them (run it again for more)."
                } @else {
                    (count) " requests match."
                }
            }
            ul {
                @for (name, value) in [("batch", &batch), ("flow", &flow), ("state", &filter.state), ("type", &filter.task), ("queue", &filter.queue), ("host", &filter.host), ("text", &filter.text)] {
                    @if let Some(value) = value { li { (name) ": " code { (value) } } }
                }
            }
            @if count > 0 && !chrome.read_only {
                form method="post" action="/bulk" {
                    input type="hidden" name="ids" value=(ids);
                    input type="hidden" name="csrf" value=(chrome.csrf);
                    input type="hidden" name="action" value=(query.action);
                    input type="hidden" name="state" value=(query.state);
                    input type="hidden" name="task" value=(query.task);
                    input type="hidden" name="queue" value=(query.queue);
                    input type="hidden" name="host" value=(query.host);
                    input type="hidden" name="text" value=(query.text);
                    input type="hidden" name="batch" value=(query.batch);
                    input type="hidden" name="flow" value=(query.flow);
                    button type="submit" { (query.action) " " (count) " requests" }
                }
            }
            @if !chrome.read_only {
                h2 { "Purge" }
                form method="post" action="/purge" {
                    input type="hidden" name="csrf" value=(chrome.csrf);
                    label { "Delete final requests completed more than " input name="older_than" value="30d" size="6"; " ago " }
                    button type="submit" { "Purge" }
                }
            }
        },
    )
}

/// The callback rows an outcome created, with their state; nothing when none.
fn callback_table(callbacks: &[CallbackRow]) -> Markup {
    html! {
        @if !callbacks.is_empty() {
            h2 { "Callbacks" }
            table.requests {
                thead { tr { th.num { "id" } th { "type" } th { "state" } th { "cause" } } }
                tbody {
                    @for (id, task, result, cause) in callbacks {
                        tr {
                            td.num { a href=(format!("/requests/{id}")) { (id) } }
                            td { (task) }
                            td { span class=(format!("state {}", state_label(result.as_deref()).to_lowercase())) { (state_label(result.as_deref())) } }
                            td { (cause.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    }
}

fn batch_progress(batch: &BatchRow) -> Markup {
    // Counts an application wrote by hand may be absurd: no overflow.
    let done = batch
        .finished
        .saturating_add(batch.failed)
        .saturating_add(batch.cancelled);
    html! {
        progress value=(done) max=(batch.total.max(1)) title=(format!("{done} of {} final", batch.total)) { (done) " of " (batch.total) }
        " " (batch.finished) " finished, " (batch.failed) " failed, " (batch.cancelled) " cancelled, " (batch.pending) " pending"
    }
}

pub(crate) fn batches(chrome: &Chrome, batches: &[BatchRow]) -> Markup {
    let shown = &batches[..batches.len().min(crate::store::web::PAGE_SIZE as usize)];
    layout(
        chrome,
        "Batches",
        html! {
            table {
                thead { tr { th.num { "id" } th { "name" } th { "state" } th { "progress" } th { "created" } th { "sealed" } } }
                tbody {
                    @for batch in shown {
                        tr {
                            td.num { a href=(format!("/batches/{}", batch.id)) { (batch.id) } }
                            td { (batch.name.as_deref().unwrap_or("")) }
                            td { (batch.state.as_deref().unwrap_or(if batch.sealed_at.is_some() { "running" } else { "open" })) }
                            td { (batch_progress(batch)) }
                            td.time { (batch.created_at.as_deref().unwrap_or("")) }
                            td.time { (batch.sealed_at.as_deref().unwrap_or("not sealed")) }
                        }
                    }
                }
            }
            @if shown.is_empty() { p { "No batch yet." } }
            @if batches.len() > shown.len() {
                @if let Some(last) = shown.last() {
                    p { a.next href=(format!("/batches?before={}", last.id)) { "Older →" } }
                }
            }
        },
    )
}

pub(crate) fn flows(chrome: &Chrome, flows: &[Flow]) -> Markup {
    let shown = &flows[..flows.len().min(crate::store::web::PAGE_SIZE as usize)];
    layout(
        chrome,
        "Flows",
        html! {
            table {
                thead { tr { th.num { "id" } th { "flow" } th { "state" } th.num { "attempt" } th.num { "step" } th { "created" } th { "finished" } th { "result" } } }
                tbody {
                    @for flow in shown {
                        tr {
                            td.num { a href=(format!("/flows/{}", flow.id)) { (flow.id) } }
                            td { (flow.name) }
                            td { (flow_state_label(flow)) }
                            td.num { (flow.attempt.max(1)) }
                            td.num { (flow.current_step.map(|s| s.saturating_add(1).to_string()).unwrap_or_default()) }
                            td.time { (flow.created_at.as_deref().unwrap_or("")) }
                            td.time { (flow.finished_at.as_deref().unwrap_or("")) }
                            td.text { (first_line(flow.result_text.as_deref().unwrap_or(""), 100)) }
                        }
                    }
                }
            }
            @if shown.is_empty() { p { "No flow yet." } }
            @if flows.len() > shown.len() {
                @if let Some(last) = shown.last() {
                    p { a.next href=(format!("/flows?before={}", last.id)) { "Older →" } }
                }
            }
        },
    )
}

fn flow_state_label(flow: &Flow) -> String {
    let state = flow.state.as_deref().unwrap_or("WAITING");
    if flow.cancel_requested && matches!(state, "RUNNING" | "REVERTING") {
        format!("{state} (cancel requested)")
    } else {
        state.to_string()
    }
}

/// One execute or revert row on the board: its id, state, host and tries.
fn board_cells(row: Option<&StepRow>) -> Markup {
    html! {
        @match row {
            Some(row) => {
                @let state = if row.exhausted {
                    format!("{} (exhausted)", state_label(row.result.as_deref()))
                } else {
                    state_label(row.result.as_deref()).to_string()
                };
                td.num { a href=(format!("/requests/{}", row.id)) { (row.id) } }
                td { span class=(format!("state {}", state_label(row.result.as_deref()).to_lowercase())) { (state) } }
                td { (row.host.as_deref().unwrap_or("")) }
                td.num { (row.tries) "/" (row.try_limit) }
            }
            None => { td {} td { "not started" } td {} td {} }
        }
    }
}

/// The board of one flow: each step with its execute and, under it, its
/// revert, the step running now marked; then the flow's store.
pub(crate) fn flow(chrome: &Chrome, board: &FlowBoard) -> Markup {
    let flow = &board.flow;
    let reverting = flow.state.as_deref() == Some("REVERTING");
    layout(
        chrome,
        &format!("Flow {} · {}", flow.id, flow.name),
        html! {
            table.fields {
                tbody {
                    tr { th { "state" } td { (flow_state_label(flow)) } }
                    tr { th { "attempt" } td { (flow.attempt.max(1)) " of " (u64::from(board.retry_times) + 1) } }
                    tr { th { "created_at" } td { (flow.created_at.as_deref().unwrap_or("")) } }
                    tr { th { "finished_at" } td { (flow.finished_at.as_deref().unwrap_or("")) } }
                    tr { th { "result_text" } td { (flow.result_text.as_deref().unwrap_or("")) } }
                }
            }
            p { a href=(format!("/requests?flow={}", flow.id)) { "Every row of this flow (all attempts) →" } }
            h2 { "Board" }
            @if board.steps.is_empty() {
                p { "No daemon has taken this flow yet: its steps are fixed when one does." }
            } @else {
                table.board {
                    thead { tr { th.num { "step" } th { "name" } th { "action" } th { "task" } th.num { "request" } th { "state" } th { "host" } th.num { "tries" } th { "provides" } } }
                    tbody {
                        @for step in &board.steps {
                            tr class=(if step.current && !reverting { "now" } else { "" }) {
                                td.num { (step.index + 1) }
                                td { (step.name) }
                                td { "execute" }
                                td { (step.task) }
                                (board_cells(step.execute.as_ref()))
                                td.text {
                                    @if let Some(key) = &step.provides {
                                        (key) ": " (first_line(step.provided.as_deref().unwrap_or(""), 80))
                                    }
                                }
                            }
                            @if let Some(revert) = &step.revert_task {
                                tr.revert class=(if step.current && reverting { "now" } else { "" }) {
                                    td {} td { "└ revert" } td { "revert" } td { (revert) }
                                    (board_cells(step.revert.as_ref()))
                                    td {}
                                }
                            }
                        }
                    }
                }
            }
            h2 { "store" }
            pre { (flow.store.as_deref().or(flow.options.as_deref()).unwrap_or("")) }
        },
    )
}

pub(crate) fn batch(
    chrome: &Chrome,
    batch: &BatchRow,
    members: &RequestPage,
    callbacks: &[CallbackRow],
) -> Markup {
    layout(
        chrome,
        &format!("Batch {}", batch.id),
        html! {
            p { (batch_progress(batch)) }
            table.fields {
                tbody {
                    tr { th { "name" } td { (batch.name.as_deref().unwrap_or("")) } }
                    tr { th { "state" } td { (batch.state.as_deref().unwrap_or("not final")) } }
                    tr { th { "created_at" } td { (batch.created_at.as_deref().unwrap_or("")) } }
                    tr { th { "sealed_at" } td { (batch.sealed_at.as_deref().unwrap_or("")) } }
                    tr { th { "finished_at" } td { (batch.finished_at.as_deref().unwrap_or("")) } }
                    tr { th { "on_complete" } td { (batch.on_complete.as_deref().unwrap_or("")) } }
                    tr { th { "on_failure" } td { (batch.on_failure.as_deref().unwrap_or("")) } }
                }
            }
            (callback_table(callbacks))
            h2 { "Members" }
            table.requests {
                thead { tr { th.num { "id" } th { "type" } th { "state" } th.num { "tries" } th { "result text" } } }
                tbody {
                    @for row in &members.rows {
                        tr {
                            td.num { a href=(format!("/requests/{}", row.id)) { (row.id) } }
                            td { (row.task_class_name) }
                            td { span class=(format!("state {}", state_label(row.result.as_deref()).to_lowercase())) { (state_label(row.result.as_deref())) } }
                            td.num { (row.tries) "/" (row.try_limit) }
                            td.text { (first_line(row.result_text.as_deref().unwrap_or(""), 100)) }
                        }
                    }
                }
            }
            @if let Some(before) = members.next_before {
                p { a.next href=(format!("/batches/{}?before={before}", batch.id)) { "Older members →" } }
            }
        },
    )
}
