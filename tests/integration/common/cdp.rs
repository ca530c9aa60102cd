//! Headless Chromium driven over the DevTools protocol (a WebSocket and a
//! few commands: navigate, evaluate, emulate a viewport, screenshot), with
//! every console error, uncaught exception and Content-Security-Policy
//! violation collected for the test to assert on.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::{tungstenite::Message, MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Records CSP violations in the page itself (they are also console errors,
/// but this way the test names them).
const WATCH_CSP: &str = "window.__csp = []; document.addEventListener('securitypolicyviolation', \
    (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));";

/// One Chromium with one page.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    socket: Socket,
    next_id: u64,
    /// Console errors, exceptions and error log entries seen so far.
    pub errors: Vec<String>,
    /// CSP violations of documents already left.
    csp: Vec<Value>,
    /// Requests held by [`Browser::intercept`], oldest first.
    paused: std::collections::VecDeque<Value>,
}

impl Browser {
    /// Starts headless Chromium and attaches to its page.
    pub async fn launch() -> Browser {
        Browser::launch_with(&[]).await
    }

    /// Like [`Browser::launch`], with extra Chromium switches (e.g. `--lang=zh-CN`).
    pub async fn launch_with(switches: &[&str]) -> Browser {
        let binary = chromium_binary();
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-quic",
                // A container's /dev/shm is 64 MB, which a renderer outgrows.
                "--disable-dev-shm-usage",
            ])
            .args([
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .args(["--remote-debugging-port=0", "--remote-allow-origins=*"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(switches)
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Chromium names its DevTools endpoint on stderr; keep draining it after.
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let browser_url = tokio::task::block_in_place(|| rx.recv_timeout(Duration::from_secs(30)))
            .expect("Chromium did not open its DevTools endpoint within 30 s");
        let host = browser_url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let page_url = page_socket(&host).await;
        let (socket, _) = tokio_tungstenite::connect_async(page_url.as_str()).await.unwrap();
        let mut browser = Browser {
            child,
            _profile: profile,
            socket,
            next_id: 0,
            errors: Vec::new(),
            csp: Vec::new(),
            paused: Default::default(),
        };
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            browser.call(domain, json!({})).await;
        }
        browser
            .call("Page.addScriptToEvaluateOnNewDocument", json!({ "source": WATCH_CSP }))
            .await;
        browser
    }

    /// Sends one command and returns its result; events that arrive
    /// meanwhile are checked for errors.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.socket.send(Message::Text(msg.into())).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"));
            let Some(Ok(Message::Text(text))) = next else {
                continue;
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            self.event(&v);
        }
    }

    fn event(&mut self, v: &Value) {
        let p = &v["params"];
        match v["method"].as_str() {
            Some("Fetch.requestPaused") => self.paused.push_back(p.clone()),
            Some("Runtime.exceptionThrown") => self.errors.push(format!("exception: {}", p["exceptionDetails"])),
            Some("Runtime.consoleAPICalled") if matches!(p["type"].as_str(), Some("error" | "assert")) => {
                self.errors.push(format!("console.{}: {}", p["type"], p["args"]));
            }
            // Failed API answers (409 LIMIT_REACHED, 410 SOLD_OUT) are logged
            // by Chromium as network errors; they are the page's expected input.
            Some("Log.entryAdded") if p["entry"]["level"] == "error" && p["entry"]["source"] != "network" => {
                self.errors.push(format!("log: {}", p["entry"]));
            }
            _ => {}
        }
    }

    /// Holds every request whose URL matches `pattern` once its answer has
    /// come (the server did the work), for [`Browser::next_paused`] to hand
    /// to the test, which then fails or passes it on.
    pub async fn intercept(&mut self, pattern: &str) {
        let patterns = json!([{ "urlPattern": pattern, "requestStage": "Response" }]);
        self.call("Fetch.enable", json!({ "patterns": patterns })).await;
    }

    /// Holds every request whose URL matches `pattern` before it is sent,
    /// for [`Browser::next_paused`] to hand to the test, which then answers
    /// it in the server's place ([`Browser::answer_with`]) or sends it on
    /// ([`Browser::send_on`]).
    pub async fn intercept_requests(&mut self, pattern: &str) {
        let patterns = json!([{ "urlPattern": pattern, "requestStage": "Request" }]);
        self.call("Fetch.enable", json!({ "patterns": patterns })).await;
    }

    /// Answers a held request with `status` and the JSON `body`: what the
    /// node says of a request that never reached its handler (a body that
    /// did not arrive in time, say), without the node.
    pub async fn answer_with(&mut self, paused: &Value, status: u16, body: &Value) {
        use base64::Engine;
        let engine = base64::engine::general_purpose::STANDARD;
        self.call(
            "Fetch.fulfillRequest",
            json!({
                "requestId": paused["requestId"],
                "responseCode": status,
                "responseHeaders": [{ "name": "Content-Type", "value": "application/json" }],
                "body": engine.encode(body.to_string()),
            }),
        )
        .await;
    }

    /// Stops holding requests, and forgets those held but not handed out:
    /// Chromium lets them go on, and one handed out later was no longer
    /// held ("Invalid InterceptionId").
    pub async fn stop_intercepting(&mut self) {
        self.call("Fetch.disable", json!({})).await;
        self.paused.clear();
    }

    /// Sends a request held before it was sent on to the node.
    pub async fn send_on(&mut self, paused: &Value) {
        self.call("Fetch.continueRequest", json!({ "requestId": paused["requestId"] }))
            .await;
    }

    /// The next request [`Browser::intercept`] held (waits up to 30 s).
    pub async fn next_paused(&mut self) -> Value {
        self.next_paused_within(Duration::from_secs(30)).await
    }

    /// [`Browser::next_paused`], waiting up to `within`.
    pub async fn next_paused_within(&mut self, within: Duration) -> Value {
        self.paused_within(within)
            .await
            .unwrap_or_else(|| panic!("no intercepted request within {within:?}"))
    }

    /// The next intercepted request within `within`, if one comes.
    pub async fn paused_within(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(p) = self.paused.pop_front() {
                return Some(p);
            }
            let next = tokio::time::timeout_at(deadline, self.socket.next()).await.ok()?;
            if let Some(Ok(Message::Text(text))) = next {
                let v: Value = serde_json::from_str(&text).unwrap();
                self.event(&v);
            }
        }
    }

    /// Passes a held JSON answer on with `field` taken out of its `data`
    /// (what another node, or an older one, would have answered).
    pub async fn answer_without(&mut self, paused: &Value, field: &str) {
        use base64::Engine;
        let engine = base64::engine::general_purpose::STANDARD;
        let id = paused["requestId"].clone();
        let got = self.call("Fetch.getResponseBody", json!({ "requestId": id })).await;
        let text = got["body"].as_str().unwrap_or_default();
        let raw = if got["base64Encoded"] == true {
            engine.decode(text).unwrap()
        } else {
            text.as_bytes().to_vec()
        };
        let mut answer: Value = serde_json::from_slice(&raw).unwrap();
        answer["data"].as_object_mut().unwrap().remove(field);
        let headers: Vec<Value> = paused["responseHeaders"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|h| {
                let name = h["name"].as_str().unwrap_or_default().to_ascii_lowercase();
                name != "content-length" && name != "content-encoding"
            })
            .collect();
        self.call(
            "Fetch.fulfillRequest",
            json!({
                "requestId": id,
                "responseCode": paused["responseStatusCode"],
                "responseHeaders": headers,
                "body": engine.encode(answer.to_string()),
            }),
        )
        .await;
    }

    /// Fails a held request as a connection reset: its answer is lost.
    pub async fn lose_answer(&mut self, paused: &Value) {
        let id = paused["requestId"].clone();
        self.call(
            "Fetch.failRequest",
            json!({ "requestId": id, "errorReason": "ConnectionReset" }),
        )
        .await;
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy (for at most 30 s), returning its value.
    pub async fn wait_for(&mut self, expression: &str, what: &str) -> Value {
        self.wait_for_within(expression, what, Duration::from_secs(30)).await
    }

    /// [`Browser::wait_for`], for at most `within`.
    pub async fn wait_for_within(&mut self, expression: &str, what: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.eval(expression).await;
            if !(v.is_null() || v == false || v == "" || v == 0) {
                return v;
            }
            if Instant::now() > deadline {
                let body = self.eval("document.body.innerText").await;
                panic!("timed out waiting for {what}; the page shows:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens `url` and waits for the document to load.
    pub async fn goto(&mut self, url: &str) {
        let seen = self.eval("window.__csp || []").await;
        self.csp.extend(seen.as_array().cloned().unwrap_or_default());
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_for("document.readyState === 'complete'", "the page to load")
            .await;
    }

    /// Emulates a viewport `width` × `height` (a phone when `mobile`).
    pub async fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": if mobile { 2 } else { 1 }, "mobile": mobile }),
        )
        .await;
    }

    /// Saves a PNG of the viewport to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" })).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// The CSP violations every document so far saw.
    pub async fn csp_violations(&mut self) -> Value {
        let now = self.eval("window.__csp || []").await;
        let mut all = self.csp.clone();
        all.extend(now.as_array().cloned().unwrap_or_default());
        Value::Array(all)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's Chromium (`chromium`, or `chromium-browser` elsewhere); fails
/// the test, saying what to install, when there is none.
pub fn chromium_binary() -> &'static str {
    ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .unwrap_or_else(|| panic!("chromium is missing: run `apt-get install -y chromium` (./scripts/test does it)"))
}

/// The path of the script the fans' page at `/` loads (content-hashed).
pub fn page_script(html: &str) -> String {
    html.split("src=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page names its script")
        .to_owned()
}

/// The WebSocket URL of the browser's first page target (`/json/list`).
async fn page_socket(host: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    // Chromium keeps the connection open after answering: read by Content-Length.
    let request = format!("GET /json/list HTTP/1.1\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let read = async {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "Chromium closed the target list early");
            out.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&out).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .expect("a Content-Length");
                if body.len() >= length {
                    return body.to_owned();
                }
            }
        }
    };
    let body = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("no target list from Chromium within 30 s");
    let targets: Value = serde_json::from_str(&body).unwrap();
    targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "page")
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .expect("a page target")
        .to_owned()
}
