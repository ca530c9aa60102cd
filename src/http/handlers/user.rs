//! `POST /user/register`, `/user/login`, `/user/logout`.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;

use crate::{
    app::AppState,
    http::{
        request::{json_body, ok, session},
        ApiError,
    },
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
pub async fn register(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = req.into_body();
    let body: RegisterBody = json_body(state, body).await?;
    let (user, token) = state
        .auth
        .register(body.username, body.password, body.nickname)
        .await?;
    Ok(logged_in(&user, &token))
}

/// Exchanges a username and password for a token.
pub async fn login(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = req.into_body();
    let body: LoginBody = json_body(state, body).await?;
    if body.username.len() > 256 || body.password.len() > 1024 {
        return Err(ApiError::bad_request(
            "INVALID_FIELD",
            "username or password is too long",
        ));
    }
    let (user, token) = state.auth.login(body.username, body.password).await?;
    Ok(logged_in(&user, &token))
}

/// Revokes the caller's token.
pub async fn logout(
    state: &AppState,
    req: &Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let session = session(state, req.headers())?;
    state.auth.logout(session).await?;
    Ok(ok(&serde_json::json!({ "loggedOut": true })))
}
