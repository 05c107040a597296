//! The heartbeat: every `heartbeat_interval` it renews `heartbeat_at` of all
//! rows this daemon runs in one statement, learns which of them a user asked
//! to cancel, and writes changed progress lines. A `wake` on the control
//! socket (sent by a local `taskrunner-cli cancel`) makes it look at once.
//!
//! Self-fencing: when the daemon cannot renew its leases on PostgreSQL, other
//! daemons will take its rows as crashed once `lease_timeout` has passed. So
//! at `lease_timeout − heartbeat_interval − kill_grace` after the last
//! successful renewal was sent (monotonic clock; a shorter margin than
//! `heartbeat_interval` where the lease is tight, see [`fence_after`](crate::config::Config::fence_after)) it
//! kills its own tasks, and one row never runs on two hosts at once; and it
//! claims nothing until a renewal succeeds again (renewals that fail while
//! claims work, say a trigger of an application's that refuses them, would
//! otherwise start tries no renewal covers; a claim sent before the fence
//! and answered after it starts nothing either, see [`Tries::fence`]). On
//! SQLite (one host) it keeps supervising through an outage instead, and
//! records outcomes later.
//! A daemon that did not run for a while (stopped, frozen) finds both its
//! renewal and its deadline due when it resumes: it renews first, keeps the
//! tries whose rows are still its own and kills the others at once. While
//! it does not run, its fencing watchdog, a process apart, kills its tasks
//! at `lease_timeout − heartbeat_interval` after the last renewal (see
//! supervisor/watchdog.rs): the heartbeat tells it each new deadline.
//! A renewal is waited for until the fencing deadline, a slow one too;
//! one not answered within an interval gets a second one beside it, on
//! another connection, in case its own went silent (see [`renewed_by`]).
//! After a failed renewal the next one is tried [`RETRY_AFTER_FAILURE`]
//! later, or after half the time left before the deadline if that is
//! less, not a whole `heartbeat_interval`: an outage that ends before the
//! deadline then costs no task (with a full interval between tries, one
//! that ended up to an interval before it still did; with a second, under
//! a lease of a few intervals, a single failed renewal did).
//!
//! Rows held but never started: a claim whose answer was lost (the
//! connection dropped after PostgreSQL committed the `UPDATE … RETURNING`)
//! leaves rows RUNNING under this daemon's instance that no try of it runs.
//! Renewing them would keep them from every reaper for ever, so a row found
//! held in two renewals in a row, under the same claim token, without a try
//! of this daemon running it, is given back (INTERRUPTED, its try not
//! counted). Two renewals, because a row just claimed reaches the live map
//! a moment after its claim commits.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::recorder::Recorder;
use super::tries::Tries;
use crate::health::Health;
use crate::instance::ClaimToken;
use crate::instance::InstanceId;
use crate::store::{Backend, Store, Write};
use crate::supervisor::fence::boot_clock;
use crate::supervisor::watchdog::Watchdog;
use crate::task_types::Setup;

/// How soon a failed renewal is tried again (or `heartbeat_interval`, or
/// half the time left before the fencing deadline, if shorter).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The shortest pause between failed renewals.
const RETRY_AT_LEAST_AFTER: Duration = Duration::from_millis(10);

/// How long after its renewal was due the heartbeat must wake, past the
/// fencing deadline, to take itself for not having run (see
/// [`Heartbeat::resumed_late`]).
const WOKEN_LATE: Duration = Duration::from_secs(1);

/// Renews the leases of this daemon's rows, stops the tries cancelled or
/// lost, and fences the daemon off when it cannot renew (see the module's doc).
pub(super) struct Heartbeat {
    /// The lease this daemon's row in `task_runner_daemons` holds, as the
    /// daemon's start wrote it (`None`: the write failed): other hosts'
    /// reapers wait that long for a renewal.
    pub(super) published: Option<Duration>,
    pub(super) setup: watch::Sender<Setup>,
    pub(super) store: Store,
    pub(super) instance: InstanceId,
    pub(super) tries: Arc<Tries>,
    pub(super) health: Arc<Health>,
    /// Queues the progress lines and the give-backs of rows never started.
    pub(super) recorder: Recorder,
    /// Look for cancel requests now: a `wake` on the control socket.
    pub(super) check_cancels: Arc<Notify>,
    /// Kills this daemon's tasks if it stops renewing while it does not
    /// run itself (PostgreSQL, MariaDB/MySQL; see supervisor/watchdog.rs).
    pub(super) watchdog: Option<Arc<Watchdog>>,
    /// Woken when a renewal lifts a fence: the scheduler claims nothing
    /// while the daemon is fenced off (see [`Tries::fence`]).
    pub(super) wake: Arc<Notify>,
}

