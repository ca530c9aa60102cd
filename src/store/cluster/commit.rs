//! The committer (claims to Redis, one script per batch and activity) and
//! the writer (this node's backlog to MongoDB, in bulk): two workers.
//!
//! The committer answers each claim in the store's terms
//! ([`CommitOutcome`]); what that means for the user and the code is the
//! claim decision's business.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::{
    error::ClusterError,
    lease,
    record::Record,
    replicas::{confirmed, fence_and_wait, run_replicated, REPLICA_WAIT_MS},
    scripts,
    shared::{Doubt, Msg, Serving, Shared},
};
use crate::{
    metrics,
    vocab::{answer_all, CommitError, CommitOutcome, PendingClaim},
    worker::{Ctl, Stop},
};

/// Claim ids are handed to nodes in blocks of this many (one INCRBY each).
const ID_BLOCK: u64 = 4096;

/// Takes whatever has queued (at most `cluster.commit_batch`), commits it per
/// activity, concurrently, and answers every claim. While one batch is in
/// Redis the next queues, so batches grow with load on their own. Asked to
/// stop, it closes the queue and ends once what was queued is committed.
pub(super) async fn committer(
    shared: Arc<Shared>,
    serving: Serving,
    mut rx: mpsc::Receiver<Msg>,
    ctl: Ctl,
    mut stop: Stop,
) {
    let mut buf = Vec::with_capacity(shared.cfg.commit_batch);
    let mut closed = false;
    loop {
        let received = tokio::select! {
            n = rx.recv_many(&mut buf, shared.cfg.commit_batch) => n,
            _ = stop.requested(), if !closed => {
                serving.close();
                closed = true;
                continue;
            }
        };
        if received == 0 {
            break;
        }
        ctl.tick();
        let mut groups: HashMap<Arc<str>, Vec<PendingClaim>> = HashMap::new();
        let mut pings = Vec::new();
        for msg in buf.drain(..) {
            match msg {
                Msg::Claim(p) => groups.entry(p.claim().activity_id.clone()).or_default().push(p),
                Msg::Ping(reply) => pings.push(reply),
            }
        }
        let commits = groups
            .into_iter()
            .map(|(activity, claims)| commit_activity(&shared, activity, claims));
        futures_util::future::join_all(commits).await;
        for reply in pings {
            let _ = reply.send(());
        }
    }
}

/// Claim ids for `n` claims, unique across the cluster.
async fn claim_ids(shared: &Shared, n: usize) -> Result<Vec<u64>, ClusterError> {
    let mut out = Vec::with_capacity(n);
    loop {
        {
            let mut ids = shared.ids.lock();
            while out.len() < n && ids.0 < ids.1 {
                out.push(ids.0);
                ids.0 += 1;
            }
        }
        if out.len() == n {
            return Ok(out);
        }
        let mut redis = shared.redis.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("INCRBY").arg(scripts::IDS_KEY).arg(ID_BLOCK);
        let acks = shared.cfg.replica_acks;
        let end: u64 = if acks == 0 {
            let (end,): (u64,) = pipe.query_async(&mut redis).await?;
            end
        } else {
            // On a replica before any claim carries it: a failover that
            // lost the INCRBY would hand the same block to another node.
            // (`tk:ids` may sit on another master than the claims.)
            pipe.cmd("WAIT").arg(acks).arg(REPLICA_WAIT_MS);
            let (end, acked): (u64, usize) = pipe.query_async(&mut redis).await?;
            confirmed(acked, acks)?;
            end
        };
        *shared.ids.lock() = (end - ID_BLOCK + 1, end + 1);
    }
}

struct Attempt {
    nonce: String,
    id: u64,
    pending: PendingClaim,
}

