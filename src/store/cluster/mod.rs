//! The cluster store: several nodes share stock through Redis, and MongoDB
//! is the system of record.
//!
//! # How a claim is decided across nodes
//! Each node *leases* codes from an activity's Redis master list in batches
//! (one script per batch, [`scripts::LEASE`]) into its in-memory
//! code pool (the inventory's lease worker decides when), so taking a code
//! stays a lock-free pop. The claim decision
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
//! node's backlog together with its leases ([`scripts::REAP`]). Backlogs
//! of activities a node no longer sells (its config dropped them, or they
//! were retired) are reaped and drained all the same: a claim acknowledged
//! once reaches MongoDB whatever the configs say later.
//!
//! # Module layout
//! - [`scripts`]: Redis key names and the Lua scripts (one atomic step each);
//! - [`connection`]: one Redis server or a Redis Cluster, behind one type;
//! - [`mongo`]: the MongoDB collections and every query;
//! - [`lease`]: the Redis side of leasing ([`LeaseSource`]) and the reaper;
//! - `commit`: the committer (claims to Redis) and the writer (backlog to MongoDB);
//! - `replicas`: waiting for Redis replicas (`cluster.replica_acks`), the
//!   waiting room's joins in groups;
//! - `record`: the claim record the scripts write; `users`: user ids and accounts;
//! - `reconcile`: the invariants `ticketd verify` checks;
//! - `shared`: what the workers share; [`error`]: the cluster's error type;
//! - `clock`: Redis's clock, which the node's "now" follows;
//! - [`rooms`]: waiting rooms' logs in Redis, replicated on every node.

mod clock;
mod commit;
pub mod connection;
pub mod error;
pub mod lease;
pub mod mongo;
mod reconcile;
mod record;
mod replicas;
pub mod rooms;
pub mod scripts;
mod shared;
mod users;

use std::{
    collections::{HashMap, HashSet},
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
use tokio::{
    runtime::{Handle, Runtime},
    sync::{mpsc, Notify},
};

pub use connection::RedisConn;
pub use error::ClusterError;
use lease::LeaseSource;
use record::Record;
pub use shared::NodeSettings;
use shared::{block_on, on, Msg, Serving, Shared};

use crate::{
    admission::RoomSettings,
    config::{ActivityConfig, Config},
    stats::StatsBatch,
    store::types::{
        Access, ClaimRow, ImportReport, InTransit, NewUser, Reconciliation, ReportData, Revocation, StoreError, User,
        UserClaims, UserPage,
    },
    vocab::{Claim, CommitError, CommitOutcome, PendingClaim},
    worker::{Ctl, Stop},
};

/// Redis + MongoDB, and the workers that connect this node to them.
pub struct ClusterStore {
    /// Its own runtime: the store is used from synchronous code (start-up,
    /// tools, reload) as well as from the server's tasks.
    runtime: Option<Runtime>,
    handle: Handle,
    shared: Arc<Shared>,
    serving: Option<Serving>,
    queue_capacity: usize,
}

impl Drop for ClusterStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // A node that took its id and then stopped before serving (its
            // config refused at start) lets go of the id, or its next start
            // would wait out the hold. After a shutdown the committer has
            // let go already, and this finds nothing to release. On a
            // thread of its own: the store may be dropped inside a runtime.
            if self.serving.is_some() {
                let (shared, handle) = (self.shared.clone(), rt.handle().clone());
                let _ = std::thread::spawn(move || {
                    handle.block_on(async {
                        let _ = tokio::time::timeout(Duration::from_secs(1), lease::unregister_node(&shared)).await;
                    })
                })
                .join();
            }
            rt.shutdown_background();
        }
    }
}

/// Connects to Redis (twice with `replica_acks`) and MongoDB. With
/// [`Access::Record`], a Redis that cannot be reached stops nothing: the
/// connection is then made at its first command.
async fn connect(
    config: &Config,
    access: Access<'_>,
    timeout: Duration,
) -> Result<(RedisConn, RedisConn, Database), ClusterError> {
    let url = config.storage.redis_url().unwrap_or_default();
    let unreachable = |what, url: &str, setting, reason: String| ClusterError::Unreachable {
        what,
        url: without_password(url),
        setting,
        reason,
    };
    let redis_unreachable = |e: redis::RedisError| unreachable("Redis", &url, "redis_url", e.to_string());
    let open_redis = || async {
        RedisConn::connect(url.as_str(), timeout)
            .await
            .map_err(redis_unreachable)
    };
    let redis = match RedisConn::connect(url.as_str(), timeout).await {
        Ok(redis) => redis,
        // A tool reading the record goes on without Redis (see
        // `claims_in_transit`); anything else needs it now.
        Err(e) if matches!(access, Access::Record) && error::out_of_reach(&e) => {
            RedisConn::lazy(url.as_str(), timeout).map_err(redis_unreachable)?
        }
        Err(e) => return Err(redis_unreachable(e)),
    };
    // With `replica_acks`, the rooms' `WAIT`s hold a connection of their own.
    // An export or report waits for no replica (and may find Redis down).
    let rooms_redis = if config.cluster.replica_acks == 0 || matches!(access, Access::Record) {
        redis.clone()
    } else {
        open_redis().await?
    };
    let uri = config.storage.mongodb_uri().unwrap_or_default();
    let mongo_failed = |e: mongodb::error::Error| unreachable("MongoDB", &uri, "mongodb_uri", e.to_string());
    let mut options = mongodb::options::ClientOptions::parse(uri.as_str())
        .await
        .map_err(mongo_failed)?;
    options.server_selection_timeout = Some(Duration::from_secs(2));
    options.connect_timeout = Some(Duration::from_secs(2));
    options.app_name = Some("ticketd".into());
    // A claim leaves Redis's backlog once MongoDB acknowledges it, so that
    // acknowledgement must survive MongoDB's crash and failover: the
    // server's default (`w: 1`, journal by its own schedule) could lose
    // the last ~100 ms of inserts, claims then in neither. What the URI
    // sets (`w`, `journal`, `wtimeoutMS`) is the operator's choice; what
    // it leaves unset is filled in. The timeout bounds a write a majority
    // cannot confirm (a replica set with a secondary down): it fails, and
    // the backlog keeps its claims for the next try, instead of waiting
    // for ever.
    let mut concern = options.write_concern.take().unwrap_or_default();
    let w = concern.w.get_or_insert(mongodb::options::Acknowledgment::Majority);
    // `w=0` (unacknowledged, the operator's choice) takes no journal flag.
    if *w != mongodb::options::Acknowledgment::Nodes(0) {
        concern.journal.get_or_insert(true);
        concern.w_timeout.get_or_insert(MONGO_MAJORITY_TIMEOUT);
    }
    options.write_concern = Some(concern);
    let db = mongodb::Client::with_options(options)
        .map_err(mongo_failed)?
        .database(&config.storage.database);
    mongo::ensure_indexes(&db).await.map_err(mongo_failed)?;
    Ok((redis, rooms_redis, db))
}

