//! Leasing (cluster mode): keeps this node's pools stocked with codes leased
//! from the shared master lists, renews the leases, gives back what the node
//! no longer sells, and knows the cluster-wide counts.
//!
//! The store does the Redis side, one atomic script per step
//! ([`LeaseSource`]); this module decides *when* and *how much*, because that
//! depends on the pools and on how fast they empty.
//!
//! # Batch size
//! A node leases about `cluster.lease_ahead` worth of its recent claim rate
//! (within `lease_min_batch..=lease_max_batch`) whenever its pool falls
//! below half of that, so it refills ahead of running dry; a claim that
//! finds the pool empty marks the ticket *hungry*, which doubles the next
//! batch and leases at once. The lease script caps every batch at half the
//! node's share of what is left, so near the end batches shrink to single
//! codes. A node that sold nothing for two seconds while the master list is
//! empty gives its codes back, so the last codes go where the buyers are.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{pool::CodePool, stock::Stock};
use crate::{
    config::ClusterConfig,
    store::{ClusterError, LeaseSource, Leased, NodeSettings, StoreError},
    worker::{Ctl, Stop},
};

/// How often the loop looks at the pools.
const TICK: Duration = Duration::from_millis(10);
/// Unknown master-list length.
const UNKNOWN: usize = usize::MAX;
/// Counts not read yet: nothing may be called sold out on them.
const UNCOUNTED: u64 = u64::MAX;

/// An activity whose ticket types this node sells, as
/// [`Inventory::track`](super::Inventory::track) takes it.
pub struct Tracked {
    /// The activity's id.
    pub id: Arc<str>,
    /// Its per-user limit and pause as this node's config sets them (in a
    /// cluster, claims hold to the lowest of the live nodes' limits, and a
    /// difference in either is said).
    pub settings: NodeSettings,
    /// Its ticket types' ids.
    pub tickets: Vec<Arc<str>>,
}

/// Cluster-wide counts of an activity's ticket types, as the last look kept
/// them ([`Leasing::look_of`]).
#[derive(Debug, Clone, Copy)]
pub struct Look {
    /// Codes not sold anywhere: on a master list, in a lease, in doubt.
    pub remaining: usize,
    /// Some ticket type has codes unsold, or none at all yet (not imported):
    /// as [`Leasing::unsold`] says.
    pub unsold: bool,
}

/// The lease worker's state, shared with the claim path.
pub struct Leasing {
    source: LeaseSource,
    cfg: ClusterConfig,
    tickets: DashMap<Arc<str>, Arc<TicketLease>>,
    /// Woken after each lease and renewal (claims waiting for stock re-check).
    stock_changed: Notify,
    /// Per activity (one for each that was looked at: the callers name
    /// configured activities only), the looks at its counts in Redis.
    looks: DashMap<Arc<str>, Arc<LookGate>>,
}

/// One activity's looks at its cluster-wide counts, shared by whoever asks
/// at once. Every `/act/detail` asked Redis itself — one script per
/// request, anonymous ones included, on the Redis every node's claims
/// commit through: a crowd (or a bot) refreshing the page at the start
/// became that many scripts. Now a caller takes the answer of a look that
/// *began after it asked* (so it still counts what any node sold before),
/// and at most one look per activity runs at a time on a node.
struct LookGate {
    /// Looks begun so far.
    begun: AtomicU64,
    /// Whether the last look succeeded, or why it failed (shared too: a
    /// Redis that does not answer is waited for once, not once per caller
    /// in turn); locked while a look runs.
    last: tokio::sync::Mutex<Option<Result<(), String>>>,
}

/// One ticket type this node sells by lease, and what it knows of its stock.
struct TicketLease {
    activity: Arc<str>,
    ticket: Arc<str>,
    pool: Arc<CodePool>,
    /// Codes on the master list at the last look; [`UNKNOWN`] until known.
    upstream: AtomicUsize,
    /// A claim is waiting for codes: lease now.
    hungry: AtomicBool,
    /// A lease or give-back failed with its outcome unknown: Redis may hold
    /// codes in this node's lease that its pool does not (a lease whose
    /// answer was lost). Until resynchronised they would sit there, renewed
    /// forever, neither sold nor reclaimed.
    resync: AtomicBool,
    /// Cluster-wide codes known (high 32 bits) and sold (low 32 bits) at
    /// the last look, in one word so that a reader never pairs one look's
    /// total with another's sales (which could understate what is left,
    /// and call a ticket sold out that is not); [`UNCOUNTED`] before the
    /// first look.
    counts: AtomicU64,
    rate: Mutex<Rate>,
}