async fn commit_activity(shared: &Shared, activity: Arc<str>, claims: Vec<PendingClaim>) {
    let ids = match claim_ids(shared, claims.len()).await {
        Ok(ids) => ids,
        Err(error) => {
            shared.redis_failed(&error);
            tracing::debug!(%error, "Could not reserve claim ids.");
            answer_all(
                claims
                    .into_iter()
                    .map(|p| (p, CommitOutcome::Failed(CommitError::Unavailable))),
            );
            return;
        }
    };
    let work: Vec<Attempt> = claims
        .into_iter()
        .zip(ids)
        .map(|(pending, id)| Attempt {
            nonce: shared.next_nonce(),
            id,
            pending,
        })
        .collect();
    let keys = scripts::Keys::new(&activity);
    let results = match invoke_commit(shared, &keys, &work).await {
        Ok(r) => r,
        Err(error) => {
            if let ClusterError::NotReplicated { .. } = error {
                tracing::warn!(%error, claims = work.len(), "No replica confirmed a commit in time (cluster.replica_acks); its claims are answered 503 and settled later: kept if a replica gets them, for sale again if a failover loses them.");
            } else {
                tracing::warn!(%error, claims = work.len(), "Commit outcome unknown; the claims are answered 503 and their codes checked when Redis returns.");
            }
            let mut doubts = shared.doubts.lock();
            let answers = work.into_iter().map(|a| {
                let claim = a.pending.claim();
                doubts.push(Doubt {
                    activity: activity.clone(),
                    ticket: claim.ticket_id.clone(),
                    code: claim.code.clone(),
                    nonce: a.nonce,
                });
                (a.pending, CommitOutcome::InDoubt)
            });
            answer_all(answers);
            return;
        }
    };
    let mut committed = 0;
    let mut answers = Vec::with_capacity(work.len());
    for (a, answer) in work.into_iter().zip(results) {
        let outcome = if answer == "OK" {
            committed += 1;
            CommitOutcome::Committed(a.id)
        } else if answer == "LOST" {
            CommitOutcome::CodeTaken
        } else if answer == "LAPSED" {
            CommitOutcome::Lapsed
        } else if answer == "NOPASS" {
            CommitOutcome::PassRequired
        } else if answer == "FULL" {
            set_backlog_full(shared, true);
            CommitOutcome::Failed(CommitError::BacklogFull)
        } else if let Some(codes) = answer.strip_prefix("LIMIT") {
            let codes: Vec<String> = serde_json::from_str(codes).unwrap_or_default();
            CommitOutcome::LimitReached(codes.into_iter().map(Arc::from).collect())
        } else if let Some(json) = answer.strip_prefix("REPLAY") {
            match Record::parse(&activity, json) {
                Ok(r) => CommitOutcome::Duplicate(r.to_claim(&activity)),
                Err(_) => CommitOutcome::Failed(CommitError::Unavailable),
            }
        } else {
            // This claim's own record: a retry after an unknown outcome
            // found it already committed.
            match Record::parse(&activity, &answer) {
                Ok(r) if r.nonce == a.nonce => {
                    committed += 1;
                    CommitOutcome::Committed(r.id)
                }
                _ => CommitOutcome::Failed(CommitError::Unavailable),
            }
        };
        answers.push((a.pending, outcome));
    }
    // One message per lane for this activity's claims, not a wake-up per
    // claim (see `vocab::Home`); the failure paths above do the same.
    answer_all(answers);
    if committed > 0 {
        shared.backlog.fetch_add(committed, Ordering::Relaxed);
        shared.backlog_grew.notify_one();
    }
}

