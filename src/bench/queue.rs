//! `ticketd bench --queue`: users through a waiting room. Every user joins,
//! then waits on an event stream of their own (one connection each, as a
//! fan's page does), and claims with the pass when the turn comes. Reports
//! join, admission and claim latency, what the users got, and the node's
//! resident memory per waiting user (its `/metrics`, before and after the
//! streams opened).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{login_all, new_hist, phase, urlencode, ApiClient, Phase};
use crate::cli::BenchArgs;

/// What the users met in the waiting room.
#[derive(Debug, Serialize)]
pub struct QueueBenchReport {
    /// The activity.
    pub activity: String,
    /// Users taking part.
    pub users: usize,
    /// `POST /queue/join`.
    pub join: Phase,
    /// Event streams open at once (each the user's own connection).
    pub streams_open: usize,
    /// The nodes' resident memory before the streams opened, bytes (summed
    /// over every `--url`: the streams are spread over them all).
    pub rss_before: Option<u64>,
    /// With every stream open, bytes (summed the same way).
    pub rss_with_streams: Option<u64>,
    /// `(rss_with_streams - rss_before) / streams_open`.
    pub bytes_per_waiting_user: Option<u64>,
    /// From the stream's opening (or the start, if later) to the "admitted" event.
    pub admission_wait: Phase,
    /// The claim with the pass (`/queue/status` for the pass, then `/ticket/get`).
    pub claim: Phase,
    /// How each user's wait ended: `claimed`, `sold_out`, or the error code.
    pub outcomes: BTreeMap<String, u64>,
}

/// The node's resident memory, from its `/metrics` (plain text, so read
/// over a connection of its own).
async fn rss(addr: &str) -> Option<u64> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("ticketd_resident_memory_bytes "))
        .and_then(|v| v.trim().parse().ok())
}

/// The resident memory of every node in `nodes`, summed (`None` if any
/// would not say). Read from the first alone, the growth of one node was
/// divided by the streams of all, N nodes' figure N times too small.
async fn total_rss(nodes: &[String]) -> Option<u64> {
    let mut total = 0;
    for node in nodes {
        total += rss(node).await?;
    }
    Some(total)
}

/// `host:port` of a base URL (`http://host:port`).
fn authority(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("http://").context("--url must be http://host:port")?;
    Ok(rest.trim_end_matches('/').to_owned())
}

/// A node writes on an event stream at least every 15 s: one silent this
/// long is gone (a fan's page gives up after 35 s).
const STREAM_SILENCE: Duration = Duration::from_secs(45);

/// Reads one user's event stream until the turn, the end, or an error;
/// calls `opened` at the first event. Returns the state it ended in and when.
///
/// A stream the node refuses (503 `STREAMS_FULL`, 429 `TOO_MANY_STREAMS`)
/// is an error naming the refusal: its JSON answer has no event in it, and
/// was reported as "the stream ended without a decision".
async fn wait_turn(
    addr: &str,
    token: &str,
    activity: &str,
    opened: impl FnOnce(),
) -> anyhow::Result<(String, Instant)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    // `close`: a refusal ends the connection, so its whole answer is read.
    let req = format!(
        "GET /queue/events?actId={} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n",
        urlencode(activity)
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let mut opened = Some(opened);
    let mut head_read = false;
    loop {
        let n = tokio::time::timeout(STREAM_SILENCE, stream.read(&mut chunk))
            .await
            .map_err(|_| anyhow::anyhow!("the stream was silent for {} s", STREAM_SILENCE.as_secs()))??;
        if n == 0 {
            bail!("the stream ended without a decision");
        }
        buf.extend_from_slice(&chunk[..n]);
        if !head_read {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                if buf.len() > 64 * 1024 {
                    bail!("an answer head larger than 64 KiB");
                }
                continue;
            };
            let status = String::from_utf8_lossy(&buf[..end])
                .split(' ')
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            if status != "200" {
                // The JSON error, as long as the head says (a proxy may keep
                // the connection open past it), else to the close.
                let length = String::from_utf8_lossy(&buf[..end]).lines().find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                });
                let mut rest = buf.split_off(end + 4);
                let _ = tokio::time::timeout(STREAM_SILENCE, async {
                    while length.is_none_or(|n| rest.len() < n) {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => rest.extend_from_slice(&chunk[..n]),
                        }
                    }
                })
                .await;
                let code = serde_json::from_slice::<Value>(&rest)
                    .ok()
                    .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "(no JSON error)".to_owned());
                bail!("the node refused the stream: {status} {code}");
            }
            buf.drain(..end + 4);
            head_read = true;
        }
        while let Some(at) = buf.windows(6).position(|w| w == b"data: ") {
            let Some(end) = buf[at..].iter().position(|b| *b == b'\n') else {
                break;
            };
            let event: Value = serde_json::from_slice(&buf[at + 6..at + end])?;
            buf.drain(..at + end);
            if let Some(f) = opened.take() {
                f();
            }
            let state = event["state"].as_str().unwrap_or_default();
            if !matches!(state, "waiting" | "not_joined") {
                return Ok((state.to_owned(), Instant::now()));
            }
        }
        if buf.len() > 64 * 1024 {
            bail!("an event larger than 64 KiB");
        }
    }
}

