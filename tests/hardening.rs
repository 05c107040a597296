//! Faults a hostile review found (issue 13): each test is named after what
//! broke, and failed before its fix.

use std::time::Duration;

use crate::util::{
    base_config, cli, kill_if_alive, merge_yaml, peak_grew_under, process_exists, read_pid_file,
    set_timer_slack, wait_until, Backend, Daemon, Fault, KillOnDrop, NewRow, PrivateServer, Proxy,
    TestDb, CLI,
};

const WAIT: Duration = Duration::from_secs(30);

both_backends!(
    a_dead_heartbeat_stops_the_daemon_with_exit_status_1,
    a_try_whose_supervision_panics_is_recorded_crashed_and_the_daemon_goes_on,
    starts_failing_for_the_daemons_own_descriptors_give_the_try_back,
    a_new_type_whose_programs_cannot_be_asked_for_want_of_descriptors_costs_no_try,
    a_daemon_with_descriptors_for_one_start_at_a_time_runs_every_row,
    a_preloaded_parent_that_cannot_start_for_want_of_descriptors_costs_no_try,
    tries_of_a_daemon_whose_hard_open_files_limit_was_lowered_start,
    starts_failing_for_want_of_processes_give_the_try_back,
    a_shortage_of_processes_after_a_quiet_while_costs_a_large_try_nothing,
    a_grandchild_of_a_killed_daemons_task_is_killed_before_the_rerun,
    a_reap_that_cannot_kill_a_dead_tries_grandchild_leaves_its_row,
    no_migrate_on_an_older_or_missing_schema_exits_naming_it,
    a_host_id_too_long_for_a_claim_is_refused_at_start_and_the_longest_allowed_runs,
    a_task_of_the_daemons_user_cannot_read_its_environment,
    a_task_run_as_another_user_gets_that_users_home_and_names,
    a_task_run_as_another_user_gets_a_cpu_limit_above_its_daemons,
    a_task_run_as_another_user_gets_that_users_groups,
    a_root_daemon_warns_of_root_tasks_and_refuses_group_without_user,
    idle_control_connections_cannot_take_the_daemons_descriptors,
    a_task_cannot_stop_its_daemon_through_the_control_socket,
    control_characters_in_rows_and_stderr_are_escaped_in_logs_and_listings,
    options_past_max_options_are_rejected_without_stalling_the_daemon,
    options_past_max_options_are_never_loaded_by_the_daemon,
    options_past_max_options_are_not_loaded_for_the_rows_callback,
    truncated_output_says_it_was_cut,
    the_oom_killer_prefers_a_task_to_its_daemon,
    an_outage_of_writes_while_reads_work_is_logged_once_at_each_end,
    the_daemons_status_and_metrics_are_answered_while_the_database_is_out,
    status_and_metrics_of_a_stopped_daemon_give_up_after_a_bound,
    rows_that_can_never_run_are_refused_or_flagged_and_never_stall_the_daemon,
    a_program_that_hangs_when_asked_its_types_holds_no_slot_for_ever,
    a_programs_answer_without_end_is_read_only_to_a_bound,
    tries_of_an_unknown_type_share_a_re_read_of_the_programs,
    tries_of_an_unknown_type_share_a_re_read_that_fails,
    values_the_daemon_would_read_wrongly_are_refused_naming_the_rule,
);

/// The daemon renewed the heartbeat of every row it held, but ran only the
/// rows whose claim answer it received: rows claimed by a statement whose
/// answer was lost with the connection stayed RUNNING for ever, renewed.
/// PostgreSQL only: SQLite has no connection to lose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_whose_claim_answer_was_lost_are_given_back() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(db.enqueue("NoOp", None).await);
    }
    let proxy = Proxy::start(&db.url, Fault::DropUpdateAnswer).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!("database_url: {}\nmax_concurrent: 4\n", proxy.url),
    );
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'",
        12,
        WAIT,
    )
    .await;
    assert!(proxy.tripped(), "the proxy dropped a claim's answer");
    assert!(
        daemon
            .log_text()
            .contains("holds rows it never started: giving them back"),
        "{}",
        daemon.log_text()
    );
    // Given back, not counted: every row ran once.
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE tries <> 1")
            .await,
        0
    );
    assert!(daemon.stop().success());
}

/// The services' join handles were read only at shutdown: a heartbeat that
/// panicked left tasks running with no lease renewal and no self-fencing.
/// Now the first service to end stops the daemon in the SPEC's order (its
/// tasks INTERRUPTED) and it exits 1.
async fn a_dead_heartbeat_stops_the_daemon_with_exit_status_1(backend: Backend) {
    let db = TestDb::new(backend).await;
    let trigger = db.scratch.join("panic-now");
    let mut daemon = Daemon::start_in_env(
        &db,
        "d",
        // A lease long enough that the fencing watchdog (4 s after the
        // last renewal with the tests' 5 s lease) does not kill the task
        // first: in one CI run the panic's backtrace took 3 s to print
        // under load before the daemon saw the service end, and the
        // watchdog's SIGKILL made the try CRASHED.
        "shutdown_timeout: 1s\nlease_timeout: 30s\ntasks:\n  Sleep:\n    command: [sleep, '60']\n",
        &[(
            "TASKRUNNER_TEST_HEARTBEAT_PANIC_FILE",
            trigger.to_str().unwrap(),
        )],
    );
    let id = db.enqueue("Sleep", None).await;
    let row = db.wait_for_pid(id, WAIT).await;
    std::fs::write(&trigger, "").unwrap();
    let status = daemon.wait_exit(WAIT);
    assert_eq!(status.code(), Some(1), "{}", daemon.log_text());
    assert!(
        daemon
            .log_text()
            .contains("the heartbeat panics: told to by a test"),
        "{}",
        daemon.log_text()
    );
    assert!(
        !process_exists(row.pid.unwrap() as i32),
        "the task is stopped"
    );
    let row = db.row(id).await;
    assert_eq!(row.result.as_deref(), Some("INTERRUPTED"), "{row:#?}");
}

/// A try's supervision that panicked (a bug of the daemon's, or a panic on
/// what a row holds) was dropped with its panic by the scheduler: no line
/// in the log, its live try never removed, and its row RUNNING for as long
/// as the daemon ran. Now the try is recorded CRASHED and counted (a panic
/// on every try ends the row once its tries are spent), its process is
/// killed, and the daemon goes on with the rest.
async fn a_try_whose_supervision_panics_is_recorded_crashed_and_the_daemon_goes_on(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start_in_env(
        &db,
        "d",
        "tasks:\n  Sleep:\n    command: [sleep, '60']\n  Quick:\n    command: ['true']\n",
        &[("TASKRUNNER_TEST_PANIC_IN_TRY_OF", "Sleep")],
    );
    let id = db.insert_row(NewRow::new("Sleep").try_limit(2)).await;
    let row = db
        .wait_for(id, WAIT, "both tries CRASHED", |row| {
            row.result.as_deref() == Some("CRASHED") && row.tries == 2
        })
        .await;
    let text = row.result_text.unwrap_or_default();
    assert!(
        text.contains("a try's supervision panics: told to by a test"),
        "{text}"
    );
    if let Some(pid) = row.pid {
        assert!(!process_exists(pid as i32), "the task still runs");
    }
    let quick = db.enqueue("Quick", None).await;
    db.wait_for_state(quick, "FINISHED", WAIT).await;
    let log = daemon.log_text();
    assert!(
        log.contains("the daemon's supervision of this try panicked"),
        "{log}"
    );
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

/// Out of file descriptors on the daemon's side, every start that failed
/// became a FAILED try: with `ulimit -n 1024` and 500 tasks, 167 rows were
/// exhausted without ever running. Now such a start gives its try back, the
/// scheduler backs off, one line is logged, and a too small limit is
/// announced at start. Here 40 descriptors fit about five of twelve tasks.
/// Preloaded tries too: their pipes, made by the daemon before it asks the
/// parent, failed for want of descriptors as a FAILED try (11 of 12 rows).
async fn starts_failing_for_the_daemons_own_descriptors_give_the_try_back(backend: Backend) {
    let db = TestDb::new(backend).await;
    naps_and_probes(&db, 300).await;
    let mut daemon = Daemon::start_with_open_files(
        &db,
        "d",
        &probe_and_nap("max_concurrent: 12\n", "0.3"),
        (40, 40),
    );
    every_row_finishes(&db).await;
    let log = daemon.log_text();
    assert!(
        log.contains("may not fit in this daemon's file descriptor limit"),
        "{log}"
    );
    assert_eq!(
        log.matches("the daemon is short of resources to start tasks")
            .count(),
        1,
        "{log}"
    );
    assert!(daemon.stop().success());
}

/// A row of a type a deploy just added to a program: the daemon asks its
/// programs for their types again. With no descriptor to spare for that
/// (the daemon's limit lowered to what it holds), the question could not
/// be asked, and the row was FAILED as of an unknown type, its one try
/// counted. Now it is given back, as any start the daemon's own shortage
/// stops, and runs once descriptors are free again.
async fn a_new_type_whose_programs_cannot_be_asked_for_want_of_descriptors_costs_no_try(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let types = db.scratch.join("types");
    std::fs::write(&types, "Old\n").unwrap();
    let program = db.scratch.join("lister");
    crate::util::write_executable(
        &program,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = --list-tasks ]; then cat {}; exit 0; fi\n\
             if [ \"$1\" = --list-flows ]; then exit 0; fi\n\
             echo ran\n",
            types.display()
        ),
    );
    let mut daemon = Daemon::start(&db, "d", &format!("programs: [{}]\n", program.display()));
    let old = db.insert_row(NewRow::new("Old").try_limit(1)).await;
    db.wait_for_state(old, "FINISHED", WAIT).await;
    let open = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .count() as u64;
    let limit = set_open_files(daemon.pid(), open);
    std::fs::write(&types, "Old\nNew\n").unwrap();
    let new = db.insert_row(NewRow::new("New").try_limit(1)).await;
    daemon.wait_for_log("re-reading task types failed", WAIT);
    set_open_files(daemon.pid(), limit);
    let row = db
        .wait_for(new, WAIT, "the row ended", |row| {
            row.result
                .as_deref()
                .is_some_and(|r| r != "RUNNING" && r != "INTERRUPTED")
        })
        .await;
    let log = daemon.log_text();
    assert_eq!(row.result.as_deref(), Some("FINISHED"), "{row:#?}\n{log}");
    assert_eq!(row.tries, 1, "{row:#?}");
    assert!(daemon.stop().success());
}

/// A daemon whose descriptors fit one start at a time (its limit lowered
/// while it runs, as `prlimit` does): the rows given back together were
/// claimed and started together after each pause, each start holding part
/// of what the others needed, and they could fail round after round while
/// one at a time fits (at 36 descriptors nothing ran in a minute). Now
/// a shortage lowers how many tries run at once, and every row finishes on
/// its one try.
async fn a_daemon_with_descriptors_for_one_start_at_a_time_runs_every_row(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &probe_and_nap("max_concurrent: 12\n", "0.2"));
    // What the daemon holds when idle: its preloaded parent started, its
    // connections open.
    for task in ["Nap", "Probe"] {
        let first = db.insert_row(NewRow::new(task).try_limit(1)).await;
        db.wait_for_state(first, "FINISHED", WAIT).await;
    }
    let open = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .count() as u64;
    // A try holds up to four descriptors and its start six more for a
    // moment: ten fit one start, not two.
    set_open_files(daemon.pid(), open + 10);
    naps_and_probes(&db, 200).await;
    every_row_finishes(&db).await;
    let log = daemon.log_text();
    assert!(
        log.contains("the daemon is short of resources to start tasks"),
        "the limit left room for one start only: {log}"
    );
    // Before: 117 to 224 starts given back for these 24 rows (the daemon
    // started every row it claimed at once, each round); now about 6 to 36,
    // most of them in the first round, before the first failure was seen:
    // on a loaded machine that round lasts longer (51 once, with four
    // tests at a time and a CPU hog beside them: 33 before the daemon's
    // line that it is short, 130 ms after the first failure, 18 after,
    // 14 of those within 20 ms of it).
    let given_back = log.matches("the daemon is short of resources (").count();
    assert!(
        given_back < 80,
        "{given_back} starts given back for 24 rows: {log}"
    );
    assert!(daemon.stop().success());
}

/// A preloaded try whose parent is not started yet, on a daemon with one
/// descriptor to spare: the parent's start fails for want of descriptors,
/// the try is given back (not FAILED, its one try not counted) and runs once
/// descriptors are free again. (The suite's runs of the descriptor test
/// above saw a preloaded try FAILED for "Too many open files", one in
/// about two runs; this test does not reach that path, which I did not
/// find: the daemon now takes any such error of a preloaded start for its
/// own shortage, see supervisor/mod.rs.)
async fn a_preloaded_parent_that_cannot_start_for_want_of_descriptors_costs_no_try(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &probe_and_nap("", "0.1"));
    // Its connections open; no preloaded parent yet.
    let first = db.insert_row(NewRow::new("Nap").try_limit(1)).await;
    db.wait_for_state(first, "FINISHED", WAIT).await;
    let open = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .count() as u64;
    let was = set_open_files(daemon.pid(), open + 1);
    let id = db.insert_row(NewRow::new("Probe").try_limit(1)).await;
    daemon.wait_for_log("preload-probe: Too many open files", WAIT);
    set_open_files(daemon.pid(), was);
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}");
    assert!(daemon.stop().success());
}

