//! Memory per stocked code: counts the heap bytes a `CodePool` allocates for
//! one million 16-character codes (the length of generated codes).
//!
//! Run: `cargo bench --bench pool_memory`. Not a criterion bench: it measures
//! bytes with a counting allocator, not time.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering},
};

use ticketd::inventory::CodePool;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn main() {
    const N: usize = 1_000_000;
    let codes: Vec<String> = (0..N).map(|i| format!("{i:016}")).collect();
    let before = LIVE.load(Ordering::Relaxed);
    let pool = CodePool::new();
    pool.add_codes(&codes);
    let after = LIVE.load(Ordering::Relaxed);
    drop(codes);
    let per_code = (after - before) as f64 / N as f64;
    println!("pool_memory: {N} codes of 16 bytes in stock use {per_code:.1} heap bytes per code");
    assert_eq!(pool.remaining(), N);
}
