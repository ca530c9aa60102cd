//! Waiting for Redis replicas (`cluster.replica_acks`): a write to the
//! activity's fence key and a `WAIT` in one pipeline, and the waiting
//! room's joins confirmed in groups.
//!
//! `WAIT` counts the replicas that hold the connection's last write, and
//! holds that connection until they do (or its timeout): Redis reads
//! nothing more from it meanwhile. The fence write makes the count mean
//! something whatever came before on the connection: Redis replicates in
//! order, so a replica that holds the fence holds every write the master
//! made before it, on any connection.

use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt, Shared as SharedFuture};
use parking_lot::Mutex;

use super::{connection::RedisConn, error::ClusterError, scripts::Keys};

/// How long one `WAIT` gives the replicas. It blocks the connection it is
/// sent on (every call of this node to that master on that connection
/// queues behind it), so it stays well under the serving node's
/// one-second response timeout; an unconfirmed claim batch is retried
/// until `cluster.commit_timeout`.
pub(super) const REPLICA_WAIT_MS: u64 = 250;

/// Appends the activity's fence write and a `WAIT` for `replica_acks`
/// replicas to `pipe`, whose first keyed command names the activity (so
/// they go to its master, on that connection); the pipeline's last answer
/// is then the replicas that confirmed.
pub(super) fn fence_and_wait(pipe: &mut redis::Pipeline, keys: &Keys, replica_acks: usize) {
    pipe.cmd("INCR")
        .arg(keys.fence())
        .ignore()
        .cmd("WAIT")
        .arg(replica_acks)
        .arg(REPLICA_WAIT_MS);
}

/// One call of a script that must be confirmed by the replicas (a claim
/// batch's commit first of all): the script, then, with `replica_acks`, a
/// write to the activity's fence and a `WAIT` in the same pipeline, so they
/// go to the same master over the same connection (a pipeline follows its
/// first keyed command; a `WAIT` alone would go to every master).
///
/// `WAIT` counts replicas that hold this connection's last write. A retry
/// (on a new connection, after a lost answer) finds the claims committed
/// and writes nothing, nor does an answer read back (a replayed key): the
/// fence's write comes after whatever the script read, and Redis
/// replicates in order, so a replica that has the fence has the claims.
/// (Debian's Redis 7.0 makes any command, a read too, set the offset a
/// later `WAIT` waits for, so there a retried script waits without the
/// fence: checked by hand, with a frozen replica, a `PING` and a `WAIT` on a
/// new connection. Only a `WAIT` that is a connection's first command
/// returns at once. The fence does not depend on which version does what;
/// no test can tell it is missing on 7.0.)
///
/// The waiting room's admitter appends run the same way
/// ([`super::rooms`]), on a connection of their own; joins are confirmed
/// in groups ([`JoinConfirmations`]); a give-back of leased codes too
/// ([`super::lease`]), and the look-up that answers a keyed retry.
pub(super) async fn run_replicated<T: redis::FromRedisValue>(
    redis: &mut RedisConn,
    invocation: &redis::ScriptInvocation<'_>,
    keys: &Keys,
    replica_acks: usize,
) -> Result<T, ClusterError> {
    if replica_acks == 0 {
        return Ok(invocation.invoke_async(redis).await?);
    }
    let mut pipe = redis::pipe();
    pipe.invoke_script(invocation);
    fence_and_wait(&mut pipe, keys, replica_acks);
    let (results, acked): (T, usize) = match pipe.query_async(redis).await {
        // Not loaded on this master yet (a restart, a failover): load, retry.
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            invocation.load_async(redis).await?;
            pipe.query_async(redis).await?
        }
        answer => answer?,
    };
    confirmed(acked, replica_acks)?;
    Ok(results)
}

/// Fewer replicas than `cluster.replica_acks` confirmed: an error.
pub(super) fn confirmed(acked: usize, wanted: usize) -> Result<(), ClusterError> {
    if acked < wanted {
        return Err(ClusterError::NotReplicated { acked, wanted });
    }
    Ok(())
}

/// One activity's waiting-room joins, confirmed in groups: every join
/// whose script has returned waits for the next fence and `WAIT`, which
/// one of them sends once the one before has returned. Each join waiting
/// with a `WAIT` of its own made a node's joins to one master go one
/// replica round trip at a time (a `WAIT` holds its connection); a group
/// shares one, as a claim batch does.
///
/// A join's script and its group's `WAIT` are two requests, not one
/// pipeline: if the master changed between them (a failover the client
/// followed), the `WAIT` would count the new master's replicas. So the
/// group's pipeline first reads, from the master it goes to, each member's
/// place and the log entry its join pushed: a member without its place, or
/// whose entry is not its join there, joined on a master that is gone, and
/// is not confirmed. (The place alone passed a re-join a failover lost: the
/// fan already held a place, the one it had been passed over in.)
pub(super) struct JoinConfirmations {
    redis: RedisConn,
    keys: Keys,
    /// The room's places (`q:{A}:places`) and log (`q:{A}:log`).
    room: [String; 2],
    replica_acks: usize,
    /// The next group, not sent yet: joins whose scripts return now join it.
    next: Mutex<Option<Pending>>,
    /// Held by the group being confirmed: one at a time, so a group's fence
    /// is sent after every script of its members returned.
    sending: tokio::sync::Mutex<()>,
}

