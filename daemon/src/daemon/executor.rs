//! The executor of one claimed try: runs it (see [`crate::attempt`]),
//! waiting for its slot last, once its start is ready (the supervisor's
//! gate), logs how it ended and hands its outcome to the recorder.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use super::recorder::Recorder;
use super::slots::{Slot, Slots};
use super::tries::{LiveTry, Tries};
use crate::attempt::{self, Verdict};
use crate::metrics::Metrics;
use crate::request::{Claimed, State};
use crate::store::Write;
use crate::supervisor::{Spawner, StartTimes, StopReason};
use crate::task_types::Setup;

/// A row claimed ahead that has found no free slot after this long is given back.
pub(super) const AHEAD_MAX_WAIT: Duration = Duration::from_secs(1);

/// How a try ended, as the scheduler counts it.
pub(super) struct TryEnd {
    pub(super) task: String,
    pub(super) queue: String,
    /// The try failed with no try left.
    pub(super) exhausted: bool,
    /// How long its process ran; `None` if it never started.
    pub(super) ran_for: Option<Duration>,
    pub(super) state: State,
    /// It could not start for the daemon's own lack of resources.
    pub(super) daemon_short: bool,
}

/// When the claim that took a row was sent and when its rows came back,
/// by the wall clock (see [`crate::supervisor::StartTimes`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct ClaimTimes {
    pub(super) sent: SystemTime,
    pub(super) returned: SystemTime,
}

/// What the tries of claimed rows use: the scheduler starts each one's
/// [`Executor::supervise`].
pub(super) struct Executor {
    pub(super) setup: watch::Sender<Setup>,
    pub(super) spawner: Spawner,
    /// Each try is registered here from its claim until its outcome is queued.
    pub(super) tries: Arc<Tries>,
    pub(super) recorder: Recorder,
    pub(super) metrics: Arc<Metrics>,
}

