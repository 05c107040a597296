//! The fencing watchdog: a small process of its own, beside the daemon,
//! that kills the daemon's task processes when the daemon has renewed no
//! lease for `lease_timeout − heartbeat_interval` (with the defaults; a
//! shorter margin than the interval where the lease is tight).
//!
//! The heartbeat fences the daemon off by itself (heartbeat.rs): when it
//! cannot renew its leases, it kills its tasks before another daemon may
//! take their rows over. That needs the daemon to run. A daemon that does
//! not (`SIGSTOP`, a debugger, a process freezer that left its tasks out, a
//! runtime thread stuck in a system call) kills nothing, and its tries ran
//! on beside their reruns on other hosts once the lease lapsed. The
//! watchdog runs apart: after each renewal the heartbeat writes it a
//! deadline (on `CLOCK_BOOTTIME`, which counts a suspended machine's time
//! too, measured from when the renewal was sent, before the database wrote
//! the new `heartbeat_at`); at the deadline it kills every task process of
//! the daemon, with `SIGKILL`, and its process group (and, on cgroup v2, its
//! try's cgroup). That is when the daemon's own fence would have sent
//! `SIGKILL` after its `SIGTERM` and `kill_grace`: a daemon that runs and
//! fences itself has ended them already, and the watchdog finds nothing.
//! A deadline fires once; the next renewal sets the next.
//!
//! Which processes: the daemon's children, found in `/proc` (a try is one,
//! exec'd or forked from a preloaded parent with `CLONE_PARENT`; a
//! preloaded parent is one too, and a new one is started at its next try).
//! Each is pinned with a pidfd before it is signalled and checked to be
//! the daemon's child still, so a pid reused meanwhile is never hit; a
//! group is signalled through the pidfd of its leader (Linux 6.9), which
//! names that group even once the leader is reaped.
//!
//! The watchdog is the daemon's executable run again (`taskrunnerd
//! --fencing-watchdog`), started like a task from a spawner thread: its own
//! process group (a Ctrl-C to the daemon's does not reach it), the
//! parent-death signal (it dies with the daemon). It ignores SIGTERM,
//! SIGINT and SIGHUP (a service manager signals the whole unit at a stop;
//! the daemon's drain still needs it) and ends when its pipe closes. It
//! reads its deadlines on stdin: 16 bytes a write (the renewal's time and
//! the deadline, nanoseconds, native order; a deadline of 0: none), and
//! says what it did on stderr, which the daemon logs. Only the PostgreSQL
//! and MariaDB/MySQL backends run one: on SQLite the daemon does not fence
//! itself (one host; its reaper knows a stopped daemon's tries are alive).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

use super::spawner::{kill_through, pidfd_open, pipe_pair};
use super::{Recipe, Spawner};

/// The flag that makes `taskrunnerd` the watchdog.
pub const FLAG: &str = "--fencing-watchdog";

/// The time on `CLOCK_BOOTTIME`: since the machine booted, its suspended
/// time included.
pub(crate) fn boot_clock() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a local.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// The daemon's side: the latest deadline, and the pipe to the watchdog
/// that [`Watchdog::run`] keeps running.
#[derive(Default)]
pub(crate) struct Watchdog {
    /// When the latest renewal was sent, and the deadline (nanoseconds on
    /// [`boot_clock`]; 0: none).
    renewed: AtomicU64,
    deadline: AtomicU64,
    pipe: Mutex<Option<OwnedFd>>,
}

impl Watchdog {
    /// From now on, the daemon's tasks are killed at `deadline` unless a
    /// later call moves it; `renewed` is when the renewal was sent (for the
    /// watchdog's log line). `None`: never.
    pub(crate) fn set_deadline(&self, renewed: Duration, deadline: Option<Duration>) {
        // 0 means none: a time is at least 1.
        let at = |at: Duration| nanos(at).max(1);
        self.renewed.store(at(renewed), Ordering::Relaxed);
        self.deadline
            .store(deadline.map_or(0, at), Ordering::Relaxed);
        self.send();
    }

