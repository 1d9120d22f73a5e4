//! Graceful shutdown of `Server::serve`: every session is told Close 1001
//! (Going Away) after the hub messages already published for it, the
//! listener stops accepting at once, and `serve` returns within a bound even
//! when clients or handlers do not cooperate.
//!
//! The tests run `serve` themselves (not through `TestServer`) so they can
//! trigger the shutdown future and time how long `serve` takes to return.

mod common;

use common::{GREETING, WAIT, sharedflow, within};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wshub::{CloseReason, Config, Hub, Message, Published, Server, Session};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A `serve` task on `127.0.0.1:0` and the trigger of its shutdown future.
struct Running {
    addr: SocketAddr,
    trigger: Option<oneshot::Sender<()>>,
    serve: JoinHandle<io::Result<()>>,
}

impl Running {
    async fn start(server: Server) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let (trigger, triggered) = oneshot::channel::<()>();
        let serve = tokio::spawn(server.serve(listener, async {
            let _ = triggered.await;
        }));
        Running {
            addr,
            trigger: Some(trigger),
            serve,
        }
    }

    /// Completes the shutdown future; returns when that happened.
    fn shut_down(&mut self) -> Instant {
        let trigger = self.trigger.take().expect("shut down only once");
        trigger.send(()).expect("serve is still running");
        Instant::now()
    }

    /// Waits for `serve` to return `Ok`, failing if that takes longer than
    /// `bound`; returns how long it took since `since`.
    async fn returned_within(&mut self, since: Instant, bound: Duration) -> Duration {
        match tokio::time::timeout(bound, &mut self.serve).await {
            Ok(Ok(Ok(()))) => since.elapsed(),
            Ok(Ok(Err(err))) => panic!("serve failed: {err}"),
            Ok(Err(err)) => panic!("the serve task failed: {err}"),
            Err(_) => panic!("serve did not return within {bound:?} of the shutdown"),
        }
    }

    async fn connect(&self, path: &str) -> Client {
        let url = format!("ws://{}{path}", self.addr);
        let (ws, _) = within("the upgrade", tokio_tungstenite::connect_async(url))
            .await
            .expect("upgrade");
        ws
    }
}

/// The next text message; panics on anything else.
async fn expect_text(client: &mut Client, expected: &str) {
    match within("a text message", client.next()).await {
        Some(Ok(Message::Text(text))) => assert_eq!(text.as_str(), expected),
        other => panic!("expected text {expected:?}, got {other:?}"),
    }
}

/// The next frame, which must be a Close frame with a code.
async fn expect_close(client: &mut Client) -> CloseReason {
    match within("a Close frame", client.next()).await {
        Some(Ok(Message::Close(Some(reason)))) => reason,
        other => panic!("expected a Close frame, got {other:?}"),
    }
}

/// Reads until the connection ends, which also sends tungstenite's answer
/// to the server's Close frame.
async fn read_to_end(client: &mut Client) {
    while let Some(Ok(msg)) = within("the end of the connection", client.next()).await {
        assert!(
            !matches!(msg, Message::Text(_) | Message::Binary(_)),
            "no data may follow the Close frame, got {msg:?}"
        );
    }
}

/// Connects `n` clients to `/ws` and waits until each is greeted, so each is
/// subscribed to the hub.
async fn greeted_clients(server: &Running, n: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let mut client = server.connect("/ws").await;
        expect_text(&mut client, GREETING).await;
        clients.push(client);
    }
    clients
}

#[tokio::test]
async fn every_client_gets_close_1001_and_serve_returns_promptly() {
    let mut server = Running::start(sharedflow(Hub::new())).await;
    let mut clients = greeted_clients(&server, 3).await;

    let since = server.shut_down();
    for client in &mut clients {
        let reason = expect_close(client).await;
        assert_eq!(u16::from(reason.code), 1001, "{reason:?}");
        assert_eq!(reason.reason.as_str(), "server shutting down");
    }
    for client in &mut clients {
        read_to_end(client).await;
    }
    // Every client answered its Close at once, so nothing waits for a timeout.
    let took = server.returned_within(since, Duration::from_secs(2)).await;
    assert!(took < Duration::from_secs(2), "serve took {took:?}");
}

#[tokio::test]
async fn hub_messages_published_before_shutdown_arrive_before_the_close() {
    const COUNT: usize = 50;
    let hub = Hub::new();
    let mut server = Running::start(sharedflow(hub.clone())).await;
    let mut clients = greeted_clients(&server, 3).await;

    // Published while the clients read nothing, then shut down at once.
    for i in 0..COUNT {
        let outcome = hub.publish(format!("news {i}")).await.expect("publish");
        assert_eq!(outcome, Published::Queued);
    }
    let since = server.shut_down();

    for client in &mut clients {
        for i in 0..COUNT {
            expect_text(client, &format!("news {i}")).await;
        }
        let reason = expect_close(client).await;
        assert_eq!(u16::from(reason.code), 1001, "{reason:?}");
    }
    for client in &mut clients {
        read_to_end(client).await;
    }
    server.returned_within(since, WAIT).await;
}

