//! The running node: start-up steps, the workers, serving, and the shutdown
//! order.
//!
//! Start-up ([`App::start`]): open the store (taking the data-dir lock,
//! replaying the journal, starting the store's workers), build the catalog
//! once, stock the pools (embedded: import the config and load unclaimed
//! codes; cluster: start leasing), restore the ledgers, and set up
//! sessions, the guard and the claim decision.
//!
//! [`App::run`] reads as its four steps: start the node's own workers, serve
//! until the shutdown signal, drain the connections (bounded by
//! `server.shutdown_grace`), then stop every worker in [`STOP_ORDER`] — each
//! one only after everything that feeds it has stopped, so nothing is left
//! in a queue.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::{net::TcpListener, runtime::Handle, sync::mpsc};

use crate::{
    admission::{Room, Rooms, StockView},
    auth::{resolve_secret, Auth, ClaimTokens, Guard},
    catalog::Catalog,
    claim::{ClaimSettings, Claimer},
    clock::now_ms,
    config::Config,
    http::{
        access_log::AccessLog,
        lanes::{Lanes, Probe},
        router::Surface,
        server::{self, Connections, Http},
    },
    inventory::{lease, Inventory, Leasing},
    metrics,
    notify::{monotonic_usec, Notifier},
    signals::Signals,
    state::{self, AppState, Setup},
    store::{Access, RoomSource, Store},
    worker::{self, Ctl, Runner},
};

/// The order workers stop in at shutdown. Producers before consumers: the
/// node's own loops first (nothing new reaches the store after them; the
/// reaper takes no dead node's backlog after it, so the lease worker's
/// final release sees every record this node holds, and leaves the node
/// registered but expired for a live node to take them: a reap after that
/// release registered it live for another lease TTL), the
/// final statistics flush while the store still takes writes, then the
/// claim committers (the journal writer writes what is queued; the cluster
/// committer commits it), then what drains them (the lease worker gives its
/// codes back, the applier and the MongoDB writer empty their backlogs), the
/// access log, and the signal handler last (a second SIGTERM still exits at
/// once until the very end).
pub const STOP_ORDER: &[&str] = &[
    "watchdog",
    "admitter",
    "reloader",
    "refresher",
    "guard-sweep",
    "reaper",
    "redis-durability",
    "stats-flush",
    "journal-writer",
    "committer",
    "lease-loop",
    "store-applier",
    "mongo-writer",
    "access-log",
    "signals",
];

/// The node.
pub struct App {
    state: Arc<AppState>,
    workers: Arc<Runner>,
    access_log: Option<AccessLog>,
    max_connections: usize,
    max_connections_per_ip: usize,
    /// Lanes for public connections (`server.threads`, 0 resolved to the core count).
    threads: usize,
}

