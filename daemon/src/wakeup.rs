//! Wakes the scheduler when rows are added by others, without polling the
//! table: on PostgreSQL a trigger NOTIFYs `task_runner_requests` and every
//! daemon LISTENs; on SQLite `PRAGMA data_version` on a connection of its own
//! changes whenever another connection commits, a check that reads no table.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::daemon::Shared;
use crate::health::Backoff;
use crate::store::SideConnection;

/// The NOTIFY channel written by the trigger in the PostgreSQL migration.
pub const CHANNEL: &str = "task_runner_requests";

/// How often SQLite's data version is checked.
const SQLITE_CHECK_INTERVAL: Duration = Duration::from_millis(100);

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    if shared.store.postgres_pool().is_some() {
        listen_postgres(shared, stop).await
    } else {
        watch_sqlite(shared, stop).await
    }
}

async fn listen_postgres(shared: Arc<Shared>, stop: CancellationToken) {
    let pool = shared
        .store
        .postgres_pool()
        .expect("checked by the caller")
        .clone();
    let mut backoff = Backoff::default();
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::debug!("LISTEN connection failed: {error}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        if listener.listen(CHANNEL).await.is_err() {
            continue;
        }
        backoff.reset();
        // Rows may have arrived while we were not listening.
        shared.wake.notify_one();
        loop {
            tokio::select! {
                notification = listener.try_recv() => match notification {
                    Ok(Some(_)) => shared.wake.notify_one(),
                    // The connection dropped: the poll covers the gap, and we reconnect.
                    Ok(None) | Err(_) => break,
                },
                _ = stop.cancelled() => return,
            }
        }
    }
}

async fn watch_sqlite(shared: Arc<Shared>, stop: CancellationToken) {
    let mut side = SideConnection::new(&shared.config().database_url);
    let mut last_version: Option<i64> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SQLITE_CHECK_INTERVAL) => {}
            _ = stop.cancelled() => break,
        }
        let Some(connection) = side.get().await else {
            continue;
        };
        shared.store.count_statements(1);
        let check = sqlx::query_scalar::<_, i64>("PRAGMA data_version");
        match check.fetch_one(connection).await {
            Ok(version) => {
                if last_version.is_some_and(|last| last != version) {
                    shared.wake.notify_one();
                }
                last_version = Some(version);
            }
            Err(error) => side.failed(&error),
        }
    }
    side.close().await;
}
