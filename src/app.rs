//! The running node: start-up steps, the shared [`AppState`], reload, and
//! the shutdown order.
//!
//! Start-up: open the store (taking the data-dir lock and replaying the
//! journal), import the config's activities, load unclaimed codes into the
//! pools and existing claims into the ledgers, build the catalog, then serve
//! the public listener (and the admin listener, when configured).
//! Shutdown: stop accepting, drain in-flight requests (bounded by
//! `server.shutdown_grace`), then close the journal (every queued claim is
//! written) and the store applier.

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch, Notify},
};

use crate::{
    auth::{resolve_secret, Auth, ClaimTokens, Guard},
    catalog::{Catalog, SharedCatalog},
    claim::{ClaimSettings, Claimer},
    config::{now_ms, Config, ServerConfig},
    http::{self, server::Surface},
    inventory::Inventory,
    metrics::{self, Gauges},
    notify::{monotonic_usec, Notifier},
    stats::RushStats,
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
    /// Blocklists, rate limits, login backoff.
    pub guard: Guard,
    /// The store.
    pub store: Arc<Store>,
    /// Open HTTP connections.
    pub connections: AtomicUsize,
    /// Signalled when `connections` drops to zero.
    pub drained: Notify,
    /// Set when shutdown begins: answers then carry `Connection: close`.
    pub shutting_down: AtomicBool,
    /// `server.max_connections` (restart-only).
    pub max_connections: usize,
    /// The admin bearer token, when the admin API is on.
    pub admin_token: Option<String>,
    /// Rush statistics, flushed to the store every second.
    pub stats: RushStats,
    /// The access log, when `[log] access_log` is set.
    pub access_log: Option<crate::http::access_log::AccessLog>,
    /// Reloadable server limits.
    server: ArcSwap<ServerConfig>,
    /// When the node started, Unix ms (relative times count from here).
    pub started_ms: i64,
    /// The running config (codes stripped), for reload diffs.
    config: Mutex<Config>,
    /// Cluster mode with no `[[activity]]` in the file: the activities are
    /// the ones `ticketd import` stored in MongoDB, re-read periodically.
    follows_store: bool,
    config_path: PathBuf,
}

/// Environment variable that overrides `admin.token`.
pub const ADMIN_TOKEN_ENV: &str = "TICKETD_ADMIN_TOKEN";

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
            let counts = self.store.stock(a);
            for (t, (_, remaining)) in a.tickets.iter().zip(&counts.tickets) {
                stock.push((a.id.to_string(), t.id.to_string(), *remaining));
            }
            claimed.push((a.id.to_string(), counts.claimed));
        }
        Gauges {
            stock,
            claimed,
            claims_in_flight: self.claimer.in_flight(),
            journal_queue: self.store.commit_queue_len(),
            connections: self.connections.load(Ordering::Relaxed),
            stock_bytes: self.inventory.stock_bytes(),
            cluster: self.store.cluster_gauges(),
        }
    }

    /// Re-reads the config file: build, validate, diff, swap — or refuse and
    /// keep serving the old one. Never touches stock or claims except to add
    /// codes. Returns the codes added, or why the reload was refused.
    pub fn reload(&self) -> Result<usize, String> {
        let m = metrics::global();
        let result = self.try_reload();
        match &result {
            Ok(added) => {
                m.reloads_applied.fetch_add(1, Ordering::Relaxed);
                tracing::info!(codes_added = added, "Config reloaded.");
            }
            Err(reason) => {
                m.reloads_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%reason, "Reload refused; still serving the previous config.");
            }
        }
        result
    }

    /// Cluster mode, activities from MongoDB: re-reads them and, if they
    /// changed, swaps in a catalog built from them. Returns whether it did.
    pub fn refresh_activities(&self) -> Result<bool, String> {
        if !self.follows_store {
            return Ok(false);
        }
        let mut running = self.config.lock();
        let activities = shared_activities(&self.store).map_err(|e| e.to_string())?;
        if activities == running.activities {
            return Ok(false);
        }
        let mut new = running.clone();
        new.activities = activities;
        let catalog = Catalog::build(&new, self.started_ms, &self.inventory).map_err(|p| p.join("; "))?;
        self.store.track(&catalog).map_err(|e| e.to_string())?;
        self.catalog.store(Arc::new(catalog));
        tracing::info!(activities = new.activities.len(), "Activities refreshed from MongoDB.");
        *running = new;
        Ok(true)
    }

    fn try_reload(&self) -> Result<usize, String> {
        let mut running = self.config.lock();
        let mut new = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        if self.follows_store && new.activities.is_empty() {
            new.activities = shared_activities(&self.store).map_err(|e| e.to_string())?;
        }
        let restart = new.restart_only_changes(&running);
        if !restart.is_empty() {
            return Err(format!("{} changed, which needs a restart", restart.join(", ")));
        }
        let catalog = Catalog::build(&new, self.started_ms, &self.inventory).map_err(|p| p.join("; "))?;
        let blocked = blocked_user_ids(&new, &self.store).map_err(|e| e.to_string())?;
        let mut added = 0;
        if self.store.is_cluster() {
            // New codes reach a cluster through `ticketd import` and leases.
            self.store.track(&catalog).map_err(|e| e.to_string())?;
        } else {
            let report = self.store.import(&new, self.started_ms).map_err(|e| e.to_string())?;
            log_import(&report);
            for t in &report.tickets {
                self.inventory.pool(&t.ticket_id).add_codes(&t.added);
                added += t.added.len();
            }
        }
        self.catalog.store(Arc::new(catalog));
        self.auth.apply(&new);
        self.guard.apply(&new, blocked);
        self.claimer.apply(ClaimSettings::from_config(&new));
        self.server.store(Arc::new(new.server.clone()));
        new.strip_codes();
        *running = new;
        Ok(added)
    }
}

