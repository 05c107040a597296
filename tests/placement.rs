//! Where and when rows run: priority, queues, nodes, periodic rows and
//! per-type concurrency across daemons.

use std::time::Duration;

use taskrunner::request::RequestId;

use crate::util::{cli, holds_for, poll, sql_ago, Backend, Daemon, NewRow, TestDb};

const WAIT: Duration = Duration::from_secs(30);

both_backends!(
    higher_priority_runs_first,
    queue_limited_to_one_with_two_daemons,
    node_pinned_rows_run_only_on_their_node,
    a_reload_that_changes_the_host_id_keeps_the_node_name_taken_from_it,
    a_reload_that_changes_the_log_file_says_it_waits_for_a_restart,
    periodic_row_repeats_on_a_fixed_grid_until_cancelled,
    a_periodic_row_retried_by_hand_starts_no_second_chain,
    a_row_retried_by_hand_after_retention_took_what_its_end_made_makes_none_again,
    a_callback_held_back_by_an_applications_row_is_made_at_a_later_end,
    an_overdue_periodic_row_is_followed_by_the_next_point_of_its_grid_to_come,
    every_occurrence_of_a_periodic_row_makes_its_callbacks,
    type_concurrency_of_one_holds_across_two_daemons,
    a_limited_type_runs_while_another_types_backlog_waits,
    a_limited_type_runs_while_another_types_backlog_of_its_queue_waits,
    paused_queues_and_types_are_not_claimed_until_resumed,
    a_daemon_serving_every_queue_keeps_priority_across_queues_while_one_is_paused,
    with_more_queues_than_claimed_apart_the_claim_walks_past_the_paused_rows,
    an_idle_daemon_with_a_paused_backlog_only_reads_the_pauses,
    a_daemon_whose_queues_are_at_their_limits_sends_what_it_sends_idle,
    a_daemon_leaving_a_type_out_keeps_priority_across_the_other_types,
    a_pause_holds_on_the_local_daemon_when_the_command_returns,
    a_failed_claim_statement_drops_no_row_an_earlier_one_claimed,
    a_cancel_asked_while_a_periodic_try_runs_ends_the_series_even_if_the_try_finishes,
);

/// Parses `start|end ID NANOS` lines into per-row intervals and returns the
/// most that overlapped.
fn most_at_once(log: &std::path::Path) -> usize {
    let mut events: Vec<(u128, i32)> = std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            (
                parts[2].parse().unwrap(),
                if parts[0] == "start" { 1 } else { -1 },
            )
        })
        .collect();
    events.sort();
    let (mut running, mut most) = (0i32, 0i32);
    for (_, delta) in events {
        running += delta;
        most = most.max(running);
    }
    most as usize
}

fn logging_task(name: &str, log: &std::path::Path, seconds: &str) -> String {
    format!(
        "  {name}:\n    command: [/bin/sh, -c, 'echo start $TASKRUNNER_REQUEST_ID $(date +%s%N) >> {log}; sleep {seconds}; echo end $TASKRUNNER_REQUEST_ID $(date +%s%N) >> {log}']\n",
        log = log.display()
    )
}

async fn higher_priority_runs_first(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut ids = Vec::new();
    for priority in [0, 5, -1, 5, 10] {
        ids.push(
            db.insert_row(NewRow::new("Record").priority(priority))
                .await,
        );
    }
    let (mut daemon, ran) = run_one_at_a_time(&db, &ids).await;
    // priority 10, then the two 5s by id, then 0, then -1
    assert_eq!(ran, [ids[4], ids[1], ids[3], ids[0], ids[2]]);
    assert!(daemon.stop().success());
}

/// Starts a daemon that runs one `Record` try at a time (each writes its
/// request's id to a file), waits for `ids` to finish, and returns the
/// daemon and the ids in the order their tries ran.
async fn run_one_at_a_time(db: &TestDb, ids: &[RequestId]) -> (Daemon, Vec<RequestId>) {
    let order = db.scratch.join("order.log");
    let daemon = Daemon::start(
        db,
        "d",
        &format!(
            "max_concurrent: 1\ntasks:\n{}",
            ["Record", "A", "B", "C"]
                .map(|name| format!(
                    "  {name}:\n    command: [/bin/sh, -c, 'echo $TASKRUNNER_REQUEST_ID >> {}']\n",
                    order.display()
                ))
                .concat()
        ),
    );
    for id in ids {
        db.wait_for_state(*id, "FINISHED", WAIT).await;
    }
    let ran = std::fs::read_to_string(&order)
        .unwrap()
        .lines()
        .map(|id| RequestId(id.parse().unwrap()))
        .collect();
    (daemon, ran)
}

/// Runs `rows` (each with its priority) one at a time, and asserts that
/// they ran in claim order: by priority, then by id.
async fn runs_in_claim_order(db: &TestDb, mut rows: Vec<(i64, RequestId)>) -> Daemon {
    let ids: Vec<RequestId> = rows.iter().map(|(_, id)| *id).collect();
    let (daemon, ran) = run_one_at_a_time(db, &ids).await;
    rows.sort_by_key(|(priority, id)| (-priority, id.0));
    let expected: Vec<RequestId> = rows.into_iter().map(|(_, id)| id).collect();
    assert_eq!(ran, expected);
    daemon
}

async fn queue_limited_to_one_with_two_daemons(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("runs.log");
    let config = format!(
        "max_concurrent: 4\nqueues: {{ mail: 1 }}\ntasks:\n{}",
        logging_task("Mail", &log, "0.3")
    );
    db.insert_rows(vec![NewRow::new("Mail").queue("mail"); 6])
        .await;
    // A row of a queue no daemon serves stays pending.
    let unserved = db.insert_row(NewRow::new("NoOp").queue("reports")).await;
    let mut first = Daemon::start(&db, "first", &config);
    let mut second = Daemon::start(&db, "second", &config);
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE queue = 'mail' AND result = 'FINISHED'",
        6,
        WAIT,
    )
    .await;
    // One per daemon at most: two daemons, so never more than two.
    let most = most_at_once(&log);
    assert!(most <= 2, "{most} mail tasks ran at once");
    assert_eq!(
        db.row(unserved).await.result,
        None,
        "no daemon serves `reports`"
    );
    assert!(first.stop().success());
    assert!(second.stop().success());
}

