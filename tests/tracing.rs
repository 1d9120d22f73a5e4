//! Sessions in traces: each session's events carry its span
//! `session{id, peer, path}`, its close is an event on that span, and
//! nothing is logged per message at `info`.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{GREETING, sharedflow, wait_for};
use tracing_subscriber::fmt::MakeWriter;
use wshub::testing::TestServer;
use wshub::{CloseCode, Hub, Server, close_reason};

/// Log lines written by a `fmt` subscriber, kept for the test to read.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Lines {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Lines {
    type Writer = Lines;

    fn make_writer(&'a self) -> Lines {
        self.clone()
    }
}

/// A subscriber for this thread at `level`, writing into the returned lines.
fn capture(level: &str) -> (Lines, tracing::subscriber::DefaultGuard) {
    let lines = Lines::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(level)
        .with_writer(lines.clone())
        .with_ansi(false)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    (lines, guard)
}

// The current-thread runtime runs every task of the test on this thread, so
// the thread's subscriber sees them all.
#[tokio::test(flavor = "current_thread")]
async fn a_handlers_events_carry_the_session_and_its_close_is_an_event_on_it() {
    let (lines, _guard) = capture("wshub=debug,tracing=info");
    let server = Server::new().route("/chat/room", |mut session| async move {
        tracing::info!("handler says hello");
        while let Some(msg) = session.recv().await {
            let _ = session.send(msg).await;
        }
    });
    let server = TestServer::start(server).await;
    let mut client = server.connect("/chat/room").await;
    client.send("ping").await;
    client.expect_text("ping").await;
    let local = client.inner().get_ref();
    let peer = match local {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp.local_addr().unwrap(),
        _ => unreachable!("a plain connection"),
    };
    client
        .close(Some(close_reason(CloseCode::Normal, "done here")))
        .await;
    let closed = wait_for(
        "the session's close event",
        || lines.text(),
        |text| text.contains("session closed"),
    )
    .await;
    let span = format!("peer={peer} path=/chat/room");
    let hello = closed
        .lines()
        .find(|l| l.contains("handler says hello"))
        .expect("the handler's event");
    assert!(hello.contains("session{id="), "{hello}");
    assert!(hello.contains(&span), "{hello}");
    let close = closed
        .lines()
        .find(|l| l.contains("session closed"))
        .expect("the close event");
    assert!(close.contains(&span), "{close}");
    assert!(close.contains("code=1000"), "{close}");
    assert!(close.contains("reason=done here"), "{close}");
    assert!(
        close.contains("by=\"client\"") || close.contains("by=client"),
        "{close}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn nothing_is_logged_per_message_at_info() {
    let (lines, _guard) = capture("info");
    let hub = Hub::new();
    let server = TestServer::start(sharedflow(hub.clone())).await;
    let mut ann = server.connect("/ws").await;
    let mut bob = server.connect("/ws").await;
    ann.expect_text(GREETING).await;
    bob.expect_text(GREETING).await;
    let before = lines.text().lines().count();
    for i in 0..200 {
        ann.send(format!("m{i}")).await;
    }
    for i in 0..200 {
        bob.expect_text(&format!("m{i}")).await;
    }
    let after = lines.text();
    assert_eq!(
        after.lines().count(),
        before,
        "200 messages logged something at info:\n{after}"
    );
    server.shutdown().await;
}
