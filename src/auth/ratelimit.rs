//! Token buckets per key (user, client address) and login failure counts.
//!
//! Both live in [`BoundedMap`]s: a short shard lock for a few arithmetic
//! instructions, never held across an await, and a fixed number of entries
//! however many keys a flood invents. Idle entries are also swept by the
//! `guard-sweep` worker, so memory falls back after a flood.

use std::{
    hash::Hash,
    time::{Duration, Instant},
};

use super::bounded::BoundedMap;

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

impl Bucket {
    /// The tokens it holds at `now`, refilled at `rate` since it was last touched.
    fn refilled(&self, rate: Rate, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * rate.per_sec).min(rate.burst)
    }
}

/// `Ok` when `tokens` hold one; otherwise how long until they will.
fn has_token(tokens: f64, rate: Rate) -> Result<(), Duration> {
    if tokens >= 1.0 {
        Ok(())
    } else {
        Err(Duration::from_secs_f64((1.0 - tokens) / rate.per_sec.max(1e-9)))
    }
}

/// Token buckets keyed by `K`, at most `capacity` of them.
///
/// An evicted bucket comes back full: the same as a client idle long
/// enough, so eviction can only ever be generous, never lock anyone out.
pub struct TokenBuckets<K> {
    buckets: BoundedMap<K, Bucket>,
}

