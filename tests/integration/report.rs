//! The organiser's view of a rush: the rejections export and the HTML report
//! agree with the claims the API handed out.

use std::collections::BTreeSet;

use crate::{
    common::{base_config, open_activity, parse_csv, report_cell as cell, TestApp},
    rush::rush,
};

/// The `<svg>` element titled `title`.
fn chart<'a>(html: &'a str, title: &str) -> &'a str {
    let at = html
        .find(&format!("<title>{title}</title>"))
        .unwrap_or_else(|| panic!("no chart {title}"));
    let start = html[..at].rfind("<svg").unwrap();
    let end = at + html[at..].find("</svg>").unwrap();
    &html[start..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_and_the_rejections_export_match_the_rush() {
    let config = base_config().replace("[server]", "[server]\nnode_id = \"node-a\"")
        + &open_activity("rep", 50, 1)
        + &open_activity("quiet", 5, 1);
    let mut app = TestApp::start(&config);
    let tokens = app.users("p", 80).await;
    let solo = app.users("solo", 1).await.remove(0);
    // One claim alone, then the rush from the next outcome tick on, so the
    // successes span at least two ticks (and, by the guard, one minute:
    // outcomes stored per minute would draw one success point).
    let tick = ticketd::stats::OUTCOME_TICK_MS;
    while ticketd::clock::now_ms() % 60_000 > 50_000 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(app.claim(&solo, "rep").await.status, 200);
    let answered_in = ticketd::clock::now_ms() / tick;
    while ticketd::clock::now_ms() / tick == answered_in {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let (acked, outcomes) = rush(&app, "rep", &tokens, 2, 40).await;
    let successes: usize = acked.iter().map(Vec::len).sum();
    assert_eq!(successes, 49);
    // The solo claim, two claims per user, and a retry for each STOCK_IN_FLIGHT.
    let requests: usize = 1 + outcomes.values().sum::<usize>();
    let retried = outcomes.get("503 STOCK_IN_FLIGHT").copied().unwrap_or(0);
    assert_eq!(requests, 1 + 160 + retried, "{outcomes:?}");
    let start_time = app.detail("rep").await["startTime"].as_str().unwrap().to_owned();
    // Stopping flushes the statistics and the claims to the store.
    assert_eq!(app.stop(), 0);

    let out = app.cli(&["export", "--activity", "rep", "--format", "csv"], None);
    let claims = parse_csv(&out.stdout);
    assert_eq!(claims.len(), 50);
    let ms = |t: &str| {
        (time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp_nanos()
            / 1_000_000) as i64
    };
    let at: Vec<i64> = claims.iter().map(|c| ms(&c["claimed_at"])).collect();
    let origin = at.iter().copied().min().unwrap() / 10 * 10;
    let step = ticketd::export::report::claims_chart_step_ms(at.iter().max().unwrap() / 10 * 10 - origin);
    let steps: BTreeSet<i64> = at.iter().map(|t| (t / 10 * 10 - origin) / step).collect();
    assert!(ms(&start_time) <= origin);
    assert!(
        claims.iter().all(|c| c["node"] == "node-a"),
        "every claim names its node"
    );

    // The same claims as Parquet, read back with the parquet crate.
    let out = app.cli(
        &[
            "export",
            "--activity",
            "rep",
            "--format",
            "parquet",
            "--out",
            "claims.parquet",
        ],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = std::fs::File::open(app.dir.path().join("claims.parquet")).unwrap();
    let reader = parquet::file::serialized_reader::SerializedFileReader::new(file).unwrap();
    let rows: Vec<parquet::record::Row> = reader.into_iter().map(Result::unwrap).collect();
    assert_eq!(rows.len(), claims.len());
    for (row, csv) in rows.iter().zip(&claims) {
        use parquet::record::RowAccessor;
        assert_eq!(row.get_long(0).unwrap().to_string(), csv["claim_id"]);
        assert_eq!(row.get_string(3).unwrap(), &csv["code"]);
        assert_eq!(row.get_string(5).unwrap(), &csv["username"]);
        assert_eq!(row.get_long(4).unwrap().to_string(), csv["user_id"]);
        assert_eq!(row.get_string(7).unwrap(), "node-a");
        let at = row.get_timestamp_millis(8).unwrap();
        assert_eq!(ticketd::clock::rfc3339_ms(at), csv["claimed_at"]);
    }

    let out = app.cli(&["export", "--activity", "rep", "--what", "rejections"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rejections = parse_csv(&out.stdout);
    let rejected: u64 = rejections.iter().map(|r| r["count"].parse::<u64>().unwrap()).sum();
    assert_eq!(rejected as usize, requests - 50, "{rejections:?}");
    let reasons: BTreeSet<&str> = rejections.iter().map(|r| r["reason"].as_str()).collect();
    assert!(
        reasons.is_subset(&BTreeSet::from(["sold_out", "limit_reached", "stock_in_flight"])),
        "{reasons:?}"
    );

    let html = app.report_html("rep");
    for fetch in ["http://", "https://", "<script", "<link", "src=", "@import"] {
        assert!(!html.contains(fetch), "the report must need no network ({fetch})");
    }
    assert_eq!(cell(&html, "codes"), "50");
    assert_eq!(cell(&html, "claimed"), "50");
    assert_eq!(cell(&html, "remaining"), "0");
    assert_eq!(cell(&html, "users"), "50");
    assert_eq!(cell(&html, "requests"), requests.to_string());
    assert!(
        cell(&html, "sold-out").contains("after the start"),
        "{}",
        cell(&html, "sold-out")
    );
    // One point per step that had claims (the step fits the rush), a zero
    // at each edge of a gap, and the sell-out marker.
    let per_second = chart(&html, &format!("Claims per second, in {} steps", step_label(step)));
    assert_eq!(per_second.matches("class=\"pt\"").count(), points_for(&steps));
    assert_eq!(per_second.matches("class=\"marker\"").count(), 1);
    assert_eq!(
        chart(&html, "Time to sell out per ticket type")
            .matches("class=\"bar\"")
            .count(),
        1
    );
    // Outcomes too are drawn in steps that fit the rush (it lasted well
    // under the 20 s that 100 ms steps span), one line per outcome, and the
    // successes, which spanned two ticks, in two steps at least.
    let outcome_chart = chart(&html, "Claim outcomes per second, in 100 ms steps");
    let points_of = |outcome: &str| {
        // Each series is its polyline, its points, then its legend.
        let series = outcome_chart
            .split("<polyline")
            .find(|s| s.contains(&format!(">{outcome}</text>")))
            .unwrap_or_else(|| panic!("no {outcome} line: {outcome_chart}"));
        series.matches("class=\"pt\"").count()
    };
    assert!(points_of("success") >= 2, "{outcome_chart}");
    assert!(points_of("sold_out") >= 1, "{outcome_chart}");
    let nodes = chart(&html, "Share of the stock per node");
    assert_eq!(nodes.matches("class=\"bar\"").count(), 1);
    assert!(nodes.contains("node-a: 50"), "{nodes}");
    let latency_bars = chart(&html, "Claim latency (server side)")
        .matches("class=\"bar\"")
        .count();
    assert!(latency_bars >= 1);
    assert!(
        html.contains(&format!("<td>127.0.0.1</td><td>{requests}</td>")),
        "the address ranking counts every request"
    );

    // An activity nobody claimed still renders.
    let quiet = app.report_html("quiet");
    assert_eq!(cell(&quiet, "claimed"), "0");
    assert_eq!(cell(&quiet, "sold-out"), "not sold out");
    assert!(chart(&quiet, "Claims per second, in 10 ms steps").contains("no data"));
}

/// Claim requests outside the rush window (a minute before the start to
/// an hour after) are counted per minute. The report read every outcome at
/// the resolution the whole span allowed, so one refused request two
/// weeks early read the sale itself per minute, drawn in ten-minute steps
/// (a sell-out in seconds became one point), and drew that request's minute
/// as a rate per step. The chart now covers the window, and the rest is
/// listed beside it (from a review). The early request's row is written
/// into the store as the node writes one (`stats::counted_at`): no test
/// waits two weeks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_weeks_before_the_start_do_not_blur_the_rushs_chart() {
    let mut app = TestApp::start(&(base_config() + &open_activity("ow", 5, 1)));
    let tokens = app.users("ow", 8).await;
    let (acked, outcomes) = rush(&app, "ow", &tokens, 1, 8).await;
    assert_eq!(acked.iter().map(Vec::len).sum::<usize>(), 5);
    let requests: usize = outcomes.values().sum();
    assert_eq!(app.stop(), 0);
    let db = app.sqlite();
    let start: i64 = db
        .query_row("SELECT start_ms FROM activities WHERE id = 'ow'", [], |r| r.get(0))
        .unwrap();
    let early = start - 14 * 86_400_000;
    db.execute(
        "INSERT INTO stats_outcome_ticks (activity_id, at_ms, outcome, count) VALUES ('ow', ?1, 'not_started', 7)",
        [ticketd::stats::counted_at(start, early)],
    )
    .unwrap();
    drop(db);
    let html = app.report_html("ow");
    let outcomes = chart(&html, "Claim outcomes per second, in 100 ms steps");
    assert!(!outcomes.contains(">not_started</text>"), "{outcomes}");
    assert!(outcomes.contains(">success</text>"), "{outcomes}");
    assert!(
        html.contains("7 claim requests came outside the chart's window") && html.contains("not_started 7"),
        "{html}"
    );
    assert_eq!(cell(&html, "requests"), (requests + 7).to_string());
}

/// A node keeps its first 100,000 addresses of an activity apart and
/// counts the requests of any address after them together: an attacker
/// who spent the cap before the sale (an IPv6 client has addresses to
/// spare) kept the scalper's new address out of "Who sent the most
/// claims", and the report did not say the ranking was incomplete. It now
/// says how many requests it could not rank. The node's row of them is
/// written into the store as the node writes it: no test sends from
/// 100,000 addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_says_how_many_requests_came_from_addresses_past_the_cap() {
    let mut app = TestApp::start(&(base_config() + &open_activity("uc", 3, 1)));
    let token = app.register("uc-fan").await;
    assert_eq!(app.claim(&token, "uc").await.status, 200);
    assert_eq!(app.stop(), 0);
    let html = app.report_html("uc");
    assert!(!html.contains("id=\"unranked-ips\""), "nothing was past the cap");
    let db = app.sqlite();
    db.execute(
        "INSERT INTO stats_sources (activity_id, kind, source, requests) VALUES ('uc', 'other', '', 4321)",
        [],
    )
    .unwrap();
    drop(db);
    let html = app.report_html("uc");
    assert!(
        html.contains(
            "<p class=\"muted\" id=\"unranked-ips\">4321 claim requests were counted without their address or account"
        ),
        "{html}"
    );
}

/// The points a chart draws for `steps` (those with data): one each, and a
/// zero at each edge of a gap between them.
fn points_for(steps: &BTreeSet<i64>) -> usize {
    let gaps: usize = steps
        .iter()
        .zip(steps.iter().skip(1))
        .map(|(a, b)| (b - a - 1).clamp(0, 2) as usize)
        .sum();
    steps.len() + gaps
}

/// The `cx` of each point of `svg`, in order.
fn xs(svg: &str) -> Vec<f64> {
    svg.split("class=\"pt\" cx=\"")
        .skip(1)
        .map(|p| p.split('"').next().unwrap().parse().unwrap())
        .collect()
}

/// A rush long after the start, with a stall in it, is drawn as it went
/// (an exports walkthrough): in steps that fit the rush from its first
/// claim (measured from the start, claims an hour and a half after it were
/// one dot in 30 s steps); with the stall at zero (points only where there
/// were claims joined across it, which read as steady claiming); and
/// across the whole width (a span under a second was widened to one, under
/// labels naming the data's ends, and a quarter-second sell-out was drawn
/// in a quarter of the chart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_rush_with_a_stall_is_drawn_as_it_went() {
    let mut app = TestApp::start(&(base_config() + &crate::common::activity("late", 5, 1, "-90m", "+1h")));
    let tokens = app.users("late", 3).await;
    for (i, token) in tokens.iter().enumerate() {
        if i == 2 {
            // The stall: 400 ms without a claim.
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        }
        assert_eq!(app.claim(token, "late").await.status, 200);
    }
    assert_eq!(app.stop(), 0);
    let out = app.cli(&["export", "--activity", "late", "--format", "jsonl"], None);
    let at: BTreeSet<i64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["claimed_at_ms"]
                .as_i64()
                .unwrap()
                / 10
        })
        .collect();
    assert_eq!(out.stdout.iter().filter(|&&b| b == b'\n').count(), 3);
    let html = app.report_html("late");
    let per_second = chart(&html, "Claims per second, in 10 ms steps");
    let first = at.first().unwrap();
    let steps: BTreeSet<i64> = at.iter().map(|t| t - first).collect();
    assert!(steps.last().unwrap() >= &40, "the stall: {steps:?}");
    assert_eq!(
        per_second.matches("class=\"pt\"").count(),
        points_for(&steps),
        "{per_second}"
    );
    assert!(
        per_second.contains(&format!("cy=\"{:.1}\"", 260.0 - 40.0)),
        "no point at zero: {per_second}"
    );
    let xs = xs(per_second);
    assert_eq!((xs[0], *xs.last().unwrap()), (60.0, 740.0), "{per_second}");
}