/// A daemon not run as root whose hard `RLIMIT_NOFILE` is lowered while it
/// runs (`prlimit --nofile=4096`, both limits): every try was FAILED,
/// counted, with "setting resource limits: Operation not permitted" (each
/// child set the limit the daemon started with, the hard one above the
/// daemon's now, which only a privileged process may raise), and so was
/// each start of a preloaded parent. Now a task's hard limit is never above
/// the daemon's. (Needs root, to run the daemon as `nobody`.)
async fn tries_of_a_daemon_whose_hard_open_files_limit_was_lowered_start(backend: Backend) {
    if !crate::util::runs_as_root("running the daemon as nobody needs root") {
        return;
    }
    let db = TestDb::new(backend).await;
    let nobody = scratch_for_nobody(&db, "d");
    // A soft limit under the hard one (systemd's default is 1024:524288),
    // within what this test may give.
    let mut ours = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes a local.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) },
        0
    );
    let hard = ours.rlim_max.min(8192);
    let mut daemon = db
        .daemon("d")
        .yaml(&probe_and_nap("", "0.1"))
        .uid(nobody)
        .open_files((256, hard))
        .start();
    // As its own user may (root here may lack CAP_SYS_RESOURCE).
    let lowered = hard / 2;
    let status = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "prlimit",
        ])
        .arg(format!("--pid={}", daemon.pid()))
        .arg(format!("--nofile={lowered}:{lowered}"))
        .status()
        .unwrap();
    assert!(status.success(), "prlimit: {status}");
    for task in ["Nap", "Probe"] {
        let id = db.insert_row(NewRow::new(task).try_limit(1)).await;
        let row = db
            .wait_for(id, WAIT, "ended", |row| {
                !matches!(row.result.as_deref(), None | Some("RUNNING"))
            })
            .await;
        assert_eq!(row.result.as_deref(), Some("FINISHED"), "{task}: {row:#?}");
    }
    assert!(daemon.stop().success());
}

/// Sets `pid`'s soft `RLIMIT_NOFILE` to `limit`, as `prlimit` does (the
/// hard one stays: raising it again would need a privilege the daemon's
/// non-dumpable process denies even to root); returns the soft limit it had.
fn set_open_files(pid: i32, limit: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit writes a local; `pid` is this test's child.
    let read = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(read, 0, "{}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: limit,
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit reads a local.
    let set = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    old.rlim_cur
}

/// A config with `settings`, the task-sdk probe preloaded (its `Probe`
/// type) and `Nap`, an exec'd `sleep` of `seconds`.
fn probe_and_nap(settings: &str, seconds: &str) -> String {
    let probe = crate::util::built_beside_the_daemon("preload-probe");
    format!(
        "{settings}programs: [{{path: {}, preload: true}}]\n\
         tasks:\n  Nap:\n    command: [sleep, '{seconds}']\n",
        probe.display()
    )
}

/// Twelve exec'd `Nap` rows and twelve preloaded `Probe` rows of
/// `sleep_ms`, each allowed one try.
async fn naps_and_probes(db: &TestDb, sleep_ms: u32) {
    for _ in 0..12 {
        db.insert_row(NewRow::new("Nap").try_limit(1)).await;
        db.insert_row(
            NewRow::new("Probe")
                .options(&format!("sleep_ms: {sleep_ms}"))
                .try_limit(1),
        )
        .await;
    }
}

/// Waits up to a minute for every row to be FINISHED.
async fn every_row_finishes(db: &TestDb) {
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result IS NULL OR result <> 'FINISHED'",
        0,
        Duration::from_secs(60),
    )
    .await;
}

/// Out of processes on the daemon's side (systemd's `TasksMax` on its
/// service, a user's process limit, a full pid table): the daemon's clone of
/// an exec'd try and the preloaded parent's fork of a preloaded one fail
/// with EAGAIN. Neither try began, so neither may be counted: every row
/// here allows one try. The daemon and its preloaded parent are moved into
/// a pids cgroup that then allows no process or thread more; once it allows
/// them again, every row finishes on its one try.
async fn starts_failing_for_want_of_processes_give_the_try_back(backend: Backend) {
    let Some(cgroup) = PidsCgroup::make() else {
        return;
    };
    let db = TestDb::new(backend).await;
    let sdk = crate::util::built_beside_the_daemon("preload-probe");
    let python = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/preload/preload_tasks.py");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "max_concurrent: 6\n\
             programs: [{{path: {}, preload: true}}, {{path: {}, preload: true}}]\n\
             tasks:\n  Nap:\n    command: [sleep, '0.2']\n",
            sdk.display(),
            python.display()
        ),
    );
    cgroup.take(daemon.pid());
    // The preloaded parents start now, inside the cgroup.
    for task in ["Probe", "PyProbe"] {
        let first = db.insert_row(NewRow::new(task).try_limit(1)).await;
        db.wait_for_state(first, "FINISHED", WAIT).await;
    }
    cgroup.allow(Some(0));
    let refused = cgroup.refusals();
    let mut ids = Vec::new();
    for _ in 0..3 {
        for task in ["Nap", "Probe", "PyProbe"] {
            ids.push(db.insert_row(NewRow::new(task).try_limit(1)).await);
        }
    }
    wait_until(WAIT, "forks to be refused", || {
        cgroup.refusals() > refused + 6
    });
    daemon.wait_for_log("short of resources to start tasks", WAIT);
    cgroup.allow(None);
    for id in ids {
        let row = db
            .wait_for(id, WAIT, "a counted try to end", |row| {
                row.tries > 0 && row.result.as_deref().is_some_and(|r| r != "RUNNING")
            })
            .await;
        assert_eq!(
            row.result.as_deref(),
            Some("FINISHED"),
            "{row:#?}\n{}",
            daemon.log_text()
        );
        assert_eq!(row.tries, 1, "{row:#?}");
    }
    let log = daemon.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("its tries are exec'd"), "{log}");
    assert!(daemon.stop().success(), "{log}");
}

/// Out of processes after a quiet while: tokio's blocking pool had ended
/// its idle threads (10 s after their last work), could make none, and
/// panicked in `spawn_blocking`; a try whose options are large enough to be
/// checked there was counted CRASHED (its one try spent), where a try with
/// small options was given back. Now the pool keeps its threads, and the
/// try is given back and runs once processes are allowed again.
async fn a_shortage_of_processes_after_a_quiet_while_costs_a_large_try_nothing(backend: Backend) {
    let Some(cgroup) = PidsCgroup::make() else {
        return;
    };
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "tasks:\n  Nap:\n    command: [sleep, '0.1']\n");
    cgroup.take(daemon.pid());
    let pool_threads = || {
        std::fs::read_dir(format!("/proc/{}/task", daemon.pid()))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|name| name.starts_with("tokio-"))
            })
            .count()
    };
    // Past the 10 s after which an idle pool thread ended.
    crate::util::within(Duration::from_secs(12), || pool_threads() == 0);
    cgroup.allow(Some(0));
    let options = format!("pad: {}\n", "x".repeat(20 * 1024));
    let id = db
        .insert_row(NewRow::new("Nap").options(&options).try_limit(1))
        .await;
    let row = db
        .wait_for(id, WAIT, "its first try to end or be given back", |row| {
            !matches!(row.result.as_deref(), None | Some("RUNNING"))
        })
        .await;
    assert_eq!(row.result.as_deref(), Some("INTERRUPTED"), "{row:#?}");
    assert_eq!(row.tries, 0, "{row:#?}");
    cgroup.allow(None);
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:#?}");
    let log = daemon.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(daemon.stop().success(), "{log}");
}

/// A pids cgroup of its own (cgroup v1's `pids` hierarchy, or cgroup v2
/// where its root offers `pids`), made for one test; what it holds is moved
/// back to the root, and it is removed, when dropped. Needs root.
struct PidsCgroup {
    dir: std::path::PathBuf,
    root: std::path::PathBuf,
}

impl PidsCgroup {
    fn make() -> Option<PidsCgroup> {
        if !crate::util::runs_as_root("making a cgroup needs root") {
            return None;
        }
        let v1 = std::path::Path::new("/sys/fs/cgroup/pids");
        let v2 = std::path::Path::new("/sys/fs/cgroup");
        let root = if v1.join("cgroup.procs").exists() {
            v1
        } else if std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|controllers| controllers.split_whitespace().any(|c| c == "pids"))
        {
            v2
        } else {
            println!("skipped: no pids cgroup controller to use");
            return None;
        };
        let dir = root.join(format!(
            "taskrunner-test-{}-{}",
            std::process::id(),
            crate::util::now_ns()
        ));
        std::fs::create_dir(&dir).unwrap();
        Some(PidsCgroup {
            dir,
            root: root.to_path_buf(),
        })
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    fn take(&self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    /// Allows at most `count` processes and threads in the cgroup (those
    /// already in it stay), or any number.
    fn allow(&self, count: Option<u64>) {
        let value = count.map_or("max".to_string(), |count| count.to_string());
        std::fs::write(self.dir.join("pids.max"), value).unwrap();
    }

    /// How many forks and thread creations the limit refused so far.
    fn refusals(&self) -> u64 {
        let events = std::fs::read_to_string(self.dir.join("pids.events")).unwrap();
        events
            .lines()
            .find_map(|line| line.strip_prefix("max "))
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("pids.max"), "max");
        for _ in 0..50 {
            let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A task type `Spawner` (the config's `tasks:`, returned) whose first try
/// leaves a grandchild in its process group, its pid written to the file
/// returned, and sleeps; a later try fails if that grandchild still runs
/// (a zombie, waiting for init to reap it, runs no more), else prints
/// `alone`.
fn spawner_leaving_a_grandchild(db: &TestDb) -> (String, std::path::PathBuf) {
    let grandchild_file = db.scratch.join("grandchild");
    let script = db.scratch.join("spawner.sh");
    std::fs::write(
        &script,
        format!(
            r#"g={g}
if [ "$TASKRUNNER_TRY" = 1 ]; then
    (trap "" TERM HUP; while :; do sleep 0.1; done) &
    echo $! > $g
    exec sleep 60
fi
state=$(sed 's/.*) //' /proc/$(cat $g)/stat 2>/dev/null | cut -c1)
if [ -n "$state" ] && [ "$state" != Z ]; then echo "try 1 still runs" >&2; exit 1; fi
echo alone
"#,
            g = grandchild_file.display()
        ),
    )
    .unwrap();
    let tasks = format!(
        "tasks:\n  Spawner:\n    command: [/bin/sh, {}]\n",
        script.display()
    );
    (tasks, grandchild_file)
}

/// The parent-death signal reaches only the task's own process: a
/// grandchild in its process group kept running after `kill -9` of the
/// daemon, beside the next try that the restarted daemon started at once.
/// Now the start-up reaper kills what is left of the old try's group first.
async fn a_grandchild_of_a_killed_daemons_task_is_killed_before_the_rerun(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (config, grandchild_file) = spawner_leaving_a_grandchild(&db);
    let mut daemon = Daemon::start(&db, "d", &config);
    let id = db.enqueue("Spawner", None).await;
    db.wait_for_pid(id, WAIT).await;
    let grandchild = read_pid_file(&grandchild_file);
    let (mut daemon, row) = daemon
        .kill_leaving_grandchild_and_restart(&db, id, grandchild)
        .await;
    assert!(!kill_if_alive(grandchild), "the grandchild was killed");
    assert_eq!(row.result.as_deref(), Some("FINISHED"), "{row:#?}");
    assert_eq!(row.result_text.as_deref(), Some("alone"));
    assert_eq!(row.tries, 2);
    assert!(daemon.stop().success());
}

/// The same grandchild, found by `taskrunner-cli reap` run as a user who
/// may not signal it (`nobody`; the tasks run as root): its `kill` fails
/// (`EPERM`). Before, the reaper counted it killed ("killed 1 process(es)
/// its try left in its process group") and marked the row `CRASHED`, and
/// the restarted daemon ran the next try beside it. Now the row is left as
/// it is, with one line saying why, for a reaper that may kill it (also
/// once its lease has lapsed): the restarted daemon's start-up reap kills
/// it and reruns the row. Needs root (to run the CLI as `nobody`); skipped
/// without.
async fn a_reap_that_cannot_kill_a_dead_tries_grandchild_leaves_its_row(backend: Backend) {
    if !crate::util::runs_as_root("running the CLI as another user needs root") {
        return;
    }
    let db = TestDb::new(backend).await;
    let (tasks, grandchild_file) = spawner_leaving_a_grandchild(&db);
    let lease = "heartbeat_interval: 1s\nkill_grace: 1s\nlease_timeout: 3s\n";
    let config = format!("{lease}{tasks}");
    let mut daemon = Daemon::start(&db, "d", &config);
    let id = db.enqueue("Spawner", None).await;
    let task = db.wait_for_pid(id, WAIT).await.pid.unwrap() as i32;
    let grandchild = read_pid_file(&grandchild_file);
    daemon.kill_with_its_watchdog();
    wait_until(WAIT, "the task to die with its daemon", || {
        !process_exists(task)
    });
    // The reap comes once the row's lease (3 s) has lapsed too: the
    // lapsed-lease pass must not take it either.
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {id} AND heartbeat_at < {}",
            crate::util::sql_ago(backend, 4)
        ),
        1,
        WAIT,
    )
    .await;
    let reap_config = db.scratch.join("reap.yml");
    std::fs::write(&reap_config, lease).unwrap();
    let cli_copy = crate::util::cli_copy_for_nobody(&db);
    let (stdout, stderr) = crate::util::wrapped_cli(
        &db,
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&cli_copy)
            .arg("--config")
            .arg(&reap_config),
        &["reap"],
    );
    assert!(
        !stdout.lines().any(|l| l.starts_with(&format!("{id} "))),
        "the reaper took a row whose try's grandchild it could not kill: {stdout}"
    );
    // The process named is the grandchild or one of its `sleep`s: the
    // first member of the group the reaper could not kill.
    assert!(
        stderr.contains(&format!("request {id} is left running"))
            && stderr.contains("could not kill process ")
            && stderr.contains("(Operation not permitted"),
        "{stderr}"
    );
    assert_eq!(db.row(id).await.result.as_deref(), Some("RUNNING"));
    assert!(process_exists(grandchild), "the grandchild still runs");
    let mut daemon = daemon.restart();
    let row = db
        .wait_for(id, WAIT, "ended", |r| {
            !matches!(r.result.as_deref(), Some("RUNNING") | Some("CRASHED"))
        })
        .await;
    assert!(!kill_if_alive(grandchild), "the grandchild was killed");
    assert_eq!(row.result_text.as_deref(), Some("alone"), "{row:#?}");
    assert_eq!(row.tries, 2);
    assert!(daemon.stop().success());
}

/// `--no-migrate` on a schema that is missing or older started and looped
/// for ever ("no such table" retried as an outage). Now the daemon compares
/// the applied migrations with its own and exits 1 naming what differs.
async fn no_migrate_on_an_older_or_missing_schema_exits_naming_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let dir = db.scratch.join("d");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("taskrunner.yml");
    std::fs::write(&config, merge_yaml(&base_config(&db, &dir), "")).unwrap();
    let exit_of = |what: &str| {
        let mut daemon = Daemon::start_with_config(&config, &["--no-migrate"]);
        let status = daemon.wait_exit(WAIT);
        let log = daemon.log_text();
        assert_eq!(status.code(), Some(1), "{what}: {log}");
        log
    };
    // The latest migration renumbered: one missing, one newer than the binary.
    let latest = db
        .scalar("SELECT max(version) FROM task_runner_schema_migrations")
        .await;
    db.execute(
        "UPDATE task_runner_schema_migrations SET version = 9999 \
          WHERE version = (SELECT max(version) FROM task_runner_schema_migrations)",
    )
    .await;
    let log = exit_of("renumbered");
    assert!(
        log.contains(&format!("is missing migration(s) {latest:04}")),
        "{log}"
    );
    assert!(log.contains("has migration(s) 9999 newer"), "{log}");
    db.execute("DROP TABLE task_runner_schema_migrations").await;
    let log = exit_of("no schema");
    assert!(log.contains("has no taskrunner schema"), "{log}");
}

