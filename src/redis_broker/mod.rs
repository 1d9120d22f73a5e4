//! A [`Broker`] on Redis: many nodes share topics, history, resume and
//! presence.

mod scripts;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use ::redis::{RedisError, Value};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::broker::{
    Broker, BrokerError, Data, Delivery, Entry, Epoch, History, Member, Position, Range, Retention,
};
use crate::message::Utf8Bytes;
use scripts::Scripts;

/// How a [`RedisBroker`] talks to Redis: its keys' prefix, its bounds and
/// its timers. Every default is stated with its trade-off.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    prefix: String,
    timeout: Duration,
    lease: Duration,
    probe_every: Duration,
    probe_timeout: Duration,
    queue: usize,
    backoff_max: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            prefix: "wshub:".into(),
            timeout: Duration::from_secs(2),
            lease: Duration::from_secs(10),
            probe_every: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(3),
            queue: 1024,
            backoff_max: Duration::from_secs(1),
        }
    }
}

impl RedisConfig {
    /// The prefix of every key and channel (`"wshub:"`): give each
    /// application sharing a Redis its own.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long any one call to Redis may take before it fails with
    /// [`BrokerError::Unavailable`] (2 s; also the bound on connecting).
    /// Shorter fails faster while Redis is away; too short fails calls that
    /// a busy Redis would have answered. A publish that timed out may still
    /// have been published.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long a node's presence entries outlive it (10 s). The node
    /// renews its lease every third of it; when it stops (a crash, a
    /// partition), its members are gone from every read within the lease,
    /// and the other nodes send their leave events within a third more.
    /// Shorter clears ghosts sooner; a node stalled for longer than the
    /// lease (a long pause) loses its members until it renews, and then
    /// joins them again.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(300));
        self
    }

    /// How often the node sends a probe through its subscription
    /// connection (1 s), and how long the probe may take to come back
    /// before the connection counts as silent and is replaced (3 s). A
    /// connection can stay up while delivery stopped; this bounds how long
    /// that goes unnoticed, at the cost of one small publish per interval.
    pub fn probe(mut self, every: Duration, timeout: Duration) -> Self {
        self.probe_every = every.max(Duration::from_millis(10));
        self.probe_timeout = timeout.max(self.probe_every);
        self
    }

    /// How many messages of one topic may wait between the subscription
    /// connection and the topic's local hub (1,024). Past it, messages are
    /// let go and the topic catches up from the history instead, so a
    /// local hub held back (under [`Suspend`](crate::Policy::Suspend)) costs
    /// a history read, never memory without bound or a silent loss.
    pub fn queue(mut self, messages: usize) -> Self {
        self.queue = messages.max(1);
        self
    }

    /// The longest wait between two attempts to reconnect the subscription
    /// (1 s; the first wait is 50 ms, doubling). Longer spares a Redis
    /// that is coming back; it also delays delivery after it is back by as
    /// much.
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.backoff_max = max.max(Duration::from_millis(50));
        self
    }
}

/// A [`Broker`] on Redis, for several nodes behind a load balancer: every
/// node delivers every message of a topic with the same epoch and sequence
/// number, in one order, and a client resumes on any node.
///
/// - **Publishing** runs one script: it numbers the message, keeps it in
///   the topic's history (a list capped at its size, each entry for its
///   TTL) and publishes it on the topic's channel, atomically.
/// - **Delivery**: a node subscribes to a topic's channel while it has
///   local subscribers of it, all topics over one connection.
/// - **Catching up**: when that connection drops or goes silent (a probe
///   goes through it every second), or a topic's sequence jumps, or a
///   topic's messages came faster than its local hub took them, the node
///   reads what it missed from the history, once per topic, and delivers
///   it in order before anything newer. Only what the history no longer
///   holds reaches the clients as a `gap`.
/// - **Redis away**: calls fail within [`RedisConfig::timeout`] with
///   [`BrokerError::Unavailable`]; the subscription reconnects with a
///   backoff and catches up.
/// - **Presence** entries are held under the node's lease: a node that
///   dies leaves no ghosts past the lease.
/// - **A restart of Redis without its data** gives each topic a new epoch;
///   the node then ends its local subscriptions of the topic (their seq no
///   longer follows on), and clients that resume learn it from their
///   subscribe reply.
///
/// It needs Redis 6.2 or later, one server (a primary, with replicas if
/// you like; not Redis Cluster).
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use wshub::{PubSub, PubSubConfig, RedisBroker, RedisConfig, Server};
///
/// let broker = RedisBroker::connect("redis://127.0.0.1:6379", RedisConfig::default()).await?;
/// let pubsub = PubSub::with_broker(PubSubConfig::default(), Arc::new(broker))?;
/// Server::new().pubsub("/pubsub", &pubsub).bind("127.0.0.1:8080").await?;
/// # Ok(()) }
/// ```
pub struct RedisBroker {
    core: Arc<Core>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBroker")
            .field("node", &self.core.node)
            .field("prefix", &self.core.config.prefix)
            .field("watched", &self.core.lock().len())
            .finish_non_exhaustive()
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for watched in self.core.lock().values() {
            watched.worker.abort();
        }
    }
}

