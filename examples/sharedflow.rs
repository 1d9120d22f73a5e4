//! Ktor's SharedFlow WebSocket sample, in wshub.
//!
//! Run it:
//!
//! ```text
//! cargo run --release --example sharedflow
//! cargo run --release --example sharedflow -- --addr 127.0.0.1:9001 --policy drop-oldest --capacity 256
//! ```
//!
//! Then connect two clients to `ws://127.0.0.1:8080/ws` and type in either;
//! every message reaches both, the sender included, in order:
//!
//! ```text
//! websocat ws://127.0.0.1:8080/ws
//! python3 -m websockets ws://127.0.0.1:8080/ws
//! ```
//!
//! or, in a browser console on any page:
//!
//! ```text
//! const ws = new WebSocket("ws://127.0.0.1:8080/ws");
//! ws.onmessage = (e) => console.log(e.data);
//! ws.onopen = () => ws.send("Hello");
//! ```
//!
//! Several nodes, one conversation: with `--redis`, the hub becomes a topic
//! (`sharedflow`) of a [`RedisBroker`](wshub::RedisBroker), and every
//! message reaches every client of every node, in one order:
//!
//! ```text
//! cargo run --release --features redis --example sharedflow -- --redis redis://127.0.0.1:6379 --addr 127.0.0.1:8081
//! cargo run --release --features redis --example sharedflow -- --redis redis://127.0.0.1:6379 --addr 127.0.0.1:8082
//! ```
//!
//! `/echo` answers each message to its sender only (for conformance suites);
//! `http://127.0.0.1:8080/metrics` is the Prometheus scrape (the hub is
//! labelled `hub="sharedflow"`): `curl -s 127.0.0.1:8080/metrics`.
//! `RUST_LOG=wshub=debug` shows each session; ctrl-c shuts down gracefully
//! (every client gets Close 1001 Going Away).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wshub::{Config, Hub, HubConfig, Metrics, Policy, RateLimit, Server};

/// Ktor's SharedFlow sample: broadcast every message to every client.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// What a full hub buffer does: suspend, drop-oldest, drop-latest or disconnect.
    #[arg(long, default_value = "suspend")]
    policy: Policy,
    /// How many messages the hub buffers for its slowest client.
    #[arg(long, default_value_t = 1024)]
    capacity: usize,
    /// The largest message a client may send, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_message_size: usize,
    /// Messages a second one client may publish on average (0: no limit);
    /// a client that sends more is closed with 1008.
    #[arg(long, default_value_t = 20)]
    publish_rate: u32,
    /// Messages one client may publish at once after a quiet spell.
    #[arg(long, default_value_t = 40)]
    publish_burst: u32,
    /// A Redis to share the conversation with other nodes
    /// (`redis://host:port`). Needs `--features redis`.
    #[arg(long)]
    redis: Option<String>,
}

/// With `--redis`: the topic every node shares, and what feeds the local
/// hub from it.
#[cfg(feature = "redis")]
mod shared {
    use std::sync::Arc;

    use wshub::{
        Data, Epoch, Hub, Message, Position, PubSub, PubSubConfig, RecvError, RedisBroker,
        RedisConfig,
    };

    pub const TOPIC: &str = "sharedflow";