/// Claim-rate bookkeeping of one ticket type.
struct Rate {
    taken: usize,
    at: Instant,
    /// Codes taken per second (smoothed).
    per_sec: f64,
    /// [`CodePool::gone`] when last looked at.
    gone: usize,
    /// When the pool last sold a code (or lost one for good): what "idle"
    /// is measured from. Not from takes: a claim refused after taking a
    /// code puts it back, and a stream of those (an account at its limit
    /// through another node, claiming here) kept a node holding the last
    /// codes from ever looking idle, while buyers at other nodes heard
    /// STOCK_IN_FLIGHT.
    last_sale: Instant,
    last_batch: usize,
    /// Leased at least once since start (or since a resync): before that
    /// the node leases without waiting for demand, to be ready.
    leased_once: bool,
    /// When this node last gave idle codes back: it leases none of this
    /// ticket type again for [`GIVEN_BACK_FOR`], so that the buyers at
    /// other nodes the give-back is for can have them. (Its own claims
    /// found the pool empty at once and leased them straight back, in the
    /// same step: a node whose claims were all refused by Redis, the one
    /// case where an idle node still has claimers, kept the codes for ever.)
    gave_back: Option<Instant>,
}

/// How long a node that gave idle codes back leases none of them again:
/// long enough for other nodes' heartbeats to see them on the master list.
const GIVEN_BACK_FOR: Duration = Duration::from_secs(2);

impl Rate {
    /// The pool shrank by giving back or dropping codes, not by selling
    /// them: neither a claim rate nor a sale.
    fn not_sold(&mut self, pool: &CodePool) {
        self.taken = pool.known() - pool.remaining();
        self.gone = pool.gone();
    }

    fn new() -> Rate {
        let now = Instant::now();
        Rate {
            taken: 0,
            at: now,
            per_sec: 0.0,
            gone: 0,
            last_sale: now,
            last_batch: 0,
            leased_once: false,
            gave_back: None,
        }
    }
}

/// Whether a ticket type with `known` codes in the cluster, `remaining` of
/// them not sold, is unsold: codes left somewhere, or none imported yet
/// (its codes are still to come). Sold out is final; this is not.
fn unsold(known: usize, remaining: usize) -> bool {
    remaining > 0 || known == 0
}

impl TicketLease {
    /// Keeps a look's counts; warns when it finds no code of this ticket
    /// type at all (no import has filled it yet), once per change. Both
    /// counts only grow in Redis (a code is never unknown again, a sale
    /// never undone), so each half keeps the larger of what it held and
    /// what this look says: a heartbeat's look, read before a fresher one
    /// but kept after it, cannot bring back a code that has been sold, and
    /// "sold out" stays final for every reader.
    fn set_counts(&self, known: usize, sold: usize) {
        let half = |n: usize| u64::try_from(n).unwrap_or(u64::MAX).min(u64::from(u32::MAX));
        let low = u64::from(u32::MAX);
        let (known, sold) = (half(known), half(sold));
        let before = self
            .counts
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(match old {
                    UNCOUNTED => known << 32 | sold,
                    old => (old >> 32).max(known) << 32 | (old & low).max(sold),
                })
            })
            .unwrap_or(UNCOUNTED);
        let was_known = (before != UNCOUNTED).then_some(before >> 32);
        let (was_empty, empty) = (was_known == Some(0), was_known.unwrap_or(0).max(known) == 0);
        if was_empty != empty {
            if empty {
                tracing::warn!(
                    activity = %self.activity,
                    ticket = %self.ticket,
                    "No code of this ticket type is in Redis: nobody has imported it yet."
                );
            } else {
                tracing::info!(activity = %self.activity, ticket = %self.ticket, codes = known, "Its codes are in Redis now: on sale.");
            }
        }
    }

    /// `(total, remaining, sold)`; `None` before the first look.
    fn counts(&self) -> Option<(usize, usize, usize)> {
        let counts = self.counts.load(Ordering::Relaxed);
        if counts == UNCOUNTED {
            return None;
        }
        let (known, sold) = ((counts >> 32) as usize, (counts & u64::from(u32::MAX)) as usize);
        Some((known, known.saturating_sub(sold), sold))
    }
}

