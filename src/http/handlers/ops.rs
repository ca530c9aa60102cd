//! `GET /healthz` and `GET /metrics`.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::{
    http::{error::ApiError, request::ok},
    state::AppState,
};

/// 200 while claims can be committed (in a cluster: Redis keeps them, and
/// the backlog for MongoDB has room), every waiting room can keep its
/// log and every background worker runs; 503 otherwise. (A worker that
/// panicked showed only in `/metrics`, and only systemd's watchdog acted on
/// it: a node run without `WatchdogSec`, behind a load balancer that reads
/// this, went on taking traffic with, say, its store applier or admitter
/// gone.)
pub fn healthz(state: &AppState) -> Response<Full<Bytes>> {
    if let Some(why) = state.unhealthy() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "UNHEALTHY", why).into_response();
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Healthy {
        status: &'static str,
        uptime_secs: u64,
    }
    // Typed, not a `serde_json::Value`: a load balancer asks this often.
    ok(&Healthy {
        status: "ok",
        uptime_secs: state.started.elapsed().as_secs(),
    })
}

/// Prometheus text exposition.
pub fn metrics(state: &AppState, connections: usize) -> Response<Full<Bytes>> {
    let body = crate::metrics::global().render(&state.gauges(connections));
    let mut res = Response::new(Full::new(Bytes::from(body)));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}
