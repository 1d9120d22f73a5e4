//! A WebSocket session (Ktor's `WebSocketSession`): its receive side, its send
//! task, its close reason.
//!
//! The receive side runs in the handler's own task: [`Session::recv`] reads the
//! socket, answers pings, records pongs and close frames, and turns protocol
//! errors into the right close code. A separate send task owns the write side:
//! it writes what [`Session::send`] queues, forwards a hub [`Subscription`]
//! after [`Session::join`], pings, and applies the hub's slow-client policy.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use futures_util::task::AtomicWaker;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::VecDeque;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use tokio::sync::{Semaphore, SemaphorePermit, TryAcquireError, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Excess, RateLimit};
use crate::error::Error;
use crate::forward::{ForwardKey, Forwards, Item, NewForward, TopicStart};
use crate::hub::{RecvError, Subscription};
use crate::message::{self, Bytes, CloseCode, CloseReason, Message, Utf8Bytes, close_reason};
use crate::metrics::{SessionMeter, now_nanos};
use crate::policy::OnLag;
use crate::request::Request;
use crate::transport::{MAX_UNANSWERED_PINGS, Meter, TUNGSTENITE_BUFFER, Transport, Wire};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One WebSocket connection, as a handler sees it.
///
/// * Receive with [`recv`](Self::recv) or [`incoming`](Self::incoming): text and
///   binary messages only; pings are answered, pongs recorded and the close
///   handshake completed for you (unless the session is raw).
/// * Send with [`send`](Self::send), [`send_json`](Self::send_json), or an
///   [`Outgoing`] handle that other tasks can hold.
/// * Broadcast with [`join`](Self::join): everything the client sends goes to a
///   hub, everything the hub carries goes to the client.
/// * End with [`close`](Self::close) or [`terminate`](Self::terminate); read
///   why it ended with [`close_reason`](Self::close_reason). A session dropped
///   while open is closed with 1000 Normal Closure.
///
/// Keep reading while the session lives (`recv` in a loop, or `join`): pongs
/// and the client's Close frame are only seen while the session reads.
pub struct Session {
    reader: Option<Transport>,
    out: Outgoing,
    request: Arc<Request>,
    raw: bool,
    /// The stream ended (close handshake done or connection gone).
    finished: bool,
}

/// A cloneable handle that sends to one session (Ktor's `outgoing`).
///
/// Messages are queued in the session's bounded outgoing queue
/// ([`Config::outgoing_capacity`]) and written in order by its send task.
#[derive(Clone)]
pub struct Outgoing {
    shared: Arc<Shared>,
}

/// A subscription a session forwards, from [`Outgoing::forward`]: pass it to
/// [`Outgoing::unforward`] to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ForwardId(ForwardKey);

/// State shared by a session, its send task and its [`Outgoing`] handles.
struct Shared {
    id: u64,
    /// `session{id, peer, path}`: the send task runs in it, and so does a
    /// [`Server`](crate::Server)'s handler. Kept here, once, rather than in
    /// each future that carries the session.
    span: tracing::Span,
    reason: OnceLock<CloseReason>,
    /// The reason is the client's, from its Close frame.
    reason_by_peer: AtomicBool,
    /// Cancelled when the connection must end now: both sides stop.
    kill: CancellationToken,
    /// A close the send task must perform, with priority over queued data.
    close_request: Mutex<Option<CloseRequest>>,
    /// Rung for a kill, a close request, new settings or a queued command;
    /// only the send task waits. The flags below say which, without locks.
    wake: Signal,
    killed: AtomicBool,
    close_pending: AtomicBool,
    settings_changed: AtomicBool,
    /// The session's own outgoing queue: `send`, `flush` and `join` go here.
    queue: Queue,
    pongs: AtomicU64,
    /// When the last text or binary message arrived, in milliseconds after
    /// [`epoch`]; kept only when `idle` (there is an idle timeout).
    heard: AtomicU64,
    idle: bool,
    reader_gone: AtomicBool,
    /// A server runs the handler and closes the session itself when it returns.
    managed: bool,
    settings: Mutex<Settings>,
    max_frame_size: Option<usize>,
    max_message_size: Option<usize>,
    publish_rate: Option<RateLimit>,
    /// The key of the next subscription handed to the send task.
    next_key: AtomicU64,
}

#[derive(Clone, Copy)]
struct Settings {
    ping_period: Option<Duration>,
    timeout: Duration,
}

#[derive(Clone, Debug)]
struct CloseRequest {
    reason: CloseReason,
    /// Wait for the client's Close frame (true) or drop the connection right
    /// after ours is written (false: failing the connection).
    handshake: bool,
    /// Write what the hub already buffered for this session first (server shutdown).
    drain_hub: bool,
}

