//! The hub alone, without sockets: one publish delivered to N subscribers.
//!
//! ```text
//! cargo bench --bench hub
//! cargo bench --bench hub -- "hub/1 -> 1000"
//! ```
//!
//! Each iteration publishes one 64-byte text message and has every subscriber
//! take it. `wshub` shares one Bytes-backed payload; the `broadcast-string`
//! baseline is the axum chat pattern (`tokio::sync::broadcast<String>`, each
//! subscriber turning the string into its own frame). Throughput is in
//! deliveries, so the two lines compare directly.
//!
//! The `topic` group publishes the same through a [`PubSub`] topic (the
//! embedded broker numbers it, keeps it in the history and encodes the
//! protocol's `message` push once) against a plain hub's `publish`, both
//! awaited on one current-thread runtime.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use wshub::{Data, Hub, HubConfig, Message, Policy, PubSub, PubSubConfig, Published, TopicConfig};

const PAYLOAD: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("hub");
    for subscribers in [1usize, 10, 100, 1000] {
        group.throughput(Throughput::Elements(subscribers as u64));

        let hub = Hub::with_config(HubConfig::default().capacity(16).policy(Policy::DropOldest))
            .expect("capacity is not zero");
        let mut subs: Vec<_> = (0..subscribers).map(|_| hub.subscribe()).collect();
        let msg = Message::text(PAYLOAD);
        group.bench_function(
            BenchmarkId::new("wshub", format!("1 -> {subscribers}")),
            |b| {
                b.iter(|| {
                    assert_eq!(hub.try_publish(msg.clone()), Ok(Published::Queued));
                    for sub in &mut subs {
                        black_box(sub.try_recv().expect("one message per publish"));
                    }
                })
            },
        );

        let (tx, _keep) = tokio::sync::broadcast::channel::<String>(16);
        let mut rxs: Vec<_> = (0..subscribers).map(|_| tx.subscribe()).collect();
        group.bench_function(
            BenchmarkId::new("broadcast-string", format!("1 -> {subscribers}")),
            |b| {
                b.iter(|| {
                    tx.send(PAYLOAD.to_owned()).expect("receivers exist");
                    for rx in &mut rxs {
                        let text = rx.try_recv().expect("one message per send");
                        // The axum pattern builds one frame per subscriber from the string.
                        black_box(Message::text(text));
                    }
                })
            },
        );
    }
    group.finish();
}

fn topic(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let hub_config = HubConfig::default().capacity(16).policy(Policy::DropOldest);
    let mut group = c.benchmark_group("topic");
    for subscribers in [1usize, 100, 1000] {
        group.throughput(Throughput::Elements(subscribers as u64));

        let hub = Hub::with_config(hub_config.clone()).expect("capacity is not zero");
        let mut subs: Vec<_> = (0..subscribers).map(|_| hub.subscribe()).collect();
        let msg = Message::text(PAYLOAD);
        group.bench_function(
            BenchmarkId::new("hub-publish", format!("1 -> {subscribers}")),
            |b| {
                b.iter(|| {
                    let published = rt.block_on(hub.publish(msg.clone()));
                    assert_eq!(published, Ok(Published::Queued));
                    for sub in &mut subs {
                        black_box(sub.try_recv().expect("one message per publish"));
                    }
                })
            },
        );

        let pubsub = PubSub::new(
            PubSubConfig::default().topic(TopicConfig::default().hub(hub_config.clone())),
        )
        .expect("a valid configuration");
        // A subscription through the node puts the topic's hub in place
        // (the handle below keeps it); the subscribers read that hub as the
        // sessions' send tasks do.
        let first = rt
            .block_on(pubsub.subscribe("bench", None))
            .expect("a valid topic");
        let local = pubsub.topics().get("bench").expect("the topic exists");
        drop(first);
        let mut subs: Vec<_> = (0..subscribers).map(|_| local.subscribe()).collect();
        let data = Data::json(PAYLOAD).expect("a string is JSON");
        group.bench_function(
            BenchmarkId::new("pubsub-publish", format!("1 -> {subscribers}")),
            |b| {
                b.iter(|| {
                    let at = rt.block_on(pubsub.publish("bench", data.clone()));
                    black_box(at.expect("the topic takes it"));
                    for sub in &mut subs {
                        black_box(sub.try_recv().expect("one message per publish"));
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, fan_out, topic);
criterion_main!(benches);
