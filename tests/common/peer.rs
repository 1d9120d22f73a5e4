//! A client of the pub/sub protocol for the tests: replies are matched by
//! id, pushes kept in order.

use std::collections::VecDeque;

use serde_json::{Value, json};
use wshub::testing::{TestClient, TestServer};

/// A protocol client: replies are matched by id, pushes kept in order.
pub struct Peer {
    pub ws: TestClient,
    pub pushes: VecDeque<Value>,
    next_id: u64,
}

impl Peer {
    pub async fn connect(server: &TestServer, path: &str) -> Peer {
        Peer::connect_url(&server.url(path)).await
    }

    pub async fn connect_url(url: &str) -> Peer {
        Peer {
            ws: TestClient::connect(url).await,
            pushes: VecDeque::new(),
            next_id: 1,
        }
    }

    /// Sends `command` with a fresh id; returns the reply.
    pub async fn call(&mut self, mut command: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        command["id"] = json!(id);
        self.ws.send(command.to_string()).await;
        self.reply(json!(id)).await
    }

    /// Sends raw text; returns the reply to `id`.
    pub async fn raw(&mut self, text: &str, id: Value) -> Value {
        self.ws.send(text.to_string()).await;
        self.reply(id).await
    }

    pub async fn reply(&mut self, id: Value) -> Value {
        loop {
            let frame = self.next().await;
            if frame.get("op").is_some() && frame.get("ok").is_none() {
                self.pushes.push_back(frame);
            } else if frame["id"] == id {
                return frame;
            } else {
                panic!("a reply to another command: {frame} (waiting for id {id})");
            }
        }
    }

    pub async fn next(&mut self) -> Value {
        let text = self.ws.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
    }

    /// The next push.
    pub async fn push(&mut self) -> Value {
        match self.pushes.pop_front() {
            Some(push) => push,
            None => {
                let frame = self.next().await;
                assert!(frame.get("ok").is_none(), "a reply, not a push: {frame}");
                frame
            }
        }
    }

    pub async fn subscribe(&mut self, topic: &str) -> Value {
        let reply = self.call(json!({"op": "subscribe", "topic": topic})).await;
        assert_eq!(reply["ok"], true, "{reply}");
        reply
    }

    pub async fn publish(&mut self, topic: &str, data: Value) -> u64 {
        let reply = self
            .call(json!({"op": "publish", "topic": topic, "data": data}))
            .await;
        assert_eq!(reply["ok"], true, "{reply}");
        reply["seq"].as_u64().unwrap()
    }
}
