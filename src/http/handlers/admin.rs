//! `/admin/*`: operations for organisers and operators, served only on the
//! admin listener and only with the admin token (a user's session token is
//! never enough).
//!
//! - `GET /admin` — the live page (stock, claims/s, shed and refused counts);
//! - `GET /admin/stats` — stock, claims and in-flight work per activity, claim outcomes;
//! - `POST /admin/reload` — the same as SIGHUP, answering whether it applied;
//! - `POST /admin/export?actId=&format=csv|jsonl` — every claim of an
//!   activity answered before the request (it waits up to 5 s for SQLite to
//!   hold them); `X-Claims-In-Transit` counts those it could not wait for.
//!   Streamed as it is read ([`ExportBody`]).

use std::{
    io::{self, Write},
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::{Frame, Incoming};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

use crate::{
    clock::now_ms,
    export::ExportFormat,
    http::{
        error::ApiError,
        request::{bearer_token, ok, Query},
    },
    metrics::{self, Rejected},
    state::AppState,
    store::{InTransit, Store, StoreError},
};

/// The live admin page: static HTML whose script polls `/admin/stats` with
/// the admin token typed into its field (kept in the tab's sessionStorage,
/// never in the address, never logged).
const PAGE: &str = include_str!("assets/admin.html");

/// An answer of the admin API: whole, or an export streamed.
pub type AdminBody = Either<Full<Bytes>, ExportBody>;

/// Checks the admin token, then answers the admin route.
pub async fn handle(
    state: &AppState,
    req: Request<Incoming>,
    connections: usize,
    ip: std::net::IpAddr,
) -> Result<Response<AdminBody>, ApiError> {
    let whole = |res: Response<Full<Bytes>>| res.map(Either::Left);
    if req.uri().path() == "/admin" {
        let mut res = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
                 frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
        );
        // Not in another site's frame (a click-jacked pause or reload).
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        return Ok(whole(res));
    }
    let expected = state.admin_token.as_deref().unwrap_or("");
    let given = bearer_token(req.headers()).unwrap_or("");
    let valid = !expected.is_empty() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()));
    if !valid {
        metrics::global().reject(Rejected::AdminUnauthorized);
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "ADMIN_TOKEN_REQUIRED",
            "send the admin token as a bearer token",
        ));
    }
    match req.uri().path() {
        "/admin/stats" => Ok(whole(stats(state, connections))),
        "/admin/reload" => {
            let by = format!("admin API from {ip}");
            let result = tokio::task::block_in_place(|| state.reload(&by));
            match result {
                Ok(added) => Ok(whole(ok(&serde_json::json!({ "reloaded": true, "codesAdded": added })))),
                Err(reason) => Err(ApiError::new(StatusCode::CONFLICT, "RELOAD_REFUSED", reason)),
            }
        }
        _ => export(state, &req).await.map(|res| res.map(Either::Right)),
    }
}

