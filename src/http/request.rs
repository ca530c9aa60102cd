//! Reading requests: bodies with a size cap, query strings, credentials.
//!
//! Everything here turns bad input into an [`ApiError`] (400/401/413/415);
//! nothing panics on any byte sequence.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body as _;
use hyper::body::Incoming;
use serde::{de::DeserializeOwned, Deserialize, Deserializer, Serialize};

use super::error::ApiError;
use crate::{
    auth::{AuthError, Session},
    state::AppState,
};

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 128;

/// Reads a JSON body of at most `server.max_body` bytes, arriving within
/// `server.request_timeout`, into `T`.
///
/// The body must be declared `Content-Type: application/json` (415
/// otherwise): the types a page of another site may send without asking
/// (`text/plain`, forms) are exactly the ones refused, so no such page can
/// make its visitors' browsers register, log in or claim. A declared
/// `Content-Length` above the cap is answered 413 before a byte of the body
/// is read (and without `100 Continue`).
pub async fn json_body<T: DeserializeOwned>(state: &AppState, req: Request<Incoming>) -> Result<T, ApiError> {
    parse_json(&json_bytes(state, req).await?)
}

/// The bytes of a JSON body, read as [`json_body`] reads them, for a type
/// that borrows its strings from them ([`parse_json`]).
pub async fn json_bytes(state: &AppState, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    if !is_json(req.headers()) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "send the body as JSON with `Content-Type: application/json`",
        ));
    }
    let max = state.max_body();
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "BODY_TOO_LARGE",
            format!("the body is larger than {max} bytes"),
        )
    };
    let body = req.into_body();
    // hyper knows a declared Content-Length as the body's exact size.
    if body.size_hint().lower() > max as u64 {
        return Err(too_large());
    }
    match tokio::time::timeout(state.request_timeout(), whole(Limited::new(body, max))).await {
        Err(_elapsed) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "REQUEST_TIMEOUT",
            "the request body did not arrive in time",
        )),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(ApiError::bad_request("BAD_BODY", "the request body could not be read")),
    }
}

/// A body's data frames as one buffer. A body that came in one frame (a
/// claim's, which arrives with its head) is that frame itself, without the
/// list of frames `BodyExt::collect` makes.
async fn whole<B>(mut body: B) -> Result<Bytes, B::Error>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        // Trailers carry nothing a JSON body needs.
        let Ok(data) = frame?.into_data() else { continue };
        match &mut joined {
            Some(buf) => buf.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut buf = BytesMut::with_capacity(first.len() + data.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
    }
    Ok(joined.map_or(first, BytesMut::freeze))
}

/// Whether the Content-Type is `application/json` (any parameters, any case).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// Parses `bytes` as JSON into `T` (which may borrow its strings from
/// them), with a sentence on failure.
pub fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "MALFORMED_JSON",
            "the body is empty; send a JSON object",
        ));
    }
    if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::bad_request("MALFORMED_JSON", "the body is not valid UTF-8"));
    }
    // serde reads a struct from a JSON array too, field by field, so `[1,2]`
    // would claim activity 1; and for a `null` it names the Rust type it
    // missed. Every body here is an object: say that instead.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let not_an_object = || {
        ApiError::bad_request(
            "INVALID_FIELD",
            "the body must be a JSON object ({\"name\": value, ...}), not an array or a single value",
        )
    };
    match serde_json::from_slice(bytes) {
        Ok(_) if first != Some(&b'{') => Err(not_an_object()),
        Ok(value) => Ok(value),
        Err(e) => Err({
            use serde_json::error::Category;
            match e.classify() {
                Category::Data if first != Some(&b'{') => not_an_object(),
                Category::Data => ApiError::bad_request("INVALID_FIELD", e.to_string()),
                _ => ApiError::bad_request("MALFORMED_JSON", format!("the body is not valid JSON: {e}")),
            }
        }),
    }
}

