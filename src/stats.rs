//! Rush statistics for the organiser's report: per activity, the claim
//! outcomes per tick ([`OUTCOME_TICK_MS`]), request counts per client
//! address and per account (the scalper signal), and the claim latency
//! distribution.
//!
//! Recording takes one uncontended lock and a few plain increments per
//! claim request, no I/O, and no allocation once the maps have grown to a
//! second's worth of ticks and sources: each thread records into its own
//! shard (a lane's claims never touch another lane's cache lines), and a
//! worker drains every shard once a second into the store
//! (`Store::add_stats`), keeping the emptied maps' capacity. The per-source
//! maps are capped: past [`MAX_SOURCES`] entries between two drains (a
//! source seen on two lanes takes two), new sources are counted under
//! "other", so a flood of spoofed sources cannot grow memory without bound;
//! and past [`MAX_STORED_SOURCES`] client addresses of one activity sent
//! to the store in the node's life, so it cannot grow the store's rows
//! either.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

use crate::{
    metrics::LATENCY_BOUNDS,
    vocab::{client_key, ClaimOutcome},
};

/// Most source entries, over all shards, between two drains.
pub const MAX_SOURCES: usize = 200_000;

/// Most client addresses of one activity this node sends to the store over
/// its life; later new ones are counted as "other". The cap per drain
/// alone let every drain add as many new rows, so a client rotating
/// through IPv6 /64s (a /48 holds 65,536) grew the store's table of
/// sources without end. Accounts are not capped: each is a registration,
/// which the registration limits bound, and a scalper's account must stay
/// visible however late it starts. About 4 MB of memory per activity at
/// most.
pub const MAX_STORED_SOURCES: usize = 100_000;

/// Who sent a claim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A client, keyed as the rate limits key it: an IPv4 address, or an
    /// IPv6 address's /64 (one subscriber's; counted per address, a client
    /// rotating through its 2^64 never stood out).
    Ip(IpAddr),
    /// An account.
    User(u64),
    /// Any source past the cap.
    Other,
}

