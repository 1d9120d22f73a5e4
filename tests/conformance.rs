//! RFC 6455 server duties, checked with raw TCP clients: hand-written HTTP
//! upgrade requests and hand-built (masked) frames, no WebSocket library on the
//! client side. Each test sends what a conforming or misbehaving client would
//! and asserts what the RFC says the server must answer: the handshake status,
//! echoed (reassembled) messages, pongs, and the Close code it fails the
//! connection with (1002, 1007, 1009) followed by the server closing TCP.

mod common;

use common::{WAIT, client_frame, frame_header, within};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wshub::testing::TestServer;
use wshub::{Config, Server, Session};

/// The example key from RFC 6455 §1.3 and the accept value it must produce.
const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A server whose `/echo` route echoes every message back.
fn echo_server() -> Server {
    echo_route(Server::new())
}

/// `server` with the `/echo` route added.
fn echo_route(server: Server) -> Server {
    server.route("/echo", |mut session: Session| async move {
        while let Some(msg) = session.recv().await {
            if session.send(msg).await.is_err() {
                break;
            }
        }
    })
}

/// An echo server with these frame and message limits.
async fn limited_echo(max_frame: usize, max_message: usize) -> TestServer {
    let config = Config::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_frame));
    TestServer::start(echo_route(Server::new().config(config))).await
}

/// An HTTP/1.1 request with a Host header and these extra header lines.
fn request(method: &str, path: &str, headers: &[&str]) -> String {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for line in headers {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text
}

/// The header lines of a valid upgrade request.
const UPGRADE: [&str; 4] = [
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
];

/// `UPGRADE` with the header lines starting with `name` left out.
fn upgrade_without(name: &str) -> Vec<&'static str> {
    UPGRADE
        .into_iter()
        .filter(|line| !line.starts_with(name))
        .collect()
}

/// Reads a response head up to and including the blank line, byte by byte so
/// nothing after it is consumed.
async fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read_u8().await {
            Ok(byte) => head.push(byte),
            Err(err) => panic!(
                "connection ended before the response head ({err}); got {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8(head).expect("an ASCII response head")
}

/// The value of header `name` in `head` (case-insensitive name).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The status code of a response head.
fn status(head: &str) -> u16 {
    head.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {head:?}"))
}

/// Sends `request` on a new connection; returns the status, head and body.
async fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    within("the HTTP response", async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(request.as_bytes()).await.expect("write");
        let head = read_head(&mut tcp).await;
        let length: usize = header(&head, "content-length")
            .map(|v| v.parse().expect("a numeric Content-Length"))
            .unwrap_or(0);
        let mut body = vec![0; length];
        tcp.read_exact(&mut body).await.expect("the response body");
        let body = String::from_utf8(body).expect("a UTF-8 body");
        (status(&head), head, body)
    })
    .await
}

/// Opens a WebSocket on `path` by hand: a valid upgrade request, then the 101
/// response head (asserted).
async fn handshake(addr: SocketAddr, path: &str) -> TcpStream {
    within("the WebSocket handshake", async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(request("GET", path, &UPGRADE).as_bytes())
            .await
            .expect("write the upgrade request");
        let head = read_head(&mut tcp).await;
        assert_eq!(
            status(&head),
            101,
            "expected 101 Switching Protocols: {head:?}"
        );
        tcp
    })
    .await
}

/// The bytes of one client frame: `rsv` is the three RSV bits (0..=7), the
/// payload is masked with [`common::MASK`] when `masked`.
fn frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let first = (u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0xF);
    client_frame(first, payload, masked)
}

/// Writes one client frame (see [`frame`]).
async fn send_frame(
    tcp: &mut TcpStream,
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: &[u8],
    masked: bool,
) {
    tcp.write_all(&frame(fin, rsv, opcode, payload, masked))
        .await
        .expect("write a frame");
}

/// Writes one final, masked frame: what a well-behaved client sends.
async fn send(tcp: &mut TcpStream, opcode: u8, payload: &[u8]) {
    send_frame(tcp, true, 0, opcode, payload, true).await;
}

