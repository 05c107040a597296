//! What the control socket and the web page see of the running daemon
//! (`status`, `/metrics`), and the one nudge they may give it (claim now).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::tries::Tries;
use crate::health::Health;
use crate::instance::InstanceId;
use crate::store::Store;
use crate::task_types::Setup;

/// The running daemon's state, read for `status` and `/metrics`.
pub(super) struct View {
    pub(super) setup: watch::Sender<Setup>,
    pub(super) store: Store,
    /// What `status`, `/metrics` and the web page read from the table, on a
    /// pool of its own: on SQLite such a read neither waits for the daemon's
    /// one connection (busy with a write, or waiting for another process's
    /// write lock) nor holds claims back while it runs.
    pub(super) readers: Store,
    pub(super) instance: InstanceId,
    pub(super) tries: Arc<Tries>,
    pub(super) health: Arc<Health>,
    /// What this daemon counts for `/metrics`.
    pub(super) metrics: Arc<crate::metrics::Metrics>,
    /// The per-queue readings of `/metrics`, cached for a second.
    pub(super) queue_gauges: crate::metrics::QueueGauges,
    /// Poll now (the scheduler's).
    pub(super) wake: Arc<Notify>,
    /// Look for cancel requests now (the heartbeat's).
    pub(super) check_cancels: Arc<Notify>,
    pub(super) started: Instant,
    /// When the scheduler will next poll unprompted (it writes it).
    pub(super) next_poll: Arc<Mutex<Option<Instant>>>,
    /// The pauses the scheduler read last (it writes them), and readings
    /// asked of it.
    pub(super) paused: Arc<super::pauses::Pauses>,
    /// Cancelled once the daemon stops claiming (`status` says "stopping").
    pub(super) stop_claiming: CancellationToken,
}

/// How long a writer of a pause waits for the daemon to read it.
const PAUSES_READ_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

impl View {
    /// Has the scheduler read the pauses before its next claim (a pause or
    /// resume was just written on this host; see `pauses::Pauses`); the
    /// error says why it does not go by them yet.
    pub(super) async fn read_pauses(&self) -> Result<(), String> {
        self.paused.read_now(&self.wake, PAUSES_READ_WITHIN).await
    }

    /// The Prometheus text of `/metrics` (and `metrics` on the control socket).
    /// `store` reads the per-queue gauges (`readers`).
    pub(super) async fn metrics_text(&self, store: &Store) -> Result<String> {
        self.metrics.set_daemon_state(
            self.tries.with_a_process(),
            Setup::current_config(&self.setup).max_concurrent,
            self.health.errors(),
        );
        crate::metrics::render(store, &self.queue_gauges, Some(&self.metrics)).await
    }
}

impl View {
    /// The table changed here (a row added, retried, cancelled): claim now,
    /// and look for cancel requests now, so that a running try a user
    /// cancelled stops at once rather than at the next heartbeat.
    pub(super) fn wake(&self) {
        self.wake.notify_one();
        self.check_cancels.notify_one();
    }
}

impl View {
    /// Whether process `pid` is a task process of this daemon: a
    /// descendant of the daemon, or a member of a running try's process
    /// group whose parent has gone. A task that left its group and its
    /// parent (`setsid` and a double fork) is not recognised.
    pub(super) fn is_task_process(&self, pid: i64) -> bool {
        let daemon = i64::from(std::process::id());
        let groups = self.tries.pids();
        let mut current = pid;
        // Up the parent chain: a task process is a descendant of the daemon.
        for _ in 0..64 {
            if current <= 1 || current == daemon {
                return false;
            }
            let Some((parent, group)) = crate::procinfo::parent_and_group(current) else {
                return false;
            };
            if parent == daemon || groups.contains(&group) {
                return true;
            }
            current = parent;
        }
        false
    }
}

impl crate::web::Daemon for View {
    fn wake(&self) {
        View::wake(self)
    }

    fn metrics_text<'a>(
        &'a self,
        store: &'a Store,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String>> + Send + 'a>> {
        Box::pin(View::metrics_text(self, store))
    }

    fn config(&self) -> Arc<crate::config::Config> {
        Setup::current_config(&self.setup)
    }

    fn read_pauses(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(View::read_pauses(self))
    }

    fn is_task_process(&self, pid: i64) -> bool {
        View::is_task_process(self, pid)
    }
}
