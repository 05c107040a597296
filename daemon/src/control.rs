//! The control socket: a local socket at a filesystem path, inside a
//! directory only the daemon's user can enter, answering one line with one
//! JSON line. Commands: `status`, `metrics` (the Prometheus text), `wake`
//! (poll now, and look for cancel requests), `pauses` (read the pauses
//! now: answered once the daemon's claims go by them, or with an error
//! saying why not), `stop` (graceful).
//!
//! This file is the protocol and the client (`taskrunner-cli`); the
//! daemon's server side is in `daemon/control.rs`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use interprocess::local_socket::tokio::{prelude::*, Stream};
use interprocess::local_socket::GenericFilePath;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// What `status` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Status {
    pub(crate) version: String,
    pub(crate) pid: u32,
    pub(crate) host: String,
    pub(crate) instance: String,
    pub(crate) database: String,
    pub(crate) uptime_seconds: f64,
    pub(crate) max_concurrent: usize,
    pub(crate) running: Vec<RunningTask>,
    /// Rows by `result` (`PENDING` for never run).
    pub(crate) counts: Vec<(String, i64)>,
    /// Why `counts` could not be read (the database did not answer in time).
    #[serde(default)]
    pub(crate) counts_unread: Option<String>,
    /// The database outage going on, in one line.
    #[serde(default)]
    pub(crate) outage: Option<String>,
    pub(crate) next_poll_in_seconds: Option<f64>,
    pub(crate) stopping: bool,
    /// Statements (database round trips) the daemon's own work has sent
    /// since it started: claims, writes about tries, heartbeats, reaping.
    #[serde(default)]
    pub(crate) database_statements: u64,
    /// What enforces the tries' limits: a cgroup per try (v2 or v1, which
    /// controllers) or rlimits, and why.
    #[serde(default)]
    pub(crate) limits: String,
    /// MariaDB/MySQL: transactions run again after an InnoDB deadlock
    /// (1213) or lock-wait timeout (1205) since the daemon started.
    #[serde(default)]
    pub(crate) lock_retries: u64,
    /// The queues and task types paused, as this daemon read them last
    /// (`queue mail (since … UTC: reason)`).
    #[serde(default)]
    pub(crate) paused: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RunningTask {
    pub(crate) id: i64,
    pub(crate) task: String,
    pub(crate) pid: Option<u32>,
    pub(crate) r#try: i64,
    pub(crate) seconds: f64,
    pub(crate) progress: Option<String>,
}

/// The error of a [`request`] that found no daemon on the socket.
#[derive(Debug)]
pub(crate) struct NoDaemon(pub(crate) String);

impl std::fmt::Display for NoDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no daemon answers on {}", self.0)
    }
}

impl std::error::Error for NoDaemon {}

/// How long a command waits for its answer: a little longer than the
/// daemon's own bound on a connection (10 s). A daemon that is stopped
/// (SIGSTOP, a debugger) or hung still has its connections accepted by the
/// kernel, and before this bound `status` and `metrics` waited for ever.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(12);

/// Sends one command and returns the daemon's JSON answer, or an error
/// when none comes within [`ANSWER_WITHIN`].
pub(crate) async fn request(path: &Path, command: &str) -> Result<serde_json::Value> {
    let bound = crate::test_hooks::shortened(ANSWER_WITHIN, "TASKRUNNER_TEST_ANSWER_WITHIN_MS");
    match tokio::time::timeout(bound, request_unbounded(path, command)).await {
        Ok(answer) => answer,
        Err(_) => bail!(
            "the daemon on {} did not answer within {} (stopped? hung?)",
            path.display(),
            crate::units::format_duration(bound)
        ),
    }
}

async fn request_unbounded(path: &Path, command: &str) -> Result<serde_json::Value> {
    let name = path.to_fs_name::<GenericFilePath>()?;
    let connection = Stream::connect(name)
        .await
        .map_err(|error| anyhow::Error::new(error).context(NoDaemon(path.display().to_string())))?;
    let mut writer = &connection;
    writer.write_all(format!("{command}\n").as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(&connection).read_line(&mut line).await?;
    if line.trim().is_empty() {
        bail!(
            "the daemon on {} closed the connection without answering",
            path.display()
        );
    }
    let value: serde_json::Value =
        serde_json::from_str(&line).context("reading the daemon's answer")?;
    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
        bail!("the daemon answered: {error}");
    }
    Ok(value)
}
