//! Batches and callbacks: each callback row is created exactly once, by the
//! transaction that records the outcome causing it, under the lock of the
//! parent batch row; also when daemons finish the last members at the same
//! instant, when a batch is sealed by hand after its members ended, and when
//! a member is retried by hand.

use std::time::{Duration, Instant};

use crate::util::*;

both_backends!(
    thousand_member_batch_has_one_on_complete_and_exact_counters,
    two_hundred_batches_whose_members_end_at_the_same_instant_get_two_hundred_callbacks,
    fail_fast_cancels_unstarted_members_and_runs_on_failure_once,
    a_member_running_when_its_batch_failed_is_not_tried_again,
    purge_keeps_the_members_of_an_open_batch_until_it_ends,
    batch_sealed_by_plain_sql_after_its_members_ended_gets_its_callback_within_a_poll,
    batch_sealed_by_plain_sql_gets_its_callback_within_a_poll_while_a_queue_is_paused,
    member_retried_by_hand_after_its_batch_failed_makes_no_second_callback,
    on_failure_runs_once_after_the_last_try_and_never_on_cancel,
    on_success_sees_the_parent_result_text,
    a_callback_whose_options_would_pass_max_options_runs_with_the_parents_output_cut,
    on_exhausted_in_the_config_alerts_once_per_exhausted_request,
    an_on_exhausted_rule_added_by_a_reload_alerts_for_a_try_that_was_running,
    daemon_killed_between_the_task_exit_and_its_outcome_write_makes_one_callback,
    chain_of_three_batches_each_created_by_the_previous_on_complete,
    batch_cancel_cancels_unstarted_members_and_makes_no_callback,
    a_callback_given_to_a_running_row_is_made_at_its_end,
    a_batch_counter_an_application_wrote_at_its_limit_holds_up_no_outcome,
    a_row_joining_a_batch_by_update_is_counted_and_a_member_stays_in_its_batch,
    counters_an_application_wrote_at_their_limit_break_no_seal_cancel_or_repair_pass,
    a_row_that_joined_a_batch_ended_meanwhile_is_not_tried_again,
);

/// Callback types that print what they were given (their options).
const CALLBACK_TYPES: &str = "  Done:\n    command: [/bin/cat]\n  Failed:\n    command: [/bin/cat]\n  Alert:\n    command: [/bin/cat]\n";

/// Starts one daemon on SQLite, `postgres_daemons` daemons (as many hosts)
/// on PostgreSQL, with `extra` config (its `tasks:` gets the callback types).
fn start_daemons(db: &TestDb, postgres_daemons: usize, extra: &str) -> Vec<Daemon> {
    let count = match db.backend {
        Backend::Sqlite => 1,
        Backend::Postgres | Backend::MySql => postgres_daemons,
    };
    (0..count)
        .map(|n| {
            let config = format!("host_id: host-{n}\n{extra}");
            let config = config.replace("tasks:\n", &format!("tasks:\n{CALLBACK_TYPES}"));
            Daemon::start(db, &format!("d{n}"), &config)
        })
        .collect()
}

/// Inserts a batch with plain SQL; `columns` and `values` add to the
/// defaults. (By hand: creating a batch with plain SQL is what these tests
/// prove an application can do.)
async fn insert_batch(db: &TestDb, columns: &str, values: &str) -> i64 {
    db.insert(&format!(
        "INSERT INTO task_runner_batches ({columns}) VALUES ({values}) RETURNING id"
    ))
    .await
    .0
}

/// Inserts `n` members of `task` into `batch` with one plain SQL statement.
async fn insert_members(db: &TestDb, batch: i64, task: &str, n: usize, try_limit: i64) {
    let member = NewRow::new(task)
        .batch(batch)
        .try_limit(try_limit)
        .sql("options", "'member: ' || i");
    db.insert_copies(member, n).await;
}

const OPEN: &str = "(result IS NULL OR result = 'RUNNING' OR (result IN ('FAILED', 'CRASHED', 'TIMEOUT', 'INTERRUPTED') AND tries < try_limit))";

/// Seals `batch` with plain SQL, as an application does.
async fn seal(db: &TestDb, batch: i64) {
    db.execute(&format!(
        "UPDATE task_runner_batches SET sealed_at = CURRENT_TIMESTAMP WHERE id = {batch}"
    ))
    .await;
}

/// Waits up to `timeout` for `batch`'s one callback row to have FINISHED.
async fn its_callback_finishes(db: &TestDb, batch: i64, timeout: Duration) {
    db.wait_for_count(
        &format!("SELECT count(*) FROM task_runner_requests WHERE callback_of_batch = {batch} AND result = 'FINISHED'"),
        1,
        timeout,
    )
    .await;
}

/// The batch's counters, and the same recomputed from its members.
async fn counters_and_recount(db: &TestDb, batch: i64) -> ([i64; 5], [i64; 5]) {
    let stored = [
        db.scalar(&format!(
            "SELECT CAST(total AS BIGINT) FROM task_runner_batches WHERE id = {batch}"
        ))
        .await,
        db.scalar(&format!(
            "SELECT CAST(pending AS BIGINT) FROM task_runner_batches WHERE id = {batch}"
        ))
        .await,
        db.scalar(&format!(
            "SELECT CAST(finished AS BIGINT) FROM task_runner_batches WHERE id = {batch}"
        ))
        .await,
        db.scalar(&format!(
            "SELECT CAST(failed AS BIGINT) FROM task_runner_batches WHERE id = {batch}"
        ))
        .await,
        db.scalar(&format!(
            "SELECT CAST(cancelled AS BIGINT) FROM task_runner_batches WHERE id = {batch}"
        ))
        .await,
    ];
    let members = format!("SELECT count(*) FROM task_runner_requests WHERE batch_id = {batch}");
    let recount = [
        db.scalar(&members).await,
        db.scalar(&format!("{members} AND {OPEN}")).await,
        db.scalar(&format!("{members} AND result = 'FINISHED'"))
            .await,
        db.scalar(&format!(
            "{members} AND NOT {OPEN} AND result NOT IN ('FINISHED', 'CANCELLED')"
        ))
        .await,
        db.scalar(&format!("{members} AND result = 'CANCELLED'"))
            .await,
    ];
    (stored, recount)
}

async fn callbacks_of_batch(db: &TestDb, batch: i64) -> i64 {
    db.scalar(&format!(
        "SELECT count(*) FROM task_runner_requests WHERE callback_of_batch = {batch}"
    ))
    .await
}

/// Checks for `duration` that batch `batch` keeps `count` callbacks.
async fn callbacks_stay(db: &TestDb, batch: i64, count: i64, duration: Duration) {
    holds_for(
        duration,
        &format!("{count} callbacks"),
        async || match callbacks_of_batch(db, batch).await {
            callbacks if callbacks == count => Ok(()),
            callbacks => Err(callbacks),
        },
    )
    .await;
}

async fn batch_state(db: &TestDb, batch: i64) -> String {
    let state = db
        .scalar(&format!(
            "SELECT CAST(CASE state WHEN 'FINISHED' THEN 1 WHEN 'FAILED' THEN 2 WHEN 'CANCELLED' THEN 3 ELSE 0 END AS BIGINT) \
               FROM task_runner_batches WHERE id = {batch}"
        ))
        .await;
    ["NULL", "FINISHED", "FAILED", "CANCELLED"][state as usize].to_string()
}

async fn thousand_member_batch_has_one_on_complete_and_exact_counters(backend: Backend) {
    let db = TestDb::new(backend).await;
    let batch = insert_batch(
        &db,
        "name, options, on_complete, on_failure",
        "'frames', 'film: a.mp4', 'Done', 'Failed'",
    )
    .await;
    insert_members(&db, batch, "NoOp", 1000, 5).await;
    seal(&db, batch).await;
    let started = Instant::now();
    let mut daemons = start_daemons(&db, 4, "max_concurrent: 4\ntasks:\n");
    its_callback_finishes(&db, batch, Duration::from_secs(240)).await;
    println!(
        "1,000 members on {} daemon(s): the callback finished {:.1}s after the start",
        daemons.len(),
        started.elapsed().as_secs_f64()
    );
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    assert_eq!(callbacks_of_batch(&db, batch).await, 1);
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE callback_of_batch = {batch} \
               AND task_class_name = 'Done' AND unique_key = 'batch:{batch}:complete'"
        ))
        .await,
        1
    );
    let (stored, recount) = counters_and_recount(&db, batch).await;
    assert_eq!(stored, recount);
    assert_eq!(stored, [1000, 0, 1000, 0, 0]);
    assert_eq!(batch_state(&db, batch).await, "FINISHED");
    // The callback got the batch's options and its summary.
    let callback = db
        .scalar(&format!(
            "SELECT id FROM task_runner_requests WHERE callback_of_batch = {batch}"
        ))
        .await;
    let text = db
        .row(taskrunner::request::RequestId(callback))
        .await
        .result_text
        .unwrap();
    let summary: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(summary["film"], serde_yaml::Value::from("a.mp4"), "{text}");
    assert_eq!(
        summary["batch"]["id"],
        serde_yaml::Value::from(batch),
        "{text}"
    );
    assert_eq!(
        summary["batch"]["finished"],
        serde_yaml::Value::from(1000),
        "{text}"
    );
    assert_eq!(
        summary["batch"]["name"],
        serde_yaml::Value::from("frames"),
        "{text}"
    );
}

