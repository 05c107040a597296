//! The scheduler: claims runnable rows and starts a supervised try for each,
//! at most `max_concurrent` processes at once. It claims when woken (a row
//! was enqueued, a try ended, a delay came due) and at the latest every
//! `poll_interval`.
//!
//! Delayed rows: a claim takes a delayed row only once a daemon has
//! released it ([`Releases`], `Store::release_delays`), so that claims never
//! walk the rows delayed into the future. The scheduler releases the due
//! rows before it claims: at start, when the earliest waiting row comes due
//! (learnt after each claim that comes back short), and at least every
//! [`RELEASE_WHILE_BUSY_EVERY`] while its claims fill.
//!
//! Claiming ahead: while tasks are short, the scheduler claims more rows than
//! it has free slots, so that a slot that frees up starts its next task at
//! once instead of waiting for a claim, and one claim statement serves
//! several tasks. How far ahead it claims is bounded by how long those rows
//! would wait ([`claim_ahead`]); a row claimed ahead that still finds no slot
//! after [`AHEAD_MAX_WAIT`](super::executor::AHEAD_MAX_WAIT) is given back (INTERRUPTED, its try not counted),
//! and so is every such row when the daemon shuts down. No claim ahead is made
//! with `queues:` configured, or for task types with a concurrency limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::executor::{ClaimTimes, Executor, TryEnd};
use super::pauses::PauseWatch;
use super::tries::Tries;
use crate::health::{Backoff, Health};
use crate::instance::InstanceId;
use crate::metrics::Metrics;
use crate::request::{Claimed, State};
use crate::store::{ApartBy, Store};
use crate::task_types::Setup;

/// Rows claimed ahead are meant to start within about this long.
const AHEAD_HORIZON: Duration = Duration::from_millis(50);

/// At most this many rows per slot are claimed ahead.
const AHEAD_PER_SLOT: usize = 16;

/// A row claimed ahead holds its options in the daemon's memory until it
/// starts: a claim that takes rows ahead leaves out options longer than
/// this (up to sixteen rows a slot of `max_options`, 4 MiB, would be
/// hundreds of megabytes). Such a row is given back without a try and
/// claimed again into a free slot (`attempt::run_claimed`).
const AHEAD_OPTIONS: u64 = 64 * 1024;

/// After a claim met a row with options longer than [`AHEAD_OPTIONS`],
/// claims take no rows ahead for this long (renewed by each such row), so
/// that a queue of such rows is claimed slot by slot, not given back.
const LARGE_OPTIONS_PAUSE: Duration = Duration::from_secs(1);

/// The batch repair pass runs on each poll and wake-up, but at most this often
/// (a wake-up comes with every try that ends).
const REPAIR_AT_MOST_EVERY: Duration = Duration::from_millis(200);

/// A type with a concurrency limit that had no row to claim is claimed
/// ahead of the other types again only after this long (see
/// `Scheduler::claim_round`).
const LIMITED_LOOK_EVERY: Duration = Duration::from_secs(1);

/// While every claim fills what it asked for (the scheduler looks for the
/// next delay only after a claim that came back short), due delayed rows
/// are released into the claim at least this often.
const RELEASE_WHILE_BUSY_EVERY: Duration = Duration::from_millis(200);

/// After a release that found nothing to release (a due row locked by
/// another writer), the next one waits at least this long.
const RELEASE_AFTER_NOTHING: Duration = Duration::from_millis(50);

/// How often the log gets a summary of the tries that ended. A finished try
/// is logged on its own only at debug level (at a thousand tasks a second a
/// line each would cost more than the rest of the daemon's logging, and
/// bury the failures, which are logged one by one as warnings).
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// What a claim round may still take: in the queue at hand, in all, and
/// for free slots (see [`Scheduler::claim_round`]).
struct Left {
    room: usize,
    budget: usize,
    slots: usize,
}

impl Left {
    fn took(&mut self, rows: usize) {
        self.room -= rows;
        self.budget -= rows;
        self.slots = self.slots.saturating_sub(rows);
    }
}

/// Tries ended since the last summary, by state.
#[derive(Default)]
struct Tally {
    counts: [u64; State::ALL.len()],
    since: Option<Instant>,
}

impl Tally {
    fn count(&mut self, state: State) {
        if let Some(index) = State::ALL.iter().position(|s| *s == state) {
            self.counts[index] += 1;
        }
        self.since.get_or_insert_with(Instant::now);
    }

