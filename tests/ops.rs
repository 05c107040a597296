//! Operations: the init scripts in `init/` driven for real, the pidfile,
//! `--daemonize`, the control socket, SIGHUP reload, JSON logs and
//! `config check|init`.
//!
//! None of this depends on the database backend (it is the same code above
//! the store), so most tests run on SQLite only; the SysV test uses
//! PostgreSQL so that its unprivileged daemon needs no database file.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{
    base_config, cli, merge_yaml, process_exists, wait_until, Backend, Daemon, KillOnDrop, Scratch,
    TestDb, CLI, DAEMON,
};

const WAIT: Duration = Duration::from_secs(20);

/// The repository's `init/` directory.
fn init_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../init")
}

/// Writes `<scratch>/<name>/taskrunner.yml` (the base config plus `extra`) and returns its path.
fn write_config(db: &TestDb, name: &str, extra: &str) -> PathBuf {
    let dir = db.scratch.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("taskrunner.yml");
    std::fs::write(&config, merge_yaml(&base_config(db, &dir), extra)).unwrap();
    config
}

/// The pid a pidfile names, if it exists and holds one.
fn pid_in(pidfile: &Path) -> Option<i32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// Live `taskrunnerd` processes started with `config` on their command line.
fn daemons_using(config: &Path) -> Vec<i32> {
    let needle = config.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("taskrunnerd"))
            && args.contains(&needle)
            && process_exists(pid)
        {
            pids.push(pid);
        }
    }
    pids
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Sends one raw line on the control socket and returns the answer line.
fn socket_exchange(socket: &Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    // The daemon may answer (and close) before it has read all of a long request.
    let _ = stream.write_all(request);
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

// ---------------------------------------------------------------------------
// init/

/// Runs `init/taskrunner.sysv ACTION` with the test's defaults file.
fn sysv(defaults: &Path, action: &str) -> Output {
    Command::new(init_dir().join("taskrunner.sysv"))
        .arg(action)
        .env("TASKRUNNER_DEFAULTS", defaults)
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .expect("running init/taskrunner.sysv")
}

/// start, status, a second start, reload, a stop that drains a running task,
/// status after the stop: as Debian's `service` would, as root, with the
/// daemon running as `nobody`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sysv_script_starts_refuses_a_second_start_and_stop_drains() {
    if !crate::util::runs_as_root("the SysV script test needs root (start-stop-daemon --chuid)") {
        return;
    }
    if Command::new("sh")
        .args(["-c", "command -v start-stop-daemon"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        eprintln!("skipped: start-stop-daemon (Debian's dpkg) is not installed");
        return;
    }
    let db = TestDb::new(Backend::Postgres).await;
    let dir = db.scratch.join("service");
    let gate = dir.join("gate");
    let config = write_config(
        &db,
        "service",
        &format!(
            "log_file: log/taskrunnerd.log\nshutdown_timeout: 30s\ntasks:\n  Gated:\n    command: [/bin/sh, -c, 'while [ ! -e {} ]; do sleep 0.05; done; echo released']\n",
            gate.display()
        ),
    );
    let pidfile = dir.join("run/taskrunnerd.pid");
    let defaults = dir.join("default-taskrunner");
    std::fs::write(
        &defaults,
        format!(
            "DAEMON={DAEMON}\nCLI={CLI}\nCONFIG={}\nPIDFILE={}\nLOG_DIR={}\nRUN_AS=nobody\nSTOP_TIMEOUT=60\n",
            config.display(),
            pidfile.display(),
            dir.join("log").display()
        ),
    )
    .unwrap();
    // LOG_DIR exists, and is not taskrunner's own (as /var/log would be):
    // it is left as it is (before, it became the daemon user's, mode 0750).
    let log_dir = dir.join("log");
    std::fs::create_dir_all(&log_dir).unwrap();
    std::fs::set_permissions(&log_dir, std::fs::Permissions::from_mode(0o777)).unwrap();

    let started = sysv(&defaults, "start");
    assert!(started.status.success(), "start: {}", text(&started));
    let kept = std::fs::metadata(&log_dir).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&kept),
            kept.permissions().mode() & 0o777
        ),
        (0, 0o777),
        "an existing LOG_DIR not taskrunner's own is left as it is"
    );
    let pid = pid_in(&pidfile).unwrap_or_else(|| panic!("no pid in {}", pidfile.display()));
    let _guard = KillOnDrop(pid);
    assert!(process_exists(pid));
    let uid_line = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
    assert!(
        uid_line.split_whitespace().nth(1) == Some(&nobody.to_string()),
        "the daemon runs as RUN_AS: {uid_line}"
    );
    let run_dir = std::fs::metadata(pidfile.parent().unwrap()).unwrap();
    assert_eq!(run_dir.permissions().mode() & 0o777, 0o700);

    // status: LSB 0, and what the daemon says over its socket.
    let status = sysv(&defaults, "status");
    let shown = text(&status);
    assert_eq!(status.status.code(), Some(0), "{shown}");
    assert!(
        shown.contains(&format!("is running (pid {pid})")),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("taskrunnerd 0.1.0 (pid {pid})")),
        "{shown}"
    );

    // A second start starts nothing (LSB: success, and says so).
    let again = sysv(&defaults, "start");
    let shown = text(&again);
    assert!(again.status.success(), "{shown}");
    assert!(shown.contains("already running"), "{shown}");
    assert_eq!(pid_in(&pidfile), Some(pid));
    assert_eq!(daemons_using(&config), vec![pid]);

    let reloaded = sysv(&defaults, "reload");
    assert!(reloaded.status.success(), "reload: {}", text(&reloaded));
    let log = dir.join("log/taskrunnerd.log");
    wait_until(WAIT, "the daemon to log the reload", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("config reloaded")
    });
    // force-reload reloads too, the same daemon (LSB: when the service can;
    // it restarted the daemon, draining or interrupting its tasks).
    let forced = sysv(&defaults, "force-reload");
    assert!(forced.status.success(), "force-reload: {}", text(&forced));
    wait_until(WAIT, "the daemon to log a second reload", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("config reloaded")
            .count()
            >= 2
    });
    assert_eq!(pid_in(&pidfile), Some(pid));

    // A broken config: reload and restart are refused with the reason, and
    // the running daemon stays.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}poll_intervall: 5s\n")).unwrap();
    for action in ["reload", "force-reload", "restart"] {
        let refused = sysv(&defaults, action);
        let shown = text(&refused);
        assert!(!refused.status.success(), "{action}: {shown}");
        assert!(shown.contains("poll_intervall"), "{action}: {shown}");
        assert_eq!(pid_in(&pidfile), Some(pid), "{action}");
        assert!(process_exists(pid), "{action}");
    }
    std::fs::write(&config, good).unwrap();

    // stop drains: a task running when it is asked to stop finishes.
    let id = db.enqueue("Gated", None).await;
    let running = db.wait_for_pid(id, WAIT).await;
    let stop = {
        let defaults = defaults.clone();
        std::thread::spawn(move || sysv(&defaults, "stop"))
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(WAIT, "the daemon to begin its stop", || {
        log_text().contains("shutting down")
    });
    assert!(
        process_exists(pid) && process_exists(running.pid.unwrap() as i32),
        "the daemon drains (waits for its task) before it exits"
    );
    std::fs::write(&gate, "").unwrap();
    let stopped = stop.join().unwrap();
    assert!(stopped.status.success(), "stop: {}", text(&stopped));
    let row = db.wait_for_state(id, "FINISHED", WAIT).await;
    assert_eq!(row.result_text.as_deref(), Some("released"));
    assert!(!process_exists(pid), "stop returns once the daemon is gone");
    assert!(!pidfile.exists(), "the daemon removes its pidfile");

    let status = sysv(&defaults, "status");
    assert_eq!(status.status.code(), Some(3), "{}", text(&status));
    assert!(text(&status).contains("is not running"));
    // Stopping a stopped service succeeds (LSB).
    assert!(sysv(&defaults, "stop").status.success());
}

