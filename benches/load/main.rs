//! The many-client load benchmark: wshub against two baseline patterns, same
//! load, same run; and wshub's pub/sub protocol (`PubSub`) with many topics
//! and with a storm of clients resuming at once.
//!
//! ```text
//! cargo bench --bench load -- fanout-1k            # one scenario, every server
//! cargo bench --bench load -- all --runs 3         # the seven broadcast scenarios, medians of 3
//! cargo bench --bench load -- sweep --runs 3       # p99 and CPU vs clients, SVG plot
//! cargo bench --bench load -- fanout-1k topics-1k resume-storm --runs 3
//!                                                  # pub/sub next to plain broadcast
//! cargo bench --bench load -- pubsub-smoke         # CI: exits 1 unless delivery is exact
//! cargo bench --bench load -- fanout-1k --url ws://127.0.0.1:8080/ws --server-pid 1234
//! cargo bench --bench load -- --help
//! ```
//!
//! Each server runs in a child process (so its CPU time and memory are its
//! own); the clients run here. Results go to stdout as a table and to
//! `target/load/<scenario>.json`. See docs/BENCHMARKS.md.
//!
//! Besides CPU time (user and system) per delivery, every run reports, from
//! the server process's own accounting over the same window (after the
//! warm-up until the end): its context switches per second (`getrusage`'s
//! `ru_nvcsw + ru_nivcsw`, voluntary and involuntary, also apart in the
//! JSON; column `csw/s`), and its write syscalls per delivery (`write`,
//! `writev`, `sendto`, `sendmsg`, counted by the kernel's tracepoints
//! through `perf stat`, see `writes.rs`; column `wr/deliv`;
//! `--no-count-writes` turns that off). A figure the machine does not give
//! is shown as `-` (`null` in the JSON), never as 0, and the run's JSON
//! says why.
//!
//! The broadcast scenarios (`fanout-*`, `chat-1k`, `idle-max`,
//! `slow-client`, `slow-reader`, `sweep`, `smoke`) load servers that relay
//! every text message to every client.
//!
//! - `slow-reader`: 1,000 clients, 1 publisher × 100 msg/s × 10 s, 1 KiB;
//!   10 clients keep reading, but at half the publish rate (one message,
//!   then a pause of two publish intervals), against wshub under each
//!   policy (`suspend`, `drop-oldest`, `drop-latest`, `disconnect`) and the
//!   same load without slow readers. The hub holds 128 messages and the
//!   server's sockets 16 KiB (`SO_SNDBUF`), so the backlog reaches the hub
//!   within seconds. Reports the other 990 clients' p50/p99 and their ratio
//!   to the run without slow readers, the hub's `published`, `dropped`,
//!   `evicted`, `lagged`, `disconnected` over the window, what the slow
//!   readers received, missed (`gap`) and how they were closed, and the
//!   server's RSS. Exits 1 if the counters disagree with what the clients
//!   saw, or a fast client lost a message (except drop-latest's, which are
//!   checked to be exactly `dropped` per client: that policy discards into
//!   the shared buffer, for every subscriber).
//!
//! The pub/sub scenarios speak the protocol of docs/PROTOCOL.md to the
//! `wshub-pubsub` server (`PubSub` on `/pubsub`), see `pubsub.rs`:
//!
//! - `topics-1k`: 1,000 topics, 1,000 connections each subscribed to 10
//!   (`(c·10 + k) mod 1000`: 10 subscribers per topic, 10,000
//!   subscriptions), 4 publisher connections publishing on every topic once
//!   a second, 64 B `data`, 10 s. Also the server's memory per extra
//!   subscription: RSS after one subscription per connection (every topic
//!   created) and after all ten, the difference over 9 × connections. When
//!   `fanout-1k` runs in the same invocation, a side-by-side comparison
//!   follows (and `target/load/topics-1k-vs-fanout-1k.json`).
//! - `resume-storm`: 1,000 connections on one topic (history 100) get 10
//!   live messages, drop their connections at once, 50 messages are
//!   published, all 1,000 reconnect at once and subscribe with `since`.
//!   Reports the time until every client has all 50 (exactly once, in
//!   order, `recovered: true`), the server's CPU and RSS for that phase.
//! - `pubsub-smoke`: both, with 40 clients for about 2 s each.
//!
//! The cluster scenarios (`--features redis`, see `cluster.rs`) run two
//! nodes on a `redis-server` the benchmark starts on a free loopback port
//! for each run, subscribers spread evenly over the nodes, publishers on
//! node 1; `wshub-redis` (`PubSub` on `RedisBroker`) and `naive-redis` (the
//! hand-written locked list, PUBLISH and one subscription) take turns in
//! each round:
//!
//! ```text
//! cargo bench --features redis --bench load -- cluster-1k cluster-high --runs 3
//! cargo bench --features redis --bench load -- cluster-restart --runs 3
//! cargo bench --features redis --bench load -- cluster-smoke
//! ```
//!
//! - `cluster-1k`: 1,000 clients (500 a node) on one topic, 1 publisher ×
//!   100 msg/s, 64 B, 10 s; also `wshub-pubsub` alone with the same
//!   clients, for the single-node p99.
//! - `cluster-high`: 200 clients, 4 publishers × 500 msg/s.
//! - `cluster-smoke`: 40 clients, 2 publishers × 20 msg/s for 2 s; exits 1
//!   unless delivery is exact.
//! - `cluster-restart`: two `wshub-redis` nodes, 100 subscribed clients;
//!   Redis SIGKILLed and started again on its port (at once and after 5 s
//!   down); the time from its first PING answer until a publish through
//!   node 1 reaches both nodes, and every client (clients the nodes close
//!   reconnect and subscribe again). At least 3 repetitions.
//!
//! Figures: delivery ratio, p50/p99 latency for all clients and for node 2's
//! (cross-node), CPU µs per delivery summed over node 1, node 2 and Redis
//! (user and system apart), each process's RSS, and the ratio of the two
//! kinds' CPU per delivery, round by round.

mod client;
#[cfg(feature = "redis")]
mod cluster;
mod plot;
mod pubsub;
mod servers;
mod slow_reader;
mod sys;
mod writes;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use wshub::Policy;

use crate::servers::Kind;

/// The cluster scenarios (`--features redis`).
const CLUSTER_SCENARIOS: [&str; 4] = [
    "cluster-1k",
    "cluster-high",
    "cluster-smoke",
    "cluster-restart",
];

