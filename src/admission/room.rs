//! One activity's waiting room: places, the shuffle, admission, passes.
//!
//! All of a room's state ([`state`](super::state)) sits behind one short
//! mutex; every change is appended to the room's [`log`] under
//! it, so the log's order is the room's, and nobody is told of a change
//! before the log holds it. A cluster's node holds a replica instead, fed
//! from the room's shared log in Redis, and checks that the log it reads
//! goes on from where it stood.

use std::{
    io,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use parking_lot::Mutex;

use super::{
    alive::Alive,
    draw::{DrawRecord, Seed},
    log::{self, Event, RoomLog},
    state::{Base, Entry, JoinError, QueueStatus, RoomSettings, RoomState, RoomSummary, StockView},
};

/// Work one tick may do at most (places admitted or skipped), so that a
/// room of a million abandoned places cannot stall the admitter.
const MAX_STEPS_PER_TICK: usize = 100_000;
/// How long past its expiry a pass still counts as holding its codes, on
/// one node: a claim checks the pass and then takes its code from the
/// stock, and one checked just before the expiry must have taken it before
/// the admitter counts the pass's codes as free for the next in line. (A
/// shared room needs no margin: see [`Room::plan_shared`].)
const PASS_SETTLE_MS: i64 = 1_000;

/// An admission step's plan ([`Room::plan_shared`]): its events, and the
/// replica it was made from, read under the same lock (a sync between
/// them could apply entries the plan then counted on, unchecked).
pub struct Plan {
    /// Places reached when planned.
    pub cursor: usize,
    /// Where the replica stood in its log.
    pub base: Base,
    /// What to append.
    pub events: Vec<Event>,
}

/// What [`Room::follow_shared`] made of a read of the shared log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Followed {
    /// The log went on from where this replica stood; what was new is applied.
    Applied,
    /// The log is not the one this replica followed: nothing applied.
    Diverged,
    /// The read was sent before the replica was rebuilt: nothing applied.
    Dropped,
}

/// One activity's waiting room.
pub struct Room {
    /// The activity.
    pub activity: Arc<str>,
    seed: Seed,
    commitment: String,
    state: Mutex<RoomState>,
    /// Whether the room's log says the sale is paused: a `Pause` not yet
    /// resumed ([`Room::log_paused`]). Kept beside the state, under its lock, for
    /// the claim path to read without taking the lock.
    log_paused: AtomicBool,
    /// The room's own log file; `None` for a replica of a shared log.
    log: Option<RoomLog>,
    /// The room's own sign of life; `None` for a replica of a shared log.
    alive: Option<Alive>,
}

