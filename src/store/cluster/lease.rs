//! The lease loop: keeps this node's pools stocked from the master lists,
//! renews its leases, reclaims dead nodes' leases, gives back what it no
//! longer sells, and settles codes whose commit outcome was unknown.
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
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use redis::AsyncCommands;
use tokio::sync::watch;

use super::{scripts, ClusterError, Shared, TicketStock};
use crate::{
    catalog::{Catalog, TicketType},
    config::now_ms,
    metrics,
};

/// How often the loop looks at the pools.
const TICK: Duration = Duration::from_millis(10);
/// Unknown master-list length.
const UNKNOWN: usize = usize::MAX;

/// Claim-rate bookkeeping of one ticket type.
pub(crate) struct Rate {
    taken: usize,
    at: Instant,
    /// Codes taken per second (smoothed).
    per_sec: f64,
    /// When the pool last lost a code.
    last_take: Instant,
    last_batch: usize,
    leased_once: bool,
}

impl Rate {
    fn new() -> Rate {
        let now = Instant::now();
        Rate {
            taken: 0,
            at: now,
            per_sec: 0.0,
            last_take: now,
            last_batch: 0,
            leased_once: false,
        }
    }
}

/// Holds `tk:node:N` so two running nodes cannot share an id. A node that
/// died keeps it until it expires; its successor waits that long at most.
pub(super) async fn register_node(shared: &Shared) -> Result<(), ClusterError> {
    let key = scripts::node_key(&shared.node);
    let ttl = shared.cfg.lease_ttl.0;
    let deadline = Instant::now() + ttl + Duration::from_secs(1);
    let mut redis = shared.redis.clone();
    loop {
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&shared.instance)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut redis)
            .await?;
        if set.is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::NodeIdTaken(shared.node.to_string()));
        }
        tracing::info!(node = %shared.node, "Waiting for the previous holder of this node id to expire.");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub(super) async fn unregister_node(shared: &Shared) {
    let mut redis = shared.redis.clone();
    let key = scripts::node_key(&shared.node);
    let holder: Result<Option<String>, _> = redis.get(&key).await;
    if matches!(holder, Ok(Some(h)) if h == shared.instance) {
        let _: Result<(), _> = redis.del(&key).await;
    }
}

/// Registers the catalog's ticket types; an activity seen for the first
/// time first gets back whatever an earlier run of this node had leased.
pub(super) async fn track(shared: &Shared, catalog: &Catalog) -> Result<(), ClusterError> {
    for a in catalog.activities() {
        let tickets: Vec<Arc<str>> = a.tickets.iter().map(|t| t.id.clone()).collect();
        let first = !shared.activities.contains_key(&a.id);
        shared.activities.insert(a.id.clone(), tickets.clone());
        if first {
            let returned = release(shared, &a.id, &tickets).await?;
            if returned > 0 {
                tracing::info!(activity = %a.id, codes = returned, "Returned the codes an earlier run of this node had leased.");
            }
        }
        for t in &a.tickets {
            shared.tickets.entry(t.id.clone()).or_insert_with(|| {
                Arc::new(TicketStock {
                    activity: a.id.clone(),
                    ticket: t.id.clone(),
                    pool: t.pool.clone(),
                    upstream: UNKNOWN.into(),
                    counts: super::Counts::default(),
                    hungry: false.into(),
                    rate: parking_lot::Mutex::new(Rate::new()),
                })
            });
        }
    }
    Ok(())
}

async fn release(shared: &Shared, activity: &str, tickets: &[Arc<str>]) -> Result<usize, ClusterError> {
    let keys = scripts::Keys::new(activity);
    let mut redis = shared.redis.clone();
    let mut invocation = scripts::RELEASE.prepare_invoke();
    invocation
        .key(keys.nodes())
        .key(keys.outbox(&shared.node))
        .arg(&*shared.node)
        .arg(keys.prefix())
        .arg(now_ms());
    for t in tickets {
        invocation.arg(&**t);
    }
    Ok(invocation.invoke_async(&mut redis).await?)
}

