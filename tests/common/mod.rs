//! What several test files share: Ktor's SharedFlow route.

use wshub::{Hub, Server};

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