/// A token bucket for [`RateLimit`].
pub(crate) struct Bucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn new(limit: RateLimit) -> Bucket {
        Bucket {
            limit,
            tokens: f64::from(limit.burst.max(1)),
            last: Instant::now(),
        }
    }

    /// What a message over the limit does.
    pub(crate) fn excess(&self) -> Excess {
        self.limit.excess
    }

    /// Takes a token if there is one.
    pub(crate) fn take(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * f64::from(self.limit.per_second);
        self.tokens = (self.tokens + earned).min(f64::from(self.limit.burst.max(1)));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A wake-up many may ring and one task (the send task) waits for; a ring
/// with nobody waiting is kept for the next wait.
#[derive(Default)]
struct Signal {
    rung: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    fn ring(&self) {
        self.rung.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn poll_rung(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.rung.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.rung.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Takes a waiting ring, if there is one, without waiting.
    fn take(&self) -> bool {
        // A load first: most looks find nothing, and need not write.
        self.rung.load(Ordering::Acquire) && self.rung.swap(false, Ordering::AcqRel)
    }

    /// Whether a ring is waiting, without taking it.
    fn is_rung(&self) -> bool {
        self.rung.load(Ordering::Acquire)
    }

    async fn rung(&self) {
        poll_fn(|cx| self.poll_rung(cx)).await
    }
}

/// A session's own outgoing queue (Ktor's `outgoing` channel): bounded, in
/// order, and free while empty (a channel would allocate its first block of
/// slots for every session up front).
///
/// Room is counted by a semaphore with one permit per free place: a push takes
/// a permit (waiting in line while there is none), a pop gives one back, so
/// every pop lets exactly one waiting sender in, however many pops run in a
/// row and however many senders wait.
struct Queue {
    items: Mutex<VecDeque<Command>>,
    /// One permit per free place; closed when the send task has ended.
    room: Semaphore,
    /// The number of places: with this many permits free, the queue is
    /// empty, which `pop` sees without taking the lock.
    capacity: usize,
}

/// Why a command was not queued; it is handed back.
enum Refused {
    Full(Command),
    Closed,
}

impl Queue {
    fn new(capacity: usize) -> Queue {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        Queue {
            items: Mutex::new(VecDeque::new()),
            room: Semaphore::new(capacity),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Command>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a command whose place is already taken; hands it back if the
    /// queue closed meanwhile (checked under the lock `close` takes, so
    /// nothing is left behind in a closed queue).
    fn put(&self, permit: SemaphorePermit<'_>, command: Command) -> Result<(), Command> {
        let mut items = self.lock();
        if self.room.is_closed() {
            return Err(command);
        }
        // The place now belongs to the command; `pop` gives it back.
        permit.forget();
        items.push_back(command);
        Ok(())
    }

    fn try_push(&self, command: Command) -> Result<(), Refused> {
        match self.room.try_acquire() {
            Ok(permit) => self.put(permit, command).map_err(|_| Refused::Closed),
            Err(TryAcquireError::NoPermits) => Err(Refused::Full(command)),
            Err(TryAcquireError::Closed) => Err(Refused::Closed),
        }
    }

    /// Queues `command`, waiting while the queue is full; hands it back
    /// once the send task has ended.
    async fn push(&self, command: Command) -> Result<(), Command> {
        match self.room.acquire().await {
            Ok(permit) => self.put(permit, command),
            Err(_closed) => Err(command),
        }
    }

    /// Whether a message is waiting to be written.
    fn has_sends(&self) -> bool {
        self.lock().iter().any(|c| matches!(c, Command::Send(_)))
    }

    fn pop(&self) -> Option<Command> {
        // A place is taken before its command is queued and given back after
        // it is taken out, so all places free means nothing is queued.
        if self.room.available_permits() == self.capacity {
            return None;
        }
        let command = self.lock().pop_front();
        if command.is_some() {
            self.room.add_permits(1);
        }
        command
    }

    /// Refuses everything from now on and drops what is queued (so pending
    /// flushes return); waiting senders get their command back.
    fn close(&self) {
        let dropped = {
            let mut items = self.lock();
            self.room.close();
            std::mem::take(&mut *items)
        };
        drop(dropped);
    }
}

/// Kills a session when dropped (the server's connection task holds one).
pub(crate) struct KillOnDrop(Arc<Shared>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill();
    }
}

enum Command {
    Send(Message),
    Flush(oneshot::Sender<()>),
    /// Boxed: the queue's slots stay the size of a message.
    Forward(Box<NewForward>),
    Unforward(ForwardKey),
}

impl Shared {
    fn reason(&self) -> Option<CloseReason> {
        self.reason.get().cloned()
    }

    /// Records why the session ended; the first reason wins. Returns
    /// whether this one did.
    fn set_reason(&self, reason: CloseReason) -> bool {
        self.reason.set(reason).is_ok()
    }

    fn request_close(&self, mut request: CloseRequest) {
        request.reason = fit_control_frame(request.reason);
        self.set_reason(request.reason.clone());
        let mut slot = self.close_request.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(request);
        drop(slot);
        self.close_pending.store(true, Ordering::Release);
        self.wake.ring();
    }

    /// Queues a command for the send task, waiting for room.
    async fn push(&self, command: Command) -> Result<(), Command> {
        self.queue.push(command).await?;
        self.wake.ring();
        Ok(())
    }

    /// Queues a command for the send task if there is room.
    fn try_push(&self, command: Command) -> Result<(), Refused> {
        self.queue.try_push(command)?;
        self.wake.ring();
        Ok(())
    }

    /// Ends the connection now: both sides stop.
    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.kill.cancel();
        self.wake.ring();
    }

    fn take_close_request(&self) -> Option<CloseRequest> {
        self.close_request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn settings(&self) -> Settings {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn closed_error(&self) -> Error {
        Error::Closed(self.reason())
    }

    /// Notes that a data message arrived (for the idle timeout).
    fn heard_now(&self) {
        if self.idle {
            self.heard
                .store(since_epoch(Instant::now()), Ordering::Relaxed);
        }
    }

    /// When the last data message arrived (or the session started).
    fn last_heard(&self) -> Instant {
        let heard = Duration::from_millis(self.heard.load(Ordering::Relaxed));
        epoch().checked_add(heard).unwrap_or_else(Instant::now)
    }
}

/// A fixed instant early in the process, so that a session can keep a time
/// in one atomic word.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds from [`epoch`] to `at`, rounded down.
fn since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX)
}

/// The close reason for a connection that ended without a closing handshake.
fn abnormal(why: &str) -> CloseReason {
    close_reason(CloseCode::Abnormal, why.to_owned())
}

/// The close code a read error calls for, if the peer can still be told.
fn close_code_for(err: &WsError) -> Option<CloseReason> {
    let code = match err {
        WsError::Capacity(_) => CloseCode::Size,
        WsError::Utf8(_) => CloseCode::Invalid,
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => return None,
        WsError::Protocol(_) => CloseCode::Protocol,
        _ => return None,
    };
    Some(close_reason(code, err.to_string()))
}

/// The longest close reason a Close frame can carry: 125 payload bytes minus
/// the 2-byte code (RFC 6455 §5.5).
const MAX_CLOSE_REASON: usize = 123;

/// Cuts a close reason to what fits in a control frame, at a character boundary.
fn fit_control_frame(mut reason: CloseReason) -> CloseReason {
    if reason.reason.len() > MAX_CLOSE_REASON {
        let text = reason.reason.as_str();
        let mut end = MAX_CLOSE_REASON;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        reason.reason = Utf8Bytes::from(text[..end].to_owned());
    }
    reason
}

/// A peer address for a span field: the address, or `unknown`.
struct PeerField(Option<std::net::SocketAddr>);

impl fmt::Display for PeerField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

/// Options the send task needs, fixed when the session starts.
#[derive(Clone)]
pub(crate) struct Setup {
    pub(crate) config: Config,
    pub(crate) request: Request,
    pub(crate) raw: bool,
    /// The server closes the session when the handler returns (1000, or 1011 on error).
    pub(crate) managed: bool,
    /// Spawns the send task where the server can wait for it; `tokio::spawn` if `None`.
    pub(crate) tracker: Option<tokio_util::task::TaskTracker>,
}

impl Session {
    /// Starts a session on a connection your own HTTP server has already
    /// answered with `101 Switching Protocols` (for example hyper's
    /// `Upgraded`, wrapped in `TokioIo`), applying every option of `config`.
    ///
    /// wshub builds the WebSocket stream itself, with every limit of
    /// `config` (frame and message sizes, buffers), its own write buffer
    /// (broadcast payloads are written from the hub's shared bytes, never
    /// copied per session), and a count of the bytes the socket accepts, so
    /// that [`Config::send_timeout`] closes only a client that takes nothing
    /// at all, never one that is slowly reading a large message.
    ///
    /// # Panics
    ///
    /// If called outside a tokio runtime.
    pub async fn from_upgraded<S>(io: S, request: Request, config: &Config) -> Session
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let setup = Setup {
            config: config.clone(),
            request,
            raw: false,
            managed: false,
            tracker: None,
        };
        Session::start_upgraded(io, setup).await.0
    }

    /// Builds the WebSocket stream over wshub's write buffer and starts the
    /// session and its send task.
    pub(crate) async fn start_upgraded<S>(io: S, setup: Setup) -> (Session, JoinHandle<()>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let wire = Wire::new(io, setup.config.write_buffer_size);
        // tungstenite writes only what the protocol makes it write (pongs,
        // Close frames), straight into the Wire; data frames bypass it.
        let ws_config = setup
            .config
            .websocket_config()
            .write_buffer_size(0)
            .max_write_buffer_size(TUNGSTENITE_BUFFER);
        let ws = WebSocketStream::from_raw_socket(wire, Role::Server, Some(ws_config)).await;
        let (reader, writer) = Transport::pair(ws);
        let meter = writer.meter().clone();
        let config = setup.config;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            id,
            span: tracing::info_span!(
                "session",
                id,
                peer = %PeerField(setup.request.peer_addr()),
                path = %setup.request.path(),
            ),
            reason: OnceLock::new(),
            reason_by_peer: AtomicBool::new(false),
            kill: CancellationToken::new(),
            close_request: Mutex::new(None),
            wake: Signal::default(),
            killed: AtomicBool::new(false),
            close_pending: AtomicBool::new(false),
            settings_changed: AtomicBool::new(false),
            queue: Queue::new(config.outgoing_capacity),
            pongs: AtomicU64::new(0),
            heard: AtomicU64::new(since_epoch(Instant::now())),
            idle: config.idle_timeout.is_some(),
            reader_gone: AtomicBool::new(false),
            managed: setup.managed,
            settings: Mutex::new(Settings {
                ping_period: if setup.raw { None } else { config.ping_period },
                timeout: config.timeout,
            }),
            max_frame_size: config.websocket_config().max_frame_size,
            max_message_size: config.max_message_size,
            publish_rate: config.publish_rate,
            next_key: AtomicU64::new(1),
        });
        let task = SendTask {
            sink: writer,
            shared: shared.clone(),
            subs: Forwards::default(),
            send_timeout: config.send_timeout,
            close_timeout: config.close_timeout,
            max_batch: config.max_batch.max(1),
            ping: Ping::new(shared.settings()),
            idle: config
                .idle_timeout
                .map(|timeout| Box::new(Idle::new(timeout))),
            metrics: config
                .metrics
                .clone()
                .map(move |metrics| Box::new(SessionMeter::new(metrics, meter))),
        };
        let run = task.run().instrument(shared.span.clone());
        let handle = match &setup.tracker {
            Some(tracker) => tracker.spawn(run),
            None => tokio::spawn(run),
        };
        let session = Session {
            reader: Some(reader),
            out: Outgoing { shared },
            request: Arc::new(setup.request),
            raw: setup.raw,
            finished: false,
        };
        (session, handle)
    }

    /// A number unique to this session within the process.
    pub fn id(&self) -> u64 {
        self.out.shared.id
    }

    /// The session's `tracing` span, `session{id, peer, path}` (at `info`
    /// level). The session's send task runs in it, and a
    /// [`Server`](crate::Server) runs each route handler in it, so every
    /// event the handler logs names its connection. Code of your own that
    /// works for the session in other tasks can enter it too:
    ///
    /// ```no_run
    /// # async fn demo(session: wshub::Session) {
    /// use tracing::Instrument;
    /// let out = session.outgoing();
    /// tokio::spawn(
    ///     async move {
    ///         tracing::info!("ticking"); // logged as session{id=.. peer=.. path=..}: ticking
    ///         let _ = out.send("tick").await;
    ///     }
    ///     .instrument(session.span().clone()),
    /// );
    /// # }
    /// ```
    pub fn span(&self) -> &tracing::Span {
        &self.out.shared.span
    }

    pub(crate) fn request_arc(&self) -> Arc<Request> {
        self.request.clone()
    }

    /// The session's [`Config::publish_rate`], as a bucket to take from.
    pub(crate) fn publish_bucket(&self) -> Option<Bucket> {
        self.out.shared.publish_rate.map(Bucket::new)
    }

    /// The upgrade request: path, query, headers, peer address (Ktor's `call`).
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Whether this is a raw session (control frames visible, no pings sent).
    pub fn is_raw(&self) -> bool {
        self.raw
    }

    /// Receives the next text or binary message; `None` once the session is
    /// closed, after which [`close_reason`](Self::close_reason) says why.
    ///
    /// Pings are answered and pongs recorded as they pass. A Close frame from
    /// the client is answered and ends the stream. A protocol violation closes
    /// the session with the matching code: 1009 for a frame or message over the
    /// limit, 1007 for invalid UTF-8, 1002 for other protocol errors.
    ///
    /// In a raw session pings, pongs and the client's Close frame are returned
    /// too (tungstenite still answers pings and closes, as RFC 6455 requires).
    ///
    /// Messages this session queued before the call (with [`send`](Self::send)
    /// or an [`Outgoing`] handle) are written before the next read, so a reply
    /// is never overtaken by the client's Close frame. If the client is not
    /// reading, that write is bounded by [`Config::send_timeout`] like any other.
    ///
    /// Cancel-safe: a message is never lost if this future is dropped.
    pub async fn recv(&mut self) -> Option<Message> {
        // What the handler queued before this read goes out first: reading the
        // client's Close makes tungstenite answer it at once, and nothing can be
        // written after that answer, so a reply still queued would be lost.
        if self.reader.is_some() && self.out.shared.queue.has_sends() {
            let _ = self.out.flush().await;
        }
        loop {
            let reader = self.reader.as_mut()?;
            let item = tokio::select! {
                biased;
                _ = self.out.shared.kill.cancelled() => {
                    self.end(abnormal("connection terminated"));
                    return None;
                }
                item = reader.next() => item,
            };
            match item {
                None => {
                    self.end(abnormal("connection closed without a close frame"));
                    return None;
                }
                Some(Ok(msg)) => match msg {
                    Message::Text(_) | Message::Binary(_) => {
                        self.out.shared.heard_now();
                        return Some(msg);
                    }
                    Message::Ping(_) if reader.unanswered_pings() > MAX_UNANSWERED_PINGS => {
                        tracing::debug!(session = self.id(), "ping flood");
                        self.out.shared.request_close(CloseRequest {
                            reason: close_reason(
                                CloseCode::Policy,
                                "ping flood: pings sent faster than the pongs are read",
                            ),
                            handshake: false,
                            drain_hub: false,
                        });
                        self.reader = None;
                        return None;
                    }
                    Message::Ping(_) if self.raw => return Some(msg),
                    Message::Pong(_) => {
                        self.out.shared.pongs.fetch_add(1, Ordering::Relaxed);
                        if self.raw {
                            return Some(msg);
                        }
                    }
                    Message::Close(ref frame) => {
                        let reason = frame
                            .clone()
                            .unwrap_or_else(|| close_reason(CloseCode::Status, ""));
                        if self.out.shared.set_reason(reason) {
                            self.out
                                .shared
                                .reason_by_peer
                                .store(true, Ordering::Release);
                        }
                        if self.raw {
                            return Some(msg);
                        }
                    }
                    Message::Ping(_) | Message::Frame(_) => {}
                },
                Some(Err(err)) => {
                    tracing::debug!(session = self.id(), error = %err, "read failed");
                    match close_code_for(&err) {
                        Some(reason) => {
                            self.out.shared.request_close(CloseRequest {
                                reason,
                                handshake: false,
                                drain_hub: false,
                            });
                            self.reader = None;
                        }
                        None => self.end(abnormal(&err.to_string())),
                    }
                    return None;
                }
            }
        }
    }

    /// The received messages as a stream (Ktor's `incoming`); it ends when the
    /// session closes.
    ///
    /// ```no_run
    /// # async fn demo(mut session: wshub::Session) {
    /// use futures_util::StreamExt;
    /// let mut incoming = session.incoming();
    /// while let Some(msg) = incoming.next().await {
    ///     println!("got {msg}");
    /// }
    /// # }
    /// ```
    pub fn incoming(&mut self) -> BoxStream<'_, Message> {
        futures_util::stream::unfold(self, |session| async move {
            let msg = session.recv().await?;
            Some((msg, session))
        })
        .boxed()
    }

    /// The stream ended: record the reason and stop the send task.
    fn end(&mut self, reason: CloseReason) {
        self.out.shared.set_reason(reason);
        self.reader = None;
        self.finished = true;
        self.out.shared.kill();
    }

    /// Queues a message for the client, waiting while the outgoing queue is full.
    ///
    /// Sending `Message::Close` starts the closing handshake, like
    /// [`Outgoing::close`].
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the session is closing or closed.
    pub async fn send(&self, msg: impl Into<Message>) -> Result<(), Error> {
        self.out.send(msg).await
    }

    /// Queues a message without waiting.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the session is closing; [`Error::QueueFull`]
    /// (handing the message back) when the outgoing queue is full.
    pub fn try_send(&self, msg: impl Into<Message>) -> Result<(), Error> {
        self.out.try_send(msg)
    }

    /// Serializes `value` to JSON and sends it as a text message (Ktor's
    /// `sendSerialized`).
    ///
    /// # Errors
    ///
    /// [`Error::Json`] if `value` cannot be serialized; [`Error::Closed`] as for
    /// [`send`](Self::send).
    pub async fn send_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        self.send(message::json(value)?).await
    }

    /// Receives the next message and parses it as JSON (Ktor's `receiveDeserialized`).
    ///
    /// A message that is not valid JSON for `T` is consumed and reported; the
    /// session stays open, so the caller may answer it and go on.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] for bad JSON, with serde's position and reason;
    /// [`Error::UnexpectedMessage`] for a control frame in a raw session;
    /// [`Error::Closed`] when the session closed first.
    pub async fn receive_json<T: DeserializeOwned>(&mut self) -> Result<T, Error> {
        match self.recv().await {
            Some(msg) => message::from_json(&msg),
            None => Err(self.out.shared.closed_error()),
        }
    }

    /// A cloneable handle for sending to this session from other tasks.
    pub fn outgoing(&self) -> Outgoing {
        self.out.clone()
    }

    /// Waits until everything sent before this call is written to the socket
    /// (Ktor's `flush`).
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the session is closed, or closes before
    /// everything queued was written (the client stopped reading, the
    /// connection failed): then some of it may never reach the client.
    pub async fn flush(&self) -> Result<(), Error> {
        self.out.flush().await
    }

    /// Closes the session (Ktor's `close(reason)`): writes what is already
    /// queued, sends a Close frame with `reason`, and waits up to
    /// [`Config::close_timeout`] for the client's answer, discarding any data
    /// that arrives meanwhile.
    ///
    /// ```no_run
    /// # async fn demo(mut session: wshub::Session) {
    /// use wshub::{close_reason, CloseCode};
    /// session.close(close_reason(CloseCode::Normal, "Client said BYE")).await;
    /// assert_eq!(session.close_reason().unwrap().code, CloseCode::Normal);
    /// # }
    /// ```
    pub async fn close(&mut self, reason: CloseReason) {
        self.out.close(reason);
        while self.recv().await.is_some() {}
    }

    /// Ends the connection now, without a closing handshake (Ktor's
    /// `terminate`). The close reason becomes 1006 "terminated" unless one was
    /// already set.
    pub fn terminate(&mut self) {
        self.end(abnormal("terminated"));
    }

    /// Why the session closed, or `None` while it is open (Ktor's `closeReason`).
    ///
    /// Set in every ending: the client's Close frame (1005 if it carried no
    /// code), the reason this side closed with (1001 on shutdown, 1002, 1007,
    /// 1009, 1011 "ping timeout", 1013 for a slow client), or 1006 when the
    /// connection dropped without a closing handshake.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.out.shared.reason()
    }

    /// Whether the session is closing or closed.
    pub fn is_closed(&self) -> bool {
        self.out.is_closed()
    }

    /// The ping period in force (`None`: no pings).
    pub fn ping_period(&self) -> Option<Duration> {
        self.out.shared.settings().ping_period
    }

    /// Changes the ping period for this session only (Ktor's `pingInterval`).
    pub fn set_ping_period(&self, period: Option<Duration>) {
        self.update_settings(|s| s.ping_period = period);
    }

    /// The pong timeout in force.
    pub fn timeout(&self) -> Duration {
        self.out.shared.settings().timeout
    }

    /// Changes the pong timeout for this session only (Ktor's `timeout`).
    pub fn set_timeout(&self, timeout: Duration) {
        self.update_settings(|s| s.timeout = timeout);
    }

    /// The largest frame this session accepts (Ktor's `maxFrameSize`), fixed
    /// when the connection is upgraded: set it per route or in the handshake
    /// hook.
    pub fn max_frame_size(&self) -> Option<usize> {
        self.out.shared.max_frame_size
    }

    /// The largest message this session accepts, fixed at upgrade like
    /// [`max_frame_size`](Self::max_frame_size).
    pub fn max_message_size(&self) -> Option<usize> {
        self.out.shared.max_message_size
    }

    fn update_settings(&self, change: impl FnOnce(&mut Settings)) {
        change(
            &mut self
                .out
                .shared
                .settings
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        // The wake-up bypasses the outgoing queue, so it works even when the
        // queue is full.
        self.out
            .shared
            .settings_changed
            .store(true, Ordering::Release);
        self.out.shared.wake.ring();
    }

    /// Runs the SharedFlow pattern: every text or binary message the client
    /// sends is published to the subscription's hub, and every hub message is
    /// forwarded to the client, until the session closes. Returns the close
    /// reason.
    ///
    /// Take the subscription before you greet the client, so that nothing
    /// published in between is missed:
    ///
    /// ```no_run
    /// # async fn demo(mut session: wshub::Session, hub: wshub::Hub) -> Result<(), wshub::Error> {
    /// let subscription = hub.subscribe();
    /// session.send("You are connected to WebSocket!").await?;
    /// let reason = session.join(subscription).await;
    /// # Ok(()) }
    /// ```
    ///
    /// The send task batches: after one hub message it writes whatever else is
    /// already waiting (up to [`Config::max_batch`]) and flushes once. The
    /// hub's [`Policy`](crate::Policy) decides what happens when this client falls behind.
    ///
    /// Once the session is closing (a Close sent or requested from any
    /// handle, a limit tripped, the server shutting down), nothing more the
    /// client sends is published: it is read and discarded until the client
    /// answers the Close.
    pub async fn join(&mut self, subscription: Subscription) -> CloseReason {
        let hub = subscription.hub().clone();
        if self.out.forward(subscription).await.is_ok() {
            // A publish waiting on a full hub (Suspend) gives way when the session ends.
            let kill = self.out.shared.kill.clone();
            let mut bucket = self.out.shared.publish_rate.map(Bucket::new);
            let mut over_limit = false;
            while let Some(msg) = self.recv().await {
                if !message::is_data(&msg) {
                    continue;
                }
                if let Some(bucket) = bucket.as_mut() {
                    if over_limit || !bucket.take() {
                        hub.record_rate_limited();
                        if bucket.limit.excess == Excess::Close && !over_limit {
                            over_limit = true;
                            tracing::debug!(session = self.id(), "publish rate limit exceeded");
                            self.out.close(close_reason(
                                CloseCode::Policy,
                                "publish rate limit exceeded",
                            ));
                        }
                        continue;
                    }
                }
                // Once a close is under way (sent, requested, or the send task
                // is closing), what the client still sends reaches nobody.
                if self.out.is_closed() {
                    continue;
                }
                tokio::select! {
                    _ = kill.cancelled() => {}
                    result = hub.publish(msg) => {
                        if let Err(err) = result {
                            tracing::debug!(session = self.id(), error = %err, "publish failed");
                        }
                    }
                }
            }
        }
        // The loop ends only when recv returned None, which always records a reason.
        self.close_reason()
            .unwrap_or_else(|| abnormal("connection ended"))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let shared = &self.out.shared;
        if self.finished {
            shared.kill();
            return;
        }
        shared.reader_gone.store(true, Ordering::Release);
        if shared.reason.get().is_none() && !shared.managed {
            // Ktor closes with NORMAL when the handler returns.
            shared.request_close(CloseRequest {
                reason: close_reason(CloseCode::Normal, ""),
                handshake: true,
                drain_hub: false,
            });
        } else {
            // A close is under way: the send task now reads the answer itself.
            shared.wake.ring();
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id())
            .field("path", &self.request.path())
            .field("peer", &self.request.peer_addr())
            .field("raw", &self.raw)
            .field("close_reason", &self.close_reason())
            .finish()
    }
}

