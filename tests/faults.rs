//! Fault injection: real processes killed with real signals, a real
//! PostgreSQL server restarted and stopped, SQLite held locked. Each case
//! checks the rows afterwards: nothing lost, no row run twice at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use taskrunner::request::RequestId;

use crate::util::{
    cli, holds_a_pidfd_of, holds_for, memory_kib, now_ns, poll, poll_blocking_every, poll_every,
    process_exists, read_pid_file, spawn_cli_in_env, sql_ago, wait_until, watchdogs_of,
    zombie_children, Backend, Daemon, Fault, KillOnDrop, NewRow, PrivateServer, Proxy, TestDb,
    Text,
};

const WAIT: Duration = Duration::from_secs(30);

both_backends!(
    killed_task_process_crashes_then_reruns,
    a_reload_that_shortens_the_reap_interval_reaps_from_the_last_pass,
    killed_daemon_takes_its_tasks_along_and_a_restart_reruns_them,
    task_ignoring_sigterm_is_killed_at_its_timeout,
    grandchildren_are_stopped_with_their_task,
    a_process_given_an_ended_tries_number_is_not_killed_as_its_group,
    reused_pid_is_taken_as_crashed_and_never_signalled,
    a_try_whose_outcome_waits_is_left_to_its_living_daemon,
    stale_heartbeat_of_another_host_is_crashed_after_the_lease,
    a_reaper_with_a_shorter_lease_waits_for_the_lease_of_the_rows_daemon,
    a_reap_by_a_user_who_cannot_see_the_tasks_takes_none_of_them,
    a_running_row_written_by_an_application_with_no_try_is_reaped_with_the_rest,
    a_try_given_back_after_an_application_zeroed_its_tries_is_written,
    a_row_taken_away_and_claimed_again_by_the_same_daemon_keeps_its_new_try,
    a_try_whose_daemon_died_before_its_process_was_recorded_is_given_back,
    flood_of_output_is_bounded,
    memory_limit_fails_the_try_naming_the_limit,
    cpu_limit_fails_the_try_naming_the_limit,
    a_task_killed_after_its_children_used_its_cpu_limit_is_crashed,
    cancel_stops_a_running_task,
    task_inherits_only_stdio_and_no_database_secrets,
    a_program_asked_for_its_task_types_gets_no_database_secrets,
    a_program_is_asked_for_its_task_types_as_the_user_its_tasks_run_as,
    a_log_reader_that_stops_reading_does_not_stop_the_daemon,
    a_daemon_in_another_pid_namespace_with_the_same_host_id_keeps_its_tries,
    as_pid_1_the_daemon_leaves_no_zombies_and_drains_on_sigterm,
);

/// A NoOp row RUNNING as pid `pid` on another host, held by its daemon
/// `other-host:1:x` under claim token `token`, its lease last renewed
/// `seconds` ago.
fn running_on_another_host(backend: Backend, token: &str, pid: i64, seconds: i64) -> NewRow {
    NewRow::new("NoOp").running(backend, "other-host", "other-host:1:x", token, pid, seconds)
}

/// A task that waits to be killed on its first try and succeeds on the next.
fn first_try_hangs(marker: &std::path::Path) -> String {
    format!(
        "tasks:\n  Once:\n    command: [/bin/sh, -c, 'if [ \"$TASKRUNNER_TRY\" = 1 ]; then echo $$ > {m}; exec sleep 60; fi; echo second try']\n",
        m = marker.display()
    )
}

async fn killed_task_process_crashes_then_reruns(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", &first_try_hangs(&db.scratch.join("pid")));
    let id = db.enqueue("Once", None).await;
    let killed_at = db.kill_running_try(id).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    println!(
        "recovery after kill -9 of a task: {:.2}s (retry_delay 1s)",
        killed_at.elapsed().as_secs_f64()
    );
    assert_eq!(row.tries, 2);
    assert_eq!(row.result_text.as_deref(), Some("second try"));
    assert!(zombie_children(daemon.pid()).is_empty(), "no zombies");
    assert!(daemon.stop().success());
}

async fn killed_daemon_takes_its_tasks_along_and_a_restart_reruns_them(backend: Backend) {
    let db = TestDb::new(backend).await;
    let config = first_try_hangs(&db.scratch.join("pid"));
    let mut daemon = Daemon::start(&db, "d", &config);
    let id = db.enqueue("Once", None).await;
    let row = db.wait_for_pid(id, WAIT).await;
    let task_pid = row.pid.unwrap() as i32;
    daemon.kill();
    // The task dies with its daemon (parent-death signal): nothing runs unsupervised.
    wait_until(
        Duration::from_secs(5),
        "the task to die with its daemon",
        || !process_exists(task_pid),
    );
    assert_eq!(
        db.row(id).await.result.as_deref(),
        Some("RUNNING"),
        "nobody has recorded anything yet"
    );
    let restarted_at = Instant::now();
    let mut daemon = daemon.restart();
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    println!(
        "recovery after kill -9 of the daemon: {:.2}s from restart",
        restarted_at.elapsed().as_secs_f64()
    );
    assert!(
        restarted_at.elapsed() < Duration::from_secs(5),
        "the start-up reap reruns it at once"
    );
    assert_eq!(row.tries, 2, "the crashed try counts");
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE result = 'RUNNING'")
            .await,
        0
    );
    assert!(daemon.stop().success());
}

async fn task_ignoring_sigterm_is_killed_at_its_timeout(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "kill_retry: 500ms\nkill_grace: 2s\ntasks:\n  Stubborn:\n    command: [/bin/sh, -c, \"trap '' TERM; echo stubborn >&2; sleep 60\"]\n    timeout: 1s\n",
    );
    let id = db.insert_row(NewRow::new("Stubborn").try_limit(1)).await;
    let running = db.wait_for_pid(id, WAIT).await;
    let row = db.wait_for_state(id, "TIMEOUT", WAIT).await;
    let text = row.result_text.unwrap();
    assert!(text.starts_with("timed out after 1s (ran 3."), "{text}");
    assert!(text.contains("stubborn"), "{text}");
    assert!(!process_exists(running.pid.unwrap() as i32));
    assert!(daemon.stop().success());
}

/// A try's leftovers are killed by its process group's number, which is
/// its process's pid. Once that process is reaped, the number is free: a
/// new process may get it and lead a group of that number. Here one does,
/// while the daemon is held right after the reap (a test hook), and it must
/// live on: the group was killed before the reap, while the exited process
/// still held the number.
async fn a_process_given_an_ended_tries_number_is_not_killed_as_its_group(backend: Backend) {
    if !crate::util::runs_as_root("choosing the next pid (ns_last_pid) needs root") {
        return;
    }
    let db = TestDb::new(backend).await;
    let pid_file = db.scratch.join("pid");
    let reaped = db.scratch.join("reaped");
    let mut daemon = Daemon::start_in_env(
        &db,
        "d",
        &format!(
            "tasks:\n  Short:\n    command: [/bin/sh, -c, 'echo $$ > {}']\n",
            pid_file.display()
        ),
        &[("TASKRUNNER_TEST_AFTER_TRY_REAPED", reaped.to_str().unwrap())],
    );
    let id = db.enqueue("Short", None).await;
    daemon.wait_for_log("test hook: TASKRUNNER_TEST_AFTER_TRY_REAPED waits", WAIT);
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!process_exists(pid), "the try's process {pid} is reaped");
    let Some(mut taker) = take_pid(pid) else {
        std::fs::write(&reaped, "").unwrap();
        assert!(daemon.stop().success());
        return;
    };
    std::fs::write(&reaped, "").unwrap();
    db.wait_for_state(id, "FINISHED", WAIT).await;
    assert!(
        taker.try_wait().unwrap().is_none(),
        "process {pid}, leader of a group of that number, was killed at the end of the try that had the number before"
    );
    let _ = taker.kill();
    let _ = taker.wait();
    assert!(daemon.stop().success());
}

/// A `sleep` leading a process group of its own, started with the pid
/// `pid` (free): the kernel's next pid is set just below it, and the start
/// is tried again while another process takes the number first. Then the
/// next pid is set back past every pid given so far, so that the other
/// tests' processes do not get numbers freed a moment ago. `None` (the
/// reason printed) where the next pid cannot be set (`/proc/sys` read-only).
fn take_pid(pid: i32) -> Option<std::process::Child> {
    use std::os::unix::process::CommandExt;
    const NEXT: &str = "/proc/sys/kernel/ns_last_pid";
    let last = || -> i32 {
        std::fs::read_to_string(NEXT)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let highest = last();
    if let Err(error) = std::fs::write(NEXT, (pid - 1).to_string()) {
        println!("skipped: cannot choose the next pid ({error})");
        return None;
    }
    let mut taken = None;
    for _ in 0..1000 {
        std::fs::write(NEXT, (pid - 1).to_string()).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        if child.id() == pid as u32 {
            taken = Some(child);
            break;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    std::fs::write(NEXT, highest.max(last()).to_string()).unwrap();
    Some(taken.unwrap_or_else(|| panic!("pid {pid} went to other processes 1000 times")))
}

async fn grandchildren_are_stopped_with_their_task(backend: Backend) {
    let db = TestDb::new(backend).await;
    let left = db.scratch.join("left");
    let cancelled = db.scratch.join("cancelled");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  LeaveBehind:\n    command: [/bin/sh, -c, 'sleep 300 & echo $! > {}; echo done']\n  Parent:\n    command: [/bin/sh, -c, 'sleep 300 & echo $! > {}; wait']\n",
            left.display(),
            cancelled.display()
        ),
    );
    // A task that exits leaving a grandchild behind: the group is killed at its exit.
    let finished = db.enqueue("LeaveBehind", None).await;
    db.wait_for_state(finished, "FINISHED", WAIT).await;
    let grandchild: i32 = std::fs::read_to_string(&left)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until(
        Duration::from_secs(5),
        "the left-behind grandchild to be killed",
        || !process_exists(grandchild),
    );
    // A task stopped by cancel: its children stop with it.
    let id = db.enqueue("Parent", None).await;
    db.wait_for_pid(id, WAIT).await;
    wait_until(WAIT, "the grandchild's pid file", || {
        std::fs::read_to_string(&cancelled)
            .map(|t| t.ends_with('\n'))
            .unwrap_or(false)
    });
    let grandchild: i32 = std::fs::read_to_string(&cancelled)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(process_exists(grandchild));
    assert_eq!(cli(&db, &["cancel", &id.to_string()]).0, 0);
    db.wait_for_state(id, "CANCELLED", WAIT).await;
    wait_until(
        Duration::from_secs(5),
        "the grandchild to stop with its task",
        || !process_exists(grandchild),
    );
    assert!(daemon.stop().success());
}

async fn reused_pid_is_taken_as_crashed_and_never_signalled(backend: Backend) {
    let db = TestDb::new(backend).await;
    // A live process that is not the task: it started before the rows claim it.
    let mut bystander = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let pid = bystander.id();
    tokio::time::sleep(Duration::from_millis(1100)).await; // let the bystander be over a second old
    let host = "reaper-test-host";
    // One row written by hand (no recorded identity), one with an identity that does not match.
    let by_hand = NewRow::new("NoOp").running_unclaimed(backend, host, pid.into(), 0);
    let mismatched = by_hand
        .clone()
        .text("claim_token", "old-claim")
        .text("pid_boot_id", &taskrunner::procinfo::boot_id())
        .number("pid_start_ticks", 12345);
    let by_hand = db.insert_row(by_hand).await;
    let mismatched = db.insert_row(mismatched).await;
    let (status, stdout, stderr) = cli(&db, &["--host-id", host, "reap", "--dry-run"]);
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert_eq!(
        db.row(by_hand).await.result.as_deref(),
        Some("RUNNING"),
        "a dry run changes nothing"
    );
    let (status, stdout, _) = cli(&db, &["--host-id", host, "reap"]);
    assert_eq!(status, 0);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(&format!("{by_hand} ")) && l.contains("started")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(&format!("{mismatched} ")) && l.contains("another process")),
        "{stdout}"
    );
    for id in [by_hand, mismatched] {
        let row = db.row(id).await;
        assert_eq!(row.result.as_deref(), Some("CRASHED"));
        assert_eq!(row.pid, None);
        assert!(
            row.delay_until.is_none(),
            "its daemon died: it runs again at once"
        );
    }
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "the process the pid now names was never signalled"
    );
    bystander.kill().unwrap();
    let _ = bystander.wait();
    // The daemon picks them up again.
    let mut daemon = Daemon::start(&db, "d", "");
    db.wait_for_state(by_hand, "FINISHED", WAIT).await;
    db.wait_for_state(mismatched, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

/// A try has ended and its daemon, alive, waits to write the outcome (here
/// behind a lock; under load, behind a slow database): the reaper of another
/// daemon on the host, or `taskrunner-cli reap`, finds the task's process
/// gone. The row is its daemon's to record; marking it CRASHED would run the
/// finished try a second time (seen as 524 runs of 500 rows with two daemons
/// on a loaded machine).
async fn a_try_whose_outcome_waits_is_left_to_its_living_daemon(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ran = db.scratch.join("ran.log");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  Brief:\n    command: [/bin/sh, -c, 'echo $$ >> {}; sleep 0.3']\n",
            ran.display()
        ),
    );
    let id = db.enqueue("Brief", None).await;
    let pid = db.wait_for_pid(id, WAIT).await.pid.unwrap() as i32;
    let held = db.hold_row(id).await;
    wait_until(WAIT, "the task's process to end", || !process_exists(pid));
    let (status, stdout, stderr) = cli(&db, &["reap", "--dry-run"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(
        !stdout.lines().any(|l| l.starts_with(&format!("{id} "))),
        "the reaper took a row its living daemon is recording: {stdout}"
    );
    held.release().await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1);
    let runs = std::fs::read_to_string(&ran).unwrap();
    assert_eq!(runs.lines().count(), 1, "{runs}");
    assert!(daemon.stop().success());
}

/// The same on SQLite, with the outcome held up past the lease (an
/// application's write transaction that lasts longer than
/// `lease_timeout`): on SQLite the daemon does not fence itself (every
/// daemon and reaper of the file is on this host, and a daemon keeps
/// supervising through a lock), so a daemon that lives holds its rows
/// whatever its heartbeat says. Before, the lapsed-lease pass took the
/// row once its heartbeat was older than the lease, and the finished
/// try ran again. A row of a holder that is gone is still taken then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_living_daemons_row_is_its_own_past_the_lease() {
    let db = TestDb::new(Backend::Sqlite).await;
    let ran = db.scratch.join("ran.log");
    let lease = Duration::from_secs(3);
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "heartbeat_interval: 1s\nkill_grace: 1s\nlease_timeout: 3s\nreap_interval: 1h\n\
             tasks:\n  Brief:\n    command: [/bin/sh, -c, 'echo $$ >> {}; sleep 0.3']\n",
            ran.display()
        ),
    );
    let id = db.enqueue("Brief", None).await;
    let pid = db.wait_for_pid(id, WAIT).await.pid.unwrap() as i32;
    // A row of another boot's daemon, renewed a second ago: its lease
    // lapses during the hold (the daemon's own reaper, which ran at its
    // start, runs again only in an hour).
    let lapsed = db
        .insert_row(running_on_another_host(Backend::Sqlite, "t1", 424242, 1))
        .await;
    let held = db.hold_row(id).await;
    wait_until(WAIT, "the task's process to end", || !process_exists(pid));
    // No renewal gets through the lock: the lease lapses.
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {id} AND heartbeat_at < {}",
            crate::util::sql_ago(Backend::Sqlite, lease.as_secs() as i64 + 1)
        ),
        1,
        WAIT,
    )
    .await;
    let config = daemon.config.to_str().unwrap().to_string();
    let (status, stdout, stderr) = cli(&db, &["--config", &config, "reap", "--dry-run"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.lines().any(|l| l.starts_with(&format!("{lapsed} "))),
        "the lapsed pass ran: {stdout}"
    );
    assert!(
        !stdout.lines().any(|l| l.starts_with(&format!("{id} "))),
        "the reaper took a row its living daemon is recording: {stdout}"
    );
    held.release().await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}");
    let runs = std::fs::read_to_string(&ran).unwrap();
    assert_eq!(runs.lines().count(), 1, "{runs}");
    assert!(daemon.stop().success());
}

