//! The hub: one async-broadcast channel shared by every session.
//!
//! Publishers put a message in once; every [`Subscription`] reads the same
//! reference-counted payload. The hub keeps no list of sessions; it only owns
//! the channel, the policy and the counters.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use async_broadcast::{InactiveReceiver, Receiver, Sender, TryRecvError as BTryRecvError};
use serde::Serialize;

use crate::config::HubConfig;
use crate::error::Error;
use crate::message::{self, Message};
use crate::metrics::{self, Latency};
use crate::policy::{OnFull, Policy};

/// A broadcast hub (Ktor's `MutableSharedFlow`): publish once, every subscriber
/// receives it.
///
/// Cloning a `Hub` is cheap and gives another handle to the same channel.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use wshub::{Hub, Message, Published};
///
/// let hub = Hub::new();
/// // Nobody listens yet: the publish succeeds and the message is dropped,
/// // as with a SharedFlow without replay.
/// assert_eq!(hub.publish(Message::text("lost")).await.unwrap(), Published::NoSubscribers);
///
/// let mut sub = hub.subscribe();
/// hub.publish(Message::text("hello")).await.unwrap();
/// assert_eq!(sub.recv().await.unwrap(), Message::text("hello"));
/// assert_eq!(hub.subscriber_count(), 1);
/// # }
/// ```
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    tx: Sender<Stamped>,
    /// The payload bytes the buffer holds, when [`HubConfig::max_bytes`]
    /// bounds them.
    budget: Option<Mutex<Budget>>,
    /// The channel's capacity now: [`HubConfig::capacity`], or fewer
    /// messages while the byte bound holds it lower.
    capacity: AtomicUsize,
    // Kept so the channel stays open with no subscribers; `await_active` is off,
    // so publishing then succeeds as "no subscribers" instead of blocking.
    idle: InactiveReceiver<Stamped>,
    config: HubConfig,
    counters: Counters,
    /// Set once the hub is registered with [`Metrics`](crate::Metrics):
    /// publishes are then stamped with the time, and subscribers time
    /// their deliveries.
    latency: OnceLock<Arc<Latency>>,
    /// Run when the last handle and subscription are gone (a topic tells
    /// its broker it no longer needs the topic's messages here).
    on_free: Mutex<Option<FreeHook>>,
    /// What a layer above keeps with the hub (a topic's settings).
    ext: OnceLock<Box<dyn std::any::Any + Send + Sync>>,
}

type FreeHook = Box<dyn FnOnce() + Send>;

impl Drop for Shared {
    fn drop(&mut self) {
        let hook = self.on_free.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(hook) = hook.take() {
            hook();
        }
    }
}

/// A message in the channel, with the time it was published (0 when the
/// hub's deliveries are not timed) and its topic's sequence number (0 for a
/// plain hub's messages and for a topic's presence events).
#[derive(Clone)]
pub(crate) struct Stamped {
    msg: Message,
    at: u64,
    seq: u64,
}

/// A hub that does not keep it alive, for [`Metrics`](crate::Metrics).
pub(crate) struct WeakHub(Weak<Shared>);

impl WeakHub {
    pub(crate) fn upgrade(&self) -> Option<Hub> {
        self.0.upgrade().map(|shared| Hub { shared })
    }

    pub(crate) fn is_alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

/// The sizes of the messages in the channel, oldest first, and their sum.
///
/// Messages leave the channel from the front (read by every subscriber, or
/// evicted), so the channel's length says how many of the oldest sizes to
/// forget. Concurrent publishes may each see the other's message missing,
/// so the bound may be passed by one message per publisher at once.
struct Budget {
    /// A handle of the channel's own, to change its capacity.
    tx: Sender<Stamped>,
    max: usize,
    sizes: VecDeque<usize>,
    bytes: usize,
}

impl Budget {
    /// Forgets the sizes of messages that have left the channel.
    fn prune(&mut self) {
        let len = self.tx.len();
        while self.sizes.len() > len {
            self.bytes -= self.sizes.pop_front().unwrap_or(0);
        }
    }

    fn set_capacity(&mut self, capacity: usize, now: &AtomicUsize) {
        self.tx.set_capacity(capacity.max(1));
        now.store(capacity.max(1), Relaxed);
    }
}

/// What the byte bound lets a publish do.
enum Room {
    /// The message fits (or waits for a slot under Suspend).
    Fits,
    /// Under DropLatest: the message is discarded.
    Discard,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    no_subscribers: AtomicU64,
    dropped: AtomicU64,
    evicted: AtomicU64,
    lagged: AtomicU64,
    delivered: AtomicU64,
    unread: AtomicU64,
    disconnected: AtomicU64,
    rate_limited: AtomicU64,
    /// Subscribers that keep the buffer full now (Suspend).
    stalled: AtomicUsize,
}

/// What a successful publish did with the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a publish may drop the message; check the outcome"]
pub enum Published {
    /// The message is in the channel; every current subscriber will receive it
    /// unless its policy makes it skip (DropOldest, Disconnect).
    Queued,
    /// Nobody was subscribed, so the message went nowhere (SharedFlow semantics).
    NoSubscribers,
    /// The buffer was full under [`Policy::DropLatest`]: the message was
    /// discarded for everyone and counted in [`HubStats::dropped`].
    Dropped,
}

/// Why a publish failed. The message is handed back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The hub was closed with [`Hub::close`].
    #[error("the hub is closed")]
    Closed(Message),
    /// [`Hub::try_publish`] under [`Policy::Suspend`]: the buffer is full and
    /// publishing would have to wait.
    #[error("the hub's buffer is full")]
    Full(Message),
    /// Only text and binary messages travel through a hub; control frames
    /// belong to one connection.
    #[error("a hub carries text and binary messages, not {}", message::kind(.0))]
    NotData(Message),
}

