//! Limits through cgroups (SPEC.md "Limits through cgroups", issue 13): on
//! the machine's real cgroups, a try's `memory_limit`, `max_processes` and
//! `cpu_quota` hold for everything it starts, and ending a try kills all of
//! it. Needs root and a cgroup the daemon can write: skipped with a printed
//! reason elsewhere, and failed instead where
//! `TASKRUNNER_TEST_REQUIRE_CGROUPS` is set (CI, `.ci/run`).

use std::path::PathBuf;
use std::time::Duration;

use crate::util::{
    cli, kill_if_alive, process_exists, read_pid_file, wait_until, within, Backend, Daemon, NewRow,
    TestDb,
};

const WAIT: Duration = Duration::from_secs(30);

both_backends!(
    a_task_past_its_memory_limit_is_failed_naming_it_while_the_daemon_lives,
    a_fork_bomb_stops_at_max_processes,
    cpu_quota_holds_a_spinning_task_back,
    a_cpu_quota_the_kernel_refuses_fails_the_try_saying_so,
    a_setsid_grandchild_is_killed_at_the_end_of_its_try,
    a_setsid_grandchild_is_killed_before_the_rerun_at_a_daemon_restart,
    a_tries_cgroup_is_removed_after_the_try,
    a_try_without_limits_gets_the_emptied_cgroup_of_one_before,
    preloaded_tries_run_in_their_own_cgroup,
    preloaded_tries_of_another_user_run_in_their_own_cgroup,
    a_preloaded_program_that_ignores_the_cgroup_field_has_its_tries_moved,
    empty_try_cgroups_a_killed_daemon_left_are_removed,
);

/// Starts a daemon with `extra` config; `None` (the reason printed) where
/// its tries get no cgroup.
fn start_with_cgroups(db: &TestDb, extra: &str) -> Option<Daemon> {
    let required = std::env::var_os("TASKRUNNER_TEST_REQUIRE_CGROUPS").is_some();
    if !nix::unistd::geteuid().is_root() && !required {
        println!("skipped: making cgroups needs root");
        return None;
    }
    let daemon = Daemon::start(db, "d", extra);
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|line| line.contains("taskrunnerd started"))
        .unwrap_or_default()
        .to_string();
    if !line.contains("limits=cgroup") {
        assert!(
            !required,
            "TASKRUNNER_TEST_REQUIRE_CGROUPS is set but the daemon has none: {line}"
        );
        println!("skipped: the daemon makes no cgroups here: {line}");
        return None;
    }
    Some(daemon)
}

/// [`start_with_cgroups`] with the task-sdk probe and the Python example
/// preloaded, `extra` config first.
fn start_preloaded_probes_with_cgroups(db: &TestDb, extra: &str) -> Option<Daemon> {
    let sdk = PathBuf::from(crate::util::DAEMON)
        .parent()
        .unwrap()
        .join("preload-probe");
    let python =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/preload/preload_tasks.py");
    start_with_cgroups(
        db,
        &format!(
            "{extra}programs: [{{path: {}, preload: true}}, {{path: {}, preload: true}}]\n",
            sdk.display(),
            python.display()
        ),
    )
}

async fn insert_once(db: &TestDb, task: &str) -> taskrunner::request::RequestId {
    db.insert_row(NewRow::new(task).try_limit(1)).await
}

/// The directories of the try cgroups named in `/proc/PID/cgroup` text.
fn try_cgroup_dirs(proc_cgroup: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for line in proc_cgroup.split([' ', '\n']) {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if !path.contains("/try-") {
            continue;
        }
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            dirs.push(PathBuf::from("/sys/fs/cgroup").join(path));
            dirs.push(PathBuf::from("/sys/fs/cgroup/unified").join(path));
        } else {
            let first = controllers.split(',').next().unwrap_or_default();
            dirs.push(PathBuf::from("/sys/fs/cgroup").join(first).join(path));
        }
    }
    dirs
}

