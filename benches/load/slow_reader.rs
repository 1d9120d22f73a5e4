//! The `slow-reader` scenario's own figures and checks: what each
//! slow-client policy did when a few clients keep reading, but at half the
//! publish rate, and whether the hub's counters agree with what the clients
//! saw.

use std::collections::BTreeMap;

use serde::Serialize;
use wshub::Policy;

use crate::{RunResult, ServerStats, Summary, fmt_opt, median};

/// The hub counters the scenario reads, as differences over the measured
/// window (after the warm-up until the end of the run).
const COUNTERS: [&str; 5] = ["published", "dropped", "evicted", "lagged", "disconnected"];

/// One run's slow-reader figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlowReaderRun {
    /// The hub's policy (`None` for a server without one).
    pub policy: Option<String>,
    /// The hub counters over the window; a counter the server did not
    /// report is missing.
    pub counters: BTreeMap<String, u64>,
    /// Throttled clients.
    pub slow_readers: usize,
    /// Data messages they received.
    pub slow_received: u64,
    /// Messages missing from the sequence they received.
    pub slow_gaps: u64,
    /// Messages they received after a later one.
    pub slow_reorders: u64,
    /// How the server closed them, by close code or error.
    pub slow_closed: BTreeMap<String, u64>,
    /// Messages the other clients did not get (sent × clients − delivered).
    pub fast_lost: u64,
    /// Of those, the ones the policy discards for every subscriber
    /// (`dropped` × clients under drop-latest).
    pub fast_lost_by_policy: u64,
    /// What did not add up; the scenario fails if any run has one.
    pub problems: Vec<String>,
}

/// The counters of `start` and `end`, `end − start` for each of
/// [`COUNTERS`] both report.
fn window(start: &ServerStats, end: &ServerStats) -> BTreeMap<String, u64> {
    COUNTERS
        .iter()
        .filter_map(|&k| {
            let (a, b) = (start.counters.get(k)?, end.counters.get(k)?);
            Some((k.to_string(), b.saturating_sub(*a)))
        })
        .collect()
}

/// Figures and checks of one run of `policy` (after the warm-up: `start`;
/// at the end: `end`).
pub fn figures(
    result: &RunResult,
    policy: Option<Policy>,
    start: &ServerStats,
    end: &ServerStats,
    slow: (u64, u64, u64, BTreeMap<String, u64>),
) -> SlowReaderRun {
    let (slow_received, slow_gaps, slow_reorders, slow_closed) = slow;
    let counters = window(start, end);
    let get = |k: &str| counters.get(k).copied();
    let receivers = result.receivers;
    let mut problems = Vec::new();
    let fast_lost = result.expected.saturating_sub(result.delivered);
    let mut fast_lost_by_policy = 0;
    if result.reorders > 0 {
        problems.push(format!(
            "fast clients got {} messages out of order",
            result.reorders
        ));
    }
    if !result.closed_by_server.is_empty() {
        problems.push(format!(
            "fast clients were closed: {:?}",
            result.closed_by_server
        ));
    }
    let slow_closed_n: u64 = slow_closed.values().sum();
    match (get("published"), get("dropped"), get("disconnected")) {
        (Some(published), Some(dropped), Some(disconnected)) => {
            if published + dropped != result.sent {
                problems.push(format!(
                    "the publisher sent {} messages; the hub queued {published} and dropped {dropped}",
                    result.sent
                ));
            }
            // Every queued message reaches every fast client, exactly once.
            if result.delivered != published * receivers {
                problems.push(format!(
                    "fast clients got {} messages, {} expected ({published} queued × {receivers})",
                    result.delivered,
                    published * receivers
                ));
            }
            if policy == Some(Policy::DropLatest) {
                // Drop-latest discards into the shared buffer: lost for all.
                // (A client sees a gap when the next message arrives, so
                // drops after the last delivered one are lost but no gap.)
                fast_lost_by_policy = dropped * receivers;
                if fast_lost != fast_lost_by_policy || result.gaps > fast_lost {
                    problems.push(format!(
                        "fast clients lost {fast_lost} (gaps {}); drop-latest dropped \
                         {dropped} × {receivers}",
                        result.gaps
                    ));
                }
            } else if fast_lost > 0 || result.gaps > 0 {
                problems.push(format!(
                    "A FAST CLIENT LOST MESSAGES: {fast_lost} missing, {} gaps",
                    result.gaps
                ));
            }
            if disconnected != slow_closed_n {
                problems.push(format!(
                    "the hub disconnected {disconnected}; slow readers saw {slow_closed_n} closes"
                ));
            }
        }
        _ => problems.push("the server reported no hub counters".to_string()),
    }
    let slow_readers = result.slow;
    let n = slow_readers as u64;
    let zero = |problems: &mut Vec<String>, names: &[&str]| {
        for &k in names {
            if let Some(v) = get(k).filter(|v| *v > 0) {
                problems.push(format!("{k} = {v}, expected 0"));
            }
        }
    };
    match policy {
        _ if slow_readers == 0 => {
            zero(
                &mut problems,
                &["dropped", "evicted", "lagged", "disconnected"],
            );
        }
        Some(Policy::Disconnect) => {
            zero(&mut problems, &["dropped"]);
            if get("disconnected") != Some(n) {
                problems.push(format!(
                    "disconnected {}, expected exactly {n}",
                    fmt_opt(get("disconnected").map(|v| v as f64), 0)
                ));
            }
            if slow_closed.get("close 1013") != Some(&n) {
                problems.push(format!(
                    "slow readers closed {slow_closed:?}, expected {n} × 1013"
                ));
            }
        }
        Some(Policy::DropOldest) => {
            zero(&mut problems, &["dropped", "disconnected"]);
            let lagged = get("lagged").unwrap_or(0);
            if slow_gaps == 0 || lagged == 0 {
                problems.push(format!(
                    "drop-oldest never acted (slow readers' gaps {slow_gaps}, lagged {lagged})"
                ));
            }
            // A skip is counted by the hub when the session takes it, and by
            // the client when it reads the message after it.
            if slow_gaps > lagged {
                problems.push(format!(
                    "slow readers saw {slow_gaps} gaps, more than the {lagged} the hub counted"
                ));
            }
        }
        Some(Policy::DropLatest) => {
            zero(&mut problems, &["evicted", "lagged"]);
            let dropped = get("dropped").unwrap_or(0);
            if dropped == 0 {
                problems.push("drop-latest never acted (dropped 0)".to_string());
            }
            if slow_gaps > dropped * n {
                problems.push(format!(
                    "slow readers saw {slow_gaps} gaps, more than {dropped} dropped × {n}"
                ));
            }
        }
        Some(Policy::Suspend) => {
            zero(&mut problems, &["dropped", "evicted", "lagged"]);
            if slow_gaps > 0 {
                problems.push(format!(
                    "suspend lost {slow_gaps} messages for slow readers"
                ));
            }
        }
        None => {}
    }
    if slow_reorders > 0 {
        problems.push(format!(
            "slow readers got {slow_reorders} messages out of order"
        ));
    }
    SlowReaderRun {
        policy: policy.map(|p| p.to_string()),
        counters,
        slow_readers,
        slow_received,
        slow_gaps,
        slow_reorders,
        slow_closed,
        fast_lost,
        fast_lost_by_policy,
        problems,
    }
}

