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

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::daemon::Shared;
use crate::store::SideConnection;

/// How often the log is checkpointed.
const EVERY: Duration = Duration::from_secs(1);

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    if shared.store.sqlite_pool().is_none() {
        // Nothing to do on PostgreSQL; a service returns only when stopped.
        stop.cancelled().await;
        return;
    }
    let mut side = SideConnection::new(&shared.config().database_url);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.cancelled() => break,
        }
        let Some(connection) = side.get().await else {
            continue;
        };
        shared.store.count_statements(1);
        let checkpoint = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)");
        // Retried a second later; the writer's own checkpoints cover meanwhile.
        if let Err(error) = checkpoint.execute(connection).await {
            side.failed(&error);
        }
    }
    side.close().await;
}
