//! The crate's error type.

use std::io;

use crate::message::CloseReason;

/// Everything that can go wrong in wshub.
///
/// Each variant says when it happens and whether the session survives it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The session is closed (or closing): nothing more can be sent or
    /// received. Carries the close reason when one is known. Fatal for the session.
    #[error("session closed{}", describe(.0.as_ref()))]
    Closed(Option<CloseReason>),
    /// The session's outgoing queue ([`Config::outgoing_capacity`](crate::Config::outgoing_capacity))
    /// is full, so a non-waiting send could not queue the message; it is handed
    /// back. The session stays open: wait, or use the waiting `send`.
    #[error("the session's outgoing queue is full")]
    QueueFull(Box<crate::message::Message>),
    /// A payload was not valid JSON for the expected type, or a value could
    /// not be serialized. The session stays open.
    #[error("invalid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// A message of the wrong kind was given or received, for example a ping
    /// where a text message was expected. The session stays open.
    #[error("expected a text or binary message, got a {0} message")]
    UnexpectedMessage(&'static str),
    /// The WebSocket protocol layer failed (tungstenite's error). Fatal for the session.
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    /// An I/O error, for example binding a listener. Fatal for what it names.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// A hub refused a publish ([`Hub::publish_json`](crate::Hub::publish_json)):
    /// it is closed, or the message is not data. The session and the hub's
    /// other users are not affected.
    #[error("publish failed: {0}")]
    Publish(#[from] crate::hub::PublishError),
    /// A configuration value is out of range; the message says which and why.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// " (1000)" or " (1001 server shutting down)" for a close reason, "" for none.
fn describe(reason: Option<&CloseReason>) -> String {
    match reason {
        None => String::new(),
        Some(r) if r.reason.is_empty() => format!(" ({})", u16::from(r.code)),
        Some(r) => format!(" ({} {})", u16::from(r.code), r.reason),
    }
}

impl Error {
    /// Whether this error means the session is closed.
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed(_))
    }

    /// Whether this error is a JSON encoding or decoding failure.
    pub fn is_json(&self) -> bool {
        matches!(self, Error::Json(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{CloseCode, close_reason};

    #[test]
    fn closed_error_names_the_code_and_any_reason() {
        assert_eq!(Error::Closed(None).to_string(), "session closed");
        let normal = Error::Closed(Some(close_reason(CloseCode::Normal, "")));
        assert_eq!(normal.to_string(), "session closed (1000)");
        let away = Error::Closed(Some(close_reason(CloseCode::Away, "server shutting down")));
        assert_eq!(
            away.to_string(),
            "session closed (1001 server shutting down)"
        );
    }
}
