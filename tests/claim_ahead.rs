//! Claiming ahead (issue 6): while tasks are short the scheduler claims more
//! rows than it has free slots. Those rows must never be lost nor have a try
//! wasted: they are given back at shutdown and when no slot frees up in time,
//! and a daemon that dies holding them has them reaped at once, not after
//! the lease, their try given back.

use std::time::Duration;

use crate::util::{cli, poll_every, Backend, Daemon, NewRow, TestDb};

const WAIT: Duration = Duration::from_secs(60);

both_backends!(
    rows_claimed_ahead_are_given_back_at_shutdown,
    rows_claimed_ahead_by_a_killed_daemon_run_again_before_the_lease_lapses,
    rows_claimed_ahead_are_given_back_while_a_long_task_holds_the_slot,
    rows_claimed_ahead_and_rejected_before_their_start_leave_no_slot_taken,
    rows_claimed_ahead_and_cancelled_while_they_wait_armed_never_start,
    rows_with_large_options_are_claimed_only_into_a_free_slot,
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
    // A lease (120 s) far longer than the deadline below (60 s): only the reaper's check of
    // the dead daemon's identity can free its rows in time.
    let config =
        format!("max_concurrent: 2\nlease_timeout: 120s\nheartbeat_interval: 10s\n{TASKS}");
    let held = |pid: &str| {
        format!(
            "SELECT count(*) FROM task_runner_requests WHERE result = 'RUNNING' AND pid IS {pid}"
        )
    };
    // Killed while rows wait claimed ahead (with no process recorded). On a
    // loaded machine a kill can still fall on a moment with none: then the
    // next daemon's start reaps that one's rows, and it is killed in turn.
    let mut recorded = 0;
    let mut unrecorded = 0;
    for attempt in 1..=5 {
        let mut daemon = Daemon::start(&db, &format!("d1-{attempt}"), &config);
        wait_finished_at_least(&db, 60 * attempt).await;
        poll_every(
            Duration::from_millis(2),
            WAIT,
            "rows claimed ahead",
            async || match db.scalar(&held("NULL")).await {
                0 => Err(0),
                _ => Ok(()),
            },
        )
        .await;
        daemon.kill();
        recorded += db.scalar(&held("NOT NULL")).await;
        unrecorded = db.scalar(&held("NULL")).await;
        if unrecorded > 0 {
            break;
        }
    }
    assert!(
        unrecorded > 0,
        "five daemons died with no row claimed ahead"
    );
    let _daemon = Daemon::start(&db, "d2", &config);
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'",
        400,
        WAIT,
    )
    .await;
    // Only a try whose process the dead daemon had recorded counts.
    let counted_twice = db
        .scalar("SELECT count(*) FROM task_runner_requests WHERE tries <> 1")
        .await;
    assert!(
        counted_twice <= recorded,
        "{counted_twice} rows ran with a second try counted; the daemon had recorded a process for {recorded} and died holding {unrecorded} without one"
    );
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

