//! Waiting rooms in a cluster: each room's log lives in Redis, under its
//! activity's hash tag, and every node keeps a replica of it.
//!
//! ```text
//! q:{A}:seed       str   the room's seed (hex), set once by the first node
//! q:{A}:log        list  the room's events (JSON), the order every replica applies
//! q:{A}:places     hash  user id -> w (waiting) | a:<pass expiry, Unix ms> (admitted) | p (passed over)
//!                        (a bare `a`: admitted, written by an earlier version)
//! q:{A}:waiting    int   places not yet reached (queue_capacity)
//! q:{A}:taken      hash  user id -> places taken (MAX_PLACES_PER_ACCOUNT; places
//!                        taken before this key existed are not counted)
//! q:{A}:shuffled   str   set when the shuffle event is in the log: the mode it
//!                        drew as (`queue`, `lottery`; `1` from earlier versions)
//! q:{A}:closed     str   set when the close event is in the log
//! q:{A}:seen       hash  user id -> last check-in (Unix ms), flushed by every node
//! q:{A}:admitter   str   the node instance that may append admissions (a lease)
//! q:{A}:cursor     int   places reached (admissions and skips in the log)
//! q:{A}:paused     str   set while the log says the sale is paused (pause and resume go in once)
//! ```
//!
//! A join is one script: a place per account, the places an account may
//! take over the room's life, the capacity, entries closed
//! after a lottery's draw, the event appended. The shuffle, admissions,
//! skips and the close are appended only by the node holding the admitter
//! lease (the append script checks it, so a node that lost the lease while
//! it was deciding appends nothing). What a replica computes from the log —
//! the drawn order of the joins before the shuffle event — is the same on
//! every node, so the shuffle happens exactly once, in the log.

use std::sync::{Arc, LazyLock};

use redis::Script;
use tokio::runtime::Handle;

use super::{
    error::ClusterError,
    replicas::{run_replicated, JoinConfirmations},
    scripts::Keys,
    shared::{block_on, on, Shared},
};
use crate::{
    admission::{
        draw::Seed,
        log::{self, Event},
        room::Followed,
        state::{Base, MAX_PLACES_PER_ACCOUNT},
        Past, Room, SharedLogs,
    },
    config::AdmissionMode,
    store::types::StoreError,
};

/// Entries read from a room's log per round trip.
const READ_CHUNK: isize = 5000;

/// The key names of one activity's room.
fn key(activity: &str, name: &str) -> String {
    format!("q:{{{activity}}}:{name}")
}

/// The room's seed: the one stored, else ARGV[1] stored first. KEYS seed.
static SEED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
",
    )
});

/// A place for a user: KEYS places, log, closed, shuffled, waiting, taken;
/// ARGV user, whether the caller's config makes the room a lottery, the
/// capacity, the join event, the pass expiry the caller saw lapse, the
/// places one account may take. A new place answers the log's length with
/// its join (at least 1), so its confirmation can find that entry. Once the room has drawn, the mode it drew
/// as decides, not the caller's: a node whose config disagrees (until its
/// replica reads the shuffle line) let a late entrant into a drawn lottery.
static JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local st = redis.call('HGET', KEYS[1], ARGV[1])
local drawn = redis.call('GET', KEYS[4])
local shuffled = drawn ~= false
local lottery = ARGV[2] == '1'
if drawn == 'lottery' then lottery = true elseif drawn == 'queue' then lottery = false end
local again = st == 'p' or (ARGV[5] ~= '' and (st == 'a:' .. ARGV[5] or st == 'a'))
if st and ((not again) or (lottery and shuffled)) then return 0 end
if (not st) and lottery and shuffled then return -2 end
if tonumber(redis.call('GET', KEYS[5]) or '0') >= tonumber(ARGV[3]) then return -3 end
if again and tonumber(redis.call('HGET', KEYS[6], ARGV[1]) or '1') >= tonumber(ARGV[6]) then return -4 end
redis.call('HSET', KEYS[1], ARGV[1], 'w')
redis.call('HINCRBY', KEYS[6], ARGV[1], 1)
redis.call('INCR', KEYS[5])
return redis.call('RPUSH', KEYS[2], ARGV[4])
",
    )
});

/// Names the drawn mode (`ARGV[1]`) in a `shuffled` flag (`KEYS[1]`) an
/// earlier version set to `1`; any other flag stays as it is.
static NAME_DRAWN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == '1' then redis.call('SET', KEYS[1], ARGV[1]) return 1 end
return 0
",
    )
});