impl<K: Eq + Hash> TokenBuckets<K> {
    /// Buckets for at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        TokenBuckets {
            buckets: BoundedMap::new(capacity),
        }
    }

    /// Takes one token for `key`; on refusal, how long until one is available.
    pub fn take(&self, key: K, rate: Rate, now: Instant) -> Result<(), Duration> {
        let fresh = || Bucket {
            tokens: rate.burst,
            last: now,
        };
        self.buckets.with(key, now, fresh, |b| {
            b.tokens = b.refilled(rate, now);
            b.last = b.last.max(now);
            let has = has_token(b.tokens, rate);
            if has.is_ok() {
                b.tokens -= 1.0;
            }
            has
        })
    }

    /// Whether `key` has a token now, without taking it (nor making an
    /// entry: a key never seen has a full bucket); on refusal, how long
    /// until one is available.
    pub fn available(&self, key: &K, rate: Rate, now: Instant) -> Result<(), Duration> {
        let tokens = self.buckets.get(key, |b| b.refilled(rate, now)).unwrap_or(rate.burst);
        has_token(tokens, rate)
    }

    /// Drops buckets untouched for `idle` (they would be full again anyway).
    pub fn sweep(&self, now: Instant, idle: Duration) {
        self.buckets
            .retain(|_, touched| now.saturating_duration_since(touched) < idle);
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The most buckets held at once.
    pub fn capacity(&self) -> usize {
        self.buckets.capacity()
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

impl BackoffPolicy {
    /// How long failures are remembered once quiet (no new failure, and
    /// no lockout running): the longest lockout.
    fn forgive_after(&self) -> Duration {
        self.cap.max(self.base)
    }

    fn lockout(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(self.max_failures).min(30);
        self.base.saturating_mul(1 << doublings).min(self.cap)
    }
}

/// Why [`Backoff::begin`] refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Locked out after failures, for this long.
    Locked(Duration),
    /// The remaining budget is taken by attempts still being checked; retry
    /// after this long (they may yet succeed).
    Pending(Duration),
}

struct Strikes {
    failures: u32,
    /// The latest failure: once the policy's `cap` has passed after it and
    /// after the lockout it started, with no failure since, the failures
    /// are forgiven, so a shared address (a campus NAT) does not add up
    /// strangers' typos forever.
    last_failure: Instant,
    /// Attempts begun and not yet decided: they count against the budget,
    /// so concurrent guesses cannot all pass one check before any fails.
    in_flight: u32,
    /// `None` until a lockout starts. (Not "now at creation": requests read
    /// the clock before they reach the shard lock, so a request whose `now`
    /// is a microsecond older than the creator's would see a lockout.)
    locked_until: Option<Instant>,
}

impl Strikes {
    /// Whether the failures are old enough to forget: `forgive_after` has
    /// passed since the last failure *and* since the lockout it started
    /// ended. Counted from the failure alone, the longest lockout forgave
    /// itself the moment it ended, and a guesser who waited it out started
    /// over with a whole budget instead of one guess per lockout.
    fn forgiven(&self, policy: BackoffPolicy, now: Instant) -> bool {
        let quiet_since = self
            .locked_until
            .map_or(self.last_failure, |u| u.max(self.last_failure));
        self.failures > 0 && now.saturating_duration_since(quiet_since) >= policy.forgive_after()
    }
}

/// Failure counts per key (an address, an account at an address).
///
/// An attempt is counted when it *begins* ([`Backoff::begin`]), in the same
/// locked step as the check, and settled when its outcome is known: 64
/// concurrent guesses with a budget of 5 get 5 checks, not 64.
pub struct Backoff<K> {
    strikes: BoundedMap<K, Strikes>,
}

impl<K: Eq + Hash + Clone> Backoff<K> {
    /// Failure records for at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        Backoff {
            strikes: BoundedMap::new(capacity),
        }
    }

    /// Reserves one attempt for `key`, or `Err(wait)` while it is locked out
    /// or its remaining budget is taken by attempts still being checked.
    ///
    /// The budget is `max_failures - failures` before the first lockout and
    /// one attempt after each lockout ends (a further failure doubles it).
    /// Failures are forgiven once the longest lockout has passed without one.
    pub fn begin(&self, key: K, policy: BackoffPolicy, now: Instant) -> Result<(), Refusal> {
        let fresh = || Strikes {
            failures: 0,
            last_failure: now,
            in_flight: 0,
            locked_until: None,
        };
        self.strikes.with(key, now, fresh, |s| {
            if let Some(until) = s.locked_until.filter(|&u| u > now) {
                return Err(Refusal::Locked(until - now));
            }
            if s.forgiven(policy, now) {
                s.failures = 0;
                s.locked_until = None;
            }
            let budget = policy.max_failures.saturating_sub(s.failures).max(1);
            if s.in_flight >= budget {
                // The outstanding attempts decide first; a lockout may follow.
                return Err(Refusal::Pending(Duration::from_secs(1)));
            }
            s.in_flight += 1;
            Ok(())
        })
    }

    /// Settles a begun attempt as failed; returns the lockout it starts, if any.
    pub fn fail(&self, key: K, policy: BackoffPolicy, now: Instant) -> Option<Duration> {
        let fresh = || Strikes {
            failures: 0,
            last_failure: now,
            in_flight: 1,
            locked_until: None,
        };
        self.strikes.with(key, now, fresh, |s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.failures = s.failures.saturating_add(1);
            s.last_failure = now;
            if s.failures < policy.max_failures {
                return None;
            }
            let lock = policy.lockout(s.failures);
            s.locked_until = Some(now + lock);
            Some(lock)
        })
    }

    /// Settles a begun attempt that did not fail; with `forget` (a
    /// success), the key's failures are forgotten too — once no other
    /// attempt is being checked. Those may be an attacker's guesses raced
    /// alongside the owner's login: dropping the record under them used to
    /// lose their reservations and hand out a fresh budget while they were
    /// still being checked (nine guesses checked against a budget of five).
    pub fn settle(&self, key: &K, forget: bool) {
        self.strikes.update_or_remove(key, |s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.in_flight == 0 && (forget || s.failures == 0)
        });
    }

    /// Whether `key` is locked out now.
    pub fn is_locked(&self, key: &K, now: Instant) -> bool {
        self.strikes
            .get(key, |s| s.locked_until.is_some_and(|u| u > now))
            .unwrap_or(false)
    }

    /// Drops records idle for longer than `idle`, unless locked, being
    /// checked, or holding failures not yet forgiven under `policy` (swept
    /// sooner, a guesser's count started over every `idle`).
    pub fn sweep(&self, now: Instant, idle: Duration, policy: BackoffPolicy) {
        self.strikes.retain(|s, touched| {
            s.locked_until.is_some_and(|u| u > now)
                || s.in_flight > 0
                || (s.failures > 0 && !s.forgiven(policy, now))
                || now.saturating_duration_since(touched) < idle
        });
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.strikes.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.strikes.is_empty()
    }

    /// The most records held at once.
    pub fn capacity(&self) -> usize {
        self.strikes.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_the_burst_then_the_rate() {
        let b = TokenBuckets::new(1000);
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
        let g = Backoff::new(1000);
        let p = BackoffPolicy {
            max_failures: 3,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(5),
        };
        let t = Instant::now();
        let attempt = |t: Instant| {
            g.begin("u", p, t).unwrap();
            g.fail("u", p, t)
        };
        assert_eq!(attempt(t), None);
        assert_eq!(attempt(t), None);
        assert!(!g.is_locked(&"u", t));
        assert_eq!(attempt(t), Some(Duration::from_secs(1)));
        assert!(g.begin("u", p, t).is_err());
        let t = t + Duration::from_secs(1);
        assert_eq!(attempt(t), Some(Duration::from_secs(2)));
        let t = t + Duration::from_secs(2);
        assert_eq!(attempt(t), Some(Duration::from_secs(4)));
        let t = t + Duration::from_secs(4);
        assert_eq!(attempt(t), Some(Duration::from_secs(5)));
        g.settle(&"u", true);
        assert!(g.begin("u", p, t).is_ok());
    }

    #[test]
    fn failures_are_forgiven_after_the_longest_lockout() {
        let g = Backoff::new(1000);
        let p = BackoffPolicy {
            max_failures: 3,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        };
        let t = Instant::now();
        for _ in 0..2 {
            g.begin("nat", p, t).unwrap();
            g.fail("nat", p, t);
        }
        // Much later, strangers' old typos no longer count: three more are free.
        let later = t + Duration::from_secs(61);
        for _ in 0..2 {
            g.begin("nat", p, later).unwrap();
            assert_eq!(g.fail("nat", p, later), None);
        }
    }

    #[test]
    fn the_longest_lockout_does_not_forgive_itself() {
        let g = Backoff::new(1000);
        let p = BackoffPolicy {
            max_failures: 2,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(2),
        };
        let mut t = Instant::now();
        let attempt = |t: Instant| {
            g.begin("u", p, t).unwrap();
            g.fail("u", p, t)
        };
        attempt(t);
        assert_eq!(attempt(t), Some(Duration::from_secs(1)));
        t += Duration::from_secs(1);
        assert_eq!(attempt(t), Some(Duration::from_secs(2)), "the cap");
        // Waited out exactly: one guess, and a lockout again, not a budget.
        t += Duration::from_secs(2);
        assert_eq!(attempt(t), Some(Duration::from_secs(2)));
        assert!(g.begin("u", p, t).is_err());
        // Swept meanwhile, the record stays: its failures are not forgiven yet.
        g.sweep(t + Duration::from_secs(3), Duration::ZERO, p);
        assert!(g.begin("u", p, t + Duration::from_secs(2)).is_ok());
        assert_eq!(g.fail("u", p, t + Duration::from_secs(2)), Some(Duration::from_secs(2)));
        // Quiet for the cap after the lockout ends: forgiven, and swept.
        let later = t + Duration::from_secs(2 + 2 + 2);
        g.sweep(later, Duration::ZERO, p);
        assert!(g.is_empty());
    }

    #[test]
    fn a_request_that_read_the_clock_a_little_earlier_is_not_locked_out() {
        let g = Backoff::new(1000);
        let p = BackoffPolicy {
            max_failures: 5,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        };
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_micros(3);
        // The record is created by a request that read the clock at t1...
        g.begin("nat", p, t1).unwrap();
        // ...and one that read it at t0 reaches the shard lock after it.
        assert_eq!(g.begin("nat", p, t0), Ok(()));
    }

    #[test]
    fn a_success_amid_guesses_does_not_reopen_the_budget_under_them() {
        let g = Backoff::new(1000);
        let p = BackoffPolicy {
            max_failures: 5,
            base: Duration::from_secs(60),
            cap: Duration::from_secs(60),
        };
        let t = Instant::now();
        for _ in 0..5 {
            g.begin("victim", p, t).unwrap();
        }
        assert!(g.begin("victim", p, t).is_err(), "the budget is taken");
        // The owner's attempt succeeds while four guesses are still checked;
        // more guesses arrive before those four fail.
        g.settle(&"victim", true);
        let mut admitted = 0;
        while g.begin("victim", p, t).is_ok() {
            admitted += 1;
        }
        assert_eq!(admitted, 1, "the four guesses in flight still hold their places");
        for _ in 0..4 + admitted {
            g.fail("victim", p, t);
        }
        assert!(g.is_locked(&"victim", t), "five guesses, five failures: locked");
    }

    #[test]
    fn concurrent_attempts_share_one_budget() {
        let g = Backoff::new(1000);
        let p = BackoffPolicy {
            max_failures: 5,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        };
        let t = Instant::now();
        let begun = (0..64).filter(|_| g.begin("u", p, t).is_ok()).count();
        assert_eq!(begun, 5, "only the budget may be checked at once");
        // One attempt is abandoned (the client hung up): its slot comes back.
        g.settle(&"u", false);
        assert!(g.begin("u", p, t).is_ok());
        for _ in 0..5 {
            g.fail("u", p, t);
        }
        assert!(g.is_locked(&"u", t));
    }
}
