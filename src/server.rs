//! The server: accept loop, path routes, the HTTP upgrade, the handshake hook,
//! graceful shutdown.
//!
//! HTTP is hyper's job: a request that is not a valid upgrade gets a real
//! status line and a short body (404, 400, 426), not a dropped connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::Instrument;

use crate::config::Config;
use crate::message::{CloseCode, close_reason};
use crate::metrics::Metrics;
use crate::request::Request;
use crate::session::{Session, Setup};

type BoxFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;
type Handler = Arc<dyn Fn(Session) -> BoxFuture + Send + Sync>;
type Hook = Arc<dyn Fn(&Request, &mut Config) -> Result<(), Rejection> + Send + Sync>;

/// What a route handler may return: `()` or a `Result` whose error is logged.
///
/// A handler that returns an error has its session closed with 1011
/// (Internal Error); otherwise the session closes with 1000 when the handler
/// returns, as in Ktor.
pub trait HandlerOutput: Send + 'static {
    /// Turns the output into the error text to report, if any.
    fn into_error(self) -> Option<String>;
}

impl HandlerOutput for () {
    fn into_error(self) -> Option<String> {
        None
    }
}

impl<E: fmt::Display + Send + 'static> HandlerOutput for Result<(), E> {
    fn into_error(self) -> Option<String> {
        self.err().map(|e| e.to_string())
    }
}

pub(crate) type HandlerResult = Option<String>;

/// An HTTP answer that refuses an upgrade, from the handshake hook.
///
/// ```
/// use wshub::Rejection;
/// let no = Rejection::new(http::StatusCode::FORBIDDEN, "origin not allowed");
/// assert_eq!(no.status(), http::StatusCode::FORBIDDEN);
/// ```
#[derive(Clone, Debug)]
pub struct Rejection {
    status: StatusCode,
    body: String,
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl Rejection {
    /// A rejection with a status and a short plain-text body.
    pub fn new(status: StatusCode, body: impl Into<String>) -> Rejection {
        Rejection {
            status,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// 401 Unauthorized with a body.
    pub fn unauthorized(body: impl Into<String>) -> Rejection {
        Rejection::new(StatusCode::UNAUTHORIZED, body)
    }

    /// 403 Forbidden with a body.
    pub fn forbidden(body: impl Into<String>) -> Rejection {
        Rejection::new(StatusCode::FORBIDDEN, body)
    }

    /// Adds a response header.
    #[must_use]
    pub fn header(mut self, name: header::HeaderName, value: HeaderValue) -> Rejection {
        self.headers.push((name, value));
        self
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body text.
    pub fn body(&self) -> &str {
        &self.body
    }

    /// The HTTP answer: the status, the headers, the body with a final
    /// newline, as plain text, with `Connection: close`. Generic over the
    /// body type, so that hyper's `Full` and axum's `Body` share it.
    pub(crate) fn into_http<B: From<Bytes>>(self) -> http::Response<B> {
        let mut body = self.body;
        if !body.ends_with('\n') {
            body.push('\n');
        }
        let mut response = http::Response::new(B::from(Bytes::from(body)));
        *response.status_mut() = self.status;
        response
            .headers_mut()
            .extend(self.headers.into_iter().map(|(k, v)| (Some(k), v)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        // A refused connection serves no second request (see `open`).
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }
}

struct Route {
    handler: Handler,
    raw: bool,
    config: Option<Config>,
    /// Subprotocols the route speaks, besides the config's.
    protocols: &'static [&'static str],
}

/// A WebSocket server with path routes (Ktor's `routing { webSocket("/path") { } }`).
///
/// ```no_run
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// use wshub::{Hub, Server};
///
/// let hub = Hub::new();
/// let server = Server::new()
///     .route("/ws", move |mut session| {
///         let hub = hub.clone();
///         async move {
///             let subscription = hub.subscribe();
///             session.send("You are connected to WebSocket!").await?;
///             session.join(subscription).await;
///             Ok::<_, wshub::Error>(())
///         }
///     })
///     .route("/echo", |mut session| async move {
///         while let Some(msg) = session.recv().await {
///             if session.send(msg).await.is_err() {
///                 break;
///             }
///         }
///     });
/// let listener = server.bind("127.0.0.1:8080").await?;
/// server.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await
/// # }
/// ```
#[derive(Clone)]
pub struct Server {
    routes: HashMap<String, Arc<Route>>,
    config: Config,
    hook: Option<Hook>,
    shutdown_timeout: Duration,
    max_connections: Option<usize>,
    max_handshakes: usize,
    max_handshakes_per_ip: Option<usize>,
    first_byte_timeout: Duration,
    max_request_head: usize,
    session_headers: Arc<[HeaderName]>,
    /// Lower-cased `Origin` values allowed to upgrade; `None` allows any.
    allowed_origins: Option<Arc<[String]>>,
    /// Sessions open or reserved by an accepted upgrade; counted per `serve`.
    live: Arc<AtomicUsize>,
    /// The sessions' send tasks, which `serve` waits for; one per `serve`.
    tracker: TaskTracker,
    /// Where [`Server::metrics`] counts, and the path it serves them at.
    metrics: Option<(String, Metrics)>,
    /// What [`Server::page`] serves, by path.
    pages: HashMap<String, Page>,
}

/// A fixed HTTP response body and its content type.
#[derive(Clone)]
struct Page {
    content_type: HeaderValue,
    body: Bytes,
}

/// How long a shutdown waits for sessions before it aborts them, unless
/// told otherwise ([`Server::shutdown_timeout`], and `Sessions` of the
/// `axum` feature).
pub(crate) const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// A slot among [`Server::max_connections`], held from the accepted upgrade
/// to the end of the session.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a client past [`Server::max_handshakes`] gets before its connection
/// is closed: the server has not read its request, so it answers at once.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Retry-After: 1\r\n\
Connection: close\r\n\
Content-Length: 49\r\n\
\r\n\
too many handshakes in progress; try again later\n";

/// What a client past [`Server::max_handshakes_per_ip`] gets, as [`BUSY`].
const BUSY_ADDRESS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Retry-After: 1\r\n\
Connection: close\r\n\
Content-Length: 67\r\n\
\r\n\
too many handshakes in progress from your address; try again later\n";

/// The address group [`Server::max_handshakes_per_ip`] counts a client in:
/// its IPv4 address (an IPv4-mapped IPv6 address is its IPv4 address), or
/// the /64 of its IPv6 address, since one host usually holds a whole /64.
fn address_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// Connections in their HTTP phase per address group, for one `serve`.
struct PerIp {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    /// Takes a place for `peer`'s address group, if it has one left.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<IpPlace> {
        let group = address_group(peer);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(group).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(IpPlace {
            table: self.clone(),
            group,
        })
    }
}

/// A place among [`Server::max_handshakes_per_ip`], given back on drop.
struct IpPlace {
    table: Arc<PerIp>,
    group: IpAddr,
}

impl Drop for IpPlace {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.group) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.group);
            }
        }
    }
}

