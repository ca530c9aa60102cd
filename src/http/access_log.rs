//! The optional access log: one JSON line per request, written by its own
//! worker thread (`access-log`) so the request path only formats a line and
//! `try_send`s it.
//!
//! Off by default (`[log] access_log`). When the writer falls behind, lines
//! are dropped and counted (`ticketd_access_log_dropped_total`) rather than
//! slowing requests down.
//!
//! The writer follows its path, as `tail -F` does: about once a second it
//! checks that the path still names the file it writes, and if the file
//! was moved or deleted (logrotate's default rotation, an operator's `mv`
//! or `rm`) it opens the path anew. Lines written meanwhile are in the
//! moved file (a deleted one takes them with it), and no signal or
//! `copytruncate` is needed.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::{
    clock::{now_ms, rfc3339_ms},
    metrics,
    worker::{Ctl, Runner},
};

/// A handle for sending lines to the writer.
pub struct AccessLog {
    tx: Sender<String>,
}

impl AccessLog {
    /// Opens (appends to) `path` and starts the writer on `runner`. Stopping
    /// the worker flushes what was sent before.
    pub fn open(path: &Path, runner: &Runner) -> std::io::Result<AccessLog> {
        let out = Followed::open(path.to_owned())?;
        let (tx, rx) = crossbeam_channel::bounded(65_536);
        let closer = tx.clone();
        runner.thread(
            "access-log",
            move |ctl| write_lines(out, rx, &ctl),
            // An empty line is the stop signal: every line sent before it is written.
            move || {
                let _ = closer.send(String::new());
            },
        )?;
        Ok(AccessLog { tx })
    }

    /// Records one answered request. A path is kept to [`MAX_PATH`] bytes
    /// (and the line says `"truncated": true`): a client may send 64 KiB of
    /// one, and the log's queue holds lines, so the log grew one byte per
    /// byte a client sent, and the queue to gigabytes while its writer lagged.
    pub fn record(&self, ip: IpAddr, method: &str, path: &str, status: u16, elapsed: Duration) {
        let (path, truncated) = cut(path, MAX_PATH);
        let (method, _) = cut(method, MAX_METHOD);
        let mut line = serde_json::json!({
            "ts": rfc3339_ms(now_ms()),
            "ip": ip.to_string(),
            "method": method,
            "path": path,
            "status": status,
            "ms": elapsed.as_secs_f64() * 1000.0,
        });
        if truncated {
            line["truncated"] = true.into();
        }
        let line = line.to_string();
        if self.tx.try_send(line).is_err() {
            metrics::global().access_log_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The most of a path a line keeps, in bytes.
const MAX_PATH: usize = 512;
/// The most of a method (hyper takes any token as one).
const MAX_METHOD: usize = 32;

/// `text` cut to at most `max` bytes at a character boundary; whether it was cut.
fn cut(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

/// How often the writer checks that its path still names its file.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// The open log file and the path it was opened at.
struct Followed {
    path: PathBuf,
    out: BufWriter<File>,
    /// The open file's device and inode.
    id: (u64, u64),
    checked: Instant,
    /// A reopen failed and was reported; the next failures are quiet
    /// until one succeeds.
    failing: bool,
}

impl Followed {
    fn open(path: PathBuf) -> std::io::Result<Followed> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let meta = file.metadata()?;
        Ok(Followed {
            path,
            out: BufWriter::new(file),
            id: (meta.dev(), meta.ino()),
            checked: Instant::now(),
            failing: false,
        })
    }

    /// Opens the path anew if it no longer names the open file (checked at
    /// most every [`FOLLOW_EVERY`]). A path that cannot be opened keeps the
    /// old file, says why, and is tried again at the next check.
    fn follow(&mut self, ctl: &Ctl) {
        if self.checked.elapsed() < FOLLOW_EVERY {
            return;
        }
        self.checked = Instant::now();
        let same = std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if same {
            return;
        }
        let _ = self.out.flush();
        match Followed::open(self.path.clone()) {
            Ok(next) => {
                *self = next;
                tracing::info!(path = %self.path.display(), "The access log was moved or deleted; writing to a new file at its path.");
            }
            Err(error) if !self.failing => {
                self.failing = true;
                ctl.error(&error);
                tracing::warn!(path = %self.path.display(), %error, "The access log was moved or deleted and cannot be opened again; still writing to the old file (tried again every second, said again once it works).");
            }
            Err(_) => {}
        }
    }
}

fn write_lines(mut log: Followed, rx: Receiver<String>, ctl: &Ctl) {
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.is_empty() => break,
            Ok(line) => {
                if let Err(error) = writeln!(log.out, "{line}") {
                    ctl.error(&error);
                }
                ctl.tick();
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = log.out.flush();
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if rx.is_empty() {
            let _ = log.out.flush();
        }
        log.follow(ctl);
    }
    let _ = log.out.flush();
}