/// Every `Key=` of a unit file, by section.
fn unit_keys(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut keys = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a key=value line: {line}"));
        keys.push((section.clone(), key.to_string(), value.to_string()));
    }
    keys
}

/// `90s`, `2min`, `1min 30s` → seconds (the forms a unit uses).
fn systemd_seconds(value: &str) -> u64 {
    let mut total = 0;
    for part in value.split_whitespace() {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        let number: u64 = digits.parse().unwrap();
        total += match &part[digits.len()..] {
            "" | "s" | "sec" => number,
            "m" | "min" => number * 60,
            "h" => number * 3600,
            unit => panic!("unexpected time unit {unit} in {value}"),
        };
    }
    total
}

/// The seconds a stop must outlast: the shipped service config's drain and
/// kill grace (read through the daemon's own loader, which also proves the
/// file valid).
fn shipped_drain_seconds() -> u64 {
    let config = taskrunner::config::Config::load_file(&init_dir().join("taskrunner.yml"))
        .expect("init/taskrunner.yml loads");
    (config.shutdown_timeout + config.defaults.kill_grace).as_secs()
}

#[test]
fn systemd_unit_is_valid_and_outlasts_the_drain() {
    let unit_path = init_dir().join("taskrunner.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    let keys = unit_keys(&unit);
    // The keys this unit may use (a typo is silently ignored by systemd).
    let known: &[(&str, &[&str])] = &[
        (
            "Unit",
            &[
                "Description",
                "Documentation",
                "After",
                "Before",
                "Wants",
                "Requires",
                "BindsTo",
                "PartOf",
                "ConditionPathExists",
                "StartLimitIntervalSec",
                "StartLimitBurst",
            ],
        ),
        (
            "Service",
            &[
                "Type",
                "NotifyAccess",
                "User",
                "Group",
                "ExecStart",
                "ExecStartPre",
                "ExecReload",
                "KillMode",
                "KillSignal",
                "TimeoutStopSec",
                "TimeoutStartSec",
                "Restart",
                "RestartSec",
                "RestartPreventExitStatus",
                "RuntimeDirectory",
                "RuntimeDirectoryMode",
                "StateDirectory",
                "StateDirectoryMode",
                "LogsDirectory",
                "WorkingDirectory",
                "Environment",
                "EnvironmentFile",
                "NoNewPrivileges",
                "ProtectSystem",
                "ProtectHome",
                "PrivateTmp",
                "PrivateDevices",
                "ProtectKernelTunables",
                "ProtectKernelModules",
                "ProtectKernelLogs",
                "ProtectControlGroups",
                "ProtectClock",
                "ProtectHostname",
                "RestrictRealtime",
                "RestrictSUIDSGID",
                "RestrictNamespaces",
                "LockPersonality",
                "RestrictAddressFamilies",
                "UMask",
                "LimitNOFILE",
                "Delegate",
                "LimitNICE",
            ],
        ),
        ("Install", &["WantedBy", "Alias"]),
    ];
    for (section, key, _) in &keys {
        let allowed = known
            .iter()
            .find(|(name, _)| name == section)
            .unwrap_or_else(|| panic!("unknown section [{section}]"))
            .1;
        assert!(
            allowed.contains(&key.as_str()),
            "unknown key {key}= in [{section}]"
        );
    }
    let value = |section: &str, key: &str| -> String {
        keys.iter()
            .find(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.clone())
            .unwrap_or_else(|| panic!("[{section}] {key}= is missing"))
    };
    assert_eq!(value("Service", "Type"), "notify");
    // The daemon alone gets SIGTERM and stops its tasks itself.
    assert_eq!(value("Service", "KillMode"), "mixed");
    assert!(value("Service", "ExecStart").contains("--config /etc/taskrunner/taskrunner.yml"));
    assert!(value("Service", "ExecReload").contains("-HUP $MAINPID"));
    assert_eq!(value("Service", "RuntimeDirectoryMode"), "0700");
    // A cgroup per try needs a delegated, writable cgroup.
    assert_eq!(value("Service", "Delegate"), "yes");
    assert_eq!(value("Service", "ProtectControlGroups"), "no");
    assert_eq!(value("Install", "WantedBy"), "multi-user.target");
    value("Service", "User");
    // A config the daemon refuses is not restarted every `RestartSec`, for
    // ever: its exit status is one the unit does not restart on.
    let scratch = Scratch::new("refused");
    let bad = scratch.join("bad.yml");
    std::fs::write(&bad, "max_concurrent: many\n").unwrap();
    let refused = Command::new(DAEMON)
        .args(["--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let code = refused.status.code().expect("an exit status").to_string();
    assert!(
        value("Service", "RestartPreventExitStatus")
            .split_whitespace()
            .any(|status| status == code),
        "a refused config exits {code}: {}",
        text(&refused)
    );
    let timeout = systemd_seconds(&value("Service", "TimeoutStopSec"));
    let drain = shipped_drain_seconds();
    assert!(
        timeout > drain,
        "TimeoutStopSec={timeout}s must exceed shutdown_timeout + kill_grace ({drain}s)"
    );

    // systemd's own check, where it is installed. It insists that ExecStart
    // exists, so it sees the unit pointing at the freshly built daemon.
    let analyze = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
        .unwrap();
    if !analyze.status.success() {
        eprintln!("systemd-analyze is not installed: checked the unit's keys only");
        return;
    }
    let scratch = Scratch::new("unit");
    let copy = scratch.join("taskrunner.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/taskrunnerd", DAEMON)).unwrap();
    let verified = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", text(&verified));
    // It only warns about unknown keys and bad values: any output is a finding.
    let findings = String::from_utf8_lossy(&verified.stderr);
    let findings: Vec<&str> = findings
        .lines()
        // Not about the unit: a container without a running systemd.
        .filter(|l| !l.contains("Failed to connect") && !l.trim().is_empty())
        .collect();
    assert!(findings.is_empty(), "systemd-analyze verify: {findings:#?}");
}

/// Under systemd (`Type=notify`) the daemon is ready only after its
/// migrations, and systemd stops a start that takes longer than 90 s: an
/// upgrade's migration of a large table was stopped halfway (on MariaDB,
/// DDL half applied) and restarted into the same stop. While it migrates,
/// the daemon now extends the start's timeout (`EXTEND_TIMEOUT_USEC`). Here
/// the notify socket is the test's, and the migration (PostgreSQL's 18
/// again) waits for a table lock the test holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_under_systemd_extends_its_start_while_it_migrates() {
    use sqlx::Connection;
    let db = TestDb::new(Backend::Postgres).await;
    db.execute("DELETE FROM task_runner_schema_migrations WHERE version = 18")
        .await;
    let mut lock = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE task_runner_requests IN ACCESS EXCLUSIVE MODE")
        .execute(&mut lock)
        .await
        .unwrap();
    let path = db.scratch.join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let heard = std::sync::Mutex::new(String::new());
    let hear = |until: &str| {
        wait_until(WAIT, until, || {
            let mut message = [0u8; 256];
            if let Ok(length) = systemd.recv(&mut message) {
                let mut heard = heard.lock().unwrap();
                heard.push_str(&String::from_utf8_lossy(&message[..length]));
                heard.push('\n');
            }
            heard.lock().unwrap().contains(until)
        })
    };
    let config = db.daemon("d").write_config();
    let path_text = path.to_string_lossy().into_owned();
    let mut daemon = Daemon::start_with_env(
        &config,
        &[],
        &[
            ("NOTIFY_SOCKET", path_text.as_str()),
            ("TASKRUNNER_TEST_MIGRATING_EVERY_MS", "100"),
        ],
    );
    // Told at the migration's start and again while it waits.
    hear("EXTEND_TIMEOUT_USEC=60000000\nEXTEND_TIMEOUT_USEC=60000000");
    assert!(!heard.lock().unwrap().contains("READY=1"));
    sqlx::raw_sql("COMMIT").execute(&mut lock).await.unwrap();
    hear("READY=1");
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

#[test]
fn sysv_and_openrc_scripts_parse_and_outlast_the_drain() {
    let drain = shipped_drain_seconds();
    for (file, key) in [
        ("taskrunner.sysv", "STOP_TIMEOUT="),
        ("taskrunner.openrc", ": \"${TASKRUNNER_STOP_TIMEOUT:="),
    ] {
        let path = init_dir().join(file);
        let checked = Command::new("sh").arg("-n").arg(&path).output().unwrap();
        assert!(checked.status.success(), "{file}: {}", text(&checked));
        let script = std::fs::read_to_string(&path).unwrap();
        let timeout: u64 = script
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{file} sets no stop timeout"))
            .trim_end_matches(['}', '"'])
            .parse()
            .unwrap();
        assert!(
            timeout > drain,
            "{file}: stop timeout {timeout}s <= {drain}s"
        );
        // The config path and the user are set near the top.
        let head: String = script.lines().take(25).collect::<Vec<_>>().join("\n");
        assert!(head.contains("/etc/taskrunner/taskrunner.yml"), "{file}");
        assert!(head.contains("taskrunner"), "{file}");
    }
}

/// A program in `dir` (made writable by anyone) that answers
/// `--list-tasks` with `Probe` and writes what `id FLAG` prints to a file:
/// (the program, that file).
fn program_recording_id(dir: &Path, flag: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let record = dir.join("asked");
    let program = dir.join("program");
    crate::util::write_executable(
        &program,
        format!(
            "#!/bin/sh\nid {flag} > {}\n[ \"$1\" = --list-tasks ] && echo Probe\n",
            record.display()
        ),
    );
    (program, record)
}

/// `config check` asks the config's programs for their task types. The
/// init scripts ran it as root at each reload and restart (OpenRC at each
/// start too), and `taskrunner-cli config check` run as root ran them as
/// root: whoever may replace a program (its deploy, as the application's
/// user) had root. Now the scripts check as the daemon's user, and the CLI
/// run as root asks as the config's top-level `user:`, as the daemon does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_checks_of_the_cli_and_the_sysv_script_never_run_a_program_as_root() {
    if !crate::util::runs_as_root("asking a program as another user needs root") {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = db.scratch.join("asked");
    let (program, asked_as) = program_recording_id(&dir, "-u");
    let asked = || std::fs::read_to_string(&asked_as).unwrap_or_default();
    let nobody = "65534\n";
    // The CLI, as root, with a top-level user:
    let config = write_config(
        &db,
        "with-user",
        &format!("user: nobody\nprograms: [{}]\n", program.display()),
    );
    let checked = Command::new(CLI)
        .args(["config", "check"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(checked.status.success(), "{}", text(&checked));
    assert_eq!(asked(), nobody, "{}", text(&checked));
    // The SysV script's reload (the daemon is not running: the check comes first).
    std::fs::remove_file(&asked_as).unwrap();
    let config = write_config(
        &db,
        "service",
        &format!("programs: [{}]\n", program.display()),
    );
    let defaults = dir.join("default-taskrunner");
    std::fs::write(
        &defaults,
        format!(
            "DAEMON={DAEMON}\nCLI={CLI}\nCONFIG={}\nPIDFILE={}\nRUN_AS=nobody\n",
            config.display(),
            dir.join("run/taskrunnerd.pid").display(),
        ),
    )
    .unwrap();
    let reload = sysv(&defaults, "reload");
    assert_eq!(asked(), nobody, "{}", text(&reload));
}

/// `config check` run as root asks the programs with the top-level user's
/// groups too, as the daemon does: a program only its user's other group
/// may read was refused to the check (the standard library's `uid`/`gid`
/// drop every supplementary group) while the daemon accepted it. Needs
/// root and a user with a supplementary group; skipped without.
#[test]
fn config_check_as_root_asks_with_the_users_groups() {
    if !crate::util::runs_as_root("asking a program as another user needs root") {
        return;
    }
    let Some((user, gid, _)) = crate::util::user_with_a_supplementary_group() else {
        println!("skipped: no user in /etc/group is a member of a group besides its own");
        return;
    };
    let scratch = Scratch::new("groups");
    let (program, asked_in) = program_recording_id(&scratch.join("asked"), "-G");
    let config = scratch.join("taskrunner.yml");
    std::fs::write(
        &config,
        format!("user: {user}\nprograms: [{}]\n", program.display()),
    )
    .unwrap();
    let checked = cli_without_database(
        &scratch.path,
        &["config", "check", config.to_str().unwrap()],
    );
    assert!(checked.status.success(), "{}", text(&checked));
    let groups = std::fs::read_to_string(&asked_in).unwrap();
    assert!(
        groups
            .split_whitespace()
            .any(|group| group == gid.to_string()),
        "asked in {groups} ({user}'s groups include {gid})"
    );
}

// ---------------------------------------------------------------------------
// Pidfile

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_daemon_is_refused_naming_the_running_pid() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut first = Daemon::start(&db, "d", "pidfile: run/taskrunnerd.pid\n");
    let pidfile = first.dir.join("run/taskrunnerd.pid");
    assert_eq!(pid_in(&pidfile), Some(first.pid()));
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        format!("{}\n", first.pid())
    );

    let mut second = Daemon::start_with_config(&first.config, &[]);
    let status = second.wait_exit(WAIT);
    assert_eq!(status.code(), Some(1), "log:\n{}", second.log_text());
    let message = second.log_text();
    assert!(
        message.contains(&format!(
            "another taskrunnerd (pid {}) is running",
            first.pid()
        )),
        "{message}"
    );
    // The first daemon keeps its pidfile and its socket.
    assert_eq!(pid_in(&pidfile), Some(first.pid()));
    let answer = socket_exchange(&first.dir.join("run/daemon.sock"), b"status\n");
    let status: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(status["pid"], first.pid());

    assert!(first.stop().success());
    assert!(!pidfile.exists(), "removed on exit");
}

/// A daemon killed with SIGKILL leaves its pidfile and socket behind; the
/// next one takes both over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pidfile_and_socket_of_a_killed_daemon_are_taken_over() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut killed = Daemon::start(&db, "d", "pidfile: run/taskrunnerd.pid\n");
    let pidfile = killed.dir.join("run/taskrunnerd.pid");
    let socket = killed.dir.join("run/daemon.sock");
    killed.kill();
    assert_eq!(pid_in(&pidfile), Some(killed.pid()), "left behind");
    assert!(socket.exists(), "left behind");

    let mut next = killed.restart();
    next.wait_for_log("taking over the stale pidfile", WAIT);
    assert!(next
        .log_text()
        .contains(&format!("(pid {} is not running)", killed.pid())));
    assert_eq!(pid_in(&pidfile), Some(next.pid()));
    let answer = socket_exchange(&socket, b"status\n");
    let status: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(status["pid"], next.pid());
    assert!(next.stop().success());
    assert!(!pidfile.exists() && !socket.exists());
}

/// A daemon killed -9 while one of its tasks was between its `clone` and
/// its `exec` leaves that process holding the listening control socket for
/// a moment: it takes connections, never answers, and closes them as it
/// goes. The next daemon must not take it for a live daemon: under heavy
/// load the chaos test's restarted daemon refused to start so ("another
/// daemon answers on the control socket").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_socket_held_without_an_answer_does_not_stop_the_next_daemon() {
    use std::os::unix::fs::DirBuilderExt;
    let db = TestDb::new(Backend::Sqlite).await;
    let config = write_config(&db, "d", "");
    let run = config.parent().unwrap().join("run");
    std::fs::DirBuilder::new().mode(0o700).create(&run).unwrap();
    let socket = run.join("daemon.sock");
    let holder = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    holder.set_nonblocking(true).unwrap();
    let mut daemon = Daemon::start_with_config(&config, &[]);
    // The new daemon's connection is taken, never answered, and closed
    // with the holder.
    wait_until(WAIT, "the new daemon to connect", || {
        holder.accept().is_ok()
    });
    drop(holder);
    daemon.wait_ready();
    let answer = socket_exchange(&socket, b"status\n");
    let status: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(status["pid"], daemon.pid());
    assert!(daemon.stop().success());
}

