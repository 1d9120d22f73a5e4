//! Prometheus metrics: hub counters, server counters, and the time from
//! publish to the socket write, in the Prometheus text format.
//!
//! The registry and the encoding are `prometheus-client`'s (the Prometheus
//! project's own Rust client): wshub never writes the exposition format by
//! hand. Most figures cost nothing on the hot path: a hub's counts are the
//! ones [`Hub::stats`] already keeps, read at scrape time. What is counted
//! only for metrics is counted per session and added to the shared counts
//! in groups (see [`Metrics`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::error::Error;
use crate::hub::{Hub, WeakHub};
use crate::message::CloseCode;
use crate::transport::Meter;

/// Prometheus metrics for hubs and servers, served at a path of a
/// [`Server`](crate::Server) with [`Server::metrics`](crate::Server::metrics)
/// or from your own HTTP route with [`encode`](Self::encode).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use wshub::{Hub, Metrics, Server};
///
/// let metrics = Metrics::new();
/// let hub = Hub::new();
/// metrics.register_hub("chat", &hub).unwrap();
/// let server = Server::new()
///     .metrics("/metrics", metrics.clone()) // GET /metrics; counts this server's sessions
///     .route("/ws", move |mut session| {
///         let hub = hub.clone();
///         async move { session.join(hub.subscribe()).await; }
///     });
/// let text = metrics.encode();
/// assert!(text.contains("wshub_hub_published_total{hub=\"chat\"} 0"));
/// # drop(server);
/// # }
/// ```
///
/// # What it costs
///
/// Hub counts are read at scrape time from the counters the hub keeps
/// anyway. A hub registered here stamps each publish with the time (one
/// clock read per publish, not per delivery); each session's send task
/// reads the clock once per flush and keeps its own latency histogram and
/// byte counts, which it adds to the shared ones every
/// [`SYNC_EVERY`](Self::SYNC_EVERY) recorded messages, at least once a
/// second while it writes, at each ping and when it ends. So a scrape may
/// miss a busy session's last second, or a quiet session's figures since
/// its last ping ([`Config::ping_period`](crate::Config::ping_period)), and
/// nothing is lost. A hub that is not registered, and a session whose
/// [`Config`](crate::Config) has no metrics, pay nothing.
///
/// # Labels
///
/// Hub metrics carry `hub="NAME"`. The number of names is bounded
/// ([`MetricsBuilder::max_hubs`], 256 by default) and so is each name's
/// length ([`MAX_HUB_NAME`](Self::MAX_HUB_NAME) bytes): a registration past
/// either is refused with an error, so that no input can grow the scrape
/// without bound. A hub that is dropped leaves the scrape and frees its name.
/// Close codes are labelled by value for the codes RFC 6455 and IANA
/// define (1000–1015), and as `3xxx`, `4xxx` or `other` beyond them.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl PartialEq for Metrics {
    fn eq(&self, other: &Metrics) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for Metrics {}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hubs = self.inner.hubs.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("Metrics")
            .field("hubs", &hubs.iter().map(|h| &h.name).collect::<Vec<_>>())
            .field("latency_buckets", &self.inner.bounds_seconds)
            .finish()
    }
}

/// Options for [`Metrics`], from [`Metrics::builder`].
#[derive(Clone, Debug)]
pub struct MetricsBuilder {
    buckets: Vec<f64>,
    max_hubs: usize,
}

impl MetricsBuilder {
    /// The upper bounds, in seconds, of the delivery latency histogram's
    /// buckets (`+Inf` is added).
    ///
    /// Default: [`Metrics::DEFAULT_LATENCY_BUCKETS`], 100 µs to 5 s. Each
    /// bucket is one counter per hub and a few bytes per session with a
    /// registered hub; a search over the bounds per message written.
    #[must_use]
    pub fn latency_buckets(mut self, seconds: impl IntoIterator<Item = f64>) -> MetricsBuilder {
        self.buckets = seconds.into_iter().collect();
        self
    }

