//! `GET /act/list` and `GET /act/detail`: served from the catalog snapshot
//! and the inventory's stock (the live pools on one node; the cluster-wide
//! counts in a cluster).

use std::hash::Hasher;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;

use super::ClaimView;
use crate::{
    catalog::{Activity, Listing, Status},
    clock::{now_ms, rfc3339_ms, Rfc3339Ms},
    config::AdmissionMode,
    http::{
        error::ApiError,
        request::{ok, optional_session, Query},
    },
    inventory::Stock,
    state::AppState,
    vocab::Claim,
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
    /// Only accounts made before this time take part (`min_account_age`).
    #[serde(skip_serializing_if = "Option::is_none")]
    accounts_before: Option<String>,
    /// `"race"`, `"queue"` or `"lottery"`.
    admission: AdmissionMode,
    /// Nobody can claim any more, codes left or not: the waiting room is
    /// over (closed; or a lottery that has reached every place it drew).
    closed: bool,
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

/// Whether `a`'s waiting room admits nobody any more (a race: never).
fn closed(a: &Activity) -> bool {
    a.room.as_ref().is_some_and(|r| r.admits_no_more())
}

/// `a` as the API shows it; `closed` as [`closed`] finds it, or as a
/// summary of its room taken at the same time says.
fn view<'a>(a: &'a Activity, now: i64, stock: &Stock, closed: bool) -> ActivityView<'a> {
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
        accounts_before: a.accounts_before_ms.map(rfc3339_ms),
        admission: a.room.as_ref().map_or(AdmissionMode::Race, |r| r.settings().mode),
        closed,
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

/// Activities that have not ended, with stock and status, and the server's
/// clock. The activities' JSON is rendered once per change of what it
/// shows and kept with the catalog snapshot ([`crate::catalog::Listing`]);
/// each answer only adds `serverTime`.
pub fn list(state: &AppState) -> Result<Response<Full<Bytes>>, ApiError> {
    let now = now_ms();
    let catalog = state.catalog.load();
    let fingerprint = {
        // Compared only with itself: a fast, fixed-key hash will do.
        let mut h = ahash::AHasher::default();
        for a in catalog.activities() {
            h.write_u8(a.status(now) as u8);
            h.write_u8(u8::from(a.paused));
            h.write_u8(u8::from(closed(a)));
            let tickets = a.tickets.iter().map(|t| (&*t.id, &*t.pool));
            state.inventory.hash_stock(tickets, &a.ledger, &mut h);
        }
        h.finish()
    };
    let json = match catalog.listing() {
        Some(listing) if listing.fingerprint == fingerprint => listing.json.clone(),
        _ => {
            // From the same snapshot the rendering is kept with (a reload
            // meanwhile must not put the new catalog's list into the old one).
            let stock: Vec<_> = catalog
                .activities()
                .iter()
                .filter(|a| a.status(now) != Status::Ended)
                .map(|a| (a, state.claimer.stock(a)))
                .collect();
            let activities: Vec<_> = stock.iter().map(|(a, stock)| view(a, now, stock, closed(a))).collect();
            let json = crate::http::json::to_bytes(&activities).map_err(|_| ApiError::internal())?;
            catalog.keep_listing(Listing {
                fingerprint,
                json: json.clone(),
            });
            json
        }
    };
    // `{"ok":true,"data":{"activities":[...],"serverTime":"..."}}`
    let server_time = Rfc3339Ms::new(now);
    let parts: [&[u8]; 5] = [
        br#"{"ok":true,"data":{"activities":"#,
        &json,
        br#","serverTime":""#,
        server_time.as_str().as_bytes(),
        br#""}}"#,
    ];
    // Exactly its length: a `Vec` with room to spare would cost `Bytes` a
    // second allocation.
    let mut body = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        body.extend_from_slice(part);
    }
    let mut res = Response::new(Full::new(Bytes::from(body)));
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(res)
}

/// The claims `user` holds in `activity`. A node's ledger holds the claims
/// it made since it started; in a cluster the others' are in the store.
/// That read (a Redis script on the Redis that runs every commit) is made
/// only when it can find something and someone looks: not with
/// `claims=0` (the page's grab, which fetches the detail for its claim
/// token before every claim), not before the sale opens, not when the
/// ledger shows the whole limit, not while Redis is down, and within the
/// user's budget of such reads. Otherwise the answer is the ledger's.
async fn claims_here(state: &AppState, activity: &Activity, user: u64, asked: bool, now: i64) -> Vec<Claim> {
    let mine = activity.ledger.claims_of(user);
    let read = asked
        && activity.status(now) != Status::Upcoming
        && mine.len() < activity.per_user_limit as usize
        && state.claimer.may_read_store(user);
    if !read {
        return mine;
    }
    match state
        .store
        .claims_of_user(user, std::slice::from_ref(&activity.id))
        .await
    {
        Some(Ok(stored)) => stored.into_iter().filter(|c| c.activity_id == activity.id).collect(),
        Some(Err(error)) => {
            tracing::debug!(%error, "Could not read a user's claims; showing this node's.");
            mine
        }
        None => mine,
    }
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
    // One look at the room: `closed` and the queue's figures from the same
    // moment (two looks could say "closed" beside a room still admitting).
    let room = activity.room.as_ref().map(|room| (room, room.summary()));
    let closed = room.as_ref().is_some_and(|(_, summary)| summary.admits_no_more);
    let mut data = serde_json::to_value(view(activity, now, &stock, closed)).map_err(|_| ApiError::internal())?;
    if let Some(obj) = data.as_object_mut() {
        obj.insert("serverTime".into(), rfc3339_ms(now).into());
        if let Some((room, summary)) = room {
            // The commitment is public before anyone can join; the seed once
            // the order is drawn (see `ticketd verify-draw`).
            let s = room.settings();
            obj.insert(
                "queue".into(),
                serde_json::json!({
                    "opensAt": rfc3339_ms(s.opens_ms),
                    "shuffleAt": rfc3339_ms(s.shuffle_ms),
                    "passTtlMs": s.pass_ttl_ms,
                    "graceMs": s.grace_ms,
                    // A queue's pace; a lottery admits as far as the
                    // stock goes (its `admit_rate` showed, meaning nothing).
                    "admitRate": (s.mode == AdmissionMode::Queue).then_some(s.admit_rate),
                    "commitment": room.commitment(),
                    "seed": room.revealed_seed(),
                    "waiting": summary.waiting,
                    "admitted": summary.admitted,
                    "closed": summary.closed,
                }),
            );
        }
    }
    if let (Some(s), Some(obj)) = (session, data.as_object_mut()) {
        let asked = query.get("claims") != Some("0");
        let claims = claims_here(state, activity, s.user_id, asked, now).await;
        let views: Vec<ClaimView<'_>> = claims.iter().map(ClaimView::from).collect();
        obj.insert("joined".into(), (!claims.is_empty()).into());
        obj.insert(
            "claims".into(),
            serde_json::to_value(views).map_err(|_| ApiError::internal())?,
        );
        // Only a logged-in user the activity admits, only once the sale is
        // open: nothing to pre-fire, and no proof of work solved in vain.
        let admitted = activity.admits_account(s.account_created_ms).is_ok();
        obj.insert("accountAdmitted".into(), admitted.into());
        if let Some(token) = state.claimer.claim_token(s.user_id, activity, now).filter(|_| admitted) {
            obj.insert("claimToken".into(), token.into());
        }
    }
    Ok(ok(&data))
}
