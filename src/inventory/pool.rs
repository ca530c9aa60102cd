//! A lock-free pool of one ticket type's unclaimed codes.
//!
//! Codes live once, as bytes, in an append-only [`CodeArena`]; the pool's
//! queues hold only their `u32` indexes. That keeps a stocked code at about
//! its own length plus ~20 bytes (a 4-byte offset and a 16-byte queue slot),
//! and makes taking one a pop of an integer. The arena is a list of
//! immutable chunks, one per batch added: growing it (a reload, or a lease in
//! cluster mode, many per rush) copies the list of chunk pointers, never the
//! codes already in it.
//!
//! # Taking without overselling
//! `remaining` counts codes that are in the queues and not yet promised to
//! anyone. [`CodePool::take`] first *reserves* by decrementing it with a CAS
//! (never below zero) and only then pops. Pushes increment it *after* the
//! code is in a queue. So the queues always hold at least as many codes as
//! there are reservations, and a reserved taker that scans the shards always
//! finds one; a taker that cannot reserve answers "sold out" from one atomic
//! load, touching no queue.
//!
//! # Sold out for good
//! A code taken for a claim may come back: its commit can fail. So an empty
//! pool is not yet sold out while claims are being committed, and "sold out"
//! is final (HTTP 410) only when the pool is [`drained`](CodePool::drained):
//! nothing in stock *and* nothing being committed. The two counts share one
//! atomic word — `remaining` in the low half, `committing` in the high half —
//! so a claim's take moves a code from one to the other in the same CAS, a
//! failed commit moves it back in one add, and a reader sees both at one
//! instant. Two separate counters would let a reader see the code in
//! neither place while it moved.
//!
//! The queues are sharded so that cores do not fight over one head pointer;
//! each thread starts at its own shard and moves on when it is empty.

use std::{
    cell::Cell,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
};

use arc_swap::ArcSwap;
use crossbeam_queue::SegQueue;
use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

/// The index of a code in its pool's arena.
pub type CodeIdx = u32;

/// Every code a pool has ever held: immutable chunks, each packing one
/// batch of codes into one buffer.
#[derive(Default)]
pub struct CodeArena {
    chunks: Vec<Arc<Chunk>>,
    len: usize,
}

/// One batch of codes: `bytes` holds them back to back, `ends[i]` is where
/// code `first + i` ends.
struct Chunk {
    first: usize,
    bytes: String,
    ends: Vec<u32>,
}

impl CodeArena {
    /// The code at `idx`.
    pub fn code(&self, idx: CodeIdx) -> &str {
        let idx = idx as usize;
        let chunk = &self.chunks[self.chunks.partition_point(|c| c.first <= idx) - 1];
        let i = idx - chunk.first;
        let start = if i == 0 { 0 } else { chunk.ends[i - 1] as usize };
        &chunk.bytes[start..chunk.ends[i] as usize]
    }

    /// How many codes the arena holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Every code the arena holds, in index order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.chunks.iter().flat_map(|c| {
            c.ends.iter().scan(0usize, move |start, &end| {
                let code = &c.bytes[*start..end as usize];
                *start = end as usize;
                Some(code)
            })
        })
    }

    /// Whether the arena holds no code.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes used by the arena's buffers.
    pub fn heap_bytes(&self) -> usize {
        let chunks: usize = self
            .chunks
            .iter()
            .map(|c| c.bytes.capacity() + c.ends.capacity() * std::mem::size_of::<u32>() + std::mem::size_of::<Chunk>())
            .sum();
        chunks + self.chunks.capacity() * std::mem::size_of::<Arc<Chunk>>()
    }

    /// This arena plus `codes` as a new chunk; the old chunks are shared.
    fn with<S: AsRef<str>>(&self, codes: &[S]) -> CodeArena {
        let mut bytes = String::with_capacity(codes.iter().map(|c| c.as_ref().len()).sum());
        let mut ends = Vec::with_capacity(codes.len());
        for c in codes {
            bytes.push_str(c.as_ref());
            ends.push(u32::try_from(bytes.len()).expect("a batch of codes is less than 4 GiB"));
        }
        let mut chunks = Vec::with_capacity(self.chunks.len() + 1);
        chunks.extend(self.chunks.iter().cloned());
        chunks.push(Arc::new(Chunk {
            first: self.len,
            bytes,
            ends,
        }));
        CodeArena {
            chunks,
            len: self.len + codes.len(),
        }
    }
}

/// The unclaimed codes of one ticket type.
pub struct CodePool {
    /// Swapped (copy on grow) only when codes are added: at start-up and on
    /// reload, and in a cluster at each lease (and when a code whose commit
    /// outcome was unknown is taken back), never on the claim path.
    arena: ArcSwap<CodeArena>,
    shards: Box<[CachePadded<SegQueue<CodeIdx>>]>,
    /// `remaining` (low 32 bits) and `committing` (high 32 bits); see the
    /// module docs. Both are at most the number of codes, below 2^32.
    counts: CachePadded<AtomicU64>,
    /// Serialises growers (a reload, the lease worker); never the claim path.
    grow: Mutex<()>,
    /// Codes of this ticket type claimed before this process started: the
    /// store loads only unclaimed codes into the pool, so the arena never
    /// holds these, yet they are part of what the ticket type had.
    claimed_earlier: AtomicUsize,
}

