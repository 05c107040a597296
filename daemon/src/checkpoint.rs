//! SQLite checkpoints, off the writer's path. In WAL mode the commit that
//! finds the log over `wal_autocheckpoint` pages copies it back into the
//! database file and syncs both files to disk, on the committing connection.
//! In the daemon that is its one writer: every claim and outcome would wait
//! behind the disk meanwhile (measured: slots left empty for lack of claimed
//! rows while the writer sat in `fsync`). So the daemon's writer checkpoints
//! only as a safety net ([`WRITER_AUTOCHECKPOINT`] pages), and this task
//! checkpoints on a connection of its own once a second (with nothing new in
//! the log that is a cheap no-op). A PASSIVE checkpoint never waits for readers or writers, nor
//! blocks them.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

use crate::daemon::Shared;

/// How often the log is checkpointed.
const EVERY: Duration = Duration::from_secs(1);

/// The daemon's writer connection checkpoints only once the log is this many
/// pages long (SQLite's default is 1,000), which it reaches only if this
/// task falls behind.
pub const WRITER_AUTOCHECKPOINT: u32 = 16_000;

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    if shared.store.sqlite_pool().is_none() {
        return;
    }
    let url = shared.config().database_url.clone();
    let mut connection: Option<SqliteConnection> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.cancelled() => break,
        }
        if connection.is_none() {
            connection = match SqliteConnectOptions::from_str(&url) {
                Ok(options) => options.connect().await.ok(),
                Err(_) => return,
            };
        }
        let Some(conn) = connection.as_mut() else {
            continue;
        };
        shared.store.count_statements(1);
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut *conn)
            .await
        {
            // The writer's own checkpoints cover for it meanwhile.
            tracing::debug!("SQLite checkpoint failed: {error}");
            connection = None;
        }
    }
    if let Some(conn) = connection {
        let _ = conn.close().await;
    }
}
