//! Options with documented defaults: [`Config`] for sessions and the server,
//! [`HubConfig`] for a hub.
//!
//! Both follow one shape: `Default` gives the documented defaults and by-value
//! setters change one knob each.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::message::Message;
use crate::metrics::Metrics;
use crate::policy::Policy;

/// WebSocket options for sessions (Ktor's `install(WebSockets) { ... }`).
///
/// A [`Server`](crate::Server) applies one `Config` to every session; a route
/// may carry its own, and the handshake hook may adjust it per connection.
///
/// ```
/// use std::time::Duration;
/// let config = wshub::Config::default()
///     .ping_period(Some(Duration::from_secs(15)))
///     .timeout(Duration::from_secs(15))
///     .max_message_size(Some(64 * 1024));
/// assert_eq!(config.ping_period, Some(Duration::from_secs(15)));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// How often the server pings the client. `None` turns pings off.
    ///
    /// Default: 30 s. Pings find peers that vanished without a FIN (a laptop
    /// lid closed, a NAT entry expired); without them such a session lives
    /// until the kernel gives up on the TCP connection, which can take hours.
    /// Shorter periods find them sooner at the cost of more idle traffic.
    pub ping_period: Option<Duration>,
    /// How long to wait for the pong that answers a ping before closing the
    /// session with 1011 "ping timeout".
    ///
    /// Default: 15 s (Ktor's default).
    pub timeout: Duration,
    /// How long a client's socket may accept no bytes at all, while the
    /// session has something to write, before the session is closed with 1013
    /// "send timeout" and its subscription freed.
    ///
    /// Default: 5 s. This frees what a client that has stopped reading holds
    /// (its write buffer, its place in the hub), under every policy; under
    /// [`Policy::Suspend`], [`HubConfig::stall_timeout`] bounds how long
    /// publishers wait for a slow client, stuck or not. Longer values are
    /// kinder to clients on bad networks and keep a dead client's memory
    /// longer.
    ///
    /// A client that keeps reading, however slowly, is never cut off by it:
    /// on Linux wshub lets the kernel hold at most 16 KiB unsent per
    /// connection (`TCP_NOTSENT_LOWAT`, on the connections [`Server`]
    /// accepts), so the socket takes more bytes as soon as the client has
    /// read some, rather than once megabytes of buffer have drained. (With
    /// [`Session::from_upgraded`](crate::Session::from_upgraded) over a socket
    /// of your own, set that option on it.) The stuck client itself rarely
    /// sees the 1013: its socket is full, so it usually sees the connection
    /// end.
    ///
    /// [`Server`]: crate::Server
    pub send_timeout: Duration,
    /// How long a session may carry no message, in either direction, before
    /// it is closed with 1001 "idle timeout"; `None` for no limit.
    ///
    /// Default: `None`. Text and binary messages count, in both directions
    /// (a client that only listens to a busy hub is not idle); pings and pongs
    /// do not, so this is the option that frees connections that are alive
    /// but unused, which [`ping_period`](Self::ping_period) never closes. Set
    /// it where clients are expected to talk, or where a quiet hub should not
    /// hold sessions for ever; a client that wants to stay may send a small
    /// message (a heartbeat) more often than this.
    pub idle_timeout: Option<Duration>,
    /// How long to wait for the client's answer to a Close frame before the
    /// TCP connection is dropped.
    ///
    /// Default: 2 s.
    pub close_timeout: Duration,
    /// How long a client may take to send its HTTP upgrade request.
    ///
    /// Default: 10 s. Bounds slow-header attacks (slowloris).
    pub handshake_timeout: Duration,
    /// The largest frame payload a client may send, in bytes; `None` for no limit.
    /// A larger frame closes the session with 1009.
    ///
    /// Default: 1 MiB (tungstenite's is 16 MiB). Raise it for file transfer.
    pub max_frame_size: Option<usize>,
    /// The largest message (all fragments together) a client may send, in
    /// bytes; `None` for no limit. A larger one closes the session with 1009.
    ///
    /// Default: 1 MiB (tungstenite's is 64 MiB).
    pub max_message_size: Option<usize>,
    /// The read buffer each connection allocates up front, in bytes.
    ///
    /// Default: 512 bytes (tungstenite's is 128 KiB, which is 1.3 GB at
    /// 10,000 connections). The buffer is allocated up front and filled in
    /// full on every read, so it is most of an idle connection's memory.
    /// Larger messages still arrive whole, but each read takes at most this
    /// many bytes: raise it (to 4–64 KiB) where clients upload large
    /// messages, at that cost per connection. A buffer grown for a large
    /// frame keeps its size.
    pub read_buffer_size: usize,
    /// The write buffer's size: how many bytes of outgoing frames may wait
    /// for the socket before the send task stops queuing more.
    ///
    /// Default: 16 KiB. `0` writes every frame at once (one syscall each).
    /// Frames are gathered while the socket takes them and written together
    /// (one vectored write for a batch). A payload over 1 KiB is not copied
    /// into the buffer: it is written from the message's own shared bytes, so
    /// a broadcast costs each subscriber a frame header and a reference,
    /// however large the message. What one connection's write buffer holds
    /// is therefore at most this, plus one frame header and one payload of at
    /// most 1 KiB copied, plus the 1 KiB of pongs and Close frames
    /// tungstenite may hold while the buffer is full; and a client that keeps
    /// sending pings while not reading their pongs is closed with 1008
    /// "ping flood" after 32 of them.
    pub write_buffer_size: usize,
    /// How many messages a session's own outgoing queue (the one
    /// [`Session::send`](crate::Session::send) fills) holds before `send` waits.
    ///
    /// Default: 64. Hub messages do not go through this queue.
    pub outgoing_capacity: usize,
    /// How many messages the send task writes before it flushes.
    ///
    /// Default: 64. After one message the send task keeps taking whatever is
    /// already waiting, up to this many, then flushes once.
    pub max_batch: usize,
    /// The subprotocols (`Sec-WebSocket-Protocol`) the server may select,
    /// besides the route's own ([`Server::pubsub`](crate::Server::pubsub)
    /// selects `wshub.v1`). The first one the client offers, in the
    /// client's order, is selected; a client that offers none of them is
    /// still accepted, with none selected (RFC 6455 §4.2.2 leaves the
    /// client to decide whether to go on).
    ///
    /// Default: none.
    pub subprotocols: Vec<String>,
    /// How fast one client may publish to the hub through
    /// [`Session::join`](crate::Session::join); `None` for no limit.
    ///
    /// Default: `None`, as in Ktor: one client can then publish as fast as
    /// the hub takes messages (and, under `Suspend`, as fast as the slowest
    /// subscriber reads). Set a [`RateLimit`] where clients are not trusted.
    pub publish_rate: Option<RateLimit>,
    /// Where the session counts itself for Prometheus: open sessions, close
    /// codes, bytes read and written.
    ///
    /// Default: `None`, no counting. [`Server::metrics`](crate::Server::metrics)
    /// counts the sessions of a server whose config has none here. The
    /// cost is one clock read per flush and a few shared counters updated
    /// once a second or so per session (see [`Metrics`]).
    pub metrics: Option<Metrics>,
}