impl Room {
    /// Opens the room whose log is `dir/<activity>.log`, replaying it, or
    /// creates it with a fresh seed (written and fsynced before it returns).
    pub fn open(dir: &Path, activity: Arc<str>, settings: RoomSettings) -> io::Result<Room> {
        let path = dir.join(format!("{activity}.log"));
        let (events, len) = log::read(&path)?.unwrap_or_default();
        // Refused before the replay, which would follow the drawn mode.
        if let Some(drawn) = log::drawn_as(&events).filter(|m| *m != settings.mode) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the waiting room of `{activity}` drew its order as a {drawn}, and the config now says admission = \
                     \"{}\": a drawn room's admission cannot change (set it back to \"{drawn}\")",
                    settings.mode
                ),
            ));
        }
        let (seed, mut state) = match replay(&path, &events, settings.clone())? {
            Some((seed, mut state)) => {
                // Nobody could check in while the node was down: every
                // place gets its grace again from now.
                let now = crate::clock::now_ms();
                state.places.values_mut().for_each(|p| p.seen_ms = p.seen_ms.max(now));
                (seed, state)
            }
            None => (Seed::generate(), RoomState::new(settings.clone())),
        };
        let log = RoomLog::open(&path, len)?;
        if events.is_empty() {
            log.append(&Event::Seed { seed: seed.to_hex() });
            log.sync_now()?;
            // The file's name too: a power cut could otherwise take the
            // whole log (its seed and every answered join) with it.
            std::fs::File::open(dir)?.sync_all()?;
        }
        let alive_path = Alive::path(dir, &activity);
        let now = crate::clock::now_ms();
        // No mark (a room from before marks): nothing is known of the
        // downtime, and nothing is given back.
        let last_event = events.iter().filter_map(Event::at).max();
        let alive = Alive::read(&alive_path).map(|mark| last_event.map_or(mark, |t| mark.max(t)));
        if let Some(since) = alive.and_then(|alive| state.downtime_since(alive, now)) {
            // Nobody could claim while the node was down: logged as a pause
            // from its last sign of life, which the first step resumes,
            // giving every pass running then the time back.
            let pause = Event::Pause { t: since };
            state.replay(&seed, &pause);
            log.append(&pause);
            log.sync_now()?;
            tracing::info!(
                activity = %activity,
                down_ms = now - since,
                "The node was down while passes ran; they get that time back, as after a pause."
            );
        }
        Ok(Room {
            activity,
            commitment: seed.commitment(),
            seed,
            log_paused: AtomicBool::new(state.paused_ms.is_some()),
            state: Mutex::new(state),
            log: Some(log),
            alive: Some(Alive::open(&alive_path)?),
        })
    }

    /// A replica of a room whose log is kept elsewhere (a cluster's Redis),
    /// with the seed every node shares; [`Room::apply_shared`] fills it.
    pub fn shared(activity: Arc<str>, settings: RoomSettings, seed: Seed) -> Room {
        Room {
            activity,
            commitment: seed.commitment(),
            seed,
            state: Mutex::new(RoomState::new(settings)),
            log_paused: AtomicBool::new(false),
            log: None,
            alive: None,
        }
    }

    /// A room rebuilt from a shared log's `events` (a tool reading a cluster's room).
    pub fn from_shared_log(activity: Arc<str>, seed: Seed, events: &[Event]) -> Room {
        let room = Room::shared(activity, RoomSettings::placeholder(), seed);
        room.apply_shared(0, events);
        room
    }

    /// The draw recorded in the room log `dir/<activity>.log`, read without
    /// opening the room (a tool beside a serving node). `Ok(None)` when the
    /// room has no log or has not drawn yet.
    pub fn recorded_draw(dir: &Path, activity: &str) -> io::Result<Option<DrawRecord>> {
        let path = dir.join(format!("{activity}.log"));
        let Some((events, _)) = log::read(&path)? else {
            return Ok(None);
        };
        let Some((seed, state)) = replay(&path, &events, RoomSettings::placeholder())? else {
            return Ok(None);
        };
        Ok(state.draw_record(activity, &seed))
    }

    /// The room's settings.
    pub fn settings(&self) -> RoomSettings {
        self.state.lock().settings.clone()
    }

    /// Applies reloaded settings (the caller refused frozen changes).
    pub fn apply(&self, mut settings: RoomSettings) {
        let mut st = self.state.lock();
        // A drawn room admits as it drew.
        settings.mode = st.drawn_as.unwrap_or(settings.mode);
        st.settings = settings;
    }

    /// Whether the room's log says the sale is paused, whatever the config
    /// says now. An organiser's `paused = false` reaches the claims with the
    /// reload, but the room only at the admitter's next step, which logs the
    /// resume and gives every pass running at the pause its paused time
    /// back; until then a claim whose pass lapsed is answered PAUSED, not
    /// QUEUE_PASS_EXPIRED as if the fan had let it run out. (In a cluster
    /// the step may be a while: the admitter's lease can be with a node
    /// that died.) A node that was down holds its room the same way until
    /// its first step ([`Room::open`]). A valid pass buys meanwhile, as it
    /// would after the resume: nobody else is admitted while the log is
    /// paused, and a lagging replica must not refuse a pass the resume
    /// already extended.
    pub fn log_paused(&self) -> bool {
        self.log_paused.load(Ordering::Acquire)
    }

    /// Publishes the state's pause for [`Room::log_paused`]; called under the
    /// room's lock after every change of the state from the log.
    fn publish_pause(&self, st: &RoomState) {
        self.log_paused.store(st.paused_ms.is_some(), Ordering::Release);
    }

    /// `SHA-256(seed)`, published before the room opens.
    pub fn commitment(&self) -> &str {
        &self.commitment
    }

    /// The seed, once the order is drawn (before, only its commitment is public).
    pub fn revealed_seed(&self) -> Option<String> {
        self.state.lock().shuffled_ms.map(|_| self.seed.to_hex())
    }

    /// Takes a place for `user` at `now`; joining again returns the same
    /// place. Returns the log sequence to [`Room::persist`] before answering.
    pub fn join(&self, user: u64, now: i64) -> Result<u64, JoinError> {
        let mut st = self.state.lock();
        let entry = st.entry(user, now)?;
        if let Some(place) = st.places.get_mut(&user) {
            place.seen_ms = place.seen_ms.max(now);
        }
        if entry == Entry::Held {
            // The same place; answered once its join is on disk (it may
            // still be in the batch being written).
            return Ok(self.log.as_ref().map_or(0, RoomLog::last_appended));
        }
        if st.order.len().saturating_sub(st.cursor) >= st.settings.capacity || st.order.len() >= u32::MAX as usize {
            return Err(JoinError::Full);
        }
        let Some(log) = &self.log else {
            return Err(JoinError::Unavailable);
        };
        let event = Event::Join { u: user, t: now };
        st.apply_join(user, now);
        let seq = log.append(&event);
        if let Some(place) = st.places.get_mut(&user) {
            place.join_seq = seq;
        }
        Ok(seq)
    }

    /// What the room's entry rules say of `user` joining at `now`, as this
    /// replica knows the room (capacity aside). A shared room checks them
    /// before its log's join script, which checks capacity and closing.
    pub fn entry(&self, user: u64, now: i64) -> Result<Entry, JoinError> {
        self.state.lock().entry(user, now)
    }

    /// Returns once the log holds every change up to `seq`.
    pub async fn persist(&self, seq: u64) -> Result<(), JoinError> {
        match &self.log {
            Some(log) => log.sync(seq).await.map_err(|_| JoinError::Unavailable),
            None => Ok(()),
        }
    }

    /// `user`'s view at `now`; `touch` counts it as the fan being there.
    pub fn status(&self, user: u64, now: i64, touch: bool) -> QueueStatus {
        let mut st = self.state.lock();
        if touch {
            if let Some(p) = st.places.get_mut(&user) {
                p.seen_ms = p.seen_ms.max(now);
                if self.log.is_none() {
                    st.note_seen(user, now);
                }
            }
        }
        st.status_of(&self.activity, user, now, &self.seed, &self.commitment, self.durable())
    }

    /// The last room-log line on disk (every line, for a shared room).
    fn durable(&self) -> u64 {
        self.log.as_ref().map_or(u64::MAX, RoomLog::durable)
    }

    /// The pass `user` holds at `now`: its expiry, Unix ms.
    pub fn pass_of(&self, user: u64, now: i64) -> Option<i64> {
        let st = self.state.lock();
        let p = st.places.get(&user)?;
        (p.admission_durable(self.durable()) && now < p.pass_expires_ms).then_some(p.pass_expires_ms)
    }

    /// Nobody can claim through this room any more (see
    /// [`RoomSummary::admits_no_more`]).
    pub fn admits_no_more(&self) -> bool {
        self.state.lock().admits_no_more()
    }

    /// Room-wide figures.
    pub fn summary(&self) -> RoomSummary {
        let st = self.state.lock();
        let mut s = st.summary.clone();
        s.waiting = st.waiting();
        s.shuffled = st.shuffled_ms.is_some();
        s.closed = st.closed_ms.is_some();
        s.admits_no_more = st.admits_no_more();
        s.admit_rate = st.measured_rate(st.last_tick_ms).unwrap_or(0.0);
        s
    }

    /// One step of the admitter at the time `clock` tells: the shuffle when
    /// due, passes retired, the next places admitted as the rate and the
    /// stock allow (`claimed(user)` is how many codes a pass holder has
    /// claimed), the room closed when nothing is left. Returns the log
    /// sequence to [`Room::persist`], or 0 when nothing changed.
    ///
    /// The clock is read under the room's lock: a status answered before
    /// the step then always carries an earlier `serverTime` than the step's
    /// events (read before, and the admitter preempted before locking, a
    /// fan could be told "waiting" at a time after the room's close). The
    /// stock is read after the pass holders' claims (see [`RoomState::plan`]).
    pub fn tick(
        &self,
        clock: impl FnOnce() -> i64,
        stock: &dyn Fn() -> StockView,
        claimed: &dyn Fn(u64) -> u32,
    ) -> u64 {
        let Some(log) = &self.log else { return 0 };
        if log.failed() {
            // Nothing more is admitted that the log could not keep.
            return 0;
        }
        let mut st = self.state.lock();
        let now = clock();
        if let Some(alive) = &self.alive {
            alive.mark(now);
        }
        let mut last = 0;
        let settled = now.saturating_sub(PASS_SETTLE_MS);
        for event in st.plan(now, settled, stock, claimed, &|_| None, MAX_STEPS_PER_TICK) {
            st.replay(&self.seed, &event);
            last = log.append(&event);
            // A pass (or its extension) is shown once it is on disk.
            if let Event::Admit { u, .. } | Event::Extend { u, .. } = event {
                if let Some(p) = st.places.get_mut(&u) {
                    p.admit_seq = last;
                }
            }
        }
        self.publish_pause(&st);
        last
    }

    /// Whether the room's own log failed a write: the room then changes
    /// nothing (admits, skips, closes) until the node restarts and replays
    /// the log.
    pub fn log_failed(&self) -> bool {
        self.log.as_ref().is_some_and(RoomLog::failed)
    }

    /// Whether the room is a replica of a log kept elsewhere (a cluster's
    /// Redis): joins and admissions then go through the store, and the
    /// replica follows the shared log.
    pub fn is_shared(&self) -> bool {
        self.log.is_none()
    }

    /// Places reached so far (admitted or skipped): where the next
    /// admission step starts.
    pub fn cursor(&self) -> usize {
        self.state.lock().cursor
    }

    /// Shared rooms: where this replica stands in the shared log, for a
    /// read ([`Room::follow_shared`]) or an append planned from it.
    pub fn base(&self) -> Base {
        self.state.lock().base()
    }

    /// Shared rooms: applies `events`, the shared log's entries from
    /// `from` on — those past where the replica stands, so a late answer
    /// never applies anything twice.
    pub fn apply_shared(&self, from: u64, events: &[Event]) {
        self.apply_locked(&mut self.state.lock(), from, events);
    }

    /// Shared rooms: applies `events`, the shared log's entries from
    /// `from` on, read from one entry before where this replica stood
    /// ([`Base::applied`] less one, or 0): that entry must be the one it
    /// applied last. If it is not, or the log no longer reaches it, the log
    /// is not the one this replica followed — a Redis failover promoted a
    /// replica without the master's last writes — and nothing is applied:
    /// the caller rebuilds the room from the whole log
    /// ([`Room::rebuild_shared`]).
    ///
    /// `lines` are the entries as read (their text), `events` the same
    /// parsed. `base` is where the replica stood when the read was sent: a
    /// read sent before a rebuild is dropped (it may be of the log the
    /// rebuild left). Another reader may have applied more meanwhile:
    /// wherever the read covers the replica's last applied entry, that
    /// entry is checked.
    pub fn follow_shared(&self, base: &Base, from: u64, lines: &[String], events: &[Event]) -> Followed {
        debug_assert_eq!(lines.len(), events.len());
        let mut st = self.state.lock();
        if st.generation != base.generation {
            return Followed::Dropped;
        }
        if let Some(last) = st.applied.checked_sub(1) {
            let at = last.checked_sub(from).and_then(|i| lines.get(i as usize));
            let short = last == from && lines.is_empty();
            if short || at.is_some_and(|l| Some(l) != st.last_line.as_ref()) {
                return Followed::Diverged;
            }
        }
        self.apply_locked(&mut st, from, events);
        let skip = st.applied.saturating_sub(from) as usize;
        if skip > 0 && skip <= lines.len() {
            st.last_line = Some(lines[skip - 1].clone());
        }
        Followed::Applied
    }

    /// Shared rooms: forgets what this replica applied and applies the
    /// shared log's `events` (the whole log) instead; see
    /// [`Room::follow_shared`]. The room's settings and the check-ins made
    /// here and not yet flushed are kept; every place gets its grace again
    /// from now, as at a node's first catch-up.
    pub fn rebuild_shared(&self, lines: &[String], events: &[Event]) {
        let mut st = self.state.lock();
        let mut fresh = RoomState::new(st.settings.clone());
        fresh.seen_here = std::mem::take(&mut st.seen_here);
        fresh.read_ms = st.read_ms;
        fresh.generation = st.generation + 1;
        fresh.last_line = lines.last().cloned();
        *st = fresh;
        self.apply_locked(&mut st, 0, events);
    }

    fn apply_locked(&self, st: &mut RoomState, from: u64, events: &[Event]) {
        // Two readers may race (the admitter and a join): apply only what
        // this replica has not, and nothing past a gap.
        let Some(skip) = st.applied.checked_sub(from) else {
            return;
        };
        let new = events.get(skip as usize..).unwrap_or_default();
        for event in new {
            st.replay(&self.seed, event);
        }
        if st.applied == 0 && !new.is_empty() {
            // This replica's first catch-up since the node started: as for
            // a room of its own replayed at start, every place gets its
            // grace again from now. The check-ins other nodes flushed may
            // be from before an outage of the whole cluster, when nobody
            // could check in; an admitter planning from them would skip
            // every fan the moment it came back.
            let now = crate::clock::now_ms();
            st.places.values_mut().for_each(|p| p.seen_ms = p.seen_ms.max(now));
        }
        st.applied += new.len() as u64;
        self.publish_pause(st);
    }

    /// Shared rooms: a read of the shared log that began at `at` is
    /// applied (see [`Room::read_since`]).
    pub fn mark_read(&self, at: i64) {
        let mut st = self.state.lock();
        st.read_ms = st.read_ms.max(at);
    }

    /// Shared rooms: a step could not reach the shared log (Redis away);
    /// see [`Room::regrace_if_back`].
    pub fn regrace_when_back(&self) {
        self.state.lock().regrace_due = true;
    }

    /// Shared rooms: once the shared log is reached again after a step
    /// that could not reach it, every place gets its `grace` again from
    /// `now`, as after a node's start. The check-ins fans made on other
    /// nodes meanwhile wait there for their next flush: the first step
    /// back would otherwise plan from the ones made before the outage, and
    /// skip fans who were there all along.
    pub fn regrace_if_back(&self, now: i64) {
        let mut st = self.state.lock();
        if std::mem::take(&mut st.regrace_due) {
            st.places.values_mut().for_each(|p| p.seen_ms = p.seen_ms.max(now));
        }
    }

    /// Shared rooms: whether the replica holds every entry written before
    /// `t` (a read that began at or after it is applied). A fan who joined
    /// through another node a moment ago is "not joined" here until then.
    pub fn read_since(&self, t: i64) -> bool {
        self.state.lock().read_ms >= t
    }

    /// Shared rooms: the admitter's next events (see [`Room::tick`]), not
    /// applied: they are applied when they come back through the shared log.
    /// `counted_ms` is Redis's time when it counted `claimed`'s codes: a
    /// pass expired by then has all the claims it will ever have, since
    /// the commit script refuses one made with it from its expiry on, by
    /// the same clock. So a pass is retired on Redis's word, not on this
    /// node's clock, however far off Redis's that is.
    pub fn plan_shared(
        &self,
        now: i64,
        counted_ms: i64,
        stock: &dyn Fn() -> StockView,
        claimed: &dyn Fn(u64) -> u32,
        seen_elsewhere: &dyn Fn(u64) -> Option<i64>,
        max_steps: usize,
    ) -> Plan {
        let mut st = self.state.lock();
        let (cursor, base) = (st.cursor, st.base());
        let events = st.plan(now, counted_ms, stock, claimed, seen_elsewhere, max_steps);
        Plan { cursor, base, events }
    }

    /// Shared rooms: the places the admitter reaches next, and the pass holders.
    pub fn next_and_holders(&self, n: usize) -> (Vec<u64>, Vec<u64>) {
        let st = self.state.lock();
        let start = st.cursor.min(st.order.len());
        let end = st.order.len().min(st.cursor.saturating_add(n));
        (
            st.order[start..end.max(start)].to_vec(),
            st.active.iter().map(|&(u, _)| u).collect(),
        )
    }

    /// Shared rooms: the check-ins made on this node since the last call,
    /// for the other nodes' admitter.
    pub fn take_seen(&self) -> Vec<(u64, i64)> {
        std::mem::take(&mut self.state.lock().seen_here).into_iter().collect()
    }

    /// Shared rooms: puts back check-ins a flush could not deliver (Redis
    /// away), for the next flush; a later check-in of the same fan stands.
    pub fn restore_seen(&self, seen: Vec<(u64, i64)>) {
        let mut st = self.state.lock();
        for (user, at) in seen {
            st.note_seen(user, at);
        }
    }

    /// The draw, once made (`ticketd export --what draw`).
    pub fn draw_record(&self) -> Option<DrawRecord> {
        self.state.lock().draw_record(&self.activity, &self.seed)
    }
}