/// A daemon without `node_name` takes its host id for it. A reload of a
/// file whose `host_id` changed kept the daemon's host id (it needs a
/// restart) but took the node name from the file's new one: rows pinned to
/// the daemon's node waited, and rows for the new name ran here. The node
/// name now follows the host id kept, and the log names the key that waits
/// for a restart.
async fn a_reload_that_changes_the_host_id_keeps_the_node_name_taken_from_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "host_id: web-1\n");
    let before = db.insert_row(NewRow::new("NoOp").node("web-1")).await;
    db.wait_for_state(before, "FINISHED", WAIT).await;
    daemon.reload_with(&db, "host_id: web-2\n");
    daemon.wait_for_log("config reloaded", WAIT);
    daemon.wait_for_log(
        "config reload: host_id changed in the file; the daemon keeps its own until a restart",
        WAIT,
    );
    let pinned = db.insert_row(NewRow::new("NoOp").node("web-1")).await;
    let elsewhere = db.insert_row(NewRow::new("NoOp").node("web-2")).await;
    db.wait_for_state(pinned, "FINISHED", WAIT).await;
    // A claim after `pinned`'s has passed `elsewhere` over by now.
    let later = db.enqueue("NoOp", None).await;
    db.wait_for_state(later, "FINISHED", WAIT).await;
    assert_eq!(db.row(elsewhere).await.result, None);
    assert!(daemon.stop().success());
}

/// A reload of a file whose `log_file` changed said `config reloaded` and
/// went on writing to the file named at start (SIGHUP reopens that one),
/// without a word. Like `host_id`, it is now named among the keys that
/// wait for a restart.
async fn a_reload_that_changes_the_log_file_says_it_waits_for_a_restart(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "");
    daemon.reload_with(&db, "log_file: elsewhere.log\n");
    daemon.wait_for_log(
        "config reload: log_file changed in the file; the daemon keeps its own until a restart",
        WAIT,
    );
    assert!(!daemon.dir.join("elsewhere.log").exists());
    assert!(daemon.stop().success());
}

async fn node_pinned_rows_run_only_on_their_node(backend: Backend) {
    let db = TestDb::new(backend).await;
    let task = "tasks:\n  Where:\n    command: [/bin/sh, -c, 'echo $NODE']\n";
    let mut alpha = Daemon::start(
        &db,
        "alpha",
        &format!("node_name: alpha\nenv: {{NODE: alpha}}\n{task}"),
    );
    let mut beta = Daemon::start(
        &db,
        "beta",
        &format!("node_name: beta\nenv: {{NODE: beta}}\n{task}"),
    );
    let mut pinned = Vec::new();
    let mut barred = Vec::new();
    for _ in 0..6 {
        pinned.push(db.insert_row(NewRow::new("Where").node("beta")).await);
        barred.push(db.insert_row(NewRow::new("Where").not_node("beta")).await);
    }
    let nowhere = db.insert_row(NewRow::new("Where").node("gamma")).await;
    for id in &pinned {
        assert_eq!(
            db.wait_for_state(*id, "FINISHED", WAIT)
                .await
                .result_text
                .as_deref(),
            Some("beta")
        );
    }
    for id in &barred {
        assert_eq!(
            db.wait_for_state(*id, "FINISHED", WAIT)
                .await
                .result_text
                .as_deref(),
            Some("alpha")
        );
    }
    assert_eq!(db.row(nowhere).await.result, None);
    let (_, listing, _) = cli(&db, &["list"]);
    assert!(
        listing.contains("pending (waits for node gamma)"),
        "{listing}"
    );
    assert!(alpha.stop().success());
    assert!(beta.stop().success());
}

async fn periodic_row_repeats_on_a_fixed_grid_until_cancelled(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Tick:\n    command: [/bin/sh, -c, 'sleep 0.3']\n",
    );
    let first = db.insert_row(NewRow::new("Tick").period(2)).await;
    db.wait_for_count("SELECT count(*) FROM task_runner_requests WHERE task_class_name = 'Tick' AND result = 'FINISHED'", 5, Duration::from_secs(20)).await;
    let rows = db
        .store
        .list(taskrunner::store::ListFilter::All, 100)
        .await
        .unwrap();
    let mut planned: Vec<chrono::NaiveDateTime> = rows
        .iter()
        .filter_map(|r| r.planned_at.as_deref())
        .map(|t| chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f").unwrap())
        .collect();
    planned.sort();
    let base = planned[0];
    for (n, at) in planned.iter().enumerate() {
        // On the grid: whole periods after the first planned start, whatever
        // each try took (a try that ended past the next point, on a loaded
        // machine, is followed by the point after that).
        let since = (*at - base).num_milliseconds();
        let offset = since - 2000 * ((since + 1000) / 2000);
        assert!(
            offset.abs() <= 2 && since >= 2000 * n as i64 - 2,
            "occurrence {n} drifted {offset} ms: {planned:?}"
        );
    }
    for row in rows
        .iter()
        .filter(|r| r.result.as_deref() == Some("FINISHED"))
    {
        let started = chrono::NaiveDateTime::parse_from_str(
            row.started_at.as_deref().unwrap(),
            "%Y-%m-%d %H:%M:%S%.f",
        )
        .unwrap();
        let planned = chrono::NaiveDateTime::parse_from_str(
            row.planned_at.as_deref().unwrap(),
            "%Y-%m-%d %H:%M:%S%.f",
        )
        .unwrap();
        assert!(started >= planned, "not before its planned start");
    }
    // Cancelling the pending occurrence stops the chain. It is due within
    // 2 s: on a loaded machine it may start before the cancel comes, and
    // end first (FINISHED stands; the suite once failed so on all three
    // backends at once): a cancel that came while it ran ends the chain
    // all the same, and one that came after its end is refused ("already
    // FINISHED"), and the next one is cancelled.
    let mut occurrence = rows
        .iter()
        .find(|r| r.result.is_none())
        .expect("the next occurrence is pending")
        .id;
    for attempt in 1.. {
        cli(&db, &["cancel", &occurrence.to_string()]);
        let ended = format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {occurrence} \
              AND result IN ('FINISHED', 'CANCELLED')"
        );
        db.wait_for_count(&ended, 1, WAIT).await;
        if db.row(RequestId(occurrence)).await.result.as_deref() == Some("CANCELLED") {
            break;
        }
        assert!(attempt < 3, "each occurrence ended before its cancel came");
        // Made in the transaction of the end, if at all.
        let next =
            format!("SELECT count(*) FROM task_runner_requests WHERE next_of = {occurrence}");
        if db.scalar(&next).await == 0 {
            break;
        }
        occurrence = db
            .scalar(&format!(
                "SELECT id FROM task_runner_requests WHERE next_of = {occurrence}"
            ))
            .await;
    }
    let count = db.scalar("SELECT count(*) FROM task_runner_requests").await;
    tokio::time::sleep(Duration::from_secs(3)).await; // longer than a period: nothing new may appear
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        count,
        "the chain stopped"
    );
    let _ = first;
    assert!(daemon.stop().success());
}