/// The activity definitions stored by `ticketd import` (cluster mode).
fn shared_activities(store: &Store) -> Result<Vec<crate::config::ActivityConfig>, crate::store::StoreError> {
    store.shared_activities().unwrap_or(Ok(Vec::new()))
}

/// The ids of `security.blocked_users` that exist.
fn blocked_user_ids(config: &Config, store: &Store) -> Result<HashSet<u64>, crate::store::StoreError> {
    let mut ids = HashSet::new();
    for name in &config.security.blocked_users {
        if let Some(u) = store.user_by_name(name)? {
            ids.insert(u.id);
        }
    }
    Ok(ids)
}

/// The node.
pub struct App {
    state: Arc<AppState>,
}

impl App {
    /// Runs every start-up step against `config` (read from `config_path`).
    pub fn start(mut config: Config, config_path: PathBuf) -> anyhow::Result<App> {
        let started_ms = now_ms();
        let store = Store::open(&config, Access::Serve).context("cannot open the store")?;
        match config.storage.mode {
            crate::config::StorageMode::Embedded => {
                tracing::info!(path = %config.storage.path.display(), "Store opened.");
            }
            crate::config::StorageMode::Cluster => {
                tracing::info!(node = %config.node_id(), database = %config.storage.database, "Store opened (cluster: Redis and MongoDB connected).");
            }
        }

        let follows_store = store.is_cluster() && config.activities.is_empty();
        if follows_store {
            config.activities = shared_activities(&store).context("cannot read the activities from MongoDB")?;
            tracing::info!(
                activities = config.activities.len(),
                "No [[activity]] in the config file: serving the activities `ticketd import` stored in MongoDB."
            );
        }
        let inventory = Arc::new(Inventory::default());
        // Built first: it checks what validation cannot (mixed relative and absolute times).
        Catalog::build(&config, started_ms, &inventory).map_err(|p| anyhow::anyhow!(p.join("; ")))?;
        if store.is_cluster() {
            tracing::info!("Cluster mode: codes come from the Redis master lists (`ticketd import` fills them).");
        } else {
            let report = store
                .import(&config, started_ms)
                .context("cannot import the config's activities")?;
            log_import(&report);
        }
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
        let catalog = Catalog::build(&config, started_ms, &inventory).map_err(|p| anyhow::anyhow!(p.join("; ")))?;
        store.track(&catalog).context("cannot start leasing codes")?;
        for a in catalog.activities() {
            tracing::info!(activity = %a.id, remaining = a.remaining(), claimed = a.ledger.claimed(), "Stock loaded.");
        }
        tracing::info!(claims = restored, "Claims restored.");

        let secret = resolve_secret(&config, &store).context("cannot set up sessions")?;
        let auth = Arc::new(Auth::new(&config, store.clone(), &secret).context("cannot set up sessions")?);
        let guard = Guard::new(&config, blocked_user_ids(&config, &store)?);
        let claimer = Claimer::new(
            store.clone(),
            ClaimTokens::new(secret.as_bytes()),
            ClaimSettings::from_config(&config),
        );
        let admin_token = std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| config.admin.token.clone());
        let access_log = match &config.log.access_log {
            Some(path) => Some(
                crate::http::access_log::AccessLog::open(path)
                    .with_context(|| format!("cannot open the access log {}", path.display()))?,
            ),
            None => None,
        };
        config.strip_codes();
        let state = Arc::new(AppState {
            access_log,
            stats: RushStats::default(),
            catalog: ArcSwap::from_pointee(catalog),
            inventory,
            claimer,
            auth,
            guard,
            store,
            connections: AtomicUsize::new(0),
            drained: Notify::new(),
            shutting_down: AtomicBool::new(false),
            max_connections: config.server.max_connections,
            admin_token,
            server: ArcSwap::from_pointee(config.server.clone()),
            started_ms,
            config: Mutex::new(config),
            config_path,
            follows_store,
        });
        Ok(App { state })
    }

    /// The shared state (for tests and benches that drive the claim path in-process).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until `shutdown`, reloading on each `reload` message, then
    /// shuts down in order. `admin` is the admin API's listener, if any.
    pub async fn run(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        mut reload: mpsc::Receiver<()>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let state = self.state;
        let notifier = Arc::new(Notifier::from_env());
        let reloader = {
            let (state, notifier) = (state.clone(), notifier.clone());
            let mut shutdown = shutdown.clone();
            let every = state.config.lock().cluster.refresh_interval.0;
            tokio::spawn(async move {
                let mut sweep = tokio::time::interval(Duration::from_secs(60));
                let mut refresh = tokio::time::interval(every);
                refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = refresh.tick(), if state.store.is_cluster() => {
                            let state = state.clone();
                            let refreshed = tokio::task::spawn_blocking(move || {
                                if let Err(reason) = state.refresh_activities() {
                                    tracing::warn!(%reason, "Could not refresh the activities from MongoDB; serving the previous ones.");
                                }
                                // Logouts through other nodes.
                                if let Err(error) = state.auth.refresh_revoked() {
                                    tracing::warn!(%error, "Could not refresh the revoked sessions from MongoDB.");
                                }
                            });
                            if let Err(e) = refreshed.await {
                                tracing::error!(error = %e, "Cluster refresh task failed.");
                            }
                        }
                        msg = reload.recv() => {
                            if msg.is_none() { break; }
                            notifier.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
                            let state = state.clone();
                            if let Err(e) = tokio::task::spawn_blocking(move || state.reload()).await {
                                tracing::error!(error = %e, "Reload task failed.");
                            }
                            notifier.send("READY=1");
                        }
                        _ = sweep.tick() => state.guard.sweep(Instant::now()),
                        _ = shutdown.changed() => break,
                    }
                }
            })
        };
        let stats_flusher = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    every.tick().await;
                    let state = state.clone();
                    let _ = tokio::task::spawn_blocking(move || flush_stats(&state)).await;
                }
            })
        };
        let supervisor = notifier
            .is_enabled()
            .then(|| tokio::spawn(supervise(state.clone(), notifier.clone())));
        let admin_server = admin.map(|l| {
            if let Some(addr) = http::server::local_addr(&l) {
                tracing::info!(%addr, "Admin API listening.");
            }
            tokio::spawn(http::server::serve(l, state.clone(), shutdown.clone(), Surface::Admin))
        });
        if let Some(addr) = http::server::local_addr(&listener) {
            tracing::info!(%addr, "Listening.");
        }
        notifier.send("READY=1");
        let stopping = {
            let (notifier, mut shutdown) = (notifier.clone(), shutdown.clone());
            async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
                notifier.send("STOPPING=1");
            }
        };
        // Joined, not spawned: STOPPING=1 is sent before the drain ends, always.
        tokio::join!(
            http::server::serve(listener, state.clone(), shutdown, Surface::Public),
            stopping
        );
        if let Some(task) = supervisor {
            task.abort();
        }
        if let Some(admin) = admin_server {
            let _ = admin.await;
        }
        reloader.abort();
        stats_flusher.abort();
        let closing = state.clone();
        tokio::task::spawn_blocking({
            let state = state.clone();
            move || flush_stats(&state)
        })
        .await
        .context("flushing statistics failed")?;
        tokio::task::spawn_blocking(move || closing.store.close())
            .await
            .context("closing the store failed")?;
        tracing::info!("Shutdown complete.");
        Ok(())
    }
}

