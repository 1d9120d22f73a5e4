//! Message and close-reason types, and the JSON helpers.
//!
//! wshub reuses tungstenite's types: a [`Message`] is Bytes-backed, so cloning
//! one (as the hub does for every subscriber) bumps a reference count and
//! copies no payload. [`CloseReason`] is Ktor's `CloseReason(code, message)`.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;

pub use bytes::Bytes;
pub use tokio_tungstenite::tungstenite::Message;
pub use tokio_tungstenite::tungstenite::Utf8Bytes;
pub use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Why a session closed: a close code and a reason text (Ktor's `CloseReason`).
///
/// This is tungstenite's `CloseFrame`. Codes that never go on the wire are used
/// locally to report what happened: 1005 ([`CloseCode::Status`]) when the peer's
/// Close frame carried no code, 1006 ([`CloseCode::Abnormal`]) when the
/// connection ended without a closing handshake.
pub use tokio_tungstenite::tungstenite::protocol::CloseFrame as CloseReason;

/// Builds a [`CloseReason`] from a code and a reason text.
///
/// ```
/// use wshub::{close_reason, CloseCode};
/// let reason = close_reason(CloseCode::Normal, "Client said BYE");
/// assert_eq!(u16::from(reason.code), 1000);
/// assert_eq!(reason.reason.as_str(), "Client said BYE");
/// ```
pub fn close_reason(code: impl Into<CloseCode>, reason: impl Into<Utf8Bytes>) -> CloseReason {
    CloseReason {
        code: code.into(),
        reason: reason.into(),
    }
}

/// Serializes `value` into a text message, once (Ktor's `sendSerialized`).
///
/// Publish the result to a hub and every subscriber shares the same bytes.
///
/// # Errors
///
/// [`Error::Json`] if `value` cannot be serialized (for example a map with
/// non-string keys).
///
/// ```
/// let msg = wshub::json(&serde_json::json!({"user": "user1", "text": "hi"})).unwrap();
/// assert_eq!(msg.to_text().unwrap(), r#"{"text":"hi","user":"user1"}"#);
/// ```
pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Message, Error> {
    let text = serde_json::to_string(value).map_err(Error::Json)?;
    Ok(Message::text(text))
}

/// Parses a text or binary message as JSON (Ktor's `receiveDeserialized`).
///
/// Numbers are parsed to the nearest `f64` (serde_json's `float_roundtrip`,
/// which wshub turns on), so a value read here and sent on with [`json`] is
/// exactly the value the client meant, at some cost in float parsing speed.
///
/// # Errors
///
/// [`Error::Json`] when the payload is not valid JSON for `T`, with serde's
/// line and column; [`Error::UnexpectedMessage`] for a control frame.
///
/// ```
/// #[derive(Debug, serde::Deserialize)]
/// struct Chat { text: String }
/// let chat: Chat = wshub::from_json(&wshub::Message::text(r#"{"text":"hi"}"#)).unwrap();
/// assert_eq!(chat.text, "hi");
/// let err = wshub::from_json::<Chat>(&wshub::Message::text("{not json")).unwrap_err();
/// assert!(err.to_string().contains("invalid JSON"));
/// ```
pub fn from_json<T: DeserializeOwned>(msg: &Message) -> Result<T, Error> {
    let bytes: &[u8] = match msg {
        Message::Text(t) => t.as_bytes(),
        Message::Binary(b) => b,
        other => return Err(Error::UnexpectedMessage(kind(other))),
    };
    serde_json::from_slice(bytes).map_err(Error::Json)
}

/// A short name for the kind of a message, for errors and logs.
pub(crate) fn kind(msg: &Message) -> &'static str {
    match msg {
        Message::Text(_) => "text",
        Message::Binary(_) => "binary",
        Message::Ping(_) => "ping",
        Message::Pong(_) => "pong",
        Message::Close(_) => "close",
        Message::Frame(_) => "raw frame",
    }
}

/// Whether the message is a data message (text or binary) the hub carries.
pub(crate) fn is_data(msg: &Message) -> bool {
    matches!(msg, Message::Text(_) | Message::Binary(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_survive_a_json_round_trip_exactly() {
        // Found by the json fuzz target: without float_roundtrip, serde_json
        // parses these one unit in the last place off, so the value sent on
        // was not the value received.
        for text in [
            "15555555555555555551555",
            "2222222222222222222222222222222222",
        ] {
            let value: serde_json::Value = from_json(&Message::text(text)).unwrap();
            let again: serde_json::Value = from_json(&json(&value).unwrap()).unwrap();
            assert_eq!(again, value, "{text}");
            let exact: f64 = text.parse().unwrap();
            assert_eq!(value.as_f64(), Some(exact), "{text}");
        }
    }
}
