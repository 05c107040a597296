//! Preload (SPEC.md "Preload"): a program started once and forked for each
//! try, with task-sdk (the `preload-probe` example) and with the Python
//! example (examples/preload/preload_tasks.py).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{holds_for, process_exists, wait_until, zombie_children, Daemon, NewRow, TestDb};

const WAIT: Duration = Duration::from_secs(30);

both_backends!(
    preloaded_sdk_tries_run_like_execd_ones,
    preloaded_python_tries_run_like_execd_ones,
    a_timeout_kills_the_childs_group_and_not_the_parent,
    a_cancel_stops_the_child_and_not_the_parent,
    a_killed_child_crashes_and_reruns,
    a_killed_parent_leaves_running_tries_to_their_end,
    a_new_executable_or_a_reload_starts_a_new_parent,
    a_killed_daemon_takes_the_parent_and_its_children_down,
    a_program_that_does_not_speak_preload_is_execd,
    many_tries_at_once_each_get_their_own_child,
    a_preloaded_try_does_not_run_its_parents_exit_handlers,
    a_parent_that_stops_answering_is_replaced_and_costs_no_try,
    a_parent_killed_for_not_answering_that_lives_on_is_handed_no_more_tries,
    a_child_forked_by_a_parent_killed_while_stuck_runs_its_try_once,
    a_parent_that_boots_for_longer_than_the_cgroup_sweep_waits_runs_its_first_try,
    a_parent_whose_output_is_not_utf8_or_one_long_line_keeps_serving,
    a_parent_gone_just_before_a_request_is_sent_costs_no_try,
    commands_that_differ_in_their_arguments_get_a_parent_each,
    a_data_file_its_arguments_name_changing_at_each_try_keeps_its_parent,
    a_parent_that_names_a_process_not_its_child_gets_nothing_signalled,
    a_child_whose_answer_breaks_the_protocol_is_killed_before_its_try_is_execd,
    a_long_error_answer_fails_the_try_with_its_text_cut,
    a_preloaded_try_has_the_oom_score_and_open_files_limit_of_an_execd_one,
    a_try_run_as_another_user_below_the_daemons_nice_is_execd,
    a_parent_working_through_a_queue_of_requests_is_not_taken_for_a_stuck_one,
    large_requests_waiting_for_room_in_a_busy_parents_socket_are_not_taken_for_a_stuck_one,
    a_program_that_boots_for_long_holds_up_no_other_programs_tries,
    a_child_forked_by_a_parent_gone_before_its_answer_runs_its_try_once,
    a_parent_gone_whose_socket_a_process_it_started_holds_leaves_its_try_to_run_once,
    children_that_exited_before_their_parent_died_unanswered_end_their_own_tries,
    a_try_whose_request_is_larger_than_the_socket_takes_is_execd,
    a_parent_retired_in_order_exits_through_its_exit_handlers,
    a_retired_parent_that_does_not_exit_is_killed_after_the_grace,
    a_parent_retired_with_a_request_in_hand_answers_it_and_exits_in_order,
    a_cancel_while_the_program_boots_ends_the_try_and_keeps_the_boot,
    a_try_cancelled_while_its_program_boots_gets_no_child_after_the_boot,
    a_child_made_for_a_try_that_stopped_waiting_is_killed_with_its_group,
    a_parent_that_closes_its_socket_and_lives_on_is_not_left_behind,
    a_cancel_before_the_child_made_its_group_stops_it_at_once,
    a_python_task_that_exits_or_raises_leaves_its_child_by_exit,
    a_child_named_by_an_answer_no_request_waits_for_is_killed,
    a_parent_that_keeps_dying_is_started_again_with_a_growing_delay,
);

/// The task-sdk probe, built beside the daemon (`cargo build --workspace --bins`).
fn sdk_probe() -> PathBuf {
    crate::util::built_beside_the_daemon("preload-probe")
}

fn python_probe() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/preload/preload_tasks.py")
}

/// Writes `path`: a Python program that loads the example (its tasks, its
/// preload protocol) as `program`, runs `changes` (Python), then the
/// example's `main`. The example's functions see their own module through
/// `program['serve_preloaded'].__globals__`.
fn python_example_with(path: &std::path::Path, changes: &str) {
    let text = format!(
        "import os, resource, runpy, sys, time\n\
         program = runpy.run_path({:?}, run_name='preload_tasks')\n\
         {changes}\n\
         sys.exit(program['main']())\n",
        python_probe().display().to_string()
    );
    std::fs::write(path, text).unwrap();
}

/// The config of a daemon whose type `PyProbe` runs `program` (Python),
/// preloaded.
fn python_preloaded(program: &std::path::Path) -> String {
    format!(
        "tasks:\n  PyProbe: {{command: [python3, {}], preload: true}}\n",
        program.display()
    )
}

fn preloaded(program: &std::path::Path) -> String {
    format!(
        "programs: [{{path: {}, preload: true}}]\nenv: {{PROBE_VAR: hello}}\n",
        program.display()
    )
}

/// The probe's `key: value` report.
fn report(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once(": "))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

async fn enqueue(db: &TestDb, task: &str, options: &str) -> taskrunner::request::RequestId {
    db.insert_row(NewRow::new(task).options(options).try_limit(1))
        .await
}

/// The pid of the preloaded parent the daemon started last, from its log.
fn parent_pid(daemon: &Daemon) -> i32 {
    let log = daemon.log_text();
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains(" preloaded (pid "))
        .unwrap_or_else(|| panic!("no preloaded parent in the log:\n{log}"));
    let pid = line.rsplit_once("(pid ").unwrap().1.trim_end_matches(')');
    pid.parse().unwrap()
}

/// Runs the same requests exec'd and preloaded; the rows must agree, and
/// the preloaded tries must be forked children of one parent, each its own
/// process group with descriptors 0-2 only, each with fresh memory.
async fn tries_run_like_execd_ones(db: &TestDb, program: &std::path::Path, task: &str, sdk: bool) {
    let mut cases = vec![
        ("", "FINISHED"),
        ("sleep_ms: 100", "FINISHED"),
        ("fail: nope", "FAILED"),
    ];
    if sdk {
        cases.push(("bad: 1", "REJECTED"));
    }
    let mut results = Vec::new();
    let workdir = format!("workdir: {}\n", db.scratch.path.display());
    for (name, config) in [
        (
            "exec",
            format!(
                "programs: [{}]\nenv: {{PROBE_VAR: hello}}\n{workdir}",
                program.display()
            ),
        ),
        ("preload", format!("{}{workdir}", preloaded(program))),
    ] {
        let mut daemon = Daemon::start(db, name, &config);
        let mut rows = Vec::new();
        for (options, _) in &cases {
            let id = enqueue(db, task, options).await;
            rows.push(
                db.wait_for(id, WAIT, "final", |r| {
                    r.result.as_deref().is_some_and(|s| s != "RUNNING")
                })
                .await,
            );
        }
        assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
        let daemon_pid = daemon.pid();
        assert!(daemon.stop().success());
        results.push((name, daemon_pid, rows, daemon.log_text()));
    }
    let (_, _, execd, _) = &results[0];
    let (_, daemon_pid, forked, log) = &results[1];
    assert!(log.contains(" preloaded (pid "), "log:\n{log}");
    let mut parents = Vec::new();
    for ((execd, forked), (_, state)) in execd.iter().zip(forked).zip(&cases) {
        assert_eq!(execd.result.as_deref(), Some(*state), "{execd:#?}");
        assert_eq!(forked.result, execd.result, "{forked:#?}");
        if *state != "FINISHED" {
            let text = |row: &taskrunner::request::Request| {
                let text = row.result_text.clone().unwrap_or_default();
                text.replace(&format!("of request {}", row.id), "of request ID")
            };
            assert_eq!(text(forked), text(execd));
            continue;
        }
        let execd_report = report(execd.result_text.as_deref().unwrap());
        let forked_report = report(forked.result_text.as_deref().unwrap());
        for key in ["fds", "tries_seen", "cwd"] {
            assert_eq!(
                forked_report.get(key),
                execd_report.get(key),
                "{key}: {forked_report:?}"
            );
        }
        let without_id = |report: &BTreeMap<String, String>, id: i64| {
            report["env"].replace(&format!("TASKRUNNER_REQUEST_ID={id}"), "ID")
        };
        assert_eq!(
            without_id(&forked_report, forked.id),
            without_id(&execd_report, execd.id)
        );
        assert!(
            forked_report["env"].contains("PROBE_VAR=hello"),
            "{forked_report:?}"
        );
        assert_eq!(forked_report["fds"], "[0, 1, 2]");
        assert_eq!(forked_report["tries_seen"], "1", "fork isolation");
        assert_eq!(
            forked_report["pgid"], forked_report["pid"],
            "own process group"
        );
        assert_eq!(
            forked_report["ppid"],
            daemon_pid.to_string(),
            "the daemon's child"
        );
        // Exec'd, the setup ran in the try itself; preloaded, in the parent.
        assert_eq!(execd_report["booted_in"], execd_report["pid"]);
        assert_ne!(forked_report["booted_in"], forked_report["pid"]);
        parents.push(forked_report["booted_in"].clone());
    }
    parents.dedup();
    assert_eq!(parents.len(), 1, "one parent for every try: {parents:?}");
}

async fn preloaded_sdk_tries_run_like_execd_ones(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    tries_run_like_execd_ones(&db, &sdk_probe(), "Probe", true).await;
}

async fn preloaded_python_tries_run_like_execd_ones(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    tries_run_like_execd_ones(&db, &python_probe(), "PyProbe", false).await;
}

