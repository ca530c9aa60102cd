//! What a waiting room is: its places, its order, the passes it gave and
//! the admitter's plan, and what each event of its log does to them. This
//! is the state a [`Room`](super::room::Room) keeps behind its mutex; it
//! does no I/O of its own (a node's log file and a cluster's Redis log
//! feed it the same events), so every node that replays a log holds the
//! same room.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use serde::Serialize;

use super::{
    alive::ALIVE_EVERY_MS,
    draw::{self, DrawRecord, Seed},
    log::Event,
};
use crate::{
    clock::rfc3339_ms,
    config::{ActivityConfig, AdmissionMode},
};

/// Check-ins a shared room buffers between flushes at most (a flush is
/// every few hundred milliseconds; beyond this, check-ins wait).
const MAX_SEEN_BUFFER: usize = 1_000_000;
/// The admission rate is measured over this window.
const RATE_WINDOW_MS: i64 = 10_000;

/// A room's settings, times resolved to Unix ms.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomSettings {
    /// Queue or lottery.
    pub mode: AdmissionMode,
    /// Joining opens.
    pub opens_ms: i64,
    /// The shuffle (queue: the start; lottery: the draw, when entries close).
    pub shuffle_ms: i64,
    /// Admission begins (the sale's start).
    pub start_ms: i64,
    /// The sale ends; the room closes.
    pub end_ms: i64,
    /// Places admitted per second (queue); a lottery admits as the stock allows.
    pub admit_rate: f64,
    /// How long a pass is good for.
    pub pass_ttl_ms: i64,
    /// A place not seen for this long is skipped when reached.
    pub grace_ms: i64,
    /// Most places.
    pub capacity: usize,
    /// Codes one pass may claim (the activity's per-user limit).
    pub per_user_limit: u32,
    /// The sale is paused: the admitter logs a pause and holds every place
    /// and pass as it is until the sale resumes (may change at any time).
    pub paused: bool,
}

impl RoomSettings {
    /// Settings for a room read by a tool, which never takes a step.
    pub(super) fn placeholder() -> RoomSettings {
        RoomSettings {
            mode: AdmissionMode::Queue,
            opens_ms: 0,
            shuffle_ms: 0,
            start_ms: 0,
            end_ms: 0,
            admit_rate: 1.0,
            pass_ttl_ms: 0,
            grace_ms: 0,
            capacity: 0,
            per_user_limit: 1,
            paused: false,
        }
    }

    /// The room `activity` asks for, or `None` for a race.
    pub fn of(activity: &ActivityConfig, node_start_ms: i64) -> Option<RoomSettings> {
        let opens = activity.queue_opens?;
        if activity.admission == AdmissionMode::Race {
            return None;
        }
        let start_ms = activity.start_time.resolve(node_start_ms);
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Some(RoomSettings {
            mode: activity.admission,
            opens_ms: opens.resolve(node_start_ms),
            shuffle_ms: match activity.admission {
                AdmissionMode::Lottery => activity.draw_time.map_or(start_ms, |d| d.resolve(node_start_ms)),
                _ => start_ms,
            },
            start_ms,
            end_ms: activity.end_time.resolve(node_start_ms),
            admit_rate: activity.admit_rate,
            pass_ttl_ms: ms(activity.pass_ttl.0),
            grace_ms: ms(activity.grace.0),
            capacity: activity.queue_capacity as usize,
            per_user_limit: activity.per_user_limit,
            paused: activity.paused,
        })
    }

    /// Whether the room opens before its draw, and draws no later than the sale starts.
    pub fn in_order(&self) -> bool {
        self.opens_ms < self.start_ms && self.opens_ms < self.shuffle_ms && self.shuffle_ms <= self.start_ms
    }

    /// Why an activity whose room runs on these settings may not take
    /// `new` (its config's; `None`: no waiting room) at `now_ms`, in a
    /// sentence naming `activity`; `None` when it may. One check for a
    /// node's reload and refresh and for a cluster's `ticketd import`,
    /// which refuses what every node would (an import the nodes refused
    /// held up every later one: they refuse the whole stored set).
    pub fn refused_change(&self, activity: &str, new: Option<&RoomSettings>, now_ms: i64) -> Option<String> {
        match new {
            Some(new) => {
                let frozen = self.frozen_changes(new, now_ms);
                (!frozen.is_empty()).then(|| {
                    format!(
                        "activity `{activity}`: {} cannot change once its queue has opened",
                        frozen.join(", ")
                    )
                })
            }
            None => (now_ms >= self.opens_ms).then(|| {
                format!(
                    "activity `{activity}`: admission (running: \"{}\") cannot change once its queue has opened",
                    self.mode
                )
            }),
        }
    }

