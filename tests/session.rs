//! What a handler can do with a [`Session`] (Ktor's `WebSocketSession`), each
//! checked over real loopback sockets: close codes for bad input (1009, 1007,
//! 1002), close reasons, `close`, `terminate`, `flush`, request info, session
//! ids, pings, raw mode, JSON, `Outgoing` handles, what the handler's return
//! value means, and `Session::from_upgraded` for connections upgraded elsewhere.
//!
//! Well-behaved clients are real tokio-tungstenite clients. Frames no real
//! client would send (unmasked, RSV bits, invalid UTF-8, hand-made fragments)
//! and clients that never answer pings are [`RawClient`]s: a TCP stream that
//! does the HTTP upgrade by hand and then writes frame bytes itself.
//!
//! Handlers tell the test what they saw (a close reason, request info) through
//! a channel; every wait has a timeout that fails the test with a message.

mod common;

use common::{WAIT, within};

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Role;
use wshub::testing::{TestClient, TestServer};
use wshub::{
    CloseCode, CloseReason, Config, Error, Hub, Message, Published, Request, Server, Session,
    close_reason,
};

// ---------------------------------------------------------------------------
// Waiting with a bound
// ---------------------------------------------------------------------------

/// The next thing a handler reported through its channel.
async fn report<T>(reports: &mut UnboundedReceiver<T>, what: &str) -> T {
    within(what, reports.recv())
        .await
        .unwrap_or_else(|| panic!("the handler dropped its report channel before {what}"))
}

/// Reads until the connection ends. After the server's Close frame this lets
/// tungstenite send its answer, so the server need not wait for its close
/// timeout.
async fn read_to_end(client: &mut TestClient) {
    while let Some(Ok(_)) = client.next_frame().await {}
}

