//! `ticketd report`: one self-contained HTML file about a rush.
//!
//! No scripts, fonts or images from the network: charts are inline SVG
//! ([`super::svg`]). It shows claims per second with the sell-out moment
//! marked, time to sell out per ticket type, the share of the stock each node
//! handed out, the claim latency distribution, outcomes over time (in steps
//! that fit the rush, as the claims), the addresses and accounts that sent
//! the most claims (the scalper signal) and a summary table. An activity
//! with no claims renders with "no data" panels; a chart has about 100-200
//! points however many claims there were.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use super::svg::{bar_chart, esc, fmt_num, line_chart, Series};
use crate::{
    admission::report::{percentile, QueueReport},
    clock::rfc3339_ms,
    store::{InTransit, ReportData},
    vocab::ClaimOutcome,
};

/// The summary numbers, also used by tests against the export.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    /// Codes in the activity.
    pub codes: u64,
    /// Codes claimed.
    pub claimed: u64,
    /// Distinct users holding a claim.
    pub users: u64,
    /// Claim requests recorded (all outcomes).
    pub requests: u64,
    /// When the last code went, if every ticket type sold out (Unix ms).
    pub sold_out_ms: Option<i64>,
}

/// Computes the summary of `data`.
pub fn summary(data: &ReportData) -> Summary {
    let codes = data.tickets.iter().map(|t| t.codes).sum();
    let claimed = data.tickets.iter().map(|t| t.claimed).sum();
    let all_sold = !data.tickets.is_empty() && data.tickets.iter().all(|t| t.codes > 0 && t.claimed >= t.codes);
    Summary {
        codes,
        claimed,
        users: data.users,
        requests: data.outcomes.iter().map(|o| o.2).sum(),
        sold_out_ms: if all_sold {
            data.tickets.iter().filter_map(|t| t.last_ms).max()
        } else {
            None
        },
    }
}

/// A warning when claims were committed but are not yet in the store the
/// report reads: they are missing from every figure. Or when that could
/// not be counted (Redis, which holds a cluster's backlogs, did not answer).
fn in_transit_note(data: &ReportData) -> String {
    let claims = match &data.in_transit {
        InTransit::Counted(0) => return String::new(),
        InTransit::Counted(1) => "1 claim was".to_owned(),
        InTransit::Counted(n) => format!("{n} claims were"),
        InTransit::Unknown(why) => {
            return format!(
                "<p id=\"in-transit\" class=\"warn\"><strong>Perhaps incomplete:</strong> Redis could not be \
                 asked how many claims are still in a node's backlog for MongoDB ({}). The figures below hold \
                 every claim MongoDB has; claims made while MongoDB was out of reach (or by a node that died \
                 since) may be missing. Generate the report again once Redis is back.</p>\n",
                esc(why)
            )
        }
    };
    format!(
        "<p id=\"in-transit\" class=\"warn\"><strong>Incomplete:</strong> {claims} committed but not yet \
         in the store this report reads (a cluster node's backlog for MongoDB, or a serving node's \
         journal not yet applied to SQLite) and missing from every figure below. Generate the \
         report again in a moment (in a cluster, once <code>ticketd_mongo_backlog</code> is 0 on \
         every node).</p>\n"
    )
}

/// A warning when fewer successful claim requests were recorded than the
/// store holds claims: a node keeps its last second of statistics in
/// memory, and one killed (`kill -9`, a crash, a power cut) loses them. The
/// report showed 221 successes beside 235 claims without a word (cluster
/// walkthrough). The figures drawn from the claims themselves (codes,
/// users, the claims chart) are whole; the request counts are not.
fn unrecorded_note(data: &ReportData, claimed: u64) -> String {
    let recorded: u64 = data
        .outcomes
        .iter()
        .filter(|o| o.1 == ClaimOutcome::Success.label())
        .map(|o| o.2)
        .sum();
    if recorded >= claimed {
        return String::new();
    }
    let missing = claimed - recorded;
    format!(
        "<p id=\"unrecorded\" class=\"warn\"><strong>Requests not all recorded:</strong> {missing} of the \
         {claimed} claims have no recorded request. A node keeps up to a second of its request statistics in memory \
         before it writes them: one still serving has not written them yet, one that was killed or crashed \
         lost them (as did statistics its store refused during an outage). \
         The codes, users and claims over time count the claims themselves and are whole; the request counts, \
         outcomes, latency and top senders below miss those requests.</p>\n"
    )
}