fn stats(state: &AppState, connections: usize) -> Response<Full<Bytes>> {
    let now = now_ms();
    let activities: Vec<_> = state
        .stock_by_activity()
        .into_iter()
        .map(|(a, stock)| {
            serde_json::json!({
                "actId": &*a.id,
                "status": a.status(now),
                "paused": a.paused,
                "remaining": stock.remaining,
                "claimed": stock.claimed,
                "inFlight": a.ledger.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                "queue": a.room.as_ref().map(|r| r.summary()),
                "tickets": a.tickets.iter().zip(&stock.tickets).map(|(t, (total, remaining))| serde_json::json!({
                    "ticketId": &*t.id, "remaining": remaining, "total": total,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    ok(&serde_json::json!({
        "activities": activities,
        "claimsInFlight": state.claimer.in_flight(),
        "connections": connections,
        "workers": state.workers.report(),
        "journalQueue": state.store.commit_queue_len(),
        // Cluster mode: what an operator looks at first in an outage.
        "cluster": state.store.gauges().map(|g| serde_json::json!({
            "redisUp": g.redis_up,
            "redisDurable": g.redis_durable,
            "mongoUp": g.mongo_up,
            "mongoBacklog": g.backlog,
            "leased": state.inventory.leasing().map(|l| l.leased()).unwrap_or_default().into_iter()
                .map(|(act, ticket, codes)| serde_json::json!({ "actId": act, "ticketId": ticket, "codes": codes }))
                .collect::<Vec<_>>(),
        })),
        "uptimeSecs": state.started.elapsed().as_secs(),
        "claimOutcomes": metrics::global().claim_outcomes(),
        // Claims turned away before the claim decision, which
        // `claimOutcomes` does not count: a bot attack showed as "refused
        // 0" on the page (an operations walkthrough).
        "claimsRateLimited": metrics::global().claims_rate_limited(),
    }))
}

/// How long an export waits for SQLite to hold every claim answered before it.
const EXPORT_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(5);

/// The claims of the activity an export could not wait for: answered, and
/// still on their way to the store it reads (SQLite busy or its disk full;
/// in a cluster, MongoDB behind); `unknown` while Redis, which holds a
/// cluster's backlogs, does not answer.
const IN_TRANSIT: header::HeaderName = header::HeaderName::from_static("x-claims-in-transit");

/// Chunks of an export on their way: a few, so that a slow client holds
/// the reading back rather than the node's memory.
const EXPORT_CHUNKS: usize = 4;
/// Bytes per chunk.
const EXPORT_CHUNK: usize = 64 * 1024;

/// A chunk of an export, or why the reading stopped.
type Chunk = Result<Bytes, StoreError>;

/// An export's body: the chunks a blocking task writes as it reads the
/// store. An activity's claims are never in memory whole (a million of
/// them are about 100 MB of CSV); a client that leaves stops the reading.
/// The answer starts with the first chunk (or the whole export, if less):
/// a failure before it is a JSON error like any other. A failure later
/// ends the body with an error, so the client sees the transfer cut short
/// rather than an export that looks whole.
pub struct ExportBody {
    first: Option<Bytes>,
    chunks: mpsc::Receiver<Chunk>,
}

impl hyper::body::Body for ExportBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        self.chunks
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| c.map(Frame::data).map_err(|e| io::Error::other(e.to_string()))))
    }
}

/// Writes into an [`ExportBody`] a chunk at a time (on a blocking thread).
struct ChunkWriter {
    chunks: mpsc::Sender<Chunk>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(EXPORT_CHUNK));
        self.chunks
            .blocking_send(Ok(Bytes::from(chunk)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client left"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= EXPORT_CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    /// Keeps the bytes: the last chunk goes once the export is whole
    /// ([`ChunkWriter::send`] after it). A writer flushes when it is
    /// dropped, also after a failure, and the start of an export that then
    /// failed would have gone out as its answer.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

async fn export(state: &AppState, req: &Request<Incoming>) -> Result<Response<ExportBody>, ApiError> {
    let query = Query::parse(req.uri().query());
    let activity = query.require("actId")?;
    let format = match query.get("format").unwrap_or("csv") {
        "csv" => ExportFormat::Csv,
        "jsonl" => ExportFormat::Jsonl,
        _ => {
            return Err(ApiError::bad_request(
                "INVALID_PARAMETER",
                "format must be csv or jsonl",
            ))
        }
    };
    let store: &Store = &state.store;
    if !store.has_activity(activity)? {
        return Err(ApiError::not_found("ACTIVITY_NOT_FOUND", "no such activity"));
    }
    // A serving node copies claims from its journal into SQLite, which
    // exports read, a batch at a time: an export taken as a rush ends would
    // miss its last winners.
    let caught_up = state.store.caught_up(EXPORT_CATCH_UP).await;
    // Caught up, none is missing (and the journal need not be read); else
    // counted before the export reads: an overstatement at worst.
    let in_transit = if caught_up {
        InTransit::Counted(0)
    } else {
        tokio::task::block_in_place(|| store.claims_in_transit(activity))?
    };
    let in_transit = match in_transit {
        InTransit::Counted(n) => HeaderValue::from(n),
        // Redis out of reach: MongoDB's claims are all there, and those
        // still in a backlog could not be counted.
        InTransit::Unknown(reason) => {
            tracing::warn!(%activity, %reason, "An export could not count the claims still in a backlog for MongoDB: Redis is out of reach.");
            HeaderValue::from_static("unknown")
        }
    };
    let (tx, chunks) = mpsc::channel(EXPORT_CHUNKS);
    let (store, activity) = (state.store.clone(), activity.to_owned());
    let on_panic = tx.clone();
    let reading = tokio::task::spawn_blocking(move || {
        let mut out = ChunkWriter {
            chunks: tx.clone(),
            buf: Vec::with_capacity(EXPORT_CHUNK),
        };
        let written = crate::export::claims(&store, &activity, format, &mut out).and_then(|_| {
            out.send().map_err(|source| StoreError::Io {
                what: "cannot send the export to",
                path: "the client".into(),
                source,
            })
        });
        if let Err(error) = written {
            if !tx.is_closed() {
                tracing::warn!(%activity, %error, "An export failed; its answer is an error, or cut short.");
                let _ = tx.blocking_send(Err(error));
            }
        }
    });
    // A reading that panicked must not end the body as if it were whole.
    tokio::spawn(async move {
        if reading.await.is_err() {
            tracing::error!("An export's reading panicked; its answer is an error, or cut short.");
            let failed = StoreError::Io {
                what: "the export's reading panicked",
                path: "the output".into(),
                source: io::Error::other("panic"),
            };
            let _ = on_panic.send(Err(failed)).await;
        }
    });
    let mut chunks = chunks;
    let first = match chunks.recv().await {
        Some(Ok(first)) => Some(first),
        Some(Err(error)) => return Err(error.into()),
        None => None,
    };
    let mut res = Response::new(ExportBody { first, chunks });
    res.headers_mut().insert(IN_TRANSIT, in_transit);
    let ct = if format == ExportFormat::Csv {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    Ok(res)
}
