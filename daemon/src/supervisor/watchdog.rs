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
//! A deadline fires once, and from then on every child seen is killed
//! too, until the next renewal sets the next deadline.
//!
//! Which processes: the daemon's children, read from its threads'
//! `children` files in `/proc` (a try is one, exec'd or forked from a
//! preloaded parent with `CLONE_PARENT`; a preloaded parent is one too, and
//! a new one is started at its next try). Each is pinned with a pidfd when
//! first seen and checked to be the daemon's child still, so a pid reused
//! meanwhile is never hit; a group is signalled through the pidfd of its
//! leader (Linux 6.9), which names that group even once the leader is
//! reaped.
//!
//! The watchdog also kills them when the daemon dies ([`Tries`]): it looks
//! at the daemon's children every 100 ms while some run (every second
//! while none do), and when the daemon's end of its pipe closes (a daemon
//! killed, `kill -9`, the OOM killer), it kills every child it saw, with
//! its group and cgroup v2, and ends.
//!
//! The watchdog is the daemon's executable run again (`taskrunnerd
//! --fencing-watchdog PID`, the daemon's pid: a watchdog whose parent is
//! not that process by the time it runs ends at once, killing nothing),
//! started like a task from a spawner thread: its own
//! process group (a Ctrl-C to the daemon's does not reach it), and no
//! parent-death signal (it outlives the daemon, to kill its tries; at a
//! stop the daemon kills it once its tries have ended). It ignores SIGTERM,
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

use super::fence::{boot_clock, nanos};
use super::spawner::{kill_through, pidfd_open, pipe_pair};
use super::{Recipe, Spawner};

/// The flag that makes `taskrunnerd` the watchdog.
pub const FLAG: &str = "--fencing-watchdog";

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
        let mut args = vec![FLAG.to_string(), std::process::id().to_string()];
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
                outlives_the_daemon: true,
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

/// How often the watchdog looks at the daemon's children while some run,
/// and while none do: a try the daemon started is among those it kills at
/// the daemon's death once it has been seen (README, "Fencing").
const LOOK_BUSY: Duration = Duration::from_millis(100);
const LOOK_IDLE: Duration = Duration::from_secs(1);

