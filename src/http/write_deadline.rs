//! A write-stall timeout for every public and admin connection
//! (`server.write_timeout`): hyper's, and the event streams'.
//!
//! hyper 1 times out a request head that trickles in (`header_read_timeout`)
//! but has no timeout for writing: a client that sends requests and never
//! reads the answers leaves hyper waiting for the socket to take them, and
//! the connection — one of `server.max_connections` — is held for as long
//! as the client likes. A few hundred of those lock every fan out.
//! [`WriteDeadline`] sits between hyper and the socket and fails a write
//! that has made no progress for the timeout, which ends the connection.
//!
//! It bounds the time between two writes that make progress, not a whole
//! answer (as Nginx's `send_timeout`): a slow reader that keeps reading is
//! served. A write the socket takes at once costs one branch; the timer
//! is made on a connection's first stall and reused after.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// A connection's stream whose writes fail once stalled for `limit`.
pub struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Armed while a write waits for the socket; `None` until the first stall.
    stall: Option<Pin<Box<Sleep>>>,
    /// Whether `stall` is counting for the write now waiting.
    armed: bool,
}

impl<S> WriteDeadline<S> {
    /// `inner`, with writes that fail after `limit` without progress.
    pub fn new(inner: S, limit: Duration) -> WriteDeadline<S> {
        WriteDeadline {
            inner,
            limit,
            stall: None,
            armed: false,
        }
    }

    /// The stream itself.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Passes on what a write returned: progress disarms the timer; a wait
    /// arms it (from the first wait on) and fails once it has run out.
    fn watch<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        let stall = match &mut self.stall {
            Some(stall) if self.armed => stall,
            Some(stall) => {
                stall.as_mut().reset(Instant::now() + self.limit);
                stall
            }
            None => self.stall.insert(Box::pin(tokio::time::sleep(self.limit))),
        };
        self.armed = true;
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no part of the answer within server.write_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_fails() {
        let (near, _far) = tokio::io::duplex(8);
        let mut stream = WriteDeadline::new(near, Duration::from_millis(200));
        let write = tokio::time::timeout(Duration::from_secs(10), stream.write_all(&[0; 64]));
        let error = write.await.expect("the stalled write was never let go").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_served() {
        let (near, mut far) = tokio::io::duplex(8);
        let mut stream = WriteDeadline::new(near, Duration::from_secs(1));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0; 8];
            loop {
                // Each read well within the limit, all of them past it.
                tokio::time::sleep(Duration::from_millis(250)).await;
                match far.read(&mut buf).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let answer: Vec<u8> = (0..64).collect();
        stream.write_all(&answer).await.unwrap();
        stream.shutdown().await.unwrap();
        drop(stream);
        assert_eq!(reader.await.unwrap(), answer);
    }
}