    /// What may not change once the room has opened, and changed, each
    /// with the value the room runs on (what to set it back to: relative
    /// times were resolved at the node's start, and the file is usually
    /// overwritten); empty when nothing did.
    pub fn frozen_changes(&self, new: &RoomSettings, now_ms: i64) -> Vec<String> {
        if now_ms < self.opens_ms {
            return Vec::new();
        }
        let time = crate::clock::rfc3339_ms;
        let mut changed = Vec::new();
        if new.mode != self.mode {
            changed.push(format!("admission (running: \"{}\")", self.mode));
        }
        if new.opens_ms != self.opens_ms {
            changed.push(format!("queue_opens (running: {})", time(self.opens_ms)));
        }
        let shuffle_key = if self.mode == AdmissionMode::Lottery {
            "draw_time"
        } else {
            "start_time"
        };
        if new.shuffle_ms != self.shuffle_ms {
            changed.push(format!("{shuffle_key} (running: {})", time(self.shuffle_ms)));
        }
        if new.start_ms != self.start_ms && !(new.shuffle_ms != self.shuffle_ms && shuffle_key == "start_time") {
            changed.push(format!("start_time (running: {})", time(self.start_ms)));
        }
        // The room counts the codes its passes may still claim, and marks a
        // fan done, by it: raised, a done fan's pass (unexpired) would claim
        // again a code promised to the next in line.
        if new.per_user_limit != self.per_user_limit {
            changed.push(format!("per_user_limit (running: {})", self.per_user_limit));
        }
        changed
    }
}

/// Where a fan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlaceState {
    /// Has not joined (or the room does not know them).
    NotJoined,
    /// In line.
    Waiting,
    /// Holds a pass: may claim until it expires.
    Admitted,
    /// Was admitted; the pass is used up or has expired after a claim.
    Done,
    /// Not seen within `grace` when their place came, or let their pass
    /// expire unused; may join again at the back (a queue, not a lottery).
    PassedOver,
    /// Nothing is left: the room has closed.
    SoldOut,
    /// The sale ended (`end_time`) before this place's turn came: the room
    /// closed with codes perhaps left, which nobody may claim now. (Told
    /// "sold out", a fan read that codes ran out while the activity showed
    /// stock.)
    Ended,
    /// A lottery whose entries have closed, for somebody who did not enter.
    EntriesClosed,
}

pub(super) struct Place {
    pub(super) joined_ms: i64,
    pub(super) seen_ms: i64,
    /// Index in `order` (after the shuffle, or a later arrival).
    pub(super) index: u32,
    pub(super) state: PlaceState,
    pub(super) admitted_ms: i64,
    pub(super) pass_expires_ms: i64,
    /// The room log's line of the admission: the pass is shown once that
    /// line is on disk (0: replayed from the disk, or a shared log's).
    pub(super) admit_seq: u64,
    /// The room log's line of the join: the place is shown once that line
    /// is on disk (0: replayed from the disk, or a shared log's). A join
    /// whose line the log could not write was answered 503 and is gone at
    /// the restart; shown meanwhile, the fan was told "waiting".
    pub(super) join_seq: u64,
    /// Places this account has taken in the room, this one included.
    pub(super) taken: u32,
}

impl Place {
    /// Whether this place's admission is on disk (`durable`: the last
    /// room-log line there), so its pass may be shown: a crash before would
    /// forget a pass somebody holds.
    pub(super) fn admission_durable(&self, durable: u64) -> bool {
        self.state == PlaceState::Admitted && self.admit_seq <= durable
    }
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinError {
    /// Before `queue_opens`.
    NotOpen {
        /// When it opens, Unix ms.
        opens_ms: i64,
    },
    /// A lottery at or after its draw time.
    EntriesClosed,
    /// A queue's start has come and its order is being drawn (until the
    /// admitter's next step): a join now goes to the back once it is drawn.
    Drawing,
    /// The room is closed: sold out or ended.
    Closed,
    /// `queue_capacity` places taken.
    Full,
    /// The account has taken [`MAX_PLACES_PER_ACCOUNT`] places already.
    NoMorePlaces,
    /// The room's log cannot be written.
    Unavailable,
}

/// Places one account may take in a room over its life: the first, and
/// seven more after being passed over. Each place is a line in the room's
/// log (and in a cluster, in Redis, which every node replays) and an entry
/// in its order; `queue_capacity` bounds only the places still waiting, so
/// accounts that joined, went quiet until skipped and joined again grew
/// both without end.
pub const MAX_PLACES_PER_ACCOUNT: u32 = 8;

/// A fan's view of the room (`/queue/status`, `/queue/events`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// The activity.
    pub act_id: String,
    /// `"queue"` or `"lottery"`.
    pub mode: AdmissionMode,
    /// Where the fan is.
    pub state: PlaceState,
    /// 1-based place among those not yet reached (once shuffled).
    pub position: Option<u64>,
    /// Places ahead that have not been reached.
    pub ahead: Option<u64>,
    /// Places in line not yet reached, the fan's included.
    pub waiting: u64,
    /// Fans admitted so far.
    pub admitted: u64,
    /// The estimated wait until admission, ms, from the measured admission rate.
    pub eta_ms: Option<i64>,
    /// Every code left is spoken for by passes; a place can only come when one lapses.
    pub standby: bool,
    /// When this fan joined.
    pub joined_at: Option<String>,
    /// When this fan was admitted.
    pub admitted_at: Option<String>,
    /// When this fan's pass expires.
    pub pass_expires_at: Option<String>,
    /// When joining opens.
    pub opens_at: String,
    /// When the order is drawn.
    pub shuffle_at: String,
    /// SHA-256 of the draw's seed, published before the room opens.
    pub commitment: String,
    /// The seed, once the order is drawn.
    pub seed: Option<String>,
    /// Places this account may still take here (one is taken by each join
    /// after being passed over; see [`MAX_PLACES_PER_ACCOUNT`]): with none
    /// left, being passed over is final. In a lottery, one entry, before
    /// the draw.
    pub places_left: u32,
}