fn duration(ms: i64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 120_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{:.1} min", ms as f64 / 60_000.0)
    }
}

/// The waiting room's part of a report.
pub enum RoomRecord {
    /// The activity had no waiting room (a race), or it has not opened.
    None,
    /// Its record, read.
    Read(QueueReport),
    /// Its record is in Redis, which did not answer (why).
    Unread(String),
}

/// The waiting room: entrants, admissions, abandonment, the waits.
fn queue_section(html: &mut String, q: &QueueReport) {
    let pct = |v: &[i64], p: f64| percentile(v, p).map_or("—".to_owned(), duration);
    let _ = write!(
        html,
        "\n<h2>Waiting room</h2>\n<p class=\"muted\">Commitment <code>{}</code>; seed {}.</p>\n\
         <table id=\"queue\">\n\
         <tr><th>entered before the draw</th><td id=\"q-drawn\">{}</td></tr>\n\
         <tr><th>joined after it</th><td id=\"q-late\">{}</td></tr>\n\
         <tr><th>admitted with a pass</th><td id=\"q-admitted\">{}</td></tr>\n\
         <tr><th>skipped (gone when their turn came)</th><td id=\"q-abandoned\">{}</td></tr>\n\
         <tr><th>admitted, never claimed</th><td id=\"q-lapsed\">{}</td></tr>\n\
         </table>\n\
         <table id=\"queue-times\"><tr><th></th><th>median</th><th>p90</th><th>p99</th><th>max</th></tr>\n",
        esc(&q.commitment),
        q.seed
            .as_deref()
            .map_or("not revealed yet".to_owned(), |s| format!("<code>{}</code>", esc(s))),
        q.drawn,
        q.late,
        q.admitted,
        q.abandoned,
        q.lapsed,
    );
    for (name, values) in [
        ("wait for admission", &q.waits_ms),
        ("admission to claim", &q.to_claim_ms),
    ] {
        let _ = writeln!(
            html,
            "<tr><th>{name}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            pct(values, 50.0),
            pct(values, 90.0),
            pct(values, 99.0),
            pct(values, 100.0)
        );
    }
    html.push_str("</table>\n");
    let max = q.waits_ms.last().copied().unwrap_or(0);
    // About twenty bars, whatever the longest wait.
    let width = claims_chart_step_ms(max.saturating_mul(10));
    let mut buckets: BTreeMap<i64, u64> = BTreeMap::new();
    for w in &q.waits_ms {
        *buckets.entry(w / width).or_default() += 1;
    }
    let bars: Vec<(String, f64)> = buckets
        .into_iter()
        .map(|(b, n)| (format!("<{}", duration((b + 1) * width)), n as f64))
        .collect();
    html.push_str(&bar_chart("Wait for admission", "fans", &bars));
}

/// The step of the claims chart for a rush lasting `span_ms`: the
/// smallest of 10 ms ... 10 min giving at most 200 points.
pub fn claims_chart_step_ms(span_ms: i64) -> i64 {
    const STEPS: [i64; 13] = [
        10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 600_000,
    ];
    STEPS.into_iter().find(|step| span_ms / step <= 200).unwrap_or(600_000)
}

