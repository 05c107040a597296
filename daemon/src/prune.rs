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

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::retention::Retention;
use crate::store::{Prunable, Store};

/// Rows deleted by one statement.
pub(crate) const BATCH: i64 = 500;

/// Deletes what `retention` allows, batch by batch, pausing `pause` between
/// batches; stops early (between batches) when `stop` is cancelled.
pub(crate) async fn prune(
    store: &Store,
    retention: &Retention,
    pause: Duration,
    stop: Option<&CancellationToken>,
) -> Result<Pruned> {
    let mut pruned = Pruned::default();
    // Rows an application's foreign key still references stay (deleting
    // one would fail the whole batch), read once a pass for each table.
    let mut kept_by_table: BTreeMap<&str, Option<String>> = BTreeMap::new();
    // The requests first, then the batches and flows they leave empty
    // (ended at least as long ago as the shortest rule says).
    let shortest = retention.rules().into_iter().map(|(_, age)| age).min();
    let parents = shortest
        .into_iter()
        .flat_map(|age| [(Prunable::EndedBatches, age), (Prunable::EndedFlows, age)]);
    for (kind, age) in retention.rules().into_iter().chain(parents) {
        let table = kind.table();
        if !kept_by_table.contains_key(table) {
            kept_by_table.insert(table, store.kept_by_foreign_keys(table).await?);
        }
        let kept = kept_by_table[table].as_deref();
        loop {
            let deleted = store.prune(kind, age, BATCH, kept).await?;
            match kind {
                Prunable::EndedBatches | Prunable::EndedFlows => pruned.parents += deleted,
                _ => pruned.requests += deleted,
            }
            if deleted < BATCH as u64 {
                break;
            }
            if let Some(stop) = stop {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.cancelled() => return Ok(pruned),
                }
            } else if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }
    Ok(pruned)
}

/// What a prune pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pruned {
    pub(crate) requests: u64,
    /// Batches and flows that had ended, and that no request referred to
    /// any more.
    pub(crate) parents: u64,
}