/// Each claim writes the host id and the daemon's instance (about a
/// hundred characters more) into `claim_token`, a VARCHAR(255) on MariaDB
/// and an indexed column on PostgreSQL: with a host id of 200 characters
/// every claim on MariaDB failed ("database unavailable while claiming
/// requests": data too long for `claim_token`), for ever, and nothing ran.
async fn a_host_id_too_long_for_a_claim_is_refused_at_start_and_the_longest_allowed_runs(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let long = format!("host_id: {}\n", "h".repeat(200));
    let (code, log) = db.daemon("d").yaml(&long).refused();
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("host_id: at most 128 characters") && log.contains("this one has 200"),
        "{log}"
    );
    // The longest allowed, in characters of two bytes, claims and runs.
    let mut daemon = Daemon::start(&db, "e", &format!("host_id: {}\n", "é".repeat(128)));
    let id = db.enqueue("NoOp", None).await;
    db.wait_for_state(id, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

/// A task of the daemon's own uid read `DATABASE_URL`/`PGPASSWORD` from
/// `/proc/<daemon>/environ`, inherited every other variable of the daemon,
/// and ran in the config file's directory. Now the daemon is not dumpable,
/// tasks get an allowlist of its environment, and `workdir` defaults to `/`.
/// (As root the daemon runs as `nobody` here, so that its task shares its uid.)
async fn a_task_of_the_daemons_user_cannot_read_its_environment(backend: Backend) {
    let db = TestDb::new(backend).await;
    let extra = "tasks:\n  Peek:\n    command: [/bin/sh, -c, 'pwd; cat /proc/$PPID/environ | tr \"\\\\0\" \"\\\\n\"; env']\n";
    let env = [
        ("TASKRUNNER_TEST_SECRET", "hunter2"),
        ("PGPASSWORD", "hunter3"),
    ];
    let mut daemon = if nix::unistd::geteuid().is_root() {
        Daemon::start_as(&db, "d", extra, &env, scratch_for_nobody(&db, "d"))
    } else {
        Daemon::start_in_env(&db, "d", extra, &env)
    };
    let id = db.enqueue("Peek", None).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    let text = row.result_text.unwrap_or_default();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!text.contains("hunter3"), "{text}");
    assert!(text.contains("PATH="), "PATH is inherited: {text}");
    assert_eq!(text.lines().next(), Some("/"), "{text}");
    assert!(daemon.stop().success());
}

/// Gives the test's scratch directory, and the directory of daemon `name`
/// in it, to `nobody`, for a daemon run as that user; returns its uid.
fn scratch_for_nobody(db: &TestDb, name: &str) -> u32 {
    use std::os::unix::fs::chown;
    let nobody = 65534;
    std::fs::create_dir_all(db.scratch.join(name)).unwrap();
    for entry in std::fs::read_dir(&db.scratch.path).unwrap() {
        chown(entry.unwrap().path(), Some(nobody), Some(nobody)).unwrap();
    }
    chown(&db.scratch.path, Some(nobody), Some(nobody)).unwrap();
    nobody
}

/// A root daemon runs a type as `user: nobody`: the task got the daemon's
/// `HOME=/root`, `USER=root` and `LOGNAME=root` (from its allowlist), so
/// that whatever it kept under `~` (a cache, git's or pip's files) was not
/// its user's, nor writable by it. Now it gets its user's, from the user
/// database, as a login sets them (`su -`, systemd's `User=`); a type's
/// `env:` still overrides them. Needs root; skipped without.
async fn a_task_run_as_another_user_gets_that_users_home_and_names(backend: Backend) {
    if !crate::util::runs_as_root("running a task as another user needs a root daemon") {
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let db = TestDb::new(backend).await;
    let show = "command: [/bin/sh, -c, 'echo \"$HOME $USER $LOGNAME $SHELL\"']";
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  Who:\n    {show}\n    user: nobody\n  \
             WhoElsewhere:\n    {show}\n    user: nobody\n    env: {{ HOME: /tmp }}\n"
        ),
    );
    let who = db.enqueue("Who", None).await;
    let elsewhere = db.enqueue("WhoElsewhere", None).await;
    let row = db.wait_for_state(who, "FINISHED", WAIT).await;
    assert_eq!(
        row.result_text.as_deref().map(str::trim),
        Some(
            format!(
                "{} nobody nobody {}",
                nobody.dir.display(),
                nobody.shell.display()
            )
            .as_str()
        ),
        "{row:?}"
    );
    let row = db.wait_for_state(elsewhere, "FINISHED", WAIT).await;
    assert_eq!(
        row.result_text.as_deref().map(str::trim),
        Some(format!("/tmp nobody nobody {}", nobody.shell.display()).as_str()),
        "{row:?}"
    );
    assert!(daemon.stop().success());
}

/// A root daemon runs a type as `user:` a member of other groups: its tasks
/// got only the user's primary group (`setgroups(0)`), and a file of a group
/// the user is in (`deploy` owning `/srv/shared`) was out of their reach.
/// They now get every group of the user, as a login (systemd's `User=`)
/// gives them. Needs root and a user with a supplementary group in
/// /etc/group (Debian's `postgres` is in `ssl-cert`); skipped without.
async fn a_task_run_as_another_user_gets_that_users_groups(backend: Backend) {
    if !crate::util::runs_as_root("running a task as another user needs a root daemon") {
        return;
    }
    let Some((user, gid, primary)) = crate::util::user_with_a_supplementary_group() else {
        println!("skipped: no user in /etc/group is a member of a group besides its own");
        return;
    };
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  Groups:\n    command: [id, -G]\n    user: {user}\n  \
             OtherGroup:\n    command: [id, -G]\n    user: {user}\n    group: nogroup\n"
        ),
    );
    let groups_of = async |task: &str| -> Vec<u32> {
        let id = db.enqueue(task, None).await;
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        let text = row.result_text.unwrap_or_default();
        text.split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect()
    };
    let groups = groups_of("Groups").await;
    assert_eq!(groups.first(), Some(&primary), "{groups:?}");
    assert!(
        groups.contains(&gid),
        "{user}'s tasks are in its group {gid}: {groups:?}"
    );
    // With `group:`, that group and the user's others, not its primary
    // group (as systemd's `User=` and `Group=`).
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .unwrap()
        .gid
        .as_raw();
    let groups = groups_of("OtherGroup").await;
    assert_eq!(groups.first(), Some(&nogroup), "{groups:?}");
    assert!(groups.contains(&gid), "{groups:?}");
    assert!(!groups.contains(&primary), "{groups:?}");
    assert!(daemon.stop().success());
}

/// A root daemon under a hard CPU time limit (a unit's `LimitCPU=100`)
/// runs a type as `user: nobody` with a `cpu_limit` above it: the task's
/// limit was set after the credentials change, when raising the hard limit
/// needs the privilege just dropped, and every try FAILED, counted
/// ("setting resource limits: Operation not permitted"). The hard limit is
/// now raised before the change. Needs root with CAP_SYS_RESOURCE; skipped
/// without.
async fn a_task_run_as_another_user_gets_a_cpu_limit_above_its_daemons(backend: Backend) {
    if !crate::util::runs_as_root("running a task as another user needs a root daemon") {
        return;
    }
    // CAP_SYS_RESOURCE (24): what raises a hard limit. Containers often
    // leave it out, and then no daemon can raise one.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .unwrap_or(0);
    if effective & 1 << 24 == 0 {
        println!("skipped: raising a hard limit needs CAP_SYS_RESOURCE, which this process lacks");
        return;
    }
    let db = TestDb::new(backend).await;
    let mut daemon = db
        .daemon("d")
        .yaml(
            "tasks:\n  Limited:\n    command: [/bin/sh, -c, 'ulimit -H -t']\n    \
             user: nobody\n    cpu_limit: 200s\n",
        )
        .cpu_seconds((100, 100))
        .start();
    let id = db.enqueue("Limited", None).await;
    let row = db.wait_for_outcome(id, WAIT).await;
    assert_eq!(row.result.as_deref(), Some("FINISHED"), "{row:?}");
    assert_eq!(
        row.result_text.as_deref().map(str::trim),
        Some("201"),
        "{row:?}"
    );
    assert!(daemon.stop().success());
}

/// A root daemon ran tasks as root without a word, and with only `group:`
/// set kept uid 0. Now it warns at start, and refuses `group:` alone.
async fn a_root_daemon_warns_of_root_tasks_and_refuses_group_without_user(backend: Backend) {
    if !crate::util::runs_as_root("the test runs as root only (the warning is about a root daemon)")
    {
        return;
    }
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "");
    daemon.wait_for_log(
        "the daemon runs as root and these task types run as root too",
        WAIT,
    );
    assert!(daemon.stop().success());
    let (code, log) = db.daemon("g").yaml("group: nogroup\n").refused();
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("group: without user: would run tasks as root"),
        "{log}"
    );
}

