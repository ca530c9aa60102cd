//! What the cluster store's workers share: the connections, this node's
//! identity, the gates that open and close with Redis and MongoDB, and the
//! activities the node sells.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use dashmap::DashMap;
use mongodb::Database;
use parking_lot::Mutex;
use tokio::{
    runtime::Handle,
    sync::{mpsc, Notify},
};

use super::{connection::RedisConn, error::ClusterError, replicas::JoinConfirmations};
use crate::{config::ClusterConfig, vocab::PendingClaim};

/// A code whose commit outcome is unknown (Redis went away mid-commit). The
/// lease worker asks [`super::lease::LeaseSource::resolve_doubts`] about it
/// once Redis answers again.
pub(crate) struct Doubt {
    pub activity: Arc<str>,
    pub ticket: Arc<str>,
    pub code: Arc<str>,
    pub nonce: String,
}

/// An activity and one of its ticket types.
pub(crate) type TicketKey = (Arc<str>, Arc<str>);

/// What goes to the committer.
pub(crate) enum Msg {
    Claim(PendingClaim),
    Ping(tokio::sync::oneshot::Sender<()>),
}

/// What the committer, the lease source, the writer and the reaper share.
pub(crate) struct Shared {
    pub redis: RedisConn,
    /// The waiting rooms' joins and appends. With `cluster.replica_acks`
    /// each waits for the replicas (`WAIT`), which holds the connection it
    /// is sent on: so they have connections of their own, and a join rush
    /// or a stalled replica never holds up claims, leases or heartbeats.
    /// Without, the same connection as `redis`.
    pub rooms_redis: RedisConn,
    /// Per activity with a waiting room, its joins' confirmations by the
    /// replicas (with `cluster.replica_acks`; see [`JoinConfirmations`]).
    /// Joins reach the store only for activities whose config gives them a
    /// room: bounded by the config.
    pub join_confirmations: DashMap<Arc<str>, Arc<JoinConfirmations>>,
    pub db: Database,
    pub node: Arc<str>,
    /// Random per process: nonces of a restarted node never repeat.
    pub instance: String,
    /// When this instance last knew `tk:node:N` was its own (registered or
    /// renewed): a monotonic clock, which runs on while the process is
    /// stopped (SIGSTOP, a frozen cgroup), so a thawed node knows it must
    /// look again; not through a suspended host, which the heartbeat's own
    /// check still catches.
    pub id_kept: Mutex<std::time::Instant>,
    pub cfg: ClusterConfig,
    /// Redis answered the last command.
    pub redis_up: AtomicBool,
    /// Redis said at the last look that it keeps every write it
    /// acknowledges (see `watch_durability`).
    pub redis_durable: AtomicBool,
    /// MongoDB took the last write.
    pub mongo_up: AtomicBool,
    /// Claims in this node's backlogs (the `ticketd_mongo_backlog` gauge).
    pub backlog: BacklogCount,
    /// The commit script answered FULL since the writer last made room.
    pub backlog_full: AtomicBool,
    /// `server.shutdown_grace` as last loaded, in milliseconds: how long the
    /// MongoDB writer goes on draining once asked to stop. Live, not the
    /// value at start: a reload that lowered it to fit systemd's
    /// `TimeoutStopSec` was taken, yet the writer waited out the old one,
    /// and systemd killed the node before it gave up its id.
    pub shutdown_grace_ms: AtomicU64,
    /// Activities this node sells, and their ticket ids (leases taken over at start).
    pub activities: DashMap<Arc<str>, Vec<Arc<str>>>,
    /// Activities this node does not sell whose backlog of this node holds
    /// claims: left by an earlier run whose config named them, or taken
    /// over from a dead node by the reaper's sweep. The writer drains them
    /// as it does the others, and forgets each once its backlog is empty.
    pub leftover: Mutex<HashSet<Arc<str>>>,
    /// The per-user limit and the pause this node's config sets per
    /// activity it sells, recorded in Redis at start, on reload and with
    /// every heartbeat; and the live nodes' at the last record (a change to
    /// a difference is warned of once).
    pub settings: DashMap<Arc<str>, SettingsRecord>,
    pub doubts: Mutex<Vec<Doubt>>,
    /// The lease epoch (see [`super::scripts::HEARTBEAT`]) last seen per
    /// activity and ticket type: each ticket type's pool acts on a change
    /// itself, whichever script shows it first.
    pub epochs: Mutex<HashMap<TicketKey, u64>>,
    /// Claim ids: `[next, end)` of the block this node holds.
    pub ids: Mutex<(u64, u64)>,
    pub nonce: AtomicU64,
    /// Woken after each commit (the writer has work).
    pub backlog_grew: Notify,
}

