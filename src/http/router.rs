//! Maps method and path to a handler and counts the answer.
//!
//! Time is bounded where a client controls it: the request head by hyper's
//! header-read timeout, the body by `server.request_timeout` (in
//! `request::json_body`). Handlers themselves never wait on a client, so the
//! claim path pays for no timer.

use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use super::{access_log::AccessLog, error::ApiError, handlers};
use crate::{metrics::Route, state::AppState};

/// Which API a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The public API (`/act/*`, `/ticket/*`, `/user/*`, `/healthz`, `/metrics`).
    Public,
    /// `/admin/*` only, behind the admin token; bind it to loopback.
    Admin,
}

/// A response body: a whole answer, or a stream (a waiting room's events,
/// an export).
pub type Body = Either<Full<Bytes>, Either<handlers::queue::EventStream, handlers::admin::ExportBody>>;

/// What the server knows about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    /// Connections open now (for `/metrics` and `/admin/stats`).
    pub connections: usize,
    /// Shutdown has begun: the answer carries `Connection: close`.
    pub closing: bool,
}

/// Answers one request. Never fails: every error becomes a JSON response.
pub async fn handle(
    state: &AppState,
    access_log: Option<&AccessLog>,
    served: Served,
    req: Request<Incoming>,
    peer: SocketAddr,
    surface: Surface,
) -> Response<Body> {
    let started = Instant::now();
    let logged = access_log
        .as_ref()
        .map(|_| (req.method().clone(), req.uri().path().to_owned()));
    let (route, allowed) = match surface {
        Surface::Public => route_of(req.uri().path()),
        Surface::Admin => admin_route_of(req.uri().path()),
    };
    let ip = state.guard.client_ip(peer, req.headers());
    let res = match ip {
        Err(denied) => ApiError::from(denied).into_response().map(Either::Left),
        Ok(ip) if route == Route::QueueEvents && surface == Surface::Public && req.method() == Method::GET => {
            events(state, &req, ip)
        }
        Ok(ip) => answer(state, served, route, allowed, surface, req, ip).await,
    };
    finish(access_log, served, route, started, logged, ip.unwrap_or(peer.ip()), res)
}

/// Answers `GET /queue/events` on a connection the server reads itself
/// (see `streaming`): the same checks, metrics and access log as [`handle`].
pub fn handle_events(
    state: &AppState,
    access_log: Option<&AccessLog>,
    served: Served,
    req: &Request<()>,
    peer: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    let logged = access_log
        .as_ref()
        .map(|_| (req.method().clone(), req.uri().path().to_owned()));
    let ip = state.guard.client_ip(peer, req.headers());
    let res = match ip {
        Err(denied) => ApiError::from(denied).into_response().map(Either::Left),
        Ok(ip) => events(state, req, ip),
    };
    let route = Route::QueueEvents;
    finish(access_log, served, route, started, logged, ip.unwrap_or(peer.ip()), res)
}

/// The one streamed answer; its checks are the handler's.
fn events<B>(state: &AppState, req: &Request<B>, ip: IpAddr) -> Response<Body> {
    match state.guard.check_ip(ip) {
        Err(denied) => ApiError::from(denied).into_response().map(Either::Left),
        Ok(()) => match handlers::queue::events(state, req, ip) {
            Ok(res) => res.map(|events| Either::Right(Either::Left(events))),
            Err(e) => e.into_response().map(Either::Left),
        },
    }
}

/// Counts the answer, logs it, and marks it `Connection: close` once
/// shutdown has begun.
fn finish(
    access_log: Option<&AccessLog>,
    served: Served,
    route: Route,
    started: Instant,
    logged: Option<(Method, String)>,
    client: IpAddr,
    mut res: Response<Body>,
) -> Response<Body> {
    crate::metrics::global().request(route, res.status().as_u16(), started.elapsed());
    if let (Some(log), Some((method, path))) = (access_log, logged) {
        log.record(client, method.as_str(), &path, res.status().as_u16(), started.elapsed());
    }
    if served.closing {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    // Every answer of such a route, its refusals before any handler too
    // (a cross-site POST, a blocked address, a bad X-Forwarded-For, a
    // stream refused): they went out without it (a README walkthrough).
    if personal(route) {
        res.headers_mut()
            .entry(header::CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("private, no-store"));
    }
    res
}

/// The answer to a request from a known client address.
async fn answer(
    state: &AppState,
    served: Served,
    route: Route,
    allowed: Method,
    surface: Surface,
    req: Request<Incoming>,
    ip: IpAddr,
) -> Response<Body> {
    let whole = |res: Response<Full<Bytes>>| res.map(Either::Left);
    if let Err(denied) = state.guard.check_ip(ip) {
        crate::metrics::global().reject(crate::metrics::Rejected::Blocked);
        return whole(ApiError::from(denied).into_response());
    }
    if route == Route::Unknown {
        return whole(
            ApiError::not_found("ROUTE_NOT_FOUND", format!("no route for {}", req.uri().path())).into_response(),
        );
    }
    // A stream has no head-only form: `/queue/events` takes GET alone.
    let head = allowed == Method::GET && route != Route::QueueEvents;
    if req.method() != allowed && !(head && req.method() == Method::HEAD) {
        let mut res = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            // The path asked for: the route's label is one for several
            // (`/admin`), or none (`page`).
            format!("{} takes {allowed}", req.uri().path()),
        )
        .into_response();
        res.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static(match allowed {
                Method::GET if head => "GET, HEAD",
                Method::GET => "GET",
                _ => "POST",
            }),
        );
        return whole(res);
    }
    // Every public POST acts for somebody: no page of another site may send one.
    if surface == Surface::Public && allowed == Method::POST {
        if let Err(denied) = state.guard.check_same_site(req.headers()) {
            crate::metrics::global().reject(crate::metrics::Rejected::CrossSite);
            return whole(ApiError::from(denied).into_response());
        }
    }
    match route {
        // The one route that may stream (an export).
        Route::Admin => match handlers::admin::handle(state, req, served.connections, ip).await {
            Ok(res) => res.map(|body| match body {
                Either::Left(whole) => Either::Left(whole),
                Either::Right(export) => Either::Right(Either::Right(export)),
            }),
            Err(e) => whole(e.into_response()),
        },
        _ => whole(
            dispatch(state, served.connections, route, req, ip)
                .await
                .unwrap_or_else(ApiError::into_response),
        ),
    }
}

