//! The configuration tree: one struct per section, every field with its
//! meaning, unit and default (a named function), `deny_unknown_fields`
//! everywhere. Environment overrides for secrets and connection strings
//! live beside the fields they override.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use super::units::{ByteSize, HumanDuration, IpNet, TimeSpec};

/// The whole configuration of a node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP listener and its protections.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where claims, users and codes are kept.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Cluster mode: leases, commit batches, the MongoDB backlog.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// The claim journal: group commit and fsync policy.
    #[serde(default)]
    pub journal: JournalConfig,
    /// Accounts, passwords and sessions.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Overload protection.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Defences against scalpers, bots and credential stuffing.
    #[serde(default)]
    pub security: SecurityConfig,
    /// The admin API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The activities on sale (`[[activity]]` tables).
    #[serde(default, rename = "activity")]
    pub activities: Vec<ActivityConfig>,
    /// The directory of the config file; `codes_file` paths are relative to it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// Keys the file sets to no effect (an activity's `admit_rate` on a
    /// lottery, say), found by validation: said, not refused.
    /// Each as shown: `line N: …`.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// `[server]`: the HTTP listener.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:3000`. Restart-only.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Open connections beyond this are closed at once; connections that
    /// hold a waiting room's event stream count apart, up to as many again.
    /// Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Public connections one client address (an IPv6 /64) may hold open at
    /// once; trusted proxies are not held to it (Nginx keeps its own
    /// `limit_conn`). Without it one address could hold every connection
    /// the node takes. Default 1000 (a carrier's NAT holds many fans, and
    /// each waiting one holds an event stream). Restart-only.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// A client must send its full request head within this time (slowloris). Default `5s`.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: HumanDuration,
    /// A request body must arrive within this time. Default `10s`.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: HumanDuration,
    /// A client must take each part of an answer within this time: one
    /// that stops reading is let go instead of holding its connection (as
    /// Nginx's `send_timeout`). Default `30s`.
    #[serde(default = "default_write_timeout")]
    pub write_timeout: HumanDuration,
    /// Largest accepted request body. Default `16KiB`.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// This node's name in exports and reports (which node handed out a code).
    /// Default: the host name. Restart-only.
    #[serde(default)]
    pub node_id: Option<String>,
    /// On shutdown, in-flight requests get this long to finish. Default `10s`.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
    /// Threads serving public connections (`http::lanes`), each with a
    /// single-threaded runtime. Default 0: one per CPU core. Restart-only.
    #[serde(default)]
    pub threads: usize,
}

/// `[storage]`: where state lives.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `"embedded"` (one node, no external service; the default).
    #[serde(default)]
    pub mode: StorageMode,
    /// Data directory (SQLite store, journal, session key). Default `./data`,
    /// relative to the working directory. Restart-only.
    #[serde(default = "default_data_path")]
    pub path: PathBuf,
    /// Cluster mode: the Redis holding master lists, leases and the claim
    /// commit (`redis://host:port/db`): one server, or any master of a Redis
    /// Cluster (the node asks it at start which it is). `TICKETD_REDIS_URL`
    /// overrides it, so a password need not live in the file. Restart-only.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Cluster mode: the MongoDB system of record. `TICKETD_MONGODB_URI`
    /// overrides it. Restart-only.
    #[serde(default)]
    pub mongodb_uri: Option<String>,
    /// Cluster mode: the MongoDB database. Default `ticketd`. Restart-only.
    #[serde(default = "default_database")]
    pub database: String,
}

