//! The pub/sub protocol (topics, history, resume, presence) over one
//! WebSocket, on the embedded broker, or on Redis for several nodes.
//!
//! Run it:
//!
//! ```text
//! cargo run --release --example pubsub
//! cargo run --release --example pubsub -- --addr 127.0.0.1:9002 --history 500 --replay 10
//! ```
//!
//! Several nodes sharing topics, history and presence through a Redis
//! (each on its own port; a client may resume on any of them):
//!
//! ```text
//! cargo run --release --features redis --example pubsub -- --redis redis://127.0.0.1:6379 --addr 127.0.0.1:8081
//! cargo run --release --features redis --example pubsub -- --redis redis://127.0.0.1:6379 --addr 127.0.0.1:8082
//! ```
//!
//! Then talk to `ws://127.0.0.1:8080/pubsub` with `websocat` (each line you
//! type is one command; `>` marks what the server answers):
//!
//! ```text
//! $ websocat ws://127.0.0.1:8080/pubsub
//! {"id":1,"op":"subscribe","topic":"news"}
//! > {"id":1,"ok":true,"epoch":"5c1f0e9a7b2d4c81","seq":0,"recovered":true,"client":"c1"}
//! {"id":2,"op":"publish","topic":"news","data":{"text":"hello"}}
//! > {"op":"message","topic":"news","epoch":"5c1f0e9a7b2d4c81","seq":1,"data":{"text":"hello"}}
//! > {"id":2,"ok":true,"seq":1}
//! {"id":3,"op":"presence","topic":"news"}
//! > {"id":3,"ok":true,"count":1,"members":[{"client":"c1","info":{"name":"guest"}}]}
//! {"id":4,"op":"history","topic":"news","limit":10}
//! > {"id":4,"ok":true,"epoch":"5c1f0e9a7b2d4c81","messages":[{"op":"message",...,"seq":1,...}]}
//! ```
//!
//! (A publisher subscribed to its topic gets the push and the reply in either
//! order.) Reconnect later and resume where you were: every message after seq 1
//! that the history still keeps comes first, then live ones:
//!
//! ```text
//! {"id":1,"op":"subscribe","topic":"news","since":{"epoch":"5c1f0e9a7b2d4c81","seq":1}}
//! ```
//!
//! or, in a browser console on any page:
//!
//! ```text
//! const ws = new WebSocket("ws://127.0.0.1:8080/pubsub?name=ann", "wshub.v1");
//! ws.onmessage = (e) => console.log(JSON.parse(e.data));
//! ws.onopen = () => {
//!   ws.send(JSON.stringify({id: 1, op: "subscribe", topic: "news"}));
//!   ws.send(JSON.stringify({id: 2, op: "publish", topic: "news", data: "hi"}));
//! };
//! ```
//!
//! `?name=` sets the name presence shows (default `guest`); the protocol's
//! reference is `docs/PROTOCOL.md`. `/metrics` is the Prometheus scrape.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wshub::{Config, Data, Metrics, PubSub, PubSubConfig, RateLimit, Server, TopicConfig};

/// The pub/sub protocol: topics, history, resume and presence.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Messages each topic keeps for history and resume.
    #[arg(long, default_value_t = 100)]
    history: usize,
    /// How long each kept message stays, in seconds.
    #[arg(long, default_value_t = 600)]
    history_ttl: u64,
    /// Messages a new subscriber gets first (without `since`).
    #[arg(long, default_value_t = 0)]
    replay: usize,
    /// Messages a second one client may publish on average (0: no limit).
    #[arg(long, default_value_t = 20)]
    publish_rate: u32,
    /// Messages one client may publish at once after a quiet spell.
    #[arg(long, default_value_t = 40)]
    publish_burst: u32,
    /// A Redis to share topics with other nodes (`redis://host:port`);
    /// without it, the embedded broker. Needs `--features redis`.
    #[arg(long)]
    redis: Option<String>,
    /// With `--redis`: how long, in seconds, a node's presence entries
    /// outlive it when it dies.
    #[arg(long, default_value_t = 10.0)]
    presence_lease: f64,
}

/// The broker `--redis` names, if any.
#[cfg(feature = "redis")]
async fn broker(
    args: &Args,
) -> Result<Option<std::sync::Arc<dyn wshub::Broker>>, Box<dyn std::error::Error>> {
    let Some(url) = &args.redis else {
        return Ok(None);
    };
    let lease = Duration::try_from_secs_f64(args.presence_lease)
        .map_err(|err| format!("--presence-lease {}: {err}", args.presence_lease))?;
    let config = wshub::RedisConfig::default().lease(lease);
    let broker = wshub::RedisBroker::connect(url, config).await?;
    tracing::info!(node = broker.node(), "on Redis at {url}");
    Ok(Some(std::sync::Arc::new(broker)))
}

#[cfg(not(feature = "redis"))]
async fn broker(
    args: &Args,
) -> Result<Option<std::sync::Arc<dyn wshub::Broker>>, Box<dyn std::error::Error>> {
    match &args.redis {
        None => Ok(None),
        Some(_) => Err("--redis needs the redis feature: cargo run --features redis --example pubsub -- --redis URL".into()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();

    let metrics = Metrics::new();
    let config = PubSubConfig::default()
        .topic(
            TopicConfig::default()
                .history(args.history)
                .history_ttl(Duration::from_secs(args.history_ttl))
                .replay(args.replay)
                .presence_events(true),
        )
        .metrics(Some(metrics.clone()))
        .client_info(|request| {
            let name = request
                .query_param("name")
                .unwrap_or_else(|| "guest".into());
            Data::json(&serde_json::json!({ "name": name })).ok()
        });
    let pubsub = match broker(&args).await? {
        Some(broker) => PubSub::with_broker(config, broker)?,
        None => PubSub::new(config)?,
    };
    let publish_rate =
        (args.publish_rate > 0).then(|| RateLimit::new(args.publish_rate, args.publish_burst));
    let server = Server::new()
        .config(Config::default().publish_rate(publish_rate))
        .metrics("/metrics", metrics)
        .pubsub("/pubsub", &pubsub);

    let listener = server.bind(args.addr).await?;
    let addr = listener.local_addr()?;
    tracing::info!(
        "pubsub on ws://{addr}/pubsub (history {} for {} s, replay {})",
        args.history,
        args.history_ttl,
        args.replay
    );
    server
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
