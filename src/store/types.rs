//! The store's own vocabulary: its error type, what it knows of users,
//! claims, imports and reports, and how a process opens it. Both backends
//! and the [`Store`](super::Store) facade speak these words; nothing here
//! knows a backend.

use crate::{journal::JournalError, worker::Runner};

pub use super::cluster::error::ClusterError;

/// The logged-out sessions an account keeps one by one; past them, the
/// earliest issued fold into a mark ([`Revocation::Before`]) that logs
/// out every session of the account issued by then, the ones never logged
/// out too. Each logout added a revocation kept until the session
/// would have expired, in memory and in the store, and nothing limited the
/// sessions an account may open: one account logging in and out in a loop
/// (from many /64s, each with its own budget of logins) grew both for as
/// long as the password hashing kept up. Real fans log out a few times a
/// day; a ninth logout within a session's lifetime costs the account its
/// older sessions, never a session left open.
pub const REVOKED_PER_ACCOUNT: usize = 8;

/// The issue times a session's token id may carry (its first eight bytes,
/// big-endian Unix ms): 2020 to 2100. A token of an earlier version has
/// sixteen random bytes, whose first eight fall in this window about once
/// in seven million; outside it, the token has no known issue time.
pub const ISSUED_RANGE_MS: std::ops::Range<i64> = 1_577_836_800_000..4_102_444_800_000;

/// The hex bounds of the token ids that carry an issue time: their first
/// sixteen digits, the time, sort as the number does.
pub fn issued_ids() -> (String, String) {
    (
        format!("{:016x}", ISSUED_RANGE_MS.start),
        format!("{:016x}", ISSUED_RANGE_MS.end),
    )
}

/// The issue time a token id's hex carries (`None` for an earlier
/// version's).
pub fn issued_of_hex(token_id: &str) -> Option<i64> {
    issue_time(i64::from_str_radix(token_id.get(..16)?, 16).ok()?)
}

/// `at`, the first eight bytes of a token id, as an issue time: `None`
/// outside [`ISSUED_RANGE_MS`] (a token of an earlier version).
pub fn issue_time(at: i64) -> Option<i64> {
    ISSUED_RANGE_MS.contains(&at).then_some(at)
}

/// Every claim of a user the store could read, and whether that is all of
/// them: a cluster reads the claims of activities no node sells from
/// MongoDB, and shows the rest while MongoDB does not answer.
#[derive(Debug, Default)]
pub struct UserClaims {
    /// The claims read.
    pub claims: Vec<crate::vocab::Claim>,
    /// False when some could not be read (MongoDB down or slow).
    pub complete: bool,
}

/// A logout, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// One session, by its token id (hex).
    Session {
        /// The account; `None` when an earlier version wrote it.
        user: Option<u64>,
        /// The token id, in hex.
        token_id: String,
        /// When the session would have expired, Unix ms.
        expires_at_ms: i64,
    },
    /// Every session of `user` issued at or before `issued_ms` (by its
    /// token id: see `auth::session::issued_ms`), until `expires_at_ms`,
    /// the latest expiry of the logouts folded into it.
    Before {
        /// The account.
        user: u64,
        /// Sessions issued at or before this time are logged out.
        issued_ms: i64,
        /// When the mark may be forgotten.
        expires_at_ms: i64,
    },
}

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
    /// An inspection found no store to inspect: nothing was imported or
    /// served in this directory.
    #[error(
        "no store in {0}: it holds no ticketd.db, which a node or `ticketd import` creates (is `storage.path` right?)"
    )]
    NoStore(std::path::PathBuf),
    /// The directory holds journal segments but no `ticketd.db` (deleted, or
    /// left behind by a restore): serving it would replay the journal into
    /// a new, empty store and sell the codes of every claim it no longer
    /// holds again (a drill showed it, and user ids given twice).
    #[error(
        "{} holds a journal but no ticketd.db (or an empty one): restore ticketd.db from a backup before a node \
         starts here (the journal holds only the claims not yet applied to it, and a node would sell the others' \
         codes again)",
        .0.display()
    )]
    JournalWithoutStore(std::path::PathBuf),
    /// SQLite failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The journal could not be replayed or opened.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The store has no such activity; `hint` says what stores one (a
    /// cluster's nodes never do: only `ticketd import`).
    #[error("the store has no activity `{id}` ({hint})")]
    UnknownActivity {
        /// The activity asked for.
        id: String,
        /// What to run first.
        hint: &'static str,
    },
    /// The data directory's tables predate look-alike keys for usernames,
    /// and another process (an older node) owns it, so this one may not
    /// upgrade them.
    #[error("the store predates look-alike keys for usernames: stop the node serving it, or run this version's node on it once")]
    NeedsUpgrade,
    /// The username exists already.
    #[error("the username, or one that looks like it, is taken")]
    UsernameTaken,
    /// The config moves a ticket type the store holds to another activity
    /// (the sentences of [`Config::moved_from`](crate::config::Config::moved_from)).
    #[error("{0}")]
    MovedTicketType(String),
    /// The config lists codes the store holds under another ticket type
    /// ([`StoreError::codes_of_other_tickets`]).
    #[error("{0}")]
    CodesOfOtherTickets(String),
    /// The config changes what an opened waiting room runs on (the
    /// sentences of [`RoomSettings::refused_change`](crate::admission::RoomSettings::refused_change)).
    #[error("{0}")]
    FrozenRoom(String),
    /// Redis or MongoDB failed (cluster mode).
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

