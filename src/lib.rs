//! WebSocket broadcast over one shared pub/sub stream.
//!
//! wshub ports Ktor's WebSockets plugin and its SharedFlow broadcast pattern to
//! Rust: every message a client sends can reach every other client through one
//! [`Hub`], an async-broadcast channel. Sessions never hold references to each
//! other and the hub keeps no list of sessions: each session's receive loop
//! publishes into the hub and each session's send task subscribes to it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use wshub::testing::TestServer;
//! use wshub::{Hub, Server};
//!
//! let hub = Hub::new();
//! let server = Server::new().route("/ws", move |mut session| {
//!     let hub = hub.clone();
//!     async move {
//!         let subscription = hub.subscribe(); // before the greeting: miss nothing
//!         session.send("You are connected to WebSocket!").await?;
//!         session.join(subscription).await; // publish what it sends, forward what the hub carries
//!         Ok::<_, wshub::Error>(())
//!     }
//! });
//!
//! let server = TestServer::start(server).await;
//! let mut ann = server.connect("/ws").await;
//! let mut bob = server.connect("/ws").await;
//! ann.expect_text("You are connected to WebSocket!").await;
//! bob.expect_text("You are connected to WebSocket!").await;
//! ann.send("Hello").await;
//! bob.expect_text("Hello").await;
//! ann.expect_text("Hello").await; // the sender gets it too, as in Ktor's sample
//! server.shutdown().await;
//! # }
//! ```
//!
//! # What a slow client does to the hub
//!
//! One shared channel means one slow client can hold everyone back. The hub
//! buffers up to [`HubConfig::capacity`] messages for its slowest subscriber;
//! when that buffer is full, the [`Policy`] decides who pays:
//!
//! * [`Policy::Suspend`] (the default, as in Ktor): publishers **wait** until the
//!   slowest subscriber makes room. Nothing is lost, but everyone goes at the
//!   pace of the slowest client. So that a slow client cannot hold the hub for
//!   ever, a session that keeps the buffer full for
//!   [`HubConfig::stall_timeout`] (5 s) while others keep up is closed with
//!   1013 "too slow for the hub" and its place freed, whether it reads
//!   nothing or reads steadily but slower than the hub publishes.
//! * [`Policy::DropOldest`]: the **oldest** buffered message is evicted.
//!   Publishers never wait; a lagging client skips ahead to what is still
//!   buffered and the gap is counted (and can be told to it with
//!   [`HubConfig::lag_notice`]). Fast clients lose nothing as long as they keep
//!   within the buffer.
//! * [`Policy::DropLatest`]: a message published into a full buffer is
//!   **discarded**, and the publish says so ([`Published::Dropped`]). Because the
//!   buffer is shared, the message is lost for *every* client, not just the slow
//!   one: choose it when new data is worth less than old.
//! * [`Policy::Disconnect`]: a client that falls a whole buffer behind is
//!   **closed** with 1013 (Try Again Later), the way uWebSockets and Centrifugo
//!   treat slow consumers. Publishers never wait, fast clients lose nothing, the
//!   slow one learns why and can reconnect.
//!
//! Every one of these is counted in [`HubStats`] (`dropped`, `evicted`,
//! `lagged`, `disconnected`), and the counts add up. Control frames (pings,
//! pongs, Close frames) never travel through the hub, so no policy drops them.
//!
//! Under every policy, a session whose socket takes no byte at all for
//! [`Config::send_timeout`] (5 s) is closed with 1013 "send timeout". wshub
//! keeps what the kernel may hold unsent small, so the socket takes bytes as
//! soon as the client reads some: a client that keeps reading, however slowly,
//! is never closed for being slow under the policies that do not wait; it
//! lags, and that is counted. The buffer is bounded in bytes as well as in
//! messages ([`HubConfig::max_bytes`]), and a broadcast is written to every
//! subscriber from the one shared payload, never copied per connection.
//!
//! # How it differs from axum's chat example and `tokio::sync::broadcast`
//!
//! The common pattern broadcasts a `String` over `tokio::sync::broadcast` and
//! each subscriber turns it into a new frame, one flush per message; slow
//! receivers silently lose messages (`Lagged`) and nobody is told. wshub
//! publishes Bytes-backed [`Message`]s, so a broadcast is encoded once and
//! shared by reference count with every subscriber; each send task batches
//! what is waiting into one flush; and the slow-client behaviour is a stated,
//! counted, tested choice.
//!
//! # Topics, history, resume and presence
//!
//! [`PubSub`] is a node of topics: each topic is one local [`Hub`], and
//! everything that must agree between nodes (sequence numbers, epochs, the
//! kept history, who is present) lives behind a [`Broker`] ([`InProcess`],
//! the embedded one, by default). A publish gets the topic's next sequence
//! number; a subscriber can start with the topic's last messages (replay),
//! resume from the last position it saw (every kept message after it, then
//! live, with no gap and no duplicate between), and sees a `gap` with the
//! exact count of what it will never get. [`Server::pubsub`] serves the
//! JSON protocol that browsers speak (`docs/PROTOCOL.md`). One session
//! forwards any number of subscriptions ([`Outgoing::forward`]), taken in
//! turn so that a busy topic never starves a quiet one, each under its own
//! topic's policy.
//!
//! [`WSHUB_JS`] is the protocol's browser client, to serve next to the
//! route: promises for publishes, presence, and reconnection with backoff
//! that resumes each topic where it was (`docs/WSHUB_JS.md`). The `chat`
//! example (`cargo run --release --example chat`, then open
//! `http://127.0.0.1:8080/`) is Ktor's chat guide finished on it: rooms,
//! names, presence, history, all in one binary.
//!
//! # Many nodes on Redis
//!
//! With the `redis` feature, [`RedisBroker`] lets several nodes behind a
//! load balancer share topics: a publish on any node is numbered, kept and
//! sent by one Redis script, so every node delivers it with the same epoch
//! and seq, and a client resumes on whichever node it reaches. A node
//! subscribes to a topic's channel only while it has local subscribers, all
//! topics over one connection; when that connection drops, goes silent or
//! skips a seq, the node reads what it missed from the history, once per
//! topic, so its clients see no gap unless the history no longer holds the
//! messages. `docs/DEPLOYMENT.md` has the Redis settings that matter and
//! what is guaranteed across nodes.
//!
//! # Metrics and traces
//!
//! [`Metrics`] exports every hub's counts, the server's sessions, handshakes,
//! refusals, close codes and bytes, and a histogram of the time from publish
//! to the socket write, in the Prometheus text format; [`Server::metrics`]
//! serves them at a path. Each session runs in a `tracing` span
//! `session{id, peer, path}` ([`Session::span`]); its close is an event on it.
//!
//! # Cargo features
//!
//! * `tls` (off by default): `Server::serve_tls` serves `wss://` through
//!   tokio-rustls, re-exported as `wshub::tokio_rustls`. Without it, terminate
//!   TLS in a proxy in front of [`Server::serve`].
//! * `axum` (off by default): `wshub::axum`, WebSocket routes inside an axum
//!   application: the `WebSocketUpgrade` extractor, and `Sessions`, which
//!   runs wshub sessions with a [`Config`] and closes them with 1001 at
//!   axum's graceful shutdown.
//! * `redis` (off by default): [`RedisBroker`], a [`Broker`] on Redis for
//!   many nodes (redis-rs, with its connection manager for commands and a
//!   dedicated subscription connection).
//!
//! # Layout
//!
//! * `hub.rs`: [`Hub`], the one broadcast channel: publish, subscribe, counts.
//! * `policy.rs`: [`Policy`], the overflow policies, free of I/O.
//! * `session.rs`: [`Session`], its receive loop and send task, [`Outgoing`].
//! * `message.rs`: [`Message`], [`CloseReason`], the JSON helpers.
//! * `config.rs`: [`Config`] and [`HubConfig`], with documented defaults.
//! * `server.rs`: [`Server`]: listener, routes, handshake hook, graceful shutdown.
//! * `metrics.rs`: [`Metrics`], the Prometheus exposition (prometheus-client).
//! * `topics.rs`: [`Topics`], a registry of named hubs.
//! * `pubsub.rs`: [`PubSub`], topics with positions, history, resume and
//!   presence, and the protocol route.
//! * `broker.rs`: [`Broker`], where positions, history and presence live,
//!   and [`InProcess`], the embedded broker.
//! * `redis_broker/` (the `redis` feature): [`RedisBroker`], its
//!   subscription connection, catch-up and leases; `scripts.rs` holds its Lua.
//! * `forward.rs`: what a send task forwards: many subscriptions, in turn.
//! * `request.rs`: [`Request`], what a session knows of its upgrade request.
//! * `axum.rs` (the `axum` feature): `wshub::axum`, sessions in an axum
//!   router, upgraded and shut down as [`Server`] does it.
//! * `transport.rs`: the WebSocket stream shared by a session's two halves,
//!   and the write buffer under it that writes broadcasts without copying them.
//! * `error.rs`: [`Error`].
//! * `testing.rs`: [`testing::TestServer`] and [`testing::TestClient`].
//!
//! # Ktor to wshub
//!
//! | Ktor | wshub |
//! |---|---|
//! | `install(WebSockets) { pingPeriod, timeout, maxFrameSize }` | [`Config`] |
//! | `routing { webSocket("/path") { } }` | [`Server::route`]; in axum, `wshub::axum::Sessions::route` |
//! | `webSocketRaw` | [`Server::raw_route`] |
//! | `incoming`, `outgoing`, `send`, `close(reason)`, `closeReason`, `flush()`, `terminate()`, `call` | [`Session::incoming`], [`Session::outgoing`], [`Session::send`], [`Session::close`], [`Session::close_reason`], [`Session::flush`], [`Session::terminate`], [`Session::request`] |
//! | `sendSerialized` / `receiveDeserialized` | [`Session::send_json`] / [`Session::receive_json`] |
//! | `MutableSharedFlow(extraBufferCapacity, onBufferOverflow)` | [`Hub::with_config`], [`HubConfig`] |
//! | `MutableSharedFlow(replay = n)` | a [`PubSub`] topic with [`TopicConfig::replay`] |
//! | `emit` / `tryEmit` / `collect` | [`Hub::publish`] / [`Hub::try_publish`] / [`Hub::subscribe`] |
//! | `testApplication`, `handleWebSocketConversation` | [`testing::TestServer`], [`testing::TestClient`] |
//!
//! Ktor's MDN-style events map as: *onConnect* is the start of the handler;
//! *onMessage* is each [`Session::recv`] that returns a message; *onClose* and
//! *onError* are `recv` returning `None`, after which [`Session::close_reason`]
//! says which (the client's Close frame, or 1006 and the error's text).

