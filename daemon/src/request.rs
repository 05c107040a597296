//! The request row as the daemon sees it: ids, states, and what a claim hands
//! to the supervisor. The runnable rule itself lives in SQL (`store::sql`), so
//! that one definition serves the claim query and its index.

use std::fmt;

/// Primary key of `task_runner_requests`. Never reused (AUTOINCREMENT / bigserial).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub i64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for RequestId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse::<i64>()
            .map(RequestId)
            .map_err(|_| format!("request id must be a number, not `{s}`"))
    }
}

/// The `result` column. NULL (never run) is `Option::None` around it.
///
/// Who moves a row out of each state:
/// - `Running`: the supervisor of the claiming daemon (outcome), the reaper
///   (process gone, lease lapsed), or shutdown (`Interrupted`).
/// - `Failed`, `Crashed`, `Timeout`: the scheduler claims them again after the
///   backoff while `tries < try_limit`; otherwise they are exhausted and stay.
/// - `Interrupted`: the scheduler claims it again at once (the try was given back).
/// - `Finished`, `Cancelled`, `Rejected`: final; only `retry` (a user) moves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Finished,
    Failed,
    Crashed,
    Timeout,
    Interrupted,
    Cancelled,
    Rejected,
}

impl State {
    pub(crate) const ALL: [State; 8] = [
        State::Running,
        State::Finished,
        State::Failed,
        State::Crashed,
        State::Timeout,
        State::Interrupted,
        State::Cancelled,
        State::Rejected,
    ];

    /// The string stored in the `result` column (SPEC.md spelling).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Running => "RUNNING",
            State::Finished => "FINISHED",
            State::Failed => "FAILED",
            State::Crashed => "CRASHED",
            State::Timeout => "TIMEOUT",
            State::Interrupted => "INTERRUPTED",
            State::Cancelled => "CANCELLED",
            State::Rejected => "REJECTED",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let upper = s.trim().to_ascii_uppercase();
        State::ALL
            .into_iter()
            .find(|state| state.as_str() == upper)
            .ok_or_else(|| {
                let names: Vec<_> = State::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown state `{s}` (one of {})", names.join(", "))
            })
    }
}

/// A row this daemon has just claimed: everything needed to run one try.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub(crate) id: RequestId,
    pub(crate) task_class_name: String,
    /// Raw `options` bytes, passed to the task's stdin unchanged.
    pub(crate) options: Vec<u8>,
    /// The try number this claim started (1 on the first try).
    pub(crate) tries: i64,
    pub(crate) try_limit: i64,
    /// Fences every later write about this try (see `store`).
    pub(crate) claim_token: crate::instance::ClaimToken,
    pub(crate) queue: String,
    /// The row has a `period`: when this try ends, its next occurrence may be due.
    pub(crate) periodic: bool,
    /// Seconds from when the row became runnable (its `delay_until`, else
    /// `created_at`) to this claim, for the metrics.
    pub(crate) waited: f64,
    /// The batch this row is a member of.
    pub(crate) batch_id: Option<i64>,
    /// The batch whose end created this row (a batch's callback).
    pub(crate) callback_of_batch: Option<i64>,
    /// The row has `on_success` or `on_failure`.
    pub(crate) has_callbacks: bool,
    /// The length of `options` in the row, in bytes: longer than the
    /// store's `max_options`, or than a claim ahead of free slots takes
    /// (`ClaimFilter::options_inline`), `options` was left out of the claim
    /// (empty).
    pub(crate) options_length: u64,
    /// `cancel_requested_at` was set before the claim (plain SQL on a
    /// pending row): the try ends CANCELLED without starting.
    pub(crate) cancel_requested: bool,
}

impl Claimed {
    /// `TASKRUNNER_BATCH_ID`: the batch a member belongs to, or the batch
    /// whose end a callback answers.
    pub(crate) fn batch_for_env(&self) -> Option<i64> {
        self.batch_id.or(self.callback_of_batch)
    }
}