/// A task that fills 256 MiB (resident, every page written) under a 64 MiB
/// limit is killed by the OOM killer in its cgroup and FAILED naming the
/// limit; the daemon lives on, and one that maps 1 GiB of address space
/// but touches little runs (the limit is resident memory, not address
/// space). `status` names the mechanism.
async fn a_task_past_its_memory_limit_is_failed_naming_it_while_the_daemon_lives(backend: Backend) {
    let db = TestDb::new(backend).await;
    let Some(mut daemon) = start_with_cgroups(
        &db,
        r#"
tasks:
  Hungry:
    command: [python3, -c, 'x = b"x" * (256 << 20)']
    memory_limit: 64MiB
  Mapper:
    command: [python3, -c, 'import mmap; m = mmap.mmap(-1, 1 << 30); m[0] = 1; print("mapped")']
    memory_limit: 64MiB
"#,
    ) else {
        return;
    };
    let hungry = insert_once(&db, "Hungry").await;
    db.wait_for_failure(
        hungry,
        "memory limit 64MiB exceeded (killed by the OOM killer)",
    )
    .await;
    assert!(process_exists(daemon.pid()), "the daemon lives");
    let mapper = insert_once(&db, "Mapper").await;
    let row = db.wait_for_state(mapper, "FINISHED", WAIT).await;
    assert_eq!(row.result_text.as_deref(), Some("mapped"));
    let config = daemon.config.display().to_string();
    let (code, out, err) = cli(&db, &["--config", &config, "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("limits: cgroup v"), "{out}");
    assert!(daemon.stop().success());
}

/// A task that forks without end (bounded here at 200, in case the limit
/// does not hold) gets no more than `max_processes` processes, root or not
/// (RLIMIT_NPROC does not bind root), and is FAILED naming the limit.
async fn a_fork_bomb_stops_at_max_processes(backend: Backend) {
    let db = TestDb::new(backend).await;
    let Some(mut daemon) = start_with_cgroups(
        &db,
        r#"
tasks:
  Bomb:
    command:
      - python3
      - -c
      - |
        import os, sys, time
        forked = 0
        try:
            while forked < 200:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                forked += 1
        except OSError as error:
            sys.exit(f"forked {forked}: {error}")
        print(f"forked {forked}")
    max_processes: 20
"#,
    ) else {
        return;
    };
    let id = insert_once(&db, "Bomb").await;
    let text = db.wait_for_failure(id, "max_processes 20 reached").await;
    let forked: u32 = text
        .split("forked ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in {text}"));
    assert_eq!(forked, 19, "20 processes with the task itself: {text}");
    assert!(daemon.stop().success());
}

/// A task that spins for one second of wall time under `cpu_quota: 20%`
/// gets about a fifth of a CPU.
async fn cpu_quota_holds_a_spinning_task_back(backend: Backend) {
    let db = TestDb::new(backend).await;
    let Some(mut daemon) = start_with_cgroups(
        &db,
        r#"
tasks:
  Spin:
    command:
      - python3
      - -c
      - |
        import time
        start = time.time()
        while time.time() - start < 1:
            pass
        print(time.process_time())
    cpu_quota: 20%
"#,
    ) else {
        return;
    };
    let id = insert_once(&db, "Spin").await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    let cpu: f64 = row.result_text.unwrap().trim().parse().unwrap();
    assert!(cpu < 0.45, "{cpu}s of CPU in 1s of wall time at 20%");
    assert!(daemon.stop().success());
}

/// A cgroup v1 `cpu` cgroup of its own, for one test's daemon, with a CPU
/// quota; removed (with what the daemon made in it) when dropped.
struct QuotaCgroup(PathBuf);

impl QuotaCgroup {
    /// `None` (the reason printed) where there is no cgroup v1 `cpu`
    /// hierarchy: on cgroup v2 a child's quota above its parent's is taken,
    /// and the parent's holds.
    fn make(percent: u64) -> Option<QuotaCgroup> {
        let cpu = std::path::Path::new("/sys/fs/cgroup/cpu");
        if !nix::unistd::geteuid().is_root() || !cpu.join("cgroup.procs").exists() {
            println!("skipped: needs root and a cgroup v1 cpu hierarchy");
            return None;
        }
        let dir = cpu.join(format!(
            "taskrunner-test-{}-{}",
            std::process::id(),
            crate::util::now_ns()
        ));
        std::fs::create_dir(&dir).unwrap();
        let made = QuotaCgroup(dir);
        std::fs::write(made.0.join("cpu.cfs_period_us"), "100000").unwrap();
        std::fs::write(
            made.0.join("cpu.cfs_quota_us"),
            (percent * 1000).to_string(),
        )
        .unwrap();
        Some(made)
    }
}

impl Drop for QuotaCgroup {
    fn drop(&mut self) {
        fn remove(dir: &std::path::Path) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    remove(&entry.path());
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        // A daemon killed as the test failed may take a moment to be gone.
        crate::util::within(Duration::from_secs(2), || {
            remove(&self.0);
            !self.0.exists()
        });
    }
}

/// On cgroup v1, a type whose `cpu_quota` is above that of the daemon's own
/// cgroup (a unit's `CPUQuota=50%`, a type's `cpu_quota: 80%`): the kernel
/// refuses the try's quota (EINVAL). That was taken for the daemon's own
/// shortage: the try was given back and claimed again without end, each
/// time pausing the daemon's claims. Now it is FAILED, saying what the
/// kernel refused, and a type within the quota runs.
async fn a_cpu_quota_the_kernel_refuses_fails_the_try_saying_so(backend: Backend) {
    let Some(cgroup) = QuotaCgroup::make(50) else {
        return;
    };
    let db = TestDb::new(backend).await;
    let daemon = db
        .daemon("d")
        .yaml(
            "tasks:\n  Above:\n    command: ['true']\n    cpu_quota: 80%\n  \
             Within:\n    command: ['true']\n    cpu_quota: 20%\n",
        )
        .in_cgroup(&cgroup.0.join("cgroup.procs"))
        .start();
    let mut daemon = match daemon.log_text().contains("limits=cgroup") {
        true => daemon,
        false => {
            println!("skipped: the daemon makes no cgroups here");
            return;
        }
    };
    let above = insert_once(&db, "Above").await;
    let row = db
        .wait_for(above, WAIT, "its one try counted", |row| {
            row.tries > 0 && row.result.as_deref() != Some("RUNNING")
        })
        .await;
    assert_eq!(row.result.as_deref(), Some("FAILED"), "{row:#?}");
    let text = row.result_text.unwrap_or_default();
    assert!(
        text.contains("the kernel refused the try's limits") && text.contains("cpu.cfs_quota_us"),
        "{text}"
    );
    let within = insert_once(&db, "Within").await;
    db.wait_for_state(within, "FINISHED", WAIT).await;
    assert!(daemon.stop().success());
}

/// A script that leaves a grandchild in a session of its own (`setsid`,
/// out of the task's process group) and writes its pid to `file`.
fn setsid_leaver(file: &std::path::Path, wait_on_try_1: bool) -> String {
    format!(
        r#"
tasks:
  Leaver:
    command:
      - /bin/sh
      - -c
      - |
        g={g}
        if [ "$TASKRUNNER_TRY" = 1 ]; then
            setsid /bin/sh -c 'echo $$ > {g}.tmp; mv {g}.tmp {g}; exec sleep 60' < /dev/null > /dev/null 2>&1 &
            while [ ! -s $g ]; do sleep 0.05; done
            {end}
        fi
        state=$(sed 's/.*) //' /proc/$(cat $g)/stat 2>/dev/null | cut -c1)
        if [ -n "$state" ] && [ "$state" != Z ]; then echo "try 1 still runs" >&2; exit 1; fi
        echo alone
"#,
        g = file.display(),
        end = if wait_on_try_1 {
            "exec sleep 60"
        } else {
            "echo left; exit 0"
        }
    )
}

/// A grandchild that left the task's process group with `setsid` escaped
/// the group kill at the try's end; the try's cgroup takes it too.
async fn a_setsid_grandchild_is_killed_at_the_end_of_its_try(backend: Backend) {
    let db = TestDb::new(backend).await;
    let file = db.scratch.join("grandchild");
    let Some(mut daemon) = start_with_cgroups(&db, &setsid_leaver(&file, false)) else {
        return;
    };
    let id = insert_once(&db, "Leaver").await;
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.result_text.as_deref(), Some("left"));
    let grandchild = read_pid_file(&file);
    // Up to 10 s for the kill to land (then gone, or killed here).
    within(Duration::from_secs(10), || !process_exists(grandchild));
    assert!(
        !kill_if_alive(grandchild),
        "the setsid grandchild was killed"
    );
    assert!(daemon.stop().success());
}

