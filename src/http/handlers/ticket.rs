//! `POST /ticket/get` (the claim), `GET /ticket/list`, `GET /ticket/detail`,
//! `GET /ticket/qr`.

use std::{net::IpAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use super::ClaimView;
use crate::{
    catalog::Catalog,
    claim::ClaimRequest,
    clock::now_ms,
    http::{
        error::ApiError,
        request::{idempotency_key, json_bytes, ok, parse_json, session, Id, Query, Text},
    },
    metrics::{self, Rejected},
    state::AppState,
    store::UserClaims,
    vocab::{Claim, ClaimOutcome, Rejection},
};

/// The claim body. A key it does not know is refused, not skipped: a
/// misspelled `ticketid` was a claim of any ticket type, with nothing said.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GetBody<'a> {
    // Borrowed from the body (strings without escapes): a claim's fields
    // cost no allocation.
    #[serde(borrow)]
    act_id: Id<'a>,
    #[serde(default, borrow)]
    ticket_id: Option<Id<'a>>,
    #[serde(default, borrow)]
    claim_token: Option<Text<'a>>,
    #[serde(default, borrow)]
    pow_nonce: Option<Text<'a>>,
}

/// A claim as `/ticket/list` and `/ticket/detail` show it: with the names
/// a fan knows it by, from the catalog. (`/ticket/get` answers from the
/// activity the fan is looking at, and skips the look-up.) An activity no
/// longer configured has none: its ids stand alone.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NamedClaim<'a> {
    #[serde(flatten)]
    claim: ClaimView<'a>,
    act_name: Option<&'a str>,
    ticket_name: Option<&'a str>,
}

