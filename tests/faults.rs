//! Faults: clients that die abruptly, with a TCP reset, at every stage of a
//! connection are cleaned up, and nobody else notices.
//!
//! * halfway through the HTTP upgrade request: its `max_handshakes` place is
//!   given back;
//! * around the 101 (request complete, or answered): its `max_connections`
//!   slot is given back;
//! * halfway through a WebSocket message: its subscription is freed and the
//!   partial message reaches nobody;
//! * while the hub is writing to it (its socket full, its send task blocked):
//!   freed at once, not after `send_timeout`, and the buffered messages it
//!   held are released;
//! * at scale: 100 of 1,000 clients reset in the middle of a broadcast; the
//!   900 others get every message in order.
//!
//! "Cleaned up" is measured the way a user would: [`Hub::subscriber_count`],
//! the server's handshake and connection limits, and the number of tasks
//! alive on the runtime (tokio's stable `RuntimeMetrics::num_alive_tasks`),
//! which must come back to exactly what it was before the faulty clients
//! came. Each test has its own runtime and its clients run in the test's own
//! task (never spawned), so that count is the server's alone.
//!
//! A reset is `set_zero_linger` then a drop: the kernel sends RST, not FIN.
//! Where the kernel can tell (Linux's `/proc/net/tcp`), a test waits until
//! the server has actually read a partial request or frame before resetting,
//! so the server is really in the middle of it.
//!
//! Graceful shutdown is tests/shutdown.rs's subject and is not repeated here.
//!
//! No test sleeps in the hope that something has happened: each waits for a
//! condition, polling every 5 ms for at most [`WAIT`] (and a bounded number
//! of polls), and every other wait is bounded by [`within`].

mod common;

use common::{
    GREETING, MAX_POLLS, POLL, WAIT, frame_header, masked, sharedflow, wait_for, within, within_for,
};

use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use wshub::testing::TestServer;
use wshub::tungstenite::Error as WsError;
use wshub::{CloseCode, CloseReason, Config, Hub, HubConfig, Message, Policy, Published, Server};

/// A client whose TCP stream the test holds, so it can reset it.
type Client = WebSocketStream<TcpStream>;

/// The route every test serves.
const PATH: &str = "/ws";

/// A complete upgrade request for [`PATH`].
const REQUEST: &str = "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\r\n";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Tasks alive on the current runtime.
fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// The client settings: a small read buffer, since some tests open 1,000.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

/// Upgrades `tcp` to a WebSocket client on [`PATH`].
async fn upgrade(addr: SocketAddr, tcp: TcpStream) -> Result<Client, WsError> {
    let url = format!("ws://{addr}{PATH}");
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url, tcp, Some(client_config())).await?;
    Ok(ws)
}

/// Connects a client, without expecting anything yet.
async fn try_connect(addr: SocketAddr) -> Result<Client, WsError> {
    let tcp = TcpStream::connect(addr).await.map_err(WsError::Io)?;
    upgrade(addr, tcp).await
}

/// Connects a client and waits for its greeting, which the route sends
/// after subscribing: once it arrives, the client is on the hub.
async fn connect(addr: SocketAddr) -> Client {
    let mut ws = within("a client to connect", try_connect(addr))
        .await
        .unwrap_or_else(|err| panic!("connecting to {addr} failed: {err}"));
    expect_text(&mut ws, GREETING).await;
    ws
}

/// Connects as [`connect`] does, retrying while the server answers 503
/// because the slot of a connection that just died is not yet free.
async fn connect_when_freed(addr: SocketAddr, what: &str) -> Client {
    let deadline = Instant::now() + WAIT;
    for _ in 0..MAX_POLLS {
        match within("a client to connect", try_connect(addr)).await {
            Ok(mut ws) => {
                expect_text(&mut ws, GREETING).await;
                return ws;
            }
            Err(WsError::Http(response)) if response.status() == 503 => {
                let body = response.body().clone().unwrap_or_default();
                assert!(
                    Instant::now() < deadline,
                    "a connection slot held by {what} was not given back within {WAIT:?}: \
                     still 503 {:?}",
                    String::from_utf8_lossy(&body)
                );
                tokio::time::sleep(POLL).await;
            }
            Err(err) => panic!("connecting after {what} failed: {err}"),
        }
    }
    panic!("gave up connecting after {what}: still 503 after {MAX_POLLS} tries");
}

