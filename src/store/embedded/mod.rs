//! The embedded store: SQLite (WAL) plus the claim journal, in one directory.
//!
//! ```text
//! {storage.path}/ticketd.db       users, activities, tickets, codes, claims, meta
//! {storage.path}/journal/         claim journal segments (see `journal::record`)
//! {storage.path}/ticketd.lock     flock held by the serving node
//! ```
//!
//! Why SQLite (through `rusqlite`, compiled in): it is one file, needs no
//! service, and — unlike single-process engines such as redb or sled — lets
//! `ticketd export`, `user add` and `import` run while the node serves, and
//! lets an organiser open the results with the `sqlite3` shell. It is not on
//! the claim path: a claim is durable once the journal has it; the applier
//! copies journaled claims into SQLite in batches afterwards ([`applier`]).
//!
//! - [`applier`]: applying journaled claims, at run time and by replay;
//! - [`report`]: rush statistics and the report query;
//! - [`reconcile`]: the invariants `ticketd verify` checks.

mod applier;
mod reconcile;
mod report;

/// The database's file in the data directory.
const DB_FILE: &str = "ticketd.db";
/// The journal's directory in the data directory.
const JOURNAL_DIR: &str = "journal";
/// The serving node's lock in the data directory.
const LOCK_FILE: &str = "ticketd.lock";

/// The store's own files in `dir`: the database, SQLite's WAL and
/// shared-memory files beside it, the lock.
pub fn own_files(dir: &Path) -> [PathBuf; 4] {
    let db = |suffix: &str| dir.join(format!("{DB_FILE}{suffix}"));
    [db(""), db("-wal"), db("-shm"), dir.join(LOCK_FILE)]
}

/// The journal's directory in `dir`.
pub fn journal_dir(dir: &Path) -> PathBuf {
    dir.join(JOURNAL_DIR)
}

