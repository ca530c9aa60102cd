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
//! across an await); one hash of the key picks the shard and finds the
//! entry in it. The eviction scan is linear in a shard (at most
//! `capacity / SHARDS` entries) and runs only when a full shard meets a new
//! key: a flood of new keys pays for itself, a known client never does.

use std::{hash::Hash, time::Instant};

use ahash::RandomState;
use hashbrown::{hash_table::Entry, HashTable};
use parking_lot::Mutex;

/// Shards per map: enough that the claim path rarely meets a held lock.
const SHARDS: usize = 64;

struct Slot<K, V> {
    key: K,
    value: V,
    touched: Instant,
}

/// A shard's entries, found by the one hash that also chose the shard.
type Shard<K, V> = Mutex<HashTable<Slot<K, V>>>;

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
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    /// `key`'s hash and its shard. The shard comes from bits 40..46: the
    /// table in the shard indexes by the low bits and tags by the top seven,
    /// so those stay spread within a shard.
    fn locate(&self, key: &K) -> (u64, &Shard<K, V>) {
        let hash = self.hasher.hash_one(key);
        (hash, &self.shards[(hash >> 40) as usize % SHARDS])
    }

    fn rehash(&self) -> impl Fn(&Slot<K, V>) -> u64 + '_ {
        |slot| self.hasher.hash_one(&slot.key)
    }

    /// Runs `f` on `key`'s entry, creating it with `init` if absent (evicting
    /// the shard's least recently touched entry when the shard is full), and
    /// marks it touched at `now`.
    pub fn with<R>(&self, key: K, now: Instant, init: impl FnOnce() -> V, f: impl FnOnce(&mut V) -> R) -> R {
        let (hash, shard) = self.locate(&key);
        let mut shard = shard.lock();
        let slot = match shard.entry(hash, |s| s.key == key, self.rehash()) {
            Entry::Occupied(found) => found.into_mut(),
            Entry::Vacant(vacant) => {
                // Only a new key at a full shard pays for the scan.
                let table = vacant.into_table();
                if table.len() >= self.per_shard {
                    evict_oldest(table);
                }
                let slot = Slot {
                    key,
                    value: init(),
                    touched: now,
                };
                table.insert_unique(hash, slot, self.rehash()).into_mut()
            }
        };
        slot.touched = slot.touched.max(now);
        f(&mut slot.value)
    }

    /// Runs `f` on `key`'s entry if it exists (without touching it).
    pub fn get<R>(&self, key: &K, f: impl FnOnce(&V) -> R) -> Option<R> {
        let (hash, shard) = self.locate(key);
        shard.lock().find(hash, |s| s.key == *key).map(|s| f(&s.value))
    }

    /// Runs `f` on `key`'s entry if it exists; removes the entry when `f`
    /// returns true.
    pub fn update_or_remove(&self, key: &K, f: impl FnOnce(&mut V) -> bool) {
        let (hash, shard) = self.locate(key);
        if let Ok(mut found) = shard.lock().find_entry(hash, |s| s.key == *key) {
            if f(&mut found.get_mut().value) {
                found.remove();
            }
        }
    }

    /// Removes `key`.
    pub fn remove(&self, key: &K) {
        let (hash, shard) = self.locate(key);
        if let Ok(found) = shard.lock().find_entry(hash, |s| s.key == *key) {
            found.remove();
        }
    }

    /// Keeps the entries for which `keep(value, last touched)` holds.
    pub fn retain(&self, mut keep: impl FnMut(&V, Instant) -> bool) {
        for shard in self.shards.iter() {
            shard.lock().retain(|s| keep(&s.value, s.touched));
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

fn evict_oldest<K, V>(shard: &mut HashTable<Slot<K, V>>) {
    let Some(oldest) = shard.iter().map(|s| s.touched).min() else {
        return;
    };
    let mut removed = false;
    shard.retain(|s| {
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
        map.with("b", t0, || 1, |_| ());
        assert_eq!(map.len(), 1);
        map.remove(&"b");
        assert!(map.is_empty());
    }
}