struct Core {
    config: RedisConfig,
    node: Arc<str>,
    client: ::redis::Client,
    conn: ConnectionManager,
    scripts: Scripts,
    topics: Mutex<HashMap<Arc<str>, Watched>>,
    /// The members this node joined, by topic: joined again if the node's
    /// lease lapsed.
    joined: Mutex<HashMap<Arc<str>, Members>>,
    pump: mpsc::UnboundedSender<Command>,
    /// Counts watches, so that a failed watch removes only its own entry.
    generation: AtomicU64,
    /// Whether the subscription connection is up.
    up: AtomicBool,
    /// How many times it was lost.
    lost: AtomicU64,
    /// How many history reads topics made to catch up.
    catch_ups: AtomicU64,
    /// Leaves that did not reach Redis (topic, client, last of the node's
    /// members there): at most one per member this node had.
    unsent: Mutex<Vec<Unsent>>,
}

/// A leave that did not reach Redis: topic, client, and whether it was the
/// node's last member of the topic.
type Unsent = (Arc<str>, Arc<str>, bool);

/// A topic's members on this node, by client id.
type Members = HashMap<Arc<str>, Member>;

/// A topic this node watches.
struct Watched {
    generation: u64,
    delivery: Delivery,
    keep: Retention,
    queue: mpsc::Sender<Live>,
    resync: Arc<Resync>,
    worker: JoinHandle<()>,
}

/// Tells a topic's worker to catch up from the history.
#[derive(Default)]
struct Resync {
    wanted: AtomicBool,
    notify: Notify,
}

impl Resync {
    fn request(&self) {
        self.wanted.store(true, Relaxed);
        self.notify.notify_one();
    }
}

/// What the subscription connection brought for one topic.
enum Live {
    Message {
        payload: bytes::Bytes,
        epoch: std::ops::Range<usize>,
        seq: u64,
        data: Data,
    },
    Join(Member),
    Leave(Arc<str>),
}

enum Command {
    Subscribe(Arc<str>, oneshot::Sender<()>),
    Unsubscribe(Arc<str>),
}

fn redis_error(err: RedisError) -> BrokerError {
    // A script is refused at its first write when Redis is full: Redis 7
    // reports that as a script error whose text carries the OOM reply, while
    // a plain command gets the OOM code itself.
    let oom = err.code() == Some("OOM") || err.to_string().contains("OOM command not allowed");
    if oom {
        BrokerError::Limit(format!("Redis is out of memory: {err}"))
    } else {
        BrokerError::Unavailable(format!("Redis: {err}"))
    }
}

fn unexpected(what: &str) -> BrokerError {
    BrokerError::Unavailable(format!("Redis answered {what} unexpectedly"))
}

fn text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        _ => text(value)?.parse().ok(),
    }
}

fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// How long a topic's position outlives its last use when nobody watches
/// it: its TTL, and at least a minute.
fn life(keep: Retention) -> u64 {
    ms(keep.ttl).max(60_000)
}