/// `[cluster]`: how a node shares stock with the others (cluster mode only).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// A lease not renewed for this long is dead: live nodes put its unclaimed
    /// codes back on the master list. Renewed every quarter of it. Default `10s`.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: HumanDuration,
    /// A node keeps about this much of its recent claim rate leased ahead. Default `500ms`.
    #[serde(default = "default_lease_ahead")]
    pub lease_ahead: HumanDuration,
    /// Smallest batch leased while the master list is long. Default 16.
    #[serde(default = "default_lease_min_batch")]
    pub lease_min_batch: usize,
    /// Largest batch leased at once. Default 4096.
    #[serde(default = "default_lease_max_batch")]
    pub lease_max_batch: usize,
    /// Most claims committed to Redis by one round trip. Default 512.
    #[serde(default = "default_commit_batch")]
    pub commit_batch: usize,
    /// A commit batch whose outcome is unknown (Redis went away) is retried
    /// for this long before its claims are answered 503. Default `2s`.
    #[serde(default = "default_commit_timeout")]
    pub commit_timeout: HumanDuration,
    /// Claims acknowledged but not yet in MongoDB, per node and activity
    /// (each activity's backlog is its own Redis list, in its hash slot).
    /// When reached the node answers that activity's claims 503
    /// BACKLOG_FULL instead of acknowledging. Default 1000000.
    #[serde(default = "default_max_backlog")]
    pub max_backlog: usize,
    /// Claims written to MongoDB by one bulk insert. Default 1000.
    #[serde(default = "default_mongo_batch")]
    pub mongo_batch: usize,
    /// How often remaining stock per ticket type is refreshed from Redis.
    /// Default `1s`.
    #[serde(default = "default_refresh_interval")]
    pub refresh_interval: HumanDuration,
    /// Serve even when Redis does not say `appendonly yes` and `appendfsync
    /// always`: a claim it acknowledged may then be lost in a Redis crash
    /// and its code handed out again. For demos and benchmarks only.
    /// Default false: a node refuses such a Redis. Restart-only.
    #[serde(default)]
    pub allow_volatile_redis: bool,
    /// How many replicas of the master must hold each commit batch before
    /// its claims are answered (Redis `WAIT`). A replica promoted in a
    /// failover has only what reached it: a commit the old master took but
    /// had not yet passed on is gone, and its codes are sold again. A
    /// batch not confirmed in time is answered 503 (its outcome settled
    /// later, as when Redis goes away mid-commit). Default 0; a node
    /// refuses a Redis with replicas while it is 0, and a `replica_acks`
    /// above the replicas a master has. Restart-only.
    #[serde(default)]
    pub replica_acks: usize,
}

/// Which store backs the node.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// SQLite plus a local claim journal in `storage.path`.
    #[default]
    Embedded,
    /// Several nodes sharing stock through Redis, with MongoDB as the system
    /// of record (`redis_url`, `mongodb_uri`, `[cluster]`).
    Cluster,
}

/// `[journal]`: how acknowledged claims are made durable.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// `"always"`: fsync every group commit before any claim in it is
    /// acknowledged (survives power loss). `"never"`: write to the OS before
    /// acknowledging (survives a crash of ticketd, not of the machine).
    /// Default `"always"`.
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// Most claims written by one group commit. Default 4096.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Claims waiting for the journal beyond this are refused with 503. Default 65536.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// A journal segment is closed and a new one started past this size. Default `64MiB`.
    #[serde(default = "default_segment_size")]
    pub segment_size: ByteSize,
    /// With `fsync = "always"`, zeros the writer keeps laid (and durable)
    /// ahead of what it wrote, so a group commit's fsync skips the
    /// filesystem's metadata journal; `0` appends instead. Default `1MiB`.
    #[serde(default = "default_preallocate")]
    pub preallocate: ByteSize,
}

/// When the journal calls fsync.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// fsync each group commit before acknowledging it.
    #[default]
    Always,
    /// Never fsync; the OS writes back in its own time.
    Never,
}

/// The most memory one password hash may take: each of
/// `max_concurrent_hashes` takes it while it runs, and a reload hashes at
/// the new cost at once. A stored hash asking for more is not computed
/// (see `auth::password::verify`).
pub const MAX_ARGON2_MEMORY_KIB: u32 = 1 << 20;
/// The most argon2 passes: at the most memory, some seconds a hash already.
pub const MAX_ARGON2_ITERATIONS: u32 = 64;

