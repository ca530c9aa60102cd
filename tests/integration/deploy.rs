//! The shipped deployment files work with the real binary: Nginx in front of
//! a node, and every metric the alert rules and dashboard use exists.

use std::{
    collections::BTreeSet,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use ticketd::bench::ApiClient;

use crate::{
    cluster::{cluster_activity, Cluster},
    common::{exchange, raw_get, services::free_port, RawAnswer},
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Nginx started on the shipped config, pointed at `upstream`: the sale's
/// server on `port`, its plain-HTTP redirect on `redirect_port`, with a
/// self-signed certificate made for the test. The sale's server speaks
/// plain HTTP (the tests' clients and the bench have no TLS) unless started
/// with [`Nginx::start_tls`].
struct Nginx {
    child: Child,
    port: u16,
    redirect_port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(upstreams: &[&str]) -> Nginx {
        Nginx::start_with(upstreams, false)
    }

    /// As shipped: the sale's server over TLS.
    fn start_tls(upstreams: &[&str]) -> Nginx {
        Nginx::start_with(upstreams, true)
    }

    fn start_with(upstreams: &[&str], tls: bool) -> Nginx {
        let Ok(version) = Command::new(nginx()).arg("-v").output() else {
            panic!("nginx is missing: run `apt-get install -y nginx-light` (./scripts/test does it)");
        };
        assert!(version.status.success());
        // A free port can be taken by another test's server between our
        // probe and Nginx's bind; then Nginx exits and the port still
        // answers — someone else's. So: start, and make sure it is Nginx.
        for _ in 0..5 {
            if let Some(nginx) = Nginx::try_start(upstreams, tls) {
                return nginx;
            }
        }
        panic!("nginx did not start on a free port in 5 tries");
    }

    fn try_start(upstreams: &[&str], tls: bool) -> Option<Nginx> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let redirect_port = std::iter::repeat_with(free_port).find(|&p| p != port).unwrap();
        let shipped = std::fs::read_to_string(format!("{ROOT}/deploy/nginx.conf")).unwrap();
        let d = dir.path().display();
        self_signed(dir.path());
        let conf = shipped
            .replace(
                "pid /run/nginx.pid;",
                &format!("pid {d}/nginx.pid;\nerror_log {d}/error.log;"),
            )
            .replace("/var/lib/nginx/ticketd-assets", &format!("{d}/cache-assets"))
            .replace("/var/lib/nginx/ticketd-page", &format!("{d}/cache-page"))
            .replace("/var/lib/nginx/ticketd", &format!("{d}/cache"))
            .replace("/etc/letsencrypt/live/tickets.example.com", &d.to_string())
            .replace("/var/www/letsencrypt", &format!("{d}/acme"))
            // Without reuseport here: two test Nginxes given the same free
            // port would otherwise both bind it and split its connections.
            .replace(
                "listen 80 reuseport backlog=4096;",
                &format!("listen 127.0.0.1:{redirect_port};"),
            )
            .replace(
                "listen 443 ssl http2 reuseport backlog=4096;",
                &format!("listen 127.0.0.1:{port}{};", if tls { " ssl http2" } else { "" }),
            )
            .replace(
                "server 127.0.0.1:3000 max_fails=3 fail_timeout=5s;",
                &upstreams
                    .iter()
                    .map(|u| format!("server {u} max_fails=3 fail_timeout=5s;"))
                    .collect::<Vec<_>>()
                    .join("\n        "),
            )
            .replace("# server 127.0.0.1:3010 max_fails=3 fail_timeout=5s;", "")
            .replace(
                "\nhttp {",
                &format!("\nhttp {{\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;"),
            );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let check = Command::new(nginx()).args(["-t", "-c"]).arg(&path).output().unwrap();
        assert!(
            check.status.success(),
            "nginx -t: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(nginx())
            .args(["-c"])
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut nginx = Nginx {
            child,
            port,
            redirect_port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if nginx.child.try_wait().unwrap().is_some() {
                return None; // could not bind: the port was taken
            }
            if let Some(server) = server_header(port) {
                // Ours, or another process on the port we were given.
                return server.eq_ignore_ascii_case("nginx").then_some(nginx);
            }
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Debian's nginx, found where `apt-get install nginx-light` puts it even
/// when `/usr/sbin` is not on the PATH (a user's shell running
/// `cargo nextest` by hand; `./scripts/test` adds it).
fn nginx() -> &'static str {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("nginx").is_file()));
    if on_path || !std::path::Path::new("/usr/sbin/nginx").is_file() {
        "nginx"
    } else {
        "/usr/sbin/nginx"
    }
}

/// A self-signed certificate for the test Nginx, where the shipped config
/// names certbot's files: `fullchain.pem` and `privkey.pem` in `dir`.
fn self_signed(dir: &std::path::Path) {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args(["-days", "2", "-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(dir.join("privkey.pem"))
        .arg("-out")
        .arg(dir.join("fullchain.pem"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): run ./scripts/test once, which installs it"));
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One request over TLS to `port` (OpenSSL's client: the tests' own have no
/// TLS); the whole answer, head and body. The certificate is not checked.
/// Given up after 20 s (coreutils' `timeout`): a stuck Nginx fails the test.
fn https(port: u16, head: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("timeout")
        .args([
            "20",
            "openssl",
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "localhost",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl");
    child.stdin.take().unwrap().write_all(head.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `Server` header of what answers `GET /admin/` on `port` (the shipped
/// config answers that itself, without an upstream), if anything answers.
fn server_header(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /admin/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let server = out.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("server:")
            .map(|v| v.trim().to_owned())
    });
    Some(server.unwrap_or_default())
}

impl Drop for Nginx {
    /// SIGTERM, not SIGKILL: Nginx's master then stops its workers. Killed,
    /// it left them running, orphaned (hundreds after a few suites).
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `head` from `source` (a loopback address) through Nginx and, if
/// `answer`, reads the status; the stream is returned to keep it open.
async fn send_from(source: &str, port: u16, head: &str, answer: bool) -> (tokio::net::TcpStream, Option<u16>) {
    let (stream, text) = exchange_from(source, port, head, answer).await;
    let status = text.and_then(|t| t.split(' ').nth(1).and_then(|s| s.parse().ok()));
    (stream, status)
}

/// Sends `head` from `source` through Nginx and, if `answer`, reads the
/// whole answer (the request should close the connection).
async fn exchange_from(source: &str, port: u16, head: &str, answer: bool) -> (tokio::net::TcpStream, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    if !answer {
        return (stream, None);
    }
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "Nginx did not answer within 10 s");
    (stream, Some(String::from_utf8_lossy(&out).into_owned()))
}

/// Each node counts the registrations of an address that reach it, so
/// behind the shipped Nginx (`least_conn` over N nodes) an address made N
/// times the accounts `registrations_per_ip_per_hour` allows. Nginx now
/// holds one limit for all the nodes: thirty at once, then one a minute;
/// past it 429 in the error shape, while another address registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nginx_limits_an_addresss_registrations_across_nodes() {
    let config = crate::common::behind_proxy(crate::common::base_config(), "");
    let (a, b) = (
        crate::common::TestApp::start(&config),
        crate::common::TestApp::start(&config),
    );
    let nginx = tokio::task::block_in_place(|| Nginx::start(&[a.addr.as_str(), b.addr.as_str()]));
    let register = |n: usize| {
        let body = format!(r#"{{"username":"farm{n}","password":"password-farm{n}"}}"#);
        format!(
            "POST /user/register HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let mut made = 0;
    let refused = loop {
        let (stream, status) = send_from("127.0.0.2", nginx.port, &register(made), true).await;
        drop(stream);
        if status == Some(429) {
            break made;
        }
        assert_eq!(status, Some(200), "registration {made}");
        made += 1;
        assert!(made <= 40, "forty registrations from one address went through");
    };
    assert!(refused >= 30, "only {refused} registrations before the limit");
    let (_, answer) = exchange_from("127.0.0.2", nginx.port, &register(100), true).await;
    let answer = answer.unwrap();
    assert!(answer.contains("\"code\":\"RATE_LIMITED\""), "{answer}");
    // When to come back: the zone refills one a minute (it said 1 s).
    assert!(answer.to_ascii_lowercase().contains("retry-after: 60\r\n"), "{answer}");
    let (_, status) = send_from("127.0.0.3", nginx.port, &register(101), true).await;
    assert_eq!(status, Some(200), "another address registers");
}

/// Issue 11, item 11: ticketd's `max_connections` is one global budget;
/// the shipped Nginx's `limit_conn` is the per-client cap in front of it.
/// One client holding 40 requests open (headers sent, body never) has the
/// ones past 32 refused, and more, while another client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_holding_requests_open_cannot_shut_out_another() {
    let app = crate::common::TestApp::start(
        &(crate::common::behind_proxy(
            crate::common::base_config().replace("[server]", "[server]\nmax_connections = 16"),
            "",
        ) + &crate::common::open_activity("nc", 1, 1)),
    );
    let nginx = tokio::task::block_in_place(|| Nginx::start(&[app.addr.as_str()]));
    let slow = "POST /user/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(send_from("127.0.0.2", nginx.port, slow, false).await.0);
    }
    // Nginx reads each head in its own time: wait until the cap is reached
    // (a further request from the same client is refused).
    let list = "GET /act/list HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, status) = send_from("127.0.0.2", nginx.port, list, true).await;
        if status == Some(429) {
            break;
        }
        assert_eq!(status, Some(200));
        assert!(
            Instant::now() < deadline,
            "no request past the cap was ever refused; nginx on port {}: {}",
            nginx.port,
            std::fs::read_to_string(nginx._dir.path().join("error.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another client is served, by Nginx and by the node behind it.
    let (_, status) = send_from("127.0.0.3", nginx.port, list, true).await;
    assert_eq!(status, Some(200));
    // (The capped connections were held open until here.)
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bench_through_the_shipped_nginx_in_front_of_two_nodes_keeps_the_invariants() {
    // Two cluster nodes; they trust Nginx (127.0.0.1) for X-Forwarded-For.
    let cluster = Cluster::start_configured(2, &cluster_activity("ng", 150, 1), "", |c| {
        crate::common::behind_proxy(c, "")
    });
    let upstreams: Vec<&str> = cluster.nodes.iter().map(|n| n.addr.as_str()).collect();
    let nginx = tokio::task::block_in_place(|| Nginx::start(&upstreams));
    let url = format!("http://127.0.0.1:{}", nginx.port);

    // Nginx limits claims per client address (200/s, burst 400): a bench
    // passes. (And account creation to thirty at once: the bench's sixty
    // are imported, as a load test's accounts are.)
    let csv: String = (0..60).map(|i| format!("ngfan{i},bench-password,ngfan{i}\n")).collect();
    cluster.nodes[0].import_user_csv(&csv);
    let report = crate::common::bench(
        &url,
        &[
            "--activity",
            "ng",
            "--users",
            "60",
            "--concurrency",
            "4",
            "--claims-per-user",
            "1",
            "--rate",
            "8",
            "--user-prefix",
            "ngfan",
        ],
    );
    assert_eq!(report["acknowledged"], 60, "{report}");
    assert_eq!(report["claimed_after"], 60);
    assert_eq!(cluster.drained("ng").await.len(), 60);
    // Nginx spread the claims over both nodes.
    for node in &cluster.nodes {
        let sold = crate::common::metric(node, "ticketd_claims_total{outcome=\"success\"}").await;
        assert!(sold > 0.0, "a node answered no claim");
    }

    // /act/list is cached for a second.
    let client = ApiClient::new(vec![url.clone()], 8).unwrap();
    let first = raw_get(&format!("127.0.0.1:{}", nginx.port), "/act/list").await;
    let second = raw_get(&format!("127.0.0.1:{}", nginx.port), "/act/list").await;
    assert!(
        first.contains("X-Cache: MISS") || first.contains("X-Cache: EXPIRED"),
        "{first}"
    );
    assert!(second.contains("X-Cache: HIT"), "{second}");

    // The fan's page through Nginx: the page, then its script from Nginx's cache.
    let page = raw_get(&format!("127.0.0.1:{}", nginx.port), "/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let script = crate::common::cdp::page_script(&page);
    let first = raw_get(&format!("127.0.0.1:{}", nginx.port), &script).await;
    let second = raw_get(&format!("127.0.0.1:{}", nginx.port), &script).await;
    assert!(
        first.starts_with("HTTP/1.1 200") && first.contains("immutable"),
        "{first}"
    );
    assert!(second.contains("X-Cache: HIT"), "{}", &second[..second.len().min(400)]);

    // A burst beyond Nginx's own limit (400 at once, then 200/s): its 429
    // carries ticketd's error shape. Without a session, so that every
    // answer past Nginx is a node's 401 and every 429 is Nginx's. Sixteen
    // at a time: all thousand at once would meet the per-address cap on
    // requests in progress (32, `limit_conn`, whose 429 looks the same)
    // first, and how many passed that depended on the box's speed (a
    // loaded run let 173 through).
    use futures::StreamExt;
    let body = json!({ "actId": "ng" });
    let answers: Vec<_> = futures::stream::iter(0..1000)
        .map(|_| client.post("/ticket/get", None, &body))
        .buffer_unordered(16)
        .collect()
        .await;
    let answers: Vec<_> = answers.iter().map(|a| a.as_ref().unwrap()).collect();
    let limited: Vec<_> = answers.iter().filter(|a| a.status == 429).collect();
    assert!(!limited.is_empty(), "nginx never limited the burst");
    for a in &limited {
        assert_eq!(a.body["ok"], false);
        assert_eq!(a.error_code(), Some("RATE_LIMITED"), "{}", a.body);
    }
    // The bench above spent part of the burst; still, hundreds of claims
    // at once from one address (fans behind one NAT) pass (the old 20 did
    // not).
    assert!(
        answers.iter().filter(|a| a.status == 401).count() >= 200,
        "Nginx let a few through, not a burst: {:?}",
        answers.iter().fold(std::collections::BTreeMap::new(), |mut m, a| {
            *m.entry(a.status).or_insert(0) += 1;
            m
        })
    );
    // The admin API is not reachable through Nginx.
    let admin = client.get("/admin/stats", None).await.unwrap();
    assert_eq!((admin.status, admin.error_code()), (404, Some("ROUTE_NOT_FOUND")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_alert_rules_and_dashboard_exists() {
    // A cluster node exposes every metric (the embedded ones too).
    let cluster = Cluster::start(1, &cluster_activity("m", 3, 1), "");
    let app = &cluster.nodes[0];
    let token = app.register("metric").await;
    app.claim(&token, "m").await;
    let metrics_text = app.raw_get("/metrics").await;
    let exposed = metrics_text.clone();
    // ticketd's own series, and the process's start time (a restart
    // between two scrapes shows only there).
    let names = |text: &str| -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for prefix in ["ticketd_", "process_"] {
            let mut rest = text;
            while let Some(i) = rest.find(prefix) {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                found.insert(tail[..end].to_owned());
                rest = &tail[end..];
            }
        }
        found
    };
    let exposed = names(&exposed);
    for file in ["deploy/prometheus-rules.yml", "deploy/grafana-dashboard.json"] {
        let text = std::fs::read_to_string(format!("{ROOT}/{file}")).unwrap();
        for name in names(&text) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .fold(name.clone(), |n, s| n.strip_suffix(s).map(str::to_owned).unwrap_or(n));
            let known = exposed
                .iter()
                .any(|e| *e == name || e.starts_with(&format!("{base}_")) || *e == base);
            assert!(known, "{file} uses {name}, which /metrics does not expose");
        }
    }
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{ROOT}/deploy/grafana-dashboard.json")).unwrap())
            .unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 6);
    // Series every node of a cluster reports whole (the cluster's stock, a
    // room's figures) are not summed across nodes: the stock and claimed
    // panels showed three times the stock on three nodes.
    let whole: Vec<&str> = metrics_text
        .lines()
        .filter(|l| l.starts_with("# HELP ") && l.contains("aggregate with max, not sum"))
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert!(
        whole.contains(&"ticketd_stock_remaining") && whole.contains(&"ticketd_claimed"),
        "{whole:?}"
    );
    let rules = std::fs::read_to_string(format!("{ROOT}/deploy/prometheus-rules.yml")).unwrap();
    let exprs = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        // Each rule whole (an expression may run over several lines).
        .chain(rules.split("- alert:").map(str::to_owned));
    for expr in exprs {
        for name in &whole {
            for (at, _) in expr.match_indices(name) {
                // The aggregation nearest the series is the one across
                // nodes: a max (a sum over ticket types may come after).
                let before = &expr[..at];
                let nearest = ["sum", "max", "min", "avg", "count"]
                    .into_iter()
                    .filter_map(|op| before.rfind(op).map(|i| (i, op)))
                    .max();
                let summed = matches!(nearest, Some((_, "sum" | "count")));
                assert!(
                    !summed,
                    "{expr} sums {name} across nodes, which every node reports whole"
                );
            }
        }
    }
}

/// A waiting fan's event stream through the shipped Nginx: its own location
/// (unbuffered, held past the heartbeat) and its own upstream without the
/// keepalive pool, so the node serves it on its light path. The first event
/// arrives through Nginx while the stream stays open.
///
/// And streams are not requests in progress: Nginx's per-address cap of 32
/// counted them, so 33 fans waiting behind one address (a carrier's NAT, a
/// campus) had that address refused everything else, the page and the
/// claims of those admitted included (from a review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_fans_event_streams_flow_through_the_shipped_nginx() {
    let app = crate::common::TestApp::start(
        &(crate::common::behind_proxy(crate::common::base_config(), "")
            + &crate::common::Act::new("nq")
                .window("+30m", "+1h")
                .with("admission = \"queue\"")
                .with("queue_opens = \"-1m\"")
                .ticket("nq-t", "Seat", crate::common::Codes::Generate(1))
                .toml()),
    );
    let nginx = tokio::task::block_in_place(|| Nginx::start(&[app.addr.as_str()]));
    let tokens = app.users("nq", 9).await;
    let client = ApiClient::new(vec![format!("http://127.0.0.1:{}", nginx.port)], 2).unwrap();
    for token in &tokens {
        let joined = client
            .post("/queue/join", Some(token), &json!({ "actId": "nq" }))
            .await
            .unwrap();
        assert_eq!(joined.status, 200, "{}", joined.body);
    }
    // Nine accounts, four streams each (the node's per-account cap): 36.
    let mut streams = Vec::new();
    for token in &tokens {
        for _ in 0..4 {
            streams.push(first_event_through(nginx.port, token).await);
        }
    }
    let page = raw_get(&format!("127.0.0.1:{}", nginx.port), "/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{}", &page[..page.len().min(400)]);
    drop(streams);
}

/// Opens `/queue/events?actId=nq` through Nginx at `port` as `token`, and
/// reads until its first event says "waiting"; the stream stays open.
async fn first_event_through(port: u16, token: &str) -> tokio::net::TcpStream {
    let (stream, text) = crate::common::open_event_stream(&format!("127.0.0.1:{port}"), token, "nq").await;
    assert!(text.contains("text/event-stream"), "{text}");
    // One fan's place in line: no cache on the way may keep it.
    assert!(
        text.to_ascii_lowercase().contains("cache-control: private, no-store"),
        "{text}"
    );
    assert!(text.contains("event: status"), "{text}");
    assert!(text.contains("\"state\":\"waiting\""), "{text}");
    stream
}

/// Asserts an answer is ticketd's JSON error shape with `code`.
fn assert_error_shape(answer: &RawAnswer, want: (u16, &str)) {
    let RawAnswer { status, head, body } = answer;
    assert_eq!(*status, want.0, "{head}\n{body}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "{head}\n{body}"
    );
    let parsed: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert_eq!(parsed["ok"], false, "{body}");
    assert_eq!(parsed["error"]["code"], want.1, "{body}");
    assert!(
        parsed["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Every error answer has ticketd's JSON shape, including those Nginx makes
/// itself before a node sees the request: a request it cannot read, a body,
/// header or URI past its limits, an unsupported HTTP feature, a node that
/// is down; and on port 80, which only redirects, what it cannot redirect.
/// (Nginx's defaults are HTML pages; a redirect to a named location
/// fails with a 500 for a request without a readable first line.) A node's
/// own error passes through untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_answers_its_own_refusals_in_the_error_shape() {
    let app = crate::common::TestApp::start(&crate::common::base_config());
    let nginx = tokio::task::block_in_place(|| Nginx::start(&[app.addr.as_str()]));
    let long = "a".repeat(9_000);
    // What neither server can serve: the sale's (443) and port 80, which
    // only redirects, answer it alike.
    let both: Vec<(Vec<u8>, (u16, &str))> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), (400, "BAD_REQUEST")),
        (
            b"POST /ticket/get HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n"
                .to_vec(),
            (413, "BODY_TOO_LARGE"),
        ),
        (
            format!("GET /act/list HTTP/1.1\r\nHost: t\r\nX-Big: {long}\r\n\r\n").into_bytes(),
            (400, "HEADERS_TOO_LARGE"),
        ),
        (
            format!("GET /{long} HTTP/1.1\r\nHost: t\r\n\r\n").into_bytes(),
            (414, "URI_TOO_LONG"),
        ),
        (
            b"GET /act/list HTTP/3.0\r\nHost: t\r\n\r\n".to_vec(),
            (505, "BAD_REQUEST"),
        ),
    ];
    let sale: Vec<(Vec<u8>, (u16, &str))> = vec![
        (
            b"GET /act/list HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            (400, "BAD_REQUEST"),
        ),
        (
            b"POST /ticket/get HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 20000\r\n\r\n"
                .to_vec(),
            (413, "BODY_TOO_LARGE"),
        ),
        (
            b"POST /ticket/get HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: bogus\r\n\r\n".to_vec(),
            (501, "BAD_REQUEST"),
        ),
        (
            b"POST /user/register HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 20000\r\n\r\n"
                .to_vec(),
            (413, "BODY_TOO_LARGE"),
        ),
        // The error pages themselves are not reachable from outside.
        (
            b"GET /.errors/bad_request HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
            (404, "ROUTE_NOT_FOUND"),
        ),
        (
            b"GET /admin/stats HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
            (404, "ROUTE_NOT_FOUND"),
        ),
        // The node's own answer, through Nginx.
        (
            b"GET /act/detail?actId=nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
            (404, "ACTIVITY_NOT_FOUND"),
        ),
    ];
    // Port 80's own: a challenge file and a folder, for the method and
    // listing refusals, and its error page, not reachable either.
    let challenges = nginx._dir.path().join("acme/.well-known/acme-challenge");
    std::fs::create_dir_all(challenges.join("folder")).unwrap();
    std::fs::write(challenges.join("token"), "proof").unwrap();
    let plain: Vec<(Vec<u8>, (u16, &str))> = vec![
        (
            b"GET /.well-known/acme-challenge/none HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
            (404, "ROUTE_NOT_FOUND"),
        ),
        (
            b"GET /.errors/plain_http HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
            (404, "ROUTE_NOT_FOUND"),
        ),
        (
            b"POST /.well-known/acme-challenge/token HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec(),
            (405, "METHOD_NOT_ALLOWED"),
        ),
        (
            b"GET /.well-known/acme-challenge/folder/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
            (403, "FORBIDDEN"),
        ),
    ];
    let runs = [
        (nginx.port, both.iter().chain(&sale)),
        (nginx.redirect_port, both.iter().chain(&plain)),
    ];
    for (port, cases) in runs {
        for (request, want) in cases {
            let answer = exchange(&format!("127.0.0.1:{port}"), request).await;
            assert_error_shape(&answer, *want);
        }
    }
    let challenge = exchange(
        &format!("127.0.0.1:{}", nginx.redirect_port),
        b"GET /.well-known/acme-challenge/token HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        (challenge.status, challenge.body.as_str()),
        (200, "proof"),
        "{}",
        challenge.head
    );

    // The node down: Nginx's 502 becomes a 503 to retry, in the shape.
    // Port 1: nothing listens there (a free port could be another test's).
    let dead = "127.0.0.1:1".to_owned();
    let orphan = tokio::task::block_in_place(|| Nginx::start(&[dead.as_str()]));
    // Registration too, the opening's busiest route with a location of
    // its own (an error_page set there would drop these).
    for request in [
        &b"GET /act/list HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"[..],
        b"POST /user/register HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    ] {
        let answer = exchange(&format!("127.0.0.1:{}", orphan.port), request).await;
        assert_error_shape(&answer, (503, "UNAVAILABLE"));
        assert_eq!(answer.header("retry-after"), Some("2"), "{}", answer.head);
    }
}

/// Fans send passwords and bearer tokens: the shipped Nginx served the sale
/// over plain HTTP only. Now its port 80 redirects every request (a POST
/// too: 308 keeps the method) to the same URL over HTTPS, the sale is
/// served over TLS, and its answers carry HSTS. And the page itself is
/// served from Nginx's copy while the node is down: a fan who reloads in
/// the rush got the JSON of Nginx's 503 as the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nginx_serves_the_sale_over_https_and_the_page_through_an_outage() {
    let mut app = crate::common::TestApp::start(&crate::common::base_config());
    let nginx = tokio::task::block_in_place(|| Nginx::start_tls(&[app.addr.as_str()]));

    // Port 80 only redirects, keeping the method (308); so does plain HTTP
    // sent to the TLS port (a URL typed with :443), not answered with
    // Nginx's HTML 400.
    for (port, request, to) in [
        (
            nginx.redirect_port,
            "POST /user/login HTTP/1.1\r\nHost: tickets.example.com\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            "https://tickets.example.com/user/login",
        ),
        (
            nginx.port,
            "GET /act/list HTTP/1.1\r\nHost: tickets.example.com\r\nConnection: close\r\n\r\n",
            "https://tickets.example.com/act/list",
        ),
    ] {
        let redirect = exchange(&format!("127.0.0.1:{port}"), request.as_bytes()).await;
        assert_eq!(redirect.status, 308, "{}", redirect.head);
        assert!(redirect.head.contains(&format!("Location: {to}")), "{}", redirect.head);
    }

    let get = |path: &str| {
        let head = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        tokio::task::block_in_place(|| https(nginx.port, &head))
    };
    let health = get("/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(
        health.contains("Strict-Transport-Security: max-age=31536000"),
        "{health}"
    );
    let page = get("/");
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("<!doctype html>"),
        "{page}"
    );
    assert!(page.contains("Strict-Transport-Security: max-age=31536000"), "{page}");

    // A browser gets the page and the list over TLS, by HTTP/2.
    let mut b = crate::common::cdp::Browser::launch_with(&["--ignore-certificate-errors"]).await;
    b.goto(&format!("https://localhost:{}/", nginx.port)).await;
    b.wait_for("document.querySelector('main h1')", "the list over TLS")
        .await;
    assert_eq!(
        b.eval("performance.getEntriesByType('navigation')[0].nextHopProtocol")
            .await,
        "h2"
    );
    assert!(b.errors.is_empty(), "console errors: {:#?}", b.errors);

    // A body past the limit, sent by HTTP/2 as a browser sends it, is
    // answered in the API's JSON. It got Nginx's HTML 413: over HTTP/2 the
    // body is not discarded, so the jump to the JSON answer failed the same
    // size check again.
    let answer = b
        .eval(
            "fetch('/ticket/get', {method: 'POST', headers: {'Content-Type': 'application/json'}, \
             body: 'x'.repeat(20000)}).then(async r => [r.status, r.headers.get('content-type'), await r.text()])",
        )
        .await;
    assert_eq!(answer[0], 413, "{answer}");
    let body: Value =
        serde_json::from_str(answer[2].as_str().unwrap()).unwrap_or_else(|_| panic!("not JSON: {answer}"));
    assert_eq!(body["error"]["code"], "BODY_TOO_LARGE", "{answer}");

    // The node goes away: the page still comes, from Nginx's copy, once
    // that copy is past its ten seconds too.
    app.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page = get("/");
        assert!(
            page.starts_with("HTTP/1.1 200") && page.contains("<!doctype html>"),
            "{page}"
        );
        if page.contains("X-Cache: STALE") {
            break;
        }
        assert!(Instant::now() < deadline, "never served stale: {page}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The API says it is down, in its own shape.
    let list = get("/act/detail?actId=x");
    assert!(list.starts_with("HTTP/1.1 503"), "{list}");
}
