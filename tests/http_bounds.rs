//! Bounds on the server's HTTP phase, seen by raw TCP clients:
//!
//! * one deadline, `handshake_timeout`, for a connection's whole HTTP
//!   phase: a client that sends one bad request after another on one
//!   connection cannot keep its handshake place;
//!
//! Every wait is bounded ([`within`], [`within_for`], [`wait_for`]); where a
//! test needs time to pass (a deadline to expire), it says so, and the
//! assertion is on what the server did, not on the sleep.

// Helpers shared by tests added one limit at a time.
#![allow(dead_code)]

mod common;

use common::{WAIT, within};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wshub::testing::{TestClient, TestServer};
use wshub::{Config, Server, tungstenite};

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
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().expect("a numeric Content-Length"))
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

/// Opens a WebSocket client, retrying while the server answers 503 (a
/// handshake place not yet given back); any other failure fails the test.
async fn connect_when_freed(server: &TestServer, what: &str) -> TestClient {
    let deadline = Instant::now() + WAIT;
    loop {
        match within("an upgrade", server.try_connect("/ws")).await {
            Ok(client) => return client,
            Err(tungstenite::Error::Http(response))
                if response.status() == 503 && Instant::now() < deadline =>
            {
                tokio::time::sleep(common::POLL).await;
            }
            Err(err) => panic!("connecting after {what} failed: {err}"),
        }
    }
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
    let mut client = connect_when_freed(&server, "the bad client was dropped").await;
    client.send("hello").await;
    client.expect_text("hello").await;
    client.close(None).await;
    server.shutdown().await;
}
