//! The applier: how journaled claims reach SQLite, at run time and at start.
//!
//! A claim is durable once the journal has it; the applier copies claims
//! into SQLite in batches afterwards. A claim row is keyed by its journal
//! sequence number, so applying twice (a replay after a crash that happened
//! after SQLite committed but before the journal segment was deleted)
//! inserts nothing: `ON CONFLICT(id) DO NOTHING`, on the id alone. Not
//! `INSERT OR IGNORE`, which would also drop, without a word, a claim whose
//! code another claim holds: that batch fails instead. `meta.applied_seq`
//! records how far the copy got; the journal deletes segments below it, and
//! [`replay_journal`] applies whatever a stopped node left above it.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use crossbeam_channel::Receiver;
use rusqlite::{params, Connection, OptionalExtension};

use crate::{
    journal,
    store::types::StoreError,
    vocab::Claim,
    worker::{Ctl, Runner},
};

/// Claims applied per SQLite transaction at most.
pub(super) const APPLY_BATCH: usize = 8192;

/// How long the applier gathers durable batches before one transaction.
/// Applying each group commit at once cost a SQLite commit (and fsync) and
/// a wake-up per journal fsync: in a rush of successful claims the applier
/// took a quarter of the node's CPU samples. SQLite (exports, reports) lags
/// the journal by this much more; nothing on the claim path reads it.
const GATHER: Duration = Duration::from_millis(25);

pub(super) fn applied_seq(conn: &Connection) -> Result<u64, StoreError> {
    let v: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'applied_seq'", [], |r| r.get(0))
        .optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Inserts claims (idempotently) and advances `applied_seq`, in one transaction.
/// Only a claim already applied (the same id: a replay) is skipped; a second
/// claim of a code fails the whole batch, loudly, with the journal kept —
/// skipped, it would be gone from SQLite once its segment was trimmed, and
/// its code back in stock at the next start.
pub(super) fn apply_claims(conn: &mut Connection, claims: &[Claim], node: &str) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO claims (id, activity_id, ticket_id, code, user_id, claimed_at_ms, idempotency_key, node)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(id) DO NOTHING",
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
            advance_applied_seq(&tx, last)?;
        }
    }
    tx.commit()
}

/// Applies the journal left on disk to SQLite; returns the highest claim id known.
pub(super) fn replay_journal(conn: &mut Connection, journal_dir: &Path, node: &str) -> Result<u64, StoreError> {
    let recovered = journal::recover(journal_dir)?;
    let applied = applied_seq(conn)?;
    // Segments are deleted only once applied (and at a start, once
    // replayed), so the journal reaches back to the next number the store
    // has not accounted for. A first record past it means a segment
    // holding unapplied claims was lost; their codes would go back on sale.
    let accounted = applied.max(max_claim(conn)?);
    if let Some(first) = recovered.first_seq.filter(|&f| f > accounted + 1) {
        return Err(journal::JournalError::Missing {
            dir: journal_dir.to_owned(),
            applied: accounted,
            first,
        }
        .into());
    }
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
    // Voided numbers (`verify --repair`) are accounted for too: the next
    // journal starts after them, and must not look as if it skipped them.
    if recovered.last_seq > applied {
        advance_applied_seq(conn, recovered.last_seq)?;
    }
    // Replayed claims are at most `last_seq`.
    Ok(recovered.last_seq.max(accounted))
}

/// Raises `applied_seq` to `seq` (never lowers it).
fn advance_applied_seq(conn: &Connection, seq: u64) -> rusqlite::Result<usize> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('applied_seq', ?1)
         ON CONFLICT(key) DO UPDATE SET value = max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
        params![seq.to_string()],
    )
}

fn max_claim(conn: &Connection) -> Result<u64, StoreError> {
    let id: i64 = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM claims", [], |r| r.get(0))?;
    Ok(id as u64)
}

