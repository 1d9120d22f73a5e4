//! What a session knows about the HTTP request that opened it (Ktor's `call`).

use std::borrow::Cow;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Uri};

/// A URI whose text no longer points into the HTTP server's read buffer
/// (hyper parses into slices of its 8 KiB buffer, which a session would
/// otherwise keep alive for its whole life).
fn owned_uri(uri: Uri) -> Uri {
    Uri::from_maybe_shared(Bytes::from(uri.to_string())).unwrap_or(uri)
}

/// The header values copied into one buffer of their own, for the same reason.
fn owned_headers(headers: HeaderMap) -> HeaderMap {
    let total = headers.values().map(|v| v.len()).sum();
    let mut text = BytesMut::with_capacity(total);
    for value in headers.values() {
        text.extend_from_slice(value.as_bytes());
    }
    let mut text = text.freeze();
    let mut owned = HeaderMap::with_capacity(headers.len());
    for (name, value) in &headers {
        let copy = match HeaderValue::from_maybe_shared(text.split_to(value.len())) {
            Ok(mut copy) => {
                copy.set_sensitive(value.is_sensitive());
                copy
            }
            Err(_) => value.clone(),
        };
        owned.append(name.clone(), copy);
    }
    owned
}

/// The upgrade request of a session: path, query, headers and the peer's address.
///
/// ```
/// let req = http::Request::get("/ws?room=lobby&name=ann%20b")
///     .header("origin", "https://example.com")
///     .body(())
///     .unwrap();
/// let req = wshub::Request::new(req, Some("127.0.0.1:5000".parse().unwrap()));
/// assert_eq!(req.path(), "/ws");
/// assert_eq!(req.query_param("name").as_deref(), Some("ann b"));
/// assert_eq!(req.header("origin"), Some("https://example.com"));
/// ```
#[derive(Clone, Debug)]
pub struct Request {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<SocketAddr>,
}

impl Request {
    /// Builds request info from an HTTP request head, for sessions attached to
    /// a connection that some other server upgraded.
    pub fn new<B>(request: http::Request<B>, peer: Option<SocketAddr>) -> Request {
        let (parts, _) = request.into_parts();
        Request {
            method: parts.method,
            uri: owned_uri(parts.uri),
            headers: owned_headers(parts.headers),
            peer,
        }
    }

    /// Request info for a session with no known HTTP request: path `/`, no headers.
    pub fn unknown() -> Request {
        Request {
            method: Method::GET,
            uri: Uri::from_static("/"),
            headers: HeaderMap::new(),
            peer: None,
        }
    }

    /// The request method (always GET for a valid upgrade).
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request target as sent.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// The raw query string, without the `?`.
    pub fn query(&self) -> Option<&str> {
        self.uri.query()
    }

    /// The first value of a query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query()?.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v): (Cow<'_, str>, Cow<'_, str>)| v.into_owned())
    }

    /// All request headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// A header's value, if present and valid visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    /// The peer's socket address, when known.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }
}