/// Moves recorded rush statistics into the store. If the store refuses
/// them they are dropped: the report misses them, claims are unaffected.
fn flush_stats(state: &AppState) {
    let batch = state.stats.drain();
    if batch.is_empty() {
        return;
    }
    if let Err(error) = state.store.add_stats(&batch) {
        tracing::warn!(%error, "Could not store rush statistics; they are lost for the report.");
    }
}

/// Tells systemd how the node is doing: a STATUS line every two seconds,
/// and WATCHDOG=1 at half the watchdog interval, but only while a round trip
/// through the claim journal succeeds in time.
async fn supervise(state: Arc<AppState>, notifier: Arc<Notifier>) {
    let watchdog = Notifier::watchdog_interval();
    let tick = watchdog.unwrap_or(Duration::from_secs(2)).min(Duration::from_secs(2));
    let mut interval = tokio::time::interval(tick);
    let mut last_status = Instant::now() - Duration::from_secs(60);
    let mut last_claims = metrics::global().claims.get(metrics::ClaimOutcome::Success);
    let mut last_at = Instant::now();
    loop {
        interval.tick().await;
        if let Some(every) = watchdog {
            let alive = match state.store.ping() {
                Some(reply) => matches!(tokio::time::timeout(every, reply).await, Ok(Ok(()))),
                None => false,
            };
            if alive {
                notifier.send("WATCHDOG=1");
            } else {
                tracing::warn!("The claim journal did not answer the watchdog ping.");
            }
        }
        if last_status.elapsed() >= Duration::from_secs(2) {
            let claims = metrics::global().claims.get(metrics::ClaimOutcome::Success);
            let rate = (claims - last_claims) as f64 / last_at.elapsed().as_secs_f64().max(1e-3);
            let stock: usize = state
                .catalog
                .load()
                .activities()
                .iter()
                .map(|a| state.store.stock(a).remaining)
                .sum();
            notifier.send(&format!("STATUS=Serving: {stock} codes in stock, {rate:.0} claims/s"));
            (last_claims, last_at, last_status) = (claims, Instant::now(), Instant::now());
        }
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