/// `taskrunner-cli reap` run by a user who cannot see the tasks in
/// `/proc` (mounted with `hidepid`, which hides other users' processes):
/// neither the task's process nor its daemon shows, yet both run. Before,
/// each running try was taken for dead and marked CRASHED, and ran again
/// beside itself. A pid that `kill(pid, 0)` finds (`EPERM`) but `/proc`
/// hides is now left to its lease. Needs root (a private mount of `/proc`
/// as `nobody`); skipped without.
async fn a_reap_by_a_user_who_cannot_see_the_tasks_takes_none_of_them(backend: Backend) {
    let private_mounts = std::process::Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|status| status.success());
    if !nix::unistd::geteuid().is_root() || !private_mounts {
        eprintln!("skipped: mounting /proc with hidepid needs root and a private mount namespace");
        return;
    }
    let db = TestDb::new(backend).await;
    let ran = db.scratch.join("ran.log");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  Nap:\n    command: [/bin/sh, -c, 'echo $$ >> {}; sleep 3']\n",
            ran.display()
        ),
    );
    let id = db.enqueue("Nap", None).await;
    db.wait_for_pid(id, WAIT).await;
    let cli_copy = crate::util::cli_copy_for_nobody(&db);
    let (stdout, _) = crate::util::wrapped_cli(
        &db,
        std::process::Command::new("unshare")
            .args([
                "-m",
                "sh",
                "-c",
                "mount -t proc -o hidepid=2 proc /proc && \
                 exec setpriv --reuid=65534 --regid=65534 --clear-groups \"$@\"",
                "sh",
            ])
            .arg(&cli_copy),
        &["reap"],
    );
    assert!(
        !stdout.lines().any(|l| l.starts_with(&format!("{id} "))),
        "the reaper took a running try it cannot see: {stdout}"
    );
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:#?}");
    let runs = std::fs::read_to_string(&ran).unwrap();
    assert_eq!(runs.lines().count(), 1, "{runs}");
    assert!(daemon.stop().success());
}

/// An application wrote a row as RUNNING itself (or set `tries` to 0 on a
/// running row): no daemon holds it and no try of it was counted. The
/// reaper gives its try back, which took `tries` below 0; the tables refuse
/// that, and the refusal stopped each reaper pass at that row, so that the
/// lapsed rows after it were never reaped.
async fn a_running_row_written_by_an_application_with_no_try_is_reaped_with_the_rest(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let written = db.insert_row(NewRow::new("NoOp").result("RUNNING")).await;
    let lapsed = db
        .insert_row(running_on_another_host(backend, "t1", 424242, 10))
        .await;
    let mut daemon = Daemon::start(&db, "d", "reap_interval: 1s\nlease_timeout: 5s\n");
    let row = db.wait_for_state(lapsed, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 2);
    let row = db.wait_for_state(written, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "its one try is the daemon's");
    assert!(daemon.stop().success());
}

/// The same on the daemon's side: a try given back at a shutdown, on a row
/// whose `tries` an application set to 0 while it ran. The refused write
/// held back every outcome in its batch, and the daemon's drain, for ever.
async fn a_try_given_back_after_an_application_zeroed_its_tries_is_written(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "shutdown_timeout: 1s\ntasks:\n  Nap:\n    command: [/bin/sleep, '60']\n",
    );
    let id = db.enqueue("Nap", None).await;
    db.wait_for_pid(id, WAIT).await;
    db.execute(&format!(
        "UPDATE task_runner_requests SET tries = 0 WHERE id = {}",
        id.0
    ))
    .await;
    assert!(daemon.stop().success(), "{}", daemon.log_text());
    let row = db.row(id).await;
    assert_eq!(row.result.as_deref(), Some("INTERRUPTED"), "{row:?}");
    assert_eq!(row.tries, 0, "{row:?}");
}

/// A row is taken from its daemon while its try runs (another daemon's
/// reaper saw its lease lapse: here written by hand) and made runnable, and
/// the same daemon claims it again while its old try, which ignores
/// SIGTERM, is still being stopped. The daemon knew its tries by row alone:
/// the new try replaced the old one's entry (whose stop then read as a
/// shutdown), and the old try's end removed the new one's, so the heartbeat
/// took the new try's row for a claim never started and gave it back while
/// its process ran, to be claimed and run a third time beside it.
async fn a_row_taken_away_and_claimed_again_by_the_same_daemon_keeps_its_new_try(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("runs.log");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "heartbeat_interval: 1s\nkill_grace: 2s\ntasks:\n  Stubborn:\n    command: [/bin/sh, -c, \"trap '' TERM; echo start $$ >> {log}; sleep 4; echo end $$ >> {log}\"]\n",
            log = log.display()
        ),
    );
    let id = db.enqueue("Stubborn", None).await;
    let first = db.wait_for_pid(id, WAIT).await.pid.unwrap();
    db.execute(&format!(
        "UPDATE task_runner_requests SET result = 'CRASHED', claim_token = NULL, claimed_by = NULL, \
                pid = NULL, result_text = 'taken away by a test' WHERE id = {}",
        id.0
    ))
    .await;
    let second = db
        .wait_for(id, WAIT, "claimed again", |row| {
            row.result.as_deref() == Some("RUNNING") && row.pid.is_some_and(|pid| pid != first)
        })
        .await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    let runs = std::fs::read_to_string(&log).unwrap();
    assert_eq!(row.tries, 2, "{row:?}\n{runs}");
    assert!(
        !daemon.log_text().contains("holds rows it never started"),
        "{}",
        daemon.log_text()
    );
    let pid = second.pid.unwrap();
    assert!(
        runs.contains(&format!("end {pid}")),
        "the second try ran to its end: {runs}"
    );
    assert!(
        !runs.contains(&format!("end {first}")),
        "the first try was stopped: {runs}"
    );
    assert_eq!(
        runs.lines().filter(|l| l.starts_with("start")).count(),
        2,
        "{runs}"
    );
    assert!(daemon.stop().success());
}

/// A task type `Slow` that writes `start TRY` and `end` into `log`, and
/// runs `seconds` in between: a second start shows a row run twice.
fn slow_logged_task(log: &std::path::Path, seconds: u32) -> String {
    format!(
        "tasks:\n  Slow:\n    command: [/bin/sh, -c, 'echo start $TASKRUNNER_TRY >> {l}; sleep {seconds}; echo end >> {l}']\n",
        l = log.display()
    )
}

/// A daemon of host `short` whose lease is `lease`, renewed every second,
/// that reaps every second: it takes another host's row for crashed as
/// soon as that row's lease, as it judges it, has lapsed.
fn short_lease_daemon(db: &TestDb, lease: &str, tasks: &str) -> Daemon {
    Daemon::start(
        db,
        "short",
        &format!(
            "host_id: short\nlease_timeout: {lease}\nheartbeat_interval: 1s\nkill_grace: 1s\nreap_interval: 1s\n{tasks}"
        ),
    )
}

/// Daemons of two hosts whose `lease_timeout`s differ (a config changed on
/// some hosts first): the daemon with the shorter lease, and
/// `taskrunner-cli reap` under its config, leave the other daemon's running
/// row alone between that daemon's renewals. Before, they took the row for
/// crashed once its heartbeat was older than their own lease, and it ran
/// again beside the try still running.
async fn a_reaper_with_a_shorter_lease_waits_for_the_lease_of_the_rows_daemon(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("ran.log");
    let tasks = slow_logged_task(&log, 6);
    // Renews every 6 s; its rows' heartbeats are up to 6 s old.
    let mut long = Daemon::start(
        &db,
        "long",
        &format!(
            "host_id: long\nlease_timeout: 20s\nheartbeat_interval: 6s\nkill_grace: 1s\n{tasks}"
        ),
    );
    let id = db.enqueue("Slow", None).await;
    let running = db.wait_for_pid(id, WAIT).await;
    let mut short = short_lease_daemon(&db, "3s", &tasks);
    let short_config = short.config.to_str().unwrap().to_string();
    // The short lease passes (4 s) while the try runs on: nothing reaps it.
    holds_for(
        Duration::from_secs(4),
        "the try to run on under its own daemon's lease",
        async || {
            let now = db.row(id).await;
            match (now.result.as_deref(), now.tries, now.pid) {
                (Some("RUNNING"), 1, pid) if pid == running.pid => Ok(()),
                _ => Err(format!("{now:?}")),
            }
        },
    )
    .await;
    let (status, stdout, stderr) = cli(&db, &["--config", &short_config, "reap"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(
        !stdout.lines().any(|line| line.starts_with(&id.to_string())),
        "taskrunner-cli reap took the row: {stdout}"
    );
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}\n{}", short.log_text());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start 1\nend\n");
    assert!(short.stop().success());
    assert!(long.stop().success());
}

multi_host_backends!(a_lease_renewed_between_the_reapers_read_and_its_mark_keeps_the_row);

/// A reaper reads a row whose lease has lapsed (its holder slow to renew:
/// a pause, a slow database), and its holder renews the lease before the
/// reaper marks the row. The reaper marked it crashed all the same, fenced
/// on the claim token alone, and the row ran again while its holder, told
/// its renewal had worked, ran its try on until its next renewal. The lapse
/// is judged again under the row's lock when it is marked.
async fn a_lease_renewed_between_the_reapers_read_and_its_mark_keeps_the_row(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (log, gate) = (db.scratch.join("ran.log"), db.scratch.join("gate"));
    let mut holder = Daemon::start(
        &db,
        "holder",
        &format!(
            "host_id: host-a\nlease_timeout: 20s\nheartbeat_interval: 2s\nkill_grace: 1s\ntasks:\n  \
             Gated:\n    command: [/bin/sh, -c, 'echo start $TASKRUNNER_TRY >> {l}; \
             while [ ! -e {g} ]; do sleep 0.05; done; echo end >> {l}']\n",
            l = log.display(),
            g = gate.display()
        ),
    );
    let id = db.enqueue("Gated", None).await;
    db.wait_for_pid(id, WAIT).await;
    let lapsed = sql_ago(backend, 600);
    let renewed = format!(
        "SELECT count(*) FROM task_runner_requests WHERE id = {id} AND heartbeat_at > {}",
        sql_ago(backend, 60)
    );
    // The holder's lease made to look lapsed (the row's heartbeat and its
    // daemon's both ten minutes old), a reaper of another host reads it,
    // and its mark waits; a renewal coming first (one in a few hundred)
    // leaves the reaper nothing to mark, and the lapse is made again.
    let marked = db.scratch.join("mark");
    let reaper = loop {
        db.execute(&format!(
            "UPDATE task_runner_requests SET heartbeat_at = {lapsed} WHERE id = {id}"
        ))
        .await;
        db.execute(&format!(
            "UPDATE task_runner_daemons SET heartbeat_at = {lapsed}"
        ))
        .await;
        let mut reaper = spawn_cli_in_env(
            &db,
            &["--host-id", "host-b", "reap"],
            &[(
                "TASKRUNNER_TEST_FINALIZE_AFTER_LOOKUP",
                marked.to_str().unwrap(),
            )],
        );
        let waiting = marked.with_extension("waiting");
        wait_until(
            WAIT,
            "the reaper's mark to wait, or the reaper to end",
            || waiting.exists() || reaper.try_wait().unwrap().is_some(),
        );
        if waiting.exists() {
            break reaper;
        }
        let output = reaper.wait_with_output().unwrap();
        assert!(output.status.success(), "{output:?}");
    };
    // The holder renews (every 2 s), then the reaper's mark goes on.
    db.wait_for_count(&renewed, 1, WAIT).await;
    std::fs::write(&marked, "").unwrap();
    let output = reaper.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !stdout.lines().any(|line| line.starts_with(&id.to_string())),
        "the reaper took the renewed row: {stdout}"
    );
    std::fs::write(&gate, "").unwrap();
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}\n{}", holder.log_text());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start 1\nend\n");
    assert!(holder.stop().success());
}

/// A reload that shortens `reap_interval` (1h to 1s): the next pass came
/// at the end of the old interval, an hour after the last, and a crashed
/// daemon's row waited for it. The new interval now counts from the last
/// pass.
async fn a_reload_that_shortens_the_reap_interval_reaps_from_the_last_pass(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "reap_interval: 1h\n");
    // The start-up pass has run: the daemon logs it before it serves.
    let id = db
        .insert_row(running_on_another_host(backend, "t1", 0, 3600))
        .await;
    daemon.reload_with(&db, "reap_interval: 1s\n");
    db.wait_for_state(id, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

multi_host_backends!(a_reload_that_lengthens_the_lease_writes_it_before_renewing_less_often);

/// A reload that lengthened `lease_timeout` and `heartbeat_interval` (6 s
/// renewed every second, then 40 s every 15 s): the daemon's first
/// renewal after it still wrote the old lease into its row of
/// `task_runner_daemons` (from the config it had read before it waited),
/// and the next came 15 s later. A daemon of another host, whose lease is
/// 6 s, took the running row for crashed and ran it again beside the
/// first. The renewal now writes the lease of the config it runs with.
async fn a_reload_that_lengthens_the_lease_writes_it_before_renewing_less_often(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("ran.log");
    let tasks = slow_logged_task(&log, 16);
    let long_config = |lease: &str, interval: &str| {
        format!(
            "host_id: long\nlease_timeout: {lease}\nheartbeat_interval: {interval}\nkill_grace: 1s\n{tasks}"
        )
    };
    let mut long = Daemon::start(&db, "long", &long_config("6s", "1s"));
    let id = db.enqueue("Slow", None).await;
    let running = db.wait_for_pid(id, WAIT).await;
    let mut short = short_lease_daemon(&db, "6s", &tasks);
    long.reload_with(&db, &long_config("40s", "15s"));
    long.wait_for_log("config reloaded", WAIT);
    // Past the old lease, and well short of the new interval.
    holds_for(
        Duration::from_secs(12),
        "the try to run on under its daemon's new lease",
        async || {
            let now = db.row(id).await;
            match (now.result.as_deref(), now.tries, now.pid) {
                (Some("RUNNING" | "FINISHED"), 1, pid) if pid == running.pid => Ok(()),
                _ => Err(format!("{now:?}")),
            }
        },
    )
    .await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}\n{}", short.log_text());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start 1\nend\n");
    assert!(short.stop().success());
    assert!(long.stop().success());
}

/// A daemon whose own row in `task_runner_daemons` cannot be written (here
/// an application's trigger refuses it) cannot tell other hosts' reapers
/// its lease: they judge its rows by their own. It renewed them at its own
/// longer interval all the same (15 s, against another host's 6 s lease),
/// and that host took its running row for crashed. Until its row holds
/// its lease it now renews every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_daemon_whose_row_cannot_be_written_renews_every_second() {
    let db = TestDb::new(Backend::Postgres).await;
    db.execute(
        "CREATE FUNCTION refuse_long() RETURNS trigger AS $$ BEGIN \
           IF NEW.host = 'long' THEN RAISE EXCEPTION 'no row for long'; END IF; \
           RETURN NEW; END; $$ LANGUAGE plpgsql; \
         CREATE TRIGGER refuse_long BEFORE INSERT OR UPDATE ON task_runner_daemons \
           FOR EACH ROW EXECUTE FUNCTION refuse_long()",
    )
    .await;
    let log = db.scratch.join("ran.log");
    let tasks = slow_logged_task(&log, 10);
    let mut long = Daemon::start(
        &db,
        "long",
        &format!(
            "host_id: long\nlease_timeout: 40s\nheartbeat_interval: 15s\nkill_grace: 1s\n{tasks}"
        ),
    );
    long.wait_for_log("could not write this daemon's row", WAIT);
    let id = db.enqueue("Slow", None).await;
    db.wait_for_pid(id, WAIT).await;
    let mut short = short_lease_daemon(&db, "6s", &tasks);
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}\n{}", short.log_text());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start 1\nend\n");
    assert!(short.stop().success());
    assert!(long.stop().success());
}

async fn stale_heartbeat_of_another_host_is_crashed_after_the_lease(backend: Backend) {
    let db = TestDb::new(backend).await;
    // Renewed 10 s ago, by a daemon on another host.
    let stale = db
        .insert_row(running_on_another_host(backend, "t1", 424242, 10))
        .await;
    // Its heartbeat is recent: the lease (5s) has not lapsed yet.
    let alive = db
        .insert_row(running_on_another_host(backend, "t2", 424243, -2))
        .await;
    let started = Instant::now();
    let mut daemon = Daemon::start(&db, "d", "reap_interval: 1s\nlease_timeout: 5s\n");
    let row = db.wait_for_state(stale, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 2);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a lapsed lease is reaped at start"
    );
    assert_eq!(
        db.row(alive).await.result.as_deref(),
        Some("RUNNING"),
        "a live lease is left alone"
    );
    let row = db.wait_for_state(alive, "FINISHED", WAIT).await;
    println!("recovery of a host whose heartbeat stopped: {:.2}s after start (lease 5s, heartbeat 2s ahead)", started.elapsed().as_secs_f64());
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "not before its lease lapsed"
    );
    assert_eq!(row.tries, 2);
    assert!(daemon.stop().success());
}

/// `claimed_by` naming a daemon process of this boot that is gone.
fn dead_daemon_instance(host: &str) -> String {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = i64::from(child.id());
    // Until it is waited for, the exited child keeps its start ticks.
    let ticks = taskrunner::procinfo::start_ticks(pid).unwrap();
    child.wait().unwrap();
    format!(
        "{host}:{pid}:{ticks}:{}:00000000deadbeef",
        taskrunner::procinfo::boot_id()
    )
}

