//! Database outages: retry with backoff, and log one line when an outage
//! begins and one when it ends, not one per failed retry.
//!
//! An outage may be partial: reads work while writes fail (a SQLite file
//! another process holds the write lock of, a PostgreSQL role that lost a
//! privilege, a read-only replica after a failover). So each part of the
//! daemon reports its own activity ("claiming requests", "recording task
//! results", …), and the outage ends only when every activity that failed
//! in it has worked again: a reaper pass that only reads does not end an
//! outage of the claims' writes (it used to, and the log flapped with a
//! pair of lines per poll).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shared by every part of the daemon that talks to the database.
#[derive(Debug, Default)]
pub(crate) struct Health {
    outage: Mutex<Option<Outage>>,
    /// Failed database calls so far (each is retried), for the metrics.
    errors: std::sync::atomic::AtomicU64,
}

/// One outage: from the first failed call to the moment every activity
/// that failed in it has worked again.
#[derive(Debug)]
struct Outage {
    began: Instant,
    /// The activities failing now (their latest call failed).
    failing: Vec<&'static str>,
    /// Every activity that failed in this outage, with its failed calls.
    failed: BTreeMap<&'static str, u64>,
    /// The most task results that waited in memory at once.
    results_held: usize,
}

impl Health {
    /// Records a failed database call of `activity`; logs only the first
    /// failure of an outage.
    pub(crate) fn failed(&self, activity: &'static str, error: &anyhow::Error) {
        self.failed_holding(activity, error, 0)
    }

    /// [`failed`](Self::failed), for the recorder: `results` task results
    /// wait in memory until the database takes them.
    pub(crate) fn failed_holding(
        &self,
        activity: &'static str,
        error: &anyhow::Error,
        results: usize,
    ) {
        self.errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        let outage = outage.get_or_insert_with(|| {
            tracing::error!(
                "database unavailable while {activity}, retrying with backoff (one line when it works again): {}",
                crate::error_line(error)
            );
            Outage {
                began: Instant::now(),
                failing: Vec::new(),
                failed: BTreeMap::new(),
                results_held: 0,
            }
        });
        if !outage.failing.contains(&activity) {
            outage.failing.push(activity);
        }
        *outage.failed.entry(activity).or_default() += 1;
        outage.results_held = outage.results_held.max(results);
    }

    /// Records a successful database call of `activity`; logs the end of an
    /// outage once every activity that failed in it has worked again.
    pub(crate) fn succeeded(&self, activity: &'static str) {
        let mut guard = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        let Some(outage) = guard.as_mut() else {
            return;
        };
        outage.failing.retain(|failing| *failing != activity);
        if outage.failing.is_empty() {
            if let Some(outage) = guard.take() {
                tracing::info!("{}", outage.ended(outage.began.elapsed()));
            }
        }
    }

    /// Failed database calls so far.
    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The outage going on, in one line (`unavailable for 12.3s; failing:
    /// claiming requests; 41 failed calls`), for `status`; None when there
    /// is none.
    pub(crate) fn outage(&self) -> Option<String> {
        let outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        let outage = outage.as_ref()?;
        let calls: u64 = outage.failed.values().sum();
        Some(format!(
            "unavailable for {:.1}s; failing: {}; {calls} failed call{}",
            outage.began.elapsed().as_secs_f64(),
            outage.failing.join(", "),
            if calls == 1 { "" } else { "s" }
        ))
    }
}

/// How long what a daemon shows of the table (the counts of `status`, the
/// queues' gauges of `metrics`) waits for the database before the daemon
/// answers without it: its own state is what an operator needs in an outage.
const DISPLAY_READ_BOUND: Duration = Duration::from_secs(2);

/// A read of the table for `status` or `metrics`, given up after
/// [`DISPLAY_READ_BOUND`]; the error is why it is not shown, in one line.
pub(crate) async fn read_for_display<T>(
    read: impl std::future::Future<Output = anyhow::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(DISPLAY_READ_BOUND, read).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(crate::error_line(&error)),
        Err(_) => Err(format!(
            "no answer within {}",
            crate::units::format_duration(DISPLAY_READ_BOUND)
        )),
    }
}

impl Outage {
    /// The line that ends the outage: how long it lasted and what waited.
    fn ended(&self, lasted: Duration) -> String {
        let held: Vec<String> = self
            .failed
            .iter()
            .map(|(activity, calls)| {
                let calls = if *calls == 1 {
                    "1 failed call".to_string()
                } else {
                    format!("{calls} failed calls")
                };
                if *activity == RECORDING && self.results_held > 0 {
                    format!(
                        "{activity} ({calls}, up to {} waiting, none lost)",
                        self.results_held
                    )
                } else {
                    format!("{activity} ({calls})")
                }
            })
            .collect();
        format!(
            "database available again after {:.1}s; held back meanwhile: {}",
            lasted.as_secs_f64(),
            held.join(", ")
        )
    }
}

/// The recorder's activity, whose held results the end line counts.
pub(crate) const RECORDING: &str = "recording task results";

/// Exponential backoff between retries: 50 ms doubling up to 5 s.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Self::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    /// The longest pause; also how late, at most, a part that runs rarely
    /// (the reaper, the pruner) tries again during an outage.
    pub(crate) const MAX: Duration = Duration::from_secs(5);

    /// The delay to wait now; the next one is twice as long.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut backoff = Backoff::default();
        let delays: Vec<_> = (0..10).map(|_| backoff.next_delay()).collect();
        assert_eq!(delays[0], Duration::from_millis(50));
        assert_eq!(delays[1], Duration::from_millis(100));
        assert_eq!(delays[9], Duration::from_secs(5));
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(50));
    }

    #[test]
    fn an_outage_ends_only_when_every_failing_activity_works_again() {
        let health = Health::default();
        let error = anyhow::anyhow!("attempt to write a readonly database");
        health.failed("claiming requests", &error);
        // Reads work: a reaper pass that found nothing does not end it.
        health.succeeded("reaping crashed tasks");
        assert!(health.outage.lock().unwrap().is_some());
        health.failed_holding(RECORDING, &error, 3);
        health.failed("claiming requests", &error);
        health.succeeded("claiming requests");
        assert!(
            health.outage.lock().unwrap().is_some(),
            "results still wait"
        );
        let line = health
            .outage
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .ended(Duration::from_millis(12_300));
        assert_eq!(
            line,
            "database available again after 12.3s; held back meanwhile: claiming requests (2 failed calls), recording task results (1 failed call, up to 3 waiting, none lost)"
        );
        health.succeeded(RECORDING);
        assert!(health.outage.lock().unwrap().is_none());
        assert_eq!(health.errors(), 3);
    }
}