/// A periodic row's next occurrence was a copy of it without its
/// `on_success` and `on_failure`: only the first occurrence's end made its
/// callback, and a nightly job's later failures alerted no one. Each
/// occurrence now carries them.
async fn every_occurrence_of_a_periodic_row_makes_its_callbacks(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Tick:\n    command: ['true']\n  Flop:\n    command: ['false']\n  Noted:\n    command: ['true']\n",
    );
    db.insert_row(NewRow::new("Tick").period(1).on_success("Noted"))
        .await;
    db.insert_row(
        NewRow::new("Flop")
            .period(1)
            .try_limit(1)
            .on_failure("Noted"),
    )
    .await;
    // Three ends of each, and a callback for each end.
    for task in ["Tick", "Flop"] {
        db.wait_for_at_least(
            &format!(
                "SELECT count(*) FROM task_runner_requests \
                  WHERE task_class_name = '{task}' AND result IS NOT NULL AND result <> 'RUNNING'"
            ),
            3,
            WAIT,
        )
        .await;
    }
    for (task, result) in [("Tick", "FINISHED"), ("Flop", "FAILED")] {
        let without = format!(
            "SELECT count(*) FROM task_runner_requests AS o \
              WHERE o.task_class_name = '{task}' AND o.result = '{result}' \
                AND NOT EXISTS (SELECT 1 FROM task_runner_requests AS c WHERE c.callback_of = o.id)"
        );
        poll(
            WAIT,
            &format!("a callback for every ended {task}"),
            async || match db.scalar(&without).await {
                0 => Ok(()),
                seen => Err(seen),
            },
        )
        .await;
    }
    assert!(daemon.stop().success());
}

/// A periodic row retried by hand after its end (to run a failed nightly
/// report now, say) made a second next occurrence when it ended again:
/// from then on every occurrence ran twice, on the same planned times, and
/// each retry added one more chain. Its next occurrence is made once now
/// (`next_of`), and a retried occurrence only runs again.
async fn a_periodic_row_retried_by_hand_starts_no_second_chain(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Tick:\n    command: [/bin/echo, tick]\n",
    );
    let first = db.insert_row(NewRow::new("Tick").period(1)).await;
    db.wait_for_state(first, "FINISHED", WAIT).await;
    for _ in 0..2 {
        assert_eq!(cli(&db, &["retry", &first.to_string()]).0, 0);
        db.wait_for_state(first, "FINISHED", WAIT).await;
    }
    db.wait_for_at_least(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED' AND tries = 1",
        6,
        WAIT,
    )
    .await;
    let twice = db
        .scalar(
            "SELECT count(*) FROM (SELECT planned_at FROM task_runner_requests \
              GROUP BY planned_at HAVING count(*) > 1) AS twice",
        )
        .await;
    assert_eq!(twice, 0, "occurrences planned for the same time");
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE next_of = {first}"
        ))
        .await,
        1
    );
    assert!(daemon.stop().success());
    // An application's copy of an occurrence (Rails' `dup` copies every
    // column but the id) is a row like any other.
    db.execute(&format!(
        "INSERT INTO task_runner_requests (task_class_name, period, next_of) \
         SELECT task_class_name, period, next_of FROM task_runner_requests WHERE next_of = {first}"
    ))
    .await;
}

/// What a row's end made was read from the rows it made, and retention
/// deletes those: a nightly row's failure, kept (no `exhausted:` rule),
/// lost its next occurrence and its `on_failure` callback to `retention:
/// finished`/`cancelled` (here `purge --older-than`), and, retried by hand,
/// made both again: a second chain of the nightly row beside the first, and
/// a second alert. What an end made is noted apart now
/// (`task_runner_follow_ups`), for as long as the row itself lives.
async fn a_row_retried_by_hand_after_retention_took_what_its_end_made_makes_none_again(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Nightly:\n    command: [/bin/false]\n  Alert:\n    command: [/bin/true]\n",
    );
    let first = db
        .insert_row(
            NewRow::new("Nightly")
                .period(86_400)
                .try_limit(1)
                .on_failure("Alert"),
        )
        .await;
    db.wait_for_state(first, "FAILED", WAIT).await;
    let made = |column: &str| {
        format!("SELECT count(*) FROM task_runner_requests WHERE {column} = {first}")
    };
    let id_made =
        |column: &str| format!("SELECT id FROM task_runner_requests WHERE {column} = {first}");
    let next = RequestId(db.scalar(&id_made("next_of")).await);
    let alert = RequestId(db.scalar(&id_made("callback_of")).await);
    db.wait_for_state(alert, "FINISHED", WAIT).await;
    assert_eq!(cli(&db, &["cancel", &next.to_string()]).0, 0);
    db.wait_for_state(next, "CANCELLED", WAIT).await;
    // Both ended two days ago, as retention sees them; the failure just now.
    db.execute(&format!(
        "UPDATE task_runner_requests SET completed_at = {} WHERE id IN ({next}, {alert})",
        sql_ago(backend, 2 * 86_400)
    ))
    .await;
    let (status, stdout, stderr) = cli(&db, &["purge", "--older-than", "1d"]);
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stdout.trim(), "deleted 2 requests");

    assert_eq!(cli(&db, &["retry", &first.to_string()]).0, 0);
    let again = db.wait_for_state(first, "FAILED", WAIT).await;
    assert_eq!(again.tries, 1, "{again:?}");
    assert_eq!(db.scalar(&made("next_of")).await, 0, "a second chain");
    assert_eq!(db.scalar(&made("callback_of")).await, 0, "a second alert");
    assert!(daemon.stop().success());

    // The notes go with their row, whoever deletes it.
    let notes = format!("SELECT count(*) FROM task_runner_follow_ups WHERE request_id = {first}");
    assert_eq!(db.scalar(&notes).await, 2);
    db.execute(&format!(
        "DELETE FROM task_runner_requests WHERE id = {first}"
    ))
    .await;
    assert_eq!(db.scalar(&notes).await, 0);
}

/// A callback whose `unique_key` an application's own row holds (a waiting
/// row with `request:N:failure`) is not made at that end. MariaDB counts
/// the duplicate key as a row changed: the end noted the callback as made,
/// and once the application's row was gone and the request, retried by
/// hand, failed again, no callback came. The note is written only once
/// the callback's own row is there.
async fn a_callback_held_back_by_an_applications_row_is_made_at_a_later_end(backend: Backend) {
    let db = TestDb::new(backend).await;
    let id = db
        .insert_row(NewRow::new("Boom").try_limit(1).on_failure("Alert"))
        .await;
    let holder = db
        .insert_row(
            NewRow::new("Elsewhere")
                .unique_key(&format!("request:{id}:failure"))
                .delayed(backend, 86_400),
        )
        .await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Boom:\n    command: [/bin/false]\n  Alert:\n    command: [/bin/true]\n",
    );
    db.wait_for_state(id, "FAILED", WAIT).await;
    let callbacks = format!("SELECT count(*) FROM task_runner_requests WHERE callback_of = {id}");
    assert_eq!(db.scalar(&callbacks).await, 0);
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_follow_ups WHERE request_id = {id}"
        ))
        .await,
        0,
        "noted as made"
    );
    db.execute(&format!(
        "DELETE FROM task_runner_requests WHERE id = {holder}"
    ))
    .await;
    assert_eq!(cli(&db, &["retry", &id.to_string()]).0, 0);
    db.wait_for_state(id, "FAILED", WAIT).await;
    db.wait_for_count(&callbacks, 1, WAIT).await;
    assert!(daemon.stop().success());
}