/// How long a MongoDB write waits for a majority to confirm it.
const MONGO_MAJORITY_TIMEOUT: Duration = Duration::from_secs(5);

/// Refuses a Redis that may lose writes it acknowledged (no AOF, or an AOF
/// not fsynced on every write, or not while it rewrites the AOF): a commit
/// it acknowledged could vanish in a crash, and the code go to a second
/// user. Refuses one that may evict keys when its memory fills
/// (`maxmemory` with any policy but `noeviction`): the claimed codes, the
/// users' counts, the backlog bound for MongoDB are keys like any other,
/// and an evicted one is a promise gone without a crash (with
/// `noeviction` a full Redis refuses the commit and the claim is refused,
/// nothing lost). Asks the server
/// `storage.redis_url` names, over a connection of its own (on a Redis
/// Cluster, that node: run every node alike). A server that answers CONFIG
/// GET with "unknown command" or "no permission" (renamed away or not
/// allowed, as some hosted ones do) or without the settings is trusted,
/// with a warning; any other failure (loading, down) stops the start.
async fn check_durable(config: &Config) -> Result<(), ClusterError> {
    let url = config.storage.redis_url().unwrap_or_default();
    let asked = durability(url.as_str()).await;
    // Allowed a volatile Redis, a failure to ask (loading, slow) stops nothing.
    if config.cluster.allow_volatile_redis && asked.is_err() {
        return Ok(());
    }
    let refusal = match asked? {
        Durability::Fit => return Ok(()),
        Durability::Unsaid(why) => {
            tracing::warn!(
                why,
                "Redis would not say how it persists (CONFIG GET); it must run with appendonly yes and appendfsync \
                 always."
            );
            return Ok(());
        }
        Durability::Unfit(refusal) => refusal,
    };
    if config.cluster.allow_volatile_redis {
        let (appendonly, appendfsync) = match &refusal {
            ClusterError::Volatile {
                appendonly,
                appendfsync,
                ..
            } => (appendonly.as_str(), appendfsync.as_str()),
            _ => ("yes", "always"),
        };
        tracing::warn!(
            %appendonly,
            %appendfsync,
            why = %refusal,
            "Redis may lose claims it acknowledged (cluster.allow_volatile_redis = true): never run a sale like this."
        );
        return Ok(());
    }
    Err(refusal)
}

/// Whether a Redis keeps every write it acknowledges (see [`check_durable`]).
enum Durability {
    Fit,
    /// It may lose them: why, and what to set.
    Unfit(ClusterError),
    /// It will not say (CONFIG renamed away, not allowed, or silent): the
    /// operator's to check.
    Unsaid(String),
}

/// Asks the Redis at `url` how it persists, over a connection of its own.
async fn durability(url: &str) -> Result<Durability, ClusterError> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    durability_on(&mut conn, url).await
}

/// [`durability`] over `conn`.
async fn durability_on(conn: &mut redis::aio::MultiplexedConnection, url: &str) -> Result<Durability, ClusterError> {
    let volatile = |appendonly: String, appendfsync: String| ClusterError::Volatile {
        url: without_password(url),
        appendonly,
        appendfsync,
    };
    let read = async {
        let mut settings = HashMap::new();
        for name in ["appendonly", "appendfsync"] {
            let answer: HashMap<String, String> = redis::cmd("CONFIG").arg("GET").arg(name).query_async(conn).await?;
            settings.extend(answer);
        }
        // A server that does not know one of these (a Redis-compatible one,
        // a proxy) leaves it unknown; the two above still decide.
        for name in ["no-appendfsync-on-rewrite", "maxmemory", "maxmemory-policy"] {
            let answer: Result<HashMap<String, String>, _> =
                redis::cmd("CONFIG").arg("GET").arg(name).query_async(conn).await;
            match answer {
                Ok(answer) => settings.extend(answer),
                Err(error) if matches!(error.code(), Some("ERR" | "NOPERM")) => {}
                Err(error) => return Err(error),
            }
        }
        Ok::<_, redis::RedisError>(settings)
    };
    let settings = match read.await {
        Ok(settings) => settings,
        // CONFIG renamed away (unknown command) or not allowed: trusted.
        Err(error) if matches!(error.code(), Some("ERR" | "NOPERM")) => {
            return Ok(Durability::Unsaid(error.to_string()));
        }
        Err(error) => return Err(ClusterError::Redis(error)),
    };
    let (Some(appendonly), Some(appendfsync)) = (settings.get("appendonly"), settings.get("appendfsync")) else {
        return Ok(Durability::Unsaid(
            "CONFIG GET named neither appendonly nor appendfsync".into(),
        ));
    };
    let unfit = if appendonly != "yes" || appendfsync != "always" {
        Some(volatile(appendonly.clone(), appendfsync.clone()))
    } else if settings.get("no-appendfsync-on-rewrite").is_some_and(|v| v == "yes") {
        Some(ClusterError::Unsafe {
            url: without_password(url),
            setting: "no-appendfsync-on-rewrite yes".into(),
            why: "while it rewrites its AOF it does not fsync, so claims it acknowledged then could be lost in a \
                  crash and their codes handed out again",
            want: "`no-appendfsync-on-rewrite no`",
        })
    } else {
        match (settings.get("maxmemory"), settings.get("maxmemory-policy")) {
            (Some(max), Some(policy)) if max != "0" && policy != "noeviction" => Some(ClusterError::Unsafe {
                url: without_password(url),
                setting: format!("maxmemory {max} and maxmemory-policy {policy}"),
                why: "when its memory fills it deletes keys, and the claimed codes, the users' counts and the \
                      claims on their way to MongoDB are keys: a code could be handed out again, a user exceed \
                      the limit, an acknowledged claim never reach MongoDB",
                want: "`maxmemory-policy noeviction` (a full Redis then refuses claims, losing none) or \
                       `maxmemory 0`",
            }),
            _ => None,
        }
    };
    Ok(unfit.map_or(Durability::Fit, Durability::Unfit))
}