impl QueueStatus {
    /// Nothing more can come of waiting: the fan's stream ends and the
    /// page stops following. Passed over is final in a lottery (no entry
    /// after its draw, the only time a lottery passes anybody over) and
    /// for an account with no place left to take; a queue's fan may join
    /// again at the back.
    pub fn nothing_to_wait_for(&self) -> bool {
        match self.state {
            PlaceState::SoldOut
            | PlaceState::Ended
            | PlaceState::EntriesClosed
            | PlaceState::NotJoined
            | PlaceState::Done => true,
            PlaceState::PassedOver => self.mode == AdmissionMode::Lottery || self.places_left == 0,
            PlaceState::Waiting | PlaceState::Admitted => false,
        }
    }
}

/// Room-wide figures (metrics, the admin page, reports).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomSummary {
    /// Places ever taken (a rejoin counts again).
    pub joined: u64,
    /// Places not yet reached.
    pub waiting: u64,
    /// Fans admitted.
    pub admitted: u64,
    /// Places skipped because their fan had gone.
    pub abandoned: u64,
    /// Passes that expired unused.
    pub expired: u64,
    /// Admissions per second over the last ten seconds.
    pub admit_rate: f64,
    /// The shuffle has happened.
    pub shuffled: bool,
    /// The room has closed.
    pub closed: bool,
    /// Nobody can claim through it any more: closed, or a lottery that has
    /// reached every place it drew with no pass still out.
    pub admits_no_more: bool,
}

/// What the admitter needs to know about the stock.
#[derive(Debug, Clone, Copy)]
pub struct StockView {
    /// Codes not yet claimed.
    pub remaining: usize,
    /// No code is being committed (so `remaining == 0` is final).
    pub settled: bool,
}

/// How a join stands with the room's entry rules ([`Room::entry`](super::room::Room::entry)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// The fan holds a place: joining again keeps it.
    Held,
    /// A new place, at the back.
    New,
    /// A new place at the back for a queue's fan whose place was passed
    /// over (skipped while away, or admitted and the pass lapsed unused).
    Again {
        /// When the lapsed pass expired, Unix ms: a shared room checks that
        /// this is the admission it holds.
        lapsed_pass_ms: Option<i64>,
    },
}

/// Where a replica stands in its shared log ([`Room::base`](super::room::Room::base)).
#[derive(Debug, Clone)]
pub struct Base {
    /// Entries applied.
    pub applied: u64,
    /// The last of them, as the log holds it (its text).
    pub last: Option<String>,
    /// Rebuilds so far.
    pub(super) generation: u64,
}

impl Base {
    /// `applied` entries read, the last of them `last` (for a tool that
    /// plans from a log it read itself).
    pub fn at(applied: u64, last: Option<String>) -> Base {
        Base {
            applied,
            last,
            generation: 0,
        }
    }
}

