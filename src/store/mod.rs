//! The store boundary: everything the node keeps beyond its memory.
//!
//! Two backends: [`EmbeddedStore`] is SQLite plus the claim journal in
//! `storage.path` (one node, the default); [`ClusterStore`] is Redis leases
//! and commits with MongoDB as the system of record (`storage.mode =
//! "cluster"`).
//!
//! # The boundary
//! A store answers in its own terms and never in the API's: a commit is
//! answered per claim with a [`CommitOutcome`](crate::vocab::CommitOutcome) (committed, a duplicate, the
//! code taken by another node, the limit reached, the claim's deadline gone
//! by, a waiting room's pass missing, failed, in doubt), and the
//! claim decision alone maps that to a rejection and to what happens to the
//! code and the user's slot. The store holds no pool and no ledger: a store
//! that hands out codes in batches (the cluster) offers a [`LeaseSource`],
//! and the inventory decides when to lease, give back or wait. Nothing
//! outside this module asks which backend it has; it asks what the store
//! does ([`Store::lease_source`], [`Store::shared_with_nodes`]).
//!
//! # Enum, not trait
//! [`Store`] is an enum over the two backends rather than a trait object:
//! there are exactly two, both in this crate, and the claim path calls
//! [`Store::commit`] on every claim — an enum dispatches statically with no
//! vtable and no boxed future for the async calls, and a match that names
//! both arms makes a new method impossible to forget in one backend.
//!
//! # Layout
//! - [`types`]: the store's vocabulary (errors, users, claim rows, reports, access);
//! - `embedded`: SQLite, the journal's applier, replay, the report query;
//! - [`cluster`]: Redis scripts and leases, the committer, the MongoDB writer,
//!   the waiting rooms' shared logs.

pub mod cluster;
mod embedded;
pub mod types;

use std::sync::Arc;

pub use cluster::{
    lease::{LeaseSource, Leased},
    rooms::{Appended, Joined, RoomSource},
    ClusterStore, NodeSettings,
};
pub use embedded::{journal_dir, own_files, EmbeddedStore};
pub use types::{
    generate_code, Access, ClaimRow, ClusterError, ImportReport, Importer, InTransit, NewUser, Reconciliation,
    ReportData, Revocation, StoreError, TicketImport, TicketReport, User, UserClaims, UserPage, ISSUED_RANGE_MS,
    REVOKED_PER_ACCOUNT,
};

use crate::{
    config::{ActivityConfig, Config, StorageMode},
    stats::StatsBatch,
    vocab::{Claim, PendingClaim},
};

/// The store behind a node.
pub enum Store {
    /// SQLite and a local journal.
    Embedded(EmbeddedStore),
    /// Redis and MongoDB, shared with other nodes.
    Cluster(ClusterStore),
}

/// The last journal number the embedded store in `dir` has accounted
/// for (applied, or voided and replayed): the journal must reach back to
/// the one after it. 0 for a store not made yet.
pub fn journal_accounted(dir: &std::path::Path) -> Result<u64, StoreError> {
    embedded::accounted(dir)
}

/// Takes the embedded data directory's lock (the one a serving node holds)
/// without waiting; `None` while a node serves from it.
pub fn lock_data_dir(dir: &std::path::Path) -> Result<Option<std::fs::File>, StoreError> {
    embedded::try_lock(dir)
}

/// Rows read per page by [`Store::export_claims`] and [`Store::each_user`].
const PAGE: usize = 1000;

/// Calls `f` with every item of the pages `next_page` reads (each a read of
/// its own, returned with whether it was full: a short one is the last),
/// and returns how many there were; a failed `f` is `what` failed.
fn page_through<T>(
    mut next_page: impl FnMut() -> Result<(Vec<T>, bool), StoreError>,
    what: &'static str,
    f: &mut dyn FnMut(T) -> std::io::Result<()>,
) -> Result<u64, StoreError> {
    let mut n = 0;
    loop {
        let (page, full) = next_page()?;
        for item in page {
            f(item).map_err(|source| StoreError::Io {
                what,
                path: "the output".into(),
                source,
            })?;
            n += 1;
        }
        if !full {
            return Ok(n);
        }
    }
}

impl Store {
    /// Opens the store configured in `config`.
    pub fn open(config: &Config, access: Access<'_>) -> Result<Arc<Store>, StoreError> {
        Ok(Arc::new(match config.storage.mode {
            StorageMode::Embedded => Store::Embedded(EmbeddedStore::open(config, access)?),
            StorageMode::Cluster => Store::Cluster(ClusterStore::open(config, access)?),
        }))
    }

