//! The accept loop: connection cap, slow-client timeouts, graceful drain.
//!
//! Each connection is served by hyper's HTTP/1.1 state machine with keep-alive,
//! a header-read timeout (a slowloris client that trickles its request
//! head is cut off) and a write-stall timeout (a client that stops reading
//! its answers is let go: [`super::write_deadline`]). Past `server.max_connections` new connections are closed
//! at once (those holding a waiting room's event stream count apart, on a
//! budget of their own). On shutdown the listener is dropped first (no new connections),
//! every connection finishes its in-flight request and closes, and the drain
//! is bounded by `server.shutdown_grace`.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use dashmap::DashMap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{watch, Notify},
};

use super::{
    access_log::AccessLog,
    lanes::{Job, Lanes},
    parse_errors::ShapedErrors,
    router::{self, Served, Surface},
    streaming,
    write_deadline::WriteDeadline,
};
use crate::{state::AppState, vocab::client_key};

/// What the HTTP layer holds beside the domain state: the connections both
/// listeners share, and the access log.
pub struct Http {
    /// The domain handles.
    pub state: Arc<AppState>,
    /// Open connections and the drain.
    pub connections: Connections,
    /// The access log, when `[log] access_log` is set.
    pub access_log: Option<AccessLog>,
}

/// Connections the admin listener takes at most. They are counted apart
/// from `server.max_connections`: fans filling the public budget must not
/// lock the operator out. (Event streams are counted apart too: see
/// `Rooms::with_stream_budget`.)
pub const MAX_ADMIN_CONNECTIONS: usize = 32;

/// Open connections across both listeners, and the shutdown drain.
pub struct Connections {
    open: AtomicUsize,
    /// Of `open`, the admin listener's.
    admin: AtomicUsize,
    /// Signalled when `open` drops to zero.
    drained: Notify,
    /// Set when shutdown begins: answers then carry `Connection: close`.
    shutting_down: AtomicBool,
    /// `server.max_connections` (restart-only).
    max: usize,
    /// Public connections open per client address (an IPv6 /64), trusted
    /// proxies left out. An entry lives while its address holds one, so
    /// the map holds at most as many as the connections open.
    per_ip: DashMap<IpAddr, usize>,
    /// `server.max_connections_per_ip` (restart-only).
    max_per_ip: usize,
}

impl Connections {
    /// No connections yet; at most `max` at once, `max_per_ip` from one
    /// client address.
    pub fn new(max: usize, max_per_ip: usize) -> Connections {
        Connections {
            open: AtomicUsize::new(0),
            admin: AtomicUsize::new(0),
            drained: Notify::new(),
            shutting_down: AtomicBool::new(false),
            max,
            per_ip: DashMap::new(),
            max_per_ip,
        }
    }

    /// Counts a public connection from `key` if its address holds fewer
    /// than its share.
    fn take_share(&self, key: IpAddr) -> bool {
        let mut held = self.per_ip.entry(key).or_insert(0);
        if *held >= self.max_per_ip {
            return false;
        }
        *held += 1;
        true
    }

    fn give_back_share(&self, key: IpAddr) {
        if let Some(mut held) = self.per_ip.get_mut(&key) {
            *held = held.saturating_sub(1);
        }
        self.per_ip.remove_if(&key, |_, held| *held == 0);
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether shutdown has begun (answers carry `Connection: close`).
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// Decrements the open-connection gauges when a connection ends, and gives
/// back its address's share (the address, when it took one).
struct ConnGuard(Arc<Http>, Surface, Option<IpAddr>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let c = &self.0.connections;
        if let Some(key) = self.2 {
            c.give_back_share(key);
        }
        if self.1 == Surface::Admin {
            c.admin.fetch_sub(1, Ordering::AcqRel);
        }
        if c.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            c.drained.notify_waiters();
        }
    }
}

/// How long, after shutdown begins, a connection may still deliver a request
/// (answered with `Connection: close`) before it is closed. It closes the
/// keep-alive race: a client that sent a request on an idle connection just
/// as we stopped gets an answer instead of a closed socket.
const LINGER: Duration = Duration::from_millis(500);