/// Redis's time (Unix ms), then how many codes each user in ARGV holds
/// (`KEYS[1]`: the activity's `users` hash). One script, so the time is that
/// of the count, on the master that commits the activity's claims. `HMGET`
/// a thousand users at a time: all at once could `unpack` more arguments
/// than Lua's stack takes, and one `HGET` each costs Redis (which every
/// node's commits wait behind) several times as much.
static COUNTED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local clock = redis.call('TIME')
local out = {tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)}
for i = 1, #ARGV, 1000 do
  local counts = redis.call('HMGET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  for j = 1, #counts do
    out[#out + 1] = tonumber(counts[j] or '0')
  end
end
return out
",
    )
});

/// Appends the admitter's events: KEYS admitter, log, places, waiting,
/// shuffled, closed, cursor, paused; ARGV the admitter's instance, the
/// places its plan reached, the index of the last log entry its replica
/// had applied and that entry (both `''` for none), then per event its
/// kind, user and JSON. Refused (`-1`) unless the caller holds the lease;
/// (`-2`) if the log has reached more places; (`-3`) if the log does not
/// hold that entry there, as the replica read it (its text): a failover
/// lost writes the plan was made from (an admission planned from a lost
/// shuffle, appended to the log without it, would name a fan no replica
/// sees as next, and stall the room).
static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if tonumber(redis.call('GET', KEYS[7]) or '0') ~= tonumber(ARGV[2]) then return -2 end
if ARGV[3] ~= '' and redis.call('LINDEX', KEYS[2], tonumber(ARGV[3])) ~= ARGV[4] then return -3 end
local n, resumed = 0, false
for i = 5, #ARGV, 3 do
  local kind, user, json = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local keep = true
  if kind == 'admit' then
    redis.call('HSET', KEYS[3], user, 'a:' .. string.format('%.0f', cjson.decode(json)['x']))
    redis.call('DECR', KEYS[4]); redis.call('INCR', KEYS[7])
  elseif kind == 'skip' then
    redis.call('HSET', KEYS[3], user, 'p'); redis.call('DECR', KEYS[4]); redis.call('INCR', KEYS[7])
  elseif kind == 'shuffle' then
    keep = redis.call('SET', KEYS[5], cjson.decode(json)['m'] or '1', 'NX') ~= false
  elseif kind == 'close' then
    keep = redis.call('SET', KEYS[6], '1', 'NX') ~= false
  elseif kind == 'pause' then
    keep = redis.call('SET', KEYS[8], '1', 'NX') ~= false
  elseif kind == 'resume' then
    resumed = redis.call('DEL', KEYS[8]) == 1
    keep = resumed
  elseif kind == 'extend' then
    -- Only with the resume it follows, and only a pass still held.
    local st = redis.call('HGET', KEYS[3], user)
    keep = resumed and st ~= false and string.sub(st, 1, 1) == 'a'
    if keep then
      redis.call('HSET', KEYS[3], user, 'a:' .. string.format('%.0f', cjson.decode(json)['x']))
    end
  end
  if keep then
    redis.call('RPUSH', KEYS[2], json)
    n = n + 1
  end
end
return n
",
    )
});

static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('GET', KEYS[1])
if cur == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
",
    )
});

/// What a join script answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// A new place (or a new place at the back, after being passed over).
    New,
    /// The user already has a place: the same one.
    Same,
    /// The room has closed.
    Closed,
    /// A lottery after its draw.
    EntriesClosed,
    /// `queue_capacity` places are waiting.
    Full,
    /// The account has taken `MAX_PLACES_PER_ACCOUNT` places here already
    /// (the replica that asked had not seen them all).
    NoMorePlaces,
}

/// What an append to a shared log answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The events are on the log.
    Yes,
    /// Another node holds the admitter's lease now: nothing appended.
    NotAdmitter,
    /// The log has reached more places than the replica the plan was made
    /// from: nothing appended. A replica behind catches up at its next
    /// sync; one that never does would stop every admission.
    StaleCursor {
        /// The places the log has reached.
        log: usize,
    },
    /// The log does not hold the entry the plan's replica applied last,
    /// where it applied it: nothing appended (the next sync rebuilds the
    /// replica; see [`RoomSource::sync`]).
    Diverged,
}

