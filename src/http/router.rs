//! Maps method and path to a handler and counts the answer.
//!
//! Time is bounded where a client controls it: the request head by hyper's
//! header-read timeout, the body by `server.request_timeout` (in
//! `request::json_body`). Handlers themselves never wait on a client, so the
//! claim path pays for no timer.

use std::{net::SocketAddr, time::Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{handlers, ApiError};
use crate::{app::AppState, metrics::Route};

/// Answers one request. Never fails: every error becomes a JSON response.
pub async fn handle(
    state: &AppState,
    req: Request<Incoming>,
    _peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let (route, allowed) = route_of(req.uri().path());
    let res = if route == Route::Unknown {
        ApiError::not_found(
            "ROUTE_NOT_FOUND",
            format!("no route for {}", req.uri().path()),
        )
        .into_response()
    } else if req.method() != allowed && !(allowed == Method::GET && req.method() == Method::HEAD) {
        let mut res = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            format!("{} takes {allowed}", route.label()),
        )
        .into_response();
        res.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static(if allowed == Method::GET {
                "GET, HEAD"
            } else {
                "POST"
            }),
        );
        res
    } else {
        let timeout = state.request_timeout();
        match tokio::time::timeout(timeout, dispatch(state, route, req)).await {
            Ok(Ok(res)) => res,
            Ok(Err(e)) => e.into_response(),
            Err(_) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "REQUEST_TIMEOUT",
                "the request took too long",
            )
            .into_response(),
        }
    };
    crate::metrics::global().request(route, res.status().as_u16(), started.elapsed());
    res
}

fn route_of(path: &str) -> (Route, Method) {
    match path {
        "/ticket/get" => (Route::TicketGet, Method::POST),
        "/act/list" => (Route::ActList, Method::GET),
        "/act/detail" => (Route::ActDetail, Method::GET),
        "/ticket/list" => (Route::TicketList, Method::GET),
        "/ticket/detail" => (Route::TicketDetail, Method::GET),
        "/user/register" => (Route::UserRegister, Method::POST),
        "/user/login" => (Route::UserLogin, Method::POST),
        "/user/logout" => (Route::UserLogout, Method::POST),
        "/healthz" => (Route::Healthz, Method::GET),
        "/metrics" => (Route::Metrics, Method::GET),
        _ => (Route::Unknown, Method::GET),
    }
}

async fn dispatch(
    state: &AppState,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    match route {
        Route::TicketGet => handlers::ticket::get(state, req).await,
        Route::ActList => handlers::act::list(state),
        Route::ActDetail => handlers::act::detail(state, &req),
        Route::TicketList => handlers::ticket::list(state, &req),
        Route::TicketDetail => handlers::ticket::detail(state, &req),
        Route::UserRegister => handlers::user::register(state, req).await,
        Route::UserLogin => handlers::user::login(state, req).await,
        Route::UserLogout => handlers::user::logout(state, &req).await,
        Route::Healthz => Ok(handlers::ops::healthz(state)),
        Route::Metrics => Ok(handlers::ops::metrics(state)),
        Route::Unknown => Err(ApiError::not_found("ROUTE_NOT_FOUND", "no such route")),
    }
}