/// Prints the policy table (medians over runs) with each policy's latency
/// against the run without slow readers; returns whether a check failed.
pub fn report(results: &[RunResult], summaries: &[Summary]) -> bool {
    let Some(calm) = summaries
        .iter()
        .find(|s| s.server.contains("no slow readers"))
    else {
        eprintln!("slow-reader: the run without slow readers is missing");
        return true;
    };
    println!(
        "\n  other clients' latency against the run without slow readers; hub counters over the window \
         (medians of {} run(s))",
        calm.runs
    );
    println!(
        "  {:<24} {:>8} {:>8} {:>7} {:>7} {:>9} {:>7} {:>7} {:>7} {:>7} {:>9} {:>8} {:>9} {:>8} {:>8} {:>5}",
        "server",
        "p50 ms",
        "p99 ms",
        "×p50",
        "×p99",
        "published",
        "dropped",
        "evicted",
        "lagged",
        "discon",
        "slow rcvd",
        "slow gap",
        "fast lost",
        "RSS conn",
        "RSS end",
        "ok"
    );
    let mut failed = false;
    for s in summaries {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.server == s.server).collect();
        let figures: Vec<&SlowReaderRun> =
            runs.iter().filter_map(|r| r.slow_reader.as_ref()).collect();
        let med = |f: &dyn Fn(&SlowReaderRun) -> Option<f64>| {
            let values: Vec<f64> = figures.iter().filter_map(|r| f(r)).collect();
            (!values.is_empty()).then(|| median(values))
        };
        let counter = |k: &'static str| med(&move |r| r.counters.get(k).map(|&v| v as f64));
        let ok = figures.iter().all(|r| r.problems.is_empty()) && figures.len() == s.runs;
        failed |= !ok;
        println!(
            "  {:<24} {:>8.2} {:>8.2} {:>7.2} {:>7.2} {:>9} {:>7} {:>7} {:>7} {:>7} {:>9} {:>8} {:>9} {:>8} {:>8} {:>5}",
            s.server,
            s.p50_ms,
            s.p99_ms,
            s.p50_ms / calm.p50_ms,
            s.p99_ms / calm.p99_ms,
            fmt_opt(counter("published"), 0),
            fmt_opt(counter("dropped"), 0),
            fmt_opt(counter("evicted"), 0),
            fmt_opt(counter("lagged"), 0),
            fmt_opt(counter("disconnected"), 0),
            fmt_opt(med(&|r| Some(r.slow_received as f64)), 0),
            fmt_opt(med(&|r| Some(r.slow_gaps as f64)), 0),
            fmt_opt(med(&|r| Some(r.fast_lost as f64)), 0),
            fmt_opt(s.server_rss_connected_mib, 1),
            fmt_opt(s.server_rss_end_mib, 1),
            if ok { "yes" } else { "NO" }
        );
    }
    for r in results {
        let Some(f) = &r.slow_reader else { continue };
        if f.fast_lost_by_policy > 0 {
            println!(
                "  {} run {}: the other clients lost {} messages (each the {} drop-latest \
                 discarded from the shared buffer)",
                r.server,
                r.run + 1,
                f.fast_lost_by_policy,
                f.counters.get("dropped").copied().unwrap_or(0)
            );
        }
        if !f.slow_closed.is_empty() {
            println!(
                "  {} run {}: slow readers closed: {:?}",
                r.server,
                r.run + 1,
                f.slow_closed
            );
        }
        for problem in &f.problems {
            eprintln!(
                "  slow-reader FAILED: {} run {}: {problem}",
                r.server,
                r.run + 1
            );
        }
    }
    if summaries.iter().any(|s| {
        results
            .iter()
            .filter(|r| r.server == s.server)
            .any(|r| r.slow_reader.is_none())
    }) {
        eprintln!("  slow-reader FAILED: a run has no slow-reader figures");
        failed = true;
    }
    failed
}
