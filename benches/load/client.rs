//! The load generator: many WebSocket clients, a few of them publishing on a
//! fixed schedule, every one of them checking what it receives.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

/// Clients per 127.N.0.x source address: well inside the 28k ephemeral ports.
const PER_SOURCE: usize = 8000;
/// Receive buffer of a client that stops reading, so it fills quickly.
const SLOW_RCVBUF: u32 = 4096;
/// Latencies are recorded in microseconds up to one minute.
const MAX_LATENCY_US: u64 = 60_000_000;

/// One client connection.
pub type Ws = WebSocketStream<TcpStream>;
/// Its write half.
pub type Sink = SplitSink<Ws, Message>;
/// Its read half.
pub type Source = SplitStream<Ws>;

/// Nanoseconds since the generator started; the clock payloads carry.
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What every client shares with the orchestrator.
#[derive(Debug)]
pub struct Counters {
    /// Data messages received by clients that keep reading.
    pub delivered: AtomicU64,
    /// Data messages sent by the publishers.
    pub sent: AtomicU64,
    /// Clients that have seen a warm-up message.
    pub ready: AtomicU64,
    /// Messages missing from a publisher's sequence.
    pub gaps: AtomicU64,
    /// Messages that arrived after a later one from the same publisher.
    pub reorders: AtomicU64,
    /// Messages that were not the benchmark's own (e.g. lag notices).
    pub other: AtomicU64,
    /// Set when publishing starts: slow clients stop reading then (or,
    /// throttled, read one message per throttle interval).
    pub publishing: AtomicBool,
    /// Data messages received by throttled slow clients.
    pub slow_delivered: AtomicU64,
    /// Messages missing from a publisher's sequence, as throttled slow
    /// clients saw it.
    pub slow_gaps: AtomicU64,
    /// Messages throttled slow clients got after a later one.
    pub slow_reorders: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    closed: Mutex<BTreeMap<String, u64>>,
    slow_closed: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    /// Everything at zero.
    pub fn new() -> Self {
        Counters {
            delivered: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            ready: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            reorders: AtomicU64::new(0),
            other: AtomicU64::new(0),
            publishing: AtomicBool::new(false),
            slow_delivered: AtomicU64::new(0),
            slow_gaps: AtomicU64::new(0),
            slow_reorders: AtomicU64::new(0),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("histogram bounds"),
            ),
            closed: Mutex::new(BTreeMap::new()),
            slow_closed: Mutex::new(BTreeMap::new()),
        }
    }

    /// The latency histogram (µs) of every delivery so far.
    pub fn latency(&self) -> Histogram<u64> {
        self.latency.lock().unwrap().clone()
    }

    /// How many fast clients the server closed, by close code or error.
    pub fn closed(&self) -> BTreeMap<String, u64> {
        self.closed.lock().unwrap().clone()
    }

    /// Counts a client the server closed (or that lost its connection).
    pub fn record_closed(&self, why: String) {
        *self.closed.lock().unwrap().entry(why).or_default() += 1;
    }

    /// How many throttled slow clients the server closed, by close code or
    /// error.
    pub fn slow_closed(&self) -> BTreeMap<String, u64> {
        self.slow_closed.lock().unwrap().clone()
    }

    /// Counts a closed client: a slow one only if it is throttled (a
    /// stopped one is closed by design and counted nowhere).
    fn record_close(&self, slow: bool, throttled: bool, why: String) {
        if !slow {
            self.record_closed(why);
        } else if throttled {
            *self.slow_closed.lock().unwrap().entry(why).or_default() += 1;
        }
    }

    /// Moves a batch of latencies (µs) into the histogram.
    pub fn record_latencies(&self, batch: &mut Vec<u64>) {
        let mut hist = self.latency.lock().unwrap();
        for &us in batch.iter() {
            hist.saturating_record(us.clamp(1, MAX_LATENCY_US));
        }
        batch.clear();
    }
}

