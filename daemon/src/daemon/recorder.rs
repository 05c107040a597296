//! The recorder: the one writer of try results. Supervisors hand it pid,
//! progress and outcome writes; it applies everything waiting in one
//! transaction (so that at high load a write costs well under one database
//! round trip), and retries with backoff through outages without losing any.
//! A write whose row another session holds locked (an application's
//! transaction that reads the request `FOR UPDATE`, or adds members to its
//! batch) is set aside and tried again while the other writes go on (see
//! [`Aside`]).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::health::{Backoff, Health, RECORDING};
use crate::instance::ClaimToken;
use crate::request::RequestId;
use crate::store::{HeldRow, RowLocked, Store, Write};

/// Largest batch applied in one transaction.
const MAX_BATCH: usize = 512;

/// Most text (result texts, progress lines) in one batch, unless one write
/// alone has more. MariaDB refuses a statement larger than its
/// `max_allowed_packet` (16 MiB by default) and closes the connection: 512
/// outcomes of 64 KiB each, queued during an outage, made one statement of
/// 32 MiB, refused every time it was retried, and no outcome was recorded
/// again. A text is at most 12 MiB (`output_tail` at most 4 MiB, each byte
/// that is not UTF-8 stored as three).
const MAX_BATCH_TEXT: usize = 2 << 20;

/// The bytes of text a write carries.
fn text_bytes(write: &Write) -> usize {
    match write {
        Write::Outcome(outcome) => outcome.result_text.len(),
        Write::Progress { text, .. } => text.len(),
        Write::Pid { .. } => 0,
    }
}

/// Under load (the previous batch was written less than [`BUSY`] ago), a
/// batch waits this long for more writes before it is applied: at high load
/// one statement records the outcomes of several tasks, while at idle an
/// outcome is written at once.
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);
const BUSY: std::time::Duration = std::time::Duration::from_millis(50);

/// The first retry of writes set aside for their batch's lock, doubled at
/// each retry up to [`ASIDE_RETRY_MAX`]: another daemon's finalization
/// holds that lock for milliseconds, an application's transaction for as
/// long as it runs.
const ASIDE_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(20);
const ASIDE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// A write set aside: its request's, batch's or flow's row was locked by
/// another session. The writes of the same try that come after it are set
/// aside behind it (in order; of its progress lines the latest alone).
struct Aside {
    write: Write,
    row: HeldRow,
    since: tokio::time::Instant,
    /// Whether its wait has been logged (once it lasted [`ASIDE_RETRY_MAX`]).
    told: bool,
}

/// Removes the pid writes of tries whose outcome is in the same batch.
fn drop_superseded_pids(batch: &mut Vec<Write>) {
    let ended: Vec<(RequestId, ClaimToken)> = batch
        .iter()
        .filter_map(|w| match w {
            Write::Outcome(outcome) => Some((outcome.id, outcome.claim_token.clone())),
            _ => None,
        })
        .collect();
    batch.retain(|w| match w {
        Write::Pid {
            id, claim_token, ..
        } => !ended.iter().any(|(e, t)| e == id && t == claim_token),
        _ => true,
    });
}

/// The writes of one transaction, at most [`MAX_BATCH`] of them and (but
/// for a first write larger alone) [`MAX_BATCH_TEXT`] bytes of text.
struct Batch {
    writes: Vec<Write>,
    text: usize,
    /// A write did not fit: the batch takes no more.
    closed: bool,
}

impl Batch {
    fn starting_with(write: Write) -> Batch {
        Batch {
            text: text_bytes(&write),
            writes: vec![write],
            closed: false,
        }
    }

    fn full(&self) -> bool {
        self.closed || self.writes.len() >= MAX_BATCH
    }

    /// Adds `write`, or gives it back when its text would not fit.
    fn add(&mut self, write: Write) -> Option<Write> {
        let text = text_bytes(&write);
        if self.text + text > MAX_BATCH_TEXT {
            self.closed = true;
            return Some(write);
        }
        self.text += text;
        self.writes.push(write);
        None
    }
}

/// The outcomes queued and not yet applied, by row and claim.
type Pending = Arc<std::sync::Mutex<HashMap<(RequestId, ClaimToken), usize>>>;

/// A handle for queueing writes; cheap to clone.
#[derive(Clone)]
pub(super) struct Recorder {
    sender: mpsc::UnboundedSender<Write>,
    pending: Pending,
}

