//! The daemon's reaper loop: one [`crate::reaper::reap`] pass at start,
//! then every `reap_interval`.

use std::sync::Arc;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::health::{Backoff, Health};
use crate::instance::InstanceId;
use crate::metrics::Metrics;
use crate::reaper::{reap, ClockWatch};
use crate::store::Store;
use crate::task_types::Setup;

/// The daemon's reaper: at start, then every `reap_interval`. It leaves the
/// rows of its own daemon instance alone: those it supervises itself.
pub(super) struct Reaper {
    pub(super) setup: watch::Sender<Setup>,
    pub(super) store: Store,
    pub(super) instance: InstanceId,
    pub(super) health: Arc<Health>,
    pub(super) metrics: Arc<Metrics>,
    /// Poll now: a reaped row may run again.
    pub(super) wake: Arc<Notify>,
}

impl Reaper {
    pub(super) async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Backoff::default();
        let mut setups = self.setup.subscribe();
        let mut clock = ClockWatch::default();
        loop {
            let config = Setup::current_config(&self.setup);
            let passed = tokio::time::Instant::now();
            let pause = match reap(
                &self.store,
                &config.host_id,
                &self.instance,
                config.lease_timeout,
                false,
                Some(&mut clock),
            )
            .await
            {
                Ok(reaped) => {
                    self.health.succeeded("reaping crashed tasks");
                    self.metrics.reaped(reaped.len());
                    for row in &reaped {
                        tracing::warn!(request = %row.id, "{}", row.reason);
                    }
                    if !reaped.is_empty() {
                        self.wake.notify_one();
                    }
                    backoff.reset();
                    sweep_empty_cgroups().await;
                    config.reap_interval
                }
                Err(error) => {
                    self.health.failed("reaping crashed tasks", &error);
                    // Sooner than the interval: the outage's end is logged
                    // once this works again.
                    backoff.next_delay().min(config.reap_interval)
                }
            };
            // A reload's `reap_interval` counts from this pass (before, a
            // shorter one waited for the end of the old, possibly long,
            // interval).
            let mut next = passed + pause;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => break,
                    _ = cancel.cancelled() => return Ok(()),
                    Ok(()) = setups.changed() => {
                        let interval = Setup::current_config(&self.setup).reap_interval;
                        next = next.min(passed + interval);
                    }
                }
            }
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
