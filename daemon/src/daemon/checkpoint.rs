//! SQLite checkpoints, off the writer's path. In WAL mode the commit that
//! finds the log over `wal_autocheckpoint` pages copies it back into the
//! database file and syncs both files to disk, on the committing connection.
//! In the daemon that is its one writer: every claim and outcome would wait
//! behind the disk meanwhile (measured: slots left empty for lack of claimed
//! rows while the writer sat in `fsync`). So the daemon's writer checkpoints
//! only as a safety net ([`WRITER_AUTOCHECKPOINT`](crate::store::WRITER_AUTOCHECKPOINT) pages), and this task
//! checkpoints on a connection of its own once a second (with nothing new in
//! the log that is a cheap no-op). A PASSIVE checkpoint never waits for readers or writers, nor
//! blocks them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{SideConnection, Store};

/// How often the log is checkpointed.
const EVERY: Duration = Duration::from_secs(1);

/// Checkpoints SQLite's write-ahead log once a second, on a connection of
/// its own.
pub(super) struct Checkpointer {
    pub(super) store: Store,
    /// The database's URL, for the connection of its own.
    pub(super) database_url: String,
}

impl Checkpointer {
    pub(super) async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        if self.store.sqlite_pool().is_none() {
            // Nothing to do on the other backends; a service returns only when stopped.
            cancel.cancelled().await;
            return Ok(());
        }
        let mut side = SideConnection::new(&self.database_url);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = cancel.cancelled() => break,
            }
            let Some(connection) = side.get().await else {
                continue;
            };
            self.store.count_statements(1);
            let checkpoint = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)");
            // Retried a second later; the writer's own checkpoints cover meanwhile.
            if let Err(error) = checkpoint.execute(connection).await {
                side.failed(&error);
            }
        }
        side.close().await;
        Ok(())
    }
}
