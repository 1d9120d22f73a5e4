//! Many nodes on one Redis: each test starts its own `redis-server` on a
//! free loopback port (see `tests/common/redis.rs`) and two or three wshub
//! nodes on it, in this process or as the `pubsub` example's processes;
//! clients speak the protocol over real sockets. Every wait is bounded.
#![cfg(feature = "redis")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::peer::Peer;
use common::process::{ExampleProcess, build_example};
use common::redis::{Proxy, RedisServer};
use common::{wait_for, within, within_for};
use serde_json::{Value, json};
use wshub::testing::TestServer;
use wshub::{
    BrokerError, Config, Data, PubSub, PubSubConfig, PubSubError, RedisBroker, RedisConfig, Server,
    TopicConfig,
};

/// Timers short enough for tests: calls bounded at 500 ms, leases of
/// 1.5 s, a probe every 100 ms that may take 400 ms.
fn fast() -> RedisConfig {
    RedisConfig::default()
        .timeout(Duration::from_millis(500))
        .lease(Duration::from_millis(1500))
        .probe(Duration::from_millis(100), Duration::from_millis(400))
        .max_backoff(Duration::from_millis(200))
}

struct Node {
    pubsub: PubSub,
    broker: Arc<RedisBroker>,
    server: TestServer,
}

impl Node {
    async fn start(url: &str, config: PubSubConfig) -> Node {
        Self::start_with(url, config, fast()).await
    }

    async fn start_with(url: &str, config: PubSubConfig, redis: RedisConfig) -> Node {
        let broker = Arc::new(
            within("connect to Redis", RedisBroker::connect(url, redis))
                .await
                .expect("connect"),
        );
        let pubsub = PubSub::with_broker(config, broker.clone()).unwrap();
        let server = Server::new()
            .config(Config::default().close_timeout(Duration::from_millis(200)))
            .pubsub("/pubsub", &pubsub);
        let server = TestServer::start(server).await;
        Node {
            pubsub,
            broker,
            server,
        }
    }

    async fn peer(&self) -> Peer {
        Peer::connect(&self.server, "/pubsub").await
    }

    /// Publishes each number of `numbers` on `topic`, in order.
    async fn publish_all(&self, topic: &str, numbers: std::ops::Range<u64>) {
        for n in numbers {
            self.pubsub
                .publish(topic, Data::json(&n).unwrap())
                .await
                .unwrap();
        }
    }
}

/// A Redis of the test's own, and two nodes on it.
async fn two_nodes() -> (RedisServer, Node, Node) {
    let redis = RedisServer::start();
    let a = Node::start(&redis.url(), PubSubConfig::default()).await;
    let b = Node::start(&redis.url(), PubSubConfig::default()).await;
    (redis, a, b)
}

fn named() -> PubSubConfig {
    PubSubConfig::default()
        .client_info(|request| Data::json(&json!({"name": request.query_param("name")?})).ok())
}

/// The next `n` message pushes of `topic` (failing on a gap).
async fn messages(peer: &mut Peer, n: usize) -> Vec<Value> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let push = within("a message push", peer.push()).await;
        match push["op"].as_str() {
            Some("message") => got.push(push),
            Some("join" | "leave") => {}
            _ => panic!("unexpected push after {} messages: {push}", got.len()),
        }
    }
    got
}

fn seqs(pushes: &[Value]) -> Vec<u64> {
    pushes.iter().map(|p| p["seq"].as_u64().unwrap()).collect()
}

/// How many clients Redis has of `kind` (`pubsub`, `normal`).
async fn clients(redis: &RedisServer, kind: &str) -> usize {
    let mut conn = redis.conn().await;
    let list: String = ::redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg(kind)
        .query_async(&mut conn)
        .await
        .unwrap();
    list.lines().count()
}

async fn subscribers_of(redis: &RedisServer, channel: &str) -> i64 {
    let mut conn = redis.conn().await;
    let counts: Vec<(String, i64)> = ::redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .unwrap();
    counts[0].1
}