/// The query string's parameters.
pub struct Query<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'a> Query<'a> {
    /// Parses `application/x-www-form-urlencoded` pairs (invalid UTF-8 is replaced).
    pub fn parse(query: Option<&'a str>) -> Query<'a> {
        Query(form_urlencoded::parse(query.unwrap_or("").as_bytes()).collect())
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| &**v)
    }

    /// A required, non-empty parameter.
    pub fn require(&self, name: &'static str) -> Result<&str, ApiError> {
        match self.get(name).map(str::trim) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(ApiError::bad_request(
                "MISSING_PARAMETER",
                format!("the query parameter `{name}` is required"),
            )),
        }
    }

    /// An optional positive integer parameter with a default and a maximum.
    pub fn number(&self, name: &'static str, default: u64, max: u64) -> Result<u64, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(default),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::bad_request(
                    "INVALID_PARAMETER",
                    format!("`{name}` must be a whole number from 1 to {max}"),
                )),
            },
        }
    }
}

/// The session token: `Authorization: Bearer <token>` (the scheme in any
/// case), the seed's bare `Authorization: <token>`, or its `token` header.
pub fn token(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        return Some(bearer(v).unwrap_or(v));
    }
    headers.get("token").and_then(|v| v.to_str().ok()).map(str::trim)
}

/// The token of `Authorization: Bearer <token>` only (the admin API's one
/// form: no bare value, no `token` header, no other scheme).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| bearer(v.trim()))
}

/// `<token>` of `Bearer <token>`; the scheme is case-insensitive (RFC 9110 §11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// The caller's session; 401 when there is none or it is not valid, 403
/// `BLOCKED` when its account is in `security.blocked_users`.
///
/// Here, not in the handlers that sell: blocking is how an operator ends
/// a stolen session at once, and with the check only on the claim and the
/// room, a blocked session still listed the account's codes, showed them
/// as QR codes and was issued claim tokens.
pub fn session(state: &AppState, headers: &HeaderMap) -> Result<Session, ApiError> {
    let session = match presented(state, headers) {
        // A block ends the account's sessions for good (lifted, it gave a
        // stolen one back); while it lasts, they hear why.
        Some(Err(AuthError::LoggedOut { user })) if state.guard.is_blocked_id(user) => return Err(blocked()),
        Some(verified) => verified?,
        None => return Err(no_token()),
    };
    if state.guard.is_blocked_id(session.user_id) {
        return Err(blocked());
    }
    Ok(session)
}

fn blocked() -> ApiError {
    crate::metrics::global().reject(crate::metrics::Rejected::Blocked);
    crate::auth::Denied::Blocked.into()
}

/// 401: no token was sent.
pub fn no_token() -> ApiError {
    ApiError::unauthorized("log in first, then send `Authorization: Bearer <token>`")
}

/// The session behind the caller's token as [`Auth::authenticate`] finds
/// it; `None` when no token was sent.
///
/// [`Auth::authenticate`]: crate::auth::Auth::authenticate
pub fn presented(state: &AppState, headers: &HeaderMap) -> Option<Result<Session, AuthError>> {
    match token(headers) {
        Some(t) if !t.is_empty() => Some(state.auth.authenticate(t)),
        _ => None,
    }
}

/// The caller's session if a token was sent (an invalid one, or a blocked
/// account's, is still an error).
pub fn optional_session(state: &AppState, headers: &HeaderMap) -> Result<Option<Session>, ApiError> {
    match token(headers) {
        Some(t) if !t.is_empty() => session(state, headers).map(Some),
        _ => Ok(None),
    }
}

