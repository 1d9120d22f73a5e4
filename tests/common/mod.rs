//! What several test files share: bounded waits, Ktor's SharedFlow route,
//! hand-built client frames, and (in `process`) example binaries and a
//! Python `websockets` as child processes.

// Each test binary compiles this module and uses its own part of it.
#![allow(dead_code)]

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use wshub::{Hub, Server, Session};

// Also compiled into the fuzz targets (fuzz/src/lib.rs), which are a crate of their own.
mod frames;
#[allow(unused_imports)] // as dead_code above: each test binary uses its own part
pub use frames::{MASK, client_frame, frame_header, masked};
pub mod cdp;
pub mod peer;
pub mod process;
#[cfg(feature = "redis")]
pub mod redis;

/// How long one step of a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);

/// Awaits `fut` for at most [`WAIT`], failing the test with `what` otherwise.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(WAIT, what, fut).await
}

/// Awaits `fut` for at most `limit`, failing the test with `what` otherwise.
pub async fn within_for<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// How often a condition is polled.
pub const POLL: Duration = Duration::from_millis(5);

/// The most polls of one condition (more than [`WAIT`] allows at [`POLL`]).
pub const MAX_POLLS: u32 = 5_000;

/// Polls `probe` until `done` holds for what it returns, and returns that;
/// fails the test with the last value seen after [`WAIT`].
pub async fn wait_for<T: Debug>(
    what: &str,
    mut probe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + WAIT;
    let polls = async {
        for _ in 0..MAX_POLLS {
            let value = probe();
            if done(&value) {
                return value;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {WAIT:?} waiting for {what}; last seen: {value:?}");
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("gave up after {MAX_POLLS} polls waiting for {what}");
    };
    within_for(WAIT + Duration::from_secs(1), what, polls).await
}

/// The greeting Ktor's SharedFlow sample sends on connect.
pub const GREETING: &str = "You are connected to WebSocket!";

/// Ktor's SharedFlow route at `/ws`: subscribe, greet, then join the hub.
pub fn sharedflow(hub: Hub) -> Server {
    Server::new().route("/ws", move |session| {
        sharedflow_session(session, hub.clone())
    })
}

/// Ktor's SharedFlow handler: subscribe, greet, then join the hub.
pub async fn sharedflow_session(mut session: Session, hub: Hub) -> Result<(), wshub::Error> {
    let subscription = hub.subscribe();
    session.send(GREETING).await?;
    session.join(subscription).await;
    Ok(())
}

/// Opens a TCP connection to `addr` (with a receive buffer of `rcvbuf`
/// bytes when given, so that a client that stops reading is soon stuck) and
/// performs the WebSocket upgrade on `path` by hand. Returns the stream right
/// after the 101 response's head: nothing of the WebSocket stream is read.
pub async fn upgrade_raw(
    addr: std::net::SocketAddr,
    path: &str,
    rcvbuf: Option<u32>,
) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    if let Some(size) = rcvbuf {
        socket
            .set_recv_buffer_size(size)
            .expect("set the receive buffer size");
    }
    let mut tcp = within("a TCP connection", socket.connect(addr))
        .await
        .expect("connect to the test server");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    within("the upgrade request", tcp.write_all(request.as_bytes()))
        .await
        .expect("write the upgrade request");
    let mut head = Vec::new();
    within("the upgrade response", async {
        while !head.ends_with(b"\r\n\r\n") {
            let byte = tcp.read_u8().await.expect("the upgrade response");
            head.push(byte);
        }
    })
    .await;
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "expected 101 Switching Protocols, got:\n{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// This process's resident set, in KiB (Linux).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("read /proc/self/status")
        .lines()
        .find_map(|line| {
            line.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .expect("a VmRSS line in /proc/self/status")
}
