//! Pub/sub: topics with positions, history, resume and presence, and the
//! route that speaks the pub/sub protocol (`docs/PROTOCOL.md`).
//!
//! A [`PubSub`] node keeps one local [`Hub`] per topic with subscribers
//! here (in a [`Topics`] registry) and asks its [`Broker`] for everything
//! that must agree across nodes: sequence numbers, epochs, history and
//! presence. The broker delivers each message into the local hub once,
//! encoded as the protocol's `message` push, and every subscribed session's
//! send task forwards that one copy.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::broker::{
    self, Broker, BrokerError, Data, Delivery, Epoch, History, InProcess, Member, Position, Range,
    Retention,
};
use crate::config::HubConfig;
use crate::error::Error;
use crate::forward::{Forwarding, Item, NewForward, TopicStart};
use crate::hub::{Hub, RecvError, Subscription, TryRecvError};
use crate::message::{CloseCode, CloseReason, Message, close_reason};
use crate::metrics::Metrics;
use crate::request::Request;
use crate::session::{ForwardId, Outgoing, Session};
use crate::topics::{TopicError, Topics, TopicsConfig};

/// The protocol's subprotocol name, which the route selects when a client
/// offers it.
pub const SUBPROTOCOL: &str = "wshub.v1";

/// `wshub.js`, the protocol's browser client: dependency-free JavaScript
/// that connects, subscribes with handlers, publishes (a promise of the
/// seq), lists presence, and reconnects by itself, resuming each topic from
/// the last position it saw. Serve it next to the route; its reference is
/// `docs/WSHUB_JS.md`.
///
/// ```
/// use wshub::{PubSub, PubSubConfig, Server, WSHUB_JS};
///
/// let pubsub = PubSub::new(PubSubConfig::default()).unwrap();
/// let server = Server::new()
///     .page("/wshub.js", "text/javascript; charset=utf-8", WSHUB_JS)
///     .pubsub("/pubsub", &pubsub);
/// # drop(server);
/// ```
///
/// and in the page:
///
/// ```text
/// <script src="/wshub.js"></script>
/// <script>
///   const hub = new WsHub("/pubsub");
///   hub.subscribe("news", { message(data, meta) { console.log(meta.seq, data); } });
///   hub.publish("news", { text: "hi" }).then((seq) => console.log("published as", seq));
/// </script>
/// ```
pub const WSHUB_JS: &str = include_str!("../js/wshub.js");

/// What one topic keeps and sends, chosen by name with
/// [`PubSubConfig::config_for`].
#[derive(Clone, Debug)]
pub struct TopicConfig {
    /// The topic's local hub: buffer capacity and slow-client policy.
    ///
    /// Default: [`HubConfig::default`] with a capacity of 256 messages
    /// (`Suspend`). A hub's buffer is reserved when the topic is created,
    /// about 64 bytes a slot: 16 KiB per topic here, against 64 KiB for a
    /// plain hub's 1,024, since a node may hold thousands of topics (pages
    /// become resident as the buffer fills). A
    /// larger buffer absorbs longer bursts before the policy acts. Its
    /// `lag_notice` is replaced by the protocol's `gap` push.
    pub hub: HubConfig,
    /// How many of the latest messages a new subscriber (one without
    /// `since`) gets first, as Ktor's `MutableSharedFlow(replay = n)`.
    ///
    /// Default: 0. The history keeps at least this many, whatever
    /// [`history`](Self::history) says.
    pub replay: usize,
    /// How many of the latest messages the topic keeps for `history` and
    /// for clients that resume.
    ///
    /// Default: 100. Memory: up to this many messages per topic, for
    /// [`history_ttl`](Self::history_ttl) after each was published, even
    /// with nobody subscribed, within the node's
    /// [`max_history_bytes`](PubSubConfig::max_history_bytes) for all
    /// topics. 0 keeps nothing: a resume then recovers nothing and reports
    /// the gap.
    pub history: usize,
    /// How long a kept message stays.
    ///
    /// Default: 10 minutes: a client that was away for less recovers what
    /// the history still holds.
    pub history_ttl: Duration,
    /// Whether the topic tracks who is subscribed (`presence`).
    ///
    /// Default: true.
    pub presence: bool,
    /// Whether subscribers get `join` and `leave` pushes.
    ///
    /// Default: false: in a large topic every arrival would be a message
    /// to every member.
    pub presence_events: bool,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            hub: HubConfig::default().capacity(Self::CAPACITY),
            replay: 0,
            history: 100,
            history_ttl: Duration::from_secs(600),
            presence: true,
            presence_events: false,
        }
    }
}

impl TopicConfig {
    /// The default [`hub`](Self::hub) capacity.
    pub const CAPACITY: usize = 256;

    /// Sets [`hub`](Self::hub).
    #[must_use]
    pub fn hub(mut self, hub: HubConfig) -> Self {
        self.hub = hub;
        self
    }