/// How often failed accepts are said at most (see [`serve`]).
const ACCEPT_FAILURES_SAID_EVERY: Duration = Duration::from_secs(10);

/// Resolves once shutdown was requested (at once if it already was).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Serves `listener` until `shutdown` turns true, then drains connections.
/// With `lanes`, each connection is served on one of them; without, on the
/// runtime this runs on.
pub async fn serve(
    listener: TcpListener,
    http: Arc<Http>,
    mut shutdown: watch::Receiver<bool>,
    surface: Surface,
    lanes: Option<&Lanes>,
) {
    let conns = &http.connections;
    let mut draining = false;
    // Failed accepts (the open-file limit reached) are said once per
    // `ACCEPT_FAILURES_SAID_EVERY`, with how many there were since the
    // last time (all of them: `ticketd_accept_failures_total`): one
    // warning per retry filled the log with hundreds a second.
    let mut accept_failures: (Option<std::time::Instant>, u64) = (None, 0);
    loop {
        let (stream, peer) = if draining {
            // Take what already waits in the backlog (closing the listener
            // would reset those connections), then stop.
            tokio::select! {
                biased;
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(_) => break,
                },
                _ = std::future::ready(()) => break,
            }
        } else {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        // EMFILE and friends: back off briefly instead of
                        // spinning; the connection waits in the kernel's queue.
                        crate::metrics::global().accept_failures.fetch_add(1, Ordering::Relaxed);
                        let (said, failures) = &mut accept_failures;
                        *failures += 1;
                        if said.is_none_or(|at| at.elapsed() >= ACCEPT_FAILURES_SAID_EVERY) {
                            tracing::warn!(%error, failures = *failures, "Accept failed; new connections wait in the kernel's queue until a file is free.");
                            *said = Some(std::time::Instant::now());
                            *failures = 0;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                _ = stopped(&mut shutdown) => {
                    conns.shutting_down.store(true, Ordering::Release);
                    draining = true;
                    continue;
                }
            }
        };
        let open = conns.open.fetch_add(1, Ordering::AcqRel);
        let over = match surface {
            // The admin listener's own are not the public side's, nor are
            // those holding event streams (they have a budget of their own).
            Surface::Public => {
                open.saturating_sub(conns.admin.load(Ordering::Acquire) + http.state.rooms.open_streams()) >= conns.max
            }
            Surface::Admin => conns.admin.fetch_add(1, Ordering::AcqRel) >= MAX_ADMIN_CONNECTIONS,
        };
        // One address's share (not a trusted proxy's: Nginx keeps its own).
        let key = (surface == Surface::Public && !over && !http.state.guard.is_trusted_proxy(peer.ip()))
            .then(|| client_key(peer.ip()));
        let share = key.filter(|&key| conns.take_share(key));
        let guard = ConnGuard(http.clone(), surface, share);
        // Refused: over the node's budget, or the address's share full.
        if over || key != share {
            use crate::metrics::Refused;
            let reason = match surface {
                Surface::Admin => Refused::Admin,
                Surface::Public if over => Refused::Cap,
                Surface::Public => Refused::PerAddress,
            };
            crate::metrics::global().refuse_connection(reason);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let (http, shutdown) = (http.clone(), shutdown.clone());
        let Some(lanes) = lanes else {
            tokio::spawn(serve_connection(stream, http, peer, shutdown, surface, guard));
            continue;
        };
        // To its lane's reactor: the lane registers the socket anew.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, %peer, "Could not hand a connection to a lane.");
                continue;
            }
        };
        let job: Job = Box::pin(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve_connection(stream, http, peer, shutdown, surface, guard).await,
                Err(error) => tracing::debug!(%error, %peer, "A lane could not take a connection."),
            }
        });
        if let Err(job) = lanes.send(job) {
            tokio::spawn(job);
        }
    }
    drop(listener);
    let grace = http.state.shutdown_grace();
    // Each listener says so: which one, as there may be two.
    let listener = match surface {
        Surface::Public => "public",
        Surface::Admin => "admin",
    };
    tracing::info!(
        listener,
        connections = conns.open.load(Ordering::Acquire),
        grace = ?grace,
        "Stopped accepting; draining connections."
    );
    let drained = async {
        loop {
            let notified = conns.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if conns.open.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            connections = conns.open.load(Ordering::Acquire),
            "Shutdown grace elapsed; closing remaining connections."
        );
    }
}

