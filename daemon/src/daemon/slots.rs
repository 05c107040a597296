//! The slots for task processes: at most `max_concurrent` tries run at once,
//! and a freed slot goes to the claimed try that has waited longest.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::oneshot;

/// The slots for task processes: at most `max_concurrent` tries hold one. A
/// slot is freed the moment its process has exited (not when its outcome is
/// written) and goes straight to the try that has waited longest for one.
#[derive(Default)]
pub(super) struct Slots {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    held: usize,
    /// The slot signals of tries waiting for one, in claim order.
    waiting: VecDeque<oneshot::Sender<()>>,
}

impl Slots {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives free slots to waiting tries (there may be more slots after a
    /// reload); returns how many are held and how many tries wait.
    pub(super) fn fill(&self, max_concurrent: usize) -> (usize, usize) {
        let mut state = self.state();
        while state.held < max_concurrent {
            let Some(next) = state.waiting.pop_front() else {
                break;
            };
            if next.send(()).is_ok() {
                state.held += 1;
            }
        }
        state.waiting.retain(|next| !next.is_closed());
        (state.held, state.waiting.len())
    }

    /// A newly claimed try: it has its slot at once if one is free, else it
    /// waits in line.
    pub(super) fn join(&self, max_concurrent: usize) -> oneshot::Receiver<()> {
        let (next, go) = oneshot::channel();
        let mut state = self.state();
        if state.held < max_concurrent {
            // The receiver is alive: the try is not spawned yet.
            let _ = next.send(());
            state.held += 1;
        } else {
            state.waiting.push_back(next);
        }
        go
    }

    /// A try is done with its slot: the next waiting try gets it.
    fn release(&self, max_concurrent: usize) {
        let mut state = self.state();
        if state.held <= max_concurrent {
            while let Some(next) = state.waiting.pop_front() {
                if next.send(()).is_ok() {
                    return;
                }
            }
        }
        state.held = state.held.saturating_sub(1);
    }

    /// Every waiting try is told to give its row back (a shutdown).
    pub(super) fn close(&self) {
        self.state().waiting.clear();
    }
}

/// A slot held by a try; dropping it frees the slot.
pub(super) struct Slot<'a> {
    pub(super) slots: &'a Slots,
    pub(super) max_concurrent: usize,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.slots.release(self.max_concurrent);
    }
}
