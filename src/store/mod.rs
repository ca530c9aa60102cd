//! The store boundary: everything the node keeps beyond its memory.
//!
//! [`Store`] is an enum over backends rather than a trait object, so the
//! claim path calls [`Store::commit`] with static dispatch and no boxed
//! future. [`EmbeddedStore`] is SQLite plus the claim journal in
//! `storage.path` (one node, the default); [`ClusterStore`] is Redis leases
//! and commits with MongoDB as the system of record (`storage.mode =
//! "cluster"`).

pub mod cluster;
mod embedded;

use std::sync::Arc;

pub use cluster::{ClusterError, ClusterStore};
pub use embedded::EmbeddedStore;

use crate::{
    claim::{Claim, PendingClaim},
    config::Config,
    journal::JournalError,
};

/// Why the store refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory could not be used.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Another process serves this data directory.
    #[error("the data directory {0} is in use by another running ticketd (stop it, or use `kill -HUP` to reload it)")]
    Locked(std::path::PathBuf),
    /// SQLite failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The journal could not be replayed or opened.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The username exists already.
    #[error("the username is taken")]
    UsernameTaken,
    /// Redis or MongoDB failed (cluster mode).
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// A registered user.
#[derive(Debug, Clone)]
pub struct User {
    /// Stable numeric id.
    pub id: u64,
    /// Login name (unique).
    pub username: String,
    /// Display name.
    pub nickname: String,
    /// The argon2id PHC string.
    pub password_hash: String,
    /// Registration time, Unix ms.
    pub created_at_ms: i64,
}

/// A claim joined with its user, for export.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClaimRow {
    /// Claim id.
    pub claim_id: u64,
    /// Activity id.
    pub activity_id: String,
    /// Ticket type id.
    pub ticket_id: String,
    /// The code.
    pub code: String,
    /// User id.
    pub user_id: u64,
    /// Username.
    pub username: String,
    /// Nickname.
    pub nickname: String,
    /// Claim time, Unix ms.
    pub claimed_at_ms: i64,
    /// The node that handed the code out.
    pub node: String,
}

/// What an import added, per ticket type.
#[derive(Debug, Default)]
pub struct ImportReport {
    /// Activities inserted or updated.
    pub activities: usize,
    /// Per ticket: id, codes added now (never claimed), codes known in total.
    pub tickets: Vec<TicketImport>,
    /// Codes in the config that already belong to another ticket type (skipped).
    pub conflicts: Vec<String>,
}

/// One ticket type's import result.
#[derive(Debug)]
pub struct TicketImport {
    /// Ticket id.
    pub ticket_id: String,
    /// Codes inserted by this import.
    pub added: Vec<String>,
    /// Codes the store knows for this ticket after the import.
    pub total: usize,
}

/// Everything the rush report shows about one activity, read from the store.
#[derive(Debug, Default)]
pub struct ReportData {
    /// Name, start, end (Unix ms) and per-user limit, if the store knows the activity.
    pub activity: Option<(String, i64, i64, u32)>,
    /// Per ticket type: id, name, codes, claimed, first and last claim (Unix ms).
    pub tickets: Vec<TicketReport>,
    /// `(unix second, claims)`, ascending.
    pub claims_per_second: Vec<(i64, u64)>,
    /// `(unix minute, outcome label, requests)`, ascending by minute.
    pub outcomes: Vec<(i64, String, u64)>,
    /// `(bucket upper bound in ms, claims)`; the last bound is infinite.
    pub latency: Vec<(f64, u64)>,
    /// The addresses that sent the most claims: `(address, requests)`.
    pub top_ips: Vec<(String, u64)>,
    /// The accounts that sent the most claims: `(username, requests)`.
    pub top_users: Vec<(String, u64)>,
    /// Distinct users holding a claim.
    pub users: u64,
    /// `(node, claims)`: which node handed out how much of the stock.
    pub nodes: Vec<(String, u64)>,
}

/// One ticket type in the report.
#[derive(Debug, Default)]
pub struct TicketReport {
    /// Ticket id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Codes known.
    pub codes: u64,
    /// Codes claimed.
    pub claimed: u64,
    /// First claim, Unix ms.
    pub first_ms: Option<i64>,
    /// Last claim, Unix ms.
    pub last_ms: Option<i64>,
}

/// The stock of one activity, as [`Store::stock`] sees it.
#[derive(Debug)]
pub struct Stock {
    /// Codes not claimed, all ticket types.
    pub remaining: usize,
    /// Codes claimed.
    pub claimed: usize,
    /// Per ticket type in catalog order: `(total, remaining)`.
    pub tickets: Vec<(usize, usize)>,
}

/// How a process uses the data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The serving node: takes the directory lock, replays and runs the journal.
    Serve,
    /// A command-line tool: shares the store with a running node; when none
    /// runs, first applies any journal a crashed node left behind.
    Tool,
}