// ---------------------------------------------------------------------------
// --daemonize

/// Runs `taskrunnerd --daemonize` with `config`, in its directory; the
/// launching process's output (it exits once the daemon is ready).
fn launch_daemonized(config: &Path) -> Output {
    Command::new(DAEMON)
        .arg("--config")
        .arg(config)
        .arg("--daemonize")
        .current_dir(config.parent().unwrap())
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonize_returns_once_ready_and_leaves_the_daemon_running() {
    let db = TestDb::new(Backend::Sqlite).await;
    let config = write_config(
        &db,
        "d",
        "pidfile: run/taskrunnerd.pid\nlog_file: taskrunnerd.log\n",
    );
    let dir = config.parent().unwrap().to_path_buf();
    let pidfile = dir.join("run/taskrunnerd.pid");
    let launch = || launch_daemonized(&config);
    let launched = launch();
    assert!(launched.status.success(), "{}", text(&launched));
    // Ready means the pidfile is written and the socket answers.
    let pid = pid_in(&pidfile).expect("the pidfile is written before the launcher exits");
    let _guard = KillOnDrop(pid);
    assert!(process_exists(pid));
    let answer = socket_exchange(&dir.join("run/daemon.sock"), b"status\n");
    let status: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(status["pid"], pid);
    // Detached: not our child, in a session of its own, not its leader.
    let fields = crate::util::stat_fields(pid);
    let (parent, session): (i32, i32) = (fields[1].parse().unwrap(), fields[3].parse().unwrap());
    assert_ne!(parent, std::process::id() as i32);
    assert_ne!(session, nix::unistd::getsid(None).unwrap().as_raw());
    assert_ne!(session, pid, "the second fork gives up session leadership");
    let log = dir.join("taskrunnerd.log");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("taskrunnerd started"));

    // A second launch fails, and the launcher says why.
    let refused = launch();
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains(&format!("another taskrunnerd (pid {pid}) is running")),
        "{}",
        text(&refused)
    );
    assert!(process_exists(pid));

    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    wait_until(WAIT, "the daemonized daemon to exit", || {
        !process_exists(pid)
    });
    wait_until(WAIT, "the pidfile to be removed", || !pidfile.exists());
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("taskrunnerd stopped"));
}