impl Heartbeat {
    pub(super) async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        // When the last successful renewal was sent, and when it returned.
        let mut last_sent = Instant::now();
        let mut last_renewal = last_sent;
        // When the last renewal was sent: the next is due an interval after
        // it (not after it returned: the fencing deadline counts from the
        // sending too, and may leave little room).
        let mut attempted = last_sent;
        // A row claimed from now on holds its lease from its claim, later.
        self.arm_watchdog(boot_clock());
        let mut failed = false;
        // Rows held at the last renewal that no try of this daemon runs.
        let mut strays: HashMap<crate::request::RequestId, ClaimToken> = HashMap::new();
        // Rows the last renewal skipped (another session holds them
        // locked), and when the first of their tries is to be stopped.
        let mut skipped: Vec<(crate::request::RequestId, ClaimToken)> = Vec::new();
        let mut skipped_deadline: Option<Instant> = None;
        // The lease this daemon's row last took (see `renew_presence`).
        let mut published = self.published;
        loop {
            let config = Setup::current_config(&self.setup);
            let fenced = self.tries.fenced();
            let fence_deadline =
                (self.store.backend() != Backend::Sqlite).then(|| last_sent + config.fence_after());
            // After a failure, a pause from now: a retry that were due at
            // once would always win the biased race below, and the fencing
            // deadline would wait for the renewals to stop failing. Half the
            // time left before that deadline, if less: with a lease of a few
            // intervals, a retry a whole second after a failed renewal came
            // after the deadline, and one failed renewal killed every task.
            let next_renewal = if failed {
                let mut pause = RETRY_AFTER_FAILURE.min(config.heartbeat_interval);
                if let Some(deadline) = fence_deadline.filter(|_| !fenced) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    pause = pause.min((left / 2).max(RETRY_AT_LEAST_AFTER));
                }
                Instant::now() + pause
            } else if published != Some(config.lease_timeout) {
                // Until the row holds this lease, other hosts' reapers may
                // judge this daemon's rows by a shorter one: renewed at
                // least every second meanwhile, not at a longer interval a
                // reload just set.
                attempted + config.heartbeat_interval.min(RETRY_AFTER_FAILURE)
            } else {
                attempted + config.heartbeat_interval
            };
            // Biased: when the renewal and the fencing deadline are both due,
            // the daemon did not run for a while (see `resumed_late`), and the
            // renewal goes first.
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    // The tries have ended: the daemon is stopping.
                    if let Some(watchdog) = &self.watchdog {
                        watchdog.set_deadline(boot_clock(), None);
                        crate::supervisor::fence::set_fence(None);
                    }
                    return Ok(());
                }
                _ = tokio::time::sleep_until(next_renewal) => {}
                // A local `cancel` asked: renew early, which reads the cancels.
                _ = self.check_cancels.notified() => {}
                _ = crate::units::sleep_until_opt(fence_deadline), if !fenced => {
                    let running = self.tries.len();
                    let silent = last_renewal.elapsed().as_secs_f64();
                    if running > 0 {
                        tracing::error!(
                            running,
                            "no heartbeat renewal for {silent:.1}s: killing this daemon's tasks before their lease lapses, so that no other daemon runs them at the same time; no new claims until a renewal succeeds"
                        );
                    } else {
                        tracing::warn!(
                            "no heartbeat renewal for {silent:.1}s: no new claims until a renewal succeeds"
                        );
                    }
                    self.tries.fence();
                    continue;
                }
                _ = crate::units::sleep_until_opt(skipped_deadline) => {
                    skipped_deadline = self.stop_tries_whose_lease_is_not_renewed(&skipped, &config);
                    continue;
                }
            }
            panic_when_told_by_a_test();
            // A reload while this waited: its lease is the one written below.
            let config = Setup::current_config(&self.setup);
            // Past the deadline, and woken well after the renewal was due:
            // the daemon did not run. (A retry due just before the deadline,
            // after failed renewals, may run just after it: that is no sign.)
            let now = Instant::now();
            if !fenced
                && fence_deadline.is_some_and(|deadline| now >= deadline)
                && now.saturating_duration_since(next_renewal) >= WOKEN_LATE
            {
                self.resumed_late(last_renewal.elapsed(), config.lease_timeout);
            }
            // Which tries were running before the renewal: a claim made while
            // it ran must not be taken for a lost one.
            let before = self.tries.claims();
            let (sent_at, sent) = (Instant::now(), boot_clock());
            attempted = sent_at;
            // Waited for until the fencing deadline: a slow server's renewal
            // still counts (see `renewed_by`). Not by a shutdown: the top of
            // the loop ends the heartbeat.
            let by = fence_deadline.filter(|_| !fenced);
            let renewal = tokio::select! {
                renewal = renewed_by(&self.store, &config, by, || {
                    self.store.renew_heartbeats(&self.instance)
                }) => renewal,
                _ = stop.cancelled() => {
                    self.store.giving_up_on_a_connection();
                    continue;
                }
            };
            let held = match renewal {
                Ok(held) => {
                    self.health.succeeded("renewing heartbeats");
                    last_renewal = Instant::now();
                    last_sent = sent_at;
                    failed = false;
                    held
                }
                Err(error) => {
                    self.health.failed("renewing heartbeats", &error);
                    failed = true;
                    continue;
                }
            };
            let still_held: HashSet<(crate::request::RequestId, &str)> = held
                .iter()
                .map(|h| (h.id, h.claim_token.as_str()))
                .collect();
            for h in held.iter().filter(|h| h.cancel_requested) {
                // The try of the claim the renewal read the cancel on: not a
                // later try of the row claimed here meanwhile (the row ended,
                // was retried, and claimed again; the retry cleared the cancel).
                if self.tries.cancel(h.id, &h.claim_token) {
                    tracing::info!(request = %h.id, "cancel requested: stopping the task");
                }
            }
            for (id, token) in &before {
                if !still_held.contains(&(*id, token.as_str())) && self.tries.lost(*id, token) {
                    tracing::error!(request = %id, "this daemon no longer holds the row (reaped or taken over): killing its task");
                }
            }
            // The fence moves on only now that the tries of rows no longer
            // held are told: a start in between (on a spawner thread) would
            // have found neither its stop nor the fence.
            self.arm_watchdog(sent);
            if fenced {
                tracing::info!("heartbeats renewed again: claiming resumes");
                self.tries.fence_lifted();
                self.wake.notify_one();
            }
            strays = self.give_back_strays(&held, strays);
            skipped = self.note_renewed(&held, sent_at);
            skipped_deadline = self.stop_tries_whose_lease_is_not_renewed(&skipped, &config);
            self.write_progress();
            published = self.renew_presence(&config, published).await;
        }
    }

    /// Writes the daemon's own row: for the web page, and its lease for
    /// other hosts' reapers, read from the config of this renewal (a reload
    /// that lengthened the lease while the heartbeat waited is written
    /// before the longer interval it set begins: before, the row kept the
    /// old lease for that whole interval, and another host's reaper took
    /// this daemon's running rows for crashed). Gives the lease the row
    /// holds now, as far as is known.
    async fn renew_presence(
        &self,
        config: &crate::config::Config,
        published: Option<Duration>,
    ) -> Option<Duration> {
        let me = super::presence(&self.instance, config);
        let written = within_interval(
            &self.store,
            config,
            self.store.daemon_heartbeat(&me, self.tries.len()),
        )
        .await;
        match written {
            Ok(()) => Some(config.lease_timeout),
            Err(error) => {
                if published.is_some() {
                    tracing::warn!(
                        "could not renew this daemon's row in task_runner_daemons: {}; renewing every second until it is written",
                        crate::error_line(&error)
                    );
                }
                None
            }
        }
    }

    /// Tells the watchdog the deadline of a renewal sent at `sent` (on
    /// [`boot_clock`]): when the daemon's own fence, had it run, would have
    /// sent its tasks `SIGKILL` (`kill_grace` after their `SIGTERM`, see
    /// [`fence_after`](crate::config::Config::fence_after)).
    fn arm_watchdog(&self, sent: std::time::Duration) {
        if let Some(watchdog) = &self.watchdog {
            let config = Setup::current_config(&self.setup);
            let after = config.watchdog_after();
            watchdog.set_deadline(sent, Some(sent + after));
            crate::supervisor::fence::set_fence(Some(sent + config.fence_after()));
        }
    }

    /// The fencing deadline passed while the daemon itself did not run (a
    /// `SIGSTOP`, a frozen machine, a starved CPU): its timer would have
    /// fired otherwise. The renewal that follows tells which rows are still
    /// its own, and it keeps their tries; a row reaped or taken over by
    /// another daemon meanwhile is not, and its try is killed (as is every
    /// try, by the fencing deadline, if the renewal fails).
    fn resumed_late(&self, silent: Duration, lease_timeout: Duration) {
        let running = self.tries.len();
        if running == 0 {
            return;
        }
        let lapsed = if silent >= lease_timeout {
            format!(
                ", past its lease ({}): another daemon may have taken its rows over",
                crate::units::format_duration(lease_timeout)
            )
        } else {
            String::new()
        };
        tracing::error!(
            running,
            "no heartbeat renewal for {:.1}s: this daemon was not running (stopped? frozen?){lapsed}; renewing now, and killing the tasks of rows no longer its own",
            silent.as_secs_f64()
        );
    }

    /// Gives back the rows held now that no try of this daemon runs and that
    /// were already such strays, under the same claim token, at the last
    /// renewal; returns this renewal's strays. A row whose claim is still
    /// under way (it commits its statements one by one, and may wait for a
    /// type's lock between them) is no stray: its try is registered when the
    /// claim returns. A row whose try ended and whose
    /// outcome waits in the recorder (the database is slow, or a row lock
    /// holds the write) is no stray: its outcome is on its way. The give-back is fenced by the
    /// claim token and queued behind any outcome the recorder still holds for
    /// the row, so it never overwrites a try's own outcome.
    fn give_back_strays(
        &self,
        held: &[crate::store::Held],
        previous: HashMap<crate::request::RequestId, ClaimToken>,
    ) -> HashMap<crate::request::RequestId, ClaimToken> {
        let strays: HashMap<crate::request::RequestId, ClaimToken> = held
            .iter()
            .filter(|h| {
                !self.tries.runs(h.id, &h.claim_token)
                    && !self.tries.claim_under_way(&h.claim_token)
                    && !self.recorder.outcome_pending(h.id, &h.claim_token)
            })
            .map(|h| (h.id, h.claim_token.clone()))
            .collect();
        let lost: Vec<(crate::request::RequestId, ClaimToken)> = strays
            .iter()
            .filter(|(id, token)| previous.get(id) == Some(token))
            .map(|(id, token)| (*id, token.clone()))
            .collect();
        if lost.is_empty() {
            return strays;
        }
        tracing::warn!(
            requests = ?lost.iter().map(|(id, _)| id.0).collect::<Vec<_>>(),
            "this daemon holds rows it never started: giving them back (a claim's answer was lost)"
        );
        for (id, token) in &lost {
            self.recorder.send(Write::Outcome(crate::store::Outcome {
                id: *id,
                claim_token: token.clone(),
                state: crate::request::State::Interrupted,
                result_text: "given back before it started: the answer to its claim was lost"
                    .into(),
                retry_after: None,
                give_back_try: true,
                // A cancel written meanwhile makes it CANCELLED, and its
                // flow's next step or next occurrence comes with that (rare:
                // the finalization path's lookup costs nothing to a plain row).
                composed: true,
            }));
        }
        strays
            .into_iter()
            .filter(|(id, _)| !lost.iter().any(|(lost_id, _)| lost_id == id))
            .collect()
    }

    /// Notes, for each try, that the renewal sent at `sent` renewed its
    /// row's lease; returns the held rows it skipped (another session held
    /// them locked).
    fn note_renewed(
        &self,
        held: &[crate::store::Held],
        sent: Instant,
    ) -> Vec<(crate::request::RequestId, ClaimToken)> {
        let mut skipped = Vec::new();
        for h in held {
            if h.renewed {
                self.tries
                    .lease_renewed(h.id, &h.claim_token, sent.into_std());
            } else {
                skipped.push((h.id, h.claim_token.clone()));
            }
        }
        skipped
    }

    /// Stops the try of each row the renewals skip once its lease has gone
    /// unrenewed as long as the daemon's own fence allows ([`fence_after`](crate::config::Config::fence_after)),
    /// before that lease lapses; returns when the next of the others is
    /// due. The renewal does not wait for a row another session holds
    /// locked (an application's transaction on its request's row): it
    /// renews the others, and the daemon's own fence stays quiet, while
    /// that row's lease alone ages; once it lapses, another daemon's reaper
    /// runs the row again. The try is killed as at the daemon's own fence
    /// (`CRASHED`, written once the lock goes). The time is the daemon's
    /// monotonic clock, which a pause of the whole machine does not move: at
    /// such a pause every lease ages by the database's clock alike, and the
    /// renewal that follows finds the rows still held and renews them.
    fn stop_tries_whose_lease_is_not_renewed(
        &self,
        skipped: &[(crate::request::RequestId, ClaimToken)],
        config: &crate::config::Config,
    ) -> Option<Instant> {
        let limit = config.fence_after();
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for (id, token) in skipped {
            let Some(renewed) = self.tries.lease_renewed_at(*id, token) else {
                continue;
            };
            let deadline = Instant::from_std(renewed) + limit;
            if deadline > now {
                next = Some(next.map_or(deadline, |next| next.min(deadline)));
            } else if self.tries.lost(*id, token) {
                tracing::error!(
                    request = %id,
                    "the row's lease was not renewed for {:.1}s (another session holds the row locked?): killing its task before the lease lapses",
                    renewed.elapsed().as_secs_f64()
                );
            }
        }
        next
    }

    /// Queues a fenced write for every try whose progress changed.
    fn write_progress(&self) {
        for progress in self.tries.take_progress() {
            self.recorder.send(Write::Progress {
                id: progress.id,
                claim_token: progress.claim_token,
                text: progress.text,
            });
        }
    }
}