    /// Sets [`replay`](Self::replay).
    #[must_use]
    pub fn replay(mut self, messages: usize) -> Self {
        self.replay = messages;
        self
    }

    /// Sets [`history`](Self::history).
    #[must_use]
    pub fn history(mut self, messages: usize) -> Self {
        self.history = messages;
        self
    }

    /// Sets [`history_ttl`](Self::history_ttl).
    #[must_use]
    pub fn history_ttl(mut self, ttl: Duration) -> Self {
        self.history_ttl = ttl;
        self
    }

    /// Sets [`presence`](Self::presence).
    #[must_use]
    pub fn presence(mut self, on: bool) -> Self {
        self.presence = on;
        self
    }

    /// Sets [`presence_events`](Self::presence_events).
    #[must_use]
    pub fn presence_events(mut self, on: bool) -> Self {
        self.presence_events = on;
        self
    }

    fn retention(&self) -> Retention {
        Retention {
            size: self.history.max(self.replay),
            ttl: self.history_ttl,
        }
    }
}

/// A protocol client, as the authorization hooks see it.
#[derive(Clone, Debug)]
pub struct Client {
    /// The id the server gave the connection (`c` and the session id).
    pub id: Arc<str>,
    /// What [`PubSubConfig::client_info`] attached.
    pub info: Option<Data>,
    /// The upgrade request (path, query, the headers the server keeps).
    pub request: Arc<Request>,
}

type Authorize = Arc<dyn Fn(&Client, &str) -> Result<(), String> + Send + Sync>;
type Identify = Arc<dyn Fn(&Request) -> Option<Data> + Send + Sync>;
type Choose = Arc<dyn Fn(&str) -> Option<TopicConfig> + Send + Sync>;

/// What a [`PubSub`] node allows, and each topic's settings.
#[derive(Clone)]
pub struct PubSubConfig {
    /// How many topics may exist at once (local hubs, and topics the
    /// embedded broker keeps).
    ///
    /// Default: 10,000.
    pub max_topics: usize,
    /// The longest topic name, in bytes.
    ///
    /// Default: 128.
    pub max_name_len: usize,
    /// The settings of a topic that [`config_for`](Self::config_for) gives
    /// none for.
    pub topic: TopicConfig,
    /// How many topics one connection may subscribe to at once.
    ///
    /// Default: 100. Each costs the connection a few hundred bytes.
    pub max_subscriptions: usize,
    /// The most messages one `history` command returns, and its default
    /// `limit`.
    ///
    /// Default: 100.
    pub max_history: usize,
    /// The most members one topic's presence holds; a subscribe past it
    /// is refused with `limit`.
    ///
    /// Default: 10,000.
    pub max_members: usize,
    /// The most bytes the kept messages of every topic hold together, with
    /// the embedded broker ([`PubSub::new`]); a publish that would be kept
    /// past it is refused with `limit`.
    ///
    /// Default: 256 MiB ([`InProcess::MAX_BYTES`]). Without it, history
    /// memory is bounded only by `max_topics` × each topic's `history` ×
    /// the largest message a client may send.
    pub max_history_bytes: usize,
    /// Where each topic's hub is exported (see [`TopicsConfig::metrics`]).
    ///
    /// Default: `None`.
    pub metrics: Option<Metrics>,
    choose: Option<Choose>,
    on_subscribe: Option<Authorize>,
    on_publish: Option<Authorize>,
    client_info: Option<Identify>,
}

impl Default for PubSubConfig {
    fn default() -> Self {
        PubSubConfig {
            max_topics: 10_000,
            max_name_len: 128,
            topic: TopicConfig::default(),
            max_subscriptions: 100,
            max_history: 100,
            max_members: 10_000,
            max_history_bytes: InProcess::MAX_BYTES,
            metrics: None,
            choose: None,
            on_subscribe: None,
            on_publish: None,
            client_info: None,
        }
    }
}

impl fmt::Debug for PubSubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSubConfig")
            .field("max_topics", &self.max_topics)
            .field("max_name_len", &self.max_name_len)
            .field("topic", &self.topic)
            .field("max_subscriptions", &self.max_subscriptions)
            .field("max_history", &self.max_history)
            .field("max_members", &self.max_members)
            .field("max_history_bytes", &self.max_history_bytes)
            .finish_non_exhaustive()
    }
}

impl PubSubConfig {
    /// Sets [`max_topics`](Self::max_topics).
    #[must_use]
    pub fn max_topics(mut self, max: usize) -> Self {
        self.max_topics = max;
        self
    }

    /// Sets [`max_name_len`](Self::max_name_len).
    #[must_use]
    pub fn max_name_len(mut self, bytes: usize) -> Self {
        self.max_name_len = bytes;
        self
    }

    /// Sets [`topic`](Self::topic), the default for every topic.
    #[must_use]
    pub fn topic(mut self, config: TopicConfig) -> Self {
        self.topic = config;
        self
    }