impl StoreError {
    /// Redis could not be reached ([`ClusterError::is_redis_out_of_reach`]),
    /// not a refusal by Redis, MongoDB or the data.
    pub fn is_redis_out_of_reach(&self) -> bool {
        matches!(self, StoreError::Cluster(e) if e.is_redis_out_of_reach())
    }

    /// At most this many of an import's codes held by other ticket types
    /// are named; the rest are counted.
    pub const CODES_NAMED: usize = 5;

    /// One code of a config that the store holds under another ticket
    /// type, as [`StoreError::codes_of_other_tickets`] names it.
    pub fn held_elsewhere(code: &str, ticket: &str, holder: &str) -> String {
        format!("code `{code}` of ticket `{ticket}` already belongs to ticket `{holder}`")
    }

    /// The refusal of a config whose codes the store holds under other
    /// ticket types: `named`, each [`StoreError::held_elsewhere`], of
    /// `total` such codes.
    ///
    /// A code is its ticket type's for good: claims, stock and the master
    /// lists count it there. Such a code used to be skipped with a warning,
    /// so a ticket type given a new id (the organiser renaming it) kept
    /// none of its codes, answered `SOLD_OUT`, and the reload said it had
    /// succeeded.
    pub fn codes_of_other_tickets(named: &[String], total: usize) -> Self {
        let more = match total.saturating_sub(named.len()) {
            0 => String::new(),
            n => format!(" (and {n} more)"),
        };
        Self::CodesOfOtherTickets(format!(
            "{}{more}: a code stays with the ticket type it was first imported under, whose claims and stock \
             count it. To rename a ticket type change its `name` and keep its `id`; a new ticket type needs \
             codes of its own",
            named.join("; ")
        ))
    }
}

/// One page of the accounts, by id (see `Store::each_user`).
#[derive(Debug, Default)]
pub struct UserPage {
    /// The accounts read.
    pub users: Vec<User>,
    /// Records read, those that could not be read as accounts too (a
    /// short page is the last).
    pub read: usize,
    /// The id of the last record read: the next page starts after it.
    pub last_id: Option<u64>,
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

/// An account to create in bulk (`ticketd user import`).
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Login name (its identity key).
    pub username: String,
    /// Its look-alike key (`auth::username::skeleton_key`): unique as well,
    /// so `admın` cannot be registered beside `admin`.
    pub skeleton: String,
    /// Display name.
    pub nickname: String,
    /// The argon2id PHC string.
    pub password_hash: String,
    /// When the account was made, Unix ms: now, or the time an organiser
    /// brings over from the system the members registered in.
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

/// What `ticketd verify` found when it checked the store's invariants
/// after an incident: what it looked at, and each invariant that does not
/// hold, precisely (which claim, code, user or counter).
#[derive(Debug, Default)]
pub struct Reconciliation {
    /// One line per activity: the counts checked.
    pub summary: Vec<String>,
    /// Every broken invariant; empty when the store is consistent.
    pub problems: Vec<String>,
}

/// Who imports a config, which decides what it may change and what it
/// refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Importer {
    /// `ticketd import`: keeps the window and limit a node wrote.
    Tool,
    /// A serving node's own import as it starts. Codes the store holds
    /// under another ticket type are skipped, said at error level, rather
    /// than refused: earlier versions skipped them without recording the
    /// list, so a store they wrote meets them again at every start, and a
    /// node that would not start mid-sale (systemd restarting it after a
    /// crash) is worse than a ticket type without those codes.
    Start,
    /// A serving node's reload: it skips the codes its start skipped (a
    /// pause is a reload, and must not be refused for them) and refuses
    /// any other code of another ticket type.
    Reload,
}

