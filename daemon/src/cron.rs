//! Schedules from the config (`schedules:`): 5-field cron expressions read
//! on the clock of a time zone (UTC unless `time_zone:` names another) or a
//! fixed `every:` period, and when their slots fall due. The daemon's
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
//! Sunday, `@hourly`-style macros): it is small. It matches wall times;
//! [`ZonedCron`] turns them into instants in the schedule's time zone (the
//! IANA database compiled in by `chrono-tz`, so that every daemon of one
//! version computes the same slots), with cron's rules for the hours a
//! daylight-saving change skips or repeats.

use std::time::Duration;

use anyhow::Result;
use chrono::{
    DateTime, Datelike, Duration as ChronoDuration, LocalResult, NaiveDate, NaiveDateTime,
    TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;

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
    /// Whether day-of-month / day-of-week were written other than starting
    /// with `*` (as Vixie cron and cronie read them: `*/2` counts as `*`):
    /// when both are, a day matches if either matches; otherwise it must
    /// match both (a `*` field matches every day).
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
        let expr = CronExpr {
            minutes,
            hours: hours as u32,
            days_of_month: days_of_month as u32,
            months: months as u16,
            days_of_week: days_of_week as u8,
            dom_restricted: !fields[2].starts_with('*'),
            dow_restricted: !fields[4].starts_with('*'),
        };
        // A day its months never have (`0 0 31 2 *`) would never run, and
        // nothing would say so. Five years from a leap year's start find
        // every day that exists.
        let leap_year =
            NaiveDate::from_ymd_opt(2000, 1, 1).and_then(|day| day.and_hms_opt(0, 0, 0));
        if leap_year
            .and_then(|start| expr.first_at_or_after(start))
            .is_none()
        {
            return Err(format!(
                "`{text}` never runs: no month it names has a day it names"
            ));
        }
        Ok(expr)
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
            // A step past the field's range is allowed (the first value
            // only); adding it may not wrap round to a second one.
            match current.checked_add(step.unwrap_or(1)) {
                Some(next) => current = next,
                None => break,
            }
        }
    }
    Ok(set)
}

impl CronExpr {
    fn day_matches(&self, time: &NaiveDateTime) -> bool {
        let dom = self.days_of_month & (1 << time.day()) != 0;
        let dow = self.days_of_week & (1 << time.weekday().num_days_from_sunday()) != 0;
        if self.dom_restricted && self.dow_restricted {
            dom || dow
        } else {
            dom && dow
        }
    }

    fn month_matches(&self, time: &NaiveDateTime) -> bool {
        self.months & (1 << time.month()) != 0
    }

    fn hour_matches(&self, time: &NaiveDateTime) -> bool {
        self.hours & (1 << time.hour()) != 0
    }

    fn minute_matches(&self, time: &NaiveDateTime) -> bool {
        self.minutes & (1 << time.minute()) != 0
    }

    /// Whether `time` (a whole minute of wall time) is a slot.
    #[cfg(test)]
    fn matches(&self, time: &NaiveDateTime) -> bool {
        self.month_matches(time)
            && self.day_matches(time)
            && self.hour_matches(time)
            && self.minute_matches(time)
    }

    /// Whether the expression runs in every hour of the day (`*` in the
    /// hour field): such a schedule keeps to the clock across a change of
    /// the time zone's offset (see [`ZonedCron`]).
    fn every_hour(&self) -> bool {
        self.hours == (1 << 24) - 1
    }

