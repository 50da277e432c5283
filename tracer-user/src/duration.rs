//! Durations on the command line (`30ms`, `1.5ms`, `2s`) and in messages.

use std::{fmt, str::FromStr, time::Duration};

/// A duration given as a decimal number and a unit: `ns`, `us`, `ms`, `s` or `m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CliDuration(pub Duration);

/// Units accepted by [`CliDuration`], with their length in nanoseconds.
const UNITS: &[(&str, f64)] = &[
    ("ns", 1.0),
    ("us", 1e3),
    ("µs", 1e3),
    ("ms", 1e6),
    ("s", 1e9),
    ("m", 60e9),
];

impl FromStr for CliDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("invalid duration `{text}`: missing unit (ns, us, ms, s or m), as in `30ms`"))?;
        let (number, unit) = text.split_at(split);
        let scale = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, scale)| *scale)
            .ok_or_else(|| format!("invalid duration `{text}`: unknown unit `{unit}` (use ns, us, ms, s or m)"))?;
        let value: f64 = number
            .parse()
            .map_err(|_| format!("invalid duration `{text}`: `{number}` is not a number"))?;
        let nanos = value * scale;
        if !nanos.is_finite() || nanos < 1.0 || nanos > u64::MAX as f64 {
            return Err(format!("invalid duration `{text}`: must be at least 1ns"));
        }
        Ok(Self(Duration::from_nanos(nanos.round() as u64)))
    }
}

/// Formats nanoseconds with three significant digits and a unit, as `1.40ms`.
pub struct Nanos(pub u64);

impl fmt::Display for Nanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0 as f64;
        let (value, unit) = if ns >= 1e9 {
            (ns / 1e9, "s")
        } else if ns >= 1e6 {
            (ns / 1e6, "ms")
        } else if ns >= 1e3 {
            (ns / 1e3, "us")
        } else {
            return write!(f, "{}ns", self.0);
        };
        let decimals = if value >= 100.0 { 0 } else if value >= 10.0 { 1 } else { 2 };
        write!(f, "{value:.decimals$}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<u64, String> {
        text.parse::<CliDuration>().map(|d| d.0.as_nanos() as u64)
    }

    #[test]
    fn duration_accepts_units() {
        assert_eq!(parse("30ms"), Ok(30_000_000));
        assert_eq!(parse("1.5ms"), Ok(1_500_000));
        assert_eq!(parse("2s"), Ok(2_000_000_000));
        assert_eq!(parse("250us"), Ok(250_000));
        assert_eq!(parse("1m"), Ok(60_000_000_000));
        assert_eq!(parse("100ns"), Ok(100));
    }

    #[test]
    fn duration_rejects_bad_input() {
        for text in ["30", "ms", "1.5.2ms", "3h", "-1s", "0ms", ""] {
            let error = parse(text).expect_err(text);
            assert!(error.starts_with("invalid duration"), "{text}: {error}");
        }
    }

    #[test]
    fn nanos_display_three_digits() {
        assert_eq!(Nanos(1_400_000).to_string(), "1.40ms");
        assert_eq!(Nanos(203_456_789).to_string(), "203ms");
        assert_eq!(Nanos(12_345).to_string(), "12.3us");
        assert_eq!(Nanos(2_500_000_000).to_string(), "2.50s");
        assert_eq!(Nanos(999).to_string(), "999ns");
    }
}
