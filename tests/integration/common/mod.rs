//! The test harness: [`TestApp`] runs the real `ticketd` binary on a free
//! loopback port with an inline config in its own temp dir, and speaks HTTP
//! to it with the library's API client.
//!
//! Waiting is always for a condition (a log line, a process exit, an HTTP
//! answer), with a deadline that fails the test loudly; never a bare sleep.

#![allow(dead_code)]

pub mod cdp;
pub mod relay;
pub mod services;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tempfile::TempDir;
pub use ticketd::bench::{ApiClient, ApiResponse};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ticketd");

/// Settings every test config shares: a free port, cheap argon2, quiet logs.
pub fn base_config() -> String {
    r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"
# Every test client is 127.0.0.1: a per-address share would throttle the suite.
max_connections_per_ip = 1000000

[storage]
path = "data"

[auth]
argon2_memory_kib = 8
argon2_iterations = 1
# Every test client is 127.0.0.1: per-address shares would throttle the suite.
hashes_per_ip = 1000000

[security]
# Every test client is 127.0.0.1: per-address limits would throttle the suite.
# The security tests set their own limits.
claim_rate_per_ip = 1000000.0
claim_burst_per_ip = 1000000
claim_rate_per_user = 1000000.0
claim_burst_per_user = 1000000
registrations_per_ip_per_hour = 1000000

[log]
level = "info"
"#
    .to_owned()
}

/// Opens `GET /queue/events?actId={act}` at `addr` (a node, or Nginx in
/// front of one) as `token`, and reads until its first event has arrived
/// (10 s at most): the answer must be 200. Returns the stream, still open,
/// and what was read (the head and the first event).
pub async fn open_event_stream(addr: &str, token: &str, act: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET /queue/events?actId={act} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen).contains("\ndata: ") {
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut chunk))
            .await
            .expect("the first event within 10 s")
            .unwrap();
        assert!(n > 0, "the stream closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&seen);
        assert!(!text.contains("\r\n\r\n") || text.starts_with("HTTP/1.1 200"), "{text}");
    }
    (stream, String::from_utf8_lossy(&seen).into_owned())
}

/// The admin token of the tests' configs (an example value, not a secret).
pub const ADMIN_TOKEN: &str = "EXAMPLE-admin-token-0123456789abcdef";

/// `config` with the admin listener on a free port, behind [`ADMIN_TOKEN`]
/// (find it with [`TestApp::admin_addr`]).
pub fn with_admin(config: String) -> String {
    config.replace(
        "[log]",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n\n[log]"),
    )
}

/// `config` behind a proxy on 127.0.0.1 (as behind the shipped nginx), with
/// `security` added to its `[security]`: every request is "from" its
/// X-Forwarded-For.
pub fn behind_proxy(config: String, security: &str) -> String {
    config.replace(
        "[security]",
        &format!("[security]\ntrusted_proxies = [\"127.0.0.1\"]\n{security}"),
    )
}

/// Logs `username` (password `password-<username>`) in and straight out
/// again through `client`, as a client at `from` behind the trusted proxy
/// (`X-Forwarded-For`); returns the token logged out.
pub async fn log_in_and_out(client: &ApiClient, username: &str, from: &str) -> String {
    let creds = json!({ "username": username, "password": format!("password-{username}") });
    let res = client
        .call(
            http::Method::POST,
            "/user/login",
            None,
            Some(&creds),
            &[("X-Forwarded-For", from)],
        )
        .await
        .unwrap();
    assert_eq!(res.status, 200, "{}", res.body);
    let token = res.data()["token"].as_str().unwrap().to_owned();
    let out = client.post("/user/logout", Some(&token), &json!({})).await.unwrap();
    assert_eq!(out.status, 200, "{}", out.body);
    token
}

/// Waits (up to 60 s) until `condition` holds, checking every 50 ms.
pub async fn until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A POST through the API client from `ip` (via X-Forwarded-For).
pub async fn post_from(client: &ApiClient, ip: &str, path: &str, body: &Value) -> ApiResponse {
    post_from_as(client, ip, path, None, body).await
}

/// [`post_from`], with `token`'s session.
pub async fn post_from_as(client: &ApiClient, ip: &str, path: &str, token: Option<&str>, body: &Value) -> ApiResponse {
    client
        .call(http::Method::POST, path, token, Some(body), &[("x-forwarded-for", ip)])
        .await
        .unwrap()
}