/// A connection's places among the handshake limits, held for its HTTP phase.
struct Admission {
    _handshake: OwnedSemaphorePermit,
    _address: Option<IpPlace>,
    /// Counts it among the handshakes in flight, when the server has metrics.
    _counted: Option<crate::metrics::HandshakeGuard>,
}

/// Admits a new connection to its HTTP phase, or says which 503 it gets.
fn admit(
    handshakes: &Arc<Semaphore>,
    per_ip: Option<&Arc<PerIp>>,
    metrics: Option<&Metrics>,
    peer: SocketAddr,
) -> Result<Admission, &'static [u8]> {
    let handshake = handshakes.clone().try_acquire_owned().map_err(|_| BUSY)?;
    let address = match per_ip {
        Some(table) => Some(table.admit(peer.ip()).ok_or(BUSY_ADDRESS)?),
        None => None,
    };
    Ok(Admission {
        _handshake: handshake,
        _address: address,
        _counted: metrics.map(Metrics::handshake_started),
    })
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut paths: Vec<_> = self.routes.keys().collect();
        paths.sort();
        f.debug_struct("Server")
            .field("routes", &paths)
            .field("config", &self.config)
            .field("hook", &self.hook.is_some())
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_handshakes", &self.max_handshakes)
            .field("max_handshakes_per_ip", &self.max_handshakes_per_ip)
            .field("first_byte_timeout", &self.first_byte_timeout)
            .field("max_request_head", &self.max_request_head)
            .field("session_headers", &self.session_headers)
            .field("allowed_origins", &self.allowed_origins)
            .field("metrics", &self.metrics.as_ref().map(|(path, _)| path))
            .finish()
    }
}

/// How many bytes the kernel may hold unsent for one connection: the
/// socket reports itself writable only below this (`TCP_NOTSENT_LOWAT`,
/// Linux). Without it a client's kernel buffers grow to megabytes, and once
/// they are full the socket takes nothing until a third of them has drained,
/// which for a client reading slowly can be many seconds: long enough for
/// [`Config::send_timeout`] to mistake a slow reader for a stuck one. With
/// it, the socket takes more bytes whenever the client has read some.
pub(crate) const NOTSENT_LOWAT: u32 = 16 << 10;

/// Socket options for an accepted connection: no Nagle delay (frames are
/// already gathered into one write), and [`NOTSENT_LOWAT`].
pub(crate) fn tune(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let _ = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(NOTSENT_LOWAT);
    }
}

impl Server {
    /// The request headers a session keeps by default (see
    /// [`session_headers`](Self::session_headers)): who the client says it
    /// is and where it connected from, without credentials.
    pub const DEFAULT_SESSION_HEADERS: [HeaderName; 7] = [
        header::HOST,
        header::ORIGIN,
        header::USER_AGENT,
        header::SEC_WEBSOCKET_PROTOCOL,
        header::FORWARDED,
        HeaderName::from_static("x-forwarded-for"),
        HeaderName::from_static("x-real-ip"),
    ];

    /// A server with no routes and [`Config::default`].
    pub fn new() -> Server {
        Server {
            routes: HashMap::new(),
            config: Config::default(),
            hook: None,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            max_connections: Some(10_000),
            max_handshakes: 1024,
            max_handshakes_per_ip: Some(64),
            first_byte_timeout: Duration::from_secs(3),
            max_request_head: 16 * 1024,
            session_headers: Server::DEFAULT_SESSION_HEADERS.into(),
            allowed_origins: None,
            live: Arc::default(),
            tracker: TaskTracker::new(),
            metrics: None,
            pages: HashMap::new(),
        }
    }