impl App {
    /// Runs every start-up step against `config` (read from `config_path`);
    /// background work is registered with `workers`.
    pub fn start(mut config: Config, config_path: PathBuf, workers: Arc<Runner>) -> anyhow::Result<App> {
        let started_ms = now_ms();
        let started = std::time::Instant::now();
        if let Some(files) = raise_open_files_limit() {
            tracing::debug!(files, "Open-file limit raised.");
            let needed = files_needed(&config);
            if files < needed {
                tracing::warn!(
                    files,
                    needed,
                    "The open-file limit is below what server.max_connections takes (its connections, as many \
                     event streams, the admin listener's and the store's files): past it, new connections wait \
                     in the kernel's queue instead of being served or refused. Raise the limit (the shipped \
                     unit sets LimitNOFILE=65536) or lower server.max_connections."
                );
            }
        }
        let store = Store::open(&config, Access::Serve(&workers)).context("cannot open the store")?;
        tracing::info!(store = %store.describe(), "Store opened.");

        let follows_store = store.shared_with_nodes() && config.activities.is_empty();
        if follows_store {
            config.activities = state::shared_activities(&store)
                .map_err(|e| anyhow::anyhow!("cannot read the activities from MongoDB: {e}"))?;
            tracing::info!(
                activities = config.activities.len(),
                "No [[activity]] in the config file: serving the activities `ticketd import` stored in MongoDB."
            );
        }
        let inventory = Arc::new(Inventory::default());
        let rooms = Arc::new(
            match store.room_source() {
                // In a cluster each room's log is in Redis; every node replicates it.
                Some(source) => Rooms::shared(Box::new(source)),
                None => Rooms::new(&Rooms::dir_in(&config.storage.path)),
            }
            .with_stream_budget(config.server.max_connections),
        );
        // Built once, first: it checks what validation cannot (mixed relative
        // and absolute times) before anything is imported.
        let catalog =
            Catalog::build(&config, started_ms, &inventory, &rooms).map_err(|p| anyhow::anyhow!(p.join("; ")))?;
        let report = store
            .serve_import(&config, started_ms, crate::store::Importer::Start)
            .context("cannot import the config's activities")?;
        state::log_import(&report);
        for t in catalog.activities().iter().flat_map(|a| &a.tickets) {
            let codes = store.unclaimed_codes(&t.id).context("cannot load stock")?;
            t.pool.add_codes(&codes);
        }
        let mut restored = 0usize;
        store
            .for_each_claim(&mut |claim| {
                // Embedded: the pools hold only unclaimed codes, so each
                // ticket type's total counts these apart. (With leases the
                // cluster-wide counts come from Redis instead.)
                inventory.pool(&claim.ticket_id).count_claimed_earlier();
                inventory.ledger(&claim.activity_id).restore(claim);
                restored += 1;
            })
            .context("cannot load claims")?;
        if let Some(source) = store.lease_source() {
            tracing::info!("Codes come from the Redis master lists (`ticketd import` fills them).");
            inventory.lease_with(Arc::new(Leasing::new(source, &config.cluster)));
        }
        state::track(&inventory, &catalog).context("cannot start leasing codes")?;
        for a in catalog.activities() {
            if inventory.leasing().is_some() {
                // The pools fill by lease, and the counts are Redis's: a
                // `remaining: 0` here would only alarm.
                tracing::info!(activity = %a.id, "Selling by lease; the cluster-wide counts come from Redis.");
            } else {
                tracing::info!(activity = %a.id, remaining = a.remaining(), claimed = a.ledger.claimed(), "Stock loaded.");
            }
        }
        warn_of_moved_rooms(&config, &catalog);
        tracing::info!(claims = restored, "Claims restored.");

        let secret = resolve_secret(&config, &store).context("cannot set up sessions")?;
        let auth = Arc::new(Auth::new(&config, store.clone(), &secret).context("cannot set up sessions")?);
        let blocked = state::blocked_user_ids(&config, &store)?;
        // Blocked while the node was down: ended as a reload's block is.
        state::end_blocked_sessions(&auth, blocked.iter().copied().collect());
        let guard = Arc::new(Guard::new(&config, blocked));
        let claimer = Claimer::new(
            store.clone(),
            inventory.clone(),
            guard.clone(),
            ClaimTokens::new(
                secret.as_bytes(),
                config.auth.previous_session_secret().as_deref().map(str::as_bytes),
            ),
            ClaimSettings::from_config(&config),
        );
        let access_log = match &config.log.access_log {
            Some(path) => Some(
                AccessLog::open(path, &workers)
                    .with_context(|| format!("cannot open the access log {}", path.display()))?,
            ),
            None => None,
        };
        let (max_connections, max_connections_per_ip) =
            (config.server.max_connections, config.server.max_connections_per_ip);
        let threads = config.server.lanes();
        config.strip_codes();
        let state = Arc::new(AppState::new(
            catalog,
            inventory,
            claimer,
            auth,
            guard,
            store,
            Setup {
                config,
                config_path,
                follows_store,
                started_ms,
                started,
                workers: workers.clone(),
                rooms,
            },
        ));
        Ok(App {
            state,
            workers,
            access_log,
            max_connections,
            max_connections_per_ip,
            threads,
        })
    }