    /// Opens the store for a command-line tool that reads the record of
    /// `activity_id` (export, report: [`Access::Record`]) and checks that
    /// it knows the activity.
    pub fn open_with_activity(config: &Config, activity_id: &str) -> Result<Arc<Store>, StoreError> {
        // Embedded, with no store here yet: say so, rather than create an
        // empty one only to find the activity missing from it.
        // Named whole: a relative `storage.path` is the working directory's,
        // and a tool run from elsewhere said the activity was missing.
        if config.storage.mode == StorageMode::Embedded && !config.storage.path.exists() {
            let path = &config.storage.path;
            return Err(StoreError::NoStore(
                std::path::absolute(path).unwrap_or_else(|_| path.clone()),
            ));
        }
        let store = Store::open(config, Access::Record)?;
        if !store.has_activity(activity_id)? {
            // A cluster node serves the activities in its file without
            // storing them: "or ticketd serve" sent an operator round.
            let hint = if store.shared_with_nodes() {
                "run `ticketd import` with it first: in a cluster only the import stores an activity"
            } else {
                "run `ticketd import` or `ticketd serve` first"
            };
            return Err(StoreError::UnknownActivity {
                id: activity_id.to_owned(),
                hint,
            });
        }
        Ok(store)
    }

    /// Hands a claim to the committer, which answers it once it is durable
    /// or failed. Never blocks.
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

    /// Whether claims are refused because MongoDB has taken no writes for
    /// so long that the backlog in Redis is full (cluster; never embedded).
    pub fn backlog_full(&self) -> bool {
        match self {
            Store::Embedded(_) => false,
            Store::Cluster(s) => s.backlog_full(),
        }
    }

    /// Whether codes whose commit outcome was unknown are still unsettled
    /// in a way the claim path cannot see, so that no activity may be
    /// called sold out for good. Embedded: after a failed journal write,
    /// until the restart's recovery says which of them were kept. A cluster
    /// never: its doubts stay in the node's lease set until resolved, and
    /// the cluster-wide counts include them.
    pub fn has_unsettled_doubts(&self) -> bool {
        match self {
            Store::Embedded(s) => !s.is_healthy(),
            Store::Cluster(_) => false,
        }
    }

    /// Checks the store's invariants (see `ticketd verify`): every claim's
    /// code exists and is its ticket's, no code twice, nobody over the
    /// limit, and the store's parts agree — journal and SQLite on one node;
    /// master lists, leases, claims, counters and MongoDB in a cluster.
    pub fn reconcile(&self) -> Result<Reconciliation, StoreError> {
        match self {
            Store::Embedded(s) => s.reconcile(),
            Store::Cluster(s) => s.reconcile(),
        }
    }

    /// The shared side of the waiting rooms: in a cluster, each room's log
    /// is in Redis and every node keeps a replica; `None` on one node, where
    /// a room keeps its own log file.
    pub fn room_source(&self) -> Option<RoomSource> {
        match self {
            Store::Embedded(_) => None,
            Store::Cluster(s) => Some(s.room_source()),
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

    /// Whether the store that exports read holds every claim answered
    /// before the call, waiting up to `within` for it to catch up. A
    /// cluster node does not wait (other nodes' claims keep arriving in
    /// MongoDB too): its exports say how many are on their way instead.
    pub async fn caught_up(&self, within: std::time::Duration) -> bool {
        match self {
            Store::Embedded(s) => s.caught_up(within).await,
            Store::Cluster(_) => false,
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
            Store::Embedded(s) => s.import(config, node_start_ms, Importer::Tool),
            Store::Cluster(s) => s.import(config, node_start_ms),
        }
    }

    /// A serving node's own import of its config, at start-up and on
    /// reload: embedded, the config file is the source of activities and
    /// codes, so it is imported (idempotently); in a cluster that is
    /// `ticketd import`'s job, and a node imports nothing.
    pub fn serve_import(&self, config: &Config, node_start_ms: i64, by: Importer) -> Result<ImportReport, StoreError> {
        match self {
            Store::Embedded(s) => s.import(config, node_start_ms, by),
            // `ticketd import` fills a cluster's store; a node only refuses
            // a config that moved a ticket type it holds.
            Store::Cluster(s) => s.refuse_moves(config).map(|()| ImportReport::default()),
        }
    }

    /// The codes of `ticket_id` that nobody has claimed and this node may
    /// sell from the start (a cluster node's come from leases instead).
    pub fn unclaimed_codes(&self, ticket_id: &str) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Embedded(s) => s.unclaimed_codes(ticket_id),
            Store::Cluster(_) => Ok(Vec::new()),
        }
    }

