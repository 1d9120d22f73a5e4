//! The broker: where a topic's positions, history and presence live.
//!
//! A [`PubSub`](crate::PubSub) node keeps one local [`Hub`] per topic that
//! has subscribers here, and leaves everything that must agree across nodes
//! to its [`Broker`]: the next sequence number, the epoch, the kept history
//! and the members. The broker delivers each publish, in sequence order, to
//! every node that [`watch`](Broker::watch)es the topic, through the
//! [`Delivery`] the node handed it. [`InProcess`] is the embedded broker of a
//! single node; a broker on a shared server (Redis, NATS) implements the
//! same trait, and nothing in a node assumes the broker is local.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::Serialize;

use crate::hub::{Hub, WeakHub};
use crate::message::{Message, Utf8Bytes};

/// A topic's epoch: an opaque string, new whenever the topic's history
/// starts afresh (a new topic, a broker that lost its data).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Epoch(Arc<str>);

impl Epoch {
    /// An epoch with this text (a broker's own format).
    pub fn new(text: impl Into<Arc<str>>) -> Epoch {
        Epoch(text.into())
    }

    /// A fresh random epoch: 16 hex digits.
    pub fn random() -> Epoch {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        // RandomState is seeded from the OS once per process and varied per
        // instance: enough to tell one topic's lives apart.
        let n = COUNT.fetch_add(1, Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let hash = RandomState::new().hash_one((n, nanos));
        Epoch(format!("{hash:016x}").into())
    }

    /// The epoch's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a client stands in a topic: the last message it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// The topic's epoch.
    pub epoch: Epoch,
    /// The sequence number of the last message (0: none yet).
    pub seq: u64,
}

/// A published value: one JSON document, kept as its text.
///
/// Cloning shares the text; a kept message's value is a slice of its
/// encoded push, not a copy.
#[derive(Clone, PartialEq, Eq)]
pub struct Data(Utf8Bytes);

impl Data {
    /// Serializes `value` to JSON.
    ///
    /// # Errors
    ///
    /// The serializer's error, if `value` cannot be written as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Data, serde_json::Error> {
        Ok(Data(serde_json::to_string(value)?.into()))
    }

    /// Takes `text` if it is one valid JSON document.
    ///
    /// # Errors
    ///
    /// The parser's error, if it is not.
    pub fn from_json_text(text: &str) -> Result<Data, serde_json::Error> {
        let raw: &serde_json::value::RawValue = serde_json::from_str(text)?;
        Ok(Data(raw.get().into()))
    }

    /// Wraps JSON text known to be valid (a broker reading back what a
    /// node gave it).
    pub fn from_trusted(text: impl Into<Utf8Bytes>) -> Data {
        Data(text.into())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the text is empty (never, for valid JSON).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One kept message.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Its sequence number.
    pub seq: u64,
    /// Its value.
    pub data: Data,
    /// Its `message` push, when the broker keeps it encoded (the embedded
    /// broker does): the node then sends it as it is, shared, instead of
    /// encoding a copy for each client that reads the history.
    pub push: Option<Message>,
}

/// What a topic keeps: its last `size` messages, each for `ttl` after it
/// was published. Sent with every call that may create or trim the
/// history, so the broker needs no configuration of its own per topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// How many of the latest messages are kept (0: none).
    pub size: usize,
    /// How long each is kept.
    pub ttl: Duration,
}

/// Which kept messages to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    /// Every kept message after this sequence number.
    After(u64),
    /// The latest `n` kept messages.
    Last(usize),
}

/// A read of a topic's history.
#[derive(Clone, Debug, PartialEq)]
pub struct History {
    /// The topic's epoch.
    pub epoch: Epoch,
    /// The sequence number of the topic's latest message (0: none yet).
    /// Every message after it reaches the watching nodes after this read.
    pub last: u64,
    /// The messages read, oldest first, with no holes between them.
    pub entries: Vec<Entry>,
}

/// A client subscribed to a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The client's id (unique across the nodes of one broker).
    pub client: Arc<str>,
    /// What the server attached to it (a user name), if anything.
    pub info: Option<Data>,
}

/// Why a broker could not do what was asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached, or did not answer in time (the
    /// protocol's `unavailable`).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// A bound of the broker's was reached: topics, members (the
    /// protocol's `limit`).
    #[error("{0}")]
    Limit(String),
}