/// A node's rooms keep their logs here.
impl SharedLogs for RoomSource {
    fn seed(&self, activity: &str) -> std::io::Result<Seed> {
        let hex = RoomSource::seed(self, activity, Seed::generate().to_hex()).map_err(std::io::Error::other)?;
        Seed::from_hex(&hex).ok_or_else(|| std::io::Error::other("the room's seed in Redis is not 64 hex digits"))
    }

    fn past(&self, activity: &str) -> std::io::Result<Past> {
        RoomSource::past(self, activity).map_err(std::io::Error::other)
    }
}

/// The Redis side of the waiting rooms, for a node or a tool.
#[derive(Clone)]
pub struct RoomSource {
    shared: Arc<Shared>,
    handle: Handle,
}

impl RoomSource {
    pub(super) fn new(shared: Arc<Shared>, handle: Handle) -> RoomSource {
        RoomSource { shared, handle }
    }

    /// The room's seed: the one stored, or `fresh` if none was (the first
    /// node to open the room sets it). Blocking: for start-up and reload.
    ///
    /// With `cluster.replica_acks`, only once that many replicas hold it
    /// (retried, as after a Redis error, for `cluster.commit_timeout`, then
    /// an error: the start or reload that opens the room fails). Its commitment is published to
    /// the fans at once; a seed only the master held, lost in a failover,
    /// was replaced by the next node to open the room, and the draw then
    /// revealed a seed that did not match the commitment fans had seen.
    pub fn seed(&self, activity: &str, fresh: String) -> Result<String, StoreError> {
        let (shared, seed_key) = (self.shared.clone(), key(activity, "seed"));
        let fence = Keys::new(activity);
        Ok(block_on(&self.handle, async move {
            let mut redis = shared.rooms_redis.clone();
            let mut invocation = SEED.prepare_invoke();
            invocation.key(&seed_key).arg(&fresh);
            // Unconfirmed, or a Redis error (a failover's aftermath): the
            // script is the same each time, so it is tried again, as a
            // commit batch is.
            let deadline = tokio::time::Instant::now() + shared.cfg.commit_timeout.0;
            let mut delay = std::time::Duration::from_millis(20);
            loop {
                match run_replicated(&mut redis, &invocation, &fence, shared.cfg.replica_acks).await {
                    Err(_) if tokio::time::Instant::now() + delay < deadline => {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(std::time::Duration::from_millis(500));
                    }
                    seed => break seed,
                }
            }
        })?)
    }

    /// How the room drew its order, once its log holds the draw and says:
    /// the `shuffled` flag names the mode; a flag an earlier version set
    /// (`1`) sends this to the log's shuffle line ([`log::drawn_as`]).
    /// Blocking: a node asks it of every activity its config makes a race,
    /// at each start and reload.
    fn drawn_as(&self, activity: &str) -> Result<Option<AdmissionMode>, StoreError> {
        Ok(match self.get(activity, "shuffled")?.as_deref() {
            None => None,
            Some("queue") => Some(AdmissionMode::Queue),
            Some("lottery") => Some(AdmissionMode::Lottery),
            Some(_) => block_on(&self.handle, self.first_drawn(activity))?,
        })
    }

    /// What the room's log in Redis says of its past. Any log at all is an
    /// opened room: the commit script refuses every claim without a pass
    /// once the log exists ([`super::scripts::COMMIT`]), so a node that
    /// sold the activity as a race beside it would sell nothing.
    /// Blocking, as [`RoomSource::drawn_as`].
    pub fn past(&self, activity: &str) -> Result<Past, StoreError> {
        if let Some(mode) = self.drawn_as(activity)? {
            return Ok(Past::Drawn(mode));
        }
        let (shared, log) = (self.shared.clone(), key(activity, "log"));
        let exists = block_on(&self.handle, async move {
            let mut redis = shared.redis.clone();
            let exists: bool = redis::cmd("EXISTS").arg(&log).query_async(&mut redis).await?;
            Ok::<_, ClusterError>(exists)
        })?;
        Ok(if exists { Past::Opened } else { Past::Untouched })
    }

    /// The mode the room's shuffle line names, read a chunk at a time up to
    /// that line (the joins before it can be many), for a flag an earlier
    /// version set; the flag then names the mode ([`RoomSource::name_drawn`]).
    async fn first_drawn(&self, activity: &str) -> Result<Option<AdmissionMode>, StoreError> {
        let mut from = 0;
        loop {
            let (_, events) = self.chunk(activity, from).await?;
            if let Some(mode) = log::drawn_as(&events) {
                self.name_drawn(activity, mode).await?;
                return Ok(Some(mode));
            }
            if (events.len() as isize) < READ_CHUNK {
                return Ok(None);
            }
            from += events.len() as u64;
        }
    }

