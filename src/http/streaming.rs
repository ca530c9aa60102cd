//! Waiting rooms' event streams, served beside hyper on a few hundred bytes.
//!
//! A fan waiting in a room holds one connection open for minutes, and at a
//! big on-sale tens of thousands do at once. Through hyper each of those
//! connections keeps a read and a write buffer of 8 KiB and the whole
//! connection state machine for as long as it is open — about 24 KiB a fan,
//! for a stream that sends a few hundred bytes a second at most. So a
//! connection whose first bytes are `GET /queue/events` is read here
//! instead: the request head into a buffer that is freed once parsed, the
//! same handler (checks, metrics, access log) as any request through
//! [`router::handle_events`], and then the stream's frames written one by
//! one. What stays per fan is the task, the socket and the stream's state.
//!
//! The connection closes when the stream ends (`Connection: close`; the
//! page opens a new one if it needs it). Anything else — another path,
//! another method, a client that sends its request line in pieces — goes to
//! hyper unchanged: [`wants_events`] only looks, it consumes nothing.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use http::{HeaderName, HeaderValue, Method, Request, Response, Version};
use http_body_util::{BodyExt, Either};
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{
    access_log::AccessLog,
    error::ApiError,
    router::{self, Body, Served},
};
use crate::state::AppState;

/// What a connection to be served here starts with.
const EVENTS_LINE: &[u8] = b"GET /queue/events";
/// The longest request head read here (cookies included); longer is 431.
const MAX_HEAD: usize = 16 * 1024;
/// The most headers a request may carry here.
const MAX_HEADERS: usize = 64;
/// How long one write may wait for a fan's connection to take it: a client
/// that stopped reading is let go instead of held.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the connection's first request is `GET /queue/events` — looked
/// at without reading it. `None` when no byte arrived before `timeout` or
/// the peer went away (the connection is closed then, as hyper's header
/// timeout would).
pub async fn wants_events(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    let mut first = [0u8; EVENTS_LINE.len() + 1];
    let n = match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return None,
    };
    // A request line split over segments goes to hyper, which waits for it.
    Some(n == first.len() && first.starts_with(EVENTS_LINE) && matches!(first[EVENTS_LINE.len()], b'?' | b' '))
}

/// Serves the one `GET /queue/events` request of `stream`, then closes it.
pub async fn serve(
    mut stream: TcpStream,
    state: &AppState,
    access_log: Option<&AccessLog>,
    peer: SocketAddr,
    served: Served,
) {
    let head_timeout = state.header_read_timeout();
    let req = match tokio::time::timeout(head_timeout, read_head(&mut stream)).await {
        Err(_elapsed) => return,
        Ok(Err(Unreadable::Gone)) => return,
        Ok(Err(Unreadable::Refused(e))) => {
            let res = e.into_response().map(Either::Left);
            let _ = respond(&mut stream, res, Version::HTTP_11).await;
            return;
        }
        Ok(Ok(req)) => req,
    };
    let res = router::handle_events(state, access_log, served, &req, peer);
    let version = req.version();
    drop(req);
    if let Err(error) = respond(&mut stream, res, version).await {
        tracing::debug!(%error, %peer, "Event stream ended with an error.");
    }
}

/// Why no request came out of a connection's first bytes.
enum Unreadable {
    /// The peer closed or the socket failed: nothing to answer.
    Gone,
    /// A malformed or oversized head: answered with this error.
    Refused(ApiError),
}

/// Reads and parses the request head. The buffer is dropped on return, so
/// a waiting fan does not keep it.
async fn read_head(stream: &mut TcpStream) -> Result<Request<()>, Unreadable> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() == buf.capacity() {
            if buf.len() >= MAX_HEAD {
                return Err(Unreadable::Refused(ApiError::new(
                    http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "HEADERS_TOO_LARGE",
                    format!("the request head is larger than {MAX_HEAD} bytes"),
                )));
            }
            buf.reserve(buf.len().min(MAX_HEAD - buf.len()));
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Err(Unreadable::Gone),
            Ok(_) => {}
        }
        if let Some(req) = parse_head(&buf).map_err(Unreadable::Refused)? {
            return Ok(req);
        }
    }
}

