//! The heartbeat: every `heartbeat_interval` it renews `heartbeat_at` of all
//! rows this daemon runs in one statement, learns which of them a user asked
//! to cancel, and writes changed progress lines. A `wake` on the control
//! socket (sent by a local `taskrunner-cli cancel`) makes it look at once.
//!
//! Self-fencing: when the daemon cannot renew its leases on PostgreSQL, other
//! daemons will take its rows as crashed once `lease_timeout` has passed. So
//! at `lease_timeout − heartbeat_interval − kill_grace` after the last
//! successful renewal (monotonic clock) it kills its own tasks, and one row
//! never runs on two hosts at once. On SQLite (one host) it keeps
//! supervising through an outage instead, and records outcomes later.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::daemon::Shared;
use crate::store::{Backend, Write};
use crate::supervisor::StopReason;

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut last_renewal = Instant::now();
    let mut fenced = false;
    loop {
        let config = shared.config();
        let self_fence_after = config
            .lease_timeout
            .saturating_sub(config.heartbeat_interval + config.defaults.kill_grace);
        let fence_deadline =
            (shared.store.backend() == Backend::Postgres).then(|| last_renewal + self_fence_after);
        tokio::select! {
            _ = tokio::time::sleep(config.heartbeat_interval) => {}
            // A local `cancel` asked: renew early, which reads the cancels.
            _ = shared.check_cancels.notified() => {}
            _ = sleep_until_opt(fence_deadline), if !fenced => {
                let running = shared.live().len();
                if running > 0 {
                    tracing::error!(
                        running,
                        "no heartbeat renewal for {:.1}s: killing this daemon's tasks before their lease lapses, so that no other daemon runs them at the same time",
                        last_renewal.elapsed().as_secs_f64()
                    );
                    shared.stop_all(StopReason::LostClaim);
                }
                fenced = true;
                continue;
            }
            _ = stop.cancelled() => return,
        }
        // Which tries were running before the renewal: a claim made while
        // it ran must not be taken for a lost one.
        let before: Vec<(crate::request::RequestId, String)> = shared
            .live()
            .iter()
            .map(|(id, live)| (*id, live.claim_token.clone()))
            .collect();
        let renewal = tokio::time::timeout(
            config.heartbeat_interval.max(Duration::from_secs(1)),
            shared.store.renew_heartbeats(&shared.instance),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the heartbeat statement timed out")));
        let held = match renewal {
            Ok(held) => {
                shared.health.succeeded();
                last_renewal = Instant::now();
                fenced = false;
                held
            }
            Err(error) => {
                shared.health.failed("renewing heartbeats", &error);
                continue;
            }
        };
        let still_held: HashSet<(crate::request::RequestId, &str)> = held
            .iter()
            .map(|h| (h.id, h.claim_token.as_str()))
            .collect();
        let live = shared.live();
        for h in held.iter().filter(|h| h.cancel_requested) {
            if let Some(live) = live.get(&h.id) {
                if live.stop.borrow().is_none() {
                    tracing::info!(request = %h.id, "cancel requested: stopping the task");
                    live.stop.send_replace(Some(StopReason::Cancel));
                }
            }
        }
        for (id, token) in &before {
            if let Some(live) = live.get(id) {
                if live.claim_token == *token && !still_held.contains(&(*id, token.as_str())) {
                    tracing::error!(request = %id, "this daemon no longer holds the row (reaped or taken over): killing its task");
                    live.stop.send_replace(Some(StopReason::LostClaim));
                }
            }
        }
        drop(live);
        write_progress(&shared);
    }
}

/// Queues a fenced write for every try whose progress changed.
fn write_progress(shared: &Shared) {
    let mut live = shared.live();
    for (id, entry) in live.iter_mut() {
        let latest = entry.progress.borrow().clone();
        if latest.is_some() && latest != entry.progress_written {
            entry.progress_written = latest.clone();
            shared.recorder.send(Write::Progress {
                id: *id,
                claim_token: entry.claim_token.clone(),
                text: latest.unwrap_or_default(),
            });
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
