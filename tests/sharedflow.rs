//! Ktor's SharedFlow sample test, ported: two clients are both greeted and each
//! receives both messages, in order.

mod common;

use common::{GREETING, sharedflow};
use wshub::Hub;
use wshub::testing::TestServer;

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
    // Leaving the conversation closes each client, as Ktor's `client.webSocket` block does.
    first.close(None).await;
    second.close(None).await;
    server.shutdown().await;
}
