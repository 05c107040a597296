//! A `taskrunnerd` process started from config parts, and the CLI run
//! against a test's database.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_yaml::{Mapping, Value};

use taskrunner::request::{Request, RequestId};

use super::{
    copy_executable, poll_blocking, process_exists, wait_until, watchdogs_of, TestDb, Text, CLI,
    DAEMON,
};

/// The base config every test daemon gets; tests append their own keys.
pub fn base_config(db: &TestDb, dir: &Path) -> String {
    format!(
        "database_url: {}\npoll_interval: 1s\nheartbeat_interval: 1s\nlease_timeout: 5s\nkill_grace: 2s\nkill_retry: 1s\nshutdown_timeout: 5s\nretry_delay: 1s\nsocket: {}\n",
        db.url,
        dir.join("run/daemon.sock").display()
    )
}

/// `extra`'s top-level keys replace `base`'s.
pub fn merge_yaml(base: &str, extra: &str) -> String {
    let mut merged: serde_yaml::Mapping = serde_yaml::from_str(base).unwrap();
    if !extra.trim().is_empty() {
        let extra: serde_yaml::Mapping = serde_yaml::from_str(extra).expect("test config YAML");
        for (key, value) in extra {
            merged.insert(key, value);
        }
    }
    serde_yaml::to_string(&merged).unwrap()
}

/// A daemon's config built from parts: the base config, YAML text, single
/// keys and task types, each value escaped by the YAML writer (a task's
/// shell script needs no hand quoting). Top-level keys given later replace
/// earlier ones, as in [`merge_yaml`].
pub struct DaemonBuilder<'a> {
    db: &'a TestDb,
    name: String,
    config: Mapping,
    tasks: Mapping,
    env: Vec<(String, String)>,
    process: ProcessSettings,
}

/// How the daemon's process is started, beyond its config and environment.
#[derive(Default, Clone, Copy)]
struct ProcessSettings {
    /// `RLIMIT_NOFILE` (soft, hard).
    open_files: Option<(u64, u64)>,
    /// `RLIMIT_CPU` (soft, hard), as a unit's `LimitCPU=` sets it.
    cpu_seconds: Option<(u64, u64)>,
    /// The user (and group) to run as.
    uid: Option<u32>,
    /// The timer slack of its threads (`PR_SET_TIMERSLACK`, inherited by every
    /// thread it starts): each short sleep then lasts up to this much longer,
    /// as on a heavily loaded machine.
    timer_slack: Option<Duration>,
    /// Started in a PID namespace of its own (`unshare --pid`), as in a
    /// container: its pid there is 1, and its tasks' pids mean nothing
    /// outside it. Its `Daemon` is then the `unshare` process, which kills
    /// it (SIGKILL) when it dies.
    pid_namespace: bool,
    /// A cgroup's join file (`…/cgroup.procs`) it moves itself into before
    /// it execs: the daemon then starts in that cgroup, and makes its tries'
    /// cgroups under it.
    cgroup: Option<&'static std::ffi::CStr>,
    /// Started with SIGCHLD and SIGUSR2 ignored, as by a launcher that
    /// ignores them (ignored signals stay ignored across `execve`).
    ignoring_signals: bool,
}

impl TestDb {
    /// A daemon on this database, in directory `name` of the test's scratch dir.
    pub fn daemon(&self, name: &str) -> DaemonBuilder<'_> {
        let dir = self.scratch.join(name);
        DaemonBuilder {
            db: self,
            name: name.to_string(),
            config: serde_yaml::from_str(&base_config(self, &dir)).unwrap(),
            tasks: Mapping::new(),
            env: Vec::new(),
            process: ProcessSettings::default(),
        }
    }
}

