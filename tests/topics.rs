//! Topics: a registry of named hubs, created on first use, freed with their
//! last subscriber, bounded in count and name.

mod common;

use common::{GREETING, wait_for};
use wshub::testing::TestServer;
use wshub::{HubConfig, Message, Policy, Published, Server, TopicError, Topics, TopicsConfig};

/// A route where each client joins the topic its `?topic=` names.
fn rooms(topics: Topics) -> Server {
    Server::new().route("/room", move |mut session| {
        let topics = topics.clone();
        async move {
            let name = session.request().query_param("topic").unwrap_or_default();
            let subscription = match topics.subscribe(&name) {
                Ok(subscription) => subscription,
                Err(err) => {
                    let _ = session.send(format!("refused: {err}")).await;
                    return;
                }
            };
            let _ = session.send(GREETING).await;
            session.join(subscription).await;
        }
    })
}

#[tokio::test]
async fn clients_hear_their_own_topic_only_and_a_topic_ends_with_its_last_client() {
    let topics = Topics::default();
    let server = TestServer::start(rooms(topics.clone())).await;
    let mut ann = server.connect("/room?topic=kitchen").await;
    let mut bob = server.connect("/room?topic=kitchen").await;
    let mut cid = server.connect("/room?topic=garden").await;
    for client in [&mut ann, &mut bob, &mut cid] {
        client.expect_text(GREETING).await;
    }
    assert_eq!(topics.len(), 2);
    let mut names = topics.names();
    names.sort();
    assert_eq!(names, ["garden", "kitchen"]);

    ann.send("in the kitchen").await;
    ann.expect_text("in the kitchen").await;
    bob.expect_text("in the kitchen").await;
    cid.send("in the garden").await;
    cid.expect_text("in the garden").await;
    // Each client's next message proves it heard nothing of the other
    // topic in between.
    bob.send("still the kitchen").await;
    bob.expect_text("still the kitchen").await;

    // From outside a session, too.
    let published = topics
        .publish("garden", Message::text("from the service"))
        .await
        .unwrap();
    assert_eq!(published, Published::Queued);
    cid.expect_text("from the service").await;

    cid.close(None).await;
    wait_for("the garden to go", || topics.len(), |n| *n == 1).await;
    assert!(topics.get("garden").is_none());
    assert_eq!(
        topics
            .publish("garden", Message::text("anyone?"))
            .await
            .unwrap(),
        Published::NoSubscribers
    );
    assert_eq!(topics.len(), 1, "a publish creates no topic");
    ann.close(None).await;
    bob.close(None).await;
    wait_for("every topic to go", || topics.len(), |n| *n == 0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn bad_names_are_refused_with_the_reason() {
    let topics = Topics::new(TopicsConfig::default().max_name_len(8)).unwrap();
    for (name, why) in [
        ("", "cannot be empty"),
        ("ninebytes", "at most 8 allowed"),
        ("a b", "' ' is not allowed"),
        ("é", "'é' is not allowed"),
        ("a\nb", "'\\n' is not allowed"),
    ] {
        let err = topics.subscribe(name).unwrap_err();
        assert!(matches!(err, TopicError::BadName(_)), "{name:?}: {err}");
        assert!(err.to_string().contains(why), "{name:?}: {err}");
        assert!(!topics.is_valid_name(name));
    }
    for name in ["a", "room:7", "u/ann@x", "k=v+w#1", "A-Z_0.9"] {
        assert!(topics.is_valid_name(name), "{name}");
        assert!(topics.subscribe(name).is_ok(), "{name}");
    }
    // Through a real session: the client is told why.
    let server = TestServer::start(rooms(topics.clone())).await;
    let mut client = server.connect("/room?topic=no%20spaces").await;
    let text = client.recv_text().await;
    assert!(text.starts_with("refused: bad topic name"), "{text}");
    server.shutdown().await;
}

#[tokio::test]
async fn the_number_of_topics_is_bounded_and_freed_places_are_reused() {
    let topics = Topics::new(TopicsConfig::default().max_topics(3)).unwrap();
    let a = topics.subscribe("a").unwrap();
    let _b = topics.subscribe("b").unwrap();
    let _c = topics.subscribe("c").unwrap();
    // A fourth subscriber of an existing topic is fine; a fourth topic is not.
    let _a2 = topics.subscribe("a").unwrap();
    let err = topics.subscribe("d").unwrap_err();
    assert!(matches!(err, TopicError::TooMany(_)), "{err}");
    assert!(err.to_string().contains("3 topics exist"), "{err}");
    // "a" has two subscribers: dropping one keeps it.
    drop(a);
    assert!(topics.subscribe("d").is_err());
    drop(_a2);
    let _d = topics.subscribe("d").unwrap();
    assert_eq!(topics.len(), 3);
}

#[tokio::test]
async fn each_topic_takes_its_options_from_its_name() {
    let topics = Topics::new(
        TopicsConfig::default()
            .hub_config(HubConfig::default().capacity(64))
            .config_for(|name| {
                if name.starts_with("ticker:") {
                    Some(HubConfig::default().capacity(4).policy(Policy::DropOldest))
                } else if name == "broken" {
                    Some(HubConfig::default().capacity(0))
                } else {
                    None
                }
            }),
    )
    .unwrap();
    let ticker = topics.hub("ticker:EURUSD").unwrap();
    assert_eq!(
        (ticker.capacity(), ticker.policy()),
        (4, Policy::DropOldest)
    );
    let chat = topics.hub("chat").unwrap();
    assert_eq!((chat.capacity(), chat.policy()), (64, Policy::Suspend));
    let err = topics.hub("broken").unwrap_err();
    assert!(matches!(err, TopicError::Config(_)), "{err}");
    assert!(
        err.to_string().contains("capacity must be at least 1"),
        "{err}"
    );
    // The same topic is the same hub, as long as it lives.
    assert!(topics.hub("chat").unwrap().same_hub(&chat));
    assert!(
        Topics::new(TopicsConfig::default().hub_config(HubConfig::default().capacity(0))).is_err()
    );
    assert!(Topics::new(TopicsConfig::default().max_topics(0)).is_err());
}

#[tokio::test]
async fn a_thousand_topics_of_ten_subscribers_are_all_freed_when_they_leave() {
    let topics =
        Topics::new(TopicsConfig::default().hub_config(HubConfig::default().capacity(8))).unwrap();
    let mut subscriptions = Vec::new();
    for t in 0..1_000 {
        for _ in 0..10 {
            subscriptions.push(topics.subscribe(&format!("t{t}")).unwrap());
        }
    }
    assert_eq!(topics.len(), 1_000);
    let one = topics.get("t500").unwrap();
    assert_eq!(one.subscriber_count(), 10);
    let _ = one.publish(Message::text("x")).await.unwrap();
    drop(one);
    // Every one of t500's subscribers has it; the others nothing.
    let mut got = 0;
    for sub in &mut subscriptions {
        if sub.try_recv().is_ok() {
            got += 1;
        }
    }
    assert_eq!(got, 10);
    drop(subscriptions);
    assert_eq!(topics.len(), 0);
    assert!(topics.is_empty());
}

#[tokio::test]
async fn topics_are_exported_by_name_within_the_metrics_bound() {
    let metrics = wshub::Metrics::builder().max_hubs(2).build().unwrap();
    let topics = Topics::new(TopicsConfig::default().metrics(Some(metrics.clone()))).unwrap();
    let a = topics.subscribe("room:a").unwrap();
    let _b = topics.subscribe("room:b").unwrap();
    // A third topic works, but the labels are at their bound.
    let mut c = topics.subscribe("room:c").unwrap();
    let _ = topics
        .publish("room:c", Message::text("still works"))
        .await
        .unwrap();
    assert_eq!(c.recv().await.unwrap(), Message::text("still works"));
    let text = metrics.encode();
    assert!(
        text.contains("wshub_hub_subscribers{hub=\"room:a\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("wshub_hub_subscribers{hub=\"room:b\"} 1"),
        "{text}"
    );
    assert!(!text.contains("hub=\"room:c\""), "{text}");
    assert!(
        text.contains("wshub_metrics_unlabelled_hubs_total 1"),
        "{text}"
    );
    // A freed topic frees its label; the same name comes back as a new hub.
    drop(a);
    let _d = topics.subscribe("room:d").unwrap();
    let _a = topics.subscribe("room:a").unwrap();
    let text = metrics.encode();
    assert!(
        text.contains("wshub_hub_subscribers{hub=\"room:d\"} 1"),
        "{text}"
    );
    assert!(!text.contains("hub=\"room:a\""), "{text}");
    assert!(
        text.contains("wshub_metrics_unlabelled_hubs_total 2"),
        "{text}"
    );
}

/// One session forwards several topics and drops one while it runs; each
/// topic counts its own deliveries.
#[tokio::test]
async fn a_session_forwards_many_topics_and_stops_one_on_request() {
    let topics = Topics::default();
    let server = TestServer::start(Server::new().route("/multi", {
        let topics = topics.clone();
        move |mut session| {
            let topics = topics.clone();
            async move {
                let out = session.outgoing();
                let mut forwarded = std::collections::HashMap::new();
                // The client names a topic to start it, or "-name" to stop it.
                while let Some(msg) = session.recv().await {
                    let Ok(text) = msg.into_text() else { continue };
                    let reply = match text.strip_prefix('-') {
                        Some(name) => match forwarded.remove(name) {
                            Some(id) => out.unforward(id).await.map(|()| format!("stopped {name}")),
                            None => Ok(format!("not forwarding {name}")),
                        },
                        None => {
                            let sub = topics.subscribe(&text).unwrap();
                            out.forward(sub).await.map(|id| {
                                forwarded.insert(text.to_string(), id);
                                format!("started {text}")
                            })
                        }
                    };
                    let Ok(reply) = reply else { break };
                    if out.send(reply).await.is_err() {
                        break;
                    }
                }
            }
        }
    }))
    .await;
    let mut client = server.connect("/multi").await;
    for name in ["news", "sport", "weather"] {
        client.send(name).await;
        client.expect_text(&format!("started {name}")).await;
    }
    for name in ["news", "sport", "weather"] {
        let _ = topics
            .publish(name, Message::text(format!("{name} 1")))
            .await;
    }
    let mut got: Vec<String> = Vec::new();
    for _ in 0..3 {
        got.push(client.recv_text().await);
    }
    got.sort();
    assert_eq!(got, ["news 1", "sport 1", "weather 1"]);

    client.send("-sport").await;
    client.expect_text("stopped sport").await;
    // The reply is written after the subscription is gone: sport is freed
    // (no other subscriber) and what it gets now reaches nobody.
    wait_for(
        "sport to go",
        || topics.get("sport").is_none(),
        |gone| *gone,
    )
    .await;
    for name in ["sport", "news"] {
        let _ = topics
            .publish(name, Message::text(format!("{name} 2")))
            .await;
    }
    client.expect_text("news 2").await;
    let (news, weather) = (topics.get("news").unwrap(), topics.get("weather").unwrap());
    client.close(None).await;
    wait_for(
        "news to lose its subscriber",
        || news.stats(),
        |s| s.subscribers == 0,
    )
    .await;
    assert_eq!(news.stats().delivered, 2);
    wait_for(
        "weather to lose its subscriber",
        || weather.stats(),
        |s| s.subscribers == 0,
    )
    .await;
    assert_eq!(weather.stats().delivered, 1);
    server.shutdown().await;
}
