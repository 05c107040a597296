//! The control socket's server side: binds the socket and answers each
//! command (see [`crate::control`] for the protocol and the client).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use interprocess::local_socket::tokio::{prelude::*, Stream};
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::view::View;
use crate::control::Status;
use crate::task_types::Setup;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

/// Connections answered at once (fewer under a low descriptor limit: see
/// [`crate::connections::Gate`]); more wait in the listen backlog, so that
/// idle connections cannot take the daemon's file descriptors.
const MAX_CONNECTIONS: usize = 32;

/// How long a connection may take to send its line and read the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound control socket, not yet answering.
pub(super) struct Listening {
    listener: interprocess::local_socket::tokio::Listener,
    path: PathBuf,
}

/// The control socket's service: answers each connection's command.
pub(super) struct Control {
    pub(super) listening: Listening,
    /// What `status` and `metrics` read; `wake` wakes its scheduler and
    /// its heartbeat (cancel requests).
    pub(super) view: Arc<View>,
    /// Cancelled by a `stop` command.
    pub(super) shutdown: CancellationToken,
}

impl Listening {
    /// Creates the socket's owner-only directory and listens. A socket file
    /// nobody answers on (left by a killed daemon) is replaced; one a live
    /// daemon answers on is an error, so that a second daemon cannot steal
    /// the first one's socket. Bound before the daemon reports ready, so a
    /// `status` right after start finds it.
    pub(super) fn bind(path: &Path) -> Result<Listening> {
        prepare_directory(path)?;
        match probe(path) {
            Probe::Answered => bail!(
                "another daemon answers on the control socket {}",
                path.display()
            ),
            Probe::Silent => bail!(
                "something holds the control socket {} (it took a connection but neither answered nor closed it within {}s): another daemon, hung?",
                path.display(),
                PROBE_WAIT.as_secs()
            ),
            Probe::Nobody => {}
        }
        let name = path.to_fs_name::<GenericFilePath>()?;
        let listener = ListenerOptions::new()
            .name(name)
            .try_overwrite(true)
            .create_tokio()
            .with_context(|| format!("listening on the control socket {}", path.display()))?;
        set_mode(path, 0o600)?;
        Ok(Listening {
            listener,
            path: path.to_path_buf(),
        })
    }
}

impl Control {
    /// Answers connections until `stop`; `stop` commands cancel `shutdown`.
    /// The socket file is removed at the end.
    pub(super) async fn run(self, stop: CancellationToken) -> Result<()> {
        let Control {
            listening: Listening { listener, path },
            view,
            shutdown,
        } = self;
        let answering = Arc::new(Answering { view, shutdown });
        let mut gate = crate::connections::Gate::new("control socket", MAX_CONNECTIONS);
        loop {
            let (connection, permit) = tokio::select! {
                admitted = gate.admit(|| listener.accept()) => admitted,
                _ = stop.cancelled() => break,
            };
            let answering = answering.clone();
            // A client that connects and never writes holds only its own
            // task and one of the permits, for a while.
            tokio::spawn(async move {
                let _permit = permit;
                let _ =
                    tokio::time::timeout(CONNECTION_TIMEOUT, answering.answer(connection)).await;
            });
        }
        drop(listener);
        let _ = std::fs::remove_file(&path);
        Ok(())
    }
}

/// What each connection's answer uses.
struct Answering {
    view: Arc<View>,
    shutdown: CancellationToken,
}

impl Answering {
    async fn answer(&self, connection: Stream) -> std::io::Result<()> {
        let shared = &self.view;
        let mut line = String::new();
        let mut reader = BufReader::new(&connection).take(MAX_REQUEST);
        // Invalid UTF-8 is garbage like any other.
        if reader.read_line(&mut line).await.is_err() {
            line = String::from("\u{FFFD}");
        }
        let reply = match line.trim() {
            "status" => serde_json::to_value(status(shared).await).unwrap_or_default(),
            "metrics" => match shared.metrics_text(&shared.readers).await {
                Ok(text) => serde_json::json!({ "metrics": text }),
                Err(error) => serde_json::json!({ "error": crate::error_line(&error) }),
            },
            "wake" => {
                shared.wake();
                serde_json::json!({ "ok": true })
            }
            "pauses" => match shared.read_pauses().await {
                Ok(()) => serde_json::json!({ "ok": true, "pid": std::process::id() }),
                Err(why) => serde_json::json!({ "error": why }),
            },
            "stop" => match peer_task(shared, &connection) {
                Some(pid) => {
                    tracing::warn!(
                    peer = pid,
                    "stop refused on the control socket: it came from a task process of this daemon"
                );
                    serde_json::json!({ "error": format!("refused: `stop` from a task process of this daemon (pid {pid})") })
                }
                None => {
                    tracing::info!("stop requested on the control socket");
                    self.shutdown.cancel();
                    serde_json::json!({ "ok": true })
                }
            },
            other => {
                let shown: String = other.chars().take(40).collect();
                serde_json::json!({ "error": format!("unknown command `{shown}` (status, metrics, wake, pauses or stop)") })
            }
        };
        let mut writer = &connection;
        writer.write_all(format!("{reply}\n").as_bytes()).await?;
        writer.flush().await
    }
}