fn step_label(ms: i64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// "Who sent the most claims" counted each IPv6 address apart, so a client
/// rotating through its /64 (2^64 addresses) never stood out there, though
/// the rate limits already counted it as one. The report now counts
/// sources as the limits do: an IPv6 /64 is one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_of_addresses_is_one_source_in_the_report() {
    let config = crate::common::behind_proxy(base_config() + &open_activity("six", 10, 1), "");
    let mut app = TestApp::start(&config);
    let tokens = app.users("six", 4).await;
    let from = [
        "2001:db8:5:6::1",
        "2001:db8:5:6:a::2",
        "2001:db8:5:6:ffff::3",
        "198.51.100.9",
    ];
    for (token, ip) in tokens.iter().zip(from) {
        let body = crate::common::claim_body(&app.client, token, "six").await;
        let res = crate::common::post_from_as(&app.client, ip, "/ticket/get", Some(token), &body).await;
        assert_eq!(res.status, 200, "{}", res.body);
    }
    // Stopping flushes the statistics to the store.
    assert_eq!(app.stop(), 0);
    let html = app.report_html("six");
    let table = &html[html.find("<table id=\"top-ips\">").unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    assert!(
        table.contains("<tr><td>2001:db8:5:6::/64</td><td>3</td></tr>"),
        "{table}"
    );
    assert!(table.contains("<tr><td>198.51.100.9</td><td>1</td></tr>"), "{table}");
    assert_eq!(table.matches("<tr><td>").count(), 2, "{table}");
}

/// Sends `POST path` to the admin listener at `addr`.
async fn admin_post(addr: &str, token: &str, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Reads an answer to its end: (head, body).
async fn answer(mut stream: tokio::net::TcpStream) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.unwrap();
    let text = String::from_utf8(bytes).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_ascii_lowercase(), crate::common::unchunked(head, body))
}

