//! The servers under test: wshub, wshub's pub/sub protocol, the two
//! baseline patterns, and (with the `redis` feature) a node of two on one
//! Redis: wshub's `RedisBroker`, and the pattern people write by hand.
//!
//! Each runs in a child process of the benchmark so that its CPU time and
//! memory are its own. The child prints `addr <socket address>` on stdout,
//! answers every `stats` line on stdin with `stats <cpu µs> <rss KiB>
//! <connections> [name=value...]` (wshub adds its hub's counters; the pub/sub
//! server its topics, subscriptions and the counters summed over its topic
//! hubs; every kind its `user_us`, and, when the kernel gives them, its
//! voluntary and involuntary context switches `nvcsw`, `nivcsw` from
//! `getrusage`), and exits when stdin closes. The Redis kinds read the URL
//! of their Redis from the environment variable `WSHUB_BENCH_REDIS_URL`.

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Mutex, broadcast, mpsc};
use tokio_tungstenite::tungstenite::Message;
use wshub::{Hub, HubConfig, Metrics, Policy, PubSub, PubSubConfig, Server, TopicConfig};

use crate::sys;

/// Messages the hub (or the axum pattern's channel) buffers per subscriber.
pub const CAPACITY: usize = 1024;
/// The environment variable that overrides the wshub kinds' hub capacity
/// (else [`CAPACITY`]).
pub const CAPACITY_ENV: &str = "WSHUB_BENCH_CAPACITY";
/// The environment variable that sets `SO_SNDBUF` (bytes) on the listening
/// socket, which the connections it accepts inherit (else the kernel's
/// autotuning, which lets a loopback socket buffer about 1 MiB).
pub const SNDBUF_ENV: &str = "WSHUB_BENCH_SNDBUF";
/// Ktor's per-session outgoing channel holds 8 frames before `send` suspends.
const KTOR_OUTGOING: usize = 8;

/// Which server a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// wshub's `Server` with one `Hub`, every session `join`ed to it.
    Wshub(Policy),
    /// The same with Prometheus metrics on (the hub registered, the server
    /// counting), scraped once a second in the server process.
    WshubMetrics,
    /// wshub's `PubSub` serving the pub/sub protocol (docs/PROTOCOL.md) on
    /// `/pubsub`: default settings, topics keeping a history of
    /// [`HISTORY`] messages. Only the pub/sub scenarios speak to it.
    WshubPubSub,
    /// Ktor's chat guide: a locked set of sessions; each message is sent to
    /// each session in turn (a `String` per session) through its 8-frame
    /// outgoing channel, whose writer flushes when the channel runs dry.
    Ktor,
    /// axum's chat example: `tokio::sync::broadcast::<String>`, one copy
    /// per subscriber, `send` (write and flush) per message.
    Axum,
    /// One node of several: wshub's `PubSub` on `RedisBroker` (default
    /// `RedisConfig`), otherwise as [`Kind::WshubPubSub`]. Only the cluster
    /// scenarios use it.
    WshubRedis,
    /// One node of several, by hand: a locked `Vec` of the node's sessions
    /// (an unbounded channel and a writer task each, one write and flush
    /// per message), every text message a client sends PUBLISHed on one
    /// Redis channel through one multiplexed connection, and one
    /// subscription to that channel whose every message goes to every
    /// session of the list (the text shared, not copied per session). Only
    /// the cluster scenarios use it.
    NaiveRedis,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Wshub(Policy::Suspend) => f.write_str("wshub"),
            Kind::Wshub(policy) => write!(f, "wshub:{policy}"),
            Kind::WshubMetrics => f.write_str("wshub+metrics"),
            Kind::WshubPubSub => f.write_str("wshub-pubsub"),
            Kind::Ktor => f.write_str("ktor-pattern"),
            Kind::Axum => f.write_str("axum-pattern"),
            Kind::WshubRedis => f.write_str("wshub-redis"),
            Kind::NaiveRedis => f.write_str("naive-redis"),
        }
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wshub" => Ok(Kind::Wshub(Policy::Suspend)),
            "wshub+metrics" => Ok(Kind::WshubMetrics),
            "wshub-pubsub" | "pubsub" => Ok(Kind::WshubPubSub),
            "ktor" | "ktor-pattern" => Ok(Kind::Ktor),
            "axum" | "axum-pattern" => Ok(Kind::Axum),
            "wshub-redis" => Ok(Kind::WshubRedis),
            "naive-redis" => Ok(Kind::NaiveRedis),
            _ => match s.strip_prefix("wshub:") {
                Some(policy) => policy.parse().map(Kind::Wshub).map_err(|e| e.to_string()),
                None => Err(format!(
                    "unknown server {s:?}: expected wshub, wshub:<policy>, wshub+metrics, wshub-pubsub, ktor, axum, \
                     wshub-redis or naive-redis"
                )),
            },
        }
    }
}