impl DaemonBuilder<'_> {
    /// One top-level key: `.set("max_concurrent", 2)`, `.set("retry_delay", "1s")`.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.config.insert(key.into(), value.into());
        self
    }

    /// YAML text whose top-level keys replace those set so far.
    pub fn yaml(mut self, extra: &str) -> Self {
        if !extra.trim().is_empty() {
            let extra: Mapping = serde_yaml::from_str(extra).expect("test config YAML");
            for (key, value) in extra {
                if key.as_str() == Some("tasks") {
                    self.tasks.clear();
                }
                self.config.insert(key, value);
            }
        }
        self
    }

    /// A task type running `command` (program and arguments), with the
    /// task settings `settings` (YAML text, may be empty).
    pub fn task(mut self, name: &str, command: &[&str], settings: &str) -> Self {
        let mut task: Mapping = if settings.trim().is_empty() {
            Mapping::new()
        } else {
            serde_yaml::from_str(settings).expect("task settings YAML")
        };
        let command: Vec<Value> = command.iter().map(|arg| Value::from(*arg)).collect();
        task.insert("command".into(), Value::Sequence(command));
        self.tasks.insert(name.into(), Value::Mapping(task));
        self
    }

    /// A task type running `script` with `/bin/sh -c`.
    pub fn shell_task(self, name: &str, script: &str) -> Self {
        self.task(name, &["/bin/sh", "-c", script], "")
    }

    /// An environment variable of the daemon's process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn envs(mut self, env: &[(&str, &str)]) -> Self {
        for (key, value) in env {
            self = self.env(key, value);
        }
        self
    }

    /// Runs it under an `RLIMIT_NOFILE` of (soft, hard).
    pub fn open_files(mut self, nofile: (u64, u64)) -> Self {
        self.process.open_files = Some(nofile);
        self
    }

    /// Runs it under an `RLIMIT_CPU` of (soft, hard) seconds.
    pub fn cpu_seconds(mut self, cpu: (u64, u64)) -> Self {
        self.process.cpu_seconds = Some(cpu);
        self
    }

    /// Runs it as user `uid` (the test must be root).
    pub fn uid(mut self, uid: u32) -> Self {
        self.process.uid = Some(uid);
        self
    }

    /// Runs it with every short sleep overrunning by up to `slack`, as on a
    /// heavily loaded machine (see [`ProcessSettings::timer_slack`]).
    pub fn timer_slack(mut self, slack: Duration) -> Self {
        self.process.timer_slack = Some(slack);
        self
    }

    /// Starts it in the cgroup whose join file is `join` (the test must be
    /// root).
    pub fn in_cgroup(mut self, join: &Path) -> Self {
        use std::os::unix::ffi::OsStrExt;
        let join = std::ffi::CString::new(join.as_os_str().as_bytes()).unwrap();
        self.process.cgroup = Some(Box::leak(join.into_boxed_c_str()));
        self
    }

    /// Starts it with SIGCHLD and SIGUSR2 ignored, as a launcher that
    /// ignores them would.
    pub fn ignoring_signals(mut self) -> Self {
        self.process.ignoring_signals = true;
        self
    }

    /// Runs it in a PID namespace of its own (the test must be root).
    pub fn own_pid_namespace(mut self) -> Self {
        self.process.pid_namespace = true;
        self
    }

    /// The config as YAML text.
    pub fn config_text(&self) -> String {
        let mut config = self.config.clone();
        if !self.tasks.is_empty() {
            let mut tasks = match config.remove("tasks") {
                Some(Value::Mapping(tasks)) => tasks,
                _ => Mapping::new(),
            };
            for (name, task) in &self.tasks {
                tasks.insert(name.clone(), task.clone());
            }
            config.insert("tasks".into(), Value::Mapping(tasks));
        }
        serde_yaml::to_string(&config).unwrap()
    }

    /// Writes the config file into the daemon's directory; returns its path.
    pub fn write_config(&self) -> PathBuf {
        let dir = self.db.scratch.join(&self.name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("taskrunner.yml");
        std::fs::write(&config, self.config_text()).unwrap();
        config
    }

    /// Starts a daemon that must refuse to start; its exit code and its
    /// log once it has exited (within 30 s).
    pub fn refused(&self) -> (Option<i32>, String) {
        let mut daemon = Daemon::start_with_config(&self.write_config(), &[]);
        let status = daemon.wait_exit(Duration::from_secs(30));
        (status.code(), daemon.log_text())
    }

    /// Starts the daemon and waits until it is ready.
    pub fn start(self) -> Daemon {
        let config = self.write_config();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        let mut daemon = Daemon::spawn(&config, &[], &env, self.process);
        daemon.wait_ready();
        daemon
    }
}

