//! The command line: `ticketd serve | import | retire | user | export |
//! report | check-config | verify | verify-draw | bench`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{config::LogFormat, export::ExportFormat};

/// ticketd — a ticket-rush (抢票) service that never oversells.
///
/// One binary: the HTTP service, the organiser's tools and a load generator.
/// Every command reads the same config file (default ./config.toml).
#[derive(Debug, Parser)]
#[command(name = "ticketd", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Path to the config file.
    #[arg(long, short, global = true, env = "TICKETD_CONFIG", default_value = "config.toml")]
    pub config: PathBuf,

    /// Log format; overrides `[log] format`.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API. In embedded mode, imports the config's activities first.
    ///
    /// Signals: SIGHUP reloads the config; SIGTERM/SIGINT shut down gracefully
    /// (a second one exits at once, losing no acknowledged claim).
    Serve,
    /// Load the config's activities, ticket types and codes into the store.
    ///
    /// Idempotent: running it twice adds nothing twice, and a claimed code is
    /// never put back. A running node picks new codes up on SIGHUP (a
    /// cluster's nodes lease them from Redis with no reload).
    Import,
    /// Cluster: take an imported activity off sale on the nodes that serve
    /// the activities `ticketd import` stored (those whose config names
    /// none), within `cluster.refresh_interval`. Its claims stay; importing
    /// it again brings it back. (A node that names activities in its file
    /// serves those: take one out of the file and reload.)
    Retire {
        /// The activity id.
        #[arg(long)]
        activity: String,
    },
    /// Manage user accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Export an activity's claims (CSV, JSON lines or Parquet), its
    /// rejections per reason and minute, or its waiting room's draw.
    Export(ExportArgs),
    /// Write a self-contained HTML report of an activity's rush (charts as inline SVG).
    Report(ReportArgs),
    /// Validate the config file and print every problem with its line
    /// (misspelled keys all; past a syntax error, or a value the parser
    /// cannot read, nothing more: it stops there). The file alone: what
    /// only the store can tell (a ticket type moved to another activity, a
    /// waiting room already open) import and reload check.
    CheckConfig,
    /// Reconcile the store after an incident; exits 1 listing every problem.
    /// Checks that every claim's code exists and is its ticket's, no code
    /// is claimed twice, nobody is over the limit, and the store's parts
    /// agree: embedded, the journal (every segment, damaged byte ranges,
    /// missing sequence numbers) and SQLite; in a cluster, the master
    /// lists, leases and claims partition the codes, the counters match,
    /// and MongoDB holds Redis's claims but those still in a backlog. With
    /// --repair (embedded; no node may be serving), rewrite each broken
    /// journal segment keeping every valid record, voiding each lost
    /// sequence number, and keep the original as `<segment>.damaged`.
    Verify(VerifyArgs),
    /// Recompute a waiting room's draw from the file `ticketd export --what
    /// draw` wrote: the seed must match the commitment published before the
    /// room opened, and the order must be the seed's draw of the entrants.
    /// Needs no config and no store; exits non-zero when the draw does not hold.
    VerifyDraw {
        /// The exported draw (JSON).
        file: PathBuf,
        /// The commitment published before the room opened (hex): the
        /// record's must be it. Without it, compare the printed one yourself.
        #[arg(long)]
        commitment: Option<String>,
    },
    /// Rush an activity over HTTP, report throughput and latency, and verify
    /// that nothing was oversold (exits non-zero on any violation).
    Bench(BenchArgs),
}

/// `ticketd verify`
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Rewrite broken segments, keeping every valid record.
    #[arg(long)]
    pub repair: bool,
}

/// `ticketd user ...`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create one user. The password is read from stdin (or prompted for on a terminal).
    Add {
        /// Login name.
        #[arg(long)]
        username: String,
        /// Display name (defaults to the username).
        #[arg(long)]
        nickname: Option<String>,
    },
    /// Create users from a CSV file with the columns username, password,
    /// nickname and, optionally, created_at (a header row is optional;
    /// created_at, RFC 3339, carries a registration time over from another
    /// system, for min_account_age; default now). Hashes in parallel;
    /// existing usernames are skipped. A bad row, or an account named
    /// twice, refuses the whole file.
    Import {
        /// The CSV file.
        file: PathBuf,
    },
    /// Set a user's password (a fan who forgot theirs), read from stdin
    /// (or prompted for on a terminal). Sessions already open stay valid
    /// until they expire: to end them at once, add the account to
    /// `security.blocked_users` and reload.
    Passwd {
        /// Login name.
        #[arg(long)]
        username: String,
    },
    /// List users (id, username, nickname, created).
    List,
}

