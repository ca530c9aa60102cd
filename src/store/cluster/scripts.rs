//! The Redis side of cluster mode: key names and the Lua scripts that change
//! them. Each script is one atomic step; every key one script touches
//! belongs to one activity and carries its hash tag (`{actId}`), so every
//! script runs unchanged on Redis Cluster.
//!
//! ```text
//! tk:{A}:stock:T       list  unclaimed, unleased codes of ticket T (the master list)
//! tk:{A}:known:T       set   every code ever pushed for T (import adds each once)
//! tk:{A}:lease:T:N     set   codes of T leased to node N, not yet claimed
//! tk:{A}:leased:T:N    str   node N's last lease of T: its call id and answer, for a
//!                            minute (a call re-sent gets the same codes again)
//! tk:{A}:tickets       set   ticket ids pushed or leased: a reaper returns their
//!                            leases too, not only its own config's
//! tk:{A}:nodes         zset  node -> lease expiry (Unix ms by Redis's clock), renewed while it lives
//! tk:{A}:epochs        hash  node -> times its leases were taken from it (REAP) or
//!                            given up (RELEASE): a node that sees it change
//!                            knows the codes in its pools are not its own
//! tk:{A}:limits        hash  node -> per_user_limit of its config (the lowest live one holds)
//! tk:{A}:paused        hash  node -> 1 if its config pauses the activity, else 0 (said
//!                            when the live nodes differ)
//! tk:{A}:served        int   the highest limit a claim was committed under (`ticketd verify`'s)
//! tk:{A}:claimed       hash  code -> claim record (JSON)
//! tk:{A}:users         hash  user id -> claims held (the per-user limit)
//! tk:{A}:held          hash  user id -> JSON array of the user's codes
//! tk:{A}:idem          hash  "user:Idempotency-Key" -> claim record
//! tk:{A}:sold          hash  ticket id -> codes claimed (cluster-wide counts)
//! tk:{A}:outbox:N      list  claim records node N acknowledged, not yet in MongoDB
//! tk:{A}:fence         int   written before each `WAIT` (cluster.replica_acks): a
//!                            retried commit may write nothing itself
//! tk:ids               int   claim id blocks handed to nodes (not per activity)
//! tk:user_ids          int   the last user id handed out
//! tk:node:N            str   held by the running node called N
//! tk:import_lock       str   held by the one `ticketd import` running
//! ```
//!
//! The global keys are used only by single-key commands (`INCRBY`,
//! `SET NX`, the one-key [`RAISE`] and [`LOCK_KEEP_OR_RELEASE`]; [`CLOCK`]
//! names `tk:ids` only to be routed), never inside a script with other keys,
//! so on Redis Cluster they may hash to any master. A script that names
//! per-node keys from the prefix ([`REAP`], [`RELEASE`]) stays within the
//! activity's slot, since those keys carry its hash tag too.
//!
//! A code is in exactly one of: a master list, one lease set, the claimed
//! hash. Leasing moves it list -> lease set, committing lease set -> claimed,
//! reaping and releasing lease set -> list. Every move is inside one script,
//! so no crash between two commands can duplicate or lose a code; and
//! nothing moves a code out of `claimed`.

use std::sync::LazyLock;

use redis::Script;

/// The key prefix of one activity, with its hash tag: `tk:{A}:`.
pub fn prefix(activity: &str) -> String {
    format!("tk:{{{activity}}}:")
}