    /// Sets [`max_subscriptions`](Self::max_subscriptions).
    #[must_use]
    pub fn max_subscriptions(mut self, max: usize) -> Self {
        self.max_subscriptions = max;
        self
    }

    /// Sets [`max_history`](Self::max_history).
    #[must_use]
    pub fn max_history(mut self, max: usize) -> Self {
        self.max_history = max;
        self
    }

    /// Sets [`max_members`](Self::max_members).
    #[must_use]
    pub fn max_members(mut self, max: usize) -> Self {
        self.max_members = max;
        self
    }

    /// Sets [`max_history_bytes`](Self::max_history_bytes).
    #[must_use]
    pub fn max_history_bytes(mut self, bytes: usize) -> Self {
        self.max_history_bytes = bytes;
        self
    }

    /// Sets [`metrics`](Self::metrics).
    #[must_use]
    pub fn metrics(mut self, metrics: Option<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Settings per topic name: `choose` is asked when a topic is used;
    /// `None` takes the default [`topic`](Self::topic). Give one name the
    /// same answer every time.
    ///
    /// ```
    /// use wshub::{PubSubConfig, TopicConfig};
    ///
    /// let config = PubSubConfig::default().config_for(|name| {
    ///     // Chat rooms replay their last 20 lines and announce arrivals.
    ///     name.starts_with("room:")
    ///         .then(|| TopicConfig::default().replay(20).presence_events(true))
    /// });
    /// # let _ = config;
    /// ```
    #[must_use]
    pub fn config_for(
        mut self,
        choose: impl Fn(&str) -> Option<TopicConfig> + Send + Sync + 'static,
    ) -> Self {
        self.choose = Some(Arc::new(choose));
        self
    }

    /// Decides each `subscribe`: `Err(why)` refuses it with `not_allowed`
    /// and `why` as the message. Default: every subscribe is allowed.
    ///
    /// ```
    /// use wshub::PubSubConfig;
    ///
    /// // Everyone may read; a "user:NAME" topic only its user.
    /// let config = PubSubConfig::default().on_subscribe(|client, topic| {
    ///     match topic.strip_prefix("user:") {
    ///         Some(name) if client.request.query_param("user").as_deref() != Some(name) => {
    ///             Err(format!("{topic} is {name}'s own"))
    ///         }
    ///         _ => Ok(()),
    ///     }
    /// });
    /// # let _ = config;
    /// ```
    #[must_use]
    pub fn on_subscribe(
        mut self,
        hook: impl Fn(&Client, &str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.on_subscribe = Some(Arc::new(hook));
        self
    }

    /// Decides each `publish`, as [`on_subscribe`](Self::on_subscribe) does.
    /// Default: every publish is allowed.
    #[must_use]
    pub fn on_publish(
        mut self,
        hook: impl Fn(&Client, &str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.on_publish = Some(Arc::new(hook));
        self
    }

    /// What each connection shows in presence as its `info` (a user name
    /// from the request, say). Runs once per connection. Default: none.
    ///
    /// ```
    /// use wshub::{Data, PubSubConfig};
    ///
    /// let config = PubSubConfig::default().client_info(|request| {
    ///     let name = request.query_param("name")?;
    ///     Data::json(&serde_json::json!({ "name": name })).ok()
    /// });
    /// # let _ = config;
    /// ```
    #[must_use]
    pub fn client_info(
        mut self,
        hook: impl Fn(&Request) -> Option<Data> + Send + Sync + 'static,
    ) -> Self {
        self.client_info = Some(Arc::new(hook));
        self
    }

    fn topic_config(&self, name: &str) -> TopicConfig {
        self.choose
            .as_ref()
            .and_then(|choose| choose(name))
            .unwrap_or_else(|| self.topic.clone())
    }
}

/// Why a pub/sub call failed: each is one of the protocol's error codes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PubSubError {
    /// A malformed command (`bad_request`).
    #[error("{0}")]
    BadRequest(String),
    /// A topic name that is empty, too long, or has a character outside the
    /// allowed set (`bad_topic`).
    #[error("{0}")]
    BadTopic(String),
    /// The authorization hook refused (`not_allowed`).
    #[error("{0}")]
    NotAllowed(String),
    /// A bound was reached: topics, subscriptions, members, the publish
    /// rate (`limit`).
    #[error("{0}")]
    Limit(String),
    /// The broker cannot be reached (`unavailable`).
    #[error("{0}")]
    Unavailable(String),
}

impl PubSubError {
    /// The protocol's error code.
    pub fn code(&self) -> &'static str {
        match self {
            PubSubError::BadRequest(_) => "bad_request",
            PubSubError::BadTopic(_) => "bad_topic",
            PubSubError::NotAllowed(_) => "not_allowed",
            PubSubError::Limit(_) => "limit",
            PubSubError::Unavailable(_) => "unavailable",
        }
    }
}

impl From<TopicError> for PubSubError {
    fn from(err: TopicError) -> Self {
        match err {
            TopicError::BadName(why) => PubSubError::BadTopic(why),
            TopicError::TooMany(why) => PubSubError::Limit(why),
            TopicError::Config(why) => PubSubError::Unavailable(why),
        }
    }
}

impl From<BrokerError> for PubSubError {
    fn from(err: BrokerError) -> Self {
        match err {
            BrokerError::Unavailable(why) => PubSubError::Unavailable(why),
            BrokerError::Limit(why) => PubSubError::Limit(why),
        }
    }
}

/// A subscription to a topic, with where it starts.
///
/// Its [`backlog`](Self::backlog) (a `gap` push, then replayed or
/// recovered `message` pushes) comes first, then the subscription's own
/// messages from `seq + 1` on; [`forward`](Self::forward) hands both to a
/// session in that order.
pub struct Subscribed {
    /// Where the client stands once the backlog is sent.
    pub position: Position,
    /// Whether everything after the client's `since` was recovered (true
    /// for a subscribe without `since`).
    pub recovered: bool,
    /// How many messages the client will never get (0 if none or unknown).
    pub missed: u64,
    /// Whether `since` named another epoch.
    pub epoch_changed: bool,
    backlog: VecDeque<Message>,
    subscription: Subscription,
}

impl fmt::Debug for Subscribed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscribed")
            .field("position", &self.position)
            .field("recovered", &self.recovered)
            .field("missed", &self.missed)
            .field("epoch_changed", &self.epoch_changed)
            .field("backlog", &self.backlog.len())
            .finish()
    }
}

