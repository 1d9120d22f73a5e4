//! Prometheus metrics: scraped over HTTP from a running server and read
//! with a Prometheus text-format parser, after real clients did what each
//! count counts.

mod common;

use std::time::Duration;

use common::{GREETING, WAIT, sharedflow, upgrade_raw, wait_for, within};
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{MetricsExposition, PrometheusType, PrometheusValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wshub::testing::TestServer;
use wshub::{CloseCode, Hub, HubConfig, Message, Metrics, Policy, close_reason};

/// An HTTP answer: status, head, body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Sends one request to `addr` and reads the answer to the end (the server
/// closes the connection after it).
async fn http(addr: std::net::SocketAddr, request: &str) -> Answer {
    let mut tcp = within("a connection", TcpStream::connect(addr))
        .await
        .expect("connect");
    within("the request", tcp.write_all(request.as_bytes()))
        .await
        .expect("write the request");
    let mut raw = Vec::new();
    within("the answer", tcp.read_to_end(&mut raw))
        .await
        .expect("read the answer");
    let text = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head[9..12].parse().expect("a status code");
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

async fn scrape_text(addr: std::net::SocketAddr) -> String {
    let answer = http(addr, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").await;
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert!(
        answer
            .head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        answer.head
    );
    answer.body
}

type Scrape = MetricsExposition<PrometheusType, PrometheusValue>;

/// Parses a scrape with a Prometheus text-format parser; fails on anything
/// it does not accept.
fn parse(text: &str) -> Scrape {
    parse_prometheus(text).unwrap_or_else(|err| panic!("not a valid scrape: {err:?}\n{text}"))
}

async fn scrape(addr: std::net::SocketAddr) -> Scrape {
    parse(&scrape_text(addr).await)
}

/// The sample of family `name` with these labels.
fn sample<'a>(
    scrape: &'a Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a PrometheusValue> {
    let family = scrape.families.get(name)?;
    family
        .iter_samples()
        .find(|s| {
            let set = s.get_labelset().expect("a sample of a family");
            labels
                .iter()
                .all(|(k, v)| set.get_label_value(k) == Some(*v))
        })
        .map(|s| &s.value)
}

/// The value of a counter or gauge.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    sample(scrape, name, labels).map(|v| match v {
        PrometheusValue::Counter(c) => c.value.as_f64(),
        PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n.as_f64(),
        other => panic!("{name} is not a single value: {other:?}"),
    })
}

fn get(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(scrape, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?}"))
}

/// A hub's histogram: its cumulative buckets (bound, count), sum and count.
fn histogram(scrape: &Scrape, name: &str, hub: &str) -> (Vec<(f64, f64)>, f64, f64) {
    match sample(scrape, name, &[("hub", hub)]) {
        Some(PrometheusValue::Histogram(h)) => (
            h.buckets
                .iter()
                .map(|b| (b.upper_bound, b.count.as_f64()))
                .collect(),
            h.sum.as_ref().map_or(f64::NAN, |s| s.as_f64()),
            h.count.map_or(f64::NAN, |c| c as f64),
        ),
        other => panic!("no histogram {name} for {hub}: {other:?}"),
    }
}

/// Ktor's SharedFlow route with metrics at /metrics and the hub as "chat".
async fn start(hub: &Hub) -> (TestServer, Metrics) {
    let metrics = Metrics::new();
    metrics.register_hub("chat", hub).unwrap();
    let server =
        TestServer::start(sharedflow(hub.clone()).metrics("/metrics", metrics.clone())).await;
    (server, metrics)
}