/// Key names of one activity.
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys of `activity`.
    pub fn new(activity: &str) -> Keys {
        Keys {
            prefix: prefix(activity),
        }
    }

    /// The prefix, for scripts that build per-node key names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// The master list of `ticket`.
    pub fn stock(&self, ticket: &str) -> String {
        self.key(&format!("stock:{ticket}"))
    }

    /// Codes of `ticket` ever pushed.
    pub fn known(&self, ticket: &str) -> String {
        self.key(&format!("known:{ticket}"))
    }

    /// Codes of `ticket` leased to `node`.
    pub fn lease(&self, ticket: &str, node: &str) -> String {
        self.key(&format!("lease:{ticket}:{node}"))
    }

    /// `node`'s last lease of `ticket` (see [`LEASE`]).
    pub fn leased(&self, ticket: &str, node: &str) -> String {
        self.key(&format!("leased:{ticket}:{node}"))
    }

    /// The activity's ticket ids ever pushed or leased.
    pub fn tickets(&self) -> String {
        self.key("tickets")
    }

    /// Live nodes and their lease expiry.
    pub fn nodes(&self) -> String {
        self.key("nodes")
    }

    /// Node -> the per-user limit its config sets.
    pub fn limits(&self) -> String {
        self.key("limits")
    }

    /// Node -> 1 if its config pauses the activity, else 0.
    pub fn paused(&self) -> String {
        self.key("paused")
    }

    /// The highest per-user limit a claim was committed under (see [`COMMIT`]).
    pub fn served(&self) -> String {
        self.key("served")
    }

    /// Lease epochs per node (see [`HEARTBEAT`]).
    pub fn epochs(&self) -> String {
        self.key("epochs")
    }

    /// Claimed codes.
    pub fn claimed(&self) -> String {
        self.key("claimed")
    }

    /// Claims per user.
    pub fn users(&self) -> String {
        self.key("users")
    }

    /// Codes per user.
    pub fn held(&self) -> String {
        self.key("held")
    }

    /// Codes claimed per ticket type.
    pub fn sold(&self) -> String {
        self.key("sold")
    }

    /// Idempotency keys.
    pub fn idem(&self) -> String {
        self.key("idem")
    }

    /// `node`'s backlog of claims for MongoDB.
    pub fn outbox(&self, node: &str) -> String {
        self.key(&format!("outbox:{node}"))
    }

    /// Written (INCR) just before a `WAIT` on this activity's master.
    pub fn fence(&self) -> String {
        self.key("fence")
    }

    /// The activity's waiting room's log (`q:{A}:log`, see `rooms`): it
    /// exists once anyone has joined (or the admitter drew an empty
    /// room). Under the same hash tag, so the
    /// commit script may read it.
    pub fn room_log(&self) -> String {
        format!("q:{}log", &self.prefix["tk:".len()..])
    }
}

/// Claim id blocks.
pub const IDS_KEY: &str = "tk:ids";

/// The last user id handed out.
pub const USER_IDS_KEY: &str = "tk:user_ids";

/// Held by the one `ticketd import` running (its token; see
/// `ClusterStore::import`).
pub const IMPORT_LOCK_KEY: &str = "tk:import_lock";

/// Keeps (`ARGV[2]` ms, when `ARGV[2]` is given) or lets go of a lock, if
/// it is still the caller's: `ARGV[1]` is the token it was taken with.
/// KEYS: the lock. Returns 1 when it was the caller's.
pub static LOCK_KEEP_OR_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) else redis.call('DEL', KEYS[1]) end
return 1
"#,
    )
});

/// Takes a lock that is free, or keeps one already the caller's, for
/// `ARGV[2]` ms: `ARGV[1]` is the caller's token. KEYS: the lock. Returns 1
/// when the caller holds it now, 0 when someone else does.
pub static LOCK_TAKE_OR_KEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"#,
    )
});

/// Takes or keeps the lock `key` for `token` ([`LOCK_TAKE_OR_KEEP`]);
/// whether the caller holds it now.
pub async fn hold<C: redis::aio::ConnectionLike>(
    redis: &mut C,
    key: &str,
    token: &str,
    ttl_ms: u64,
) -> redis::RedisResult<bool> {
    let held: i64 = LOCK_TAKE_OR_KEEP
        .key(key)
        .arg(token)
        .arg(ttl_ms)
        .invoke_async(redis)
        .await?;
    Ok(held == 1)
}

/// Raises a counter to at least `ARGV[1]` (after Redis lost it, say).
/// KEYS: the counter.
pub static RAISE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"#,
    )
});