/// A per-connection token bucket on publishing: `per_second` messages a
/// second on average, bursts of up to `burst`.
///
/// Every data message a client sends while joined takes a token; a message
/// that finds none is excess, counted in
/// [`HubStats::rate_limited`](crate::HubStats::rate_limited), and handled as
/// [`excess`](Self::excess) says.
///
/// ```
/// use wshub::{Config, Excess, RateLimit};
/// let config = Config::default().publish_rate(Some(RateLimit::new(20, 40)));
/// let lenient = RateLimit::new(20, 40).on_excess(Excess::Drop);
/// # let _ = (config, lenient);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Tokens added per second.
    pub per_second: u32,
    /// The most tokens the bucket holds (`0` is taken as 1); a client that
    /// was quiet may send this many at once.
    pub burst: u32,
    /// What an excess message does.
    pub excess: Excess,
}

impl RateLimit {
    /// `per_second` messages a second, bursts of `burst`; excess closes the
    /// session.
    pub fn new(per_second: u32, burst: u32) -> RateLimit {
        RateLimit {
            per_second,
            burst,
            excess: Excess::Close,
        }
    }

    /// Sets [`excess`](Self::excess).
    #[must_use]
    pub fn on_excess(mut self, excess: Excess) -> RateLimit {
        self.excess = excess;
        self
    }
}