pub(super) struct RoomState {
    pub(super) settings: RoomSettings,
    pub(super) places: HashMap<u64, Place, ahash::RandomState>,
    /// Before the shuffle: joiners in join order; after: the drawn order,
    /// then later arrivals in arrival order.
    pub(super) order: Vec<u64>,
    /// How many joined before the shuffle (the drawn part of `order`).
    pub(super) drawn: usize,
    pub(super) shuffled_ms: Option<i64>,
    /// How the room admitted when it drew, as its log says.
    pub(super) drawn_as: Option<AdmissionMode>,
    /// Places reached (admitted or skipped).
    pub(super) cursor: usize,
    /// Passes that may still claim: (user, expiry).
    pub(super) active: VecDeque<(u64, i64)>,
    /// Recent admission times, for the measured rate.
    pub(super) recent: VecDeque<i64>,
    pub(super) allowance: f64,
    pub(super) last_tick_ms: i64,
    /// Codes left minus those spoken for by passes, at the last admission
    /// step; before the start, the codes left (none before the first step).
    pub(super) budget: Option<usize>,
    /// `budget` was read before the start: what the start's admissions
    /// will share, not what is left after them.
    pub(super) budget_before_start: bool,
    pub(super) closed_ms: Option<i64>,
    /// Since when the sale is paused, as the log says ([`Event::Pause`]).
    pub(super) paused_ms: Option<i64>,
    pub(super) summary: RoomSummary,
    /// Shared rooms: entries of the shared log applied.
    pub(super) applied: u64,
    /// Shared rooms: the last of them as the log holds it (its text, so
    /// a line of another version compares as written), which the next
    /// read must start with ([`Room::follow_shared`](super::room::Room::follow_shared)).
    pub(super) last_line: Option<String>,
    /// Shared rooms: rebuilds so far ([`Room::rebuild_shared`](super::room::Room::rebuild_shared)).
    pub(super) generation: u64,
    /// Shared rooms: when the last read of the shared log this replica
    /// applied began (0: none yet).
    pub(super) read_ms: i64,
    /// Shared rooms: a step could not reach the shared log since the last
    /// that did ([`Room::regrace_if_back`](super::room::Room::regrace_if_back)).
    pub(super) regrace_due: bool,
    /// Shared rooms: check-ins here since the last flush.
    pub(super) seen_here: HashMap<u64, i64, ahash::RandomState>,
}

impl RoomState {
    /// Places still waiting to be reached: none once the room has closed,
    /// whose fans are told it is over. The places past the cursor stay in
    /// the order, and were counted as waiting for good: a sold-out
    /// lottery's `/act/detail`, `/queue/status` and
    /// `ticketd_queue_waiting` all showed fans waiting for nothing.
    pub(super) fn waiting(&self) -> u64 {
        match self.closed_ms {
            Some(_) => 0,
            None => self.order.len().saturating_sub(self.cursor) as u64,
        }
    }

    /// Nobody can claim through this room any more, codes left or not:
    /// it has closed (sold out, or the sale ended), or it is a lottery that
    /// has reached every place it drew with no pass still out — it takes no
    /// entry after its draw, so nobody is left to admit. Such a lottery
    /// stays open until its end (its codes are not sold out, and its
    /// entrants are told they were passed over), and showed fans an open
    /// sale with codes left. A replica that has not retired a pass yet
    /// (claimed through another node) says so once the pass lapses.
    pub(super) fn admits_no_more(&self) -> bool {
        self.closed_ms.is_some()
            || (self.settings.mode == AdmissionMode::Lottery
                && self.shuffled_ms.is_some()
                && self.cursor >= self.order.len()
                && self.active.is_empty())
    }

    pub(super) fn base(&self) -> Base {
        Base {
            applied: self.applied,
            last: self.last_line.clone(),
            generation: self.generation,
        }
    }

    pub(super) fn new(settings: RoomSettings) -> RoomState {
        RoomState {
            settings,
            places: HashMap::default(),
            order: Vec::new(),
            drawn: 0,
            shuffled_ms: None,
            drawn_as: None,
            cursor: 0,
            active: VecDeque::new(),
            recent: VecDeque::new(),
            allowance: 0.0,
            last_tick_ms: 0,
            budget: None,
            budget_before_start: false,
            closed_ms: None,
            paused_ms: None,
            summary: RoomSummary::default(),
            applied: 0,
            last_line: None,
            generation: 0,
            read_ms: 0,
            regrace_due: false,
            seen_here: HashMap::default(),
        }
    }

    pub(super) fn draw_record(&self, activity: &str, seed: &Seed) -> Option<DrawRecord> {
        let shuffled_ms = self.shuffled_ms?;
        let drawn = &self.order[..self.drawn];
        let mut entrants = drawn.to_vec();
        entrants.sort_unstable();
        Some(DrawRecord {
            format: draw::FORMAT.into(),
            activity: activity.to_owned(),
            commitment: seed.commitment(),
            seed: seed.to_hex(),
            shuffled_at: rfc3339_ms(shuffled_ms),
            entrants,
            order: drawn.to_vec(),
            late: self.order[self.drawn..].to_vec(),
            // As drawn; unknown in a log of an earlier version (the export
            // then says what the activity's definition says).
            admission: self.drawn_as,
        })
    }

    /// Shared rooms: `user` was here at `at`, for the next flush (the
    /// later time stands; past [`MAX_SEEN_BUFFER`] fans, new ones wait).
    pub(super) fn note_seen(&mut self, user: u64, at: i64) {
        if self.seen_here.len() < MAX_SEEN_BUFFER || self.seen_here.contains_key(&user) {
            let kept = self.seen_here.entry(user).or_insert(at);
            *kept = (*kept).max(at);
        }
    }

