//! Criterion benches of the claim path's parts.
//!
//! - `pool_take`: draining a code pool from 1, 2 and 8 threads at once;
//! - `claim`: the whole in-process claim (catalog, ledger, pool, journal
//!   group commit, settle) at 64 concurrent claims, and the sold-out answer;
//! - `session_verify`: checking a session token (on every claim);
//! - `journal_append`: making claims durable, per fsync policy.
//!
//! Run: `cargo bench --bench claim_path`.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ticketd::{
    app::App,
    auth::SessionKey,
    claim::ClaimRequest,
    config::{Config, FsyncPolicy},
    inventory::CodePool,
    journal::{Entry, Journal, JournalSetup},
    vocab::{Claim, CommitError},
    worker::Runner,
};

fn codes(n: usize, tag: &str) -> Vec<String> {
    (0..n).map(|i| format!("{tag}{i:012}")).collect()
}

fn pool_take(c: &mut Criterion) {
    let mut group = c.benchmark_group("pool_take");
    const PER_THREAD: usize = 20_000;
    for threads in [1usize, 2, 8] {
        group.throughput(Throughput::Elements((threads * PER_THREAD) as u64));
        group.bench_with_input(BenchmarkId::from_parameter(threads), &threads, |b, &threads| {
            let stock = codes(threads * PER_THREAD, "P");
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let pool = CodePool::new();
                    pool.add_codes(&stock);
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for _ in 0..threads {
                            s.spawn(|| {
                                for _ in 0..PER_THREAD {
                                    criterion::black_box(pool.take().expect("stock"));
                                }
                            });
                        }
                    });
                    total += start.elapsed();
                }
                total
            });
        });
    }
    group.finish();
}

fn bench_config(dir: &Path, fsync: &str) -> Config {
    let text = format!(
        r#"
[storage]
path = "{}"
[journal]
fsync = "{fsync}"
[auth]
argon2_memory_kib = 8
argon2_iterations = 1
[limits]
max_in_flight_claims = 100000
[[activity]]
id = "bench"
name = "Bench"
start_time = "-1m"
end_time = "+1h"
  [[activity.ticket]]
  id = "bench-t"
  name = "T"
  codes = ["SEED"]
"#,
        dir.display()
    );
    Config::from_toml(&text, Path::new("bench.toml"), dir.to_owned()).expect("valid bench config")
}