/// A test-only hook, compiled into debug builds only: the heartbeat panics
/// once the file named by `TASKRUNNER_TEST_HEARTBEAT_PANIC_FILE` exists, so
/// that a test can watch the daemon stop when a service dies.
fn panic_when_told_by_a_test() {
    #[cfg(debug_assertions)]
    if let Some(path) = std::env::var_os("TASKRUNNER_TEST_HEARTBEAT_PANIC_FILE") {
        if std::path::Path::new(&path).exists() {
            panic!("the heartbeat panics: told to by a test");
        }
    }
}

/// The renewal `renew` makes, waited for until `deadline` (the fencing
/// deadline; none on SQLite, whose waits are for locks that `busy_timeout`
/// bounds already, and none while the daemon is fenced off, when a whole
/// `heartbeat_interval` bounds it as it does the daemon's own row).
///
/// A renewal that takes longer than a `heartbeat_interval` (at least 1 s)
/// is either slow (a server under load, a row lock an application holds)
/// or lost on a connection gone silent (a failover without a reset). So a
/// second renewal is sent then, on another connection, beside the first,
/// and the first to succeed counts. Before, the first was given up after
/// the interval and tried again: a server that answered each renewal in
/// 1.5 s with renewals every second failed every one, was logged as
/// unavailable, and fenced the daemon off, killing its tasks, though it
/// answered the claims.
async fn renewed_by<T, F>(
    store: &Store,
    config: &crate::config::Config,
    deadline: Option<Instant>,
    renew: impl Fn() -> F,
) -> anyhow::Result<T>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let patience = patience(config);
    if store.backend() == Backend::Sqlite {
        return renew().await;
    }
    let Some(deadline) = deadline.filter(|at| *at > Instant::now() + patience) else {
        return within_interval(store, config, renew()).await;
    };
    let first = renew();
    tokio::pin!(first);
    tokio::select! {
        done = &mut first => return done,
        _ = tokio::time::sleep(patience) => {}
    }
    tracing::debug!(
        "the lease renewal has not answered within {}: another one sent beside it",
        crate::units::format_duration(patience)
    );
    let second = renew();
    tokio::pin!(second);
    let (mut first_done, mut second_done) = (false, false);
    let outcome = loop {
        let done = tokio::select! {
            done = &mut first, if !first_done => {
                first_done = true;
                done
            }
            done = &mut second, if !second_done => {
                second_done = true;
                done
            }
            _ = tokio::time::sleep_until(deadline) => {
                break Err(anyhow::anyhow!("the heartbeat statement timed out"));
            }
        };
        match done {
            Ok(held) => break Ok(held),
            Err(error) if first_done && second_done => break Err(error),
            // The other one may still succeed.
            Err(_) => {}
        }
    };
    if !(first_done && second_done) {
        // The other one's connection is dropped in the middle of its call.
        store.giving_up_on_a_connection();
    }
    outcome
}

/// How long one heartbeat statement is waited for alone: a whole
/// `heartbeat_interval`, at least 1 s.
fn patience(config: &crate::config::Config) -> Duration {
    config.heartbeat_interval.max(Duration::from_secs(1))
}

/// One of the heartbeat's statements, given up once it has taken a whole
/// `heartbeat_interval` (at least 1 s): a statement that hangs must not keep
/// the heartbeat from its self-fencing deadline. A statement given up is
/// marked so before its connection is dropped, as [`Store::answered`] does:
/// unmarked, the connection went back to the pool to be checked by sqlx with
/// no bound, a wait for ever on a connection gone silent that held one of
/// the pool's four places (four renewals so took the whole pool).
async fn within_interval<T>(
    store: &Store,
    config: &crate::config::Config,
    statement: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::pin!(statement);
    tokio::select! {
        done = &mut statement => done,
        _ = tokio::time::sleep(patience(config)) => {
            store.giving_up_on_a_connection();
            Err(anyhow::anyhow!("the heartbeat statement timed out"))
        }
    }
}
