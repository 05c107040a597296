//! The queues and task types paused in `task_runner_pauses`, as this
//! daemon's claims see them: read before a claim when the last reading is
//! a second old, and every second while something is paused (so that a
//! resume starts the rows within a second on every backend, without a
//! notification of its own). A daemon that cannot read the table keeps the
//! pauses it read last: a failed read frees nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::health::Health;
use crate::store::{Pause, PauseKind, Store};

/// How stale the pauses a claim goes by may be.
pub(super) const READ_EVERY: Duration = Duration::from_secs(1);

/// The activity a failed read is reported as.
const READING: &str = "reading pauses";

pub(super) struct PauseWatch {
    store: Store,
    health: Arc<Health>,
    /// The pauses read last, for `status` and `/metrics` too.
    shown: Arc<Mutex<Vec<Pause>>>,
    read_at: Option<Instant>,
    queues: Vec<String>,
    tasks: Vec<String>,
}

impl PauseWatch {
    pub(super) fn new(store: Store, health: Arc<Health>, shown: Arc<Mutex<Vec<Pause>>>) -> Self {
        PauseWatch {
            store,
            health,
            shown,
            read_at: None,
            queues: Vec::new(),
            tasks: Vec::new(),
        }
    }

    /// Reads the pauses if the last reading is [`READ_EVERY`] old; returns
    /// whether a queue or type was resumed since the reading before.
    pub(super) async fn refresh(&mut self) -> bool {
        if self.read_at.is_some_and(|at| at.elapsed() < READ_EVERY) {
            return false;
        }
        let pauses = match self.store.answered(self.store.pauses()).await {
            Ok(pauses) => {
                self.health.succeeded(READING);
                pauses
            }
            Err(error) => {
                self.health.failed(READING, &error);
                self.read_at = Some(Instant::now());
                return false;
            }
        };
        self.read_at = Some(Instant::now());
        let names = |kind: PauseKind| -> Vec<String> {
            pauses
                .iter()
                .filter(|pause| pause.kind == kind)
                .map(|pause| pause.name.clone())
                .collect()
        };
        let (queues, tasks) = (names(PauseKind::Queue), names(PauseKind::Task));
        let resumed = self.queues.iter().any(|queue| !queues.contains(queue))
            || self.tasks.iter().any(|task| !tasks.contains(task));
        if queues != self.queues || tasks != self.tasks {
            let now: Vec<String> = pauses.iter().map(Pause::describe).collect();
            if now.is_empty() {
                tracing::info!("claims resumed: nothing is paused");
            } else {
                tracing::info!("paused, left out of claims: {}", now.join(", "));
            }
        }
        (self.queues, self.tasks) = (queues, tasks);
        *self.shown.lock().unwrap_or_else(|e| e.into_inner()) = pauses;
        resumed
    }

    /// When to read again unprompted: a second after the last reading
    /// while something is paused; never while nothing is.
    pub(super) fn next_read(&self) -> Option<Instant> {
        if self.queues.is_empty() && self.tasks.is_empty() {
            return None;
        }
        self.read_at.map(|at| at + READ_EVERY)
    }

    pub(super) fn queues(&self) -> &[String] {
        &self.queues
    }

    pub(super) fn tasks(&self) -> &[String] {
        &self.tasks
    }
}
