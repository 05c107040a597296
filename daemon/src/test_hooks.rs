//! Hooks for the test suite, compiled into debug builds only: a release
//! build reads no such variable.

use std::time::Duration;

/// `bound`, or in a debug build the milliseconds that the environment
/// variable `variable` gives: a test of what happens at a 30 s bound need
/// not wait 30 s for it.
pub(crate) fn shortened(bound: Duration, variable: &str) -> Duration {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var(variable)
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
    {
        return Duration::from_millis(ms);
    }
    let _ = variable;
    bound
}