/// A daemon died holding rows for whose tries no process was recorded
/// (claimed ahead and waiting for a slot, or ended before the pid was
/// written): such a try is the daemon's failure and is given back, even on
/// a row with a single try; the second such try in a row counts, so that a
/// task that kills its own daemon still reaches its limit. Without the
/// give-back, daemons killed while rows were claimed ahead ended a row that
/// never ran exhausted (the chaos test under load, 2 of 66 runs).
async fn a_try_whose_daemon_died_before_its_process_was_recorded_is_given_back(backend: Backend) {
    let db = TestDb::new(backend).await;
    let host = "reaper-test-host";
    let dead = dead_daemon_instance(host);
    let unstarted = |token: &str| {
        NewRow::new("NoOp")
            .running(backend, host, &dead, token, 0, 1)
            .sql("pid", "NULL")
    };
    let first = db.insert_row(unstarted("t1")).await;
    let only_try = db.insert_row(unstarted("t2").try_limit(1)).await;
    let again = db
        .insert_row(unstarted("t3").number("tries", 2).text(
            "result_text",
            "not counted: its daemon is gone (…) and no task process was recorded",
        ))
        .await;
    // Another host's row, its lease lapsed long ago, no process recorded.
    let lapsed = db
        .insert_row(
            NewRow::new("NoOp")
                .running(backend, "other-host", "other-host:1:x", "t4", 0, 3600)
                .sql("pid", "NULL"),
        )
        .await;
    let (status, stdout, stderr) = cli(&db, &["--host-id", host, "reap"]);
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    for id in [first, only_try, lapsed] {
        let row = db.row(id).await;
        assert_eq!(row.result.as_deref(), Some("INTERRUPTED"), "{row:?}");
        assert_eq!(row.tries, 0, "its try was given back: {row:?}");
        let text = row.result_text.unwrap_or_default();
        assert!(text.starts_with("not counted: "), "{text}");
        assert!(text.contains("no task process was recorded"), "{text}");
        assert!(row.delay_until.is_none(), "it runs again at once");
    }
    let row = db.row(again).await;
    assert_eq!(row.result.as_deref(), Some("CRASHED"), "{row:?}");
    assert_eq!(row.tries, 2, "the second such try in a row counts");
    let text = row.result_text.unwrap_or_default();
    assert!(text.contains("second try in a row"), "{text}");
    let mut daemon = Daemon::start(&db, "d", "");
    for id in [first, only_try, lapsed] {
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        assert_eq!(row.tries, 1);
    }
    assert_eq!(db.wait_for_state(again, "FINISHED", WAIT).await.tries, 3);
    assert!(daemon.stop().success());
}

async fn flood_of_output_is_bounded(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "output_tail: 64KiB\ntasks:\n  Flood:\n    command: [/bin/sh, -c, 'head -c 100000000 /dev/zero | tr \"\\0\" x; head -c 50000000 /dev/zero | tr \"\\0\" y >&2; echo end']\n",
    );
    // Settle, then measure the resident memory the flood adds.
    let warm = db.enqueue("NoOp", None).await;
    db.wait_for_state(warm, "FINISHED", WAIT).await;
    let (_, before) = memory_kib(daemon.pid());
    let id = db.enqueue("Flood", None).await;
    let row = db
        .wait_for_state(id, "FINISHED", Duration::from_secs(60))
        .await;
    let text = row.result_text.unwrap();
    assert!(
        text.len() <= 64 * 1024,
        "result_text is the tail only: {} bytes",
        text.len()
    );
    assert!(text.ends_with("xxxxend"), "the tail of stdout");
    let (peak, _) = memory_kib(daemon.pid());
    println!("daemon RSS before the 150 MB flood: {before} KiB, peak after: {peak} KiB");
    assert!(
        peak < before + 24 * 1024,
        "memory stays flat: {before} KiB before, peak {peak} KiB"
    );
    assert!(daemon.stop().success());
}

/// Without cgroups (`TASKRUNNER_CGROUPS=off`), `memory_limit` is RLIMIT_AS;
/// tests/cgroups.rs has the cgroup's.
async fn memory_limit_fails_the_try_naming_the_limit(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start_in_env(
        &db,
        "d",
        "tasks:\n  Hungry:\n    command: [python3, -c, 'x = bytearray(512 * 1024 * 1024)']\n    memory_limit: 128MiB\n",
        &[("TASKRUNNER_CGROUPS", "off")],
    );
    let id = db.insert_row(NewRow::new("Hungry").try_limit(1)).await;
    db.wait_for_failure(id, "memory_limit 128MiB exceeded (RLIMIT_AS")
        .await;
    assert!(daemon.stop().success());
}

/// A task past its `cpu_limit` fails naming it, whether it died of the
/// limit's `SIGXCPU` or, ignoring that, of the `SIGKILL` a second later.
async fn cpu_limit_fails_the_try_naming_the_limit(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Spin:\n    command: [/bin/sh, -c, 'while :; do :; done']\n    cpu_limit: 1s\n\
         \x20 Stubborn:\n    command: [/bin/sh, -c, \"trap '' XCPU; while :; do :; done\"]\n    cpu_limit: 1s\n",
    );
    let id = db.insert_row(NewRow::new("Spin").try_limit(1)).await;
    let row = db.wait_for_state(id, "FAILED", WAIT).await;
    let text = row.result_text.unwrap();
    assert!(
        text.starts_with("killed by signal 24 (SIGXCPU): cpu_limit 1s exceeded"),
        "{text}"
    );
    // A task that ignores SIGXCPU (Go programs do) is killed by the kernel
    // a second later: the limit is named all the same (it was CRASHED,
    // "killed by signal 9").
    let id = db.insert_row(NewRow::new("Stubborn").try_limit(1)).await;
    let row = db.wait_for_state(id, "FAILED", WAIT).await;
    let text = row.result_text.unwrap();
    assert!(
        text.starts_with("killed by signal 9 (SIGKILL): cpu_limit 1s exceeded"),
        "{text}"
    );
    assert!(daemon.stop().success());
}

/// `cpu_limit` is RLIMIT_CPU, which counts each process's own CPU time.
/// A task whose children (each well under the limit) used more than the
/// limit in all, then killed -9 by another hand, was taken for one past its
/// limit (`wait4`'s usage counts the children a process waited for): FAILED
/// naming `cpu_limit`, where it crashed.
async fn a_task_killed_after_its_children_used_its_cpu_limit_is_crashed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let script = db.scratch.join("spin.py");
    let spun = db.scratch.join("spun");
    std::fs::write(
        &script,
        "import os, subprocess, sys, time\n\
         while sum(os.times()[2:4]) < 1.5:\n\
         \x20   subprocess.run(['timeout', '0.4', 'sh', '-c', 'while :; do :; done'])\n\
         open(sys.argv[1], 'w').close()\n\
         time.sleep(60)\n",
    )
    .unwrap();
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "tasks:\n  Parent:\n    command: [python3, {}, {}]\n    cpu_limit: 1s\n",
            script.display(),
            spun.display()
        ),
    );
    let id = db.insert_row(NewRow::new("Parent").try_limit(1)).await;
    wait_until(WAIT, "the children to use 1.5 s of CPU", || spun.exists());
    let pid = db.row(id).await.pid.expect("its pid is recorded");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let row = db.wait_for_state(id, "CRASHED", WAIT).await;
    let text = row.result_text.unwrap();
    assert!(text.starts_with("killed by signal 9 (SIGKILL)"), "{text}");
    assert!(!text.contains("cpu_limit"), "{text}");
    assert!(daemon.stop().success());
}

async fn cancel_stops_a_running_task(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Long:\n    command: [/bin/sleep, '60']\n",
    );
    let id = db.enqueue("Long", None).await;
    let running = db.wait_for_pid(id, WAIT).await;
    let (status, stdout, _) = cli(&db, &["cancel", &id.to_string()]);
    assert_eq!(status, 0);
    assert!(stdout.contains("within a heartbeat"), "{stdout}");
    let asked = Instant::now();
    let row = db.wait_for_state(id, "CANCELLED", WAIT).await;
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "stopped within a heartbeat (1s)"
    );
    assert!(row.result_text.unwrap().starts_with("cancelled by a user"));
    assert!(!process_exists(running.pid.unwrap() as i32));
    assert!(daemon.stop().success());
}

/// A `programs:` entry is asked for its task types (`--list-tasks`, and
/// `--list-flows`) in a task's environment: the daemon's allowlisted
/// variables and the config's `env:`. Before, it got the daemon's whole
/// environment, `DATABASE_URL` and `PGPASSWORD` with it.
async fn a_program_asked_for_its_task_types_gets_no_database_secrets(backend: Backend) {
    let db = TestDb::new(backend).await;
    let seen = db.scratch.join("seen.env");
    let program = db.scratch.join("lister");
    crate::util::write_executable(
        &program,
        format!(
            "#!/bin/sh\nenv | grep -E '^(DATABASE_URL|PG|FROM_CONFIG|PATH)' | sort >> {}\n\
             if [ \"$1\" = --list-tasks ]; then echo Listed; exit 0; fi\n\
             if [ \"$1\" = --list-flows ]; then exit 0; fi\n\
             echo listed\n",
            seen.display()
        ),
    );
    let mut daemon = Daemon::start_in_env(
        &db,
        "d",
        &format!(
            "env: {{FROM_CONFIG: yes-please}}\nprograms: [{}]\n",
            program.display()
        ),
        &[("DATABASE_URL", db.url.as_str()), ("PGPASSWORD", "hunter2")],
    );
    let id = db.enqueue("Listed", None).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.result_text.as_deref(), Some("listed"));
    let seen = std::fs::read_to_string(&seen).unwrap();
    assert!(
        !seen.contains("DATABASE_URL") && !seen.contains("PGPASSWORD"),
        "{seen}"
    );
    assert!(
        seen.contains("FROM_CONFIG=yes-please") && seen.contains("PATH="),
        "{seen}"
    );
    assert!(daemon.stop().success());
}

/// A root daemon asks a `programs:` entry for its task types as the
/// top-level `user:`, the user its tasks run as, at start and at a reload.
/// Before, it asked as root: whoever may replace the program (its deploy,
/// as that user) ran code as root at every start and reload. Here the
/// program names its one type after the user it was asked as (after 5 MB
/// on its standard error, which the daemon reads to the end). Needs root.
async fn a_program_is_asked_for_its_task_types_as_the_user_its_tasks_run_as(backend: Backend) {
    use std::os::unix::fs::PermissionsExt;
    if !crate::util::runs_as_root("running a program as another user needs root") {
        return;
    }
    let db = TestDb::new(backend).await;
    let program = db.scratch.join("lister");
    let hang = db.scratch.join("hang-now");
    crate::util::write_executable(
        &program,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = --list-tasks ]; then\n\
             \x20 if [ -e {} ]; then exec sleep 3587; fi\n\
             \x20 head -c 5000000 /dev/zero >&2 || exit 3\n\
             \x20 echo \"AsUid$(id -u)$USER\"; exit 0\n\
             fi\n\
             if [ \"$1\" = --list-flows ]; then exit 0; fi\n\
             echo \"ran as $(id -u)\"\n",
            hang.display()
        ),
    );
    std::fs::set_permissions(&db.scratch.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    let mut daemon = db
        .daemon("d")
        .yaml(&format!(
            "user: nobody\nprograms: [{}]\n",
            program.display()
        ))
        .env("TASKRUNNER_TEST_ASK_TIMEOUT_MS", "3000")
        .start();
    // Its uid, and the user its environment names (a login's `USER`).
    let task = format!("AsUid{nobody}nobody");
    for reloaded in [false, true] {
        if reloaded {
            daemon.signal(Signal::SIGHUP);
            daemon.wait_for_log("config reloaded", WAIT);
        }
        let id = db.enqueue(&task, None).await;
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        assert_eq!(
            row.result_text.as_deref(),
            Some(format!("ran as {nobody}").as_str())
        );
    }
    // A type it does not know makes it ask again; a program that does not
    // answer is killed with its group at the bound.
    std::fs::write(&hang, "").unwrap();
    let unknown = db.insert_row(NewRow::new("Unknown").try_limit(1)).await;
    let row = db.wait_for_state(unknown, "FAILED", WAIT).await;
    assert!(
        daemon
            .log_text()
            .contains("--list-tasks did not answer within 3s: killed"),
        "{row:#?}\n{}",
        daemon.log_text()
    );
    wait_until(WAIT, "the question's process to be gone", || {
        !std::process::Command::new("pgrep")
            .args(["-f", "sleep 3587"])
            .status()
            .is_ok_and(|status| status.success())
    });
    assert!(daemon.stop().success());
}

async fn task_inherits_only_stdio_and_no_database_secrets(backend: Backend) {
    let db = TestDb::new(backend).await;
    let dir = db.scratch.join("d");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("taskrunner.yml");
    std::fs::write(
        &config,
        crate::util::merge_yaml(
            &crate::util::base_config(&db, &dir),
            "env: {FROM_CONFIG: yes-please}\ntasks:\n  Inspect:\n    command: [/bin/sh, -c, 'ls /proc/self/fd | tr \"\\n\" \" \"; echo; env | grep -E \"^(DATABASE_URL|PG|FROM_CONFIG|TASKRUNNER_)\" | sort']\n",
        ),
    )
    .unwrap();
    // The daemon itself gets secrets in its environment; tasks must not.
    let mut daemon = {
        let log = dir.join("daemon.log");
        let child = std::process::Command::new(crate::util::DAEMON)
            .arg("--config")
            .arg(&config)
            .env("DATABASE_URL", &db.url)
            .env("PGPASSWORD", "hunter2")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut daemon = Daemon {
            child,
            config: config.clone(),
            log,
            dir: dir.clone(),
        };
        daemon.wait_ready();
        daemon
    };
    let id = db.enqueue("Inspect", None).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    let text = row.result_text.unwrap();
    let fds: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    // ls's own descriptors: stdin, stdout, stderr, and 3 for the directory it
    // lists. An inherited descriptor would push that to 4.
    assert_eq!(
        fds,
        ["0", "1", "2", "3"],
        "only stdin, stdout and stderr are inherited: {text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("DATABASE_URL=") || l.starts_with("PG")),
        "{text}"
    );
    assert!(text.contains("FROM_CONFIG=yes-please"));
    assert!(
        text.contains(&format!("TASKRUNNER_REQUEST_ID={id}"))
            && text.contains("TASKRUNNER_TRY=1")
            && text.contains("TASKRUNNER_TASK=Inspect")
    );
    assert!(daemon.stop().success());
}

/// A grandchild that leaves the task's process group (setsid) survives the
/// group kill and holds the task's stdout open: the outcome is still decided
/// when the task exits, with the output written so far, not when the
/// grandchild lets go of it. What the grandchild writes after the task's
/// end is not the task's: before, the pipe was read for half a second more,
/// and its chatter (from 0.3 s after the task was reaped here) took the
/// place of the task's own `done` in `result_text`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grandchild_holding_stdout_does_not_hold_up_the_outcome() {
    let db = TestDb::new(Backend::Sqlite).await;
    let escaped = db.scratch.join("escaped");
    // Without cgroups, where such a grandchild escapes the try's end (with
    // them it is killed: tests/cgroups.rs).
    let mut daemon = Daemon::start_in_env(
        &db,
        "d",
        &format!(
            "tasks:\n  Escape:\n    command: [/bin/sh, -c, 'setsid /bin/sh -c \"echo \\$\\$ > {}; while kill -0 \\$PPID 2>/dev/null; do sleep 0.01; done; sleep 0.3; yes chatter; exec sleep 60\" & while [ ! -s {} ]; do sleep 0.01; done; echo done']\n",
            escaped.display(),
            escaped.display()
        ),
        &[("TASKRUNNER_CGROUPS", "off")],
    );
    let enqueued = Instant::now();
    let id = db.enqueue("Escape", None).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    let took = enqueued.elapsed();
    let grandchild: i32 = std::fs::read_to_string(&escaped)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let held = process_exists(grandchild);
    let _ = kill(Pid::from_raw(grandchild), Signal::SIGKILL);
    assert!(held, "the grandchild outlived its task, holding its stdout");
    assert_eq!(row.result_text.as_deref(), Some("done"));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(daemon.stop().success());
}

/// The nice value (field 19 of /proc/PID/stat) of a process.
fn nice_of(pid: &str) -> i32 {
    crate::util::stat_fields(pid)[16].parse().unwrap()
}