/// Every column of one row, rendered for people (`show`, `list`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Request {
    pub id: i64,
    pub created_at: Option<String>,
    pub task_class_name: String,
    pub options: Option<String>,
    pub pid: Option<i64>,
    pub host: Option<String>,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub(crate) heartbeat_at: Option<String>,
    pub result: Option<String>,
    pub result_text: Option<String>,
    pub tries: i64,
    pub try_limit: i64,
    pub delay_until: Option<String>,
    pub(crate) priority: i64,
    pub(crate) claimed_by: Option<String>,
    pub(crate) cancel_requested_at: Option<String>,
    pub progress: Option<String>,
    pub queue: String,
    pub(crate) node: Option<String>,
    pub(crate) not_node: Option<String>,
    /// Seconds between planned starts of a periodic request.
    pub(crate) period: Option<i64>,
    pub planned_at: Option<String>,
    pub unique_key: Option<String>,
    pub(crate) schedule: Option<String>,
    /// The batch this request is a member of.
    pub batch_id: Option<i64>,
    pub(crate) on_success: Option<String>,
    pub(crate) on_failure: Option<String>,
    /// The request whose outcome created this row (a callback).
    pub callback_of: Option<i64>,
    /// The batch whose end created this row (a batch's callback).
    pub(crate) callback_of_batch: Option<i64>,
    /// The flow this row is a step (or a step's revert) of.
    pub(crate) flow_id: Option<i64>,
    /// Its step's index in the flow, from 0.
    pub(crate) flow_step: Option<i64>,
    /// `execute` or `revert`.
    pub(crate) flow_action: Option<String>,
}

/// The longest `task_class_name` (in characters) a row may have; migration
/// 0004 refuses longer ones (MariaDB's column is a `VARCHAR(255)`).
pub(crate) const MAX_TASK_NAME: usize = 255;

/// The largest `try_limit` the tables hold: the column is a 32-bit integer
/// on PostgreSQL and MariaDB/MySQL, which refuse a larger value.
pub(crate) const MAX_TRY_LIMIT: i64 = i32::MAX as i64;

/// The range of `priority` every backend stores and claims: the 32-bit
/// column of PostgreSQL and MariaDB, whose claim order on MariaDB is the
/// column's negation (`claim_rank`), which `i32::MIN` would overflow.
pub(crate) const PRIORITIES: std::ops::RangeInclusive<i64> = -(i32::MAX as i64)..=i32::MAX as i64;

/// Options must be YAML (or empty). Ruby's tags (`!ruby/hash:…`, `!ruby/sym`)
/// are valid YAML and pass; the task sees the bytes unchanged.
pub(crate) fn check_options(options: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(options).map_err(|_| "not UTF-8 text".to_string())?;
    if text.trim().is_empty() {
        return Ok(());
    }
    serde_yaml::from_str::<serde_yaml::Value>(text)
        .map(|_| ())
        .map_err(|error| error.to_string())
}

/// Checks names given by a user (`None`: not given; `what`: the flag or
/// key each came in): an empty one is a shell variable left unset, not a
/// name (a row for node "" waits for ever, one unique key "" for every
/// such row inserts only the first, a callback of type "" fails as
/// unknown); one longer than the columns that hold it is refused by
/// MariaDB, and a callback's name would be refused only at its parent's
/// end, when the callback could not be made.
pub(crate) fn check_names(names: &[(&str, Option<&String>)]) -> Result<(), String> {
    for (what, value) in names {
        let Some(value) = value else { continue };
        if value.trim().is_empty() {
            return Err(format!("{what}: the value is empty"));
        }
        name_fits(what, value)?;
    }
    Ok(())
}

/// Refuses a name (`what`: the config key or CLI flag it came in) longer
/// than the 255-character columns that hold it: a task type
/// (`task_class_name`, refused in rows by migration 0004), a callback, a
/// schedule, a flow, a queue or key. Such a name could never be written:
/// its rows and alerts would be refused one by one, or a schedule fail
/// each tick.
pub(crate) fn name_fits(what: &str, name: &str) -> Result<(), String> {
    let length = name.chars().count();
    if length > MAX_TASK_NAME {
        return Err(format!(
            "{}: a name is at most {MAX_TASK_NAME} characters (it is stored in 255-character columns); this one has {length}",
            crate::escape::one_line(&shown_task_name(what)),
        ));
    }
    Ok(())
}

