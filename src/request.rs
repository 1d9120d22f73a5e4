//! What a session knows about the HTTP request that opened it (Ktor's `call`).

use std::borrow::Cow;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

/// A URI whose text no longer points into the HTTP server's read buffer
/// (hyper parses into slices of its read buffer, which a session would
/// otherwise keep alive for its whole life), in a buffer of exactly its size.
fn owned_uri(uri: &Uri) -> Uri {
    let text = uri.to_string();
    Uri::from_maybe_shared(Bytes::copy_from_slice(text.as_bytes())).unwrap_or_else(|_| uri.clone())
}

/// The header values `keep` accepts, copied into one buffer of exactly their
/// size, for the same reason.
fn owned_headers(headers: &HeaderMap, keep: impl Fn(&HeaderName) -> bool) -> HeaderMap {
    let kept = || headers.iter().filter(|(name, _)| keep(name));
    let (count, total) = kept().fold((0, 0), |(n, len), (_, v)| (n + 1, len + v.len()));
    let mut text = BytesMut::with_capacity(total);
    for (_, value) in kept() {
        text.extend_from_slice(value.as_bytes());
    }
    let mut text = text.freeze();
    let mut owned = HeaderMap::with_capacity(count);
    for (name, value) in kept() {
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
    ///
    /// It keeps every header, copied out of the request into one buffer of
    /// exactly their size.
    pub fn new<B>(request: http::Request<B>, peer: Option<SocketAddr>) -> Request {
        let (parts, _) = request.into_parts();
        Request {
            method: parts.method,
            uri: owned_uri(&parts.uri),
            headers: owned_headers(&parts.headers, |_| true),
            peer,
        }
    }

    /// The request as the handshake hook sees it: every header, still
    /// pointing into the HTTP server's read buffer (no copy; it lives only
    /// as long as the handshake).
    pub(crate) fn borrowed(
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Request {
        Request {
            method,
            uri,
            headers,
            peer,
        }
    }

    /// What a session keeps of its request: the method, the URI, the peer,
    /// and only the headers named in `keep`, copied out of the server's
    /// read buffer into buffers of exactly their size.
    pub(crate) fn keeping(&self, keep: &[HeaderName]) -> Request {
        Request {
            method: self.method.clone(),
            uri: owned_uri(&self.uri),
            headers: owned_headers(&self.headers, |name| keep.contains(name)),
            peer: self.peer,
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

    /// The request headers: in the [handshake
    /// hook](crate::Server::on_handshake) all of them; in a session of
    /// [`Server`](crate::Server) those named by
    /// [`Server::session_headers`](crate::Server::session_headers) (by
    /// default `Host`, `Origin`, `User-Agent`, `Sec-WebSocket-Protocol`,
    /// `Forwarded`, `X-Forwarded-For` and `X-Real-IP`); from
    /// [`Request::new`] all of them.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// A header's value, if present (see [`headers`](Self::headers) for
    /// which are) and valid visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    /// The peer's socket address, when known.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `text` lies inside `buffer`'s memory.
    fn inside(buffer: &Bytes, text: &[u8]) -> bool {
        let range = buffer.as_ptr_range();
        range.contains(&text.as_ptr())
    }

    /// A request whose URI and header values point into one large buffer,
    /// as hyper's do into its read buffer.
    fn parsed(buffer: &Bytes) -> http::Request<()> {
        let text = std::str::from_utf8(buffer).unwrap();
        let at = |needle: &str| {
            let start = text.find(needle).unwrap();
            buffer.slice(start..start + needle.len())
        };
        let mut request = http::Request::new(());
        *request.uri_mut() = Uri::from_maybe_shared(at("/ws?room=lobby")).unwrap();
        let headers = request.headers_mut();
        for (name, value) in [
            ("origin", "https://chat.example"),
            ("x-big", "bbbbbbbbbbbb"),
        ] {
            let value = HeaderValue::from_maybe_shared(at(value)).unwrap();
            headers.append(HeaderName::from_static(name), value);
        }
        request
    }

    fn buffer() -> Bytes {
        let mut text =
            String::from("GET /ws?room=lobby HTTP/1.1\r\norigin: https://chat.example\r\n");
        text.push_str("x-big: bbbbbbbbbbbb\r\n\r\n");
        text.push_str(&"x".repeat(16 * 1024));
        Bytes::from(text)
    }

    #[test]
    fn the_borrowed_request_shares_the_buffer_the_kept_one_does_not() {
        let buffer = buffer();
        let (parts, ()) = parsed(&buffer).into_parts();
        let peer = Some("127.0.0.1:9".parse().unwrap());
        let hook = Request::borrowed(parts.method, parts.uri, parts.headers, peer);
        assert!(inside(&buffer, hook.header("x-big").unwrap().as_bytes()));
        assert!(inside(&buffer, hook.uri().path().as_bytes()));

        let kept = hook.keeping(&[http::header::ORIGIN]);
        assert_eq!(kept.header("origin"), Some("https://chat.example"));
        assert_eq!(kept.header("x-big"), None);
        assert_eq!(kept.headers().len(), 1);
        assert_eq!(kept.uri(), "/ws?room=lobby");
        assert_eq!(kept.query_param("room").as_deref(), Some("lobby"));
        assert!(!inside(&buffer, kept.header("origin").unwrap().as_bytes()));
        assert!(!inside(&buffer, kept.uri().path().as_bytes()));
        assert_eq!(kept.peer_addr(), hook.peer_addr());
    }

    #[test]
    fn request_new_copies_every_header_out_of_the_buffer_back_to_back() {
        let buffer = buffer();
        let request = Request::new(parsed(&buffer), None);
        let origin = request.header("origin").unwrap().as_bytes();
        let big = request.header("x-big").unwrap().as_bytes();
        assert!(!inside(&buffer, origin) && !inside(&buffer, big));
        assert!(!inside(&buffer, request.uri().path().as_bytes()));
        // One buffer holding exactly the values, one after the other.
        assert_eq!(origin.as_ptr_range().end, big.as_ptr());
    }
}
