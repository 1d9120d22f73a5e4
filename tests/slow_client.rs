//! The slow-client policies, end to end: one test per [`Policy`], one that
//! control frames are never dropped, and one that `send_timeout` spares a
//! client that is slow but still reading.
//!
//! Every test runs a real server on `127.0.0.1:0` whose route joins each
//! session to one hub and reports, through channels, when a session has
//! subscribed and why it closed. Fast clients are real WebSocket clients whose
//! reading tasks report the number of every message they receive. The slow
//! client is a real WebSocket client with a 4 KiB socket receive buffer that
//! the test simply stops polling, so the server's writes to it soon block
//! (on Linux loopback, once some 40 messages sit in the two kernels' buffers).
//!
//! The publisher (the hub handle, in-process) publishes numbered 64 KiB
//! messages and, after each one that was queued, waits until every fast
//! client has received it: fast clients never fall behind, so whatever the
//! policy does happens to the slow client alone. Each test then checks what
//! the fast clients got, what the slow client got (messages, gaps, lag
//! notices, close code) and that the hub's counters agree with both.
//!
//! No test sleeps in the hope that something has happened: each waits for the
//! event itself (or polls for a condition), and every wait fails the test
//! after [`WAIT`]. The one sleep is the pace of the deliberately slow reader
//! in the last test.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use wshub::testing::TestServer;
use wshub::tungstenite::Error as WsError;
use wshub::{
    Bytes, CloseCode, CloseReason, Config, Hub, HubConfig, Message, Outgoing, Policy, Published,
    Server, close_reason,
};

/// The route every test serves.
const PATH: &str = "/ws";
/// How long any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);
/// The hub's buffer, in messages.
const CAPACITY: usize = 8;
/// The size of each published message: a few of them fill a stalled socket.
const PAYLOAD: usize = 64 * 1024;
/// A bound on how many messages a test publishes while waiting for the slow
/// client's socket to fill: far more than the socket buffers can hold.
const MAX_MESSAGES: u64 = 2_000;
/// How many messages each test publishes after the policy has acted.
const AFTER: u64 = 5;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Awaits `fut`, failing the test if it takes longer than [`WAIT`].
async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    common::within_for(WAIT, what, fut).await
}

/// Polls `condition` until it holds, failing the test after [`WAIT`].
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A 64 KiB binary message that starts with its number.
fn numbered(i: u64) -> Message {
    let mut payload = vec![0u8; PAYLOAD];
    payload[..8].copy_from_slice(&i.to_be_bytes());
    Message::binary(payload)
}

/// The number of a message made by [`numbered`].
fn number(msg: &Message) -> u64 {
    match msg {
        Message::Binary(b) if b.len() == PAYLOAD => {
            u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
        }
        other => panic!("expected a numbered message, got {other:?}"),
    }
}

/// The lag notice of the DropOldest test.
fn lag_notice(skipped: u64) -> Message {
    Message::text(format!("skipped {skipped}"))
}

/// A hub with an 8-message buffer and the given policy.
fn hub(policy: Policy) -> Hub {
    Hub::with_config(HubConfig::default().capacity(CAPACITY).policy(policy)).expect("hub config")
}

/// Session options: no pings (they would only add frames to the slow
/// client's stream), the given send timeout, and a short close timeout, so
/// that a session whose Close frame cannot be written (its client's socket
/// is full) ends promptly. Tests whose slow client does read its Close frame
/// raise the close timeout: the closing handshake ends when the client
/// answers, and the client first has megabytes of data to read.
fn config(send_timeout: Duration) -> Config {
    Config::default()
        .ping_period(None)
        .send_timeout(send_timeout)
        .close_timeout(Duration::from_millis(300))
}

/// What the route handler reports: each session once it has subscribed
/// (with a handle to it), and each session's close reason once it has ended.
struct Sessions {
    joined: mpsc::UnboundedReceiver<Outgoing>,
    closed: mpsc::UnboundedReceiver<(u64, CloseReason)>,
}

impl Sessions {
    /// Waits until the next session has subscribed to the hub.
    async fn joined(&mut self) -> Outgoing {
        within("a session to join the hub", self.joined.recv())
            .await
            .expect("the server stopped")
    }

    /// Waits until a session has ended; returns its id and close reason.
    async fn closed(&mut self) -> (u64, CloseReason) {
        within("a session to close", self.closed.recv())
            .await
            .expect("the server stopped")
    }
}

