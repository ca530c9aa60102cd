//! Token buckets per key (user, client address) and login backoff.
//!
//! Each bucket sits in a DashMap entry and is updated under that shard's
//! lock for a few arithmetic instructions; no lock is ever held across an
//! await. Idle buckets are swept by [`TokenBuckets::sweep`] so a flood of
//! distinct addresses cannot grow memory without bound.

use std::{
    hash::Hash,
    time::{Duration, Instant},
};

use dashmap::DashMap;

/// A token-bucket rate: `rate` tokens per second, at most `burst` saved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Refill per second.
    pub per_sec: f64,
    /// Bucket size.
    pub burst: f64,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets keyed by `K`.
pub struct TokenBuckets<K: Eq + Hash> {
    buckets: DashMap<K, Bucket>,
}

impl<K: Eq + Hash> Default for TokenBuckets<K> {
    fn default() -> Self {
        TokenBuckets {
            buckets: DashMap::new(),
        }
    }
}

impl<K: Eq + Hash> TokenBuckets<K> {
    /// Takes one token for `key`; on refusal, how long until one is available.
    pub fn take(&self, key: K, rate: Rate, now: Instant) -> Result<(), Duration> {
        let mut b = self.buckets.entry(key).or_insert(Bucket {
            tokens: rate.burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate.per_sec).min(rate.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate.per_sec.max(1e-9)))
        }
    }

    /// Drops buckets untouched for `idle` (they would be full again anyway).
    pub fn sweep(&self, now: Instant, idle: Duration) {
        self.buckets.retain(|_, b| now.saturating_duration_since(b.last) < idle);
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Backoff after repeated failures: `max_failures` free, then a lockout of
/// `base`, doubling with each further failure up to `cap`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    /// Failures before the first lockout.
    pub max_failures: u32,
    /// The first lockout.
    pub base: Duration,
    /// The longest lockout.
    pub cap: Duration,
}

struct Strikes {
    count: u32,
    locked_until: Instant,
    last: Instant,
}

/// Failure counts per key (a username, a client address).
pub struct Backoff<K: Eq + Hash> {
    strikes: DashMap<K, Strikes>,
}

impl<K: Eq + Hash> Default for Backoff<K> {
    fn default() -> Self {
        Backoff {
            strikes: DashMap::new(),
        }
    }
}

impl<K: Eq + Hash> Backoff<K> {
    /// `Err(wait)` while `key` is locked out.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        match self.strikes.get(key) {
            Some(s) if s.locked_until > now => Err(s.locked_until - now),
            _ => Ok(()),
        }
    }

    /// Counts a failure; returns the lockout it starts, if any.
    pub fn fail(&self, key: K, policy: BackoffPolicy, now: Instant) -> Option<Duration> {
        let mut s = self.strikes.entry(key).or_insert(Strikes {
            count: 0,
            locked_until: now,
            last: now,
        });
        s.count += 1;
        s.last = now;
        if s.count < policy.max_failures {
            return None;
        }
        let doublings = (s.count - policy.max_failures).min(30);
        let lock = policy.base.saturating_mul(1 << doublings).min(policy.cap);
        s.locked_until = now + lock;
        Some(lock)
    }

    /// Forgets `key`'s failures (after a success).
    pub fn clear(&self, key: &K) {
        self.strikes.remove(key);
    }

    /// Drops records idle for longer than `idle` and not locked.
    pub fn sweep(&self, now: Instant, idle: Duration) {
        self.strikes
            .retain(|_, s| s.locked_until > now || now.saturating_duration_since(s.last) < idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_the_burst_then_the_rate() {
        let b = TokenBuckets::default();
        let rate = Rate {
            per_sec: 2.0,
            burst: 3.0,
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(b.take(1u64, rate, t0).is_ok());
        }
        let wait = b.take(1u64, rate, t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(b.take(1u64, rate, t0 + Duration::from_millis(500)).is_ok());
        assert!(b.take(2u64, rate, t0).is_ok(), "keys are independent");
        b.sweep(t0 + Duration::from_secs(120), Duration::from_secs(60));
        assert!(b.is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let g = Backoff::default();
        let p = BackoffPolicy {
            max_failures: 3,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(5),
        };
        let t = Instant::now();
        assert_eq!(g.fail("u", p, t), None);
        assert_eq!(g.fail("u", p, t), None);
        assert!(g.check(&"u", t).is_ok());
        assert_eq!(g.fail("u", p, t), Some(Duration::from_secs(1)));
        assert!(g.check(&"u", t).is_err());
        assert_eq!(g.fail("u", p, t), Some(Duration::from_secs(2)));
        assert_eq!(g.fail("u", p, t), Some(Duration::from_secs(4)));
        assert_eq!(g.fail("u", p, t), Some(Duration::from_secs(5)));
        g.clear(&"u");
        assert!(g.check(&"u", t).is_ok());
    }
}
