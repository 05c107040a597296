//! Waiting for a condition with a deadline: [`poll`] is the one way the
//! suite waits (and [`poll_blocking`] its form for code outside the async
//! runtime). A wait that times out fails the test saying what it awaited and
//! what it saw instead. [`holds_for`] is its opposite: a condition that must
//! keep holding for a while.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use taskrunner::request::{Request, RequestId};

use super::TestDb;

/// How often a condition is checked again.
const EVERY: Duration = Duration::from_millis(25);

/// Runs `check` until it returns `Ok`, and returns its value; after
/// `timeout`, fails the test naming `what` was awaited and the last `Err`
/// (what was seen instead).
pub async fn poll<T, Seen: Debug>(
    timeout: Duration,
    what: &str,
    check: impl AsyncFnMut() -> Result<T, Seen>,
) -> T {
    poll_every(EVERY, timeout, what, check).await
}

/// [`poll`], checking every `every` (a test that must catch a moment).
pub async fn poll_every<T, Seen: Debug>(
    every: Duration,
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<T, Seen>,
) -> T {
    let deadline = Deadline::after(timeout, what);
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) => deadline.check(&seen),
        }
        tokio::time::sleep(every).await;
    }
}

/// [`poll`] for code that runs outside the async runtime (a test's
/// blocking helpers, a `Daemon`'s methods): the same deadline, a blocking sleep.
pub fn poll_blocking<T, Seen: Debug>(
    timeout: Duration,
    what: &str,
    check: impl FnMut() -> Result<T, Seen>,
) -> T {
    poll_blocking_every(EVERY, timeout, what, check)
}

/// [`poll_blocking`], checking every `every` (a test that times a moment).
pub fn poll_blocking_every<T, Seen: Debug>(
    every: Duration,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, Seen>,
) -> T {
    let deadline = Deadline::after(timeout, what);
    loop {
        match check() {
            Ok(value) => return value,
            Err(seen) => deadline.check(&seen),
        }
        std::thread::sleep(every);
    }
}

/// Whether `condition` comes to hold within `timeout`: for a test that
/// must clean up (kill a stray process, say) before it fails.
pub fn within(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let at = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > at {
            return false;
        }
        std::thread::sleep(EVERY);
    }
}

/// Waits until `condition` holds, failing the test after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    poll_blocking(timeout, what, || {
        condition().then_some(()).ok_or(Text::from("not yet"))
    })
}

/// Checks `check` every 100 ms for `duration`, failing the test the first
/// time it returns `Err` (what was seen): a condition that must keep
/// holding, such as "no callback yet".
pub async fn holds_for<Seen: Debug>(
    duration: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<(), Seen>,
) {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        if let Err(seen) = check().await {
            panic!("{what} stopped holding; seen: {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Text shown as it is in a timeout's message (a log, say), not escaped.
pub struct Text(pub String);

impl From<&str> for Text {
    fn from(text: &str) -> Text {
        Text(text.to_string())
    }
}

impl Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// When a wait gives up, and what it waited for.
struct Deadline<'a> {
    at: Instant,
    timeout: Duration,
    what: &'a str,
}

impl<'a> Deadline<'a> {
    fn after(timeout: Duration, what: &'a str) -> Deadline<'a> {
        Deadline {
            at: Instant::now() + timeout,
            timeout,
            what,
        }
    }

    /// Fails the test if the deadline has passed.
    fn check(&self, seen: &dyn Debug) {
        if Instant::now() > self.at {
            panic!(
                "timed out after {:?} waiting for {}; seen instead: {seen:#?}",
                self.timeout, self.what
            );
        }
    }
}

impl TestDb {
    /// Waits until row `id` satisfies `done`, and returns it.
    pub async fn wait_for(
        &self,
        id: RequestId,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Request) -> bool,
    ) -> Request {
        poll(timeout, &format!("request {id} to be {what}"), async || {
            let row = self.row(id).await;
            if done(&row) {
                Ok(row)
            } else {
                Err(row)
            }
        })
        .await
    }

    /// Waits until row `id`'s try runs with a pid, and returns the row.
    pub async fn wait_for_pid(&self, id: RequestId, timeout: Duration) -> Request {
        self.wait_for(id, timeout, "running with a pid", |row| row.pid.is_some())
            .await
    }

    /// Waits for the one callback row of request `parent` (`callback_of`)
    /// and for it to be FINISHED, `timeout` each; returns it.
    pub async fn finished_callback_of(&self, parent: RequestId, timeout: Duration) -> Request {
        let callbacks =
            format!("SELECT count(*) FROM task_runner_requests WHERE callback_of = {parent}");
        self.wait_for_count(&callbacks, 1, timeout).await;
        let id = self
            .scalar(&format!(
                "SELECT id FROM task_runner_requests WHERE callback_of = {parent}"
            ))
            .await;
        self.wait_for_state(RequestId(id), "FINISHED", timeout)
            .await
    }

    /// Waits until row `id` has an outcome (a result other than RUNNING);
    /// returns it.
    pub async fn wait_for_outcome(&self, id: RequestId, timeout: Duration) -> Request {
        self.wait_for(id, timeout, "an outcome", |row| {
            row.result
                .as_deref()
                .is_some_and(|result| result != "RUNNING")
        })
        .await
    }

    /// Waits until row `id` has `result` = `state`.
    pub async fn wait_for_state(&self, id: RequestId, state: &str, timeout: Duration) -> Request {
        self.wait_for(id, timeout, state, |row| {
            row.result.as_deref() == Some(state)
        })
        .await
    }

    /// Waits until row `id` has FAILED; checks that the first line of its
    /// result text contains `says`, and returns the whole text.
    pub async fn wait_for_failure(&self, id: RequestId, says: &str) -> String {
        let row = self
            .wait_for_state(id, "FAILED", Duration::from_secs(30))
            .await;
        let text = row.result_text.unwrap_or_default();
        assert!(
            text.lines().next().unwrap_or_default().contains(says),
            "{text}"
        );
        text
    }

    /// Waits until `sql` (a count) returns at least `at_least`; returns it.
    pub async fn wait_for_at_least(&self, sql: &str, at_least: i64, timeout: Duration) -> i64 {
        poll(
            timeout,
            &format!("`{sql}` to reach {at_least}"),
            async || {
                let count = self.scalar(sql).await;
                if count >= at_least {
                    Ok(count)
                } else {
                    Err(count)
                }
            },
        )
        .await
    }

    /// PostgreSQL: waits until a statement that starts with `start` waits
    /// for a lock (another session's, which the test holds).
    pub async fn wait_for_a_statement_waiting_on_a_lock(&self, start: &str) {
        let waiting = format!(
            "SELECT count(*) FROM pg_stat_activity \
              WHERE wait_event_type = 'Lock' AND query LIKE '{start}%'"
        );
        self.wait_for_count(&waiting, 1, Duration::from_secs(30))
            .await;
    }

    /// Waits until `sql` (a count) returns `expected`.
    pub async fn wait_for_count(&self, sql: &str, expected: i64, timeout: Duration) {
        poll(timeout, &format!("`{sql}` to be {expected}"), async || {
            let count = self.scalar(sql).await;
            if count == expected {
                Ok(())
            } else {
                Err(count)
            }
        })
        .await
    }
}
