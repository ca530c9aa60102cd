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
    let mut outcomes = conn.prepare(
        "SELECT minute * 60000, outcome, count FROM stats_outcomes WHERE activity_id = ?1
             UNION ALL SELECT at_ms, outcome, count FROM stats_outcome_ticks WHERE activity_id = ?1
             ORDER BY 1, 2",
    )?;
    data.outcomes = outcomes
        .query_map([activity_id], |r| {
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
