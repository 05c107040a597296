//! What init systems see of the daemon: the pidfile (held with `flock`, so a
//! stale file is told from a live daemon without trusting the pid),
//! `--daemonize` (the one bare fork, before any thread exists), systemd's
//! readiness notification, and a container's PID 1 (a small init that runs
//! the daemon as its child and reaps orphans).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A pidfile this process holds locked; removed on drop.
pub struct Pidfile {
    path: PathBuf,
    file: File,
}

impl Pidfile {
    /// Takes the pidfile. A live daemon holding it (its lock) is an error
    /// naming its pid; a stale file is taken over with a warning. The file
    /// appears complete: it is written under a temporary name, locked, and
    /// linked into place.
    pub fn acquire(path: &Path) -> Result<Pidfile> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Owner-only, like the control socket's directory, which is
            // often the same one (`run/`).
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating the pidfile's directory {}", dir.display()))?;
        }
        let temporary = path.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        let mut file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temporary)
            .with_context(|| format!("creating {}", temporary.display()))?;
        lock(&file).context("locking the new pidfile")?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()?;
        let linked = loop {
            match std::fs::hard_link(&temporary, path) {
                Ok(()) => break Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                    if let Err(error) = remove_if_stale(path) {
                        break Err(error);
                    }
                }
                Err(error) => {
                    break Err(anyhow::Error::new(error)
                        .context(format!("creating the pidfile {}", path.display())))
                }
            }
        };
        let _ = std::fs::remove_file(&temporary);
        linked?;
        Ok(Pidfile {
            path: path.to_path_buf(),
            file,
        })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Remove the path only if it is still our file.
        let ours = std::fs::metadata(&self.path)
            .ok()
            .zip(self.file.metadata().ok())
            .is_some_and(|(on_disk, held)| {
                on_disk.ino() == held.ino() && on_disk.dev() == held.dev()
            });
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes `path` if no process holds its lock; errors if one does.
fn remove_if_stale(path: &Path) -> Result<()> {
    let mut existing = match File::options().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(error).with_context(|| format!("opening the pidfile {}", path.display()))
        }
    };
    let mut text = String::new();
    let _ = existing.read_to_string(&mut text);
    let recorded = text.trim().to_string();
    if lock(&existing).is_err() {
        bail!(
            "another taskrunnerd (pid {}) is running with the pidfile {}",
            if recorded.is_empty() { "?" } else { &recorded },
            path.display()
        );
    }
    // Still the same file we locked? Then it is stale: remove it.
    let same = std::fs::metadata(path)
        .ok()
        .zip(existing.metadata().ok())
        .is_some_and(|(on_disk, held)| on_disk.ino() == held.ino());
    if same {
        tracing::warn!(
            "taking over the stale pidfile {} (pid {} is not running)",
            path.display(),
            if recorded.is_empty() { "?" } else { &recorded }
        );
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale pidfile {}", path.display()))?;
    }
    Ok(())
}

fn lock(file: &File) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The write end of the pipe on which a daemonized process tells the
/// launching process how its start went: `ready`, or `error CODE MESSAGE`.
pub struct ReadyPipe(OwnedFd);

impl ReadyPipe {
    /// The daemon is ready: the launching process exits 0.
    pub fn ready(self) {
        let mut file = File::from(self.0);
        let _ = file.write_all(b"ready\n");
    }

    /// The daemon could not start: the launching process prints `message`
    /// (an init script shows it to the admin) and exits with `code`.
    pub fn failed(self, code: u8, message: &str) {
        let mut file = File::from(self.0);
        let _ = file.write_all(format!("error {code} {message}\n").as_bytes());
    }
}