/// Redis's clock: `TIME`, as `{seconds, microseconds}`. KEYS: any key,
/// for the route alone (nodes pass [`IDS_KEY`], so that in a Redis Cluster
/// every node reads the same master's clock). See `super::clock`.
pub static CLOCK: LazyLock<Script> = LazyLock::new(|| Script::new("return redis.call('TIME')"));

/// The key a running node holds.
pub fn node_key(node: &str) -> String {
    format!("tk:node:{node}")
}

/// Commits a batch of one activity's claims.
///
/// KEYS: claimed, users, held, idem, outbox, sold, limits, nodes, served,
/// the room's log ([`Keys::room_log`]), then one lease set per claim. ARGV: node, limit, max backlog, then per claim: nonce, ticket, code, user, idempotency key (or ""), the record's
/// JSON up to its `n` value ([`super::record::Record::head`]), the code
/// as a JSON string, and its pass's expiry (Unix ms, or 0).
///
/// The per-user limit is the lowest that this node's config and the live
/// nodes' (as [`NODE_SETTING`] recorded them at start, on reload and with each
/// heartbeat) set: nodes that disagree — a rolling reload, a node forgotten
/// — never let a user hold more than any of them allows. (The batch's own
/// limit is not recorded here: claims decided before a reload and committed
/// after it would put an old limit back.)
///
/// Per claim, in order: a code already claimed with the same nonce is this
/// claim retried after an unknown outcome (answer the record again); an
/// idempotency key already used answers `REPLAY` + that record; a claim
/// without a pass in an activity whose waiting room anyone has joined
/// answers `NOPASS` (a node whose config makes the activity a race must not
/// sell the room's codes to the fastest: not after the draw, nor between
/// the start and the admitter's shuffle); a
/// claim made with a waiting-room pass that has expired by Redis's clock
/// (its expiry in Unix ms; 0 for none) answers `LAPSED`; a full backlog
/// answers `FULL`; a user at the limit `LIMIT` + their codes; a code no
/// longer leased to this node `LOST`. Otherwise the claim is recorded and
/// answered `OK`. (`LAPSED` comes after the retry and replay checks: a
/// claim recorded in time is answered as recorded, however late the retry.)
///
/// Redis runs every script of every node one at a time, so this script's
/// cost per claim bounds the whole cluster. The node therefore writes the
/// record's JSON and the code's, and the script only joins strings: no
/// `cjson` on the way of a claim that succeeds (encoding the record and
/// decoding and re-encoding the user's codes was most of the script's time),
/// and the backlog and the sold counts are written once per batch (also
/// when the script fails halfway: see the `pcall`).
///
/// A batch that recorded claims raises `served` to the limit it held them
/// to, so `ticketd verify` knows the highest limit users were ever held to:
/// a reload raises a limit without a new import, and a later import may
/// lower the one MongoDB keeps.
pub static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{}",
        r#"
local claimed, users, held, idem, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local node, limit, max_backlog = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[8], now, '+inf')) do
  local theirs = tonumber(redis.call('HGET', KEYS[7], other) or '')
  if theirs and theirs < limit then limit = theirs end
