//! The daemon's cron loop: wakes at each due slot of every schedule (see
//! [`crate::cron`]) and enqueues it, once across all daemons.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::cron::{from_epoch_seconds, slot_text, Schedule};
use crate::daemon::Shared;

/// The longest the component sleeps: config reloads and clock jumps are
/// noticed within this.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// The daemon's cron component: wakes at each due slot of every schedule
/// and enqueues it (once across all daemons).
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    // When each schedule without a recorded slot was first seen (database time).
    let mut first_seen: std::collections::HashMap<String, DateTime<Utc>> = Default::default();
    let mut last_cleanup: Option<std::time::Instant> = None;
    loop {
        let config = shared.config();
        if config.schedules.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(MAX_SLEEP) => continue,
                _ = stop.cancelled() => return,
            }
        }
        let sleep = match tick(&shared, &config.schedules, &mut first_seen).await {
            Ok(until_next) => {
                shared.health.succeeded("enqueueing scheduled requests");
                until_next
            }
            Err(error) => {
                shared
                    .health
                    .failed("enqueueing scheduled requests", &error);
                Duration::from_secs(1)
            }
        };
        if last_cleanup.is_none_or(|at| at.elapsed() > Duration::from_secs(600)) {
            last_cleanup = Some(std::time::Instant::now());
            for name in config.schedules.keys() {
                if let Err(error) = shared.store.forget_old_slots(name).await {
                    tracing::debug!(schedule = %name, "forgetting old slots: {error:#}");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Enqueues every due slot; returns how long to sleep until the next one.
async fn tick(
    shared: &Shared,
    schedules: &std::collections::BTreeMap<String, Schedule>,
    first_seen: &mut std::collections::HashMap<String, DateTime<Utc>>,
) -> Result<Duration> {
    let now = from_epoch_seconds(shared.store.database_now().await?);
    let mut next_due: Option<DateTime<Utc>> = None;
    let mut enqueued = false;
    for (name, schedule) in schedules {
        let after = match shared.store.last_slot(name).await? {
            Some(seconds) => from_epoch_seconds(seconds),
            None => *first_seen.entry(name.clone()).or_insert(now),
        };
        for slot in schedule.when.due_slots(after, now, schedule.catch_up) {
            if let Some(id) = shared
                .store
                .enqueue_slot(name, &slot_text(slot), schedule)
                .await?
            {
                enqueued = true;
                tracing::info!(schedule = %name, slot = %slot_text(slot), request = %id, "enqueued a scheduled request");
            }
        }
        if let Some(next) = schedule.when.next_after(now) {
            next_due = Some(next_due.map_or(next, |due| due.min(next)));
        }
    }
    if enqueued {
        shared.wake.notify_one();
    }
    let until = next_due
        .map(|due| (due - now).to_std().unwrap_or_default())
        .unwrap_or(MAX_SLEEP);
    // A little past the slot, so that the database's clock has reached it.
    Ok((until + Duration::from_millis(5)).min(MAX_SLEEP))
}
