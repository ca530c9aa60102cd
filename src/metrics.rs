//! Process-wide counters and histograms, rendered as Prometheus text.
//!
//! Every counter is a plain atomic in a fixed array indexed by an enum, so
//! recording on the claim path is one relaxed `fetch_add` with no lookup,
//! lock or allocation. Gauges that describe state (stock, queues) are not
//! stored here; `/metrics` reads them from their owners when scraped.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

pub use crate::vocab::ClaimOutcome;
use crate::worker::{WorkerReport, WorkerState};

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: Metrics = Metrics::new();
    &METRICS
}

/// API routes, for per-route counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Route {
    /// `GET /healthz`
    Healthz,
    /// `GET /metrics`
    Metrics,
    /// `POST /user/register`
    UserRegister,
    /// `POST /user/login`
    UserLogin,
    /// `POST /user/logout`
    UserLogout,
    /// `GET /act/list`
    ActList,
    /// `GET /act/detail`
    ActDetail,
    /// `POST /ticket/get`
    TicketGet,
    /// `/admin/*`
    Admin,
    /// `GET /ticket/list`
    TicketList,
    /// `GET /ticket/detail`
    TicketDetail,
    /// `GET /ticket/qr`
    TicketQr,
    /// `GET /` and `/assets/*`: the fan's page.
    Page,
    /// `POST /queue/join`
    QueueJoin,
    /// `GET /queue/status`
    QueueStatus,
    /// `GET /queue/events`
    QueueEvents,
    /// Anything else.
    Unknown,
}

impl Route {
    const ALL: [Route; 17] = [
        Route::Healthz,
        Route::Metrics,
        Route::UserRegister,
        Route::UserLogin,
        Route::UserLogout,
        Route::ActList,
        Route::ActDetail,
        Route::TicketGet,
        Route::TicketList,
        Route::TicketDetail,
        Route::TicketQr,
        Route::Page,
        Route::QueueJoin,
        Route::QueueStatus,
        Route::QueueEvents,
        Route::Admin,
        Route::Unknown,
    ];

    /// The path label.
    pub fn label(self) -> &'static str {
        match self {
            Route::Healthz => "/healthz",
            Route::Metrics => "/metrics",
            Route::UserRegister => "/user/register",
            Route::UserLogin => "/user/login",
            Route::UserLogout => "/user/logout",
            Route::ActList => "/act/list",
            Route::ActDetail => "/act/detail",
            Route::TicketGet => "/ticket/get",
            Route::TicketList => "/ticket/list",
            Route::TicketDetail => "/ticket/detail",
            Route::TicketQr => "/ticket/qr",
            Route::Page => "page",
            Route::QueueJoin => "/queue/join",
            Route::QueueStatus => "/queue/status",
            Route::QueueEvents => "/queue/events",
            Route::Admin => "/admin",
            Route::Unknown => "other",
        }
    }
}

/// Every status the node answers with (a page revalidated is 304, a reused
/// idempotency key 422), then 0: any other, shown as `other`.
const STATUSES: [u16; 18] = [
    200, 201, 304, 400, 401, 403, 404, 405, 408, 409, 410, 413, 415, 422, 429, 500, 503, 0,
];

fn status_slot(status: u16) -> usize {
    STATUSES.iter().position(|&s| s == status).unwrap_or(STATUSES.len() - 1)
}