/// The next text or binary message (pings and pongs skipped).
async fn next_data(ws: &mut Client, what: &str) -> Message {
    loop {
        match within(what, ws.next()).await {
            Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => return msg,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected {what}, got {other:?}"),
        }
    }
}

/// Expects the next message to be exactly this text.
async fn expect_text(ws: &mut Client, expected: &str) {
    match next_data(ws, &format!("the text {expected:?}")).await {
        Message::Text(text) => assert_eq!(text.as_str(), expected, "unexpected text message"),
        other => panic!("expected the text {expected:?}, got {other:?}"),
    }
}

/// Closes a client cleanly: Close frame, the server's answer, the end.
async fn close_cleanly(mut ws: Client) {
    within("the client's Close frame to go out", ws.close(None))
        .await
        .expect("send the Close frame");
    while let Some(Ok(_)) = within("the server to answer the Close", ws.next()).await {}
}

/// Resets a TCP connection: SO_LINGER 0, then close, so the kernel sends RST.
fn reset(tcp: TcpStream) {
    tcp.set_zero_linger().expect("set SO_LINGER to 0");
    drop(tcp);
}

/// Resets a client's connection without a closing handshake.
fn reset_client(ws: Client) {
    reset(ws.into_inner());
}

/// The address as `/proc/net/tcp` prints it: the IPv4 address as a
/// native-endian hex word, then the port in hex.
fn proc_addr(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => unreachable!("the tests use 127.0.0.1"),
    }
}

/// The TCP state and the unread byte count (`rx_queue`) of the server's end
/// of the connection from `client`, per Linux's `/proc/net/tcp`; `None` if
/// there is no such socket.
fn server_end(server: SocketAddr, client: SocketAddr) -> Option<(String, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let (local, remote) = (proc_addr(server), proc_addr(client));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() > 4 && fields[1] == local && fields[2] == remote {
            let rx = fields[4].split(':').nth(1)?;
            Some((fields[3].to_owned(), u64::from_str_radix(rx, 16).ok()?))
        } else {
            None
        }
    })
}

/// The TCP states of `/proc/net/tcp` that matter here.
const ESTABLISHED: &str = "01";
const SYN_RECV: &str = "03";

/// Waits until the server has read everything `client` sent, so that it is
/// really in the middle of whatever the client left unfinished; returns
/// `false` if the server's end of the connection is gone instead (the
/// server closed it). Without `/proc/net/tcp` (not Linux) this cannot be
/// seen: it returns `true` at once.
async fn until_server_has_read(server: SocketAddr, client: &TcpStream, what: &str) -> bool {
    if !std::path::Path::new("/proc/net/tcp").exists() {
        return true;
    }
    let client = client.local_addr().expect("the client's address");
    let end = wait_for(
        what,
        || server_end(server, client),
        |end| match end {
            Some((state, unread)) if state == ESTABLISHED => *unread == 0,
            Some((state, _)) => state != SYN_RECV,
            None => true,
        },
    )
    .await;
    matches!(end, Some((state, 0)) if state == ESTABLISHED)
}

/// Ktor's SharedFlow route, which also reports how each session ended: the
/// peer's address and the close reason.
type Endings = mpsc::UnboundedReceiver<(Option<SocketAddr>, CloseReason)>;