    /// Sets the room's `shuffled` flag to `mode` where an earlier version
    /// set it to `1`, so the join script holds joins to the mode the room
    /// drew as (it trusts the caller's config under a `1`).
    async fn name_drawn(&self, activity: &str, mode: AdmissionMode) -> Result<(), StoreError> {
        let (shared, flag, mode) = (self.shared.clone(), key(activity, "shuffled"), mode.to_string());
        Ok(on(&self.handle, async move {
            let mut redis = shared.redis.clone();
            let _: i64 = NAME_DRAWN.key(&flag).arg(&mode).invoke_async(&mut redis).await?;
            Ok::<_, ClusterError>(())
        })
        .await?)
    }

    /// Takes a place for `user` (the room's checks in one script).
    /// `lapsed`: the expiry of `user`'s pass that the replica saw lapse
    /// unused (each replica retires passes itself; the shared log only
    /// records admissions). The place may be taken again at the back only
    /// if that is the admission Redis holds (`a:<expiry>`): a replica that
    /// has not yet seen a newer admission cannot undo it. A bare `a` is an
    /// admission an earlier version wrote (during a rolling upgrade), with
    /// no expiry to compare: the lapse the replica saw is taken as its
    /// lapse, rather than lock the fan out until the room ends.
    pub async fn join(
        &self,
        activity: &str,
        user: u64,
        now: i64,
        lottery: bool,
        capacity: usize,
        lapsed: Option<i64>,
    ) -> Result<Joined, StoreError> {
        let shared = self.shared.clone();
        let event = serde_json::to_string(&Event::Join { u: user, t: now }).expect("events serialise");
        let keys = ["places", "log", "closed", "shuffled", "waiting", "taken"].map(|k| key(activity, k));
        // With `replica_acks`, a join is answered once the replicas hold
        // it, confirmed with the other joins that returned meanwhile.
        // (Looked up first: the entry's key is allocated only once per room.)
        let confirmations = (shared.cfg.replica_acks > 0).then(|| match shared.join_confirmations.get(activity) {
            Some(c) => c.clone(),
            None => shared
                .join_confirmations
                .entry(Arc::from(activity))
                .or_insert_with(|| {
                    JoinConfirmations::new(
                        shared.rooms_redis.clone(),
                        Keys::new(activity),
                        [key(activity, "places"), key(activity, "log")],
                        shared.cfg.replica_acks,
                    )
                })
                .clone(),
        });
        Ok(on(&self.handle, async move {
            let mut redis = shared.rooms_redis.clone();
            let mut invocation = JOIN.prepare_invoke();
            for k in &keys {
                invocation.key(k);
            }
            let answer: i64 = invocation
                .arg(user)
                .arg(if lottery { "1" } else { "0" })
                .arg(capacity)
                .arg(&event)
                .arg(lapsed.map(|x| x.to_string()).unwrap_or_default())
                .arg(MAX_PLACES_PER_ACCOUNT)
                .invoke_async(&mut redis)
                .await?;
            // A join refused (closed, full, ...) wrote nothing to confirm;
            // a new one, its entry in the log.
            if let Some(confirmations) = confirmations.filter(|_| answer >= 0) {
                let pushed = (answer >= 1).then(|| (answer - 1, event));
                confirmations.confirm(user, pushed).await?;
            }
            Ok(match answer {
                1.. => Joined::New,
                0 => Joined::Same,
                -1 => Joined::Closed,
                -2 => Joined::EntriesClosed,
                -4 => Joined::NoMorePlaces,
                _ => Joined::Full,
            })
        })
        .await?)
    }

    /// The room log's entries from `from` on.
    pub async fn events(&self, activity: &str, from: u64) -> Result<Vec<Event>, StoreError> {
        Ok(self.entries(activity, from).await?.1)
    }

    /// The room log's entries from `from` on, as written and parsed.
    async fn entries(&self, activity: &str, from: u64) -> Result<(Vec<String>, Vec<Event>), StoreError> {
        let (mut lines, mut events) = (Vec::new(), Vec::new());
        loop {
            let (chunk_lines, chunk) = self.chunk(activity, from + events.len() as u64).await?;
            let n = chunk.len();
            lines.extend(chunk_lines);
            events.extend(chunk);
            if (n as isize) < READ_CHUNK {
                return Ok((lines, events));
            }
        }
    }