impl Source {
    /// `("ip", "203.0.113.7")`, `("ip", "2001:db8:5:6::/64")`, `("user",
    /// "42")` or `("other", "")`.
    pub fn parts(&self) -> (&'static str, String) {
        match self {
            Source::Ip(ip @ IpAddr::V4(_)) => ("ip", ip.to_string()),
            Source::Ip(ip @ IpAddr::V6(_)) => ("ip", format!("{ip}/64")),
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

    /// Rows to store.
    pub fn rows(&self) -> usize {
        self.outcomes.len() + self.sources.len() + self.latency.len()
    }

    /// `self` and `other` summed per key (what the store would hold after
    /// both).
    fn merge(self, other: StatsBatch) -> StatsBatch {
        type Sum<K> = HashMap<K, u64, ahash::RandomState>;
        let mut outcomes: Sum<(Arc<str>, i64, &'static str)> = Sum::default();
        let mut sources: Sum<(Arc<str>, Source)> = Sum::default();
        let mut latency: Sum<(Arc<str>, u64)> = Sum::default();
        for b in [self, other] {
            for (a, tick, label, n) in b.outcomes {
                *outcomes.entry((a, tick, label)).or_default() += n;
            }
            for (a, source, n) in b.sources {
                *sources.entry((a, source)).or_default() += n;
            }
            for (a, bound, n) in b.latency {
                *latency.entry((a, bound.to_bits())).or_default() += n;
            }
        }
        StatsBatch {
            outcomes: outcomes.into_iter().map(|((a, t, l), n)| (a, t, l, n)).collect(),
            sources: sources.into_iter().map(|((a, s), n)| (a, s, n)).collect(),
            latency: latency
                .into_iter()
                .map(|((a, bits), n)| (a, f64::from_bits(bits), n))
                .collect(),
        }
    }

    /// Keeps at most `max_rows` rows: past that, per-source counters go
    /// first, smallest first (the report's top lists lose their tail), then
    /// the oldest ticks of the outcome curve. Returns the rows dropped.
    fn cap(&mut self, max_rows: usize) -> usize {
        let mut over = self.rows().saturating_sub(max_rows);
        let dropped = over;
        if over == 0 {
            return 0;
        }
        let cut = over.min(self.sources.len());
        self.sources.sort_unstable_by_key(|s| std::cmp::Reverse(s.2));
        self.sources.truncate(self.sources.len() - cut);
        over -= cut;
        let cut = over.min(self.outcomes.len());
        self.outcomes.sort_unstable_by_key(|o| std::cmp::Reverse(o.1));
        self.outcomes.truncate(self.outcomes.len() - cut);
        over -= cut;
        self.latency.truncate(self.latency.len() - over.min(self.latency.len()));
        dropped
    }
}

/// The in-memory recorder: [`SHARDS`] shards, each one thread's (or a few
/// threads') counts per activity.
///
/// Why shards and not one concurrent map: every claim request records, on
/// every lane at once. With shared maps of atomics, each request took four
/// shard read locks (activity, tick, address, account) and four increments
/// on cache lines the other lanes were writing too (about 3% of a
/// successful claim's samples in a profile). A thread's own shard is a
/// plain map behind a lock nobody else takes, except the drain once a
/// second.
pub struct RushStats {
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    /// What each shard held before the last drain, emptied but keeping its
    /// capacity; the next drain swaps it back in, so after a drain a shard
    /// re-grows nothing. Only [`RushStats::drain`] takes this lock.
    spares: Mutex<Vec<Shard>>,
    /// Source entries since the last drain, all shards and activities.
    tracked: AtomicUsize,
    /// What the store refused at the last flush (MongoDB down, a full
    /// disk), summed per key and capped: the next drain returns it too.
    held: Mutex<Held>,
    /// The client addresses of each activity drained so far (at most
    /// [`MAX_STORED_SOURCES`] each). Only [`RushStats::drain`] takes it.
    stored_sources: Mutex<HashMap<Arc<str>, HashSet<Source, ahash::RandomState>, ahash::RandomState>>,
}

/// The statistics an outage of the store holds back, and what it cost.
#[derive(Default)]
struct Held {
    batch: StatsBatch,
    /// The last flush was refused: an outage, warned of once.
    refused: bool,
    /// Rows dropped past [`MAX_HELD_ROWS`] during this outage.
    dropped: usize,
}

/// What [`RushStats::refused`] tells the flusher.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// The first refusal of an outage (warn now, not at every flush).
    pub first: bool,
    /// Rows kept for the next flush.
    pub kept: usize,
}

/// Most rows of statistics kept while the store refuses them (about
/// 60 MB at most); past that the rest are dropped, and counted.
pub const MAX_HELD_ROWS: usize = 1_000_000;

/// Shards of [`RushStats`]: more than the lanes of any machine we expect,
/// so threads rarely share one.
pub const SHARDS: usize = 16;

impl Default for RushStats {
    fn default() -> RushStats {
        RushStats {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(Mutex::new(Shard::default())))
                .collect(),
            spares: Mutex::new((0..SHARDS).map(|_| Shard::default()).collect()),
            tracked: AtomicUsize::new(0),
            held: Mutex::new(Held::default()),
            stored_sources: Mutex::default(),
        }
    }
}

/// The shard a thread records into: threads take shards in turn as they
/// first record, so the lanes (started together) get one each.
fn my_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    SHARD.with(|s| match s.get() {
        Some(n) => n,
        None => {
            let n = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
            s.set(Some(n));
            n
        }
    })
}

