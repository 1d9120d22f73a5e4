//! Two nodes on one Redis: wshub's `RedisBroker` against the pattern people
//! write by hand, same load, same run.
//!
//! ```text
//! cargo bench --features redis --bench cluster                   # cluster-1k, cluster-high, restart; 3 rounds
//! cargo bench --features redis --bench cluster -- cluster-1k --rounds 5
//! cargo bench --features redis --bench cluster -- smoke          # tiny; exits 1 unless delivery is exact
//! ```
//!
//! Every run starts its own `redis-server` on a free loopback port (`--save
//! '' --appendonly no`) and two node processes (this binary, re-run with
//! `--serve`), so that each one's CPU time is its own. Clients run here,
//! spread evenly over the two nodes; the publishers are on node 1, so the
//! clients of node 2 are the cross-node ones. The kinds:
//!
//! - `wshub-redis`: `PubSub` on `RedisBroker` serving the pub/sub protocol
//!   (`docs/PROTOCOL.md`); clients subscribe to one topic, publishers
//!   publish on it.
//! - `naive-redis`: each node keeps a locked list of its sessions (one
//!   writer task each, one flush per message), PUBLISHes every message a
//!   client sends on one Redis channel, and forwards whatever its one
//!   subscription delivers to every session in the list. The text is shared
//!   between the sessions, not copied per session.
//! - `wshub-single` (cluster-1k only): one wshub node on its embedded broker
//!   with every client: the single-node p99 the cross-node one is held to.
//!
//! Reported per kind, medians over the rounds (kinds alternate within each
//! round): delivery ratio, p50/p99 latency (publish to receipt, all clients
//! and node 2's alone), CPU µs per delivery summed over both nodes and Redis
//! (user and system apart), and each process's RSS. `restart` SIGKILLs Redis
//! under two `wshub-redis` nodes on the default `RedisConfig`, starts it
//! again at once and after 5 s, and times from its first PING answer until a
//! publish on node 1 reaches fresh subscribers on both nodes.

#[path = "load/sys.rs"]
#[allow(dead_code)]
mod sys;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// The two patterns, and the single-node reference.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    WshubRedis,
    NaiveRedis,
    WshubSingle,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::WshubRedis => "wshub-redis",
            Kind::NaiveRedis => "naive-redis",
            Kind::WshubSingle => "wshub-single",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Kind::NaiveRedis => "/ws",
            _ => "/pubsub",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Load {
    name: &'static str,
    clients: usize,
    publishers: usize,
    rate: u64,
    secs: u64,
    payload: usize,
}

const LOADS: [Load; 3] = [
    Load {
        name: "cluster-1k",
        clients: 1000,
        publishers: 1,
        rate: 100,
        secs: 10,
        payload: 64,
    },
    Load {
        name: "cluster-high",
        clients: 200,
        publishers: 4,
        rate: 500,
        secs: 10,
        payload: 64,
    },
    Load {
        name: "smoke",
        clients: 20,
        publishers: 1,
        rate: 50,
        secs: 2,
        payload: 64,
    },
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--serve") {
        serve(&args[1], &args[2]);
        return;
    }
    let _ = sys::raise_file_limit();
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(3usize);
    let named: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--") && a.parse::<usize>().is_err())
        .map(String::as_str)
        .collect();
    // `cargo bench` passes `--bench`; no name: the full set.
    let wanted = |name: &str| {
        if named.is_empty() {
            name != "smoke"
        } else {
            named.contains(&name)
        }
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut failed = false;
    for load in LOADS.iter().filter(|l| wanted(l.name)) {
        let smoke = load.name == "smoke";
        let rounds = if smoke { 1 } else { rounds };
        let mut kinds = vec![Kind::WshubRedis, Kind::NaiveRedis];
        if load.name == "cluster-1k" {
            kinds.push(Kind::WshubSingle);
        }
        let mut results: Vec<(Kind, Vec<Figures>)> = kinds.iter().map(|k| (*k, vec![])).collect();
        for round in 0..rounds {
            for (kind, runs) in results.iter_mut() {
                let figures = runtime.block_on(run(*kind, *load));
                eprintln!(
                    "{} round {}: {} {figures:?}",
                    load.name,
                    round + 1,
                    kind.name()
                );
                runs.push(figures);
            }
        }
        report(load, &results);
        if smoke {
            failed |= results
                .iter()
                .any(|(_, runs)| runs.iter().any(|f| f.ratio != 1.0));
        }
    }
    if wanted("restart") {
        println!("\n## restart (two wshub-redis nodes, default RedisConfig)");
        for outage in [0, 5] {
            let secs: Vec<f64> = (0..rounds.max(3))
                .map(|_| runtime.block_on(restart(Duration::from_secs(outage))))
                .collect();
            println!(
                "Redis down {outage} s: seconds from its first PING answer to delivery on both nodes: \
                 median {:.3} (runs {secs:.3?})",
                median(secs.clone())
            );
        }
    }
    if failed {
        eprintln!("smoke: a delivery ratio was not 1.0");
        std::process::exit(1);
    }
}

