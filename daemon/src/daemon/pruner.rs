//! The daemon's pruner: deletes final rows past their retention (one
//! [`crate::prune`] pass) at start, then every `reap_interval`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::health::{Backoff, Health};
use crate::prune::prune;
use crate::store::Store;
use crate::task_types::Setup;

/// The pause between two batches inside the daemon.
const PAUSE: Duration = Duration::from_millis(50);

/// The daemon's pruner: at start, then every `reap_interval`.
pub(super) struct Pruner {
    pub(super) setup: watch::Sender<Setup>,
    pub(super) store: Store,
    pub(super) health: Arc<Health>,
}

impl Pruner {
    pub(super) async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Backoff::default();
        loop {
            let config = Setup::current_config(&self.setup);
            let mut pause = config.reap_interval;
            if !config.retention.is_empty() {
                match prune(&self.store, &config.retention, PAUSE, Some(&cancel)).await {
                    Ok(pruned) => {
                        self.health.succeeded("pruning old requests");
                        backoff.reset();
                        if pruned.requests > 0 || pruned.parents > 0 {
                            tracing::info!(
                                deleted = pruned.requests,
                                batches_and_flows = pruned.parents,
                                "pruned requests past their retention"
                            );
                        }
                    }
                    Err(error) => {
                        self.health.failed("pruning old requests", &error);
                        // Sooner than the interval: the outage's end is logged
                        // once this works again.
                        pause = backoff.next_delay().min(pause);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }
}