thread_local! {
    /// This thread's shard, once it has recorded.
    static SHARD: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Makes this thread record into shard `n` (tests: a process-wide turn
/// could give two test threads one shard).
#[cfg(test)]
fn pin_shard(n: usize) {
    SHARD.with(|s| s.set(Some(n)));
}

/// One shard: counts per activity (ahash, keyed per process).
type Shard = HashMap<Arc<str>, ActivityStats, ahash::RandomState>;

/// How finely outcomes are counted over time: fine enough for a sale that
/// sells out in two seconds to draw a curve, coarse enough that an
/// hours-long one stores a few rows a second.
pub const OUTCOME_TICK_MS: i64 = 100;

/// Around an activity's start, from a minute before to an hour after, its
/// claim outcomes are counted per tick; outside it, per minute.
const RUSH_WINDOW_MS: std::ops::Range<i64> = -60_000..3_600_000;

/// Where an activity starting at `start_ms` counts its claim outcomes per
/// tick: the report charts this window, the rest is counted per minute.
pub fn rush_window(start_ms: i64) -> std::ops::Range<i64> {
    start_ms.saturating_add(RUSH_WINDOW_MS.start)..start_ms.saturating_add(RUSH_WINDOW_MS.end)
}

/// When a claim request made at `now_ms` to an activity starting at
/// `start_ms` is counted: at `now_ms` during the rush (its tick), at the
/// start of its minute before and after. Counted per tick at any time, a
/// few accounts claiming an activity weeks before its start (each refused
/// `NOT_STARTED`) added a row a tenth of a second to the store, for as
/// long as they kept at it; now that costs a row a minute per outcome.
pub fn counted_at(start_ms: i64, now_ms: i64) -> i64 {
    let since_start = now_ms.saturating_sub(start_ms);
    if RUSH_WINDOW_MS.contains(&since_start) {
        now_ms
    } else if since_start >= RUSH_WINDOW_MS.end {
        // Its minute, but not before the window's end: counted at the start
        // of a minute the window still held, it was charted as a tick.
        (now_ms - now_ms.rem_euclid(60_000)).max(start_ms.saturating_add(RUSH_WINDOW_MS.end))
    } else {
        now_ms - now_ms.rem_euclid(60_000)
    }
}

/// The resolution a report reads claim outcomes of a span of `span_ms`
/// at: the recorded ticks for a short sale, coarser for a long one, so a
/// report holds about 20,000 rows per outcome at most (a month of ticks
/// was millions of rows, half a gigabyte, in memory). Each resolution
/// divides a minute (the rejections export's step) and every step of the
/// report's charts at or above it.
pub fn outcome_resolution_ms(span_ms: i64) -> i64 {
    [OUTCOME_TICK_MS, 1_000, 10_000, 60_000]
        .into_iter()
        .find(|r| span_ms / r <= 20_000)
        .unwrap_or(60_000)
}

/// One activity's counts in one shard.
#[derive(Default)]
struct ActivityStats {
    outcomes: HashMap<i64, Outcomes, ahash::RandomState>,
    sources: HashMap<Source, u64, ahash::RandomState>,
    latency: [u64; LATENCY_BOUNDS.len() + 1],
}

/// Claims per outcome in one tick.
type Outcomes = [u64; ClaimOutcome::ALL.len()];

impl RushStats {
    /// Records one claim request of `activity` from `ip` (counted under its
    /// [`client_key`]: see [`Source::Ip`]) in the tick of `now_ms` (see
    /// [`counted_at`]).
    pub fn record(
        &self,
        activity: &Arc<str>,
        outcome: ClaimOutcome,
        ip: IpAddr,
        user: u64,
        now_ms: i64,
        elapsed: Duration,
    ) {
        let ip = client_key(ip);
        let mut shard = self.shards[my_shard()].lock();
        let stats = match shard.get_mut(&**activity) {
            Some(stats) => stats,
            None => shard.entry(activity.clone()).or_default(),
        };
        let tick = now_ms - now_ms.rem_euclid(OUTCOME_TICK_MS);
        stats.outcomes.entry(tick).or_default()[outcome as usize] += 1;
        for source in [Source::Ip(ip), Source::User(user)] {
            if let Some(n) = stats.sources.get_mut(&source) {
                *n += 1;
                continue;
            }
            let source = if self.tracked.fetch_add(1, Ordering::Relaxed) < MAX_SOURCES {
                source
            } else {
                Source::Other
            };
            *stats.sources.entry(source).or_default() += 1;
        }
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        stats.latency[bucket] += 1;
    }

    /// Rows the store refused and this node still holds, and rows dropped
    /// past the cap: what is lost for the report if the node stops now.
    pub fn unstored_rows(&self) -> usize {
        let held = self.held.lock();
        held.batch.rows() + held.dropped
    }

    /// The store refused `batch`: keeps it, to go with the next [`drain`],
    /// at most [`MAX_HELD_ROWS`] rows (the rest are counted as dropped).
    /// `batch` is what the last drain returned (less what was stored): that
    /// drain took what was held before and summed it in, and one worker
    /// flushes, so it replaces what is held.
    ///
    /// [`drain`]: RushStats::drain
    pub fn refused(&self, mut batch: StatsBatch) -> Refused {
        let dropped = batch.cap(MAX_HELD_ROWS);
        let mut held = self.held.lock();
        let kept = batch.rows();
        held.batch = batch;
        held.dropped += dropped;
        let first = !std::mem::replace(&mut held.refused, true);
        Refused { first, kept }
    }

    /// Whether the store refused the last flush that had rows (an outage
    /// not known to be over).
    pub fn refusing(&self) -> bool {
        self.held.lock().refused
    }

    /// The store took a flush: if that ends an outage, the rows it dropped
    /// past the cap (`Some(0)` when none were).
    pub fn stored(&self) -> Option<usize> {
        let mut held = self.held.lock();
        std::mem::take(&mut held.refused).then(|| std::mem::take(&mut held.dropped))
    }

    /// The drained sources, each activity's new addresses past
    /// [`MAX_STORED_SOURCES`] counted as "other".
    fn within_stored_cap(
        &self,
        sources: HashMap<(Arc<str>, Source), u64, ahash::RandomState>,
    ) -> Vec<(Arc<str>, Source, u64)> {
        let mut stored = self.stored_sources.lock();
        let mut out: HashMap<(Arc<str>, Source), u64, ahash::RandomState> = HashMap::default();
        for ((activity, source), n) in sources {
            let known = stored.entry(activity.clone()).or_default();
            let source = if !matches!(source, Source::Ip(_)) || known.contains(&source) {
                source
            } else if known.len() < MAX_STORED_SOURCES {
                known.insert(source.clone());
                source
            } else {
                Source::Other
            };
            *out.entry((activity, source)).or_default() += n;
        }
        out.into_iter().map(|((a, source), n)| (a, source, n)).collect()
    }

    /// Takes everything recorded so far, shard by shard (each under its
    /// lock, so nothing is counted twice or lost), with the counts of a
    /// tick or a source that several shards saw added up; and whatever
    /// [`refused`](RushStats::refused) kept.
    pub fn drain(&self) -> StatsBatch {
        type Sum<K> = HashMap<K, u64, ahash::RandomState>;
        let mut outcomes: Sum<(Arc<str>, i64, usize)> = Sum::default();
        let mut sources: Sum<(Arc<str>, Source)> = Sum::default();
        let mut latency: Sum<(Arc<str>, usize)> = Sum::default();
        let mut spares = self.spares.lock();
        self.tracked.store(0, Ordering::Relaxed);
        for (shard, taken) in self.shards.iter().zip(spares.iter_mut()) {
            std::mem::swap(&mut *shard.lock(), taken);
            // Emptied in place (the maps keep their capacity for when this
            // is swapped back in); an activity with no requests since the
            // last drain is dropped.
            taken.retain(|a, stats| {
                let mut seen = false;
                for (tick, counts) in stats.outcomes.drain() {
                    for (o, n) in counts.into_iter().enumerate().filter(|(_, n)| *n > 0) {
                        *outcomes.entry((a.clone(), tick, o)).or_default() += n;
                        seen = true;
                    }
                }
                for (source, n) in stats.sources.drain() {
                    *sources.entry((a.clone(), source)).or_default() += n;
                }
                for (bucket, n) in stats.latency.iter_mut().enumerate() {
                    if *n > 0 {
                        *latency.entry((a.clone(), bucket)).or_default() += std::mem::take(n);
                    }
                }
                seen
            });
        }
        let batch = StatsBatch {
            outcomes: outcomes
                .into_iter()
                .map(|((a, tick, o), n)| (a, tick, ClaimOutcome::ALL[o].label(), n))
                .collect(),
            sources: self.within_stored_cap(sources),
            latency: latency
                .into_iter()
                .map(|((a, bucket), n)| {
                    let bound = LATENCY_BOUNDS.get(bucket).map_or(f64::INFINITY, |b| b * 1000.0);
                    (a, bound, n)
                })
                .collect(),
        };
        let held = std::mem::take(&mut self.held.lock().batch);
        if held.is_empty() {
            batch
        } else {
            // Summed per key: one row per counter, as the store expects.
            held.merge(batch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past [`MAX_STORED_SOURCES`] addresses of an activity, a new one is
    /// "other" whichever drain it comes in, while an address already sent
    /// keeps its own row, and so does every account; another activity has
    /// a cap of its own. (The cap per drain alone let each drain add as
    /// many new sources.)
    #[test]
    fn an_activity_sends_the_store_a_bounded_number_of_sources() {
        let stats = RushStats::default();
        let (act, other_act): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let ip = |i: usize| IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        // Account `i` claims from address `i`: two sources a request.
        let claim = |act: &Arc<str>, i: usize| {
            stats.record(act, ClaimOutcome::SoldOut, ip(i), i as u64, 120_000, Duration::ZERO);
        };
        let mut users = 0;
        while users < MAX_STORED_SOURCES {
            // Within the per-drain cap: every source of a drain its own.
            for _ in 0..(MAX_SOURCES / 2).min(MAX_STORED_SOURCES - users) {
                claim(&act, users);
                users += 1;
            }
            let batch = stats.drain();
            assert!(batch.sources.iter().all(|(_, s, _)| *s != Source::Other));
        }
        claim(&act, users);
        claim(&act, 0);
        claim(&other_act, users);
        let mut batch = stats.drain().sources;
        batch.sort_by_key(|(a, s, _)| (a.clone(), s.parts()));
        assert_eq!(
            batch,
            [
                (act.clone(), Source::Ip(ip(0)), 1),
                (act.clone(), Source::Other, 1),
                (act.clone(), Source::User(0), 1),
                (act.clone(), Source::User(users as u64), 1),
                (other_act.clone(), Source::Ip(ip(users)), 1),
                (other_act.clone(), Source::User(users as u64), 1),
            ]
        );
    }

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

    /// What the store refused goes with the next drain, summed with what
    /// was recorded since: one row per counter.
    #[test]
    fn a_held_batch_drains_again_summed_with_what_came_since() {
        let stats = RushStats::default();
        let act: Arc<str> = "a".into();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        stats.record(&act, ClaimOutcome::Success, ip, 7, 120_000, Duration::from_millis(3));
        let refused = stats.drain();
        assert_eq!(stats.refused(refused), Refused { first: true, kept: 4 });
        assert_eq!(
            stats.unstored_rows(),
            4,
            "an outcome, an address, an account, a latency"
        );
        stats.record(&act, ClaimOutcome::Success, ip, 8, 120_050, Duration::from_millis(3));
        let batch = stats.drain();
        assert_eq!(batch.outcomes, vec![(act.clone(), 120_000, "success", 2)]);
        let ips: Vec<_> = batch.sources.iter().filter(|s| s.1 == Source::Ip(ip)).collect();
        assert_eq!(ips, vec![&(act.clone(), Source::Ip(ip), 2)], "one row per counter");
        assert!(stats.drain().is_empty(), "drained once");
        assert_eq!(stats.stored(), Some(0), "the outage is over, nothing dropped");
        assert_eq!(stats.stored(), None, "and ended once");
        assert_eq!(stats.unstored_rows(), 0);
    }

    /// Held statistics are capped: past the cap the smallest per-source
    /// counters go first, then the oldest ticks.
    #[test]
    fn held_statistics_past_the_cap_drop_small_sources_first() {
        let act: Arc<str> = "a".into();
        let batch = StatsBatch {
            outcomes: vec![(act.clone(), 100, "success", 1), (act.clone(), 200, "success", 1)],
            sources: vec![(act.clone(), Source::User(1), 9), (act.clone(), Source::User(2), 1)],
            latency: vec![(act.clone(), 1.0, 2)],
        };
        let mut kept = batch;
        assert_eq!(kept.cap(4), 1);
        assert_eq!(kept.sources, vec![(act.clone(), Source::User(1), 9)]);
        assert_eq!(kept.outcomes.len(), 2);
        assert_eq!(kept.cap(2), 2);
        assert!(kept.sources.is_empty());
        assert_eq!(kept.outcomes, vec![(act.clone(), 200, "success", 1)]);
        assert_eq!(kept.latency.len(), 1);
    }

    #[test]
    fn what_two_shards_counted_drains_as_one_row() {
        let stats = RushStats::default();
        let act: Arc<str> = "a".into();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        std::thread::scope(|s| {
            for shard in [0, 1] {
                let (stats, act) = (&stats, &act);
                s.spawn(move || {
                    pin_shard(shard);
                    stats.record(act, ClaimOutcome::Success, ip, 7, 120_000, Duration::from_millis(3));
                });
            }
        });
        let batch = stats.drain();
        assert_eq!(batch.outcomes, vec![(act.clone(), 120_000, "success", 2)]);
        let mut sources = batch.sources.clone();
        sources.sort_by_key(|s| s.1.parts());
        assert_eq!(
            sources,
            vec![(act.clone(), Source::Ip(ip), 2), (act.clone(), Source::User(7), 2)]
        );
        assert_eq!(batch.latency.iter().map(|l| l.2).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn a_shard_keeps_its_capacity_across_drains() {
        let stats = RushStats::default();
        let act: Arc<str> = "a".into();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        pin_shard(0);
        for user in 0..1000 {
            stats.record(&act, ClaimOutcome::Success, ip, user, 120_000, Duration::from_millis(3));
        }
        assert_eq!(stats.drain().sources.len(), 1001);
        // The second drain swaps the first one's emptied maps back in.
        assert!(stats.drain().is_empty());
        let shard = stats.shards[0].lock();
        let kept = shard.get("a").expect("an activity with requests stays");
        assert!(kept.sources.is_empty() && kept.sources.capacity() >= 1001);
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
