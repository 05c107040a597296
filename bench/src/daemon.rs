//! One `taskrunnerd` process with a generated config file, as an operator
//! would run it: default log level, its own directory, no DATABASE_URL.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::database::Bench;

pub const DAEMON: &str = "taskrunnerd";
pub const CLI: &str = "taskrunner-cli";
pub const TASKS: &str = "taskrunner-builtin-tasks";

/// A running daemon, killed (SIGKILL) if it is still running when dropped.
pub struct Daemon {
    child: Child,
    log: PathBuf,
    pub config: PathBuf,
}

/// What the kernel says about a process: peak and current resident memory,
/// and CPU time (its own, and that of its waited-for children).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub peak_rss_kib: u64,
    pub rss_kib: u64,
    pub cpu: Duration,
    pub children_cpu: Duration,
    /// Context switches of all its threads, voluntary and not.
    pub context_switches: u64,
}

impl Daemon {
    /// Writes `taskrunner.yml` in `dir` (`database_url`, `socket` and the
    /// given extra lines) and starts a daemon on it; returns once it is ready.
    pub async fn start(
        bench: &Bench,
        dir: &Path,
        database_url: &str,
        extra_config: &str,
    ) -> Result<Daemon> {
        Daemon::start_logging(bench, dir, database_url, extra_config, None).await
    }

    /// [`Daemon::start`] with `TASKRUNNER_LOG` set to `log_filter` (the
    /// default level when `None`).
    pub async fn start_logging(
        bench: &Bench,
        dir: &Path,
        database_url: &str,
        extra_config: &str,
        log_filter: Option<&str>,
    ) -> Result<Daemon> {
        let config = dir.join("taskrunner.yml");
        let text = format!(
            "database_url: {database_url}\nsocket: {}\nshutdown_timeout: 5s\n{extra_config}",
            dir.join("run/taskrunnerd.sock").display()
        );
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let log = dir.join("taskrunnerd.log");
        let mut command = Command::new(bench.binary(DAEMON));
        command
            .arg("--config")
            .arg(&config)
            .current_dir(dir)
            .env_remove("DATABASE_URL")
            .env_remove("TASKRUNNER_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        if let Some(filter) = log_filter {
            command.env("TASKRUNNER_LOG", filter);
        }
        // SAFETY: prctl is async-signal-safe. A bench that dies (Ctrl-C, a
        // panic) takes its daemons with it; they in turn take their tasks.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().context("starting taskrunnerd")?;
        let mut daemon = Daemon { child, log, config };
        daemon.wait_ready().await?;
        Ok(daemon)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.log_text().contains("taskrunnerd started") {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "taskrunnerd exited with {status} at start; its log:\n{}",
                    self.log_text()
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "taskrunnerd did not start within 30s; its log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn usage(&self) -> Result<Usage> {
        usage_of(self.pid())
    }

    /// The statements (database round trips) the daemon has sent, from
    /// `taskrunner-cli status --json` over its control socket.
    pub fn statements(&self, bench: &Bench) -> Result<u64> {
        let output = Command::new(bench.binary(CLI))
            .arg("--config")
            .arg(&self.config)
            .args(["status", "--json"])
            .output()
            .context("running taskrunner-cli status")?;
        if !output.status.success() {
            bail!(
                "taskrunner-cli status failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let status: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("reading status --json")?;
        status["database_statements"]
            .as_u64()
            .context("status --json has no database_statements")
    }

    /// SIGTERM, then waits for a clean exit (SIGKILL after 30 s).
    pub async fn stop(mut self) -> Result<()> {
        // SAFETY: signalling our own child, which has not been waited for.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!(
                        "taskrunnerd exited with {status}; its log:\n{}",
                        tail(&self.log_text())
                    );
                }
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("taskrunnerd did not stop within 30s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Reads `/proc/PID/status` (VmHWM, VmRSS) and `/proc/PID/stat` (CPU times).
pub fn usage_of(pid: u32) -> Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("reading /proc/PID/status")?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse().ok())
            .unwrap_or(0)
    };
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc/PID/stat")?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks =
        |index: usize| -> u64 { fields.get(index).and_then(|v| v.parse().ok()).unwrap_or(0) };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let seconds = |ticks: u64| Duration::from_secs_f64(ticks as f64 / per_second);
    // utime, stime, cutime, cstime are fields 14-17 of stat; 0-based 11-14 after the name.
    Ok(Usage {
        peak_rss_kib: kib("VmHWM:"),
        rss_kib: kib("VmRSS:"),
        cpu: seconds(ticks(11) + ticks(12)),
        children_cpu: seconds(ticks(13) + ticks(14)),
        context_switches: context_switches(pid),
    })
}

/// Context switches of every thread of `pid` still alive.
fn context_switches(pid: u32) -> u64 {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    threads
        .flatten()
        .filter_map(|thread| std::fs::read_to_string(thread.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|line| line.contains("ctxt_switches:"))
                .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}
