//! What is in stock and who holds what, in memory.
//!
//! The [`Inventory`] owns, for the life of the process, one [`CodePool`] per
//! ticket type and one [`Ledger`] per activity. Catalog snapshots come and go
//! on reload; they borrow these by `Arc`, so a reload never resets stock or
//! claims. On one node the pools are filled at start-up from the store (and
//! by a reload that adds codes); in a cluster, [`lease`] keeps them stocked
//! with codes leased from the shared master lists, and knows the
//! cluster-wide counts. Either way the claim path only takes codes from a
//! pool, and puts back the ones whose commit failed.
//!
//! - [`pool`]: the lock-free pool of one ticket type's codes;
//! - [`ledger`]: one activity's claims per user and the per-user limit;
//! - [`lease`]: the lease worker (cluster mode): refill ahead of demand,
//!   wait for stock, give back idle codes, cluster-wide counts;
//! - `stock`: what is left of an activity, as the API shows it.

pub mod lease;
pub mod ledger;
mod pool;
mod stock;

use std::sync::{Arc, OnceLock};

use dashmap::DashMap;

pub use lease::{Leasing, Look, Tracked};
pub use ledger::{Ledger, Reservation};
pub use pool::{CodeArena, CodeIdx, CodePool};
pub use stock::Stock;

use crate::{store::StoreError, vocab::Claim};

/// Pools and ledgers by id.
#[derive(Default)]
pub struct Inventory {
    pools: DashMap<Arc<str>, Arc<CodePool>>,
    ledgers: DashMap<Arc<str>, Arc<Ledger>>,
    /// Set when the store hands out codes in leases (cluster mode).
    leasing: OnceLock<Arc<Leasing>>,
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

    /// The ledger of `activity_id` if it has one (never creates one: the id
    /// may be any string a client sent).
    pub fn existing_ledger(&self, activity_id: &str) -> Option<Arc<Ledger>> {
        self.ledgers.get(activity_id).map(|l| l.clone())
    }

    /// Every claim `user` holds, across activities, in this node's ledgers.
    pub fn claims_of_user(&self, user: u64) -> Vec<Claim> {
        self.ledgers.iter().flat_map(|l| l.claims_of(user)).collect()
    }

    /// Approximate heap bytes held by all pools.
    pub fn stock_bytes(&self) -> usize {
        self.pools.iter().map(|p| p.heap_bytes()).sum()
    }

    /// The lease worker's state, when the pools are stocked by leases.
    pub fn leasing(&self) -> Option<&Arc<Leasing>> {
        self.leasing.get()
    }

    /// From now on the pools are stocked by `leasing` (once, at start-up).
    pub fn lease_with(&self, leasing: Arc<Leasing>) {
        let _ = self.leasing.set(leasing);
    }

    /// Starts selling these activities' ticket types (`(activity, tickets)`).
    /// With leases, an activity seen for the first time first gets back what
    /// an earlier run of this node still had leased. Called at start-up and
    /// after every reload.
    pub fn track(&self, activities: &[Tracked]) -> Result<(), StoreError> {
        match self.leasing() {
            Some(leasing) => leasing.track(&|ticket| self.pool(ticket), activities),
            None => Ok(()),
        }
    }

    /// What is left of an activity with these ticket types and ledger: the
    /// cluster-wide counts (as of the last look) when stocked by leases,
    /// this node's pools and ledger otherwise.
    pub fn stock<'a>(&self, tickets: impl Iterator<Item = (&'a str, &'a CodePool)>, ledger: &Ledger) -> Stock {
        match self.leasing() {
            Some(leasing) => leasing.stock(tickets),
            None => {
                let tickets: Vec<(usize, usize)> = tickets.map(|(_, p)| (p.total(), p.remaining())).collect();
                Stock {
                    remaining: tickets.iter().map(|t| t.1).sum(),
                    claimed: ledger.claimed(),
                    tickets,
                }
            }
        }
    }

    /// Feeds into `state` every number [`Inventory::stock`] would show for
    /// these ticket types and ledger, without building it: for telling
    /// whether a rendering of the stock is still true.
    pub fn hash_stock<'a, H: std::hash::Hasher>(
        &self,
        tickets: impl Iterator<Item = (&'a str, &'a CodePool)>,
        ledger: &Ledger,
        state: &mut H,
    ) {
        match self.leasing() {
            Some(leasing) => {
                for (id, _) in tickets {
                    state.write_u64(leasing.counts_word(id));
                }
            }
            None => {
                for (_, pool) in tickets {
                    state.write_usize(pool.total());
                    state.write_usize(pool.remaining());
                }
                state.write_usize(ledger.claimed());
            }
        }
    }

    /// Re-reads an activity's cluster-wide counts (before `/act/detail`
    /// answers, so it counts what other nodes sold a moment ago). Nothing
    /// to do without leases.
    pub async fn refresh_counts(&self, activity_id: &str) -> Result<(), StoreError> {
        match self.leasing() {
            Some(leasing) => leasing.refresh_counts(activity_id).await,
            None => Ok(()),
        }
    }

    /// The last look's cluster-wide counts of `tickets`, an activity's
    /// ticket types as configured now. (The lease worker still counts a
    /// type a reload took out, whose leased codes it returns at the stop:
    /// a waiting room counting them admitted fans to codes nobody sells,
    /// and never closed.) `None` without leases.
    pub fn look(&self, tickets: &[&str]) -> Option<Look> {
        self.leasing().map(|leasing| leasing.look_of(tickets))
    }

    /// Whether codes of these ticket types may still be unsold somewhere
    /// other than this node's pools: on a master list or in any node's
    /// lease (cluster), as of the last look — or not looked at yet. Never
    /// without leases: then this node's pools are the whole stock.
    pub fn unsold_elsewhere<'a>(&self, tickets: impl Iterator<Item = &'a str>) -> bool {
        match self.leasing() {
            Some(leasing) => leasing.unsold(tickets),
            None => false,
        }
    }

    /// Whether a claim that found `tickets`' pools empty would wait for a
    /// lease ([`wait_for_stock`](Self::wait_for_stock)): in a cluster, with
    /// Redis answering, while a master list of one of them has codes.
    pub fn lease_would_wait<'a>(&self, mut tickets: impl Iterator<Item = &'a str>) -> bool {
        self.leasing()
            .is_some_and(|l| l.source_up() && tickets.any(|t| l.upstream(t) > 0))
    }

    /// Whether codes come by lease (a cluster) and, at the last look, only
    /// an import can bring a code of `tickets`: one has no code at all yet,
    /// the others none left.
    pub fn not_imported<'a>(&self, tickets: impl Iterator<Item = &'a str>) -> bool {
        self.leasing().is_some_and(|l| l.not_imported(tickets))
    }

    /// Whether codes come by lease (a cluster) and the master lists cannot
    /// be reached now: an empty pool then says nothing about the stock.
    pub fn leases_unreachable(&self) -> bool {
        self.leasing().is_some_and(|l| !l.source_up())
    }

    /// When these pools are empty: waits briefly if leases may still bring
    /// codes, and says whether some arrived. Without leases an empty pool is
    /// sold out at once. After a sell-out this is the path of every refused
    /// claim, so it allocates nothing.
    pub async fn wait_for_stock<'a, I>(&self, tickets: I) -> bool
    where
        I: Iterator<Item = (&'a str, &'a CodePool)> + Clone,
    {
        match self.leasing() {
            Some(leasing) => leasing.wait_for_stock(tickets).await,
            None => false,
        }
    }
}
