//! The cluster store: several nodes share stock through Redis, and MongoDB
//! is the system of record.
//!
//! # How a claim is decided across nodes
//! Each node *leases* codes from an activity's Redis master list in batches
//! (one script per batch, [`scripts::LEASE`]) into its in-memory
//! [`CodePool`], so taking a code stays a lock-free pop. The claim decision
//! is the same as on one node (see `claim`), except for the commit: instead
//! of the local journal, the committer sends each batch of an activity's
//! claims to Redis in ONE script ([`scripts::COMMIT`], group commit). The
//! script checks, per claim, that the code is still leased to this node and
//! that the user is under the limit *across all nodes*, records the claim
//! and appends it to this node's backlog for MongoDB. The user is answered
//! only after that script returns, so an acknowledged claim is in Redis,
//! which runs with `appendfsync always` (see README).
//!
//! The backlog (`tk:{A}:outbox:N` in Redis) is drained to MongoDB by the
//! writer (`commit::writer`) in unordered bulk inserts keyed by code, so retries are
//! idempotent; while MongoDB is down claims continue until the backlog
//! reaches `cluster.max_backlog`, and then answer 503 BACKLOG_FULL. The
//! backlog lives in Redis, not on the node, so it survives the node: a
//! restarted node drains its own, and the live nodes take over a dead
//! node's backlog together with its leases ([`scripts::REAP`]).
//!
//! # Module layout
//! - [`scripts`]: Redis key names and the Lua scripts (one atomic step each).
//! - [`mongo`]: the MongoDB collections and every query.
//! - `lease`: the lease loop: refill ahead of demand, renew, reap, give back.
//! - `commit`: the committer (claims to Redis) and the writer (backlog to MongoDB).

mod commit;
mod lease;
pub mod mongo;
pub mod scripts;

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use dashmap::DashMap;
use mongodb::Database;
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use tokio::{
    runtime::{Handle, Runtime},
    sync::{mpsc, watch, Notify},
    task::JoinHandle,
};

use super::{Access, ClaimRow, ImportReport, ReportData, StoreError, User};
use crate::{
    catalog::Catalog,
    claim::{Claim, CommitError, PendingClaim},
    config::{ClusterConfig, Config},
    inventory::{CodeIdx, CodePool},
    journal::Entry,
};

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis refused or could not be reached.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// MongoDB refused or could not be reached.
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// Another running node uses this node id.
    #[error(
        "another node called `{0}` is running (or stopped less than cluster.lease_ttl ago); node ids must be unique"
    )]
    NodeIdTaken(String),
    /// A script answered something this version does not understand.
    #[error("unexpected answer from Redis: {0}")]
    Protocol(String),
}

/// One claim as the commit script recorded it (JSON in Redis; every number
/// is a string there so Lua never rounds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Claim id (unique across the cluster).
    pub id: u64,
    /// Activity.
    pub activity: String,
    /// Ticket type.
    pub ticket: String,
    /// Code.
    pub code: String,
    /// User id.
    pub user: u64,
    /// The user's n-th claim in the activity (1-based).
    pub n: u64,
    /// Claim time, Unix ms.
    pub ms: i64,
    /// The node that committed it.
    pub node: String,
    /// The attempt that committed it.
    pub nonce: String,
    /// Idempotency key, or empty.
    pub key: String,
}

#[derive(serde::Deserialize)]
struct RawRecord {
    id: String,
    user: String,
    ticket: String,
    code: String,
    ms: String,
    node: String,
    nonce: String,
    n: String,
    #[serde(default)]
    key: String,
}

impl Record {
    /// Parses a record of `activity`.
    pub fn parse(activity: &str, json: &str) -> Result<Record, ClusterError> {
        let bad = || ClusterError::Protocol(format!("claim record {json:?}"));
        let r: RawRecord = serde_json::from_str(json).map_err(|_| bad())?;
        Ok(Record {
            id: r.id.parse().map_err(|_| bad())?,
            activity: activity.to_owned(),
            ticket: r.ticket,
            code: r.code,
            user: r.user.parse().map_err(|_| bad())?,
            n: r.n.parse().map_err(|_| bad())?,
            ms: r.ms.parse().map_err(|_| bad())?,
            node: r.node,
            nonce: r.nonce,
            key: r.key,
        })
    }