impl Outgoing {
    /// Queues a message for the client, waiting while the queue is full.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the session is closing or closed.
    pub async fn send(&self, msg: impl Into<Message>) -> Result<(), Error> {
        let Some(msg) = self.admit(msg.into())? else {
            return Ok(());
        };
        self.shared
            .push(Command::Send(msg))
            .await
            .map_err(|_| self.shared.closed_error())
    }

    /// Queues a message without waiting.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the session is closing; [`Error::QueueFull`]
    /// (handing the message back) when the outgoing queue is full.
    pub fn try_send(&self, msg: impl Into<Message>) -> Result<(), Error> {
        let Some(msg) = self.admit(msg.into())? else {
            return Ok(());
        };
        match self.shared.try_push(Command::Send(msg)) {
            Ok(()) => Ok(()),
            Err(Refused::Full(Command::Send(msg))) => Err(Error::QueueFull(Box::new(msg))),
            Err(_) => Err(self.shared.closed_error()),
        }
    }

    /// Checks a message before it is queued: a Close frame starts the closing
    /// handshake instead (`None`), and nothing is queued once the session closes.
    fn admit(&self, msg: Message) -> Result<Option<Message>, Error> {
        if let Message::Close(frame) = msg {
            self.close(frame.unwrap_or_else(|| close_reason(CloseCode::Normal, "")));
            return Ok(None);
        }
        if self.is_closed() {
            return Err(self.shared.closed_error());
        }
        Ok(Some(msg))
    }

