//! [`AppState`]: the domain handles a request may touch, and reload.
//!
//! It sits below `http` (handlers borrow it) and above everything it holds;
//! connection-level state (open connections, the drain, the access log)
//! belongs to `http::server`, and start-up and shutdown to `app`.

use std::{collections::HashSet, path::PathBuf, sync::atomic::Ordering, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::{
    admission::Rooms,
    auth::{Auth, Guard},
    catalog::{Activity, Catalog, SharedCatalog},
    claim::{ClaimSettings, Claimer},
    config::{ActivityConfig, Config, ServerConfig},
    inventory::{Inventory, Stock, Tracked},
    metrics::{self, Gauges},
    stats::RushStats,
    store::{ImportReport, NodeSettings, Store, StoreError},
    worker::Runner,
};

/// Everything a request handler may touch.
pub struct AppState {
    /// The current catalog snapshot.
    pub catalog: SharedCatalog,
    /// Pools and ledgers.
    pub inventory: Arc<Inventory>,
    /// The waiting rooms of queue and lottery activities.
    pub rooms: Arc<Rooms>,
    /// The claim decision.
    pub claimer: Claimer,
    /// Accounts and sessions.
    pub auth: Arc<Auth>,
    /// Blocklists, rate limits, login backoff.
    pub guard: Arc<Guard>,
    /// The store.
    pub store: Arc<Store>,
    /// The admin bearer token, when the admin API is on.
    pub admin_token: Option<String>,
    /// Rush statistics, flushed to the store every second.
    pub stats: RushStats,
    /// The background workers (their states show in `/metrics`).
    pub workers: Arc<Runner>,
    /// When the node started, Unix ms (relative times count from here).
    pub started_ms: i64,
    /// When the node started, for its uptime (in a cluster "now" follows
    /// Redis's clock from a moment after `started_ms` was read).
    pub started: std::time::Instant,
    /// Reloadable server limits.
    server: ArcSwap<ServerConfig>,
    /// The running config (codes stripped), for reload diffs.
    config: Mutex<Config>,
    /// Cluster mode with no `[[activity]]` in the file: the activities are
    /// the ones `ticketd import` stored in MongoDB, re-read periodically.
    follows_store: bool,
    config_path: PathBuf,
}

/// What [`AppState::new`] needs beyond the handles.
pub struct Setup {
    /// The config the node started with (codes stripped).
    pub config: Config,
    /// Where it was read from (reload reads it again).
    pub config_path: PathBuf,
    /// Whether the activities come from the store rather than the file.
    pub follows_store: bool,
    /// When the node started, Unix ms.
    pub started_ms: i64,
    /// The same moment, for the uptime.
    pub started: std::time::Instant,
    /// The runner the node's workers are registered with.
    pub workers: Arc<Runner>,
    /// The waiting rooms the catalog was built with.
    pub rooms: Arc<Rooms>,
}

impl AppState {
    /// Puts the handles together.
    pub fn new(
        catalog: Catalog,
        inventory: Arc<Inventory>,
        claimer: Claimer,
        auth: Arc<Auth>,
        guard: Arc<Guard>,
        store: Arc<Store>,
        setup: Setup,
    ) -> AppState {
        AppState {
            catalog: ArcSwap::from_pointee(catalog),
            inventory,
            rooms: setup.rooms,
            claimer,
            auth,
            guard,
            store,
            admin_token: setup.config.admin.token(),
            stats: RushStats::default(),
            workers: setup.workers,
            started_ms: setup.started_ms,
            started: setup.started,
            server: ArcSwap::from_pointee(setup.config.server.clone()),
            config: Mutex::new(setup.config),
            follows_store: setup.follows_store,
            config_path: setup.config_path,
        }
    }

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

    /// `server.write_timeout`.
    pub fn write_timeout(&self) -> Duration {
        self.server.load().write_timeout.0
    }

    /// What only a restart mends, if anything: a background worker that
    /// failed, or a waiting room that cannot write its log (it admits
    /// nobody; a restart replays the log). `/healthz` answers 503 for it
    /// and the node stops feeding systemd's watchdog.
    pub fn needs_restart(&self) -> Option<String> {
        if let Some(worker) = self.workers.failed() {
            return Some(format!(
                "the background worker `{worker}` failed: the node runs without it until it restarts"
            ));
        }
        self.rooms.failed_log().map(|activity| {
            format!("the waiting room of `{activity}` cannot write its log: it admits nobody until the node restarts")
        })
    }

    /// Why the node should take no traffic, if it should not: what only a
    /// restart mends, or a claim store that takes no claims. `/healthz`
    /// answers 503 with it and `/metrics` says `ticketd_healthy 0`, so an
    /// alert sees what a load balancer sees.
    pub fn unhealthy(&self) -> Option<String> {
        self.needs_restart().or_else(|| {
            if !self.store.is_healthy() {
                Some(
                    "claims cannot be stored: the journal cannot be written (embedded), or Redis is unreachable or \
                     no longer keeps every write it acknowledges (cluster)"
                        .to_owned(),
                )
            } else if self.store.backlog_full() {
                // Every claim answers 503 BACKLOG_FULL until MongoDB takes
                // writes again: as much out of service as with Redis away.
                Some(
                    "claims are refused: MongoDB has taken no writes for so long that the backlog in Redis is full \
                     (cluster.max_backlog)"
                        .to_owned(),
                )
            } else {
                None
            }
        })
    }

    /// `server.shutdown_grace`.
    pub fn shutdown_grace(&self) -> Duration {
        self.server.load().shutdown_grace.0
    }

    /// `cluster.refresh_interval`.
    pub fn refresh_interval(&self) -> Duration {
        self.config.lock().cluster.refresh_interval.0
    }

    /// Every activity of the current catalog with what is left of it: the one
    /// source of the numbers `/act/list`, `/admin`, `/metrics` and systemd's
    /// status line show.
    pub fn stock_by_activity(&self) -> Vec<(Arc<Activity>, Stock)> {
        self.catalog
            .load()
            .activities()
            .iter()
            .map(|a| (a.clone(), self.claimer.stock(a)))
            .collect()
    }

    /// State gauges for `/metrics`; `connections` comes from the HTTP server.
    pub fn gauges(&self, connections: usize) -> Gauges {
        let mut stock = Vec::new();
        let mut claimed = Vec::new();
        for (a, counts) in self.stock_by_activity() {
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
            connections,
            stock_bytes: self.inventory.stock_bytes(),
            hashes: self.auth.hashing_load(),
            cluster: self.store.gauges(),
            leased: self.inventory.leasing().map(|l| l.leased()).unwrap_or_default(),
            workers: self.workers.report(),
            healthy: self.unhealthy().is_none(),
            started_ms: self.started_ms,
            guard_tables: self.guard.tables().to_vec(),
            queues: self
                .catalog
                .load()
                .activities()
                .iter()
                .filter_map(|a| Some((a.id.to_string(), a.room.as_ref()?.summary())))
                .collect(),
        }
    }

    /// Re-reads the config file: build, validate, diff, swap — or refuse and
    /// keep serving the old one. Never touches stock or claims except to add
    /// codes. Returns the codes added, or why the reload was refused.
    pub fn reload(&self, by: &str) -> Result<usize, String> {
        let m = metrics::global();
        let result = self.try_reload();
        match result {
            Ok((added, changes)) => {
                m.reloads_applied.fetch_add(1, Ordering::Relaxed);
                let changes = match changes.is_empty() {
                    true => "none".to_owned(),
                    false => changes.join("; "),
                };
                tracing::info!(codes_added = added, by, changes, "Config reloaded.");
                Ok(added)
            }
            Err(reason) => {
                m.reloads_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%reason, by, "Reload refused; still serving the previous config.");
                Err(reason)
            }
        }
    }

    /// Activities from the store (cluster, no `[[activity]]` in the file):
    /// re-reads them and, if they changed, swaps in a catalog built from
    /// them. Returns whether it did.
    pub fn refresh_activities(&self) -> Result<bool, String> {
        if !self.follows_store {
            return Ok(false);
        }
        let mut running = self.config.lock();
        let activities = shared_activities(&self.store)?;
        if activities == running.activities {
            return Ok(false);
        }
        let mut new = running.clone();
        new.activities = activities;
        let moved = new.moved_ticket_types(&running);
        if !moved.is_empty() {
            return Err(moved.join("; "));
        }
        let catalog = Catalog::build(&new, self.started_ms, &self.inventory, &self.rooms).map_err(|p| p.join("; "))?;
        if let Err(e) = track(&self.inventory, &catalog) {
            catalog.abandon(&self.rooms);
            return Err(e.to_string());
        }
        let catalog = Arc::new(catalog);
        self.catalog.store(catalog.clone());
        catalog.apply_rooms(&self.rooms);
        tracing::info!(activities = new.activities.len(), "Activities refreshed from MongoDB.");
        *running = new;
        Ok(true)
    }

    /// Embedded mode: codes that `ticketd import` (another process) put in
    /// the store while this node served, per ticket type, to reach the
    /// pools on reload. Only codes a pool has never held count — a code
    /// taken by this node, even one whose claim is still on its way from
    /// the journal to SQLite, is in the pool's arena and never comes back.
    /// (Cluster nodes lease from Redis, where `import` pushes codes itself.)
    ///
    /// Read before the reload writes anything: a read that fails refuses
    /// the reload with nothing changed, instead of after the new limits and
    /// times were already in SQLite.
    fn codes_imported_elsewhere(&self, catalog: &Catalog) -> Result<CodesByTicket, StoreError> {
        if self.store.lease_source().is_some() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for a in catalog.activities() {
            for t in &a.tickets {
                let unclaimed = self.store.unclaimed_codes(&t.id)?;
                let new: Vec<String> = self
                    .inventory
                    .pool(&t.id)
                    .unknown(&unclaimed)
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
                if !new.is_empty() {
                    found.push((t.id.clone(), new));
                }
            }
        }
        Ok(found)
    }

    /// A reload's reads, then its one write (embedded mode: the config's
    /// activities into SQLite), the last step but `track` that can refuse
    /// it: the blocked users' ids, codes other processes imported, and
    /// what the write added.
    fn prepare_reload(&self, new: &Config, running: &Config, catalog: &Catalog) -> Result<Prepared, String> {
        let blocked = match blocked_user_ids(new, &self.store) {
            Ok(ids) => ids,
            // The names the node resolved before, unchanged: kept. A reload
            // (a pause, say) in a MongoDB outage was refused for them.
            Err(error) if new.security.blocked_users == running.security.blocked_users => {
                tracing::warn!(%error, "Could not look the blocked users up; keeping the accounts found before.");
                self.guard.blocked_user_ids()
            }
            Err(error) => {
                return Err(format!(
                    "cannot look the accounts of security.blocked_users up ({error}); a reload that changes them \
                     needs the store"
                ))
            }
        };
        // Counted before the read: codes another process adds after it
        // show in the count after the write (see `try_reload`).
        let stored = self.store.code_count().map_err(|e| e.to_string())?;
        let elsewhere = self.codes_imported_elsewhere(catalog).map_err(|e| e.to_string())?;
        let report = self
            .store
            .serve_import(new, self.started_ms, crate::store::Importer::Reload)
            .map_err(|e| e.to_string())?;
        Ok(Prepared {
            blocked,
            stored,
            elsewhere,
            report,
        })
    }

    /// The reload; the codes it added and what it changed.
    fn try_reload(&self) -> Result<(usize, Vec<String>), String> {
        let mut running = self.config.lock();
        let mut new = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        if self.follows_store {
            if !new.activities.is_empty() {
                // The store's set would replace the file's at the next refresh.
                return Err(
                    "this node serves the activities `ticketd import` stored in MongoDB (its config \
                            named none at start): activities in the file take a restart"
                        .into(),
                );
            }
            new.activities = shared_activities(&self.store)?;
        } else if new.activities.is_empty() && !running.activities.is_empty() && self.store.shared_with_nodes() {
            // A node whose file has no `[[activity]]` at start serves
            // MongoDB's; one that had some and loses them all would serve
            // nothing (and say it reloaded).
            return Err(
                "the config names no activity: a cluster node whose file names none serves the activities \
                 `ticketd import` stored in MongoDB, which takes a restart"
                    .into(),
            );
        }
        let restart = new.restart_only_changes(&running);
        if !restart.is_empty() {
            return Err(format!("{} changed, which needs a restart", restart.join(", ")));
        }
        let moved = new.moved_ticket_types(&running);
        if !moved.is_empty() {
            return Err(moved.join("; "));
        }
        // An operator's edit, not the activities `ticketd import` stored
        // (a node that follows them takes what every node takes).
        if !self.follows_store {
            let late = crate::admission::late_lotteries(&new, self.started_ms, |id| {
                self.rooms.get(id).is_none() && matches!(self.rooms.past(id), Ok(crate::admission::Past::Untouched))
            });
            if !late.is_empty() {
                return Err(late.join("; "));
            }
        }
        let catalog = Catalog::build(&new, self.started_ms, &self.inventory, &self.rooms).map_err(|p| p.join("; "))?;
        let Prepared {
            blocked,
            stored,
            elsewhere,
            report,
        } = match self.prepare_reload(&new, &running, &catalog) {
            Ok(prepared) => prepared,
            Err(e) => {
                catalog.abandon(&self.rooms);
                return Err(e);
            }
        };
        log_import(&report);
        let mut added = 0;
        for t in &report.tickets {
            self.inventory.pool(&t.ticket_id).add_codes(&t.added);
            added += t.added.len();
        }
        let mut add_elsewhere = |elsewhere: CodesByTicket| {
            for (ticket, codes) in elsewhere {
                tracing::info!(%ticket, codes = codes.len(), "Codes imported by another process are now in stock.");
                self.inventory.pool(&ticket).add_codes(&codes);
                added += codes.len();
            }
        };
        add_elsewhere(elsewhere);
        // An import that held SQLite's write lock while this reload waited
        // for it committed its codes after the read above, and the write
        // then found them stored and added none: they stayed out of stock,
        // answered SOLD_OUT for good, until another reload (a reload
        // walkthrough). More codes stored than this reload wrote means
        // another process added some: read again (the pools hold the first
        // read's by now, so only those are new). A read that fails leaves
        // them to the next reload.
        let written: usize = report.tickets.iter().map(|t| t.added.len()).sum();
        if self
            .store
            .code_count()
            .map_or(true, |now| now > stored + written as u64)
        {
            match self.codes_imported_elsewhere(&catalog) {
                Ok(meanwhile) => add_elsewhere(meanwhile),
                Err(error) => tracing::warn!(
                    %error,
                    "Could not look for codes imported while this reload waited; the next reload adds them."
                ),
            }
        }
        // Fails only when leasing, in a cluster, where `serve_import` wrote
        // nothing.
        if let Err(e) = track(&self.inventory, &catalog) {
            catalog.abandon(&self.rooms);
            return Err(e.to_string());
        }
        let catalog = Arc::new(catalog);
        self.catalog.store(catalog.clone());
        catalog.apply_rooms(&self.rooms);
        self.auth.apply(&new);
        let newly_blocked: Vec<u64> = blocked.difference(&self.guard.blocked_user_ids()).copied().collect();
        self.guard.apply(&new, blocked);
        end_blocked_sessions(&self.auth, newly_blocked);
        self.claimer.apply(ClaimSettings::from_config(&new));
        self.server.store(Arc::new(new.server.clone()));
        self.store.set_shutdown_grace(new.server.shutdown_grace.0);
        new.log_warnings();
        let changes = new.changes_from(&running);
        new.strip_codes();
        *running = new;
        Ok((added, changes))
    }
}

