//! The executor of one claimed try: runs it (see [`crate::attempt`]),
//! waiting for its slot last, once its start is ready (the supervisor's
//! gate), logs how it ended and hands its outcome to the recorder.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::Instrument;

use super::recorder::Recorder;
use super::tries::{LiveTry, Tries};
use crate::attempt::{self, Verdict};
use crate::metrics::Metrics;
use crate::request::{Claimed, State};
use crate::store::Write;
use crate::supervisor::{Gate, Spawner, StartTimes, StopReason, Ticket, ANNOUNCE_AFTER};
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

/// A claimed row's try as registered in [`Tries`], before it runs.
pub(super) struct Registered {
    stop: watch::Receiver<Option<StopReason>>,
    progress: watch::Sender<Option<String>>,
    /// Why it was stopped as it was registered (a shutdown, a fence).
    stopped: Option<StopReason>,
}

impl Executor {
    /// Registers a claimed row's try, as soon as its claim returns it (see
    /// [`Tries::claiming`]).
    pub(super) fn register(&self, row: &Claimed) -> Registered {
        let (stop_sender, stop) = watch::channel(None);
        let (progress_sender, progress) = watch::channel(None);
        let stopped = self.tries.insert(
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
                lease_renewed: std::time::Instant::now(),
            },
        );
        Registered {
            stop,
            progress: progress_sender,
            stopped,
        }
    }

    /// Runs one claimed row's try once it has a slot, and queues its outcome.
    pub(super) async fn supervise(
        self: Arc<Self>,
        row: Claimed,
        registered: Registered,
        ticket: Ticket,
        claim: ClaimTimes,
    ) -> TryEnd {
        let queue = row.queue.clone();
        let task = crate::request::shown_task_name(&row.task_class_name).into_owned();
        let tries_left = row.tries < row.try_limit;
        let span = tracing::info_span!("task", request = %row.id, task = %task, r#try = row.tries);
        let run = self.run_claimed(&row, registered, ticket, claim);
        let ((state, daemon_short), ran_for) = match CatchPanic(run.instrument(span.clone())).await
        {
            Ok(ended) => ended,
            Err(payload) => span.in_scope(|| self.supervision_panicked(&row, payload)),
        };
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
        row: &Claimed,
        registered: Registered,
        ticket: Ticket,
        claim: ClaimTimes,
    ) -> ((State, bool), Option<Duration>) {
        let config = Setup::current_config(&self.setup);
        let Registered {
            stop,
            progress: progress_sender,
            stopped,
        } = registered;
        if let Some(reason) = stopped {
            // Stopped as it was registered (a shutdown, a fence): it does
            // not start, even into a free slot.
            return self.give_back(row, given_back(Some(reason)), &config);
        }
        // The try makes everything its start needs (type, options,
        // environment, cgroup) first, and waits for its slot last, in the
        // supervisor's gate, its start left ready in the line: a slot freed
        // by an exit starts it at once. Why it stopped waiting, if it did, is
        // kept here.
        let gave_up: Mutex<Option<Verdict>> = Mutex::default();
        let mut gate_stop = stop.clone();
        let give_up = async {
            let verdict = reason_to_stop_waiting(&mut gate_stop).await;
            *lock(&gave_up) = Some(verdict);
        };
        let context = attempt::Context {
            config: config.clone(),
            setup: self.setup.clone(),
            spawner: self.spawner.clone(),
        };
        let on_running = |spawned: &crate::supervisor::Spawned| {
            // Announced ANNOUNCE_AFTER after its start: when it started,
            // near enough (until then, the live try counts from its claim).
            let now = std::time::Instant::now();
            self.tries.started(
                row.id,
                &row.claim_token,
                now.checked_sub(ANNOUNCE_AFTER).unwrap_or(now),
            );
            self.tries.running(row.id, &row.claim_token, spawned.pid);
            tracing::debug!(pid = spawned.pid, "started");
            crate::test_hooks::panic_in_a_try_when_told(&row.task_class_name);
        };
        let (verdict, outcome) = attempt::run_claimed(
            &context,
            row,
            false,
            Gate::Slot(ticket, give_up),
            stop,
            Some(progress_sender),
            |write| self.recorder.send(write),
            on_running,
        )
        .await;
        if verdict.never_started {
            // Why it stopped waiting: kept by its gate, or by the run for
            // a preloaded start; neither: the line was closed (a shutdown).
            let stopped = verdict.stopped_before_start;
            let verdict = lock(&gave_up)
                .take()
                .unwrap_or_else(|| given_back(Some(stopped.unwrap_or(StopReason::Shutdown))));
            return self.give_back(row, verdict, &config);
        }
        self.tries.remove(row.id, &row.claim_token);
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
        // None for a try whose process never started (an unknown type,
        // options refused, a program that cannot be run): it ran for no
        // time, and says nothing of how long tries take.
        let ran_for = verdict
            .start_times
            .and_then(|start| start.asked.elapsed().ok());
        ((verdict.state, false), ran_for)
    }

    /// A try's supervision panicked (a bug of the daemon's): the try is
    /// recorded `CRASHED` and counted, as a crash of the daemon would have
    /// it, so that it runs again (or, a panic on what the row holds, ends
    /// once its tries are spent), and the daemon goes on with its other
    /// tries. Its process, if it had started, was killed as its handle was
    /// dropped. Before, the panic was dropped with the try: no line, and
    /// the row stayed RUNNING for as long as the daemon ran.
    fn supervision_panicked(
        &self,
        row: &Claimed,
        payload: Box<dyn std::any::Any + Send>,
    ) -> ((State, bool), Option<Duration>) {
        let message = super::panic_message(payload);
        tracing::error!(
            "the daemon's supervision of this try panicked (a bug in taskrunner: please report it): {message}; its process, if it ran, was killed, and the try is recorded CRASHED"
        );
        self.tries.remove(row.id, &row.claim_token);
        let config = Setup::current_config(&self.setup);
        let verdict = Verdict::new(
            State::Crashed,
            format!("the daemon's supervision of this try failed (a bug in taskrunner): {message}"),
        );
        let outcome = attempt::outcome(row, &verdict, &config);
        self.recorder.send(Write::Outcome(outcome));
        ((State::Crashed, false), None)
    }

    /// Ends a try that never started with `verdict` (see [`given_back`]).
    fn give_back(
        &self,
        row: &Claimed,
        verdict: Verdict,
        config: &crate::config::Config,
    ) -> ((State, bool), Option<Duration>) {
        self.tries.remove(row.id, &row.claim_token);
        tracing::info!("{}", verdict.result_text);
        let outcome = attempt::outcome(row, &verdict, config);
        self.recorder.send(Write::Outcome(outcome));
        ((verdict.state, false), None)
    }
}

