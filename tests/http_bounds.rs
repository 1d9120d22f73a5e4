//! Bounds on the server's HTTP phase, seen by raw TCP clients:
//!
//! * one deadline, `handshake_timeout`, for a connection's whole HTTP
//!   phase: a client that sends one bad request after another on one
//!   connection cannot keep its handshake place;
//! * a per-address limit on connections in their handshake, and a
//!   first-byte deadline: connections from one address that send nothing do
//!   not lock out a client from another address, and are dropped sooner
//!   than `handshake_timeout`;
//! * a cap on the request head, answered 431 (and delivered: the server
//!   drains what the refused client is still sending before it closes);
//! * a session keeps only the request headers named by
//!   `Server::session_headers`, whatever else the client sent;
//! * when `serve` returns, no task of the server runs: a session's send
//!   task, stuck writing to a client that does not read, is aborted with
//!   its connection after `shutdown_timeout`;
//! * `Server::bind` listens with a backlog that takes a burst of
//!   connections at once (tokio's `TcpListener::bind` takes 128);
//! * an upgrade request with a body is refused with 400, saying why.
//!
//! Every wait is bounded ([`within`], [`within_for`]); a condition that is
//! polled (a 503 retried, a receive buffer filling) is retried every
//! [`common::POLL`] within such a bound. Where a test needs time to pass
//! (an attacker's rhythm, a deadline to expire), it says so, and the
//! assertion is on what the server did, not on the sleep.

mod common;

use common::{WAIT, within, within_for};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc::unbounded_channel;
use wshub::testing::TestServer;
use wshub::{Config, Server, tungstenite};

/// The headers of a valid upgrade request for `/ws`, without the blank line
/// that ends the head.
const UPGRADE_HEAD: &str = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n";

/// A request the server refuses with 404 (no route there).
const NOT_FOUND: &str = "GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// Sessions at `/ws` that echo until the client closes.
fn echo_server() -> Server {
    Server::new().route("/ws", |mut session| async move {
        while let Some(msg) = session.recv().await {
            if session.send(msg).await.is_err() {
                break;
            }
        }
    })
}

/// A response head as read off the wire, and its `Content-Length` body.
#[derive(Debug)]
struct Response {
    status: u16,
    head: String,
    body: String,
}

/// Reads one response (head byte by byte, then its `Content-Length` body);
/// `None` if the connection ends (EOF or reset) before a whole head.
async fn read_response(tcp: &mut TcpStream) -> Option<Response> {
    within("a response or the end of the connection", async {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            match tcp.read_u8().await {
                Ok(byte) => head.push(byte),
                Err(_) if head.is_empty() => return None,
                Err(err) => panic!(
                    "the connection ended inside a response head ({err}): {:?}",
                    String::from_utf8_lossy(&head)
                ),
            }
        }
        let head = String::from_utf8(head).expect("an ASCII response head");
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {head:?}"));
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length").then(|| {
                    value
                        .trim()
                        .parse::<usize>()
                        .expect("a numeric Content-Length")
                })
            })
            .unwrap_or(0);
        let mut body = vec![0; length];
        tcp.read_exact(&mut body).await.expect("the response body");
        let body = String::from_utf8(body).expect("a UTF-8 body");
        Some(Response { status, head, body })
    })
    .await
}

/// Opens a TCP connection to the server.
async fn connect(addr: SocketAddr) -> TcpStream {
    within("a TCP connection", TcpStream::connect(addr))
        .await
        .expect("connect")
}

/// Raises the soft limit on open files towards the hard limit if it is
/// below `needed` (both ends of every test connection are in this process).
fn ensure_open_files(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("read RLIMIT_NOFILE");
    if soft < needed {
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(needed.max(4096)), hard)
            .expect("raise RLIMIT_NOFILE");
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).expect("read RLIMIT_NOFILE");
    assert!(
        soft >= needed,
        "this test needs {needed} open files; the limit is {soft}"
    );
}