/// Rows claimed ahead wait for the only slot with their start ready in the
/// line (armed), while a `Hold` task keeps it. Cancelled then, they leave
/// the line: none of them ever starts, not even when the slot frees up as
/// the `Hold` task is stopped by the same cancel (a try whose start the
/// freed slot had already reached would run and be stopped like a running
/// one: `CANCELLED` "after", never `FINISHED`). A round whose cancel came
/// after the 1 s give-back (a slow machine) proves nothing and is repeated.
async fn rows_claimed_ahead_and_cancelled_while_they_wait_armed_never_start(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ran = db.scratch.join("ran.log");
    // One type per round: a round cancels all rows of its own.
    let holds: String = (0..3)
        .map(|round| {
            format!(
                "  Hold{round}:\n    command: [/bin/sh, -c, 'echo $TASKRUNNER_REQUEST_ID >> {ran}; while :; do sleep 0.05; done']\n    timeout: 60s\n",
                ran = ran.display()
            )
        })
        .collect();
    let config = format!("max_concurrent: 1\n{TASKS}{holds}");
    let daemon = Daemon::start(&db, "d1", &config);
    let daemon_config = daemon.config.display().to_string();
    for round in 0..3 {
        // Short tries first, so that the daemon claims ahead.
        let hold = format!("Hold{round}");
        insert_many(&db, "Quick", 60).await;
        db.insert_rows(vec![NewRow::new(&hold); 10]).await;
        let waiting = format!(
            "SELECT count(*) FROM task_runner_requests \
             WHERE task_class_name = '{hold}' AND result = 'RUNNING' AND pid IS NULL"
        );
        poll_every(
            Duration::from_millis(2),
            WAIT,
            "Hold rows claimed ahead, waiting for the slot",
            async || match db.scalar(&waiting).await {
                0 => Err(0),
                _ => Ok(()),
            },
        )
        .await;
        let (status, _, stderr) = cli(
            &db,
            &["--config", &daemon_config, "cancel", "--task", &hold],
        );
        assert_eq!(status, 0, "{stderr}");
        db.wait_for_count(
            &format!(
                "SELECT count(*) FROM task_runner_requests \
                 WHERE task_class_name = '{hold}' AND result = 'CANCELLED'"
            ),
            10,
            WAIT,
        )
        .await;
        let ran: Vec<i64> = std::fs::read_to_string(&ran)
            .unwrap_or_default()
            .lines()
            .map(|id| id.parse().unwrap())
            .collect();
        for id in &ran {
            let row = db.row(taskrunner::request::RequestId(*id)).await;
            assert!(
                row.result.as_deref() == Some("CANCELLED")
                    && row
                        .result_text
                        .as_deref()
                        .unwrap_or_default()
                        .starts_with("cancelled by a user after"),
                "a Hold row that ran: {row:#?}"
            );
        }
        let never_started = db
            .scalar(&format!(
                "SELECT count(*) FROM task_runner_requests WHERE task_class_name = '{hold}' \
                 AND result_text = 'cancelled by a user before it started'"
            ))
            .await;
        if never_started > 0 {
            // Withdrawn from the line: none of them ran.
            let ids: Vec<String> = ran.iter().map(|id| id.to_string()).collect();
            let ran_anyway = db
                .scalar(&format!(
                    "SELECT count(*) FROM task_runner_requests \
                     WHERE result_text = 'cancelled by a user before it started' AND id IN ({})",
                    ids.join(", ")
                ))
                .await;
            assert_eq!(ran_anyway, 0, "ran: {ran:?}");
            return;
        }
    }
    panic!("no cancel reached a row while it waited armed, in three rounds");
}

/// A row claimed ahead holds its options in the daemon's memory until it
/// starts: sixteen rows a slot, each up to `max_options` (4 MiB). Short
/// tasks with 2 MiB of options each, 24 of them claimable at once, grew
/// the daemon's peak memory by 122–144 MiB at `max_concurrent` 1 (the
/// options, their copy for the YAML check, the parse, the stdin). Now a
/// claim that takes rows ahead leaves out options longer than 64 KiB, and
/// such rows are given back (their try not counted) and claimed into a free
/// slot, one by one: 29–32 MiB.
async fn rows_with_large_options_are_claimed_only_into_a_free_slot(backend: Backend) {
    let db = TestDb::new(backend).await;
    let config = format!("max_concurrent: 1\n{TASKS}");
    let mut daemon = Daemon::start(&db, "d", &config);
    // A try has ended: the daemon knows its tries are short, and claims ahead.
    let warm = db.enqueue("Quick", None).await;
    db.wait_for_state(warm, "FINISHED", WAIT).await;
    // Pinned to another node until all are in, then claimable at once.
    let large = format!("data: {}\n", "x".repeat(2 << 20));
    // The first cancelled by plain SQL before its claim: it must end
    // CANCELLED, not be given back (which would end the try the cancel is
    // for, so that the next claim cleared it) and run.
    let cancelled = db
        .insert_row(
            NewRow::new("Quick")
                .options(&large)
                .text("node", "elsewhere")
                .sql("cancel_requested_at", crate::util::sql_now_plus(backend, 0)),
        )
        .await;
    for _ in 0..24 {
        db.insert_row(
            NewRow::new("Quick")
                .options(&large)
                .text("node", "elsewhere"),
        )
        .await;
    }
    drop(large);
    let (peak_before, _) = crate::util::memory_kib(daemon.pid());
    db.execute("UPDATE task_runner_requests SET node = NULL WHERE node = 'elsewhere'")
        .await;
    db.wait_for_state(cancelled, "CANCELLED", WAIT).await;
    db.execute(&format!(
        "DELETE FROM task_runner_requests WHERE id = {cancelled}"
    ))
    .await;
    assert_all_finished_once(&db, 25).await;
    let (peak_after, _) = crate::util::memory_kib(daemon.pid());
    let grew_mib = peak_after.saturating_sub(peak_before) / 1024;
    println!("{backend:?}: the daemon's peak memory grew by {grew_mib} MiB");
    assert!(
        grew_mib < 64,
        "the daemon's peak memory grew by {grew_mib} MiB (bound 64 MiB)"
    );
    assert!(daemon.stop().success());
}