impl Kind {
    /// Whether the server speaks the pub/sub protocol (rather than relaying
    /// every text message to every client).
    pub fn is_pubsub(self) -> bool {
        self == Kind::WshubPubSub
    }

    /// Whether the server is a node on Redis (the cluster scenarios').
    pub fn is_cluster(self) -> bool {
        matches!(self, Kind::WshubRedis | Kind::NaiveRedis)
    }

    /// The path the child serves.
    pub fn path(self) -> &'static str {
        match self {
            Kind::WshubPubSub | Kind::WshubRedis => "/pubsub",
            _ => "/ws",
        }
    }
}

/// The environment variable that gives a Redis kind its Redis URL.
#[cfg(feature = "redis")]
pub const REDIS_URL_ENV: &str = "WSHUB_BENCH_REDIS_URL";

/// The one Redis channel of the hand-written pattern.
#[cfg(feature = "redis")]
const NAIVE_CHANNEL: &str = "naive-broadcast";

/// Messages each pub/sub topic keeps for clients that resume.
pub const HISTORY: usize = 100;

/// Runs a server in this (child) process until stdin closes.
pub fn child_main(kind: Kind) -> ! {
    let _ = sys::raise_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result: std::io::Result<()> = runtime.block_on(async move {
        let listener = listen().await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicU64::new(0));
        let count: Box<dyn Fn() -> String + Send + Sync> = match kind {
            Kind::Wshub(_) | Kind::WshubMetrics => {
                let policy = match kind {
                    Kind::Wshub(policy) => policy,
                    _ => Policy::Suspend,
                };
                let capacity = env_number(CAPACITY_ENV)?.unwrap_or(CAPACITY);
                let hub = Hub::with_config(HubConfig::default().capacity(capacity).policy(policy))
                    .map_err(std::io::Error::other)?;
                let metrics = (kind == Kind::WshubMetrics).then(Metrics::new);
                if let Some(metrics) = &metrics {
                    metrics
                        .register_hub("load", &hub)
                        .map_err(std::io::Error::other)?;
                    // What a Prometheus server scraping every second costs.
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                        loop {
                            tick.tick().await;
                            std::hint::black_box(metrics.encode());
                        }
                    });
                }
                tokio::spawn(serve_wshub(listener, hub.clone(), metrics));
                Box::new(move || {
                    let s = hub.stats();
                    format!(
                        "{} published={} dropped={} evicted={} lagged={} disconnected={}",
                        s.subscribers, s.published, s.dropped, s.evicted, s.lagged, s.disconnected
                    )
                })
            }
            Kind::WshubPubSub => {
                let pubsub = PubSub::new(
                    PubSubConfig::default().topic(TopicConfig::default().history(HISTORY)),
                )
                .map_err(std::io::Error::other)?;
                tokio::spawn(serve_pubsub(listener, pubsub.clone(), connections.clone()));
                Box::new(move || pubsub_stats(&pubsub, &connections))
            }
            Kind::Ktor => {
                tokio::spawn(serve_ktor(listener, connections.clone()));
                Box::new(move || connections.load(Ordering::Relaxed).to_string())
            }
            Kind::Axum => {
                let (tx, _) = broadcast::channel::<String>(CAPACITY);
                tokio::spawn(serve_axum(listener, tx.clone()));
                Box::new(move || tx.receiver_count().to_string())
            }
            #[cfg(feature = "redis")]
            Kind::WshubRedis => {
                let url = redis_url()?;
                let broker = wshub::RedisBroker::connect(&url, wshub::RedisConfig::default())
                    .await
                    .map_err(std::io::Error::other)?;
                let pubsub = PubSub::with_broker(
                    PubSubConfig::default().topic(TopicConfig::default().history(HISTORY)),
                    Arc::new(broker),
                )
                .map_err(std::io::Error::other)?;
                tokio::spawn(serve_pubsub(listener, pubsub.clone(), connections.clone()));
                Box::new(move || pubsub_stats(&pubsub, &connections))
            }
            #[cfg(feature = "redis")]
            Kind::NaiveRedis => {
                let url = redis_url()?;
                let sessions = naive_redis(listener, &url, connections.clone()).await?;
                Box::new(move || {
                    format!(
                        "{} sessions={}",
                        connections.load(Ordering::Relaxed),
                        sessions.lock().unwrap().len()
                    )
                })
            }
            #[cfg(not(feature = "redis"))]
            Kind::WshubRedis | Kind::NaiveRedis => {
                return Err(std::io::Error::other(format!(
                    "{kind} needs the redis feature: cargo bench --features redis --bench load"
                )));
            }
        };
        println!("addr {addr}");
        std::io::stdout().flush()?;
        // stdin is read on a plain thread; the runtime keeps serving.
        tokio::task::spawn_blocking(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if line.trim() == "stats" {
                    let rss = sys::rss_kib(None).unwrap_or(0);
                    let (user, system) = sys::own_cpu_micros();
                    // Fields the kernel may not give are left out, so that
                    // the benchmark reports them missing rather than zero.
                    let mut extra = String::new();
                    if let Some((voluntary, involuntary)) = sys::own_context_switches() {
                        extra.push_str(&format!(" nvcsw={voluntary} nivcsw={involuntary}"));
                    }
                    println!(
                        "stats {} {} {} user_us={user}{extra}",
                        user + system,
                        rss,
                        count()
                    );
                    let _ = std::io::stdout().flush();
                }
            }
        })
        .await
        .map_err(std::io::Error::other)
    });
    if let Err(err) = result {
        eprintln!("server: {err}");
        std::process::exit(1);
    }
    std::process::exit(0)
}

