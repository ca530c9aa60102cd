//! `ticketd verify` on one node: the invariants of the store, checked in
//! SQLite and against the journal. What the journal's own segments look
//! like (damage, gaps) is `journal::verify`'s report; this is about what
//! they and the store *say*.

use std::{collections::HashMap, path::Path, sync::Arc};

use rusqlite::{params, Connection, OptionalExtension};

use super::applier::applied_seq;
use crate::{
    journal::{self, Found},
    store::types::{Reconciliation, StoreError},
};

/// Checks that every claim's code exists and is its ticket's (and the
/// ticket its activity's), that no code is claimed twice, that nobody holds
/// more than the highest limit the activity has had, that the journal and the store agree on every claim
/// both hold, and reports each
/// activity's stock (total − claimed).
///
/// Beside a serving node, SQLite is read as one snapshot, taken before the
/// journal is read: a claim the node applies meanwhile is then counted once,
/// as not applied yet. Read statement by statement, it was in the journal's
/// pending claims and in SQLite's at once, and its user "over the limit".
pub(super) fn reconcile(conn: &Connection, journal_dir: &Path) -> Result<Reconciliation, StoreError> {
    let snapshot = conn.unchecked_transaction()?;
    // The snapshot begins with the transaction's first read.
    applied_seq(&snapshot)?;
    let mut r = Reconciliation::default();
    each(
        conn,
        "SELECT c.id, c.code, c.ticket_id, k.ticket_id FROM claims c
         LEFT JOIN codes k ON k.code = c.code
         WHERE k.ticket_id IS NULL OR k.ticket_id != c.ticket_id ORDER BY c.id",
        |row| {
            let (id, code, ticket, owner): (i64, String, String, Option<String>) =
                (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
            r.problems.push(match owner {
                None => format!("claim {id}: code `{code}` is not a code of any ticket"),
                Some(owner) => format!("claim {id}: code `{code}` belongs to ticket `{owner}`, not `{ticket}`"),
            });
            Ok(())
        },
    )?;
    each(
        conn,
        "SELECT c.id, c.ticket_id, c.activity_id, t.activity_id FROM claims c
         LEFT JOIN tickets t ON t.id = c.ticket_id
         WHERE t.activity_id IS NULL OR t.activity_id != c.activity_id ORDER BY c.id",
        |row| {
            let (id, ticket, activity, owner): (i64, String, String, Option<String>) =
                (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
            r.problems.push(match owner {
                None => format!("claim {id}: ticket `{ticket}` does not exist"),
                Some(owner) => format!("claim {id}: ticket `{ticket}` is activity `{owner}`'s, not `{activity}`'s"),
            });
            Ok(())
        },
    )?;
    each(
        conn,
        "SELECT code, group_concat(id, ', ') FROM claims GROUP BY code HAVING count(*) > 1 ORDER BY code",
        |row| {
            let (code, ids): (String, String) = (row.get(0)?, row.get(1)?);
            r.problems
                .push(format!("code `{code}` is claimed more than once (claims {ids})"));
            Ok(())
        },
    )?;
    each(
        conn,
        "SELECT c.activity_id, c.user_id, count(*), max(a.per_user_limit, coalesce(l.highest, 0)) AS lim
         FROM claims c JOIN activities a ON a.id = c.activity_id
         LEFT JOIN activity_limits l ON l.activity_id = a.id
         GROUP BY c.activity_id, c.user_id HAVING count(*) > lim ORDER BY 1, 2",
        |row| {
            let (activity, user, n, limit): (String, i64, i64, i64) =
                (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
            r.problems.push(format!(
                "activity `{activity}`: user {user} holds {n} codes, over the limit of {limit}"
            ));
            Ok(())
        },
    )?;
    let pending = journal_agrees(conn, journal_dir, &mut r)?;
    each(
        conn,
        "SELECT a.id,
                (SELECT count(*) FROM codes k JOIN tickets t ON t.id = k.ticket_id WHERE t.activity_id = a.id),
                (SELECT count(*) FROM claims c WHERE c.activity_id = a.id)
         FROM activities a ORDER BY a.id",
        |row| {
            let (activity, total, claimed): (String, i64, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
            if claimed > total {
                r.problems
                    .push(format!("activity `{activity}`: {claimed} claims for {total} codes"));
            }
            r.summary.push(format!(
                "activity `{activity}`: {total} codes, {claimed} claimed, {} in stock",
                (total - claimed).max(0)
            ));
            Ok(())
        },
    )?;
    if pending > 0 {
        r.summary.push(format!(
            "{pending} journaled claims are not in the store yet (a serving node applies them shortly; a stopped one at its next start)"
        ));
    }
    // Read only: ending it commits nothing.
    drop(snapshot);
    Ok(r)
}

/// Every claim the journal holds up to the store's `applied_seq` must be in
/// the store, the same; one not applied yet must be a claim the store can
/// take: its ticket's code, not another claim's, and its user within the
/// limit with it. Returns how many are not applied yet.
///
/// The journal is read a segment at a time: after an incident (SQLite
/// stalled, its disk full) it may hold far more than a tool should keep in
/// memory at once.
fn journal_agrees(conn: &Connection, journal_dir: &Path, r: &mut Reconciliation) -> Result<usize, StoreError> {
    let mut check = JournalCheck {
        applied: applied_seq(conn)?,
        by_id: conn.prepare("SELECT activity_id, ticket_id, code, user_id FROM claims WHERE id = ?1")?,
        by_code: conn.prepare("SELECT id FROM claims WHERE code = ?1 AND id != ?2")?,
        owner: conn.prepare("SELECT ticket_id FROM codes WHERE code = ?1")?,
        pending: HashMap::new(),
        pending_codes: HashMap::new(),
    };
    let mut failed = None;
    journal::for_each_record(journal_dir, |found| {
        if failed.is_none() {
            failed = check.record(found, r).err();
        }
    })?;
    if let Some(error) = failed {
        return Err(error);
    }
    let mut held = conn.prepare(
        "SELECT count(*),
                (SELECT max(a.per_user_limit, coalesce(l.highest, 0)) FROM activities a
                 LEFT JOIN activity_limits l ON l.activity_id = a.id WHERE a.id = ?1)
         FROM claims WHERE activity_id = ?1 AND user_id = ?2",
    )?;
    for ((activity, user), n) in &check.pending {
        let (have, limit): (i64, Option<i64>) =
            held.query_row(params![activity, *user as i64], |row| Ok((row.get(0)?, row.get(1)?)))?;
        let total = have as usize + n;
        if limit.is_some_and(|limit| total as i64 > limit) {
            r.problems.push(format!(
                "activity `{activity}`: user {user} would hold {total} codes once the journal is applied, over the limit of {}",
                limit.unwrap_or_default()
            ));
        }
    }
    Ok(check.pending.values().sum())
}

/// [`journal_agrees`]' statements, and the claims not applied yet per
/// (activity, user).
struct JournalCheck<'c> {
    applied: u64,
    by_id: rusqlite::Statement<'c>,
    by_code: rusqlite::Statement<'c>,
    owner: rusqlite::Statement<'c>,
    pending: HashMap<(String, u64), usize>,
    /// The codes of the claims not applied yet, and which claim gives each:
    /// two of them with one code pass each look in the store, and the
    /// applier then refuses their batch (a serving node retries it for
    /// ever; a stopped one does not start).
    pending_codes: HashMap<Arc<str>, u64>,
}

impl JournalCheck<'_> {
    fn record(&mut self, found: Found, r: &mut Reconciliation) -> Result<(), StoreError> {
        // A repair voids a number whose record the journal lost; the store
        // may have applied that claim before the damage, and then its copy
        // is the claim.
        let Found::Claim(c) = found else { return Ok(()) };
        let stored: Option<(String, String, String, i64)> = self
            .by_id
            .query_row(params![c.id as i64], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .optional()?;
        let journaled = (
            c.activity_id.to_string(),
            c.ticket_id.to_string(),
            c.code.to_string(),
            c.user_id as i64,
        );
        match stored {
            Some(s) if s == journaled => return Ok(()),
            Some(s) => {
                r.problems.push(format!(
                    "claim {}: the journal has code `{}` for user {}, the store code `{}` for user {}",
                    c.id, journaled.2, journaled.3, s.2, s.3
                ));
                return Ok(());
            }
            None if c.id <= self.applied => {
                r.problems.push(format!(
                    "claim {} (code `{}`, user {}) is in the journal and marked applied, but not in the store",
                    c.id, c.code, c.user_id
                ));
                return Ok(());
            }
            None => {}
        }
        // Not applied yet (the node serves and applies it shortly, or will
        // replay it at its next start): it must be a claim the store can take.
        *self.pending.entry((c.activity_id.to_string(), c.user_id)).or_default() += 1;
        let other: Option<i64> = self
            .by_code
            .query_row(params![&*c.code, c.id as i64], |row| row.get(0))
            .optional()?;
        if let Some(other) = other {
            r.problems.push(format!(
                "journaled claim {} would give code `{}` to user {}, but the store gives it to claim {other}",
                c.id, c.code, c.user_id
            ));
        }
        if let Some(other) = self.pending_codes.insert(c.code.clone(), c.id).filter(|&o| o != c.id) {
            r.problems.push(format!(
                "journaled claims {other} and {} both give code `{}`",
                c.id, c.code
            ));
        }
        let ticket: Option<String> = self.owner.query_row(params![&*c.code], |row| row.get(0)).optional()?;
        if ticket.as_deref() != Some(&*c.ticket_id) {
            r.problems.push(format!(
                "journaled claim {}: code `{}` is not a code of ticket `{}`",
                c.id, c.code, c.ticket_id
            ));
        }
        Ok(())
    }
}

/// Runs `sql` and calls `f` on each row.
fn each(
    conn: &Connection,
    sql: &str,
    mut f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<()>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        f(row)?;
    }
    Ok(())
}
