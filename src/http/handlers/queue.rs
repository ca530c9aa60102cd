//! `POST /queue/join`, `GET /queue/status`, `GET /queue/events`: the
//! waiting room of a queue or lottery activity, as a fan sees it.
//!
//! Each costs one token of the caller's address bucket (the claim's), so
//! a script polling hard runs dry like one claiming hard. The event stream
//! is the cheap way to wait: one connection, an update a second at most,
//! and it keeps the fan's place (a fan is "there" while it is open).

use std::{
    convert::Infallible,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Frame;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use crate::{
    admission::{Entry, JoinError, PlaceState, QueueStatus, Room, Rooms, StreamRefused, StreamSlot},
    auth::{
        claim_token::{join_challenge, pow_ok},
        Auth, Guard, Session,
    },
    catalog::{Activity, Status},
    clock::{now_ms, rfc3339_ms, Rfc3339Ms},
    config::AdmissionMode,
    http::{
        error::ApiError,
        request::{json_bytes, ok, parse_json, session, Id, Query},
    },
    metrics::{self, Rejected},
    state::AppState,
    store::{Joined, RoomSource},
    vocab::Rejection,
};

/// How often an event stream looks at its fan's place.
const STREAM_LOOK_EVERY: Duration = Duration::from_millis(500);
/// Regular updates (the position moving) at most this often.
const STREAM_UPDATE_EVERY: Duration = Duration::from_secs(1);
/// A comment line at least this often, so proxies keep the stream open.
const STREAM_HEARTBEAT: Duration = Duration::from_secs(15);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JoinBody<'a> {
    #[serde(borrow)]
    act_id: Id<'a>,
    /// Solves the activity's proof of work over its join challenge, when
    /// it has `pow_difficulty`.
    #[serde(default)]
    pow_nonce: Option<String>,
}

/// A fan's place, with the pass (the claim token) once admitted.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusView {
    #[serde(flatten)]
    status: QueueStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pass: Option<String>,
    server_time: Rfc3339Ms,
}

fn room_of(activity: &Activity) -> Result<&Arc<Room>, ApiError> {
    activity.room.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "NO_QUEUE",
            "this activity has no waiting room: claims are first come, first served",
        )
    })
}

fn activity<'a>(catalog: &'a crate::catalog::Catalog, id: &str) -> Result<&'a Arc<Activity>, ApiError> {
    catalog
        .activity(id)
        .ok_or_else(|| ApiError::not_found("ACTIVITY_NOT_FOUND", "no such activity"))
}

fn view(state: &AppState, activity: &Activity, user: u64, status: QueueStatus, now: i64) -> StatusView {
    let pass = match status.state {
        PlaceState::Admitted => state.claimer.claim_token(user, activity, now),
        _ => None,
    };
    StatusView {
        status,
        pass,
        server_time: Rfc3339Ms::new(now),
    }
}

fn join_error(e: JoinError, activity: &Activity, now: i64) -> ApiError {
    match e {
        JoinError::NotOpen { opens_ms } => ApiError::new(
            StatusCode::CONFLICT,
            "QUEUE_NOT_OPEN",
            format!("the waiting room opens at {}", rfc3339_ms(opens_ms)),
        ),
        JoinError::EntriesClosed => ApiError::new(
            StatusCode::CONFLICT,
            "ENTRIES_CLOSED",
            "the draw has been made; entries are closed",
        ),
        JoinError::Closed if activity.status(now) == Status::Ended => {
            ApiError::new(StatusCode::CONFLICT, "ENDED", "the sale has ended")
        }
        JoinError::Closed => ApiError::new(StatusCode::GONE, "SOLD_OUT", "everything has been claimed"),
        // A lottery's entrants all wait until its draw, and none may enter
        // after it: no place frees up for a retry (only a reload that
        // raises `queue_capacity` makes room).
        JoinError::Full
            if activity
                .room
                .as_ref()
                .is_some_and(|r| r.settings().mode == AdmissionMode::Lottery) =>
        {
            ApiError::new(
                StatusCode::CONFLICT,
                "ENTRIES_FULL",
                "the lottery has taken as many entries as it holds (queue_capacity)",
            )
        }
        JoinError::Full => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "QUEUE_FULL",
            "the waiting room is full; try again shortly",
        )
        .retry_after(5),
        JoinError::Drawing => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "BUSY",
            "the waiting room is drawing its order; join again in a moment (at the back)",
        )
        .retry_after(1),
        JoinError::NoMorePlaces => ApiError::new(
            StatusCode::CONFLICT,
            "NO_MORE_PLACES",
            format!(
                "this account has taken a place in this waiting room {} times, the most it may",
                crate::admission::state::MAX_PLACES_PER_ACCOUNT
            ),
        ),
        JoinError::Unavailable => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "STORE_UNAVAILABLE",
            "the waiting room cannot record places now",
        )
        .retry_after(5),
    }
}