fn reporting_sharedflow(hub: &Hub) -> (Server, Endings) {
    let (tx, endings) = mpsc::unbounded_channel();
    let hub = hub.clone();
    let server = Server::new().route(PATH, move |mut session| {
        let (hub, tx) = (hub.clone(), tx.clone());
        async move {
            let subscription = hub.subscribe();
            session.send(GREETING).await?;
            let reason = session.join(subscription).await;
            let _ = tx.send((session.request().peer_addr(), reason));
            Ok::<_, wshub::Error>(())
        }
    });
    (server, endings)
}

/// Tasks the server runs: `idle` with no connection, `per_session` more
/// for each open session, measured rather than assumed.
#[derive(Clone, Copy, Debug)]
struct Tasks {
    idle: usize,
    per_session: usize,
}

impl Tasks {
    /// Measures `per_session` from `open` sessions that were opened after
    /// `idle` was read.
    async fn measure(idle: usize, open: usize) -> Tasks {
        let alive = wait_for(
            "the open sessions' tasks to be counted",
            alive_tasks,
            |&n| n > idle && (n - idle) % open == 0,
        )
        .await;
        Tasks {
            idle,
            per_session: (alive - idle) / open,
        }
    }

    /// Waits until exactly the tasks of `open` sessions are alive: nothing
    /// is left of any connection that ended.
    async fn until_only(&self, open: usize, what: &str) {
        let expected = self.idle + self.per_session * open;
        wait_for(
            &format!("{what}: {expected} tasks alive ({open} sessions open, {self:?})"),
            alive_tasks,
            |&n| n == expected,
        )
        .await;
    }
}

/// Waits until the hub has exactly `n` subscribers.
async fn until_subscribers(hub: &Hub, n: usize, what: &str) {
    wait_for(
        &format!("{what}: {n} subscribers"),
        || hub.subscriber_count(),
        |&count| count == n,
    )
    .await;
}

/// Connects and sends the first half of an upgrade request; returns once
/// the server has read it, so its handshake is under way.
async fn half_request(addr: SocketAddr) -> TcpStream {
    let mut tcp = within("a TCP connection", TcpStream::connect(addr))
        .await
        .expect("connect");
    let half = &REQUEST.as_bytes()[..REQUEST.len() / 2];
    tcp.write_all(half).await.expect("write half a request");
    if !until_server_has_read(addr, &tcp, "the server to read the half request").await {
        let (mut answer, mut chunk) = (Vec::new(), [0u8; 512]);
        while let Ok(n @ 1..) = within("the server's answer", tcp.read(&mut chunk)).await {
            answer.extend_from_slice(&chunk[..n]);
        }
        panic!(
            "the server closed a connection without reading its half request \
             (no handshake place free?); it answered {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    tcp
}

/// Reads an HTTP response head, byte by byte so nothing after it is taken.
async fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 4096, "an overlong response head: {head:?}");
        match within("the response head", tcp.read_u8()).await {
            Ok(byte) => head.push(byte),
            Err(err) => panic!(
                "the connection failed before the end of the response head ({err}); got {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8(head).expect("an ASCII response head")
}

/// Opens one more connection and expects the immediate 503 for a server
/// whose `max_handshakes` places are all taken.
async fn expect_handshakes_full(addr: SocketAddr) {
    let mut probe = TcpStream::connect(addr).await.expect("connect");
    let mut answer = String::new();
    within("the 503 and the close", probe.read_to_string(&mut answer))
        .await
        .expect("read the answer");
    assert!(
        answer.starts_with("HTTP/1.1 503 ") && answer.contains("too many handshakes"),
        "every handshake place should be taken: a new connection gets 503 at once; got {answer:?}"
    );
}

/// Expects an upgrade to be refused with 503 because `max` sessions are open.
async fn expect_connections_full(addr: SocketAddr, max: usize) {
    match within("the refusal", try_connect(addr)).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), 503, "{response:?}");
            let body = response.body().clone().unwrap_or_default();
            let body = String::from_utf8_lossy(&body);
            assert!(
                body.contains(&format!("at most {max} WebSocket sessions")),
                "the 503 should be for max_connections, got {body:?}"
            );
        }
        Err(err) => panic!("expected 503 from max_connections, got {err}"),
        Ok(_) => panic!("expected 503: all {max} connection slots should be taken"),
    }
}