async fn a_timeout_kills_the_childs_group_and_not_the_parent(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let config = format!(
        "{}tasks: {{Probe: {{timeout: 1s}}}}\n",
        preloaded(&sdk_probe())
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let id = enqueue(&db, "Probe", "sleep_ms: 60000").await;
    let row = db.wait_for_state(id, "TIMEOUT", WAIT).await;
    assert!(row.result_text.unwrap().starts_with("timed out after 1s"));
    let parent = parent_pid(&daemon);
    assert!(
        process_exists(parent),
        "the parent outlives its child's timeout"
    );
    let id = enqueue(&db, "Probe", "").await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(
        report(&row.result_text.unwrap())["booted_in"],
        parent.to_string()
    );
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

async fn a_cancel_stops_the_child_and_not_the_parent(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &preloaded(&sdk_probe()));
    let id = enqueue(&db, "Probe", "sleep_ms: 60000").await;
    let running = db.wait_for_pid(id, WAIT).await;
    let (status, _, stderr) = crate::util::cli(&db, &["cancel", &id.to_string()]);
    assert_eq!(status, 0, "{stderr}");
    let row = db.wait_for_state(id, "CANCELLED", WAIT).await;
    assert!(row.result_text.unwrap().starts_with("cancelled by a user"));
    assert!(!process_exists(running.pid.unwrap() as i32));
    assert!(
        process_exists(parent_pid(&daemon)),
        "the parent is unharmed"
    );
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

async fn a_killed_child_crashes_and_reruns(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &preloaded(&sdk_probe()));
    let id = db
        .insert_row(
            NewRow::new("Probe")
                .options("first_try_sleep_ms: 60000")
                .try_limit(2),
        )
        .await;
    db.kill_running_try(id).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 2);
    assert!(
        process_exists(parent_pid(&daemon)),
        "the parent is unharmed"
    );
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

async fn a_killed_parent_leaves_running_tries_to_their_end(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let config = format!("{}max_concurrent: 4\n", preloaded(&sdk_probe()));
    let mut daemon = Daemon::start(&db, "d", &config);
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(enqueue(&db, "Probe", "sleep_ms: 2000").await);
    }
    for &id in &ids {
        db.wait_for_pid(id, WAIT).await;
    }
    let parent = parent_pid(&daemon);
    kill(Pid::from_raw(parent), Signal::SIGKILL).unwrap();
    for &id in &ids {
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        assert_eq!(row.tries, 1, "{row:#?}");
        assert_eq!(
            report(&row.result_text.unwrap())["booted_in"],
            parent.to_string()
        );
    }
    daemon.wait_for_log("died; tries already running go on", WAIT);
    let id = enqueue(&db, "Probe", "").await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    let new_parent = report(&row.result_text.unwrap())["booted_in"].clone();
    assert_ne!(new_parent, parent.to_string(), "a new parent");
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

async fn a_new_executable_or_a_reload_starts_a_new_parent(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("probe");
    crate::util::copy_executable(&sdk_probe(), &program);
    let mut daemon = Daemon::start(&db, "d", &preloaded(&program));
    let booted_in =
        |row: taskrunner::request::Request| report(&row.result_text.unwrap())["booted_in"].clone();
    let id = enqueue(&db, "Probe", "").await;
    let first = booted_in(db.wait_for_state(id, "FINISHED", WAIT).await);
    // A deploy: a new file renamed over the old one.
    let staged = db.scratch.join("probe.new");
    crate::util::copy_executable(&sdk_probe(), &staged);
    std::fs::rename(&staged, &program).unwrap();
    let id = enqueue(&db, "Probe", "").await;
    let second = booted_in(db.wait_for_state(id, "FINISHED", WAIT).await);
    assert_ne!(first, second, "a new parent after the executable changed");
    assert!(daemon.log_text().contains("changed on disk"));
    wait_until(WAIT, "the old parent to be retired", || {
        !process_exists(first.parse().unwrap())
    });
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_log("config reloaded", WAIT);
    let id = enqueue(&db, "Probe", "").await;
    let third = booted_in(db.wait_for_state(id, "FINISHED", WAIT).await);
    assert_ne!(second, third, "a new parent after a reload");
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

async fn a_killed_daemon_takes_the_parent_and_its_children_down(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &preloaded(&sdk_probe()));
    let id = enqueue(&db, "Probe", "sleep_ms: 60000").await;
    let row = db.wait_for_pid(id, WAIT).await;
    let child = row.pid.unwrap() as i32;
    let parent = parent_pid(&daemon);
    daemon.kill();
    wait_until(
        Duration::from_secs(10),
        "the parent and the child to die",
        || !process_exists(child) && !process_exists(parent),
    );
}

/// A command that does not speak the protocol (it exits before any hello):
/// one line, and its tries are exec'd. A task-sdk program whose setup left
/// a thread running refuses to preload and says why.
async fn a_program_that_does_not_speak_preload_is_execd(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let config = format!(
        "programs: [{{path: {}, preload: true}}]\ntasks: {{Echo: {{command: [/bin/echo, hi], preload: true}}}}\nenv: {{PROBE_SETUP_THREAD: '1'}}\n",
        sdk_probe().display()
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    for _ in 0..2 {
        let id = enqueue(&db, "Echo", "").await;
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        assert_eq!(row.result_text.as_deref().map(str::trim), Some("hi"));
        let id = enqueue(&db, "Probe", "").await;
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        let report = report(&row.result_text.unwrap());
        assert_eq!(report["booted_in"], report["pid"], "exec'd");
    }
    assert!(daemon.stop().success());
    let log = daemon.log_text();
    assert_eq!(
        log.matches("/bin/echo does not speak the preload protocol (it exited with exit status: 0 before its hello); its tries are exec'd").count(),
        1,
        "log:\n{log}"
    );
    assert_eq!(
        log.matches("preload-probe does not speak the preload protocol")
            .count(),
        1,
        "log:\n{log}"
    );
    assert!(
        log.contains("cannot fork: 2 threads are alive, and a fork copies only the calling one"),
        "log:\n{log}"
    );
}

/// Requests to one parent are pipelined (the next is sent before the last
/// answer arrives) and answers are matched to them in order: with 8 slots
/// and 32 tries, half failing, every try must be supervised through its own
/// child (a child matched to another try's request would give that try its
/// exit status, and a report naming another request).
async fn many_tries_at_once_each_get_their_own_child(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let config = format!("{}max_concurrent: 8\n", preloaded(&sdk_probe()));
    let mut ids = Vec::new();
    for index in 0..32 {
        let options = if index % 2 == 0 {
            format!("sleep_ms: {}", index % 5)
        } else {
            format!("fail: boom {index}")
        };
        ids.push((index, enqueue(&db, "Probe", &options).await));
    }
    let mut daemon = Daemon::start(&db, "d", &config);
    let parent = parent_pid_when_logged(&daemon);
    for (index, id) in ids {
        let state = if index % 2 == 0 { "FINISHED" } else { "FAILED" };
        let row = db.wait_for_state(id, state, WAIT).await;
        let text = row.result_text.unwrap_or_default();
        if index % 2 == 0 {
            let report = report(&text);
            assert!(
                report["env"].contains(&format!("\"TASKRUNNER_REQUEST_ID={id}\"")),
                "{text}"
            );
            assert_eq!(report["booted_in"], parent.to_string(), "{text}");
        } else {
            assert!(text.contains(&format!("boom {index}")), "{text}");
        }
    }
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

/// [`parent_pid`] once the daemon has logged it.
/// The exit handlers a setup registers (atexit: a C library's clean-up, a
/// handler that removes the setup's temporary files) belong to the process
/// that ran the setup. Exec'd, that is the try, which runs them at its
/// exit; preloaded, it is the parent, and a forked child leaves with
/// `_exit` without running them (else each try would run the parent's
/// clean-up: flush its buffers again, remove its files under it).
async fn a_preloaded_try_does_not_run_its_parents_exit_handlers(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let notes = db.scratch.join("exit-handlers");
    for preload in [false, true] {
        let config = format!(
            "programs: [{{path: {}, preload: {preload}}}]\nenv: {{PROBE_ATEXIT_FILE: {}}}\n",
            sdk_probe().display(),
            notes.display()
        );
        let mut daemon = Daemon::start(&db, &format!("d-{preload}"), &config);
        let mut pids = Vec::new();
        for _ in 0..2 {
            let id = enqueue(&db, "Probe", "").await;
            let row = db.wait_for_state(id, "FINISHED", WAIT).await;
            pids.push(report(&row.result_text.unwrap())["pid"].clone());
        }
        let ran = std::fs::read_to_string(&notes).unwrap_or_default();
        for pid in &pids {
            let line = format!("exit handler ran in {pid}\n");
            if preload {
                assert!(!ran.contains(&line), "a preloaded try ran them: {ran:?}");
            } else {
                assert!(ran.contains(&line), "an exec'd try runs them: {ran:?}");
            }
        }
        assert!(daemon.stop().success());
        let _ = std::fs::remove_file(&notes);
    }
}

/// A preloaded parent that stops answering (here stopped with `SIGSTOP`;
/// a deadlock or an endless loop looks the same): the request for a fork
/// waits 10 s for its answer, then the parent is retired (killed, reaped)
/// and the try is started by a new one. The wait is the daemon's, not the
/// task's: each row, which allows one try, still runs and finishes on it.
/// Four requests of 100 KB each (a large `env:`) fill the socket's buffer
/// while the parent reads none: the send that found it full held the
/// daemon's one thread, its 10 s included, for as long as the parent slept.
async fn a_parent_that_stops_answering_is_replaced_and_costs_no_try(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let config = format!(
        "programs: [{{path: {}, preload: true}}]\nmax_concurrent: 4\nenv: {{PROBE_VAR: hello, BULK: {}}}\n",
        sdk_probe().display(),
        "x".repeat(100_000)
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let booted_in =
        |row: taskrunner::request::Request| report(&row.result_text.unwrap())["booted_in"].clone();
    let id = enqueue(&db, "Probe", "").await;
    let first = booted_in(db.wait_for_state(id, "FINISHED", WAIT).await);
    let parent: i32 = first.parse().unwrap();
    kill(Pid::from_raw(parent), Signal::SIGSTOP).unwrap();
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(enqueue(&db, "Probe", "").await);
    }
    for id in ids {
        let row = finished_on_one_try(&db, id, &daemon, WAIT).await;
        assert_ne!(booted_in(row), first, "a new parent");
    }
    let log = daemon.log_text();
    wait_until(WAIT, "the stopped parent to be retired", || {
        !process_exists(parent)
    });
    assert!(log.contains("did not answer a request within 10s"), "{log}");
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

/// Whether a process can be frozen here (root, and the cgroup v1 freezer,
/// where a frozen process killed with SIGKILL lives on until it is thawed,
/// as one in uninterruptible sleep does); says it skips when not.
fn can_freeze() -> bool {
    let can = crate::util::runs_as_root("freezes a process in a cgroup")
        && std::path::Path::new(FREEZER).is_dir();
    if !can {
        println!("skipped: no cgroup v1 freezer");
    }
    can
}

const FREEZER: &str = "/sys/fs/cgroup/freezer";

/// A process frozen in a cgroup of its own: thawed, and the cgroup
/// removed, whatever the test's end.
struct Frozen(std::path::PathBuf);

impl Frozen {
    fn freeze(db: &TestDb, pid: i32) -> Frozen {
        let frozen = Frozen(std::path::Path::new(FREEZER).join(format!(
            "taskrunner-test-{}",
            db.scratch.path.file_name().unwrap().to_string_lossy()
        )));
        std::fs::create_dir(&frozen.0).unwrap();
        std::fs::write(frozen.0.join("cgroup.procs"), pid.to_string()).unwrap();
        std::fs::write(frozen.0.join("freezer.state"), "FROZEN").unwrap();
        wait_until(WAIT, "the process frozen", || {
            std::fs::read_to_string(frozen.0.join("freezer.state"))
                .is_ok_and(|s| s.trim() == "FROZEN")
        });
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("freezer.state"), "THAWED");
        let _ = crate::util::within(WAIT, || {
            std::fs::read_to_string(self.0.join("cgroup.procs")).is_ok_and(|p| p.is_empty())
        });
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A parent killed for not answering that does not die at once (in
/// uninterruptible sleep: here frozen by the cgroup v1 freezer, where a
/// SIGKILL waits for the thaw) is handed no more tries: each goes to a new
/// parent and costs no try. Before, the killed parent still counted as
/// alive until it was reaped: every try waited for its answer and the
/// search for its orphans, then failed.
async fn a_parent_killed_for_not_answering_that_lives_on_is_handed_no_more_tries(
    backend: crate::util::Backend,
) {
    if !can_freeze() {
        return;
    }
    let db = TestDb::new(backend).await;
    let mut daemon = db
        .daemon("d")
        .yaml(&format!(
            "programs: [{{path: {}, preload: true}}]\n",
            sdk_probe().display()
        ))
        .env("TASKRUNNER_TEST_PRELOAD_REPLY_TIMEOUT_MS", "1000")
        .start();
    let booted_in =
        |row: taskrunner::request::Request| report(&row.result_text.unwrap())["booted_in"].clone();
    let id = enqueue(&db, "Probe", "").await;
    let first = booted_in(finished_on_one_try(&db, id, &daemon, WAIT).await);
    let frozen = Frozen::freeze(&db, first.parse().unwrap());
    for _ in 0..2 {
        let id = enqueue(&db, "Probe", "").await;
        let row = finished_on_one_try(&db, id, &daemon, WAIT).await;
        assert_ne!(booted_in(row), first, "a new parent");
    }
    let log = daemon.log_text();
    assert_eq!(
        log.matches("did not answer a request").count(),
        1,
        "one try waited for the frozen parent\n{log}"
    );
    drop(frozen);
    assert!(daemon.stop().success());
}

/// A parent that forks for a request and then stops answering, stuck
/// (frozen here: its SIGKILL waits for the thaw, as in uninterruptible
/// sleep): its socket stays open, and the search for its orphans at its
/// end never ran. The try was asked of a new parent beside the child
/// already running it: its task ran twice at once. Now the child, found
/// holding the try's pipes, runs the try, supervised.
async fn a_child_forked_by_a_parent_killed_while_stuck_runs_its_try_once(
    backend: crate::util::Backend,
) {
    if !can_freeze() {
        return;
    }
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("stuck_after_fork.py");
    let runs = db.scratch.join("runs");
    let forked = db.scratch.join("forked");
    python_example_with(
        &program,
        &format!(
            "fork_try = program['serve_preloaded'].__globals__['fork_try']\n\
             def stuck(daemon, request, fds):\n    \
                 pid = fork_try(daemon, request, fds)\n    \
                 if not os.path.exists({forked:?}):\n        \
                     with open({forked:?}, 'w') as note:\n            \
                         note.write(str(os.getpid()))\n        \
                     time.sleep(600)\n    \
                 return pid\n\
             program['serve_preloaded'].__globals__['fork_try'] = stuck\n\
             def counted(text):\n    \
                 with open({runs:?}, 'a') as runs:\n        \
                     runs.write('ran\\n')\n    \
                 time.sleep(4)\n    \
                 return 'ran once'\n\
             program['TASKS']['PyProbe'] = counted",
            forked = forked.display().to_string(),
            runs = runs.display().to_string(),
        ),
    );
    let mut daemon = db
        .daemon("d")
        .yaml(&python_preloaded(&program))
        .env("TASKRUNNER_TEST_PRELOAD_REPLY_TIMEOUT_MS", "1000")
        .start();
    let id = enqueue(&db, "PyProbe", "").await;
    wait_until(WAIT, "the parent forked", || {
        std::fs::read_to_string(&forked).is_ok_and(|pid| !pid.is_empty())
    });
    let parent: i32 = std::fs::read_to_string(&forked).unwrap().parse().unwrap();
    let frozen = Frozen::freeze(&db, parent);
    let row = finished_on_one_try(&db, id, &daemon, WAIT).await;
    assert_eq!(row.result_text.as_deref(), Some("ran once"));
    let log = daemon.log_text();
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "ran\n",
        "the task ran once\n{log}"
    );
    assert!(
        log.contains("stopped before its answer; its child"),
        "{log}"
    );
    drop(frozen);
    assert!(daemon.stop().success());
}

/// A preloaded program that boots for longer than the sweep of old empty
/// cgroups waits (10 s; every reaper pass sweeps). Its first try's cgroup is
/// made before the boot and stays empty until the child joins it: a sweep
/// took it meanwhile, the child could not join it, and the try failed with
/// exit status 127. The start now keeps the cgroup young while it waits.
/// (Without cgroups in force there is nothing to sweep; CI has them.)
async fn a_parent_that_boots_for_longer_than_the_cgroup_sweep_waits_runs_its_first_try(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let config = format!(
        "programs: [{{path: {}, preload: true}}]\nenv: {{PROBE_SETUP_MS: '13000'}}\nreap_interval: 1s\n",
        sdk_probe().display()
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let id = enqueue(&db, "Probe", "").await;
    finished_on_one_try(&db, id, &daemon, Duration::from_secs(60)).await;
    assert!(daemon.stop().success());
}

/// The row once it ended, which must be FINISHED on its one try (else the
/// daemon's log is shown).
/// A preloaded parent's stdout and stderr go to the daemon's log, a line at
/// a time. Read as text, a byte that was not UTF-8 ended the reading for
/// good: the pipe closed, and the parent's next write failed (here Python's
/// BrokenPipeError, in its boot, so that its tries were exec'd, each booting
/// anew); and a line without an end was held whole in the daemon's memory.
/// Now such bytes are shown replaced, a long line is logged in pieces of at
/// most 4 KiB, and the one parent serves every try.
async fn a_parent_whose_output_is_not_utf8_or_one_long_line_keeps_serving(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let noisy = db.scratch.join("noisy_preload.py");
    crate::util::write_executable(
        &noisy,
        format!(
            r#"#!/usr/bin/env python3
import os, runpy, sys
if os.environ.get("TASKRUNNER_PRELOAD") == "1":
    sys.stderr.buffer.write(b"booting caf\xe9 \xff\n" + b"x" * 100000 + b"\nbooted\n")
    sys.stderr.flush()
runpy.run_path({:?}, run_name="__main__")
"#,
            python_probe().display().to_string()
        ),
    );
    let mut daemon = Daemon::start(&db, "d", &preloaded(&noisy));
    let mut booted_in = Vec::new();
    for _ in 0..3 {
        let id = enqueue(&db, "PyProbe", "").await;
        let row = finished_on_one_try(&db, id, &daemon, WAIT).await;
        booted_in.push(report(&row.result_text.unwrap())["booted_in"].clone());
    }
    let log = daemon.log_text();
    let parent = parent_pid(&daemon).to_string();
    assert!(
        booted_in.iter().all(|pid| *pid == parent),
        "{booted_in:?}\n{log}"
    );
    assert!(
        log.contains("stderr: booting caf\u{FFFD} \u{FFFD}"),
        "{log}"
    );
    assert!(log.contains("stderr: booted"), "{log}");
    assert!(log.lines().all(|line| line.len() < 4096 + 200), "{log}");
    assert!(!log.contains("does not speak"), "{log}");
    assert!(daemon.stop().success());
}

/// A parent that closes its socket right after its hello (it crashed, or
/// was killed, just then): the request sent to it fails at once (EPIPE),
/// before the daemon has read the socket's end. That failure was taken for
/// the try's own and recorded FAILED, its try counted; now the parent is
/// known dead there too, and a new one starts the try.
async fn a_parent_gone_just_before_a_request_is_sent_costs_no_try(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let once = db.scratch.join("gone_once");
    let program = db.scratch.join("gone_preload.py");
    crate::util::write_executable(
        &program,
        format!(
            r#"#!/usr/bin/env python3
import os, runpy, sys, time
if os.environ.get("TASKRUNNER_PRELOAD") == "1" and not os.path.exists({once:?}):
    open({once:?}, "w").close()
    os.write(0, b"hello\0taskrunner-preload-1\0")
    os.close(0)
    time.sleep(2)
    sys.exit(0)
runpy.run_path({probe:?}, run_name="__main__")
"#,
            once = once.display().to_string(),
            probe = python_probe().display().to_string()
        ),
    );
    let mut daemon = Daemon::start(&db, "d", &preloaded(&program));
    let id = enqueue(&db, "PyProbe", "").await;
    finished_on_one_try(&db, id, &daemon, WAIT).await;
    assert!(once.exists(), "the first parent ran");
    assert!(daemon.stop().success());
}

/// A parent that answered a request with something else than the child it
/// forked for it (here a malformed answer: one field too many) breaks the
/// protocol, and its program's tries are exec'd from then on. That try was
/// exec'd at once, beside the child forked for it, which ran the task on
/// unknown to the daemon and stayed a zombie once it ended. The child is
/// found by its pipes and killed before the try is exec'd.
async fn a_child_whose_answer_breaks_the_protocol_is_killed_before_its_try_is_execd(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let running = db.scratch.join("running");
    std::fs::create_dir(&running).unwrap();
    let log = db.scratch.join("runs.log");
    let program = db.scratch.join("broken_answer.py");
    python_example_with(
        &program,
        &format!(
            "RUNNING, LOG = {running:?}, {log:?}\n\
             def alive(pid):\n    \
                 try:\n        \
                     with open(f'/proc/{{pid}}/stat') as stat:\n            \
                         return stat.read().rsplit(')', 1)[1].split()[0] != 'Z'\n    \
                 except OSError:\n        \
                     return False\n\
             def Twice(text):\n    \
                 beside = [pid for pid in os.listdir(RUNNING) if alive(int(pid))]\n    \
                 open(os.path.join(RUNNING, str(os.getpid())), 'w').close()\n    \
                 with open(LOG, 'a') as log:\n        \
                     log.write(f'start beside {{beside}}\\n')\n    \
                 time.sleep(1.5)\n    \
                 return 'done'\n\
             program['TASKS']['Twice'] = Twice\n\
             fork_try = program['fork_try']\n\
             def malformed(daemon, request, fds):\n    \
                 return f'{{fork_try(daemon, request, fds)}}\\0more'\n\
             program['serve_preloaded'].__globals__['fork_try'] = malformed",
            running = running.display().to_string(),
            log = log.display().to_string(),
        ),
    );
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  Twice: {{command: [python3, {}], preload: true}}\n",
            program.display()
        ),
    );
    let id = enqueue(&db, "Twice", "").await;
    let row = finished_on_one_try(&db, id, &daemon, WAIT).await;
    assert_eq!(row.result_text.as_deref(), Some("done"));
    let runs = std::fs::read_to_string(&log).unwrap();
    assert!(
        runs.lines().all(|line| line == "start beside []"),
        "the try ran beside another run of itself:\n{runs}"
    );
    let said = daemon.log_text();
    assert!(
        said.contains("does not speak the preload protocol"),
        "{said}"
    );
    wait_until(WAIT, "no zombie child of the daemon", || {
        zombie_children(daemon.pid()).is_empty()
    });
    assert!(daemon.stop().success());
}

/// A parent that cannot fork and answers `error` with a long text (a
/// backtrace of 20 KB): the daemon read at most 4 KiB of an answer, the
/// cut answer had lost its last NUL, and the program was taken for one
/// that does not speak the protocol (its tries exec'd until a reload).
/// The try now fails with the text, cut.
async fn a_long_error_answer_fails_the_try_with_its_text_cut(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("long_error.py");
    python_example_with(
        &program,
        "def cannot(daemon, request, fds):\n    \
             raise RuntimeError('no fork: ' + 'x' * 20000)\n\
         program['serve_preloaded'].__globals__['fork_try'] = cannot",
    );
    let mut daemon = Daemon::start(&db, "d", &python_preloaded(&program));
    let id = db
        .insert_row(NewRow::new("PyProbe").options("quiet: true").try_limit(1))
        .await;
    let row = db.wait_for_state(id, "FAILED", WAIT).await;
    let text = row.result_text.unwrap_or_default();
    assert!(
        text.starts_with(
            "cannot start python3: the preloaded parent could not fork: no fork: xxxx"
        ),
        "{}",
        &text[..text.len().min(300)]
    );
    let log = daemon.log_text();
    assert!(!log.contains("does not speak"), "{log}");
    assert!(daemon.stop().success());
}

async fn finished_on_one_try(
    db: &TestDb,
    id: taskrunner::request::RequestId,
    daemon: &Daemon,
    within: Duration,
) -> taskrunner::request::Request {
    let row = db
        .wait_for(id, within, "the try to end", |row| {
            row.result
                .as_deref()
                .is_some_and(|result| result != "RUNNING")
        })
        .await;
    let log = daemon.log_text();
    assert_eq!(row.result.as_deref(), Some("FINISHED"), "{row:#?}\n{log}");
    assert_eq!(row.tries, 1, "{row:#?}");
    row
}

fn parent_pid_when_logged(daemon: &Daemon) -> i32 {
    daemon.wait_for_log(" preloaded (pid ", WAIT);
    parent_pid(daemon)
}

/// Two preloaded command types running one interpreter on two scripts
/// (`[python3, a.py]`, `[python3, b.py]`): each type's tries are forked from
/// its own script's parent, and a deploy of a script (not of `python3`)
/// starts a new parent. Before, parents were keyed by the program alone:
/// the second type's tries ran in the first type's script, and a new
/// script was never noticed.
async fn commands_that_differ_in_their_arguments_get_a_parent_each(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    // Each script serves both types and answers with its own name.
    let script = |name: &str, version: u32| {
        let path = db.scratch.join(name);
        let staged = db.scratch.join(format!("{name}.new").as_str());
        python_example_with(
            &staged,
            &format!(
                "booted_in = os.getpid()\n\
                 for name in ('A', 'B'):\n    \
                     program['TASKS'][name] = lambda text: '{name} {version} ' + str(booted_in)"
            ),
        );
        std::fs::rename(&staged, &path).unwrap();
        path
    };
    let (a, b) = (script("a.py", 1), script("b.py", 1));
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  A: {{command: [python3, {}], preload: true}}\n  B: {{command: [python3, {}], preload: true}}\n",
            a.display(),
            b.display()
        ),
    );
    let ran = async |task: &str| {
        let id = enqueue(&db, task, "").await;
        let row = finished_on_one_try(&db, id, &daemon, WAIT).await;
        let text = row.result_text.unwrap();
        let (script, booted_in) = text.rsplit_once(' ').unwrap();
        (script.to_string(), booted_in.to_string())
    };
    let (from_a, a_parent) = ran("A").await;
    let (from_b, b_parent) = ran("B").await;
    assert_eq!((from_a.as_str(), from_b.as_str()), ("a.py 1", "b.py 1"));
    assert_ne!(a_parent, b_parent, "a parent each");
    assert_eq!(
        ran("A").await,
        (from_a, a_parent.clone()),
        "the same parent again"
    );
    // A deploy of b.py: a new file renamed over the old one.
    script("b.py", 2);
    let (deployed, new_parent) = ran("B").await;
    assert_eq!(deployed, "b.py 2");
    assert_ne!(new_parent, b_parent);
    assert_eq!(ran("A").await.1, a_parent, "a.py's parent serves on");
    assert!(daemon.log_text().contains("changed on disk"));
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

/// A parent whose answer names a process that is not a child it forked
/// (here a bystander, then after a reload the daemon itself: a bug, or a
/// program bent on it) gets no signal sent: the program is taken for one
/// that does not speak the protocol (one line naming the pid), its tries
/// are exec'd, and the bystander and the daemon live on. Before, the daemon
/// killed whatever process the answer named (the bystander, and itself).
async fn a_parent_that_names_a_process_not_its_child_gets_nothing_signalled(
    backend: crate::util::Backend,
) {
    /// Killed when the test ends, whichever way.
    struct Bystander(std::process::Child);
    impl Drop for Bystander {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let db = TestDb::new(backend).await;
    let mut bystander = Bystander(
        std::process::Command::new("sleep")
            .arg("600")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let once = db.scratch.join("named-the-bystander");
    let program = db.scratch.join("lying.py");
    python_example_with(
        &program,
        &format!(
            "def lie(daemon, request, fds):\n    \
                 if not os.path.exists({once:?}):\n        \
                     open({once:?}, 'w').close()\n        \
                     return {victim}\n    \
                 return request['daemon_pid']\n\
             program['serve_preloaded'].__globals__['fork_try'] = lie",
            once = once.display().to_string(),
            victim = bystander.0.id()
        ),
    );
    let mut daemon = Daemon::start(&db, "d", &python_preloaded(&program));
    for lie in 1..=2 {
        if lie == 2 {
            // A new parent, which names the daemon.
            daemon.signal(Signal::SIGHUP);
            daemon.wait_for_log("config reloaded", WAIT);
        }
        let id = enqueue(&db, "PyProbe", "").await;
        finished_on_one_try(&db, id, &daemon, WAIT).await;
        let log = daemon.log_text();
        assert_eq!(
            log.matches("is not the daemon's child").count(),
            lie,
            "{log}"
        );
        assert!(
            bystander.0.try_wait().unwrap().is_none(),
            "the bystander was killed"
        );
    }
    assert!(once.exists());
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

/// A file the program's own arguments name, after the script, is its data,
/// not its code: `[python3, app.py, data.txt]` whose tries write
/// `data.txt` keeps one parent. Before, every argument's file was watched,
/// and the parent was retired and booted again at every try (a preloaded
/// program slower than an exec'd one, a line in the log each time).
async fn a_data_file_its_arguments_name_changing_at_each_try_keeps_its_parent(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("writes_its_data.py");
    let data = db.scratch.join("data.txt");
    std::fs::write(&data, "").unwrap();
    python_example_with(
        &program,
        "def writes(text):\n    \
             with open(sys.argv[1], 'a') as data:\n        \
                 data.write('try\\n')\n    \
             return 'ok'\n\
         program['TASKS']['PyProbe'] = writes",
    );
    let mut daemon = db
        .daemon("d")
        .yaml(&format!(
            "tasks:\n  PyProbe: {{command: [python3, {}, {}], preload: true}}\n",
            program.display(),
            data.display()
        ))
        .start();
    for _ in 0..3 {
        let id = enqueue(&db, "PyProbe", "").await;
        finished_on_one_try(&db, id, &daemon, WAIT).await;
    }
    let log = daemon.log_text();
    assert_eq!(std::fs::read_to_string(&data).unwrap(), "try\n".repeat(3));
    assert_eq!(
        log.matches(" preloaded (pid ").count(),
        1,
        "one parent\n{log}"
    );
    assert!(!log.contains("changed on disk"), "{log}");
    assert!(daemon.stop().success());
}

/// A root daemon's try run as another user at a nice value below the
/// daemon's: the preloaded parent, run as that user at the daemon's
/// priority, has children that may not lower it. Before, each such try
/// failed (the child exits 127); now the type's tries are exec'd, which
/// sets the nice value before it drops to the user, with one line.
async fn a_try_run_as_another_user_below_the_daemons_nice_is_execd(backend: crate::util::Backend) {
    if !crate::util::runs_as_root("running a task as another user needs a root daemon") {
        return;
    }
    let db = TestDb::new(backend).await;
    let mut daemon = db
        .daemon("d")
        .yaml(&format!(
            "tasks:\n  Probe: {{command: [{}], preload: true, user: nobody, nice: -20}}\n",
            sdk_probe().display()
        ))
        .start();
    for _ in 0..2 {
        let id = enqueue(&db, "Probe", "").await;
        let row = finished_on_one_try(&db, id, &daemon, WAIT).await;
        let report = report(row.result_text.as_deref().unwrap());
        assert_eq!(report["booted_in"], report["pid"], "exec'd: {report:?}");
    }
    let log = daemon.log_text();
    assert_eq!(log.matches("its tries are exec'd").count(), 1, "{log}");
    assert!(daemon.stop().success());
}

/// A preloaded try gets the OOM killer's score and the open files limit an
/// exec'd try gets: not the daemon's lowered score and raised limit, which
/// a forked child kept (a preloaded try that leaked memory was spared by
/// the OOM killer, ahead of everything else on the machine).
async fn a_preloaded_try_has_the_oom_score_and_open_files_limit_of_an_execd_one(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("limits.py");
    python_example_with(
        &program,
        "def limits(text):\n    \
             with open('/proc/self/oom_score_adj') as score:\n        \
                 return score.read().strip() + ' ' + str(resource.getrlimit(resource.RLIMIT_NOFILE))\n\
         for name in ('Execd', 'Preloaded'):\n    \
             program['TASKS'][name] = limits",
    );
    let mut daemon = db
        .daemon("d")
        .yaml(&format!(
            "tasks:\n  Execd: {{command: [python3, {p}]}}\n  Preloaded: {{command: [python3, {p}], preload: true}}\n",
            p = program.display()
        ))
        .open_files((1024, 4096))
        .start();
    let mut seen = Vec::new();
    for task in ["Execd", "Preloaded"] {
        let id = enqueue(&db, task, "").await;
        seen.push(
            finished_on_one_try(&db, id, &daemon, WAIT)
                .await
                .result_text
                .unwrap(),
        );
    }
    assert_eq!(seen[0], seen[1], "exec'd, then preloaded");
    assert!(seen[0].ends_with(" (1024, 4096)"), "{seen:?}");
    assert!(daemon.stop().success());
}

/// A parent that takes a while per fork (a large application), sent many
/// requests at once, answers the last one long after it was sent: it is
/// busy, not stuck, as long as answers keep coming. (Here 150 ms a fork, 12
/// requests at once, and the reply bound shortened to 1 s for the test.)
/// Before, the bound ran from each request's sending: the parent was killed
/// as stuck, and the tries behind it were asked of a new one.
async fn a_parent_working_through_a_queue_of_requests_is_not_taken_for_a_stuck_one(
    backend: crate::util::Backend,
) {
    twelve_requests_to_a_slow_parent_are_all_served_by_it(backend, 0.15, "").await;
}

/// The same with large requests (a 60 KiB `env:` value): a few fill the
/// parent's socket, and the next ones wait to be sent while it works
/// through the queue. That wait was bounded from its start, whatever
/// answers came meanwhile: the busy parent was killed as stuck, and the
/// requests queued behind it failed. (300 ms a fork, 12 requests, the
/// reply bound shortened to 1 s.)
async fn large_requests_waiting_for_room_in_a_busy_parents_socket_are_not_taken_for_a_stuck_one(
    backend: crate::util::Backend,
) {
    let env = format!("env: {{LARGE: {}}}\n", "x".repeat(60 * 1024));
    twelve_requests_to_a_slow_parent_are_all_served_by_it(backend, 0.3, &env).await;
}

/// Twelve tries at once asked of one preloaded parent that takes
/// `fork_seconds` a fork, the reply bound shortened to 1 s, with `extra`
/// config: each runs once, and the parent is never taken for a stuck one.
async fn twelve_requests_to_a_slow_parent_are_all_served_by_it(
    backend: crate::util::Backend,
    fork_seconds: f64,
    extra: &str,
) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("slow_forks.py");
    python_example_with(
        &program,
        &format!(
            "fork_try = program['serve_preloaded'].__globals__['fork_try']\n\
             def slowly(daemon, request, fds):\n    \
                 time.sleep({fork_seconds})\n    \
                 return fork_try(daemon, request, fds)\n\
             program['serve_preloaded'].__globals__['fork_try'] = slowly"
        ),
    );
    let mut daemon = db
        .daemon("d")
        .yaml(&format!(
            "max_concurrent: 12\n{extra}{}",
            python_preloaded(&program)
        ))
        .env("TASKRUNNER_TEST_PRELOAD_REPLY_TIMEOUT_MS", "1000")
        .start();
    // Booted first, so that the twelve are sent together.
    let warm = enqueue(&db, "PyProbe", "quiet: true").await;
    finished_on_one_try(&db, warm, &daemon, WAIT).await;
    db.insert_copies(
        NewRow::new("PyProbe").options("quiet: true").try_limit(1),
        12,
    )
    .await;
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result IS NULL OR result = 'RUNNING'",
        0,
        WAIT,
    )
    .await;
    let log = daemon.log_text();
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED' AND tries = 1"
        )
        .await,
        13,
        "{log}"
    );
    assert!(!log.contains("did not answer a request"), "{log}");
    assert_eq!(log.matches(" preloaded (pid ").count(), 1, "{log}");
    assert!(daemon.stop().success());
}

/// One preloaded program's long boot (here 8 s) holds up its own tries
/// only: another program's try starts and ends meanwhile. Before, one lock
/// for all programs was held through every boot (and every restart
/// backoff, up to 30 s), and every preloaded try of the daemon waited.
async fn a_program_that_boots_for_long_holds_up_no_other_programs_tries(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "max_concurrent: 4\nprograms: [{{path: {}, preload: true}}]\n\
             tasks:\n  PyProbe: {{command: [python3, {}], preload: true, env: {{PROBE_SETUP_MS: '8000'}}}}\n",
            sdk_probe().display(),
            python_probe().display()
        ),
    );
    let slow = enqueue(&db, "PyProbe", "quiet: true").await;
    db.wait_for(slow, WAIT, "the slow program's try claimed", |row| {
        row.result.as_deref() == Some("RUNNING")
    })
    .await;
    let quick = enqueue(&db, "Probe", "").await;
    finished_on_one_try(&db, quick, &daemon, Duration::from_secs(6)).await;
    assert_eq!(db.row(slow).await.pid, None, "the slow program still boots");
    finished_on_one_try(&db, slow, &daemon, WAIT).await;
    assert!(daemon.stop().success());
}