/// The daemon raises itself five nice levels above its tasks when it may
/// (as root), so that tasks filling the CPUs do not starve it; a task runs
/// at the nice value the daemon was started with, or at its type's `nice:`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_outranks_its_tasks_which_keep_its_starting_nice() {
    let db = TestDb::new(Backend::Sqlite).await;
    let report = "[/bin/sh, -c, 'read -r s < /proc/$$/stat; set -- ${s##*) }; echo ${17}']";
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!("tasks:\n  Plain:\n    command: {report}\n  Nice:\n    command: {report}\n    nice: 15\n"),
    );
    let started_at = nice_of("self");
    let plain = db.enqueue("Plain", None).await;
    let nice = db.enqueue("Nice", None).await;
    let plain = db.wait_for_state(plain, "FINISHED", WAIT).await;
    let nice = db.wait_for_state(nice, "FINISHED", WAIT).await;
    assert_eq!(plain.result_text.unwrap(), started_at.to_string());
    assert_eq!(nice.result_text.unwrap(), "15");
    let daemon_nice = nice_of(&daemon.pid().to_string());
    if nix::unistd::geteuid().is_root() {
        let raised = (started_at - 5).max(-20);
        assert_eq!(daemon_nice, raised);
        assert!(daemon.log_text().contains(&format!(
            "priority=\"nice {raised}, tasks at {started_at}\""
        )));
    } else {
        assert_eq!(daemon_nice, started_at);
        assert!(daemon.log_text().contains("raising it needs CAP_SYS_NICE"));
    }
    assert!(daemon.stop().success());
}

/// Tasks run as `user:`, at their type's `nice:` even below the daemon's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_as_the_configured_user() {
    if !crate::util::runs_as_root("running tasks as another user needs root") {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  WhoAmI:\n    command: [/usr/bin/id, -u]\n    user: nobody\n\
         \x20 Eager:\n    command: [/bin/sh, -c, 'read -r s < /proc/$$/stat; set -- ${s##*) }; echo ${17}']\n    user: nobody\n    nice: -10\n",
    );
    // A nice value below the daemon's is set before the user changes
    // (after it, the try failed: "Permission denied").
    let eager = db.enqueue("Eager", None).await;
    let eager = db.wait_for_state(eager, "FINISHED", WAIT).await;
    assert_eq!(eager.result_text.as_deref(), Some("-10"));
    let id = db.enqueue("WhoAmI", None).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    assert_eq!(row.result_text.unwrap(), nobody.to_string());
    assert!(daemon.stop().success());
}

multi_host_backends!(postgres_restart_while_ten_tasks_run_loses_nothing);

async fn postgres_restart_while_ten_tasks_run_loses_nothing(backend: Backend) {
    let mut server = PrivateServer::start(backend);
    let db = server.test_db().await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "max_concurrent: 10\nlease_timeout: 30s\ntasks:\n  Nap:\n    command: [/bin/sleep, '3']\n",
    );
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(db.enqueue("Nap", None).await);
    }
    for id in &ids {
        db.wait_for_pid(*id, WAIT).await;
    }
    // Down for a few heartbeats, then back (shorter than the self-fencing
    // deadline; longer than the pool's 5 s wait for a connection, which a
    // renewal, waited for until that deadline, rides a shorter restart
    // through with).
    server.stop();
    tokio::time::sleep(Duration::from_millis(6500)).await;
    server.start_again();
    for id in &ids {
        let row = db.wait_for_state(*id, "FINISHED", WAIT).await;
        assert_eq!(row.tries, 1, "the restart cost no try");
    }
    // The outage ends once every part that failed in it has worked again
    // (the last may be a pass that runs after the outcomes are written).
    daemon.wait_for_log("database available again", WAIT);
    let log = daemon.log_text();
    let outage_lines = log.matches("database unavailable").count();
    assert!(
        (1..=2).contains(&outage_lines),
        "one line per outage, not one per retry ({outage_lines}):\n{log}"
    );
    assert!(log.contains("database available again"), "{log}");
    assert!(daemon.stop().success());
}

multi_host_backends!(
    a_crashed_member_whose_batch_an_application_holds_holds_up_no_other_reap,
    a_crashed_row_an_application_holds_holds_up_no_other_reap,
);

/// Two rows of a dead host: a member of a batch that an application's
/// transaction holds (adding members, as the README shows), and a plain
/// row after it. The reaper's pass waited for the batch's lock up to the
/// call's bound, then ended: the plain row never ran again while the
/// application's transaction lasted. The member is left for a later pass
/// now, and the plain row runs.
async fn a_crashed_member_whose_batch_an_application_holds_holds_up_no_other_reap(
    backend: Backend,
) {
    reap_beside_a_lock(backend, true).await;
}

/// The same with the crashed row itself held (an application's
/// transaction that read it `FOR UPDATE`): the pass waited for it the same
/// way.
async fn a_crashed_row_an_application_holds_holds_up_no_other_reap(backend: Backend) {
    reap_beside_a_lock(backend, false).await;
}

/// Two rows of a dead host, the first held by an application (its batch's
/// row with `in_batch`, else its own): the second is reaped and runs, the
/// first once the lock goes.
async fn reap_beside_a_lock(backend: Backend, in_batch: bool) {
    let db = TestDb::new(backend).await;
    let batch = db
        .insert("INSERT INTO task_runner_batches (name) VALUES ('held') RETURNING id")
        .await
        .0;
    let first = running_on_another_host(backend, "t1", 999_999, 600);
    let first = db
        .insert_row(if in_batch { first.batch(batch) } else { first })
        .await;
    let plain = db
        .insert_row(running_on_another_host(backend, "t2", 999_998, 600))
        .await;
    let lock = match in_batch {
        true => format!("BEGIN; SELECT id FROM task_runner_batches WHERE id = {batch} FOR UPDATE"),
        false => {
            format!("BEGIN; SELECT id FROM task_runner_requests WHERE id = {first} FOR UPDATE")
        }
    };
    let held = db.holding(&lock).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "heartbeat_interval: 1s\nkill_grace: 1s\nlease_timeout: 5s\nreap_interval: 1s\n",
    );
    db.wait_for_state(plain, "FINISHED", Duration::from_secs(15))
        .await;
    daemon.wait_for_log("not reaped in this pass", WAIT);
    assert_eq!(db.row(first).await.result.as_deref(), Some("RUNNING"));
    drop(held);
    db.wait_for_state(first, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

multi_host_backends!(daemon_that_loses_postgres_kills_its_tasks_before_the_lease_lapses);

async fn daemon_that_loses_postgres_kills_its_tasks_before_the_lease_lapses(backend: Backend) {
    let mut server = PrivateServer::start(backend);
    let db = server.test_db().await;
    // Self-fencing deadline: lease 8s − heartbeat 1s − kill_grace 2s = 5s after the last renewal.
    let mut daemon = Daemon::start(
        &db,
        "d",
        "lease_timeout: 8s\nretry_delay: 1h\ntasks:\n  Long:\n    command: [/bin/sleep, '120']\n",
    );
    let id = db.enqueue("Long", None).await;
    let row = db.wait_for_pid(id, WAIT).await;
    let task_pid = row.pid.unwrap() as i32;
    server.stop();
    let stopped = Instant::now();
    wait_until(
        Duration::from_secs(12),
        "the daemon to kill its task",
        || !process_exists(task_pid),
    );
    let killed_after = stopped.elapsed();
    println!(
        "task killed {:.1}s after the database went away (deadline 5s after the last renewal)",
        killed_after.as_secs_f64()
    );
    assert!(
        killed_after < Duration::from_secs(8),
        "killed before the lease (8s) could lapse: {killed_after:?}"
    );
    assert!(
        killed_after > Duration::from_secs(3),
        "not before the deadline: {killed_after:?}"
    );
    server.start_again();
    // The outcome is recorded once the database is back (the claim is still
    // its own): CRASHED, and its try counted, the row runs again at once, as
    // a try whose daemon died does (the task did nothing wrong; before, it
    // waited its `retry_delay`). Its text stays until the second try ends.
    // (This waited for the row's CRASHED itself, which lasts only until the
    // next claim, a few milliseconds: a loaded machine's polls missed it.)
    let row = db
        .wait_for(id, WAIT, "recorded, and running its second try", |r| {
            r.tries == 2 && r.result.as_deref() == Some("RUNNING")
        })
        .await;
    let text = row.result_text.unwrap_or_default();
    assert!(
        text.starts_with("stopped after") && text.contains("this daemon lost its claim"),
        "{text}"
    );
    assert!(daemon.stop().success());
}

multi_host_backends!(a_stopped_daemons_try_is_killed_before_another_daemon_reruns_its_row);

/// A daemon is stopped (SIGSTOP: a debugger, a process freezer that left
/// its tasks out) for longer than its lease: the daemon of another host
/// takes the row over as crashed and runs it again. The stopped daemon
/// cannot kill its try; its fencing watchdog, a process apart, does, at
/// `lease_timeout − heartbeat_interval` after the last renewal (3 s here),
/// before the lease lapses (4 s): the row never runs on two hosts at once.
/// (Before the watchdog, the try ran on beside its rerun until the daemon
/// resumed.) When the daemon resumes, it writes nothing for the killed
/// try: the row keeps the other daemon's outcome; its log says why.
async fn a_stopped_daemons_try_is_killed_before_another_daemon_reruns_its_row(backend: Backend) {
    let db = TestDb::new(backend).await;
    let marker = db.scratch.join("first-try");
    let config = |host: &str| {
        format!(
            "host_id: {host}\nheartbeat_interval: 1s\nkill_grace: 1s\nlease_timeout: 4s\nreap_interval: 1s\n{}",
            first_try_hangs(&marker)
        )
    };
    let mut paused = Daemon::start(&db, "a", &config("host-a"));
    let id = db.enqueue("Once", None).await;
    // Stopped once its try's process is recorded: a try stopped before
    // that is given back, not counted, and its rerun is the first try again.
    let first_try = db.wait_for_pid(id, WAIT).await.pid.unwrap() as i32;
    kill(Pid::from_raw(paused.pid()), Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    let mut other = Daemon::start(&db, "b", &config("host-b"));
    wait_until(
        Duration::from_secs(10),
        "the stopped daemon's try to be killed",
        || !process_exists(first_try),
    );
    let killed_after = stopped.elapsed();
    // Read after the kill: the row had not been taken over yet.
    let row = db.row(id).await;
    println!(
        "the stopped daemon's try killed {:.2}s after the stop; the row then: {:?} try {} on {:?}",
        killed_after.as_secs_f64(),
        row.result,
        row.tries,
        row.host
    );
    assert_eq!(
        (row.result.as_deref(), row.tries, row.pid),
        (Some("RUNNING"), 1, Some(i64::from(first_try))),
        "killed before another daemon took the row over: {row:?}"
    );
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 2, "{row:?}");
    kill(Pid::from_raw(paused.pid()), Signal::SIGCONT).unwrap();
    // Nothing of the killed try is written over the other daemon's outcome.
    holds_for(
        Duration::from_secs(2),
        "the row to keep the rerun's outcome",
        async || {
            let now = db.row(id).await;
            match (now.result.as_deref(), now.tries, &now.result_text) {
                (Some("FINISHED"), 2, text) if *text == row.result_text => Ok(()),
                _ => Err(format!("{now:?}")),
            }
        },
    )
    .await;
    // Its log says why, once it runs again and reads the watchdog's line.
    let log = paused.log_text();
    assert!(
        log.contains("fencing watchdog: this daemon renewed no lease for")
            && log.contains("killed its 1 running task processes"),
        "{log}"
    );
    assert!(paused.stop().success(), "{log}");
    assert!(other.stop().success());
}

multi_host_backends!(a_stopped_daemon_starts_none_of_the_rows_it_claimed_ahead_when_it_resumes);

/// The same stop, while the daemon drains short tasks: it claims rows
/// ahead, each waiting for its one slot with its start ready. The other
/// daemon takes every row over and runs it. When the stopped daemon
/// resumed, its spawner thread saw the last try's exit and started the next
/// row waiting in line at once, before its heartbeat could find the rows
/// taken over: a row the other daemon had run ran again (beside its rerun,
/// had the rerun been slower). Now nothing starts past the daemon's fence.
async fn a_stopped_daemon_starts_none_of_the_rows_it_claimed_ahead_when_it_resumes(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let runs = db.scratch.join("runs");
    let config = |host: &str, slots: u32| {
        format!(
            "host_id: {host}\nmax_concurrent: {slots}\nheartbeat_interval: 1s\nkill_grace: 1s\n\
             lease_timeout: 4s\nreap_interval: 1s\ntasks:\n  Note:\n    \
             command: [/bin/sh, -c, 'echo $TASKRUNNER_REQUEST_ID >> {}']\n",
            runs.display()
        )
    };
    let mut ids = Vec::new();
    for _ in 0..300 {
        ids.push(db.enqueue("Note", None).await);
    }
    let ran = || std::fs::read_to_string(&runs).unwrap_or_default();
    let mut paused = Daemon::start(&db, "a", &config("host-a", 1));
    // Draining: by then it knows its tries are short, and claims ahead.
    wait_until(WAIT, "30 rows run", || ran().lines().count() >= 30);
    kill(Pid::from_raw(paused.pid()), Signal::SIGSTOP).unwrap();
    let mut other = Daemon::start(&db, "b", &config("host-b", 4));
    for &id in &ids {
        db.wait_for_state(id, "FINISHED", Duration::from_secs(60))
            .await;
    }
    let before = ran();
    kill(Pid::from_raw(paused.pid()), Signal::SIGCONT).unwrap();
    holds_for(
        Duration::from_secs(3),
        "no row to run again on the resumed daemon",
        async || match ran() {
            now if now == before => Ok(()),
            now => Err(format!("ran since: {:?}", &now[before.len()..])),
        },
    )
    .await;
    assert!(paused.stop().success(), "{}", paused.log_text());
    assert!(other.stop().success());
}

/// The database's clock jumps two minutes ahead (a failover to a server
/// whose clock is ahead, a step of its NTP) while a daemon runs a try:
/// every lease looks lapsed at once. Another daemon's reaper marked the
/// living daemon's row crashed and ran it again, beside the try its holder
/// still ran. Now a reaper that sees the database's clock jump ahead of its
/// own judges no lease for a lease's time, by which the living holder has
/// renewed by the new clock. PostgreSQL only: its `now()` and
/// `clock_timestamp()` are shadowed here by functions ahead of `pg_catalog`
/// on the daemons' path, which move the clock for their sessions alone; a
/// MariaDB server's clock cannot be moved by a test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jump_ahead_of_the_database_clock_reaps_no_living_daemons_row() {
    let plain = TestDb::unmigrated(Backend::Postgres).await;
    for sql in [
        "CREATE TABLE clock_offset (seconds float8 NOT NULL)",
        "INSERT INTO clock_offset VALUES (0)",
        "CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql STABLE AS \
         $$ SELECT pg_catalog.now() + make_interval(secs => (SELECT seconds FROM public.clock_offset)) $$",
        "CREATE FUNCTION public.clock_timestamp() RETURNS timestamptz LANGUAGE sql VOLATILE AS \
         $$ SELECT pg_catalog.clock_timestamp() + make_interval(secs => (SELECT seconds FROM public.clock_offset)) $$",
    ] {
        plain.execute(sql).await;
    }
    let db = TestDb::on_server(&format!(
        "{}?options=-c%20search_path%3Dpublic%2Cpg_catalog",
        plain.url
    ))
    .await;
    let marker = db.scratch.join("first-try");
    let config = |host: &str, reap: &str| {
        format!(
            "host_id: {host}\nheartbeat_interval: 1s\nkill_grace: 1s\nlease_timeout: 4s\nreap_interval: {reap}\n{}",
            first_try_hangs(&marker)
        )
    };
    // The holder reaps only at its start: every later pass is the other's.
    let mut holder = Daemon::start(&db, "a", &config("host-a", "1h"));
    let id = db.enqueue("Once", None).await;
    let first_try = db.wait_for_pid(id, WAIT).await.pid.unwrap();
    let mut reaper = Daemon::start(&db, "b", &config("host-b", "1s"));
    // A pass of the other daemon's reaper by the old clock first: it reaps
    // a row of a daemon long gone.
    let gone = db
        .insert_row(NewRow::new("NoOp").running(
            Backend::Postgres,
            "host-gone",
            "host-gone:1:1:gone",
            "gone-token",
            999_999,
            60,
        ))
        .await;
    db.wait_for(gone, WAIT, "the gone daemon's row reaped", |row| {
        row.result.as_deref() != Some("RUNNING")
    })
    .await;
    plain.execute("UPDATE clock_offset SET seconds = 120").await;
    holds_for(
        Duration::from_secs(8),
        "the living daemon's try to keep its row",
        async || {
            let row = db.row(id).await;
            match (row.result.as_deref(), row.tries, row.pid) {
                (Some("RUNNING"), 1, Some(pid)) if pid == first_try => Ok(()),
                _ => Err(format!("{row:?}")),
            }
        },
    )
    .await;
    assert!(
        reaper.log_text().contains("the database's clock jumped"),
        "{}",
        reaper.log_text()
    );
    assert!(holder.stop().success(), "{}", holder.log_text());
    assert!(reaper.stop().success());
}

both_backends!(a_fencing_watchdog_runs_beside_each_multi_host_daemon_and_goes_with_it);