/// The clients of one run.
pub struct Fleet {
    /// Shared counters.
    pub counters: Arc<Counters>,
    /// Clients whose handshake succeeded.
    pub connected: usize,
    /// Of those, clients that stop reading once publishing starts.
    pub slow: usize,
    /// Handshakes that failed.
    pub connect_errors: usize,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// Seconds the connect phase took.
    pub connect_secs: f64,
    sinks: Vec<Sink>,
    readers: JoinSet<()>,
    stop: CancellationToken,
}

/// Opens `clients` connections to `ws://addr/path`, at most `concurrency`
/// handshakes at a time, `slow` of them spread evenly and marked slow.
/// The first `publishers` clients keep their write half for publishing.
/// Once publishing starts, slow clients stop reading; with `throttle`, they
/// keep reading instead, one message, then a pause of `throttle`.
pub async fn connect(
    addr: SocketAddr,
    path: &str,
    clients: usize,
    publishers: usize,
    (slow, throttle): (usize, Option<Duration>),
    concurrency: usize,
) -> Fleet {
    let counters = Arc::new(Counters::new());
    let stop = CancellationToken::new();
    let url = format!("ws://{addr}{path}");
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let bar = ProgressBar::new(clients as u64).with_style(
        ProgressStyle::with_template("  connecting {bar:40} {pos}/{len} {elapsed}")
            .expect("progress template"),
    );
    // Exactly `slow` of the non-publishing clients, spread evenly: as k runs
    // over 0..others, k·slow mod others falls below `slow` exactly `slow` times.
    let others = clients.saturating_sub(publishers);
    let slow = slow.min(others);
    let is_slow =
        move |i: usize| slow > 0 && i >= publishers && (i - publishers) * slow % others < slow;
    let fleet_no = fleet_number();
    let started = Instant::now();
    let mut handshakes = JoinSet::new();
    for i in 0..clients {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        let url = url.clone();
        let source = source_addr(fleet_no, i);
        let rcvbuf = is_slow(i).then_some(SLOW_RCVBUF);
        handshakes.spawn(async move {
            let result =
                tokio::time::timeout(Duration::from_secs(15), open(addr, &url, source, rcvbuf))
                    .await
                    .unwrap_or_else(|_| Err("handshake timed out after 15 s".to_string()));
            drop(permit);
            (i, result)
        });
    }
    let mut fleet = Fleet {
        counters,
        connected: 0,
        slow: 0,
        connect_errors: 0,
        first_error: None,
        connect_secs: 0.0,
        sinks: Vec::new(),
        readers: JoinSet::new(),
        stop,
    };
    let mut writers = Vec::new();
    while let Some(joined) = handshakes.join_next().await {
        bar.inc(1);
        let (i, result) = joined.expect("handshake task");
        match result {
            Ok(ws) => {
                fleet.connected += 1;
                let slow = is_slow(i);
                fleet.slow += usize::from(slow);
                let reader = Reader {
                    counters: fleet.counters.clone(),
                    publishers,
                    slow,
                    throttle: throttle.filter(|_| slow),
                    stop: fleet.stop.clone(),
                };
                if i < publishers {
                    let (sink, stream) = ws.split();
                    writers.push((i, sink));
                    fleet.readers.spawn(reader.run(stream));
                } else {
                    fleet.readers.spawn(reader.run(ws));
                }
            }
            Err(err) => {
                fleet.connect_errors += 1;
                fleet.first_error.get_or_insert(err);
            }
        }
    }
    bar.finish_and_clear();
    writers.sort_by_key(|(i, _)| *i);
    fleet.sinks = writers.into_iter().map(|(_, sink)| sink).collect();
    fleet.connect_secs = started.elapsed().as_secs_f64();
    fleet
}

/// A fresh `N` for source addresses `127.N.0.x`: each fleet takes its own,
/// so the ports a previous run left in TIME_WAIT never collide with this
/// run's.
pub fn fleet_number() -> u8 {
    static FLEETS: AtomicU64 = AtomicU64::new(0);
    1 + (FLEETS.fetch_add(1, Ordering::Relaxed) % 250) as u8
}

