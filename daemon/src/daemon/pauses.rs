//! The queues and task types paused in `task_runner_pauses`, as this
//! daemon's claims see them: read before a claim when the last reading is
//! a second old, and every second while something is paused (so that a
//! resume starts the rows within a second on every backend, without a
//! notification of its own), and at once when the CLI or the web page on
//! its host asks (see [`Pauses`]). A daemon that cannot read the table
//! keeps the pauses it read last: a failed read frees nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::health::Health;
use crate::store::{Pause, PauseKind, Store};

/// How stale the pauses a claim goes by may be.
pub(super) const READ_EVERY: Duration = Duration::from_secs(1);

/// The activity a failed read is reported as.
const READING: &str = "reading pauses";

/// The pauses as this daemon's claims go by them, shared by the scheduler
/// (the one reader of the table) with `status`, the control socket and the
/// web page: the reading shown, and readings asked for now.
///
/// A pause written by `taskrunner-cli pause` or the web page holds on the
/// daemon on the same host as soon as the command returns, not a second
/// later: the writer asks that daemon to read the pauses ([`Pauses::read_now`])
/// and is answered once it has, before its next claim. A resume is claimed
/// at once the same way.
pub(super) struct Pauses {
    /// The pauses read last.
    shown: Mutex<Vec<Pause>>,
    /// Readings asked for so far (a count)…
    asked: AtomicU64,
    /// …and the latest one answered, with whether the table was read.
    answered: watch::Sender<(u64, bool)>,
}

impl Default for Pauses {
    fn default() -> Self {
        Pauses {
            shown: Mutex::default(),
            asked: AtomicU64::new(0),
            answered: watch::channel((0, true)).0,
        }
    }
}

impl Pauses {
    /// The pauses read last.
    pub(super) fn shown(&self) -> Vec<Pause> {
        self.shown.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Asks the scheduler (woken by `wake`) to read the pauses before its
    /// next claim, and waits until it has, for at most `within`. The error
    /// says why the daemon does not go by them yet.
    pub(super) async fn read_now(&self, wake: &Notify, within: Duration) -> Result<(), String> {
        let mut answered = self.answered.subscribe();
        let ticket = self.asked.fetch_add(1, Ordering::SeqCst) + 1;
        wake.notify_one();
        let done = answered.wait_for(|(done, _)| *done >= ticket);
        // Whether the table was read (the answer's `Ref` not kept).
        let read = tokio::time::timeout(within, done)
            .await
            .map(|answer| answer.map(|answer| answer.1));
        match read {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(
                "it could not read them (its database did not answer): it goes by them once it can"
                    .into(),
            ),
            _ => Err(format!(
                "it did not read them within {}s (a slow database? stopping?)",
                within.as_secs()
            )),
        }
    }

    /// The latest reading asked for and not answered yet.
    fn asked(&self) -> Option<u64> {
        let asked = self.asked.load(Ordering::SeqCst);
        (asked > self.answered.borrow().0).then_some(asked)
    }
}

pub(super) struct PauseWatch {
    store: Store,
    health: Arc<Health>,
    /// The pauses read last, for `status` and `/metrics` too, and the
    /// readings asked for.
    shared: Arc<Pauses>,
    read_at: Option<Instant>,
    /// A reading has succeeded (see [`PauseWatch::known`]).
    known: bool,
    queues: Vec<String>,
    tasks: Vec<String>,
}

impl PauseWatch {
    pub(super) fn new(store: Store, health: Arc<Health>, shared: Arc<Pauses>) -> Self {
        PauseWatch {
            store,
            health,
            shared,
            read_at: None,
            known: false,
            queues: Vec::new(),
            tasks: Vec::new(),
        }
    }

    /// Reads the pauses if the last reading is [`READ_EVERY`] old, or none
    /// has succeeded yet; returns whether a queue or type was resumed since
    /// the reading before.
    pub(super) async fn refresh(&mut self) -> bool {
        if self.known() && self.read_at.is_some_and(|at| at.elapsed() < READ_EVERY) {
            return false;
        }
        self.read().await.unwrap_or(false)
    }

    /// Whether the pauses were read once: until then the daemon claims
    /// nothing (before, a first read that failed, say on a table an
    /// upgrade held locked, let the claims take the rows of paused queues
    /// and types).
    pub(super) fn known(&self) -> bool {
        self.known
    }

    /// Reads the pauses if a reading was asked for ([`Pauses::read_now`]),
    /// and answers it; the claims after it go by this reading. Returns
    /// whether a queue or type was resumed.
    pub(super) async fn read_if_asked(&mut self) -> bool {
        let Some(asked) = self.shared.asked() else {
            return false;
        };
        let read = self.read().await;
        self.shared.answered.send_replace((asked, read.is_some()));
        read.unwrap_or(false)
    }

    /// Reads the pauses: whether a queue or type was resumed since the
    /// reading before, or `None` if the table could not be read (the
    /// pauses read last stay: a failed read frees nothing).
    async fn read(&mut self) -> Option<bool> {
        let pauses = match self.store.answered(self.store.pauses()).await {
            Ok(pauses) => {
                self.health.succeeded(READING);
                pauses
            }
            Err(error) => {
                self.health.failed(READING, &error);
                self.read_at = Some(Instant::now());
                return None;
            }
        };
        self.read_at = Some(Instant::now());
        self.known = true;
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
        *self.shared.shown.lock().unwrap_or_else(|e| e.into_inner()) = pauses;
        Some(resumed)
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