/// A `taskrunnerd` process, killed (SIGKILL) if still running when dropped.
pub struct Daemon {
    pub child: Child,
    pub config: PathBuf,
    pub log: PathBuf,
    pub dir: PathBuf,
}

impl Daemon {
    /// Starts a daemon with the base config plus `extra` YAML, in its own
    /// directory under the test's scratch dir.
    pub fn start(db: &TestDb, name: &str, extra: &str) -> Daemon {
        db.daemon(name).yaml(extra).start()
    }

    /// Waits until the daemon logs that it started; fails with its log if it exits first.
    pub fn wait_ready(&mut self) {
        poll_blocking(Duration::from_secs(30), "taskrunnerd to start", || {
            if self.log_text().contains("taskrunnerd started") {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "taskrunnerd exited with {status} at start; log:\n{}",
                    self.log_text()
                );
            }
            Err(Text(self.log_text()))
        })
    }

    pub fn start_with_config(config: &Path, args: &[&str]) -> Daemon {
        Daemon::start_with_env(config, args, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables.
    pub fn start_in_env(db: &TestDb, name: &str, extra: &str, env: &[(&str, &str)]) -> Daemon {
        db.daemon(name).yaml(extra).envs(env).start()
    }

    pub fn start_with_env(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(config, args, env, ProcessSettings::default())
    }

    /// Like [`Daemon::start_in_env`], as user `uid` (the test must be root).
    pub fn start_as(
        db: &TestDb,
        name: &str,
        extra: &str,
        env: &[(&str, &str)],
        uid: u32,
    ) -> Daemon {
        db.daemon(name).yaml(extra).envs(env).uid(uid).start()
    }

    /// Like [`Daemon::start`], under an `RLIMIT_NOFILE` of (soft, hard).
    pub fn start_with_open_files(
        db: &TestDb,
        name: &str,
        extra: &str,
        nofile: (u64, u64),
    ) -> Daemon {
        db.daemon(name).yaml(extra).open_files(nofile).start()
    }

    fn spawn(
        config: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        process: ProcessSettings,
    ) -> Daemon {
        let dir = config.parent().unwrap().to_path_buf();
        let log = dir.join(format!(
            "daemon-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut command = if process.pid_namespace {
            let mut command = Command::new("unshare");
            command
                .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
                .arg(DAEMON);
            command
        } else {
            Command::new(DAEMON)
        };
        if let Some(uid) = process.uid {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(uid);
        }
        if process.open_files.is_some()
            || process.cpu_seconds.is_some()
            || process.timer_slack.is_some()
            || process.cgroup.is_some()
            || process.ignoring_signals
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit, prctl, open, write, close and signal are
            // async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    if let Some(join) = process.cgroup {
                        let fd = libc::open(join.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                        if fd < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                        if written != 1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    for (resource, limit) in [
                        (libc::RLIMIT_NOFILE, process.open_files),
                        (libc::RLIMIT_CPU, process.cpu_seconds),
                    ] {
                        let Some((soft, hard)) = limit else { continue };
                        let limit = libc::rlimit {
                            rlim_cur: soft,
                            rlim_max: hard,
                        };
                        if libc::setrlimit(resource, &limit) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if let Some(slack) = process.timer_slack {
                        super::set_timer_slack(slack)?;
                    }
                    if process.ignoring_signals {
                        for signal in [libc::SIGCHLD, libc::SIGUSR2] {
                            if libc::signal(signal, libc::SIG_IGN) == libc::SIG_ERR {
                                return Err(std::io::Error::last_os_error());
                            }
                        }
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .arg("--config")
            .arg(config)
            .args(args)
            .current_dir(&dir)
            .env("TASKRUNNER_LOG", "debug,sqlx=warn")
            .env_remove("DATABASE_URL")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting taskrunnerd");
        Daemon {
            child,
            config: config.to_path_buf(),
            log,
            dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
    }

    /// Sends SIGHUP and waits for the daemon's line on the reload
    /// (`config reloaded` or `config reload refused`); sent again while the
    /// daemon says it was not ready for it (it logs its start a moment
    /// before it takes reloads).
    pub fn reload(&self) {
        let count = |needle: &str| self.log_text().matches(needle).count();
        let reloads = count("config reload");
        loop {
            let ignored = count("SIGHUP before the daemon was ready");
            self.signal(nix::sys::signal::Signal::SIGHUP);
            let reloaded = poll_blocking(
                Duration::from_secs(30),
                "the daemon's answer to SIGHUP",
                || {
                    if count("config reload") > reloads {
                        Ok(true)
                    } else if count("SIGHUP before the daemon was ready") > ignored {
                        Ok(false)
                    } else {
                        Err(Text(self.log_text()))
                    }
                },
            );
            if reloaded {
                return;
            }
        }
    }

    /// Rewrites its config file as the test's base config with `extra`
    /// (YAML, its top-level keys replacing the base's), then [`reload`]s.
    ///
    /// [`reload`]: Daemon::reload
    pub fn reload_with(&self, db: &TestDb, extra: &str) {
        std::fs::write(&self.config, merge_yaml(&base_config(db, &self.dir), extra)).unwrap();
        self.reload();
    }

    /// Waits for the daemon to exit, failing the test after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        poll_blocking(timeout, "taskrunnerd to exit", || {
            match self.child.try_wait().unwrap() {
                Some(status) => Ok(status),
                None => Err(Text(self.log_text())),
            }
        })
    }

    /// `kill -9`, as a host's crash, and waits for the exit.
    pub fn kill(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(60));
    }

    /// `kill -9` of the daemon and of its fencing watchdog (PostgreSQL,
    /// MariaDB) at once, as `pkill -9 taskrunnerd` does: nothing kills
    /// what its tasks left behind (the watchdog would, at the daemon's
    /// death).
    pub fn kill_with_its_watchdog(&mut self) {
        for watchdog in watchdogs_of(self.pid()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(watchdog),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.kill();
    }

    /// A new daemon on this one's config (once it has exited), ready.
    pub fn restart(&self) -> Daemon {
        let mut daemon = Daemon::start_with_config(&self.config, &[]);
        daemon.wait_ready();
        daemon
    }

    /// The daemon's crash while request `id`'s task left `grandchild`
    /// behind: `kill -9` of the daemon and its watchdog, which the
    /// grandchild outlives (checked), then a restarted daemon. Returns it and the row once it
    /// has ended again; whether the grandchild is gone is the caller's
    /// question.
    pub async fn kill_leaving_grandchild_and_restart(
        &mut self,
        db: &TestDb,
        id: RequestId,
        grandchild: i32,
    ) -> (Daemon, Request) {
        self.kill_with_its_watchdog();
        assert!(
            process_exists(grandchild),
            "the grandchild outlives the daemon"
        );
        let daemon = self.restart();
        let row = db
            .wait_for(id, Duration::from_secs(30), "ended", |r| {
                !matches!(r.result.as_deref(), Some("RUNNING") | Some("CRASHED"))
            })
            .await;
        (daemon, row)
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(30))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        wait_until(timeout, &format!("the daemon to log `{needle}`"), || {
            self.log_text().contains(needle)
        });
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test shows what its daemons said (the harness prints a
        // failed test's captured output, CI's log included).
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(120)..];
            eprintln!(
                "--- the last {} lines of {}:\n{}",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `taskrunner-cli` with the test's database and returns (status, stdout, stderr).
pub fn cli(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    let args = [&["--database-url", db.url.as_str()], args].concat();
    bare_cli(&db.scratch.path, &args)
}

/// A copy of `taskrunner-cli` that the user `nobody` may run, in the
/// test's scratch directory, whose files (SQLite's database among them)
/// `nobody` may then read and write: for a CLI run as another user than
/// the daemon and its tasks (`setpriv --reuid=65534 …`).
pub fn cli_copy_for_nobody(db: &TestDb) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let cli_copy = db.scratch.join("taskrunner-cli");
    copy_executable(Path::new(CLI), &cli_copy);
    for entry in std::fs::read_dir(&db.scratch.path).unwrap() {
        let path = entry.unwrap().path();
        let mode = if path == cli_copy { 0o755 } else { 0o666 };
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
    }
    std::fs::set_permissions(&db.scratch.path, std::fs::Permissions::from_mode(0o777)).unwrap();
    cli_copy
}

/// Runs `command`, a `taskrunner-cli` behind a wrapper (`setpriv`,
/// `unshare`) with `args` after the test's database, in the test's
/// scratch directory without the environment's `DATABASE_URL`; returns
/// its standard output and error once it has succeeded.
pub fn wrapped_cli(db: &TestDb, command: &mut Command, args: &[&str]) -> (String, String) {
    let output = command
        .args(["--database-url", db.url.as_str()])
        .args(args)
        .current_dir(&db.scratch.path)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stdout}{stderr}");
    (stdout, stderr)
}

/// Starts `taskrunner-cli` with the test's database, as [`cli`] runs it,
/// without waiting for it to end; its output is piped.
pub fn spawn_cli(db: &TestDb, args: &[&str]) -> Child {
    spawn_cli_in_env(db, args, &[])
}

/// [`spawn_cli`] with the environment variables `env` set (a test hook's).
pub fn spawn_cli_in_env(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(CLI)
        .args(["--database-url", db.url.as_str()])
        .args(args)
        .current_dir(&db.scratch.path)
        .env_remove("DATABASE_URL")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting taskrunner-cli")
}

/// Runs `taskrunner-cli` in `dir` with only the given arguments (no test
/// database) and returns (status, stdout, stderr).
pub fn bare_cli(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(CLI)
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .output()
        .expect("running taskrunner-cli");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The `lock retries` a running daemon reports in `status` (0 when none).
pub fn lock_retries(daemon: &Daemon) -> u64 {
    let output = Command::new(CLI)
        .arg("--config")
        .arg(&daemon.config)
        .arg("status")
        .output()
        .expect("running taskrunner-cli status");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("lock retries: "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// While request `held`'s outcome waits for the lock of `parent` ("batch
/// 7", "flow 3"), which another session holds: a row of no batch or flow
/// enqueued now runs and is recorded, `held` stays RUNNING, and the wait is
/// logged once it has lasted a second.
pub async fn set_aside_while_others_are_recorded(
    db: &TestDb,
    daemon: &Daemon,
    held: RequestId,
    parent: &str,
) {
    let other = db.enqueue("NoOp", None).await;
    let row = db
        .wait_for_state(other, "FINISHED", Duration::from_secs(10))
        .await;
    assert_eq!(row.tries, 1, "{row:?}");
    let waiting = db.row(held).await;
    assert_eq!(
        waiting.result.as_deref(),
        Some("RUNNING"),
        "its outcome waits for the lock of its {parent}: {waiting:?}"
    );
    daemon.wait_for_log(
        &format!("request {held}'s outcome waits for the lock of its {parent}"),
        Duration::from_secs(10),
    );
}