/// Where positions, history and presence live, for one node or many.
///
/// A node calls [`watch`](Self::watch) when a topic gets its first local
/// subscriber and [`unwatch`](Self::unwatch) when it has none left; in
/// between, the broker hands every message and presence event of the topic
/// to the node's [`Delivery`], one at a time, in sequence order, each
/// delivery awaited before the next.
///
/// Implementations guarantee, per topic:
///
/// - [`publish`](Self::publish) gives the next sequence number (1, 2, 3,
///   ... with no holes) in the current epoch, keeps the message as
///   [`Retention`] says, and delivers it to every watching node;
/// - a [`history`](Self::history) read's `last` is such that every message
///   after it is delivered to a node that was watching before the read;
/// - the epoch changes whenever the sequence starts again at 1;
/// - every call ends within a bound: a broker that cannot be reached
///   answers [`BrokerError::Unavailable`] rather than hang (the node adds
///   no timeout of its own, since dropping a publish half-way could number
///   a message without delivering it).
pub trait Broker: Send + Sync + 'static {
    /// Starts delivering `topic` to this node through `delivery` (replacing
    /// an earlier delivery of the topic, which is dead by then). Resolves once
    /// deliveries are assured. `keep` is the topic's retention, for a broker
    /// that reads its history back to catch up.
    fn watch<'a>(
        &'a self,
        topic: &'a str,
        delivery: Delivery,
        keep: Retention,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// The node's delivery of `topic` has no subscriber left. Called from
    /// wherever the topic's last subscription is dropped, so it must not
    /// block; the topic may be watched again at any time, and an unwatch
    /// must leave alone a delivery that is [alive](Delivery::is_alive).
    fn unwatch(&self, topic: &str);

    /// Publishes `data` on `topic`: the position it got.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        data: Data,
        keep: Retention,
    ) -> BoxFuture<'a, Result<Position, BrokerError>>;

    /// Reads `topic`'s kept messages (creating the topic, with a new epoch,
    /// if it does not exist).
    fn history<'a>(
        &'a self,
        topic: &'a str,
        range: Range,
        keep: Retention,
    ) -> BoxFuture<'a, Result<History, BrokerError>>;

    /// Adds `member` to `topic`'s presence (at most `max` members), and
    /// delivers a join event to the watching nodes.
    fn join<'a>(
        &'a self,
        topic: &'a str,
        member: Member,
        max: usize,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Removes `client` from `topic`'s presence, and delivers a leave event
    /// if it was there.
    fn leave<'a>(
        &'a self,
        topic: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Who is in `topic`'s presence now.
    fn members<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Vec<Member>, BrokerError>>;

    /// The client id of this node's session `session`: unique among every
    /// node of the broker. The default, `c` and the session id, is unique
    /// within one process only; a broker shared by several nodes adds the
    /// node's own id.
    fn client_id(&self, session: u64) -> Arc<str> {
        format!("c{session}").into()
    }
}

/// A node's end of a watched topic: what the broker calls to deliver.
///
/// It publishes into the node's local hub of the topic, encoded once as the
/// pub/sub protocol's pushes, so every local subscriber shares one copy. It
/// does not keep the hub alive.
#[derive(Clone)]
pub struct Delivery {
    topic: Arc<str>,
    hub: Arc<WeakHub>,
    events: bool,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.topic)
            .field("alive", &self.is_alive())
            .finish()
    }
}

impl Delivery {
    pub(crate) fn new(topic: &str, hub: &Hub, events: bool) -> Delivery {
        Delivery {
            topic: topic.into(),
            hub: Arc::new(hub.downgrade()),
            events,
        }
    }

    /// The topic it delivers.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Whether the node still has subscribers of the topic.
    pub fn is_alive(&self) -> bool {
        self.hub.is_alive()
    }

    /// Delivers a message to the node's subscribers, waiting while a
    /// [`Suspend`](crate::Policy::Suspend) topic's buffer is full.
    pub async fn message(&self, epoch: &Epoch, seq: u64, data: &Data) {
        if let Some(hub) = self.hub.upgrade() {
            let push = encode_message(&self.topic, epoch, seq, data);
            let _ = hub.publish_seq(push, seq).await;
        }
    }

