//! Flows: each step's execute and revert is a request row, and the next
//! row (or the flow's end) is written with the outcome, under the flow
//! row's lock. Steps here are shell commands that append their name to a
//! log file, so the log is the order in which steps ran.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::*;

both_backends!(
    three_step_flow_runs_e1_e2_e3_and_keeps_what_each_step_provided,
    step_three_exhausted_reverts_r3_r2_r1_once_each_and_retry_times_runs_it_again,
    revert_exhausted_ends_the_flow_failed_with_an_error_line_and_no_later_revert,
    daemon_killed_during_revert_r2_resumes_at_r2_after_a_restart_and_r1_runs_once,
    flow_with_unknown_name_or_bad_options_ends_failed_saying_why,
    a_flow_one_daemon_does_not_know_is_left_to_a_daemon_that_knows_it,
    flow_cancel_stops_a_flow_and_cancel_revert_reverts_its_finished_steps,
    a_step_that_finishes_after_cancel_revert_is_reverted_and_the_flow_goes_no_further,
    a_step_failed_with_tries_left_after_a_cancel_ends_its_flow_in_the_same_write,
    retry_refuses_a_flows_steps_and_reverts,
    purge_keeps_the_step_rows_of_a_running_flow,
    a_step_whose_output_would_outgrow_the_flows_store_reverts_the_flow_saying_why,
    a_step_row_the_database_refuses_ends_its_flow_failed_and_holds_up_no_outcome,
    cancel_revert_of_a_flow_whose_step_never_started_reverts_only_the_finished_ones,
);

const LONG: Duration = Duration::from_secs(60);

/// A command task type running `script` with /bin/sh (options on stdin).
pub fn sh_task(name: &str, script: &str) -> String {
    format!(
        "  {name}:\n    command: [/bin/sh, -c, {}]\n",
        serde_json::to_string(script).unwrap()
    )
}

/// A step that appends `word` to `log`, then runs `then` (shell).
pub fn logging_task(name: &str, log: &Path, word: &str, then: &str) -> String {
    sh_task(name, &format!("echo {word} >> {}; {then}", log.display()))
}

