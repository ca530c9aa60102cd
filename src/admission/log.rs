//! A room's log: what happened in a waiting room, one JSON line per event,
//! appended and fsynced before anyone is told (group commit: concurrent
//! joins share one write and one fsync).
//!
//! Replaying the log rebuilds the room exactly: the seed first, then joins,
//! the shuffle (whose order is recomputed from the seed), admissions and
//! skips in queue order, the close. A torn last line (a crash mid-write) is
//! ignored; it was never acknowledged. A line of a kind this version does
//! not know (a later version's) is passed over ([`Event::Unknown`]).

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::AdmissionMode;

/// One thing that happened in a room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "lowercase")]
pub enum Event {
    /// The room's secret seed (hex): always the first line.
    Seed {
        /// Hex of 32 bytes.
        seed: String,
    },
    /// User `u` joined at `t` (Unix ms).
    Join {
        /// The user.
        u: u64,
        /// When.
        t: i64,
    },
    /// Everyone who joined so far was shuffled at `t`.
    Shuffle {
        /// When.
        t: i64,
        /// How the room admits, as it drew (absent in logs of earlier
        /// versions): a start whose config names another mode is refused,
        /// and the draw's export says this one. (Only a reload was refused:
        /// a restart could turn a drawn lottery into a queue, whose late
        /// arrivals `verify-draw` accepts.)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        m: Option<AdmissionMode>,
    },
    /// The next place, user `u`, was admitted at `t` with a pass until `x`.
    Admit {
        /// The user.
        u: u64,
        /// When.
        t: i64,
        /// The pass's expiry.
        x: i64,
    },
    /// The next place, user `u`, was skipped at `t` (not seen within `grace`).
    Skip {
        /// The user.
        u: u64,
        /// When.
        t: i64,
    },
    /// The room closed at `t`: the stock is gone or the sale ended.
    Close {
        /// When.
        t: i64,
    },
    /// The organiser paused the sale (`paused = true`): from `t` nobody is
    /// admitted, skipped or retired, and no pass runs out.
    Pause {
        /// When.
        t: i64,
    },
    /// A pass valid when the sale was paused now runs until `x`: it gets
    /// back the time the pause took. Logged just after [`Event::Resume`].
    Extend {
        /// The pass holder.
        u: u64,
        /// The pass's new expiry.
        x: i64,
    },
    /// The sale resumed at `t`; every place gets its grace again from `t`
    /// (nobody could buy meanwhile, so nobody is gone for not checking in).
    Resume {
        /// When.
        t: i64,
    },
    /// A kind of line a later version writes. Read, it changes nothing:
    /// during a rolling upgrade an earlier node then still follows the
    /// room (failing to read one line, it stopped at it for good, and a
    /// cluster's room stalled if that node held the admitter lease), and a
    /// later version may add a kind that earlier ones can safely pass over.
    #[serde(other)]
    Unknown,
}

impl Event {
    /// When it happened (Unix ms), for the kinds that say.
    pub fn at(&self) -> Option<i64> {
        match *self {
            Event::Join { t, .. }
            | Event::Shuffle { t, .. }
            | Event::Admit { t, .. }
            | Event::Skip { t, .. }
            | Event::Close { t }
            | Event::Pause { t }
            | Event::Resume { t } => Some(t),
            Event::Seed { .. } | Event::Extend { .. } | Event::Unknown => None,
        }
    }
}

/// How a log's room drew its order, if its shuffle line says (lines of
/// earlier versions do not).
pub fn drawn_as(events: &[Event]) -> Option<AdmissionMode> {
    events.iter().find_map(|e| match e {
        Event::Shuffle { m, .. } => *m,
        _ => None,
    })
}

/// What a room's log says of its past, for a config that would make its
/// activity a race (which opens no room, so the room's own checks never
/// run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Past {
    /// No log, or only its seed: the queue never opened to anyone, and
    /// the activity may still become a race.
    Untouched,
    /// The room has opened (fans joined, or its admitter wrote), its order
    /// not drawn as a mode the log names.
    Opened,
    /// The room drew its order as this mode.
    Drawn(AdmissionMode),
}

/// What `events` (a room's whole log) say of the room's past.
pub fn past(events: &[Event]) -> Past {
    if let Some(mode) = drawn_as(events) {
        return Past::Drawn(mode);
    }
    if events.iter().any(|e| !matches!(e, Event::Seed { .. } | Event::Unknown)) {
        return Past::Opened;
    }
    Past::Untouched
}