    /// Delivers a `message` push encoded by [`encode_message`].
    pub(crate) async fn encoded(&self, push: Message, seq: u64) {
        if let Some(hub) = self.hub.upgrade() {
            let _ = hub.publish_seq(push, seq).await;
        }
    }

    /// Ends the node's subscriptions of the topic: its history started
    /// afresh (a broker that lost its data gives the topic a new epoch), so
    /// the sequence numbers its subscribers hold no longer follow on. Each
    /// session subscribed to it closes with 1001 (going away), and a
    /// client that comes back with its position learns, from the subscribe
    /// reply, that the epoch changed; an in-process reader gets
    /// [`RecvError::Closed`](crate::RecvError::Closed). The next subscriber
    /// gets a new local hub.
    pub fn restart(&self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.close();
        }
    }

    /// Tells the node's subscribers that `member` joined, if the topic
    /// sends presence events.
    pub async fn join(&self, member: &Member) {
        if !self.events {
            return;
        }
        if let Some(hub) = self.hub.upgrade() {
            // The member's own object, its fields after the op and topic.
            let fields = encode_member(member);
            let push = format!(
                r#"{{"op":"join","topic":{},{}"#,
                json_str(&self.topic),
                &fields[1..]
            );
            let _ = hub.publish_seq(Message::text(push), 0).await;
        }
    }

    /// Tells the node's subscribers that `client` left, if the topic sends
    /// presence events.
    pub async fn leave(&self, client: &str) {
        if !self.events {
            return;
        }
        if let Some(hub) = self.hub.upgrade() {
            let push = format!(
                r#"{{"op":"leave","topic":{},"client":{}}}"#,
                json_str(&self.topic),
                json_str(client)
            );
            let _ = hub.publish_seq(Message::text(push), 0).await;
        }
    }
}

/// A member as the protocol lists it: `{"client": ..., "info": ...}`.
pub(crate) fn encode_member(member: &Member) -> String {
    match &member.info {
        Some(info) => format!(
            r#"{{"client":{},"info":{}}}"#,
            json_str(&member.client),
            info.as_str()
        ),
        None => format!(r#"{{"client":{}}}"#, json_str(&member.client)),
    }
}

/// A JSON string literal.
pub(crate) fn json_str(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

/// The protocol's `message` push.
pub(crate) fn encode_message(topic: &str, epoch: &Epoch, seq: u64, data: &Data) -> Message {
    Message::Text(encode_push(topic, epoch, seq, data).0)
}

/// The `message` push's text, and where its `data` starts in it (it ends
/// one byte before the end).
fn encode_push(topic: &str, epoch: &Epoch, seq: u64, data: &Data) -> (Utf8Bytes, usize) {
    let mut push = format!(
        r#"{{"op":"message","topic":{},"epoch":{},"seq":{seq},"data":"#,
        json_str(topic),
        json_str(epoch.as_str()),
    );
    let at = push.len();
    push.reserve_exact(data.len() + 1);
    push.push_str(data.as_str());
    push.push('}');
    (push.into(), at)
}

/// The protocol's `gap` push.
pub(crate) fn encode_gap(topic: &str, missed: u64) -> Message {
    Message::text(format!(
        r#"{{"op":"gap","topic":{},"missed":{missed}}}"#,
        json_str(topic)
    ))
}

/// The embedded broker of one node: positions, history and presence in
/// this process's memory.
///
/// Per topic it keeps the epoch, the last sequence number, the retained
/// messages and the members. A topic is freed when no local subscriber
/// watches it, no message is retained (each goes after its TTL) and no
/// member is present (it is looked for at most once a second, and whenever
/// the bound is reached or [`topics`](Self::topics) counts them); its next
/// use starts a new epoch. At most
/// `max_topics` topics exist at once: a publish or read that would create
/// one more is refused with [`BrokerError::Limit`].
///
/// The kept messages of all topics together hold at most `max_bytes` (their
/// encoded pushes): a publish that would be kept past it is refused with
/// [`BrokerError::Limit`] and not numbered, rather than shortening any
/// topic's history below its size. Messages past their TTL are let go
/// first.
///
/// Publishes on one topic are serialized: each is numbered, kept and
/// delivered to the local hub before the next, so every subscriber sees
/// one order (under [`Suspend`](crate::Policy::Suspend), a full hub holds
/// the topic's publishers back, as it would hold back a hub's).
pub struct InProcess {
    logs: Mutex<Logs>,
    max_topics: usize,
    bytes: Arc<Held>,
}

/// The bytes the kept messages of every topic hold, and their bound.
struct Held {
    used: std::sync::atomic::AtomicUsize,
    max: usize,
}

impl Held {
    /// Takes `n` bytes if they fit under the bound.
    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Relaxed, Relaxed, |used| {
                used.checked_add(n).filter(|total| *total <= self.max)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Relaxed);
    }
}

impl fmt::Debug for InProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcess")
            .field("topics", &self.topics())
            .field("max_topics", &self.max_topics)
            .field("history_bytes", &self.history_bytes())
            .field("max_bytes", &self.bytes.max)
            .finish()
    }
}