impl Subscribed {
    /// The pushes to send before the subscription's own messages.
    pub fn backlog(&self) -> &VecDeque<Message> {
        &self.backlog
    }

    /// Reads the topic here, in this process, instead of forwarding it to a
    /// session: the same pushes a client would get, in the same order.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use wshub::{Data, PubSub, PubSubConfig, TopicConfig};
    ///
    /// let pubsub = PubSub::new(PubSubConfig::default().topic(TopicConfig::default().replay(1))).unwrap();
    /// pubsub.publish("news", Data::json("first").unwrap()).await.unwrap();
    /// let mut news = pubsub.subscribe("news", None).await.unwrap().into_receiver();
    /// pubsub.publish("news", Data::json("second").unwrap()).await.unwrap();
    /// for seq in [1, 2] {
    ///     let push: serde_json::Value = serde_json::from_str(news.recv().await.unwrap().to_text().unwrap()).unwrap();
    ///     assert_eq!((push["op"].as_str(), push["seq"].as_u64()), (Some("message"), Some(seq)));
    /// }
    /// # }
    /// ```
    pub fn into_receiver(self) -> TopicReceiver {
        let start = TopicStart {
            backlog: self.backlog,
            seq: self.position.seq,
        };
        TopicReceiver {
            fwd: Forwarding::new(NewForward {
                sub: self.subscription,
                key: 0,
                topic: Some(start),
            }),
        }
    }

    /// Has `out`'s send task write the backlog, then forward the topic's
    /// messages after it, with no gap and no duplicate between the two.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the session is closing.
    pub async fn forward(self, out: &Outgoing) -> Result<ForwardId, Error> {
        let start = TopicStart {
            backlog: self.backlog,
            seq: self.position.seq,
        };
        out.forward_from(self.subscription, Some(start)).await
    }
}

/// A topic read in this process ([`Subscribed::into_receiver`]): its
/// backlog, then its pushes (`message`, `gap`, `join`, `leave`) as the
/// protocol's text, each topic's `seq` strictly increasing and every jump
/// announced by a `gap` with the count skipped.
///
/// Read it, or drop it: under [`Suspend`](crate::Policy::Suspend) an
/// unread receiver holds the topic's publishers back, as a hub
/// [`Subscription`] does.
pub struct TopicReceiver {
    fwd: Forwarding,
}

impl fmt::Debug for TopicReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicReceiver").finish_non_exhaustive()
    }
}

impl TopicReceiver {
    /// Waits for the next push.
    ///
    /// # Errors
    ///
    /// [`RecvError::Lagged`] under [`Policy::Disconnect`](crate::Policy::Disconnect)
    /// when this receiver fell behind (a session would be closed);
    /// [`RecvError::Closed`] if the topic's hub is closed.
    pub async fn recv(&mut self) -> Result<Message, RecvError> {
        match std::future::poll_fn(|cx| self.fwd.poll_next(cx)).await {
            Item::Backlog(msg) | Item::Live(Ok(msg)) => Ok(msg),
            Item::Live(Err(err)) => Err(err),
        }
    }

    /// The next push if one is waiting.
    ///
    /// # Errors
    ///
    /// As [`recv`](Self::recv), plus [`TryRecvError::Empty`].
    pub fn try_recv(&mut self) -> Result<Message, TryRecvError> {
        match self.fwd.try_next() {
            Some(Item::Backlog(msg) | Item::Live(Ok(msg))) => Ok(msg),
            Some(Item::Live(Err(RecvError::Lagged(n)))) => Err(TryRecvError::Lagged(n)),
            Some(Item::Live(Err(RecvError::Closed))) => Err(TryRecvError::Closed),
            None => Err(TryRecvError::Empty),
        }
    }
}