async fn two_hundred_batches_whose_members_end_at_the_same_instant_get_two_hundred_callbacks(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let (fifo, barrier) = fifo_barrier(&db);
    let per_daemon = match backend {
        Backend::Sqlite => 400,
        Backend::Postgres | Backend::MySql => 100,
    };
    let mut daemons = start_daemons(
        &db,
        4,
        &format!(
            "max_concurrent: {per_daemon}\ntasks:\n  Wait:\n    command: [/bin/sh, -c, 'cat {} > /dev/null']\n",
            fifo.display()
        ),
    );
    let mut batches = Vec::new();
    for _ in 0..200 {
        let batch = insert_batch(&db, "on_complete", "'Done'").await;
        insert_members(&db, batch, "Wait", 2, 5).await;
        seal(&db, batch).await;
        batches.push(batch);
    }
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'RUNNING' AND pid IS NOT NULL",
        400,
        Duration::from_secs(120),
    )
    .await;
    // Give every task time to reach its read of the FIFO.
    wait_until(
        Duration::from_secs(60),
        "400 tasks blocked on the barrier",
        || count_fifo_readers(&fifo) >= 400,
    );
    drop(barrier);
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE callback_of_batch IS NOT NULL AND result = 'FINISHED'",
        200,
        Duration::from_secs(120),
    )
    .await;
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE callback_of_batch IS NOT NULL")
            .await,
        200
    );
    for batch in batches {
        assert_eq!(callbacks_of_batch(&db, batch).await, 1, "batch {batch}");
        let (stored, recount) = counters_and_recount(&db, batch).await;
        assert_eq!(stored, recount, "batch {batch}");
        assert_eq!(stored, [2, 0, 2, 0, 0], "batch {batch}");
    }
}

/// A FIFO in the test's scratch directory, and the barrier: the FIFO held
/// open for writing, so that every task's open of it returns at once and
/// its read (`cat FIFO`) waits; dropping the barrier ends every read at the
/// same instant.
pub(crate) fn fifo_barrier(db: &TestDb) -> (std::path::PathBuf, std::fs::File) {
    let fifo = db.scratch.join("barrier");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    let barrier = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    (fifo, barrier)
}

/// How many processes have `fifo` open (the tasks waiting at the barrier).
pub(crate) fn count_fifo_readers(fifo: &std::path::Path) -> usize {
    let target = std::fs::canonicalize(fifo).unwrap();
    let mut readers: usize = 0;
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        if fds
            .filter_map(|fd| fd.ok())
            .any(|fd| std::fs::read_link(fd.path()).ok().as_deref() == Some(target.as_path()))
        {
            readers += 1;
        }
    }
    // The test itself holds it open too.
    readers.saturating_sub(1)
}

async fn fail_fast_cancels_unstarted_members_and_runs_on_failure_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let batch = insert_batch(&db, "on_complete, on_failure", "'Done', 'Failed'").await;
    let mut members = Vec::new();
    for n in 1..=100 {
        let task = if n == 3 { "Boom" } else { "Slow" };
        members.push(
            db.insert_row(NewRow::new(task).batch(batch).try_limit(1))
                .await,
        );
    }
    seal(&db, batch).await;
    // Sealed before any member runs, so that member 3 fails in a sealed batch.
    let mut daemons = start_daemons(
        &db,
        1,
        "max_concurrent: 4\ntasks:\n  Slow:\n    command: [/bin/sh, -c, 'sleep 3']\n  Boom:\n    command: [/bin/sh, -c, 'echo the disk is full >&2; exit 3']\n",
    );
    let failing = members[2];
    db.wait_for_state(failing, "FAILED", Duration::from_secs(60))
        .await;
    // The failure's transaction cancelled the unstarted members and made the callback.
    let cancelled = db
        .scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE batch_id = {batch} AND result = 'CANCELLED'"
        ))
        .await;
    let started = db
        .scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE batch_id = {batch} AND result IN ('RUNNING', 'FINISHED')"
        ))
        .await;
    assert_eq!(
        cancelled + started + 1,
        100,
        "every member started or cancelled"
    );
    assert!(
        started >= 1 && cancelled >= 1,
        "started {started}, cancelled {cancelled}"
    );
    // No member was claimed after the failure (a daemon may have claimed a
    // few ahead of its free slots just before: those run, as running ones
    // do). On PostgreSQL completed_at is the failure transaction's start, and
    // a claim may commit while it runs: only SQLite's single writer makes
    // this comparison exact.
    if backend == Backend::Sqlite {
        assert_eq!(
            db.scalar(&format!(
                "SELECT count(*) FROM task_runner_requests m, task_runner_requests f \
              WHERE m.batch_id = {batch} AND f.id = {failing} AND m.started_at > f.completed_at"
            ))
            .await,
            0
        );
    }
    assert_eq!(callbacks_of_batch(&db, batch).await, 1);
    if backend == Backend::Postgres {
        // One transaction: one now() for the failure, the cancels and the batch's end.
        assert_eq!(
            db.scalar(&format!(
                "SELECT count(DISTINCT completed_at) FROM task_runner_requests WHERE batch_id = {batch} AND result IN ('CANCELLED') OR id = {failing}"
            ))
            .await,
            1
        );
    }
    // Running members finish. Members claimed ahead of a free slot (RUNNING,
    // their process not started: right after the first try ended, in 5 ms, a
    // daemon may claim up to 16 per slot) that find no slot within 1 s are
    // given back, and CANCELLED then, not claimed again: no more members
    // finish than the 4 slots held when the batch failed. (The members run
    // 3 s: the first slot frees 2 s after those give-backs.)
    db.wait_for_count(
        &format!("SELECT count(*) FROM task_runner_requests WHERE batch_id = {batch} AND result = 'RUNNING'"),
        0,
        Duration::from_secs(60),
    )
    .await;
    let count = |result: &'static str| {
        let db = &db;
        async move {
            db.scalar(&format!(
                "SELECT count(*) FROM task_runner_requests WHERE batch_id = {batch} AND result = '{result}'"
            ))
            .await
        }
    };
    let (finished, cancelled) = (count("FINISHED").await, count("CANCELLED").await);
    assert!(
        finished <= 4,
        "{finished} members finished after the batch failed"
    );
    assert_eq!(finished + cancelled + 1, 100);
    its_callback_finishes(&db, batch, Duration::from_secs(60)).await;
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    assert_eq!(callbacks_of_batch(&db, batch).await, 1);
    let callback = db
        .scalar(&format!(
            "SELECT id FROM task_runner_requests WHERE callback_of_batch = {batch}"
        ))
        .await;
    let row = db.row(taskrunner::request::RequestId(callback)).await;
    assert_eq!(row.task_class_name, "Failed");
    assert_eq!(
        row.unique_key.as_deref(),
        Some(format!("batch:{batch}:failure").as_str())
    );
    assert_eq!(row.callback_of, Some(failing.0));
    let summary: serde_yaml::Value =
        serde_yaml::from_str(row.result_text.as_deref().unwrap()).unwrap();
    assert_eq!(
        summary["batch"]["failure"]["id"],
        serde_yaml::Value::from(failing.0)
    );
    assert_eq!(
        summary["batch"]["failure"]["task"],
        serde_yaml::Value::from("Boom")
    );
    let failure_text = summary["batch"]["failure"]["result_text"].as_str().unwrap();
    assert!(failure_text.contains("the disk is full"), "{failure_text}");
    assert_eq!(batch_state(&db, batch).await, "FAILED");
    let (stored, recount) = counters_and_recount(&db, batch).await;
    assert_eq!(stored, recount);
}

/// Fail-fast lets a member that was running when its batch failed run to
/// its end; if that try fails, the member is CANCELLED, not retried (before:
/// it ran twice more, in a batch that had failed).
async fn a_member_running_when_its_batch_failed_is_not_tried_again(backend: Backend) {
    let db = TestDb::new(backend).await;
    let batch = insert_batch(&db, "on_failure", "'Failed'").await;
    let running = db
        .insert_row(NewRow::new("FailsLater").batch(batch).try_limit(3))
        .await;
    let failing = db
        .insert_row(NewRow::new("Boom").batch(batch).try_limit(1))
        .await;
    seal(&db, batch).await;
    let mut daemons = start_daemons(
        &db,
        1,
        "max_concurrent: 2\nretry_delay: 100ms\ntasks:\n  FailsLater:\n    command: [/bin/sh, -c, 'sleep 2; echo no luck >&2; exit 1']\n  Boom:\n    command: [/bin/sh, -c, 'exit 3']\n",
    );
    db.wait_for_state(failing, "FAILED", Duration::from_secs(60))
        .await;
    db.wait_for_state(running, "CANCELLED", Duration::from_secs(60))
        .await;
    let row = db.row(running).await;
    assert_eq!(row.tries, 1, "{row:?}");
    let text = row.result_text.unwrap_or_default();
    assert!(
        text.starts_with(&format!(
            "cancelled: batch {batch} has ended, so no further try\nexit status 1"
        )),
        "{text}"
    );
    assert!(text.contains("no luck"), "{text}");
    assert_eq!(batch_state(&db, batch).await, "FAILED");
    assert_eq!(callbacks_of_batch(&db, batch).await, 1);
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    let (stored, recount) = counters_and_recount(&db, batch).await;
    assert_eq!(stored, recount);
}

