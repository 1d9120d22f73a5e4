//! The HTTP side of the server, seen by a raw TCP client: requests that are
//! not a valid WebSocket upgrade get a real status line and a body (404, 400,
//! 426) instead of a dropped connection; a valid upgrade gets 101 with the
//! RFC 6455 accept key; the `on_handshake` hook can refuse an upgrade (401,
//! 403) or change one connection's limits.

mod common;

use common::within;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use wshub::testing::{TestClient, TestServer};
use wshub::tungstenite;
use wshub::{Config, Rejection, Server};

/// The example key from RFC 6455 §1.3 and the accept value it must produce.
const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The headers of a valid upgrade request.
const UPGRADE: &[(&str, &str)] = &[
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", RFC_KEY),
    ("Sec-WebSocket-Version", "13"),
];

/// `headers` with the ones named in `without` left out.
fn upgrade_without(without: &[&str]) -> Vec<(&'static str, &'static str)> {
    UPGRADE
        .iter()
        .copied()
        .filter(|(name, _)| !without.contains(name))
        .collect()
}

/// An HTTP/1.1 request with a Host header and these headers.
fn request(method: &str, target: &str, headers: &[(&str, &str)]) -> String {
    let mut text = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text
}

/// A response as read off the wire.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    /// The connection, for reading on after a 101.
    tcp: TcpStream,
}

impl Response {
    /// A header's value (case-insensitive name).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Opens a connection, writes `request`, and reads the response head and
/// its `Content-Length` body.
async fn exchange(addr: SocketAddr, request: &str) -> Response {
    within("the HTTP response", async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(request.as_bytes()).await.expect("write");
        // Byte by byte, so nothing after the head is consumed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let byte = tcp.read_u8().await.unwrap_or_else(|err| {
                panic!(
                    "connection ended before the response head ({err}); got {:?}",
                    String::from_utf8_lossy(&head)
                )
            });
            head.push(byte);
        }
        let head = String::from_utf8(head).expect("an ASCII response head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (name, value) = line.split_once(':').expect("a header line");
                (name.trim().to_owned(), value.trim().to_owned())
            })
            .collect();
        let mut response = Response {
            status,
            headers,
            body: String::new(),
            tcp,
        };
        let length: usize = response
            .header("content-length")
            .map(|v| v.parse().expect("a numeric Content-Length"))
            .unwrap_or(0);
        let mut body = vec![0; length];
        response.tcp.read_exact(&mut body).await.expect("the body");
        response.body = String::from_utf8(body).expect("a UTF-8 body");
        response
    })
    .await
}

/// A server whose `/ws` route greets each client with "hello", then echoes.
fn greeting_server() -> Server {
    Server::new().route("/ws", |mut session| async move {
        session.send("hello").await?;
        while let Some(msg) = session.recv().await {
            session.send(msg).await?;
        }
        Ok::<_, wshub::Error>(())
    })
}

/// Asserts a refusal: this status, a plain-text body containing `says`.
fn assert_refused(response: &Response, status: u16, says: &str) {
    assert_eq!(response.status, status, "{response:?}");
    assert!(
        response.body.contains(says),
        "the {status} body should say {says:?}, got {:?}",
        response.body
    );
    assert!(
        response
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "{response:?}"
    );
}

/// What a tungstenite client sees when the upgrade is refused: the status.
fn refused_status(client: Result<TestClient, tungstenite::Error>) -> u16 {
    match client {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected the upgrade to be refused"),
    }
}

#[tokio::test]
async fn unknown_path_is_404_with_a_body() {
    let server = TestServer::start(greeting_server()).await;
    let response = exchange(server.addr(), &request("GET", "/nope", UPGRADE)).await;
    assert_refused(&response, 404, "no WebSocket route at /nope");
    server.shutdown().await;
}

#[tokio::test]
async fn plain_get_on_a_websocket_route_is_400_with_an_explanation() {
    let server = TestServer::start(greeting_server()).await;
    let response = exchange(server.addr(), &request("GET", "/ws", &[])).await;
    assert_refused(&response, 400, "Upgrade: websocket");
    server.shutdown().await;
}