/// Runs the commit script, retrying while the outcome is unknown (the
/// script is idempotent per nonce) until `cluster.commit_timeout`.
async fn invoke_commit(shared: &Shared, keys: &scripts::Keys, work: &[Attempt]) -> Result<Vec<String>, ClusterError> {
    // The lowest limit the batch's claims were decided under: a batch can
    // straddle a reload that lowered it, and the script takes the lowest of
    // this and the nodes' records (this node's may have failed to update).
    let limit = work.iter().map(|a| a.pending.limit()).min().unwrap_or(1);
    let mut invocation = scripts::COMMIT.prepare_invoke();
    invocation
        .key(keys.claimed())
        .key(keys.users())
        .key(keys.held())
        .key(keys.idem())
        .key(keys.outbox(&shared.node))
        .key(keys.sold())
        .key(keys.limits())
        .key(keys.nodes())
        .key(keys.served())
        .key(keys.room_log());
    // Each claim names its lease set; a batch mostly has one ticket type,
    // so each name is built once.
    let mut leases: Vec<(&str, String)> = Vec::new();
    for a in work {
        let ticket = &*a.pending.claim().ticket_id;
        let at = match leases.iter().position(|(t, _)| *t == ticket) {
            Some(at) => at,
            None => {
                leases.push((ticket, keys.lease(ticket, &shared.node)));
                leases.len() - 1
            }
        };
        invocation.key(&leases[at].1);
    }
    invocation.arg(&*shared.node).arg(limit).arg(shared.cfg.max_backlog);
    for a in work {
        let c = a.pending.claim();
        let key = c.idempotency_key.as_deref().unwrap_or("");
        let head = Record::head(
            a.id,
            c.user_id,
            &c.ticket_id,
            &c.code,
            c.claimed_at_ms,
            &shared.node,
            &a.nonce,
            key,
        );
        invocation
            .arg(&a.nonce)
            .arg(&*c.ticket_id)
            .arg(&*c.code)
            .arg(c.user_id)
            .arg(key)
            .arg(head)
            .arg(serde_json::to_string(&*c.code).expect("a string serialises to JSON"))
            .arg(a.pending.valid_until().unwrap_or(0));
    }
    let deadline = Instant::now() + shared.cfg.commit_timeout.0;
    let mut delay = Duration::from_millis(20);
    loop {
        let started = Instant::now();
        let mut redis = shared.redis.clone();
        match run_replicated::<Vec<String>>(&mut redis, &invocation, keys, shared.cfg.replica_acks).await {
            Ok(results) if results.len() == work.len() => {
                metrics::global().redis_commit.observe(started.elapsed());
                shared.mark_redis(true);
                return Ok(results);
            }
            Ok(results) => {
                return Err(ClusterError::Protocol(format!(
                    "{} answers to {} claims",
                    results.len(),
                    work.len()
                )))
            }
            Err(error) => {
                shared.redis_failed(&error);
                if Instant::now() + delay >= deadline {
                    return Err(error);
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// Drains this node's backlogs to MongoDB: reads up to `cluster.mongo_batch`
/// records from the head of each activity's backlog, bulk-inserts them, then
/// removes exactly those records ([`scripts::ACK`]). On failure it backs off
/// (100 ms doubling to 5 s) and tries again; nothing is dropped. Once asked
/// to stop it keeps going until the backlogs are empty or
/// `server.shutdown_grace` (as last loaded: [`Shared::shutdown_grace_ms`])
/// has passed since the stop (what is left stays in Redis for the next
/// start or a live node), then gives up this node's id. A pass under way
/// when the stop comes is taken up again under that deadline (it ran on
/// without one, a long backlog's whole drain past the grace; dropped
/// between a write and its removal from the backlog, a record is written
/// again, which MongoDB takes as the same claim).
pub(super) async fn writer(shared: Arc<Shared>, ctl: Ctl, mut stop: Stop) {
    let mut delay = Duration::from_millis(100);
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut failing = HashMap::new();
    loop {
        let stopping = stop.is_requested();
        if stopping && deadline.is_none() {
            let grace = Duration::from_millis(shared.shutdown_grace_ms.load(Ordering::Relaxed));
            deadline = Some(tokio::time::Instant::now() + grace);
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            // With a backlog that could not be read (Redis away), the gauge
            // holds an old count, not what is left: it said "not empty",
            // claims 0.
            if failing.is_empty() {
                tracing::warn!(claims = shared.backlog.load(Ordering::Relaxed), "The MongoDB backlog is not empty; it stays in Redis and is written by this node's next start or by a live node.");
            } else {
                tracing::warn!(activities = failing.len(), "The MongoDB backlog could not be read (Redis is not answering); what it holds stays in Redis and is written by this node's next start or by a live node.");
            }
            break;
        }
        ctl.tick();
        let drained = match deadline {
            Some(d) => tokio::time::timeout_at(d, drain_once(&shared, &mut failing))
                .await
                .unwrap_or_else(|_| {
                    // Cut short by the deadline: not drained (the loop's top ends it).
                    Ok(Pass {
                        left: shared.backlog.load(Ordering::Relaxed).max(1),
                        ..Pass::default()
                    })
                }),
            None => tokio::select! {
                drained = drain_once(&shared, &mut failing) => drained,
                () = stop.requested() => continue,
            },
        };
        match drained {
            Ok(pass) if stopping && pass.left == 0 && failing.is_empty() => {
                tracing::info!("The MongoDB backlog is drained.");
                break;
            }
            Ok(pass) => {
                delay = Duration::from_millis(100);
                if let Some(error) = &pass.failed {
                    ctl.error(error);
                }
                // More to write, and writing goes: at once. Otherwise (a
                // backlog that keeps failing waits its turn) when it grows.
                if pass.written > 0 && shared.backlog.load(Ordering::Relaxed) > 0 {
                    continue;
                }
                tokio::select! {
                    _ = shared.backlog_grew.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = stop.requested(), if !stopping => {}
                }
            }
            Err(error) => {
                ctl.error(&error);
                // Only MongoDB's own failure says it is down: reading the
                // backlog from Redis fails too while Redis is away, and
                // nothing would set it back up without a claim to write.
                if error.is_mongo() && shared.mongo_up.swap(false, Ordering::Relaxed) {
                    tracing::error!(%error, backlog = shared.backlog.load(Ordering::Relaxed), "Writing claims to MongoDB failed; they wait in the backlog and claims continue while it has room.");
                }
                // The back-off ends at the stop's deadline, if it comes first.
                let until = tokio::time::Instant::now() + delay;
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline.map_or(until, |d| d.min(until))) => {}
                    _ = stop.requested(), if !stopping => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    lease::unregister_node(&shared).await;
}

/// Says whether claims are refused for a full backlog (`/healthz` 503 while
/// they are), and logs each change. Set by a claim answered `FULL`, and
/// from the backlogs themselves after each pass of the writer that looked
/// at all of them: set and cleared by events alone, a `FULL` answer counted
/// after the writer's last write (or a backlog emptied by a reaper) left
/// the node saying 503, taken out by its load balancer, with room in its
/// backlog and nothing left to write that would have cleared it.
fn set_backlog_full(shared: &Shared, full: bool) {
    if shared.backlog_full.swap(full, Ordering::Relaxed) == full {
        return;
    }
    if full {
        tracing::error!(
            max = shared.cfg.max_backlog,
            "The MongoDB backlog is full: claims are refused (503 BACKLOG_FULL) until it drains."
        );
    } else {
        tracing::info!("The MongoDB backlog has room again; claims are accepted.");
    }
}

/// The head of a backlog, up to `n` records. With `replica_acks`, only
/// once that many replicas hold them (a fence write and a `WAIT` after
/// reading, as in [`run_replicated`]): a record of a batch that was answered
/// 503 because no replica confirmed it must not reach MongoDB while a
/// failover could still take it from Redis, and its code go to someone
/// else.
async fn read_backlog(
    redis: &mut super::connection::RedisConn,
    keys: &scripts::Keys,
    outbox: &str,
    n: usize,
    replica_acks: usize,
) -> Result<Vec<String>, ClusterError> {
    let batch: Vec<String> = redis::cmd("LRANGE")
        .arg(outbox)
        .arg(0)
        .arg(n - 1)
        .query_async(redis)
        .await?;
    if replica_acks == 0 || batch.is_empty() {
        return Ok(batch);
    }
    let mut pipe = redis::pipe();
    fence_and_wait(&mut pipe, keys, replica_acks);
    let (acked,): (usize,) = pipe.query_async(redis).await?;
    confirmed(acked, replica_acks)?;
    Ok(batch)
}

/// Batches one activity's backlog gets in a pass before the next activity's
/// turn: an activity whose claims came faster than MongoDB took them kept
/// the pass, and every other activity's claims waited.
const BATCHES_PER_PASS: usize = 8;

/// What one pass of the writer did.
#[derive(Default)]
struct Pass {
    /// Records written to MongoDB.
    written: usize,
    /// Records left in the backlogs it looked at.
    left: usize,
    /// The most left in any one of them (each is refused at `max_backlog`).
    fullest: usize,
    /// The first activity whose backlog could not be written.
    failed: Option<ClusterError>,
}

/// An activity whose backlog could not be written (see [`drain_once`]):
/// tried again after `delay`, 100 ms doubling to 5 s, not at every pass.
struct Failing {
    retry_at: Instant,
    delay: Duration,
}

/// One pass over every activity's backlog, the sold ones and the leftover
/// ([`Shared::leftover`]). MongoDB failing ends the pass (it is every
/// activity's: the writer backs off). Any other error (a record that
/// cannot be read, the Redis master of one activity's keys away) ends only
/// that activity's turn and puts it in `failing` to wait its own back-off:
/// one activity's trouble ended the pass and held every other activity to
/// the writer's back-off.
async fn drain_once(shared: &Shared, failing: &mut HashMap<Arc<str>, Failing>) -> Result<Pass, ClusterError> {
    let mut activities: Vec<Arc<str>> = shared.activities.iter().map(|e| e.key().clone()).collect();
    {
        let mut leftover = shared.leftover.lock();
        // One this node sells again is drained as such.
        leftover.retain(|a| !shared.activities.contains_key(a));
        activities.extend(leftover.iter().cloned());
    }
    let mut pass = Pass::default();
    failing.retain(|a, _| activities.contains(a));
    for activity in activities {
        if failing.get(&activity).is_some_and(|f| f.retry_at > Instant::now()) {
            continue;
        }
        match drain_activity(shared, &activity, &mut pass.written).await {
            Ok(left) => {
                if failing.remove(&activity).is_some() {
                    tracing::info!(%activity, "This activity's backlog is written to MongoDB again.");
                }
                pass.left += left;
                pass.fullest = pass.fullest.max(left);
            }
            Err(error) if error.is_mongo() => return Err(error),
            Err(error) => {
                let delay = match failing.get(&activity) {
                    Some(f) => (f.delay * 2).min(Duration::from_secs(5)),
                    None => {
                        tracing::warn!(%activity, %error, "Could not write this activity's backlog to MongoDB; its claims stay in Redis, and the other activities' go on.");
                        Duration::from_millis(100)
                    }
                };
                let retry_at = Instant::now() + delay;
                failing.insert(activity, Failing { retry_at, delay });
                pass.failed.get_or_insert(error);
            }
        }
    }
    // Exact only when every backlog was looked at.
    if failing.is_empty() {
        shared.backlog.store(pass.left, Ordering::Relaxed);
        set_backlog_full(shared, pass.fullest >= shared.cfg.max_backlog);
    }
    Ok(pass)
}

/// Up to [`BATCHES_PER_PASS`] batches of one activity's backlog, counted
/// in `written`; returns the records left in it.
async fn drain_activity(shared: &Shared, activity: &Arc<str>, written: &mut usize) -> Result<usize, ClusterError> {
    let mut redis = shared.redis.clone();
    let keys = scripts::Keys::new(activity);
    let outbox = keys.outbox(&shared.node);
    for _ in 0..BATCHES_PER_PASS {
        let batch = read_backlog(
            &mut redis,
            &keys,
            &outbox,
            shared.cfg.mongo_batch,
            shared.cfg.replica_acks,
        )
        .await?;
        if batch.is_empty() {
            break;
        }
        let records: Vec<Record> = batch
            .iter()
            .map(|json| Record::parse(activity, json))
            .collect::<Result<_, _>>()?;
        let started = Instant::now();
        for c in super::mongo::insert_claims(&shared.db, &records).await? {
            tracing::error!(code = %c.code, user = c.user, claim = c.id, "MongoDB holds another claim of this code (or of this user's claim number): both were acknowledged. Kept in claim_conflicts; Redis lost writes it had acknowledged.");
        }
        metrics::global().mongo_write.observe(started.elapsed());
        if !shared.mongo_up.swap(true, Ordering::Relaxed) {
            tracing::info!("MongoDB takes writes again; draining the backlog.");
        }
        let acked: usize = scripts::ACK.key(&outbox).arg(&batch).invoke_async(&mut redis).await?;
        *written += records.len();
        // Falls as records go, so that a pass stopped by a later error
        // still shows what it wrote (`left` below resets it exactly).
        let _ = shared
            .backlog
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(acked)));
        if acked < batch.len() {
            // The head changed under us (a reaper moved it); re-read.
            tracing::debug!(acked, read = batch.len(), "Backlog head moved while writing.");
        }
    }
    let len: usize = redis::cmd("LLEN").arg(&outbox).query_async(&mut redis).await?;
    if len == 0 && !shared.activities.contains_key(activity) {
        // Anything the reaper moves here later, its next sweep finds.
        shared.leftover.lock().remove(activity);
    }
    Ok(len)
}
