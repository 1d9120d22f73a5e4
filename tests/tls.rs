//! `wss://` through the `tls` feature: a certificate generated at test time
//! (rcgen), [`Server::serve_tls`], and rustls clients.
#![cfg(feature = "tls")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{GREETING, within};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::client_async;
use tokio_tungstenite::tungstenite::Message;
use wshub::{Config, Hub};

/// A `wss://` sharedflow server on `127.0.0.1:0` with a fresh certificate
/// for `localhost`, and the connector its clients trust it with.
struct TlsServer {
    addr: SocketAddr,
    connector: TlsConnector,
    hub: Hub,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl TlsServer {
    async fn start(config: Config) -> TlsServer {
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a self-signed certificate");
        let cert: CertificateDer<'static> = key.cert.der().clone();
        let private =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()));
        let server_tls = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], private)
            .expect("a server TLS config");
        let mut roots = RootCertStore::empty();
        roots.add(cert).expect("trust the test certificate");
        let client_tls = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let hub = Hub::new();
        let server = common::sharedflow(hub.clone()).config(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, stopped) = oneshot::channel::<()>();
        let acceptor = TlsAcceptor::from(Arc::new(server_tls));
        let task = tokio::spawn(server.serve_tls(listener, acceptor, async {
            let _ = stopped.await;
        }));
        TlsServer {
            addr,
            connector: TlsConnector::from(Arc::new(client_tls)),
            hub,
            stop,
            task,
        }
    }

    /// A WebSocket client over TLS on `/ws`, greeted.
    async fn connect(&self) -> WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
        within("a wss:// session", async {
            let tcp = TcpStream::connect(self.addr).await.expect("connect");
            let tls = self
                .connector
                .connect("localhost".try_into().expect("a server name"), tcp)
                .await
                .expect("the TLS handshake");
            let (mut ws, response) = client_async("wss://localhost/ws", tls)
                .await
                .expect("the WebSocket handshake");
            assert_eq!(response.status(), 101);
            assert_eq!(next_text(&mut ws).await, GREETING);
            ws
        })
        .await
    }

    async fn shutdown(self) {
        let _ = self.stop.send(());
        within("serve_tls to return", self.task)
            .await
            .expect("the server task")
            .expect("serve_tls");
    }
}

async fn next_text<S>(ws: &mut WebSocketStream<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match within("a text message", ws.next()).await {
            Some(Ok(Message::Text(text))) => return text.to_string(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn sharedflow_broadcasts_over_wss() {
    let server = TlsServer::start(Config::default()).await;
    let mut ann = server.connect().await;
    let mut bob = server.connect().await;
    ann.send(Message::text("Hello over TLS"))
        .await
        .expect("send");
    assert_eq!(next_text(&mut bob).await, "Hello over TLS");
    assert_eq!(next_text(&mut ann).await, "Hello over TLS");
    // A large message crosses many TLS records whole.
    let big = "x".repeat(200_000);
    bob.send(Message::text(big.clone())).await.expect("send");
    assert_eq!(next_text(&mut ann).await, big);
    assert_eq!(next_text(&mut bob).await, big);
    ann.close(None).await.expect("close");
    // Graceful shutdown reaches TLS sessions too: Close 1001.
    let closing = tokio::spawn(async move {
        loop {
            match within("the shutdown Close", bob.next()).await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("expected Close 1001, got {other:?}"),
            }
        }
    });
    server.shutdown().await;
    assert_eq!(closing.await.expect("reader"), Some(1001));
}

#[tokio::test]
async fn a_plain_text_client_on_the_tls_port_is_dropped_and_others_are_served() {
    let server = TlsServer::start(Config::default()).await;
    let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    let mut answer = Vec::new();
    let _ = within(
        "the server to drop the connection",
        tcp.read_to_end(&mut answer),
    )
    .await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 101"),
        "a plain-text client was upgraded on the TLS port"
    );
    let mut ann = server.connect().await;
    ann.send(Message::text("still serving"))
        .await
        .expect("send");
    assert_eq!(next_text(&mut ann).await, "still serving");
    assert_eq!(server.hub.subscriber_count(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_starts_tls_is_dropped_after_the_handshake_timeout() {
    let config = Config::default().handshake_timeout(Duration::from_millis(300));
    let server = TlsServer::start(config).await;
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let started = tokio::time::Instant::now();
    let mut byte = [0u8; 1];
    let read = within(
        "the server to drop the silent client",
        silent.read(&mut byte),
    )
    .await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected the connection to end, read {read:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Meanwhile and afterwards, real clients are served.
    let mut ann = server.connect().await;
    ann.send(Message::text("after")).await.expect("send");
    assert_eq!(next_text(&mut ann).await, "after");
    server.shutdown().await;
}
