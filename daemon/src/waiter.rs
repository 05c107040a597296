//! Waiting for a request's result (`taskrunner-cli wait`), without polling
//! the table: on PostgreSQL a trigger NOTIFYs `task_runner_results` with the
//! request id whenever `result` changes to anything but RUNNING, and the
//! waiter LISTENs; on SQLite it checks `PRAGMA data_version` on a connection
//! of its own (a check that reads no table) and re-reads the row only when
//! another connection has committed; on MariaDB/MySQL (no NOTIFY) it reads
//! the row by its primary key every 50 ms.
//!
//! The row is always read once after the listener is set up, so a request
//! that ended before (or while) the wait started is never missed.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};

use crate::request::{Request, RequestId};
use crate::store::Store;

/// The NOTIFY channel written by the trigger in the PostgreSQL migration.
pub const CHANNEL: &str = "task_runner_results";

/// How often SQLite's data version is checked.
const SQLITE_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// How often the row is read on MariaDB/MySQL (one primary-key look-up).
const MYSQL_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// A safety net on PostgreSQL: the row is re-read this often even without a
/// notification (a connection that dropped and came back, say).
const POSTGRES_RECHECK: Duration = Duration::from_secs(5);

/// Whether a row is final: nothing more will happen to it unless someone
/// retries it.
pub fn is_final(request: &Request) -> bool {
    match request.result.as_deref() {
        Some("FINISHED" | "CANCELLED" | "REJECTED") => true,
        Some("FAILED" | "CRASHED" | "TIMEOUT") => request.tries >= request.try_limit,
        _ => false,
    }
}

/// Blocks until request `id` is final and returns it; `Ok(None)` when
/// `timeout` passes first. A request that does not exist (or is deleted
/// while waited for) is an error.
pub async fn wait(
    store: &Store,
    database_url: &str,
    id: RequestId,
    timeout: Option<Duration>,
) -> Result<Option<Request>> {
    let waiting = async {
        if store.postgres_pool().is_some() {
            wait_postgres(store, id).await
        } else if store.mysql_pool().is_some() {
            wait_mysql(store, id).await
        } else {
            wait_sqlite(store, database_url, id).await
        }
    };
    match timeout {
        Some(limit) => match tokio::time::timeout(limit, waiting).await {
            Ok(result) => result.map(Some),
            Err(_) => Ok(None),
        },
        None => waiting.await.map(Some),
    }
}

/// Reads the row: `Some` once it is final.
async fn check(store: &Store, id: RequestId) -> Result<Option<Request>> {
    match store.show(id).await? {
        None => bail!("no request {id}"),
        Some(request) if is_final(&request) => Ok(Some(request)),
        Some(_) => Ok(None),
    }
}

async fn wait_postgres(store: &Store, id: RequestId) -> Result<Request> {
    let pool = store.postgres_pool().expect("checked by the caller");
    let mut listener = sqlx::postgres::PgListener::connect_with(pool)
        .await
        .with_context(|| format!("connecting to {}", store.display_url))?;
    listener
        .listen(CHANNEL)
        .await
        .context("listening for results")?;
    let payload = id.0.to_string();
    loop {
        if let Some(request) = check(store, id).await? {
            return Ok(request);
        }
        // Until a notification for this id arrives (others are skipped).
        loop {
            match tokio::time::timeout(POSTGRES_RECHECK, listener.try_recv()).await {
                Ok(Ok(Some(notification))) if notification.payload() == payload => break,
                Ok(Ok(Some(_))) => continue,
                // The connection dropped: it reconnects on the next call, and
                // the row is read again in case the notification was lost.
                Ok(Ok(None)) | Err(_) => break,
                Ok(Err(error)) => {
                    return Err(error).context("waiting for a notification");
                }
            }
        }
    }
}

/// MariaDB/MySQL have no NOTIFY: the row is read by its key every
/// [`MYSQL_CHECK_INTERVAL`].
async fn wait_mysql(store: &Store, id: RequestId) -> Result<Request> {
    loop {
        if let Some(request) = check(store, id).await? {
            return Ok(request);
        }
        tokio::time::sleep(MYSQL_CHECK_INTERVAL).await;
    }
}

async fn wait_sqlite(store: &Store, url: &str, id: RequestId) -> Result<Request> {
    let mut connection: SqliteConnection = SqliteConnectOptions::from_str(url)
        .with_context(|| format!("invalid SQLite URL {}", store.display_url))?
        .create_if_missing(false)
        .connect()
        .await
        .with_context(|| format!("opening {}", store.display_url))?;
    let result = async {
        let mut last_version: Option<i64> = None;
        loop {
            let version: i64 = sqlx::query_scalar("PRAGMA data_version")
                .fetch_one(&mut connection)
                .await
                .context("checking for changes")?;
            if last_version != Some(version) {
                // Read after taking the version: a commit in between changes
                // the version again, and the next check reads once more.
                if let Some(request) = check(store, id).await? {
                    return Ok(request);
                }
                last_version = Some(version);
            }
            tokio::time::sleep(SQLITE_CHECK_INTERVAL).await;
        }
    }
    .await;
    let _ = connection.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_states() {
        let row = |result: Option<&str>, tries: i64| Request {
            result: result.map(String::from),
            tries,
            try_limit: 3,
            ..Default::default()
        };
        assert!(is_final(&row(Some("FINISHED"), 1)));
        assert!(is_final(&row(Some("CANCELLED"), 0)));
        assert!(is_final(&row(Some("REJECTED"), 1)));
        assert!(is_final(&row(Some("FAILED"), 3)));
        assert!(!is_final(&row(Some("FAILED"), 2)));
        assert!(!is_final(&row(Some("TIMEOUT"), 1)));
        assert!(!is_final(&row(Some("RUNNING"), 3)));
        assert!(!is_final(&row(Some("INTERRUPTED"), 3)));
        assert!(!is_final(&row(None, 0)));
    }
}