    /// The entry rules, in one place for a room of its own and a shared one.
    pub(super) fn entry(&self, user: u64, now: i64) -> Result<Entry, JoinError> {
        let s = &self.settings;
        if now < s.opens_ms {
            return Err(JoinError::NotOpen { opens_ms: s.opens_ms });
        }
        if self.closed_ms.is_some() || now >= s.end_ms {
            return Err(JoinError::Closed);
        }
        // Entries close at the draw time itself, not at the admitter's step
        // that draws (up to a step later): a join in between would be drawn.
        let drawn = self.shuffled_ms.is_some();
        let lottery_closed = s.mode == AdmissionMode::Lottery && (drawn || now >= s.shuffle_ms);
        match self.places.get(&user) {
            Some(p) if p.state != PlaceState::PassedOver => Ok(Entry::Held),
            // A lottery's lapsed pass is not a way back in: no entry is
            // taken after the draw.
            _ if lottery_closed => Err(JoinError::EntriesClosed),
            Some(p) if p.taken >= MAX_PLACES_PER_ACCOUNT => Err(JoinError::NoMorePlaces),
            Some(p) => Ok(Entry::Again {
                lapsed_pass_ms: (p.pass_expires_ms > 0).then_some(p.pass_expires_ms),
            }),
            // A queue being drawn takes no new place until it is drawn.
            None if !drawn && now >= s.shuffle_ms => Err(JoinError::Drawing),
            None => Ok(Entry::New),
        }
    }

    pub(super) fn apply_join(&mut self, user: u64, now: i64) {
        // Joining again (passed over, or a lapsed pass this replica has not
        // retired yet) starts over at the back: the old pass no longer
        // speaks for a code, and must not retire the new place.
        let mut taken = 1;
        if let Some(old) = self.places.get(&user) {
            if old.state == PlaceState::Admitted {
                self.summary.expired += 1;
            }
            self.active.retain(|&(u, _)| u != user);
            taken = old.taken.saturating_add(1);
        }
        let index = self.order.len() as u32;
        self.order.push(user);
        self.summary.joined += 1;
        self.places.insert(
            user,
            Place {
                joined_ms: now,
                seen_ms: now,
                index,
                state: PlaceState::Waiting,
                admitted_ms: 0,
                pass_expires_ms: 0,
                admit_seq: 0,
                join_seq: 0,
                taken,
            },
        );
    }

    pub(super) fn apply_shuffle(&mut self, seed: &Seed, now: i64) {
        let drawn = draw::shuffle(seed, &self.order);
        for (i, user) in drawn.iter().enumerate() {
            if let Some(p) = self.places.get_mut(user) {
                p.index = i as u32;
            }
        }
        self.drawn = drawn.len();
        self.order = drawn;
        self.shuffled_ms = Some(now);
    }

    /// Whether `user` holds the next place: an Admit or Skip that does not
    /// (a damaged log) is ignored rather than moving the cursor off the order.
    pub(super) fn is_next(&self, user: u64) -> bool {
        let next = self.order.get(self.cursor) == Some(&user);
        if !next {
            tracing::warn!(
                user,
                cursor = self.cursor,
                "A waiting room's log names someone not next in line; entry ignored."
            );
        }
        next
    }

    pub(super) fn apply_admit(&mut self, user: u64, now: i64, expires: i64) {
        if !self.is_next(user) {
            return;
        }
        self.cursor += 1;
        self.summary.admitted += 1;
        self.active.push_back((user, expires));
        self.recent.push_back(now);
        if self.recent.len() > 4096 {
            self.recent.pop_front();
        }
        if let Some(p) = self.places.get_mut(&user) {
            p.state = PlaceState::Admitted;
            p.admitted_ms = now;
            p.pass_expires_ms = expires;
        }
    }

    pub(super) fn apply_skip(&mut self, user: u64) {
        if !self.is_next(user) {
            return;
        }
        self.cursor += 1;
        self.summary.abandoned += 1;
        if let Some(p) = self.places.get_mut(&user) {
            p.state = PlaceState::PassedOver;
        }
    }

    pub(super) fn replay(&mut self, seed: &Seed, event: &Event) {
        match *event {
            Event::Seed { .. } => {}
            Event::Join { u, t } => self.apply_join(u, t),
            Event::Shuffle { t, m } => {
                self.drawn_as = m;
                // A drawn room admits as it drew. (One node's log refuses
                // another mode at its start: `Room::open`. A cluster's
                // replica, started with another, follows the room.)
                if let Some(m) = m.filter(|m| *m != self.settings.mode) {
                    // (Not said by a tool reading the log.)
                    if self.settings != RoomSettings::placeholder() {
                        tracing::warn!(drawn_as = %m, config = %self.settings.mode, "The waiting room drew as another admission than the config says; it admits as it drew. Set admission back.");
                    }
                    self.settings.mode = m;
                }
                self.apply_shuffle(seed, t);
            }
            Event::Admit { u, t, x } => self.apply_admit(u, t, x),
            Event::Skip { u, .. } => self.apply_skip(u),
            Event::Close { t } => self.closed_ms = Some(t),
            Event::Pause { t } => self.paused_ms = Some(t),
            Event::Extend { u, x } => self.apply_extend(u, x),
            Event::Resume { t } => {
                self.paused_ms = None;
                self.places.values_mut().for_each(|p| p.seen_ms = p.seen_ms.max(t));
            }
            Event::Unknown => {}
        }
    }