impl Leasing {
    /// Leasing from `source` with `[cluster]`'s batch policy.
    pub fn new(source: LeaseSource, cfg: &ClusterConfig) -> Leasing {
        Leasing {
            source,
            cfg: cfg.clone(),
            tickets: DashMap::new(),
            stock_changed: Notify::new(),
            looks: DashMap::new(),
        }
    }

    /// Starts leasing `activities`' ticket types, all or none: the store
    /// tracks each first, and only once every one is tracked do their
    /// ticket types join the leases. A reload refused halfway (one
    /// activity's Redis call failed) used to have started leasing the
    /// activities tracked before it: the lease loop leased codes of an
    /// activity the node did not sell, and renewed them while it ran, so
    /// the other nodes were short of them at the sell-out. What this call
    /// tracked is now untracked again.
    pub(super) fn track(&self, pool: &dyn Fn(&str) -> Arc<CodePool>, activities: &[Tracked]) -> Result<(), StoreError> {
        let mut before = Vec::new();
        for Tracked {
            id: activity, tickets, ..
        } in activities
        {
            before.push((activity, self.source.tracked(activity)));
            match self.source.track(activity, tickets) {
                Ok(0) => {}
                Ok(returned) => {
                    tracing::info!(activity = %activity, codes = returned, "Returned the codes an earlier run of this node had leased.");
                }
                Err(error) => {
                    for (activity, tickets) in before {
                        self.source.restore(activity, tickets);
                    }
                    return Err(error);
                }
            }
        }
        for Tracked {
            id: activity, tickets, ..
        } in activities
        {
            for t in tickets {
                self.tickets.entry(t.clone()).or_insert_with(|| {
                    Arc::new(TicketLease {
                        activity: activity.clone(),
                        ticket: t.clone(),
                        pool: pool(t),
                        upstream: UNKNOWN.into(),
                        hungry: false.into(),
                        resync: false.into(),
                        counts: UNCOUNTED.into(),
                        rate: Mutex::new(Rate::new()),
                    })
                });
            }
        }
        // Only once every activity is tracked: a reload refused halfway
        // must not have published the new limits and pauses.
        let settings: Vec<_> = activities.iter().map(|a| (a.id.clone(), a.settings)).collect();
        self.source.set_node_settings(&settings);
        Ok(())
    }