/// Why the security layer turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Rejected {
    /// Blocked address or user.
    Blocked,
    /// A user over the claim rate.
    UserRate,
    /// An address over the claim rate.
    IpRate,
    /// A waiting room's call (join, status, events, leave) from an address
    /// over the claim rate, which those calls share: counted apart, so
    /// `ip_rate` counts claims alone (the admin page showed a room's polling
    /// as claims turned away).
    QueueIpRate,
    /// A user over their budget of reads of a cluster's store (their
    /// codes, from every node).
    StoreReadRate,
    /// An address over the registration rate.
    RegistrationRate,
    /// A failed login.
    LoginFailed,
    /// A login during a lockout.
    LoginLocked,
    /// An admin request without the admin token.
    AdminUnauthorized,
    /// A browser POST from a page of another site.
    CrossSite,
    /// A login or registration beyond the password-hashing queue.
    HashingBusy,
    /// A login or registration from a client holding its share of the hashing.
    HashingShare,
    /// A waiting room's join without its proof of work.
    JoinProofOfWork,
    /// A waiting room's join by an account younger than `min_account_age`
    /// (claims count it as the outcome `account_too_new`).
    JoinAccountTooNew,
    /// A waiting room's join with `min_account_age` on a session token too
    /// old to carry the account's age (claims: `session_outdated`).
    JoinSessionOutdated,
}

impl Rejected {
    const ALL: [Rejected; 15] = [
        Rejected::Blocked,
        Rejected::UserRate,
        Rejected::IpRate,
        Rejected::QueueIpRate,
        Rejected::StoreReadRate,
        Rejected::RegistrationRate,
        Rejected::LoginFailed,
        Rejected::LoginLocked,
        Rejected::AdminUnauthorized,
        Rejected::CrossSite,
        Rejected::HashingBusy,
        Rejected::HashingShare,
        Rejected::JoinProofOfWork,
        Rejected::JoinAccountTooNew,
        Rejected::JoinSessionOutdated,
    ];

    fn label(self) -> &'static str {
        match self {
            Rejected::Blocked => "blocked",
            Rejected::UserRate => "user_rate",
            Rejected::IpRate => "ip_rate",
            Rejected::QueueIpRate => "queue_ip_rate",
            Rejected::StoreReadRate => "store_read_rate",
            Rejected::RegistrationRate => "registration_rate",
            Rejected::LoginFailed => "login_failed",
            Rejected::LoginLocked => "login_locked",
            Rejected::AdminUnauthorized => "admin_unauthorized",
            Rejected::CrossSite => "cross_site",
            Rejected::HashingBusy => "hashing_busy",
            Rejected::HashingShare => "hashing_share",
            Rejected::JoinProofOfWork => "join_pow",
            Rejected::JoinAccountTooNew => "join_account_too_new",
            Rejected::JoinSessionOutdated => "join_session_outdated",
        }
    }
}

/// Claim outcome counters.
pub struct ClaimCounters([AtomicU64; ClaimOutcome::ALL.len()]);

impl ClaimCounters {
    /// Counts one claim with `outcome`.
    pub fn inc(&self, outcome: ClaimOutcome) {
        self.0[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The count for `outcome`.
    pub fn get(&self, outcome: ClaimOutcome) -> u64 {
        self.0[outcome as usize].load(Ordering::Relaxed)
    }
}

/// A fixed-bucket histogram.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: [AtomicU64; 24],
    count: AtomicU64,
    /// Sum in millionths of the unit (microseconds for time).
    sum_micros: AtomicU64,
}

/// Upper bounds (seconds) of the latency buckets.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

impl Histogram {
    const fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; 24],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records a duration.
    pub fn observe(&self, d: Duration) {
        self.record(d.as_secs_f64(), d.as_micros() as u64);
    }

    /// Records a count (batch size).
    pub fn observe_count(&self, n: u64) {
        self.record(n as f64, n.saturating_mul(1_000_000));
    }

    fn record(&self, value: f64, micros: u64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braced} {sum}");
        let _ = writeln!(out, "{name}_count{braced} {}", self.count.load(Ordering::Relaxed));
    }
}