    /// How many hub names may be registered at once.
    ///
    /// Default: 256. Every name is a label value, and each label value a
    /// set of series in every scrape: bound it to what your Prometheus is
    /// sized for.
    #[must_use]
    pub fn max_hubs(mut self, max: usize) -> MetricsBuilder {
        self.max_hubs = max;
        self
    }

    /// Builds the metrics.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if the buckets are empty, more than
    /// [`Metrics::MAX_BUCKETS`], not finite and positive, or not strictly
    /// increasing.
    pub fn build(self) -> Result<Metrics, Error> {
        let b = &self.buckets;
        if b.is_empty() || b.len() > Metrics::MAX_BUCKETS {
            return Err(Error::Config(format!(
                "latency buckets: {} given, 1 to {} allowed",
                b.len(),
                Metrics::MAX_BUCKETS
            )));
        }
        if let Some(bad) = b.iter().find(|s| !s.is_finite() || **s <= 0.0) {
            return Err(Error::Config(format!(
                "latency bucket {bad} is not a positive number of seconds"
            )));
        }
        if let Some(w) = b.windows(2).find(|w| w[0] >= w[1]) {
            return Err(Error::Config(format!(
                "latency buckets must increase: {} is followed by {}",
                w[0], w[1]
            )));
        }
        let bounds_nanos = b.iter().map(|s| (s * 1e9) as u64).collect();
        Ok(Metrics {
            inner: Arc::new(Inner {
                hubs: Mutex::default(),
                max_hubs: self.max_hubs,
                bounds_seconds: self.buckets.into(),
                bounds_nanos,
                server: ServerCounters::default(),
            }),
        })
    }
}

struct Inner {
    hubs: Mutex<Vec<Registered>>,
    max_hubs: usize,
    bounds_seconds: Arc<[f64]>,
    bounds_nanos: Arc<[u64]>,
    server: ServerCounters,
}

/// A hub registered under a name.
struct Registered {
    name: String,
    hub: WeakHub,
}

