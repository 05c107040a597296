//! The recorder: the one writer of try results. Supervisors hand it pid,
//! progress and outcome writes; it applies everything waiting in one
//! transaction (so that at high load a write costs well under one database
//! round trip), and retries with backoff through outages without losing any.

use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::health::{Backoff, Health};
use crate::store::{Store, Write};

/// Largest batch applied in one transaction.
const MAX_BATCH: usize = 512;

enum Message {
    Write(Write),
    /// Apply what is queued, then stop.
    Close,
}

/// A handle for queueing writes; cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    sender: mpsc::UnboundedSender<Message>,
}

impl Recorder {
    pub fn start(
        store: Store,
        health: Arc<Health>,
        wake: Arc<tokio::sync::Notify>,
    ) -> (Recorder, JoinHandle<()>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let handle = tokio::spawn(record_loop(store, health, receiver, wake));
        (Recorder { sender }, handle)
    }

    pub fn send(&self, write: Write) {
        // Only fails after close, when no supervisor is left to send.
        let _ = self.sender.send(Message::Write(write));
    }

    pub fn close(&self) {
        let _ = self.sender.send(Message::Close);
    }
}

async fn record_loop(
    store: Store,
    health: Arc<Health>,
    mut receiver: mpsc::UnboundedReceiver<Message>,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut closing = false;
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
        if batch.is_empty() {
            continue;
        }
        let mut backoff = Backoff::default();
        loop {
            match store.record(&batch).await {
                Ok(applied) => {
                    health.succeeded();
                    for (write, applied) in batch.iter().zip(applied) {
                        if !applied {
                            tracing::warn!(
                                request = %write.id(),
                                "not recorded: the row is no longer this try's claim (reaped or taken over)"
                            );
                        }
                    }
                    break;
                }
                Err(error) => {
                    health.failed("recording task results", &error);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        // A recorded outcome may make a retry due, or free a row for others.
        if batch.iter().any(|w| matches!(w, Write::Outcome(_))) {
            wake.notify_one();
        }
        tokio::task::yield_now().await;
    }
}