impl Shared {
    /// Whether the lease epoch a script answered for `ticket` differs from
    /// the one recorded last (the node's leases were taken or given up
    /// meanwhile: its pool's codes are not its own any more). Nothing is
    /// recorded yet after start: no change.
    pub fn epoch_changed(&self, activity: &Arc<str>, ticket: &Arc<str>, epoch: u64) -> bool {
        self.epochs
            .lock()
            .get(&(activity.clone(), ticket.clone()))
            .is_some_and(|&seen| seen != epoch)
    }

    /// [`Shared::epoch_changed`] and [`Shared::record_epoch`] under one
    /// lock: for a caller that acts on the change at once (a lease).
    pub fn swap_epoch(&self, activity: &Arc<str>, ticket: &Arc<str>, epoch: u64) -> bool {
        self.epochs
            .lock()
            .insert((activity.clone(), ticket.clone()), epoch)
            .is_some_and(|seen| seen != epoch)
    }

    /// Records the epoch a caller has acted on (see [`Shared::epoch_changed`]).
    pub fn record_epoch(&self, activity: &Arc<str>, ticket: &Arc<str>, epoch: u64) {
        self.epochs.lock().insert((activity.clone(), ticket.clone()), epoch);
    }

    /// The tracked activities and their ticket ids, copied out of the map
    /// (no shard lock is held across an await).
    pub fn activity_list(&self) -> Vec<(Arc<str>, Vec<Arc<str>>)> {
        self.activities
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }

    pub fn next_nonce(&self) -> String {
        format!("{}.{}", self.instance, self.nonce.fetch_add(1, Ordering::Relaxed))
    }

    /// How long a lease lives unrenewed, in ms: the scripts add it to
    /// Redis's clock (see `scripts::NOW`), never to this node's.
    pub fn lease_ttl_ms(&self) -> u64 {
        self.cfg.lease_ttl.0.as_millis() as u64
    }

    /// Notes a failed Redis call: only a lost or refused connection closes
    /// the gate (a slow answer under load is not an outage).
    pub fn redis_failed(&self, error: &ClusterError) {
        if let ClusterError::Redis(e) = error {
            if !e.is_timeout() && (e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped()) {
                self.mark_redis(false);
            }
        }
    }

    pub fn mark_redis(&self, up: bool) {
        if self.redis_up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("Redis is reachable again; claims resume.");
            } else {
                tracing::error!("Redis is unreachable; claims are answered 503 until it returns.");
            }
        }
    }
}

/// Runs `f` to completion on `handle` from synchronous code, inside or
/// outside another runtime.
pub(crate) fn block_on<F: Future>(handle: &Handle, f: F) -> F::Output {
    match Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(|| handle.block_on(f)),
        Err(_) => handle.block_on(f),
    }
}

/// Runs `f` on the cluster runtime (where the connections live) and awaits
/// it from any runtime.
pub(crate) async fn on<T: Send + 'static>(
    handle: &Handle,
    f: impl Future<Output = Result<T, ClusterError>> + Send + 'static,
) -> Result<T, ClusterError> {
    handle
        .spawn(f)
        .await
        .unwrap_or_else(|_| Err(ClusterError::Protocol("a cluster task failed".into())))
}

/// The committer's queue while the node serves.
#[derive(Clone)]
pub(crate) struct Serving {
    /// Taken (closing the queue) when the runner stops the committer.
    pub commits: Arc<Mutex<Option<mpsc::Sender<Msg>>>>,
    /// Set when the committer stops: claims are refused at once from then on.
    pub closing: Arc<AtomicBool>,
}

impl Serving {
    /// Refuses new claims and closes the queue; what is queued is still committed.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
        self.commits.lock().take();
    }
}

/// This node's per-user limit of one activity and whether it pauses it,
/// and what the live nodes' were at the last record.
#[derive(Debug, Default)]
pub struct SettingsRecord {
    /// What this node's config sets; `None` once a reload dropped the
    /// activity (the entry goes when its record in Redis has).
    pub here: Option<NodeSettings>,
    /// `(lowest, highest)` of the live nodes' limits at the last record.
    pub spread: Option<(u32, u32)>,
    /// `(lowest, highest)` of the live nodes' pauses (0 or 1) at the last
    /// record: `(0, 1)` while some pause the sale and others sell.
    pub pauses: Option<(u32, u32)>,
}

