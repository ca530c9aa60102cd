//! The optional access log: one JSON line per request, written by its own
//! worker thread (`access-log`) so the request path only formats a line and
//! `try_send`s it.
//!
//! Off by default (`[log] access_log`). When the writer falls behind, lines
//! are dropped and counted (`ticketd_access_log_dropped_total`) rather than
//! slowing requests down.

use std::{
    fs::OpenOptions,
    io::{BufWriter, Write},
    net::IpAddr,
    path::Path,
    sync::atomic::Ordering,
    time::Duration,
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
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = crossbeam_channel::bounded(65_536);
        let closer = tx.clone();
        runner.thread(
            "access-log",
            move |ctl| write_lines(BufWriter::new(file), rx, &ctl),
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

fn write_lines(mut out: BufWriter<std::fs::File>, rx: Receiver<String>, ctl: &Ctl) {
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.is_empty() => break,
            Ok(line) => {
                if let Err(error) = writeln!(out, "{line}") {
                    ctl.error(&error);
                }
                ctl.tick();
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = out.flush();
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if rx.is_empty() {
            let _ = out.flush();
        }
    }
    let _ = out.flush();
}