/// `purge` (and the retention pruner, the same statements) keeps the
/// members of a batch that has not ended: its end is judged from its
/// members, and a failed member deleted first made a batch with a failure
/// end FINISHED, with `on_complete`.
async fn purge_keeps_the_members_of_an_open_batch_until_it_ends(backend: Backend) {
    let db = TestDb::new(backend).await;
    let batch = insert_batch(
        &db,
        "on_complete, on_failure, fail_fast",
        "'Done', 'Failed', FALSE",
    )
    .await;
    // A member that failed for good two days ago, and one still to run.
    let failed = db
        .insert_row(
            NewRow::new("NoOp")
                .batch(batch)
                .exhausted(backend, 1, 2 * 86_400),
        )
        .await;
    db.insert_row(NewRow::new("NoOp").batch(batch)).await;
    let exists = async |id: taskrunner::request::RequestId| {
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {id}"
        ))
        .await
    };
    let (status, _, stderr) = cli(&db, &["purge", "--older-than", "1h"]);
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        exists(failed).await,
        1,
        "a member of an open batch was purged"
    );
    seal(&db, batch).await;
    let mut daemons = start_daemons(&db, 1, "tasks:\n");
    its_callback_finishes(&db, batch, Duration::from_secs(60)).await;
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    assert_eq!(batch_state(&db, batch).await, "FAILED");
    let callback = db
        .scalar(&format!(
            "SELECT id FROM task_runner_requests WHERE callback_of_batch = {batch}"
        ))
        .await;
    let callback = db.row(taskrunner::request::RequestId(callback)).await;
    assert_eq!(callback.task_class_name, "Failed");
    // The batch has ended: now its old member goes.
    let (status, _, stderr) = cli(&db, &["purge", "--older-than", "1h"]);
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(exists(failed).await, 0);
}

async fn batch_sealed_by_plain_sql_after_its_members_ended_gets_its_callback_within_a_poll(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let mut daemons = start_daemons(&db, 1, "max_concurrent: 4\ntasks:\n");
    let batch = insert_batch(&db, "on_complete", "'Done'").await;
    insert_members(&db, batch, "NoOp", 3, 5).await;
    db.wait_for_count(
        &format!("SELECT count(*) FROM task_runner_requests WHERE batch_id = {batch} AND result = 'FINISHED'"),
        3,
        Duration::from_secs(60),
    )
    .await;
    // Not sealed: no callback, for a poll and more.
    callbacks_stay(&db, batch, 0, Duration::from_millis(1500)).await;
    assert_eq!(batch_state(&db, batch).await, "NULL");
    seal(&db, batch).await;
    let sealed = Instant::now();
    // poll_interval is 1s: within a poll (and some margin for a loaded machine).
    db.wait_for_count(
        &format!("SELECT count(*) FROM task_runner_requests WHERE callback_of_batch = {batch}"),
        1,
        Duration::from_secs(3),
    )
    .await;
    println!(
        "sealed by hand after its members ended: callback {:.2}s later",
        sealed.elapsed().as_secs_f64()
    );
    assert_eq!(batch_state(&db, batch).await, "FINISHED");
    its_callback_finishes(&db, batch, Duration::from_secs(30)).await;
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    assert_eq!(callbacks_of_batch(&db, batch).await, 1);
}

/// While anything was paused, the daemon read the pauses each second, and
/// each reading put the poll off by another `poll_interval`: the poll never
/// came. On PostgreSQL and MariaDB (no trigger wakes the daemon for a
/// batch's row) a batch sealed by plain SQL after its members ended never
/// got its callback.
async fn batch_sealed_by_plain_sql_gets_its_callback_within_a_poll_while_a_queue_is_paused(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let (status, out, err) = cli(&db, &["pause", "--queue", "elsewhere"]);
    assert_eq!(status, 0, "{out}{err}");
    let mut daemons = start_daemons(&db, 1, "poll_interval: 3s\ntasks:\n");
    let batch = insert_batch(&db, "on_complete", "'Done'").await;
    insert_members(&db, batch, "NoOp", 1, 5).await;
    db.wait_for_count(
        &format!("SELECT count(*) FROM task_runner_requests WHERE batch_id = {batch} AND result = 'FINISHED'"),
        1,
        Duration::from_secs(60),
    )
    .await;
    // Not sealed: no callback, while the pauses are read each second.
    callbacks_stay(&db, batch, 0, Duration::from_millis(1500)).await;
    seal(&db, batch).await;
    // Within a poll, and a margin for a loaded machine.
    db.wait_for_count(
        &format!("SELECT count(*) FROM task_runner_requests WHERE callback_of_batch = {batch}"),
        1,
        Duration::from_secs(6),
    )
    .await;
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
}

async fn member_retried_by_hand_after_its_batch_failed_makes_no_second_callback(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ok = db.scratch.join("ok");
    let mut daemons = start_daemons(
        &db,
        1,
        &format!(
            "max_concurrent: 4\ntasks:\n  Flaky:\n    command: [/bin/sh, -c, 'test -e {}']\n",
            ok.display()
        ),
    );
    let batch = insert_batch(
        &db,
        "on_complete, on_failure, fail_fast",
        "'Done', 'Failed', FALSE",
    )
    .await;
    insert_members(&db, batch, "NoOp", 2, 5).await;
    let flaky = db
        .insert_row(NewRow::new("Flaky").batch(batch).try_limit(1))
        .await;
    seal(&db, batch).await;
    its_callback_finishes(&db, batch, Duration::from_secs(60)).await;
    assert_eq!(batch_state(&db, batch).await, "FAILED");
    // Now it would succeed: retried by hand, it finishes, and the batch's
    // counts follow, but the batch has ended: no second callback.
    std::fs::write(&ok, "").unwrap();
    let (status, _, stderr) = cli(&db, &["retry", &flaky.to_string()]);
    assert_eq!(status, 0, "{stderr}");
    db.wait_for_state(flaky, "FINISHED", Duration::from_secs(60))
        .await;
    // A repair pass or two (every poll) must not add one either.
    callbacks_stay(&db, batch, 1, Duration::from_secs(2)).await;
    // And again by plain SQL.
    db.execute(&format!(
        "UPDATE task_runner_requests SET result = NULL, pid = NULL, tries = 0 WHERE id = {flaky}"
    ))
    .await;
    db.wait_for_state(flaky, "FINISHED", Duration::from_secs(60))
        .await;
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    assert_eq!(callbacks_of_batch(&db, batch).await, 1);
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE unique_key = 'batch:{batch}:complete'"
        ))
        .await,
        0
    );
    let (stored, recount) = counters_and_recount(&db, batch).await;
    assert_eq!(stored, recount);
    assert_eq!(batch_state(&db, batch).await, "FAILED");
}

async fn on_failure_runs_once_after_the_last_try_and_never_on_cancel(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemons = start_daemons(
        &db,
        1,
        "max_concurrent: 4\nretry_delay: 200ms\nretry_multiplier: 1\ntasks:\n  Boom:\n    command: [/bin/sh, -c, 'echo try $TASKRUNNER_TRY failed >&2; exit 1']\n  Slow:\n    command: [/bin/sh, -c, 'sleep 30']\n",
    );
    let boom = db
        .insert_row(
            NewRow::new("Boom")
                .try_limit(3)
                .on_failure("Alert")
                .on_success("Done"),
        )
        .await;
    db.wait_for(boom, Duration::from_secs(60), "failed twice", |row| {
        row.tries == 2 && row.result.as_deref() == Some("FAILED")
    })
    .await;
    let callbacks = format!("SELECT count(*) FROM task_runner_requests WHERE callback_of = {boom}");
    assert_eq!(
        db.scalar(&callbacks).await,
        0,
        "no callback while tries remain"
    );
    db.wait_for(boom, Duration::from_secs(60), "exhausted", |row| {
        row.tries == 3 && row.result.as_deref() == Some("FAILED")
    })
    .await;
    db.wait_for_count(&callbacks, 1, Duration::from_secs(10))
        .await;
    let alert = db
        .scalar(&format!(
            "SELECT id FROM task_runner_requests WHERE callback_of = {boom}"
        ))
        .await;
    let alert = db
        .wait_for_state(
            taskrunner::request::RequestId(alert),
            "FINISHED",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(alert.task_class_name, "Alert");
    assert_eq!(
        alert.unique_key.as_deref(),
        Some(format!("request:{boom}:failure").as_str())
    );
    let options: serde_yaml::Value =
        serde_yaml::from_str(alert.result_text.as_deref().unwrap()).unwrap();
    assert_eq!(options["parent"]["id"], serde_yaml::Value::from(boom.0));
    assert_eq!(
        options["parent"]["result"],
        serde_yaml::Value::from("FAILED")
    );
    assert!(options["parent"]["result_text"]
        .as_str()
        .unwrap()
        .contains("try 3 failed"));

    // Cancelled before it ran, and while it ran: no callback either way.
    let pending = db
        .insert_row(
            NewRow::new("Slow")
                .delay_until("2999-01-01 00:00:00")
                .on_failure("Alert")
                .on_success("Done"),
        )
        .await;
    let (status, _, stderr) = cli(&db, &["cancel", &pending.to_string()]);
    assert_eq!(status, 0, "{stderr}");
    let running = db
        .insert_row(NewRow::new("Slow").on_failure("Alert").on_success("Done"))
        .await;
    db.wait_for(running, Duration::from_secs(30), "running", |row| {
        row.pid.is_some()
    })
    .await;
    let (status, _, stderr) = cli(&db, &["cancel", &running.to_string()]);
    assert_eq!(status, 0, "{stderr}");
    db.wait_for_state(running, "CANCELLED", Duration::from_secs(30))
        .await;
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    assert_eq!(db.row(pending).await.result.as_deref(), Some("CANCELLED"));
    assert_eq!(db.scalar(&callbacks).await, 1);
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE callback_of IN ({pending}, {running})"
        ))
        .await,
        0
    );
}