/// The caller's session, allowed by their address's bucket and not blocked.
fn caller(state: &AppState, req_headers: &http::HeaderMap, ip: IpAddr) -> Result<Session, ApiError> {
    state
        .guard
        .admit_claim_from(ip, Instant::now())
        .inspect_err(|_| metrics::global().reject(Rejected::QueueIpRate))?;
    session(state, req_headers)
}

/// Takes a place (joining again keeps it) and answers with it, once the
/// room's log holds it.
pub async fn join(state: &AppState, req: Request<Incoming>, ip: IpAddr) -> Result<Response<Full<Bytes>>, ApiError> {
    let session = caller(state, req.headers(), ip)?;
    let user = session.user_id;
    let bytes = json_bytes(state, req).await?;
    let body: JoinBody<'_> = parse_json(&bytes)?;
    let catalog = state.catalog.load();
    let activity = activity(&catalog, body.act_id.as_str())?;
    let room = room_of(activity)?;
    activity.admits_account(session.account_created_ms).inspect_err(|why| {
        metrics::global().reject(match why {
            Rejection::SessionPredatesAccountAge => Rejected::JoinSessionOutdated,
            _ => Rejected::JoinAccountTooNew,
        })
    })?;
    if activity.pow_difficulty > 0 {
        let challenge = join_challenge(&activity.id, user);
        if !body
            .pow_nonce
            .as_deref()
            .is_some_and(|n| pow_ok(&challenge, n, activity.pow_difficulty))
        {
            metrics::global().reject(Rejected::JoinProofOfWork);
            return Err(ApiError::join_pow_required(activity.pow_difficulty, challenge));
        }
    }
    let now = now_ms();
    match state.store.room_source().filter(|_| room.is_shared()) {
        Some(source) => join_shared(&source, room, user, now, || state.claimer.may_read_store(user))
            .await
            .map_err(|e| join_error(e, activity, now))?,
        None => {
            let seq = room.join(user, now).map_err(|e| join_error(e, activity, now))?;
            room.persist(seq).await.map_err(|e| join_error(e, activity, now))?;
        }
    }
    let now = now_ms();
    Ok(ok(&view(state, activity, user, room.status(user, now, true), now)))
}

