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
    /// Another running node uses this node id.
    #[error(
        "another node called `{0}` is running (or stopped less than cluster.lease_ttl ago); node ids must be unique"
    )]
    NodeIdTaken(String),
    /// A script answered something this version does not understand.
    #[error("unexpected answer from Redis: {0}")]
    Protocol(String),
}