/// An activity with `n` generated codes, open now, with `limit` per user.
pub fn open_activity(id: &str, n: u32, limit: u32) -> String {
    activity(id, n, limit, "-1m", "+1h")
}

/// An activity with `n` generated codes between `start` and `end`, with `limit` per user.
pub fn activity(id: &str, n: u32, limit: u32, start: &str, end: &str) -> String {
    Act::new(id)
        .window(start, end)
        .limit(limit)
        .ticket(&format!("{id}-t"), &format!("Ticket {id}"), Codes::Generate(n))
        .toml()
}

/// Where a test ticket type's codes come from.
pub enum Codes<'a> {
    /// `generate = n`.
    Generate(u32),
    /// `codes = [...]`.
    List(&'a [&'a str]),
    /// `codes_file = "..."`.
    File(&'a str),
}

/// One `[[activity]]` table of a test config, the one place tests write it:
/// open from a minute ago for an hour, one code per user, unless told otherwise.
pub struct Act {
    id: String,
    name: String,
    window: (String, String),
    limit: u32,
    extra: String,
    tickets: String,
}

impl Act {
    pub fn new(id: &str) -> Act {
        Act {
            id: id.to_owned(),
            name: format!("Activity {id}"),
            window: ("-1m".into(), "+1h".into()),
            limit: 1,
            extra: String::new(),
            tickets: String::new(),
        }
    }

    pub fn name(mut self, name: &str) -> Act {
        self.name = name.to_owned();
        self
    }

    /// `start_time` and `end_time`, relative (`"+1h"`) or RFC 3339.
    pub fn window(mut self, start: &str, end: &str) -> Act {
        self.window = (start.to_owned(), end.to_owned());
        self
    }

    pub fn limit(mut self, limit: u32) -> Act {
        self.limit = limit;
        self
    }

    /// Any other activity key, as TOML (`pow_difficulty = 8`).
    pub fn with(mut self, line: &str) -> Act {
        self.extra.push_str(line);
        self.extra.push('\n');
        self
    }

    pub fn ticket(mut self, id: &str, name: &str, codes: Codes<'_>) -> Act {
        let source = match codes {
            Codes::Generate(n) => format!("generate = {n}"),
            Codes::List(list) => format!(
                "codes = [{}]",
                list.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ")
            ),
            Codes::File(path) => format!("codes_file = \"{path}\""),
        };
        self.tickets.push_str(&format!(
            "  [[activity.ticket]]\n  id = \"{id}\"\n  name = \"{name}\"\n  {source}\n"
        ));
        self
    }

    pub fn toml(&self) -> String {
        format!(
            "\n[[activity]]\nid = \"{}\"\nname = \"{}\"\nstart_time = \"{}\"\nend_time = \"{}\"\nper_user_limit = {}\n{}{}",
            self.id, self.name, self.window.0, self.window.1, self.limit, self.extra, self.tickets
        )
    }
}

/// A running (or stopped) ticketd with its own directory.
pub struct TestApp {
    pub dir: TempDir,
    child: Option<Child>,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub client: ApiClient,
    pub addr: String,
    /// Extra environment for the process.
    pub env: Vec<(String, String)>,
    /// A listening socket handed over as fd 3 (socket activation), if any.
    pub listen_fd: Option<std::os::fd::RawFd>,
    /// The process's open-file limit (soft and hard), if not inherited.
    pub open_files: Option<u64>,
}

impl TestApp {
    /// Writes `config` and starts the binary; panics with its logs if it does not come up.
    pub fn start(config: &str) -> TestApp {
        TestApp::start_with(config, &[])
    }

    /// Like [`TestApp::start`], writing `files` (name, content) beside the config first.
    pub fn start_with(config: &str, files: &[(&str, &str)]) -> TestApp {
        let mut app = TestApp::prepare(config, files);
        app.boot();
        app
    }