    pub(super) fn stock<'a>(&self, tickets: impl Iterator<Item = (&'a str, &'a CodePool)>) -> Stock {
        let mut stock = Stock {
            remaining: 0,
            claimed: 0,
            tickets: Vec::new(),
        };
        for (id, _) in tickets {
            let (total, remaining, sold) = self.tickets.get(id).and_then(|t| t.counts()).unwrap_or((0, 0, 0));
            stock.remaining += remaining;
            stock.claimed += sold;
            stock.tickets.push((total, remaining));
        }
        stock
    }

    /// The packed cluster-wide counts of `ticket` as of the last look (what
    /// [`Leasing::stock`] shows), for fingerprints.
    pub(super) fn counts_word(&self, ticket: &str) -> u64 {
        self.tickets.get(ticket).map_or(0, |t| t.counts.load(Ordering::Relaxed))
    }

    /// Reads `activity`'s cluster-wide counts in a look begun after this
    /// call (shared with the callers asking at the same time: see
    /// [`LookGate`]) and keeps them for [`Leasing::stock`] and
    /// [`Leasing::look_of`]: a caller that must order the look after other
    /// reads (the waiting room's admitter) then reads counts at least as new
    /// as those reads, since each half of a kept count only grows (see
    /// `set_counts`).
    pub(super) async fn refresh_counts(&self, activity: &str) -> Result<(), StoreError> {
        if !self.source.is_up() {
            // The last call to Redis failed: callers do not queue up behind
            // looks that wait out its timeout one after another. (The
            // heartbeat and the lease loop find it back.)
            return Err(ClusterError::Shared("Redis cannot be reached now".into()).into());
        }
        let gate = match self.looks.get(activity) {
            Some(gate) => gate.clone(),
            None => self
                .looks
                .entry(Arc::from(activity))
                .or_insert_with(|| {
                    Arc::new(LookGate {
                        begun: AtomicU64::new(0),
                        last: tokio::sync::Mutex::new(None),
                    })
                })
                .clone(),
        };
        let asked = gate.begun.load(Ordering::Acquire);
        let mut last = gate.last.lock().await;
        // Looks begin only under the lock: one begun since we asked has ended.
        if gate.begun.load(Ordering::Acquire) > asked {
            match &*last {
                Some(Ok(())) => return Ok(()),
                Some(Err(why)) => return Err(ClusterError::Shared(why.clone()).into()),
                None => {}
            }
        }
        // Cleared first: a look cancelled mid-way (its caller gone) must not
        // leave the one before it as the answer to those who asked since.
        *last = None;
        gate.begun.fetch_add(1, Ordering::AcqRel);
        let looked = self.look_at_counts(activity).await;
        *last = Some(looked.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        looked
    }

    /// One look at `activity`'s counts in Redis (see [`Leasing::refresh_counts`]).
    async fn look_at_counts(&self, activity: &str) -> Result<(), StoreError> {
        for (ticket, known, sold) in self.source.counts(activity).await? {
            if let Some(t) = self.tickets.get(&ticket) {
                t.set_counts(known, sold);
            }
        }
        Ok(())
    }

    /// The last look's counts of `tickets` alone: codes not sold anywhere
    /// (a type not counted yet adds none), and whether any may still be.
    pub(super) fn look_of(&self, tickets: &[&str]) -> Look {
        let remaining = tickets
            .iter()
            .filter_map(|id| self.tickets.get(*id).and_then(|t| t.counts()))
            .map(|(_, remaining, _)| remaining)
            .sum();
        Look {
            remaining,
            unsold: self.unsold(tickets.iter().copied()),
        }
    }

    /// Whether any of `tickets` has codes not yet sold anywhere in the
    /// cluster (master list, leases, doubts) as of the last look, has not
    /// been counted yet, or has no code at all (nobody imported it yet: its
    /// codes are still to come). The counts are read in one script, and a
    /// later look can only find fewer unsold codes (or codes imported
    /// since), so `false` here is final.
    pub(super) fn unsold<'a>(&self, mut tickets: impl Iterator<Item = &'a str>) -> bool {
        tickets.any(|id| match self.tickets.get(id).and_then(|t| t.counts()) {
            Some((known, remaining, _)) => unsold(known, remaining),
            None => true,
        })
    }

    /// Whether, at the last look, some of `tickets` had no code at all
    /// (configured on this node, but nobody has run `ticketd import` with
    /// it) and none had a code left anywhere: then only an import can bring
    /// one. (When one has codes on a list or in a lease, a claim is told to
    /// retry shortly instead, as for any code in flight.)
    pub(super) fn not_imported<'a>(&self, tickets: impl Iterator<Item = &'a str>) -> bool {
        let mut unimported = false;
        for id in tickets {
            match self.tickets.get(id).and_then(|t| t.counts()) {
                Some((0, _, _)) => unimported = true,
                Some((_, 0, _)) => {}
                // Codes left somewhere, or not counted yet.
                _ => return false,
            }
        }
        unimported
    }

    /// Waits up to half a second for codes when the given pools are empty but
    /// a master list is not (or has not been looked at yet).
    pub(super) async fn wait_for_stock<'a, I>(&self, tickets: I) -> bool
    where
        I: Iterator<Item = (&'a str, &'a CodePool)> + Clone,
    {
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            let notified = self.stock_changed.notified();
            if tickets.clone().any(|(_, p)| p.remaining() > 0) {
                return true;
            }
            let mut waiting = false;
            for (id, _) in tickets.clone() {
                if let Some(t) = self.tickets.get(id) {
                    if t.upstream.load(Ordering::Relaxed) > 0 {
                        t.hungry.store(true, Ordering::Relaxed);
                        waiting = true;
                    }
                }
            }
            if !waiting || !self.source.is_up() {
                return false;
            }
            if tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
                return tickets.clone().any(|(_, p)| p.remaining() > 0);
            }
        }
    }

    /// Codes on `ticket`'s master list, as last seen (0 for a ticket type
    /// this node does not lease).
    pub(super) fn upstream(&self, ticket: &str) -> usize {
        self.tickets
            .get(ticket)
            .map_or(0, |t| t.upstream.load(Ordering::Relaxed))
    }

    /// Whether Redis, where the master lists are, answered the last command.
    pub(super) fn source_up(&self) -> bool {
        self.source.is_up()
    }

    /// Codes leased to this node and not yet claimed: `(activity, ticket, codes)`.
    pub fn leased(&self) -> Vec<(String, String, usize)> {
        self.tickets
            .iter()
            .map(|t| (t.activity.to_string(), t.ticket.to_string(), t.pool.remaining()))
            .collect()
    }
}