/// The last journal number the store accounted for: applied (or voided
/// and replayed), or held as a claim.
pub(super) fn accounted(conn: &Connection) -> Result<u64, StoreError> {
    Ok(applied_seq(conn)?.max(max_claim(conn)?))
}

/// Starts the applier: the worker that copies durable claims into SQLite,
/// in batches of up to [`APPLY_BATCH`], retrying (never dropping) on errors,
/// and records how far it got in `applied` (the journal deletes segments
/// below it). It ends when the journal writer is gone and everything it
/// sent is applied.
pub(super) fn start(
    runner: &Runner,
    conn: Connection,
    rx: Receiver<Vec<Claim>>,
    applied: Arc<AtomicU64>,
    node: String,
) -> Result<(), StoreError> {
    runner
        .thread("store-applier", move |ctl| run(conn, rx, &applied, &node, &ctl), || {})
        .map_err(|source| StoreError::Io {
            what: "cannot start thread",
            path: PathBuf::from("store-applier"),
            source,
        })
}

fn run(mut conn: Connection, rx: Receiver<Vec<Claim>>, applied: &AtomicU64, node: &str, ctl: &Ctl) {
    let mut backlog: Vec<Claim> = Vec::new();
    while let Ok(batch) = rx.recv() {
        backlog.extend(batch);
        // Gather the group commits of the next few milliseconds into one
        // transaction: each costs SQLite an fsync of its own, and the claims
        // are durable in the journal already. Sleeping rather than waiting
        // on the channel: a wait would wake this thread (a context switch)
        // for every group commit.
        std::thread::sleep(GATHER);
        while backlog.len() < APPLY_BATCH {
            match rx.try_recv() {
                Ok(more) => backlog.extend(more),
                Err(_) => break,
            }
        }
        let mut delay = Duration::from_millis(10);
        let mut attempts = 0;
        loop {
            match apply_claims(&mut conn, &backlog, node) {
                Ok(()) => break,
                Err(error) => {
                    attempts += 1;
                    ctl.error(&error);
                    tracing::error!(%error, claims = backlog.len(), "Applying claims to SQLite failed; retrying (they are safe in the journal).");
                    // At shutdown, do not hang: the journal keeps them
                    // and the next start applies them.
                    match rx.try_recv() {
                        Ok(more) => backlog.extend(more),
                        Err(crossbeam_channel::TryRecvError::Disconnected) if attempts >= 5 => {
                            tracing::error!(
                                "Giving up applying claims at shutdown; the next start replays them from the journal."
                            );
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
        ctl.tick();
        backlog.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(id: u64, code: &str) -> Claim {
        Claim {
            id,
            activity_id: "a".into(),
            ticket_id: "t".into(),
            code: code.into(),
            user_id: id,
            claimed_at_ms: 1_000 + id as i64,
            idempotency_key: id.is_multiple_of(2).then(|| Arc::from(format!("k{id}"))),
        }
    }

    fn db(dir: &Path) -> Connection {
        super::super::open_db(&dir.join("ticketd.db")).unwrap()
    }

    fn claims_in(conn: &Connection) -> Vec<(u64, String, Option<String>)> {
        let mut stmt = conn
            .prepare("SELECT id, code, idempotency_key FROM claims ORDER BY id")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Writes `claims` to a journal segment the way the journal writer does.
    fn write_segment(dir: &Path, first_seq: u64, claims: &[Claim]) {
        std::fs::create_dir_all(dir).unwrap();
        let mut bytes = journal::record::MAGIC.to_vec();
        for (i, c) in claims.iter().enumerate() {
            journal::record::encode(c, first_seq + i as u64, &mut bytes);
        }
        std::fs::write(dir.join(format!("{first_seq:020}.journal")), bytes).unwrap();
    }

    #[test]
    fn applying_twice_records_each_claim_once_and_keeps_the_highest_seq() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = db(dir.path());
        let batch = [claim(1, "A"), claim(2, "B")];
        apply_claims(&mut conn, &batch, "n1").unwrap();
        apply_claims(&mut conn, &batch, "n1").unwrap();
        apply_claims(&mut conn, &[claim(1, "A")], "n1").unwrap();
        assert_eq!(
            claims_in(&conn),
            vec![(1, "A".into(), None), (2, "B".into(), Some("k2".into()))]
        );
        assert_eq!(
            applied_seq(&conn).unwrap(),
            2,
            "an older batch never moves applied_seq back"
        );
    }

    #[test]
    fn a_second_claim_of_a_code_is_refused_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let journal_dir = dir.path().join("journal");
        let mut conn = db(dir.path());
        write_segment(&journal_dir, 1, &[claim(1, "A"), claim(2, "A")]);
        assert!(replay_journal(&mut conn, &journal_dir, "n1").is_err());
        assert_eq!(applied_seq(&conn).unwrap(), 0, "nothing of the batch applied");
        assert!(apply_claims(&mut conn, &[claim(3, "B"), claim(4, "B")], "n1").is_err());
        assert!(claims_in(&conn).is_empty());
    }

    #[test]
    fn replay_applies_only_what_sqlite_has_not_seen() {
        let dir = tempfile::tempdir().unwrap();
        let journal_dir = dir.path().join("journal");
        let mut conn = db(dir.path());
        apply_claims(&mut conn, &[claim(1, "A")], "n1").unwrap();
        write_segment(&journal_dir, 1, &[claim(1, "A"), claim(2, "B"), claim(3, "C")]);
        let last = replay_journal(&mut conn, &journal_dir, "n1").unwrap();
        assert_eq!(last, 3);
        assert_eq!(claims_in(&conn).iter().map(|c| c.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(applied_seq(&conn).unwrap(), 3);
        // Replaying again (a crash before the segments were deleted) adds nothing.
        assert_eq!(replay_journal(&mut conn, &journal_dir, "n1").unwrap(), 3);
        assert_eq!(claims_in(&conn).len(), 3);
    }

    #[test]
    fn replay_truncates_a_torn_tail_and_keeps_what_came_before() {
        let dir = tempfile::tempdir().unwrap();
        let journal_dir = dir.path().join("journal");
        write_segment(&journal_dir, 1, &[claim(1, "A"), claim(2, "B")]);
        let seg = journal_dir.join(format!("{:020}.journal", 1));
        let mut bytes = std::fs::read(&seg).unwrap();
        let mut torn = Vec::new();
        journal::record::encode(&claim(3, "C"), 3, &mut torn);
        bytes.extend_from_slice(&torn[..torn.len() - 3]);
        std::fs::write(&seg, &bytes).unwrap();
        let mut conn = db(dir.path());
        assert_eq!(replay_journal(&mut conn, &journal_dir, "n1").unwrap(), 2);
        assert_eq!(claims_in(&conn).len(), 2);
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len() as usize,
            bytes.len() - (torn.len() - 3)
        );
    }

    #[test]
    fn the_applier_copies_every_batch_and_stops_when_the_journal_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let runner = Runner::new();
        let applied = Arc::new(AtomicU64::new(0));
        let (tx, rx) = crossbeam_channel::unbounded();
        start(&runner, db(dir.path()), rx, applied.clone(), "n1".into()).unwrap();
        tx.send(vec![claim(1, "A"), claim(2, "B")]).unwrap();
        tx.send(vec![claim(3, "C")]).unwrap();
        drop(tx);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(runner.stop(&["store-applier"]));
        let report = runner.report();
        assert_eq!(report[0].state, crate::worker::WorkerState::Stopped);
        assert_eq!(applied.load(Ordering::Acquire), 3);
        let conn = db(dir.path());
        assert_eq!(claims_in(&conn).len(), 3);
        assert_eq!(applied_seq(&conn).unwrap(), 3);
    }
}
