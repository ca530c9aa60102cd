//! A small JSON-over-HTTP/1.1 client for the API, with pooled keep-alive
//! connections and round-robin over several node URLs.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde_json::Value;

/// An answer: the status and the parsed JSON body.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// The body as JSON (`Value::Null` when it was not JSON).
    pub body: Value,
}

impl ApiResponse {
    /// `error.code` of an error answer.
    pub fn error_code(&self) -> Option<&str> {
        self.body.pointer("/error/code").and_then(Value::as_str)
    }

    /// `data` of a success answer.
    pub fn data(&self) -> &Value {
        self.body.get("data").unwrap_or(&Value::Null)
    }
}

/// The longest a request may take, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for one or more ticketd nodes.
pub struct ApiClient {
    client: Client<HttpConnector, Full<Bytes>>,
    bases: Vec<String>,
    next: AtomicUsize,
}

impl ApiClient {
    /// A client for `bases` (e.g. `http://127.0.0.1:3000`), keeping up to
    /// `pool` idle connections per node.
    pub fn new(bases: Vec<String>, pool: usize) -> anyhow::Result<ApiClient> {
        if bases.is_empty() {
            return Err(anyhow!("no URL given"));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        // Idle connections are dropped after 2 s: ticketd (like most servers)
        // closes a keep-alive connection that sends no request head within
        // `server.header_read_timeout` (5 s by default), and a client that
        // reuses a connection older than that races the close and loses a
        // request to a reset.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(pool)
            .pool_idle_timeout(Duration::from_secs(2))
            .build(connector);
        let bases: Vec<String> = bases.into_iter().map(|b| b.trim_end_matches('/').to_owned()).collect();
        // Checked once here, so a mistyped URL is named instead of every
        // request failing with "invalid format".
        for base in &bases {
            let uri: http::Uri = base
                .parse()
                .map_err(|e| anyhow!("{base:?} is not a URL ({e}); write it like http://127.0.0.1:3000"))?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err(anyhow!(
                    "{base:?}: give the node as http://HOST:PORT (plain HTTP, e.g. http://127.0.0.1:3000)"
                ));
            }
        }
        Ok(ApiClient {
            client,
            bases,
            next: AtomicUsize::new(0),
        })
    }

    fn base(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.bases.len();
        &self.bases[i]
    }

    /// Sends one request to the next node; `extra` adds headers.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<ApiResponse> {
        let payload = match body {
            Some(b) => Some(Bytes::from(serde_json::to_vec(b)?)),
            None => None,
        };
        self.send(method, path, token, payload, extra).await
    }

    /// Like [`ApiClient::call`] with an already serialised JSON body (the
    /// bench reuses one body for every claim).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Bytes>,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<ApiResponse> {
        let url = format!("{}{path}", self.base());
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let payload = match body {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                b
            }
            None => Bytes::new(),
        };
        let request = req.body(Full::new(payload))?;
        let exchange = async {
            let res = self
                .client
                .request(request)
                .await
                .with_context(|| format!("request to {url} failed"))?;
            let status = res.status().as_u16();
            let bytes = res
                .into_body()
                .collect()
                .await
                .context("reading the answer failed")?
                .to_bytes();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Ok(ApiResponse { status, body })
        };
        // A node killed mid-request, or a pooled connection lost in a way the
        // pool never notices, must end as an error, not a wait forever.
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow!("request to {url} got no answer within {REQUEST_TIMEOUT:?}"))?
    }

    /// `POST path` with an account body (login, registration), retried the
    /// way a real client should while the node asks it to wait: 429
    /// `LOGIN_THROTTLED` (other logins from this address are being checked)
    /// or 503 `BUSY` (every password-hashing turn is taken). Gives up after
    /// 60 s with the last answer.
    pub async fn post_retrying(&self, path: &str, body: &Value) -> anyhow::Result<ApiResponse> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let res = self.post(path, None, body).await?;
            let wait = matches!(res.error_code(), Some("LOGIN_THROTTLED" | "BUSY"));
            if !wait || tokio::time::Instant::now() >= deadline {
                return Ok(res);
            }
            // Sooner than Retry-After: an account check takes milliseconds.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET path`.
    pub async fn get(&self, path: &str, token: Option<&str>) -> anyhow::Result<ApiResponse> {
        self.call(Method::GET, path, token, None, &[]).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> anyhow::Result<ApiResponse> {
        self.call(Method::POST, path, token, Some(body), &[]).await
    }
}