/// After `kill -9` of the daemon, a `setsid` grandchild of its task lives
/// on (the parent-death signal reaches the task only, and it left the
/// group); the restarted daemon's start-up reaper kills it, through the
/// try's cgroup, before the row runs again.
async fn a_setsid_grandchild_is_killed_before_the_rerun_at_a_daemon_restart(backend: Backend) {
    let db = TestDb::new(backend).await;
    let file = db.scratch.join("grandchild");
    let Some(mut daemon) = start_with_cgroups(&db, &setsid_leaver(&file, true)) else {
        return;
    };
    let id = db.enqueue("Leaver", None).await;
    db.wait_for_pid(id, WAIT).await;
    let grandchild = read_pid_file(&file);
    let (mut daemon, row) = daemon
        .kill_leaving_grandchild_and_restart(&db, id, grandchild)
        .await;
    assert!(
        !kill_if_alive(grandchild),
        "the setsid grandchild was killed"
    );
    assert_eq!(row.result.as_deref(), Some("FINISHED"), "{row:#?}");
    assert_eq!(row.result_text.as_deref(), Some("alone"));
    assert_eq!(row.tries, 2);
    assert!(
        daemon.log_text().contains("left in its cgroup"),
        "{}",
        daemon.log_text()
    );
    assert!(daemon.stop().success());
}

