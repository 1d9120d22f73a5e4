//! Memory bounds that hold whatever a client does: what a connection's
//! buffers may hold is set by the `Config`, not by the client.
//!
//! * A client that floods pings faster than it reads the pongs is closed with
//!   1008, and the server's memory does not grow with the flood (tungstenite
//!   alone buffers every pong it owes, without limit).
//! * A broadcast of one large message to thousands of clients that do not
//!   read costs each of them a frame header and a reference to the one shared
//!   payload, not a copy of it.
//!
//! Memory is the test process's resident set (`/proc/self/status`); the
//! clients are raw TCP streams with small receive buffers that allocate
//! nothing while the server works, so what grows is the server's.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{rss_kib, upgrade_raw, wait_for, within_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use wshub::testing::TestServer;
use wshub::{CloseReason, Hub, Message, Published, Server};

/// A server whose `/ws` route joins each session to `hub` and reports why
/// each session ended.
fn reporting_server(hub: &Hub) -> (Server, UnboundedReceiver<CloseReason>) {
    let (tx, reasons) = unbounded_channel();
    let hub = hub.clone();
    let server = Server::new().route("/ws", move |mut session| {
        let (hub, tx) = (hub.clone(), tx.clone());
        async move {
            let subscription = hub.subscribe();
            let _ = tx.send(session.join(subscription).await);
        }
    });
    (server, reasons)
}

/// A masked client ping with a 125-byte payload (the largest a control
/// frame may carry), many of them back to back.
fn pings(count: usize) -> Vec<u8> {
    let one = common::client_frame(0x89, &[b'p'; 125], true);
    one.repeat(count)
}

/// What the flooding client reads of the server's answers.
#[derive(Clone, Copy, Debug)]
enum Reads {
    Nothing,
    /// This many bytes every 10 ms.
    Trickle(usize),
}

/// One client sends pings as fast as it can while reading as `reads` says.
/// Its session must be closed with 1008 within a few seconds, and the
/// process must not grow by more than `bound_kib` meanwhile.
async fn ping_flood(reads: Reads) {
    const BOUND_KIB: u64 = 32 << 10;
    let hub = Hub::new();
    let (server, mut reasons) = reporting_server(&hub);
    let server = TestServer::start(server).await;
    let tcp = upgrade_raw(server.addr(), "/ws", Some(4096)).await;
    let (mut rd, mut wr) = tcp.into_split();
    let before = rss_kib();
    // At most 4 s of pinging, 64 pings per write (about 8 KiB).
    let flood = tokio::spawn(async move {
        let burst = pings(64);
        let until = Instant::now() + Duration::from_secs(4);
        let mut sent = 0u64;
        while Instant::now() < until && wr.write_all(&burst).await.is_ok() {
            sent += 64;
        }
        sent
    });
    let reader = tokio::spawn(async move {
        if let Reads::Trickle(bytes) = reads {
            let mut buf = vec![0u8; bytes];
            while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        } else {
            // Holds the read half open without reading.
            std::future::pending::<()>().await;
        }
    });
    let mut peak = before;
    let reason = within_for(
        Duration::from_secs(10),
        "the flooder's session to end",
        async {
            loop {
                peak = peak.max(rss_kib());
                tokio::select! {
                    reason = reasons.recv() => break reason.expect("the server stopped"),
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        },
    )
    .await;
    let sent = within_for(Duration::from_secs(10), "the flooder to stop", flood)
        .await
        .expect("the flooding task");
    reader.abort();
    let grown = peak.saturating_sub(before);
    println!("{reads:?}: {sent} pings sent; RSS grew by {grown} KiB; closed with {reason:?}");
    assert_eq!(u16::from(reason.code), 1008, "{reason:?}");
    assert!(reason.reason.contains("ping flood"), "{reason:?}");
    assert!(
        grown <= BOUND_KIB,
        "a ping flood grew the server by {grown} KiB (bound {BOUND_KIB} KiB)"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_from_a_client_that_reads_nothing_is_closed_with_1008() {
    ping_flood(Reads::Nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_from_a_client_that_reads_a_trickle_is_closed_with_1008() {
    ping_flood(Reads::Trickle(1024)).await;
}

/// Connects `count` raw clients with 4 KiB receive buffers, a few at a
/// time, and waits until every one has joined the hub.
async fn stalled_clients(addr: SocketAddr, hub: &Hub, count: usize) -> Vec<TcpStream> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count.div_ceil(50) {
        let batch = (clients.len()..count.min(clients.len() + 50))
            .map(|_| tokio::spawn(upgrade_raw(addr, "/ws", Some(4096))))
            .collect::<Vec<_>>();
        for client in batch {
            clients.push(client.await.expect("a client task"));
        }
    }
    wait_for(
        "every client to join",
        || hub.subscriber_count(),
        |&n| n == count,
    )
    .await;
    clients
}

/// One 1 MiB broadcast to 2,000 clients that read nothing: every session
/// takes the message from the hub (the hub buffers nothing afterwards), and
/// the server grows by far less than 64 KiB per client (tungstenite's write
/// path copied the whole message into each connection's buffer: 1 MiB each,
/// 2 GiB in all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_broadcast_to_stalled_clients_is_shared_not_copied() {
    const CLIENTS: usize = 2000;
    const SIZE: usize = 1 << 20;
    const BOUND_KIB_PER_CLIENT: u64 = 64;
    const LONG: Duration = Duration::from_secs(30);
    let hub = Hub::new();
    let (server, _reasons) = reporting_server(&hub);
    let server = TestServer::start(server).await;
    let clients = stalled_clients(server.addr(), &hub, CLIENTS).await;
    // A small broadcast first, so each connection's buffers are in use.
    assert_eq!(hub.publish("warm-up").await, Ok(Published::Queued));
    wait_for(
        "the warm-up to be taken",
        || hub.stats().buffered,
        |&n| n == 0,
    )
    .await;
    let before = rss_kib();

    let started = Instant::now();
    assert_eq!(
        hub.publish(Message::binary(vec![7u8; SIZE])).await,
        Ok(Published::Queued)
    );
    // Each session writes what its client's kernel takes before it stalls:
    // 2,000 of those copies are the kernel's work, and take a while.
    within_for(LONG, "every session to take the large message", async {
        while hub.stats().buffered > 0 {
            tokio::time::sleep(common::POLL).await;
        }
    })
    .await;
    let grown = rss_kib().saturating_sub(before);
    let per_client = grown / CLIENTS as u64;
    println!(
        "1 MiB to {CLIENTS} stalled clients: taken by all in {:?}; RSS grew by {grown} KiB, \
         {per_client} KiB per client",
        started.elapsed()
    );
    assert!(
        per_client <= BOUND_KIB_PER_CLIENT,
        "a 1 MiB broadcast cost {per_client} KiB per stalled client (bound {BOUND_KIB_PER_CLIENT} KiB)"
    );
    drop(clients);
    within_for(LONG, "every session to end", async {
        while hub.subscriber_count() > 0 {
            tokio::time::sleep(common::POLL).await;
        }
    })
    .await;
    server.shutdown().await;
}