/// The seed and state the events of the log at `path` describe; `None` when it is empty.
fn replay(path: &Path, events: &[Event], settings: RoomSettings) -> io::Result<Option<(Seed, RoomState)>> {
    let (seed, rest) = match events.split_first() {
        None => return Ok(None),
        Some((Event::Seed { seed }, rest)) => (
            Seed::from_hex(seed).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: the seed is not 64 hex digits", path.display()),
                )
            })?,
            rest,
        ),
        Some(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: the first line is not the seed", path.display()),
            ))
        }
    };
    let mut state = RoomState::new(settings);
    for event in rest {
        state.replay(&seed, event);
    }
    Ok(Some((seed, state)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        admission::{
            draw,
            state::{PlaceState, MAX_PLACES_PER_ACCOUNT},
        },
        clock::rfc3339_ms,
        config::AdmissionMode,
    };

    /// A room in `dir` opened on a log of `events` (the first the seed's).
    fn room_from(dir: &Path, events: &[Event]) -> Room {
        let text: String = events
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect();
        std::fs::write(dir.join("a.log"), text).unwrap();
        Room::open(dir, "a".into(), settings()).unwrap()
    }

    /// Stock with `remaining` codes and claims still being committed.
    fn unsettled(remaining: usize) -> StockView {
        StockView {
            remaining,
            settled: false,
        }
    }

    /// A log where fan 1, alone in the room, was admitted at 11 with a pass
    /// until 1,000; then `more`.
    fn one_admitted(seed: &Seed, more: &[Event]) -> Vec<Event> {
        let mut events = vec![
            Event::Seed { seed: seed.to_hex() },
            Event::Join { u: 1, t: 1 },
            Event::Shuffle { t: 10, m: None },
            Event::Admit { u: 1, t: 11, x: 1_000 },
        ];
        events.extend_from_slice(more);
        events
    }

    fn settings() -> RoomSettings {
        RoomSettings {
            mode: AdmissionMode::Queue,
            opens_ms: 0,
            shuffle_ms: 10,
            start_ms: 10,
            end_ms: i64::MAX,
            admit_rate: 100.0,
            pass_ttl_ms: 60_000,
            grace_ms: 60_000,
            capacity: 10,
            per_user_limit: 1,
            paused: false,
        }
    }

    /// A room closed by its end time tells the fans still waiting the sale
    /// ended, not that it sold out (it may have codes left); one closed
    /// because nothing was left says sold out.
    #[test]
    fn a_room_closed_at_the_end_says_ended_not_sold_out() {
        let for_close_at = |t: i64| {
            let mut s = settings();
            s.end_ms = 1_000;
            let room = Room::shared("s".into(), s, Seed::generate());
            room.apply_shared(
                0,
                &[
                    Event::Join { u: 1, t: 1 },
                    Event::Join { u: 2, t: 2 },
                    Event::Shuffle { t: 10, m: None },
                    Event::Close { t },
                ],
            );
            room.status(2, 1_500, false).state
        };
        assert_eq!(for_close_at(500), PlaceState::SoldOut);
        assert_eq!(for_close_at(1_000), PlaceState::Ended);
    }

    /// A cluster's replica started with another admission than the room
    /// drew as follows the room: a drawn lottery takes no new entrant
    /// through a node whose config says queue.
    #[test]
    fn a_replica_follows_the_admission_the_room_drew_as() {
        let room = Room::shared("s".into(), settings(), Seed::generate());
        room.apply_shared(
            0,
            &[
                Event::Join { u: 1, t: 1 },
                Event::Shuffle {
                    t: 10,
                    m: Some(AdmissionMode::Lottery),
                },
            ],
        );
        assert_eq!(room.settings().mode, AdmissionMode::Lottery);
        assert_eq!(room.entry(2, 20), Err(JoinError::EntriesClosed));
        assert_eq!(room.draw_record().unwrap().admission, Some(AdmissionMode::Lottery));
    }

    #[test]
    fn a_log_naming_someone_not_next_moves_nothing_and_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let seed = Seed::generate();
        let mut text = serde_json::to_string(&Event::Seed { seed: seed.to_hex() }).unwrap() + "\n";
        let mut line = |e: Event| {
            text.push_str(&serde_json::to_string(&e).unwrap());
            text.push('\n');
        };
        line(Event::Join { u: 1, t: 1 });
        line(Event::Join { u: 2, t: 2 });
        line(Event::Shuffle { t: 10, m: None });
        let order = draw::shuffle(&seed, &[1, 2]);
        line(Event::Admit {
            u: order[0],
            t: 11,
            x: 99,
        });
        // Damaged: the same fan twice, a stranger, more steps than places.
        line(Event::Admit {
            u: order[0],
            t: 11,
            x: 99,
        });
        line(Event::Skip { u: 7, t: 12 });
        line(Event::Admit {
            u: order[1],
            t: 13,
            x: 99,
        });
        line(Event::Admit { u: 8, t: 14, x: 99 });
        std::fs::write(dir.path().join("a.log"), &text).unwrap();
        let room = Room::open(dir.path(), "a".into(), settings()).unwrap();
        assert_eq!(room.cursor(), 2, "only the steps that name the next place count");
        let summary = room.summary();
        assert_eq!((summary.admitted, summary.waiting), (2, 0));
        assert_eq!(room.next_and_holders(5).0, Vec::<u64>::new());
        assert_eq!(room.status(order[1], 20, false).state, PlaceState::Admitted);
        assert!(room.join(9, 20).is_ok(), "the room still takes places");
        assert_eq!(room.summary().joined, 3);
    }

    /// An account that joins, goes quiet until skipped and joins again
    /// added a line to the log and an entry to the order each time, without
    /// end (`queue_capacity` counts only places still waiting). Now the
    /// eighth place is its last, and a replay counts the same.
    #[test]
    fn an_account_takes_a_bounded_number_of_places() {
        let dir = tempfile::tempdir().unwrap();
        let seed = Seed::generate();
        let mut events = vec![Event::Seed { seed: seed.to_hex() }, Event::Shuffle { t: 10, m: None }];
        for i in 0..MAX_PLACES_PER_ACCOUNT as i64 {
            events.push(Event::Join { u: 1, t: 20 + i * 10 });
            events.push(Event::Skip { u: 1, t: 25 + i * 10 });
        }
        let room = room_from(dir.path(), &events);
        let status = room.status(1, 1_000, false);
        assert_eq!((status.state, status.places_left), (PlaceState::PassedOver, 0));
        assert!(
            status.nothing_to_wait_for(),
            "no place left: the stream and the page stop"
        );
        assert_eq!(room.join(1, 1_000), Err(JoinError::NoMorePlaces));
        assert_eq!(room.summary().joined, u64::from(MAX_PLACES_PER_ACCOUNT));
        // One place fewer, and the account may come back once more.
        let dir = tempfile::tempdir().unwrap();
        let room = room_from(dir.path(), &events[..events.len() - 2]);
        let status = room.status(1, 1_000, false);
        assert_eq!((status.state, status.places_left), (PlaceState::PassedOver, 1));
        assert!(!status.nothing_to_wait_for(), "one more place: the fan may join again");
        assert!(room.join(1, 1_000).is_ok());
        // (Answered, and shown, once on disk.)
        room.log.as_ref().unwrap().sync_now().unwrap();
        assert_eq!(room.status(1, 1_000, false).places_left, 0);
        assert_eq!(room.status(2, 1_000, false).places_left, MAX_PLACES_PER_ACCOUNT);
    }

    /// A line of a kind a later version writes is passed over: the room
    /// opens and goes on. Before, one such line failed the whole log, so an
    /// earlier node in a rolling upgrade stopped following the room for good.
    #[test]
    fn a_line_of_a_later_kind_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let seed = Seed::generate();
        let text = [
            serde_json::to_string(&Event::Seed { seed: seed.to_hex() }).unwrap(),
            serde_json::to_string(&Event::Join { u: 1, t: 1 }).unwrap(),
            r#"{"k":"reopen","t":2}"#.to_owned(),
            r#"{"k":"someday","u":3,"why":"later"}"#.to_owned(),
            serde_json::to_string(&Event::Join { u: 2, t: 3 }).unwrap(),
        ]
        .join("\n")
            + "\n";
        std::fs::write(dir.path().join("a.log"), text).unwrap();
        let room = Room::open(dir.path(), "a".into(), settings()).unwrap();
        assert_eq!(room.summary().joined, 2);
        assert_eq!(room.status(2, 5, false).state, PlaceState::Waiting);
    }

    #[test]
    fn a_place_taken_again_after_a_lapse_is_not_retired_by_the_old_pass() {
        let dir = tempfile::tempdir().unwrap();
        let seed = Seed::generate();
        // The pass lapsed unused; the fan joined again.
        let room = room_from(dir.path(), &one_admitted(&seed, &[Event::Join { u: 1, t: 2_000 }]));
        assert_eq!(room.status(1, 2_500, false).state, PlaceState::Waiting);
        // Every code is spoken for: the step retires passes, admits nobody.
        let stock = unsettled(0);
        room.tick(|| 3_000, &|| stock, &|_| 0);
        assert_eq!(room.status(1, 3_000, false).state, PlaceState::Waiting, "still in line");
        assert_eq!(room.summary().expired, 1);
    }

    /// A pass speaks for the per-user limit's codes: with 6 codes and a limit
    /// of 4, the step admitted two places (passes for 8), and whichever
    /// claimed first took codes the other's pass spoke for. The last two go
    /// to the next place once the first pass is used.
    #[test]
    fn no_pass_is_admitted_on_codes_another_pass_speaks_for() {
        let dir = tempfile::tempdir().unwrap();
        let four = RoomSettings {
            per_user_limit: 4,
            ..settings()
        };
        let room = Room::open(dir.path(), "four".into(), four).unwrap();
        for user in 1..=3 {
            room.join(user, 5).unwrap();
        }
        let six = unsettled(6);
        room.tick(|| 11, &|| six, &|_| 0); // the shuffle
        room.tick(|| 100, &|| six, &|_| 0);
        room.log.as_ref().unwrap().sync_now().unwrap();
        let admitted = |at| {
            (1..=3)
                .filter(|&u| room.status(u, at, false).state == PlaceState::Admitted)
                .count()
        };
        assert_eq!(admitted(100), 1, "one pass: the other two codes are not a pass's four");
        let waiting: Vec<u64> = (1..=3)
            .filter(|&u| room.status(u, 100, false).state == PlaceState::Waiting)
            .collect();
        assert!(
            waiting.iter().all(|&u| room.status(u, 100, false).standby),
            "the codes left are spoken for"
        );
        // The pass holder claims its four; two codes are left, and no pass is out.
        let first = (1..=3)
            .find(|&u| room.status(u, 100, false).state == PlaceState::Admitted)
            .unwrap();
        let two = unsettled(2);
        let claimed = |u: u64| if u == first { 4 } else { 0 };
        let settled = 100 + PASS_SETTLE_MS + 1;
        room.tick(|| settled, &|| two, &claimed);
        room.log.as_ref().unwrap().sync_now().unwrap();
        assert_eq!(admitted(settled), 1, "the next place, for the last two");
        assert_eq!(room.status(first, settled, false).state, PlaceState::Done);
    }

    /// The fan who takes the last code closes the room: that pass is over
    /// at once, as a used pass is in an open room. It showed "admitted",
    /// with the pass's countdown, until the pass lapsed (two walkthroughs
    /// saw "Your turn!" beside "Got it!").
    #[test]
    fn the_pass_that_took_the_last_code_is_done_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let room = stepped_room(dir.path(), &[1, 2], 2);
        room.log.as_ref().unwrap().sync_now().unwrap();
        for fan in [1, 2] {
            assert_eq!(room.status(fan, 1_010, false).state, PlaceState::Admitted);
        }
        let gone = StockView {
            remaining: 0,
            settled: true,
        };
        // Fan 1 took the last code (another way took the other).
        let claimed = |u: u64| u32::from(u == 1);
        room.tick(|| 1_100, &|| gone, &claimed); // the close
        room.tick(|| 1_200, &|| gone, &claimed);
        room.log.as_ref().unwrap().sync_now().unwrap();
        let status = room.status(1, 1_200, false);
        assert!(status.pass_expires_at.is_some());
        assert_eq!(status.state, PlaceState::Done, "the pass lapses later");
        // The pass that claimed nothing is over too: shown as sold out,
        // and no claim token comes of it.
        assert_eq!(room.status(2, 1_200, false).state, PlaceState::SoldOut);
        assert_eq!(room.pass_of(2, 1_200), None);
    }

    /// Entries close at the draw time, not at the admitter's step that
    /// draws: a lottery join in between was drawn with the entrants (a
    /// red-team run joined 3 and 13 ms late and was in the draw); a queue
    /// join in between would be shuffled in rather than placed at the back,
    /// so it is asked to come back (and then goes to the back). A lottery's
    /// lapsed pass is no way back in.
    #[test]
    fn entries_close_at_the_draw_time_not_at_the_step() {
        let stock = unsettled(5);
        let dir = tempfile::tempdir().unwrap();
        let room = lottery_of_one(dir.path());
        // `entry` is what a shared room asks before its log's join script.
        assert_eq!(room.entry(2, 10), Err(JoinError::EntriesClosed));
        assert_eq!(room.entry(1, 10), Ok(Entry::Held));
        assert_eq!(room.join(2, 10), Err(JoinError::EntriesClosed), "at the draw time");
        assert!(room.join(1, 10).is_ok(), "an entrant keeps its place");
        room.tick(|| 11, &|| stock, &|_| 0); // the draw
        room.tick(|| 100, &|| stock, &|_| 0); // the first admission
        room.log.as_ref().unwrap().sync_now().unwrap();
        assert_eq!(room.status(1, 100, false).state, PlaceState::Admitted);
        // The pass lapses unused: passed over, and no new entry.
        let lapsed = 60_100 + PASS_SETTLE_MS;
        room.tick(|| lapsed, &|| stock, &|_| 0);
        assert_eq!(room.status(1, lapsed, false).state, PlaceState::PassedOver);
        assert_eq!(room.entry(1, lapsed + 1), Err(JoinError::EntriesClosed));
        assert_eq!(room.join(1, lapsed + 1), Err(JoinError::EntriesClosed));

        let dir = tempfile::tempdir().unwrap();
        let room = Room::open(dir.path(), "q".into(), settings()).unwrap();
        room.join(1, 5).unwrap();
        room.join(2, 6).unwrap();
        assert_eq!(room.entry(3, 10), Err(JoinError::Drawing));
        assert_eq!(room.join(3, 10), Err(JoinError::Drawing), "being drawn");
        room.tick(|| 12, &|| stock, &|_| 0);
        assert_eq!(room.entry(3, 12), Ok(Entry::New));
        room.join(3, 12).unwrap();
        let record = room.draw_record().unwrap();
        assert_eq!(record.late, vec![3], "after the draw: at the back, not drawn");
    }

    /// A lottery room in `dir` with one entrant: user 1, joined at 5.
    fn lottery_of_one(dir: &std::path::Path) -> Room {
        let lottery = RoomSettings {
            mode: AdmissionMode::Lottery,
            ..settings()
        };
        let room = Room::open(dir, "l".into(), lottery).unwrap();
        room.join(1, 5).unwrap();
        room
    }

    /// A lottery whose every drawn place was reached, with no pass out,
    /// admits nobody any more though codes are left (a queue takes later
    /// arrivals, so it never does before it closes).
    #[test]
    fn a_lottery_that_reached_every_place_admits_no_more() {
        let stock = unsettled(5);
        let dir = tempfile::tempdir().unwrap();
        let room = lottery_of_one(dir.path());
        assert!(!room.admits_no_more(), "entries are open");
        room.tick(|| 11, &|| stock, &|_| 0); // the draw
        assert!(!room.admits_no_more(), "drawn, nobody admitted yet");
        room.tick(|| 100, &|| stock, &|_| 0); // the first admission
        assert!(!room.admits_no_more(), "a pass is out");
        let lapsed = 60_100 + PASS_SETTLE_MS;
        room.tick(|| lapsed, &|| stock, &|_| 0);
        assert!(room.admits_no_more(), "the only entrant's pass lapsed");
        assert!(
            !room.summary().closed,
            "not closed: nothing was sold out, and the sale runs on"
        );

        let dir = tempfile::tempdir().unwrap();
        let room = Room::open(dir.path(), "q".into(), settings()).unwrap();
        room.join(1, 5).unwrap();
        room.tick(|| 11, &|| stock, &|_| 0);
        room.tick(|| 100, &|| stock, &|_| 0);
        room.tick(|| lapsed, &|| stock, &|_| 0);
        assert!(!room.admits_no_more(), "a queue takes whoever comes next");
    }

    /// A queue's fan whose pass lapsed unused may join again, at the back;
    /// `entry` names the lapsed pass, which a shared room's join script
    /// checks is the admission it holds.
    #[test]
    fn a_lapsed_queue_pass_is_a_way_back_in_that_names_the_pass() {
        let dir = tempfile::tempdir().unwrap();
        let seed = Seed::generate();
        let room = room_from(dir.path(), &one_admitted(&seed, &[]));
        assert_eq!(room.entry(1, 500), Ok(Entry::Held), "the pass is still good");
        room.tick(|| 2_000, &|| unsettled(5), &|_| 0);
        assert_eq!(room.status(1, 2_000, false).state, PlaceState::PassedOver);
        assert_eq!(
            room.entry(1, 2_001),
            Ok(Entry::Again {
                lapsed_pass_ms: Some(1_000)
            })
        );
        room.join(1, 2_001).unwrap();
        assert_eq!(room.entry(1, 2_002), Ok(Entry::Held));
        assert_eq!(
            room.status(1, 2_002, false).state,
            PlaceState::NotJoined,
            "shown once on disk"
        );
        room.log.as_ref().unwrap().sync_now().unwrap();
        assert_eq!(room.status(1, 2_002, false).state, PlaceState::Waiting);
    }

    /// A replica follows a shared log read from its last entry on, and
    /// finds out when the log is not the one it read: shorter (a failover
    /// lost the last writes) or another at that place (and written on
    /// since). Rebuilt, it holds what the log holds.
    #[test]
    fn a_replica_finds_a_log_that_lost_what_it_read() {
        let room = Room::shared("s".into(), settings(), Seed::generate());
        let line = |e: &Event| serde_json::to_string(e).unwrap();
        let follow = |from: u64, events: &[Event]| {
            let lines: Vec<String> = events.iter().map(line).collect();
            room.follow_shared(&room.base(), from, &lines, events)
        };
        let joins: Vec<Event> = (1..=8).map(|u| Event::Join { u, t: u as i64 }).collect();
        assert_eq!(follow(0, &joins[..3]), Followed::Applied);
        assert_eq!(follow(2, &joins[2..5]), Followed::Applied);
        assert_eq!(follow(4, &joins[4..5]), Followed::Applied);
        assert_eq!(room.base().applied, 5);
        assert_eq!(room.base().last, Some(line(&joins[4])));
        // Shorter: the read from the last entry finds nothing.
        assert_eq!(follow(4, &[]), Followed::Diverged);
        // As long again, with another fan where the fifth was.
        let other = Event::Join { u: 9, t: 9 };
        assert_eq!(follow(4, std::slice::from_ref(&other)), Followed::Diverged);
        // A read sent earlier (from 2), answered by the new log: the fifth
        // entry is checked wherever it falls in the read.
        let mut log = joins[..4].to_vec();
        log.extend([other, Event::Join { u: 10, t: 10 }]);
        assert_eq!(follow(2, &log[2..]), Followed::Diverged);
        assert_eq!(room.base().applied, 5, "nothing applied");
        // A read sent before a rebuild is dropped.
        let before = room.base();
        let lines: Vec<String> = log.iter().map(line).collect();
        room.rebuild_shared(&lines, &log);
        assert_eq!((room.base().applied, room.base().last), (6, Some(line(&log[5]))));
        let old: Vec<String> = joins[4..].iter().map(line).collect();
        assert_eq!(room.follow_shared(&before, 4, &old, &joins[4..]), Followed::Dropped);
        assert_eq!(room.base().applied, 6, "the old log's entries are not applied");
        assert_eq!(room.status(5, 10, false).state, PlaceState::NotJoined);
        assert_eq!(room.status(9, 10, false).state, PlaceState::Waiting);
        assert_eq!(follow(5, &log[5..]), Followed::Applied);
        // A read that began before another reader applied more adds
        // nothing and finds nothing amiss.
        assert_eq!(follow(1, &log[1..3]), Followed::Applied);
        assert_eq!((room.base().applied, room.base().last), (6, Some(line(&log[5]))));
        // A line of a later version is kept as written (parsed, it is
        // `Unknown`, which would serialise as another line): the next read
        // and the admitter's append compare with what the log holds.
        let later = r#"{"k":"later","u":11,"z":[1,2]}"#.to_owned();
        let unknown: Event = serde_json::from_str(&later).unwrap();
        assert_eq!(unknown, Event::Unknown);
        let base = room.base();
        let read = [line(&log[5]), later.clone()];
        assert_eq!(
            room.follow_shared(&base, 5, &read, &[log[5].clone(), unknown.clone()]),
            Followed::Applied
        );
        assert_eq!(room.base().last, Some(later.clone()));
        let base = room.base();
        assert_eq!(room.follow_shared(&base, 6, &[later], &[unknown]), Followed::Applied);
    }

    /// Check-ins a flush could not deliver (Redis away) go with the next
    /// one, and a later check-in made meanwhile stands.
    #[test]
    fn check_ins_a_flush_could_not_deliver_go_with_the_next() {
        let room = Room::shared("s".into(), settings(), Seed::generate());
        room.apply_shared(0, &[Event::Join { u: 1, t: 1 }, Event::Join { u: 2, t: 2 }]);
        room.status(1, 100, true);
        room.status(2, 100, true);
        let failed = room.take_seen();
        assert_eq!(failed.len(), 2);
        room.status(1, 300, true); // meanwhile
        room.restore_seen(failed);
        let mut next = room.take_seen();
        next.sort_unstable();
        assert_eq!(next, vec![(1, 300), (2, 100)]);
    }

    /// A pass that lapsed unused, looked at before the admitter's next step
    /// retired it, is not "done" (a final state: the page stops following
    /// and offers no way back in). The step tells a lapsed pass (passed
    /// over: join again) from a used one (done); until then it is still
    /// the lapsed pass it was.
    #[test]
    fn a_lapsed_pass_is_not_done_before_the_step_says_which() {
        let dir = tempfile::tempdir().unwrap();
        let seed = Seed::generate();
        let room = room_from(dir.path(), &one_admitted(&seed, &[]));
        assert_eq!(room.status(1, 999, false).state, PlaceState::Admitted);
        assert_ne!(room.status(1, 1_001, false).state, PlaceState::Done, "before the step");
        let stock = unsettled(5);
        // A claim checked just before the expiry may still be on its way.
        let settled = 1_000 + PASS_SETTLE_MS;
        room.tick(|| settled - 1, &|| stock, &|_| 0);
        assert_eq!(room.summary().expired, 0, "retired while a claim may be on its way");
        room.tick(|| settled, &|| stock, &|_| 0);
        assert_eq!(room.status(1, settled, false).state, PlaceState::PassedOver);
        assert_eq!(room.summary().expired, 1);
    }

    /// A claim that ends while the admitter steps takes its code from the
    /// pool, then shows in the ledger. The step read the stock first: the
    /// code counted as in stock while the pass counted as used, one fan was
    /// admitted beyond the stock, and their claim heard SOLD_OUT (seen once
    /// in `admission_never_runs_ahead_of_the_stock`). Here the claim ends
    /// exactly when the step asks the ledger.
    #[test]
    fn a_claim_ending_during_the_step_does_not_leave_its_code_in_stock() {
        let dir = tempfile::tempdir().unwrap();
        let seed = Seed::generate();
        let order = draw::shuffle(&seed, &[1, 2]);
        let room = room_from(
            dir.path(),
            &[
                Event::Seed { seed: seed.to_hex() },
                Event::Join { u: 1, t: 1 },
                Event::Join { u: 2, t: 2 },
                Event::Shuffle { t: 10, m: None },
                Event::Admit {
                    u: order[0],
                    t: 11,
                    x: 60_000,
                },
            ],
        );
        // One code, spoken for by the pass of `order[0]`, who claims it now.
        let remaining = std::cell::Cell::new(1);
        let stock = || unsettled(remaining.get());
        let claimed = |user: u64| {
            if user == order[0] {
                remaining.set(0);
                1
            } else {
                0
            }
        };
        room.tick(|| 1_000, &stock, &claimed);
        assert_eq!(room.summary().admitted, 1, "nobody admitted beyond the one code");
        assert_eq!(room.status(order[1], 1_000, false).state, PlaceState::Waiting);
    }

    /// The admitter reads its clock holding the room: no status can come
    /// between its reading and its events.
    #[test]
    fn the_admitter_reads_the_clock_holding_the_room() {
        let dir = tempfile::tempdir().unwrap();
        let room = Room::open(dir.path(), "a".into(), settings()).unwrap();
        let stock = unsettled(5);
        let mut held = None;
        room.tick(
            || {
                held = Some(room.state.try_lock().is_none());
                10
            },
            &|| stock,
            &|_| 0,
        );
        assert_eq!(held, Some(true), "the clock was read with the room locked");
    }

    /// A replica of a shared room where user 1 holds a pass admitted now,
    /// lapsing `ttl_ms` later: the room, the admission time and the expiry.
    fn one_pass_held(ttl_ms: i64) -> (Room, i64, i64) {
        let seed = Seed::generate();
        let room = Room::shared("a".into(), settings(), seed.clone());
        let admitted_at = crate::clock::now_ms();
        let lapses = admitted_at + ttl_ms;
        room.apply_shared(
            0,
            &[
                Event::Seed { seed: seed.to_hex() },
                Event::Join { u: 1, t: 1 },
                Event::Shuffle { t: 10, m: None },
                Event::Admit {
                    u: 1,
                    t: admitted_at,
                    x: lapses,
                },
            ],
        );
        (room, admitted_at, lapses)
    }

    /// A room in `dir` that `fans` joined, shuffled and then stepped once
    /// with `remaining` codes in stock: its admissions are in the log's
    /// buffer, not yet on disk.
    fn stepped_room(dir: &Path, fans: &[u64], remaining: usize) -> Room {
        let room = Room::open(dir, "a".into(), settings()).unwrap();
        for (t, &fan) in (1..).zip(fans) {
            room.join(fan, t).unwrap();
        }
        // Each join is answered once on disk.
        room.log.as_ref().unwrap().sync_now().unwrap();
        let stock = unsettled(remaining);
        room.tick(|| 10, &|| stock, &|_| 0);
        room.tick(|| 1_010, &|| stock, &|_| 0);
        room
    }

    /// A replica built after the whole cluster was down (its log's joins
    /// and every flushed check-in older than `grace`) skipped every fan at
    /// its first step; its first catch-up now gives each place its grace.
    #[test]
    fn a_replica_caught_up_after_a_start_gives_every_place_its_grace() {
        let seed = Seed::generate();
        let room = Room::shared("a".into(), settings(), seed.clone());
        let events = [
            Event::Seed { seed: seed.to_hex() },
            Event::Join { u: 1, t: 1 },
            Event::Join { u: 2, t: 2 },
            Event::Shuffle { t: 10, m: None },
        ];
        room.apply_shared(0, &events);
        let now = crate::clock::now_ms();
        let planned = room
            .plan_shared(now, now, &|| unsettled(5), &|_| 0, &|_| Some(5), 10)
            .events;
        assert_eq!(planned.len(), 2, "{planned:?}");
        assert!(planned.iter().all(|e| matches!(e, Event::Admit { .. })), "{planned:?}");
    }

    /// After steps that could not reach the shared log (Redis away for
    /// longer than `grace`), the first step back planned from the check-ins
    /// flushed before the outage and skipped fans who had stayed, checking
    /// in on nodes that had not flushed yet. It now gives every place its
    /// grace again first.
    #[test]
    fn the_first_step_after_redis_was_away_gives_every_place_its_grace() {
        let seed = Seed::generate();
        let room = Room::shared("a".into(), settings(), seed.clone());
        room.apply_shared(
            0,
            &[
                Event::Seed { seed: seed.to_hex() },
                Event::Join { u: 1, t: 1 },
                Event::Join { u: 2, t: 2 },
                Event::Shuffle { t: 10, m: None },
            ],
        );
        // An outage longer than grace: the check-ins known are older.
        let back = crate::clock::now_ms() + settings().grace_ms + 1_000;
        let planned = room
            .plan_shared(back, back, &|| unsettled(5), &|_| 0, &|_| Some(5), 10)
            .events;
        assert!(planned.iter().all(|e| matches!(e, Event::Skip { .. })), "{planned:?}");
        room.regrace_when_back();
        room.regrace_if_back(back);
        let planned = room
            .plan_shared(back, back, &|| unsettled(5), &|_| 0, &|_| Some(5), 10)
            .events;
        assert_eq!(planned.len(), 2, "{planned:?}");
        assert!(planned.iter().all(|e| matches!(e, Event::Admit { .. })), "{planned:?}");
        // Once: a later step plans as usual.
        room.regrace_if_back(back + settings().grace_ms + 1);
        let later = back + settings().grace_ms * 2;
        let planned = room
            .plan_shared(later, later, &|| unsettled(5), &|_| 0, &|_| Some(5), 10)
            .events;
        assert!(planned.iter().all(|e| matches!(e, Event::Skip { .. })), "{planned:?}");
    }

    /// The downtime a restart gives back: from the node's last sign of
    /// life, only while passes ran then, the sale open, not paused or over.
    #[test]
    fn downtime_is_given_back_only_to_passes_running_then() {
        let (room, admitted_at, lapses) = one_pass_held(60_000);
        let mut st = room.state.lock();
        let alive = admitted_at + 1_000;
        let later = alive + 30_000;
        assert_eq!(st.downtime_since(alive, later), Some(alive));
        assert_eq!(st.downtime_since(alive, alive + 1_500), None, "a quick restart");
        assert_eq!(st.downtime_since(lapses, lapses + 30_000), None, "no pass ran then");
        st.paused_ms = Some(alive - 1);
        assert_eq!(st.downtime_since(alive, later), None, "already paused");
        st.paused_ms = None;
        st.closed_ms = Some(alive - 1);
        assert_eq!(st.downtime_since(alive, later), None, "closed");
        st.closed_ms = None;
        st.settings.end_ms = alive + 10_000;
        assert_eq!(st.downtime_since(alive, later), None, "the sale is over");
    }

    /// A shared room retires a pass on Redis's word (the time Redis counted
    /// the holders' claims), which the commit script refuses late claims
    /// by: a node whose clock runs ahead retires no pass that Redis could
    /// still record a claim under.
    #[test]
    fn a_shared_room_retires_a_pass_by_redis_clock_not_its_own() {
        let (room, _, lapses) = one_pass_held(1_000);
        let ahead = lapses + 5_000;
        room.plan_shared(ahead, lapses - 1, &|| unsettled(5), &|_| 0, &|_| None, 0);
        assert_eq!(room.summary().expired, 0, "retired before Redis's clock said so");
        room.plan_shared(ahead, lapses, &|| unsettled(5), &|_| 0, &|_| None, 0);
        assert_eq!(room.summary().expired, 1);
        assert_eq!(room.status(1, ahead, false).state, PlaceState::PassedOver);
    }

    /// A replica that had not read the pause yet retired a pass that lapsed
    /// during it, as its own step does (without a log line); the admitter's
    /// `Extend` on resume then found no pass and was ignored: through that
    /// node the fan stayed passed over, and a later admitter there would
    /// have admitted one fan past the stock. The extension now gives the
    /// pass back.
    #[test]
    fn an_extension_gives_back_a_pass_a_replica_retired_during_the_pause() {
        let (room, _, lapses) = one_pass_held(1_000);
        // This replica's own step, past the expiry and unaware of a pause.
        let retired = lapses + PASS_SETTLE_MS;
        room.plan_shared(retired, retired, &|| unsettled(5), &|_| 0, &|_| None, 0);
        assert_eq!(room.status(1, retired, false).state, PlaceState::PassedOver);
        room.apply_shared(
            4,
            &[
                Event::Pause { t: lapses - 500 },
                Event::Resume { t: lapses + 10_000 },
                Event::Extend {
                    u: 1,
                    x: lapses + 10_500,
                },
            ],
        );
        let status = room.status(1, lapses + 10_001, false);
        assert_eq!(status.state, PlaceState::Admitted, "{status:?}");
        assert_eq!(room.pass_of(1, lapses + 10_001), Some(lapses + 10_500));
    }

    /// A paused sale holds the room: the pass that could not be used is not
    /// retired, the fan who did not check in is not skipped, nobody else is
    /// admitted; on resume the pass gets the paused time back, in the log.
    #[test]
    fn a_pause_holds_every_place_and_gives_passes_their_time_back() {
        let dir = tempfile::tempdir().unwrap();
        let room = stepped_room(dir.path(), &[1, 2], 1);
        room.log.as_ref().unwrap().sync_now().unwrap();
        let holder = [1, 2].into_iter().find(|&u| room.pass_of(u, 1_020).is_some()).unwrap();
        let other = 3 - holder;
        assert_eq!(room.pass_of(holder, 1_020), Some(61_010));
        let stock = unsettled(1);
        let step = |now: i64| room.tick(|| now, &|| stock, &|_| 0);

        room.apply(RoomSettings {
            paused: true,
            ..settings()
        });
        assert_ne!(step(2_000), 0, "the pause is logged");
        // Past the pass's expiry and the other fan's grace.
        assert_eq!(step(100_000), 0, "nothing moves while paused");
        assert_eq!(room.status(holder, 100_000, false).state, PlaceState::Admitted);
        assert_eq!(room.status(other, 100_000, false).state, PlaceState::Waiting);

        room.apply(settings());
        assert_ne!(step(150_000), 0, "the resume is logged");
        let extended = 61_010 + (150_000 - 2_000);
        assert_eq!(room.pass_of(holder, 150_001), None, "the extension is not on disk yet");
        room.log.as_ref().unwrap().sync_now().unwrap();
        assert_eq!(room.pass_of(holder, 150_001), Some(extended));
        step(150_100);
        assert_eq!(room.status(holder, 150_100, false).state, PlaceState::Admitted);
        assert_eq!(
            room.status(other, 150_100, false).state,
            PlaceState::Waiting,
            "not skipped"
        );
        room.log.as_ref().unwrap().sync_now().unwrap();

        let reopened = Room::open(dir.path(), "a".into(), settings()).unwrap();
        assert_eq!(
            reopened.pass_of(holder, 150_200),
            Some(extended),
            "replayed from the log"
        );
    }

    #[test]
    fn a_pass_is_shown_only_once_its_admission_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let room = stepped_room(dir.path(), &[1], 5);
        assert_eq!(room.summary().admitted, 1, "admitted in memory");
        // The admission is in the log's buffer, not on disk: a crash now
        // would forget it, so nobody may see its pass yet.
        let before = room.status(1, 1_020, false);
        assert_eq!(before.state, PlaceState::Waiting);
        assert_eq!((before.admitted_at, before.pass_expires_at), (None, None));
        assert_eq!(room.pass_of(1, 1_020), None);
        room.log.as_ref().unwrap().sync_now().unwrap();
        let after = room.status(1, 1_020, false);
        assert_eq!(after.state, PlaceState::Admitted);
        assert_eq!(after.pass_expires_at, Some(rfc3339_ms(1_010 + 60_000)));
        assert_eq!(room.pass_of(1, 1_020), Some(1_010 + 60_000));
    }

    /// Admitting the last fan the stock allows leaves nothing to admit:
    /// the others are on standby. The admitted fan is not, even while the
    /// admission waits for the disk and is shown as "waiting" at the front.
    #[test]
    fn the_fan_taking_the_last_code_is_never_told_to_stand_by() {
        let dir = tempfile::tempdir().unwrap();
        let room = stepped_room(dir.path(), &[1, 2], 1);
        let admitted = (1..=2)
            .find(|&u| room.state.lock().places[&u].state == PlaceState::Admitted)
            .expect("one fan admitted");
        let other = 3 - admitted;
        let pending = room.status(admitted, 1_020, false);
        assert_eq!((pending.state, pending.position), (PlaceState::Waiting, Some(1)));
        assert!(!pending.standby, "told to stand by for its own code: {pending:?}");
        assert!(room.status(other, 1_020, false).standby);
        room.log.as_ref().unwrap().sync_now().unwrap();
        let shown = room.status(admitted, 1_020, false);
        assert_eq!((shown.state, shown.standby), (PlaceState::Admitted, false));
        assert!(room.status(other, 1_020, false).standby);
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_the_room_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let seed = Seed::generate();
        let text = serde_json::to_string(&Event::Seed { seed: seed.to_hex() }).unwrap()
            + "\n"
            + &serde_json::to_string(&Event::Join { u: 1, t: 1 }).unwrap()
            + "\n{\"k\":\"join\",\"u\":2";
        std::fs::write(dir.path().join("a.log"), &text).unwrap();
        let room = Room::open(dir.path(), "a".into(), settings()).unwrap();
        assert_eq!(room.summary().joined, 1);
        let seq = room.join(3, 5).unwrap();
        room.log.as_ref().unwrap().sync_now().unwrap();
        assert!(seq > 0);
        let (events, _) = log::read(&dir.path().join("a.log")).unwrap().unwrap();
        assert_eq!(events.len(), 3, "seed, the whole join, the new join: {events:?}");
    }
}
