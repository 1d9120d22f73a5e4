//! The pub/sub scenarios (`topics-1k`, `resume-storm`, `pubsub-smoke`):
//! clients that speak wshub's pub/sub protocol (docs/PROTOCOL.md) to the
//! `wshub-pubsub` server.
//!
//! - **Topics.** C subscriber connections, connection `c` subscribed to the
//!   topics `t{(c·K + k) mod T}` for k in 0..K, and P publisher connections
//!   (subscribed to nothing) that publish on every topic R times a second on
//!   a fixed schedule. The server's RSS is read after every connection has
//!   its first subscription (chosen so that together they create every
//!   topic) and again after all K: the difference over (K − 1)·C is the
//!   cost of one more subscription to an existing topic.
//! - **Resume.** C connections subscribed to one topic receive a few live
//!   messages, drop their connections at once (no close handshake), M
//!   messages are published, then all C reconnect at once and subscribe
//!   with `since` = the last position each saw. Timed from the first
//!   reconnect until every client has the M messages.
//!
//! Every published `data` is a JSON object with the publisher, its own
//! sequence number and the scheduled send time (`{"p":..,"s":..,"t":..,"x":
//! "xx.."}`, padded to the payload size), so latency is measured as in the
//! other scenarios. Exactness is checked on the protocol's own per-topic
//! `seq`: every subscriber must see each seq of each of its topics once, in
//! order, and nothing else (no `gap` push, no other epoch).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::client::{self, Counters, Sink, Source, Ws};
use crate::{Latency, RunResult, Scenario, ServerStats, Target, Variant};

/// How long a phase may wait for replies or deliveries.
const PHASE_LIMIT: Duration = Duration::from_secs(30);
/// Pause before reading the server's RSS, so that what a phase just did
/// (a subscription handed to its session) has settled.
const SETTLE: Duration = Duration::from_millis(200);

/// What only the pub/sub scenarios measure (`null` in the others).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PubSubFigures {
    /// Topics the scenario uses.
    pub topics: usize,
    /// Subscribe commands that succeeded (the resume's re-subscriptions
    /// not included).
    pub subscriptions: u64,
    /// Subscribe commands refused.
    pub subscribe_errors: u64,
    /// Publish commands refused.
    pub publish_errors: u64,
    /// The first refusal's error object.
    pub first_error: Option<String>,
    /// `gap` pushes received (each is a loss the server admits to).
    pub gap_pushes: u64,
    /// Messages a subscriber never received by the end: for each
    /// subscription, the topic's last published seq minus the last seq it
    /// saw.
    pub missing: u64,
    /// Messages whose epoch was not the one the subscribe reply gave.
    pub wrong_epoch: u64,
    /// Topics: RSS once every connection has one subscription (every topic
    /// exists).
    pub rss_one_sub_kib: Option<u64>,
    /// Topics: RSS once every connection has all its subscriptions.
    pub rss_all_subs_kib: Option<u64>,
    /// Topics: (RSS with all − RSS with one) / ((K − 1) × connections).
    pub bytes_per_extra_subscription: Option<f64>,
    /// Topics: (RSS with one − RSS connected) / topics: a topic with its
    /// first subscriber.
    pub kib_per_topic: Option<f64>,
    /// (RSS with every subscription − RSS before connecting) / connections.
    pub kib_per_connection_subscribed: Option<f64>,
    /// Seconds from the first to the last subscribe reply of each phase
    /// (topics: the one, then the rest).
    pub subscribe_secs: Vec<f64>,
    /// Topics: server CPU µs per subscription while the K − 1 extra ones
    /// were made.
    pub cpu_us_per_subscription: Option<f64>,
    /// Resume: messages published while the clients were away.
    pub missed_messages: u64,
    /// Resume: seconds from dropping the connections until the server had
    /// seen them all go.
    pub disconnect_secs: Option<f64>,
    /// Resume: reconnects that failed (handshake, subscribe or connection).
    pub reconnect_errors: u64,
    /// Resume: first reconnect failure.
    pub first_reconnect_error: Option<String>,
    /// Resume: clients that received every missed message.
    pub caught_up: u64,
    /// Resume: re-subscriptions whose reply said `"recovered": false`.
    pub not_recovered: u64,
    /// Resume: re-subscriptions whose reply named another epoch.
    pub epoch_changed: u64,
    /// Resume: deliveries during the storm (of missed messages, duplicates
    /// included).
    pub storm_delivered: u64,
    /// Resume: ms from the start of reconnecting until every client had
    /// every missed message (`None` if some never did).
    pub catch_up_ms: Option<f64>,
    /// Resume: median and p99 over clients of the same, per client.
    pub catch_up_p50_ms: Option<f64>,
    /// See `catch_up_p50_ms`.
    pub catch_up_p99_ms: Option<f64>,
    /// Resume: ms until every reconnect's handshake was done.
    pub handshakes_ms: Option<f64>,
    /// Resume: server CPU (user + system) during the storm, ms.
    pub storm_cpu_ms: Option<f64>,
    /// Resume: its user-space part, ms.
    pub storm_user_ms: Option<f64>,
    /// Resume: server RSS once every client caught up.
    pub rss_after_storm_kib: Option<u64>,
}

