//! Rush statistics for the organiser's report: per activity, the claim
//! outcomes per minute, request counts per client address and per account
//! (the scalper signal), and the claim latency distribution.
//!
//! Recording is three sharded-map increments per claim request, no I/O; a
//! worker drains the maps every second into the store
//! (`Store::add_stats`). Draining removes each entry under
//! its shard lock and adds its count to the store, so nothing is counted
//! twice or lost. The per-source map is capped: past [`MAX_SOURCES`] distinct
//! addresses and accounts, new ones are counted under "other", so a flood of
//! spoofed sources cannot grow memory without bound.

use std::{net::IpAddr, sync::Arc, time::Duration};

use dashmap::DashMap;

use crate::{metrics::LATENCY_BOUNDS, vocab::ClaimOutcome};

/// Most distinct sources tracked between two flushes.
pub const MAX_SOURCES: usize = 200_000;

/// Who sent a claim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A client address.
    Ip(IpAddr),
    /// An account.
    User(u64),
    /// Any source past the cap.
    Other,
}

impl Source {
    /// `("ip", "203.0.113.7")`, `("user", "42")` or `("other", "")`.
    pub fn parts(&self) -> (&'static str, String) {
        match self {
            Source::Ip(ip) => ("ip", ip.to_string()),
            Source::User(id) => ("user", id.to_string()),
            Source::Other => ("other", String::new()),
        }
    }
}

/// Counts drained from the recorder, ready to add to the store.
#[derive(Debug, Default)]
pub struct StatsBatch {
    /// `(activity, unix minute, outcome label, count)`.
    pub outcomes: Vec<(Arc<str>, i64, &'static str, u64)>,
    /// `(activity, source, requests)`.
    pub sources: Vec<(Arc<str>, Source, u64)>,
    /// `(activity, bucket upper bound in ms (f64::INFINITY for the last), count)`.
    pub latency: Vec<(Arc<str>, f64, u64)>,
}

impl StatsBatch {
    /// Whether there is nothing to store.
    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty() && self.sources.is_empty() && self.latency.is_empty()
    }
}

/// The in-memory recorder.
#[derive(Default)]
pub struct RushStats {
    outcomes: DashMap<(Arc<str>, i64, ClaimOutcome), u64>,
    sources: DashMap<(Arc<str>, Source), u64>,
    latency: DashMap<(Arc<str>, usize), u64>,
}

impl RushStats {
    /// Records one claim request of `activity`.
    pub fn record(
        &self,
        activity: &Arc<str>,
        outcome: ClaimOutcome,
        ip: IpAddr,
        user: u64,
        now_ms: i64,
        elapsed: Duration,
    ) {
        *self
            .outcomes
            .entry((activity.clone(), now_ms.div_euclid(60_000), outcome))
            .or_default() += 1;
        for source in [Source::Ip(ip), Source::User(user)] {
            let key = (activity.clone(), source);
            if let Some(mut n) = self.sources.get_mut(&key) {
                *n += 1;
            } else if self.sources.len() < MAX_SOURCES {
                *self.sources.entry(key).or_default() += 1;
            } else {
                *self.sources.entry((activity.clone(), Source::Other)).or_default() += 1;
            }
        }
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        *self.latency.entry((activity.clone(), bucket)).or_default() += 1;
    }

    /// Takes everything recorded so far.
    pub fn drain(&self) -> StatsBatch {
        let mut batch = StatsBatch::default();
        self.outcomes.retain(|(a, minute, outcome), n| {
            batch.outcomes.push((a.clone(), *minute, outcome.label(), *n));
            false
        });
        self.sources.retain(|(a, source), n| {
            batch.sources.push((a.clone(), source.clone(), *n));
            false
        });
        self.latency.retain(|(a, bucket), n| {
            let bound = LATENCY_BOUNDS.get(*bucket).map_or(f64::INFINITY, |b| b * 1000.0);
            batch.latency.push((a.clone(), bound, *n));
            false
        });
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_what_was_recorded_once() {
        let stats = RushStats::default();
        let act: Arc<str> = "a".into();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            stats.record(&act, ClaimOutcome::SoldOut, ip, 7, 120_000, Duration::from_micros(300));
        }
        stats.record(&act, ClaimOutcome::Success, ip, 8, 179_999, Duration::from_millis(3));
        let batch = stats.drain();
        let mut outcomes = batch.outcomes.clone();
        outcomes.sort_by_key(|o| o.2);
        assert_eq!(
            outcomes,
            vec![(act.clone(), 2, "sold_out", 3), (act.clone(), 2, "success", 1)]
        );
        let ips: u64 = batch
            .sources
            .iter()
            .filter(|s| s.1 == Source::Ip(ip))
            .map(|s| s.2)
            .sum();
        assert_eq!(ips, 4);
        let fast: u64 = batch.latency.iter().filter(|l| l.1 <= 0.5).map(|l| l.2).sum();
        assert_eq!(fast, 3);
        assert!(stats.drain().is_empty());
    }
}
