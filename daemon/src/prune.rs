//! One prune pass: deletes the final rows that the [`Retention`] rules
//! allow. The daemon's pruner (`daemon/pruner.rs`) runs it at start and
//! every `reap_interval`; `taskrunner-cli purge` without `--older-than`
//! runs it once.
//!
//! Rows are deleted in small batches (one short `DELETE` of at most
//! [`BATCH`] rows, then a pause), so a large backlog never holds the table
//! long enough to delay claims. Only final rows are ever deleted: FINISHED,
//! CANCELLED, REJECTED, and exhausted FAILED/CRASHED/TIMEOUT rows; pending,
//! running and retryable rows never match (see [`crate::store::sql`]).

use std::time::Duration;

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::retention::Retention;
use crate::store::Store;

/// Rows deleted by one statement.
pub(crate) const BATCH: i64 = 500;

/// Deletes what `retention` allows, batch by batch, pausing `pause` between
/// batches; stops early (between batches) when `stop` is cancelled.
pub(crate) async fn prune(
    store: &Store,
    retention: &Retention,
    pause: Duration,
    stop: Option<&CancellationToken>,
) -> Result<u64> {
    let mut total = 0;
    for (kind, age) in retention.rules() {
        loop {
            let deleted = store.prune(kind, age, BATCH).await?;
            total += deleted;
            if deleted < BATCH as u64 {
                break;
            }
            if let Some(stop) = stop {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.cancelled() => return Ok(total),
                }
            } else if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }
    Ok(total)
}