/// `/admin/export` built the whole export in memory before its first byte
/// went out: a million claims are about 100 MB of CSV, taken from a node
/// in the middle of a sale. It now streams the export as it reads it
/// (chunked, 64 KiB at a time), and the export is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_export_is_streamed_and_whole() {
    let token = crate::common::ADMIN_TOKEN;
    let config = crate::common::with_admin(base_config()) + &open_activity("st", 1500, 1);
    let app = TestApp::start(&config);
    let tokens = app.users("st", 1500).await;
    for chunk in tokens.chunks(100) {
        let claims = chunk.iter().map(|t| app.claim(t, "st"));
        for res in futures::future::join_all(claims).await {
            assert_eq!(res.status, 200, "{}", res.body);
        }
    }
    let (head, body) = answer(admin_post(&app.admin_addr(), token, "/admin/export?actId=st&format=jsonl").await).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert!(head.contains("x-claims-in-transit: 0"), "{head}");
    let codes = crate::common::jsonl_codes(&body);
    assert_eq!(codes.len(), 1500, "one line per claim, each its own code");
    assert!(body.len() > 2 * 64 * 1024, "{} bytes: more than one chunk", body.len());
}

/// A streamed export answers once its first chunk is read (or the whole
/// export, when smaller): a store that cannot be read is a JSON error, as
/// before streaming, not a 200 whose body is cut short at once. Here the
/// export's own read-only connection cannot open the database, moved away
/// under the node (whose open connection goes on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_export_that_cannot_read_is_a_json_error() {
    let token = crate::common::ADMIN_TOKEN;
    let config = crate::common::with_admin(base_config()) + &open_activity("ue", 2, 1);
    let app = TestApp::start(&config);
    let fan = app.register("ue-fan").await;
    assert_eq!(app.claim(&fan, "ue").await.status, 200);
    let data = app.dir.path().join("data");
    std::fs::rename(data.join("ticketd.db"), data.join("moved.db")).unwrap();
    let (head, body) = answer(admin_post(&app.admin_addr(), token, "/admin/export?actId=ue&format=csv").await).await;
    assert!(head.starts_with("http/1.1 503"), "{head}\n{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], "STORE_UNAVAILABLE", "{json}");
}

