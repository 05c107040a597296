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
                sweep_empty_cgroups().await;
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

/// After each pass (the start-up one first): removes the empty `try-…`
/// cgroups a daemon killed -9 left behind, once the reaper has killed what
/// the dead tries of its rows left in theirs.
async fn sweep_empty_cgroups() {
    let Some(cgroups) = crate::supervisor::cgroup::in_force() else {
        return;
    };
    let removed =
        tokio::task::spawn_blocking(|| cgroups.sweep_empty(crate::supervisor::cgroup::SWEEP_AFTER))
            .await
            .unwrap_or(0);
    if removed > 0 {
        tracing::info!(
            removed,
            "removed empty try cgroups left by a daemon that was killed"
        );
    }
}
