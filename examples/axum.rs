//! Ktor's SharedFlow WebSocket sample inside an axum application: one
//! `Router` with ordinary routes and a wshub WebSocket route next to them.
//!
//! Run it:
//!
//! ```text
//! cargo run --release --example axum --features axum
//! cargo run --release --example axum --features axum -- --addr 127.0.0.1:9001
//! ```
//!
//! Routes:
//!
//! * `GET /health`: `200 ok`.
//! * `GET /ws`: the SharedFlow sample: every client is greeted with
//!   `You are connected to WebSocket!`, and every message any client sends
//!   goes to every client, the sender included.
//! * `POST /publish`: the request body, UTF-8 text of at most 64 KiB, is
//!   published to every client as a text message: `202 Accepted` saying
//!   whether anyone was there to get it, `400` if it is not UTF-8, `413` if
//!   it is larger, `503` once the hub is closed.
//! * `GET /metrics`: the Prometheus scrape ([`wshub::Metrics`]): the hub as
//!   `hub="sharedflow"`, the sessions, their close codes and bytes.
//!
//! Try it, with two or more clients on `/ws`:
//!
//! ```text
//! websocat ws://127.0.0.1:8080/ws
//! python3 -m websockets ws://127.0.0.1:8080/ws     # after pip install websockets
//! curl -i http://127.0.0.1:8080/health
//! curl -i -d 'Hello from curl' http://127.0.0.1:8080/publish
//! curl -s http://127.0.0.1:8080/metrics
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
//! `--addr 127.0.0.1:0` picks a free port; the log line `axum example on
//! http://ADDR (ws://ADDR/ws)` says which. `RUST_LOG=wshub=debug` shows each
//! session; ctrl-c shuts down gracefully (every WebSocket client gets Close
//! 1001 Going Away).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use wshub::axum::Sessions;
use wshub::{Config, Hub, Message, Metrics, PublishError, Published, Utf8Bytes};

/// The largest body `POST /publish` takes, in bytes; more is answered 413.
const PUBLISH_LIMIT: usize = 64 * 1024;

/// Ktor's SharedFlow sample in an axum router, with /health and /publish.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();

    let hub = Hub::new();
    // Ktor's sample: pingPeriod = 15 s, timeout = 15 s.
    // Prometheus metrics: the hub as hub="sharedflow", and every session.
    let metrics = Metrics::new();
    metrics.register_hub("sharedflow", &hub)?;
    let config = Config::default()
        .ping_period(Some(Duration::from_secs(15)))
        .timeout(Duration::from_secs(15))
        .metrics(Some(metrics.clone()));
    let sessions = Sessions::new(config);

    let ws = {
        let hub = hub.clone();
        sessions.route(move |mut session| {
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
        })
    };
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ws", ws)
        .route(
            "/publish",
            post(publish).layer(DefaultBodyLimit::max(PUBLISH_LIMIT)),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.encode();
                async move { ([(header::CONTENT_TYPE, Metrics::CONTENT_TYPE)], text) }
            }),
        )
        .with_state(hub);

    // Server's socket options (no Nagle delay, a small kernel send buffer).
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let addr = listener.local_addr()?;
    let listener = listener.tap_io(wshub::axum::tune);
    tracing::info!(
        "axum example on http://{addr} (ws://{addr}/ws); metrics at http://{addr}/metrics"
    );
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    // With the peer's address, for Session::request().peer_addr().
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(sessions.graceful(ctrl_c))
    .await?;
    // axum has stopped; the WebSocket sessions are closing with 1001.
    sessions.wait().await;
    Ok(())
}

/// `POST /publish`: the body, as a text message, to every client.
async fn publish(State(hub): State<Hub>, body: Bytes) -> (StatusCode, String) {
    let Ok(text) = Utf8Bytes::try_from(body) else {
        return (
            StatusCode::BAD_REQUEST,
            "the body must be UTF-8 text\n".to_owned(),
        );
    };
    match hub.publish(Message::Text(text)).await {
        Ok(Published::Queued) => (StatusCode::ACCEPTED, "queued\n".to_owned()),
        Ok(Published::NoSubscribers) => (
            StatusCode::ACCEPTED,
            "no subscribers: nobody got it\n".to_owned(),
        ),
        Ok(Published::Dropped) => (
            StatusCode::ACCEPTED,
            "dropped: the hub's buffer is full\n".to_owned(),
        ),
        Err(PublishError::Closed(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the hub is closed\n".to_owned(),
        ),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
    }
}