/// A cluster: the join is one script on the room's shared log; then this
/// node's replica catches up, so the answer shows the place.
///
/// A place this replica already holds for the fan is joined again within
/// the fan's budget of store reads (`budget`, which takes from it); past
/// it, the answer is the replica's, with no call to Redis. Joining again
/// keeps a place, so the script changes nothing there, but each call cost
/// Redis a script and a read of the log, which any account could ask for
/// as fast as its address's claim rate let it.
async fn join_shared(
    source: &RoomSource,
    room: &Room,
    user: u64,
    now: i64,
    budget: impl FnOnce() -> bool,
) -> Result<(), JoinError> {
    let s = room.settings();
    let lottery = s.mode == AdmissionMode::Lottery;
    // The room's entry rules, as this replica knows it. From the draw time
    // on, a fan it does not know may have joined through another node (and
    // be in the drawn order), and the order may be drawn: so a new place or
    // a refusal is asked again after reading the shared log. (A lottery fan
    // this replica knows as passed over is read for too: one more round
    // trip, in a refusal that stands.)
    let mut entry = room.entry(user, now);
    if matches!(entry, Ok(Entry::Held)) && !budget() {
        return Ok(());
    }
    if now >= s.shuffle_ms
        && matches!(
            entry,
            Ok(Entry::New) | Err(JoinError::EntriesClosed | JoinError::Drawing)
        )
    {
        source.sync(room).await.map_err(|error| {
            tracing::warn!(%error, "Could not read the shared waiting room.");
            JoinError::Unavailable
        })?;
        entry = room.entry(user, now);
    }
    let lapsed_pass = match entry? {
        Entry::Again { lapsed_pass_ms } => lapsed_pass_ms,
        Entry::Held | Entry::New => None,
    };
    let joined = source
        .join(&room.activity, user, now, lottery, s.capacity, lapsed_pass)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "Could not record a place in the shared waiting room.");
            JoinError::Unavailable
        })?;
    match joined {
        Joined::New | Joined::Same => {}
        Joined::Closed => return Err(JoinError::Closed),
        Joined::EntriesClosed => return Err(JoinError::EntriesClosed),
        Joined::Full => return Err(JoinError::Full),
        Joined::NoMorePlaces => return Err(JoinError::NoMorePlaces),
    }
    source.sync(room).await.map_err(|error| {
        tracing::warn!(%error, "Could not read the shared waiting room.");
        JoinError::Unavailable
    })
}

/// The caller's place; asking counts as being there.
pub async fn status(state: &AppState, req: &Request<Incoming>, ip: IpAddr) -> Result<Response<Full<Bytes>>, ApiError> {
    let user = caller(state, req.headers(), ip)?.user_id;
    let query = Query::parse(req.uri().query());
    let catalog = state.catalog.load();
    let activity = activity(&catalog, query.require("actId")?)?;
    let room = room_of(activity)?;
    let now = now_ms();
    let mut status = room.status(user, now, true);
    // A fan who joined through another node a moment ago is not in this
    // replica yet (it reads the shared log every tenth of a second): told
    // "not joined", the page would stop keeping the place. Read it once
    // (within the user's budget of store reads) before saying so.
    if status.state == PlaceState::NotJoined && room.is_shared() && !room.read_since(now) {
        if let Some(source) = state.store.room_source() {
            if state.claimer.may_read_store(user) && source.sync(room).await.is_ok() {
                status = room.status(user, now_ms(), true);
            }
        }
    }
    Ok(ok(&view(state, activity, user, status, now)))
}

/// Server-sent events of the caller's place: `event: status` with the
/// same JSON as `/queue/status` (without the pass: fetch it from
/// `/queue/status` once admitted), when it changes, a second apart at most;
/// the stream ends when there is nothing to wait for (not joined, done,
/// sold out, entries closed) or the node shuts down.
pub fn events<B>(state: &AppState, req: &Request<B>, ip: IpAddr) -> Result<Response<EventStream>, ApiError> {
    let session = caller(state, req.headers(), ip)?;
    let user = session.user_id;
    let query = Query::parse(req.uri().query());
    let catalog = state.catalog.load();
    let room = room_of(activity(&catalog, query.require("actId")?)?)?.clone();
    let slot = state.rooms.open_stream(user).map_err(|refused| {
        match refused {
            StreamRefused::Account => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TOO_MANY_STREAMS",
                "this account has too many event streams open; close one (or poll /queue/status)",
            ),
            StreamRefused::Node => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "STREAMS_FULL",
                "this node holds all the event streams it takes; poll /queue/status to keep your place",
            ),
        }
        .retry_after(5)
    })?;
    let mut look = tokio::time::interval(STREAM_LOOK_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = EventStream {
        room,
        rooms: state.rooms.clone(),
        auth: state.auth.clone(),
        guard: state.guard.clone(),
        session,
        ip,
        opened_ms: now_ms(),
        look,
        last: None,
        last_sent: Instant::now(),
        ended: false,
        _slot: slot,
    };
    let mut res = Response::new(stream);
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    // One fan's place in line: kept by no cache, shared or the browser's
    // (`no-cache` let them store it, asking back before reuse).
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    // nginx: pass each event on at once instead of buffering the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(res)
}