/// On PostgreSQL and MariaDB a daemon runs its fencing watchdog (a child
/// process, `taskrunnerd --fencing-watchdog`); on SQLite, where it does not
/// fence itself, none. A watchdog killed is replaced, with one log line,
/// and the daemon runs rows on; a SIGTERM (a service manager's stop of the
/// whole unit) does not end it; the daemon killed -9 takes it along.
async fn a_fencing_watchdog_runs_beside_each_multi_host_daemon_and_goes_with_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(&db, "d", "heartbeat_interval: 1s\n");
    let id = db.enqueue("NoOp", None).await;
    db.wait_for_state(id, "FINISHED", WAIT).await;
    if backend == Backend::Sqlite {
        assert_eq!(watchdogs_of(daemon.pid()), Vec::<i32>::new());
        assert!(daemon.stop().success());
        return;
    }
    let first = watchdogs_of(daemon.pid());
    assert_eq!(first.len(), 1, "one watchdog: {first:?}");
    let first = first[0];
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    let mut second = Vec::new();
    wait_until(Duration::from_secs(10), "a new watchdog", || {
        second = watchdogs_of(daemon.pid());
        second.len() == 1 && second[0] != first
    });
    let second = second[0];
    daemon.wait_for_log(
        &format!(
            "the fencing watchdog (pid {first}) ended (signal: 9 (SIGKILL)): starting a new one"
        ),
        Duration::from_secs(5),
    );
    let id = db.enqueue("NoOp", None).await;
    db.wait_for_state(id, "FINISHED", WAIT).await;
    kill(Pid::from_raw(second), Signal::SIGTERM).unwrap();
    holds_for(
        Duration::from_secs(1),
        "the watchdog to ignore SIGTERM",
        async || match watchdogs_of(daemon.pid()).as_slice() {
            [only] if *only == second => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    daemon.kill();
    wait_until(
        Duration::from_secs(10),
        "the watchdog to die with its daemon",
        || !process_exists(second),
    );
}

/// A watchdog whose daemon died before it ran (a daemon killed, or failing
/// at start, just after it started its watchdog) has another parent: init,
/// a subreaper, here a shell. It took that parent for its daemon, found
/// its pipe closed, and killed every child of it with its group: as root
/// under systemd, every service's main process. It now ends at once,
/// killing nothing, when its parent is not the daemon it was started for.
#[test]
fn a_watchdog_whose_daemon_died_before_it_ran_kills_nothing() {
    let scratch = crate::util::Scratch::new("orphan-watchdog");
    let sibling = scratch.join("sibling");
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "sleep 60 & echo $! > {}; {} --fencing-watchdog 999999999 < /dev/null",
            sibling.display(),
            crate::util::DAEMON
        ))
        .status()
        .unwrap();
    let sibling = read_pid_file(&sibling);
    let _guard = KillOnDrop(sibling);
    assert!(
        process_exists(sibling),
        "the watchdog killed a child of a process that is not its daemon"
    );
    assert!(!status.success(), "{status:?}");
}

multi_host_backends!(a_killed_daemons_tries_that_outlive_its_death_signal_die_with_it);

/// `kill -9` of a daemon (PostgreSQL, MariaDB) that nothing restarts, on a
/// host that stays up: once its lease lapses, another host's daemon runs
/// its rows again. A task's parent-death signal kills only the task's own
/// process, and only while it keeps its credentials: a child the task
/// started in its process group, and a task that changed its user
/// (`setpriv` here; a set-user-ID program, `su`), ran on beside their rows'
/// reruns. Now the fencing watchdog, which outlives the daemon, kills the
/// tries it saw, with their groups, as the daemon dies (the set-user
/// task needs root to start; without, only the child is checked).
async fn a_killed_daemons_tries_that_outlive_its_death_signal_die_with_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let child_file = db.scratch.join("child");
    let mut tasks = format!(
        "tasks:\n  Forks:\n    command: [/bin/sh, -c, 'sleep 60 & echo $! > {}; wait']\n",
        child_file.display()
    );
    let root = nix::unistd::geteuid().is_root();
    if root {
        tasks.push_str("  Setuid:\n    command: [setpriv, --reuid=65534, --regid=65534, --clear-groups, /bin/sleep, '60']\n");
    }
    let mut daemon = Daemon::start(&db, "d", &tasks);
    let mut tries = vec![db.enqueue("Forks", None).await];
    if root {
        tries.push(db.enqueue("Setuid", None).await);
    }
    let mut pinned = Vec::new();
    for id in tries {
        pinned.push(db.wait_for_pid(id, WAIT).await.pid.unwrap() as i32);
    }
    let child = read_pid_file(&child_file);
    let survivors: Vec<i32> = pinned[1..].iter().copied().chain([child]).collect();
    let _guards: Vec<KillOnDrop> = survivors.iter().map(|&pid| KillOnDrop(pid)).collect();
    let watchdog = match watchdogs_of(daemon.pid()).as_slice() {
        [one] => *one,
        other => panic!("one watchdog: {other:?}"),
    };
    wait_until(
        Duration::from_secs(10),
        "the watchdog to see the tries",
        || pinned.iter().all(|&pid| holds_a_pidfd_of(watchdog, pid)),
    );
    daemon.kill();
    wait_until(
        Duration::from_secs(10),
        "what outlived the parent-death signal to be killed",
        || !survivors.iter().any(|&pid| process_exists(pid)),
    );
    wait_until(Duration::from_secs(10), "the watchdog to end", || {
        !process_exists(watchdog)
    });
}

multi_host_backends!(a_daemon_paused_past_its_fencing_deadline_keeps_the_tries_still_its_own);

/// A daemon stopped past its self-fencing deadline (lease 10 s − heartbeat
/// 1 s − kill grace 3 s = 6 s after its last renewal), short of its
/// watchdog's (10 s − 1 s = 9 s), with no other daemon to take its rows
/// over. The fencing deadline and the next renewal are both due when it
/// resumes; it used to pick either at random, and by the deadline it
/// killed a try whose row was still its own. Now it renews first: the row
/// is still its own, and its try runs on to its end.
async fn a_daemon_paused_past_its_fencing_deadline_keeps_the_tries_still_its_own(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "heartbeat_interval: 1s\nkill_grace: 3s\nlease_timeout: 10s\ntasks:\n  Nap:\n    command: [/bin/sleep, '12']\n",
    );
    let id = db.enqueue("Nap", None).await;
    let task_pid = db.wait_for_pid(id, WAIT).await.pid.unwrap() as i32;
    kill(Pid::from_raw(daemon.pid()), Signal::SIGSTOP).unwrap();
    // The pause itself: past the fencing deadline, short of the lease.
    tokio::time::sleep(Duration::from_secs(7)).await;
    kill(Pid::from_raw(daemon.pid()), Signal::SIGCONT).unwrap();
    holds_for(
        Duration::from_secs(2),
        "the task to run on",
        async || match process_exists(task_pid) {
            true => Ok(()),
            false => Err(daemon.log_text()),
        },
    )
    .await;
    let log = daemon.log_text();
    assert!(
        log.contains("this daemon was not running (stopped? frozen?)"),
        "{log}"
    );
    assert!(log.contains("renewing now"), "{log}");
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}");
    assert!(daemon.stop().success());
}

multi_host_backends!(
    a_daemon_whose_renewals_fail_claims_nothing_until_one_succeeds,
    a_claim_answered_after_the_fence_starts_nothing_until_a_renewal_succeeds,
    a_renewal_that_failed_once_is_retried_before_the_fencing_deadline,
);

both_backends!(a_renewal_slower_than_its_interval_is_waited_for);

multi_host_backends!(an_application_lock_on_one_running_row_stops_only_its_try);

/// An application holds one running row locked (its own transaction on
/// the request's row) past the daemon's fencing deadline (lease 5 s −
/// kill grace 1 s − heartbeat 1 s = 3 s): the renewals pass that row over
/// and renew the others, and only its try is stopped before its lease
/// lapses (it runs again once the lock goes). Before, on MariaDB the
/// renewal waited for the lock, renewed nothing, and the daemon fenced
/// itself off at the deadline, killing every task it ran.
async fn an_application_lock_on_one_running_row_stops_only_its_try(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "heartbeat_interval: 1s\nkill_grace: 1s\nlease_timeout: 5s\ntasks:\n  \
         Locked:\n    command: [/bin/sh, -c, '[ \"$TASKRUNNER_TRY\" = 1 ] && exec sleep 60; exit 0']\n  \
         Free:\n    command: [/bin/sleep, '9']\n",
    );
    let locked = db.enqueue("Locked", None).await;
    let free = db.enqueue("Free", None).await;
    let locked_pid = db.wait_for_pid(locked, WAIT).await.pid.unwrap() as i32;
    let free_pid = db.wait_for_pid(free, WAIT).await.pid.unwrap() as i32;
    let held = db.hold_row(locked).await;
    wait_until(
        Duration::from_secs(10),
        "the locked row's try to stop",
        || !process_exists(locked_pid),
    );
    // Past the fencing deadline, the other try runs on.
    holds_for(
        Duration::from_secs(2),
        "the other try to run on",
        async || match process_exists(free_pid) {
            true => Ok(()),
            false => Err(daemon.log_text()),
        },
    )
    .await;
    held.release().await;
    let row = db.wait_for_state(free, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}");
    let row = db.wait_for_state(locked, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 2, "{row:?}");
    let log = daemon.log_text();
    assert!(!log.contains("no heartbeat renewal for"), "{log}");
    assert!(daemon.stop().success(), "{log}");
}

/// An application holds a lock a renewal needs for 3 s, three renewal
/// intervals (in life, a server under load that answers each renewal
/// late, or the locks of other daemons' transactions): each renewal waits
/// for it. The heartbeat gave a renewal up after one interval and tried
/// again: the database was logged as unavailable while it answered, and a
/// server that answered each renewal a little later than the interval
/// failed them all and fenced the daemon off. Now a renewal is waited for
/// until the fencing deadline (on PostgreSQL and MariaDB a second one is
/// sent beside it after an interval, in case its connection went silent).
async fn a_renewal_slower_than_its_interval_is_waited_for(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "lease_timeout: 10s\ntasks:\n  Nap:\n    command: [/bin/sleep, '30']\n",
    );
    let napping = db.insert_row(NewRow::new("Nap").try_limit(1)).await;
    let pid = db.wait_for_pid(napping, WAIT).await.pid.unwrap() as i32;
    // The lease marked old, then a lock that a renewal waits for, for
    // three intervals: PostgreSQL's renewal skips a locked row, but not a
    // locked table.
    db.execute(&format!(
        "UPDATE task_runner_requests SET heartbeat_at = '2000-01-01 00:00:00' WHERE id = {napping}"
    ))
    .await;
    if backend == Backend::Postgres {
        let held = db.hold_table("task_runner_requests").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        held.release().await;
    } else {
        let held = db.hold_row(napping).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        held.release().await;
    }
    db.wait_for_count(
        &format!(
            "SELECT count(*) FROM task_runner_requests WHERE id = {napping} AND heartbeat_at > '2001-01-01'"
        ),
        1,
        WAIT,
    )
    .await;
    let log = daemon.log_text();
    assert!(!log.contains("database unavailable"), "{log}");
    assert!(!log.contains("no heartbeat renewal for"), "{log}");
    assert!(process_exists(pid), "the task was killed: {log}");
    assert!(daemon.stop().success(), "{log}");
}

/// Inserts a row held by the daemon that holds `like`, which no try runs
/// and whose lease does not lapse within a test: every renewal renews it,
/// so that refused renewals (see [`renewal_refusal`]) keep failing once
/// the daemon's tries have ended (the heartbeat gives such a row back only
/// after renewals that succeed).
async fn held_without_a_try(db: &TestDb, like: RequestId) {
    let in_an_hour = match db.backend {
        Backend::Postgres => "CURRENT_TIMESTAMP + INTERVAL '1 hour'",
        _ => "CURRENT_TIMESTAMP + INTERVAL 1 HOUR",
    };
    db.execute(&format!(
        "INSERT INTO task_runner_requests \
           (task_class_name, result, claimed_by, claim_token, heartbeat_at, started_at, tries) \
         SELECT 'Nap', 'RUNNING', claimed_by, 'held-by-a-test', {in_an_hour}, CURRENT_TIMESTAMP, 1 \
           FROM task_runner_requests WHERE id = {like}"
    ))
    .await;
}

/// SQL that makes every lease renewal fail, as a trigger of the
/// application's kind would (a renewal changes only `heartbeat_at` of a
/// running row), and SQL that ends it.
fn renewal_refusal(backend: Backend) -> (Vec<&'static str>, &'static str) {
    match backend {
        Backend::Postgres => (
            vec![
                "CREATE FUNCTION refuse_renewals() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                   IF OLD.result = 'RUNNING' AND NEW.result = 'RUNNING' \
                      AND NEW.claim_token IS NOT DISTINCT FROM OLD.claim_token \
                      AND NEW.pid IS NOT DISTINCT FROM OLD.pid \
                      AND NEW.heartbeat_at IS DISTINCT FROM OLD.heartbeat_at THEN \
                     RAISE EXCEPTION 'lease renewals refused'; \
                   END IF; RETURN NEW; END $$",
                "CREATE TRIGGER refuse_renewals BEFORE UPDATE ON task_runner_requests \
                   FOR EACH ROW EXECUTE FUNCTION refuse_renewals()",
            ],
            "DROP TRIGGER refuse_renewals ON task_runner_requests",
        ),
        _ => (
            vec![
                "CREATE TRIGGER refuse_renewals BEFORE UPDATE ON task_runner_requests \
                   FOR EACH ROW BEGIN \
                     IF OLD.result = 'RUNNING' AND NEW.result = 'RUNNING' \
                        AND NEW.claim_token <=> OLD.claim_token AND NEW.pid <=> OLD.pid \
                        AND NOT (NEW.heartbeat_at <=> OLD.heartbeat_at) THEN \
                       SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'lease renewals refused'; \
                     END IF; \
                   END",
            ],
            "DROP TRIGGER refuse_renewals",
        ),
    }
}

/// One renewal failed (a moment's outage of writes) under the tests' lease
/// of 5 s with 1 s renewals and a 2 s `kill_grace`, whose fencing deadline
/// is 2 s after the last renewal: the retry came a second after the failed
/// renewal, a few milliseconds past that deadline, and the fence killed
/// every task although the database worked again (the suite's run of
/// `hardening::an_outage_of_writes_while_reads_work_is_logged_once_at_each_end`
/// saw a try so killed and run again). Now a retry comes after half the
/// time left before the deadline if that is less than a second.
async fn a_renewal_that_failed_once_is_retried_before_the_fencing_deadline(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "tasks:\n  Nap:\n    command: [/bin/sleep, '30']\n",
    );
    let napping = db.insert_row(NewRow::new("Nap").try_limit(1)).await;
    let pid = db.wait_for_pid(napping, WAIT).await.pid.unwrap() as i32;
    let (refuse, allow) = renewal_refusal(backend);
    for statement in refuse {
        db.execute(statement).await;
    }
    daemon.wait_for_log(
        "database unavailable while renewing heartbeats",
        Duration::from_secs(10),
    );
    db.execute(allow).await;
    daemon.wait_for_log("database available again", Duration::from_secs(10));
    let log = daemon.log_text();
    assert!(!log.contains("no heartbeat renewal for"), "{log}");
    assert!(process_exists(pid), "the task was killed: {log}");
    let row = db.row(napping).await;
    assert_eq!(
        (row.result.as_deref(), row.tries),
        (Some("RUNNING"), 1),
        "{row:?}"
    );
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

/// The server refuses the daemon's lease renewals while it takes its claims
/// (here a trigger of the application's kind, with a row held by the daemon
/// that keeps every renewal failing; in life a slow server that answers a
/// claim within `lease_timeout` but no renewal within `heartbeat_interval`).
/// The daemon fences itself off at its deadline, killing its try, and its
/// watchdog's deadline passes a second later. It then claimed on, and a
/// try it started ran with a lease no renewal covered, killed by nothing:
/// once the lease lapsed another daemon would run that row too. Now a
/// fenced daemon claims nothing until a renewal succeeds, and then at once.
async fn a_daemon_whose_renewals_fail_claims_nothing_until_one_succeeds(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "heartbeat_interval: 1s\nkill_grace: 1s\nlease_timeout: 6s\ntasks:\n  Nap:\n    command: [/bin/sleep, '30']\n",
    );
    let napping = db.insert_row(NewRow::new("Nap").try_limit(1)).await;
    db.wait_for_pid(napping, WAIT).await;
    held_without_a_try(&db, napping).await;
    let (refuse, allow) = renewal_refusal(backend);
    for statement in refuse {
        db.execute(statement).await;
    }
    daemon.wait_for_log(
        "killing this daemon's tasks before their lease lapses",
        Duration::from_secs(20),
    );
    let row = db.wait_for_state(napping, "CRASHED", WAIT).await;
    assert!(row.result_text.unwrap().contains("lost its claim"));
    // Past the watchdog's deadline (6 s − 1 s after the last renewal) too.
    let later = db.enqueue("NoOp", None).await;
    holds_for(
        Duration::from_secs(7),
        "the fenced daemon to claim nothing",
        async || match db.row(later).await {
            row if row.result.is_none() => Ok(()),
            row => Err(format!("{row:?}")),
        },
    )
    .await;
    db.execute(allow).await;
    let row = db
        .wait_for_state(later, "FINISHED", Duration::from_secs(10))
        .await;
    assert_eq!(row.tries, 1);
    let log = daemon.log_text();
    assert!(
        log.contains("no new claims until a renewal succeeds"),
        "{log}"
    );
    assert!(
        log.contains("heartbeats renewed again: claiming resumes"),
        "{log}"
    );
    // It ran all along: its last retry before the deadline, run just after
    // it, took it for a daemon that had not run ("stopped? frozen?").
    assert!(!log.contains("was not running"), "{log}");
    assert!(daemon.stop().success(), "{log}");
}