    /// Writes the latest deadline to the watchdog, if one runs. A full pipe
    /// (a watchdog that has not read for hours) keeps its older deadlines:
    /// the write is skipped, never waited for.
    fn send(&self) {
        let pipe = self.pipe.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pipe) = pipe.as_ref() else {
            return;
        };
        let mut message = [0u8; 16];
        message[..8].copy_from_slice(&self.renewed.load(Ordering::Relaxed).to_ne_bytes());
        message[8..].copy_from_slice(&self.deadline.load(Ordering::Relaxed).to_ne_bytes());
        // SAFETY: a 16-byte write from a local to our non-blocking pipe;
        // writes of up to PIPE_BUF bytes are whole or not at all.
        unsafe { libc::write(pipe.as_raw_fd(), message.as_ptr().cast(), message.len()) };
    }

    /// Keeps a watchdog process running until `stop`: one that ends is
    /// started again a second later (with one log line), and is sent the
    /// latest deadline. At `stop` the process is killed (the daemon's tries
    /// have ended by then).
    pub(crate) async fn run(
        self: Arc<Self>,
        spawner: Spawner,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut failing = false;
        loop {
            match self.start(&spawner).await {
                Ok(mut child) => {
                    failing = false;
                    let pid = child.pid;
                    tokio::select! {
                        status = child.wait() => {
                            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                            tracing::warn!("the fencing watchdog (pid {pid}) ended ({status}): starting a new one");
                        }
                        _ = stop.cancelled() => return Ok(()),
                    }
                }
                Err(error) if !failing => {
                    failing = true;
                    tracing::error!(
                        "cannot start the fencing watchdog: {error}; trying again every second (until then a stopped daemon's tasks are killed only when it resumes)"
                    );
                }
                Err(_) => {}
            }
            *self.pipe.lock().unwrap_or_else(|e| e.into_inner()) = None;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return Ok(()),
            }
        }
    }

    async fn start(&self, spawner: &Spawner) -> io::Result<super::spawner::Child> {
        let (theirs, ours) = pipe_pair()?;
        // SAFETY: sets a flag on our own descriptor.
        unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut args = vec![FLAG.to_string()];
        if let Some(base) = super::cgroup::in_force().and_then(|c| c.v2_base()) {
            args.push(base.display().to_string());
        }
        let mut child = spawner
            .spawn(Recipe {
                // The daemon's own executable, even once a deploy replaced
                // its file.
                program: PathBuf::from("/proc/self/exe"),
                args,
                workdir: PathBuf::from("/"),
                stdin_fd: Some(Arc::new(theirs)),
                ..Recipe::default()
            })
            .await?;
        *self.pipe.lock().unwrap_or_else(|e| e.into_inner()) = Some(ours);
        self.send();
        for fd in [child.stdout.take(), child.stderr.take()]
            .into_iter()
            .flatten()
        {
            tokio::spawn(log_lines(fd));
        }
        Ok(child)
    }
}

/// Logs what the watchdog writes, a line at a time.
async fn log_lines(fd: OwnedFd) {
    let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(fd) else {
        return;
    };
    let mut lines = tokio::io::BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::error!("{line}");
    }
}

