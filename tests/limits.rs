//! Abuse limits on the server: at most `max_connections` sessions and
//! `max_handshakes` connections still in their HTTP handshake, both answered
//! 503 before upgrading and both freeing their places again; an `Origin`
//! allow-list answered 403; and a per-connection publish rate limit.

mod common;

use common::{WAIT, wait_for, within};

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use wshub::testing::{TestClient, TestServer};
use wshub::{Server, Session, tungstenite};

/// Sessions that stay open until the client closes.
fn echo_server() -> Server {
    Server::new().route("/ws", |mut session: Session| async move {
        while let Some(msg) = session.recv().await {
            if session.send(msg).await.is_err() {
                break;
            }
        }
    })
}

/// The status and body of a refused upgrade.
async fn refusal(server: &TestServer) -> (u16, String) {
    match within("the refusal", server.try_connect("/ws")).await {
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            let retry = response.headers().get("retry-after").cloned();
            assert_eq!(
                retry.as_ref().map(|v| v.as_bytes()),
                Some(&b"1"[..]),
                "503 carries Retry-After: 1"
            );
            (
                response.status().as_u16(),
                String::from_utf8_lossy(&body).into_owned(),
            )
        }
        Err(err) => panic!("expected an HTTP refusal, got {err}"),
        Ok(_) => panic!("expected an HTTP refusal, the upgrade succeeded"),
    }
}

/// Connects, retrying while `busy` says the server has not yet noticed that
/// a place became free (it does when that connection's task ends); any other
/// error fails the test.
async fn connect_when_freed(
    server: &TestServer,
    what: &str,
    busy: fn(&tungstenite::Error) -> bool,
) -> TestClient {
    let deadline = Instant::now() + WAIT;
    loop {
        match server.try_connect("/ws").await {
            Ok(client) => return client,
            Err(err) if busy(&err) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(err) => panic!("connecting after {what} failed: {err}"),
        }
    }
}

#[tokio::test]
async fn sessions_beyond_max_connections_get_503_until_one_ends() {
    let server = TestServer::start(echo_server().max_connections(Some(2))).await;
    let mut first = server.connect("/ws").await;
    let mut second = server.connect("/ws").await;

    let (status, body) = refusal(&server).await;
    assert_eq!(status, 503);
    assert!(
        body.contains("at most 2 WebSocket sessions"),
        "the body says why: {body:?}"
    );

    // The open sessions are unaffected.
    second.send("still here").await;
    assert_eq!(second.recv_text().await, "still here");

    // One ends: its place is free again, and only one place.
    first.close(None).await;
    let mut third = connect_when_freed(
        &server,
        "a session ended",
        |err| matches!(err, tungstenite::Error::Http(r) if r.status() == 503),
    )
    .await;
    assert_eq!(refusal(&server).await.0, 503, "the limit still holds");

    third.close(None).await;
    second.close(None).await;
    server.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_max_handshakes_get_503_at_once_and_sessions_go_on() {
    let server = TestServer::start(echo_server().max_handshakes(2)).await;
    let mut session = server.connect("/ws").await;
    // An echo proves the session is running, so its handshake place is free.
    session.send("first").await;
    assert_eq!(session.recv_text().await, "first");

    // Two connections that never send their request hold both handshake places.
    let idle_a = TcpStream::connect(server.addr()).await.expect("connect");
    let idle_b = TcpStream::connect(server.addr()).await.expect("connect");

    // A third is answered 503 and closed without its request being read.
    let mut third = TcpStream::connect(server.addr()).await.expect("connect");
    let mut answer = String::new();
    within("the 503 and the close", third.read_to_string(&mut answer))
        .await
        .expect("read the answer");
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "got {answer:?}"
    );
    assert!(
        answer.contains("too many handshakes in progress"),
        "got {answer:?}"
    );

    // The open session does not count against the handshake limit.
    session.send("echo").await;
    assert_eq!(session.recv_text().await, "echo");

    // Once the idle connections go, handshakes are accepted again.
    drop(idle_a);
    drop(idle_b);
    let mut later = connect_when_freed(&server, "the idle connections left", |_| true).await;
    later.send("hello").await;
    assert_eq!(later.recv_text().await, "hello");

    later.close(None).await;
    session.close(None).await;
    server.shutdown().await;
}

#[tokio::test]
async fn the_handshake_hook_refuses_before_the_connection_limit_is_checked() {
    let server = echo_server()
        .max_connections(Some(0))
        .on_handshake(|request, _| match request.query_param("token").as_deref() {
            Some("secret") => Ok(()),
            _ => Err(wshub::Rejection::unauthorized("missing token")),
        });
    let server = TestServer::start(server).await;
    match within("the refusal", server.try_connect("/ws")).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    match within("the refusal", server.try_connect("/ws?token=secret")).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    server.shutdown().await;
}