    /// When the summary is due (far off while nothing is counted).
    fn due(&self) -> Instant {
        self.since.unwrap_or_else(Instant::now) + SUMMARY_EVERY
    }

    /// Logs the summary when it is due (or `now_anyway`), then starts over.
    fn log(&mut self, now_anyway: bool) {
        let Some(since) = self.since else { return };
        if !now_anyway && since.elapsed() < SUMMARY_EVERY {
            return;
        }
        let total: u64 = self.counts.iter().sum();
        let by_state: Vec<String> = State::ALL
            .iter()
            .zip(self.counts)
            .filter(|(_, count)| *count > 0)
            .map(|(state, count)| format!("{count} {}", state.as_str().to_lowercase()))
            .collect();
        tracing::info!(
            "{total} tries ended in the last {:.0}s: {}",
            since.elapsed().as_secs_f64(),
            by_state.join(", ")
        );
        *self = Tally::default();
    }
}

/// When the scheduler next releases due delayed rows into the claim (see
/// `Store::release_delays`): a delayed row is claimable only once a daemon
/// has released it, so that claims never walk the rows delayed into the
/// future. A release is due when the earliest delayed row comes due (learnt
/// after a claim that came back short), and while claims fill, a little
/// after each; never sooner than `not_before`.
struct Releases {
    due: Option<Instant>,
    /// After a release that failed (a backoff, as the claims' own, so that
    /// an outage is not hammered) or found nothing to release.
    not_before: Option<Instant>,
    backoff: Backoff,
}

impl Releases {
    /// At start: at once (rows may have come due while no daemon ran).
    fn new() -> Releases {
        Releases {
            due: Some(Instant::now()),
            not_before: None,
            backoff: Backoff::default(),
        }
    }

    fn due_now(&self) -> bool {
        self.due.is_some_and(|due| due <= Instant::now())
    }

    /// A release is due at `when` (or sooner, if one was already).
    fn at(&mut self, when: Instant) {
        let when = self
            .not_before
            .map_or(when, |not_before| when.max(not_before));
        self.due = Some(self.due.map_or(when, |due| due.min(when)));
    }

    /// A release ran and made `count` rows claimable; a full one leaves
    /// more due rows behind it, an empty one (a due row locked by another
    /// writer) is not tried again at once.
    fn done(&mut self, count: u64) {
        let now = Instant::now();
        self.backoff.reset();
        self.not_before = (count == 0).then(|| now + RELEASE_AFTER_NOTHING);
        self.due = (count >= crate::store::RELEASE_AT_ONCE as u64).then_some(now);
    }

    /// A release failed: it is tried again after a backoff. (Waiting for
    /// the next claim to ask for one left a daemon with no delayed rows and
    /// no full claim never trying again, and the outage it had begun never
    /// ended, in the log or in `status`.)
    fn failed(&mut self) {
        let retry = Instant::now() + self.backoff.next_delay();
        self.not_before = Some(retry);
        self.due = Some(retry);
    }
}

/// Claims rows and starts their tries (see the module's doc).
pub(super) struct Scheduler {
    pub(super) setup: watch::Sender<Setup>,
    pub(super) store: Store,
    pub(super) instance: InstanceId,
    pub(super) health: Arc<Health>,
    pub(super) metrics: Arc<Metrics>,
    /// The tries running now (the oldest one bounds the claim ahead).
    pub(super) tries: Arc<Tries>,
    /// Poll now: a row was enqueued, a try ended, a delay came due.
    pub(super) wake: Arc<Notify>,
    /// When it will next poll unprompted, for `status`.
    pub(super) next_poll: Arc<Mutex<Option<std::time::Instant>>>,
    /// The pauses its claims went by last, for `status` and `/metrics`,
    /// and readings asked of it.
    pub(super) paused: Arc<super::pauses::Pauses>,
    /// What each claimed try runs with.
    pub(super) executor: Arc<Executor>,
}

/// When each limited type last had no row to claim, by the queue claimed
/// (`""`: every queue) and the type. By type alone, a queue with none of a
/// type's rows noted it empty for the next queue too, where its rows then
/// waited for the other types' backlog.
type SeenEmpty = HashMap<(String, String), Instant>;

fn seen_empty_key(queue: Option<&str>, task: &str) -> (String, String) {
    (queue.unwrap_or_default().to_string(), task.to_string())
}