/// The log's words, in order.
pub fn log_words(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Inserts a flow with plain SQL, as an application would. (By hand:
/// starting a flow with plain SQL is what these tests prove works.)
pub async fn insert_flow(db: &TestDb, name: &str, options: Option<&str>) -> i64 {
    db.insert(&format!(
        "INSERT INTO task_runner_flows (flow_name, options) VALUES ({}, {}) RETURNING id",
        quote(name),
        options.map_or("NULL".into(), quote)
    ))
    .await
    .0
}

/// Waits until flow `id` has `state`, and returns it.
pub async fn wait_for_flow(
    db: &TestDb,
    id: i64,
    state: &str,
    timeout: Duration,
) -> taskrunner::store::Flow {
    poll(timeout, &format!("flow {id} to be {state}"), async || {
        let flow = db.store.flow(id).await.unwrap().expect("the flow");
        if flow.state.as_deref() == Some(state) {
            Ok(flow)
        } else {
            Err(flow)
        }
    })
    .await
}

fn store_of(flow: &taskrunner::store::Flow) -> serde_yaml::Value {
    serde_yaml::from_str(flow.store.as_deref().unwrap_or("{}")).unwrap()
}

async fn three_step_flow_runs_e1_e2_e3_and_keeps_what_each_step_provided(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("steps.log");
    let config = format!(
        "tasks:\n{}{}{}flows:\n  deploy:\n    steps:\n      - {{ name: fetch, task: E1, provides: artifact }}\n      - {{ name: install, task: E2, provides: seen }}\n      - {{ name: restart, task: E3, provides: port }}\n    options:\n      port: {{ help: port to serve on, default: 8887 }}\n",
        logging_task("E1", &log, "e1", "echo artifact-1"),
        // Step 2 prints the options it was given: the store so far.
        logging_task("E2", &log, "e2", "cat"),
        logging_task("E3", &log, "e3", "echo 9000"),
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let id = insert_flow(&db, "deploy", Some("env: staging")).await;
    let flow = wait_for_flow(&db, id, "FINISHED", LONG).await;
    assert_eq!(log_words(&log), ["e1", "e2", "e3"]);
    let store = store_of(&flow);
    assert_eq!(store["artifact"], serde_yaml::Value::from("artifact-1"));
    assert_eq!(store["env"], serde_yaml::Value::from("staging"));
    // Step 2 got the store with step 1's value and the option's default.
    assert_eq!(
        store["seen"]["artifact"],
        serde_yaml::Value::from("artifact-1"),
        "{store:?}"
    );
    assert_eq!(
        store["seen"]["port"],
        serde_yaml::Value::from(8887),
        "{store:?}"
    );
    // What step 3 printed replaced the option in the store.
    assert_eq!(store["port"], serde_yaml::Value::from(9000));
    assert_eq!(flow.attempt, 1);
    // One row per step, each named by its position.
    for step in 0..3 {
        assert_eq!(
            db.scalar(&format!(
                "SELECT count(*) FROM task_runner_requests WHERE flow_id = {id} AND flow_step = {step} \
                   AND flow_action = 'execute' AND result = 'FINISHED' AND unique_key = 'flow:{id}:1:{step}:execute'"
            ))
            .await,
            1
        );
    }
    let definition = flow.definition.unwrap();
    assert!(definition.contains("task: E2"), "{definition}");
    assert!(daemon.stop().success());
}

async fn step_three_exhausted_reverts_r3_r2_r1_once_each_and_retry_times_runs_it_again(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let reverted_log = db.scratch.join("reverted.log");
    let retried_log = db.scratch.join("retried.log");
    let skipped_log = db.scratch.join("skipped.log");
    let mark = db.scratch.join("failed-once");
    // The step tasks log to the file named in the flow's options.
    let step = |name: &str, word: &str, then: &str| {
        sh_task(
            name,
            &format!("log=$(sed -n 's/^log: //p'); echo {word} >> $log; {then}"),
        )
    };
    let config = format!(
        "tasks:\n{}{}{}{}{}{}{}{}flows:\n{}{}{}",
        step("E1", "e1", ""),
        step("E2", "e2", ""),
        step("E3", "e3", "exit 1"),
        step("R1", "r1", ""),
        step("R2", "r2", ""),
        step("R3", "r3", ""),
        // Fails in its first attempt only.
        step(
            "E3Once",
            "e3",
            &format!("[ -e {m} ] && exit 0; touch {m}; exit 1", m = mark.display())
        ),
        step("Plain", "e2", ""),
        "  reverted:\n    steps:\n      - { name: s1, task: E1, revert: R1 }\n      - { name: s2, task: E2, revert: R2 }\n      - { name: s3, task: E3, revert: R3, try_limit: 2 }\n",
        "  retried:\n    retry: { times: 1 }\n    steps:\n      - { name: s1, task: E1, revert: R1 }\n      - { name: s2, task: E2, revert: R2 }\n      - { name: s3, task: E3Once, revert: R3, try_limit: 1 }\n",
        "  skipped:\n    steps:\n      - { name: s1, task: E1, revert: R1 }\n      - { name: s2, task: Plain }\n      - { name: s3, task: E3, try_limit: 1 }\n",
    );
    let mut daemon = Daemon::start(&db, "d", &format!("retry_delay: 0s\n{config}"));
    let reverted = insert_flow(
        &db,
        "reverted",
        Some(&format!("log: {}", reverted_log.display())),
    )
    .await;
    let retried = insert_flow(
        &db,
        "retried",
        Some(&format!("log: {}", retried_log.display())),
    )
    .await;
    let skipped = insert_flow(
        &db,
        "skipped",
        Some(&format!("log: {}", skipped_log.display())),
    )
    .await;
    let flow = wait_for_flow(&db, reverted, "REVERTED", LONG).await;
    // Step 3 had two tries, then r3 r2 r1, once each.
    assert_eq!(
        log_words(&reverted_log),
        ["e1", "e2", "e3", "e3", "r3", "r2", "r1"]
    );
    assert!(
        flow.result_text
            .as_deref()
            .unwrap()
            .contains("step 3 (s3) ended FAILED"),
        "{flow:?}"
    );
    let flow = wait_for_flow(&db, retried, "FINISHED", LONG).await;
    assert_eq!(
        log_words(&retried_log),
        ["e1", "e2", "e3", "r3", "r2", "r1", "e1", "e2", "e3"]
    );
    assert_eq!(flow.attempt, 2);
    // A step without a revert is skipped; a failed step without one too.
    wait_for_flow(&db, skipped, "REVERTED", LONG).await;
    assert_eq!(log_words(&skipped_log), ["e1", "e2", "e3", "r1"]);
    // The board shows the current attempt.
    let board = db.store.flow_board(retried).await.unwrap().unwrap();
    assert_eq!(board.steps.len(), 3);
    assert!(board
        .steps
        .iter()
        .all(|s| s.execute.as_ref().unwrap().result.as_deref() == Some("FINISHED")));
    assert!(board.steps.iter().all(|s| s.revert.is_none()));
    assert_eq!(board.steps[0].executes_all_attempts, 2);
    assert!(daemon.stop().success());
}

async fn revert_exhausted_ends_the_flow_failed_with_an_error_line_and_no_later_revert(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("steps.log");
    let config = format!(
        "tasks:\n{}{}{}{}{}{}  Alert:\n    command: [/bin/cat]\nflows:\n  broken:\n    on_exhausted: Alert\n    steps:\n      - {{ name: s1, task: E1, revert: R1 }}\n      - {{ name: s2, task: E2, revert: R2, try_limit: 1 }}\n      - {{ name: s3, task: E3, revert: R3, try_limit: 1 }}\n",
        logging_task("E1", &log, "e1", ""),
        logging_task("E2", &log, "e2", ""),
        logging_task("E3", &log, "e3", "exit 3"),
        logging_task("R1", &log, "r1", ""),
        logging_task("R2", &log, "r2", "echo cannot undo >&2; exit 4"),
        logging_task("R3", &log, "r3", ""),
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let id = insert_flow(&db, "broken", None).await;
    let flow = wait_for_flow(&db, id, "FAILED", LONG).await;
    let text = flow.result_text.unwrap();
    assert!(
        text.contains("revert of step 2 (s2, R2) ended FAILED"),
        "{text}"
    );
    // The alert ran once, with the flow's summary.
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE task_class_name = 'Alert' \
               AND unique_key = 'flow:{id}:exhausted' AND result = 'FINISHED'"
        ),
        1,
        LONG,
    )
    .await;
    assert_eq!(log_words(&log), ["e1", "e2", "e3", "r3", "r2"]);
    daemon.wait_for_log(&format!("flow {id} (broken) FAILED"), LONG);
    let line = daemon
        .log_text()
        .lines()
        .find(|line| line.contains(&format!("flow {id} (broken) FAILED")))
        .unwrap()
        .to_string();
    assert!(line.contains("ERROR"), "{line}");
    // No later revert, even after a few more polls.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(log_words(&log), ["e1", "e2", "e3", "r3", "r2"]);
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE flow_id = {id} AND flow_step = 0 AND flow_action = 'revert'"
        ))
        .await,
        0
    );
    // The alert is a callback, not a step: `retry` runs it again (before,
    // it was refused as a step of the flow, which never moves again), and
    // the flow stays as it ended.
    let alert = db
        .scalar(&format!(
            "SELECT id FROM task_runner_requests WHERE unique_key = 'flow:{id}:exhausted'"
        ))
        .await;
    let alert = taskrunner::request::RequestId(alert);
    let first_start = db.row(alert).await.started_at;
    let (code, out, err) = cli(&db, &["retry", &alert.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let steps = |id: i64| format!("SELECT count(*) FROM task_runner_requests WHERE flow_id = {id}");
    let rows = db.scalar(&steps(id)).await;
    let row = db
        .wait_for(alert, LONG, "the alert's second try", |row| {
            row.result.as_deref() == Some("FINISHED") && row.started_at != first_start
        })
        .await;
    assert_eq!(row.tries, 1);
    wait_for_flow(&db, id, "FAILED", LONG).await;
    assert_eq!(db.scalar(&steps(id)).await, rows);
    assert!(daemon.stop().success());
}

async fn daemon_killed_during_revert_r2_resumes_at_r2_after_a_restart_and_r1_runs_once(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("steps.log");
    let mark = db.scratch.join("r2-started");
    let config = format!(
        "tasks:\n{}{}{}{}{}{}flows:\n  deploy:\n    steps:\n      - {{ name: s1, task: E1, revert: R1 }}\n      - {{ name: s2, task: E2, revert: R2 }}\n      - {{ name: s3, task: E3, revert: R3, try_limit: 1 }}\n",
        logging_task("E1", &log, "e1", ""),
        logging_task("E2", &log, "e2", ""),
        logging_task("E3", &log, "e3", "exit 1"),
        logging_task("R1", &log, "r1", ""),
        // The first r2 hangs until it is killed.
        logging_task(
            "R2",
            &log,
            "r2",
            &format!("[ -e {m} ] && exit 0; touch {m}; exec sleep 600", m = mark.display())
        ),
        logging_task("R3", &log, "r3", ""),
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let id = insert_flow(&db, "deploy", None).await;
    let r2 = format!(
        "SELECT count(*) FROM task_runner_requests WHERE flow_id = {id} AND flow_step = 1 \
           AND flow_action = 'revert' AND result = 'RUNNING' AND pid IS NOT NULL"
    );
    db.wait_for_count(&r2, 1, LONG).await;
    wait_until(LONG, "r2 to start", || mark.exists());
    let pid = db
        .scalar(&format!(
            "SELECT CAST(pid AS BIGINT) FROM task_runner_requests WHERE flow_id = {id} AND flow_step = 1 AND flow_action = 'revert'"
        ))
        .await as i32;
    // The host dies: the daemon and its task.
    daemon.kill();
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_until(LONG, "the task to be gone", || !process_exists(pid));
    assert_eq!(log_words(&log), ["e1", "e2", "e3", "r3", "r2"]);
    let restarted = Instant::now();
    let mut daemon = Daemon::start(&db, "d", &config);
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE flow_id = {id} AND flow_step = 1 \
               AND flow_action = 'revert' AND tries = 2"
        ),
        1,
        LONG,
    )
    .await;
    let resumed_after = restarted.elapsed();
    let flow = wait_for_flow(&db, id, "REVERTED", LONG).await;
    let resumed = db
        .scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE flow_id = {id} AND flow_step = 1 \
               AND flow_action = 'revert' AND tries = 2 AND result = 'FINISHED'"
        ))
        .await;
    println!(
        "same host: r2 claimed again {:.2}s after the daemon's restart (its start included); the flow ended {:?} {:.2}s after it",
        resumed_after.as_secs_f64(),
        flow.state,
        restarted.elapsed().as_secs_f64()
    );
    assert_eq!(resumed, 1);
    assert_eq!(log_words(&log), ["e1", "e2", "e3", "r3", "r2", "r2", "r1"]);
    assert!(daemon.stop().success());
}