/// Once the place a bad client held is free (503s until then, for at most
/// [`WAIT`]), a real client is upgraded and served: it sends `text` and gets
/// it back. Then the server shuts down.
async fn served_once_freed(server: TestServer, what: &str, text: &str) {
    let deadline = Instant::now() + WAIT;
    let mut client = loop {
        match within("an upgrade", server.try_connect("/ws")).await {
            Ok(client) => break client,
            Err(tungstenite::Error::Http(response))
                if response.status() == 503 && Instant::now() < deadline =>
            {
                tokio::time::sleep(common::POLL).await;
            }
            Err(err) => panic!("connecting after {what} failed: {err}"),
        }
    };
    client.send(text).await;
    client.expect_text(text).await;
    client.close(None).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// One deadline for the whole HTTP phase
// ---------------------------------------------------------------------------

/// A client that sends a bad request every 100 ms on one connection, each
/// answered 404, used to keep its handshake place for ever: hyper restarted
/// its header-read timeout for each request. Now the connection ends within
/// `handshake_timeout` of being accepted, and with `max_handshakes(1)` the
/// next client gets that place.
#[tokio::test]
async fn bad_request_after_bad_request_does_not_keep_a_handshake_place() {
    let timeout = Duration::from_millis(300);
    let server = echo_server()
        .max_handshakes(1)
        .config(Config::default().handshake_timeout(timeout));
    let server = TestServer::start(server).await;

    let started = Instant::now();
    let mut tcp = connect(server.addr()).await;
    let mut answered = 0;
    // The attacker's rhythm, for up to ten times the timeout.
    while started.elapsed() < timeout * 10 {
        if tcp.write_all(NOT_FOUND.as_bytes()).await.is_err() {
            break;
        }
        let Some(response) = read_response(&mut tcp).await else {
            break;
        };
        assert_eq!(response.status, 404, "{response:?}");
        assert!(
            response
                .head
                .to_ascii_lowercase()
                .contains("connection: close"),
            "a refusal ends its connection: {response:?}"
        );
        answered += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = started.elapsed();
    assert!(
        held < timeout + Duration::from_millis(700),
        "one connection kept its handshake place for {held:?} ({answered} bad requests \
         answered); handshake_timeout is {timeout:?}"
    );
    assert!(answered >= 1, "the first bad request gets its 404");
    drop(tcp);

    // The only handshake place is free again: a real client is served.
    served_once_freed(server, "the bad client was dropped", "hello").await;
}

// ---------------------------------------------------------------------------
// Per-address limit and first-byte deadline
// ---------------------------------------------------------------------------

/// 300 connections from 127.0.0.1 that send nothing, against a server with
/// 100 handshake places and at most 50 per address: 50 hold places, the
/// other 250 get 503 at once, and a client from 127.0.0.2 is upgraded
/// straight away. Both deadlines are 30 s here, so nothing is freed by time.
#[tokio::test]
async fn silent_connections_from_one_address_do_not_lock_out_another() {
    const SILENT: usize = 300;
    const PER_IP: usize = 50;
    ensure_open_files(2 * SILENT as u64 + 256);
    let long = Duration::from_secs(30);
    let server = echo_server()
        .max_handshakes(100)
        .max_handshakes_per_ip(Some(PER_IP))
        .first_byte_timeout(long)
        .config(Config::default().handshake_timeout(long));
    let server = TestServer::start(server).await;
    let addr = server.addr();

    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(connect(addr).await);
    }
    // Those past the per-address limit are answered and closed at once;
    // the ones holding places get nothing.
    let mut answers: FuturesUnordered<_> = silent
        .iter_mut()
        .enumerate()
        .map(|(i, tcp)| async move {
            let mut answer = Vec::new();
            let _ = tcp.read_to_end(&mut answer).await;
            (i, String::from_utf8_lossy(&answer).into_owned())
        })
        .collect();
    let mut refused = Vec::new();
    within("the 503s past the per-address limit", async {
        while refused.len() < SILENT - PER_IP {
            let (i, answer) = answers.next().await.expect("an answer");
            assert!(
                answer.starts_with("HTTP/1.1 503 ") && answer.contains("from your address"),
                "silent connection {i} got {answer:?}"
            );
            refused.push(i);
        }
    })
    .await;
    drop(answers);
    let mut holding = 0;
    for (i, tcp) in silent.iter().enumerate() {
        if !refused.contains(&i) {
            let mut byte = [0u8; 1];
            match tcp.try_read(&mut byte) {
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => holding += 1,
                other => panic!("silent connection {i} should still be waiting: {other:?}"),
            }
        }
    }
    assert_eq!(holding, PER_IP);

    // Another address is served at once, though 127.0.0.1 has 50 places.
    let socket = TcpSocket::new_v4().expect("a TCP socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 2], 0)))
        .expect("bind 127.0.0.2");
    let tcp = within("a connection from 127.0.0.2", socket.connect(addr))
        .await
        .expect("connect from 127.0.0.2");
    let (mut ws, response) = within_for(
        Duration::from_secs(2),
        "the upgrade of the client from 127.0.0.2",
        tokio_tungstenite::client_async(server.url("/ws"), tcp),
    )
    .await
    .expect("the client from 127.0.0.2 is upgraded");
    assert_eq!(response.status(), 101);
    {
        use futures_util::SinkExt;
        ws.send(tungstenite::Message::text("from 127.0.0.2"))
            .await
            .expect("send");
        let echo = within("the echo", ws.next()).await;
        assert!(
            matches!(&echo, Some(Ok(tungstenite::Message::Text(t))) if t.as_str() == "from 127.0.0.2"),
            "{echo:?}"
        );
        let _ = ws.close(None).await;
    }
    // A new connection from 127.0.0.1 is still refused, by the address limit.
    let mut again = connect(addr).await;
    let mut answer = String::new();
    within("the 503", again.read_to_string(&mut answer))
        .await
        .expect("read the answer");
    assert!(answer.contains("from your address"), "{answer:?}");

    drop(silent);
    server.shutdown().await;
}

/// A connection that sends nothing is dropped at the first-byte deadline
/// (300 ms), long before `handshake_timeout` (5 s); one that sends half its
/// request at once and the rest after the first-byte deadline has passed is
/// upgraded, since only silence is cut short.
#[tokio::test]
async fn a_silent_connection_is_dropped_at_the_first_byte_deadline() {
    let first_byte = Duration::from_millis(300);
    let handshake = Duration::from_secs(5);
    let server = echo_server()
        .first_byte_timeout(first_byte)
        .config(Config::default().handshake_timeout(handshake));
    let server = TestServer::start(server).await;

    let started = Instant::now();
    let mut silent = connect(server.addr()).await;
    let mut answer = Vec::new();
    let _ = within_for(
        handshake + Duration::from_secs(2),
        "the server to drop the silent connection",
        silent.read_to_end(&mut answer),
    )
    .await;
    let took = started.elapsed();
    assert!(
        answer.is_empty(),
        "a silent connection gets no answer: {answer:?}"
    );
    assert!(
        took >= first_byte - Duration::from_millis(50) && took < Duration::from_secs(2),
        "the silent connection was dropped after {took:?}: the first-byte deadline is \
         {first_byte:?}, handshake_timeout {handshake:?}"
    );

    let mut slow = connect(server.addr()).await;
    let (first, rest) = UPGRADE_HEAD.split_at(20);
    slow.write_all(first.as_bytes()).await.expect("write");
    // Deliberately past the first-byte deadline (and well within the
    // handshake's): the point is what the server does then.
    tokio::time::sleep(first_byte * 2).await;
    slow.write_all(rest.as_bytes()).await.expect("write");
    slow.write_all(b"\r\n").await.expect("write");
    let response = read_response(&mut slow)
        .await
        .expect("the server answers the slow but not silent client");
    assert_eq!(response.status, 101, "{response:?}");
    drop(slow);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// The request head's size
// ---------------------------------------------------------------------------

/// The default `Server::max_request_head`.
const HEAD_CAP: usize = 16 * 1024;

/// A complete upgrade request for `/ws` whose head is exactly `len` bytes,
/// padded with an `X-Pad` header.
fn upgrade_of_len(len: usize) -> String {
    let fixed = UPGRADE_HEAD.len() + "X-Pad: \r\n".len() + "\r\n".len();
    assert!(
        len > fixed,
        "a head of {len} bytes cannot hold the upgrade headers"
    );
    let request = format!("{UPGRADE_HEAD}X-Pad: {}\r\n\r\n", "p".repeat(len - fixed));
    assert_eq!(request.len(), len);
    request
}

/// Writes `request` (ignoring a failed write: the server may refuse early)
/// and reads the answer.
async fn answer_to(addr: SocketAddr, request: &[u8]) -> Option<Response> {
    let mut tcp = connect(addr).await;
    let write = within("the request to be written", tcp.write_all(request)).await;
    let response = read_response(&mut tcp).await;
    if response.is_none() {
        panic!(
            "no answer to a request head of {} bytes; the write returned {write:?}",
            request.len()
        );
    }
    response
}

/// 64 KiB of headers (hyper alone takes about 400 KiB) is answered `431
/// Request Header Fields Too Large`, not a dropped connection; so is a head
/// just over the cap sent in one write (hyper may parse it whole, then
/// wshub refuses it, saying why); a head just under the cap is upgraded.
#[tokio::test]
async fn a_request_head_over_the_cap_gets_431_and_one_under_it_is_upgraded() {
    let server = TestServer::start(echo_server()).await;
    let addr = server.addr();

    let big = answer_to(addr, upgrade_of_len(64 * 1024).as_bytes()).await;
    let big = big.expect("an answer");
    assert_eq!(big.status, 431, "{big:?}");

    let over = answer_to(addr, upgrade_of_len(HEAD_CAP + 1).as_bytes()).await;
    let over = over.expect("an answer");
    assert_eq!(over.status, 431, "{over:?}");

    let under = answer_to(addr, upgrade_of_len(HEAD_CAP - 1).as_bytes()).await;
    let under = under.expect("an answer");
    assert_eq!(under.status, 101, "{under:?}");
    server.shutdown().await;

    // Below hyper's 8 KiB floor the cap is wshub's own check, with a body;
    // a head of exactly the cap is allowed.
    let server = TestServer::start(echo_server().max_request_head(4096)).await;
    let over = answer_to(server.addr(), upgrade_of_len(4097).as_bytes()).await;
    let over = over.expect("an answer");
    assert_eq!(over.status, 431, "{over:?}");
    assert!(over.body.contains("at most 4096 bytes"), "{over:?}");
    let under = answer_to(server.addr(), upgrade_of_len(4096).as_bytes()).await;
    assert_eq!(under.expect("an answer").status, 101);
    server.shutdown().await;
}

/// A client that sends a request head of almost 1 MiB and only then reads
/// (as most clients do) gets its 431: the server reads and discards what it
/// is still sending before closing, instead of resetting the connection
/// under it. The refusal then frees the handshake place, so the next client is
/// served with `max_handshakes(1)`.
#[tokio::test]
async fn a_client_still_sending_its_oversized_head_gets_the_431() {
    let server = TestServer::start(echo_server().max_handshakes(1)).await;
    let addr = server.addr();
    let request = upgrade_of_len(1024 * 1024 - 64 * 1024);
    // A small send buffer, so that the client is still sending (its kernel
    // cannot take the whole request at once) when the server refuses it.
    let socket = TcpSocket::new_v4().expect("a TCP socket");
    socket
        .set_send_buffer_size(8 * 1024)
        .expect("set the send buffer size");
    let mut tcp = within("a TCP connection", socket.connect(addr))
        .await
        .expect("connect");
    within(
        "the whole request to be written",
        tcp.write_all(request.as_bytes()),
    )
    .await
    .expect("the server takes the whole request rather than resetting the connection");
    let response = read_response(&mut tcp).await.expect("an answer");
    assert_eq!(response.status, 431, "{response:?}");
    let mut rest = Vec::new();
    within("the end of the connection", tcp.read_to_end(&mut rest))
        .await
        .expect("a clean end of the connection after the 431");
    drop(tcp);

    served_once_freed(server, "the 431", "after").await;
}

/// What the handshake hook and the session saw of one request's headers:
/// each header's name and the length of its value, sorted.
type Seen = Vec<(String, usize)>;

fn seen(headers: &http::HeaderMap) -> Seen {
    let mut seen: Seen = headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.len()))
        .collect();
    seen.sort();
    seen
}

/// Upgrades on `server` with a 10 KiB `X-Big` header, a cookie, an origin
/// and a user agent; returns what the hook saw and what the session kept.
async fn hook_and_session_headers(server: Server) -> (Seen, Seen) {
    let (hook_tx, mut hook_rx) = unbounded_channel();
    let (session_tx, mut session_rx) = unbounded_channel();
    let server = server
        .route("/ws", move |session| {
            let _ = session_tx.send(seen(session.request().headers()));
            async {}
        })
        .on_handshake(move |request, _config| {
            let _ = hook_tx.send(seen(request.headers()));
            Ok(())
        });
    let server = TestServer::start(server).await;
    let request = format!(
        "{UPGRADE_HEAD}Origin: https://chat.example\r\nUser-Agent: test/1.0\r\n\
         Cookie: session=secret\r\nX-Big: {}\r\n\r\n",
        "b".repeat(10 * 1024)
    );
    let response = answer_to(server.addr(), request.as_bytes()).await;
    assert_eq!(response.expect("an answer").status, 101);
    let hook = within("the hook's report", hook_rx.recv())
        .await
        .expect("a report");
    let session = within("the session's report", session_rx.recv())
        .await
        .expect("a report");
    server.shutdown().await;
    (hook, session)
}

/// The handshake hook sees every header; a session keeps only the default
/// session headers (here `Host`, `Origin`, `User-Agent`), not a 10 KiB
/// custom header nor the cookie, unless `session_headers` names them.
#[tokio::test]
async fn a_session_keeps_only_its_session_headers() {
    let (hook, session) = hook_and_session_headers(echo_server()).await;
    let names = |seen: &Seen| seen.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    for name in ["cookie", "origin", "user-agent", "x-big", "upgrade", "host"] {
        assert!(
            names(&hook).contains(&name.to_owned()),
            "the hook sees {name}: {hook:?}"
        );
    }
    assert_eq!(
        session,
        [
            ("host".to_owned(), "localhost".len()),
            ("origin".to_owned(), "https://chat.example".len()),
            ("user-agent".to_owned(), "test/1.0".len()),
        ],
        "what the session kept"
    );

    let keep_big = echo_server().session_headers([http::HeaderName::from_static("x-big")]);
    let (_, session) = hook_and_session_headers(keep_big).await;
    assert_eq!(session, [("x-big".to_owned(), 10 * 1024)]);
}

// ---------------------------------------------------------------------------
// Nothing outlives serve
// ---------------------------------------------------------------------------

/// Tasks alive on the current runtime.
fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// A client that stops reading while a detached task floods its session
/// through an `Outgoing` handle: at shutdown its send task is stuck writing
/// (`send_timeout` a minute), the handler never returns, and after
/// `shutdown_timeout` (200 ms) `serve` aborts the connection. When `serve`
/// returns, the send task must be gone too: the task count is back to what
/// it was before the server started, and the client's socket reaches its
/// end once the bytes already in flight are read.
#[tokio::test]
async fn no_send_task_outlives_serve() {
    let (flooders_tx, mut flooders) = unbounded_channel();
    let stop_flooding = tokio_util::sync::CancellationToken::new();
    let stop_flood = stop_flooding.clone();
    let server = Server::new()
        .shutdown_timeout(Duration::from_millis(200))
        .config(
            Config::default()
                .send_timeout(Duration::from_secs(60))
                .ping_period(None),
        )
        .route("/ws", move |mut session| {
            let out = session.outgoing();
            let stop = stop_flood.clone();
            let flooder = tokio::spawn(async move {
                let chunk = wshub::Message::binary(vec![0u8; 16 * 1024]);
                let flood = async { while out.send(chunk.clone()).await.is_ok() {} };
                tokio::select! {
                    () = flood => {}
                    () = stop.cancelled() => {}
                }
            });
            let _ = flooders_tx.send(flooder);
            async move {
                // Never returns while the session is open: shutdown must abort it.
                while session.recv().await.is_some() {}
                std::future::pending::<()>().await;
            }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("the listener's address");
    let idle = alive_tasks();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));

    // The client: a small receive buffer, and after the 101 it reads nothing.
    let socket = TcpSocket::new_v4().expect("a TCP socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("set the receive buffer size");
    let mut tcp = within("a TCP connection", socket.connect(addr))
        .await
        .expect("connect");
    tcp.write_all(format!("{UPGRADE_HEAD}\r\n").as_bytes())
        .await
        .expect("write the upgrade request");
    let response = read_response(&mut tcp).await.expect("the 101");
    assert_eq!(response.status, 101, "{response:?}");
    let flooder = within("the handler to start", flooders.recv())
        .await
        .expect("the flooder");
    // Wait until the server's writes have filled the client's receive
    // buffer: the send task is then stuck in a write.
    within("the client's receive buffer to fill", async {
        let mut peeked = vec![0u8; 64 * 1024];
        while tcp.peek(&mut peeked).await.expect("peek") < 2048 {
            tokio::time::sleep(common::POLL).await;
        }
    })
    .await;

    let _ = stop.send(());
    within_for(
        Duration::from_secs(3),
        "serve to return after shutdown_timeout",
        serving,
    )
    .await
    .expect("the serve task")
    .expect("serve");
    // The flooder is the test's task, not the server's: end it.
    stop_flooding.cancel();
    within("the flooder to end", flooder)
        .await
        .expect("the flooder");
    assert_eq!(
        alive_tasks(),
        idle,
        "tasks alive after serve returned (the server's own should all be gone)"
    );
    // What was in flight arrives, then the end: nobody writes any more.
    let mut rest = Vec::new();
    let end = within("the client's socket to reach its end", async {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) => return "EOF",
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
                Err(_) => return "reset",
            }
        }
    })
    .await;
    assert!(
        rest.len() < 8 * 1024 * 1024,
        "{} bytes arrived after serve returned before the {end}",
        rest.len()
    );
}