    /// The first matching wall time at or after `time` (a whole minute),
    /// within about five years (`None` for an expression that never
    /// matches, such as `0 0 31 2 *`).
    fn first_at_or_after(&self, time: NaiveDateTime) -> Option<NaiveDateTime> {
        let mut t = time;
        // Each step skips a whole month, day, hour or minute that cannot match.
        for _ in 0..200_000 {
            if !self.month_matches(&t) {
                let (year, month) = if t.month() == 12 {
                    (t.year() + 1, 1)
                } else {
                    (t.year(), t.month() + 1)
                };
                t = NaiveDate::from_ymd_opt(year, month, 1)?.and_hms_opt(0, 0, 0)?;
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

    /// The last matching wall time at or before `time` (a whole minute).
    fn last_at_or_before(&self, time: NaiveDateTime) -> Option<NaiveDateTime> {
        let mut t = time;
        for _ in 0..200_000 {
            if !self.month_matches(&t) {
                let first =
                    NaiveDate::from_ymd_opt(t.year(), t.month(), 1)?.and_hms_opt(0, 0, 0)?;
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

fn truncate_to_minute(time: NaiveDateTime) -> NaiveDateTime {
    time.with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(time)
}

fn start_of_hour(time: NaiveDateTime) -> NaiveDateTime {
    truncate_to_minute(time).with_minute(0).unwrap_or(time)
}

fn start_of_day(time: NaiveDateTime) -> NaiveDateTime {
    start_of_hour(time).with_hour(0).unwrap_or(time)
}

/// A cron expression read on the wall clock of a time zone (UTC unless the
/// schedule names one): its slots are instants.
///
/// Where the zone's clock jumps, a schedule keeps to one of two rules, as
/// cron does (cronie's "Daylight Saving Time and other time changes"):
/// - An expression that runs every hour (`*` in the hour field, such as
///   `*/15 * * * *`) keeps to the clock: an hour the clock skips has no
///   slot, an hour it repeats has its slots twice. Its slots stay evenly
///   spaced in real time.
/// - An expression of given hours (`30 2 * * *`) runs once on each day it
///   names: a wall time the clock skips runs at the jump (the first minute
///   after the gap), one it repeats runs the first time only.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ZonedCron {
    pub(crate) expr: CronExpr,
    pub(crate) zone: Tz,
}

/// Where one matching wall time falls: the instants it names in the zone
/// (`earliest`, `latest`, the same unless the clock repeats it), and those
/// of them that are slots.
struct Placed {
    earliest: DateTime<Utc>,
    latest: DateTime<Utc>,
    slots: [Option<DateTime<Utc>>; 2],
}

/// How far from a wall time another wall time's instants may fall: the
/// largest jump of a clock in today's time zone database is two hours.
fn most_a_clock_jumps() -> ChronoDuration {
    ChronoDuration::hours(3)
}

impl ZonedCron {
    fn wall_time(&self, time: DateTime<Utc>) -> NaiveDateTime {
        truncate_to_minute(self.zone.from_utc_datetime(&time.naive_utc()).naive_local())
    }

    fn place(&self, wall: NaiveDateTime) -> Option<Placed> {
        let utc = |time: DateTime<Tz>| time.with_timezone(&Utc);
        Some(match self.zone.from_local_datetime(&wall) {
            LocalResult::Single(time) => Placed {
                earliest: utc(time),
                latest: utc(time),
                slots: [Some(utc(time)), None],
            },
            LocalResult::Ambiguous(first, second) => Placed {
                earliest: utc(first),
                latest: utc(second),
                slots: [
                    Some(utc(first)),
                    self.expr.every_hour().then(|| utc(second)),
                ],
            },
            LocalResult::None => {
                let jump = self.end_of_gap(wall)?;
                Placed {
                    earliest: jump,
                    latest: jump,
                    slots: [(!self.expr.every_hour()).then_some(jump), None],
                }
            }
        })
    }

    /// The instant the clock jumped over `wall`: that of the first wall
    /// minute after it that exists.
    fn end_of_gap(&self, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
        let mut t = wall;
        for _ in 0..25 * 60 {
            t += ChronoDuration::minutes(1);
            if let Some(time) = self.zone.from_local_datetime(&t).earliest() {
                return Some(time.with_timezone(&Utc));
            }
        }
        None
    }

    /// The first slot strictly after `time`. Wall times are walked forward
    /// from a little before `time`'s (a repeated hour's second pass has
    /// earlier wall times than instants before it) until one's earliest
    /// instant is past the best slot found.
    pub(crate) fn next_after(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut wall = self.wall_time(time) - most_a_clock_jumps();
        let mut best: Option<DateTime<Utc>> = None;
        while let Some(found) = self.expr.first_at_or_after(wall) {
            if let Some(placed) = self.place(found) {
                if best.is_some_and(|best| placed.earliest >= best) {
                    break;
                }
                for slot in placed.slots.into_iter().flatten() {
                    if slot > time && best.is_none_or(|best| slot < best) {
                        best = Some(slot);
                    }
                }
            }
            wall = found + ChronoDuration::minutes(1);
        }
        best
    }

    /// The latest slot at or before `time`: the same walk, backwards.
    pub(crate) fn latest_at_or_before(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut wall = self.wall_time(time) + most_a_clock_jumps();
        let mut best: Option<DateTime<Utc>> = None;
        while let Some(found) = self.expr.last_at_or_before(wall) {
            if let Some(placed) = self.place(found) {
                if best.is_some_and(|best| placed.latest <= best) {
                    break;
                }
                for slot in placed.slots.into_iter().flatten() {
                    if slot <= time && best.is_none_or(|best| slot > best) {
                        best = Some(slot);
                    }
                }
            }
            wall = found - ChronoDuration::minutes(1);
        }
        best
    }
}

/// When a schedule's slots fall.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum When {
    Cron(ZonedCron),
    /// Every period, at whole multiples of it since the Unix epoch (so every
    /// daemon computes the same slots).
    Every(Duration),
}

impl When {
    /// The latest slot at or before `time`.
    pub(crate) fn latest_at_or_before(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            When::Cron(cron) => cron.latest_at_or_before(time),
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
            When::Cron(cron) => cron.next_after(time),
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

/// A slot as a person reads it, in UTC: `2026-03-08 07:00:00 UTC`.
pub(crate) fn show_utc(slot: DateTime<Utc>) -> String {
    slot.format("%Y-%m-%d %H:%M:%S UTC").to_string()
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
    /// The time zone whose clock `cron` reads (an IANA name such as
    /// `Europe/Berlin`); UTC when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    time_zone: Option<String>,
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
    /// `cron: '…'` (with its `time_zone`, if given) or `every: …`, as written.
    pub(crate) spec: String,
    /// The cron expression as written (`None` for `every:`).
    pub(crate) cron: Option<String>,
    /// The time zone as written.
    pub(crate) time_zone: Option<String>,
    pub(crate) task: String,
    /// YAML, as stored in the request's `options`.
    pub(crate) options: Option<String>,
    /// After downtime, at most this many missed slots are enqueued (the newest).
    pub(crate) catch_up: u32,
    pub(crate) try_limit: Option<i64>,
    pub(crate) priority: i64,
}

/// The IANA time zone of this name, its case aside (`europe/berlin` is
/// Europe/Berlin).
fn zone_named(name: &str) -> Option<Tz> {
    let name = name.trim();
    name.parse::<Tz>().ok().or_else(|| {
        chrono_tz::TZ_VARIANTS
            .iter()
            .copied()
            .find(|zone| zone.name().eq_ignore_ascii_case(name))
    })
}

/// Validates the `schedules:` of a config file. Errors name the key, without
/// the file (the caller adds it).
pub(crate) fn resolve_schedules(
    raw: Option<std::collections::BTreeMap<String, FileSchedule>>,
) -> Result<std::collections::BTreeMap<String, Schedule>, String> {
    let mut schedules = std::collections::BTreeMap::new();
    for (name, raw) in raw.unwrap_or_default() {
        let key = |field: &str| format!("schedules.{name}.{field}");
        let zone = match &raw.time_zone {
            None => Tz::UTC,
            Some(_) if raw.cron.is_none() && raw.every.is_some() => {
                return Err(format!(
                    "{}: applies to `cron` only (`every` slots are whole multiples of the period since the epoch)",
                    key("time_zone")
                ))
            }
            Some(name) => zone_named(name).ok_or_else(|| {
                format!(
                    "{}: unknown time zone `{name}` (an IANA name such as Europe/Berlin or America/New_York, or UTC)",
                    key("time_zone")
                )
            })?,
        };
        // The zone as the database names it, however it was written.
        let time_zone = raw.time_zone.as_ref().map(|_| zone.name().to_string());
        let spec = match (&raw.cron, raw.every, &time_zone) {
            (Some(expr), _, None) => format!("cron: '{expr}'"),
            (Some(expr), _, Some(zone)) => format!("cron: '{expr}', time_zone: {zone}"),
            (None, Some(every), _) => format!("every: {}", crate::units::format_duration(every)),
            (None, None, _) => String::new(),
        };
        let when = match (&raw.cron, raw.every) {
            (Some(expr), None) => When::Cron(ZonedCron {
                expr: expr
                    .parse()
                    .map_err(|error| format!("{}: {error}", key("cron")))?,
                zone,
            }),
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
            // Each slot's row would be REJECTED for it.
            Some(serde_yaml::Value::String(text)) => {
                crate::request::check_options(text.as_bytes())
                    .map_err(|error| format!("{}: not valid YAML: {error}", key("options")))?;
                Some(text)
            }
            Some(value) => Some(
                serde_yaml::to_string(&value)
                    .map_err(|error| format!("{}: {error}", key("options")))?,
            ),
        };
        if raw.catch_up == Some(0) {
            return Err(format!("{}: must be at least 1", key("catch_up")));
        }
        // The tables' columns are 32-bit integers: a larger value was
        // refused at each slot's insert, taken for an outage, and the
        // schedules after this one were never reached.
        if raw.try_limit.is_some_and(|limit| limit < 1) {
            return Err(format!("{}: must be at least 1", key("try_limit")));
        }
        if raw
            .try_limit
            .is_some_and(|limit| limit > crate::request::MAX_TRY_LIMIT)
        {
            return Err(format!(
                "{}: must be at most {}",
                key("try_limit"),
                crate::request::MAX_TRY_LIMIT
            ));
        }
        let priorities = crate::request::PRIORITIES;
        if raw
            .priority
            .is_some_and(|priority| !priorities.contains(&priority))
        {
            return Err(format!(
                "{}: must be from {} to {}",
                key("priority"),
                priorities.start(),
                priorities.end()
            ));
        }
        schedules.insert(
            name,
            Schedule {
                when,
                spec,
                cron: raw.cron,
                time_zone,
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
    /// A slot as a person reads it: UTC, and on the clock of the schedule's
    /// time zone when it names one (`2026-03-08 07:00:00 UTC (03:00 EDT)`).
    pub(crate) fn show_slot(&self, slot: DateTime<Utc>) -> String {
        let utc = show_utc(slot);
        match &self.when {
            When::Cron(ZonedCron { zone, .. }) if *zone != Tz::UTC => {
                let local = slot.with_timezone(zone);
                if local.date_naive() == slot.date_naive() {
                    format!("{utc} ({})", local.format("%H:%M %Z"))
                } else {
                    format!("{utc} ({})", local.format("%Y-%m-%d %H:%M %Z"))
                }
            }
            _ => utc,
        }
    }

    /// The schedule as a config file writes it (`config check`).
    pub(crate) fn as_written(&self) -> FileSchedule {
        FileSchedule {
            cron: self.cron.clone(),
            every: match self.when {
                When::Every(every) => Some(every),
                When::Cron(_) => None,
            },
            time_zone: self.time_zone.clone(),
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

    /// A wall time, written as UTC.
    fn wall(text: &str) -> NaiveDateTime {
        at(text).naive_utc()
    }

    fn cron(text: &str) -> CronExpr {
        text.parse().unwrap()
    }

    fn in_zone(text: &str, zone: Tz) -> ZonedCron {
        ZonedCron {
            expr: cron(text),
            zone,
        }
    }

    fn utc(text: &str) -> ZonedCron {
        in_zone(text, Tz::UTC)
    }

    #[test]
    fn fields_parse_lists_ranges_steps_and_names() {
        let every_five = cron("*/5 * * * *");
        assert!(every_five.matches(&wall("2026-01-01T00:05:00Z")));
        assert!(!every_five.matches(&wall("2026-01-01T00:06:00Z")));
        let weekdays = cron("30 9 * * mon-fri");
        assert!(weekdays.matches(&wall("2026-01-02T09:30:00Z"))); // a Friday
        assert!(!weekdays.matches(&wall("2026-01-03T09:30:00Z"))); // a Saturday
        let sunday_as_seven = cron("0 0 * * 7");
        assert!(sunday_as_seven.matches(&wall("2026-01-04T00:00:00Z")));
        let list = cron("0,15,45 1-3/2 * jan,JUL *");
        assert!(list.matches(&wall("2026-07-10T03:45:00Z")));
        assert!(!list.matches(&wall("2026-07-10T02:45:00Z")));
        assert!(!list.matches(&wall("2026-08-10T03:45:00Z")));
        assert_eq!(cron("@hourly"), cron("0 * * * *"));
        assert!(cron("5/20 * * * *").matches(&wall("2026-01-01T00:45:00Z")));
    }

    #[test]
    fn day_of_month_and_day_of_week_match_either_when_both_are_given() {
        let expr = cron("0 0 13 * fri");
        assert!(expr.matches(&wall("2026-02-13T00:00:00Z"))); // the 13th (a Friday too)
        assert!(expr.matches(&wall("2026-01-13T00:00:00Z"))); // the 13th, a Tuesday
        assert!(expr.matches(&wall("2026-01-16T00:00:00Z"))); // a Friday
        assert!(!expr.matches(&wall("2026-01-14T00:00:00Z")));
    }

    #[test]
    fn a_day_field_starting_with_a_star_is_read_as_vixie_cron_reads_it() {
        // `*/2` counts as `*`: odd days that are Mondays, not either.
        let odd_mondays = cron("0 0 */2 * mon");
        assert!(odd_mondays.matches(&wall("2026-01-05T00:00:00Z"))); // the 5th, a Monday
        assert!(!odd_mondays.matches(&wall("2026-01-12T00:00:00Z"))); // a Monday, the 12th
        assert!(!odd_mondays.matches(&wall("2026-01-03T00:00:00Z"))); // the 3rd, a Saturday
        let odd_days = cron("0 0 */2 * *");
        assert!(odd_days.matches(&wall("2026-01-03T00:00:00Z")));
        assert!(!odd_days.matches(&wall("2026-01-04T00:00:00Z")));
    }

    #[test]
    fn schedule_numbers_past_the_tables_integer_columns_are_refused() {
        for (field, value, needle) in [
            (
                "try_limit",
                "2147483648",
                "schedules.a.try_limit: must be at most 2147483647",
            ),
            (
                "priority",
                "2147483648",
                "schedules.a.priority: must be from -2147483647 to 2147483647",
            ),
            (
                "priority",
                "-2147483648",
                "schedules.a.priority: must be from",
            ),
        ] {
            let raw =
                serde_yaml::from_str(&format!("a:\n  every: 1s\n  task: T\n  {field}: {value}\n"))
                    .unwrap();
            let error = resolve_schedules(Some(raw)).unwrap_err();
            assert!(error.contains(needle), "{error}");
        }
        let raw = serde_yaml::from_str(
            "a:\n  every: 1s\n  task: T\n  try_limit: 2147483647\n  priority: -2147483647\n",
        )
        .unwrap();
        assert!(resolve_schedules(Some(raw)).is_ok());
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
            // Before, these passed and never ran.
            ("0 0 31 2 *", "never runs"),
            ("0 0 30,31 2 *", "never runs"),
            ("0 0 31 4,6,9,11 *", "never runs"),
        ] {
            let error = text.parse::<CronExpr>().unwrap_err();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    /// A step past the field's range gives its first value only; adding a
    /// step near `u32::MAX` overflowed (a debug build panicked reading the
    /// config, a release build wrapped round to more minutes).
    #[test]
    fn a_step_past_the_fields_range_gives_its_first_value_only() {
        for text in [
            "30/4294967295 * * * *",
            "30/4294967290 * * * *",
            "30/100 * * * *",
        ] {
            let expr = cron(text);
            let minutes: Vec<u32> = (0..60)
                .filter(|minute| expr.matches(&wall(&format!("2026-01-01T00:{minute:02}:00Z"))))
                .collect();
            assert_eq!(minutes, [30], "{text}");
        }
    }

    /// `options:` given as a string is the row's YAML as it is: text that
    /// is not YAML made every slot's row REJECTED.
    #[test]
    fn schedule_options_given_as_text_must_be_yaml() {
        let raw =
            serde_yaml::from_str("a:\n  every: 1s\n  task: T\n  options: 'size: [1, 2'\n").unwrap();
        let error = resolve_schedules(Some(raw)).unwrap_err();
        assert!(
            error.contains("schedules.a.options: not valid YAML"),
            "{error}"
        );
        let raw = serde_yaml::from_str("a:\n  every: 1s\n  task: T\n  options: 'size: [1, 2]'\n")
            .unwrap();
        assert!(resolve_schedules(Some(raw)).is_ok());
    }

    #[test]
    fn next_and_latest_slots() {
        let expr = utc("*/5 * * * *");
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
            utc("0 12 29 2 *").next_after(at("2026-03-01T00:00:00Z")),
            Some(at("2028-02-29T12:00:00Z"))
        );
        assert_eq!(
            utc("0 0 1 * *").latest_at_or_before(at("2026-03-15T10:00:00Z")),
            Some(at("2026-03-01T00:00:00Z"))
        );
        assert_eq!(
            utc("59 23 31 12 *").latest_at_or_before(at("2026-06-01T00:00:00Z")),
            Some(at("2025-12-31T23:59:00Z"))
        );
        assert_eq!(
            utc("0 0 29 2 *").next_after(at("2026-01-01T00:00:00Z")),
            Some(at("2028-02-29T00:00:00Z"))
        );
    }

    /// New York's clock skips 02:00–03:00 on 8 March 2026 (07:00 UTC) and
    /// repeats 01:00–02:00 on 1 November 2026 (EDT until 06:00 UTC, then EST).
    #[test]
    fn a_daylight_saving_change_runs_a_daily_slot_once_and_keeps_hourly_ones_to_the_clock() {
        let new_york = chrono_tz::America::New_York;
        let daily = in_zone("30 2 * * *", new_york);
        // 02:30 EST, then the skipped 02:30 at the jump (03:00 EDT), then 02:30 EDT.
        assert_eq!(
            daily.next_after(at("2026-03-07T00:00:00Z")),
            Some(at("2026-03-07T07:30:00Z"))
        );
        assert_eq!(
            daily.next_after(at("2026-03-07T07:30:00Z")),
            Some(at("2026-03-08T07:00:00Z"))
        );
        assert_eq!(
            daily.next_after(at("2026-03-08T07:00:00Z")),
            Some(at("2026-03-09T06:30:00Z"))
        );
        assert_eq!(
            daily.latest_at_or_before(at("2026-03-09T06:29:00Z")),
            Some(at("2026-03-08T07:00:00Z"))
        );
        // 01:30 comes twice on 1 November: the first (EDT) only.
        let repeated = in_zone("30 1 * * *", new_york);
        assert_eq!(
            repeated.next_after(at("2026-11-01T00:00:00Z")),
            Some(at("2026-11-01T05:30:00Z"))
        );
        assert_eq!(
            repeated.next_after(at("2026-11-01T05:30:00Z")),
            Some(at("2026-11-02T06:30:00Z"))
        );
        assert_eq!(
            repeated.latest_at_or_before(at("2026-11-02T06:00:00Z")),
            Some(at("2026-11-01T05:30:00Z"))
        );
        // Every half hour stays every half hour of real time: both passes
        // of the repeated hour, none in the skipped one.
        let half_hourly = When::Cron(in_zone("*/30 * * * *", new_york));
        assert_eq!(
            half_hourly.due_slots(at("2026-11-01T04:45:00Z"), at("2026-11-01T07:00:00Z"), 10),
            ["05:00", "05:30", "06:00", "06:30", "07:00"]
                .map(|time| at(&format!("2026-11-01T{time}:00Z")))
        );
        assert_eq!(
            half_hourly.due_slots(at("2026-03-08T05:45:00Z"), at("2026-03-08T08:00:00Z"), 10),
            ["06:00", "06:30", "07:00", "07:30", "08:00"]
                .map(|time| at(&format!("2026-03-08T{time}:00Z")))
        );
        let mut t = at("2026-11-01T04:45:00Z");
        for expected in ["05:00", "05:30", "06:00", "06:30", "07:00"] {
            t = half_hourly.next_after(t).unwrap();
            assert_eq!(t, at(&format!("2026-11-01T{expected}:00Z")));
        }
        // A day the clock skips whole (Samoa, 30 December 2011): a daily
        // slot on it runs at the jump, once.
        let samoa = in_zone("0 12 * * *", chrono_tz::Pacific::Apia);
        assert_eq!(
            samoa.next_after(at("2011-12-29T22:00:00Z")),
            Some(at("2011-12-30T10:00:00Z"))
        );
    }

    #[test]
    fn a_zone_off_the_hour_moves_every_slot_by_its_offset() {
        // Kathmandu is UTC+05:45: its midnight is 18:15 UTC the day before.
        let midnight = in_zone("0 0 * * *", chrono_tz::Asia::Kathmandu);
        assert_eq!(
            midnight.next_after(at("2026-06-01T12:00:00Z")),
            Some(at("2026-06-01T18:15:00Z"))
        );
        assert_eq!(
            midnight.latest_at_or_before(at("2026-06-01T18:14:59Z")),
            Some(at("2026-05-31T18:15:00Z"))
        );
        assert_eq!(
            utc("0 0 * * *").latest_at_or_before(at("2026-06-01T18:14:59Z")),
            Some(at("2026-06-01T00:00:00Z"))
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
        let cron = When::Cron(utc("*/5 * * * *"));
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
        assert_eq!(zone_named("europe/berlin"), Some(chrono_tz::Europe::Berlin));
        assert_eq!(zone_named(" UTC "), Some(Tz::UTC));
        let error = load(
            "e.yml",
            "schedules:\n  nightly:\n    cron: '0 3 * * *'\n    time_zone: Europe/Berln\n    task: NoOp\n",
        )
        .unwrap_err();
        assert!(
            error.contains("schedules.nightly.time_zone: unknown time zone `Europe/Berln`"),
            "{error}"
        );
        let error = load(
            "f.yml",
            "schedules:\n  often:\n    every: 1h\n    time_zone: Europe/Berlin\n    task: NoOp\n",
        )
        .unwrap_err();
        assert!(
            error.contains("schedules.often.time_zone: applies to `cron` only"),
            "{error}"
        );
        let zoned = load(
            "g.yml",
            "schedules:\n  nightly:\n    cron: '0 3 * * *'\n    time_zone: europe/berlin\n    task: NoOp\n",
        )
        .unwrap();
        let nightly = &zoned.schedules["nightly"];
        assert_eq!(nightly.spec, "cron: '0 3 * * *', time_zone: Europe/Berlin");
        assert_eq!(
            nightly.when,
            When::Cron(in_zone("0 3 * * *", chrono_tz::Europe::Berlin))
        );
        let often = &config.schedules["often"];
        assert_eq!(often.when, When::Every(Duration::from_secs(10)));
        assert_eq!(often.catch_up, 1);
        assert_eq!(often.options.as_deref(), Some("created_from: cron\n"));
    }
}