    pub(super) fn apply_extend(&mut self, user: u64, expires: i64) {
        if let Some(pass) = self.active.iter_mut().find(|(u, _)| *u == user) {
            pass.1 = expires;
            if let Some(p) = self.places.get_mut(&user) {
                p.pass_expires_ms = expires;
            }
            return;
        }
        // A replica that had not seen the pause yet may have retired the
        // pass on its own (replicas retire lapsed passes without a log
        // line): the pass the admitter gave the paused time back to is
        // that fan's again, here as on every node. The next step decides
        // again from the fan's claims. (Not a place taken since: a fan who
        // joined again waits in a new one.)
        let Some(p) = self.places.get_mut(&user) else { return };
        let retired = matches!(p.state, PlaceState::PassedOver | PlaceState::Done);
        if retired && p.admitted_ms > 0 && expires > p.pass_expires_ms {
            if p.state == PlaceState::PassedOver {
                self.summary.expired = self.summary.expired.saturating_sub(1);
            }
            p.state = PlaceState::Admitted;
            p.pass_expires_ms = expires;
            self.active.push_back((user, expires));
        }
    }

    /// When the node went down (`alive`, its last sign of life), if it was
    /// down long enough to count and passes were running then that a pause
    /// from that moment would give time back to: the sale open, not paused,
    /// not over.
    pub(super) fn downtime_since(&self, alive: i64, now: i64) -> Option<i64> {
        // Marks come about once a second: a gap of under two is a restart
        // the marks cannot tell from running on.
        let down = now.saturating_sub(alive) >= 2 * ALIVE_EVERY_MS;
        let running = self.closed_ms.is_none() && self.paused_ms.is_none() && now < self.settings.end_ms;
        let held = self.active.iter().any(|&(_, expires)| expires > alive);
        (down && running && held).then_some(alive)
    }

    /// The pause's events at `now`, if the sale was paused or resumed since
    /// the last step: `Some` (maybe empty) means this step does nothing else.
    /// On resume, every pass that was valid when the pause began gets the
    /// paused time back (an `Extend` each, after the `Resume`: a shared log
    /// takes them only with the resume they belong to).
    pub(super) fn pause_step(&self, now: i64) -> Option<Vec<Event>> {
        match (self.settings.paused, self.paused_ms) {
            (true, None) => Some(vec![Event::Pause { t: now }]),
            (true, Some(_)) => Some(Vec::new()),
            (false, Some(since)) => {
                let paused_for = now.saturating_sub(since).max(0);
                let extended = self
                    .active
                    .iter()
                    .filter(|&&(_, x)| x > since)
                    .map(|&(u, x)| Event::Extend {
                        u,
                        x: x.saturating_add(paused_for),
                    });
                Some(std::iter::once(Event::Resume { t: now }).chain(extended).collect())
            }
            (false, None) => None,
        }
    }

    /// Admissions per second over the last window, once there is a window's worth.
    pub(super) fn measured_rate(&self, now: i64) -> Option<f64> {
        let first = *self.recent.front()?;
        let since = now.saturating_sub(first).min(RATE_WINDOW_MS);
        if since < 1_000 {
            return None;
        }
        let n = self.recent.iter().rev().take_while(|&&t| t > now - since).count();
        Some(n as f64 * 1000.0 / since as f64)
    }