/// A claim sent before the daemon fenced itself off came back after the
/// fence (here the read of the pauses that comes before a claim waits for
/// a lock the test holds past the fence; in life a slow server that
/// answers a claim within `lease_timeout` but no renewal in time). The
/// scheduler had looked at the fence before it: the claimed row's try
/// started, with a lease no renewal covered, and nothing but the watchdog's
/// deadline, if it still ran then, would stop it before another daemon
/// reran the row. Now a try registered while the daemon is fenced off is
/// given back before it starts, its try not counted, and runs once a
/// renewal succeeds.
async fn a_claim_answered_after_the_fence_starts_nothing_until_a_renewal_succeeds(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let marker = db.scratch.join("started");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "heartbeat_interval: 1s\nkill_grace: 3s\nlease_timeout: 10s\ntasks:\n  Nap:\n    command: [/bin/sleep, '30']\n  Mark:\n    command: [/bin/touch, {}]\n",
            marker.display()
        ),
    );
    let napping = db.insert_row(NewRow::new("Nap").try_limit(1)).await;
    db.wait_for_pid(napping, WAIT).await;
    held_without_a_try(&db, napping).await;
    let (refuse, allow) = renewal_refusal(backend);
    for statement in refuse {
        db.execute(statement).await;
    }
    daemon.wait_for_log(
        "database unavailable while renewing heartbeats",
        Duration::from_secs(10),
    );
    // The scheduler reads the pauses before a claim when its last reading
    // is a second old (it polls each second while it has a free slot):
    // that read now waits, for up to `lease_timeout`, sent before the
    // fence (6 s after the last renewal).
    let pauses = db.hold_table("task_runner_pauses").await;
    // The row once the scheduler waits in that read (before, a read less
    // than a second old let the row's claim through at once).
    let waiting_for_the_lock = match backend {
        Backend::Postgres => {
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
               AND application_name = 'taskrunner' AND query LIKE '%task_runner_pauses%'"
        }
        _ => {
            "SELECT count(*) FROM information_schema.processlist \
              WHERE state = 'Waiting for table metadata lock' AND info LIKE '%task_runner_pauses%'"
        }
    };
    db.wait_for_count(waiting_for_the_lock, 1, WAIT).await;
    let marked = db.enqueue("Mark", None).await;
    daemon.wait_for_log(
        "killing this daemon's tasks before their lease lapses",
        Duration::from_secs(20),
    );
    assert_eq!(
        db.row(marked).await.result,
        None,
        "claimed before the fence"
    );
    pauses.release().await;
    let given_back = poll(
        WAIT,
        "the row claimed after the fence given back",
        async || match db.row(marked).await {
            _ if marker.exists() => panic!("its task started while the daemon was fenced off"),
            row if row
                .result_text
                .as_deref()
                .is_some_and(|text| text.contains("given back before it started")) =>
            {
                Ok(row)
            }
            row => Err(row),
        },
    )
    .await;
    assert_eq!(given_back.tries, 0, "{given_back:?}");
    // Past the watchdog's deadline, and the daemon's next claims: nothing started.
    holds_for(
        Duration::from_secs(4),
        "the fenced daemon to start nothing",
        async || match marker.exists() {
            false => Ok(()),
            true => Err("the task started"),
        },
    )
    .await;
    db.execute(allow).await;
    let row = db.wait_for_state(marked, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}");
    assert!(marker.exists());
    let log = daemon.log_text();
    assert!(daemon.stop().success(), "{log}");
}

multi_host_backends!(a_tight_lease_does_not_fence_off_a_daemon_whose_renewals_succeed);

/// A lease of 8 s with renewals every 4 s and a kill grace of 1 s is a
/// valid config (the lease exceeds the interval and the grace). The fencing
/// deadline was `lease − interval − grace` after each renewal, 3 s: before
/// the next renewal was due, so every task still running 3 s after a
/// renewal was killed, on a daemon whose renewals all succeeded. Now the
/// margin shrinks with the room the lease leaves (6.5 s after a renewal
/// here), and a task of 9 s runs to its end.
async fn a_tight_lease_does_not_fence_off_a_daemon_whose_renewals_succeed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "heartbeat_interval: 4s\nkill_grace: 1s\nlease_timeout: 8s\ntasks:\n  Nap:\n    command: [/bin/sleep, '9']\n",
    );
    let id = db.insert_row(NewRow::new("Nap").try_limit(1)).await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}");
    let log = daemon.log_text();
    assert!(!log.contains("no heartbeat renewal"), "{log}");
    assert!(daemon.stop().success(), "{log}");
}

multi_host_backends!(an_outage_that_ends_before_the_fencing_deadline_costs_no_task);

// The database goes away right after a lease renewal and comes back after
// the first failed renewal ended, two seconds before the self-fencing
// deadline. Renewals: t0, then one at 4 s that waits (bounded by the
// interval) for the server until 8 s; the deadline is 15 − 4 − 1 = 10 s
// after t0. A failed renewal is tried again a second later, so the try made
// at 9 s renews the lease and the task runs on. (With a whole interval
// between tries the next was due at 12 s: the daemon killed its task at
// 10 s, for an outage that was over.)
async fn an_outage_that_ends_before_the_fencing_deadline_costs_no_task(backend: Backend) {
    let mut server = PrivateServer::start(backend);
    let db = server.test_db().await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "heartbeat_interval: 4s\nkill_grace: 1s\nlease_timeout: 15s\ntasks:\n  Nap:\n    command: [/bin/sleep, '21']\n",
    );
    // The task outlives what the test watches (13 s after a renewal, which
    // comes within an interval of its start) by 4 s.
    let id = db.enqueue("Nap", None).await;
    let task_pid = db.wait_for_pid(id, WAIT).await.pid.unwrap() as i32;
    // The daemon's own row, which it writes once the renewal of its rows
    // has come back: the request row's heartbeat_at is visible as soon as
    // the renewal commits, and the server stopped then lost its answer
    // (seen once on MariaDB: the daemon's deadline ran from the renewal
    // before, and it killed its task).
    let heartbeat_ms = match backend {
        Backend::MySql => {
            "SELECT CAST(UNIX_TIMESTAMP(max(heartbeat_at)) * 1000 AS SIGNED) FROM task_runner_daemons"
        }
        _ => "SELECT (extract(epoch FROM max(heartbeat_at)) * 1000)::bigint FROM task_runner_daemons",
    };
    let before = db.scalar(heartbeat_ms).await;
    poll_every(
        Duration::from_millis(20),
        Duration::from_secs(10),
        "a lease renewal",
        async || match db.scalar(heartbeat_ms).await {
            seen if seen == before => Err(seen),
            _ => Ok(()),
        },
    )
    .await;
    let renewed = Instant::now();
    server.stop();
    tokio::time::sleep_until((renewed + Duration::from_millis(8300)).into()).await;
    server.start_again();
    println!(
        "the database was back {:.1}s after the last renewal (self-fencing deadline: 10 s)",
        renewed.elapsed().as_secs_f64()
    );
    // Past the deadline, and past the renewal due a whole interval later.
    holds_for(
        (renewed + Duration::from_secs(13)).saturating_duration_since(Instant::now()),
        "the task to run on, its outage over before the deadline",
        async || match process_exists(task_pid) {
            true => Ok(()),
            false => Err(daemon.log_text()),
        },
    )
    .await;
    let log = daemon.log_text();
    assert!(!log.contains("no heartbeat renewal"), "{log}");
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1);
    assert!(daemon.stop().success());
}

multi_host_backends!(a_daemon_told_to_stop_while_its_database_does_not_answer_exits_soon);

// The database stops answering (its server stopped with SIGSTOP: every
// statement waits for ever, as behind a network that drops packets) while
// the daemon's services poll it often; then the daemon is told to stop. It
// exits, and soon: its services and its last writes give up on the
// database after a few seconds each. (It used to wait for ever for the
// write that marks it stopped in task_runner_daemons.)
async fn a_daemon_told_to_stop_while_its_database_does_not_answer_exits_soon(backend: Backend) {
    let server = PrivateServer::start(backend);
    let db = server.test_db().await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "heartbeat_interval: 200ms\nreap_interval: 200ms\npoll_interval: 100ms\ntasks:\n  Short:\n    command: [/bin/true]\n",
    );
    let id = db.enqueue("Short", None).await;
    db.wait_for(id, WAIT, "finished", |r| {
        r.result.as_deref() == Some("FINISHED")
    })
    .await;
    let frozen = server.freeze();
    // The services' next calls are on their way, and will wait.
    wait_until(
        Duration::from_secs(10),
        "a statement to wait for the stopped server",
        || server.has_unread_requests(),
    );
    daemon.signal(Signal::SIGTERM);
    let asked = Instant::now();
    let status = daemon.wait_exit(Duration::from_secs(40));
    let took = asked.elapsed();
    drop(frozen);
    println!(
        "stopped {:.1}s after SIGTERM, its database not answering",
        took.as_secs_f64()
    );
    assert!(status.success(), "{}", daemon.log_text());
    assert!(
        took < Duration::from_secs(20),
        "stopped in {took:?}: {}",
        daemon.log_text()
    );
    assert!(daemon.log_text().contains("taskrunnerd stopped"));
}

multi_host_backends!(
    a_claim_whose_connection_went_silent_is_given_up_and_its_row_runs,
    an_outcome_whose_connection_went_silent_is_written_on_another,
    a_daemon_row_heartbeat_gone_silent_does_not_stop_the_lease_renewals,
    new_rows_start_without_waiting_for_the_poll_when_the_wakeup_connection_goes_silent,
    an_outage_of_the_delays_release_alone_ends_once_a_release_works,
    renewals_gone_silent_do_not_take_the_pool,
);

/// A daemon whose database connections all go through a proxy that, at
/// the first statement containing `needle`, goes silent on that
/// connection for good (forwards the statement, then nothing either way,
/// and keeps the connection open: a failover without a reset, a network
/// that drops packets). Its calls are bounded by `lease_timeout` (3 s).
async fn daemon_behind_a_silence(
    db: &TestDb,
    needle: &'static str,
    times: usize,
) -> (Daemon, Proxy) {
    let proxy = Proxy::start_repeated(&db.url, Fault::Silence(needle), times).await;
    let daemon = daemon_behind(
        db,
        &proxy,
        "heartbeat_interval: 500ms\nkill_grace: 1s\nlease_timeout: 3s\npoll_interval: 500ms\n",
    );
    (daemon, proxy)
}

/// A daemon whose database connections go through `proxy`, with
/// `settings` and the task types `Short` and `Long`.
fn daemon_behind(db: &TestDb, proxy: &Proxy, settings: &str) -> Daemon {
    Daemon::start(
        db,
        "d",
        &format!(
            "database_url: {}\n{settings}tasks:\n  Short:\n    command: [/bin/true]\n  Long:\n    command: [/bin/sleep, '60']\n",
            proxy.url
        ),
    )
}

