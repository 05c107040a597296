//! Claiming ahead (issue 6): while tasks are short the scheduler claims more
//! rows than it has free slots. Those rows must never be lost nor have a try
//! wasted: they are given back at shutdown and when no slot frees up in time,
//! and a daemon that dies holding them has them reaped at once, not after
//! the lease.

use std::time::Duration;

use crate::util::{poll_every, Backend, Daemon, NewRow, TestDb};

const WAIT: Duration = Duration::from_secs(60);

both_backends!(
    rows_claimed_ahead_are_given_back_at_shutdown,
    rows_claimed_ahead_by_a_killed_daemon_run_again_before_the_lease_lapses,
    rows_claimed_ahead_are_given_back_while_a_long_task_holds_the_slot,
    rows_claimed_ahead_and_rejected_before_their_start_leave_no_slot_taken,
);

/// Short tasks (claim ahead engages) and a slow one.
const TASKS: &str =
    "tasks:\n  Quick:\n    command: [/bin/true]\n  Slow:\n    command: [/bin/sleep, '4']\n";

async fn insert_many(db: &TestDb, task: &str, count: usize) {
    db.insert_rows(vec![NewRow::new(task); count]).await;
}

/// Waits until `count` rows have finished (by then tries have ended, so the
/// daemon claims ahead).
async fn wait_finished_at_least(db: &TestDb, count: i64) {
    let every = Duration::from_millis(5);
    poll_every(
        every,
        WAIT,
        &format!("{count} rows to finish"),
        async || {
            let finished = db
                .scalar("SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'")
                .await;
            if finished >= count {
                Ok(())
            } else {
                Err(finished)
            }
        },
    )
    .await
}

/// Every row FINISHED after exactly one counted try.
async fn assert_all_finished_once(db: &TestDb, count: i64) {
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'",
        count,
        WAIT,
    )
    .await;
    let extra = db
        .scalar("SELECT count(*) FROM task_runner_requests WHERE tries <> 1")
        .await;
    assert_eq!(extra, 0, "rows whose given-back try was counted");
}

async fn rows_claimed_ahead_are_given_back_at_shutdown(backend: Backend) {
    let db = TestDb::new(backend).await;
    insert_many(&db, "Quick", 400).await;
    let config = format!("max_concurrent: 1\n{TASKS}");
    let mut daemon = Daemon::start(&db, "d1", &config);
    wait_finished_at_least(&db, 60).await;
    assert!(daemon.stop().success(), "log:\n{}", daemon.log_text());
    // Nothing left claimed, and no try counted for a row that did not run.
    let running = db
        .scalar("SELECT count(*) FROM task_runner_requests WHERE result = 'RUNNING'")
        .await;
    assert_eq!(running, 0);
    let wasted = db
        .scalar(
            "SELECT count(*) FROM task_runner_requests \
              WHERE coalesce(result, '') <> 'FINISHED' AND tries <> 0",
        )
        .await;
    assert_eq!(wasted, 0, "unstarted rows kept a counted try");
    let _daemon = Daemon::start(&db, "d2", &config);
    assert_all_finished_once(&db, 400).await;
}

async fn rows_claimed_ahead_by_a_killed_daemon_run_again_before_the_lease_lapses(backend: Backend) {
    let db = TestDb::new(backend).await;
    insert_many(&db, "Quick", 400).await;
    // A lease far longer than the deadline below: only the reaper's check of
    // the dead daemon's identity can free its rows in time.
    let config =
        format!("max_concurrent: 2\nlease_timeout: 120s\nheartbeat_interval: 10s\n{TASKS}");
    let mut daemon = Daemon::start(&db, "d1", &config);
    wait_finished_at_least(&db, 60).await;
    daemon.kill();
    let _daemon = Daemon::start(&db, "d2", &config);
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'",
        400,
        Duration::from_secs(30),
    )
    .await;
}

async fn rows_claimed_ahead_are_given_back_while_a_long_task_holds_the_slot(backend: Backend) {
    let db = TestDb::new(backend).await;
    insert_many(&db, "Quick", 60).await;
    let slow = db.enqueue("Slow", None).await;
    insert_many(&db, "Quick", 30).await;
    let _daemon = Daemon::start(&db, "d1", &format!("max_concurrent: 1\n{TASKS}"));
    db.wait_for_state(slow, "RUNNING", WAIT).await;
    // Rows claimed with it wait for the only slot; after a second they go back.
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'RUNNING' AND task_class_name = 'Quick'",
        0,
        Duration::from_millis(2500),
    )
    .await;
    let row = db.row(slow).await;
    assert_eq!(
        row.result.as_deref(),
        Some("RUNNING"),
        "the slow task ended before the check"
    );
    assert_all_finished_once(&db, 91).await;
}

/// A try makes its start ready (type, options, cgroup) before it waits for
/// its slot, so one rejected for its options never waits: a slot handed to
/// it meanwhile must go back. With `max_concurrent: 1` a single slot kept
/// would stop the daemon for good; every row must end, good and bad alike.
async fn rows_claimed_ahead_and_rejected_before_their_start_leave_no_slot_taken(backend: Backend) {
    let db = TestDb::new(backend).await;
    let values: Vec<&str> = (0..300)
        .map(|i| {
            if i % 3 == 0 {
                "('Quick', '[not: yaml')"
            } else {
                "('Quick', NULL)"
            }
        })
        .collect();
    db.execute(&format!(
        "INSERT INTO task_runner_requests (task_class_name, options) VALUES {}",
        values.join(", ")
    ))
    .await;
    let _daemon = Daemon::start(&db, "d1", &format!("max_concurrent: 1\n{TASKS}"));
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result IN ('FINISHED', 'REJECTED')",
        300,
        WAIT,
    )
    .await;
    let rejected = db
        .scalar(
            "SELECT count(*) FROM task_runner_requests WHERE result = 'REJECTED' \
              AND tries = 1 AND result_text LIKE 'options are not valid YAML%'",
        )
        .await;
    assert_eq!(rejected, 100);
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED' AND tries = 1"
        )
        .await,
        200
    );
}