/// `[auth]`: accounts and sessions.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether `POST /user/register` is open to anyone. Default true.
    #[serde(default = "yes")]
    pub open_registration: bool,
    /// Argon2id memory cost in KiB. Default 19456 (OWASP's recommendation).
    #[serde(default = "default_argon2_memory")]
    pub argon2_memory_kib: u32,
    /// Argon2id passes. Default 2.
    #[serde(default = "default_argon2_iterations")]
    pub argon2_iterations: u32,
    /// Password hashes (logins, registrations) run at once; each holds
    /// `argon2_memory_kib` while it runs. Default: the number of CPU cores.
    /// Restart-only.
    #[serde(default)]
    pub max_concurrent_hashes: Option<usize>,
    /// Logins and registrations that may wait for a hashing turn; beyond
    /// them the answer is 503 with Retry-After at once. Default 256.
    /// Restart-only.
    #[serde(default = "default_hash_queue")]
    pub hash_queue: usize,
    /// Of those turns and places, how many one client address (an IPv6
    /// /64) may hold at once; its /48 `vocab::SITE_BUDGETS` (8) times as many. Past it: 429
    /// `LOGIN_THROTTLED`. Default 4.
    #[serde(default = "default_hashes_per_ip")]
    pub hashes_per_ip: u32,
    /// How long a login token stays valid. Default `24h`.
    #[serde(default = "default_session_ttl")]
    pub session_ttl: HumanDuration,
    /// The previous signing secret, still accepted while tokens signed with
    /// it live (key rotation). Prefer `TICKETD_SESSION_SECRET_PREVIOUS`.
    #[serde(default)]
    pub previous_session_secret: Option<String>,
    /// Secret that signs session tokens. EXAMPLE ONLY in the bundled config;
    /// prefer the `TICKETD_SESSION_SECRET` environment variable. When neither
    /// is set, a random key is generated once and kept in the data directory
    /// (in a cluster, in MongoDB's `meta`, where every node finds it).
    #[serde(default)]
    pub session_secret: Option<String>,
}

/// `[limits]`: overload protection.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Claims being processed at once; beyond this `/ticket/get` answers 503
    /// with Retry-After at once instead of queueing. Default 8192.
    #[serde(default = "default_max_in_flight_claims")]
    pub max_in_flight_claims: usize,
    /// Claims of one activity processed at once; beyond this that activity's
    /// claims answer 503 (one hot activity cannot starve the others). Default 4096.
    #[serde(default = "default_max_in_flight_per_activity")]
    pub max_in_flight_per_activity: usize,
}

/// `[security]`: defences against scalpers, bots and credential stuffing.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// Claims must carry the `claimToken` that `/act/detail` hands a
    /// logged-in user once the activity has started. Default true.
    #[serde(default = "yes")]
    pub require_claim_token: bool,
    /// How long a claim token stays valid. Default `10m`.
    #[serde(default = "default_claim_token_ttl")]
    pub claim_token_ttl: HumanDuration,
    /// Peers whose `X-Forwarded-For` is believed (CIDRs or addresses). Default none.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Usernames refused at login and claim (403 BLOCKED). Default none.
    #[serde(default)]
    pub blocked_users: Vec<String>,
    /// Client addresses or CIDR ranges refused everywhere (403 BLOCKED). Default none.
    #[serde(default)]
    pub blocked_ips: Vec<IpNet>,
    /// Claims per second one user may sustain (token bucket). Default 2.
    #[serde(default = "default_user_rate")]
    pub claim_rate_per_user: f64,
    /// Claims one user may send in a burst. Default 5.
    #[serde(default = "default_user_burst")]
    pub claim_burst_per_user: u32,
    /// Claims per second one client address may sustain. Default 200.
    #[serde(default = "default_ip_rate")]
    pub claim_rate_per_ip: f64,
    /// Claims one client address may send in a burst. Default 400.
    #[serde(default = "default_ip_burst")]
    pub claim_burst_per_ip: u32,
    /// Accounts one client address may register per hour. Default 30.
    #[serde(default = "default_registrations_per_ip")]
    pub registrations_per_ip_per_hour: u32,
    /// Failed logins per username before a lockout (an address gets four
    /// times as many). Default 5.
    #[serde(default = "default_login_max_failures")]
    pub login_max_failures: u32,
    /// The first lockout; each further failure doubles it. Default `1s`.
    #[serde(default = "default_login_backoff")]
    pub login_backoff: HumanDuration,
    /// The longest lockout. Default `15m`.
    #[serde(default = "default_login_backoff_max")]
    pub login_backoff_max: HumanDuration,
    /// Entries each guard table (claim buckets per address and per user,
    /// registrations per address, login failures per address and per
    /// account-at-address) holds at most; a new key at a full table evicts
    /// the least recently used entry. Default 100000 (a few MB per table).
    /// Restart-only.
    #[serde(default = "default_max_tracked_clients")]
    pub max_tracked_clients: usize,
    /// Origins (`scheme://host[:port]`) other than the API's own host whose
    /// pages may POST to it from a browser. Default none: cross-site
    /// requests (by `Origin` or `Sec-Fetch-Site`) are refused with 403.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

