//! The running node: start-up steps, the shared [`AppState`], reload, and
//! the shutdown order.
//!
//! Start-up: open the store (taking the data-dir lock and replaying the
//! journal), import the config's activities, load unclaimed codes into the
//! pools and existing claims into the ledgers, build the catalog, then serve.
//! Shutdown: stop accepting, drain in-flight requests (bounded by
//! `server.shutdown_grace`), then close the journal (every queued claim is
//! written) and the store applier.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch, Notify},
};

use crate::{
    auth::Auth,
    catalog::{Catalog, SharedCatalog},
    claim::Claimer,
    config::{now_ms, Config, ServerConfig},
    http,
    inventory::Inventory,
    metrics::{self, Gauges},
    store::{Access, ImportReport, Store},
};

/// Everything a request handler may touch.
pub struct AppState {
    /// The current catalog snapshot.
    pub catalog: SharedCatalog,
    /// Pools and ledgers.
    pub inventory: Arc<Inventory>,
    /// The claim decision.
    pub claimer: Claimer,
    /// Accounts and sessions.
    pub auth: Arc<Auth>,
    /// The store.
    pub store: Arc<Store>,
    /// Open HTTP connections.
    pub connections: AtomicUsize,
    /// Signalled when `connections` drops to zero.
    pub drained: Notify,
    /// `server.max_connections` (restart-only).
    pub max_connections: usize,
    /// Reloadable server limits.
    server: ArcSwap<ServerConfig>,
    /// When the node started, Unix ms (relative times count from here).
    pub started_ms: i64,
}

impl AppState {
    /// `server.max_body` in bytes.
    pub fn max_body(&self) -> usize {
        self.server.load().max_body.0 as usize
    }

    /// `server.request_timeout`.
    pub fn request_timeout(&self) -> Duration {
        self.server.load().request_timeout.0
    }

    /// `server.header_read_timeout`.
    pub fn header_read_timeout(&self) -> Duration {
        self.server.load().header_read_timeout.0
    }

    /// `server.shutdown_grace`.
    pub fn shutdown_grace(&self) -> Duration {
        self.server.load().shutdown_grace.0
    }

    /// State gauges for `/metrics`.
    pub fn gauges(&self) -> Gauges {
        let catalog = self.catalog.load();
        let mut stock = Vec::new();
        let mut claimed = Vec::new();
        for a in catalog.activities() {
            for t in &a.tickets {
                stock.push((a.id.to_string(), t.id.to_string(), t.pool.remaining()));
            }
            claimed.push((a.id.to_string(), a.ledger.claimed()));
        }
        Gauges {
            stock,
            claimed,
            claims_in_flight: self.claimer.in_flight(),
            journal_queue: self.store.commit_queue_len(),
            connections: self.connections.load(Ordering::Relaxed),
            stock_bytes: self.inventory.stock_footprint().0,
        }
    }
}

/// The node: state plus what reload needs.
pub struct App {
    state: Arc<AppState>,
    config: Mutex<Config>,
    config_path: PathBuf,
}

