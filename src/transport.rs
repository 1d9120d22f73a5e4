//! The WebSocket connection shared by a session's reader and its send task,
//! and [`Wire`], the write buffer under it.
//!
//! Both halves lock a `std::sync::Mutex` only for the duration of one poll, the
//! way `futures::StreamExt::split` locks its `BiLock`; no lock is held across
//! an `.await`. Erasing the stream type keeps [`Session`](crate::Session)
//! non-generic, so handlers are plain `async fn(Session)` whatever the socket.
//!
//! # Why wshub writes its own data frames
//!
//! tungstenite copies every frame it writes into the connection's write
//! buffer, and that buffer keeps the size of the largest message it ever
//! held. A broadcast of one large message would then cost every subscriber a
//! copy of it, for as long as the connection lives. So text, binary, ping
//! and pong frames from the send task bypass tungstenite: [`Wire`] queues the
//! frame header and, for anything but a small payload, the payload's shared
//! `Bytes` itself, and writes them with vectored writes. A payload is never
//! copied per subscriber, and a connection's buffer holds at most
//! [`Config::write_buffer_size`](crate::Config::write_buffer_size) plus one
//! frame header and one small payload of its own.
//!
//! tungstenite still reads every frame and writes what the protocol makes it
//! write (pongs, the Close handshake). Those bytes pass through [`Wire`] too,
//! in order, and are refused (so tungstenite keeps them, and coalesces pongs)
//! while the buffer is over its limit: a client that sends pings and reads
//! nothing cannot grow the server's memory.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::error::ProtocolError;

use crate::message::Message;

/// Payloads up to this size are copied next to their frame header; larger
/// ones are queued as the shared `Bytes` they are (copying a small payload
/// costs less than one more slice in a vectored write).
const INLINE: usize = 1024;

/// The most slices one vectored write hands to the kernel.
const MAX_SLICES: usize = 64;

/// A drained buffer keeps at most this much memory for the next write.
const KEEP: usize = 4096;

/// The bytes tungstenite may hold on its own (pongs and a Close frame the
/// [`Wire`] refused for now); it cannot be less than one control frame.
pub(crate) const TUNGSTENITE_BUFFER: usize = 1024;

/// Pings read in a row while the connection's write buffer is over its
/// limit (the client is sending pings but not reading our answers) before
/// the session is closed as a ping flood.
pub(crate) const MAX_UNANSWERED_PINGS: u32 = 32;

/// The operations a session needs from a WebSocket stream over a [`Wire`].
trait WsIo: Send {
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, WsError>>>;
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>>;
    fn start_send(&mut self, msg: Message) -> Result<(), WsError>;
    fn wire(&mut self) -> &mut WireState;
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_flush_wire(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl<S> WsIo for WebSocketStream<Wire<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, WsError>>> {
        Pin::new(self).poll_next(cx)
    }
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Sink::poll_flush(Pin::new(self), cx)
    }
    fn start_send(&mut self, msg: Message) -> Result<(), WsError> {
        Sink::start_send(Pin::new(self), msg)
    }
    fn wire(&mut self) -> &mut WireState {
        &mut self.get_mut().state
    }
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_drain(cx)
    }
    fn poll_flush_wire(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(self.get_mut()), cx)
    }
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut()).poll_shutdown(cx)
    }
}

/// One half of a shared WebSocket stream. [`Transport::pair`] makes two.
pub(crate) struct Transport {
    io: Arc<Mutex<dyn WsIo>>,
    meter: Meter,
}

