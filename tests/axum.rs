//! wshub inside axum (the `axum` feature): `Sessions::route` next to
//! ordinary routes, the `WebSocketUpgrade` extractor, bad handshakes, the
//! Config applied, graceful shutdown through `with_graceful_shutdown`, and
//! the `axum` example binary driven by a Rust and a Python client.
//!
//! Every server here is `axum::serve` on 127.0.0.1:0, every client a real
//! socket.
#![cfg(feature = "axum")]

use std::future::IntoFuture as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use wshub::axum::{Sessions, WebSocketUpgrade};
use wshub::testing::TestClient;
use wshub::{CloseReason, Config, Hub, Message, Published, Session};

mod common;
use common::process::{
    ExampleProcess, build_example, free_port, no_proxy, require_python_websockets, run_bounded,
};
use common::{GREETING, WAIT, sharedflow_session, within, within_for};

/// An axum app served on 127.0.0.1:0 until its shutdown signal fires.
struct Served {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Served {
    /// Serves `app` with `sessions.graceful(...)` as its shutdown signal and
    /// the peer's address as `ConnectInfo`.
    async fn start(app: Router, sessions: &Sessions) -> Served {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        // The socket options Server sets, which send_timeout relies on.
        let listener = listener.tap_io(wshub::axum::tune);
        let (stop, stopped) = oneshot::channel::<()>();
        let signal = sessions.graceful(async {
            let _ = stopped.await;
        });
        let task = tokio::spawn(
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(signal)
            .into_future(),
        );
        Served {
            addr,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Fires the shutdown signal; returns when.
    fn shut_down(&mut self) -> Instant {
        let _ = self.stop.take().expect("shut down once").send(());
        Instant::now()
    }

    /// Waits for `axum::serve` to return.
    async fn returned(self) {
        within("axum::serve to return", self.task)
            .await
            .expect("the serve task")
            .expect("axum::serve");
    }
}

/// Ktor's SharedFlow route for `sessions`.
fn sharedflow_route(sessions: &Sessions, hub: &Hub) -> axum::routing::MethodRouter {
    let hub = hub.clone();
    sessions.route(move |session| sharedflow_session(session, hub.clone()))
}

/// `GET path` without upgrade headers, answered in full.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    http_raw(addr, request).await
}

/// The sample key of RFC 6455.
const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// An upgrade request for `/ws` with this key and version.
fn upgrade_request(key: &str, version: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n\r\n"
    )
}

/// Sends a raw HTTP request and reads the whole answer (the server closes).
async fn http_raw(addr: SocketAddr, request: impl AsRef<[u8]>) -> String {
    let mut tcp = within("a TCP connection", TcpStream::connect(addr))
        .await
        .expect("connect");
    within("the request", tcp.write_all(request.as_ref()))
        .await
        .expect("write the request");
    let mut answer = Vec::new();
    within("the answer", tcp.read_to_end(&mut answer))
        .await
        .expect("read the answer");
    String::from_utf8_lossy(&answer).into_owned()
}

fn close_code(reason: Option<CloseReason>) -> u16 {
    u16::from(reason.expect("a Close frame with a code").code)
}

#[tokio::test]
async fn a_wshub_route_serves_sessions_next_to_ordinary_axum_routes() {
    let hub = Hub::new();
    let sessions = Sessions::new(Config::default());
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ws", sharedflow_route(&sessions, &hub));
    let mut served = Served::start(app, &sessions).await;

    let health = http_get(served.addr, "/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("ok"), "{health}");

    let mut ann = TestClient::connect(&served.url("/ws")).await;
    let mut bob = TestClient::connect(&served.url("/ws")).await;
    ann.expect_text(GREETING).await;
    bob.expect_text(GREETING).await;
    ann.send("Hello").await;
    bob.expect_text("Hello").await;
    ann.expect_text("Hello").await;
    assert_eq!(hub.publish("news").await, Ok(Published::Queued));
    ann.expect_text("news").await;
    bob.expect_text("news").await;

    served.shut_down();
    assert_eq!(close_code(ann.expect_close().await), 1001);
    assert_eq!(close_code(bob.expect_close().await), 1001);
    served.returned().await;
    within("Sessions::wait", sessions.wait()).await;
}

#[tokio::test]
async fn the_session_knows_its_request_and_peer_and_closes_1000_or_1011() {
    let sessions = Sessions::new(Config::default());
    let (tx, mut seen) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/who",
            sessions.route(move |session: Session| {
                let tx = tx.clone();
                async move {
                    let request = session.request();
                    let _ = tx.send((
                        request.peer_addr(),
                        request.query_param("name"),
                        request.header("x-secret").map(str::to_owned),
                    ));
                    // Returns at once: the session closes with 1000.
                }
            }),
        )
        .route(
            "/fail",
            sessions.route(|_session| async { Err::<(), _>("broken") }),
        );
    let mut served = Served::start(app, &sessions).await;

    // The tungstenite client adds the upgrade headers to a request of its own.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut upgrade = served
        .url("/who?name=ann")
        .into_client_request()
        .expect("a client request");
    upgrade
        .headers_mut()
        .insert("x-secret", http::HeaderValue::from_static("hidden"));
    let (mut who, _) = within("the upgrade", tokio_tungstenite::connect_async(upgrade))
        .await
        .expect("upgrade");
    let (peer, name, secret) = within("the handler's report", seen.recv())
        .await
        .expect("a report");
    assert_eq!(peer, Some(who.get_ref().get_ref().local_addr().unwrap()));
    assert_eq!(name.as_deref(), Some("ann"));
    assert_eq!(secret, None, "x-secret is not among the session headers");
    use futures_util::StreamExt as _;
    let close = within("the Close frame", who.next()).await;
    assert!(
        matches!(&close, Some(Ok(Message::Close(Some(frame)))) if u16::from(frame.code) == 1000),
        "{close:?}"
    );

    let mut failing = TestClient::connect(&served.url("/fail")).await;
    let reason = failing.expect_close().await.expect("a code");
    assert_eq!(u16::from(reason.code), 1011, "{reason:?}");
    assert_eq!(reason.reason.as_str(), "internal error");

    served.shut_down();
    served.returned().await;
    within("Sessions::wait", sessions.wait()).await;
}

#[tokio::test]
async fn the_config_limits_and_timeouts_apply_to_axum_sessions() {
    let config = Config::default()
        .max_frame_size(Some(1024))
        .max_message_size(Some(4096));
    let sessions = Sessions::new(config);
    let echo = |mut session: Session| async move {
        while let Some(msg) = session.recv().await {
            if session.send(msg).await.is_err() {
                break;
            }
        }
    };
    let quiet = Config::default().idle_timeout(Some(Duration::from_millis(300)));
    let idle = {
        let sessions = sessions.clone();
        move |upgrade: WebSocketUpgrade| async move {
            let quiet = quiet.clone();
            let response: Response = upgrade.config(quiet).on_upgrade(&sessions, echo);
            response
        }
    };
    let app = Router::new()
        .route("/echo", sessions.route(echo))
        .route("/idle", get(idle));
    let mut served = Served::start(app, &sessions).await;

    // Within the limits, the echo works.
    let mut client = TestClient::connect(&served.url("/echo")).await;
    client.send("x".repeat(1024)).await;
    assert_eq!(client.recv_text().await.len(), 1024);
    // A single frame above max_frame_size: 1009.
    client.send("x".repeat(1025)).await;
    assert_eq!(close_code(client.expect_close().await), 1009);

    // A message of small frames above max_message_size: 1009 too.
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, coding::Data, coding::OpCode};
    let mut client = TestClient::connect(&served.url("/echo")).await;
    let ws = client.inner();
    for i in 0..5 {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(vec![b'y'; 1000], opcode, i == 4);
        within("a frame", ws.send(Message::Frame(frame)))
            .await
            .expect("send a frame");
    }
    assert_eq!(close_code(client.expect_close().await), 1009);