/// 1,500 idle connections to the control socket exhausted the daemon's
/// descriptors, and the accept loop then spun writing warnings. Now at most
/// a few connections are answered at once (32, or an eighth of the
/// descriptor limit if fewer), the rest wait in the backlog, accept errors
/// back off, and tasks keep starting meanwhile. (With 32 at once under a
/// limit of 64 a start was left a handful of descriptors, and on a loaded
/// machine none: the try was given back until the idle connections timed
/// out. Under 56, 32 idle connections and the daemon's own 27 left none.)
async fn idle_control_connections_cannot_take_the_daemons_descriptors(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start_with_open_files(
        &db,
        "d",
        "max_concurrent: 1\ntasks:\n  Nap:\n    command: [sleep, '0.1']\n",
        (56, 56),
    );
    let socket = daemon.dir.join("run/daemon.sock");
    let mut idle = Vec::new();
    for _ in 0..200 {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::UnixStream::connect(&socket),
        )
        .await
        {
            idle.push(stream);
        }
    }
    let id = db.enqueue("Nap", None).await;
    // Well within the 10 s after which the daemon drops an idle connection.
    db.wait_for_state(id, "FINISHED", Duration::from_secs(5))
        .await;
    let warnings = daemon.log_text().matches("control socket:").count();
    assert!(warnings <= 1, "{}", daemon.log_text());
    drop(idle);
    assert!(daemon.stop().success());
}

/// Any task of the daemon's uid could `stop` it over the control socket.
/// Now the daemon checks the peer (`SO_PEERCRED`) and refuses `stop` from
/// its own task processes.
async fn a_task_cannot_stop_its_daemon_through_the_control_socket(backend: Backend) {
    let db = TestDb::new(backend).await;
    let socket = db.scratch.join("d/run/daemon.sock");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  Stopper:\n    command: [python3, -c, \"import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'stop\\\\n'); print(s.makefile().readline().strip())\", {}]\n",
            socket.display()
        ),
    );
    let id = db.enqueue("Stopper", None).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    let text = row.result_text.unwrap_or_default();
    assert!(text.contains("refused"), "{text}");
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon runs on"
    );
    assert!(daemon.stop().success());
}

/// Type names and stderr tails with newlines and escape sequences were
/// written raw into the text log and by `list`/`show`: a row could forge log
/// lines and drive the reader's terminal. Now control characters are escaped.
async fn control_characters_in_rows_and_stderr_are_escaped_in_logs_and_listings(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Garbler:\n    command: [/bin/sh, -c, 'printf \"oops\\\\n\\\\033[2JFORGED line\\\\n\" >&2; exit 3']\n",
    );
    let evil = db
        .insert_row(NewRow::new("Evil\n\u{1b}[31mINJECTED").try_limit(1))
        .await;
    let garbler = db.insert_row(NewRow::new("Garbler").try_limit(1)).await;
    db.wait_for_state(evil, "FAILED", WAIT).await;
    let row = db.wait_for_state(garbler, "FAILED", WAIT).await;
    assert!(
        row.result_text.unwrap().contains('\u{1b}'),
        "the row keeps the bytes"
    );
    daemon.wait_for_log("FORGED", WAIT);
    let log = daemon.log_text();
    assert!(!log.contains('\u{1b}'), "{log}");
    assert!(
        !log.lines()
            .any(|line| line.starts_with("FORGED") || line.starts_with("[31mINJECTED")),
        "{log}"
    );
    for args in [
        vec!["list"],
        vec!["show", &evil.to_string()],
        vec!["show", &garbler.to_string()],
    ] {
        let (status, out, _) = cli(&db, &args);
        assert_eq!(status, 0, "{args:?}");
        assert!(!out.contains('\u{1b}'), "{args:?}: {out}");
        assert!(!out.lines().any(|l| l.starts_with("[31mINJECTED")), "{out}");
    }
    assert!(daemon.stop().success());
}

/// 100 MiB of options froze the daemon's only runtime thread for 4 s. Now
/// options past `max_options` make the row REJECTED with the reason, and
/// large options are parsed off the runtime thread.
async fn options_past_max_options_are_rejected_without_stalling_the_daemon(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "max_options: 64KiB\ntasks:\n  Cat:\n    command: [cat]\n",
    );
    let big = format!("data: {}\n", "x".repeat(100 * 1024));
    let rejected = db.enqueue("Cat", Some(&big)).await;
    let row = db.wait_for_state(rejected, "REJECTED", WAIT).await;
    let text = row.result_text.unwrap();
    assert!(text.contains("more than max_options 64KiB"), "{text}");
    assert_eq!(row.tries, 1);
    // Under the cap, large options still reach the task byte for byte.
    let fitting = format!("data: {}\n", "y".repeat(40 * 1024));
    let accepted = db.enqueue("Cat", Some(&fitting)).await;
    let row = db.wait_for_state(accepted, "FINISHED", WAIT).await;
    assert_eq!(row.result_text.unwrap().len(), fitting.len() - 1);
    assert!(daemon.stop().success());
}

/// The claim returned a row's whole options even past `max_options`: 64 MiB
/// of options came into the daemon's memory (and its runtime thread) only
/// to be rejected. Now the claim returns their length instead of the value
/// once they are longer than the cap.
async fn options_past_max_options_are_never_loaded_by_the_daemon(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "max_options: 1MiB\ntasks:\n  Cat:\n    command: [cat]\n",
    );
    // Settled: a first try has run, the pools are open.
    let warm = db.enqueue("Cat", Some("a: 1")).await;
    db.wait_for_state(warm, "FINISHED", WAIT).await;
    let (peak_before, _) = crate::util::memory_kib(daemon.pid());
    // MySQL's MEDIUMTEXT holds 16 MiB (and the server's packets as much).
    let huge_mib = match backend {
        Backend::MySql => 15,
        Backend::Sqlite | Backend::Postgres => 64,
    };
    let huge = format!("data: {}\n", "x".repeat(huge_mib << 20));
    let id = db.enqueue("Cat", Some(&huge)).await;
    drop(huge);
    let row = db.wait_for_state(id, "REJECTED", WAIT).await;
    assert!(
        row.result_text
            .as_deref()
            .is_some_and(|text| text.contains("more than max_options 1MiB")),
        "{row:#?}"
    );
    // PostgreSQL: the value stays on the server (measured 0 MiB; 192 MiB
    // before). SQLite rewrites the whole row in its own thread on the
    // claim's UPDATE, which the daemon cannot avoid; what it no longer does
    // is copy the value out (measured 132 MiB; 326 MiB before).
    let grew_mib = peak_grew_under(daemon.pid(), peak_before, huge_options_bound_mib(backend));
    println!("{backend:?}: the daemon's peak memory grew by {grew_mib} MiB");
    assert!(daemon.stop().success());
}

/// How much the daemon's peak memory may grow while a row of 64 MiB of
/// options (15 MiB on MariaDB, whose MEDIUMTEXT holds 16) passes through
/// it without being loaded: SQLite's claim rewrites the row in the
/// daemon's process.
fn huge_options_bound_mib(backend: Backend) -> u64 {
    match backend {
        Backend::Sqlite => 3 * 64,
        Backend::Postgres | Backend::MySql => 16,
    }
}

/// The same options, on a row with an `on_failure` callback: REJECTED, its
/// end made the callback, whose options carry the parent's. The end loaded
/// the row's whole options and parsed them as YAML to merge them into the
/// callback's, on the daemon's one thread (past a second for 64 MiB, and
/// hundreds of MiB): now options longer than a callback's may be are not
/// loaded, and the callback's summary says they were cut.
async fn options_past_max_options_are_not_loaded_for_the_rows_callback(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "max_options: 1MiB\ntasks:\n  Cat:\n    command: [cat]\n",
    );
    let warm = db.enqueue("Cat", Some("a: 1")).await;
    db.wait_for_state(warm, "FINISHED", WAIT).await;
    let (peak_before, _) = crate::util::memory_kib(daemon.pid());
    let huge_mib = match backend {
        Backend::MySql => 15,
        Backend::Sqlite | Backend::Postgres => 64,
    };
    let huge = format!("data: {}\n", "x".repeat(huge_mib << 20));
    let id = db
        .insert_row(NewRow::new("Cat").options(&huge).on_failure("Cat"))
        .await;
    drop(huge);
    db.wait_for_state(id, "REJECTED", WAIT).await;
    let callback = db
        .wait_for_at_least(
            &format!("SELECT count(*) FROM task_runner_requests WHERE callback_of = {id}"),
            1,
            WAIT,
        )
        .await;
    assert_eq!(callback, 1);
    let callback = db
        .scalar(&format!(
            "SELECT id FROM task_runner_requests WHERE callback_of = {id}"
        ))
        .await;
    let options = db
        .row(taskrunner::request::RequestId(callback))
        .await
        .options
        .unwrap_or_default();
    assert!(
        options.len() < 4096 && options.contains("- options") && options.contains("- merged"),
        "{options}"
    );
    // As in the test above: SQLite's claim rewrites the row in the daemon.
    let grew_mib = peak_grew_under(daemon.pid(), peak_before, huge_options_bound_mib(backend));
    println!("{backend:?}: the daemon's peak memory grew by {grew_mib} MiB");
    assert!(daemon.stop().success());
}

/// A result_text cut to `output_tail` did not say so. Now it starts with a
/// line naming how much was dropped, and still fits in `output_tail`.
async fn truncated_output_says_it_was_cut(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "output_tail: 1KiB\ntasks:\n  Chatty:\n    command: [/bin/sh, -c, 'head -c 5000 /dev/zero | tr \"\\\\0\" x; echo end']\n",
    );
    let id = db.enqueue("Chatty", None).await;
    let text = db
        .wait_for_state(id, "FINISHED", WAIT)
        .await
        .result_text
        .unwrap();
    assert!(text.starts_with("[output cut: the first "), "{text}");
    assert!(text.ends_with("xxend"), "{text}");
    assert!(text.len() <= 1024, "{}", text.len());
    assert!(daemon.stop().success());
}

/// The daemon and its tasks had the same `oom_score_adj`: the OOM killer
/// could pick the daemon. Now a task's is higher than its daemon's.
async fn the_oom_killer_prefers_a_task_to_its_daemon(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Scores:\n    command: [/bin/sh, -c, 'cat /proc/self/oom_score_adj /proc/$PPID/oom_score_adj']\n",
    );
    let id = db.enqueue("Scores", None).await;
    let text = db
        .wait_for_state(id, "FINISHED", WAIT)
        .await
        .result_text
        .unwrap();
    let scores: Vec<i32> = text.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert!(scores[0] > scores[1], "task, daemon: {scores:?}");
    assert!(daemon.stop().success());
}

/// On a PostgreSQL database whose server encoding is not UTF-8
/// (SQL_ASCII), one row of bytes that are not UTF-8 stopped every claim.
/// Now the daemon refuses such a database at start, naming the encoding.
/// PostgreSQL only: SQLite stores text as given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_database_that_is_not_utf8_is_refused_at_start() {
    let db = TestDb::new(Backend::Postgres).await;
    let admin = sqlx::PgPool::connect(&crate::util::postgres_admin_url())
        .await
        .unwrap();
    let name = format!("{}_ascii", db.url.rsplit_once('/').unwrap().1);
    for statement in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name} ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
    let url = format!("{}/{name}", db.url.rsplit_once('/').unwrap().0);
    let (code, log) = db
        .daemon("d")
        .yaml(&format!("database_url: {url}\n"))
        .refused();
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("has server_encoding SQL_ASCII: taskrunner needs UTF8"),
        "{log}"
    );
}

