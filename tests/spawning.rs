//! Starting tries off the runtime's thread: the daemon's spawner threads
//! start processes while the runtime reaps and records others. Statuses stay
//! each try's own, nothing is left unreaped, and every process dies with a
//! killed daemon whichever spawner thread started it.

use std::time::Duration;

use crate::util::{
    most_at_once, process_exists, wait_until, zombie_children, Backend, Daemon, NewRow, TestDb,
};

const WAIT: Duration = Duration::from_secs(60);

both_backends!(
    many_short_tries_at_once_each_end_with_their_own_status_and_leave_no_zombie,
    a_killed_daemon_takes_down_tries_started_by_every_spawner_thread,
    short_tries_started_at_each_exit_never_run_beyond_max_concurrent,
);

/// 120 short tries, 8 at a time, of three kinds that end differently:
/// each row gets its own process's end, and no zombie is left.
async fn many_short_tries_at_once_each_end_with_their_own_status_and_leave_no_zombie(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "max_concurrent: 8\ntasks:\n  Ok:\n    command: [/bin/sh, -c, 'echo ok $TASKRUNNER_REQUEST_ID']\n  Exit3:\n    command: [/bin/sh, -c, 'echo three >&2; exit 3']\n  Killed:\n    command: [/bin/sh, -c, 'kill -9 $$']\n",
    );
    let kinds = ["Ok", "Exit3", "Killed"];
    db.insert_rows((0..120).map(|i| NewRow::new(kinds[i % 3]).try_limit(1)))
        .await;
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result IN ('FINISHED', 'FAILED', 'CRASHED')",
        120,
        WAIT,
    )
    .await;
    for (kind, result, pattern) in [
        ("Ok", "FINISHED", "ok %"),
        ("Exit3", "FAILED", "exit status 3%three%"),
        ("Killed", "CRASHED", "killed by signal 9 (SIGKILL)%"),
    ] {
        let matching = db
            .scalar(&format!(
                "SELECT count(*) FROM task_runner_requests WHERE task_class_name = '{kind}' \
                 AND result = '{result}' AND tries = 1 AND pid IS NULL \
                 AND result_text LIKE '{pattern}'"
            ))
            .await;
        assert_eq!(matching, 40, "{kind}: every try {result}, {pattern:?}");
    }
    // Each Ok try printed its own request's id.
    assert_eq!(
        db.scalar(
            "SELECT count(DISTINCT result_text) FROM task_runner_requests WHERE task_class_name = 'Ok'"
        )
        .await,
        40
    );
    wait_until(Duration::from_secs(5), "no zombie children", || {
        zombie_children(daemon.pid()).is_empty()
    });
    assert!(daemon.stop().success(), "log:\n{}", daemon.log_text());
}

/// Six tries running at once (started by whichever spawner thread was
/// free): kill -9 of the daemon takes every one of them down.
async fn a_killed_daemon_takes_down_tries_started_by_every_spawner_thread(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "max_concurrent: 6\ntasks:\n  Hang:\n    command: [/bin/sleep, '60']\n",
    );
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(db.enqueue("Hang", None).await);
    }
    let mut pids = Vec::new();
    for id in ids {
        let row = db.wait_for_pid(id, WAIT).await;
        pids.push(row.pid.unwrap() as i32);
    }
    assert_eq!(pids.len(), 6);
    assert!(pids.iter().all(|&pid| process_exists(pid)));
    daemon.kill();
    wait_until(
        Duration::from_secs(5),
        "every try to die with its daemon",
        || pids.iter().all(|&pid| !process_exists(pid)),
    );
}