/// The store behind a node.
pub enum Store {
    /// SQLite and a local journal.
    Embedded(EmbeddedStore),
    /// Redis and MongoDB, shared with other nodes.
    Cluster(ClusterStore),
}

impl Store {
    /// Opens the store configured in `config`.
    pub fn open(config: &Config, access: Access) -> Result<Arc<Store>, StoreError> {
        Ok(Arc::new(match config.storage.mode {
            crate::config::StorageMode::Embedded => Store::Embedded(EmbeddedStore::open(config, access)?),
            crate::config::StorageMode::Cluster => Store::Cluster(ClusterStore::open(config, access)?),
        }))
    }

    /// Hands a claim to the committer; it settles the claim when durable or failed.
    pub fn commit(&self, pending: PendingClaim) {
        match self {
            Store::Embedded(s) => s.commit(pending),
            Store::Cluster(s) => s.commit(pending),
        }
    }

    /// Whether claims can be committed.
    pub fn is_healthy(&self) -> bool {
        match self {
            Store::Embedded(s) => s.is_healthy(),
            Store::Cluster(s) => s.is_healthy(),
        }
    }

    /// A round trip through the committer (for the watchdog); `None` when it
    /// cannot take the message now.
    pub fn ping(&self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        match self {
            Store::Embedded(s) => s.ping(),
            Store::Cluster(s) => s.ping(),
        }
    }

    /// Claims waiting to be made durable.
    pub fn commit_queue_len(&self) -> usize {
        match self {
            Store::Embedded(s) => s.commit_queue_len(),
            Store::Cluster(s) => s.commit_queue_len(),
        }
    }

    /// Writes the config's activities, tickets and codes. Idempotent.
    pub fn import(&self, config: &Config, node_start_ms: i64) -> Result<ImportReport, StoreError> {
        match self {
            Store::Embedded(s) => s.import(config, node_start_ms),
            Store::Cluster(s) => s.import(config, node_start_ms),
        }
    }