async fn type_concurrency_of_one_holds_across_two_daemons(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("runs.log");
    let config = format!(
        "max_concurrent: 4\ntasks:\n{}    concurrency: 1\n",
        logging_task("Exclusive", &log, "0.2")
    );
    for _ in 0..8 {
        db.enqueue("Exclusive", None).await;
    }
    let mut first = Daemon::start(&db, "first", &config);
    let mut second = Daemon::start(&db, "second", &config);
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'",
        8,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        most_at_once(&log),
        1,
        "never two Exclusive tasks at once, anywhere"
    );
    assert!(first.stop().success());
    assert!(second.stop().success());
}

/// A type with a concurrency limit is claimed ahead of the other types: its
/// rows, enqueued first, run one at a time while another type's backlog
/// still waits. Before, it was claimed only with what the others' claims
/// left, so its rows waited until that backlog was gone.
async fn a_limited_type_runs_while_another_types_backlog_waits(backend: Backend) {
    limited_runs_while_bulk_waits(backend, "max_concurrent: 2\n", None, 200).await;
}

/// The same with `queues:`, the limited type's rows and the backlog in the
/// second queue. Whether the type had rows lately was noted by type alone:
/// the first queue, which has none of them, noted it empty at each claim,
/// so that in the second queue the backlog was claimed first, and the
/// limited rows waited for its end again.
async fn a_limited_type_runs_while_another_types_backlog_of_its_queue_waits(backend: Backend) {
    let config = "max_concurrent: 4\nqueues: { a: 2, b: 2 }\n";
    limited_runs_while_bulk_waits(backend, config, Some("b"), 120).await;
}

/// Three rows of `Limited` (`concurrency: 1`) and then `bulk` of `Bulk`, in
/// `queue` (or the default one), under `config`: the Limited rows end
/// while most of the Bulk rows have not started.
async fn limited_runs_while_bulk_waits(
    backend: Backend,
    config: &str,
    queue: Option<&str>,
    bulk: usize,
) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("runs.log");
    let config = format!(
        "{config}tasks:\n{}    concurrency: 1\n{}",
        logging_task("Limited", &log, "0.05"),
        logging_task("Bulk", &log, "0.05")
    );
    let in_queue = |row: NewRow| match queue {
        Some(queue) => row.queue(queue),
        None => row,
    };
    let mut limited = Vec::new();
    for _ in 0..3 {
        limited.push(db.insert_row(in_queue(NewRow::new("Limited"))).await.0);
    }
    db.insert_copies(in_queue(NewRow::new("Bulk")), bulk).await;
    let mut daemon = Daemon::start(&db, "d", &config);
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'",
        bulk as i64 + 3,
        Duration::from_secs(120),
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let events: Vec<(&str, i64, u128)> = text
        .lines()
        .map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            (
                parts[0],
                parts[1].parse().unwrap(),
                parts[2].parse().unwrap(),
            )
        })
        .collect();
    let limited_done = events
        .iter()
        .filter(|(kind, id, _)| *kind == "end" && limited.contains(id))
        .map(|(_, _, at)| *at)
        .max()
        .unwrap();
    let bulk_after = events
        .iter()
        .filter(|(kind, id, at)| *kind == "start" && !limited.contains(id) && *at > limited_done)
        .count();
    assert!(
        bulk_after >= bulk / 4,
        "only {bulk_after} of {bulk} Bulk rows started after the Limited ones ({limited:?}) ended; the first runs:\n{}",
        text.lines().take(12).collect::<Vec<_>>().join("\n")
    );
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

/// `taskrunner-cli pause` holds a queue's or a task type's rows back on
/// every daemon (one serving every queue, one serving named queues; a type
/// with a concurrency limit, claimed apart, among them) while other rows
/// run and a try already running goes on to its end; `resume` lets them run.
async fn paused_queues_and_types_are_not_claimed_until_resumed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let tasks =
        "tasks:\n  Nap:\n    command: [/bin/sleep, '2']\n  Quick:\n    command: [/bin/true]\n  \
                 Limited:\n    command: [/bin/true]\n    concurrency: 1\n";
    let mut every = Daemon::start(&db, "every", &format!("poll_interval: 1s\n{tasks}"));
    let mut named = Daemon::start(
        &db,
        "named",
        &format!("poll_interval: 1s\nqueues: {{ mail: 2, default: 2 }}\n{tasks}"),
    );
    let long = db.insert_row(NewRow::new("Nap").queue("mail")).await;
    db.wait_for(long, WAIT, "the long try to start", |r| r.pid.is_some())
        .await;
    for target in [
        &["--queue", "mail", "--reason", "relay down"][..],
        &["--task", "NoOp"],
        &["--task", "Limited"],
    ] {
        let (status, out, err) = cli(&db, &[&["pause"], target].concat());
        assert_eq!(status, 0, "{out}{err}");
        assert!(out.starts_with("paused "), "{out}");
    }
    // Each daemon reads the pauses within a second (it polls every second).
    for daemon in [&every, &named] {
        let config = daemon.config.display().to_string();
        crate::util::wait_until(WAIT, "the daemon to read the pauses", || {
            let (_, status, _) = cli(&db, &["--config", &config, "status"]);
            status.contains("paused (not claimed): queue mail (since ")
                && status.contains("UTC: relay down), task Limited (since ")
                && status.contains("task NoOp (since ")
        });
    }
    let held_mail = db.insert_row(NewRow::new("Quick").queue("mail")).await;
    let held_type = db.enqueue("NoOp", None).await;
    let held_limited = db.enqueue("Limited", None).await;
    let free = db.enqueue("Quick", None).await;
    db.wait_for_state(free, "FINISHED", WAIT).await;
    let long = db.wait_for_state(long, "FINISHED", WAIT).await;
    assert_eq!(long.tries, 1, "{long:?}");
    for id in [held_mail, held_type, held_limited] {
        let row = db.row(id).await;
        assert_eq!(row.result, None, "paused, yet claimed: {row:?}");
    }
    let (_, listed, _) = cli(&db, &["pause"]);
    assert!(
        listed.contains("queue mail (since ") && listed.contains("UTC: relay down)"),
        "{listed}"
    );
    let (_, metrics, _) = cli(&db, &["metrics"]);
    assert!(
        metrics.contains("taskrunner_paused{kind=\"queue\",name=\"mail\"} 1"),
        "{metrics}"
    );
    // Resuming the types lets their rows run; the queue stays paused.
    let (status, out, err) = cli(&db, &["resume", "--task", "NoOp", "--task", "Limited"]);
    assert_eq!(status, 0, "{out}{err}");
    assert_eq!(out, "resumed task NoOp\nresumed task Limited\n");
    db.wait_for_state(held_type, "FINISHED", WAIT).await;
    db.wait_for_state(held_limited, "FINISHED", WAIT).await;
    assert_eq!(db.row(held_mail).await.result, None);
    let (_, out, _) = cli(&db, &["resume", "--queue", "mail", "--queue", "reports"]);
    assert_eq!(out, "resumed queue mail\nqueue reports was not paused\n");
    db.wait_for_state(held_mail, "FINISHED", WAIT).await;
    assert_eq!(cli(&db, &["pause"]).1, "nothing is paused\n");
    assert!(every.stop().success());
    assert!(named.stop().success());
}