async fn on_success_sees_the_parent_result_text(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemons = start_daemons(&db, 1, "max_concurrent: 2\ntasks:\n");
    let parent = db
        .insert_row(
            NewRow::new("NoOp")
                .options("created_from: psql")
                .on_success("Done")
                .on_failure("Alert"),
        )
        .await;
    let done = db
        .finished_callback_of(parent, Duration::from_secs(30))
        .await;
    let callbacks =
        format!("SELECT count(*) FROM task_runner_requests WHERE callback_of = {parent}");
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    assert_eq!(db.scalar(&callbacks).await, 1);
    assert_eq!(done.task_class_name, "Done");
    let options: serde_yaml::Value =
        serde_yaml::from_str(done.result_text.as_deref().unwrap()).unwrap();
    // The parent's own options, and the parent.
    assert_eq!(options["created_from"], serde_yaml::Value::from("psql"));
    assert_eq!(
        options["parent"]["result_text"],
        serde_yaml::Value::from(format!("NOOP {parent}: OK! created from: psql"))
    );
    assert_eq!(options["parent"]["task"], serde_yaml::Value::from("NoOp"));
    // `show` names the callback's parent.
    let (_, shown, _) = cli(&db, &["show", &done.id.to_string()]);
    assert!(
        shown.contains(&format!("callback_of          {parent}")),
        "{shown}"
    );
}

/// A callback's options hold the parent's options twice (merged, and as
/// text) and its output: with options and output each well under
/// `max_options`, they would be over it, and the callback could never run.
async fn a_callback_whose_options_would_pass_max_options_runs_with_the_parents_output_cut(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let mut daemons = start_daemons(
        &db,
        1,
        "max_options: 64KiB\noutput_tail: 128KiB\ntasks:\n  Loud:\n    command: [/bin/sh, -c, \"head -c 40000 /dev/zero | tr '\\\\0' x; echo the end\"]\n",
    );
    let note = "y".repeat(30_000);
    let parent = db
        .insert_row(
            NewRow::new("Loud")
                .options(&format!("note: {note}"))
                .on_success("Done"),
        )
        .await;
    let done = db
        .finished_callback_of(parent, Duration::from_secs(30))
        .await;
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    // `Done` prints its options.
    let printed = done.result_text.as_deref().unwrap();
    assert!(printed.len() <= 64 * 1024, "{}", printed.len());
    let options: serde_yaml::Value = serde_yaml::from_str(printed).unwrap();
    assert_eq!(options["note"], serde_yaml::Value::from(note));
    assert_eq!(options["parent"]["id"], serde_yaml::Value::from(parent.0));
    assert_eq!(options["parent"]["options"], serde_yaml::Value::Null);
    assert_eq!(
        options["parent"]["cut"],
        serde_yaml::Value::from(vec!["options", "result_text"])
    );
    let text = options["parent"]["result_text"].as_str().unwrap();
    assert!(
        text.starts_with("…x") && text.ends_with("xthe end") && text.len() > 20_000,
        "{} bytes: {:?} … {:?}",
        text.len(),
        &text[..10],
        &text[text.len() - 20..]
    );
}

async fn on_exhausted_in_the_config_alerts_once_per_exhausted_request(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemons = start_daemons(
        &db,
        1,
        "max_concurrent: 2\non_exhausted: Alert\ntasks:\n  Boom:\n    command: [/bin/sh, -c, 'exit 1']\n  Own:\n    command: [/bin/sh, -c, 'exit 1']\n    on_exhausted: Done\n",
    );
    let boom = db.insert_row(NewRow::new("Boom").try_limit(1)).await;
    let own = db.insert_row(NewRow::new("Own").try_limit(1)).await;
    let rejected = db
        .insert_row(NewRow::new("NoOp").options("key: [unclosed"))
        .await;
    let fine = db.enqueue("NoOp", None).await;
    for id in [boom, own, rejected] {
        db.wait_for_count(
            &format!("SELECT count(*) FROM task_runner_requests WHERE callback_of = {id} AND result = 'FINISHED'"),
            1,
            Duration::from_secs(30),
        )
        .await;
    }
    db.wait_for_state(fine, "FINISHED", Duration::from_secs(30))
        .await;
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    let hook = |id: taskrunner::request::RequestId| {
        format!("SELECT count(*) FROM task_runner_requests WHERE callback_of = {id} AND task_class_name = ")
    };
    assert_eq!(db.scalar(&format!("{}'Alert'", hook(boom))).await, 1);
    assert_eq!(db.scalar(&format!("{}'Done'", hook(own))).await, 1);
    assert_eq!(db.scalar(&format!("{}'Alert'", hook(rejected))).await, 1);
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE callback_of = {fine}"
        ))
        .await,
        0
    );
    // Four rows and three callbacks: the alerts raised no alerts of their own.
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        7
    );
}

/// `on_exhausted` added by a reload while a try of its type runs: that
/// try's exhaustion made no alert. Whether an outcome takes the path that
/// makes what it causes was read from the config the try was claimed
/// under, where the rule did not exist yet; the outcome was written plain.
/// Now it is read from the config of the try's end.
async fn an_on_exhausted_rule_added_by_a_reload_alerts_for_a_try_that_was_running(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let go = db.scratch.join("go");
    let tasks = format!(
        "tasks:\n  Boom:\n    command: [/bin/sh, -c, 'until [ -e {} ]; do sleep 0.02; done; exit 1']\n",
        go.display()
    );
    let mut daemon = Daemon::start(&db, "d", &tasks);
    let boom = db.insert_row(NewRow::new("Boom").try_limit(1)).await;
    db.wait_for_pid(boom, Duration::from_secs(30)).await;
    daemon.reload_with(&db, &format!("on_exhausted: NoOp\n{tasks}"));
    daemon.wait_for_log("config reloaded", Duration::from_secs(30));
    std::fs::write(&go, "").unwrap();
    db.wait_for_state(boom, "FAILED", Duration::from_secs(30))
        .await;
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE callback_of = {boom} AND result = 'FINISHED'"
        ),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(daemon.stop().success());
}

async fn daemon_killed_between_the_task_exit_and_its_outcome_write_makes_one_callback(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let marker = db.scratch.join("exited");
    let extra = format!(
        "max_concurrent: 2\ntasks:\n  Work:\n    command: [/bin/sh, -c, 'sleep 1; echo $TASKRUNNER_TRY >> {}']\n",
        marker.display()
    );
    let mut daemons = start_daemons(&db, 1, &extra);
    let work = db
        .insert_row(NewRow::new("Work").on_success("Done").try_limit(3))
        .await;
    // Running with its pid recorded: a try whose process was never
    // recorded is given back uncounted by the reaper, which is not the case
    // under test.
    db.wait_for(work, Duration::from_secs(30), "running", |row| {
        row.result.as_deref() == Some("RUNNING") && row.pid.is_some()
    })
    .await;
    // Hold the row (PostgreSQL) or the database (SQLite), so that the
    // outcome cannot be written once the task has exited.
    let hold = Hold::take(&db, work).await;
    wait_until(Duration::from_secs(30), "the task to exit", || {
        marker.exists()
    });
    daemons[0].wait_for_log("finished", Duration::from_secs(30));
    daemons[0].kill();
    hold.release().await;
    assert_eq!(db.row(work).await.result.as_deref(), Some("RUNNING"));
    // A restarted daemon reaps the row and runs it again: one callback.
    let mut restarted = daemons[0].restart();
    db.wait_for_state(work, "FINISHED", Duration::from_secs(60))
        .await;
    let callbacks = format!("SELECT count(*) FROM task_runner_requests WHERE callback_of = {work}");
    db.wait_for_count(
        &format!("{callbacks} AND result = 'FINISHED'"),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(restarted.stop().success());
    assert_eq!(db.scalar(&callbacks).await, 1);
    assert_eq!(db.row(work).await.tries, 2);
}

/// A lock that keeps the daemon from writing an outcome (also used by
/// tests/recording.rs).
pub(crate) enum Hold {
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>, sqlx::SqlitePool),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    MySql(sqlx::Transaction<'static, sqlx::MySql>),
}

impl Hold {
    pub(crate) async fn take(db: &TestDb, id: taskrunner::request::RequestId) -> Hold {
        match db.backend {
            Backend::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
                let mut connection = pool.acquire().await.unwrap();
                sqlx::raw_sql("BEGIN IMMEDIATE")
                    .execute(&mut *connection)
                    .await
                    .unwrap();
                Hold::Sqlite(connection, pool)
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
                let mut transaction = pool.begin().await.unwrap();
                sqlx::query("SELECT id FROM task_runner_requests WHERE id = $1 FOR UPDATE")
                    .bind(id.0)
                    .execute(&mut *transaction)
                    .await
                    .unwrap();
                Hold::Postgres(transaction)
            }
            Backend::MySql => {
                let pool = crate::util::mysql_app_pool(&db.url).await;
                let mut transaction = pool.begin().await.unwrap();
                sqlx::query("SELECT id FROM task_runner_requests WHERE id = ? FOR UPDATE")
                    .bind(id.0)
                    .execute(&mut *transaction)
                    .await
                    .unwrap();
                Hold::MySql(transaction)
            }
        }
    }

    pub(crate) async fn release(self) {
        match self {
            Hold::Sqlite(mut connection, pool) => {
                sqlx::raw_sql("ROLLBACK")
                    .execute(&mut *connection)
                    .await
                    .unwrap();
                drop(connection);
                pool.close().await;
            }
            Hold::Postgres(transaction) => transaction.rollback().await.unwrap(),
            Hold::MySql(transaction) => transaction.rollback().await.unwrap(),
        }
    }
}