impl PublishError {
    /// The message that was not published.
    pub fn into_inner(self) -> Message {
        match self {
            PublishError::Closed(m) | PublishError::Full(m) | PublishError::NotData(m) => m,
        }
    }

    /// Whether the hub is closed.
    pub fn is_closed(&self) -> bool {
        matches!(self, PublishError::Closed(_))
    }

    /// Whether the buffer was full.
    pub fn is_full(&self) -> bool {
        matches!(self, PublishError::Full(_))
    }
}

/// A snapshot of a hub's counters. Every count is since the hub was created.
///
/// The counts add up: every message published while a subscriber was
/// subscribed is counted for it exactly once, as `delivered`, `lagged` or
/// `unread`. So once every subscription is dropped, if all of them were
/// subscribed for every publish, `delivered + lagged + unread` is
/// `published` times the number of subscribers. A publish is counted once,
/// as `published`, `no_subscribers` or `dropped`; `evicted` counts the
/// messages the buffer let go before every subscriber had read them (each is
/// `lagged` for at least one subscriber).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HubStats {
    /// Current number of subscribers.
    pub subscribers: usize,
    /// Messages currently buffered (for the slowest subscriber).
    pub buffered: usize,
    /// Their payload bytes, about (counted when [`HubConfig::max_bytes`]
    /// bounds them; 0 otherwise).
    pub buffered_bytes: usize,
    /// Publishes that entered the channel ([`Published::Queued`]).
    pub published: u64,
    /// Publishes with no subscriber ([`Published::NoSubscribers`]).
    pub no_subscribers: u64,
    /// Messages discarded at publish under [`Policy::DropLatest`].
    pub dropped: u64,
    /// Oldest messages evicted to make room under [`Policy::DropOldest`] or
    /// [`Policy::Disconnect`].
    pub evicted: u64,
    /// Messages subscribers skipped because they lagged, summed over
    /// subscribers (a subscription dropped while behind counts what it
    /// missed too).
    pub lagged: u64,
    /// Messages subscribers received, summed over subscribers. Each
    /// subscription adds its count every [`Subscription::COUNT_EVERY`]
    /// messages and when it is dropped (so that subscribers do not all write
    /// one shared counter per message): a live subscription's last few are
    /// not in it yet.
    pub delivered: u64,
    /// Messages still waiting for a subscriber when it was dropped (a
    /// session that closed with messages it had not taken yet), summed over
    /// subscribers.
    pub unread: u64,
    /// Sessions the hub closed: lagging under [`Policy::Disconnect`], keeping
    /// a [`Policy::Suspend`] buffer full for
    /// [`HubConfig::stall_timeout`], or a socket that took no byte for
    /// [`Config::send_timeout`](crate::Config::send_timeout).
    pub disconnected: u64,
    /// Messages clients sent over their [`RateLimit`](crate::RateLimit),
    /// which were therefore not published.
    pub rate_limited: u64,
    /// Sessions that keep the buffer full now, under [`Policy::Suspend`]
    /// (see [`HubConfig::stall_timeout`]).
    pub stalled: usize,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// A hub with [`HubConfig::default`]: capacity 1024, [`Policy::Suspend`].
    pub fn new() -> Hub {
        Self::build(HubConfig::default())
    }

    /// A hub with the given options.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if `config.capacity` is 0 or more than
    /// [`HubConfig::MAX_CAPACITY`].
    pub fn with_config(config: HubConfig) -> Result<Hub, Error> {
        Self::check_config(&config)?;
        Ok(Self::build(config))
    }

    /// The checks of [`with_config`](Self::with_config), without building.
    pub(crate) fn check_config(config: &HubConfig) -> Result<(), Error> {
        if config.capacity == 0 {
            return Err(Error::Config(
                "hub capacity must be at least 1 (one message buffered)".into(),
            ));
        }
        if config.capacity > HubConfig::MAX_CAPACITY {
            return Err(Error::Config(format!(
                "hub capacity {} is more than the most a hub buffers ({} messages; \
                 its slots are allocated up front)",
                config.capacity,
                HubConfig::MAX_CAPACITY
            )));
        }
        Ok(())
    }

    fn build(config: HubConfig) -> Hub {
        let (mut tx, rx) = async_broadcast::broadcast(config.capacity);
        tx.set_overflow(config.policy.overflows());
        tx.set_await_active(false);
        let budget = config.max_bytes.map(|max| {
            Mutex::new(Budget {
                tx: tx.clone(),
                max,
                sizes: VecDeque::new(),
                bytes: 0,
            })
        });
        Hub {
            shared: Arc::new(Shared {
                budget,
                capacity: AtomicUsize::new(config.capacity),
                tx,
                idle: rx.deactivate(),
                config,
                counters: Counters::default(),
                latency: OnceLock::new(),
                on_free: Mutex::new(None),
                ext: OnceLock::new(),
            }),
        }
    }

    /// Publishes a text or binary message to every subscriber (Ktor's `emit`).
    ///
    /// Under [`Policy::Suspend`] this waits while the buffer is full; under the
    /// other policies it never waits. Encode once and publish the result: the
    /// payload is shared, not copied, by every subscriber.
    ///
    /// # Errors
    ///
    /// [`PublishError::Closed`] after [`close`](Self::close);
    /// [`PublishError::NotData`] for a control frame. The message is handed back.
    pub async fn publish(&self, msg: impl Into<Message>) -> Result<Published, PublishError> {
        self.publish_seq(msg.into(), 0).await
    }

    /// [`publish`](Self::publish), with the sequence number its
    /// subscribers see in [`Subscription::seq`].
    pub(crate) async fn publish_seq(
        &self,
        msg: Message,
        seq: u64,
    ) -> Result<Published, PublishError> {
        if self.shared.config.policy.on_full() != OnFull::Wait {
            return self.try_publish_seq(msg, seq);
        }
        let msg = self.check(msg)?;
        let size = payload_len(&msg);
        // Under Suspend the byte bound lowers the capacity, and the publish
        // waits; it never discards.
        self.make_room(size);
        match self.shared.tx.broadcast_direct(self.stamp(msg, seq)).await {
            Ok(_) => Ok(self.queued(size)),
            Err(async_broadcast::SendError(stamped)) => self.refused(stamped.msg),
        }
    }

    /// [`try_publish`](Self::try_publish) with a sequence number, as
    /// [`publish_seq`](Self::publish_seq).
    pub(crate) fn try_publish_seq(
        &self,
        msg: Message,
        seq: u64,
    ) -> Result<Published, PublishError> {
        let msg = self.check(msg)?;
        let size = payload_len(&msg);
        if let Room::Discard = self.make_room(size) {
            return Ok(self.discarded());
        }
        self.offer(msg, size, seq)
    }

    /// Publishes without waiting (Ktor's `tryEmit`).
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish), plus [`PublishError::Full`] under
    /// [`Policy::Suspend`] when the buffer is full.
    pub fn try_publish(&self, msg: impl Into<Message>) -> Result<Published, PublishError> {
        self.try_publish_seq(msg.into(), 0)
    }

    /// Serializes `value` to JSON once and publishes it as a text message.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] if `value` cannot be serialized; [`Error::Publish`]
    /// with [`PublishError::Closed`] if the hub is closed.
    pub async fn publish_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<Published, Error> {
        let msg = message::json(value)?;
        Ok(self.publish(msg).await?)
    }

    /// Subscribes to every message published from now on (Ktor's `collect`).
    ///
    /// Subscribe *before* you send a greeting or anything else the client may
    /// react to, so that nothing published in between is missed.
    pub fn subscribe(&self) -> Subscription {
        let rx = self.shared.idle.activate_cloned();
        Subscription {
            rx,
            stamp: 0,
            seq: 0,
            first: self.shared.counters.published.load(Relaxed),
            hub: self.clone(),
            lagged: 0,
            delivered: 0,
            uncounted: 0,
        }
    }

    /// How many subscribers the hub has now.
    pub fn subscriber_count(&self) -> usize {
        self.shared.tx.receiver_count()
    }

    /// Closes the hub: publishing fails from now on, and subscribers receive
    /// what is still buffered and then [`RecvError::Closed`]. Sessions joined
    /// to the hub close with 1001. Returns `false` if it was already closed.
    pub fn close(&self) -> bool {
        self.shared.tx.close()
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.shared.tx.is_closed()
    }

    /// The slow-client policy.
    pub fn policy(&self) -> Policy {
        self.shared.config.policy
    }

    /// The buffer capacity in messages.
    pub fn capacity(&self) -> usize {
        self.shared.config.capacity
    }

    /// The hub's options.
    pub fn config(&self) -> &HubConfig {
        &self.shared.config
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> HubStats {
        let c = &self.shared.counters;
        HubStats {
            subscribers: self.subscriber_count(),
            buffered: self.shared.tx.len(),
            buffered_bytes: self.shared.budget.as_ref().map_or(0, |budget| {
                let mut budget = budget.lock().unwrap_or_else(|p| p.into_inner());
                budget.prune();
                budget.bytes
            }),
            published: c.published.load(Relaxed),
            no_subscribers: c.no_subscribers.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            evicted: c.evicted.load(Relaxed),
            lagged: c.lagged.load(Relaxed),
            delivered: c.delivered.load(Relaxed),
            unread: c.unread.load(Relaxed),
            disconnected: c.disconnected.load(Relaxed),
            rate_limited: c.rate_limited.load(Relaxed),
            stalled: c.stalled.load(Relaxed),
        }
    }

    /// Whether two handles point at the same hub.
    pub fn same_hub(&self, other: &Hub) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    pub(crate) fn record_rate_limited(&self) {
        self.shared.counters.rate_limited.fetch_add(1, Relaxed);
    }

    /// A subscriber began keeping the buffer full (under Suspend).
    pub(crate) fn stall_started(&self) {
        self.shared.counters.stalled.fetch_add(1, Relaxed);
    }

    /// A subscriber that kept the buffer full caught up or left.
    pub(crate) fn stall_ended(&self) {
        self.shared.counters.stalled.fetch_sub(1, Relaxed);
    }

    /// Whether some subscriber keeps up while others keep the buffer full:
    /// then the full ones are slower than the rest, rather than the
    /// publishers faster than anyone.
    pub(crate) fn someone_keeps_up(&self) -> bool {
        self.shared.counters.stalled.load(Relaxed) < self.subscriber_count()
    }

    /// The channel's capacity now (lower than [`capacity`](Self::capacity)
    /// while [`HubConfig::max_bytes`] holds it down).
    pub(crate) fn capacity_now(&self) -> usize {
        self.shared.capacity.load(Relaxed)
    }

    /// Stamps a message with the time, if this hub's deliveries are timed.
    fn stamp(&self, msg: Message, seq: u64) -> Stamped {
        let at = match self.shared.latency.get() {
            Some(_) => metrics::now_nanos(),
            None => 0,
        };
        Stamped { msg, at, seq }
    }

    /// Starts timing deliveries into `latency`; false if already timed.
    pub(crate) fn time_deliveries(&self, latency: Arc<Latency>) -> bool {
        self.shared.latency.set(latency).is_ok()
    }

    /// The histogram this hub's deliveries are timed into, if any.
    pub(crate) fn latency(&self) -> Option<&Arc<Latency>> {
        self.shared.latency.get()
    }

    /// Runs `hook` once the hub is freed (its last handle and subscription
    /// dropped), replacing any earlier hook.
    pub(crate) fn on_free(&self, hook: impl FnOnce() + Send + 'static) {
        let mut slot = self
            .shared
            .on_free
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *slot = Some(Box::new(hook));
    }

    /// What a layer above keeps with this hub, set by the first caller;
    /// `None` if that was a value of another type.
    pub(crate) fn ext<T: std::any::Any + Send + Sync>(
        &self,
        init: impl FnOnce() -> T,
    ) -> Option<&T> {
        self.shared
            .ext
            .get_or_init(|| Box::new(init()))
            .downcast_ref()
    }

    pub(crate) fn downgrade(&self) -> WeakHub {
        WeakHub(Arc::downgrade(&self.shared))
    }

    pub(crate) fn record_disconnect(&self) {
        self.shared.counters.disconnected.fetch_add(1, Relaxed);
    }

    fn check(&self, msg: Message) -> Result<Message, PublishError> {
        if message::is_data(&msg) {
            Ok(msg)
        } else {
            Err(PublishError::NotData(msg))
        }
    }

    /// Applies [`HubConfig::max_bytes`] before a message of `size` payload
    /// bytes is offered: if it would not fit, DropLatest discards it,
    /// DropOldest and Disconnect evict the oldest messages until it fits,
    /// and Suspend lowers the channel's capacity to what it holds, so the
    /// publish waits for the slowest subscriber to take one. A message that
    /// fits lifts the capacity back to [`HubConfig::capacity`]. A message
    /// larger than the bound on its own is let in once the buffer is empty.
    fn make_room(&self, size: usize) -> Room {
        let Some(budget) = &self.shared.budget else {
            return Room::Fits;
        };
        let mut budget = budget.lock().unwrap_or_else(|p| p.into_inner());
        budget.prune();
        let full_capacity = self.shared.config.capacity;
        if budget.bytes == 0 || budget.bytes + size <= budget.max {
            if self.shared.capacity.load(Relaxed) < full_capacity {
                budget.set_capacity(full_capacity, &self.shared.capacity);
            }
            return Room::Fits;
        }
        match self.shared.config.policy.on_full() {
            OnFull::Discard => Room::Discard,
            OnFull::Wait => {
                let len = budget.tx.len();
                budget.set_capacity(len, &self.shared.capacity);
                Room::Fits
            }
            OnFull::EvictOldest => {
                let mut evict = 0;
                let mut left = budget.bytes;
                while left + size > budget.max && evict < budget.sizes.len() {
                    left -= budget.sizes[evict];
                    evict += 1;
                }
                // Shrinking the capacity drops the oldest messages, and one
                // slot more then takes the new one. The capacity cannot go
                // below one: if every old message must go, the last one is
                // evicted by the publish itself, and counted there.
                let len = budget.tx.len();
                let (keep, dropped) = if evict < len {
                    (len - evict + 1, evict)
                } else {
                    (1, len.saturating_sub(1))
                };
                budget.set_capacity(len - dropped, &self.shared.capacity);
                budget.set_capacity(keep, &self.shared.capacity);
                budget.prune();
                let counters = &self.shared.counters;
                counters.evicted.fetch_add(dropped as u64, Relaxed);
                Room::Fits
            }
        }
    }

    /// Offers a message without waiting, applying the policy to a full buffer.
    fn offer(&self, msg: Message, size: usize, seq: u64) -> Result<Published, PublishError> {
        let c = &self.shared.counters;
        match self.shared.tx.try_broadcast(self.stamp(msg, seq)) {
            Ok(None) => Ok(self.queued(size)),
            Ok(Some(_evicted)) => {
                c.evicted.fetch_add(1, Relaxed);
                Ok(self.queued(size))
            }
            Err(async_broadcast::TrySendError::Full(Stamped { msg, .. })) => {
                match self.shared.config.policy.on_full() {
                    OnFull::Discard => Ok(self.discarded()),
                    // Overflow mode never reports Full; Suspend's try_publish does.
                    OnFull::Wait | OnFull::EvictOldest => Err(PublishError::Full(msg)),
                }
            }
            Err(async_broadcast::TrySendError::Inactive(_)) => Ok(self.nobody()),
            Err(async_broadcast::TrySendError::Closed(s)) => Err(PublishError::Closed(s.msg)),
        }
    }

    /// A waiting send was refused: either closed or nobody is subscribed.
    fn refused(&self, msg: Message) -> Result<Published, PublishError> {
        if self.is_closed() {
            Err(PublishError::Closed(msg))
        } else {
            Ok(self.nobody())
        }
    }

    fn queued(&self, size: usize) -> Published {
        if let Some(budget) = &self.shared.budget {
            let mut budget = budget.lock().unwrap_or_else(|p| p.into_inner());
            budget.sizes.push_back(size);
            budget.bytes += size;
        }
        self.shared.counters.published.fetch_add(1, Relaxed);
        Published::Queued
    }

    fn discarded(&self) -> Published {
        self.shared.counters.dropped.fetch_add(1, Relaxed);
        Published::Dropped
    }

    fn nobody(&self) -> Published {
        self.shared.counters.no_subscribers.fetch_add(1, Relaxed);
        Published::NoSubscribers
    }
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("policy", &self.policy())
            .field("capacity", &self.capacity())
            .field("stats", &self.stats())
            .finish()
    }
}