/// A server whose route subscribes each session to `hub` and joins it (the
/// SharedFlow pattern), reporting to the returned [`Sessions`].
fn hub_server(hub: &Hub, config: Config) -> (Server, Sessions) {
    let (joined_tx, joined) = mpsc::unbounded_channel();
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let hub = hub.clone();
    let server = Server::new()
        .config(config)
        .route(PATH, move |mut session| {
            let (hub, joined_tx, closed_tx) = (hub.clone(), joined_tx.clone(), closed_tx.clone());
            async move {
                let subscription = hub.subscribe();
                let _ = joined_tx.send(session.outgoing());
                let reason = session.join(subscription).await;
                let _ = closed_tx.send((session.id(), reason));
            }
        });
    (server, Sessions { joined, closed })
}

/// A client that keeps reading; its task reports each message's number.
struct Fast {
    numbers: mpsc::UnboundedReceiver<u64>,
    received: Vec<u64>,
}

impl Fast {
    /// Waits for the client's next message, which must be number `i`.
    async fn expect(&mut self, i: u64) {
        let got = within(
            &format!("a fast client to receive message {i}"),
            self.numbers.recv(),
        )
        .await
        .unwrap_or_else(|| panic!("a fast client's connection ended before message {i}"));
        assert_eq!(got, i, "a fast client got message {got} where {i} was due");
        self.received.push(got);
    }
}

/// Connects a fast client and waits until its session has joined the hub.
async fn fast_client(server: &TestServer, sessions: &mut Sessions) -> Fast {
    let mut client = server.connect(PATH).await;
    sessions.joined().await;
    let (tx, numbers) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Ends when the server closes the connection at the end of the test.
        while let Some(Ok(msg)) = client.inner().next().await {
            if msg.is_binary() && tx.send(number(&msg)).is_err() {
                break;
            }
        }
    });
    Fast {
        numbers,
        received: Vec::new(),
    }
}

type SlowClient = WebSocketStream<TcpStream>;