    /// Only these origins may open a session from a browser: an upgrade
    /// request whose `Origin` header is not one of them gets `403 Forbidden`
    /// (cross-site WebSocket hijacking: a page on another site cannot use
    /// the visitor's cookies to open a session).
    ///
    /// Origins are compared as `scheme://host[:port]`, ignoring ASCII case.
    /// A request without an `Origin` header (not from a browser) is allowed:
    /// authenticate such clients in [`on_handshake`](Self::on_handshake).
    /// Checked after the request's validity and before the handshake hook.
    ///
    /// Default: any origin.
    ///
    /// ```
    /// let server = wshub::Server::new()
    ///     .allowed_origins(["https://app.example.com", "http://localhost:3000"]);
    /// ```
    #[must_use]
    pub fn allowed_origins<I, S>(mut self, origins: I) -> Server
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let origins: Vec<String> = origins
            .into_iter()
            .map(|o| o.as_ref().trim_end_matches('/').to_ascii_lowercase())
            .collect();
        self.allowed_origins = Some(origins.into());
        self
    }

    /// The most WebSocket sessions open at once; `None` for no limit.
    ///
    /// An upgrade request beyond it is answered `503 Service Unavailable`
    /// (with `Retry-After: 1`) before upgrading, after the route, the
    /// request's validity and the [handshake hook](Self::on_handshake) are
    /// checked, so a client learns the most specific reason first.
    ///
    /// Default: 10,000. Each idle session costs wshub about 6 KiB plus the
    /// kernel's socket buffers and one file descriptor: raise it together
    /// with the process's open-file limit on a bigger machine, lower it to
    /// keep memory bounded on a small one.
    ///
    /// ```
    /// let server = wshub::Server::new().max_connections(Some(50_000));
    /// ```
    #[must_use]
    pub fn max_connections(mut self, max: Option<usize>) -> Server {
        self.max_connections = max;
        self
    }

    /// The most connections still in their HTTP handshake at once (`0` is
    /// taken as 1).
    ///
    /// A connection accepted beyond it gets `503 Service Unavailable`
    /// straight away and is closed, without its request being read. A
    /// connection holds its place from accept until its upgrade is handed to
    /// the session, or until it is refused, and never longer than
    /// [`Config::handshake_timeout`], which is one deadline for the whole
    /// HTTP phase (the TLS handshake included): a client cannot renew it by
    /// sending request after request, since a refused request ends its
    /// connection. Together they bound what clients that open connections
    /// and send nothing or little (slowloris) can hold; open sessions are not
    /// affected.
    ///
    /// Default: 1,024.
    #[must_use]
    pub fn max_handshakes(mut self, max: usize) -> Server {
        self.max_handshakes = max.max(1);
        self
    }

    /// The most connections from one client address still in their HTTP
    /// handshake at once; `None` for no limit (`Some(0)` is taken as 1).
    ///
    /// A connection accepted beyond it gets the same `503 Service
    /// Unavailable` (`Retry-After: 1`) at once as one beyond
    /// [`max_handshakes`](Self::max_handshakes), and is closed; its body says
    /// the limit is per address. Without it one address could take every
    /// handshake place and lock everyone else out until its connections time
    /// out. Addresses are counted the way a client holds them: an IPv4
    /// address on its own (an IPv4-mapped IPv6 address as that IPv4
    /// address), an IPv6 address together with the rest of its /64, since a
    /// single host usually has a whole /64 to pick from.
    ///
    /// Default: 64. A handshake takes about one round trip, so even many
    /// users behind one NAT rarely have more than a few in progress at once.
    /// **Behind a reverse proxy or load balancer every client has the
    /// proxy's address**: there this limit caps the whole server at 64
    /// handshakes in progress; set `None` and limit per client in the proxy.
    ///
    /// ```
    /// // Directly on the internet: keep a limit, a tighter one here.
    /// let server = wshub::Server::new().max_handshakes_per_ip(Some(16));
    /// // Behind nginx, which connects from 127.0.0.1 for everyone.
    /// let proxied = wshub::Server::new().max_handshakes_per_ip(None);
    /// ```
    #[must_use]
    pub fn max_handshakes_per_ip(mut self, max: Option<usize>) -> Server {
        self.max_handshakes_per_ip = max.map(|max| max.max(1));
        self
    }

    /// How long a new connection may stay silent: one that has sent no byte
    /// at all (no request, no TLS hello) this long after it was accepted is
    /// closed without an answer. Capped by [`Config::handshake_timeout`],
    /// which still bounds the rest of the handshake.
    ///
    /// A real client sends its first bytes as soon as it is connected, so
    /// this can be much shorter than the whole handshake's deadline, and the
    /// handshake places of connections that send nothing are freed sooner.
    ///
    /// Default: 3 s. Shorter frees those places sooner; longer is kinder to
    /// networks that lose the first packet (TCP resends it after 1 s, then
    /// 2 s more).
    ///
    /// ```
    /// use std::time::Duration;
    /// let server = wshub::Server::new().first_byte_timeout(Duration::from_secs(1));
    /// ```
    #[must_use]
    pub fn first_byte_timeout(mut self, timeout: Duration) -> Server {
        self.first_byte_timeout = timeout;
        self
    }

    /// The largest request head (request line and headers) a client may
    /// send, in bytes. A longer one is answered `431 Request Header Fields
    /// Too Large` and the connection closed. The head is measured as
    /// clients usually write it (`Name: value`, CRLF line ends).
    ///
    /// hyper reads the head into a buffer of this size (at least 8 KiB, its
    /// floor) and answers 431 itself, without a body, when the buffer fills
    /// before the head ends; a longer head that happened to fit into one
    /// read is caught once parsed and answered 431 with a body saying so.
    /// Either way, the refused client's extra bytes are read and discarded
    /// for a moment before the connection closes, so that it gets the 431
    /// rather than a reset while it is still sending.
    ///
    /// Default: 16 KiB, room for a browser with a large cookie jar (many
    /// servers allow 8 to 16 KiB). A handshake costs up to this much memory
    /// while it lasts; hyper's own default is about 400 KiB.
    ///
    /// ```
    /// let server = wshub::Server::new().max_request_head(32 * 1024);
    /// ```
    #[must_use]
    pub fn max_request_head(mut self, bytes: usize) -> Server {
        self.max_request_head = bytes;
        self
    }

    /// The request headers a session keeps, in
    /// [`Session::request`](crate::Session::request), once the upgrade is
    /// accepted; the [handshake hook](Self::on_handshake) sees them all.
    ///
    /// A session lives long and a request head may be up to
    /// [`max_request_head`](Self::max_request_head): so that what a session
    /// holds does not grow with whatever headers a client adds, it keeps its
    /// method, URI and peer address and only these headers, copied into a
    /// buffer of exactly their size; the rest is freed with the handshake.
    ///
    /// Default: [`DEFAULT_SESSION_HEADERS`](Self::DEFAULT_SESSION_HEADERS):
    /// `Host`, `Origin`, `User-Agent`, `Sec-WebSocket-Protocol`,
    /// `Forwarded`, `X-Forwarded-For` and `X-Real-IP`, typically a few
    /// hundred bytes. Credentials (`Cookie`, `Authorization`) are not kept:
    /// check them in the hook. Each header you add costs every session its
    /// size for the session's whole life.
    ///
    /// ```
    /// use http::HeaderName;
    /// use wshub::Server;
    ///
    /// // The default set and the user id an authenticating proxy adds.
    /// let server = Server::new().session_headers(
    ///     Server::DEFAULT_SESSION_HEADERS
    ///         .into_iter()
    ///         .chain([HeaderName::from_static("x-user-id")]),
    /// );
    /// ```
    #[must_use]
    pub fn session_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Server {
        self.session_headers = names.into_iter().collect();
        self
    }

    /// Serves `metrics` at `path` (a plain `GET`, answered in the Prometheus
    /// text format) and counts this server in it: open sessions, handshakes
    /// in flight, upgrades accepted and refused (by status), sessions closed
    /// (by close code and side), bytes read and written. The sessions of a
    /// route whose [`Config::metrics`] is unset are counted here.
    ///
    /// The path answers anyone who can reach the server: where the server
    /// faces the internet, serve the metrics from a second `Server` on an
    /// internal address, or put them behind your own HTTP route with
    /// [`Metrics::encode`].
    ///
    /// ```
    /// use wshub::{Metrics, Server};
    /// let metrics = Metrics::new();
    /// let server = Server::new().metrics("/metrics", metrics.clone());
    /// # drop(server);
    /// ```
    #[must_use]
    pub fn metrics(mut self, path: &str, metrics: Metrics) -> Server {
        self.metrics = Some((path.to_owned(), metrics));
        self
    }

    /// Serves `body` at `path` to plain HTTP `GET` and `HEAD` requests, with
    /// `content_type`: the page, script or stylesheet of a browser client,
    /// compiled into the binary with `include_str!`. Other methods get 405.
    /// A WebSocket route at the same path takes its upgrades; a plain `GET`
    /// there gets the page. Each answer closes its connection (as the
    /// metrics do), and says `Cache-Control: no-cache`, so that a browser
    /// checks for a newer build.
    ///
    /// ```
    /// use wshub::Server;
    /// let server = Server::new()
    ///     .page("/", "text/html; charset=utf-8", "<!doctype html><p>hello</p>")
    ///     .page("/app.js", "text/javascript; charset=utf-8", "console.log('hi')");
    /// # drop(server);
    /// ```
    ///
    /// # Panics
    ///
    /// If `content_type` is not a valid header value (a programming error,
    /// found at start-up).
    #[must_use]
    pub fn page(
        mut self,
        path: &str,
        content_type: &'static str,
        body: impl Into<Bytes>,
    ) -> Server {
        let page = Page {
            content_type: HeaderValue::from_static(content_type),
            body: body.into(),
        };
        self.pages.insert(path.to_owned(), page);
        self
    }

    /// Sets the options every route uses unless it has its own.
    #[must_use]
    pub fn config(mut self, config: Config) -> Server {
        self.config = config;
        self
    }

    /// Serves WebSocket sessions at `path` (an exact path, query ignored).
    ///
    /// The handler gets each [`Session`] and runs in that connection's task.
    /// When it returns the session closes with 1000, or 1011 if it returned an
    /// error. A later route on the same path replaces the earlier one.
    #[must_use]
    pub fn route<F, Fut>(self, path: &str, handler: F) -> Server
    where
        F: Fn(Session) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerOutput,
    {
        self.add(path, handler, false, None)
    }

    /// As [`route`](Self::route), with options for this route only.
    #[must_use]
    pub fn route_with_config<F, Fut>(self, path: &str, config: Config, handler: F) -> Server
    where
        F: Fn(Session) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerOutput,
    {
        self.add(path, handler, false, Some(config))
    }

    /// Serves the pub/sub protocol of `pubsub` at `path` (see
    /// [`PubSub::serve`](crate::PubSub::serve)), selecting the `wshub.v1`
    /// subprotocol for clients that offer it.
    ///
    /// ```
    /// use wshub::{PubSub, PubSubConfig, Server};
    /// let pubsub = PubSub::new(PubSubConfig::default()).unwrap();
    /// let server = Server::new().pubsub("/pubsub", &pubsub);
    /// # drop(server);
    /// ```
    #[must_use]
    pub fn pubsub(self, path: &str, pubsub: &crate::PubSub) -> Server {
        let mut server = self.add(path, pubsub.route(), false, None);
        if let Some(route) = server.routes.get_mut(path).and_then(Arc::get_mut) {
            route.protocols = &[crate::SUBPROTOCOL];
        }
        server
    }

    /// A raw route (Ktor's `webSocketRaw`): the handler sees pings, pongs and
    /// Close frames, and the server sends no pings of its own.
    ///
    /// tungstenite still answers each ping with a pong and each Close with a
    /// Close, as RFC 6455 requires; what raw mode turns off is wshub's ping
    /// timer and its hiding of control frames.
    #[must_use]
    pub fn raw_route<F, Fut>(self, path: &str, handler: F) -> Server
    where
        F: Fn(Session) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerOutput,
    {
        self.add(path, handler, true, None)
    }

    fn add<F, Fut>(mut self, path: &str, handler: F, raw: bool, config: Option<Config>) -> Server
    where
        F: Fn(Session) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerOutput,
    {
        // `map` rather than an async block, which would hold the future twice.
        let handler: Handler =
            Arc::new(move |session| Box::pin(handler(session).map(HandlerOutput::into_error)));
        self.routes.insert(
            path.to_owned(),
            Arc::new(Route {
                handler,
                raw,
                config,
                protocols: &[],
            }),
        );
        self
    }

    /// A hook that sees every valid upgrade request before it is accepted.
    ///
    /// Return `Err(Rejection)` to answer with that status instead (401/403 for
    /// auth, 403 for a foreign `Origin`), or adjust this connection's
    /// [`Config`] (for example a larger `max_message_size` for trusted clients;
    /// frames are limited to the smaller of the two limits).
    ///
    /// The hook sees every request header; the session then keeps only the
    /// [`session_headers`](Self::session_headers), so check credentials
    /// (`Cookie`, `Authorization`) here.
    ///
    /// ```
    /// use wshub::{Rejection, Server};
    /// let server = Server::new().on_handshake(|request, _config| {
    ///     match request.query_param("token").as_deref() {
    ///         Some("secret") => Ok(()),
    ///         _ => Err(Rejection::unauthorized("missing or wrong token")),
    ///     }
    /// });
    /// ```
    #[must_use]
    pub fn on_handshake(
        mut self,
        hook: impl Fn(&Request, &mut Config) -> Result<(), Rejection> + Send + Sync + 'static,
    ) -> Server {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// How long [`serve`](Self::serve) waits for sessions to finish after the
    /// shutdown signal before it aborts them.
    ///
    /// Default: 10 s, which covers the close handshake
    /// ([`Config::close_timeout`]) of every session with room to spare.
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Server {
        self.shutdown_timeout = timeout;
        self
    }

    /// Binds a TCP listener on `addr` for [`serve`](Self::serve) or
    /// `serve_tls`, with a listen backlog sized for this server.
    ///
    /// The backlog holds connections the kernel has completed but the
    /// server has not yet accepted. tokio's `TcpListener::bind` asks for
    /// 128, as the standard library does: in a burst of connections (many
    /// clients reconnecting at once after a restart) those beyond it have
    /// their SYN dropped and wait a second for the retransmission, though
    /// the server could take them at once. This asks for
    /// max(1,024, [`max_handshakes`](Self::max_handshakes)), so call it
    /// after setting that; the kernel caps it at `net.core.somaxconn` (4,096
    /// on Linux since 5.4, 128 before). On Unix it sets `SO_REUSEADDR`, as
    /// `TcpListener::bind` does, so a restarted server can bind its port
    /// while old connections linger in `TIME_WAIT`. Like
    /// `TcpListener::bind`, it tries each address `addr` resolves to until
    /// one binds.
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let server = wshub::Server::new().route("/ws", |session| async move { drop(session) });
    /// let listener = server.bind("0.0.0.0:8080").await?;
    /// server.serve(listener, std::future::pending()).await
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As `TcpListener::bind`: the address does not resolve, or no address
    /// it resolves to can be bound (in use, not allowed).
    pub async fn bind(&self, addr: impl tokio::net::ToSocketAddrs) -> io::Result<TcpListener> {
        let backlog = u32::try_from(self.max_handshakes.max(1024)).unwrap_or(u32::MAX);
        let mut failure = None;
        for addr in tokio::net::lookup_host(addr).await? {
            match listen(addr, backlog) {
                Ok(listener) => return Ok(listener),
                Err(err) => failure = Some(err),
            }
        }
        Err(failure.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the address did not resolve to any socket address",
            )
        }))
    }

    /// Serves connections from `listener` until `shutdown` completes.
    ///
    /// Bind the listener with [`bind`](Self::bind), which gives it a listen
    /// backlog for bursts of connections.
    ///
    /// Then it stops accepting, sends every session a Close frame with 1001
    /// (Going Away) after the hub messages already buffered for it, waits for
    /// every connection task to end (up to the [shutdown
    /// timeout](Self::shutdown_timeout), then aborts the rest, each
    /// session's send task with its connection), and returns once no task
    /// of the server is left: no session writes to its client after that.
    /// Tasks a handler spawned itself are its own.
    ///
    /// # Errors
    ///
    /// None today: accept errors (such as running out of file descriptors) are
    /// logged and retried after a short pause, since they are usually passing.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        self.serve_with(listener, Encryption::None, shutdown).await
    }

    /// Serves `wss://` connections from `listener` until `shutdown`
    /// completes, as [`serve`](Self::serve) does `ws://` (the `tls` feature).
    ///
    /// Each connection's TLS handshake runs in its own task and counts among
    /// [`max_handshakes`](Self::max_handshakes). [`Config::handshake_timeout`]
    /// covers the TLS handshake and the HTTP request together, from accept to
    /// the upgrade: it is one deadline, not one for each. A client that fails
    /// the TLS handshake is dropped (logged at debug level), and a connection
    /// past `max_handshakes` is closed without an answer, since a plain-text
    /// 503 means nothing inside TLS.
    ///
    /// Build the acceptor from a rustls `ServerConfig`; wshub re-exports
    /// [`tokio_rustls`](crate::tokio_rustls) so the versions match:
    ///
    /// ```no_run
    /// # async fn demo(
    /// #     certs: Vec<wshub::tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
    /// #     key: wshub::tokio_rustls::rustls::pki_types::PrivateKeyDer<'static>,
    /// # ) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use wshub::tokio_rustls::{TlsAcceptor, rustls};
    ///
    /// let tls = rustls::ServerConfig::builder()
    ///     .with_no_client_auth()
    ///     .with_single_cert(certs, key)?;
    /// let server = wshub::Server::new().route("/ws", |session| async move { drop(session) });
    /// let listener = server.bind("0.0.0.0:443").await?;
    /// server
    ///     .serve_tls(listener, TlsAcceptor::from(Arc::new(tls)), std::future::pending())
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// None today, as for [`serve`](Self::serve).
    #[cfg(feature = "tls")]
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        self.serve_with(listener, Encryption::Tls(acceptor), shutdown)
            .await
    }

    async fn serve_with(
        self,
        listener: TcpListener,
        encryption: Encryption,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let mut app = self;
        app.live = Arc::default();
        app.tracker = TaskTracker::new();
        let handshakes = Arc::new(Semaphore::new(app.max_handshakes));
        let per_ip = app.max_handshakes_per_ip.map(|max| {
            Arc::new(PerIp {
                max,
                counts: Mutex::default(),
            })
        });
        let app = Arc::new(app);
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving");
        }
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        tune(&tcp);
                        match admit(&handshakes, per_ip.as_ref(), app.counted_metrics(), peer) {
                            Ok(admission) => {
                                tasks.spawn(connection(
                                    tcp,
                                    peer,
                                    app.clone(),
                                    stop.clone(),
                                    admission,
                                    encryption.clone(),
                                    Instant::now(),
                                ));
                            }
                            Err(busy) => {
                                tracing::debug!(%peer, "too many handshakes in progress: 503");
                                if let Some(metrics) = app.counted_metrics() {
                                    metrics.upgrade_refused(503);
                                }
                                if matches!(encryption, Encryption::None) {
                                    // Best effort: the answer fits any socket buffer.
                                    let _ = tcp.try_write(busy);
                                }
                            }
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "accept failed; pausing");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(listener);
        tracing::info!(connections = tasks.len(), "shutting down");
        stop.cancel();
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(app.shutdown_timeout, drain)
            .await
            .is_err()
        {
            tracing::warn!(left = tasks.len(), "shutdown timeout: aborting sessions");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        // Every connection task has ended, and each took its send task with
        // it (awaited, or aborted on drop): wait until the last one is gone,
        // so that nothing of this server runs once `serve` returns.
        app.tracker.close();
        app.tracker.wait().await;
        Ok(())
    }

    /// Refuses a browser `Origin` that is not allowed.
    fn check_origin(&self, headers: &HeaderMap) -> Result<(), Rejection> {
        let (Some(allowed), Some(origin)) = (&self.allowed_origins, headers.get(header::ORIGIN))
        else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(origin.as_bytes());
        let wanted = text.trim_end_matches('/').to_ascii_lowercase();
        if allowed.contains(&wanted) {
            Ok(())
        } else {
            Err(Rejection::forbidden(format!(
                "origin {text:?} is not allowed to open a WebSocket session here"
            )))
        }
    }

    /// Takes a slot among `max_connections`, or says why not.
    fn reserve(&self) -> Result<Slot, Rejection> {
        let taken = self.live.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(self.live.clone());
        match self.max_connections {
            Some(max) if taken >= max => Err(Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("too many connections: this server holds at most {max} WebSocket sessions"),
            )
            .header(header::RETRY_AFTER, HeaderValue::from_static("1"))),
            _ => Ok(slot),
        }
    }

    /// Decides what to do with one HTTP request: a rejection, or a 101 and the
    /// upgrade to run afterwards.
    fn respond(
        &self,
        mut req: http::Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Answer, Rejection> {
        let head = head_len(&req);
        if head > self.max_request_head {
            return Err(Rejection::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!(
                    "request head of at least {head} bytes: this server takes at most {} bytes",
                    self.max_request_head
                ),
            ));
        }
        if let Some((path, metrics)) = &self.metrics {
            if req.uri().path() == path && !self.routes.contains_key(path) {
                return scrape(req.method(), metrics).map(Answer::Plain);
            }
        }
        if let Some(page) = self.pages.get(req.uri().path()) {
            if !self.routes.contains_key(req.uri().path()) || !is_upgrade(&req) {
                return serve_page(req.method(), page).map(Answer::Plain);
            }
        }
        let Some(route) = self.routes.get(req.uri().path()).cloned() else {
            return Err(Rejection::new(
                StatusCode::NOT_FOUND,
                format!("no WebSocket route at {}", req.uri().path()),
            ));
        };
        let accept = check_upgrade(req.method(), req.version(), req.headers())?;
        self.check_origin(req.headers())?;
        let on_upgrade = hyper::upgrade::on(&mut req);
        let (parts, _body) = req.into_parts();
        let request = Request::borrowed(parts.method, parts.uri, parts.headers, Some(peer));
        let mut config = route.config.clone().unwrap_or_else(|| self.config.clone());
        if let Some(hook) = &self.hook {
            hook(&request, &mut config)?;
        }
        let slot = self.reserve()?;
        let protocol = choose_subprotocol(request.headers(), route.protocols, &config.subprotocols);
        // What the session keeps does not grow with what the client sent.
        let request = request.keeping(&self.session_headers);
        Ok(Answer::Upgrade(
            switching_protocols(accept, protocol),
            Box::new(Upgrade {
                on_upgrade,
                route,
                request,
                config,
                slot,
            }),
        ))
    }

    fn counted_metrics(&self) -> Option<&Metrics> {
        self.metrics.as_ref().map(|(_, metrics)| metrics)
    }
}

