//! The server's whole connection path on arbitrary bytes: HTTP parsing, the
//! upgrade checks, then (when the bytes open with a valid upgrade) frame
//! parsing, close codes and the echo route. Nothing may panic or hang, and
//! whatever the server answers before any WebSocket frame is an HTTP response.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wshub::Server;
use wshub_fuzz::converse;

/// A valid upgrade to the echo route: put in front of the input when its
/// first byte is odd, so the fuzzer reaches the frame parser at once.
const UPGRADE: &[u8] = b"GET /echo HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

fn server() -> Server {
    Server::new()
        .route("/echo", |mut session| async move {
            while let Some(msg) = session.recv().await {
                if session.send(msg).await.is_err() {
                    break;
                }
            }
        })
        .raw_route("/raw", |mut session| async move {
            while session.recv().await.is_some() {}
        })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = Vec::with_capacity(UPGRADE.len() + rest.len());
    if mode & 1 == 1 {
        input.extend_from_slice(UPGRADE);
    }
    input.extend_from_slice(rest);
    let out = converse(&input, |io| wshub::fuzzing::serve_one(server(), io));
    assert!(
        out.is_empty() || out.starts_with(b"HTTP/1."),
        "the server's first bytes are not an HTTP response: {:?}",
        String::from_utf8_lossy(&out[..out.len().min(64)])
    );
});