    /// Serializes `value` to JSON and queues it as a text message.
    ///
    /// # Errors
    ///
    /// As [`Session::send_json`].
    pub async fn send_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        self.send(message::json(value)?).await
    }

    /// Waits until everything queued before this call is written.
    ///
    /// # Errors
    ///
    /// As [`Session::flush`].
    pub async fn flush(&self) -> Result<(), Error> {
        let (done, written) = oneshot::channel();
        if self.is_closed() || self.shared.push(Command::Flush(done)).await.is_err() {
            return Err(self.shared.closed_error());
        }
        // The send task answers once what came before is written; it drops
        // the answer if the session ends first.
        written.await.map_err(|_| self.shared.closed_error())
    }

    /// Has the send task forward every message of `subscription` to the
    /// client, under its hub's [`Policy`](crate::Policy), until [`unforward`](Self::unforward)
    /// or the session ends. A session forwards any number of subscriptions:
    /// its send task takes them in turn, so a busy hub does not starve the
    /// others, and each hub counts its own deliveries, lags and disconnects.
    /// ([`Session::join`] forwards one and publishes what the client sends.)
    ///
    /// The subscription is handed over in order with [`send`](Self::send):
    /// what was queued before it is written before any of its messages.
    ///
    /// ```no_run
    /// # async fn demo(session: wshub::Session, news: wshub::Hub, sport: wshub::Hub) -> Result<(), wshub::Error> {
    /// let out = session.outgoing();
    /// let _news = out.forward(news.subscribe()).await?;
    /// let sport = out.forward(sport.subscribe()).await?;
    /// // ... later: no more sport for this client.
    /// out.unforward(sport).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the session is closing or closed (the
    /// subscription is dropped).
    pub async fn forward(&self, subscription: Subscription) -> Result<ForwardId, Error> {
        self.forward_from(subscription, None).await
    }

    /// [`forward`](Self::forward) for a topic, starting at `start`.
    pub(crate) async fn forward_from(
        &self,
        sub: Subscription,
        topic: Option<TopicStart>,
    ) -> Result<ForwardId, Error> {
        let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
        let new = Box::new(NewForward { sub, key, topic });
        if self.is_closed() || self.shared.push(Command::Forward(new)).await.is_err() {
            return Err(self.shared.closed_error());
        }
        Ok(ForwardId(key))
    }

    /// Stops forwarding a subscription, dropping it: nothing of it is
    /// written after what was queued before this call.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the session is closing or closed (its
    /// subscriptions are dropped then anyway).
    pub async fn unforward(&self, id: ForwardId) -> Result<(), Error> {
        if self.shared.push(Command::Unforward(id.0)).await.is_err() {
            return Err(self.shared.closed_error());
        }
        Ok(())
    }

    /// Starts the closing handshake: what is already queued is written, then a
    /// Close frame with `reason`. Does not wait; the session's `recv` ends when
    /// the client answers or [`Config::close_timeout`] passes.
    pub fn close(&self, reason: CloseReason) {
        self.shared.request_close(CloseRequest {
            reason,
            handshake: true,
            drain_hub: false,
        });
    }

    /// Whether the session is closing or closed.
    pub fn is_closed(&self) -> bool {
        self.shared.reason.get().is_some() || self.shared.kill.is_cancelled()
    }

    /// Why the session closed, or `None` while it is open.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.reason()
    }

    /// Ends the connection when the returned guard is dropped.
    pub(crate) fn kill_on_drop(&self) -> KillOnDrop {
        KillOnDrop(self.shared.clone())
    }

    /// Closes the session for a server shutdown: 1001, after what the hub
    /// already holds for it.
    pub(crate) fn close_for_shutdown(&self) {
        self.shared.request_close(CloseRequest {
            reason: close_reason(CloseCode::Away, "server shutting down"),
            handshake: true,
            drain_hub: true,
        });
    }

    /// The id of the session this handle sends to.
    pub fn session_id(&self) -> u64 {
        self.shared.id
    }

    /// Turns the handle into a `futures` [`Sink`](futures_util::Sink).
    pub fn into_sink(self) -> impl futures_util::Sink<Message, Error = Error> + Send {
        futures_util::sink::unfold(self, |out, msg: Message| async move {
            out.send(msg).await?;
            Ok::<_, Error>(out)
        })
    }
}