/// A try runs in a cgroup of its own, which is gone once the try is over.
async fn a_tries_cgroup_is_removed_after_the_try(backend: Backend) {
    let db = TestDb::new(backend).await;
    let Some(mut daemon) = start_with_cgroups(
        &db,
        "tasks:\n  Where:\n    command: [/bin/cat, /proc/self/cgroup]\n    memory_limit: 64MiB\n    max_processes: 10\n",
    ) else {
        return;
    };
    let (dirs, _) = run_where(&db).await;
    wait_until(WAIT, "the try's cgroup to be removed", || {
        dirs.iter().all(|dir| !dir.exists())
    });
    assert!(daemon.stop().success());
}

/// Runs one `Where` try (`cat /proc/self/cgroup`): the directories of its
/// try cgroup, and whether they are cgroup v1's.
async fn run_where(db: &TestDb) -> (Vec<PathBuf>, bool) {
    let id = insert_once(db, "Where").await;
    let text = db
        .wait_for_state(id, "FINISHED", WAIT)
        .await
        .result_text
        .unwrap();
    let dirs = try_cgroup_dirs(&text);
    assert!(!dirs.is_empty(), "the try ran in a try cgroup: {text}");
    // cgroup v1 names the controllers on the try's line.
    let v1 = text
        .lines()
        .any(|line| line.contains("/try-") && !line.contains("::"));
    (dirs, v1)
}

/// A try without limits gets the emptied cgroup of an earlier one, renamed
/// after it, on cgroup v1 (a `mkdir` and an `rmdir` of a cgroup cost the
/// daemon more than the rest of a no-op try; cgroup v2 cannot rename one):
/// the cgroup is kept, empty, once its try ended, the next try runs in it
/// under its own name, and the daemon removes it when it stops.
async fn a_try_without_limits_gets_the_emptied_cgroup_of_one_before(backend: Backend) {
    use std::os::unix::fs::MetadataExt;
    let db = TestDb::new(backend).await;
    let Some(mut daemon) = start_with_cgroups(
        &db,
        "tasks:\n  Where:\n    command: [/bin/cat, /proc/self/cgroup]\n",
    ) else {
        return;
    };
    let (first, v1) = run_where(&db).await;
    if !v1 {
        wait_until(WAIT, "the try's cgroup to be removed (cgroup v2)", || {
            first.iter().all(|dir| !dir.exists())
        });
        assert!(daemon.stop().success());
        return;
    }
    let [first] = first.as_slice() else {
        panic!("a try without limits has one cgroup: {first:?}");
    };
    let kept = std::fs::metadata(first).expect("the emptied cgroup is kept");
    let members = std::fs::read_to_string(first.join("cgroup.procs")).unwrap();
    assert_eq!(members, "", "nothing is left in it");

    let (second, _) = run_where(&db).await;
    let [second] = second.as_slice() else {
        panic!("a try without limits has one cgroup: {second:?}");
    };
    assert_ne!(first, second, "each try's cgroup is named after it");
    assert!(!first.exists(), "the spare took the second try's name");
    assert_eq!(
        std::fs::metadata(second).expect("kept again").ino(),
        kept.ino(),
        "the second try ran in the first one's cgroup"
    );
    assert!(daemon.stop().success());
    assert!(
        !second.exists(),
        "the daemon removes its spares when it stops"
    );
}

