//! The cluster store's error type.

impl ClusterError {
    /// MongoDB failed (refused or out of reach), not the data or Redis.
    pub fn is_mongo(&self) -> bool {
        matches!(self, ClusterError::Mongo(_))
    }

    /// Redis could not be reached ([`out_of_reach`]).
    pub fn is_redis_out_of_reach(&self) -> bool {
        matches!(self, ClusterError::Redis(e) if out_of_reach(e))
    }
}

/// Whether `error` says Redis could not be reached (refused, dropped,
/// timed out), rather than that it answered with a refusal (a wrong
/// password, a wrong key type, `MOVED`): what a tool that can do without
/// Redis goes on past, and nothing else.
pub fn out_of_reach(error: &redis::RedisError) -> bool {
    error.is_io_error() || error.is_timeout() || error.is_connection_refusal() || error.is_connection_dropped()
}

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis refused or could not be reached.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// MongoDB refused or could not be reached.
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// Redis or MongoDB could not be reached when the store was opened
    /// (the cause as text: as a source it would be printed twice).
    #[error("cannot use {what} at {url} (storage.{setting}): {reason}")]
    Unreachable {
        /// `Redis` or `MongoDB`.
        what: &'static str,
        /// The configured address, any password hidden.
        url: String,
        /// The setting that names it.
        setting: &'static str,
        /// Why.
        reason: String,
    },
    /// Redis does not keep every write it acknowledges (see
    /// `cluster.allow_volatile_redis`).
    #[error(
        "Redis at {url} runs with appendonly {appendonly}, appendfsync {appendfsync}: a claim it acknowledged \
         could be lost in a Redis crash and its code handed out again. Run it with `appendonly yes` and \
         `appendfsync always` (CONFIG SET, and in redis.conf), or set cluster.allow_volatile_redis = true \
         for a demo or a benchmark"
    )]
    Volatile {
        /// The configured address, any password hidden.
        url: String,
        /// Redis's `appendonly`.
        appendonly: String,
        /// Redis's `appendfsync`.
        appendfsync: String,
    },
    /// Redis may drop keys, or skip its fsyncs for a while (see
    /// `cluster.allow_volatile_redis`).
    #[error(
        "Redis at {url} runs with {setting}: {why}. Run it with {want} (CONFIG SET, and in redis.conf), or set \
         cluster.allow_volatile_redis = true for a demo or a benchmark"
    )]
    Unsafe {
        /// The configured address, any password hidden.
        url: String,
        /// The setting as Redis reports it.
        setting: String,
        /// What it could cost.
        why: &'static str,
        /// What to set instead.
        want: &'static str,
    },
    /// Redis has replicas, and a failover could lose commits this node
    /// acknowledged (see `cluster.replica_acks`).
    #[error(
        "Redis at {url} has a master with {replicas} replica(s): one promoted in a failover lacks any commit the old \
         master had not yet passed on, and its codes would be sold again. Set cluster.replica_acks = 1 (or more) so \
         that each commit is on a replica before it is answered, or cluster.allow_volatile_redis = true for a demo"
    )]
    Unreplicated {
        /// The configured address, any password hidden.
        url: String,
        /// Replicas of the master with the most.
        replicas: usize,
    },
    /// `cluster.replica_acks` asks for more replicas than a master has:
    /// every commit would wait for them and be answered 503.
    #[error(
        "cluster.replica_acks = {wanted}, but Redis at {url} has {replicas} replica(s) for a master: every commit \
         would wait for replicas that are not there"
    )]
    TooFewReplicas {
        /// The configured address, any password hidden.
        url: String,
        /// `cluster.replica_acks`.
        wanted: usize,
        /// Replicas of the master with the fewest.
        replicas: usize,
    },
    /// Fewer replicas than `cluster.replica_acks` confirmed a commit batch
    /// in time: it is on the master, but a failover could still lose it.
    #[error("{acked} of the {wanted} replica(s) cluster.replica_acks asks for confirmed this node's writes in time")]
    NotReplicated {
        /// Replicas that confirmed it.
        acked: usize,
        /// `cluster.replica_acks`.
        wanted: usize,
    },
    /// Another running node uses this node id.
    #[error(
        "another node called `{0}` is running (or stopped less than cluster.lease_ttl ago); node ids must be unique"
    )]
    NodeIdTaken(String),
    /// A stop signal came while the node waited for its id.
    #[error("stopped while waiting for this node id")]
    StoppedWhileWaiting,
    /// A script answered something this version does not understand.
    #[error("unexpected answer from Redis: {0}")]
    Protocol(String),
    /// A failure heard second-hand (as text: one error, many callers): a
    /// call made once for several callers failed, or was not made because
    /// the last call to Redis had failed.
    #[error("{0}")]
    Shared(String),
}