/// Codes, by the ticket type they belong to.
type CodesByTicket = Vec<(Arc<str>, Vec<String>)>;

/// What a reload read and wrote before it changes what the node serves.
struct Prepared {
    /// The accounts of `security.blocked_users`.
    blocked: HashSet<u64>,
    /// The codes stored before the reload read them.
    stored: u64,
    /// Codes other processes imported, not yet in the pools.
    elsewhere: CodesByTicket,
    /// What the reload's write added.
    report: ImportReport,
}

/// Starts selling the catalog's ticket types (with leases: leasing them).
pub fn track(inventory: &Inventory, catalog: &Catalog) -> Result<(), StoreError> {
    let activities: Vec<Tracked> = catalog
        .activities()
        .iter()
        .map(|a| Tracked {
            id: a.id.clone(),
            settings: NodeSettings {
                limit: a.per_user_limit,
                paused: a.paused,
            },
            tickets: a.tickets.iter().map(|t| t.id.clone()).collect(),
        })
        .collect();
    inventory.track(&activities)
}

/// The activity definitions stored by `ticketd import` (cluster mode),
/// checked again: a broken one (edited by hand since) refuses the whole set,
/// so a running node keeps serving what it had.
pub fn shared_activities(store: &Store) -> Result<Vec<ActivityConfig>, String> {
    let activities = store
        .shared_activities()
        .unwrap_or(Ok(Vec::new()))
        .map_err(|e| e.to_string())?;
    crate::config::check_definitions(&activities).map_err(|e| e.to_string())?;
    Ok(activities)
}

