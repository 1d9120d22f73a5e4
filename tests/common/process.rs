//! Child processes for the tests that drive real programs: the example
//! binaries (built on demand, started on a loopback port, their logged
//! address parsed), and a Python interpreter with the `websockets` package,
//! provisioned into a virtual environment under `target/` when the system's
//! lacks it.
//!
//! The Python helper fails, rather than skips, only when provisioning is
//! impossible (no `python3`, no `venv` module, no package index), with the
//! one command to run. `WSHUB_PYTHON` names another interpreter than
//! `python3`.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to print its address.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long building an example may take (a cold debug build on 2 cores).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// The `websockets` the suite installs for itself when the interpreter has
/// none (15.0.1 supports Python 3.9 to 3.13).
pub const WEBSOCKETS: &str = "websockets==15.0.1";
/// How long making the virtual environment and installing into it may take.
pub const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

pub const PIP_HINT: &str = "The interop tests need Python 3 with the `websockets` package, \
                            which they install into a virtual environment under target/ \
                            when the interpreter lacks it; where that cannot work, run \
                            `python3 -m pip install websockets==15.0.1`, or set WSHUB_PYTHON \
                            to an interpreter that has it";

/// A running example server; killed (and reaped) when dropped.
pub struct ExampleProcess {
    child: Child,
    /// The address it logged it listens on.
    pub addr: SocketAddr,
    /// The log line that named it.
    pub banner: String,
    /// Everything it printed so far, stdout and stderr.
    log: Arc<Mutex<Vec<String>>>,
}

impl ExampleProcess {
    /// Starts `binary` with `args` and waits for the line that names its
    /// address: the address follows `marker` (such as `"sharedflow on
    /// ws://"`) and ends at a `/`, a space or the end of the line.
    pub fn start(binary: &Path, args: &[&str], marker: &str) -> Result<ExampleProcess, String> {
        let mut child = Command::new(binary)
            .args(args)
            // The banner is an INFO event; ask for it whatever the caller's RUST_LOG.
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| format!("spawn {}: {err}", binary.display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        // Keep draining both pipes for the life of the process, so it never
        // blocks on a full pipe; the channel closes when both reach EOF.
        forward_lines(child.stdout.take(), log.clone(), tx.clone());
        forward_lines(child.stderr.take(), log.clone(), tx);
        let mut server = ExampleProcess {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            banner: String::new(),
            log,
        };

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let Some(rest) = line.split(marker).nth(1) else {
                        continue;
                    };
                    let addr = rest.split(['/', ' ']).next().unwrap_or_default();
                    server.addr = addr
                        .parse()
                        .map_err(|err| format!("bad address {addr:?} in {line:?}: {err}"))?;
                    server.banner = line;
                    return Ok(server);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = server.child.wait().ok();
                    return Err(format!(
                        "it exited ({status:?}) before logging its address:\n{}",
                        server.log()
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no {marker:?} line within {START_TIMEOUT:?}:\n{}",
                        server.log()
                    ));
                }
            }
        }
    }

    /// `ws://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Everything it printed so far.
    pub fn log(&self) -> String {
        let lines = self.log.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Its process id, to send it a signal.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for it to exit by itself; `None` if it did not.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Kills it and waits for it to exit; returns how it exited.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for ExampleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `pipe` line by line on a thread: ANSI colours stripped, each line
/// kept in `log` and sent on `tx` (while anyone listens).
fn forward_lines(
    pipe: Option<impl Read + Send + 'static>,
    log: Arc<Mutex<Vec<String>>>,
    tx: mpsc::Sender<String>,
) {
    let Some(pipe) = pipe else { return };
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let line = strip_ansi(&line);
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(line.clone());
            let _ = tx.send(line);
        }
    });
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), in case colours are on.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The crate features this test binary was built with.
fn suite_features() -> impl Iterator<Item = &'static str> {
    [
        ("tls", cfg!(feature = "tls")),
        ("axum", cfg!(feature = "axum")),
        ("redis", cfg!(feature = "redis")),
    ]
    .into_iter()
    .filter_map(|(feature, on)| on.then_some(feature))
}