    /// Up to [`READ_CHUNK`] entries of the room's log from `from` on, as
    /// written and parsed.
    async fn chunk(&self, activity: &str, from: u64) -> Result<(Vec<String>, Vec<Event>), StoreError> {
        let (shared, log) = (self.shared.clone(), key(activity, "log"));
        Ok(on(&self.handle, async move {
            let mut redis = shared.redis.clone();
            let start = from as isize;
            let lines: Vec<String> = redis::cmd("LRANGE")
                .arg(&log)
                .arg(start)
                .arg(start + READ_CHUNK - 1)
                .query_async(&mut redis)
                .await?;
            let events = lines
                .iter()
                .map(|line| {
                    serde_json::from_str(line)
                        .map_err(|e| ClusterError::Protocol(format!("a room log entry is not an event: {e}")))
                })
                .collect::<Result<Vec<Event>, _>>()?;
            Ok((lines, events))
        })
        .await?)
    }

    /// Brings `room`'s replica up to the shared log. The read starts one
    /// entry early, at the last one the replica applied: a log that no
    /// longer holds it there (a Redis failover promoted a replica without
    /// the master's last writes) is not the one this replica followed, and
    /// the room is rebuilt from the whole log. Reading on from where it
    /// stood, the replica missed every entry written after the failover
    /// below that count (the shuffle, admissions), and the admitter's
    /// appends were refused as planned from a stale replica, for good.
    pub async fn sync(&self, room: &Room) -> Result<(), StoreError> {
        let at = crate::clock::now_ms();
        let base = room.base();
        let from = base.applied.saturating_sub(1);
        let (mut lines, mut events) = self.entries(&room.activity, from).await?;
        // The entry read again to check the log's continuity is not new.
        let mut new = &events[usize::from(base.applied > 0 && !events.is_empty())..];
        match room.follow_shared(&base, from, &lines, &events) {
            Followed::Applied => {}
            // Sent before a rebuild: the rebuild's read is newer.
            Followed::Dropped => return Ok(()),
            Followed::Diverged => {
                (lines, events) = self.entries(&room.activity, 0).await?;
                tracing::warn!(
                    activity = %room.activity,
                    applied = base.applied,
                    log = events.len(),
                    "The waiting room's log in Redis is not the one this node followed (a failover lost its last writes); \
                     rebuilt from it: fans whose joins it lost are no longer in the room, and may join again."
                );
                room.rebuild_shared(&lines, &events);
                new = &events;
            }
        }
        room.mark_read(at);
        if let Some(mode) = log::drawn_as(new) {
            // About once per node and room: its shuffle line has just been read.
            self.name_drawn(&room.activity, mode).await?;
        }
        Ok(())
    }