/// The lease worker. Every tick: refill pools that need it. Every quarter
/// lease TTL (or `refresh_interval`, if shorter): renew the leases and re-read
/// the master-list lengths and counts. Every second: give back idle stock,
/// take back codes whose commit outcome was unknown, and resynchronise a
/// lease after a call whose answer was lost. While the store is
/// unreachable: probe it every 100 ms. On stop: give every leased code back.
pub async fn run(leasing: Arc<Leasing>, ctl: Ctl, mut stop: Stop) {
    let ttl = leasing.cfg.lease_ttl.0;
    let heartbeat_every = (ttl / 4).min(leasing.cfg.refresh_interval.0);
    let (mut next_heartbeat, mut next_second, mut next_probe) = (Instant::now(), Instant::now(), Instant::now());
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if !stop.tick(&mut tick).await {
            break;
        }
        ctl.tick();
        let now = Instant::now();
        let up = leasing.source.is_up();
        if up {
            refill(&leasing, &ctl).await;
        }
        if now >= next_heartbeat {
            next_heartbeat = now + heartbeat_every;
            if let Err(error) = renew(&leasing).await {
                ctl.error(&error);
                tracing::debug!(%error, "Lease renewal failed.");
            }
        }
        if !up && now >= next_probe {
            next_probe = now + Duration::from_millis(100);
            leasing.source.probe().await;
        }
        if up && now >= next_second {
            next_second = now + Duration::from_secs(1);
            if let Err(error) = take_back_doubts(&leasing).await {
                ctl.error(&error);
                tracing::debug!(%error, "Settling codes in doubt failed.");
            }
            if let Err(error) = give_back_idle(&leasing).await {
                ctl.error(&error);
                tracing::debug!(%error, "Giving back idle codes failed.");
            }
            if let Err(error) = resync(&leasing).await {
                ctl.error(&error);
                tracing::debug!(%error, "Resynchronising a lease failed.");
            }
        }
    }
    match leasing.source.release_all().await {
        Ok(n) => tracing::info!(codes = n, "Leased codes returned to the master lists."),
        Err(error) => {
            tracing::error!(%error, "Could not return leased codes; live nodes reclaim them after cluster.lease_ttl.")
        }
    }
}

