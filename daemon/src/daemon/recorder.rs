//! The recorder: the one writer of try results. Supervisors hand it pid,
//! progress and outcome writes; it applies everything waiting in one
//! transaction (so that at high load a write costs well under one database
//! round trip), and retries with backoff through outages without losing any.

use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::health::{Backoff, Health, RECORDING};
use crate::request::RequestId;
use crate::store::{Store, Write};

/// Largest batch applied in one transaction.
const MAX_BATCH: usize = 512;

/// Under load (the previous batch was written less than [`BUSY`] ago), a
/// batch waits this long for more writes before it is applied: at high load
/// one statement records the outcomes of several tasks, while at idle an
/// outcome is written at once.
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);
const BUSY: std::time::Duration = std::time::Duration::from_millis(50);

/// Removes the pid writes of tries whose outcome is in the same batch.
fn drop_superseded_pids(batch: &mut Vec<Write>) {
    let ended: Vec<(RequestId, String)> = batch
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

enum Message {
    Write(Write),
    /// Apply what is queued, then stop.
    Close,
}

/// The outcomes queued and not yet applied, by row and claim.
type Pending = Arc<std::sync::Mutex<HashMap<(RequestId, String), usize>>>;

/// A handle for queueing writes; cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    sender: mpsc::UnboundedSender<Message>,
    pending: Pending,
}

impl Recorder {
    pub fn start(
        store: Store,
        health: Arc<Health>,
        wake: Arc<tokio::sync::Notify>,
    ) -> (Recorder, JoinHandle<()>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let pending = Pending::default();
        let handle = tokio::spawn(record_loop(store, health, receiver, wake, pending.clone()));
        (Recorder { sender, pending }, handle)
    }

    pub fn send(&self, write: Write) {
        if let Write::Outcome(outcome) = &write {
            *lock(&self.pending)
                .entry((outcome.id, outcome.claim_token.clone()))
                .or_default() += 1;
        }
        // Only fails after close, when no supervisor is left to send.
        let _ = self.sender.send(Message::Write(write));
    }

    /// Whether an outcome of row `id` under `claim_token` is queued and not
    /// yet written: the row is still RUNNING in the table, but its try is
    /// over.
    pub fn outcome_pending(&self, id: RequestId, claim_token: &str) -> bool {
        lock(&self.pending).contains_key(&(id, claim_token.to_string()))
    }

    pub fn close(&self) {
        let _ = self.sender.send(Message::Close);
    }
}

fn lock(pending: &Pending) -> std::sync::MutexGuard<'_, HashMap<(RequestId, String), usize>> {
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

async fn record_loop(
    store: Store,
    health: Arc<Health>,
    mut receiver: mpsc::UnboundedReceiver<Message>,
    wake: Arc<tokio::sync::Notify>,
    pending: Pending,
) {
    let mut closing = false;
    let mut last_batch = tokio::time::Instant::now()
        .checked_sub(BUSY)
        .unwrap_or_else(tokio::time::Instant::now);
    while !closing {
        let Some(first) = receiver.recv().await else {
            return;
        };
        let mut batch = Vec::new();
        match first {
            Message::Write(write) => batch.push(write),
            Message::Close => closing = true,
        }
        while batch.len() < MAX_BATCH && !closing {
            match receiver.try_recv() {
                Ok(Message::Write(write)) => batch.push(write),
                Ok(Message::Close) => closing = true,
                Err(_) => break,
            }
        }
        if last_batch.elapsed() < BUSY {
            let linger = tokio::time::Instant::now() + LINGER;
            while !closing && batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(linger, receiver.recv()).await {
                    Ok(Some(Message::Write(write))) => batch.push(write),
                    Ok(Some(Message::Close)) | Ok(None) => closing = true,
                    Err(_) => break,
                }
            }
        }
        drop_superseded_pids(&mut batch);
        if batch.is_empty() {
            continue;
        }
        let mut backoff = Backoff::default();
        loop {
            match store.record(&batch).await {
                Ok(applied) => {
                    health.succeeded(RECORDING);
                    for (write, applied) in batch.iter().zip(applied) {
                        if !applied {
                            tracing::warn!(
                                request = %write.id(),
                                "not recorded: the row is no longer this try's claim (reaped or taken over)"
                            );
                        }
                    }
                    settle(&pending, &batch);
                    break;
                }
                Err(error) => {
                    let results = batch
                        .iter()
                        .filter(|w| matches!(w, Write::Outcome(_)))
                        .count();
                    health.failed_holding(RECORDING, &error, results);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        last_batch = tokio::time::Instant::now();
        // A recorded outcome may make a retry due, or free a row for others.
        if batch.iter().any(|w| matches!(w, Write::Outcome(_))) {
            wake.notify_one();
        }
        tokio::task::yield_now().await;
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
            claim_token: token.into(),
            pid: 1,
            boot_id: String::new(),
            start_ticks: 0,
        }
    }

    fn outcome(id: i64, token: &str) -> Write {
        Write::Outcome(Outcome {
            id: RequestId(id),
            claim_token: token.into(),
            state: State::Finished,
            result_text: String::new(),
            retry_after: None,
            give_back_try: false,
            composed: false,
        })
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