/// The stamp each published `data` carries, padded with `x` to `size`
/// bytes: publisher, its sequence number, scheduled send time (ns).
fn stamp(publisher: usize, seq: u64, sent_ns: u64, size: usize) -> String {
    let mut text = format!(r#"{{"p":{publisher},"s":{seq},"t":{sent_ns},"x":""#);
    let pad = size.saturating_sub(text.len() + 2);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    text
}

fn topic_name(i: usize) -> String {
    format!("t{i}")
}

fn topic_index(name: &str) -> Option<usize> {
    name.strip_prefix('t')?.parse().ok()
}

fn subscribe_command(topic: usize, since: Option<(&str, u64)>) -> Message {
    // The subscribe's id is its topic's index: the reply names no topic.
    let name = topic_name(topic);
    Message::text(match since {
        None => format!(r#"{{"id":{topic},"op":"subscribe","topic":"{name}"}}"#),
        Some((epoch, seq)) => format!(
            r#"{{"id":{topic},"op":"subscribe","topic":"{name}","since":{{"epoch":{},"seq":{seq}}}}}"#,
            serde_json::to_string(epoch).unwrap_or_default()
        ),
    })
}

/// The topics connection `c` subscribes to, in the order it subscribes:
/// `(c·K + k) mod T` for k in 0..K, starting at `k0 = ⌊c·K/T⌋ mod K`. With
/// C = T connections (and K dividing T) the first subscriptions of all
/// connections hit every topic exactly once.
pub fn topics_of(c: usize, topics: usize, per_client: usize) -> Vec<usize> {
    let k0 = (c * per_client / topics.max(1)) % per_client.max(1);
    (0..per_client)
        .map(|j| (c * per_client + (k0 + j) % per_client) % topics.max(1))
        .collect()
}

/// A server push or reply, as far as the benchmark reads it.
#[derive(Deserialize)]
struct Incoming<'a> {
    id: Option<u64>,
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    ok: Option<bool>,
    #[serde(borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow)]
    epoch: Option<Cow<'a, str>>,
    seq: Option<u64>,
    recovered: Option<bool>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
    data: Option<Stamp>,
}

#[derive(Deserialize)]
struct Stamp {
    t: u64,
}

/// What the connections of one phase share with the orchestrator.
struct Shared {
    counters: Counters,
    /// Per topic: subscribe replies that said ok.
    subscribers: Vec<AtomicU64>,
    /// Per topic: the highest seq a publish reply gave.
    last_seq: Vec<AtomicU64>,
    /// Deliveries owed: for each successful publish, its topic's
    /// subscribers.
    expected: AtomicU64,
    subscribed: AtomicU64,
    subscribe_errors: AtomicU64,
    published: AtomicU64,
    publish_errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    gap_pushes: AtomicU64,
    wrong_epoch: AtomicU64,
    not_recovered: AtomicU64,
    epoch_changed: AtomicU64,
    /// Resume: clients caught up, and clients that gave up.
    caught_up: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

impl Shared {
    fn new(topics: usize) -> Arc<Shared> {
        Arc::new(Shared {
            counters: Counters::new(),
            subscribers: (0..topics).map(|_| AtomicU64::new(0)).collect(),
            last_seq: (0..topics).map(|_| AtomicU64::new(0)).collect(),
            expected: AtomicU64::new(0),
            subscribed: AtomicU64::new(0),
            subscribe_errors: AtomicU64::new(0),
            published: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            gap_pushes: AtomicU64::new(0),
            wrong_epoch: AtomicU64::new(0),
            not_recovered: AtomicU64::new(0),
            epoch_changed: AtomicU64::new(0),
            caught_up: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_failure: Mutex::new(None),
        })
    }

    fn refused(&self, error: &str) {
        self.first_error
            .lock()
            .unwrap()
            .get_or_insert_with(|| error.to_string());
    }

    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.first_failure.lock().unwrap().get_or_insert(why);
    }

    fn replied(&self) -> u64 {
        self.subscribed.load(Ordering::Relaxed) + self.subscribe_errors.load(Ordering::Relaxed)
    }
}

/// One subscription as its connection sees it.
#[derive(Debug, Clone)]
struct Sub {
    topic: usize,
    epoch: Option<String>,
    /// The last seq seen (the subscribe reply's, for a fresh subscription).
    last: u64,
    subscribed: bool,
    /// Subscribed with `since`: the backlog starts after `last`.
    resume: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Subscriber,
    Publisher,
}

/// One connection's state.
struct Conn {
    role: Role,
    subs: Vec<Sub>,
    /// Resume: the seq at which this client has caught up, and when it did.
    until: Option<u64>,
    caught_up: Option<Instant>,
    /// Resume: when its handshake was done.
    connected_at: Option<Instant>,
    /// Whether this connection was already counted as caught up or failed.
    settled: bool,
    record_latency: bool,
    latencies: Vec<u64>,
}

impl Conn {
    fn subscriber(topics: Vec<usize>) -> Conn {
        Conn {
            role: Role::Subscriber,
            subs: topics
                .into_iter()
                .map(|topic| Sub {
                    topic,
                    epoch: None,
                    last: 0,
                    subscribed: false,
                    resume: false,
                })
                .collect(),
            until: None,
            caught_up: None,
            connected_at: None,
            settled: false,
            record_latency: true,
            latencies: Vec::new(),
        }
    }

    fn publisher() -> Conn {
        Conn {
            role: Role::Publisher,
            ..Conn::subscriber(Vec::new())
        }
    }

    fn flush(&mut self, shared: &Shared) {
        shared.counters.record_latencies(&mut self.latencies);
    }

    /// Handles one frame; false once the connection has ended.
    fn on_frame(
        &mut self,
        shared: &Shared,
        msg: Option<Result<Message, tungstenite::Error>>,
    ) -> bool {
        let ended = match msg {
            Some(Ok(Message::Text(text))) => {
                self.on_text(shared, text.as_str());
                return true;
            }
            Some(Ok(Message::Binary(_))) => {
                shared.counters.other.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Some(Ok(Message::Close(frame))) => {
                format!("close {}", frame.map_or(1005, |f| u16::from(f.code)))
            }
            Some(Ok(_)) => return true,
            Some(Err(err)) => format!("error: {err}"),
            None => "eof".to_string(),
        };
        shared.counters.record_closed(ended.clone());
        if self.until.is_some() && !self.settled {
            self.settled = true;
            shared.fail(format!("connection ended before catching up: {ended}"));
        }
        false
    }

    fn on_text(&mut self, shared: &Shared, text: &str) {
        let Ok(msg) = serde_json::from_str::<Incoming<'_>>(text) else {
            shared.counters.other.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match msg.op.as_deref() {
            Some("message") => self.on_message(shared, &msg),
            Some("gap") => {
                shared.gap_pushes.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {
                shared.counters.other.fetch_add(1, Ordering::Relaxed);
            }
            None => self.on_reply(shared, &msg),
        }
    }

    fn on_message(&mut self, shared: &Shared, msg: &Incoming<'_>) {
        let counters = &shared.counters;
        let topic = msg.topic.as_deref().and_then(topic_index);
        let sub = topic.and_then(|t| self.subs.iter_mut().find(|s| s.topic == t));
        let (Some(sub), Some(seq)) = (sub, msg.seq) else {
            counters.other.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !sub.subscribed {
            // A push ahead of its subscribe's reply breaks the protocol.
            counters.other.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if sub.epoch.as_deref() != msg.epoch.as_deref() {
            shared.wrong_epoch.fetch_add(1, Ordering::Relaxed);
        }
        counters.delivered.fetch_add(1, Ordering::Relaxed);
        if self.record_latency {
            if let Some(stamp) = &msg.data {
                self.latencies
                    .push(client::now_ns().saturating_sub(stamp.t) / 1000);
                if self.latencies.len() >= 256 {
                    counters.record_latencies(&mut self.latencies);
                }
            }
        }
        let expected = sub.last + 1;
        if seq > expected {
            counters.gaps.fetch_add(seq - expected, Ordering::Relaxed);
        } else if seq < expected {
            counters.reorders.fetch_add(1, Ordering::Relaxed);
            return;
        }
        sub.last = seq;
        if let Some(until) = self.until {
            if seq >= until && !self.settled {
                self.settled = true;
                self.caught_up = Some(Instant::now());
                shared.caught_up.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn on_reply(&mut self, shared: &Shared, msg: &Incoming<'_>) {
        let ok = msg.ok == Some(true);
        if self.role == Role::Publisher {
            if !ok {
                shared.publish_errors.fetch_add(1, Ordering::Relaxed);
                shared.refused(msg.error.map_or("?", |e| e.get()));
                return;
            }
            let topics = shared.last_seq.len() as u64;
            let (Some(id), Some(seq)) = (msg.id, msg.seq) else {
                shared.counters.other.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let topic = (id % topics.max(1)) as usize;
            shared.last_seq[topic].fetch_max(seq, Ordering::Relaxed);
            let owed = shared.subscribers[topic].load(Ordering::Relaxed);
            shared.expected.fetch_add(owed, Ordering::Relaxed);
            shared.published.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let sub = msg
            .id
            .and_then(|id| self.subs.iter_mut().find(|s| s.topic as u64 == id));
        let Some(sub) = sub else {
            shared.counters.other.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !ok {
            shared.subscribe_errors.fetch_add(1, Ordering::Relaxed);
            shared.refused(msg.error.map_or("?", |e| e.get()));
            if self.until.is_some() && !self.settled {
                self.settled = true;
                shared.fail(format!(
                    "resubscribe refused: {}",
                    msg.error.map_or("?", |e| e.get())
                ));
            }
            return;
        }
        if let (Some(old), Some(new)) = (&sub.epoch, msg.epoch.as_deref()) {
            if old != new {
                shared.epoch_changed.fetch_add(1, Ordering::Relaxed);
            }
        }
        sub.epoch = msg.epoch.as_deref().map(str::to_string);
        if !sub.resume {
            sub.last = msg.seq.unwrap_or(0);
        }
        sub.subscribed = true;
        if msg.recovered != Some(true) {
            shared.not_recovered.fetch_add(1, Ordering::Relaxed);
        }
        shared.subscribers[sub.topic].fetch_add(1, Ordering::Relaxed);
        shared.subscribed.fetch_add(1, Ordering::Relaxed);
        // Caught up already (nothing was missed).
        if let Some(until) = self.until {
            if sub.last >= until && !self.settled {
                self.settled = true;
                self.caught_up = Some(Instant::now());
                shared.caught_up.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Reads `source` into `conn` until `stop` or the connection ends.
async fn read(
    mut source: Source,
    mut conn: Conn,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> (Source, Conn) {
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            msg = source.next() => msg,
        };
        if !conn.on_frame(&shared, msg) {
            break;
        }
    }
    conn.flush(&shared);
    (source, conn)
}

/// Opens `n` connections to `url`, at most `concurrency` handshakes at a
/// time, from a fresh set of source addresses. Results in order.
async fn connect_many(
    addr: SocketAddr,
    url: &str,
    n: usize,
    concurrency: usize,
) -> (Vec<Option<Ws>>, usize, Option<String>, f64) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let fleet_no = client::fleet_number();
    let bar = ProgressBar::new(n as u64).with_style(
        ProgressStyle::with_template("  connecting {bar:40} {pos}/{len} {elapsed}")
            .expect("progress template"),
    );
    let started = Instant::now();
    let mut handshakes = JoinSet::new();
    for i in 0..n {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        let url = url.to_string();
        let source = client::source_addr(fleet_no, i);
        handshakes.spawn(async move {
            let result = open(addr, &url, source).await;
            drop(permit);
            (i, result)
        });
    }
    let mut conns: Vec<Option<Ws>> = (0..n).map(|_| None).collect();
    let (mut errors, mut first_error) = (0, None);
    while let Some(joined) = handshakes.join_next().await {
        bar.inc(1);
        match joined.expect("handshake task") {
            (i, Ok(ws)) => conns[i] = Some(ws),
            (_, Err(err)) => {
                errors += 1;
                first_error.get_or_insert(err);
            }
        }
    }
    bar.finish_and_clear();
    (conns, errors, first_error, started.elapsed().as_secs_f64())
}

async fn open(addr: SocketAddr, url: &str, source: Ipv4Addr) -> Result<Ws, String> {
    tokio::time::timeout(
        Duration::from_secs(15),
        client::open(addr, url, source, None),
    )
    .await
    .unwrap_or_else(|_| Err("handshake timed out after 15 s".to_string()))
}

/// Waits until `done()` or `limit` passes; whether it got there.
async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// Waits until every reply is in and every owed delivery made, nothing has
/// arrived for `stall`, or [`PHASE_LIMIT`] passes.
async fn drain(shared: &Shared, stall: Duration) {
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut last = (u64::MAX, Instant::now());
    loop {
        let c = &shared.counters;
        let delivered = c.delivered.load(Ordering::Relaxed);
        let replied = shared.published.load(Ordering::Relaxed)
            + shared.publish_errors.load(Ordering::Relaxed);
        let all_replied = replied >= c.sent.load(Ordering::Relaxed);
        if (all_replied && delivered >= shared.expected.load(Ordering::Relaxed))
            || Instant::now() >= deadline
        {
            return;
        }
        let progress = delivered + replied;
        if progress != last.0 {
            last = (progress, Instant::now());
        } else if last.1.elapsed() >= stall {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The publishers send `rounds` messages on each of `topics` topics at
/// `rate` per topic per second, on a fixed schedule: topic `i` of round `r`
/// at `(r + i/topics)/rate` s, publisher `p` taking the topics `i ≡ p (mod
/// P)`. Each `data` carries its scheduled send time. Gives up `grace` after
/// the schedule ends.
async fn publish(
    sinks: &mut Vec<Sink>,
    shared: &Arc<Shared>,
    topics: usize,
    rounds: u64,
    rate: f64,
    size: usize,
    grace: Duration,
) {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let count = sinks.len().max(1);
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let deadline = start + interval * rounds as u32 + grace;
    let mut tasks = JoinSet::new();
    for (p, mut sink) in sinks.drain(..).enumerate() {
        let shared = shared.clone();
        tasks.spawn(async move {
            let run = async {
                let mut seq = 0u64;
                for r in 0..rounds {
                    for i in (p..topics).step_by(count) {
                        let at = start
                            + interval * r as u32
                            + interval.mul_f64(i as f64 / topics as f64);
                        tokio::time::sleep_until(at).await;
                        let lateness = tokio::time::Instant::now().saturating_duration_since(at);
                        let sent_ns = client::now_ns().saturating_sub(lateness.as_nanos() as u64);
                        let id = r * topics as u64 + i as u64;
                        let text = format!(
                            r#"{{"id":{id},"op":"publish","topic":"t{i}","data":{}}}"#,
                            stamp(p, seq, sent_ns, size)
                        );
                        if sink.send(Message::text(text)).await.is_err() {
                            return;
                        }
                        seq += 1;
                        shared.counters.sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            };
            let _ = tokio::time::timeout_at(deadline, run).await;
            sink
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok(sink) = joined {
            sinks.push(sink);
        }
    }
}

/// Sends each sink its batch of commands (all fed, then one flush).
async fn send_all(sinks: &mut [(usize, Sink)], mut batch: impl FnMut(usize) -> Vec<Message>) {
    for (c, sink) in sinks.iter_mut() {
        let sent = tokio::time::timeout(Duration::from_secs(5), async {
            for msg in batch(*c) {
                sink.feed(msg).await?;
            }
            sink.flush().await
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            eprintln!("  client {c}: could not send its subscriptions");
        }
    }
}

fn cpu(a: &ServerStats, b: &ServerStats) -> (Option<f64>, Option<f64>) {
    let diff = |x: Option<u64>, y: Option<u64>| Some(y?.saturating_sub(x?) as f64);
    (diff(a.cpu_us, b.cpu_us), diff(a.user_us, b.user_us))
}

fn rss_diff(a: &ServerStats, b: &ServerStats) -> Option<f64> {
    Some(b.rss_kib? as f64 - a.rss_kib? as f64)
}

fn ms_at(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let at = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[at])
}

/// A `RunResult` with what every pub/sub run reports alike.
#[allow(clippy::too_many_arguments)]
fn result(
    scenario: &Scenario,
    variant: &Variant,
    run: usize,
    shared: &Shared,
    connect: (usize, usize, Option<String>, f64),
    receivers: u64,
    publishers: usize,
    publish_secs: f64,
) -> RunResult {
    let c = &shared.counters;
    let (connected, connect_errors, first_connect_error, connect_secs) = connect;
    let sent = c.sent.load(Ordering::Relaxed);
    let delivered = c.delivered.load(Ordering::Relaxed);
    let expected = shared.expected.load(Ordering::Relaxed);
    RunResult {
        scenario: scenario.name.clone(),
        server: variant.label.clone(),
        run,
        clients_requested: scenario.clients,
        connected,
        connect_errors,
        first_connect_error,
        connect_secs,
        all_ready: true,
        slow: 0,
        receivers,
        publishers,
        sent,
        expected,
        delivered,
        delivery_ratio: if expected == 0 {
            0.0
        } else {
            delivered as f64 / expected as f64
        },
        deliveries_per_sec: delivered as f64 / publish_secs.max(1e-3),
        publish_secs,
        latency_ms: Latency::of(&c.latency()),
        gaps: c.gaps.load(Ordering::Relaxed),
        reorders: c.reorders.load(Ordering::Relaxed),
        other_messages: c.other.load(Ordering::Relaxed),
        closed_by_server: c.closed(),
        ..RunResult::default()
    }
}

fn figures(shared: &Shared, topics: usize) -> PubSubFigures {
    PubSubFigures {
        topics,
        subscriptions: shared.subscribed.load(Ordering::Relaxed),
        subscribe_errors: shared.subscribe_errors.load(Ordering::Relaxed),
        publish_errors: shared.publish_errors.load(Ordering::Relaxed),
        first_error: shared.first_error.lock().unwrap().clone(),
        gap_pushes: shared.gap_pushes.load(Ordering::Relaxed),
        wrong_epoch: shared.wrong_epoch.load(Ordering::Relaxed),
        ..PubSubFigures::default()
    }
}

/// The `topics-1k` shape: see the module doc.
pub async fn run_topics(
    target: &mut Target,
    scenario: &Scenario,
    variant: &Variant,
    run: usize,
    concurrency: usize,
    (topics, per_client): (usize, usize),
) -> Result<RunResult, String> {
    let topics = topics.max(1);
    let per_client = per_client.clamp(1, topics);
    let start = target.stats();
    let url = format!("ws://{}{}", target.addr(), target.path());
    let (clients, publishers) = (scenario.clients, scenario.publishers);
    let (conns, connect_errors, first_error, connect_secs) =
        connect_many(target.addr(), &url, publishers + clients, concurrency).await;
    let shared = Shared::new(topics);
    let stop = CancellationToken::new();
    let mut pub_sinks = Vec::new();
    let mut sub_sinks = Vec::new();
    let mut readers = Vec::new();
    for (i, ws) in conns.into_iter().enumerate() {
        let Some(ws) = ws else { continue };
        let (sink, source) = ws.split();
        let conn = if i < publishers {
            pub_sinks.push(sink);
            Conn::publisher()
        } else {
            let c = i - publishers;
            sub_sinks.push((c, sink));
            Conn::subscriber(topics_of(c, topics, per_client))
        };
        readers.push(tokio::spawn(read(
            source,
            conn,
            shared.clone(),
            stop.clone(),
        )));
    }
    let connected_n = pub_sinks.len() + sub_sinks.len();
    if sub_sinks.is_empty() || pub_sinks.is_empty() {
        stop.cancel();
        return Err(format!(
            "{} subscribers and {} publishers connected: {}",
            sub_sinks.len(),
            pub_sinks.len(),
            first_error.as_deref().unwrap_or("no error recorded")
        ));
    }
    let connected = target.stats();

    // One subscription each: together they create every topic.
    let subscribing = Instant::now();
    send_all(&mut sub_sinks, |c| {
        vec![subscribe_command(topics_of(c, topics, per_client)[0], None)]
    })
    .await;
    let n = sub_sinks.len() as u64;
    wait_for(PHASE_LIMIT, || shared.replied() >= n).await;
    let one_secs = subscribing.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let one = target.stats();
    // The rest, to topics that exist.
    let subscribing = Instant::now();
    send_all(&mut sub_sinks, |c| {
        topics_of(c, topics, per_client)[1..]
            .iter()
            .map(|&t| subscribe_command(t, None))
            .collect()
    })
    .await;
    let all_n = n * per_client as u64;
    wait_for(PHASE_LIMIT, || shared.replied() >= all_n).await;
    let rest_secs = subscribing.elapsed().as_secs_f64();
    let subscribed_cpu = target.stats();
    tokio::time::sleep(SETTLE).await;
    let all = target.stats();

    let rounds = (scenario.rate * scenario.duration).round() as u64;
    let total = rounds * topics as u64;
    let bar = ProgressBar::new(total * per_client as u64).with_style(
        ProgressStyle::with_template("  delivering {bar:40} {percent}% {per_sec} {elapsed}")
            .expect("progress template"),
    );
    let follower = follow(shared.clone(), bar.clone());
    let began = Instant::now();
    publish(
        &mut pub_sinks,
        &shared,
        topics,
        rounds,
        scenario.rate,
        scenario.payload,
        Duration::from_secs(10),
    )
    .await;
    let publish_secs = began.elapsed().as_secs_f64();
    drain(&shared, Duration::from_secs(3)).await;
    let end = target.stats();
    follower.abort();
    bar.finish_and_clear();

    stop.cancel();
    let mut missing = 0;
    let mut held = Vec::new();
    for reader in readers {
        if let Ok((source, conn)) = reader.await {
            for sub in conn.subs.iter().filter(|s| s.subscribed) {
                let last = shared.last_seq[sub.topic].load(Ordering::Relaxed);
                missing += last.saturating_sub(sub.last);
            }
            held.push(source);
        }
    }
    drop(held);
    drop(sub_sinks);
    drop(pub_sinks);

    let mut result = result(
        scenario,
        variant,
        run,
        &shared,
        (connected_n, connect_errors, first_error, connect_secs),
        n,
        publishers,
        publish_secs,
    );
    result.set_cpu_for(&all, &end, result.delivered);
    result.set_rss(&start, &connected, connected_n);
    result.server_rss_end_kib = end.rss_kib;
    result.server_counters = end.counters.clone();
    let extra = (per_client as f64 - 1.0) * n as f64;
    let mut pubsub = figures(&shared, topics);
    pubsub.missing = missing;
    pubsub.rss_one_sub_kib = one.rss_kib;
    pubsub.rss_all_subs_kib = all.rss_kib;
    pubsub.bytes_per_extra_subscription = rss_diff(&one, &all)
        .filter(|_| extra > 0.0)
        .map(|kib| kib * 1024.0 / extra);
    pubsub.kib_per_topic = rss_diff(&connected, &one).map(|kib| kib / topics as f64);
    pubsub.kib_per_connection_subscribed =
        rss_diff(&start, &all).map(|kib| kib / connected_n as f64);
    pubsub.subscribe_secs = vec![one_secs, rest_secs];
    pubsub.cpu_us_per_subscription = cpu(&one, &subscribed_cpu)
        .0
        .filter(|_| extra > 0.0)
        .map(|us| us / extra);
    result.exact = result.delivered == result.expected
        && result.expected > 0
        && result.gaps == 0
        && result.reorders == 0
        && result.other_messages == 0
        && result.connect_errors == 0
        && result.closed_by_server.is_empty()
        && pubsub.subscriptions == all_n
        && pubsub.subscribe_errors == 0
        && pubsub.publish_errors == 0
        && pubsub.gap_pushes == 0
        && pubsub.wrong_epoch == 0
        && pubsub.missing == 0
        && result.sent == total;
    result.pubsub = Some(pubsub);
    Ok(result)
}

/// The `resume-storm` shape: see the module doc.
pub async fn run_resume(
    target: &mut Target,
    scenario: &Scenario,
    variant: &Variant,
    run: usize,
    concurrency: usize,
    missed: u64,
) -> Result<RunResult, String> {
    let start = target.stats();
    let addr = target.addr();
    let url = format!("ws://{addr}{}", target.path());
    let clients = scenario.clients;
    let (conns, connect_errors, first_error, connect_secs) =
        connect_many(addr, &url, 1 + clients, concurrency).await;
    let shared = Shared::new(1);
    let (sub_stop, pub_stop) = (CancellationToken::new(), CancellationToken::new());
    let mut pub_sinks = Vec::new();
    let mut sub_sinks = Vec::new();
    let mut readers = Vec::new();
    let mut pub_reader = None;
    for (i, ws) in conns.into_iter().enumerate() {
        let Some(ws) = ws else { continue };
        let (sink, source) = ws.split();
        if i == 0 {
            pub_sinks.push(sink);
            pub_reader = Some(tokio::spawn(read(
                source,
                Conn::publisher(),
                shared.clone(),
                pub_stop.clone(),
            )));
        } else {
            sub_sinks.push((i - 1, sink));
            readers.push(tokio::spawn(read(
                source,
                Conn::subscriber(vec![0]),
                shared.clone(),
                sub_stop.clone(),
            )));
        }
    }
    let connected_n = pub_sinks.len() + sub_sinks.len();
    let n = sub_sinks.len() as u64;
    if n == 0 || pub_sinks.is_empty() {
        sub_stop.cancel();
        pub_stop.cancel();
        return Err(format!(
            "{n} subscribers and {} publishers connected: {}",
            pub_sinks.len(),
            first_error.as_deref().unwrap_or("no error recorded")
        ));
    }
    send_all(&mut sub_sinks, |_| vec![subscribe_command(0, None)]).await;
    wait_for(PHASE_LIMIT, || shared.replied() >= n).await;
    tokio::time::sleep(SETTLE).await;
    let connected = target.stats();

    // Live: every client gets a position to come back to.
    let live = (scenario.rate * scenario.duration).round() as u64;
    let began = Instant::now();
    publish(
        &mut pub_sinks,
        &shared,
        1,
        live,
        scenario.rate,
        scenario.payload,
        Duration::from_secs(10),
    )
    .await;
    let publish_secs = began.elapsed().as_secs_f64();
    drain(&shared, Duration::from_secs(3)).await;

    // Everyone drops the connection at once.
    sub_stop.cancel();
    let mut positions = Vec::new();
    let mut halves = Vec::new();
    let mut sinks = sub_sinks.into_iter();
    let mut missing = 0;
    let live_last = shared.last_seq[0].load(Ordering::Relaxed);
    for reader in readers {
        let sink = sinks.next();
        if let Ok((source, conn)) = reader.await {
            let sub = &conn.subs[0];
            missing += live_last.saturating_sub(sub.last);
            if let (true, Some(epoch)) = (sub.subscribed, sub.epoch.clone()) {
                positions.push((epoch, sub.last));
            }
            halves.push((sink, source));
        }
    }
    drop(halves);
    let dropped = Instant::now();

    // Meanwhile, `missed` messages.
    let published_before = shared.published.load(Ordering::Relaxed);
    let sent = tokio::time::timeout(Duration::from_secs(10), async {
        let sink = &mut pub_sinks[0];
        for i in 0..missed {
            let id = live + i;
            let data = stamp(0, id, client::now_ns(), scenario.payload);
            let text = format!(r#"{{"id":{id},"op":"publish","topic":"t0","data":{data}}}"#);
            sink.feed(Message::text(text)).await?;
            shared.counters.sent.fetch_add(1, Ordering::Relaxed);
        }
        sink.flush().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return Err("the publisher could not send the missed messages".to_string());
    }
    wait_for(Duration::from_secs(10), || {
        shared.published.load(Ordering::Relaxed) + shared.publish_errors.load(Ordering::Relaxed)
            >= published_before + missed
    })
    .await;
    let until = shared.last_seq[0].load(Ordering::Relaxed);
    // The server sees every connection go (only the publisher's is left).
    let mut gone = false;
    while dropped.elapsed() < Duration::from_secs(10) {
        match target.stats().connections {
            Some(c) if c <= 1 => {
                gone = true;
                break;
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            // A --url server without a count: give it a second.
            None => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                break;
            }
        }
    }
    let disconnect_secs = gone.then(|| dropped.elapsed().as_secs_f64());
    tokio::time::sleep(SETTLE).await;

    // The storm: all reconnect at once, each with its `since`.
    let storm = Shared::new(1);
    let storm_stop = CancellationToken::new();
    let fleet_no = client::fleet_number();
    let before = target.stats();
    let began = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, (epoch, last)) in positions.into_iter().enumerate() {
        let (url, storm, stop) = (url.clone(), storm.clone(), storm_stop.clone());
        let source = client::source_addr(fleet_no, i);
        tasks.spawn(async move {
            let mut conn = Conn::subscriber(vec![0]);
            conn.record_latency = false;
            conn.until = Some(until);
            conn.subs[0].epoch = Some(epoch.clone());
            conn.subs[0].last = last;
            conn.subs[0].resume = true;
            let mut ws = match open(addr, &url, source).await {
                Ok(ws) => ws,
                Err(err) => {
                    storm.fail(err);
                    return (None, conn);
                }
            };
            conn.connected_at = Some(Instant::now());
            if ws
                .send(subscribe_command(0, Some((&epoch, last))))
                .await
                .is_err()
            {
                storm.fail("could not send the subscribe".to_string());
                return (None, conn);
            }
            loop {
                let msg = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    msg = ws.next() => msg,
                };
                if !conn.on_frame(&storm, msg) {
                    break;
                }
            }
            (Some(ws), conn)
        });
    }
    let resumed = tasks.len() as u64;
    wait_for(PHASE_LIMIT, || {
        storm.caught_up.load(Ordering::Relaxed) + storm.failed.load(Ordering::Relaxed) >= resumed
    })
    .await;
    let after = target.stats();
    // A little longer, for anything that should not come.
    tokio::time::sleep(SETTLE).await;
    storm_stop.cancel();
    let mut times = Vec::new();
    let mut handshakes: Option<Instant> = None;
    let mut sockets = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let Ok((ws, conn)) = joined else { continue };
        if let Some(at) = conn.caught_up {
            times.push(at.saturating_duration_since(began).as_secs_f64() * 1e3);
        }
        if let Some(at) = conn.connected_at {
            handshakes = handshakes.max(Some(at));
        }
        missing += until.saturating_sub(conn.subs[0].last);
        sockets.push(ws);
    }
    drop(sockets);
    pub_stop.cancel();
    if let Some(reader) = pub_reader {
        let _ = reader.await;
    }
    drop(pub_sinks);
    times.sort_by(f64::total_cmp);

    let live_delivered = shared.counters.delivered.load(Ordering::Relaxed);
    let storm_delivered = storm.counters.delivered.load(Ordering::Relaxed);
    let mut result = result(
        scenario,
        variant,
        run,
        &shared,
        (connected_n, connect_errors, first_error, connect_secs),
        n,
        1,
        publish_secs,
    );
    // Both phases: every client owes the live messages and the missed ones.
    result.expected = n * (live + missed);
    result.delivered = live_delivered + storm_delivered;
    result.delivery_ratio = result.delivered as f64 / result.expected.max(1) as f64;
    for (mine, theirs) in [
        (&mut result.gaps, &storm.counters.gaps),
        (&mut result.reorders, &storm.counters.reorders),
        (&mut result.other_messages, &storm.counters.other),
    ] {
        *mine += theirs.load(Ordering::Relaxed);
    }
    for (why, count) in storm.counters.closed() {
        *result.closed_by_server.entry(why).or_default() += count;
    }
    // CPU per delivery is the storm's: its CPU over its deliveries.
    result.set_cpu_for(&before, &after, storm_delivered);
    result.set_rss(&start, &connected, connected_n);
    result.server_rss_end_kib = after.rss_kib;
    result.server_counters = after.counters.clone();
    let mut pubsub = figures(&shared, 1);
    pubsub.missing = missing;
    pubsub.subscribe_errors += storm.subscribe_errors.load(Ordering::Relaxed);
    pubsub.gap_pushes += storm.gap_pushes.load(Ordering::Relaxed);
    pubsub.wrong_epoch += storm.wrong_epoch.load(Ordering::Relaxed);
    pubsub.first_error = pubsub
        .first_error
        .or_else(|| storm.first_error.lock().unwrap().clone());
    pubsub.missed_messages = missed;
    pubsub.disconnect_secs = disconnect_secs;
    pubsub.reconnect_errors = storm.failed.load(Ordering::Relaxed);
    pubsub.first_reconnect_error = storm.first_failure.lock().unwrap().clone();
    pubsub.caught_up = storm.caught_up.load(Ordering::Relaxed);
    pubsub.not_recovered = storm.not_recovered.load(Ordering::Relaxed);
    pubsub.epoch_changed = storm.epoch_changed.load(Ordering::Relaxed);
    pubsub.storm_delivered = storm_delivered;
    pubsub.catch_up_ms = (pubsub.caught_up == n)
        .then(|| times.last().copied())
        .flatten();
    pubsub.catch_up_p50_ms = ms_at(&times, 0.50);
    pubsub.catch_up_p99_ms = ms_at(&times, 0.99);
    pubsub.handshakes_ms = handshakes
        .filter(|_| pubsub.reconnect_errors == 0)
        .map(|at| at.saturating_duration_since(began).as_secs_f64() * 1e3);
    let (cpu_us, user_us) = cpu(&before, &after);
    pubsub.storm_cpu_ms = cpu_us.map(|us| us / 1e3);
    pubsub.storm_user_ms = user_us.map(|us| us / 1e3);
    pubsub.rss_after_storm_kib = after.rss_kib;
    pubsub.kib_per_connection_subscribed =
        rss_diff(&start, &connected).map(|kib| kib / connected_n as f64);
    result.exact = result.delivered == result.expected
        && result.gaps == 0
        && result.reorders == 0
        && result.other_messages == 0
        && result.connect_errors == 0
        && result.closed_by_server.is_empty()
        && pubsub.subscriptions == n
        && pubsub.subscribe_errors == 0
        && pubsub.publish_errors == 0
        && pubsub.gap_pushes == 0
        && pubsub.wrong_epoch == 0
        && pubsub.missing == 0
        && pubsub.caught_up == n
        && pubsub.reconnect_errors == 0
        && pubsub.not_recovered == 0
        && pubsub.epoch_changed == 0
        && storm_delivered == n * missed;
    result.pubsub = Some(pubsub);
    Ok(result)
}

/// Keeps `bar` in step with the delivered count until aborted.
fn follow(shared: Arc<Shared>, bar: ProgressBar) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            bar.set_length(shared.expected.load(Ordering::Relaxed).max(1));
            bar.set_position(shared.counters.delivered.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Medians over runs of the pub/sub figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PubSubSummary {
    /// "topics" or "resume".
    pub shape: &'static str,
    pub topics: usize,
    pub subscriptions: f64,
    pub bytes_per_extra_subscription: Option<f64>,
    pub kib_per_topic: Option<f64>,
    pub kib_per_connection_subscribed: Option<f64>,
    pub cpu_us_per_subscription: Option<f64>,
    pub missed_messages: u64,
    /// Median over the runs where every client caught up.
    pub catch_up_ms: Option<f64>,
    /// Runs where every client caught up.
    pub caught_up_runs: usize,
    pub catch_up_p50_ms: Option<f64>,
    pub catch_up_p99_ms: Option<f64>,
    pub handshakes_ms: Option<f64>,
    pub storm_cpu_ms: Option<f64>,
    pub storm_user_ms: Option<f64>,
    pub rss_after_storm_mib: Option<f64>,
    pub disconnect_secs: Option<f64>,
    /// The worst run's counts of what should be 0.
    pub missing: u64,
    pub gap_pushes: u64,
    pub not_recovered: u64,
    pub epoch_changed: u64,
    pub subscribe_errors: u64,
    pub publish_errors: u64,
    pub reconnect_errors: u64,
    pub first_error: Option<String>,
}

/// The pub/sub figures of `runs` (one server, one scenario), if any.
pub fn summarize(runs: &[&RunResult]) -> Option<PubSubSummary> {
    let figures: Vec<&PubSubFigures> = runs.iter().filter_map(|r| r.pubsub.as_ref()).collect();
    let first = figures.first()?;
    let med = |f: &dyn Fn(&PubSubFigures) -> Option<f64>| {
        let values: Vec<f64> = figures.iter().filter_map(|x| f(x)).collect();
        (!values.is_empty()).then(|| crate::median(values))
    };
    let worst = |f: &dyn Fn(&PubSubFigures) -> u64| figures.iter().map(|x| f(x)).max().unwrap_or(0);
    Some(PubSubSummary {
        shape: if first.missed_messages > 0 {
            "resume"
        } else {
            "topics"
        },
        topics: first.topics,
        subscriptions: med(&|x| Some(x.subscriptions as f64)).unwrap_or(0.0),
        bytes_per_extra_subscription: med(&|x| x.bytes_per_extra_subscription),
        kib_per_topic: med(&|x| x.kib_per_topic),
        kib_per_connection_subscribed: med(&|x| x.kib_per_connection_subscribed),
        cpu_us_per_subscription: med(&|x| x.cpu_us_per_subscription),
        missed_messages: first.missed_messages,
        catch_up_ms: med(&|x| x.catch_up_ms),
        caught_up_runs: figures.iter().filter(|x| x.catch_up_ms.is_some()).count(),
        catch_up_p50_ms: med(&|x| x.catch_up_p50_ms),
        catch_up_p99_ms: med(&|x| x.catch_up_p99_ms),
        handshakes_ms: med(&|x| x.handshakes_ms),
        storm_cpu_ms: med(&|x| x.storm_cpu_ms),
        storm_user_ms: med(&|x| x.storm_user_ms),
        rss_after_storm_mib: med(&|x| x.rss_after_storm_kib.map(|k| k as f64 / 1024.0)),
        disconnect_secs: med(&|x| x.disconnect_secs),
        missing: worst(&|x| x.missing),
        gap_pushes: worst(&|x| x.gap_pushes),
        not_recovered: worst(&|x| x.not_recovered),
        epoch_changed: worst(&|x| x.epoch_changed),
        subscribe_errors: worst(&|x| x.subscribe_errors),
        publish_errors: worst(&|x| x.publish_errors),
        reconnect_errors: worst(&|x| x.reconnect_errors),
        first_error: figures
            .iter()
            .find_map(|x| x.first_error.clone().or(x.first_reconnect_error.clone())),
    })
}

/// The lines under the table for one pub/sub server.
pub fn print_summary(server: &str, s: &PubSubSummary) {
    let f = crate::fmt_opt;
    if s.shape == "topics" {
        let bytes = s.bytes_per_extra_subscription;
        println!(
            "  {server}: {} subscriptions on {} topics; memory per extra subscription {} B \
             (target ≤ 1024: {}), per topic with its first subscriber {} KiB, per connection \
             with its subscriptions {} KiB; subscribe CPU {} µs each",
            s.subscriptions,
            s.topics,
            f(bytes, 0),
            match bytes {
                Some(b) if b <= 1024.0 => "met",
                Some(_) => "missed",
                None => "-",
            },
            f(s.kib_per_topic, 2),
            f(s.kib_per_connection_subscribed, 2),
            f(s.cpu_us_per_subscription, 2),
        );
    } else {
        println!(
            "  {server}: resume of {} missed messages: every client caught up after {} ms \
             (target ≤ 1000: {}; {} of the runs), per client p50 {} ms, p99 {} ms; \
             handshakes done after {} ms; storm CPU {} ms (user {}); RSS after {} MiB; \
             the server saw the drop in {} s",
            s.missed_messages,
            f(s.catch_up_ms, 1),
            match s.catch_up_ms {
                Some(ms) if ms <= 1000.0 => "met",
                Some(_) => "missed",
                None => "-",
            },
            s.caught_up_runs,
            f(s.catch_up_p50_ms, 1),
            f(s.catch_up_p99_ms, 1),
            f(s.handshakes_ms, 1),
            f(s.storm_cpu_ms, 1),
            f(s.storm_user_ms, 1),
            f(s.rss_after_storm_mib, 1),
            f(s.disconnect_secs, 2),
        );
    }
    let wrong = [
        ("missing", s.missing),
        ("gap pushes", s.gap_pushes),
        ("not recovered", s.not_recovered),
        ("epoch changed", s.epoch_changed),
        ("subscribe errors", s.subscribe_errors),
        ("publish errors", s.publish_errors),
        ("reconnect errors", s.reconnect_errors),
    ];
    let wrong: Vec<String> = wrong
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{what} {n}"))
        .collect();
    if !wrong.is_empty() || s.first_error.is_some() {
        println!(
            "  {server}: NOT EXACT (worst run): {}; first error {}",
            wrong.join(", "),
            s.first_error.as_deref().unwrap_or("-")
        );
    }
}

/// A line of the comparison: label, figure, decimals.
type Row<'a> = (
    &'static str,
    &'a dyn Fn(&crate::Summary) -> Option<f64>,
    usize,
);

#[derive(Serialize)]
struct Comparison<'a> {
    fanout: &'a crate::Summary,
    topics: &'a crate::Summary,
    resume: Option<&'a crate::Summary>,
    /// topics-1k / fanout-1k.
    ratios: BTreeMap<&'static str, Option<f64>>,
}

/// When `fanout-1k` and `topics-1k` both ran, the two side by side (and
/// `resume-storm`, if it ran too), on stdout and in
/// `<out>/topics-1k-vs-fanout-1k.json`.
pub fn compare(summaries: &[crate::Summary], out: &std::path::Path) {
    let pick = |scenario: &str, prefer: &str| {
        let mine = summaries.iter().filter(|s| s.scenario == scenario);
        let mut all = mine.clone();
        mine.clone()
            .find(|s| s.server == prefer)
            .or_else(|| all.next())
    };
    let (Some(fanout), Some(topics)) = (
        pick("fanout-1k", "wshub"),
        pick("topics-1k", "wshub-pubsub"),
    ) else {
        return;
    };
    let resume = pick("resume-storm", "wshub-pubsub");
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    };
    let rows: Vec<Row<'_>> = vec![
        ("CPU µs/delivery", &|s| s.cpu_us_per_delivery, 2),
        ("  user µs", &|s| s.user_us_per_delivery, 2),
        ("  sys µs", &|s| s.sys_us_per_delivery, 2),
        ("ctx switches/s", &|s| s.context_switches_per_sec, 0),
        ("deliveries/s", &|s| Some(s.deliveries_per_sec), 0),
        ("p50 ms", &|s| Some(s.p50_ms), 2),
        ("p99 ms", &|s| Some(s.p99_ms), 2),
        ("delivery ratio", &|s| Some(s.delivery_ratio), 4),
        ("RSS MiB connected", &|s| s.server_rss_connected_mib, 1),
        ("KiB/conn", &|s| s.kib_per_connection, 2),
        (
            "KiB/conn subscribed",
            &|s| {
                s.pubsub
                    .as_ref()
                    .and_then(|p| p.kib_per_connection_subscribed)
            },
            2,
        ),
        (
            "B/extra subscription",
            &|s| {
                s.pubsub
                    .as_ref()
                    .and_then(|p| p.bytes_per_extra_subscription)
            },
            0,
        ),
        (
            "catch-up ms",
            &|s| s.pubsub.as_ref().and_then(|p| p.catch_up_ms),
            1,
        ),
    ];
    println!("\n== topics-1k vs fanout-1k (this invocation; medians) ==");
    let name = |s: &crate::Summary| format!("{} {}", s.scenario, s.server);
    print!(
        "{:<22} {:>24} {:>28} {:>8}",
        "",
        name(fanout),
        name(topics),
        "ratio"
    );
    if let Some(r) = resume {
        print!(" {:>28}", name(r));
    }
    println!();
    let mut ratios = BTreeMap::new();
    for (label, get, digits) in &rows {
        let (a, b) = (get(fanout), get(topics));
        let r = ratio(b, a);
        print!(
            "{label:<22} {:>24} {:>28} {:>8}",
            crate::fmt_opt(a, *digits),
            crate::fmt_opt(b, *digits),
            crate::fmt_opt(r, 2)
        );
        if let Some(s) = resume {
            print!(" {:>28}", crate::fmt_opt(get(s), *digits));
        }
        println!();
        ratios.insert(label.trim(), r);
    }
    println!(
        "  exact: {} {}/{}, {} {}/{}{}",
        fanout.scenario,
        fanout.exact_runs,
        fanout.runs,
        topics.scenario,
        topics.exact_runs,
        topics.runs,
        resume.map_or(String::new(), |r| format!(
            ", {} {}/{}",
            r.scenario, r.exact_runs, r.runs
        ))
    );
    println!(
        "  (resume-storm's CPU per delivery is the storm's: its CPU over the missed messages delivered)"
    );
    let path = out.join("topics-1k-vs-fanout-1k.json");
    let report = Comparison {
        fanout,
        topics,
        resume,
        ratios,
    };
    let written = std::fs::create_dir_all(out).and_then(|()| {
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&report).unwrap_or_default(),
        )
    });
    match written {
        Ok(()) => println!("  wrote {}", path.display()),
        Err(err) => eprintln!("  could not write {}: {err}", path.display()),
    }
}
