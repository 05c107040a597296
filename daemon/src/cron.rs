//! Schedules from the config (`schedules:`): 5-field cron expressions (UTC)
//! or a fixed `every:` period, and when their slots fall due. The daemon's
//! cron loop (`daemon/cron.rs`) enqueues one request per due slot.
//!
//! Architecture Invariant: each slot is enqueued exactly once, however many
//! daemons share the database. The slot is inserted into
//! `task_runner_schedule_slots` (primary key schedule + slot) with
//! `INSERT OR IGNORE` / `ON CONFLICT DO NOTHING`, and the request is
//! inserted in the same transaction only if that insert took (see
//! [`crate::store::Store::enqueue_slot`]). "Now" is always the database's
//! clock, so daemons on hosts with skewed clocks agree on which slot is due.
//!
//! Catch-up: after downtime, only the newest `catch_up` missed slots are
//! enqueued (default 1), never one per missed slot. A schedule with no
//! recorded slot starts with the first slot after the daemon saw it.
//!
//! The 5-field parser is written here (minute hour day-of-month month
//! day-of-week; `*`, lists, ranges, steps, month and weekday names, `7` for
//! Sunday, `@hourly`-style macros): it is small, and UTC-only arithmetic needs
//! none of the daylight-saving logic that general cron crates carry.

use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Datelike, Duration as ChronoDuration, TimeZone, Timelike, Utc};

use serde::{Deserialize, Serialize};

use crate::units::serde_units;

/// A parsed 5-field cron expression. Each field is a bit set of the values
/// it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CronExpr {
    minutes: u64,
    hours: u32,
    days_of_month: u32,
    months: u16,
    days_of_week: u8,
    /// Whether day-of-month / day-of-week were written as other than `*`:
    /// when both are restricted a day matches if either matches (Vixie cron).
    dom_restricted: bool,
    dow_restricted: bool,
}

const MONTH_NAMES: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl std::str::FromStr for CronExpr {
    type Err = String;

    fn from_str(text: &str) -> Result<CronExpr, String> {
        let text = text.trim();
        let expanded = match text.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *".to_string(),
            "@monthly" => "0 0 1 * *".to_string(),
            "@weekly" => "0 0 * * 0".to_string(),
            "@daily" | "@midnight" => "0 0 * * *".to_string(),
            "@hourly" => "0 * * * *".to_string(),
            other if other.starts_with('@') => {
                return Err(format!("unknown cron macro `{text}`"));
            }
            _ => text.to_string(),
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "`{text}` has {} fields; write 5: minute hour day-of-month month day-of-week (UTC)",
                fields.len()
            ));
        }
        let minutes = parse_field(fields[0], "minute", 0, 59, &[])?;
        let hours = parse_field(fields[1], "hour", 0, 23, &[])?;
        let days_of_month = parse_field(fields[2], "day-of-month", 1, 31, &[])?;
        let months = parse_field(fields[3], "month", 1, 12, &MONTH_NAMES)?;
        // 0-7, both 0 and 7 meaning Sunday.
        let mut days_of_week = parse_field(fields[4], "day-of-week", 0, 7, &DAY_NAMES)?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week | 1) & !(1 << 7);
        }
        Ok(CronExpr {
            minutes,
            hours: hours as u32,
            days_of_month: days_of_month as u32,
            months: months as u16,
            days_of_week: days_of_week as u8,
            dom_restricted: fields[2] != "*",
            dow_restricted: fields[4] != "*",
        })
    }
}