/// An export answers for every claim answered before it. A serving node
/// copies claims from its journal into SQLite, which exports read, a batch
/// at a time; `/admin/export` read SQLite as it was, so an export taken
/// while the copy was held up (here by SQLite's write lock, which the test
/// holds) left the claim out without a word. Now it waits for the copy
/// (up to 5 s), and says how many claims it could not wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_export_waits_for_the_claims_on_their_way_to_sqlite() {
    let token = crate::common::ADMIN_TOKEN;
    let config = crate::common::with_admin(base_config()) + &open_activity("ex", 5, 1);
    let app = TestApp::start(&config);
    let admin = app.admin_addr();
    let export = "/admin/export?actId=ex&format=jsonl";
    let first = app.register("exa").await;

    let db = app.sqlite();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    assert_eq!(app.claim(&first, "ex").await.status, 200);
    let mut waiting = tokio::spawn(answer(admin_post(&admin, token, export).await));
    // The export waits (up to 5 s) while its claim cannot reach SQLite;
    // before, it answered at once, without the claim.
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(500), &mut waiting)
            .await
            .is_err(),
        "the export answered while its claim was on its way to SQLite"
    );
    db.execute_batch("ROLLBACK").unwrap();
    let (head, body) = waiting.await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body.lines().count(), 1, "{body}");
    assert!(head.contains("x-claims-in-transit: 0"), "{head}");
}