/// PostgreSQL: rows an application wrote with an infinite `created_at` or
/// `delay_until` (`'-infinity'` is a timestamp there, and no check refused
/// it). The claim's measure of each row's wait subtracted the two, which
/// PostgreSQL refuses for infinite ones: every claim that took such a row
/// failed, and no row behind it ran, on any daemon. The wait is now the
/// difference of the two times as seconds (an infinite one is not
/// counted in the metrics), and the rows run like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_with_an_infinite_time_stop_no_claim() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut ids = Vec::new();
    for (column, value) in [
        ("created_at", "'-infinity'"),
        ("delay_until", "'-infinity'"),
        ("created_at", "'infinity'"),
    ] {
        ids.push(db.insert_row(NewRow::new("NoOp").sql(column, value)).await);
    }
    ids.push(db.enqueue("NoOp", None).await);
    let mut daemon = Daemon::start(&db, "d", "max_concurrent: 2\n");
    for id in ids {
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        assert_eq!(row.tries, 1, "{row:?}\n{}", daemon.log_text());
    }
    let config = daemon.config.display().to_string();
    let (_, metrics, _) = cli(&db, &["--config", &config, "metrics"]);
    let sum = metrics
        .lines()
        .find_map(|line| line.strip_prefix("taskrunner_wait_before_start_seconds_sum"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(!sum.contains("Inf") && !sum.contains("NaN"), "{sum}");
    assert!(daemon.stop().success());
}

/// SQLite: names an application bound as bytes (Python's `bytes`, a Ruby
/// string in ASCII-8BIT) are BLOBs, which never equal the same names as
/// TEXT. A paused type's row written so passed the claim's exclusion of the
/// paused types and ran. Such names are stored as TEXT now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_names_written_as_bytes_are_held_by_a_pause_as_text_is() {
    let db = TestDb::new(Backend::Sqlite).await;
    let (code, out, err) = cli(&db, &["pause", "--task", "Thumb"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut daemon = Daemon::start(&db, "d", "tasks:\n  Thumb:\n    command: [/bin/true]\n");
    // 'Thumb' and 'images' as BLOB literals.
    let held = db
        .insert_row(
            NewRow::new("Thumb")
                .sql("task_class_name", "X'5468756d62'")
                .sql("queue", "X'696d61676573'"),
        )
        .await;
    // A row of another type runs: the daemon claimed, and passed it over.
    let probe = db.enqueue("NoOp", None).await;
    db.wait_for_state(probe, "FINISHED", WAIT).await;
    assert_eq!(db.row(held).await.result, None, "{}", daemon.log_text());
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {held} \
                AND typeof(task_class_name) = 'text' AND task_class_name = 'Thumb' \
                AND typeof(queue) = 'text' AND queue = 'images'"
        ))
        .await,
        1
    );
    let (code, out, err) = cli(&db, &["resume", "--task", "Thumb"]);
    assert_eq!(code, 0, "{out}{err}");
    db.wait_for_state(held, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

/// SQLite: the upgrade to migration 0019 on rows written before it: an open
/// row whose `unique_key` was written as bytes beside an open row with the
/// same key as text (which a BLOB never equalled, so both were taken). The
/// upgrade stores names as text; that key it leaves as it is, and the
/// upgrade goes through (its first form's own trigger converted it, and
/// the unique index refused: no daemon could start). An update of that
/// row's other names leaves it as it is too. Only an open twin keeps a key
/// as bytes: a recurring key's ended row is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_the_upgrade_storing_names_as_text_goes_through_a_key_with_a_text_twin() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.execute("DROP TRIGGER task_runner_requests_names_as_text_insert")
        .await;
    db.execute("DROP TRIGGER task_runner_requests_names_as_text_update")
        .await;
    db.execute("DROP TRIGGER IF EXISTS task_runner_requests_key_as_text_check")
        .await;
    let blob = db
        .insert_row(
            NewRow::new("Keyed")
                .sql("unique_key", "X'6b6579'")
                .sql("queue", "X'696d61676573'"),
        )
        .await;
    db.insert_row(NewRow::new("Keyed").text("unique_key", "key"))
        .await;
    // A key that recurs, written as bytes each time: an ended row's and an
    // open row's. Both are text after the upgrade (the ended one, made text
    // first, is no open twin of the other).
    let ended = db
        .insert_row(
            NewRow::new("Keyed")
                .sql("unique_key", "X'6f6c64'")
                .result("FINISHED")
                .tries(1),
        )
        .await;
    let recurring = db
        .insert_row(NewRow::new("Keyed").sql("unique_key", "X'6f6c64'"))
        .await;
    db.execute("DELETE FROM task_runner_schema_migrations WHERE version >= 19")
        .await;
    let (status, stdout, stderr) = cli(&db, &["migrate"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    let kinds = |id| {
        format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {id} \
                AND typeof(queue) = 'text' AND queue = 'images' AND typeof(unique_key) = 'blob'"
        )
    };
    assert_eq!(db.scalar(&kinds(blob)).await, 1);
    for id in [ended, recurring] {
        let text = format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {id} \
                AND typeof(unique_key) = 'text' AND unique_key = 'old'"
        );
        assert_eq!(db.scalar(&text).await, 1, "{id}");
    }
    // A new row whose key, written as bytes, an open row holds as text is
    // refused, as the text key is (`INSERT OR IGNORE` too: it took a second
    // open row of the key).
    for verb in ["INSERT", "INSERT OR IGNORE"] {
        let refused = db
            .try_execute(&format!(
                "{verb} INTO task_runner_requests (task_class_name, unique_key) VALUES ('Keyed', X'6f6c64')"
            ))
            .await
            .unwrap_err();
        assert!(
            refused.contains("unique_key is held by an open request"),
            "{refused}"
        );
    }
    db.execute(&format!(
        "UPDATE task_runner_requests SET queue = X'6d61696c' WHERE id = {blob}"
    ))
    .await;
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {blob} \
                AND typeof(queue) = 'text' AND queue = 'mail' AND typeof(unique_key) = 'blob'"
        ))
        .await,
        1
    );
}

/// The daemon's count of failed database calls (`taskrunner_database_errors_total`).
fn database_errors(db: &TestDb, daemon: &Daemon) -> u64 {
    let config = daemon.config.display().to_string();
    let (_, out, _) = cli(db, &["--config", &config, "metrics"]);
    out.lines()
        .find_map(|line| line.strip_prefix("taskrunner_database_errors_total "))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

/// Makes the database refuse the daemon's writes while reads keep working
/// (`on`), or ends that (`!on`): on SQLite another process holds the write
/// lock (returned, to be committed); on PostgreSQL the database becomes
/// `default_transaction_read_only` (as after a failover to a replica) and
/// its sessions are ended so that they reconnect under it; on MariaDB,
/// whose test server has no grant tables (every user is root, whom
/// `read_only` does not bind), a trigger refuses every update of a request.
async fn refuse_writes(db: &TestDb, on: bool, lock: &mut Option<sqlx::SqliteConnection>) {
    use sqlx::Connection;
    match db.backend {
        Backend::Sqlite => {
            if on {
                let mut blocker = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
                sqlx::raw_sql("BEGIN EXCLUSIVE")
                    .execute(&mut blocker)
                    .await
                    .unwrap();
                *lock = Some(blocker);
            } else if let Some(mut blocker) = lock.take() {
                sqlx::raw_sql("COMMIT").execute(&mut blocker).await.unwrap();
            }
        }
        Backend::Postgres => {
            let name = db.url.rsplit_once('/').unwrap().1.to_string();
            let admin = sqlx::PgPool::connect(&crate::util::postgres_admin_url())
                .await
                .unwrap();
            let setting = if on {
                "SET default_transaction_read_only = on"
            } else {
                "RESET default_transaction_read_only"
            };
            // Two statements, not one string: a string of several is one
            // transaction, and a session that reconnected between the
            // termination and its commit would keep the old setting.
            for statement in [
                format!("ALTER DATABASE {name} {setting}"),
                format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
                ),
            ] {
                sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                    .execute(&admin)
                    .await
                    .unwrap();
            }
            admin.close().await;
        }
        Backend::MySql => {
            if on {
                db.execute(
                    "CREATE TRIGGER refuse_writes BEFORE UPDATE ON task_runner_requests FOR EACH ROW \
                     SIGNAL SQLSTATE 'HY000' SET MESSAGE_TEXT = 'writes are refused'",
                )
                .await;
            } else {
                db.execute("DROP TRIGGER refuse_writes").await;
            }
        }
    }
}

/// Issue 13, defect 10: while reads worked and writes failed, every reaper
/// pass (a read) ended the outage and the next claim (a write) began a new
/// one: two log lines per poll. Now an outage ends only when every activity
/// that failed in it works again: one line at its start, one at its end
/// with its length and what waited, and no request is lost.
async fn an_outage_of_writes_while_reads_work_is_logged_once_at_each_end(backend: Backend) {
    let db = TestDb::new(backend).await;
    // On SQLite each failed write waits out the lock: 1 s, not 5 s, so that
    // ten of them do not take a minute.
    let mut daemon = db
        .daemon("d")
        .yaml("max_concurrent: 1\nreap_interval: 1s\ntasks:\n  Nap:\n    command: [/bin/sleep, '1']\n")
        .envs(&[("TASKRUNNER_TEST_SQLITE_BUSY_TIMEOUT_MS", "1000")])
        .start();
    let first = db.enqueue("Nap", None).await;
    let waiting = [db.enqueue("Nap", None).await, db.enqueue("Nap", None).await];
    let pid = db
        .wait_for(first, WAIT, "the first task to run", |r| r.pid.is_some())
        .await
        .pid
        .unwrap() as i32;
    let mut lock = None;
    refuse_writes(&db, true, &mut lock).await;
    // The first task ends in the outage (its result waits in memory), the
    // next claims fail, and reaper passes (reads) keep working meanwhile.
    wait_until(WAIT, "the first task to end", || !process_exists(pid));
    let errors = database_errors(&db, &daemon);
    wait_until(
        Duration::from_secs(60),
        "ten more failed database calls",
        || database_errors(&db, &daemon) >= errors + 10,
    );
    // Ten failed calls can all be the heartbeat's (on SQLite the other
    // activities queue for the one connection): the outage must also have
    // reached the claims and the results, as `status` tells.
    let config = daemon.config.display().to_string();
    wait_until(
        Duration::from_secs(60),
        "status to name claims and results among the failing",
        || {
            let (_, status, _) = cli(&db, &["--config", &config, "status"]);
            status.contains("claiming requests") && status.contains("recording task results")
        },
    );
    refuse_writes(&db, false, &mut lock).await;
    for id in std::iter::once(first).chain(waiting) {
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        assert_eq!(row.tries, 1, "{row:?}");
    }
    // The end line of the writes' outage names the claims; it comes when
    // the slowest activity (a heartbeat, a release of delayed rows, backed
    // off up to 5 s) has worked again, which may be after the rows ran.
    wait_until(WAIT, "the end line of the writes' outage", || {
        daemon.log_text().lines().any(|line| {
            line.contains("database available again") && line.contains("claiming requests (")
        })
    });
    let log = daemon.log_text();
    let mut outage: Vec<&str> = log
        .lines()
        .filter(|line| {
            line.contains("database unavailable") || line.contains("database available again")
        })
        .collect();
    // On PostgreSQL the sessions ended to take the new setting are a short
    // outage of their own when one was in use (its error says the server
    // ended it, or the socket was reset): over before the writes fail, so
    // its end names no claims. (An outage that flaps, the fault this test
    // guards against, ends with the claims held back.)
    if backend == Backend::Postgres
        && outage.len() > 2
        && outage[1].contains("available again")
        && !outage[1].contains("claiming requests")
    {
        outage.drain(..2);
    }
    assert_eq!(outage.len(), 2, "one line at each end:\n{log}");
    assert!(outage[0].contains("database unavailable"), "{log}");
    let end = outage[1];
    assert!(end.contains("claiming requests ("), "{end}");
    assert!(end.contains("recording task results ("), "{end}");
    assert!(end.contains("waiting, none lost"), "{end}");
    assert!(daemon.stop().success());
}

/// `metrics` through the daemon read the queues' gauges from the database
/// before it answered, and failed with it: in an outage, exactly when
/// `taskrunner_database_errors_total` matters, the daemon's own metrics
/// could not be had (the CLI then read the table itself, without them, or
/// failed too when the server was down). Now gauges that cannot be read
/// within 2 s are left out, with a comment line saying why. `status` said
/// nothing of an outage, and `requests: none` when it could not read the
/// table; it now says the database is unavailable (for how long, what
/// fails) and that the counts were not read. The outage: on
/// SQLite another process holds the write lock and every sleep of the
/// daemon's overruns, as under heavy load, so that its one connection waits;
/// on the others the server is stopped. On SQLite the counts and gauges are
/// shown all through, read on a connection of their own (before: status and
/// metrics read them on the daemon's one connection, behind writes waiting
/// for the lock, and said "not read").
async fn the_daemons_status_and_metrics_are_answered_while_the_database_is_out(backend: Backend) {
    let mut server = (backend != Backend::Sqlite).then(|| PrivateServer::start(backend));
    let db = match &server {
        Some(server) => server.test_db().await,
        None => TestDb::new(backend).await,
    };
    let mut daemon = db
        .daemon("d")
        .yaml("lease_timeout: 60s\nmax_concurrent: 3\n");
    if backend == Backend::Sqlite {
        daemon = daemon.timer_slack(Duration::from_millis(20));
    }
    let mut daemon = daemon.start();
    // A row that waits an hour: the default queue has a gauge to show.
    db.insert_row(NewRow::new("NoOp").delayed(backend, 3600))
        .await;
    let config = daemon.config.display().to_string();
    let metrics = || cli(&db, &["--config", &config, "metrics"]).1;
    let waiting = "taskrunner_queue_waiting{queue=\"default\"} 1";
    wait_until(WAIT, "the queue's gauge", || metrics().contains(waiting));
    let mut lock = None;
    match &mut server {
        Some(server) => server.stop(),
        None => refuse_writes(&db, true, &mut lock).await,
    }
    let mut seen = String::new();
    wait_until(
        Duration::from_secs(60),
        "the daemon's metrics, counting failed database calls",
        || {
            seen = metrics();
            seen.lines()
                .find_map(|line| line.strip_prefix("taskrunner_database_errors_total "))
                .and_then(|count| count.trim().parse::<u64>().ok())
                .is_some_and(|count| count > 0)
        },
    );
    assert!(seen.contains("taskrunner_slots 3"), "{seen}");
    let status = || cli(&db, &["--config", &config, "status"]).1;
    wait_until(WAIT, "status to tell of the outage", || {
        seen = status();
        seen.contains(", unavailable for ") && seen.contains("failed call")
    });
    assert!(seen.contains("running 0 of 3"), "{seen}");
    if server.is_none() {
        // SQLite: another process's write lock stops writes, not reads, and
        // what status and metrics show is read on a connection of its own,
        // not behind the daemon's writes waiting for the lock.
        for _ in 0..3 {
            seen = status();
            assert!(seen.contains("requests: PENDING 1"), "{seen}");
            seen = metrics();
            assert!(seen.contains(waiting), "{seen}");
            assert!(!seen.contains("left out"), "{seen}");
        }
    }
    if server.is_some() {
        // The gauge read before the stop is kept for a second at most.
        wait_until(WAIT, "the queues' gauges left out, saying why", || {
            seen = metrics();
            seen.starts_with("# taskrunner_queue_* left out: the database did not answer: ")
                && !seen.contains("taskrunner_queue_waiting")
        });
        seen = status();
        assert!(seen.contains("requests: not read: "), "{seen}");
    }
    match &mut server {
        Some(server) => server.start_again(),
        None => refuse_writes(&db, false, &mut lock).await,
    }
    wait_until(WAIT, "the queue's gauge again", || {
        metrics().contains(waiting)
    });
    wait_until(WAIT, "status without the outage", || {
        seen = status();
        !seen.contains("unavailable") && seen.contains("requests: PENDING 1")
    });
    assert!(daemon.stop().success());
}

