//! WebSocket sessions inside an axum application (the `axum` feature).
//!
//! The axum equivalent of Ktor's `webSocket("/path") { }` inside
//! `routing { }`: a wshub route next to ordinary axum routes, whose handler
//! gets a wshub [`Session`] with every option of a [`Config`] applied (frame
//! and message limits, buffers, timeouts, wshub's own write buffer and its
//! count of the bytes the socket takes, which [`Config::send_timeout`] goes
//! by).
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> std::io::Result<()> {
//! use axum::{Router, routing::get};
//! use axum::serve::ListenerExt as _;
//! use wshub::axum::Sessions;
//! use wshub::{Config, Hub};
//!
//! let hub = Hub::new();
//! let sessions = Sessions::new(Config::default());
//! let app = Router::new()
//!     .route("/health", get(|| async { "ok" }))
//!     .route("/ws", sessions.route(move |mut session| {
//!         let hub = hub.clone();
//!         async move {
//!             let subscription = hub.subscribe(); // before the greeting: miss nothing
//!             session.send("You are connected to WebSocket!").await?;
//!             session.join(subscription).await;
//!             Ok::<_, wshub::Error>(())
//!         }
//!     }));
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080")
//!     .await?
//!     .tap_io(wshub::axum::tune);
//! let ctrl_c = async { let _ = tokio::signal::ctrl_c().await; };
//! axum::serve(listener, app)
//!     .with_graceful_shutdown(sessions.graceful(ctrl_c))
//!     .await?;
//! sessions.wait().await; // every session closed with 1001, or aborted
//! # Ok(()) }
//! ```
//!
//! A handler that needs axum's other extractors (state, path, query,
//! headers) takes a [`WebSocketUpgrade`] with them and calls
//! [`WebSocketUpgrade::on_upgrade`].
//!
//! Bad handshakes get what [`Server`] answers: `400 Bad
//! Request` with a body that says what is wrong, `426 Upgrade Required`
//! with `Sec-WebSocket-Version: 13` for another protocol version.
//!
//! axum's own graceful shutdown does not know about upgraded connections:
//! once a connection is upgraded, `axum::serve` no longer tracks it. So the
//! sessions are closed by [`Sessions`]: [`Sessions::graceful`] wraps the
//! shutdown signal given to `with_graceful_shutdown`, and when it fires
//! every session gets Close 1001 (Going Away); [`Sessions::wait`] then waits
//! for them to end, up to the shutdown timeout, and aborts the rest.
//!
//! What stays axum's: the HTTP phase ([`Config::handshake_timeout`] does
//! not apply; use axum's or tower's timeouts), how many connections are
//! served, which origins may connect (check `Origin` in a handler before
//! [`on_upgrade`](WebSocketUpgrade::on_upgrade), through
//! [`WebSocketUpgrade::request`]).

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use futures_util::FutureExt as _;
use http::request::Parts;
use http::{HeaderName, HeaderValue, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Server;
use crate::config::Config;
use crate::request::Request;
use crate::server::{
    DEFAULT_SHUTDOWN_TIMEOUT, HandlerOutput, Rejection, check_upgrade, choose_subprotocol,
    run_session, switching_protocols,
};
use crate::session::{Session, Setup};

/// What every clone of a [`Sessions`] shares.
#[derive(Debug, Default)]
struct Shared {
    /// Fired when shutdown begins: every session closes with 1001.
    stop: CancellationToken,
    /// Fired at the shutdown timeout: every session task left is dropped.
    kill: CancellationToken,
    /// The session tasks and their send tasks.
    tracker: TaskTracker,
    /// When shutdown began; the shutdown timeout counts from it.
    began: OnceLock<Instant>,
}

/// The WebSocket sessions of an axum application: their [`Config`], and
/// their graceful shutdown, which axum's does not cover.
///
/// Cheap to clone; every clone stands for the same sessions. Set the
/// options ([`shutdown_timeout`](Self::shutdown_timeout),
/// [`session_headers`](Self::session_headers)) before cloning it into
/// routes.
///
/// ```
/// use std::time::Duration;
/// use wshub::Config;
/// use wshub::axum::Sessions;
///
/// let sessions = Sessions::new(Config::default().max_message_size(Some(64 * 1024)))
///     .shutdown_timeout(Duration::from_secs(5));
/// let app: axum::Router = axum::Router::new().route(
///     "/echo",
///     sessions.route(|mut session| async move {
///         while let Some(msg) = session.recv().await {
///             if session.send(msg).await.is_err() {
///                 break;
///             }
///         }
///     }),
/// );
/// ```
#[derive(Clone)]
pub struct Sessions {
    config: Config,
    session_headers: Arc<[HeaderName]>,
    shutdown_timeout: Duration,
    shared: Arc<Shared>,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("config", &self.config)
            .field("session_headers", &self.session_headers)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("shutting_down", &self.shared.stop.is_cancelled())
            .field("tasks", &self.shared.tracker.len())
            .finish()
    }
}

impl Default for Sessions {
    /// `Sessions::new(Config::default())`.
    fn default() -> Self {
        Sessions::new(Config::default())
    }
}

impl Sessions {
    /// Sessions with the options of `config`, the shutdown timeout of
    /// [`Server`] (10 s) and its
    /// [`DEFAULT_SESSION_HEADERS`](Server::DEFAULT_SESSION_HEADERS).
    ///
    /// With [`Config::metrics`] set, these sessions are counted there: open
    /// sessions, close codes, bytes, upgrades accepted, and upgrades refused
    /// by [`route`](Self::route) (by status). Handshakes in flight are
    /// axum's HTTP connections, which wshub does not see.
    ///
    /// ```
    /// let sessions = wshub::axum::Sessions::new(wshub::Config::default());
    /// ```
    pub fn new(config: Config) -> Sessions {
        Sessions {
            config,
            session_headers: Server::DEFAULT_SESSION_HEADERS.into(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            shared: Arc::default(),
        }
    }

    /// How long [`wait`](Self::wait) lets sessions finish after shutdown
    /// began before it aborts them, as [`Server::shutdown_timeout`].
    ///
    /// Default: 10 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// let sessions = wshub::axum::Sessions::default().shutdown_timeout(Duration::from_secs(3));
    /// ```
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Sessions {
        self.shutdown_timeout = timeout;
        self
    }

    /// The request headers a session keeps in [`Session::request`], as
    /// [`Server::session_headers`]; [`WebSocketUpgrade::request`] sees them
    /// all.
    ///
    /// Default: [`Server::DEFAULT_SESSION_HEADERS`].
    ///
    /// ```
    /// use http::HeaderName;
    /// use wshub::Server;
    /// use wshub::axum::Sessions;
    ///
    /// let sessions = Sessions::default().session_headers(
    ///     Server::DEFAULT_SESSION_HEADERS
    ///         .into_iter()
    ///         .chain([HeaderName::from_static("x-user-id")]),
    /// );
    /// ```
    #[must_use]
    pub fn session_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Sessions {
        self.session_headers = names.into_iter().collect();
        self
    }

    /// The options sessions start with, unless an upgrade has its own
    /// ([`WebSocketUpgrade::config`]).
    ///
    /// ```
    /// let sessions = wshub::axum::Sessions::default();
    /// assert_eq!(sessions.config(), &wshub::Config::default());
    /// ```
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A GET route that upgrades every valid request and runs `handler` on
    /// its [`Session`]: Ktor's `webSocket("/path") { }`, for
    /// `Router::route`.
    ///
    /// When the handler returns, the session closes with 1000 (Normal), or
    /// 1011 "internal error" if it returned an error; at shutdown it closes
    /// with 1001 and the handler sees its session end.
    ///
    /// ```
    /// use axum::Router;
    /// use axum::routing::get;
    /// use wshub::axum::Sessions;
    ///
    /// let sessions = Sessions::default();
    /// let app: Router = Router::new()
    ///     .route("/", get(|| async { "hello" }))
    ///     .route("/ws", sessions.route(|mut session| async move {
    ///         session.send("hi").await?;
    ///         Ok::<_, wshub::Error>(())
    ///     }));
    /// ```
    pub fn route<S, F, Fut>(&self, handler: F) -> MethodRouter<S>
    where
        S: Clone + Send + Sync + 'static,
        F: Fn(Session) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerOutput,
    {
        let sessions = self.clone();
        let handler = Arc::new(handler);
        axum::routing::get(move |upgrade: Result<WebSocketUpgrade, Rejection>| {
            let handler = handler.clone();
            let response = match upgrade {
                Ok(upgrade) => upgrade.on_upgrade(&sessions, move |session| handler(session)),
                Err(rejection) => sessions.refuse(rejection),
            };
            std::future::ready(response)
        })
    }

    /// Answers a refused upgrade, counted in the [`Config::metrics`] if any.
    pub(crate) fn refuse(&self, rejection: Rejection) -> Response {
        if let Some(metrics) = &self.config.metrics {
            metrics.upgrade_refused(rejection.status().as_u16());
        }
        rejection.into_response()
    }

    /// A shutdown signal for `axum::serve(..).with_graceful_shutdown`:
    /// completes when `signal` does, after it began shutting the sessions
    /// down ([`shutdown`](Self::shutdown)).
    ///
    /// axum then stops accepting and waits for its HTTP connections; await
    /// [`wait`](Self::wait) after `serve` returns, for the sessions.
    ///
    /// ```no_run
    /// # async fn demo(listener: tokio::net::TcpListener, app: axum::Router) -> std::io::Result<()> {
    /// let sessions = wshub::axum::Sessions::default();
    /// let ctrl_c = async { let _ = tokio::signal::ctrl_c().await; };
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(sessions.graceful(ctrl_c))
    ///     .await?;
    /// sessions.wait().await;
    /// # Ok(()) }
    /// ```
    pub fn graceful<F>(&self, signal: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let sessions = self.clone();
        async move {
            signal.await;
            sessions.shutdown();
        }
    }

    /// Begins shutdown now (once; later calls do nothing): every session
    /// gets a Close frame with 1001 (Going Away) after the hub messages
    /// already buffered for it, and an upgrade asked for from now on is
    /// refused with `503 Service Unavailable`.
    ///
    /// ```
    /// let sessions = wshub::axum::Sessions::default();
    /// sessions.shutdown();
    /// assert!(sessions.is_shutting_down());
    /// ```
    pub fn shutdown(&self) {
        let mut first = false;
        self.shared.began.get_or_init(|| {
            first = true;
            Instant::now()
        });
        if first {
            tracing::info!(tasks = self.shared.tracker.len(), "sessions shutting down");
        }
        self.shared.stop.cancel();
    }

    /// Whether shutdown has begun.
    ///
    /// ```
    /// assert!(!wshub::axum::Sessions::default().is_shutting_down());
    /// ```
    pub fn is_shutting_down(&self) -> bool {
        self.shared.stop.is_cancelled()
    }

    /// Waits until every session has ended, then returns: no session writes
    /// to its client after that.
    ///
    /// It begins shutdown if nothing did yet ([`shutdown`](Self::shutdown)),
    /// lets the sessions close, and once the [shutdown
    /// timeout](Self::shutdown_timeout) has passed since shutdown began it
    /// aborts the sessions left (handler and send task), as
    /// [`Server::serve`] does. Tasks a handler spawned itself are its own.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let sessions = wshub::axum::Sessions::default();
    /// sessions.wait().await; // no session: returns at once
    /// # }
    /// ```
    pub async fn wait(&self) {
        self.shutdown();
        let shared = &self.shared;
        let began = shared.began.get().copied().unwrap_or_else(Instant::now);
        shared.tracker.close();
        let deadline = began + self.shutdown_timeout;
        if tokio::time::timeout_at(deadline, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = shared.tracker.len(),
                "shutdown timeout: aborting sessions"
            );
            shared.kill.cancel();
            shared.tracker.wait().await;
        }
    }
}

/// An axum extractor for a WebSocket upgrade request, checked as
/// [`Server`] checks it; [`on_upgrade`](Self::on_upgrade) answers it and
/// runs a wshub [`Session`].
///
/// An invalid request is refused with the [`Rejection`] [`Server`] would
/// answer (400 with a body, 426 with `Sec-WebSocket-Version: 13`); a
/// request on a connection that cannot be upgraded (not served by hyper's
/// HTTP/1, as with `tower::ServiceExt::oneshot`) with 500.
///
/// ```
/// use axum::Router;
/// use axum::extract::{Path, State};
/// use axum::response::Response;
/// use axum::routing::get;
/// use wshub::axum::{Sessions, WebSocketUpgrade};
/// use wshub::Rejection;
///
/// async fn room(
///     Path(room): Path<String>,
///     State(sessions): State<Sessions>,
///     upgrade: WebSocketUpgrade,
/// ) -> Result<Response, Rejection> {
///     if room.is_empty() {
///         return Err(Rejection::new(http::StatusCode::NOT_FOUND, "no such room"));
///     }
///     Ok(upgrade.on_upgrade(&sessions, move |mut session| async move {
///         session.send(format!("welcome to {room}")).await?;
///         while let Some(msg) = session.recv().await {
///             session.send(msg).await?;
///         }
///         Ok::<_, wshub::Error>(())
///     }))
/// }
///
/// let app: Router = Router::new()
///     .route("/rooms/{room}", get(room))
///     .with_state(Sessions::default());
/// ```
pub struct WebSocketUpgrade {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
    /// Every header of the request, for the handler to check.
    request: Request,
    config: Option<Config>,
}

impl fmt::Debug for WebSocketUpgrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocketUpgrade")
            .field("request", &self.request)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketUpgrade {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Rejection> {
        let accept = check_upgrade(&parts.method, parts.version, &parts.headers)?;
        let on_upgrade = parts.extensions.remove::<OnUpgrade>().ok_or_else(|| {
            Rejection::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "this connection cannot be upgraded to a WebSocket: \
                 it is not an HTTP/1.1 connection served by hyper (axum::serve)",
            )
        })?;
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0);
        let request = Request::borrowed(
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
            peer,
        );
        Ok(WebSocketUpgrade {
            accept,
            on_upgrade,
            request,
            config: None,
        })
    }
}