async fn chain_of_three_batches_each_created_by_the_previous_on_complete(backend: Backend) {
    let db = TestDb::new(backend).await;
    // The callback reads its options (the batch's `depth:` and the `batch:`
    // summary) and, until depth 3, creates the next batch with the CLI.
    let cli_line = format!("{CLI} --database-url {}", db.url);
    let next = format!(
        "depth=$(sed -n \"s/^depth: *//p\"); if [ \"$depth\" -lt 3 ]; then \
         b=$({cli_line} batch create --open --parent $TASKRUNNER_BATCH_ID --on-complete Next --options \"depth: $((depth + 1))\") && \
         {cli_line} enqueue NoOp --batch $b >/dev/null && {cli_line} batch seal $b; fi; echo depth $depth"
    );
    let mut daemons = start_daemons(
        &db,
        1,
        &format!(
            "max_concurrent: 2\ntasks:\n  Next:\n    command: [/bin/sh, -c, {}]\n",
            serde_yaml::to_string(&next).unwrap().trim()
        ),
    );
    let (status, first, stderr) = cli(
        &db,
        &[
            "batch",
            "create",
            "--open",
            "--on-complete",
            "Next",
            "--options",
            "depth: 1",
            "--name",
            "first",
        ],
    );
    assert_eq!(status, 0, "{stderr}");
    let first: i64 = first.trim().parse().unwrap();
    for _ in 0..2 {
        let (status, _, stderr) = cli(&db, &["enqueue", "NoOp", "--batch", &first.to_string()]);
        assert_eq!(status, 0, "{stderr}");
    }
    let (status, _, stderr) = cli(&db, &["batch", "seal", &first.to_string()]);
    assert_eq!(status, 0, "{stderr}");
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE task_class_name = 'Next' AND result = 'FINISHED'",
        3,
        Duration::from_secs(90),
    )
    .await;
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_batches").await,
        3
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_batches WHERE state = 'FINISHED'")
            .await,
        3
    );
    let second = db
        .scalar(&format!(
            "SELECT id FROM task_runner_batches WHERE parent_batch_id = {first}"
        ))
        .await;
    let third = db
        .scalar(&format!(
            "SELECT id FROM task_runner_batches WHERE parent_batch_id = {second}"
        ))
        .await;
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_batches WHERE parent_batch_id = {third}"
        ))
        .await,
        0
    );
    for batch in [first, second, third] {
        assert_eq!(callbacks_of_batch(&db, batch).await, 1, "batch {batch}");
    }
    // The CLI draws each batch's progress and names its callback.
    let (status, shown, _) = cli(&db, &["batch", "show", &first.to_string()]);
    assert_eq!(status, 0);
    assert!(
        shown.contains(
            "batch {first} (first): FINISHED"
                .replace("{first}", &first.to_string())
                .as_str()
        ),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("[{}] 2/2 ended", "#".repeat(40))),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("Next  FINISHED  batch:{first}:complete")),
        "{shown}"
    );
    let (_, listed, _) = cli(&db, &["batch", "list"]);
    assert_eq!(listed.lines().count(), 4, "{listed}");
    let (_, requests, _) = cli(&db, &["list"]);
    assert!(requests.contains(&format!("[batch {first}]")), "{requests}");
    assert!(
        requests.contains(&format!("[callback of batch {first}]")),
        "{requests}"
    );
    let (_, shown, _) = cli(
        &db,
        &[
            "show",
            &db.scalar(&format!(
                "SELECT id FROM task_runner_requests WHERE callback_of_batch = {third}"
            ))
            .await
            .to_string(),
        ],
    );
    assert!(shown.contains("depth 3"), "{shown}");
    assert!(
        shown.contains(&format!("callback_of_batch    {third}")),
        "{shown}"
    );
}

async fn batch_cancel_cancels_unstarted_members_and_makes_no_callback(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (status, batch, stderr) = cli(
        &db,
        &[
            "batch",
            "create",
            "--open",
            "--on-complete",
            "Done",
            "--on-failure",
            "Failed",
        ],
    );
    assert_eq!(status, 0, "{stderr}");
    let batch = batch.trim().to_string();
    for _ in 0..3 {
        let (status, _, stderr) = cli(
            &db,
            &["enqueue", "NoOp", "--batch", &batch, "--delay", "1h"],
        );
        assert_eq!(status, 0, "{stderr}");
    }
    let (status, out, stderr) = cli(&db, &["batch", "cancel", &batch]);
    assert_eq!(status, 0, "{stderr}");
    assert!(out.contains("3 unstarted members cancelled"), "{out}");
    let batch: i64 = batch.parse().unwrap();
    assert_eq!(batch_state(&db, batch).await, "CANCELLED");
    assert_eq!(callbacks_of_batch(&db, batch).await, 0);
    let (stored, recount) = counters_and_recount(&db, batch).await;
    assert_eq!(stored, recount);
    assert_eq!(stored, [3, 0, 0, 0, 3]);
    // A final batch takes no more members: one line, nothing inserted.
    let (status, _, stderr) = cli(&db, &["enqueue", "NoOp", "--batch", &batch.to_string()]);
    assert_eq!(status, 1);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("does not exist or is final"), "{stderr}");
    let (status, _, stderr) = cli(&db, &["batch", "cancel", &batch.to_string()]);
    assert_eq!(status, 1);
    assert!(stderr.contains("already CANCELLED"), "{stderr}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        3
    );
}

/// The chaos test's strike: `kill -9` of a random daemon (restarted at
/// once, as an init system would) or of a random running task.
async fn strike(db: &TestDb, daemons: &mut [Daemon], daemon_kills: &mut u32, task_kills: &mut u32) {
    let roll = taskrunner::instance::random_u64();
    if roll % 2 == 0 {
        let n = (roll / 2 % 4) as usize;
        daemons[n].kill();
        daemons[n] = daemons[n].restart();
        *daemon_kills += 1;
    } else {
        // A random running task (0: none running at this instant).
        let pid = db
            .scalar(&format!(
                "SELECT coalesce((SELECT CAST(pid AS BIGINT) FROM task_runner_requests \
                                   WHERE result = 'RUNNING' AND pid IS NOT NULL \
                                   ORDER BY id LIMIT 1 OFFSET {}), 0)",
                roll / 2 % 8
            ))
            .await;
        if pid > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            *task_kills += 1;
        }
    }
}

// Chaos (PostgreSQL and MariaDB, four daemons): 100 batches of 20 short members while,
// every 2 s, a random daemon or a random task process is killed -9 (a
// killed daemon is restarted at once, as an init system would). Every batch
// gets exactly one final callback, no request is lost, and the delay from a
// batch's last member's end (the task's own clock) to its callback row is
// measured.
// A member's final outcome is written in a transaction that first locks its
// batch's row. That transaction's connection goes silent right after the
// lock (a network that drops packets: the server keeps the session and its
// lock). The daemon gives the call up after `lease_timeout`, but every
// retry waited on the lock the abandoned session held, and so did every
// result queued behind it, until the server noticed the dead connection
// (its TCP keepalive, two hours by default). Now the daemon's sessions
// tell the server to end a transaction left idle for `lease_timeout`
// (PostgreSQL's `idle_in_transaction_session_timeout`, MariaDB's
// `idle_transaction_timeout`), and the batch ends with one callback.
multi_host_backends!(a_batch_ends_when_a_finalization_went_silent_holding_its_lock);

async fn a_batch_ends_when_a_finalization_went_silent_holding_its_lock(backend: Backend) {
    let db = TestDb::new(backend).await;
    // The lock of the batch row, `… WHERE id = $1 FOR UPDATE` (`?` on MariaDB).
    let needle = match backend {
        Backend::MySql => "FROM task_runner_batches WHERE id = ? FOR UPDATE",
        _ => "FROM task_runner_batches WHERE id = $1 FOR UPDATE",
    };
    let proxy = Proxy::start(&db.url, Fault::SilenceOnceRun(needle)).await;
    let batch = insert_batch(&db, "on_complete", "'Done'").await;
    insert_members(&db, batch, "Work", 3, 5).await;
    seal(&db, batch).await;
    let config = format!(
        "database_url: {}\nheartbeat_interval: 500ms\nkill_grace: 1s\nlease_timeout: 3s\ntasks:\n{CALLBACK_TYPES}  Work:\n    command: [/bin/true]\n",
        proxy.url
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    wait_until(
        Duration::from_secs(30),
        "a finalization's connection to go silent",
        || proxy.tripped(),
    );
    its_callback_finishes(&db, batch, Duration::from_secs(30)).await;
    assert_eq!(batch_state(&db, batch).await, "FINISHED");
    assert_eq!(callbacks_of_batch(&db, batch).await, 1);
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE batch_id = {batch} AND result = 'FINISHED' AND tries = 1"
        ))
        .await,
        3
    );
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