/// File descriptors each process keeps for itself besides its connections.
const FD_RESERVE: u64 = 64;

/// wshub's load benchmark.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Scenarios to run: fanout-1k, fanout-high, fanout-10k, chat-1k,
    /// idle-max, slow-client, slow-reader (10 of 1,000 clients read at half
    /// the publish rate, every policy), sweep, smoke, or all (the first
    /// seven); and the
    /// pub/sub ones: topics-1k (1,000 topics × 10 subscribers, 1 msg/s
    /// each), resume-storm (1,000 clients drop, miss 50 messages and
    /// resume at once) and pubsub-smoke (both, small; exits 1 unless
    /// delivery is exact). With --features redis, the cluster ones:
    /// cluster-1k, cluster-high, cluster-smoke and cluster-restart.
    #[arg(default_value = "fanout-1k")]
    scenarios: Vec<String>,
    /// Servers to measure, comma-separated: wshub, wshub:<policy>,
    /// wshub+metrics, ktor, axum, and wshub-pubsub (the pub/sub
    /// scenarios'); wshub-redis and naive-redis (the cluster scenarios',
    /// which also run wshub-pubsub as their single-node reference). Each scenario runs those of the list that speak its
    /// protocol. Default: the scenario's own list.
    #[arg(long, value_delimiter = ',')]
    servers: Vec<Kind>,
    /// Measure a server already running at this ws:// URL (loopback only)
    /// instead of starting the built-in ones.
    #[arg(long)]
    url: Option<String>,
    /// Process id of the --url server, to read its CPU time and memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Runs per server; the summary shows medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Override the scenario's number of clients (pub/sub: subscriber
    /// connections; topics-1k then scales its topics alike, keeping 10
    /// subscribers a topic, unless --topics says otherwise).
    #[arg(long)]
    clients: Option<usize>,
    /// Override the scenario's number of publishers (pub/sub: publisher
    /// connections, which subscribe to nothing).
    #[arg(long)]
    publishers: Option<usize>,
    /// Override the messages per second each publisher sends (topics-1k:
    /// per topic; resume-storm: of the live phase).
    #[arg(long)]
    rate: Option<f64>,
    /// Override how long publishers publish, in seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Override the payload size in bytes (at least 40; pub/sub: of each
    /// message's `data` JSON).
    #[arg(long)]
    payload: Option<usize>,
    /// Override the number of topics (topics-1k, pubsub-smoke).
    #[arg(long)]
    topics: Option<usize>,
    /// Override the messages published while the clients are away
    /// (resume-storm, pubsub-smoke).
    #[arg(long)]
    missed: Option<u64>,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Do not count the server's write syscalls (by default `perf stat`
    /// counts them on the syscall tracepoints, where perf and the
    /// permission to read them are there).
    #[arg(long = "no-count-writes", action = clap::ArgAction::SetFalse)]
    count_writes: bool,
    /// Where JSON results (and the sweep's SVG) go.
    #[arg(long, default_value = "target/load")]
    out: PathBuf,
    /// Internal: run as the server child process.
    #[arg(long, hide = true)]
    serve: Option<Kind>,
}

/// One way of loading a server.
#[derive(Debug, Clone, Serialize)]
struct Scenario {
    name: String,
    clients: usize,
    publishers: usize,
    /// Messages per second per publisher (topics: per topic; resume: of
    /// the live phase).
    rate: f64,
    /// Seconds of publishing.
    duration: f64,
    payload: usize,
    /// Clients that stop reading once publishing starts.
    slow: usize,
    /// Whether the slow clients keep reading at half the publish rate (one
    /// message, then a pause of two publish intervals) instead of stopping.
    throttled: bool,
    /// The wshub hub's capacity, if not the benchmark's 1,024.
    hub_capacity: Option<usize>,
    /// `SO_SNDBUF` of the server's sockets in bytes, if not the kernel's
    /// autotuned size.
    server_sndbuf: Option<u32>,
    /// One broadcast after connecting, timed until every client has it.
    single_broadcast: bool,
    /// What the clients do.
    mode: Mode,
    #[serde(skip)]
    variants: Vec<Variant>,
}

/// How a scenario loads its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
enum Mode {
    /// Every client gets every message a publisher sends (a relay server).
    Fanout,
    /// Pub/sub: `topics` topics, each subscriber connection in `per_client`
    /// of them, dedicated publisher connections.
    Topics { topics: usize, per_client: usize },
    /// Pub/sub: one topic; everyone drops, `missed` messages are
    /// published, everyone resumes with `since` at once.
    Resume { missed: u64 },
}

impl Mode {
    fn is_pubsub(self) -> bool {
        self != Mode::Fanout
    }
}

impl Scenario {
    fn describe(&self) -> String {
        match self.mode {
            Mode::Fanout => {
                let mut text = format!(
                    "{} clients ({} slow{}), {} publisher(s) × {} msg/s × {} s, {} B",
                    self.clients,
                    self.slow,
                    if self.throttled {
                        ", reading at half rate"
                    } else {
                        ""
                    },
                    self.publishers,
                    self.rate,
                    self.duration,
                    self.payload
                );
                if let Some(capacity) = self.hub_capacity {
                    text.push_str(&format!(", hub capacity {capacity}"));
                }
                if let Some(bytes) = self.server_sndbuf {
                    text.push_str(&format!(", server SO_SNDBUF {bytes} B"));
                }
                text
            }
            Mode::Topics { topics, per_client } => format!(
                "{} connections × {per_client} topics of {topics} ({} subscriptions), \
                 {} publisher connection(s), each topic {} msg/s × {} s, {} B data",
                self.clients,
                self.clients * per_client,
                self.publishers,
                self.rate,
                self.duration,
                self.payload
            ),
            Mode::Resume { missed } => format!(
                "{} clients on one topic, {} live msg, drop, {missed} missed, resume at once, {} B data",
                self.clients,
                (self.rate * self.duration).round(),
                self.payload
            ),
        }
    }
}

/// A server under a scenario, possibly with its own number of slow clients
/// or its own mode.
#[derive(Debug, Clone)]
struct Variant {
    label: String,
    kind: Kind,
    slow: Option<usize>,
    mode: Option<Mode>,
}

fn variant(kind: Kind) -> Variant {
    Variant {
        label: kind.to_string(),
        kind,
        slow: None,
        mode: None,
    }
}

fn baselines() -> Vec<Variant> {
    [Kind::Wshub(Policy::Suspend), Kind::Ktor, Kind::Axum]
        .into_iter()
        .map(variant)
        .collect()
}