/// A parent gone between a fork and its answer (killed, or retired for not
/// answering) leaves a child running the try whose pid the daemon never
/// got. Before, the try was asked again of a new parent: the task ran twice
/// at once, and the first child stayed a zombie of the daemon. Now the
/// daemon finds that child (its own, holding the try's pipes) and
/// supervises it: the try runs once, and ends as any other. Row 1's parent
/// kills itself right after its fork; row 2's stalls there past the reply
/// bound (shortened to 1 s) and is retired.
async fn a_child_forked_by_a_parent_gone_before_its_answer_runs_its_try_once(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("gone_after_fork.py");
    let runs = db.scratch.join("runs");
    let died = db.scratch.join("died");
    let stalled = db.scratch.join("stalled");
    python_example_with(
        &program,
        &format!(
            "fork_try = program['serve_preloaded'].__globals__['fork_try']\n\
             def gone(daemon, request, fds):\n    \
                 pid = fork_try(daemon, request, fds)\n    \
                 if not os.path.exists({died:?}):\n        \
                     open({died:?}, 'w').close()\n        \
                     os.kill(os.getpid(), 9)\n    \
                 if not os.path.exists({stalled:?}):\n        \
                     open({stalled:?}, 'w').close()\n        \
                     time.sleep(30)\n    \
                 return pid\n\
             program['serve_preloaded'].__globals__['fork_try'] = gone\n\
             probe = program['TASKS']['PyProbe']\n\
             def counted(text):\n    \
                 with open({runs:?}, 'a') as runs:\n        \
                     runs.write(text.split()[-1] + '\\n')\n    \
                 time.sleep(2)\n    \
                 return probe(text)\n\
             program['TASKS']['PyProbe'] = counted"
        ),
    );
    let mut daemon = db
        .daemon("d")
        .yaml(&format!(
            "max_concurrent: 2\n{}",
            python_preloaded(&program)
        ))
        .env("TASKRUNNER_TEST_PRELOAD_REPLY_TIMEOUT_MS", "1000")
        .start();
    for row in ["1", "2"] {
        let id = enqueue(&db, "PyProbe", &format!("quiet: true\nrow: {row}")).await;
        finished_on_one_try(&db, id, &daemon, WAIT).await;
    }
    let log = daemon.log_text();
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "1\n2\n",
        "each row's task ran once\n{log}"
    );
    assert_eq!(
        log.matches("died between a fork and its answer").count(),
        2,
        "{log}"
    );
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