/// What a message over the [`RateLimit`] does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Excess {
    /// The session is closed with 1008 (Policy Violation) "publish rate
    /// limit exceeded"; nothing the client sends after it is published. The
    /// default: the client learns why, and nothing is lost without a word.
    #[default]
    Close,
    /// The message is not published; the session stays open. The client is
    /// not told, so use it where losing excess messages is the point.
    Drop,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ping_period: Some(Duration::from_secs(30)),
            timeout: Duration::from_secs(15),
            send_timeout: Duration::from_secs(5),
            idle_timeout: None,
            close_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(10),
            max_frame_size: Some(1 << 20),
            max_message_size: Some(1 << 20),
            read_buffer_size: 512,
            write_buffer_size: 16 << 10,
            outgoing_capacity: 64,
            max_batch: 64,
            subprotocols: Vec::new(),
            publish_rate: None,
            metrics: None,
        }
    }
}

impl Config {
    /// Sets [`ping_period`](Self::ping_period).
    #[must_use]
    pub fn ping_period(mut self, period: Option<Duration>) -> Self {
        self.ping_period = period;
        self
    }

    /// Sets [`timeout`](Self::timeout).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`send_timeout`](Self::send_timeout).
    #[must_use]
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// Sets [`idle_timeout`](Self::idle_timeout).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = wshub::Config::default().idle_timeout(Some(Duration::from_secs(300)));
    /// assert_eq!(config.idle_timeout, Some(Duration::from_secs(300)));
    /// ```
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets [`close_timeout`](Self::close_timeout).
    #[must_use]
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Sets [`handshake_timeout`](Self::handshake_timeout).
    #[must_use]
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`max_frame_size`](Self::max_frame_size).
    #[must_use]
    pub fn max_frame_size(mut self, size: Option<usize>) -> Self {
        self.max_frame_size = size;
        self
    }

    /// Sets [`max_message_size`](Self::max_message_size).
    #[must_use]
    pub fn max_message_size(mut self, size: Option<usize>) -> Self {
        self.max_message_size = size;
        self
    }

    /// Sets [`read_buffer_size`](Self::read_buffer_size).
    #[must_use]
    pub fn read_buffer_size(mut self, size: usize) -> Self {
        self.read_buffer_size = size;
        self
    }

    /// Sets [`write_buffer_size`](Self::write_buffer_size).
    #[must_use]
    pub fn write_buffer_size(mut self, size: usize) -> Self {
        self.write_buffer_size = size;
        self
    }

    /// Sets [`outgoing_capacity`](Self::outgoing_capacity); `0` is taken as 1.
    #[must_use]
    pub fn outgoing_capacity(mut self, capacity: usize) -> Self {
        self.outgoing_capacity = capacity.max(1);
        self
    }

    /// Sets [`publish_rate`](Self::publish_rate).
    #[must_use]
    pub fn publish_rate(mut self, limit: Option<RateLimit>) -> Self {
        self.publish_rate = limit;
        self
    }

    /// Sets [`metrics`](Self::metrics).
    #[must_use]
    pub fn metrics(mut self, metrics: Option<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Sets [`subprotocols`](Self::subprotocols).
    #[must_use]
    pub fn subprotocols<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.subprotocols = names.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`max_batch`](Self::max_batch); `0` is taken as 1.
    #[must_use]
    pub fn max_batch(mut self, messages: usize) -> Self {
        self.max_batch = messages.max(1);
        self
    }

    /// The tungstenite configuration these options imply: the read buffer
    /// and the frame and message limits.
    pub(crate) fn websocket_config(&self) -> WebSocketConfig {
        // A frame can never be larger than the message it belongs to.
        let max_frame = match (self.max_frame_size, self.max_message_size) {
            (Some(f), Some(m)) => Some(f.min(m)),
            (f, m) => f.or(m),
        };
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .max_frame_size(max_frame)
            .max_message_size(self.max_message_size)
    }
}