fn fanout(name: &str, clients: usize, publishers: usize, rate: f64) -> Scenario {
    Scenario {
        name: name.to_string(),
        clients,
        publishers,
        rate,
        duration: 10.0,
        payload: 64,
        slow: 0,
        throttled: false,
        hub_capacity: None,
        server_sndbuf: None,
        single_broadcast: false,
        mode: Mode::Fanout,
        variants: baselines(),
    }
}

/// The pub/sub scenarios' shape: `clients` subscriber connections and
/// `publishers` publisher connections on the `wshub-pubsub` server.
fn pubsub_scenario(name: &str, clients: usize, publishers: usize, mode: Mode) -> Scenario {
    Scenario {
        mode,
        variants: vec![variant(Kind::WshubPubSub)],
        ..fanout(name, clients, publishers, 1.0)
    }
}

fn scenario(name: &str, file_limit: u64) -> Result<Vec<Scenario>, String> {
    Ok(match name {
        "fanout-1k" => vec![fanout(name, 1000, 1, 100.0)],
        "fanout-high" => vec![fanout(name, 100, 4, 1000.0)],
        "fanout-10k" => vec![fanout(name, 10_000, 1, 10.0)],
        "chat-1k" => vec![fanout(name, 1000, 50, 2.0)],
        "idle-max" => {
            let clients = 100_000.min(file_limit.saturating_sub(FD_RESERVE) as usize);
            vec![Scenario {
                single_broadcast: true,
                duration: 0.0,
                ..fanout(name, clients, 1, 1.0)
            }]
        }
        "slow-client" => {
            let mut variants = vec![Variant {
                label: "wshub (no slow clients)".to_string(),
                kind: Kind::Wshub(Policy::DropOldest),
                slow: Some(0),
                mode: None,
            }];
            for policy in [
                Policy::Suspend,
                Policy::DropOldest,
                Policy::DropLatest,
                Policy::Disconnect,
            ] {
                let kind = Kind::Wshub(policy);
                variants.push(Variant {
                    label: format!("wshub:{policy}"),
                    kind,
                    slow: None,
                    mode: None,
                });
            }
            variants.push(variant(Kind::Ktor));
            variants.push(variant(Kind::Axum));
            // 3,000 messages of 4 KiB: a stopped client fills its socket
            // buffers (about 1 MiB on loopback) in seconds and then the
            // hub's 1,024-message buffer, so every policy has to act.
            vec![Scenario {
                payload: 4096,
                slow: 10,
                duration: 30.0,
                variants,
                ..fanout(name, 1000, 1, 100.0)
            }]
        }
        "slow-reader" => {
            let mut variants = vec![Variant {
                label: "wshub (no slow readers)".to_string(),
                kind: Kind::Wshub(Policy::Suspend),
                slow: Some(0),
                mode: None,
            }];
            for policy in Policy::ALL {
                variants.push(Variant {
                    label: format!("wshub:{policy}"),
                    kind: Kind::Wshub(policy),
                    slow: None,
                    mode: None,
                });
            }
            // 10 clients read at 50 msg/s of 100: 50 messages a second pile
            // up for each. A 128-message hub buffer and 16 KiB socket send
            // buffers (instead of about 1 MiB autotuned on loopback) let
            // them reach the hub's buffer within a few seconds of the 10 s,
            // so every policy has to act; the run without slow readers has
            // the same settings.
            vec![Scenario {
                payload: 1024,
                slow: 10,
                throttled: true,
                hub_capacity: Some(128),
                server_sndbuf: Some(16 << 10),
                variants,
                ..fanout(name, 1000, 1, 100.0)
            }]
        }
        "sweep" => [100, 300, 1000, 3000, 10_000]
            .into_iter()
            .map(|n| fanout(&format!("sweep-{n}"), n, 1, 10.0))
            .collect(),
        "smoke" => vec![Scenario {
            duration: 2.0,
            ..fanout(name, 50, 2, 50.0)
        }],
        // 1,000 connections × 10 topics of 1,000: 10 subscribers a topic;
        // 4 publishers × 250 topics, each topic once a second.
        "topics-1k" => vec![pubsub_scenario(
            name,
            1000,
            4,
            Mode::Topics {
                topics: 1000,
                per_client: 10,
            },
        )],
        // 10 live messages (10 msg/s × 1 s) give every client a position.
        "resume-storm" => vec![Scenario {
            rate: 10.0,
            duration: 1.0,
            ..pubsub_scenario(name, 1000, 1, Mode::Resume { missed: 50 })
        }],
        // Both paths, small: 40 connections × 10 of 40 topics at 5 msg/s
        // for 2 s; 40 clients resuming 20 missed messages.
        "pubsub-smoke" => vec![Scenario {
            rate: 5.0,
            duration: 2.0,
            variants: vec![
                Variant {
                    label: "wshub-pubsub topics".to_string(),
                    ..variant(Kind::WshubPubSub)
                },
                Variant {
                    label: "wshub-pubsub resume".to_string(),
                    mode: Some(Mode::Resume { missed: 20 }),
                    ..variant(Kind::WshubPubSub)
                },
            ],
            ..pubsub_scenario(
                name,
                40,
                2,
                Mode::Topics {
                    topics: 40,
                    per_client: 10,
                },
            )
        }],
        "all" => {
            let mut all = Vec::new();
            for name in [
                "fanout-1k",
                "fanout-high",
                "fanout-10k",
                "chat-1k",
                "idle-max",
                "slow-client",
                "slow-reader",
            ] {
                all.extend(scenario(name, file_limit)?);
            }
            all
        }
        _ => {
            return Err(format!(
                "unknown scenario {name:?}: expected fanout-1k, fanout-high, fanout-10k, chat-1k, \
                 idle-max, slow-client, slow-reader, sweep, smoke, all, topics-1k, resume-storm or \
                 pubsub-smoke"
            ));
        }
    })
}

/// What the server process reports about itself.
#[derive(Debug, Clone, Default)]
struct ServerStats {
    cpu_us: Option<u64>,
    /// The user-space part of `cpu_us` (the rest is the kernel's).
    user_us: Option<u64>,
    rss_kib: Option<u64>,
    connections: Option<u64>,
    /// Voluntary and involuntary context switches so far (`getrusage`'s
    /// `ru_nvcsw`, `ru_nivcsw`).
    switches: Option<(u64, u64)>,
    /// When the figures were read (here, in the benchmark).
    at: Option<Instant>,
    /// Named counters (wshub: its hub's `published`, `dropped`, `evicted`,
    /// `lagged`, `disconnected`).
    counters: BTreeMap<String, u64>,
}