multi_host_backends!(a_fail_fast_member_an_application_holds_stalls_no_other_write);

/// A member of a fail-fast batch fails while an application's transaction
/// holds another member, one the failure cancels, locked (`SELECT … FOR
/// UPDATE`, Rails' `with_lock`). The failure's end waited for that lock,
/// and every later write of the daemon waited behind it: a plain row's
/// FINISHED, its other tries' pids, up to the bound on a call
/// (`lease_timeout`), then logged as a database outage, and again at each
/// retry, for as long as the transaction lasted (the reaper's pass and the
/// batch repair pass before each claim alike). The end is now set aside
/// until the lock goes, and the rest is written.
async fn a_fail_fast_member_an_application_holds_stalls_no_other_write(backend: Backend) {
    let db = TestDb::new(backend).await;
    let boomed = db.scratch.join("boomed");
    let batch = insert_batch(&db, "on_failure, fail_fast", "'Failed', true").await;
    let boom = db
        .insert_row(NewRow::new("Boom").batch(batch).try_limit(1))
        .await;
    let later = db
        .insert_row(
            NewRow::new("Boom")
                .batch(batch)
                .try_limit(1)
                .delayed(backend, 3600),
        )
        .await;
    seal(&db, batch).await;
    let held = db.hold_row(later).await;
    let config = format!(
        "lease_timeout: 30s\ntasks:\n{CALLBACK_TYPES}  Boom:\n    command: [/bin/sh, -c, 'touch {}; exit 1']\n  Plain:\n    command: [/bin/true]\n",
        boomed.display()
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    wait_until(
        Duration::from_secs(30),
        "the failing member's try to end",
        || boomed.exists(),
    );
    let plain = db.enqueue("Plain", None).await;
    db.wait_for_state(plain, "FINISHED", Duration::from_secs(10))
        .await;
    held.release().await;
    db.wait_for_state(boom, "FAILED", Duration::from_secs(30))
        .await;
    db.wait_for_state(later, "CANCELLED", Duration::from_secs(30))
        .await;
    its_callback_finishes(&db, batch, Duration::from_secs(30)).await;
    assert_eq!(batch_state(&db, batch).await, "FAILED");
    assert_eq!(callbacks_of_batch(&db, batch).await, 1);
    let log = daemon.log_text();
    assert!(!log.contains("database unavailable"), "{log}");
    assert!(daemon.stop().success(), "{log}");
}

multi_host_backends!(a_batch_repair_pass_waits_for_no_applications_lock);

/// The same lock, met by the batch repair pass: a fail-fast batch whose
/// member failed before it was sealed, then sealed by plain SQL, ends at
/// the daemon's next pass, which cancels its unstarted members. The pass
/// runs before each claim, and waited for the application's lock: no row
/// was claimed meanwhile. The batch is now left to a later pass while the
/// lock lasts.
async fn a_batch_repair_pass_waits_for_no_applications_lock(backend: Backend) {
    let db = TestDb::new(backend).await;
    let batch = insert_batch(&db, "on_failure, fail_fast", "'Failed', true").await;
    let boom = db
        .insert_row(NewRow::new("Boom").batch(batch).try_limit(1))
        .await;
    let later = db
        .insert_row(
            NewRow::new("Boom")
                .batch(batch)
                .try_limit(1)
                .delayed(backend, 3600),
        )
        .await;
    let config = format!(
        "lease_timeout: 30s\ntasks:\n{CALLBACK_TYPES}  Boom:\n    command: [/bin/false]\n  Plain:\n    command: [/bin/true]\n"
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    db.wait_for_state(boom, "FAILED", Duration::from_secs(30))
        .await;
    let held = db.hold_row(later).await;
    seal(&db, batch).await;
    // The daemon runs a repair pass at a wake-up at most every 200 ms: the
    // row's wake-up comes after that, and its repair pass first.
    let sealed = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "the repair passes' interval",
        || sealed.elapsed() >= Duration::from_millis(500),
    );
    let plain = db.enqueue("Plain", None).await;
    db.wait_for_state(plain, "FINISHED", Duration::from_secs(10))
        .await;
    held.release().await;
    db.wait_for_state(later, "CANCELLED", Duration::from_secs(30))
        .await;
    its_callback_finishes(&db, batch, Duration::from_secs(30)).await;
    assert_eq!(batch_state(&db, batch).await, "FAILED");
    assert_eq!(callbacks_of_batch(&db, batch).await, 1);
    let log = daemon.log_text();
    assert!(!log.contains("database unavailable"), "{log}");
    assert!(daemon.stop().success(), "{log}");
}

multi_host_backends!(chaos_hundred_batches_on_four_daemons_with_kill_9_every_two_seconds);

/// What the chaos test saw while it waited: how many batches had ended
/// with a FINISHED callback and, once most had, the first callback row that
/// has not FINISHED (a timeout then shows why).
async fn unended_callbacks(db: &TestDb, ended: i64) -> String {
    let unfinished = "FROM task_runner_requests WHERE callback_of_batch IS NOT NULL \
                      AND (result IS NULL OR result <> 'FINISHED')";
    if ended < 95 {
        return format!("{ended} batches ended");
    }
    let count = db.scalar(&format!("SELECT count(*) {unfinished}")).await;
    let first = db
        .scalar(&format!("SELECT coalesce(min(id), 0) {unfinished}"))
        .await;
    let row = match first {
        0 => "none".to_string(),
        id => format!("{:#?}", db.row(taskrunner::request::RequestId(id)).await),
    };
    format!("{ended} batches ended; {count} callbacks not FINISHED, the first: {row}")
}

async fn chaos_hundred_batches_on_four_daemons_with_kill_9_every_two_seconds(backend: Backend) {
    // Ten members a batch: the hundred batch ends the chaos strikes at are
    // what the test is about; twenty members took twice as long (about
    // 135 s of the suite's time each backend) for no more ends.
    const MEMBERS: usize = 10;
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("ends.log");
    let extra = format!(
        "max_concurrent: 6\nreap_interval: 1s\nretry_delay: 100ms\nretry_multiplier: 1\ntasks:\n  Work:\n    command: [/bin/sh, -c, 'sleep 0.05; echo $TASKRUNNER_REQUEST_ID $(date +%s%N) >> {}']\n",
        log.display()
    );
    let mut daemons = start_daemons(&db, 4, &extra);
    let mut batches = Vec::new();
    for _ in 0..100 {
        let batch = insert_batch(&db, "on_complete, on_failure", "'Done', 'Failed'").await;
        insert_members(&db, batch, "Work", MEMBERS, 20).await;
        seal(&db, batch).await;
        batches.push(batch);
    }
    let started = Instant::now();
    let (mut daemon_kills, mut task_kills) = (0, 0);
    let all_done = "SELECT count(*) FROM task_runner_batches b WHERE state IS NOT NULL \
                      AND EXISTS (SELECT 1 FROM task_runner_requests c \
                                   WHERE c.callback_of_batch = b.id AND c.result = 'FINISHED')";
    let mut first_check = true;
    // Checked every 2 s; between two checks the chaos strikes once.
    poll_every(
        Duration::from_secs(2),
        Duration::from_secs(300),
        "every batch to end",
        async || {
            if !std::mem::take(&mut first_check) {
                strike(&db, &mut daemons, &mut daemon_kills, &mut task_kills).await;
            }
            match db.scalar(all_done).await {
                100.. => Ok(()),
                ended => Err(unended_callbacks(&db, ended).await),
            }
        },
    )
    .await;
    let took = started.elapsed();
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
    // Exactly one final callback per batch, and no request lost.
    let mut completed = 0;
    for &batch in &batches {
        assert_eq!(callbacks_of_batch(&db, batch).await, 1, "batch {batch}");
        let (stored, recount) = counters_and_recount(&db, batch).await;
        assert_eq!(stored, recount, "batch {batch}");
        assert_eq!(stored[0], MEMBERS as i64, "batch {batch}");
        assert_eq!(stored[1], 0, "batch {batch}: every member final");
        if batch_state(&db, batch).await == "FINISHED" {
            completed += 1;
        }
    }
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE batch_id IS NOT NULL AND {OPEN}"
        ))
        .await,
        0
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE callback_of_batch IS NOT NULL AND result = 'FINISHED'")
            .await,
        100
    );
    // The delay from the last member's end (its own clock, same host) to
    // its callback row, for the batches that completed.
    let mut ends: std::collections::HashMap<i64, u128> = std::collections::HashMap::new();
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        let mut parts = line.split_whitespace();
        let (Some(id), Some(at)) = (parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(id), Ok(at)) = (id.parse::<i64>(), at.parse::<u128>()) else {
            continue;
        };
        let end = ends.entry(id).or_default();
        *end = (*end).max(at);
    }
    let mut members_of: std::collections::HashMap<i64, Vec<i64>> = Default::default();
    for row in db
        .store
        .list(taskrunner::store::ListFilter::All, 100_000)
        .await
        .unwrap()
    {
        if let Some(batch) = row.batch_id {
            members_of.entry(batch).or_default().push(row.id);
        }
    }
    let mut delays_ms = Vec::new();
    for &batch in &batches {
        if batch_state(&db, batch).await != "FINISHED" {
            continue;
        }
        let last_end = members_of[&batch]
            .iter()
            .map(|id| ends.get(id).copied().unwrap_or(0))
            .max()
            .unwrap_or(0);
        let epoch_us = match backend {
            Backend::MySql => {
                "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', created_at)".to_string()
            }
            Backend::Sqlite | Backend::Postgres => {
                "CAST(extract(epoch from created_at) * 1000000 AS BIGINT)".to_string()
            }
        };
        let callback_at_us = db
            .scalar(&format!(
                "SELECT {epoch_us} FROM task_runner_requests WHERE callback_of_batch = {batch}"
            ))
            .await as u128;
        delays_ms.push((callback_at_us as f64 - (last_end / 1000) as f64) / 1000.0);
    }
    delays_ms.sort_by(|a, b| a.total_cmp(b));
    let percentile = |p: f64| delays_ms[((delays_ms.len() - 1) as f64 * p).round() as usize];
    println!(
        "chaos ({backend:?}): 100 batches x {MEMBERS} members on 4 daemons in {:.1}s; {daemon_kills} daemons and {task_kills} tasks killed -9; \
         100 callbacks found ({completed} on_complete, {} on_failure); last member's end -> callback row: p50 {:.0} ms, p99 {:.0} ms (max {:.0} ms)",
        took.as_secs_f64(),
        100 - completed,
        percentile(0.5),
        percentile(0.99),
        delays_ms.last().copied().unwrap_or_default()
    );
    assert!(completed > 0);
}

