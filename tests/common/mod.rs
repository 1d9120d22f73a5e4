//! What several test files share: bounded waits, Ktor's SharedFlow route,
//! and hand-built client frames.

// Each test binary compiles this module and uses its own part of it.
#![allow(dead_code)]

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use wshub::{Hub, Server};

/// How long one step of a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);

/// Awaits `fut` for at most [`WAIT`], failing the test with `what` otherwise.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(WAIT, what, fut).await
}

/// Awaits `fut` for at most `limit`, failing the test with `what` otherwise.
pub async fn within_for<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// How often a condition is polled.
pub const POLL: Duration = Duration::from_millis(5);

/// The most polls of one condition (more than [`WAIT`] allows at [`POLL`]).
pub const MAX_POLLS: u32 = 5_000;

/// Polls `probe` until `done` holds for what it returns, and returns that;
/// fails the test with the last value seen after [`WAIT`].
pub async fn wait_for<T: Debug>(
    what: &str,
    mut probe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + WAIT;
    let polls = async {
        for _ in 0..MAX_POLLS {
            let value = probe();
            if done(&value) {
                return value;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {WAIT:?} waiting for {what}; last seen: {value:?}");
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("gave up after {MAX_POLLS} polls waiting for {what}");
    };
    within_for(WAIT + Duration::from_secs(1), what, polls).await
}

/// The greeting Ktor's SharedFlow sample sends on connect.
pub const GREETING: &str = "You are connected to WebSocket!";

/// Ktor's SharedFlow route at `/ws`: subscribe, greet, then join the hub.
pub fn sharedflow(hub: Hub) -> Server {
    Server::new().route("/ws", move |mut session| {
        let hub = hub.clone();
        async move {
            let subscription = hub.subscribe();
            session.send(GREETING).await?;
            session.join(subscription).await;
            Ok::<_, wshub::Error>(())
        }
    })
}

/// The masking key the hand-built client frames use.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The header of a client frame (RFC 6455 §5.2): `first` is the byte of
/// FIN, RSV bits and opcode; `len` the payload length it declares, whether
/// or not that much follows; then [`MASK`] when `masked`.
pub fn frame_header(first: u8, len: usize, masked: bool) -> Vec<u8> {
    let mut bytes = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    if len < 126 {
        bytes.push(mask_bit | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        bytes.push(mask_bit | 126);
        bytes.extend_from_slice(&len.to_be_bytes());
    } else {
        bytes.push(mask_bit | 127);
        bytes.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if masked {
        bytes.extend_from_slice(&MASK);
    }
    bytes
}

/// `payload` masked with [`MASK`], from its first byte.
pub fn masked(payload: &[u8]) -> impl Iterator<Item = u8> + '_ {
    payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4])
}

/// A whole client frame: [`frame_header`], then the payload, masked when
/// `masked`.
pub fn client_frame(first: u8, payload: &[u8], masked_payload: bool) -> Vec<u8> {
    let mut bytes = frame_header(first, payload.len(), masked_payload);
    if masked_payload {
        bytes.extend(masked(payload));
    } else {
        bytes.extend_from_slice(payload);
    }
    bytes
}