/// One field: a comma-separated list of `*`, `N`, `N-M`, each with an
/// optional `/STEP` (`N/STEP` means `N-max/STEP`). Returns a bit set.
fn parse_field(text: &str, what: &str, min: u32, max: u32, names: &[&str]) -> Result<u64, String> {
    let value = |part: &str| -> Result<u32, String> {
        let lower = part.to_ascii_lowercase();
        if let Some(index) = names.iter().position(|name| *name == lower) {
            // Month names start at 1, day names at 0.
            return Ok(index as u32 + min);
        }
        let number: u32 = part
            .parse()
            .map_err(|_| format!("{what} `{part}` is not a number"))?;
        if number < min || number > max {
            return Err(format!("{what} {number} is outside {min}-{max}"));
        }
        Ok(number)
    };
    let mut set = 0u64;
    for item in text.split(',') {
        if item.is_empty() {
            return Err(format!("{what} `{text}` has an empty list item"));
        }
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .map_err(|_| format!("{what} step `{step}` is not a number"))?;
                if step == 0 {
                    return Err(format!("{what} step must be at least 1"));
                }
                (range, Some(step))
            }
            None => (item, None),
        };
        let (low, high) = if range == "*" {
            (min, max)
        } else if let Some((low, high)) = range.split_once('-') {
            let (low, high) = (value(low)?, value(high)?);
            if low > high {
                return Err(format!("{what} range `{range}` runs backwards"));
            }
            (low, high)
        } else {
            let low = value(range)?;
            (low, if step.is_some() { max } else { low })
        };
        let mut current = low;
        while current <= high {
            set |= 1 << current;
            current += step.unwrap_or(1);
        }
    }
    Ok(set)
}

impl CronExpr {
    fn day_matches(&self, time: &DateTime<Utc>) -> bool {
        let dom = self.days_of_month & (1 << time.day()) != 0;
        let dow = self.days_of_week & (1 << time.weekday().num_days_from_sunday()) != 0;
        match (self.dom_restricted, self.dow_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    fn month_matches(&self, time: &DateTime<Utc>) -> bool {
        self.months & (1 << time.month()) != 0
    }

    fn hour_matches(&self, time: &DateTime<Utc>) -> bool {
        self.hours & (1 << time.hour()) != 0
    }

    fn minute_matches(&self, time: &DateTime<Utc>) -> bool {
        self.minutes & (1 << time.minute()) != 0
    }

    /// Whether `time` (whole minute) is a slot.
    #[cfg(test)]
    fn matches(&self, time: &DateTime<Utc>) -> bool {
        self.month_matches(time)
            && self.day_matches(time)
            && self.hour_matches(time)
            && self.minute_matches(time)
    }

    /// The first slot strictly after `time`, within about five years
    /// (`None` for an expression that never matches, such as `0 0 31 2 *`).
    pub(crate) fn next_after(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut t = truncate_to_minute(time) + ChronoDuration::minutes(1);
        // Each step skips a whole month, day, hour or minute that cannot match.
        for _ in 0..200_000 {
            if !self.month_matches(&t) {
                let (year, month) = if t.month() == 12 {
                    (t.year() + 1, 1)
                } else {
                    (t.year(), t.month() + 1)
                };
                t = Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0).single()?;
            } else if !self.day_matches(&t) {
                t = start_of_day(t) + ChronoDuration::days(1);
            } else if !self.hour_matches(&t) {
                t = start_of_hour(t) + ChronoDuration::hours(1);
            } else if !self.minute_matches(&t) {
                t += ChronoDuration::minutes(1);
            } else {
                return Some(t);
            }
        }
        None
    }

    /// The latest slot at or before `time`.
    pub(crate) fn latest_at_or_before(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut t = truncate_to_minute(time);
        for _ in 0..200_000 {
            if !self.month_matches(&t) {
                let first = Utc
                    .with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
                    .single()?;
                t = first - ChronoDuration::minutes(1);
            } else if !self.day_matches(&t) {
                t = start_of_day(t) - ChronoDuration::minutes(1);
            } else if !self.hour_matches(&t) {
                t = start_of_hour(t) - ChronoDuration::minutes(1);
            } else if !self.minute_matches(&t) {
                t -= ChronoDuration::minutes(1);
            } else {
                return Some(t);
            }
        }
        None
    }
}

fn truncate_to_minute(time: DateTime<Utc>) -> DateTime<Utc> {
    time.with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(time)
}

fn start_of_hour(time: DateTime<Utc>) -> DateTime<Utc> {
    truncate_to_minute(time).with_minute(0).unwrap_or(time)
}

fn start_of_day(time: DateTime<Utc>) -> DateTime<Utc> {
    start_of_hour(time).with_hour(0).unwrap_or(time)
}

/// When a schedule's slots fall.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum When {
    Cron(CronExpr),
    /// Every period, at whole multiples of it since the Unix epoch (so every
    /// daemon computes the same slots).
    Every(Duration),
}