// ------------------------------------------------------------------ servers

/// The child: serves `kind` on a free loopback port, prints `addr ADDR`,
/// exits when stdin closes.
fn serve(kind: &str, redis: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = match kind {
            "wshub-redis" | "wshub-single" => {
                let pubsub = if kind == "wshub-redis" {
                    let broker = wshub::RedisBroker::connect(redis, wshub::RedisConfig::default())
                        .await
                        .expect("connect to Redis");
                    wshub::PubSub::with_broker(wshub::PubSubConfig::default(), Arc::new(broker))
                } else {
                    wshub::PubSub::new(wshub::PubSubConfig::default())
                }
                .unwrap();
                let server = wshub::Server::new()
                    .config(wshub::Config::default().publish_rate(None))
                    .pubsub("/pubsub", &pubsub);
                tokio::spawn(async move {
                    let _ = server.serve(listener, std::future::pending::<()>()).await;
                })
            }
            _ => tokio::spawn(naive(listener, redis.to_owned())),
        };
        println!("addr {addr}");
        // Until the benchmark closes stdin.
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await
        .unwrap();
        task.abort();
    });
}

/// The hand-written pattern: a locked list of sessions, one PUBLISH per
/// message received, one subscription whose messages go to every session.
async fn naive(listener: tokio::net::TcpListener, redis: String) {
    let client = redis::Client::open(redis).unwrap();
    let publish = client.get_multiplexed_async_connection().await.unwrap();
    let sessions: Arc<Mutex<Vec<mpsc::UnboundedSender<Message>>>> = Arc::default();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("naive").await.unwrap();
    let list = sessions.clone();
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let Ok(text) = String::from_utf8(msg.get_payload_bytes().to_vec()) else {
                continue;
            };
            let msg = Message::text(text);
            let mut list = list.lock().unwrap();
            list.retain(|tx| tx.send(msg.clone()).is_ok());
        }
    });
    while let Ok((stream, _)) = listener.accept().await {
        let (sessions, mut publish) = (sessions.clone(), publish.clone());
        tokio::spawn(async move {
            let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            let (mut write, mut read) = ws.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
            sessions.lock().unwrap().push(tx);
            let writer = tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    if write.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            while let Some(Ok(msg)) = read.next().await {
                if let Message::Text(text) = msg {
                    let _: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                        .arg("naive")
                        .arg(text.as_str())
                        .query_async(&mut publish)
                        .await;
                }
            }
            writer.abort();
        });
    }
}

/// A child process serving one node.
struct Node {
    child: Child,
    addr: SocketAddr,
}