/// How long a shared room's stream waits for its replica to read the
/// shared log before it says "not joined".
const NOT_JOINED_WAIT_MS: i64 = 5_000;

/// The body of `/queue/events`: polled by the connection's own task, it
/// holds no task or channel of its own — a timer, the room, the last update.
pub struct EventStream {
    room: Arc<Room>,
    rooms: Arc<Rooms>,
    /// The session it was opened with and the caller's address, looked at
    /// again at each update: a stream kept the fan's place (and told it)
    /// after a logout, past the session's expiry, or once the account or
    /// address was blocked, for as long as the room lasted: a blocked
    /// farm's accounts were admitted, their passes holding codes they
    /// could not claim.
    auth: Arc<Auth>,
    guard: Arc<Guard>,
    session: Session,
    ip: IpAddr,
    /// When it opened: in a shared room, "not joined" waits for a read of
    /// the shared log that began after it.
    opened_ms: i64,
    look: tokio::time::Interval,
    /// What the last update said, in brief (a fan's stream holds little).
    last: Option<Brief>,
    last_sent: Instant,
    ended: bool,
    /// The account's place among its open streams, given back when the
    /// stream ends or the connection goes.
    _slot: StreamSlot,
}

/// What decides whether an update is worth sending.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Brief {
    state: PlaceState,
    position: Option<u64>,
    waiting: u64,
    admitted: u64,
    standby: bool,
}

impl Brief {
    fn of(s: &QueueStatus) -> Brief {
        Brief {
            state: s.state,
            position: s.position,
            waiting: s.waiting,
            admitted: s.admitted,
            standby: s.standby,
        }
    }
}

impl EventStream {
    /// The next frame to send after looking at the place now, if any.
    fn look(&mut self) -> Option<Bytes> {
        let now = now_ms();
        if !self.auth.is_live(&self.session, now)
            || self.guard.is_blocked_id(self.session.user_id)
            || self.guard.check_ip(self.ip).is_err()
        {
            // Ended, not answered: a page then asks `/queue/status`,
            // which says why (log in again, or blocked).
            self.ended = true;
            return None;
        }
        let status = self.room.status(self.session.user_id, now, true);
        // A fan who joined through another node a moment ago is not in
        // this replica until its next read of the shared log (a tenth of a
        // second): said at once, "not joined" ended the stream and the
        // page stopped keeping the place. Said once a read after the
        // stream opened shows it (or, Redis away, after a few seconds).
        if status.state == PlaceState::NotJoined
            && self.room.is_shared()
            && !self.room.read_since(self.opened_ms)
            && now - self.opened_ms < NOT_JOINED_WAIT_MS
        {
            return None;
        }
        let brief = Brief::of(&status);
        let since = self.last_sent.elapsed();
        let send = match self.last {
            None => true,
            Some(l) if l.state != brief.state => true,
            Some(l) => since >= STREAM_UPDATE_EVERY && l != brief,
        };
        // A stream is for someone in line or holding a pass: it ends (after
        // saying why) once there is nothing more to wait for — so a
        // connection is held only while it serves a place. (Passed over
        // with no way back in, a lottery's or an account's last place,
        // held the stream and its slot until the room closed.)
        if status.nothing_to_wait_for() {
            self.ended = true;
        }
        if send {
            let mut frame = Vec::with_capacity(768);
            frame.extend_from_slice(b"event: status\ndata: ");
            serde_json::to_writer(&mut frame, &status).ok()?;
            frame.extend_from_slice(b"\n\n");
            self.last = Some(brief);
            self.last_sent = Instant::now();
            return Some(Bytes::from(frame));
        }
        (since >= STREAM_HEARTBEAT).then(|| {
            self.last_sent = Instant::now();
            Bytes::from_static(b": still here\n\n")
        })
    }
}

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if this.ended || this.rooms.closing() {
                return Poll::Ready(None);
            }
            if this.look.poll_tick(cx).is_pending() {
                return Poll::Pending;
            }
            if let Some(frame) = this.look() {
                return Poll::Ready(Some(Ok(Frame::data(frame))));
            }
        }
    }
}