/// What servers and sessions count for metrics, in one place for every
/// server and session using these metrics.
#[derive(Default)]
struct ServerCounters {
    open: AtomicI64,
    handshakes: AtomicI64,
    accepted: AtomicU64,
    refused: Mutex<BTreeMap<u16, u64>>,
    closed: Mutex<BTreeMap<(CodeLabel, Direction), u64>>,
    read: AtomicU64,
    written: AtomicU64,
    unlabelled: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The delivery latency histogram's default bucket bounds, in seconds.
    pub const DEFAULT_LATENCY_BUCKETS: [f64; 15] = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ];

    /// The most latency buckets a histogram may have.
    pub const MAX_BUCKETS: usize = 64;

    /// The longest hub name, in bytes.
    pub const MAX_HUB_NAME: usize = 128;

    /// A session adds what it counted to the shared counts after this many
    /// messages written (or a second, a ping, its end).
    pub const SYNC_EVERY: u32 = 64;

    /// The `Content-Type` of [`encode`](Self::encode)'s output: the
    /// Prometheus text format, version 0.0.4.
    pub const CONTENT_TYPE: &'static str =
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

    /// Metrics with the default buckets and at most 256 hub names.
    pub fn new() -> Metrics {
        Self::builder()
            .build()
            .expect("the default buckets are valid")
    }

    /// Options: latency buckets, the bound on hub names.
    pub fn builder() -> MetricsBuilder {
        MetricsBuilder {
            buckets: Self::DEFAULT_LATENCY_BUCKETS.to_vec(),
            max_hubs: 256,
        }
    }

    /// Exports `hub` under the label `hub="name"`, and starts timing its
    /// deliveries.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if the name is empty, longer than
    /// [`MAX_HUB_NAME`](Self::MAX_HUB_NAME) bytes, or already taken by a
    /// live hub; if [`max_hubs`](MetricsBuilder::max_hubs) live hubs are
    /// registered; or if `hub` is already registered (here or elsewhere: a
    /// hub has one name).
    pub fn register_hub(&self, name: &str, hub: &Hub) -> Result<(), Error> {
        if name.is_empty() || name.len() > Self::MAX_HUB_NAME {
            return Err(Error::Config(format!(
                "hub name of {} bytes: 1 to {} allowed",
                name.len(),
                Self::MAX_HUB_NAME
            )));
        }
        let mut hubs = self.inner.hubs.lock().unwrap_or_else(|p| p.into_inner());
        hubs.retain(|h| h.hub.is_alive());
        if hubs.iter().any(|h| h.name == name) {
            return Err(Error::Config(format!(
                "a hub named {name:?} is already registered"
            )));
        }
        if hubs.len() >= self.inner.max_hubs {
            return Err(Error::Config(format!(
                "{} hubs are registered, the most these metrics label ({name:?} refused)",
                hubs.len()
            )));
        }
        let latency = Arc::new(Latency::new(self.inner.bounds_nanos.clone()));
        if !hub.time_deliveries(latency) {
            return Err(Error::Config(format!(
                "this hub is already registered for metrics under another name ({name:?} refused)"
            )));
        }
        hubs.push(Registered {
            name: name.to_owned(),
            hub: hub.downgrade(),
        });
        Ok(())
    }

    /// Every metric, in the Prometheus text format
    /// ([`CONTENT_TYPE`](Self::CONTENT_TYPE)).
    pub fn encode(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut out = String::new();
        // Writing to a String cannot fail, and the collector never fails.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }

    /// Adds these metrics to your own `prometheus-client` registry, to be
    /// encoded with the rest of your service's metrics.
    pub fn register(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(Collect(self.inner.clone())));
    }

    pub(crate) fn handshake_started(&self) -> HandshakeGuard {
        self.inner.server.handshakes.fetch_add(1, Relaxed);
        HandshakeGuard(self.clone())
    }

    pub(crate) fn upgrade_accepted(&self) {
        self.inner.server.accepted.fetch_add(1, Relaxed);
    }

    pub(crate) fn upgrade_refused(&self, status: u16) {
        bump(&self.inner.server.refused, status);
    }

    pub(crate) fn session_opened(&self) {
        self.inner.server.open.fetch_add(1, Relaxed);
    }

    /// A session ended: `code` is its close code, `by_peer` whether the
    /// client's Close frame gave it.
    pub(crate) fn session_closed(&self, code: CloseCode, by_peer: bool) {
        self.inner.server.open.fetch_sub(1, Relaxed);
        let code = u16::from(code);
        let direction = match (code, by_peer) {
            (1005..=1006 | 1015, false) => Direction::None,
            (_, true) => Direction::Received,
            (_, false) => Direction::Sent,
        };
        bump(&self.inner.server.closed, (CodeLabel::of(code), direction));
    }

    /// A hub was not exported: the labels are at their bound.
    pub(crate) fn hub_unlabelled(&self) {
        self.inner.server.unlabelled.fetch_add(1, Relaxed);
    }

    pub(crate) fn add_bytes(&self, read: u64, written: u64) {
        if read > 0 {
            self.inner.server.read.fetch_add(read, Relaxed);
        }
        if written > 0 {
            self.inner.server.written.fetch_add(written, Relaxed);
        }
    }
}

/// Adds one to `key`'s count (rare events: refusals, closes).
fn bump<K: Ord>(counts: &Mutex<BTreeMap<K, u64>>, key: K) {
    let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
    *counts.entry(key).or_default() += 1;
}

/// Counts a handshake in flight until dropped.
pub(crate) struct HandshakeGuard(Metrics);

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        self.0.inner.server.handshakes.fetch_sub(1, Relaxed);
    }
}

/// The close code as a label value: the defined codes by value, the
/// registered and private ranges as one value each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum CodeLabel {
    Defined(u16),
    Registered,
    Private,
    Other,
}

impl CodeLabel {
    fn of(code: u16) -> CodeLabel {
        match code {
            1000..=1015 => CodeLabel::Defined(code),
            3000..=3999 => CodeLabel::Registered,
            4000..=4999 => CodeLabel::Private,
            _ => CodeLabel::Other,
        }
    }