    /// The next events of the admitter at `now`, without applying them:
    /// the shuffle when due (alone: admissions follow on the next step, on
    /// the drawn order); the close when nothing is left or the sale ended;
    /// else admissions and skips from the cursor, as the rate and the codes
    /// no pass speaks for allow. Passes used up, or expired by `settled`
    /// (the time by which every claim made with a pass has shown in
    /// `claimed`), are retired here (each replica does that itself; it is
    /// not logged). A place counts as
    /// seen at the latest of its local check-in and `seen_elsewhere` (other
    /// nodes' check-ins, in a cluster); `max_steps` bounds the places looked at.
    ///
    /// `stock` is read again after every `claimed`: a claim takes its code
    /// from the pool before the ledger shows it, so in this order a claim
    /// ending meanwhile counts at worst as an unused pass *and* a code gone
    /// (one admission fewer, for one step). Read before, its code counted
    /// as in stock while its pass counted as used: one admission beyond the
    /// stock, and a fan with a pass heard SOLD_OUT.
    pub(super) fn plan(
        &mut self,
        now: i64,
        settled: i64,
        stock: &dyn Fn() -> StockView,
        claimed: &dyn Fn(u64) -> u32,
        seen_elsewhere: &dyn Fn(u64) -> Option<i64>,
        max_steps: usize,
    ) -> Vec<Event> {
        let elapsed = now.saturating_sub(self.last_tick_ms).max(0);
        self.last_tick_ms = now;
        if self.closed_ms.is_some() {
            // Closed (sold out or ended, for good), no pass can claim
            // more: every pass is over now, Done if it claimed (the fan
            // who took the last code was shown "your turn" and the pass's
            // countdown until it lapsed), else passed over, which a closed
            // room shows as sold out or ended.
            let places = &mut self.places;
            for (user, _) in self.active.drain(..) {
                if let Some(p) = places.get_mut(&user) {
                    p.state = if claimed(user) > 0 {
                        PlaceState::Done
                    } else {
                        PlaceState::PassedOver
                    };
                }
            }
            return Vec::new();
        }
        if now < self.settings.opens_ms {
            return Vec::new();
        }
        if self.shuffled_ms.is_none() && now >= self.settings.shuffle_ms {
            return vec![Event::Shuffle {
                t: now,
                m: Some(self.settings.mode),
            }];
        }
        let before = stock();
        if (before.remaining == 0 && before.settled) || now >= self.settings.end_ms {
            return vec![Event::Close { t: now }];
        }
        if now < self.settings.start_ms {
            // No pass is out before the start: the codes left are what the
            // start's admissions share, and a lottery's status tells its
            // winners from its waiting list by them.
            self.budget = Some(before.remaining);
            self.budget_before_start = true;
            return Vec::new();
        }
        // Paused, nothing moves: a pass retired now would be lost to a fan
        // who could not claim, and a place skipped to one who had no reason
        // to stay.
        if let Some(events) = self.pause_step(now) {
            return events;
        }
        let limit = self.settings.per_user_limit;
        let mut spoken = 0usize;
        let places = &mut self.places;
        let summary = &mut self.summary;
        self.active.retain(|&(user, expires)| {
            let used = claimed(user);
            let keep = used < limit && settled < expires;
            if !keep {
                if let Some(p) = places.get_mut(&user) {
                    if used == 0 {
                        p.state = PlaceState::PassedOver;
                        summary.expired += 1;
                    } else {
                        p.state = PlaceState::Done;
                    }
                }
            } else {
                spoken += (limit - used) as usize;
            }
            keep
        });
        let mut budget = stock().remaining.saturating_sub(spoken);
        self.allowance = match self.settings.mode {
            AdmissionMode::Lottery => f64::INFINITY,
            _ => {
                let rate = self.settings.admit_rate;
                (self.allowance + rate * elapsed as f64 / 1000.0).min(rate.max(1.0))
            }
        };
        let mut events = Vec::new();
        let mut cursor = self.cursor;
        // A pass speaks for `limit` codes. Admitted on fewer than that, a
        // place would share codes with passes already out, and the fastest
        // claimer would take the others' (6 codes, limit 4: two passes for
        // 8). The last codes, fewer than a pass speaks for, go to one more
        // place only once no pass is out: then they are all its own.
        let mut outstanding = !self.active.is_empty();
        let per_pass = limit as usize;
        while budget > 0
            && (budget >= per_pass || !outstanding)
            && self.allowance >= 1.0
            && cursor < self.order.len()
            && events.len() < max_steps
        {
            let user = self.order[cursor];
            cursor += 1;
            let seen = self
                .places
                .get(&user)
                .map(|p| p.seen_ms)
                .max(seen_elsewhere(user))
                .unwrap_or(i64::MIN);
            if now.saturating_sub(seen) > self.settings.grace_ms {
                events.push(Event::Skip { u: user, t: now });
                continue;
            }
            let expires = now.saturating_add(self.settings.pass_ttl_ms);
            events.push(Event::Admit {
                u: user,
                t: now,
                x: expires,
            });
            budget = budget.saturating_sub(per_pass);
            outstanding = true;
            self.allowance -= 1.0;
        }
        // Held back for passes out, the codes left are spoken for (standby).
        // A replica whose log has not yet brought the start's admissions
        // (a follower, stepping none) still knows the stock they share.
        let reached = self.cursor > 0 || !events.is_empty();
        if reached || !self.budget_before_start {
            self.budget = Some(if budget < per_pass && outstanding { 0 } else { budget });
            self.budget_before_start = false;
        }
        events
    }