/// The watchdog process's `main` (see the module's doc); `args` are those
/// after [`FLAG`]: the daemon's pid, then the cgroup v2 directory the
/// tries' cgroups are made in, if any.
pub fn main(args: &[std::ffi::OsString]) -> std::process::ExitCode {
    let daemon: Option<libc::pid_t> = args
        .first()
        .and_then(|pid| pid.to_str())
        .and_then(|pid| pid.parse().ok());
    // The daemon is its parent, or it died before this process ran: then
    // its parent is another (init, a subreaper), whose children are none
    // of this one's business.
    let Some(daemon) = daemon.filter(|&daemon| parent_is(daemon)) else {
        return std::process::ExitCode::FAILURE;
    };
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: ignoring a signal; no handler runs.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    let mut tries = Tries {
        known: Default::default(),
        cgroups: args.get(1).map(PathBuf::from),
    };
    let mut renewed = 0u64;
    let mut deadline = 0u64;
    let mut fired = false;
    let mut next_look = 0u64;
    let mut buffer = [0u8; 4096];
    loop {
        let now = nanos(boot_clock());
        if now >= next_look {
            if !tries.look(daemon) {
                // Its end of the pipe still open somewhere: dead all the same.
                tries.kill();
                return std::process::ExitCode::SUCCESS;
            }
            // Past a deadline that fired, a child seen since is killed too,
            // until a renewal sets the next deadline: a daemon stopped, or
            // stuck, may start one meanwhile (before, it ran on unkilled).
            if fired && !renewal_waiting() {
                let killed = tries.kill();
                if killed > 0 {
                    eprintln!(
                        "fencing watchdog: this daemon still renewed no lease: killed {killed} more task processes started since, and their groups"
                    );
                }
            }
            let every = if tries.known.is_empty() {
                LOOK_IDLE
            } else {
                LOOK_BUSY
            };
            next_look = now + nanos(every);
        }
        if deadline != 0 && !fired && now >= deadline {
            if !tries.look(daemon) {
                next_look = 0; // at once, as above
                continue;
            }
            let killed = tries.kill();
            fired = true;
            if killed > 0 {
                eprintln!(
                    "fencing watchdog: this daemon renewed no lease for {:.1}s (stopped? frozen? stuck?): killed its {killed} running task processes and their groups, before their lease lapses and another daemon runs their rows",
                    Duration::from_nanos(now.saturating_sub(renewed)).as_secs_f64()
                );
            }
            continue;
        }
        let mut wake = next_look;
        if deadline != 0 && !fired {
            wake = wake.min(deadline);
        }
        // Rounded up: never woken before the time.
        let timeout =
            i32::try_from(wake.saturating_sub(now).div_ceil(1_000_000)).unwrap_or(i32::MAX);
        let mut poll = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one descriptor described by a local.
        if unsafe { libc::poll(&mut poll, 1, timeout) } <= 0 {
            continue; // a time, or EINTR
        }
        // SAFETY: a read into a local buffer from our stdin.
        let read = unsafe { libc::read(0, buffer.as_mut_ptr().cast(), buffer.len()) };
        match read {
            // The daemon's end closed: it died (at a stop it kills this
            // process first, its tries ended).
            0 => {
                tries.kill();
                return std::process::ExitCode::SUCCESS;
            }
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

/// Whether the daemon has written to the watchdog's stdin and it is not
/// read yet (a renewal's deadline, which the loop reads next): no repeated
/// kill then, of a try started because the fence moved.
fn renewal_waiting() -> bool {
    let mut poll = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one descriptor described by a local, without waiting.
    unsafe { libc::poll(&mut poll, 1, 0) > 0 }
}

/// The daemon's children (its tries and preloaded parents) as of the last
/// look, each pinned by a pidfd: a child's pid may be reused once it is
/// reaped, its pidfd never names another process.
///
/// Why the watchdog keeps them: a task's parent-death signal reaches only
/// the task's own process, and only while it keeps its credentials (a
/// set-user-ID program, `setpriv` or `su` in a task clears it). When the
/// daemon dies, its children are at once the children of another process,
/// and nothing in `/proc` says any more which were its tries: a child that
/// lost its signal, and what a task started in its process group, ran on
/// beside the row's rerun on another host once the lease lapsed. The
/// watchdog kills them, with their groups, when the daemon's end of its
/// pipe closes.
struct Tries {
    known: std::collections::HashMap<libc::pid_t, Known>,
    /// The cgroup v2 directory the tries' cgroups are made in, if any.
    cgroups: Option<PathBuf>,
}

struct Known {
    pidfd: OwnedFd,
    /// The child leads its own process group (every try does).
    leads_its_group: bool,
    /// The name of its try's cgroup v2 (`try-…`) when last seen.
    cgroup: Option<String>,
}

impl Tries {
    /// Looks at the daemon's children now: new ones are pinned, the ones
    /// the daemon has reaped forgotten, and what a try sets up just after
    /// it starts read again while not known. Whether the daemon lives: if
    /// not, nothing is pinned (its number may name another process by
    /// then: the look is let go of if the daemon died during it).
    fn look(&mut self, daemon: libc::pid_t) -> bool {
        if !parent_is(daemon) {
            return false;
        }
        let children = children_of(daemon);
        self.known
            .retain(|pid, known| children.contains(pid) && !has_ended(&known.pidfd));
        for (&pid, known) in &mut self.known {
            known.read_again(pid, self.cgroups.is_some());
        }
        let mut pinned = Vec::new();
        for pid in children {
            if !self.known.contains_key(&pid) && self.pin(daemon, pid) {
                pinned.push(pid);
            }
        }
        if !parent_is(daemon) {
            for pid in pinned {
                self.known.remove(&pid);
            }
            return false;
        }
        true
    }

    /// Pins child `pid` of the living `daemon`; whether it did.
    fn pin(&mut self, daemon: libc::pid_t, pid: libc::pid_t) -> bool {
        let me = std::process::id() as libc::pid_t;
        if pid == me {
            return false;
        }
        let Ok(pidfd) = pidfd_open(pid as u32) else {
            return false;
        };
        // Pinned by the pidfd now: still the daemon's child?
        let Some((parent, group)) = crate::procinfo::parent_and_group(i64::from(pid)) else {
            return false;
        };
        if parent != i64::from(daemon) {
            return false;
        }
        let known = Known {
            pidfd,
            leads_its_group: group == i64::from(pid),
            cgroup: try_cgroup_of(pid),
        };
        self.known.insert(pid, known);
        true
    }

    /// Kills every known child with its process group and (cgroup v2) its
    /// try's cgroup; returns how many had not ended.
    fn kill(&mut self) -> usize {
        let mut running = 0;
        for (&pid, known) in &mut self.known {
            // Read before the signal: once killed, every one has ended.
            if !has_ended(&known.pidfd) {
                running += 1;
                known.read_again(pid, self.cgroups.is_some());
            }
            if let (Some(cgroups), Some(name)) = (&self.cgroups, &known.cgroup) {
                let _ = std::fs::write(cgroups.join(name).join("cgroup.kill"), "1");
            }
            let signalled = kill_through(&known.pidfd, known.leads_its_group);
            if known.leads_its_group
                && signalled.is_err_and(|e| e.raw_os_error() == Some(libc::EINVAL))
            {
                // Before Linux 6.9: the group by number, which names it
                // while it has a member, and its leader (pid = group) is
                // pinned unreaped while the daemon lives and does not run.
                // SAFETY: a signal, no memory effects.
                unsafe { libc::killpg(pid, libc::SIGKILL) };
            }
        }
        running
    }
}

impl Known {
    /// Reads again what a try sets up just after it starts, while it runs
    /// (pinned by the pidfd, `pid` names it): its own process group, and
    /// (`cgroups`) its cgroup. (Read once, a try first seen before its
    /// `setpgid` was killed alone at the deadline, its group left running.)
    fn read_again(&mut self, pid: libc::pid_t, cgroups: bool) {
        if has_ended(&self.pidfd) {
            return;
        }
        if !self.leads_its_group {
            self.leads_its_group = crate::procinfo::parent_and_group(i64::from(pid))
                .is_some_and(|(_, group)| group == i64::from(pid));
        }
        if cgroups && self.cgroup.is_none() {
            self.cgroup = try_cgroup_of(pid);
        }
    }
}

/// Whether this process's parent is `daemon`.
fn parent_is(daemon: libc::pid_t) -> bool {
    // SAFETY: getppid has no failure and no memory effects.
    unsafe { libc::getppid() == daemon }
}

/// Whether the process a pidfd pins has ended (a zombie, or reaped).
fn has_ended(pidfd: &OwnedFd) -> bool {
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one descriptor described by a local, without waiting.
    unsafe { libc::poll(&mut poll, 1, 0) == 1 }
}

/// The daemon's children: from each of its threads' `children` file, or
/// (a kernel without them) from every process's parent in `/proc`.
fn children_of(daemon: libc::pid_t) -> Vec<libc::pid_t> {
    let pids = |text: &str| {
        text.split_whitespace()
            .filter_map(|pid| pid.parse::<libc::pid_t>().ok())
            .collect::<Vec<_>>()
    };
    let numbers = |dir: &str| -> Vec<libc::pid_t> {
        std::fs::read_dir(dir).map_or_else(
            |_| Vec::new(),
            |entries| {
                entries
                    .flatten()
                    .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                    .collect()
            },
        )
    };
    let mut children = Vec::new();
    for thread in numbers(&format!("/proc/{daemon}/task")) {
        match std::fs::read_to_string(format!("/proc/{daemon}/task/{thread}/children")) {
            Ok(text) => children.extend(pids(&text)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                if Path::new(&format!("/proc/{daemon}/task/{thread}")).exists() {
                    // No `children` files in this kernel.
                    return numbers("/proc")
                        .into_iter()
                        .filter(|&pid| {
                            crate::procinfo::parent_and_group(i64::from(pid))
                                .is_some_and(|(parent, _)| parent == i64::from(daemon))
                        })
                        .collect();
                }
            }
            Err(_) => {}
        }
    }
    children
}

/// The name of the cgroup v2 of `pid` if it is a try's (`try-…`).
fn try_cgroup_of(pid: libc::pid_t) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .and_then(|path| path.rsplit('/').next())
        .filter(|name| name.starts_with("try-"))
        .map(str::to_string)
}
