//! Test helpers (Ktor's `testApplication` and `handleWebSocketConversation`):
//! start a [`Server`] on `127.0.0.1:0`, open real clients, and send and expect
//! messages with timeouts that fail the test.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use wshub::testing::TestServer;
//! use wshub::Server;
//!
//! let server = TestServer::start(Server::new().route("/echo", |mut session| async move {
//!     while let Some(msg) = session.recv().await {
//!         let _ = session.send(msg).await;
//!     }
//! }))
//! .await;
//! let mut client = server.connect("/echo").await;
//! for text in ["HELLO", "WORLD"] {
//!     client.send(text).await;
//!     client.expect_text(text).await;
//! }
//! server.shutdown().await;
//! # }
//! ```
//!
//! The helpers panic with a clear message when an expectation fails, so a
//! test reads as a list of steps.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::message::{CloseReason, Message};
use crate::server::Server;

/// How long a helper waits for an expected event before it fails the test.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A server running on `127.0.0.1:0` for the length of a test.
pub struct TestServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Binds `127.0.0.1:0` and serves `server` in a background task.
    ///
    /// # Panics
    ///
    /// If the loopback listener cannot be bound.
    pub async fn start(server: Server) -> TestServer {
        let listener = server
            .bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for the test server");
        let addr = listener
            .local_addr()
            .expect("local address of the test listener");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Opens a client on `path`.
    ///
    /// # Panics
    ///
    /// If the handshake fails or takes longer than [`DEFAULT_TIMEOUT`].
    pub async fn connect(&self, path: &str) -> TestClient {
        TestClient::connect(&self.url(path)).await
    }

    /// Opens a client on `path`, returning the handshake error instead of panicking.
    ///
    /// # Errors
    ///
    /// tungstenite's error, e.g. `Http(response)` when the server refused the
    /// upgrade with a status.
    pub async fn try_connect(
        &self,
        path: &str,
    ) -> Result<TestClient, tokio_tungstenite::tungstenite::Error> {
        TestClient::try_connect(&self.url(path)).await
    }

    /// Shuts the server down gracefully and waits for it (Close 1001 to every
    /// session, then every task finished).
    ///
    /// # Panics
    ///
    /// If the server does not finish within 30 s or its task panicked.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(Duration::from_secs(30), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(err))) => panic!("server failed: {err}"),
                Ok(Err(err)) => panic!("server task failed: {err}"),
                Err(_) => panic!("server did not shut down within 30 s"),
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl fmt::Debug for TestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr)
            .finish()
    }
}

/// A real WebSocket client (tokio-tungstenite) with expectation helpers.
pub struct TestClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    timeout: Duration,
}

impl TestClient {
    /// Opens a client on `url` (`ws://...`), for a server other than a
    /// [`TestServer`]: one embedded in axum, or your own.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use wshub::testing::{TestClient, TestServer};
    ///
    /// let server = wshub::Server::new().route("/ws", |mut session| async move {
    ///     session.send("hi").await
    /// });
    /// let server = TestServer::start(server).await;
    /// let mut client = TestClient::connect(&server.url("/ws")).await;
    /// client.expect_text("hi").await;
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// If the handshake fails or takes longer than [`DEFAULT_TIMEOUT`].
    pub async fn connect(url: &str) -> TestClient {
        match tokio::time::timeout(DEFAULT_TIMEOUT, TestClient::try_connect(url)).await {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => panic!("connecting to {url} failed: {err}"),
            Err(_) => panic!("connecting to {url} timed out"),
        }
    }

    /// Opens a client on `url`, returning the handshake error instead of
    /// panicking; it takes messages and frames of any size.
    ///
    /// # Errors
    ///
    /// tungstenite's error, e.g. `Http(response)` when the server refused the
    /// upgrade with a status.
    pub async fn try_connect(
        url: &str,
    ) -> Result<TestClient, tokio_tungstenite::tungstenite::Error> {
        let config = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true).await?;
        Ok(TestClient {
            ws,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Changes how long the helpers wait before failing (default [`DEFAULT_TIMEOUT`]).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> TestClient {
        self.timeout = timeout;
        self
    }

    /// Sends a message.
    ///
    /// # Panics
    ///
    /// If the send fails or times out.
    pub async fn send(&mut self, msg: impl Into<Message>) {
        match tokio::time::timeout(self.timeout, self.ws.send(msg.into())).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => panic!("client send failed: {err}"),
            Err(_) => panic!("client send timed out after {:?}", self.timeout),
        }
    }

    /// The next frame of any kind, `None` when the connection ended, or the
    /// read error; waits at most the client's timeout.
    ///
    /// # Panics
    ///
    /// If nothing arrives in time.
    pub async fn next_frame(
        &mut self,
    ) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
        match tokio::time::timeout(self.timeout, self.ws.next()).await {
            Ok(item) => item,
            Err(_) => panic!("no frame within {:?}", self.timeout),
        }
    }

    /// The next text or binary message (pings and pongs are skipped).
    ///
    /// # Panics
    ///
    /// If the connection closes or fails first, or nothing arrives in time.
    pub async fn recv(&mut self) -> Message {
        loop {
            match self.next_frame().await {
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => return msg,
                Some(Ok(Message::Close(frame))) => {
                    panic!("expected a message, got Close {frame:?}")
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => panic!("expected a message, got error {err}"),
                None => panic!("expected a message, the connection ended"),
            }
        }
    }

    /// The next message, which must be text; returns it.
    ///
    /// # Panics
    ///
    /// As [`recv`](Self::recv), or if the message is binary.
    pub async fn recv_text(&mut self) -> String {
        match self.recv().await {
            Message::Text(text) => text.to_string(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// Expects the next message to be exactly this text.
    ///
    /// # Panics
    ///
    /// If it is anything else.
    pub async fn expect_text(&mut self, expected: &str) {
        let got = self.recv_text().await;
        assert_eq!(got, expected, "unexpected text message");
    }

    /// Waits for the server's Close frame, skipping data, and returns its
    /// reason (`None` for a Close frame without a code).
    ///
    /// # Panics
    ///
    /// If the connection ends without a Close frame or nothing comes in time.
    pub async fn expect_close(&mut self) -> Option<CloseReason> {
        loop {
            match self.next_frame().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(err)) => panic!("expected a Close frame, got error {err}"),
                None => panic!("expected a Close frame, the connection ended without one"),
            }
        }
    }

    /// Starts the closing handshake from the client side and waits for the
    /// server's answer.
    ///
    /// # Panics
    ///
    /// If the handshake does not finish in time.
    pub async fn close(&mut self, reason: Option<CloseReason>) {
        let _ = self.ws.close(reason).await;
        loop {
            match self.next_frame().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            }
        }
    }

    /// The underlying tokio-tungstenite stream, for anything the helpers lack.
    pub fn inner(&mut self) -> &mut WebSocketStream<MaybeTlsStream<TcpStream>> {
        &mut self.ws
    }
}

impl fmt::Debug for TestClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestClient")
            .field("timeout", &self.timeout)
            .finish()
    }
}
