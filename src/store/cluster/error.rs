//! The cluster store's error type.

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
    /// Another running node uses this node id.
    #[error(
        "another node called `{0}` is running (or stopped less than cluster.lease_ttl ago); node ids must be unique"
    )]
    NodeIdTaken(String),
    /// A script answered something this version does not understand.
    #[error("unexpected answer from Redis: {0}")]
    Protocol(String),
    /// A failure heard second-hand (as text: one error, many callers): a
    /// call made once for several callers failed, or was not made because
    /// the last call to Redis had failed.
    #[error("{0}")]
    Shared(String),
}