#[tokio::test]
async fn a_scrape_counts_what_clients_did() {
    let hub = Hub::new();
    let (server, _metrics) = start(&hub).await;
    let addr = server.addr();

    let mut ann = server.connect("/ws").await;
    let mut bob = server.connect("/ws").await;
    ann.expect_text(GREETING).await;
    bob.expect_text(GREETING).await;
    for i in 0..10 {
        ann.send(format!("m{i}")).await;
    }
    for client in [&mut ann, &mut bob] {
        for i in 0..10 {
            client.expect_text(&format!("m{i}")).await;
        }
    }
    // Two refusals, by status.
    assert_eq!(
        http(addr, "GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .status,
        404
    );
    let v8 = "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n";
    assert_eq!(http(addr, v8).await.status, 426);

    let live = scrape(addr).await;
    assert_eq!(get(&live, "wshub_sessions_open", &[]), 2.0);
    assert_eq!(get(&live, "wshub_hub_subscribers", &[("hub", "chat")]), 2.0);
    assert_eq!(
        get(&live, "wshub_hub_published_total", &[("hub", "chat")]),
        10.0
    );
    assert_eq!(get(&live, "wshub_upgrades_accepted_total", &[]), 2.0);
    let refused =
        |s: &Scrape, status| get(s, "wshub_upgrades_refused_total", &[("status", status)]);
    assert_eq!(refused(&live, "404"), 1.0);
    assert_eq!(refused(&live, "426"), 1.0);
    // This scrape's own connection is in its HTTP phase while it is encoded.
    assert_eq!(get(&live, "wshub_handshakes_in_flight", &[]), 1.0);

    // Ann leaves with 1000; Bob's session is closed by the server (1001, shutdown).
    ann.close(Some(close_reason(CloseCode::Normal, "bye")))
        .await;
    wait_for(
        "ann's session to end",
        || hub.subscriber_count(),
        |n| *n == 1,
    )
    .await;
    let after = wait_for_scrape(addr, |s| value(s, "wshub_sessions_open", &[]) == Some(1.0)).await;
    assert_eq!(
        get(
            &after,
            "wshub_sessions_closed_total",
            &[("code", "1000"), ("direction", "received")]
        ),
        1.0
    );
    // Ann's deliveries are all in: her subscription added its count and
    // her send task its latencies when they ended.
    let delivered = get(&after, "wshub_hub_delivered_total", &[("hub", "chat")]);
    assert!(delivered >= 10.0, "{delivered}");
    let (buckets, sum, count) = histogram(&after, "wshub_delivery_latency_seconds", "chat");
    assert!(count >= 10.0, "ann's ten messages were timed: {count}");
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count));
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    assert_eq!(buckets.len(), Metrics::DEFAULT_LATENCY_BUCKETS.len() + 1);
    assert!(sum > 0.0 && sum < count * WAIT.as_secs_f64(), "{sum}");
    // Bytes: at least Ann's frames (a live session adds its bytes every
    // second or so, an ended one when it ends).
    let received = get(&after, "wshub_received_bytes_total", &[]);
    assert!(
        received >= 10.0 * 8.0,
        "ten masked 2-byte frames: {received}"
    );
    let sent = get(&after, "wshub_sent_bytes_total", &[]);
    let ann_got = 10.0 * 4.0 + (GREETING.len() + 2) as f64;
    assert!(sent >= ann_got, "{sent} < {ann_got}");

    server.shutdown().await;
    assert_eq!(
        bob.expect_close().await.map(|r| r.code),
        Some(CloseCode::Away)
    );
}