/// A preloaded program's child (forked by the program, not the daemon)
/// runs in its try's cgroup too, with task-sdk and with the Python example;
/// every try, also once the daemon has seen that the program's children
/// join by themselves and stopped checking them.
async fn preloaded_tries_run_in_their_own_cgroup(backend: Backend) {
    let db = TestDb::new(backend).await;
    let Some(mut daemon) = start_preloaded_probes_with_cgroups(&db, "") else {
        return;
    };
    for task in ["Probe", "PyProbe", "Probe", "PyProbe", "Probe", "PyProbe"] {
        let id = insert_once(&db, task).await;
        assert_ran_in_its_try_cgroup(&db, id).await;
    }
    let log = daemon.log_text();
    assert!(log.contains(" preloaded (pid "), "{log}");
    assert!(!log.contains("cannot move a preloaded try"), "{log}");
    assert!(daemon.stop().success());
}

/// A preloaded program run as another user than the daemon's (`user:`,
/// the daemon root): its children could not open their cgroup's join
/// files (root's), and every try exited 127 where the same try exec'd
/// finished. Such a program's requests now carry no `cgroup` field, and
/// the daemon moves each child into its try's cgroup when it gets its
/// pid. (Each probe reads its cgroup a second after its start.)
async fn preloaded_tries_of_another_user_run_in_their_own_cgroup(backend: Backend) {
    let db = TestDb::new(backend).await;
    let Some(mut daemon) = start_preloaded_probes_with_cgroups(&db, "user: nobody\n") else {
        return;
    };
    for task in ["Probe", "PyProbe", "Probe", "PyProbe"] {
        let id = db
            .insert_row(NewRow::new(task).options("sleep_ms: 1000").try_limit(1))
            .await;
        assert_ran_in_its_try_cgroup(&db, id).await;
    }
    assert_eq!(daemon.log_text().matches(" preloaded (pid ").count(), 2);
    assert!(daemon.stop().success());
}

/// Waits for row `id` to finish, and checks that the probe's result text
/// names a try's cgroup (its `cgroup: ` line, read by the task itself).
async fn assert_ran_in_its_try_cgroup(db: &TestDb, id: taskrunner::request::RequestId) {
    let text = db
        .wait_for_state(id, "FINISHED", WAIT)
        .await
        .result_text
        .unwrap();
    let cgroup = text
        .lines()
        .find_map(|line| line.strip_prefix("cgroup: "))
        .unwrap_or_else(|| panic!("no cgroup line: {text}"));
    assert!(
        !try_cgroup_dirs(cgroup).is_empty(),
        "request {id} ran outside its try's cgroup: {cgroup}"
    );
}