/// Ends the sessions of accounts just blocked, for good: the block refuses
/// them only while it lasts. Not done (said, and the block holds) when the
/// store cannot keep it; the block is not given up for that.
pub fn end_blocked_sessions(auth: &Auth, users: Vec<u64>) {
    let n = users.len();
    if n == 0 {
        return;
    }
    match auth.end_sessions(users) {
        Ok(()) => tracing::info!(accounts = n, "Sessions of blocked accounts ended."),
        Err(error) => tracing::warn!(
            %error,
            "Could not end the blocked accounts' sessions in the store: they are refused while blocked, and \
             come back if unblocked before they expire."
        ),
    }
}

/// The ids of the accounts `security.blocked_users` names: the ones whose
/// sessions the claim and queue paths refuse (a login is refused by name).
pub fn blocked_user_ids(config: &Config, store: &Store) -> Result<HashSet<u64>, StoreError> {
    use crate::auth::username::{identity_key, skeleton_key};
    let mut ids = HashSet::new();
    for name in &config.security.blocked_users {
        // By look-alike key, as logins are refused (`b1ockme`'s session is
        // no way past `blockme`); by identity key and as written for
        // accounts made before usernames were normalised or keyed.
        if let Some(u) = store.user_by_skeleton(&skeleton_key(name))? {
            ids.insert(u.id);
        }
        let key = identity_key(name);
        for candidate in [key.as_str(), name.as_str()] {
            if let Some(u) = store.user_by_name(candidate)? {
                ids.insert(u.id);
            }
        }
    }
    Ok(ids)
}

/// One log line per ticket type that got codes, and one per conflict.
pub fn log_import(report: &ImportReport) {
    for t in &report.tickets {
        if !t.added.is_empty() {
            tracing::info!(ticket = %t.ticket_id, added = t.added.len(), total = t.total, "Codes imported.");
        }
    }
    for c in &report.conflicts {
        tracing::warn!(conflict = %c, "Code skipped.");
    }
}