/// Re-reads the cluster-wide stock of `activity` (for `/act/detail`).
pub(super) async fn refresh_counts(shared: &Shared, activity: &str) -> Result<(), ClusterError> {
    let Some(tickets) = shared.activities.get(activity).map(|t| t.value().clone()) else {
        return Ok(());
    };
    let keys = scripts::Keys::new(activity);
    let mut invocation = scripts::COUNTS.prepare_invoke();
    invocation.key(keys.sold());
    for t in &tickets {
        invocation.key(keys.known(t));
    }
    for t in &tickets {
        invocation.arg(&**t);
    }
    let mut redis = shared.redis.clone();
    let answer: Vec<usize> = invocation.invoke_async(&mut redis).await?;
    for (t, counts) in tickets.iter().zip(answer.chunks(2)) {
        if let (Some(stock), &[known, sold]) = (shared.tickets.get(t), counts) {
            stock.counts.store(known, sold);
        }
    }
    Ok(())
}

/// Gives back every code this node leased (shutdown).
pub(super) async fn release_all(shared: &Shared) -> Result<usize, ClusterError> {
    let activities = shared.activity_list();
    let mut total = 0;
    for (a, tickets) in activities {
        total += release(shared, &a, &tickets).await?;
    }
    Ok(total)
}

/// Pushes the codes of `ticket` that MongoDB knows and has no claim for onto
/// the master list; each code is pushed at most once ever (import).
pub(super) async fn push_unclaimed(shared: &Shared, activity: &str, ticket: &str) -> Result<usize, ClusterError> {
    let codes = super::mongo::unclaimed_codes(&shared.db, ticket).await?;
    let keys = scripts::Keys::new(activity);
    let mut redis = shared.redis.clone();
    let mut pushed = 0;
    for chunk in codes.chunks(1000) {
        let n: usize = scripts::PUSH
            .key(keys.stock(ticket))
            .key(keys.known(ticket))
            .arg(chunk)
            .invoke_async(&mut redis)
            .await?;
        pushed += n;
    }
    Ok(pushed)
}

/// Waits up to half a second for codes when the given ticket types' pools
/// are empty but a master list is not (or has not been looked at yet).
/// After a sell-out this is the path of every refused claim, so it answers
/// `false` from a few map look-ups, allocating nothing.
pub(super) async fn wait_for_stock(shared: &Shared, tickets: &[TicketType]) -> bool {
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        let notified = shared.stock_changed.notified();
        if tickets.iter().any(|t| t.pool.remaining() > 0) {
            return true;
        }
        let mut waiting = false;
        for t in tickets {
            if let Some(stock) = shared.tickets.get(&*t.id) {
                if stock.upstream.load(Ordering::Relaxed) > 0 {
                    stock.hungry.store(true, Ordering::Relaxed);
                    waiting = true;
                }
            }
        }
        if !waiting || !shared.redis_up.load(Ordering::Relaxed) {
            return false;
        }
        if tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
            return tickets.iter().any(|t| t.pool.remaining() > 0);
        }
    }
}

/// The loop. Every tick: refill pools that need it. Every quarter lease TTL
/// (or `refresh_interval`, if shorter): renew leases and re-read the master
/// list lengths. Every half TTL: reap dead nodes. Every second: give back
/// idle stock, settle codes in doubt, probe Redis if it was down.
pub(super) async fn lease_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let ttl = shared.cfg.lease_ttl.0;
    let heartbeat_every = (ttl / 4).min(shared.cfg.refresh_interval.0);
    let (mut next_heartbeat, mut next_reap, mut next_second) =
        (Instant::now(), Instant::now() + ttl / 2, Instant::now());
    let mut next_probe = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let now = Instant::now();
        if shared.redis_up.load(Ordering::Relaxed) {
            refill(&shared).await;
        }
        if now >= next_heartbeat {
            next_heartbeat = now + heartbeat_every;
            if let Err(error) = heartbeat(&shared).await {
                shared.redis_failed(&error);
                tracing::debug!(%error, "Lease renewal failed.");
            }
        }
        if now >= next_reap {
            next_reap = now + ttl / 2;
            if let Err(error) = reap(&shared).await {
                tracing::debug!(%error, "Reaping failed.");
            }
        }
        if !shared.redis_up.load(Ordering::Relaxed) && now >= next_probe {
            next_probe = now + Duration::from_millis(100);
            probe(&shared).await;
        }
        if now >= next_second {
            next_second = now + Duration::from_secs(1);
            if shared.redis_up.load(Ordering::Relaxed) {
                if let Err(error) = resolve_doubts(&shared).await {
                    tracing::debug!(%error, "Settling codes in doubt failed.");
                }
                if let Err(error) = give_back_idle(&shared).await {
                    tracing::debug!(%error, "Giving back idle codes failed.");
                }
            }
        }
    }
}