impl When {
    /// The latest slot at or before `time`.
    pub(crate) fn latest_at_or_before(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            When::Cron(expr) => expr.latest_at_or_before(time),
            When::Every(period) => {
                let period_ms = period.as_millis().max(1) as i64;
                let ms = time.timestamp_millis();
                Utc.timestamp_millis_opt(ms.div_euclid(period_ms) * period_ms)
                    .single()
            }
        }
    }

    /// The first slot strictly after `time`.
    pub(crate) fn next_after(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            When::Cron(expr) => expr.next_after(time),
            When::Every(period) => {
                let period_ms = period.as_millis().max(1) as i64;
                let ms = time.timestamp_millis();
                Utc.timestamp_millis_opt((ms.div_euclid(period_ms) + 1) * period_ms)
                    .single()
            }
        }
    }

    /// The slots to enqueue now: those after `after` (the last slot
    /// enqueued, or when the schedule was first seen) and at or before
    /// `now`, at most `catch_up` of them (the newest), oldest first.
    pub(crate) fn due_slots(
        &self,
        after: DateTime<Utc>,
        now: DateTime<Utc>,
        catch_up: u32,
    ) -> Vec<DateTime<Utc>> {
        let mut slots = Vec::new();
        let mut cursor = now;
        while slots.len() < catch_up as usize {
            let Some(slot) = self.latest_at_or_before(cursor) else {
                break;
            };
            if slot <= after {
                break;
            }
            slots.push(slot);
            cursor = slot - ChronoDuration::milliseconds(1);
        }
        slots.reverse();
        slots
    }
}

/// A slot as the text bound into SQL: RFC 3339 UTC with milliseconds, read
/// by both databases' time parsing.
pub(crate) fn slot_text(slot: DateTime<Utc>) -> String {
    slot.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

pub(crate) fn from_epoch_seconds(seconds: f64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt((seconds * 1000.0).round() as i64)
        .single()
        .unwrap_or_else(Utc::now)
}

/// One entry under `schedules:` as written in the config file.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileSchedule {
    #[serde(skip_serializing_if = "Option::is_none")]
    cron: Option<String>,
    #[serde(
        default,
        with = "serde_units::duration",
        skip_serializing_if = "Option::is_none"
    )]
    every: Option<Duration>,
    task: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    options: Option<serde_yaml::Value>,
    catch_up: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    try_limit: Option<i64>,
    priority: Option<i64>,
}

/// A schedule from the config: what to enqueue, and when.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Schedule {
    pub(crate) when: When,
    /// `cron: '…'` or `every: …`, as written.
    pub(crate) spec: String,
    /// The cron expression as written (`None` for `every:`).
    pub(crate) cron: Option<String>,
    pub(crate) task: String,
    /// YAML, as stored in the request's `options`.
    pub(crate) options: Option<String>,
    /// After downtime, at most this many missed slots are enqueued (the newest).
    pub(crate) catch_up: u32,
    pub(crate) try_limit: Option<i64>,
    pub(crate) priority: i64,
}

/// Validates the `schedules:` of a config file. Errors name the key, without
/// the file (the caller adds it).
pub(crate) fn resolve_schedules(
    raw: Option<std::collections::BTreeMap<String, FileSchedule>>,
) -> Result<std::collections::BTreeMap<String, Schedule>, String> {
    let mut schedules = std::collections::BTreeMap::new();
    for (name, raw) in raw.unwrap_or_default() {
        let key = |field: &str| format!("schedules.{name}.{field}");
        let spec = match (&raw.cron, raw.every) {
            (Some(expr), _) => format!("cron: '{expr}'"),
            (None, Some(every)) => format!("every: {}", crate::units::format_duration(every)),
            (None, None) => String::new(),
        };
        let when = match (&raw.cron, raw.every) {
            (Some(expr), None) => When::Cron(
                expr.parse()
                    .map_err(|error| format!("{}: {error}", key("cron")))?,
            ),
            (None, Some(every)) if every >= Duration::from_secs(1) => When::Every(every),
            (None, Some(_)) => return Err(format!("{}: must be at least 1s", key("every"))),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "schedules.{name}: give `cron` or `every`, not both"
                ))
            }
            (None, None) => return Err(format!("schedules.{name}: needs `cron` or `every`")),
        };
        if raw.task.trim().is_empty() {
            return Err(format!("{}: must name a task type", key("task")));
        }
        crate::request::name_fits(&format!("schedules.{name}"), &name)?;
        crate::request::name_fits(&key("task"), &raw.task)?;
        let options = match raw.options {
            None | Some(serde_yaml::Value::Null) => None,
            Some(serde_yaml::Value::String(text)) => Some(text),
            Some(value) => Some(
                serde_yaml::to_string(&value)
                    .map_err(|error| format!("{}: {error}", key("options")))?,
            ),
        };
        if raw.catch_up == Some(0) {
            return Err(format!("{}: must be at least 1", key("catch_up")));
        }
        if raw.try_limit.is_some_and(|limit| limit < 1) {
            return Err(format!("{}: must be at least 1", key("try_limit")));
        }
        schedules.insert(
            name,
            Schedule {
                when,
                spec,
                cron: raw.cron,
                task: raw.task,
                options,
                catch_up: raw.catch_up.unwrap_or(1),
                try_limit: raw.try_limit,
                priority: raw.priority.unwrap_or(0),
            },
        );
    }
    Ok(schedules)
}

