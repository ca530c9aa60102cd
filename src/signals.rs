//! Unix signals turned into the app's two messages, by the worker `signals`.
//!
//! SIGHUP → a reload request on an mpsc channel. SIGTERM or SIGINT → the one
//! shutdown `watch` that reaches the servers, after which the app stops its
//! workers in order. A second SIGTERM/SIGINT exits at once with status 130:
//! every acknowledged claim is already in the journal, so an immediate exit
//! loses none.

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

/// Installs the handlers as the worker `signals` on `runner`. Must be
/// called inside the runtime.
pub fn install(runner: &Runner) -> std::io::Result<Signals> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (reload_tx, reload) = mpsc::channel(4);
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
    let _ = tx.send(true);
}