/// The append side of a room's log.
pub struct RoomLog {
    inner: Arc<Inner>,
    /// One flush at a time. Its guard is moved into the flush itself, so a
    /// waiter that goes away (a client hanging up) never lets a second flush
    /// overtake one still writing: the log's order is the room's.
    writing: Arc<tokio::sync::Mutex<()>>,
}

struct Inner {
    path: PathBuf,
    file: File,
    /// Lines appended in memory and not yet written, and the sequence number of the last.
    pending: Mutex<(Vec<u8>, u64)>,
    /// The sequence number of the last line written and fsynced.
    synced: AtomicU64,
    failed: AtomicBool,
}

impl Inner {
    /// Writes and fsyncs everything pending. After a failure nothing more is
    /// written (a half-written batch would leave file and memory apart); a
    /// restart replays the file.
    fn flush(&self) {
        if self.failed.load(Ordering::Acquire) {
            return;
        }
        let (bytes, upto) = {
            let mut pending = self.pending.lock();
            (std::mem::take(&mut pending.0), pending.1)
        };
        let written = (&self.file).write_all(&bytes).and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => self.synced.store(upto, Ordering::Release),
            Err(e) => {
                self.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, path = %self.path.display(), "Cannot write a waiting room's log.");
            }
        }
    }
}

impl RoomLog {
    /// Opens (creating) the log at `path` for appending after its first
    /// `len` bytes (what [`read`] found whole; a torn tail is cut off).
    pub fn open(path: &Path, len: u64) -> io::Result<RoomLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        if file.metadata()?.len() != len {
            file.set_len(len)?;
            file.sync_data()?;
        }
        Ok(RoomLog {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                file,
                pending: Mutex::new((Vec::new(), 0)),
                synced: AtomicU64::new(0),
                failed: AtomicBool::new(false),
            }),
            writing: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Whether a write failed: the room then changes nothing until a restart.
    pub fn failed(&self) -> bool {
        self.inner.failed.load(Ordering::Acquire)
    }

    /// The sequence number of the last line on disk (written and fsynced).
    pub fn durable(&self) -> u64 {
        self.inner.synced.load(Ordering::Acquire)
    }

    /// The sequence number of the last line appended (written or not).
    pub fn last_appended(&self) -> u64 {
        self.inner.pending.lock().1
    }

    /// Appends `event` in memory; returns its sequence number for
    /// [`RoomLog::sync`]. Call it under the room's lock, so that the log's
    /// order is the room's.
    pub fn append(&self, event: &Event) -> u64 {
        let mut pending = self.inner.pending.lock();
        serde_json::to_writer(&mut pending.0, event).expect("events serialise");
        pending.0.push(b'\n');
        pending.1 += 1;
        pending.1
    }

    /// Returns once every line up to `seq` is on disk (group commit: one
    /// write and one fsync for everything appended meanwhile).
    pub async fn sync(&self, seq: u64) -> io::Result<()> {
        let inner = &self.inner;
        loop {
            if inner.failed.load(Ordering::Acquire) {
                return Err(io::Error::other(
                    "the room's log could not be written; restart the node",
                ));
            }
            if inner.synced.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            let turn = self.writing.clone().lock_owned().await;
            if inner.synced.load(Ordering::Acquire) >= seq {
                continue;
            }
            let flushing = inner.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let _turn = turn;
                flushing.flush();
            })
            .await;
        }
    }

    /// [`RoomLog::sync`] from a thread outside the runtime (start-up).
    pub fn sync_now(&self) -> io::Result<()> {
        self.inner.flush();
        if self.failed() {
            return Err(io::Error::other("the room's log could not be written"));
        }
        Ok(())
    }
}

/// The events in the log at `path` and the length of the file they fill;
/// a torn last line (no newline yet: it was never acknowledged) is left
/// out. `Ok(None)` when there is no log.
pub fn read(path: &Path) -> io::Result<Option<(Vec<Event>, u64)>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut events = Vec::new();
    let mut good = 0usize;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        if line.last() != Some(&b'\n') {
            break;
        }
        let event = serde_json::from_slice::<Event>(&line[..line.len() - 1]).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: line {}: {e}", path.display(), events.len() + 1),
            )
        })?;
        events.push(event);
        good += line.len();
    }
    Ok(Some((events, good as u64)))
}