impl Recorder {
    pub(super) fn send(&self, write: Write) {
        if let Write::Outcome(outcome) = &write {
            *lock(&self.pending)
                .entry((outcome.id, outcome.claim_token.clone()))
                .or_default() += 1;
        }
        // Only fails once the writer has stopped, when no try is left to send.
        let _ = self.sender.send(write);
    }

    /// Whether an outcome of row `id` under `claim_token` is queued and not
    /// yet written: the row is still RUNNING in the table, but its try is
    /// over.
    pub(super) fn outcome_pending(&self, id: RequestId, claim_token: &ClaimToken) -> bool {
        lock(&self.pending).contains_key(&(id, claim_token.clone()))
    }
}

fn lock(pending: &Pending) -> std::sync::MutexGuard<'_, HashMap<(RequestId, ClaimToken), usize>> {
    pending
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The batch's outcomes are applied (or found superseded): no longer pending.
fn settle(pending: &Pending, batch: &[Write]) {
    let mut pending = lock(pending);
    for write in batch {
        if let Write::Outcome(outcome) = write {
            let key = (outcome.id, outcome.claim_token.clone());
            if let Some(count) = pending.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    pending.remove(&key);
                }
            }
        }
    }
}

/// The recorder's service: applies the queued writes, in batches.
pub(super) struct Writer {
    store: Store,
    health: Arc<Health>,
    receiver: mpsc::UnboundedReceiver<Write>,
    /// Poll now: a recorded outcome may make a retry due.
    wake: Arc<Notify>,
    /// Shared with the handles: outcomes queued and not yet applied.
    pending: Pending,
    /// A write received that did not fit the batch: the next one's first.
    held: Option<Write>,
    /// Writes set aside for their batch's lock, in the order received.
    aside: Vec<Aside>,
    /// When they are tried again, and the wait after that.
    aside_retry: Option<(tokio::time::Instant, std::time::Duration)>,
}