/// `purge` (and the retention pruner) keeps the step rows of a flow that
/// has not ended, as it keeps a batch's members: the flow's board (`flow
/// show`, the web page) is read from them. (Its reverts do not need them:
/// with step 1's row purged while step 2 ran, r2 and r1 still ran.)
async fn purge_keeps_the_step_rows_of_a_running_flow(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("steps.log");
    let started = db.scratch.join("e2-started");
    let go = db.scratch.join("e2-go");
    let config = format!(
        "retry_delay: 0s\ntasks:\n{}{}{}{}flows:\n  two:\n    steps:\n      - {{ name: s1, task: E1, revert: R1 }}\n      - {{ name: s2, task: E2, revert: R2, try_limit: 1 }}\n",
        logging_task("E1", &log, "e1", ""),
        logging_task(
            "E2",
            &log,
            "e2",
            &format!(
                "touch {}; while [ ! -e {} ]; do sleep 0.05; done; exit 1",
                started.display(),
                go.display()
            )
        ),
        logging_task("R1", &log, "r1", ""),
        logging_task("R2", &log, "r2", ""),
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let flow = insert_flow(&db, "two", None).await;
    wait_until(LONG, "step 2 to run", || started.exists());
    let (status, _, stderr) = cli(&db, &["purge", "--older-than", "0s"]);
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE flow_id = {flow} AND flow_step = 0"
        ))
        .await,
        1,
        "a step row of a running flow was purged"
    );
    std::fs::write(&go, "").unwrap();
    wait_for_flow(&db, flow, "REVERTED", LONG).await;
    assert_eq!(log_words(&log), ["e1", "e2", "r2", "r1"]);
    assert!(daemon.stop().success());
}

async fn flow_with_unknown_name_or_bad_options_ends_failed_saying_why(backend: Backend) {
    let db = TestDb::new(backend).await;
    let config = "flows:\n  typed:\n    steps:\n      - { name: only, task: NoOp }\n    options:\n      port: { type: integer }\n";
    // An unknown flow is left to the daemons that know it for 5 minutes;
    // here for 1 s.
    let mut daemon = Daemon::start_in_env(
        &db,
        "d",
        config,
        &[("TASKRUNNER_TEST_UNKNOWN_FLOW_WAIT_MS", "1000")],
    );
    let unknown = insert_flow(&db, "nosuch", None).await;
    let badly_typed = insert_flow(&db, "typed", Some("port: eighty")).await;
    let not_yaml = insert_flow(&db, "typed", Some("port: [unclosed")).await;
    let good = insert_flow(&db, "typed", Some("port: 80")).await;
    let text = |flow: taskrunner::store::Flow| flow.result_text.unwrap_or_default();
    assert_eq!(
        text(wait_for_flow(&db, unknown, "FAILED", LONG).await),
        "unknown flow `nosuch` (known: typed); no daemon that knows it took it within 1s"
    );
    assert_eq!(
        text(wait_for_flow(&db, badly_typed, "FAILED", LONG).await),
        "option port: not a integer"
    );
    assert!(text(wait_for_flow(&db, not_yaml, "FAILED", LONG).await)
        .starts_with("options: not valid YAML"));
    wait_for_flow(&db, good, "FINISHED", LONG).await;
    assert!(daemon.stop().success());
}

/// A rolling deploy: a flow new in the config is posted while a daemon
/// not yet upgraded runs. That daemon leaves it (before, it took the flow
/// first and ended it FAILED, `unknown flow`, for all), goes on taking the
/// flows it knows, and the upgraded daemon takes and runs it.
async fn a_flow_one_daemon_does_not_know_is_left_to_a_daemon_that_knows_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let old = "flows:\n  known:\n    steps:\n      - { name: only, task: NoOp }\n";
    let new = format!("{old}  added:\n    steps:\n      - {{ name: only, task: NoOp }}\n");
    let mut not_upgraded = Daemon::start(&db, "old", old);
    let added = insert_flow(&db, "added", None).await;
    let known = insert_flow(&db, "known", None).await;
    // The old daemon has looked past the new flow: it took the next one.
    wait_for_flow(&db, known, "FINISHED", LONG).await;
    let flow = db.store.flow(added).await.unwrap().expect("the flow");
    assert_eq!(flow.state, None, "{flow:?}");
    not_upgraded.wait_for_log(
        "is unknown to this daemon: left to a daemon that knows it",
        LONG,
    );
    let mut upgraded = Daemon::start(&db, "new", &new);
    wait_for_flow(&db, added, "FINISHED", LONG).await;
    assert!(upgraded.stop().success());
    assert!(not_upgraded.stop().success());
}

/// A flow's store is every later step's options: what steps provide must
/// not grow it past what a step may be given (`max_options`).
async fn a_step_whose_output_would_outgrow_the_flows_store_reverts_the_flow_saying_why(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("steps.log");
    // Each step provides 25,000 bytes: the third would make the store
    // about 75,000, more than max_options (64 KiB) allows.
    let provider = |name: &str, word: &str, letter: char| {
        logging_task(
            name,
            &log,
            word,
            &format!("head -c 25000 /dev/zero | tr '\\0' {letter}"),
        )
    };
    let config = format!(
        "max_options: 64KiB\noutput_tail: 64KiB\nretry_delay: 0s\ntasks:\n{}{}{}{}{}{}{}flows:\n  big:\n    steps:\n      - {{ name: s1, task: E1, revert: R1, provides: a }}\n      - {{ name: s2, task: E2, revert: R2, provides: b }}\n      - {{ name: s3, task: E3, revert: R3, provides: c }}\n      - {{ name: s4, task: E4, revert: R4 }}\n",
        provider("E1", "e1", 'a'),
        provider("E2", "e2", 'b'),
        provider("E3", "e3", 'c'),
        logging_task("E4", &log, "e4", ""),
        logging_task("R1", &log, "r1", ""),
        logging_task("R2", &log, "r2", ""),
        logging_task("R3", &log, "r3", "") + &logging_task("R4", &log, "r4", ""),
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let big = insert_flow(&db, "big", None).await;
    // Options that alone are more than the store may hold: not parsed.
    let options = format!("note: {}", "n".repeat(70_000));
    let too_big = insert_flow(&db, "big", Some(&options)).await;
    let flow = wait_for_flow(&db, big, "REVERTED", LONG).await;
    // Step 3 did its work, so it is reverted too; step 4 never ran.
    assert_eq!(log_words(&log), ["e1", "e2", "e3", "r3", "r2", "r1"]);
    let why = flow.result_text.as_deref().unwrap();
    assert!(
        why.contains("step 3 (s3) finished, but what it provided makes the flow's store")
            && why.contains("more than a flow's store may hold (60KiB)"),
        "{why}"
    );
    // The store is as it was before step 3: the reverts were given it.
    let store = store_of(&flow);
    assert_eq!(store["b"].as_str().map(str::len), Some(25_000));
    assert_eq!(store.get("c"), None);
    let reverts = db
        .scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE flow_id = {big} AND flow_action = 'revert' AND result = 'FINISHED'"
        ))
        .await;
    assert_eq!(reverts, 3);
    let flow = wait_for_flow(&db, too_big, "FAILED", LONG).await;
    let why = flow.result_text.as_deref().unwrap();
    assert!(
        why.contains("its options are 70006B, more than a flow's store may hold (60KiB)"),
        "{why}"
    );
    assert!(daemon.stop().success());
}