/// What `ticketd export` writes.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ExportWhat {
    /// Every claim: claim id, activity, ticket type, code, user id, username, nickname, time.
    Claims,
    /// The refused claim requests, counted per reason and minute.
    Rejections,
    /// A queue's or lottery's draw, as JSON: the entrants, the revealed seed,
    /// the order (check it with `ticketd verify-draw FILE`).
    Draw,
}

/// `ticketd report`
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The activity id.
    #[arg(long)]
    pub activity: String,
    /// The HTML file to write (default `report-<ID>.html`: one activity's
    /// report does not overwrite another's).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Rows in the "most claims by address / account" rankings (1-10000).
    #[arg(long, default_value_t = 10, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(1..=10_000), usize::from))]
    pub top: usize,
}

/// `ticketd export`
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The activity id.
    #[arg(long)]
    pub activity: String,
    /// Claims, rejections per reason and minute, or a waiting room's draw.
    #[arg(long, value_enum, default_value = "claims")]
    pub what: ExportWhat,
    /// Output format: claims as csv (the default), jsonl or parquet;
    /// rejections as csv or jsonl. A draw is always one JSON document.
    #[arg(long, value_enum)]
    pub format: Option<ExportFormat>,
    /// Write to this file instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Start a CSV with a UTF-8 byte-order mark, so Excel reads Chinese text right.
    #[arg(long)]
    pub bom: bool,
}

/// `ticketd bench`
#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// Base URL of a node, e.g. http://127.0.0.1:3000 (repeat for several; used round-robin).
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// The activity to rush.
    #[arg(long)]
    pub activity: String,
    /// Number of distinct users (1-10000000).
    #[arg(long, default_value_t = 1000, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..=10_000_000), |n| n as usize))]
    pub users: usize,
    /// Requests in flight at once (1-100000).
    #[arg(long, default_value_t = 64, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..=100_000), |n| n as usize))]
    pub concurrency: usize,
    /// Claims each user sends (at the same moment, to test the per-user
    /// limit; 1-1000, the highest limit an activity may have).
    #[arg(long, default_value_t = 1, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(1..=1000), usize::from))]
    pub claims_per_user: usize,
    /// Register users that do not exist yet.
    #[arg(long)]
    pub create_users: bool,
    /// Usernames are this prefix plus a number.
    #[arg(long, default_value = "bench-user-")]
    pub user_prefix: String,
    /// Password of every bench user (an example value; bench users are throwaway).
    #[arg(long, default_value = "bench-password")]
    pub password: String,
    /// Claim this ticket type instead of any.
    #[arg(long)]
    pub ticket: Option<String>,
    /// Send claims at this fixed rate (requests/s) instead of as fast as
    /// possible; latency then counts from each request's scheduled time, so
    /// queueing is included (no coordinated omission). Use it to measure
    /// latency below saturation.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Also run this many bot accounts that hammer the claim endpoint (the
    /// scalper scenario): half the normal users rush alone, the other half
    /// while the bots fire, and the report compares their latency.
    #[arg(long, default_value_t = 0)]
    pub bots: usize,
    /// Each bot sends this many times the claims of a normal user.
    #[arg(long, default_value_t = 100)]
    pub bot_rate: usize,
    /// Print the report as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also measure a bare hyper hello-world, served in this process, at
    /// the same concurrency: the yardstick the claims are compared with.
    #[arg(long)]
    pub baseline: bool,
    /// Drive the users through the activity's waiting room instead of a
    /// rush: join, wait on an open event stream each, claim with the pass
    /// when admitted; reports join, admission and claim latency and the
    /// node's memory per waiting user (from its `/metrics`).
    #[arg(long)]
    pub queue: bool,
}