/// The server under test: a child process of ours, or one given by URL.
enum Target {
    Child {
        child: Child,
        stdin: ChildStdin,
        stdout: BufReader<ChildStdout>,
        addr: SocketAddr,
        path: &'static str,
    },
    External {
        addr: SocketAddr,
        path: String,
        pid: Option<u32>,
    },
}

impl Target {
    /// A child serving `kind`, with `env` added to its environment.
    fn start_env(kind: Kind, env: &[(&str, String)]) -> Result<Target, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
        let mut child = Command::new(exe)
            .arg("--serve")
            .arg(kind.to_string())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting the server: {e}"))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .map_err(|e| format!("reading the server's address: {e}"))?;
        let addr = line
            .trim()
            .strip_prefix("addr ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("the server said {line:?} instead of its address"))?;
        Ok(Target::Child {
            child,
            stdin,
            stdout,
            addr,
            path: kind.path(),
        })
    }

    fn external(url: &str, pid: Option<u32>) -> Result<Target, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url:?}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let addr = authority
            .to_socket_addrs()
            .map_err(|e| format!("{authority:?}: {e}"))?
            .find(|a| a.is_ipv4())
            .ok_or_else(|| format!("{authority:?} has no IPv4 address"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{addr} is not a loopback address: this benchmark only loads 127.0.0.0/8"
            ));
        }
        Ok(Target::External { addr, path, pid })
    }

    /// The server's process id, when it is known.
    fn pid(&self) -> Option<u32> {
        match self {
            Target::Child { child, .. } => Some(child.id()),
            Target::External { pid, .. } => *pid,
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Target::Child { addr, .. } | Target::External { addr, .. } => *addr,
        }
    }

    fn path(&self) -> &str {
        match self {
            Target::Child { path, .. } => path,
            Target::External { path, .. } => path,
        }
    }

    fn stats(&mut self) -> ServerStats {
        match self {
            Target::Child { stdin, stdout, .. } => {
                let mut line = String::new();
                if writeln!(stdin, "stats").is_err()
                    || stdin.flush().is_err()
                    || stdout.read_line(&mut line).is_err()
                {
                    return ServerStats::default();
                }
                let mut fields = line.split_whitespace().skip(1);
                let mut number = || fields.next().and_then(|f| f.parse().ok());
                let (cpu_us, rss_kib, connections) = (number(), number(), number());
                let mut counters: BTreeMap<String, u64> = line
                    .split_whitespace()
                    .filter_map(|f| f.split_once('='))
                    .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                    .collect();
                let user_us = counters.remove("user_us");
                let switches = counters.remove("nvcsw").zip(counters.remove("nivcsw"));
                ServerStats {
                    cpu_us,
                    user_us,
                    rss_kib,
                    connections,
                    switches,
                    at: Some(Instant::now()),
                    counters,
                }
            }
            Target::External { pid: Some(pid), .. } => ServerStats {
                cpu_us: sys::process_cpu_micros(*pid).ok(),
                user_us: None,
                rss_kib: sys::rss_kib(Some(*pid)).ok(),
                connections: None,
                switches: sys::process_context_switches(*pid),
                at: Some(Instant::now()),
                counters: BTreeMap::new(),
            },
            Target::External { pid: None, .. } => ServerStats::default(),
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Target::Child { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Default, Serialize)]
struct RunResult {
    scenario: String,
    server: String,
    run: usize,
    clients_requested: usize,
    connected: usize,
    connect_errors: usize,
    first_connect_error: Option<String>,
    connect_secs: f64,
    all_ready: bool,
    slow: usize,
    receivers: u64,
    publishers: usize,
    sent: u64,
    expected: u64,
    delivered: u64,
    delivery_ratio: f64,
    deliveries_per_sec: f64,
    publish_secs: f64,
    latency_ms: Latency,
    gaps: u64,
    reorders: u64,
    other_messages: u64,
    closed_by_server: BTreeMap<String, u64>,
    server_cpu_secs: Option<f64>,
    cpu_us_per_delivery: Option<f64>,
    /// The user-space part of `cpu_us_per_delivery`.
    user_us_per_delivery: Option<f64>,
    /// The kernel's part of `cpu_us_per_delivery`.
    sys_us_per_delivery: Option<f64>,
    /// The server's context switches (voluntary and involuntary) per second
    /// of the same window.
    context_switches_per_sec: Option<f64>,
    /// The voluntary part of `context_switches_per_sec` (waits: for I/O, a
    /// lock, an empty queue).
    voluntary_switches_per_sec: Option<f64>,
    /// The involuntary part (preemptions).
    involuntary_switches_per_sec: Option<f64>,
    /// The server's write syscalls (`write`, `writev`, `sendto`,
    /// `sendmsg`) per delivery, counted by perf (see `writes.rs`) from the
    /// warm-up to the end.
    write_syscalls_per_delivery: Option<f64>,
    /// Those writes by syscall.
    write_syscalls: BTreeMap<String, u64>,
    /// Why the writes were not counted, if they were not.
    #[serde(skip_serializing_if = "Option::is_none")]
    write_syscalls_missing: Option<String>,
    server_rss_start_kib: Option<u64>,
    server_rss_connected_kib: Option<u64>,
    server_rss_end_kib: Option<u64>,
    kib_per_connection: Option<f64>,
    server_connections: Option<u64>,
    /// The server's own counters at the end (wshub: what its policy did).
    server_counters: BTreeMap<String, u64>,
    /// What only the slow-reader scenario measures.
    #[serde(skip_serializing_if = "Option::is_none")]
    slow_reader: Option<slow_reader::SlowReaderRun>,
    /// Every expected message delivered once, in order, and nothing else
    /// (pub/sub: no refusal, no `gap`, every client caught up).
    exact: bool,
    /// What only the pub/sub scenarios measure. In `resume-storm` the CPU
    /// per delivery is the storm's: server CPU from the first reconnect
    /// until every client caught up, over the missed messages delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pubsub: Option<pubsub::PubSubFigures>,
}

impl RunResult {
    /// Server CPU between `a` and `b`, in all and per delivery.
    fn set_cpu_for(&mut self, a: &ServerStats, b: &ServerStats, deliveries: u64) {
        let cpu_secs = match (a.cpu_us, b.cpu_us) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e6),
            _ => None,
        };
        let per = |us: f64| (deliveries > 0).then(|| us / deliveries as f64);
        self.server_cpu_secs = cpu_secs;
        self.cpu_us_per_delivery = cpu_secs.and_then(|s| per(s * 1e6));
        let user_us = match (a.user_us, b.user_us) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64),
            _ => None,
        };
        self.user_us_per_delivery = user_us.and_then(per);
        self.sys_us_per_delivery = match (cpu_secs, user_us) {
            (Some(all), Some(user)) => per((all * 1e6 - user).max(0.0)),
            _ => None,
        };
        self.set_switches_for(a, b);
    }

    /// The server's context switches per second between `a` and `b`;
    /// missing when either end lacks them.
    fn set_switches_for(&mut self, a: &ServerStats, b: &ServerStats) {
        let secs = match (a.at, b.at) {
            (Some(x), Some(y)) => Some(y.saturating_duration_since(x).as_secs_f64()),
            _ => None,
        }
        .filter(|s| *s > 0.0);
        let rate = |x: u64, y: u64| secs.map(|s| y.saturating_sub(x) as f64 / s);
        let (voluntary, involuntary) = match (a.switches, b.switches) {
            (Some((av, ai)), Some((bv, bi))) => (rate(av, bv), rate(ai, bi)),
            _ => (None, None),
        };
        self.voluntary_switches_per_sec = voluntary;
        self.involuntary_switches_per_sec = involuntary;
        self.context_switches_per_sec = voluntary.zip(involuntary).map(|(v, i)| v + i);
    }

    /// The write syscalls counted, per delivery.
    fn set_writes(&mut self, counted: Result<BTreeMap<String, u64>, String>, deliveries: u64) {
        match counted {
            Ok(counts) => {
                let all: u64 = counts.values().sum();
                self.write_syscalls_per_delivery =
                    (deliveries > 0).then(|| all as f64 / deliveries as f64);
                self.write_syscalls = counts;
            }
            Err(why) => self.write_syscalls_missing = Some(why),
        }
    }

    /// Server RSS before and after the clients connected, per connection.
    fn set_rss(&mut self, start: &ServerStats, connected: &ServerStats, connections: usize) {
        self.server_rss_start_kib = start.rss_kib;
        self.server_rss_connected_kib = connected.rss_kib;
        self.kib_per_connection = match (start.rss_kib, connected.rss_kib) {
            (Some(a), Some(b)) if connections > 0 => {
                Some(b.saturating_sub(a) as f64 / connections as f64)
            }
            _ => None,
        };
        self.server_connections = connected.connections;
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Latency {
    /// Percentiles (ms) of a histogram of µs.
    fn of(hist: &hdrhistogram::Histogram<u64>) -> Latency {
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            p50: ms(0.50),
            p90: ms(0.90),
            p99: ms(0.99),
            p999: ms(0.999),
            max: hist.max() as f64 / 1000.0,
        }
    }
}