/// Runs the `postrotate` script of `init/taskrunner.logrotate` with its
/// pidfile at `pidfile`.
fn postrotate(pidfile: &Path) -> Output {
    let config = std::fs::read_to_string(init_dir().join("taskrunner.logrotate")).unwrap();
    let script = config
        .split_once("postrotate")
        .and_then(|(_, rest)| rest.split_once("endscript"))
        .expect("a postrotate script")
        .0
        .replace("/run/taskrunner/taskrunnerd.pid", pidfile.to_str().unwrap());
    Command::new("sh").args(["-c", &script]).output().unwrap()
}

/// A pidfile left by a daemon killed -9 (SysV and OpenRC restart nothing)
/// may name another process by the next rotation: logrotate's `postrotate`
/// sends SIGHUP only to a daemon holding the pidfile's lock. Before, it
/// sent SIGHUP to whatever the file named, which ended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logrotate_signals_no_process_a_stale_pidfile_names() {
    struct Bystander(std::process::Child);
    impl Drop for Bystander {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let scratch = Scratch::new("stale-pidfile");
    let mut bystander = Bystander(Command::new("sleep").arg("600").spawn().unwrap());
    let pidfile = scratch.join("taskrunnerd.pid");
    std::fs::write(&pidfile, format!("{}\n", bystander.0.id())).unwrap();
    let postrotated = postrotate(&pidfile);
    assert!(postrotated.status.success(), "{}", text(&postrotated));
    crate::util::holds_for(
        Duration::from_secs(1),
        "the bystander to live on",
        async || match bystander.0.try_wait().unwrap() {
            None => Ok(()),
            Some(status) => Err(status),
        },
    )
    .await;
}

