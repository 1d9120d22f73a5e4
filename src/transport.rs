//! A type-erased WebSocket stream shared by a session's reader and its send task.
//!
//! Both halves lock a `std::sync::Mutex` only for the duration of one poll, the
//! way `futures::StreamExt::split` locks its `BiLock`; no lock is held across
//! an `.await`. Erasing the stream type keeps [`Session`](crate::Session)
//! non-generic, so handlers are plain `async fn(Session)` whatever the socket.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::message::Message;

/// The operations a session needs from a WebSocket stream.
trait WsIo: Send {
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, WsError>>>;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>>;
    fn start_send(&mut self, msg: Message) -> Result<(), WsError>;
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>>;
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

impl<S> WsIo for WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, WsError>>> {
        Pin::new(self).poll_next(cx)
    }
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Sink::poll_ready(Pin::new(self), cx)
    }
    fn start_send(&mut self, msg: Message) -> Result<(), WsError> {
        Sink::start_send(Pin::new(self), msg)
    }
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Sink::poll_flush(Pin::new(self), cx)
    }
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.get_mut()).poll_shutdown(cx)
    }
}

/// One half of a shared WebSocket stream. [`Transport::pair`] makes two.
pub(crate) struct Transport {
    io: Arc<Mutex<dyn WsIo>>,
    meter: Option<Meter>,
}

impl Transport {
    /// Splits a WebSocket stream into a reading half and a writing half.
    ///
    /// `meter` counts the bytes the socket accepted, when the stream was built
    /// over a [`Metered`] connection.
    pub(crate) fn pair<S>(ws: WebSocketStream<S>, meter: Option<Meter>) -> (Transport, Transport)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io: Arc<Mutex<dyn WsIo>> = Arc::new(Mutex::new(ws));
        (
            Transport {
                io: io.clone(),
                meter: meter.clone(),
            },
            Transport { io, meter },
        )
    }

    /// The byte counter of the connection, if it is metered.
    pub(crate) fn meter(&self) -> Option<Meter> {
        self.meter.clone()
    }

    fn lock(&self) -> MutexGuard<'_, dyn WsIo + 'static> {
        // A poisoned lock means a poll panicked inside tungstenite; the stream's
        // state is still consistent enough to report errors, so carry on.
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shuts the socket's write side down (sends FIN), best effort.
    pub(crate) fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.lock().poll_shutdown(cx)
    }
}

impl Stream for Transport {
    type Item = Result<Message, WsError>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.lock().poll_read(cx)
    }
}

impl Sink<Message> for Transport {
    type Error = WsError;
    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.lock().poll_ready(cx)
    }
    fn start_send(self: Pin<&mut Self>, msg: Message) -> Result<(), WsError> {
        self.lock().start_send(msg)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.lock().poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        // The session sends its own Close frame; closing the sink only flushes.
        self.lock().poll_flush(cx)
    }
}

/// Counts the bytes a connection's socket has accepted, so the send task can
/// tell a slow client that still makes progress from a stuck one.
#[derive(Clone, Debug, Default)]
pub(crate) struct Meter(Arc<AtomicU64>);

impl Meter {
    /// Bytes written so far.
    pub(crate) fn written(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A connection whose writes are counted by a [`Meter`].
#[derive(Debug)]
pub(crate) struct Metered<S> {
    inner: S,
    meter: Meter,
}

impl<S> Metered<S> {
    pub(crate) fn new(inner: S) -> (Metered<S>, Meter) {
        let meter = Meter::default();
        (
            Metered {
                inner,
                meter: meter.clone(),
            },
            meter,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.meter.0.fetch_add(n as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            self.meter.0.fetch_add(n as u64, Ordering::Relaxed);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
