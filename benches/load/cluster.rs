//! The cluster scenarios: two nodes on one `redis-server`, wshub's
//! `RedisBroker` (`wshub-redis`) side by side with the pattern people write
//! by hand (`naive-redis`), same clients, same load, same run.
//!
//! Every run starts its own `redis-server` on a free loopback port (`--save
//! '' --appendonly no`) and two node processes, and stops them all after.
//! The subscribers are spread evenly over the two nodes (client `i` on node
//! `i mod 2`); the publishers are all on node 1, so node 2's subscribers are
//! the cross-node ones. `wshub-redis` clients speak the pub/sub protocol
//! (one topic); `naive-redis` clients send and receive the bare `data`
//! text. Both carry the same `data`: `{"p":..,"s":..,"t":..,"x":"xx.."}`,
//! the publisher, its sequence number and the scheduled send time, padded to
//! the payload size. CPU is user and system time of node 1, node 2 and
//! Redis from the publishing start to the end of the drain, over the
//! deliveries. `cluster-1k` also runs `wshub-pubsub` alone with the same
//! clients, for the single-node p99 the cross-node p99 is held to.
//!
//! `cluster-restart` SIGKILLs Redis under two `wshub-redis` nodes with
//! subscribed clients, starts it again on the same port (at once, and after
//! 5 s) and times from its first PING answer until a publish through node 1
//! reaches clients on both nodes, and until it reaches every client (each
//! closed client reconnects and subscribes again, without `since`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Counters, Sink, Source, Ws};
use crate::servers::{Kind, REDIS_URL_ENV};
use crate::{Args, Latency, Machine, ServerStats, Target, cores, fmt_opt, median, sys};

/// The one topic of the wshub kinds.
const TOPIC: &str = "bench";
/// How long a phase (connecting, warming up, draining) may take.
const PHASE_LIMIT: Duration = Duration::from_secs(30);

/// One cluster load.
#[derive(Debug, Clone, Serialize)]
struct Load {
    name: String,
    clients: usize,
    publishers: usize,
    rate: f64,
    duration: f64,
    payload: usize,
    /// Kinds measured, in turn within each round.
    #[serde(skip)]
    kinds: Vec<Kind>,
}

fn load(name: &str, args: &Args) -> Load {
    let (clients, publishers, rate, duration) = match name {
        "cluster-1k" => (1000, 1, 100.0, 10.0),
        "cluster-high" => (200, 4, 500.0, 10.0),
        _ => (40, 2, 20.0, 2.0),
    };
    let mut kinds = vec![Kind::WshubRedis, Kind::NaiveRedis];
    if name == "cluster-1k" {
        kinds.push(Kind::WshubPubSub);
    }
    if !args.servers.is_empty() {
        kinds.retain(|k| args.servers.contains(k));
    }
    Load {
        name: name.to_string(),
        clients: args.clients.unwrap_or(clients).max(2),
        publishers: args.publishers.unwrap_or(publishers).max(1),
        rate: args.rate.unwrap_or(rate),
        duration: args.duration.unwrap_or(duration),
        payload: args.payload.unwrap_or(64).max(40),
        kinds,
    }
}

fn label(kind: Kind) -> String {
    match kind {
        Kind::WshubPubSub => "wshub-pubsub (1 node)".to_string(),
        kind => kind.to_string(),
    }
}

// ------------------------------------------------------------------ redis