impl<'a> NamedClaim<'a> {
    fn new(catalog: &'a Catalog, claim: &'a Claim) -> NamedClaim<'a> {
        let activity = catalog.activity(&claim.activity_id);
        NamedClaim {
            claim: ClaimView::from(claim),
            act_name: activity.map(|a| a.name.as_str()),
            ticket_name: activity
                .and_then(|a| a.ticket(&claim.ticket_id))
                .map(|t| t.name.as_str()),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Claimed<'a> {
    #[serde(flatten)]
    claim: ClaimView<'a>,
    replayed: bool,
}

/// Claims a code.
pub async fn get(state: &AppState, req: Request<Incoming>, ip: IpAddr) -> Result<Response<Full<Bytes>>, ApiError> {
    // Cheapest refusals first: the address's rate, then who it is, then the
    // user's rate; the body is read only after all of them.
    let now = Instant::now();
    let m = metrics::global();
    state
        .guard
        .admit_claim_from(ip, now)
        .inspect_err(|_| m.reject(Rejected::IpRate))?;
    // Refuses a blocked account too.
    let session = session(state, req.headers())?;
    state
        .guard
        .admit_claim_by(session.user_id, now)
        .inspect_err(|_| m.reject(Rejected::UserRate))?;
    let key = idempotency_key(req.headers())?.map(Arc::<str>::from);
    let bytes = json_bytes(state, req).await?;
    let body: GetBody<'_> = parse_json(&bytes)?;
    let catalog = state.catalog.load();
    let result = state
        .claimer
        .claim(
            &catalog,
            ClaimRequest {
                user_id: session.user_id,
                account_created_ms: session.account_created_ms,
                activity_id: body.act_id.as_str(),
                ticket_id: body.ticket_id.as_ref().map(Id::as_str),
                idempotency_key: key,
                claim_token: body.claim_token.as_ref().map(Text::as_str),
                pow_nonce: body.pow_nonce.as_ref().map(Text::as_str),
            },
        )
        .await;
    if let Some(activity) = catalog.activity(body.act_id.as_str()) {
        let outcome = ClaimOutcome::of(&result);
        state.stats.record(
            &activity.id,
            outcome,
            ip,
            session.user_id,
            crate::stats::counted_at(activity.start_ms, now_ms()),
            now.elapsed(),
        );
    }
    let claimed = result?;
    Ok(ok(&Claimed {
        claim: ClaimView::from(&claimed.claim),
        replayed: claimed.replayed,
    }))
}

/// Every claim `user` holds (claims made through other nodes included).
/// In a cluster that is a read of the shared store, within the user's
/// budget of such reads.
async fn claims_of(state: &AppState, user: u64) -> Result<UserClaims, ApiError> {
    let catalog = state.catalog.load();
    // A Redis known to be away is not asked again per request (nor is each
    // failure logged: one line per `/ticket/list` flooded the log in an
    // outage the node already reported); its probe finds it back. (A node
    // selling nothing reads MongoDB alone, and still answers.)
    if !state.store.reachable() && !catalog.activities().is_empty() {
        return Err(ApiError::from(Rejection::Unavailable));
    }
    if state.store.shared_with_nodes() {
        state
            .guard
            .admit_store_read(user, Instant::now())
            .inspect_err(|_| metrics::global().reject(Rejected::StoreReadRate))?;
    }
    state.claimer.claims_of_user(&catalog, user).await.map_err(|e| {
        tracing::warn!(error = %e, "Could not read a user's claims.");
        ApiError::from(Rejection::Unavailable)
    })
}

/// The caller's claims, newest first, paged.
pub async fn list(state: &AppState, req: &Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let session = session(state, req.headers())?;
    let query = Query::parse(req.uri().query());
    let page = query.number("page", 1, 1_000_000)?;
    let page_size = query.number("pageSize", 20, 100)?;
    let UserClaims { mut claims, complete } = claims_of(state, session.user_id).await?;
    // By time: a cluster's nodes take claim ids in blocks, so a later claim
    // through another node can have a smaller id.
    claims.sort_by_key(|c| std::cmp::Reverse((c.claimed_at_ms, c.id)));
    let total = claims.len();
    let catalog = state.catalog.load();
    let views: Vec<NamedClaim<'_>> = claims
        .iter()
        .skip(((page - 1) * page_size) as usize)
        .take(page_size as usize)
        .map(|c| NamedClaim::new(&catalog, c))
        .collect();
    Ok(ok(&serde_json::json!({
        "page": page,
        "pageSize": page_size,
        "total": total,
        "claims": views,
        // True when some could not be read (a cluster's MongoDB, for the
        // activities no node sells): to be read again later.
        "partial": !complete,
    })))
}

/// The caller's claim named by `?claimId=` (or the original API's
/// `?ticketId=`); anyone else's is indistinguishable from a missing one.
async fn own_claim(state: &AppState, req: &Request<Incoming>) -> Result<Claim, ApiError> {
    let session = session(state, req.headers())?;
    let query = Query::parse(req.uri().query());
    // `claimId`, as every claim is shown. The original API named this
    // parameter `ticketId` (here a claim's id, not the ticket type a claim
    // view calls `ticketId`), and its clients still send that.
    let raw = match ["claimId", "ticketId"]
        .iter()
        .find_map(|name| query.get(name).map(str::trim).filter(|v| !v.is_empty()))
    {
        Some(raw) => raw,
        None => {
            return Err(ApiError::bad_request(
                "MISSING_PARAMETER",
                "the query parameter `claimId` (the original API's `ticketId`) is required",
            ))
        }
    };
    let id: u64 = raw.parse().map_err(|_| {
        ApiError::bad_request(
            "INVALID_PARAMETER",
            "`claimId` (or `ticketId`) must be a claim's id, the whole number /ticket/list shows as `claimId`, \
             not a ticket type",
        )
    })?;
    let not_found = || ApiError::not_found("CLAIM_NOT_FOUND", "you hold no claim with this id");
    let UserClaims { claims, complete } = claims_of(state, session.user_id).await?;
    match claims.into_iter().find(|c| c.id == id) {
        Some(claim) => Ok(claim),
        // It may be among those that could not be read: not "you hold none".
        None if !complete => Err(ApiError::from(Rejection::Unavailable)),
        None => Err(not_found()),
    }
}

/// One claim of the caller.
pub async fn detail(state: &AppState, req: &Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let claim = own_claim(state, req).await?;
    Ok(ok(&NamedClaim::new(&state.catalog.load(), &claim)))
}

/// The caller's claim's code as a QR code (SVG), drawn here: the code never
/// leaves for a third-party QR service, and only its owner gets it.
pub async fn qr(state: &AppState, req: &Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let claim = own_claim(state, req).await?;
    let code = qrcode::QrCode::with_error_correction_level(claim.code.as_bytes(), qrcode::EcLevel::M)
        .map_err(|_| ApiError::internal())?;
    let svg = code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(200, 200)
        .quiet_zone(true)
        .build();
    let mut res = Response::new(Full::new(Bytes::from(svg)));
    let h = res.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("image/svg+xml"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("private, no-store"),
    );
    Ok(res)
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    #[test]
    fn a_claims_strings_are_borrowed_from_its_body() {
        let body = br#"{"actId":"a-1","ticketId":"t-1","claimToken":"AbC_-9.xyz","powNonce":"42"}"#;
        let b: GetBody<'_> = parse_json(body).unwrap();
        assert!(matches!(b.act_id.0, Cow::Borrowed("a-1")));
        assert!(matches!(b.ticket_id.map(|t| t.0), Some(Cow::Borrowed("t-1"))));
        assert!(matches!(b.claim_token.map(|t| t.0), Some(Cow::Borrowed("AbC_-9.xyz"))));
        assert!(matches!(b.pow_nonce.map(|t| t.0), Some(Cow::Borrowed("42"))));
        // Escaped, it is unescaped into a copy.
        let b: GetBody<'_> = parse_json(br#"{"actId":"a","claimToken":"x\u002dy"}"#).unwrap();
        let token = b.claim_token.map(|t| t.0);
        assert!(matches!(&token, Some(Cow::Owned(t)) if t == "x-y"), "{token:?}");
        // As `Option<String>` read them: null or missing is none, a number no string.
        for body in [
            &br#"{"actId":"a","claimToken":null,"powNonce":null}"#[..],
            br#"{"actId":"a"}"#,
        ] {
            let b: GetBody<'_> = parse_json(body).unwrap();
            assert!(b.claim_token.is_none() && b.pow_nonce.is_none());
        }
        let e = parse_json::<GetBody<'_>>(br#"{"actId":"a","claimToken":1}"#)
            .err()
            .unwrap();
        assert_eq!(e.code(), "INVALID_FIELD");
    }
}