/// How often a serving node asks Redis again how it persists.
const DURABILITY_EVERY: Duration = Duration::from_secs(2);

/// Asks Redis how it persists, as the start did, every
/// [`DURABILITY_EVERY`]: a Redis restarted under another config, or
/// reconfigured by `CONFIG SET`, kept taking claims it could lose, with
/// `/healthz` green. While it is unfit, claims are refused (503) and
/// `/healthz` and `ticketd_redis_durable` say so. Once fit, claims resume
/// only when no AOF rewrite is running or due: the AOF that `CONFIG SET
/// appendonly yes` starts holds nothing until its first rewrite ends.
///
/// It asks the server `storage.redis_url` names, as the start does (on a
/// Redis Cluster, that node: run every node alike). It cannot tell what a
/// Redis already lost (one restarted without its AOF came back empty):
/// `ticketd verify` does. One that will not say keeps the state it had; a
/// round that cannot ask counts in the worker's errors. Not run with
/// `cluster.allow_volatile_redis`.
async fn watch_durability(shared: Arc<Shared>, url: String, ctl: Ctl, mut stop: Stop) {
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(DURABILITY_EVERY) => {}
            _ = stop.requested() => return,
        }
        ctl.tick();
        let was_fit = shared.redis_durable.load(Ordering::Relaxed);
        let look = async {
            if conn.is_none() {
                conn = Some(
                    redis::Client::open(url.as_str())?
                        .get_multiplexed_async_connection()
                        .await?,
                );
            }
            let c = conn.as_mut().expect("connected above");
            let found = durability_on(c, &url).await?;
            // Back from unfit: not before the AOF's rewrite is done.
            if matches!(found, Durability::Fit) && !was_fit {
                let info: String = redis::cmd("INFO").arg("persistence").query_async(c).await?;
                let busy = ["aof_rewrite_in_progress:1", "aof_rewrite_scheduled:1"];
                if info.lines().any(|l| busy.contains(&l.trim())) {
                    return Ok::<_, ClusterError>(None);
                }
            }
            Ok(Some(found))
        };
        // A Redis that does not answer (frozen, away) is the committer's
        // gate's to find; this look must not hold up the node's stop.
        let asked = tokio::select! {
            asked = tokio::time::timeout(DURABILITY_EVERY, look) => asked,
            _ = stop.requested() => return,
        };
        match asked {
            Ok(Ok(Some(Durability::Fit))) => {
                if !shared.redis_durable.swap(true, Ordering::Relaxed) {
                    tracing::info!("Redis keeps every write again; claims resume.");
                }
            }
            Ok(Ok(Some(Durability::Unfit(problem)))) => {
                ctl.error(&problem);
                if shared.redis_durable.swap(false, Ordering::Relaxed) {
                    tracing::error!(
                        %problem,
                        "Redis no longer keeps every write it acknowledges (restarted with another config, or \
                         reconfigured); claims are refused until it does."
                    );
                }
            }
            // Will not say, or an AOF rewrite to wait for: as it was.
            Ok(Ok(Some(Durability::Unsaid(_)) | None)) => {}
            Ok(Err(error)) => {
                conn = None;
                ctl.error(&error);
            }
            Err(_) => {
                conn = None;
                ctl.error(&"Redis did not say how it persists within 2 s");
            }
        }
    }
}