impl fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outgoing")
            .field("session", &self.shared.id)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The ping timer and the pong deadline of one session.
struct Ping {
    interval: Option<Interval>,
    period: Option<Duration>,
    /// Set when a ping goes out with none unanswered; boxed, as most of a
    /// session's life has no ping waiting for its pong.
    deadline: Option<Pin<Box<Sleep>>>,
    pongs_at_ping: u64,
    sent: u64,
}

impl Ping {
    fn new(settings: Settings) -> Ping {
        let mut ping = Ping {
            interval: None,
            period: None,
            deadline: None,
            pongs_at_ping: 0,
            sent: 0,
        };
        ping.apply(settings);
        ping
    }

    fn apply(&mut self, settings: Settings) {
        if self.period == settings.ping_period {
            return;
        }
        self.period = settings.ping_period;
        self.interval = settings.ping_period.filter(|p| !p.is_zero()).map(|p| {
            let mut interval = tokio::time::interval_at(Instant::now() + p, p);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            interval
        });
        if self.interval.is_none() {
            self.deadline = None;
        }
    }

    /// Ready when a ping is due.
    fn poll_tick(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.interval.as_mut() {
            Some(interval) => interval.poll_tick(cx).map(drop),
            None => Poll::Pending,
        }
    }

    /// Ready when the pong deadline has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.deadline.as_mut() {
            Some(deadline) => deadline.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

/// What woke the send task.
enum Wake {
    /// The signal: a kill, a close request, new settings or a command.
    Rung,
    /// A hub message (or a report from the hub), and the batch it started.
    Hub(Started),
    PongDeadline,
    Idle,
    Ping,
}

/// A batch in progress.
#[derive(Default)]
struct Batch {
    /// Messages taken so far (hub items count even when their policy
    /// writes nothing for them).
    written: usize,
    /// `Outgoing::flush` callers to answer once the batch is flushed.
    flush_waiters: Vec<oneshot::Sender<()>>,
    /// `max_batch` cut the batch short.
    cut: bool,
}

/// A batch just started: `None` once it is written and flushed, else what
/// it waits for.
type Started = Result<Option<(Batch, Blocked)>, Stop>;

/// What a batch waits for when the socket does not take it at once.
enum Blocked {
    /// Room in the write buffer for this message.
    Room(Message),
    /// The flush that ends the batch.
    Flush,
}

/// Why the send task's main loop stopped.
enum Stop {
    /// The connection must end now, without writing anything more.
    Kill,
    /// Close the connection with this request.
    Close(CloseRequest),
    /// The socket failed; the reason is recorded.
    Broken(CloseReason),
}

/// The send task: owns the write side of one session.
struct SendTask {
    sink: Transport,
    shared: Arc<Shared>,
    subs: Forwards,
    send_timeout: Duration,
    close_timeout: Duration,
    max_batch: usize,
    ping: Ping,
    /// Boxed: most sessions have none, and the send task lives as long as they do.
    idle: Option<Box<Idle>>,
    /// The session's counts for [`Config::metrics`], if any.
    metrics: Option<Box<SessionMeter>>,
}

/// The idle timer of a session with [`Config::idle_timeout`]. The timer is
/// set once and only moved when it fires, so a busy session costs no timer
/// work per message.
struct Idle {
    timeout: Duration,
    /// When the send task last wrote a data message.
    wrote: Instant,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Idle {
    fn new(timeout: Duration) -> Idle {
        let now = Instant::now();
        Idle {
            timeout,
            wrote: now,
            timer: Box::pin(sleep_until(now + timeout)),
        }
    }
}

/// Ready once the session has carried no data message for its idle timeout;
/// never if it has none. A poll function rather than an `async fn`, so the
/// send task's select holds two references and not a whole future.
fn poll_idle(idle: &mut Option<Box<Idle>>, shared: &Shared, cx: &mut Context<'_>) -> Poll<()> {
    let Some(idle) = idle else {
        return Poll::Pending;
    };
    loop {
        if idle.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let deadline = idle.wrote.max(shared.last_heard()) + idle.timeout;
        if deadline <= Instant::now() {
            return Poll::Ready(());
        }
        idle.timer.as_mut().reset(deadline);
    }
}

impl Drop for SendTask {
    fn drop(&mut self) {
        // Ended or aborted: senders must not wait for a task that is gone.
        self.shared.queue.close();
    }
}

impl SendTask {
    async fn run(mut self) {
        let stop = self.serve().await;
        match stop {
            Stop::Kill => {}
            Stop::Broken(reason) => {
                self.shared.set_reason(reason);
            }
            // Boxed, as below: rare or bursty paths, kept out of the idle task's size.
            Stop::Close(request) => Box::pin(self.close(request)).await,
        }
        self.subs.clear();
        self.shared.kill();
        // Tell the peer promptly (FIN) even if the handler still holds the session.
        let _ = timeout(
            Duration::from_millis(100),
            poll_fn(|cx| self.sink.poll_shutdown(cx)),
        )
        .await;
        let reason = self
            .shared
            .reason()
            .unwrap_or_else(|| abnormal("connection lost"));
        let by_peer = self.shared.reason_by_peer.load(Ordering::Acquire);
        if let Some(metrics) = self.metrics.as_deref_mut() {
            metrics.closed(reason.code, by_peer);
        }
        tracing::debug!(
            code = u16::from(reason.code),
            reason = %reason.reason,
            by = match (by_peer, reason.code) {
                (true, _) => "client",
                (false, CloseCode::Abnormal) => "nobody (no close frame)",
                (false, _) => "server",
            },
            "session closed"
        );
    }