impl Schedule {
    /// The schedule as a config file writes it (`config check`).
    pub(crate) fn as_written(&self) -> FileSchedule {
        FileSchedule {
            cron: self.cron.clone(),
            every: match self.when {
                When::Every(every) => Some(every),
                When::Cron(_) => None,
            },
            task: self.task.clone(),
            options: self.options.clone().map(serde_yaml::Value::String),
            catch_up: Some(self.catch_up),
            try_limit: self.try_limit,
            priority: Some(self.priority),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn cron(text: &str) -> CronExpr {
        text.parse().unwrap()
    }

    #[test]
    fn fields_parse_lists_ranges_steps_and_names() {
        let every_five = cron("*/5 * * * *");
        assert!(every_five.matches(&at("2026-01-01T00:05:00Z")));
        assert!(!every_five.matches(&at("2026-01-01T00:06:00Z")));
        let weekdays = cron("30 9 * * mon-fri");
        assert!(weekdays.matches(&at("2026-01-02T09:30:00Z"))); // a Friday
        assert!(!weekdays.matches(&at("2026-01-03T09:30:00Z"))); // a Saturday
        let sunday_as_seven = cron("0 0 * * 7");
        assert!(sunday_as_seven.matches(&at("2026-01-04T00:00:00Z")));
        let list = cron("0,15,45 1-3/2 * jan,JUL *");
        assert!(list.matches(&at("2026-07-10T03:45:00Z")));
        assert!(!list.matches(&at("2026-07-10T02:45:00Z")));
        assert!(!list.matches(&at("2026-08-10T03:45:00Z")));
        assert_eq!(cron("@hourly"), cron("0 * * * *"));
        assert!(cron("5/20 * * * *").matches(&at("2026-01-01T00:45:00Z")));
    }

    #[test]
    fn day_of_month_and_day_of_week_match_either_when_both_are_given() {
        let expr = cron("0 0 13 * fri");
        assert!(expr.matches(&at("2026-02-13T00:00:00Z"))); // the 13th (a Friday too)
        assert!(expr.matches(&at("2026-01-13T00:00:00Z"))); // the 13th, a Tuesday
        assert!(expr.matches(&at("2026-01-16T00:00:00Z"))); // a Friday
        assert!(!expr.matches(&at("2026-01-14T00:00:00Z")));
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        for (text, needle) in [
            ("* * * *", "4 fields"),
            ("60 * * * *", "minute 60 is outside 0-59"),
            ("* 24 * * *", "hour 24"),
            ("*/0 * * * *", "step must be at least 1"),
            ("5-1 * * * *", "runs backwards"),
            ("* * * foo *", "month `foo`"),
            ("@often", "unknown cron macro"),
            ("1,,2 * * * *", "empty list item"),
        ] {
            let error = text.parse::<CronExpr>().unwrap_err();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    #[test]
    fn next_and_latest_slots() {
        let expr = cron("*/5 * * * *");
        assert_eq!(
            expr.next_after(at("2026-01-01T00:04:59.9Z")),
            Some(at("2026-01-01T00:05:00Z"))
        );
        assert_eq!(
            expr.next_after(at("2026-01-01T00:05:00Z")),
            Some(at("2026-01-01T00:10:00Z"))
        );
        assert_eq!(
            expr.latest_at_or_before(at("2026-01-01T00:05:00Z")),
            Some(at("2026-01-01T00:05:00Z"))
        );
        assert_eq!(
            expr.latest_at_or_before(at("2026-01-01T00:04:59Z")),
            Some(at("2026-01-01T00:00:00Z"))
        );
        // Across a year, a leap day, and a month boundary backwards.
        assert_eq!(
            cron("0 12 29 2 *").next_after(at("2026-03-01T00:00:00Z")),
            Some(at("2028-02-29T12:00:00Z"))
        );
        assert_eq!(
            cron("0 0 1 * *").latest_at_or_before(at("2026-03-15T10:00:00Z")),
            Some(at("2026-03-01T00:00:00Z"))
        );
        assert_eq!(
            cron("59 23 31 12 *").latest_at_or_before(at("2026-06-01T00:00:00Z")),
            Some(at("2025-12-31T23:59:00Z"))
        );
        assert_eq!(
            cron("0 0 31 2 *").next_after(at("2026-01-01T00:00:00Z")),
            None
        );
    }

    #[test]
    fn every_slots_are_multiples_of_the_period() {
        let every = When::Every(Duration::from_secs(10));
        assert_eq!(
            every.latest_at_or_before(at("2026-01-01T00:00:27.5Z")),
            Some(at("2026-01-01T00:00:20Z"))
        );
        assert_eq!(
            every.next_after(at("2026-01-01T00:00:20Z")),
            Some(at("2026-01-01T00:00:30Z"))
        );
    }

    #[test]
    fn catch_up_enqueues_only_the_newest_missed_slots() {
        let every = When::Every(Duration::from_secs(1));
        let last = at("2026-01-01T00:00:00Z");
        let now = at("2026-01-01T00:00:30.4Z");
        assert_eq!(
            every.due_slots(last, now, 1),
            vec![at("2026-01-01T00:00:30Z")]
        );
        assert_eq!(
            every.due_slots(last, now, 3),
            vec![
                at("2026-01-01T00:00:28Z"),
                at("2026-01-01T00:00:29Z"),
                at("2026-01-01T00:00:30Z")
            ]
        );
        // Nothing new since the last slot.
        assert!(every
            .due_slots(at("2026-01-01T00:00:30Z"), now, 1)
            .is_empty());
        // Fewer missed slots than catch_up: each once.
        let cron = When::Cron(cron("*/5 * * * *"));
        assert_eq!(
            cron.due_slots(at("2026-01-01T00:00:00Z"), at("2026-01-01T00:12:00Z"), 10),
            vec![at("2026-01-01T00:05:00Z"), at("2026-01-01T00:10:00Z")]
        );
    }

    #[test]
    fn schedule_config_errors_name_the_key() {
        let dir = std::env::temp_dir().join(format!("taskrunner-cron-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let load = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            crate::config::Config::load_file(&path).map_err(|e| format!("{e:#}"))
        };
        let error = load(
            "a.yml",
            "schedules:\n  nightly:\n    cron: '0 3 * * *'\n    task: NoOp\n    cach_up: 2\n",
        )
        .unwrap_err();
        assert!(error.contains("cach_up"), "{error}");
        let error = load(
            "b.yml",
            "schedules:\n  nightly:\n    cron: '0 3 * *'\n    task: NoOp\n",
        )
        .unwrap_err();
        assert!(error.contains("schedules.nightly.cron"), "{error}");
        let error = load("c.yml", "schedules:\n  nightly:\n    task: NoOp\n").unwrap_err();
        assert!(error.contains("needs `cron` or `every`"), "{error}");
        let config = load(
            "d.yml",
            "schedules:\n  often:\n    every: 10s\n    task: NoOp\n    options: {created_from: cron}\n",
        )
        .unwrap();
        let often = &config.schedules["often"];
        assert_eq!(often.when, When::Every(Duration::from_secs(10)));
        assert_eq!(often.catch_up, 1);
        assert_eq!(often.options.as_deref(), Some("created_from: cron\n"));
    }
}