    /// The claim this record describes.
    pub fn to_claim(&self, activity: &Arc<str>) -> Claim {
        Claim {
            id: self.id,
            activity_id: activity.clone(),
            ticket_id: Arc::from(self.ticket.as_str()),
            code: Arc::from(self.code.as_str()),
            user_id: self.user,
            claimed_at_ms: self.ms,
            idempotency_key: (!self.key.is_empty()).then(|| Arc::from(self.key.as_str())),
        }
    }
}

/// One ticket type this node sells, and what it knows of its stock.
pub(crate) struct TicketStock {
    activity: Arc<str>,
    ticket: Arc<str>,
    pool: Arc<CodePool>,
    /// Codes on the master list at the last look; `usize::MAX` until known.
    upstream: AtomicUsize,
    /// A claim is waiting for codes: lease now.
    hungry: AtomicBool,
    /// Cluster-wide codes known and sold, at the last look.
    counts: Counts,
    rate: Mutex<lease::Rate>,
}

/// Cluster-wide counts of one ticket type, as Redis last reported them (by
/// the heartbeat, and before each `/act/detail`). A reader may see the two
/// halves from two different looks; the remainder never goes negative.
#[derive(Default)]
pub(crate) struct Counts {
    known: AtomicUsize,
    sold: AtomicUsize,
}

impl Counts {
    fn store(&self, known: usize, sold: usize) {
        self.known.store(known, Ordering::Relaxed);
        self.sold.store(sold, Ordering::Relaxed);
    }

    /// `(total, remaining, sold)`.
    fn get(&self) -> (usize, usize, usize) {
        let known = self.known.load(Ordering::Relaxed);
        let sold = self.sold.load(Ordering::Relaxed);
        (known, known.saturating_sub(sold), sold)
    }
}

/// A code whose commit outcome is unknown (Redis went away mid-commit).
pub(crate) struct Doubt {
    activity: Arc<str>,
    ticket: Arc<str>,
    nonce: String,
    pool: Arc<CodePool>,
    idx: CodeIdx,
}

/// What the committer, lease loop and writer share.
pub(crate) struct Shared {
    redis: ConnectionManager,
    db: Database,
    node: Arc<str>,
    /// Random per process: nonces of a restarted node never repeat.
    instance: String,
    cfg: ClusterConfig,
    /// Redis answered the last command.
    redis_up: AtomicBool,
    /// MongoDB took the last write.
    mongo_up: AtomicBool,
    /// Claims in this node's backlogs at the last look.
    backlog: AtomicUsize,
    /// The commit script answered FULL since the writer last made room.
    backlog_full: AtomicBool,
    /// Codes leased to this node and not yet claimed, at the last look.
    tickets: DashMap<Arc<str>, Arc<TicketStock>>,
    /// Activities whose leases this node has taken over (released at start).
    activities: DashMap<Arc<str>, Vec<Arc<str>>>,
    doubts: Mutex<Vec<Doubt>>,
    /// Claim ids: `[next, end)` of the block this node holds.
    ids: Mutex<(u64, u64)>,
    nonce: AtomicU64,
    /// Woken after each lease (claims waiting for stock re-check).
    stock_changed: Notify,
    /// Woken after each commit (the writer has work).
    backlog_grew: Notify,
}

impl Shared {
    /// The tracked activities and their ticket ids, copied out of the map
    /// (no shard lock is held across an await).
    fn activity_list(&self) -> Vec<(Arc<str>, Vec<Arc<str>>)> {
        self.activities
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }

    fn next_nonce(&self) -> String {
        format!("{}.{}", self.instance, self.nonce.fetch_add(1, Ordering::Relaxed))
    }

    fn lease_expiry(&self) -> i64 {
        crate::config::now_ms() + self.cfg.lease_ttl.0.as_millis() as i64
    }

    /// Notes a failed Redis call: only a lost or refused connection closes
    /// the gate (a slow answer under load is not an outage).
    fn redis_failed(&self, error: &ClusterError) {
        if let ClusterError::Redis(e) = error {
            if !e.is_timeout() && (e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped()) {
                self.mark_redis(false);
            }
        }
    }

    fn mark_redis(&self, up: bool) {
        if self.redis_up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("Redis is reachable again; claims resume.");
            } else {
                tracing::error!("Redis is unreachable; claims are answered 503 until it returns.");
            }
        }
    }
}