    /// The shared state (for tests and benches that drive the claim path in-process).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Stops every worker in [`STOP_ORDER`] (what [`App::run`] ends with;
    /// for benches that drive the claim path in-process).
    pub async fn stop(&self) {
        self.workers.stop(STOP_ORDER).await;
    }

    /// Starts the node's workers, serves until `signals.shutdown`, drains
    /// the connections, then stops every worker in order. `admin` is the
    /// admin API's listener, if any.
    pub async fn run(self, listener: TcpListener, admin: Option<TcpListener>, signals: Signals) -> anyhow::Result<()> {
        let notifier = Arc::new(Notifier::from_env());
        // Before the workers: a node that cannot start its lanes starts nothing.
        let lanes = Lanes::start(self.threads).context("cannot start the connection threads")?;
        self.start_workers(signals.reload, &notifier, lanes.probe());
        let http = Arc::new(Http {
            state: self.state.clone(),
            connections: Connections::new(self.max_connections, self.max_connections_per_ip),
            access_log: self.access_log,
        });
        let admin_server = admin.map(|l| {
            if let Some(addr) = server::local_addr(&l) {
                tracing::info!(%addr, "Admin API listening.");
            }
            tokio::spawn(server::serve(
                l,
                http.clone(),
                signals.shutdown.clone(),
                Surface::Admin,
                None,
            ))
        });
        if let Some(addr) = server::local_addr(&listener) {
            tracing::info!(%addr, "Listening.");
        }
        notifier.send("READY=1");
        let stopping = {
            let (notifier, mut shutdown) = (notifier.clone(), signals.shutdown.clone());
            let state = self.state.clone();
            async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
                // Event streams end, so their connections drain.
                state.rooms.close();
                notifier.send("STOPPING=1");
            }
        };
        // Joined, not spawned: STOPPING=1 is sent before the drain ends, always.
        tokio::join!(
            server::serve(listener, http.clone(), signals.shutdown, Surface::Public, Some(&lanes)),
            stopping
        );
        if let Some(admin) = admin_server {
            let _ = admin.await;
        }
        drop(http);
        self.workers.stop(STOP_ORDER).await;
        // Last: the journal's final answers were delivered to their lanes.
        let _ = tokio::task::spawn_blocking(move || lanes.stop()).await;
        tracing::info!("Shutdown complete.");
        Ok(())
    }

    /// The node's own workers (the store registered its own at open).
    fn start_workers(&self, mut reload: mpsc::Receiver<()>, notifier: &Arc<Notifier>, lanes: Probe) {
        let (state, workers, rt) = (&self.state, &self.workers, Handle::current());
        if let Some(leasing) = state.inventory.leasing() {
            let leasing = leasing.clone();
            workers.task("lease-loop", &rt, move |ctl, stop| lease::run(leasing, ctl, stop));
        }
        {
            let (state, notifier) = (state.clone(), notifier.clone());
            workers.task("reloader", &rt, move |ctl, mut stop| async move {
                loop {
                    tokio::select! {
                        biased;
                        _ = stop.requested() => return,
                        msg = reload.recv() => if msg.is_none() { return },
                    }
                    notifier.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
                    let state = state.clone();
                    match tokio::task::spawn_blocking(move || state.reload("SIGHUP")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(reason)) => ctl.error(&reason),
                        Err(e) => {
                            ctl.error(&e);
                            tracing::error!(error = %e, "Reload task failed.");
                        }
                    }
                    ctl.tick();
                    notifier.send("READY=1");
                }
            });
        }
        if state.store.shared_with_nodes() {
            let state = state.clone();
            let every = state.refresh_interval();
            // Each failing refresh is said when it starts, not at every
            // round (every round counts in the worker's errors): a MongoDB
            // down for minutes wrote two long lines every two seconds. The
            // activities' refusal is said again when its reason changes (a
            // stored definition broken, then another); a driver's errors
            // are not compared, since their text varies with the topology.
            let failing: Arc<[parking_lot::Mutex<Option<String>>; 2]> = Arc::default();
            workers.task("refresher", &rt, move |ctl, stop| {
                worker::every(every, ctl, stop, move |ctl| {
                    let (state, ctl) = (state.clone(), ctl.clone());
                    let failing = failing.clone();
                    async move {
                        let round = ctl.clone();
                        // Both, independently: a failure of one never skips the other.
                        let refreshed = tokio::task::spawn_blocking(move || {
                            // Whether what a refresh met (a reason, or none:
                            // it worked) differs from the last round's.
                            let news = |which: usize, now: Option<String>| {
                                std::mem::replace(&mut *failing[which].lock(), now.clone()) != now
                            };
                            let refreshed = state.refresh_activities();
                            let news_of_activities = news(0, refreshed.as_ref().err().cloned());
                            match refreshed {
                                Err(reason) => {
                                    round.error(&reason);
                                    if news_of_activities {
                                        tracing::warn!(%reason, "Could not refresh the activities from MongoDB; serving the previous ones (said again only for another reason).");
                                    }
                                }
                                Ok(_) if news_of_activities => tracing::info!("The activities are refreshed from MongoDB again."),
                                Ok(_) => {}
                            }
                            // Logouts through other nodes.
                            let refreshed = state.auth.refresh_revoked();
                            // Failing or not, not why: a driver's text varies.
                            let news_of_revocations = news(1, refreshed.as_ref().err().map(|_| String::new()));
                            match refreshed {
                                Err(error) => {
                                    round.error(&error);
                                    if news_of_revocations {
                                        tracing::warn!(%error, "Could not refresh the revoked sessions from MongoDB (said once until it can).");
                                    }
                                }
                                Ok(_) if news_of_revocations => tracing::info!("The revoked sessions are refreshed from MongoDB again."),
                                Ok(_) => {}
                            }
                        })
                        .await;
                        if let Err(e) = refreshed {
                            ctl.error(&e);
                            tracing::error!(error = %e, "Cluster refresh task failed.");
                        }
                    }
                })
            });
        }
        {
            let state = state.clone();
            workers.task("admitter", &rt, move |ctl, stop| {
                let failing = Arc::new(Failing::default());
                worker::every(ADMIT_EVERY, ctl, stop, move |ctl| {
                    admit(state.clone(), ctl.clone(), failing.clone())
                })
            });
        }
        {
            let state = state.clone();
            workers.task("guard-sweep", &rt, move |ctl, stop| {
                worker::every(Duration::from_secs(60), ctl, stop, move |_| {
                    state.guard.sweep(Instant::now());
                    state.auth.forget_expired_revocations(now_ms());
                    std::future::ready(())
                })
            });
        }
        {
            let state = state.clone();
            workers.task("stats-flush", &rt, move |ctl, mut stop| async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    let last = !stop.tick(&mut every).await;
                    // The last flush, to a MongoDB that refused the one
                    // before (a second ago, at most), would wait out the
                    // driver's timeout before the lease worker (after this
                    // one) gives this node's codes back: other nodes could
                    // not sell them meanwhile. Not tried.
                    if last && state.store.shared_with_nodes() && state.stats.refusing() {
                        state.stats.refused(state.stats.drain());
                    } else {
                        let flushing = state.clone();
                        match tokio::task::spawn_blocking(move || flush_stats(&flushing)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(error)) => ctl.error(&error),
                            Err(error) => {
                                ctl.error(&error);
                                tracing::error!(%error, "Flushing the rush statistics failed.");
                            }
                        }
                    }
                    ctl.tick();
                    if last {
                        let lost = state.stats.unstored_rows();
                        if lost > 0 {
                            tracing::warn!(
                                rows = lost,
                                "Stopping with rush statistics the store refused: they are lost for the report."
                            );
                        }
                        return;
                    }
                }
            });
        }
        if notifier.is_enabled() {
            let (state, notifier) = (state.clone(), notifier.clone());
            workers.task("watchdog", &rt, move |ctl, mut stop| async move {
                tokio::select! {
                    _ = supervise(state, notifier, lanes, ctl) => {}
                    _ = stop.requested() => {}
                }
            });
        }
    }
}

