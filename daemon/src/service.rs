//! What init systems see of the daemon: the pidfile (held with `flock`, so a
//! stale file is told from a live daemon without trusting the pid),
//! `--daemonize` (the one bare fork, before any thread exists), and systemd's
//! readiness notification.

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
            // dies, so this read ends either way.
            let mut report = String::new();
            let _ = File::from(read_end).read_to_string(&mut report);
            let (code, message) = launch_outcome(&report);
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
}