/// The `Idempotency-Key` header, validated.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY && k.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(k))
        }
        _ => Err(ApiError::bad_request(
            "INVALID_IDEMPOTENCY_KEY",
            format!("Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        )),
    }
}

/// `{"ok":true,"data":...}` with status 200.
pub fn ok<T: Serialize>(data: &T) -> Response<Full<Bytes>> {
    #[derive(Serialize)]
    struct Envelope<'a, T> {
        ok: bool,
        data: &'a T,
    }
    match super::json::to_bytes(&Envelope { ok: true, data }) {
        Ok(body) => {
            let mut res = Response::new(Full::new(body));
            res.headers_mut()
                .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            res
        }
        Err(e) => {
            tracing::error!(error = %e, "Could not serialise a response.");
            ApiError::internal().into_response()
        }
    }
}

/// A JSON string, borrowed from the body when it has no escapes (a claim
/// token, a proof-of-work nonce: base64url and digits, which never do).
/// serde borrows only a field that is itself a `Cow`, not one inside an
/// `Option`: hence this type.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct Text<'a>(#[serde(borrow)] pub Cow<'a, str>);

impl Text<'_> {
    /// The string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An id sent as a JSON string or number (`"1001"` or `1001`); at most 64
/// bytes. Whitespace around a string is dropped, as the query path drops it
/// (a configured id has none), so `{"actId":"1001 "}` finds what
/// `?actId=1001+` finds. Borrowed from the body when it can be (a string
/// without escapes): a claim's ids cost no allocation.
#[derive(Debug)]
pub struct Id<'a>(pub Cow<'a, str>);