impl Transport {
    /// Splits a WebSocket stream over a [`Wire`] into a reading half and a
    /// writing half.
    pub(crate) fn pair<S>(ws: WebSocketStream<Wire<S>>) -> (Transport, Transport)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let meter = ws.get_ref().state.meter.clone();
        let io: Arc<Mutex<dyn WsIo>> = Arc::new(Mutex::new(ws));
        (
            Transport {
                io: io.clone(),
                meter: meter.clone(),
            },
            Transport { io, meter },
        )
    }

    /// The byte counter of the connection.
    pub(crate) fn meter(&self) -> &Meter {
        &self.meter
    }

    fn lock(&self) -> MutexGuard<'_, dyn WsIo + 'static> {
        // A poisoned lock means a poll panicked inside tungstenite; the stream's
        // state is still consistent enough to report errors, so carry on.
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the next message (tungstenite answers pings and Close frames
    /// as it reads). A ping read while the write buffer is over its limit
    /// counts towards a ping flood; see [`Transport::unanswered_pings`].
    pub(crate) fn poll_next_message(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message, WsError>>> {
        let mut io = self.lock();
        let item = ready!(io.poll_read(cx));
        match &item {
            Some(Ok(Message::Ping(_))) => {
                let wire = io.wire();
                // tungstenite has queued the pong.
                wire.tungstenite_holds = true;
                if wire.out.len > wire.limit {
                    wire.unanswered_pings += 1;
                } else {
                    wire.unanswered_pings = 0;
                }
            }
            // tungstenite answers the client's Close; no data may follow it.
            Some(Ok(Message::Close(_))) => {
                let wire = io.wire();
                wire.closing = true;
                wire.tungstenite_holds = true;
            }
            // tungstenite may have queued a Close of its own.
            Some(Err(_)) => io.wire().tungstenite_holds = true,
            _ => {}
        }
        Poll::Ready(item)
    }

    /// Pings read in a row while the client was not reading what the server
    /// wrote.
    pub(crate) fn unanswered_pings(&self) -> u32 {
        self.lock().wire().unanswered_pings
    }

    /// Ready when the write buffer has room for another frame (at most
    /// `write_buffer_size` is waiting), writing it out until then.
    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let mut io = self.lock();
        if io.wire().out.len <= io.wire().limit {
            return Poll::Ready(Ok(()));
        }
        flush_all(&mut *io, cx)
    }

    /// Ready when `msg` may be queued: for a data frame, when the buffer has
    /// room ([`poll_ready`](Self::poll_ready)); for a Close or raw frame,
    /// which go through tungstenite and need the buffer empty, once
    /// everything is written ([`poll_flush`](Self::poll_flush)).
    pub(crate) fn poll_room(
        &self,
        cx: &mut Context<'_>,
        msg: &Message,
    ) -> Poll<Result<(), WsError>> {
        if matches!(msg, Message::Close(_) | Message::Frame(_)) {
            self.poll_flush(cx)
        } else {
            self.poll_ready(cx)
        }
    }

    /// Queues a message for the next write. Text, binary, ping and pong
    /// frames are queued by [`Wire`] without copying a large payload; a
    /// Close frame (or a raw frame) goes through tungstenite, which needs an
    /// empty buffer for it, so call [`poll_flush`](Self::poll_flush) first.
    pub(crate) fn start_send(&self, msg: Message) -> Result<(), WsError> {
        let mut io = self.lock();
        let opcode = match &msg {
            Message::Text(_) => 0x1,
            Message::Binary(_) => 0x2,
            Message::Ping(_) => 0x9,
            Message::Pong(_) => 0xA,
            Message::Close(_) | Message::Frame(_) => {
                let wire = io.wire();
                wire.closing |= matches!(msg, Message::Close(_));
                wire.tungstenite_holds = true;
                return io.start_send(msg);
            }
        };
        let wire = io.wire();
        if wire.closing {
            return Err(WsError::Protocol(ProtocolError::SendAfterClosing));
        }
        let payload = match msg {
            Message::Text(text) => Bytes::from(text),
            Message::Binary(bytes) | Message::Ping(bytes) | Message::Pong(bytes) => bytes,
            Message::Close(_) | Message::Frame(_) => unreachable!("handled above"),
        };
        wire.out.push_frame(opcode, payload);
        Ok(())
    }

    /// Writes everything queued (tungstenite's bytes included) and flushes
    /// the socket.
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        flush_all(&mut *self.lock(), cx)
    }

    /// Shuts the socket's write side down (sends FIN) after what is queued,
    /// best effort.
    pub(crate) fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.lock().poll_shutdown(cx)
    }
}