/// How long the launching process waits for the daemon's report. A
/// daemon whose database is down at boot waits for it, retrying; an init
/// script's `start` (SysV, OpenRC) waited as long, and the boot with it.
const LAUNCH_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads the daemon's report until the pipe's end, or `None` once `wait`
/// has passed without it.
fn read_report(mut pipe: File, wait: std::time::Duration) -> Option<String> {
    let deadline = std::time::Instant::now() + wait;
    let mut report = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut poll = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, on a descriptor this function owns.
        let ready =
            unsafe { libc::poll(&mut poll, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if ready == 0 {
            return None;
        }
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        let mut chunk = [0u8; 512];
        match pipe.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => report.extend_from_slice(&chunk[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    Some(String::from_utf8_lossy(&report).into_owned())
}

/// What the launching process makes of the daemon's report: exit status
/// and the line to print, if any.
fn launch_outcome(report: &str) -> (i32, Option<String>) {
    if report.starts_with("ready") {
        return (0, None);
    }
    if let Some(rest) = report.strip_prefix("error ") {
        let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
        let code = code.parse().ok().filter(|&c| c != 0).unwrap_or(1);
        return (code, Some(message.trim_end().to_string()));
    }
    (
        1,
        Some("the daemon exited before it was ready (see its log_file)".to_string()),
    )
}

/// Detaches: forks twice with a new session in between, sends stdin to
/// /dev/null and stdout/stderr to `log_file` (or /dev/null), and keeps the
/// working directory. The launching process waits until the daemon reports
/// ready (exit 0), reports a failure (its message, its exit status) or dies
/// first (exit 1). Must run before any thread exists.
pub fn daemonize(log_file: Option<&Path>) -> Result<ReadyPipe> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating the readiness pipe");
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let log = match log_file {
        Some(path) => File::options()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the log file {}", path.display()))?,
        None => File::options().write(true).open("/dev/null")?,
    };
    let null = File::open("/dev/null")?;
    // SAFETY: single-threaded here (called before the runtime starts).
    match unsafe { libc::fork() } {
        -1 => return Err(std::io::Error::last_os_error()).context("forking"),
        0 => {}
        first_child => {
            drop(write_end);
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(first_child, &mut status, 0) };
            // Every copy of the write end closes when the daemon reports or
            // dies, so this read ends either way, unless the daemon waits
            // (a database down at boot): then the launcher returns after a
            // bound, and the daemon goes on trying.
            let wait = crate::test_hooks::shortened(LAUNCH_WAIT, "TASKRUNNER_TEST_LAUNCH_WAIT_MS");
            let (code, message) = match read_report(File::from(read_end), wait) {
                Some(report) => launch_outcome(&report),
                None => (
                    0,
                    Some(format!(
                        "not ready after {}: it goes on starting in the background (waiting for its database?); its log_file says more",
                        crate::units::format_duration(wait)
                    )),
                ),
            };
            if let Some(message) = message {
                eprintln!("taskrunnerd: {message}");
            }
            std::process::exit(code);
        }
    }
    drop(read_end);
    // SAFETY: plain system calls in the single-threaded child.
    unsafe {
        if libc::setsid() < 0 {
            libc::_exit(1);
        }
        match libc::fork() {
            -1 => libc::_exit(1),
            0 => {}
            _ => libc::_exit(0),
        }
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
    }
    Ok(ReadyPipe(write_end))
}

/// Opens `log_file` again (appending, created if missing) as stdout and
/// stderr: after a log rotation moved the file away, the daemon writes to
/// the new file (logrotate's `postrotate` sends SIGHUP). `dup2` replaces
/// both descriptors at once; a line being written meanwhile goes to either
/// file whole.
pub fn reopen_log(log_file: &Path) -> Result<()> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_file)
        .with_context(|| format!("opening the log file {}", log_file.display()))?;
    for fd in [1, 2] {
        // SAFETY: replaces a standard descriptor of this process with a
        // duplicate of one it owns; no memory is involved.
        if unsafe { libc::dup2(log.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error()).context("dup2 onto the log file");
        }
    }
    Ok(())
}

/// Tells systemd (`Type=notify`) about our state, if it is listening.
pub fn notify_systemd(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = socket.to_string_lossy().into_owned();
    let Ok(sender) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let sent = if let Some(abstract_name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|address| sender.send_to_addr(state.as_bytes(), &address))
    } else {
        sender.send_to(state.as_bytes(), &socket)
    };
    if let Err(error) = sent {
        tracing::debug!("sd_notify failed: {error}");
    }
}