/// `taskrunner-cli pause` returns once the daemon on its host (the config's
/// control socket) goes by the pause: a row of the paused queue enqueued
/// right after it is not claimed there, though that daemon read the pauses
/// just before (otherwise it reads them again a second later); `resume`
/// has it claimed at once. Before, such a row ran.
async fn a_pause_holds_on_the_local_daemon_when_the_command_returns(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "poll_interval: 60s\n");
    let config = daemon.config.display().to_string();
    // Enqueues through the CLI, which wakes the daemon.
    let enqueue = |queue: &str| {
        let (status, out, err) = cli(
            &db,
            &["enqueue", "--config", &config, "NoOp", "--queue", queue],
        );
        assert_eq!(status, 0, "{out}{err}");
        RequestId(out.trim().parse().unwrap())
    };
    for _ in 0..3 {
        // A claim: the daemon reads the pauses just before it.
        let probe = enqueue("mail");
        db.wait_for_state(probe, "FINISHED", WAIT).await;
        let (status, out, err) = cli(&db, &["pause", "--config", &config, "--queue", "mail"]);
        assert_eq!(status, 0, "{out}{err}");
        assert!(
            out.starts_with(&format!(
                "paused queue mail: the daemon on this host (pid {}) claims none of its rows from now on",
                daemon.child.id()
            )),
            "{out}{err}"
        );
        let held = enqueue("mail");
        // The claim that takes a later row of another queue would take it.
        let later = enqueue("other");
        db.wait_for_state(later, "FINISHED", WAIT).await;
        let row = db.row(held).await;
        assert_eq!(row.result, None, "paused, yet claimed: {row:?}");
        let (status, out, err) = cli(&db, &["resume", "--config", &config, "--queue", "mail"]);
        assert_eq!(
            (status, out.as_str(), err.as_str()),
            (0, "resumed queue mail\n", "")
        );
        db.wait_for_state(held, "FINISHED", WAIT).await;
    }
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

/// Pauses the queue `held` and inserts three of its rows at the highest
/// priority, ahead of any other: a claim that walks meets them first.
async fn paused_rows_ahead(db: &TestDb) -> Vec<RequestId> {
    let (status, out, err) = cli(db, &["pause", "--queue", "held"]);
    assert_eq!(status, 0, "{out}{err}");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            db.insert_row(NewRow::new("Record").queue("held").priority(10))
                .await,
        );
    }
    held
}

/// While a queue is paused, a daemon serving every queue claims the others
/// each through its own index (not walking past the paused rows, which lie
/// ahead here with the highest priority), and still in claim order across
/// them: by priority, then by id, whatever their queue.
async fn a_daemon_serving_every_queue_keeps_priority_across_queues_while_one_is_paused(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let held = paused_rows_ahead(&db).await;
    let mut open = Vec::new();
    // A queue named '' (plain SQL can make one) is found as the others.
    for (queue, priority) in [
        ("a", 0),
        ("b", -1),
        ("a", 5),
        ("b", 5),
        ("b", 10),
        ("c", 1),
        ("", 3),
    ] {
        open.push(
            db.insert_row(NewRow::new("Record").queue(queue).priority(priority))
                .await,
        );
    }
    let (mut daemon, ran) = run_one_at_a_time(&db, &open).await;
    // b 10; a 5 and b 5 by id; '' 3; c 1; a 0; b -1.
    assert_eq!(
        ran,
        [open[4], open[2], open[3], open[6], open[5], open[0], open[1]]
    );
    for id in held {
        assert_eq!(db.row(id).await.result, None, "a paused row ran");
    }
    let log = daemon.log_text();
    assert!(!log.contains("database unavailable"), "{log}");
    assert!(daemon.stop().success());
}

/// While a task type is left out of its claim (paused here; a type with a
/// concurrency limit, claimed apart, is left out the same way), a daemon
/// serving every queue claims the other types each through its own index
/// (SQLite, PostgreSQL; MariaDB walks past the type's rows), not walking
/// past the left-out rows, which lie ahead here with the highest priority
/// (100 of them: with fewer it walks), and still in claim order across
/// the types: by priority, then by id.
async fn a_daemon_leaving_a_type_out_keeps_priority_across_the_other_types(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (status, out, err) = cli(&db, &["pause", "--task", "Record"]);
    assert_eq!(status, 0, "{out}{err}");
    // Enough rows for the other types to be claimed apart (100 or more).
    db.insert_copies(NewRow::new("Record").priority(10), 100)
        .await;
    let mut open = Vec::new();
    for (task, priority) in [
        ("A", 0),
        ("B", -1),
        ("A", 5),
        ("B", 5),
        ("B", 10),
        ("C", 1),
        ("C", 3),
    ] {
        let id = db.insert_row(NewRow::new(task).priority(priority)).await;
        open.push((priority, id));
    }
    let mut daemon = runs_in_claim_order(&db, open).await;
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE task_class_name = 'Record' AND result IS NULL")
            .await,
        100,
        "a paused row ran"
    );
    assert!(daemon.stop().success());
}

/// With more queues holding rows than a claim takes apart (32), a daemon
/// serving every queue walks the runnable index past the paused rows
/// instead: the same order across the queues, and no paused row.
async fn with_more_queues_than_claimed_apart_the_claim_walks_past_the_paused_rows(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let held = paused_rows_ahead(&db).await;
    let mut open = Vec::new();
    for n in 0..34 {
        let priority = (n * 7) % 5;
        let id = db
            .insert_row(
                NewRow::new("Record")
                    .queue(&format!("q{n:02}"))
                    .priority(priority),
            )
            .await;
        open.push((priority, id));
    }
    let mut daemon = runs_in_claim_order(&db, open).await;
    for id in held {
        assert_eq!(db.row(id).await.result, None, "a paused row ran");
    }
    assert!(daemon.stop().success());
}

