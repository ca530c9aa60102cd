//! The systemd notify protocol (`sd_notify`), spoken directly.
//!
//! When systemd starts ticketd with `Type=notify` it sets `NOTIFY_SOCKET` to
//! a unix datagram socket (a path, or an abstract name starting with `@`).
//! Each message is a datagram of `KEY=VALUE` lines: `READY=1` once the
//! listener is bound and stock is loaded, `RELOADING=1` / `READY=1` around a
//! reload, `STOPPING=1` at shutdown, `STATUS=...` for `systemctl status`,
//! and `WATCHDOG=1` at half the `WATCHDOG_USEC` interval (or every 2 s,
//! if that is sooner) — sent only while a round trip through the claim committer and one
//! through every connection lane succeed, and nothing needs a restart (see
//! `app::supervise`), so a wedged claim path gets the node restarted.
//! Without `NOTIFY_SOCKET` every call is a no-op.

use std::{os::unix::net::UnixDatagram, path::PathBuf, time::Duration};

/// A connection to systemd's notify socket, if there is one.
pub struct Notifier {
    socket: Option<(UnixDatagram, Target)>,
    /// The socket's queue was full at the last send (said once until a
    /// send goes through).
    full: std::sync::atomic::AtomicBool,
}

enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`; without it, a notifier that sends nothing.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|addr| {
            let addr = addr.into_encoded_bytes();
            let target = match addr.strip_prefix(b"@") {
                Some(name) => Target::Abstract(name.to_vec()),
                None => Target::Path(PathBuf::from(std::ffi::OsString::from_vec(addr))),
            };
            // Never waiting: the sends come from the node's runtime, whose
            // thread a full queue (a listener slow to read: at most ten
            // datagrams wait, by default) held for as long as it stayed
            // full — the supervisor with it, which then never saw a failed
            // journal, and fed nothing more.
            let socket = UnixDatagram::unbound().ok()?;
            socket.set_nonblocking(true).ok()?;
            Some((socket, target))
        });
        Notifier {
            socket,
            full: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether a notify socket is configured.
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends one message (`KEY=VALUE` lines). Errors are logged, never fatal.
    pub fn send(&self, message: &str) {
        let Some((socket, target)) = &self.socket else { return };
        let result = match target {
            Target::Path(path) => socket.send_to(message.as_bytes(), path),
            Target::Abstract(name) => send_abstract(socket, name, message.as_bytes()),
        };
        match result {
            Ok(_) => self.full.store(false, std::sync::atomic::Ordering::Relaxed),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                if !self.full.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!("systemd's notify socket is full; messages are dropped until it reads (the next ones are sent as usual).");
                }
            }
            Err(error) => tracing::warn!(%error, "Could not notify systemd."),
        }
    }

    /// `WATCHDOG_USEC / 2`, when systemd asked for a watchdog; at least
    /// 100 ms. (`WatchdogSec=1us` made it zero, and a zero interval
    /// panicked the worker that feeds the watchdog: systemd then restarted
    /// the node, which panicked again. Each feeding pings the committer and
    /// every connection lane, which serve claims: not a thousand times a
    /// second for a unit's slip.)
    pub fn watchdog_interval() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        (usec > 0).then(|| Duration::from_micros((usec / 2).max(100_000)))
    }
}

use std::os::unix::ffi::OsStringExt;

#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &[u8], message: &[u8]) -> std::io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(message, &addr)
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &[u8]) -> std::io::Result<usize> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets are Linux-only",
    ))
}

/// The monotonic clock in microseconds, for `RELOADING=1`'s `MONOTONIC_USEC`.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}