/// Whether a route answers for one person (a session token, a claim
/// token, a code, a place in a room, an export of who won): such answers
/// must not be kept by a cache on the way or by the browser. `/act/list`
/// and the page are the same for everybody, and cacheable.
fn personal(route: Route) -> bool {
    matches!(
        route,
        Route::UserRegister
            | Route::UserLogin
            | Route::UserLogout
            | Route::ActDetail
            | Route::TicketGet
            | Route::TicketList
            | Route::TicketDetail
            | Route::TicketQr
            | Route::QueueJoin
            | Route::QueueStatus
            | Route::QueueEvents
            | Route::Admin
    )
}

fn route_of(path: &str) -> (Route, Method) {
    match path {
        "/ticket/get" => (Route::TicketGet, Method::POST),
        "/act/list" => (Route::ActList, Method::GET),
        "/act/detail" => (Route::ActDetail, Method::GET),
        "/ticket/list" => (Route::TicketList, Method::GET),
        "/ticket/detail" => (Route::TicketDetail, Method::GET),
        "/ticket/qr" => (Route::TicketQr, Method::GET),
        "/user/register" => (Route::UserRegister, Method::POST),
        "/user/login" => (Route::UserLogin, Method::POST),
        "/user/logout" => (Route::UserLogout, Method::POST),
        "/queue/join" => (Route::QueueJoin, Method::POST),
        "/queue/status" => (Route::QueueStatus, Method::GET),
        "/queue/events" => (Route::QueueEvents, Method::GET),
        "/healthz" => (Route::Healthz, Method::GET),
        "/metrics" => (Route::Metrics, Method::GET),
        p if handlers::page::is_page_path(p) => (Route::Page, Method::GET),
        _ => (Route::Unknown, Method::GET),
    }
}

fn admin_route_of(path: &str) -> (Route, Method) {
    match path {
        "/admin" | "/admin/stats" => (Route::Admin, Method::GET),
        "/admin/reload" | "/admin/export" => (Route::Admin, Method::POST),
        _ => (Route::Unknown, Method::GET),
    }
}

async fn dispatch(
    state: &AppState,
    connections: usize,
    route: Route,
    req: Request<Incoming>,
    ip: IpAddr,
) -> Result<Response<Full<Bytes>>, ApiError> {
    match route {
        Route::TicketGet => handlers::ticket::get(state, req, ip).await,
        // Answered in `answer` (it may stream).
        Route::Admin => Err(ApiError::not_found("ROUTE_NOT_FOUND", "no such route")),
        Route::ActList => handlers::act::list(state),
        Route::ActDetail => handlers::act::detail(state, &req).await,
        Route::TicketList => handlers::ticket::list(state, &req).await,
        Route::TicketDetail => handlers::ticket::detail(state, &req).await,
        Route::TicketQr => handlers::ticket::qr(state, &req).await,
        Route::Page => handlers::page::serve(&req),
        Route::QueueJoin => handlers::queue::join(state, req, ip).await,
        Route::QueueStatus => handlers::queue::status(state, &req, ip).await,
        // Answered in `handle` (a stream); here only for a method it does not take.
        Route::QueueEvents => Err(ApiError::not_found("ROUTE_NOT_FOUND", "no such route")),
        Route::UserRegister => handlers::user::register(state, req, ip).await,
        Route::UserLogin => handlers::user::login(state, req, ip).await,
        Route::UserLogout => handlers::user::logout(state, &req).await,
        Route::Healthz => Ok(handlers::ops::healthz(state)),
        Route::Metrics => Ok(handlers::ops::metrics(state, connections)),
        Route::Unknown => Err(ApiError::not_found("ROUTE_NOT_FOUND", "no such route")),
    }
}
