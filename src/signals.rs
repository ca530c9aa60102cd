//! Unix signals turned into the app's two messages.
//!
//! SIGHUP → a reload request on an mpsc channel. SIGTERM or SIGINT → the one
//! shutdown `watch` that reaches the server and every worker. A second
//! SIGTERM/SIGINT exits at once with status 130: every acknowledged claim is
//! already in the journal, so an immediate exit loses none.

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};

/// The receiving ends for the app.
pub struct Signals {
    /// One message per SIGHUP.
    pub reload: mpsc::Receiver<()>,
    /// Turns true on the first SIGTERM/SIGINT.
    pub shutdown: watch::Receiver<bool>,
}

/// Installs the handlers. Must be called inside the runtime.
pub fn install() -> std::io::Result<Signals> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (reload_tx, reload) = mpsc::channel(4);
    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    // A full channel already has a reload pending; one is enough.
                    let _ = reload_tx.try_send(());
                }
                _ = term.recv() => stop(&shutdown_tx, "SIGTERM"),
                _ = int.recv() => stop(&shutdown_tx, "SIGINT"),
            }
        }
    });
    Ok(Signals { reload, shutdown })
}

fn stop(tx: &watch::Sender<bool>, name: &str) {
    if *tx.borrow() {
        tracing::warn!(
            signal = name,
            "Second stop signal; exiting now (acknowledged claims are in the journal)."
        );
        std::process::exit(130);
    }
    tracing::info!(signal = name, "Shutting down.");
    let _ = tx.send(true);
}