/// The payload bytes of a data message.
fn payload_len(msg: &Message) -> usize {
    match msg {
        Message::Text(text) => text.len(),
        Message::Binary(bytes) => bytes.len(),
        _ => 0,
    }
}

/// One subscriber's view of a hub. Dropping it unsubscribes.
///
/// Under [`Policy::Suspend`] a subscription that is not read holds every
/// publisher back once the buffer fills: read it, or drop it.
pub struct Subscription {
    rx: Receiver<Stamped>,
    /// When the last message received was published (0: not timed).
    stamp: u64,
    /// The sequence number of the last message received (0: none).
    seq: u64,
    /// The hub's `published` count when this subscription began.
    first: u64,
    hub: Hub,
    lagged: u64,
    delivered: u64,
    /// Deliveries not yet added to the hub's `delivered` count (added in
    /// groups, so subscribers do not all write one counter per message).
    uncounted: u32,
}

/// Why [`Subscription::recv`] returned no message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// The subscriber fell behind and this many messages were evicted before it
    /// read them (only under [`Policy::DropOldest`] and [`Policy::Disconnect`]).
    /// The next `recv` returns the oldest message still buffered.
    #[error("lagged behind the hub by {0} messages")]
    Lagged(u64),
    /// The hub is closed and everything buffered has been read.
    #[error("the hub is closed")]
    Closed,
}

