//! Fair admission: the waiting room and the lottery, through the real
//! binary — the draw's fairness and verifiability, admission bounded by the
//! stock, abandonment, lapsed passes, the lottery's waiting list, a kill -9
//! mid-queue, and the honesty of the wait estimate.

use std::{sync::Arc, time::Duration};

use serde_json::{json, Value};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use crate::common::*;

/// RFC 3339 for `secs` from now (absolute: a restart must not move it).
fn in_secs(secs: i64) -> String {
    (OffsetDateTime::now_utc() + time::Duration::seconds(secs))
        .format(&Rfc3339)
        .unwrap()
}

/// Polls until `token`'s state is `want` (10 s at most).
async fn eventually(client: &ApiClient, token: &str, act: &str, want: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(client, token, act).await;
        if s["state"] == want || tokio::time::Instant::now() >= deadline {
            assert_eq!(s["state"], want, "{s}");
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ms(rfc3339: &str) -> i64 {
    (OffsetDateTime::parse(rfc3339, &Rfc3339).unwrap().unix_timestamp_nanos() / 1_000_000) as i64
}

/// A waiting room with absolute times, as every node of a cluster must
/// read them: `admission` (`queue` or `lottery`), joins open since a minute
/// ago, the start `start_in_ms` from now, `codes` codes of ticket `{id}-t`.
fn absolute_room(id: &str, admission: &str, codes: u32, start_in_ms: i64, extra: &[&str]) -> String {
    room_from(ticketd::clock::now_ms(), id, admission, codes, start_in_ms, extra)
}

/// [`absolute_room`] with its times counted from `t0` (Unix ms) instead of now.
fn room_from(t0: i64, id: &str, admission: &str, codes: u32, start_in_ms: i64, extra: &[&str]) -> String {
    use ticketd::clock::rfc3339_ms;
    let mut act = Act::new(id)
        .window(&rfc3339_ms(t0 + start_in_ms), &rfc3339_ms(t0 + 3_600_000))
        .with(&format!("admission = \"{admission}\""))
        .with(&format!("queue_opens = \"{}\"", rfc3339_ms(t0 - 60_000)));
    for line in extra {
        act = act.with(line);
    }
    act.ticket(&format!("{id}-t"), "Ticket", Codes::Generate(codes)).toml()
}

/// A lottery whose draw is `draw_in_ms` and start `start_in_ms` after
/// `t0` (Unix ms), as [`room_from`].
fn lottery_from(t0: i64, id: &str, codes: u32, draw_in_ms: i64, start_in_ms: i64, extra: &[&str]) -> String {
    let draw = format!("draw_time = \"{}\"", ticketd::clock::rfc3339_ms(t0 + draw_in_ms));
    let lines: Vec<&str> = std::iter::once(draw.as_str()).chain(extra.iter().copied()).collect();
    room_from(t0, id, "lottery", codes, start_in_ms, &lines)
}

/// A cluster of `n` nodes on the activity `act(t0)` (its times counted
/// from `t0`), with `users` accounts of `prefix` logged in, whose clock
/// starts only once all that is done: the nodes start with `t0` an hour
/// away (the room not open yet), and are then reloaded with `t0` now. A
/// test that counted its seconds from before the start-up lost them to a
/// loaded box's slow start (its fans arrived after the draw, once).
async fn cluster_then_open(
    n: usize,
    act: impl Fn(i64) -> String,
    extra: &str,
    prefix: &str,
    users: usize,
) -> (crate::cluster::Cluster, Vec<String>) {
    use ticketd::clock::now_ms;
    let later = act(now_ms() + 3_600_000);
    let cluster = crate::cluster::Cluster::start(n, &later, extra);
    let tokens = cluster.users(prefix, users).await;
    open_now(&cluster, &later, &act(now_ms()));
    (cluster, tokens)
}

/// Reloads every node of `cluster` with its activity `later` made `now`.
fn open_now(cluster: &crate::cluster::Cluster, later: &str, now: &str) {
    for node in &cluster.nodes {
        open_now_on(node, later, now);
    }
}

/// Reloads `node` with its activity `later` made `now`.
fn open_now_on(node: &TestApp, later: &str, now: &str) {
    let config = std::fs::read_to_string(node.config_path()).unwrap();
    assert!(config.contains(later), "{config}");
    let applied = node.reload(&config.replace(later, now));
    assert_eq!(applied["message"], "Config reloaded.", "{applied}");
}

/// A queue activity: joins open now, the shuffle and the start at `start`.
fn queue(id: &str, codes: u32, start: &str, extra: &[&str]) -> String {
    let mut act = Act::new(id)
        .window(start, "+1h")
        .with("admission = \"queue\"")
        .with("queue_opens = \"-1m\"");
    for line in extra {
        act = act.with(line);
    }
    act.ticket(&format!("{id}-t"), "Ticket", Codes::Generate(codes)).toml()
}

/// A lottery `id` of `codes` codes (ticket `{id}-t`), open for entries,
/// drawn in 5 s and on sale a second later, its passes good for `pass_ttl`.
fn drawn_in_5s(id: &str, codes: u32, pass_ttl: &str) -> String {
    Act::new(id)
        .window("+6s", "+1h")
        .with("admission = \"lottery\"")
        .with("queue_opens = \"-1m\"")
        .with("draw_time = \"+5s\"")
        .with(&format!("pass_ttl = \"{pass_ttl}\""))
        .with("grace = \"1m\"")
        .ticket(&format!("{id}-t"), "Ticket", Codes::Generate(codes))
        .toml()
}

/// `POST /queue/join` of `act` as `token`'s account.
pub(crate) async fn join(client: &ApiClient, token: &str, act: &str) -> ApiResponse {
    client
        .post("/queue/join", Some(token), &json!({ "actId": act }))
        .await
        .unwrap()
}

/// Joins, and joins again while the answer is BUSY: a join in the moment
/// the start is being drawn hears that, as a fan would, and the page joins
/// again (at the back). For tests whose joins may meet the start: on a
/// loaded box, making their users can outlast the time before it.
async fn join_through_the_draw(client: &ApiClient, token: &str, act: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let res = join(client, token, act).await;
        if res.error_code() != Some("BUSY") {
            assert_eq!(res.status, 200, "{}", res.body);
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", res.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn status(client: &ApiClient, token: &str, act: &str) -> Value {
    let res = client
        .get(&format!("/queue/status?actId={act}"), Some(token))
        .await
        .unwrap();
    assert_eq!(res.status, 200, "{}", res.body);
    res.data().clone()
}

/// Waits (polling as a fan would, once a second) until `token`'s state is not `waiting`.
async fn wait_turn(client: &ApiClient, token: &str, act: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(client, token, act).await;
        if s["state"] != "waiting" {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still waiting after 2 minutes: {s}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn claim_with(client: &ApiClient, token: &str, act: &str, pass: Option<&str>) -> ApiResponse {
    let mut body = json!({ "actId": act });
    if let Some(p) = pass {
        body["claimToken"] = p.into();
    }
    client.post("/ticket/get", Some(token), &body).await.unwrap()
}

/// Spearman's rank correlation of two permutations of 0..n.
fn spearman(a: &[usize], b: &[usize]) -> f64 {
    let n = a.len() as f64;
    let d2: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

/// Waits (a minute at most) until `act`'s room has drawn its order: its
/// seed is shown.
async fn until_drawn(app: &TestApp, act: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while app.detail(act).await["queue"]["seed"].is_null() {
        assert!(tokio::time::Instant::now() < deadline, "{act}'s order was never drawn");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn export_draw(app: &TestApp, act: &str) -> (Value, std::path::PathBuf) {
    let file = app.dir.path().join(format!("{act}-draw.json"));
    let out = app.cli(
        &[
            "export",
            "--activity",
            act,
            "--what",
            "draw",
            "--out",
            file.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap(), file)
}

fn room_log(app: &TestApp, act: &str) -> Vec<Value> {
    std::fs::read_to_string(app.dir.path().join(format!("data/rooms/{act}.log")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_draw_ignores_join_order_and_anyone_can_check_it() {
    const N: usize = 2000;
    // The room's clock starts once the fans are logged in: its times are
    // relative to the node's start, so the node starts again with the
    // start 8 s away (2,000 logins on a loaded box ran past a start
    // counted from the first).
    let later = queue("fair", 100, "+30m", &["grace = \"10m\""]);
    let mut app = TestApp::start(&(base_config() + &later));
    let tokens = app.users("f", N).await;
    let config = std::fs::read_to_string(app.config_path()).unwrap();
    assert!(config.contains(&later), "{config}");
    std::fs::write(
        app.config_path(),
        config.replace(&later, &queue("fair", 100, "+8s", &["grace = \"10m\""])),
    )
    .unwrap();
    app.restart();
    let detail = app.detail("fair").await;
    assert_eq!(detail["admission"], "queue");
    assert_eq!(detail["queue"]["admitRate"], 50.0, "the default pace");
    let commitment = detail["queue"]["commitment"].as_str().unwrap().to_owned();
    assert_eq!(commitment.len(), 64);
    assert_eq!(
        detail["queue"]["seed"],
        Value::Null,
        "the seed stays secret until the shuffle"
    );

    // Join in a known order: user i in lane i % 8, each lane in order.
    let lanes: Vec<_> = (0..8)
        .map(|lane| {
            let client = app.client_clone();
            let mine: Vec<(usize, String)> = tokens
                .iter()
                .cloned()
                .enumerate()
                .filter(|(i, _)| i % 8 == lane)
                .collect();
            tokio::spawn(async move {
                for (i, token) in mine {
                    let res = join(&client, &token, "fair").await;
                    assert_eq!(res.status, 200, "{i}: {}", res.body);
                    assert_eq!(res.data()["state"], "waiting");
                    assert_eq!(res.data()["position"], Value::Null, "no place before the shuffle");
                }
            })
        })
        .collect();
    for lane in lanes {
        lane.await.unwrap();
    }
    // Joining twice keeps the one place.
    let again = join(&app.client, &tokens[0], "fair").await;
    assert_eq!(
        again.data()["joinedAt"],
        status(&app.client, &tokens[0], "fair").await["joinedAt"]
    );

    // The start: the shuffle. Every joiner got a place (it would fail here if
    // the joins had not all landed before it).
    until_drawn(&app, "fair").await;
    let (draw, file) = export_draw(&app, "fair");
    assert_eq!(draw["commitment"], commitment.as_str());
    // A draw is one JSON document; asked for CSV, the export says so
    // rather than writing JSON under that name.
    let csv = app.cli(
        &["export", "--activity", "fair", "--what", "draw", "--format", "csv"],
        None,
    );
    let said = String::from_utf8_lossy(&csv.stderr);
    assert!(
        !csv.status.success() && said.contains("one JSON document, not csv"),
        "{said}"
    );
    let order: Vec<u64> = serde_json::from_value(draw["order"].clone()).unwrap();
    assert_eq!(order.len(), N, "every joiner is in the draw");
    assert_eq!(draw["late"], json!([]));

    // Positions against join order: the user ids were created in join order.
    let mut by_id: Vec<u64> = order.clone();
    by_id.sort_unstable();
    let join_rank: Vec<usize> = order.iter().map(|u| by_id.binary_search(u).unwrap()).collect();
    let position: Vec<usize> = (0..N).collect();
    let rho = spearman(&join_rank, &position);
    assert!(rho.abs() < 0.1, "positions follow join order: Spearman rho = {rho}");

    // The revealed seed is public and the draw recomputes.
    let detail = app.detail("fair").await;
    assert_eq!(detail["queue"]["seed"], draw["seed"]);
    let out = app.cli(&["verify-draw", file.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("draw verified"));
    // A record forged whole — a seed picked once the entrants were known,
    // with its own commitment and order — agrees with itself; only the
    // commitment published before the room opened tells it apart, and the
    // tool says so (or checks it, given `--commitment`).
    use ticketd::admission::draw::{shuffle, Seed};
    let published = detail["queue"]["commitment"].as_str().unwrap().to_owned();
    let genuine = app.cli(
        &["verify-draw", file.to_str().unwrap(), "--commitment", &published],
        None,
    );
    assert!(genuine.status.success(), "{}", String::from_utf8_lossy(&genuine.stderr));
    assert!(String::from_utf8_lossy(&genuine.stdout).contains("is the published commitment"));
    let seed = Seed::generate();
    let entrants: Vec<u64> = serde_json::from_value(draw["entrants"].clone()).unwrap();
    let mut whole = draw.clone();
    whole["seed"] = seed.to_hex().into();
    whole["commitment"] = seed.commitment().into();
    whole["order"] = json!(shuffle(&seed, &entrants));
    let forged_file = app.dir.path().join("fair-forged-whole.json");
    std::fs::write(&forged_file, whole.to_string()).unwrap();
    let alone = app.cli(&["verify-draw", forged_file.to_str().unwrap()], None);
    assert!(alone.status.success(), "{}", String::from_utf8_lossy(&alone.stderr));
    assert!(
        String::from_utf8_lossy(&alone.stdout).contains("compare it with the one published"),
        "{}",
        String::from_utf8_lossy(&alone.stdout)
    );
    let checked = app.cli(
        &["verify-draw", forged_file.to_str().unwrap(), "--commitment", &published],
        None,
    );
    let said = String::from_utf8_lossy(&checked.stderr);
    assert!(
        !checked.status.success() && said.contains("is not the published one"),
        "{said}"
    );
    // A forged order does not.
    let mut forged = draw.clone();
    forged["order"].as_array_mut().unwrap().swap(0, 1);
    std::fs::write(&file, forged.to_string()).unwrap();
    let out = app.cli(&["verify-draw", file.to_str().unwrap()], None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("place 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Arrivals after the start queue behind, first come first served.
    let late = app.users("late", 5).await;
    let mut positions = Vec::new();
    for token in &late {
        let res = join(&app.client, token, "fair").await;
        assert_eq!(res.status, 200, "{}", res.body);
        positions.push(res.data()["position"].as_u64().unwrap() + res.data()["admitted"].as_u64().unwrap());
    }
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "late arrivals are FIFO: {positions:?}"
    );
    let (draw, _) = export_draw(&app, "fair");
    assert_eq!(draw["late"].as_array().unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admission_never_runs_ahead_of_the_stock() {
    use ticketd::clock::{now_ms, rfc3339_ms};
    const USERS: usize = 5000;
    const CODES: usize = 1000;
    let room = |opens_in_ms: i64, start_in_ms: i64| {
        let at = |in_ms: i64| rfc3339_ms(now_ms() + in_ms);
        base_config()
            + &Act::new("room")
                .window(&at(start_in_ms), &at(3_600_000))
                .with("admission = \"queue\"")
                .with(&format!("queue_opens = \"{}\"", at(opens_in_ms)))
                .with("admit_rate = 400.0")
                .with("grace = \"1m\"")
                .with("pass_ttl = \"1m\"")
                .ticket("room-t", "Ticket", Codes::Generate(CODES as u32))
                .toml()
    };
    // The fans' 5,050 accounts and logins first, with the room not open
    // yet; then the room opens and the sale starts 12 s later, time enough
    // for the joins however loaded the box is (with the logins inside
    // those seconds, a loaded box once started the sale mid-joins).
    let mut app = TestApp::start(&room(1_800_000, 2_700_000));
    let tokens = app.users("q", USERS).await;
    let impatient_tokens = app.users("i", 50).await;
    let applied = app.reload(&room(-60_000, 12_000));
    assert_eq!(applied["message"], "Config reloaded.", "{applied}");
    // Everybody joins before the start.
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let joins: Vec<_> = tokens
        .iter()
        .cloned()
        .map(|t| {
            let (client, sem) = (app.client_clone(), sem.clone());
            tokio::spawn(async move {
                let _p = sem.acquire().await.unwrap();
                let res = join(&client, &t, "room").await;
                assert_eq!(res.status, 200, "{}", res.body);
            })
        })
        .collect();
    for j in joins {
        j.await.unwrap();
    }
    // Meanwhile fifty others try, over and over, without a pass or with a
    // forged one: they get nothing.
    let impatient: Vec<_> = impatient_tokens
        .into_iter()
        .map(|t| {
            let client = app.client_clone();
            tokio::spawn(async move {
                let mut refused = 0;
                loop {
                    let forged = "AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA";
                    for pass in [None, Some(forged)] {
                        let res = claim_with(&client, &t, "room", pass).await;
                        match res.error_code() {
                            Some("QUEUE_PASS_REQUIRED") => refused += 1,
                            Some("NOT_STARTED" | "STOCK_IN_FLIGHT") => {}
                            Some("SOLD_OUT") => return refused,
                            _ => panic!("a claim without a pass: {}", res.body),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect();
    // Every fan waits for their turn (status once a second) and claims with their pass.
    let fans: Vec<_> = tokens
        .iter()
        .cloned()
        .map(|t| {
            let client = app.client_clone();
            tokio::spawn(async move {
                let mut answers: Vec<(i64, String)> = Vec::new();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                loop {
                    let s = status(&client, &t, "room").await;
                    let state = s["state"].as_str().unwrap().to_owned();
                    answers.push((ms(s["serverTime"].as_str().unwrap()), state.clone()));
                    match state.as_str() {
                        "waiting" => {
                            assert!(tokio::time::Instant::now() < deadline, "waited two minutes: {s}");
                            tokio::time::sleep(Duration::from_millis(1000)).await;
                        }
                        "admitted" => {
                            let pass = s["pass"].as_str().expect("an admitted fan has a pass").to_owned();
                            let res = claim_with(&client, &t, "room", Some(&pass)).await;
                            assert_eq!(res.status, 200, "an admitted fan's claim: {}", res.body);
                            let at = ms(res.data()["claimedAt"].as_str().unwrap());
                            return (answers, Some(at));
                        }
                        "sold_out" => return (answers, None),
                        other => panic!("unexpected state {other}: {s}"),
                    }
                }
            })
        })
        .collect();
    let mut claimed_at = Vec::new();
    let mut all_answers = Vec::new();
    for f in fans {
        let (answers, at) = f.await.unwrap();
        claimed_at.extend(at);
        all_answers.extend(answers);
    }
    assert_eq!(
        claimed_at.len(),
        CODES,
        "exactly the stock was claimed, each by a pass holder"
    );
    for i in impatient {
        assert!(
            i.await.unwrap() > 0,
            "claims without a pass were refused with QUEUE_PASS_REQUIRED"
        );
    }
    let last_code = *claimed_at.iter().max().unwrap();
    let log = room_log(&app, "room");
    let closed = log.iter().find(|e| e["k"] == "close").expect("the room closed")["t"]
        .as_i64()
        .unwrap();
    // Not before the last code (how soon after is measured, not asserted:
    // README's figure comes from this run's output).
    assert!(closed >= last_code, "the room closed before the last code was claimed");
    eprintln!("the room closed {} ms after the last code", closed - last_code);
    let late_waits: Vec<_> = all_answers
        .iter()
        .filter(|(t, s)| s == "waiting" && *t > closed)
        .collect();
    assert!(
        late_waits.is_empty(),
        "told to wait after the room closed: {late_waits:?}"
    );
    let admitted = log.iter().filter(|e| e["k"] == "admit").count();
    assert_eq!(admitted, CODES, "no pass beyond the stock was handed out");
    app.assert_verified();
    // Closed, nobody waits: the places never reached were counted as
    // waiting for good (cluster walkthrough).
    let queue = &app.detail("room").await["queue"];
    assert_eq!(
        (&queue["closed"], &queue["waiting"]),
        (&json!(true), &json!(0)),
        "{queue}"
    );
    assert_eq!(status(&app.client, &tokens[0], "room").await["waiting"], 0);
    assert_eq!(metric(&app, "ticketd_queue_waiting{activity=\"room\"}").await, 0.0);

    // The report's waiting-room section agrees, and its claims chart is
    // drawn in steps of milliseconds, not seconds, for a sale this short.
    assert_eq!(app.stop(), 0);
    let out = app.cli(&["report", "--activity", "room", "--out", "report.html"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let html = std::fs::read_to_string(app.dir.path().join("report.html")).unwrap();
    let cell = |id: &str| report_cell(&html, id);
    assert_eq!(cell("q-admitted"), CODES.to_string());
    assert_eq!(cell("q-lapsed"), "0");
    assert_eq!(
        cell("q-drawn").parse::<usize>().unwrap() + cell("q-late").parse::<usize>().unwrap(),
        USERS
    );
    assert!(
        html.contains(" ms steps</title>"),
        "a short sale is charted in milliseconds"
    );
    // Its legend names what the points are: claims per second, not per step.
    assert!(
        html.contains("fill=\"#333\">claims/s</text>"),
        "the claims chart's legend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gone_fans_are_skipped_and_lapsed_passes_go_to_the_next() {
    let mut app = TestApp::start(
        &(base_config()
            + &queue(
                "skip",
                1,
                &in_secs(6),
                &["grace = \"3s\"", "pass_ttl = \"5s\"", "admit_rate = 100.0"],
            )),
    );
    let tokens = app.users("s", 3).await;
    for t in &tokens {
        assert_eq!(join(&app.client, t, "skip").await.status, 200);
    }
    // After the start one fan holds the only pass; the others stand by.
    // All three stay until the shuffle (each checks in five times a second).
    let turns = futures::future::join_all(tokens.iter().map(|t| wait_turn_or_standby(&app.client, t, "skip"))).await;
    let mut order: Vec<_> = tokens
        .iter()
        .zip(turns)
        .map(|(t, s)| {
            (
                s["state"] == "admitted",
                s["position"].as_u64().unwrap_or(0),
                t.clone(),
                s,
            )
        })
        .collect();
    order.sort_by_key(|(admitted, pos, _, _)| (!admitted, *pos));
    let (first, second, third) = (order[0].2.clone(), order[1].2.clone(), order[2].2.clone());
    assert!(
        order[0].0,
        "one fan admitted: {:?}",
        order.iter().map(|o| &o.3).collect::<Vec<_>>()
    );
    assert!(
        order[1].3["standby"].as_bool().unwrap(),
        "the only code is spoken for: {}",
        order[1].3
    );
    let first_pass = order[0].3["pass"].as_str().unwrap().to_owned();

    // The second fan goes away; the third stays (status every second); the
    // first lets the pass lapse. A kill -9 meanwhile loses nothing.
    app.kill9();
    app.boot();
    let after = status(&app.client, &first, "skip").await;
    assert_eq!(after["state"], "admitted", "the pass survived the restart: {after}");
    let third_turn = wait_turn(&app.client, &third, "skip").await;
    assert_eq!(third_turn["state"], "admitted", "{third_turn}");
    assert_error(
        &claim_with(&app.client, &first, "skip", Some(&first_pass)).await,
        403,
        "QUEUE_PASS_EXPIRED",
    );
    assert_eq!(status(&app.client, &first, "skip").await["state"], "passed_over");
    assert_eq!(status(&app.client, &second, "skip").await["state"], "passed_over");
    let res = claim_with(&app.client, &third, "skip", third_turn["pass"].as_str()).await;
    assert_eq!(res.status, 200, "{}", res.body);
    eventually(&app.client, &second, "skip", "sold_out").await;
    let log = room_log(&app, "skip");
    let skipped: Vec<_> = log.iter().filter(|e| e["k"] == "skip").collect();
    assert_eq!(skipped.len(), 1, "{log:?}");
    assert_eq!(status(&app.client, &first, "skip").await["state"], "sold_out");
    assert_error(&join(&app.client, &second, "skip").await, 410, "SOLD_OUT");
    for (series, value) in [
        ("ticketd_queue_admitted_total", 2.0),
        ("ticketd_queue_abandoned_total", 1.0),
        ("ticketd_queue_passes_expired_total", 1.0),
        ("ticketd_queue_waiting", 0.0),
    ] {
        assert_eq!(
            metric(&app, &format!("{series}{{activity=\"skip\"}}")).await,
            value,
            "{series}"
        );
    }
    app.assert_verified();
}

/// Two fans are admitted to a room of two codes; one buys, the other lets
/// the pass lapse and joins again (through the next node, in a cluster).
/// With `older`, the lapsed fan's admission in Redis is rewritten first as
/// a node of an earlier version wrote it (a bare `a`, no pass expiry).
/// Returns the lapsed fan's first admission.
async fn lapse_and_rejoin(
    clients: &[Arc<ApiClient>],
    tokens: &[String],
    act: &str,
    older: Option<&services::Services>,
) -> Value {
    let on = |i: usize| &*clients[i % clients.len()];
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(join(on(i), t, act).await.status, 200);
    }
    let turns = futures::future::join_all(tokens.iter().enumerate().map(|(i, t)| wait_turn(on(i), t, act))).await;
    for t in &turns {
        assert_eq!(t["state"], "admitted", "{t}");
    }
    if let Some(services) = older {
        // The lapsing fan joined first: the log's first join is theirs.
        let log = services.lrange(&format!("q:{{{act}}}:log")).await;
        let events: Vec<Value> = log.iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        let user = events.iter().find(|e| e["k"] == "join").unwrap()["u"].to_string();
        let places = format!("q:{{{act}}}:places");
        let place: String = services.query(redis::cmd("HGET").arg(&places).arg(&user)).await;
        assert_eq!(
            place,
            format!("a:{}", ms(turns[0]["passExpiresAt"].as_str().unwrap())),
            "{events:?}"
        );
        let () = services
            .query(redis::cmd("HSET").arg(&places).arg(&user).arg("a"))
            .await;
    }
    let (lapser, buyer) = (&tokens[0], &tokens[1]);
    let res = claim_with(on(1), buyer, act, turns[1]["pass"].as_str()).await;
    assert_eq!(res.status, 200, "{}", res.body);
    let lapsed = eventually(on(1), lapser, act, "passed_over").await;

    let again = join(on(1), lapser, act).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(
        matches!(again.data()["state"].as_str(), Some("waiting" | "admitted")),
        "a new place after {lapsed}: {}",
        again.body
    );
    turns[0].clone()
}

/// The lapsed fan is placed at the back and admitted to the code the
/// lapse freed, with a new pass.
async fn admitted_again(clients: &[Arc<ApiClient>], tokens: &[String], act: &str, first: &Value) {
    let on = |i: usize| &*clients[i % clients.len()];
    let lapser = &tokens[0];
    // Asked where the fan joined again (another node's replica may show
    // the old place for its next step); the pass works on any node.
    let turn = wait_turn(on(1), lapser, act).await;
    assert_eq!(turn["state"], "admitted", "the freed code's pass: {turn}");
    assert_ne!(turn["pass"], first["pass"], "a new pass");
    assert_ne!(turn["admittedAt"], first["admittedAt"], "admitted again");
    let res = claim_with(on(0), lapser, act, turn["pass"].as_str()).await;
    assert_eq!(res.status, 200, "{}", res.body);
    eventually(on(1), lapser, act, "done").await;
}

/// Nobody can claim while the node is down, but passes used to run out
/// meanwhile: a fan admitted just before a crash found the pass lapsed at
/// the restart and was passed over. Now the downtime is given back as a
/// pause gives it: the pass expires that much later, and the fan claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_gets_back_the_time_the_node_was_down() {
    let mut app =
        TestApp::start(&(base_config() + &queue("dt", 2, &in_secs(3), &["pass_ttl = \"5s\"", "grace = \"10m\""])));
    let token = app.users("dt", 1).await.remove(0);
    assert_eq!(join(&app.client, &token, "dt").await.status, 200);
    let turn = wait_turn(&app.client, &token, "dt").await;
    assert_eq!(turn["state"], "admitted", "{turn}");
    let expired = ms(turn["passExpiresAt"].as_str().unwrap());
    app.kill9();
    // Down until the pass would have run out, and a second more.
    let down_from = ticketd::clock::now_ms();
    while ticketd::clock::now_ms() < expired + 1_000 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let down_ms = ticketd::clock::now_ms() - down_from;
    app.boot();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        let s = status(&app.client, &token, "dt").await;
        if s["state"] == "admitted" && s["passExpiresAt"] != turn["passExpiresAt"] {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pass lapsed with the node down: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let given_back = ms(again["passExpiresAt"].as_str().unwrap()) - expired;
    assert!(
        given_back >= down_ms,
        "{given_back} ms back for {down_ms} ms down: {again}"
    );
    let res = claim_with(&app.client, &token, "dt", again["pass"].as_str()).await;
    assert_eq!(res.status, 200, "{}", res.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fan_whose_pass_lapsed_joins_again_at_the_back() {
    let mut app =
        TestApp::start(&(base_config() + &queue("rj", 2, &in_secs(5), &["pass_ttl = \"5s\"", "admit_rate = 100.0"])));
    let tokens = app.users("rj", 2).await;
    let first = lapse_and_rejoin(&[app.client_clone()], &tokens, "rj", None).await;
    // The new place is in the room's log; the old pass, replayed from it
    // after a kill -9, does not retire the new place.
    app.kill9();
    app.boot();
    admitted_again(&[app.client_clone()], &tokens, "rj", &first).await;
    app.assert_verified();
}

/// Two nodes sharing a room of two codes, passes of 5 s, starting in 8 s,
/// and `fans` fans (`id` their prefix).
async fn two_nodes_with_a_room(id: &str, fans: usize) -> (crate::cluster::Cluster, Vec<String>) {
    let act = |t0| room_from(t0, id, "queue", 2, 8_000, &["pass_ttl = \"5s\"", "admit_rate = 100.0"]);
    cluster_then_open(2, act, "", id, fans).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn across_nodes_a_fan_whose_pass_lapsed_joins_again_at_the_back() {
    let (cluster, tokens) = two_nodes_with_a_room("rj", 2).await;
    let first = lapse_and_rejoin(&cluster.clients(), &tokens, "rj", None).await;
    admitted_again(&cluster.clients(), &tokens, "rj", &first).await;
    // Redis counts each account's places (the bound of eight holds there,
    // whatever a node's replica has seen): one per join in the log.
    let log = cluster.services.lrange("q:{rj}:log").await;
    let mut joins: std::collections::BTreeMap<String, usize> = Default::default();
    for e in log.iter().map(|e| serde_json::from_str::<Value>(e).unwrap()) {
        if e["k"] == "join" {
            *joins.entry(e["u"].to_string()).or_default() += 1;
        }
    }
    assert_eq!(joins.values().copied().max(), Some(2), "{joins:?}");
    for (user, n) in joins {
        let taken: Option<usize> = cluster
            .services
            .query(redis::cmd("HGET").arg("q:{rj}:taken").arg(&user))
            .await;
        assert_eq!(taken, Some(n), "user {user}");
    }
}

/// A claim checks its pass and then goes to Redis. One checked just before
/// the pass expired that reached Redis after the admitter had retired the
/// pass (it read no claim for it) was recorded anyway, with the code the
/// admitter had meanwhile promised to the next fan: that fan, admitted,
/// heard SOLD_OUT. Redis now refuses a claim whose pass has expired by
/// its clock, and the admitter retires a lapsed pass only a moment after
/// its expiry. Here the way to Redis of the node that has the one code is
/// held from the claim's commit on (a slow network; the other node reaches
/// Redis as usual and takes over admitting) until the next fan is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_that_reaches_redis_after_its_pass_lapsed_is_not_recorded() {
    use crate::common::relay::Relay;
    let services = services::Services::start();
    let direct = services.redis_url();
    let relays = [Relay::start(services.redis_port), Relay::start(services.redis_port)];
    let via: Vec<String> = relays
        .iter()
        .map(|r| format!("redis://127.0.0.1:{}/", r.port))
        .collect();
    let act = absolute_room(
        "pl",
        "queue",
        1,
        8_000,
        &["pass_ttl = \"5s\"", "admit_rate = 100.0", "grace = \"10m\""],
    );
    // The held node keeps its lease of the code, and its commit going, for
    // as long as the test holds it.
    let extra = "[cluster]\nlease_ttl = \"60s\"\ncommit_timeout = \"30s\"\n";
    let cluster = crate::cluster::Cluster::start_on(services, 2, &act, extra, |c| {
        let i = usize::from(!c.contains("node_id = \"node0\""));
        c.replace(&direct, &via[i])
    });
    let clients = cluster.clients();
    let tokens = cluster.users("pl", 2).await;
    for t in &tokens {
        assert_eq!(join(&clients[0], t, "pl").await.status, 200);
    }
    // One code: one fan is admitted at the start, the other waits.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (first, turn) = loop {
        let mut admitted = None;
        for (i, t) in tokens.iter().enumerate() {
            let s = status(&clients[0], t, "pl").await;
            if s["state"] == "admitted" {
                admitted = Some((i, s));
            }
        }
        if let Some(found) = admitted {
            break found;
        }
        assert!(tokio::time::Instant::now() < deadline, "nobody admitted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (lapser, next) = (&tokens[first], &tokens[1 - first]);
    let pass = turn["pass"].as_str().unwrap().to_owned();
    let expires = ms(turn["passExpiresAt"].as_str().unwrap());

    // The claim, through both nodes at once: the one that has the code
    // commits it, and its way to Redis is held from that commit on.
    for r in &relays {
        r.hold_from(b"\"nonce\":");
    }
    let mut claims = Vec::new();
    let held = loop {
        let tries: Vec<_> = clients
            .iter()
            .map(|c| {
                let (c, t, p) = (c.clone(), lapser.clone(), pass.clone());
                tokio::spawn(async move { claim_with(&c, &t, "pl", Some(&p)).await })
            })
            .collect();
        while !relays.iter().any(Relay::holding) && !tries.iter().all(|t| t.is_finished()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        claims.extend(tries);
        if let Some(held) = relays.iter().position(Relay::holding) {
            break held;
        }
        assert!(
            expires > ticketd::clock::now_ms() + 1_000,
            "the pass nearly lapsed and no claim reached a commit"
        );
    };
    relays[1 - held].release();

    // The pass lapses; the other node takes over admitting (its lease on
    // that lapses first) and admits the next fan to the code.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let admitted = loop {
        let s = status(&clients[1 - held], next, "pl").await;
        if s["state"] == "admitted" {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the next fan was not admitted: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    relays[held].release();
    for claim in claims {
        let res = claim.await.unwrap();
        assert_ne!(res.status, 200, "a claim whose pass lapsed on its way: {}", res.body);
    }
    let res = claim_retrying(&clients[held], next, "pl", admitted["pass"].as_str()).await;
    assert_eq!(res.status, 200, "the fan admitted to the code gets it: {}", res.body);
    let res = clients[held].get("/ticket/list", Some(lapser)).await.unwrap();
    assert_eq!(res.data()["claims"], json!([]), "the lapsed fan holds nothing");

    // The report, from MongoDB: two admitted, one of them never claimed.
    // (It counted every admitted fan of a cluster as never having claimed.)
    cluster.drained("pl").await;
    let node = &cluster.nodes[0];
    let out = node.cli(&["report", "--activity", "pl", "--out", "report.html"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let html = std::fs::read_to_string(node.dir.path().join("report.html")).unwrap();
    let cell = |id: &str| report_cell(&html, id);
    assert_eq!((cell("q-admitted"), cell("q-lapsed")), ("2", "1"));
}

/// A reload took a ticket type (codes still in Redis) out of a cluster's
/// waiting-room activity. The room kept counting its codes as stock: it
/// admitted fans to codes no longer on sale (they heard SOLD_OUT) and
/// would not close when the rest sold out. It now counts the activity's
/// ticket types as configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn across_nodes_a_ticket_type_taken_out_is_no_stock_for_the_room() {
    let balcony = "[[activity.ticket]]\nid = \"tb-b\"\nname = \"Balcony\"\ngenerate = 5\n";
    let act = absolute_room("tb", "queue", 1, 8_000, &["admit_rate = 100.0", "grace = \"10m\""]) + balcony;
    let cluster = crate::cluster::Cluster::start(1, &act, "");
    let node = &cluster.nodes[0];
    let config = std::fs::read_to_string(node.config_path()).unwrap();
    let outcome = node.reload(&config.replace(balcony, ""));
    assert_eq!(outcome["message"], "Config reloaded.", "{outcome}");
    let tokens = cluster.users("tb", 3).await;
    for t in &tokens {
        assert_eq!(join(&node.client, t, "tb").await.status, 200);
    }
    // One code on sale: one fan admitted, the others wait on standby.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let states = loop {
        let mut states = Vec::new();
        for t in &tokens {
            states.push(status(&node.client, t, "tb").await);
        }
        let admitted = states.iter().filter(|s| s["state"] == "admitted").count();
        let standby = states
            .iter()
            .filter(|s| s["state"] == "waiting" && s["standby"] == true)
            .count();
        if admitted + standby == 3 && admitted >= 1 || admitted > 1 {
            break states;
        }
        assert!(tokio::time::Instant::now() < deadline, "{states:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let admitted: Vec<&Value> = states.iter().filter(|s| s["state"] == "admitted").collect();
    assert_eq!(admitted.len(), 1, "admitted beyond the one code on sale: {states:?}");
}

/// Each node follows a cluster's room through a replica of the shared log,
/// read every tenth of a second. A fan who joined through one node and
/// opened its event stream (or asked its status) on another a moment later
/// heard "not joined" there: the stream ended, and the page offered to
/// join again instead of keeping the place. A node now says so only once a
/// read of the log made after the question shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fan_who_just_joined_through_another_node_is_not_told_not_joined() {
    let (cluster, tokens) = two_nodes_with_a_room("nj", 10).await;
    let (first, second) = (&cluster.nodes[0], &cluster.nodes[1]);
    for (i, token) in tokens.iter().enumerate() {
        assert_eq!(join(&first.client, token, "nj").await.status, 200);
        if i % 2 == 0 {
            let mut events = Events::open(second, token, "nj").await;
            let event = events.next().await.expect("an event");
            assert_eq!(event["state"], "waiting", "user {i}: {event}");
        } else {
            let res = second.client.get("/queue/status?actId=nj", Some(token)).await.unwrap();
            assert_eq!(res.data()["state"], "waiting", "user {i}: {}", res.body);
        }
    }
}

/// During a rolling upgrade a node of an earlier version may have written
/// the admission (a bare `a`, without the pass's expiry): the fan whose
/// pass lapsed still gets a new place, not a lock-out until the room ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn across_nodes_a_pass_an_earlier_version_wrote_lapses_too() {
    let (cluster, tokens) = two_nodes_with_a_room("ru", 2).await;
    let first = lapse_and_rejoin(&cluster.clients(), &tokens, "ru", Some(&cluster.services)).await;
    admitted_again(&cluster.clients(), &tokens, "ru", &first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_room_with_proof_of_work_makes_each_account_pay_for_its_place() {
    use ticketd::auth::claim_token::{pow_ok, solve_pow};
    let app = TestApp::start(&(base_config() + &queue("pw", 1, "+30m", &["pow_difficulty = 12"])));
    let tokens = app.users("pw", 2).await;
    let asked = |res: &ApiResponse| {
        assert_error(res, 403, "POW_REQUIRED");
        assert_eq!(res.body["error"]["powDifficulty"], 12, "{}", res.body);
        res.body["error"]["powChallenge"].as_str().unwrap().to_owned()
    };
    let mine = asked(&join(&app.client, &tokens[0], "pw").await);
    let theirs = asked(&join(&app.client, &tokens[1], "pw").await);
    assert_ne!(mine, theirs, "each account has its own challenge");
    let client = &app.client;
    let join_with = |token: &str, nonce: String| {
        let body = json!({ "actId": "pw", "powNonce": nonce });
        let token = token.to_owned();
        async move { client.post("/queue/join", Some(&token), &body).await.unwrap() }
    };
    // Another account's work does not pay for this one's place.
    let their_nonce = solve_pow(&theirs, 12);
    assert!(!pow_ok(&mine, &their_nonce, 12));
    asked(&join_with(&tokens[0], their_nonce).await);
    asked(&join_with(&tokens[0], "not work".into()).await);
    let res = join_with(&tokens[0], solve_pow(&mine, 12)).await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.data()["state"], "waiting");
    assert_eq!(status(&app.client, &tokens[1], "pw").await["state"], "not_joined");
    assert_eq!(
        metric(&app, "ticketd_security_rejections_total{reason=\"join_pow\"}").await,
        4.0
    );
}

/// Polls until `token` is admitted, or waits on standby with a place.
async fn wait_turn_or_standby(client: &ApiClient, token: &str, act: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(client, token, act).await;
        if s["state"] != "waiting" || s["standby"] == true {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "neither a turn nor standby: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `queue_capacity` bounds the places still waiting. Past it, a queue's
/// joiner hears 503 `QUEUE_FULL` (places free up as the line moves). A
/// lottery's heard the same "try again shortly" with a Retry-After, but a
/// lottery's entrants all wait for the draw, so no place frees up (unless
/// the organiser raises the capacity): it now answers 409 `ENTRIES_FULL`.
/// A fan already in keeps the place. On one node, and through a cluster's
/// join script on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_room_takes_no_new_place_and_a_full_lottery_says_so_for_good() {
    let room = |id: &str, admission: &str| {
        Act::new(id)
            .window("+1h", "+2h")
            .with(&format!("admission = \"{admission}\""))
            .with("queue_opens = \"-1m\"")
            .with("queue_capacity = 2")
            .with(if admission == "lottery" {
                "draw_time = \"+30m\""
            } else {
                ""
            })
            .ticket(&format!("{id}-t"), "Ticket", Codes::Generate(5))
            .toml()
    };
    let app = TestApp::start(&(base_config() + &room("qf", "queue") + &room("lf", "lottery")));
    let fans = app.users("full", 3).await;
    for (act, code, status) in [("qf", "QUEUE_FULL", 503), ("lf", "ENTRIES_FULL", 409)] {
        for fan in &fans[..2] {
            assert_eq!(join(&app.client, fan, act).await.status, 200, "{act}");
        }
        assert_error(&join(&app.client, &fans[2], act).await, status, code);
        assert_eq!(
            join(&app.client, &fans[0], act).await.status,
            200,
            "{act}: a place is kept"
        );
    }

    let act = lottery_from(
        ticketd::clock::now_ms(),
        "cf",
        5,
        900_000,
        1_800_000,
        &["queue_capacity = 2"],
    );
    let cluster = crate::cluster::Cluster::start(1, &act, "");
    let fans = cluster.users("cfull", 3).await;
    let client = &cluster.nodes[0].client;
    for fan in &fans[..2] {
        assert_eq!(join(client, fan, "cf").await.status, 200);
    }
    assert_error(&join(client, &fans[2], "cf").await, 409, "ENTRIES_FULL");
}

/// A lottery that has reached every place it drew, with no pass out,
/// admits nobody any more (it takes no entry after its draw), though codes
/// are left and the sale runs on to its end: `/act/list` and `/act/detail`
/// say `closed`, and the fans' page shows it closed. They showed an open
/// sale with 4 codes left, and the page a live "Open" badge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lottery_that_reached_every_place_it_drew_shows_closed() {
    // A pass long enough that the first check below comes before it
    // lapses on a busy machine.
    let act = drawn_in_5s("lu", 5, "15s");
    let app = TestApp::start(&crate::common::with_admin(base_config() + &act));
    let room = || async {
        let stats = app.admin_stats().await;
        let act = stats["activities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["actId"] == "lu")
            .cloned();
        act.unwrap()["queue"].clone()
    };
    let tokens = app.users("lu", 2).await;
    for t in &tokens {
        assert_eq!(join(&app.client, t, "lu").await.status, 200);
    }
    let passes: Vec<Value> = futures::future::join_all(tokens.iter().map(|t| wait_turn(&app.client, t, "lu"))).await;
    assert!(passes.iter().all(|p| p["state"] == "admitted"), "{passes:?}");
    let bought = claim_with(&app.client, &tokens[0], "lu", passes[0]["pass"].as_str()).await;
    assert_eq!(bought.status, 200, "{}", bought.body);
    let detail = app.detail("lu").await;
    assert_eq!(
        detail["queue"]["admitRate"],
        Value::Null,
        "a lottery has no pace: {detail}"
    );
    assert_eq!(
        (&detail["closed"], &detail["remaining"]),
        (&json!(false), &json!(4)),
        "a pass is out: {detail}"
    );
    assert_eq!(room().await["admitsNoMore"], false);

    // The other winner lets the pass lapse: nobody is left to admit.
    until("the lottery to say it admits nobody any more", || async {
        app.detail("lu").await["closed"] == true
    })
    .await;
    assert_eq!(status(&app.client, &tokens[1], "lu").await["state"], "passed_over");
    // The organiser's figures say so; the room itself has not closed.
    let queue = room().await;
    assert_eq!(
        (&queue["admitsNoMore"], &queue["closed"]),
        (&json!(true), &json!(false)),
        "{queue}"
    );
    let detail = app.detail("lu").await;
    assert_eq!(
        (&detail["status"], &detail["remaining"]),
        (&json!("open"), &json!(4)),
        "{detail}"
    );
    let list = app.client.get("/act/list", None).await.unwrap();
    let listed = list.data()["activities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["actId"] == "lu")
        .cloned()
        .unwrap();
    assert_eq!(
        (&listed["closed"], &listed["remaining"]),
        (&json!(true), &json!(4)),
        "{listed}"
    );
    // The fans' page: closed, not open with 4 left.
    let mut b = crate::common::cdp::Browser::launch().await;
    b.goto(&format!("{}/", app.url())).await;
    b.wait_for(
        "document.querySelector('[data-act=lu] .badge')?.className === 'badge closed'",
        "the list to show the lottery closed",
    )
    .await;
    let said = b
        .eval("document.querySelector('[data-act=lu] .badge').textContent")
        .await;
    assert_eq!(said, "Closed");
    assert!(b.errors.is_empty(), "console errors: {:#?}", b.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lottery_draws_once_and_its_waiting_list_replaces_lapsed_winners() {
    let act = drawn_in_5s("lot", 2, "5s");
    let app = TestApp::start(&(base_config() + &act));
    let tokens = app.users("l", 6).await;
    let outsider = app.users("o", 1).await.remove(0);
    for t in &tokens {
        assert_eq!(join(&app.client, t, "lot").await.status, 200);
    }
    // The draw: positions known, before the sale opens; entries close.
    let mut drawn = Vec::new();
    for t in &tokens {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let s = loop {
            let s = status(&app.client, t, "lot").await;
            if s["position"].is_u64() || s["state"] != "waiting" {
                break s;
            }
            assert!(tokio::time::Instant::now() < deadline, "never drawn: {s}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        drawn.push((s["position"].as_u64().unwrap(), t.clone()));
    }
    drawn.sort();
    assert_eq!(drawn.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    assert_error(&join(&app.client, &outsider, "lot").await, 409, "ENTRIES_CLOSED");
    // The two winners get passes at the start; the first claims, the second lets it lapse.
    let w1 = wait_turn(&app.client, &drawn[0].1, "lot").await;
    let w2 = wait_turn(&app.client, &drawn[1].1, "lot").await;
    assert_eq!(
        (w1["state"].as_str(), w2["state"].as_str()),
        (Some("admitted"), Some("admitted"))
    );
    // The winner who lets the pass lapse follows the room on a stream.
    let mut lapsing = Events::open(&app, &drawn[1].1, "lot").await;
    assert_eq!(status(&app.client, &drawn[2].1, "lot").await["state"], "waiting");
    assert_eq!(
        claim_with(&app.client, &drawn[0].1, "lot", w1["pass"].as_str())
            .await
            .status,
        200
    );
    // The third in the draw takes the lapsed winner's place.
    let w3 = wait_turn(&app.client, &drawn[2].1, "lot").await;
    assert_eq!(w3["state"], "admitted", "{w3}");
    // Passed over in a lottery after its draw, with no way back in: the
    // stream says so and ends (it held a connection and a stream slot
    // until the room closed).
    let passed_over = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(event) = lapsing.next().await {
            if event["state"] == "passed_over" {
                return true;
            }
        }
        false
    });
    assert!(passed_over.await.unwrap(), "the stream never said passed_over");
    let ended = tokio::time::timeout(Duration::from_secs(5), lapsing.next()).await;
    assert!(matches!(ended, Ok(None)), "the stream stayed open: {ended:?}");
    let lapsed = claim_with(&app.client, &drawn[1].1, "lot", w2["pass"].as_str()).await;
    assert_error(&lapsed, 403, "QUEUE_PASS_EXPIRED");
    // Not "you may join again" alone, to a lottery's winner.
    assert!(
        lapsed.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("a lottery takes no entry after its draw")),
        "{}",
        lapsed.body
    );
    assert_eq!(
        claim_with(&app.client, &drawn[2].1, "lot", w3["pass"].as_str())
            .await
            .status,
        200
    );
    for (_, t) in &drawn[3..] {
        eventually(&app.client, t, "lot", "sold_out").await;
    }
    let (mut draw, file) = export_draw(&app, "lot");
    let out = app.cli(&["verify-draw", file.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The export says it was a lottery, so an entry after the draw (what an
    // operator slipping somebody in would have to add) does not verify.
    assert_eq!(draw["admission"], "lottery");
    draw["late"] = json!([987_654]);
    let forged = app.dir.path().join("lot-forged.json");
    std::fs::write(&forged, draw.to_string()).unwrap();
    let out = app.cli(&["verify-draw", forged.to_str().unwrap()], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("a lottery takes no entry after its draw"),
        "{stderr}"
    );
    // Without the mode (as older exports are), the same record verifies,
    // and the verifier says what it could not check.
    draw.as_object_mut().unwrap().remove("admission");
    std::fs::write(&forged, draw.to_string()).unwrap();
    let out = app.cli(&["verify-draw", forged.to_str().unwrap()], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("no entry after the draw holds for the 1 user listed as late"),
        "{stdout}"
    );
    app.assert_verified();
}

/// From the draw, a lottery's status tells its winners from its waiting
/// list: the places the stock covers (3 codes at two a pass: one place)
/// expect their turn at the start, the rest are on standby with no
/// estimate. Until then every place drawn heard "your turn at the start".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lottery_tells_its_waiting_list_from_its_winners_before_the_start() {
    let act = Act::new("wl")
        .window("+1h", "+2h")
        .limit(2)
        .with("admission = \"lottery\"")
        .with("queue_opens = \"-1m\"")
        // Time for the start-up, four logins and joins on a slow box.
        .with("draw_time = \"+6s\"")
        .ticket("wl-t", "Ticket", Codes::Generate(3))
        .toml();
    let app = TestApp::start(&(base_config() + &act));
    let tokens = app.users("w", 4).await;
    for t in &tokens {
        assert_eq!(join(&app.client, t, "wl").await.status, 200);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let drawn = loop {
        let states = futures::future::join_all(tokens.iter().map(|t| status(&app.client, t, "wl"))).await;
        if states.iter().filter(|s| s["standby"] == true).count() == 3 {
            break states;
        }
        assert!(tokio::time::Instant::now() < deadline, "no waiting list: {states:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for s in &drawn {
        assert_eq!(s["state"], "waiting", "{s}");
        let winner = s["position"] == 1;
        assert_eq!(s["standby"], !winner, "{s}");
        // The winner's wait is the time to the start; the list's is unknown.
        assert_eq!(s["etaMs"].is_u64(), winner, "{s}");
        // No place is left to take in a lottery drawn (it said 7).
        assert_eq!(s["placesLeft"], 0, "{s}");
    }
}

/// The states of `tokens` once `n` of them hold a pass (10 s at most).
async fn until_admitted(client: &ApiClient, tokens: &[String], act: &str, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let states = futures::future::join_all(tokens.iter().map(|t| status(client, t, act))).await;
        if states.iter().filter(|s| s["state"] == "admitted").count() == n {
            return states;
        }
        assert!(tokio::time::Instant::now() < deadline, "not {n} admitted: {states:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `tokens` (three fans) joined `act`, a lottery of two codes with passes
/// of 5 s; the sale is paused (`reload(true)`) once two hold passes, past
/// their expiry, and resumed (`reload(false)`): the winners keep their
/// passes, with the paused time back, and buy; the third is never admitted.
async fn pause_and_resume(clients: &[Arc<ApiClient>], tokens: &[String], act: &str, reload: &dyn Fn(bool)) {
    let on = |i: usize| &*clients[i % clients.len()];
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(join(on(i), t, act).await.status, 200);
    }
    let before = until_admitted(on(0), tokens, act, 2).await;
    reload(true);
    let winners: Vec<usize> = (0..3).filter(|&i| before[i]["state"] == "admitted").collect();
    let loser = (0..3).find(|i| !winners.contains(i)).unwrap();
    assert_error(
        &claim_with(on(1), &tokens[winners[0]], act, before[winners[0]]["pass"].as_str()).await,
        409,
        "PAUSED",
    );
    // Past both passes' expiry, by the server's clock, while paused.
    let expiry = winners
        .iter()
        .map(|&i| ms(before[i]["passExpiresAt"].as_str().unwrap()))
        .max()
        .unwrap();
    let server_time = || async {
        let d = on(0).get(&format!("/act/detail?actId={act}"), None).await.unwrap();
        ms(d.data()["serverTime"].as_str().unwrap())
    };
    while server_time().await <= expiry + 500 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (n, &i) in winners.iter().enumerate() {
        assert_eq!(status(on(n), &tokens[i], act).await["state"], "admitted");
    }
    assert_eq!(status(on(1), &tokens[loser], act).await["state"], "waiting");

    reload(false);
    for (n, &i) in winners.iter().enumerate() {
        let was = ms(before[i]["passExpiresAt"].as_str().unwrap());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let now = loop {
            let s = status(on(n), &tokens[i], act).await;
            if s["passExpiresAt"].as_str().is_some_and(|x| ms(x) > expiry) {
                break s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no pass given its time back: {s}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(now["state"], "admitted", "{now}");
        assert!(ms(now["passExpiresAt"].as_str().unwrap()) > was);
        // (In a cluster the code may sit in the other node's lease a moment.)
        let res = claim_retrying(on(n + 1), &tokens[i], act, now["pass"].as_str()).await;
        assert_eq!(res.status, 200, "{}", res.body);
    }
    eventually(on(0), &tokens[loser], act, "sold_out").await;
}

/// Each kind of event in a room's log, counted.
fn kinds(events: &[Value]) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for e in events {
        *kinds.entry(e["k"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    kinds
}

/// An organiser pausing a sale (`paused = true`, the README's way to stop
/// one) paused the claims but not the room: the winners' passes ran out
/// while they could not use them, so they were passed over (a lottery
/// takes no one back) and the next drawn took their codes. A pause now
/// holds every place and pass, and on resume the passes get the paused
/// time back, in the room's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_sale_holds_the_room_and_gives_passes_their_time_back() {
    let config = |paused: bool| {
        let mut act = Act::new("pz")
            .window("+4s", "+1h")
            .with("admission = \"lottery\"")
            .with("queue_opens = \"-1m\"")
            .with("draw_time = \"+3s\"")
            .with("pass_ttl = \"5s\"")
            .with("grace = \"1h\"");
        if paused {
            act = act.with("paused = true");
        }
        base_config() + &act.ticket("pz-t", "Ticket", Codes::Generate(2)).toml()
    };
    let app = TestApp::start(&config(false));
    let tokens = app.users("pz", 3).await;
    pause_and_resume(&[app.client_clone()], &tokens, "pz", &|paused| {
        let applied = app.reload(&config(paused));
        assert_eq!(applied["message"], "Config reloaded.", "{applied}");
    })
    .await;
    let kinds = kinds(&room_log(&app, "pz"));
    assert_eq!(
        (
            kinds.get("pause"),
            kinds.get("resume"),
            kinds.get("extend"),
            kinds.get("skip")
        ),
        (Some(&1), Some(&1), Some(&2), None),
        "{kinds:?}"
    );
    app.assert_verified();
}

/// The same across two nodes sharing the room: the pause, the resume and
/// the extended passes go through the shared log once, and the extended
/// pass is what Redis holds for the fan.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn across_nodes_a_paused_sale_holds_the_room() {
    let act = |t0| lottery_from(t0, "pc", 2, 3_000, 4_000, &["pass_ttl = \"5s\"", "grace = \"1h\""]);
    let (cluster, tokens) = cluster_then_open(2, act, "", "pc", 3).await;
    pause_and_resume(&cluster.clients(), &tokens, "pc", &|paused| {
        for node in &cluster.nodes {
            reload_lottery_paused(node, paused);
        }
    })
    .await;
    let log = cluster.services.lrange("q:{pc}:log").await;
    let events: Vec<Value> = log.iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let kinds = kinds(&events);
    assert_eq!(
        (
            kinds.get("pause"),
            kinds.get("resume"),
            kinds.get("extend"),
            kinds.get("skip")
        ),
        (Some(&1), Some(&1), Some(&2), None),
        "{kinds:?}"
    );
    let places: std::collections::HashMap<String, String> =
        cluster.services.query(redis::cmd("HGETALL").arg("q:{pc}:places")).await;
    for e in events.iter().filter(|e| e["k"] == "extend") {
        assert_eq!(places[&e["u"].to_string()], format!("a:{}", e["x"]), "{places:?}");
    }
}

/// Reloads `node` with its lottery activity paused, or no longer paused.
fn reload_lottery_paused(node: &TestApp, paused: bool) {
    let config = std::fs::read_to_string(node.config_path()).unwrap();
    let changed = if paused {
        config.replace("admission = \"lottery\"\n", "admission = \"lottery\"\npaused = true\n")
    } else {
        config.replace("paused = true\n", "")
    };
    assert_ne!(changed, config);
    let applied = node.reload(&changed);
    assert_eq!(applied["message"], "Config reloaded.", "{applied}");
}

/// Waits until the shared log of `act`'s room has an event of `kind`.
async fn until_logged(services: &services::Services, act: &str, kind: &str) {
    let (key, event) = (format!("q:{{{act}}}:log"), format!("\"k\":\"{kind}\""));
    crate::common::until(&format!("a {kind} in the room's log"), || async {
        services.lrange(&key).await.iter().any(|e| e.contains(&event))
    })
    .await;
}

/// An organiser's `paused = false` reached the claims with the reload, but
/// the room only at the admitter's next step, which logs the resume and
/// gives the passes running at the pause their paused time back. A claim
/// in between, with a pass that lapsed during the pause, was refused
/// QUEUE_PASS_EXPIRED ("your turn went to the next in line"), as if the
/// fan had let it run out. In a cluster that step can be a lease's length
/// away: here the admitter's lease is with a node that is gone (a test's
/// value in Redis), so the room's log stays paused after the reload. The
/// claim is now answered PAUSED until the log resumes, and once a node
/// takes the lease and resumes, the pass has its time back and buys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_waits_for_the_rooms_resume_not_only_the_configs() {
    let act = |t0| lottery_from(t0, "pr", 1, 3_000, 4_000, &["pass_ttl = \"5s\"", "grace = \"1h\""]);
    let (cluster, tokens) = cluster_then_open(1, act, "", "pr", 1).await;
    let clients = cluster.clients();
    let (node, client, fan) = (&cluster.nodes[0], &*clients[0], &tokens[0]);
    let reload = |paused: bool| reload_lottery_paused(node, paused);
    assert_eq!(join(client, fan, "pr").await.status, 200);
    let before = until_admitted(client, std::slice::from_ref(fan), "pr", 1)
        .await
        .remove(0);
    let (pass, expiry) = (
        before["pass"].as_str().unwrap(),
        ms(before["passExpiresAt"].as_str().unwrap()),
    );

    reload(true);
    until_logged(&cluster.services, "pr", "pause").await;
    while cluster.services.query::<Vec<i64>>(&redis::cmd("TIME")).await[0] * 1_000 <= expiry + 500 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The admitter's lease goes to a node that is gone; nothing more is
    // appended to the room's log until it lapses (here, until deleted).
    let lease = "q:{pr}:admitter";
    let () = cluster
        .services
        .query(redis::cmd("SET").arg(lease).arg("a-node-gone").arg("PX").arg(600_000))
        .await;
    reload(false);
    assert_error(&claim_with(client, fan, "pr", Some(pass)).await, 409, "PAUSED");
    assert_eq!(status(client, fan, "pr").await["state"], "admitted");
    let log = cluster.services.lrange("q:{pr}:log").await;
    assert!(!log.iter().any(|e| e.contains("\"k\":\"resume\"")), "{log:?}");

    let () = cluster.services.query(redis::cmd("DEL").arg(lease)).await;
    until_logged(&cluster.services, "pr", "resume").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let now = loop {
        let s = status(client, fan, "pr").await;
        if s["passExpiresAt"].as_str().is_some_and(|x| ms(x) > expiry) {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pass given its time back: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let res = claim_retrying(client, fan, "pr", now["pass"].as_str()).await;
    assert_eq!(res.status, 200, "{}", res.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_wait_estimate_is_honest_at_a_steady_rate() {
    const N: usize = 240;
    let app = TestApp::start(&(base_config() + &queue("eta", 5000, "+7s", &["admit_rate = 40.0", "grace = \"1m\""])));
    let tokens = app.users("e", N).await;
    for t in &tokens {
        join_through_the_draw(&app.client, t, "eta").await;
    }
    // Everybody stays (status every second) until admitted; after three
    // seconds of admissions each fan's estimate is recorded once.
    let fans: Vec<_> = tokens
        .iter()
        .cloned()
        .map(|t| {
            let client = app.client_clone();
            tokio::spawn(async move {
                let mut estimate = None;
                loop {
                    let s = status(&client, &t, "eta").await;
                    let now = ms(s["serverTime"].as_str().unwrap());
                    match s["state"].as_str().unwrap() {
                        "admitted" => return (estimate, ms(s["admittedAt"].as_str().unwrap())),
                        "waiting" => {
                            if estimate.is_none() && s["admitted"].as_u64().unwrap() >= 80 {
                                estimate = Some((s["position"].as_u64().unwrap(), now, s["etaMs"].as_i64().unwrap()));
                            }
                        }
                        other => panic!("{other}: {s}"),
                    }
                    tokio::time::sleep(Duration::from_millis(1000)).await;
                }
            })
        })
        .collect();
    let mut samples = Vec::new();
    for f in fans {
        if let (Some((position, at, eta)), admitted) = f.await.unwrap() {
            samples.push((position, eta, admitted - at));
        }
    }
    samples.sort();
    assert!(samples.len() > 100, "{} estimates", samples.len());
    let (position, eta, actual) = samples[samples.len() / 2];
    let error = (eta - actual).abs() as f64 / actual as f64;
    assert!(
        error <= 0.2,
        "at the median position ({position}) the estimate was {eta} ms, the wait {actual} ms: {:.0}% off",
        error * 100.0
    );
}

/// An open `/queue/events` stream: its events as they come, with arrival times.
struct Events {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Events {
    async fn open(app: &TestApp, token: &str, act: &str) -> Events {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(&app.addr).await.unwrap();
        let req = format!("GET /queue/events?actId={act} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        Events {
            stream,
            buf: Vec::new(),
        }
    }

    /// The next event's data, or `None` when the stream ended.
    async fn next(&mut self) -> Option<Value> {
        loop {
            let text = String::from_utf8_lossy(&self.buf).into_owned();
            if let Some(at) = text.find("data: ") {
                let end = at + text[at..].find('\n').unwrap_or(text.len() - at);
                if end < text.len() {
                    let data = serde_json::from_str(&text[at + 6..end]).unwrap();
                    self.buf.drain(..end);
                    return Some(data);
                }
            }
            if text.contains("\r\n0\r\n\r\n") || self.read_more().await == 0 {
                return None;
            }
        }
    }

    /// Reads until what was received holds `marker`.
    async fn read_until(&mut self, marker: &str) {
        while !String::from_utf8_lossy(&self.buf).contains(marker) {
            assert!(self.read_more().await > 0, "the stream ended before {marker:?}");
        }
    }

    /// Reads what has arrived (waiting up to 30 s) into the buffer; 0 at the end.
    async fn read_more(&mut self) -> usize {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut chunk))
            .await
            .expect("more of the stream within 30 s")
            .unwrap();
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_event_stream_keeps_the_place_and_tells_each_change() {
    let app =
        TestApp::start(&(base_config() + &queue("sse", 1, &in_secs(8), &["grace = \"3s\"", "pass_ttl = \"1m\""])));
    let tokens = app.users("v", 2).await;
    let (present, late) = (&tokens[0], &tokens[1]);
    assert_eq!(join(&app.client, present, "sse").await.status, 200);
    let head = app.raw_get("/queue/events?actId=sse").await;
    assert!(head.starts_with("HTTP/1.1 401"), "a stream needs a login: {head}");

    // The fan only keeps a stream open, for longer than the grace before
    // the start: the stream is what keeps the place.
    let mut events = Events::open(&app, present, "sse").await;
    let first = events.next().await.unwrap();
    assert_eq!(first["state"], "waiting");
    let mut seen = vec![(std::time::Instant::now(), first)];
    let admitted = loop {
        let e = events.next().await.expect("the stream stays open");
        seen.push((std::time::Instant::now(), e.clone()));
        if e["state"] == "admitted" {
            break e;
        }
        assert_eq!(e["state"], "waiting", "{e}");
    };
    // Updates that are not a change of state come a second apart at most.
    for w in seen.windows(2) {
        if w[0].1["state"] == w[1].1["state"] {
            assert!(
                w[1].0 - w[0].0 >= Duration::from_millis(900),
                "two updates within a second"
            );
        }
    }
    assert_eq!(
        admitted["pass"],
        Value::Null,
        "the pass is fetched from /queue/status, not streamed"
    );
    let turn = ms(admitted["admittedAt"].as_str().unwrap()) - ms(admitted["joinedAt"].as_str().unwrap());
    assert!(
        turn > 3000,
        "the place was kept {turn} ms, longer than the grace, by the stream alone"
    );
    // A later fan queues behind, on standby: the only code is spoken for.
    assert_eq!(join(&app.client, late, "sse").await.status, 200);
    let mut late_events = Events::open(&app, late, "sse").await;
    let waiting = late_events.next().await.unwrap();
    assert_eq!(
        (&waiting["state"], &waiting["standby"]),
        (&json!("waiting"), &json!(true)),
        "{waiting}"
    );
    let pass = status(&app.client, present, "sse").await["pass"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(claim_with(&app.client, present, "sse", Some(&pass)).await.status, 200);
    // The room closes: the waiting fan's stream says so at once and ends.
    assert_eq!(late_events.next().await.unwrap()["state"], "sold_out");
    assert!(
        late_events.next().await.is_none(),
        "the stream ends when the room closes"
    );
}

/// An open event stream checked its session once, when it opened: after
/// a logout (or past the session's expiry), or once the organiser blocked
/// the account, it went on keeping the fan's place and telling it, for as
/// long as the room lasted (a blocked farm's accounts were admitted, their
/// passes holding codes they could not claim). It now ends then; the page
/// asks `/queue/status`, which says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_ends_with_its_session_or_a_block() {
    let config = base_config() + &queue("sl", 1, "+30m", &[]);
    let app = TestApp::start(&config);
    let tokens = app.users("sl", 2).await;
    let mut streams = Vec::new();
    for t in &tokens {
        assert_eq!(join(&app.client, t, "sl").await.status, 200);
        let mut events = Events::open(&app, t, "sl").await;
        assert_eq!(events.next().await.unwrap()["state"], "waiting");
        streams.push(events);
    }
    let out = app
        .client
        .post("/user/logout", Some(&tokens[0]), &json!({}))
        .await
        .unwrap();
    assert_eq!(out.status, 200, "{}", out.body);
    let blocked = format!("blocked_users = [\"{}\"]\n", crate::common::username("sl", 1));
    let applied = app.reload(&config.replace("[security]\n", &format!("[security]\n{blocked}")));
    assert_eq!(applied["message"], "Config reloaded.", "{applied}");
    for (i, events) in streams.iter_mut().enumerate() {
        // (An update sent before the logout or the block may come first.)
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(update) = events.next().await {
                assert_eq!(update["state"], "waiting", "{update}");
            }
        })
        .await;
        assert!(ended.is_ok(), "stream {i} went on");
    }
}

/// Sends `head` in `pieces` writes (each flushed before the next) and reads
/// the answer to its end.
async fn send_head(app: &TestApp, pieces: &[&[u8]]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(&app.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    for piece in pieces {
        stream.write_all(piece).await.unwrap();
        stream.flush().await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut out))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The status line of an event stream's answer.
async fn stream_status(events: &mut Events) -> String {
    events.read_until("\r\n\r\n").await;
    let head = String::from_utf8_lossy(&events.buf).into_owned();
    head.lines().next().unwrap_or_default().to_owned()
}

/// One account could open event streams (each costs a token of the
/// address's bucket, nothing more) until the node's connections — one
/// budget for every fan and the admin API — were all its own. An account
/// now holds at most four at once: a fifth is `429 TOO_MANY_STREAMS`, other
/// accounts are not affected, and a stream closed gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_account_holds_a_few_event_streams_not_the_nodes_connections() {
    let app = TestApp::start(&(base_config() + &queue("ms", 1, "+30m", &[])));
    let tokens = app.users("ms", 2).await;
    for t in &tokens {
        assert_eq!(join(&app.client, t, "ms").await.status, 200);
    }
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut events = Events::open(&app, &tokens[0], "ms").await;
        assert_eq!(events.next().await.unwrap()["state"], "waiting");
        open.push(events);
    }
    let fifth = send_head(
        &app,
        &[format!(
            "GET /queue/events?actId=ms HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\r\n",
            tokens[0]
        )
        .as_bytes()],
    )
    .await;
    assert!(fifth.starts_with("HTTP/1.1 429"), "{fifth}");
    assert!(
        fifth.contains(r#"{"ok":false,"error":{"code":"TOO_MANY_STREAMS""#),
        "{fifth}"
    );
    let mut other = Events::open(&app, &tokens[1], "ms").await;
    assert_eq!(other.next().await.unwrap()["state"], "waiting");

    let mut closed = open.pop().unwrap();
    closed.read_until("\n\n\r\n").await;
    drop(closed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = Events::open(&app, &tokens[0], "ms").await;
        let status = stream_status(&mut again).await;
        if status.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(status.starts_with("HTTP/1.1 429"), "{status}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed stream's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waiting fans' event streams, each open for the whole wait, counted
/// against `server.max_connections`: once they filled it, the node closed
/// every new connection unanswered, the claims of admitted fans included
/// (from a review). Streams now have a budget of their own, and past it a
/// stream is refused with the JSON shape, not the claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_fans_streams_leave_the_connections_claims_need() {
    let app = TestApp::start(
        &(base_config().replace("[server]", "[server]\nmax_connections = 8")
            + &queue("wf", 1, "+30m", &[])
            + &open_activity("wc", 5, 1)),
    );
    let tokens = app.users("wf", 3).await;
    for t in &tokens {
        assert_eq!(join(&app.client, t, "wf").await.status, 200);
    }
    // Eight streams, the whole budget: the same number caps the other
    // connections, which leaves this test's idle ones, the refused ninth
    // while it closes and the claims' own more than enough room.
    let mut open = Vec::new();
    for t in &tokens[..2] {
        for _ in 0..4 {
            let mut events = Events::open(&app, t, "wf").await;
            assert_eq!(events.next().await.unwrap()["state"], "waiting");
            open.push(events);
        }
    }
    let ninth = send_head(
        &app,
        &[format!(
            "GET /queue/events?actId=wf HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\r\n",
            tokens[2]
        )
        .as_bytes()],
    )
    .await;
    assert!(ninth.starts_with("HTTP/1.1 503"), "{ninth}");
    assert!(
        ninth.contains(r#"{"ok":false,"error":{"code":"STREAMS_FULL""#),
        "{ninth}"
    );
    // New connections are still served while every stream stays open (a
    // client of its own: none of the suite client's pooled connections).
    let fresh = ApiClient::new(vec![app.url()], 1).unwrap();
    for t in &tokens {
        let body = claim_body(&fresh, t, "wc").await;
        let res = fresh.post("/ticket/get", Some(t), &body).await.unwrap();
        assert_eq!(res.status, 200, "{}", res.body);
    }
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_streams_answer_bad_heads_and_let_go_of_fans_who_leave() {
    let app = TestApp::start(&(base_config() + &queue("lv", 1, "+30m", &[])));
    let token = app.users("lv", 1).await.remove(0);
    assert_eq!(join(&app.client, &token, "lv").await.status, 200);

    // A malformed head and an oversized one get the JSON error shape.
    let bad = send_head(&app, &[b"GET /queue/events?actId=lv HTTP/1.1\r\nBad Header: x\r\n\r\n"]).await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    assert!(bad.contains(r#"{"ok":false,"error":{"code":"BAD_REQUEST""#), "{bad}");
    let cookie = format!("Cookie: c={}\r\n", "x".repeat(70_000));
    let big = format!("GET /queue/events?actId=lv HTTP/1.1\r\nHost: t\r\n{cookie}\r\n");
    let big = send_head(&app, &[big.as_bytes()]).await;
    assert!(big.starts_with("HTTP/1.1 431"), "{big}");
    assert!(big.contains(r#""code":"HEADERS_TOO_LARGE""#), "{big}");
    // A request line past the cap is a URI too long (it was 431, the
    // head's); the cap is the other routes' 64 KiB (it was 16: a 17 KB URL
    // broke only the stream).
    let fits = format!(
        "GET /queue/events?actId={} HTTP/1.1\r\nHost: t\r\n\r\n",
        "l".repeat(20_000)
    );
    let fits = send_head(&app, &[fits.as_bytes()]).await;
    assert!(fits.starts_with("HTTP/1.1 401"), "{fits}");
    let long = format!(
        "GET /queue/events?actId={} HTTP/1.1\r\nHost: t\r\n\r\n",
        "l".repeat(70_000)
    );
    let long = send_head(&app, &[long.as_bytes()]).await;
    assert!(long.starts_with("HTTP/1.1 414"), "{long}");
    assert!(long.contains(r#""code":"URI_TOO_LONG""#), "{long}");

    // A request line that arrives in pieces is still answered (by hyper).
    let head = format!("ts?actId=lv HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n");
    let mut split = tokio::net::TcpStream::connect(&app.addr).await.unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        split.set_nodelay(true).unwrap();
        split.write_all(b"GET /queue/even").await.unwrap();
        split.flush().await.unwrap();
        split.write_all(head.as_bytes()).await.unwrap();
        let mut first = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(30), split.read(&mut first))
            .await
            .expect("a first event within 30 s")
            .unwrap();
        let text = String::from_utf8_lossy(&first[..n]);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
    drop(split);

    // A fan who closes the stream is let go at once, though nothing is
    // written to them for a while (the room does not open for half an
    // hour): the node closes its side as soon as the fan closes theirs —
    // the fan's socket then goes from FIN_WAIT2 to TIME_WAIT — instead of
    // holding the connection until a write fails.
    let mut events = Events::open(&app, &token, "lv").await;
    assert_eq!(events.next().await.unwrap()["state"], "waiting");
    let port = events.stream.local_addr().unwrap().port();
    let node_port = events.stream.peer_addr().unwrap().port();
    // Take the rest of the first chunk, so that closing sends a FIN (a
    // socket closed with unread data sends a reset, and is gone at once).
    events.read_until("\n\n\r\n").await;
    drop(events);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = tcp_state(port, node_port);
        if state == Some(TCP_TIME_WAIT) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node still holds the stream the fan closed (TCP state {state:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const TCP_TIME_WAIT: u8 = 0x06;

/// The state (as in `/proc/net/tcp`) of this host's IPv4 socket bound to
/// local `port`.
/// The TCP state of the socket from local port `port` to remote port
/// `remote`. (Both: a test running beside this one may hold another
/// connection from the same local port, to another server; matched on the
/// local port alone, it was read as this one's state once.)
fn tcp_state(port: u16, remote: u16) -> Option<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port_of = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    table.lines().skip(1).find_map(|line| {
        let mut cols = line.split_whitespace().skip(1);
        let (local, peer, state) = (cols.next()?, cols.next()?, cols.next()?);
        (port_of(local) == Some(port) && port_of(peer) == Some(remote)).then(|| u8::from_str_radix(state, 16).ok())?
    })
}

#[test]
fn check_config_explains_admission_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let bad = Act::new("bad")
        .window("+1h", "+2h")
        .with("admission = \"queue\"")
        .with("pass_ttl = \"1s\"")
        .with("admit_rate = 0.0")
        .ticket("bad-t", "T", Codes::Generate(1))
        .toml()
        + &Act::new("late")
            .window("+1h", "+2h")
            .with("admission = \"lottery\"")
            .with("queue_opens = \"+3h\"")
            .with("draw_time = \"+90m\"")
            .ticket("late-t", "T", Codes::Generate(1))
            .toml()
        + &Act::new("race")
            .with("draw_time = \"+1h\"")
            .ticket("race-t", "T", Codes::Generate(1))
            .toml();
    std::fs::write(dir.path().join("config.toml"), base_config() + &bad).unwrap();
    let out = run_cli(dir.path(), &["check-config"], None);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "admission = \"queue\" needs queue_opens",
        "pass_ttl must be 5s-24h",
        "admit_rate must be 0.1-1000000",
        "queue_opens must be before start_time",
        "draw_time must not be after start_time",
        "draw_time needs admission = \"queue\" or \"lottery\"",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
}

/// A waiting room's key set where it does nothing (`admit_rate` on a
/// lottery, a room's keys on a race: an organiser who switched the bundled
/// queue to a lottery, or commented out `admission`) is said by
/// `check-config`, at start and at a reload that applies, and refused by
/// none: a config an earlier version ran still starts. Nothing said it.
#[tokio::test]
async fn keys_a_waiting_room_ignores_are_said_not_refused() {
    const IGNORED: &str = "The config sets a key that has no effect.";
    let lottery = Act::new("lot")
        .window("+1h", "+2h")
        .with("admission = \"lottery\"")
        .with("queue_opens = \"+10m\"")
        .with("admit_rate = 20.0")
        .ticket("lot-t", "T", Codes::Generate(1))
        .toml();
    let race = |room_keys: bool| {
        let act = Act::new("race").window("+1h", "+2h");
        let act = match room_keys {
            true => act.with("pass_ttl = \"2m\"").with("queue_capacity = 1000"),
            false => act,
        };
        act.ticket("race-t", "T", Codes::Generate(1)).toml()
    };
    let dir = tempfile::tempdir().unwrap();
    // Said beside the problems too (here, an activity with no ticket type).
    let broken = base_config() + &lottery + &Act::new("bad").with("grace = \"1m\"").toml();
    std::fs::write(dir.path().join("config.toml"), broken).unwrap();
    let out = run_cli(dir.path(), &["check-config"], None);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("activity `lot`: admit_rate has no effect"), "{stdout}");
    assert!(stdout.contains("activity `bad`: grace has no effect"), "{stdout}");

    std::fs::write(dir.path().join("config.toml"), base_config() + &lottery + &race(true)).unwrap();
    let out = run_cli(dir.path(), &["check-config"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said: Vec<&str> = stdout.lines().filter(|l| l.starts_with("warning: line ")).collect();
    assert_eq!(said.len(), 3, "{stdout}");
    for expected in [
        "activity `lot`: admit_rate has no effect with admission = \"lottery\"",
        "activity `race`: pass_ttl has no effect with admission = \"race\"",
        "activity `race`: queue_capacity has no effect with admission = \"race\"",
    ] {
        assert!(
            said.iter().any(|l| l.contains(expected)),
            "missing `{expected}` in:\n{stdout}"
        );
    }

    // `import` says them too: a cluster's nodes serving what it stores
    // never read the file.
    let out = run_cli(dir.path(), &["import"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("warning: line ")).count(),
        3,
        "{stderr}"
    );
    // An activity written as an inline table is read alike.
    let inline = "activity = [{ id = \"inl\", name = \"I\", start_time = \"+1h\", end_time = \"+2h\", \
                  grace = \"1m\", ticket = [{ id = \"inl-t\", name = \"T\", generate = 1 }] }]\n";
    std::fs::write(dir.path().join("config.toml"), inline.to_owned() + &base_config()).unwrap();
    let out = run_cli(dir.path(), &["check-config"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("warning: line 1: activity `inl`: grace has no effect with admission = \"race\""),
        "{stdout}"
    );

    // A queue paced by its admit_rate, and a race with no room's keys: nothing to say.
    let quiet = base_config() + &queue("q", 1, "+10m", &["admit_rate = 20.0"]) + &race(false);
    std::fs::write(dir.path().join("config.toml"), &quiet).unwrap();
    let out = run_cli(dir.path(), &["check-config"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("warning"));

    let app = TestApp::start(&(base_config() + &lottery + &race(false)));
    let logged = app.wait_for_log(IGNORED, 1);
    assert!(
        logged["warning"]
            .as_str()
            .unwrap()
            .contains("activity `lot`: admit_rate has no effect"),
        "{logged}"
    );
    assert_eq!(app.count_logs(IGNORED), 1);
    let applied = app.reload(&(base_config() + &lottery + &race(true)));
    assert_eq!(applied["message"], "Config reloaded.", "{applied}");
    assert_eq!(app.count_logs(IGNORED), 4, "the lottery's, and the race's two");
}

#[tokio::test]
async fn a_reload_moves_a_queue_before_it_opens_and_never_after() {
    let config = |open_start: &str, open_ttl: &str, later_start: &str, later_queue: bool| {
        let mut later = Act::new("later").window(later_start, "+3h");
        if later_queue {
            later = later.with("admission = \"queue\"").with("queue_opens = \"+3s\"");
        }
        base_config()
            + &queue("open", 10, open_start, &[&format!("pass_ttl = \"{open_ttl}\"")])
            + &later.ticket("later-t", "T", Codes::Generate(10)).toml()
    };
    let app = TestApp::start(&config("+50m", "2m", "+1h", true));
    let (open_start, later_start) = (
        app.detail("open").await["startTime"].clone(),
        app.detail("later").await["startTime"].clone(),
    );
    let ttl = |d: &Value| d["queue"]["passTtlMs"].as_i64().unwrap();
    let applied = app.reload(&config("+50m", "2m", "+2h", true));
    assert_eq!(applied["message"], "Config reloaded.", "{applied}");
    assert_ne!(
        app.detail("later").await["startTime"],
        later_start,
        "not open yet: it may move"
    );
    // A refused reload changes no room, not even what it may change.
    let refused = app.reload(&config("+55m", "5m", "+2h", true));
    assert!(
        refused["reason"].as_str().unwrap().contains(&format!(
            "`open`: start_time (running: {}) cannot change once its queue has opened",
            open_start.as_str().unwrap()
        )),
        "{refused}"
    );
    let open = app.detail("open").await;
    assert_eq!((&open["startTime"], ttl(&open)), (&open_start, 120_000));
    // What may change after the opening applies.
    let applied = app.reload(&config("+50m", "5m", "+2h", true));
    assert_eq!(applied["message"], "Config reloaded.", "{applied}");
    assert_eq!(ttl(&app.detail("open").await), 300_000);
    // Nor the codes one pass claims: the room counts its passes, and a fan
    // it has marked done, by it. (Raised, a done fan's unexpired pass
    // claimed again a code the room had promised to the next in line.)
    let raised = config("+50m", "5m", "+2h", true).replacen("per_user_limit = 1", "per_user_limit = 2", 1);
    let refused = app.reload(&raised);
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("`open`: per_user_limit (running: 1) cannot change once its queue has opened"),
        "{refused}"
    );
    // A queue switched back to a race before it opened is a race for good:
    // reloads after its old opening time are not refused for it.
    let opens = ms(app.detail("later").await["queue"]["opensAt"].as_str().unwrap());
    let applied = app.reload(&config("+50m", "5m", "+2h", false));
    assert_eq!(applied["message"], "Config reloaded.", "{applied}");
    assert_eq!(app.detail("later").await["admission"], "race");
    // Past the old opening moment, by the server's clock.
    while ms(app.detail("later").await["serverTime"].as_str().unwrap()) <= opens {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let applied = app.reload(&config("+50m", "5m", "+2h", false));
    assert_eq!(applied["message"], "Config reloaded.", "{applied}");
}

/// A fan's event stream is one request per connection, and the node reads
/// what the client sends after it only to see it leave. A client that kept
/// sending held the lane in that read (the socket was readable every time
/// it looked): every connection on the lane stalled, and the watchdog's
/// probe with them. Now the node reads a buffer at a time within its task
/// budget, and ends the stream of a client that sent more than 16 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_keeps_sending_is_ended() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app =
        TestApp::start(&(base_config().replace("[server]", "[server]\nthreads = 1") + &queue("fl", 1, "+30m", &[])));
    let token = app.register("flood").await;
    assert_eq!(join(&app.client, &token, "fl").await.status, 200);
    let (mut stream, _) = crate::common::open_event_stream(&app.addr, &token, "fl").await;
    // 64 KiB after the request; the node may close before it has them all.
    let _ = stream.write_all(&vec![0u8; 64 * 1024]).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the node kept the stream open");
    // The lane serves others.
    assert_eq!(app.client.get("/healthz", None).await.unwrap().status, 200);
}

/// A fan on several nodes: the next one when a node does not answer.
async fn on_any<F, Fut, T>(clients: &[Arc<ApiClient>], first: usize, call: F) -> T
where
    F: Fn(Arc<ApiClient>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    for k in 0..clients.len() * 20 {
        if let Ok(answer) = call(clients[(first + k) % clients.len()].clone()).await {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no node answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_share_one_room_and_a_killed_node_loses_no_place_or_pass() {
    const USERS: usize = 900;
    const CODES: usize = 300;
    let act = |t0| {
        room_from(
            t0,
            "cq",
            "queue",
            CODES as u32,
            12_000,
            &["admit_rate = 150.0", "grace = \"1m\"", "pass_ttl = \"1m\""],
        )
    };
    let (mut cluster, tokens) = cluster_then_open(3, act, "[cluster]\nlease_ttl = \"2s\"\n", "c", USERS).await;
    let clients = cluster.clients();
    let commitment = cluster.nodes[1].detail("cq").await["queue"]["commitment"].clone();
    assert_eq!(
        cluster.nodes[2].detail("cq").await["queue"]["commitment"],
        commitment,
        "one seed"
    );
    // Fan i joins through node i % 3, and again through the next node: one place.
    let sem = Arc::new(tokio::sync::Semaphore::new(48));
    let joins: Vec<_> = tokens
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, t)| {
            let (clients, sem) = (clients.clone(), sem.clone());
            tokio::spawn(async move {
                let _p = sem.acquire().await.unwrap();
                let a = join(&clients[i % 3], &t, "cq").await;
                assert_eq!(a.status, 200, "{}", a.body);
                let b = join(&clients[(i + 1) % 3], &t, "cq").await;
                assert_eq!(
                    b.data()["joinedAt"],
                    a.data()["joinedAt"],
                    "joining twice keeps the place"
                );
            })
        })
        .collect();
    for j in joins {
        j.await.unwrap();
    }
    // Every fan waits on one node and claims through another; node2 dies mid-queue.
    let fans: Vec<_> = tokens
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, t)| {
            let clients = clients.clone();
            tokio::spawn(async move {
                loop {
                    let s = on_any(&clients, i + 1, |c| {
                        let t = t.clone();
                        async move {
                            let res = c.get("/queue/status?actId=cq", Some(&t)).await?;
                            anyhow::ensure!(res.status == 200, "{}", res.body);
                            Ok(res.data().clone())
                        }
                    })
                    .await;
                    match s["state"].as_str().unwrap() {
                        "waiting" => tokio::time::sleep(Duration::from_millis(1000)).await,
                        "admitted" => {
                            let pass = s["pass"].as_str().unwrap().to_owned();
                            let res = on_any(&clients, i + 2, |c| {
                                let (t, pass) = (t.clone(), pass.clone());
                                async move { claim_with_result(&c, &t, "cq", &pass).await }
                            })
                            .await;
                            // 409 LIMIT_REACHED: the claim went through on a node
                            // that died before it could answer; the retry shows the code.
                            let held = res.status == 200 || res.error_code() == Some("LIMIT_REACHED");
                            assert!(held, "an admitted fan's claim: {}", res.body);
                            return true;
                        }
                        "sold_out" => return false,
                        other => panic!("{other}: {s}"),
                    }
                }
            })
        })
        .collect();
    let success = "ticketd_claims_total{outcome=\"success\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let sold = metric(&cluster.nodes[0], success).await
            + metric(&cluster.nodes[1], success).await
            + metric(&cluster.nodes[2], success).await;
        if sold >= 60.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the queue never got going");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.nodes[2].kill9();
    let mut claimed = 0;
    for f in fans {
        claimed += usize::from(f.await.unwrap());
    }
    assert_eq!(claimed, CODES, "every code went to an admitted fan");
    let stored = cluster.drained("cq").await;
    assert_eq!(stored.len(), CODES);
    // The shared log: one shuffle, nobody admitted twice, no pass beyond the stock.
    let out = cluster.nodes[0].cli(
        &["export", "--activity", "cq", "--what", "draw", "--out", "draw.json"],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let draw: Value =
        serde_json::from_slice(&std::fs::read(cluster.nodes[0].dir.path().join("draw.json")).unwrap()).unwrap();
    assert_eq!(draw["commitment"], commitment);
    assert_eq!(
        draw["order"].as_array().unwrap().len() + draw["late"].as_array().unwrap().len(),
        USERS,
        "every place kept: one per fan"
    );
    let out = cluster.nodes[0].cli(&["verify-draw", "draw.json"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = cluster.services.lrange("q:{cq}:log").await;
    let log: Vec<Value> = log.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        log.iter().filter(|e| e["k"] == "shuffle").count(),
        1,
        "the shuffle happened once"
    );
    let admitted: Vec<u64> = log
        .iter()
        .filter(|e| e["k"] == "admit")
        .map(|e| e["u"].as_u64().unwrap())
        .collect();
    let distinct: std::collections::HashSet<_> = admitted.iter().collect();
    assert_eq!(distinct.len(), admitted.len(), "nobody admitted twice");
    assert_eq!(admitted.len(), CODES, "no pass beyond the stock");
    cluster.nodes[0].assert_verified();
}

/// A claim with a pass, retried as a client does while the node answers
/// 503 (in a cluster a node may be fetching its lease of codes); 20 s at most.
async fn claim_retrying(client: &ApiClient, token: &str, act: &str, pass: Option<&str>) -> ApiResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let res = claim_with(client, token, act, pass).await;
        if res.status != 503 || tokio::time::Instant::now() >= deadline {
            return res;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn claim_with_result(client: &ApiClient, token: &str, act: &str, pass: &str) -> anyhow::Result<ApiResponse> {
    let res = client
        .post("/ticket/get", Some(token), &json!({ "actId": act, "claimToken": pass }))
        .await?;
    // A node that went away mid-claim: the next one answers (the claim is idempotent by the limit).
    anyhow::ensure!(res.status != 503, "{}", res.body);
    Ok(res)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_bench_drives_fans_through_the_room_and_weighs_their_streams() {
    let app =
        TestApp::start(&(base_config() + &queue("qb", 100, "+6s", &["admit_rate = 200.0", "pow_difficulty = 8"])));
    let report = bench_report(
        &app.url(),
        &[
            "--queue",
            "--activity",
            "qb",
            "--users",
            "300",
            "--concurrency",
            "32",
            "--create-users",
        ],
    );
    assert_eq!(report["join"]["requests"], 300, "{report}");
    assert_eq!(report["streams_open"], 300, "every fan waited on a stream: {report}");
    assert_eq!(
        report["outcomes"]["claimed"], 100,
        "the stock went to admitted fans: {report}"
    );
    assert_eq!(
        report["outcomes"]["sold_out"], 200,
        "the rest heard it was over: {report}"
    );
    assert_eq!(report["claim"]["requests"], 100);
    // The node's memory was read on both sides of the streams opening (a
    // few hundred light streams can sit within the allocator's noise, so
    // the difference itself may be zero).
    assert!(report["rss_before"].as_u64().is_some_and(|b| b > 0), "{report}");
    assert!(report["rss_with_streams"].as_u64().is_some_and(|b| b > 0), "{report}");
    assert!(report["bytes_per_waiting_user"].is_u64(), "{report}");
    assert_eq!(app.detail("qb").await["claimed"], 100);
}

/// Streams a node refuses are counted as such in the queue bench's
/// outcomes, and the run goes on without them. Here the node's budget of
/// streams (`server.max_connections`, 12) is held by three other
/// accounts' four each when the bench's fans open theirs: each hears 503
/// STREAMS_FULL. The bench read no event in that answer and reported "the
/// stream ended without a decision", after waiting a minute for the
/// streams to open.
///
/// The same number caps the node's other connections, the bench's and
/// this test's idle ones included: with a budget of 4, a refused stream
/// still being closed and two idle connections left the bench's second
/// stream over the cap, reset instead of answered (a CI run saw it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_bench_names_the_streams_a_node_refuses() {
    let config = base_config().replace(
        "shutdown_grace = \"5s\"\n",
        "shutdown_grace = \"5s\"\nmax_connections = 12\n",
    ) + &queue("qr", 2, "+30m", &[]);
    assert!(config.contains("max_connections = 12"), "{config}");
    let app = TestApp::start(&config);
    let mut held = Vec::new();
    for name in ["holder0", "holder1", "holder2"] {
        let holder = app.register(name).await;
        assert_eq!(join(&app.client, &holder, "qr").await.status, 200);
        for _ in 0..4 {
            let mut events = Events::open(&app, &holder, "qr").await;
            assert_eq!(events.next().await.unwrap()["state"], "waiting");
            held.push(events);
        }
    }
    let report = tokio::task::spawn_blocking({
        let url = app.url();
        move || {
            bench_report(
                &url,
                &[
                    "--queue",
                    "--activity",
                    "qr",
                    "--users",
                    "2",
                    "--concurrency",
                    "1",
                    "--create-users",
                ],
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(
        report["outcomes"],
        json!({ "stream error: the node refused the stream: 503 STREAMS_FULL": 2 }),
        "{report}"
    );
    assert_eq!(report["streams_open"], 0, "{report}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lottery_across_three_nodes_skips_the_gone_and_passes_lapsed_turns_on() {
    let act = |t0| lottery_from(t0, "cl", 2, 6_000, 8_000, &["pass_ttl = \"5s\"", "grace = \"3s\""]);
    let (cluster, tokens) = cluster_then_open(3, act, "", "x", 7).await;
    let outsider = tokens[6].clone();
    let clients = cluster.clients();
    for (i, t) in tokens[..6].iter().enumerate() {
        assert_eq!(join(&clients[i % 3], t, "cl").await.status, 200);
    }
    // Everybody checks in (through another node) until the draw gives places.
    let drawn = futures::future::join_all(tokens[..6].iter().enumerate().map(|(i, t)| {
        let client = clients[(i + 1) % 3].clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let s = status(&client, t, "cl").await;
                if let Some(p) = s["position"].as_u64() {
                    return (p, i);
                }
                assert!(tokio::time::Instant::now() < deadline, "never given a position: {s}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }))
    .await;
    let mut drawn = drawn;
    drawn.sort();
    assert_eq!(drawn.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    let fan = |place: usize| (&tokens[drawn[place].1], clients[(drawn[place].1 + 2) % 3].clone());
    assert_error(&join(&clients[2], &outsider, "cl").await, 409, "ENTRIES_CLOSED");

    // The first winner claims; the second lets the pass lapse; the third
    // has gone (checks in no more); the fourth, fifth and sixth stay.
    let stay = |place: usize| {
        let (t, c) = fan(place);
        let t = t.clone();
        async move { wait_turn(&c, &t, "cl").await }
    };
    let (first, second) = (stay(0).await, stay(1).await);
    assert_eq!(
        (first["state"].as_str(), second["state"].as_str()),
        (Some("admitted"), Some("admitted"))
    );
    let (t0, c0) = fan(0);
    assert_eq!(claim_retrying(&c0, t0, "cl", first["pass"].as_str()).await.status, 200);
    // The fifth and sixth keep checking in meanwhile.
    let keep_present: Vec<_> = (4..6)
        .map(|place| {
            let (t, c) = fan(place);
            let t = t.clone();
            tokio::spawn(async move { wait_turn(&c, &t, "cl").await })
        })
        .collect();
    let fourth = &stay(3).await;
    assert_eq!(
        fourth["state"], "admitted",
        "the lapsed turn went on, past the gone fan: {fourth}"
    );
    // The lapsed pass claims nothing (a node with no code at hand says
    // STOCK_IN_FLIGHT before it looks at passes; one with a code, expired).
    let (t1, c1) = fan(1);
    let lapsed = claim_with(&c1, t1, "cl", second["pass"].as_str()).await;
    assert!(
        matches!(lapsed.error_code(), Some("QUEUE_PASS_EXPIRED" | "STOCK_IN_FLIGHT")),
        "{}",
        lapsed.body
    );
    let (t3, c3) = fan(3);
    assert_eq!(claim_retrying(&c3, t3, "cl", fourth["pass"].as_str()).await.status, 200);
    let res = c1.get("/ticket/list", Some(t1)).await.unwrap();
    assert_eq!(res.data()["claims"], json!([]), "the lapsed winner holds nothing");
    for waited in keep_present {
        assert_eq!(waited.await.unwrap()["state"], "sold_out");
    }
    let (t2, c2) = fan(2);
    eventually(&c2, t2, "cl", "sold_out").await;
    let log = cluster.services.lrange("q:{cl}:log").await;
    let kinds: Vec<String> = log
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["k"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let count = |k: &str| kinds.iter().filter(|x| *x == k).count();
    assert_eq!(
        (count("shuffle"), count("admit"), count("skip"), count("close")),
        (1, 3, 1, 1),
        "{kinds:?}"
    );
    assert_eq!(cluster.drained("cl").await.len(), 2);
    cluster.nodes[0].assert_verified();
}

/// Joins `act` as `token` once `node` has picked the activity up from
/// MongoDB (it answers ACTIVITY_NOT_FOUND until then).
async fn join_once_picked_up(node: &TestApp, token: &str, act: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let res = join(&node.client, token, act).await;
        if res.status == 200 {
            return;
        }
        assert_eq!(res.error_code(), Some("ACTIVITY_NOT_FOUND"), "{}", res.body);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never picked the activity up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A lottery that cluster nodes serve from what `ticketd import` stored in
/// MongoDB (their config names no activity): the exported draw still says
/// "lottery", so `verify-draw` refuses an entry slipped in after the draw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lottery_served_from_mongodb_exports_a_draw_that_says_lottery() {
    use crate::cluster::{node_config, Cluster};
    use ticketd::clock::now_ms;
    let cluster = Cluster::start(1, "", "");
    let tokens = cluster.users("ml", 2).await;
    // Time for the import, the node's pick-up and two entries.
    let act = lottery_from(now_ms(), "ml", 2, 8_000, 60_000, &[]);
    let importer = tempfile::tempdir().unwrap();
    let config = node_config(&cluster.services, &cluster.db, "importer", "") + &act;
    std::fs::write(importer.path().join("config.toml"), config).unwrap();
    let out = run_cli(importer.path(), &["import"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let node = &cluster.nodes[0];
    for t in &tokens {
        join_once_picked_up(node, t, "ml").await;
    }
    // Once drawn, the node's own config (no activities) exports it.
    let file = node.dir.path().join("ml-draw.json");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let draw: Value = loop {
        let out = node.cli(
            &[
                "export",
                "--activity",
                "ml",
                "--what",
                "draw",
                "--out",
                file.to_str().unwrap(),
            ],
            None,
        );
        if out.status.success() {
            break serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("has no draw yet"), "{stderr}");
        assert!(tokio::time::Instant::now() < deadline, "never drawn: {stderr}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(draw["admission"], "lottery");
    assert_eq!(draw["entrants"].as_array().unwrap().len(), 2);
    let mut forged = draw.clone();
    forged["late"] = json!([987_654]);
    std::fs::write(&file, forged.to_string()).unwrap();
    let out = node.cli(&["verify-draw", file.to_str().unwrap()], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("a lottery takes no entry after its draw"),
        "{stderr}"
    );
}

/// Nodes that serve what `ticketd import` stored refuse a stored change to
/// what an opened waiting room runs on (its times, its limit), as a reload
/// is refused. The import took it and said it was done: every node then
/// refused the whole stored set at every refresh, so no later import (a
/// pause, a retirement, another activity) reached them, while a node
/// started meanwhile served the changed times. The import now refuses
/// what the nodes would, and a later import goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_that_changes_an_opened_room_is_refused_and_the_next_one_applies() {
    use crate::cluster::{node_config, Cluster};
    let cluster = Cluster::start(1, "", "");
    let tokens = cluster.users("mq", 1).await;
    let t0 = ticketd::clock::now_ms();
    let act = |start_in_ms: i64, extra: &[&str]| room_from(t0, "mq", "queue", 2, start_in_ms, extra);
    let importer = tempfile::tempdir().unwrap();
    let import = |act: String| {
        let config = node_config(&cluster.services, &cluster.db, "importer", "") + &act;
        std::fs::write(importer.path().join("config.toml"), config).unwrap();
        run_cli(importer.path(), &["import"], None)
    };
    let out = import(act(1_800_000, &[]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let node = &cluster.nodes[0];
    // The queue opened a minute ago; a fan joins once the node has it.
    join_once_picked_up(node, &tokens[0], "mq").await;

    let out = import(act(2_400_000, &[]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("activity `mq`: start_time (running: ")
            && stderr.contains(") cannot change once its queue has opened"),
        "{stderr}"
    );
    // A lottery nobody entered whose draw has passed, as a node's reload
    // refuses it: the nodes that follow the store would each draw it empty.
    let late = lottery_from(t0, "ml", 1, -30_000, -10_000, &[]);
    let out = import(act(1_800_000, &[]) + &late);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("activity `ml`: its lottery's draw_time"),
        "{stderr}"
    );
    let out = import(act(1_800_000, &["paused = true"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    crate::common::until("the node to take the pause", || async {
        node.detail("mq").await["paused"] == true
    })
    .await;
    assert_eq!(
        ms(node.detail("mq").await["startTime"].as_str().unwrap()),
        t0 + 1_800_000
    );
}

/// Joining again keeps a place, so a cluster's join script changes nothing
/// for a place the node's replica already holds; but each call cost Redis
/// a script and a read of the room's log, and one account could ask for
/// them as fast as its address's claim rate let it. Past the account's
/// budget of store reads, a join of a held place is answered from the
/// replica, with no call to Redis. Here Redis is frozen and sixty joins
/// go at once: those within the budget (twenty, then five a second) wait
/// for Redis and hear 503; the rest are answered at once. (Before, every
/// one went to Redis and none was answered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_a_held_place_again_and_again_costs_redis_nothing_past_a_budget() {
    let act = absolute_room("jh", "queue", 1, 1_800_000, &[]);
    let cluster = crate::cluster::Cluster::start(1, &act, "");
    let node = &cluster.nodes[0];
    let token = &cluster.users("jh", 1).await[0];
    assert_eq!(join(&node.client, token, "jh").await.status, 200);
    cluster.services.freeze_redis();
    let joins = futures::future::join_all((0..60).map(|_| join(&node.client, token, "jh"))).await;
    cluster.services.thaw_redis();
    let answered: Vec<_> = joins.iter().filter(|r| r.status == 200).collect();
    assert!(
        !answered.is_empty(),
        "every join of a held place went to Redis: {:?}",
        joins.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(answered.iter().all(|r| r.data()["state"] == "waiting"));
}

/// A shared log whose count of places reached is not the replicas' (a
/// damaged log, or one a node from before the count was kept appended to)
/// stops admissions: the admitter says so, rather than appending nothing
/// at every step in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitter_whose_shared_log_moved_on_says_so() {
    use crate::cluster::Cluster;
    // Paused until the count is set: nobody is admitted before (on a slow
    // box the start could otherwise come first and admit both fans, and a
    // room with nobody left to admit appends nothing).
    let act = absolute_room("sc", "queue", 5, 3_000, &["paused = true"]);
    let cluster = Cluster::start(1, &act, "");
    let node = &cluster.nodes[0];
    let tokens = cluster.users("sc", 2).await;
    for t in &tokens {
        join_through_the_draw(&node.client, t, "sc").await;
    }
    let mut r = cluster.services.redis().await;
    let _: () = redis::cmd("SET")
        .arg("q:{sc}:cursor")
        .arg(1000)
        .query_async(&mut r)
        .await
        .unwrap();
    let config = std::fs::read_to_string(node.config_path()).unwrap();
    assert!(config.contains("paused = true\n"), "{config}");
    let applied = node.reload(&config.replace("paused = true\n", ""));
    assert_eq!(applied["message"], "Config reloaded.", "{applied}");
    let warned = node.wait_for_log(
        "The waiting room's admitter could not take its step; said once until it takes one again.",
        1,
    );
    assert!(
        warned["error"]
            .as_str()
            .unwrap()
            .contains("the shared log has reached 1000 places, this replica 0"),
        "{warned}"
    );
}

/// Relative times count from each start, so a restart moves a demo's sale,
/// but a waiting room's log keeps the places of the earlier run. The node
/// keeps serving and says so at start; an absolute-time room says nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_that_moves_a_room_with_places_warns() {
    const MOVED: &str = "This activity's times are relative to the node's start, so this start moved them, \
                         but its waiting room keeps the places and draw of an earlier run; use absolute times for a real sale.";
    let fixed = Act::new("fixed")
        .window(&in_secs(3600), &in_secs(7200))
        .with("admission = \"queue\"")
        .with(&format!("queue_opens = \"{}\"", in_secs(-60)))
        .ticket("fixed-t", "Ticket", Codes::Generate(5))
        .toml();
    let mut app = TestApp::start(&(base_config() + &queue("demo", 5, "+30m", &[]) + &fixed));
    let fan = app.register("fan").await;
    for act in ["demo", "fixed"] {
        let res = join(&app.client, &fan, act).await;
        assert_eq!(res.status, 200, "{act}: {}", res.body);
    }
    assert_eq!(app.count_logs(MOVED), 0, "a first start moves nothing");
    app.restart();
    let warned: Vec<Value> = app
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == MOVED)
        .collect();
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(warned[0]["activity"], "demo");
    assert_eq!(warned[0]["places"], 1);
    // Still serving, the fan's place kept.
    assert_eq!(status(&app.client, &fan, "demo").await["state"], "waiting");
}

/// A drawn room's admission cannot change by a restart either (a reload
/// was refused; a restart was not): a drawn lottery turned into a queue
/// took late arrivals, and its export, which took the mode from the
/// config, said `queue`, so `verify-draw` accepted them. Now the room's
/// log says how it drew: the start is refused, and the export says
/// `lottery` whatever the config says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drawn_lottery_cannot_become_a_queue_by_a_restart() {
    let act = Act::new("md")
        .window("+3s", "+1h")
        .with("admission = \"lottery\"")
        .with("queue_opens = \"-1m\"")
        .with("draw_time = \"+2s\"")
        .ticket("md-t", "Ticket", Codes::Generate(2))
        .toml();
    let mut app = TestApp::start(&(base_config() + &act));
    let fan = app.users("md", 1).await.remove(0);
    assert_eq!(join(&app.client, &fan, "md").await.status, 200);
    until_drawn(&app, "md").await;
    assert_eq!(app.stop(), 0);
    let config = std::fs::read_to_string(app.config_path()).unwrap();
    let queue = config
        .replace("admission = \"lottery\"", "admission = \"queue\"")
        .replace("draw_time = \"+2s\"\n", "");
    assert_ne!(queue, config);
    std::fs::write(app.config_path(), &queue).unwrap();
    let err = crate::common::serve_refused(
        app.dir.path(),
        Duration::from_secs(30),
        "a node served a drawn lottery as a queue",
    );
    assert!(
        err.contains("drew its order as a lottery") && err.contains("set it back to \"lottery\""),
        "{err}"
    );
    // Nor by making it a race, which opens no room at all.
    let race = config
        .replace("admission = \"lottery\"\n", "")
        .replace("queue_opens = \"-1m\"\n", "")
        .replace("draw_time = \"+2s\"\n", "");
    assert!(!race.contains("lottery") && !race.contains("queue_opens"), "{race}");
    std::fs::write(app.config_path(), &race).unwrap();
    let err = crate::common::serve_refused(
        app.dir.path(),
        Duration::from_secs(30),
        "a node sold a drawn lottery as a race",
    );
    assert!(err.contains("its waiting room drew its order as a lottery"), "{err}");
    let (draw, _) = export_draw(&app, "md");
    assert_eq!(draw["admission"], "lottery", "{draw}");
}

/// The same in a cluster, where the room's log is in Redis: a node
/// restarted with a config that made a drawn lottery a race opened no room
/// and was not checked, so it sold the lottery's codes to whoever was
/// fastest, passes or none, beside nodes that held to the draw. And a node
/// whose config says `queue` told the join script "not a lottery" until its
/// replica first read the shuffle line, so a late entrant got into the
/// drawn lottery: Redis now holds joins to the mode the room drew as.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drawn_lottery_stays_a_lottery_on_a_cluster_node_whatever_its_config_says() {
    use crate::cluster::Cluster;
    use ticketd::clock::now_ms;
    // The draw 3 s after the room opens, once the node and the fan are ready.
    let act = |t0| lottery_from(t0, "mc", 2, 3_000, 4_000, &[]);
    let (mut cluster, mut fans) = cluster_then_open(1, act, "", "mc", 1).await;
    let fan = fans.remove(0);
    let Cluster { services, nodes, .. } = &mut cluster;
    let node = &mut nodes[0];
    assert_eq!(join(&node.client, &fan, "mc").await.status, 200);
    until_drawn(node, "mc").await;
    assert_eq!(node.stop(), 0);
    // The flag as the version before named no mode (`1`): the log says it.
    let flag = "q:{mc}:shuffled";
    let named: String = services.query(redis::cmd("GET").arg(flag)).await;
    assert_eq!(named, "lottery");
    let () = services.query(redis::cmd("SET").arg(flag).arg("1")).await;
    let config = std::fs::read_to_string(node.config_path()).unwrap();
    let race = as_race(&config);
    std::fs::write(node.config_path(), &race).unwrap();
    let err = crate::common::serve_refused(
        node.dir.path(),
        Duration::from_secs(30),
        "a cluster node sold a drawn lottery as a race",
    );
    assert!(err.contains("its waiting room drew its order as a lottery"), "{err}");

    // With the lottery set back it serves, and the room is as it drew; its
    // replica, reading the shuffle line, names the mode in the flag.
    let () = services.query(redis::cmd("SET").arg(flag).arg("1")).await;
    std::fs::write(node.config_path(), &config).unwrap();
    node.boot();
    assert_eq!(status(&node.client, &fan, "mc").await["position"], 1);
    until("the flag to name the mode", || async {
        services.query::<String>(redis::cmd("GET").arg(flag)).await == "lottery"
    })
    .await;

    // A join sent as a queue's (a node whose config says so, its replica
    // not caught up yet) finds the lottery's entries closed all the same.
    let config = ticketd::config::Config::load(&node.config_path()).unwrap();
    let store = ticketd::store::Store::open(&config, ticketd::store::Access::Tool).unwrap();
    let rooms = store.room_source().unwrap();
    let late = rooms.join("mc", 1 << 40, now_ms(), false, 1000, None).await.unwrap();
    assert_eq!(late, ticketd::store::Joined::EntriesClosed);
}

/// A queue that fans have joined cannot become a race by a restart
/// (a reload was refused; a restart, which finds no room open, was not).
/// One node then sold the activity as a race, to the fastest, past the
/// fans who held places; a cluster's nodes sold nothing at all (Redis
/// refuses a claim without a pass once the room has a log) and the joins
/// answered `NO_QUEUE`. The start now reads the room's log, on disk or in
/// Redis, and says why it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_queue_cannot_become_a_race_by_a_restart() {
    let mut app = TestApp::start(&(base_config() + &queue("jq", 2, "+30m", &[])));
    let fan = app.users("jq", 1).await.remove(0);
    race_refused_and_place_kept(&mut app, &fan, "jq").await;
}

/// The same on a cluster node, which asks Redis for the room's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_queue_cannot_become_a_race_on_a_cluster_node() {
    let mut cluster = crate::cluster::Cluster::start(1, &absolute_room("jc", "queue", 2, 1_800_000, &[]), "");
    let fan = cluster.users("jc", 1).await.remove(0);
    race_refused_and_place_kept(&mut cluster.nodes[0], &fan, "jc").await;
}

/// `fan` joins `act`'s queue on `node`; the node, restarted with a config
/// that makes `act` a race, refuses to start and says why; with its config
/// put back it serves, and the fan's place is kept.
async fn race_refused_and_place_kept(node: &mut TestApp, fan: &str, act: &str) {
    assert_eq!(join(&node.client, fan, act).await.status, 200);
    assert_eq!(node.stop(), 0);
    let config = std::fs::read_to_string(node.config_path()).unwrap();
    std::fs::write(node.config_path(), as_race(&config)).unwrap();
    let err = crate::common::serve_refused(
        node.dir.path(),
        Duration::from_secs(30),
        &format!("a node sold the joined queue `{act}` as a race"),
    );
    assert!(
        err.contains(&format!("activity `{act}`: its waiting room has opened")),
        "{err}"
    );
    std::fs::write(node.config_path(), &config).unwrap();
    node.boot();
    assert_eq!(status(&node.client, fan, act).await["state"], "waiting");
}

/// A Redis failover that promoted a replica without the room's last
/// joins. Those joins were acknowledged (they did not wait for a replica);
/// they now wait, as claims do, on a connection of their own, and are
/// answered 503 when no replica confirms them. And the node's replica of
/// the room had read them, and read on from where it stood: the log, now
/// shorter, never reached that count again for it, so the node went on
/// telling the lost fans they were waiting, and missed what was written
/// after the failover below that count (the shuffle, admissions). Now
/// each read starts at the last entry the replica applied, and a log that
/// no longer holds it there rebuilds the room: the lost fans hear they are
/// not in it, join again, and everyone gets a code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_lost_joins_is_found_and_the_room_goes_on() {
    use crate::cluster::{
        freeze_and_cut_off, kill_master_and_take_over, master_and_replica, rejoin_as_replica, Cluster,
    };
    use ticketd::clock::now_ms;
    let act = |t0| room_from(t0, "fo", "queue", 5, 15_000, &["admit_rate = 100.0", "grace = \"10m\""]);
    let later = act(now_ms() + 3_600_000);
    let services = services::Services::start_with_replicated_redis_cluster();
    let mut cluster = Cluster::start_on(services, 1, &later, "[cluster]\nreplica_acks = 1\n", |c| c);
    let tokens = cluster.users("fo", 5).await;
    let (kept, lost) = tokens.split_at(3);
    open_now(&cluster, &later, &act(now_ms()));
    let node = &cluster.nodes[0];
    let (master, replica) = master_and_replica(&cluster.services, "q:{fo}:log").await;
    for t in kept {
        assert_eq!(join(&node.client, t, "fo").await.status, 200);
    }
    // (Answered 200: a replica holds these joins.)
    // The replica falls behind (frozen and cut off); two more fans join:
    // their places are in the master's log, which the node reads, but no
    // replica confirms them, so they are not told they joined.
    let frozen = freeze_and_cut_off(&cluster.services, master, replica).await;
    for t in lost {
        let res = join(&node.client, t, "fo").await;
        assert_eq!(
            res.status, 503,
            "a join no replica holds was acknowledged: {}",
            res.body
        );
        assert_eq!(res.error_code(), Some("STORE_UNAVAILABLE"), "{}", res.body);
        assert_eq!(status(&node.client, t, "fo").await["state"], "waiting");
    }
    kill_master_and_take_over(&cluster.services, master, replica, frozen).await;

    // The node finds the log shorter than it read, and says so.
    for t in lost {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let s = status(&node.client, t, "fo").await;
            if s["state"] == "not_joined" {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "a lost join still counts: {s}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    node.wait_for_log(
        "The waiting room's log in Redis is not the one this node followed (a failover lost its last writes); \
         rebuilt from it: fans whose joins it lost are no longer in the room, and may join again.",
        1,
    );
    for t in kept {
        assert_ne!(status(&node.client, t, "fo").await["state"], "not_joined");
    }
    // The old master follows the new one (claims wait for a replica).
    rejoin_as_replica(&mut cluster.services, master, replica).await;
    let node = &cluster.nodes[0];
    // They join again; the room shuffles and admits: five fans, five codes.
    for t in lost {
        let res = join(&node.client, t, "fo").await;
        assert_eq!(res.status, 200, "{}", res.body);
    }
    for t in &tokens {
        let s = until_state(&node.client, t, "fo", "admitted").await;
        let res = claim_retrying(&node.client, t, "fo", s["pass"].as_str()).await;
        assert_eq!(res.status, 200, "{}", res.body);
    }
    assert_eq!(cluster.redis_claimed("fo").await, 5);
}

/// A room's seed is its commitment's: the commitment goes to every fan at
/// once, the seed is revealed at the draw. It was written with `SET NX`
/// and no `WAIT`: a failover that lost it left the room without one, the
/// next node to open the room wrote another, and the draw would have
/// revealed a seed that does not match what fans were shown. With
/// `replica_acks` the room now opens only once a replica holds its seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_seed_is_on_a_replica_before_its_commitment_is_shown() {
    use crate::cluster::{
        cluster_activity, freeze_and_cut_off, kill_master_and_take_over, master_and_replica, rejoin_as_replica, Cluster,
    };
    use ticketd::admission::draw::Seed;
    let services = services::Services::start_with_replicated_redis_cluster();
    let mut cluster = Cluster::start_on(
        services,
        1,
        &cluster_activity("sr", 3, 1),
        "[cluster]\nreplica_acks = 1\n",
        |c| c,
    );
    let config = std::fs::read_to_string(cluster.nodes[0].config_path()).unwrap();
    let with_room = config.clone() + &absolute_room("sd", "queue", 3, 600_000, &[]);
    let (master, replica) = master_and_replica(&cluster.services, "q:{sd}:seed").await;
    let frozen = freeze_and_cut_off(&cluster.services, master, replica).await;
    let refused = cluster.nodes[0].reload(&with_room);
    assert_eq!(
        refused["message"], "Reload refused; still serving the previous config.",
        "a room opened on a seed no replica holds: {refused}"
    );
    // Unconfirmed (or, on a loaded box, the WAIT's answer late past the
    // client's own timeout): either way the room does not open.
    assert!(
        refused
            .to_string()
            .contains("activity `sd`: cannot open its waiting room"),
        "{refused}"
    );
    kill_master_and_take_over(&cluster.services, master, replica, frozen).await;
    rejoin_as_replica(&mut cluster.services, master, replica).await;
    let node = &cluster.nodes[0];
    // Once the node's connections have found the new master (a loaded box
    // took a few seconds after the failover).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let answer = node.reload(&with_room);
        if answer["message"] == "Config reloaded." {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seed: String = cluster.services.query(redis::cmd("GET").arg("q:{sd}:seed")).await;
    let shown = node.detail("sd").await;
    assert_eq!(
        shown["queue"]["commitment"],
        Seed::from_hex(&seed).unwrap().commitment(),
        "{shown}"
    );
}

/// With `replica_acks`, joins wait for the replicas, but not one at a
/// time: a `WAIT` holds the connection it is sent on, so each join with a
/// `WAIT` of its own made a node's joins go one replica round trip at a
/// time. Joins whose scripts returned share the next fence and `WAIT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_on_a_replicated_redis_are_confirmed_together() {
    use crate::cluster::Cluster;
    const FANS: usize = 200;
    let services = services::Services::start_with_replicated_redis_cluster();
    let act = absolute_room("jt", "queue", 1, 1_800_000, &[]);
    let cluster = Cluster::start_on(services, 1, &act, "[cluster]\nreplica_acks = 1\n", |c| c);
    let tokens = cluster.users("jt", FANS).await;
    let client = cluster.clients().remove(0);
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let started = std::time::Instant::now();
    let joins = futures::future::join_all(tokens.iter().map(|t| {
        let (client, sem) = (client.clone(), sem.clone());
        async move {
            let _p = sem.acquire().await.unwrap();
            join(&client, t, "jt").await
        }
    }))
    .await;
    // Printed, not asserted.
    eprintln!("{FANS} joins, 64 at a time: {:?}", started.elapsed());
    for res in &joins {
        assert_eq!(res.status, 200, "{}", res.body);
    }
    assert_eq!(cluster.services.lrange("q:{jt}:log").await.len(), FANS);
    let fences: usize = cluster.services.query(redis::cmd("GET").arg("tk:{jt}:fence")).await;
    eprintln!("{FANS} joins, {fences} fences and WAITs");
    assert!(fences < FANS, "one WAIT per join: {fences}");
}

/// The admitter's append is refused when the log does not hold, where
/// its replica applied it, the entry the plan was made from: a step that
/// synced before a failover and appended after it would otherwise write
/// an admission planned from a lost shuffle or join, which no replica
/// takes as the next place, and every later append would be refused as
/// planned from a stale cursor. Through the store's own calls, on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_planned_from_a_log_that_was_lost_is_refused() {
    use ticketd::admission::{log::Event, state::Base};
    use ticketd::store::Appended;
    let cluster = crate::cluster::Cluster::start(1, "", "");
    let config = ticketd::config::Config::load(&cluster.nodes[0].config_path()).unwrap();
    let store = ticketd::store::Store::open(&config, ticketd::store::Access::Tool).unwrap();
    let rooms = store.room_source().unwrap();
    let now = ticketd::clock::now_ms();
    for user in [1, 2] {
        let joined = rooms.join("al", user, now, false, 100, None).await.unwrap();
        assert_eq!(joined, ticketd::store::Joined::New);
    }
    assert!(rooms.admitter_lease("al", 60_000).await.unwrap());
    // Where a replica stood: two entries read, the second of them `second`'s join.
    let replica = |second: u64| {
        Base::at(
            2,
            Some(serde_json::to_string(&Event::Join { u: second, t: now }).unwrap()),
        )
    };
    let shuffle = [Event::Shuffle {
        t: now,
        m: Some(ticketd::config::AdmissionMode::Queue),
    }];
    // A replica that had read another second join (the log lost it).
    let lost = rooms.append("al", 0, &replica(3), &shuffle).await.unwrap();
    assert_eq!(lost, Appended::Diverged);
    assert_eq!(cluster.services.lrange("q:{al}:log").await.len(), 2, "nothing appended");
    let held = rooms.append("al", 0, &replica(2), &shuffle).await.unwrap();
    assert_eq!(held, Appended::Yes);
    assert_eq!(cluster.services.lrange("q:{al}:log").await.len(), 3);
}

/// Polls until `token`'s state is `want` (60 s at most: a room may wait
/// for its start, or for Redis to come back).
async fn until_state(client: &ApiClient, token: &str, act: &str, want: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(client, token, act).await;
        if s["state"] == want {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {want}: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `config` with its room's lines (`admission`, `queue_opens`,
/// `draw_time`) taken out: the activity a race.
fn as_race(config: &str) -> String {
    let race: String = config
        .lines()
        .filter(|l| {
            !["admission =", "queue_opens =", "draw_time ="]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(!race.contains("lottery") && !race.contains("queue_opens"), "{race}");
    race
}

/// A node whose config makes the activity a race, started before the room
/// drew (so its start found nothing to refuse), sold the lottery's codes to
/// whoever claimed first, with no pass: after the draw, and (with its own
/// start earlier, or a queue between the start and the admitter's shuffle)
/// before it. Redis's commit script now refuses a claim without a pass
/// once anyone has joined the activity's waiting room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_race_node_beside_a_lottery_sells_nothing_without_a_pass() {
    use crate::cluster::Cluster;
    use ticketd::clock::{now_ms, rfc3339_ms};
    // The lottery's clock starts once both nodes and the fans are ready.
    let act = |t0| lottery_from(t0, "rn", 4, 8_000, 9_000, &[]);
    let later = act(now_ms() + 3_600_000);
    let opened = format!("start_time = \"{}\"\n", rfc3339_ms(now_ms() - 60_000));
    // node1's config makes it a race, open already.
    let cluster = Cluster::start_configured(2, &later, "", |config| {
        if !config.contains("node_id = \"node1\"") {
            return config;
        }
        as_race(&config)
            .lines()
            .map(|l| {
                if l.starts_with("start_time =") {
                    opened.clone()
                } else {
                    format!("{l}\n")
                }
            })
            .collect()
    });
    let (fan, racer) = {
        let mut tokens = cluster.users("rn", 2).await;
        (tokens.remove(0), tokens.remove(0))
    };
    open_now_on(&cluster.nodes[0], &later, &act(now_ms()));
    assert_eq!(join(&cluster.nodes[0].client, &fan, "rn").await.status, 200);
    // Before the draw, and after it.
    assert_error(&cluster.nodes[1].claim(&racer, "rn").await, 403, "QUEUE_PASS_REQUIRED");
    until_drawn(&cluster.nodes[0], "rn").await;
    assert_error(&cluster.nodes[1].claim(&racer, "rn").await, 403, "QUEUE_PASS_REQUIRED");
    assert_eq!(cluster.redis_claimed("rn").await, 0, "nothing was sold");
}

/// With Redis down a cluster room's admitter fails its step ten times a
/// second, and each failure was a warning: ten lines a second per room,
/// for the whole outage. Now one warning an outage, and a line when the
/// steps go on again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_one_warning_of_the_admitter_not_ten_a_second() {
    let act = absolute_room("ow", "queue", 5, 8_000, &[]);
    let mut cluster = crate::cluster::Cluster::start(1, &act, "");
    let errors = "ticketd_worker_errors_total{worker=\"admitter\"}";
    let before = metric(&cluster.nodes[0], errors).await;
    cluster.services.stop_redis();
    until("twenty failed steps", || async {
        metric(&cluster.nodes[0], errors).await >= before + 20.0
    })
    .await;
    let logs = cluster.nodes[0].logs_text();
    let warnings = logs
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") && l.contains("admitter could not take its step"))
        .count();
    assert_eq!(warnings, 1, "{logs}");
    cluster.services.restart_redis();
    cluster.nodes[0].wait_for_log("The waiting room's admitter takes its steps again.", 1);
}