/// What one node's config sets for an activity that all the nodes must
/// agree on to sell it as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSettings {
    /// `per_user_limit` (claims hold to the lowest of the live nodes').
    pub limit: u32,
    /// `paused` (each node refuses its own claims; the others sell on).
    pub paused: bool,
}

/// How many claims this node's backlogs hold: added to by what puts records
/// there (a commit, a doubt found committed, a reap, a backlog found at
/// start), taken from as the writer's records are acknowledged, and set
/// exactly by a pass of the writer that read every backlog's length.
///
/// An exact count must not land between a change's write to Redis and its
/// addition here: the length read after the write already holds the
/// records, and the addition after it counted them twice (one claim with
/// MongoDB down showed a backlog of 2 until MongoDB came back). So every
/// change is bracketed ([`BacklogCount::begin`], [`Counting::done`]), and
/// an exact count is taken only if none was under way or began while the
/// lengths were read ([`BacklogCount::look`], [`BacklogCount::set_exact`]).
/// Under a steady rush that is seldom: the count then goes by its additions
/// and acknowledgements, each exact.
#[derive(Debug, Default)]
pub struct BacklogCount(Mutex<Count>);

#[derive(Debug, Default)]
struct Count {
    records: usize,
    /// Changes begun and not done.
    busy: usize,
    /// Changes begun, ever.
    begun: u64,
}

/// A look before reading the backlogs' lengths (see [`BacklogCount::set_exact`]).
#[derive(Debug, Clone, Copy)]
pub struct Look {
    quiet: bool,
    begun: u64,
}

/// A change to the backlogs under way; [`Counting::done`] counts what it
/// added (dropped without, it added nothing).
#[must_use]
pub struct Counting<'a>(&'a BacklogCount);

impl BacklogCount {
    /// Claims counted now.
    pub fn get(&self) -> usize {
        self.0.lock().records
    }

    /// Before a change that puts records in a backlog is sent to Redis.
    pub fn begin(&self) -> Counting<'_> {
        let mut c = self.0.lock();
        c.busy += 1;
        c.begun += 1;
        Counting(self)
    }

    /// `n` records written to MongoDB and taken out of a backlog.
    pub fn acknowledged(&self, n: usize) {
        let mut c = self.0.lock();
        c.records = c.records.saturating_sub(n);
    }

    /// Before the lengths of every backlog are read.
    pub fn look(&self) -> Look {
        let c = self.0.lock();
        Look {
            quiet: c.busy == 0,
            begun: c.begun,
        }
    }

    /// The lengths read since `look`, summed: taken when no change was
    /// under way then and none began since. Says whether it was taken.
    pub fn set_exact(&self, look: Look, records: usize) -> bool {
        let mut c = self.0.lock();
        let taken = look.quiet && c.busy == 0 && c.begun == look.begun;
        if taken {
            c.records = records;
        }
        taken
    }
}

impl Counting<'_> {
    /// The change is in Redis (or failed): `added` records are counted.
    pub fn done(self, added: usize) {
        self.0 .0.lock().records += added;
        // `Drop` ends it.
    }
}

impl Drop for Counting<'_> {
    fn drop(&mut self) {
        self.0 .0.lock().busy -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_read_while_a_change_is_under_way_is_not_taken() {
        let count = BacklogCount::default();
        // A commit's script has put one record in the backlog; its addition
        // is yet to come when the writer reads the length (1).
        let commit = count.begin();
        let look = count.look();
        assert!(!count.set_exact(look, 1));
        commit.done(1);
        assert_eq!(count.get(), 1, "counted once, not twice");
        // A change that begins and ends while the lengths are read.
        let look = count.look();
        count.begin().done(1);
        assert!(!count.set_exact(look, 2));
        assert_eq!(count.get(), 2);
        // Quiet throughout: the lengths are the count.
        let look = count.look();
        assert!(count.set_exact(look, 5));
        assert_eq!(count.get(), 5);
        count.acknowledged(7);
        assert_eq!(count.get(), 0);
        // A change that failed adds nothing and ends all the same.
        drop(count.begin());
        assert!(count.set_exact(count.look(), 3));
    }
}