    async fn serve(&mut self) -> Stop {
        let mut fast_runs = 0;
        loop {
            // Fast path: hub messages are already waiting and nothing else
            // was rung. It skips polling (and re-arming) every other branch,
            // which is most of a wake-up's cost. Every `max_batch` runs the
            // timers go first, so pings and commands are never starved by a
            // busy hub.
            let fast = if fast_runs < self.max_batch && !self.shared.wake.is_rung() {
                poll_fn(|cx| {
                    let item = self.subs.try_next();
                    Poll::Ready(item.map(|item| self.start_batch(cx, None, Some(item))))
                })
                .await
            } else {
                None
            };
            // A batch started here or on a wake-up: it has gone out, or it
            // waits for the socket.
            let started = if let Some(started) = fast {
                fast_runs += 1;
                started
            } else {
                let timers_first = fast_runs >= self.max_batch;
                fast_runs = 0;
                match poll_fn(|cx| self.poll_wake(cx, timers_first)).await {
                    // Kills, close requests (server shutdown included), new
                    // settings and queued commands all ring one signal, so an
                    // idle send task waits on one atomic, one timer and the hub.
                    Wake::Rung => {
                        if self.shared.killed.load(Ordering::Acquire) {
                            return Stop::Kill;
                        }
                        if self.shared.close_pending.load(Ordering::Acquire) {
                            if let Some(request) = self.shared.take_close_request() {
                                return Stop::Close(request);
                            }
                        }
                        if self.shared.settings_changed.swap(false, Ordering::AcqRel) {
                            self.ping.apply(self.shared.settings());
                        }
                        let queued = poll_fn(|cx| {
                            let command = self.shared.queue.pop();
                            Poll::Ready(command.map(|c| self.start_batch(cx, Some(c), None)))
                        })
                        .await;
                        match queued {
                            Some(started) => started,
                            None => continue,
                        }
                    }
                    Wake::Hub(started) => started,
                    Wake::PongDeadline => {
                        if self.shared.pongs.load(Ordering::Relaxed) > self.ping.pongs_at_ping {
                            self.ping.deadline = None;
                            continue;
                        }
                        tracing::debug!("no pong within the timeout");
                        return Stop::Close(CloseRequest {
                            reason: close_reason(CloseCode::Error, "ping timeout"),
                            handshake: false,
                            drain_hub: false,
                        });
                    }
                    Wake::Idle => {
                        tracing::debug!("idle timeout");
                        return Stop::Close(CloseRequest {
                            reason: close_reason(CloseCode::Away, "idle timeout"),
                            handshake: true,
                            drain_hub: false,
                        });
                    }
                    Wake::Ping => {
                        if let Err(stop) = Box::pin(self.send_ping()).await {
                            return stop;
                        }
                        continue;
                    }
                }
            };
            match started {
                Ok(None) => {}
                // Boxed: a rare path, kept out of the send task's own size.
                Ok(Some((batch, blocked))) => {
                    if let Err(stop) = Box::pin(self.wait_out(batch, blocked)).await {
                        return stop;
                    }
                }
                Err(stop) => return stop,
            }
        }
    }

    /// Waits for the next thing to do. The signal (kills and close requests
    /// among what rings it) always comes first. Then the hub: a hub message
    /// is what usually wakes a send task, and taking it before the timers
    /// leaves them alone on the way (they were armed when the task went to
    /// sleep, and fire on their own). With `timers_first`, after `max_batch`
    /// runs of a hub that was never empty, the timers are looked at before
    /// the hub, so a busy hub cannot starve pings and timeouts.
    fn poll_wake(&mut self, cx: &mut Context<'_>, timers_first: bool) -> Poll<Wake> {
        if self.shared.wake.take() {
            return Poll::Ready(Wake::Rung);
        }
        if !timers_first {
            if let Poll::Ready(wake) = self.poll_hub(cx) {
                return Poll::Ready(wake);
            }
        }
        if self.shared.wake.poll_rung(cx).is_ready() {
            return Poll::Ready(Wake::Rung);
        }
        if self.ping.poll_deadline(cx).is_ready() {
            return Poll::Ready(Wake::PongDeadline);
        }
        if poll_idle(&mut self.idle, &self.shared, cx).is_ready() {
            return Poll::Ready(Wake::Idle);
        }
        if self.ping.poll_tick(cx).is_ready() {
            return Poll::Ready(Wake::Ping);
        }
        if timers_first {
            return self.poll_hub(cx);
        }
        Poll::Pending
    }