async fn refill(shared: &Shared) {
    let stocks: Vec<Arc<TicketStock>> = shared.tickets.iter().map(|t| t.value().clone()).collect();
    let ahead = shared.cfg.lease_ahead.0.as_secs_f64();
    let (min, max) = (shared.cfg.lease_min_batch, shared.cfg.lease_max_batch);
    for t in stocks {
        let remaining = t.pool.remaining();
        let hungry = t.hungry.swap(false, Ordering::Relaxed);
        let want = {
            let mut r = t.rate.lock();
            let taken = t.pool.known() - remaining;
            let now = Instant::now();
            if taken != r.taken {
                r.last_take = now;
            }
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
            if remaining > want / 2 || !selling || t.upstream.load(Ordering::Relaxed) == 0 {
                continue;
            }
            r.leased_once = true;
            want - remaining.min(want)
        };
        if want == 0 {
            continue;
        }
        match lease(shared, &t, want).await {
            Ok(n) => {
                t.rate.lock().last_batch = n.max(1);
                shared.stock_changed.notify_waiters();
            }
            Err(error) => {
                shared.redis_failed(&error);
                tracing::debug!(%error, "Leasing failed.");
                shared.stock_changed.notify_waiters();
            }
        }
    }
}

async fn lease(shared: &Shared, t: &TicketStock, want: usize) -> Result<usize, ClusterError> {
    let keys = scripts::Keys::new(&t.activity);
    let mut redis = shared.redis.clone();
    let started = Instant::now();
    let (left, codes): (usize, Vec<String>) = scripts::LEASE
        .key(keys.stock(&t.ticket))
        .key(keys.lease(&t.ticket, &shared.node))
        .key(keys.nodes())
        .arg(&*shared.node)
        .arg(want)
        .arg(now_ms())
        .arg(shared.lease_expiry())
        .invoke_async(&mut redis)
        .await?;
    metrics::global().redis_lease.observe(started.elapsed());
    t.upstream.store(left, Ordering::Relaxed);
    let n = codes.len();
    if n > 0 {
        t.pool.add_codes(&codes);
        metrics::global().codes_leased.fetch_add(n as u64, Ordering::Relaxed);
        tracing::info!(ticket = %t.ticket, codes = n, left, "Leased codes.");
        if left == 0 {
            tracing::info!(ticket = %t.ticket, "The master list is empty; selling the last leased codes.");
        }
    }
    Ok(n)
}

async fn heartbeat(shared: &Shared) -> Result<(), ClusterError> {
    let mut redis = shared.redis.clone();
    let ttl = shared.cfg.lease_ttl.0.as_millis() as u64;
    let _: () = redis::cmd("SET")
        .arg(scripts::node_key(&shared.node))
        .arg(&shared.instance)
        .arg("PX")
        .arg(ttl)
        .query_async(&mut redis)
        .await?;
    let activities = shared.activity_list();
    for (a, tickets) in activities {
        let keys = scripts::Keys::new(&a);
        let mut invocation = scripts::HEARTBEAT.prepare_invoke();
        invocation.key(keys.nodes()).key(keys.sold());
        for t in &tickets {
            invocation.key(keys.stock(t)).key(keys.known(t));
        }
        invocation.arg(&*shared.node).arg(shared.lease_expiry());
        for t in &tickets {
            invocation.arg(&**t);
        }
        let answer: Vec<usize> = invocation.invoke_async(&mut redis).await?;
        let reaped = answer.first().copied() == Some(1);
        for (t, counts) in tickets.iter().zip(answer[1..].chunks(3)) {
            let &[len, known, sold] = counts else { continue };
            if let Some(stock) = shared.tickets.get(t) {
                stock.upstream.store(len, Ordering::Relaxed);
                stock.counts.store(known, sold);
                if reaped && stock.pool.remaining() > 0 {
                    // Our leases were taken back while we were unreachable:
                    // these codes are on the master list again, not ours.
                    let mut dropped = 0;
                    while stock.pool.take().is_some() {
                        dropped += 1;
                    }
                    tracing::warn!(ticket = %t, codes = dropped, "This node's lease had expired and was reclaimed; dropped its local codes.");
                }
            }
        }
    }
    shared.mark_redis(true);
    shared.stock_changed.notify_waiters();
    Ok(())
}