async fn flow_cancel_stops_a_flow_and_cancel_revert_reverts_its_finished_steps(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("steps.log");
    let config = format!(
        "tasks:\n{}{}{}{}flows:\n  slow:\n    retry: {{ times: 3 }}\n    steps:\n      - {{ name: s1, task: E1, revert: R1 }}\n      - {{ name: s2, task: Hang, revert: R2 }}\n",
        sh_task("E1", &format!("echo e1 >> {}", log.display())),
        sh_task("Hang", &format!("echo hang >> {}; exec sleep 600", log.display())),
        sh_task("R1", &format!("echo r1 >> {}", log.display())),
        sh_task("R2", &format!("echo r2 >> {}", log.display())),
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let running = |id: i64| {
        format!(
            "SELECT count(*) FROM task_runner_requests WHERE flow_id = {id} AND flow_step = 1 AND result = 'RUNNING' AND pid IS NOT NULL"
        )
    };
    // Without --revert: CANCELLED at once, the running step stopped.
    let first = insert_flow(&db, "slow", None).await;
    db.wait_for_count(&running(first), 1, LONG).await;
    let (code, out, err) = cli(&db, &["flow", "cancel", &first.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    wait_for_flow(&db, first, "CANCELLED", Duration::from_secs(1)).await;
    db.wait_for_count(
        &format!("SELECT count(*) FROM task_runner_requests WHERE flow_id = {first} AND result = 'CANCELLED'"),
        1,
        LONG,
    )
    .await;
    assert_eq!(log_words(&log), ["e1", "hang"]);
    // With --revert: the running step is stopped, then r2 r1, and no restart.
    std::fs::remove_file(&log).unwrap();
    let second = insert_flow(&db, "slow", None).await;
    db.wait_for_count(&running(second), 1, LONG).await;
    let (code, out, err) = cli(&db, &["flow", "cancel", &second.to_string(), "--revert"]);
    assert_eq!(code, 0, "{out}{err}");
    let flow = wait_for_flow(&db, second, "CANCELLED", LONG).await;
    assert_eq!(log_words(&log), ["e1", "hang", "r2", "r1"]);
    assert_eq!(flow.attempt, 1);
    let (code, _, err) = cli(&db, &["flow", "cancel", &second.to_string()]);
    assert_eq!(
        (code, err.trim()),
        (
            1,
            format!("taskrunner-cli: flow {second} is already CANCELLED").as_str()
        )
    );
    assert!(daemon.stop().success());
}

/// `flow cancel --revert` while the current step waits to start (its
/// type paused here; a full daemon or a backoff are the same): the
/// finished steps are reverted, and that step, which never ran, is not.
/// Before, its revert ran first (`e1 r2 r1`): what it undid was what was
/// there before the flow, such as an earlier install.
async fn cancel_revert_of_a_flow_whose_step_never_started_reverts_only_the_finished_ones(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("steps.log");
    let config = format!(
        "tasks:\n{}{}{}{}flows:\n  two:\n    steps:\n      - {{ name: s1, task: E1, revert: R1 }}\n      - {{ name: s2, task: E2, revert: R2 }}\n",
        sh_task("E1", &format!("echo e1 >> {}", log.display())),
        sh_task("E2", &format!("echo e2 >> {}", log.display())),
        sh_task("R1", &format!("echo r1 >> {}", log.display())),
        sh_task("R2", &format!("echo r2 >> {}", log.display())),
    );
    let (code, out, err) = cli(&db, &["pause", "--task", "E2"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut daemon = Daemon::start(&db, "d", &config);
    let id = insert_flow(&db, "two", None).await;
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE flow_id = {id} AND flow_step = 1 AND result IS NULL"
        ),
        1,
        LONG,
    )
    .await;
    let (code, out, err) = cli(&db, &["flow", "cancel", &id.to_string(), "--revert"]);
    assert_eq!(code, 0, "{out}{err}");
    let flow = wait_for_flow(&db, id, "CANCELLED", LONG).await;
    assert_eq!(log_words(&log), ["e1", "r1"], "{flow:?}");
    assert!(daemon.stop().success());
}

/// `flow cancel --revert` while a step runs that then finishes before the
/// daemon stops it (the daemon sees a cancel at its next heartbeat; this
/// step also ignores SIGTERM): its FINISHED stands, and the flow moved on
/// to its next step as if nothing had been asked, and could end FINISHED.
async fn a_step_that_finishes_after_cancel_revert_is_reverted_and_the_flow_goes_no_further(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("steps.log");
    let go = db.scratch.join("go");
    let config = format!(
        "tasks:\n{}{}{}{}flows:\n  two:\n    steps:\n      - {{ name: s1, task: E1, revert: R1 }}\n      - {{ name: s2, task: E2, revert: R2 }}\n",
        sh_task(
            "E1",
            &format!(
                "trap '' TERM; while [ ! -e {} ]; do sleep 0.02; done; echo e1 >> {}",
                go.display(),
                log.display()
            )
        ),
        sh_task("E2", &format!("echo e2 >> {}", log.display())),
        sh_task("R1", &format!("echo r1 >> {}", log.display())),
        sh_task("R2", &format!("echo r2 >> {}", log.display())),
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let flow = insert_flow(&db, "two", None).await;
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE flow_id = {flow} AND flow_step = 0 AND result = 'RUNNING' AND pid IS NOT NULL"
        ),
        1,
        LONG,
    )
    .await;
    let (code, out, err) = cli(&db, &["flow", "cancel", &flow.to_string(), "--revert"]);
    assert_eq!(code, 0, "{out}{err}");
    std::fs::write(&go, "").unwrap();
    let ended = wait_for_flow(&db, flow, "CANCELLED", LONG).await;
    assert_eq!(log_words(&log), ["e1", "r1"]);
    let text = ended.result_text.unwrap_or_default();
    assert!(
        text.contains("step 1 (s1) finished after the flow was cancelled"),
        "{text}"
    );
    assert!(daemon.stop().success());
}

/// A step whose try fails with tries left after its flow was cancelled,
/// before the daemon has read the cancel, is CANCELLED by
/// its outcome's write, the cancel overriding the retry. That write took the
/// plain path, since the try's own verdict did not end the request, and the
/// flow was ended only by the next repair pass: the step was CANCELLED with
/// its flow RUNNING meanwhile. Now every outcome of a row with follow-ups
/// goes through the finalization path, and the flow ends in the same
/// transaction as its step.
async fn a_step_failed_with_tries_left_after_a_cancel_ends_its_flow_in_the_same_write(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("steps.log");
    let go = db.scratch.join("go");
    let config = format!(
        "tasks:\n{}{}flows:\n  two:\n    steps:\n      - {{ name: s1, task: E1 }}\n      - {{ name: s2, task: E2 }}\n",
        sh_task(
            "E1",
            &format!(
                "trap '' TERM; while [ ! -e {} ]; do sleep 0.02; done; echo e1 >> {}; exit 1",
                go.display(),
                log.display()
            )
        ),
        sh_task("E2", &format!("echo e2 >> {}", log.display())),
    );
    // Renewals, which read cancels, far apart: the step fails before the
    // daemon has seen its cancel (a cancel the daemon sees stops the try
    // as CANCELLED, which ends it by its own verdict).
    let config = format!("heartbeat_interval: 10s\nlease_timeout: 40s\n{config}");
    let mut daemon = Daemon::start(&db, "d", &config);
    let flow = insert_flow(&db, "two", None).await;
    let step = format!(
        "FROM task_runner_requests s JOIN task_runner_flows f ON f.id = s.flow_id \
          WHERE f.id = {flow} AND s.flow_step = 0"
    );
    db.wait_for_count(
        &format!("SELECT count(*) {step} AND s.result = 'RUNNING' AND s.pid IS NOT NULL"),
        1,
        LONG,
    )
    .await;
    // What `flow cancel` writes, by plain SQL: `flow cancel` also wakes
    // the daemon to read it at once.
    db.execute(&format!(
        "UPDATE task_runner_requests SET cancel_requested_at = CURRENT_TIMESTAMP \
          WHERE flow_id = {flow} AND result = 'RUNNING'"
    ))
    .await;
    db.execute(&format!(
        "UPDATE task_runner_flows SET cancel_requested_at = CURRENT_TIMESTAMP WHERE id = {flow}"
    ))
    .await;
    std::fs::write(&go, "").unwrap();
    // The step's and the flow's states, read in one statement: 1 if the
    // step is CANCELLED, plus 2 if the flow is.
    let both = format!(
        "SELECT CAST(CASE WHEN s.result = 'CANCELLED' THEN 1 ELSE 0 END \
                   + CASE WHEN f.state = 'CANCELLED' THEN 2 ELSE 0 END AS BIGINT) {step}"
    );
    poll_every(
        Duration::from_millis(5),
        LONG,
        "the step and its flow CANCELLED",
        async || match db.scalar(&both).await {
            3 => Ok(()),
            1 => panic!(
                "the step is CANCELLED while its flow still runs: {:#?}",
                db.store.flow(flow).await.unwrap()
            ),
            seen => Err(seen),
        },
    )
    .await;
    assert_eq!(log_words(&log), ["e1"]);
    assert!(daemon.stop().success());
}

/// `retry --flow F` (and `retry` of one step's row) made a finished
/// flow's steps runnable again: every step ran once more, at once and in no
/// order, outside the flow (SPEC: a FINISHED step never runs again). A
/// flow's rows run only as the flow moves: `retry` refuses them, naming
/// the flow.
async fn retry_refuses_a_flows_steps_and_reverts(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("steps.log");
    let config = format!(
        "tasks:\n{}{}flows:\n  two:\n    steps:\n      - {{ name: s1, task: E1 }}\n      - {{ name: s2, task: E2 }}\n",
        logging_task("E1", &log, "e1", ""),
        logging_task("E2", &log, "e2", ""),
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let flow = insert_flow(&db, "two", None).await;
    wait_for_flow(&db, flow, "FINISHED", LONG).await;
    let (code, out, err) = cli(&db, &["retry", "--flow", &flow.to_string()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(!out.contains("will run again"), "{out}");
    assert!(err.contains(&format!("is a row of flow {flow}")), "{err}");
    let steps = format!(
        "SELECT count(*) FROM task_runner_requests WHERE flow_id = {flow} AND result = 'FINISHED'"
    );
    assert_eq!(db.scalar(&steps).await, 2);
    assert!(daemon.stop().success());
    assert_eq!(log_words(&log), ["e1", "e2"]);
}

both_backends!(flow_inserted_from_the_sqlite3_or_psql_command_line_client_runs);

async fn flow_inserted_from_the_sqlite3_or_psql_command_line_client_runs(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("steps.log");
    let config = format!(
        "tasks:\n{}{}flows:\n  deploy:\n    steps:\n      - {{ name: fetch, task: E1 }}\n      - {{ name: install, task: E2 }}\n    options:\n      port: {{ help: port to serve on, default: 8887 }}\n",
        logging_task("E1", &log, "e1", ""),
        logging_task("E2", &log, "e2", "sed -n 's/^port: //p'"),
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    // By hand: the statement the command-line client sends.
    let sql = "INSERT INTO task_runner_flows (flow_name, options) VALUES ('deploy', 'port: 8888');";
    let output = match backend {
        // The shell waits for no lock unless told to: without `.timeout`
        // it failed ("database is locked") when the daemon was writing.
        Backend::Sqlite => std::process::Command::new("sqlite3")
            .args(["-cmd", ".timeout 5000"])
            .arg(db.url.strip_prefix("sqlite://").unwrap())
            .arg(sql)
            .output(),
        Backend::Postgres => std::process::Command::new("psql")
            .args([db.url.as_str(), "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output(),
        Backend::MySql => crate::util::mysql_client(&db.url, sql),
    }
    .expect("running the command-line client");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let id = db.scalar("SELECT max(id) FROM task_runner_flows").await;
    let flow = wait_for_flow(&db, id, "FINISHED", LONG).await;
    assert_eq!(log_words(&log), ["e1", "e2"]);
    assert!(flow.store.unwrap().contains("port: 8888"));
    let printed = db
        .scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE flow_id = {id} AND flow_step = 1 AND result_text = '8888'"
        ))
        .await;
    assert_eq!(printed, 1);
    assert!(daemon.stop().success());
}

// Host loss (PostgreSQL and MariaDB, two daemons with different host ids):
// during step 2, daemon A and its task's process group are killed -9; daemon
// B takes the row over once A's lease lapses, runs step 2 again and ends the
// flow. Step 1 never runs twice.
multi_host_backends!(host_loss_during_step_two_is_resumed_by_the_other_host_within_the_lease);

async fn host_loss_during_step_two_is_resumed_by_the_other_host_within_the_lease(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("steps.log");
    let mark = db.scratch.join("e2-started");
    let tasks = format!(
        "tasks:\n{}{}{}flows:\n  deploy:\n    steps:\n      - {{ name: fetch, task: E1 }}\n      - {{ name: install, task: E2 }}\n      - {{ name: restart, task: E3 }}\n",
        logging_task("E1", &log, "e1", ""),
        // The first e2 hangs until its host dies.
        logging_task(
            "E2",
            &log,
            "e2",
            &format!("[ -e {m} ] && exit 0; touch {m}; exec sleep 600", m = mark.display())
        ),
        logging_task("E3", &log, "e3", ""),
    );
    let extra =
        |host: &str| format!("host_id: {host}\nreap_interval: 1s\nlease_timeout: 5s\n{tasks}");
    let mut daemons = [
        Daemon::start(&db, "a", &extra("host-a")),
        Daemon::start(&db, "b", &extra("host-b")),
    ];
    let id = insert_flow(&db, "deploy", None).await;
    wait_until(LONG, "step 2 to start", || mark.exists());
    let step2 = format!(
        "FROM task_runner_requests WHERE flow_id = {id} AND flow_step = 1 AND flow_action = 'execute'"
    );
    db.wait_for_count(
        &format!("SELECT count(*) {step2} AND pid IS NOT NULL"),
        1,
        LONG,
    )
    .await;
    let pid = db
        .scalar(&format!("SELECT CAST(pid AS BIGINT) {step2}"))
        .await as i32;
    let on_b = db
        .scalar(&format!("SELECT count(*) {step2} AND host = 'host-b'"))
        .await
        == 1;
    let (lost, survivor) = if on_b { (1, 0) } else { (0, 1) };
    let killed = Instant::now();
    daemons[lost].signal(nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    daemons[lost].wait_exit(LONG);
    db.wait_for_count(&format!("SELECT count(*) {step2} AND tries = 2"), 1, LONG)
        .await;
    let taken_over = killed.elapsed();
    let flow = wait_for_flow(&db, id, "FINISHED", LONG).await;
    println!(
        "host loss: step 2 claimed again by the other host {:.2}s after the kill (lease_timeout 5s); flow finished {:.2}s after it",
        taken_over.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(log_words(&log), ["e1", "e2", "e2", "e3"]);
    assert_eq!(flow.attempt, 1);
    let survivor_host = if survivor == 0 { "host-a" } else { "host-b" };
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) {step2} AND host = '{survivor_host}' AND result = 'FINISHED'"
        ))
        .await,
        1
    );
    assert!(taken_over < Duration::from_secs(20), "{taken_over:?}");
    assert!(daemons[survivor].stop().success());
}

both_backends!(flow_post_help_and_the_board_match_their_golden_files);

/// Compares `actual` with `tests/golden/NAME`; `TASKRUNNER_BLESS=1`
/// rewrites the file instead.
fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden")
        .join(name);
    if std::env::var_os("TASKRUNNER_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (TASKRUNNER_BLESS=1 writes it)", path.display()));
    assert_eq!(
        actual, expected,
        "{name} differs from its golden file (TASKRUNNER_BLESS=1 rewrites it)\n--- actual:\n{actual}"
    );
}

async fn flow_post_help_and_the_board_match_their_golden_files(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("steps.log");
    let config = format!(
        "host_id: host-a\nretry_delay: 0s\ntasks:\n{}{}{}{}{}flows:\n{}{}",
        logging_task("Fetch", &log, "e1", "echo /tmp/artifact-1.tar"),
        logging_task("Install", &log, "e2", ""),
        logging_task("Restart", &log, "e3", "echo port in use >&2; exit 1"),
        logging_task("Unfetch", &log, "r1", ""),
        logging_task("Uninstall", &log, "r2", ""),
        "  deploy:\n    help: fetch, install and restart the web server\n    steps:\n      - { name: fetch, task: Fetch, revert: Unfetch, provides: artifact }\n      - { name: install, task: Install, revert: Uninstall }\n      - { name: restart, task: Restart, try_limit: 2 }\n    options:\n      port: { help: port to serve on, default: 8887 }\n      host: { help: interface to listen on, type: string, required: true }\n      verbose: { help: log every request, default: false }\n",
        "  cleanup:\n    retry: { times: 2 }\n    steps:\n      - { name: sweep, task: Install }\n      - { name: wait, task: Hang, revert: Uninstall }\n",
    );
    let config = config.replace(
        "flows:\n",
        &format!(
            "{}flows:\n",
            sh_task("Hang", "echo waiting >&2; exec sleep 600")
        ),
    );
    let dir = db.scratch.join("cli");
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("taskrunner.yml");
    std::fs::write(&config_path, merge_yaml(&base_config(&db, &dir), &config)).unwrap();
    let config_arg = config_path.to_string_lossy().to_string();
    let run = |args: &[&str]| {
        let mut all = vec!["--config", config_arg.as_str()];
        all.extend_from_slice(args);
        cli(&db, &all)
    };
    let (code, out, err) = run(&["flow", "post", "deploy", "--help"]);
    assert_eq!(code, 0, "{err}");
    golden("flow_post_deploy_help.txt", &out);
    let (code, out, err) = run(&["flow", "post", "--help"]);
    assert_eq!(code, 0, "{err}");
    golden("flow_post_help.txt", &out);
    // Options are read as their declared types; bad ones are usage errors.
    let (code, _, err) = run(&["flow", "post", "deploy", "--port", "eighty", "--host", "::"]);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        "taskrunner-cli: flow post deploy: --port: `eighty` is not a integer"
    );
    let (code, _, err) = run(&["flow", "post", "deploy", "--port", "80"]);
    assert_eq!(
        (code, err.trim()),
        (2, "taskrunner-cli: flow post deploy: option host: required")
    );
    let (code, _, err) = run(&["flow", "post", "nosuch"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("no flow `nosuch` in the config or its programs (flows: cleanup, deploy)"),
        "{err}"
    );
    let (code, out, err) = run(&[
        "flow",
        "post",
        "deploy",
        "--host",
        "127.0.0.1",
        "--verbose",
        "yes",
    ]);
    assert_eq!(code, 0, "{err}");
    let id: i64 = out.trim().parse().unwrap();
    let flow = db.store.flow(id).await.unwrap().unwrap();
    assert_eq!(
        flow.options.as_deref(),
        Some("host: 127.0.0.1\nverbose: true\n")
    );
    // Before a daemon takes it, the board shows the declared steps.
    let (code, out, err) = run(&["flow", "show", &id.to_string()]);
    assert_eq!(code, 0, "{err}");
    golden("flow_show_waiting.txt", &out);
    let mut daemon = Daemon::start_with_config(&config_path, &[]);
    daemon.wait_ready();
    wait_for_flow(&db, id, "REVERTED", LONG).await;
    let (code, out, err) = run(&["flow", "show", &id.to_string()]);
    assert_eq!(code, 0, "{err}");
    golden("flow_show_reverted.txt", &out);
    // A running flow: the step it waits for is marked.
    let (code, out, err) = run(&["flow", "post", "cleanup"]);
    assert_eq!(code, 0, "{err}");
    let running: i64 = out.trim().parse().unwrap();
    db.wait_for_count(
        &format!("SELECT count(*) FROM task_runner_requests WHERE flow_id = {running} AND flow_step = 1 AND pid IS NOT NULL"),
        1,
        LONG,
    )
    .await;
    let (code, out, err) = run(&["flow", "show", &running.to_string()]);
    assert_eq!(code, 0, "{err}");
    golden("flow_show_running.txt", &out);
    let (code, _, err) = run(&["flow", "cancel", &running.to_string()]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(&["flow", "list"]);
    assert_eq!(code, 0);
    assert!(out.lines().nth(1).unwrap().contains("CANCELLED"), "{out}");
    assert!(out.lines().nth(2).unwrap().contains("REVERTED"), "{out}");
    let (code, _, err) = run(&["flow", "show", "999"]);
    assert_eq!((code, err.trim()), (1, "taskrunner-cli: no flow 999"));
    assert!(daemon.stop().success());
}

both_backends!(sdk_flow_started_in_a_transaction_has_its_long_step_killed_rerun_and_is_waited_for);

/// GET / on 127.0.0.1:`port`: the body and the `X-Try` header, if anything answers.
fn http_get(port: u16) -> Option<(String, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let try_number = head
        .lines()
        .find_map(|line| line.strip_prefix("X-Try: "))?
        .to_string();
    Some((body.to_string(), try_number))
}

/// The typed store of `simple_http_webserver` at its end.
#[derive(serde::Deserialize, Debug)]
struct WebStore {
    page: String,
    port: u16,
    /// What the serving step printed: how many requests its last try answered.
    served: Option<u64>,
}

/// The example program's flow (task-sdk, `--list-flows`), started with
/// `StartFlow` in the application's transaction (rolled back: no flow;
/// committed: it runs), its long-running step killed -9 and run again by
/// its tries, and waited for with `wait_for_flow`.
async fn sdk_flow_started_in_a_transaction_has_its_long_step_killed_rerun_and_is_waited_for(
    backend: Backend,
) {
    use task_sdk::{wait_for_flow, StartFlow};
    let db = TestDb::new(backend).await;
    let example = std::path::PathBuf::from(env!("CARGO_BIN_EXE_taskrunnerd"))
        .parent()
        .unwrap()
        .join("example-tasks");
    assert!(
        example.is_file(),
        "run `cargo build --workspace --bins` first"
    );
    let mut daemon = Daemon::start(&db, "d", &format!("programs: [{}]\n", example.display()));
    // The program's flow is known to the CLI too.
    let config = daemon.config.to_string_lossy().to_string();
    let (code, out, err) = cli(
        &db,
        &[
            "--config",
            &config,
            "flow",
            "post",
            "simple_http_webserver",
            "--help",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("--port     integer  port on 127.0.0.1 [default: 8887]"),
        "{out}"
    );
    let port = crate::util::free_port();
    let dir = db.scratch.join("web");
    #[derive(serde::Serialize)]
    struct Start {
        dir: String,
        port: u16,
        seconds: u64,
        message: String,
    }
    let options = Start {
        dir: dir.to_string_lossy().into(),
        port,
        seconds: 3,
        message: "kill me".into(),
    };
    macro_rules! start_in_transactions {
        ($pool:expr) => {{
            let pool = $pool;
            let mut tx = pool.begin().await.unwrap();
            StartFlow::new("simple_http_webserver")
                .options(&options)
                .insert(&mut *tx)
                .await
                .unwrap();
            tx.rollback().await.unwrap();
            let mut tx = pool.begin().await.unwrap();
            let id = StartFlow::new("simple_http_webserver")
                .options(&options)
                .insert(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            id
        }};
    }
    let id = match backend {
        Backend::Sqlite => {
            start_in_transactions!(sqlx::SqlitePool::connect(&db.url).await.unwrap())
        }
        Backend::Postgres => start_in_transactions!(sqlx::PgPool::connect(&db.url).await.unwrap()),
        Backend::MySql => start_in_transactions!(crate::util::mysql_app_pool(&db.url).await),
    };
    assert_eq!(db.scalar("SELECT count(*) FROM task_runner_flows").await, 1);
    let mut answer = None;
    wait_until(LONG, "the page to be served", || {
        answer = http_get(port);
        answer.is_some()
    });
    assert_eq!(
        answer.unwrap(),
        ("<h1>kill me</h1>\n".to_string(), "1".to_string())
    );
    // kill -9 the serving step: CRASHED, run again after retry_delay (1s).
    let serve = format!(
        "FROM task_runner_requests WHERE flow_id = {id} AND flow_step = 1 AND flow_action = 'execute'"
    );
    db.wait_for_count(
        &format!("SELECT count(*) {serve} AND pid IS NOT NULL"),
        1,
        LONG,
    )
    .await;
    let pid = db
        .scalar(&format!("SELECT CAST(pid AS BIGINT) {serve}"))
        .await as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut answer = None;
    wait_until(LONG, "the page to be served by the second try", || {
        answer = http_get(port).filter(|(_, try_number)| try_number == "2");
        answer.is_some()
    });
    let ended = wait_for_flow(db.url.as_str(), id, LONG).await.unwrap();
    assert!(ended.is_success(), "{ended:?}");
    let store: WebStore = ended.store_as().unwrap();
    assert_eq!(store.page, dir.join("index.html").to_string_lossy());
    assert_eq!(store.port, port);
    assert!(store.served.unwrap() >= 1, "{store:?}");
    assert_eq!(
        db.scalar(&format!("SELECT CAST(tries AS BIGINT) {serve}"))
            .await,
        2
    );
    // The page was written once: step 1 never ran again.
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE flow_id = {id} AND flow_step = 0"
        ))
        .await,
        1
    );
    let missing = wait_for_flow(db.url.as_str(), id + 1000, Duration::from_secs(5)).await;
    assert!(
        matches!(missing, Err(task_sdk::WaitError::NotFound(_))),
        "{missing:?}"
    );
    assert!(daemon.stop().success());
}

/// Unknown keys and unknown task types in a flow are config errors: exit 2,
/// one line naming the file, the flow and the step.
#[test]
fn config_errors_in_a_flow_name_the_flow_and_the_step() {
    let scratch = Scratch::new("flowconfig");
    let path = scratch.join("taskrunner.yml");
    let check = |config: &str| {
        std::fs::write(&path, config).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_taskrunner-cli"))
            .args(["config", "check", &path.to_string_lossy()])
            .current_dir(&scratch.path)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        let error = String::from_utf8_lossy(&output.stderr).trim().to_string();
        assert_eq!(output.status.code(), Some(2), "{error}");
        assert_eq!(error.lines().count(), 1, "{error}");
        assert!(error.contains(&*path.to_string_lossy()), "{error}");
        error
    };
    let error = check("flows:\n  deploy:\n    steps:\n      - { name: a, task: NoOp }\n      - { name: b, task: NoOp, revrt: NoOp }\n");
    assert!(
        error.contains("flows.deploy.steps[1]")
            && error.contains("revrt")
            && error.contains("line 5"),
        "{error}"
    );
    let error =
        check("flows:\n  deploy:\n    steps:\n      - { name: a, task: NoOp, revert: Unfetch }\n");
    assert!(
        error.contains(
            "flows.deploy.steps[0] (a).revert: unknown task type `Unfetch` (known: NoOp)"
        ),
        "{error}"
    );
    let error = check(
        "flows:\n  deploy:\n    steps:\n      - { name: a, task: NoOp, try_limit: 3000000000 }\n",
    );
    assert!(
        error.contains(
            "flows.deploy.steps[0] (a).try_limit: must be at least 1 and at most 2147483647"
        ),
        "{error}"
    );
    let error = check("flows:\n  deploy:\n    steps: []\n");
    assert!(
        error.contains("flows.deploy.steps: a flow needs at least one step"),
        "{error}"
    );
    let error = check(
        "flows:\n  deploy:\n    steps:\n      - { name: a, task: NoOp }\n    retri: { times: 1 }\n",
    );
    assert!(
        error.contains("flows.deploy") && error.contains("retri"),
        "{error}"
    );
}

both_backends!(forty_flows_taken_by_three_daemons_at_once_make_each_step_row_once);

/// Forty flows inserted in one statement, taken and advanced by three
/// daemons at once (one on SQLite): each flow is taken once, each step's
/// row is made once, every flow finishes.
async fn forty_flows_taken_by_three_daemons_at_once_make_each_step_row_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let config = "max_concurrent: 4\nflows:\n  quick:\n    steps:\n      - { name: a, task: NoOp, revert: NoOp, provides: a }\n      - { name: b, task: NoOp }\n      - { name: c, task: NoOp, provides: c }\n";
    let count = match backend {
        Backend::Sqlite => 1,
        Backend::Postgres | Backend::MySql => 3,
    };
    let mut daemons: Vec<Daemon> = (0..count)
        .map(|n| {
            Daemon::start(
                &db,
                &format!("d{n}"),
                &format!("host_id: host-{n}\n{config}"),
            )
        })
        .collect();
    // By hand: 40 flows started by one plain SQL statement.
    db.execute(&format!(
        "INSERT INTO task_runner_flows (flow_name, options) SELECT 'quick', 'n: ' || i FROM {}",
        crate::util::series(backend, 40)
    ))
    .await;
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_flows WHERE state = 'FINISHED'",
        40,
        LONG,
    )
    .await;
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE flow_id IS NOT NULL")
            .await,
        120
    );
    // One row per (flow, step), each run once, none a revert.
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM (SELECT flow_id, flow_step FROM task_runner_requests \
              WHERE flow_id IS NOT NULL GROUP BY flow_id, flow_step HAVING count(*) <> 1) dup"
        )
        .await,
        0
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE flow_id IS NOT NULL AND (tries <> 1 OR flow_action <> 'execute')")
            .await,
        0
    );
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM task_runner_flows WHERE attempt <> 1 OR store NOT LIKE '%NOOP%'"
        )
        .await,
        0
    );
    if count > 1 {
        // The work was shared.
        let hosts = db
            .scalar(
                "SELECT count(DISTINCT host) FROM task_runner_requests WHERE flow_id IS NOT NULL",
            )
            .await;
        println!("40 flows, 120 steps on {hosts} hosts");
    }
    for daemon in &mut daemons {
        assert!(daemon.stop().success());
    }
}

