//! [`ApiError`]: the one place where failures become HTTP statuses and the
//! JSON error shape `{"ok":false,"error":{"code","message",...}}`.
//!
//! Codes are stable, SCREAMING_SNAKE strings that clients switch on; the
//! message is for people. Extra fields (the sale window, the user's codes)
//! sit beside them inside `error`.

use std::{borrow::Cow, sync::Arc};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::{
    auth::{AuthError, Denied},
    clock::Rfc3339Ms,
    store::StoreError,
    vocab::Rejection,
};

/// A failed request, ready to render.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: Cow<'static, str>,
    detail: Detail,
    retry_after_secs: Option<u32>,
}

/// Machine-readable fields beside `code` and `message`. Typed rather than a
/// `serde_json::Value`, so the common refusals (LIMIT_REACHED in a rush)
/// serialise straight into the body without building a map.
#[derive(Debug, Default)]
enum Detail {
    #[default]
    None,
    /// The sale window, for NOT_STARTED and ENDED.
    Window { start_ms: i64, end_ms: i64 },
    /// The codes the user holds, for LIMIT_REACHED.
    Codes(Vec<Arc<str>>),
    /// Leading zero bits the proof of work needs.
    Difficulty(u8),
    /// A waiting room's join: the bits and the challenge to solve over.
    JoinPow { difficulty: u8, challenge: String },
    /// Accounts made before this time take part (ACCOUNT_TOO_NEW).
    AccountsBefore(i64),
}

#[derive(Serialize)]
struct Body<'a> {
    ok: bool,
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorObject<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_time: Option<Rfc3339Ms>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end_time: Option<Rfc3339Ms>,
    #[serde(skip_serializing_if = "Option::is_none")]
    codes: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pow_difficulty: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pow_challenge: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accounts_before: Option<Rfc3339Ms>,
}

