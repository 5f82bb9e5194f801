//! Human durations on the command line: `500ms`, `10s`, `2m`, `1h` (a bare number is seconds).

use std::time::Duration;

/// Longest accepted duration (a year): far-future deadlines would overflow `Instant`.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `<integer><unit>` with unit `ms`, `s`, `m` or `h`; a bare integer means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "{text:?} is not a duration: expected a number followed by ms, s, m or h (e.g. 500ms, 10s, 2m)"
        ));
    }
    let amount: u64 = digits
        .parse()
        .map_err(|_| format!("{digits:?} is too large for a duration"))?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {text:?}: use ms, s, m or h"
            ))
        }
    };
    amount
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| format!("{text:?} is too long a duration (at most a year)"))
}

/// Like [`parse_duration`], refusing zero (a timeout or a measured time of nothing).
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!("{:?} must be longer than zero", text.trim()));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positive_durations_refuse_zero() {
        assert_eq!(parse_positive_duration("1ms"), Ok(Duration::from_millis(1)));
        for zero in ["0s", "0ms", "0"] {
            assert!(parse_positive_duration(zero).is_err(), "{zero:?}");
        }
        assert!(parse_positive_duration("x").is_err());
    }

    #[test]
    fn accepts_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration(" 3s "), Ok(Duration::from_secs(3)));
    }

    #[test]
    fn rejects_malformed_input() {
        for bad in ["", "s", "ms", "-1s", "1.5s", "10 s", "10sec", "1d", "ms10"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse_duration("99999999999999999999s").is_err());
        assert!(parse_duration(&format!("{}h", u64::MAX / 1000)).is_err());
        assert!(parse_duration("8760h").is_ok());
        assert!(parse_duration("8761h").is_err());
    }
}
