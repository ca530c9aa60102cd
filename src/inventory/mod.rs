//! What is in stock and who holds what, in memory.
//!
//! The [`Inventory`] owns, for the life of the process, one [`CodePool`] per
//! ticket type and one [`Ledger`] per activity. Catalog snapshots come and go
//! on reload; they borrow these by `Arc`, so a reload never resets stock or
//! claims. Both are filled at start-up from the store and then changed only by
//! the claim path (and by reload adding codes).

mod pool;

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use dashmap::DashMap;

pub use pool::{CodeArena, CodeIdx, CodePool};

use crate::claim::Claim;

/// Pools and ledgers by id.
#[derive(Default)]
pub struct Inventory {
    pools: DashMap<Arc<str>, Arc<CodePool>>,
    ledgers: DashMap<Arc<str>, Arc<Ledger>>,
}

impl Inventory {
    /// The pool of `ticket_id`, created empty on first use.
    pub fn pool(&self, ticket_id: &str) -> Arc<CodePool> {
        if let Some(p) = self.pools.get(ticket_id) {
            return p.clone();
        }
        self.pools.entry(Arc::from(ticket_id)).or_default().clone()
    }

    /// The ledger of `activity_id`, created empty on first use.
    pub fn ledger(&self, activity_id: &str) -> Arc<Ledger> {
        if let Some(l) = self.ledgers.get(activity_id) {
            return l.clone();
        }
        self.ledgers.entry(Arc::from(activity_id)).or_default().clone()
    }

    /// Every claim `user` holds, across activities.
    pub fn claims_of_user(&self, user: u64) -> Vec<Claim> {
        self.ledgers.iter().flat_map(|l| l.claims_of(user)).collect()
    }

    /// Approximate heap bytes held by all pools.
    pub fn stock_bytes(&self) -> usize {
        self.pools.iter().map(|p| p.heap_bytes()).sum()
    }
}

/// One activity's claims per user, and the claims being committed right now.
///
/// The per-user limit is enforced here: a claim first *reserves* a slot under
/// the user's map entry (a short DashMap shard lock, never held across an
/// await), so fifty parallel requests of one user cannot all pass the check.
#[derive(Default)]
pub struct Ledger {
    users: DashMap<u64, UserClaims>,
    claimed: AtomicUsize,
    /// Claims of this activity being decided or committed (admission control).
    pub in_flight: AtomicUsize,
}

/// What one user holds in one activity.
#[derive(Default)]
struct UserClaims {
    claims: Vec<Claim>,
    /// Claims reserved but not yet durable.
    pending: u32,
    /// Idempotency keys of the pending claims.
    pending_keys: Vec<Arc<str>>,
}

/// The answer of [`Ledger::reserve`].
#[derive(Debug)]
pub enum Reservation {
    /// A slot is reserved; commit or release it.
    Reserved,
    /// This idempotency key already has a claim: answer it again.
    Replay(Claim),
    /// A claim with this idempotency key is being committed right now.
    InProgress,
    /// The user holds (or is committing) the limit; here are their codes.
    LimitReached(Vec<Arc<str>>),
}

impl Ledger {
    /// Reserves a claim slot for `user` if they are under `limit`.
    pub fn reserve(&self, user: u64, limit: u32, key: Option<&Arc<str>>) -> Reservation {
        let mut entry = self.users.entry(user).or_default();
        let held = &mut *entry;
        if let Some(key) = key {
            if let Some(c) = held
                .claims
                .iter()
                .find(|c| c.idempotency_key.as_deref() == Some(&**key))
            {
                return Reservation::Replay(c.clone());
            }
            if held.pending_keys.iter().any(|k| **k == **key) {
                return Reservation::InProgress;
            }
        }
        if held.claims.len() as u64 + u64::from(held.pending) >= u64::from(limit) {
            return Reservation::LimitReached(held.claims.iter().map(|c| c.code.clone()).collect());
        }
        held.pending += 1;
        if let Some(key) = key {
            held.pending_keys.push(key.clone());
        }
        Reservation::Reserved
    }

    /// The answer `reserve` would give without reserving: a replay, the limit
    /// reached, or `None`. Takes only a read lock and never inserts.
    pub fn peek(&self, user: u64, limit: u32, key: Option<&str>) -> Option<Reservation> {
        let held = self.users.get(&user)?;
        if let Some(key) = key {
            if let Some(c) = held.claims.iter().find(|c| c.idempotency_key.as_deref() == Some(key)) {
                return Some(Reservation::Replay(c.clone()));
            }
        }
        (held.claims.len() as u64 >= u64::from(limit))
            .then(|| Reservation::LimitReached(held.claims.iter().map(|c| c.code.clone()).collect()))
    }

    /// Turns a reservation into a held claim (it is durable now).
    pub fn confirm(&self, claim: Claim) {
        let mut entry = self.users.entry(claim.user_id).or_default();
        entry.end_pending(claim.idempotency_key.as_ref());
        entry.claims.push(claim);
        self.claimed.fetch_add(1, Ordering::Relaxed);
    }

    /// Gives a reservation back (the claim failed).
    pub fn release(&self, user: u64, key: Option<&Arc<str>>) {
        if let Some(mut entry) = self.users.get_mut(&user) {
            entry.end_pending(key);
        }
    }

    /// Records a claim loaded from the store at start-up.
    pub fn restore(&self, claim: Claim) {
        self.users.entry(claim.user_id).or_default().claims.push(claim);
        self.claimed.fetch_add(1, Ordering::Relaxed);
    }

    /// The claims `user` holds, oldest first.
    pub fn claims_of(&self, user: u64) -> Vec<Claim> {
        self.users.get(&user).map(|e| e.claims.clone()).unwrap_or_default()
    }

    /// Durable claims in this activity.
    pub fn claimed(&self) -> usize {
        self.claimed.load(Ordering::Relaxed)
    }
}

impl UserClaims {
    fn end_pending(&mut self, key: Option<&Arc<str>>) {
        self.pending = self.pending.saturating_sub(1);
        if let Some(key) = key {
            if let Some(i) = self.pending_keys.iter().position(|k| **k == **key) {
                self.pending_keys.swap_remove(i);
            }
        }
    }
}
