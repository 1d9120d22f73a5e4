//! The pub/sub protocol over real sockets: every command and push of
//! `docs/PROTOCOL.md`, every error code, resume and replay exactness with a
//! publisher running meanwhile, presence after a reset.

mod common;

use common::peer::Peer;

use common::process::{ExampleProcess, build_example, free_port};

use std::sync::Arc;
use std::time::Duration;

use common::{wait_for, within};
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use wshub::testing::TestServer;
use wshub::{
    Broker, BrokerError, Config, Data, Delivery, History, HubConfig, Member, Message, Policy,
    Position, PubSub, PubSubConfig, Range, RateLimit, Retention, Server, TopicConfig,
};

fn error_code(reply: &Value) -> &str {
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{reply}"
    );
    reply["error"]["code"].as_str().unwrap()
}

fn server(pubsub: &PubSub) -> Server {
    Server::new().config(quick()).pubsub("/pubsub", pubsub)
}

/// Test clients do not answer the server's Close at shutdown: do not wait
/// long for them.
fn quick() -> Config {
    Config::default().close_timeout(Duration::from_millis(200))
}

fn default_pubsub() -> PubSub {
    PubSub::new(PubSubConfig::default()).unwrap()
}

#[tokio::test]
async fn subscribe_publish_unsubscribe_presence_and_history() {
    let pubsub =
        PubSub::new(PubSubConfig::default().client_info(|request| {
            Data::json(&json!({"name": request.query_param("name")?})).ok()
        }))
        .unwrap();
    let server = TestServer::start(server(&pubsub)).await;
    let mut ann = Peer::connect(&server, "/pubsub?name=ann").await;
    let mut bob = Peer::connect(&server, "/pubsub?name=bob").await;

    // A new topic's first subscribe: seq 0, and the epoch every push carries.
    let reply = ann.subscribe("news").await;
    assert_eq!(reply["seq"], 0);
    assert_eq!(reply["recovered"], true);
    let epoch = reply["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty());
    let reply = bob.subscribe("news").await;
    assert_eq!(
        (reply["epoch"].as_str(), reply["seq"].as_u64()),
        (Some(&*epoch), Some(0))
    );

    // The sender gets its own message too; seq counts 1, 2, 3.
    assert_eq!(ann.publish("news", json!({"text": "hello"})).await, 1);
    assert_eq!(bob.publish("news", json!([1, 2.5, null, "x"])).await, 2);
    for peer in [&mut ann, &mut bob] {
        let first = peer.push().await;
        assert_eq!(
            first,
            json!({"op": "message", "topic": "news", "epoch": epoch, "seq": 1, "data": {"text": "hello"}})
        );
        let second = peer.push().await;
        assert_eq!(second["seq"], 2);
        assert_eq!(second["data"], json!([1, 2.5, null, "x"]));
    }

    // Presence lists both, with what the handshake attached.
    let reply = ann.call(json!({"op": "presence", "topic": "news"})).await;
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["count"], 2, "{reply}");
    let mut members: Vec<Value> = reply["members"].as_array().unwrap().clone();
    members.sort_by_key(|m| m["info"]["name"].as_str().unwrap().to_string());
    assert_eq!(members.len(), 2, "{reply}");
    assert_eq!(members[0]["info"], json!({"name": "ann"}));
    assert_eq!(members[1]["info"], json!({"name": "bob"}));
    assert!(members[0]["client"].as_str().unwrap().starts_with('c'));
    // Each subscribe reply names the connection's own client id, so that a
    // client finds itself among the members.
    let ann_id = ann.subscribe("own").await["client"].clone();
    let bob_id = bob.subscribe("own").await["client"].clone();
    assert_ne!(ann_id, bob_id);
    let named = |id: &Value| {
        members
            .iter()
            .find(|m| &m["client"] == id)
            .map(|m| m["info"].clone())
    };
    assert_eq!(named(&ann_id), Some(json!({"name": "ann"})), "{reply}");
    assert_eq!(named(&bob_id), Some(json!({"name": "bob"})), "{reply}");

    // History: the most recent, oldest first, as message pushes.
    let reply = bob
        .call(json!({"op": "history", "topic": "news", "limit": 1}))
        .await;
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["epoch"], json!(epoch));
    assert_eq!(reply["messages"].as_array().unwrap().len(), 1);
    assert_eq!(reply["messages"][0]["seq"], 2);
    let reply = bob.call(json!({"op": "history", "topic": "news"})).await;
    let seqs: Vec<u64> = reply["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2]);

    // Unsubscribe: ann hears nothing more of news, and leaves its presence.
    let reply = ann
        .call(json!({"op": "unsubscribe", "topic": "news"}))
        .await;
    assert_eq!(reply, json!({"id": reply["id"], "ok": true}));
    assert_eq!(bob.publish("news", json!("after")).await, 3);
    assert_eq!(bob.push().await["seq"], 3);
    let reply = ann.call(json!({"op": "presence", "topic": "news"})).await;
    assert_eq!(reply["members"].as_array().unwrap().len(), 1, "{reply}");
    // A publish to a topic ann is not in: ann's next frame is its reply.
    assert_eq!(ann.publish("elsewhere", json!(1)).await, 1);
    assert!(ann.pushes.is_empty(), "{:?}", ann.pushes);
    server.shutdown().await;
}

