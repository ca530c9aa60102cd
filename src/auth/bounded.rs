//! A map with a fixed capacity, for state an attacker can create.
//!
//! Every per-address and per-account table of the guard (claim buckets,
//! registration buckets, login failures) is keyed by something a client
//! chooses: a forged `X-Forwarded-For` through a trusted proxy, a fresh IPv6
//! address, a made-up username. A plain map grows with every key; this one
//! holds at most `capacity` entries and, when a new key arrives at a full
//! shard, **evicts the entry touched least recently in that shard**.
//!
//! Why that eviction is safe for each table is argued where the table is
//! declared ([`super::guard::Guard`]); in short, an evicted entry is
//! replaced by a fresh one, which is what an idle client gets anyway, and
//! pushing a *specific* entry out needs `capacity / SHARDS` new keys hashed to
//! its shard — keys hashed with a per-process random key (ahash, keyed at
//! start like SipHash, and cheaper on the claim path), so an attacker cannot
//! aim them.
//!
//! Sharded like a DashMap (a short `parking_lot` lock per shard, never held
//! across an await). The eviction scan is linear in a shard (at most
//! `capacity / SHARDS` entries) and runs only when a full shard meets a new
//! key: a flood of new keys pays for itself, a known client never does.

use std::{collections::HashMap, hash::Hash, time::Instant};

use ahash::RandomState;

use parking_lot::Mutex;

/// Shards per map: enough that the claim path rarely meets a held lock.
const SHARDS: usize = 64;

struct Slot<V> {
    value: V,
    touched: Instant,
}

type Shard<K, V> = Mutex<HashMap<K, Slot<V>, RandomState>>;

/// A sharded map of at most `capacity` entries with least-recently-touched eviction.
pub struct BoundedMap<K, V> {
    shards: Box<[Shard<K, V>]>,
    per_shard: usize,
    hasher: RandomState,
}

impl<K: Eq + Hash, V> BoundedMap<K, V> {
    /// A map holding at most `capacity` entries (rounded up to a multiple of
    /// the shard count; at least one per shard).
    pub fn new(capacity: usize) -> BoundedMap<K, V> {
        BoundedMap {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(RandomState::new())))
                .collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &K) -> &Shard<K, V> {
        // The low bits of a keyed hash are as good as any.
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Runs `f` on `key`'s entry, creating it with `init` if absent (evicting
    /// the shard's least recently touched entry when the shard is full), and
    /// marks it touched at `now`.
    pub fn with<R>(&self, key: K, now: Instant, init: impl FnOnce() -> V, f: impl FnOnce(&mut V) -> R) -> R {
        let mut shard = self.shard(&key).lock();
        // Only a full shard pays for the extra lookup.
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            evict_oldest(&mut shard);
        }
        let slot = shard.entry(key).or_insert_with(|| Slot {
            value: init(),
            touched: now,
        });
        slot.touched = slot.touched.max(now);
        f(&mut slot.value)
    }

    /// Runs `f` on `key`'s entry if it exists (without touching it).
    pub fn get<R>(&self, key: &K, f: impl FnOnce(&V) -> R) -> Option<R> {
        self.shard(key).lock().get(key).map(|s| f(&s.value))
    }

    /// Runs `f` on `key`'s entry if it exists; removes the entry when `f`
    /// returns true.
    pub fn update_or_remove(&self, key: &K, f: impl FnOnce(&mut V) -> bool) {
        let mut shard = self.shard(key).lock();
        if let Some(slot) = shard.get_mut(key) {
            if f(&mut slot.value) {
                shard.remove(key);
            }
        }
    }

    /// Removes `key`.
    pub fn remove(&self, key: &K) {
        self.shard(key).lock().remove(key);
    }

    /// Keeps the entries for which `keep(value, last touched)` holds.
    pub fn retain(&self, mut keep: impl FnMut(&V, Instant) -> bool) {
        for shard in self.shards.iter() {
            shard.lock().retain(|_, s| keep(&s.value, s.touched));
        }
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most entries the map will hold.
    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }
}

fn evict_oldest<K: Eq + Hash, V>(shard: &mut HashMap<K, Slot<V>, RandomState>) {
    // Find the oldest entry's position, then remove it via `retain` so the
    // key need not be cloned (keys are not required to be `Clone`).
    let Some(oldest) = shard.values().map(|s| s.touched).min() else {
        return;
    };
    let mut removed = false;
    shard.retain(|_, s| {
        if !removed && s.touched == oldest {
            removed = true;
            return false;
        }
        true
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn never_holds_more_than_its_capacity_and_evicts_the_least_recent() {
        let map = BoundedMap::new(SHARDS * 2);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            map.with(i, t0 + Duration::from_micros(u64::from(i)), || 0u32, |v| *v += 1);
        }
        assert_eq!(map.capacity(), SHARDS * 2);
        assert!(map.len() <= map.capacity(), "{}", map.len());
        // The newest keys survive; the oldest were evicted.
        assert_eq!(map.get(&9_999, |v| *v), Some(1));
        assert_eq!(map.get(&0, |v| *v), None);
    }

    #[test]
    fn a_touched_entry_outlives_newer_idle_ones() {
        // One shard's worth: with capacity 1 per shard, a key is evicted by
        // the next new key hashed to its shard unless it is the newer one.
        let map = BoundedMap::new(1);
        let t0 = Instant::now();
        map.with("a", t0, || 1, |_| ());
        map.with("a", t0 + Duration::from_secs(1), || 1, |v| *v += 1);
        assert_eq!(map.get(&"a", |v| *v), Some(2));
        map.update_or_remove(&"a", |v| {
            *v -= 1;
            *v == 1
        });
        assert!(map.is_empty());
    }
}