/// Under SysV and OpenRC the daemon writes to its `log_file`, which nothing
/// rotated: a logrotate that moved it away left the daemon writing into
/// the moved file for ever. Now SIGHUP (logrotate's `postrotate`, see
/// `init/taskrunner.logrotate`) opens the file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_opens_a_daemonized_log_file_again_after_a_rotation() {
    let db = TestDb::new(Backend::Sqlite).await;
    let config = write_config(
        &db,
        "d",
        "pidfile: run/taskrunnerd.pid\nlog_file: taskrunnerd.log\n",
    );
    let dir = config.parent().unwrap().to_path_buf();
    let launched = launch_daemonized(&config);
    assert!(launched.status.success(), "{}", text(&launched));
    let pid = pid_in(&dir.join("run/taskrunnerd.pid")).expect("the pidfile");
    let _guard = KillOnDrop(pid);
    // What logrotate does: move the file away (a new one is created by
    // `create`, or by the daemon), then SIGHUP.
    let log = dir.join("taskrunnerd.log");
    let rotated = dir.join("taskrunnerd.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let postrotated = postrotate(&dir.join("run/taskrunnerd.pid"));
    assert!(postrotated.status.success(), "{}", text(&postrotated));
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    wait_until(WAIT, "the reload logged in the new log file", || {
        read(&log).contains("config reloaded")
    });
    assert!(read(&log).contains("log file"), "{}", read(&log));
    assert!(read(&rotated).contains("taskrunnerd started"));
    assert!(!read(&rotated).contains("config reloaded"));
    // The daemon's own lines about tries go there too.
    let id = db.enqueue("NoOp", Some("a: 1")).await;
    db.wait_for_state(id, "FINISHED", WAIT).await;
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    wait_until(WAIT, "the daemonized daemon to exit", || {
        !process_exists(pid)
    });
    assert!(read(&log).contains("taskrunnerd stopped"), "{}", read(&log));
    assert!(!read(&rotated).contains("taskrunnerd stopped"));
}