/// The same, when the children have already exited when their parent
/// dies: a zombie holds no pipe. Before, neither child was found, each try
/// was asked again of a new parent and its task ran a second time, and the
/// two zombies stayed. Now the parent leads a session of its own, its
/// exited children are known by it and matched to the requests by the
/// order of forks: each try ends with its own child's status and output
/// (row 2's task fails: a swap would show). The parent forks for both rows'
/// requests, waits for both children to exit, and kills itself without
/// answering either.
async fn children_that_exited_before_their_parent_died_unanswered_end_their_own_tries(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("gone_after_two_forks.py");
    let runs = db.scratch.join("runs");
    let died = db.scratch.join("died");
    python_example_with(
        &program,
        &format!(
            "import socket\n\
             fork_try = program['serve_preloaded'].__globals__['fork_try']\n\
             parse = program['serve_preloaded'].__globals__['parse']\n\
             def exited(pid):\n    \
                 with open(f'/proc/{{pid}}/stat') as stat:\n        \
                     return stat.read().rsplit(')', 1)[1].split()[0] == 'Z'\n\
             def gone(daemon, request, fds):\n    \
                 pid = fork_try(daemon, request, fds)\n    \
                 if not os.path.exists({died:?}):\n        \
                     open({died:?}, 'w').close()\n        \
                     message, more, _, _ = socket.recv_fds(daemon, 1 << 20, 3)\n        \
                     second = fork_try(daemon, parse(message), more)\n        \
                     deadline = time.time() + 20\n        \
                     while not (exited(pid) and exited(second)) and time.time() < deadline:\n            \
                         time.sleep(0.01)\n        \
                     os.kill(os.getpid(), 9)\n    \
                 return pid\n\
             program['serve_preloaded'].__globals__['fork_try'] = gone\n\
             def counted(text):\n    \
                 row = text.split()[-1]\n    \
                 with open({runs:?}, 'a') as runs:\n        \
                     runs.write(row + '\\n')\n    \
                 if row == '2':\n        \
                     raise RuntimeError('row 2 fails')\n    \
                 return f'ran row {{row}}'\n\
             program['TASKS']['PyProbe'] = counted"
        ),
    );
    let rows = [
        enqueue(&db, "PyProbe", "row: 1").await,
        enqueue(&db, "PyProbe", "row: 2").await,
    ];
    let mut daemon = db
        .daemon("d")
        .yaml(&format!(
            "max_concurrent: 2\n{}",
            python_preloaded(&program)
        ))
        .start();
    // Each try ends with its own child's status (row 2's fails) and output.
    let ended = finished_on_one_try(&db, rows[0], &daemon, WAIT).await;
    assert_eq!(ended.result_text.as_deref(), Some("ran row 1"));
    let ended = db
        .wait_for(rows[1], WAIT, "row 2 to end", |row| {
            row.result.as_deref().is_some_and(|r| r != "RUNNING")
        })
        .await;
    let text = ended.result_text.clone().unwrap_or_default();
    assert_eq!(
        (
            ended.result.as_deref(),
            ended.tries,
            text.contains("row 2 fails")
        ),
        (Some("FAILED"), 1, true),
        "{ended:#?}\n{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    let mut ran: Vec<String> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    ran.sort();
    assert_eq!(ran, ["1", "2"], "each row's task ran once\n{log}");
    assert_eq!(
        log.matches("had run the try and exited").count(),
        2,
        "{log}"
    );
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

/// The same, when the parent started a process at its boot that inherited
/// its socket (as its stdin: Python's `subprocess.Popen` without `stdin=`,
/// Ruby's `spawn`): the parent's death then closed no socket, its answers'
/// reader never saw the end of file, and no child forked before an answer
/// was looked for. The try was asked of a new parent after the reply bound,
/// and ran twice at once; the first child stayed a zombie. The daemon now
/// ends its side of the socket once the parent has exited.
async fn a_parent_gone_whose_socket_a_process_it_started_holds_leaves_its_try_to_run_once(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("gone_with_a_helper.py");
    let runs = db.scratch.join("runs");
    let died = db.scratch.join("died");
    let helper = db.scratch.join("helper.pid");
    python_example_with(
        &program,
        &format!(
            "import subprocess\n\
             setup = program['serve_preloaded'].__globals__['setup']\n\
             def with_a_helper():\n    \
                 setup()\n    \
                 if os.environ.get('TASKRUNNER_PRELOAD') == '1':\n        \
                     helper = subprocess.Popen(['sleep', '600'])\n        \
                     with open({helper:?}, 'a') as pid:\n            \
                         pid.write(f'{{helper.pid}}\\n')\n\
             program['serve_preloaded'].__globals__['setup'] = with_a_helper\n\
             fork_try = program['serve_preloaded'].__globals__['fork_try']\n\
             def gone(daemon, request, fds):\n    \
                 pid = fork_try(daemon, request, fds)\n    \
                 if not os.path.exists({died:?}):\n        \
                     open({died:?}, 'w').close()\n        \
                     os.kill(os.getpid(), 9)\n    \
                 return pid\n\
             program['serve_preloaded'].__globals__['fork_try'] = gone\n\
             probe = program['TASKS']['PyProbe']\n\
             def counted(text):\n    \
                 with open({runs:?}, 'a') as runs:\n        \
                     runs.write('ran\\n')\n    \
                 time.sleep(2)\n    \
                 return probe(text)\n\
             program['TASKS']['PyProbe'] = counted"
        ),
    );
    let mut daemon = db
        .daemon("d")
        .yaml(&python_preloaded(&program))
        .env("TASKRUNNER_TEST_PRELOAD_REPLY_TIMEOUT_MS", "1000")
        .start();
    let id = enqueue(&db, "PyProbe", "quiet: true").await;
    finished_on_one_try(&db, id, &daemon, WAIT).await;
    let log = daemon.log_text();
    for pid in std::fs::read_to_string(&helper).unwrap_or_default().lines() {
        let _ = kill(Pid::from_raw(pid.parse().unwrap()), Signal::SIGKILL);
    }
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "ran\n",
        "the task ran once\n{log}"
    );
    assert!(log.contains("died between a fork and its answer"), "{log}");
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

/// A preloaded try's request (its environment, above all) goes in one
/// message, which the socket takes up to its send buffer (about 208 KiB).
/// Before, a larger environment (here 300 KB of `env:`, which exec takes)
/// failed every try (`EMSGSIZE`); now such a try is exec'd, with one line.
async fn a_try_whose_request_is_larger_than_the_socket_takes_is_execd(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let bulk = "x".repeat(100_000);
    let config = format!(
        "programs: [{{path: {}, preload: true}}]\n\
         env: {{PROBE_VAR: hello, BULK1: {bulk}, BULK2: {bulk}, BULK3: {bulk}}}\n",
        sdk_probe().display(),
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    for _ in 0..2 {
        let id = enqueue(&db, "Probe", "").await;
        let row = finished_on_one_try(&db, id, &daemon, WAIT).await;
        let report = report(&row.result_text.unwrap());
        assert_eq!(report["booted_in"], report["pid"], "exec'd: {report:?}");
        assert!(report["env"].contains("PROBE_VAR=hello"), "{report:?}");
    }
    let log = daemon.log_text();
    assert_eq!(
        log.matches("larger than its socket takes").count(),
        2,
        "{log}"
    );
    assert!(daemon.stop().success());
}

/// A parent retired in order (a reload, the daemon's stop) has its socket
/// closed and exits, running the exit handlers its setup registered (a
/// Rails application's `at_exit`, a flush of its metrics), as the protocol
/// says. Before, every retirement was a `SIGKILL`, and they never ran.
async fn a_parent_retired_in_order_exits_through_its_exit_handlers(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let notes = db.scratch.join("exit-handlers");
    let config = format!(
        "programs: [{{path: {}, preload: true}}]\nenv: {{PROBE_ATEXIT_FILE: {}}}\n",
        sdk_probe().display(),
        notes.display()
    );
    let mut daemon = Daemon::start(&db, "d", &config);
    let mut parents = Vec::new();
    for _ in 0..2 {
        let id = enqueue(&db, "Probe", "").await;
        let row = finished_on_one_try(&db, id, &daemon, WAIT).await;
        let parent = report(&row.result_text.unwrap())["booted_in"].clone();
        if parents.is_empty() {
            daemon.signal(Signal::SIGHUP);
            wait_until(WAIT, "the retired parent's exit handler", || {
                std::fs::read_to_string(&notes)
                    .unwrap_or_default()
                    .contains(&format!("exit handler ran in {parent}\n"))
            });
        }
        parents.push(parent);
    }
    assert_ne!(parents[0], parents[1], "a new parent after the reload");
    assert!(daemon.stop().success());
    let ran = std::fs::read_to_string(&notes).unwrap_or_default();
    assert!(
        ran.contains(&format!("exit handler ran in {}\n", parents[1])),
        "{ran:?}\n{}",
        daemon.log_text()
    );
}

/// A reload retires a parent that holds a request it has not answered yet
/// (its fork is slow). The end of its socket was both ways: the daemon
/// stopped reading at once, took the request for unanswered and killed the
/// parent (no exit handlers), and the try went to the next parent. Now
/// the daemon ends only its own sending: the parent answers what it holds,
/// its child runs the try once, and the parent exits through its exit
/// handlers.
async fn a_parent_retired_with_a_request_in_hand_answers_it_and_exits_in_order(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("slow_fork.py");
    let received = db.scratch.join("received");
    let exits = db.scratch.join("exits");
    python_example_with(
        &program,
        &format!(
            "import atexit\n\
             atexit.register(lambda: open({exits:?}, 'a').write(f'{{os.getpid()}}\\n'))\n\
             fork = program['fork_try']\n\
             def slow_fork(*args):\n    \
                 open({received:?}, 'a').close()\n    \
                 time.sleep(1.5)\n    \
                 return fork(*args)\n\
             program['serve_preloaded'].__globals__['fork_try'] = slow_fork",
            exits = exits.display().to_string(),
            received = received.display().to_string(),
        ),
    );
    let mut daemon = db.daemon("d").yaml(&python_preloaded(&program)).start();
    let id = enqueue(&db, "PyProbe", "").await;
    wait_until(WAIT, "the parent to hold the request", || received.exists());
    let parent = parent_pid(&daemon);
    daemon.signal(Signal::SIGHUP);
    let row = finished_on_one_try(&db, id, &daemon, WAIT).await;
    assert_eq!(
        report(&row.result_text.unwrap())["booted_in"],
        parent.to_string(),
        "the retired parent ran the try it held"
    );
    wait_until(WAIT, "the retired parent's exit handler", || {
        std::fs::read_to_string(&exits)
            .unwrap_or_default()
            .lines()
            .any(|line| line == parent.to_string())
    });
    assert!(daemon.stop().success());
}

/// A parent retired in order that does not exit at the end of its socket
/// (its exit handlers hang, or it ignores the end) is killed once the 5 s
/// grace has passed. Before the kill went through the parent's pidfd, it
/// was skipped, the parent marked gone at its socket's end: each reload
/// left a booted program behind.
async fn a_retired_parent_that_does_not_exit_is_killed_after_the_grace(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("stubborn.py");
    python_example_with(
        &program,
        "serve = program['serve_preloaded']\n\
         def stubborn():\n    \
             serve()\n    \
             time.sleep(3600)\n\
         program['main'].__globals__['serve_preloaded'] = stubborn",
    );
    let mut daemon = db.daemon("d").yaml(&python_preloaded(&program)).start();
    let id = enqueue(&db, "PyProbe", "").await;
    let row = finished_on_one_try(&db, id, &daemon, WAIT).await;
    let parent: i32 = report(&row.result_text.unwrap())["booted_in"]
        .parse()
        .unwrap();
    daemon.signal(Signal::SIGHUP);
    wait_until(WAIT, "the retired parent to be killed", || {
        !process_exists(parent)
    });
    let log = daemon.log_text();
    assert!(
        log.contains(&format!(
            "preloaded parent (pid {parent}) did not exit within 5s of the end of its socket: it is killed"
        )),
        "{log}"
    );
    assert!(daemon.stop().success());
}

/// A cancel of a try whose preloaded program is still booting (here for
/// 8 s) ends it as soon as the daemon hears of it; the boot goes on, and
/// the next try is forked from that parent. Before, the cancel was heard
/// only once the child existed, after the whole boot (a Rails application
/// takes a minute), and so were a lost claim and a shutdown's end.
async fn a_cancel_while_the_program_boots_ends_the_try_and_keeps_the_boot(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "programs: [{{path: {}, preload: true}}]\nenv: {{PROBE_SETUP_MS: '8000'}}\n",
            sdk_probe().display()
        ),
    );
    let id = enqueue(&db, "Probe", "").await;
    db.wait_for(id, WAIT, "the try claimed", |row| {
        row.result.as_deref() == Some("RUNNING")
    })
    .await;
    let cancelled_at = std::time::Instant::now();
    let (status, _, stderr) = crate::util::cli(&db, &["cancel", &id.to_string()]);
    assert_eq!(status, 0, "{stderr}");
    let row = db.wait_for_state(id, "CANCELLED", WAIT).await;
    let took = cancelled_at.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "cancelled after {took:?}: {row:#?}\n{}",
        daemon.log_text()
    );
    assert_eq!(row.tries, 1, "{row:#?}");
    assert!(row.pid.is_none(), "{row:#?}");
    let next = enqueue(&db, "Probe", "").await;
    finished_on_one_try(&db, next, &daemon, WAIT).await;
    let log = daemon.log_text();
    assert_eq!(log.matches(" preloaded (pid ").count(), 1, "{log}");
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

/// A try cancelled while its program boots (here for 4 s) is not
/// started once the boot is done: before, its request was sent after the
/// boot all the same, and the parent forked a child that began the task
/// (the cancelled try's, or one whose claim another daemon had taken
/// meanwhile) before the daemon killed it. The parent notes each fork.
async fn a_try_cancelled_while_its_program_boots_gets_no_child_after_the_boot(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("slow_boot.py");
    let forks = db.scratch.join("forks");
    python_example_with(
        &program,
        &format!(
            "globals_ = program['serve_preloaded'].__globals__\n\
             setup, fork = globals_['setup'], globals_['fork_try']\n\
             def slow_setup():\n    \
                 time.sleep(4)\n    \
                 setup()\n\
             def noted_fork(*args):\n    \
                 open({forks:?}, 'a').write('fork\\n')\n    \
                 return fork(*args)\n\
             globals_['setup'] = slow_setup\n\
             globals_['fork_try'] = noted_fork",
            forks = forks.display().to_string(),
        ),
    );
    let mut daemon = db.daemon("d").yaml(&python_preloaded(&program)).start();
    let id = enqueue(&db, "PyProbe", "").await;
    db.wait_for(id, WAIT, "the try claimed", |row| {
        row.result.as_deref() == Some("RUNNING")
    })
    .await;
    let (status, _, stderr) = crate::util::cli(&db, &["cancel", &id.to_string()]);
    assert_eq!(status, 0, "{stderr}");
    db.wait_for_state(id, "CANCELLED", WAIT).await;
    let next = enqueue(&db, "PyProbe", "").await;
    finished_on_one_try(&db, next, &daemon, WAIT).await;
    assert_eq!(
        std::fs::read_to_string(&forks).unwrap_or_default(),
        "fork\n",
        "one fork, the next try's"
    );
    assert!(daemon.stop().success());
}

/// A try cancelled after its request was sent, before the answer: the
/// child its parent made for it is killed when the answer comes, and with
/// it its process group (what its task started). Before, only its pid was
/// killed, and a process the task had started ran on. Here the parent
/// holds its answer until the try has ended; the task has started a
/// `sleep` in its group meanwhile. Without cgroups: a try's cgroup, when
/// there is one, is emptied at its end.
async fn a_child_made_for_a_try_that_stopped_waiting_is_killed_with_its_group(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("held_answer.py");
    let answer = db.scratch.join("answer");
    let helper = db.scratch.join("helper.pid");
    python_example_with(
        &program,
        &format!(
            "import subprocess\n\
             globals_ = program['serve_preloaded'].__globals__\n\
             fork = globals_['fork_try']\n\
             def held_fork(*args):\n    \
                 pid = fork(*args)\n    \
                 while not os.path.exists({answer:?}):\n        \
                     time.sleep(0.01)\n    \
                 return pid\n\
             globals_['fork_try'] = held_fork\n\
             def with_a_helper(text):\n    \
                 started = subprocess.Popen(['sleep', '600'])\n    \
                 with open({helper:?} + '.new', 'w') as pid:\n        \
                     pid.write(str(started.pid))\n    \
                 os.rename({helper:?} + '.new', {helper:?})\n    \
                 time.sleep(600)\n    \
                 return 'ok'\n\
             program['TASKS']['PyProbe'] = with_a_helper",
            answer = answer.display().to_string(),
            helper = helper.display().to_string(),
        ),
    );
    let mut daemon = db
        .daemon("d")
        .yaml(&python_preloaded(&program))
        // A try's cgroup is emptied at its end: without one, its process
        // group is what holds what the task started.
        .env("TASKRUNNER_CGROUPS", "off")
        .start();
    let id = enqueue(&db, "PyProbe", "").await;
    wait_until(WAIT, "the task started its helper", || helper.exists());
    let started: i32 = std::fs::read_to_string(&helper).unwrap().parse().unwrap();
    let (status, _, stderr) = crate::util::cli(&db, &["cancel", &id.to_string()]);
    assert_eq!(status, 0, "{stderr}");
    db.wait_for_state(id, "CANCELLED", WAIT).await;
    std::fs::write(&answer, "").unwrap();
    let gone = crate::util::within(Duration::from_secs(10), || !process_exists(started));
    crate::util::kill_if_alive(started);
    assert!(
        gone,
        "the task's helper was killed with its group\n{}",
        daemon.log_text()
    );
    let reaped = crate::util::within(WAIT, || zombie_children(daemon.pid()).is_empty());
    assert!(reaped, "no zombies");
    assert!(daemon.stop().success());
}

/// A parent that closes its socket after its hello and lives on (a bug
/// in a program's protocol code) is taken for dead and replaced. It was
/// dropped without a kill: each replacement left one more booted program
/// running. It is retired in order now, and killed after the grace.
async fn a_parent_that_closes_its_socket_and_lives_on_is_not_left_behind(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("closes_and_lives.py");
    python_example_with(
        &program,
        "import socket\n\
         globals_ = program['serve_preloaded'].__globals__\n\
         def closes_and_lives():\n    \
             globals_['setup']()\n    \
             daemon = socket.socket(fileno=0)\n    \
             daemon.send(globals_['HELLO'])\n    \
             daemon.close()\n    \
             time.sleep(3600)\n\
         program['main'].__globals__['serve_preloaded'] = closes_and_lives",
    );
    let mut daemon = db.daemon("d").yaml(&python_preloaded(&program)).start();
    // Two tries, one after the other: the second finds the first's parent
    // taken for dead, at the latest, and replaces it.
    for _ in 0..2 {
        let id = enqueue(&db, "PyProbe", "").await;
        db.wait_for(id, WAIT, "the try to end", |row| {
            !matches!(row.result.as_deref(), None | Some("RUNNING"))
        })
        .await;
    }
    let name = program.to_string_lossy().into_owned();
    let living = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|entry| entry.ok())
            .filter(|entry| {
                std::fs::read(entry.path().join("cmdline"))
                    .is_ok_and(|line| String::from_utf8_lossy(&line).contains(&name))
            })
            .count()
    };
    wait_until(WAIT, "the replaced parents to be gone", || living() <= 1);
    assert!(daemon.stop().success());
    wait_until(WAIT, "every parent to be gone", || living() == 0);
}