end
local backlog = redis.call('LLEN', outbox)
local roomed = redis.call('EXISTS', KEYS[10]) == 1
local out, recs, sold = {}, {}, {}
local n = (#ARGV - 3) / 8
-- Each claim's backlog record and sold count are written after the loop,
-- once per batch; `pcall` makes sure they are written even when a command
-- fails halfway (Redis keeps a failed script's earlier writes), so no
-- recorded claim ever misses its backlog record or its count.
local ok, err = pcall(function()
  for i = 0, n - 1 do
    local a = 4 + i * 8
    local nonce, ticket, code, user, key, head, quoted = ARGV[a], ARGV[a+1], ARGV[a+2], ARGV[a+3], ARGV[a+4], ARGV[a+5], ARGV[a+6]
    local lapses = tonumber(ARGV[a+7])
    local existing = redis.call('HGET', claimed, code)
    local replay = false
    if key ~= '' then replay = redis.call('HGET', idem, user .. ':' .. key) end
    if existing then
      if cjson.decode(existing).nonce == nonce then out[i + 1] = existing else out[i + 1] = 'LOST' end
    elseif replay then
      out[i + 1] = 'REPLAY' .. replay
    elseif roomed and lapses == 0 then
      if redis.call('SISMEMBER', KEYS[11 + i], code) == 1 then out[i + 1] = 'NOPASS' else out[i + 1] = 'LOST' end
    elseif lapses > 0 and now >= lapses then
      -- A code no longer this node's is said so: the node must not put it back.
      if redis.call('SISMEMBER', KEYS[11 + i], code) == 1 then out[i + 1] = 'LAPSED' else out[i + 1] = 'LOST' end
    elseif backlog >= max_backlog then
      out[i + 1] = 'FULL'
    elseif tonumber(redis.call('HGET', users, user) or '0') >= limit then
      out[i + 1] = 'LIMIT' .. (redis.call('HGET', held, user) or '[]')
    elseif redis.call('SREM', KEYS[11 + i], code) == 0 then
      out[i + 1] = 'LOST'
    else
      local nth = redis.call('HINCRBY', users, user, 1)
      local rec = head .. nth .. '"}'
      redis.call('HSET', claimed, code, rec)
      recs[#recs + 1] = rec
      sold[ticket] = (sold[ticket] or 0) + 1
      -- The user's codes, a JSON array: this code appended as text.
      local codes = redis.call('HGET', held, user)
      if codes and codes ~= '[]' and codes ~= '{}' then
        codes = string.sub(codes, 1, -2) .. ',' .. quoted .. ']'
      else
        codes = '[' .. quoted .. ']'
      end
      redis.call('HSET', held, user, codes)
      if key ~= '' then redis.call('HSET', idem, user .. ':' .. key, rec) end
      backlog = backlog + 1
      out[i + 1] = 'OK'
    end
  end
end)
for i = 1, #recs, 1000 do
  redis.call('RPUSH', outbox, unpack(recs, i, math.min(i + 999, #recs)))
end
for ticket, k in pairs(sold) do redis.call('HINCRBY', KEYS[6], ticket, k) end
if #recs > 0 and limit > tonumber(redis.call('GET', KEYS[9]) or '0') then
  redis.call('SET', KEYS[9], limit)
end
if not ok then error(err) end
return out
"#
    ))
});

/// Records a number a node's config sets for one activity — its per-user
/// limit (see [`COMMIT`]), or its pause (0 or 1) — and reads the live
/// nodes'.
///
/// KEYS: the hash of them (limits, paused), nodes. ARGV: node, its number.
/// Returns `{lowest, highest}` of this node's and the live nodes'.
pub static NODE_SETTING: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{}",
        r#"
-- Written only when it changed: every write is an fsync of Redis's AOF.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local lowest, highest = tonumber(ARGV[2]), tonumber(ARGV[2])
for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')) do
  local theirs = tonumber(redis.call('HGET', KEYS[1], other) or '')
  if theirs then
    lowest, highest = math.min(lowest, theirs), math.max(highest, theirs)
  end
end
return {lowest, highest}
"#
    ))
});

/// Leases up to `want` codes of one ticket type to a node and renews its lease.
///
/// KEYS: stock, lease set, nodes, tickets, epochs, the node's last lease.
/// ARGV: node, want, the lease's time to live (ms, added to Redis's clock),
/// the ticket id (named among the activity's ticket types, for codes pushed
/// before that set existed), the call's id. Near the end of the
/// stock a node takes at most half of its share of what is left
/// (`len / (2 * live nodes)`, at least one), so no node sits on the last
/// codes while the others run dry. Returns `{left on the list, codes, the node's lease
/// epoch}` (see [`HEARTBEAT`]).
///
/// The Redis Cluster client re-sends a call whose connection dropped
/// before its answer came, and the script may have run: a second run
/// would lease a second batch, and the first, in the node's lease set but
/// in no pool, would be renewed and never sold (claims hearing
/// `STOCK_IN_FLIGHT` to the end). So a call whose id is the last one's
/// answers what that one did (renewing the lease), and pops nothing; or,
/// if the node's lease was taken since, no codes and the new epoch.
pub static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{}",
        r#"
