//! The tries this daemon runs.

use std::collections::BTreeMap;
use std::time::Instant;

use tokio::sync::watch;

use crate::request::RequestId;
use crate::supervisor::StopReason;

/// A try this daemon is running.
pub struct LiveTry {
    pub task: String,
    pub queue: String,
    pub claim_token: String,
    pub pid: Option<u32>,
    pub started: Instant,
    pub try_number: i64,
    pub stop: watch::Sender<Option<StopReason>>,
    pub progress: watch::Receiver<Option<String>>,
    /// The progress line last written to the row.
    pub progress_written: Option<String>,
}

/// The tries this daemon runs, and the stop order every new one must obey.
#[derive(Default)]
pub struct Live {
    pub tries: BTreeMap<RequestId, LiveTry>,
    /// Set by [`Shared::stop_all`]: a try registered afterwards is stopped at once.
    pub stopping: Option<StopReason>,
}

impl Live {
    /// Registers a try, stopping it at once if every try has been told to stop.
    pub fn insert(&mut self, id: RequestId, live: LiveTry) {
        if let Some(reason) = self.stopping {
            live.stop.send_replace(Some(reason));
        }
        self.tries.insert(id, live);
    }
}

impl std::ops::Deref for Live {
    type Target = BTreeMap<RequestId, LiveTry>;
    fn deref(&self) -> &Self::Target {
        &self.tries
    }
}

impl std::ops::DerefMut for Live {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tries
    }
}