async fn refill(leasing: &Leasing, ctl: &Ctl) {
    let stocks: Vec<Arc<TicketLease>> = leasing.tickets.iter().map(|t| t.value().clone()).collect();
    let ahead = leasing.cfg.lease_ahead.0.as_secs_f64();
    let (min, max) = (leasing.cfg.lease_min_batch, leasing.cfg.lease_max_batch);
    for t in stocks {
        let remaining = t.pool.remaining();
        let hungry = t.hungry.swap(false, Ordering::Relaxed);
        let want = {
            let mut r = t.rate.lock();
            let taken = t.pool.known() - remaining;
            let now = Instant::now();
            // Only a rise is a sale (a look between an arena's growth and
            // its codes going into stock can read one code too many).
            let gone = t.pool.gone();
            if gone > r.gone {
                r.last_sale = now;
            }
            r.gone = gone;
            let dt = now.duration_since(r.at).as_secs_f64();
            if dt >= 0.1 {
                let instant = (taken - r.taken.min(taken)) as f64 / dt;
                r.per_sec = 0.5 * r.per_sec + 0.5 * instant;
                (r.taken, r.at) = (taken, now);
            }
            let mut want = ((r.per_sec * ahead) as usize).clamp(min, max);
            if hungry {
                want = want.max((r.last_batch * 2).min(max));
            }
            let selling = r.per_sec > 0.5 || hungry || !r.leased_once;
            let giving_back = r.gave_back.is_some_and(|at| at.elapsed() < GIVEN_BACK_FOR);
            if remaining > want / 2 || !selling || giving_back || t.upstream.load(Ordering::Relaxed) == 0 {
                continue;
            }
            r.leased_once = true;
            want - remaining.min(want)
        };
        if want == 0 {
            continue;
        }
        match leasing.source.lease(&t.activity, &t.ticket, want).await {
            Ok(leased) if leased.reclaimed => {
                t.upstream.store(leased.left, Ordering::Relaxed);
                // What was just leased goes back with the rest.
                reclaimed(&t);
            }
            Ok(Leased { left, codes, .. }) => {
                t.upstream.store(left, Ordering::Relaxed);
                let n = codes.len();
                if n > 0 {
                    t.pool.add_codes(&codes);
                    tracing::info!(ticket = %t.ticket, codes = n, left, "Leased codes.");
                    if left == 0 {
                        tracing::info!(ticket = %t.ticket, "The master list is empty; selling the last leased codes.");
                    }
                }
                let mut r = t.rate.lock();
                r.last_batch = n.max(1);
                if n > 0 {
                    // A fresh lease has its buyers' time to sell before it
                    // counts as idle: given back before their claims were
                    // committed, it left them STOCK_IN_FLIGHT for another
                    // round of leasing.
                    r.last_sale = Instant::now();
                }
            }
            Err(error) => {
                // The script may have run and its answer been lost.
                t.resync.store(true, Ordering::Relaxed);
                ctl.error(&error);
                tracing::debug!(%error, "Leasing failed.");
            }
        }
        leasing.stock_changed.notify_waiters();
    }
}

/// Renews this node's leases and reads every ticket's master-list length
/// and cluster-wide counts. If the node's leases were reclaimed while it
/// was unreachable, the codes in its pools are not its own any more.
async fn renew(leasing: &Leasing) -> Result<(), StoreError> {
    for c in leasing.source.heartbeat().await? {
        let Some(t) = leasing.tickets.get(&c.ticket) else {
            continue;
        };
        t.set_counts(c.known, c.sold);
        t.upstream.store(c.upstream, Ordering::Relaxed);
        if c.reclaimed {
            reclaimed(&t);
        }
    }
    leasing.stock_changed.notify_waiters();
    Ok(())
}

/// This node's lease of `t` was taken from it (reclaimed while it was
/// frozen or cut off) or given up since it last looked: the codes in its
/// pool are not its own. They are dropped, and whatever Redis still lists
/// under this node goes back (the reaper returned only the ticket types it
/// sells itself; the rest would be renewed here unsold).
fn reclaimed(t: &TicketLease) {
    if t.pool.remaining() > 0 {
        let mut dropped = 0;
        while t.pool.take().is_some() {
            dropped += 1;
        }
        tracing::warn!(ticket = %t.ticket, codes = dropped, "This node's lease was taken from it or given up since it last looked; dropped its local codes.");
        t.rate.lock().not_sold(&t.pool);
    }
    t.resync.store(true, Ordering::Relaxed);
}

