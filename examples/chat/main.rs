//! The chat of Ktor's chat guide, finished: a browser page served by the
//! server, rooms as topics of the pub/sub protocol, names, presence, the
//! room's recent history, and reconnection that resumes where it left off.
//!
//! Run it and open the page (in two windows, to talk to yourself):
//!
//! ```text
//! cargo run --release --example chat
//! # chat on http://127.0.0.1:8080/
//! cargo run --release --example chat -- --addr 127.0.0.1:9000 --history 500 --replay 50
//! ```
//!
//! Two nodes sharing the rooms through a Redis (open one window on each):
//!
//! ```text
//! cargo run --release --features redis --example chat -- --redis redis://127.0.0.1:6379 --addr 127.0.0.1:8081
//! cargo run --release --features redis --example chat -- --redis redis://127.0.0.1:6379 --addr 127.0.0.1:8082
//! ```
//!
//! The page, its stylesheet and script, and `wshub.js` (the protocol's
//! browser client, [`wshub::WSHUB_JS`]) are compiled into the binary: no
//! CDN, no build step. Each visitor is `user$id` (the guide's name) until
//! it picks another; the name travels as `?name=` on the WebSocket URL and
//! shows in presence. Names are whatever the visitor says: this demo has no
//! log-in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wshub::{
    Config, Data, Excess, Metrics, PubSub, PubSubConfig, RateLimit, Server, TopicConfig, WSHUB_JS,
};

const INDEX_HTML: &str = include_str!("index.html");
const CHAT_JS: &str = include_str!("chat.js");
const CHAT_CSS: &str = include_str!("chat.css");

/// The longest name, in characters.
const MAX_NAME: usize = 32;

/// A chat in the browser on the pub/sub protocol.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Messages each room keeps: a page that reconnects gets back what it
    /// missed of them.
    #[arg(long, default_value_t = 100)]
    history: usize,
    /// Of those, how many a newcomer to a room sees first.
    #[arg(long, default_value_t = 20)]
    replay: usize,
    /// A Redis to share the rooms with other nodes (`redis://host:port`);
    /// without it, the embedded broker. Needs `--features redis`.
    #[arg(long)]
    redis: Option<String>,
}

/// The broker `--redis` names, if any.
#[cfg(feature = "redis")]
async fn broker(args: &Args) -> Result<Option<Arc<dyn wshub::Broker>>, Box<dyn std::error::Error>> {
    let Some(url) = &args.redis else {
        return Ok(None);
    };
    let broker = wshub::RedisBroker::connect(url, wshub::RedisConfig::default()).await?;
    tracing::info!(node = broker.node(), "on Redis at {url}");
    Ok(Some(Arc::new(broker)))
}

#[cfg(not(feature = "redis"))]
async fn broker(args: &Args) -> Result<Option<Arc<dyn wshub::Broker>>, Box<dyn std::error::Error>> {
    match &args.redis {
        None => Ok(None),
        Some(_) => Err(
            "--redis needs the redis feature: cargo run --features redis --example chat -- --redis URL"
                .into(),
        ),
    }
}

/// The name a visitor asked for, tidied: trimmed, without control
/// characters, at most [`MAX_NAME`] characters; `None` if nothing is left.
fn tidy_name(asked: &str) -> Option<String> {
    let name: String = asked
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_NAME)
        .collect();
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    if args.history == 0 {
        return Err("--history must be at least 1: reconnection resumes from the history".into());
    }

    // As in the guide: each visitor without a name is user$id.
    let visitors = AtomicU64::new(1);
    let metrics = Metrics::new();
    let config = PubSubConfig::default()
        .topic(
            TopicConfig::default()
                .history(args.history)
                // A newcomer to a room gets its latest lines first.
                .replay(args.replay.min(args.history))
                .presence_events(true),
        )
        .max_history(args.history.max(100))
        .metrics(Some(metrics.clone()))
        .client_info(move |request| {
            let name = request
                .query_param("name")
                .and_then(|asked| tidy_name(&asked))
                .unwrap_or_else(|| format!("user{}", visitors.fetch_add(1, Ordering::Relaxed)));
            Data::json(&serde_json::json!({ "name": name })).ok()
        });
    let pubsub = match broker(&args).await? {
        Some(broker) => PubSub::with_broker(config, broker)?,
        None => PubSub::new(config)?,
    };
    // Ten lines a second, twenty at once: more gets a "limit" reply that the
    // page shows, and the connection stays open.
    let rate = RateLimit::new(10, 20).on_excess(Excess::Drop);
    let server = Server::new()
        .config(Config::default().publish_rate(Some(rate)))
        .page("/", "text/html; charset=utf-8", INDEX_HTML)
        .page("/chat.js", "text/javascript; charset=utf-8", CHAT_JS)
        .page("/chat.css", "text/css; charset=utf-8", CHAT_CSS)
        .page("/wshub.js", "text/javascript; charset=utf-8", WSHUB_JS)
        .metrics("/metrics", metrics)
        .pubsub("/pubsub", &pubsub);

    let listener = server.bind(args.addr).await?;
    let addr = listener.local_addr()?;
    tracing::info!(
        "chat on http://{addr}/ (rooms keep {} messages)",
        args.history
    );
    server
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