/// Writes out the [`Wire`] directly while tungstenite holds nothing, which
/// is the case for every data frame: nothing is left to go out in order
/// before it, and the socket wakes the send task itself. Otherwise flushes
/// through tungstenite, so that the pongs and Close frames it holds go out
/// in order and its wake-ups reach both halves; once tungstenite has ended
/// the connection it no longer flushes the [`Wire`], which is then drained
/// directly (nothing else writes by then).
fn flush_all(io: &mut dyn WsIo, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
    if !io.wire().tungstenite_holds {
        return io.poll_flush_wire(cx).map_err(WsError::Io);
    }
    ready!(io.poll_flush(cx))?;
    // A pong that found tungstenite's buffer full is taken back and only
    // written by its next flush: this one.
    ready!(io.poll_flush(cx))?;
    io.wire().tungstenite_holds = false;
    if io.wire().out.len > 0 {
        ready!(io.poll_drain(cx))?;
    }
    Poll::Ready(Ok(()))
}

impl Stream for Transport {
    type Item = Result<Message, WsError>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_next_message(cx)
    }
}

/// Counts the bytes a connection's socket has accepted, so the send task can
/// tell a slow client that still makes progress from a stuck one, and the
/// bytes read from it (for metrics).
#[derive(Clone, Debug, Default)]
pub(crate) struct Meter(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    written: AtomicU64,
    read: AtomicU64,
}

impl Meter {
    /// Bytes written so far.
    pub(crate) fn written(&self) -> u64 {
        self.0.written.load(Ordering::Relaxed)
    }

    /// Bytes read so far.
    pub(crate) fn read(&self) -> u64 {
        self.0.read.load(Ordering::Relaxed)
    }
}

/// The bytes waiting to be written, in order: shared chunks, then a tail of
/// small pieces copied together.
#[derive(Debug, Default)]
struct Outbox {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    /// Bytes queued in all.
    len: usize,
}

impl Outbox {
    fn push_small(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
        self.len += bytes.len();
    }

    fn push_shared(&mut self, bytes: Bytes) {
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
        self.len += bytes.len();
        self.chunks.push_back(bytes);
    }

    /// Queues one unmasked, final frame (RFC 6455 §5.2).
    fn push_frame(&mut self, opcode: u8, payload: Bytes) {
        let mut header = [0u8; 10];
        header[0] = 0x80 | opcode;
        let len = payload.len();
        let header = if len < 126 {
            header[1] = len as u8;
            &header[..2]
        } else if let Ok(len) = u16::try_from(len) {
            header[1] = 126;
            header[2..4].copy_from_slice(&len.to_be_bytes());
            &header[..4]
        } else {
            header[1] = 127;
            header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            &header[..10]
        };
        self.push_small(header);
        if len <= INLINE {
            self.push_small(&payload);
        } else {
            self.push_shared(payload);
        }
    }

    /// The next slices to write, in order.
    fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>; MAX_SLICES]) -> usize {
        let mut n = 0;
        for chunk in self.chunks.iter().take(MAX_SLICES - 1) {
            slices[n] = IoSlice::new(chunk);
            n += 1;
        }
        if !self.tail.is_empty() && n < MAX_SLICES && n == self.chunks.len() {
            slices[n] = IoSlice::new(&self.tail);
            n += 1;
        }
        n
    }

    /// Drops the first `n` bytes, which the socket has taken.
    fn advance(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            match self.chunks.front_mut() {
                Some(chunk) if chunk.len() <= n => {
                    n -= chunk.len();
                    self.chunks.pop_front();
                }
                Some(chunk) => {
                    chunk.advance(n);
                    return;
                }
                None => {
                    self.tail.advance(n);
                    n = 0;
                }
            }
        }
        if self.len == 0 {
            // A buffer that grew past KEEP for one burst is given back; a
            // small one is kept for the next write.
            self.tail.clear();
            if self.tail.try_reclaim(KEEP + 1) {
                self.tail = BytesMut::new();
            }
        }
    }
}

/// What a [`Wire`] knows besides its socket.
#[derive(Debug)]
pub(crate) struct WireState {
    out: Outbox,
    /// tungstenite's writes are refused while more than this is queued.
    limit: usize,
    meter: Meter,
    /// A Close frame has been received or queued: no data frame may follow.
    closing: bool,
    /// tungstenite may hold bytes of its own (a pong or Close it queued, a
    /// raw frame handed to it, bytes the buffer refused): until a flush
    /// through tungstenite has written them, flushes go through it.
    tungstenite_holds: bool,
    unanswered_pings: u32,
}