    // The per-upgrade Config: the idle timeout closes a quiet client with 1001.
    let mut client = TestClient::connect(&served.url("/idle")).await;
    let since = Instant::now();
    let reason = client.expect_close().await.expect("a code");
    assert_eq!(
        (u16::from(reason.code), reason.reason.as_str()),
        (1001, "idle timeout")
    );
    assert!(
        since.elapsed() >= Duration::from_millis(250),
        "{:?}",
        since.elapsed()
    );

    served.shut_down();
    served.returned().await;
    within("Sessions::wait", sessions.wait()).await;
}

/// A client that reads nothing: its session is closed with 1013 "send
/// timeout" once its socket has taken nothing for `send_timeout`.
#[tokio::test]
async fn the_send_timeout_cuts_off_a_client_that_reads_nothing() {
    let send_timeout = Duration::from_millis(300);
    let config = Config::default()
        .ping_period(None)
        .send_timeout(send_timeout)
        .close_timeout(Duration::from_millis(300));
    let sessions = Sessions::new(config);
    let (tx, mut ended) = mpsc::unbounded_channel();
    let app = Router::new().route(
        "/flood",
        sessions.route(move |mut session: Session| {
            let tx = tx.clone();
            async move {
                let out = session.outgoing();
                let big = Message::binary(vec![7u8; 64 << 10]);
                while out.send(big.clone()).await.is_ok() {}
                while session.recv().await.is_some() {}
                let _ = tx.send(session.close_reason());
            }
        }),
    );
    let mut served = Served::start(app, &sessions).await;
    // A small receive buffer, and never a read: the server's socket fills.
    let stuck = common::upgrade_raw(served.addr, "/flood", Some(4096)).await;
    let since = Instant::now();
    let reason = within("the session to end", ended.recv())
        .await
        .expect("the handler's report")
        .expect("a close reason");
    assert_eq!(
        (u16::from(reason.code), reason.reason.as_str()),
        (1013, "send timeout")
    );
    assert!(since.elapsed() >= send_timeout, "{:?}", since.elapsed());
    drop(stuck);
    served.shut_down();
    served.returned().await;
    within("Sessions::wait", sessions.wait()).await;
}