/// The topics, and when the freeable ones were last let go.
struct Logs {
    map: HashMap<Arc<str>, Arc<Log>>,
    swept: Instant,
}

impl Logs {
    /// Lets go of every message past its TTL, and forgets the topics that
    /// can be: a log held by a call under way is not.
    fn sweep(&mut self, now: Instant) {
        self.swept = now;
        self.map.retain(|_, log| {
            if let Ok(mut state) = log.state.try_lock() {
                state.expire(now);
            }
            Arc::strong_count(log) > 1 || !log.is_freeable(now)
        });
    }
}

struct Log {
    state: tokio::sync::Mutex<LogState>,
    /// The node's delivery: outside the state's lock, so that an unwatch
    /// (from a drop, synchronous) never waits for a publish.
    watcher: Mutex<Option<Delivery>>,
}

struct LogState {
    epoch: Epoch,
    last: u64,
    kept: VecDeque<Kept>,
    members: HashMap<Arc<str>, Member>,
    /// The broker's count of kept bytes, given back as messages go.
    bytes: Arc<Held>,
}

impl Drop for LogState {
    fn drop(&mut self) {
        let held: usize = self.kept.iter().map(|k| k.push.len()).sum();
        self.bytes.give(held);
    }
}

struct Kept {
    seq: u64,
    /// Its `message` push; its value is the slice from `data_at` to the
    /// closing brace.
    push: Utf8Bytes,
    data_at: usize,
    /// When its TTL ends.
    until: Instant,
}

impl Kept {
    fn entry(&self) -> Entry {
        let bytes: &bytes::Bytes = self.push.as_ref();
        let data = bytes.slice(self.data_at..bytes.len() - 1);
        Entry {
            seq: self.seq,
            // A slice of valid JSON text at a value's bounds: UTF-8.
            data: Data(Utf8Bytes::try_from(data).unwrap_or_default()),
            push: Some(Message::Text(self.push.clone())),
        }
    }
}

impl LogState {
    fn new(bytes: Arc<Held>) -> LogState {
        LogState {
            epoch: Epoch::random(),
            last: 0,
            kept: VecDeque::new(),
            members: HashMap::new(),
            bytes,
        }
    }

    /// Lets go of what `keep` no longer covers.
    fn trim(&mut self, keep: Retention, now: Instant) {
        while self.kept.len() > keep.size {
            self.pop();
        }
        self.expire(now);
    }

    /// Lets go of the messages past their TTL.
    fn expire(&mut self, now: Instant) {
        while self.kept.front().is_some_and(|k| k.until <= now) {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some(kept) = self.kept.pop_front() {
            self.bytes.give(kept.push.len());
        }
    }
}

impl Log {
    fn new(bytes: Arc<Held>) -> Log {
        Log {
            state: tokio::sync::Mutex::new(LogState::new(bytes)),
            watcher: Mutex::new(None),
        }
    }

    fn watcher(&self) -> Option<Delivery> {
        let watcher = self.watcher.lock().unwrap_or_else(|p| p.into_inner());
        watcher.as_ref().filter(|d| d.is_alive()).cloned()
    }

    fn is_watched(&self) -> bool {
        self.watcher().is_some()
    }