/// taskrunner's tables in a PostgreSQL schema of their own (the daemon's
/// URL or role sets `search_path`), and an application whose sessions do
/// not have that schema on their path, naming the tables with it: each
/// member's insert failed (`relation "task_runner_batches" does not
/// exist`), because the trigger that counts members looked the batch table
/// up on the application's path. Migration 0013 sets the trigger's path to
/// its own schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_inserted_by_an_application_naming_the_tables_schema_are_counted_and_run() {
    let plain = TestDb::unmigrated(Backend::Postgres).await;
    plain.execute("CREATE SCHEMA jobs").await;
    let db = TestDb::on_server(&format!("{}?options=-c%20search_path%3Djobs", plain.url)).await;
    let app = sqlx::PgPool::connect(&plain.url).await.unwrap();
    let app_path: String = sqlx::query_scalar("SELECT current_setting('search_path')")
        .fetch_one(&app)
        .await
        .unwrap();
    assert!(!app_path.contains("jobs"), "{app_path}");

    let batch: i64 = sqlx::query_scalar(
        "INSERT INTO jobs.task_runner_batches (on_complete) VALUES ('Done') RETURNING id",
    )
    .fetch_one(&app)
    .await
    .unwrap();
    for member in 0..3 {
        sqlx::query(
            "INSERT INTO jobs.task_runner_requests (task_class_name, options, batch_id) \
             VALUES ('NoOp', $1, $2)",
        )
        .bind(format!("member: {member}"))
        .bind(batch)
        .execute(&app)
        .await
        .expect("a member named with its schema is inserted");
    }
    sqlx::query("UPDATE jobs.task_runner_batches SET sealed_at = now() WHERE id = $1")
        .bind(batch)
        .execute(&app)
        .await
        .unwrap();

    let mut daemon = start_daemons(&db, 1, "tasks:\n").remove(0);
    let ended = format!(
        "SELECT count(*) FROM task_runner_batches WHERE id = {batch} AND state = 'FINISHED'"
    );
    db.wait_for_count(&ended, 1, Duration::from_secs(30)).await;
    assert_eq!(callbacks_of_batch(&db, batch).await, 1);
    assert_eq!(
        counters_and_recount(&db, batch).await.0,
        counters_and_recount(&db, batch).await.1
    );
    let in_public = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'task_runner%'";
    assert_eq!(db.scalar(in_public).await, 0);
    assert!(daemon.stop().success());
}

/// An application that gives a row its callbacks in a second statement
/// (`create!`, then `update!(on_success: ...)`), which a daemon claimed in
/// between: the row's end makes the callback all the same, alone or with
/// other outcomes written together. Before, the outcome of a row claimed
/// without callbacks was written plainly, and the callback never made.
async fn a_callback_given_to_a_running_row_is_made_at_its_end(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemons = start_daemons(
        &db,
        1,
        "max_concurrent: 4\ntasks:\n  Slow:\n    command: [/bin/sh, -c, 'sleep 1; echo did']\n",
    );
    for together in [1, 3] {
        let mut parents = Vec::new();
        for _ in 0..together {
            parents.push(db.insert_row(NewRow::new("Slow")).await);
        }
        for &parent in &parents {
            db.wait_for_pid(parent, Duration::from_secs(30)).await;
            db.execute(&format!(
                "UPDATE task_runner_requests SET on_success = 'Done' WHERE id = {parent}"
            ))
            .await;
        }
        for parent in parents {
            let done = db
                .finished_callback_of(parent, Duration::from_secs(30))
                .await;
            assert_eq!(done.task_class_name, "Done");
            assert_eq!(db.row(parent).await.result.as_deref(), Some("FINISHED"));
        }
    }
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
}

multi_host_backends!(an_application_adding_members_holds_up_only_its_batchs_outcomes);

/// An application adds a member to a batch in a transaction it keeps open
/// (the member's insert counts it in the batch's row, so that row stays
/// locked until the application commits) while another member of the
/// batch ends: that member's finalization needs the batch's lock. Before,
/// the daemon's recorder waited for it, and no other try's outcome was
/// recorded until the application committed (the call given up and
/// retried at each `lease_timeout`). Now that one outcome is set aside and
/// tried again, the others are recorded meanwhile, and once the
/// application commits the batch ends with one callback. (Not SQLite: an
/// application's write transaction there holds every writer alike.)
async fn an_application_adding_members_holds_up_only_its_batchs_outcomes(backend: Backend) {
    let db = TestDb::new(backend).await;
    // The first member ends once the application's transaction is open.
    let open = db.scratch.join("open");
    let mut daemons = start_daemons(
        &db,
        1,
        &format!(
            "max_concurrent: 4\ntasks:\n  Brief:\n    command: [/bin/sh, -c, 'until [ -e {} ]; do sleep 0.05; done']\n",
            open.display()
        ),
    );
    let batch = insert_batch(&db, "on_complete", "'Done'").await;
    insert_members(&db, batch, "Brief", 1, 5).await;
    let first = taskrunner::request::RequestId(
        db.scalar(&format!(
            "SELECT id FROM task_runner_requests WHERE batch_id = {batch}"
        ))
        .await,
    );
    let pid = db
        .wait_for_pid(first, Duration::from_secs(30))
        .await
        .pid
        .unwrap() as i32;
    let adding = db
        .hold_after(&NewRow::new("Brief").batch(batch).insert_sql())
        .await;
    std::fs::write(&open, "").unwrap();
    // The first member ends meanwhile, and then a row of no batch runs.
    wait_until(Duration::from_secs(30), "the first member's end", || {
        !process_exists(pid)
    });
    set_aside_while_others_are_recorded(&db, &daemons[0], first, &format!("batch {batch}")).await;
    adding.release().await;
    seal(&db, batch).await;
    its_callback_finishes(&db, batch, Duration::from_secs(30)).await;
    assert_eq!(batch_state(&db, batch).await, "FINISHED");
    assert_eq!(callbacks_of_batch(&db, batch).await, 1);
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE batch_id = {batch} AND result = 'FINISHED' AND tries = 1"
        ))
        .await,
        2
    );
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
}

/// An application wrote a batch's counter at its column's limit (the
/// largest INTEGER: 32 bits on PostgreSQL and MariaDB, 64 on SQLite). A
/// member's end counts it one further: PostgreSQL and MariaDB refused
/// that, the finalization failed at every retry, and no outcome of the
/// daemon was recorded after it (SQLite coped). Now a counter at its limit
/// stays there, and the batch's end counts its members afresh.
async fn a_batch_counter_an_application_wrote_at_its_limit_holds_up_no_outcome(backend: Backend) {
    let db = TestDb::new(backend).await;
    let limit = match backend {
        Backend::Sqlite => i64::MAX,
        Backend::Postgres | Backend::MySql => i64::from(i32::MAX),
    };
    let mut daemons = start_daemons(&db, 1, "tasks:\n");
    let batch = insert_batch(&db, "on_complete, finished", &format!("'Done', {limit}")).await;
    insert_members(&db, batch, "NoOp", 2, 5).await;
    seal(&db, batch).await;
    its_callback_finishes(&db, batch, Duration::from_secs(30)).await;
    assert_eq!(batch_state(&db, batch).await, "FINISHED");
    let (stored, recounted) = counters_and_recount(&db, batch).await;
    assert_eq!(stored, recounted, "the end counted the members afresh");
    let after = db.enqueue("NoOp", None).await;
    let row = db
        .wait_for_state(after, "FINISHED", Duration::from_secs(30))
        .await;
    assert_eq!(row.tries, 1, "{row:?}");
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
}