/// Whether this process is PID 1 of its PID namespace: a container started
/// with the daemon as its command and no init (`docker run` without
/// `--init`, a Kubernetes pod without a shared process namespace).
pub fn is_pid_1() -> bool {
    std::process::id() == 1
}

/// The signals PID 1 passes on to the daemon it runs: those that stop,
/// drain or reload it, and the two a user may send.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Runs the daemon as the child of this process, which stays PID 1 as a
/// small init does (`tini`, `docker run --init`): it passes the signals of
/// [`FORWARDED`] on, reaps every process that ends as its child, and exits
/// with the daemon's status (128 + the signal's number when a signal ended
/// it). Called first thing, before any thread exists: its spawn forks
/// (`pre_exec`), with nothing else running in this process.
///
/// PID 1 becomes the parent of every orphan in its namespace: a task's
/// grandchild killed at the end of its try, a child a task left behind.
/// The daemon waits for its own tasks only (by pid, so as not to take
/// another part's child's status), and such orphans stayed zombies, one or
/// more a try, until the container's pids ran out.
pub fn run_as_init() -> std::process::ExitCode {
    use std::process::ExitCode;
    // SAFETY: plain libc calls on a signal set of this stack frame; the
    // mask is this (only) thread's.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&mut set, *signal);
        }
        // Blocked before the child exists: none is lost before the wait.
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let program = match std::env::current_exe() {
        Ok(program) => program,
        Err(error) => {
            eprintln!("taskrunnerd: PID 1 cannot find its own executable: {error}");
            return ExitCode::from(1);
        }
    };
    let mut command = std::process::Command::new(program);
    command.args(std::env::args_os().skip(1));
    // SAFETY: only pthread_sigmask, async-signal-safe, between fork and
    // exec; this process has no other thread.
    unsafe {
        use std::os::unix::process::CommandExt;
        // The daemon starts with no signal blocked (the child inherits the
        // mask, and a blocked SIGTERM would never start its drain).
        command.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = match command.spawn() {
        Ok(child) => child.id() as libc::pid_t,
        Err(error) => {
            eprintln!("taskrunnerd: PID 1 cannot start the daemon: {error}");
            return ExitCode::from(1);
        }
    };
    loop {
        // SAFETY: waits for a signal of `set`, all of them blocked.
        let signal = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if signal == libc::SIGCHLD {
            if let Some(status) = reap_all(child) {
                return ExitCode::from(exit_code_of(status));
            }
        } else if signal > 0 {
            // SAFETY: a signal to the daemon, which this process has not
            // reaped yet: its pid names no other process.
            unsafe { libc::kill(child, signal) };
        }
    }
}

/// Reaps every child that has ended; the status of `daemon` if it is one.
fn reap_all(daemon: libc::pid_t) -> Option<libc::c_int> {
    let mut ended = None;
    loop {
        let mut status = 0;
        // SAFETY: a non-blocking wait for any child of this process.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return ended;
        }
        if pid == daemon {
            ended = Some(status);
        }
    }
}

/// The exit status a shell gives for wait status `status`.
fn exit_code_of(status: libc::c_int) -> u8 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status) as u8
    } else if libc::WIFSIGNALED(status) {
        128u8.saturating_add(libc::WTERMSIG(status) as u8)
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_outcome_reads_the_daemons_report() {
        assert_eq!(launch_outcome("ready\n"), (0, None));
        assert_eq!(
            launch_outcome("error 2 bad config: line 3\n"),
            (2, Some("bad config: line 3".into()))
        );
        assert_eq!(launch_outcome("error 0 odd").0, 1);
        assert_eq!(launch_outcome("").0, 1);
    }

    #[test]
    fn pid_1_exits_with_the_daemons_status_as_a_shell_gives_it() {
        assert_eq!(exit_code_of(0), 0);
        assert_eq!(exit_code_of(2 << 8), 2);
        assert_eq!(exit_code_of(libc::SIGTERM), 128 + 15);
        assert_eq!(exit_code_of(libc::SIGKILL), 128 + 9);
    }
}
