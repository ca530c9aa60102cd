//! The optional access log: one JSON line per request, written by its own
//! thread so the request path only formats a line and `try_send`s it.
//!
//! Off by default (`[log] access_log`). When the writer falls behind, lines
//! are dropped and counted (`ticketd_access_log_dropped_total`) rather than
//! slowing requests down.

use std::{
    fs::OpenOptions,
    io::{BufWriter, Write},
    net::IpAddr,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

/// Lines dropped because the writer fell behind.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// A handle for sending lines to the writer thread.
pub struct AccessLog {
    tx: Sender<String>,
}

impl AccessLog {
    /// Opens (appends to) `path` and starts the writer thread.
    pub fn open(path: &Path) -> std::io::Result<AccessLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = crossbeam_channel::bounded(65_536);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(BufWriter::new(file), rx))?;
        Ok(AccessLog { tx })
    }

    /// Records one answered request.
    pub fn record(&self, ip: IpAddr, method: &str, path: &str, status: u16, elapsed: Duration) {
        let line = serde_json::json!({
            "ts": crate::config::rfc3339_ms(crate::config::now_ms()),
            "ip": ip.to_string(),
            "method": method,
            "path": path,
            "status": status,
            "ms": elapsed.as_secs_f64() * 1000.0,
        })
        .to_string();
        if self.tx.try_send(line).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn write_lines(mut out: BufWriter<std::fs::File>, rx: Receiver<String>) {
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let _ = writeln!(out, "{line}");
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