#[tokio::test]
async fn three_nodes_deliver_one_order_with_the_same_epoch_and_seq() {
    let redis = RedisServer::start();
    let nodes = [
        Node::start(&redis.url(), PubSubConfig::default()).await,
        Node::start(&redis.url(), PubSubConfig::default()).await,
        Node::start(&redis.url(), PubSubConfig::default()).await,
    ];
    let mut readers = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            let mut peer = node.peer().await;
            let reply = peer.subscribe("news").await;
            assert_eq!(reply["seq"], 0, "{reply}");
            readers.push(peer);
        }
    }
    // Two publishers on two nodes at once.
    let per = 150;
    let mut publishers = Vec::new();
    for (i, node) in nodes[..2].iter().enumerate() {
        let mut peer = node.peer().await;
        publishers.push(tokio::spawn(async move {
            for n in 0..per {
                peer.publish("news", json!({"from": i, "n": n})).await;
            }
        }));
    }
    for publisher in publishers {
        within_for(Duration::from_secs(20), "publishers", publisher)
            .await
            .unwrap();
    }
    let mut first: Option<Vec<Value>> = None;
    for reader in &mut readers {
        let got = messages(reader, 2 * per).await;
        assert_eq!(seqs(&got), (1..=2 * per as u64).collect::<Vec<_>>());
        let epochs: std::collections::HashSet<_> = got.iter().map(|p| p["epoch"].clone()).collect();
        assert_eq!(epochs.len(), 1, "one epoch");
        // Each publisher's own messages in its order.
        for i in 0..2 {
            let ns: Vec<_> = got
                .iter()
                .filter(|p| p["data"]["from"] == i)
                .map(|p| p["data"]["n"].as_u64().unwrap())
                .collect();
            assert_eq!(ns, (0..per as u64).collect::<Vec<_>>());
        }
        match &first {
            None => first = Some(got),
            Some(first) => assert_eq!(first, &got, "every reader, every node: one order"),
        }
    }
    for node in &nodes {
        assert_eq!(node.broker.watched(), 1);
    }
}