    /// Whether the topic can be forgotten: unwatched, nobody present, and
    /// every kept message past its TTL (a state in use is not).
    fn is_freeable(&self, now: Instant) -> bool {
        if self.is_watched() {
            return false;
        }
        match self.state.try_lock() {
            Ok(state) => {
                state.members.is_empty() && state.kept.back().is_none_or(|k| k.until <= now)
            }
            Err(_) => false,
        }
    }
}

impl Default for InProcess {
    fn default() -> Self {
        InProcess::new(10_000)
    }
}

impl InProcess {
    /// How often a call looks for topics to free, at most.
    const SWEEP_EVERY: Duration = Duration::from_secs(1);

    /// The default bound on the bytes all kept messages hold: 256 MiB.
    pub const MAX_BYTES: usize = 256 << 20;

    /// A broker that holds at most `max_topics` topics at once, and
    /// [`MAX_BYTES`](Self::MAX_BYTES) of kept messages.
    pub fn new(max_topics: usize) -> InProcess {
        Self::with_limits(max_topics, Self::MAX_BYTES)
    }

    /// A broker that holds at most `max_topics` topics at once, and
    /// `max_bytes` of kept messages (their encoded pushes, all topics
    /// together).
    pub fn with_limits(max_topics: usize, max_bytes: usize) -> InProcess {
        InProcess {
            logs: Mutex::new(Logs {
                map: HashMap::new(),
                swept: Instant::now(),
            }),
            max_topics: max_topics.max(1),
            bytes: Arc::new(Held {
                used: std::sync::atomic::AtomicUsize::new(0),
                max: max_bytes,
            }),
        }
    }

    /// The bytes the kept messages of every topic hold now (messages past
    /// their TTL are let go at the next use of their topic, or within a
    /// second).
    pub fn history_bytes(&self) -> usize {
        self.bytes.used.load(Relaxed)
    }

    /// How many topics it holds now (freeing those it can first).
    pub fn topics(&self) -> usize {
        let mut logs = self.lock();
        logs.sweep(Instant::now());
        logs.map.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Logs> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, topic: &str) -> Option<Arc<Log>> {
        self.lock().map.get(topic).cloned()
    }

    /// The topic's log, created (within the bound) if it does not exist.
    fn log(&self, topic: &str) -> Result<Arc<Log>, BrokerError> {
        let mut logs = self.lock();
        let now = Instant::now();
        if now.duration_since(logs.swept) >= Self::SWEEP_EVERY {
            logs.sweep(now);
        }
        if let Some(log) = logs.map.get(topic) {
            return Ok(log.clone());
        }
        if logs.map.len() >= self.max_topics {
            logs.sweep(now);
            if logs.map.len() >= self.max_topics {
                return Err(BrokerError::Limit(format!(
                    "{} topics exist, the most this broker holds",
                    logs.map.len()
                )));
            }
        }
        let log = Arc::new(Log::new(self.bytes.clone()));
        logs.map.insert(topic.into(), log.clone());
        Ok(log)
    }

    async fn do_publish(
        &self,
        topic: &str,
        data: Data,
        keep: Retention,
    ) -> Result<Position, BrokerError> {
        let log = self.log(topic)?;
        let mut state = log.state.lock().await;
        let now = Instant::now();
        state.trim(keep, now);
        let seq = state.last + 1;
        // Encoded once: the local hub and the history share the push.
        let (push, data_at) = encode_push(topic, &state.epoch, seq, &data);
        drop(data);
        if keep.size > 0 && !keep.ttl.is_zero() {
            if !self.bytes.take(push.len()) {
                // Messages past their TTL elsewhere may make room (looked
                // for at most every 100 ms, however many publishes are
                // refused meanwhile).
                let mut logs = self.lock();
                if now.duration_since(logs.swept) >= Duration::from_millis(100) {
                    logs.sweep(now);
                }
                drop(logs);
                if !self.bytes.take(push.len()) {
                    return Err(BrokerError::Limit(format!(
                        "the history of every topic holds {} bytes, the most it may \
                         ({} bytes): publish refused",
                        self.history_bytes(),
                        self.bytes.max
                    )));
                }
            }
            state.kept.push_back(Kept {
                seq,
                push: push.clone(),
                data_at,
                until: now + keep.ttl,
            });
            state.trim(keep, now);
        }
        state.last = seq;
        let position = Position {
            epoch: state.epoch.clone(),
            seq,
        };
        // Delivered under the topic's lock: the next publish waits, so the
        // hub holds the topic's messages in sequence order.
        if let Some(delivery) = log.watcher() {
            delivery.encoded(Message::Text(push), seq).await;
        }
        Ok(position)
    }