/// An export that fails halfway (here the disk fills up) used to leave a
/// part of itself in place of the previous export, which it had already
/// truncated: a CSV of whole rows, cut at a page, that reads like a smaller
/// export. Now it leaves the previous file as it was, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_that_fails_halfway_leaves_the_previous_file_whole() {
    let mut app = TestApp::start(&(base_config() + &open_activity("half", 200, 200)));
    let token = app.users("half", 1).await.remove(0);
    let body = app.claim_body(&token, "half").await;
    for _ in 0..5 {
        let res = app.client.post("/ticket/get", Some(&token), &body).await.unwrap();
        assert_eq!(res.status, 200, "{}", res.body);
    }
    // Stopped, every claim is in SQLite, where the export reads.
    assert_eq!(app.stop(), 0);
    let disk = app.dir.path().join("exports");
    let _disk = crate::common::Tmpfs::mount(&disk, "1m");
    let file = disk.join("half.csv");
    let export = |app: &TestApp| app.cli(&["export", "--activity", "half", "--out", file.to_str().unwrap()], None);
    let out = export(&app);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first = std::fs::read_to_string(&file).unwrap();
    assert_eq!(parse_csv(first.as_bytes()).len(), 5);

    // Written again through a symbolic link to it, made private: the file
    // is replaced, the link stays a link, and the file stays private.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = disk.join("latest.csv");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let out = app.cli(&["export", "--activity", "half", "--out", link.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), first);
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    std::fs::remove_file(&link).unwrap();

    // Many more claims than the disk has room for once it is nearly full.
    app.boot();
    // A relative start moves with the restart, and the claim token with it.
    let body = app.claim_body(&token, "half").await;
    for _ in 0..195 {
        let res = app.client.post("/ticket/get", Some(&token), &body).await.unwrap();
        assert_eq!(res.status, 200, "{}", res.body);
    }
    assert_eq!(app.stop(), 0);
    drop(crate::common::fill_disk(&disk.join("filler"), 4096));
    let out = export(&app);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the full disk took 200 rows: {stderr}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        first,
        "the previous export, whole"
    );
    assert!(stderr.contains("left as it was"), "{stderr}");
    // The disk's error once (the wrapped CSV error said it twice).
    assert_eq!(stderr.matches("No space left on device").count(), 1, "{stderr}");
    let names: Vec<_> = std::fs::read_dir(&disk)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "nothing left behind: {names:?}");
}