/// Why [`Subscription::try_recv`] returned no message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    /// Nothing is buffered for this subscriber right now.
    #[error("no message is waiting")]
    Empty,
    /// As [`RecvError::Lagged`].
    #[error("lagged behind the hub by {0} messages")]
    Lagged(u64),
    /// As [`RecvError::Closed`].
    #[error("the hub is closed")]
    Closed,
}

impl Subscription {
    /// Waits for the next message.
    ///
    /// # Errors
    ///
    /// [`RecvError::Lagged`] when messages were evicted before this subscriber
    /// read them (counted in [`HubStats::lagged`]); [`RecvError::Closed`] when
    /// the hub is closed and drained.
    pub async fn recv(&mut self) -> Result<Message, RecvError> {
        match self.rx.recv_direct().await {
            Ok(msg) => Ok(self.got(msg)),
            Err(async_broadcast::RecvError::Overflowed(n)) => Err(RecvError::Lagged(self.lag(n))),
            Err(async_broadcast::RecvError::Closed) => Err(RecvError::Closed),
        }
    }

    /// Takes the next message if one is waiting.
    ///
    /// # Errors
    ///
    /// As [`recv`](Self::recv), plus [`TryRecvError::Empty`].
    pub fn try_recv(&mut self) -> Result<Message, TryRecvError> {
        match self.rx.try_recv() {
            Ok(msg) => Ok(self.got(msg)),
            Err(BTryRecvError::Overflowed(n)) => Err(TryRecvError::Lagged(self.lag(n))),
            Err(BTryRecvError::Empty) => Err(TryRecvError::Empty),
            Err(BTryRecvError::Closed) => Err(TryRecvError::Closed),
        }
    }

