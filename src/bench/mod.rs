//! `ticketd bench`: the rush simulator.
//!
//! 1. reads the activity (`/act/detail`) and logs every user in (creating
//!    them with `--create-users`);
//! 2. waits for the start if the activity is upcoming;
//! 3. rushes: `users × claims_per_user` claims, user by user, so one user's
//!    claims are in flight together; `concurrency` requests at once;
//! 4. reports requests/s, latency p50/p99/p999 and outcomes;
//! 5. verifies through the API that nothing was oversold: no code twice,
//!    nobody over the limit, every acknowledged code in its owner's list,
//!    claimed + remaining = total. Any violation exits non-zero.
//!
//! With `--baseline` it first measures a bare hyper hello-world, started
//! in-process on loopback, at the same concurrency, so the claim rate can be
//! read against what the machine can do at all.

pub mod client;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::json;

pub use client::{ApiClient, ApiResponse};

use crate::cli::BenchArgs;

/// Latency and throughput of one phase.
#[derive(Debug, Serialize)]
pub struct Phase {
    /// Requests sent.
    pub requests: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Requests per second.
    pub requests_per_sec: f64,
    /// Latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Slowest request.
    pub max_ms: f64,
}

/// The whole report, printed as a table or JSON.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The activity.
    pub activity: String,
    /// Users taking part.
    pub users: usize,
    /// Concurrency.
    pub concurrency: usize,
    /// Bare hello-world baseline, when asked for.
    pub baseline: Option<Phase>,
    /// The rush.
    pub rush: Phase,
    /// Answers by outcome (`success` or the error code).
    pub outcomes: BTreeMap<String, u64>,
    /// Codes acknowledged to bench users.
    pub acknowledged: usize,
    /// Stock before and after, from `/act/detail`.
    pub total_codes: u64,
    /// Claimed when the rush ended (by anyone).
    pub claimed_after: u64,
    /// Remaining when the rush ended.
    pub remaining_after: u64,
    /// Invariant violations (empty when all hold).
    pub violations: Vec<String>,
}

fn phase(hist: &Histogram<u64>, seconds: f64) -> Phase {
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Phase {
        requests: hist.len(),
        seconds,
        requests_per_sec: hist.len() as f64 / seconds.max(1e-9),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: hist.max() as f64 / 1000.0,
    }
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Runs the bench; returns the report (also printed). Errors if an invariant broke.
pub async fn run(args: BenchArgs) -> anyhow::Result<Report> {
    let client = Arc::new(ApiClient::new(args.urls.clone(), args.concurrency)?);
    let detail_path = format!("/act/detail?actId={}", urlencode(&args.activity));
    let detail = client.get(&detail_path, None).await?;
    if detail.status != 200 {
        bail!(
            "cannot read activity `{}`: {} {}",
            args.activity,
            detail.status,
            detail.body
        );
    }
    let limit = detail.data()["perUserLimit"].as_u64().unwrap_or(1);
    let total_codes: u64 = detail.data()["tickets"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["total"].as_u64()).sum())
        .unwrap_or(0);

    let baseline = if args.baseline {
        Some(hello_baseline(&args).await?)
    } else {
        None
    };

    eprintln!("bench: logging in {} users ...", args.users);
    let tokens = login_all(&client, &args).await?;

    if let Some(start) = detail.data()["startTime"].as_str() {
        let start_ms = crate::config::parse_rfc3339_ms(start);
        let wait = start_ms.map(|s| s - crate::config::now_ms()).unwrap_or(0);
        if wait > 0 {
            eprintln!(
                "bench: activity opens in {:.1}s; waiting",
                wait as f64 / 1000.0
            );
            tokio::time::sleep(Duration::from_millis(wait as u64 + 50)).await;
        }
    }

    eprintln!(
        "bench: rushing with {} claims at concurrency {} ...",
        args.users * args.claims_per_user,
        args.concurrency
    );
    let outcome = rush(&client, &args, &tokens).await?;
    let report = verify(
        &client,
        &args,
        &tokens,
        outcome,
        baseline,
        limit,
        total_codes,
        &detail_path,
    )
    .await?;
    Ok(report)
}

struct RushOutcome {
    phase: Phase,
    outcomes: BTreeMap<String, u64>,
    /// Per user index, the codes acknowledged to them.
    acked: Vec<Vec<String>>,
    transport_errors: u64,
}