#[tokio::test]
async fn post_is_400() {
    let server = TestServer::start(greeting_server()).await;
    let response = exchange(server.addr(), &request("POST", "/ws", UPGRADE)).await;
    assert_refused(&response, 400, "must be a GET request");
    server.shutdown().await;
}

#[tokio::test]
async fn missing_sec_websocket_key_is_400() {
    let server = TestServer::start(greeting_server()).await;
    let headers = upgrade_without(&["Sec-WebSocket-Key"]);
    let response = exchange(server.addr(), &request("GET", "/ws", &headers)).await;
    assert_refused(&response, 400, "Sec-WebSocket-Key");
    server.shutdown().await;
}

#[tokio::test]
async fn websocket_version_8_is_426_naming_version_13() {
    let server = TestServer::start(greeting_server()).await;
    let mut headers = upgrade_without(&["Sec-WebSocket-Version"]);
    headers.push(("Sec-WebSocket-Version", "8"));
    let response = exchange(server.addr(), &request("GET", "/ws", &headers)).await;
    assert_refused(&response, 426, "version 13");
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
    server.shutdown().await;
}

#[tokio::test]
async fn valid_upgrade_is_101_with_the_rfc_accept_key_and_a_live_websocket() {
    let server = TestServer::start(greeting_server()).await;
    let mut response = exchange(server.addr(), &request("GET", "/ws", UPGRADE)).await;
    assert_eq!(response.status, 101, "{response:?}");
    assert_eq!(response.header("sec-websocket-accept"), Some(RFC_ACCEPT));
    assert!(
        response
            .header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "{response:?}"
    );
    assert!(
        response
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
        "{response:?}"
    );
    // The connection now speaks WebSocket: the greeting arrives as one
    // unmasked text frame (FIN + text opcode, length 5).
    let mut frame = [0u8; 7];
    within("the greeting frame", response.tcp.read_exact(&mut frame))
        .await
        .expect("read the greeting frame");
    assert_eq!(frame, *b"\x81\x05hello");
    drop(response);
    server.shutdown().await;
}

#[tokio::test]
async fn handshake_hook_refuses_a_missing_or_wrong_token_with_401() {
    let (tx, mut handled) = unbounded_channel();
    let server = Server::new()
        .route("/ws", move |session| {
            let _ = tx.send(session.request().uri().to_string());
            async {}
        })
        .on_handshake(
            |request, _config| match request.query_param("token").as_deref() {
                Some("secret") => Ok(()),
                _ => Err(Rejection::unauthorized("missing or wrong token")),
            },
        );
    let server = TestServer::start(server).await;

    for target in ["/ws", "/ws?token=guess"] {
        let response = exchange(server.addr(), &request("GET", target, UPGRADE)).await;
        assert_refused(&response, 401, "missing or wrong token");
    }
    // A real client sees the status too.
    let status = refused_status(server.try_connect("/ws?token=guess").await);
    assert_eq!(status, 401);

    let response = exchange(server.addr(), &request("GET", "/ws?token=secret", UPGRADE)).await;
    assert_eq!(response.status, 101, "{response:?}");
    // The handler ran for the accepted connection only.
    assert_eq!(first(&mut handled).await, "/ws?token=secret");
    drop(response);
    server.shutdown().await;
}

#[tokio::test]
async fn handshake_hook_enforces_an_origin_allow_list_with_403() {
    const ALLOWED: &[&str] = &["https://chat.example"];
    let (tx, mut handled) = unbounded_channel();
    let server = Server::new()
        .route("/ws", move |session| {
            let _ = tx.send(session.request().header("origin").map(str::to_owned));
            async {}
        })
        .on_handshake(|request, _config| match request.header("origin") {
            Some(origin) if ALLOWED.contains(&origin) => Ok(()),
            _ => Err(Rejection::forbidden("origin not allowed")),
        });
    let server = TestServer::start(server).await;

    let mut headers = UPGRADE.to_vec();
    headers.push(("Origin", "https://evil.example"));
    let response = exchange(server.addr(), &request("GET", "/ws", &headers)).await;
    assert_refused(&response, 403, "origin not allowed");
    // A client that sends no Origin at all is not on the list either.
    let response = exchange(server.addr(), &request("GET", "/ws", UPGRADE)).await;
    assert_refused(&response, 403, "origin not allowed");

    let mut headers = UPGRADE.to_vec();
    headers.push(("Origin", "https://chat.example"));
    let response = exchange(server.addr(), &request("GET", "/ws", &headers)).await;
    assert_eq!(response.status, 101, "{response:?}");
    assert_eq!(
        first(&mut handled).await.as_deref(),
        Some("https://chat.example")
    );
    drop(response);
    server.shutdown().await;
}