/// Found by running the suite at load 30: a statement's wait for another
/// connection's SQLite lock was bounded by a count of 1 ms sleeps (5,000),
/// not by time. On a loaded machine each sleep lasts longer, so the
/// daemon's one connection sat in a single wait for a minute or more, every
/// other statement (and `metrics` through the control socket) queued behind
/// it. The bound is shared by the daemon and the CLI; here the CLI's
/// `enqueue` meets another process's write lock with each of its sleeps
/// overrunning by up to 20 ms (its timer slack, as under heavy load): it must
/// still give up after 5 s, with one line naming the lock (before: 5,000 ×
/// 21 ms, 105 s).
/// SQLite stores any 64-bit `priority`; the claim put its rows in order by
/// negating it, which overflows for the lowest one: a debug build panicked
/// at every claim (the daemon exited, and again at each restart), a release
/// build ran that row first. The order is now a reversed comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_at_the_limits_of_sqlites_integers_run_in_order() {
    let db = TestDb::new(Backend::Sqlite).await;
    let order = db.scratch.join("order");
    let mut ids = Vec::new();
    for priority in [i64::MIN, 0, i64::MAX] {
        ids.push(db.insert_row(NewRow::new("Note").priority(priority)).await);
    }
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "max_concurrent: 1\ntasks:\n  Note:\n    command: [/bin/sh, -c, 'echo $TASKRUNNER_REQUEST_ID >> {}']\n",
            order.display()
        ),
    );
    for id in &ids {
        db.wait_for_state(*id, "FINISHED", WAIT).await;
    }
    let ran: Vec<String> = std::fs::read_to_string(&order)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let expected: Vec<String> = ids.iter().rev().map(|id| id.0.to_string()).collect();
    assert_eq!(ran, expected, "highest priority first");
    assert!(daemon.stop().success());
}

/// An operator deletes the SQLite file under a running daemon to start
/// afresh, and `migrate` makes a new one. The daemon went on with the old
/// file, which its connections kept open, while rows went into the new one:
/// none ran, and nothing said so. It now stops with exit status 1 and one
/// line, so that its service manager's restart opens the new file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_file_deleted_under_the_daemon_stops_it_so_that_a_restart_opens_the_new_one() {
    let db = TestDb::new(Backend::Sqlite).await;
    let before = db.enqueue("NoOp", None).await;
    let mut daemon = Daemon::start(&db, "d", "");
    db.wait_for_state(before, "FINISHED", WAIT).await;
    let file = db.scratch.join("requests.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }
    assert_eq!(cli(&db, &["migrate"]).0, 0);
    let (status, id, stderr) = cli(&db, &["enqueue", "NoOp"]);
    assert_eq!(status, 0, "{stderr}");
    let status = daemon.wait_exit(Duration::from_secs(10));
    let log = daemon.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "the SQLite database file {} is no longer the one this daemon opened",
            file.display()
        )),
        "{log}"
    );
    // A restart (the service manager's) runs the new file's row.
    let mut restarted = Daemon::start(&db, "d2", "");
    let (status, stdout, stderr) = cli(&db, &["wait", id.trim(), "--timeout", "20s"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(restarted.stop().success());
}

/// Deleting SQLite's shared-memory index (`-shm`, the folk remedy for
/// "database is locked") under a running daemon: processes that opened the
/// database since made a new one, the daemon kept the old, saw none of
/// their commits, and its next write overwrote theirs in the log, their
/// rows lost without a word. It now stops with exit status 1 and one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_shared_memory_index_deleted_under_the_daemon_stops_it() {
    let db = TestDb::new(Backend::Sqlite).await;
    let before = db.enqueue("NoOp", None).await;
    let mut daemon = Daemon::start(&db, "d", "");
    db.wait_for_state(before, "FINISHED", WAIT).await;
    let shm = db.scratch.join("requests.db-shm");
    std::fs::remove_file(&shm).unwrap();
    let status = daemon.wait_exit(Duration::from_secs(10));
    let log = daemon.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "{} was deleted or replaced while this daemon had it open",
            shm.display()
        )),
        "{log}"
    );
}

/// SQLite keeps its write-ahead log's file at the largest size it ever
/// reached, reusing it from the start once it is checkpointed: an
/// application's transaction of 80 MB left `requests.db-wal` at 80 MB for
/// good. The daemon's connections now cut it back to 64 MiB when they start
/// the log over (its next write once the checkpoint has caught up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_write_ahead_log_grown_by_a_burst_is_cut_back() {
    use sqlx::Connection;
    let db = TestDb::new(Backend::Sqlite).await;
    let mut daemon = Daemon::start(&db, "d", "heartbeat_interval: 1s\n");
    let wal = db.scratch.join("requests.db-wal");
    let wal_size = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let mut application = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE application_blobs (b BLOB); \
         INSERT INTO application_blobs VALUES (zeroblob(80000000))",
    )
    .execute(&mut application)
    .await
    .unwrap();
    application.close().await.unwrap();
    assert!(wal_size() > 80_000_000, "{}", wal_size());
    // The daemon checkpoints once a second and writes its own row in
    // task_runner_daemons at each heartbeat.
    wait_until(WAIT, "the log cut back to 64 MiB", || {
        wal_size() <= 64 << 20
    });
    let id = db.enqueue("NoOp", None).await;
    db.wait_for_state(id, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_an_sqlite_lock_ends_after_five_seconds_even_when_sleeps_overrun() {
    use std::os::unix::process::CommandExt;
    let db = TestDb::new(Backend::Sqlite).await;
    let mut lock = None;
    refuse_writes(&db, true, &mut lock).await;
    let mut command = std::process::Command::new(CLI);
    command
        .args(["--database-url", db.url.as_str(), "enqueue", "NoOp"])
        .current_dir(&db.scratch.path)
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: set_timer_slack is async-signal-safe.
    unsafe { command.pre_exec(|| set_timer_slack(Duration::from_millis(20))) };
    let mut enqueue = command.spawn().unwrap();
    let still_waiting = KillOnDrop(enqueue.id() as i32);
    let mut status = None;
    wait_until(Duration::from_secs(30), "the CLI to give up", || {
        status = enqueue.try_wait().unwrap();
        status.is_some()
    });
    std::mem::forget(still_waiting);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut enqueue.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.unwrap().success(), "{stderr}");
    assert!(stderr.contains("database is locked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    refuse_writes(&db, false, &mut lock).await;
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        0
    );
}

/// A try of a type the daemon does not know asks every program of
/// `programs:` for its types again (a deploy may have added it). A program
/// that hung when asked (here after its first answer: it boots an
/// application whose database is down, say) held that try, and its slot,
/// for ever: with one slot, nothing else ever ran. Now a program has 30 s
/// to answer (here 3 s: a debug-build hook shortens the bound); then it is
/// killed with its process group, the try fails as an unknown type, and the
/// rest runs.
async fn a_program_that_hangs_when_asked_its_types_holds_no_slot_for_ever(backend: Backend) {
    let db = TestDb::new(backend).await;
    let hang = db.scratch.join("hang-now");
    let hung = db.scratch.join("hung.pid");
    let program = db.scratch.join("lister.sh");
    crate::util::write_executable(
        &program,
        format!(
            r#"#!/bin/sh
case "$1" in
--list-tasks)
    if [ -e {hang} ]; then echo $$ > {hung}; exec sleep 3600; fi
    echo Known ;;
--list-flows) exit 1 ;;
*) cat > /dev/null; echo known ;;
esac
"#,
            hang = hang.display(),
            hung = hung.display()
        ),
    );
    let mut daemon = db
        .daemon("d")
        .yaml(&format!(
            "max_concurrent: 1\nprograms: [{}]\n",
            program.display()
        ))
        .env("TASKRUNNER_TEST_ASK_TIMEOUT_MS", "3000")
        .start();
    std::fs::write(&hang, "").unwrap();
    let unknown = db.insert_row(NewRow::new("Unknown").try_limit(1)).await;
    let known = db.insert_row(NewRow::new("Known").try_limit(1)).await;
    let row = db
        .wait_for_state(known, "FINISHED", Duration::from_secs(90))
        .await;
    assert_eq!(row.result_text.as_deref(), Some("known"));
    let row = db.row(unknown).await;
    assert_eq!(row.result.as_deref(), Some("FAILED"), "{row:#?}");
    let log = daemon.log_text();
    assert!(
        log.contains("--list-tasks did not answer within 3s: killed"),
        "{log}"
    );
    let pid = read_pid_file(&hung);
    wait_until(WAIT, "the hung program to be gone", || !process_exists(pid));
    assert!(daemon.stop().success());
}

/// A program asked its types again (a try of a type the daemon does not
/// know) that answers without end: its answer is read to a bound, 4 MiB,
/// as through the daemon's spawner as root. A daemon not run as root (and
/// one without `user:`) read it all into memory: 100 MiB here, without
/// bound from a program stuck printing, or a thread for ever from one
/// whose child kept its output open.
async fn a_programs_answer_without_end_is_read_only_to_a_bound(backend: Backend) {
    let db = TestDb::new(backend).await;
    let flood = db.scratch.join("flood-now");
    let program = db.scratch.join("lister.sh");
    crate::util::write_executable(
        &program,
        format!(
            r#"#!/bin/sh
case "$1" in
--list-tasks)
    echo Known
    if [ -e {flood} ]; then head -c 100000000 /dev/zero; fi ;;
--list-flows) exit 1 ;;
*) cat > /dev/null; echo known ;;
esac
"#,
            flood = flood.display(),
        ),
    );
    let mut daemon = db
        .daemon("d")
        .yaml(&format!("programs: [{}]\n", program.display()))
        .start();
    let known = db.insert_row(NewRow::new("Known").try_limit(1)).await;
    db.wait_for_state(known, "FINISHED", WAIT).await;
    let (peak_before, _) = crate::util::memory_kib(daemon.pid());
    std::fs::write(&flood, "").unwrap();
    let unknown = db.insert_row(NewRow::new("Unknown").try_limit(1)).await;
    let row = db.wait_for_state(unknown, "FAILED", WAIT).await;
    assert!(
        row.result_text
            .as_deref()
            .is_some_and(|text| text.contains("Unknown")),
        "{row:#?}"
    );
    peak_grew_under(daemon.pid(), peak_before, 40);
    assert!(daemon.stop().success());
}

/// Rows of a type no program knows (a typo in an application): each try
/// asked every program for its types again, at once, each program booted
/// once a try (a thousand rows, a thousand boots). Tries that meet an
/// unknown type while a re-read runs share it.
async fn tries_of_an_unknown_type_share_a_re_read_of_the_programs(backend: Backend) {
    let db = TestDb::new(backend).await;
    let rereads = rereads_for_rows_of_an_unknown_type(
        &db,
        "echo >> \"$ASKED\"; sleep 0.5; echo Known",
        20,
        &[],
    )
    .await;
    println!("{backend:?}: 20 tries of an unknown type re-read the programs {rereads} times");
    assert!(rereads <= 8, "{rereads} re-reads for 20 tries");
}

