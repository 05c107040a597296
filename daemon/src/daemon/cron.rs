//! The daemon's cron loop: wakes at each due slot of every schedule (see
//! [`crate::cron`]) and enqueues it, once across all daemons.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::cron::{from_epoch_seconds, slot_text, Schedule};
use crate::health::Health;
use crate::store::Store;
use crate::task_types::Setup;

/// The longest the component sleeps: config reloads and clock jumps are
/// noticed within this.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// The daemon's cron component: wakes at each due slot of every schedule
/// and enqueues it (once across all daemons).
pub(super) struct Cron {
    pub(super) setup: watch::Sender<Setup>,
    pub(super) store: Store,
    pub(super) health: Arc<Health>,
    /// Poll now: a scheduled row was enqueued.
    pub(super) wake: Arc<Notify>,
}

impl Cron {
    pub(super) async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        // When each schedule without a recorded slot was first seen (database time).
        let mut first_seen: std::collections::HashMap<String, DateTime<Utc>> = Default::default();
        // Schedules whose request the database refuses, with the line logged.
        let mut refused: std::collections::HashMap<String, String> = Default::default();
        let mut last_cleanup: Option<std::time::Instant> = None;
        // A reload wakes the loop: a schedule it adds starts with its next
        // slot from the reload on (before, the loop noticed it up to
        // `MAX_SLEEP` later, and a slot in between was skipped).
        let mut reloads = self.setup.subscribe();
        loop {
            let config = Setup::current_config(&self.setup);
            reloads.mark_unchanged();
            // A schedule removed, then added again, is new again.
            first_seen.retain(|name, _| config.schedules.contains_key(name));
            if config.schedules.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(MAX_SLEEP) => continue,
                    _ = reloads.changed() => continue,
                    _ = cancel.cancelled() => return Ok(()),
                }
            }
            let sleep = match self
                .tick(&config.schedules, &mut first_seen, &mut refused)
                .await
            {
                Ok(until_next) => {
                    self.health.succeeded("enqueueing scheduled requests");
                    until_next
                }
                Err(error) => {
                    self.health.failed("enqueueing scheduled requests", &error);
                    Duration::from_secs(1)
                }
            };
            if last_cleanup.is_none_or(|at| at.elapsed() > Duration::from_secs(600)) {
                last_cleanup = Some(std::time::Instant::now());
                for name in config.schedules.keys() {
                    if let Err(error) = self.store.answered(self.store.forget_old_slots(name)).await
                    {
                        tracing::debug!(schedule = %name, "forgetting old slots: {}", crate::error_line(&error));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = reloads.changed() => {}
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }

    /// Enqueues every due slot; returns how long to sleep until the next one.
    /// A schedule whose request the database refuses (an application's
    /// trigger or constraint, a value the server does not store) is logged
    /// once, with its name, and tried again a second later: the schedules
    /// after it go on (before, its error ended each tick, and they never
    /// fired). Any other error (the database out) ends the tick.
    async fn tick(
        &self,
        schedules: &std::collections::BTreeMap<String, Schedule>,
        first_seen: &mut std::collections::HashMap<String, DateTime<Utc>>,
        refused: &mut std::collections::HashMap<String, String>,
    ) -> Result<Duration> {
        let now = from_epoch_seconds(self.store.answered(self.store.database_now()).await?);
        let mut next_due: Option<DateTime<Utc>> = None;
        let mut enqueued = false;
        refused.retain(|name, _| schedules.contains_key(name));
        for (name, schedule) in schedules {
            match self.enqueue_due(name, schedule, now, first_seen).await {
                Ok(any) => {
                    enqueued |= any;
                    if refused.remove(name).is_some() {
                        tracing::info!(schedule = %name, "schedule {name} enqueues again");
                    }
                }
                Err(error) if crate::store::refused_by_the_database(&error) => {
                    let line = crate::error_line(&error);
                    if refused.get(name) != Some(&line) {
                        tracing::error!(schedule = %name, "schedule {name}: the database refuses its request, trying again every second (the other schedules go on): {line}");
                        refused.insert(name.clone(), line);
                    }
                    let retry = now + chrono::Duration::seconds(1);
                    next_due = Some(next_due.map_or(retry, |due| due.min(retry)));
                }
                Err(error) => return Err(error),
            }
            if let Some(next) = schedule.when.next_after(now) {
                next_due = Some(next_due.map_or(next, |due| due.min(next)));
            }
        }
        if enqueued {
            self.wake.notify_one();
        }
        let until = next_due
            .map(|due| (due - now).to_std().unwrap_or_default())
            .unwrap_or(MAX_SLEEP);
        // A little past the slot, so that the database's clock has reached it.
        Ok((until + Duration::from_millis(5)).min(MAX_SLEEP))
    }

    /// Enqueues the due slots of one schedule; whether it enqueued any.
    async fn enqueue_due(
        &self,
        name: &str,
        schedule: &Schedule,
        now: DateTime<Utc>,
        first_seen: &mut std::collections::HashMap<String, DateTime<Utc>>,
    ) -> Result<bool> {
        let after = match self.store.answered(self.store.last_slot(name)).await? {
            Some(seconds) => from_epoch_seconds(seconds),
            None => *first_seen.entry(name.to_string()).or_insert(now),
        };
        let mut enqueued = false;
        for slot in schedule.when.due_slots(after, now, schedule.catch_up) {
            crate::test_hooks::pause_when_told("TASKRUNNER_TEST_SLOT_DELAY_MS").await;
            let text = slot_text(slot);
            let enqueue = self.store.enqueue_slot(name, &text, schedule);
            if let Some(id) = self.store.answered(enqueue).await? {
                enqueued = true;
                tracing::info!(schedule = %name, slot = %text, request = %id, "enqueued a scheduled request");
            }
        }
        Ok(enqueued)
    }
}