impl Request {
    /// Why this row can never run nor end, if it cannot: rows written
    /// before migration 0004 refused them (`list` flags them). The daemon
    /// never claims them (the runnable rule leaves them out) and never
    /// changes them; `retry`, `cancel` or `purge` ends them.
    pub(crate) fn never_runs(&self) -> Option<String> {
        if let Some(result) = self.result.as_deref() {
            if !State::ALL.iter().any(|state| state.as_str() == result) {
                return Some(format!(
                    "result {} is not a state (cancel or retry it)",
                    quote(result)
                ));
            }
        }
        if self.try_limit < 1 {
            return Some(format!("try_limit {} allows no try", self.try_limit));
        }
        if self.result.is_none() && self.tries >= self.try_limit {
            return Some(format!(
                "never run, but no try left (tries {} of {}; retry sets tries to 0)",
                self.tries, self.try_limit
            ));
        }
        let name_length = self.task_class_name.chars().count();
        if name_length > MAX_TASK_NAME {
            return Some(format!(
                "task_class_name is {name_length} characters long (at most {MAX_TASK_NAME})"
            ));
        }
        if let Some(delay_until) = self.delay_until.as_deref() {
            if !reads_as_a_time(delay_until) {
                return Some(format!("delay_until {} is not a time", quote(delay_until)));
            }
        }
        None
    }
}

/// A type name as logs and metric labels show it: one longer than
/// [`MAX_TASK_NAME`] (a row from before migration 0004) is cut, so that a
/// megabyte name makes neither a megabyte log line nor a megabyte label.
pub(crate) fn shown_task_name(name: &str) -> std::borrow::Cow<'_, str> {
    let length = name.chars().count();
    if length <= MAX_TASK_NAME {
        name.into()
    } else {
        let start: String = name.chars().take(32).collect();
        format!("{start}… ({length} characters)").into()
    }
}

/// A value shown in a reason: quoted, at most 40 characters.
fn quote(value: &str) -> String {
    let mut shown: String = value.chars().take(40).collect();
    if shown.len() < value.len() {
        shown.push('…');
    }
    format!("'{shown}'")
}

/// Whether a stored time starts as every form the backends store does
/// (`YYYY-MM-DD`): SQLite keeps a value it cannot read as written.
fn reads_as_a_time(value: &str) -> bool {
    value
        .get(..10)
        .is_some_and(|date| chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").is_ok())
}

/// The wait before a failed request's next try: a type's retry settings
/// (`retry_delay`, `retry_multiplier`, `retry_jitter`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) delay: std::time::Duration,
    pub(crate) multiplier: f64,
    pub(crate) jitter: f64,
}

impl Backoff {
    /// Seconds before the next try after `tries` failed tries of request
    /// `id`: `delay × multiplier^(tries-1)`, spread by up to `jitter`
    /// either way, capped at one day so that a large multiplier cannot
    /// overflow into a row that never runs again.
    ///
    /// The spread is a hash of the request and its try, not a random draw:
    /// rows that failed together are spread evenly, and one try's delay is
    /// the same however often it is computed.
    pub(crate) fn seconds(&self, id: RequestId, tries: i64) -> f64 {
        // No delay grows into none (0 × an infinite power is not a number,
        // which read as a day: `retry_delay: 0s` with a multiplier of 3
        // waited a day from the 650th try on).
        if self.delay.is_zero() {
            return 0.0;
        }
        let exponent = (tries.max(1) - 1).min(1_000) as i32;
        let delay = self.delay.as_secs_f64() * self.multiplier.powi(exponent);
        let delay = delay * (1.0 + self.jitter * (2.0 * unit_hash(id, tries) - 1.0));
        if delay.is_finite() {
            delay.clamp(0.0, LONGEST_BACKOFF)
        } else {
            LONGEST_BACKOFF
        }
    }
}

/// The longest delay before a next try, seconds: a day.
pub(crate) const LONGEST_BACKOFF: f64 = 86_400.0;