/// Short tries claimed ahead: each exit hands its slot to the next try on
/// the spawner thread that saw it, while the runtime's thread releases the
/// same slot when it reaps the process. Were a slot handed over twice, more
/// than `max_concurrent` tasks would run at once from then on: each task
/// logs when it began and when it ended, and the intervals never overlap
/// beyond the limit.
async fn short_tries_started_at_each_exit_never_run_beyond_max_concurrent(backend: Backend) {
    let db = TestDb::new(backend).await;
    for max_concurrent in [1, 2] {
        let log = db.scratch.join(&format!("intervals-{max_concurrent}.log"));
        let task = format!("Mark{max_concurrent}");
        let mut daemon = db
            .daemon("d")
            .set("max_concurrent", max_concurrent)
            .shell_task(
                &task,
                &format!(
                    "echo start $(date +%s%N) >> {log}; echo end $(date +%s%N) >> {log}",
                    log = log.display()
                ),
            )
            .start();
        db.insert_rows((0..150).map(|_| NewRow::new(&task))).await;
        db.wait_for_count(
            &format!(
                "SELECT count(*) FROM task_runner_requests \
                 WHERE task_class_name = '{task}' AND result = 'FINISHED'"
            ),
            150,
            WAIT,
        )
        .await;
        let (lines, most) = most_at_once(&log);
        assert_eq!(lines, 300, "every task logged its start and end");
        assert!(
            most <= max_concurrent,
            "{most} tasks ran at once with max_concurrent {max_concurrent}"
        );
        wait_until(Duration::from_secs(5), "no zombie children", || {
            zombie_children(daemon.pid()).is_empty()
        });
        assert!(daemon.stop().success(), "log:\n{}", daemon.log_text());
    }
}

/// A launcher that ignores SIGCHLD (a supervisor written in Python or Perl,
/// `$SIG{CHLD} = "IGNORE"`) and execs the daemon: ignored signals stay
/// ignored across `execve`, so the kernel reaped each task at its exit, the
/// daemon's wait failed ("No child processes"), and every try was recorded
/// FAILED and counted whatever the task did; each task inherited the
/// ignored signals too. The daemon now sets SIGCHLD back to its default,
/// and a task starts with every signal it can set at its default (glibc's
/// own two, 32 and 33, aside).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_with_signals_ignored_reaps_its_tasks_and_resets_them_for_its_tasks() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut daemon = db
        .daemon("d")
        .yaml("tasks:\n  Ignored:\n    command: [/bin/sh, -c, 'grep SigIgn /proc/self/status']\n")
        .ignoring_signals()
        .start();
    let id = db.enqueue("Ignored", None).await;
    let row = db.wait_for_outcome(id, WAIT).await;
    assert_eq!(row.result.as_deref(), Some("FINISHED"), "{row:?}");
    assert_eq!(row.tries, 1);
    let ignored = row
        .result_text
        .as_deref()
        .and_then(|text| text.strip_prefix("SigIgn:\t"))
        .and_then(|mask| u64::from_str_radix(mask, 16).ok())
        .unwrap_or_else(|| panic!("{row:?}"));
    let launchers = 1 << (libc::SIGCHLD - 1) | 1 << (libc::SIGUSR2 - 1);
    assert_eq!(ignored & launchers, 0, "{ignored:x}");
    assert!(daemon.stop().success());
}

/// The same launcher, the daemon PID 1 of a PID namespace (a container):
/// its init, which waits for the daemon's end by SIGCHLD, inherited SIGCHLD
/// ignored (the reset came after the init had taken over), was never told
/// of it, and the container never stopped. Needs root; skipped without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_started_with_sigchld_ignored_the_daemon_runs_and_stops() {
    if !crate::util::runs_as_root("a PID namespace of its own needs root") {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).await;
    let mut daemon = db
        .daemon("d")
        .own_pid_namespace()
        .ignoring_signals()
        .start();
    let id = db.enqueue("NoOp", None).await;
    db.wait_for_state(id, "FINISHED", WAIT).await;
    // SIGTERM to PID 1 (the `Daemon` is the `unshare` above it).
    let init: i32 = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", daemon.pid()))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}: {}", daemon.log_text());
}