/// `[admin]`: operations over HTTP (reload, stats, export).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// A separate listener for `/admin/*`; keep it on loopback. Unset = no
    /// admin API. Restart-only.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The admin bearer token (>= 32 characters). EXAMPLE ONLY in the bundled
    /// config; prefer the `TICKETD_ADMIN_TOKEN` environment variable.
    #[serde(default)]
    pub token: Option<String>,
}

/// `[log]`: logging.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `"auto"` (human on a terminal, JSON lines otherwise), `"human"` or `"json"`. Default `"auto"`.
    #[serde(default)]
    pub format: LogFormat,
    /// Filter in `RUST_LOG` syntax; `RUST_LOG` wins when set. Default `"info"`.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// A file to append one JSON line per request to. Unset (the default) = off.
    #[serde(default)]
    pub access_log: Option<std::path::PathBuf>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human on a terminal, JSON lines otherwise.
    #[default]
    Auto,
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// `[[activity]]`: one sale. Serialisable (codes left out) because cluster
/// mode keeps each imported definition in MongoDB, where nodes that carry no
/// activities in their own file read it.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActivityConfig {
    /// Stable identity (`actId` in the API); letters, digits, `-`, `_`, `.`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Description. Default empty.
    #[serde(default)]
    pub desc: String,
    /// Image URL. Default empty.
    #[serde(default)]
    pub image: String,
    /// When claiming opens (RFC 3339 or relative to node start, e.g. `"+10s"`).
    pub start_time: TimeSpec,
    /// When claiming closes.
    pub end_time: TimeSpec,
    /// Most codes one user may claim in this activity. Default 1.
    #[serde(default = "default_per_user_limit")]
    pub per_user_limit: u32,
    /// When true, claims answer 409 PAUSED at once; stock is kept. Default false.
    #[serde(default)]
    pub paused: bool,
    /// Proof of work per claim token, in leading zero bits of
    /// SHA-256(claimToken ":" nonce); 0 = off. Default 0.
    #[serde(default)]
    pub pow_difficulty: u8,
    /// Only accounts made more than this long before `start_time` may claim
    /// or join the queue (e.g. `"7d"`, at most ten years): accounts a farm
    /// makes for the sale are too young to take part. Accounts imported
    /// with `ticketd user import` count as made at the import, unless the
    /// CSV gives their `created_at`. Default: any account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_account_age: Option<HumanDuration>,
    /// How buyers get their turn: `"race"` (the first claims after
    /// `start_time` win; the default), `"queue"` (a waiting room shuffled
    /// at `start_time`, admitted at `admit_rate`) or `"lottery"` (抽签:
    /// entries until `draw_time`, then a draw). See README, "Fair admission".
    #[serde(default, skip_serializing_if = "AdmissionMode::is_race")]
    pub admission: AdmissionMode,
    /// Queue and lottery: when fans may join, before `start_time`. Required for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_opens: Option<TimeSpec>,
    /// Lottery: when entries close and the draw is made; after
    /// `queue_opens`, not after `start_time`. Default: `start_time`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draw_time: Option<TimeSpec>,
    /// Queue: places admitted per second from `start_time` (never more than
    /// the stock left can serve). Default 50.
    #[serde(default = "default_admit_rate")]
    pub admit_rate: f64,
    /// Queue and lottery: how long an admitted fan's pass is good for; an
    /// unused pass then goes to the next in line. Default `2m`.
    #[serde(default = "default_pass_ttl")]
    pub pass_ttl: HumanDuration,
    /// Queue and lottery: a place whose fan has not been seen (an open event
    /// stream or a status request) for this long is skipped when reached.
    /// Default `1m`.
    #[serde(default = "default_grace")]
    pub grace: HumanDuration,
    /// Queue and lottery: most places; joins beyond it are refused with 503
    /// QUEUE_FULL. Default 1000000.
    #[serde(default = "default_queue_capacity_places")]
    pub queue_capacity: u32,
    /// The ticket types (`[[activity.ticket]]`).
    #[serde(default, rename = "ticket")]
    pub tickets: Vec<TicketConfig>,
}