    /// Ready with the batch a hub message started, if one is waiting.
    fn poll_hub(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        self.subs
            .poll_next(cx)
            .map(|item| Wake::Hub(self.start_batch(cx, None, Some(item))))
    }

    /// Writes one item, then whatever else is ready (up to `max_batch`), then
    /// flushes once. Most batches never wait for the socket: they run in one
    /// go, within the poll that took their first item, and no future of
    /// theirs is kept; one that must wait is handed back, to go on in
    /// [`wait_out`](Self::wait_out).
    fn start_batch(
        &mut self,
        cx: &mut Context<'_>,
        command: Option<Command>,
        forwarded: Option<(usize, Item)>,
    ) -> Started {
        // Under Suspend, a batch that starts with a hub message looks at how
        // far behind this subscriber is: now, after the flush that ended the
        // last batch, the publishers have refilled what it took.
        if forwarded.is_some() && self.subs.stalled() {
            return Err(self.stalled());
        }
        let mut batch = Batch::default();
        match self.fill(cx, &mut batch, command, forwarded)? {
            None => {
                self.finish(batch);
                Ok(None)
            }
            Some(blocked) => Ok(Some((batch, blocked))),
        }
    }

    /// Writes the items of a batch for as long as the socket takes them
    /// without waiting, then flushes. Returns what the socket made it wait
    /// for, if anything; `None` once the batch is written and flushed.
    fn fill(
        &mut self,
        cx: &mut Context<'_>,
        batch: &mut Batch,
        mut command: Option<Command>,
        mut forwarded: Option<(usize, Item)>,
    ) -> Result<Option<Blocked>, Stop> {
        loop {
            let msg = if let Some(cmd) = command.take() {
                match cmd {
                    Command::Send(msg) => {
                        batch.written += 1;
                        Some(msg)
                    }
                    Command::Flush(done) => {
                        batch.flush_waiters.push(done);
                        None
                    }
                    Command::Forward(new) => {
                        self.subs.add(*new);
                        None
                    }
                    Command::Unforward(key) => {
                        self.subs.remove(key);
                        None
                    }
                }
            } else if let Some((at, item)) = forwarded.take() {
                batch.written += 1;
                self.forwarded(at, item)?
            } else {
                None
            };
            if let Some(msg) = msg {
                if let Some(msg) = self.try_write(cx, msg)? {
                    return Ok(Some(Blocked::Room(msg)));
                }
            }
            if batch.written >= self.max_batch {
                batch.cut = true;
                break;
            }
            // Take what is already waiting: the handler's queue first, then the hub.
            if let Some(cmd) = self.shared.queue.pop() {
                command = Some(cmd);
                continue;
            }
            match self.subs.try_next() {
                Some(item) => forwarded = Some(item),
                None => break,
            }
        }
        match self.sink.poll_flush(cx) {
            Poll::Ready(Ok(())) => Ok(None),
            Poll::Ready(Err(err)) => Err(self.broken(err)),
            Poll::Pending => Ok(Some(Blocked::Flush)),
        }
    }

    /// Queues `msg` if the write buffer has room now; hands it back if not.
    fn try_write(&mut self, cx: &mut Context<'_>, msg: Message) -> Result<Option<Message>, Stop> {
        match self.sink.poll_room(cx, &msg) {
            Poll::Ready(Ok(())) => {
                self.sink.start_send(msg).map_err(|err| self.broken(err))?;
                Ok(None)
            }
            Poll::Ready(Err(err)) => Err(self.broken(err)),
            Poll::Pending => Ok(Some(msg)),
        }
    }

    /// The rest of a batch the socket made wait: waits (for at most
    /// `send_timeout` without progress), then goes on filling.
    async fn wait_out(&mut self, mut batch: Batch, mut blocked: Blocked) -> Result<(), Stop> {
        loop {
            match blocked {
                Blocked::Room(msg) => self.write(msg).await?,
                Blocked::Flush => {
                    self.flush().await?;
                    self.finish(batch);
                    return Ok(());
                }
            }
            match poll_fn(|cx| Poll::Ready(self.fill(cx, &mut batch, None, None))).await? {
                Some(next) => blocked = next,
                None => {
                    self.finish(batch);
                    return Ok(());
                }
            }
        }
    }

    /// After a batch's flush: metrics, the idle clock, flush waiters.
    fn finish(&mut self, batch: Batch) {
        self.count_flush(false);
        if batch.written > 0 {
            if let Some(idle) = self.idle.as_mut() {
                idle.wrote = Instant::now();
            }
        }
        for done in batch.flush_waiters {
            let _ = done.send(());
        }
        if batch.cut {
            // `max_batch` may have left commands behind: come back for them
            // (queued commands ring only once, when they are queued).
            self.shared.wake.ring();
        }
    }

    /// Metrics after a flush: the delivery latency of the hub messages it
    /// wrote, and the session's counts added to the shared ones now and
    /// then, or now if `hand_in` (at a ping: a session that has gone quiet
    /// is then at most a ping period behind in a scrape).
    fn count_flush(&mut self, hand_in: bool) {
        let timed = self.subs.iter_mut().any(|fwd| {
            fwd.latency
                .as_deref()
                .is_some_and(|r| hand_in || r.has_queued())
        });
        if !timed && self.metrics.is_none() {
            return;
        }
        let now = now_nanos();
        for recorder in self
            .subs
            .iter_mut()
            .filter_map(|fwd| fwd.latency.as_deref_mut())
        {
            recorder.written(now);
            if hand_in {
                recorder.merge(now);
            }
        }
        if let Some(metrics) = self.metrics.as_deref_mut() {
            if hand_in {
                metrics.sync(now);
            } else {
                metrics.maybe_sync(now);
            }
        }
    }

    /// What to write for one item of the subscription at `at`, applying
    /// its policy to what the hub reports: a message, nothing, or a stop.
    /// Not async: a batch runs without a future of its own until the socket
    /// makes it wait.
    fn forwarded(&mut self, at: usize, item: Item) -> Result<Option<Message>, Stop> {
        let Some(fwd) = self.subs.get(at) else {
            return Ok(None);
        };
        let result = match item {
            Item::Backlog(msg) => return Ok(Some(msg)),
            Item::Live(result) => result,
        };
        match result {
            Ok(msg) => {
                if let Some(recorder) = fwd.latency.as_deref_mut() {
                    recorder.queued(fwd.sub.stamp());
                }
                Ok(Some(msg))
            }
            Err(RecvError::Lagged(skipped)) => match fwd.policy.on_lag() {
                OnLag::SkipAhead => {
                    tracing::debug!(skipped, "subscriber lagged; skipping ahead");
                    Ok(fwd.lag_notice.as_ref().map(|notice| notice(skipped)))
                }
                OnLag::Disconnect => {
                    tracing::debug!(skipped, "subscriber lagged; disconnecting");
                    fwd.sub.hub().record_disconnect();
                    Err(Stop::Close(CloseRequest {
                        reason: close_reason(
                            CloseCode::Again,
                            format!("lagged behind the hub by {skipped} messages"),
                        ),
                        handshake: true,
                        drain_hub: false,
                    }))
                }
            },
            Err(RecvError::Closed) => Err(Stop::Close(CloseRequest {
                reason: close_reason(CloseCode::Away, "hub closed"),
                handshake: true,
                drain_hub: false,
            })),
        }
    }

    async fn send_ping(&mut self) -> Result<(), Stop> {
        self.ping.sent += 1;
        if self.ping.deadline.is_none() {
            self.ping.pongs_at_ping = self.shared.pongs.load(Ordering::Relaxed);
            let deadline = Instant::now() + self.shared.settings().timeout;
            self.ping.deadline = Some(Box::pin(sleep_until(deadline)));
        }
        let payload = Bytes::copy_from_slice(&self.ping.sent.to_be_bytes());
        self.write(Message::Ping(payload)).await?;
        self.flush().await?;
        self.count_flush(true);
        Ok(())
    }