    fn text(self) -> String {
        match self {
            CodeLabel::Defined(code) => code.to_string(),
            CodeLabel::Registered => "3xxx".into(),
            CodeLabel::Private => "4xxx".into(),
            CodeLabel::Other => "other".into(),
        }
    }
}

/// Which side's Close frame gave a session its close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Direction {
    /// The server sent it first.
    Sent,
    /// The client sent it first.
    Received,
    /// No Close frame: the connection was lost (1006).
    None,
}

impl Direction {
    fn text(self) -> &'static str {
        match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
            Direction::None => "none",
        }
    }
}

/// Nanoseconds since an instant early in the process, plus one: 0 means
/// "not stamped".
pub(crate) fn now_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
}

/// One hub's delivery latency histogram, shared by its subscribers' send
/// tasks. Buckets are not cumulative here; the encoder sums them.
pub(crate) struct Latency {
    bounds: Arc<[u64]>,
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Latency {
    fn new(bounds: Arc<[u64]>) -> Latency {
        Latency {
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            bounds,
            sum_nanos: AtomicU64::new(0),
        }
    }
}

/// One send task's share of a hub's latency histogram: the publish stamps
/// of the messages written since the last flush, and what it recorded but
/// has not added to the shared histogram yet.
pub(crate) struct Recorder {
    shared: Arc<Latency>,
    stamps: Vec<u64>,
    counts: Box<[u32]>,
    sum: u64,
    recorded: u32,
    merged_at: u64,
}

impl Recorder {
    pub(crate) fn new(shared: Arc<Latency>) -> Recorder {
        Recorder {
            counts: vec![0; shared.buckets.len()].into(),
            shared,
            stamps: Vec::new(),
            sum: 0,
            recorded: 0,
            merged_at: now_nanos(),
        }
    }

    /// A message published at `stamp` is queued for the socket.
    pub(crate) fn queued(&mut self, stamp: u64) {
        if stamp != 0 {
            self.stamps.push(stamp);
        }
    }

    /// Whether messages await [`written`](Self::written).
    pub(crate) fn has_queued(&self) -> bool {
        !self.stamps.is_empty()
    }

    /// Everything queued was written to the socket at `now`.
    pub(crate) fn written(&mut self, now: u64) {
        for stamp in self.stamps.drain(..) {
            let took = now.saturating_sub(stamp);
            let bucket = self.shared.bounds.partition_point(|&b| b < took);
            self.counts[bucket] += 1;
            self.sum += took;
            self.recorded += 1;
        }
        if self.recorded >= Metrics::SYNC_EVERY || now.saturating_sub(self.merged_at) >= SECOND {
            self.merge(now);
        }
    }

    /// Adds what was recorded to the shared histogram.
    pub(crate) fn merge(&mut self, now: u64) {
        self.merged_at = now;
        if self.recorded == 0 {
            return;
        }
        for (shared, local) in self.shared.buckets.iter().zip(self.counts.iter_mut()) {
            if *local > 0 {
                shared.fetch_add(u64::from(std::mem::take(local)), Relaxed);
            }
        }
        self.shared.sum_nanos.fetch_add(self.sum, Relaxed);
        self.sum = 0;
        self.recorded = 0;
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.merge(now_nanos());
    }
}

const SECOND: u64 = 1_000_000_000;

/// One session's counts: open until dropped, and its bytes, added to the
/// shared counts now and then.
pub(crate) struct SessionMeter {
    metrics: Metrics,
    meter: Meter,
    read: u64,
    written: u64,
    synced_at: u64,
    closed: bool,
}

impl SessionMeter {
    pub(crate) fn new(metrics: Metrics, meter: Meter) -> SessionMeter {
        metrics.session_opened();
        SessionMeter {
            metrics,
            meter,
            read: 0,
            written: 0,
            synced_at: now_nanos(),
            closed: false,
        }
    }

