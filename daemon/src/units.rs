//! Durations (`500ms`, `10s`, `5m`, `1h`) and sizes (`64KiB`, `512MiB`) as
//! written in the config file and on the command line.

use std::time::Duration;

/// Splits `10s` into 10.0 and `s`.
fn number_and_unit(text: &str) -> Option<(f64, &str)> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    Some((number.parse().ok()?, unit.trim()))
}

/// Parses `0s`, `500ms`, `10s`, `1.5s`, `5m`, `1h`, `2d`; a bare number is
/// seconds. At most a hundred years (see [`within_longest`]).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    within_longest(seconds_of(text)?, text.trim())
}

/// The seconds that a duration's text gives, however many.
pub(crate) fn seconds_of(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let (value, unit) = number_and_unit(text)
        .ok_or_else(|| format!("invalid duration `{text}` (write e.g. 500ms, 10s, 5m, 1h)"))?;
    let seconds = match unit {
        "" | "s" | "sec" | "secs" => value,
        "ms" => value / 1000.0,
        "m" | "min" | "mins" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        _ => {
            return Err(format!(
                "invalid duration unit in `{text}` (use ms, s, m, h or d)"
            ))
        }
    };
    Ok(seconds)
}

/// The longest duration a config or command line may give: a hundred years
/// (a timeout, a grace, an interval). More is a mistake, and a time that far
/// ahead (`started + timeout`) would be past what the clock can hold.
const LONGEST_DURATION_SECS: f64 = 100.0 * 31_557_600.0;