/// Counts stamped in milliseconds, as a rate per second in steps of
/// `step_ms` from `origin_ms`: a point (seconds since `zero_ms`, rate) per
/// step that had any, and a zero at each edge of a run of steps that had
/// none. Without the zeros a stall mid-rush was a line drawn straight
/// across it, which read as steady claiming (an exports walkthrough); two
/// at most per gap keep the points as few as the steps with data.
fn rate_points(
    counts: impl Iterator<Item = (i64, u64)>,
    origin_ms: i64,
    step_ms: i64,
    zero_ms: i64,
) -> Vec<(f64, f64)> {
    let mut steps: BTreeMap<i64, u64> = BTreeMap::new();
    for (at_ms, n) in counts {
        *steps.entry((at_ms - origin_ms).div_euclid(step_ms)).or_default() += n;
    }
    let point = |b: i64, n: u64| {
        (
            (origin_ms + b * step_ms - zero_ms) as f64 / 1000.0,
            n as f64 * 1000.0 / step_ms as f64,
        )
    };
    let mut points = Vec::with_capacity(steps.len());
    let mut last: Option<i64> = None;
    for (b, n) in steps {
        if let Some(prev) = last.filter(|&p| b - p > 1) {
            points.push(point(prev + 1, 0));
            if b - prev > 2 {
                points.push(point(b - 1, 0));
            }
        }
        points.push(point(b, n));
        last = Some(b);
    }
    points
}