/// What a request gets: a 101 and the upgrade to run afterwards, or a plain
/// answer (the metrics).
enum Answer {
    Upgrade(http::Response<Full<Bytes>>, Box<Upgrade>),
    Plain(http::Response<Full<Bytes>>),
}

/// The answer at the metrics path: the metrics for a `GET` (or the head of
/// them for a `HEAD`), 405 otherwise.
fn scrape(method: &Method, metrics: &Metrics) -> Result<http::Response<Full<Bytes>>, Rejection> {
    if method != Method::GET && method != Method::HEAD {
        return Err(Rejection::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "the metrics are read with GET",
        )
        .header(header::ALLOW, HeaderValue::from_static("GET, HEAD")));
    }
    let body = if method == Method::GET {
        Bytes::from(metrics.encode())
    } else {
        Bytes::new()
    };
    let mut response = http::Response::new(Full::new(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(Metrics::CONTENT_TYPE),
    );
    // As for a refusal: one request per connection (see `open`).
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    Ok(response)
}

/// Whether a request asks for a WebSocket upgrade (the rest of the
/// handshake is checked by the route).
fn is_upgrade<B>(req: &http::Request<B>) -> bool {
    req.headers().get_all(header::UPGRADE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.eq_ignore_ascii_case("websocket"))
    })
}