/// A preloaded child makes its own process group itself, after the daemon
/// has its pid. A cancel in between found no group: its `SIGTERM`, and the
/// `SIGKILL`s after it, were lost until the group existed (here the child
/// takes 6 s to make it). Now such a signal goes to the process itself.
async fn a_cancel_before_the_child_made_its_group_stops_it_at_once(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("slow_group.py");
    python_example_with(
        &program,
        "set_up = program['serve_preloaded'].__globals__['set_up_child']\n\
         def slowly(request, fds):\n    \
             time.sleep(6)\n    \
             set_up(request, fds)\n\
         program['serve_preloaded'].__globals__['set_up_child'] = slowly",
    );
    let mut daemon = db.daemon("d").yaml(&python_preloaded(&program)).start();
    let id = enqueue(&db, "PyProbe", "").await;
    let running = db.wait_for_pid(id, WAIT).await;
    let pid = running.pid.unwrap() as i32;
    assert_ne!(
        nix::unistd::getpgid(Some(Pid::from_raw(pid))).unwrap(),
        Pid::from_raw(pid),
        "the child has no group of its own yet"
    );
    let cancelled_at = std::time::Instant::now();
    let (status, _, stderr) = crate::util::cli(&db, &["cancel", &id.to_string()]);
    assert_eq!(status, 0, "{stderr}");
    let row = db.wait_for_state(id, "CANCELLED", WAIT).await;
    let took = cancelled_at.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "cancelled after {took:?}: {row:#?}\n{}",
        daemon.log_text()
    );
    assert!(!process_exists(pid));
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