enum Msg {
    Claim(PendingClaim),
    Ping(tokio::sync::oneshot::Sender<()>),
}

/// The tasks of a serving node.
struct Serving {
    commits: Mutex<Option<mpsc::Sender<Msg>>>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    closing: AtomicBool,
}

/// Redis + MongoDB, and the tasks that connect this node to them.
pub struct ClusterStore {
    /// Its own runtime: the store is used from synchronous code (start-up,
    /// tools, reload) as well as from the server's tasks.
    runtime: Option<Runtime>,
    handle: Handle,
    shared: Arc<Shared>,
    serving: Option<Serving>,
    queue_capacity: usize,
    /// How long shutdown waits for the backlog to drain.
    grace: Duration,
}

impl Drop for ClusterStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `f` to completion on `handle` from synchronous code, inside or
/// outside another runtime.
fn block_on<F: Future>(handle: &Handle, f: F) -> F::Output {
    match Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(|| handle.block_on(f)),
        Err(_) => handle.block_on(f),
    }
}

/// Registers `users` (username, nickname, hash); per user, its new id, or
/// `None` when the username is taken. Ids come from one Redis counter
/// (`INCRBY`, atomic across nodes); an id MongoDB already has (the counter
/// was lost) raises the counter past the highest id in use and is retried.
async fn insert_new_users(
    shared: &Shared,
    users: &[(String, String, String)],
) -> Result<Vec<Option<u64>>, ClusterError> {
    let mut out = vec![None; users.len()];
    let mut pending: Vec<usize> = (0..users.len()).collect();
    let now = crate::config::now_ms();
    let mut redis = shared.redis.clone();
    for _ in 0..5 {
        if pending.is_empty() {
            break;
        }
        let last: u64 = redis::cmd("INCRBY")
            .arg(scripts::USER_IDS_KEY)
            .arg(pending.len())
            .query_async(&mut redis)
            .await?;
        let first = last + 1 - pending.len() as u64;
        let docs = pending
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let (u, n, h) = &users[i];
                mongo::user_doc(first + k as u64, u, n, h, now)
            })
            .collect();
        let refused = mongo::insert_users(&shared.db, docs).await?;
        for (k, &i) in pending.iter().enumerate() {
            if !refused.contains(&k) {
                out[i] = Some(first + k as u64);
            }
        }
        let refused: Vec<usize> = pending
            .iter()
            .enumerate()
            .filter(|(k, _)| refused.contains(k))
            .map(|(_, &i)| i)
            .collect();
        pending = if refused.is_empty() {
            Vec::new()
        } else {
            let names: Vec<&str> = refused.iter().map(|&i| users[i].0.as_str()).collect();
            let taken = mongo::existing_usernames(&shared.db, &names).await?;
            refused.into_iter().filter(|&i| !taken.contains(&users[i].0)).collect()
        };
        if !pending.is_empty() {
            let max = mongo::max_user_id(&shared.db).await?;
            let _: i64 = scripts::RAISE
                .key(scripts::USER_IDS_KEY)
                .arg(max)
                .invoke_async(&mut redis)
                .await?;
        }
    }
    if !pending.is_empty() {
        return Err(ClusterError::Protocol("could not find free user ids".into()));
    }
    Ok(out)
}

impl From<mongodb::error::Error> for StoreError {
    fn from(e: mongodb::error::Error) -> Self {
        StoreError::Cluster(ClusterError::Mongo(e))
    }
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError::Cluster(ClusterError::Redis(e))
    }
}

async fn connect(config: &Config) -> Result<(ConnectionManager, Database), ClusterError> {
    let url = config.storage.redis_url().unwrap_or_default();
    let client = redis::Client::open(url.as_str())?;
    let manager = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let redis = ConnectionManager::new_with_config(client, manager).await?;
    let uri = config.storage.mongodb_uri().unwrap_or_default();
    let mut options = mongodb::options::ClientOptions::parse(uri.as_str()).await?;
    options.server_selection_timeout = Some(Duration::from_secs(2));
    options.connect_timeout = Some(Duration::from_secs(2));
    options.app_name = Some("ticketd".into());
    let db = mongodb::Client::with_options(options)?.database(&config.storage.database);
    mongo::ensure_indexes(&db).await?;
    Ok((redis, db))
}