impl Id<'_> {
    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Id<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IdVisitor;

        fn checked<E: serde::de::Error>(v: &str) -> Result<&str, E> {
            let v = v.trim();
            if v.is_empty() || v.len() > 64 {
                return Err(E::invalid_length(v.len(), &IdVisitor));
            }
            Ok(v)
        }

        impl<'de> serde::de::Visitor<'de> for IdVisitor {
            type Value = Id<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an id: a string of 1-64 characters or a whole number")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Id<'de>, E> {
                Ok(Id(Cow::Borrowed(checked(v)?)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Id<'de>, E> {
                Ok(Id(Cow::Owned(checked(v)?.to_owned())))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Id<'de>, E> {
                Ok(Id(Cow::Owned(v.to_string())))
            }
            // JSON reads a whole number past 2^64 as a float; say so rather
            // than "invalid type: floating point `1e23`".
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Id<'de>, E> {
                Err(E::custom(if v.fract() == 0.0 && v >= 18_446_744_073_709_551_616.0 {
                    "an id that is a number must be below 2^64 (send a longer id as a string)"
                } else {
                    "an id that is a number must be a whole number"
                }))
            }
        }
        d.deserialize_any(IdVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct ClaimBody<'a> {
        #[serde(borrow)]
        act_id: Id<'a>,
        #[serde(borrow)]
        ticket_id: Option<Id<'a>>,
        claim_token: Option<String>,
    }

    #[test]
    fn ids_accept_strings_and_numbers_only() {
        assert_eq!(parse_json::<ClaimBody>(br#"{"actId":1001}"#).unwrap().act_id.0, "1001");
        assert_eq!(parse_json::<ClaimBody>(br#"{"actId":"a-1"}"#).unwrap().act_id.0, "a-1");
        // As the query path reads `?actId=1001+`.
        assert_eq!(
            parse_json::<ClaimBody>(br#"{"actId":" 1001\t"}"#).unwrap().act_id.0,
            "1001"
        );
        for bad in [
            &br#"{"actId":"  "}"#[..],
            br#"{"actId":-1}"#,
            br#"{"actId":1.5}"#,
            br#"{"actId":""}"#,
            br#"{"actId":null}"#,
            b"\xff",
        ] {
            assert_eq!(
                parse_json::<ClaimBody>(bad).unwrap_err().status(),
                StatusCode::BAD_REQUEST
            );
        }
    }

    #[test]
    fn only_an_object_is_a_body_and_the_refusal_says_so() {
        for bad in [&b"[1,2]"[..], b" null", b"\"x\"", b"7", b"true", b"-1"] {
            let e = parse_json::<ClaimBody>(bad).unwrap_err();
            assert_eq!((e.status(), e.code()), (StatusCode::BAD_REQUEST, "INVALID_FIELD"));
            assert!(e.message().contains("must be a JSON object"), "{}", e.message());
        }
        assert_eq!(
            parse_json::<ClaimBody>(b"not json").unwrap_err().code(),
            "MALFORMED_JSON"
        );
        assert_eq!(parse_json::<ClaimBody>(b"[1,").unwrap_err().code(), "MALFORMED_JSON");
        let e = parse_json::<ClaimBody>(br#"{"actId":1e3}"#).unwrap_err();
        assert!(!e.message().contains("2^64"), "{}", e.message());
        let e = parse_json::<ClaimBody>(br#"{"actId":99999999999999999999999}"#).unwrap_err();
        assert!(e.message().contains("below 2^64"), "{}", e.message());
        assert!(!e.message().contains("floating point"), "{}", e.message());
    }

    /// A body that yields the given frames.
    struct Frames(std::collections::VecDeque<hyper::body::Frame<Bytes>>);

    impl hyper::body::Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn frames(parts: &[&'static str]) -> Frames {
        Frames(
            parts
                .iter()
                .map(|p| hyper::body::Frame::data(Bytes::from_static(p.as_bytes())))
                .collect(),
        )
    }

    #[tokio::test]
    async fn a_body_is_its_one_frame_or_its_frames_joined() {
        let one = Bytes::from_static(b"{\"actId\":1}");
        let read = whole(Frames([hyper::body::Frame::data(one.clone())].into()))
            .await
            .unwrap();
        assert_eq!(read, one);
        // The very frame, not a copy of it.
        assert_eq!(read.as_ptr(), one.as_ptr());
        for parts in [
            &["{\"ac", "tId\":", "1}"][..],
            &["", "{\"actId\":1}", ""],
            &["{\"actId\"", ":1}"],
        ] {
            assert_eq!(whole(frames(parts)).await.unwrap(), one, "{parts:?}");
        }
        let mut with_trailers = frames(&["{\"actId\"", ":1}"]);
        with_trailers
            .0
            .push_back(hyper::body::Frame::trailers(HeaderMap::new()));
        assert_eq!(whole(with_trailers).await.unwrap(), one);
        assert!(whole(frames(&[])).await.unwrap().is_empty());
        // Past the cap, in whichever frame, the limit's error.
        let limited = whole(Limited::new(frames(&["{\"actId\"", ":1}"]), 8)).await;
        assert!(limited.unwrap_err().is::<http_body_util::LengthLimitError>());
    }

    #[test]
    fn ids_are_borrowed_unless_escaped_or_numbers() {
        let body = br#"{"actId":"a-1","ticketId":"t\u002d1"}"#;
        let parsed: ClaimBody<'_> = parse_json(body).unwrap();
        assert!(matches!(parsed.act_id.0, Cow::Borrowed("a-1")));
        assert!(matches!(parsed.ticket_id.unwrap().0, Cow::Owned(ref t) if t == "t-1"));
        let parsed: ClaimBody<'_> = parse_json(br#"{"actId":7}"#).unwrap();
        assert_eq!(parsed.act_id.as_str(), "7");
    }

    proptest::proptest! {
        #[test]
        fn any_body_parses_or_is_a_400(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            if let Err(e) = parse_json::<ClaimBody>(&bytes) {
                proptest::prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            }
        }

        #[test]
        fn any_json_shaped_body_parses_or_is_a_400(text in r#"\{("[a-zA-Z]{1,8}":(-?[0-9]{1,22}|"[^"]{0,80}"|null|true|\[\]),?){0,4}\}"#) {
            if let Err(e) = parse_json::<ClaimBody>(text.as_bytes()) {
                proptest::prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            }
        }

        #[test]
        fn any_query_string_parses(q in ".{0,200}") {
            let query = Query::parse(Some(&q));
            let _ = query.get("actId");
            let _ = query.number("page", 1, 100);
        }
    }
}
