//! The daemon's reaper loop: one [`crate::reaper::reap`] pass at start,
//! then every `reap_interval`.

use crate::reaper::reap;

/// The daemon's reaper: at start, then every `reap_interval`. It leaves the
/// rows of its own daemon instance alone: those it supervises itself.
pub async fn run(
    shared: std::sync::Arc<crate::daemon::Shared>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let config = shared.config();
        match reap(
            &shared.store,
            &config.host_id,
            &shared.instance,
            config.lease_timeout,
            false,
        )
        .await
        {
            Ok(reaped) => {
                shared.health.succeeded();
                shared.metrics.reaped(reaped.len());
                for row in &reaped {
                    tracing::warn!(request = %row.id, "{}", row.reason);
                }
                if !reaped.is_empty() {
                    shared.wake.notify_one();
                }
            }
            Err(error) => shared.health.failed("reaping crashed tasks", &error),
        }
        tokio::select! {
            _ = tokio::time::sleep(config.reap_interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}