impl ClusterStore {
    /// Connects to Redis and MongoDB; a serving node also registers its id
    /// and starts the committer, the lease loop and the writer.
    pub fn open(config: &Config, access: Access) -> Result<ClusterStore, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ticketd-cluster")
            .enable_all()
            .build()
            .map_err(|source| StoreError::Io {
                what: "cannot start the cluster runtime",
                path: "ticketd-cluster".into(),
                source,
            })?;
        let handle = runtime.handle().clone();
        let (redis, db) = block_on(&handle, connect(config))?;
        let shared = Arc::new(Shared {
            redis,
            db,
            node: Arc::from(config.node_id()),
            instance: format!("{:016x}", rand::random::<u64>()),
            cfg: config.cluster.clone(),
            redis_up: AtomicBool::new(true),
            mongo_up: AtomicBool::new(true),
            backlog: AtomicUsize::new(0),
            backlog_full: AtomicBool::new(false),
            tickets: DashMap::new(),
            activities: DashMap::new(),
            doubts: Mutex::new(Vec::new()),
            ids: Mutex::new((0, 0)),
            nonce: AtomicU64::new(0),
            stock_changed: Notify::new(),
            backlog_grew: Notify::new(),
        });
        let queue_capacity = config.journal.queue_capacity;
        let serving = match access {
            Access::Tool => None,
            Access::Serve => {
                block_on(&handle, lease::register_node(&shared))?;
                let (tx, rx) = mpsc::channel(queue_capacity);
                let (stop, stop_rx) = watch::channel(false);
                let tasks = vec![
                    handle.spawn(commit::committer(shared.clone(), rx)),
                    handle.spawn(lease::lease_loop(shared.clone(), stop_rx.clone())),
                    handle.spawn(commit::writer(shared.clone(), stop_rx)),
                ];
                Some(Serving {
                    commits: Mutex::new(Some(tx)),
                    stop,
                    tasks: Mutex::new(tasks),
                    closing: AtomicBool::new(false),
                })
            }
        };
        Ok(ClusterStore {
            runtime: Some(runtime),
            handle,
            shared,
            serving,
            queue_capacity,
            grace: config.server.shutdown_grace.0,
        })
    }

    fn block<F: Future>(&self, f: F) -> F::Output {
        block_on(&self.handle, f)
    }

    pub(super) fn commit(&self, pending: PendingClaim) {
        let Some(serving) = &self.serving else {
            return pending.settle(Err(CommitError::Unavailable));
        };
        if serving.closing.load(Ordering::Relaxed) || !self.shared.redis_up.load(Ordering::Relaxed) {
            // Fail fast: the lease loop probes Redis and reopens the gate.
            return pending.settle(Err(CommitError::Unavailable));
        }
        let sender = serving.commits.lock().clone();
        match sender {
            Some(tx) => match tx.try_send(Msg::Claim(pending)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(Msg::Claim(p))) => p.settle(Err(CommitError::Overloaded)),
                Err(mpsc::error::TrySendError::Closed(Msg::Claim(p))) => p.settle(Err(CommitError::Unavailable)),
                Err(_) => {}
            },
            None => pending.settle(Err(CommitError::Unavailable)),
        }
    }

    pub(super) fn is_healthy(&self) -> bool {
        self.serving.is_some() && self.shared.redis_up.load(Ordering::Relaxed)
    }

    pub(super) fn ping(&self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let tx = self.serving.as_ref()?.commits.lock().clone()?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.try_send(Msg::Ping(reply)).ok()?;
        Some(rx)
    }

    pub(super) fn commit_queue_len(&self) -> usize {
        let Some(serving) = &self.serving else { return 0 };
        serving
            .commits
            .lock()
            .as_ref()
            .map_or(0, |tx| self.queue_capacity - tx.capacity())
    }

    /// Leases, backlog and connection state, for `/metrics`.
    pub fn gauges(&self) -> crate::metrics::ClusterGauges {
        crate::metrics::ClusterGauges {
            leased: self
                .shared
                .tickets
                .iter()
                .map(|t| (t.activity.to_string(), t.ticket.to_string(), t.pool.remaining()))
                .collect(),
            backlog: self.shared.backlog.load(Ordering::Relaxed),
            redis_up: self.shared.redis_up.load(Ordering::Relaxed),
            mongo_up: self.shared.mongo_up.load(Ordering::Relaxed),
        }
    }

    /// Cluster-wide `(total, remaining, sold)` of `ticket` at the last look.
    pub fn counts(&self, ticket: &str) -> Option<(usize, usize, usize)> {
        self.shared.tickets.get(ticket).map(|t| t.counts.get())
    }

    /// Re-reads the cluster-wide counts of `activity` from Redis.
    pub async fn refresh_counts(&self, activity: &str) -> Result<(), StoreError> {
        let shared = self.shared.clone();
        let activity = activity.to_owned();
        match self
            .handle
            .spawn(async move { lease::refresh_counts(&shared, &activity).await })
            .await
        {
            Ok(result) => Ok(result?),
            Err(_) => Err(ClusterError::Protocol("the count task failed".into()).into()),
        }
    }

    /// Starts selling the catalog's ticket types: on first sight of an
    /// activity, gives back what an earlier run of this node still had
    /// leased, then the lease loop keeps the pools stocked.
    pub fn track(&self, catalog: &Catalog) -> Result<(), StoreError> {
        self.block(lease::track(&self.shared, catalog))?;
        Ok(())
    }

    /// Waits (briefly) for codes of the given ticket types when this node's
    /// pools are empty but the master lists are not. `true` if some arrived.
    pub async fn wait_for_stock(&self, tickets: &[crate::catalog::TicketType]) -> bool {
        lease::wait_for_stock(&self.shared, tickets).await
    }

    pub(super) fn import(&self, config: &Config, node_start_ms: i64) -> Result<ImportReport, StoreError> {
        let report = self.block(mongo::import(&self.shared.db, config, node_start_ms))?;
        for a in &config.activities {
            for t in &a.tickets {
                let pushed = self.block(lease::push_unclaimed(&self.shared, &a.id, &t.id))?;
                if pushed > 0 {
                    tracing::info!(ticket = %t.id, pushed, "Codes pushed onto the master list.");
                }
            }
        }
        Ok(report)
    }

    pub(super) fn activities(&self) -> Result<Vec<crate::config::ActivityConfig>, StoreError> {
        self.block(mongo::activities(&self.shared.db))
    }

    pub(super) fn export_claims(
        &self,
        activity_id: &str,
        f: &mut dyn FnMut(ClaimRow) -> std::io::Result<()>,
    ) -> Result<u64, StoreError> {
        self.block(mongo::export_claims(&self.shared.db, activity_id, f))
    }

    pub(super) fn has_activity(&self, activity_id: &str) -> Result<bool, StoreError> {
        Ok(self.block(mongo::has_activity(&self.shared.db, activity_id))?)
    }

    pub(super) fn create_users(&self, users: &[(String, String, String)]) -> Result<usize, StoreError> {
        let mut created = 0;
        for chunk in users.chunks(1000) {
            created += self
                .block(insert_new_users(&self.shared, chunk))?
                .iter()
                .flatten()
                .count();
        }
        Ok(created)
    }

    pub(super) fn create_user(&self, username: &str, nickname: &str, password_hash: &str) -> Result<User, StoreError> {
        let user = (username.to_owned(), nickname.to_owned(), password_hash.to_owned());
        let ids = self.block(insert_new_users(&self.shared, std::slice::from_ref(&user)))?;
        let id = ids.first().copied().flatten().ok_or(StoreError::UsernameTaken)?;
        Ok(User {
            id,
            username: user.0,
            nickname: user.1,
            password_hash: user.2,
            created_at_ms: crate::config::now_ms(),
        })
    }

    pub(super) fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        Ok(self.block(mongo::user_by_name(&self.shared.db, username))?)
    }

    pub(super) fn list_users(&self) -> Result<Vec<User>, StoreError> {
        Ok(self.block(mongo::list_users(&self.shared.db))?)
    }

    pub(super) fn revoke_session(&self, token_id: &str, expires_at_ms: i64) -> Result<(), StoreError> {
        Ok(self.block(mongo::revoke_session(&self.shared.db, token_id, expires_at_ms))?)
    }

    pub(super) fn revoked_sessions(&self, now_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(self.block(mongo::revoked_sessions(&self.shared.db, now_ms))?)
    }

    pub(super) fn secret(&self, name: &str, create: &dyn Fn() -> String) -> Result<String, StoreError> {
        Ok(self.block(mongo::secret(&self.shared.db, name, create()))?)
    }

    pub(super) fn add_stats(&self, batch: &crate::stats::StatsBatch) -> Result<(), StoreError> {
        Ok(self.block(mongo::add_stats(&self.shared.db, batch))?)
    }

    pub(super) fn report_data(&self, activity_id: &str, top: usize) -> Result<ReportData, StoreError> {
        Ok(self.block(mongo::report_data(&self.shared.db, activity_id, top))?)
    }

    /// Every claim `user` holds in the given activities, from Redis (the
    /// claims made through other nodes included).
    pub async fn claims_of_user(&self, user: u64, activities: &[Arc<str>]) -> Result<Vec<Claim>, StoreError> {
        let shared = self.shared.clone();
        let activities = activities.to_vec();
        let task = self.handle.spawn(async move {
            let mut out = Vec::new();
            let mut redis = shared.redis.clone();
            for a in &activities {
                let keys = scripts::Keys::new(a);
                let records: Vec<String> = scripts::HELD
                    .key(keys.held())
                    .key(keys.claimed())
                    .arg(user)
                    .invoke_async(&mut redis)
                    .await?;
                for r in records {
                    out.push(Record::parse(a, &r)?.to_claim(a));
                }
            }
            Ok::<_, ClusterError>(out)
        });
        match task.await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ClusterError::Protocol("the lookup task failed".into()).into()),
        }
    }

    /// Stops taking claims, commits what is queued, gives every leased code
    /// back, drains the backlog to MongoDB (for up to `grace`), and leaves.
    pub(super) fn close(&self) {
        let grace = self.grace;
        let Some(serving) = &self.serving else { return };
        serving.closing.store(true, Ordering::Relaxed);
        let tasks: Vec<JoinHandle<()>> = serving.tasks.lock().drain(..).collect();
        let [committer, leaser, writer]: [JoinHandle<()>; 3] = match tasks.try_into() {
            Ok(t) => t,
            Err(_) => return,
        };
        // Dropping the sender ends the committer once the queue is empty.
        serving.commits.lock().take();
        let _ = self.block(committer);
        let _ = serving.stop.send(true);
        let _ = self.block(leaser);
        let shared = self.shared.clone();
        self.block(async move {
            match lease::release_all(&shared).await {
                Ok(n) => tracing::info!(codes = n, "Leased codes returned to the master lists."),
                Err(error) => tracing::error!(%error, "Could not return leased codes; live nodes reclaim them after cluster.lease_ttl."),
            }
            let drained = tokio::time::timeout(grace, writer).await;
            let left = shared.backlog.load(Ordering::Relaxed);
            if drained.is_err() || left > 0 {
                tracing::warn!(claims = left, "The MongoDB backlog is not empty; it stays in Redis and is written by this node's next start or by a live node.");
            } else {
                tracing::info!("The MongoDB backlog is drained.");
            }
            lease::unregister_node(&shared).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_from_the_scripts_json() {
        // What cjson.encode writes in the commit script (numbers as strings).
        let json = r#"{"id":"4097","user":"42","ticket":"t1","code":"ABC","ms":"1732456789012","node":"n1","nonce":"ff.7","n":"2","key":""}"#;
        let r = Record::parse("a1", json).unwrap();
        assert_eq!((r.id, r.user, r.n, r.ms), (4097, 42, 2, 1_732_456_789_012));
        let claim = r.to_claim(&Arc::from("a1"));
        assert_eq!(claim.idempotency_key, None);
        assert_eq!((&*claim.code, &*claim.ticket_id, claim.user_id), ("ABC", "t1", 42));
        let keyed = json.replace(r#""key":"""#, r#""key":"k-1""#);
        assert_eq!(
            Record::parse("a1", &keyed)
                .unwrap()
                .to_claim(&Arc::from("a1"))
                .idempotency_key
                .as_deref(),
            Some("k-1")
        );
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        for bad in [
            "",
            "{}",
            r#"{"id":"x","user":"1","ticket":"t","code":"c","ms":"1","node":"n","nonce":"o","n":"1"}"#,
        ] {
            assert!(Record::parse("a", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_of_one_activity_share_its_hash_tag() {
        let k = scripts::Keys::new("1001");
        for key in [
            k.stock("t"),
            k.lease("t", "n"),
            k.claimed(),
            k.outbox("n"),
            k.users(),
            k.nodes(),
        ] {
            assert!(key.starts_with("tk:{1001}:"), "{key}");
        }
    }
}