#[tokio::test]
async fn bad_handshakes_get_the_servers_statuses() {
    let metrics = wshub::Metrics::new();
    let sessions = Sessions::new(Config::default().metrics(Some(metrics.clone())));
    let app = Router::new().route("/ws", sharedflow_route(&sessions, &Hub::new()));
    let mut served = Served::start(app, &sessions).await;

    let plain = http_get(served.addr, "/ws").await;
    assert!(plain.starts_with("HTTP/1.1 400"), "{plain}");
    assert!(
        plain.contains("missing \"Upgrade: websocket\" header"),
        "{plain}"
    );
    assert!(
        plain
            .to_ascii_lowercase()
            .contains("content-type: text/plain; charset=utf-8"),
        "{plain}"
    );

    let v8 = http_raw(served.addr, upgrade_request(RFC_KEY, "8")).await;
    assert!(v8.starts_with("HTTP/1.1 426"), "{v8}");
    assert!(
        v8.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{v8}"
    );
    assert!(v8.contains("only version 13 is supported"), "{v8}");

    let short_key = http_raw(served.addr, upgrade_request("c2hvcnQ=", "13")).await;
    assert!(short_key.starts_with("HTTP/1.1 400"), "{short_key}");
    assert!(short_key.contains("16 bytes"), "{short_key}");

    // A good one, by hand: 101 with the RFC's accept value.
    let tcp = common::upgrade_raw(served.addr, "/ws", None).await;
    drop(tcp);

    served.shut_down();
    served.returned().await;
    within("Sessions::wait", sessions.wait()).await;
    // Counted in the sessions' metrics: two 400s, one 426, one upgrade and
    // its session (ended by the client's reset, or by the shutdown if that
    // came first).
    let text = metrics.encode();
    for line in [
        "wshub_upgrades_refused_total{status=\"400\"} 2",
        "wshub_upgrades_refused_total{status=\"426\"} 1",
        "wshub_upgrades_accepted_total 1",
        "wshub_sessions_open 0",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    let closed: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("wshub_sessions_closed_total{"))
        .collect();
    assert!(
        closed == ["wshub_sessions_closed_total{code=\"1006\",direction=\"none\"} 1"]
            || closed == ["wshub_sessions_closed_total{code=\"1001\",direction=\"sent\"} 1"],
        "{text}"
    );
}

#[tokio::test]
async fn graceful_shutdown_sends_what_the_hub_holds_then_1001() {
    const COUNT: usize = 20;
    let hub = Hub::new();
    let sessions = Sessions::default();
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ws", sharedflow_route(&sessions, &hub));
    let mut served = Served::start(app, &sessions).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = TestClient::connect(&served.url("/ws")).await;
        client.expect_text(GREETING).await;
        clients.push(client);
    }
    // Published while the clients read nothing, then shut down at once.
    for i in 0..COUNT {
        assert_eq!(
            hub.publish(format!("news {i}")).await,
            Ok(Published::Queued)
        );
    }
    served.shut_down();
    for client in &mut clients {
        for i in 0..COUNT {
            client.expect_text(&format!("news {i}")).await;
        }
        let reason = client.expect_close().await.expect("a code");
        assert_eq!(u16::from(reason.code), 1001, "{reason:?}");
        assert_eq!(reason.reason.as_str(), "server shutting down");
        client.close(None).await;
    }
    served.returned().await;
    within("Sessions::wait", sessions.wait()).await;
    assert!(sessions.is_shutting_down());
}

