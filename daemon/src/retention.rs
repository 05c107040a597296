//! Retention: how long final rows are kept (`retention:` in the config), and
//! one pass that deletes older ones. The daemon's pruner
//! (`daemon/pruner.rs`) runs it at start and every `reap_interval`. `taskrunner-cli purge` without `--older-than` applies the
//! same rules once.
//!
//! Rows are deleted in small batches (one short `DELETE` of at most
//! [`BATCH`] rows, then a pause), so a large backlog never holds the table
//! long enough to delay claims. Only final rows are ever deleted: FINISHED,
//! CANCELLED, REJECTED, and exhausted FAILED/CRASHED/TIMEOUT rows; pending,
//! running and retryable rows never match (see [`crate::store::sql`]).

use std::time::Duration;

use anyhow::Result;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::store::{Prunable, Store};
use crate::units::serde_units;

/// Rows deleted by one statement.
pub const BATCH: i64 = 500;

/// `retention:` as written in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRetention {
    #[serde(default, deserialize_with = "serde_units::duration")]
    finished: Option<Duration>,
    #[serde(default, deserialize_with = "serde_units::duration")]
    cancelled: Option<Duration>,
    #[serde(default, deserialize_with = "serde_units::duration")]
    rejected: Option<Duration>,
    #[serde(default, deserialize_with = "serde_units::duration")]
    exhausted: Option<Duration>,
}

/// How long each kind of final row is kept after it completed; `None`
/// keeps it forever (the default for every kind).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    pub finished: Option<Duration>,
    pub cancelled: Option<Duration>,
    pub rejected: Option<Duration>,
    pub exhausted: Option<Duration>,
}

impl Retention {
    pub fn from_file(raw: Option<FileRetention>) -> Retention {
        let raw = raw.unwrap_or_default();
        Retention {
            finished: raw.finished,
            cancelled: raw.cancelled,
            rejected: raw.rejected,
            exhausted: raw.exhausted,
        }
    }

    /// Every kind kept for `age` (`purge --older-than`).
    pub fn all(age: Duration) -> Retention {
        Retention {
            finished: Some(age),
            cancelled: Some(age),
            rejected: Some(age),
            exhausted: Some(age),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules().is_empty()
    }

    /// The kinds with a limit, and their limits.
    pub fn rules(&self) -> Vec<(Prunable, Duration)> {
        [
            (Prunable::Finished, self.finished),
            (Prunable::Cancelled, self.cancelled),
            (Prunable::Rejected, self.rejected),
            (Prunable::Exhausted, self.exhausted),
        ]
        .into_iter()
        .filter_map(|(kind, age)| Some((kind, age?)))
        .collect()
    }

    /// The rules as the effective config prints them.
    pub fn to_yaml(&self) -> String {
        let rules: Vec<String> = self
            .rules()
            .iter()
            .map(|(kind, age)| {
                format!(
                    "{}: {}",
                    kind.config_key(),
                    crate::units::format_duration(*age)
                )
            })
            .collect();
        format!("{{ {} }}", rules.join(", "))
    }
}

/// Deletes what `retention` allows, batch by batch, pausing `pause` between
/// batches; stops early (between batches) when `stop` is cancelled.
pub async fn prune(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kinds_with_a_limit_are_pruned() {
        let retention = Retention::from_file(Some(
            serde_yaml::from_str("finished: 7d\nexhausted: 1h\n").unwrap(),
        ));
        assert_eq!(
            retention.rules(),
            vec![
                (Prunable::Finished, Duration::from_secs(7 * 86_400)),
                (Prunable::Exhausted, Duration::from_secs(3600)),
            ]
        );
        assert!(Retention::default().is_empty());
        assert_eq!(Retention::all(Duration::from_secs(1)).rules().len(), 4);
        let error = serde_yaml::from_str::<FileRetention>("finshed: 1d\n").unwrap_err();
        assert!(error.to_string().contains("finshed"), "{error}");
    }
}
