//! The server process's write syscalls, counted by the kernel's syscall
//! tracepoints through `perf stat -p PID` while a run lasts.
//!
//! The kernel's own per-process count (`syscw` in `/proc/PID/io`) covers
//! the VFS write path only (`write`, `writev`), not the `send` that Rust's
//! `TcpStream::write` is, so it cannot say how many writes a delivery costs.
//! The tracepoints see every one: `write`, `writev`, `sendto` (what `send`
//! is) and `sendmsg`. Counting them needs `perf` and read access to the
//! tracepoints (root, or `kernel.perf_event_paranoid` at -1); without them
//! the figure is missing (`-`, `null` in the JSON), never 0.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The syscalls counted, by the name the report gives them.
const SYSCALLS: [&str; 4] = ["write", "writev", "sendto", "sendmsg"];

fn event(syscall: &str) -> String {
    format!("syscalls:sys_enter_{syscall}")
}

fn events() -> String {
    SYSCALLS.map(event).join(",")
}

/// Whether this machine can count: checked once, with `perf stat` on a
/// command that writes.
pub fn available() -> Result<(), String> {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let output = Command::new("perf")
                .args(["stat", "-x", ",", "-e", &events(), "--", "true"])
                .stdout(Stdio::null())
                .output()
                .map_err(|e| {
                    format!("perf: {e} (apt-get install linux-perf to count write syscalls)")
                })?;
            let counts = parse(&String::from_utf8_lossy(&output.stderr));
            if output.status.success() && counts.len() == SYSCALLS.len() {
                Ok(())
            } else {
                Err(format!(
                    "perf cannot read the syscall tracepoints (needs root or \
                     kernel.perf_event_paranoid = -1): {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        })
        .clone()
}

/// `perf stat` attached to a process, counting its write syscalls.
pub struct WriteCounter {
    perf: Child,
}

impl WriteCounter {
    /// Starts counting the writes of every thread `pid` has now (a server's
    /// runtime threads are all up once it listens).
    pub fn start(pid: u32) -> Result<WriteCounter, String> {
        available()?;
        let perf = Command::new("perf")
            .args(["stat", "-x", ",", "-e", &events(), "-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("perf: {e}"))?;
        Ok(WriteCounter { perf })
    }

    /// Stops counting: the writes seen, by syscall.
    pub fn stop(mut self) -> Result<BTreeMap<String, u64>, String> {
        let pid = Pid::from_raw(self.perf.id() as i32);
        kill(pid, Signal::SIGINT).map_err(|e| format!("stopping perf: {e}"))?;
        let mut text = String::new();
        if let Some(mut stderr) = self.perf.stderr.take() {
            stderr
                .read_to_string(&mut text)
                .map_err(|e| format!("reading perf's counts: {e}"))?;
        }
        let _ = self.perf.wait();
        let counts = parse(&text);
        if counts.len() == SYSCALLS.len() {
            Ok(counts)
        } else {
            Err(format!("perf counted no writes: {}", text.trim()))
        }
    }
}

impl Drop for WriteCounter {
    fn drop(&mut self) {
        let _ = self.perf.kill();
        let _ = self.perf.wait();
    }
}

/// The counts in `perf stat -x ,` output: `count,unit,event,...` lines; a
/// count perf could not take (`<not counted>`, `<not supported>`) is left
/// out.
fn parse(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(',');
            let count = fields.next()?.trim().parse::<u64>().ok()?;
            let name = fields.nth(1)?.trim();
            let syscall = SYSCALLS.iter().find(|s| event(s) == name)?;
            Some((syscall.to_string(), count))
        })
        .collect()
}
