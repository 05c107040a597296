//! The tries this daemon runs: each from its claim until its outcome is
//! queued. The scheduler registers them as it gets their rows, the executor
//! removes them; the heartbeat stops those cancelled or lost; `status` lists
//! them; the drain waits for them. Every method takes the lock for itself,
//! and none hands it out.
//!
//! A try is known by its row and its claim token: the same row claimed
//! again by this daemon (given back, reaped, lost, and claimed anew while
//! its old try still stops) is another try, and each is stopped, found and
//! removed as itself.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::control::RunningTask;
use crate::instance::ClaimToken;
use crate::request::RequestId;
use crate::supervisor::StopReason;

/// A try this daemon is running.
pub(crate) struct LiveTry {
    pub(crate) task: String,
    pub(crate) claim_token: ClaimToken,
    pub(crate) pid: Option<u32>,
    pub(crate) started: Instant,
    pub(crate) try_number: i64,
    pub(crate) stop: watch::Sender<Option<StopReason>>,
    pub(crate) progress: watch::Receiver<Option<String>>,
    /// The progress line last written to the row.
    pub(crate) progress_written: Option<String>,
    /// When the row's lease was last renewed, by this daemon's monotonic
    /// clock: its claim, then each renewal that renewed the row (sent then).
    pub(crate) lease_renewed: Instant,
}

/// The tries this daemon runs, and the stop order every new one must obey.
#[derive(Default)]
pub(crate) struct Tries {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tries: BTreeMap<(RequestId, ClaimToken), LiveTry>,
    /// The claim tokens of the claims under way (see [`Tries::claiming`]),
    /// each with how many claims use it.
    claiming: HashMap<ClaimToken, usize>,
    /// Set by [`Tries::stop_all`] at a shutdown: a try registered afterwards
    /// is stopped at once.
    stopping: Option<StopReason>,
    /// Set while the daemon is fenced off (see [`Tries::fence`]).
    fenced: bool,
}

/// A progress line to write to a try's row.
pub(crate) struct Progress {
    pub(crate) id: RequestId,
    pub(crate) claim_token: ClaimToken,
    pub(crate) text: String,
}

impl Tries {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a try, stopping it at once if every try has been told to
    /// stop (a shutdown, a fence); returns why it was, if it was: it must
    /// not start.
    pub(crate) fn insert(&self, id: RequestId, live: LiveTry) -> Option<StopReason> {
        let mut inner = self.lock();
        let stopping = inner
            .stopping
            .or(inner.fenced.then_some(StopReason::LostClaim));
        if let Some(reason) = stopping {
            live.stop.send_replace(Some(reason));
        }
        inner.tries.insert((id, live.claim_token.clone()), live);
        stopping
    }

    pub(crate) fn remove(&self, id: RequestId, claim_token: &ClaimToken) {
        self.lock().tries.remove(&(id, claim_token.clone()));
    }

    /// The try got its slot: its clock starts now.
    pub(crate) fn started(&self, id: RequestId, claim_token: &ClaimToken, at: Instant) {
        if let Some(live) = self.lock().tries.get_mut(&(id, claim_token.clone())) {
            live.started = at;
        }
    }

    /// The try's process runs, as `pid`.
    pub(crate) fn running(&self, id: RequestId, claim_token: &ClaimToken, pid: u32) {
        if let Some(live) = self.lock().tries.get_mut(&(id, claim_token.clone())) {
            live.pid = Some(pid);
        }
    }