/// The request in `buf`, `None` while its head is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Request<()>>, ApiError> {
    let bad = |what: &str| ApiError::bad_request("BAD_REQUEST", format!("the request is malformed: {what}"));
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ApiError::new(
                http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "HEADERS_TOO_LARGE",
                format!("the request has more than {MAX_HEADERS} headers"),
            ))
        }
        Err(e) => return Err(bad(&e.to_string())),
    }
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(parsed.path.unwrap_or("/"))
        .version(version)
        .body(())
        .map_err(|_| bad("the path"))?;
    let map = req.headers_mut();
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("a header name"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad("a header value"))?;
        map.append(name, value);
    }
    Ok(Some(req))
}

/// Writes the answer: a whole one with its length, or the stream chunk by
/// chunk (HTTP/1.0: until the close) while watching for the fan leaving.
async fn respond(stream: &mut TcpStream, res: Response<Body>, version: Version) -> std::io::Result<()> {
    let (parts, body) = res.into_parts();
    let mut head = String::with_capacity(256);
    let reason = parts.status.canonical_reason().unwrap_or("");
    let _ = write!(head, "HTTP/1.1 {} {reason}\r\n", parts.status.as_u16());
    for (name, value) in &parts.headers {
        if name == http::header::CONNECTION {
            continue;
        }
        head.push_str(name.as_str());
        head.push_str(": ");
        head.push_str(value.to_str().unwrap_or(""));
        head.push_str("\r\n");
    }
    let _ = write!(
        head,
        "date: {}\r\nconnection: close\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    );
    drop(parts);
    match body {
        Either::Left(full) => {
            let bytes = full.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let _ = write!(head, "content-length: {}\r\n\r\n", bytes.len());
            write(stream, &[head.as_bytes(), &bytes]).await?;
        }
        Either::Right(mut events) => {
            let chunked = version == Version::HTTP_11;
            if chunked {
                head.push_str("transfer-encoding: chunked\r\n");
            }
            head.push_str("\r\n");
            write(stream, &[head.as_bytes()]).await?;
            drop(head);
            loop {
                let frame = tokio::select! {
                    frame = events.frame() => frame,
                    () = left(stream) => return Ok(()),
                };
                let Some(Ok(frame)) = frame else { break };
                let Ok(data) = frame.into_data() else { continue };
                if chunked {
                    // One write a chunk: one syscall, and the fan's reader
                    // gets the chunk whole.
                    let mut chunk = Vec::with_capacity(data.len() + 12);
                    chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    chunk.extend_from_slice(&data);
                    chunk.extend_from_slice(b"\r\n");
                    write(stream, &[&chunk]).await?;
                } else {
                    write(stream, &[&data]).await?;
                }
            }
            if chunked {
                write(stream, &[b"0\r\n\r\n"]).await?;
            }
        }
    }
    stream.shutdown().await
}

/// Writes `parts` in order, giving up after [`WRITE_TIMEOUT`].
async fn write(stream: &mut TcpStream, parts: &[&[u8]]) -> std::io::Result<()> {
    let all = async {
        for part in parts {
            stream.write_all(part).await?;
        }
        Ok(())
    };
    tokio::time::timeout(WRITE_TIMEOUT, all)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Resolves when the fan closed the connection (what they send meanwhile
/// is read and dropped: one request per connection here).
async fn left(stream: &TcpStream) {
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let mut sink = [0u8; 64];
        match stream.try_read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_parsed_once_complete() {
        let whole: &[u8] = b"GET /queue/events?actId=1003 HTTP/1.1\r\nHost: x\r\nCookie: sid=abc\r\n\r\n";
        for cut in 0..whole.len() {
            assert!(parse_head(&whole[..cut]).unwrap().is_none(), "complete at {cut}");
        }
        let req = parse_head(whole).unwrap().unwrap();
        assert_eq!(req.uri().path(), "/queue/events");
        assert_eq!(req.uri().query(), Some("actId=1003"));
        assert_eq!(req.headers()["cookie"], "sid=abc");
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn a_bad_head_is_refused() {
        assert!(parse_head(b"GET /queue/events HTTP/1.1\r\nBad Header: x\r\n\r\n").is_err());
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("x-{i}: 1\r\n")).collect();
        let head = format!("GET /queue/events HTTP/1.1\r\n{many}\r\n");
        let err = parse_head(head.as_bytes()).unwrap_err();
        assert_eq!(err.into_response().status(), 431);
    }
}