/// Refuses a Redis whose failover could lose acknowledged commits: one
/// with replicas while `cluster.replica_acks` is 0 (unless
/// `allow_volatile_redis`), or fewer replicas per master than
/// `replica_acks` (every commit would wait for them in vain). One server
/// reports its replicas in `INFO replication`; a Redis Cluster's topology
/// (`CLUSTER NODES`) gives each master's: the fewest must cover
/// `replica_acks`, and any replica at all asks for it. A server
/// that will not say is trusted, with a warning, as in [`check_durable`].
async fn check_replicated(config: &Config, redis: &RedisConn) -> Result<(), ClusterError> {
    let url = without_password(config.storage.redis_url().unwrap_or_default().as_str());
    let wanted = config.cluster.replica_acks;
    let mut conn = redis.clone();
    let replicas = if redis.is_cluster() {
        redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async::<String>(&mut conn)
            .await
            .map(|nodes| replicas_per_master(&nodes))
    } else {
        redis::cmd("INFO")
            .arg("replication")
            .query_async::<String>(&mut conn)
            .await
            .map(|info| {
                info.lines()
                    .find_map(|l| l.trim().strip_prefix("connected_slaves:"))
                    .and_then(|n| n.parse().ok())
                    .map_or((0, 0), |n| (n, n))
            })
    };
    let (fewest, most) = match replicas {
        Ok(n) => n,
        Err(error) if matches!(error.code(), Some("ERR" | "NOPERM")) => {
            tracing::warn!(%error, "Redis would not say whether it has replicas; with replicas, set cluster.replica_acks so that a failover cannot lose acknowledged claims.");
            return Ok(());
        }
        Err(error) => return Err(ClusterError::Redis(error)),
    };
    if wanted > fewest {
        return Err(ClusterError::TooFewReplicas {
            url,
            wanted,
            replicas: fewest,
        });
    }
    // Any master with a replica can fail over to it.
    if most > 0 && wanted == 0 {
        if !config.cluster.allow_volatile_redis {
            return Err(ClusterError::Unreplicated { url, replicas: most });
        }
        tracing::warn!(
            replicas = most,
            "Redis has replicas but cluster.replica_acks = 0 (cluster.allow_volatile_redis = true): a failover can lose acknowledged claims."
        );
    }
    Ok(())
}

/// The replicas of the Redis Cluster masters with the fewest and with the
/// most, from `CLUSTER NODES` (`<id> <addr> <flags> <master id> ...
/// <slots>`): only masters that serve slots count, and only replicas not
/// marked failed.
fn replicas_per_master(nodes: &str) -> (usize, usize) {
    let rows: Vec<Vec<&str>> = nodes.lines().map(|l| l.split_whitespace().collect()).collect();
    let flags = |row: &[&str], flag: &str| row.get(2).is_some_and(|f| f.split(',').any(|x| x == flag));
    let counts: Vec<usize> = rows
        .iter()
        .filter(|r| flags(r, "master") && !flags(r, "fail") && r.len() > 8)
        .map(|master| {
            rows.iter()
                .filter(|r| flags(r, "slave") && !flags(r, "fail") && r.get(3) == master.first())
                .count()
        })
        .collect();
    (
        counts.iter().copied().min().unwrap_or(0),
        counts.iter().copied().max().unwrap_or(0),
    )
}

/// `url` with the password of its user part, if any, hidden (for messages).
fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}***{}", &url[..scheme + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

impl ClusterStore {
    /// Connects to Redis and MongoDB; a serving node also registers its id
    /// and starts its workers on the runner: the committer, the MongoDB
    /// writer and the reaper.
    pub fn open(config: &Config, access: Access<'_>) -> Result<ClusterStore, StoreError> {
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
        match ClusterStore::start(config, access, &handle) {
            Ok((shared, serving)) => Ok(ClusterStore {
                runtime: Some(runtime),
                handle,
                shared,
                serving,
                queue_capacity: config.journal.queue_capacity,
            }),
            Err(e) => {
                // Not dropped: `serve` opens the store inside its own
                // runtime, where blocking on this one's shutdown panics (and
                // the reason the node could not start was never printed).
                runtime.shutdown_background();
                Err(e)
            }
        }
    }