/// The statements a daemon sends a second (its `status`): the median of
/// five one-second counts, and the five.
fn statements_a_second(db: &TestDb, config: &str) -> (f64, Vec<f64>) {
    let statements = || {
        let (code, out, err) = cli(db, &["--config", config, "status", "--json"]);
        assert_eq!(code, 0, "{err}");
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        status["database_statements"].as_u64().unwrap()
    };
    let mut rates = Vec::new();
    let mut count = statements();
    let mut since = std::time::Instant::now();
    for _ in 0..5 {
        crate::util::wait_until(WAIT, "a second to pass", || {
            since.elapsed() >= Duration::from_secs(1)
        });
        let (now, at) = (statements(), std::time::Instant::now());
        rates.push((now - count) as f64 / (at - since).as_secs_f64());
        (count, since) = (now, at);
    }
    let mut sorted = rates.clone();
    sorted.sort_by(f64::total_cmp);
    (sorted[2], rates)
}

/// A daemon serving named queues whose every queue is at its limit (here
/// `mail: 1`, its one try running, three slots free) sends no more
/// statements than idle. It made a release of delayed rows, a batch and a
/// flow repair pass every 200 ms, as if its claims filled: 8 to 21
/// statements a second more, for as long as the queue stayed full.
async fn a_daemon_whose_queues_are_at_their_limits_sends_what_it_sends_idle(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gate = db.scratch.join("gate");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "poll_interval: 60s\nmax_concurrent: 4\nqueues:\n  mail: 1\ntasks:\n  Gated:\n    command: [/bin/sh, -c, 'while [ ! -e {} ]; do sleep 0.05; done']\n",
            gate.display()
        ),
    );
    let config = daemon.config.display().to_string();
    // From the daemon's third second (see the test below).
    let started = std::time::Instant::now();
    crate::util::wait_until(WAIT, "the daemon's third second", || {
        started.elapsed() >= Duration::from_secs(2)
    });
    let (idle, idle_seconds) = statements_a_second(&db, &config);
    let id = db.insert_row(NewRow::new("Gated").queue("mail")).await;
    db.wait_for_pid(id, WAIT).await;
    let (_, full_seconds) = statements_a_second(&db, &config);
    std::fs::write(&gate, "").unwrap();
    // 8.5 more a second on SQLite before, 11 on MariaDB, 21 on PostgreSQL,
    // in every second. The least of the five seconds with the queue full
    // is compared: a loaded machine's bursts (late timers catching up, the
    // try's own writes) only add to a second, and three seconds of them
    // once lifted the median 4.2 over the idle one (43 and 64 statements
    // in two seconds, in CI).
    let full = full_seconds.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        full < idle + 4.0,
        "{full:.1} statements a second at least with its queue full ({full_seconds:.1?}), \
         {idle:.1} idle ({idle_seconds:.1?})"
    );
    db.wait_for_state(id, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

/// An idle daemon whose only waiting rows are paused reads the pauses once
/// a second and does nothing else it would not do idle. It spent 20 to 30
/// statements a second more on SQLite and PostgreSQL (a release of delayed
/// rows every 200 ms, as if its claims filled, and a batch and flow repair
/// pass at each reading), in every second. Each rate is the median of five
/// one-second counts, so that a second of other work (the last probe's
/// outcome and the claims after it, a busy machine's late timers) does not
/// decide; the margin is for the noise of the rest.
async fn an_idle_daemon_with_a_paused_backlog_only_reads_the_pauses(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "poll_interval: 60s\n");
    let config = daemon.config.display().to_string();
    let rate = || statements_a_second(&db, &config);
    // A daemon just started sends fewer statements in its first seconds
    // (9 to 14 a second, against 17 to 19 after, on SQLite): the idle rate
    // is counted from its third second on, or the median can fall among
    // them (13.6 idle against 23.6 paused, once in CI).
    let started = std::time::Instant::now();
    crate::util::wait_until(WAIT, "the daemon's third second", || {
        started.elapsed() >= Duration::from_secs(2)
    });
    let (idle, idle_seconds) = rate();
    let (status, out, err) = cli(&db, &["pause", "--queue", "mail"]);
    assert_eq!(status, 0, "{out}{err}");
    // A pause holds once the daemon has read it (within a second): the
    // row comes after that, and the daemon polls once a minute.
    // A row of another queue makes it claim, and so read the pauses.
    crate::util::wait_until(WAIT, "the daemon to read the pause", || {
        cli(&db, &["enqueue", "NoOp", "--queue", "probe"]);
        let (_, status, _) = cli(&db, &["--config", &config, "status"]);
        status.contains("paused (not claimed): queue mail")
    });
    let held = db.insert_row(NewRow::new("NoOp").queue("mail")).await;
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE queue = 'probe' AND (result IS NULL OR result <> 'FINISHED')",
        0,
        WAIT,
    )
    .await;
    let (paused, paused_seconds) = rate();
    assert!(
        paused < idle + 8.0,
        "{paused:.1} statements a second with a paused backlog ({paused_seconds:.1?}), \
         {idle:.1} idle ({idle_seconds:.1?})"
    );
    assert_eq!(db.row(held).await.result, None, "{}", daemon.log_text());
    assert!(daemon.stop().success());
}

/// On PostgreSQL a limited type's claim waits for the type's lock inside
/// its transaction, and `now()` is the transaction's start: the rows it
/// claimed got a `heartbeat_at` (and `started_at`) as old as that wait, a
/// lease already part spent or lapsed when it began, which another daemon's
/// reaper could take for a dead daemon's. The lease is stamped when the
/// claim runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_claim_that_waited_for_its_types_lock_stamps_its_lease_when_it_runs() {
    use sqlx::Connection;
    let db = TestDb::new(Backend::Postgres).await;
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("SELECT pg_advisory_lock(hashtext('taskrunner:concurrency:Limited'))")
        .execute(&mut holder)
        .await
        .unwrap();
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Limited:\n    command: [/bin/sleep, '5']\n    concurrency: 1\n",
    );
    let id = db.enqueue("Limited", None).await;
    // The daemon's claim waits for the lock meanwhile.
    daemon.wait_for_log("taskrunnerd started", Duration::from_secs(30));
    db.wait_for_at_least(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        1,
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let released: String = sqlx::query_scalar(
        "SELECT clock_timestamp()::text FROM (SELECT pg_advisory_unlock(hashtext('taskrunner:concurrency:Limited'))) AS unlocked",
    )
    .fetch_one(&mut holder)
    .await
    .unwrap();
    db.wait_for_pid(id, Duration::from_secs(30)).await;
    let stamped_before_release = db
        .scalar(&format!(
            "SELECT (extract(epoch FROM '{released}'::timestamptz - started_at) * 1000)::bigint \
               FROM task_runner_requests WHERE id = {}",
            id.0
        ))
        .await;
    // `started_at` and `heartbeat_at` are stamped together; the heartbeat
    // has renewed the latter since.
    assert!(
        stamped_before_release < 100,
        "the claim was stamped {stamped_before_release} ms before it ran"
    );
    assert!(daemon.stop().success());
}

