//! `POST /user/register`, `/user/login`, `/user/logout`.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;

use std::{net::IpAddr, time::Instant};

use crate::{
    auth::{username::identity_key, AuthError, Denied},
    http::{
        error::ApiError,
        request::{json_body, no_token, ok, presented},
    },
    metrics::{self, Rejected},
    state::AppState,
    store::User,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    username: String,
    password: String,
    #[serde(default)]
    nickname: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: String,
}

fn logged_in(user: &User, token: &str) -> Response<Full<Bytes>> {
    ok(&serde_json::json!({
        "token": token,
        "userId": user.id,
        "username": user.username,
        "nickname": user.nickname,
    }))
}

/// Creates an account (when registration is open) and returns a token.
///
/// The address's budget (`security.registrations_per_ip_per_hour`) is
/// spent only by a request that will hash a password: one refused for its
/// body, its fields, a blocked name, closed registration or a full hashing
/// queue (which the page retries) spent it too, so thirty typos left a fan
/// unable to register for an hour. A taken name still spends it: it costs
/// a hash, and tells that the name exists.
pub async fn register(state: &AppState, req: Request<Incoming>, ip: IpAddr) -> Result<Response<Full<Bytes>>, ApiError> {
    let body: RegisterBody = json_body(state, req).await?;
    // The length first, as at login: the blocklist's look-alike key (NFKC,
    // case folding, confusables) of a 16 KiB name is work a client should
    // not get for the price of one request.
    let max = crate::auth::username::MAX_TYPED_BYTES;
    if body.username.len() > max {
        return Err(ApiError::bad_request(
            "INVALID_FIELD",
            format!("username must be at most {max} bytes as typed"),
        ));
    }
    if state.guard.is_blocked_user(&body.username) {
        metrics::global().reject(Rejected::Blocked);
        return Err(Denied::Blocked.into());
    }
    let account = state
        .auth
        .check_registration(&body.username, &body.password, body.nickname.as_deref())?;
    // A turn to hash (or a place in its queue) before the budget: refused
    // as busy, the request hashes nothing and spends nothing. A slot the
    // budget then refuses is given back as it drops.
    let slot = state.auth.reserve_hashing(ip).inspect_err(count_busy)?;
    state
        .guard
        .admit_registration(ip, Instant::now())
        .inspect_err(|_| metrics::global().reject(Rejected::RegistrationRate))?;
    let (user, token) = state
        .auth
        .register(slot, account, body.password)
        .await
        .inspect_err(count_busy)?;
    Ok(logged_in(&user, &token))
}

/// Exchanges a username and password for a token.
///
/// The guard counts the attempt before the password is checked (see
/// `auth::guard`'s login policy): past `security.login_max_failures`
/// failures the account is locked *from this address*, past four times that
/// the address is locked for every account, each with a doubling delay. An
/// unknown username counts exactly like a wrong password.
pub async fn login(state: &AppState, req: Request<Incoming>, ip: IpAddr) -> Result<Response<Full<Bytes>>, ApiError> {
    let body: LoginBody = json_body(state, req).await?;
    if body.username.len() > crate::auth::username::MAX_TYPED_BYTES || body.password.len() > 1024 {
        return Err(ApiError::bad_request(
            "INVALID_FIELD",
            "username or password is too long",
        ));
    }
    let m = metrics::global();
    let guard = &state.guard;
    // A blocked name is refused before its password is checked: after, the
    // answer (403, or 401 for a wrong one) told a guesser which was right.
    if guard.is_blocked_user(&body.username) {
        m.reject(Rejected::Blocked);
        return Err(Denied::Blocked.into());
    }
    // A turn (or a queue place) first: a login refused as busy must not
    // touch the lockout records (see `Auth::reserve_hashing`).
    let slot = state.auth.reserve_hashing(ip).inspect_err(count_busy)?;
    let account = identity_key(&body.username);
    let attempt = guard
        .begin_login(&account, ip, Instant::now())
        .inspect_err(|_| m.reject(Rejected::LoginLocked))?;
    match state
        .auth
        .login(slot, attempt, account, body.username, body.password)
        .await
    {
        Ok((user, token)) => {
            if guard.is_blocked_user(&user.username) || guard.is_blocked_id(user.id) {
                m.reject(Rejected::Blocked);
                return Err(Denied::Blocked.into());
            }
            Ok(logged_in(&user, &token))
        }
        Err(AuthError::BadCredentials) => Err(AuthError::BadCredentials.into()),
        // Not a verdict on the password (hashing busy, store down): the
        // attempt was given back uncounted.
        Err(e) => {
            count_busy(&e);
            Err(e.into())
        }
    }
}

fn count_busy(e: &AuthError) {
    match e {
        AuthError::Busy => metrics::global().reject(Rejected::HashingBusy),
        AuthError::Throttled => metrics::global().reject(Rejected::HashingShare),
        _ => {}
    }
}

/// Revokes the caller's token.
pub async fn logout(state: &AppState, req: &Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let session = match presented(state, req.headers()) {
        // Ended by its account's block already: logged out, as asked.
        Some(Err(AuthError::LoggedOut { user })) if state.guard.is_blocked_id(user) => {
            return Ok(ok(&serde_json::json!({ "loggedOut": true })));
        }
        Some(verified) => verified?,
        None => return Err(no_token()),
    };
    state.auth.logout(session).await?;
    Ok(ok(&serde_json::json!({ "loggedOut": true })))
}