impl WebSocketUpgrade {
    /// Options for this session only, instead of the [`Sessions`]' own.
    ///
    /// ```
    /// use axum::response::Response;
    /// use wshub::Config;
    /// use wshub::axum::{Sessions, WebSocketUpgrade};
    ///
    /// async fn trusted(upgrade: WebSocketUpgrade, sessions: Sessions) -> Response {
    ///     let config = sessions.config().clone().max_message_size(Some(16 << 20));
    ///     upgrade
    ///         .config(config)
    ///         .on_upgrade(&sessions, |session| async move { drop(session) })
    /// }
    /// ```
    #[must_use]
    pub fn config(mut self, config: Config) -> WebSocketUpgrade {
        self.config = Some(config);
        self
    }

    /// The upgrade request with every header (the session keeps only the
    /// [`session_headers`](Sessions::session_headers)) and the peer's
    /// address when the app is served with
    /// `into_make_service_with_connect_info::<SocketAddr>()`.
    ///
    /// ```
    /// use axum::response::{IntoResponse, Response};
    /// use wshub::Rejection;
    /// use wshub::axum::{Sessions, WebSocketUpgrade};
    ///
    /// async fn only_ours(upgrade: WebSocketUpgrade, sessions: Sessions) -> Response {
    ///     match upgrade.request().header("origin") {
    ///         None | Some("https://app.example.com") => upgrade
    ///             .on_upgrade(&sessions, |session| async move { drop(session) }),
    ///         Some(_) => Rejection::forbidden("origin not allowed").into_response(),
    ///     }
    /// }
    /// ```
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Accepts the upgrade: returns the `101 Switching Protocols` for the
    /// handler to return, and, once axum has sent it, starts the session
    /// among `sessions` and runs `handler` on it, as [`Server::route`] runs
    /// its handlers (1000 when it returns, 1011 if it returns an error, 1001
    /// at shutdown). Once shutdown has begun it returns `503 Service
    /// Unavailable` instead.
    ///
    /// ```
    /// use axum::response::Response;
    /// use wshub::axum::{Sessions, WebSocketUpgrade};
    ///
    /// async fn hello(upgrade: WebSocketUpgrade, sessions: Sessions) -> Response {
    ///     upgrade.on_upgrade(&sessions, |mut session| async move {
    ///         session.send("hello").await
    ///     })
    /// }
    /// ```
    pub fn on_upgrade<F, Fut>(self, sessions: &Sessions, handler: F) -> Response
    where
        F: FnOnce(Session) -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerOutput,
    {
        if sessions.is_shutting_down() {
            return sessions.refuse(
                Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the server is shutting down",
                )
                .header(header::RETRY_AFTER, HeaderValue::from_static("1")),
            );
        }
        if let Some(metrics) = &sessions.config.metrics {
            metrics.upgrade_accepted();
        }
        let WebSocketUpgrade {
            accept,
            on_upgrade,
            request,
            config,
        } = self;
        let config = config.unwrap_or_else(|| sessions.config.clone());
        let protocol = choose_subprotocol(request.headers(), &[], &config.subprotocols);
        let setup = Setup {
            config,
            // What the session keeps does not grow with what the client sent.
            request: request.keeping(&sessions.session_headers),
            raw: false,
            managed: true,
            tracker: Some(sessions.shared.tracker.clone()),
        };
        let shared = sessions.shared.clone();
        sessions.shared.tracker.spawn(async move {
            let session = async {
                let upgraded = match on_upgrade.await {
                    Ok(upgraded) => upgraded,
                    Err(err) => {
                        tracing::debug!(error = %err, "upgrade failed");
                        return;
                    }
                };
                let (session, send_task) =
                    Session::start_upgraded(TokioIo::new(upgraded), setup).await;
                let handler = |session| handler(session).map(HandlerOutput::into_error);
                run_session(session, send_task, handler, &shared.stop).await;
            };
            tokio::select! {
                () = session => {}
                () = shared.kill.cancelled() => tracing::debug!("session aborted: shutdown timeout"),
            }
        });
        switching_protocols(accept, protocol)
    }
}

impl IntoResponse for Rejection {
    /// The status, headers and plain-text body [`Server`] answers with.
    fn into_response(self) -> Response {
        self.into_http::<Body>()
    }
}

/// Socket options for a connection axum accepts, as [`Server`] sets them
/// on its own: no Nagle delay, and on Linux at most 16 KiB unsent in the
/// kernel (`TCP_NOTSENT_LOWAT`), so that a client that reads slowly takes
/// bytes as it reads and [`Config::send_timeout`] closes only a client that
/// takes none. For `axum::serve::ListenerExt::tap_io`.
///
/// ```no_run
/// # async fn demo(app: axum::Router) -> std::io::Result<()> {
/// use axum::serve::ListenerExt as _;
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080")
///     .await?
///     .tap_io(wshub::axum::tune);
/// axum::serve(listener, app).await
/// # }
/// ```
pub fn tune(tcp: &mut tokio::net::TcpStream) {
    crate::server::tune(tcp);
}