multi_host_backends!(
    a_row_held_while_its_claim_waits_for_another_types_lock_runs_once,
    a_row_held_while_its_claim_waits_is_given_back_when_the_daemon_stops,
    a_daemon_that_cannot_read_the_pauses_at_start_claims_nothing_until_it_can,
);

/// A daemon starts while the pauses' table is held locked (an upgrade's
/// `ALTER`, an operator's `LOCK`), so that its first reading of the pauses
/// fails. It went on as though nothing were paused: the claim took the
/// rows of a paused queue. It now claims nothing until a reading succeeds.
/// (SQLite's readers are not held up by a writer: nothing to reproduce.)
async fn a_daemon_that_cannot_read_the_pauses_at_start_claims_nothing_until_it_can(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let (status, out, err) = cli(&db, &["pause", "--queue", "held"]);
    assert_eq!(status, 0, "{out}{err}");
    let held = db.insert_row(NewRow::new("NoOp").queue("held")).await;
    let free = db.insert_row(NewRow::new("NoOp")).await;
    let holder = db
        .holding(match backend {
            Backend::Postgres => "BEGIN; LOCK TABLE task_runner_pauses IN ACCESS EXCLUSIVE MODE",
            Backend::MySql => "LOCK TABLES task_runner_pauses WRITE",
            Backend::Sqlite => unreachable!("SQLite's readers are not held up"),
        })
        .await;
    let mut daemon = Daemon::start(&db, "d", "");
    daemon.wait_for_log("database unavailable while reading pauses", WAIT);
    drop(holder);
    db.wait_for_state(free, "FINISHED", WAIT).await;
    assert_eq!(db.row(held).await.result, None, "a paused queue's row ran");
    assert!(daemon.stop().success());
}

/// Enqueues a row of type `A` and waits until it is claimed (RUNNING; its
/// round may still wait, for another type's lock).
async fn a_row_claimed(db: &TestDb) -> RequestId {
    let id = db.enqueue("A", None).await;
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {} AND result = 'RUNNING'",
            id.0
        ),
        1,
        WAIT,
    )
    .await;
    id
}

/// Holds type `task`'s lock (PostgreSQL's advisory lock, MariaDB's
/// `GET_LOCK`) on a connection of its own, as another daemon's claim of that
/// type holds it, until the returned connection is dropped.
async fn hold_type_lock(db: &TestDb, task: &str) -> Box<dyn std::any::Any> {
    use sqlx::Connection;
    match db.backend {
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query("SELECT pg_advisory_lock(hashtext('taskrunner:concurrency:' || $1))")
                .bind(task)
                .execute(&mut connection)
                .await
                .unwrap();
            Box::new(connection)
        }
        Backend::MySql => {
            let mut connection = sqlx::MySqlConnection::connect(&db.url).await.unwrap();
            let got: Option<i64> = sqlx::query_scalar(
                "SELECT GET_LOCK(CONCAT('taskrunner:', SHA1(CONCAT(DATABASE(), ':', ?))), 5)",
            )
            .bind(task)
            .fetch_one(&mut connection)
            .await
            .unwrap();
            assert_eq!(got, Some(1));
            Box::new(connection)
        }
        Backend::Sqlite => unreachable!("SQLite has no lock per type"),
    }
}

/// The daemon is told to stop while its claim round waits for type B's
/// lock, after the round's claim of type A committed. The round is given up
/// 2 s later; its A row was dropped with it, left RUNNING without a try
/// under a stopped daemon until a restart or another host's reaper took it.
/// It is now given back at once, its try not counted.
async fn a_row_held_while_its_claim_waits_is_given_back_when_the_daemon_stops(backend: Backend) {
    let db = TestDb::new(backend).await;
    let config =
        "lease_timeout: 30s\ntasks:\n  A:\n    command: [/bin/true]\n    concurrency: 1\n  \
                  B:\n    command: [/bin/true]\n    concurrency: 1\n";
    let mut daemon = Daemon::start(&db, "d", config);
    let holder = hold_type_lock(&db, "B").await;
    let id = a_row_claimed(&db).await;
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    // Given back once the round is given up, 2 s after the SIGTERM.
    let row = db
        .wait_for(id, WAIT, "the row given back", |row| {
            row.result.as_deref() != Some("RUNNING")
        })
        .await;
    assert_eq!(row.tries, 0, "{row:?}");
    // The round's statement still waits for the lock (until its bound):
    // released, the daemon's last steps need not wait for it.
    drop(holder);
    let status = daemon.wait_exit(WAIT);
    assert!(status.success(), "{}", daemon.log_text());
}

/// A claim round commits each limited type's claim as it goes: type A's
/// row is held (RUNNING, this daemon's) while the round waits for type B's
/// lock, which another daemon's slow claim holds (here the test). The
/// heartbeat took a held row that no try ran for a claim whose answer was
/// lost and gave it back after two renewals; the round then started it
/// anyway, and the next claim took it again: two processes for one row.
async fn a_row_held_while_its_claim_waits_for_another_types_lock_runs_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("runs.log");
    let config = format!(
        "heartbeat_interval: 1s\nlease_timeout: 8s\ntasks:\n{}    concurrency: 1\n  B:\n    command: [/bin/true]\n    concurrency: 1\n",
        logging_task("A", &log, "1")
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    daemon.wait_for_log("taskrunnerd started", WAIT);
    // Held as another daemon's claim of B would hold it.
    let holder = hold_type_lock(&db, "B").await;
    let id = a_row_claimed(&db).await;
    // Three renewals and more while the round waits (MariaDB's claim waits
    // for the lock at most half of lease_timeout: 4 s).
    crate::util::holds_for(
        Duration::from_millis(3500),
        "no give-back",
        async || match daemon.log_text().contains("holds rows it never started") {
            false => Ok(()),
            true => Err(crate::util::Text(daemon.log_text())),
        },
    )
    .await;
    drop(holder);
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}");
    // Another claim that took the row again would have run it again.
    wait_until_quiet(&db).await;
    let runs = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        runs.lines().filter(|l| l.starts_with("start")).count(),
        1,
        "{runs}"
    );
    assert!(daemon.stop().success());
}

/// Until no row is running or waiting.
async fn wait_until_quiet(db: &TestDb) {
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result IS NULL OR result IN ('RUNNING', 'INTERRUPTED')",
        0,
        WAIT,
    )
    .await;
}