async fn login_all(client: &Arc<ApiClient>, args: &BenchArgs) -> anyhow::Result<Vec<String>> {
    let next = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(Mutex::new(vec![String::new(); args.users]));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.min(args.users).max(1) {
        let (client, next, tokens, args) =
            (client.clone(), next.clone(), tokens.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.users {
                    return Ok::<_, anyhow::Error>(());
                }
                let username = format!("{}{i}", args.user_prefix);
                let creds = json!({ "username": username, "password": args.password });
                let mut res = client.post("/user/login", None, &creds).await?;
                if res.status == 401 && args.create_users {
                    res = client.post("/user/register", None, &creds).await?;
                }
                let token = res.data()["token"].as_str().with_context(|| {
                    format!("cannot log in {username}: {} {}", res.status, res.body)
                })?;
                tokens.lock()[i] = token.to_owned();
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let tokens = std::mem::take(&mut *tokens.lock());
    Ok(tokens)
}

async fn rush(
    client: &Arc<ApiClient>,
    args: &BenchArgs,
    tokens: &[String],
) -> anyhow::Result<RushOutcome> {
    let tokens: Arc<Vec<String>> = Arc::new(tokens.to_vec());
    let total = args.users * args.claims_per_user;
    let next = Arc::new(AtomicUsize::new(0));
    let body = bytes::Bytes::from(serde_json::to_vec(&match &args.ticket {
        Some(t) => json!({ "actId": args.activity, "ticketId": t }),
        None => json!({ "actId": args.activity }),
    })?);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, next, tokens, body) =
            (client.clone(), next.clone(), tokens.clone(), body.clone());
        let per_user = args.claims_per_user;
        let interval = args.rate.map(|r| Duration::from_secs_f64(1.0 / r.max(1.0)));
        tasks.push(tokio::spawn(async move {
            let mut hist = new_hist();
            let mut outcomes: HashMap<String, u64> = HashMap::new();
            let mut acked: Vec<(usize, String)> = Vec::new();
            let mut transport_errors = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let user = i / per_user;
                let t0 = match interval {
                    Some(every) => {
                        let due = started + every * i as u32;
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    None => Instant::now(),
                };
                let sent = client.send(
                    http::Method::POST,
                    "/ticket/get",
                    Some(&tokens[user]),
                    Some(body.clone()),
                    &[],
                );
                match sent.await {
                    Ok(res) => {
                        let _ = hist.record((t0.elapsed().as_micros() as u64).max(1));
                        if res.status == 200 {
                            *outcomes.entry("success".into()).or_default() += 1;
                            if let Some(code) = res.data()["code"].as_str() {
                                acked.push((user, code.to_owned()));
                            }
                        } else {
                            let code = res.error_code().unwrap_or("NO_ERROR_CODE").to_owned();
                            *outcomes.entry(code).or_default() += 1;
                        }
                    }
                    Err(_) => transport_errors += 1,
                }
            }
            (hist, outcomes, acked, transport_errors)
        }));
    }
    let mut hist = new_hist();
    let mut outcomes = BTreeMap::new();
    let mut acked = vec![Vec::new(); args.users];
    let mut transport_errors = 0;
    for t in tasks {
        let (h, o, a, e) = t.await?;
        hist.add(&h).context("merging histograms")?;
        for (k, v) in o {
            *outcomes.entry(k).or_default() += v;
        }
        for (user, code) in a {
            acked[user].push(code);
        }
        transport_errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    if transport_errors > 0 {
        outcomes.insert("TRANSPORT_ERROR".into(), transport_errors);
    }
    Ok(RushOutcome {
        phase: phase(&hist, seconds),
        outcomes,
        acked,
        transport_errors,
    })
}

#[allow(clippy::too_many_arguments)]
async fn verify(
    client: &Arc<ApiClient>,
    args: &BenchArgs,
    tokens: &[String],
    outcome: RushOutcome,
    baseline: Option<Phase>,
    limit: u64,
    total_codes: u64,
    detail_path: &str,
) -> anyhow::Result<Report> {
    let mut violations = Vec::new();
    let mut all_codes: HashSet<String> = HashSet::new();
    let mut acknowledged = 0;
    for (user, codes) in outcome.acked.iter().enumerate() {
        let distinct: HashSet<&String> = codes.iter().collect();
        acknowledged += distinct.len();
        if distinct.len() as u64 > limit {
            violations.push(format!(
                "user {user} was acknowledged {} codes; the limit is {limit}",
                distinct.len()
            ));
        }
        for code in distinct {
            if !all_codes.insert(code.clone()) {
                violations.push(format!("code {code} was acknowledged to two users"));
            }
        }
        // The server's own view of this user must contain every acknowledged code.
        let list = client
            .get("/ticket/list?pageSize=100", Some(&tokens[user]))
            .await?;
        let held: HashSet<String> = list.data()["claims"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .filter(|c| c["actId"] == args.activity)
                    .filter_map(|c| c["code"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if held.len() as u64 > limit {
            violations.push(format!(
                "user {user} holds {} codes; the limit is {limit}",
                held.len()
            ));
        }
        for code in codes {
            if !held.contains(code) {
                violations.push(format!(
                    "code {code} acknowledged to user {user} is missing from their /ticket/list"
                ));
            }
        }
    }
    let after = client.get(detail_path, None).await?;
    let claimed_after = after.data()["claimed"].as_u64().unwrap_or(0);
    let remaining_after = after.data()["remaining"].as_u64().unwrap_or(0);
    if claimed_after + remaining_after != total_codes {
        violations.push(format!(
            "claimed ({claimed_after}) + remaining ({remaining_after}) != total codes ({total_codes})"
        ));
    }
    if acknowledged as u64 > claimed_after {
        violations.push(format!(
            "{acknowledged} codes acknowledged but only {claimed_after} claimed"
        ));
    }
    let report = Report {
        activity: args.activity.clone(),
        users: args.users,
        concurrency: args.concurrency,
        baseline,
        rush: outcome.phase,
        outcomes: outcome.outcomes,
        acknowledged,
        total_codes,
        claimed_after,
        remaining_after,
        violations,
    };
    let _ = outcome.transport_errors;
    Ok(report)
}

/// Prints `report` as a table (or JSON) and fails when an invariant broke.
pub fn print(report: &Report, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        let row = |name: &str, p: &Phase| {
            println!(
                "{name:<10} {:>9} req  {:>8.2} s  {:>10.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  p999 {:>7.2} ms  max {:>7.2} ms",
                p.requests, p.seconds, p.requests_per_sec, p.p50_ms, p.p99_ms, p.p999_ms, p.max_ms
            )
        };
        println!(
            "activity {}  users {}  concurrency {}",
            report.activity, report.users, report.concurrency
        );
        if let Some(b) = &report.baseline {
            row("hello", b);
        }
        row("claim", &report.rush);
        if let Some(b) = &report.baseline {
            println!(
                "claim/hello: {:.0}%",
                100.0 * report.rush.requests_per_sec / b.requests_per_sec.max(1e-9)
            );
        }
        for (k, v) in &report.outcomes {
            println!("  {k:<18} {v}");
        }
        println!(
            "codes: {} total, {} claimed, {} remaining, {} acknowledged to bench users",
            report.total_codes, report.claimed_after, report.remaining_after, report.acknowledged
        );
        if report.violations.is_empty() {
            println!("invariants: OK (no code twice, no user over the limit, every acknowledged code held, nothing oversold)");
        }
    }
    if !report.violations.is_empty() {
        for v in &report.violations {
            eprintln!("VIOLATION: {v}");
        }
        bail!("{} invariant violation(s)", report.violations.len());
    }
    Ok(())
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Serves a bare hyper hello-world on its own 2-thread runtime and measures
/// `GET /` at the bench's concurrency, for as many requests as the rush sends.
async fn hello_baseline(args: &BenchArgs) -> anyhow::Result<Phase> {
    use hyper::{server::conn::http1, service::service_fn, Response};
    use hyper_util::rt::TokioIo;

    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"Hello, World!"),
                    )))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let client = Arc::new(ApiClient::new(
        vec![format!("http://{addr}")],
        args.concurrency,
    )?);
    let total = (args.users * args.claims_per_user).max(1000);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = new_hist();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let t0 = Instant::now();
                if client.get("/", None).await.is_ok() {
                    let _ = hist.record((t0.elapsed().as_micros() as u64).max(1));
                }
            }
            hist
        }));
    }
    let mut hist = new_hist();
    for t in tasks {
        hist.add(&t.await?).context("merging histograms")?;
    }
    let result = phase(&hist, started.elapsed().as_secs_f64());
    runtime.shutdown_background();
    Ok(result)
}