/// Runs the waiting-room bench.
pub async fn run(args: BenchArgs) -> anyhow::Result<QueueBenchReport> {
    crate::app::raise_open_files_limit();
    let client = Arc::new(ApiClient::new(args.urls.clone(), args.concurrency)?);
    let detail = client
        .get(&format!("/act/detail?actId={}", urlencode(&args.activity)), None)
        .await?;
    if detail.status != 200 {
        bail!(
            "cannot read activity `{}`: {} {}",
            args.activity,
            detail.status,
            detail.body
        );
    }
    if !detail.data()["queue"].is_object() {
        bail!(
            "activity `{}` has no waiting room (admission = \"race\")",
            args.activity
        );
    }
    let tokens = login_all(&client, &args, &args.user_prefix, args.users).await?;

    // Everyone joins.
    let join_hist = Arc::new(Mutex::new(new_hist()));
    let next = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(tokens);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.min(args.users) {
        let (client, next, tokens, hist, act) = (
            client.clone(),
            next.clone(),
            tokens.clone(),
            join_hist.clone(),
            args.activity.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(token) = tokens.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                let sent = Instant::now();
                let mut res = client
                    .post("/queue/join", Some(token), &json!({ "actId": act }))
                    .await?;
                if let (Some("POW_REQUIRED"), Some(challenge), Some(bits)) = (
                    res.error_code(),
                    res.body["error"]["powChallenge"].as_str(),
                    res.body["error"]["powDifficulty"].as_u64(),
                ) {
                    // The room asks for work per account: do it, as a fan's page does
                    // (its time counts in the join's latency), off the runtime's
                    // threads, whose other users' answers it would hold up.
                    let challenge = challenge.to_owned();
                    let nonce = tokio::task::spawn_blocking(move || {
                        crate::auth::claim_token::solve_pow(&challenge, bits.min(32) as u8)
                    })
                    .await?;
                    let body = json!({ "actId": act, "powNonce": nonce });
                    res = client.post("/queue/join", Some(token), &body).await?;
                }
                if res.status != 200 {
                    bail!("join: {} {}", res.status, res.body);
                }
                let _ = hist.lock().record(sent.elapsed().as_micros().max(1) as u64);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let join = phase(&join_hist.lock(), started.elapsed().as_secs_f64());

    // Each user waits on a stream of their own; the node's memory is read
    // before they open and once all of them are open.
    let mut nodes = args
        .urls
        .iter()
        .map(|u| authority(u))
        .collect::<anyhow::Result<Vec<_>>>()?;
    nodes.sort();
    nodes.dedup();
    let rss_before = total_rss(&nodes).await;
    let opened = Arc::new(AtomicUsize::new(0));
    // Streams opened, and waits that ended before theirs did (refused, cut
    // off): the memory is read once every one of them is in.
    let arrived = Arc::new(AtomicUsize::new(0));
    let all_open = Arc::new(tokio::sync::Notify::new());
    // Waits for admission last minutes, past the request histograms' range.
    let admit_hist = Arc::new(Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
    ));
    let claim_hist = Arc::new(Mutex::new(new_hist()));
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let mut waits = Vec::with_capacity(args.users);
    for (i, token) in tokens.iter().enumerate() {
        let addr = authority(&args.urls[i % args.urls.len()])?;
        let (token, act, client) = (token.clone(), args.activity.clone(), client.clone());
        let (opened, arrived, all_open, n) = (opened.clone(), arrived.clone(), all_open.clone(), args.users);
        let (admit_hist, claim_hist, outcomes) = (admit_hist.clone(), claim_hist.clone(), outcomes.clone());
        waits.push(tokio::spawn(async move {
            let since = Instant::now();
            let arrive = || {
                if arrived.fetch_add(1, Ordering::AcqRel) + 1 == n {
                    all_open.notify_one();
                }
            };
            let mut was_opened = false;
            let on_open = || {
                was_opened = true;
                opened.fetch_add(1, Ordering::AcqRel);
                arrive();
            };
            let waited = wait_turn(&addr, &token, &act, on_open).await;
            if !was_opened {
                arrive();
            }
            let outcome = match waited {
                Ok((state, at)) if state == "admitted" => {
                    let _ = admit_hist
                        .lock()
                        .record(at.duration_since(since).as_micros().max(1) as u64);
                    let sent = Instant::now();
                    let status = client
                        .get(&format!("/queue/status?actId={}", urlencode(&act)), Some(&token))
                        .await;
                    let pass = status
                        .ok()
                        .and_then(|s| s.data()["pass"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    let mut res = client
                        .post(
                            "/ticket/get",
                            Some(&token),
                            &json!({ "actId": act, "claimToken": pass }),
                        )
                        .await;
                    if let Ok(r) = &res {
                        if let (Some("POW_REQUIRED"), Some(bits)) =
                            (r.error_code(), r.body["error"]["powDifficulty"].as_u64())
                        {
                            let challenge = pass.clone();
                            let nonce = tokio::task::spawn_blocking(move || {
                                crate::auth::claim_token::solve_pow(&challenge, bits.min(32) as u8)
                            })
                            .await
                            .unwrap_or_default();
                            let body = json!({ "actId": act, "claimToken": pass, "powNonce": nonce });
                            res = client.post("/ticket/get", Some(&token), &body).await;
                        }
                    }
                    let _ = claim_hist.lock().record(sent.elapsed().as_micros().max(1) as u64);
                    match res {
                        Ok(r) if r.status == 200 => "claimed".to_owned(),
                        Ok(r) => r.error_code().unwrap_or("other").to_owned(),
                        Err(_) => "transport".to_owned(),
                    }
                }
                Ok((state, _)) => state,
                Err(e) => format!("stream error: {e}"),
            };
            *outcomes.lock().entry(outcome).or_default() += 1;
        }));
    }
    // All open or ended (or a minute passed: some may have been decided
    // already).
    let _ = tokio::time::timeout(Duration::from_secs(60), all_open.notified()).await;
    let streams_open = opened.load(Ordering::Acquire);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_with_streams = total_rss(&nodes).await;
    let admitting = Instant::now();
    for w in waits {
        w.await?;
    }
    let seconds = admitting.elapsed().as_secs_f64();
    let bytes_per_waiting_user = match (rss_before, rss_with_streams) {
        (Some(b), Some(a)) if streams_open > 0 => Some(a.saturating_sub(b) / streams_open as u64),
        _ => None,
    };
    let outcomes = std::mem::take(&mut *outcomes.lock());
    let admission_wait = phase(&admit_hist.lock(), seconds);
    let claim = phase(&claim_hist.lock(), seconds);
    Ok(QueueBenchReport {
        activity: args.activity,
        users: args.users,
        join,
        streams_open,
        rss_before,
        rss_with_streams,
        bytes_per_waiting_user,
        admission_wait,
        claim,
        outcomes,
    })
}

/// Prints the report as a table or JSON.
pub fn print(report: &QueueBenchReport, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    let row = |name: &str, p: &Phase| {
        println!(
            "{name:<16} {:>8}  p50 {:>9.2} ms  p99 {:>9.2} ms  max {:>9.2} ms",
            p.requests, p.p50_ms, p.p99_ms, p.max_ms
        )
    };
    println!("activity {}  users {}", report.activity, report.users);
    row("join", &report.join);
    row("admission wait", &report.admission_wait);
    row("claim", &report.claim);
    let mib = |b: Option<u64>| b.map_or("?".to_owned(), |b| format!("{:.1} MiB", b as f64 / 1_048_576.0));
    println!(
        "event streams open at once: {}; node RSS {} -> {}: {} per waiting user",
        report.streams_open,
        mib(report.rss_before),
        mib(report.rss_with_streams),
        report
            .bytes_per_waiting_user
            .map_or("?".to_owned(), |b| format!("{:.1} KiB", b as f64 / 1024.0))
    );
    for (k, v) in &report.outcomes {
        println!("  {k:<22} {v}");
    }
    Ok(())
}