/// All of the process's counters.
pub struct Metrics {
    requests: [[AtomicU64; STATUSES.len()]; Route::ALL.len()],
    latency: [Histogram; Route::ALL.len()],
    /// Claims by outcome.
    pub claims: ClaimCounters,
    /// Time spent in journal fsync.
    pub journal_fsync: Histogram,
    /// Claims per group commit.
    pub journal_batch: Histogram,
    rejected: [AtomicU64; Rejected::ALL.len()],
    /// Connections closed at once, by [`Refused`] (its index).
    connections_refused: [AtomicU64; Refused::ALL.len()],
    /// Accepts that failed (the open-file limit reached, mostly).
    pub accept_failures: AtomicU64,
    /// Reloads applied.
    pub reloads_applied: AtomicU64,
    /// Reloads refused.
    pub reloads_refused: AtomicU64,
    /// Cluster: round trips of the commit script.
    pub redis_commit: Histogram,
    /// Cluster: round trips of the lease script.
    pub redis_lease: Histogram,
    /// Cluster: bulk inserts of claims into MongoDB.
    pub mongo_write: Histogram,
    /// Cluster: codes leased from the master lists.
    pub codes_leased: AtomicU64,
    /// Cluster: dead nodes whose leases this node reclaimed.
    pub leases_reaped: AtomicU64,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: AtomicU64,
    /// Argon2 hashes computed (made or verified, a dummy one included).
    pub password_hashes: AtomicU64,
    /// Requests hyper answered itself, unparsed, by [`UNPARSED_STATUSES`].
    unparsed: [AtomicU64; UNPARSED_STATUSES.len()],
}

/// The statuses hyper answers a request it cannot parse with (any other
/// is counted as 400).
pub const UNPARSED_STATUSES: [u16; 4] = [400, 414, 431, 505];

/// State read from its owners at scrape time.
pub struct Gauges {
    /// `(activity, ticket, remaining)` per ticket type.
    pub stock: Vec<(String, String, usize)>,
    /// `(activity, claimed)`.
    pub claimed: Vec<(String, usize)>,
    /// Claims being decided or committed.
    pub claims_in_flight: usize,
    /// Claims waiting for the journal writer.
    pub journal_queue: usize,
    /// Open HTTP connections.
    pub connections: usize,
    /// Approximate bytes held by code pools.
    pub stock_bytes: usize,
    /// Password hashes running, and logins or registrations waiting for one.
    pub hashes: (usize, usize),
    /// Cluster mode only: the node's store connections and backlog.
    pub cluster: Option<ClusterGauges>,
    /// Cluster mode only: `(activity, ticket, codes leased to this node and unclaimed)`.
    pub leased: Vec<(String, String, usize)>,
    /// Every background worker's state.
    pub workers: Vec<WorkerReport>,
    /// What `/healthz` says: 200 (true) or 503.
    pub healthy: bool,
    /// When the node started, Unix ms (`process_start_time_seconds`: a
    /// restart systemd's watchdog made between two scrapes shows only there).
    pub started_ms: i64,
    /// `(table, entries, capacity)` of the guard's per-client tables.
    pub guard_tables: Vec<(&'static str, usize, usize)>,
    /// `(activity, figures)` of each waiting room.
    pub queues: Vec<(String, crate::admission::RoomSummary)>,
}

/// Cluster-mode state at scrape time.
pub struct ClusterGauges {
    /// Claims acknowledged by this node, not yet in MongoDB.
    pub backlog: usize,
    /// Redis answered the last command.
    pub redis_up: bool,
    /// Redis said at the last look that it keeps every write it
    /// acknowledges (the `redis-durability` worker).
    pub redis_durable: bool,
    /// MongoDB took the last write.
    pub mongo_up: bool,
}

impl Metrics {
    const fn new() -> Metrics {
        Metrics {
            requests: [const { [const { AtomicU64::new(0) }; STATUSES.len()] }; Route::ALL.len()],
            latency: [const { Histogram::new(LATENCY_BOUNDS) }; Route::ALL.len()],
            claims: ClaimCounters([const { AtomicU64::new(0) }; ClaimOutcome::ALL.len()]),
            journal_fsync: Histogram::new(LATENCY_BOUNDS),
            journal_batch: Histogram::new(BATCH_BOUNDS),
            rejected: [const { AtomicU64::new(0) }; Rejected::ALL.len()],
            connections_refused: [const { AtomicU64::new(0) }; Refused::ALL.len()],
            accept_failures: AtomicU64::new(0),
            reloads_applied: AtomicU64::new(0),
            reloads_refused: AtomicU64::new(0),
            redis_commit: Histogram::new(LATENCY_BOUNDS),
            redis_lease: Histogram::new(LATENCY_BOUNDS),
            mongo_write: Histogram::new(LATENCY_BOUNDS),
            codes_leased: AtomicU64::new(0),
            leases_reaped: AtomicU64::new(0),
            access_log_dropped: AtomicU64::new(0),
            password_hashes: AtomicU64::new(0),
            unparsed: [const { AtomicU64::new(0) }; UNPARSED_STATUSES.len()],
        }
    }

