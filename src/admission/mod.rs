//! Fair admission: the waiting room and the lottery (抽签).
//!
//! In a race the fastest requests after the start win, so the fastest
//! scripts take the stock. An activity with `admission = "queue"` or
//! `"lottery"` instead has a [`Room`]: fans join from `queue_opens`; at the
//! shuffle (the start for a queue, `draw_time` for a lottery) everyone who
//! joined is put in a random order that anyone can recompute afterwards
//! ([`draw`]); then places are admitted — at `admit_rate` in a queue, as far
//! as the stock goes in a lottery — and an admitted fan gets a pass, the
//! only claim token such an activity accepts. Arriving early or firing fast
//! buys nothing: every joiner before the shuffle has the same chance.
//!
//! Admission never runs ahead of the stock: a pass speaks for the codes
//! its holder may still claim, and places are admitted only while codes
//! are left that no pass speaks for. A pass that lapses unused frees its
//! codes for the next place; when the last code is claimed the room closes
//! and everyone still waiting is told at once.
//!
//! A place belongs to a fan who is still there: one seen (a status request
//! or an open event stream) within `grace` when their place comes is
//! admitted; one who is not is skipped, and may join again at the back (up
//! to [`state::MAX_PLACES_PER_ACCOUNT`] places in all).
//!
//! # Layout
//! - [`draw`]: the seed, its commitment, the shuffle, the exported record;
//! - [`log`]: each room's append-only log (group-committed; replayed at start);
//! - [`state`]: what a room is (places, order, passes) and what each event
//!   of its log does to it, the admitter's plan and a fan's view; no I/O;
//! - [`room`]: one room: that state behind its mutex, fed by its log file
//!   or a cluster's shared log, and its admission step;
//! - `alive`: a room's sign of life on disk, for the time a restart gives back;
//! - [`report`]: what a room's log says after the sale (`ticketd report`).

mod alive;
pub mod draw;
pub mod log;
pub mod report;
pub mod room;
pub mod state;

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
};

use parking_lot::Mutex;

use draw::Seed;

pub use log::Past;
pub use room::Room;
pub use state::{Entry, JoinError, PlaceState, QueueStatus, RoomSettings, RoomSummary, StockView};

/// The lotteries in `config` whose draw has passed and that nobody has
/// entered (`untouched`: no room, no log): each would draw nobody at once
/// and take no entry after, and a drawn room's admission cannot change, so
/// the activity could never sell again. An operator's reload refuses them,
/// and so does a cluster's `ticketd import` (whose nodes would take them
/// as they are). Not a start: a node that was down across an empty
/// lottery's draw draws it late, as it is, rather than not starting at all.
pub fn late_lotteries(
    config: &crate::config::Config,
    node_start_ms: i64,
    untouched: impl Fn(&str) -> bool,
) -> Vec<String> {
    let now = crate::clock::now_ms();
    config
        .activities
        .iter()
        .filter_map(|a| {
            let s = RoomSettings::of(a, node_start_ms)?;
            let late = s.mode == crate::config::AdmissionMode::Lottery && s.shuffle_ms <= now;
            (late && untouched(&a.id)).then(|| {
                format!(
                    "activity `{}`: its lottery's draw_time ({}) has passed and nobody has entered it: it would draw \
                     nobody at once and take no entry after; set draw_time (and start_time) later",
                    a.id,
                    crate::clock::rfc3339_ms(s.shuffle_ms)
                )
            })
        })
        .collect()
}

/// Where a cluster's rooms keep their logs (the store's Redis): what a node
/// asks of a room's log before it holds a replica of it.
pub trait SharedLogs: Send + Sync {
    /// The room's seed, the same on every node (the first to ask sets it).
    fn seed(&self, activity: &str) -> io::Result<Seed>;
    /// What the room's log says of its past (see [`log::past`]): drawn as
    /// a mode, opened, or untouched.
    fn past(&self, activity: &str) -> io::Result<Past>;
}

/// Event streams one account may hold open on a node at once (a fan with
/// a few tabs). Each holds a connection for minutes: without a cap one
/// account could hold the node's whole stream budget.
pub const MAX_STREAMS_PER_USER: u32 = 4;

/// Why an event stream was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRefused {
    /// The account holds [`MAX_STREAMS_PER_USER`] already.
    Account,
    /// The node holds its whole stream budget (see [`Rooms::with_stream_budget`]).
    Node,
}

/// Whether [`Rooms::room`] opened the room or found it open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// By this call (a snapshot refused later forgets it).
    Now,
    /// Before.
    Before,
}

/// Every waiting room on the node, by activity; rooms live across reloads.
pub struct Rooms {
    dir: PathBuf,
    /// Set in a cluster: rooms are replicas of logs kept in the store.
    shared: Option<Box<dyn SharedLogs>>,
    rooms: Mutex<HashMap<Arc<str>, Arc<Room>>>,
    closing: AtomicBool,
    /// Open event streams per account (only accounts with one: bounded by
    /// the stream budget).
    streams: Mutex<HashMap<u64, u32>>,
    /// Open event streams in all (the sum of `streams`), read without the
    /// lock by the listener for every connection it accepts.
    open_streams: AtomicUsize,
    /// At most this many at once.
    max_streams: usize,
}