/// Builds the message a lagging subscriber receives under
/// [`Policy::DropOldest`]; it gets the number of messages skipped.
pub type LagNotice = Arc<dyn Fn(u64) -> Message + Send + Sync>;

/// Options for a [`Hub`](crate::Hub) (Ktor's `MutableSharedFlow(...)` arguments).
///
/// ```
/// use wshub::{HubConfig, Policy};
/// let config = HubConfig::default().capacity(256).policy(Policy::DropOldest);
/// assert_eq!(config.capacity, 256);
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct HubConfig {
    /// How many messages the hub buffers for its slowest subscriber.
    ///
    /// Default: 1024. Larger buffers absorb longer bursts before the policy
    /// acts, and hold more memory for a slow subscriber (payloads are shared,
    /// so at most `capacity` payloads live at once however many subscribe).
    /// Must be at least 1 and at most [`HubConfig::MAX_CAPACITY`].
    pub capacity: usize,
    /// What happens when the buffer is full. Default: [`Policy::Suspend`].
    pub policy: Policy,
    /// The most payload bytes the buffer holds; `None` for no bound beyond
    /// `capacity` messages.
    ///
    /// Default: 64 MiB. A publish that would take the buffer past it is
    /// treated like one into a full buffer, under the same policy:
    /// `Suspend` waits until the slowest subscriber has taken enough,
    /// `DropLatest` discards the new message, `DropOldest` and `Disconnect`
    /// evict the oldest messages until it fits. A single message larger
    /// than the bound is let in once the buffer is empty. With small
    /// messages the bound never acts (1,024 messages of 64 KiB fill it);
    /// it is what keeps a hub whose clients may send 16 MiB messages from
    /// holding 16 GiB. Raise it for hubs that carry large files, at that
    /// cost in memory.
    pub max_bytes: Option<usize>,
    /// Under [`Policy::Suspend`], how long one subscriber may keep the
    /// buffer full (a whole `capacity` of messages it has not taken, so every
    /// publisher waits for it) while other subscribers keep up, before its
    /// session is closed with 1013 "too slow for the hub" and publishing
    /// goes on.
    ///
    /// Default: 5 s. This is what bounds the wait a slow client imposes on
    /// everyone under `Suspend`, whether it reads nothing or reads steadily
    /// but slower than the hub publishes: no publisher waits on one
    /// subscriber much longer than this (the session checks at least every
    /// quarter of it). Longer values spare clients that fall behind for a
    /// while and then catch up; shorter ones keep the hub's latency low.
    ///
    /// The clock starts when the subscriber's backlog is (within a
    /// sixteenth) the whole `capacity`, and stops only after a quiet spell
    /// of half this timeout in which it never was: a client reading at half
    /// the publish rate fills the buffer again and again, one that keeps up
    /// does not. When every subscriber keeps the buffer full, the
    /// publishers are faster than anyone can read (a burst, an overloaded
    /// machine, a client publishing as fast as it can): then they wait, as
    /// `Suspend` promises, and nobody is closed; a
    /// [`RateLimit`](crate::RateLimit) on publishing is the bound there. The
    /// other policies never wait, so this does not apply to them.
    pub stall_timeout: Duration,
    /// Under [`Policy::DropOldest`], the message a session sends its client
    /// after it skipped messages, built from the number skipped. Default: none
    /// (the gap is only counted).
    pub lag_notice: Option<LagNotice>,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            capacity: 1024,
            policy: Policy::Suspend,
            max_bytes: Some(64 << 20),
            stall_timeout: Duration::from_secs(5),
            lag_notice: None,
        }
    }
}

