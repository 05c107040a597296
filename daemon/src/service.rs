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
            std::fs::create_dir_all(dir)
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
                Err(error) => break Err(anyhow::Error::new(error).context(format!("creating the pidfile {}", path.display()))),
            }
        };
        let _ = std::fs::remove_file(&temporary);
        linked?;
        Ok(Pidfile { path: path.to_path_buf(), file })
    }

    /// Rewrites the pid (after `--daemonize` the final process differs).
    pub fn rewrite(&mut self) -> Result<()> {
        self.file.set_len(0)?;
        use std::io::Seek;
        self.file.seek(std::io::SeekFrom::Start(0))?;
        writeln!(self.file, "{}", std::process::id())?;
        self.file.sync_all()?;
        Ok(())
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Remove the path only if it is still our file.
        let ours = std::fs::metadata(&self.path)
            .ok()
            .zip(self.file.metadata().ok())
            .is_some_and(|(on_disk, held)| on_disk.ino() == held.ino() && on_disk.dev() == held.dev());
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
        Err(error) => return Err(error).with_context(|| format!("opening the pidfile {}", path.display())),
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
        std::fs::remove_file(path).with_context(|| format!("removing the stale pidfile {}", path.display()))?;
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
/// launching process that it is ready.
pub struct ReadyPipe(OwnedFd);

impl ReadyPipe {
    pub fn ready(self) {
        let mut file = File::from(self.0);
        let _ = file.write_all(b"1");
    }
}

/// Detaches: forks twice with a new session in between, sends stdin to
/// /dev/null and stdout/stderr to `log_file` (or /dev/null), and keeps the
/// working directory. The launching process waits until the daemon reports
/// ready (exit 0) or dies first (exit 1). Must run before any thread exists.
pub fn daemonize(log_file: Option<&Path>) -> Result<ReadyPipe> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating the readiness pipe");
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
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
            let mut answer = [0u8; 1];
            let ready = File::from(read_end).read(&mut answer).map(|n| n == 1).unwrap_or(false);
            std::process::exit(if ready { 0 } else { 1 });
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

/// Tells systemd (`Type=notify`) about our state, if it is listening.
pub fn notify_systemd(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let socket = socket.to_string_lossy().into_owned();
    let Ok(sender) = std::os::unix::net::UnixDatagram::unbound() else { return };
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
