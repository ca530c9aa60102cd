//! Unix signals turned into the app's two messages, by the worker `signals`.
//!
//! SIGHUP → a reload request on an mpsc channel. SIGTERM or SIGINT → the one
//! shutdown `watch` that reaches the servers, after which the app stops its
//! workers in order. A second SIGTERM/SIGINT exits at once with status 130:
//! every acknowledged claim is already in the journal, so an immediate exit
//! loses none.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::{
    runtime::Handle,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};

use crate::worker::Runner;

/// The receiving ends for the app.
pub struct Signals {
    /// One message per SIGHUP.
    pub reload: mpsc::Receiver<()>,
    /// Turns true on the first SIGTERM/SIGINT.
    pub shutdown: watch::Receiver<bool>,
}

/// A SIGHUP that came before [`install`].
static EARLY_HUP: AtomicBool = AtomicBool::new(false);

/// Set by the first SIGTERM/SIGINT: read by waits of the start-up that the
/// shutdown `watch` does not reach yet (a cluster node waiting for its id).
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Whether a stop signal has come.
pub fn stop_requested() -> bool {
    STOPPING.load(Ordering::Relaxed)
}

extern "C" fn note_early_hup(_: libc::c_int) {
    // An atomic store is all a signal handler may safely do here.
    EARLY_HUP.store(true, Ordering::Relaxed);
}

/// Holds a SIGHUP until [`install`] turns it into a reload. Called first
/// thing by `serve`: until the runtime's handler was installed (after the
/// config, codes files and all, was read), SIGHUP's default action ended
/// the node at once, exit 129 and not a line in the log (a reload
/// walkthrough: a `kill -HUP` right after a restart).
pub fn hold_early_reloads() {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGHUP, note_early_hup as *const () as libc::sighandler_t);
    }
}

/// Installs the handlers as the worker `signals` on `runner`. Must be
/// called inside the runtime. A SIGHUP held by [`hold_early_reloads`] is a
/// reload request at once (the config may have changed after it was read).
pub fn install(runner: &Runner) -> std::io::Result<Signals> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (reload_tx, reload) = mpsc::channel(4);
    if EARLY_HUP.swap(false, Ordering::Relaxed) {
        tracing::info!("A SIGHUP came while the node was starting; reloading.");
        let _ = reload_tx.try_send(());
    }
    let (shutdown_tx, shutdown) = watch::channel(false);
    runner.task("signals", &Handle::current(), move |ctl, mut stopping| async move {
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    // A full channel already has a reload pending; one is enough.
                    let _ = reload_tx.try_send(());
                }
                _ = term.recv() => stop(&shutdown_tx, "SIGTERM"),
                _ = int.recv() => stop(&shutdown_tx, "SIGINT"),
                _ = stopping.requested() => return,
            }
            ctl.tick();
        }
    });
    Ok(Signals { reload, shutdown })
}

fn stop(tx: &watch::Sender<bool>, name: &str) {
    if *tx.borrow() {
        tracing::warn!(
            signal = name,
            "Second stop signal; exiting now (every claim answered is durable already: in the journal, or in a cluster's Redis)."
        );
        std::process::exit(130);
    }
    tracing::info!(signal = name, "Shutting down.");
    STOPPING.store(true, Ordering::Relaxed);
    let _ = tx.send(true);
}