/// A flow's stored definition edited by an application while its first
/// step runs: the second step's `try_limit` is 0, which the tables refuse.
/// Before, the first step's end failed as a whole at the second step's
/// insert, and was retried for ever: that outcome and every later one of
/// the daemon were never recorded. Now the flow ends FAILED saying why,
/// the first step is FINISHED, and the daemon's other rows run on.
async fn a_step_row_the_database_refuses_ends_its_flow_failed_and_holds_up_no_outcome(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let gate = db.scratch.join("gate");
    let config = format!(
        "tasks:\n{}flows:\n  two:\n    steps:\n      - {{ name: first, task: Gate }}\n      - {{ name: second, task: NoOp }}\n",
        sh_task("Gate", &format!("until [ -e {} ]; do sleep 0.05; done", gate.display())),
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let flow = insert_flow(&db, "two", None).await;
    let (first, _) = first_step_running(&db, flow).await;
    db.execute(&format!(
        "UPDATE task_runner_flows SET definition = {} WHERE id = {flow}",
        quote("steps:\n- {name: first, task: Gate}\n- {name: second, task: NoOp, try_limit: 0}\n")
    ))
    .await;
    std::fs::write(&gate, "").unwrap();
    let ended = wait_for_flow(&db, flow, "FAILED", LONG).await;
    let why = ended.result_text.as_deref().unwrap_or_default();
    assert!(
        why.contains("the row of step 2 (second, execute) was refused by the database"),
        "{why}"
    );
    let row = db.wait_for_state(first, "FINISHED", LONG).await;
    assert_eq!(row.tries, 1, "{row:?}");
    let after = db.enqueue("NoOp", None).await;
    db.wait_for_state(after, "FINISHED", LONG).await;
    assert!(daemon
        .log_text()
        .contains(&format!("flow {flow} (two) FAILED")));
    assert!(daemon.stop().success());
}

/// Waits for flow `flow`'s first step to run; its row and pid.
async fn first_step_running(db: &TestDb, flow: i64) -> (taskrunner::request::RequestId, i32) {
    let id = poll(LONG, "the first step's row", async || {
        match db
            .scalar(&format!(
                "SELECT count(*) FROM task_runner_requests WHERE flow_id = {flow} AND pid IS NOT NULL"
            ))
            .await
        {
            1 => Ok(db
                .scalar(&format!(
                    "SELECT id FROM task_runner_requests WHERE flow_id = {flow}"
                ))
                .await),
            seen => Err(seen),
        }
    })
    .await;
    let id = taskrunner::request::RequestId(id);
    (id, db.row(id).await.pid.unwrap() as i32)
}

multi_host_backends!(an_application_holding_a_flows_row_holds_up_only_that_flows_outcomes);

/// An application's transaction that changed a flow's row (its own
/// column, say) and stays open while the flow's step ends: the step's end
/// needs the flow's lock. Before, the daemon's recorder waited for it, and
/// no other try's outcome was recorded until the application committed.
/// Now that one outcome is set aside and tried again, as for a batch's
/// lock, the others are recorded meanwhile, and once the application
/// commits the flow goes on. (Not SQLite: an application's write
/// transaction there holds every writer alike.)
async fn an_application_holding_a_flows_row_holds_up_only_that_flows_outcomes(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gate = db.scratch.join("gate");
    let config = format!(
        "max_concurrent: 4\ntasks:\n{}flows:\n  two:\n    steps:\n      - {{ name: first, task: Gate }}\n      - {{ name: second, task: NoOp }}\n",
        sh_task("Gate", &format!("until [ -e {} ]; do sleep 0.05; done", gate.display())),
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let flow = insert_flow(&db, "two", None).await;
    let (first, pid) = first_step_running(&db, flow).await;
    let holding = db
        .hold_after(&format!(
            "UPDATE task_runner_flows SET options = options WHERE id = {flow}"
        ))
        .await;
    std::fs::write(&gate, "").unwrap();
    wait_until(LONG, "the first step's end", || !process_exists(pid));
    set_aside_while_others_are_recorded(&db, &daemon, first, &format!("flow {flow}")).await;
    holding.release().await;
    wait_for_flow(&db, flow, "FINISHED", LONG).await;
    let row = db.row(first).await;
    assert_eq!((row.result.as_deref(), row.tries), (Some("FINISHED"), 1));
    assert!(daemon.stop().success());
}
