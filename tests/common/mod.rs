//! What several test files share: a bounded wait and Ktor's SharedFlow route.

// Each test binary compiles this module and uses its own part of it.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

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