    async fn do_history(
        &self,
        topic: &str,
        range: Range,
        keep: Retention,
    ) -> Result<History, BrokerError> {
        let log = self.log(topic)?;
        let mut state = log.state.lock().await;
        state.trim(keep, Instant::now());
        let entries = match range {
            Range::After(seq) => state
                .kept
                .iter()
                .filter(|k| k.seq > seq)
                .map(Kept::entry)
                .collect(),
            Range::Last(n) => {
                let skip = state.kept.len().saturating_sub(n);
                state.kept.iter().skip(skip).map(Kept::entry).collect()
            }
        };
        Ok(History {
            epoch: state.epoch.clone(),
            last: state.last,
            entries,
        })
    }

    async fn do_join(&self, topic: &str, member: Member, max: usize) -> Result<(), BrokerError> {
        let log = self.log(topic)?;
        let mut state = log.state.lock().await;
        if !state.members.contains_key(&member.client) && state.members.len() >= max {
            return Err(BrokerError::Limit(format!(
                "topic {topic:?} has {} members, the most its presence holds",
                state.members.len()
            )));
        }
        state.members.insert(member.client.clone(), member.clone());
        if let Some(delivery) = log.watcher() {
            delivery.join(&member).await;
        }
        Ok(())
    }

    async fn do_leave(&self, topic: &str, client: &str) -> Result<(), BrokerError> {
        let Some(log) = self.get(topic) else {
            return Ok(());
        };
        let mut state = log.state.lock().await;
        if state.members.remove(client).is_some() {
            if let Some(delivery) = log.watcher() {
                delivery.leave(client).await;
            }
        }
        Ok(())
    }