/// The daemon's safety net for a preloaded program that does not write to
/// the protocol's `cgroup` files: it moves each child into its try's
/// cgroup when it gets its pid (and never comes to trust the program's
/// children to join by themselves). The Python example, with its parse
/// made to drop the `cgroup` fields.
async fn a_preloaded_program_that_ignores_the_cgroup_field_has_its_tries_moved(backend: Backend) {
    let db = TestDb::new(backend).await;
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/preload");
    let program = db.scratch.join("ignores_cgroups.py");
    crate::util::write_executable(
        &program,
        format!(
            "#!/usr/bin/env python3\n\
             import sys\n\
             sys.dont_write_bytecode = True\n\
             sys.path.insert(0, {:?})\n\
             import preload_tasks\n\
             parse = preload_tasks.parse\n\
             def ignoring_cgroups(message):\n    \
                 request = parse(message)\n    \
                 request['cgroup'] = []\n    \
                 return request\n\
             preload_tasks.parse = ignoring_cgroups\n\
             sys.exit(preload_tasks.main())\n",
            examples.display().to_string()
        ),
    );
    let Some(mut daemon) = start_with_cgroups(
        &db,
        &format!(
            "programs: [{{path: {}, preload: true}}]\n",
            program.display()
        ),
    ) else {
        return;
    };
    for _ in 0..3 {
        // It reads its cgroup a second after its start: the daemon moved it
        // when its pid came back, long before.
        let id = db
            .insert_row(
                NewRow::new("PyProbe")
                    .options("sleep_ms: 1000")
                    .try_limit(1),
            )
            .await;
        assert_ran_in_its_try_cgroup(&db, id).await;
    }
    assert!(daemon.log_text().contains(" preloaded (pid "));
    assert!(daemon.stop().success());
}

/// After `kill -9` of the daemon its tries die with it, but their cgroups
/// stayed behind, empty, for ever when the start-up reaper had no row to
/// find them by (here `taskrunner-cli reap` marked the row first, as an
/// operator would). The daemon now removes empty `try-…` cgroups older than
/// a few seconds after each reaper pass; one holding a process is never
/// touched.
async fn empty_try_cgroups_a_killed_daemon_left_are_removed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let Some(mut daemon) = start_with_cgroups(
        &db,
        "reap_interval: 1s\ntasks:\n  Nap:\n    command: [/bin/sh, -c, 'cat /proc/self/cgroup > cgroup.txt; exec sleep 60']\n    workdir: .\n    max_processes: 10\n",
    ) else {
        return;
    };
    let id = insert_once(&db, "Nap").await;
    let pid = db.wait_for_pid(id, WAIT).await.pid.unwrap() as i32;
    let written = daemon.dir.join("cgroup.txt");
    wait_until(WAIT, "the task to say its cgroup", || {
        std::fs::read_to_string(&written).is_ok_and(|text| text.contains("/try-"))
    });
    let dirs = try_cgroup_dirs(&std::fs::read_to_string(&written).unwrap());
    assert!(!dirs.is_empty());
    daemon.kill();
    wait_until(WAIT, "the task to die with its daemon", || {
        !process_exists(pid)
    });
    let config = daemon.config.display().to_string();
    let (code, out, err) = cli(&db, &["--config", &config, "reap"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("crashed"), "{out}");
    assert!(
        dirs.iter().all(|dir| dir.exists()),
        "the cgroup is left behind"
    );
    // A cgroup that still holds a process is left alone.
    let busy = dirs[0].with_file_name(format!(
        "try-busy-{}",
        db.scratch.path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir(&busy).unwrap();
    let mut sleeper = std::process::Command::new("/bin/sleep")
        .arg("60")
        .spawn()
        .unwrap();
    std::fs::write(busy.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    let mut daemon = daemon.restart();
    wait_until(
        Duration::from_secs(60),
        "the empty cgroup to be removed",
        || dirs.iter().all(|dir| !dir.exists()),
    );
    // (Which daemon removed it is not asserted: the daemons of the tests
    // running beside this one share the base cgroup, and sweep it too.)
    wait_until(WAIT, "the busy cgroup to be old enough to be swept", || {
        busy.metadata()
            .and_then(|metadata| metadata.modified())
            .is_ok_and(|made| made.elapsed().unwrap_or_default() > Duration::from_secs(12))
    });
    assert!(busy.exists(), "a cgroup holding a process is not removed");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    // Empty now and older than 10 s: a daemon of a test running beside
    // this one may sweep it first, and then it is gone.
    wait_until(WAIT, "the test's own cgroup to be removed", || {
        std::fs::remove_dir(&busy).is_ok() || !busy.exists()
    });
    assert!(daemon.stop().success());
}