impl Scheduler {
    /// Runs until the daemon stops claiming and every try it started has ended.
    pub(super) async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        // Every claimed try: those running and those waiting for a slot.
        let mut tries: JoinSet<TryEnd> = JoinSet::new();
        let slots = self.executor.spawner.slots();
        // Tries per queue, counted here (not from the live map, which a new try
        // joins only once its task starts) so that a queue's limit always holds.
        let mut running_by_queue: HashMap<String, usize> = HashMap::new();
        let mut typical_run: Option<Duration> = None;
        // When a claim last met a row with large options (see AHEAD_OPTIONS).
        let mut large_options_seen: Option<Instant> = None;
        let mut tally = Tally::default();
        let mut claim_counter: u64 = 0;
        let mut backoff = Backoff::default();
        // Between lookups of the next delay that fail (its own: a release
        // that works resets the releases' backoff).
        let mut lookups = Backoff::default();
        // Claiming pauses while the daemon is short of resources to start tasks.
        let mut short = Shortage::default();
        let mut last_repair: Option<Instant> = None;
        let mut releases = Releases::new();
        let mut pauses =
            PauseWatch::new(self.store.clone(), self.health.clone(), self.paused.clone());
        // When each type with a concurrency limit last had no row to claim
        // (see `claim_round`).
        let mut limited_seen_empty = SeenEmpty::new();
        // Set when the wake-up was only the pauses' reading and nothing was
        // resumed (see `only_pauses_read`).
        let mut nothing_resumed = false;
        // When the loop last did its whole round (repair pass, claim): the
        // poll is due `poll_interval` after it. A wake-up only to read the
        // pauses does not put it off (before, while anything was paused,
        // the pauses' reading each second put it off for ever, and a batch
        // sealed by plain SQL on PostgreSQL or MariaDB never got its callback).
        let mut polled_at = Instant::now();
        loop {
            if cancel.is_cancelled() {
                break;
            }
            // Woken only to read the pauses, which resumed nothing: no
            // repair pass and no claim (nothing else asked for one).
            let only_pauses_read = std::mem::take(&mut nothing_resumed);
            if !only_pauses_read {
                polled_at = Instant::now();
            }
            // A reading of the pauses asked for on this host (a pause or
            // resume just written) comes before any claim.
            if super::unless_stopping(&cancel, pauses.read_if_asked())
                .await
                .is_none()
            {
                break;
            }
            // A wake-up that comes too soon after a repair pass gets one when
            // its time comes (a flow inserted by plain SQL waits no poll).
            let mut repair_due = None;
            match last_repair {
                Some(at) if at.elapsed() < REPAIR_AT_MOST_EVERY => {
                    repair_due = Some(at + REPAIR_AT_MOST_EVERY);
                }
                _ if only_pauses_read => {}
                _ => {
                    last_repair = Some(Instant::now());
                    let repair = async {
                        self.repair_batches().await;
                        self.take_and_repair_flows().await;
                    };
                    if super::unless_stopping(&cancel, repair).await.is_none() {
                        break;
                    }
                }
            }
            if releases.due_now() {
                match super::unless_stopping(
                    &cancel,
                    self.store.answered(self.store.release_delays()),
                )
                .await
                {
                    None => break,
                    Some(Ok(count)) => {
                        self.health.succeeded("releasing delayed requests");
                        releases.done(count);
                    }
                    Some(Err(error)) => {
                        self.health.failed("releasing delayed requests", &error);
                        releases.failed();
                    }
                }
            }
            let config = Setup::current_config(&self.setup);
            // Fewer at once while starts fail for want of the daemon's own
            // resources (see `Shortage::limit`).
            let max_concurrent = short.limit(config.max_concurrent);
            let (running, waiting) = slots.fill(max_concurrent);
            let claimed = running + waiting;
            let large_options_lately =
                large_options_seen.is_some_and(|seen| seen.elapsed() < LARGE_OPTIONS_PAUSE);
            let ahead = if config.queues.is_empty()
                && !large_options_lately
                && max_concurrent == config.max_concurrent
            {
                claim_ahead(
                    config.max_concurrent,
                    typical_run,
                    self.tries.oldest_running(),
                )
            } else {
                0
            };
            let idle_slots = max_concurrent.saturating_sub(claimed);
            // Claim ahead in batches: once half the rows claimed ahead have started.
            let refill = ahead > 0 && waiting <= ahead / 2;
            // When is the next unprompted claim due: the poll, or an earlier delay.
            let mut next_claim = polled_at + config.poll_interval;
            let paused = short.paused_until().filter(|until| *until > Instant::now());
            if let Some(until) = paused {
                next_claim = next_claim.min(until);
            }
            if let Some(due) = repair_due {
                next_claim = next_claim.min(due);
            }
            // A fenced daemon's tries would run with leases it cannot renew
            // (its renewals fail while claims may not): another daemon
            // would run their rows too once they lapse.
            // The fence by the boot clock too, which the watchdog and the
            // starts read: after a suspend of the machine it falls before
            // the heartbeat's own, and every start would be refused.
            let fenced = self.tries.fenced() || crate::supervisor::fence::past_the_fence();
            let may_claim =
                (idle_slots > 0 || refill) && paused.is_none() && !only_pauses_read && !fenced;
            if may_claim {
                let refreshed = super::unless_stopping(&cancel, pauses.refresh());
                if refreshed.await.is_none() {
                    break;
                }
                if !pauses.known() {
                    // No claim before the pauses are known; the failed
                    // read is logged as an outage of the database.
                    next_claim = next_claim.min(Instant::now() + backoff.next_delay());
                }
            }
            if may_claim && pauses.known() {
                claim_counter += 1;
                let token = self.instance.claim_token(claim_counter);
                let budget = (max_concurrent + ahead).saturating_sub(claimed);
                // Rows claimed ahead never hold large options.
                let options_inline = (budget > idle_slots).then_some(AHEAD_OPTIONS);
                // Until its rows are registered (below), the heartbeat takes
                // none of the rows this claim holds for a lost claim's.
                let claiming = self.tries.claiming(&token);
                let mut rows = Vec::new();
                let round = self.claim_round(
                    &config,
                    &token,
                    (budget, idle_slots, options_inline),
                    (&running_by_queue, &mut limited_seen_empty),
                    &pauses,
                    &mut rows,
                );
                let sent = std::time::SystemTime::now();
                let round = super::unless_stopping(&cancel, round).await;
                // The rows its statements claimed run, also when a later
                // statement of the round failed (before, those rows were
                // dropped, and waited as strays until given back). Those of
                // a round the shutdown cut short are given back at once
                // (before, they were left RUNNING, without a try, until a
                // restart or another host's reaper took them).
                let stopping = round.is_none();
                let times = ClaimTimes {
                    sent,
                    returned: std::time::SystemTime::now(),
                };
                if rows.iter().any(|row| row.options_length > AHEAD_OPTIONS) {
                    large_options_seen = Some(Instant::now());
                }
                for row in rows {
                    self.metrics.claimed(&row.queue, row.waited);
                    *running_by_queue.entry(row.queue.clone()).or_default() += 1;
                    let ticket = if stopping {
                        slots.withdrawn()
                    } else {
                        slots.join(max_concurrent)
                    };
                    let registered = self.executor.register(&row);
                    tries.spawn(
                        self.executor
                            .clone()
                            .supervise(row, registered, ticket, times),
                    );
                }
                drop(claiming);
                let Some(round) = round else {
                    break;
                };
                match round {
                    Ok(all_filled) => {
                        self.health.succeeded("claiming requests");
                        backoff.reset();
                        if all_filled {
                            releases.at(Instant::now() + RELEASE_WHILE_BUSY_EVERY);
                        } else {
                            match super::unless_stopping(&cancel, self.next_delay()).await {
                                Some(Ok(due)) => {
                                    lookups.reset();
                                    if let Some(due) = due {
                                        releases.at(due);
                                    }
                                }
                                // Looked up again after a backoff: a release
                                // then, and the lookup after its claim (before,
                                // nothing did until the next poll, and a
                                // delayed row ran up to `poll_interval` late).
                                Some(Err(())) => {
                                    releases.at(Instant::now() + lookups.next_delay());
                                }
                                None => {}
                            }
                        }
                    }
                    Err(error) => {
                        self.health.failed("claiming requests", &error);
                        next_claim = Instant::now() + backoff.next_delay();
                    }
                }
            }
            if let Some(due) = releases.due {
                next_claim = next_claim.min(due);
            }
            let next_pause_read = pauses.next_read();
            *self.next_poll.lock().unwrap_or_else(|e| e.into_inner()) = Some(next_claim.into_std());
            tokio::select! {
                _ = self.wake.notified() => {}
                Some(ended) = tries.join_next(), if !tries.is_empty() => {
                    if let Ok(ended) = ended {
                        if let Some(count) = running_by_queue.get_mut(&ended.queue) {
                            *count = count.saturating_sub(1);
                        }
                        // A place of its type's limit is free again here.
                        limited_seen_empty.retain(|(_, task), _| *task != ended.task);
                        if let Some(ran_for) = ended.ran_for {
                            typical_run = Some(typical_run.map_or(ran_for, |t| t.mul_f64(0.8) + ran_for.mul_f64(0.2)));
                        }
                        self.metrics.try_ended(&ended.task, &ended.queue, ended.state, ended.exhausted, ended.ran_for);
                        tally.count(ended.state);
                        tally.log(false);
                        short.ended(&ended, self.tries.len());
                    }
                }
                _ = tokio::time::sleep_until(next_claim) => {}
                _ = tokio::time::sleep_until(next_pause_read.unwrap_or(next_claim)), if next_pause_read.is_some_and(|at| at < next_claim) => {
                    nothing_resumed = !pauses.refresh().await;
                }
                _ = tokio::time::sleep_until(tally.due()), if tally.since.is_some() => tally.log(true),
                _ = cancel.cancelled() => {}
            }
        }
        // Rows claimed ahead are given back at once; running tries are drained.
        slots.close();
        while let Some(ended) = tries.join_next().await {
            if let Ok(ended) = ended {
                self.metrics.try_ended(
                    &ended.task,
                    &ended.queue,
                    ended.state,
                    ended.exhausted,
                    ended.ran_for,
                );
                tally.count(ended.state);
            }
        }
        tally.log(true);
        Ok(())
    }

    /// Ends batches that only a plain-SQL write left unended (see
    /// `Store::repair_batches`); a callback it creates is claimed at once.
    async fn repair_batches(&self) {
        match self.store.answered(self.store.repair_batches()).await {
            Ok(0) => self.health.succeeded("repairing batches"),
            Ok(repaired) => {
                self.health.succeeded("repairing batches");
                tracing::info!(
                    batches = repaired,
                    "batch repair pass: settled batches sealed or changed by hand"
                );
                self.wake.notify_one();
            }
            Err(error) => self.health.failed("repairing batches", &error),
        }
    }

    /// Takes flows no daemon has taken yet (inserted by plain SQL or `flow
    /// post`) and advances flows that plain SQL left without an open row (see
    /// `Store::take_flows`, `Store::repair_flows`); a row they create is
    /// claimed at once.
    async fn take_and_repair_flows(&self) {
        let config = Setup::current_config(&self.setup);
        let flows = self.setup.borrow().registry.flows(&config);
        match self.store.answered(self.store.take_flows(&flows)).await {
            Ok(taken) => {
                self.health.succeeded("taking flows");
                if taken > 0 {
                    self.wake.notify_one();
                }
            }
            Err(error) => self.health.failed("taking flows", &error),
        }
        match self.store.answered(self.store.repair_flows()).await {
            Ok(0) => self.health.succeeded("repairing flows"),
            Ok(repaired) => {
                self.health.succeeded("repairing flows");
                tracing::info!(
                    flows = repaired,
                    "flow repair pass: advanced flows whose current row was changed by hand"
                );
                self.wake.notify_one();
            }
            Err(error) => self.health.failed("repairing flows", &error),
        }
    }

    /// Claims up to `budget` rows: per served queue (each within its own
    /// limit), task types with a concurrency limit apart, under their lock, and
    /// only for `slots` that are free now (never ahead, but for the limited
    /// types' first claims below). Puts the claimed rows in `claimed`, also
    /// those of its statements before one that failed, and returns whether
    /// every claim filled what it asked for (so more rows may be waiting).
    ///
    /// The limited types are claimed first (a row of each ahead of a free
    /// slot, if none is free: while the others are claimed ahead, none is
    /// at a claim), then the others: claimed only after the others, and
    /// only for free slots, a limited type's rows waited until the other
    /// types' backlog was gone, whatever their priority or age. A limited
    /// type that had no row to claim (none waiting, or its limit reached)
    /// is claimed only after the others, with what they leave, for
    /// [`LIMITED_LOOK_EVERY`] (`seen_empty`),
    /// or until one of its tries here ends, so that a daemon busy with
    /// other types does not spend a transaction per limited type on each
    /// claim for nothing: a new row of that type (or a place freed by
    /// another daemon) then waits at most that long for its claim.
    async fn claim_round(
        &self,
        config: &crate::config::Config,
        token: &crate::instance::ClaimToken,
        (mut budget, mut slots, options_inline): (usize, usize, Option<u64>),
        (running_by_queue, seen_empty): (&HashMap<String, usize>, &mut SeenEmpty),
        pauses: &PauseWatch,
        claimed: &mut Vec<Claimed>,
    ) -> anyhow::Result<bool> {
        let limited: Vec<(&str, u32)> = config
            .tasks
            .iter()
            .filter_map(|(name, task)| task.concurrency.map(|limit| (name.as_str(), limit)))
            .filter(|(name, _)| !pauses.tasks().iter().any(|paused| paused == name))
            .collect();
        let excluded: Vec<String> = limited
            .iter()
            .map(|(name, _)| name.to_string())
            .chain(pauses.tasks().iter().cloned())
            .collect();
        // (queue, room in it); `None` serves every queue.
        let queues: Vec<(Option<&str>, usize)> = if config.queues.is_empty() {
            vec![(None, budget)]
        } else {
            config
                .queues
                .iter()
                .filter(|(queue, _)| !pauses.queues().contains(queue))
                .map(|(queue, limit)| {
                    let running = running_by_queue.get(queue).copied().unwrap_or(0);
                    (Some(queue.as_str()), limit.saturating_sub(running))
                })
                .collect()
        };
        let store = &self.store;
        // A daemon serving every queue while some are paused claims the
        // others each through its own index, so that its claim does not
        // walk past the paused rows (unless there are too many queues);
        // while it leaves task types out (paused, or claimed apart for
        // their concurrency limit), it claims the other types so.
        let apart_by = if !config.queues.is_empty() || budget == 0 {
            None
        } else if !pauses.queues().is_empty() {
            Some((ApartBy::Queue, pauses.queues()))
        } else if !excluded.is_empty() {
            Some((ApartBy::Type, &excluded[..]))
        } else {
            None
        };
        let open = match apart_by {
            Some((by, left_out)) => store
                .answered(store.apart(by, left_out))
                .await?
                .map(|names| (by, names)),
            None => None,
        };
        let by = crate::store::Claimant {
            token,
            instance: &self.instance,
            host: &config.host_id,
        };
        // No queue asked for a row (every one paused, or at its limit): no
        // sign that more rows wait, and the scheduler idles as after a
        // claim that came back short (before, a release, a batch and a
        // flow repair pass every 200 ms). A queue at its limit beside
        // others whose claims fill leaves the round filled.
        let mut all_filled = true;
        // (Without `queues:`, the one claim's budget is the daemon's; every
        // paused queue is `nothing_open` below.)
        let mut asked_any = config.queues.is_empty();
        for (queue, room) in queues {
            asked_any |= room > 0;
            let mut left = Left {
                room,
                budget,
                slots,
            };
            let filter = crate::store::ClaimFilter {
                node: &config.node_name,
                queue,
                task: None,
                excluded_tasks: &excluded,
                excluded_queues: pauses.queues(),
                apart: open.as_ref().map(|(by, names)| (*by, &names[..])),
                options_inline,
            };
            // The limited types (see the doc): first those not seen empty
            // lately, then the others, then the rest of the limited ones.
            let (first, rest): (Vec<_>, Vec<_>) = limited.iter().copied().partition(|(task, _)| {
                seen_empty
                    .get(&seen_empty_key(queue, task))
                    .is_none_or(|at| at.elapsed() >= LIMITED_LOOK_EVERY)
            });
            self.claim_limited_types(by, &filter, (&first, true), &mut left, seen_empty, claimed)
                .await?;
            let want = left.room.min(left.budget);
            // Every queue (or type) with runnable rows is left out: nothing
            // to claim but the limited types' rows.
            let nothing_open = open.as_ref().is_some_and(|(_, names)| names.is_empty());
            // Nothing claimable is waiting: the scheduler idles as after a
            // claim that came back short (not a release every 200 ms).
            all_filled &= !nothing_open;
            if want > 0 && !nothing_open {
                let rows = store
                    .answered(store.claim_filtered(by, want, &filter))
                    .await?;
                all_filled &= rows.len() == want;
                left.took(rows.len());
                claimed.extend(rows);
            }
            self.claim_limited_types(by, &filter, (&rest, false), &mut left, seen_empty, claimed)
                .await?;
            (budget, slots) = (left.budget, left.slots);
        }
        Ok(all_filled && asked_any)
    }

    /// Claims rows of each of the `limited` types (with a concurrency
    /// limit) through its own claim, under its lock, within what is `left`;
    /// `ahead`: one row of each even without a free slot (see
    /// [`Scheduler::claim_round`]), into `claimed`. A type that had no row
    /// to claim is noted in `seen_empty`.
    async fn claim_limited_types(
        &self,
        by: crate::store::Claimant<'_>,
        filter: &crate::store::ClaimFilter<'_>,
        (limited, ahead): (&[(&str, u32)], bool),
        left: &mut Left,
        seen_empty: &mut SeenEmpty,
        claimed: &mut Vec<Claimed>,
    ) -> anyhow::Result<()> {
        for (task, limit) in limited {
            // While the others are claimed ahead, no slot is ever free at
            // a claim, and the type would wait for their backlog's end.
            let free = if ahead { left.slots.max(1) } else { left.slots };
            let want = left.room.min(left.budget).min(free);
            if want == 0 {
                break;
            }
            // Through the type's own index, the paused queues left out.
            let filter = crate::store::ClaimFilter {
                task: Some(task),
                apart: None,
                ..filter.clone()
            };
            let rows = self
                .store
                .answered(self.store.claim_limited(by, want, &filter, *limit))
                .await?;
            let key = seen_empty_key(filter.queue, task);
            if rows.is_empty() {
                seen_empty.insert(key, Instant::now());
            } else {
                seen_empty.remove(&key);
            }
            left.took(rows.len());
            claimed.extend(rows);
        }
        Ok(())
    }

    /// When the earliest delayed row that waits comes due, to be released
    /// then (never later than an hour, so that a clock step cannot park us);
    /// an error when the lookup failed (logged as an outage).
    async fn next_delay(&self) -> Result<Option<Instant>, ()> {
        let found = self
            .store
            .answered(self.store.seconds_until_next_delay())
            .await;
        match crate::test_hooks::fail_delay_lookups_when_told(found) {
            Ok(seconds) => {
                self.health.succeeded("looking for delayed requests");
                // A hair later than due, so the row's delay has passed on
                // the database's clock too; a row due already is released now.
                Ok(seconds.map(|seconds| {
                    let hair = if seconds > 0.0 {
                        Duration::from_millis(5)
                    } else {
                        Duration::ZERO
                    };
                    Instant::now() + Duration::from_secs_f64(seconds.clamp(0.0, 3600.0)) + hair
                }))
            }
            Err(error) => {
                self.health.failed("looking for delayed requests", &error);
                Err(())
            }
        }
    }
}

