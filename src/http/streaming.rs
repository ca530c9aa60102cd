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

use std::{fmt::Write as _, io::IoSlice, net::SocketAddr};

use http::{HeaderName, HeaderValue, Method, Request, Response, Version};
use http_body_util::{BodyExt, Either};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use super::{
    access_log::AccessLog,
    error::ApiError,
    router::{self, Body, Served},
    write_deadline::WriteDeadline,
};
use crate::state::AppState;

/// What a connection to be served here starts with.
const EVENTS_LINE: &[u8] = b"GET /queue/events";
/// The longest request head read here (cookies included); longer is 431
/// (414 when the request line alone is). As hyper's buffer for every
/// other route (`server`'s `max_buf_size`): at 16 KiB, a URL or cookie
/// that worked everywhere else broke only the waiting room's stream. The
/// buffer goes once the head is read.
const MAX_HEAD: usize = 64 * 1024;
/// The most headers a request may carry here.
const MAX_HEADERS: usize = 64;

/// Whether the connection's first request is `GET /queue/events` — looked
/// at without reading it. `None` when no byte arrived by `head_by` or the
/// peer went away (the connection is closed then, as hyper's header
/// timeout would).
pub async fn wants_events(stream: &TcpStream, head_by: Instant) -> Option<bool> {
    let mut first = [0u8; EVENTS_LINE.len() + 1];
    let n = match tokio::time::timeout_at(head_by, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return None,
    };
    // A request line split over segments goes to hyper, which waits for it.
    Some(n == first.len() && first.starts_with(EVENTS_LINE) && matches!(first[EVENTS_LINE.len()], b'?' | b' '))
}