/// Connects a client with a 4 KiB socket receive buffer. The test does not
/// poll it until it wants to, so the server's writes to it soon block.
async fn slow_client(addr: SocketAddr) -> SlowClient {
    let socket = TcpSocket::new_v4().expect("TCP socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("set the receive buffer size");
    let tcp = within("the slow client to connect", socket.connect(addr))
        .await
        .expect("connect to the test server");
    let (ws, _) = within(
        "the slow client's handshake",
        tokio_tungstenite::client_async(format!("ws://{addr}{PATH}"), tcp),
    )
    .await
    .expect("WebSocket handshake");
    ws
}

/// The next frame the slow client reads.
async fn next_frame(ws: &mut SlowClient) -> Option<Result<Message, WsError>> {
    within("the slow client's next frame", ws.next()).await
}

/// The next text or binary message the slow client reads.
async fn next_data(ws: &mut SlowClient) -> Message {
    loop {
        match next_frame(ws).await {
            Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => return msg,
            Some(Ok(Message::Close(frame))) => panic!("expected a message, got Close {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(err)) => panic!("expected a message, got error {err}"),
            None => panic!("expected a message, the connection ended"),
        }
    }
}

/// How the slow client's connection ended.
#[derive(Debug)]
enum Ending {
    /// The server sent a Close frame with this reason.
    Closed(Option<CloseReason>),
    /// The connection ended without a Close frame.
    Dropped,
}

/// Reads the slow client to the end: the binary messages it got, in order,
/// and how the connection ended. Answers a Close frame, as any client does.
async fn read_to_end(ws: &mut SlowClient) -> (Vec<Message>, Ending) {
    let mut messages = Vec::new();
    loop {
        match next_frame(ws).await {
            Some(Ok(msg @ Message::Binary(_))) => messages.push(msg),
            Some(Ok(Message::Close(frame))) => {
                // Keep polling so tungstenite sends our Close and sees the end.
                while let Some(Ok(_)) = next_frame(ws).await {}
                return (messages, Ending::Closed(frame));
            }
            Some(Ok(other)) => panic!("unexpected frame {other:?}"),
            Some(Err(_)) | None => return (messages, Ending::Dropped),
        }
    }
}

/// The numbers of messages made by [`numbered`].
fn numbers_of(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(number).collect()
}

/// The scene of the policy tests: a server joining sessions to `hub`, two
/// fast clients, and a slow client that is subscribed but read by nobody.
struct Scene {
    server: TestServer,
    sessions: Sessions,
    fast: [Fast; 2],
    slow: SlowClient,
    /// The id of the slow client's session.
    slow_id: u64,
}

impl Scene {
    async fn start(hub: &Hub, config: Config) -> Scene {
        let (server, mut sessions) = hub_server(hub, config);
        let server = TestServer::start(server).await;
        let fast = [
            fast_client(&server, &mut sessions).await,
            fast_client(&server, &mut sessions).await,
        ];
        let slow = slow_client(server.addr()).await;
        let slow_id = sessions.joined().await.session_id();
        Scene {
            server,
            sessions,
            fast,
            slow,
            slow_id,
        }
    }
}

/// Publishes message `i`; if it was queued, waits until every fast client
/// has received it. This keeps the fast clients within one message of the
/// publisher, so only the slow client can fall behind.
async fn publish_paced(hub: &Hub, i: u64, fast: &mut [Fast]) -> Published {
    let outcome = within(&format!("message {i} to publish"), hub.publish(numbered(i)))
        .await
        .expect("publish");
    if outcome == Published::Queued {
        for client in fast.iter_mut() {
            client.expect(i).await;
        }
    }
    outcome
}

/// Asserts that `numbers` is `0, 1, 2, ...`.
fn assert_prefix(numbers: &[u64], who: &str) {
    let expected: Vec<u64> = (0..numbers.len() as u64).collect();
    assert_eq!(numbers, expected, "{who} must get an in-order prefix");
}

/// A server like [`TestServer`], but whose connections have a 64 KiB kernel
/// send buffer (accepted sockets inherit it from the listener), so that how
/// much the kernel absorbs for a slow client is small and known.
struct SmallBufferServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl SmallBufferServer {
    async fn start(server: Server) -> SmallBufferServer {
        let socket = TcpSocket::new_v4().expect("TCP socket");
        socket
            .set_send_buffer_size(64 * 1024)
            .expect("set the send buffer size");
        socket
            .bind("127.0.0.1:0".parse().expect("loopback address"))
            .expect("bind 127.0.0.1:0");
        let listener = socket.listen(16).expect("listen");
        let addr = listener.local_addr().expect("local address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        SmallBufferServer { addr, stop, task }
    }

    async fn shutdown(self) {
        let _ = self.stop.send(());
        within("the server to shut down", self.task)
            .await
            .expect("server task")
            .expect("server");
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Suspend: publishers wait for the slow client until its send times out;
/// then it is cut off (1013 "send timeout") and publishing goes on. Nothing
/// is lost for anyone else.
#[tokio::test]
async fn suspend_holds_publishers_back_until_the_slow_client_times_out() {
    let send_timeout = Duration::from_millis(500);
    let hub = hub(Policy::Suspend);
    let Scene {
        server,
        mut sessions,
        mut fast,
        mut slow,
        slow_id,
    } = Scene::start(&hub, config(send_timeout)).await;

    // Publish until the hub gives up on the slow client. Some publish has to
    // wait for it: that is Suspend.
    let mut published = 0;
    let mut longest_publish = Duration::ZERO;
    while hub.stats().disconnected == 0 {
        assert!(
            published < MAX_MESSAGES,
            "the slow client was never cut off"
        );
        let started = Instant::now();
        let outcome = publish_paced(&hub, published, &mut fast).await;
        assert_eq!(outcome, Published::Queued, "Suspend never drops");
        longest_publish = longest_publish.max(started.elapsed());
        published += 1;
    }
    assert!(
        longest_publish >= send_timeout / 2,
        "a publish should have waited for the stalled client (about {send_timeout:?}), \
         the longest took {longest_publish:?}"
    );

    // The slow session was closed for not accepting data in time.
    let (id, reason) = sessions.closed().await;
    assert_eq!(id, slow_id, "only the slow session closes");
    assert_eq!(reason, close_reason(CloseCode::Again, "send timeout"));
    assert_eq!(hub.subscriber_count(), 2);

    // Publishing no longer waits, and the fast clients keep getting everything.
    for i in published..published + AFTER {
        assert_eq!(publish_paced(&hub, i, &mut fast).await, Published::Queued);
    }
    let everything: Vec<u64> = (0..published + AFTER).collect();
    for client in &fast {
        assert_eq!(client.received, everything);
    }

    // The slow client, reading at last, gets what reached its socket, in
    // order, and then the connection ends: its socket was too full for a
    // Close frame.
    let (messages, ending) = read_to_end(&mut slow).await;
    let numbers = numbers_of(&messages);
    assert_prefix(&numbers, "the slow client");
    assert!(numbers.len() < published as usize, "{numbers:?}");
    assert!(matches!(ending, Ending::Dropped), "{ending:?}");

    let stats = hub.stats();
    assert_eq!(stats.disconnected, 1);
    assert_eq!(stats.published, published + AFTER);
    assert_eq!((stats.dropped, stats.evicted, stats.lagged), (0, 0, 0));
    server.shutdown().await;
}

/// DropOldest: publishers never wait; the slow client skips what was evicted
/// and is told how much, with the lag notice. Fast clients lose nothing.
#[tokio::test]
async fn drop_oldest_lets_the_slow_client_skip_ahead_and_tells_it_the_gap() {
    let hub = Hub::with_config(
        HubConfig::default()
            .capacity(CAPACITY)
            .policy(Policy::DropOldest)
            .lag_notice(lag_notice),
    )
    .expect("hub config");
    let Scene {
        server,
        sessions: _sessions,
        mut fast,
        mut slow,
        slow_id: _,
    } = Scene::start(&hub, config(Duration::from_secs(30))).await;

    // Publish until the hub has evicted more than a buffer's worth of
    // messages the slow client never read.
    let mut published = 0;
    while hub.stats().evicted <= CAPACITY as u64 {
        assert!(published < MAX_MESSAGES, "the hub never evicted anything");
        assert_eq!(
            publish_paced(&hub, published, &mut fast).await,
            Published::Queued
        );
        published += 1;
    }
    let last = published - 1;

    // The slow client resumes: an in-order prefix, the lag notice, then the
    // messages still buffered, up to the last one published.
    let mut seen = Vec::new();
    let mut notices = Vec::new();
    loop {
        let msg = next_data(&mut slow).await;
        if let Message::Text(text) = &msg {
            let skipped = text
                .strip_prefix("skipped ")
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("unexpected text message {text:?}"));
            notices.push((seen.len(), skipped));
            continue;
        }
        let n = number(&msg);
        seen.push(n);
        if n == last {
            break;
        }
    }
    assert_eq!(notices.len(), 1, "one lag, one notice: {notices:?}");
    let (at, skipped) = notices[0];
    assert!(at > 0, "the slow client gets a prefix before the gap");
    assert_prefix(&seen[..at], "the slow client");
    let resumed: Vec<u64> = (at as u64 + skipped..=last).collect();
    assert_eq!(
        seen[at..],
        resumed,
        "after the notice the slow client resumes right after the gap"
    );
    assert_eq!(
        last + 1 - seen.len() as u64,
        skipped,
        "the notice counts exactly the messages the slow client missed"
    );
    assert_eq!(
        resumed.len(),
        CAPACITY,
        "after the gap, exactly the buffer's worth is left: {resumed:?}"
    );

    // Later messages reach everyone, the slow client included.
    for i in published..published + AFTER {
        assert_eq!(publish_paced(&hub, i, &mut fast).await, Published::Queued);
        assert_eq!(number(&next_data(&mut slow).await), i);
    }
    let everything: Vec<u64> = (0..published + AFTER).collect();
    for client in &fast {
        assert_eq!(client.received, everything);
    }

    let stats = hub.stats();
    assert_eq!(
        stats.lagged, skipped,
        "the hub's lag count is what the slow client was told"
    );
    assert_eq!(
        stats.evicted, skipped,
        "every evicted message was one it missed"
    );
    assert_eq!((stats.dropped, stats.disconnected), (0, 0));
    assert_eq!(stats.subscribers, 3);
    server.shutdown().await;
}

/// DropLatest: once the slow client has filled the buffer, publishes are
/// discarded for everyone (and say so), until its send times out; then
/// publishes are queued again.
#[tokio::test]
async fn drop_latest_discards_new_messages_for_everyone_while_the_buffer_is_full() {
    let send_timeout = Duration::from_secs(1);
    let hub = hub(Policy::DropLatest);
    let Scene {
        server,
        mut sessions,
        mut fast,
        mut slow,
        slow_id,
    } = Scene::start(&hub, config(send_timeout)).await;

    // Publish until the buffer is full and publishes start being dropped,
    // then a few more (a burst: dropped publishes do not wait).
    let mut queued = Vec::new();
    let mut dropped = Vec::new();
    let mut i = 0;
    while dropped.len() < 2 * CAPACITY {
        assert!(i < MAX_MESSAGES, "the hub never dropped anything");
        match publish_paced(&hub, i, &mut fast).await {
            Published::Queued => {
                assert!(dropped.is_empty(), "a full buffer stays full");
                queued.push(i);
            }
            Published::Dropped => dropped.push(i),
            Published::NoSubscribers => panic!("the clients are subscribed"),
        }
        i += 1;
    }
    assert_eq!(hub.stats().dropped, dropped.len() as u64);

    // The slow session's send times out; its place in the buffer is freed.
    let (id, reason) = sessions.closed().await;
    assert_eq!(id, slow_id, "only the slow session closes");
    assert_eq!(reason, close_reason(CloseCode::Again, "send timeout"));

    // Publishes are queued again and the fast clients get them.
    for _ in 0..AFTER {
        assert_eq!(publish_paced(&hub, i, &mut fast).await, Published::Queued);
        queued.push(i);
        i += 1;
    }
    for client in &fast {
        assert_eq!(
            client.received, queued,
            "fast clients get exactly the queued messages, in order"
        );
    }

    // The slow client got an in-order prefix of the queued messages.
    let (messages, ending) = read_to_end(&mut slow).await;
    let numbers = numbers_of(&messages);
    assert_prefix(&numbers, "the slow client");
    assert!(numbers.len() < queued.len(), "{numbers:?}");
    assert!(matches!(ending, Ending::Dropped), "{ending:?}");

    let stats = hub.stats();
    assert_eq!(stats.dropped, dropped.len() as u64);
    assert_eq!(stats.published, queued.len() as u64);
    assert_eq!(stats.disconnected, 1);
    assert_eq!((stats.evicted, stats.lagged), (0, 0));
    assert_eq!(stats.subscribers, 2);
    server.shutdown().await;
}

/// Disconnect: a client that falls a whole buffer behind is closed with 1013
/// Try Again Later and told why; fast clients lose nothing.
#[tokio::test]
async fn disconnect_closes_a_lagging_client_with_1013() {
    let hub = hub(Policy::Disconnect);
    // A long send timeout: only the lag rule can close the slow client.
    let config = config(Duration::from_secs(30)).close_timeout(WAIT);
    let Scene {
        server,
        mut sessions,
        mut fast,
        mut slow,
        slow_id,
    } = Scene::start(&hub, config).await;
    assert_eq!(hub.subscriber_count(), 3);

    // Publish until the slow client is a buffer behind and messages it has
    // not read are being evicted.
    let mut published = 0;
    while hub.stats().evicted <= CAPACITY as u64 {
        assert!(published < MAX_MESSAGES, "the hub never evicted anything");
        assert_eq!(
            publish_paced(&hub, published, &mut fast).await,
            Published::Queued
        );
        published += 1;
    }
    let evicted = hub.stats().evicted;

    // The slow client resumes: what reached it before it fell behind, then
    // a Close frame that says why.
    let (messages, ending) = read_to_end(&mut slow).await;
    let numbers = numbers_of(&messages);
    assert!(!numbers.is_empty(), "the slow client gets a prefix first");
    assert_prefix(&numbers, "the slow client");
    assert_eq!(
        numbers.len() as u64 + evicted + CAPACITY as u64,
        published,
        "what it read, what was evicted and what is still buffered make up everything"
    );
    let Ending::Closed(Some(reason)) = ending else {
        panic!("expected a Close frame with a reason, got {ending:?}");
    };
    assert_eq!(
        reason,
        close_reason(
            CloseCode::Again,
            format!("lagged behind the hub by {evicted} messages")
        )
    );
    let (id, server_reason) = sessions.closed().await;
    assert_eq!((id, server_reason), (slow_id, reason));
    assert_eq!(
        hub.subscriber_count(),
        2,
        "the slow client's place is freed"
    );

    // The fast clients got everything, and still do.
    for i in published..published + AFTER {
        assert_eq!(publish_paced(&hub, i, &mut fast).await, Published::Queued);
    }
    let everything: Vec<u64> = (0..published + AFTER).collect();
    for client in &fast {
        assert_eq!(client.received, everything);
    }

    let stats = hub.stats();
    assert_eq!(stats.disconnected, 1);
    assert_eq!(stats.lagged, evicted, "the lag the client was closed for");
    assert_eq!(stats.dropped, 0);
    server.shutdown().await;
}

/// Control frames do not travel through the hub, so no policy drops them:
/// while the hub is discarding data for a stalled client, that client's Ping
/// still gets its Pong and the server's Close frame still arrives.
#[tokio::test]
async fn control_frames_are_never_dropped() {
    let hub = hub(Policy::DropLatest);
    let config = config(Duration::from_secs(30)).close_timeout(WAIT);
    let (server, mut sessions) = hub_server(&hub, config);
    let server = TestServer::start(server).await;
    let mut client = slow_client(server.addr()).await;
    let session = sessions.joined().await;

    // A publisher that floods the hub for the whole test.
    let flood = tokio::spawn({
        let hub = hub.clone();
        let payload = Bytes::from_static(&[b'x'; 1024]);
        async move {
            loop {
                let _ = hub.publish(Message::binary(payload.clone())).await;
                tokio::task::yield_now().await;
            }
        }
    });

    // The client is not reading: its socket fills, then the hub's buffer,
    // and the hub starts dropping. Ping now.
    wait_until("the hub to drop messages", || hub.stats().dropped > 0).await;
    within(
        "the ping to be sent",
        client.send(Message::Ping(Bytes::from_static(b"still there?"))),
    )
    .await
    .expect("send a ping");
    let dropped_at_ping = hub.stats().dropped;
    wait_until("the hub to drop messages after the ping", || {
        hub.stats().dropped > dropped_at_ping
    })
    .await;
    let pong = loop {
        match next_frame(&mut client).await {
            Some(Ok(Message::Binary(_))) => continue,
            Some(Ok(Message::Pong(payload))) => break payload,
            other => panic!("expected data or the pong, got {other:?}"),
        }
    };
    assert_eq!(pong, Bytes::from_static(b"still there?"));

    // The client stalls again until the hub drops again; the server closes
    // the session meanwhile. The Close frame arrives after the data ahead of it.
    let dropped_at_pong = hub.stats().dropped;
    wait_until("the hub to drop messages again", || {
        hub.stats().dropped > dropped_at_pong
    })
    .await;
    let kicked = close_reason(CloseCode::from(4000), "kicked");
    session.close(kicked.clone());
    let (_, ending) = read_to_end(&mut client).await;
    assert!(
        matches!(&ending, Ending::Closed(Some(r)) if *r == kicked),
        "{ending:?}"
    );
    let (id, reason) = sessions.closed().await;
    assert_eq!((id, reason), (session.session_id(), kicked));

    flood.abort();
    let stats = hub.stats();
    assert!(stats.dropped > dropped_at_pong);
    assert_eq!(
        stats.disconnected, 0,
        "the client was closed by the server, not the policy"
    );
    server.shutdown().await;
}

/// `Config::send_timeout` bounds how long a write to a client makes *no
/// progress* (its docs, and the crate docs: "a session whose socket accepts
/// nothing for send_timeout"). A client that keeps reading, however slowly,
/// must not be cut off. Here the client reads at most 8 KiB every 5 ms (under
/// 1.6 MB/s) and the server's socket buffers little (64 KiB), so a 1 MiB
/// message takes several times `send_timeout` to go out, while the socket
/// never goes more than a few milliseconds without progress.
#[tokio::test]
async fn send_timeout_spares_a_slow_client_that_keeps_reading() {
    let send_timeout = Duration::from_millis(200);
    let hub = hub(Policy::Suspend);
    let (server, mut sessions) = hub_server(&hub, config(send_timeout));
    let server = SmallBufferServer::start(server).await;
    let mut slow = slow_client(server.addr).await;
    sessions.joined().await;

    let size = 1 << 20;
    let outcome = hub.publish(Message::binary(vec![7u8; size])).await;
    assert_eq!(outcome, Ok(Published::Queued));

    // Read the frame's raw bytes at the client's own pace (the sleep is the
    // client being slow, not a wait for an event). A server frame of 1 MiB
    // has a 10-byte header: opcode, length marker, 64-bit length.
    let frame_len = size + 10;
    let tcp = slow.get_mut();
    let mut buf = vec![0u8; 8 * 1024];
    let mut read = 0;
    let started = Instant::now();
    let mut last_read = started;
    let mut longest_gap = Duration::ZERO;
    while read < frame_len {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n = within("the next bytes of the message", tcp.read(&mut buf))
            .await
            .expect("read from the socket");
        assert!(
            n > 0,
            "the server ended the connection after {read} of {frame_len} bytes, \
             {:?} in, although the client never went more than {longest_gap:?} \
             without reading; the session's close reason: {:?}",
            started.elapsed(),
            sessions.closed.try_recv().ok(),
        );
        read += n;
        longest_gap = longest_gap.max(last_read.elapsed());
        last_read = Instant::now();
    }
    assert!(
        started.elapsed() > 2 * send_timeout,
        "the test needs the message to take longer than the send timeout, \
         it took {:?}",
        started.elapsed()
    );
    assert_eq!(
        hub.stats().disconnected,
        0,
        "a client that kept reading was cut off as stuck"
    );
    assert_eq!(hub.subscriber_count(), 1);
    server.shutdown().await;
}

/// The hub's counters add up under every policy, with real sessions: two
/// fast clients and one whose socket is full while everything is published,
/// so all three are subscribed for every publish. Afterwards the stuck client
/// reads what it still can (under Disconnect it is closed for its lag once it
/// sees it). Every message is then counted once per subscriber, as
/// delivered, lagged or left unread.
#[tokio::test]
async fn the_counters_add_up_under_every_policy() {
    for policy in Policy::ALL {
        let hub = hub(policy);
        // Long enough that nobody is cut off while the test publishes.
        let mut scene = Scene::start(&hub, config(Duration::from_secs(30))).await;
        let mut published = 0;
        for i in 0..200 {
            let outcome = match hub.try_publish(numbered(i)) {
                Ok(outcome) => outcome,
                // The stuck client holds Suspend's buffer: stop there.
                Err(err) if err.is_full() => break,
                Err(err) => panic!("{policy}: {err}"),
            };
            if outcome == Published::Queued {
                published += 1;
                for client in scene.fast.iter_mut() {
                    client.expect(i).await;
                }
            }
        }
        assert!(published > CAPACITY as u64, "{policy}: only {published}");
        // Now the stuck client reads until it has had everything (got or
        // skipped; only it can lag), or its session has ended.
        let mut got = 0u64;
        within(
            &format!("{policy}: the stuck client to read what it can"),
            async {
                while got + hub.stats().lagged < published && hub.subscriber_count() == 3 {
                    let next = tokio::time::timeout(Duration::from_millis(50), scene.slow.next());
                    match next.await {
                        Ok(Some(Ok(Message::Binary(_)))) => got += 1,
                        Ok(Some(Ok(_))) | Err(_) => {}
                        Ok(Some(Err(_)) | None) => break,
                    }
                }
            },
        )
        .await;
        scene.server.shutdown().await;
        wait_until("every subscription to be dropped", || {
            hub.subscriber_count() == 0
        })
        .await;
        let stats = hub.stats();
        assert_eq!(stats.published, published, "{policy}: {stats:?}");
        assert_eq!(
            stats.delivered + stats.lagged + stats.unread,
            3 * published,
            "{policy}: each message counted once per subscriber: {stats:?}"
        );
        if matches!(policy, Policy::DropOldest | Policy::Disconnect) {
            assert!(
                stats.evicted > 0 && stats.lagged >= stats.evicted,
                "{policy}: {stats:?}"
            );
        } else {
            assert_eq!((stats.lagged, stats.evicted), (0, 0), "{policy}: {stats:?}");
            assert_eq!(got, published, "{policy}: the stuck client gets everything");
        }
    }
}

/// The tests that publish on a real-time schedule take turns: each needs
/// the machine's two cores to keep its schedule.
static SCHEDULED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A client that reads at `bytes_per_tick` every 10 ms (a steady, slow
/// reader) through a socket with the given receive buffer; returns the
/// number of bytes it read once its connection ends or `stop` fires.
async fn steady_reader(
    addr: SocketAddr,
    rcvbuf: Option<u32>,
    bytes_per_tick: usize,
    mut stop: oneshot::Receiver<()>,
) -> JoinHandle<u64> {
    let mut tcp = common::upgrade_raw(addr, PATH, rcvbuf).await;
    tokio::spawn(async move {
        let mut buf = vec![0u8; bytes_per_tick];
        let mut read = 0u64;
        let mut ticks = tokio::time::interval(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = &mut stop => return read,
                _ = ticks.tick() => {}
            }
            match tcp.read(&mut buf).await {
                Ok(n) if n > 0 => read += n as u64,
                _ => return read,
            }
        }
    })
}

/// A fast client that records, for every message, how late it arrived
/// against its place in the publisher's schedule (`start` + `i` × `every`).
async fn timed_client(
    server: &TestServer,
    sessions: &mut Sessions,
    start: Instant,
    every: Duration,
) -> JoinHandle<(u64, Duration)> {
    let mut client = server.connect(PATH).await;
    sessions.joined().await;
    tokio::spawn(async move {
        let (mut count, mut worst) = (0u64, Duration::ZERO);
        while let Some(Ok(msg)) = client.inner().next().await {
            if let Message::Binary(b) = msg {
                let i = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
                let due = start + every * u32::try_from(i).expect("a small index");
                worst = worst.max(Instant::now().saturating_duration_since(due));
                count += 1;
            }
        }
        (count, worst)
    })
}

/// Publishes `count` messages of `size` bytes on a fixed schedule (one
/// every `every`, from `start`); a publish the hub holds back makes the ones
/// after it late instead of being skipped. Returns how far behind the
/// schedule the publisher fell at worst.
async fn publish_on_schedule(
    hub: &Hub,
    start: Instant,
    every: Duration,
    count: u64,
    size: usize,
) -> Duration {
    let mut behind = Duration::ZERO;
    for i in 0..count {
        let due = start + every * u32::try_from(i).expect("a small index");
        tokio::time::sleep_until(due.into()).await;
        behind = behind.max(Instant::now().saturating_duration_since(due));
        let mut payload = vec![0u8; size];
        payload[..8].copy_from_slice(&i.to_be_bytes());
        let outcome = within("a publish", hub.publish(Message::binary(payload))).await;
        assert_eq!(outcome, Ok(Published::Queued));
    }
    behind
}

/// Suspend: a client that keeps reading, but at half the publish rate,
/// holds the buffer full; after `stall_timeout` it is closed with 1013 "too
/// slow for the hub", so the fast clients' worst latency stays within the
/// stall timeout plus 2 s. (Closing only a client whose socket takes nothing
/// for `send_timeout` never caught this one: everyone went at its pace.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_closes_a_client_that_reads_at_half_the_rate_after_the_stall_timeout() {
    let _turn = SCHEDULED.lock().await;
    const EVERY: Duration = Duration::from_millis(2); // 500 messages a second
    const COUNT: u64 = 3_000;
    let stall = Duration::from_secs(2);
    let hub = Hub::with_config(
        HubConfig::default()
            .capacity(256)
            .policy(Policy::Suspend)
            .stall_timeout(stall),
    )
    .expect("hub config");
    let (server, mut sessions) = hub_server(&hub, config(Duration::from_secs(5)));
    let server = TestServer::start(server).await;
    let start = Instant::now() + Duration::from_millis(500);
    let fast = [
        timed_client(&server, &mut sessions, start, EVERY).await,
        timed_client(&server, &mut sessions, start, EVERY).await,
    ];
    // Half of 500 × 520 bytes a second: 1,300 bytes every 10 ms.
    let (stop_slow, stop) = oneshot::channel();
    let slow = steady_reader(server.addr(), Some(64 * 1024), 1_300, stop).await;
    let slow_id = sessions.joined().await.session_id();

    let behind = publish_on_schedule(&hub, start, EVERY, COUNT, 512).await;
    let (id, reason) = sessions.closed().await;
    assert_eq!(id, slow_id, "only the slow client is closed");
    assert_eq!(u16::from(reason.code), 1013, "{reason:?}");
    assert_eq!(reason.reason.as_str(), "too slow for the hub");
    let _ = stop_slow.send(());
    let _ = slow.await;
    server.shutdown().await;
    let bound = stall + Duration::from_secs(2);
    for client in fast {
        let (count, worst) = within("a fast client to finish", client).await.unwrap();
        assert_eq!(count, COUNT, "a fast client lost messages");
        assert!(
            worst <= bound,
            "a fast client's worst latency was {worst:?}, over {bound:?}"
        );
    }
    assert!(behind <= bound, "the publisher fell {behind:?} behind");
    assert_eq!(hub.stats().disconnected, 1);
}

/// DropOldest: a client that reads steadily at a tenth of the publish rate,
/// with the kernel's default buffers, lags (and that is counted) but is
/// never closed for being slow: its socket keeps taking bytes as it reads.
/// (Before wshub capped what the kernel holds unsent, the socket, once its
/// megabytes of buffer were full, took nothing until a third of them had
/// drained: seconds at this pace, and the client was closed as stuck.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_never_closes_a_client_that_keeps_reading_slowly() {
    let _turn = SCHEDULED.lock().await;
    const EVERY: Duration = Duration::from_millis(1);
    const COUNT: u64 = 6_000;
    const SIZE: usize = 4096;
    let send_timeout = Duration::from_secs(2);
    let hub = hub_with(Policy::DropOldest, 256);
    let (server, mut sessions) = hub_server(&hub, config(send_timeout));
    let server = TestServer::start(server).await;
    let start = Instant::now() + Duration::from_millis(500);
    let fast = timed_client(&server, &mut sessions, start, EVERY).await;
    // A tenth of 1,000 × 4 KiB a second: 4,100 bytes every 10 ms.
    let (stop_slow, stop) = oneshot::channel();
    let slow = steady_reader(server.addr(), None, 4_100, stop).await;
    sessions.joined().await;

    publish_on_schedule(&hub, start, EVERY, COUNT, SIZE).await;
    if let Ok(closed) = sessions.closed.try_recv() {
        panic!("a client that kept reading was closed: {closed:?}");
    }
    assert_eq!(hub.subscriber_count(), 2);
    let stats = hub.stats();
    assert!(
        stats.lagged > 0,
        "the slow client lagged, and that is counted: {stats:?}"
    );
    assert_eq!(stats.disconnected, 0, "{stats:?}");
    let _ = stop_slow.send(());
    let read = within("the slow reader to stop", slow).await.unwrap();
    assert!(read > 0);
    server.shutdown().await;
    let (count, _) = within("the fast client to finish", fast).await.unwrap();
    assert_eq!(count, COUNT, "the fast client lost messages");
}

/// A hub with this policy and capacity.
fn hub_with(policy: Policy, capacity: usize) -> Hub {
    Hub::with_config(HubConfig::default().capacity(capacity).policy(policy)).expect("hub config")
}