/// A number from the environment variable `name`, if set.
fn env_number<T: FromStr>(name: &str) -> std::io::Result<Option<T>> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .map(Some)
            .map_err(|_| std::io::Error::other(format!("{name}={value:?} is not a number"))),
        Err(_) => Ok(None),
    }
}

/// A loopback listener with a backlog deep enough for bursts of handshakes
/// (and the send buffer of [`SNDBUF_ENV`], if set).
async fn listen() -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    if let Some(bytes) = env_number::<u32>(SNDBUF_ENV)? {
        socket.set_send_buffer_size(bytes)?;
    }
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    socket.listen(4096)
}

async fn serve_wshub(listener: TcpListener, hub: Hub, metrics: Option<Metrics>) {
    // The benchmark holds up to the open-file limit (about 20,000) sessions,
    // and has up to 200 handshakes in flight from one 127.N.0.x address,
    // more than the default max_handshakes_per_ip (64) allows one address.
    let mut server = Server::new();
    if let Some(metrics) = metrics {
        server = server.metrics("/metrics", metrics);
    }
    let server = server
        .max_connections(None)
        .max_handshakes_per_ip(None)
        .route("/ws", move |mut session| {
            let hub = hub.clone();
            async move {
                let subscription = hub.subscribe();
                session.join(subscription).await;
            }
        });
    if let Err(err) = server.serve(listener, std::future::pending()).await {
        eprintln!("server: {err}");
    }
}

async fn serve_pubsub(listener: TcpListener, pubsub: PubSub, connections: Arc<AtomicU64>) {
    // What `Server::pubsub` installs (the handler `PubSub::route` returns is
    // `pubsub.serve(session)`), with a count of open sessions for `stats`;
    // the benchmark's clients offer no subprotocol. Limits lifted as for
    // `serve_wshub`.
    let server = Server::new()
        .max_connections(None)
        .max_handshakes_per_ip(None)
        .route("/pubsub", move |session| {
            let pubsub = pubsub.clone();
            let connections = connections.clone();
            async move {
                connections.fetch_add(1, Ordering::Relaxed);
                pubsub.serve(session).await;
                connections.fetch_sub(1, Ordering::Relaxed);
            }
        });
    if let Err(err) = server.serve(listener, std::future::pending()).await {
        eprintln!("server: {err}");
    }
}

/// `<sessions> topics=.. subscriptions=..` and the counters of every local
/// topic hub, summed.
fn pubsub_stats(pubsub: &PubSub, connections: &AtomicU64) -> String {
    let topics = pubsub.topics();
    let (mut subscriptions, mut published, mut dropped, mut evicted) = (0, 0, 0, 0);
    let (mut lagged, mut disconnected, mut stalled) = (0, 0, 0);
    let names = topics.names();
    for name in &names {
        if let Some(hub) = topics.get(name) {
            let s = hub.stats();
            subscriptions += s.subscribers;
            published += s.published;
            dropped += s.dropped;
            evicted += s.evicted;
            lagged += s.lagged;
            disconnected += s.disconnected;
            stalled += s.stalled;
        }
    }
    format!(
        "{} topics={} subscriptions={subscriptions} published={published} dropped={dropped} \
         evicted={evicted} lagged={lagged} disconnected={disconnected} stalled={stalled}",
        connections.load(Ordering::Relaxed),
        names.len(),
    )
}

/// The Redis URL a Redis kind was started with.
#[cfg(feature = "redis")]
fn redis_url() -> std::io::Result<String> {
    std::env::var(REDIS_URL_ENV)
        .map_err(|_| std::io::Error::other(format!("{REDIS_URL_ENV} is not set")))
}