local last = redis.call('GET', KEYS[6])
if last then
  local at = string.find(last, ' ', 1, true)
  if at and string.sub(last, 1, at - 1) == ARGV[5] then
    local was = cjson.decode(string.sub(last, at + 1))
    -- Reaped or released since (a failover outlasting the lease): those
    -- codes are not the node's any more, and the new epoch tells it so.
    local epoch = tonumber(redis.call('HGET', KEYS[5], ARGV[1]) or '0')
    if epoch ~= was[3] then return {redis.call('LLEN', KEYS[1]), {}, epoch} end
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
    return {was[1], was[2], was[3]}
  end
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
redis.call('SADD', KEYS[4], ARGV[4])
local epoch = tonumber(redis.call('HGET', KEYS[5], ARGV[1]) or '0')
local len = redis.call('LLEN', KEYS[1])
local want = tonumber(ARGV[2])
if len == 0 or want <= 0 then return {len, {}, epoch} end
local live = redis.call('ZCOUNT', KEYS[3], now, '+inf')
if live < 1 then live = 1 end
local n = math.min(want, math.max(1, math.floor(len / (2 * live))), len)
local codes = redis.call('LPOP', KEYS[1], n)
for i = 1, #codes, 1000 do
  redis.call('SADD', KEYS[2], unpack(codes, i, math.min(i + 999, #codes)))
end
redis.call('SET', KEYS[6], ARGV[5] .. ' ' .. cjson.encode({len - #codes, codes, epoch}), 'PX', 60000)
return {len - #codes, codes, epoch}
"#
    ))
});

/// Renews a node's lease on one activity and reads its stock.
///
/// KEYS: nodes, sold, epochs, then per ticket type its stock list and known
/// set. ARGV: node, the lease's time to live (ms, added to Redis's clock), then
/// the ticket ids. Returns `{the node's lease
/// epoch, then per ticket: list length, codes known, codes sold}`.
///
/// The epoch counts the times the node's leases were taken from it ([`REAP`])
/// or given up ([`RELEASE`]). A node compares it with the one it saw last:
/// unlike a "was I still registered?" flag, a change cannot be hidden by an
/// answer lost on the way, by another script re-registering the node first
/// ([`LEASE`] does), or by a later activity's failure.
pub static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{}",
        r#"
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local out = {tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')}
for i = 3, #ARGV do
  local k = 4 + (i - 3) * 2
  out[#out + 1] = redis.call('LLEN', KEYS[k])
  out[#out + 1] = redis.call('SCARD', KEYS[k + 1])
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
end
return out
"#
    ))
});

/// Cluster-wide stock of one activity. KEYS: sold, then each ticket's known
/// set. ARGV: the ticket ids. Returns per ticket: codes known, codes sold.
pub static COUNTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
for i = 1, #ARGV do
  out[#out + 1] = redis.call('SCARD', KEYS[i + 1])
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
end
return out
"#,
    )
});