/// Serves one accepted connection: a fan's event stream on the light path,
/// anything else with hyper.
async fn serve_connection(
    stream: TcpStream,
    http: Arc<Http>,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
    surface: Surface,
    guard: ConnGuard,
) {
    let _guard = guard;
    let header_read_timeout = http.state.header_read_timeout();
    // The first request's head is due this long after the connection came,
    // however the waiting is split: looking for an event stream and then
    // hyper's own header timeout each gave it the whole, so a head whose
    // first byte came just in time had twice as long.
    let head_by = tokio::time::Instant::now() + header_read_timeout;
    if surface == Surface::Public {
        // A fan's event stream is served on far less memory than a
        // hyper connection holds (see `streaming`).
        let looked = tokio::select! {
            biased;
            looked = streaming::wants_events(&stream, head_by) => looked,
            // Draining: a request already on its way still gets an
            // answer (with `Connection: close`), as hyper gives one.
            _ = stopped(&mut shutdown) => tokio::time::timeout(LINGER, streaming::wants_events(&stream, head_by))
                .await
                .ok()
                .flatten(),
        };
        match looked {
            None => return,
            Some(true) => {
                let served = Served {
                    connections: http.connections.open(),
                    closing: http.connections.shutting_down(),
                };
                streaming::serve(stream, &http.state, http.access_log.as_ref(), peer, served, head_by).await;
                return;
            }
            Some(false) => {}
        }
    }
    // Boxed: a waiting fan's task (above) is not sized for hyper's.
    Box::pin(serve_hyper(
        stream,
        http,
        peer,
        shutdown,
        surface,
        header_read_timeout,
        head_by,
    ))
    .await;
}

/// Serves one connection with hyper's HTTP/1.1 state machine until it
/// closes or the drain ends it. The first request's head must be in by
/// `head_by` (hyper's timer starts only when it first reads); later heads
/// get hyper's `header_read_timeout` each.
async fn serve_hyper(
    stream: TcpStream,
    http: Arc<Http>,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
    surface: Surface,
    header_read_timeout: Duration,
    head_by: tokio::time::Instant,
) {
    let write_timeout = http.state.write_timeout();
    // On this future's own state, borrowed by the service: no allocation.
    let first_head = AtomicBool::new(false);
    let head_seen = &first_head;
    let svc = service_fn(move |req| {
        let http = http.clone();
        head_seen.store(true, Ordering::Relaxed);
        async move {
            let served = Served {
                connections: http.connections.open(),
                closing: http.connections.shutting_down(),
            };
            let res = router::handle(&http.state, http.access_log.as_ref(), served, req, peer, surface).await;
            Ok::<_, Infallible>(res)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true)
        .max_buf_size(64 * 1024)
        .serve_connection(
            TokioIo::new(ShapedErrors::new(WriteDeadline::new(stream, write_timeout))),
            svc,
        );
    tokio::pin!(conn);
    let result = tokio::select! {
        res = conn.as_mut() => res,
        () = first_head_late(head_by, &first_head) => {
            tracing::debug!(%peer, "No request head by the header timeout; connection closed.");
            return;
        }
        _ = stopped(&mut shutdown) => {
            // Answers from now on carry `Connection: close`; give a
            // request already on its way the linger to arrive.
            match tokio::time::timeout(LINGER, conn.as_mut()).await {
                Ok(res) => res,
                Err(_) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, %peer, "Connection ended with an error.");
    }
}

/// Resolves at `by` if no request head has come by then; never otherwise.
async fn first_head_late(by: tokio::time::Instant, seen: &AtomicBool) {
    tokio::time::sleep_until(by).await;
    if seen.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
}

/// The address a listener is bound to, for logs.
pub fn local_addr(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
