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
        // Where each schedule's slots start, when not at its latest slot
        // recorded (database time): when it was first seen without one,
        // or added or redefined by a reload.
        let mut starts = Starts::default();
        // The schedules as the loop last saw them (`None`: not yet).
        let mut last_seen: Option<std::collections::BTreeMap<String, Schedule>> = None;
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
            starts.follow(last_seen.as_ref(), &config.schedules);
            last_seen = Some(config.schedules.clone());
            if config.schedules.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(MAX_SLEEP) => continue,
                    _ = reloads.changed() => continue,
                    _ = cancel.cancelled() => return Ok(()),
                }
            }
            let sleep = match self
                .tick(&config.schedules, &mut starts, &mut refused)
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
        starts: &mut Starts,
        refused: &mut std::collections::HashMap<String, String>,
    ) -> Result<Duration> {
        let now = from_epoch_seconds(self.store.answered(self.store.database_now()).await?);
        let mut next_due: Option<DateTime<Utc>> = None;
        let mut enqueued = false;
        refused.retain(|name, _| schedules.contains_key(name));
        for (name, schedule) in schedules {
            match self.enqueue_due(name, schedule, now, starts).await {
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
        starts: &mut Starts,
    ) -> Result<bool> {
        let last = self.store.answered(self.store.last_slot(name)).await?;
        let after = starts.after(name, last.map(from_epoch_seconds), now);
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

/// Where each schedule's slots start when not at its latest slot recorded
/// in the database: a schedule first seen with none starts with its next
/// slot; so does one a reload added or redefined (its `cron`, `every` or
/// `time_zone` changed). Its latest slot recorded is then of no account:
/// before, a schedule removed and added back a week later enqueued at once
/// the newest slot it missed meanwhile, and a daily job moved to another
/// time zone at noon ran a second time that day. Schedules in the config
/// the daemon starts with keep their latest slot: they catch up after
/// downtime.
#[derive(Default)]
struct Starts {
    /// Each schedule's start, once known (database time).
    at: std::collections::HashMap<String, DateTime<Utc>>,
    /// Added or redefined by a reload: they start at the next tick's time.
    fresh: std::collections::HashSet<String>,
}

impl Starts {
    /// Follows the config from `before` (`None`: the daemon's start) to
    /// `now`.
    fn follow(
        &mut self,
        before: Option<&std::collections::BTreeMap<String, Schedule>>,
        now: &std::collections::BTreeMap<String, Schedule>,
    ) {
        self.at.retain(|name, _| now.contains_key(name));
        self.fresh.retain(|name| now.contains_key(name));
        let Some(before) = before else {
            return;
        };
        for (name, schedule) in now {
            if before.get(name).is_none_or(|was| was.spec != schedule.spec) {
                self.at.remove(name);
                self.fresh.insert(name.clone());
            }
        }
    }

    /// The time after which schedule `name`'s slots are due, with its
    /// latest slot recorded `last`, at the tick's time `now`.
    fn after(
        &mut self,
        name: &str,
        last: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> DateTime<Utc> {
        if self.fresh.remove(name) {
            self.at.insert(name.to_string(), now);
        }
        match (last, self.at.get(name)) {
            (Some(last), Some(start)) => last.max(*start),
            (Some(last), None) => last,
            (None, _) => *self.at.entry(name.to_string()).or_insert(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedules(yaml: &str) -> std::collections::BTreeMap<String, Schedule> {
        crate::cron::resolve_schedules(Some(serde_yaml::from_str(yaml).unwrap())).unwrap()
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_schedule_moved_to_another_time_starts_at_the_reload_and_one_given_another_task_does_not() {
        let nightly = schedules("nightly: {cron: '0 3 * * *', task: Report}");
        let mut starts = Starts::default();
        starts.follow(None, &nightly);
        // At the start: from its latest slot recorded (catch-up).
        let last = at("2026-12-03T03:00:00Z");
        let noon = at("2026-12-04T12:00:00Z");
        assert_eq!(starts.after("nightly", Some(last), noon), last);
        // Another task, the same time: still from its latest slot.
        let other_task = schedules("nightly: {cron: '0 3 * * *', task: Other}");
        starts.follow(Some(&nightly), &other_task);
        assert_eq!(starts.after("nightly", Some(last), noon), last);
        // Moved to Los Angeles' 3 am at noon UTC: today's 11:00 UTC slot,
        // missed, is not run (before, it was: twice that day).
        let moved =
            schedules("nightly: {cron: '0 3 * * *', time_zone: America/Los_Angeles, task: Other}");
        starts.follow(Some(&other_task), &moved);
        assert_eq!(starts.after("nightly", Some(last), noon), noon);
        let later = at("2026-12-04T12:00:30Z");
        assert_eq!(starts.after("nightly", Some(last), later), noon);
    }
}
