//! Human units in config values: durations (`"500ms"`, `"24h"`), byte sizes
//! (`"64MiB"`), address ranges (`"10.0.0.0/8"`) and activity times that are either absolute RFC 3339 instants
//! or offsets from the node's start (`"+10s"`, `"+2h"`).
//!
//! Each type parses from a TOML string and reports a sentence on failure, so
//! `check-config` can print it beside the line it came from.

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

/// A duration written the way people write it: `"500ms"`, `"10s"`, `"2h 30m"`;
/// at most [`MAX_DURATION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// The longest duration (and the furthest relative time) a config may
/// name: 100 years as humantime counts them (365.25 days). Far beyond any
/// timeout, lifetime or sale, and safe to add to any clock: humantime
/// takes up to `u64::MAX` seconds, and a timeout that large, accepted by
/// a reload, made every new connection panic adding it to the time.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"2h\""))?;
        if d > MAX_DURATION {
            return Err(format!("`{s}` is too long: at most 100 years"));
        }
        Ok(HumanDuration(d))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A byte count: a bare integer, or a string with a unit (`"16KiB"`, `"64MiB"`, `"1GiB"`, `"500kB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size; write e.g. 65536, \"16KiB\" or \"64MiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "kB" | "KB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "`{other}` is not a size unit; use B, KiB, MiB, GiB, kB, MB or GB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

/// When an activity or ticket starts or ends.
///
/// Absolute times are RFC 3339 (`"2026-12-01T12:00:00+08:00"`). Relative
/// times (`"+10s"`, `"+2h"`, `"-5m"`) count from the moment the node started,
/// so the bundled demo is open whenever a newcomer runs it. A reload resolves
/// them against the same start moment, so reloading never moves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSpec {
    /// A fixed instant.
    Absolute(OffsetDateTime),
    /// Milliseconds after (or, when negative, before) the node's start.
    Relative(i64),
}

impl TimeSpec {
    /// The instant in Unix milliseconds, given the node's start in Unix milliseconds.
    pub fn resolve(self, node_start_ms: i64) -> i64 {
        match self {
            TimeSpec::Absolute(t) => (t.unix_timestamp_nanos() / 1_000_000) as i64,
            TimeSpec::Relative(offset) => node_start_ms.saturating_add(offset),
        }
    }
}

impl FromStr for TimeSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Some(rest) = t.strip_prefix('+').or_else(|| t.strip_prefix('-')) {
            let d = humantime::parse_duration(rest.trim())
                .map_err(|e| format!("`{s}` is not a relative time ({e}); write e.g. \"+10s\" or \"+2h\""))?;
            // Far enough for any sale, and every time it names is one RFC
            // 3339 can write (`+20000years` was shown as 1970).
            if d > MAX_DURATION {
                return Err(format!("`{s}` is too far away: at most 100 years"));
            }
            let ms = d.as_millis() as i64;
            return Ok(TimeSpec::Relative(if t.starts_with('-') { -ms } else { ms }));
        }
        let at = OffsetDateTime::parse(t, &Rfc3339).map_err(|e| {
            format!("`{s}` is neither RFC 3339 (e.g. \"2026-12-01T12:00:00+08:00\") nor relative (e.g. \"+10s\"): {e}")
        })?;
        // Every time shown is RFC 3339 in UTC, which writes years 0-9999:
        // `9999-12-31T23:59:59-05:00` (a natural "never") is in year 10000
        // there, and was shown as "".
        let utc_year = at.checked_to_offset(time::UtcOffset::UTC).map(|t| t.year());
        if !utc_year.is_some_and(|y| (0..=9999).contains(&y)) {
            return Err(format!("`{s}` is outside the years 0-9999 in UTC"));
        }
        Ok(TimeSpec::Absolute(at))
    }
}

impl Serialize for TimeSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TimeSpec::Absolute(t) => s.serialize_str(&t.format(&Rfc3339).map_err(serde::ser::Error::custom)?),
            TimeSpec::Relative(ms) if *ms < 0 => s.serialize_str(&format!("-{}ms", ms.unsigned_abs())),
            TimeSpec::Relative(ms) => s.serialize_str(&format!("+{ms}ms")),
        }
    }
}

/// A time is a string (`"2026-12-01T12:00:00+08:00"`, `"+10s"`) or a
/// TOML datetime written without quotes (`2026-12-01T12:00:00+08:00`),
/// which TOML reads as its own type: that was refused as "invalid type:
/// map, expected a string", which said nothing of times.
impl<'de> Deserialize<'de> for TimeSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Time;
        impl<'de> de::Visitor<'de> for Time {
            type Value = TimeSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a time: \"2026-12-01T12:00:00+08:00\" (RFC 3339) or \"+10s\" (from the node's start)")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TimeSpec, E> {
                s.parse().map_err(E::custom)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<TimeSpec, A::Error> {
                // Any other table is no time: said as such, not in the
                // datetime reader's words.
                let native = toml::value::Datetime::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map_err(|_: A::Error| de::Error::invalid_type(de::Unexpected::Map, &self))?;
                native.to_string().parse().map_err(de::Error::custom)
            }
        }
        d.deserialize_any(Time)
    }
}

/// An address range such as `10.0.0.0/8` or `::1/128`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` lies in this range. IPv4-mapped IPv6 addresses match IPv4 ranges.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not an IP address or CIDR range (e.g. \"10.0.0.0/8\")");
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        // An IPv4-mapped range (`::ffff:10.0.0.0/104`, as a dual-stack
        // listener's access log writes addresses) is its IPv4 range: a
        // client is matched as IPv4, so kept as IPv6 it matched nobody.
        if let IpAddr::V6(v6) = addr {
            if let Some(v4) = v6.to_ipv4_mapped().filter(|_| prefix >= 96) {
                return Ok(IpNet {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                });
            }
        }
        Ok(IpNet { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Whether any of `nets` contains `ip`.
pub fn any_contains(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TOML's own datetimes (no quotes) are times too; other types are
    /// refused naming what a time is.
    #[test]
    fn times_may_be_toml_datetimes() {
        #[derive(Deserialize)]
        struct At {
            at: TimeSpec,
        }
        let at = |text: &str| toml::from_str::<At>(text).map(|a| a.at.resolve(0));
        assert_eq!(at("at = 2026-12-01T12:00:00+08:00").unwrap(), 1_796_097_600_000);
        assert_eq!(at("at = 2026-12-01T04:00:00Z").unwrap(), 1_796_097_600_000);
        assert_eq!(at("at = \"2026-12-01T12:00:00+08:00\"").unwrap(), 1_796_097_600_000);
        assert_eq!(at("at = \"+10s\"").unwrap(), 10_000);
        let local = at("at = 2026-12-01T12:00:00").unwrap_err().to_string();
        assert!(local.contains("is neither RFC 3339"), "{local}");
        let table = at("at = { when = \"+10s\" }").unwrap_err().to_string();
        assert!(table.contains("invalid type: map, expected a time"), "{table}");
        let number = at("at = 5").unwrap_err().to_string();
        assert!(
            number.contains("expected a time: \"2026-12-01T12:00:00+08:00\""),
            "{number}"
        );
    }

    #[test]
    fn times_survive_a_round_trip_through_json() {
        for text in ["2026-12-01T12:00:00+08:00", "+10s", "-5m", "+2h"] {
            let t: TimeSpec = text.parse().unwrap();
            let json = serde_json::to_string(&t).unwrap();
            let back: TimeSpec = serde_json::from_str(&json).unwrap();
            assert_eq!(back.resolve(1_000), t.resolve(1_000), "{text} -> {json}");
        }
    }

    #[test]
    fn durations_stop_at_a_hundred_years() {
        assert_eq!("100years".parse::<HumanDuration>().unwrap().0, MAX_DURATION);
        for far in ["101years", "10000000000000000000s", "18446744073709551615s"] {
            let err = far.parse::<HumanDuration>().unwrap_err();
            assert!(err.contains("at most 100 years"), "{far}: {err}");
        }
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!("64MiB".parse::<ByteSize>().unwrap().0, 64 << 20);
        assert_eq!("16KiB".parse::<ByteSize>().unwrap().0, 16 << 10);
        assert_eq!("100".parse::<ByteSize>().unwrap().0, 100);
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("".parse::<ByteSize>().is_err());
    }

    #[test]
    fn times_parse_absolute_and_relative() {
        assert_eq!("+10s".parse::<TimeSpec>().unwrap(), TimeSpec::Relative(10_000));
        assert_eq!("-5m".parse::<TimeSpec>().unwrap(), TimeSpec::Relative(-300_000));
        let abs: TimeSpec = "2026-12-01T12:00:00+08:00".parse().unwrap();
        assert_eq!(abs.resolve(0), 1_796_097_600_000);
        assert_eq!(TimeSpec::Relative(10).resolve(5), 15);
        assert!("tomorrow".parse::<TimeSpec>().is_err());
        // Year 10000 in UTC, which no RFC 3339 answer can show.
        let far = "9999-12-31T23:59:59-05:00".parse::<TimeSpec>().unwrap_err();
        assert!(far.contains("outside the years 0-9999 in UTC"), "{far}");
        assert!("9999-12-31T23:59:59+00:00".parse::<TimeSpec>().is_ok());
        assert!("+100years".parse::<TimeSpec>().is_ok());
        assert!("+20000years"
            .parse::<TimeSpec>()
            .unwrap_err()
            .contains("at most 100 years"));
        assert!("-20000years".parse::<TimeSpec>().is_err());
    }
}

#[cfg(test)]
mod ipnet_tests {
    use super::*;

    #[test]
    fn ranges_match_what_they_should() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: IpNet = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        // Written as IPv4-mapped IPv6, as a dual-stack listener logs them.
        let mapped: IpNet = "::ffff:127.0.0.1".parse().unwrap();
        assert!(mapped.contains("127.0.0.1".parse().unwrap()));
        assert!(mapped.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!mapped.contains("127.0.0.2".parse().unwrap()));
        let mapped: IpNet = "::ffff:10.1.0.0/112".parse().unwrap();
        assert!(mapped.contains("10.1.9.9".parse().unwrap()));
        assert!(!mapped.contains("10.2.0.1".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "nope", "1.2.3.4/x", "::/129"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }
}