#[tokio::test]
async fn handshake_hook_can_raise_max_message_size_for_one_connection() {
    let (tx, mut limits) = unbounded_channel();
    let server = Server::new()
        .config(Config::default().max_message_size(Some(1024)))
        .route("/ws", move |mut session| {
            let _ = tx.send(session.max_message_size());
            async move {
                while let Some(msg) = session.recv().await {
                    session.send(msg).await?;
                }
                Ok::<_, wshub::Error>(())
            }
        })
        .on_handshake(|request, config| {
            if request.query_param("tier").as_deref() == Some("upload") {
                config.max_message_size = Some(64 * 1024);
            }
            Ok(())
        });
    let server = TestServer::start(server).await;
    let message = "x".repeat(4096);

    let mut trusted = server.connect("/ws?tier=upload").await;
    assert_eq!(first(&mut limits).await, Some(64 * 1024));
    trusted.send(message.as_str()).await;
    trusted.expect_text(&message).await;

    let mut other = server.connect("/ws").await;
    assert_eq!(first(&mut limits).await, Some(1024));
    other.send(message.as_str()).await;
    let reason = other.expect_close().await.expect("a close code");
    assert_eq!(u16::from(reason.code), 1009, "{reason:?}");

    trusted.close(None).await;
    server.shutdown().await;
}

/// The next report from a handler.
async fn first<T>(reports: &mut UnboundedReceiver<T>) -> T {
    within("a report from the handler", reports.recv())
        .await
        .expect("the handler dropped its report channel")
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_head_is_dropped_after_handshake_timeout() {
    let timeout = Duration::from_millis(200);
    let server = greeting_server().config(Config::default().handshake_timeout(timeout));
    let server = TestServer::start(server).await;
    // Slowloris: half a request head, or nothing at all.
    for sent in [&b"GET /ws HTTP/1.1\r\nHost: localhost\r\n"[..], b""] {
        let started = std::time::Instant::now();
        let mut tcp = TcpStream::connect(server.addr()).await.expect("connect");
        tcp.write_all(sent).await.expect("write");
        let mut answer = Vec::new();
        let _ = within("the server to hang up", tcp.read_to_end(&mut answer)).await;
        let took = started.elapsed();
        assert!(
            took >= timeout,
            "dropped after {took:?}, before the timeout"
        );
        assert!(answer.is_empty(), "unexpected answer: {answer:?}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_page_is_served_to_get_and_head_and_a_route_at_its_path_still_upgrades() {
    let page = "<!doctype html><title>chat</title><p>hello</p>";
    let server = TestServer::start(
        greeting_server()
            .page("/", "text/html; charset=utf-8", page)
            .page(
                "/ws",
                "text/plain; charset=utf-8",
                "open this with a WebSocket",
            ),
    )
    .await;
    let got = exchange(server.addr(), &request("GET", "/", &[])).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(got.header("cache-control"), Some("no-cache"));
    assert_eq!(got.body, page);

    // HEAD: the same head, no body.
    let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
    tcp.write_all(request("HEAD", "/", &[]).as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    within("the HEAD answer", tcp.read_to_end(&mut answer))
        .await
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "no body: {answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains(&format!("content-length: {}", page.len()))
    );

    let got = exchange(
        server.addr(),
        &request("POST", "/", &[("Content-Length", "0")]),
    )
    .await;
    assert_refused(&got, 405, "GET");
    assert_eq!(got.header("allow"), Some("GET, HEAD"));

    // A plain GET at the route's path gets the page; an upgrade gets the route.
    let got = exchange(server.addr(), &request("GET", "/ws", &[])).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "open this with a WebSocket");
    let mut client = server.connect("/ws").await;
    client.expect_text("hello").await;
    // Elsewhere: still 404.
    let got = exchange(server.addr(), &request("GET", "/nope", &[])).await;
    assert_eq!(got.status, 404);
}