thread_local! {
    static HOME_SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_HOME: AtomicUsize = AtomicUsize::new(0);

/// One code being committed, in [`CodePool::counts`].
const COMMITTING: u64 = 1 << 32;
/// The `remaining` half of [`CodePool::counts`].
const REMAINING: u64 = COMMITTING - 1;

fn home_shard() -> usize {
    HOME_SHARD.with(|h| {
        if h.get() == usize::MAX {
            h.set(NEXT_HOME.fetch_add(1, Ordering::Relaxed));
        }
        h.get()
    })
}

impl Default for CodePool {
    fn default() -> Self {
        Self::new()
    }
}

impl CodePool {
    /// An empty pool with one shard per available core (at least two).
    pub fn new() -> CodePool {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 64);
        CodePool {
            arena: ArcSwap::from_pointee(CodeArena::default()),
            shards: (0..n).map(|_| CachePadded::new(SegQueue::new())).collect(),
            counts: CachePadded::new(AtomicU64::new(0)),
            grow: Mutex::new(()),
            claimed_earlier: AtomicUsize::new(0),
        }
    }

    /// Of `codes`, those this pool has never held (neither in stock nor
    /// taken, whether or not the claim is stored yet): what another process
    /// added to the store behind the node's back.
    pub fn unknown<'a>(&self, codes: &'a [String]) -> Vec<&'a str> {
        let arena = self.arena.load();
        let known: std::collections::HashSet<&str> = arena.iter().collect();
        codes
            .iter()
            .map(String::as_str)
            .filter(|c| !known.contains(c))
            .collect()
    }

    /// Adds codes to the arena and puts them in stock. Callers pass only codes
    /// that were never claimed and are not in the pool yet.
    pub fn add_codes<S: AsRef<str>>(&self, codes: &[S]) {
        if codes.is_empty() {
            return;
        }
        let _grow = self.grow.lock();
        let old = self.arena.load_full();
        let first = old.len();
        let grown = old.with(codes);
        let last = grown.len();
        assert!(last <= CodeIdx::MAX as usize, "a pool holds at most 2^32 codes");
        // Publish the arena before any index into it can be popped.
        self.arena.store(Arc::new(grown));
        for idx in first..last {
            self.put_back(idx as CodeIdx);
        }
    }

    /// Reserves and removes one code, or `None` when the pool is empty. O(1)
    /// unless other takers race for the last codes.
    pub fn take(&self) -> Option<CodeIdx> {
        self.reserve(1)
    }

    /// [`take`](Self::take) for a claim about to be committed: the code
    /// counts as *committing* until [`commit_ended`](Self::commit_ended) or
    /// [`commit_failed`](Self::commit_failed), so the pool is not
    /// [`drained`](Self::drained) meanwhile.
    pub fn take_for_commit(&self) -> Option<CodeIdx> {
        self.reserve(1u64.wrapping_sub(COMMITTING))
    }

    /// Reserves one code by subtracting `step` (whose low half is 1) from
    /// the counts, never taking `remaining` below zero, and pops it.
    fn reserve(&self, step: u64) -> Option<CodeIdx> {
        let mut cur = self.counts.load(Ordering::Relaxed);
        loop {
            if cur & REMAINING == 0 {
                return None;
            }
            match self
                .counts
                .compare_exchange_weak(cur, cur.wrapping_sub(step), Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        let n = self.shards.len();
        let home = home_shard();
        loop {
            for i in 0..n {
                if let Some(idx) = self.shards[(home + i) % n].pop() {
                    return Some(idx);
                }
            }
            // Our reservation guarantees a code; another reserved taker holds
            // the one we saw. Spin briefly rather than sleep: this only happens
            // in the handful of instructions between its pop and ours.
            std::hint::spin_loop();
        }
    }

    /// Returns a taken code that was not handed out (given back by a lease
    /// worker, or never committed).
    pub fn put_back(&self, idx: CodeIdx) {
        self.shards[home_shard() % self.shards.len()].push(idx);
        self.counts.fetch_add(1, Ordering::Release);
    }

    /// The commit of a code from [`take_for_commit`](Self::take_for_commit)
    /// is settled and the code is not coming back: claimed, or (in a
    /// cluster) found to be another node's.
    pub fn commit_ended(&self) {
        self.counts.fetch_sub(COMMITTING, Ordering::Release);
    }

    /// The commit of a code from [`take_for_commit`](Self::take_for_commit)
    /// failed: the code goes back in stock, in the same step that stops it
    /// counting as committing.
    pub fn commit_failed(&self, idx: CodeIdx) {
        self.shards[home_shard() % self.shards.len()].push(idx);
        self.counts.fetch_add(1u64.wrapping_sub(COMMITTING), Ordering::Release);
    }

    /// The code string at `idx`.
    pub fn code(&self, idx: CodeIdx) -> Arc<str> {
        Arc::from(self.arena.load().code(idx))
    }

    /// Codes in stock right now (not counting ones being claimed this instant).
    pub fn remaining(&self) -> usize {
        (self.counts.load(Ordering::Relaxed) & REMAINING) as usize
    }

    /// Codes taken by claims whose commit has not been answered yet.
    pub fn committing(&self) -> usize {
        (self.counts.load(Ordering::Relaxed) >> 32) as usize
    }

    /// No code in stock and none being committed: nothing can come back to
    /// this pool except codes added to it (an import, a lease).
    pub fn drained(&self) -> bool {
        self.counts.load(Ordering::Acquire) == 0
    }

    /// Every code the pool has held, claimed or not.
    pub fn known(&self) -> usize {
        self.arena.load().len()
    }

    /// Codes that left the pool for good: claimed, or taken and not put
    /// back (given back to a master list, dropped). A code taken for a
    /// commit counts only once its commit ended: a claim refused after
    /// taking one (the user at the limit on another node, a lapsed pass)
    /// puts it back and leaves this unchanged.
    pub fn gone(&self) -> usize {
        let counts = self.counts.load(Ordering::Acquire);
        let held = (counts & REMAINING) + (counts >> 32);
        self.known().saturating_sub(held as usize)
    }

    /// Counts a claim of this ticket type restored from the store at
    /// start-up, whose code the pool therefore never held.
    pub fn count_claimed_earlier(&self) {
        self.claimed_earlier.fetch_add(1, Ordering::Relaxed);
    }

    /// Every code of this ticket type: those the pool has held, and those
    /// claimed before this process started. What the API calls `total`.
    pub fn total(&self) -> usize {
        self.known() + self.claimed_earlier.load(Ordering::Relaxed)
    }

    /// Approximate heap bytes used by the pool (arena plus queue slots).
    pub fn heap_bytes(&self) -> usize {
        // A SegQueue slot of u32 is 16 bytes; blocks hold 31 slots and a pointer.
        let slots = self.remaining() * 16 * 32 / 31;
        self.arena.load().heap_bytes() + slots
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn takes_each_code_once_then_runs_dry() {
        let pool = CodePool::new();
        pool.add_codes(&["A", "BB", "CCC"]);
        let mut seen = HashSet::new();
        while let Some(i) = pool.take() {
            assert!(seen.insert(pool.code(i)));
        }
        assert_eq!(seen.len(), 3);
        assert!(seen.contains("BB"));
        assert_eq!(pool.remaining(), 0);
        pool.put_back(1);
        assert_eq!(&*pool.code(pool.take().unwrap()), "BB");
    }

    #[test]
    fn a_pool_is_drained_only_when_no_commit_can_bring_a_code_back() {
        let pool = CodePool::new();
        pool.add_codes(&["A", "B"]);
        let a = pool.take_for_commit().unwrap();
        let b = pool.take_for_commit().unwrap();
        assert_eq!((pool.remaining(), pool.committing()), (0, 2));
        assert!(pool.take_for_commit().is_none());
        assert!(!pool.drained(), "two commits may still fail");
        pool.commit_failed(a);
        assert_eq!((pool.remaining(), pool.committing()), (1, 1));
        assert_eq!(pool.take(), Some(a), "a failed commit's code is back in stock");
        pool.commit_ended();
        assert_eq!((pool.remaining(), pool.committing()), (0, 0));
        assert!(pool.drained());
        let _ = b;
    }

    #[test]
    fn concurrent_takers_never_share_a_code() {
        let pool = Arc::new(CodePool::new());
        let codes: Vec<String> = (0..20_000).map(|i| format!("C{i}")).collect();
        pool.add_codes(&codes);
        let taken: Vec<Vec<CodeIdx>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let pool = &pool;
                    s.spawn(move || std::iter::from_fn(|| pool.take()).collect::<Vec<_>>())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let all: Vec<CodeIdx> = taken.into_iter().flatten().collect();
        let distinct: HashSet<CodeIdx> = all.iter().copied().collect();
        assert_eq!(all.len(), 20_000);
        assert_eq!(distinct.len(), 20_000);
    }

    #[test]
    fn codes_added_in_many_batches_are_all_found() {
        let pool = CodePool::new();
        let mut all = Vec::new();
        for batch in 0..50 {
            let codes: Vec<String> = (0..batch % 7 + 1).map(|i| format!("B{batch}-{i}")).collect();
            pool.add_codes(&codes);
            all.extend(codes);
        }
        assert_eq!(pool.known(), all.len());
        for (i, code) in all.iter().enumerate() {
            assert_eq!(&*pool.code(i as CodeIdx), code.as_str());
        }
    }

    #[test]
    fn codes_added_later_join_the_stock() {
        let pool = CodePool::new();
        pool.add_codes(&["A"]);
        let a = pool.take().unwrap();
        pool.add_codes(&["B", "C"]);
        assert_eq!(&*pool.code(a), "A");
        assert_eq!(pool.remaining(), 2);
        assert_eq!(pool.known(), 3);
    }
}