/// The answer at a page's path: the page for a `GET` (its head for a
/// `HEAD`), 405 otherwise.
fn serve_page(method: &Method, page: &Page) -> Result<http::Response<Full<Bytes>>, Rejection> {
    if method != Method::GET && method != Method::HEAD {
        return Err(
            Rejection::new(StatusCode::METHOD_NOT_ALLOWED, "this page is read with GET")
                .header(header::ALLOW, HeaderValue::from_static("GET, HEAD")),
        );
    }
    let body = if method == Method::GET {
        page.body.clone()
    } else {
        Bytes::new()
    };
    let length = page.body.len();
    let mut response = http::Response::new(Full::new(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, page.content_type.clone());
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    Ok(response)
}

/// The `101 Switching Protocols` that accepts an upgrade, with its
/// `Sec-WebSocket-Accept` value (from [`check_upgrade`]) and an empty body.
pub(crate) fn switching_protocols<B: From<Bytes>>(
    accept: HeaderValue,
    protocol: Option<HeaderValue>,
) -> http::Response<B> {
    let mut response = http::Response::new(B::from(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(protocol) = protocol {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
}

/// The subprotocol to select: the first the client offers (in its
/// `Sec-WebSocket-Protocol` headers, in order) that `route` or `config`
/// supports.
pub(crate) fn choose_subprotocol(
    headers: &http::HeaderMap,
    route: &[&str],
    config: &[String],
) -> Option<HeaderValue> {
    if route.is_empty() && config.is_empty() {
        return None;
    }
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .find(|offered| route.contains(offered) || config.iter().any(|c| c == offered))
        .and_then(|chosen| HeaderValue::from_str(chosen).ok())
}

/// An accepted upgrade, run once hyper hands over the connection.
struct Upgrade {
    on_upgrade: OnUpgrade,
    route: Arc<Route>,
    request: Request,
    config: Config,
    slot: Slot,
}

/// A listening socket on `addr` with `backlog`, for [`Server::bind`].
fn listen(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // On Windows SO_REUSEADDR would let another socket take the port over.
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The size of `req`'s head as clients write it: the request line, each
/// header as `Name: value` with CRLF line ends, and the blank line. That is
/// the exact size on the wire for the usual spelling; a client that leaves
/// out optional spaces or sends bare LFs is counted a few bytes more.
fn head_len<B>(req: &http::Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + "://".len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    let line = req.method().as_str().len() + " ".len() + target + " HTTP/1.1\r\n".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + ": ".len() + value.len() + "\r\n".len())
        .sum();
    line + headers + "\r\n".len()
}

/// Checks an upgrade request against RFC 6455 §4.2.1 and returns the
/// `Sec-WebSocket-Accept` value.
pub(crate) fn check_upgrade(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<HeaderValue, Rejection> {
    let bad = |why: &str| Rejection::new(StatusCode::BAD_REQUEST, why);
    if method != Method::GET {
        return Err(bad("a WebSocket upgrade must be a GET request"));
    }
    if version < Version::HTTP_11 {
        return Err(bad("a WebSocket upgrade needs HTTP/1.1"));
    }
    // RFC 6455 §4.1: the opening handshake is a GET; a body has no meaning
    // there, and its bytes would be read as the first WebSocket frames.
    let has_length = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .any(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) != Some(0));
    if has_length || headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(bad("a WebSocket upgrade request must not have a body \
             (no Content-Length other than 0, no Transfer-Encoding)"));
    }
    if !header_has_token(headers, header::UPGRADE, "websocket") {
        return Err(bad(
            "missing \"Upgrade: websocket\" header: this is a WebSocket endpoint",
        ));
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade") {
        return Err(bad("missing \"Connection: Upgrade\" header"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(Rejection::new(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported WebSocket version: only version 13 is supported",
        )
        .header(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| bad("missing Sec-WebSocket-Key header"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .map_err(|_| bad("Sec-WebSocket-Key is not valid base64"))?;
    if decoded.len() != 16 {
        return Err(bad("Sec-WebSocket-Key must be 16 bytes, base64-encoded"));
    }
    // A base64 string is visible ASCII, so it is always a valid header value.
    HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
        .map_err(|_| bad("Sec-WebSocket-Key is not valid"))
}

/// Whether a comma-separated header contains `token` (case-insensitive).
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Serves one connection over `io` as [`Server::serve`] serves each TCP
/// connection, for the fuzz targets in `fuzz/` (built with `--cfg fuzzing`).
#[cfg(fuzzing)]
pub async fn serve_one<IO>(server: Server, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = SocketAddr::from(([127, 0, 0, 1], 9));
    let Ok(admission) = admit(&Arc::new(Semaphore::new(1)), None, None, peer) else {
        return;
    };
    let app = Arc::new(server);
    connection(
        io,
        peer,
        app,
        CancellationToken::new(),
        admission,
        Encryption::None,
        Instant::now(),
    )
    .await;
}

/// The smallest read buffer hyper accepts (`http1::Builder::max_buf_size`).
const HYPER_MIN_BUF: usize = 8192;

/// How long a refused connection's incoming bytes are read and discarded
/// after the refusal, at most, before the socket is closed.
const LINGER: Duration = Duration::from_secs(2);

/// How many of them, at most.
const LINGER_BYTES: usize = 1 << 20;

/// What a connection's task learns from its socket during the HTTP phase.
#[derive(Debug, Default)]
struct Watch {
    /// The client has sent at least one byte.
    heard: AtomicBool,
    /// The upgrade is accepted: from now on the socket is the session's.
    upgraded: AtomicBool,
}

impl Watch {
    fn heard(&self) -> bool {
        self.heard.load(Ordering::Acquire)
    }

    fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Acquire)
    }
}

/// The socket under TLS and HTTP. It tells the connection task when the
/// first byte arrives (for [`Server::first_byte_timeout`]), and while the
/// connection is still HTTP it closes gracefully: when hyper shuts it down
/// after a refusal, the client's unread bytes are drained first, since
/// closing a socket with unread input sends a reset, and a client still
/// sending would lose the refusal to it.
struct Watched<IO> {
    io: IO,
    /// Shared with the connection task; let go once the session has the socket.
    watch: Option<Arc<Watch>>,
    /// Set once a shutdown in the HTTP phase has begun draining.
    linger: Option<Box<Linger>>,
}

/// A graceful close in progress: [`LINGER`] and [`LINGER_BYTES`] at most.
struct Linger {
    until: Pin<Box<tokio::time::Sleep>>,
    drained: usize,
}

impl<IO> Watched<IO> {
    fn new(io: IO) -> (Watched<IO>, Arc<Watch>) {
        let watch = Arc::new(Watch::default());
        let watched = Watched {
            io,
            watch: Some(watch.clone()),
            linger: None,
        };
        (watched, watch)
    }

    /// Lets go of the watch once the session owns the socket.
    fn release_if_upgraded(&mut self) {
        if self.watch.as_ref().is_some_and(|w| w.upgraded()) {
            self.watch = None;
        }
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Some(watch) = &this.watch {
            if buf.filled().len() > before && !watch.heard() {
                watch.heard.store(true, Ordering::Release);
            }
            this.release_if_upgraded();
        }
        polled
    }
}

impl<IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Watched<IO> {
    /// Shuts down the sending side, then reads and discards what the client
    /// still sends until it closes, for [`LINGER`] or [`LINGER_BYTES`] at
    /// most (and within the handshake's deadline, which bounds it all).
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.linger.is_none() {
            std::task::ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
            self.linger = Some(Box::new(Linger {
                until: Box::pin(tokio::time::sleep(LINGER)),
                drained: 0,
            }));
        }
        let Some(linger) = self.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 4096];
        loop {
            if linger.until.as_mut().poll(cx).is_ready() || linger.drained > LINGER_BYTES {
                return Poll::Ready(Ok(()));
            }
            let mut buf = tokio::io::ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => linger.drained += buf.filled().len(),
                // The client is gone: nothing left to protect.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for Watched<IO>
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.release_if_upgraded();
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.release_if_upgraded();
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.release_if_upgraded();
        if this.linger.is_some() || this.watch.is_some() {
            this.poll_linger(cx)
        } else {
            Pin::new(&mut this.io).poll_shutdown(cx)
        }
    }
}

/// What runs between TCP and HTTP.
#[derive(Clone)]
enum Encryption {
    None,
    #[cfg(feature = "tls")]
    Tls(tokio_rustls::TlsAcceptor),
}

/// What the HTTP phase hands to the session phase: the session, its send
/// task, its route's handler and its place among `max_connections`.
type Opened = (Session, JoinHandle<()>, Handler, Slot);

/// One TCP connection: TLS if configured, HTTP until an upgrade, then the
/// WebSocket session.
///
/// The whole HTTP phase (TLS handshake included) has one deadline,
/// [`Config::handshake_timeout`] from `accepted`: neither a slow TLS
/// handshake followed by a slow request nor a client that keeps sending
/// requests can hold its handshake place for longer.
async fn connection<IO>(
    io: IO,
    peer: SocketAddr,
    app: Arc<Server>,
    stop: CancellationToken,
    admission: Admission,
    encryption: Encryption,
    accepted: Instant,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let deadline = accepted + app.config.handshake_timeout;
    let first_byte = accepted + app.first_byte_timeout.min(app.config.handshake_timeout);
    let (io, watch) = Watched::new(io);
    // The handshake's state is large and short-lived: boxed, it is freed at
    // the upgrade, and the task that lives as long as the session stays small.
    let mut phase = Box::pin(http_phase(io, peer, app.clone(), encryption, watch.clone()));
    // One timer: the first-byte deadline, then the whole phase's.
    let timer = tokio::time::sleep_until(first_byte);
    tokio::pin!(timer);
    let mut awaiting_first_byte = first_byte < deadline;
    let opened = loop {
        tokio::select! {
            opened = &mut phase => break opened,
            () = &mut timer => {
                if awaiting_first_byte && watch.heard() {
                    awaiting_first_byte = false;
                    timer.as_mut().reset(deadline);
                    continue;
                }
                if awaiting_first_byte {
                    tracing::debug!(%peer, "no byte before the first-byte deadline");
                } else {
                    tracing::debug!(%peer, "handshake timed out");
                }
                break None;
            }
            () = stop.cancelled() => break None,
        }
    };
    drop(phase);
    drop(admission);
    let Some((session, send_task, handler, _slot)) = opened else {
        return;
    };
    run_session(session, send_task, |session| handler(session), &stop).await;
}

/// Runs a started session to its end under a handler, as every managed
/// session runs (a [`Server`]'s and, with the `axum` feature, one of
/// `wshub::axum::Sessions`): the handler gets the session; when it returns
/// the session closes with 1000, or 1011 "internal error" if it failed; when
/// `stop` fires first, the session closes with 1001 after what the hub
/// already holds for it, and the handler is still awaited. Returns once the
/// send task has ended. Dropped before that (aborted at a shutdown
/// timeout), it kills the connection and aborts the send task.
pub(crate) async fn run_session<F, Fut>(
    session: Session,
    send_task: JoinHandle<()>,
    handler: F,
    stop: &CancellationToken,
) where
    F: FnOnce(Session) -> Fut,
    Fut: Future<Output = HandlerResult>,
{
    // If this task is aborted (shutdown_timeout), the send task goes with it.
    let send_task = AbortOnDropHandle::new(send_task);
    let out = session.outgoing();
    let _guard = out.kill_on_drop();
    let span = session.span().clone();
    span.in_scope(|| tracing::debug!("session open"));
    let handler = handler(session).instrument(span);
    tokio::pin!(handler);
    // Watched here, once per connection, rather than in every send-task wake-up.
    let failure = tokio::select! {
        failure = &mut handler => failure,
        _ = stop.cancelled() => {
            out.close_for_shutdown();
            (&mut handler).await
        }
    };
    match failure {
        Some(err) => {
            handler
                .span()
                .in_scope(|| tracing::warn!(error = %err, "handler failed"));
            out.close(close_reason(CloseCode::Error, "internal error"));
        }
        None => out.close(close_reason(CloseCode::Normal, "")),
    }
    let _ = send_task.await;
}

/// The HTTP phase of a connection: the TLS handshake if any, then the
/// request, up to the upgrade. Bounded by the caller.
async fn http_phase<IO>(
    io: IO,
    peer: SocketAddr,
    app: Arc<Server>,
    encryption: Encryption,
    watch: Arc<Watch>,
) -> Option<Opened>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match encryption {
        Encryption::None => open(io, peer, app, watch).await,
        #[cfg(feature = "tls")]
        Encryption::Tls(acceptor) => match acceptor.accept(io).await {
            Ok(tls) => open(tls, peer, app, watch).await,
            Err(err) => {
                tracing::debug!(%peer, error = %err, "TLS handshake failed");
                None
            }
        },
    }
}

/// Serves the HTTP request on `io` and, once upgraded, starts the session:
/// returns it with its send task and its route's handler.
async fn open<IO>(io: IO, peer: SocketAddr, app: Arc<Server>, watch: Arc<Watch>) -> Option<Opened>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let upgrade: Arc<Mutex<Option<Upgrade>>> = Arc::new(Mutex::new(None));
    let service = {
        let app = app.clone();
        let upgrade = upgrade.clone();
        service_fn(move |req: http::Request<Incoming>| {
            let metrics = app.counted_metrics();
            let response = match app.respond(req, peer) {
                Ok(Answer::Upgrade(response, accepted)) => {
                    if let Some(metrics) = metrics {
                        metrics.upgrade_accepted();
                    }
                    *upgrade.lock().unwrap_or_else(|p| p.into_inner()) = Some(*accepted);
                    response
                }
                Ok(Answer::Plain(response)) => response,
                Err(rejection) => {
                    tracing::debug!(%peer, status = %rejection.status, "upgrade refused");
                    if let Some(metrics) = metrics {
                        metrics.upgrade_refused(rejection.status.as_u16());
                    }
                    rejection.into_http()
                }
            };
            async move { Ok::<_, Infallible>(response) }
        })
    };
    // One request per connection: every refusal carries `Connection: close`
    // (see `Rejection::into_http`), so hyper ends the connection after
    // it. A WebSocket endpoint has nothing to serve on a connection whose
    // first request was refused; the client opens a new one to retry, as
    // browsers do. With keep-alive, a client could hold its handshake place
    // by sending one bad request after another (hyper restarts its
    // header-read timeout for each). hyper's own `keep_alive(false)` is not
    // used because it also adds `close` to the 101's `Connection: upgrade`,
    // which clients reject. The caller's deadline bounds the whole phase, so
    // hyper needs no timer of its own.
    let http = http1::Builder::new()
        .header_read_timeout(None)
        .max_buf_size(app.max_request_head.max(HYPER_MIN_BUF))
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(err) = http.await {
        tracing::debug!(%peer, error = %err, "HTTP connection failed");
    }
    let accepted = upgrade.lock().unwrap_or_else(|p| p.into_inner()).take()?;
    // hyper is done with the socket; a shutdown from now on is the session's.
    watch.upgraded.store(true, Ordering::Release);
    let upgraded = match accepted.on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(err) => {
            tracing::debug!(%peer, error = %err, "upgrade failed");
            return None;
        }
    };
    let mut config = accepted.config;
    if config.metrics.is_none() {
        config.metrics = app.counted_metrics().cloned();
    }
    let (session, send_task) = Session::start_upgraded(
        TokioIo::new(upgraded),
        Setup {
            config,
            request: accepted.request,
            raw: accepted.route.raw,
            managed: true,
            tracker: Some(app.tracker.clone()),
        },
    )
    .await;
    Some((
        session,
        send_task,
        accepted.route.handler.clone(),
        accepted.slot,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    const GOOD: &[(&str, &str)] = &[
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn busy_answers_carry_their_body_length() {
        for answer in [BUSY, BUSY_ADDRESS] {
            let text = std::str::from_utf8(answer).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("Content-Length: "))
                .unwrap();
            assert_eq!(length.parse::<usize>().unwrap(), body.len(), "{text:?}");
        }
    }

    #[test]
    fn addresses_are_grouped_by_ipv4_address_and_ipv6_slash_64() {
        let group = |text: &str| address_group(text.parse().unwrap());
        assert_eq!(group("203.0.113.7"), group("203.0.113.7"));
        assert_ne!(group("203.0.113.7"), group("203.0.113.8"));
        assert_eq!(group("2001:db8:1:2:aaaa::1"), group("2001:db8:1:2:bbbb::9"));
        assert_ne!(group("2001:db8:1:2::1"), group("2001:db8:1:3::1"));
        // On a dual-stack listener IPv4 clients arrive IPv4-mapped: each is
        // its own group, not all of them one /64.
        assert_eq!(group("::ffff:203.0.113.7"), group("203.0.113.7"));
        assert_ne!(group("::ffff:203.0.113.7"), group("::ffff:203.0.113.8"));
    }

    #[test]
    fn accepts_the_rfc_example_key() {
        let accept = check_upgrade(&Method::GET, Version::HTTP_11, &headers(GOOD)).unwrap();
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn refuses_bad_upgrades_with_specific_statuses() {
        let status = |m: &Method, v, pairs: &[(&'static str, &'static str)]| {
            check_upgrade(m, v, &headers(pairs)).unwrap_err().status()
        };
        assert_eq!(
            status(&Method::POST, Version::HTTP_11, GOOD),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(&Method::GET, Version::HTTP_10, GOOD),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(&Method::GET, Version::HTTP_11, &GOOD[1..]),
            StatusCode::BAD_REQUEST
        );
        let no_connection = [GOOD[0], GOOD[2], GOOD[3]];
        assert_eq!(
            status(&Method::GET, Version::HTTP_11, &no_connection),
            StatusCode::BAD_REQUEST
        );
        let v8 = [GOOD[0], GOOD[1], ("sec-websocket-version", "8"), GOOD[3]];
        let err = check_upgrade(&Method::GET, Version::HTTP_11, &headers(&v8)).unwrap_err();
        assert_eq!(err.status(), StatusCode::UPGRADE_REQUIRED);
        assert!(
            err.headers
                .iter()
                .any(|(k, v)| k == "sec-websocket-version" && v == "13")
        );
        let short_key = [GOOD[0], GOOD[1], GOOD[2], ("sec-websocket-key", "c2hvcnQ=")];
        assert_eq!(
            status(&Method::GET, Version::HTTP_11, &short_key),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(&Method::GET, Version::HTTP_11, &GOOD[..3]),
            StatusCode::BAD_REQUEST
        );
        for body in [("content-length", "5"), ("transfer-encoding", "chunked")] {
            let with_body = [GOOD[0], GOOD[1], GOOD[2], GOOD[3], body];
            let err = check_upgrade(&Method::GET, Version::HTTP_11, &headers(&with_body));
            let err = err.unwrap_err();
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{body:?}");
            assert!(err.body().contains("must not have a body"), "{err:?}");
        }
        let empty = [GOOD[0], GOOD[1], GOOD[2], GOOD[3], ("content-length", "0")];
        assert!(check_upgrade(&Method::GET, Version::HTTP_11, &headers(&empty)).is_ok());
    }
}