/// `seconds` as a duration, if it is one and at most a hundred years.
pub(crate) fn within_longest(seconds: f64, text: &str) -> Result<Duration, String> {
    if seconds > LONGEST_DURATION_SECS {
        return Err(format!("duration `{text}` is more than 100 years"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("duration `{text}` is out of range"))
}

/// The longest a request may be told to wait (`enqueue --delay`, `--at`,
/// `--period`): fifty years. Further ahead is a mistake (a unit or a year
/// mistyped), and past the year 9999 SQLite's and MariaDB's times cannot
/// hold it: SQLite's arithmetic gives no time at all, which would run the
/// request at once. A 32-bit `period` column holds 68 years.
pub const LONGEST_WAIT: Duration = Duration::from_secs(50 * 31_557_600);

/// [`parse_duration`], at most [`LONGEST_WAIT`].
pub fn parse_wait(text: &str) -> Result<Duration, String> {
    let seconds = seconds_of(text)?;
    if seconds > LONGEST_WAIT.as_secs_f64() {
        return Err(format!("`{}` is more than 50 years", text.trim()));
    }
    within_longest(seconds, text.trim())
}

/// Parses `64KiB`, `512MiB`, `1GiB`, `100KB`, `4096` (bytes).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (value, unit) = number_and_unit(text)
        .ok_or_else(|| format!("invalid size `{text}` (write e.g. 64KiB, 512MiB)"))?;
    let multiplier: f64 = match unit {
        "" | "B" => 1.0,
        "KiB" | "K" | "k" => 1024.0,
        "MiB" | "M" => 1024.0 * 1024.0,
        "GiB" | "G" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => {
            return Err(format!(
                "invalid size unit in `{text}` (use KiB, MiB or GiB)"
            ))
        }
    };
    Ok((value * multiplier) as u64)
}

/// Renders a duration the way the config file writes it (`1h`, `90s`, `250ms`).
pub(crate) fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        "0s".to_string()
    } else if millis % 3_600_000 == 0 {
        format!("{}h", millis / 3_600_000)
    } else if millis % 60_000 == 0 {
        format!("{}m", millis / 60_000)
    } else if millis % 1000 == 0 {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

/// Parses a CPU share written as a percentage of one CPU (`50%`, `250%`)
/// into CPUs (0.5, 2.5).
pub(crate) fn parse_percent(text: &str) -> Result<f64, String> {
    parse_percent_within(text, 1.0..=100_000.0)
}

/// A percentage in `range` (of percents) as a fraction: `20%` → 0.2.
fn parse_percent_within(text: &str, range: std::ops::RangeInclusive<f64>) -> Result<f64, String> {
    let number = text
        .trim()
        .strip_suffix('%')
        .ok_or_else(|| format!("`{text}` is not a percentage (write e.g. 50% or 200%)"))?;
    match number.trim().parse::<f64>() {
        Ok(percent) if range.contains(&percent) => Ok(percent / 100.0),
        _ => Err(format!(
            "`{text}` is not a percentage between {}% and {}%",
            range.start(),
            range.end()
        )),
    }
}

/// A fraction written as a percentage from 0% to 100%: `20%` → 0.2.
pub(crate) fn parse_fraction(text: &str) -> Result<f64, String> {
    parse_percent_within(text, 0.0..=100.0)
}

/// `0.5` → `50%`.
pub(crate) fn format_percent(cpus: f64) -> String {
    format!("{}%", (cpus * 100.0 * 1000.0).round() / 1000.0)
}

/// Renders a size in the largest binary unit that divides it.
pub(crate) fn format_size(bytes: u64) -> String {
    for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= factor && bytes % factor == 0 {
            return format!("{}{unit}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

/// serde helpers so that config fields can be written as strings or
/// numbers, and are written back as the config file writes them (`10s`,
/// `64KiB`, `50%`): each module is a `#[serde(with = "…")]` for an `Option`.
pub(crate) mod serde_units {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum TextOrNumber {
        Text(String),
        Number(f64),
    }

    /// `10s`, `500ms`, `1h` (a bare number is seconds).
    pub(crate) mod duration {
        use super::*;
        use std::time::Duration;

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            Ok(match Option::<TextOrNumber>::deserialize(d)? {
                None => None,
                Some(TextOrNumber::Text(text)) => {
                    Some(crate::units::parse_duration(&text).map_err(serde::de::Error::custom)?)
                }
                Some(TextOrNumber::Number(seconds)) => Some(
                    crate::units::within_longest(seconds, &seconds.to_string())
                        .map_err(serde::de::Error::custom)?,
                ),
            })
        }

        pub(crate) fn serialize<S: Serializer>(
            value: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match value {
                Some(duration) => s.serialize_str(&crate::units::format_duration(*duration)),
                None => s.serialize_none(),
            }
        }
    }

    /// A percentage of one CPU (`50%`), as CPUs.
    pub(crate) mod percent {
        use super::*;

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<f64>, D::Error> {
            percentage(d, crate::units::parse_percent)
        }

        pub(crate) use super::write_percentage as serialize;
    }

    /// `0%` to `100%`, as a fraction (`retry_jitter`).
    pub(crate) mod fraction {
        use super::*;

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<f64>, D::Error> {
            percentage(d, crate::units::parse_fraction)
        }

        pub(crate) use super::write_percentage as serialize;
    }

    fn percentage<'de, D: Deserializer<'de>>(
        d: D,
        parse: fn(&str) -> Result<f64, String>,
    ) -> Result<Option<f64>, D::Error> {
        match Option::<TextOrNumber>::deserialize(d)? {
            None => Ok(None),
            Some(TextOrNumber::Text(text)) => {
                parse(&text).map(Some).map_err(serde::de::Error::custom)
            }
            Some(TextOrNumber::Number(number)) => Err(serde::de::Error::custom(format!(
                "`{number}` is not a percentage (write e.g. 50% or 200%)"
            ))),
        }
    }

    pub(crate) fn write_percentage<S: Serializer>(
        value: &Option<f64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(fraction) => s.serialize_str(&crate::units::format_percent(*fraction)),
            None => s.serialize_none(),
        }
    }

    /// `64KiB`, `512MiB`, `4096` (bytes).
    pub(crate) mod size {
        use super::*;

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<u64>, D::Error> {
            Ok(match Option::<TextOrNumber>::deserialize(d)? {
                None => None,
                Some(TextOrNumber::Text(text)) => {
                    Some(crate::units::parse_size(&text).map_err(serde::de::Error::custom)?)
                }
                Some(TextOrNumber::Number(bytes)) if bytes >= 0.0 => Some(bytes as u64),
                Some(TextOrNumber::Number(_)) => {
                    return Err(serde::de::Error::custom("a size cannot be negative"))
                }
            })
        }

        pub(crate) fn serialize<S: Serializer>(
            value: &Option<u64>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match value {
                Some(bytes) => s.serialize_str(&crate::units::format_size(*bytes)),
                None => s.serialize_none(),
            }
        }
    }
}

/// Sleeps until `deadline`, or for ever without one: a `select!` branch for
/// a deadline that may not be set.
pub(crate) async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quotas_are_percentages() {
        assert_eq!(parse_percent("50%").unwrap(), 0.5);
        assert_eq!(parse_percent(" 250 %").unwrap(), 2.5);
        assert!(parse_percent("50").is_err());
        assert!(parse_percent("0%").is_err());
        assert!(parse_percent("NaN%").is_err());
        assert_eq!(format_percent(0.5), "50%");
    }

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        assert!(parse_duration("ten")
            .unwrap_err()
            .contains("invalid duration"));
        assert!(parse_duration("10y").unwrap_err().contains("unit"));
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes_in_binary_units() {
        assert_eq!(parse_size("64KiB").unwrap(), 65_536);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["0s", "250ms", "90s", "5m", "1h"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
        assert_eq!(format_size(65_536), "64KiB");
        assert_eq!(format_size(100), "100B");
    }
}
