//! Retention: how long final rows are kept (`retention:` in the config).
//! The rules only: [`crate::prune`] deletes what they allow.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::Prunable;
use crate::units::serde_units;

/// `retention:` as written in the config file.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileRetention {
    #[serde(
        default,
        with = "serde_units::duration",
        skip_serializing_if = "Option::is_none"
    )]
    finished: Option<Duration>,
    #[serde(
        default,
        with = "serde_units::duration",
        skip_serializing_if = "Option::is_none"
    )]
    cancelled: Option<Duration>,
    #[serde(
        default,
        with = "serde_units::duration",
        skip_serializing_if = "Option::is_none"
    )]
    rejected: Option<Duration>,
    #[serde(
        default,
        with = "serde_units::duration",
        skip_serializing_if = "Option::is_none"
    )]
    exhausted: Option<Duration>,
}

/// How long each kind of final row is kept after it completed; `None`
/// keeps it forever (the default for every kind).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Retention {
    pub(crate) finished: Option<Duration>,
    pub(crate) cancelled: Option<Duration>,
    pub(crate) rejected: Option<Duration>,
    pub(crate) exhausted: Option<Duration>,
}

impl Retention {
    pub(crate) fn from_file(raw: Option<FileRetention>) -> Retention {
        let raw = raw.unwrap_or_default();
        Retention {
            finished: raw.finished,
            cancelled: raw.cancelled,
            rejected: raw.rejected,
            exhausted: raw.exhausted,
        }
    }

    /// Every kind kept for `age` (`purge --older-than`).
    pub(crate) fn all(age: Duration) -> Retention {
        Retention {
            finished: Some(age),
            cancelled: Some(age),
            rejected: Some(age),
            exhausted: Some(age),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rules().is_empty()
    }

    /// The kinds with a limit, and their limits.
    pub(crate) fn rules(&self) -> Vec<(Prunable, Duration)> {
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

    /// The rules as a config file writes them (`config check`); `None`
    /// when there are none.
    pub(crate) fn as_written(&self) -> Option<FileRetention> {
        (!self.is_empty()).then_some(FileRetention {
            finished: self.finished,
            cancelled: self.cancelled,
            rejected: self.rejected,
            exhausted: self.exhausted,
        })
    }
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