use std::{
    collections::{HashMap, HashSet},
    fs::{File, OpenOptions},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

use crate::{
    config::Config,
    journal::{Found, Journal, JournalSetup},
    stats::StatsBatch,
    store::types::{
        code_rng, generate_code, issued_ids, issued_of_hex, Access, ClaimRow, ImportReport, Importer, InTransit,
        NewUser, Reconciliation, ReportData, Revocation, StoreError, TicketImport, User, UserPage, REVOKED_PER_ACCOUNT,
    },
    vocab::{Claim, CommitError, CommitOutcome, PendingClaim},
};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT NOT NULL UNIQUE,
    nickname      TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    skeleton      TEXT
);
CREATE TABLE IF NOT EXISTS activities (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    desc           TEXT NOT NULL,
    image          TEXT NOT NULL,
    start_ms       INTEGER NOT NULL,
    end_ms         INTEGER NOT NULL,
    per_user_limit INTEGER NOT NULL
);
-- The highest per_user_limit each activity has been served with: claims
-- made under a limit stand after a reload lowers it, so `ticketd verify`
-- holds users to this one.
CREATE TABLE IF NOT EXISTS activity_limits (
    activity_id TEXT PRIMARY KEY,
    highest     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tickets (
    id          TEXT PRIMARY KEY,
    activity_id TEXT NOT NULL,
    name        TEXT NOT NULL,
    desc        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS codes (
    code      TEXT PRIMARY KEY,
    ticket_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS codes_by_ticket ON codes (ticket_id);
CREATE TABLE IF NOT EXISTS claims (
    id              INTEGER PRIMARY KEY,
    activity_id     TEXT NOT NULL,
    ticket_id       TEXT NOT NULL,
    code            TEXT NOT NULL UNIQUE,
    user_id         INTEGER NOT NULL,
    claimed_at_ms   INTEGER NOT NULL,
    idempotency_key TEXT,
    node            TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS claims_by_activity ON claims (activity_id, id);
-- Outcomes per tick (stats::OUTCOME_TICK_MS). Earlier versions wrote them
-- per minute, to stats_outcomes: see MIGRATE_OUTCOMES.
CREATE TABLE IF NOT EXISTS stats_outcome_ticks (
    activity_id TEXT NOT NULL,
    at_ms       INTEGER NOT NULL,
    outcome     TEXT NOT NULL,
    count       INTEGER NOT NULL,
    PRIMARY KEY (activity_id, at_ms, outcome)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stats_sources (
    activity_id TEXT NOT NULL,
    kind        TEXT NOT NULL,
    source      TEXT NOT NULL,
    requests    INTEGER NOT NULL,
    PRIMARY KEY (activity_id, kind, source)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stats_latency (
    activity_id TEXT NOT NULL,
    bound_ms    REAL NOT NULL,
    count       INTEGER NOT NULL,
    PRIMARY KEY (activity_id, bound_ms)
) WITHOUT ROWID;
-- Logouts written by earlier versions, without their account: read until
-- they expire; nothing new is written here.
CREATE TABLE IF NOT EXISTS revoked_sessions (
    token_id      TEXT PRIMARY KEY,
    expires_at_ms INTEGER NOT NULL
);
-- Every logout deletes the expired ones: without this, a scan of every
-- logout of the last day, under the lock logins and registrations take.
CREATE INDEX IF NOT EXISTS revoked_sessions_expiry ON revoked_sessions (expires_at_ms);
-- Logouts by account, at most REVOKED_PER_ACCOUNT each with an issue time
-- (the first sixteen hex digits of token_id); the earliest issued past
-- them fold into the account's revoked_before.
CREATE TABLE IF NOT EXISTS revoked_by_account (
    user_id       INTEGER NOT NULL,
    token_id      TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, token_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS revoked_by_account_expiry ON revoked_by_account (expires_at_ms);
-- The digest of each ticket type's listed codes (`codes`, `codes_file`)
-- as last imported whole, without a conflict: a reload that lists the same
-- codes skips them. (It inserted each again, a million codes for seconds,
-- holding the write lock and the connection logins wait on.)
CREATE TABLE IF NOT EXISTS code_lists (
    ticket_id TEXT PRIMARY KEY,
    digest    TEXT NOT NULL
);
-- Every session of the account issued at or before issued_ms is logged
-- out, until expires_at_ms (the latest expiry of the logouts folded in).
CREATE TABLE IF NOT EXISTS revoked_before (
    user_id       INTEGER PRIMARY KEY,
    issued_ms     INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
"#;

/// SQLite and, when serving, the journal (whose writer and applier are
/// workers on the node's runner).
pub struct EmbeddedStore {
    /// Used for everything but applying claims; short statements only.
    db: Mutex<Connection>,
    journal: Option<Journal<PendingClaim>>,
    /// A serving node's: the highest claim id SQLite holds (the applier's).
    applied: Option<Arc<AtomicU64>>,
    dir: std::path::PathBuf,
    /// Held for the life of a serving node.
    _lock: Option<File>,
    /// Codes of other ticket types the node's start skipped
    /// ([`Importer::Start`]), as (ticket, code): its reloads skip them too, so that a store an
    /// earlier version wrote can still be reloaded (a pause is a reload),
    /// while a code newly given to another ticket type is refused.
    skipped_at_start: Mutex<HashSet<(String, String)>>,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Takes the directory lock without waiting; `None` if another process has it.
pub(super) fn try_lock(dir: &Path) -> Result<Option<File>, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("cannot write to the data directory; check its permissions:", &path))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(Some(file))
    } else {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(io("cannot lock", &path)(err))
        }
    }
}

/// Moves what earlier versions stored per minute into the per-tick table
/// (a minute's count lands on its first millisecond), once, in one
/// transaction, so the report reads one table and nothing is counted twice.
const MIGRATE_OUTCOMES: &str = r#"
INSERT INTO stats_outcome_ticks (activity_id, at_ms, outcome, count)
    SELECT activity_id, minute * 60000, outcome, count FROM stats_outcomes WHERE true
    ON CONFLICT DO UPDATE SET count = count + excluded.count;
DROP TABLE stats_outcomes;
"#;

fn has_per_minute_outcomes(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'stats_outcomes')",
        [],
        |r| r.get(0),
    )
}

/// Runs [`MIGRATE_OUTCOMES`] if it is needed, under SQLite's write lock
/// (two processes opening the store at once migrate it once). Run only by
/// the process holding the data directory's lock.
fn migrate_outcomes(conn: &mut Connection) -> rusqlite::Result<()> {
    if !has_per_minute_outcomes(conn)? {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if has_per_minute_outcomes(&tx)? {
        tx.execute_batch(MIGRATE_OUTCOMES)?;
        tx.commit()?;
        tracing::info!("Moved the per-minute claim outcomes of an earlier version into the per-tick table.");
    }
    Ok(())
}

/// Gives a store from before look-alike keys its `users.skeleton` column
/// and the unique index on it (NULLs, the accounts not keyed yet, never
/// collide). Idempotent; run by the process holding the directory's lock.
fn migrate_skeletons(conn: &Connection) -> rusqlite::Result<()> {
    if !has_skeletons(conn)? {
        conn.execute_batch("ALTER TABLE users ADD COLUMN skeleton TEXT")?;
    }
    conn.execute_batch("CREATE UNIQUE INDEX IF NOT EXISTS users_skeleton ON users (skeleton)")
}

/// Gives a store from before claims named their node its `claims.node`
/// column (`CREATE TABLE IF NOT EXISTS` leaves an existing table as it
/// was): without it every applier batch failed, and after a restart the
/// replay did, so the node would not start. Idempotent; run by the process
/// holding the directory's lock.
fn migrate_claims_node(conn: &Connection) -> rusqlite::Result<()> {
    let has_node: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('claims') WHERE name = 'node')",
        [],
        |r| r.get(0),
    )?;
    if !has_node {
        conn.execute_batch("ALTER TABLE claims ADD COLUMN node TEXT NOT NULL DEFAULT ''")?;
        tracing::info!("Added the node column to the claims of an earlier version.");
    }
    Ok(())
}

fn has_skeletons(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('users') WHERE name = 'skeleton')",
        [],
        |r| r.get(0),
    )
}

/// The digest of a ticket type's listed codes, sorted (see `code_lists`).
fn list_digest(codes: &[&String]) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for code in codes {
        hash.update(code.as_bytes());
        hash.update(b"\n");
    }
    crate::hex::to_hex(&hash.finalize())
}

/// Deletes the revocations of sessions expired by `now_ms`.
fn prune_revocations(conn: &Connection, now_ms: i64) -> rusqlite::Result<()> {
    for table in ["revoked_sessions", "revoked_by_account", "revoked_before"] {
        conn.execute(&format!("DELETE FROM {table} WHERE expires_at_ms < ?1"), [now_ms])?;
    }
    Ok(())
}

/// Whether `path` holds a database: a file with something in it (SQLite
/// writes its header with the schema, so an empty file never held one).
/// An error is one to say (a directory it may not read), not "none".
fn has_database(path: &Path) -> std::io::Result<bool> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(meta.len() > 0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Says so when others may read the data directory or its database (a
/// store made before they were created owner-only, or a directory made
/// by hand): they hold the session key, the password hashes and the codes.
fn warn_if_shared(dir: &Path, db: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for path in [dir, db] {
        let Ok(meta) = std::fs::metadata(path) else { continue };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "Others may read this: it holds the session key, the password hashes and the codes claimed. \
                 Make it the service user's alone (chmod 700 for the directory, 600 for the database)."
            );
        }
    }
}