impl Executor {
    /// Runs one claimed row's try once it has a slot, and queues its outcome.
    pub(super) async fn supervise(
        self: Arc<Self>,
        slots: Arc<Slots>,
        row: Claimed,
        go: oneshot::Receiver<()>,
        claim: ClaimTimes,
    ) -> TryEnd {
        let queue = row.queue.clone();
        let task = crate::request::shown_task_name(&row.task_class_name).into_owned();
        let tries_left = row.tries < row.try_limit;
        let span = tracing::info_span!("task", request = %row.id, task = %task, r#try = row.tries);
        let ((state, daemon_short), ran_for) = self
            .run_claimed(&slots, row, go, claim)
            .instrument(span)
            .await;
        TryEnd {
            task,
            queue,
            exhausted: !tries_left
                && matches!(state, State::Failed | State::Crashed | State::Timeout),
            ran_for,
            state,
            daemon_short,
        }
    }

    /// Returns how the try ended (and whether it could not start for the
    /// daemon's own lack of resources), and how long its process ran (`None` if
    /// it never started).
    async fn run_claimed(
        &self,
        slots: &Slots,
        row: Claimed,
        mut go: oneshot::Receiver<()>,
        claim: ClaimTimes,
    ) -> ((State, bool), Option<Duration>) {
        let config = Setup::current_config(&self.setup);
        let (stop_sender, stop) = watch::channel(None);
        let (progress_sender, progress) = watch::channel(None);
        self.tries.insert(
            row.id,
            LiveTry {
                task: crate::request::shown_task_name(&row.task_class_name).into_owned(),
                claim_token: row.claim_token.clone(),
                pid: None,
                started: std::time::Instant::now(),
                try_number: row.tries,
                stop: stop_sender,
                progress,
                progress_written: None,
            },
        );
        // The try makes everything its start needs (type, options,
        // environment, cgroup) first, and waits for its slot last, in the
        // supervisor's gate: a slot freed by an exit starts it at once.
        let gated: Mutex<Gated<'_>> = Mutex::default();
        let mut gate_stop = stop.clone();
        let gate = async {
            lock(&gated).reached = true;
            let (had_slot, verdict) = wait_for_slot(&mut go, &mut gate_stop).await;
            let mut gated = lock(&gated);
            if had_slot {
                gated.slot = Some(Slot {
                    slots,
                    max_concurrent: config.max_concurrent,
                });
            }
            if let Some(verdict) = verdict {
                gated.not_started = Some(verdict);
                return false;
            }
            let now = std::time::Instant::now();
            gated.started = Some(now);
            self.tries.started(row.id, now);
            true
        };
        let context = attempt::Context {
            config: config.clone(),
            setup: self.setup.clone(),
            spawner: self.spawner.clone(),
        };
        let on_running = |spawned: &crate::supervisor::Spawned| {
            self.tries.running(row.id, spawned.pid);
            tracing::debug!(pid = spawned.pid, "started");
        };
        // The slot is free once the process has exited.
        let on_exit = || drop(lock(&gated).slot.take());
        let (verdict, outcome) = attempt::run_claimed(
            &context,
            &row,
            false,
            gate,
            stop,
            Some(progress_sender),
            |write| self.recorder.send(write),
            on_running,
            on_exit,
        )
        .await;
        let gated = gated.into_inner().unwrap_or_else(|e| e.into_inner());
        // A try that never started (or whose start failed) frees its slot now.
        drop(gated.slot);
        if !gated.reached {
            // Rejected before it waited: a slot sent to it meanwhile is handed back.
            go.close();
            if go.try_recv().is_ok() {
                drop(Slot {
                    slots,
                    max_concurrent: config.max_concurrent,
                });
            }
        }
        if let Some(verdict) = gated.not_started {
            self.tries.remove(row.id);
            tracing::info!("{}", verdict.result_text);
            let outcome = attempt::outcome(&row, &verdict, &config);
            self.recorder.send(Write::Outcome(outcome));
            return ((verdict.state, false), None);
        }
        let started = gated.started.unwrap_or_else(std::time::Instant::now);
        self.tries.remove(row.id);
        if let Some(took) = verdict.spawn_took {
            self.metrics.spawned(took);
        }
        if let Some(start) = &verdict.start_times {
            log_start_times(&claim, start);
        }
        if verdict.daemon_short {
            // Logged once per shortage by the scheduler, not once per try.
            tracing::debug!("{}", verdict.result_text);
            self.recorder.send(Write::Outcome(outcome));
            return ((verdict.state, true), None);
        }
        match verdict.state {
            State::Finished => tracing::debug!("finished"),
            State::Interrupted | State::Cancelled => tracing::info!("{}", verdict.result_text),
            _ => {
                let first_line = verdict.result_text.lines().next().unwrap_or_default();
                let retry = match outcome.retry_after {
                    Some(seconds) if row.tries < row.try_limit => {
                        format!("; retry in {seconds:.1}s")
                    }
                    Some(_) => format!("; no tries left ({} of {})", row.tries, row.try_limit),
                    None => String::new(),
                };
                match verdict
                    .stderr_tail
                    .as_deref()
                    .filter(|t| !t.trim().is_empty())
                {
                    Some(tail) => {
                        tracing::warn!(stderr_tail = %last_lines(tail), "{}: {first_line}{retry}", verdict.state)
                    }
                    None => tracing::warn!("{}: {first_line}{retry}", verdict.state),
                }
            }
        }
        self.recorder.send(Write::Outcome(outcome));
        ((verdict.state, false), Some(started.elapsed()))
    }
}

/// Waits until the scheduler gives this try a slot. Returns whether it got
/// one, and a verdict if it must not run: a row claimed ahead may be stopped
/// first (a cancel, a shutdown, a lost claim) or find no slot in time; it is
/// then given back, its try not counted, unless a user cancelled it.
async fn wait_for_slot(
    slot: &mut oneshot::Receiver<()>,
    stop: &mut watch::Receiver<Option<StopReason>>,
) -> (bool, Option<Verdict>) {
    let deadline = tokio::time::sleep(AHEAD_MAX_WAIT);
    tokio::pin!(deadline);
    let stopped = loop {
        tokio::select! {
            biased;
            given = &mut *slot => match given {
                Ok(()) => return (true, None),
                // The scheduler stopped claiming (a shutdown).
                Err(_) => break Some(StopReason::Shutdown),
            },
            changed = stop.changed() => match changed.map(|()| *stop.borrow_and_update()) {
                Ok(Some(reason)) => break Some(reason),
                Ok(None) => continue,
                Err(_) => break Some(StopReason::Shutdown),
            },
            () = &mut deadline => break None,
        }
    };
    // A slot sent just as we stopped waiting is ours to hand back.
    slot.close();
    let had_slot = slot.try_recv().is_ok();
    if had_slot && stopped.is_none() {
        return (true, None);
    }
    let (state, text) = match stopped {
        Some(StopReason::Cancel) => (State::Cancelled, "cancelled by a user before it started"),
        Some(StopReason::Shutdown) => (
            State::Interrupted,
            "given back before it started: the daemon was shut down",
        ),
        Some(StopReason::LostClaim) => (
            State::Crashed,
            "stopped before it started: this daemon lost its claim on the row",
        ),
        None => (
            State::Interrupted,
            "given back before it started: no free slot on this daemon within 1s",
        ),
    };
    (had_slot, Some(Verdict::new(state, text)))
}

/// What a try's gate (its wait for a slot, last before the spawn) saw.
#[derive(Default)]
struct Gated<'a> {
    /// The try got as far as its gate (a try rejected for its type or
    /// options before it never does).
    reached: bool,
    /// The slot it holds until its process exits.
    slot: Option<Slot<'a>>,
    /// When it got its slot and started.
    started: Option<std::time::Instant>,
    /// Why it never started (stopped or given back while it waited).
    not_started: Option<Verdict>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One debug line with the wall-clock instants of a try's start, in
/// nanoseconds since the Unix epoch: `scripts/bench` compares them with the
/// row's `started_at` and with the task's own clock to say where
/// claim-to-start goes (`TASKRUNNER_LOG=info,taskrunner::start_timing=debug`).
fn log_start_times(claim: &ClaimTimes, start: &StartTimes) {
    if !tracing::enabled!(target: "taskrunner::start_timing", tracing::Level::DEBUG) {
        return;
    }
    let ns = |at: SystemTime| {
        at.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64)
    };
    tracing::debug!(
        target: "taskrunner::start_timing",
        claim_sent = ns(claim.sent),
        claim_returned = ns(claim.returned),
        launched = ns(start.launched),
        asked = ns(start.asked),
        handed_off = ns(start.handed_off),
        created = ns(start.created),
        spawned = ns(start.spawned),
        "start times"
    );
}

/// The last few lines of a task's stderr, for a log line.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}