    /// Counts a finished request.
    pub fn request(&self, route: Route, status: u16, elapsed: Duration) {
        self.requests[route as usize][status_slot(status)].fetch_add(1, Ordering::Relaxed);
        self.latency[route as usize].observe(elapsed);
    }

    /// Claim counts by outcome label.
    pub fn claim_outcomes(&self) -> std::collections::BTreeMap<&'static str, u64> {
        ClaimOutcome::ALL
            .iter()
            .map(|o| (o.label(), self.claims.get(*o)))
            .collect()
    }

    /// Counts a connection closed at once by `reason`'s cap.
    pub fn refuse_connection(&self, reason: Refused) {
        self.connections_refused[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request hyper could not parse and answered with `status`
    /// before any route saw it: a flood of them did not show in
    /// `ticketd_http_requests_total` at all (an operations walkthrough).
    pub fn unparsed(&self, status: u16) {
        let slot = UNPARSED_STATUSES.iter().position(|&s| s == status).unwrap_or(0);
        self.unparsed[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// Claims turned away by the address's or the user's claim rate,
    /// before the claim decision (the admin page's "rate-limited").
    pub fn claims_rate_limited(&self) -> u64 {
        [Rejected::UserRate, Rejected::IpRate]
            .iter()
            .map(|&r| self.rejected[r as usize].load(Ordering::Relaxed))
            .sum()
    }

    /// Counts a request turned away by the security layer.
    pub fn reject(&self, why: Rejected) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Renders everything in the Prometheus text exposition format.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(16 << 10);
        out.push_str("# HELP ticketd_http_requests_total HTTP requests by route and status.\n# TYPE ticketd_http_requests_total counter\n");
        for route in Route::ALL {
            for (slot, status) in STATUSES.iter().enumerate() {
                let n = self.requests[route as usize][slot].load(Ordering::Relaxed);
                if n > 0 {
                    let status = if *status == 0 {
                        "other".to_owned()
                    } else {
                        status.to_string()
                    };
                    let _ = writeln!(
                        out,
                        "ticketd_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                        route.label()
                    );
                }
            }
        }
        out.push_str("# HELP ticketd_http_request_duration_seconds Time to answer, by route.\n# TYPE ticketd_http_request_duration_seconds histogram\n");
        for route in Route::ALL {
            if self.latency[route as usize].count.load(Ordering::Relaxed) > 0 {
                let labels = format!("route=\"{}\"", route.label());
                self.latency[route as usize].render(&mut out, "ticketd_http_request_duration_seconds", &labels);
            }
        }
        out.push_str("# HELP ticketd_claims_total Claim requests by outcome.\n# TYPE ticketd_claims_total counter\n");
        for o in ClaimOutcome::ALL {
            let _ = writeln!(
                out,
                "ticketd_claims_total{{outcome=\"{}\"}} {}",
                o.label(),
                self.claims.get(o)
            );
        }
        out.push_str("# HELP ticketd_security_rejections_total Requests turned away by the security layer, by reason.\n# TYPE ticketd_security_rejections_total counter\n");
        for r in Rejected::ALL {
            let n = self.rejected[r as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "ticketd_security_rejections_total{{reason=\"{}\"}} {n}", r.label());
        }
        out.push_str("# HELP ticketd_stock_remaining Codes in stock by activity and ticket type; in a cluster the cluster's, the same on every node: aggregate with max, not sum.\n# TYPE ticketd_stock_remaining gauge\n");
        for (activity, ticket, remaining) in &gauges.stock {
            let _ = writeln!(
                out,
                "ticketd_stock_remaining{{activity=\"{}\",ticket=\"{}\"}} {remaining}",
                escape(activity),
                escape(ticket)
            );
        }
        out.push_str("# HELP ticketd_claimed Durable claims by activity; in a cluster the cluster's, the same on every node: aggregate with max, not sum.\n# TYPE ticketd_claimed gauge\n");
        for (activity, claimed) in &gauges.claimed {
            let _ = writeln!(out, "ticketd_claimed{{activity=\"{}\"}} {claimed}", escape(activity));
        }
        out.push_str("# HELP ticketd_journal_fsync_seconds Time spent in journal fsync.\n# TYPE ticketd_journal_fsync_seconds histogram\n");
        self.journal_fsync.render(&mut out, "ticketd_journal_fsync_seconds", "");
        out.push_str("# HELP ticketd_journal_batch_claims Claims per group commit.\n# TYPE ticketd_journal_batch_claims histogram\n");
        self.journal_batch.render(&mut out, "ticketd_journal_batch_claims", "");
        let gauges_list = [
            (
                "ticketd_claims_in_flight",
                "Claims being decided or committed.",
                gauges.claims_in_flight,
            ),
            (
                "ticketd_journal_queue",
                "Claims waiting for the journal writer.",
                gauges.journal_queue,
            ),
            ("ticketd_http_connections", "Open HTTP connections.", gauges.connections),
            (
                "ticketd_stock_bytes",
                "Approximate heap bytes held by code pools.",
                gauges.stock_bytes,
            ),
            (
                "ticketd_password_hashes_running",
                "Password hashes running (at most auth.max_concurrent_hashes).",
                gauges.hashes.0,
            ),
            (
                "ticketd_password_hashes_waiting",
                "Logins and registrations waiting for a hashing turn (at most auth.hash_queue).",
                gauges.hashes.1,
            ),
            (
                "ticketd_healthy",
                "1 while /healthz answers 200; 0 while claims cannot be stored or the node needs a restart.",
                usize::from(gauges.healthy),
            ),
        ];
        for (name, help, value) in gauges_list {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP process_start_time_seconds Start time of the process since the Unix epoch in seconds.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {:.3}",
            gauges.started_ms as f64 / 1000.0
        );
        if let Some(c) = &gauges.cluster {
            self.render_cluster(&mut out, c, &gauges.leased);
        }
        self.render_workers(&mut out, &gauges.workers);
        render_queues(&mut out, &gauges.queues);
        if let Some(rss) = resident_bytes() {
            let _ = writeln!(
                out,
                "# HELP ticketd_resident_memory_bytes The process's resident memory.\n# TYPE ticketd_resident_memory_bytes gauge\nticketd_resident_memory_bytes {rss}"
            );
        }
        out.push_str("# HELP ticketd_guard_entries Entries in each per-client guard table (bounded; see security.max_tracked_clients).\n# TYPE ticketd_guard_entries gauge\n");
        for (table, entries, _) in &gauges.guard_tables {
            let _ = writeln!(out, "ticketd_guard_entries{{table=\"{table}\"}} {entries}");
        }
        out.push_str("# HELP ticketd_guard_capacity The most entries each guard table holds; a new client at a full table evicts the least recently used.\n# TYPE ticketd_guard_capacity gauge\n");
        for (table, _, capacity) in &gauges.guard_tables {
            let _ = writeln!(out, "ticketd_guard_capacity{{table=\"{table}\"}} {capacity}");
        }
        let dropped = self.access_log_dropped.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP ticketd_access_log_dropped_total Access-log lines dropped because the writer fell behind.\n# TYPE ticketd_access_log_dropped_total counter\nticketd_access_log_dropped_total {dropped}"
        );
        out.push_str(
            "# HELP ticketd_unparsed_requests_total Requests the HTTP parser refused before routing (a garbled \
             request line or header, a URI or header section past its limit), by the status answered; not in \
             ticketd_http_requests_total.\n# TYPE ticketd_unparsed_requests_total counter\n",
        );
        for (status, n) in UNPARSED_STATUSES.iter().zip(&self.unparsed) {
            let n = n.load(Ordering::Relaxed);
            let _ = writeln!(out, "ticketd_unparsed_requests_total{{status=\"{status}\"}} {n}");
        }
        let hashes = self.password_hashes.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP ticketd_password_hashes_total Argon2 hashes computed: made or verified (a login for an unknown name verifies a dummy one).\n# TYPE ticketd_password_hashes_total counter\nticketd_password_hashes_total {hashes}"
        );
        out.push_str(
            "# HELP ticketd_connections_refused_total Connections closed at once, by the cap they met: cap \
             (server.max_connections), per_address (one address at server.max_connections_per_ip), admin (the \
             admin listener's 32).\n# TYPE ticketd_connections_refused_total counter\n",
        );
        for reason in Refused::ALL {
            let n = self.connections_refused[reason as usize].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "ticketd_connections_refused_total{{reason=\"{}\"}} {n}",
                reason.label()
            );
        }
        let counters = [
            (
                "ticketd_accept_failures_total",
                "Accepts that failed, mostly at the open-file limit: those connections wait in the kernel's queue.",
                &self.accept_failures,
            ),
            (
                "ticketd_reloads_applied_total",
                "Config reloads applied.",
                &self.reloads_applied,
            ),
            (
                "ticketd_reloads_refused_total",
                "Config reloads refused.",
                &self.reloads_refused,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// Which cap closed a connection at once (`ticketd_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `server.max_connections`: the node's public budget is full.
    Cap,
    /// One address (an IPv6 /64) holds `server.max_connections_per_ip`.
    PerAddress,
    /// The admin listener holds its 32.
    Admin,
}

impl Refused {
    const ALL: [Refused; 3] = [Refused::Cap, Refused::PerAddress, Refused::Admin];

    fn label(self) -> &'static str {
        match self {
            Refused::Cap => "cap",
            Refused::PerAddress => "per_address",
            Refused::Admin => "admin",
        }
    }
}

/// The process's resident set, from `/proc/self/statm` (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// The waiting rooms' figures, one series per activity.
fn render_queues(out: &mut String, queues: &[(String, crate::admission::RoomSummary)]) {
    if queues.is_empty() {
        return;
    }
    type Figure = fn(&crate::admission::RoomSummary) -> f64;
    let series: [(&str, &str, &str, Figure); 6] = [
        (
            "ticketd_queue_waiting",
            "gauge",
            "Places in a waiting room not yet reached.",
            |q| q.waiting as f64,
        ),
        (
            "ticketd_queue_joined_total",
            "counter",
            "Places taken in a waiting room.",
            |q| q.joined as f64,
        ),
        (
            "ticketd_queue_admitted_total",
            "counter",
            "Fans admitted with a pass.",
            |q| q.admitted as f64,
        ),
        (
            "ticketd_queue_abandoned_total",
            "counter",
            "Places skipped because their fan had gone.",
            |q| q.abandoned as f64,
        ),
        (
            "ticketd_queue_passes_expired_total",
            "counter",
            "Passes that expired unused.",
            |q| q.expired as f64,
        ),
        (
            "ticketd_queue_admit_rate",
            "gauge",
            "Admissions per second over the last ten seconds.",
            |q| q.admit_rate,
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help} In a cluster every node reports the room's: aggregate with max, not sum.\n# TYPE {name} {kind}"
        );
        for (activity, q) in queues {
            let _ = writeln!(out, "{name}{{activity=\"{activity}\"}} {}", value(q));
        }
    }
}

impl Metrics {
    fn render_workers(&self, out: &mut String, workers: &[WorkerReport]) {
        out.push_str("# HELP ticketd_worker_up 1 while the background worker runs, 0 once it stopped or failed.\n# TYPE ticketd_worker_up gauge\n");
        for w in workers {
            let up = usize::from(matches!(w.state, WorkerState::Running | WorkerState::Stopping));
            let _ = writeln!(
                out,
                "ticketd_worker_up{{worker=\"{}\",state=\"{}\"}} {up}",
                w.name,
                w.state.label()
            );
        }
        out.push_str("# HELP ticketd_worker_iterations_total Rounds of work each background worker has done.\n# TYPE ticketd_worker_iterations_total counter\n");
        for w in workers {
            let _ = writeln!(
                out,
                "ticketd_worker_iterations_total{{worker=\"{}\"}} {}",
                w.name, w.iterations
            );
        }
        out.push_str("# HELP ticketd_worker_errors_total Errors each background worker survived (it retries).\n# TYPE ticketd_worker_errors_total counter\n");
        for w in workers {
            let _ = writeln!(out, "ticketd_worker_errors_total{{worker=\"{}\"}} {}", w.name, w.errors);
        }
        out.push_str("# HELP ticketd_worker_last_error_age_seconds Seconds since the worker's last error, with the error as a label.\n# TYPE ticketd_worker_last_error_age_seconds gauge\n");
        for w in workers {
            if let (Some(error), Some(age)) = (&w.last_error, w.last_error_age_secs) {
                let error: String = error.chars().take(160).collect();
                let _ = writeln!(
                    out,
                    "ticketd_worker_last_error_age_seconds{{worker=\"{}\",error=\"{}\"}} {age}",
                    w.name,
                    escape(&error)
                );
            }
        }
    }