/// A connection with wshub's write buffer: everything written to the socket
/// passes through it, tungstenite's frames and the send task's alike, in the
/// order they were queued.
#[derive(Debug)]
pub(crate) struct Wire<S> {
    io: S,
    state: WireState,
}

impl<S> Wire<S> {
    /// Wraps a connection; `limit` is the write buffer's size
    /// ([`Config::write_buffer_size`](crate::Config::write_buffer_size)).
    pub(crate) fn new(io: S, limit: usize) -> Wire<S> {
        Wire {
            io,
            state: WireState {
                out: Outbox::default(),
                limit,
                meter: Meter::default(),
                closing: false,
                tungstenite_holds: false,
                unanswered_pings: 0,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> Wire<S> {
    /// Writes until nothing is queued.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let state = &mut self.state;
        while state.out.len > 0 {
            let io = Pin::new(&mut self.io);
            let n = ready!(if state.out.chunks.is_empty() {
                // Small frames gathered together: a plain write.
                io.poll_write(cx, &state.out.tail)
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let count = state.out.slices(&mut slices);
                io.poll_write_vectored(cx, &slices[..count])
            })?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            state.out.advance(n);
            state.meter.0.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Wire<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.state
                .meter
                .0
                .read
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

/// tungstenite's side: it writes whole frames (its own buffer, all of it), which
/// are queued behind what is already there, or refused while the buffer is
/// over its limit.
impl<S: AsyncWrite + Unpin> AsyncWrite for Wire<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.state.out.len > self.state.limit {
            // Try to make room first; the bytes are all taken or none are,
            // so tungstenite never holds half a frame.
            if let Poll::Ready(Err(err)) = self.poll_drain(cx) {
                return Poll::Ready(Err(err));
            }
            if self.state.out.len > self.state.limit {
                self.state.tungstenite_holds = true;
                return Poll::Pending;
            }
        }
        self.state.out.push_small(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(out: &Outbox) -> Vec<u8> {
        let mut bytes: Vec<u8> = out.chunks.iter().flat_map(|c| c.iter().copied()).collect();
        bytes.extend_from_slice(&out.tail);
        bytes
    }

    #[test]
    fn frames_are_encoded_as_rfc_6455_server_frames() {
        let mut out = Outbox::default();
        out.push_frame(0x1, Bytes::from_static(b"hi"));
        out.push_frame(0x2, Bytes::from(vec![7u8; 300]));
        out.push_frame(0x2, Bytes::from(vec![9u8; 70_000]));
        let bytes = drained(&out);
        assert_eq!(&bytes[..4], &[0x81, 2, b'h', b'i']);
        assert_eq!(&bytes[4..8], &[0x82, 126, 1, 44]);
        assert!(bytes[8..308].iter().all(|&b| b == 7));
        assert_eq!(&bytes[308..310], &[0x82, 127]);
        assert_eq!(&bytes[310..318], &70_000u64.to_be_bytes());
        assert_eq!(bytes.len(), 318 + 70_000);
        assert_eq!(out.len, bytes.len());
    }

    #[test]
    fn a_large_payload_is_queued_by_reference_not_copied() {
        let payload = Bytes::from(vec![1u8; 64 * 1024]);
        let mut out = Outbox::default();
        out.push_frame(0x2, payload.clone());
        assert!(
            out.chunks.iter().any(|c| c.as_ptr() == payload.as_ptr()),
            "the queued chunk must be the shared payload itself"
        );
        assert!(out.tail.capacity() < 1024, "only the header is copied");
    }

    #[test]
    fn advancing_keeps_the_order_and_frees_a_large_tail() {
        let mut out = Outbox::default();
        out.push_small(&[1; 10]);
        out.push_shared(Bytes::from(vec![2u8; 5000]));
        out.push_small(&[3; 8000]);
        out.advance(12);
        let bytes = drained(&out);
        assert_eq!(bytes.len(), 13_010 - 12);
        assert!(bytes[..4998].iter().all(|&b| b == 2));
        assert!(bytes[4998..].iter().all(|&b| b == 3));
        out.advance(out.len);
        assert_eq!(out.len, 0);
        assert!(!out.tail.try_reclaim(KEEP + 1), "the 8 KB buffer is freed");
    }
}
