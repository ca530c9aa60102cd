//! `GET /act/list` and `GET /act/detail`: served from the catalog snapshot
//! and the inventory's stock (the live pools on one node; the cluster-wide
//! counts in a cluster).

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;

use super::ClaimView;
use crate::{
    catalog::{Activity, Status},
    clock::{now_ms, rfc3339_ms},
    http::{
        error::ApiError,
        request::{ok, optional_session, Query},
    },
    inventory::Stock,
    state::AppState,
};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ActivityView<'a> {
    act_id: &'a str,
    name: &'a str,
    desc: &'a str,
    image: &'a str,
    start_time: String,
    end_time: String,
    status: Status,
    paused: bool,
    per_user_limit: u32,
    pow_difficulty: u8,
    remaining: usize,
    claimed: usize,
    tickets: Vec<TicketView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TicketView<'a> {
    ticket_id: &'a str,
    name: &'a str,
    desc: &'a str,
    valid_from: Option<String>,
    valid_until: Option<String>,
    remaining: usize,
    total: usize,
}

/// `/act/list`'s data.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListView<'a> {
    activities: Vec<ActivityView<'a>>,
    /// The server's clock, for the page's countdowns (a fan's clock may be off).
    server_time: String,
}

fn view<'a>(a: &'a Activity, now: i64, stock: &Stock) -> ActivityView<'a> {
    ActivityView {
        act_id: &a.id,
        name: &a.name,
        desc: &a.desc,
        image: &a.image,
        start_time: rfc3339_ms(a.start_ms),
        end_time: rfc3339_ms(a.end_ms),
        status: a.status(now),
        paused: a.paused,
        per_user_limit: a.per_user_limit,
        pow_difficulty: a.pow_difficulty,
        remaining: stock.remaining,
        claimed: stock.claimed,
        tickets: a
            .tickets
            .iter()
            .zip(&stock.tickets)
            .map(|(t, &(total, remaining))| TicketView {
                ticket_id: &t.id,
                name: &t.name,
                desc: &t.desc,
                valid_from: t.valid_from_ms.map(rfc3339_ms),
                valid_until: t.valid_until_ms.map(rfc3339_ms),
                remaining,
                total,
            })
            .collect(),
    }
}

/// Activities that have not ended, with stock and status.
pub fn list(state: &AppState) -> Result<Response<Full<Bytes>>, ApiError> {
    let now = now_ms();
    let stock = state.stock_by_activity();
    let activities: Vec<_> = stock
        .iter()
        .filter(|(a, _)| a.status(now) != Status::Ended)
        .map(|(a, stock)| view(a, now, stock))
        .collect();
    // Serialised straight from the views (no `serde_json::Value` in between).
    Ok(ok(&ListView {
        activities,
        server_time: rfc3339_ms(now),
    }))
}

/// One activity; with a token, whether the caller joined and their claims.
pub async fn detail(state: &AppState, req: &Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let query = Query::parse(req.uri().query());
    let id = query.require("actId")?;
    let session = optional_session(state, req.headers())?;
    let catalog = state.catalog.load();
    let activity = catalog
        .activity(id)
        .ok_or_else(|| ApiError::not_found("ACTIVITY_NOT_FOUND", "no such activity"))?;
    if let Err(error) = state.inventory.refresh_counts(id).await {
        // The last known counts are served; the claim path does not depend on them.
        tracing::debug!(%error, "Could not refresh the stock counts.");
    }
    let now = now_ms();
    let stock = state.claimer.stock(activity);
    let mut data = serde_json::to_value(view(activity, now, &stock)).map_err(|_| ApiError::internal())?;
    if let Some(obj) = data.as_object_mut() {
        obj.insert("serverTime".into(), rfc3339_ms(now).into());
    }
    if let (Some(s), Some(obj)) = (session, data.as_object_mut()) {
        let claims = activity.ledger.claims_of(s.user_id);
        let views: Vec<ClaimView<'_>> = claims.iter().map(ClaimView::from).collect();
        obj.insert("joined".into(), (!claims.is_empty()).into());
        obj.insert(
            "claims".into(),
            serde_json::to_value(views).map_err(|_| ApiError::internal())?,
        );
        // Only a logged-in user, only once the sale is open: nothing to pre-fire.
        if let Some(token) = state.claimer.claim_token(s.user_id, activity, now) {
            obj.insert("claimToken".into(), token.into());
        }
    }
    Ok(ok(&data))
}