async fn reap(shared: &Shared) -> Result<(), ClusterError> {
    let mut redis = shared.redis.clone();
    let activities = shared.activity_list();
    for (a, tickets) in activities {
        let keys = scripts::Keys::new(&a);
        let mut invocation = scripts::REAP.prepare_invoke();
        invocation
            .key(keys.nodes())
            .key(keys.outbox(&shared.node))
            .arg(now_ms())
            .arg(&*shared.node)
            .arg(keys.prefix());
        for t in &tickets {
            invocation.arg(&**t);
        }
        let (nodes, codes): (usize, usize) = invocation.invoke_async(&mut redis).await?;
        if nodes > 0 {
            metrics::global()
                .leases_reaped
                .fetch_add(nodes as u64, Ordering::Relaxed);
            tracing::warn!(activity = %a, nodes, codes, "Reclaimed the expired leases of stopped nodes: their unclaimed codes are back on the master list and their backlog is now this node's.");
            shared.backlog_grew.notify_one();
            shared.backlog.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// A node that sold nothing for two seconds while the master list is empty
/// gives its codes back, so buyers at other nodes can have them.
async fn give_back_idle(shared: &Shared) -> Result<(), ClusterError> {
    let stocks: Vec<Arc<TicketStock>> = shared.tickets.iter().map(|t| t.value().clone()).collect();
    for t in stocks {
        let idle = t.rate.lock().last_take.elapsed() >= Duration::from_secs(2);
        if !idle || t.upstream.load(Ordering::Relaxed) != 0 || t.pool.remaining() == 0 {
            continue;
        }
        let mut codes = Vec::new();
        while let Some(idx) = t.pool.take() {
            codes.push(t.pool.code(idx).to_string());
        }
        let keys = scripts::Keys::new(&t.activity);
        let mut redis = shared.redis.clone();
        let returned: usize = scripts::GIVE_BACK
            .key(keys.stock(&t.ticket))
            .key(keys.lease(&t.ticket, &shared.node))
            .arg(&codes)
            .invoke_async(&mut redis)
            .await?;
        {
            // The pool shrank by giving back, not by selling.
            let mut r = t.rate.lock();
            r.taken = t.pool.known() - t.pool.remaining();
            r.leased_once = false;
        }
        t.upstream.fetch_add(returned, Ordering::Relaxed);
        if returned > 0 {
            tracing::info!(ticket = %t.ticket, codes = returned, "Gave idle leased codes back to the master list.");
        }
    }
    Ok(())
}

/// Settles the codes whose commit outcome was unknown: committed ones stay
/// claimed (in the backlog already), still-leased ones go back into the pool,
/// anything else is no longer ours.
async fn resolve_doubts(shared: &Shared) -> Result<(), ClusterError> {
    let doubts = std::mem::take(&mut *shared.doubts.lock());
    if doubts.is_empty() {
        return Ok(());
    }
    let mut redis = shared.redis.clone();
    let mut left = Vec::new();
    let mut iter = doubts.into_iter();
    let mut failure = None;
    for d in iter.by_ref() {
        let keys = scripts::Keys::new(&d.activity);
        let code = d.pool.code(d.idx);
        let answer: Result<String, _> = scripts::RESOLVE
            .key(keys.claimed())
            .key(keys.lease(&d.ticket, &shared.node))
            .arg(&*code)
            .arg(&d.nonce)
            .invoke_async(&mut redis)
            .await;
        match answer.as_deref() {
            Ok("LEASED") => d.pool.put_back(d.idx),
            Ok("MINE") => {
                tracing::warn!(code = %code, "A claim answered 503 had in fact been committed; it is in the backlog for MongoDB.");
                shared.backlog_grew.notify_one();
            }
            Ok(_) => {}
            Err(_) => {
                left.push(d);
                failure = answer.err();
                break;
            }
        }
    }
    left.extend(iter);
    shared.doubts.lock().extend(left);
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

async fn probe(shared: &Shared) {
    let mut redis = shared.redis.clone();
    let pong: Result<String, _> = redis::cmd("PING").query_async(&mut redis).await;
    if pong.is_ok() {
        shared.mark_redis(true);
    }
}