    /// How many codes the store holds (a cluster node's: none it tracks
    /// here). A reload compares it before and after its write to tell
    /// whether another process imported codes meanwhile.
    pub fn code_count(&self) -> Result<u64, StoreError> {
        match self {
            Store::Embedded(s) => s.code_count(),
            Store::Cluster(_) => Ok(0),
        }
    }

    /// Calls `f` with every durable claim this node must know at start, in
    /// id order (embedded: all of them; a cluster node's limit is kept by the
    /// Redis commit script, so none).
    pub fn for_each_claim(&self, f: &mut dyn FnMut(Claim)) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.for_each_claim(f),
            Store::Cluster(_) => Ok(()),
        }
    }

    /// Calls `f` with every claim of `activity_id` joined with its user
    /// (embedded: in id order; a cluster: by time, then claim id), a page of
    /// a thousand at a time, each page a read of its own, `f` called between
    /// them: a client that reads a streamed export slowly holds no SQLite
    /// read (which keeps the WAL from its checkpoints) nor MongoDB cursor
    /// open, and `f` may block (it waits for that client) outside the
    /// cluster store's runtime.
    pub fn export_claims(
        &self,
        activity_id: &str,
        f: &mut dyn FnMut(ClaimRow) -> std::io::Result<()>,
    ) -> Result<u64, StoreError> {
        let mut last: Option<ClaimRow> = None;
        let next_page = || {
            let page = match self {
                Store::Embedded(s) => s.export_page(activity_id, last.as_ref().map_or(0, |r| r.claim_id), PAGE)?,
                Store::Cluster(s) => {
                    let after = last.as_ref().map(|r| (r.claimed_at_ms, r.claim_id as i64));
                    s.export_page(activity_id, after, PAGE)?
                }
            };
            last = page.last().cloned();
            let full = page.len() == PAGE;
            Ok((page, full))
        };
        page_through(next_page, "cannot write the export to", f)
    }

    /// Whether the store knows `activity_id`.
    pub fn has_activity(&self, activity_id: &str) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => s.has_activity(activity_id),
            Store::Cluster(s) => s.has_activity(activity_id),
        }
    }

    /// Creates users; returns how many were new (existing usernames are skipped).
    pub fn create_users(&self, users: &[NewUser]) -> Result<usize, StoreError> {
        match self {
            Store::Embedded(s) => s.create_users(users),
            Store::Cluster(s) => s.create_users(users),
        }
    }

    /// Creates one user; [`StoreError::UsernameTaken`] if the name, or its
    /// skeleton, exists.
    pub fn create_user(&self, user: &NewUser) -> Result<User, StoreError> {
        match self {
            Store::Embedded(s) => s.create_user(user),
            Store::Cluster(s) => s.create_user(user),
        }
    }

    /// Gives every account without one its look-alike key, `skeleton` of its
    /// username (the first account of a look-alike pair made before keys
    /// were kept gets it; the other keeps its name, unkeyed). Returns how
    /// many it keyed. The function comes from `auth::username`, which sits
    /// above the store.
    pub fn index_skeletons(&self, skeleton: fn(&str) -> String) -> Result<usize, StoreError> {
        match self {
            Store::Embedded(s) => s.index_skeletons(skeleton),
            Store::Cluster(s) => s.index_skeletons(skeleton),
        }
    }

    /// The user called `username`.
    pub fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        match self {
            Store::Embedded(s) => s.user_by_name(username),
            Store::Cluster(s) => s.user_by_name(username),
        }
    }

    /// Replaces a user's password hash (`ticketd user passwd`).
    pub fn set_password_hash(&self, user_id: u64, hash: &str) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.set_password_hash(user_id, hash),
            Store::Cluster(s) => s.set_password_hash(user_id, hash),
        }
    }

    /// Replaces a user's password hash `old` with `new` (a login re-hashing
    /// at the current cost) if `old` is still the stored one; whether it
    /// was. The re-hash takes as long as a login, and one that overwrote
    /// whatever was stored undid a `user passwd` made meanwhile: the old
    /// password logged in again and the new one did not.
    pub fn rehash_password(&self, user_id: u64, old: &str, new: &str) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => s.rehash_password(user_id, old, new),
            Store::Cluster(s) => s.rehash_password(user_id, old, new),
        }
    }

    /// The user whose look-alike key is `skeleton` (keys are unique).
    pub fn user_by_skeleton(&self, skeleton: &str) -> Result<Option<User>, StoreError> {
        match self {
            Store::Embedded(s) => s.user_by_skeleton(skeleton),
            Store::Cluster(s) => s.user_by_skeleton(skeleton),
        }
    }

    /// Whether the store holds any account.
    pub fn has_users(&self) -> Result<bool, StoreError> {
        let page = match self {
            Store::Embedded(s) => s.users_page(0, 1)?,
            Store::Cluster(s) => s.users_page(0, 1)?,
        };
        Ok(page.read > 0)
    }

    /// Calls `f` with every user, by id, a page of a thousand at a time,
    /// each page a read of its own (as [`Store::export_claims`]): a million
    /// accounts are listed in the memory of a page, not of all of them.
    pub fn each_user(&self, f: &mut dyn FnMut(User) -> std::io::Result<()>) -> Result<u64, StoreError> {
        let mut after = 0;
        let next_page = || {
            let page = match self {
                Store::Embedded(s) => s.users_page(after, PAGE)?,
                Store::Cluster(s) => s.users_page(after, PAGE)?,
            };
            after = page.last_id.unwrap_or(after);
            // Counted by records read: one that is no account still fills
            // its place in a full page.
            Ok((page.users, page.read == PAGE))
        };
        page_through(next_page, "cannot write the users to", f)
    }

    /// Records that `user`'s session `token_id` was logged out, keeping at
    /// most [`REVOKED_PER_ACCOUNT`] of the account's one by one (the
    /// earliest issued past them fold into its [`Revocation::Before`]).
    pub fn revoke_session(&self, user: u64, token_id: &str, expires_at_ms: i64) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.revoke_session(user, token_id, expires_at_ms),
            Store::Cluster(s) => s.revoke_session(user, token_id, expires_at_ms),
        }
    }

    /// Records that every session of `user` issued at or before
    /// `issued_ms` is logged out, until `expires_at_ms` (a mark only moves
    /// later): how a block ends an account's sessions for good.
    pub fn revoke_issued_before(&self, user: u64, issued_ms: i64, expires_at_ms: i64) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.revoke_issued_before(user, issued_ms, expires_at_ms),
            Store::Cluster(s) => s.revoke_issued_before(user, issued_ms, expires_at_ms),
        }
    }

    /// Revocations that have not expired yet: all of them, or (where
    /// other nodes revoke them too, a cluster) those written since
    /// `since_ms`. One node's store holds only its own logouts, which it
    /// reads once, at start: `since_ms` is for a cluster's refresh.
    pub fn revoked_sessions(&self, now_ms: i64, since_ms: Option<i64>) -> Result<Vec<Revocation>, StoreError> {
        match self {
            Store::Embedded(s) => s.revoked_sessions(now_ms),
            Store::Cluster(s) => s.revoked_sessions(now_ms, since_ms),
        }
    }

    /// Deletes the secret `name` the store keeps, if it keeps one; whether
    /// it did.
    pub fn forget_secret(&self, name: &str) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => s.forget_secret(name),
            Store::Cluster(s) => s.forget_secret(name),
        }
    }

    /// A secret kept in the store (the session key when none is configured), created on first use.
    pub fn secret(&self, name: &str, create: &dyn Fn() -> String) -> Result<String, StoreError> {
        match self {
            Store::Embedded(s) => s.secret(name, create),
            Store::Cluster(s) => s.secret(name, create),
        }
    }

    /// Adds drained rush statistics. On an error `batch` keeps what was
    /// not stored (all of it, embedded: one transaction).
    pub fn add_stats(&self, batch: &mut StatsBatch) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.add_stats(batch),
            Store::Cluster(s) => s.add_stats(batch),
        }
    }

    /// Claims of `activity_id` acknowledged but not yet where exports and
    /// reports read them: a cluster node's backlog for MongoDB; a serving
    /// node's journal not yet applied to SQLite (a tool applies it itself
    /// when no node serves).
    pub fn claims_in_transit(&self, activity_id: &str) -> Result<InTransit, StoreError> {
        match self {
            Store::Embedded(s) => s.claims_in_transit(activity_id),
            Store::Cluster(s) => s.claims_in_transit(activity_id),
        }
    }

    /// Acknowledged claims of `activity_id` that met another stored claim of
    /// their code (or of their user's claim number), kept apart from the
    /// claims exports and reports read: a cluster's `claim_conflicts`, after
    /// a Redis that lost acknowledged writes. Never any, embedded: one
    /// journal orders every claim.
    pub fn claim_conflicts(&self, activity_id: &str) -> Result<u64, StoreError> {
        match self {
            Store::Embedded(_) => Ok(0),
            Store::Cluster(s) => s.claim_conflicts(activity_id),
        }
    }

    /// What the report shows about `activity_id`; `top` rows of each ranking.
    pub fn report_data(&self, activity_id: &str, top: usize) -> Result<ReportData, StoreError> {
        match self {
            Store::Embedded(s) => s.report_data(activity_id, top),
            Store::Cluster(s) => s.report_data(activity_id, top),
        }
    }

    /// Takes a reloaded `server.shutdown_grace`: a cluster's MongoDB writer
    /// drains its backlog for that long at the stop.
    pub fn set_shutdown_grace(&self, grace: std::time::Duration) {
        if let Store::Cluster(s) = self {
            s.set_shutdown_grace(grace);
        }
    }

    /// Whether other nodes write to this store too (sessions, activities),
    /// so a node re-reads them every `cluster.refresh_interval`; and whether
    /// adding codes is `ticketd import`'s job rather than a serving node's.
    pub fn shared_with_nodes(&self) -> bool {
        matches!(self, Store::Cluster(_))
    }

    /// Whether a read that can wait (one with an answer to fall back on)
    /// is worth trying now: a cluster's Redis answered its last call (the
    /// probe finds it again); the embedded store always.
    pub fn reachable(&self) -> bool {
        match self {
            Store::Embedded(_) => true,
            Store::Cluster(s) => s.gauges().redis_up,
        }
    }

    /// Where codes come from in batches, when this store leases them (a
    /// cluster); `None` when a node owns all its codes (embedded).
    pub fn lease_source(&self) -> Option<LeaseSource> {
        match self {
            Store::Embedded(_) => None,
            Store::Cluster(s) => s.lease_source(),
        }
    }

    /// Every claim `user` holds in `activities` as the store knows it, when
    /// the store is where claims made through other nodes are seen
    /// (cluster); `None` when this node's ledgers are the whole truth.
    pub async fn claims_of_user(&self, user: u64, activities: &[Arc<str>]) -> Option<Result<Vec<Claim>, StoreError>> {
        match self {
            Store::Embedded(_) => None,
            Store::Cluster(s) => Some(s.claims_of_user(user, activities).await),
        }
    }

    /// Every claim `user` holds, in the activities this node `serves` and
    /// in those no node sells any more, when the store is where claims made
    /// through other nodes are seen (cluster; see
    /// [`cluster::ClusterStore::every_claim_of_user`]); `None` when this
    /// node's ledgers, which keep every activity's, are the whole truth.
    pub async fn every_claim_of_user(&self, user: u64, serves: &[Arc<str>]) -> Option<Result<UserClaims, StoreError>> {
        match self {
            Store::Embedded(_) => None,
            Store::Cluster(s) => Some(s.every_claim_of_user(user, serves).await),
        }
    }

    /// [`Store::claims_of_user`], to answer a claim with: in a cluster
    /// with `cluster.replica_acks`, only claims that many replicas confirm
    /// (see [`cluster::ClusterStore::confirmed_claims_of_user`]); `None`
    /// where what [`Store::claims_of_user`] read needs no confirming.
    pub async fn confirmed_claims_of_user(
        &self,
        user: u64,
        activities: &[Arc<str>],
    ) -> Option<Result<Vec<Claim>, StoreError>> {
        match self {
            Store::Cluster(s) if s.confirms_reads() => Some(s.confirmed_claims_of_user(user, activities).await),
            _ => None,
        }
    }

    /// The activity definitions `ticketd import` stored, which nodes
    /// without `[[activity]]` tables of their own follow (cluster); `None`
    /// where the config file is the only source (embedded).
    pub fn shared_activities(&self) -> Option<Result<Vec<ActivityConfig>, StoreError>> {
        match self {
            Store::Embedded(_) => None,
            Store::Cluster(s) => Some(s.activities()),
        }
    }

    /// Takes an imported activity off sale on the nodes that serve
    /// MongoDB's activities (see `ticketd retire`): `None` embedded (a node
    /// serves its file's), else whether a stored definition was there.
    pub fn retire(&self, activity: &str) -> Option<Result<bool, StoreError>> {
        match self {
            Store::Embedded(_) => None,
            Store::Cluster(s) => Some(s.retire(activity)),
        }
    }

    /// Connection and backlog gauges for `/metrics` (cluster only).
    pub fn gauges(&self) -> Option<crate::metrics::ClusterGauges> {
        match self {
            Store::Embedded(_) => None,
            Store::Cluster(s) => Some(s.gauges()),
        }
    }

    /// A line for the start-up log saying what was opened.
    pub fn describe(&self) -> String {
        match self {
            Store::Embedded(s) => s.describe(),
            Store::Cluster(s) => s.describe(),
        }
    }
}
