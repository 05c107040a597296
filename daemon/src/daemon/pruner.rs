//! The daemon's pruner: deletes final rows past their retention (one
//! [`crate::prune`] pass) at start, then every `reap_interval`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::daemon::Shared;
use crate::health::Backoff;
use crate::prune::prune;

/// The pause between two batches inside the daemon.
const PAUSE: Duration = Duration::from_millis(50);

/// The daemon's pruner: at start, then every `reap_interval`.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = Backoff::default();
    loop {
        let config = shared.config();
        let mut pause = config.reap_interval;
        if !config.retention.is_empty() {
            match prune(&shared.store, &config.retention, PAUSE, Some(&stop)).await {
                Ok(deleted) => {
                    shared.health.succeeded("pruning old requests");
                    backoff.reset();
                    if deleted > 0 {
                        tracing::info!(deleted, "pruned requests past their retention");
                    }
                }
                Err(error) => {
                    shared.health.failed("pruning old requests", &error);
                    // Sooner than the interval: the outage's end is logged
                    // once this works again.
                    pause = backoff.next_delay().min(pause);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
    }
}
