//! The Redis side of leasing: the scripts that move codes between the master
//! lists and this node's lease sets, renew and reap leases, and settle codes
//! whose commit outcome was unknown. Each call is one atomic script.
//!
//! The inventory's lease worker decides when and how much to lease; it
//! reaches these through a [`LeaseSource`]. Reaping dead nodes is the
//! store's own worker ([`reaper`]), since it touches no pool.

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use tokio::runtime::Handle;

use super::{
    error::ClusterError,
    replicas::run_replicated,
    scripts,
    shared::{block_on, on, NodeSettings, Shared},
};
use crate::{
    metrics,
    store::types::StoreError,
    worker::{Ctl, Stop},
};

/// Holds `tk:node:N` so two running nodes cannot share an id. A node that
/// died keeps it until it expires; its successor waits that long at most.
pub(super) async fn register_node(shared: &Shared) -> Result<(), ClusterError> {
    let key = scripts::node_key(&shared.node);
    let ttl = shared.cfg.lease_ttl.0;
    let deadline = Instant::now() + ttl + Duration::from_secs(1);
    let mut redis = shared.redis.clone();
    let mut told = false;
    loop {
        // Asked to stop: not after the wait, a start and a bind (a
        // cluster walkthrough's SIGTERM took effect 7.6 s later); and not
        // by taking an id that came free meanwhile.
        if crate::signals::stop_requested() {
            return Err(ClusterError::StoppedWhileWaiting);
        }
        if scripts::hold(&mut redis, &key, &shared.instance, shared.lease_ttl_ms()).await? {
            *shared.id_kept.lock() = Instant::now();
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::NodeIdTaken(shared.node.to_string()));
        }
        // Once: it was said every half second, twenty times, and of a
        // holder that may well be alive.
        if !std::mem::replace(&mut told, true) {
            tracing::info!(
                node = %shared.node,
                wait = ?ttl,
                "This node id is held: by this node's previous run until its hold expires, or by another node \
                 running with the same node_id. Waiting for it to expire."
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Lets go of `tk:node:N` if this instance still holds it: one script, so
/// a successor that took the id meanwhile keeps it (a GET then a DEL could
/// delete the successor's hold).
pub(super) async fn unregister_node(shared: &Shared) {
    let mut redis = shared.redis.clone();
    let _: Result<i64, _> = scripts::LOCK_KEEP_OR_RELEASE
        .key(scripts::node_key(&shared.node))
        .arg(&shared.instance)
        .invoke_async(&mut redis)
        .await;
}

/// Renews this instance's hold on its node id, or takes it again if it
/// lapsed with nobody taking it (a long pause, Redis restarted without it).
/// Held by another instance, the id now belongs to a successor started
/// while this one was frozen: two instances under one id share its lease
/// sets and backlog, and each one's give-backs and resyncs would return
/// the other's codes. This one exits at once (status 1), as a `kill -9`
/// would: every claim it acknowledged is in Redis already, and the
/// successor has taken over its leases and backlog.
async fn keep_node_id(shared: &Shared) -> Result<(), ClusterError> {
    let mut redis = shared.redis.clone();
    let key = scripts::node_key(&shared.node);
    if !scripts::hold(&mut redis, &key, &shared.instance, shared.lease_ttl_ms()).await? {
        tracing::error!(node = %shared.node, "Another instance now runs under this node id (started while this one was stopped); this one exits.");
        std::process::exit(1);
    }
    *shared.id_kept.lock() = Instant::now();
    Ok(())
}

/// Before a call that changes this node's lease sets (a lease, a give-back):
/// if the hold on the node id may have lapsed since it was last renewed
/// (half a lease's life: the heartbeat renews every quarter), renews it
/// first. A node thawed after a successor took its id would otherwise
/// lease into (or give back from) the successor's sets before its next
/// heartbeat found out; it exits instead ([`keep_node_id`]).
async fn ensure_node_id(shared: &Shared) -> Result<(), ClusterError> {
    if shared.id_kept.lock().elapsed() > shared.cfg.lease_ttl.0 / 2 {
        keep_node_id(shared).await?;
    }
    Ok(())
}

/// What a lease of one ticket type brought.
#[derive(Debug, Clone)]
pub struct Leased {
    /// Codes left on the master list.
    pub left: usize,
    /// The codes leased, now in this node's lease set.
    pub codes: Vec<String>,
    /// This node's leases had been taken (a reaper) or given up since it
    /// last looked: the codes in its pool are not its own any more. The
    /// codes just leased are; the node gives its whole lease back and
    /// leases afresh.
    pub reclaimed: bool,
}

/// What the heartbeat learnt of one ticket type.
#[derive(Debug, Clone)]
pub struct TicketCounts {
    /// The ticket type.
    pub ticket: Arc<str>,
    /// Codes on its master list.
    pub upstream: usize,
    /// Codes ever pushed (cluster-wide total).
    pub known: usize,
    /// Codes claimed (cluster-wide).
    pub sold: usize,
    /// This node's leases had been taken (a reaper) or given up since it
    /// last looked (its lease epoch changed): the codes in its pool are not
    /// its own any more.
    pub reclaimed: bool,
}

/// Where a node's codes come from in cluster mode: the Redis side of
/// leasing, for the inventory's lease worker. Cheap to clone; every call
/// runs on the cluster store's runtime, next to its connections.
#[derive(Clone)]
pub struct LeaseSource {
    shared: Arc<Shared>,
    handle: Handle,
}

impl LeaseSource {
    pub(super) fn new(shared: Arc<Shared>, handle: Handle) -> LeaseSource {
        LeaseSource { shared, handle }
    }

    /// Whether Redis answered the last command (claims fail fast while not).
    pub fn is_up(&self) -> bool {
        self.shared.redis_up.load(Ordering::Relaxed)
    }

    /// The ticket types of `activity` this node sells, if it sells it (for
    /// [`LeaseSource::restore`]).
    pub fn tracked(&self, activity: &str) -> Option<Vec<Arc<str>>> {
        self.shared.activities.get(activity).map(|t| t.clone())
    }

    /// Puts `activity` back as [`LeaseSource::tracked`] saw it, after a
    /// reload that tracked it was refused.
    pub fn restore(&self, activity: &Arc<str>, tickets: Option<Vec<Arc<str>>>) {
        match tickets {
            Some(tickets) => {
                self.shared.activities.insert(activity.clone(), tickets);
            }
            None => {
                self.shared.activities.remove(activity);
            }
        }
    }

    /// Starts selling `activity`: on first sight, gives back whatever an
    /// earlier run of this node still had leased (returns how many codes)
    /// and counts the backlog it left in the gauge. A ticket type a reload
    /// drops stays listed: the codes of it leased here are still renewed,
    /// reaped and given back at the stop, not left in a lease nobody would
    /// ever return to the master list.
    pub fn track(&self, activity: &Arc<str>, tickets: &[Arc<str>]) -> Result<usize, StoreError> {
        if let Some(mut listed) = self.shared.activities.get_mut(activity) {
            for t in tickets {
                if !listed.contains(t) {
                    listed.push(t.clone());
                }
            }
            return Ok(0);
        }
        let shared = &self.shared;
        let (returned, backlog) = block_on(&self.handle, release(shared, activity, tickets))?;
        // Known only once released: a failed release is tried again by the
        // next track. The backlog an earlier run left is counted now (the
        // gauge falls as the writer acknowledges records).
        shared.activities.insert(activity.clone(), tickets.to_vec());
        shared.backlog.fetch_add(backlog, Ordering::Relaxed);
        Ok(returned)
    }

    /// After every activity is tracked (start-up, each reload): the per-user
    /// limit and the pause this node's config sets for each, recorded in
    /// Redis, and the record of an activity the config dropped removed (it
    /// would hold the other nodes to it). Best effort, and not while Redis
    /// is known down: every heartbeat records them too ([`record_settings`]).
    pub fn set_node_settings(&self, settings: &[(Arc<str>, NodeSettings)]) {
        for mut e in self.shared.settings.iter_mut() {
            if !settings.iter().any(|(a, _)| a == e.key()) {
                e.here = None;
            }
        }
        for (activity, here) in settings {
            self.shared.settings.entry(activity.clone()).or_default().here = Some(*here);
        }
        if !self.is_up() {
            return;
        }
        let activities: Vec<Arc<str>> = self.shared.settings.iter().map(|e| e.key().clone()).collect();
        block_on(&self.handle, async {
            for activity in &activities {
                if let Err(error) = record_settings(&self.shared, activity).await {
                    tracing::warn!(%activity, %error, "Could not record per_user_limit and paused in Redis; the next heartbeat will.");
                }
            }
        });
    }

    /// Leases up to `want` codes of `ticket` (see [`Leased`]).
    pub async fn lease(&self, activity: &Arc<str>, ticket: &Arc<str>, want: usize) -> Result<Leased, StoreError> {
        let (shared, activity, ticket) = (self.shared.clone(), activity.clone(), ticket.clone());
        Ok(on(&self.handle, async move {
            let result = lease(&shared, &activity, &ticket, want).await;
            if let Err(e) = &result {
                shared.redis_failed(e);
            }
            result
        })
        .await?)
    }

    /// Renews this node's id and leases; reads every ticket's counts.
    pub async fn heartbeat(&self) -> Result<Vec<TicketCounts>, StoreError> {
        let shared = self.shared.clone();
        Ok(on(&self.handle, async move {
            let result = heartbeat(&shared).await;
            match &result {
                Ok(_) => shared.mark_redis(true),
                Err(e) => shared.redis_failed(e),
            }
            result
        })
        .await?)
    }

    /// Cluster-wide `(ticket, known, sold)` of `activity`'s ticket types.
    pub async fn counts(&self, activity: &str) -> Result<Vec<(Arc<str>, usize, usize)>, StoreError> {
        let (shared, activity) = (self.shared.clone(), activity.to_owned());
        Ok(on(&self.handle, async move { counts(&shared, &activity).await }).await?)
    }

    /// Puts `codes` (leased to this node, unclaimed) back on the master
    /// list, confirmed by `cluster.replica_acks` replicas (an error when
    /// they do not confirm in time). Unconfirmed, a failover could undo it:
    /// the codes back in this node's lease, which the node renews, and not
    /// in its pool, so never sold, and every claim told STOCK_IN_FLIGHT for
    /// as long as the node ran. An error has the caller resynchronise the
    /// lease until a give-back is confirmed.
    pub async fn give_back(
        &self,
        activity: &Arc<str>,
        ticket: &Arc<str>,
        codes: Vec<String>,
    ) -> Result<usize, StoreError> {
        let (shared, activity, ticket) = (self.shared.clone(), activity.clone(), ticket.clone());
        Ok(on(&self.handle, async move {
            ensure_node_id(&shared).await?;
            let keys = scripts::Keys::new(&activity);
            let mut redis = shared.redis.clone();
            let mut give_back = scripts::GIVE_BACK.prepare_invoke();
            give_back
                .key(keys.stock(&ticket))
                .key(keys.lease(&ticket, &shared.node))
                .arg(&codes);
            let returned: usize = run_replicated(&mut redis, &give_back, &keys, shared.cfg.replica_acks).await?;
            Ok(returned)
        })
        .await?)
    }

    /// The codes of `ticket` leased to this node, as Redis has them.
    pub async fn leased_codes(&self, activity: &Arc<str>, ticket: &Arc<str>) -> Result<Vec<String>, StoreError> {
        let (shared, activity, ticket) = (self.shared.clone(), activity.clone(), ticket.clone());
        Ok(on(&self.handle, async move {
            let keys = scripts::Keys::new(&activity);
            let mut redis = shared.redis.clone();
            let codes: Vec<String> = redis::cmd("SMEMBERS")
                .arg(keys.lease(&ticket, &shared.node))
                .query_async(&mut redis)
                .await?;
            Ok(codes)
        })
        .await?)
    }

    /// Settles the codes whose commit outcome was unknown: committed ones
    /// stay claimed (in the backlog already), anything no longer leased to
    /// this node is not its own; returns `(ticket, code)` of those still
    /// leased to it, which may be sold again.
    pub async fn resolve_doubts(&self) -> Result<Vec<(Arc<str>, String)>, StoreError> {
        let shared = self.shared.clone();
        Ok(on(&self.handle, async move { resolve_doubts(&shared).await }).await?)
    }

    /// Gives back every code this node leased (shutdown).
    pub async fn release_all(&self) -> Result<usize, StoreError> {
        let shared = self.shared.clone();
        Ok(on(&self.handle, async move {
            let mut total = 0;
            for (a, tickets) in shared.activity_list() {
                total += release(&shared, &a, &tickets).await?.0;
            }
            Ok(total)
        })
        .await?)
    }

    /// Pings Redis; reopens the gate if it answers.
    pub async fn probe(&self) {
        let shared = self.shared.clone();
        let _ = on(&self.handle, async move {
            let mut redis = shared.redis.clone();
            let pong: Result<String, _> = redis::cmd("PING").query_async(&mut redis).await;
            if pong.is_ok() {
                shared.mark_redis(true);
            }
            Ok(())
        })
        .await;
    }
}

/// Records this node's per-user limit of `activity` and whether it pauses
/// it ([`scripts::NODE_SETTING`]), or removes the records once a reload dropped
/// the activity (and then its entry: nothing more to do for it). The
/// commit script holds every claim to the lowest of the live nodes' limits,
/// so a difference is safe, but an operator should hear of it (once per
/// change): a raise does not apply until every node has it. A pause is each
/// node's own (nodes with `[[activity]]` in their files are reloaded one by
/// one): one node left out of it sells on while the others refuse, which
/// the operator hears of too.
async fn record_settings(shared: &Shared, activity: &str) -> Result<(), ClusterError> {
    // A heartbeat and a reload may record at once: each records the limit it
    // read, and records again if the limit changed while its write was on
    // the way, so an older write landing last is put right at once.
    let mut written = None;
    loop {
        let Some(here) = shared.settings.get(activity).map(|e| e.here) else {
            return Ok(());
        };
        if written == Some(here) {
            return Ok(());
        }
        written = Some(here);
        let keys = scripts::Keys::new(activity);
        let mut redis = shared.redis.clone();
        let Some(NodeSettings { limit, paused }) = here else {
            for hash in [keys.limits(), keys.paused()] {
                redis::cmd("HDEL")
                    .arg(hash)
                    .arg(&*shared.node)
                    .query_async::<()>(&mut redis)
                    .await?;
            }
            // Gone unless a reload took the activity back meanwhile.
            shared.settings.remove_if(activity, |_, e| e.here.is_none());
            continue;
        };
        let mut spread = async |hash: String, value: u32| -> Result<(u32, u32), ClusterError> {
            let mut invocation = scripts::NODE_SETTING.prepare_invoke();
            invocation.key(hash).key(keys.nodes()).arg(&*shared.node).arg(value);
            Ok(invocation.invoke_async(&mut redis).await?)
        };
        let (lowest, highest) = spread(keys.limits(), limit).await?;
        let pauses = spread(keys.paused(), u32::from(paused)).await?;
        // Settings changed while these were on the way: what they read is
        // already old (the last node resuming, a heartbeat's write of the
        // pause landing after the reload's would say the nodes differ).
        // Record again, and keep and say only what that finds.
        let Some((before, paused_before)) = shared
            .settings
            .get_mut(activity)
            .filter(|e| e.here == Some(NodeSettings { limit, paused }))
            .map(|mut e| (e.spread.replace((lowest, highest)), e.pauses.replace(pauses)))
        else {
            continue;
        };
        if lowest != highest && before != Some((lowest, highest)) {
            tracing::warn!(
                activity,
                here = limit,
                lowest,
                highest,
                "per_user_limit differs across the live nodes: claims hold to the lowest until every node has the same."
            );
        }
        if pauses.0 != pauses.1 && paused_before != Some(pauses) {
            tracing::warn!(
                activity,
                paused_here = paused,
                "paused differs across the live nodes: those not paused sell on while the others refuse. Nodes serving MongoDB's activities agree within cluster.refresh_interval; nodes with the activity in their own files each need a reload with the same setting."
            );
        }
    }
}

async fn release(shared: &Shared, activity: &str, tickets: &[Arc<str>]) -> Result<(usize, usize), ClusterError> {
    let mut redis = shared.redis.clone();
    Ok(on_this_node(&scripts::RELEASE, shared, activity, tickets)
        .invoke_async(&mut redis)
        .await?)
}

/// [`scripts::RELEASE`] or [`scripts::REAP`] for this node in `activity`:
/// KEYS nodes and this node's outbox; ARGV this node, the activity's key
/// prefix, the lease TTL, then `tickets`.
fn on_this_node<'a>(
    script: &'a redis::Script,
    shared: &Shared,
    activity: &str,
    tickets: &[Arc<str>],
) -> redis::ScriptInvocation<'a> {
    let keys = scripts::Keys::new(activity);
    let mut invocation = script.prepare_invoke();
    invocation
        .key(keys.nodes())
        .key(keys.outbox(&shared.node))
        .arg(&*shared.node)
        .arg(keys.prefix())
        .arg(shared.lease_ttl_ms());
    for t in tickets {
        invocation.arg(&**t);
    }
    invocation
}

async fn lease(shared: &Shared, activity: &Arc<str>, ticket: &Arc<str>, want: usize) -> Result<Leased, ClusterError> {
    ensure_node_id(shared).await?;
    let keys = scripts::Keys::new(activity);
    let mut redis = shared.redis.clone();
    let started = Instant::now();
    let (left, codes, epoch): (usize, Vec<String>, u64) = scripts::LEASE
        .key(keys.stock(ticket))
        .key(keys.lease(ticket, &shared.node))
        .key(keys.nodes())
        .key(keys.tickets())
        .key(keys.epochs())
        .key(keys.leased(ticket, &shared.node))
        .arg(&*shared.node)
        .arg(want)
        .arg(shared.lease_ttl_ms())
        .arg(&**ticket)
        // The call's id: a re-sent call is answered as the first (see the script).
        .arg(rand::random::<u64>())
        .invoke_async(&mut redis)
        .await?;
    metrics::global().redis_lease.observe(started.elapsed());
    metrics::global()
        .codes_leased
        .fetch_add(codes.len() as u64, Ordering::Relaxed);
    let reclaimed = shared.swap_epoch(activity, ticket, epoch);
    Ok(Leased { left, codes, reclaimed })
}

async fn heartbeat(shared: &Shared) -> Result<Vec<TicketCounts>, ClusterError> {
    keep_node_id(shared).await?;
    super::clock::follow_with_heartbeat(shared).await;
    let mut redis = shared.redis.clone();
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for (a, tickets) in shared.activity_list() {
        let keys = scripts::Keys::new(&a);
        let mut invocation = scripts::HEARTBEAT.prepare_invoke();
        invocation.key(keys.nodes()).key(keys.sold()).key(keys.epochs());
        for t in &tickets {
            invocation.key(keys.stock(t)).key(keys.known(t));
        }
        invocation.arg(&*shared.node).arg(shared.lease_ttl_ms());
        for t in &tickets {
            invocation.arg(&**t);
        }
        let answer: Vec<usize> = invocation.invoke_async(&mut redis).await?;
        // Best effort: the heartbeat's own work (renewals, counts) stands.
        if let Err(error) = record_settings(shared, &a).await {
            tracing::debug!(activity = %a, %error, "Could not record per_user_limit and paused in Redis.");
        }
        let epoch = answer.first().copied().unwrap_or_default() as u64;
        for (t, counts) in tickets.iter().zip(answer.get(1..).unwrap_or_default().chunks(3)) {
            let &[upstream, known, sold] = counts else { continue };
            out.push(TicketCounts {
                ticket: t.clone(),
                upstream,
                known,
                sold,
                reclaimed: shared.epoch_changed(&a, t, epoch),
            });
            seen.push((a.clone(), t.clone(), epoch));
        }
    }
    // Recorded only once every activity answered: a failure part-way
    // returns no counts, and the change must still show next time.
    for (a, t, epoch) in seen {
        shared.record_epoch(&a, &t, epoch);
    }
    Ok(out)
}

async fn counts(shared: &Shared, activity: &str) -> Result<Vec<(Arc<str>, usize, usize)>, ClusterError> {
    let Some(tickets) = shared.activities.get(activity).map(|t| t.value().clone()) else {
        return Ok(Vec::new());
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
    Ok(tickets
        .iter()
        .zip(answer.chunks(2))
        .filter_map(|(t, c)| match *c {
            [known, sold] => Some((t.clone(), known, sold)),
            _ => None,
        })
        .collect())
}

async fn resolve_doubts(shared: &Shared) -> Result<Vec<(Arc<str>, String)>, ClusterError> {
    let doubts = std::mem::take(&mut *shared.doubts.lock());
    let mut usable = Vec::new();
    if doubts.is_empty() {
        return Ok(usable);
    }
    let mut redis = shared.redis.clone();
    let mut left = Vec::new();
    let mut iter = doubts.into_iter();
    let mut failure = None;
    let mut committed = 0;
    for d in iter.by_ref() {
        let keys = scripts::Keys::new(&d.activity);
        let answer: Result<String, _> = scripts::RESOLVE
            .key(keys.claimed())
            .key(keys.lease(&d.ticket, &shared.node))
            .arg(&*d.code)
            .arg(&d.nonce)
            .invoke_async(&mut redis)
            .await;
        match answer.as_deref() {
            Ok("LEASED") => usable.push((d.ticket.clone(), d.code.to_string())),
            Ok("MINE") => committed += 1,
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
    if committed > 0 {
        // One line per pass: a lagging replica puts whole batches here.
        tracing::warn!(claims = committed, "Claims answered 503 had in fact been committed: they stay their buyers' (a retry with the same Idempotency-Key returns them).");
        shared.backlog.fetch_add(committed, Ordering::Relaxed);
        shared.backlog_grew.notify_one();
    }
    match failure {
        Some(e) => {
            // What was resolved before the failure is still usable.
            if usable.is_empty() {
                Err(e.into())
            } else {
                Ok(usable)
            }
        }
        None => Ok(usable),
    }
}

/// The reaper: every half lease TTL, puts the unclaimed codes of nodes whose
/// leases expired back on the master lists and takes over their backlogs,
/// in the activities this node sells and then in every other one MongoDB
/// knows ([`sweep_unsold`]).
pub(super) async fn reaper(shared: Arc<Shared>, ctl: Ctl, mut stop: Stop) {
    let every = shared.cfg.lease_ttl.0 / 2;
    let mut known = Known::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.requested() => return,
        }
        ctl.tick();
        if !shared.redis_up.load(Ordering::Relaxed) {
            continue;
        }
        if let Err(error) = reap(&shared).await {
            ctl.error(&error);
            tracing::debug!(%error, "Reaping failed.");
        }
        if let Err(error) = sweep_unsold(&shared, &mut known).await {
            ctl.error(&error);
            tracing::debug!(%error, "Sweeping the activities this node does not sell failed.");
        }
    }
}

async fn reap(shared: &Shared) -> Result<(), ClusterError> {
    for (a, tickets) in shared.activity_list() {
        reap_activity(shared, &a, &tickets).await?;
    }
    Ok(())
}

/// Reaps the dead nodes of one activity ([`scripts::REAP`]; it adds the
/// activity's own `tickets` set to `tickets`); returns the backlog records
/// moved to this node.
async fn reap_activity(shared: &Shared, activity: &str, tickets: &[Arc<str>]) -> Result<usize, ClusterError> {
    let mut redis = shared.redis.clone();
    let (nodes, codes, moved): (usize, usize, usize) = on_this_node(&scripts::REAP, shared, activity, tickets)
        .invoke_async(&mut redis)
        .await?;
    if nodes > 0 {
        metrics::global()
            .leases_reaped
            .fetch_add(nodes as u64, Ordering::Relaxed);
        tracing::warn!(activity, nodes, codes, "Reclaimed the expired leases of stopped nodes: their unclaimed codes are back on the master list and their backlog is now this node's.");
        // Counted now (the writer's gauge only falls after a pass that
        // reached MongoDB), and drained by the writer's next pass.
        shared.backlog.fetch_add(moved, Ordering::Relaxed);
        shared.backlog_grew.notify_one();
    }
    Ok(moved)
}

/// How often the reaper reads again which activities MongoDB knows: the
/// list only grows with imports, and a backlog left in one waits for
/// MongoDB anyway.
const KNOWN_REFRESH: Duration = Duration::from_secs(30);

/// The activities MongoDB knows, as the reaper last read them.
#[derive(Default)]
struct Known {
    ids: Vec<String>,
    read: Option<Instant>,
}

/// The activities MongoDB knows that this node does not sell. Nobody may
/// sell one any more (a config dropped it, `ticketd retire` took it off
/// sale), yet claims acknowledged in it can still wait in a backlog: this
/// node's own, left by an earlier run whose config named it, or a dead
/// node's. Only the activity's sellers reaped and drained it, so those
/// claims never reached MongoDB (exports warned of them for good).
///
/// Each such activity is reaped. One whose backlog of this node holds
/// claims goes to the writer ([`Shared::leftover`]), and this node keeps
/// itself registered in the activity as a live node (as a heartbeat does,
/// renewed by each sweep until the backlog is empty; a reap that moves a
/// backlog to it registers it in the same step): REAP finds backlogs
/// only through that registration, so if this node dies before its writer
/// has drained them, a live node takes them over in turn. An error in one
/// activity does not stop the others; the first is returned.
async fn sweep_unsold(shared: &Shared, known: &mut Known) -> Result<(), ClusterError> {
    if known.read.is_none_or(|at| at.elapsed() >= KNOWN_REFRESH) {
        // A failed read is tried again after the same wait: MongoDB down
        // must not hold up the reaping of the activities this node sells.
        known.read = Some(Instant::now());
        let ids = super::mongo::activity_ids(&shared.db).await?;
        if ids != known.ids {
            let unsold = ids
                .iter()
                .filter(|a| !shared.activities.contains_key(a.as_str()))
                .count();
            tracing::info!(
                unsold,
                "Sweeping the backlogs of the activities MongoDB knows and this node does not sell."
            );
            known.ids = ids;
        }
    }
    let mut first_error = None;
    for a in &known.ids {
        if a.is_empty() || shared.activities.contains_key(a.as_str()) {
            continue;
        }
        if let Err(error) = sweep_one(shared, a).await {
            tracing::debug!(activity = %a, %error, "Could not sweep an activity this node does not sell.");
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// [`sweep_unsold`] of one activity.
async fn sweep_one(shared: &Shared, activity: &str) -> Result<(), ClusterError> {
    let mut redis = shared.redis.clone();
    let keys = scripts::Keys::new(activity);
    let moved = reap_activity(shared, activity, &[]).await?;
    let own: usize = redis::cmd("LLEN")
        .arg(keys.outbox(&shared.node))
        .query_async(&mut redis)
        .await?;
    if own == 0 {
        return Ok(());
    }
    let _: Vec<usize> = scripts::HEARTBEAT
        .key(keys.nodes())
        .key(keys.sold())
        .key(keys.epochs())
        .arg(&*shared.node)
        .arg(shared.lease_ttl_ms())
        .invoke_async(&mut redis)
        .await?;
    // A reload may have started selling it meanwhile: then `track` counted
    // its backlog, and the writer drains it as a sold activity's.
    if !shared.activities.contains_key(activity) && shared.leftover.lock().insert(Arc::from(activity)) {
        tracing::info!(
            activity,
            claims = own,
            "This node does not sell the activity, but its backlog holds claims: writing them to MongoDB."
        );
        // What the reap moved is counted already.
        shared.backlog.fetch_add(own.saturating_sub(moved), Ordering::Relaxed);
        shared.backlog_grew.notify_one();
    }
    Ok(())
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
            .key(keys.tickets())
            .arg(ticket)
            .arg(chunk)
            .invoke_async(&mut redis)
            .await?;
        pushed += n;
    }
    Ok(pushed)
}