/// An application that inserts a row first and sets its `batch_id` in a
/// second statement. Before, only an insert counted a member: the row
/// joined by the UPDATE was left out of the batch's counts (its progress
/// showed a member fewer until the end counted them afresh), and a row
/// could join an ended batch unnoticed. Now it is counted as it joins, and
/// the batch still waits for every member; a final row or a flow's step
/// cannot join, and a member cannot leave its batch or move to another
/// (each refused with one error, the row unchanged).
async fn a_row_joining_a_batch_by_update_is_counted_and_a_member_stays_in_its_batch(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let gate = |name: &str| {
        let file = db.scratch.join(name);
        let task = format!(
            "    command: [/bin/sh, -c, 'until [ -e {} ]; do sleep 0.05; done']\n",
            file.display()
        );
        (file, task)
    };
    let (first_gate, first_task) = gate("first");
    let (joined_gate, joined_task) = gate("joined");
    let mut daemons = start_daemons(
        &db,
        1,
        &format!("max_concurrent: 4\ntasks:\n  First:\n{first_task}  Joined:\n{joined_task}"),
    );
    let batch = insert_batch(&db, "on_complete", "'Done'").await;
    insert_members(&db, batch, "First", 1, 1).await;
    let joined = db.insert_row(NewRow::new("Joined")).await;
    db.wait_for_pid(joined, Duration::from_secs(30)).await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET batch_id = {batch} WHERE id = {joined}"
    ))
    .await;
    seal(&db, batch).await;
    let (stored, recounted) = counters_and_recount(&db, batch).await;
    assert_eq!(stored, recounted, "the joined row is counted");
    std::fs::write(&joined_gate, "").unwrap();
    db.wait_for_state(joined, "FINISHED", Duration::from_secs(30))
        .await;
    assert_eq!(
        batch_state(&db, batch).await,
        "NULL",
        "the batch waits for its other member"
    );
    assert_eq!(callbacks_of_batch(&db, batch).await, 0);
    std::fs::write(&first_gate, "").unwrap();
    its_callback_finishes(&db, batch, Duration::from_secs(30)).await;
    assert_eq!(batch_state(&db, batch).await, "FINISHED");
    let (stored, recounted) = counters_and_recount(&db, batch).await;
    assert_eq!(stored, recounted);
    assert_eq!(stored[0], 2, "{stored:?}");

    // Refused, each with one error and nothing changed: a flow's step
    // joining, a member leaving or moving, a final row joining, a row
    // joining an ended batch.
    let other = insert_batch(&db, "name", "'other'").await;
    let finished = db.enqueue("NoOp", None).await;
    db.wait_for_state(finished, "FINISHED", Duration::from_secs(30))
        .await;
    let waiting = db
        .insert_row(NewRow::new("NoOp").sql("delay_until", sql_now_plus(backend, 3600)))
        .await;
    // A flow's step (a batch's end would cancel it without its flow).
    let step = db
        .insert_row(
            NewRow::new("NoOp")
                .number("flow_id", 1)
                .sql("delay_until", sql_now_plus(backend, 3600)),
        )
        .await;
    for (set, row, refusal) in [
        (format!("batch_id = {other}"), step, "step of"),
        (format!("batch_id = {other}"), joined, "stays in it"),
        ("batch_id = NULL".to_string(), joined, "stays in it"),
        (format!("batch_id = {other}"), finished, "cannot join"),
        (
            format!("batch_id = {batch}"),
            waiting,
            "does not exist or is final",
        ),
    ] {
        let refusal = match (backend, refusal) {
            (Backend::Sqlite, "cannot join") => "a final request cannot join a batch",
            _ => refusal,
        };
        let error = db
            .try_execute(&format!(
                "UPDATE task_runner_requests SET {set} WHERE id = {row}"
            ))
            .await
            .expect_err("refused");
        assert!(
            error.contains("task_runner_requests.batch_id"),
            "{set}: {error}"
        );
        assert!(error.contains(refusal), "{set}: {error}");
    }
    assert_eq!(db.row(joined).await.batch_id, Some(batch));
    assert_eq!(db.row(finished).await.batch_id, None);
    assert_eq!(db.row(waiting).await.batch_id, None);
    assert_eq!(db.row(step).await.batch_id, None);
    assert_eq!(
        counters_and_recount(&db, other).await,
        ([0; 5], [0; 5]),
        "nothing counted in the other batch"
    );
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
}

/// Batch counters an application wrote at their column's limit (64 bits
/// on SQLite, 32 on PostgreSQL and MariaDB), `failed` and `cancelled`
/// both: `batch seal` summed them past i64 (SQLite: the CLI panicked),
/// `batch cancel` stepped `cancelled` past it (the same), and PostgreSQL's
/// repair pass summed them in SQL, past its INTEGER: the pass failed at
/// every poll, and no batch that only it ends (sealed by hand after its
/// members ended) was ended again; the daemon's own sum, on SQLite, stopped
/// it. Now each batch ends as its members say.
async fn counters_an_application_wrote_at_their_limit_break_no_seal_cancel_or_repair_pass(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let limit = match backend {
        Backend::Sqlite => i64::MAX,
        Backend::Postgres | Backend::MySql => i64::from(i32::MAX),
    };
    let columns = "on_complete, failed, cancelled";
    let values = format!("'Done', {limit}, {limit}");
    // Sealed by the CLI, its members waiting.
    let sealed = insert_batch(&db, columns, &values).await;
    insert_members(&db, sealed, "NoOp", 2, 5).await;
    let (status, stdout, stderr) = cli(&db, &["batch", "seal", &sealed.to_string()]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    // Cancelled by the CLI, one member waiting.
    let cancelled = insert_batch(&db, columns, &values).await;
    insert_members(&db, cancelled, "NoOp", 1, 5).await;
    let (status, stdout, stderr) = cli(&db, &["batch", "cancel", &cancelled.to_string()]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert_eq!(batch_state(&db, cancelled).await, "CANCELLED");
    // Sealed by hand with no member: only the repair pass ends it.
    let by_hand = insert_batch(&db, &format!("{columns}, pending"), &format!("{values}, 1")).await;
    seal(&db, by_hand).await;
    let mut daemons = start_daemons(&db, 1, "tasks:\n");
    for batch in [sealed, by_hand] {
        its_callback_finishes(&db, batch, Duration::from_secs(30)).await;
        assert_eq!(batch_state(&db, batch).await, "FINISHED");
        let (stored, recounted) = counters_and_recount(&db, batch).await;
        assert_eq!(stored, recounted);
    }
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
}

/// A running row (with a callback, so its end is written with what it
/// causes) whose try fails with tries left; the daemon looks up its batch
/// (none), and before it writes the end (a test hook holds it), the
/// application makes the row join a batch, which `batch cancel` then ends.
/// Before, the end was written for a row of no batch: FAILED with tries
/// left, and it ran again, a member of an ended batch. Now the batch it
/// joined is read in the end's transaction: no further try, as for any
/// member running when its batch ended.
async fn a_row_that_joined_a_batch_ended_meanwhile_is_not_tried_again(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gate = db.scratch.join("gate");
    let lookup_done = db.scratch.join("lookup-done");
    let config = format!(
        "retry_delay: 0s\nlease_timeout: 60s\ntasks:\n{CALLBACK_TYPES}  Flaky:\n    command: [/bin/sh, -c, 'until [ -e {} ]; do sleep 0.05; done; exit 1']\n",
        gate.display()
    );
    let mut daemon = Daemon::start_in_env(
        &db,
        "d",
        &config,
        &[(
            "TASKRUNNER_TEST_FINALIZE_AFTER_LOOKUP",
            lookup_done.to_str().unwrap(),
        )],
    );
    let row = db
        .insert_row(NewRow::new("Flaky").try_limit(3).on_failure("Alert"))
        .await;
    let pid = db
        .wait_for_pid(row, Duration::from_secs(30))
        .await
        .pid
        .unwrap() as i32;
    let batch = insert_batch(&db, "on_complete", "'Done'").await;
    std::fs::write(&gate, "").unwrap();
    // The try has failed; its end waits after the look-up (within the
    // recorder's bound on a call, `lease_timeout`).
    wait_until(Duration::from_secs(30), "the try's end", || {
        !process_exists(pid)
    });
    daemon.wait_for_log(
        "test hook: TASKRUNNER_TEST_FINALIZE_AFTER_LOOKUP waits",
        Duration::from_secs(30),
    );
    db.execute(&format!(
        "UPDATE task_runner_requests SET batch_id = {batch} WHERE id = {row}"
    ))
    .await;
    let (status, stdout, stderr) = cli(&db, &["batch", "cancel", &batch.to_string()]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    std::fs::write(&lookup_done, "").unwrap();
    let ended = db
        .wait_for_state(row, "CANCELLED", Duration::from_secs(30))
        .await;
    assert_eq!(ended.tries, 1, "{ended:?}");
    assert!(
        ended.result_text.as_deref().is_some_and(
            |text| text.contains(&format!("batch {batch} has ended, so no further try"))
        ),
        "{ended:?}"
    );
    assert_eq!(batch_state(&db, batch).await, "CANCELLED");
    assert!(daemon.stop().success());
}