#[tokio::test]
async fn a_node_subscribes_while_it_has_subscribers_over_one_connection() {
    let redis = RedisServer::start();
    let node = Node::start(&redis.url(), PubSubConfig::default()).await;
    assert_eq!(subscribers_of(&redis, "wshub:{t0}").await, 0);
    // Many topics at once, from one client: one subscription connection.
    let mut peer = node.peer().await;
    for i in 0..60 {
        peer.subscribe(&format!("t{i}")).await;
    }
    assert_eq!(node.broker.watched(), 60);
    assert_eq!(
        clients(&redis, "pubsub").await,
        1,
        "one subscription connection"
    );
    for i in [0, 59] {
        assert_eq!(subscribers_of(&redis, &format!("wshub:{{t{i}}}")).await, 1);
    }
    // No pattern subscription.
    let mut conn = redis.conn().await;
    let patterns: i64 = ::redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(patterns, 0);
    // The last local subscriber leaves: the node unsubscribes.
    let reply = peer.call(json!({"op": "unsubscribe", "topic": "t0"})).await;
    assert_eq!(reply["ok"], true);
    within("unsubscribed from t0", async {
        while subscribers_of(&redis, "wshub:{t0}").await != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(peer);
    within("every topic unwatched", async {
        while subscribers_of(&redis, "wshub:{t59}").await != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(node.broker.watched(), 0);
}

#[tokio::test]
async fn a_client_resumes_on_another_node() {
    let (_redis, a, b) = two_nodes().await;
    let mut client = a.peer().await;
    client.subscribe("room").await;
    a.publish_all("room", 0..10).await;
    let got = messages(&mut client, 10).await;
    let last = got.last().unwrap().clone();
    drop(client);
    // Published on a, while the client is away.
    a.publish_all("room", 10..30).await;
    let mut client = b.peer().await;
    let reply = client
        .call(json!({"op": "subscribe", "topic": "room",
                     "since": {"epoch": last["epoch"], "seq": last["seq"]}}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["epoch"], last["epoch"]);
    b.pubsub
        .publish("room", Data::json(&30).unwrap())
        .await
        .unwrap();
    let got = messages(&mut client, 21).await;
    assert_eq!(seqs(&got), (11..=31).collect::<Vec<_>>());
    assert_eq!(got[0]["data"], 10);
}

/// What [`publisher`] did: seqs, failures, the slowest failure.
type Published = (Vec<u64>, usize, Duration);

/// Publishes on `topic` from the library, every `every`, until stopped:
/// returns the seqs it got, how many publishes failed, and the longest a
/// failed one took.
fn publisher(
    node: &Node,
    topic: &'static str,
    every: Duration,
) -> (
    tokio::task::JoinHandle<Published>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pubsub = node.pubsub.clone();
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let mut seqs = Vec::new();
        let mut failed = 0;
        let mut slowest_failure = Duration::ZERO;
        let mut n = 0u64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let t0 = Instant::now();
            match pubsub.publish(topic, Data::json(&n).unwrap()).await {
                Ok(at) => seqs.push(at.seq),
                Err(_) => {
                    failed += 1;
                    slowest_failure = slowest_failure.max(t0.elapsed());
                }
            }
            n += 1;
            tokio::time::sleep(every).await;
        }
        (seqs, failed, slowest_failure)
    });
    (task, stop)
}

#[tokio::test]
async fn a_subscription_killed_by_redis_catches_up_with_no_gap() {
    let (redis, a, b) = two_nodes().await;
    let mut reader = b.peer().await;
    reader.subscribe("feed").await;
    let (task, stop) = publisher(&a, "feed", Duration::from_millis(2));
    let mut conn = redis.conn().await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let killed: i64 = ::redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(killed >= 2, "both nodes' subscriptions cut ({killed})");
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (published, failed, _) = task.await.unwrap();
    assert_eq!(failed, 0, "publishing never depended on the subscription");
    let last = *published.last().unwrap();
    let got = messages(&mut reader, last as usize).await;
    assert_eq!(
        seqs(&got),
        (1..=last).collect::<Vec<_>>(),
        "every seq once, in order, no gap"
    );
}

#[tokio::test]
async fn a_silent_subscription_is_noticed_and_caught_up() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr).await;
    let history = 40;
    let config = PubSubConfig::default().topic(TopicConfig::default().history(history));
    let a = Node::start(&redis.url(), config.clone()).await;
    let b = Node::start(&proxy.url(), config).await;
    let mut reader = b.peer().await;
    reader.subscribe("feed").await;
    assert!(b.broker.is_subscribed());

    // Silent while the history covers it: caught up, no gap.
    assert_eq!(proxy.freeze_subscribers(), 1);
    a.publish_all("feed", 0..25).await;
    let got = messages(&mut reader, 25).await;
    assert_eq!(seqs(&got), (1..=25).collect::<Vec<_>>());

    // Silent past the history: the exact gap, then what it keeps.
    wait_for(
        "the subscription is back",
        || b.broker.is_subscribed(),
        |up| *up,
    )
    .await;
    assert_eq!(proxy.freeze_subscribers(), 1);
    a.publish_all("feed", 25..125).await;
    let gap = within("the gap", reader.push()).await;
    assert_eq!(gap["op"], "gap", "{gap}");
    assert_eq!(gap["missed"], 100 - history as u64);
    let got = messages(&mut reader, history).await;
    assert_eq!(seqs(&got), (86..=125).collect::<Vec<_>>());
}