    fn render_cluster(&self, out: &mut String, c: &ClusterGauges, leased: &[(String, String, usize)]) {
        out.push_str("# HELP ticketd_leased_codes Codes leased to this node and not yet claimed.\n# TYPE ticketd_leased_codes gauge\n");
        for (activity, ticket, n) in leased {
            let _ = writeln!(
                out,
                "ticketd_leased_codes{{activity=\"{}\",ticket=\"{}\"}} {n}",
                escape(activity),
                escape(ticket)
            );
        }
        let gauges = [
            (
                "ticketd_mongo_backlog",
                "Claims acknowledged by this node, not yet in MongoDB.",
                c.backlog,
            ),
            (
                "ticketd_redis_up",
                "1 if Redis answered the last command.",
                usize::from(c.redis_up),
            ),
            (
                "ticketd_redis_durable",
                "1 if Redis said at the last look that it keeps every write it acknowledges (appendonly yes, appendfsync always, no eviction); 0: claims are refused.",
                usize::from(c.redis_durable),
            ),
            (
                "ticketd_mongo_up",
                "1 if MongoDB took the last write.",
                usize::from(c.mongo_up),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        let histograms = [
            (
                "ticketd_redis_commit_seconds",
                "Round trips of the Redis commit script.",
                &self.redis_commit,
            ),
            (
                "ticketd_redis_lease_seconds",
                "Round trips of the Redis lease script.",
                &self.redis_lease,
            ),
            (
                "ticketd_mongo_write_seconds",
                "Bulk inserts of claims into MongoDB.",
                &self.mongo_write,
            ),
        ];
        for (name, help, h) in histograms {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            h.render(out, name, "");
        }
        let counters = [
            (
                "ticketd_codes_leased_total",
                "Codes leased from the master lists.",
                &self.codes_leased,
            ),
            (
                "ticketd_leases_reaped_total",
                "Dead nodes' leases this node reclaimed, counted per activity (one dead node selling two activities counts two).",
                &self.leases_reaped,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
    }
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