/// A `redis-server` child on a loopback port.
struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    async fn start() -> Result<Redis, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("a free port: {e}"))?
            .port();
        let mut redis = Redis { child: None, port };
        redis.spawn().await?;
        Ok(redis)
    }

    /// Starts `redis-server` on the port and waits for its first PING
    /// answer (at most 10 s).
    async fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting redis-server: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping().await {
            if Instant::now() >= deadline {
                return Err("redis-server did not answer PING within 10 s".to_string());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Whether Redis answers a PING (within 200 ms).
    async fn ping(&self) -> bool {
        let attempt = async {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
            tcp.write_all(b"PING\r\n").await?;
            let mut reply = [0u8; 7];
            tcp.read_exact(&mut reply).await?;
            Ok::<bool, std::io::Error>(&reply == b"+PONG\r\n")
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(200), attempt).await,
            Ok(Ok(true))
        )
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stats(&self) -> ServerStats {
        let Some(pid) = self.pid() else {
            return ServerStats::default();
        };
        let cpu = sys::process_cpu_split(pid).ok();
        ServerStats {
            cpu_us: cpu.map(|(u, s)| u + s),
            user_us: cpu.map(|(u, _)| u),
            rss_kib: sys::rss_kib(Some(pid)).ok(),
            ..ServerStats::default()
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn start_nodes(kind: Kind, n: usize, redis: Option<&Redis>) -> Result<Vec<Target>, String> {
    let env: Vec<(&str, String)> = redis
        .map(|r| vec![(REDIS_URL_ENV, r.url())])
        .unwrap_or_default();
    (0..n).map(|_| Target::start_env(kind, &env)).collect()
}

// ------------------------------------------------------------------ clients

/// A `data` as the clients read it (the wshub kinds' `message` pushes carry
/// it in `data`; the naive pattern's messages are it).
#[derive(Deserialize)]
struct Data {
    p: Option<usize>,
    s: Option<u64>,
    t: Option<u64>,
    w: Option<u64>,
    probe: Option<u64>,
}

#[derive(Deserialize)]
struct Push {
    op: Option<String>,
    ok: Option<bool>,
    data: Option<Data>,
}

/// Reads a frame's `data`, or for the wshub kinds a reply's `ok`.
enum Frame {
    Data(Data),
    Reply(bool),
    Other,
}

fn parse(kind: Kind, text: &str) -> Frame {
    if kind == Kind::NaiveRedis {
        return serde_json::from_str(text).map_or(Frame::Other, Frame::Data);
    }
    match serde_json::from_str::<Push>(text) {
        Ok(Push {
            op: Some(op),
            data: Some(data),
            ..
        }) if op == "message" => Frame::Data(data),
        Ok(Push {
            op: None,
            ok: Some(ok),
            ..
        }) => Frame::Reply(ok),
        _ => Frame::Other,
    }
}

/// `data` of `size` bytes: publisher, sequence number, send time (ns).
fn stamp(publisher: usize, seq: u64, sent_ns: u64, size: usize) -> String {
    let mut text = format!(r#"{{"p":{publisher},"s":{seq},"t":{sent_ns},"x":""#);
    let pad = size.saturating_sub(text.len() + 2);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    text
}

/// The frame a publisher sends to publish `data`.
fn publish_frame(kind: Kind, id: u64, data: &str) -> Message {
    Message::text(match kind {
        Kind::NaiveRedis => data.to_string(),
        _ => format!(r#"{{"id":{id},"op":"publish","topic":"{TOPIC}","data":{data}}}"#),
    })
}

/// Opens a connection to `addr` and, for the wshub kinds, subscribes to the
/// topic (waiting for the reply).
async fn open(kind: Kind, addr: SocketAddr, source: std::net::Ipv4Addr) -> Result<Ws, String> {
    let url = format!("ws://{addr}{}", kind.path());
    let attempt = async {
        let mut ws = client::open(addr, &url, source, None).await?;
        if kind == Kind::NaiveRedis {
            return Ok(ws);
        }
        let subscribe = format!(r#"{{"id":0,"op":"subscribe","topic":"{TOPIC}"}}"#);
        ws.send(Message::text(subscribe))
            .await
            .map_err(|e| format!("subscribe: {e}"))?;
        while let Some(msg) = ws.next().await {
            if let Ok(Message::Text(text)) = msg {
                match parse(kind, text.as_str()) {
                    Frame::Reply(true) => return Ok(ws),
                    Frame::Reply(false) => return Err(format!("subscribe refused: {text}")),
                    _ => {}
                }
            }
        }
        Err("closed before the subscribe reply".to_string())
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .unwrap_or_else(|_| Err("connect and subscribe timed out after 15 s".to_string()))
}

/// What the subscribers of one run share.
struct Tally {
    all: Counters,
    /// The same, for the subscribers of node 2 alone.
    cross: Counters,
    publish_errors: AtomicU64,
    publishing: AtomicBool,
}

/// Reads one subscriber until `stop`.
async fn subscriber(
    kind: Kind,
    mut ws: Ws,
    cross: bool,
    publishers: usize,
    tally: Arc<Tally>,
    stop: CancellationToken,
) {
    let mut last: Vec<Option<u64>> = vec![None; publishers];
    let mut latencies = Vec::new();
    let mut ready = false;
    let mine = |f: &dyn Fn(&Counters)| {
        f(&tally.all);
        if cross {
            f(&tally.cross);
        }
    };
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            msg = ws.next() => msg,
        };
        let text = match msg {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                mine(&|c| c.record_closed(format!("close {code}")));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(err)) => {
                mine(&|c| c.record_closed(format!("error: {err}")));
                break;
            }
            None => {
                mine(&|c| c.record_closed("eof".to_string()));
                break;
            }
        };
        let data = match parse(kind, text.as_str()) {
            Frame::Data(data) => data,
            _ => {
                mine(&|c| {
                    c.other.fetch_add(1, Ordering::Relaxed);
                });
                continue;
            }
        };
        if data.w.is_some() {
            if !ready {
                ready = true;
                mine(&|c| {
                    c.ready.fetch_add(1, Ordering::Relaxed);
                });
            }
            continue;
        }
        let (Some(p), Some(seq), Some(t)) = (data.p, data.s, data.t) else {
            continue;
        };
        if p >= last.len() || !tally.publishing.load(Ordering::Relaxed) {
            continue;
        }
        mine(&|c| {
            c.delivered.fetch_add(1, Ordering::Relaxed);
        });
        latencies.push(client::now_ns().saturating_sub(t) / 1000);
        if latencies.len() >= 256 {
            flush(&tally, cross, &mut latencies);
        }
        let expected = last[p].map_or(0, |s| s + 1);
        if seq > expected {
            mine(&|c| {
                c.gaps.fetch_add(seq - expected, Ordering::Relaxed);
            });
        } else if seq < expected {
            mine(&|c| {
                c.reorders.fetch_add(1, Ordering::Relaxed);
            });
            continue;
        }
        last[p] = Some(seq);
    }
    flush(&tally, cross, &mut latencies);
}

fn flush(tally: &Tally, cross: bool, latencies: &mut Vec<u64>) {
    if cross {
        tally.cross.record_latencies(&mut latencies.clone());
    }
    tally.all.record_latencies(latencies);
}

/// Reads a publisher's connection: replies (refusals counted) and, for the
/// naive pattern, the broadcasts every session gets, uncounted.
async fn publisher_reader(kind: Kind, mut source: Source, tally: Arc<Tally>) {
    while let Some(Ok(msg)) = source.next().await {
        if let Message::Text(text) = msg {
            if let Frame::Reply(false) = parse(kind, text.as_str()) {
                tally.publish_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

// ------------------------------------------------------------------ one run

/// One process's share of a run.
#[derive(Debug, Clone, Serialize)]
struct Process {
    name: String,
    cpu_us: Option<u64>,
    user_us: Option<u64>,
    rss_connected_kib: Option<u64>,
    rss_end_kib: Option<u64>,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
struct ClusterRun {
    scenario: String,
    server: String,
    run: usize,
    nodes: usize,
    connected: Vec<usize>,
    connect_errors: usize,
    first_connect_error: Option<String>,
    all_ready: bool,
    sent: u64,
    publish_errors: u64,
    expected: u64,
    delivered: u64,
    delivery_ratio: f64,
    cross_expected: u64,
    cross_delivered: u64,
    gaps: u64,
    reorders: u64,
    other_messages: u64,
    closed_by_server: BTreeMap<String, u64>,
    publish_secs: f64,
    latency_ms: Latency,
    cross_latency_ms: Option<Latency>,
    processes: Vec<Process>,
    cpu_us_per_delivery: Option<f64>,
    user_us_per_delivery: Option<f64>,
    sys_us_per_delivery: Option<f64>,
    exact: bool,
}

async fn run_once(
    load: &Load,
    kind: Kind,
    run: usize,
    concurrency: usize,
) -> Result<ClusterRun, String> {
    let redis = match kind {
        Kind::WshubPubSub => None,
        _ => Some(Redis::start().await?),
    };
    let node_count = if redis.is_some() { 2 } else { 1 };
    let mut nodes = start_nodes(kind, node_count, redis.as_ref())?;
    let addrs: Vec<SocketAddr> = nodes.iter().map(Target::addr).collect();
    let tally = Arc::new(Tally {
        all: Counters::new(),
        cross: Counters::new(),
        publish_errors: AtomicU64::new(0),
        publishing: AtomicBool::new(false),
    });
    let stop = CancellationToken::new();

    // Subscribers, client i on node i mod nodes.
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let fleet = client::fleet_number();
    let mut handshakes = JoinSet::new();
    for i in 0..load.clients {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        let (addr, source) = (addrs[i % node_count], client::source_addr(fleet, i));
        handshakes.spawn(async move {
            let result = open(kind, addr, source).await;
            drop(permit);
            (i, result)
        });
    }
    let mut connected = vec![0; node_count];
    let (mut connect_errors, mut first_connect_error) = (0, None);
    let mut readers = JoinSet::new();
    while let Some(joined) = handshakes.join_next().await {
        match joined.map_err(|e| e.to_string())? {
            (i, Ok(ws)) => {
                let node = i % node_count;
                connected[node] += 1;
                let (tally, stop) = (tally.clone(), stop.clone());
                readers.spawn(subscriber(
                    kind,
                    ws,
                    node == 1,
                    load.publishers,
                    tally,
                    stop,
                ));
            }
            (_, Err(err)) => {
                connect_errors += 1;
                first_connect_error.get_or_insert(err);
            }
        }
    }
    let receivers: usize = connected.iter().sum();
    if receivers == 0 {
        return Err(format!("no client connected: {first_connect_error:?}"));
    }
    // Publishers, all on node 1, from addresses of their own.
    let fleet = client::fleet_number();
    let mut sinks: Vec<Sink> = Vec::new();
    for p in 0..load.publishers {
        let url = format!("ws://{}{}", addrs[0], kind.path());
        let ws = client::open(addrs[0], &url, client::source_addr(fleet, p), None).await?;
        let (sink, source) = ws.split();
        readers.spawn(publisher_reader(kind, source, tally.clone()));
        sinks.push(sink);
    }
    // Warm-up: until every subscriber has seen one (subscriptions in place
    // on both nodes and in Redis).
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut all_ready = false;
    while Instant::now() < deadline {
        if tally.all.ready.load(Ordering::Relaxed) >= receivers as u64 {
            all_ready = true;
            break;
        }
        let frame = publish_frame(kind, 0, r#"{"w":1}"#);
        if sinks[0].send(frame).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let names: Vec<String> = (1..=node_count)
        .map(|n| format!("node {n}"))
        .chain(redis.as_ref().map(|_| "redis".to_string()))
        .collect();
    let stats = |nodes: &mut Vec<Target>| -> Vec<ServerStats> {
        nodes
            .iter_mut()
            .map(Target::stats)
            .chain(redis.as_ref().map(Redis::stats))
            .collect()
    };
    let before = stats(&mut nodes);

    // Publishing: each publisher `rate` msg/s on a fixed schedule,
    // staggered evenly; `t` is the scheduled send time.
    tally.publishing.store(true, Ordering::Relaxed);
    let messages = (load.rate * load.duration).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / load.rate.max(1e-3));
    let count = sinks.len() as u32;
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let limit = start + interval * messages as u32 + Duration::from_secs(10);
    let began = Instant::now();
    let mut tasks = JoinSet::new();
    for (p, mut sink) in sinks.drain(..).enumerate() {
        let (tally, size) = (tally.clone(), load.payload);
        let offset = interval * p as u32 / count;
        tasks.spawn(async move {
            let publish = async {
                for seq in 0..messages {
                    let at = start + offset + interval * seq as u32;
                    tokio::time::sleep_until(at).await;
                    let late = tokio::time::Instant::now().saturating_duration_since(at);
                    let sent_ns = client::now_ns().saturating_sub(late.as_nanos() as u64);
                    let data = stamp(p, seq, sent_ns, size);
                    if sink
                        .send(publish_frame(kind, seq + 1, &data))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tally.all.sent.fetch_add(1, Ordering::Relaxed);
                }
            };
            let _ = tokio::time::timeout_at(limit, publish).await;
            sink
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok(sink) = joined {
            sinks.push(sink);
        }
    }
    let publish_secs = began.elapsed().as_secs_f64();
    let sent = tally.all.sent.load(Ordering::Relaxed);
    let expected = sent * receivers as u64;
    // Drain: every delivery in, 3 s without progress, or the phase limit.
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut last = (u64::MAX, Instant::now());
    loop {
        let delivered = tally.all.delivered.load(Ordering::Relaxed);
        if delivered >= expected || Instant::now() >= deadline {
            break;
        }
        if delivered != last.0 {
            last = (delivered, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = stats(&mut nodes);
    stop.cancel();
    drop(sinks);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while readers.join_next().await.is_some() {}
    })
    .await;
    readers.abort_all();
    drop(nodes);
    drop(redis);

    let delivered = tally.all.delivered.load(Ordering::Relaxed);
    let cross_delivered = tally.cross.delivered.load(Ordering::Relaxed);
    let diff = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
    let processes: Vec<Process> = names
        .into_iter()
        .zip(before.iter().zip(&after))
        .map(|(name, (a, b))| Process {
            name,
            cpu_us: diff(a.cpu_us, b.cpu_us),
            user_us: diff(a.user_us, b.user_us),
            rss_connected_kib: a.rss_kib,
            rss_end_kib: b.rss_kib,
        })
        .collect();
    let sum = |f: fn(&Process) -> Option<u64>| -> Option<u64> {
        processes.iter().map(f).sum::<Option<u64>>()
    };
    let per = |us: Option<u64>| {
        us.filter(|_| delivered > 0)
            .map(|us| us as f64 / delivered as f64)
    };
    let (cpu, user) = (sum(|p| p.cpu_us), sum(|p| p.user_us));
    let publish_errors = tally.publish_errors.load(Ordering::Relaxed);
    let gaps = tally.all.gaps.load(Ordering::Relaxed);
    let reorders = tally.all.reorders.load(Ordering::Relaxed);
    let cross_hist = tally.cross.latency();
    Ok(ClusterRun {
        scenario: load.name.clone(),
        server: label(kind),
        run,
        nodes: node_count,
        cross_expected: sent * connected.get(1).copied().unwrap_or(0) as u64,
        connected,
        connect_errors,
        first_connect_error,
        all_ready,
        sent,
        publish_errors,
        expected,
        delivered,
        delivery_ratio: if expected == 0 {
            0.0
        } else {
            delivered as f64 / expected as f64
        },
        cross_delivered,
        gaps,
        reorders,
        other_messages: tally.all.other.load(Ordering::Relaxed),
        closed_by_server: tally.all.closed(),
        publish_secs,
        latency_ms: Latency::of(&tally.all.latency()),
        cross_latency_ms: (!cross_hist.is_empty()).then(|| Latency::of(&cross_hist)),
        processes,
        cpu_us_per_delivery: per(cpu),
        user_us_per_delivery: per(user),
        sys_us_per_delivery: per(cpu.zip(user).map(|(c, u)| c.saturating_sub(u))),
        exact: expected > 0
            && delivered == expected
            && gaps == 0
            && reorders == 0
            && publish_errors == 0
            && connect_errors == 0,
    })
}

// ------------------------------------------------------------------ summary

/// Medians of one kind's runs.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    server: String,
    runs: usize,
    exact_runs: usize,
    delivery_ratio: f64,
    p50_ms: f64,
    p99_ms: f64,
    cross_p50_ms: Option<f64>,
    cross_p99_ms: Option<f64>,
    cpu_us_per_delivery: Option<f64>,
    user_us_per_delivery: Option<f64>,
    sys_us_per_delivery: Option<f64>,
    /// Per process (node 1, node 2, Redis): CPU µs per delivery.
    process_cpu_us_per_delivery: Vec<(String, f64)>,
    /// Per process: RSS at the end, MiB.
    process_rss_mib: Vec<(String, f64)>,
}

/// Side-by-side ratios, per round and their median.
#[derive(Debug, Clone, Default, Serialize)]
struct Comparison {
    cpu_wshub_over_naive: Vec<f64>,
    cpu_wshub_over_naive_median: Option<f64>,
    cross_p99_minus_single_p99_ms: Vec<f64>,
    cross_p99_minus_single_p99_median_ms: Option<f64>,
}

fn opt_median(values: Vec<f64>) -> Option<f64> {
    Some(median(values)).filter(|m| m.is_finite())
}

fn summarize(runs: &[ClusterRun]) -> Vec<Summary> {
    let mut servers: Vec<String> = Vec::new();
    for r in runs {
        if !servers.contains(&r.server) {
            servers.push(r.server.clone());
        }
    }
    servers
        .into_iter()
        .map(|server| {
            let mine: Vec<&ClusterRun> = runs.iter().filter(|r| r.server == server).collect();
            let med = |f: &dyn Fn(&ClusterRun) -> Option<f64>| {
                opt_median(mine.iter().filter_map(|r| f(r)).collect())
            };
            let names: Vec<String> = mine[0].processes.iter().map(|p| p.name.clone()).collect();
            let process = |i: usize, f: &dyn Fn(&ClusterRun, &Process) -> Option<f64>| {
                med(&|r| r.processes.get(i).and_then(|p| f(r, p)))
            };
            Summary {
                runs: mine.len(),
                exact_runs: mine.iter().filter(|r| r.exact).count(),
                delivery_ratio: med(&|r| Some(r.delivery_ratio)).unwrap_or(f64::NAN),
                p50_ms: med(&|r| Some(r.latency_ms.p50)).unwrap_or(f64::NAN),
                p99_ms: med(&|r| Some(r.latency_ms.p99)).unwrap_or(f64::NAN),
                cross_p50_ms: med(&|r| r.cross_latency_ms.map(|l| l.p50)),
                cross_p99_ms: med(&|r| r.cross_latency_ms.map(|l| l.p99)),
                cpu_us_per_delivery: med(&|r| r.cpu_us_per_delivery),
                user_us_per_delivery: med(&|r| r.user_us_per_delivery),
                sys_us_per_delivery: med(&|r| r.sys_us_per_delivery),
                process_cpu_us_per_delivery: names
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| {
                        let v = process(i, &|r, p| {
                            Some(p.cpu_us? as f64 / r.delivered.max(1) as f64)
                        })?;
                        Some((n.clone(), v))
                    })
                    .collect(),
                process_rss_mib: names
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| {
                        let v = process(i, &|_, p| Some(p.rss_end_kib? as f64 / 1024.0))?;
                        Some((n.clone(), v))
                    })
                    .collect(),
                server,
            }
        })
        .collect()
}

fn compare(runs: &[ClusterRun]) -> Comparison {
    let of = |kind: Kind, run: usize| {
        runs.iter()
            .find(|r| r.server == label(kind) && r.run == run)
    };
    let rounds = runs.iter().map(|r| r.run + 1).max().unwrap_or(0);
    let mut c = Comparison::default();
    for run in 0..rounds {
        let (w, n, s) = (
            of(Kind::WshubRedis, run),
            of(Kind::NaiveRedis, run),
            of(Kind::WshubPubSub, run),
        );
        if let (Some(w), Some(n)) = (w, n) {
            if let (Some(a), Some(b)) = (w.cpu_us_per_delivery, n.cpu_us_per_delivery) {
                c.cpu_wshub_over_naive.push(a / b);
            }
        }
        if let (Some(w), Some(s)) = (w, s) {
            if let Some(cross) = w.cross_latency_ms {
                c.cross_p99_minus_single_p99_ms
                    .push(cross.p99 - s.latency_ms.p99);
            }
        }
    }
    c.cpu_wshub_over_naive_median = opt_median(c.cpu_wshub_over_naive.clone());
    c.cross_p99_minus_single_p99_median_ms = opt_median(c.cross_p99_minus_single_p99_ms.clone());
    c
}

fn print_table(summaries: &[Summary], comparison: &Comparison) {
    println!(
        "{:<22} {:>5} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8}  {:<34} RSS MiB",
        "server",
        "exact",
        "ratio",
        "p50 ms",
        "p99 ms",
        "x-p50 ms",
        "x-p99 ms",
        "µs/deliv",
        "user µs",
        "sys µs",
        "µs/deliv per process"
    );
    for s in summaries {
        let each = |v: &[(String, f64)], digits: usize| {
            v.iter()
                .map(|(n, x)| format!("{n} {x:.digits$}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{:<22} {:>5} {:>7.4} {:>8.2} {:>8.2} {:>9} {:>9} {:>9} {:>8} {:>8}  {:<34} {}",
            s.server,
            format!("{}/{}", s.exact_runs, s.runs),
            s.delivery_ratio,
            s.p50_ms,
            s.p99_ms,
            fmt_opt(s.cross_p50_ms, 2),
            fmt_opt(s.cross_p99_ms, 2),
            fmt_opt(s.cpu_us_per_delivery, 2),
            fmt_opt(s.user_us_per_delivery, 2),
            fmt_opt(s.sys_us_per_delivery, 2),
            each(&s.process_cpu_us_per_delivery, 2),
            each(&s.process_rss_mib, 1),
        );
    }
    if let Some(m) = comparison.cpu_wshub_over_naive_median {
        println!(
            "  CPU per delivery (nodes + Redis), wshub-redis / naive-redis: median {m:.2} (rounds {})",
            rounds(&comparison.cpu_wshub_over_naive)
        );
    }
    if let Some(m) = comparison.cross_p99_minus_single_p99_median_ms {
        println!(
            "  wshub-redis cross-node p99 − single-node p99: median {m:+.2} ms (rounds {})",
            rounds(&comparison.cross_p99_minus_single_p99_ms)
        );
    }
}

fn rounds(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn write_json(path: &std::path::Path, value: &impl Serialize) {
    let written = std::fs::create_dir_all(path.parent().unwrap_or(path))
        .and_then(|()| std::fs::write(path, serde_json::to_vec_pretty(value).unwrap_or_default()));
    match written {
        Ok(()) => println!("  wrote {}", path.display()),
        Err(err) => eprintln!("  could not write {}: {err}", path.display()),
    }
}

#[derive(Serialize)]
struct Report<'a> {
    scenario: &'a Load,
    machine: Machine,
    runs: &'a [ClusterRun],
    summary: &'a [Summary],
    comparison: &'a Comparison,
}

/// Runs the named cluster scenarios; whether one failed (a run that could
/// not be made, or `cluster-smoke` delivery that was not exact).
pub async fn run(names: &[&str], args: &Args, file_limit: u64) -> bool {
    let mut failed = false;
    for &name in names {
        if name == "cluster-restart" {
            failed |= restart(args, file_limit).await;
            continue;
        }
        let load = load(name, args);
        println!(
            "\n== {name}: 2 nodes on Redis, {} clients over the nodes, {} publisher(s) on node 1 \
             × {} msg/s × {} s, {} B ==",
            load.clients, load.publishers, load.rate, load.duration, load.payload
        );
        let smoke = name == "cluster-smoke";
        let runs_wanted = if smoke { 1 } else { args.runs.max(1) };
        let mut runs = Vec::new();
        for run in 0..runs_wanted {
            for &kind in &load.kinds {
                match run_once(&load, kind, run, args.concurrency).await {
                    Ok(r) => {
                        println!(
                            "  {:<22} run {}: ratio {:.4}, p99 {:.2} ms, cross-node p99 {} ms, {} µs/delivery",
                            r.server,
                            run + 1,
                            r.delivery_ratio,
                            r.latency_ms.p99,
                            fmt_opt(r.cross_latency_ms.map(|l| l.p99), 2),
                            fmt_opt(r.cpu_us_per_delivery, 2)
                        );
                        runs.push(r);
                    }
                    Err(err) => {
                        eprintln!("  {} run {}: {err}", label(kind), run + 1);
                        failed = true;
                    }
                }
            }
        }
        let summary = summarize(&runs);
        let comparison = compare(&runs);
        println!();
        print_table(&summary, &comparison);
        write_json(
            &args.out.join(format!("{name}.json")),
            &Report {
                scenario: &load,
                machine: Machine {
                    cores: cores(),
                    file_limit,
                },
                runs: &runs,
                summary: &summary,
                comparison: &comparison,
            },
        );
        if smoke {
            let exact = runs.iter().filter(|r| r.exact).count();
            if exact < load.kinds.len() || load.kinds.is_empty() {
                eprintln!(
                    "cluster-smoke: delivery exact in {exact} of {} run(s)",
                    load.kinds.len()
                );
                failed = true;
            }
        }
    }
    failed
}

// ------------------------------------------------------------------ restart

/// What the restart's clients share.
struct Probes {
    /// Per client: the highest probe it received.
    seen: Vec<AtomicU64>,
    /// Closes and errors the clients saw, by code.
    closed: std::sync::Mutex<BTreeMap<String, u64>>,
    reconnects: AtomicU64,
}

/// One measuring client: subscribes on `addr`, records probes, and when its
/// connection closes reconnects and subscribes again (without `since`)
/// every 20 ms until it succeeds, until `stop`.
async fn probe_client(
    addr: SocketAddr,
    i: usize,
    fleet: u8,
    probes: Arc<Probes>,
    stop: CancellationToken,
) {
    let source = client::source_addr(fleet, i);
    let mut first = true;
    while !stop.is_cancelled() {
        let ws = tokio::select! {
            _ = stop.cancelled() => return,
            ws = open(Kind::WshubRedis, addr, source) => ws,
        };
        let Ok(mut ws) = ws else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        if !first {
            probes.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let why = loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                msg = ws.next() => msg,
            };
            match msg {
                Some(Ok(Message::Text(text))) => {
                    if let Frame::Data(Data { probe: Some(n), .. }) =
                        parse(Kind::WshubRedis, text.as_str())
                    {
                        probes.seen[i].fetch_max(n, Ordering::Relaxed);
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    break format!("close {}", frame.map_or(1005, |f| u16::from(f.code)));
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => break format!("error: {err}"),
                None => break "eof".to_string(),
            }
        };
        *probes.closed.lock().unwrap().entry(why).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One restart's figures.
#[derive(Debug, Clone, Serialize)]
struct RestartRun {
    outage_secs: f64,
    /// From the first PING answer until a probe reached a client on each node.
    both_nodes_secs: Option<f64>,
    /// Until every client had a probe sent after the restart.
    every_client_secs: Option<f64>,
    reconnects: u64,
    closed: BTreeMap<String, u64>,
}

async fn restart_once(outage: Duration, clients: usize) -> Result<RestartRun, String> {
    let mut redis = Redis::start().await?;
    let nodes = start_nodes(Kind::WshubRedis, 2, Some(&redis))?;
    let addrs: Vec<SocketAddr> = nodes.iter().map(Target::addr).collect();
    let probes = Arc::new(Probes {
        seen: (0..clients).map(|_| AtomicU64::new(0)).collect(),
        closed: std::sync::Mutex::default(),
        reconnects: AtomicU64::new(0),
    });
    let stop = CancellationToken::new();
    let fleet = client::fleet_number();
    let mut tasks = JoinSet::new();
    for i in 0..clients {
        let (probes, stop) = (probes.clone(), stop.clone());
        tasks.spawn(probe_client(addrs[i % 2], i, fleet, probes, stop));
    }
    // The publisher on node 1; its replies are read and dropped.
    let url = format!("ws://{}{}", addrs[0], Kind::WshubRedis.path());
    let ws = client::open(
        addrs[0],
        &url,
        client::source_addr(client::fleet_number(), 0),
        None,
    )
    .await?;
    let (mut sink, mut source) = ws.split();
    tasks.spawn(async move { while let Some(Ok(_)) = source.next().await {} });
    let n = AtomicU64::new(0);
    // Probes every 20 ms from `floor` on until `done` or `limit`; when each
    // condition first held.
    let mut probe_until = async |floor: u64, limit: Duration| -> (Option<f64>, Option<f64>) {
        let began = Instant::now();
        let (mut both, mut every) = (None, None);
        while began.elapsed() < limit && every.is_none() {
            let n = n.fetch_add(1, Ordering::Relaxed) + 1;
            let data = format!(r#"{{"probe":{n}}}"#);
            let sent = tokio::time::timeout(
                Duration::from_secs(1),
                sink.send(publish_frame(Kind::WshubRedis, n, &data)),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            let got = |node: usize| {
                (node..clients)
                    .step_by(2)
                    .filter(|&i| probes.seen[i].load(Ordering::Relaxed) > floor)
                    .count()
            };
            let (a, b) = (got(0), got(1));
            if both.is_none() && a > 0 && b > 0 {
                both = Some(began.elapsed().as_secs_f64());
            }
            if a + b == clients {
                every = Some(began.elapsed().as_secs_f64());
            }
        }
        (both, every)
    };
    // Warm: every client has a probe.
    let (_, warm) = probe_until(0, PHASE_LIMIT).await;
    if warm.is_none() {
        stop.cancel();
        return Err("the clients did not all get a probe before the restart".to_string());
    }
    redis.kill();
    tokio::time::sleep(outage).await;
    let floor = n.load(Ordering::Relaxed);
    // `spawn` returns at the first PING answer.
    redis.spawn().await?;
    let (both, every) = probe_until(floor, PHASE_LIMIT).await;
    stop.cancel();
    drop(sink);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    drop(nodes);
    drop(redis);
    Ok(RestartRun {
        outage_secs: outage.as_secs_f64(),
        both_nodes_secs: both,
        every_client_secs: every,
        reconnects: probes.reconnects.load(Ordering::Relaxed),
        closed: probes.closed.lock().unwrap().clone(),
    })
}

async fn restart(args: &Args, file_limit: u64) -> bool {
    let clients = args.clients.unwrap_or(100).max(2);
    let reps = args.runs.max(3);
    println!(
        "\n== cluster-restart: 2 wshub-redis nodes, {clients} subscribed clients, Redis SIGKILLed \
         and restarted on its port, {reps} repetitions ==",
    );
    let mut failed = false;
    let mut runs = Vec::new();
    for outage in [Duration::ZERO, Duration::from_secs(5)] {
        for rep in 0..reps {
            match restart_once(outage, clients).await {
                Ok(r) => {
                    println!(
                        "  down {:.0} s, run {}: both nodes {} s, every client {} s, {} reconnects, {:?}",
                        r.outage_secs,
                        rep + 1,
                        fmt_opt(r.both_nodes_secs, 3),
                        fmt_opt(r.every_client_secs, 3),
                        r.reconnects,
                        r.closed
                    );
                    failed |= r.every_client_secs.is_none();
                    runs.push(r);
                }
                Err(err) => {
                    eprintln!("  down {} s, run {}: {err}", outage.as_secs(), rep + 1);
                    failed = true;
                }
            }
        }
    }
    let mut summary = BTreeMap::new();
    for outage in [0.0, 5.0] {
        let mine: Vec<&RestartRun> = runs.iter().filter(|r| r.outage_secs == outage).collect();
        let both = opt_median(mine.iter().filter_map(|r| r.both_nodes_secs).collect());
        let every = opt_median(mine.iter().filter_map(|r| r.every_client_secs).collect());
        println!(
            "  down {outage:.0} s: from the first PING answer, median {} s until both nodes \
             deliver, {} s until every client does",
            fmt_opt(both, 3),
            fmt_opt(every, 3)
        );
        summary.insert(
            format!("down_{outage:.0}s"),
            serde_json::json!({"both_nodes_secs": both, "every_client_secs": every, "runs": mine.len()}),
        );
    }
    write_json(
        &args.out.join("cluster-restart.json"),
        &serde_json::json!({
            "scenario": "cluster-restart",
            "clients": clients,
            "machine": Machine { cores: cores(), file_limit },
            "runs": runs,
            "summary": summary,
        }),
    );
    failed
}
