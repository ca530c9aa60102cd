//! Wall-clock time as the node sees it: Unix milliseconds, and RFC 3339 text
//! for the API and exports.
//!
//! Everything that stamps or compares times (claims, sale windows, tokens,
//! exports) goes through here, so there is one definition of "now" and one
//! text format. It imports nothing of the node.

use std::time::{SystemTime, UNIX_EPOCH};

use time::{format_description::well_known::Rfc3339, OffsetDateTime};

/// The current wall-clock time in Unix milliseconds.
///
/// Read straight from `SystemTime`: every request reads it several times,
/// and going through `OffsetDateTime` split the time into a calendar date
/// and divided an `i128` only to throw both away (about 1% of a refused
/// claim's CPU samples).
pub fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64).saturating_mul(1000) + i64::from(d.subsec_millis()),
        // A clock set before 1970: negative, truncated toward zero as before.
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// Formats Unix milliseconds as RFC 3339 in UTC, with milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    t.format(&Rfc3339).unwrap_or_default()
}

/// Parses an RFC 3339 time into Unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_milliseconds() {
        assert_eq!(rfc3339_ms(1_796_097_600_000), "2026-12-01T04:00:00Z");
        assert_eq!(rfc3339_ms(1_796_097_600_123), "2026-12-01T04:00:00.123Z");
        assert_eq!(parse_rfc3339_ms("2026-12-01T12:00:00+08:00"), Some(1_796_097_600_000));
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
        assert!(now_ms() > 1_700_000_000_000);
    }

    #[test]
    fn now_ms_agrees_with_the_calendar_clock() {
        let ms = |t: OffsetDateTime| (t.unix_timestamp_nanos() / 1_000_000) as i64;
        let before = ms(OffsetDateTime::now_utc());
        let now = now_ms();
        let after = ms(OffsetDateTime::now_utc());
        assert!(before <= now && now <= after, "{before} <= {now} <= {after}");
    }
}