/// A pub/sub node: topics with positions, history, resume and presence,
/// on a [`Broker`] ([`InProcess`] unless given another). Cloning shares it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use wshub::{Data, PubSub, PubSubConfig, Server};
///
/// let pubsub = PubSub::new(PubSubConfig::default()).unwrap();
/// let at = pubsub.publish("news", Data::json("hello").unwrap()).await.unwrap();
/// assert_eq!(at.seq, 1);
/// // The history keeps it for clients that come later or come back.
/// let history = pubsub.history("news", 10).await.unwrap();
/// assert_eq!(history.entries[0].data.as_str(), "\"hello\"");
///
/// // The protocol, for browsers and other clients:
/// let server = Server::new().pubsub("/pubsub", &pubsub);
/// # drop(server);
/// # }
/// ```
#[derive(Clone)]
pub struct PubSub {
    inner: Arc<Inner>,
}

struct Inner {
    broker: Arc<dyn Broker>,
    topics: Topics,
    config: PubSubConfig,
}

impl fmt::Debug for PubSub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSub")
            .field("config", &self.inner.config)
            .field("local_topics", &self.inner.topics.len())
            .finish_non_exhaustive()
    }
}

/// What a node keeps with each local topic hub.
struct Local {
    config: TopicConfig,
    /// Set once the broker delivers the topic here.
    watched: tokio::sync::OnceCell<()>,
}

impl PubSub {
    /// A node on the embedded [`InProcess`] broker.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid configuration (see [`Topics::new`]).
    pub fn new(config: PubSubConfig) -> Result<PubSub, Error> {
        let broker = Arc::new(InProcess::with_limits(
            config.max_topics,
            config.max_history_bytes,
        ));
        Self::with_broker(config, broker)
    }