/// Raises the process's soft limit of open files to its hard limit: a node
/// holds a connection per fan (an event stream per waiting fan), and the
/// usual soft limit of 1024 would refuse the rest. Returns the new limit.
pub fn raise_open_files_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return None;
            }
        }
    }
    Some(lim.rlim_cur)
}

/// Files a node may hold at once: `server.max_connections` connections,
/// as many waiting-room event streams (a budget of their own), the admin
/// listener's connections, and a margin for the store's files, the
/// listeners and the connections to Redis and MongoDB.
fn files_needed(config: &Config) -> u64 {
    const MARGIN: u64 = 256;
    let connections = config.server.max_connections as u64;
    (2 * connections).saturating_add(crate::http::server::MAX_ADMIN_CONNECTIONS as u64 + MARGIN)
}

/// How often the waiting rooms take their admission step.
const ADMIT_EVERY: Duration = Duration::from_millis(100);

/// How long a node holds a room's admitter lease without renewing it (a
/// cluster: a killed admitter is replaced after this).
const ADMITTER_LEASE_MS: u64 = 2_000;
/// Places the cluster admitter looks at per step (their check-ins are read first).
const ADMIT_LOOKAHEAD: usize = 2_000;

/// One round of the admitter: each waiting room shuffles when due, retires
/// used and lapsed passes, admits the next places as its rate and the
/// stock allow, or closes; then its log is made durable. In a cluster every
/// node first brings its replica up to date and shares its fans'
/// check-ins, and only the holder of the room's admitter lease decides.
async fn admit(state: Arc<AppState>, ctl: Ctl, failing: Arc<Failing>) {
    let catalog = state.catalog.load_full();
    let source = state.store.room_source();
    for a in catalog.activities() {
        let Some(room) = &a.room else { continue };
        let result = match &source {
            Some(source) if room.is_shared() => admit_shared(&state, a, room, source).await,
            _ => {
                let stock = || StockView {
                    remaining: a.remaining(),
                    settled: a.tickets.iter().all(|t| t.pool.drained()),
                };
                let seq = room.tick(now_ms, &stock, &|user| a.ledger.count_of(user));
                room.persist(seq).await.map_err(|e| format!("{e:?}"))
            }
        };
        match result {
            Err(error) => {
                ctl.error(&error);
                if failing.0.lock().insert(a.id.clone()) {
                    tracing::warn!(activity = %a.id, %error, "The waiting room's admitter could not take its step; said once until it takes one again.");
                } else {
                    tracing::debug!(activity = %a.id, %error, "The waiting room's admitter could not take its step.");
                }
            }
            Ok(()) => {
                if failing.0.lock().remove(&a.id) {
                    tracing::info!(activity = %a.id, "The waiting room's admitter takes its steps again.");
                }
            }
        }
    }
}