impl Node {
    fn start(kind: Kind, redis: &str) -> Node {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--serve", kind.name(), redis])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("addr ")
            .unwrap_or_else(|| panic!("node said {line:?}"))
            .parse()
            .unwrap();
        Node { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `redis-server` on a free loopback port.
struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Redis { child: None, port };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut reply = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok()
            && s.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// User and system CPU µs of `pid`, from `/proc/PID/stat`.
fn cpu(pid: u32) -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0, 0);
    };
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (f[11] * 10_000, f[12] * 10_000)
}

// ------------------------------------------------------------------ clients

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr, kind: Kind) -> Ws {
    let url = format!("ws://{addr}{}", kind.path());
    for _ in 0..50 {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await {
            return ws;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cannot connect to {url}");
}

/// Subscribes (pub/sub kinds) and waits for the reply.
async fn subscribe(ws: &mut Ws, kind: Kind) {
    if kind == Kind::NaiveRedis {
        return;
    }
    ws.send(Message::text(
        r#"{"id":1,"op":"subscribe","topic":"bench"}"#,
    ))
    .await
    .unwrap();
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(text) = msg {
            if text.contains(r#""id":1"#) {
                assert!(text.contains(r#""ok":true"#), "{text}");
                return;
            }
        }
    }
    panic!("no subscribe reply");
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The send time carried in a delivery, if it is one.
fn sent_at(text: &str, kind: Kind) -> Option<u64> {
    let value: Value = serde_json::from_str(text).ok()?;
    let data = match kind {
        Kind::NaiveRedis => &value,
        _ if value["op"] == "message" => &value["data"],
        _ => return None,
    };
    data["t"].as_u64()
}

#[derive(Debug, Clone, Default)]
struct Figures {
    ratio: f64,
    p50_ms: f64,
    p99_ms: f64,
    p99_node2_ms: f64,
    user_us: f64,
    sys_us: f64,
    /// User + system µs per delivery of each process: nodes, then Redis.
    each_us: Vec<f64>,
    rss_kib: Vec<u64>,
}

async fn run(kind: Kind, load: Load) -> Figures {
    let redis = Redis::start();
    let nodes: Vec<Node> = match kind {
        Kind::WshubSingle => vec![Node::start(kind, &redis.url())],
        _ => vec![
            Node::start(kind, &redis.url()),
            Node::start(kind, &redis.url()),
        ],
    };
    let all = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let node2 = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let received = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for c in 0..load.clients {
        let node = c % nodes.len();
        let mut ws = connect(nodes[node].addr, kind).await;
        subscribe(&mut ws, kind).await;
        let (all, node2, received) = (all.clone(), node2.clone(), received.clone());
        readers.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(text) = msg else { continue };
                if let Some(t) = sent_at(&text, kind) {
                    let us = now_micros().saturating_sub(t).max(1);
                    received.fetch_add(1, Ordering::Relaxed);
                    let _ = all.lock().unwrap().record(us);
                    if node == 1 {
                        let _ = node2.lock().unwrap().record(us);
                    }
                }
            }
        }));
    }
    let mut publishers = Vec::new();
    for _ in 0..load.publishers {
        // The naive pattern's publisher is a session too: it reads what it
        // is sent, uncounted, so that its writer never backs up.
        let (write, mut read) = connect(nodes[0].addr, kind).await.split();
        tokio::spawn(async move { while let Some(Ok(_)) = read.next().await {} });
        publishers.push(write);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pids: Vec<u32> = nodes.iter().map(Node::pid).chain([redis.pid()]).collect();
    let before: Vec<(u64, u64)> = pids.iter().map(|p| cpu(*p)).collect();
    let start = received.load(Ordering::Relaxed);
    let sent = Arc::new(AtomicU64::new(0));
    let pad = "x".repeat(load.payload.saturating_sub(40));
    let mut tasks = Vec::new();
    for (p, mut write) in publishers.into_iter().enumerate() {
        let (sent, pad) = (sent.clone(), pad.clone());
        tasks.push(tokio::spawn(async move {
            let every = Duration::from_micros(1_000_000 / load.rate);
            let total = load.rate * load.secs;
            let t0 = tokio::time::Instant::now();
            for s in 0..total {
                tokio::time::sleep_until(t0 + every * s as u32).await;
                let data = json!({"t": now_micros(), "p": p, "s": s, "x": pad});
                let text = match kind {
                    Kind::NaiveRedis => data.to_string(),
                    _ => json!({"op": "publish", "topic": "bench", "data": data}).to_string(),
                };
                if write.send(Message::text(text)).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            write
        }));
    }
    let mut writers = Vec::new();
    for task in tasks {
        writers.push(task.await.unwrap());
    }
    let expected = sent.load(Ordering::Relaxed) * load.clients as u64;
    // Drain: until every delivery is in, or 3 s without progress.
    let mut last = (received.load(Ordering::Relaxed), Instant::now());
    loop {
        let got = received.load(Ordering::Relaxed) - start;
        if got >= expected || last.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if received.load(Ordering::Relaxed) != last.0 {
            last = (received.load(Ordering::Relaxed), Instant::now());
        }
    }
    let after: Vec<(u64, u64)> = pids.iter().map(|p| cpu(*p)).collect();
    let got = received.load(Ordering::Relaxed) - start;
    let rss_kib = pids
        .iter()
        .map(|p| sys::rss_kib(Some(*p)).unwrap_or(0))
        .collect();
    for reader in readers {
        reader.abort();
    }
    drop(writers);
    let (user, system) = before
        .iter()
        .zip(&after)
        .fold((0, 0), |(u, s), (b, a)| (u + a.0 - b.0, s + a.1 - b.1));
    let all = all.lock().unwrap();
    let node2 = node2.lock().unwrap();
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Figures {
        ratio: got as f64 / expected.max(1) as f64,
        p50_ms: ms(&all, 0.5),
        p99_ms: ms(&all, 0.99),
        p99_node2_ms: if node2.is_empty() {
            f64::NAN
        } else {
            ms(&node2, 0.99)
        },
        user_us: user as f64 / got.max(1) as f64,
        sys_us: system as f64 / got.max(1) as f64,
        each_us: before
            .iter()
            .zip(&after)
            .map(|(b, a)| (a.0 + a.1 - b.0 - b.1) as f64 / got.max(1) as f64)
            .collect(),
        rss_kib,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn report(load: &Load, results: &[(Kind, Vec<Figures>)]) {
    println!(
        "\n## {} ({} clients over the nodes, {} publisher(s) × {} msg/s on node 1, {} B, {} s; medians of {})",
        load.name,
        load.clients,
        load.publishers,
        load.rate,
        load.payload,
        load.secs,
        results[0].1.len()
    );
    println!(
        "| kind | delivery ratio | p50 ms | p99 ms | p99 node 2 ms | CPU µs/delivery user + sys (nodes + Redis) | of which node 1, node 2, Redis | RSS KiB (nodes, Redis) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let med = |runs: &[Figures], f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    for (kind, runs) in results {
        println!(
            "| {} | {:.4} | {:.2} | {:.2} | {:.2} | {:.2} + {:.2} = {:.2} | {} | {:?} |",
            kind.name(),
            med(runs, |f| f.ratio),
            med(runs, |f| f.p50_ms),
            med(runs, |f| f.p99_ms),
            med(runs, |f| f.p99_node2_ms),
            med(runs, |f| f.user_us),
            med(runs, |f| f.sys_us),
            med(runs, |f| f.user_us + f.sys_us),
            (0..runs[0].each_us.len())
                .map(|i| format!("{:.2}", median(runs.iter().map(|f| f.each_us[i]).collect())))
                .collect::<Vec<_>>()
                .join(", "),
            runs.last().map(|f| f.rss_kib.clone()).unwrap_or_default()
        );
    }
    if let [(_, w), (_, n), ..] = results {
        // Per round, side by side: wshub-redis / naive-redis.
        let ratios: Vec<f64> = w
            .iter()
            .zip(n)
            .map(|(w, n)| (w.user_us + w.sys_us) / (n.user_us + n.sys_us))
            .collect();
        println!(
            "CPU per delivery, wshub-redis / naive-redis: median {:.2} (rounds {ratios:.2?})",
            median(ratios.clone())
        );
    }
    if let [(_, w), _, (_, s)] = results {
        let d: Vec<f64> = w
            .iter()
            .zip(s)
            .map(|(w, s)| w.p99_node2_ms - s.p99_ms)
            .collect();
        println!(
            "cross-node p99 − single-node p99: median {:.2} ms (rounds {d:.2?})",
            median(d.clone())
        );
    }
}

// ------------------------------------------------------------------ restart

/// A new subscriber of the topic on `addr`, retried every 20 ms while the
/// node refuses (it is not back) until `deadline`.
async fn fresh(addr: SocketAddr, deadline: Instant) -> Ws {
    loop {
        assert!(Instant::now() < deadline, "no node back in time");
        let mut ws = connect(addr, Kind::WshubRedis).await;
        ws.send(Message::text(
            r#"{"id":1,"op":"subscribe","topic":"bench"}"#,
        ))
        .await
        .unwrap();
        let ok = loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.contains(r#""id":1"#) => {
                    break t.contains(r#""ok":true"#);
                }
                Some(Ok(_)) => {}
                _ => break false,
            }
        };
        if ok {
            return ws;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Seconds from a restarted Redis's first PING answer until a publish on
/// node 1 reaches fresh subscribers on both nodes. A subscriber that the
/// node closes (its topic got a new epoch) is replaced, as a client would
/// reconnect.
async fn restart(outage: Duration) -> f64 {
    let mut redis = Redis::start();
    let nodes = [
        Node::start(Kind::WshubRedis, &redis.url()),
        Node::start(Kind::WshubRedis, &redis.url()),
    ];
    // Warm: both nodes watch the topic.
    let mut watchers = Vec::new();
    for node in &nodes {
        let mut ws = connect(node.addr, Kind::WshubRedis).await;
        subscribe(&mut ws, Kind::WshubRedis).await;
        watchers.push(ws);
    }
    redis.kill();
    tokio::time::sleep(outage).await;
    redis.spawn();
    let back = Instant::now();
    let deadline = back + Duration::from_secs(30);
    let mut publisher = connect(nodes[0].addr, Kind::WshubRedis).await;
    let mut r0 = fresh(nodes[0].addr, deadline).await;
    let mut r1 = fresh(nodes[1].addr, deadline).await;
    let mut got = [false, false];
    let mut n = 0;
    while !(got[0] && got[1]) {
        assert!(Instant::now() < deadline, "not delivering within 30 s");
        n += 1;
        let cmd =
            json!({"id": 100 + n, "op": "publish", "topic": "bench", "data": {"t": now_micros()}});
        publisher
            .send(Message::text(cmd.to_string()))
            .await
            .unwrap();
        let wait = tokio::time::sleep(Duration::from_millis(20));
        tokio::pin!(wait);
        let mut ended = [false, false];
        loop {
            tokio::select! {
                _ = &mut wait => break,
                msg = r0.next(), if !ended[0] => match msg {
                    Some(Ok(Message::Text(t))) => got[0] |= t.contains(r#""op":"message""#),
                    Some(Ok(Message::Close(_)) | Err(_)) | None => ended[0] = true,
                    Some(Ok(_)) => {}
                },
                msg = r1.next(), if !ended[1] => match msg {
                    Some(Ok(Message::Text(t))) => got[1] |= t.contains(r#""op":"message""#),
                    Some(Ok(Message::Close(_)) | Err(_)) | None => ended[1] = true,
                    Some(Ok(_)) => {}
                },
                Some(_) = publisher.next() => {}
            }
        }
        if ended[0] {
            r0 = fresh(nodes[0].addr, deadline).await;
        }
        if ended[1] {
            r1 = fresh(nodes[1].addr, deadline).await;
        }
    }
    drop(watchers);
    back.elapsed().as_secs_f64()
}