/// How an activity's buyers get their turn.
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AdmissionMode {
    /// First come, first served (claim tokens, proof of work and rate limits apply).
    #[default]
    Race,
    /// A waiting room: joiners before the start are shuffled, later ones queue in order.
    Queue,
    /// A draw among the entrants, with the rest as a waiting list.
    Lottery,
}

impl std::fmt::Display for AdmissionMode {
    /// As the config writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AdmissionMode::Race => "race",
            AdmissionMode::Queue => "queue",
            AdmissionMode::Lottery => "lottery",
        })
    }
}

impl AdmissionMode {
    /// Whether this is the plain race.
    pub fn is_race(&self) -> bool {
        *self == AdmissionMode::Race
    }
}

/// `[[activity.ticket]]`: one ticket type and its codes.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TicketConfig {
    /// Stable identity (`ticketId` in the claim request), unique across activities.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Description. Default empty.
    #[serde(default)]
    pub desc: String,
    /// Start of the ticket's own validity (when the code can be redeemed). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<TimeSpec>,
    /// End of the ticket's own validity. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<TimeSpec>,
    /// The codes, inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codes: Option<Vec<String>>,
    /// A file with one code per line (relative to the config file). Read at load.
    #[serde(default, skip_serializing)]
    pub codes_file: Option<PathBuf>,
    /// Generate this many codes (CSPRNG, 80 bits each) once; raising it later adds the difference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<u32>,
}

impl TicketConfig {
    /// The explicit codes of this ticket (inline or read from `codes_file`); empty for `generate`.
    pub fn explicit_codes(&self) -> &[String] {
        self.codes.as_deref().unwrap_or(&[])
    }
}

impl ActivityConfig {
    /// This activity without its codes, as JSON (cluster mode keeps it in MongoDB).
    pub fn definition(&self) -> String {
        let mut a = self.clone();
        for t in &mut a.tickets {
            (t.codes, t.codes_file) = (None, None);
        }
        serde_json::to_string(&a).unwrap_or_default()
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3000))
}
fn default_max_connections_per_ip() -> usize {
    1000
}
fn default_max_connections() -> usize {
    10_000
}
fn default_header_read_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(5))
}
fn default_write_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}
fn default_request_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}
fn default_max_body() -> ByteSize {
    ByteSize(16 << 10)
}
fn default_shutdown_grace() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}
/// Environment variable that overrides `auth.session_secret`.
pub const SESSION_SECRET_ENV: &str = "TICKETD_SESSION_SECRET";
/// Environment variable that overrides `auth.previous_session_secret`.
pub const PREVIOUS_SESSION_SECRET_ENV: &str = "TICKETD_SESSION_SECRET_PREVIOUS";
/// Environment variable that overrides `admin.token`.
pub const ADMIN_TOKEN_ENV: &str = "TICKETD_ADMIN_TOKEN";

impl AuthConfig {
    /// The session signing secret: `TICKETD_SESSION_SECRET`, else `auth.session_secret`.
    pub fn session_secret(&self) -> Option<String> {
        env_or(SESSION_SECRET_ENV, &self.session_secret)
    }

    /// The previous signing secret: `TICKETD_SESSION_SECRET_PREVIOUS`, else
    /// `auth.previous_session_secret`.
    pub fn previous_session_secret(&self) -> Option<String> {
        env_or(PREVIOUS_SESSION_SECRET_ENV, &self.previous_session_secret)
    }

    /// `max_concurrent_hashes`, or the number of CPU cores.
    pub fn max_concurrent_hashes(&self) -> usize {
        self.max_concurrent_hashes
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1)
    }
}

impl ServerConfig {
    /// Lanes to start: `threads`, or one per CPU core when it is 0.
    pub fn lanes(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }
}

impl AdminConfig {
    /// The admin bearer token: `TICKETD_ADMIN_TOKEN`, else `admin.token`.
    pub fn token(&self) -> Option<String> {
        env_or(ADMIN_TOKEN_ENV, &self.token)
    }
}