impl App {
    /// Runs every start-up step against `config` (read from `config_path`).
    pub fn start(mut config: Config, config_path: PathBuf) -> anyhow::Result<App> {
        let started_ms = now_ms();
        let store = Store::open(&config, Access::Serve).context("cannot open the store")?;
        tracing::info!(path = %config.storage.path.display(), "Store opened.");

        let inventory = Arc::new(Inventory::default());
        // Built first: it checks what validation cannot (mixed relative and absolute times).
        Catalog::build(&config, started_ms, &inventory)
            .map_err(|p| anyhow::anyhow!(p.join("; ")))?;
        let report = store
            .import(&config, started_ms)
            .context("cannot import the config's activities")?;
        log_import(&report);
        for t in config.activities.iter().flat_map(|a| &a.tickets) {
            let codes = store.unclaimed_codes(&t.id).context("cannot load stock")?;
            inventory.pool(&t.id).add_codes(&codes);
        }
        let mut restored = 0usize;
        store
            .for_each_claim(&mut |claim| {
                inventory.ledger(&claim.activity_id).restore(claim);
                restored += 1;
            })
            .context("cannot load claims")?;
        let catalog = Catalog::build(&config, started_ms, &inventory)
            .map_err(|p| anyhow::anyhow!(p.join("; ")))?;
        for a in catalog.activities() {
            tracing::info!(activity = %a.id, remaining = a.remaining(), claimed = a.ledger.claimed(), "Stock loaded.");
        }
        tracing::info!(claims = restored, "Claims restored.");

        let auth = Arc::new(Auth::new(&config, store.clone()).context("cannot set up sessions")?);
        config.strip_codes();
        let state = Arc::new(AppState {
            catalog: ArcSwap::from_pointee(catalog),
            inventory,
            claimer: Claimer::new(store.clone(), config.limits.max_in_flight_claims),
            auth,
            store,
            connections: AtomicUsize::new(0),
            drained: Notify::new(),
            max_connections: config.server.max_connections,
            server: ArcSwap::from_pointee(config.server.clone()),
            started_ms,
        });
        Ok(App {
            state,
            config: Mutex::new(config),
            config_path,
        })
    }

    /// The shared state (for tests and benches that drive the claim path in-process).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves `listener` until `shutdown`, reloading on each `reload` message,
    /// then shuts down in order.
    pub async fn run(
        self,
        listener: TcpListener,
        mut reload: mpsc::Receiver<()>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        if let Some(addr) = http::server::local_addr(&listener) {
            tracing::info!(%addr, "Listening.");
        }
        let app = Arc::new(self);
        let reloader = {
            let app = app.clone();
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        msg = reload.recv() => {
                            if msg.is_none() { break; }
                            let app = app.clone();
                            if let Err(e) = tokio::task::spawn_blocking(move || app.reload()).await {
                                tracing::error!(error = %e, "Reload task failed.");
                            }
                        }
                        _ = shutdown.changed() => break,
                    }
                }
            })
        };
        http::server::serve(listener, app.state.clone(), shutdown).await;
        reloader.abort();
        let state = app.state.clone();
        tokio::task::spawn_blocking(move || state.store.close())
            .await
            .context("closing the store failed")?;
        tracing::info!("Shutdown complete.");
        Ok(())
    }

    /// Re-reads the config file: build, validate, diff, swap — or refuse and
    /// keep serving the old one. Never touches stock or claims except to add codes.
    pub fn reload(&self) {
        let m = metrics::global();
        match self.try_reload() {
            Ok(added) => {
                m.reloads_applied.fetch_add(1, Ordering::Relaxed);
                tracing::info!(codes_added = added, "Config reloaded.");
            }
            Err(reason) => {
                m.reloads_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%reason, "Reload refused; still serving the previous config.");
            }
        }
    }

    fn try_reload(&self) -> Result<usize, String> {
        let mut running = self.config.lock();
        let mut new = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        let restart = new.restart_only_changes(&running);
        if !restart.is_empty() {
            return Err(format!(
                "{} changed, which needs a restart",
                restart.join(", ")
            ));
        }
        let state = &self.state;
        let catalog =
            Catalog::build(&new, state.started_ms, &state.inventory).map_err(|p| p.join("; "))?;
        let report = state
            .store
            .import(&new, state.started_ms)
            .map_err(|e| e.to_string())?;
        log_import(&report);
        let mut added = 0;
        for t in &report.tickets {
            state.inventory.pool(&t.ticket_id).add_codes(&t.added);
            added += t.added.len();
        }
        state.catalog.store(Arc::new(catalog));
        state.auth.apply(&new);
        state
            .claimer
            .set_max_in_flight(new.limits.max_in_flight_claims);
        state.server.store(Arc::new(new.server.clone()));
        new.strip_codes();
        *running = new;
        Ok(added)
    }
}

fn log_import(report: &ImportReport) {
    for t in &report.tickets {
        if !t.added.is_empty() {
            tracing::info!(ticket = %t.ticket_id, added = t.added.len(), total = t.total, "Codes imported.");
        }
    }
    for c in &report.conflicts {
        tracing::warn!(conflict = %c, "Code skipped.");
    }
}