impl Core {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Watched>> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, topic: &str, what: &str) -> String {
        format!("{}{{{topic}}}:{what}", self.config.prefix)
    }

    fn channel(&self, topic: &str) -> String {
        format!("{}{{{topic}}}", self.config.prefix)
    }

    fn probe_channel(&self) -> String {
        format!("{}probe:{}", self.config.prefix, self.node)
    }

    /// The topic of a channel name, if it is one of this broker's.
    fn topic_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        topic_of(&self.config.prefix, channel)
    }

    /// Runs `call` within the configured timeout.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, BrokerError> {
        match tokio::time::timeout(self.config.timeout, call).await {
            Ok(result) => result.map_err(redis_error),
            Err(_) => Err(BrokerError::Unavailable(format!(
                "Redis did not answer within {:?}",
                self.config.timeout
            ))),
        }
    }

    async fn history(
        &self,
        topic: &str,
        mode: &str,
        n: u64,
        keep: Retention,
    ) -> Result<History, BrokerError> {
        let mut conn = self.conn.clone();
        let value: Value = self
            .call(
                self.scripts
                    .history
                    .key(self.key(topic, "seq"))
                    .key(self.key(topic, "log"))
                    .arg(Epoch::random().as_str())
                    .arg(mode)
                    .arg(n)
                    .arg(keep.size)
                    .arg(ms(keep.ttl))
                    .arg(life(keep))
                    .invoke_async(&mut conn),
            )
            .await?;
        let Value::Array(items) = value else {
            return Err(unexpected("a history read"));
        };
        let mut items = items.into_iter();
        let epoch = items.next().as_ref().and_then(text).map(Epoch::new);
        let last = items.next().as_ref().and_then(int);
        let (Some(epoch), Some(last)) = (epoch, last) else {
            return Err(unexpected("a history read"));
        };
        let mut entries = Vec::with_capacity(items.len());
        for item in items {
            let Value::BulkString(bytes) = item else {
                return Err(unexpected("a kept message"));
            };
            entries.push(parse_entry(bytes).ok_or_else(|| unexpected("a kept message"))?);
        }
        Ok(History {
            epoch,
            last: u64::try_from(last).unwrap_or(0),
            entries,
        })
    }

    /// Gives `topic` a new epoch if it still has `epoch` and fewer than
    /// `seq` messages.
    async fn renumber(&self, topic: &str, epoch: &Epoch, seq: u64) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        let _: String = self
            .call(
                self.scripts
                    .renumber
                    .key(self.key(topic, "seq"))
                    .arg(epoch.as_str())
                    .arg(Epoch::random().as_str())
                    .arg(seq)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    /// Sends the probe: how many subscribers Redis counted for it.
    async fn probe(&self, n: u64) -> Result<i64, BrokerError> {
        let mut conn = self.conn.clone();
        self.call(
            ::redis::cmd("PUBLISH")
                .arg(self.probe_channel())
                .arg(n)
                .query_async(&mut conn),
        )
        .await
    }

    /// Renews the lease, keeps the watched topics' keys, sweeps dead nodes'
    /// members; joins this node's members again if its lease had lapsed.
    async fn tick(&self) -> Result<(), BrokerError> {
        let keys: Vec<(String, u64)> = {
            let topics = self.lock();
            let joined = self.joined.lock().unwrap_or_else(|p| p.into_inner());
            let mut keys = Vec::with_capacity(topics.len() * 2);
            for (topic, watched) in topics.iter() {
                keys.push((self.key(topic, "seq"), life(watched.keep)));
                if joined.contains_key(topic) {
                    keys.push((self.key(topic, "who"), life(watched.keep)));
                }
            }
            keys
        };
        // In batches, so that one call never holds Redis for long.
        let mut lapsed = false;
        let mut chunks = keys.chunks(512).peekable();
        if chunks.peek().is_none() {
            lapsed |= self.tick_batch(&[]).await?;
        }
        for chunk in chunks {
            lapsed |= self.tick_batch(chunk).await?;
        }
        if lapsed {
            self.join_again().await?;
        }
        self.send_unsent().await;
        Ok(())
    }

    async fn tick_batch(&self, keys: &[(String, u64)]) -> Result<bool, BrokerError> {
        let mut conn = self.conn.clone();
        let mut call = self.scripts.tick.prepare_invoke();
        call.arg(&self.config.prefix)
            .arg(&*self.node)
            .arg(ms(self.config.lease));
        for (key, life) in keys {
            call.arg(key).arg(*life);
        }
        let lapsed: i64 = self.call(call.invoke_async(&mut conn)).await?;
        Ok(lapsed == 1)
    }

    async fn join_again(&self) -> Result<(), BrokerError> {
        let members: Vec<(Arc<str>, Member)> = {
            let joined = self.joined.lock().unwrap_or_else(|p| p.into_inner());
            joined
                .iter()
                .flat_map(|(topic, members)| members.values().map(|m| (topic.clone(), m.clone())))
                .collect()
        };
        if !members.is_empty() {
            tracing::warn!(
                members = members.len(),
                "this node's presence lease had lapsed: joining its members again"
            );
        }
        for (topic, member) in members {
            self.join(&topic, &member, usize::MAX).await?;
        }
        Ok(())
    }

    /// Removes `client` from `topic`'s presence in Redis, with its leave
    /// event; `last`: the node's last member of the topic.
    async fn leave(&self, topic: &str, client: &str, last: bool) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        let _: Value = self
            .call(
                self.scripts
                    .leave
                    .key(self.key(topic, "who"))
                    .arg(client)
                    .arg(self.channel(topic))
                    .arg(&self.config.prefix)
                    .arg(&*self.node)
                    .arg(topic)
                    .arg(if last { "1" } else { "0" })
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    /// Keeps a leave that did not reach Redis, for the next renewal.
    fn unsent(&self, topic: &str, client: &str, last: bool) {
        let mut unsent = self.unsent.lock().unwrap_or_else(|p| p.into_inner());
        unsent.push((topic.into(), client.into(), last));
    }

    /// Sends the leaves that did not reach Redis; keeps those that fail
    /// again.
    async fn send_unsent(&self) {
        let unsent = std::mem::take(&mut *self.unsent.lock().unwrap_or_else(|p| p.into_inner()));
        for (topic, client, last) in unsent {
            if self.leave(&topic, &client, last).await.is_err() {
                self.unsent(&topic, &client, last);
            }
        }
    }

    async fn join(&self, topic: &str, member: &Member, max: usize) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        let life = ms(self.config.lease).max(60_000) * 10;
        let count: i64 = self
            .call(
                self.scripts
                    .join
                    .key(self.key(topic, "who"))
                    .arg(&*member.client)
                    .arg(&*self.node)
                    .arg(member.info.as_ref().map_or("", |d| d.as_str()))
                    .arg(max.min(i64::MAX as usize))
                    .arg(self.channel(topic))
                    .arg(life)
                    .arg(&self.config.prefix)
                    .arg(topic)
                    .invoke_async(&mut conn),
            )
            .await?;
        if count >= 0 {
            return Err(BrokerError::Limit(format!(
                "topic {topic:?} has {count} members, the most it takes"
            )));
        }
        Ok(())
    }
}