    /// Adds the bytes since the last sync if a second has passed or 64 KiB
    /// have been written.
    pub(crate) fn maybe_sync(&mut self, now: u64) {
        if now.saturating_sub(self.synced_at) >= SECOND
            || self.meter.written() - self.written >= 64 << 10
        {
            self.sync(now);
        }
    }

    /// Adds the bytes since the last sync.
    pub(crate) fn sync(&mut self, now: u64) {
        self.synced_at = now;
        let (read, written) = (self.meter.read(), self.meter.written());
        self.metrics.add_bytes(
            read - self.read.min(read),
            written - self.written.min(written),
        );
        self.read = read;
        self.written = written;
    }

    /// The session ended with `code`, from the client's Close frame if `by_peer`.
    pub(crate) fn closed(&mut self, code: CloseCode, by_peer: bool) {
        if !std::mem::replace(&mut self.closed, true) {
            self.sync(now_nanos());
            self.metrics.session_closed(code, by_peer);
        }
    }
}

impl Drop for SessionMeter {
    /// A send task aborted (a server's shutdown timeout) ends its session
    /// as a lost connection.
    fn drop(&mut self) {
        self.closed(CloseCode::Abnormal, false);
    }
}

/// The scrape-time collector: reads every live registered hub's stats and
/// the server counters.
#[derive(Debug)]
struct Collect(Arc<Inner>);

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

type HubRow = (String, crate::hub::HubStats, Arc<Latency>);

impl Collect {
    fn hubs(&self) -> Vec<HubRow> {
        let mut hubs = self.0.hubs.lock().unwrap_or_else(|p| p.into_inner());
        hubs.retain(|h| h.hub.is_alive());
        hubs.iter()
            .filter_map(|h| {
                let hub = h.hub.upgrade()?;
                // A registered hub is timed into the histogram made for it.
                let latency = hub.latency()?.clone();
                Some((h.name.clone(), hub.stats(), latency))
            })
            .collect()
    }
}

/// Encodes one family with a value per hub.
fn hub_family(
    encoder: &mut DescriptorEncoder<'_>,
    hubs: &[HubRow],
    name: &str,
    help: &str,
    kind: MetricType,
    value: impl Fn(&crate::hub::HubStats) -> u64,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (hub, stats, _) in hubs {
        let labels = [("hub", hub.as_str())];
        let mut metric = family.encode_family(&labels)?;
        let v = value(stats);
        match kind {
            MetricType::Counter => metric.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
            _ => metric.encode_gauge(&(v as i64))?,
        }
    }
    Ok(())
}

/// Encodes one counter family with a value per label set.
fn labelled_counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, n) in rows {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
    }
    Ok(())
}

fn counter(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn gauge(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v.max(0))
}