/// `first`, enqueued before the silence, and a row enqueued after it both
/// end FINISHED after one try, and the log names the call given up.
async fn rows_before_and_after_run_once(db: &TestDb, mut daemon: Daemon, first: RequestId) {
    let second = db.enqueue("Short", None).await;
    for id in [first, second] {
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        assert_eq!(row.tries, 1, "{row:#?}");
    }
    let log = daemon.log_text();
    assert!(log.contains("did not answer within 3s"), "{log}");
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

// The claim's statement reached the server and its answer never came
// back. The scheduler waited for it for ever (a kernel gives up on such a
// connection after about 15 minutes; behind the proxy, never), so that no
// row was claimed again while the daemon looked healthy. Now the call is
// given up after `lease_timeout`, its connection closed, and the claim
// made again on a new one; a row the lost claim took (PostgreSQL commits
// it; MariaDB rolls it back when the connection closes) is given back
// without counting a try. Five times in a row, more than the pool's four
// connections: a connection given up on must leave the pool (sqlx's own
// check of a returned connection would wait on it for ever).
async fn a_claim_whose_connection_went_silent_is_given_up_and_its_row_runs(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (daemon, proxy) = daemon_behind_a_silence(&db, "tries = tries + 1", 5).await;
    let first = db.enqueue("Short", None).await;
    wait_until(
        Duration::from_secs(90),
        "five claims' connections to go silent",
        || proxy.done(),
    );
    rows_before_and_after_run_once(&db, daemon, first).await;
}

// The same for the recorder: the write of an outcome waited for ever, and
// its row stayed RUNNING, renewed by a living daemon.
async fn an_outcome_whose_connection_went_silent_is_written_on_another(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (daemon, proxy) = daemon_behind_a_silence(&db, "tries - ", 1).await;
    let first = db.enqueue("Short", None).await;
    wait_until(WAIT, "the outcome's connection to go silent", || {
        proxy.tripped()
    });
    rows_before_and_after_run_once(&db, daemon, first).await;
}

// The heartbeat renews the leases of the daemon's rows, then writes the
// daemon's own row in task_runner_daemons. That second write had no bound:
// gone silent, it held the heartbeat for ever, so that leases lapsed under
// running tasks and the daemon never fenced itself off (another daemon
// could take such a row over while its task ran). A cancel, which the
// heartbeat reads, shows whether it still runs.
async fn a_daemon_row_heartbeat_gone_silent_does_not_stop_the_lease_renewals(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (mut daemon, proxy) =
        daemon_behind_a_silence(&db, "task_runner_daemons SET heartbeat_at", 1).await;
    let id = db.enqueue("Long", None).await;
    db.wait_for_pid(id, WAIT).await;
    wait_until(WAIT, "the daemon row's heartbeat to go silent", || {
        proxy.tripped()
    });
    db.execute(&format!(
        "UPDATE task_runner_requests SET cancel_requested_at = created_at WHERE id = {id}"
    ))
    .await;
    let row = db.wait_for_state(id, "CANCELLED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:#?}");
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

// The connection that tells the daemon of new rows goes silent: on
// PostgreSQL its LISTEN, on MariaDB its check for new rows (as after a
// failover to another server with no reset of the old one's connections,
// or behind a network that drops packets). Either waited for ever, so that
// new rows waited for the poll (here a minute) instead of starting at
// once. Now either is given up after `lease_timeout` and made again on a
// new connection; and the LISTEN connection, once listening, is asked every
// 10 s whether it still answers.
async fn new_rows_start_without_waiting_for_the_poll_when_the_wakeup_connection_goes_silent(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let needle = match backend {
        Backend::Postgres => "LISTEN",
        _ => "max(id) FROM task_runner_flows",
    };
    let proxy = Proxy::start(&db.url, Fault::Silence(needle)).await;
    let mut daemon = daemon_behind(
        &db,
        &proxy,
        "heartbeat_interval: 500ms\nkill_grace: 1s\nlease_timeout: 3s\npoll_interval: 60s\n",
    );
    wait_until(WAIT, "the wake-up connection to go silent", || {
        proxy.tripped()
    });
    // The scheduler's first pass is over (it claimed nothing): from now on
    // only a wake-up or the poll starts a row.
    let config = daemon.config.to_string_lossy().into_owned();
    wait_until(WAIT, "the scheduler to wait for its next poll", || {
        let (code, out, _) = cli(&db, &["--config", &config, "status", "--json"]);
        code == 0
            && serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|status| {
                status["next_poll_in_seconds"]
                    .as_f64()
                    .is_some_and(|next| next > 30.0)
            })
    });
    a_new_row_runs_once(&db, "the wake-up connection went silent", WAIT).await;
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

// The release of delayed rows failed (here its connection went silent at
// the daemon's start; in CI's run of the restart test above, the server
// went away in the 200 ms between a claim that filled every slot and the
// release it made due). A failed release waited for the next claim to ask
// for one, which a daemon with no delayed rows and no full claim never did:
// the outage that began with it never ended, in the log ("database
// available again" never came) or in `status` (an outage for ever, failing
// "releasing delayed requests"). Now a failed release is tried again after
// its backoff.
async fn an_outage_of_the_delays_release_alone_ends_once_a_release_works(backend: Backend) {
    let db = TestDb::new(backend).await;
    let needle = match backend {
        Backend::MySql => "ORDER BY waiting_until LIMIT",
        _ => "ORDER BY delay_until LIMIT",
    };
    let (mut daemon, proxy) = daemon_behind_a_silence(&db, needle, 1).await;
    wait_until(WAIT, "the release's connection to go silent", || {
        proxy.tripped()
    });
    daemon.wait_for_log(
        "database unavailable while releasing delayed requests",
        WAIT,
    );
    daemon.wait_for_log("database available again", Duration::from_secs(10));
    let config = daemon.config.to_string_lossy().into_owned();
    let (code, out, err) = cli(&db, &["--config", &config, "status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(status["outage"].is_null(), "{out}");
    a_new_row_runs_once(&db, "the release's outage ended", WAIT).await;
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

// The lease renewal's statement went silent (a failover without a reset).
// The heartbeat gave it up after its interval, but dropped it unmarked, so
// that its connection went back to the pool to be checked by sqlx with no
// bound: a wait for ever that held one of the pool's four places. Four such
// renewals took the whole pool, and the daemon, on a database that worked,
// never renewed, claimed or recorded again ("pool timed out"). Now the
// heartbeat marks a statement it gives up, as every bounded call does, and
// the connection is closed instead.
async fn renewals_gone_silent_do_not_take_the_pool(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (mut daemon, proxy) = daemon_behind_a_silence(&db, renewal_needle(backend), 5).await;
    wait_until(
        Duration::from_secs(60),
        "five renewals' connections to go silent",
        || proxy.done(),
    );
    a_new_row_runs_once(&db, "the fifth renewal went silent", WAIT).await;
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

multi_host_backends!(a_renewal_whose_connection_went_silent_is_sent_again_beside_it);

/// A lease renewal's connection goes silent (a failover without a reset).
/// The heartbeat gave the renewal up after an interval, logged the
/// database as unavailable, and tried again a second later. Now a second
/// renewal is sent beside the first after an interval, on another
/// connection, and renews the leases: no outage, and no task killed.
async fn a_renewal_whose_connection_went_silent_is_sent_again_beside_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let proxy = Proxy::start(&db.url, Fault::Silence(renewal_needle(backend))).await;
    let mut daemon = daemon_behind(
        &db,
        &proxy,
        "heartbeat_interval: 1s\nkill_grace: 1s\nlease_timeout: 10s\n",
    );
    let id = db.enqueue("Long", None).await;
    let pid = db.wait_for_pid(id, WAIT).await.pid.unwrap() as i32;
    wait_until(WAIT, "a renewal's connection to go silent", || proxy.done());
    daemon.wait_for_log("another one sent beside it", Duration::from_secs(10));
    a_new_row_runs_once(&db, "the renewal went silent", WAIT).await;
    let log = daemon.log_text();
    assert!(!log.contains("database unavailable"), "{log}");
    assert!(process_exists(pid), "the task was killed: {log}");
    assert!(daemon.stop().success(), "{log}");
}

/// Text of the lease renewal's statement, the first one on MariaDB/MySQL
/// (which reads the rows no other session holds locked, then updates
/// those; with no row held, only the first is sent).
fn renewal_needle(backend: Backend) -> &'static str {
    match backend {
        Backend::MySql => "claimed_by = ? AND result = 'RUNNING' FOR UPDATE SKIP LOCKED",
        Backend::Sqlite | Backend::Postgres => "task_runner_requests SET heartbeat_at",
    }
}

/// Enqueues a `Short` row, waits up to `wait` for it to finish in its
/// first try, and says how long that took after `event`.
async fn a_new_row_runs_once(db: &TestDb, event: &str, wait: Duration) -> Duration {
    let since = Instant::now();
    let id = db.enqueue("Short", None).await;
    let row = db.wait_for_state(id, "FINISHED", wait).await;
    let took = since.elapsed();
    println!(
        "the row inserted after {event} ran {:.1}s later",
        took.as_secs_f64()
    );
    assert_eq!(row.tries, 1, "{row:#?}");
    took
}

/// Waits until `daemon` has sent no statement of its own work for
/// `quiet` (its status's count of them stays the same).
fn sends_nothing_for(daemon: &Daemon, db: &TestDb, quiet: Duration) {
    let config = daemon.config.to_string_lossy().into_owned();
    let mut last: Option<(u64, Instant)> = None;
    let what = format!("the daemon to send nothing for {:.1}s", quiet.as_secs_f64());
    // Asked again at once: two answers must come within `quiet` of each
    // other, under load too.
    poll_blocking_every(Duration::from_millis(1), WAIT, &what, || {
        let (code, out, err) = cli(db, &["--config", &config, "status", "--json"]);
        let Some(sent) = (code == 0)
            .then(|| serde_json::from_str::<serde_json::Value>(&out).ok())
            .flatten()
            .and_then(|status| status["database_statements"].as_u64())
        else {
            return Err(format!("no status: {err}"));
        };
        match last {
            Some((before, since)) if before == sent && since.elapsed() >= quiet => Ok(()),
            Some((before, _)) if before == sent => Err(format!("{sent} statements")),
            _ => {
                last = Some((sent, Instant::now()));
                Err(format!("{sent} statements"))
            }
        }
    });
}

multi_host_backends!(idle_connections_gone_silent_in_a_failover_are_replaced_without_pool_timeouts);

/// The database fails over to another server and nothing resets the old
/// one's connections: every connection the daemon's pool holds idle goes
/// silent. sqlx's own check of an idle connection before it hands it out,
/// a ping with no bound but the acquire's 5 s, made each of them a "pool
/// timed out" error, an outage logged, a backoff and a retry. Now each is
/// pinged with a bound of its own, closed when it does not answer, and the
/// acquire goes on with a new connection.
async fn idle_connections_gone_silent_in_a_failover_are_replaced_without_pool_timeouts(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let proxy = Proxy::transparent(&db.url).await;
    let mut daemon = daemon_behind(
        &db,
        &proxy,
        "max_concurrent: 4\nheartbeat_interval: 10s\nkill_grace: 1s\nlease_timeout: 12s\npoll_interval: 1s\n",
    );
    // Several of the pool's connections in use, then idle: their last
    // statements answered and their returns to the pool done. (A return
    // runs sqlx's own check of the connection, a ping with no bound: one
    // under way at the failover waits for ever, and holds its place in the
    // pool; seen in the suite, where the failover came as the last
    // outcome's connection went back. Not in the daemon's hands: sqlx
    // pings every connection coming back, after the daemon's own check.)
    db.insert_rows(vec![NewRow::new("Short"); 12]).await;
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'",
        12,
        WAIT,
    )
    .await;
    // (Shorter than MariaDB's check for new rows, every 100 ms.)
    sends_nothing_for(&daemon, &db, Duration::from_millis(50));
    proxy.fail_over();
    a_new_row_runs_once(&db, "the failover", WAIT).await;
    let log = daemon.log_text();
    assert!(!log.contains("pool timed out"), "{log}");
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

/// PostgreSQL's LISTEN connection, once listening, goes silent with every
/// other connection the daemon holds: the database failed over to another
/// server and nothing reset the old one's connections. No notification
/// came any more and nothing reported an error, so that new rows waited for
/// the poll (here two minutes). Now the LISTEN connection is pinged every
/// 10 s and, silent for 5 s, replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_connection_gone_silent_after_a_failover_is_replaced() {
    let db = TestDb::new(Backend::Postgres).await;
    let proxy = Proxy::transparent(&db.url).await;
    let mut daemon = daemon_behind(
        &db,
        &proxy,
        "heartbeat_interval: 10s\nkill_grace: 1s\nlease_timeout: 12s\npoll_interval: 120s\nreap_interval: 120s\n",
    );
    db.wait_for_count(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'taskrunner' \
          AND state = 'idle' AND query LIKE 'LISTEN%'",
        1,
        WAIT,
    )
    .await;
    // Nothing under way: no statement sent for a second (the scheduler has
    // made its passes and waits for the poll or a notification).
    sends_nothing_for(&daemon, &db, Duration::from_secs(1));
    proxy.fail_over();
    let took = a_new_row_runs_once(&db, "the failover", Duration::from_secs(90)).await;
    assert!(took < Duration::from_secs(60), "{}", daemon.log_text());
    // That row may have been claimed when a lease renewal succeeded again
    // (a daemon fenced off claims nothing until then, and claims at once
    // then): the new LISTEN connection must wake the daemon by itself.
    daemon.wait_for_log("the LISTEN connection failed its check", WAIT);
    let took = a_new_row_runs_once(&db, "the LISTEN replaced", Duration::from_secs(90)).await;
    assert!(took < Duration::from_secs(10), "{}", daemon.log_text());
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_held_locked_delays_outcomes_without_losing_them() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "max_concurrent: 4\ntasks:\n  Nap:\n    command: [/bin/sleep, '1']\n",
    );
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(db.enqueue("Nap", None).await);
    }
    for id in &ids {
        db.wait_for_pid(*id, WAIT).await;
    }
    // Another process holds the write lock for longer than busy_timeout (5s).
    use sqlx::Connection;
    let mut blocker = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN EXCLUSIVE")
        .execute(&mut blocker)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await.unwrap();
    for id in &ids {
        let row = db.wait_for_state(*id, "FINISHED", WAIT).await;
        assert_eq!(row.tries, 1);
    }
    let log = daemon.log_text();
    assert!(log.matches("database unavailable").count() <= 2, "{log}");
    assert!(daemon.stop().success());
}

/// The tries a daemon's log says it killed because it no longer held (or
/// could no longer renew) their claim: request id, and the time of the log
/// line (nanoseconds since the epoch), written after the process died.
fn lost_claim_kills(log: &str) -> Vec<(i64, u128)> {
    log.lines()
        .filter(|line| line.contains("this daemon lost its claim on the row"))
        .filter_map(|line| {
            let at = chrono::DateTime::parse_from_rfc3339(line.split_whitespace().next()?).ok()?;
            let id = line
                .split("request=")
                .nth(1)?
                .split([' ', '}'])
                .next()?
                .parse()
                .ok()?;
            Some((id, u128::try_from(at.timestamp_nanos_opt()?).ok()?))
        })
        .collect()
}

/// When a daemon's fencing watchdog killed its task processes (the time of
/// the daemon's log line saying so, written after the kill), nanoseconds
/// since the epoch.
fn watchdog_kills(log: &str) -> Vec<u128> {
    log.lines()
        .filter(|line| line.contains("fencing watchdog: this daemon renewed no lease"))
        .filter_map(|line| {
            let at = chrono::DateTime::parse_from_rfc3339(line.split_whitespace().next()?).ok()?;
            u128::try_from(at.timestamp_nanos_opt()?).ok()
        })
        .collect()
}

multi_host_backends!(four_daemons_one_killed_halfway_through_two_thousand_tasks);

async fn four_daemons_one_killed_halfway_through_two_thousand_tasks(backend: Backend) {
    let db = TestDb::new(backend).await;
    let log = db.scratch.join("runs.log");
    let task = |host: &str| {
        format!(
            "host_id: {host}\nmax_concurrent: 4\nreap_interval: 1s\nlease_timeout: 8s\ntasks:\n  Work:\n    command: [/bin/sh, -c, 'echo start $TASKRUNNER_REQUEST_ID $(date +%s%N) {host} >> {log}; sleep 0.02; echo end $TASKRUNNER_REQUEST_ID $(date +%s%N) {host} >> {log}']\n",
            log = log.display()
        )
    };
    let mut daemons: Vec<Daemon> = (0..4)
        .map(|n| Daemon::start(&db, &format!("d{n}"), &task(&format!("host-{n}"))))
        .collect();
    db.insert_copies(NewRow::new("Work"), 2000).await;
    db.wait_for_count(
        "SELECT CAST(CASE WHEN count(*) >= 1000 THEN 1 ELSE 0 END AS BIGINT) FROM task_runner_requests WHERE result = 'FINISHED'",
        1,
        Duration::from_secs(240),
    )
    .await;
    daemons[1].signal(Signal::SIGKILL);
    let killed_at = now_ns();
    daemons[1].wait_exit(Duration::from_secs(5));
    let kill_started = Instant::now();
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FINISHED'",
        2000,
        Duration::from_secs(240),
    )
    .await;
    println!(
        "2000 tasks on four daemons, one killed -9 halfway: all finished {:.1}s after the kill",
        kill_started.elapsed().as_secs_f64()
    );
    // Every run of a row is over before the next one starts. A run ends
    // with its `end` line; or, without one, when its daemon was killed (the
    // parent-death signal is SIGKILL); or when its daemon killed it for a
    // claim it could not keep (under load a daemon may fail to renew its
    // leases in time and fence itself: its log names each such try, after
    // its process group was killed), or its fencing watchdog did (its log
    // says when). A run on a surviving daemon that ended in none of these
    // ways is a problem: when it ended is unknown.
    let mut runs: BTreeMap<i64, Vec<(u128, Option<u128>, String)>> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut fenced: BTreeMap<(i64, String), Vec<u128>> = BTreeMap::new();
    let mut watchdog: BTreeMap<String, Vec<u128>> = BTreeMap::new();
    for (n, daemon) in daemons.iter().enumerate() {
        let text = daemon.log_text();
        for (id, at) in lost_claim_kills(&text) {
            fenced
                .entry((id, format!("host-{n}")))
                .or_default()
                .push(at);
        }
        watchdog.insert(format!("host-{n}"), watchdog_kills(&text));
    }
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (Some(id), Some(at), [kind, _, _, host]) = (
            parts.get(1).and_then(|id| id.parse::<i64>().ok()),
            parts.get(2).and_then(|at| at.parse::<u128>().ok()),
            parts.as_slice(),
        ) else {
            problems.push(format!("a garbled log line: {line:?}"));
            continue;
        };
        let entry = runs.entry(id).or_default();
        if *kind == "start" {
            entry.push((at, None, host.to_string()));
        } else if let Some(open) = entry
            .iter_mut()
            .rev()
            .find(|(_, end, on)| end.is_none() && on == host)
        {
            open.1 = Some(at);
        } else {
            problems.push(format!("an end without its start: {line:?}"));
        }
    }
    if runs.len() != 2000 {
        problems.push(format!("{} rows ran, not 2000", runs.len()));
    }
    for ((id, host), kills) in fenced {
        let row_runs = runs.entry(id).or_default();
        for at in kills {
            if let Some(open) = row_runs
                .iter_mut()
                .filter(|(start, end, on)| end.is_none() && *on == host && *start <= at)
                .max_by_key(|(start, _, _)| *start)
            {
                open.1 = Some(at);
            }
        }
    }
    for (id, row_runs) in runs.iter_mut() {
        for run in row_runs
            .iter_mut()
            .filter(|(_, end, on)| end.is_none() && on != "host-1")
        {
            let killed = watchdog[&run.2].iter().find(|at| **at >= run.0);
            match killed {
                Some(at) => run.1 = Some(*at),
                None => problems.push(format!(
                    "request {id}'s run on the surviving {} has no end line, and no kill says why: {run:?}",
                    run.2
                )),
            }
        }
    }
    let mut reruns = 0;
    for (id, mut row_runs) in runs {
        row_runs.sort();
        reruns += row_runs.len() - 1;
        for pair in row_runs.windows(2) {
            // A run cut short by the kill of daemon 1 ended when it died.
            let previous_end = pair[0].1.unwrap_or(killed_at);
            if pair[1].0 < previous_end {
                problems.push(format!("request {id} ran twice at once: {row_runs:?}"));
            }
        }
        if row_runs.last().is_some_and(|last| last.1.is_none()) {
            problems.push(format!(
                "request {id}'s last run did not complete: {row_runs:?}"
            ));
        }
    }
    if !problems.is_empty() {
        let mut logs = String::new();
        for (n, daemon) in daemons.iter().enumerate() {
            let text = daemon.log_text();
            let notable: Vec<&str> = text
                .lines()
                .filter(|line| line.contains("WARN") || line.contains("ERROR"))
                .collect();
            logs.push_str(&format!(
                "--- d{n}: {} warnings and errors\n",
                notable.len()
            ));
            for line in notable.iter().take(40) {
                logs.push_str(line);
                logs.push('\n');
            }
        }
        panic!(
            "the kill test found {} problems (killed at {killed_at}):\n{}\n{logs}",
            problems.len(),
            problems
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    println!("{reruns} rows ran again after the kill");
    assert_eq!(
        db.scalar("SELECT count(*) FROM task_runner_requests WHERE result <> 'FINISHED'")
            .await,
        0
    );
    // Transactions InnoDB rolled back (deadlock, lock wait) and run again.
    let mut lock_retries = 0;
    for (n, daemon) in daemons.iter().enumerate() {
        if n != 1 {
            lock_retries += crate::util::lock_retries(daemon);
        }
    }
    println!("{backend:?}: {lock_retries} lock retries on the three surviving daemons");
    for (n, daemon) in daemons.iter_mut().enumerate() {
        if n != 1 {
            let status = daemon.stop();
            assert!(
                status.success(),
                "daemon d{n} stopped with {status}; log:\n{}",
                daemon.log_text()
            );
        }
    }
}

/// A small file system of its own (tmpfs) on a directory of its own,
/// mounted for one test, unmounted (lazily: the test's connections may
/// still hold its files) and removed when dropped. Mounting needs root; CI
/// runs as root.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(bytes: u64) -> SmallDisk {
        let path = std::env::temp_dir().join(format!(
            "taskrunner-test-small-disk-{}-{}",
            std::process::id(),
            now_ns()
        ));
        std::fs::create_dir_all(&path).unwrap();
        let disk = SmallDisk { path };
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&disk.path)
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "mount -t tmpfs on {}",
            disk.path.display()
        );
        disk
    }

    /// Writes a file until the file system has no byte left.
    fn fill(&self) {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.path.join("filler")).unwrap();
        for chunk in [65536, 4096, 1] {
            let bytes = vec![0u8; chunk];
            while filler.write_all(&bytes).is_ok() {}
        }
    }

    fn free(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The file system of an SQLite database fills up: the daemon's writes and
/// the CLI's fail with "database or disk is full". A full disk is an outage
/// like another: the CLI says so in one line and writes nothing; a task that
/// ends meanwhile keeps its result in memory until it can be written, claims
/// wait, the daemon neither panics nor gives up; once space is freed every
/// request runs to its end, each on one try. (A reader holding the
/// write-ahead log's start makes every write append to the log, so that
/// writes need new space: SQLite reuses a log's space once it was copied
/// back.) The daemon's line at the outage's start names the cause once
/// (before: twice, as sqlx's error chain repeats it). SQLite only: on the
/// servers a full disk is the server's error, an outage like those of the
/// tests above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_sqlite_costs_no_request_and_no_try() {
    use sqlx::Connection;
    if !crate::util::runs_as_root("mounting a small file system needs root") {
        return;
    }
    let disk = SmallDisk::mount(4 << 20);
    let scratch = crate::util::Scratch::new("sqlite-full-disk");
    let db = TestDb::sqlite_file(scratch, &disk.path.join("requests.db")).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "max_concurrent: 1\nlease_timeout: 60s\ntasks:\n  Nap:\n    command: [/bin/sleep, '1']\n",
    );
    let first = db.enqueue("Nap", None).await;
    let mut waiting = vec![db.enqueue("Nap", None).await];
    let pid = db
        .wait_for(first, WAIT, "the first task to run", |r| r.pid.is_some())
        .await
        .pid
        .unwrap() as i32;
    // A reader that holds the log: it wrote last, so its snapshot is in the
    // log, and the log cannot start over while it reads.
    let mut reader = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(
        "UPDATE task_runner_requests SET priority = priority; \
         BEGIN; SELECT count(*) FROM task_runner_requests;",
    )
    .execute(&mut reader)
    .await
    .unwrap();
    disk.fill();
    // The CLI's enqueue fails with one line and writes nothing. Should it
    // find room (the daemon's checkpoint came between the reader's write
    // and its read), its row is one more to run.
    let mut refused = String::new();
    wait_until(WAIT, "an enqueue refused for the full disk", || {
        let (code, out, err) = cli(&db, &["enqueue", "Nap"]);
        if code == 0 {
            waiting.push(RequestId(out.trim().parse().unwrap()));
            return false;
        }
        refused = err;
        true
    });
    assert!(refused.contains("disk is full"), "{refused}");
    assert_eq!(refused.trim().lines().count(), 1, "{refused}");
    wait_until(WAIT, "the first task to end", || !process_exists(pid));
    let config = daemon.config.display().to_string();
    wait_until(
        Duration::from_secs(60),
        "status to name claims and results among the failing",
        || {
            let (_, status, _) = cli(&db, &["--config", &config, "status"]);
            status.contains("claiming requests") && status.contains("recording task results")
        },
    );
    disk.free();
    sqlx::raw_sql("COMMIT").execute(&mut reader).await.unwrap();
    for id in std::iter::once(first).chain(waiting) {
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        assert_eq!(row.tries, 1, "{row:?}");
    }
    daemon.wait_for_log("database available again", WAIT);
    let log = daemon.log_text();
    let began = log
        .lines()
        .find(|line| line.contains("database unavailable"))
        .unwrap_or_else(|| panic!("no line for the outage's start:\n{log}"));
    // The cause once: sqlx's error repeats it in its own chain.
    assert_eq!(
        began.matches("database or disk is full").count(),
        1,
        "{began}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(daemon.stop().success());
}