/// Renders the report of `activity_id`, generated at `now_ms`.
pub fn render(activity_id: &str, data: &ReportData, room: &RoomRecord, now_ms: i64) -> String {
    let s = summary(data);
    let (name, start_ms, end_ms, limit) = data.activity.clone().unwrap_or((activity_id.to_owned(), 0, 0, 0));
    // The resolution fits the rush, from its first claim to its last: a
    // sale gone in two seconds is drawn in 10-20 ms steps, an hour-long one
    // in minutes (about 100-200 points). Measured from the start, a rush
    // an hour and a half after it was one dot in 30 s steps.
    let first_10ms = data.claims_per_10ms.first().map_or(start_ms / 10, |f| f.0);
    let last_10ms = data.claims_per_10ms.last().map_or(first_10ms, |l| l.0);
    let step_ms = claims_chart_step_ms(((last_10ms - first_10ms) * 10).max(0));
    let per_step = Series {
        // A rate, whatever the step: "claims per 10 ms" over values per
        // second read a hundred times too high.
        name: "claims/s".to_owned(),
        points: rate_points(
            data.claims_per_10ms.iter().map(|&(t, n)| (t * 10, n)),
            first_10ms * 10,
            step_ms,
            start_ms,
        ),
    };
    let marker_text;
    let marker = match s.sold_out_ms {
        Some(ms) => {
            marker_text = format!("sold out after {}", duration(ms - start_ms));
            Some(((ms - start_ms) as f64 / 1000.0, marker_text.as_str()))
        }
        None => None,
    };
    let claims_chart = line_chart(
        &format!("Claims per second, in {} steps", duration(step_ms)),
        "seconds since the start",
        "claims/s",
        &[per_step],
        marker,
    );

    let sell_out: Vec<(String, f64)> = data
        .tickets
        .iter()
        .filter(|t| t.codes > 0 && t.claimed >= t.codes)
        .filter_map(|t| t.last_ms.map(|l| (t.id.clone(), (l - start_ms) as f64 / 1000.0)))
        .collect();
    let sell_out_chart = bar_chart("Time to sell out per ticket type", "seconds", &sell_out);

    let latency: Vec<(String, f64)> = data
        .latency
        .iter()
        .map(|&(bound, n)| {
            (
                if bound.is_finite() {
                    format!("≤{}ms", fmt_num(bound))
                } else {
                    "more".into()
                },
                n as f64,
            )
        })
        .collect();
    let latency_chart = bar_chart("Claim latency (server side)", "claims", &latency);

    // Outcomes are recorded per tenth of a second in the rush window, a
    // minute before the start to an hour after (read in coarser steps for
    // a long sale); drawn in steps that fit the span of the requests, like
    // the claims. Outside it they are counted per minute: drawn as a rate
    // per step they were spikes that never happened, so they are listed
    // beside the chart instead.
    let window = crate::stats::rush_window(start_ms);
    let (charted, outside): (Vec<_>, Vec<_>) = data.outcomes.iter().partition(|o| window.contains(&o.0));
    let first_ms = charted.first().map_or(0, |o| o.0);
    let last_ms = charted.iter().map(|o| o.0).max().unwrap_or(first_ms);
    let outcome_step_ms = claims_chart_step_ms(last_ms - first_ms).max(crate::stats::OUTCOME_TICK_MS);
    let names: BTreeSet<&str> = charted.iter().map(|o| o.1.as_str()).collect();
    let outcome_series: Vec<Series> = names
        .into_iter()
        .map(|name| Series {
            name: name.to_owned(),
            points: rate_points(
                charted.iter().filter(|o| o.1 == name).map(|o| (o.0, o.2)),
                first_ms,
                outcome_step_ms,
                first_ms,
            ),
        })
        .collect();
    let mut outside_counts: BTreeMap<&str, u64> = BTreeMap::new();
    for o in &outside {
        *outside_counts.entry(o.1.as_str()).or_default() += o.2;
    }
    let outside_note = if outside_counts.is_empty() {
        String::new()
    } else {
        let total: u64 = outside_counts.values().sum();
        let each: Vec<String> = outside_counts.iter().map(|(o, n)| format!("{} {n}", esc(o))).collect();
        format!(
            "<p class=\"muted\" id=\"outside-window\">{} claim requests came outside the chart's window (a minute before the start to an hour after), where they are counted per minute: {}.</p>\n",
            total,
            each.join(", ")
        )
    };
    let outcomes_chart = line_chart(
        &format!("Claim outcomes per second, in {} steps", duration(outcome_step_ms)),
        "seconds since the first request",
        "requests/s",
        &outcome_series,
        None,
    );

    let nodes_chart = bar_chart(
        "Share of the stock per node",
        "claims",
        &data
            .nodes
            .iter()
            .map(|(node, n)| (node.clone(), *n as f64))
            .collect::<Vec<_>>(),
    );

    let top_ip_chart = bar_chart(
        "Claims per client address (top)",
        "requests",
        &data
            .top_ips
            .iter()
            .map(|(ip, n)| (ip.clone(), *n as f64))
            .collect::<Vec<_>>(),
    );

    let mut html = String::with_capacity(64 << 10);
    let _ = write!(
        html,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Rush report: {title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 800px; color: #111; }}
h1 {{ font-size: 22px; margin-bottom: 4px; }} h2 {{ font-size: 16px; margin-top: 28px; }}
table {{ border-collapse: collapse; margin: 8px 0; }} td, th {{ border: 1px solid #ddd; padding: 4px 10px; text-align: left; }}
th {{ background: #f5f5f5; }} .muted {{ color: #666; }} .warn {{ background: #fff4e5; border: 1px solid #f0b46c; padding: 8px 12px; }} svg {{ display: block; margin: 8px 0; border: 1px solid #eee; }}
</style></head><body>
<h1>Rush report: {title}</h1>
<p class="muted">Activity <code>{id}</code>, {start} – {end}, limit {limit} per user{served}. Generated {now}.</p>
{notes}<h2>Summary</h2>
<table id="summary">
<tr><th>codes</th><td id="codes">{codes}</td></tr>
<tr><th>claimed</th><td id="claimed">{claimed}</td></tr>
<tr><th>remaining</th><td id="remaining">{remaining}</td></tr>
<tr><th>users with a code</th><td id="users">{users}</td></tr>
<tr><th>claim requests recorded</th><td id="requests">{requests}</td></tr>
<tr><th>sold out</th><td id="sold-out">{sold_out}</td></tr>
</table>
"#,
        title = esc(&name),
        id = esc(activity_id),
        notes = in_transit_note(data) + &unrecorded_note(data, s.claimed),
        start = rfc3339_ms(start_ms),
        end = rfc3339_ms(end_ms),
        limit = limit,
        // The stored limit is the last one imported or reloaded; one lowered
        // after claims, or a cluster's nodes serving their own config's,
        // left an account holding more than the limit printed, unexplained.
        served = if data.most_per_user > u64::from(limit) {
            format!(
                " (as stored now; an account holds {}: a higher limit was served, earlier or by a node's config)",
                data.most_per_user
            )
        } else {
            String::new()
        },
        now = rfc3339_ms(now_ms),
        codes = s.codes,
        claimed = s.claimed,
        remaining = s.codes.saturating_sub(s.claimed),
        users = s.users,
        requests = s.requests,
        sold_out = s.sold_out_ms.map_or("not sold out".to_owned(), |ms| format!(
            "{} ({} after the start)",
            rfc3339_ms(ms),
            duration(ms - start_ms)
        )),
    );
    html.push_str("<h2>Claims over time</h2>\n");
    html.push_str(&claims_chart);
    html.push_str("\n<h2>Ticket types</h2>\n<table id=\"tickets\"><tr><th>ticket</th><th>codes</th><th>claimed</th><th>first claim</th><th>sold out after</th></tr>\n");
    for t in &data.tickets {
        let sold = (t.codes > 0 && t.claimed >= t.codes)
            .then_some(t.last_ms)
            .flatten()
            .map_or("—".to_owned(), |l| duration(l - start_ms));
        let _ = writeln!(
            html,
            "<tr><td>{} <span class=\"muted\">{}</span></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&t.id),
            esc(&t.name),
            t.codes,
            t.claimed,
            t.first_ms.map_or("—".to_owned(), rfc3339_ms),
            sold
        );
    }
    html.push_str("</table>\n");
    html.push_str(&sell_out_chart);
    html.push_str("\n<h2>Nodes</h2>\n");
    html.push_str(&nodes_chart);
    html.push_str("\n<h2>Latency and outcomes</h2>\n");
    html.push_str(&latency_chart);
    html.push_str(&outcomes_chart);
    html.push_str(&outside_note);
    match room {
        RoomRecord::None => {}
        RoomRecord::Read(q) => queue_section(&mut html, q),
        RoomRecord::Unread(why) => {
            let _ = write!(
                html,
                "\n<h2>Waiting room</h2>\n<p id=\"queue-unread\" class=\"warn\">The waiting room's record is in \
                 Redis, which did not answer ({}): its entrants, admissions and waits are not shown. Generate \
                 the report again once Redis is back.</p>\n",
                esc(why)
            );
        }
    }
    html.push_str("\n<h2>Who sent the most claims</h2>\n<p class=\"muted\">Addresses and accounts far above the rest are the scalper signal. Counted: claims that reached this activity; those refused before it (over a rate limit, blocked, no valid session) are counted per reason in the node's metrics, not here.</p>\n");
    html.push_str(&top_ip_chart);
    if data.unranked_ip_requests > 0 {
        let _ = writeln!(
            html,
            "<p class=\"muted\" id=\"unranked-ips\">{} claim requests were counted without their address or account, past what a node ranks (the first {} addresses of this activity in a node's run, and each flush's cap): none of them is in the rankings here, so a client that first came after that does not show.</p>",
            data.unranked_ip_requests,
            crate::stats::MAX_STORED_SOURCES
        );
    }
    for (heading, id, rows) in [
        ("address", "top-ips", &data.top_ips),
        ("account", "top-users", &data.top_users),
    ] {
        let _ = writeln!(
            html,
            "<table id=\"{id}\"><tr><th>{heading}</th><th>claim requests</th></tr>"
        );
        for (who, n) in rows {
            let _ = writeln!(html, "<tr><td>{}</td><td>{n}</td></tr>", esc(who));
        }
        html.push_str("</table>\n");
    }
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::claims_chart_step_ms;

    #[test]
    fn a_short_rush_is_drawn_in_tens_of_milliseconds() {
        assert_eq!(claims_chart_step_ms(0), 10);
        assert_eq!(claims_chart_step_ms(2_000), 10, "a two-second sell-out: 200 points");
        assert_eq!(claims_chart_step_ms(3_000), 20);
        assert_eq!(claims_chart_step_ms(60_000), 500);
        assert_eq!(claims_chart_step_ms(3_600_000), 30_000);
        assert_eq!(claims_chart_step_ms(i64::MAX), 600_000);
    }
}