/// A close code as the number on the wire.
fn code(reason: &CloseReason) -> u16 {
    u16::from(reason.code)
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

/// Echoes every message until the session ends, then reports its close reason.
async fn echo_then_report(mut session: Session, reports: UnboundedSender<Option<CloseReason>>) {
    while let Some(msg) = session.recv().await {
        if session.send(msg).await.is_err() {
            break;
        }
    }
    let _ = reports.send(session.close_reason());
}

/// A server with one echo route at `/echo` using `config`; the channel gets
/// each session's close reason when it ends.
async fn echo_server(config: Config) -> (TestServer, UnboundedReceiver<Option<CloseReason>>) {
    let (tx, rx) = unbounded_channel();
    let server = Server::new().route_with_config("/echo", config, move |session| {
        echo_then_report(session, tx.clone())
    });
    (TestServer::start(server).await, rx)
}

/// The close reason the handler reported, which must exist.
async fn reported_reason(reports: &mut UnboundedReceiver<Option<CloseReason>>) -> CloseReason {
    report(reports, "the handler's close reason")
        .await
        .expect("the session ended without a close reason")
}

// ---------------------------------------------------------------------------
// A raw WebSocket client: hand-made HTTP upgrade, hand-made frames
// ---------------------------------------------------------------------------

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

/// One client-to-server frame, built bit by bit so tests can break the rules.
#[derive(Clone, Debug)]
struct Frame {
    fin: bool,
    rsv1: bool,
    masked: bool,
    opcode: u8,
    payload: Vec<u8>,
}

impl Frame {
    /// A final, masked frame: what a correct client sends.
    fn new(opcode: u8, payload: impl Into<Vec<u8>>) -> Frame {
        Frame {
            fin: true,
            rsv1: false,
            masked: true,
            opcode,
            payload: payload.into(),
        }
    }

    fn text(payload: impl Into<Vec<u8>>) -> Frame {
        Frame::new(TEXT, payload)
    }

    fn not_final(mut self) -> Frame {
        self.fin = false;
        self
    }

    fn unmasked(mut self) -> Frame {
        self.masked = false;
        self
    }

    fn with_rsv1(mut self) -> Frame {
        self.rsv1 = true;
        self
    }

    /// The frame's bytes on the wire (RFC 6455 §5.2).
    fn encode(&self) -> Vec<u8> {
        let first = (u8::from(self.fin) << 7) | (u8::from(self.rsv1) << 6) | self.opcode;
        common::client_frame(first, &self.payload, self.masked)
    }
}

/// A server-to-client frame as the raw client read it.
#[derive(Debug)]
struct ServerFrame {
    opcode: u8,
    payload: Vec<u8>,
}

/// A TCP client that upgrades by hand and then writes frame bytes itself.
///
/// Its halves are separate fields so a test can write and read at once.
struct RawClient {
    writer: OwnedWriteHalf,
    reader: RawReader,
}

/// The reading half of a [`RawClient`].
struct RawReader {
    tcp: OwnedReadHalf,
    /// Bytes read but not yet consumed.
    buf: Vec<u8>,
}

impl RawClient {
    /// Connects and performs the HTTP upgrade on `path`; panics unless the
    /// server answers 101.
    async fn upgrade(addr: SocketAddr, path: &str) -> RawClient {
        let tcp = within("a TCP connection", TcpStream::connect(addr))
            .await
            .expect("connect to the test server");
        let (rd, writer) = tcp.into_split();
        let mut client = RawClient {
            writer,
            reader: RawReader {
                tcp: rd,
                buf: Vec::new(),
            },
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        client.write(request.as_bytes()).await;
        let head = within("the upgrade response", client.reader.http_head()).await;
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "expected 101 Switching Protocols, got:\n{head}"
        );
        client
    }

    async fn write(&mut self, bytes: &[u8]) {
        within("a write to the server", self.writer.write_all(bytes))
            .await
            .expect("write to the server");
    }

    async fn send(&mut self, frame: Frame) {
        self.write(&frame.encode()).await;
    }

    async fn next_frame(&mut self) -> Option<ServerFrame> {
        self.reader.next_frame().await
    }

    async fn expect_close(&mut self) -> (u16, String, usize) {
        self.reader.expect_close().await
    }

    async fn expect_text(&mut self, expected: &[u8]) {
        self.reader.expect_text(expected).await
    }
}

impl RawReader {
    /// Reads more bytes into the buffer; `false` at end of stream or on a reset.
    async fn fill(&mut self) -> bool {
        self.buf.reserve(64 * 1024);
        matches!(self.tcp.read_buf(&mut self.buf).await, Ok(n) if n > 0)
    }

    /// An HTTP response head, up to and including the blank line.
    async fn http_head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return String::from_utf8_lossy(&head).into_owned();
            }
            assert!(self.fill().await, "connection closed during the upgrade");
        }
    }

    /// `n` bytes, or `None` if the connection ends first.
    async fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// The next frame from the server, or `None` when the connection ended.
    async fn next_frame(&mut self) -> Option<ServerFrame> {
        within("a frame from the server", async {
            let head = self.take(2).await?;
            assert_eq!(head[1] & 0x80, 0, "the server must not mask its frames");
            let len = match head[1] & 0x7f {
                126 => u16::from_be_bytes(self.take(2).await?.try_into().unwrap()) as usize,
                127 => u64::from_be_bytes(self.take(8).await?.try_into().unwrap()) as usize,
                n => n as usize,
            };
            let payload = self.take(len).await?;
            Some(ServerFrame {
                opcode: head[0] & 0x0f,
                payload,
            })
        })
        .await
    }

    /// Skips pings (without answering them) until a Close frame; returns
    /// its code, its reason and how many pings came first.
    async fn expect_close(&mut self) -> (u16, String, usize) {
        let mut pings = 0;
        loop {
            match self.next_frame().await {
                Some(ServerFrame {
                    opcode: PING,
                    payload: _,
                }) => pings += 1,
                Some(ServerFrame {
                    opcode: CLOSE,
                    payload,
                }) => {
                    assert!(payload.len() >= 2, "Close frame without a code");
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    let reason = String::from_utf8(payload[2..].to_vec())
                        .expect("close reason must be UTF-8");
                    return (code, reason, pings);
                }
                Some(other) => panic!("expected a Close frame, got {other:?}"),
                None => panic!("expected a Close frame, the connection ended without one"),
            }
        }
    }

    /// Expects the next frame to be a text frame with this payload.
    async fn expect_text(&mut self, expected: &[u8]) {
        match self.next_frame().await {
            Some(ServerFrame {
                opcode: TEXT,
                payload,
            }) => assert!(payload == expected, "unexpected text payload"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Close codes for bad input
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_message_far_larger_than_the_read_buffer_arrives_whole() {
    // The default read buffer is 512 bytes; a 600 KiB message takes many reads.
    let (server, _reports) = echo_server(Config::default()).await;
    let mut client = server.connect("/echo").await;
    let big: Vec<u8> = (0..600 << 10).map(|i| (i % 251) as u8).collect();
    client.send(Message::binary(big.clone())).await;
    match client.recv().await {
        Message::Binary(echoed) => assert!(echoed[..] == big[..], "the echo differs"),
        other => panic!("expected the 600 KiB echo, got {other:?}"),
    }
    client.close(None).await;
    server.shutdown().await;
}

#[tokio::test]
async fn message_over_max_message_size_is_closed_with_1009() {
    let (server, mut reports) = echo_server(Config::default().max_message_size(Some(1024))).await;
    let mut client = server.connect("/echo").await;

    let fits = "a".repeat(1024);
    client.send(fits.as_str()).await;
    client.expect_text(&fits).await;

    client.send("b".repeat(2048)).await;
    let reason = client
        .expect_close()
        .await
        .expect("the Close frame must carry a code");
    assert_eq!(code(&reason), 1009, "client got {reason:?}");
    assert_eq!(code(&reported_reason(&mut reports).await), 1009);
    server.shutdown().await;
}

#[tokio::test]
async fn message_over_the_default_limit_gets_1009_while_the_client_is_still_writing() {
    let (server, mut reports) = echo_server(Config::default()).await;
    let RawClient {
        mut writer,
        mut reader,
    } = RawClient::upgrade(server.addr(), "/echo").await;
    // 4 MiB against the default 1 MiB limit. The server refuses it from the
    // frame header and hangs up, so the rest of the write may fail; what the
    // client must still see is the Close frame saying why.
    let too_big = Frame::text(vec![b'x'; 4 << 20]).encode();
    let (_write_result, (code, reason, _)) =
        tokio::join!(writer.write_all(&too_big), reader.expect_close());
    assert_eq!(code, 1009, "reason: {reason}");
    assert_eq!(u16::from(reported_reason(&mut reports).await.code), 1009);
    server.shutdown().await;
}

#[tokio::test]
async fn frame_over_max_frame_size_is_closed_with_1009_though_the_message_limit_is_higher() {
    let config = Config::default()
        .max_frame_size(Some(1024))
        .max_message_size(Some(64 * 1024));
    let (server, mut reports) = echo_server(config).await;
    let mut client = RawClient::upgrade(server.addr(), "/echo").await;

    // Three frames under the frame limit make one message under the message limit.
    let part = vec![b'x'; 1000];
    client.send(Frame::text(part.clone()).not_final()).await;
    client
        .send(Frame::new(CONTINUATION, part.clone()).not_final())
        .await;
    client.send(Frame::new(CONTINUATION, part.clone())).await;
    client.expect_text(&part.repeat(3)).await;

    client.send(Frame::text(vec![b'y'; 2000])).await;
    let (code, reason, _) = client.expect_close().await;
    assert_eq!(code, 1009, "reason: {reason}");
    assert_eq!(u16::from(reported_reason(&mut reports).await.code), 1009);
    server.shutdown().await;
}

#[tokio::test]
async fn fragments_adding_up_past_max_message_size_are_closed_with_1009() {
    let (server, mut reports) = echo_server(Config::default().max_message_size(Some(1024))).await;
    let mut client = RawClient::upgrade(server.addr(), "/echo").await;

    let part = vec![b'x'; 500];
    client.send(Frame::text(part.clone()).not_final()).await;
    client
        .send(Frame::new(CONTINUATION, part.clone()).not_final())
        .await;
    client.send(Frame::new(CONTINUATION, part)).await;
    let (code, reason, _) = client.expect_close().await;
    assert_eq!(code, 1009, "reason: {reason}");
    assert_eq!(u16::from(reported_reason(&mut reports).await.code), 1009);
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_is_closed_with_1007() {
    let (server, mut reports) = echo_server(Config::default()).await;
    let mut client = RawClient::upgrade(server.addr(), "/echo").await;

    client.send(Frame::text(&b"ok"[..])).await;
    client.expect_text(b"ok").await;
    client.send(Frame::text(vec![b'h', b'i', 0xc3, 0x28])).await;
    let (code, reason, _) = client.expect_close().await;
    assert_eq!(code, 1007, "reason: {reason}");
    assert_eq!(u16::from(reported_reason(&mut reports).await.code), 1007);
    server.shutdown().await;
}

#[tokio::test]
async fn protocol_errors_are_closed_with_1002() {
    let cases = [
        ("an unmasked client frame", Frame::text("hello").unmasked()),
        ("a frame with RSV1 set", Frame::text("hello").with_rsv1()),
        ("a fragmented ping", Frame::new(PING, "p").not_final()),
        ("a reserved opcode", Frame::new(0x3, "?")),
    ];
    let (server, mut reports) = echo_server(Config::default()).await;
    for (what, frame) in cases {
        let mut client = RawClient::upgrade(server.addr(), "/echo").await;
        client.send(frame).await;
        let (code, reason, _) = client.expect_close().await;
        assert_eq!(code, 1002, "{what}: client got {code} {reason:?}");
        let reported = reported_reason(&mut reports).await;
        assert_eq!(
            u16::from(reported.code),
            1002,
            "{what}: handler saw {reported:?}"
        );
    }
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Close reasons, close, terminate, flush
// ---------------------------------------------------------------------------

#[tokio::test]
async fn close_reason_is_what_the_client_sent() {
    let (server, mut reports) = echo_server(Config::default()).await;

    let mut client = server.connect("/echo").await;
    client.close(Some(close_reason(4001, "going home"))).await;
    let reason = reported_reason(&mut reports).await;
    assert_eq!(
        (code(&reason), reason.reason.as_str()),
        (4001, "going home")
    );

    // A Close frame without a code is reported as 1005 No Status.
    let mut client = server.connect("/echo").await;
    client.close(None).await;
    assert_eq!(code(&reported_reason(&mut reports).await), 1005);
    server.shutdown().await;
}

#[tokio::test]
async fn close_reason_is_1006_when_the_client_drops_the_connection() {
    let (server, mut reports) = echo_server(Config::default()).await;
    let mut client = server.connect("/echo").await;
    client.send("hello").await;
    client.expect_text("hello").await;
    drop(client);
    let reason = reported_reason(&mut reports).await;
    assert_eq!(code(&reason), 1006, "{reason:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn close_from_the_server_sends_queued_data_then_its_reason_and_waits_for_the_answer() {
    let (tx, mut reports) = unbounded_channel();
    // A long close timeout: the handler's close() must end with the client's
    // answer, well before it.
    let config = Config::default().close_timeout(Duration::from_secs(30));
    let server = Server::new().route_with_config("/bye", config, move |mut session| {
        let tx = tx.clone();
        async move {
            let _ = session.recv().await;
            session.send("last words").await?;
            let started = Instant::now();
            session
                .close(close_reason(CloseCode::Policy, "closed by the server"))
                .await;
            let _ = tx.send((session.close_reason(), started.elapsed()));
            Ok::<_, Error>(())
        }
    });
    let server = TestServer::start(server).await;
    let mut client = server.connect("/bye").await;
    client.send("close me").await;
    client.expect_text("last words").await;
    let reason = client.expect_close().await.expect("a close code");
    assert_eq!(
        (code(&reason), reason.reason.as_str()),
        (1008, "closed by the server")
    );
    // Reading on lets tungstenite answer the Close; then the server hangs up.
    match client.next_frame().await {
        None | Some(Err(_)) => {}
        Some(Ok(frame)) => panic!("expected the connection to end, got {frame:?}"),
    }
    let (reason, took) = report(&mut reports, "the handler's close() to return").await;
    let reason = reason.expect("a close reason after close()");
    assert_eq!(code(&reason), 1008);
    assert!(
        took < WAIT,
        "close() waited {took:?}: it should end with the answer"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn close_with_a_reason_too_long_for_a_control_frame_still_delivers_the_code() {
    // A Close frame's payload is at most 125 bytes: a 2-byte code and up to
    // 123 bytes of reason (RFC 6455 §5.5).
    let long = "why ".repeat(50);
    let reason = close_reason(4000, long.clone());
    let server = Server::new().route("/long", move |mut session| {
        let reason = reason.clone();
        async move {
            let _ = session.recv().await;
            session.close(reason).await;
        }
    });
    let server = TestServer::start(server).await;
    let mut client = server.connect("/long").await;
    client.send("close me").await;
    let got = match client.next_frame().await {
        Some(Ok(Message::Close(Some(got)))) => got,
        other => panic!("expected a Close frame with code 4000, got {other:?}"),
    };
    assert_eq!(code(&got), 4000);
    assert!(
        got.reason.len() <= 123 && long.starts_with(got.reason.as_str()),
        "the reason should be cut to fit, got {:?}",
        got.reason
    );
    read_to_end(&mut client).await;
    server.shutdown().await;
}

#[tokio::test]
async fn terminate_drops_the_connection_without_a_close_frame() {
    let (tx, mut reports) = unbounded_channel();
    let server = Server::new().route("/terminate", move |mut session| {
        let tx = tx.clone();
        async move {
            let _ = session.recv().await;
            session.terminate();
            let _ = tx.send(session.close_reason());
        }
    });
    let server = TestServer::start(server).await;
    let mut client = server.connect("/terminate").await;
    client.send("terminate").await;
    match client.next_frame().await {
        None | Some(Err(_)) => {}
        Some(Ok(frame)) => panic!("expected the connection to drop, got {frame:?}"),
    }
    let reason = report(&mut reports, "the close reason after terminate()")
        .await
        .expect("a close reason after terminate()");
    assert_eq!(code(&reason), 1006, "{reason:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn flush_returns_once_the_messages_are_written() {
    const COUNT: usize = 100;
    let server = Server::new().route("/flush", |mut session| async move {
        for i in 0..COUNT {
            session.send(format!("message {i}")).await?;
        }
        session.flush().await?;
        // terminate() stops the send task at once, dropping anything not yet
        // written; after flush() nothing may be lost.
        session.terminate();
        Ok::<_, Error>(())
    });
    let server = TestServer::start(server).await;
    let mut client = server.connect("/flush").await;
    for i in 0..COUNT {
        client.expect_text(&format!("message {i}")).await;
    }
    match client.next_frame().await {
        None | Some(Err(_)) => {}
        Some(Ok(frame)) => panic!("expected the connection to drop, got {frame:?}"),
    }
    server.shutdown().await;
}

/// A flush that cannot finish because the client stopped reading reports
/// it: the session is closed by `send_timeout`, and `flush` says so instead
/// of pretending everything was written.
#[tokio::test]
async fn flush_reports_an_error_when_the_client_never_reads_what_was_sent() {
    let (tx, mut reports) = unbounded_channel();
    let config = Config::default().send_timeout(Duration::from_millis(300));
    let server = Server::new().route_with_config("/stuck", config, move |session| {
        let tx = tx.clone();
        async move {
            // Far more than the kernel's socket buffers hold.
            let big = Message::binary(vec![7u8; 16 << 20]);
            let _ = session.send(big).await;
            let _ = tx.send(session.flush().await);
            drop(session);
        }
    });
    let server = TestServer::start(server).await;
    let client = server.connect("/stuck").await; // never reads
    match report(&mut reports, "flush to give up").await {
        Err(err) => assert!(err.is_closed(), "expected Error::Closed, got {err:?}"),
        Ok(()) => panic!("flush said 16 MiB reached a client that read nothing"),
    }
    drop(client);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// What the handler knows
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Seen {
    path: String,
    query: Option<String>,
    room: Option<String>,
    name: Option<String>,
    header: Option<String>,
    peer: Option<SocketAddr>,
}

#[tokio::test]
async fn handler_sees_path_query_headers_and_peer_address() {
    let (tx, mut reports) = unbounded_channel();
    // A session keeps only the headers named here (the hook sees them all).
    let keep = Server::DEFAULT_SESSION_HEADERS
        .into_iter()
        .chain([http::HeaderName::from_static("x-client")]);
    let server = Server::new().session_headers(keep);
    let server = server.route("/info", move |session: Session| {
        let request = session.request();
        let _ = tx.send(Seen {
            path: request.path().to_owned(),
            query: request.query().map(str::to_owned),
            room: request.query_param("room"),
            name: request.query_param("name"),
            header: request.header("x-client").map(str::to_owned),
            peer: request.peer_addr(),
        });
        async {}
    });
    let server = TestServer::start(server).await;

    let tcp = TcpStream::connect(server.addr()).await.expect("connect");
    let client_addr = tcp.local_addr().expect("client address");
    let mut request = server
        .url("/info?room=lobby&name=ann%20b")
        .into_client_request()
        .expect("a valid request");
    request
        .headers_mut()
        .insert("x-client", "integration-test".parse().unwrap());
    let (mut ws, _) = within("the upgrade", tokio_tungstenite::client_async(request, tcp))
        .await
        .expect("upgrade");

    let seen = report(&mut reports, "the request info").await;
    assert_eq!(seen.path, "/info");
    assert_eq!(seen.query.as_deref(), Some("room=lobby&name=ann%20b"));
    assert_eq!(seen.room.as_deref(), Some("lobby"));
    assert_eq!(seen.name.as_deref(), Some("ann b"));
    assert_eq!(seen.header.as_deref(), Some("integration-test"));
    assert_eq!(seen.peer, Some(client_addr));
    // The handler has returned: the session closes; answer it.
    while let Some(Ok(_)) = within("the end of the connection", ws.next()).await {}
    server.shutdown().await;
}

#[tokio::test]
async fn every_session_has_its_own_id() {
    let server = Server::new().route("/id", |mut session| async move {
        assert_eq!(session.outgoing().session_id(), session.id());
        session.send(session.id().to_string()).await?;
        while session.recv().await.is_some() {}
        Ok::<_, Error>(())
    });
    let server = TestServer::start(server).await;
    // All open at once, so no id could be reused from a closed session.
    let mut clients = Vec::new();
    let mut ids = HashSet::new();
    for _ in 0..3 {
        let mut client = server.connect("/id").await;
        let id = client.recv_text().await;
        assert!(ids.insert(id.clone()), "id {id} given to two sessions");
        clients.push(client);
    }
    for client in &mut clients {
        client.close(None).await;
    }
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Pings
// ---------------------------------------------------------------------------

fn fast_pings() -> Config {
    Config::default()
        .ping_period(Some(Duration::from_millis(100)))
        .timeout(Duration::from_millis(250))
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let (server, _reports) = echo_server(fast_pings()).await;
    let mut client = server.connect("/echo").await;
    // tungstenite answers each ping on its next read. Six pings span more
    // than twice the pong timeout, so unanswered pings would have closed it.
    let mut pings = 0;
    while pings < 6 {
        match client.next_frame().await {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected only pings while idle, got {other:?}"),
        }
    }
    client.send("still here").await;
    client.expect_text("still here").await;
    client.close(None).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_with_1011() {
    let (server, mut reports) = echo_server(fast_pings()).await;
    let mut client = RawClient::upgrade(server.addr(), "/echo").await;
    let (code, reason, pings) = client.expect_close().await;
    assert!(pings >= 1, "the server closed before it pinged");
    assert_eq!((code, reason.as_str()), (1011, "ping timeout"));
    // Failing the connection: no closing handshake follows.
    assert!(
        client.next_frame().await.is_none(),
        "expected end of stream"
    );
    let reported = reported_reason(&mut reports).await;
    assert_eq!(
        (u16::from(reported.code), reported.reason.as_str()),
        (1011, "ping timeout")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn ping_period_and_timeout_can_be_set_for_one_session_at_runtime() {
    let (tx, mut reports) = unbounded_channel();
    let config = Config::default().ping_period(None);
    let server = Server::new().route_with_config("/ping", config, move |mut session| {
        let tx = tx.clone();
        async move {
            let before = session.ping_period();
            session.set_ping_period(Some(Duration::from_millis(100)));
            session.set_timeout(Duration::from_millis(200));
            let after = (session.ping_period(), session.timeout());
            while session.recv().await.is_some() {}
            let _ = tx.send((before, after, session.close_reason()));
        }
    });
    let server = TestServer::start(server).await;
    let mut client = RawClient::upgrade(server.addr(), "/ping").await;
    // With pings off in the route's config, only the runtime change can ping
    // this client and time it out.
    let (code, reason, pings) = client.expect_close().await;
    assert!(pings >= 1, "the server closed before it pinged");
    assert_eq!((code, reason.as_str()), (1011, "ping timeout"));
    let (before, after, reason) = report(&mut reports, "the handler's settings").await;
    assert_eq!(before, None);
    assert_eq!(
        after,
        (Some(Duration::from_millis(100)), Duration::from_millis(200))
    );
    assert_eq!(reason.map(|r| u16::from(r.code)), Some(1011));
    server.shutdown().await;
}

#[tokio::test]
async fn ping_period_set_while_the_outgoing_queue_is_full_still_takes_effect() {
    let (tx, mut reports) = unbounded_channel();
    let config = Config::default().ping_period(None).outgoing_capacity(1);
    let server = Server::new().route_with_config("/busy", config, move |mut session| {
        let tx = tx.clone();
        async move {
            // The client reads nothing yet: fill its socket until a send has
            // waited 200 ms, i.e. the send task is stuck and the queue is full.
            let chunk = Message::text("x".repeat(256 << 10));
            while tokio::time::timeout(Duration::from_millis(200), session.send(chunk.clone()))
                .await
                .is_ok()
            {}
            session.set_ping_period(Some(Duration::from_millis(100)));
            session.set_timeout(Duration::from_millis(200));
            let _ = tx.send(());
            while session.recv().await.is_some() {}
        }
    });
    let server = TestServer::start(server).await;
    let mut client = RawClient::upgrade(server.addr(), "/busy").await;
    report(
        &mut reports,
        "the handler to fill the queue and set a ping period",
    )
    .await;

    // Read the backlog, then expect the pings the handler asked for.
    let first_ping = async {
        loop {
            match client.reader.next_frame().await {
                Some(ServerFrame {
                    opcode: TEXT | CONTINUATION,
                    ..
                }) => continue,
                Some(ServerFrame { opcode: PING, .. }) => return,
                other => panic!("expected data or a ping, got {other:?}"),
            }
        }
    };
    if tokio::time::timeout(WAIT, first_ping).await.is_err() {
        panic!("no ping within {WAIT:?}: set_ping_period(100 ms) was lost");
    }
    let (code, reason, _) = client.expect_close().await;
    assert_eq!((code, reason.as_str()), (1011, "ping timeout"));
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Raw mode
// ---------------------------------------------------------------------------

#[tokio::test]
async fn raw_route_hands_pings_pongs_and_the_close_frame_to_the_handler() {
    let (tx, mut reports) = unbounded_channel();
    let server = Server::new().raw_route("/raw", move |mut session| {
        let tx = tx.clone();
        async move {
            assert!(session.is_raw());
            let mut seen = Vec::new();
            while let Some(msg) = session.recv().await {
                seen.push(msg);
            }
            let _ = tx.send((seen, session.close_reason()));
        }
    });
    let server = TestServer::start(server).await;
    let mut client = server.connect("/raw").await;

    client.send(Message::Ping("p1".into())).await;
    // tungstenite still answers pings in raw mode, as RFC 6455 requires.
    match client.next_frame().await {
        Some(Ok(Message::Pong(payload))) => assert_eq!(&payload[..], b"p1"),
        other => panic!("expected the pong for p1, got {other:?}"),
    }
    client.send(Message::Pong("p2".into())).await;
    client.send("text").await;
    client.close(Some(close_reason(4002, "raw bye"))).await;

    let (seen, reason) = report(&mut reports, "what the raw handler saw").await;
    assert_eq!(
        seen,
        vec![
            Message::Ping("p1".into()),
            Message::Pong("p2".into()),
            Message::text("text"),
            Message::Close(Some(close_reason(4002, "raw bye"))),
        ]
    );
    assert_eq!(reason, Some(close_reason(4002, "raw bye")));
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Chat {
    user: String,
    text: String,
}

fn chat(user: &str, text: &str) -> Chat {
    Chat {
        user: user.to_owned(),
        text: text.to_owned(),
    }
}

#[tokio::test]
async fn json_round_trips_and_bad_json_leaves_the_session_usable() {
    let (tx, mut reports) = unbounded_channel();
    let server = Server::new().route("/json", move |mut session| {
        let tx = tx.clone();
        async move {
            loop {
                match session.receive_json::<Chat>().await {
                    Ok(msg) => session.send_json(&chat("server", &msg.text)).await?,
                    Err(err) if err.is_json() => session.send(format!("error: {err}")).await?,
                    Err(err) => {
                        // Once closed, it stays closed.
                        let again = session.receive_json::<Chat>().await.unwrap_err();
                        let _ = tx.send((err, again));
                        return Ok::<_, Error>(());
                    }
                }
            }
        }
    });
    let server = TestServer::start(server).await;
    let mut client = server.connect("/json").await;

    let hello = serde_json::to_string(&chat("ann", "hello")).unwrap();
    client.send(hello).await;
    let reply: Chat = serde_json::from_str(&client.recv_text().await).expect("a JSON reply");
    assert_eq!(reply, chat("server", "hello"));

    client.send("{not json").await;
    let error = client.recv_text().await;
    assert!(
        error.starts_with("error: invalid JSON: ") && error.contains("line 1 column"),
        "unclear error: {error}"
    );
    client.send(r#"{"user":"ann"}"#).await;
    let error = client.recv_text().await;
    assert!(
        error.contains("missing field `text`"),
        "unclear error: {error}"
    );

    client.send(r#"{"user":"ann","text":"still here"}"#).await;
    let reply: Chat = serde_json::from_str(&client.recv_text().await).expect("a JSON reply");
    assert_eq!(reply, chat("server", "still here"));

    client
        .close(Some(close_reason(CloseCode::Normal, "done")))
        .await;
    let (first, again) = report(&mut reports, "receive_json's error after close").await;
    for err in [first, again] {
        match err {
            Error::Closed(Some(reason)) => assert_eq!(code(&reason), 1000),
            other => panic!("expected Error::Closed with the reason, got {other:?}"),
        }
    }
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Outgoing handles
// ---------------------------------------------------------------------------

#[tokio::test]
async fn outgoing_sends_from_another_task_and_as_a_sink() {
    let (tx, mut reports) = unbounded_channel();
    let server = Server::new().route("/outgoing", move |mut session| {
        let tx = tx.clone();
        async move {
            let out = session.outgoing();
            let kept = session.outgoing();
            let sender = tokio::spawn(async move {
                out.send("from another task").await?;
                out.send_json(&chat("task", "json")).await?;
                let mut sink = Box::pin(out.into_sink());
                sink.send(Message::text("through a sink")).await?;
                sink.close().await
            });
            sender.await.expect("the sending task panicked")?;
            while session.recv().await.is_some() {}
            // A handle that outlives the connection learns it is closed.
            let _ = tx.send(kept.send("too late").await);
            Ok::<_, Error>(())
        }
    });
    let server = TestServer::start(server).await;
    let mut client = server.connect("/outgoing").await;
    client.expect_text("from another task").await;
    let json: Chat = serde_json::from_str(&client.recv_text().await).expect("JSON");
    assert_eq!(json, chat("task", "json"));
    client.expect_text("through a sink").await;
    client.close(None).await;
    match report(&mut reports, "a send after close").await {
        Err(err) => assert!(err.is_closed(), "expected Error::Closed, got {err:?}"),
        Ok(()) => panic!("a send after close must fail"),
    }
    server.shutdown().await;
}

/// Three tasks share one session's small outgoing queue while the client
/// reads: every sender finishes and every message arrives, each sender's in
/// order. (With a hand-made wake-up that let one waiting sender in per
/// *full-to-not-full* change, the send task's several pops in a row woke only
/// one of the waiting senders, and the others waited for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_on_a_small_outgoing_queue_all_finish_and_nothing_is_lost() {
    const SENDERS: usize = 3;
    const EACH: usize = 200;
    let server = Server::new().route_with_config(
        "/many",
        Config::default().outgoing_capacity(4).max_batch(8),
        |mut session| async move {
            let senders: Vec<_> = (0..SENDERS)
                .map(|s| {
                    let out = session.outgoing();
                    tokio::spawn(async move {
                        for i in 0..EACH {
                            out.send(format!("{s}:{i}")).await?;
                        }
                        Ok::<_, Error>(())
                    })
                })
                .collect();
            for sender in senders {
                within("every sender to finish", sender)
                    .await
                    .expect("a sender panicked")?;
            }
            session.send("done").await?;
            while session.recv().await.is_some() {}
            Ok::<_, Error>(())
        },
    );
    let server = TestServer::start(server).await;
    let mut client = server.connect("/many").await;
    let mut next = [0usize; SENDERS];
    for _ in 0..SENDERS * EACH {
        let text = client.recv_text().await;
        let (s, i) = text.split_once(':').expect("sender:index");
        let (s, i): (usize, usize) = (s.parse().unwrap(), i.parse().unwrap());
        assert_eq!(i, next[s], "sender {s}'s messages arrive in order");
        next[s] += 1;
    }
    client.expect_text("done").await;
    assert_eq!(next, [EACH; SENDERS]);
    client.close(None).await;
    server.shutdown().await;
}

/// Once the server has sent its Close, nothing the client sends is published:
/// a client that ignores the Close and keeps talking reaches nobody.
#[tokio::test]
async fn join_publishes_nothing_a_client_sends_after_the_servers_close() {
    let hub = Hub::new();
    let (ended, mut ends) = unbounded_channel();
    let server = Server::new()
        .route("/closing", {
            let hub = hub.clone();
            move |mut session| {
                let (hub, ended) = (hub.clone(), ended.clone());
                async move {
                    let subscription = hub.subscribe();
                    // Closed before it joins, from another handle, as a
                    // moderation task or a policy would.
                    session
                        .outgoing()
                        .close(close_reason(CloseCode::Policy, "banned"));
                    let reason = session.join(subscription).await;
                    let _ = ended.send(reason);
                }
            }
        })
        .route("/observe", {
            let hub = hub.clone();
            move |mut session| {
                let hub = hub.clone();
                async move {
                    let subscription = hub.subscribe();
                    session.send("ready").await?;
                    session.join(subscription).await;
                    Ok::<_, Error>(())
                }
            }
        });
    let server = TestServer::start(server).await;
    let mut observer = server.connect("/observe").await;
    observer.expect_text("ready").await;

    let mut talker = RawClient::upgrade(server.addr(), "/closing").await;
    let (sent, why, _) = talker.expect_close().await;
    assert_eq!((sent, why.as_str()), (1008, "banned"));
    for i in 0..20 {
        talker.send(Frame::text(format!("after close {i}"))).await;
    }
    talker.send(Frame::new(CLOSE, 1000u16.to_be_bytes())).await;
    let reason = report(&mut ends, "the closed session to end").await;
    assert_eq!(code(&reason), 1008, "{reason:?}");

    // Everything the closed session read has been dealt with; the next thing
    // the observer sees must be this, not one of the talker's messages.
    let _ = hub.publish("marker").await.unwrap();
    observer.expect_text("marker").await;
    observer.close(None).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// What the handler's return value means
// ---------------------------------------------------------------------------

#[tokio::test]
async fn handler_error_closes_with_1011_and_normal_return_with_1000() {
    let server = Server::new()
        .route("/fails", |mut session| async move {
            let _ = session.recv().await;
            Err::<(), _>("the handler gave up")
        })
        .route("/returns", |mut session| async move {
            let _ = session.recv().await;
        });
    let server = TestServer::start(server).await;

    let mut client = server.connect("/fails").await;
    client.send("go").await;
    let reason = client.expect_close().await.expect("a close code");
    assert_eq!(code(&reason), 1011, "{reason:?}");
    read_to_end(&mut client).await;

    let mut client = server.connect("/returns").await;
    client.send("go").await;
    let reason = client.expect_close().await.expect("a close code");
    assert_eq!(code(&reason), 1000, "{reason:?}");
    read_to_end(&mut client).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Embedding: Session::from_upgraded over a connection upgraded elsewhere
// ---------------------------------------------------------------------------

#[tokio::test]
async fn from_upgraded_over_an_in_memory_duplex_joins_a_hub() {
    let hub = Hub::new();
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;

    let mut session =
        Session::from_upgraded(server_io, Request::unknown(), &Config::default()).await;
    let subscription = hub.subscribe();
    let mut watcher = hub.subscribe();
    let joined = tokio::spawn(async move { session.join(subscription).await });

    assert_eq!(hub.publish("news").await, Ok(Published::Queued));
    let got = within("the hub message", client.next()).await;
    assert_eq!(
        got.expect("a message").expect("no error"),
        Message::text("news")
    );

    client.send(Message::text("from the client")).await.unwrap();
    assert_eq!(
        within("news", watcher.recv()).await.unwrap(),
        Message::text("news")
    );
    assert_eq!(
        within("the client's message on the hub", watcher.recv())
            .await
            .unwrap(),
        Message::text("from the client")
    );

    client
        .close(Some(close_reason(4003, "done")))
        .await
        .unwrap();
    while let Some(Ok(_)) = within("the end of the connection", client.next()).await {}
    let reason = within("join() to return", joined).await.unwrap();
    assert_eq!(reason, close_reason(4003, "done"));
}

/// The embedding path the README shows: a plain hyper server answers the
/// upgrade itself and hands the upgraded connection to wshub.
#[tokio::test]
async fn from_upgraded_behind_a_hyper_server_joins_a_hub() {
    use http_body_util::Empty;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use wshub::tungstenite::handshake::derive_accept_key;

    let hub = Hub::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut reports) = unbounded_channel();
    let serve_one = {
        let hub = hub.clone();
        async move {
            let (tcp, peer) = listener.accept().await.expect("accept");
            let service = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                let (hub, tx) = (hub.clone(), tx.clone());
                async move {
                    let key = req.headers()["sec-websocket-key"].clone();
                    let on_upgrade = hyper::upgrade::on(&mut req);
                    let request = Request::new(req, Some(peer));
                    tokio::spawn(async move {
                        let upgraded = on_upgrade.await.expect("the upgrade");
                        let io = TokioIo::new(upgraded);
                        let mut session =
                            Session::from_upgraded(io, request, &Config::default()).await;
                        // Subscribe before the greeting, so nothing published after it is missed.
                        let subscription = hub.subscribe();
                        let peer = session.request().peer_addr().expect("the peer address");
                        let _ = session.send(format!("welcome, {peer}")).await;
                        let _ = tx.send(session.join(subscription).await);
                    });
                    let response = http::Response::builder()
                        .status(http::StatusCode::SWITCHING_PROTOCOLS)
                        .header(http::header::CONNECTION, "upgrade")
                        .header(http::header::UPGRADE, "websocket")
                        .header(
                            http::header::SEC_WEBSOCKET_ACCEPT,
                            derive_accept_key(key.as_bytes()),
                        )
                        .body(Empty::<wshub::Bytes>::new())
                        .expect("a response");
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
        }
    };
    tokio::spawn(serve_one);

    let (mut client, _) = within(
        "the upgrade",
        tokio_tungstenite::connect_async(format!("ws://{addr}/")),
    )
    .await
    .expect("upgrade");
    let client_addr = client.get_ref().get_ref().local_addr().unwrap();
    let greeting = within("the greeting", client.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, Message::text(format!("welcome, {client_addr}")));

    assert_eq!(hub.publish("news").await, Ok(Published::Queued));
    let got = within("the hub message", client.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::text("news"));

    client.close(None).await.unwrap();
    while let Some(Ok(_)) = within("the end of the connection", client.next()).await {}
    let reason = report(&mut reports, "join() to return").await;
    assert_eq!(reason.code, CloseCode::Status);
}

#[tokio::test]
async fn dropping_an_embedded_session_writes_what_is_queued_then_closes_with_1000() {
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
    let session = Session::from_upgraded(server_io, Request::unknown(), &Config::default()).await;
    session.send("goodbye").await.unwrap();
    drop(session);

    let got = within("the queued message", client.next()).await;
    assert_eq!(got.unwrap().unwrap(), Message::text("goodbye"));
    match within("the Close frame", client.next()).await {
        Some(Ok(Message::Close(Some(reason)))) => assert_eq!(code(&reason), 1000),
        other => panic!("expected Close 1000, got {other:?}"),
    }
    while let Some(Ok(_)) = within("the end of the connection", client.next()).await {}
}