async fn run_once(
    scenario: &Scenario,
    variant: &Variant,
    run: usize,
    args: &Args,
) -> Result<RunResult, String> {
    let mode = variant.mode.unwrap_or(scenario.mode);
    if args.url.is_none() && mode.is_pubsub() != variant.kind.is_pubsub() {
        return Err(format!(
            "{} does not speak {}'s protocol",
            variant.kind, scenario.name
        ));
    }
    let mut env = Vec::new();
    if let Some(capacity) = scenario.hub_capacity {
        env.push((servers::CAPACITY_ENV, capacity.to_string()));
    }
    if let Some(bytes) = scenario.server_sndbuf {
        env.push((servers::SNDBUF_ENV, bytes.to_string()));
    }
    let mut target = match &args.url {
        Some(url) => Target::external(url, args.server_pid)?,
        None => Target::start_env(variant.kind, &env)?,
    };
    match mode {
        Mode::Fanout => {}
        Mode::Topics { topics, per_client } => {
            return pubsub::run_topics(
                &mut target,
                scenario,
                variant,
                run,
                args.concurrency,
                (topics, per_client),
            )
            .await;
        }
        Mode::Resume { missed } => {
            return pubsub::run_resume(
                &mut target,
                scenario,
                variant,
                run,
                args.concurrency,
                missed,
            )
            .await;
        }
    }
    let slow = variant.slow.unwrap_or(scenario.slow);
    let start = target.stats();
    let mut fleet = client::connect(
        target.addr(),
        target.path(),
        scenario.clients,
        scenario.publishers,
        (
            slow,
            scenario
                .throttled
                .then(|| Duration::from_secs_f64(2.0 / scenario.rate)),
        ),
        args.concurrency,
    )
    .await;
    if fleet.connected == 0 {
        return Err(format!(
            "no client connected: {}",
            fleet.first_error.as_deref().unwrap_or("no error recorded")
        ));
    }
    // Counting starts before the warm-up, which gives perf time to attach
    // before the window; the warm-up's writes (about one per client) are
    // then counted with the window's, which only matters where the window
    // holds few deliveries per client (idle-max: one).
    let write_counter = if args.count_writes {
        let pid = target.pid().ok_or("no process id to count the writes of");
        pid.map_err(str::to_string)
            .and_then(writes::WriteCounter::start)
    } else {
        Err("not counted (--no-count-writes)".to_string())
    };
    let all_ready = fleet.warm_up(Duration::from_secs(30)).await;
    let connected = target.stats();

    let messages = if scenario.single_broadcast {
        1
    } else {
        (scenario.rate * scenario.duration).round() as u64
    };
    let receivers = fleet.receivers();
    let bar = ProgressBar::new(messages * scenario.publishers as u64 * receivers).with_style(
        ProgressStyle::with_template("  delivering {bar:40} {percent}% {per_sec} {elapsed}")
            .expect("progress template"),
    );
    let follower = client::follow(fleet.counters.clone(), bar.clone(), receivers);
    let began = Instant::now();
    fleet
        .publish(
            messages,
            scenario.rate,
            scenario.payload,
            Duration::from_secs(10),
        )
        .await;
    let publish_secs = began.elapsed().as_secs_f64();
    fleet
        .drain(Duration::from_secs(3), Duration::from_secs(30))
        .await;
    let end = target.stats();
    let write_syscalls = write_counter.and_then(writes::WriteCounter::stop);
    follower.abort();
    bar.finish_and_clear();

    let counters = fleet.counters.clone();
    let (connect_errors, first_error, connect_secs, connected_n, slow_n) = (
        fleet.connect_errors,
        fleet.first_error.clone(),
        fleet.connect_secs,
        fleet.connected,
        fleet.slow,
    );
    fleet.shut().await;
    drop(target);

    let sent = counters.sent.load(Ordering::Relaxed);
    let delivered = counters.delivered.load(Ordering::Relaxed);
    let expected = sent * receivers;
    let gaps = counters.gaps.load(Ordering::Relaxed);
    let reorders = counters.reorders.load(Ordering::Relaxed);
    let mut result = RunResult {
        scenario: scenario.name.clone(),
        server: variant.label.clone(),
        run,
        clients_requested: scenario.clients,
        connected: connected_n,
        connect_errors,
        first_connect_error: first_error,
        connect_secs,
        all_ready,
        slow: slow_n,
        receivers,
        publishers: scenario.publishers,
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
        latency_ms: Latency::of(&counters.latency()),
        gaps,
        reorders,
        other_messages: counters.other.load(Ordering::Relaxed),
        closed_by_server: counters.closed(),
        server_rss_end_kib: end.rss_kib,
        exact: expected > 0 && delivered == expected && gaps == 0 && reorders == 0,
        ..RunResult::default()
    };
    result.set_cpu_for(&connected, &end, delivered);
    result.set_rss(&start, &connected, connected_n);
    result.set_writes(write_syscalls, delivered);
    if scenario.throttled {
        let policy = match variant.kind {
            Kind::Wshub(policy) => Some(policy),
            _ => None,
        };
        let slow = (
            counters.slow_delivered.load(Ordering::Relaxed),
            counters.slow_gaps.load(Ordering::Relaxed),
            counters.slow_reorders.load(Ordering::Relaxed),
            counters.slow_closed(),
        );
        result.slow_reader = Some(slow_reader::figures(
            &result, policy, &connected, &end, slow,
        ));
    }
    result.server_counters = end.counters;
    Ok(result)
}

