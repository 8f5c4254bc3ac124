//! Human-readable durations (`250ms`, `10s`, `5m`, `1h30m`) and sizes
//! (`512`, `64KiB`, `1MiB`, `1GiB`), as every option of idemproxy reads them.
//!
//! ```
//! use std::time::Duration;
//! use idemproxy::units::{parse_duration, parse_size};
//! assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
//! assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
//! ```

use std::fmt::Write as _;
use std::time::Duration;

/// The longest duration any option accepts: 365 days (`8760h`). Every
/// duration of idemproxy is read by [`parse_duration`], so no configured
/// duration can overflow an `Instant` when added to the current time.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// What is expected of a duration, for error messages.
pub const DURATION_EXPECTED: &str =
    "a duration such as 250ms, 10s, 5m or 1h30m (units: ms, s, m, h), at most 8760h (365 days)";
/// What is expected of a size, for error messages.
pub const SIZE_EXPECTED: &str =
    "a size such as 512, 64KiB, 1MiB or 2GiB (units: B, KiB, MiB, GiB, KB, MB, GB)";

/// Parses a duration made of one or more `<number><unit>` parts. A bare `0`
/// is zero; more than [`MAX_DURATION`] is refused.
pub fn parse_duration(text: &str) -> Result<Duration, &'static str> {
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(DURATION_EXPECTED);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(DURATION_EXPECTED);
        }
        let value: u64 = rest[..digits].parse().map_err(|_| DURATION_EXPECTED)?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.checked_mul(60).ok_or(DURATION_EXPECTED)?),
            "h" => Duration::from_secs(value.checked_mul(3600).ok_or(DURATION_EXPECTED)?),
            _ => return Err(DURATION_EXPECTED),
        };
        total = total
            .checked_add(part)
            .filter(|t| *t <= MAX_DURATION)
            .ok_or(DURATION_EXPECTED)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Parses a size in bytes: a number with an optional binary (`KiB`) or decimal (`KB`) unit.
pub fn parse_size(text: &str) -> Result<u64, &'static str> {
    let s = text.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return Err(SIZE_EXPECTED);
    }
    let value: u64 = s[..digits].parse().map_err(|_| SIZE_EXPECTED)?;
    let factor: u64 = match s[digits..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(SIZE_EXPECTED),
    };
    value.checked_mul(factor).ok_or(SIZE_EXPECTED)
}

/// Formats a duration the way [`parse_duration`] reads it (`1m30s`, `250ms`).
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0".into();
    }
    let mut out = String::new();
    for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= size {
            let _ = write!(out, "{}{unit}", ms / size);
            ms %= size;
        }
    }
    out
}

/// Formats a size the way [`parse_size`] reads it, using the largest exact binary unit.
pub fn format_size(bytes: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= size && bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_documented() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "10x", "-1s", "1.5s", "10 s", "ms10"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn durations_are_capped_at_one_year() {
        assert_eq!(parse_duration("8760h"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("525600m"), Ok(MAX_DURATION));
        assert_eq!(format_duration(MAX_DURATION), "8760h");
        assert!(DURATION_EXPECTED.contains(&format_duration(MAX_DURATION)));
        for long in [
            "8760h1ms",
            "8761h",
            "3000000000000000h",
            "18446744073709551615s",
            "8760h8760h",
        ] {
            assert_eq!(parse_duration(long), Err(DURATION_EXPECTED), "{long}");
        }
    }

    #[test]
    fn sizes_read_as_documented() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2KB"), Ok(2000));
        for bad in ["", "KiB", "1.5MiB", "-1", "1XB", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["250ms", "10s", "5m", "1h30m", "1m0s250ms"] {
            let d = parse_duration(text).unwrap();
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_size(1 << 20), "1MiB");
        assert_eq!(format_size(1000), "1000");
    }
}