/// The watchdog process's `main` (see the module's doc); `args` are those
/// after [`FLAG`]: the cgroup v2 directory the tries' cgroups are made in,
/// if any.
pub fn main(args: &[std::ffi::OsString]) -> std::process::ExitCode {
    let cgroups = args.first().map(PathBuf::from);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: ignoring a signal; no handler runs.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    // SAFETY: getppid has no failure and no memory effects.
    let daemon = unsafe { libc::getppid() };
    let mut renewed = 0u64;
    let mut deadline = 0u64;
    let mut fired = false;
    let mut buffer = [0u8; 4096];
    loop {
        let now = nanos(boot_clock());
        if deadline != 0 && !fired && now >= deadline {
            // SAFETY: getppid has no failure and no memory effects.
            if unsafe { libc::getppid() } != daemon {
                return std::process::ExitCode::SUCCESS;
            }
            let killed = kill_children(daemon, cgroups.as_deref());
            fired = true;
            if killed > 0 {
                eprintln!(
                    "fencing watchdog: this daemon renewed no lease for {:.1}s (stopped? frozen? stuck?): killed its {killed} running task processes and their groups, before their lease lapses and another daemon runs their rows",
                    Duration::from_nanos(now.saturating_sub(renewed)).as_secs_f64()
                );
            }
            continue;
        }
        let timeout = if deadline != 0 && !fired {
            // Rounded up: never woken before the deadline.
            i32::try_from(deadline.saturating_sub(now).div_ceil(1_000_000)).unwrap_or(i32::MAX)
        } else {
            -1
        };
        let mut poll = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one descriptor described by a local.
        if unsafe { libc::poll(&mut poll, 1, timeout) } <= 0 {
            continue; // the deadline, or EINTR
        }
        // SAFETY: a read into a local buffer from our stdin.
        let read = unsafe { libc::read(0, buffer.as_mut_ptr().cast(), buffer.len()) };
        match read {
            // The daemon closed the pipe: it is ending.
            0 => return std::process::ExitCode::SUCCESS,
            read if read < 0 => {
                if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    return std::process::ExitCode::FAILURE;
                }
            }
            read => {
                // Whole messages only (each write is one); the latest counts.
                let whole = read as usize / 16 * 16;
                if whole > 0 {
                    let last = &buffer[whole - 16..whole];
                    renewed = u64::from_ne_bytes(last[..8].try_into().expect("8 bytes"));
                    deadline = u64::from_ne_bytes(last[8..].try_into().expect("8 bytes"));
                    fired = false;
                }
            }
        }
    }
}

fn nanos(at: Duration) -> u64 {
    u64::try_from(at.as_nanos()).unwrap_or(u64::MAX)
}

/// Kills every child of `daemon` but this process, with its process group
/// and (under `cgroups`, cgroup v2) its try's cgroup; returns how many were
/// running (not zombies).
fn kill_children(daemon: libc::pid_t, cgroups: Option<&Path>) -> usize {
    let me = std::process::id() as libc::pid_t;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut running = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let child_of_daemon = |pid: libc::pid_t| {
            crate::procinfo::parent_and_group(i64::from(pid))
                .filter(|(parent, _)| *parent == i64::from(daemon))
        };
        if pid == me || child_of_daemon(pid).is_none() {
            continue;
        }
        let Ok(pidfd) = pidfd_open(pid as u32) else {
            continue;
        };
        // Pinned by the pidfd now: still the daemon's child?
        let Some((_, group)) = child_of_daemon(pid) else {
            continue;
        };
        // Read before the signal: once killed, every one is a zombie.
        if !crate::procinfo::is_zombie(i64::from(pid)) {
            running += 1;
        }
        if let Some(cgroups) = cgroups {
            kill_cgroup(pid, cgroups);
        }
        let group = group == i64::from(pid);
        let signalled = kill_through(&pidfd, group);
        if group && signalled.is_err_and(|e| e.raw_os_error() == Some(libc::EINVAL)) {
            // Before Linux 6.9: the group by number. Its leader, our pinned
            // unreaped child (the daemon does not run, or it would have
            // renewed), holds the number.
            // SAFETY: a signal, no memory effects.
            unsafe { libc::killpg(pid, libc::SIGKILL) };
        }
    }
    running
}

/// Kills the cgroup v2 of `pid` if it is a try's, under `cgroups`.
fn kill_cgroup(pid: libc::pid_t, cgroups: &Path) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return;
    };
    let Some(name) = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .and_then(|path| path.rsplit('/').next())
        .filter(|name| name.starts_with("try-"))
    else {
        return;
    };
    let _ = std::fs::write(cgroups.join(name).join("cgroup.kill"), "1");
}