// ---------------------------------------------------------------------------
// The listen backlog
// ---------------------------------------------------------------------------

/// 300 connections arrive before the server accepts any (a burst of
/// clients reconnecting): with `Server::bind` every one completes at once.
/// With a backlog of 128, as `TcpListener::bind` gives, the kernel drops the
/// SYNs beyond it and those clients wait a second for the retransmission.
/// Then the server serves the listener as usual.
#[tokio::test]
async fn server_bind_takes_a_burst_of_connections_before_the_first_accept() {
    const BURST: usize = 300;
    ensure_open_files(2 * BURST as u64 + 256);
    let server = echo_server().max_handshakes_per_ip(None);
    let listener = server.bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("the listener's address");

    let mut waiting = Vec::with_capacity(BURST);
    for i in 0..BURST {
        // A SYN retransmission takes 1 s: anything near that is a dropped SYN.
        let tcp = within_for(
            Duration::from_millis(500),
            &format!("connection {i} of {BURST} to complete with nobody accepting yet"),
            TcpStream::connect(addr),
        )
        .await
        .expect("connect");
        waiting.push(tcp);
    }

    // The accept loop starts: the waiting connections are served in turn.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    let request = format!("{UPGRADE_HEAD}\r\n");
    for tcp in waiting.iter_mut().step_by(50) {
        tcp.write_all(request.as_bytes()).await.expect("write");
        let response = read_response(tcp).await.expect("an answer");
        assert_eq!(response.status, 101, "{response:?}");
    }
    drop(waiting);
    let _ = stop.send(());
    within("serve to return", serving)
        .await
        .expect("the serve task")
        .expect("serve");
}

// ---------------------------------------------------------------------------
// A body on the upgrade request
// ---------------------------------------------------------------------------

/// An upgrade request with a body (`Content-Length` above 0, or
/// `Transfer-Encoding`) gets 400 with a body saying why; `Content-Length: 0`
/// is no body, and is upgraded.
#[tokio::test]
async fn an_upgrade_request_with_a_body_gets_400() {
    let server = TestServer::start(echo_server()).await;
    for (framing, body) in [
        ("Content-Length: 5", "hello"),
        ("Transfer-Encoding: chunked", "5\r\nhello\r\n0\r\n\r\n"),
    ] {
        let request = format!("{UPGRADE_HEAD}{framing}\r\n\r\n{body}");
        let response = answer_to(server.addr(), request.as_bytes()).await;
        let response = response.expect("an answer");
        assert_eq!(response.status, 400, "{framing}: {response:?}");
        assert!(
            response.body.contains("must not have a body"),
            "{framing}: the 400 says why: {response:?}"
        );
    }
    let request = format!("{UPGRADE_HEAD}Content-Length: 0\r\n\r\n");
    let response = answer_to(server.addr(), request.as_bytes()).await;
    assert_eq!(response.expect("an answer").status, 101);
    server.shutdown().await;
}