/// Moves the leases of the nodes that stopped renewing them back to the
/// master lists, and their MongoDB backlog onto the reaping node's.
///
/// A backlog can hold up to `cluster.max_backlog` (a million) records after
/// a long MongoDB outage, and Redis runs nothing else while a script runs:
/// it moves whole, by `RENAME` when the reaper's own backlog is empty, else
/// a thousand records per command, never one command per record.
///
/// A reaper that took a backlog is registered as live in the same step
/// (for the lease TTL, as a heartbeat would), so that if it dies before its
/// writer drains it, another node finds the backlog through it. (A node
/// sweeping an activity it does not sell has no registration there of its
/// own; it used to make one by a later call, and a `kill -9` between the
/// two left the claims in an outbox no registration named, never to reach
/// MongoDB.)
///
/// KEYS: nodes, the reaper's outbox. ARGV: the reaper, the activity's key
/// prefix, the lease's time to live (ms, added to Redis's clock), then its
/// ticket ids. Per-node keys are named from
/// the prefix (they share the hash tag, so this is safe on Redis Cluster).
/// Returns `{nodes reaped, codes returned, backlog records moved}`.
pub static REAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{RETURN_LEASES}{}",
        r#"
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
local reaped, returned, moved = 0, 0, 0
for _, d in ipairs(dead) do
  if d ~= ARGV[1] then
    returned = returned + return_leases(ARGV[2], d, 4)
    redis.call('HINCRBY', ARGV[2] .. 'epochs', d, 1)
    local ob = ARGV[2] .. 'outbox:' .. d
    local n = redis.call('LLEN', ob)
    if n > 0 and redis.call('EXISTS', KEYS[2]) == 0 then
      redis.call('RENAME', ob, KEYS[2])
    elseif n > 0 then
      local recs = redis.call('LPOP', ob, 1000)
      while recs do
        redis.call('RPUSH', KEYS[2], unpack(recs))
        recs = redis.call('LPOP', ob, 1000)
      end
    end
    moved = moved + n
    redis.call('ZREM', KEYS[1], d)
    reaped = reaped + 1
  end
end
if moved > 0 then
  redis.call('ZADD', KEYS[1], 'GT', now + tonumber(ARGV[3]), ARGV[1])
end
return {reaped, returned, moved}
"#
    ))
});

/// Lua that sets `now` to Redis's own clock, in Unix milliseconds. Lease
/// expiries and the live set compare times the nodes wrote with times the
/// nodes read, so all of them come from one clock: with each node's own, a
/// node whose clock ran seconds ahead reaped live nodes, and a peer whose
/// clock ran behind looked dead to the commit script, which then ignored
/// its lower per-user limit. (Scripts replicate their effects, so reading
/// `TIME` before writing is allowed: the default since Redis 5 and the only
/// mode in 7; `redis.replicate_commands()` asks for it where a 6.2 was set
/// otherwise.)
const NOW: &str = r#"
redis.replicate_commands()
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"#;

/// Lua shared by [`REAP`] and [`RELEASE`]: moves every code leased to `node`
/// back onto the master lists and deletes the sets; returns how many codes
/// moved. The ticket ids are those in `ARGV[first..]` (the caller's config)
/// and those the activity's `tickets` set names: a reaper, or a node
/// restarted with a smaller config, that returned only its own ticket types
/// left the others' codes in a dead node's lease for good.
const RETURN_LEASES: &str = r#"
local function return_leases(prefix, node, first)
  local returned, seen = 0, {}
  local tickets = redis.call('SMEMBERS', prefix .. 'tickets')
  for t = first, #ARGV do tickets[#tickets + 1] = ARGV[t] end
  for _, ticket in ipairs(tickets) do
    if not seen[ticket] then
      seen[ticket] = true
      local lease = prefix .. 'lease:' .. ticket .. ':' .. node
      local codes = redis.call('SMEMBERS', lease)
      for i = 1, #codes, 1000 do
        redis.call('LPUSH', prefix .. 'stock:' .. ticket, unpack(codes, i, math.min(i + 999, #codes)))
      end
      returned = returned + #codes
      redis.call('DEL', lease)
    end
  end
  return returned
end
"#;

/// A node gives back every code it leased in one activity (start-up and
/// shutdown). If its backlog is not empty it stays registered, expired, so
/// a live node reaps (and drains) the backlog if this one does not.
///
/// KEYS: nodes, the node's outbox. ARGV: node, prefix, the lease's time to
/// live ([`REAP`]'s layout; not used here), ticket ids.
/// Returns `{codes returned, records in the node's backlog}`.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{RETURN_LEASES}{}",
        r#"
local returned = return_leases(ARGV[2], ARGV[1], 4)
redis.call('HINCRBY', ARGV[2] .. 'epochs', ARGV[1], 1)
local backlog = redis.call('LLEN', KEYS[2])
if backlog > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return {returned, backlog}
"#
    ))
});