    /// The codes of `ticket_id` that nobody has claimed.
    pub fn unclaimed_codes(&self, ticket_id: &str) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Embedded(s) => s.unclaimed_codes(ticket_id),
            // A cluster node's pools fill from leases, not from the store.
            Store::Cluster(_) => Ok(Vec::new()),
        }
    }

    /// Calls `f` with every durable claim, in id order.
    pub fn for_each_claim(&self, f: &mut dyn FnMut(Claim)) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.for_each_claim(f),
            // A cluster node's ledger holds the claims it made; the per-user
            // limit across nodes is kept by the Redis commit script.
            Store::Cluster(_) => Ok(()),
        }
    }

    /// Calls `f` with every claim of `activity_id` joined with its user, in id order.
    pub fn export_claims(
        &self,
        activity_id: &str,
        f: &mut dyn FnMut(ClaimRow) -> std::io::Result<()>,
    ) -> Result<u64, StoreError> {
        match self {
            Store::Embedded(s) => s.export_claims(activity_id, f),
            Store::Cluster(s) => s.export_claims(activity_id, f),
        }
    }

    /// Whether the store knows `activity_id`.
    pub fn has_activity(&self, activity_id: &str) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => s.has_activity(activity_id),
            Store::Cluster(s) => s.has_activity(activity_id),
        }
    }

    /// Creates users; returns how many were new (existing usernames are skipped).
    pub fn create_users(&self, users: &[(String, String, String)]) -> Result<usize, StoreError> {
        match self {
            Store::Embedded(s) => s.create_users(users),
            Store::Cluster(s) => s.create_users(users),
        }
    }

    /// Creates one user; [`StoreError::UsernameTaken`] if the name exists.
    pub fn create_user(&self, username: &str, nickname: &str, password_hash: &str) -> Result<User, StoreError> {
        match self {
            Store::Embedded(s) => s.create_user(username, nickname, password_hash),
            Store::Cluster(s) => s.create_user(username, nickname, password_hash),
        }
    }

    /// The user called `username`.
    pub fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        match self {
            Store::Embedded(s) => s.user_by_name(username),
            Store::Cluster(s) => s.user_by_name(username),
        }
    }

    /// Every user, by id.
    pub fn list_users(&self) -> Result<Vec<User>, StoreError> {
        match self {
            Store::Embedded(s) => s.list_users(),
            Store::Cluster(s) => s.list_users(),
        }
    }

    /// Records that the session `token_id` was logged out.
    pub fn revoke_session(&self, token_id: &str, expires_at_ms: i64) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.revoke_session(token_id, expires_at_ms),
            Store::Cluster(s) => s.revoke_session(token_id, expires_at_ms),
        }
    }

    /// Revoked sessions that have not expired yet.
    pub fn revoked_sessions(&self, now_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        match self {
            Store::Embedded(s) => s.revoked_sessions(now_ms),
            Store::Cluster(s) => s.revoked_sessions(now_ms),
        }
    }

    /// A secret kept in the store (the session key when none is configured), created on first use.
    pub fn secret(&self, name: &str, create: &dyn Fn() -> String) -> Result<String, StoreError> {
        match self {
            Store::Embedded(s) => s.secret(name, create),
            Store::Cluster(s) => s.secret(name, create),
        }
    }

    /// Adds drained rush statistics.
    pub fn add_stats(&self, batch: &crate::stats::StatsBatch) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.add_stats(batch),
            Store::Cluster(s) => s.add_stats(batch),
        }
    }

    /// What the report shows about `activity_id`; `top` rows of each ranking.
    pub fn report_data(&self, activity_id: &str, top: usize) -> Result<ReportData, StoreError> {
        match self {
            Store::Embedded(s) => s.report_data(activity_id, top),
            Store::Cluster(s) => s.report_data(activity_id, top),
        }
    }

    /// Whether this is the cluster store (stock comes from leases; `import`
    /// is a separate step, never done by a serving node).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Store::Cluster(_))
    }

    /// Starts selling the catalog's ticket types (cluster: leasing). Called
    /// at start-up and after every reload.
    pub fn track(&self, catalog: &crate::catalog::Catalog) -> Result<(), StoreError> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Cluster(s) => s.track(catalog),
        }
    }

    /// Cluster: waits briefly for stock when these ticket types' pools are
    /// empty but a master list is not. Embedded: an empty pool is sold out.
    pub async fn wait_for_stock(&self, tickets: &[crate::catalog::TicketType]) -> bool {
        match self {
            Store::Embedded(_) => false,
            Store::Cluster(s) => s.wait_for_stock(tickets).await,
        }
    }

    /// Every claim `user` holds in `activities`: cluster mode asks Redis (so
    /// claims made through other nodes count); `None` means "ask the ledger".
    pub async fn claims_of_user(&self, user: u64, activities: &[Arc<str>]) -> Option<Result<Vec<Claim>, StoreError>> {
        match self {
            Store::Embedded(_) => None,
            Store::Cluster(s) => Some(s.claims_of_user(user, activities).await),
        }
    }

    /// What is left of `activity`: cluster-wide in a cluster (as of the last
    /// look at Redis), this node's pools and ledger otherwise. The one source
    /// of the numbers `/act/list`, `/act/detail`, `/admin` and `/metrics` show.
    pub fn stock(&self, activity: &crate::catalog::Activity) -> Stock {
        let tickets: Vec<(usize, usize)> = activity
            .tickets
            .iter()
            .map(|t| match self {
                Store::Cluster(s) => s
                    .counts(&t.id)
                    .map_or((0, 0), |(total, remaining, _)| (total, remaining)),
                Store::Embedded(_) => (t.pool.known(), t.pool.remaining()),
            })
            .collect();
        let claimed = match self {
            Store::Cluster(s) => activity
                .tickets
                .iter()
                .filter_map(|t| s.counts(&t.id))
                .map(|(_, _, sold)| sold)
                .sum(),
            Store::Embedded(_) => activity.ledger.claimed(),
        };
        Stock {
            remaining: tickets.iter().map(|t| t.1).sum(),
            claimed,
            tickets,
        }
    }

    /// Cluster: re-reads the activity's counts from Redis first, so an answer
    /// right after a rush counts the claims other nodes made. Embedded: nothing.
    pub async fn refresh_stock(&self, activity_id: &str) -> Result<(), StoreError> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Cluster(s) => s.refresh_counts(activity_id).await,
        }
    }

    /// Cluster: the activity definitions `ticketd import` stored in MongoDB,
    /// which nodes without `[[activity]]` tables of their own follow.
    /// Embedded: `None` (the config file is the only source).
    pub fn shared_activities(&self) -> Option<Result<Vec<crate::config::ActivityConfig>, StoreError>> {
        match self {
            Store::Embedded(_) => None,
            Store::Cluster(s) => Some(s.activities()),
        }
    }

    /// Cluster-mode gauges for `/metrics`.
    pub fn cluster_gauges(&self) -> Option<crate::metrics::ClusterGauges> {
        match self {
            Store::Embedded(_) => None,
            Store::Cluster(s) => Some(s.gauges()),
        }
    }

    /// Makes every acknowledged claim durable in the store and stops the committer.
    pub fn close(&self) {
        match self {
            Store::Embedded(s) => s.close(),
            Store::Cluster(s) => s.close(),
        }
    }
}

/// 16 characters of Crockford base32 from the OS CSPRNG: 80 bits, no 0/O or 1/I/L confusion.
pub(crate) fn generate_code(rng: &mut impl rand::Rng) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    (0..16).map(|_| ALPHABET[rng.gen_range(0..32)] as char).collect()
}