impl Writer {
    /// The handle that queues writes, and the service that applies them.
    pub(super) fn new(store: Store, health: Arc<Health>, wake: Arc<Notify>) -> (Recorder, Writer) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let pending = Pending::default();
        let writer = Writer {
            store,
            health,
            receiver,
            wake,
            pending: pending.clone(),
            held: None,
            aside: Vec::new(),
            aside_retry: None,
        };
        (Recorder { sender, pending }, writer)
    }

    /// Applies writes until `cancel`, then applies every write still queued
    /// and returns. The daemon cancels it last, once every try has ended.
    pub(super) async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut last_batch = tokio::time::Instant::now()
            .checked_sub(BUSY)
            .unwrap_or_else(tokio::time::Instant::now);
        loop {
            // Writes set aside are tried again when due, also while new
            // writes keep coming.
            let retry_aside = self.aside_retry.map(|(at, _)| at);
            if retry_aside.is_some_and(|at| at <= tokio::time::Instant::now()) {
                self.retry_aside().await;
                continue;
            }
            // Queued writes come before the cancel: none is left behind.
            let first = match self.held.take() {
                Some(write) => Some(write),
                None => tokio::select! {
                    biased;
                    write = self.receiver.recv() => write,
                    _ = crate::units::sleep_until_opt(retry_aside), if retry_aside.is_some() => {
                        self.retry_aside().await;
                        continue;
                    }
                    _ = cancel.cancelled() => None,
                },
            };
            let Some(first) = first else {
                if let Some(at) = retry_aside {
                    // Stopping: what was set aside is still to be written.
                    tokio::time::sleep_until(at).await;
                    self.retry_aside().await;
                    continue;
                }
                if !cancel.is_cancelled() {
                    // Every handle dropped: nothing more can come.
                    cancel.cancelled().await;
                }
                return Ok(());
            };
            let mut batch = Batch::starting_with(first);
            while !batch.full() {
                match self.receiver.try_recv() {
                    Ok(write) => self.held = batch.add(write),
                    Err(_) => break,
                }
            }
            if last_batch.elapsed() < BUSY && !cancel.is_cancelled() {
                let linger = tokio::time::Instant::now() + LINGER;
                while !batch.full() {
                    match tokio::time::timeout_at(linger, self.receiver.recv()).await {
                        Ok(Some(write)) => self.held = batch.add(write),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            let mut batch = batch.writes;
            drop_superseded_pids(&mut batch);
            if batch.is_empty() {
                continue;
            }
            // A write queued after its claim's outcome, which is set aside,
            // would match nothing once that outcome applies (see
            // `Store::record`): it is not applied. One queued after another
            // write of its try that is set aside goes aside behind it.
            let mut late = Vec::new();
            let mut behind = Vec::new();
            let batch: Vec<Write> = batch
                .into_iter()
                .filter_map(|write| match self.aside_of_try(&write) {
                    None => Some(write),
                    Some((true, _)) => {
                        late.push(write);
                        None
                    }
                    Some((false, row)) => {
                        behind.push((write, row));
                        None
                    }
                })
                .collect();
            for write in &late {
                tracing::warn!(
                    request = %write.id(),
                    "not recorded: queued after its try's outcome"
                );
            }
            settle(&self.pending, &late);
            for (write, row) in behind {
                self.set_aside(write, row);
            }
            for (index, RowLocked(row)) in self.apply(&batch).await {
                self.set_aside(batch[index].clone(), row);
            }
            last_batch = tokio::time::Instant::now();
            // A recorded outcome may make a retry due, or free a row for others.
            if batch.iter().any(|w| matches!(w, Write::Outcome(_))) {
                self.wake.notify_one();
            }
            tokio::task::yield_now().await;
        }
    }

    /// Whether a write of `write`'s try is set aside: then whether one of
    /// them is its outcome, and the row it waits for.
    fn aside_of_try(&self, write: &Write) -> Option<(bool, HeldRow)> {
        let mut of_try = self
            .aside
            .iter()
            .filter(|aside| aside.write.of_same_try(write));
        let first = of_try.next()?;
        let outcome = std::iter::once(first)
            .chain(of_try)
            .any(|aside| matches!(aside.write, Write::Outcome(_)));
        Some((outcome, first.row))
    }

    /// Keeps `write` to be tried again, a row it needs (its request's, its
    /// batch's, its flow's) locked by another session. The next retry
    /// comes after [`ASIDE_RETRY_FIRST`] (mostly another daemon held the
    /// lock a moment), unless writes waiting for the same row wait already:
    /// their backoff stands. A progress line replaces its try's earlier one
    /// set aside (the latest is what the row keeps).
    fn set_aside(&mut self, write: Write, row: HeldRow) {
        let first = tokio::time::Instant::now() + ASIDE_RETRY_FIRST;
        let same_row_waits = self.aside.iter().any(|aside| aside.row == row);
        self.aside_retry = Some(match self.aside_retry {
            Some((at, delay)) if at <= first || same_row_waits => (at, delay),
            _ => (first, ASIDE_RETRY_FIRST),
        });
        if let Write::Progress { .. } = write {
            self.aside.retain(|aside| {
                !(matches!(aside.write, Write::Progress { .. }) && aside.write.of_same_try(&write))
            });
        }
        self.aside.push(Aside {
            write,
            row,
            since: tokio::time::Instant::now(),
            told: false,
        });
    }

    /// Tries the writes set aside again, in their order; those whose row is
    /// still locked stay aside, and a wait that lasts is logged once.
    async fn retry_aside(&mut self) {
        let aside = std::mem::take(&mut self.aside);
        let delay = self
            .aside_retry
            .take()
            .map_or(ASIDE_RETRY_FIRST, |(_, delay)| delay);
        let writes: Vec<Write> = aside.iter().map(|a| a.write.clone()).collect();
        let still: Vec<(usize, RowLocked)> = self.apply(&writes).await;
        if still.len() < writes.len() {
            // A recorded outcome may make a retry due, or free a row.
            self.wake.notify_one();
        }
        for (index, mut kept) in aside.into_iter().enumerate() {
            let Some((_, locked)) = still.iter().find(|(still, _)| *still == index) else {
                if kept.told {
                    tracing::info!(
                        request = %kept.write.id(),
                        "recorded after waiting {:.1}s for the lock of {}",
                        kept.since.elapsed().as_secs_f64(),
                        kept.row
                    );
                }
                continue;
            };
            kept.row = locked.0;
            if !kept.told && kept.since.elapsed() >= ASIDE_RETRY_MAX {
                kept.told = true;
                let (id, what) = (kept.write.id(), kept.write.kind());
                let (lock, holder) = match kept.row {
                    HeldRow::Request(_) => (
                        "its row".to_string(),
                        "an application's transaction that read it FOR UPDATE?",
                    ),
                    HeldRow::Batch(_) => (
                        format!("its {}", kept.row),
                        "an application's transaction that adds members?",
                    ),
                    HeldRow::Flow(_) => (
                        format!("its {}", kept.row),
                        "an application's transaction that changed it?",
                    ),
                };
                tracing::warn!(
                    "request {id}'s {what} waits for the lock of {lock} (another session holds it: {holder}); this daemon's other writes are recorded meanwhile"
                );
            }
            self.aside.push(kept);
        }
        if !self.aside.is_empty() {
            let delay = (delay * 2).min(ASIDE_RETRY_MAX);
            self.aside_retry = Some((tokio::time::Instant::now() + delay, delay));
        }
    }

    /// Applies one batch in one transaction, retrying through an outage;
    /// returns the places in `batch` of the writes to set aside for a row's
    /// lock (not settled).
    async fn apply(&self, batch: &[Write]) -> Vec<(usize, RowLocked)> {
        let mut backoff = Backoff::default();
        // A failed call may have committed before its answer was lost: a
        // write it applied matches no row the next time.
        let mut failed_before = false;
        loop {
            match self
                .store
                .answered(self.store.record_or_set_aside(batch))
                .await
            {
                Ok(applied) => {
                    self.health.succeeded(RECORDING);
                    let mut aside = Vec::new();
                    let mut settled = Vec::with_capacity(batch.len());
                    for (index, (write, applied)) in batch.iter().zip(applied).enumerate() {
                        let applied = match applied {
                            Ok(applied) => applied,
                            Err(locked) => {
                                aside.push((index, locked));
                                continue;
                            }
                        };
                        settled.push(write.clone());
                        if !applied && failed_before {
                            tracing::info!(
                                request = %write.id(),
                                "not recorded again: written by the call whose answer was lost, or the row was reaped or taken over meanwhile"
                            );
                        } else if !applied {
                            tracing::warn!(
                                request = %write.id(),
                                "not recorded: the row is no longer this try's claim (reaped or taken over)"
                            );
                        }
                    }
                    settle(&self.pending, &settled);
                    return aside;
                }
                Err(error) => {
                    failed_before = true;
                    let results = batch
                        .iter()
                        .filter(|w| matches!(w, Write::Outcome(_)))
                        .count();
                    self.health.failed_holding(RECORDING, &error, results);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::State;
    use crate::store::Outcome;

    fn pid(id: i64, token: &str) -> Write {
        Write::Pid {
            id: RequestId(id),
            claim_token: ClaimToken::from_row(token.into()),
            pid: 1,
            boot_id: String::new(),
            start_ticks: 0,
        }
    }

    fn outcome(id: i64, token: &str) -> Write {
        Write::Outcome(Outcome {
            id: RequestId(id),
            claim_token: ClaimToken::from_row(token.into()),
            state: State::Finished,
            result_text: String::new(),
            retry_after: None,
            give_back_try: false,
            composed: false,
        })
    }

    #[test]
    fn a_batch_takes_no_more_text_than_its_bound_but_a_large_write_goes_alone() {
        let text = |id: i64, bytes: usize| {
            let Write::Outcome(mut outcome) = outcome(id, "t") else {
                unreachable!()
            };
            outcome.result_text = "a".repeat(bytes);
            Write::Outcome(outcome)
        };
        let mut batch = Batch::starting_with(text(1, MAX_BATCH_TEXT / 2));
        assert!(batch.add(text(2, MAX_BATCH_TEXT / 2)).is_none());
        let refused = batch.add(pid(3, "t"));
        assert!(refused.is_none(), "a pid carries no text");
        let refused = batch.add(text(4, 1));
        assert!(refused.is_some_and(|w| w.id() == RequestId(4)));
        assert!(batch.full());
        assert_eq!(batch.writes.len(), 3);
        let alone = Batch::starting_with(text(5, 5 * MAX_BATCH_TEXT));
        assert_eq!(alone.writes.len(), 1);
    }

    #[test]
    fn a_pid_is_dropped_only_when_its_own_try_ended_in_the_batch() {
        let mut batch = vec![
            pid(1, "a"),
            pid(2, "b"),
            pid(3, "old"),
            outcome(1, "a"),
            outcome(3, "new"),
        ];
        drop_superseded_pids(&mut batch);
        let ids: Vec<(i64, bool)> = batch
            .iter()
            .map(|w| (w.id().0, matches!(w, Write::Pid { .. })))
            .collect();
        assert_eq!(ids, vec![(2, true), (3, true), (1, false), (3, false)]);
    }
}