    /// Connects and, for a serving node, registers its id and starts the
    /// workers (see [`ClusterStore::open`]).
    fn start(
        config: &Config,
        access: Access<'_>,
        handle: &Handle,
    ) -> Result<(Arc<Shared>, Option<Serving>), StoreError> {
        let handle = handle.clone();
        // `verify` reads whole activities in one script: give it time.
        let timeout = match access {
            Access::Inspect => Duration::from_secs(120),
            _ => Duration::from_secs(1),
        };
        let (redis, rooms_redis, db) = block_on(&handle, connect(config, access, timeout))?;
        let client = db.client().clone();
        let started = ClusterStore::start_connected(config, access, &handle, (redis, rooms_redis, db));
        if started.is_err() {
            // The driver's pool workers are stopped before the runtime drops
            // its tasks: dropped in the middle of a request, another of the
            // driver's tasks panicked (a SendError), once in a few refused
            // starts, its backtrace printed before the reason.
            block_on(&handle, async {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.shutdown().immediate(true)).await;
            });
        }
        started
    }

    /// [`ClusterStore::start`] once Redis and MongoDB are connected.
    fn start_connected(
        config: &Config,
        access: Access<'_>,
        handle: &Handle,
        (redis, rooms_redis, db): (RedisConn, RedisConn, Database),
    ) -> Result<(Arc<Shared>, Option<Serving>), StoreError> {
        let handle = handle.clone();
        if matches!(access, Access::Serve(_)) {
            block_on(&handle, check_durable(config))?;
            block_on(&handle, check_replicated(config, &redis))?;
        }
        let shared = Arc::new(Shared {
            redis,
            rooms_redis,
            join_confirmations: DashMap::new(),
            db,
            node: Arc::from(config.node_id()),
            instance: format!("{:016x}", rand::random::<u64>()),
            id_kept: Mutex::new(std::time::Instant::now()),
            cfg: config.cluster.clone(),
            redis_up: AtomicBool::new(true),
            redis_durable: AtomicBool::new(true),
            mongo_up: AtomicBool::new(true),
            backlog: AtomicUsize::new(0),
            backlog_full: AtomicBool::new(false),
            shutdown_grace_ms: AtomicU64::new(config.server.shutdown_grace.0.as_millis() as u64),
            activities: DashMap::new(),
            leftover: Mutex::new(HashSet::new()),
            settings: DashMap::new(),
            doubts: Mutex::new(Vec::new()),
            epochs: Mutex::new(HashMap::new()),
            ids: Mutex::new((0, 0)),
            nonce: AtomicU64::new(0),
            backlog_grew: Notify::new(),
        });
        let queue_capacity = config.journal.queue_capacity;
        let serving = match access {
            Access::Tool | Access::Record | Access::Inspect => None,
            Access::Serve(runner) => {
                block_on(&handle, lease::register_node(&shared))?;
                // Before the first request: sale times are Redis's.
                block_on(&handle, clock::follow_at_start(&shared))?;
                let (tx, rx) = mpsc::channel(queue_capacity);
                let commits = Arc::new(Mutex::new(Some(tx)));
                let closing = Arc::new(AtomicBool::new(false));
                let serving = Serving { commits, closing };
                let committer = (shared.clone(), serving.clone());
                runner.task("committer", &handle, move |ctl, stop| {
                    commit::committer(committer.0, committer.1, rx, ctl, stop)
                });
                let writer = shared.clone();
                runner.task("mongo-writer", &handle, move |ctl, stop| {
                    commit::writer(writer, ctl, stop)
                });
                let reaper = shared.clone();
                runner.task("reaper", &handle, move |ctl, stop| lease::reaper(reaper, ctl, stop));
                if !config.cluster.allow_volatile_redis {
                    let (watched, url) = (
                        shared.clone(),
                        config.storage.redis_url().unwrap_or_default().to_string(),
                    );
                    runner.task("redis-durability", &handle, move |ctl, stop| {
                        watch_durability(watched, url, ctl, stop)
                    });
                }
                Some(serving)
            }
        };
        Ok((shared, serving))
    }

    fn block<F: Future>(&self, f: F) -> F::Output {
        block_on(&self.handle, f)
    }

    pub(super) fn commit(&self, pending: PendingClaim) {
        let refuse = |p: PendingClaim, e| p.answer(CommitOutcome::Failed(e));
        let Some(serving) = &self.serving else {
            return refuse(pending, CommitError::Unavailable);
        };
        if serving.closing.load(Ordering::Relaxed)
            || !self.shared.redis_up.load(Ordering::Relaxed)
            || !self.shared.redis_durable.load(Ordering::Relaxed)
        {
            // Fail fast: the lease worker probes Redis and reopens the gate.
            return refuse(pending, CommitError::Unavailable);
        }
        let sender = serving.commits.lock().clone();
        match sender {
            Some(tx) => match tx.try_send(Msg::Claim(pending)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(Msg::Claim(p))) => refuse(p, CommitError::Overloaded),
                Err(mpsc::error::TrySendError::Closed(Msg::Claim(p))) => refuse(p, CommitError::Unavailable),
                Err(_) => {}
            },
            None => refuse(pending, CommitError::Unavailable),
        }
    }

    pub(super) fn describe(&self) -> String {
        let redis = if self.shared.redis.is_cluster() {
            "Redis Cluster"
        } else {
            "Redis"
        };
        format!(
            "cluster store (node {}, database {}: {redis} and MongoDB connected)",
            self.shared.node,
            self.shared.db.name()
        )
    }

    pub(super) fn reconcile(&self) -> Result<Reconciliation, StoreError> {
        Ok(self.block(reconcile::reconcile(&self.shared))?)
    }

    /// The Redis side of the waiting rooms (a node, or a tool reading a room's log).
    pub fn room_source(&self) -> rooms::RoomSource {
        rooms::RoomSource::new(self.shared.clone(), self.handle.clone())
    }

    /// The Redis side of leasing, for the inventory's lease worker (a serving node only).
    pub fn lease_source(&self) -> Option<LeaseSource> {
        self.serving
            .as_ref()
            .map(|_| LeaseSource::new(self.shared.clone(), self.handle.clone()))
    }

    pub(super) fn is_healthy(&self) -> bool {
        self.serving.is_some()
            && self.shared.redis_up.load(Ordering::Relaxed)
            && self.shared.redis_durable.load(Ordering::Relaxed)
    }

    /// Whether claims are refused because this node's MongoDB backlog
    /// reached `cluster.max_backlog` (until the writer drains some of it).
    pub(super) fn backlog_full(&self) -> bool {
        self.shared.backlog_full.load(Ordering::Relaxed)
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

    /// Backlog and connection state, for `/metrics`.
    pub fn gauges(&self) -> crate::metrics::ClusterGauges {
        crate::metrics::ClusterGauges {
            backlog: self.shared.backlog.load(Ordering::Relaxed),
            redis_up: self.shared.redis_up.load(Ordering::Relaxed),
            redis_durable: self.shared.redis_durable.load(Ordering::Relaxed),
            mongo_up: self.shared.mongo_up.load(Ordering::Relaxed),
        }
    }

    /// Imports `config` under the cluster's import lock: an import counts
    /// each ticket type's codes and generates the rest, so two at once
    /// (two operators, or one run on two hosts) both generated them, and
    /// twice the configured stock went on sale. A second import waits for
    /// the first and then adds nothing. The lock lives `IMPORT_LOCK_TTL` and
    /// is renewed while the import runs, so a crashed import frees it soon.
    pub(super) fn import(&self, config: &Config, node_start_ms: i64) -> Result<ImportReport, StoreError> {
        const IMPORT_LOCK_TTL: Duration = Duration::from_secs(20);
        // A Redis no node would serve from: said now, not at the nodes'
        // start after every code was pushed.
        self.block(check_durable(config))?;
        let token = format!("{}:{:016x}", self.shared.node, rand::random::<u64>());
        let mut redis = self.shared.redis.clone();
        let key = scripts::IMPORT_LOCK_KEY;
        let ttl_ms = IMPORT_LOCK_TTL.as_millis() as u64;
        let mut told = false;
        loop {
            let taken = self
                .block(scripts::hold(&mut redis, key, &token, ttl_ms))
                .map_err(ClusterError::from)?;
            if taken {
                break;
            }
            if !std::mem::replace(&mut told, true) {
                tracing::warn!("Another `ticketd import` is running; waiting for it to finish.");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Set once the lock may have lapsed (not renewed within its time):
        // the import then stops before it puts codes on sale.
        let lost = Arc::new(AtomicBool::new(false));
        let renew = {
            let (mut redis, token, lost) = (redis.clone(), token.clone(), lost.clone());
            self.handle.spawn(async move {
                let mut kept_at = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(IMPORT_LOCK_TTL / 4).await;
                    let kept: redis::RedisResult<i64> = scripts::LOCK_KEEP_OR_RELEASE
                        .key(key)
                        .arg(&token)
                        .arg(ttl_ms)
                        .invoke_async(&mut redis)
                        .await;
                    match kept {
                        Ok(1) => kept_at = tokio::time::Instant::now(),
                        Ok(_) => lost.store(true, Ordering::Relaxed),
                        Err(error) => tracing::warn!(%error, "Could not renew the import lock."),
                    }
                    if kept_at.elapsed() >= IMPORT_LOCK_TTL {
                        lost.store(true, Ordering::Relaxed);
                    }
                }
            })
        };
        let imported = self.import_locked(config, node_start_ms, &lost);
        renew.abort();
        let released: redis::RedisResult<i64> = self.block(
            scripts::LOCK_KEEP_OR_RELEASE
                .key(key)
                .arg(&token)
                .invoke_async(&mut redis),
        );
        if let Err(error) = released {
            tracing::warn!(%error, "Could not release the import lock; it lapses by itself.");
        }
        imported
    }

    /// Refuses `config` if it moved a ticket type MongoDB holds to another
    /// activity, as `ticketd import` does: a node serving it would sell the
    /// ticket type against the new activity's master list, which has none
    /// of its codes (`NOT_IMPORTED` for good), while other nodes sell it
    /// under the old. With MongoDB unreachable the check is left to the
    /// import (a start or a reload must not wait for MongoDB).
    pub(super) fn refuse_moves(&self, config: &Config) -> Result<(), StoreError> {
        match self.block(mongo::ticket_activities(&self.shared.db)) {
            Ok(stored) => {
                let moved = config.moved_from(|ticket| stored.get(ticket).cloned());
                if moved.is_empty() {
                    Ok(())
                } else {
                    Err(StoreError::MovedTicketType(moved.join("; ")))
                }
            }
            Err(error) => {
                tracing::warn!(%error, "Could not check the config's ticket types against MongoDB.");
                Ok(())
            }
        }
    }

    fn import_locked(
        &self,
        config: &Config,
        node_start_ms: i64,
        lost: &AtomicBool,
    ) -> Result<ImportReport, StoreError> {
        let stored = self.block(mongo::ticket_activities(&self.shared.db))?;
        let moved = config.moved_from(|ticket| stored.get(ticket).cloned());
        if !moved.is_empty() {
            return Err(StoreError::MovedTicketType(moved.join("; ")));
        }
        // What the nodes would refuse of it, now or when they read it: they
        // refresh within `cluster.refresh_interval`, on clocks a minute off
        // at most (a queue about to open counts as open). Cluster times are
        // absolute: `node_start_ms` resolves nothing here.
        let read_by = i64::try_from(config.cluster.refresh_interval.0.as_millis()).unwrap_or(i64::MAX);
        let now = crate::clock::now_ms().saturating_add(read_by).saturating_add(60_000);
        let previous = self.block(mongo::activities(&self.shared.db))?;
        let frozen: Vec<String> = config
            .activities
            .iter()
            .filter_map(|a| {
                let old = previous.iter().find(|p| p.id == a.id)?;
                let old = RoomSettings::of(old, node_start_ms)?;
                old.refused_change(&a.id, RoomSettings::of(a, node_start_ms).as_ref(), now)
            })
            .collect();
        if !frozen.is_empty() {
            return Err(StoreError::FrozenRoom(format!(
                "{} (an import counts a queue that opens within the nodes' cluster.refresh_interval and a minute \
                 of clock skew as opened: they read it up to that much later)",
                frozen.join("; ")
            )));
        }
        // As a node's reload refuses them: the nodes that follow what is
        // stored would each draw such a lottery empty.
        let rooms = self.room_source();
        let late = crate::admission::late_lotteries(config, node_start_ms, |id| {
            matches!(rooms.past(id), Ok(crate::admission::Past::Untouched))
        });
        if !late.is_empty() {
            return Err(StoreError::FrozenRoom(late.join("; ")));
        }
        let (named, others) = self.block(mongo::codes_of_other_tickets(&self.shared.db, config))?;
        if others > 0 {
            return Err(StoreError::codes_of_other_tickets(&named, others));
        }
        if lost.load(Ordering::Relaxed) {
            return Err(lock_lapsed());
        }
        let report = self.block(mongo::import(&self.shared.db, config, node_start_ms))?;
        for a in &config.activities {
            for t in &a.tickets {
                if lost.load(Ordering::Relaxed) {
                    return Err(lock_lapsed());
                }
                let pushed = self.block(lease::push_unclaimed(&self.shared, &a.id, &t.id))?;
                if pushed > 0 {
                    tracing::info!(ticket = %t.id, pushed, "Codes pushed onto the master list.");
                }
            }
        }
        Ok(report)
    }

    pub(super) fn activities(&self) -> Result<Vec<ActivityConfig>, StoreError> {
        self.block(mongo::activities(&self.shared.db))
    }

    pub(super) fn retire(&self, activity: &str) -> Result<bool, StoreError> {
        Ok(self.block(mongo::retire(&self.shared.db, activity))?)
    }

    /// Up to `limit` claims of `activity_id` after `after` (time, claim
    /// id), in that order, joined with their users.
    pub(super) fn export_page(
        &self,
        activity_id: &str,
        after: Option<(i64, i64)>,
        limit: usize,
    ) -> Result<Vec<ClaimRow>, StoreError> {
        Ok(self.block(mongo::export_page(&self.shared.db, activity_id, after, limit as i64))?)
    }

    pub(super) fn has_activity(&self, activity_id: &str) -> Result<bool, StoreError> {
        Ok(self.block(mongo::has_activity(&self.shared.db, activity_id))?)
    }

    pub(super) fn create_users(&self, users: &[NewUser]) -> Result<usize, StoreError> {
        let mut created = 0;
        for chunk in users.chunks(1000) {
            created += self
                .block(users::insert_new_users(&self.shared, chunk))?
                .iter()
                .flatten()
                .count();
        }
        Ok(created)
    }

    pub(super) fn create_user(&self, user: &NewUser) -> Result<User, StoreError> {
        let ids = self.block(users::insert_new_users(&self.shared, std::slice::from_ref(user)))?;
        let id = ids.first().copied().flatten().ok_or(StoreError::UsernameTaken)?;
        Ok(User {
            id,
            username: user.username.clone(),
            nickname: user.nickname.clone(),
            password_hash: user.password_hash.clone(),
            created_at_ms: user.created_at_ms,
        })
    }

    pub(super) fn index_skeletons(&self, skeleton: fn(&str) -> String) -> Result<usize, StoreError> {
        Ok(self.block(mongo::index_skeletons(&self.shared.db, skeleton))?)
    }

    pub(super) fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        Ok(self.block(mongo::user_by_name(&self.shared.db, username))?)
    }

    pub(super) fn set_password_hash(&self, user_id: u64, hash: &str) -> Result<(), StoreError> {
        self.block(mongo::set_password_hash(&self.shared.db, user_id, None, hash))?;
        Ok(())
    }

    pub(super) fn rehash_password(&self, user_id: u64, old: &str, new: &str) -> Result<bool, StoreError> {
        Ok(self.block(mongo::set_password_hash(&self.shared.db, user_id, Some(old), new))?)
    }

    pub(super) fn user_by_skeleton(&self, skeleton: &str) -> Result<Option<User>, StoreError> {
        Ok(self.block(mongo::user_by_skeleton(&self.shared.db, skeleton))?)
    }

    pub(super) fn users_page(&self, after: u64, limit: usize) -> Result<UserPage, StoreError> {
        Ok(self.block(mongo::users_page(&self.shared.db, after, limit as i64))?)
    }

    pub(super) fn revoke_session(&self, user: u64, token_id: &str, expires_at_ms: i64) -> Result<(), StoreError> {
        Ok(self.block(mongo::revoke_session(&self.shared.db, user, token_id, expires_at_ms))?)
    }

    pub(super) fn revoke_issued_before(&self, user: u64, issued_ms: i64, expires_at_ms: i64) -> Result<(), StoreError> {
        Ok(self.block(mongo::revoke_issued_before(
            &self.shared.db,
            user,
            issued_ms,
            expires_at_ms,
        ))?)
    }

    pub(super) fn revoked_sessions(&self, now_ms: i64, since_ms: Option<i64>) -> Result<Vec<Revocation>, StoreError> {
        Ok(self.block(mongo::revoked_sessions(&self.shared.db, now_ms, since_ms))?)
    }

    pub(super) fn forget_secret(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.block(mongo::forget_secret(&self.shared.db, name))?)
    }

    pub(super) fn secret(&self, name: &str, create: &dyn Fn() -> String) -> Result<String, StoreError> {
        Ok(self.block(mongo::secret(&self.shared.db, name, create()))?)
    }

    pub(super) fn add_stats(&self, batch: &mut StatsBatch) -> Result<(), StoreError> {
        Ok(self.block(mongo::add_stats(&self.shared.db, batch))?)
    }

    pub(super) fn report_data(&self, activity_id: &str, top: usize) -> Result<ReportData, StoreError> {
        // Counted first: claims that reach MongoDB while the report reads it
        // make this overstate what is missing, never understate it.
        let in_transit = self.claims_in_transit(activity_id)?;
        let mut data = self.block(mongo::report_data(&self.shared.db, activity_id, top))?;
        data.in_transit = in_transit;
        Ok(data)
    }

    /// Claims of `activity_id` committed in Redis and not in MongoDB yet:
    /// on their way in a node's backlog (for long while MongoDB is down, or
    /// when the node died and no live node has reaped its backlog yet).
    ///
    /// MongoDB must answer (it is what the count is taken from); Redis need
    /// not: out of reach, the count is [`InTransit::Unknown`], and the
    /// export or report goes on with what MongoDB holds. (Redis refusing
    /// the read, a wrong password say, is an error as before.)
    pub(super) fn claims_in_transit(&self, activity_id: &str) -> Result<InTransit, StoreError> {
        let shared = self.shared.clone();
        let activity = activity_id.to_owned();
        Ok(self.block(async move {
            // MongoDB first: a claim committed and written between the two
            // reads then adds to Redis's count only, so the difference can
            // overstate what is missing but never hide a claim that is.
            let stored = mongo::claims_of_activity(&shared.db, &activity)
                .await
                .map_err(ClusterError::from)?;
            let mut redis = shared.redis.clone();
            let committed: Result<u64, _> = redis::cmd("HLEN")
                .arg(scripts::Keys::new(&activity).claimed())
                .query_async(&mut redis)
                .await;
            Ok::<_, ClusterError>(match committed {
                Ok(committed) => InTransit::Counted(committed.saturating_sub(stored)),
                Err(e) if error::out_of_reach(&e) => InTransit::Unknown(e.to_string()),
                Err(e) => return Err(e.into()),
            })
        })?)
    }

    /// See [`Store::claim_conflicts`](crate::store::Store::claim_conflicts).
    pub(super) fn claim_conflicts(&self, activity_id: &str) -> Result<u64, StoreError> {
        let shared = self.shared.clone();
        let activity = activity_id.to_owned();
        Ok(self.block(async move { mongo::conflicts_of_activity(&shared.db, &activity).await })?)
    }

    /// Every claim `user` holds in the given activities, from Redis (the
    /// claims made through other nodes included), as the master has them:
    /// for showing.
    pub async fn claims_of_user(&self, user: u64, activities: &[Arc<str>]) -> Result<Vec<Claim>, StoreError> {
        self.held_by(user, activities, 0).await
    }

    /// See [`Shared::shutdown_grace_ms`].
    pub(super) fn set_shutdown_grace(&self, grace: Duration) {
        self.shared
            .shutdown_grace_ms
            .store(grace.as_millis() as u64, Ordering::Relaxed);
    }

    /// Every claim `user` holds: in the activities this node `serves` from
    /// Redis, as [`claims_of_user`](Self::claims_of_user), and in every
    /// other from MongoDB. An activity taken off sale (`ticketd retire`, or
    /// out of the nodes' config) keeps its claims, and its fans their codes:
    /// read from Redis by the activities the node serves, they vanished
    /// from `/ticket/list`, and `/ticket/detail` answered 404. MongoDB holds
    /// them once the backlogs have drained. While it is known to be down
    /// (or does not answer within a second), only the served activities'
    /// claims are shown, and the answer says it is not complete: the
    /// claims of the sale on now come first.
    pub async fn every_claim_of_user(&self, user: u64, serves: &[Arc<str>]) -> Result<UserClaims, StoreError> {
        let mut claims = self.held_by(user, serves, 0).await?;
        if !self.shared.mongo_up.load(Ordering::Relaxed) {
            return Ok(UserClaims {
                claims,
                complete: false,
            });
        }
        let (shared, serves) = (self.shared.clone(), serves.to_vec());
        let elsewhere = on(&self.handle, async move {
            let read = mongo::claims_of_user_outside(&shared.db, user, &serves);
            match tokio::time::timeout(Duration::from_secs(1), read).await {
                Ok(found) => Ok(found?),
                Err(_) => Err(ClusterError::Protocol("MongoDB did not answer within a second".into())),
            }
        })
        .await;
        let complete = match elsewhere {
            Ok(found) => {
                claims.extend(found);
                true
            }
            Err(error) => {
                tracing::debug!(%error, "Could not read a user's claims in the activities not on sale.");
                false
            }
        };
        Ok(UserClaims { claims, complete })
    }

    /// [`claims_of_user`](Self::claims_of_user), confirmed by
    /// `cluster.replica_acks` replicas (an error when they do not confirm in
    /// time): for answering a claim with one, as a keyed retry's replay
    /// does. A claim only the master has — one answered OUTCOME_UNKNOWN
    /// while the replicas were behind — is no promise: a failover can lose
    /// it and sell its code to someone else. (The commit script's own
    /// replay waits for the replicas in the same way.)
    pub async fn confirmed_claims_of_user(&self, user: u64, activities: &[Arc<str>]) -> Result<Vec<Claim>, StoreError> {
        self.held_by(user, activities, self.shared.cfg.replica_acks).await
    }

    /// Whether reads that answer a claim wait for replicas
    /// (`cluster.replica_acks` above 0).
    pub(super) fn confirms_reads(&self) -> bool {
        self.shared.cfg.replica_acks > 0
    }

    async fn held_by(&self, user: u64, activities: &[Arc<str>], replica_acks: usize) -> Result<Vec<Claim>, StoreError> {
        let shared = self.shared.clone();
        let activities = activities.to_vec();
        Ok(on(&self.handle, async move {
            let mut out = Vec::new();
            let mut redis = shared.redis.clone();
            for a in &activities {
                let keys = scripts::Keys::new(a);
                let mut held = scripts::HELD.prepare_invoke();
                held.key(keys.held()).key(keys.claimed()).arg(user);
                let records: Vec<String> = replicas::run_replicated(&mut redis, &held, &keys, replica_acks).await?;
                for r in records {
                    out.push(Record::parse(a, &r)?.to_claim(a));
                }
            }
            Ok(out)
        })
        .await?)
    }
}

