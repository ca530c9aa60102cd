//! Wall-clock time as the node sees it: Unix milliseconds, and RFC 3339 text
//! for the API and exports.
//!
//! Everything that stamps or compares times (claims, sale windows, tokens,
//! rooms, exports) goes through here, so there is one definition of "now"
//! and one text format. It imports nothing of the node.
//!
//! A cluster node follows the cluster's clock rather than its own: it
//! measures how far Redis's clock is from its own with every heartbeat
//! ([`follow`]), and [`now_ms`] adds that. Nodes whose clocks disagree
//! then still open a sale, close a lottery's entries and expire a token
//! at the same moment; a node whose clock ran ahead would otherwise sell
//! before the start to whoever reached it. On one node the offset is 0.

use std::{
    sync::atomic::{AtomicI64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use time::{format_description::well_known::Rfc3339, OffsetDateTime};

/// How far the cluster's clock is ahead of this node's, in ms (see [`follow`]).
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// The current time in Unix milliseconds: the node's clock, plus the
/// offset to the cluster's clock in a cluster.
pub fn now_ms() -> i64 {
    system_ms().saturating_add(OFFSET_MS.load(Ordering::Relaxed))
}

/// This machine's own clock in Unix milliseconds, uncorrected.
///
/// Read straight from `SystemTime`: every request reads it several times,
/// and going through `OffsetDateTime` split the time into a calendar date
/// and divided an `i128` only to throw both away (about 1% of a refused
/// claim's CPU samples).
pub fn system_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64).saturating_mul(1000) + i64::from(d.subsec_millis()),
        // A clock set before 1970: negative, truncated toward zero as before.
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// Makes [`now_ms`] follow a clock measured to read `offset_ms` ahead of
/// this machine's, give or take `error_ms` (half the measurement's round
/// trip); returns the offset in force afterwards. An offset in force that
/// the measurement does not contradict stays: [`now_ms`] should not step
/// back and forth with every measurement's noise.
pub fn follow(offset_ms: i64, error_ms: u64) -> i64 {
    let next = stepped(OFFSET_MS.load(Ordering::Relaxed), offset_ms, error_ms);
    OFFSET_MS.store(next, Ordering::Relaxed);
    next
}

/// The offset to use, from the one in force and a new measurement.
fn stepped(current: i64, measured: i64, error_ms: u64) -> i64 {
    // One more millisecond: the clocks are read to whole milliseconds.
    if measured.abs_diff(current) <= error_ms.saturating_add(1) {
        current
    } else {
        measured
    }
}

/// The offset [`now_ms`] adds to this machine's clock.
pub fn offset_ms() -> i64 {
    OFFSET_MS.load(Ordering::Relaxed)
}

/// Formats Unix milliseconds as RFC 3339 in UTC, always with three digits
/// of milliseconds (`…T10:35:56.140Z`, `…T04:00:00.000Z`): exports are
/// sorted as text, and `.14Z` sorted after `.135Z` although it is later.
/// A time outside years 0–9999 (which no stored time is) gives the epoch.
pub fn rfc3339_ms(ms: i64) -> String {
    Rfc3339Ms::new(ms).as_str().to_owned()
}

/// [`rfc3339_ms`]'s text in a fixed buffer, for a time written into an
/// answer (it serialises as a string): every successful claim's answer
/// carries one, and a `String` made with `format!` for it was an
/// allocation and a pass through `core::fmt` per claim.
#[derive(Clone, Copy)]
pub struct Rfc3339Ms([u8; 24]);

impl Rfc3339Ms {
    /// The text of `ms` (see [`rfc3339_ms`]).
    pub fn new(ms: i64) -> Rfc3339Ms {
        let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .ok()
            .filter(|t| (0..=9999).contains(&t.year()))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let mut b = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut n: u32| {
            for i in (at..at + width).rev() {
                b[i] = b'0' + (n % 10) as u8;
                n /= 10;
            }
        };
        put(0, 4, t.year() as u32);
        put(5, 2, u32::from(u8::from(t.month())));
        put(8, 2, u32::from(t.day()));
        put(11, 2, u32::from(t.hour()));
        put(14, 2, u32::from(t.minute()));
        put(17, 2, u32::from(t.second()));
        put(20, 3, u32::from(t.millisecond()));
        Rfc3339Ms(b)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and the separators above are ever written.
        std::str::from_utf8(&self.0).expect("ASCII")
    }
}

impl std::fmt::Debug for Rfc3339Ms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl serde::Serialize for Rfc3339Ms {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
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
        assert_eq!(rfc3339_ms(1_796_097_600_000), "2026-12-01T04:00:00.000Z");
        assert_eq!(rfc3339_ms(1_796_097_600_123), "2026-12-01T04:00:00.123Z");
        // Three digits always, so that the text sorts as the time does.
        assert_eq!(rfc3339_ms(1_796_097_600_140), "2026-12-01T04:00:00.140Z");
        assert_eq!(rfc3339_ms(1_796_097_600_007), "2026-12-01T04:00:00.007Z");
        assert!(rfc3339_ms(1_796_097_600_100) < rfc3339_ms(1_796_097_600_150));
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(i64::MAX), "1970-01-01T00:00:00.000Z");
        // The fixed buffer writes what `format!` wrote, year 0 to 9999.
        for ms in [
            -62_167_219_200_000,
            -1,
            0,
            951_782_400_123,
            1_234_567_890_123,
            1_796_097_600_140,
            253_402_300_799_999,
        ] {
            let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
            let formatted = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.millisecond()
            );
            assert_eq!(rfc3339_ms(ms), formatted);
        }
        assert_eq!(rfc3339_ms(1_234_567_890_123), "2009-02-13T23:31:30.123Z");
        assert_eq!(
            rfc3339_ms(253_402_300_800_000),
            "1970-01-01T00:00:00.000Z",
            "year 10000"
        );
        for ms in [0, 1_796_097_600_140, 1_796_097_600_999] {
            assert_eq!(parse_rfc3339_ms(&rfc3339_ms(ms)), Some(ms));
        }
        assert_eq!(parse_rfc3339_ms("2026-12-01T12:00:00+08:00"), Some(1_796_097_600_000));
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
        assert!(now_ms() > 1_700_000_000_000);
    }

    #[test]
    fn the_offset_moves_only_when_a_measurement_contradicts_it() {
        assert_eq!(stepped(0, 1, 0), 0);
        assert_eq!(stepped(0, -1, 0), 0);
        assert_eq!(stepped(0, 30_000, 0), 30_000);
        assert_eq!(stepped(30_000, 30_010, 10), 30_000);
        assert_eq!(stepped(30_000, 30_012, 10), 30_012);
        assert_eq!(stepped(30_000, 29_990, 2), 29_990);
        assert_eq!(stepped(30_000, 0, 2), 0);
        assert_eq!(stepped(i64::MIN, i64::MAX, u64::MAX), i64::MIN);
        assert_eq!(stepped(i64::MIN, i64::MAX, 0), i64::MAX);
    }

    #[test]
    fn the_machines_clock_agrees_with_the_calendar_clock() {
        let ms = |t: OffsetDateTime| (t.unix_timestamp_nanos() / 1_000_000) as i64;
        let before = ms(OffsetDateTime::now_utc());
        let now = system_ms();
        let after = ms(OffsetDateTime::now_utc());
        assert!(before <= now && now <= after, "{before} <= {now} <= {after}");
    }
}