// ---------------------------------------------------------------------------
// Control socket

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_is_owner_only_and_survives_garbage() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut daemon = Daemon::start(&db, "d", "");
    let socket = daemon.dir.join("run/daemon.sock");
    let metadata = std::fs::symlink_metadata(&socket).unwrap();
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    let dir = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);

    let config = daemon.config.to_string_lossy().into_owned();
    let (code, out, err) = cli(&db, &["--config", &config, "status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["pid"], daemon.pid());
    assert_eq!(status["stopping"], false);
    let (code, out, err) = cli(&db, &["--config", &config, "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("(pid {})", daemon.pid())), "{out}");

    assert_eq!(socket_exchange(&socket, b"wake\n"), "{\"ok\":true}\n");

    // Garbage: answered with an error, and the daemon carries on.
    let huge = vec![b'x'; 100_000];
    for garbage in [
        &b"\xff\xfe\x00 not utf-8\n"[..],
        b"status please\n",
        b"\n",
        &huge,
    ] {
        let answer = socket_exchange(&socket, garbage);
        let value: serde_json::Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("answer to garbage {answer:?}: {e}"));
        assert!(value["error"].is_string(), "{answer}");
    }
    // A client that connects and says nothing holds up no one else.
    let silent = UnixStream::connect(&socket).unwrap();
    let (code, _, err) = cli(&db, &["--config", &config, "status"]);
    assert_eq!(code, 0, "{err}");
    drop(silent);
    assert!(daemon.child.try_wait().unwrap().is_none(), "still running");

    // stop: graceful, exit 0, socket removed.
    assert_eq!(socket_exchange(&socket, b"stop\n"), "{\"ok\":true}\n");
    let status = daemon.wait_exit(WAIT);
    assert!(status.success(), "log:\n{}", daemon.log_text());
    assert!(daemon
        .log_text()
        .contains("stop requested on the control socket"));
    assert!(!socket.exists());
    let (code, _, err) = cli(&db, &["--config", &config, "status"]);
    assert_eq!(code, 1);
    assert!(err.contains("no daemon answers on"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

// ---------------------------------------------------------------------------
// SIGHUP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_good_config_and_refuses_a_broken_one() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gate = db.scratch.join("gate");
    let gated = format!(
        "  Gated:\n    command: [/bin/sh, -c, 'while [ ! -e {} ]; do sleep 0.05; done; echo released']\n",
        gate.display()
    );
    let mut daemon = Daemon::start(&db, "d", &format!("tasks:\n{gated}"));
    let running = db.enqueue("Gated", None).await;
    let row = db.wait_for_pid(running, WAIT).await;
    let task_pid = row.pid.unwrap() as i32;

    // Good: Gated is gone from the file, Added is new.
    let base = base_config(&db, &daemon.dir);
    std::fs::write(
        &daemon.config,
        merge_yaml(&base, "tasks:\n  Added:\n    command: [/bin/echo, added]\n"),
    )
    .unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_log("config reloaded", WAIT);
    let added = db.enqueue("Added", None).await;
    let row = db.wait_for_state(added, "FINISHED", WAIT).await;
    assert_eq!(row.result_text.as_deref(), Some("added"));

    // Broken: refused with the reason; the old config stays.
    std::fs::write(
        &daemon.config,
        merge_yaml(
            &base,
            "tasks:\n  Added:\n    command: [/bin/echo, added]\n    timout: 1m\n",
        ),
    )
    .unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_log("config reload refused", WAIT);
    let refusal = daemon
        .log_text()
        .lines()
        .find(|l| l.contains("config reload refused"))
        .unwrap()
        .to_string();
    assert!(refusal.contains("timout"), "names the key: {refusal}");
    let again = db.enqueue("Added", None).await;
    db.wait_for_state(again, "FINISHED", WAIT).await;
    assert!(daemon.child.try_wait().unwrap().is_none(), "still running");

    // The task that ran through both reloads was not touched.
    assert!(process_exists(task_pid));
    assert_eq!(db.row(running).await.pid, Some(task_pid as _));
    std::fs::write(&gate, "").unwrap();
    let row = db.wait_for_state(running, "FINISHED", WAIT).await;
    assert_eq!(row.tries, 1);
    assert_eq!(row.result_text.as_deref(), Some("released"));
    assert!(daemon.stop().success());
}

/// Regression: a reload used to re-read the file alone, so flags given at
/// start (here `--max-concurrent`) were silently replaced by the file's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_the_command_line_flags() {
    let db = TestDb::new(Backend::Sqlite).await;
    let config = write_config(&db, "d", "max_concurrent: 1\n");
    let mut daemon = Daemon::start_with_config(&config, &["--max-concurrent", "3"]);
    daemon.wait_ready();
    let config_arg = config.to_string_lossy().into_owned();
    let max_concurrent = || {
        let (code, out, err) = cli(&db, &["--config", &config_arg, "status", "--json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["max_concurrent"].clone()
    };
    assert_eq!(max_concurrent(), 3);
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_log("config reloaded", WAIT);
    assert_eq!(max_concurrent(), 3, "the flag still wins over the file");
    assert!(daemon.stop().success());
}

// ---------------------------------------------------------------------------
// Logs and config commands

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line() {
    let db = TestDb::new(Backend::Sqlite).await;
    let config = write_config(&db, "d", "");
    let mut daemon = Daemon::start_with_config(&config, &["--log-format", "json"]);
    daemon.wait_ready();
    assert!(daemon.stop().success());
    let log = daemon.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let started = lines
        .iter()
        .find(|l| l["message"] == "taskrunnerd started")
        .unwrap_or_else(|| panic!("no start line in {log}"));
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["version"], env!("CARGO_PKG_VERSION"));
    assert!(started["timestamp"].is_string());
    assert!(started["database"]
        .as_str()
        .unwrap()
        .starts_with("sqlite://"));
    assert!(lines.iter().any(|l| l["message"] == "taskrunnerd stopped"));
}

fn cli_without_database(dir: &Path, args: &[&str]) -> Output {
    Command::new(CLI)
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap()
}

/// The init scripts refuse a restart whose config `config check` refuses,
/// leaving the running daemon running. It passed web settings the daemon
/// refuses at start (no `auth` on an address other than loopback, a token
/// file it cannot read or too short): a restart stopped a working daemon
/// and the new one exited. It now refuses them, as the daemon does.
#[test]
fn config_check_refuses_the_web_settings_the_daemon_refuses_at_start() {
    let scratch = Scratch::new("config-http");
    let path = scratch.join("taskrunner.yml");
    let path_text = path.to_string_lossy().into_owned();
    let short = scratch.join("short-token");
    std::fs::write(&short, "too short\n").unwrap();
    let cases = [
        ("  listen: 0.0.0.0:9100\n".to_string(), "without http.auth"),
        (
            "  listen: 127.0.0.1:9100\n  auth:\n    token_file: /nonexistent/token\n".to_string(),
            "reading http.auth.token_file /nonexistent/token",
        ),
        (
            format!(
                "  listen: 127.0.0.1:9100\n  auth:\n    token_file: {}\n",
                short.display()
            ),
            "at least 16 characters",
        ),
    ];
    for (http, why) in cases {
        std::fs::write(&path, format!("database_url: sqlite://q.db\nhttp:\n{http}")).unwrap();
        let check = cli_without_database(&scratch.path, &["config", "check", &path_text]);
        let stderr = String::from_utf8_lossy(&check.stderr).into_owned();
        assert_eq!(check.status.code(), Some(2), "{http}: {}", text(&check));
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(why), "{http}: {stderr}");
        // As the daemon does at start.
        let start = Command::new(DAEMON)
            .args(["--config", &path_text])
            .current_dir(&scratch.path)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        assert!(!start.status.success(), "{http}: {}", text(&start));
        let said = String::from_utf8_lossy(&start.stderr).into_owned();
        assert!(said.contains(why), "{http}: {said}");
    }
}

#[test]
fn config_init_writes_a_starter_that_config_check_accepts() {
    let scratch = Scratch::new("config");
    let path = scratch.join("taskrunner.yml");
    let path_text = path.to_string_lossy().into_owned();
    let init = cli_without_database(&scratch.path, &["config", "init", &path_text]);
    assert!(init.status.success(), "{}", text(&init));
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(written.starts_with('#'), "commented: {written}");

    let check = cli_without_database(&scratch.path, &["config", "check", &path_text]);
    assert!(check.status.success(), "{}", text(&check));
    let shown = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(shown.contains("shutdown_timeout: 30s"), "{shown}");
    assert!(
        shown.contains("# task types:") && shown.contains("Echo"),
        "{shown}"
    );
    // Without FILE: ./taskrunner.yml.
    let check = cli_without_database(&scratch.path, &["config", "check"]);
    assert!(check.status.success(), "{}", text(&check));

    // init never overwrites.
    std::fs::write(&path, "poll_interval: 5s\n").unwrap();
    let again = cli_without_database(&scratch.path, &["config", "init", &path_text]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "poll_interval: 5s\n"
    );

    // A mistake deep down: exit 2, one line naming the file, the line and the key.
    std::fs::write(
        &path,
        "poll_interval: 5s\ntasks:\n  Echo:\n    command: [/bin/cat]\n    timout: 1m\n",
    )
    .unwrap();
    let broken = cli_without_database(&scratch.path, &["config", "check", &path_text]);
    assert_eq!(broken.status.code(), Some(2), "{}", text(&broken));
    let error = String::from_utf8_lossy(&broken.stderr).into_owned();
    assert_eq!(error.trim().lines().count(), 1, "{error}");
    assert!(
        error.contains(&path_text) && error.contains("timout") && error.contains("line 5"),
        "{error}"
    );

    // The config shipped for services checks too.
    let shipped = init_dir().join("taskrunner.yml");
    let check = cli_without_database(
        &scratch.path,
        &["config", "check", &shipped.to_string_lossy()],
    );
    assert!(check.status.success(), "{}", text(&check));
}

/// A duration past what the clock can hold ahead (`timeout:
/// 10000000000000000000`, a number of seconds; or `1000000000d`) was accepted, and each try of its
/// type panicked in the daemon when it reckoned its deadline, leaving its
/// row RUNNING. Durations are at most a hundred years: one clear line.
#[test]
fn a_duration_of_more_than_a_hundred_years_is_a_config_error() {
    let scratch = Scratch::new("config");
    let path = scratch.join("taskrunner.yml");
    let path_text = path.to_string_lossy().into_owned();
    for (value, shown) in [
        ("10000000000000000000", "10000000000000000000"),
        ("1000000000d", "1000000000d"),
    ] {
        std::fs::write(
            &path,
            format!("tasks:\n  Slow:\n    command: [/bin/true]\n    timeout: {value}\n"),
        )
        .unwrap();
        let check = cli_without_database(&scratch.path, &["config", "check", &path_text]);
        assert_eq!(check.status.code(), Some(2), "{value}: {}", text(&check));
        let error = String::from_utf8_lossy(&check.stderr).into_owned();
        assert_eq!(error.trim().lines().count(), 1, "{error}");
        assert!(
            error.contains("more than 100 years") && error.contains(shown),
            "{error}"
        );
    }
    std::fs::write(
        &path,
        "tasks:\n  Slow:\n    command: [/bin/true]\n    timeout: 36500d\n",
    )
    .unwrap();
    let check = cli_without_database(&scratch.path, &["config", "check", &path_text]);
    assert!(check.status.success(), "{}", text(&check));
}

/// Values that leave nothing able to run are refused with one line and
/// exit status 2: `max_options` below 16 KiB (0, where 0 turns other limits
/// off, `REJECTED` every row with options, every callback and every flow),
/// and `enqueue --node X --not-node X` (no daemon could ever claim the row,
/// and `list` said it waited for node X). Both were taken before.
#[test]
fn a_max_options_too_small_and_a_node_also_excluded_are_refused() {
    let scratch = Scratch::new("config");
    let path = scratch.join("taskrunner.yml");
    let path_text = path.to_string_lossy().into_owned();
    std::fs::write(&path, "max_options: 0\n").unwrap();
    let check = cli_without_database(&scratch.path, &["config", "check", &path_text]);
    assert_eq!(check.status.code(), Some(2), "{}", text(&check));
    let error = String::from_utf8_lossy(&check.stderr).into_owned();
    assert_eq!(error.trim().lines().count(), 1, "{error}");
    assert!(
        error.contains("max_options: must be at least 16KiB (got 0B)"),
        "{error}"
    );
    std::fs::write(&path, "max_options: 16KiB\n").unwrap();
    let check = cli_without_database(&scratch.path, &["config", "check", &path_text]);
    assert!(check.status.success(), "{}", text(&check));
    let url = format!("sqlite://{}", scratch.join("requests.db").display());
    let migrate = cli_without_database(&scratch.path, &["--database-url", &url, "migrate"]);
    assert!(migrate.status.success(), "{}", text(&migrate));
    let enqueue = cli_without_database(
        &scratch.path,
        &[
            "--database-url",
            &url,
            "enqueue",
            "NoOp",
            "--node",
            "web-1",
            "--not-node",
            "web-1",
        ],
    );
    assert_eq!(enqueue.status.code(), Some(2), "{}", text(&enqueue));
    let error = String::from_utf8_lossy(&enqueue.stderr).into_owned();
    assert_eq!(error.trim().lines().count(), 1, "{error}");
    assert!(
        error.contains("--node and --not-node: both name web-1"),
        "{error}"
    );
}

/// A second install in a PostgreSQL schema of its own (its URL sets
/// `search_path`, as the README shows) beside one in `public` of the same
/// database. The migrations' look-up of a table by name did not say which
/// schema: it found `public`'s bookkeeping table, took the new schema for
/// migrated, and every `migrate` failed on a table that was not there.
/// Now each install has its own tables and runs its own rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_second_install_in_its_own_schema_beside_one_in_public_runs() {
    let public = TestDb::new(Backend::Postgres).await;
    let waiting = public.enqueue("NoOp", None).await;
    public.execute("CREATE SCHEMA jobs").await;
    let jobs = TestDb::on_server(&format!("{}?options=-c%20search_path%3Djobs", public.url)).await;
    assert_eq!(
        public
            .scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'jobs' AND tablename LIKE 'task_runner%'")
            .await,
        public
            .scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'task_runner%'")
            .await,
    );
    let id = jobs.enqueue("NoOp", None).await;
    let mut daemon = Daemon::start(&jobs, "d", "");
    jobs.wait_for_state(id, "FINISHED", Duration::from_secs(30))
        .await;
    assert!(daemon.stop().success());
    assert_eq!(
        public.row(waiting).await.result,
        None,
        "public's row is left alone"
    );
}

/// A database down at boot: the daemon waits for it, retrying, and its
/// launcher waited as long, and so the init script's `start` and the boot
/// (SysV, OpenRC). The launcher now returns after a bound (60 s; here
/// 1.5 s), saying so, and the daemon goes on trying in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonize_returns_after_a_bound_while_the_database_is_down() {
    let scratch = Scratch::new("launch-wait");
    // A port nothing listens on: every connection is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = scratch.join("taskrunner.yml");
    std::fs::write(
        &config,
        format!(
            "database_url: postgres://nobody@127.0.0.1:{port}/none\nsocket: run/daemon.sock\npidfile: run/taskrunnerd.pid\nlog_file: taskrunnerd.log\n"
        ),
    )
    .unwrap();
    let mut launcher = Command::new(DAEMON)
        .arg("--config")
        .arg(&config)
        .arg("--daemonize")
        .current_dir(&scratch.path)
        .env_remove("DATABASE_URL")
        .env("TASKRUNNER_TEST_LAUNCH_WAIT_MS", "1500")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let launcher_pid = launcher.id() as i32;
    let _launcher_guard = KillOnDrop(launcher_pid);
    // Before, it waited for ever: the test fails instead.
    wait_until(WAIT, "the launcher to return", || {
        launcher.try_wait().unwrap().is_some()
    });
    let launched = launcher.wait_with_output().unwrap();
    let shown = text(&launched);
    assert!(launched.status.success(), "{shown}");
    assert!(shown.contains("not ready after 1500ms"), "{shown}");
    let running = daemons_using(&config);
    assert_eq!(running.len(), 1, "the daemon goes on trying: {running:?}");
    let _guard = KillOnDrop(running[0]);
    kill(Pid::from_raw(running[0]), Signal::SIGTERM).unwrap();
    wait_until(WAIT, "the waiting daemon to stop", || {
        !process_exists(running[0])
    });
}