    /// A node on `broker` (keep a clone of the `Arc` to look at the
    /// broker's own state, such as [`InProcess::topics`]).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn with_broker(config: PubSubConfig, broker: Arc<dyn Broker>) -> Result<PubSub, Error> {
        let chooser = config.clone();
        let topics = Topics::new(
            TopicsConfig::default()
                .max_topics(config.max_topics)
                .max_name_len(config.max_name_len)
                .hub_config(config.topic.hub.clone())
                .metrics(config.metrics.clone())
                .config_for(move |name| {
                    let name: Arc<str> = name.into();
                    let hub = chooser.topic_config(&name).hub;
                    Some(hub.lag_notice(move |missed| broker::encode_gap(&name, missed)))
                }),
        )?;
        Ok(PubSub {
            inner: Arc::new(Inner {
                broker,
                topics,
                config,
            }),
        })
    }

    /// The node's configuration.
    pub fn config(&self) -> &PubSubConfig {
        &self.inner.config
    }

    /// The registry of this node's local topic hubs (those with
    /// subscribers here).
    pub fn topics(&self) -> &Topics {
        &self.inner.topics
    }

    fn check_name(&self, topic: &str) -> Result<(), PubSubError> {
        Ok(self.inner.topics.check_name(topic)?)
    }

    /// Publishes `data` on `topic`: every subscriber on every node of the
    /// broker gets it, and the history keeps it. Returns its position.
    ///
    /// Under [`Suspend`](crate::Policy::Suspend) this waits while a local
    /// subscriber keeps the topic's buffer full (for at most its
    /// `stall_timeout`, after which that subscriber is cut off).
    ///
    /// # Errors
    ///
    /// [`PubSubError::BadTopic`], [`PubSubError::Limit`] (too many
    /// topics), [`PubSubError::Unavailable`] (the broker).
    pub async fn publish(&self, topic: &str, data: Data) -> Result<Position, PubSubError> {
        self.check_name(topic)?;
        let keep = self.inner.config.topic_config(topic).retention();
        Ok(self.inner.broker.publish(topic, data, keep).await?)
    }

    /// The latest `limit` messages `topic` keeps (at most
    /// [`max_history`](PubSubConfig::max_history)), oldest first.
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish).
    pub async fn history(&self, topic: &str, limit: usize) -> Result<History, PubSubError> {
        self.check_name(topic)?;
        let keep = self.inner.config.topic_config(topic).retention();
        let limit = limit.min(self.inner.config.max_history);
        Ok(self
            .inner
            .broker
            .history(topic, Range::Last(limit), keep)
            .await?)
    }

    /// Who is subscribed to `topic` now, on every node.
    ///
    /// # Errors
    ///
    /// [`PubSubError::BadTopic`], [`PubSubError::Unavailable`].
    pub async fn presence(&self, topic: &str) -> Result<Vec<Member>, PubSubError> {
        self.check_name(topic)?;
        Ok(self.inner.broker.members(topic).await?)
    }

    /// Subscribes to `topic`: without `since`, from now on (after the
    /// topic's replay, if it has one); with `since`, first every kept
    /// message after it, then live, with no gap and no duplicate between.
    ///
    /// # Errors
    ///
    /// [`PubSubError::BadTopic`], [`PubSubError::Limit`],
    /// [`PubSubError::Unavailable`]; [`PubSubError::BadRequest`] for a
    /// `since` past the topic's last message in the same epoch.
    pub async fn subscribe(
        &self,
        topic: &str,
        since: Option<&Position>,
    ) -> Result<Subscribed, PubSubError> {
        let (hub, config) = self.local(topic).await?;
        // Subscribed before the history is read: every message after the
        // read's `last` reaches this subscription.
        let subscription = hub.subscribe();
        let keep = config.retention();
        let broker = &self.inner.broker;
        let mut backlog = VecDeque::new();
        let (history, missed, recovered, epoch_changed) = match since {
            None => {
                let history = broker
                    .history(topic, Range::Last(config.replay), keep)
                    .await?;
                (history, 0, true, false)
            }
            Some(since) => {
                let history = broker.history(topic, Range::After(since.seq), keep).await?;
                if history.epoch == since.epoch {
                    if since.seq > history.last {
                        return Err(PubSubError::BadRequest(format!(
                            "since.seq {} is past the topic's last message ({})",
                            since.seq, history.last
                        )));
                    }
                    let first = history.entries.first().map_or(history.last + 1, |e| e.seq);
                    let missed = first - since.seq - 1;
                    (history, missed, missed == 0, false)
                } else {
                    // The history the client knew is gone: it gets all that
                    // the new epoch keeps, and a gap for what it does not.
                    let history = broker.history(topic, Range::After(0), keep).await?;
                    let first = history.entries.first().map_or(history.last + 1, |e| e.seq);
                    (history, first - 1, false, true)
                }
            }
        };
        if missed > 0 {
            backlog.push_back(broker::encode_gap(topic, missed));
        }
        for entry in history.entries.iter() {
            backlog.push_back(push_of(topic, &history.epoch, entry));
        }
        Ok(Subscribed {
            position: Position {
                epoch: history.epoch,
                seq: history.last,
            },
            recovered,
            missed,
            epoch_changed,
            backlog,
            subscription,
        })
    }

    /// The local hub of `topic`, watched by the broker.
    async fn local(&self, topic: &str) -> Result<(Hub, TopicConfig), PubSubError> {
        let hub = self.inner.topics.hub(topic)?;
        let local = hub
            .ext(|| {
                let broker = self.inner.broker.clone();
                let name: Arc<str> = topic.into();
                hub.on_free(move || broker.unwatch(&name));
                Local {
                    config: self.inner.config.topic_config(topic),
                    watched: tokio::sync::OnceCell::new(),
                }
            })
            .ok_or_else(|| PubSubError::Unavailable("topic hub of another kind".into()))?;
        local
            .watched
            .get_or_try_init(|| {
                let delivery = Delivery::new(topic, &hub, local.config.presence_events);
                self.inner
                    .broker
                    .watch(topic, delivery, local.config.retention())
            })
            .await?;
        let config = local.config.clone();
        Ok((hub, config))
    }

    /// A handler for [`Server::route`](crate::Server::route) that speaks the
    /// protocol.
    ///
    /// [`Server::pubsub`](crate::Server::pubsub) also selects the protocol's
    /// subprotocol; with this handler on a route of your own, list
    /// [`SUBPROTOCOL`] in [`Config::subprotocols`](crate::Config::subprotocols).
    pub fn route(
        &self,
    ) -> impl Fn(Session) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync + 'static
    {
        let pubsub = self.clone();
        move |session| {
            let pubsub = pubsub.clone();
            Box::pin(async move {
                pubsub.serve(session).await;
            })
        }
    }

    /// Speaks the protocol on `session` until it closes; returns why.
    ///
    /// Every command gets a reply with its `id`; a malformed one gets a
    /// `bad_request` reply and the connection stays open. When the session
    /// ends, however it ends, the client leaves the presence of every topic
    /// it was subscribed to.
    pub async fn serve(&self, mut session: Session) -> CloseReason {
        let request = session.request_arc();
        let client = Client {
            id: self.inner.broker.client_id(session.id()),
            info: self
                .inner
                .config
                .client_info
                .as_ref()
                .and_then(|identify| identify(&request)),
            request,
        };
        let mut conn = Connection {
            pubsub: self.clone(),
            out: session.outgoing(),
            bucket: session.publish_bucket(),
            subscribed: HashMap::new(),
            pending: None,
            close_after: None,
            members: Leaves {
                broker: self.inner.broker.clone(),
                client: client.id.clone(),
                topics: Vec::new(),
            },
            client,
        };
        while let Some(msg) = session.recv().await {
            // Once a close is under way, what the client still sends is
            // read (to see its Close) and not acted on.
            if conn.out.is_closed() {
                continue;
            }
            let reply = match msg {
                Message::Text(text) => conn.command(&text).await,
                _ => error_reply(
                    "null",
                    &PubSubError::BadRequest("commands are JSON text frames".into()),
                ),
            };
            if conn.out.send(reply).await.is_err() {
                break;
            }
            if let Some(reason) = conn.close_after.take() {
                tracing::debug!("publish rate limit exceeded");
                conn.out.close(reason);
            }
            if let Some((topic, subscribed)) = conn.pending.take() {
                match subscribed.forward(&conn.out).await {
                    Ok(id) => {
                        conn.subscribed.insert(topic, id);
                    }
                    Err(_) => break,
                }
            }
        }
        conn.members.leave_all().await;
        session
            .close_reason()
            .unwrap_or_else(|| close_reason(CloseCode::Abnormal, "connection ended"))
    }
}