#[tokio::test]
async fn replies_repeat_string_and_number_ids() {
    let pubsub = default_pubsub();
    let server = TestServer::start(server(&pubsub)).await;
    let mut peer = Peer::connect(&server, "/pubsub").await;
    let reply = peer
        .raw(
            r#"{"id":"a-1","op":"unsubscribe","topic":"t","extra":{"ignored":true}}"#,
            json!("a-1"),
        )
        .await;
    assert_eq!(reply, json!({"id": "a-1", "ok": true}));
    let reply = peer
        .raw(r#"{"id":-7.5,"op":"unsubscribe","topic":"t"}"#, json!(-7.5))
        .await;
    assert_eq!(reply["ok"], true);
    server.shutdown().await;
}

/// Every malformed command gets `bad_request` (with `id: null` when none
/// could be read), and the connection goes on working.
#[tokio::test]
async fn malformed_commands_get_bad_request_and_the_connection_stays_usable() {
    let pubsub = default_pubsub();
    let server = TestServer::start(server(&pubsub)).await;
    let mut peer = Peer::connect(&server, "/pubsub").await;
    let cases: &[(&str, Value)] = &[
        ("not json", Value::Null),
        ("[1,2]", Value::Null),
        (r#"{"id":1,"op":"subscribe","topic":"t""#, Value::Null),
        (
            r#"{"id":{"x":1},"op":"subscribe","topic":"t"}"#,
            Value::Null,
        ),
        (r#"{"id":2}"#, json!(2)),
        (r#"{"id":3,"op":7}"#, json!(3)),
        (r#"{"id":4,"op":"dance"}"#, json!(4)),
        (r#"{"id":5,"op":"subscribe"}"#, json!(5)),
        (r#"{"id":6,"op":"subscribe","topic":42}"#, json!(6)),
        (
            r#"{"id":7,"op":"subscribe","topic":"t","since":{"seq":1}}"#,
            json!(7),
        ),
        (
            r#"{"id":8,"op":"subscribe","topic":"t","since":{"epoch":"e","seq":-1}}"#,
            json!(8),
        ),
        (r#"{"id":9,"op":"publish","topic":"t"}"#, json!(9)),
        (
            r#"{"id":10,"op":"history","topic":"t","limit":0}"#,
            json!(10),
        ),
        (
            r#"{"id":11,"op":"history","topic":"t","limit":"all"}"#,
            json!(11),
        ),
    ];
    for (text, id) in cases {
        let reply = peer.raw(text, id.clone()).await;
        assert_eq!(error_code(&reply), "bad_request", "{text} → {reply}");
    }
    // A binary frame is not a command either.
    peer.ws.send(Message::binary(vec![1, 2, 3])).await;
    let reply = peer.reply(Value::Null).await;
    assert_eq!(error_code(&reply), "bad_request");
    // Subscribing twice is refused; resuming from the future too.
    let reply = peer.subscribe("t").await;
    let epoch = reply["epoch"].clone();
    let again = peer.call(json!({"op": "subscribe", "topic": "t"})).await;
    assert_eq!(error_code(&again), "bad_request");
    let future = peer
        .call(json!({"op": "subscribe", "topic": "u", "since": {"epoch": "x", "seq": 0}}))
        .await;
    assert_eq!(
        future["ok"], true,
        "another epoch is not an error: {future}"
    );
    let _ = peer.call(json!({"op": "unsubscribe", "topic": "t"})).await;
    let ahead = peer
        .call(json!({"op": "subscribe", "topic": "t", "since": {"epoch": epoch, "seq": 99}}))
        .await;
    assert_eq!(error_code(&ahead), "bad_request");
    // Still usable.
    assert_eq!(peer.publish("t", json!("fine")).await, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_topic_names_get_bad_topic() {
    let pubsub = PubSub::new(PubSubConfig::default().max_name_len(16)).unwrap();
    let server = TestServer::start(server(&pubsub)).await;
    let mut peer = Peer::connect(&server, "/pubsub").await;
    for topic in ["", "with space", "quote\"d", "é", "a-name-longer-than-16"] {
        for op in ["subscribe", "unsubscribe", "publish", "presence", "history"] {
            let reply = peer
                .call(json!({"op": op, "topic": topic, "data": 1}))
                .await;
            assert_eq!(error_code(&reply), "bad_topic", "{op} {topic:?}: {reply}");
        }
    }
    assert_eq!(peer.publish("ok.name:1/2@x", json!(1)).await, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn the_authorization_hooks_see_the_client_and_the_topic() {
    let pubsub = PubSub::new(
        PubSubConfig::default()
            .on_subscribe(|client, topic| match topic.strip_prefix("user:") {
                Some(name) if client.request.query_param("user").as_deref() != Some(name) => {
                    Err(format!("{topic} is {name}'s own"))
                }
                _ => Ok(()),
            })
            .on_publish(|client, topic| {
                if topic == "announcements" && !client.id.is_empty() {
                    Err("only the service announces".into())
                } else {
                    Ok(())
                }
            }),
    )
    .unwrap();
    let server = TestServer::start(server(&pubsub)).await;
    let mut ann = Peer::connect(&server, "/pubsub?user=ann").await;
    let reply = ann
        .call(json!({"op": "subscribe", "topic": "user:bob"}))
        .await;
    assert_eq!(error_code(&reply), "not_allowed");
    assert_eq!(reply["error"]["message"], "user:bob is bob's own");
    ann.subscribe("user:ann").await;
    ann.subscribe("announcements").await;
    let reply = ann
        .call(json!({"op": "publish", "topic": "announcements", "data": "hi"}))
        .await;
    assert_eq!(error_code(&reply), "not_allowed");
    // The service publishes from the library.
    let at = pubsub
        .publish("announcements", Data::json("maintenance at 6").unwrap())
        .await
        .unwrap();
    assert_eq!(at.seq, 1);
    assert_eq!(ann.push().await["data"], "maintenance at 6");
    server.shutdown().await;
}

#[tokio::test]
async fn limits_get_limit_and_the_connection_stays_usable() {
    let pubsub = PubSub::new(PubSubConfig::default().max_subscriptions(2).max_topics(3)).unwrap();
    let config = quick().publish_rate(Some(RateLimit::new(1, 2).on_excess(wshub::Excess::Drop)));
    let server = TestServer::start(Server::new().config(config).pubsub("/pubsub", &pubsub)).await;
    let mut peer = Peer::connect(&server, "/pubsub").await;
    peer.subscribe("a").await;
    peer.subscribe("b").await;
    let reply = peer.call(json!({"op": "subscribe", "topic": "c"})).await;
    assert_eq!(error_code(&reply), "limit");
    // Publish rate: a burst of 2, then refused with limit (Excess::Drop:
    // the session stays open).
    assert_eq!(peer.publish("a", json!(1)).await, 1);
    assert_eq!(peer.publish("a", json!(2)).await, 2);
    let reply = peer
        .call(json!({"op": "publish", "topic": "a", "data": 3}))
        .await;
    assert_eq!(error_code(&reply), "limit");
    // Topics: a and b exist; c is a third; d is one too many.
    let mut other = Peer::connect(&server, "/pubsub").await;
    other.subscribe("c").await;
    let reply = other.call(json!({"op": "subscribe", "topic": "d"})).await;
    assert_eq!(error_code(&reply), "limit", "{reply}");
    // Still usable.
    let reply = other.call(json!({"op": "presence", "topic": "c"})).await;
    assert_eq!(reply["ok"], true);
    server.shutdown().await;
}

/// A broker that cannot be reached: every command that needs it says
/// `unavailable`, and the connection stays usable.
struct Down;

fn down<T: Send + 'static>() -> BoxFuture<'static, Result<T, BrokerError>> {
    Box::pin(async { Err(BrokerError::Unavailable("connection refused".into())) })
}

impl Broker for Down {
    fn watch<'a>(
        &'a self,
        _: &'a str,
        _: Delivery,
        _: Retention,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        down()
    }
    fn unwatch(&self, _: &str) {}
    fn publish<'a>(
        &'a self,
        _: &'a str,
        _: Data,
        _: Retention,
    ) -> BoxFuture<'a, Result<Position, BrokerError>> {
        down()
    }
    fn history<'a>(
        &'a self,
        _: &'a str,
        _: Range,
        _: Retention,
    ) -> BoxFuture<'a, Result<History, BrokerError>> {
        down()
    }
    fn join<'a>(
        &'a self,
        _: &'a str,
        _: Member,
        _: usize,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        down()
    }
    fn leave<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        down()
    }
    fn members<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<Member>, BrokerError>> {
        down()
    }
}

#[tokio::test]
async fn an_unreachable_broker_gets_unavailable() {
    let pubsub = PubSub::with_broker(PubSubConfig::default(), Arc::new(Down)).unwrap();
    let server = TestServer::start(server(&pubsub)).await;
    let mut peer = Peer::connect(&server, "/pubsub").await;
    for op in ["subscribe", "publish", "presence", "history"] {
        let reply = peer.call(json!({"op": op, "topic": "t", "data": 1})).await;
        assert_eq!(error_code(&reply), "unavailable", "{op}: {reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains("connection refused")
        );
    }
    let reply = peer.call(json!({"op": "unsubscribe", "topic": "t"})).await;
    assert_eq!(reply["ok"], true);
    server.shutdown().await;
}

#[tokio::test]
async fn the_subprotocol_is_selected_when_offered() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let pubsub = default_pubsub();
    let server = TestServer::start(server(&pubsub)).await;
    let mut request = server.url("/pubsub").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "other, wshub.v1".parse().unwrap());
    let (_ws, response) = within("the handshake", tokio_tungstenite::connect_async(request))
        .await
        .unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "wshub.v1");
    // A client that offers none is accepted, with none selected.
    let (_ws, response) = within(
        "the handshake",
        tokio_tungstenite::connect_async(server.url("/pubsub")),
    )
    .await
    .unwrap();
    assert!(response.headers().get("sec-websocket-protocol").is_none());
    server.shutdown().await;
}

/// Reads pushes until the one with `seq`, checking that the sequence has
/// no hole and no duplicate from `after` on; returns the pushes read.
async fn read_through(peer: &mut Peer, after: u64, last: u64) -> Vec<Value> {
    let mut expect = after + 1;
    let mut seen = Vec::new();
    while expect <= last {
        let push = within("the next message", peer.push()).await;
        assert_eq!(push["op"], "message", "{push}");
        assert_eq!(push["seq"], expect, "a hole or a duplicate: {push}");
        assert_eq!(push["data"], json!(expect), "{push}");
        expect += 1;
        seen.push(push);
    }
    seen
}

/// A publisher runs on while a client drops its connection and resumes
/// from the last position it saw: it gets every message after it exactly
/// once, history first, then live.
#[tokio::test]
async fn resume_under_a_concurrent_publisher_loses_nothing_and_repeats_nothing() {
    let pubsub =
        PubSub::new(PubSubConfig::default().topic(TopicConfig::default().history(10_000))).unwrap();
    let server = TestServer::start(server(&pubsub)).await;
    let publisher = tokio::spawn({
        let pubsub = pubsub.clone();
        async move {
            for i in 1..=3_000u64 {
                let at = pubsub
                    .publish("feed", Data::json(&i).unwrap())
                    .await
                    .unwrap();
                assert_eq!(at.seq, i);
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
    });
    let mut position = (String::new(), 0u64);
    for round in 0..5 {
        let mut peer = Peer::connect(&server, "/pubsub").await;
        let since = (round > 0).then(|| json!({"epoch": position.0, "seq": position.1}));
        let reply = peer
            .call(json!({"op": "subscribe", "topic": "feed", "since": since}))
            .await;
        assert_eq!(reply["ok"], true, "{reply}");
        if round > 0 {
            assert_eq!(reply["epoch"], json!(position.0));
            assert_eq!(reply["recovered"], true, "{reply}");
        }
        position.0 = reply["epoch"].as_str().unwrap().into();
        // Read on a while, through history and into live messages.
        let upto = reply["seq"].as_u64().unwrap() + 100;
        let from = if round == 0 {
            reply["seq"].as_u64().unwrap()
        } else {
            position.1
        };
        let seen = read_through(&mut peer, from, upto).await;
        position.1 = seen.last().map_or(from, |p| p["seq"].as_u64().unwrap());
        drop(peer); // gone without a Close
    }
    within("the publisher", publisher).await.unwrap();
    // And the rest, after the publisher is done.
    let mut peer = Peer::connect(&server, "/pubsub").await;
    let reply = peer
        .call(json!({"op": "subscribe", "topic": "feed", "since": {"epoch": position.0, "seq": position.1}}))
        .await;
    assert_eq!(
        (reply["recovered"].as_bool(), reply["seq"].as_u64()),
        (Some(true), Some(3_000))
    );
    read_through(&mut peer, position.1, 3_000).await;
    server.shutdown().await;
}

/// A resume that reaches back past what the history keeps gets a gap push
/// with exactly the number lost, then what is kept; another epoch is
/// reported as such.
#[tokio::test]
async fn a_resume_past_the_history_reports_the_gap_and_a_new_epoch() {
    let pubsub =
        PubSub::new(PubSubConfig::default().topic(TopicConfig::default().history(5))).unwrap();
    let server = TestServer::start(server(&pubsub)).await;
    let mut epoch = String::new();
    for i in 1..=20u64 {
        epoch = pubsub
            .publish("t", Data::json(&i).unwrap())
            .await
            .unwrap()
            .epoch
            .to_string();
    }
    let mut peer = Peer::connect(&server, "/pubsub").await;
    let reply = peer
        .call(json!({"op": "subscribe", "topic": "t", "since": {"epoch": epoch, "seq": 3}}))
        .await;
    assert_eq!(reply["recovered"], false);
    assert_eq!(reply["seq"], 20);
    // Kept: 16..=20; lost for good: 4..=15.
    assert_eq!(
        peer.push().await,
        json!({"op": "gap", "topic": "t", "missed": 12})
    );
    read_through(&mut peer, 15, 20).await;
    assert_eq!(peer.publish("t", json!(21)).await, 21);
    read_through(&mut peer, 20, 21).await;

    // Another epoch: the client's history is gone; it gets what the new
    // one keeps (all of it here), and no gap, since nothing of it is lost.
    let mut other = Peer::connect(&server, "/pubsub").await;
    let reply = other
        .call(json!({"op": "subscribe", "topic": "t", "since": {"epoch": "gone", "seq": 19}}))
        .await;
    assert_eq!(reply["recovered"], false);
    assert_eq!(reply["epoch"], json!(epoch));
    assert_eq!(
        other.push().await,
        json!({"op": "gap", "topic": "t", "missed": 16})
    );
    read_through(&mut other, 16, 21).await;
    server.shutdown().await;
}

/// Replay (Ktor's `replay = n`): a new subscriber gets the last n, then
/// live ones, with no gap and no duplicate while a publisher runs.
#[tokio::test]
async fn replay_gives_the_last_messages_then_live_without_a_gap() {
    let pubsub =
        PubSub::new(PubSubConfig::default().topic(TopicConfig::default().replay(10).history(0)))
            .unwrap();
    let server = TestServer::start(server(&pubsub)).await;
    for i in 1..=30u64 {
        let _ = pubsub.publish("r", Data::json(&i).unwrap()).await.unwrap();
    }
    let publisher = tokio::spawn({
        let pubsub = pubsub.clone();
        async move {
            for i in 31..=1_000u64 {
                let _ = pubsub.publish("r", Data::json(&i).unwrap()).await.unwrap();
            }
        }
    });
    for _ in 0..3 {
        let mut peer = Peer::connect(&server, "/pubsub").await;
        let reply = peer.subscribe("r").await;
        let at = reply["seq"].as_u64().unwrap();
        assert!(at >= 30, "{reply}");
        // The last ten before the position, then on without a hole.
        read_through(&mut peer, at - 10, (at + 50).min(1_000)).await;
    }
    within("the publisher", publisher).await.unwrap();
    server.shutdown().await;
}

/// Under DropOldest, a subscriber that falls behind gets a gap push with
/// exactly the number of messages it lost, however many presence events
/// were lost with them.
#[tokio::test]
async fn a_lagging_subscriber_gets_an_exact_gap() {
    let pubsub = PubSub::new(
        PubSubConfig::default().topic(
            TopicConfig::default()
                .hub(HubConfig::default().capacity(8).policy(Policy::DropOldest))
                .presence_events(true),
        ),
    )
    .unwrap();
    let server = TestServer::start(server(&pubsub)).await;
    let mut slow = Peer::connect(&server, "/pubsub").await;
    slow.subscribe("fast").await;
    assert_eq!(slow.push().await["op"], "join"); // its own arrival
    // Far more than the buffer and the socket hold, while slow reads nothing.
    let big = "x".repeat(4096);
    for i in 1..=2_000u64 {
        let _ = pubsub
            .publish("fast", Data::json(&json!({"i": i, "pad": big})).unwrap())
            .await
            .unwrap();
    }
    let mut expect = 1;
    let mut lost = 0;
    while expect <= 2_000 {
        let push = within("the next push", slow.push()).await;
        match push["op"].as_str() {
            Some("gap") => {
                let missed = push["missed"].as_u64().unwrap();
                lost += missed;
                expect += missed;
            }
            Some("message") => {
                assert_eq!(push["seq"], expect, "{}", push["seq"]);
                assert_eq!(push["data"]["i"], expect);
                expect += 1;
            }
            _ => panic!("{push}"),
        }
    }
    assert!(lost > 0, "the subscriber was expected to lag");
    server.shutdown().await;
}

/// A client that vanishes (TCP reset) leaves the presence of its topics,
/// and the others get a leave push.
#[tokio::test]
async fn presence_is_cleaned_up_after_a_reset() {
    let pubsub =
        PubSub::new(PubSubConfig::default().topic(TopicConfig::default().presence_events(true)))
            .unwrap();
    let server = TestServer::start(server(&pubsub)).await;
    let mut stays = Peer::connect(&server, "/pubsub").await;
    stays.subscribe("room").await;
    let me = stays.push().await;
    assert_eq!(me["op"], "join");
    let mut goes = Peer::connect(&server, "/pubsub").await;
    goes.subscribe("room").await;
    goes.subscribe("lobby").await;
    let join = stays.push().await;
    assert_eq!(join["op"], "join");
    let client = join["client"].clone();
    assert_ne!(client, me["client"]);
    assert_eq!(pubsub.presence("room").await.unwrap().len(), 2);

    // Reset: SO_LINGER 0, then close: the server sees a reset, no Close.
    let tcp = match goes.ws.inner().get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp,
        _ => unreachable!(),
    };
    socket2::SockRef::from(&*tcp)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(goes);
    let leave = within("the leave push", stays.push()).await;
    assert_eq!(
        leave,
        json!({"op": "leave", "topic": "room", "client": client})
    );
    wait_for(
        "the lobby to be empty",
        || {
            pubsub
                .topics()
                .get("lobby")
                .map(|hub| hub.subscriber_count())
        },
        |n| n.is_none(),
    )
    .await;
    assert_eq!(pubsub.presence("room").await.unwrap().len(), 1);
    assert!(pubsub.presence("lobby").await.unwrap().is_empty());
    server.shutdown().await;
}

/// More members than a topic's presence holds: refused with `limit`.
#[tokio::test]
async fn a_full_presence_refuses_with_limit() {
    let pubsub = PubSub::new(PubSubConfig::default().max_members(2)).unwrap();
    let server = TestServer::start(server(&pubsub)).await;
    let mut peers = Vec::new();
    for _ in 0..2 {
        let mut peer = Peer::connect(&server, "/pubsub").await;
        peer.subscribe("small").await;
        peers.push(peer);
    }
    let mut third = Peer::connect(&server, "/pubsub").await;
    let reply = third
        .call(json!({"op": "subscribe", "topic": "small"}))
        .await;
    assert_eq!(error_code(&reply), "limit", "{reply}");
    // Refused whole: not subscribed, so a publish does not reach it.
    assert_eq!(third.publish("small", json!("hi")).await, 1);
    assert!(third.pushes.is_empty());
    assert_eq!(pubsub.topics().get("small").unwrap().subscriber_count(), 2);
    // Once one leaves, there is room.
    let mut gone = peers.pop().unwrap();
    gone.ws.close(None).await;
    wait_for(
        "the member to leave",
        || {
            pubsub
                .topics()
                .get("small")
                .map(|hub| hub.subscriber_count())
        },
        |n| *n == Some(1),
    )
    .await;
    let reply = within("presence", async {
        loop {
            if pubsub.presence("small").await.unwrap().len() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    reply.await;
    third.subscribe("small").await;
    server.shutdown().await;
}

/// Over the publish rate under `Excess::Close` (the default): a `limit`
/// reply, then Close 1008.
#[tokio::test]
async fn a_publisher_over_the_rate_is_told_and_then_closed() {
    let pubsub = default_pubsub();
    let config = quick().publish_rate(Some(RateLimit::new(1, 1)));
    let server = TestServer::start(Server::new().config(config).pubsub("/pubsub", &pubsub)).await;
    let mut peer = Peer::connect(&server, "/pubsub").await;
    assert_eq!(peer.publish("t", json!(1)).await, 1);
    let reply = peer
        .call(json!({"op": "publish", "topic": "t", "data": 2}))
        .await;
    assert_eq!(error_code(&reply), "limit");
    let close = peer.ws.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "publish rate limit exceeded");
    server.shutdown().await;
}

const BANNER: &str = "pubsub on ws://";

fn example_binary() -> std::path::PathBuf {
    build_example("pubsub", &[])
}

/// The example on a port it is given, with its flags: replay and history
/// as asked, presence with the name from the query.
#[tokio::test]
async fn the_example_serves_the_protocol_with_its_flags() {
    let binary = tokio::task::spawn_blocking(example_binary)
        .await
        .expect("building the example");
    let args = ["--history", "3", "--replay", "2", "--history-ttl", "60"];
    let mut failures = Vec::new();
    let (server, wanted) = loop {
        let wanted = free_port();
        let addr = wanted.to_string();
        let mut all = vec!["--addr", addr.as_str()];
        all.extend(args);
        match ExampleProcess::start(&binary, &all, BANNER) {
            Ok(server) => break (server, wanted),
            Err(err) if failures.len() < 2 => failures.push(err),
            Err(err) => panic!("the example did not start on a chosen port: {err}\n{failures:?}"),
        }
    };
    assert_eq!(server.addr, wanted, "--addr was not honoured");
    assert!(
        server
            .banner
            .contains(&format!("pubsub on ws://{wanted}/pubsub")),
        "{}",
        server.banner
    );

    let mut ann = Peer::connect_url(&server.url("/pubsub?name=ann")).await;
    ann.subscribe("news").await;
    for i in 1..=5 {
        assert_eq!(ann.publish("news", json!(i)).await, i);
    }
    let mut bob = Peer::connect_url(&server.url("/pubsub?name=bob")).await;
    let reply = bob.subscribe("news").await;
    assert_eq!(reply["seq"], 5);
    // --replay 2: the last two first.
    read_through(&mut bob, 3, 5).await;
    // --history 3: the last three kept.
    let reply = bob.call(json!({"op": "history", "topic": "news"})).await;
    let seqs: Vec<u64> = reply["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [3, 4, 5]);
    let reply = bob.call(json!({"op": "presence", "topic": "news"})).await;
    let mut names: Vec<&str> = reply["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["info"]["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ann", "bob"]);
    // The example announces arrivals: ann hears bob join.
    let join = loop {
        let push = within("bob's join", ann.push()).await;
        if push["op"] == "join" && push["info"]["name"] == "bob" {
            break push;
        }
    };
    assert_eq!(join["topic"], "news");
    drop(server);
}

/// A client that fills the history with large messages: the node keeps at
/// most `max_history_bytes`, the publish past it gets `limit`, and the
/// connection goes on.
#[tokio::test]
async fn a_history_flood_is_refused_with_limit() {
    let pubsub = PubSub::new(PubSubConfig::default().max_history_bytes(32 * 1024)).unwrap();
    let server = TestServer::start(server(&pubsub)).await;
    let mut peer = Peer::connect(&server, "/pubsub").await;
    let big = "x".repeat(4096);
    let mut kept = 0;
    let refused = loop {
        let reply = peer
            .call(json!({"op": "publish", "topic": format!("t{}", kept % 4), "data": big}))
            .await;
        if reply["ok"] == false {
            break reply;
        }
        kept += 1;
        assert!(kept < 100, "never refused");
    };
    assert_eq!(error_code(&refused), "limit");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("32768 bytes"),
        "{refused}"
    );
    assert!((6..=8).contains(&kept), "{kept} kept");
    // Reading the history and subscribing still work.
    let reply = peer.call(json!({"op": "history", "topic": "t0"})).await;
    assert_eq!(reply["ok"], true);
    peer.subscribe("t0").await;
    server.shutdown().await;
}

fn parse(msg: Message) -> Value {
    serde_json::from_str(msg.to_text().unwrap()).unwrap()
}

/// A topic read in process: resume from a position while a publisher
/// runs, then fall behind under DropOldest; every seq is there once, or
/// counted in a gap.
#[tokio::test]
async fn a_topic_can_be_read_in_process_with_the_same_guarantees() {
    let pubsub = PubSub::new(
        PubSubConfig::default().topic(
            TopicConfig::default()
                .history(1_000)
                .hub(HubConfig::default().capacity(16).policy(Policy::DropOldest)),
        ),
    )
    .unwrap();
    let mut at = None;
    for i in 1..=100u64 {
        at = Some(
            pubsub
                .publish("feed", Data::json(&i).unwrap())
                .await
                .unwrap(),
        );
    }
    let at = at.unwrap();
    let since = Position {
        epoch: at.epoch.clone(),
        seq: 40,
    };
    let publisher = tokio::spawn({
        let pubsub = pubsub.clone();
        async move {
            for i in 101..=600u64 {
                let _ = pubsub
                    .publish("feed", Data::json(&i).unwrap())
                    .await
                    .unwrap();
            }
        }
    });
    let subscribed = pubsub.subscribe("feed", Some(&since)).await.unwrap();
    assert!(subscribed.recovered);
    let mut feed = subscribed.into_receiver();
    let mut expect = 41;
    let mut gaps = 0;
    while expect <= 600 {
        let push = parse(within("the next push", feed.recv()).await.unwrap());
        match push["op"].as_str() {
            Some("message") => {
                assert_eq!(push["seq"], expect, "{push}");
                expect += 1;
            }
            Some("gap") => {
                gaps += 1;
                expect += push["missed"].as_u64().unwrap();
            }
            _ => panic!("{push}"),
        }
        if expect % 97 == 0 {
            // Fall behind for a while: the 16-slot buffer lets go.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(expect, 601);
    within("the publisher", publisher).await.unwrap();
    // The publisher runs ahead whenever the reader waits: 500 messages
    // into 16 slots cannot all be kept.
    assert!(gaps >= 1, "the reader was expected to fall behind");
    assert!(matches!(feed.try_recv(), Err(wshub::TryRecvError::Empty)));
}