#[tokio::test]
async fn redis_closing_a_slow_subscriber_is_survived() {
    // Redis closes a pub/sub client whose output passes 32 KB at once.
    let redis = RedisServer::start_with(&[
        "--client-output-buffer-limit",
        "pubsub",
        "32kb",
        "16kb",
        "60",
    ]);
    let a = Node::start(&redis.url(), PubSubConfig::default()).await;
    let b = Node::start(&redis.url(), PubSubConfig::default()).await;
    let mut reader = b.peer().await;
    reader.subscribe("big").await;
    let big = "x".repeat(100 * 1024);
    for n in 0..5 {
        a.pubsub
            .publish("big", Data::json(&json!({"n": n, "pad": big})).unwrap())
            .await
            .unwrap();
        // Each one closes both nodes' subscriptions; the next waits for b's.
        wait_for("b subscribed again", || b.broker.is_subscribed(), |up| *up).await;
    }
    let got = messages(&mut reader, 5).await;
    assert_eq!(seqs(&got), vec![1, 2, 3, 4, 5]);
    assert!(
        redis.log().contains("output buffer limits"),
        "Redis closed the slow subscribers: {}",
        redis.log()
    );
    assert!(b.broker.subscription_losses() >= 1);
}

#[tokio::test]
async fn redis_killed_and_restarted_without_data() {
    let (mut redis, a, b) = two_nodes().await;
    let mut reader = b.peer().await;
    let mut writer = a.peer().await;
    reader.subscribe("t").await;
    for n in 0..5 {
        writer.publish("t", json!(n)).await;
    }
    let got = messages(&mut reader, 5).await;
    let old_epoch = got[0]["epoch"].clone();
    // Traffic on another topic all along.
    let (traffic, stop) = publisher(&a, "traffic", Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(50)).await;

    redis.kill();
    // During the outage: a clear error, within the bound, no hang.
    let t0 = Instant::now();
    let reply = writer
        .call(json!({"op": "publish", "topic": "t", "data": 5}))
        .await;
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
    let err = a
        .pubsub
        .publish("t", Data::json(&6).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, PubSubError::Unavailable(_)), "{err:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "failed within the bound: {:?}",
        t0.elapsed()
    );
    let reply = writer.call(json!({"op": "presence", "topic": "t"})).await;
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");

    redis.restart();
    let back = Instant::now();
    // Redis lost the topic: its local subscribers end, and a client that
    // resumes learns the epoch changed.
    let close = within_for(
        Duration::from_secs(5),
        "the reader's session ends",
        reader.ws.expect_close(),
    )
    .await;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1001));
    let mut reader = b.peer().await;
    let reply = within_for(Duration::from_secs(5), "publishing again", async {
        loop {
            let reply = writer
                .call(json!({"op": "publish", "topic": "t", "data": 100}))
                .await;
            if reply["ok"] == true {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_ne!(
        reply["epoch"], old_epoch,
        "a restart without data: a new epoch"
    );
    let reply = reader
        .call(json!({"op": "subscribe", "topic": "t", "since": {"epoch": old_epoch, "seq": 5}}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["recovered"], false);
    assert_ne!(reply["epoch"], old_epoch);
    // What the new epoch keeps, then live, across nodes.
    let seq = writer.publish("t", json!("again")).await;
    let got = messages(&mut reader, 2).await;
    assert_eq!(seqs(&got), vec![1, seq]);
    assert_eq!(got[0]["data"], 100);
    assert!(
        back.elapsed() < Duration::from_secs(2),
        "delivering {:?} after Redis came back",
        back.elapsed()
    );
    // The publisher's calls failed during the outage, each within the
    // bound (500 ms here), and succeed again after it.
    let before = traffic_len(&a).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (seqs, failed, slowest) = traffic.await.unwrap();
    assert!(failed > 0, "the outage was seen");
    assert!(slowest < Duration::from_millis(1500), "{slowest:?}");
    assert!(
        seqs.len() as u64 >= before,
        "published again after the restart"
    );
}

/// How many messages `traffic` holds now (its last seq).
async fn traffic_len(node: &Node) -> u64 {
    node.pubsub.history("traffic", 1).await.unwrap().last
}

#[tokio::test]
async fn the_library_gets_a_clear_error_while_redis_is_away() {
    let mut redis = RedisServer::start();
    let node = Node::start(&redis.url(), PubSubConfig::default()).await;
    node.pubsub
        .publish("x", Data::json(&1).unwrap())
        .await
        .unwrap();
    redis.kill();
    let t0 = Instant::now();
    for _ in 0..3 {
        match node.pubsub.publish("x", Data::json(&2).unwrap()).await {
            Err(PubSubError::Unavailable(why)) => assert!(!why.is_empty()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            node.pubsub.history("x", 10).await,
            Err(PubSubError::Unavailable(_))
        ));
        assert!(matches!(
            node.pubsub.subscribe("y", None).await,
            Err(PubSubError::Unavailable(_))
        ));
    }
    assert!(t0.elapsed() < Duration::from_secs(9), "{:?}", t0.elapsed());
    // A node cannot start on a Redis that is not there.
    let err = RedisBroker::connect(&redis.url(), fast())
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_)), "{err}");
    let err = RedisBroker::connect("http://nope", fast())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Redis URL"), "{err}");
}

#[tokio::test]
async fn presence_spans_nodes_and_a_killed_node_leaves_no_ghost() {
    let redis = RedisServer::start();
    let binary = build_example("pubsub", &["redis"]);
    let events = PubSubConfig::default()
        .topic(TopicConfig::default().presence_events(true))
        .client_info(|request| Data::json(&json!({"name": request.query_param("name")?})).ok());
    let b = Node::start(&redis.url(), events).await;
    let mut bob = Peer::connect(&b.server, "/pubsub?name=bob").await;
    bob.subscribe("lobby").await;

    let url = redis.url();
    let mut node = ExampleProcess::start(
        &binary,
        &[
            "--addr",
            "127.0.0.1:0",
            "--redis",
            &url,
            "--presence-lease",
            "1.5",
        ],
        "pubsub on ws://",
    )
    .expect("start the pubsub example");
    let mut ann = Peer::connect_url(&format!("ws://{}/pubsub?name=ann", node.addr)).await;
    ann.subscribe("lobby").await;
    let join = within("ann's join reaches bob's node", async {
        loop {
            let push = bob.push().await;
            assert_eq!(push["op"], "join", "{push}");
            if push["info"]["name"] == "ann" {
                return push;
            }
        }
    })
    .await;
    assert_eq!(join["info"]["name"], "ann");
    let ann_id = join["client"].clone();
    let reply = bob.call(json!({"op": "presence", "topic": "lobby"})).await;
    assert_eq!(reply["count"], 2, "{reply}");
    let names: Vec<_> = reply["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["info"]["name"].clone())
        .collect();
    assert!(
        names.contains(&json!("ann")) && names.contains(&json!("bob")),
        "{reply}"
    );

    // SIGKILL: ann's node leaves nothing behind, within its lease.
    let t0 = Instant::now();
    node.kill();
    let leave = within_for(Duration::from_secs(5), "ann's leave", bob.push()).await;
    assert_eq!(
        leave,
        json!({"op": "leave", "topic": "lobby", "client": ann_id})
    );
    let reply = bob.call(json!({"op": "presence", "topic": "lobby"})).await;
    assert_eq!(reply["count"], 1, "{reply}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "gone {:?} after the kill",
        t0.elapsed()
    );
}

#[tokio::test]
async fn two_sharedflow_nodes_share_one_conversation() {
    let redis = RedisServer::start();
    let binary = build_example("sharedflow", &["redis"]);
    let url = redis.url();
    let start = || {
        ExampleProcess::start(
            &binary,
            &["--addr", "127.0.0.1:0", "--redis", &url],
            "sharedflow on ws://",
        )
        .expect("start the sharedflow example")
    };
    let (one, two) = (start(), start());
    let mut ann = wshub::testing::TestClient::connect(&one.url("/ws")).await;
    let mut bob = wshub::testing::TestClient::connect(&two.url("/ws")).await;
    for client in [&mut ann, &mut bob] {
        client.expect_text(common::GREETING).await;
    }
    ann.send("hello from one").await;
    bob.send("hello from two").await;
    // One order, whichever node a client is on.
    let mut seen = Vec::new();
    for client in [&mut ann, &mut bob] {
        let lines = [client.recv_text().await, client.recv_text().await];
        seen.push(lines);
    }
    assert_eq!(seen[0], seen[1], "{seen:?}");
    let mut lines = seen[0].to_vec();
    lines.sort();
    assert_eq!(lines, ["hello from one", "hello from two"]);
}

#[tokio::test]
async fn a_node_held_back_catches_up_from_the_history_not_from_memory() {
    let redis = RedisServer::start();
    // Suspend, a small local buffer, a queue of 4 between Redis and it.
    let config = PubSubConfig::default().topic(
        TopicConfig::default().history(500).hub(
            wshub::HubConfig::default()
                .capacity(8)
                .policy(wshub::Policy::Suspend),
        ),
    );
    let a = Node::start(&redis.url(), config.clone()).await;
    let b = Node::start_with(&redis.url(), config, fast().queue(4)).await;
    let mut reader = b.pubsub.subscribe("q", None).await.unwrap().into_receiver();
    // The reader reads nothing while 300 are published on the other node.
    a.publish_all("q", 0..300).await;
    let mut seqs = Vec::new();
    while seqs.len() < 300 {
        let push = within("a message", reader.recv()).await.unwrap();
        let push: Value = wshub::from_json(&push).unwrap();
        assert_eq!(push["op"], "message", "no gap: {push}");
        seqs.push(push["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
    assert!(
        b.broker.catch_ups() >= 1,
        "the overflow was caught up from the history"
    );
    assert_eq!(b.broker.subscription_losses(), 0);
}

#[tokio::test]
async fn a_node_whose_lease_lapsed_joins_its_members_again() {
    let redis = RedisServer::start();
    let a = Node::start(&redis.url(), named()).await;
    let b = Node::start(&redis.url(), named()).await;
    let mut ann = Peer::connect(&a.server, "/pubsub?name=ann").await;
    ann.subscribe("lobby").await;
    let count = || async { b.pubsub.presence("lobby").await.unwrap().len() };
    assert_eq!(count().await, 1);
    // As if node a had stalled past its lease: b sweeps its members, and a,
    // alive, finds its lease lapsed and joins them again.
    let mut conn = redis.conn().await;
    let _: i64 = ::redis::cmd("DEL")
        .arg(format!("wshub:node:{}", a.broker.node()))
        .query_async(&mut conn)
        .await
        .unwrap();
    within("ann listed again", async {
        while count().await != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let members = b.pubsub.presence("lobby").await.unwrap();
    assert_eq!(
        members[0].info.as_ref().unwrap().as_str(),
        r#"{"name":"ann"}"#
    );
    // And ann's leave still works.
    drop(ann);
    within("ann gone", async {
        while count().await != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_redis_restored_from_an_older_snapshot_numbers_nothing_twice() {
    let (mut redis, a, b) = two_nodes().await;
    let mut reader = b.peer().await;
    reader.subscribe("t").await;
    a.publish_all("t", 0..5).await;
    // A snapshot at seq 5, then five more that it does not hold.
    let mut conn = redis.conn().await;
    let _: () = ::redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    a.publish_all("t", 5..10).await;
    let got = messages(&mut reader, 10).await;
    let epoch = got[0]["epoch"].clone();
    redis.kill();
    redis.restart();
    // Back at seq 5 in the same epoch: node b, which delivered 10, gives the
    // topic a new epoch and ends its local subscriptions.
    let close = within_for(
        Duration::from_secs(5),
        "the reader's session ends",
        reader.ws.expect_close(),
    )
    .await;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1001));
    let mut reader = b.peer().await;
    let reply = reader
        .call(json!({"op": "subscribe", "topic": "t", "since": {"epoch": epoch, "seq": 10}}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_ne!(reply["epoch"], epoch, "{reply}");
    // What the snapshot kept comes under the new epoch, then live.
    let kept = messages(&mut reader, 5).await;
    assert_eq!(seqs(&kept), vec![1, 2, 3, 4, 5]);
    let at = within(
        "publish again",
        a.pubsub.publish("t", Data::json(&"new").unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(at.seq, 6);
    assert_eq!(at.epoch.as_str(), reply["epoch"].as_str().unwrap());
    let got = messages(&mut reader, 1).await;
    assert_eq!(got[0]["data"], "new");
}

#[tokio::test]
async fn a_full_redis_refuses_publishes_with_limit_and_no_seq() {
    let redis = RedisServer::start();
    let node = Node::start(&redis.url(), PubSubConfig::default()).await;
    let mut conn = redis.conn().await;
    let info: String = ::redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .unwrap();
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    let max = (used + (2 << 20)).to_string();
    for (name, value) in [
        ("maxmemory", max.as_str()),
        ("maxmemory-policy", "noeviction"),
    ] {
        let _: () = ::redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let big = Data::json(&"x".repeat(64 * 1024)).unwrap();
    let mut seqs = Vec::new();
    let err = loop {
        assert!(
            seqs.len() < 200,
            "2 MB of room took {} publishes of 64 KB",
            seqs.len()
        );
        match node.pubsub.publish("full", big.clone()).await {
            Ok(at) => seqs.push(at.seq),
            Err(err) => break err,
        }
    };
    assert!(matches!(err, PubSubError::Limit(_)), "{err:?}");
    assert!(err.to_string().contains("out of memory"), "{err}");
    // The refused publish was not numbered: the history ends at the last
    // seq that was given.
    let history = node.pubsub.history("full", 100).await.unwrap();
    assert_eq!(history.last, *seqs.last().unwrap());
}

#[tokio::test]
async fn a_jump_in_seq_makes_the_node_read_the_history() {
    let (redis, a, b) = two_nodes().await;
    let mut reader = b.peer().await;
    reader.subscribe("j").await;
    a.publish_all("j", 0..3).await;
    let got = messages(&mut reader, 3).await;
    let epoch = got[0]["epoch"].as_str().unwrap().to_owned();
    let before = b.broker.catch_ups();
    // A message that skips seqs 4..=9 reaches the nodes: they read the
    // history, which holds no such messages, and deliver nothing of it.
    let mut conn = redis.conn().await;
    let _: i64 = ::redis::cmd("PUBLISH")
        .arg("wshub:{j}")
        .arg(format!("m {epoch} 10 \"forged\""))
        .query_async(&mut conn)
        .await
        .unwrap();
    wait_for("a catch-up", || b.broker.catch_ups(), |n| *n > before).await;
    a.publish_all("j", 3..5).await;
    let got = messages(&mut reader, 2).await;
    assert_eq!(seqs(&got), vec![4, 5]);
    assert_eq!(got[0]["data"], 3);
}

#[tokio::test]
async fn a_leave_while_redis_is_away_is_sent_when_it_is_back() {
    let mut redis = RedisServer::start();
    let a = Node::start(&redis.url(), named()).await;
    let mut ann = Peer::connect(&a.server, "/pubsub?name=ann").await;
    ann.subscribe("lobby").await;
    // Redis keeps ann in a snapshot, goes away, and ann leaves meanwhile.
    let mut conn = redis.conn().await;
    let _: () = ::redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    redis.kill();
    drop(ann);
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Back from the snapshot, with ann in it: the node's lease is back too,
    // so only the node itself can take ann out.
    redis.restart();
    within("ann's leave reaches Redis", async {
        loop {
            if let Ok(members) = a.pubsub.presence("lobby").await {
                if members.is_empty() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}