/// The Python example's child ran `os._exit(run_task())`: a task that
/// called `sys.exit(3)` unwound to the example's `main` and ended the
/// interpreter normally, running the parent's exit handlers in the try; a
/// result that is not text raised out of `run_task` into the parent's
/// loop, in the child. Each now leaves by `_exit`, with its status (3, 1),
/// and the parent's handler runs in no try.
async fn a_python_task_that_exits_or_raises_leaves_its_child_by_exit(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let ran = db.scratch.join("exit-handlers");
    let program = db.scratch.join("exits.py");
    python_example_with(
        &program,
        &format!(
            "import atexit\n\
             atexit.register(lambda: open({ran:?}, 'a').write(f'ran in {{os.getpid()}}\\n'))\n\
             def Exits(text):\n    \
                 print('leaving early')\n    \
                 sys.exit(3)\n\
             def NotText(text):\n    \
                 return 42\n\
             program['TASKS']['Exits'] = Exits\n\
             program['TASKS']['NotText'] = NotText",
            ran = ran.display().to_string(),
        ),
    );
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  Exits: {{command: [python3, {program}], preload: true}}\n  \
               NotText: {{command: [python3, {program}], preload: true}}\n",
            program = program.display()
        ),
    );
    let exits = db.insert_row(NewRow::new("Exits").try_limit(1)).await;
    let not_text = db.insert_row(NewRow::new("NotText").try_limit(1)).await;
    let exits = db.wait_for_state(exits, "FAILED", WAIT).await;
    let text = exits.result_text.unwrap_or_default();
    assert!(text.contains("exit status 3"), "{text}");
    let not_text = db.wait_for_state(not_text, "FAILED", WAIT).await;
    let text = not_text.result_text.unwrap_or_default();
    assert!(text.contains("TypeError"), "{text}");
    let handlers = std::fs::read_to_string(&ran).unwrap_or_default();
    assert_eq!(handlers, "", "the parent's exit handler ran in a try");
    assert!(daemon.stop().success());
}