    async fn do_members(&self, topic: &str) -> Result<Vec<Member>, BrokerError> {
        let Some(log) = self.get(topic) else {
            return Ok(Vec::new());
        };
        let state = log.state.lock().await;
        let mut members: Vec<Member> = state.members.values().cloned().collect();
        members.sort_by(|a, b| a.client.cmp(&b.client));
        Ok(members)
    }
}

impl Broker for InProcess {
    fn watch<'a>(
        &'a self,
        topic: &'a str,
        delivery: Delivery,
        _: Retention,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let log = self.log(topic)?;
            *log.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(delivery);
            Ok(())
        })
    }

    fn unwatch(&self, topic: &str) {
        let log = self.get(topic);
        if let Some(log) = log {
            let mut watcher = log.watcher.lock().unwrap_or_else(|p| p.into_inner());
            if watcher.as_ref().is_some_and(|d| !d.is_alive()) {
                *watcher = None;
            }
        }
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        data: Data,
        keep: Retention,
    ) -> BoxFuture<'a, Result<Position, BrokerError>> {
        Box::pin(self.do_publish(topic, data, keep))
    }

    fn history<'a>(
        &'a self,
        topic: &'a str,
        range: Range,
        keep: Retention,
    ) -> BoxFuture<'a, Result<History, BrokerError>> {
        Box::pin(self.do_history(topic, range, keep))
    }

    fn join<'a>(
        &'a self,
        topic: &'a str,
        member: Member,
        max: usize,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.do_join(topic, member, max))
    }

    fn leave<'a>(
        &'a self,
        topic: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.do_leave(topic, client))
    }

    fn members<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Vec<Member>, BrokerError>> {
        Box::pin(self.do_members(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keep(size: usize, ttl_ms: u64) -> Retention {
        Retention {
            size,
            ttl: Duration::from_millis(ttl_ms),
        }
    }

    #[tokio::test]
    async fn numbers_keeps_and_reads_back_with_no_holes() {
        let broker = InProcess::default();
        for i in 1..=5u64 {
            let at = broker
                .publish("t", Data::json(&i).unwrap(), keep(3, 60_000))
                .await
                .unwrap();
            assert_eq!(at.seq, i);
        }
        let read = broker
            .history("t", Range::After(1), keep(3, 60_000))
            .await
            .unwrap();
        assert_eq!(read.last, 5);
        let seqs: Vec<u64> = read.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4, 5], "the last three kept");
        // The value is the slice of the push it was kept as.
        let entry = &read.entries[0];
        assert_eq!(entry.data.as_str(), "3");
        let push = entry.push.clone().unwrap().into_text().unwrap();
        assert!(push.ends_with(r#""seq":3,"data":3}"#), "{push}");
        let last = broker
            .history("t", Range::Last(1), keep(3, 60_000))
            .await
            .unwrap();
        assert_eq!(last.entries.len(), 1);
        assert_eq!(last.epoch, read.epoch);
    }

    /// A topic nobody watches is freed once its messages are past their TTL
    /// and nobody is present, and comes back with a new epoch.
    #[tokio::test]
    async fn a_topic_is_freed_after_its_ttl_and_starts_a_new_epoch() {
        let broker = InProcess::new(10);
        let first = broker
            .publish("t", Data::json("a").unwrap(), keep(10, 30))
            .await
            .unwrap();
        let member = Member {
            client: "c1".into(),
            info: None,
        };
        broker.join("m", member, 10).await.unwrap();
        assert_eq!(broker.topics(), 2);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(broker.topics(), 1, "the member keeps its topic");
        broker.leave("m", "c1").await.unwrap();
        assert_eq!(broker.topics(), 0);
        let again = broker
            .publish("t", Data::json("b").unwrap(), keep(10, 30))
            .await
            .unwrap();
        assert_eq!(again.seq, 1);
        assert_ne!(again.epoch, first.epoch);
    }

    #[tokio::test]
    async fn topics_and_members_are_bounded() {
        let broker = InProcess::new(2);
        for topic in ["a", "b"] {
            broker
                .publish(topic, Data::json(&1).unwrap(), keep(1, 60_000))
                .await
                .unwrap();
        }
        let err = broker
            .publish("c", Data::json(&1).unwrap(), keep(1, 60_000))
            .await
            .unwrap_err();
        assert!(matches!(err, BrokerError::Limit(_)), "{err}");
        for n in 0..2 {
            let member = Member {
                client: format!("c{n}").into(),
                info: None,
            };
            broker.join("a", member, 2).await.unwrap();
        }
        let member = Member {
            client: "c9".into(),
            info: None,
        };
        let err = broker.join("a", member, 2).await.unwrap_err();
        assert!(err.to_string().contains("2 members"), "{err}");
    }

    /// A flood of large messages into many topics: the kept bytes stay
    /// under the bound, the publish past it is refused (and not numbered),
    /// and room comes back as messages pass their TTL.
    #[tokio::test]
    async fn the_history_of_all_topics_is_bounded_in_bytes() {
        let broker = InProcess::with_limits(1_000, 64 * 1024);
        let big = Data::json(&"x".repeat(4000)).unwrap();
        let mut refused = 0;
        for i in 0..100 {
            let topic = format!("t{}", i % 10);
            match broker.publish(&topic, big.clone(), keep(100, 100)).await {
                Ok(_) => {}
                Err(BrokerError::Limit(why)) => {
                    assert!(why.contains("65536 bytes"), "{why}");
                    refused += 1;
                }
                Err(err) => panic!("{err}"),
            }
            assert!(broker.history_bytes() <= 64 * 1024);
        }
        assert!(refused >= 80, "only {refused} refused");
        // A refused publish got no number: the next kept one follows on.
        let read = broker
            .history("t0", Range::After(0), keep(100, 100))
            .await
            .unwrap();
        let seqs: Vec<u64> = read.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=read.last).collect::<Vec<_>>());
        // Past the TTL the room is back.
        tokio::time::sleep(Duration::from_millis(150)).await;
        broker
            .publish("t0", big.clone(), keep(100, 100))
            .await
            .unwrap();
        // The other topics' expired messages go at their next use or the
        // next sweep (counting the topics is one).
        assert_eq!(broker.topics(), 1);
        assert!(
            broker.history_bytes() < 8 * 1024,
            "{}",
            broker.history_bytes()
        );
        // A topic that keeps nothing is never refused for bytes.
        for _ in 0..100 {
            broker
                .publish("none", big.clone(), keep(0, 100))
                .await
                .unwrap();
        }
    }
}