/// The topic of channel `P{T}` under prefix `P`.
fn topic_of<'a>(prefix: &str, channel: &'a str) -> Option<&'a str> {
    channel
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix('}')
}

/// A kept entry, `seq ms data`.
fn parse_entry(bytes: Vec<u8>) -> Option<Entry> {
    let text = String::from_utf8(bytes).ok()?;
    let a = text.find(' ')?;
    let b = a + 1 + text[a + 1..].find(' ')?;
    let seq = text[..a].parse().ok()?;
    let payload: Utf8Bytes = text.into();
    let bytes: &bytes::Bytes = payload.as_ref();
    let data = Utf8Bytes::try_from(bytes.slice(b + 1..)).ok()?;
    Some(Entry {
        seq,
        data: Data::from_trusted(data),
        push: None,
    })
}

/// A message from a topic's channel, or `None` if it is not one of ours.
fn parse_live(payload: &[u8]) -> Option<Live> {
    let (kind, rest) = payload.split_first_chunk::<2>()?;
    match kind {
        b"m " => {
            let payload = bytes::Bytes::copy_from_slice(payload);
            let text = std::str::from_utf8(&payload).ok()?;
            let rest = &text[2..];
            let a = rest.find(' ')?;
            let b = a + 1 + rest[a + 1..].find(' ')?;
            let seq = rest[a + 1..b].parse().ok()?;
            // Validated here, once per node: a stray publish on the channel
            // must not reach clients as broken JSON.
            serde_json::from_str::<&serde_json::value::RawValue>(&rest[b + 1..]).ok()?;
            let data = Utf8Bytes::try_from(payload.slice(2 + b + 1..)).ok()?;
            Some(Live::Message {
                epoch: 2..2 + a,
                payload,
                seq,
                data: Data::from_trusted(data),
            })
        }
        b"j " => {
            let text = std::str::from_utf8(rest).ok()?;
            let (client, info) = text.split_once(' ').unwrap_or((text, ""));
            let info = match info {
                "" => None,
                info => Some(Data::from_json_text(info).ok()?),
            };
            Some(Live::Join(Member {
                client: client.into(),
                info,
            }))
        }
        b"l " => Some(Live::Leave(std::str::from_utf8(rest).ok()?.into())),
        _ => None,
    }
}