/// A parent that answers one request twice (here: it forks two children
/// and names both) retires, as it breaks the protocol; the child of the
/// answer no request waited for ran the task on, unknown to the daemon (no
/// timeout, no cancel, its output read by no one), and stayed a zombie. It
/// is killed now.
async fn a_child_named_by_an_answer_no_request_waits_for_is_killed(backend: crate::util::Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("runs.log");
    let program = db.scratch.join("answers_twice.py");
    python_example_with(
        &program,
        &format!(
            "LOG = {log:?}\n\
             def Twice(text):\n    \
                 time.sleep(1.5)\n    \
                 with open(LOG, 'a') as log:\n        \
                     log.write(f'end {{os.getpid()}}\\n')\n    \
                 return 'done'\n\
             program['TASKS']['Twice'] = Twice\n\
             fork_try = program['fork_try']\n\
             def twice(daemon, request, fds):\n    \
                 first = fork_try(daemon, request, fds)\n    \
                 daemon.send(f'pid\\0{{first}}\\0'.encode())\n    \
                 return fork_try(daemon, request, fds)\n\
             program['serve_preloaded'].__globals__['fork_try'] = twice",
            log = log.display().to_string(),
        ),
    );
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "max_concurrent: 1\ntasks:\n  Twice: {{command: [python3, {}], preload: true}}\n",
            program.display()
        ),
    );
    let id = db.insert_row(NewRow::new("Twice").try_limit(1)).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.result_text.as_deref(), Some("done"));
    daemon.wait_for_log("answered a request it was not sent", WAIT);
    // The other child would have ended by now too.
    holds_for(Duration::from_secs(1), "one run of the task", async || {
        let runs = std::fs::read_to_string(&log).unwrap_or_default();
        match runs.lines().count() {
            1 => Ok(()),
            _ => Err(runs),
        }
    })
    .await;
    wait_until(WAIT, "no zombie child of the daemon", || {
        zombie_children(daemon.pid()).is_empty()
    });
    assert!(daemon.stop().success());
}

