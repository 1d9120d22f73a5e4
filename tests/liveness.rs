//! Liveness: peers that vanish without a FIN are found by pings and their hub
//! subscription freed; sessions that carry nothing are closed by the idle
//! timeout, and sessions that talk or listen are not.
//!
//! A vanished peer is simulated with a proxy between client and server that,
//! on command, stops forwarding in both directions and keeps both sockets
//! open: the server then sees what it sees when a laptop lid closes or a NAT
//! entry expires — no FIN, no RST, no pong, ever.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{GREETING, WAIT, wait_for, within};
use futures_util::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use wshub::testing::TestServer;
use wshub::{CloseReason, Config, Hub, Message, Server};

/// A TCP proxy for one connection that can be told to go silent.
struct Proxy {
    addr: SocketAddr,
    vanish: Arc<Notify>,
    /// Holds the two sockets open after vanishing, until the test ends.
    _task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let vanish = Arc::new(Notify::new());
        let silent = vanish.clone();
        let task = tokio::spawn(async move {
            let (mut client, _) = listener.accept().await.expect("proxy accept");
            let mut server = TcpStream::connect(upstream).await.expect("proxy connect");
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = silent.notified() => {
                    // Vanished: keep both sockets open, read and write nothing.
                    std::future::pending::<()>().await;
                }
            }
        });
        Proxy {
            addr,
            vanish,
            _task: task,
        }
    }

    fn vanish(&self) {
        self.vanish.notify_one();
    }
}

/// The SharedFlow route with `config`, reporting each session's close reason.
fn reporting_sharedflow(
    hub: Hub,
    config: Config,
) -> (Server, UnboundedReceiver<Option<CloseReason>>) {
    let (tx, reports) = unbounded_channel();
    let server = Server::new()
        .config(config)
        .route("/ws", move |mut session| {
            let hub = hub.clone();
            let tx: UnboundedSender<_> = tx.clone();
            async move {
                let subscription = hub.subscribe();
                session.send(GREETING).await?;
                session.join(subscription).await;
                let _ = tx.send(session.close_reason());
                Ok::<_, wshub::Error>(())
            }
        });
    (server, reports)
}

async fn reported(reports: &mut UnboundedReceiver<Option<CloseReason>>) -> (u16, String) {
    let reason = within("the handler's close reason", reports.recv())
        .await
        .expect("a report")
        .expect("a close reason once the session ended");
    (u16::from(reason.code), reason.reason.to_string())
}

/// Waits until the hub has exactly `n` subscribers.
async fn subscribers_become(hub: &Hub, n: usize) {
    let what = format!("{n} subscribers");
    wait_for(&what, || hub.subscriber_count(), |&count| count == n).await;
}

#[tokio::test]
async fn a_peer_that_vanished_without_fin_is_closed_by_ping_timeout_and_unsubscribed() {
    let hub = Hub::new();
    let config = Config::default()
        .ping_period(Some(Duration::from_millis(100)))
        .timeout(Duration::from_millis(300));
    let (server, mut reports) = reporting_sharedflow(hub.clone(), config);
    let server = TestServer::start(server).await;
    let proxy = Proxy::start(server.addr()).await;
    let (vanishing, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.addr))
        .await
        .expect("connect through the proxy");
    let mut staying = server.connect("/ws").await;
    staying.expect_text(GREETING).await;
    subscribers_become(&hub, 2).await;
    // The client that stays keeps reading, which answers the pings.
    let (texts_tx, mut texts) = unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = staying.inner().next().await {
            if let Message::Text(text) = msg {
                let _ = texts_tx.send(text.to_string());
            }
        }
    });

    proxy.vanish();
    let vanished_at = Instant::now();
    // The server's session ends with 1011 and its subscription is freed.
    assert_eq!(reported(&mut reports).await, (1011, "ping timeout".into()));
    subscribers_become(&hub, 1).await;
    let took = vanished_at.elapsed();
    assert!(
        took <= Duration::from_millis(100 + 300) + WAIT / 5,
        "found only after {took:?}, expected about one ping period plus the timeout"
    );

    // The client that stayed was not closed, and still gets broadcasts.
    assert!(
        reports.try_recv().is_err(),
        "the client that kept answering pings was closed too"
    );
    let _ = hub.publish("after the vanish").await.expect("publish");
    let text = within("the broadcast", texts.recv()).await;
    assert_eq!(text.as_deref(), Some("after the vanish"));
    assert_eq!(hub.subscriber_count(), 1);
    reader.abort();
    drop(vanishing);
    server.shutdown().await;
}

fn idle(timeout_ms: u64) -> Config {
    Config::default()
        .ping_period(Some(Duration::from_millis(timeout_ms / 4)))
        .idle_timeout(Some(Duration::from_millis(timeout_ms)))
}

