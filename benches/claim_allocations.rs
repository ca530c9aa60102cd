//! Heap allocations per successful claim: a criterion bench whose
//! measurement is the number of allocations, not time. A global allocator
//! wrapping mimalloc (the binary's allocator) counts every allocation in
//! the process, on every thread: the request's own, and its share of the
//! journal writer's, the store applier's and the statistics'.
//!
//! - `allocations/claim_in_process`: `Claimer::claim` on a running node
//!   (catalog, claim token, ledger, pool, journal group commit, settle);
//! - `allocations/claim_http`: `POST /ticket/get` through the real server
//!   on loopback, every request a success — what the node does per claim
//!   (hyper, the guard, the session, the body, the claim, the JSON answer,
//!   the statistics). The client writes request bytes built beforehand and
//!   reads the answer into a fixed buffer, so it allocates nothing itself.
//!
//! Criterion reports "allocs" per iteration (one claim). Run:
//! `cargo bench --bench claim_allocations`.

use std::{
    alloc::{GlobalAlloc, Layout},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use criterion::{
    measurement::{Measurement, ValueFormatter},
    Criterion, SamplingMode, Throughput,
};
use ticketd::{
    app::App,
    auth::{resolve_secret, session::SessionKey},
    claim::ClaimRequest,
    clock::now_ms,
    config::Config,
    signals::Signals,
    worker::Runner,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Allocations since the process started (`alloc`, `alloc_zeroed` and `realloc` calls).
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

struct Counting;

// SAFETY: delegates every call to mimalloc unchanged; only counts them.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Criterion's measurement: allocations between start and end.
struct Allocations;

impl Measurement for Allocations {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        ALLOCATIONS.load(Ordering::SeqCst)
    }
    fn end(&self, start: u64) -> u64 {
        ALLOCATIONS.load(Ordering::SeqCst) - start
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &AllocationsFormatter
    }
}

struct AllocationsFormatter;

impl ValueFormatter for AllocationsFormatter {
    fn scale_values(&self, _typical: f64, _values: &mut [f64]) -> &'static str {
        "allocs"
    }
    fn scale_throughputs(&self, _typical: f64, _throughput: &Throughput, values: &mut [f64]) -> &'static str {
        // Allocations per element, which is what per-iteration already is.
        let _ = values;
        "allocs/claim"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "allocs"
    }
}

fn config(dir: &Path) -> Config {
    let text = format!(
        r#"
[storage]
path = "{}"
[journal]
fsync = "never"
[auth]
argon2_memory_kib = 8
argon2_iterations = 1
session_secret = "an example secret for the allocations bench, not for use"
[security]
claim_rate_per_ip = 1000000000.0
claim_burst_per_ip = 1000000000
claim_rate_per_user = 1000000.0
claim_burst_per_user = 1000000
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

/// A node serving on loopback, and what a client needs to claim from it.
struct Node {
    app_state: Arc<ticketd::state::AppState>,
    sessions: SessionKey,
    addr: std::net::SocketAddr,
    next_user: AtomicU64,
    next_code: AtomicU64,
    _dir: tempfile::TempDir,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

impl Node {
    async fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let app = App::start(config.clone(), dir.path().join("bench.toml"), Arc::new(Runner::new())).unwrap();
        let app_state = app.state().clone();
        let secret = resolve_secret(&config, &app_state.store).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_shutdown, shutdown) = tokio::sync::watch::channel(false);
        let (_reload_tx, reload) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let _keep = _reload_tx;
            app.run(listener, None, Signals { reload, shutdown }).await.unwrap();
        });
        Node {
            app_state,
            sessions: SessionKey::new(secret.as_bytes()),
            addr,
            next_user: AtomicU64::new(1),
            next_code: AtomicU64::new(0),
            _dir: dir,
            _shutdown,
        }
    }

    /// `n` fresh codes in stock and `n` fresh users with their claim tokens.
    fn prepare(&self, n: u64) -> Vec<(u64, String)> {
        let first = self.next_code.fetch_add(n, Ordering::Relaxed);
        let codes: Vec<String> = (first..first + n).map(|i| format!("C{i:015}")).collect();
        self.app_state.inventory.pool("bench-t").add_codes(&codes);
        let catalog = self.app_state.catalog.load();
        let activity = catalog.activity("bench").expect("bench activity");
        let first_user = self.next_user.fetch_add(n, Ordering::Relaxed);
        (first_user..first_user + n)
            .map(|user| {
                let token = self.app_state.claimer.claim_token(user, activity, now_ms()).unwrap();
                (user, token)
            })
            .collect()
    }

    /// The bytes of a claim request for `user`.
    fn request(&self, user: u64, claim_token: &str) -> Vec<u8> {
        let (session, _) = self.sessions.issue(user, 0, now_ms() + 3_600_000);
        let body = format!(r#"{{"actId":"bench","claimToken":"{claim_token}"}}"#);
        format!(
            "POST /ticket/get HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {session}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// Reads one HTTP/1.1 answer into `buf` (no allocation) and checks it is a 200.
async fn read_answer(stream: &mut TcpStream, buf: &mut [u8]) {
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await.unwrap();
        assert!(n > 0, "the node closed the connection");
        len += n;
        let Some(head_end) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..head_end]).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "a claim failed: {head}");
        // Compared in place: a lowercased copy of each header line was the
        // client's allocations, counted as the claim's.
        let body_len: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().unwrap())
            })
            .unwrap();
        if len >= head_end + 4 + body_len {
            return;
        }
    }
}

fn allocations(c: &mut Criterion<Allocations>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let node = runtime.block_on(Node::start());
    let mut group = c.benchmark_group("allocations");
    // Criterion sizes the samples by the warm-up's wall-clock time per
    // iteration, whatever the measurement: two seconds is tens of
    // thousands of claims (2 ms was 20 to 70, too few for the applier's
    // batches, 25 ms apart, to fall inside the counted windows).
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(1));
    group.bench_function("claim_in_process", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let users = node.prepare(iters);
            let state = node.app_state.clone();
            async move {
                let start = Allocations.start();
                for (user, token) in &users {
                    let catalog = state.catalog.load();
                    let req = ClaimRequest {
                        user_id: *user,
                        account_created_ms: Some(0),
                        activity_id: "bench",
                        ticket_id: None,
                        idempotency_key: None,
                        claim_token: Some(token),
                        pow_nonce: None,
                    };
                    state.claimer.claim(&catalog, req).await.expect("claimed");
                }
                Allocations.end(start)
            }
        });
    });
    group.bench_function("claim_http", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let requests: Vec<Vec<u8>> = node
                .prepare(iters)
                .iter()
                .map(|(user, token)| node.request(*user, token))
                .collect();
            let addr = node.addr;
            async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let mut buf = [0u8; 8192];
                // The connection's own set-up is not a claim's cost.
                stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
                    .await
                    .unwrap();
                read_answer(&mut stream, &mut buf).await;
                let start = Allocations.start();
                for request in &requests {
                    stream.write_all(request).await.unwrap();
                    read_answer(&mut stream, &mut buf).await;
                }
                Allocations.end(start)
            }
        });
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().with_measurement(Allocations).configure_from_args();
    allocations(&mut c);
    c.final_summary();
}