impl fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConfig")
            .field("capacity", &self.capacity)
            .field("policy", &self.policy)
            .field("max_bytes", &self.max_bytes)
            .field("stall_timeout", &self.stall_timeout)
            .field(
                "lag_notice",
                &self.lag_notice.as_ref().map(|_| "Fn(u64) -> Message"),
            )
            .finish()
    }
}

impl HubConfig {
    /// The largest [`capacity`](Self::capacity) a hub accepts: 1,048,576
    /// messages. The channel allocates its slots up front (64 bytes each on
    /// a 64-bit target, 64 MiB at this size), so a larger value is refused with
    /// [`Error::Config`](crate::Error::Config) rather than risking an
    /// allocation the machine cannot make.
    pub const MAX_CAPACITY: usize = 1 << 20;

    /// Sets [`capacity`](Self::capacity).
    #[must_use]
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Sets [`policy`](Self::policy).
    #[must_use]
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets [`max_bytes`](Self::max_bytes).
    ///
    /// ```
    /// let config = wshub::HubConfig::default().max_bytes(Some(8 << 20));
    /// assert_eq!(config.max_bytes, Some(8 << 20));
    /// ```
    #[must_use]
    pub fn max_bytes(mut self, bytes: Option<usize>) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Sets [`stall_timeout`](Self::stall_timeout).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = wshub::HubConfig::default().stall_timeout(Duration::from_secs(2));
    /// assert_eq!(config.stall_timeout, Duration::from_secs(2));
    /// ```
    #[must_use]
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// Sets [`lag_notice`](Self::lag_notice).
    ///
    /// ```
    /// use wshub::{HubConfig, Message, Policy};
    /// let config = HubConfig::default()
    ///     .policy(Policy::DropOldest)
    ///     .lag_notice(|skipped| Message::text(format!("{{\"skipped\":{skipped}}}")));
    /// assert!(config.lag_notice.is_some());
    /// ```
    #[must_use]
    pub fn lag_notice(mut self, notice: impl Fn(u64) -> Message + Send + Sync + 'static) -> Self {
        self.lag_notice = Some(Arc::new(notice));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_small_per_connection() {
        let c = Config::default();
        let ws = c.websocket_config();
        assert_eq!(ws.read_buffer_size, 512);
        assert_eq!(ws.max_message_size, Some(1 << 20));
        assert_eq!(ws.max_frame_size, Some(1 << 20));
        assert!(!ws.accept_unmasked_frames);
    }

    #[test]
    fn frame_limit_never_exceeds_message_limit() {
        let c = Config::default()
            .max_frame_size(Some(1 << 20))
            .max_message_size(Some(100));
        assert_eq!(c.websocket_config().max_frame_size, Some(100));
        let c = Config::default()
            .max_frame_size(None)
            .max_message_size(Some(100));
        assert_eq!(c.websocket_config().max_frame_size, Some(100));
        let c = Config::default()
            .max_frame_size(None)
            .max_message_size(None);
        assert_eq!(c.websocket_config().max_frame_size, None);
    }

    #[test]
    fn zero_queue_sizes_are_raised_to_one() {
        let c = Config::default().outgoing_capacity(0).max_batch(0);
        assert_eq!((c.outgoing_capacity, c.max_batch), (1, 1));
    }
}