/// An import stopped because its lock may have lapsed (Redis unreachable
/// for longer than the lock lives): another import may be running.
fn lock_lapsed() -> StoreError {
    ClusterError::Protocol("the import lock lapsed (Redis unreachable for too long); run the import again".into())
        .into()
}

#[cfg(test)]
mod tests {
    use super::replicas_per_master;

    /// `CLUSTER NODES` of three masters with a replica each (Redis 7).
    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 slave 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 connected
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 127.0.0.1:30006@31006 slave 292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 0 1426238317741 6 connected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
";

    #[test]
    fn counts_the_replicas_of_the_masters_with_fewest_and_most() {
        assert_eq!(replicas_per_master(NODES), (1, 1));
        // One master's replica failed: that master has none left, the
        // others (which can still fail over) one each.
        let failed = NODES.replace("30006@31006 slave", "30006@31006 slave,fail");
        assert_eq!(replicas_per_master(&failed), (0, 1));
        // Masters alone.
        let masters: String = NODES
            .lines()
            .filter(|l| !l.contains("slave"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(replicas_per_master(&masters), (0, 0));
        // A master that serves no slots (a spare) does not count.
        let spare = format!("{NODES}aaaa 127.0.0.1:30007@31007 master - 0 0 7 connected\n");
        assert_eq!(replicas_per_master(&spare), (1, 1));
    }
}