    /// A claim under `claim_token` is under way until the returned guard
    /// is dropped: the rows it has claimed so far are held in the database
    /// but not registered yet (a claim of several statements commits each
    /// one as it goes, and one may wait long for a lock). The heartbeat
    /// leaves such rows alone ([`Tries::claim_under_way`]); the scheduler
    /// drops the guard once it has registered the claim's rows.
    pub(crate) fn claiming(&self, claim_token: &ClaimToken) -> Claiming<'_> {
        *self.lock().claiming.entry(claim_token.clone()).or_default() += 1;
        Claiming {
            tries: self,
            claim_token: claim_token.clone(),
        }
    }

    /// Whether a claim under `claim_token` is under way.
    pub(crate) fn claim_under_way(&self, claim_token: &ClaimToken) -> bool {
        self.lock().claiming.contains_key(claim_token)
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().tries.len()
    }

    /// How many tries have their process running (`taskrunner_running_tries`):
    /// not the rows claimed ahead that wait for a slot, nor a try still
    /// being set up or waiting for its preloaded program's boot.
    pub(crate) fn with_a_process(&self) -> usize {
        self.lock()
            .tries
            .values()
            .filter(|live| live.pid.is_some())
            .count()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lock().tries.is_empty()
    }

    /// A shutdown began: a try registered from now on is stopped at once
    /// (it does not start; its row is given back), while those registered
    /// before run on. A claim that returns just as the shutdown begins
    /// brought tries the drain did not count: they started, and the drain,
    /// which had found nothing running, waited for their ends, past
    /// `shutdown_timeout` (a task of a minute held the daemon a minute).
    pub(crate) fn no_new_ones(&self) {
        self.lock().stopping.get_or_insert(StopReason::Shutdown);
    }

    /// Asks every running try to stop, for `reason`; a shutdown also stops
    /// tries registered later (claimed just as the drain time ran out).
    pub(crate) fn stop_all(&self, reason: StopReason) {
        let mut inner = self.lock();
        if reason == StopReason::Shutdown {
            inner.stopping = Some(reason);
        }
        for live in inner.tries.values() {
            live.stop.send_replace(Some(reason));
        }
    }

    /// The heartbeat fences the daemon off (it renewed no lease in time):
    /// every try is stopped for a lost claim, and so is every try
    /// registered until [`Tries::fence_lifted`]. A claim sent before the
    /// fence may come back after it (a slow server answers claims within
    /// `lease_timeout` but not the renewals in time): no renewal covers its
    /// rows, and their tries would run on beside their reruns on other
    /// daemons once the leases lapse.
    pub(crate) fn fence(&self) {
        let mut inner = self.lock();
        inner.fenced = true;
        for live in inner.tries.values() {
            live.stop.send_replace(Some(StopReason::LostClaim));
        }
        crate::supervisor::fence::claims_lost();
    }

    /// A renewal succeeded again after [`Tries::fence`]: tries registered
    /// from now on start.
    pub(crate) fn fence_lifted(&self) {
        self.lock().fenced = false;
    }

    /// Whether the daemon is fenced off: it claims nothing meanwhile.
    pub(crate) fn fenced(&self) -> bool {
        self.lock().fenced
    }

    /// A user asked to cancel `id` while its try under `claim_token` ran:
    /// stops that try unless it is stopping already. True if it was told to
    /// stop now.
    pub(crate) fn cancel(&self, id: RequestId, claim_token: &ClaimToken) -> bool {
        let inner = self.lock();
        match inner.tries.get(&(id, claim_token.clone())) {
            Some(live) if live.stop.borrow().is_none() => {
                live.stop.send_replace(Some(StopReason::Cancel));
                true
            }
            _ => false,
        }
    }

    /// A renewal sent at `at` renewed the lease of the try's row.
    pub(crate) fn lease_renewed(&self, id: RequestId, claim_token: &ClaimToken, at: Instant) {
        if let Some(live) = self.lock().tries.get_mut(&(id, claim_token.clone())) {
            live.lease_renewed = live.lease_renewed.max(at);
        }
    }

    /// When the lease of the try's row was last renewed, by this daemon's
    /// monotonic clock; `None` for a try that is not running or already
    /// killed for its lost claim. (A try being stopped otherwise, by a
    /// cancel or a shutdown, may take its `kill_grace`: past its lease, it
    /// is killed as any other.)
    pub(crate) fn lease_renewed_at(
        &self,
        id: RequestId,
        claim_token: &ClaimToken,
    ) -> Option<Instant> {
        let inner = self.lock();
        let live = inner.tries.get(&(id, claim_token.clone()))?;
        let lost = *live.stop.borrow() == Some(StopReason::LostClaim);
        (!lost).then_some(live.lease_renewed)
    }

    /// This daemon no longer holds `id` under `claim_token`: stops its try
    /// if it still runs under that claim. True if it was told to stop.
    pub(crate) fn lost(&self, id: RequestId, claim_token: &ClaimToken) -> bool {
        let inner = self.lock();
        match inner.tries.get(&(id, claim_token.clone())) {
            Some(live) => {
                live.stop.send_replace(Some(StopReason::LostClaim));
                crate::supervisor::fence::claims_lost();
                true
            }
            None => false,
        }
    }

    /// Whether a try of this daemon runs `id` under `claim_token`.
    pub(crate) fn runs(&self, id: RequestId, claim_token: &ClaimToken) -> bool {
        self.lock().tries.contains_key(&(id, claim_token.clone()))
    }

    /// Every try with the claim token it runs under.
    pub(crate) fn claims(&self) -> Vec<(RequestId, ClaimToken)> {
        self.lock().tries.keys().cloned().collect()
    }

    /// The progress lines that changed since they were last taken.
    pub(crate) fn take_progress(&self) -> Vec<Progress> {
        let mut inner = self.lock();
        let mut changed = Vec::new();
        for ((id, _), live) in inner.tries.iter_mut() {
            let latest = live.progress.borrow().clone();
            if latest.is_some() && latest != live.progress_written {
                live.progress_written = latest.clone();
                changed.push(Progress {
                    id: *id,
                    claim_token: live.claim_token.clone(),
                    text: latest.unwrap_or_default(),
                });
            }
        }
        changed
    }

    /// How long the oldest try whose process runs has been running.
    pub(crate) fn oldest_running(&self) -> Duration {
        let oldest = self
            .lock()
            .tries
            .values()
            .filter(|live| live.pid.is_some())
            .map(|live| live.started)
            .min();
        oldest.map(|started| started.elapsed()).unwrap_or_default()
    }

    /// The pids of the tries' processes (each leads its process group).
    pub(crate) fn pids(&self) -> Vec<i64> {
        self.lock()
            .tries
            .values()
            .filter_map(|live| live.pid.map(i64::from))
            .collect()
    }

    /// The tries as `status` shows them.
    pub(crate) fn status(&self) -> Vec<RunningTask> {
        self.lock()
            .tries
            .iter()
            .map(|((id, _), live)| RunningTask {
                id: id.0,
                task: live.task.clone(),
                pid: live.pid,
                r#try: live.try_number,
                seconds: live.started.elapsed().as_secs_f64(),
                progress: live.progress.borrow().clone(),
            })
            .collect()
    }
}