/// A group not sent yet: its confirmation, and its members: each user,
/// and for a new place the index and text of the entry its join pushed.
struct Pending {
    round: Round,
    members: Arc<Mutex<Vec<Member>>>,
}

type Member = (u64, Option<(i64, String)>);

/// One group's confirmation, awaited by all its members: the members with
/// no place on the master that confirmed it.
type Round = SharedFuture<BoxFuture<'static, Result<Arc<Vec<u64>>, Arc<ClusterError>>>>;

impl JoinConfirmations {
    /// Groups for `keys`' activity, whose room's places and log are
    /// `room`, on `redis` (the rooms' connection).
    pub(super) fn new(redis: RedisConn, keys: Keys, room: [String; 2], replica_acks: usize) -> Arc<JoinConfirmations> {
        Arc::new(JoinConfirmations {
            redis,
            keys,
            room,
            replica_acks,
            next: Mutex::new(None),
            sending: tokio::sync::Mutex::new(()),
        })
    }

    /// Returns once `replica_acks` replicas hold `user`'s place (and the
    /// log entry `pushed`, its index and text, for a new one) and every
    /// write this node's rooms connection made before the call (a join's
    /// script that has returned), or fails when they do not confirm in
    /// time, or the place or entry is not on the master they follow.
    pub(super) async fn confirm(
        self: &Arc<Self>,
        user: u64,
        pushed: Option<(i64, String)>,
    ) -> Result<(), ClusterError> {
        let round = {
            let mut next = self.next.lock();
            let pending = next.get_or_insert_with(|| self.round());
            pending.members.lock().push((user, pushed));
            pending.round.clone()
        };
        match round.await {
            Ok(lost) if lost.contains(&user) => Err(ClusterError::Shared(
                "the place is not on the Redis master that confirmed it (a failover?)".into(),
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(match &*e {
                ClusterError::NotReplicated { acked, wanted } => ClusterError::NotReplicated {
                    acked: *acked,
                    wanted: *wanted,
                },
                other => ClusterError::Shared(format!("confirming joins with the replicas: {other}")),
            }),
        }
    }

    /// A new group: it waits for the one being sent, then takes itself out
    /// of `next` (from then on, a join that returns waits for the next
    /// group: this fence may be sent before its script), reads its
    /// members' places, writes the fence and waits for the replicas.
    fn round(self: &Arc<Self>) -> Pending {
        let members: Arc<Mutex<Vec<Member>>> = Arc::new(Mutex::new(Vec::new()));
        let (me, joined) = (self.clone(), members.clone());
        let round = async move {
            let _turn = me.sending.lock().await;
            let members = {
                let mut next = me.next.lock();
                next.take();
                std::mem::take(&mut *joined.lock())
            };
            let [places, log] = &me.room;
            let mut pipe = redis::pipe();
            pipe.cmd("HMGET")
                .arg(places)
                .arg(members.iter().map(|(u, _)| *u).collect::<Vec<_>>());
            for (_, pushed) in &members {
                if let Some((index, _)) = pushed {
                    pipe.cmd("LINDEX").arg(log).arg(*index);
                }
            }
            fence_and_wait(&mut pipe, &me.keys, me.replica_acks);
            let mut redis = me.redis.clone();
            let answers: Vec<redis::Value> = pipe.query_async(&mut redis).await.map_err(|e| Arc::new(e.into()))?;
            let parse =
                |e: redis::ParsingError| Arc::new(ClusterError::Protocol(format!("a join group's answer: {e}")));
            let (first, rest) = answers
                .split_first()
                .ok_or_else(|| Arc::new(ClusterError::Protocol("an empty answer to a join group".into())))?;
            let (last, entries) = rest
                .split_last()
                .ok_or_else(|| Arc::new(ClusterError::Protocol("no WAIT in a join group's answer".into())))?;
            let held: Vec<Option<String>> = redis::from_redis_value_ref(first).map_err(parse)?;
            let acked: usize = redis::from_redis_value_ref(last).map_err(parse)?;
            confirmed(acked, me.replica_acks).map_err(Arc::new)?;
            let mut entries = entries.iter();
            let mut lost = Vec::new();
            for ((user, pushed), place) in members.iter().zip(&held) {
                let entry_there = match pushed {
                    None => true,
                    Some((_, event)) => {
                        let found: Option<String> = match entries.next() {
                            Some(v) => redis::from_redis_value_ref(v).map_err(parse)?,
                            None => None,
                        };
                        found.as_deref() == Some(event.as_str())
                    }
                };
                if place.is_none() || !entry_there {
                    lost.push(*user);
                }
            }
            Ok(Arc::new(lost))
        }
        .boxed()
        .shared();
        Pending { round, members }
    }
}
