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
//!
//! Rows held but never started: a claim whose answer was lost (the
//! connection dropped after PostgreSQL committed the `UPDATE … RETURNING`)
//! leaves rows RUNNING under this daemon's instance that no try of it runs.
//! Renewing them would keep them from every reaper for ever, so a row found
//! held in two renewals in a row, under the same claim token, without a try
//! of this daemon running it, is given back (INTERRUPTED, its try not
//! counted). Two renewals, because a row just claimed reaches the live map
//! a moment after its claim commits.

use std::collections::{HashMap, HashSet};
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
    // Rows held at the last renewal that no try of this daemon runs.
    let mut strays: HashMap<crate::request::RequestId, String> = HashMap::new();
    loop {
        let config = shared.config();
        let self_fence_after = config
            .lease_timeout
            .saturating_sub(config.heartbeat_interval + config.defaults.kill_grace);
        let fence_deadline =
            (shared.store.backend() != Backend::Sqlite).then(|| last_renewal + self_fence_after);
        tokio::select! {
            _ = tokio::time::sleep(config.heartbeat_interval) => {}
            // A local `cancel` asked: renew early, which reads the cancels.
            _ = shared.check_cancels.notified() => {}
            _ = sleep_until_opt(fence_deadline), if !fenced => {
                let running = shared.tries.len();
                if running > 0 {
                    tracing::error!(
                        running,
                        "no heartbeat renewal for {:.1}s: killing this daemon's tasks before their lease lapses, so that no other daemon runs them at the same time",
                        last_renewal.elapsed().as_secs_f64()
                    );
                    shared.tries.stop_all(StopReason::LostClaim);
                }
                fenced = true;
                continue;
            }
            _ = stop.cancelled() => return,
        }
        panic_when_told_by_a_test();
        // Which tries were running before the renewal: a claim made while
        // it ran must not be taken for a lost one.
        let before = shared.tries.claims();
        let renewal = tokio::time::timeout(
            config.heartbeat_interval.max(Duration::from_secs(1)),
            shared.store.renew_heartbeats(&shared.instance),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the heartbeat statement timed out")));
        let held = match renewal {
            Ok(held) => {
                shared.health.succeeded("renewing heartbeats");
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
        for h in held.iter().filter(|h| h.cancel_requested) {
            if shared.tries.cancel(h.id) {
                tracing::info!(request = %h.id, "cancel requested: stopping the task");
            }
        }
        for (id, token) in &before {
            if !still_held.contains(&(*id, token.as_str())) && shared.tries.lost(*id, token) {
                tracing::error!(request = %id, "this daemon no longer holds the row (reaped or taken over): killing its task");
            }
        }
        strays = give_back_strays(&shared, &held, strays);
        write_progress(&shared);
        // The daemon's own row, for the web page only.
        let running = shared.tries.len();
        if let Err(error) = shared
            .store
            .daemon_heartbeat(&shared.instance, running)
            .await
        {
            tracing::debug!("could not renew this daemon's row in task_runner_daemons: {error:#}");
        }
    }
}

/// Gives back the rows held now that no try of this daemon runs and that
/// were already such strays, under the same claim token, at the last
/// renewal; returns this renewal's strays. A row whose try ended and whose
/// outcome waits in the recorder (the database is slow, or a row lock
/// holds the write) is no stray: its outcome is on its way. The give-back is fenced by the
/// claim token and queued behind any outcome the recorder still holds for
/// the row, so it never overwrites a try's own outcome.
fn give_back_strays(
    shared: &Shared,
    held: &[crate::store::Held],
    previous: HashMap<crate::request::RequestId, String>,
) -> HashMap<crate::request::RequestId, String> {
    let strays: HashMap<crate::request::RequestId, String> = held
        .iter()
        .filter(|h| {
            !shared.tries.runs(h.id, &h.claim_token)
                && !shared.recorder.outcome_pending(h.id, &h.claim_token)
        })
        .map(|h| (h.id, h.claim_token.clone()))
        .collect();
    let lost: Vec<(crate::request::RequestId, String)> = strays
        .iter()
        .filter(|(id, token)| previous.get(id) == Some(token))
        .map(|(id, token)| (*id, token.clone()))
        .collect();
    if lost.is_empty() {
        return strays;
    }
    tracing::warn!(
        requests = ?lost.iter().map(|(id, _)| id.0).collect::<Vec<_>>(),
        "this daemon holds rows it never started: giving them back (a claim's answer was lost)"
    );
    for (id, token) in &lost {
        shared.recorder.send(Write::Outcome(crate::store::Outcome {
            id: *id,
            claim_token: token.clone(),
            state: crate::request::State::Interrupted,
            result_text: "given back before it started: the answer to its claim was lost".into(),
            retry_after: None,
            give_back_try: true,
            composed: false,
        }));
    }
    strays
        .into_iter()
        .filter(|(id, _)| !lost.iter().any(|(lost_id, _)| lost_id == id))
        .collect()
}

/// A test-only hook, compiled into debug builds only: the heartbeat panics
/// once the file named by `TASKRUNNER_TEST_HEARTBEAT_PANIC_FILE` exists, so
/// that a test can watch the daemon stop when a service dies.
fn panic_when_told_by_a_test() {
    #[cfg(debug_assertions)]
    if let Some(path) = std::env::var_os("TASKRUNNER_TEST_HEARTBEAT_PANIC_FILE") {
        if std::path::Path::new(&path).exists() {
            panic!("the heartbeat panics: told to by a test");
        }
    }
}

/// Queues a fenced write for every try whose progress changed.
fn write_progress(shared: &Shared) {
    for progress in shared.tries.take_progress() {
        shared.recorder.send(Write::Progress {
            id: progress.id,
            claim_token: progress.claim_token,
            text: progress.text,
        });
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