/// Medians of one server's runs in one scenario.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    scenario: String,
    server: String,
    runs: usize,
    connected: f64,
    connect_errors: f64,
    delivery_ratio: f64,
    deliveries_per_sec: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    server_cpu_secs: Option<f64>,
    cpu_us_per_delivery: Option<f64>,
    user_us_per_delivery: Option<f64>,
    sys_us_per_delivery: Option<f64>,
    context_switches_per_sec: Option<f64>,
    voluntary_switches_per_sec: Option<f64>,
    involuntary_switches_per_sec: Option<f64>,
    write_syscalls_per_delivery: Option<f64>,
    server_rss_connected_mib: Option<f64>,
    server_rss_end_mib: Option<f64>,
    kib_per_connection: Option<f64>,
    closed_by_server: u64,
    /// Runs whose delivery was exact.
    exact_runs: usize,
    /// Medians of the server's own counters (wshub: what its policy did).
    server_counters: BTreeMap<String, f64>,
    /// Medians of the pub/sub figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pubsub: Option<pubsub::PubSubSummary>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn summarize(results: &[RunResult]) -> Vec<Summary> {
    let mut order: Vec<(String, String)> = Vec::new();
    for r in results {
        let key = (r.scenario.clone(), r.server.clone());
        if !order.contains(&key) {
            order.push(key);
        }
    }
    order
        .into_iter()
        .map(|(scenario, server)| {
            let runs: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.scenario == scenario && r.server == server)
                .collect();
            let med = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(|r| f(r)).collect());
            let opt = |f: &dyn Fn(&RunResult) -> Option<f64>| {
                let values: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
                (!values.is_empty()).then(|| median(values))
            };
            Summary {
                runs: runs.len(),
                connected: med(&|r| r.connected as f64),
                connect_errors: med(&|r| r.connect_errors as f64),
                delivery_ratio: med(&|r| r.delivery_ratio),
                deliveries_per_sec: med(&|r| r.deliveries_per_sec),
                p50_ms: med(&|r| r.latency_ms.p50),
                p90_ms: med(&|r| r.latency_ms.p90),
                p99_ms: med(&|r| r.latency_ms.p99),
                p999_ms: med(&|r| r.latency_ms.p999),
                max_ms: med(&|r| r.latency_ms.max),
                server_cpu_secs: opt(&|r| r.server_cpu_secs),
                cpu_us_per_delivery: opt(&|r| r.cpu_us_per_delivery),
                user_us_per_delivery: opt(&|r| r.user_us_per_delivery),
                sys_us_per_delivery: opt(&|r| r.sys_us_per_delivery),
                context_switches_per_sec: opt(&|r| r.context_switches_per_sec),
                voluntary_switches_per_sec: opt(&|r| r.voluntary_switches_per_sec),
                involuntary_switches_per_sec: opt(&|r| r.involuntary_switches_per_sec),
                write_syscalls_per_delivery: opt(&|r| r.write_syscalls_per_delivery),
                server_rss_connected_mib: opt(&|r| {
                    r.server_rss_connected_kib.map(|k| k as f64 / 1024.0)
                }),
                server_rss_end_mib: opt(&|r| r.server_rss_end_kib.map(|k| k as f64 / 1024.0)),
                kib_per_connection: opt(&|r| r.kib_per_connection),
                closed_by_server: runs
                    .iter()
                    .map(|r| r.closed_by_server.values().sum::<u64>())
                    .max()
                    .unwrap_or(0),
                exact_runs: runs.iter().filter(|r| r.exact).count(),
                pubsub: pubsub::summarize(&runs),
                server_counters: runs
                    .iter()
                    .flat_map(|r| r.server_counters.keys())
                    .map(|key| {
                        let values = runs
                            .iter()
                            .filter_map(|r| r.server_counters.get(key))
                            .map(|&v| v as f64)
                            .collect();
                        (key.clone(), median(values))
                    })
                    .collect(),
                scenario,
                server,
            }
        })
        .collect()
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "-".to_string(),
    }
}