/// How often a program was asked its types again while `rows` rows of a
/// type it does not know failed (the daemon's start asks once, not
/// counted): `list_tasks` answers `--list-tasks`, `$ASKED` naming the file
/// it appends a line to at each question.
async fn rereads_for_rows_of_an_unknown_type(
    db: &TestDb,
    list_tasks: &str,
    rows: usize,
    env: &[(&str, &str)],
) -> usize {
    let asked = db.scratch.join("asked");
    let program = db.scratch.join("lister.sh");
    crate::util::write_executable(
        &program,
        format!(
            "#!/bin/sh\nASKED={}\ncase \"$1\" in\n--list-tasks) {list_tasks} ;;\n--list-flows) exit 1 ;;\n*) cat > /dev/null; echo known ;;\nesac\n",
            asked.display(),
        ),
    );
    let mut ids = Vec::new();
    for _ in 0..rows {
        ids.push(db.insert_row(NewRow::new("Mistyped").try_limit(1)).await);
    }
    let mut daemon = db.daemon("d").yaml(&format!(
        "max_concurrent: 4\nprograms: [{}]\n",
        program.display()
    ));
    for (name, value) in env {
        daemon = daemon.env(name, value);
    }
    let mut daemon = daemon.start();
    for id in ids {
        db.wait_for_state(id, "FAILED", Duration::from_secs(60))
            .await;
    }
    assert!(daemon.stop().success());
    std::fs::read_to_string(&asked).unwrap().lines().count() - 1
}

/// The same tries when the re-read fails (here a program that hangs when
/// asked again, killed after its bound, 3 s here): the tries that waited
/// for it take its failure as their answer. Each did its own in turn, a
/// bound apiece: six rows took six bounds, holding their claims.
async fn tries_of_an_unknown_type_share_a_re_read_that_fails(backend: Backend) {
    let db = TestDb::new(backend).await;
    let rereads = rereads_for_rows_of_an_unknown_type(
        &db,
        "echo >> \"$ASKED\"; if [ \"$(wc -l < \"$ASKED\")\" -gt 1 ]; then exec sleep 3600; fi; echo Known",
        6,
        &[("TASKRUNNER_TEST_ASK_TIMEOUT_MS", "3000")],
    )
    .await;
    assert!(rereads <= 3, "{rereads} failed re-reads for 6 tries");
}

/// Issue 13, defect 10: an application could insert rows that can never
/// run nor end (no try left yet never run, an empty or unknown result, a
/// try_limit of 0 or below, a time SQLite cannot read, a megabyte type
/// name); nothing reported them. Now such an INSERT or UPDATE is refused
/// with an error naming the rule; rows written before that (the triggers
/// dropped, as before migration 0004) are flagged by `list` and `show`
/// with the reason, left as they are by the daemon (which neither panics
/// nor spins on them), and a megabyte type name is REJECTED at its first try.
async fn rows_that_can_never_run_are_refused_or_flagged_and_never_stall_the_daemon(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let megabyte_name = "N".repeat(1 << 20);
    // (columns, values, what the refusal says, what `list` says of such an old row)
    // By hand, here and below: the SQL an application sends is what the
    // triggers must refuse, and what rows from before them were.
    let mut cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "task_class_name, try_limit",
            "'NoOp', 0".into(),
            "try_limit must be at least 1",
            "try_limit 0 allows no try",
        ),
        (
            "task_class_name, try_limit",
            "'NoOp', -3".into(),
            "try_limit must be at least 1",
            "try_limit -3 allows no try",
        ),
        (
            "task_class_name, tries, try_limit",
            "'NoOp', 5, 5".into(),
            "needs tries < try_limit",
            "never run, but no try left (tries 5 of 5",
        ),
        (
            "task_class_name, result",
            "'NoOp', ''".into(),
            "result must be NULL or one of RUNNING",
            "result '' is not a state",
        ),
        (
            "task_class_name, result",
            "'NoOp', 'finished'".into(),
            "result must be NULL or one of RUNNING",
            "result 'finished' is not a state",
        ),
    ];
    match backend {
        // PostgreSQL's and MariaDB's column types refuse a time they cannot
        // read; MariaDB's VARCHAR(255) a longer name (strict sql_mode).
        Backend::Sqlite => cases.push((
            "task_class_name, delay_until",
            "'NoOp', 'tomorrow'".into(),
            "delay_until is not a time",
            "delay_until 'tomorrow' is not a time",
        )),
        Backend::Postgres => {}
        Backend::MySql => {}
    }
    // PostgreSQL's indexes on task_class_name took at most about 2 KiB of
    // it (compressed) before migration 0004: a shorter long name there.
    let long_name = match backend {
        Backend::Postgres => "N".repeat(10_000),
        Backend::Sqlite | Backend::MySql => megabyte_name.clone(),
    };
    if backend != Backend::MySql {
        cases.push((
            "task_class_name",
            format!("'{long_name}'"),
            "task_class_name is longer than 255 characters",
            "",
        ));
    }
    let error = db
        .try_execute(&format!(
            "INSERT INTO task_runner_requests (task_class_name) VALUES ('{megabyte_name}')"
        ))
        .await
        .expect_err("a megabyte name is refused");
    assert!(
        error.contains(match backend {
            Backend::MySql => "too long",
            Backend::Sqlite | Backend::Postgres => "longer than 255 characters",
        }),
        "{error}"
    );
    for (columns, values, refusal, _) in &cases {
        let error = db
            .try_execute(&format!(
                "INSERT INTO task_runner_requests ({columns}) VALUES ({values})"
            ))
            .await
            .expect_err("an impossible row is refused");
        assert!(error.contains(refusal), "{columns}: {error}");
    }
    // PostgreSQL and MariaDB refuse a time they cannot read by its type
    // (PostgreSQL reads `tomorrow` as a time).
    let error = db
        .try_execute("INSERT INTO task_runner_requests (task_class_name, delay_until) VALUES ('NoOp', 'soon')")
        .await
        .expect_err("a time that is not one is refused");
    assert!(!error.is_empty());
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        0
    );
    // An UPDATE that would make a row impossible is refused too; the rows
    // the rules allow (exhausted, final) still are written.
    let pending = db.enqueue("NoOp", None).await;
    for (set, refusal) in [
        ("result = ''", "result must be NULL or one of RUNNING"),
        ("try_limit = 0", "try_limit must be at least 1"),
        ("tries = 5", "needs tries < try_limit"),
    ] {
        let error = db
            .try_execute(&format!(
                "UPDATE task_runner_requests SET {set} WHERE id = {pending}"
            ))
            .await
            .expect_err("an update making a row impossible is refused");
        assert!(error.contains(refusal), "{set}: {error}");
    }
    db.execute(&format!(
        "UPDATE task_runner_requests SET result = 'FAILED', tries = 5 WHERE id = {pending}"
    ))
    .await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET result = NULL, tries = 0 WHERE id = {pending}"
    ))
    .await;

    // Rows written before migration 0004: its triggers dropped meanwhile.
    let triggers = [
        "task_runner_requests_check_insert",
        "task_runner_requests_check_update",
    ];
    for trigger in triggers {
        db.execute(&match backend {
            Backend::Postgres => format!("DROP TRIGGER {trigger} ON task_runner_requests"),
            Backend::Sqlite | Backend::MySql => format!("DROP TRIGGER {trigger}"),
        })
        .await;
    }
    let mut old_rows = Vec::new();
    for (columns, values, _, flagged) in &cases {
        let id = db
            .insert(&format!(
                "INSERT INTO task_runner_requests ({columns}) VALUES ({values}) RETURNING id"
            ))
            .await;
        old_rows.push((id, *flagged));
    }
    db.execute(crate::util::migration_0004(backend)).await;
    let before: Vec<_> = {
        let mut rows = Vec::new();
        for (id, _) in &old_rows {
            rows.push(db.row(*id).await);
        }
        rows
    };
    let mut daemon = Daemon::start(&db, "d", "");
    db.wait_for_state(pending, "FINISHED", WAIT).await;
    let canary = db.enqueue("NoOp", None).await;
    db.wait_for_state(canary, "FINISHED", WAIT).await;
    if backend != Backend::MySql {
        // The megabyte name: rejected at its first try, saying why.
        let (id, _) = old_rows.last().unwrap();
        let row = db.wait_for_state(*id, "REJECTED", WAIT).await;
        assert!(row.result_text.unwrap_or_default().starts_with(&format!(
            "task_class_name is {} characters long (at most 255)",
            long_name.len()
        )),);
        old_rows.pop();
    }
    // The others are left exactly as they were, and the daemon idles.
    let ticks = |pid: i32| -> u64 {
        let fields = crate::util::stat_fields(pid);
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let cpu_before = ticks(daemon.pid());
    tokio::time::sleep(Duration::from_secs(3)).await; // a window to measure CPU over
    let cpu = ticks(daemon.pid()) - cpu_before;
    assert!(cpu < 100, "the daemon spun: {cpu} ticks of CPU in 3s");
    for ((id, _), old) in old_rows.iter().zip(&before) {
        let row = db.row(*id).await;
        assert_eq!(
            (&row.result, row.tries, row.try_limit, &row.delay_until),
            (&old.result, old.tries, old.try_limit, &old.delay_until),
            "request {id} was changed"
        );
    }
    let (code, list, err) = cli(&db, &["list"]);
    assert_eq!(code, 0, "{err}");
    for (id, flagged) in &old_rows {
        let line = list
            .lines()
            .find(|line| line.split_whitespace().next() == Some(&id.to_string()))
            .unwrap_or_else(|| panic!("request {id} is not listed:\n{list}"));
        assert!(line.contains("(never runs)"), "{line}");
        assert!(line.contains(&format!("never runs: {flagged}")), "{line}");
    }
    let (code, show, _) = cli(&db, &["show", &old_rows[0].0.to_string()]);
    assert_eq!(code, 0);
    assert!(
        show.contains("never runs           try_limit 0 allows no try"),
        "{show}"
    );
    // `retry` makes the row with no try left run.
    let (no_try_left, _) = old_rows[2];
    let (code, _, err) = cli(&db, &["retry", &no_try_left.to_string()]);
    assert_eq!(code, 0, "{err}");
    db.wait_for_state(no_try_left, "FINISHED", WAIT).await;
    // `cancel` ends a row whose result is no state (before: "request N is
    // already : nothing to cancel", exit status 1).
    let (not_a_state, _) = old_rows[3];
    let (code, out, err) = cli(&db, &["cancel", &not_a_state.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        db.row(not_a_state).await.result.as_deref(),
        Some("CANCELLED")
    );
    let log = daemon.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.lines().all(|line| line.len() < 4096), "a huge log line");
    assert!(daemon.stop().success());
}

/// Values an application could write that the daemon read wrongly, found
/// by hand on SQLite (which stores what it is given whatever the column's
/// type): a try_limit of 'abc' compared greater than every number, and a
/// failing row with it was retried without end; tries below 0 gave more
/// tries than try_limit; a period of 0 or below ran once and silently
/// never again; a callback name longer than any task type name was found
/// only at the row's end, when its callback could not be made. Each is now
/// refused at the INSERT or UPDATE with one error naming the rule
/// (migration 0013), and a number written as text ('3') still is taken.
async fn values_the_daemon_would_read_wrongly_are_refused_naming_the_rule(backend: Backend) {
    let db = TestDb::new(backend).await;
    let long = format!("'{}'", "C".repeat(256));
    let mut cases: Vec<(String, String, &str)> = vec![
        (
            "tries, try_limit".into(),
            "-1, 2".into(),
            "tries must be a whole number, at least 0",
        ),
        (
            "period".into(),
            "0".into(),
            "period must be NULL (not periodic)",
        ),
        (
            "period".into(),
            "-5".into(),
            "period must be NULL (not periodic)",
        ),
    ];
    // MariaDB's VARCHAR(255) columns refuse a longer callback name already.
    let too_long = match backend {
        Backend::MySql => "too long",
        Backend::Sqlite | Backend::Postgres => "is longer than 255 characters",
    };
    cases.push(("on_success".into(), long.clone(), too_long));
    cases.push(("on_failure".into(), long.clone(), too_long));
    if backend == Backend::Sqlite {
        for (column, value, rule) in [
            ("try_limit", "'abc'", "try_limit must be a whole number"),
            ("try_limit", "1.5", "try_limit must be a whole number"),
            ("tries", "'x'", "tries must be a whole number"),
            ("priority", "'high'", "priority must be a whole number"),
            ("period", "'hourly'", "period must be NULL (not periodic)"),
            ("period", "0.5", "period must be NULL (not periodic)"),
        ] {
            cases.push((column.into(), value.into(), rule));
        }
    }
    for (columns, values, rule) in &cases {
        let error = db
            .try_execute(&format!(
                "INSERT INTO task_runner_requests (task_class_name, {columns}) VALUES ('NoOp', {values})"
            ))
            .await
            .expect_err(&format!("{columns} = {values} is refused"));
        assert!(error.contains(rule), "{columns} = {values}: {error}");
    }
    for column in ["on_complete", "on_failure"] {
        let error = db
            .try_execute(&format!(
                "INSERT INTO task_runner_batches ({column}) VALUES ({long})"
            ))
            .await
            .expect_err("a batch's callback name past 255 characters is refused");
        assert!(error.contains(too_long), "{column}: {error}");
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await
            + db.scalar("SELECT count(*) FROM task_runner_batches").await,
        0
    );

    // The same values written by an UPDATE are refused; the row is kept.
    let pending = db
        .insert(
            "INSERT INTO task_runner_requests (task_class_name, try_limit, priority) \
             VALUES ('NoOp', '3', '7') RETURNING id",
        )
        .await;
    for (columns, values, rule) in &cases {
        let set: Vec<String> = columns
            .split(", ")
            .zip(values.split(", "))
            .map(|(column, value)| format!("{column} = {value}"))
            .collect();
        let error = db
            .try_execute(&format!(
                "UPDATE task_runner_requests SET {} WHERE id = {pending}",
                set.join(", ")
            ))
            .await
            .expect_err(&format!("{set:?} is refused"));
        assert!(error.contains(rule), "{set:?}: {error}");
    }
    let row = db.row(pending).await;
    assert_eq!((row.tries, row.try_limit), (0, 3));
    let priority_7 =
        format!("SELECT count(*) FROM task_runner_requests WHERE id = {pending} AND priority = 7");
    assert_eq!(db.scalar(&priority_7).await, 1);

    // The longest allowed values are taken, and the daemon runs the row.
    let longest = format!("'{}'", "C".repeat(255));
    let periodic = db
        .insert(&format!(
            "INSERT INTO task_runner_requests (task_class_name, period, on_failure) \
             VALUES ('NoOp', 3600, {longest}) RETURNING id"
        ))
        .await;
    let mut daemon = Daemon::start(&db, "d", "");
    db.wait_for_state(pending, "FINISHED", WAIT).await;
    db.wait_for_state(periodic, "FINISHED", WAIT).await;
    assert_eq!(db.row(pending).await.tries, 1);
    assert!(daemon.stop().success());
}