#[tokio::test]
async fn an_upgrade_once_shutdown_began_is_refused_with_503() {
    let sessions = Sessions::default();
    let app = Router::new().route("/ws", sharedflow_route(&sessions, &Hub::new()));
    // axum keeps serving; only the sessions are shutting down.
    let mut served = Served::start(app, &sessions.clone()).await;
    sessions.shutdown();
    let answer = http_raw(served.addr, upgrade_request(RFC_KEY, "13")).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    served.shut_down();
    served.returned().await;
    within("Sessions::wait", sessions.wait()).await;
}

/// Tells, when dropped, that the handler's future was dropped.
struct Dropped(Option<oneshot::Sender<()>>);

impl Drop for Dropped {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test]
async fn a_handler_that_ignores_shutdown_is_aborted_after_the_shutdown_timeout() {
    let shutdown_timeout = Duration::from_millis(300);
    let sessions = Sessions::default().shutdown_timeout(shutdown_timeout);
    let (dropped_tx, dropped) = oneshot::channel();
    let dropped_tx = std::sync::Mutex::new(Some(dropped_tx));
    let app = Router::new().route(
        "/stuck",
        sessions.route(move |session: Session| {
            let guard = Dropped(dropped_tx.lock().unwrap().take());
            async move {
                let _kept = (session, guard);
                std::future::pending::<()>().await;
            }
        }),
    );
    let mut served = Served::start(app, &sessions).await;
    let mut client = TestClient::connect(&served.url("/stuck")).await;
    client.send("anyone there?").await;

    let since = served.shut_down();
    assert_eq!(close_code(client.expect_close().await), 1001);
    served.returned().await;
    within_for(shutdown_timeout + WAIT, "Sessions::wait", sessions.wait()).await;
    let took = since.elapsed();
    assert!(took >= shutdown_timeout, "wait returned after {took:?}");
    within("the handler to be dropped", dropped)
        .await
        .expect("the handler's guard");
    // The connection is gone with the session.
    client.close(None).await;
}

// ---------------------------------------------------------------------------
// The example binary.

/// The `axum` example binary, built (once per test process) with this test
/// binary's profile and features, so that the build is a no-op after
/// `cargo test --all-features`.
fn example_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build_example("axum", &["axum"]))
}

/// How the example names its address once it listens.
const BANNER: &str = "axum example on http://";

/// A request to the example with a body, answered in full (`Connection: close`).
async fn post(addr: SocketAddr, path: &str, body: &[u8]) -> String {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    http_raw(addr, request).await
}

/// The Python client: greeted, says hello, hears the Rust client and the
/// published text, then leaves. Prints what it received, one line each.
const PYTHON_CLIENT: &str = r#"
import asyncio, inspect, sys
import websockets

async def main(url):
    kwargs = {"open_timeout": 10, "close_timeout": 10}
    if "proxy" in inspect.signature(websockets.connect).parameters:
        kwargs["proxy"] = None
    async with websockets.connect(url, **kwargs) as ws:
        for want in ["You are connected to WebSocket!", None, "hello from python",
                     "hello from rust", "published over http"]:
            if want is None:
                await ws.send("hello from python")
                continue
            got = await asyncio.wait_for(ws.recv(), 10)
            print(f"python received {got!r}", flush=True)
            if got != want:
                sys.exit(f"expected {want!r}, got {got!r}")
    print("python done", flush=True)

