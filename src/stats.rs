//! Rush statistics for the organiser's report: per activity, the claim
//! outcomes per tick ([`OUTCOME_TICK_MS`]), request counts per client
//! address and per account (the scalper signal), and the claim latency
//! distribution.
//!
//! Recording is a handful of atomic increments per claim request under
//! shard read locks, no I/O, no allocation once a tick and a source have
//! been seen; a worker drains the counts every second into the store
//! (`Store::add_stats`). The per-source maps are capped: past
//! [`MAX_SOURCES`] distinct addresses and accounts between two drains, new
//! ones are counted under "other", so a flood of spoofed sources cannot
//! grow memory without bound.

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

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
    /// `(activity, start of the tick in Unix ms, outcome label, count)`;
    /// ticks are [`OUTCOME_TICK_MS`] long.
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

/// The in-memory recorder: one [`ActivityStats`] per activity, found with
/// one hash of the activity id (ahash, keyed per process) per request.
#[derive(Default)]
pub struct RushStats {
    activities: DashMap<Arc<str>, ActivityStats, ahash::RandomState>,
    /// Distinct sources tracked since the last drain, all activities.
    tracked: AtomicUsize,
}

/// How finely outcomes are counted over time: fine enough for a sale that
/// sells out in two seconds to draw a curve, coarse enough that an
/// hours-long one stores a few rows a second.
pub const OUTCOME_TICK_MS: i64 = 100;

/// One activity's counts. Latency buckets are plain atomics; outcomes are
/// atomics per tick; sources a map of atomics. A request takes only shard
/// *read* locks, except the first time a tick or a source is seen.
#[derive(Default)]
struct ActivityStats {
    outcomes: DashMap<i64, Outcomes, ahash::RandomState>,
    sources: DashMap<Source, AtomicU64, ahash::RandomState>,
    latency: [AtomicU64; LATENCY_BOUNDS.len() + 1],
}

/// Claims per outcome in one tick.
type Outcomes = [AtomicU64; ClaimOutcome::ALL.len()];

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
        let stats = match self.activities.get(&**activity) {
            Some(stats) => stats,
            None => self.activities.entry(activity.clone()).or_default().downgrade(),
        };
        let tick = now_ms - now_ms.rem_euclid(OUTCOME_TICK_MS);
        match stats.outcomes.get(&tick) {
            Some(counts) => counts[outcome as usize].fetch_add(1, Ordering::Relaxed),
            None => stats.outcomes.entry(tick).or_default()[outcome as usize].fetch_add(1, Ordering::Relaxed),
        };
        for source in [Source::Ip(ip), Source::User(user)] {
            if let Some(n) = stats.sources.get(&source) {
                n.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let source = if self.tracked.fetch_add(1, Ordering::Relaxed) < MAX_SOURCES {
                source
            } else {
                Source::Other
            };
            stats.sources.entry(source).or_default().fetch_add(1, Ordering::Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        stats.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes everything recorded so far. Each map entry is removed under its
    /// shard's write lock, so an increment lands either before (and is
    /// taken) or after, in a new entry (taken next time): nothing is
    /// counted twice or lost.
    pub fn drain(&self) -> StatsBatch {
        let mut batch = StatsBatch::default();
        self.tracked.store(0, Ordering::Relaxed);
        for entry in self.activities.iter() {
            let (a, stats) = (entry.key(), entry.value());
            stats.outcomes.retain(|tick, counts| {
                for (o, n) in ClaimOutcome::ALL.iter().zip(counts.iter()) {
                    let n = n.load(Ordering::Relaxed);
                    if n > 0 {
                        batch.outcomes.push((a.clone(), *tick, o.label(), n));
                    }
                }
                false
            });
            stats.sources.retain(|source, n| {
                batch
                    .sources
                    .push((a.clone(), source.clone(), n.load(Ordering::Relaxed)));
                false
            });
            for (bucket, n) in stats.latency.iter().enumerate() {
                let n = n.swap(0, Ordering::Relaxed);
                if n > 0 {
                    let bound = LATENCY_BOUNDS.get(bucket).map_or(f64::INFINITY, |b| b * 1000.0);
                    batch.latency.push((a.clone(), bound, n));
                }
            }
        }
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
        stats.record(&act, ClaimOutcome::Success, ip, 8, 120_099, Duration::from_millis(3));
        stats.record(&act, ClaimOutcome::Success, ip, 9, 120_100, Duration::from_millis(3));
        let batch = stats.drain();
        let mut outcomes = batch.outcomes.clone();
        outcomes.sort_by_key(|o| (o.2, o.1));
        assert_eq!(
            outcomes,
            vec![
                (act.clone(), 120_000, "sold_out", 3),
                (act.clone(), 120_000, "success", 1),
                (act.clone(), 120_100, "success", 1)
            ],
            "counted per tick of {OUTCOME_TICK_MS} ms"
        );
        let ips: u64 = batch
            .sources
            .iter()
            .filter(|s| s.1 == Source::Ip(ip))
            .map(|s| s.2)
            .sum();
        assert_eq!(ips, 5);
        let fast: u64 = batch.latency.iter().filter(|l| l.1 <= 0.5).map(|l| l.2).sum();
        assert_eq!(fast, 3);
        assert!(stats.drain().is_empty());
    }

    #[test]
    fn draining_while_threads_record_loses_and_doubles_nothing() {
        let stats = Arc::new(RushStats::default());
        let act: Arc<str> = "a".into();
        const PER_THREAD: u64 = 20_000;
        let drained = std::thread::scope(|s| {
            let recorders: Vec<_> = (0..3u64)
                .map(|t| {
                    let (stats, act) = (stats.clone(), act.clone());
                    s.spawn(move || {
                        let ip: IpAddr = format!("10.0.0.{t}").parse().unwrap();
                        for i in 0..PER_THREAD {
                            // Ticks roll over mid-run, as they do in a rush.
                            let tick_ms = (i / 5_000) as i64 * OUTCOME_TICK_MS;
                            stats.record(
                                &act,
                                ClaimOutcome::Success,
                                ip,
                                i % 50,
                                tick_ms,
                                Duration::from_micros(100),
                            );
                        }
                    })
                })
                .collect();
            let mut batches = Vec::new();
            while !recorders.iter().all(|r| r.is_finished()) {
                batches.push(stats.drain());
            }
            batches.push(stats.drain());
            batches
        });
        let outcomes: u64 = drained.iter().flat_map(|b| &b.outcomes).map(|o| o.3).sum();
        let sources: u64 = drained.iter().flat_map(|b| &b.sources).map(|s| s.2).sum();
        let latency: u64 = drained.iter().flat_map(|b| &b.latency).map(|l| l.2).sum();
        assert_eq!(outcomes, 3 * PER_THREAD);
        assert_eq!(sources, 2 * 3 * PER_THREAD, "one address and one account per request");
        assert_eq!(latency, 3 * PER_THREAD);
    }
}
