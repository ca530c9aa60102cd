//! hyper's own error answers, in the JSON error shape.
//!
//! A request hyper cannot parse (a garbled request line, a URI or header
//! section past its limits, a bad header byte, an unknown transfer coding)
//! never reaches the router: hyper answers it itself, `400`, `414` or `431`
//! with `content-length: 0`, and closes. hyper 1 has no hook for that
//! answer, so [`ShapedErrors`] sits between hyper and the socket and swaps
//! exactly those bytes for the same status with a JSON body, so that every
//! error a client can get has the shape README promises.
//!
//! It recognises hyper's answer by what none of ours has: a status of 400
//! or more with `content-length: 0` and no `content-type` (every answer of
//! the router's carries a JSON body). Every other write passes through
//! after two byte comparisons.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection's stream, with hyper's own error answers rewritten.
pub struct ShapedErrors<S> {
    inner: S,
    /// A rewritten answer being written: its bytes, how many are out, and
    /// how many bytes of hyper's it stands for (reported once all are out).
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<S> ShapedErrors<S> {
    pub fn new(inner: S) -> ShapedErrors<S> {
        ShapedErrors { inner, pending: None }
    }
}

impl<S: AsyncWrite + Unpin> ShapedErrors<S> {
    /// Writes out a pending rewritten answer; the count of hyper's bytes it
    /// replaced once done.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some((bytes, written, replaced)) = &mut self.pending else {
            return Poll::Ready(Ok(0));
        };
        while *written < bytes.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        let replaced = *replaced;
        self.pending = None;
        Poll::Ready(Ok(replaced))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ShapedErrors<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ShapedErrors<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.pending.is_none() {
            match shaped(buf) {
                Some(answer) => {
                    count(buf);
                    self.pending = Some((answer, 0, buf.len()));
                }
                None => return Pin::new(&mut self.inner).poll_write(cx, buf),
            }
        }
        self.drive(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // hyper's error answer is one buffer (a head, no body); anything
        // else, the router's error answers included, goes out whole.
        if self.pending.is_none() {
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
            match shaped(first) {
                Some(answer) => {
                    count(first);
                    self.pending = Some((answer, 0, first.len()));
                }
                None => return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
            }
        }
        self.drive(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drive(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drive(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts hyper's error answer `head` (`HTTP/1.1 414 ...`) in
/// `ticketd_unparsed_requests_total`.
fn count(head: &[u8]) {
    let status = head.get(9..12).and_then(|s| std::str::from_utf8(s).ok()?.parse().ok());
    crate::metrics::global().unparsed(status.unwrap_or(400));
}

/// hyper answers in the version of the connection's last request: after
/// an HTTP/1.0 keep-alive request, its error answer says `HTTP/1.0`.
fn is_error_head(buf: &[u8]) -> bool {
    (buf.starts_with(b"HTTP/1.1 ") || buf.starts_with(b"HTTP/1.0 ")) && matches!(buf.get(9), Some(b'4' | b'5'))
}

/// The JSON-shaped replacement of `buf` if it is hyper's own error answer:
/// a whole head, status 400 or more, `content-length: 0`, no content type.
fn shaped(buf: &[u8]) -> Option<Vec<u8>> {
    // Header names go out lower-case (the `http` crate's, and hyper's own):
    // a byte search rules out every answer of the router's before any
    // allocation or slicing.
    let has = |needle: &[u8]| buf.windows(needle.len()).any(|w| w == needle);
    if !is_error_head(buf)
        || !buf.ends_with(b"\r\n\r\n")
        || has(b"\r\ncontent-type:")
        || !has(b"\r\ncontent-length: 0\r\n")
    {
        return None;
    }
    let head = std::str::from_utf8(&buf[..buf.len() - 4]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let headers: Vec<&str> = lines.collect();
    let status = status_line.get(9..12)?;
    let (code, message) = match status {
        "414" => ("URI_TOO_LONG", "the request URI is too long"),
        "431" => ("HEADERS_TOO_LARGE", "the request's headers are too large"),
        "505" => ("BAD_REQUEST", "the request's HTTP version is not supported"),
        _ => ("BAD_REQUEST", "the request is not valid HTTP/1.1"),
    };
    let body = format!(r#"{{"ok":false,"error":{{"code":"{code}","message":"{message}"}}}}"#);
    let mut out = String::with_capacity(buf.len() + body.len() + 48);
    out.push_str(status_line);
    out.push_str("\r\n");
    for h in headers.iter().filter(|h| !h.eq_ignore_ascii_case("content-length: 0")) {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("content-type: application/json\r\ncontent-length: ");
    out.push_str(&body.len().to_string());
    out.push_str("\r\n\r\n");
    out.push_str(&body);
    Some(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPERS: &[u8] =
        b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\ndate: Sat, 05 Dec 2026 14:57:32 GMT\r\n\r\n";

    #[test]
    fn hypers_own_answer_gets_a_json_body_and_keeps_its_status() {
        let out = String::from_utf8(shaped(HYPERS).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["error"]["code"], "URI_TOO_LONG");
    }

    #[test]
    fn a_head_with_text_past_ascii_is_read_without_panicking() {
        let odd = "HTTP/1.1 400 Bad Request\r\nlocation: /é\r\ncontent-length: 0\r\n\r\n";
        assert!(shaped(odd.as_bytes()).is_some());
        let ours = "HTTP/1.1 404 Not Found\r\nx: é\r\ncontent-type: a/b\r\ncontent-length: 9\r\n\r\n";
        assert_eq!(shaped(ours.as_bytes()), None);
    }

    #[test]
    fn every_other_answer_passes_untouched() {
        for other in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 61\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{\"partial",
            b"{\"ok\":false}",
        ] {
            assert_eq!(shaped(other), None, "{}", String::from_utf8_lossy(other));
        }
    }
}