/// The daemon's own lack of resources to start tasks (descriptors,
/// processes, memory): each such start gives its try back, and claiming
/// pauses for a backoff that grows while starts keep failing and resets at
/// the first start that works. One log line per shortage, and at most one
/// a minute.
///
/// The daemon then also runs fewer tries at once ([`Cap`]). Without that,
/// the rows given back together were claimed and started together after
/// each pause, each start holding part of what the others needed: a daemon
/// with room for one start at a time gave back ten starts for each that
/// worked, and under load could fail a row round after round.
#[derive(Default)]
struct Shortage {
    backoff: Backoff,
    until: Option<Instant>,
    warned: Option<Instant>,
    cap: Option<Cap>,
}

/// How many tries run at once after a shortage: as many as ran when a start
/// failed (at least one); one more once `grow_after` tries have run to their
/// end since it last changed. `grow_after` starts at one and doubles each
/// time a start fails just after the cap grew (the daemon found its
/// ceiling), so that a lasting shortage costs a failed start ever more
/// rarely, up to one in [`Cap::MOST_BETWEEN_PROBES`]. The cap ends when it
/// reaches `max_concurrent`, or a minute after the last failed start (the
/// shortage may have been a passing one: the next start that fails sets a
/// new cap).
struct Cap {
    at_once: usize,
    grow_after: usize,
    ran_since_change: usize,
    /// The cap grew since the last failed start.
    grew: bool,
    last_short: Instant,
}