/// The source address of client `i` of fleet `fleet_no`.
pub fn source_addr(fleet_no: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, fleet_no, 0, 1 + (i / PER_SOURCE) as u8)
}

/// Connects from `source` (with a small receive buffer if `rcvbuf`) and
/// makes the WebSocket handshake for `url`.
pub async fn open(
    addr: SocketAddr,
    url: &str,
    source: Ipv4Addr,
    rcvbuf: Option<u32>,
) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .map_err(|e| format!("bind {source}: {e}"))?;
    if let Some(size) = rcvbuf {
        socket
            .set_recv_buffer_size(size)
            .map_err(|e| format!("SO_RCVBUF: {e}"))?;
    }
    let tcp = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

struct Reader {
    counters: Arc<Counters>,
    publishers: usize,
    slow: bool,
    /// A slow client's pause after each message once publishing starts
    /// (`None`: it stops reading then).
    throttle: Option<Duration>,
    stop: CancellationToken,
}

impl Reader {
    async fn run<S>(self, mut stream: S)
    where
        S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    {
        let counters = &*self.counters;
        let mut last: Vec<Option<u64>> = vec![None; self.publishers];
        let mut latencies = Vec::new();
        let mut ready = false;
        let stopped = self.stop.cancelled();
        tokio::pin!(stopped);
        let throttled = self.throttle.is_some();
        loop {
            if self.slow && counters.publishing.load(Ordering::Relaxed) {
                let Some(pause) = self.throttle else {
                    // Stop reading but keep the connection open until the run ends.
                    stopped.await;
                    return;
                };
                tokio::select! {
                    biased;
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            let msg = tokio::select! {
                biased;
                _ = &mut stopped => break,
                msg = stream.next() => msg,
            };
            let text = match msg {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    counters.record_close(self.slow, throttled, format!("close {code}"));
                    break;
                }
                Some(Ok(Message::Binary(_))) => {
                    counters.other.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => {
                    counters.record_close(self.slow, throttled, format!("error: {err}"));
                    break;
                }
                None => {
                    counters.record_close(self.slow, throttled, "eof".to_string());
                    break;
                }
            };
            match parse(text.as_str()) {
                Some(Payload::Warmup) => {
                    if !ready {
                        ready = true;
                        counters.ready.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Payload::Data {
                    publisher,
                    seq,
                    sent_ns,
                }) if publisher < last.len() => {
                    // A stopped slow client counts nothing; a throttled one
                    // has counts of its own, and no latencies.
                    if self.slow && !throttled {
                        continue;
                    }
                    let (delivered, gaps, reorders) = if self.slow {
                        (
                            &counters.slow_delivered,
                            &counters.slow_gaps,
                            &counters.slow_reorders,
                        )
                    } else {
                        (&counters.delivered, &counters.gaps, &counters.reorders)
                    };
                    delivered.fetch_add(1, Ordering::Relaxed);
                    if !self.slow {
                        latencies.push(now_ns().saturating_sub(sent_ns) / 1000);
                        if latencies.len() >= 256 {
                            counters.record_latencies(&mut latencies);
                        }
                    }
                    let expected = last[publisher].map_or(0, |s| s + 1);
                    if seq > expected {
                        gaps.fetch_add(seq - expected, Ordering::Relaxed);
                    } else if seq < expected {
                        reorders.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    last[publisher] = Some(seq);
                }
                _ => {
                    counters.other.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        counters.record_latencies(&mut latencies);
    }
}

enum Payload {
    Warmup,
    Data {
        publisher: usize,
        seq: u64,
        sent_ns: u64,
    },
}

fn parse(text: &str) -> Option<Payload> {
    let mut fields = text.split(' ');
    match fields.next()? {
        "w" => Some(Payload::Warmup),
        "d" => Some(Payload::Data {
            publisher: fields.next()?.parse().ok()?,
            seq: fields.next()?.parse().ok()?,
            sent_ns: fields.next()?.parse().ok()?,
        }),
        _ => None,
    }
}

/// `d <publisher> <seq> <send time ns> ` padded with `x` to `size` bytes.
fn payload(publisher: usize, seq: u64, sent_ns: u64, size: usize) -> String {
    let mut text = format!("d {publisher} {seq} {sent_ns} ");
    if text.len() < size {
        text.extend(std::iter::repeat_n('x', size - text.len()));
    }
    text
}

impl Fleet {
    /// Clients that keep reading for the whole run.
    pub fn receivers(&self) -> u64 {
        (self.connected - self.slow) as u64
    }

    /// Publisher 0 sends warm-up messages until every client has seen one
    /// (so every subscription is in place), or `limit` passes. Returns
    /// whether every client was ready.
    pub async fn warm_up(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let target = self.connected as u64;
        let Some(sink) = self.sinks.first_mut() else {
            return false;
        };
        while Instant::now() < deadline {
            if self.counters.ready.load(Ordering::Relaxed) >= target {
                return true;
            }
            let sent = tokio::time::timeout(
                Duration::from_secs(1),
                sink.send(Message::text("w warm-up")),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.counters.ready.load(Ordering::Relaxed) >= target
    }

    /// Every publisher sends `messages` messages of `size` bytes at `rate`
    /// per second on a fixed schedule (publishers staggered evenly). Each
    /// payload carries its scheduled send time, so a publisher held back by
    /// the server shows up as latency rather than being hidden. Gives up
    /// `grace` after the schedule ends.
    pub async fn publish(&mut self, messages: u64, rate: f64, size: usize, grace: Duration) {
        self.counters.publishing.store(true, Ordering::Relaxed);
        let interval = Duration::from_secs_f64(1.0 / rate);
        let count = self.sinks.len().max(1) as u32;
        let start = tokio::time::Instant::now() + Duration::from_millis(20);
        let deadline = start + interval * messages as u32 + grace;
        let mut tasks = JoinSet::new();
        for (p, mut sink) in self.sinks.drain(..).enumerate() {
            let counters = self.counters.clone();
            let offset = interval * p as u32 / count;
            tasks.spawn(async move {
                let run = async {
                    for seq in 0..messages {
                        let at = start + offset + interval * seq as u32;
                        tokio::time::sleep_until(at).await;
                        let lateness = tokio::time::Instant::now().saturating_duration_since(at);
                        let sent_ns = now_ns().saturating_sub(lateness.as_nanos() as u64);
                        let text = payload(p, seq, sent_ns, size);
                        if sink.send(Message::text(text)).await.is_err() {
                            break;
                        }
                        counters.sent.fetch_add(1, Ordering::Relaxed);
                    }
                };
                let _ = tokio::time::timeout_at(deadline, run).await;
                sink
            });
        }
        while let Some(joined) = tasks.join_next().await {
            if let Ok(sink) = joined {
                self.sinks.push(sink);
            }
        }
    }

    /// Waits until every receiver has every sent message, nothing has
    /// arrived for `stall`, or `limit` passes.
    pub async fn drain(&self, stall: Duration, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = (u64::MAX, Instant::now());
        loop {
            let delivered = self.counters.delivered.load(Ordering::Relaxed);
            let expected = self.counters.sent.load(Ordering::Relaxed) * self.receivers();
            if delivered >= expected || Instant::now() >= deadline {
                return;
            }
            if delivered != last.0 {
                last = (delivered, Instant::now());
            } else if last.1.elapsed() >= stall {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every reader (flushing their latencies) and closes every socket.
    pub async fn shut(mut self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while self.readers.join_next().await.is_some() {}
        })
        .await;
        self.readers.abort_all();
    }
}

/// Keeps `bar` in step with the delivered count until dropped.
pub fn follow(
    counters: Arc<Counters>,
    bar: ProgressBar,
    receivers: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let expected = counters.sent.load(Ordering::Relaxed) * receivers;
            bar.set_length(expected.max(1));
            bar.set_position(counters.delivered.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}