// ---------------------------------------------------------------------------
// Tests: one client at a time
// ---------------------------------------------------------------------------

/// Clients that send half an upgrade request and reset hold the server's
/// `max_handshakes` places only until the reset: every place comes back
/// (not after `handshake_timeout`, set far away here), the open session
/// keeps working, and new clients use every place again.
#[tokio::test]
async fn clients_reset_halfway_through_the_upgrade_request_give_back_their_handshake_places() {
    const PLACES: usize = 4;
    let hub = Hub::new();
    let server = sharedflow(hub.clone())
        .max_handshakes(PLACES)
        .config(Config::default().handshake_timeout(Duration::from_secs(60)));
    let server = TestServer::start(server).await;
    let addr = server.addr();
    let idle = alive_tasks();
    let bystander = connect(addr).await;
    let tasks = Tasks::measure(idle, 1).await;

    // Round 1: every place is held by a half request the server has read;
    // then all of them reset.
    let mut halves = Vec::new();
    for _ in 0..PLACES {
        halves.push(half_request(addr).await);
    }
    expect_handshakes_full(addr).await;
    for tcp in halves {
        reset(tcp);
    }
    tasks
        .until_only(1, "the reset handshakes to be dropped")
        .await;
    assert_eq!(hub.subscriber_count(), 1, "a half request never subscribes");

    // Round 2: all the places are free again. New half requests take every
    // one of them (one more connection is turned away), and then complete.
    let mut halves = Vec::new();
    for _ in 0..PLACES {
        halves.push(half_request(addr).await);
    }
    expect_handshakes_full(addr).await;
    let mut clients = Vec::new();
    for mut tcp in halves {
        let rest = &REQUEST.as_bytes()[REQUEST.len() / 2..];
        tcp.write_all(rest)
            .await
            .expect("write the rest of the request");
        let head = read_head(&mut tcp).await;
        assert!(
            head.starts_with("HTTP/1.1 101 "),
            "a handshake place should have been free for this client; got {head:?}"
        );
        let mut ws =
            WebSocketStream::from_raw_socket(tcp, Role::Client, Some(client_config())).await;
        expect_text(&mut ws, GREETING).await;
        clients.push(ws);
    }
    assert_eq!(hub.subscriber_count(), PLACES + 1);

    // The session that was open all along never noticed.
    all_get_a_broadcast_then_leave(&hub, bystander, clients, &tasks).await;
    server.shutdown().await;
}

/// A broadcast after the resets reaches the bystander and every client
/// still open; then all of them close cleanly and every session ends.
async fn all_get_a_broadcast_then_leave(
    hub: &Hub,
    mut bystander: Client,
    mut clients: Vec<Client>,
    tasks: &Tasks,
) {
    let outcome = hub.publish("after the resets").await.expect("publish");
    assert_eq!(outcome, Published::Queued);
    expect_text(&mut bystander, "after the resets").await;
    for ws in &mut clients {
        expect_text(ws, "after the resets").await;
    }
    close_cleanly(bystander).await;
    for ws in clients {
        close_cleanly(ws).await;
    }
    tasks.until_only(0, "every session to end").await;
    assert_eq!(hub.subscriber_count(), 0);
}