/// Reads one server frame: `(fin, opcode, payload)`, or `None` once the
/// connection has ended. Server frames must not be masked.
async fn read_frame(tcp: &mut TcpStream) -> Option<(bool, u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    tcp.read_exact(&mut head).await.ok()?;
    assert_eq!(
        head[0] & 0x70,
        0,
        "server frame with RSV bits set: {head:02x?}"
    );
    assert_eq!(head[1] & 0x80, 0, "server frame is masked: {head:02x?}");
    let len = match head[1] & 0x7F {
        126 => u64::from(tcp.read_u16().await.ok()?),
        127 => tcp.read_u64().await.ok()?,
        len => u64::from(len),
    };
    assert!(
        len <= 1 << 20,
        "server frame of {len} bytes, unexpected in these tests"
    );
    let mut payload = vec![0; len as usize];
    tcp.read_exact(&mut payload).await.ok()?;
    Some((head[0] & 0x80 != 0, head[0] & 0xF, payload))
}

/// The next server frame, failing the test if the connection ends first.
async fn next_frame(tcp: &mut TcpStream, what: &str) -> (bool, u8, Vec<u8>) {
    within(what, read_frame(tcp))
        .await
        .unwrap_or_else(|| panic!("the connection ended while waiting for {what}"))
}

/// Expects an echoed message: one final frame of this opcode and payload.
async fn expect_message(tcp: &mut TcpStream, opcode: u8, payload: &[u8]) {
    let got = next_frame(tcp, "the echoed message").await;
    assert_eq!(
        got,
        (true, opcode, payload.to_vec()),
        "expected one final frame with opcode {opcode:#x} and payload {:?}",
        String::from_utf8_lossy(payload)
    );
}

/// Reads until the connection ends, failing if it stays open past [`WAIT`].
/// Returns what was read (nothing, if the server closed cleanly).
async fn expect_tcp_close(tcp: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    let started = Instant::now();
    loop {
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(WAIT, tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return rest,
            Ok(Ok(n)) => rest.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the server did not close the TCP connection within {:?} of its Close frame",
                started.elapsed()
            ),
        }
    }
}

/// The status code of a Close frame's payload.
fn close_code(payload: &[u8]) -> u16 {
    assert!(
        payload.len() >= 2,
        "Close frame without a 2-byte status code: {payload:02x?}"
    );
    u16::from_be_bytes([payload[0], payload[1]])
}

/// Reads frames until a Close frame, asserts its status code is `code`,
/// answers it as a conforming client would, then asserts the server closes
/// the TCP connection with nothing more on it.
async fn expect_close(tcp: &mut TcpStream, code: u16) {
    let mut before = Vec::new();
    let payload = loop {
        match within("the server's Close frame", read_frame(tcp)).await {
            Some((_, CLOSE, payload)) => break payload,
            Some(other) => before.push(other),
            None => panic!(
                "the connection ended without a Close frame (expected {code}); frames before: {before:?}"
            ),
        }
    };
    assert_eq!(
        close_code(&payload),
        code,
        "wrong close code; Close payload {:?}, frames before: {before:?}",
        String::from_utf8_lossy(&payload)
    );
    // The closing handshake: echo the code (the server may already be gone).
    let _ = tcp
        .write_all(&frame(true, 0, CLOSE, &code.to_be_bytes(), true))
        .await;
    let rest = expect_tcp_close(tcp).await;
    assert!(rest.is_empty(), "bytes after the Close frame: {rest:02x?}");
}

/// Ends the connection as a conforming client: sends Close 1000, expects the
/// server's Close answer, then the server closing TCP.
async fn client_close(tcp: &mut TcpStream) {
    send(tcp, CLOSE, &1000u16.to_be_bytes()).await;
    let (_, opcode, payload) = next_frame(tcp, "the Close answer").await;
    assert_eq!(
        opcode, CLOSE,
        "expected a Close answer, got opcode {opcode:#x}: {payload:02x?}"
    );
    let rest = expect_tcp_close(tcp).await;
    assert!(rest.is_empty(), "bytes after the Close answer: {rest:02x?}");
}