/// A number in [0, 1) spread evenly over requests and tries (splitmix64).
fn unit_hash(RequestId(id): RequestId, tries: i64) -> f64 {
    let mut z = (id as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(tries as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_that_can_never_run_say_why() {
        let runnable = Request {
            task_class_name: "NoOp".into(),
            try_limit: 5,
            ..Request::default()
        };
        assert_eq!(runnable.never_runs(), None);
        let with = |change: &dyn Fn(&mut Request)| {
            let mut row = runnable.clone();
            change(&mut row);
            row.never_runs().unwrap_or_default()
        };
        assert_eq!(
            with(&|r| r.result = Some(String::new())),
            "result '' is not a state (cancel or retry it)"
        );
        assert_eq!(with(&|r| r.try_limit = -1), "try_limit -1 allows no try");
        assert_eq!(
            with(&|r| r.tries = 5),
            "never run, but no try left (tries 5 of 5; retry sets tries to 0)"
        );
        assert_eq!(
            with(&|r| r.task_class_name = "x".repeat(1 << 20)),
            "task_class_name is 1048576 characters long (at most 255)"
        );
        assert_eq!(
            with(&|r| r.delay_until = Some("tomorrow".into())),
            "delay_until 'tomorrow' is not a time"
        );
        // Exhausted, final and delayed rows are not impossible ones.
        assert_eq!(
            with(&|r| {
                r.result = Some("FAILED".into());
                r.tries = 5;
                r.delay_until = Some("2026-11-24 07:00:00.000".into());
            }),
            ""
        );
    }

    fn retrying(delay_secs: f64, multiplier: f64, jitter: f64) -> Backoff {
        Backoff {
            delay: std::time::Duration::from_secs_f64(delay_secs),
            multiplier,
            jitter,
        }
    }

    #[test]
    fn backoff_grows_by_the_multiplier() {
        let backoff = |delay, multiplier, tries| {
            retrying(delay, multiplier, 0.0).seconds(RequestId(7), tries)
        };
        assert_eq!(backoff(10.0, 2.0, 1), 10.0);
        assert_eq!(backoff(10.0, 2.0, 2), 20.0);
        assert_eq!(backoff(10.0, 2.0, 4), 80.0);
        assert_eq!(backoff(1.5, 1.0, 7), 1.5);
    }

    #[test]
    fn backoff_is_capped_and_never_negative() {
        let settings = retrying(10.0, 1e9, 0.0);
        assert_eq!(settings.seconds(RequestId(7), 100), 86_400.0);
        assert_eq!(
            retrying(10.0, 2.0, 1.0).seconds(RequestId(7), 100),
            86_400.0
        );
        assert_eq!(retrying(10.0, 2.0, 0.0).seconds(RequestId(7), 0), 10.0);
        for id in 0..1_000 {
            assert!(retrying(10.0, 2.0, 1.0).seconds(RequestId(id), 1) >= 0.0);
        }
    }

    /// `retry_delay: 0s` waits no time at any try: 0 × 3^649 is not a
    /// number, which waited a day.
    #[test]
    fn no_delay_stays_none_at_any_try() {
        for tries in [1, 2, 649, 650, 5_000] {
            assert_eq!(retrying(0.0, 3.0, 0.1).seconds(RequestId(7), tries), 0.0);
        }
    }

    /// A thousand rows that failed together come back spread over the
    /// whole window, each within it, and one try's delay is the same each
    /// time it is computed.
    #[test]
    fn jitter_spreads_the_rows_of_one_failure_evenly_within_its_bound() {
        let settings = retrying(10.0, 2.0, 0.2);
        let delays: Vec<f64> = (1..=1_000)
            .map(|id| settings.seconds(RequestId(id), 2))
            .collect();
        assert!(delays.iter().all(|delay| (16.0..=24.0).contains(delay)));
        let mut quarters = [0; 4];
        for delay in &delays {
            quarters[(((delay - 16.0) / 2.0) as usize).min(3)] += 1;
        }
        assert!(
            quarters.iter().all(|n| (200..=300).contains(n)),
            "{quarters:?}"
        );
        assert_eq!(
            settings.seconds(RequestId(42), 2),
            settings.seconds(RequestId(42), 2)
        );
        assert_ne!(
            settings.seconds(RequestId(42), 2),
            settings.seconds(RequestId(42), 3) / 2.0
        );
    }

    #[test]
    fn states_round_trip_through_their_column_strings() {
        for state in State::ALL {
            assert_eq!(state.as_str().parse::<State>().unwrap(), state);
        }
        assert!("finished".parse::<State>().is_ok());
        assert!("DONE".parse::<State>().is_err());
    }

    #[test]
    fn request_ids_must_be_numbers() {
        assert_eq!("42".parse::<RequestId>().unwrap(), RequestId(42));
        assert!("x1".parse::<RequestId>().is_err());
    }
}
