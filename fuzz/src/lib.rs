//! What wshub's fuzz targets share: one connection over an in-memory pipe on
//! a paused-clock runtime, and a client-side frame encoder.
//!
//! The clock is paused and advances only when every task waits, so the
//! server's timeouts (handshake, close, ping) pass in no real time, and a
//! connection still open after [`PATIENCE`] of virtual time is a hang: the
//! target panics, and the fuzzer reports the input.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// How much virtual time one input may take: well past every default timeout
/// (handshake 10 s, close 2 s, ping 30 s plus 15 s), so only a hang reaches it.
pub const PATIENCE: Duration = Duration::from_secs(600);

/// Writes `input` as the client (then end of stream) while reading everything
/// the server writes, with `serve` running the server side of the pipe.
/// Returns what the server wrote.
///
/// # Panics
///
/// If the server takes longer than [`PATIENCE`] (a hang) or its task panics.
pub fn converse<F, Fut>(input: &[u8], serve: F) -> Vec<u8>
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(serve(server));
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let write = async {
            // The server may close before it has read everything: that is fine.
            let _ = to_server.write_all(input).await;
            let _ = to_server.shutdown().await;
        };
        let read = async {
            let mut out = Vec::new();
            let _ = from_server.read_to_end(&mut out).await;
            out
        };
        let conversation = async {
            let ((), out) = tokio::join!(write, read);
            server.await.expect("the server task panicked");
            out
        };
        match tokio::time::timeout(PATIENCE, conversation).await {
            Ok(out) => out,
            Err(_) => panic!("the connection was still open after {PATIENCE:?} of virtual time"),
        }
    })
}

#[path = "../../tests/common/frames.rs"]
mod frames;

/// A masked client frame with FIN set.
pub fn final_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frames::client_frame(0x80 | (opcode & 0x0f), payload, true)
}