/// The pid of the peer (`SO_PEERCRED`) if it is a task process of this
/// daemon (see [`View::is_task_process`]).
fn peer_task(shared: &View, connection: &Stream) -> Option<i64> {
    let pid = i64::from(connection.peer_creds().ok()?.pid()?);
    shared.is_task_process(pid).then_some(pid)
}

async fn status(shared: &View) -> Status {
    let config = Setup::current_config(&shared.setup);
    let running = shared.tries.status();
    let next_poll = *shared.next_poll.lock().unwrap_or_else(|e| e.into_inner());
    // The daemon's own state is answered at once; the table's counts only
    // if the database gives them in time.
    let (counts, counts_unread) =
        match crate::health::read_for_display(shared.readers.count_by_result()).await {
            Ok(counts) => (counts, None),
            Err(why) => (Vec::new(), Some(why)),
        };
    Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        host: config.host_id.clone(),
        instance: shared.instance.to_string(),
        database: shared.store.display_url.clone(),
        uptime_seconds: shared.started.elapsed().as_secs_f64(),
        max_concurrent: config.max_concurrent,
        running,
        counts,
        counts_unread,
        outage: shared.health.outage(),
        next_poll_in_seconds: next_poll.map(|at| {
            at.saturating_duration_since(std::time::Instant::now())
                .as_secs_f64()
        }),
        stopping: shared.stop_claiming.is_cancelled(),
        database_statements: shared.store.statements_sent(),
        limits: crate::supervisor::cgroup::describe(),
        lock_retries: shared.store.lock_retries(),
        paused: shared
            .paused
            .shown()
            .iter()
            .map(crate::store::Pause::describe)
            .collect(),
    }
}

/// How long [`probe`] waits for an answer.
const PROBE_WAIT: Duration = Duration::from_secs(5);

/// What is found on a control socket's path before binding it.
enum Probe {
    /// A daemon answered.
    Answered,
    /// A connection was taken, and neither answered nor closed.
    Silent,
    /// No connection, or one closed without an answer.
    Nobody,
}

/// Whether a daemon answers on the control socket at `path`: an empty line
/// gets any daemon's one-line answer. That a connection is taken is not
/// enough: a process that holds the listening socket without serving it
/// takes connections too. One is the task process of a daemon just killed
/// -9, in the moment between its `clone` and its `exec` (it has the
/// daemon's descriptors then): seen under heavy load, where the restarted
/// daemon refused to start. Such a holder closes the connection as it
/// goes, without an answer.
fn probe(path: &Path) -> Probe {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(path) else {
        return Probe::Nobody;
    };
    if stream.set_read_timeout(Some(PROBE_WAIT)).is_err() || stream.write_all(b"\n").is_err() {
        return Probe::Nobody;
    }
    let mut first = [0u8; 1];
    match stream.read(&mut first) {
        Ok(0) => Probe::Nobody,
        Ok(_) => Probe::Answered,
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Probe::Silent
        }
        Err(_) => Probe::Nobody,
    }
}

/// Creates the directory (mode 0700) if missing; refuses one that others can enter.
fn prepare_directory(path: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
        set_mode(dir, 0o700)?;
    }
    let metadata = std::fs::metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if metadata.uid() != me || metadata.mode() & 0o077 != 0 {
        bail!(
            "the control socket's directory {} must belong to this user and be closed to others (chmod 700)",
            dir.display()
        );
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting permissions of {}", path.display()))
}
