//! The rush statistics and the report query of the embedded store.
//!
//! Statistics arrive drained from memory once a second and are added to
//! per-tick, per-source and per-latency-bucket totals; the report reads
//! them back beside the claims themselves.

use rusqlite::{params, Connection, OptionalExtension};

use crate::{
    stats::StatsBatch,
    store::types::{ReportData, StoreError, TicketReport},
};

/// Adds drained rush statistics to the running totals, in one transaction.
pub(super) fn add_stats(conn: &mut Connection, batch: &StatsBatch) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    {
        let mut outcome = tx.prepare_cached(
            "INSERT INTO stats_outcome_ticks (activity_id, at_ms, outcome, count) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT DO UPDATE SET count = count + excluded.count",
        )?;
        for (a, at_ms, label, n) in &batch.outcomes {
            outcome.execute(params![&**a, at_ms, label, *n as i64])?;
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

/// Everything the rush report shows about `activity_id`; `top` rows of each ranking.
pub(super) fn report_data(conn: &Connection, activity_id: &str, top: usize) -> Result<ReportData, StoreError> {
    let mut data = ReportData {
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
            Ok(TicketReport {
                id: r.get(0)?,
                name: r.get(1)?,
                codes: r.get::<_, i64>(2)? as u64,
                claimed: r.get::<_, i64>(3)? as u64,
                first_ms: r.get(4)?,
                last_ms: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut per_10ms = conn
        .prepare("SELECT claimed_at_ms / 10 AS s, COUNT(*) FROM claims WHERE activity_id = ?1 GROUP BY s ORDER BY s")?;
    data.claims_per_10ms = per_10ms
        .query_map([activity_id], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
        .collect::<Result<_, _>>()?;
    // The resolution fits the rush window's rows, which the report charts:
    // one refused request weeks early read the whole sale per minute.
    let window = data
        .activity
        .as_ref()
        .map_or(i64::MIN..i64::MAX, |a| crate::stats::rush_window(a.1));
    let span: Option<i64> = conn.query_row(
        "SELECT MAX(at_ms) - MIN(at_ms) FROM stats_outcome_ticks WHERE activity_id = ?1 AND at_ms >= ?2 AND at_ms < ?3",
        rusqlite::params![activity_id, window.start, window.end],
        |r| r.get(0),
    )?;
    let step = crate::stats::outcome_resolution_ms(span.unwrap_or(0));
    let mut outcomes = conn.prepare(
        "SELECT at_ms / ?2 * ?2 AS step, outcome, SUM(count) FROM stats_outcome_ticks
         WHERE activity_id = ?1 GROUP BY step, outcome ORDER BY step, outcome",
    )?;
    data.outcomes = outcomes
        .query_map(rusqlite::params![activity_id, step], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
        })?
        .collect::<Result<_, _>>()?;
    let mut latency = conn
        .prepare("SELECT bound_ms, count FROM stats_latency WHERE activity_id = ?1 ORDER BY bound_ms < 0, bound_ms")?;
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
    data.unranked_ip_requests = conn.query_row(
        "SELECT COALESCE(SUM(requests), 0) FROM stats_sources WHERE activity_id = ?1 AND kind = 'other'",
        [activity_id],
        |r| r.get::<_, i64>(0),
    )? as u64;
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
    (data.users, data.most_per_user) = conn.query_row(
        "SELECT COUNT(*), COALESCE(MAX(n), 0) FROM \
         (SELECT COUNT(*) AS n FROM claims WHERE activity_id = ?1 GROUP BY user_id)",
        [activity_id],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store an earlier version wrote, with outcomes per minute: the
    /// migration moves them into the per-tick table once, adding to a tick
    /// already there, and the report reads them from there.
    #[test]
    fn per_minute_outcomes_are_moved_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ticketd.db");
        {
            let conn = super::super::open_db(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE stats_outcomes (activity_id TEXT NOT NULL, minute INTEGER NOT NULL,
                     outcome TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (activity_id, minute, outcome));
                 INSERT INTO stats_outcomes VALUES ('a', 2, 'success', 5), ('a', 2, 'sold_out', 7), ('b', 3, 'success', 1);
                 INSERT INTO stats_outcome_ticks VALUES ('a', 120000, 'success', 1), ('a', 120100, 'success', 2);",
            )
            .unwrap();
        }
        let mut conn = super::super::open_db(&path).unwrap();
        super::super::migrate_outcomes(&mut conn).unwrap();
        assert_eq!(
            report_data(&conn, "a", 10).unwrap().outcomes,
            vec![
                (120_000, "sold_out".to_owned(), 7),
                (120_000, "success".to_owned(), 6),
                (120_100, "success".to_owned(), 2),
            ]
        );
        assert_eq!(
            report_data(&conn, "b", 10).unwrap().outcomes,
            vec![(180_000, "success".to_owned(), 1)]
        );
        drop(conn);
        // Migrating again changes nothing.
        let mut conn = super::super::open_db(&path).unwrap();
        super::super::migrate_outcomes(&mut conn).unwrap();
        let total: i64 = conn
            .query_row("SELECT SUM(count) FROM stats_outcome_ticks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(total, 1 + 2 + 5 + 7 + 1);
    }
}
