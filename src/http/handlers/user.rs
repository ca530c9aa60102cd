//! `POST /user/register`, `/user/login`, `/user/logout`.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;

use std::{net::IpAddr, time::Instant};

use crate::{
    auth::{AuthError, Denied},
    http::{
        error::ApiError,
        request::{json_body, ok, session},
    },
    metrics::{self, Rejected},
    state::AppState,
    store::User,
};

#[derive(Deserialize)]
struct RegisterBody {
    username: String,
    password: String,
    #[serde(default)]
    nickname: Option<String>,
}

#[derive(Deserialize)]
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
pub async fn register(state: &AppState, req: Request<Incoming>, ip: IpAddr) -> Result<Response<Full<Bytes>>, ApiError> {
    state
        .guard
        .admit_registration(ip, Instant::now())
        .inspect_err(|_| metrics::global().reject(Rejected::RegistrationRate))?;
    let body: RegisterBody = json_body(state, req.into_body()).await?;
    if state.guard.is_blocked_user(&body.username) {
        metrics::global().reject(Rejected::Blocked);
        return Err(Denied::Blocked.into());
    }
    let (user, token) = state.auth.register(body.username, body.password, body.nickname).await?;
    Ok(logged_in(&user, &token))
}

/// Exchanges a username and password for a token.
///
/// Failures count against the username and the client address; past
/// `security.login_max_failures` both are locked out with a doubling delay.
/// An unknown username counts exactly like a wrong password.
pub async fn login(state: &AppState, req: Request<Incoming>, ip: IpAddr) -> Result<Response<Full<Bytes>>, ApiError> {
    let body: LoginBody = json_body(state, req.into_body()).await?;
    if body.username.len() > 256 || body.password.len() > 1024 {
        return Err(ApiError::bad_request(
            "INVALID_FIELD",
            "username or password is too long",
        ));
    }
    let m = metrics::global();
    let guard = &state.guard;
    guard
        .check_login(&body.username, ip, Instant::now())
        .inspect_err(|_| m.reject(Rejected::LoginLocked))?;
    let username = body.username.clone();
    match state.auth.login(body.username, body.password).await {
        Ok((user, token)) => {
            guard.login_succeeded(&username);
            if guard.is_blocked_user(&username) || guard.is_blocked_id(user.id) {
                m.reject(Rejected::Blocked);
                return Err(Denied::Blocked.into());
            }
            Ok(logged_in(&user, &token))
        }
        Err(AuthError::BadCredentials) => {
            m.reject(Rejected::LoginFailed);
            guard.login_failed(&username, ip, Instant::now());
            Err(AuthError::BadCredentials.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Revokes the caller's token.
pub async fn logout(state: &AppState, req: &Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let session = session(state, req.headers())?;
    state.auth.logout(session).await?;
    Ok(ok(&serde_json::json!({ "loggedOut": true })))
}