/// Scrapes until `done` holds, for at most [`WAIT`].
async fn wait_for_scrape(addr: std::net::SocketAddr, done: impl Fn(&Scrape) -> bool) -> Scrape {
    within("a scrape showing the expected values", async {
        loop {
            let s = scrape(addr).await;
            if done(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn sessions_closed_by_the_server_and_lost_connections_are_told_apart() {
    let hub = Hub::new();
    let (server, metrics) = start(&hub).await;
    let addr = server.addr();
    // A client that vanishes: its TCP connection is dropped without a Close frame.
    let raw = upgrade_raw(addr, "/ws", None).await;
    // A client the server closes: at shutdown, with 1001.
    let mut client = server.connect("/ws").await;
    client.expect_text(GREETING).await;
    wait_for("two sessions", || hub.subscriber_count(), |n| *n == 2).await;
    drop(raw);
    let s = wait_for_scrape(addr, |s| value(s, "wshub_sessions_open", &[]) == Some(1.0)).await;
    assert_eq!(
        get(
            &s,
            "wshub_sessions_closed_total",
            &[("code", "1006"), ("direction", "none")]
        ),
        1.0
    );
    server.shutdown().await;
    assert_eq!(
        client.expect_close().await.map(|r| r.code),
        Some(CloseCode::Away)
    );
    let text = metrics.encode();
    let s = parse(&text);
    assert_eq!(
        get(
            &s,
            "wshub_sessions_closed_total",
            &[("code", "1001"), ("direction", "sent")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(get(&s, "wshub_sessions_open", &[]), 0.0);
}

#[tokio::test]
async fn a_live_session_adds_its_latencies_within_about_a_second() {
    let hub = Hub::new();
    let (server, _metrics) = start(&hub).await;
    let addr = server.addr();
    let mut client = server.connect("/ws").await;
    client.expect_text(GREETING).await;
    wait_for("a subscriber", || hub.subscriber_count(), |n| *n == 1).await;
    // A message now and then: fewer than a batch, so only time merges them.
    let mut sent = 0u32;
    let shown = within("a scrape timing a live session's messages", async {
        loop {
            let _ = hub
                .publish(Message::text(format!("t{sent}")))
                .await
                .unwrap();
            client.expect_text(&format!("t{sent}")).await;
            sent += 1;
            let s = scrape(addr).await;
            let (_, _, count) = histogram(&s, "wshub_delivery_latency_seconds", "chat");
            if count > 0.0 {
                return (count, sent);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(shown.0 <= f64::from(shown.1), "{shown:?}");
    assert!(
        shown.1 < Metrics::SYNC_EVERY,
        "merged by time, not by count"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn hub_labels_are_bounded_escaped_and_freed() {
    let metrics = Metrics::builder().max_hubs(2).build().unwrap();
    let odd = Hub::new();
    let name = "room \"7\"\\ \n é";
    metrics.register_hub(name, &odd).unwrap();
    let second = Hub::new();
    metrics.register_hub("second", &second).unwrap();
    let third = Hub::new();
    let err = metrics.register_hub("third", &third).unwrap_err();
    assert!(err.to_string().contains("2 hubs are registered"), "{err}");
    // Each name once, each hub once, names of bounded length.
    let err = metrics.register_hub("second", &third).unwrap_err();
    assert!(err.to_string().contains("already registered"), "{err}");
    let long = "x".repeat(Metrics::MAX_HUB_NAME + 1);
    assert!(metrics.register_hub(&long, &third).is_err());
    assert!(metrics.register_hub("", &third).is_err());
    let other = Metrics::new();
    assert!(other.register_hub("elsewhere", &second).is_err());

    let s = parse(&metrics.encode());
    assert_eq!(get(&s, "wshub_hub_subscribers", &[("hub", name)]), 0.0);
    // A dropped hub leaves the scrape and frees its place.
    drop(second);
    metrics.register_hub("third", &third).unwrap();
    let s = parse(&metrics.encode());
    assert!(value(&s, "wshub_hub_subscribers", &[("hub", "second")]).is_none());
    assert!(value(&s, "wshub_hub_subscribers", &[("hub", "third")]).is_some());
}

#[tokio::test]
async fn the_counts_of_a_hub_match_its_stats_under_a_dropping_policy() {
    let hub =
        Hub::with_config(HubConfig::default().capacity(4).policy(Policy::DropLatest)).unwrap();
    let metrics = Metrics::new();
    metrics.register_hub("ticks", &hub).unwrap();
    let _nobody = hub.publish(Message::text("to no one")).await.unwrap();
    let sub = hub.subscribe();
    for i in 0..10 {
        let _ = hub.publish(Message::text(format!("{i}"))).await.unwrap();
    }
    let stats = hub.stats();
    let s = parse(&metrics.encode());
    let hub_value = |name| get(&s, name, &[("hub", "ticks")]);
    assert_eq!(
        hub_value("wshub_hub_published_total"),
        stats.published as f64
    );
    assert_eq!(hub_value("wshub_hub_dropped_total"), 6.0);
    assert_eq!(hub_value("wshub_hub_no_subscriber_publishes_total"), 1.0);
    assert_eq!(hub_value("wshub_hub_buffered_messages"), 4.0);
    assert_eq!(hub_value("wshub_hub_subscribers"), 1.0);
    drop(sub);
    let s = parse(&metrics.encode());
    assert_eq!(get(&s, "wshub_hub_unread_total", &[("hub", "ticks")]), 4.0);
}

#[test]
fn latency_buckets_are_checked() {
    for (buckets, why) in [
        (vec![], "1 to 64 allowed"),
        (vec![0.1, 0.1], "must increase"),
        (vec![0.5, 0.1], "must increase"),
        (vec![-1.0], "positive"),
        (vec![f64::NAN], "positive"),
        (vec![0.001; 65], "1 to 64 allowed"),
    ] {
        let err = Metrics::builder()
            .latency_buckets(buckets.clone())
            .build()
            .unwrap_err();
        assert!(err.to_string().contains(why), "{buckets:?}: {err}");
    }
    let metrics = Metrics::builder()
        .latency_buckets([0.001, 0.01, 0.1])
        .build()
        .unwrap();
    let hub = Hub::new();
    metrics.register_hub("h", &hub).unwrap();
    let text = metrics.encode();
    for le in ["0.001", "0.01", "0.1", "+Inf"] {
        assert!(
            text.contains(&format!(
                "wshub_delivery_latency_seconds_bucket{{hub=\"h\",le=\"{le}\"}} 0"
            )),
            "{le}: {text}"
        );
    }
}

#[tokio::test]
async fn the_metrics_path_answers_get_and_head_only() {
    let hub = Hub::new();
    let (server, _metrics) = start(&hub).await;
    let head = http(server.addr(), "HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let post = http(
        server.addr(),
        "POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(post.status, 405);
    assert!(
        post.head.to_ascii_lowercase().contains("allow: get, head"),
        "{}",
        post.head
    );
    let s = scrape(server.addr()).await;
    assert_eq!(
        get(&s, "wshub_upgrades_refused_total", &[("status", "405")]),
        1.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_holds_messages_back_shows_in_the_latency() {
    let hub = Hub::new();
    let (server, metrics) = start(&hub).await;
    // A client with a tiny receive buffer that reads nothing for a while.
    let mut tcp = upgrade_raw(server.addr(), "/ws", Some(4096)).await;
    wait_for("a subscriber", || hub.subscriber_count(), |n| *n == 1).await;
    const SIZE: usize = 256 << 10;
    const COUNT: usize = 8;
    for i in 0..COUNT {
        let payload = vec![b'a' + i as u8; SIZE];
        let _ = hub.publish(Message::binary(payload)).await.unwrap();
    }
    let held = Duration::from_millis(700);
    tokio::time::sleep(held).await;
    // Now read it all: the greeting, then every message (64-bit length headers).
    let expected = 2 + GREETING.len() + COUNT * (10 + SIZE);
    let mut got = 0;
    let mut buf = vec![0u8; 64 << 10];
    within("every byte", async {
        while got < expected {
            let n = tcp.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed after {got} of {expected} bytes");
            got += n;
        }
    })
    .await;
    drop(tcp);
    wait_for("the session to end", || hub.subscriber_count(), |n| *n == 0).await;
    let s = wait_for_scrape(server.addr(), |s| {
        value(s, "wshub_sessions_open", &[]) == Some(0.0)
    })
    .await;
    let (buckets, sum, count) = histogram(&s, "wshub_delivery_latency_seconds", "chat");
    assert_eq!(count, COUNT as f64, "{buckets:?}");
    let within_half_second = buckets
        .iter()
        .find(|(le, _)| *le == 0.5)
        .map(|(_, n)| *n)
        .unwrap();
    assert!(
        within_half_second < count,
        "messages the client held back for {held:?} were timed before the socket took them: {buckets:?}"
    );
    assert!(sum >= 0.5, "{sum}");
    drop(metrics);
    server.shutdown().await;
}

#[tokio::test]
async fn a_quiet_session_hands_in_its_latencies_at_its_next_ping() {
    let hub = Hub::new();
    let metrics = Metrics::new();
    metrics.register_hub("chat", &hub).unwrap();
    let config = wshub::Config::default().ping_period(Some(Duration::from_millis(100)));
    let server = TestServer::start(
        sharedflow(hub.clone())
            .config(config)
            .metrics("/metrics", metrics.clone()),
    )
    .await;
    let mut client = server.connect("/ws").await;
    client.expect_text(GREETING).await;
    wait_for("a subscriber", || hub.subscriber_count(), |n| *n == 1).await;
    // Three messages at once, then nothing: fewer than a batch of counts,
    // and no later write to hand them in with.
    for i in 0..3 {
        let _ = hub.publish(Message::text(format!("q{i}"))).await.unwrap();
    }
    for i in 0..3 {
        client.expect_text(&format!("q{i}")).await;
    }
    // The client keeps reading (and answering pings) while the test scrapes.
    let reader = tokio::spawn(async move { while client.next_frame().await.is_some() {} });
    let s = wait_for_scrape(server.addr(), |s| {
        histogram(s, "wshub_delivery_latency_seconds", "chat").2 == 3.0
    })
    .await;
    assert!(get(&s, "wshub_sent_bytes_total", &[]) > 0.0);
    reader.abort();
    server.shutdown().await;
}