    /// A node on the Redis at `url`; a task publishes the topic's messages,
    /// as their text, into `hub`.
    pub async fn start(url: &str, hub: Hub) -> Result<PubSub, Box<dyn std::error::Error>> {
        let broker = RedisBroker::connect(url, RedisConfig::default()).await?;
        tracing::info!(
            node = broker.node(),
            "sharing the hub through Redis at {url}"
        );
        let pubsub = PubSub::with_broker(PubSubConfig::default(), Arc::new(broker))?;
        // Subscribed before the node listens: nothing a client of another
        // node says once this one is up is missed.
        let first = pubsub.subscribe(TOPIC, None).await?;
        let node = pubsub.clone();
        tokio::spawn(async move {
            let mut topic = first.into_receiver();
            // The last position seen: a new subscription resumes from it.
            let mut at: Option<Position> = None;
            loop {
                match topic.recv().await {
                    Ok(Message::Text(push)) => {
                        let Ok(push) = serde_json::from_str::<serde_json::Value>(&push) else {
                            continue;
                        };
                        match (push["op"].as_str(), push["data"].as_str()) {
                            (Some("message"), Some(text)) => {
                                if let (Some(epoch), Some(seq)) =
                                    (push["epoch"].as_str(), push["seq"].as_u64())
                                {
                                    at = Some(Position {
                                        epoch: Epoch::new(epoch),
                                        seq,
                                    });
                                }
                                let _ = hub.publish(text.to_owned()).await;
                            }
                            (Some("gap"), _) => {
                                tracing::warn!(missed = %push["missed"], "messages lost");
                            }
                            _ => {}
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => tracing::warn!(n, "lagged"),
                    // The topic restarted (Redis lost its data): subscribe
                    // again from the last position, until that works.
                    Err(RecvError::Closed) => loop {
                        match node.subscribe(TOPIC, at.as_ref()).await {
                            Ok(subscribed) => {
                                topic = subscribed.into_receiver();
                                break;
                            }
                            Err(err) => {
                                tracing::warn!(%err, "subscribing to the shared topic; again in 1 s");
                                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                            }
                        }
                    },
                }
            }
        });
        Ok(pubsub)
    }

    /// Publishes what a client typed to every node.
    pub async fn publish(pubsub: &PubSub, text: &str) -> Result<(), wshub::PubSubError> {
        pubsub
            .publish(TOPIC, Data::json(text).expect("a string is JSON"))
            .await
            .map(drop)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();

    let hub = match Hub::with_config(
        HubConfig::default()
            .capacity(args.capacity)
            .policy(args.policy),
    ) {
        Ok(hub) => hub,
        Err(err) => {
            eprintln!("sharedflow: --capacity {}: {err}", args.capacity);
            std::process::exit(2);
        }
    };
    let metrics = Metrics::new();
    metrics.register_hub("sharedflow", &hub)?;
    // On the internet one client must not be able to fill the hub for
    // everyone: a publish rate per connection (Ktor's sample has none).
    let publish_rate =
        (args.publish_rate > 0).then(|| RateLimit::new(args.publish_rate, args.publish_burst));
    // Ktor's sample: pingPeriod = 15 s, timeout = 15 s.
    let config = Config::default()
        .ping_period(Some(Duration::from_secs(15)))
        .timeout(Duration::from_secs(15))
        .max_frame_size(Some(args.max_message_size))
        .max_message_size(Some(args.max_message_size))
        .publish_rate(publish_rate);

    #[cfg(feature = "redis")]
    if let Some(url) = &args.redis {
        let pubsub = shared::start(url, hub.clone()).await?;
        let server = Server::new()
            .config(config)
            .metrics("/metrics", metrics)
            .route("/ws", move |mut session| {
                let (hub, pubsub) = (hub.clone(), pubsub.clone());
                async move {
                    // The local hub carries the shared topic; what the
                    // client sends goes to Redis, and back to every node.
                    let subscription = hub.subscribe();
                    session.send("You are connected to WebSocket!").await?;
                    session.outgoing().forward(subscription).await?;
                    while let Some(msg) = session.recv().await {
                        let text = match &msg {
                            wshub::Message::Text(text) => text.as_str(),
                            _ => continue,
                        };
                        if let Err(err) = shared::publish(&pubsub, text).await {
                            // Said to the sender, not lost in silence.
                            session.send(format!("not sent: {err}")).await?;
                        }
                    }
                    Ok::<_, wshub::Error>(())
                }
            });
        return run(server, &args).await;
    }
    #[cfg(not(feature = "redis"))]
    if args.redis.is_some() {
        eprintln!(
            "sharedflow: --redis needs the redis feature: \
             cargo run --features redis --example sharedflow -- --redis URL"
        );
        std::process::exit(2);
    }

    let server = Server::new()
        .config(config)
        .metrics("/metrics", metrics)
        .route("/ws", move |mut session| {
            let hub = hub.clone();
            async move {
                // Subscribe before greeting so nothing published meanwhile is missed.
                let subscription = hub.subscribe();
                session.send("You are connected to WebSocket!").await?;
                let reason = session.join(subscription).await;
                tracing::info!(
                    session = session.id(),
                    code = u16::from(reason.code),
                    reason = %reason.reason,
                    "left"
                );
                Ok::<_, wshub::Error>(())
            }
        });
    run(server, &args).await
}

/// Adds `/echo`, listens, logs the address, serves until ctrl-c.
async fn run(server: Server, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let server = server.route("/echo", |mut session| async move {
        while let Some(msg) = session.recv().await {
            if session.send(msg).await.is_err() {
                break;
            }
        }
    });

    // Server::bind: a listen backlog for bursts of reconnecting clients.
    let listener = server.bind(args.addr).await?;
    let addr = listener.local_addr()?;
    tracing::info!(
        "sharedflow on ws://{addr}/ws (policy {}, capacity {}); /echo echoes; \
         metrics at http://{addr}/metrics",
        args.policy,
        args.capacity
    );
    server
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