/// One protocol connection's state.
struct Connection {
    pubsub: PubSub,
    client: Client,
    out: Outgoing,
    bucket: Option<crate::session::Bucket>,
    subscribed: HashMap<Arc<str>, ForwardId>,
    /// A subscription whose reply is on its way: forwarded right after.
    pending: Option<(Arc<str>, Subscribed)>,
    /// A close to start once the reply is queued (the client learns why).
    close_after: Option<CloseReason>,
    members: Leaves,
}

/// The topics whose presence a client is in: left when the connection
/// ends, even if its handler is dropped mid-way.
struct Leaves {
    broker: Arc<dyn Broker>,
    client: Arc<str>,
    topics: Vec<Arc<str>>,
}

impl Leaves {
    async fn leave_all(&mut self) {
        for topic in std::mem::take(&mut self.topics) {
            let _ = self.broker.leave(&topic, &self.client).await;
        }
    }

    async fn leave(&mut self, topic: &str) {
        if let Some(at) = self.topics.iter().position(|t| &**t == topic) {
            self.topics.swap_remove(at);
            let _ = self.broker.leave(topic, &self.client).await;
        }
    }
}

impl Drop for Leaves {
    fn drop(&mut self) {
        if self.topics.is_empty() {
            return;
        }
        let (broker, client, topics) = (
            self.broker.clone(),
            self.client.clone(),
            std::mem::take(&mut self.topics),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for topic in topics {
                    let _ = broker.leave(&topic, &client).await;
                }
            });
        }
    }
}

/// A command as sent: every field kept as raw JSON, read one by one so
/// that each mistake gets its own message.
#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    op: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    topic: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    since: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    limit: Option<&'a RawValue>,
}

/// A field that is present, `null` included.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct Since {
    epoch: String,
    seq: u64,
}

fn bad(why: impl Into<String>) -> PubSubError {
    PubSubError::BadRequest(why.into())
}