    /// Writes the config and files but does not start the process (set `env` first).
    pub fn prepare(config: &str, files: &[(&str, &str)]) -> TestApp {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("config.toml"), config).expect("write config");
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).expect("write file");
        }
        TestApp {
            dir,
            child: None,
            logs: Arc::new(Mutex::new(Vec::new())),
            client: ApiClient::new(vec!["http://127.0.0.1:1".into()], 1).unwrap(),
            addr: String::new(),
            env: Vec::new(),
            listen_fd: None,
            open_files: None,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// Starts the process again on the same directory (after a stop or a kill).
    pub fn boot(&mut self) {
        let mut command = Command::new(BIN);
        command
            .args(["--config", "config.toml", "--log-format", "json", "serve"])
            .current_dir(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if self.listen_fd.is_some() {
            command.env("LISTEN_FDS", "1");
        }
        let (fd, open_files) = (self.listen_fd, self.open_files);
        if fd.is_some() || open_files.is_some() {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    if let Some(fd) = fd {
                        if libc::dup2(fd, 3) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        let flags = libc::fcntl(3, libc::F_GETFD);
                        libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                    }
                    if let Some(n) = open_files {
                        let lim = libc::rlimit {
                            rlim_cur: n,
                            rlim_max: n,
                        };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("spawn ticketd");
        let stderr = child.stderr.take().unwrap();
        let logs = self.logs.clone();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                logs.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if v["message"] == "Listening." {
                            break v["addr"].as_str().unwrap().to_owned();
                        }
                    }
                }
                Err(_) => {
                    let status = child.try_wait().ok().flatten();
                    let _ = child.kill();
                    panic!(
                        "ticketd did not start (exit: {status:?}); logs:\n{}",
                        self.logs.lock().unwrap().join("\n")
                    );
                }
            }
        };
        self.client = ApiClient::new(vec![format!("http://{addr}")], 256).unwrap();
        self.addr = addr;
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Whether the process is running (not stopped or killed by the test).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Waits up to `within` for the node to exit by itself; its exit code
    /// (reaped), or None if it is still running.
    pub fn exited_within(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().unwrap() {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`, then reap.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.child.take().unwrap().wait().unwrap();
    }

    /// Sends SIGTERM and waits for the node to exit; returns its exit code
    /// (0 for a clean stop: a test that expects one asserts it).
    #[must_use]
    pub fn stop(&mut self) -> i32 {
        self.signal(libc::SIGTERM);
        let status = self.child.take().unwrap().wait().unwrap();
        status.code().unwrap_or(-1)
    }

    /// Waits for a process already sent SIGTERM to exit; returns the exit code.
    pub fn stop_wait(&mut self) -> i32 {
        let status = self.child.take().unwrap().wait().unwrap();
        status.code().unwrap_or(-1)
    }

    /// A clean stop (asserted) and a new start.
    pub fn restart(&mut self) {
        assert_eq!(self.stop(), 0, "the node stopped cleanly before its restart");
        self.boot();
    }

    /// Number of log lines whose message is `message`.
    pub fn count_logs(&self, message: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["message"] == message))
            .count()
    }

    /// Waits until `count_logs(message) >= n`.
    /// Where the admin listener (see [`with_admin`]) listens.
    pub fn admin_addr(&self) -> String {
        self.wait_for_log("Admin API listening.", 1)["addr"]
            .as_str()
            .expect("the listener's address")
            .to_owned()
    }

    /// `GET /admin/stats` with [`ADMIN_TOKEN`]: its `data`.
    pub async fn admin_stats(&self) -> Value {
        let admin = ApiClient::new(vec![format!("http://{}", self.admin_addr())], 1).unwrap();
        let res = admin.get("/admin/stats", Some(ADMIN_TOKEN)).await.unwrap();
        assert_eq!(res.status, 200, "{}", res.body);
        res.data().clone()
    }

    pub fn wait_for_log(&self, message: &str, n: usize) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            {
                let logs = self.logs.lock().unwrap();
                let found: Vec<Value> = logs
                    .iter()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .filter(|v| v["message"] == message)
                    .collect();
                if found.len() >= n {
                    return found[n - 1].clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no log line {message:?} #{n}; logs:\n{}",
                self.logs.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites the config file and sends SIGHUP; waits for the outcome log line.
    pub fn reload(&self, config: &str) -> Value {
        let applied = self.count_logs("Config reloaded.");
        let refused = self.count_logs("Reload refused; still serving the previous config.");
        std::fs::write(self.config_path(), config).unwrap();
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.count_logs("Config reloaded.") > applied {
                return self.wait_for_log("Config reloaded.", applied + 1);
            }
            if self.count_logs("Reload refused; still serving the previous config.") > refused {
                return self.wait_for_log("Reload refused; still serving the previous config.", refused + 1);
            }
            assert!(Instant::now() < deadline, "reload produced no outcome");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Reloads the node's config file with `from` replaced by `to` (which
    /// must change it), asserting the reload applied; returns the file as
    /// it was, to reload back.
    pub fn reload_replacing(&self, from: &str, to: &str) -> String {
        let config = std::fs::read_to_string(self.config_path()).unwrap();
        let changed = config.replace(from, to);
        assert_ne!(config, changed, "`{from}` is not in the config");
        let outcome = self.reload(&changed);
        assert_eq!(outcome["message"], "Config reloaded.", "{outcome}");
        config
    }

    /// The node's SQLite store, opened beside it (embedded mode).
    pub fn sqlite(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.dir.path().join("data/ticketd.db")).unwrap()
    }

    /// `ticketd report` of `act` beside this node's store: its HTML.
    pub fn report_html(&self, act: &str) -> String {
        let out = self.cli(&["report", "--activity", act, "--out", "report.html"], None);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read_to_string(self.dir.path().join("report.html")).unwrap()
    }

    /// Runs a ticketd subcommand in the app's directory (same config).
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        run_cli(self.dir.path(), args, stdin)
    }

    /// `ticketd verify` on this node's store must find it consistent; returns its report.
    pub fn assert_verified(&self) -> String {
        let out = self.cli(&["verify"], None);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && stdout.contains("consistent"),
            "ticketd verify found problems:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Registers `username` (password "password-<username>") and returns the token.
    pub async fn register(&self, username: &str) -> String {
        self.account("/user/register", username).await
    }

    /// Logs `username` in and returns the token.
    pub async fn login(&self, username: &str) -> String {
        self.account("/user/login", username).await
    }

    async fn account(&self, path: &str, username: &str) -> String {
        let creds = json!({ "username": username, "password": format!("password-{username}") });
        let res = self.client.post(path, None, &creds).await.unwrap();
        assert_eq!(res.status, 200, "{path} {username}: {}", res.body);
        res.data()["token"].as_str().unwrap().to_owned()
    }

    /// `GET path` over a fresh connection, returning the raw response (head and body).
    pub async fn raw_get(&self, path: &str) -> String {
        raw_get(&self.addr, path).await
    }

    /// Creates `n` users [`username`]`(prefix, i)` through `ticketd user import` (before boot
    /// or while running) and logs them all in.
    pub async fn users(&self, prefix: &str, n: usize) -> Vec<String> {
        self.import_users(prefix, n);
        log_in(&[self.url()], &self.logs, prefix, n).await
    }

    /// Creates `n` users [`username`]`(prefix, i)` through `ticketd user import`.
    pub fn import_users(&self, prefix: &str, n: usize) {
        let csv: String = (0..n)
            .map(|i| {
                let name = username(prefix, i);
                format!("{name},password-{name},{name}\n")
            })
            .collect();
        self.import_user_csv(&csv);
    }

    /// `ticketd user import` of `csv` (rows of username,password,nickname[,created_at]);
    /// asserts it succeeded.
    pub fn import_user_csv(&self, csv: &str) {
        let file = self.dir.path().join("import-users.csv");
        std::fs::write(&file, csv).unwrap();
        let out = self.cli(&["user", "import", file.to_str().unwrap()], None);
        assert!(
            out.status.success(),
            "user import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A new client for the same node (for spawning into tasks).
    pub fn client_clone(&self) -> Arc<ApiClient> {
        Arc::new(ApiClient::new(vec![self.url()], 256).unwrap())
    }

    /// The claim body a real client sends: `actId` and the claim token from `/act/detail`.
    pub async fn claim_body(&self, token: &str, act: &str) -> Value {
        claim_body(&self.client, token, act).await
    }

    /// Claims a code of `act` the way a client does (fetching the claim token first).
    pub async fn claim(&self, token: &str, act: &str) -> ApiResponse {
        let body = self.claim_body(token, act).await;
        self.client.post("/ticket/get", Some(token), &body).await.unwrap()
    }

    /// The ids `/act/list` lists, in its order.
    pub async fn listed(&self) -> Vec<String> {
        let res = self.client.get("/act/list", None).await.unwrap();
        assert_eq!(res.status, 200, "{}", res.body);
        res.data()["activities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["actId"].as_str().unwrap().to_owned())
            .collect()
    }

    pub async fn detail(&self, act: &str) -> Value {
        let res = self
            .client
            .get(&format!("/act/detail?actId={act}"), None)
            .await
            .unwrap();
        assert_eq!(res.status, 200, "{}", res.body);
        res.data().clone()
    }

    /// The codes `token`'s user holds in `act`, from `/ticket/list`.
    pub async fn held(&self, token: &str, act: &str) -> Vec<String> {
        let res = self.client.get("/ticket/list?pageSize=100", Some(token)).await.unwrap();
        assert_eq!(res.status, 200, "{}", res.body);
        res.data()["claims"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["actId"] == act)
            .map(|c| c["code"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn logs_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Asserts an error answer: the status, the stable code, the JSON shape and a message.
pub fn assert_error(res: &ApiResponse, status: u16, code: &str) {
    assert_eq!((res.status, res.error_code()), (status, Some(code)), "{}", res.body);
    assert_eq!(res.body["ok"], false, "{}", res.body);
    assert!(
        res.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        res.body
    );
}

/// `{"actId", "claimToken"}` for `token`'s user (no claimToken when none is given out).
pub async fn claim_body(client: &ApiClient, token: &str, act: &str) -> Value {
    let detail = client
        .get(&format!("/act/detail?actId={act}"), Some(token))
        .await
        .unwrap();
    // A look that fails leaves the body without a token: tests of a claim's
    // refusals (no such activity, a logged-out session) send it as it is.
    let mut body = json!({ "actId": act });
    if let Some(t) = detail.data()["claimToken"].as_str() {
        body["claimToken"] = t.into();
    }
    body
}

/// `GET path` from `addr` over a fresh connection; the raw response text,
/// read until the server closes: a proxy such as Nginx has then finished
/// with the request (its cache holds the answer) when this returns.
pub async fn raw_get(addr: &str, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let answer = read_answer(addr, request.as_bytes(), Until::Closed).await;
    format!("{}\r\n\r\n{}", answer.head, answer.body)
}

/// One HTTP/1.1 answer read off a raw connection ([`exchange`]).
pub struct RawAnswer {
    pub status: u16,
    /// The status line and the headers, as sent.
    pub head: String,
    pub body: String,
}

impl RawAnswer {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The value of the header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// `POST /ticket/get` with `body`, and `key` as its Idempotency-Key.
pub async fn claim_keyed(client: &ApiClient, token: &str, body: &Value, key: &str) -> ApiResponse {
    client
        .call(
            http::Method::POST,
            "/ticket/get",
            Some(token),
            Some(body),
            &[("Idempotency-Key", key)],
        )
        .await
        .unwrap()
}

/// `again` answers with `first`'s claim, as a replay.
pub fn assert_replayed(again: &ApiResponse, first: &ApiResponse) {
    assert_eq!(
        (again.status, &again.data()["code"], &again.data()["replayed"]),
        (200, &first.data()["code"], &Value::Bool(true)),
        "{}",
        again.body
    );
}

/// The codes of a JSON-lines export, one line per claim.
pub fn jsonl_codes(body: &str) -> std::collections::HashSet<String> {
    body.lines()
        .map(|l| {
            let line: Value = serde_json::from_str(l).unwrap();
            line["code"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// The body of an answer as sent: with `Transfer-Encoding: chunked` (a
/// streamed export), its chunks joined; otherwise as it is.
pub fn unchunked(head: &str, body: &str) -> String {
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return body.to_owned();
    }
    let (mut out, mut rest) = (String::new(), body);
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    out
}

/// Sends `request` as it stands (request line, headers, blank line, body)
/// to `addr` over a fresh connection, and reads one answer: up to its
/// Content-Length, or until the server closes. Panics after 10 s (to
/// connect, send and read). For requests a client library would not send,
/// and answers it would hide.
pub async fn exchange(addr: &str, request: &[u8]) -> RawAnswer {
    read_answer(addr, request, Until::Length).await
}

/// Where [`read_answer`] stops.
#[derive(PartialEq)]
enum Until {
    /// Once the body has its Content-Length (or the server closes).
    Length,
    /// Once the server closes.
    Closed,
}

async fn read_answer(addr: &str, request: &[u8], until: Until) -> RawAnswer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut out = Vec::new();
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A server may answer and close before it has read all of a request
        // past its limits: what it answered is still read.
        let _ = stream.write_all(request).await;
        let mut chunk = [0u8; 4096];
        loop {
            let end = out.windows(4).position(|w| w == b"\r\n\r\n");
            if let Some(end) = end.filter(|_| until == Until::Length) {
                let length = String::from_utf8_lossy(&out[..end]).lines().find_map(|l| {
                    let (key, value) = l.split_once(':')?;
                    key.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                });
                if length.is_some_and(|n| out.len() >= end + 4 + n) {
                    return;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let done = tokio::time::timeout(Duration::from_secs(10), read).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(
        done.is_ok(),
        "no complete answer from {addr} within 10 s; got: {text:?}"
    );
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    RawAnswer {
        status: head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0),
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// Logs the users [`username`]`(prefix, 0..n)` in, spread over `urls` (a
/// node rations password hashing, so a cluster's nodes log in side by side),
/// 64 at a time; their session tokens in order.
pub async fn log_in(urls: &[String], logs: &Arc<Mutex<Vec<String>>>, prefix: &str, n: usize) -> Vec<String> {
    let clients: Vec<Arc<ApiClient>> = urls
        .iter()
        .map(|u| Arc::new(ApiClient::new(vec![u.clone()], 64).unwrap()))
        .collect();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..n {
        let sem = sem.clone();
        let client = clients[i % clients.len()].clone();
        let name = username(prefix, i);
        let logs = logs.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let res = client
                .post_retrying(
                    "/user/login",
                    &json!({ "username": name, "password": format!("password-{name}") }),
                )
                .await
                .unwrap();
            assert_eq!(
                res.status,
                200,
                "{name}: {}\nnode logs:\n{}",
                res.body,
                logs.lock().unwrap().join("\n")
            );
            res.data()["token"].as_str().unwrap().to_owned()
        }));
    }
    let mut tokens = Vec::with_capacity(n);
    for t in tasks {
        tokens.push(t.await.unwrap());
    }
    tokens
}

/// The name of the `i`th bulk user with `prefix`.
pub fn username(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i}")
}

/// Runs `ticketd bench --url URL --json ARGS`; asserts it exited 0 with no
/// invariant violated and returns its JSON report.
pub fn bench(url: &str, args: &[&str]) -> Value {
    let report = bench_report(url, args);
    assert_eq!(report["violations"], json!([]), "{report}");
    report
}

/// Runs `ticketd bench --url URL --json ARGS`; asserts it exited 0 and
/// returns its JSON report.
pub fn bench_report(url: &str, args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .args(["bench", "--url", url, "--json"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap()
}

/// Runs `ticketd --config config.toml ARGS` in `dir`.
pub fn run_cli(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(["--config", "config.toml", "--log-format", "json"])
        .args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ticketd");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// Runs `ticketd serve` in `dir`, which must refuse to start: waits up to
/// `within` for it to exit (a node still serving then is killed and the
/// test fails with `serving`), asserts the exit is a failure, and returns
/// what it wrote to stderr.
pub fn serve_refused(dir: &Path, within: Duration, serving: &str) -> String {
    let mut child = spawn_ticketd(dir, &["serve"]);
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{serving}; it wrote:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{serving}: it exited with success");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `ticketd --config config.toml <args>` started in `dir` (its config
/// there), stderr piped for the test to read, stdout dropped.
pub fn spawn_ticketd(dir: &Path, args: &[&str]) -> std::process::Child {
    Command::new(BIN)
        .args(["--config", "config.toml"])
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ticketd")
}

/// The environment that runs a process with its wall clock `offset` from
/// the real one (`"-5s"`), through Debian's libfaketime; its monotonic clock
/// (timers, timeouts) stays true.
pub fn faketime_env(offset: &str) -> Vec<(String, String)> {
    let lib = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|dir| dir.path().join("faketime/libfaketimeMT.so.1"))
        .find(|lib| lib.exists())
        .unwrap_or_else(|| panic!("libfaketime is missing; {}", services::INSTALL));
    vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// Parses an export CSV into rows keyed by header name.
pub fn parse_csv(bytes: &[u8]) -> Vec<std::collections::HashMap<String, String>> {
    let mut reader = csv::Reader::from_reader(bytes);
    let headers = reader.headers().unwrap().clone();
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            headers
                .iter()
                .map(str::to_owned)
                .zip(r.iter().map(str::to_owned))
                .collect()
        })
        .collect()
}

/// One claim answer of a rush: when its request went out, when the answer
/// came, and what it was (`success`, `"{status} {code}"` or `transport`).
#[derive(Debug, Clone)]
pub struct Answered {
    pub sent: Instant,
    pub received: Instant,
    pub outcome: String,
}

/// Every claim answer of a rush, in no particular order.
pub type AnswerLog = Arc<Mutex<Vec<Answered>>>;

/// The key a rush counts an answer under.
pub fn outcome_key(answer: &anyhow::Result<ApiResponse>) -> String {
    match answer {
        Ok(a) if a.status == 200 => "success".to_owned(),
        Ok(a) => format!("{} {}", a.status, a.error_code().unwrap_or("?")),
        Err(_) => "transport".to_owned(),
    }
}

/// POSTs a claim the way a good client does: while the answer is
/// `503 STOCK_IN_FLIGHT` (no code free, but some may come back) or
/// `503 OVERLOADED` it asks again — after 100 ms rather than the
/// Retry-After second, to keep the suite short — for up to a minute, and
/// then fails the test: the stock must settle. Every answer goes into
/// `log`. Returns the last answer and the keys of the earlier ones.
pub async fn claim_settled(
    client: &ApiClient,
    token: &str,
    body: &Value,
    log: &AnswerLog,
) -> (anyhow::Result<ApiResponse>, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut earlier = Vec::new();
    loop {
        let sent = Instant::now();
        let answer = client.post("/ticket/get", Some(token), body).await;
        let outcome = outcome_key(&answer);
        log.lock().unwrap().push(Answered {
            sent,
            received: Instant::now(),
            outcome: outcome.clone(),
        });
        let retry = outcome == "503 STOCK_IN_FLIGHT" || outcome == "503 OVERLOADED";
        if !retry {
            return (answer, earlier);
        }
        assert!(
            Instant::now() < deadline,
            "still {outcome} after a minute: the stock never settled ({} answers before)",
            earlier.len()
        );
        earlier.push(outcome);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 410 SOLD_OUT is final: no claim sent after a SOLD_OUT answer arrived
/// got a code. Returns how many SOLD_OUT answers the log holds: with none,
/// nothing was checked, so a test that expects a sell-out asserts it.
#[must_use = "a log without a SOLD_OUT checks nothing"]
pub fn assert_sold_out_is_final(log: &[Answered]) -> usize {
    let sold_out = log.iter().filter(|a| a.outcome == "410 SOLD_OUT").count();
    let Some(first_final) = log
        .iter()
        .filter(|a| a.outcome == "410 SOLD_OUT")
        .map(|a| a.received)
        .min()
    else {
        return 0;
    };
    let later: Vec<&Answered> = log
        .iter()
        .filter(|a| a.outcome == "success" && a.sent > first_final)
        .collect();
    assert!(
        later.is_empty(),
        "{} claims sent after the first SOLD_OUT arrived got a code (the first {:?} after it)",
        later.len(),
        later.iter().map(|a| a.sent - first_final).min()
    );
    sold_out
}

/// The value of one series (`name` or `name{labels}`) in a node's /metrics (panics when absent).
pub async fn metric(app: &TestApp, series: &str) -> f64 {
    metric_in(&app.raw_get("/metrics").await, series)
}

/// The value of one series (`name` or `name{labels}`) in a /metrics text (panics when absent).
pub fn metric_in(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {series} in:\n{text}"))
}

/// The text of the report's summary cell `<td id="{id}">` in `html`.
pub fn report_cell<'a>(html: &'a str, id: &str) -> &'a str {
    let tag = format!("<td id=\"{id}\">");
    let at = html.find(&tag).unwrap_or_else(|| panic!("the report has no cell {id}")) + tag.len();
    &html[at..at + html[at..].find("</td>").unwrap()]
}

/// A tmpfs mounted on a directory for the life of a test.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount(8)");
        assert!(
            out.status.success(),
            "mounting a small tmpfs (a disk that can fill up) needs root: run ./scripts/test as root or with sudo ({})",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_owned())
    }
}

/// Fills the disk holding `path` with a file there, written `chunk` bytes
/// at a time until the disk refuses more; returns the file.
pub fn fill_disk(path: &std::path::Path, chunk: usize) -> std::fs::File {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let zeros = vec![0u8; chunk];
    let full = loop {
        if let Err(error) = f.write_all(&zeros) {
            break error;
        }
    };
    // ENOSPC (`ErrorKind::StorageFull` is newer than the crate's MSRV).
    assert_eq!(
        full.raw_os_error(),
        Some(libc::ENOSPC),
        "filling {}: {full}",
        path.display()
    );
    f
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