/// Clients that reset around the 101 (right after sending the whole
/// request, or right after reading the 101 without going on) give back
/// their `max_connections` slots: afterwards the full number of sessions
/// can open again, and no more.
#[tokio::test]
async fn clients_reset_around_the_101_give_back_their_connection_slots() {
    const SLOTS: usize = 5;
    const FAULTY: usize = SLOTS - 1;
    let hub = Hub::new();
    let server = TestServer::start(sharedflow(hub.clone()).max_connections(Some(SLOTS))).await;
    let addr = server.addr();
    let idle = alive_tasks();
    let bystander = connect(addr).await;
    let tasks = Tasks::measure(idle, 1).await;

    // Clients that read their 101 and die: each slot was taken before its
    // 101 was written, so the server is now full.
    let mut answered = Vec::new();
    for _ in 0..FAULTY {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(REQUEST.as_bytes())
            .await
            .expect("write the request");
        let head = read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "got {head:?}");
        answered.push(tcp);
    }
    expect_connections_full(addr, SLOTS).await;
    for tcp in answered {
        reset(tcp);
    }
    tasks
        .until_only(1, "the sessions reset after their 101 to end")
        .await;
    assert_eq!(hub.subscriber_count(), 1, "their subscriptions are freed");

    // Clients that send the whole request and reset at once, whatever the
    // server has done with it by then.
    for _ in 0..FAULTY {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(REQUEST.as_bytes())
            .await
            .expect("write the request");
        reset(tcp);
    }

    // Every slot comes back: as many sessions as the limit allows open
    // (each waits, if need be, for a slot to be given back), then no more.
    let mut clients = Vec::new();
    for _ in 0..FAULTY {
        clients.push(connect_when_freed(addr, "clients reset around the 101").await);
    }
    expect_connections_full(addr, SLOTS).await;
    tasks
        .until_only(SLOTS, "nothing but the open sessions to be left")
        .await;
    assert_eq!(hub.subscriber_count(), SLOTS);

    all_get_a_broadcast_then_leave(&hub, bystander, clients, &tasks).await;
    server.shutdown().await;
}

/// A masked client frame: FIN bit and opcode, the declared payload length,
/// and as much of the payload (`'a'`s) as `sent` says.
fn partial_frame(first_byte: u8, declared: usize, sent: usize) -> Vec<u8> {
    let mut frame = frame_header(first_byte, declared, true);
    frame.extend(masked(&vec![b'a'; sent]));
    frame
}

/// A client that resets halfway through a message (a first fragment whole,
/// then a frame header promising 1,000 bytes and 600 of them) is
/// unsubscribed, its session ends with 1006, the partial message reaches
/// nobody, and the other client goes on as before.
#[tokio::test]
async fn a_client_reset_halfway_through_a_message_is_unsubscribed_and_publishes_nothing() {
    let hub = Hub::new();
    let (server, mut endings) = reporting_sharedflow(&hub);
    let server = TestServer::start(server).await;
    let addr = server.addr();
    let idle = alive_tasks();
    let mut bystander = connect(addr).await;
    let mut victim = connect(addr).await;
    let tasks = Tasks::measure(idle, 2).await;
    assert_eq!(hub.subscriber_count(), 2);

    // A text message in two fragments: the first whole (100 bytes, no FIN),
    // the second (FIN, continuation) cut off after 600 of its 1,000 bytes.
    let mut bytes = partial_frame(0x01, 100, 100);
    bytes.extend(partial_frame(0x80, 1_000, 600));
    let tcp = victim.get_mut();
    tcp.write_all(&bytes)
        .await
        .expect("write the partial message");
    assert!(
        until_server_has_read(addr, tcp, "the server to read the partial message").await,
        "the server closed the connection instead of waiting for the rest of the message"
    );
    let victim_addr = tcp.local_addr().expect("the victim's address");
    reset_client(victim);

    let (peer, reason) = within("the reset session to end", endings.recv())
        .await
        .expect("the server stopped");
    assert_eq!(
        peer,
        Some(victim_addr),
        "only the reset client's session ends"
    );
    assert_eq!(
        reason.code,
        CloseCode::Abnormal,
        "a reset is an abnormal closure (1006): {reason:?}"
    );
    until_subscribers(&hub, 1, "the reset client to be unsubscribed").await;
    tasks
        .until_only(1, "the reset session's tasks to end")
        .await;
    assert_eq!(
        hub.stats().published,
        0,
        "the partial message must not be published"
    );

    // The other client is unaffected: the next thing it gets is the next
    // broadcast, and what it sends is broadcast.
    let outcome = hub.publish("after the reset").await.expect("publish");
    assert_eq!(outcome, Published::Queued);
    expect_text(&mut bystander, "after the reset").await;
    within(
        "the bystander to send",
        bystander.send(Message::text("still here")),
    )
    .await
    .expect("send");
    expect_text(&mut bystander, "still here").await;
    assert!(
        endings.try_recv().is_err(),
        "no other session may have ended"
    );

    close_cleanly(bystander).await;
    tasks.until_only(0, "every session to end").await;
    server.shutdown().await;
}