/// Serves the one `GET /queue/events` request of `stream`, then closes it.
/// Its head must be in by `head_by` (the connection's header timeout).
/// A fan whose connection takes no part of the stream for
/// `server.write_timeout` (it stopped reading) is let go instead of held.
pub async fn serve(
    stream: TcpStream,
    state: &AppState,
    access_log: Option<&AccessLog>,
    peer: SocketAddr,
    served: Served,
    head_by: Instant,
) {
    let mut stream = WriteDeadline::new(stream, state.write_timeout());
    let req = match tokio::time::timeout_at(head_by, read_head(&mut stream)).await {
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
async fn read_head(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<Request<()>, Unreadable> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() == buf.capacity() {
            if buf.len() >= MAX_HEAD {
                return Err(Unreadable::Refused(too_large(&buf)));
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

/// The refusal of a head past [`MAX_HEAD`]: `414` when its request line
/// alone is (the URI is what is too long, as Nginx says of it too), else
/// `431`.
fn too_large(buf: &[u8]) -> ApiError {
    if !buf.contains(&b'\n') {
        return ApiError::new(
            http::StatusCode::URI_TOO_LONG,
            "URI_TOO_LONG",
            format!("the request URI is longer than {MAX_HEAD} bytes"),
        );
    }
    ApiError::new(
        http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "HEADERS_TOO_LARGE",
        format!("the request head is larger than {MAX_HEAD} bytes"),
    )
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
async fn respond(stream: &mut WriteDeadline<TcpStream>, res: Response<Body>, version: Version) -> std::io::Result<()> {
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
            write(stream, [head.as_bytes(), &bytes]).await?;
        }
        Either::Right(mut events) => {
            let chunked = version == Version::HTTP_11;
            if chunked {
                head.push_str("transfer-encoding: chunked\r\n");
            }
            head.push_str("\r\n");
            write(stream, [head.as_bytes()]).await?;
            drop(head);
            let mut sent = 0;
            loop {
                let frame = tokio::select! {
                    frame = events.frame() => frame,
                    () = left(stream.get_ref(), &mut sent) => return Ok(()),
                };
                let Some(Ok(frame)) = frame else { break };
                let Ok(data) = frame.into_data() else { continue };
                if chunked {
                    let mut size = [0u8; 18];
                    write(stream, [chunk_size(data.len(), &mut size), &data, b"\r\n"]).await?;
                } else {
                    write(stream, [&data]).await?;
                }
            }
            if chunked {
                write(stream, [b"0\r\n\r\n"]).await?;
            }
        }
    }
    stream.shutdown().await
}

/// Writes `parts` in order, gathered (one syscall for all of them while the
/// socket takes them whole, and the fan's reader gets a head with its body,
/// a chunk with its framing, in one piece).
async fn write<const N: usize>(stream: &mut (impl AsyncWrite + Unpin), parts: [&[u8]; N]) -> std::io::Result<()> {
    // Written so far: every part before `first`, and `offset` bytes of it.
    let (mut first, mut offset) = (0, 0);
    let mut written = 0;
    loop {
        while first < N && written >= parts[first].len() - offset {
            written -= parts[first].len() - offset;
            (first, offset) = (first + 1, 0);
        }
        offset += written;
        if first == N {
            return Ok(());
        }
        let mut slices = [IoSlice::new(&[]); N];
        slices[0] = IoSlice::new(&parts[first][offset..]);
        for (slice, part) in slices[1..].iter_mut().zip(&parts[first + 1..]) {
            *slice = IoSlice::new(part);
        }
        written = stream.write_vectored(&slices[..N - first]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
    }
}

/// A chunk's size line (`<hex length>\r\n`), formatted into `buf`.
fn chunk_size(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, b) in buf[..digits].iter_mut().enumerate() {
        *b = b"0123456789abcdef"[(len >> (4 * (digits - 1 - i))) & 0xf];
    }
    buf[digits..digits + 2].copy_from_slice(b"\r\n");
    &buf[..digits + 2]
}

/// What a client may send after its request on a stream's connection (one
/// request per connection here: a fan sends nothing more).
const MOST_AFTER_HEAD: usize = 16 * 1024;

/// Resolves when the fan closed the connection, or has sent more than
/// [`MOST_AFTER_HEAD`] since its request (`sent` counts across calls).
/// What they send is read and dropped a buffer at a time, spending the
/// lane's task budget: a socket that stays readable made `readable()`
/// answer at once every time, and a client sending without end held the
/// lane (every connection on it, and the watchdog's probe) in this loop.
async fn left(stream: &TcpStream, sent: &mut usize) {
    let mut sink = [0u8; 4096];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut sink) {
            Ok(0) => return,
            Ok(n) => {
                *sent += n;
                if *sent > MOST_AFTER_HEAD {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
        tokio::task::consume_budget().await;
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

    /// A connection that takes at most `per_call` bytes a write, gathered
    /// across the slices it is given.
    struct Trickle {
        got: Vec<u8>,
        per_call: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            let n = buf.len().min(this.per_call);
            this.got.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(this.per_call - n);
                this.got.extend_from_slice(&buf[..take]);
                n += take;
            }
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Every byte of every part goes out, in order, however few bytes each
    /// write takes, empty parts included.
    #[test]
    fn gathered_writes_survive_short_writes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let parts: [&[u8]; 5] = [b"head\r\n", b"", b"a body of some length", b"", b"\r\n"];
        let whole = parts.concat();
        for per_call in 1..=whole.len() {
            let mut conn = Trickle {
                got: Vec::new(),
                per_call,
            };
            rt.block_on(write(&mut conn, parts)).unwrap();
            assert_eq!(conn.got, whole, "{per_call} bytes a write");
        }
        let mut conn = Trickle {
            got: Vec::new(),
            per_call: 1,
        };
        rt.block_on(write(&mut conn, [b"" as &[u8], b""])).unwrap();
        assert!(conn.got.is_empty());
    }

    #[test]
    fn chunk_sizes_are_hex_lines() {
        let mut buf = [0u8; 18];
        for len in [0, 1, 15, 16, 255, 4096, 123_456, usize::MAX] {
            assert_eq!(chunk_size(len, &mut buf), format!("{len:x}\r\n").as_bytes());
        }
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