    /// What the stream yields: `None` once the hub is closed and drained.
    pub(crate) fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Message, RecvError>>> {
        std::pin::Pin::new(&mut self.rx).poll_recv(cx).map(|item| {
            item.map(|result| match result {
                Ok(msg) => Ok(self.got(msg)),
                Err(async_broadcast::RecvError::Overflowed(n)) => {
                    Err(RecvError::Lagged(self.lag(n)))
                }
                // poll_recv reports a closed channel as the end of the stream.
                Err(async_broadcast::RecvError::Closed) => Err(RecvError::Closed),
            })
        })
    }

    /// How many messages this subscriber has skipped so far.
    pub fn lagged(&self) -> u64 {
        self.lagged
    }

    /// How many messages this subscriber has received so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// A subscription adds its deliveries to [`HubStats::delivered`] every
    /// this many messages, and when it is dropped.
    pub const COUNT_EVERY: u32 = 64;

    /// About how many messages are waiting for this subscriber: those
    /// published since it subscribed that it has neither received nor
    /// skipped. Publishes still under way when it subscribed or now may
    /// make it off by a few; without evictions it is otherwise exact.
    pub(crate) fn backlog(&self) -> u64 {
        let published = self.hub.shared.counters.published.load(Relaxed);
        published.saturating_sub(self.first + self.delivered + self.lagged)
    }