impl Connection {
    /// Runs one command; the reply to send.
    async fn command(&mut self, text: &str) -> Message {
        // A struct would also take an array, by position.
        if !text.trim_start().starts_with('{') {
            return error_reply("null", &bad("a command is a JSON object"));
        }
        let raw: Raw<'_> = match serde_json::from_str(text) {
            Ok(raw) => raw,
            Err(err) => {
                return error_reply("null", &bad(format!("not a JSON command object: {err}")));
            }
        };
        let id = match raw.id {
            None => "null",
            Some(id) if id.get().starts_with('"') || is_number(id.get()) => id.get(),
            Some(_) => return error_reply("null", &bad("id must be a number or a string")),
        };
        match self.run(&raw).await {
            Ok(fields) => Message::text(format!(r#"{{"id":{id},"ok":true{fields}}}"#)),
            Err(err) => error_reply(id, &err),
        }
    }

    async fn run(&mut self, raw: &Raw<'_>) -> Result<String, PubSubError> {
        let op: String = match raw.op {
            Some(op) => serde_json::from_str(op.get()).map_err(|_| bad("op must be a string"))?,
            None => return Err(bad("missing field op")),
        };
        let topic = || -> Result<String, PubSubError> {
            let topic = raw
                .topic
                .ok_or_else(|| bad(format!("{op} needs a topic")))?;
            serde_json::from_str(topic.get()).map_err(|_| bad("topic must be a string"))
        };
        match op.as_str() {
            "subscribe" => {
                let topic = topic()?;
                let since = match raw.since {
                    None => None,
                    Some(since) if since.get() == "null" => None,
                    Some(since) => {
                        let since: Since = serde_json::from_str(since.get()).map_err(|_| {
                            bad(r#"since must be {"epoch": "<string>", "seq": <integer ≥ 0>}"#)
                        })?;
                        Some(Position {
                            epoch: Epoch::new(since.epoch),
                            seq: since.seq,
                        })
                    }
                };
                self.subscribe(&topic, since.as_ref()).await
            }
            "unsubscribe" => {
                let topic = topic()?;
                self.pubsub.check_name(&topic)?;
                if let Some(id) = self.subscribed.remove(topic.as_str()) {
                    let _ = self.out.unforward(id).await;
                    self.members.leave(&topic).await;
                }
                Ok(String::new())
            }
            "publish" => {
                let topic = topic()?;
                let data = raw.data.ok_or_else(|| bad("publish needs data"))?;
                self.pubsub.check_name(&topic)?;
                self.authorize(self.pubsub.inner.config.on_publish.as_ref(), &topic)?;
                if let Some(bucket) = self.bucket.as_mut() {
                    if !bucket.take() {
                        if bucket.excess() == crate::Excess::Close {
                            self.close_after = Some(close_reason(
                                CloseCode::Policy,
                                "publish rate limit exceeded",
                            ));
                        }
                        return Err(PubSubError::Limit("publish rate limit exceeded".into()));
                    }
                }
                let position = self
                    .pubsub
                    .publish(&topic, Data::from_trusted(data.get()))
                    .await?;
                Ok(format!(r#","seq":{}"#, position.seq))
            }
            "presence" => {
                let topic = topic()?;
                let members = self.pubsub.presence(&topic).await?;
                let list: Vec<String> = members.iter().map(broker::encode_member).collect();
                Ok(format!(
                    r#","count":{},"members":[{}]"#,
                    list.len(),
                    list.join(",")
                ))
            }
            "history" => {
                let topic = topic()?;
                let max = self.pubsub.inner.config.max_history;
                let limit = match raw.limit {
                    None => max,
                    Some(limit) => match serde_json::from_str::<u64>(limit.get()) {
                        Ok(limit) if limit >= 1 => usize::try_from(limit).unwrap_or(max).min(max),
                        _ => return Err(bad("limit must be an integer ≥ 1")),
                    },
                };
                let history = self.pubsub.history(&topic, limit).await?;
                let mut reply = format!(
                    r#","epoch":{},"messages":["#,
                    broker::json_str(history.epoch.as_str())
                );
                for (n, entry) in history.entries.iter().enumerate() {
                    if n > 0 {
                        reply.push(',');
                    }
                    if let Message::Text(push) = push_of(&topic, &history.epoch, entry) {
                        reply.push_str(&push);
                    }
                }
                reply.push(']');
                Ok(reply)
            }
            other => Err(bad(format!(
                "unknown op {other:?} (subscribe, unsubscribe, publish, presence, history)"
            ))),
        }
    }

    fn authorize(&self, hook: Option<&Authorize>, topic: &str) -> Result<(), PubSubError> {
        match hook {
            Some(hook) => hook(&self.client, topic).map_err(PubSubError::NotAllowed),
            None => Ok(()),
        }
    }

    async fn subscribe(
        &mut self,
        topic: &str,
        since: Option<&Position>,
    ) -> Result<String, PubSubError> {
        self.pubsub.check_name(topic)?;
        if self.subscribed.contains_key(topic) {
            return Err(bad(format!(
                "already subscribed to {topic:?}; unsubscribe first"
            )));
        }
        let config = &self.pubsub.inner.config;
        if self.subscribed.len() >= config.max_subscriptions {
            return Err(PubSubError::Limit(format!(
                "{} subscriptions, the most one connection may hold",
                self.subscribed.len()
            )));
        }
        self.authorize(config.on_subscribe.as_ref(), topic)?;
        let subscribed = self.pubsub.subscribe(topic, since).await?;
        if config.topic_config(topic).presence {
            let member = Member {
                client: self.client.id.clone(),
                info: self.client.info.clone(),
            };
            self.pubsub
                .inner
                .broker
                .join(topic, member, config.max_members)
                .await?;
            self.members.topics.push(topic.into());
        }
        let reply = format!(
            r#","epoch":{},"seq":{},"recovered":{},"client":{}"#,
            broker::json_str(subscribed.position.epoch.as_str()),
            subscribed.position.seq,
            subscribed.recovered,
            broker::json_str(&self.client.id)
        );
        // The reply goes ahead of the topic's pushes: it is queued first,
        // and the subscription is handed to the send task right after it.
        self.pending = Some((topic.into(), subscribed));
        Ok(reply)
    }
}

/// A kept message's push: the broker's own if it has one, else encoded here.
fn push_of(topic: &str, epoch: &Epoch, entry: &broker::Entry) -> Message {
    match &entry.push {
        Some(push) => push.clone(),
        None => broker::encode_message(topic, epoch, entry.seq, &entry.data),
    }
}

fn is_number(text: &str) -> bool {
    text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
}

fn error_reply(id: &str, err: &PubSubError) -> Message {
    Message::text(format!(
        r#"{{"id":{id},"ok":false,"error":{{"code":"{}","message":{}}}}}"#,
        err.code(),
        broker::json_str(&err.to_string())
    ))
}
