//! What the cluster store's workers share: the connections, this node's
//! identity, the gates that open and close with Redis and MongoDB, and the
//! activities the node sells.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
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
    /// Claims in this node's backlogs at the last look.
    pub backlog: AtomicUsize,
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