fn claim(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("claim");
    group.sample_size(20);
    const CONCURRENCY: u64 = 64;
    for fsync in ["never", "always"] {
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("success", fsync), |b| {
            b.to_async(&runtime).iter_custom(|iters| async move {
                let dir = tempfile::tempdir().unwrap();
                let app = App::start(
                    bench_config(dir.path(), fsync),
                    dir.path().join("bench.toml"),
                    Arc::new(Runner::new()),
                )
                .unwrap();
                let state = app.state().clone();
                state.inventory.pool("bench-t").add_codes(&codes(iters as usize, "C"));
                // Claim tokens come from /act/detail before the rush; not timed.
                let tokens: Arc<Vec<String>> = Arc::new((1..=iters).map(|user| claim_token(&state, user)).collect());
                let next = Arc::new(AtomicU64::new(0));
                let start = Instant::now();
                let tasks: Vec<_> = (0..CONCURRENCY.min(iters))
                    .map(|_| {
                        let (state, next, tokens) = (state.clone(), next.clone(), tokens.clone());
                        tokio::spawn(async move {
                            loop {
                                let i = next.fetch_add(1, Ordering::Relaxed);
                                if i >= iters {
                                    break;
                                }
                                let catalog = state.catalog.load();
                                let req = request(i + 1, &tokens[i as usize]);
                                state.claimer.claim(&catalog, req).await.expect("claimed");
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                let elapsed = start.elapsed();
                app.stop().await;
                elapsed
            });
        });
    }
    group.bench_function("sold_out", |b| {
        let dir = tempfile::tempdir().unwrap();
        let app = App::start(
            bench_config(dir.path(), "never"),
            dir.path().join("bench.toml"),
            Arc::new(Runner::new()),
        )
        .unwrap();
        let state = app.state().clone();
        // User 1 takes the one seeded code; user 2 then meets the sold-out activity.
        let (first, second) = (claim_token(&state, 1), claim_token(&state, 2));
        runtime.block_on(async {
            let catalog = state.catalog.load();
            state
                .claimer
                .claim(&catalog, request(1, &first))
                .await
                .expect("the seeded code");
        });
        b.to_async(&runtime).iter(|| {
            let (state, token) = (state.clone(), second.clone());
            async move {
                let catalog = state.catalog.load();
                criterion::black_box(state.claimer.claim(&catalog, request(2, &token)).await.unwrap_err())
            }
        });
        runtime.block_on(app.stop());
    });
    group.finish();
}

/// The claim token `/act/detail` would give `user`.
fn claim_token(state: &ticketd::state::AppState, user: u64) -> String {
    let catalog = state.catalog.load();
    let activity = catalog.activity("bench").expect("bench activity");
    state
        .claimer
        .claim_token(user, activity, ticketd::clock::now_ms())
        .expect("open")
}

fn request(user_id: u64, token: &str) -> ClaimRequest<'_> {
    ClaimRequest {
        user_id,
        account_created_ms: Some(0),
        activity_id: "bench",
        ticket_id: None,
        idempotency_key: None,
        claim_token: Some(token),
        pow_nonce: None,
    }
}

fn session_verify(c: &mut Criterion) {
    let key = SessionKey::new(b"an example key of at least 32 bytes!");
    let (token, _) = key.issue(42, 0, i64::MAX);
    let mut group = c.benchmark_group("session_verify");
    group.throughput(Throughput::Elements(1));
    group.bench_function("valid", |b| {
        b.iter(|| key.verify(criterion::black_box(&token), 0).unwrap())
    });
    let forged = format!("{}A", &token[..token.len() - 1]);
    group.bench_function("forged", |b| {
        b.iter(|| key.verify(criterion::black_box(&forged), 0).unwrap_err())
    });
    group.finish();
}

/// A journal entry that counts its settlement.
struct Counted(Claim, Arc<AtomicU64>);

impl Entry for Counted {
    fn claim(&self) -> &Claim {
        &self.0
    }
    fn settle(self, result: Result<u64, CommitError>) {
        result.expect("journal write");
        self.1.fetch_add(1, Ordering::Release);
    }
    fn in_doubt(self) {
        panic!("a journal write failed in the bench");
    }
}

fn journal_append(c: &mut Criterion) {
    let mut group = c.benchmark_group("journal_append");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));
    for (name, policy) in [("never", FsyncPolicy::Never), ("always", FsyncPolicy::Always)] {
        group.bench_function(BenchmarkId::new("fsync", name), |b| {
            b.iter_custom(|iters| {
                let dir = tempfile::tempdir().unwrap();
                let (tx, rx) = crossbeam_channel::unbounded();
                let drain = std::thread::spawn(move || while rx.recv().is_ok() {});
                let mut config = bench_config(dir.path(), name).journal;
                config.fsync = policy;
                config.queue_capacity = 1 << 20;
                let runner = Runner::new();
                let journal: Journal<Counted> = Journal::start(
                    JournalSetup {
                        dir: dir.path().join("journal"),
                        config,
                        next_seq: 1,
                        applier: tx,
                        applied_seq: Arc::new(AtomicU64::new(0)),
                    },
                    &runner,
                )
                .expect("journal");
                let settled = Arc::new(AtomicU64::new(0));
                let claim = Claim {
                    id: 0,
                    activity_id: "bench".into(),
                    ticket_id: "bench-t".into(),
                    code: "ABCDEFGHJKMNPQRS".into(),
                    user_id: 1,
                    claimed_at_ms: 0,
                    idempotency_key: None,
                };
                let start = Instant::now();
                for _ in 0..iters {
                    journal.append(Counted(claim.clone(), settled.clone()));
                }
                while settled.load(Ordering::Acquire) < iters {
                    std::hint::spin_loop();
                }
                let elapsed = start.elapsed();
                journal.close();
                drain.join().unwrap();
                elapsed
            });
        });
    }
    group.finish();
}

criterion_group!(benches, pool_take, claim, session_verify, journal_append);
criterion_main!(benches);