/// The rooms whose admitter's last step failed: a step is tried ten times a
/// second, and each failure of an outage (Redis down) was a warning, ten a
/// second per room. One an outage now, and one line when it ends. (Rooms
/// come from the config: bounded by it.)
#[derive(Default)]
struct Failing(parking_lot::Mutex<std::collections::HashSet<Arc<str>>>);

async fn admit_shared(
    state: &AppState,
    a: &crate::catalog::Activity,
    room: &Room,
    source: &RoomSource,
) -> Result<(), String> {
    let id = &a.id;
    let seen = room.take_seen();
    if let Err(error) = source.flush_seen(id, seen.clone()).await {
        // Kept for the next flush: a fan who stays while Redis is away
        // must not look gone once it is back.
        room.restore_seen(seen);
        room.regrace_when_back();
        return Err(error.to_string());
    }

    // The lease first, then the replica: a plan is made from a replica at
    // least as new as every append of the lease's previous holder.
    // Redis unreachable here too (a step with nothing to flush touched no
    // Redis above): the first step back must not plan from check-ins made
    // before. Only these: a step that fails on every try for another
    // reason would otherwise regrace every place for good, and nobody gone
    // would ever be skipped.
    let unreachable = |e: crate::store::StoreError| {
        room.regrace_when_back();
        e.to_string()
    };
    let admitter = source
        .admitter_lease(id, ADMITTER_LEASE_MS)
        .await
        .map_err(unreachable)?;
    source.sync(room).await.map_err(unreachable)?;
    room.regrace_if_back(now_ms());
    let (next, holders) = room.next_and_holders(if admitter { ADMIT_LOOKAHEAD } else { 0 });
    // `counted_ms`: Redis's time of the holders' counts, by which the
    // step judges which passes have lapsed (see `Room::plan_shared`).
    let (seen, claimed, counted_ms) = source
        .seen_and_claimed(id, next.clone(), holders.clone())
        .await
        .map_err(|e| e.to_string())?;
    let seen: std::collections::HashMap<u64, i64> =
        next.into_iter().zip(seen).filter_map(|(u, s)| Some((u, s?))).collect();
    let claimed: std::collections::HashMap<u64, u32> = holders.into_iter().zip(claimed).collect();
    // The cluster-wide counts, read after the pass holders' claims (see
    // `RoomState::plan`: a look read before them could show a code in stock
    // that a holder counted as used has claimed since). Without a fresh
    // look, no step. The room closes only when no code is on
    // a master list, in any node's lease or being committed here.
    state
        .inventory
        .refresh_counts(id)
        .await
        .map_err(|e| format!("cannot read the stock counts: {e}"))?;
    let tickets: Vec<&str> = a.tickets.iter().map(|t| &*t.id).collect();
    let look = state.inventory.look(&tickets).ok_or("a shared room without leases")?;
    let stock = StockView {
        remaining: look.remaining,
        settled: !look.unsold && a.tickets.iter().all(|t| t.pool.drained()),
    };
    let crate::admission::room::Plan { cursor, base, events } = room.plan_shared(
        now_ms(),
        counted_ms,
        &|| stock,
        &|u| claimed.get(&u).copied().unwrap_or(0),
        &|u| seen.get(&u).copied(),
        if admitter { ADMIT_LOOKAHEAD } else { 0 },
    );
    if admitter && !events.is_empty() {
        let appended = source
            .append(id, cursor, &base, &events)
            .await
            .map_err(|e| e.to_string())?;
        source.sync(room).await.map_err(|e| e.to_string())?;
        match appended {
            // Said, not hidden: a replica that stays behind its log would
            // stop every admission without a word.
            crate::store::Appended::StaleCursor { log } => {
                return Err(format!(
                    "nothing admitted: the shared log has reached {log} places, this replica {cursor} (it catches up at the next sync)"
                ))
            }
            crate::store::Appended::Diverged => {
                return Err(
                    "nothing admitted: the shared log no longer holds what this replica planned from (a failover?); the replica is rebuilt from it".into(),
                )
            }
            _ => {}
        }
    }
    Ok(())
}