    pub(super) fn status_of(
        &self,
        activity: &Arc<str>,
        user: u64,
        now: i64,
        seed: &Seed,
        commitment: &str,
        durable: u64,
    ) -> QueueStatus {
        let s = &self.settings;
        let place = self.places.get(&user).filter(|p| p.join_seq <= durable);
        let closed = self.closed_ms.is_some();
        let mut state = place.map_or(PlaceState::NotJoined, |p| p.state);
        let pass_shown = place.is_some_and(|p| p.admission_durable(durable));
        let admission_pending = state == PlaceState::Admitted && !pass_shown;
        if admission_pending {
            // Admitted, but not yet on disk: shown as waiting, with no pass
            // (see `Place::admission_durable`).
            state = PlaceState::Waiting;
        }
        // A pass past its time is retired by the admitter's step once every
        // claim made with it is counted (`RoomState::plan`), which alone knows a lapsed pass (passed over: the fan may join again) from
        // a used one (done); until then it shows as it was (a claim with it
        // is refused QUEUE_PASS_EXPIRED). Calling it done here sent fans
        // whose pass lapsed a final state, with no way back in. A closed
        // room steps no more: there the pass is over.
        if state == PlaceState::Admitted && closed && place.is_some_and(|p| now >= p.pass_expires_ms) {
            state = PlaceState::Done;
        }
        if closed
            && matches!(
                state,
                PlaceState::Waiting | PlaceState::NotJoined | PlaceState::PassedOver
            )
        {
            // Closed at the end time, or because nothing was left.
            let ended = self.closed_ms.is_some_and(|t| t >= s.end_ms);
            state = if ended { PlaceState::Ended } else { PlaceState::SoldOut };
        } else if state == PlaceState::NotJoined && s.mode == AdmissionMode::Lottery && self.shuffled_ms.is_some() {
            state = PlaceState::EntriesClosed;
        }
        let waiting_place = place.filter(|_| state == PlaceState::Waiting && self.shuffled_ms.is_some());
        let ahead = waiting_place.map(|p| (p.index as usize).saturating_sub(self.cursor) as u64);
        // Standby is news for those still in line. Not for a fan whose
        // admission only waits for the disk: it took the code that left
        // nothing to admit, and is about to see its pass.
        //
        // A lottery's waiting list is on standby from the draw: the start
        // admits only the places the stock covers (told by the admitter's
        // last step). Before, every place drawn heard "your turn at the
        // start", the losers' as the winners'.
        let per_pass = s.per_user_limit.max(1) as usize;
        let places_covered = |budget: usize| match budget {
            b if b >= per_pass => b / per_pass,
            // The last codes, fewer than a pass speaks for, go to the first place.
            b => usize::from(b > 0),
        };
        let standby = state == PlaceState::Waiting
            && !admission_pending
            && !closed
            && self.shuffled_ms.is_some()
            && match self.budget {
                // Until the start's admissions run (a step, a pause across
                // the start, a follower's catch-up), judged as before it:
                // the waiting list flickered off and on at the start.
                Some(budget) if self.budget_before_start => {
                    s.mode == AdmissionMode::Lottery
                        && ahead.is_some_and(|ahead| ahead as usize >= places_covered(budget))
                }
                Some(budget) => now >= s.start_ms && budget == 0,
                None => false,
            };
        // On standby the wait depends on passes lapsing, not on a rate.
        let eta_ms = ahead.filter(|_| !standby).and_then(|ahead| {
            let until_start = s.start_ms.saturating_sub(now).max(0);
            match (self.measured_rate(now), s.mode) {
                (Some(rate), _) if rate > 0.0 => Some(until_start + (ahead as f64 * 1000.0 / rate) as i64),
                (_, AdmissionMode::Queue) => Some(until_start + (ahead as f64 * 1000.0 / s.admit_rate) as i64),
                // A lottery admits as far as the stock goes at once; beyond
                // that, only lapsing passes make room, and when is unknown.
                _ => (now < s.start_ms).then_some(until_start),
            }
        });
        // A pass that lapsed (Done) was admitted on disk and stays shown.
        let admitted = place.filter(|p| p.admitted_ms > 0 && p.admit_seq <= durable);
        QueueStatus {
            act_id: activity.to_string(),
            mode: s.mode,
            state,
            position: ahead.map(|a| a + 1),
            ahead,
            waiting: self.waiting(),
            admitted: self.summary.admitted,
            eta_ms,
            standby,
            joined_at: place.map(|p| rfc3339_ms(p.joined_ms)),
            admitted_at: admitted.map(|p| rfc3339_ms(p.admitted_ms)),
            pass_expires_at: admitted.map(|p| rfc3339_ms(p.pass_expires_ms)),
            opens_at: rfc3339_ms(s.opens_ms),
            shuffle_at: rfc3339_ms(s.shuffle_ms),
            commitment: commitment.to_owned(),
            seed: self.shuffled_ms.map(|_| seed.to_hex()),
            // A lottery takes one entry per account, and none after its
            // draw: it said 7 places left to fans who could take none.
            places_left: match s.mode {
                AdmissionMode::Lottery if place.is_some() || self.shuffled_ms.is_some() => 0,
                AdmissionMode::Lottery => 1,
                _ => MAX_PLACES_PER_ACCOUNT.saturating_sub(place.map_or(0, |p| p.taken)),
            },
        }
    }
}