/// The daemon's log is its stderr: a pipe wherever an init system, a
/// container runtime or a shell pipeline reads it. A reader that stops
/// reading (a journald that hangs, a blocking log driver, `taskrunnerd |
/// less` left at a page) filled the pipe, and the daemon's next log line
/// blocked its one runtime thread: no claim, no outcome, no heartbeat. Now
/// a line waits in a bounded queue that a thread of its own writes out;
/// past that, lines are dropped and counted, and the count is logged once
/// the reader reads again. Lines are never cut, and the last ones (the
/// stop) are written before the daemon exits.
async fn a_log_reader_that_stops_reading_does_not_stop_the_daemon(backend: Backend) {
    use std::io::Read;
    let db = TestDb::new(backend).await;
    let rows = 2000;
    db.insert_copies(NewRow::new("Fail").try_limit(1), rows as usize)
        .await;
    let config = db
        .daemon("d")
        .yaml(
            "max_concurrent: 4\ntasks:\n  Fail:\n    \
             command: [/bin/sh, -c, 'echo this try fails on purpose >&2; exit 1']\n",
        )
        .write_config();
    // Close-on-exec: no other test's child holds its end open.
    let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let mut reader = std::fs::File::from(reader);
    let mut daemon = std::process::Command::new(crate::util::DAEMON)
        .arg("--config")
        .arg(&config)
        .current_dir(config.parent().unwrap())
        .env("TASKRUNNER_LOG", "debug,sqlx=warn")
        .env_remove("DATABASE_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(writer)
        .spawn()
        .unwrap();
    let _kill = crate::util::KillOnDrop(daemon.id() as i32);
    // Nobody reads the log meanwhile: its pipe holds 64 KiB, a few dozen
    // tries' lines at the debug level (three lines a try here).
    db.wait_for_count(
        "SELECT count(*) FROM task_runner_requests WHERE result = 'FAILED'",
        rows,
        Duration::from_secs(60),
    )
    .await;
    let drained = std::thread::spawn(move || {
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        text
    });
    kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM).unwrap();
    let status = crate::util::poll_blocking(WAIT, "the daemon to exit", || {
        daemon.try_wait().unwrap().ok_or("running")
    });
    let log = drained.join().unwrap();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("log lines were dropped"), "{log}");
    assert!(log.trim_end().ends_with("taskrunnerd stopped"), "{log}");
    for line in log.lines() {
        assert!(line.starts_with("20"), "a whole line: {line:?}");
    }
}

/// Two daemons with one host id on one machine, one of them in a PID
/// namespace of its own: containers with the host's network (Docker's
/// `--network host`, Kubernetes' `hostNetwork`) share the host name and the
/// kernel's boot id. The other daemon's start-up reap took the first one's
/// running tries for its own host's, found their pids naming other
/// processes in its namespace (`pid 8 now names another process`), killed
/// them and ran them again. A pid means something only in its namespace,
/// which the identity of a try and of a daemon now names: such rows are
/// left to their daemon, and to their lease should it die.
async fn a_daemon_in_another_pid_namespace_with_the_same_host_id_keeps_its_tries(backend: Backend) {
    if !crate::util::runs_as_root("a PID namespace of its own needs root") {
        return;
    }
    let db = TestDb::new(backend).await;
    let ran = db.scratch.join("ran");
    let script = format!("echo $$ >> {}; sleep 6", ran.display());
    let contained = db
        .daemon("contained")
        .set("host_id", "shared")
        .shell_task("Long", &script)
        .own_pid_namespace()
        .start();
    let ids = [
        db.enqueue("Long", None).await,
        db.enqueue("Long", None).await,
    ];
    for id in ids {
        db.wait_for_pid(id, WAIT).await;
    }
    let started = Instant::now();
    let mut beside = db
        .daemon("beside")
        .set("host_id", "shared")
        .shell_task("Long", &script)
        .start();
    for id in ids {
        let row = db.wait_for_state(id, "FINISHED", WAIT).await;
        assert_eq!(row.tries, 1, "request {id} ran again: {row:#?}");
    }
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "the tries ended early"
    );
    let runs = std::fs::read_to_string(&ran).unwrap();
    assert_eq!(runs.lines().count(), 2, "{runs}");
    let log = beside.log_text();
    assert!(!log.contains("crashed:"), "{log}");
    assert!(beside.stop().success());
    drop(contained);
}

/// The daemon as PID 1 of a PID namespace: a container's command with no
/// init (`docker run` without `--init`). PID 1 is the parent of every
/// orphan there, and the daemon waits for its own tasks only: the
/// grandchildren killed at each try's end and the children a task left
/// behind stayed zombies (twelve after six tries here), until the
/// container's pids ran out. PID 1 is now a small init that runs the daemon
/// as its child, reaps every orphan, passes SIGTERM on (the drain) and
/// exits with the daemon's status.
async fn as_pid_1_the_daemon_leaves_no_zombies_and_drains_on_sigterm(backend: Backend) {
    if !crate::util::runs_as_root("a PID namespace of its own needs root") {
        return;
    }
    let db = TestDb::new(backend).await;
    let mut unshare = db
        .daemon("pid1")
        .shell_task("Background", "sleep 100 & sleep 100 & echo started")
        .shell_task("Orphan", "(sh -c 'sleep 0.2' &); echo ok")
        .shell_task("Slow", "sleep 2; echo slept")
        .own_pid_namespace()
        .start();
    let children = |pid: i32| -> Vec<i32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect()
    };
    let init = children(unshare.pid())[0];
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(db.enqueue("Background", None).await);
        ids.push(db.enqueue("Orphan", None).await);
    }
    for id in &ids {
        db.wait_for_state(*id, "FINISHED", WAIT).await;
    }
    // The orphans' sleeps end within 0.2 s; the killed ones are gone.
    wait_until(Duration::from_secs(10), "no zombie under PID 1", || {
        zombie_children(init).is_empty()
    });
    holds_for(
        Duration::from_secs(1),
        "no zombie under PID 1",
        async || match zombie_children(init) {
            zombies if zombies.is_empty() => Ok(()),
            zombies => Err(zombies),
        },
    )
    .await;
    // SIGTERM to PID 1 drains the daemon: the slow try ends FINISHED, and
    // PID 1 exits 0 with it.
    let slow = db.enqueue("Slow", None).await;
    db.wait_for_pid(slow, WAIT).await;
    kill(Pid::from_raw(init), Signal::SIGTERM).unwrap();
    let status = unshare.wait_exit(WAIT);
    assert!(status.success(), "{status:?}: {}", unshare.log_text());
    assert_eq!(db.row(slow).await.result.as_deref(), Some("FINISHED"));
}

/// Tries already being stopped, which their type gives a long
/// `kill_grace` (a timeout's `SIGTERM`, a user's cancel; the task ignores
/// `SIGTERM`), are killed at once when their row's lease is about to lapse
/// (PostgreSQL: an application holds the row locked). Before, a try being
/// stopped was left to its grace: the lease lapsed with the task running,
/// and another daemon could run the row beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_try_being_stopped_whose_row_stays_locked_is_killed_before_its_lease_lapses() {
    let db = TestDb::new(Backend::Postgres).await;
    let stubborn = "command: [/bin/sh, -c, \"trap '' TERM; sleep 60\"]\n    kill_grace: 60s\n";
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "heartbeat_interval: 2s\nlease_timeout: 12s\nkill_grace: 3s\n\
             tasks:\n  TimedOut:\n    {stubborn}    timeout: 1s\n  Cancelled:\n    {stubborn}"
        ),
    );
    let timed_out = db.insert_row(NewRow::new("TimedOut").try_limit(1)).await;
    let cancelled = db.insert_row(NewRow::new("Cancelled").try_limit(1)).await;
    let mut pids = Vec::new();
    for id in [timed_out, cancelled] {
        pids.push(db.wait_for_pid(id, WAIT).await.pid.unwrap() as i32);
    }
    let config = daemon.config.display().to_string();
    let (status, stdout, stderr) = cli(
        &db,
        &["--config", &config, "cancel", &cancelled.to_string()],
    );
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(stdout.contains("its daemon is stopping it"), "{stdout}");
    let held = [db.hold_row(timed_out).await, db.hold_row(cancelled).await];
    poll(
        Duration::from_secs(12),
        "the stubborn tasks killed within their lease (12s), not at their grace (60s)",
        async || {
            if pids.iter().any(|&pid| process_exists(pid)) {
                Err(Text(daemon.log_text()))
            } else {
                Ok(())
            }
        },
    )
    .await;
    for held in held {
        held.release().await;
    }
    for id in [timed_out, cancelled] {
        db.wait_for(id, WAIT, "the try's end", |row| {
            row.result
                .as_deref()
                .is_some_and(|result| result != "RUNNING")
        })
        .await;
    }
    assert_eq!(
        daemon
            .log_text()
            .matches("the row's lease was not renewed")
            .count(),
        2,
        "{}",
        daemon.log_text()
    );
    assert!(daemon.stop().success());
}

/// PostgreSQL: an application's table with a foreign key to the requests
/// (the README's way to keep a task's results) takes a `FOR KEY SHARE` lock
/// on the request row with each INSERT, until its transaction commits. The
/// renewal's `FOR UPDATE SKIP LOCKED` passed over such a row: a task that
/// wrote its results in one transaction longer than the fencing deadline
/// was killed (CRASHED, its try counted) at every try. The renewal takes
/// `FOR NO KEY UPDATE`, which such a lock does not hold up, as the
/// renewal's own UPDATE does not; the claims and releases too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_row_an_application_references_in_an_open_transaction_keeps_its_lease() {
    let db = TestDb::new(Backend::Postgres).await;
    db.execute("CREATE TABLE task_results (request_id bigint REFERENCES task_runner_requests(id))")
        .await;
    let gate = db.scratch.join("gate");
    let mut daemon = Daemon::start(
        &db,
        "d",
        &format!(
            "heartbeat_interval: 1s\nlease_timeout: 6s\nkill_grace: 1s\ntasks:\n  Gated:\n    command: [/bin/sh, -c, 'while [ ! -e {} ]; do sleep 0.05; done']\n",
            gate.display()
        ),
    );
    let id = db.insert_row(NewRow::new("Gated").try_limit(1)).await;
    let pid = db.wait_for_pid(id, WAIT).await.pid.unwrap() as i32;
    let inserting = db
        .holding(&format!("BEGIN; INSERT INTO task_results VALUES ({id})"))
        .await;
    // Past the fencing deadline (6 - 1 - 1 = 4 s after the last renewal).
    holds_for(
        Duration::from_secs(6),
        "the task to run on",
        async || match process_exists(pid) {
            true => Ok(()),
            false => Err(Text(daemon.log_text())),
        },
    )
    .await;
    std::fs::write(&gate, "").unwrap();
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1, "{row:?}");
    drop(inserting);
    assert!(daemon.stop().success());
}

/// PostgreSQL's lease renewal skips a row that another session holds
/// locked (it must not wait for an application's transaction), while the
/// daemon's other rows are renewed and its fence stays quiet. The locked
/// row's lease alone aged and lapsed with its task still running, and
/// another daemon's reaper, once the lock went, ran the row again beside
/// it. The daemon now kills that try alone, before the row's lease lapses.
/// The test times that by its own monotonic clock, as the daemon does: a
/// pause of the whole machine moves the database's clock, not theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_try_whose_row_stays_locked_is_stopped_before_its_lease_lapses() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut daemon = Daemon::start(
        &db,
        "d",
        "heartbeat_interval: 2s\nlease_timeout: 12s\nkill_grace: 3s\ntasks:\n  Nap:\n    command: [/bin/sleep, '60']\n",
    );
    let id = db.insert_row(NewRow::new("Nap").try_limit(1)).await;
    let pid = db.wait_for_pid(id, WAIT).await.pid.unwrap() as i32;
    let other = db.insert_row(NewRow::new("Nap").try_limit(1)).await;
    let other_pid = db.wait_for_pid(other, WAIT).await.pid.unwrap() as i32;
    let held = db.hold_row(id).await;
    poll(
        Duration::from_secs(12),
        "the locked row's task killed within its lease (12s)",
        async || {
            if process_exists(pid) {
                Err(Text(daemon.log_text()))
            } else {
                Ok(())
            }
        },
    )
    .await;
    holds_for(
        Duration::from_secs(3),
        "the other row's task runs on",
        async || {
            if process_exists(other_pid) {
                Ok(())
            } else {
                Err(Text(daemon.log_text()))
            }
        },
    )
    .await;
    held.release().await;
    let row = db.wait_for_state(id, "CRASHED", WAIT).await;
    let text = row.result_text.unwrap_or_default();
    assert!(text.contains("lost its claim"), "{text}");
    assert!(
        daemon
            .log_text()
            .contains("the row's lease was not renewed"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(db.row(other).await.result.as_deref(), Some("RUNNING"));
    assert!(daemon.stop().success());
}