/// Waits for a reason to stop waiting for a slot: a row claimed ahead may
/// be stopped first (a cancel, a shutdown, a lost claim) or find no slot in
/// time; it is then given back, its try not counted, unless a user
/// cancelled it.
async fn reason_to_stop_waiting(stop: &mut watch::Receiver<Option<StopReason>>) -> Verdict {
    let deadline = tokio::time::sleep(AHEAD_MAX_WAIT);
    tokio::pin!(deadline);
    let stopped = loop {
        tokio::select! {
            changed = stop.changed() => match changed.map(|()| *stop.borrow_and_update()) {
                Ok(Some(reason)) => break Some(reason),
                Ok(None) => continue,
                Err(_) => break Some(StopReason::Shutdown),
            },
            () = &mut deadline => break None,
        }
    };
    given_back(stopped)
}

/// The verdict of a try that stopped waiting for its slot because of
/// `stopped` (`None`: no slot came in time).
fn given_back(stopped: Option<StopReason>) -> Verdict {
    let (state, text) = match stopped {
        Some(StopReason::Cancel) => (State::Cancelled, "cancelled by a user before it started"),
        Some(StopReason::Shutdown) => (
            State::Interrupted,
            "given back before it started: the daemon was shut down",
        ),
        // Its try not counted either: this daemon's own failure to keep
        // the claim (taken over, or fenced off) is no fault of the task's.
        Some(StopReason::LostClaim) => (
            State::Interrupted,
            "given back before it started: this daemon lost (or could not renew) its claim on the row",
        ),
        None => (
            State::Interrupted,
            "given back before it started: no free slot on this daemon within 1s",
        ),
    };
    Verdict::new(state, text)
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

/// A future whose panic is caught and returned as its payload (as
/// `catch_unwind` does for a closure).
struct CatchPanic<F>(F);

impl<F: std::future::Future> std::future::Future for CatchPanic<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        // SAFETY: the inner future is never moved out of its pin.
        let inner = unsafe { self.map_unchecked_mut(|this| &mut this.0) };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(value)) => std::task::Poll::Ready(Ok(value)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(payload) => std::task::Poll::Ready(Err(payload)),
        }
    }
}
