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

/// In a debug build, panics if the environment variable
/// `TASKRUNNER_TEST_PANIC_IN_TRY_OF` names `task`: a test of a try whose
/// supervision panics once its process runs.
pub(crate) fn panic_in_a_try_when_told(task: &str) {
    #[cfg(debug_assertions)]
    if std::env::var_os("TASKRUNNER_TEST_PANIC_IN_TRY_OF").is_some_and(|named| named == task) {
        panic!("a try's supervision panics: told to by a test");
    }
    let _ = task;
}

/// In a debug build, waits the milliseconds the environment variable
/// `variable` gives, if any, with a log line as it begins: a test that
/// needs one daemon slower than another at a given step, or a step held
/// while it acts.
pub(crate) async fn pause_when_told(variable: &str) {
    let pause = shortened(Duration::ZERO, variable);
    if !pause.is_zero() {
        tracing::info!("test hook: paused for {variable}");
        tokio::time::sleep(pause).await;
    }
}

/// In a debug build, when the environment variable `variable` names a
/// file, logs that it waits (and makes the file named so with `.waiting`
/// added, for a test that cannot read the log) and waits until that file
/// exists (at most a minute): a step held while a test acts, for as long
/// as the test needs on a loaded machine.
pub(crate) async fn wait_for_file_when_told(variable: &str) {
    #[cfg(debug_assertions)]
    if let Some(file) = std::env::var_os(variable).map(std::path::PathBuf::from) {
        tracing::info!("test hook: {variable} waits for {}", file.display());
        let mut waiting = file.clone().into_os_string();
        waiting.push(".waiting");
        let _ = std::fs::write(waiting, b"");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !file.exists() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let _ = variable;
}

/// In a debug build, when the environment variable
/// `TASKRUNNER_TEST_FAIL_DELAY_LOOKUPS_MS` gives milliseconds, every lookup
/// of the next delayed row that finds one fails, for that long from the
/// first (once per process): a test of a daemon whose lookup fails while a
/// delayed row waits, past the wake-ups of its start.
pub(crate) fn fail_delay_lookups_when_told<T>(
    found: anyhow::Result<Option<T>>,
) -> anyhow::Result<Option<T>> {
    #[cfg(debug_assertions)]
    if matches!(found, Ok(Some(_))) {
        static FIRST: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let window = shortened(Duration::ZERO, "TASKRUNNER_TEST_FAIL_DELAY_LOOKUPS_MS");
        if !window.is_zero() && FIRST.get_or_init(std::time::Instant::now).elapsed() < window {
            tracing::info!("test hook: the lookup of the next delayed row fails");
            return Err(anyhow::anyhow!(
                "failed by TASKRUNNER_TEST_FAIL_DELAY_LOOKUPS_MS"
            ));
        }
    }
    found
}