/// Claims made long before an activity's start (each refused
/// `NOT_STARTED`) are counted per minute, not per tenth of a second: a few
/// accounts at it for weeks added a row to the store every tick. Ten
/// requests a tick apart are now one row (two if a minute turns between).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_long_before_the_start_are_counted_per_minute_not_per_tick() {
    let app = TestApp::start(&(base_config() + &crate::common::activity("later", 5, 1, "+30d", "+31d")));
    let token = app.register("early-bird").await;
    for _ in 0..10 {
        let res = app
            .client
            .post("/ticket/get", Some(&token), &serde_json::json!({ "actId": "later" }))
            .await
            .unwrap();
        assert_eq!(res.error_code(), Some("NOT_STARTED"), "{}", res.body);
        // The next request in another tick.
        tokio::time::sleep(std::time::Duration::from_millis(110)).await;
    }
    let db = app.sqlite();
    let counted = || -> (i64, i64) {
        db.query_row(
            "SELECT COUNT(*), COALESCE(SUM(count), 0) FROM stats_outcome_ticks WHERE activity_id = 'later'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    // The statistics reach the store once a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while counted().1 < 10 {
        assert!(std::time::Instant::now() < deadline, "counted: {:?}", counted());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (rows, requests) = counted();
    assert_eq!(requests, 10);
    assert!(rows <= 2, "{rows} rows for 10 requests a tick apart");
}

/// The report counts from the start the sale opened at. The store took
/// every start a node was given, so a start moved after the sale (or a
/// relative one resolved again at a restart) made the report say "sold out
/// -1355220 ms after the start", with empty charts. The stored start now
/// stays once the activity has claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_moved_after_the_sale_leaves_the_report_counting_from_the_real_one() {
    let config = base_config() + &open_activity("ms", 1, 1);
    let mut app = TestApp::start(&config);
    let token = app.register("ms-fan").await;
    assert_eq!(app.claim(&token, "ms").await.status, 200);
    let start_of = |app: &TestApp| -> i64 {
        app.sqlite()
            .query_row("SELECT start_ms FROM activities WHERE id = 'ms'", [], |r| r.get(0))
            .unwrap()
    };
    let opened = start_of(&app);
    // The claim in SQLite (the applier's lag): what the import looks at.
    crate::common::until("the claim to reach SQLite", || async {
        let n: i64 = app
            .sqlite()
            .query_row("SELECT COUNT(*) FROM claims", [], |r| r.get(0))
            .unwrap();
        n == 1
    })
    .await;
    let moved = config.replace("start_time = \"-1m\"", "start_time = \"+30m\"");
    assert_ne!(moved, config);
    assert_eq!(app.reload(&moved)["message"], "Config reloaded.");
    assert_eq!(app.stop(), 0);
    assert_eq!(start_of(&app), opened, "the stored start moved after the sale");
    let html = app.report_html("ms");
    assert!(html.contains(&ticketd::clock::rfc3339_ms(opened)), "{html}");
    let sold_out = html
        .split("<td id=\"sold-out\">")
        .nth(1)
        .and_then(|t| t.split("</td>").next())
        .unwrap();
    assert!(
        sold_out.ends_with(" s after the start)") && !sold_out.contains("(-"),
        "{sold_out}"
    );
    assert!(!html.contains("outside the chart's window"), "{html}");
}

/// The report printed the stored limit alone. Lowered after claims (or, in
/// a cluster, below what the nodes' own configs served), an account then
/// held more than "limit 1 per user" with no word of why (cluster
/// walkthrough). The report now says the most one account holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_lowered_after_claims_is_explained_in_the_report() {
    let config = base_config() + &open_activity("lw", 10, 3);
    let app = TestApp::start(&config);
    let token = app.register("early").await;
    for _ in 0..3 {
        assert_eq!(app.claim(&token, "lw").await.status, 200);
    }
    let html = app.report_html("lw");
    assert!(html.contains("limit 3 per user. Generated"), "{html}");
    let lowered = config.replace("per_user_limit = 3", "per_user_limit = 1");
    assert_ne!(lowered, config);
    assert_eq!(app.reload(&lowered)["message"], "Config reloaded.");
    let html = app.report_html("lw");
    assert!(
        html.contains("limit 1 per user (as stored now; an account holds 3: a higher limit was served"),
        "{html}"
    );
}