/// What an import added, per ticket type.
#[derive(Debug, Default)]
pub struct ImportReport {
    /// Activities inserted or updated.
    pub activities: usize,
    /// Per ticket: id, codes added now (never claimed), codes known in total.
    pub tickets: Vec<TicketImport>,
    /// Codes in the config that already belong to another ticket type,
    /// skipped by a cluster's import whose lock lapsed while another stored
    /// them. Otherwise an import refuses such a config before it writes
    /// ([`StoreError::CodesOfOtherTickets`]), and a node's start skips them
    /// and says so itself ([`Importer::Start`]).
    pub conflicts: Vec<String>,
    /// Activities `ticketd retire` had taken off sale that this import puts
    /// back (a cluster's; said, not done in silence).
    pub revived: Vec<String>,
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
    /// `(Unix time in 10 ms units, claims)`, ascending: fine enough for a
    /// sale that sells out in a second; the report picks its own resolution.
    pub claims_per_10ms: Vec<(i64, u64)>,
    /// `(start of the step in Unix ms, outcome label, requests)`, ascending
    /// by time and label: the recorded ticks summed in steps of
    /// [`crate::stats::outcome_resolution_ms`] of the span (a minute for what
    /// earlier versions recorded).
    pub outcomes: Vec<(i64, String, u64)>,
    /// `(bucket upper bound in ms, claims)`; the last bound is infinite.
    pub latency: Vec<(f64, u64)>,
    /// The addresses that sent the most claims: `(address, requests)`.
    pub top_ips: Vec<(String, u64)>,
    /// Requests from addresses a node met past the first
    /// [`crate::stats::MAX_STORED_SOURCES`] of the activity, counted
    /// together: none of them is in `top_ips`.
    pub unranked_ip_requests: u64,
    /// The accounts that sent the most claims: `(username, requests)`.
    pub top_users: Vec<(String, u64)>,
    /// Distinct users holding a claim.
    pub users: u64,
    /// The most claims one user holds.
    pub most_per_user: u64,
    /// `(node, claims)`: which node handed out how much of the stock.
    pub nodes: Vec<(String, u64)>,
    /// Claims committed but not yet in the store this was read from (a
    /// cluster node's backlog for MongoDB): missing from every figure above.
    pub in_transit: InTransit,
}

/// How many acknowledged claims are not yet where exports and reports read
/// them (see [`Store::claims_in_transit`](crate::store::Store::claims_in_transit)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InTransit {
    /// This many (0: the record is whole).
    Counted(u64),
    /// Not counted: in a cluster the backlogs are in Redis, and Redis did
    /// not answer (why, as text). The record in MongoDB is still read:
    /// during a Redis outage it is the only one there is.
    Unknown(String),
}

impl Default for InTransit {
    fn default() -> Self {
        InTransit::Counted(0)
    }
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

/// How a process uses the store.
#[derive(Clone, Copy)]
pub enum Access<'a> {
    /// The serving node: takes the directory lock, replays the journal, and
    /// starts the store's workers (journal writer and applier; in a cluster
    /// the committer, the MongoDB writer and the reaper) on this runner.
    Serve(&'a Runner),
    /// A command-line tool: shares the store with a running node; when none
    /// runs, first applies any journal a crashed node left behind.
    Tool,
    /// `ticketd export` and `report`: like [`Access::Tool`], but they read
    /// the record (MongoDB in a cluster), which must not depend on Redis:
    /// opened while Redis is down, the store connects to it at its first
    /// command, and the count of claims still on their way is
    /// [`InTransit::Unknown`] if Redis is still down then.
    Record,
    /// `ticketd verify`: like [`Access::Tool`], but changes nothing — the
    /// journal is read, never replayed, so the check sees the store exactly
    /// as a crash left it (and the next start still does its own recovery);
    /// and reads may take long, since it reads whole activities.
    Inspect,
}

impl From<mongodb::error::Error> for StoreError {
    fn from(e: mongodb::error::Error) -> Self {
        StoreError::Cluster(ClusterError::Mongo(e))
    }
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError::Cluster(ClusterError::Redis(e))
    }
}

/// The generator codes are drawn from: ChaCha12 (`StdRng`), a CSPRNG seeded
/// once from the OS. Asking the OS for every code cost one `getrandom`
/// syscall per code — most of a million-code import's time.
pub fn code_rng() -> rand::rngs::StdRng {
    rand::SeedableRng::from_entropy()
}

/// 16 characters of Crockford base32 from a CSPRNG ([`code_rng`]): 80 bits,
/// no 0/O or 1/I/L confusion.
pub fn generate_code(rng: &mut impl rand::Rng) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    (0..16).map(|_| ALPHABET[rng.gen_range(0..32)] as char).collect()
}