/// A preloaded parent that dies after each fork (here it answers, then
/// exits) is started again at the next try: at once after its first death,
/// then after 1 s, 2 s, … (one line each: "died again (N deaths in a
/// row)"). Its tries run on their children, each once. The death is
/// counted by whichever notes it first, the parent's watcher or the next
/// try (before, a try that found the parent dead first started a new one
/// at once, and the watcher counted nothing: no backoff under steady load).
async fn a_parent_that_keeps_dying_is_started_again_with_a_growing_delay(
    backend: crate::util::Backend,
) {
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("dying.py");
    python_example_with(
        &program,
        "fork_try = program['fork_try']\n\
         def dying(daemon, request, fds):\n    \
             pid = fork_try(daemon, request, fds)\n    \
             daemon.send(f'pid\\0{pid}\\0'.encode())\n    \
             os._exit(3)\n\
         program['serve_preloaded'].__globals__['fork_try'] = dying",
    );
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!("max_concurrent: 1\n{}", python_preloaded(&program)),
    );
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            db.insert_row(NewRow::new("PyProbe").options("quiet: true").try_limit(1))
                .await,
        );
    }
    for id in ids {
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        assert_eq!(row.tries, 1, "{row:?}");
    }
    // The third try waited for the second death's 1 s.
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    daemon.wait_for_log("died again (2 deaths in a row)", WAIT);
    daemon.wait_for_log("died again (3 deaths in a row)", WAIT);
    let log = daemon.log_text();
    assert!(log.contains("a new parent starts in 2s"), "{log}");
    assert!(daemon.stop().success());
}
