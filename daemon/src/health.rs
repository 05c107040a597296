//! Database outages: retry with backoff, and log one line when an outage
//! begins and one when it ends, not one per failed retry.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shared by every part of the daemon that talks to the database.
#[derive(Debug, Default)]
pub struct Health {
    outage_since: Mutex<Option<Instant>>,
    /// Failed database calls so far (each is retried), for the metrics.
    errors: std::sync::atomic::AtomicU64,
}

impl Health {
    /// Records a failed database call; logs only the first of an outage.
    pub fn failed(&self, what: &str, error: &anyhow::Error) {
        self.errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut since = self.outage_since.lock().unwrap_or_else(|e| e.into_inner());
        if since.is_none() {
            *since = Some(Instant::now());
            tracing::error!("database unavailable while {what}, retrying with backoff: {error:#}");
        }
    }

    /// Records a successful call; logs the end of an outage.
    pub fn succeeded(&self) {
        let mut since = self.outage_since.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(began) = since.take() {
            tracing::info!(
                "database available again after {:.1}s",
                began.elapsed().as_secs_f64()
            );
        }
    }

    /// Failed database calls so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Exponential backoff between retries: 50 ms doubling up to 5 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Self::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(5);

    /// The delay to wait now; the next one is twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }

    pub fn reset(&mut self) {
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
}