/// Environment variable that overrides `storage.redis_url`.
pub const REDIS_URL_ENV: &str = "TICKETD_REDIS_URL";
/// Environment variable that overrides `storage.mongodb_uri`.
pub const MONGODB_URI_ENV: &str = "TICKETD_MONGODB_URI";

impl StorageConfig {
    /// The Redis URL: `TICKETD_REDIS_URL`, else `storage.redis_url`.
    pub fn redis_url(&self) -> Option<String> {
        env_or(REDIS_URL_ENV, &self.redis_url)
    }

    /// The MongoDB URI: `TICKETD_MONGODB_URI`, else `storage.mongodb_uri`.
    pub fn mongodb_uri(&self) -> Option<String> {
        env_or(MONGODB_URI_ENV, &self.mongodb_uri)
    }
}

fn env_or(var: &str, configured: &Option<String>) -> Option<String> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| configured.clone())
}

fn default_database() -> String {
    "ticketd".to_owned()
}
fn default_lease_ttl() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}
fn default_lease_ahead() -> HumanDuration {
    HumanDuration(std::time::Duration::from_millis(500))
}
fn default_lease_min_batch() -> usize {
    16
}
fn default_lease_max_batch() -> usize {
    4096
}
fn default_commit_batch() -> usize {
    512
}
fn default_commit_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(2))
}
fn default_max_backlog() -> usize {
    1_000_000
}
fn default_mongo_batch() -> usize {
    1000
}
fn default_refresh_interval() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(1))
}
fn default_data_path() -> PathBuf {
    PathBuf::from("./data")
}
fn default_max_batch() -> usize {
    4096
}
fn default_queue_capacity() -> usize {
    65_536
}
fn default_segment_size() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_preallocate() -> ByteSize {
    ByteSize(1 << 20)
}
fn yes() -> bool {
    true
}
fn default_argon2_memory() -> u32 {
    19_456
}
fn default_argon2_iterations() -> u32 {
    2
}
fn default_hash_queue() -> usize {
    256
}
fn default_hashes_per_ip() -> u32 {
    4
}
fn default_max_tracked_clients() -> usize {
    100_000
}
fn default_session_ttl() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(24 * 3600))
}
fn default_max_in_flight_claims() -> usize {
    8192
}
fn default_max_in_flight_per_activity() -> usize {
    4096
}
fn default_claim_token_ttl() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(600))
}
fn default_user_rate() -> f64 {
    2.0
}
fn default_user_burst() -> u32 {
    5
}
fn default_ip_rate() -> f64 {
    200.0
}
fn default_ip_burst() -> u32 {
    400
}
fn default_registrations_per_ip() -> u32 {
    30
}
fn default_login_max_failures() -> u32 {
    5
}
fn default_login_backoff() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(1))
}
fn default_login_backoff_max() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(900))
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_per_user_limit() -> u32 {
    1
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                toml::from_str("").expect("every field of this section has a default")
            }
        }
    )*};
}
default_from_serde!(
    ServerConfig,
    StorageConfig,
    ClusterConfig,
    JournalConfig,
    AuthConfig,
    LimitsConfig,
    SecurityConfig,
    LogConfig
);

impl Config {
    /// `server.node_id`, or the host name.
    pub fn node_id(&self) -> String {
        if let Some(id) = &self.server.node_id {
            return id.clone();
        }
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        match std::str::from_utf8(&buf[..end]) {
            Ok(name) if rc == 0 && !name.is_empty() => name.to_owned(),
            _ => "node".to_owned(),
        }
    }

    /// Drops code lists once they were imported, so a running node does not
    /// keep a second copy of every code beside its pools.
    pub fn strip_codes(&mut self) {
        for t in self.activities.iter_mut().flat_map(|a| a.tickets.iter_mut()) {
            t.codes = None;
        }
    }
}

impl Config {
    /// `auth.session_ttl` in milliseconds.
    pub fn session_ttl_ms(&self) -> i64 {
        i64::try_from(self.auth.session_ttl.0.as_millis()).unwrap_or(i64::MAX)
    }
}
fn default_admit_rate() -> f64 {
    50.0
}
fn default_pass_ttl() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(120))
}
fn default_grace() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}
fn default_queue_capacity_places() -> u32 {
    1_000_000
}