/// One open event stream of an account; closing it (dropping this) gives
/// the place back.
pub struct StreamSlot {
    rooms: Arc<Rooms>,
    user: u64,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.rooms.streams.lock();
        if let Some(n) = streams.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&self.user);
            }
        }
        self.rooms.open_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Rooms {
    /// Rooms whose logs live in `dir` (created when the first room opens).
    pub fn new(dir: &Path) -> Rooms {
        Rooms {
            dir: dir.to_owned(),
            shared: None,
            rooms: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            streams: Mutex::new(HashMap::new()),
            open_streams: AtomicUsize::new(0),
            max_streams: usize::MAX,
        }
    }

    /// Rooms that are replicas of logs kept in a cluster's store, each
    /// in `logs` (the same on every node).
    pub fn shared(logs: Box<dyn SharedLogs>) -> Rooms {
        Rooms {
            dir: PathBuf::new(),
            shared: Some(logs),
            rooms: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            streams: Mutex::new(HashMap::new()),
            open_streams: AtomicUsize::new(0),
            max_streams: usize::MAX,
        }
    }

    /// At most `max` event streams open at once. A connection that holds
    /// one does not count against `server.max_connections` (the listener
    /// takes [`Rooms::open_streams`] off its count): waiting fans' streams,
    /// each open for as long as the wait, would otherwise fill the budget
    /// that the claims they wait for need.
    pub fn with_stream_budget(mut self, max: usize) -> Rooms {
        self.max_streams = max;
        self
    }

    /// Event streams open now.
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Acquire)
    }

    /// A place for one more event stream of `user`.
    pub fn open_stream(self: &Arc<Self>, user: u64) -> Result<StreamSlot, StreamRefused> {
        let mut streams = self.streams.lock();
        if self.open_streams.load(Ordering::Acquire) >= self.max_streams {
            return Err(StreamRefused::Node);
        }
        let n = streams.entry(user).or_insert(0);
        if *n >= MAX_STREAMS_PER_USER {
            return Err(StreamRefused::Account);
        }
        *n += 1;
        // Under the lock, so the budget holds exactly.
        self.open_streams.fetch_add(1, Ordering::AcqRel);
        Ok(StreamSlot {
            rooms: self.clone(),
            user,
        })
    }

    /// The directory of the rooms' logs under a data directory.
    pub fn dir_in(data_dir: &Path) -> PathBuf {
        data_dir.join("rooms")
    }

    /// The room of `activity`, opened (its log replayed) with `settings` on
    /// first use; an open room keeps its settings until they are applied
    /// ([`Room::apply`]), so a reload that is refused later changes nothing.
    pub fn room(&self, activity: &Arc<str>, settings: RoomSettings) -> io::Result<(Arc<Room>, Opened)> {
        if let Some(room) = self.rooms.lock().get(activity) {
            return Ok((room.clone(), Opened::Before));
        }
        // A shared room's seed is read (or written, and confirmed by the
        // replicas: up to `cluster.commit_timeout`) before the lock is
        // taken, which `/healthz`, `/metrics` and the watchdog wait on.
        let seed = match &self.shared {
            Some(logs) => Some(logs.seed(activity)?),
            None => None,
        };
        let mut rooms = self.rooms.lock();
        if let Some(room) = rooms.get(activity) {
            return Ok((room.clone(), Opened::Before));
        }
        let room = Arc::new(match seed {
            Some(seed) => Room::shared(activity.clone(), settings, seed),
            None => {
                if !self.dir.exists() {
                    std::fs::create_dir_all(&self.dir)?;
                    // Made durable as the room logs in it are.
                    if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                        std::fs::File::open(parent)?.sync_all()?;
                    }
                }
                Room::open(&self.dir, activity.clone(), settings)?
            }
        });
        rooms.insert(activity.clone(), room.clone());
        Ok((room, Opened::Now))
    }

    /// What the log of `activity`'s room says of its past: a config that
    /// makes the activity a race, or takes its `queue_opens` away, opens
    /// no room, so the room's own checks never ran. One node reads its log
    /// on disk (a log it cannot read counts as none here); a cluster's
    /// node asks Redis, and says when it cannot.
    pub fn past(&self, activity: &str) -> io::Result<Past> {
        if let Some(logs) = &self.shared {
            return logs.past(activity);
        }
        let path = self.dir.join(format!("{activity}.log"));
        Ok(match log::read(&path) {
            Ok(Some((events, _))) => log::past(&events),
            Ok(None) | Err(_) => Past::Untouched,
        })
    }

    /// Drops the room of `activity` (no longer a queue, and never opened).
    pub fn forget(&self, activity: &str) {
        self.rooms.lock().remove(activity);
    }

    /// The room of `activity`, if it has one.
    pub fn get(&self, activity: &str) -> Option<Arc<Room>> {
        self.rooms.lock().get(activity).cloned()
    }

    /// The activity of a room whose log failed a write, if any: that room
    /// stands still until a restart, so the node is not healthy
    /// (`/healthz`, the watchdog), as with a failed claim journal.
    pub fn failed_log(&self) -> Option<Arc<str>> {
        self.rooms
            .lock()
            .values()
            .find(|r| r.log_failed())
            .map(|r| r.activity.clone())
    }

    /// Every room.
    pub fn all(&self) -> Vec<Arc<Room>> {
        self.rooms.lock().values().cloned().collect()
    }

    /// Shutdown has begun: event streams end, so connections can drain.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// Whether shutdown has begun.
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
}