/// Opens an echo connection, writes `bytes`, and expects Close `code`.
async fn expect_failure(bytes: &[u8], code: u16) {
    let server = TestServer::start(echo_server()).await;
    let mut tcp = handshake(server.addr(), "/echo").await;
    tcp.write_all(bytes).await.expect("write");
    expect_close(&mut tcp, code).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 1. Opening handshake (§4.2)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn handshake_refusals_and_the_rfc_accept_key() {
    let server = TestServer::start(echo_server()).await;
    let addr = server.addr();

    let (code, head, body) = http(
        addr,
        &request("GET", "/echo", &upgrade_without("Sec-WebSocket-Key")),
    )
    .await;
    assert_eq!(code, 400, "missing Sec-WebSocket-Key: {head:?}");
    assert!(!body.is_empty(), "the 400 for a missing key has no body");

    for key in ["dGhlIHNhbXBsZQ==", "not base64!!", "c2hvcnQ="] {
        let mut headers: Vec<&str> = upgrade_without("Sec-WebSocket-Key");
        let line = format!("Sec-WebSocket-Key: {key}");
        headers.push(&line);
        let (code, head, _) = http(addr, &request("GET", "/echo", &headers)).await;
        assert_eq!(code, 400, "key {key:?} is not 16 bytes of base64: {head:?}");
    }

    let mut headers = upgrade_without("Sec-WebSocket-Version");
    headers.push("Sec-WebSocket-Version: 8");
    let (code, head, _) = http(addr, &request("GET", "/echo", &headers)).await;
    assert_eq!(code, 426, "version 8: {head:?}");
    assert_eq!(
        header(&head, "sec-websocket-version"),
        Some("13"),
        "426 must name the supported version: {head:?}"
    );

    let (code, head, _) = http(addr, &request("POST", "/echo", &UPGRADE)).await;
    assert_eq!(code, 400, "POST: {head:?}");

    for missing in ["Upgrade", "Connection"] {
        let (code, head, body) =
            http(addr, &request("GET", "/echo", &upgrade_without(missing))).await;
        assert_eq!(code, 400, "missing {missing} header: {head:?}");
        assert!(
            !body.is_empty(),
            "the 400 for a missing {missing} header has no body"
        );
    }

    let mut tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    tcp.write_all(request("GET", "/echo", &UPGRADE).as_bytes())
        .await
        .expect("write");
    let head = within("the 101 response", read_head(&mut tcp)).await;
    assert_eq!(status(&head), 101, "{head:?}");
    assert_eq!(
        header(&head, "sec-websocket-accept"),
        Some(RFC_ACCEPT),
        "RFC key {RFC_KEY}: {head:?}"
    );
    drop(tcp);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 2-4. Framing errors (§5.1, §5.2)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unmasked_client_frame_is_closed_with_1002() {
    expect_failure(&frame(true, 0, TEXT, b"hello", false), 1002).await;
}

#[tokio::test]
async fn rsv_bits_without_an_extension_are_closed_with_1002() {
    for rsv in [0b100, 0b010, 0b001] {
        expect_failure(&frame(true, rsv, TEXT, b"hello", true), 1002).await;
    }
}

#[tokio::test]
async fn reserved_opcodes_are_closed_with_1002() {
    for opcode in [0x3, 0xB] {
        expect_failure(&frame(true, 0, opcode, b"x", true), 1002).await;
    }
}

// ---------------------------------------------------------------------------
// 5-6. Fragmentation (§5.4)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn fragmented_messages_are_reassembled() {
    let server = TestServer::start(echo_server()).await;
    let mut tcp = handshake(server.addr(), "/echo").await;

    send_frame(&mut tcp, false, 0, TEXT, b"Hel", true).await;
    send_frame(&mut tcp, false, 0, CONTINUATION, b"lo, ", true).await;
    send_frame(&mut tcp, true, 0, CONTINUATION, b"world", true).await;
    expect_message(&mut tcp, TEXT, b"Hello, world").await;

    send_frame(&mut tcp, false, 0, BINARY, &[0, 1], true).await;
    send_frame(&mut tcp, false, 0, CONTINUATION, &[2, 0xFF], true).await;
    send_frame(&mut tcp, true, 0, CONTINUATION, &[0x80], true).await;
    expect_message(&mut tcp, BINARY, &[0, 1, 2, 0xFF, 0x80]).await;

    // "€" is E2 82 AC: split after its first byte.
    let euro = "price: €5".as_bytes();
    let split = euro.iter().position(|&b| b == 0xE2).expect("the euro sign") + 1;
    send_frame(&mut tcp, false, 0, TEXT, &euro[..split], true).await;
    send_frame(&mut tcp, true, 0, CONTINUATION, &euro[split..], true).await;
    expect_message(&mut tcp, TEXT, euro).await;

    client_close(&mut tcp).await;
    server.shutdown().await;
}

#[tokio::test]
async fn ping_between_fragments_is_answered_and_the_message_still_reassembled() {
    let server = TestServer::start(echo_server()).await;
    let mut tcp = handshake(server.addr(), "/echo").await;

    send_frame(&mut tcp, false, 0, TEXT, b"frag", true).await;
    send(&mut tcp, PING, b"in between").await;
    send_frame(&mut tcp, true, 0, CONTINUATION, b"mented", true).await;

    let mut frames = vec![
        next_frame(&mut tcp, "the pong or the echo").await,
        next_frame(&mut tcp, "the pong or the echo").await,
    ];
    frames.sort_by_key(|(_, opcode, _)| *opcode);
    assert_eq!(
        frames,
        vec![
            (true, TEXT, b"fragmented".to_vec()),
            (true, PONG, b"in between".to_vec())
        ],
        "expected the reassembled echo and a pong with the ping's payload"
    );
    client_close(&mut tcp).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 7. Control frames (§5.5)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn control_frame_over_125_bytes_is_closed_with_1002() {
    expect_failure(&frame(true, 0, PING, &[b'x'; 126], true), 1002).await;
}

#[tokio::test]
async fn fragmented_control_frame_is_closed_with_1002() {
    expect_failure(&frame(false, 0, PING, b"abc", true), 1002).await;
}

// ---------------------------------------------------------------------------
// 8. UTF-8 (§5.6, §8.1)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn invalid_utf8_text_is_closed_with_1007() {
    expect_failure(&frame(true, 0, TEXT, b"bad \xFF byte", true), 1007).await;
}

#[tokio::test]
async fn invalid_utf8_across_fragments_is_closed_with_1007() {
    // A sequence cut off at the end of the final fragment.
    let mut truncated = frame(false, 0, TEXT, b"ok so far ", true);
    truncated.extend(frame(true, 0, CONTINUATION, b"then \xE2\x82", true));
    expect_failure(&truncated, 1007).await;

    // A byte that can never appear in UTF-8, in the second fragment.
    let mut invalid = frame(false, 0, TEXT, b"fine", true);
    invalid.extend(frame(true, 0, CONTINUATION, b"\xC0\xAF", true));
    expect_failure(&invalid, 1007).await;
}

// ---------------------------------------------------------------------------
// 9. Limits (§10.4)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn frame_over_max_frame_size_is_closed_with_1009() {
    let server = limited_echo(1024, 64 * 1024).await;
    let mut tcp = handshake(server.addr(), "/echo").await;
    send(&mut tcp, BINARY, &[7; 1024]).await;
    expect_message(&mut tcp, BINARY, &[7; 1024]).await;
    send(&mut tcp, BINARY, &[7; 1025]).await;
    expect_close(&mut tcp, 1009).await;
    server.shutdown().await;
}