impl Cap {
    const MOST_BETWEEN_PROBES: usize = 64;
    const LASTS: Duration = Duration::from_secs(60);

    fn short(cap: Option<Cap>, running: usize) -> Cap {
        let at_once = running.max(1);
        match cap {
            None => Cap {
                at_once,
                grow_after: 1,
                ran_since_change: 0,
                grew: false,
                last_short: Instant::now(),
            },
            Some(cap) => Cap {
                at_once: cap.at_once.min(at_once),
                grow_after: if cap.grew {
                    (cap.grow_after * 2).min(Self::MOST_BETWEEN_PROBES)
                } else {
                    cap.grow_after
                },
                ran_since_change: 0,
                grew: false,
                last_short: Instant::now(),
            },
        }
    }

    fn ran(&mut self) {
        self.ran_since_change += 1;
        if self.ran_since_change >= self.grow_after {
            self.at_once += 1;
            self.ran_since_change = 0;
            self.grew = true;
        }
    }
}

impl Shortage {
    /// `running`: the tries whose task runs now.
    fn ended(&mut self, ended: &TryEnd, running: usize) {
        if ended.daemon_short {
            self.cap = Some(Cap::short(self.cap.take(), running));
            let delay = self.backoff.next_delay();
            let quiet = self.warned.is_some_and(|at| at.elapsed() < SUMMARY_EVERY);
            if self.until.is_none() && !quiet {
                self.warned = Some(Instant::now());
                tracing::warn!(
                    "the daemon is short of resources to start tasks (file descriptors, processes or memory): \
                     giving their tries back and running fewer at once until starts work; see max_concurrent and LimitNOFILE"
                );
            }
            self.until = Some(Instant::now() + delay);
        } else if ended.ran_for.is_some() {
            if self.until.is_some() {
                tracing::debug!("tasks start again: the daemon's shortage of resources is over");
                self.until = None;
                self.backoff.reset();
            }
            if let Some(cap) = &mut self.cap {
                cap.ran();
            }
        }
    }

