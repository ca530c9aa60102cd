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
//! the claim path: a claim is durable once the journal has it; an applier
//! thread copies journaled claims into SQLite in batches afterwards. A claim
//! row is keyed by its journal sequence number, so re-applying after a crash
//! is an idempotent `INSERT OR IGNORE`; `meta.applied_seq` records how far
//! the copy got, and journal segments below it are deleted.

use std::{
    fs::{File, OpenOptions},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crossbeam_channel::Receiver;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

use super::{Access, ClaimRow, ImportReport, StoreError, TicketImport, User};
use crate::{
    claim::{Claim, PendingClaim},
    config::Config,
    journal::{Journal, JournalSetup},
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
    created_at_ms INTEGER NOT NULL
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
CREATE TABLE IF NOT EXISTS stats_outcomes (
    activity_id TEXT NOT NULL,
    minute      INTEGER NOT NULL,
    outcome     TEXT NOT NULL,
    count       INTEGER NOT NULL,
    PRIMARY KEY (activity_id, minute, outcome)
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
CREATE TABLE IF NOT EXISTS revoked_sessions (
    token_id      TEXT PRIMARY KEY,
    expires_at_ms INTEGER NOT NULL
);
"#;

/// Claims applied per SQLite transaction at most.
const APPLY_BATCH: usize = 8192;

/// SQLite and, when serving, the journal and its applier.
pub struct EmbeddedStore {
    /// Used for everything but applying claims; short statements only.
    db: Mutex<Connection>,
    journal: Option<Journal<PendingClaim>>,
    applier: Mutex<Option<JoinHandle<()>>>,
    /// Held for the life of a serving node.
    _lock: Option<File>,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Takes the directory lock without waiting; `None` if another process has it.
fn try_lock(dir: &Path) -> Result<Option<File>, StoreError> {
    let path = dir.join("ticketd.lock");
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

fn open_db(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: an applied claim batch is on disk before its journal segment may be deleted.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

fn applied_seq(conn: &Connection) -> Result<u64, StoreError> {
    let v: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'applied_seq'", [], |r| r.get(0))
        .optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Inserts claims (idempotently) and advances `applied_seq`, in one transaction.
fn apply_claims(conn: &mut Connection, claims: &[Claim], node: &str) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO claims (id, activity_id, ticket_id, code, user_id, claimed_at_ms, idempotency_key, node)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for c in claims {
            insert.execute(params![
                c.id as i64,
                &*c.activity_id,
                &*c.ticket_id,
                &*c.code,
                c.user_id as i64,
                c.claimed_at_ms,
                c.idempotency_key.as_deref(),
                node
            ])?;
        }
        if let Some(last) = claims.iter().map(|c| c.id).max() {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('applied_seq', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                params![last.to_string()],
            )?;
        }
    }
    tx.commit()
}

/// Applies the journal left on disk to SQLite; returns the highest claim id known.
fn replay_journal(conn: &mut Connection, journal_dir: &Path, node: &str) -> Result<u64, StoreError> {
    let recovered = Journal::<PendingClaim>::recover(journal_dir)?;
    let applied = applied_seq(conn)?;
    let pending: Vec<Claim> = recovered.claims.into_iter().filter(|c| c.id > applied).collect();
    if !pending.is_empty() {
        tracing::info!(
            claims = pending.len(),
            after_seq = applied,
            "Replaying journal into the store."
        );
        for chunk in pending.chunks(APPLY_BATCH) {
            apply_claims(conn, chunk, node)?;
        }
    }
    let max_claim: i64 = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM claims", [], |r| r.get(0))?;
    Ok(recovered.last_seq.max(max_claim as u64).max(applied))
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

impl EmbeddedStore {
    /// Opens `storage.path`, creating it if needed.
    pub fn open(config: &Config, access: Access) -> Result<EmbeddedStore, StoreError> {
        let dir = config.storage.path.clone();
        std::fs::create_dir_all(&dir).map_err(io("cannot create the data directory", &dir))?;
        let journal_dir = dir.join("journal");
        let db_path = dir.join("ticketd.db");
        let lock = try_lock(&dir)?;
        let mut conn = open_db(&db_path)?;
        // Every claim in this store was handed out by the node that owns it.
        let node = config.node_id();
        match (access, lock) {
            (Access::Serve, None) => Err(StoreError::Locked(dir)),
            (Access::Serve, Some(lock)) => {
                let last_seq = replay_journal(&mut conn, &journal_dir, &node)?;
                let applied = Arc::new(AtomicU64::new(last_seq));
                let (tx, rx) = crossbeam_channel::unbounded();
                let applier = spawn_applier(open_db(&db_path)?, rx, applied.clone(), node)?;
                let journal = Journal::start(JournalSetup {
                    dir: journal_dir,
                    config: config.journal.clone(),
                    next_seq: last_seq + 1,
                    applier: tx,
                    applied_seq: applied,
                })?;
                Ok(EmbeddedStore {
                    db: Mutex::new(conn),
                    journal: Some(journal),
                    applier: Mutex::new(Some(applier)),
                    _lock: Some(lock),
                })
            }
            (Access::Tool, lock) => {
                if lock.is_some() && journal_dir.exists() {
                    // No node is running: fold in whatever a crashed one left.
                    replay_journal(&mut conn, &journal_dir, &node)?;
                }
                Ok(EmbeddedStore {
                    db: Mutex::new(conn),
                    journal: None,
                    applier: Mutex::new(None),
                    _lock: None,
                })
            }
        }
    }

    pub(super) fn commit(&self, pending: PendingClaim) {
        match &self.journal {
            Some(j) => j.append(pending),
            None => journal_less(pending),
        }
    }

    pub(super) fn is_healthy(&self) -> bool {
        self.journal.as_ref().is_some_and(Journal::is_healthy)
    }

    pub(super) fn ping(&self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.journal.as_ref().and_then(Journal::ping)
    }

    pub(super) fn commit_queue_len(&self) -> usize {
        self.journal.as_ref().map_or(0, Journal::queue_len)
    }

    pub(super) fn import(&self, config: &Config, node_start_ms: i64) -> Result<ImportReport, StoreError> {
        let mut conn = self.db.lock();
        let tx = conn.transaction()?;
        let mut report = ImportReport::default();
        {
            let mut upsert_activity = tx.prepare_cached(
                "INSERT INTO activities (id, name, desc, image, start_ms, end_ms, per_user_limit) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(id) DO UPDATE SET name = excluded.name, desc = excluded.desc, image = excluded.image,
                   start_ms = excluded.start_ms, end_ms = excluded.end_ms, per_user_limit = excluded.per_user_limit",
            )?;
            let mut upsert_ticket = tx.prepare_cached(
                "INSERT INTO tickets (id, activity_id, name, desc) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET activity_id = excluded.activity_id, name = excluded.name, desc = excluded.desc",
            )?;
            let mut insert_code = tx.prepare_cached("INSERT OR IGNORE INTO codes (code, ticket_id) VALUES (?1, ?2)")?;
            let mut owner = tx.prepare_cached("SELECT ticket_id FROM codes WHERE code = ?1")?;
            let mut count = tx.prepare_cached("SELECT COUNT(*) FROM codes WHERE ticket_id = ?1")?;
            for a in &config.activities {
                upsert_activity.execute(params![
                    a.id,
                    a.name,
                    a.desc,
                    a.image,
                    a.start_time.resolve(node_start_ms),
                    a.end_time.resolve(node_start_ms),
                    a.per_user_limit
                ])?;
                report.activities += 1;
                for t in &a.tickets {
                    upsert_ticket.execute(params![t.id, a.id, t.name, t.desc])?;
                    let mut added = Vec::new();
                    for code in t.explicit_codes() {
                        if insert_code.execute(params![code, t.id])? == 1 {
                            added.push(code.clone());
                        } else {
                            let holder: String = owner.query_row([code], |r| r.get(0))?;
                            if holder != t.id {
                                report.conflicts.push(format!(
                                    "code `{code}` of ticket `{}` already belongs to ticket `{holder}`",
                                    t.id
                                ));
                            }
                        }
                    }
                    if let Some(target) = t.generate {
                        let have: i64 = count.query_row([&t.id], |r| r.get(0))?;
                        let mut rng = rand::rngs::OsRng;
                        while (have as usize + added.len()) < target as usize {
                            let code = super::generate_code(&mut rng);
                            if insert_code.execute(params![code, t.id])? == 1 {
                                added.push(code);
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
        }
        tx.commit()?;
        Ok(report)
    }

    pub(super) fn unclaimed_codes(&self, ticket_id: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.db.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT c.code FROM codes c WHERE c.ticket_id = ?1 AND NOT EXISTS (SELECT 1 FROM claims k WHERE k.code = c.code)",
        )?;
        let codes = stmt.query_map([ticket_id], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(codes)
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

    pub(super) fn export_claims(
        &self,
        activity_id: &str,
        f: &mut dyn FnMut(ClaimRow) -> std::io::Result<()>,
    ) -> Result<u64, StoreError> {
        let conn = self.db.lock();
        let mut stmt = conn.prepare(
            "SELECT k.id, k.activity_id, k.ticket_id, k.code, k.user_id, COALESCE(u.username, ''), COALESCE(u.nickname, ''), k.claimed_at_ms, k.node
             FROM claims k LEFT JOIN users u ON u.id = k.user_id WHERE k.activity_id = ?1 ORDER BY k.id",
        )?;
        let mut rows = stmt.query([activity_id])?;
        let mut n = 0;
        while let Some(r) = rows.next()? {
            f(ClaimRow {
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
            .map_err(io("cannot write the export to", Path::new("the output")))?;
            n += 1;
        }
        Ok(n)
    }

    pub(super) fn has_activity(&self, activity_id: &str) -> Result<bool, StoreError> {
        let conn = self.db.lock();
        let found = conn
            .query_row("SELECT 1 FROM activities WHERE id = ?1", [activity_id], |_| Ok(()))
            .optional()?;
        Ok(found.is_some())
    }

    pub(super) fn create_user(&self, username: &str, nickname: &str, password_hash: &str) -> Result<User, StoreError> {
        let conn = self.db.lock();
        let now = crate::config::now_ms();
        let inserted = conn.execute(
            "INSERT OR IGNORE INTO users (username, nickname, password_hash, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![username, nickname, password_hash, now],
        )?;
        if inserted == 0 {
            return Err(StoreError::UsernameTaken);
        }
        Ok(User {
            id: conn.last_insert_rowid() as u64,
            username: username.to_owned(),
            nickname: nickname.to_owned(),
            password_hash: password_hash.to_owned(),
            created_at_ms: now,
        })
    }

    pub(super) fn create_users(&self, users: &[(String, String, String)]) -> Result<usize, StoreError> {
        let mut conn = self.db.lock();
        let tx = conn.transaction()?;
        let mut created = 0;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO users (username, nickname, password_hash, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let now = crate::config::now_ms();
            for (username, nickname, hash) in users {
                created += insert.execute(params![username, nickname, hash, now])?;
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

    pub(super) fn list_users(&self) -> Result<Vec<User>, StoreError> {
        let conn = self.db.lock();
        let mut stmt =
            conn.prepare("SELECT id, username, nickname, password_hash, created_at_ms FROM users ORDER BY id")?;
        let users = stmt.query_map([], user_from_row)?.collect::<Result<_, _>>()?;
        Ok(users)
    }

    pub(super) fn revoke_session(&self, token_id: &str, expires_at_ms: i64) -> Result<(), StoreError> {
        let conn = self.db.lock();
        conn.execute(
            "INSERT OR IGNORE INTO revoked_sessions (token_id, expires_at_ms) VALUES (?1, ?2)",
            params![token_id, expires_at_ms],
        )?;
        Ok(())
    }

    pub(super) fn revoked_sessions(&self, now_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let conn = self.db.lock();
        conn.execute("DELETE FROM revoked_sessions WHERE expires_at_ms < ?1", [now_ms])?;
        let mut stmt = conn.prepare("SELECT token_id, expires_at_ms FROM revoked_sessions")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
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

    pub(super) fn add_stats(&self, batch: &crate::stats::StatsBatch) -> Result<(), StoreError> {
        let mut conn = self.db.lock();
        let tx = conn.transaction()?;
        {
            let mut outcome = tx.prepare_cached(
                "INSERT INTO stats_outcomes (activity_id, minute, outcome, count) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO UPDATE SET count = count + excluded.count",
            )?;
            for (a, minute, label, n) in &batch.outcomes {
                outcome.execute(params![&**a, minute, label, *n as i64])?;
            }
            let mut source = tx.prepare_cached(
                "INSERT INTO stats_sources (activity_id, kind, source, requests) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO UPDATE SET requests = requests + excluded.requests",
            )?;
            for (a, s, n) in &batch.sources {
                let (kind, key) = s.parts();
                source.execute(params![&**a, kind, key, *n as i64])?;
            }
            let mut latency = tx.prepare_cached(
                "INSERT INTO stats_latency (activity_id, bound_ms, count) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO UPDATE SET count = count + excluded.count",
            )?;
            for (a, bound, n) in &batch.latency {
                // SQLite has no infinity literal in every build; store the open bucket as -1.
                let bound = if bound.is_finite() { *bound } else { -1.0 };
                latency.execute(params![&**a, bound, *n as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub(super) fn report_data(&self, activity_id: &str, top: usize) -> Result<super::ReportData, StoreError> {
        let conn = self.db.lock();
        let mut data = super::ReportData {
            activity: conn
                .query_row(
                    "SELECT name, start_ms, end_ms, per_user_limit FROM activities WHERE id = ?1",
                    [activity_id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?,
            ..Default::default()
        };
        let mut tickets = conn.prepare(
            "SELECT t.id, t.name,
                    (SELECT COUNT(*) FROM codes c WHERE c.ticket_id = t.id),
                    (SELECT COUNT(*) FROM claims k WHERE k.ticket_id = t.id),
                    (SELECT MIN(claimed_at_ms) FROM claims k WHERE k.ticket_id = t.id),
                    (SELECT MAX(claimed_at_ms) FROM claims k WHERE k.ticket_id = t.id)
             FROM tickets t WHERE t.activity_id = ?1 ORDER BY t.rowid",
        )?;
        data.tickets = tickets
            .query_map([activity_id], |r| {
                Ok(super::TicketReport {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    codes: r.get::<_, i64>(2)? as u64,
                    claimed: r.get::<_, i64>(3)? as u64,
                    first_ms: r.get(4)?,
                    last_ms: r.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut per_second = conn.prepare(
            "SELECT claimed_at_ms / 1000 AS s, COUNT(*) FROM claims WHERE activity_id = ?1 GROUP BY s ORDER BY s",
        )?;
        data.claims_per_second = per_second
            .query_map([activity_id], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?;
        let mut outcomes = conn.prepare(
            "SELECT minute, outcome, count FROM stats_outcomes WHERE activity_id = ?1 ORDER BY minute, outcome",
        )?;
        data.outcomes = outcomes
            .query_map([activity_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })?
            .collect::<Result<_, _>>()?;
        let mut latency = conn.prepare(
            "SELECT bound_ms, count FROM stats_latency WHERE activity_id = ?1 ORDER BY bound_ms < 0, bound_ms",
        )?;
        data.latency = latency
            .query_map([activity_id], |r| {
                let bound: f64 = r.get(0)?;
                Ok((
                    if bound < 0.0 { f64::INFINITY } else { bound },
                    r.get::<_, i64>(1)? as u64,
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut ips = conn.prepare(
            "SELECT source, requests FROM stats_sources WHERE activity_id = ?1 AND kind = 'ip'
             ORDER BY requests DESC, source LIMIT ?2",
        )?;
        data.top_ips = ips
            .query_map(params![activity_id, top as i64], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<_, _>>()?;
        let mut users = conn.prepare(
            "SELECT COALESCE(u.username, '#' || s.source), s.requests FROM stats_sources s
             LEFT JOIN users u ON u.id = CAST(s.source AS INTEGER)
             WHERE s.activity_id = ?1 AND s.kind = 'user' ORDER BY s.requests DESC, s.source LIMIT ?2",
        )?;
        data.top_users = users
            .query_map(params![activity_id, top as i64], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<_, _>>()?;
        let mut nodes =
            conn.prepare("SELECT node, COUNT(*) FROM claims WHERE activity_id = ?1 GROUP BY node ORDER BY node")?;
        data.nodes = nodes
            .query_map([activity_id], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?;
        data.users = conn.query_row(
            "SELECT COUNT(DISTINCT user_id) FROM claims WHERE activity_id = ?1",
            [activity_id],
            |r| r.get::<_, i64>(0),
        )? as u64;
        Ok(data)
    }

    pub(super) fn close(&self) {
        if let Some(j) = &self.journal {
            j.close();
        }
        if let Some(applier) = self.applier.lock().take() {
            if applier.join().is_err() {
                tracing::error!("The store applier panicked.");
            }
        }
    }
}

/// A tool process has no journal; it never claims.
fn journal_less(pending: PendingClaim) {
    use crate::journal::Entry;
    pending.settle(Err(crate::claim::CommitError::Unavailable));
}

/// Copies durable claims into SQLite, retrying (never dropping) on errors.
fn spawn_applier(
    mut conn: Connection,
    rx: Receiver<Vec<Claim>>,
    applied: Arc<AtomicU64>,
    node: String,
) -> Result<JoinHandle<()>, StoreError> {
    std::thread::Builder::new()
        .name("store-applier".into())
        .spawn(move || {
            let mut backlog: Vec<Claim> = Vec::new();
            while let Ok(batch) = rx.recv() {
                backlog.extend(batch);
                while backlog.len() < APPLY_BATCH {
                    match rx.try_recv() {
                        Ok(more) => backlog.extend(more),
                        Err(_) => break,
                    }
                }
                let mut delay = Duration::from_millis(10);
                let mut attempts = 0;
                loop {
                    match apply_claims(&mut conn, &backlog, &node) {
                        Ok(()) => break,
                        Err(error) => {
                            attempts += 1;
                            tracing::error!(%error, claims = backlog.len(), "Applying claims to SQLite failed; retrying (they are safe in the journal).");
                            // At shutdown, do not hang: the journal keeps them
                            // and the next start applies them.
                            match rx.try_recv() {
                                Ok(more) => backlog.extend(more),
                                Err(crossbeam_channel::TryRecvError::Disconnected) if attempts >= 5 => {
                                    tracing::error!("Giving up applying claims at shutdown; the next start replays them from the journal.");
                                    return;
                                }
                                Err(_) => {}
                            }
                            std::thread::sleep(delay);
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                if let Some(last) = backlog.iter().map(|c| c.id).max() {
                    applied.store(last, Ordering::Release);
                }
                backlog.clear();
            }
        })
        .map_err(|source| StoreError::Io {
            what: "cannot start thread",
            path: PathBuf::from("store-applier"),
            source,
        })
}