    /// Adds the deliveries not yet counted to the hub's count.
    fn count_delivered(&mut self) {
        if self.uncounted > 0 {
            self.hub
                .shared
                .counters
                .delivered
                .fetch_add(u64::from(self.uncounted), Relaxed);
            self.uncounted = 0;
        }
    }

    /// When the message last received was published, for
    /// [`Metrics`](crate::Metrics) (0 if the hub is not timed).
    pub(crate) fn stamp(&self) -> u64 {
        self.stamp
    }

    /// The sequence number of the message last received: its topic's
    /// `seq` for a topic's message, 0 for a plain hub's messages and a
    /// topic's presence events.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    fn got(&mut self, Stamped { msg, at, seq }: Stamped) -> Message {
        self.stamp = at;
        self.seq = seq;
        self.delivered += 1;
        self.uncounted += 1;
        if self.uncounted >= Self::COUNT_EVERY {
            self.count_delivered();
        }
        msg
    }

    /// How many messages the hub buffers now: what its slowest subscriber
    /// has yet to read (this subscriber may have read more of them).
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether the hub buffers no message now.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The hub this subscription reads.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    fn lag(&mut self, n: u64) -> u64 {
        self.lagged += n;
        self.hub.shared.counters.lagged.fetch_add(n, Relaxed);
        n
    }
}

/// A subscription is also a stream of what [`recv`](Subscription::recv) returns:
/// `Ok(message)`, or `Err(RecvError::Lagged(n))` where messages were skipped
/// (async-broadcast's own `Stream` hides those gaps; this one reports and
/// counts them). The stream ends when the hub is closed and drained.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tokio_stream::StreamExt;
/// use wshub::{Hub, HubConfig, Message, Policy, RecvError};
///
/// let hub = Hub::with_config(HubConfig::default().capacity(2).policy(Policy::DropOldest)).unwrap();
/// let sub = hub.subscribe();
/// for text in ["a", "b", "c"] {
///     let _ = hub.publish(Message::text(text)).await.unwrap();
/// }
/// hub.close();
/// let seen: Vec<_> = sub.collect().await;
/// assert_eq!(seen, [Err(RecvError::Lagged(1)), Ok(Message::text("b")), Ok(Message::text("c"))]);
/// # }
/// ```
impl futures_util::Stream for Subscription {
    type Item = Result<Message, RecvError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.poll_recv(cx)
    }
}