    /// Queues one message once the write buffer has room, giving up after
    /// `send_timeout` without progress. A Close frame goes through
    /// tungstenite, which needs the buffer empty for it.
    async fn write(&mut self, msg: Message) -> Result<(), Stop> {
        let sink = &self.sink;
        let room = poll_fn(|cx| sink.poll_room(cx, &msg));
        match until_stuck(self.send_timeout, sink.meter(), &mut self.subs, room).await {
            Waited::Done(Ok(())) => {}
            Waited::Done(Err(err)) => return Err(self.broken(err)),
            Waited::Stuck => return Err(self.stuck()),
            Waited::Stalled => return Err(self.stalled()),
        }
        self.sink.start_send(msg).map_err(|err| self.broken(err))
    }

    /// Writes everything queued, giving up after `send_timeout` without progress.
    async fn flush(&mut self) -> Result<(), Stop> {
        let sink = &self.sink;
        let flushed = poll_fn(|cx| sink.poll_flush(cx));
        match until_stuck(self.send_timeout, sink.meter(), &mut self.subs, flushed).await {
            Waited::Done(Ok(())) => {}
            Waited::Done(Err(err)) => return Err(self.broken(err)),
            Waited::Stuck => return Err(self.stuck()),
            Waited::Stalled => return Err(self.stalled()),
        }
        Ok(())
    }

    fn broken(&self, err: WsError) -> Stop {
        tracing::debug!(error = %err, "write failed");
        match err {
            WsError::ConnectionClosed | WsError::AlreadyClosed => Stop::Kill,
            err => Stop::Broken(abnormal(&err.to_string())),
        }
    }

    /// The client kept a `Suspend` hub's buffer full for its stall timeout:
    /// free its place, so the publishers waiting on it go on.
    fn stalled(&mut self) -> Stop {
        tracing::debug!("kept the hub full; closing slow client");
        self.cut_off("too slow for the hub")
    }

    /// The client accepted nothing for `send_timeout`: free its place in the hub.
    fn stuck(&mut self) -> Stop {
        tracing::debug!("send timed out; closing slow client");
        self.cut_off("send timeout")
    }

    /// Frees the session's place in the hub (counted as a disconnect) and
    /// closes it with 1013 and `why`, without waiting for the client's answer.
    fn cut_off(&mut self, why: &'static str) -> Stop {
        for fwd in self.subs.take() {
            fwd.sub.hub().record_disconnect();
        }
        Stop::Close(CloseRequest {
            reason: close_reason(CloseCode::Again, why),
            handshake: false,
            drain_hub: false,
        })
    }

    /// Performs a close: queued data, then the Close frame, then (for a
    /// handshake) the client's answer.
    async fn close(&mut self, request: CloseRequest) {
        self.shared.set_reason(request.reason.clone());
        let mut pending = Vec::new();
        let mut flush_waiters = Vec::new();
        while let Some(command) = self.shared.queue.pop() {
            match command {
                Command::Send(msg) => pending.push(msg),
                // A join queued behind other sends: its hub messages count too.
                Command::Forward(new) => self.subs.add(*new),
                Command::Unforward(key) => {
                    self.subs.remove(key);
                }
                Command::Flush(done) => flush_waiters.push(done),
            }
        }
        if request.drain_hub {
            for mut fwd in self.subs.take() {
                while let Some(item) = fwd.try_next() {
                    match item {
                        Item::Backlog(msg) | Item::Live(Ok(msg)) => pending.push(msg),
                        Item::Live(Err(_)) => break,
                    }
                }
            }
        }
        // Free the hub slots before a possibly slow final write.
        self.subs.clear();
        let reason = request.reason;
        // A client that keeps reading gets everything queued before the Close
        // frame (each write may stall for `send_timeout`); a failing connection
        // gets `close_timeout` for all of it.
        let handshake = request.handshake;
        let close_timeout = self.close_timeout;
        let send_close = async {
            for msg in pending {
                self.write(msg).await?;
            }
            self.write(Message::Close(Some(reason))).await?;
            self.flush().await
        };
        let written = if handshake {
            send_close.await.is_ok()
        } else {
            matches!(timeout(close_timeout, send_close).await, Ok(Ok(())))
        };
        if written {
            for done in flush_waiters {
                let _ = done.send(());
            }
        }
        if !written {
            tracing::debug!("close frame not written");
            return;
        }
        if !handshake {
            return;
        }
        // Wait for the client's Close frame: the session's reader sees it and
        // cancels `kill`; if the session is gone, read it here.
        let deadline = Instant::now() + close_timeout;
        loop {
            if self.shared.reader_gone.load(Ordering::Acquire) {
                let drain = async { while let Some(Ok(_)) = self.sink.next().await {} };
                let _ = tokio::time::timeout_at(deadline, drain).await;
                return;
            }
            tokio::select! {
                _ = self.shared.kill.cancelled() => return,
                _ = sleep_until(deadline) => return,
                _ = self.shared.wake.rung() => {}
            }
        }
    }
}

/// How a write that had to wait ended.
enum Waited<T> {
    Done(T),
    /// The socket accepted no byte for `send_timeout`.
    Stuck,
    /// Meanwhile the subscriber kept its `Suspend` hub full for too long.
    Stalled,
}

/// Runs `write` until it finishes, until `patience` passes without the
/// socket accepting a byte, or until the subscription (if any) has kept
/// its `Suspend` hub full for the hub's stall timeout.
async fn until_stuck<F: std::future::Future>(
    patience: Duration,
    meter: &Meter,
    subs: &mut Forwards,
    write: F,
) -> Waited<F::Output> {
    tokio::pin!(write);
    // Most writes finish at once: they need no timer.
    if let Poll::Ready(output) = poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
        return Waited::Done(output);
    }
    let tick = match subs.waiting() {
        Some(check) => patience.min(check),
        None => patience,
    };
    let mut seen = meter.written();
    let mut progress = Instant::now();
    loop {
        match timeout(tick, &mut write).await {
            Ok(output) => return Waited::Done(output),
            Err(_) => {
                let now = meter.written();
                if now != seen {
                    seen = now;
                    progress = Instant::now();
                } else if progress.elapsed() >= patience {
                    return Waited::Stuck;
                }
                if subs.stalled() {
                    return Waited::Stalled;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::error::CapacityError;

    #[test]
    fn read_errors_map_to_rfc_close_codes() {
        let too_big = WsError::Capacity(CapacityError::MessageTooLong {
            size: 10,
            max_size: 5,
        });
        assert_eq!(close_code_for(&too_big).unwrap().code, CloseCode::Size);
        let bad_rsv = WsError::Protocol(ProtocolError::NonZeroReservedBits);
        assert_eq!(close_code_for(&bad_rsv).unwrap().code, CloseCode::Protocol);
        let reset = WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake);
        assert!(close_code_for(&reset).is_none());
        let io = WsError::Io(std::io::Error::other("boom"));
        assert!(close_code_for(&io).is_none());
    }

    #[test]
    fn close_reasons_are_cut_to_fit_a_control_frame() {
        let long = close_reason(CloseCode::Normal, "é".repeat(100));
        let cut = fit_control_frame(long);
        assert!(cut.reason.len() <= MAX_CLOSE_REASON, "{}", cut.reason.len());
        assert_eq!(cut.reason.len(), 122, "cut at a character boundary");
        assert_eq!(cut.code, CloseCode::Normal);
        let short = close_reason(CloseCode::Away, "bye");
        assert_eq!(fit_control_frame(short.clone()), short);
    }
}