    /// One of the room's string keys (`name`), if set. Blocking.
    fn get(&self, activity: &str, name: &str) -> Result<Option<String>, StoreError> {
        let (shared, key) = (self.shared.clone(), key(activity, name));
        Ok(block_on(&self.handle, async move {
            let mut redis = shared.redis.clone();
            let value: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut redis).await?;
            Ok::<_, ClusterError>(value)
        })?)
    }

    /// Every event of the room's log, with its seed (tools: export, report).
    pub fn whole_log(&self, activity: &str) -> Result<Option<(String, Vec<Event>)>, StoreError> {
        let Some(seed) = self.get(activity, "seed")? else {
            return Ok(None);
        };
        let events = block_on(&self.handle, self.events(activity, 0))?;
        Ok(Some((seed, events)))
    }

    /// Takes or renews the admitter lease of the room for `ttl_ms`; whether this node holds it.
    pub async fn admitter_lease(&self, activity: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        let (shared, lease) = (self.shared.clone(), key(activity, "admitter"));
        Ok(on(&self.handle, async move {
            let mut redis = shared.redis.clone();
            let held: i64 = LEASE
                .key(&lease)
                .arg(&shared.instance)
                .arg(ttl_ms)
                .invoke_async(&mut redis)
                .await?;
            Ok(held == 1)
        })
        .await?)
    }

    /// Appends the admitter's `events`, planned from `cursor` places
    /// reached, if this node still holds the lease and the log still has
    /// that many (an admitter that planned from a stale replica — one that
    /// took the lease from a node killed mid-step — appends nothing, and
    /// plans again once caught up). The shuffle and the close are appended
    /// once however often they are sent.
    pub async fn append(
        &self,
        activity: &str,
        cursor: usize,
        base: &Base,
        events: &[Event],
    ) -> Result<Appended, StoreError> {
        let shared = self.shared.clone();
        let keys = [
            "admitter", "log", "places", "waiting", "shuffled", "closed", "cursor", "paused",
        ]
        .map(|k| key(activity, k));
        let mut args: Vec<String> = Vec::with_capacity(events.len() * 3);
        for e in events {
            let (kind, user) = match e {
                Event::Admit { u, .. } => ("admit", *u),
                Event::Skip { u, .. } => ("skip", *u),
                Event::Shuffle { .. } => ("shuffle", 0),
                Event::Close { .. } => ("close", 0),
                Event::Extend { u, .. } => ("extend", *u),
                Event::Pause { .. } => ("pause", 0),
                Event::Resume { .. } => ("resume", 0),
                Event::Join { .. } | Event::Seed { .. } | Event::Unknown => continue,
            };
            args.push(kind.into());
            args.push(user.to_string());
            args.push(serde_json::to_string(e).expect("events serialise"));
        }
        let (last_at, last) = match (base.applied.checked_sub(1), &base.last) {
            (Some(at), Some(line)) => (at.to_string(), line.clone()),
            _ => (String::new(), String::new()),
        };
        let fence = Keys::new(activity);
        Ok(on(&self.handle, async move {
            let mut redis = shared.rooms_redis.clone();
            let mut invocation = APPEND.prepare_invoke();
            for k in &keys {
                invocation.key(k);
            }
            invocation
                .arg(&shared.instance)
                .arg(cursor)
                .arg(last_at)
                .arg(last)
                .arg(args);
            let n: i64 = run_replicated(&mut redis, &invocation, &fence, shared.cfg.replica_acks).await?;
            Ok(match n {
                -1 => Appended::NotAdmitter,
                -3 => Appended::Diverged,
                -2 => Appended::StaleCursor {
                    log: redis::cmd("GET")
                        .arg(&keys[6])
                        .query_async::<Option<usize>>(&mut redis)
                        .await?
                        .unwrap_or(0),
                },
                _ => Appended::Yes,
            })
        })
        .await?)
    }

    /// Records this node's check-ins for the admitter on any node.
    pub async fn flush_seen(&self, activity: &str, seen: Vec<(u64, i64)>) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        let (shared, seen_key) = (self.shared.clone(), key(activity, "seen"));
        Ok(on(&self.handle, async move {
            let mut redis = shared.redis.clone();
            // Every flush carries check-ins of the last moments, so the
            // last write is recent enough whichever node made it.
            for chunk in seen.chunks(1000) {
                let mut set = redis::cmd("HSET");
                set.arg(&seen_key);
                for (user, at) in chunk {
                    set.arg(user).arg(at);
                }
                let _: i64 = set.query_async(&mut redis).await?;
            }
            Ok(())
        })
        .await?)
    }

    /// The last check-in of each of `users` (any node); how many codes
    /// each of `holders` holds cluster-wide; and Redis's time when it
    /// counted them (Unix ms), by the clock of the master that commits the
    /// activity's claims. A pass that expired by then has all the claims it
    /// will ever have: the commit script refuses one made with it from its
    /// expiry on (`LAPSED`), by that same clock.
    pub async fn seen_and_claimed(
        &self,
        activity: &str,
        users: Vec<u64>,
        holders: Vec<u64>,
    ) -> Result<(Vec<Option<i64>>, Vec<u32>, i64), StoreError> {
        let shared = self.shared.clone();
        let (seen_key, users_key) = (key(activity, "seen"), super::scripts::Keys::new(activity).users());
        Ok(on(&self.handle, async move {
            let mut redis = shared.redis.clone();
            let seen: Vec<Option<i64>> = if users.is_empty() {
                Vec::new()
            } else {
                redis::cmd("HMGET")
                    .arg(&seen_key)
                    .arg(&users)
                    .query_async(&mut redis)
                    .await?
            };
            let mut counted: Vec<i64> = COUNTED.key(&users_key).arg(&holders).invoke_async(&mut redis).await?;
            if counted.len() != holders.len() + 1 {
                return Err(ClusterError::Protocol(format!(
                    "{} counts for {} pass holders",
                    counted.len().saturating_sub(1),
                    holders.len()
                )));
            }
            let at_ms = counted.remove(0);
            let claimed = counted.into_iter().map(|n| u32::try_from(n).unwrap_or(0)).collect();
            Ok((seen, claimed, at_ms))
        })
        .await?)
    }
}