#[tokio::test]
async fn a_silent_session_is_closed_after_the_idle_timeout_though_it_answers_pings() {
    let hub = Hub::new();
    let (server, mut reports) = reporting_sharedflow(hub.clone(), idle(400));
    let server = TestServer::start(server).await;
    let started = Instant::now();
    let mut client = server.connect("/ws").await;
    client.expect_text(GREETING).await;
    // Pings arrive and are answered as the client reads; they do not count.
    let mut pings = 0;
    let reason = loop {
        match within("the idle close", client.next_frame()).await {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Close(reason))) => break reason.expect("a close code"),
            other => panic!("expected pings then a Close, got {other:?}"),
        }
    };
    let took = started.elapsed();
    assert_eq!(
        (u16::from(reason.code), reason.reason.as_str()),
        (1001, "idle timeout")
    );
    assert!(pings >= 2, "only {pings} pings before the idle close");
    assert!(
        took >= Duration::from_millis(400),
        "closed after {took:?}, before the idle timeout"
    );
    assert_eq!(reported(&mut reports).await, (1001, "idle timeout".into()));
    subscribers_become(&hub, 0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn sessions_that_talk_or_listen_are_not_idle() {
    let hub = Hub::new();
    let (server, mut reports) = reporting_sharedflow(hub.clone(), idle(300));
    let server = TestServer::start(server).await;
    let mut talker = server.connect("/ws").await;
    let mut listener = server.connect("/ws").await;
    talker.expect_text(GREETING).await;
    listener.expect_text(GREETING).await;
    // For four idle timeouts the talker sends every 100 ms; the listener only
    // receives (the broadcasts of the talker's messages).
    let (done_tx, mut done_rx) = oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let mut got = 0;
        loop {
            tokio::select! {
                _ = &mut done_rx => break,
                frame = listener.next_frame() => match frame {
                    Some(Ok(Message::Text(_))) => got += 1,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => panic!("the listener was cut off: {other:?}"),
                },
            }
        }
        (listener, got)
    });
    let mut sent = 0;
    let until = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < until {
        talker.send(format!("chat {sent}")).await;
        sent += 1;
        match within("the talker's own broadcast", talker.next_frame()).await {
            Some(Ok(Message::Text(_))) => {}
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("the talker was cut off: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = done_tx.send(());
    let (mut listener, got) = within("the listener task", reader).await.expect("reader");
    assert!(got >= 8, "the listener got only {got} broadcasts");
    assert!(
        reports.try_recv().is_err(),
        "a session was closed while it carried messages"
    );
    assert_eq!(hub.subscriber_count(), 2);
    // Once everyone is quiet, the idle timeout closes both.
    for client in [&mut talker, &mut listener] {
        let reason = client.expect_close().await.expect("a close code");
        assert_eq!(
            (u16::from(reason.code), reason.reason.as_str()),
            (1001, "idle timeout")
        );
    }
    subscribers_become(&hub, 0).await;
    server.shutdown().await;
}

/// A hub whose publisher never lets it run dry keeps the send task busy
/// with messages; it still sends its pings, and still closes a client that
/// reads everything but never answers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_never_runs_dry_holds_back_neither_pings_nor_the_ping_timeout() {
    use tokio::io::AsyncReadExt;
    let hub = Hub::new();
    let config = Config::default()
        .ping_period(Some(Duration::from_millis(50)))
        .timeout(Duration::from_millis(300));
    let (server, mut reports) = reporting_sharedflow(hub.clone(), config);
    let server = TestServer::start(server).await;
    // A raw client: it reads every frame and answers nothing.
    let mut tcp = common::upgrade_raw(server.addr(), "/ws", None).await;
    subscribers_become(&hub, 1).await;
    let started = Instant::now();
    let flood = {
        let hub = hub.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while hub.subscriber_count() > 0 && started.elapsed() < WAIT {
                for _ in 0..256 {
                    let _ = hub.try_publish("tick");
                }
                sent += 256;
            }
            sent
        })
    };
    let mut pings = 0;
    let mut texts = 0u64;
    within("the server to end the connection", async {
        let mut head = [0u8; 2];
        while tcp.read_exact(&mut head).await.is_ok() {
            let len = match head[1] & 0x7F {
                126 => usize::from(tcp.read_u16().await.unwrap_or(0)),
                127 => panic!("an unexpected 64-bit frame length"),
                len => usize::from(len),
            };
            let mut payload = vec![0; len];
            if tcp.read_exact(&mut payload).await.is_err() {
                break;
            }
            match head[0] & 0x0F {
                0x9 => pings += 1,
                0x1 => texts += 1,
                _ => {}
            }
        }
    })
    .await;
    let elapsed = started.elapsed();
    let sent = flood.join().expect("the publisher thread");
    let (code, reason) = reported(&mut reports).await;
    assert_eq!((code, reason.as_str()), (1011, "ping timeout"));
    assert!(pings >= 1, "no ping in {texts} messages");
    assert!(
        elapsed < Duration::from_millis(50 + 300 + 700),
        "closed after {elapsed:?}: the ping or its deadline waited for the flood \
         ({sent} published, {texts} read)"
    );
    assert!(
        texts > 100,
        "only {texts} messages read: no flood to test against"
    );
    server.shutdown().await;
}