#[tokio::test]
async fn hub_messages_arrive_before_the_close_even_behind_a_history_backlog() {
    const HISTORY: usize = 100;
    const NEWS: usize = 5;
    let hub = Hub::new();
    let (ready, mut joined) = tokio::sync::mpsc::unbounded_channel();
    let server = Server::new().route_with_config(
        "/history",
        Config::default().outgoing_capacity(HISTORY + 1),
        {
            let hub = hub.clone();
            move |mut session: Session| {
                let hub = hub.clone();
                let ready = ready.clone();
                async move {
                    // A common pattern: subscribe, replay history, then join.
                    let subscription = hub.subscribe();
                    let page = "h".repeat(64 << 10);
                    for _ in 0..HISTORY {
                        session.send(page.as_str()).await?;
                    }
                    let _ = ready.send(());
                    session.join(subscription).await;
                    Ok::<_, wshub::Error>(())
                }
            }
        },
    );
    let mut server = Running::start(server).await;
    // The client reads nothing yet: 6 MiB of history fill its socket.
    let mut client = server.connect("/history").await;
    within("the handler to queue its history", joined.recv()).await;
    for i in 0..NEWS {
        let outcome = hub.publish(format!("news {i}")).await.expect("publish");
        assert_eq!(outcome, Published::Queued);
    }
    let since = server.shut_down();

    for _ in 0..HISTORY {
        match within("a history page", client.next()).await {
            Some(Ok(Message::Text(text))) => assert_eq!(text.len(), 64 << 10),
            other => panic!("expected a history page, got {other:?}"),
        }
    }
    for i in 0..NEWS {
        expect_text(&mut client, &format!("news {i}")).await;
    }
    let reason = expect_close(&mut client).await;
    assert_eq!(u16::from(reason.code), 1001, "{reason:?}");
    read_to_end(&mut client).await;
    server.returned_within(since, WAIT).await;
}

#[tokio::test]
async fn new_connections_are_refused_once_shutdown_starts() {
    let mut server = Running::start(sharedflow(Hub::new())).await;
    let mut clients = greeted_clients(&server, 1).await;
    let client = &mut clients[0];

    let since = server.shut_down();
    // The Close frame goes out after the listener is dropped, so once it
    // arrives nobody may connect, though this session is still closing.
    expect_close(client).await;
    match within("a refused connection", TcpStream::connect(server.addr)).await {
        Err(err) => assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}"),
        Ok(_) => panic!("a new connection was accepted after the shutdown began"),
    }
    read_to_end(client).await;
    server.returned_within(since, WAIT).await;
    match TcpStream::connect(server.addr).await {
        Err(err) => assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}"),
        Ok(_) => panic!("a new connection was accepted after serve returned"),
    }
}

#[tokio::test]
async fn a_client_that_never_answers_the_close_holds_shutdown_only_for_close_timeout() {
    let close_timeout = Duration::from_millis(300);
    let server = Server::new().route_with_config(
        "/ws",
        Config::default().close_timeout(close_timeout),
        |mut session: Session| async move { while session.recv().await.is_some() {} },
    );
    let mut server = Running::start(server).await;

    // A hand-made upgrade, after which this client neither reads nor writes.
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let request = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Version: 13\r\n\r\n";
    silent.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(
            within("the 101 response", silent.read_u8())
                .await
                .expect("read"),
        );
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");

    let since = server.shut_down();
    let took = server
        .returned_within(since, close_timeout + Duration::from_secs(2))
        .await;
    assert!(
        took >= close_timeout,
        "serve returned after {took:?}, before the client had close_timeout to answer"
    );
    // The Close frame was sent all the same: 0x88, length 2 + reason, code 1001.
    let mut start = [0u8; 4];
    silent
        .read_exact(&mut start)
        .await
        .expect("the Close frame");
    assert_eq!(start[0], 0x88, "expected a Close frame, got {start:?}");
    assert_eq!(u16::from_be_bytes([start[2], start[3]]), 1001);
}

#[tokio::test]
async fn a_handler_that_never_returns_is_aborted_after_shutdown_timeout() {
    let shutdown_timeout = Duration::from_millis(300);
    let server = Server::new().shutdown_timeout(shutdown_timeout).route(
        "/stuck",
        |session: Session| async move {
            let _kept = session;
            std::future::pending::<()>().await;
        },
    );
    let mut server = Running::start(server).await;
    let mut client = server.connect("/stuck").await;
    client.send(Message::text("anyone there?")).await.unwrap();

    let since = server.shut_down();
    let reason = expect_close(&mut client).await;
    assert_eq!(u16::from(reason.code), 1001, "{reason:?}");
    let took = server
        .returned_within(since, shutdown_timeout + Duration::from_secs(3))
        .await;
    assert!(took >= shutdown_timeout, "serve returned after {took:?}");
    read_to_end(&mut client).await;
}