fn print_table(summaries: &[Summary]) {
    println!(
        "{:<24} {:>4} {:>6} {:>5} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>5}",
        "server",
        "runs",
        "conn",
        "err",
        "ratio",
        "deliv/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9",
        "max ms",
        "cpu s",
        "µs/deliv",
        "user µs",
        "sys µs",
        "csw/s",
        "wr/deliv",
        "RSS MiB",
        "KiB/conn",
        "closed",
        "exact"
    );
    for s in summaries {
        println!(
            "{:<24} {:>4} {:>6} {:>5} {:>7.4} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>5}",
            s.server,
            s.runs,
            s.connected,
            s.connect_errors,
            s.delivery_ratio,
            s.deliveries_per_sec,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            s.p999_ms,
            s.max_ms,
            fmt_opt(s.server_cpu_secs, 2),
            fmt_opt(s.cpu_us_per_delivery, 2),
            fmt_opt(s.user_us_per_delivery, 2),
            fmt_opt(s.sys_us_per_delivery, 2),
            fmt_opt(s.context_switches_per_sec, 0),
            fmt_opt(s.write_syscalls_per_delivery, 3),
            fmt_opt(s.server_rss_connected_mib, 1),
            fmt_opt(s.kib_per_connection, 2),
            s.closed_by_server,
            format!("{}/{}", s.exact_runs, s.runs),
        );
    }
    for s in summaries {
        if let Some(figures) = &s.pubsub {
            pubsub::print_summary(&s.server, figures);
        }
    }
    for s in summaries {
        let acted: Vec<String> = ["dropped", "evicted", "lagged", "disconnected"]
            .iter()
            .filter_map(|k| s.server_counters.get(*k).map(|v| format!("{k} {v}")))
            .collect();
        if ["dropped", "evicted", "lagged", "disconnected"]
            .iter()
            .any(|k| s.server_counters.get(*k).is_some_and(|v| *v > 0.0))
        {
            println!("  {} hub counters: {}", s.server, acted.join(", "));
        }
    }
    if let Some(calm) = summaries
        .iter()
        .find(|s| s.server.contains("no slow clients"))
    {
        for s in summaries.iter().filter(|s| s.server != calm.server) {
            println!(
                "  {:<24} p99 / p99 without slow clients: {:.2}",
                s.server,
                s.p99_ms / calm.p99_ms
            );
        }
    }
    let Some(ours) = summaries.iter().find(|s| s.server == "wshub") else {
        return;
    };
    for base in summaries.iter().filter(|s| !s.server.starts_with("wshub")) {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".to_string(),
        };
        println!(
            "  wshub / {:<14} CPU per delivery {} (user {})   context switches/s {}   \
             writes/delivery {}   p99 {}   RSS {}",
            base.server,
            ratio(ours.cpu_us_per_delivery, base.cpu_us_per_delivery),
            ratio(ours.user_us_per_delivery, base.user_us_per_delivery),
            ratio(ours.context_switches_per_sec, base.context_switches_per_sec),
            ratio(
                ours.write_syscalls_per_delivery,
                base.write_syscalls_per_delivery
            ),
            ratio(Some(ours.p99_ms), Some(base.p99_ms)),
            ratio(ours.server_rss_connected_mib, base.server_rss_connected_mib),
        );
    }
}

#[derive(Serialize)]
struct Report<'a> {
    scenario: &'a Scenario,
    machine: Machine,
    runs: &'a [RunResult],
    summary: &'a [Summary],
}

#[derive(Serialize)]
struct Machine {
    cores: usize,
    file_limit: u64,
}

fn write_json(path: &std::path::Path, report: &Report<'_>) {
    let written = std::fs::create_dir_all(path.parent().unwrap_or(path))
        .and_then(|()| std::fs::write(path, serde_json::to_vec_pretty(report).unwrap_or_default()));
    match written {
        Ok(()) => println!("  wrote {}", path.display()),
        Err(err) => eprintln!("  could not write {}: {err}", path.display()),
    }
}