impl Collector for Collect {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        use MetricType::{Counter, Gauge};
        let hubs = self.hubs();
        let e = &mut encoder;
        type Row = (
            &'static str,
            &'static str,
            MetricType,
            fn(&crate::hub::HubStats) -> u64,
        );
        let rows: [Row; 13] = [
            (
                "wshub_hub_subscribers",
                "Current subscribers of the hub.",
                Gauge,
                |s| s.subscribers as u64,
            ),
            (
                "wshub_hub_buffered_messages",
                "Messages the hub buffers now, for its slowest subscriber.",
                Gauge,
                |s| s.buffered as u64,
            ),
            (
                "wshub_hub_buffered_bytes",
                "Payload bytes the hub buffers now (when max_bytes bounds them).",
                Gauge,
                |s| s.buffered_bytes as u64,
            ),
            (
                "wshub_hub_stalled_subscribers",
                "Subscribers keeping a Suspend hub's buffer full now.",
                Gauge,
                |s| s.stalled as u64,
            ),
            (
                "wshub_hub_published",
                "Publishes that entered the hub's buffer.",
                Counter,
                |s| s.published,
            ),
            (
                "wshub_hub_no_subscriber_publishes",
                "Publishes made while the hub had no subscriber.",
                Counter,
                |s| s.no_subscribers,
            ),
            (
                "wshub_hub_dropped",
                "Messages discarded at publish (DropLatest, full buffer).",
                Counter,
                |s| s.dropped,
            ),
            (
                "wshub_hub_evicted",
                "Oldest messages evicted before every subscriber read them (DropOldest, Disconnect).",
                Counter,
                |s| s.evicted,
            ),
            (
                "wshub_hub_lagged",
                "Messages subscribers skipped because they lagged, summed over subscribers.",
                Counter,
                |s| s.lagged,
            ),
            (
                "wshub_hub_delivered",
                "Messages subscribers received, summed over subscribers.",
                Counter,
                |s| s.delivered,
            ),
            (
                "wshub_hub_unread",
                "Messages still waiting for a subscriber when it left, summed over subscribers.",
                Counter,
                |s| s.unread,
            ),
            (
                "wshub_hub_disconnected",
                "Sessions the hub closed for being too slow.",
                Counter,
                |s| s.disconnected,
            ),
            (
                "wshub_hub_rate_limited",
                "Messages clients sent over their publish rate limit.",
                Counter,
                |s| s.rate_limited,
            ),
        ];
        for (name, help, kind, value) in rows {
            hub_family(e, &hubs, name, help, kind, value)?;
        }
        let bounds = &self.0.bounds_seconds;
        let mut family = e.encode_descriptor(
            "wshub_delivery_latency_seconds",
            "Time from a publish to the write of the message to a subscriber's socket.",
            None,
            MetricType::Histogram,
        )?;
        for (hub, _, latency) in &hubs {
            let labels = [("hub", hub.as_str())];
            // Per bucket, not cumulative: the encoder sums them, and their
            // total is the count, read from the same loads.
            let buckets: Vec<(f64, u64)> = latency
                .buckets
                .iter()
                .zip(bounds.iter().copied().chain([f64::INFINITY]))
                .map(|(count, bound)| (bound, count.load(Relaxed)))
                .collect();
            let count = buckets.iter().map(|(_, n)| n).sum();
            let sum = latency.sum_nanos.load(Relaxed) as f64 / 1e9;
            family
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        let s = &self.0.server;
        gauge(
            e,
            "wshub_sessions_open",
            "WebSocket sessions open now.",
            s.open.load(Relaxed),
        )?;
        gauge(
            e,
            "wshub_handshakes_in_flight",
            "Connections in their HTTP phase (TLS and the upgrade request) now.",
            s.handshakes.load(Relaxed),
        )?;
        counter(
            e,
            "wshub_upgrades_accepted",
            "Upgrade requests answered with 101.",
            s.accepted.load(Relaxed),
        )?;
        let refused = s.refused.lock().unwrap_or_else(|p| p.into_inner()).clone();
        labelled_counters(
            e,
            "wshub_upgrades_refused",
            "Requests refused with an HTTP status instead of an upgrade, by status.",
            refused
                .into_iter()
                .map(|(status, n)| ([("status", status.to_string())], n)),
        )?;
        let closed = s.closed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        labelled_counters(
            e,
            "wshub_sessions_closed",
            "Sessions ended, by close code and by whose Close frame gave it \
             (sent: the server's, received: the client's, none: no Close frame).",
            closed.into_iter().map(|((code, direction), n)| {
                let labels = [
                    ("code", code.text()),
                    ("direction", direction.text().to_owned()),
                ];
                (labels, n)
            }),
        )?;
        counter(
            e,
            "wshub_received_bytes",
            "Bytes read from WebSocket sessions' sockets.",
            s.read.load(Relaxed),
        )?;
        counter(
            e,
            "wshub_sent_bytes",
            "Bytes written to WebSocket sessions' sockets.",
            s.written.load(Relaxed),
        )?;
        counter(
            e,
            "wshub_metrics_unlabelled_hubs",
            "Topics' hubs not exported because the metrics label as many hubs as they may.",
            s.unlabelled.load(Relaxed),
        )?;
        Ok(())
    }
}