/// After a lease or give-back whose answer was lost, makes Redis and the
/// pool agree again for that ticket: everything the pool holds and
/// everything Redis says this node leases goes back on the master list, and
/// the next refill leases afresh. (Codes being committed at that moment
/// lose their lease and the claim tries another code, as after a reclaim.)
async fn resync(leasing: &Leasing) -> Result<(), StoreError> {
    let stocks: Vec<Arc<TicketLease>> = leasing.tickets.iter().map(|t| t.value().clone()).collect();
    for t in stocks {
        if !t.resync.swap(false, Ordering::Relaxed) {
            continue;
        }
        let mut taken = Vec::new();
        while let Some(idx) = t.pool.take() {
            taken.push(idx);
        }
        let result = match leasing.source.leased_codes(&t.activity, &t.ticket).await {
            Ok(codes) => leasing.source.give_back(&t.activity, &t.ticket, codes).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(returned) => {
                add_upstream(&t.upstream, returned);
                let mut r = t.rate.lock();
                r.not_sold(&t.pool);
                r.leased_once = false;
                tracing::info!(ticket = %t.ticket, codes = returned, "Resynchronised this node's lease with Redis (after a lost answer, or a reclaim).");
            }
            Err(error) => {
                for idx in taken {
                    t.pool.put_back(idx);
                }
                t.resync.store(true, Ordering::Relaxed);
                return Err(error);
            }
        }
    }
    Ok(())
}

/// Adds codes put back on the master list to what this node knows is
/// there; an unknown length ([`UNKNOWN`], before the first look) stays
/// unknown rather than wrapping round to a small number.
fn add_upstream(upstream: &AtomicUsize, n: usize) {
    let _ = upstream.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
        (cur != UNKNOWN).then(|| cur.saturating_add(n))
    });
}

/// Codes whose commit outcome was unknown and that turned out to be still
/// leased to this node go back into their pools.
async fn take_back_doubts(leasing: &Leasing) -> Result<(), StoreError> {
    for (ticket, code) in leasing.source.resolve_doubts().await? {
        if let Some(t) = leasing.tickets.get(&ticket) {
            t.pool.add_codes(&[code]);
        }
    }
    Ok(())
}

/// A node that sold nothing for two seconds while the master list is empty
/// gives its codes back, so buyers at other nodes can have them.
async fn give_back_idle(leasing: &Leasing) -> Result<(), StoreError> {
    let stocks: Vec<Arc<TicketLease>> = leasing.tickets.iter().map(|t| t.value().clone()).collect();
    for t in stocks {
        let idle = t.rate.lock().last_sale.elapsed() >= Duration::from_secs(2);
        if !idle || t.upstream.load(Ordering::Relaxed) != 0 || t.pool.remaining() == 0 {
            continue;
        }
        let mut taken = Vec::new();
        let mut codes = Vec::new();
        while let Some(idx) = t.pool.take() {
            taken.push(idx);
            codes.push(t.pool.code(idx).to_string());
        }
        let returned = match leasing.source.give_back(&t.activity, &t.ticket, codes).await {
            Ok(n) => n,
            Err(error) => {
                // Still leased to this node (or given back, answer lost):
                // sell them here meanwhile, and resynchronise.
                for idx in taken {
                    t.pool.put_back(idx);
                }
                t.resync.store(true, Ordering::Relaxed);
                return Err(error);
            }
        };
        {
            // The pool shrank by giving back, not by selling. It leases
            // again only for buyers of its own (`hungry`) or a rate: leasing
            // at once would take the codes straight back from the buyers
            // waiting at other nodes, for ever.
            let mut r = t.rate.lock();
            r.not_sold(&t.pool);
            r.gave_back = Some(Instant::now());
        }
        add_upstream(&t.upstream, returned);
        if returned > 0 {
            tracing::info!(ticket = %t.ticket, codes = returned, "Gave idle leased codes back to the master list.");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heartbeat's look, read before a fresher one but kept after it,
    /// does not bring back a code the fresher one saw sold.
    #[test]
    fn an_older_look_kept_later_does_not_unsell_a_code() {
        let t = TicketLease {
            activity: "a".into(),
            ticket: "t".into(),
            pool: Arc::new(CodePool::new()),
            upstream: UNKNOWN.into(),
            hungry: false.into(),
            resync: false.into(),
            counts: UNCOUNTED.into(),
            rate: Mutex::new(Rate::new()),
        };
        assert_eq!(t.counts(), None);
        t.set_counts(10, 10); // the fresh look: sold out
        t.set_counts(10, 9); // the heartbeat's older one, kept after it
        assert_eq!(t.counts(), Some((10, 0, 10)));
        t.set_counts(12, 10); // an import added two codes
        assert_eq!(t.counts(), Some((12, 2, 10)));
    }
}
