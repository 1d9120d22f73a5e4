//! Process accounting: open-file limit, CPU time, resident memory and
//! context switches.

use std::io;

use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage, setrlimit};
use nix::sys::time::TimeValLike;

/// The open-file limit after raising the soft limit to the hard one.
#[derive(Debug, Clone, Copy)]
pub struct FileLimit {
    /// The soft limit this process now runs with.
    pub soft: u64,
    /// The hard limit, which only root outside this sandbox could raise.
    pub hard: u64,
}

/// Raises `RLIMIT_NOFILE`'s soft limit to its hard limit, so nobody has to
/// run `ulimit -n` before a benchmark.
pub fn raise_file_limit() -> io::Result<FileLimit> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    Ok(FileLimit { soft, hard })
}

/// User and system CPU time this process has used, in microseconds, from
/// the kernel's own accounting (`getrusage`).
pub fn own_cpu_micros() -> (u64, u64) {
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(usage) => (
            usage.user_time().num_microseconds() as u64,
            usage.system_time().num_microseconds() as u64,
        ),
        Err(_) => (0, 0),
    }
}

/// CPU time of another process in microseconds, from `/proc/PID/stat`
/// (user + system clock ticks; Linux reports them at 100 per second).
pub fn process_cpu_micros(pid: u32) -> io::Result<u64> {
    let (user, system) = process_cpu_split(pid)?;
    Ok(user + system)
}

/// User and system CPU time of another process in microseconds, from the
/// clock ticks of `/proc/PID/stat` at the kernel's `CLK_TCK` rate.
pub fn process_cpu_split(pid: u32) -> io::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("unreadable /proc stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) sit at 11 and 12.
    let ticks = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("unreadable /proc stat"))
    };
    let per_tick = 1_000_000 / clock_ticks_per_sec();
    Ok((ticks(11)? * per_tick, ticks(12)? * per_tick))
}

/// The kernel's clock ticks per second (`sysconf(_SC_CLK_TCK)`, read once
/// through `getconf CLK_TCK`; 100, Linux's value everywhere, if that fails).
pub fn clock_ticks_per_sec() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|&t: &u64| t > 0 && t <= 1_000_000)
            .unwrap_or(100)
    })
}

/// Resident set size in KiB of `pid`, or of this process when `None`.
pub fn rss_kib(pid: Option<u32>) -> io::Result<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path)?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::other("no VmRSS line"))
}

/// Voluntary and involuntary context switches of this process so far, from
/// `getrusage(RUSAGE_SELF)` (`ru_nvcsw`, `ru_nivcsw`), summed over its
/// threads.
pub fn own_context_switches() -> Option<(u64, u64)> {
    let usage = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    Some((
        u64::try_from(usage.voluntary_context_switches()).ok()?,
        u64::try_from(usage.involuntary_context_switches()).ok()?,
    ))
}

/// Voluntary and involuntary context switches of another process, summed
/// over its threads: `voluntary_ctxt_switches` and
/// `nonvoluntary_ctxt_switches` of each `/proc/PID/task/*/status`.
pub fn process_context_switches(pid: u32) -> Option<(u64, u64)> {
    let (mut voluntary, mut involuntary) = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        voluntary += field("voluntary_ctxt_switches:")?;
        involuntary += field("nonvoluntary_ctxt_switches:")?;
    }
    Some((voluntary, involuntary))
}
