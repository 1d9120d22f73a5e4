//! The send task batches: after one hub message it writes whatever else is
//! already waiting and flushes once. Counted on the connection itself, over an
//! in-memory pipe handed to `Session::from_upgraded`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use wshub::{CloseCode, Config, Hub, HubConfig, Message, Published, Request, Session};

const WAIT: Duration = Duration::from_secs(5);

/// A connection that counts how often it is flushed.
struct CountFlushes {
    inner: DuplexStream,
    flushes: Arc<AtomicUsize>,
}

impl AsyncRead for CountFlushes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountFlushes {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        if result.is_ready() {
            self.flushes.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Publishes `count` messages into a joined session before its send task
/// runs, reads them all on the client side, and returns how many flushes
/// the server side made to deliver them.
async fn flushes_to_deliver(count: usize, config: Config) -> usize {
    let (server_end, client_end) = tokio::io::duplex(1 << 20);
    let flushes = Arc::new(AtomicUsize::new(0));
    let io = CountFlushes {
        inner: server_end,
        flushes: flushes.clone(),
    };
    let hub = Hub::with_config(HubConfig::default().capacity(count)).unwrap();
    let mut session = Session::from_upgraded(io, Request::unknown(), &config).await;
    let subscription = hub.subscribe();
    for i in 0..count {
        assert_eq!(hub.try_publish(i.to_string()), Ok(Published::Queued));
    }
    let joined = tokio::spawn(async move { session.join(subscription).await });

    let mut client = WebSocketStream::from_raw_socket(client_end, Role::Client, None).await;
    for i in 0..count {
        match tokio::time::timeout(WAIT, client.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => assert_eq!(text.as_str(), i.to_string()),
            other => panic!("expected message {i}, got {other:?}"),
        }
    }
    let delivered = flushes.load(Ordering::SeqCst);
    client.close(None).await.unwrap();
    let reason = tokio::time::timeout(WAIT, joined).await.unwrap().unwrap();
    assert_eq!(
        reason.code,
        CloseCode::Status,
        "the client closed without a code"
    );
    delivered
}

fn quiet() -> Config {
    Config::default().ping_period(None)
}

#[tokio::test]
async fn waiting_hub_messages_go_out_in_one_flush() {
    let flushes = flushes_to_deliver(50, quiet()).await;
    assert!(
        (1..=2).contains(&flushes),
        "50 waiting messages took {flushes} flushes"
    );
}

#[tokio::test]
async fn max_batch_bounds_how_much_one_flush_carries() {
    let flushes = flushes_to_deliver(50, quiet().max_batch(10)).await;
    assert!(
        (5..=6).contains(&flushes),
        "50 messages in batches of 10 took {flushes} flushes"
    );
    let flushes = flushes_to_deliver(50, quiet().max_batch(1)).await;
    assert!(flushes >= 50, "max_batch 1 flushes each message: {flushes}");
}

#[tokio::test]
async fn from_upgraded_applies_the_configured_limits() {
    let (server_end, client_end) = tokio::io::duplex(1 << 20);
    let config = quiet().max_message_size(Some(100));
    let mut session = Session::from_upgraded(server_end, Request::unknown(), &config).await;
    assert_eq!(session.max_message_size(), Some(100));
    let handler = tokio::spawn(async move {
        while let Some(msg) = session.recv().await {
            let _ = session.send(msg).await;
        }
        session.close_reason()
    });
    let mut client = WebSocketStream::from_raw_socket(client_end, Role::Client, None).await;
    futures_util::SinkExt::send(&mut client, Message::text("x".repeat(100)))
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, client.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => assert_eq!(text.len(), 100),
        other => panic!("expected the echo, got {other:?}"),
    }
    futures_util::SinkExt::send(&mut client, Message::text("x".repeat(101)))
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, client.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected Close 1009, got {other:?}"),
    }
    let reason = tokio::time::timeout(WAIT, handler).await.unwrap().unwrap();
    assert_eq!(reason.map(|r| r.code), Some(CloseCode::Size));
}

#[tokio::test]
async fn queued_sends_beyond_one_batch_are_all_written_without_another_wake_up() {
    // 30 sends queued at once, batches of 4: the send task must come back for
    // the rest by itself, with nothing else happening on the session.
    let (server_end, client_end) = tokio::io::duplex(1 << 20);
    let config = quiet().max_batch(4).outgoing_capacity(64);
    let session = Session::from_upgraded(server_end, Request::unknown(), &config).await;
    for i in 0..30 {
        session.try_send(i.to_string()).expect("room in the queue");
    }
    let mut client = WebSocketStream::from_raw_socket(client_end, Role::Client, None).await;
    for i in 0..30 {
        match tokio::time::timeout(WAIT, client.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => assert_eq!(text.as_str(), i.to_string()),
            other => panic!("expected message {i}, got {other:?}"),
        }
    }
    drop(session);
    client.close(None).await.ok();
}