/// The size of each message in the test of a client reset while the hub is
/// writing to it: a few dozen fill a stalled socket.
const BIG: usize = 64 * 1024;

/// A `BIG` binary message that starts with its number.
fn numbered(i: u64) -> Message {
    let mut payload = vec![0u8; BIG];
    payload[..8].copy_from_slice(&i.to_be_bytes());
    Message::binary(payload)
}

/// Reads the next message, which must be [`numbered`]`(i)`.
async fn expect_numbered(ws: &mut Client, i: u64) {
    match next_data(ws, &format!("message {i}")).await {
        Message::Binary(b) if b.len() == BIG => {
            let got = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
            assert_eq!(got, i, "got message {got} where {i} was due");
        }
        other => panic!("expected message {i}, got {other:?}"),
    }
}

/// A client reset while the server is blocked writing to it (its 4 KiB
/// receive buffer full, the hub's buffer full of messages only it has not
/// taken, a publisher waiting on it under `Policy::Suspend`) is freed as
/// soon as the reset arrives: 1006, not the 1013 of `send_timeout` (a
/// minute here); the waiting publish goes through at once; and the fast
/// clients get every message in order, before and after.
#[tokio::test]
async fn a_client_reset_while_the_hub_is_writing_to_it_is_freed_at_once() {
    const CAPACITY: usize = 8;
    const MAX_MESSAGES: u64 = 2_000;
    const AFTER: u64 = 20;
    let send_timeout = Duration::from_secs(60);
    let hub = Hub::with_config(HubConfig::default().capacity(CAPACITY)).expect("hub config");
    assert_eq!(hub.policy(), Policy::Suspend);
    let (server, mut endings) = reporting_sharedflow(&hub);
    let config = Config::default()
        .ping_period(None)
        .send_timeout(send_timeout);
    let server = TestServer::start(server.config(config)).await;
    let addr = server.addr();
    let idle = alive_tasks();
    let mut fast = [connect(addr).await, connect(addr).await];

    // The victim has a tiny receive buffer and, after its greeting, reads nothing.
    let socket = TcpSocket::new_v4().expect("TCP socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("set the receive buffer size");
    let tcp = within("the victim to connect", socket.connect(addr))
        .await
        .expect("connect");
    let mut victim = within("the victim's upgrade", upgrade(addr, tcp))
        .await
        .expect("upgrade");
    expect_text(&mut victim, GREETING).await;
    let victim_addr = victim.get_ref().local_addr().expect("the victim's address");
    let tasks = Tasks::measure(idle, 3).await;

    // Publish, keeping the fast clients caught up, until a publish has to
    // wait: the hub's buffer is full of what only the victim has not taken,
    // because its send task is stuck writing to its full socket.
    let mut next = 0;
    let held = loop {
        assert!(next < MAX_MESSAGES, "the victim's socket never filled up");
        let mut publish = Box::pin(hub.publish(numbered(next)));
        match (&mut publish).now_or_never() {
            Some(outcome) => {
                assert_eq!(outcome.expect("publish"), Published::Queued);
                for ws in &mut fast {
                    expect_numbered(ws, next).await;
                }
                next += 1;
            }
            None => break publish,
        }
    };
    assert_eq!(
        hub.stats().buffered,
        CAPACITY,
        "the victim holds the buffer"
    );

    reset_client(victim);
    let outcome = within(
        "the publish held back by the victim to go through after its reset",
        held,
    )
    .await
    .expect("publish");
    assert_eq!(outcome, Published::Queued);
    let (peer, reason) = within("the reset session to end", endings.recv())
        .await
        .expect("the server stopped");
    assert_eq!(peer, Some(victim_addr), "only the victim's session ends");
    assert_eq!(
        reason.code,
        CloseCode::Abnormal,
        "ended by the reset (1006), not by the send timeout: {reason:?}"
    );
    until_subscribers(&hub, 2, "the victim to be unsubscribed").await;
    assert_eq!(
        hub.stats().disconnected,
        0,
        "a reset client is not counted as a slow one"
    );
    tasks
        .until_only(2, "the victim's session tasks to end")
        .await;

    // The others go on, in order, without a gap, and nothing waits any more.
    for ws in &mut fast {
        expect_numbered(ws, next).await;
    }
    for i in next + 1..=next + AFTER {
        let outcome = within("a publish", hub.publish(numbered(i)))
            .await
            .expect("publish");
        assert_eq!(outcome, Published::Queued);
        for ws in &mut fast {
            expect_numbered(ws, i).await;
        }
    }
    assert_eq!(hub.stats().buffered, 0, "nothing is left for anyone");

    let [a, b] = fast;
    close_cleanly(a).await;
    close_cleanly(b).await;
    tasks.until_only(0, "every session to end").await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Test: at scale
// ---------------------------------------------------------------------------

/// Clients in the test at scale.
const CLIENTS: usize = 1_000;
/// Every this-many-th client is reset.
const KILL_EVERY: usize = 10;
/// Messages published in that test.
const MESSAGES: u64 = 200;
/// The message before which the clients are reset.
const KILL_AT: u64 = MESSAGES / 2;
/// The pace of publishing.
const PACE: Duration = Duration::from_millis(5);
/// How long the broadcast of that test may take in all.
const TRAFFIC_WAIT: Duration = Duration::from_secs(30);

/// Raises the soft limit on open files towards the hard limit (at most to
/// 65,536) if it is below 5,000, and checks it is at least `needed`.
fn raise_open_file_limit(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("read RLIMIT_NOFILE");
    let soft = if soft < 5_000 {
        let raised = hard.min(65_536);
        setrlimit(Resource::RLIMIT_NOFILE, raised, hard).expect("raise RLIMIT_NOFILE");
        raised
    } else {
        soft
    };
    assert!(
        soft >= needed,
        "this test needs {needed} open files; the limit is {soft} (hard limit {hard})"
    );
}

/// The number in a message of the test at scale.
fn seq(msg: &Message, who: &str) -> u64 {
    match msg {
        Message::Text(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{who} got {text:?}, not a sequence number")),
        other => panic!("{who} got {other:?}, not a sequence number"),
    }
}

/// A surviving client: reads until the last message, checking that every
/// message arrives, in order.
async fn receive_everything(ws: &mut Client, who: usize) {
    let who = format!("surviving client {who}");
    for expected in 0..MESSAGES {
        let got = match ws.next().await {
            Some(Ok(msg @ Message::Text(_))) => seq(&msg, &who),
            other => panic!("{who} expected message {expected}, got {other:?}"),
        };
        assert_eq!(
            got, expected,
            "{who} got message {got} where {expected} was due"
        );
    }
}

/// A client that reads (in order) until `kill` is cancelled, then resets
/// its connection; returns how many messages it got.
async fn read_until_reset(mut ws: Client, kill: CancellationToken, who: usize) -> u64 {
    let mut next = 0;
    loop {
        tokio::select! {
            biased;
            _ = kill.cancelled() => break,
            msg = ws.next() => match msg {
                Some(Ok(msg @ Message::Text(_))) => {
                    let got = seq(&msg, &format!("client {who}"));
                    assert_eq!(got, next, "client {who} got message {got} where {next} was due");
                    next += 1;
                }
                other => panic!("client {who} expected message {next}, got {other:?}"),
            },
        }
    }
    reset_client(ws);
    next
}

/// 1,000 clients on the SharedFlow route; 100 of them are reset halfway
/// through a broadcast of 200 messages. The 900 others get every message in
/// order; the hub is back to exactly 900 subscribers and the server to
/// exactly 900 sessions' worth of tasks, then to none once they close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_lose_nothing_when_a_tenth_of_them_are_reset_mid_broadcast() {
    const SURVIVORS: usize = CLIENTS - CLIENTS / KILL_EVERY;
    // Both ends of every connection live in this process.
    raise_open_file_limit(2 * CLIENTS as u64 + 256);
    let hub = Hub::new();
    let server = TestServer::start(sharedflow(hub.clone())).await;
    let addr = server.addr();
    let idle = alive_tasks();

    let clients: Vec<Client> = within_for(
        TRAFFIC_WAIT,
        "1,000 clients to connect",
        futures_util::stream::iter(0..CLIENTS)
            .map(|_| connect(addr))
            .buffered(32)
            .collect(),
    )
    .await;
    assert_eq!(hub.subscriber_count(), CLIENTS);
    let tasks = Tasks::measure(idle, CLIENTS).await;

    let kill = CancellationToken::new();
    let mut victims = Vec::new();
    let mut survivors = Vec::new();
    for (who, ws) in clients.into_iter().enumerate() {
        if who % KILL_EVERY == KILL_EVERY / 2 {
            victims.push(read_until_reset(ws, kill.clone(), who));
        } else {
            survivors.push((who, ws));
        }
    }
    assert_eq!(survivors.len(), SURVIVORS);

    let publisher = async {
        let mut pace = tokio::time::interval(PACE);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..MESSAGES {
            pace.tick().await;
            if i == KILL_AT {
                kill.cancel();
            }
            let outcome = hub.publish(i.to_string()).await.expect("publish");
            assert_eq!(outcome, Published::Queued, "message {i}");
        }
    };
    let readers = join_all(
        survivors
            .iter_mut()
            .map(|(who, ws)| receive_everything(ws, *who)),
    );
    let ((), got_before_reset, _) = within_for(TRAFFIC_WAIT, "the broadcast", async {
        tokio::join!(publisher, join_all(victims), readers)
    })
    .await;
    // The victims were reset in the middle of the traffic: after messages
    // had reached them, before the rest were published.
    assert!(
        got_before_reset.iter().all(|&n| n <= KILL_AT) && got_before_reset.iter().any(|&n| n > 0),
        "the victims should have been reset mid-broadcast; they got {got_before_reset:?} messages"
    );

    until_subscribers(&hub, SURVIVORS, "the reset clients to be unsubscribed").await;
    let stats = hub.stats();
    assert_eq!(
        (
            stats.published,
            stats.lagged,
            stats.disconnected,
            stats.dropped
        ),
        (MESSAGES, 0, 0, 0),
        "nothing lagged, dropped or cut off: {stats:?}"
    );
    tasks
        .until_only(SURVIVORS, "the reset sessions' tasks to end")
        .await;

    within_for(
        TRAFFIC_WAIT,
        "the survivors to close",
        join_all(survivors.into_iter().map(|(_, ws)| close_cleanly(ws))),
    )
    .await;
    until_subscribers(&hub, 0, "every client to be unsubscribed").await;
    tasks.until_only(0, "every session to end").await;
    server.shutdown().await;
}