/// Opens (creating if needed) the database at `path` with the schema.
fn open_db(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: an applied claim batch is on disk before its journal segment may be deleted.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

fn user_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get::<_, i64>(0)? as u64,
        username: r.get(1)?,
        nickname: r.get(2)?,
        password_hash: r.get(3)?,
        created_at_ms: r.get(4)?,
    })
}

/// See [`super::journal_accounted`]. Read only: the file is not created.
pub fn accounted(dir: &Path) -> Result<u64, StoreError> {
    let db_path = dir.join(DB_FILE);
    if !has_database(&db_path).map_err(io("cannot look into the data directory", dir))? {
        return Ok(0);
    }
    let conn = Connection::open_with_flags(&db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    applier::accounted(&conn)
}

impl EmbeddedStore {
    /// Opens `storage.path`, creating it if needed.
    pub fn open(config: &Config, access: Access<'_>) -> Result<EmbeddedStore, StoreError> {
        let dir = config.storage.path.clone();
        let journal_dir = dir.join(JOURNAL_DIR);
        let db_path = dir.join(DB_FILE);
        if matches!(access, Access::Inspect) {
            return EmbeddedStore::inspect(dir, &db_path);
        }
        // Owner-only, whatever the umask: the database holds the session
        // key and every password hash, and outside the shipped unit (its
        // `StateDirectoryMode=0750`) `./data` was world-readable.
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io("cannot create the data directory", &dir))?;
        }
        warn_if_shared(&dir, &db_path);
        let lock = try_lock(&dir)?;
        // Before `open_db` creates the file: a journal with no database
        // beside it is never a new store. Nor with an empty file (a copy
        // that failed, a `touch`): SQLite takes that for a new database.
        if !has_database(&db_path).map_err(io("cannot look into the data directory", &dir))?
            && crate::journal::has_segments(&journal_dir)?
        {
            return Err(StoreError::JournalWithoutStore(dir));
        }
        if lock.is_some() && !db_path.exists() {
            // Made here, 0600, for SQLite to fill: its -wal and -shm take
            // the database's mode.
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&db_path)
                .map_err(io("cannot create the database", &db_path))?;
        }
        let mut conn = open_db(&db_path)?;
        if lock.is_some() {
            // Only the process that owns the directory changes its tables:
            // an earlier version may be serving it (an inspection, or a
            // tool beside a node, reads what is there).
            migrate_outcomes(&mut conn)?;
            migrate_skeletons(&conn)?;
            migrate_claims_node(&conn)?;
        }
        // Every claim in this store was handed out by the node that owns it.
        let node = config.node_id();
        match (access, lock) {
            (Access::Serve(_), None) => Err(StoreError::Locked(dir)),
            (Access::Serve(runner), Some(lock)) => {
                let last_seq = applier::replay_journal(&mut conn, &journal_dir, &node)?;
                let applied = Arc::new(AtomicU64::new(last_seq));
                let (tx, rx) = crossbeam_channel::unbounded();
                applier::start(runner, open_db(&db_path)?, rx, applied.clone(), node)?;
                let journal = Journal::start(
                    JournalSetup {
                        dir: journal_dir,
                        config: config.journal.clone(),
                        next_seq: last_seq + 1,
                        applier: tx,
                        applied_seq: applied.clone(),
                    },
                    runner,
                )?;
                Ok(EmbeddedStore {
                    db: Mutex::new(conn),
                    journal: Some(journal),
                    applied: Some(applied),
                    dir,
                    _lock: Some(lock),
                    skipped_at_start: Mutex::default(),
                })
            }
            (Access::Inspect, _) => unreachable!("opened read-only above"),
            (Access::Tool | Access::Record, lock) => {
                if lock.is_some() && journal_dir.exists() {
                    // No node is running: fold in whatever a crashed one left.
                    applier::replay_journal(&mut conn, &journal_dir, &node)?;
                }
                Ok(EmbeddedStore::reading(conn, dir))
            }
        }
    }

    /// [`Access::Inspect`]: the store as it is, read only. Nothing is
    /// created, migrated or replayed, so `ticketd verify` pointed at the
    /// wrong directory says there is no store there instead of making an
    /// empty one and finding it consistent.
    fn inspect(dir: std::path::PathBuf, db_path: &Path) -> Result<EmbeddedStore, StoreError> {
        // `try_exists`: a directory it may not read is said as such (below,
        // by SQLite), not taken for one with no store.
        if !has_database(db_path).map_err(io("cannot look into the data directory", &dir))? {
            return Err(StoreError::NoStore(dir));
        }
        let conn = Connection::open_with_flags(db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(EmbeddedStore::reading(conn, dir))
    }

    /// A store for a tool (no journal, no lock): it reads, and writes what
    /// a tool writes straight to SQLite.
    fn reading(conn: Connection, dir: std::path::PathBuf) -> EmbeddedStore {
        EmbeddedStore {
            db: Mutex::new(conn),
            journal: None,
            applied: None,
            dir,
            _lock: None,
            skipped_at_start: Mutex::default(),
        }
    }

    pub(super) fn commit(&self, pending: PendingClaim) {
        match &self.journal {
            Some(j) => j.append(pending),
            // A tool process has no journal; it never claims.
            None => pending.answer(CommitOutcome::Failed(CommitError::Unavailable)),
        }
    }

    pub(super) fn describe(&self) -> String {
        format!("embedded store in {}", self.dir.display())
    }

    pub(super) fn reconcile(&self) -> Result<Reconciliation, StoreError> {
        reconcile::reconcile(&self.db.lock(), &self.dir.join(JOURNAL_DIR))
    }

    pub(super) fn is_healthy(&self) -> bool {
        self.journal.as_ref().is_some_and(Journal::is_healthy)
    }

    pub(super) fn ping(&self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.journal.as_ref().and_then(Journal::ping)
    }

    /// Whether SQLite holds every claim made durable before the call, once
    /// the applier has had up to `within` to get there (it applies a batch
    /// every 25 ms or so; for long when SQLite is busy or its disk full).
    /// Always true for a store that does not serve.
    pub(super) async fn caught_up(&self, within: Duration) -> bool {
        let (Some(journal), Some(applied)) = (&self.journal, &self.applied) else {
            return true;
        };
        let target = journal.last_durable();
        let deadline = tokio::time::Instant::now() + within;
        while applied.load(Ordering::Acquire) < target {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    pub(super) fn commit_queue_len(&self) -> usize {
        self.journal.as_ref().map_or(0, Journal::queue_len)
    }

    /// Imports `config`. A serving node's own import (at start, on reload)
    /// makes its per-user limits hold for claims, so they count towards the
    /// highest each activity has had; a `ticketd import`'s do not (a config
    /// imported with a typo and corrected before any node served it would
    /// raise the bar `ticketd verify` holds users to).
    pub(super) fn import(&self, config: &Config, node_start_ms: i64, by: Importer) -> Result<ImportReport, StoreError> {
        let mut conn = self.db.lock();
        // A million-code import touches more pages than the default 2 MB
        // page cache holds; spilling made it a pread and a pwrite per code.
        conn.pragma_update(None, "cache_size", -131_072)?;
        let mut skipped = self.skipped_at_start.lock();
        let imported = import_in(&mut conn, config, node_start_ms, by, &mut skipped);
        // Back to SQLite's default, whatever the import did: a serving
        // node's connection needs no such cache.
        conn.pragma_update(None, "cache_size", -2_000)?;
        imported
    }

    /// Read on a connection of its own (WAL lets it read beside the
    /// writers): a reload reads every unclaimed code of every ticket type,
    /// and on the shared connection logins, registrations and logouts
    /// waited for all of it.
    pub(super) fn unclaimed_codes(&self, ticket_id: &str) -> Result<Vec<String>, StoreError> {
        let conn = Connection::open_with_flags(
            self.dir.join(DB_FILE),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let mut stmt = conn.prepare(
            "SELECT c.code FROM codes c WHERE c.ticket_id = ?1 AND NOT EXISTS (SELECT 1 FROM claims k WHERE k.code = c.code)",
        )?;
        let codes = stmt.query_map([ticket_id], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(codes)
    }

    /// Every code stored, of any ticket type (on its own read-only
    /// connection, as [`unclaimed_codes`](Self::unclaimed_codes)).
    pub(super) fn code_count(&self) -> Result<u64, StoreError> {
        let conn = Connection::open_with_flags(
            self.dir.join(DB_FILE),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM codes", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    pub(super) fn for_each_claim(&self, f: &mut dyn FnMut(Claim)) -> Result<(), StoreError> {
        let conn = self.db.lock();
        let mut stmt = conn.prepare(
            "SELECT id, activity_id, ticket_id, code, user_id, claimed_at_ms, idempotency_key FROM claims ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            f(Claim {
                id: r.get::<_, i64>(0)? as u64,
                activity_id: Arc::from(r.get::<_, String>(1)?),
                ticket_id: Arc::from(r.get::<_, String>(2)?),
                code: Arc::from(r.get::<_, String>(3)?),
                user_id: r.get::<_, i64>(4)? as u64,
                claimed_at_ms: r.get(5)?,
                idempotency_key: r.get::<_, Option<String>>(6)?.map(Arc::from),
            });
        }
        Ok(())
    }

    /// Up to `limit` claims of `activity_id` after claim `after`, by id,
    /// joined with their users. On a read-only connection of its own: an
    /// export reads for seconds, and on the shared connection every login,
    /// registration and statistics flush of a serving node waited for it
    /// (WAL: this reader and the node's writers do not block each other).
    pub(super) fn export_page(&self, activity_id: &str, after: u64, limit: usize) -> Result<Vec<ClaimRow>, StoreError> {
        let conn = Connection::open_with_flags(self.dir.join(DB_FILE), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let mut stmt = conn.prepare(
            "SELECT k.id, k.activity_id, k.ticket_id, k.code, k.user_id, COALESCE(u.username, ''), COALESCE(u.nickname, ''), k.claimed_at_ms, k.node
             FROM claims k LEFT JOIN users u ON u.id = k.user_id WHERE k.activity_id = ?1 AND k.id > ?2 ORDER BY k.id LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![activity_id, after as i64, limit as i64], |r| {
                Ok(ClaimRow {
                    claim_id: r.get::<_, i64>(0)? as u64,
                    activity_id: r.get(1)?,
                    ticket_id: r.get(2)?,
                    code: r.get(3)?,
                    user_id: r.get::<_, i64>(4)? as u64,
                    username: r.get(5)?,
                    nickname: r.get(6)?,
                    claimed_at_ms: r.get(7)?,
                    node: r.get(8)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub(super) fn has_activity(&self, activity_id: &str) -> Result<bool, StoreError> {
        let conn = self.db.lock();
        let found = conn
            .query_row("SELECT 1 FROM activities WHERE id = ?1", [activity_id], |_| Ok(()))
            .optional()?;
        Ok(found.is_some())
    }

    pub(super) fn create_user(&self, user: &NewUser) -> Result<User, StoreError> {
        let conn = self.db.lock();
        // Ignored when the username or its skeleton is taken.
        let inserted = conn.execute(
            "INSERT OR IGNORE INTO users (username, skeleton, nickname, password_hash, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![user.username, user.skeleton, user.nickname, user.password_hash, user.created_at_ms],
        )?;
        if inserted == 0 {
            return Err(StoreError::UsernameTaken);
        }
        Ok(User {
            id: conn.last_insert_rowid() as u64,
            username: user.username.clone(),
            nickname: user.nickname.clone(),
            password_hash: user.password_hash.clone(),
            created_at_ms: user.created_at_ms,
        })
    }

    pub(super) fn index_skeletons(&self, skeleton: fn(&str) -> String) -> Result<usize, StoreError> {
        let mut conn = self.db.lock();
        if !has_skeletons(&conn)? {
            return Err(StoreError::NeedsUpgrade);
        }
        // IMMEDIATE, as in `import_in`: it reads, then writes.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut keyed = 0;
        {
            let mut unkeyed = tx.prepare("SELECT id, username FROM users WHERE skeleton IS NULL ORDER BY id")?;
            let rows: Vec<(i64, String)> = unkeyed
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let mut set = tx.prepare("UPDATE OR IGNORE users SET skeleton = ?1 WHERE id = ?2 AND skeleton IS NULL")?;
            for (id, username) in rows {
                keyed += set.execute(params![skeleton(&username), id])?;
            }
        }
        tx.commit()?;
        Ok(keyed)
    }

    pub(super) fn create_users(&self, users: &[NewUser]) -> Result<usize, StoreError> {
        let mut conn = self.db.lock();
        let tx = conn.transaction()?;
        let mut created = 0;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO users (username, skeleton, nickname, password_hash, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for u in users {
                created += insert.execute(params![
                    u.username,
                    u.skeleton,
                    u.nickname,
                    u.password_hash,
                    u.created_at_ms
                ])?;
            }
        }
        tx.commit()?;
        Ok(created)
    }

    pub(super) fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        let conn = self.db.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id, username, nickname, password_hash, created_at_ms FROM users WHERE username = ?1",
        )?;
        Ok(stmt.query_row([username], user_from_row).optional()?)
    }

    pub(super) fn set_password_hash(&self, user_id: u64, hash: &str) -> Result<(), StoreError> {
        let conn = self.db.lock();
        conn.prepare_cached("UPDATE users SET password_hash = ?2 WHERE id = ?1")?
            .execute(params![user_id as i64, hash])?;
        Ok(())
    }

    pub(super) fn rehash_password(&self, user_id: u64, old: &str, new: &str) -> Result<bool, StoreError> {
        let conn = self.db.lock();
        let changed = conn
            .prepare_cached("UPDATE users SET password_hash = ?3 WHERE id = ?1 AND password_hash = ?2")?
            .execute(params![user_id as i64, old, new])?;
        Ok(changed == 1)
    }

    pub(super) fn user_by_skeleton(&self, skeleton: &str) -> Result<Option<User>, StoreError> {
        let conn = self.db.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id, username, nickname, password_hash, created_at_ms FROM users WHERE skeleton = ?1",
        )?;
        Ok(stmt.query_row([skeleton], user_from_row).optional()?)
    }

    pub(super) fn users_page(&self, after: u64, limit: usize) -> Result<UserPage, StoreError> {
        let conn = self.db.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id, username, nickname, password_hash, created_at_ms FROM users WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let users: Vec<User> = stmt
            .query_map(params![after as i64, limit as i64], user_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(UserPage {
            read: users.len(),
            last_id: users.last().map(|u| u.id),
            users,
        })
    }

    /// One transaction: the logout, and past [`REVOKED_PER_ACCOUNT`] with
    /// an issue time the fold of the account's earliest issued into its
    /// mark. (Token ids sort as their sessions were issued; those of an
    /// earlier version, with no issue time, fall outside [`issued_ids`].)
    pub(super) fn revoke_session(&self, user: u64, token_id: &str, expires_at_ms: i64) -> Result<(), StoreError> {
        let (lo, hi) = issued_ids();
        let mut conn = self.db.lock();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO revoked_by_account (user_id, token_id, expires_at_ms) VALUES (?1, ?2, ?3)",
            params![user as i64, token_id, expires_at_ms],
        )?;
        let past: Option<String> = tx
            .query_row(
                "SELECT token_id FROM revoked_by_account WHERE user_id = ?1 AND token_id >= ?3 AND token_id < ?4
                 ORDER BY token_id DESC LIMIT 1 OFFSET ?2",
                params![user as i64, REVOKED_PER_ACCOUNT as i64, lo, hi],
                |r| r.get(0),
            )
            .optional()?;
        if let Some((issued, past)) = past.and_then(|p| Some((issued_of_hex(&p)?, p))) {
            let folded = "FROM revoked_by_account WHERE user_id = ?1 AND token_id >= ?2 AND token_id <= ?3";
            let expires: i64 = tx.query_row(
                &format!("SELECT max(expires_at_ms) {folded}"),
                params![user as i64, lo, past],
                |r| r.get(0),
            )?;
            tx.execute(
                "INSERT INTO revoked_before (user_id, issued_ms, expires_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user_id) DO UPDATE SET issued_ms = max(issued_ms, excluded.issued_ms),
                     expires_at_ms = max(expires_at_ms, excluded.expires_at_ms)",
                params![user as i64, issued, expires],
            )?;
            tx.execute(&format!("DELETE {folded}"), params![user as i64, lo, past])?;
        }
        tx.commit()?;
        // The tables hold only what has not expired: a node that serves
        // for weeks does not keep every logout since it started. (The
        // revocation is kept either way: a prune that failed is no failed
        // logout, and the next one prunes.)
        if let Err(error) = prune_revocations(&conn, crate::clock::now_ms()) {
            tracing::warn!(%error, "Could not prune expired logouts.");
        }
        Ok(())
    }

    pub(super) fn revoke_issued_before(&self, user: u64, issued_ms: i64, expires_at_ms: i64) -> Result<(), StoreError> {
        self.db.lock().execute(
            "INSERT INTO revoked_before (user_id, issued_ms, expires_at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (user_id) DO UPDATE SET issued_ms = max(issued_ms, excluded.issued_ms),
                 expires_at_ms = max(expires_at_ms, excluded.expires_at_ms)",
            params![user as i64, issued_ms, expires_at_ms],
        )?;
        Ok(())
    }

    pub(super) fn revoked_sessions(&self, now_ms: i64) -> Result<Vec<Revocation>, StoreError> {
        let conn = self.db.lock();
        prune_revocations(&conn, now_ms)?;
        let mut out = Vec::new();
        // An earlier version's logouts have no account (NULL).
        let mut sessions = conn.prepare(
            "SELECT NULL, token_id, expires_at_ms FROM revoked_sessions
             UNION ALL SELECT user_id, token_id, expires_at_ms FROM revoked_by_account",
        )?;
        for row in sessions.query_map([], |r| {
            Ok(Revocation::Session {
                user: r.get::<_, Option<i64>>(0)?.map(|u| u as u64),
                token_id: r.get(1)?,
                expires_at_ms: r.get(2)?,
            })
        })? {
            out.push(row?);
        }
        let mut before = conn.prepare("SELECT user_id, issued_ms, expires_at_ms FROM revoked_before")?;
        for row in before.query_map([], |r| {
            Ok(Revocation::Before {
                user: r.get::<_, i64>(0)? as u64,
                issued_ms: r.get(1)?,
                expires_at_ms: r.get(2)?,
            })
        })? {
            out.push(row?);
        }
        Ok(out)
    }

    pub(super) fn forget_secret(&self, name: &str) -> Result<bool, StoreError> {
        let deleted = self
            .db
            .lock()
            .execute("DELETE FROM meta WHERE key = ?1", [format!("secret.{name}")])?;
        Ok(deleted > 0)
    }

    pub(super) fn secret(&self, name: &str, create: &dyn Fn() -> String) -> Result<String, StoreError> {
        let conn = self.db.lock();
        let key = format!("secret.{name}");
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
            params![key, create()],
        )?;
        Ok(conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))?)
    }

    /// One transaction: on an error nothing of `batch` was stored, and it
    /// is left whole.
    pub(super) fn add_stats(&self, batch: &mut StatsBatch) -> Result<(), StoreError> {
        report::add_stats(&mut self.db.lock(), batch)?;
        *batch = StatsBatch::default();
        Ok(())
    }

    pub(super) fn report_data(&self, activity_id: &str, top: usize) -> Result<ReportData, StoreError> {
        // Counted first, as in a cluster: an overstatement at worst.
        let in_transit = self.claims_in_transit(activity_id)?;
        let mut data = report::report_data(&self.db.lock(), activity_id, top)?;
        data.in_transit = in_transit;
        Ok(data)
    }

    /// Claims of `activity_id` in the journal and not yet in SQLite: a
    /// serving node applies its journal a batch at a time (25 ms and more
    /// behind; for long if SQLite is busy or its disk full), and a tool
    /// beside it reads SQLite only.
    pub(super) fn claims_in_transit(&self, activity_id: &str) -> Result<InTransit, StoreError> {
        let applied = applier::applied_seq(&self.db.lock())?;
        let mut pending = 0;
        crate::journal::for_each_record(&self.dir.join(JOURNAL_DIR), |found| {
            if matches!(&found, Found::Claim(c) if c.id > applied && &*c.activity_id == activity_id) {
                pending += 1;
            }
        })?;
        Ok(InTransit::Counted(pending))
    }
}

/// The import's writes, in one transaction: activities, ticket types (none
/// moved to another activity), codes listed and generated.
fn import_in(
    conn: &mut Connection,
    config: &Config,
    node_start_ms: i64,
    by: Importer,
    skipped_at_start: &mut HashSet<(String, String)>,
) -> Result<ImportReport, StoreError> {
    let serving = by != Importer::Tool;
    // IMMEDIATE: the write lock first. A deferred transaction that reads
    // (the stored ticket types) and then writes fails at once with "database
    // is locked" when another connection (the claim applier) committed in
    // between: SQLite cannot upgrade a stale snapshot, and no busy timeout
    // helps. A reload under a rush failed so in a test run.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut report = ImportReport::default();
    {
        let stored: HashMap<String, String> = tx
            .prepare_cached("SELECT id, activity_id FROM tickets")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let moved = config.moved_from(|ticket| stored.get(ticket).cloned());
        if !moved.is_empty() {
            return Err(StoreError::MovedTicketType(moved.join("; ")));
        }
        // The window and the limit are what a serving node holds claims
        // to, and `report` and `verify` read them here: the node writes
        // them (at start, on reload), and a tool's import only where there
        // are none yet (?8: keep the stored). A relative time resolved
        // against the tool's clock, or a limit edited in the file and not
        // yet reloaded, is not what the node served. And once the activity
        // has claims its start may move earlier, not later: the report
        // counts from it, and a start moved after the sale (or a relative
        // one resolved again at a restart) gave negative times and empty
        // charts. (A claim still on its way from the journal, the
        // applier's 25 ms, is not seen; a restart replays the journal
        // before this.)
        let mut upsert_activity = tx.prepare_cached(
                "INSERT INTO activities (id, name, desc, image, start_ms, end_ms, per_user_limit) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(id) DO UPDATE SET name = excluded.name, desc = excluded.desc, image = excluded.image,
                   start_ms = CASE WHEN ?8 THEN start_ms
                     WHEN excluded.start_ms > start_ms AND EXISTS (SELECT 1 FROM claims WHERE activity_id = excluded.id)
                     THEN start_ms ELSE excluded.start_ms END,
                   end_ms = CASE WHEN ?8 THEN end_ms ELSE excluded.end_ms END,
                   per_user_limit = CASE WHEN ?8 THEN per_user_limit ELSE excluded.per_user_limit END",
            )?;
        let mut record_limit = tx.prepare_cached(
            "INSERT INTO activity_limits (activity_id, highest) VALUES (?1, ?2)
             ON CONFLICT(activity_id) DO UPDATE SET highest = max(highest, excluded.highest)",
        )?;
        let mut upsert_ticket = tx.prepare_cached(
                "INSERT INTO tickets (id, activity_id, name, desc) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET activity_id = excluded.activity_id, name = excluded.name, desc = excluded.desc",
            )?;
        let mut insert_code = tx.prepare_cached("INSERT OR IGNORE INTO codes (code, ticket_id) VALUES (?1, ?2)")?;
        let mut listed = tx.prepare_cached("SELECT digest FROM code_lists WHERE ticket_id = ?1")?;
        let mut record_list = tx.prepare_cached(
            "INSERT INTO code_lists (ticket_id, digest) VALUES (?1, ?2)
             ON CONFLICT(ticket_id) DO UPDATE SET digest = excluded.digest",
        )?;
        let mut owner = tx.prepare_cached("SELECT ticket_id FROM codes WHERE code = ?1")?;
        let mut count = tx.prepare_cached("SELECT COUNT(*) FROM codes WHERE ticket_id = ?1")?;
        // Codes the store holds under another ticket type: the whole
        // import is refused (the transaction dropped), naming a few.
        let (mut named, mut others) = (Vec::new(), 0);
        for a in &config.activities {
            upsert_activity.execute(params![
                a.id,
                a.name,
                a.desc,
                a.image,
                a.start_time.resolve(node_start_ms),
                a.end_time.resolve(node_start_ms),
                a.per_user_limit,
                !serving
            ])?;
            if serving {
                record_limit.execute(params![a.id, a.per_user_limit])?;
            }
            report.activities += 1;
            for t in &a.tickets {
                upsert_ticket.execute(params![t.id, a.id, t.name, t.desc])?;
                let mut added = Vec::new();
                // In key order, like generated codes below: a million
                // codes from a file in random order touched a random
                // index page each (3.5 s against 1.2 s sorted).
                let mut explicit: Vec<&String> = t.explicit_codes().iter().collect();
                explicit.sort_unstable();
                let digest = list_digest(&explicit);
                let known: Option<String> = listed.query_row([&t.id], |r| r.get(0)).optional()?;
                if known.as_deref() == Some(digest.as_str()) {
                    explicit.clear();
                }
                let whole = !explicit.is_empty();
                // Whether a listed code is another ticket type's.
                let mut clash = false;
                for code in explicit {
                    if insert_code.execute(params![code, t.id])? == 1 {
                        added.push(code.clone());
                        continue;
                    }
                    let holder: String = owner.query_row([code], |r| r.get(0))?;
                    if holder == t.id {
                        continue;
                    }
                    clash = true;
                    let key = (t.id.clone(), code.clone());
                    match by {
                        // Skipped at the start, and said there.
                        Importer::Reload if skipped_at_start.contains(&key) => continue,
                        Importer::Start => {
                            skipped_at_start.insert(key);
                        }
                        _ => {}
                    }
                    others += 1;
                    if named.len() < StoreError::CODES_NAMED {
                        named.push(StoreError::held_elsewhere(code, &t.id, &holder));
                    }
                }
                // Not with codes skipped (a node's start): the list is
                // checked again at the next import, and a reload refuses it.
                if whole && !clash {
                    record_list.execute(params![t.id, digest])?;
                }
                if let Some(target) = t.generate {
                    let have: i64 = count.query_row([&t.id], |r| r.get(0))?;
                    let mut rng = code_rng();
                    loop {
                        let missing = (target as usize).saturating_sub(have as usize + added.len());
                        if missing == 0 {
                            break;
                        }
                        // Inserted in key order, random codes append to the
                        // code index instead of touching a random page each.
                        let mut batch: Vec<String> = (0..missing).map(|_| generate_code(&mut rng)).collect();
                        batch.sort_unstable();
                        batch.dedup();
                        for code in batch {
                            if insert_code.execute(params![code, t.id])? == 1 {
                                added.push(code);
                            }
                        }
                    }
                }
                let total: i64 = count.query_row([&t.id], |r| r.get(0))?;
                report.tickets.push(TicketImport {
                    ticket_id: t.id.clone(),
                    added,
                    total: total as usize,
                });
            }
        }
        if others > 0 {
            let refused = StoreError::codes_of_other_tickets(&named, others);
            if by != Importer::Start {
                return Err(refused);
            }
            // Skipped, as earlier versions did (see `Importer::Start`).
            tracing::error!(
                conflict = %refused,
                "Codes skipped: the store holds them under other ticket types. Reloads skip these too; `ticketd import` of this config is refused."
            );
        }
    }
    tx.commit()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written before claims named their node: the claims table
    /// has no `node`, and the applier's insert failed on every batch.
    #[test]
    fn claims_of_an_earlier_version_get_their_node_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ticketd.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE claims (id INTEGER PRIMARY KEY, activity_id TEXT NOT NULL, ticket_id TEXT NOT NULL,
                     code TEXT NOT NULL UNIQUE, user_id INTEGER NOT NULL, claimed_at_ms INTEGER NOT NULL,
                     idempotency_key TEXT);
                 INSERT INTO claims VALUES (1, 'a', 't', 'OLD', 7, 1, NULL);",
            )
            .unwrap();
        let claim = |id: u64, code: &str| Claim {
            id,
            activity_id: "a".into(),
            ticket_id: "t".into(),
            code: code.into(),
            user_id: 8,
            claimed_at_ms: 2,
            idempotency_key: None,
        };
        let mut conn = open_db(&path).unwrap();
        assert!(applier::apply_claims(&mut conn, &[claim(2, "NEW")], "n1").is_err());
        drop(conn);
        // Opened as a tool would (the directory's lock held): migrated.
        let text = format!("[storage]\npath = \"{}\"\n", dir.path().display());
        let config = Config::from_toml(&text, Path::new("test.toml"), dir.path().to_owned()).unwrap();
        for _ in 0..2 {
            drop(EmbeddedStore::open(&config, Access::Tool).unwrap());
        }
        let mut conn = open_db(&path).unwrap();
        applier::apply_claims(&mut conn, &[claim(2, "NEW")], "n1").unwrap();
        let nodes: Vec<(String, String)> = conn
            .prepare("SELECT code, node FROM claims ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(nodes, [("OLD".into(), String::new()), ("NEW".into(), "n1".into())]);
    }

    /// A journal whose first segment (holding claims SQLite had not applied)
    /// was emptied to zeros, with a later segment intact: recovery drops
    /// the empty segment (it holds nothing), so the store must notice that
    /// the claims between what it applied and the journal's first record
    /// are gone, instead of starting with their codes back on sale.
    #[test]
    fn a_journal_that_no_longer_reaches_back_to_the_store_is_refused() {
        let segment = |seqs: std::ops::RangeInclusive<u64>| {
            let mut out = crate::journal::record::MAGIC.to_vec();
            for seq in seqs {
                let claim = Claim {
                    id: seq,
                    activity_id: "a".into(),
                    ticket_id: "t".into(),
                    code: format!("CODE-{seq}").into(),
                    user_id: seq,
                    claimed_at_ms: 1,
                    idempotency_key: None,
                };
                crate::journal::record::encode(&claim, seq, &mut out);
            }
            out
        };
        let journal = |first: Vec<u8>| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(format!("{:020}.journal", 1)), first).unwrap();
            std::fs::write(dir.path().join(format!("{:020}.journal", 4)), segment(4..=5)).unwrap();
            dir
        };
        let store = || {
            let conn = Connection::open_in_memory().unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn
        };
        let intact = journal(segment(1..=3));
        assert_eq!(applier::replay_journal(&mut store(), intact.path(), "n").unwrap(), 5);
        let emptied = journal(vec![0; 4096]);
        let mut conn = store();
        let error = applier::replay_journal(&mut conn, emptied.path(), "n").unwrap_err();
        assert!(error.to_string().contains("claims 1 to 3 are missing"), "{error}");
        assert!(error.to_string().contains("verify --repair"), "{error}");
        // `verify` names the missing numbers (given what the store accounted
        // for), and `--repair` voids them: the node starts, without them.
        let accounted = applier::accounted(&conn).unwrap();
        let reports = crate::journal::verify_from(emptied.path(), false, Some(accounted)).unwrap();
        assert!(
            reports.iter().any(|r| r.is_broken() && r.gaps == [(1, 3)]),
            "{reports:?}"
        );
        crate::journal::verify_from(emptied.path(), true, Some(accounted)).unwrap();
        assert_eq!(applier::replay_journal(&mut conn, emptied.path(), "n").unwrap(), 5);
        let held: i64 = conn.query_row("SELECT COUNT(*) FROM claims", [], |r| r.get(0)).unwrap();
        assert_eq!(held, 2);

        // Numbers voided by a repair are not missing: after a start that
        // replayed them, the next journal begins after them.
        let mut conn = store();
        let repaired = tempfile::tempdir().unwrap();
        let mut bytes = segment(1..=3);
        crate::journal::record::encode_void(4, &mut bytes);
        std::fs::write(repaired.path().join(format!("{:020}.journal", 1)), bytes).unwrap();
        assert_eq!(applier::replay_journal(&mut conn, repaired.path(), "n").unwrap(), 4);
        let next = tempfile::tempdir().unwrap();
        std::fs::write(next.path().join(format!("{:020}.journal", 5)), segment(5..=6)).unwrap();
        assert_eq!(applier::replay_journal(&mut conn, next.path(), "n").unwrap(), 6);
    }

    #[test]
    fn a_logout_deletes_the_expired_revocations_through_an_index() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let plan: Vec<String> = conn
            .prepare("EXPLAIN QUERY PLAN DELETE FROM revoked_sessions WHERE expires_at_ms < ?1")
            .unwrap()
            .query_map([0], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|step| step.contains("USING") && step.contains("revoked_sessions_expiry")),
            "{plan:?}"
        );
    }
}