asyncio.run(main(sys.argv[1]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_serves_health_ws_and_publish_to_rust_and_python_clients() {
    let python = tokio::task::spawn_blocking(require_python_websockets)
        .await
        .expect("provisioning Python websockets");
    let binary = tokio::task::spawn_blocking(example_binary)
        .await
        .expect("building the example");
    let mut server = ExampleProcess::start(binary, &["--addr", "127.0.0.1:0"], BANNER)
        .unwrap_or_else(|err| panic!("the axum example did not start: {err}"));
    assert!(server.addr.ip().is_loopback(), "{}", server.addr);
    assert_ne!(
        server.addr.port(),
        0,
        "the logged address must be the bound one"
    );
    assert!(
        server
            .banner
            .contains(&format!("(ws://{}/ws)", server.addr)),
        "{}",
        server.banner
    );
    let addr = server.addr;

    let health = http_get(addr, "/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let nobody = post(addr, "/publish", b"into the void").await;
    assert!(nobody.starts_with("HTTP/1.1 202"), "{nobody}");
    assert!(nobody.contains("no subscribers"), "{nobody}");
    let not_utf8 = post(addr, "/publish", b"\xff\xfe").await;
    assert!(not_utf8.starts_with("HTTP/1.1 400"), "{not_utf8}");
    let too_big = post(addr, "/publish", &vec![b'a'; 64 * 1024 + 1]).await;
    assert!(too_big.starts_with("HTTP/1.1 413"), "{too_big}");

    let mut rust = TestClient::connect(&server.url("/ws")).await;
    rust.expect_text(GREETING).await;

    let url = server.url("/ws");
    let script = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(python);
        cmd.arg("-c").arg(PYTHON_CLIENT).arg(url);
        no_proxy(&mut cmd);
        run_bounded(&mut cmd, Duration::from_secs(90), "the Python client")
    });
    // The Python client subscribes before its greeting, so once its hello
    // is here it hears everything after.
    let mut rust = rust.with_timeout(Duration::from_secs(30));
    rust.expect_text("hello from python").await;
    rust.send("hello from rust").await;
    rust.expect_text("hello from rust").await;
    let published = post(addr, "/publish", b"published over http").await;
    assert!(published.starts_with("HTTP/1.1 202"), "{published}");
    assert!(published.contains("queued"), "{published}");
    rust.expect_text("published over http").await;

    let out = within_for(Duration::from_secs(100), "the Python client", script)
        .await
        .expect("the Python client's thread");
    out.assert_success("the Python client", &server.log());
    // GET /metrics: the Prometheus scrape, readable by a Prometheus parser,
    // counting this conversation.
    let scrape = http_get(addr, "/metrics").await;
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(scrape.contains("text/plain; version=0.0.4"), "{scrape}");
    let (_, body) = scrape.split_once("\r\n\r\n").expect("a head and a body");
    let parsed = openmetrics_parser::prometheus::parse_prometheus(body)
        .unwrap_or_else(|err| panic!("not a valid scrape: {err:?}\n{body}"));
    let published = parsed
        .families
        .get("wshub_hub_published_total")
        .and_then(|family| family.iter_samples().next().map(|s| s.value.clone()));
    assert!(
        matches!(&published, Some(openmetrics_parser::PrometheusValue::Counter(c)) if c.value.as_f64() >= 3.0),
        "three messages published on hub=\"sharedflow\": {published:?}\n{body}"
    );
    assert!(body.contains("wshub_upgrades_accepted_total 2"), "{body}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            format!("python received '{GREETING}'").as_str(),
            "python received 'hello from python'",
            "python received 'hello from rust'",
            "python received 'published over http'",
            "python done",
        ],
        "{}",
        out.stdout
    );

    // ctrl-c: the Rust client gets Close 1001 and the example exits cleanly.
    let interrupted = Command::new("kill")
        .args(["-INT", &server.id().to_string()])
        .status()
        .expect("run kill -INT");
    assert!(interrupted.success());
    assert_eq!(close_code(rust.expect_close().await), 1001);
    rust.close(None).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = server.wait_for_exit(WAIT);
        (status, server.log())
    })
    .await
    .expect("waiting for the example");
    assert!(
        status.0.is_some_and(|s| s.success()),
        "the example did not exit cleanly after SIGINT ({:?}):\n{}",
        status.0,
        status.1
    );
}

#[tokio::test]
async fn the_example_listens_on_the_port_it_is_given() {
    // Pick a free port, release it, and ask the example for exactly that one.
    // Another process could take it in between, so try a few ports.
    let binary = tokio::task::spawn_blocking(example_binary)
        .await
        .expect("building the example");
    let mut failures = Vec::new();
    let (mut server, wanted) = loop {
        let wanted = free_port();
        match ExampleProcess::start(binary, &["--addr", &wanted.to_string()], BANNER) {
            Ok(server) => break (server, wanted),
            Err(err) if failures.len() < 2 => failures.push(err),
            Err(err) => panic!("the example did not start on a chosen port: {err}\n{failures:?}"),
        }
    };
    assert_eq!(server.addr, wanted, "--addr was not honoured");
    let mut client = TestClient::connect(&server.url("/ws")).await;
    client.expect_text(GREETING).await;
    client.send("on a chosen port").await;
    client.expect_text("on a chosen port").await;
    client.close(None).await;
    let killed = tokio::task::spawn_blocking(move || server.kill())
        .await
        .expect("killing the example");
    assert!(killed.is_some(), "the example was not reaped");
}