#[tokio::test]
async fn message_over_max_message_size_from_small_fragments_is_closed_with_1009() {
    let server = limited_echo(1024, 4096).await;
    let mut tcp = handshake(server.addr(), "/echo").await;
    // 8 fragments of 1000 bytes: each frame fits, the message does not.
    let mut bytes = frame(false, 0, BINARY, &[1; 1000], true);
    for i in 1..8 {
        bytes.extend(frame(i == 7, 0, CONTINUATION, &[1; 1000], true));
    }
    tcp.write_all(&bytes).await.expect("write");
    expect_close(&mut tcp, 1009).await;
    server.shutdown().await;
}

#[tokio::test]
async fn frame_header_declaring_2_gib_is_refused_at_once_with_1009() {
    let server = limited_echo(64 * 1024, 64 * 1024).await;
    let mut tcp = handshake(server.addr(), "/echo").await;
    let head = frame_header(0x82, 0x8000_0000, true);
    let started = Instant::now();
    tcp.write_all(&head).await.expect("write the header");
    let (_, opcode, payload) = next_frame(&mut tcp, "the Close for a 2 GiB frame header").await;
    let took = started.elapsed();
    assert_eq!(
        opcode, CLOSE,
        "expected a Close frame, got opcode {opcode:#x}"
    );
    assert_eq!(close_code(&payload), 1009, "Close payload {payload:02x?}");
    assert!(took < Duration::from_secs(2), "the Close took {took:?}");
    // The connection is failed: the server hangs up without the 2 GiB.
    let rest = expect_tcp_close(&mut tcp).await;
    assert!(rest.is_empty(), "bytes after the Close: {rest:02x?}");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 10. Close frames (§5.5.1, §7.4)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn valid_close_codes_are_answered_with_a_close() {
    let server = TestServer::start(echo_server()).await;
    for code in [1000u16, 3000, 4999] {
        let mut tcp = handshake(server.addr(), "/echo").await;
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        send(&mut tcp, CLOSE, &payload).await;
        let (fin, opcode, answer) = next_frame(&mut tcp, "the Close answer").await;
        assert_eq!(
            (fin, opcode),
            (true, CLOSE),
            "client Close {code}: expected a Close answer"
        );
        if !answer.is_empty() {
            let answered = close_code(&answer);
            assert!(
                answered == code || answered == 1000,
                "client Close {code} answered with {answered}"
            );
        }
        let rest = expect_tcp_close(&mut tcp).await;
        assert!(rest.is_empty(), "bytes after the Close answer: {rest:02x?}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_close_codes_are_closed_with_1002() {
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1100, 2999, 5000] {
        let bytes = frame(true, 0, CLOSE, &code.to_be_bytes(), true);
        let server = TestServer::start(echo_server()).await;
        let mut tcp = handshake(server.addr(), "/echo").await;
        tcp.write_all(&bytes).await.expect("write");
        let (_, opcode, payload) = next_frame(&mut tcp, "the Close answer").await;
        assert_eq!(
            opcode, CLOSE,
            "client Close {code}: expected a Close answer"
        );
        assert_eq!(
            close_code(&payload),
            1002,
            "client Close {code}: answered {payload:02x?}"
        );
        let rest = expect_tcp_close(&mut tcp).await;
        assert!(
            rest.is_empty(),
            "client Close {code}: bytes after the Close: {rest:02x?}"
        );
        server.shutdown().await;
    }
}

#[tokio::test]
async fn one_byte_close_payload_is_closed_with_1002() {
    let server = TestServer::start(echo_server()).await;
    let mut tcp = handshake(server.addr(), "/echo").await;
    send(&mut tcp, CLOSE, &[0x03]).await;
    let (_, opcode, payload) = next_frame(&mut tcp, "the Close answer").await;
    assert_eq!(opcode, CLOSE, "expected a Close answer");
    assert_eq!(close_code(&payload), 1002, "answered {payload:02x?}");
    let rest = expect_tcp_close(&mut tcp).await;
    assert!(rest.is_empty(), "bytes after the Close: {rest:02x?}");
    server.shutdown().await;
}

#[tokio::test]
async fn close_reason_that_is_not_utf8_is_closed_with_1007() {
    let server = TestServer::start(echo_server()).await;
    let mut tcp = handshake(server.addr(), "/echo").await;
    send(&mut tcp, CLOSE, b"\x03\xE8bad \xFF reason").await;
    let (_, opcode, payload) = next_frame(&mut tcp, "the Close answer").await;
    assert_eq!(opcode, CLOSE, "expected a Close answer");
    assert_eq!(close_code(&payload), 1007, "answered {payload:02x?}");
    let rest = expect_tcp_close(&mut tcp).await;
    assert!(rest.is_empty(), "bytes after the Close: {rest:02x?}");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 11-12. Ping and the end of the connection (§5.5.2, §5.5.1)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn ping_is_answered_with_a_pong_carrying_its_payload() {
    let server = TestServer::start(echo_server()).await;
    let mut tcp = handshake(server.addr(), "/echo").await;
    send(&mut tcp, PING, b"abc").await;
    let got = next_frame(&mut tcp, "the pong").await;
    assert_eq!(
        got,
        (true, PONG, b"abc".to_vec()),
        "expected a pong with payload \"abc\""
    );
    client_close(&mut tcp).await;
    server.shutdown().await;
}

/// Pings sent in the middle of a hub's stream: each pong comes back, with
/// its payload, before the messages published after the ping was answered,
/// and the stream loses nothing around them.
#[tokio::test]
async fn pings_amid_a_hub_stream_are_each_answered_in_order() {
    let hub = wshub::Hub::new();
    let route_hub = hub.clone();
    let server = TestServer::start(Server::new().route("/stream", move |mut session: Session| {
        let hub = route_hub.clone();
        async move {
            session.join(hub.subscribe()).await;
        }
    }))
    .await;
    let mut tcp = handshake(server.addr(), "/stream").await;
    within("the subscriber to join", async {
        while hub.subscriber_count() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let mut next = 0u32;
    let mut seen = 0u32;
    let text = |seen: &mut u32, got: &[u8]| {
        assert_eq!(got, seen.to_string().as_bytes(), "the stream out of order");
        *seen += 1;
    };
    for ping in 0..50u32 {
        // A burst, so that the pong meets frames the send task is writing.
        for _ in 0..20 {
            let published = hub.publish(next.to_string()).await;
            assert_eq!(published, Ok(wshub::Published::Queued));
            next += 1;
        }
        let payload = format!("ping {ping}");
        send(&mut tcp, PING, payload.as_bytes()).await;
        let mut texts = 0;
        loop {
            let (fin, opcode, got) = next_frame(&mut tcp, "the stream or the pong").await;
            assert!(fin, "a fragmented frame in the stream");
            match opcode {
                TEXT => {
                    text(&mut seen, &got);
                    texts += 1;
                }
                PONG => {
                    assert_eq!(got, payload.as_bytes(), "the pong's payload");
                    break;
                }
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
        assert!(
            texts <= 20,
            "{texts} messages of a 20-message burst before its pong"
        );
        // What the pong overtook comes after it, in order.
        for _ in texts..20 {
            let (_, opcode, got) = next_frame(&mut tcp, "the rest of the burst").await;
            assert_eq!(opcode, TEXT, "a second pong for one ping");
            text(&mut seen, &got);
        }
    }
    assert_eq!(seen, next, "every published message arrived");
    client_close(&mut tcp).await;
    server.shutdown().await;
}

/// A ping read while the server's write buffer is full: the pong cannot be
/// queued then, and still goes out once the client reads again, though the
/// client sends nothing more.
#[tokio::test]
async fn a_pong_held_back_by_a_full_buffer_goes_out_once_the_client_reads() {
    const MESSAGES: usize = 64;
    const SIZE: usize = 64 * 1024;
    let hub = wshub::Hub::with_config(wshub::HubConfig::default().capacity(MESSAGES)).unwrap();
    let (read_it, mut handler_read) = tokio::sync::mpsc::unbounded_channel();
    let route_hub = hub.clone();
    let config = Config::default()
        .write_buffer_size(16 * 1024)
        .send_timeout(WAIT * 4);
    let server = TestServer::start(Server::new().config(config).route(
        "/stream",
        move |mut session: Session| {
            let hub = route_hub.clone();
            let read_it = read_it.clone();
            async move {
                session
                    .outgoing()
                    .forward(hub.subscribe())
                    .await
                    .expect("forward the hub");
                while let Some(msg) = session.recv().await {
                    let _ = read_it.send(msg);
                }
            }
        },
    ))
    .await;
    // A 4 KiB receive buffer: the server's writes soon block.
    let mut tcp = common::upgrade_raw(server.addr(), "/stream", Some(4096)).await;
    within("the subscriber to join", async {
        while hub.subscriber_count() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    for i in 0..MESSAGES {
        let mut payload = vec![b'x'; SIZE];
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let published = hub.publish(bytes::Bytes::from(payload)).await;
        assert_eq!(published, Ok(wshub::Published::Queued));
    }
    // Far more than the buffers hold is queued: the ping's pong finds the
    // write buffer full. The text after it tells when the ping was read.
    send(&mut tcp, PING, b"held").await;
    send(&mut tcp, TEXT, b"after the ping").await;
    let read = within("the handler to read the text", handler_read.recv()).await;
    assert!(
        matches!(&read, Some(wshub::Message::Text(t)) if t.as_str() == "after the ping"),
        "the handler read {read:?}"
    );
    let mut data = 0;
    let mut pongs = Vec::new();
    while data < MESSAGES || pongs.is_empty() {
        let (_, opcode, payload) = next_frame(&mut tcp, "the stream and the pong").await;
        match opcode {
            BINARY => {
                assert_eq!(payload.len(), SIZE);
                assert_eq!(payload[..8], (data as u64).to_be_bytes(), "out of order");
                data += 1;
            }
            PONG => pongs.push(payload),
            other => panic!("unexpected opcode {other:#x}"),
        }
    }
    assert_eq!(
        pongs,
        vec![b"held".to_vec()],
        "exactly one pong, the ping's"
    );
    client_close(&mut tcp).await;
    server.shutdown().await;
}

/// Reads every frame until the server ends the connection:
/// `(opcode, payload)` pairs.
async fn frames_until_end(tcp: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while let Some((_, opcode, payload)) =
        within("the server to end the connection", read_frame(tcp)).await
    {
        frames.push((opcode, payload));
    }
    frames
}

/// Frames as `(opcode, payload as text)`, for assertion messages.
fn show(frames: &[(u8, Vec<u8>)]) -> Vec<(u8, String)> {
    frames
        .iter()
        .map(|(opcode, payload)| (*opcode, String::from_utf8_lossy(payload).into_owned()))
        .collect()
}

#[tokio::test]
async fn nothing_is_relayed_after_the_clients_close() {
    let server = TestServer::start(echo_server()).await;
    let mut tcp = handshake(server.addr(), "/echo").await;
    send(&mut tcp, TEXT, b"before").await;
    expect_message(&mut tcp, TEXT, b"before").await;

    // The Close and a text frame after it, in one write.
    let mut bytes = frame(true, 0, CLOSE, &1000u16.to_be_bytes(), true);
    bytes.extend(frame(true, 0, TEXT, b"after", true));
    tcp.write_all(&bytes).await.expect("write");

    let frames = frames_until_end(&mut tcp).await;
    let shown = show(&frames);
    assert!(
        !frames.iter().any(|(_, payload)| payload == b"after"),
        "the text sent after the Close was echoed: {shown:?}"
    );
    assert_eq!(
        frames,
        vec![(CLOSE, 1000u16.to_be_bytes().to_vec())],
        "expected only the Close answer (1000): {shown:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn text_close_text_in_one_write_echoes_the_first_and_nothing_after() {
    let server = TestServer::start(echo_server()).await;
    let mut tcp = handshake(server.addr(), "/echo").await;
    let mut bytes = frame(true, 0, TEXT, b"before", true);
    bytes.extend(frame(true, 0, CLOSE, &1000u16.to_be_bytes(), true));
    bytes.extend(frame(true, 0, TEXT, b"after", true));
    tcp.write_all(&bytes).await.expect("write");

    let frames = frames_until_end(&mut tcp).await;
    let shown = show(&frames);
    assert!(
        !frames.iter().any(|(_, payload)| payload == b"after"),
        "the text sent after the Close was echoed: {shown:?}"
    );
    assert_eq!(
        frames.len(),
        2,
        "expected the echo and a Close answer: {shown:?}"
    );
    assert_eq!(frames[0], (TEXT, b"before".to_vec()), "{shown:?}");
    assert_eq!(frames[1].0, CLOSE, "expected a Close answer: {shown:?}");
    server.shutdown().await;
}