/// A periodic row that ran late (its daemons were down overnight) stands
/// for the occurrences it missed: the next one is planned at the first
/// point of its grid after its end. Before, it was planned at the latest
/// point at or before the end, already due, and ran straight after (a
/// nightly job down from 22:00 to 06:00 ran twice at 06:00). Here a row
/// with a 60 s period planned 330 s ago: its next occurrence is planned
/// 360 s after it, 30 s from now, and waits.
async fn an_overdue_periodic_row_is_followed_by_the_next_point_of_its_grid_to_come(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Tick:\n    command: [/bin/echo, tick]\n",
    );
    let first = db
        .insert_row(NewRow::new("Tick").period(60).delayed(backend, -330))
        .await;
    let ended = db.wait_for_state(first, "FINISHED", WAIT).await;
    let next = format!("SELECT count(*) FROM task_runner_requests WHERE next_of = {first}");
    db.wait_for_count(&next, 1, WAIT).await;
    let next = RequestId(
        db.scalar(&format!(
            "SELECT id FROM task_runner_requests WHERE next_of = {first}"
        ))
        .await,
    );
    let time = |text: Option<String>| {
        chrono::NaiveDateTime::parse_from_str(&text.unwrap(), "%Y-%m-%d %H:%M:%S%.f").unwrap()
    };
    let planned = time(ended.planned_at.clone());
    let row = db.row(next).await;
    let gap = (time(row.delay_until.clone()) - planned).num_milliseconds();
    assert!(
        (gap - 360_000).abs() <= 2,
        "planned {gap} ms after: {row:#?}"
    );
    holds_for(
        Duration::from_secs(2),
        "the next occurrence waiting",
        async || match db.row(next).await {
            row if row.result.is_none() => Ok(()),
            row => Err(row),
        },
    )
    .await;
    assert!(daemon.stop().success());
}

/// A claim round is several statements: a limited type's rows are claimed
/// through their own, then the other types'. When a later one failed (here
/// an application's trigger refuses the claim of every `Refused` row), the
/// round's error dropped the rows the earlier ones had claimed: they
/// waited as strays, given back two renewals later ("the answer to its
/// claim was lost"), were claimed again and dropped again, and never ran.
/// They run now, while the failing claim is logged as an outage.
async fn a_failed_claim_statement_drops_no_row_an_earlier_one_claimed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let refuse = "the application refuses to run type Refused";
    let statements: Vec<String> = match backend {
        Backend::Sqlite => vec![format!(
            "CREATE TRIGGER refuse_claim BEFORE UPDATE OF result ON task_runner_requests \
               WHEN NEW.task_class_name = 'Refused' AND NEW.result = 'RUNNING' \
               BEGIN SELECT RAISE(ABORT, '{refuse}'); END"
        )],
        Backend::Postgres => vec![
            format!(
                "CREATE FUNCTION refuse_claim() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                   IF NEW.task_class_name = 'Refused' AND NEW.result = 'RUNNING' THEN \
                     RAISE EXCEPTION '{refuse}'; \
                   END IF; \
                   RETURN NEW; END $$"
            ),
            "CREATE TRIGGER refuse_claim BEFORE UPDATE ON task_runner_requests \
               FOR EACH ROW EXECUTE FUNCTION refuse_claim()"
                .to_string(),
        ],
        Backend::MySql => vec![format!(
            "CREATE TRIGGER refuse_claim BEFORE UPDATE ON task_runner_requests \
               FOR EACH ROW BEGIN \
                 IF NEW.task_class_name = 'Refused' AND NEW.result = 'RUNNING' THEN \
                   SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{refuse}'; \
                 END IF; \
               END"
        )],
    };
    for sql in &statements {
        db.execute(sql).await;
    }
    db.enqueue("Refused", None).await;
    let limited = db.enqueue("Limited", None).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "heartbeat_interval: 1s\ntasks:\n  Limited:\n    command: [/bin/true]\n    concurrency: 1\n  \
           Refused:\n    command: [/bin/true]\n",
    );
    daemon.wait_for_log(refuse, WAIT);
    let row = db.wait_for_state(limited, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}");
    let log = daemon.log_text();
    assert!(!log.contains("giving them back"), "{log}");
    assert!(daemon.stop().success());
}

/// A cancel asked while an occurrence of a periodic row runs (plain SQL
/// here, which wakes no daemon; `cancel` without a control socket is the
/// same) reaches the try at the next heartbeat. A try that finished first
/// kept FINISHED, as it should, but its end made the next occurrence: the
/// series went on, where a cancel that won the race ended it. Now the
/// series ends either way.
async fn a_cancel_asked_while_a_periodic_try_runs_ends_the_series_even_if_the_try_finishes(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let open = db.scratch.join("open");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "heartbeat_interval: 10s\nlease_timeout: 30s\ntasks:\n  Tick:\n    command: [/bin/sh, -c, 'until [ -e {} ]; do sleep 0.02; done']\n",
            open.display()
        ),
    );
    let id = db.insert_row(NewRow::new("Tick").period(3600)).await;
    db.wait_for_pid(id, WAIT).await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET cancel_requested_at = {} WHERE id = {id}",
        crate::util::sql_now_plus(backend, 0)
    ))
    .await;
    std::fs::write(&open, "").unwrap();
    let ended = format!(
        "SELECT count(*) FROM task_runner_requests WHERE id = {id} \
          AND result IN ('FINISHED', 'CANCELLED')"
    );
    db.wait_for_count(&ended, 1, WAIT).await;
    // Whichever came first (most often the end: the next renewal, which
    // reads the cancel, is up to 10 s away), no next occurrence.
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        1,
        "{:?}",
        db.row(id).await
    );
    assert!(daemon.stop().success());
}

/// A limited type's claim on PostgreSQL takes the type's advisory lock; a
/// peer that holds it and goes silent (a daemon frozen mid-claim, a
/// connection lost without a reset) held up this daemon's claim round
/// until the call was given up at `lease_timeout`, and the next round the
/// same: the limited types are claimed first, and no other type's row was
/// claimed meanwhile. The wait for the lock is bounded now (half the
/// call's bound, at most 10 s, as on MariaDB): the type is left out of
/// that round, with one line, and the others are claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_limited_types_lock_held_by_a_silent_peer_holds_up_no_other_type() {
    use sqlx::Connection;
    let db = TestDb::new(Backend::Postgres).await;
    let mut peer = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtext('taskrunner:concurrency:' || 'Limited'))")
        .execute(&mut peer)
        .await
        .unwrap();
    let limited = db.enqueue("Limited", None).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Limited:\n    command: [/bin/true]\n    concurrency: 1\n  \
           Quick:\n    command: [/bin/true]\n",
    );
    let quick = db.enqueue("Quick", None).await;
    db.wait_for_state(quick, "FINISHED", Duration::from_secs(15))
        .await;
    daemon.wait_for_log("claiming none of its rows this time", WAIT);
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut peer)
        .await
        .unwrap();
    db.wait_for_state(limited, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}
