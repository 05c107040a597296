//! Connections the daemon accepts (its control socket, its web page): at
//! most a share of its file descriptors at once, so that clients that
//! connect and wait can never take the descriptors task starts need; the
//! rest wait in the listen backlog. A failed accept (out of descriptors,
//! say) backs off instead of spinning, with one warning a minute.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::health::Backoff;

/// At most one warning about failed accepts per this long.
const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Admits one connection per free place.
pub(crate) struct Gate {
    /// What accepts, for the warning (`control socket`, `web page`).
    name: &'static str,
    open: Arc<Semaphore>,
    backoff: Backoff,
    warned: Option<Instant>,
    failed_accepts: u64,
}

impl Gate {
    /// A gate for at most `most` connections at once, fewer under a low
    /// descriptor limit (see [`crate::supervisor::resources::connection_limit`]).
    pub(crate) fn new(name: &'static str, most: usize) -> Gate {
        Gate {
            name,
            open: Arc::new(Semaphore::new(
                crate::supervisor::resources::connection_limit(most),
            )),
            backoff: Backoff::default(),
            warned: None,
            failed_accepts: 0,
        }
    }

    /// Waits for a free place, then for a connection from `accept`; the
    /// connection holds its place until the permit is dropped.
    pub(crate) async fn admit<C, Accepting>(
        &mut self,
        mut accept: impl FnMut() -> Accepting,
    ) -> (C, OwnedSemaphorePermit)
    where
        Accepting: Future<Output = io::Result<C>>,
    {
        loop {
            // The semaphore is never closed.
            let Ok(permit) = self.open.clone().acquire_owned().await else {
                return std::future::pending().await;
            };
            match accept().await {
                Ok(connection) => {
                    self.backoff.reset();
                    return (connection, permit);
                }
                Err(error) => {
                    self.failed_accepts += 1;
                    if self
                        .warned
                        .is_none_or(|at| at.elapsed() >= ACCEPT_WARNING_EVERY)
                    {
                        self.warned = Some(Instant::now());
                        tracing::warn!(
                            failed_accepts = self.failed_accepts,
                            "{}: accepting a connection failed, backing off: {error}",
                            self.name
                        );
                    }
                    drop(permit);
                    tokio::time::sleep(self.backoff.next_delay()).await;
                }
            }
        }
    }
}

/// An admitted stream: it holds its place at the [`Gate`] for as long as
/// it lives, and fails with `TimedOut` once no byte has gone either way
/// for its idle time (a client gone quiet, one that stopped reading).
pub(crate) struct Held<S> {
    stream: S,
    _place: OwnedSemaphorePermit,
    idle_for: Duration,
    idle: Pin<Box<Sleep>>,
}

impl<S> Held<S> {
    pub(crate) fn new(stream: S, place: OwnedSemaphorePermit, idle_for: Duration) -> Held<S> {
        Held {
            stream,
            _place: place,
            idle_for,
            idle: Box::pin(tokio::time::sleep(idle_for)),
        }
    }

    fn moved(&mut self) {
        let until = tokio::time::Instant::now() + self.idle_for;
        self.idle.as_mut().reset(until);
    }

    /// A write's result: bytes written count as activity; one that waits
    /// fails once the idle time is up (a client that stopped reading).
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(result) => {
                if result.as_ref().is_ok_and(|&count| count > 0) {
                    self.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.idle_out(cx),
        }
    }

    /// For a stream that has nothing to give: whether its idle time is up.
    fn idle_out<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.idle.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no byte either way for {}s", self.idle_for.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.idle_out(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, bytes);
        self.wrote(cx, written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
