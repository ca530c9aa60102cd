//! `ticketd report`: one self-contained HTML file about a rush.
//!
//! No scripts, fonts or images from the network: charts are inline SVG
//! ([`super::svg`]). It shows claims per second with the sell-out moment
//! marked, time to sell out per ticket type, the share of the stock each node
//! handed out, the claim latency distribution,
//! outcomes per minute, the addresses and accounts that sent the most claims
//! (the scalper signal) and a summary table. An activity with no claims
//! renders with "no data" panels; millions of claims cost one point per
//! second of the rush.

use std::{collections::BTreeMap, fmt::Write as _};

use super::svg::{bar_chart, esc, fmt_num, line_chart, Series};
use crate::{clock::rfc3339_ms, store::ReportData};

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

fn duration(ms: i64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 120_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{:.1} min", ms as f64 / 60_000.0)
    }
}

/// Renders the report of `activity_id`, generated at `now_ms`.
pub fn render(activity_id: &str, data: &ReportData, now_ms: i64) -> String {
    let s = summary(data);
    let (name, start_ms, end_ms, limit) = data.activity.clone().unwrap_or((activity_id.to_owned(), 0, 0, 0));
    let origin = data
        .claims_per_second
        .first()
        .map_or(start_ms / 1000, |f| f.0.min(start_ms / 1000)) as f64;

    let per_second = Series {
        name: "claims/s".into(),
        points: data
            .claims_per_second
            .iter()
            .map(|&(sec, n)| (sec as f64 - origin, n as f64))
            .collect(),
    };
    let marker_text;
    let marker = match s.sold_out_ms {
        Some(ms) => {
            marker_text = format!("sold out after {}", duration(ms - start_ms));
            Some((ms as f64 / 1000.0 - origin, marker_text.as_str()))
        }
        None => None,
    };
    let claims_chart = line_chart(
        "Claims per second",
        "seconds since the start",
        "claims",
        &[per_second],
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

    let mut by_outcome: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    let first_minute = data.outcomes.first().map_or(0, |o| o.0);
    for (minute, outcome, n) in &data.outcomes {
        by_outcome
            .entry(outcome)
            .or_default()
            .push(((minute - first_minute) as f64, *n as f64));
    }
    let outcome_series: Vec<Series> = by_outcome
        .into_iter()
        .map(|(name, points)| Series {
            name: name.to_owned(),
            points,
        })
        .collect();
    let outcomes_chart = line_chart(
        "Claim outcomes per minute",
        "minutes since the first request",
        "requests",
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
th {{ background: #f5f5f5; }} .muted {{ color: #666; }} svg {{ display: block; margin: 8px 0; border: 1px solid #eee; }}
</style></head><body>
<h1>Rush report: {title}</h1>
<p class="muted">Activity <code>{id}</code>, {start} – {end}, limit {limit} per user. Generated {now}.</p>
<h2>Summary</h2>
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
        start = rfc3339_ms(start_ms),
        end = rfc3339_ms(end_ms),
        limit = limit,
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
    html.push_str("\n<h2>Who sent the most claims</h2>\n<p class=\"muted\">Addresses and accounts far above the rest are the scalper signal.</p>\n");
    html.push_str(&top_ip_chart);
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
