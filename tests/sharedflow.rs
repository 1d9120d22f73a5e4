//! Ktor's SharedFlow sample test, ported: two clients are both greeted and each
//! receives both messages, in order.

use wshub::testing::TestServer;
use wshub::{Hub, Server};

const GREETING: &str = "You are connected to WebSocket!";

fn sharedflow(hub: Hub) -> Server {
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

#[tokio::test]
async fn two_clients_are_greeted_and_receive_both_messages_in_order() {
    let server = TestServer::start(sharedflow(Hub::new())).await;
    let mut first = server.connect("/ws").await;
    let mut second = server.connect("/ws").await;
    first.expect_text(GREETING).await;
    second.expect_text(GREETING).await;

    first.send("Hello").await;
    for client in [&mut first, &mut second] {
        client.expect_text("Hello").await;
    }
    second.send("World").await;
    for client in [&mut first, &mut second] {
        client.expect_text("World").await;
    }
    server.shutdown().await;
}