/// The hand-written pattern's list of local sessions.
#[cfg(feature = "redis")]
type NaiveList = Arc<std::sync::Mutex<Vec<mpsc::UnboundedSender<Message>>>>;

/// Connects to Redis (one multiplexed connection for PUBLISH, one
/// subscription), then serves the hand-written pattern on `listener` in a
/// task of its own. Returns the session list.
#[cfg(feature = "redis")]
async fn naive_redis(
    listener: TcpListener,
    url: &str,
    connections: Arc<AtomicU64>,
) -> std::io::Result<NaiveList> {
    let client = redis::Client::open(url).map_err(std::io::Error::other)?;
    let publish = client
        .get_multiplexed_async_connection()
        .await
        .map_err(std::io::Error::other)?;
    let mut subscription = client
        .get_async_pubsub()
        .await
        .map_err(std::io::Error::other)?;
    subscription
        .subscribe(NAIVE_CHANNEL)
        .await
        .map_err(std::io::Error::other)?;
    let sessions: NaiveList = Arc::default();
    // Every message of the channel to every local session.
    let list = sessions.clone();
    tokio::spawn(async move {
        let mut messages = subscription.into_on_message();
        while let Some(msg) = messages.next().await {
            let Ok(text) = String::from_utf8(msg.get_payload_bytes().to_vec()) else {
                continue;
            };
            let msg = Message::text(text);
            list.lock()
                .unwrap()
                .retain(|tx| tx.send(msg.clone()).is_ok());
        }
        eprintln!("naive-redis: the subscription ended");
    });
    let list = sessions.clone();
    tokio::spawn(accept_loop(listener, move |tcp| {
        let (list, connections) = (list.clone(), connections.clone());
        let mut publish = publish.clone();
        async move {
            let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
            list.lock().unwrap().push(tx);
            connections.fetch_add(1, Ordering::Relaxed);
            let writer = tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    if sink.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Text(text) = msg {
                    let published: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                        .arg(NAIVE_CHANNEL)
                        .arg(text.as_str())
                        .query_async(&mut publish)
                        .await;
                    if let Err(err) = published {
                        eprintln!("naive-redis: PUBLISH: {err}");
                    }
                }
            }
            // The forwarder drops the sender once the writer is gone.
            writer.abort();
            connections.fetch_sub(1, Ordering::Relaxed);
        }
    }));
    Ok(sessions)
}

async fn accept_loop<F, Fut>(listener: TcpListener, mut per_connection: F)
where
    F: FnMut(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(per_connection(tcp));
            }
            // Out of files: wait for some to close, as a production server would.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

type KtorSet = Arc<Mutex<HashMap<u64, mpsc::Sender<Message>>>>;

async fn serve_ktor(listener: TcpListener, connections: Arc<AtomicU64>) {
    let set: KtorSet = Arc::default();
    let next_id = Arc::new(AtomicU64::new(0));
    accept_loop(listener, move |tcp| {
        let set = set.clone();
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let connections = connections.clone();
        async move {
            let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            let (tx, mut rx) = mpsc::channel::<Message>(KTOR_OUTGOING);
            // Ktor's writer: serialize what is queued, flush when the queue is empty.
            let writer = tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    if sink.feed(msg).await.is_err() {
                        return;
                    }
                    while let Ok(msg) = rx.try_recv() {
                        if sink.feed(msg).await.is_err() {
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
            });
            set.lock().await.insert(id, tx);
            connections.fetch_add(1, Ordering::Relaxed);
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Text(text) = msg {
                    // `frame.readText()`, then `connections.forEach { it.session.send(text) }`.
                    let text = text.to_string();
                    let set = set.lock().await;
                    for tx in set.values() {
                        let _ = tx.send(Message::text(text.clone())).await;
                    }
                }
            }
            set.lock().await.remove(&id);
            connections.fetch_sub(1, Ordering::Relaxed);
            writer.abort();
        }
    })
    .await
}

async fn serve_axum(listener: TcpListener, tx: broadcast::Sender<String>) {
    accept_loop(listener, move |tcp| {
        let tx = tx.clone();
        async move {
            let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            let mut rx = tx.subscribe();
            let mut send_task = tokio::spawn(async move {
                while let Ok(msg) = rx.recv().await {
                    if sink.send(Message::text(msg)).await.is_err() {
                        break;
                    }
                }
            });
            let mut recv_task = tokio::spawn(async move {
                while let Some(Ok(Message::Text(text))) = stream.next().await {
                    let _ = tx.send(text.to_string());
                }
            });
            tokio::select! {
                _ = &mut send_task => recv_task.abort(),
                _ = &mut recv_task => send_task.abort(),
            }
        }
    })
    .await
}