#[cfg(feature = "axum")]
pub mod axum;
mod broker;
mod config;
mod error;
mod forward;
mod hub;
mod message;
mod metrics;
mod policy;
mod pubsub;
#[cfg(feature = "redis")]
mod redis_broker;
mod request;
mod server;
mod session;
pub mod testing;
mod topics;
mod transport;

pub use broker::{
    Broker, BrokerError, Data, Delivery, Entry, Epoch, History, InProcess, Member, Position, Range,
    Retention,
};
pub use config::{Config, Excess, HubConfig, LagNotice, RateLimit};
pub use error::Error;
pub use hub::{Hub, HubStats, PublishError, Published, RecvError, Subscription, TryRecvError};
pub use message::{
    Bytes, CloseCode, CloseReason, Message, Utf8Bytes, close_reason, from_json, json,
};
pub use metrics::{Metrics, MetricsBuilder};
pub use policy::{ParsePolicyError, Policy};
pub use pubsub::{
    Client, PubSub, PubSubConfig, PubSubError, SUBPROTOCOL, Subscribed, TopicConfig, TopicReceiver,
    WSHUB_JS,
};
#[cfg(feature = "redis")]
pub use redis_broker::{RedisBroker, RedisConfig};
pub use request::Request;
pub use server::{HandlerOutput, Rejection, Server};
pub use session::{ForwardId, Outgoing, Session};
pub use topics::{TopicError, Topics, TopicsConfig};

/// Entry points for the fuzz targets in `fuzz/`; they exist only in builds
/// with `--cfg fuzzing`, which `cargo fuzz` sets.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::server::serve_one;
}

/// The tungstenite crate wshub builds on, for types the re-exports lack.
pub use tokio_tungstenite::tungstenite;

/// The prometheus-client crate [`Metrics`] encodes with, for
/// [`Metrics::register`] into a registry of your own.
pub use prometheus_client;

/// The tokio-rustls crate (and through it `rustls`) that
/// [`Server::serve_tls`] takes its acceptor from (the `tls` feature).
#[cfg(feature = "tls")]
pub use tokio_rustls;
