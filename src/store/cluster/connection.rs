//! The connection to Redis: one server, or a Redis Cluster.
//!
//! `storage.redis_url` names either. At start the node asks that server
//! (`INFO cluster`) which it is:
//! - one server: a [`ConnectionManager`], one multiplexed connection that
//!   reconnects by itself;
//! - a Redis Cluster: the `redis` crate's cluster client, seeded with that
//!   URL. It learns the slot map, sends each command to the master that
//!   owns its key's slot, and follows `MOVED`/`ASK` when slots move.
//!
//! Nothing else changes between the two, because of how keys are named
//! (see [`super::scripts`]): every key a script touches belongs to one
//! activity and carries its hash tag, so a script's keys always share one
//! slot; the few global keys (claim id blocks, user ids, node ids, the
//! import lock) are each used by single-key commands only.

use std::time::Duration;

use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    Cmd, Pipeline, RedisFuture, RedisResult, Value,
};

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection to one Redis server or to a Redis Cluster. Cheap to clone:
/// clones share the underlying connections.
#[derive(Clone)]
pub enum RedisConn {
    /// One server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects to the server at `url`, or to the Redis Cluster it belongs
    /// to. A command not answered within `response_timeout` fails (a
    /// serving node uses a second, so it closes its claim gate rather than
    /// queue behind a dead server).
    pub async fn connect(url: &str, response_timeout: Duration) -> RedisResult<RedisConn> {
        let client = redis::Client::open(url)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let mut single = ConnectionManager::new_with_config(client, manager).await?;
        let info: String = redis::cmd("INFO").arg("cluster").query_async(&mut single).await?;
        if !info.lines().any(|l| l.trim() == "cluster_enabled:1") {
            return Ok(RedisConn::Single(single));
        }
        let cluster = ClusterClient::builder([url])
            .connection_timeout(CONNECT_TIMEOUT)
            // Also the whole call's limit, retries included (the builder's
            // default): a lease re-sent after a timeout may run twice, and
            // the node must then hear the failure (and resynchronise its
            // lease), never only the last attempt's codes.
            .response_timeout(response_timeout)
            .retries(3)
            .max_retry_wait(500)
            .build()?
            .get_async_connection()
            .await?;
        Ok(RedisConn::Cluster(cluster))
    }

    /// A connection to the one server at `url`, made at its first command
    /// (and again at each later one while it fails): for a tool that can do
    /// without Redis ([`Access::Record`](crate::store::Access::Record)),
    /// opened while Redis was down. Whether `url` is a Redis Cluster cannot
    /// be asked then; if it is, commands for the other masters' slots fail
    /// (`MOVED`) as if it were still down.
    pub fn lazy(url: &str, response_timeout: Duration) -> RedisResult<RedisConn> {
        let client = redis::Client::open(url)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(0);
        Ok(RedisConn::Single(ConnectionManager::new_lazy_with_config(
            client, manager,
        )?))
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}