impl ApiError {
    /// An error with a status, stable code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: Detail::None,
            retry_after_secs: None,
        }
    }

    fn with(mut self, detail: Detail) -> ApiError {
        self.detail = detail;
        self
    }

    /// Adds a `Retry-After` header.
    pub fn retry_after(mut self, secs: u32) -> ApiError {
        self.retry_after_secs = Some(secs);
        self
    }

    /// 400 for a body or parameter that is not acceptable.
    pub fn bad_request(code: &'static str, message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401: no or bad credentials.
    pub fn unauthorized(message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }

    /// 404 for an unknown thing.
    pub fn not_found(code: &'static str, message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 403 for a waiting room's join without a proof of work over `challenge`.
    pub fn join_pow_required(difficulty: u8, challenge: String) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "POW_REQUIRED",
            "send a powNonce with SHA-256(powChallenge \":\" powNonce) starting with powDifficulty zero bits",
        )
        .with(Detail::JoinPow { difficulty, challenge })
    }

    /// 500; the cause is logged, never shown.
    pub fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "something went wrong on our side; please retry",
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable error code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The sentence for people.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Renders the JSON response.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let (mut start_time, mut end_time, mut codes, mut pow_difficulty) = (None, None, None, None);
        let (mut pow_challenge, mut accounts_before) = (None, None);
        match &self.detail {
            Detail::None => {}
            Detail::Window { start_ms, end_ms } => {
                start_time = Some(Rfc3339Ms::new(*start_ms));
                end_time = Some(Rfc3339Ms::new(*end_ms));
            }
            Detail::Codes(c) => codes = Some(c.iter().map(|c| &**c).collect()),
            Detail::Difficulty(d) => pow_difficulty = Some(*d),
            Detail::JoinPow { difficulty, challenge } => {
                pow_difficulty = Some(*difficulty);
                pow_challenge = Some(challenge.as_str());
            }
            Detail::AccountsBefore(ms) => accounts_before = Some(Rfc3339Ms::new(*ms)),
        }
        let body = Body {
            ok: false,
            error: ErrorObject {
                code: self.code,
                message: &self.message,
                start_time,
                end_time,
                codes,
                pow_difficulty,
                pow_challenge,
                accounts_before,
            },
        };
        let body = super::json::to_bytes(&body).unwrap_or_default();
        let mut res = Response::new(Full::new(body));
        *res.status_mut() = self.status;
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after_secs {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> ApiError {
        use StatusCode as S;
        match r {
            Rejection::UnknownActivity => ApiError::not_found("ACTIVITY_NOT_FOUND", "no such activity"),
            Rejection::UnknownTicket => ApiError::not_found("TICKET_NOT_FOUND", "no such ticket type in this activity"),
            Rejection::Paused => ApiError::new(S::CONFLICT, "PAUSED", "the activity is paused; try again later"),
            Rejection::NotStarted { start_ms, end_ms } => {
                ApiError::new(S::CONFLICT, "NOT_STARTED", "the activity has not started yet")
                    .with(Detail::Window { start_ms, end_ms })
            }
            Rejection::Ended { start_ms, end_ms } => {
                ApiError::new(S::CONFLICT, "ENDED", "the activity has ended").with(Detail::Window { start_ms, end_ms })
            }
            Rejection::LimitReached(codes) => ApiError::new(
                S::CONFLICT,
                "LIMIT_REACHED",
                "you already hold the most codes allowed per user",
            )
            .with(Detail::Codes(codes)),
            Rejection::KeyReused => ApiError::new(
                S::UNPROCESSABLE_ENTITY,
                "IDEMPOTENCY_KEY_REUSED",
                "this Idempotency-Key was used for a claim of another ticket type; a new claim needs a new key",
            ),
            Rejection::InProgress => ApiError::new(
                S::CONFLICT,
                "IN_PROGRESS",
                "a claim with this Idempotency-Key is still being processed",
            )
            .retry_after(1),
            Rejection::SoldOut { one_ticket_type: false } => {
                ApiError::new(S::GONE, "SOLD_OUT", "every code this activity has on sale has been claimed")
            }
            Rejection::SoldOut { one_ticket_type: true } => ApiError::new(
                S::GONE,
                "SOLD_OUT",
                "every code of this ticket type has been claimed; the activity's other ticket types may still have some",
            ),
            Rejection::StockInFlight => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "STOCK_IN_FLIGHT",
                "no code is free right now, but some are still being claimed or held by a server and may come \
                 back; retry shortly",
            )
            .retry_after(1),
            Rejection::NotImported => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "NOT_IMPORTED",
                "this activity's codes have not been loaded yet; retry later",
            )
            .retry_after(5),
            Rejection::Overloaded => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "OVERLOADED",
                "too many claims right now; retry shortly",
            )
            .retry_after(1),
            Rejection::BacklogFull => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "BACKLOG_FULL",
                "too many claims are waiting to be written to the database; retry shortly",
            )
            .retry_after(2),
            Rejection::Unavailable => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "STORE_UNAVAILABLE",
                // Said of reads too (a claim list, a claim's detail).
                "the claim store is unavailable right now; retry shortly",
            )
            .retry_after(5),
            Rejection::OutcomeUnknown => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "OUTCOME_UNKNOWN",
                "the store failed while this claim was being written, so it may or may not have been kept; \
                 retry with the same Idempotency-Key to learn which",
            )
            .retry_after(5),
            Rejection::ClaimTokenRequired => ApiError::new(
                S::FORBIDDEN,
                "CLAIM_TOKEN_REQUIRED",
                "send the claimToken that /act/detail gives you once the activity has started",
            ),
            Rejection::ClaimTokenInvalid => ApiError::new(
                S::FORBIDDEN,
                "CLAIM_TOKEN_INVALID",
                "this claim token is not valid for you and this activity",
            ),
            Rejection::ClaimTokenExpired => ApiError::new(
                S::FORBIDDEN,
                "CLAIM_TOKEN_EXPIRED",
                "the claim token expired; fetch a new one from /act/detail",
            ),
            Rejection::QueuePassRequired => ApiError::new(
                S::FORBIDDEN,
                "QUEUE_PASS_REQUIRED",
                "this activity admits buyers through its waiting room: join with POST /queue/join and claim with \
                 the pass /queue/status gives you when your turn comes (as claimToken)",
            ),
            Rejection::QueuePassExpired => ApiError::new(
                S::FORBIDDEN,
                "QUEUE_PASS_EXPIRED",
                // One text for both kinds of room, true of each: it said
                // "you may join again" to a lottery's winner, and a lottery
                // takes no entry after its draw.
                "your pass has expired; GET /queue/status says where you stand (after a pause, your pass with its \
                 time given back; a turn left unused goes to the next in line, and in a queue you may join again at \
                 the back; a lottery takes no entry after its draw)",
            ),
            Rejection::ProofOfWork { difficulty } => ApiError::new(
                S::FORBIDDEN,
                "POW_REQUIRED",
                "send a powNonce with SHA-256(claimToken \":\" powNonce) starting with powDifficulty zero bits",
            )
            .with(Detail::Difficulty(difficulty)),
            Rejection::AccountTooNew { accounts_before_ms } => ApiError::new(
                S::FORBIDDEN,
                "ACCOUNT_TOO_NEW",
                "this activity is open only to accounts made before the time in accountsBefore; yours is newer",
            )
            .with(Detail::AccountsBefore(accounts_before_ms)),
            Rejection::SessionPredatesAccountAge => ApiError::new(
                S::UNAUTHORIZED,
                "SESSION_OUTDATED",
                "this activity is open to accounts by age, and your session does not carry your account's; \
                 log in again",
            ),
        }
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> ApiError {
        let secs = |w: std::time::Duration| u32::try_from(w.as_secs() + 1).unwrap_or(u32::MAX);
        match d {
            Denied::Blocked => ApiError::new(StatusCode::FORBIDDEN, "BLOCKED", "access denied"),
            Denied::RateLimited(wait) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMITED",
                "too many requests; slow down",
            )
            .retry_after(secs(wait)),
            Denied::LoginLocked(wait) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "LOGIN_LOCKED",
                "too many failed logins; wait before trying again",
            )
            .retry_after(secs(wait)),
            Denied::LoginThrottled(wait) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "LOGIN_THROTTLED",
                "other logins from this address are being checked; retry in a moment",
            )
            .retry_after(secs(wait).saturating_sub(1).max(1)),
            Denied::CrossSite => ApiError::new(
                StatusCode::FORBIDDEN,
                "CROSS_SITE",
                "requests from pages of other sites are refused",
            ),
            Denied::UnreadableForwardedFor => ApiError::bad_request(
                "BAD_FORWARDED_FOR",
                "the X-Forwarded-For chain from the trusted proxy could not be read",
            ),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        use StatusCode as S;
        match e {
            AuthError::RegistrationClosed => {
                ApiError::new(S::FORBIDDEN, "REGISTRATION_CLOSED", "registration is closed")
            }
            AuthError::UsernameTaken => ApiError::new(
                S::CONFLICT,
                "USERNAME_TAKEN",
                "this username, or one that looks like it, is taken",
            ),
            AuthError::BadCredentials => {
                ApiError::new(S::UNAUTHORIZED, "BAD_CREDENTIALS", "wrong username or password")
            }
            AuthError::InvalidField(m) => ApiError::bad_request("INVALID_FIELD", m),
            AuthError::TokenInvalid | AuthError::LoggedOut { .. } => {
                ApiError::unauthorized("the token is invalid or logged out; log in again")
            }
            AuthError::TokenExpired => {
                ApiError::new(S::UNAUTHORIZED, "TOKEN_EXPIRED", "the token has expired; log in again")
            }
            AuthError::Store(e) => e.into(),
            AuthError::Throttled => ApiError::new(
                S::TOO_MANY_REQUESTS,
                "LOGIN_THROTTLED",
                "other logins or registrations from this address are being checked; retry in a moment",
            )
            .retry_after(1),
            AuthError::Busy => {
                ApiError::new(S::SERVICE_UNAVAILABLE, "BUSY", "too many logins at once; retry shortly").retry_after(1)
            }
            AuthError::Internal => ApiError::internal(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        tracing::error!(error = %e, "Store operation failed.");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "STORE_UNAVAILABLE",
            "the store is unavailable; retry shortly",
        )
        .retry_after(5)
    }
}