impl RedisBroker {
    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`).
    ///
    /// It connects once here, so that a wrong address or password is an
    /// error now rather than a node that never delivers; after that, an
    /// outage is waited out.
    ///
    /// # Errors
    ///
    /// [`BrokerError::Unavailable`] if the URL is invalid or Redis cannot
    /// be reached within the configured timeout.
    pub async fn connect(url: &str, config: RedisConfig) -> Result<RedisBroker, BrokerError> {
        let client = ::redis::Client::open(url)
            .map_err(|err| BrokerError::Unavailable(format!("Redis URL {url:?}: {err}")))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(config.backoff_max)
            .set_number_of_retries(1);
        let conn = match tokio::time::timeout(
            config.timeout,
            ConnectionManager::new_with_config(client.clone(), manager),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(err)) => return Err(BrokerError::Unavailable(format!("Redis at {url}: {err}"))),
            Err(_) => {
                return Err(BrokerError::Unavailable(format!(
                    "Redis at {url} did not answer within {:?}",
                    config.timeout
                )));
            }
        };
        let (pump, commands) = mpsc::unbounded_channel();
        let core = Arc::new(Core {
            node: Epoch::random().as_str()[..12].into(),
            config,
            client,
            conn,
            scripts: Scripts::new(),
            topics: Mutex::new(HashMap::new()),
            joined: Mutex::new(HashMap::new()),
            pump,
            generation: AtomicU64::new(0),
            up: AtomicBool::new(false),
            lost: AtomicU64::new(0),
            catch_ups: AtomicU64::new(0),
            unsent: Mutex::new(Vec::new()),
        });
        // The lease is held before any member joins.
        core.tick().await?;
        let tasks = vec![
            tokio::spawn(pump_task(core.clone(), commands)),
            tokio::spawn(tick_task(core.clone())),
        ];
        Ok(RedisBroker { core, tasks })
    }

    /// This node's id: part of every client id it gives, and of its lease.
    pub fn node(&self) -> &str {
        &self.core.node
    }

    /// Whether the subscription connection is up now.
    pub fn is_subscribed(&self) -> bool {
        self.core.up.load(Relaxed)
    }

    /// How many times the subscription connection was lost (dropped, cut
    /// by Redis, or silent past the probe's timeout); after each, every
    /// watched topic caught up from its history.
    pub fn subscription_losses(&self) -> u64 {
        self.core.lost.load(Relaxed)
    }

    /// How many times a watched topic read the history to catch up (after
    /// a lost subscription, a jump in seq, or more messages than its queue
    /// holds while its local hub was held back).
    pub fn catch_ups(&self) -> u64 {
        self.core.catch_ups.load(Relaxed)
    }

    /// The topics this node watches (those with local subscribers).
    pub fn watched(&self) -> usize {
        self.core.lock().len()
    }

    async fn do_watch(
        &self,
        topic: &str,
        delivery: Delivery,
        keep: Retention,
    ) -> Result<(), BrokerError> {
        let core = &self.core;
        let name: Arc<str> = topic.into();
        let generation = core.generation.fetch_add(1, Relaxed);
        let (queue, live) = mpsc::channel(core.config.queue);
        let resync = Arc::new(Resync::default());
        let (started, start) = oneshot::channel::<(Epoch, u64)>();
        let worker = tokio::spawn(worker(
            Arc::downgrade(core),
            name.clone(),
            delivery.clone(),
            keep,
            live,
            resync.clone(),
            start,
        ));
        if let Some(old) = core.lock().insert(
            name.clone(),
            Watched {
                generation,
                delivery,
                keep,
                queue,
                resync,
                worker,
            },
        ) {
            old.worker.abort();
        }
        let result = async {
            let (done, subscribed) = oneshot::channel();
            let _ = core.pump.send(Command::Subscribe(name.clone(), done));
            match tokio::time::timeout(core.config.timeout, subscribed).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(BrokerError::Unavailable(format!(
                        "Redis did not confirm the subscription within {:?}",
                        core.config.timeout
                    )));
                }
            }
            // Subscribed first: every message after this read arrives live.
            let at = core.history(topic, "l", 0, keep).await?;
            let _ = started.send((at.epoch, at.last));
            Ok(())
        }
        .await;
        if result.is_err() {
            let mut topics = core.lock();
            if topics
                .get(&name)
                .is_some_and(|w| w.generation == generation)
            {
                if let Some(w) = topics.remove(&name) {
                    w.worker.abort();
                }
                let _ = core.pump.send(Command::Unsubscribe(name));
            }
        }
        result
    }

    async fn do_leave(&self, topic: &str, client: &str) -> Result<(), BrokerError> {
        let core = &self.core;
        let last = {
            let mut joined = core.joined.lock().unwrap_or_else(|p| p.into_inner());
            match joined.get_mut(topic) {
                Some(members) => {
                    members.remove(client);
                    let last = members.is_empty();
                    if last {
                        joined.remove(topic);
                    }
                    last
                }
                None => false,
            }
        };
        if let Err(err) = core.leave(topic, client, last).await {
            // Not left in Redis: tried again at each renewal of the lease,
            // so that a member never outlives its session while its node
            // lives.
            core.unsent(topic, client, last);
            return Err(err);
        }
        Ok(())
    }

    async fn do_members(&self, topic: &str) -> Result<Vec<Member>, BrokerError> {
        let core = &self.core;
        let mut conn = core.conn.clone();
        let value: Value = core
            .call(
                core.scripts
                    .members
                    .key(core.key(topic, "who"))
                    .arg(&core.config.prefix)
                    .invoke_async(&mut conn),
            )
            .await?;
        let Value::Array(items) = value else {
            return Err(unexpected("a presence read"));
        };
        let mut members = Vec::with_capacity(items.len() / 2);
        for pair in items.chunks(2) {
            let [client, info] = pair else {
                return Err(unexpected("a presence read"));
            };
            let client = text(client).ok_or_else(|| unexpected("a member"))?;
            let info = match text(info).ok_or_else(|| unexpected("a member"))? {
                "" => None,
                info => Some(Data::from_json_text(info).map_err(|_| unexpected("a member"))?),
            };
            members.push(Member {
                client: client.into(),
                info,
            });
        }
        members.sort_by(|a, b| a.client.cmp(&b.client));
        Ok(members)
    }
}

impl Broker for RedisBroker {
    fn watch<'a>(
        &'a self,
        topic: &'a str,
        delivery: Delivery,
        keep: Retention,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.do_watch(topic, delivery, keep))
    }

    fn unwatch(&self, topic: &str) {
        let mut topics = self.core.lock();
        if topics.get(topic).is_some_and(|w| !w.delivery.is_alive()) {
            if let Some((name, watched)) = topics.remove_entry(topic) {
                watched.worker.abort();
                let _ = self.core.pump.send(Command::Unsubscribe(name));
            }
        }
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        data: Data,
        keep: Retention,
    ) -> BoxFuture<'a, Result<Position, BrokerError>> {
        Box::pin(async move {
            let core = &self.core;
            let mut conn = core.conn.clone();
            let (epoch, seq): (String, u64) = core
                .call(
                    core.scripts
                        .publish
                        .key(core.key(topic, "seq"))
                        .key(core.key(topic, "log"))
                        .arg(Epoch::random().as_str())
                        .arg(data.as_str())
                        .arg(keep.size)
                        .arg(ms(keep.ttl))
                        .arg(life(keep))
                        .arg(core.channel(topic))
                        .invoke_async(&mut conn),
                )
                .await?;
            Ok(Position {
                epoch: Epoch::new(epoch),
                seq,
            })
        })
    }

    fn history<'a>(
        &'a self,
        topic: &'a str,
        range: Range,
        keep: Retention,
    ) -> BoxFuture<'a, Result<History, BrokerError>> {
        Box::pin(async move {
            match range {
                Range::After(seq) => self.core.history(topic, "a", seq, keep).await,
                Range::Last(n) => self.core.history(topic, "l", n as u64, keep).await,
            }
        })
    }

    fn join<'a>(
        &'a self,
        topic: &'a str,
        member: Member,
        max: usize,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            if let Err(err) = self.core.join(topic, &member, max).await {
                if matches!(err, BrokerError::Unavailable(_)) {
                    // It may have run before the answer was lost: undone
                    // at the next renewal if so (a leave of nobody is a
                    // no-op).
                    let last = !self
                        .core
                        .joined
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains_key(topic);
                    self.core.unsent(topic, &member.client, last);
                }
                return Err(err);
            }
            let mut joined = self.core.joined.lock().unwrap_or_else(|p| p.into_inner());
            joined
                .entry(topic.into())
                .or_default()
                .insert(member.client.clone(), member);
            Ok(())
        })
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

    fn client_id(&self, session: u64) -> Arc<str> {
        format!("c{session}.{}", self.core.node).into()
    }
}

/// Renews the lease every third of it.
async fn tick_task(core: Arc<Core>) {
    let every = core.config.lease / 3;
    let mut timer = tokio::time::interval_at(Instant::now() + every, every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        timer.tick().await;
        if let Err(err) = core.tick().await {
            tracing::debug!(%err, "presence lease not renewed");
        }
    }
}

/// The waits between reconnection attempts: 50 ms, doubling, at most `max`.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);

    fn new(max: Duration) -> Backoff {
        Backoff {
            next: Self::FIRST,
            max,
        }
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Subscribes `channels`, one command each, all sent at once (a command
/// with many channels gets many replies, which the client matches to later
/// requests).
async fn subscribe_all(
    core: &Core,
    sink: &PubSubSink,
    channels: Vec<String>,
) -> Result<(), BrokerError> {
    for chunk in channels.chunks(1024) {
        let calls = chunk.iter().map(|channel| {
            let mut sink = sink.clone();
            async move { sink.subscribe(channel).await }
        });
        let results = core
            .call(async { Ok(futures_util::future::join_all(calls).await) })
            .await?;
        for result in results {
            result.map_err(redis_error)?;
        }
    }
    Ok(())
}

/// The subscription connection: connects (with a backoff), subscribes
/// every watched topic, routes what comes to the topics' workers, sends
/// the probe, and starts again when the connection drops or goes silent.
async fn pump_task(core: Arc<Core>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut backoff = Backoff::new(core.config.backoff_max);
    let probe_channel = core.probe_channel();
    let (probed, mut probes) = mpsc::unbounded_channel::<(u64, Result<i64, BrokerError>)>();
    let mut probe_n = 0u64;
    let mut first = true;
    loop {
        if !first {
            backoff.wait().await;
        }
        first = false;
        let pubsub =
            match tokio::time::timeout(core.config.timeout, core.client.get_async_pubsub()).await {
                Ok(Ok(pubsub)) => pubsub,
                Ok(Err(err)) => {
                    tracing::debug!(%err, "Redis subscription: cannot connect");
                    refuse_waiting(&mut commands);
                    continue;
                }
                Err(_) => {
                    tracing::debug!("Redis subscription: no answer when connecting");
                    refuse_waiting(&mut commands);
                    continue;
                }
            };
        let (sink, mut stream) = pubsub.split();
        let mut channels: Vec<String> = core.lock().keys().map(|t| core.channel(t)).collect();
        channels.push(probe_channel.clone());
        if let Err(err) = subscribe_all(&core, &sink, channels).await {
            tracing::debug!(%err, "Redis subscription: cannot subscribe");
            continue;
        }
        core.up.store(true, Relaxed);
        backoff.reset();
        // Whatever was published while this node was not subscribed is in
        // the history: every topic reads it, once.
        for watched in core.lock().values() {
            watched.resync.request();
        }
        tracing::debug!(node = %core.node, "Redis subscription up");
        let mut timer = tokio::time::interval(core.config.probe_every);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The oldest probe sent and not yet seen back, and when.
        let mut waiting: Option<(u64, Instant)> = None;
        let why = loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break "the connection closed" };
                    let channel = msg.get_channel_name();
                    if channel == probe_channel {
                        let n: u64 = std::str::from_utf8(msg.get_payload_bytes())
                            .ok().and_then(|t| t.parse().ok()).unwrap_or(0);
                        if waiting.is_some_and(|(w, _)| n >= w) {
                            waiting = None;
                        }
                        continue;
                    }
                    if let Some(topic) = core.topic_of(channel) {
                        route(&core, topic, msg.get_payload_bytes());
                    }
                }
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    let mut batch = vec![command];
                    while batch.len() < 4096 {
                        match commands.try_recv() {
                            Ok(command) => batch.push(command),
                            Err(_) => break,
                        }
                    }
                    if let Err(err) = run_commands(&core, &sink, batch).await {
                        tracing::debug!(%err, "Redis subscription: a command failed");
                        break "a subscription command failed";
                    }
                }
                Some((n, result)) = probes.recv() => {
                    // Redis counted no subscriber: this connection is not
                    // subscribed any more, whatever TCP says.
                    let ours = waiting.is_some_and(|(w, _)| w == n);
                    match result {
                        Ok(0) if ours => break "Redis counted no subscriber for the probe",
                        // Not sent: the command connection's trouble says
                        // nothing of this one. The next tick sends another.
                        Err(_) if ours => waiting = None,
                        _ => {}
                    }
                }
                _ = timer.tick() => {
                    match waiting {
                        Some((_, at)) if at.elapsed() >= core.config.probe_timeout => {
                            break "the probe did not come back";
                        }
                        Some(_) => {}
                        None => {
                            probe_n += 1;
                            waiting = Some((probe_n, Instant::now()));
                            let (core, probed, n) = (core.clone(), probed.clone(), probe_n);
                            tokio::spawn(async move {
                                let _ = probed.send((n, core.probe(n).await));
                            });
                        }
                    }
                }
            }
        };
        core.up.store(false, Relaxed);
        core.lost.fetch_add(1, Relaxed);
        tracing::warn!(node = %core.node, why, "Redis subscription lost: reconnecting");
    }
}

/// While the subscription is down, a watch is refused at once rather than
/// left to time out.
fn refuse_waiting(commands: &mut mpsc::UnboundedReceiver<Command>) {
    while let Ok(command) = commands.try_recv() {
        drop(command);
    }
}

async fn run_commands(
    core: &Core,
    sink: &PubSubSink,
    batch: Vec<Command>,
) -> Result<(), BrokerError> {
    let mut subscribe = Vec::new();
    let mut confirm = Vec::new();
    let mut unsubscribe = Vec::new();
    {
        let topics = core.lock();
        for command in batch {
            match command {
                Command::Subscribe(topic, done) => {
                    if topics.contains_key(&topic) {
                        subscribe.push(core.channel(&topic));
                        confirm.push(done);
                    }
                }
                // Unless it was watched again since.
                Command::Unsubscribe(topic) => {
                    if !topics.contains_key(&topic) {
                        unsubscribe.push(core.channel(&topic));
                    }
                }
            }
        }
    }
    if !subscribe.is_empty() {
        subscribe_all(core, sink, subscribe).await?;
        for done in confirm {
            let _ = done.send(());
        }
    }
    for chunk in unsubscribe.chunks(1024) {
        let calls = chunk.iter().map(|channel| {
            let mut sink = sink.clone();
            async move { sink.unsubscribe(channel).await }
        });
        core.call(async { Ok(futures_util::future::join_all(calls).await) })
            .await?;
    }
    Ok(())
}

/// Hands a channel message to its topic's worker without waiting: past the
/// queue's bound, the worker catches up from the history instead.
fn route(core: &Core, topic: &str, payload: &[u8]) {
    // Parsed (and its JSON checked) before the lock, which every watch and
    // unwatch takes too.
    let Some(live) = parse_live(payload) else {
        tracing::warn!(
            topic,
            "a message on the topic's channel that wshub did not send"
        );
        return;
    };
    let topics = core.lock();
    let Some(watched) = topics.get(topic) else {
        return;
    };
    if let Err(mpsc::error::TrySendError::Full(_)) = watched.queue.try_send(live) {
        watched.resync.request();
    }
}

/// One watched topic: delivers its messages to the local hub in seq order,
/// and catches up from the history when it must.
async fn worker(
    core: std::sync::Weak<Core>,
    topic: Arc<str>,
    delivery: Delivery,
    keep: Retention,
    mut live: mpsc::Receiver<Live>,
    resync: Arc<Resync>,
    start: oneshot::Receiver<(Epoch, u64)>,
) {
    let Ok((epoch, mut delivered)) = start.await else {
        return;
    };
    let mut backoff_max = Duration::from_secs(1);
    if let Some(core) = core.upgrade() {
        backoff_max = core.config.backoff_max;
    }
    loop {
        let catch_up = tokio::select! {
            biased;
            _ = resync.notify.notified() => resync.wanted.swap(false, Relaxed),
            item = live.recv() => {
                let Some(item) = item else { return };
                match item {
                    Live::Message { payload, epoch: at, seq, data } => {
                        if &payload[at] != epoch.as_str().as_bytes() {
                            true
                        } else if seq <= delivered {
                            false
                        } else if seq == delivered + 1 {
                            delivery.message(&epoch, seq, &data).await;
                            delivered = seq;
                            false
                        } else {
                            true
                        }
                    }
                    Live::Join(member) => {
                        delivery.join(&member).await;
                        false
                    }
                    Live::Leave(client) => {
                        delivery.leave(&client).await;
                        false
                    }
                }
            }
        };
        if !catch_up {
            continue;
        }
        let mut backoff = Backoff::new(backoff_max);
        loop {
            if !delivery.is_alive() {
                return;
            }
            let Some(core) = core.upgrade() else { return };
            match core.history(&topic, "r", delivered, keep).await {
                Ok(history) if history.epoch == epoch && history.last < delivered => {
                    // Redis went back in time (restarted from an older
                    // snapshot): the seqs after its last would be numbered
                    // again. The topic gets a new epoch, and its local
                    // subscriptions end as after a restart without data.
                    tracing::warn!(
                        topic = %topic,
                        redis = history.last,
                        delivered,
                        "Redis has fewer messages of the topic than this node delivered: a new epoch"
                    );
                    if let Err(err) = core.renumber(&topic, &epoch, delivered).await {
                        tracing::debug!(topic = %topic, %err, "renumbering the topic");
                        drop(core);
                        backoff.wait().await;
                        continue;
                    }
                    delivery.restart();
                    return;
                }
                Ok(history) if history.epoch == epoch => {
                    core.catch_ups.fetch_add(1, Relaxed);
                    // What the history no longer holds shows as a jump in
                    // seq, which each subscriber reports as a gap with the
                    // exact count.
                    for entry in history.entries {
                        if entry.seq > delivered {
                            delivery.message(&epoch, entry.seq, &entry.data).await;
                            delivered = entry.seq;
                        }
                    }
                    delivered = delivered.max(history.last);
                    break;
                }
                Ok(history) => {
                    tracing::warn!(
                        topic = %topic,
                        was = %epoch,
                        now = %history.epoch,
                        "the topic's history started afresh in Redis: ending its local subscriptions"
                    );
                    delivery.restart();
                    return;
                }
                Err(err) => {
                    tracing::debug!(topic = %topic, %err, "catching up: Redis did not answer");
                    drop(core);
                    backoff.wait().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_payloads_parse_and_anything_else_is_refused() {
        let Some(Live::Message {
            payload,
            epoch,
            seq,
            data,
        }) = parse_live(br#"m 0a1b 42 {"x":[1,2]}"#)
        else {
            panic!("a message");
        };
        assert_eq!(&payload[epoch], b"0a1b");
        assert_eq!(seq, 42);
        assert_eq!(data.as_str(), r#"{"x":[1,2]}"#);

        let Some(Live::Join(member)) = parse_live(br#"j c1.n {"name":"ann"}"#) else {
            panic!("a join");
        };
        assert_eq!(&*member.client, "c1.n");
        assert_eq!(member.info.unwrap().as_str(), r#"{"name":"ann"}"#);
        let Some(Live::Join(member)) = parse_live(b"j c2.n ") else {
            panic!("a join without info");
        };
        assert!(member.info.is_none());
        assert!(matches!(parse_live(b"l c1.n"), Some(Live::Leave(c)) if &*c == "c1.n"));

        // What another publisher might put on the channel: never a panic,
        // never broken JSON passed on.
        for bad in [
            &b""[..],
            b"m",
            b"m ",
            b"m e",
            b"m e 1",
            b"m e x {}",
            b"m e 1 {",
            b"m e 1 not json",
            b"j c {bad",
            b"\xff\xfe",
            b"m e 1 \xff",
            b"hello",
        ] {
            assert!(
                parse_live(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn kept_entries_parse() {
        let entry = parse_entry(b"7 1733000000000 \"hi\"".to_vec()).unwrap();
        assert_eq!(entry.seq, 7);
        assert_eq!(entry.data.as_str(), "\"hi\"");
        for bad in [&b""[..], b"7", b"7 12", b"x 1 {}", b"\xff 1 {}"] {
            assert!(parse_entry(bad.to_vec()).is_none());
        }
    }

    #[test]
    fn channel_names_map_back_to_topics() {
        let name = |channel| topic_of("app:", channel);
        assert_eq!(name("app:{news/eu}"), Some("news/eu"));
        assert_eq!(name("app:probe:n1"), None);
        assert_eq!(name("other:{news}"), None);
    }
}
