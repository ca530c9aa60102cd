//! A room's log: what happened in a waiting room, one JSON line per event,
//! appended and fsynced before anyone is told (group commit: concurrent
//! joins share one write and one fsync).
//!
//! Replaying the log rebuilds the room exactly: the seed first, then joins,
//! the shuffle (whose order is recomputed from the seed), admissions and
//! skips in queue order, the close. A torn last line (a crash mid-write) is
//! ignored; it was never acknowledged.

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
}

/// The append side of a room's log.
pub struct RoomLog {
    path: PathBuf,
    file: Arc<File>,
    /// Lines appended in memory and not yet written, and the sequence number of the last.
    pending: Mutex<(Vec<u8>, u64)>,
    /// The sequence number of the last line written and fsynced.
    synced: AtomicU64,
    /// One writer at a time; the others wait and usually find their line written.
    writing: tokio::sync::Mutex<()>,
    failed: AtomicBool,
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
            path: path.to_owned(),
            file: Arc::new(file),
            pending: Mutex::new((Vec::new(), 0)),
            synced: AtomicU64::new(0),
            writing: tokio::sync::Mutex::new(()),
            failed: AtomicBool::new(false),
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event` in memory; returns its sequence number for
    /// [`RoomLog::sync`]. Call it under the room's lock, so that the log's
    /// order is the room's.
    pub fn append(&self, event: &Event) -> u64 {
        let mut pending = self.pending.lock();
        serde_json::to_writer(&mut pending.0, event).expect("events serialise");
        pending.0.push(b'\n');
        pending.1 += 1;
        pending.1
    }

    /// Returns once every line up to `seq` is on disk.
    pub async fn sync(&self, seq: u64) -> io::Result<()> {
        loop {
            if self.failed.load(Ordering::Acquire) {
                return Err(io::Error::other(
                    "the room's log could not be written; restart the node",
                ));
            }
            if self.synced.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            let _turn = self.writing.lock().await;
            if self.synced.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            let (bytes, upto) = {
                let mut pending = self.pending.lock();
                (std::mem::take(&mut pending.0), pending.1)
            };
            let file = self.file.clone();
            let written = tokio::task::spawn_blocking(move || -> io::Result<()> {
                (&*file).write_all(&bytes)?;
                file.sync_data()
            })
            .await
            .map_err(io::Error::other)
            .and_then(|r| r);
            if let Err(e) = written {
                // A half-written batch would leave the file and memory apart;
                // the room stops acknowledging until a restart replays the file.
                self.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, path = %self.path.display(), "Cannot write a waiting room's log.");
                return Err(e);
            }
            self.synced.store(upto, Ordering::Release);
        }
    }

    /// [`RoomLog::sync`] from a thread outside the runtime (start-up).
    pub fn sync_now(&self) -> io::Result<()> {
        let bytes = {
            let mut pending = self.pending.lock();
            let upto = pending.1;
            let bytes = std::mem::take(&mut pending.0);
            self.synced.store(upto, Ordering::Release);
            bytes
        };
        (&*self.file).write_all(&bytes)?;
        self.file.sync_data()
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