    /// How many tries may be claimed and run at once now.
    fn limit(&mut self, max_concurrent: usize) -> usize {
        match &self.cap {
            Some(cap) if cap.at_once < max_concurrent && cap.last_short.elapsed() < Cap::LASTS => {
                cap.at_once
            }
            _ => {
                self.cap = None;
                max_concurrent
            }
        }
    }

    fn paused_until(&self) -> Option<Instant> {
        self.until
    }
}

/// How many rows to claim beyond the free slots: enough that each slot has
/// its next task ready, as long as they would start within [`AHEAD_HORIZON`]
/// judging by how long tries have been taking (`typical_run`, a moving
/// average) and by the oldest try running now; none before any try ended.
fn claim_ahead(max_concurrent: usize, typical_run: Option<Duration>, oldest: Duration) -> usize {
    let Some(typical) = typical_run else {
        return 0;
    };
    let per_slot = typical.max(oldest).max(Duration::from_micros(100));
    let rows = AHEAD_HORIZON.as_secs_f64() * max_concurrent as f64 / per_slot.as_secs_f64();
    (rows as usize).min(AHEAD_PER_SLOT * max_concurrent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shortage_caps_the_tries_at_once_and_probes_ever_more_rarely() {
        // Two ran when a start failed: two at once.
        let mut cap = Cap::short(None, 2);
        assert_eq!(cap.at_once, 2);
        // One try run to its end: three at once.
        cap.ran();
        assert_eq!(cap.at_once, 3);
        // A start fails at three with two running: back to two, and the
        // cap now grows after two tries.
        let mut cap = Cap::short(Some(cap), 2);
        assert_eq!((cap.at_once, cap.grow_after), (2, 2));
        cap.ran();
        assert_eq!(cap.at_once, 2);
        cap.ran();
        assert_eq!(cap.at_once, 3);
        // A failure that did not follow a growth keeps the pace; nothing
        // running still lets one try run.
        let cap = Cap::short(Some(Cap::short(Some(cap), 0)), 0);
        assert_eq!((cap.at_once, cap.grow_after), (1, 4));
        let mut cap = cap;
        for _ in 0..10 {
            cap.grew = true;
            cap = Cap::short(Some(cap), 1);
        }
        assert_eq!(cap.grow_after, Cap::MOST_BETWEEN_PROBES);
    }

    #[test]
    fn claims_ahead_only_what_starts_within_the_horizon() {
        let ms = Duration::from_millis;
        // Nothing known yet: no claim ahead.
        assert_eq!(claim_ahead(8, None, ms(0)), 0);
        // 1 ms tasks: sixteen rows a slot at most.
        assert_eq!(claim_ahead(2, Some(ms(1)), ms(1)), 32);
        // 10 ms tasks on 2 slots: 50 ms covers ten.
        assert_eq!(claim_ahead(2, Some(ms(10)), ms(3)), 10);
        // A long task running now stops it, however short the others were.
        assert_eq!(claim_ahead(8, Some(ms(1)), ms(500)), 0);
    }
}