/// Puts specific leased codes back on the master list (a node that stopped
/// selling gives back what it holds). KEYS: stock, lease set. ARGV: codes.
pub static GIVE_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = 0
for i = 1, #ARGV do
  if redis.call('SREM', KEYS[2], ARGV[i]) == 1 then
    redis.call('LPUSH', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"#,
    )
});

/// Removes the records a node has written to MongoDB from the head of its
/// backlog — only while the head is exactly what it read, so records moved
/// or added meanwhile are never dropped. KEYS: outbox. ARGV: the records.
pub static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = 0
for i = 1, #ARGV do
  if redis.call('LINDEX', KEYS[1], 0) == ARGV[i] then
    redis.call('LPOP', KEYS[1])
    n = n + 1
  else
    break
  end
end
return n
"#,
    )
});

/// What became of a code whose commit outcome is unknown. KEYS: claimed,
/// lease set. ARGV: code, nonce. `MINE` (committed by that claim), `LEASED`
/// (still ours, unclaimed) or `GONE`.
pub static RESOLVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if rec then
  if cjson.decode(rec).nonce == ARGV[2] then return 'MINE' end
  return 'GONE'
end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 'LEASED' end
return 'GONE'
"#,
    )
});

/// Pushes codes onto a master list, each at most once ever, and names the
/// ticket type among the activity's. KEYS: stock, known, tickets. ARGV: the
/// ticket id, then the codes. Returns how many were pushed.
pub static PUSH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('SADD', KEYS[3], ARGV[1])
local n = 0
for i = 2, #ARGV do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"#,
    )
});

/// The claim records of one user in one activity. KEYS: held, claimed. ARGV: user.
pub static HELD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local codes = cjson.decode(redis.call('HGET', KEYS[1], ARGV[1]) or '[]')
local out = {}
for _, c in ipairs(codes) do
  local rec = redis.call('HGET', KEYS[2], c)
  if rec then out[#out + 1] = rec end
end
return out
"#,
    )
});

/// Everything `ticketd verify` checks about one activity, read in one
/// atomic step so that claims committed meanwhile cannot make it see a
/// code in two places or in none. Read-only.
///
/// KEYS: nodes (for routing: the activity's slot). ARGV: the prefix, then
/// the ticket ids. Returns `{nodes, claimed (HGETALL), users (HGETALL),
/// held (HGETALL), sold (HGETALL), backlog codes per node (one array per
/// node), per ticket {known, master list, one lease set per node}, then
/// served (nil before any claim)}`.
pub static SNAPSHOT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local p = ARGV[1]
local nodes = redis.call('ZRANGE', KEYS[1], 0, -1)
local backlogs = {}
for i, n in ipairs(nodes) do
  local codes = {}
  for j, rec in ipairs(redis.call('LRANGE', p .. 'outbox:' .. n, 0, -1)) do
    codes[j] = cjson.decode(rec).code
  end
  backlogs[i] = codes
end
local tickets = {}
for t = 2, #ARGV do
  local leases = {}
  for i, n in ipairs(nodes) do
    leases[i] = redis.call('SMEMBERS', p .. 'lease:' .. ARGV[t] .. ':' .. n)
  end
  tickets[t - 1] = {redis.call('SMEMBERS', p .. 'known:' .. ARGV[t]),
    redis.call('LRANGE', p .. 'stock:' .. ARGV[t], 0, -1), leases}
end
return {nodes, redis.call('HGETALL', p .. 'claimed'), redis.call('HGETALL', p .. 'users'),
  redis.call('HGETALL', p .. 'held'), redis.call('HGETALL', p .. 'sold'), backlogs, tickets,
  redis.call('GET', p .. 'served')}
"#,
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_activity_share_its_hash_tag() {
        let k = Keys::new("1001");
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
        // The room's log, which the commit script reads, is the room's
        // key (`rooms`) under the same tag.
        assert_eq!(k.room_log(), "q:{1001}:log");
    }
}
