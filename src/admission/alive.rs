//! A waiting room's sign of life on disk (`<activity>.alive`): when this
//! node last ran the room's step, so a start knows how long it was down.

use std::{io, path::Path};

/// When this node last ran a room's step: `<activity>.alive` beside the
/// room's log, eight bytes (Unix ms) rewritten about once a second and
/// never synced. A start reads it to learn how long the node was down:
/// passes ran out meanwhile while nobody could claim, and get that time
/// back (see [`RoomState::downtime_since`](super::state::RoomState::downtime_since)). A mark older than the log's
/// last event (lost or zeroed in a power cut, or left by an earlier room)
/// counts from that event instead: the node was up then.
pub(super) struct Alive {
    file: std::fs::File,
    written_ms: std::sync::atomic::AtomicI64,
}

impl Alive {
    pub(super) fn path(dir: &Path, activity: &str) -> std::path::PathBuf {
        dir.join(format!("{activity}.alive"))
    }

    /// The last mark at `path`, if there is a whole one.
    pub(super) fn read(path: &Path) -> Option<i64> {
        let bytes = std::fs::read(path).ok()?;
        Some(i64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
    }

    pub(super) fn open(path: &Path) -> io::Result<Alive> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(path)?;
        Ok(Alive {
            file,
            written_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
        })
    }

    /// Marks the room alive at `now`, about once a second (and at once
    /// after the clock stepped back: a mark left in the future would hide
    /// the next downtime). A failed write costs at worst a longer time
    /// given back after a restart.
    pub(super) fn mark(&self, now: i64) {
        use std::{os::unix::fs::FileExt, sync::atomic::Ordering};
        let since = now.saturating_sub(self.written_ms.load(Ordering::Relaxed));
        if (0..ALIVE_EVERY_MS).contains(&since) {
            return;
        }
        self.written_ms.store(now, Ordering::Relaxed);
        let _ = self.file.write_all_at(&now.to_le_bytes(), 0);
    }
}

/// How often a room marks itself alive.
pub(super) const ALIVE_EVERY_MS: i64 = 1_000;