/// Builds the example `name` (with `features`, and every feature this test
/// binary has, so that the suite compiles the library once, not once per
/// feature set) with the profile this test binary was built with, and
/// returns the path of its binary in `target/<profile>/examples/`. The
/// build is a no-op when it is fresh, so a test never runs a stale one;
/// cache the path to build once per process.
pub fn build_example(name: &str, features: &[&str]) -> PathBuf {
    let mut features = features.to_vec();
    for feature in suite_features() {
        if !features.contains(&feature) {
            features.push(feature);
        }
    }
    let exe = std::env::current_exe().expect("the test binary's own path");
    // …/target/<profile>/deps/<test>-<hash> → …/target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test binary path {}", exe.display()));
    let binary = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));

    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--example", name]);
    // What `cargo test` sets for the test binary about its package: a
    // dependency whose build watches these (ring) would be rebuilt for this
    // build, and again for the next `cargo test`.
    for (var, _) in std::env::vars_os() {
        let text = var.to_string_lossy();
        let set_for_the_test = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|prefix| text.starts_with(prefix))
            || [
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&text.as_ref());
        if set_for_the_test {
            cmd.env_remove(&var);
        }
    }
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    match profile_dir.file_name().and_then(OsStr::to_str) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    let what = format!("cargo build --example {name}");
    let out = run_bounded(&mut cmd, BUILD_TIMEOUT, &what);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        out.stderr
    );
    assert!(
        binary.is_file(),
        "built the example, but {} does not exist",
        binary.display()
    );
    binary
}

/// The Python interpreter to use: `WSHUB_PYTHON` or `python3` if it has
/// `websockets`; otherwise the suite's own virtual environment under
/// `target/`, made and filled with [`WEBSOCKETS`] the first time.
pub fn require_python_websockets() -> String {
    let python = std::env::var("WSHUB_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    if has_websockets(&python) {
        return python;
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop-venv");
    let own = venv.join("bin").join("python");
    let own_text = own.to_string_lossy().into_owned();
    if own.is_file() && has_websockets(&own_text) {
        return own_text;
    }
    // Straight to stderr, past the test harness's capture: a newcomer sees
    // why the first run takes longer.
    let _ = writeln!(
        std::io::stderr(),
        "interop: {python} has no `websockets`; installing {WEBSOCKETS} into {} \
         (once; later runs reuse it)",
        venv.display()
    );
    venv_install(&python, &venv, &[WEBSOCKETS], PIP_HINT);
    assert!(
        has_websockets(&own_text),
        "{WEBSOCKETS} installed into {}, but its python cannot import it. {PIP_HINT}",
        venv.display()
    );
    own_text
}

/// Makes a virtual environment at `venv` with `python` and runs `pip
/// install` there with `args` (a package from PyPI, and options), failing
/// the test with `hint` if either step fails.
pub fn venv_install(python: &str, venv: &Path, args: &[&str], hint: &str) {
    let package = args.join(" ");
    let mut make = Command::new(python);
    make.arg("-m").arg("venv").arg(venv);
    let out = run_bounded(&mut make, INSTALL_TIMEOUT, &format!("{python} -m venv"));
    assert!(
        out.status.success(),
        "{python} -m venv {} failed. {hint}.\n{}",
        venv.display(),
        out.stderr
    );
    let mut install = Command::new(venv.join("bin").join("python"));
    install.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--quiet",
    ]);
    install.args(args);
    let out = run_bounded(
        &mut install,
        INSTALL_TIMEOUT,
        &format!("pip install {package}"),
    );
    assert!(
        out.status.success(),
        "pip install {package} into {} failed. {hint}.\n{}",
        venv.display(),
        out.stderr
    );
}

/// Whether `python` can import `websockets` (the test fails with
/// [`PIP_HINT`] if `python` does not run at all).
fn has_websockets(python: &str) -> bool {
    let mut cmd = Command::new(python);
    cmd.args(["-c", "import websockets"]);
    let what = format!("{python} -c 'import websockets'");
    run_bounded(&mut cmd, START_TIMEOUT, &what).status.success()
}

/// Keeps a Python client off any HTTP proxy: every connection here is loopback.
pub fn no_proxy(cmd: &mut Command) {
    for var in ["http_proxy", "https_proxy", "all_proxy"] {
        cmd.env_remove(var).env_remove(var.to_ascii_uppercase());
    }
    cmd.env("NO_PROXY", "*").env("PYTHONUNBUFFERED", "1");
}

/// How a command run by [`run_bounded`] ended, and what it printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Fails the test unless the command succeeded, with what it printed
    /// and `server_log`.
    pub fn assert_success(&self, what: &str, server_log: &str) {
        assert!(
            self.status.success(),
            "{what} failed ({})\n--- stdout\n{}--- stderr\n{}--- server log\n{server_log}",
            self.status,
            self.stdout,
            self.stderr,
        );
    }
}

/// Runs `cmd` to completion, killing it and failing the test after `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration, what: &str) -> Finished {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| {
            let hint = if what.to_ascii_lowercase().contains("python") {
                PIP_HINT
            } else {
                ""
            };
            panic!("cannot start {what}: {err}. {hint}")
        });
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{what} did not finish within {limit:?}\n--- stdout\n{}--- stderr\n{}",
                    stdout.join().unwrap_or_default(),
                    stderr.join().unwrap_or_default()
                );
            }
            Err(err) => panic!("waiting for {what}: {err}"),
        }
    };
    Finished {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn read_all(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}

/// A loopback address with a port that was free a moment ago.
pub fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr")
}
