//! The daemon's reaper loop: one [`crate::reaper::reap`] pass at start,
//! then every `reap_interval`.

use crate::health::Backoff;
use crate::reaper::reap;

/// The daemon's reaper: at start, then every `reap_interval`. It leaves the
/// rows of its own daemon instance alone: those it supervises itself.
pub async fn run(
    shared: std::sync::Arc<crate::daemon::Shared>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let config = shared.config();
        let pause = match reap(
            &shared.store,
            &config.host_id,
            &shared.instance,
            config.lease_timeout,
            false,
        )
        .await
        {
            Ok(reaped) => {
                shared.health.succeeded("reaping crashed tasks");
                shared.metrics.reaped(reaped.len());
                for row in &reaped {
                    tracing::warn!(request = %row.id, "{}", row.reason);
                }
                if !reaped.is_empty() {
                    shared.wake.notify_one();
                }
                backoff.reset();
                config.reap_interval
            }
            Err(error) => {
                shared.health.failed("reaping crashed tasks", &error);
                // Sooner than the interval: the outage's end is logged
                // once this works again.
                backoff.next_delay().min(config.reap_interval)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
    }
}
