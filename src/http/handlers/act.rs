//! `GET /act/list` and `GET /act/detail`: served from the catalog snapshot
//! and the live pools, never from the store.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;

use super::ClaimView;
use crate::{
    app::AppState,
    catalog::{Activity, Status},
    config::{now_ms, rfc3339_ms},
    http::{
        request::{ok, optional_session, Query},
        ApiError,
    },
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

fn view(a: &Activity, now: i64) -> ActivityView<'_> {
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
        remaining: a.remaining(),
        claimed: a.ledger.claimed(),
        tickets: a
            .tickets
            .iter()
            .map(|t| TicketView {
                ticket_id: &t.id,
                name: &t.name,
                desc: &t.desc,
                valid_from: t.valid_from_ms.map(rfc3339_ms),
                valid_until: t.valid_until_ms.map(rfc3339_ms),
                remaining: t.pool.remaining(),
                total: t.pool.known(),
            })
            .collect(),
    }
}

/// Activities that have not ended, with stock and status.
pub fn list(state: &AppState) -> Result<Response<Full<Bytes>>, ApiError> {
    let catalog = state.catalog.load();
    let now = now_ms();
    let activities: Vec<_> = catalog
        .activities()
        .iter()
        .filter(|a| a.status(now) != Status::Ended)
        .map(|a| view(a, now))
        .collect();
    Ok(ok(&serde_json::json!({ "activities": activities })))
}

/// One activity; with a token, whether the caller joined and their claims.
pub fn detail(state: &AppState, req: &Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let query = Query::parse(req.uri().query());
    let id = query.require("actId")?;
    let session = optional_session(state, req.headers())?;
    let catalog = state.catalog.load();
    let activity = catalog
        .activity(id)
        .ok_or_else(|| ApiError::not_found("ACTIVITY_NOT_FOUND", "no such activity"))?;
    let now = now_ms();
    let mut data = serde_json::to_value(view(activity, now)).map_err(|_| ApiError::internal())?;
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
