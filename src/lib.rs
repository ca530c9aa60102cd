//! ticketd — a ticket-rush (抢票) service that never oversells.
//!
//! An organiser configures activities (活动); each has ticket types (票) with
//! a finite list of redeemable codes (券码). At the start time many users race
//! to claim them. A code goes to at most one user, ever; a user gets at most
//! the activity's per-user limit; every claim answered "success" survives a
//! crash.
//!
//! A request takes one path through the crate:
//! `http::server` → `http::router` → a handler → [`claim::Claimer`] →
//! [`inventory`] (reserve the user's slot, take a code) → [`store::Store::commit`]
//! (the [`journal`], group commit; in cluster mode one Redis script per batch)
//! → the store's [`vocab::CommitOutcome`] → settle → response.
//!
//! # Layout
//! From the ground floor up; a module imports only modules listed before it
//! (the integration test `layout` checks that, and that no circle exists).
//!
//! - [`clock`] — now, and RFC 3339 text for times;
//! - [`hex`] — lower-case hex of seeds, token ids and digests;
//! - [`vocab`] — the claim's vocabulary: `Claim`, `PendingClaim`, `CommitOutcome`, `Rejection`, `ClaimOutcome`;
//! - [`worker`] — background loops as named workers: one runner starts, reports and stops them in order;
//! - [`notify`] — the systemd notify protocol (READY, RELOADING, STATUS, WATCHDOG);
//! - [`signals`] — SIGHUP → reload, SIGTERM/SIGINT → the one shutdown watch (and the flag that
//!   start-up waits, such as a cluster node's for its id, look at);
//! - [`config`] — the config tree, its units (durations, sizes, address ranges, times), validation per section;
//! - [`admission`] — fair admission: waiting rooms and lotteries, the verifiable draw, passes' lifetimes;
//! - [`metrics`] — lock-free counters and histograms, Prometheus text;
//! - [`stats`] — rush statistics (outcomes per tenth of a second, requests per source, latency) for reports;
//! - [`journal`] — the append-only claim journal: record format, group commit, recovery;
//! - [`store`] — the storage boundary: the embedded SQLite store, and the cluster store
//!   (Redis leases and commit scripts, MongoDB write-behind);
//! - [`inventory`] — code pools per ticket type, claim ledgers per activity, leasing;
//! - [`catalog`] — the immutable activity/ticket snapshot behind `ArcSwap`;
//! - [`auth`] — argon2id passwords, HMAC session tokens and revocation
//!   (bounded per account), claim tokens and
//!   proof of work, the guard (blocklists, rate limits, login backoff, trusted proxies),
//!   each client's share of the password hashing;
//! - [`claim`] — the claim decision: window, tokens, limit, take, commit, settle;
//! - [`export`] — streaming CSV / JSON-lines / Parquet exports, the HTML rush report and its SVG charts;
//! - [`state`] — `AppState`: the handles a request may touch, and reload;
//! - [`http`] — accept loop and connection limits, the lanes (single-threaded runtimes)
//!   public connections live on, router, request parsing, the error shape, handlers
//!   (public API, admin API and live page, the fans' page), the access log;
//! - [`app`] — start-up steps, the node's workers, serving, the shutdown order;
//! - [`cli`] — clap definitions of every subcommand;
//! - [`bench`](mod@bench) — the rush simulator behind `ticketd bench` (and `--queue`, fans through a waiting room), and its HTTP client;
//! - [`commands`] — what each subcommand does (serve, import, retire, user, export, report, verify, verify-draw, check-config).

#![warn(missing_docs)]

pub mod admission;
pub mod app;
pub mod auth;
pub mod bench;
pub mod catalog;
pub mod claim;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod export;
pub mod hex;
pub mod http;
pub mod inventory;
pub mod journal;
pub mod metrics;
pub mod notify;
pub mod signals;
pub mod state;
pub mod stats;
pub mod store;
pub mod vocab;
pub mod worker;

use std::io::IsTerminal;

use cli::{Cli, Command};
use config::LogFormat;

/// Runs a parsed command line to completion.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig => {
            init_logging(cli.log_format.unwrap_or_default(), "warn");
            commands::check_config(&cli.config)
        }
        Command::VerifyDraw { file, commitment } => {
            init_logging(cli.log_format.unwrap_or_default(), "warn");
            commands::verify_draw(&file, commitment.as_deref())
        }
        Command::Bench(args) => {
            init_logging(cli.log_format.unwrap_or_default(), "warn");
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let json = args.json;
            if args.queue {
                let report = runtime.block_on(bench::queue::run(args))?;
                return bench::queue::print(&report, json);
            }
            let report = runtime.block_on(bench::run(args))?;
            bench::print(&report, json)
        }
        command => {
            if matches!(command, Command::Serve) {
                signals::hold_early_reloads();
            }
            let config = match command {
                Command::Export(_) | Command::Report(_) => commands::load_config_to_read(&cli.config)?,
                _ => commands::load_config(&cli.config)?,
            };
            let format = cli.log_format.unwrap_or(config.log.format);
            init_logging(format, &config.log.level);
            match command {
                Command::Serve => commands::serve(config, &cli.config),
                Command::Import => commands::import(&config),
                Command::Retire { activity } => commands::retire(&config, &activity),
                Command::User(u) => commands::user(&config, u),
                Command::Export(args) => commands::export(&config, &cli.config, args),
                Command::Report(args) => commands::report(&config, &cli.config, args),
                Command::Verify(args) => commands::verify(&config, args.repair),
                Command::CheckConfig | Command::Bench(_) | Command::VerifyDraw { .. } => {
                    unreachable!("handled above")
                }
            }
        }
    }
}

/// Human lines on a terminal, JSON lines otherwise (systemd/journald), unless set.
fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).with_current_span(false).try_init()
    } else {
        builder.try_init()
    };
}