/// Moves recorded rush statistics into the store. What the store refuses
/// is kept (capped) and goes with the next flush; what is still kept when
/// the node stops is lost for the report. Claims are unaffected.
fn flush_stats(state: &AppState) -> Result<(), crate::store::StoreError> {
    let mut batch = state.stats.drain();
    if batch.is_empty() {
        return Ok(());
    }
    state.store.add_stats(&mut batch).inspect_err(|error| {
        // Kept for the next flush (the report's curve has no hole where
        // the trouble was); warned of once per outage.
        let refused = state.stats.refused(batch);
        if refused.first {
            tracing::warn!(%error, rows = refused.kept, "Could not store rush statistics; kept (up to stats::MAX_HELD_ROWS rows) to store once the store takes them.");
        }
    })?;
    if let Some(dropped) = state.stats.stored() {
        tracing::info!(
            dropped,
            "Rush statistics kept during the outage are stored (rows past the cap: dropped)."
        );
    }
    Ok(())
}

/// Tells systemd how the node is doing: a STATUS line every two seconds,
/// and WATCHDOG=1 at half the watchdog interval, but only while a round trip
/// through the claim committer and one through every connection lane
/// succeed in time, and nothing needs a restart
/// ([`AppState::needs_restart`]).
async fn supervise(state: Arc<AppState>, notifier: Arc<Notifier>, lanes: Probe, ctl: Ctl) {
    let watchdog = Notifier::watchdog_interval();
    let tick = watchdog.unwrap_or(Duration::from_secs(2)).min(Duration::from_secs(2));
    let mut interval = tokio::time::interval(tick);
    let mut last_status = Instant::now() - Duration::from_secs(60);
    let mut last_claims = metrics::global().claims.get(metrics::ClaimOutcome::Success);
    let mut last_at = Instant::now();
    loop {
        interval.tick().await;
        ctl.tick();
        if let Some(every) = watchdog {
            // Both at once, within one interval: one after the other, two
            // slow answers could outlast WatchdogSec on a healthy node.
            let committer = async {
                match state.store.ping() {
                    Some(reply) => matches!(tokio::time::timeout(every, reply).await, Ok(Ok(()))),
                    None => false,
                }
            };
            let (committer, turning) = tokio::join!(committer, lanes.all_turning(every));
            if let Some(reason) = state.needs_restart() {
                ctl.error(&reason);
                tracing::warn!(%reason, "Not telling the watchdog all is well: only a restart mends this.");
            } else if committer && turning {
                notifier.send("WATCHDOG=1");
            } else if !committer && !state.store.is_healthy() {
                ctl.error(&"claims are refused: the claim store has failed or is unreachable");
                tracing::warn!("Claims are refused; not telling the watchdog all is well.");
            } else if !committer {
                ctl.error(&"the claim committer did not answer the watchdog ping");
                tracing::warn!("The claim journal did not answer the watchdog ping.");
            } else {
                ctl.error(&"a connection lane did not answer the watchdog ping");
                tracing::warn!("A connection lane did not answer the watchdog ping; its connections are stalled.");
            }
        }
        if last_status.elapsed() >= Duration::from_secs(2) {
            let claims = metrics::global().claims.get(metrics::ClaimOutcome::Success);
            let rate = (claims - last_claims) as f64 / last_at.elapsed().as_secs_f64().max(1e-3);
            let stock: usize = state.stock_by_activity().iter().map(|(_, s)| s.remaining).sum();
            notifier.send(&format!("STATUS=Serving: {stock} codes in stock, {rate:.0} claims/s"));
            (last_claims, last_at, last_status) = (claims, Instant::now(), Instant::now());
        }
    }
}

/// Relative times count from this start, so a restart moves them: fine for
/// a demo's sale, but a waiting room that already took places keeps its
/// log (its places, its commitment, a seed maybe revealed) while its window
/// moves. Nothing is lost, yet the room no longer agrees with its times,
/// so the operator hears of it.
fn warn_of_moved_rooms(config: &Config, catalog: &Catalog) {
    use crate::config::TimeSpec;
    for spec in &config.activities {
        let relative = [Some(spec.start_time), spec.queue_opens]
            .into_iter()
            .flatten()
            .any(|t| matches!(t, TimeSpec::Relative(_)));
        let Some(room) = catalog.activity(&spec.id).and_then(|a| a.room.as_ref()) else {
            continue;
        };
        let summary = room.summary();
        if relative && summary.joined > 0 {
            tracing::warn!(
                activity = %spec.id,
                places = summary.joined,
                shuffled = summary.shuffled,
                "This activity's times are relative to the node's start, so this start moved them, \
                 but its waiting room keeps the places and draw of an earlier run; use absolute times for a real sale."
            );
        }
    }
}