/// A PostgreSQL database whose idle sessions the server ends
/// (`idle_session_timeout`, PostgreSQL 14 and later; set by shops that
/// guard their connection slots): every pooled connection idle that long
/// was ended, and the pool's check before handing it out logged a warning
/// each time (`error from before_acquire … terminating connection due to
/// idle-session timeout`), a line every few seconds of an idle daemon; so
/// did an administrator's `pg_terminate_backend`. Such a connection is now
/// replaced without a word, and rows inserted after the server ended every
/// connection run at once (the LISTEN connection too is replaced).
/// MariaDB's `wait_timeout` is the server's (or a session's) only, and its
/// closed connections logged nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_server_ends_when_idle_are_replaced_without_a_warning() {
    let db = TestDb::new(Backend::Postgres).await;
    let name = db.url.rsplit_once('/').unwrap().1;
    db.execute(&format!(
        "ALTER DATABASE {name} SET idle_session_timeout = '500ms'"
    ))
    .await;
    let mut daemon = Daemon::start(&db, "d", "poll_interval: 60s\n");
    for round in 0..3 {
        // Each round: the daemon's connections sit idle past the server's
        // timeout (the fault itself: time must pass), and an administrator
        // ends the idle ones left (so that each round ends them all; one in
        // use would fail its call), then a row comes.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        db.execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
              WHERE datname = '{name}' AND application_name = 'taskrunner' \
                AND state = 'idle' AND state_change < now() - interval '200 milliseconds'"
        ))
        .await;
        let inserted = std::time::Instant::now();
        let id = db
            .insert_row(NewRow::new("NoOp").options(&format!("round: {round}")))
            .await;
        db.wait_for_state(id, "FINISHED", Duration::from_secs(10))
            .await;
        assert!(
            inserted.elapsed() < Duration::from_secs(5),
            "round {round}: not woken ({:?})",
            inserted.elapsed()
        );
    }
    // Stopped first: its last lines are written by then. Warnings and
    // errors only: a LISTEN whose new connection the administrator ends
    // as it starts says so at debug level (seen once under load). A call
    // the administrator's statement ended in use (a connection taken for a
    // periodic pass between the statement's look at `pg_stat_activity` and
    // its act: seen once in CI under load) is an outage of that call, and
    // says so once: not what this test is about. So is the connection the
    // LISTEN had just taken when the statement ended it (seen once in CI):
    // the LISTEN fails, and sqlx's own check of the connection as it comes
    // back says so.
    assert!(daemon.stop().success());
    let log = daemon.log_text();
    let warned = log
        .lines()
        .filter(|line| matches!(line.split_whitespace().nth(1), Some("WARN" | "ERROR")))
        .filter(|line| {
            let in_use = line.contains("taskrunner::health")
                || line.contains("error occurred while testing the connection on-release");
            !(in_use && line.contains("due to administrator command"))
        })
        .any(|line| line.contains("terminating connection") || line.contains("before_acquire"));
    assert!(!warned, "{log}");
}

/// A PostgreSQL database (or role) whose transactions are SERIALIZABLE by
/// default (`default_transaction_isolation`, set by some shops for their
/// application): two daemons' claims, outcomes and callbacks failed with
/// serialization errors (`could not serialize access due to read/write
/// dependencies among transactions`), each taken for an outage and retried
/// with backoff, so that rows done in a second took minutes. The daemon's
/// statements are written for READ COMMITTED (claims skip locked rows,
/// outcomes lock their parent), and it now asks for it at connect, whatever
/// the database's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_serializable_by_default_runs_every_row_and_callback_once() {
    let db = TestDb::new(Backend::Postgres).await;
    let name = db.url.rsplit_once('/').unwrap().1;
    db.execute(&format!(
        "ALTER DATABASE {name} SET default_transaction_isolation = 'serializable'"
    ))
    .await;
    let fresh = sqlx::PgPool::connect(&db.url).await.unwrap();
    let isolation: String = sqlx::query_scalar("SHOW default_transaction_isolation")
        .fetch_one(&fresh)
        .await
        .unwrap();
    assert_eq!(isolation, "serializable");

    let mut daemons: Vec<Daemon> = ["a", "b"]
        .into_iter()
        .map(|host| Daemon::start(&db, host, &format!("host_id: {host}\nmax_concurrent: 4\n")))
        .collect();
    let batch = db
        .insert("INSERT INTO task_runner_batches (on_complete) VALUES ('NoOp') RETURNING id")
        .await;
    db.insert_copies(NewRow::new("NoOp").batch(batch.0), 100)
        .await;
    // As an application must under SERIALIZABLE: its write is tried again
    // when it meets the daemons' (here the members' claims, which the
    // batch's trigger counts on its row).
    let seal = format!("UPDATE task_runner_batches SET sealed_at = now() WHERE id = {batch}");
    crate::util::poll(WAIT, "the batch to be sealed", async || {
        db.try_execute(&seal).await
    })
    .await;
    db.insert_copies(NewRow::new("NoOp").on_success("NoOp"), 300)
        .await;
    // 100 members, their batch's callback, 300 rows and their callbacks.
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED' AND tries = 1",
        701,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests").await,
        701
    );
    for daemon in &mut daemons {
        let log = daemon.log_text();
        assert!(!log.contains("could not serialize"), "{log}");
        assert!(!log.contains("database unavailable"), "{log}");
        assert!(daemon.stop().success());
    }
}

/// A daemon, the CLI and an application behind PgBouncer in session mode,
/// configured as it comes (the pooler most PostgreSQL deployments put in
/// front of the server). It refuses start-up parameters it does not track:
/// `extra_float_digits`, which the driver sent (`unsupported startup
/// parameter: extra_float_digits`, unless listed in its
/// `ignore_startup_parameters`), and an `options` naming another setting
/// (asking for READ COMMITTED there kept every daemon behind it from
/// connecting; it is a statement after the connect). The application's
/// insert wakes the daemon through the pooler (LISTEN holds its server
/// connection in session mode), well before its poll. In transaction mode one line names the
/// pooler's mode (before: only the driver's `prepared statement "sqlx_s_1"
/// already exists`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_behind_pgbouncer_in_session_mode_connects_and_wakes_at_once() {
    let db = TestDb::new(Backend::Postgres).await;
    let (server, name) = db.url.rsplit_once('/').unwrap();
    let (user_at, address) = server.rsplit_once('@').unwrap();
    let user = user_at.rsplit_once("//").unwrap().1;
    let (host, port) = address.rsplit_once(':').unwrap();
    // A directory of its own, which its user may read.
    let scratch = crate::util::Scratch::new("pgbouncer");
    let dir = scratch.path.clone();
    std::fs::create_dir_all(&dir).unwrap();
    let listen = crate::util::free_port();
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\n* = host={host} port={port}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {auth}\npool_mode = session\n",
            auth = dir.join("users.txt").display()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("users.txt"), format!("\"{user}\" \"\"\n")).unwrap();
    let program = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .expect("pgbouncer is installed (scripts/test installs it)");
    // It refuses to run as root: it switches to postgres (`-u`), and stays
    // this test's child, to signal and to stop.
    let mut command = std::process::Command::new(program);
    if nix::unistd::geteuid().is_root() {
        let _ = std::process::Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status();
        command.args(["-u", "postgres"]);
    }
    let mut bouncer = command
        .arg(dir.join("pgbouncer.ini"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("pgbouncer.log")).unwrap())
        .spawn()
        .unwrap();
    let _bouncer = KillOnDrop(bouncer.id() as i32);
    wait_until(WAIT, "pgbouncer to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()
    });
    let url = format!("postgres://{user}@127.0.0.1:{listen}/{name}");

    let (status, stdout, stderr) =
        crate::util::bare_cli(&db.scratch.path, &["--database-url", &url, "migrate"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(stdout.contains(": up to date"), "{stdout}");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!("database_url: {url}\npoll_interval: 60s\n"),
    );
    // The application: psql (libpq), through the pooler too.
    let started = std::time::Instant::now();
    let insert = std::process::Command::new("psql")
        .args(["-qAt", &url, "-c"])
        .arg("INSERT INTO task_runner_requests (task_class_name) VALUES ('NoOp') RETURNING id")
        .output()
        .unwrap();
    assert!(insert.status.success(), "{insert:?}");
    let id: i64 = String::from_utf8_lossy(&insert.stdout)
        .trim()
        .parse()
        .unwrap();
    db.wait_for_state(
        taskrunner::request::RequestId(id),
        "FINISHED",
        Duration::from_secs(10),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let log = daemon.log_text();
    assert!(!log.contains("database unavailable"), "{log}");
    assert!(daemon.stop().success());

    // In transaction mode each transaction may get another server
    // connection, and the driver's prepared statements are not where it
    // made them: one line names the pooler's mode.
    let ini = dir.join("pgbouncer.ini");
    let text = std::fs::read_to_string(&ini).unwrap();
    std::fs::write(
        &ini,
        text.replace("pool_mode = session", "pool_mode = transaction"),
    )
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bouncer.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until(WAIT, "the CLI to name the pooler's mode", || {
        let (status, _, stderr) =
            crate::util::bare_cli(&db.scratch.path, &["--database-url", &url, "migrate"]);
        status != 0 && stderr.contains("taskrunner needs session mode (pool_mode = session)")
    });
    let _ = bouncer.kill();
    let _ = bouncer.wait();
}

/// A daemon that is stopped (SIGSTOP, a debugger) or hung still has its
/// control socket's connections accepted by the kernel. `status` and
/// `metrics` waited for ever for its answer (a cron job of `metrics` piled
/// up): they now give up after a bound (12 s; 1.5 s here), `status` with
/// one line, `metrics` printing what the table alone tells.
async fn status_and_metrics_of_a_stopped_daemon_give_up_after_a_bound(backend: Backend) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "");
    let config = daemon.config.display().to_string();
    let (status, _, stderr) = cli(&db, &["--config", &config, "status"]);
    assert_eq!(status, 0, "{stderr}");
    // A waiting row, for the table's gauges (delayed: the daemon leaves it),
    // written before the stop: a daemon stopped in its own write could hold
    // the lock an insert waits for.
    db.insert_row(NewRow::new("NoOp").delayed(backend, 3600))
        .await;
    kill(Pid::from_raw(daemon.pid()), Signal::SIGSTOP).unwrap();
    let asked = |command: &str| {
        let mut child = std::process::Command::new(CLI)
            .args([
                "--database-url",
                db.url.as_str(),
                "--config",
                &config,
                command,
            ])
            .env("TASKRUNNER_TEST_ANSWER_WITHIN_MS", "1500")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        let guard = KillOnDrop(child.id() as i32);
        wait_until(WAIT, &format!("`{command}` to end"), || {
            child.try_wait().unwrap().is_some()
        });
        drop(guard);
        let output = child.wait_with_output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
            started.elapsed(),
        )
    };
    let status = asked("status");
    let metrics = asked("metrics");
    kill(Pid::from_raw(daemon.pid()), Signal::SIGCONT).unwrap();
    let (code, _, stderr, took) = status;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("did not answer within"), "{stderr}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let (code, stdout, stderr, _) = metrics;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("taskrunner_queue_waiting"), "{stdout}");
    assert!(daemon.stop().success());
}