fn plot_sweep(summaries: &[Summary], path: &std::path::Path) {
    let mut servers: Vec<&str> = Vec::new();
    for s in summaries {
        if !servers.contains(&s.server.as_str()) {
            servers.push(&s.server);
        }
    }
    let clients = |s: &Summary| s.connected;
    let series = |f: &dyn Fn(&Summary) -> Option<f64>| -> Vec<plot::Series> {
        servers
            .iter()
            .map(|name| plot::Series {
                name: name.to_string(),
                points: summaries
                    .iter()
                    .filter(|s| s.server == *name)
                    .filter_map(|s| f(s).map(|y| (clients(s), y)))
                    .collect(),
            })
            .collect()
    };
    let charts = [
        plot::Chart {
            title: "p99 latency, 1 publisher × 10 msg/s, 64 B".to_string(),
            x_label: "clients".to_string(),
            y_label: "p99 latency (ms)".to_string(),
            log_x: true,
            log_y: true,
            series: series(&|s| Some(s.p99_ms)),
        },
        plot::Chart {
            title: "server CPU per delivery".to_string(),
            x_label: "clients".to_string(),
            y_label: "CPU µs per delivery".to_string(),
            log_x: true,
            log_y: false,
            series: series(&|s| s.cpu_us_per_delivery),
        },
    ];
    let caption = format!(
        "medians of {} run(s) per point; {} cores, server and clients on one machine",
        summaries.first().map_or(0, |s| s.runs),
        cores()
    );
    let svg = plot::render_svg(&charts, Some(&caption));
    match std::fs::write(path, svg) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(err) => eprintln!("could not write {}: {err}", path.display()),
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn apply_overrides(scenario: &mut Scenario, args: &Args) {
    if let Some(n) = args.clients {
        // Topics scale with the connections: as many subscribers a topic.
        if let Mode::Topics { topics, per_client } = &mut scenario.mode {
            *topics = (*topics * n / scenario.clients.max(1)).max(*per_client);
        }
        scenario.clients = n;
    }
    let modes = std::iter::once(&mut scenario.mode)
        .chain(scenario.variants.iter_mut().filter_map(|v| v.mode.as_mut()));
    for mode in modes {
        match mode {
            Mode::Topics { topics, per_client } => {
                if let Some(t) = args.topics {
                    *topics = t.max(1);
                }
                *per_client = (*per_client).min(*topics);
            }
            Mode::Resume { missed } => {
                if let Some(m) = args.missed {
                    *missed = m;
                }
            }
            Mode::Fanout => {}
        }
    }
    if let Some(p) = args.publishers {
        scenario.publishers = p;
    }
    if let Some(r) = args.rate {
        scenario.rate = r;
    }
    if let Some(d) = args.duration {
        scenario.duration = d;
    }
    if let Some(s) = args.payload {
        scenario.payload = s.max(40);
    }
    if !args.servers.is_empty() {
        // Those of the list that speak the scenario's protocol; a kind the
        // scenario has variants of (pubsub-smoke's two) keeps them.
        let own = std::mem::take(&mut scenario.variants);
        let pubsub = scenario.mode.is_pubsub();
        for kind in args.servers.iter().copied() {
            // The Redis kinds speak only in the cluster scenarios.
            if kind.is_pubsub() != pubsub || kind.is_cluster() {
                continue;
            }
            let mine: Vec<Variant> = own
                .iter()
                .filter(|v| v.kind == kind && v.mode.is_some())
                .cloned()
                .collect();
            if mine.is_empty() {
                scenario.variants.push(variant(kind));
            } else {
                let plain = own.iter().filter(|v| v.kind == kind && v.mode.is_none());
                scenario.variants.extend(plain.cloned().chain(mine));
            }
        }
    }
    if let Some(url) = &args.url {
        // One variant per mode the scenario has, all aimed at the URL.
        let kind = if scenario.mode.is_pubsub() {
            Kind::WshubPubSub
        } else {
            Kind::Wshub(Policy::Suspend)
        };
        let mut variants: Vec<Variant> = Vec::new();
        for v in &scenario.variants {
            if !variants.iter().any(|w| w.mode == v.mode) {
                variants.push(Variant {
                    label: match v.mode {
                        None => url.clone(),
                        Some(_) => format!("{url} {}", v.label.rsplit(' ').next().unwrap_or("")),
                    },
                    kind,
                    slow: None,
                    mode: v.mode,
                });
            }
        }
        scenario.variants = variants;
    }
    // Broadcast publishers are clients; pub/sub ones are connections of their own.
    let most = if scenario.mode.is_pubsub() {
        usize::MAX
    } else {
        scenario.clients.max(1)
    };
    scenario.publishers = scenario.publishers.clamp(1, most);
}

fn main() {
    // `cargo bench` passes `--bench`; it means nothing here.
    let argv = std::env::args().filter(|a| a != "--bench");
    let args = Args::parse_from(argv);
    if let Some(kind) = args.serve {
        servers::child_main(kind);
    }
    let limit = match sys::raise_file_limit() {
        Ok(limit) => limit,
        Err(err) => {
            eprintln!("cannot read RLIMIT_NOFILE: {err}");
            std::process::exit(2);
        }
    };
    let (cluster_names, names): (Vec<&str>, Vec<&str>) = args
        .scenarios
        .iter()
        .map(String::as_str)
        .partition(|name| name.starts_with("cluster-"));
    for name in &cluster_names {
        if !CLUSTER_SCENARIOS.contains(name) {
            eprintln!(
                "unknown scenario {name:?}: the cluster scenarios are {}",
                CLUSTER_SCENARIOS.join(", ")
            );
            std::process::exit(2);
        }
    }
    if !cfg!(feature = "redis") && !cluster_names.is_empty() {
        eprintln!(
            "cluster scenarios need --features redis: \
             cargo bench --features redis --bench load -- {}",
            cluster_names.join(" ")
        );
        std::process::exit(2);
    }
    let mut scenarios = Vec::new();
    for name in names {
        match scenario(name, limit.soft) {
            Ok(list) => scenarios.extend(list),
            Err(err) => {
                eprintln!("{err}");
                std::process::exit(2);
            }
        }
    }
    let max_clients = limit.soft.saturating_sub(FD_RESERVE) as usize;
    for s in &mut scenarios {
        apply_overrides(s, &args);
        if s.clients > max_clients {
            println!(
                "{}: {} clients capped to {max_clients} by RLIMIT_NOFILE (soft {}, hard {}; \
                 each process keeps {FD_RESERVE} descriptors for itself)",
                s.name, s.clients, limit.soft, limit.hard
            );
            s.clients = max_clients;
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let sweep = args.scenarios.iter().any(|s| s == "sweep");
    let mut everything = Vec::new();
    let mut failed = false;
    runtime.block_on(async {
        for scenario in &scenarios {
            println!("\n== {}: {} ==", scenario.name, scenario.describe());
            if scenario.variants.is_empty() {
                println!("  skipped: no server of --servers speaks this scenario's protocol");
                continue;
            }
            let mut results = Vec::new();
            // Servers take turns within each round, so drift hits all alike.
            for run in 0..args.runs.max(1) {
                for variant in &scenario.variants {
                    match run_once(scenario, variant, run, &args).await {
                        Ok(result) => {
                            println!(
                                "  {:<24} run {}: {}/{} connected, ratio {:.4}, p99 {:.2} ms, {} µs/delivery",
                                result.server,
                                run + 1,
                                result.connected,
                                result.clients_requested,
                                result.delivery_ratio,
                                result.latency_ms.p99,
                                fmt_opt(result.cpu_us_per_delivery, 2)
                            );
                            results.push(result);
                        }
                        Err(err) => {
                            eprintln!("  {} run {}: {err}", variant.label, run + 1);
                            failed = true;
                        }
                    }
                }
            }
            let summary = summarize(&results);
            println!();
            print_table(&summary);
            write_json(
                &args.out.join(format!("{}.json", scenario.name)),
                &Report {
                    scenario,
                    machine: Machine {
                        cores: cores(),
                        file_limit: limit.soft,
                    },
                    runs: &results,
                    summary: &summary,
                },
            );
            if scenario.name == "smoke"
                && summary.iter().any(|s| s.delivery_ratio < 1.0 || s.connect_errors > 0.0)
            {
                eprintln!("smoke: a server lost messages or connections");
                failed = true;
            }
            if scenario.throttled {
                failed |= slow_reader::report(&results, &summary);
            }
            if scenario.name == "pubsub-smoke" {
                let expected = args.runs.max(1);
                for s in &summary {
                    if s.exact_runs < s.runs || s.runs < expected {
                        eprintln!(
                            "pubsub-smoke: {}: delivery exact in {} of {expected} run(s)",
                            s.server, s.exact_runs
                        );
                        failed = true;
                    }
                }
                if summary.len() < scenario.variants.len() {
                    eprintln!("pubsub-smoke: a variant did not run");
                    failed = true;
                }
            }
            everything.extend(summary);
        }
        #[cfg(feature = "redis")]
        {
            failed |= cluster::run(&cluster_names, &args, limit.soft).await;
        }
    });
    pubsub::compare(&everything, &args.out);
    if sweep {
        let points: Vec<Summary> = everything
            .into_iter()
            .filter(|s| s.scenario.starts_with("sweep-"))
            .collect();
        plot_sweep(&points, &args.out.join("sweep.svg"));
    }
    if failed {
        std::process::exit(1);
    }
}