/// A claim under way: see [`Tries::claiming`].
pub(crate) struct Claiming<'a> {
    tries: &'a Tries,
    claim_token: ClaimToken,
}

impl Drop for Claiming<'_> {
    fn drop(&mut self) {
        let mut inner = self.tries.lock();
        if let Some(count) = inner.claiming.get_mut(&self.claim_token) {
            *count -= 1;
            if *count == 0 {
                inner.claiming.remove(&self.claim_token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(task: &str, token: &ClaimToken) -> LiveTry {
        LiveTry {
            task: task.to_string(),
            claim_token: token.clone(),
            pid: None,
            started: Instant::now(),
            try_number: 1,
            stop: watch::channel(None).0,
            progress: watch::channel(None).1,
            progress_written: None,
            lease_renewed: Instant::now(),
        }
    }

    #[test]
    fn tries_claimed_ahead_are_held_but_not_running() {
        let tries = Tries::default();
        let token = ClaimToken::from_row("t".to_string());
        for id in 1..=3 {
            assert!(tries.insert(RequestId(id), live("NoOp", &token)).is_none());
        }
        tries.running(RequestId(2), &token, 4242);
        // Three rows held, one of them in a slot with its process (before,
        // `taskrunner_running_tries` read the three, up to 16 per slot).
        assert_eq!((tries.len(), tries.with_a_process()), (3, 1));
    }
}