/// Upgrades with the given `Origin` header (or none) and returns the HTTP
/// status: 101 on success.
async fn status_with_origin(server: &TestServer, origin: Option<&str>) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = server
        .url("/ws")
        .into_client_request()
        .expect("a valid request");
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().expect("a header value"));
    }
    match within("the upgrade", tokio_tungstenite::connect_async(request)).await {
        Ok((mut ws, response)) => {
            let _ = ws.close(None).await;
            response.status().as_u16()
        }
        Err(tungstenite::Error::Http(response)) => {
            if response.status() == 403 {
                let body = response.body().clone().unwrap_or_default();
                let body = String::from_utf8_lossy(&body);
                assert!(
                    body.contains("is not allowed"),
                    "the 403 says why: {body:?}"
                );
            }
            response.status().as_u16()
        }
        Err(err) => panic!("upgrade failed without an HTTP answer: {err}"),
    }
}

#[tokio::test]
async fn only_allowed_origins_may_open_a_session_from_a_browser() {
    let server = echo_server().allowed_origins(["https://app.example", "http://localhost:3000"]);
    let server = TestServer::start(server).await;
    assert_eq!(
        status_with_origin(&server, Some("https://app.example")).await,
        101
    );
    assert_eq!(
        status_with_origin(&server, Some("HTTPS://APP.EXAMPLE")).await,
        101
    );
    assert_eq!(
        status_with_origin(&server, Some("http://localhost:3000")).await,
        101
    );
    // Another site, another port, another scheme: refused before upgrading.
    assert_eq!(
        status_with_origin(&server, Some("https://evil.example")).await,
        403
    );
    assert_eq!(
        status_with_origin(&server, Some("http://localhost:3001")).await,
        403
    );
    assert_eq!(
        status_with_origin(&server, Some("http://app.example")).await,
        403
    );
    assert_eq!(status_with_origin(&server, Some("null")).await, 403);
    // No Origin header: not a browser, left to the handshake hook.
    assert_eq!(status_with_origin(&server, None).await, 101);
    server.shutdown().await;
}

/// A hub chat at `/ws` with `config`, and the hub to read its counters.
async fn chat_server(config: wshub::Config) -> (TestServer, wshub::Hub) {
    let hub = wshub::Hub::new();
    let for_route = hub.clone();
    let server = Server::new()
        .config(config)
        .route("/ws", move |mut session: Session| {
            let hub = for_route.clone();
            async move {
                session.join(hub.subscribe()).await;
            }
        });
    (TestServer::start(server).await, hub)
}

/// Waits until the hub has accounted for `total` messages from clients.
async fn until_accounted(hub: &wshub::Hub, total: u64) -> wshub::HubStats {
    let what = format!("{total} client messages published or rate-limited");
    wait_for(
        &what,
        || hub.stats(),
        |s| s.published + s.rate_limited >= total,
    )
    .await
}

#[tokio::test]
async fn excess_over_the_publish_rate_is_dropped_and_counted_under_excess_drop() {
    use wshub::{Excess, RateLimit};
    // A burst of 5 and no refill (0 per second): exactly five get through.
    let limit = RateLimit::new(0, 5).on_excess(Excess::Drop);
    let (server, hub) = chat_server(wshub::Config::default().publish_rate(Some(limit))).await;
    let mut observer = server.connect("/ws").await;
    let mut flooder = server.connect("/ws").await;
    for i in 0..20 {
        flooder.send(format!("m{i}")).await;
    }
    let stats = until_accounted(&hub, 20).await;
    assert_eq!((stats.published, stats.rate_limited), (5, 15));
    // The first five arrive, in order, and the session is still open.
    for i in 0..5 {
        assert_eq!(observer.recv_text().await, format!("m{i}"));
    }
    observer.send("from the observer").await;
    assert_eq!(
        observer.recv_text().await,
        "from the observer",
        "nothing else came between"
    );
    assert_eq!(
        flooder.recv_text().await,
        "m0",
        "the flooder is still connected"
    );
    observer.close(None).await;
    flooder.close(None).await;
    server.shutdown().await;
}

#[tokio::test]
async fn excess_over_the_publish_rate_closes_with_1008_by_default() {
    let limit = wshub::RateLimit::new(0, 3);
    let (server, hub) = chat_server(wshub::Config::default().publish_rate(Some(limit))).await;
    let mut observer = server.connect("/ws").await;
    let mut flooder = server.connect("/ws").await;
    for i in 0..10 {
        flooder.send(format!("m{i}")).await;
    }
    // The flooder is closed at once (its own echoes may not reach it first).
    let reason = flooder.expect_close().await.expect("a close code");
    assert_eq!(u16::from(reason.code), 1008);
    assert_eq!(reason.reason.as_str(), "publish rate limit exceeded");
    flooder.close(None).await;
    let stats = until_accounted(&hub, 10).await;
    assert_eq!((stats.published, stats.rate_limited), (3, 7));
    // Everyone else got the three within the limit, and nothing after them.
    for i in 0..3 {
        assert_eq!(observer.recv_text().await, format!("m{i}"));
    }
    observer.send("from the observer").await;
    assert_eq!(observer.recv_text().await, "from the observer");
    observer.close(None).await;
    server.shutdown().await;
}