impl Drop for Subscription {
    /// Accounts for what this subscriber leaves behind: messages evicted
    /// before it read them are `lagged`, messages still waiting are `unread`.
    fn drop(&mut self) {
        self.count_delivered();
        // Taking what is left is the only way to learn this receiver's own
        // backlog; it is at most the hub's capacity, and frees each slot for
        // a publisher waiting under Suspend as it goes.
        let mut unread = 0;
        loop {
            match self.rx.try_recv() {
                Ok(_) => unread += 1,
                Err(BTryRecvError::Overflowed(n)) => {
                    self.lag(n);
                }
                Err(BTryRecvError::Empty | BTryRecvError::Closed) => break,
            }
        }
        if unread > 0 {
            self.hub.shared.counters.unread.fetch_add(unread, Relaxed);
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("waiting", &self.len())
            .field("lagged", &self.lagged)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Bytes;

    fn hub(capacity: usize, policy: Policy) -> Hub {
        Hub::with_config(HubConfig::default().capacity(capacity).policy(policy)).unwrap()
    }

    fn text(i: usize) -> Message {
        Message::text(i.to_string())
    }

    #[tokio::test]
    async fn publish_without_subscribers_succeeds_and_is_counted() {
        for policy in Policy::ALL {
            let hub = hub(2, policy);
            for i in 0..5 {
                assert_eq!(hub.publish(text(i)).await, Ok(Published::NoSubscribers));
                assert_eq!(hub.try_publish(text(i)), Ok(Published::NoSubscribers));
            }
            assert_eq!(hub.stats().no_subscribers, 10, "{policy}");
        }
    }

    #[tokio::test]
    async fn a_late_subscriber_sees_only_later_messages() {
        let hub = hub(4, Policy::Suspend);
        let _ = hub.publish(text(0)).await.unwrap();
        let mut sub = hub.subscribe();
        let _ = hub.publish(text(1)).await.unwrap();
        assert_eq!(sub.recv().await.unwrap(), text(1));
        assert_eq!(sub.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test]
    async fn payload_is_shared_not_copied() {
        let hub = hub(4, Policy::Suspend);
        let (mut a, mut b) = (hub.subscribe(), hub.subscribe());
        let _ = hub.publish(Message::binary(vec![7u8; 1024])).await.unwrap();
        let (Message::Binary(x), Message::Binary(y)) =
            (a.recv().await.unwrap(), b.recv().await.unwrap())
        else {
            panic!("expected binary messages");
        };
        assert_eq!(
            x.as_ptr(),
            y.as_ptr(),
            "both subscribers must read the same buffer"
        );
    }

    #[tokio::test]
    async fn control_frames_are_refused() {
        let hub = hub(4, Policy::Suspend);
        let err = hub.publish(Message::Ping(Bytes::new())).await.unwrap_err();
        assert!(
            matches!(err, PublishError::NotData(Message::Ping(_))),
            "{err:?}"
        );
        assert!(err.to_string().contains("ping"), "{err}");
    }

    #[tokio::test]
    async fn zero_capacity_is_a_config_error() {
        let err = Hub::with_config(HubConfig::default().capacity(0)).unwrap_err();
        assert!(err.to_string().contains("capacity"), "{err}");
    }

    #[tokio::test]
    async fn a_capacity_too_large_to_allocate_is_a_config_error_not_a_panic() {
        for capacity in [HubConfig::MAX_CAPACITY + 1, usize::MAX] {
            let err = Hub::with_config(HubConfig::default().capacity(capacity)).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            assert!(err.to_string().contains(&capacity.to_string()), "{err}");
        }
        let hub = Hub::with_config(HubConfig::default().capacity(HubConfig::MAX_CAPACITY));
        assert!(hub.is_ok());
    }

    #[tokio::test]
    async fn publish_json_to_a_closed_hub_says_the_hub_is_closed() {
        let hub = hub(4, Policy::Suspend);
        hub.close();
        let err = hub
            .publish_json(&serde_json::json!({"a": 1}))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Publish(PublishError::Closed(_))),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "publish failed: the hub is closed");
    }

    #[tokio::test]
    async fn suspend_waits_for_the_slowest_and_try_publish_reports_full() {
        let hub = hub(2, Policy::Suspend);
        let mut sub = hub.subscribe();
        let _ = hub.publish(text(0)).await.unwrap();
        let _ = hub.publish(text(1)).await.unwrap();
        assert_eq!(hub.try_publish(text(2)), Err(PublishError::Full(text(2))));
        let pending = tokio::spawn({
            let hub = hub.clone();
            async move { hub.publish(text(2)).await }
        });
        // The publisher can only finish once the subscriber makes room.
        assert_eq!(sub.recv().await.unwrap(), text(0));
        assert_eq!(pending.await.unwrap(), Ok(Published::Queued));
        assert_eq!(sub.recv().await.unwrap(), text(1));
        assert_eq!(sub.recv().await.unwrap(), text(2));
        assert_eq!(
            hub.stats().lagged + hub.stats().dropped + hub.stats().evicted,
            0
        );
    }

    #[tokio::test]
    async fn drop_oldest_skips_ahead_and_counts_the_gap() {
        let hub = hub(2, Policy::DropOldest);
        let mut sub = hub.subscribe();
        for i in 0..5 {
            assert_eq!(hub.publish(text(i)).await, Ok(Published::Queued));
        }
        assert_eq!(sub.recv().await, Err(RecvError::Lagged(3)));
        assert_eq!(sub.recv().await.unwrap(), text(3));
        assert_eq!(sub.recv().await.unwrap(), text(4));
        let stats = hub.stats();
        assert_eq!((stats.evicted, stats.lagged, sub.lagged()), (3, 3, 3));
    }

    #[tokio::test]
    async fn drop_latest_discards_new_messages_for_everyone() {
        let hub = hub(2, Policy::DropLatest);
        let mut sub = hub.subscribe();
        let outcomes: Vec<_> = (0..5).map(|i| hub.try_publish(text(i)).unwrap()).collect();
        assert_eq!(outcomes[..2], [Published::Queued, Published::Queued]);
        assert!(outcomes[2..].iter().all(|o| *o == Published::Dropped));
        assert_eq!(sub.recv().await.unwrap(), text(0));
        assert_eq!(sub.recv().await.unwrap(), text(1));
        assert_eq!(sub.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(hub.stats().dropped, 3);
    }

    #[tokio::test]
    async fn close_drains_then_reports_closed() {
        let hub = hub(4, Policy::Suspend);
        let mut sub = hub.subscribe();
        let _ = hub.publish(text(0)).await.unwrap();
        assert!(hub.close());
        assert!(hub.publish(text(1)).await.unwrap_err().is_closed());
        assert_eq!(sub.recv().await.unwrap(), text(0));
        assert_eq!(sub.recv().await, Err(RecvError::Closed));
    }

    /// Under every policy, with a fast reader, a slow one, one that reads
    /// nothing and one dropped while behind: each message published while a
    /// subscriber was there is counted for it once, as delivered, lagged or
    /// unread.
    #[tokio::test]
    async fn the_counters_add_up_under_every_policy() {
        const PUBLISHES: usize = 50;
        for policy in Policy::ALL {
            let hub = hub(8, policy);
            let mut fast = hub.subscribe();
            let mut slow = hub.subscribe();
            let deaf = hub.subscribe();
            let mut quitter = hub.subscribe();
            let mut offered = 0;
            for i in 0..PUBLISHES {
                let outcome = match hub.try_publish(text(i)) {
                    Ok(outcome) => outcome,
                    // Suspend's buffer is full: the readers that read nothing
                    // hold it, so stop publishing there.
                    Err(PublishError::Full(_)) => break,
                    Err(err) => panic!("{policy}: {err}"),
                };
                offered += 1;
                assert_ne!(outcome, Published::NoSubscribers);
                while let Ok(_) | Err(TryRecvError::Lagged(_)) = fast.try_recv() {}
                if i % 3 == 0 {
                    let _ = slow.try_recv();
                }
                if i == PUBLISHES / 2 {
                    let _ = quitter.try_recv();
                }
            }
            drop(quitter); // behind, with messages waiting
            drop((fast, slow, deaf));
            let stats = hub.stats();
            assert_eq!(stats.subscribers, 0, "{policy}");
            assert_eq!(
                stats.published + stats.dropped,
                offered,
                "{policy}: every publish counted once: {stats:?}"
            );
            assert_eq!(
                stats.delivered + stats.lagged + stats.unread,
                4 * stats.published,
                "{policy}: every message counted once per subscriber: {stats:?}"
            );
            if policy.overflows() {
                assert!(
                    stats.evicted > 0 && stats.lagged >= stats.evicted,
                    "{policy}: {stats:?}"
                );
            } else {
                assert_eq!((stats.evicted, stats.lagged), (0, 0), "{policy}: {stats:?}");
            }
        }
    }

    fn bytes(i: u8, size: usize) -> Message {
        Message::binary(vec![i; size])
    }

    /// Four 4 KiB messages into a 10 KiB bound, with a subscriber that reads
    /// nothing: each policy treats the third like a publish into a full
    /// buffer, long before `capacity` messages are there.
    #[tokio::test]
    async fn the_buffer_is_bounded_in_bytes_under_every_policy() {
        for policy in Policy::ALL {
            let hub = Hub::with_config(
                HubConfig::default()
                    .capacity(100)
                    .policy(policy)
                    .max_bytes(Some(10_000)),
            )
            .unwrap();
            let mut sub = hub.subscribe();
            for i in 0..2 {
                assert_eq!(hub.try_publish(bytes(i, 4096)), Ok(Published::Queued));
            }
            assert_eq!(hub.stats().buffered_bytes, 8192, "{policy}");
            let third = hub.try_publish(bytes(2, 4096));
            let stats = hub.stats();
            assert!(stats.buffered_bytes <= 10_000, "{policy}: {stats:?}");
            match policy {
                Policy::Suspend => {
                    assert!(matches!(third, Err(PublishError::Full(_))), "{third:?}");
                    // A publish that waits goes in once the subscriber takes one.
                    let waiting = tokio::spawn({
                        let hub = hub.clone();
                        async move { hub.publish(bytes(2, 4096)).await }
                    });
                    assert_eq!(sub.recv().await.unwrap(), bytes(0, 4096));
                    assert_eq!(waiting.await.unwrap(), Ok(Published::Queued));
                    assert_eq!(sub.recv().await.unwrap(), bytes(1, 4096));
                    assert_eq!(sub.recv().await.unwrap(), bytes(2, 4096));
                }
                Policy::DropLatest => {
                    assert_eq!(third, Ok(Published::Dropped));
                    assert_eq!(stats.dropped, 1);
                    assert_eq!(sub.recv().await.unwrap(), bytes(0, 4096));
                    assert_eq!(sub.recv().await.unwrap(), bytes(1, 4096));
                }
                Policy::DropOldest | Policy::Disconnect => {
                    assert_eq!(third, Ok(Published::Queued));
                    assert_eq!(stats.evicted, 1, "{policy}: {stats:?}");
                    assert_eq!(sub.recv().await, Err(RecvError::Lagged(1)));
                    assert_eq!(sub.recv().await.unwrap(), bytes(1, 4096));
                    assert_eq!(sub.recv().await.unwrap(), bytes(2, 4096));
                }
            }
            // Once the buffer is drained, the full capacity is back.
            for i in 0..2 {
                assert_eq!(
                    hub.try_publish(bytes(i, 100)),
                    Ok(Published::Queued),
                    "{policy}"
                );
            }
            assert_eq!(hub.capacity_now(), 100, "{policy}");
        }
    }

    #[tokio::test]
    async fn a_message_larger_than_the_byte_bound_goes_in_alone() {
        for policy in Policy::ALL {
            let hub = Hub::with_config(HubConfig::default().policy(policy).max_bytes(Some(1000)))
                .unwrap();
            let mut sub = hub.subscribe();
            assert_eq!(
                hub.try_publish(bytes(1, 5000)),
                Ok(Published::Queued),
                "{policy}"
            );
            assert_eq!(sub.recv().await.unwrap(), bytes(1, 5000));
            assert_eq!(
                hub.try_publish(bytes(2, 5000)),
                Ok(Published::Queued),
                "{policy}"
            );
        }
    }

    #[tokio::test]
    async fn subscriber_count_follows_subscriptions() {
        let hub = hub(4, Policy::Suspend);
        assert_eq!(hub.subscriber_count(), 0);
        let a = hub.subscribe();
        let b = hub.subscribe();
        assert_eq!(hub.subscriber_count(), 2);
        drop(a);
        assert_eq!(hub.subscriber_count(), 1);
        drop(b);
        assert_eq!(hub.subscriber_count(), 0);
        assert_eq!(hub.publish(text(0)).await, Ok(Published::NoSubscribers));
    }
}
