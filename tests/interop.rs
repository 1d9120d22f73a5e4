//! Interop: clients written in another language chat through the real
//! `sharedflow` example binary, started as a child process on a loopback port.
//!
//! The Python test needs python3 with the `websockets` package. When the
//! interpreter lacks it, the test makes a virtual environment of its own
//! under `target/` and installs a pinned `websockets` there from PyPI (once;
//! later runs reuse it), saying so on stderr. It fails, rather than skips,
//! only when that is impossible (no `python3`, no `venv` module, no package
//! index), with the one command to run. `WSHUB_PYTHON` names another
//! interpreter than `python3`.
//!
//! The binary is the one `cargo test` builds into `target/<profile>/examples/`;
//! the tests run `cargo build --example sharedflow` first (a no-op when it is
//! fresh) so that `cargo test --test interop` never runs a stale one.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const GREETING: &str = "You are connected to WebSocket!";
/// How long the server may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long building the example may take (a cold debug build on 2 cores).
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the Python chat script may run (it bounds each step to 10 s).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one step of the Rust client may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `websockets` the suite installs for itself when the interpreter has
/// none (15.0.1 supports Python 3.9 to 3.13).
const WEBSOCKETS: &str = "websockets==15.0.1";
/// How long making the virtual environment and installing into it may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

const PIP_HINT: &str = "The interop tests need Python 3 with the `websockets` package, \
                        which they install into a virtual environment under target/ \
                        when the interpreter lacks it; where that cannot work, run \
                        `python3 -m pip install websockets==15.0.1`, or set WSHUB_PYTHON \
                        to an interpreter that has it";

#[test]
fn python_clients_chat_through_the_sharedflow_example() {
    let python = require_python_websockets();
    let server = SharedflowProcess::start(&["--addr", "127.0.0.1:0"])
        .unwrap_or_else(|err| panic!("sharedflow did not start: {err}"));
    assert!(server.addr.ip().is_loopback(), "{}", server.addr);
    assert_ne!(
        server.addr.port(),
        0,
        "the logged address must be the bound one"
    );

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/chat.py");
    let mut cmd = Command::new(&python);
    cmd.arg(&script).arg(server.url("/ws"));
    no_proxy(&mut cmd);
    let out = run_bounded(&mut cmd, SCRIPT_TIMEOUT, "the Python chat script");
    if out.status.code() == Some(3) {
        panic!("{PIP_HINT}\n{}", out.stderr);
    }
    assert!(
        out.status.success(),
        "chat.py failed ({})\n--- stdout\n{}--- stderr\n{}--- server log\n{}",
        out.status,
        out.stdout,
        out.stderr,
        server.log()
    );

    let blob = r"b'\x00\x01binary from Python\xff'";
    let expected = [
        format!("A received text '{GREETING}'"),
        format!("B received text '{GREETING}'"),
        "A received text 'Hello from Python'".to_owned(),
        "B received text 'Hello from Python'".to_owned(),
        format!("A received binary {blob}"),
        format!("B received binary {blob}"),
        "A closed with code 1000".to_owned(),
        "B received text 'still here'".to_owned(),
        "B closed with code 1000".to_owned(),
    ];
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        &lines[..lines.len().saturating_sub(1)],
        &expected[..],
        "chat.py output\n{}",
        out.stdout
    );
    assert!(
        lines.last().is_some_and(|l| l.ends_with("chat OK")),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn explicit_addr_and_flags_are_honoured() {
    // Pick a free port, release it, and ask the example for exactly that one.
    // Another process could take it in between, so try a few ports.
    let mut failures = Vec::new();
    let (server, wanted) = loop {
        let wanted = free_port();
        let addr = wanted.to_string();
        let args = [
            "--addr",
            &addr,
            "--policy",
            "drop-oldest",
            "--capacity",
            "64",
        ];
        match SharedflowProcess::start(&args) {
            Ok(server) => break (server, wanted),
            Err(err) if failures.len() < 2 => failures.push(err),
            Err(err) => panic!("sharedflow did not start on a chosen port: {err}\n{failures:?}"),
        }
    };
    assert_eq!(server.addr, wanted, "--addr was not honoured");
    assert!(
        server.banner.contains("(policy drop-oldest, capacity 64)"),
        "--policy/--capacity not reflected in: {}",
        server.banner
    );

    let url = server.url("/ws");
    let (mut ws, _) = within(tokio_tungstenite::connect_async(url.as_str()))
        .await
        .unwrap_or_else(|err| panic!("connect {url}: {err}\n{}", server.log()));
    let greeting = within(ws.next()).await;
    assert!(
        matches!(&greeting, Some(Ok(Message::Text(t))) if t.as_str() == GREETING),
        "{greeting:?}"
    );
    within(ws.send(Message::text("hello on a chosen port")))
        .await
        .expect("send");
    let echoed = within(ws.next()).await;
    assert!(
        matches!(&echoed, Some(Ok(Message::Text(t))) if t.as_str() == "hello on a chosen port"),
        "{echoed:?}"
    );
    within(ws.close(None)).await.expect("close");
}

#[test]
fn an_unknown_policy_is_refused_with_the_valid_names() {
    let mut cmd = Command::new(example_binary());
    cmd.args(["--addr", "127.0.0.1:0", "--policy", "fastest"])
        .env("NO_COLOR", "1");
    let out = run_bounded(&mut cmd, START_TIMEOUT, "sharedflow --policy fastest");
    assert!(!out.status.success(), "{}", out.stdout);
    assert!(
        out.stderr.contains("fastest") && out.stderr.contains("drop-oldest"),
        "{}",
        out.stderr
    );
}

/// A capacity no machine could allocate is refused with a message and exit
/// status 2, not a panic ("capacity overflow", status 101).
#[test]
fn an_impossible_capacity_is_refused_not_a_panic() {
    let capacity = usize::MAX.to_string();
    let mut cmd = Command::new(example_binary());
    cmd.args(["--addr", "127.0.0.1:0", "--capacity", &capacity])
        .env("NO_COLOR", "1");
    let out = run_bounded(&mut cmd, START_TIMEOUT, "sharedflow --capacity usize::MAX");
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("--capacity") && out.stderr.contains("most a hub buffers"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// The running example server; killed when dropped.
struct SharedflowProcess {
    child: Child,
    /// The address it logged it listens on.
    addr: SocketAddr,
    /// Its "sharedflow on ws://..." line.
    banner: String,
    /// Everything it printed so far, stdout and stderr.
    log: Arc<Mutex<Vec<String>>>,
}

impl SharedflowProcess {
    /// Starts the example with `args` and waits for the line that names its address.
    fn start(args: &[&str]) -> Result<SharedflowProcess, String> {
        let mut child = Command::new(example_binary())
            .args(args)
            // The banner is an INFO event; ask for it whatever the caller's RUST_LOG.
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| format!("spawn {}: {err}", example_binary().display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        // Keep draining both pipes for the life of the process, so it never
        // blocks on a full pipe; the channel closes when both reach EOF.
        forward_lines(child.stdout.take(), log.clone(), tx.clone());
        forward_lines(child.stderr.take(), log.clone(), tx);
        let mut server = SharedflowProcess {
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
                    let Some(rest) = line.split("sharedflow on ws://").nth(1) else {
                        continue;
                    };
                    let addr = rest.split('/').next().unwrap_or_default();
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
                        "no \"sharedflow on ws://\" line within {START_TIMEOUT:?}:\n{}",
                        server.log()
                    ));
                }
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        let lines = self.log.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

impl Drop for SharedflowProcess {
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

/// The `sharedflow` example binary, built (once per test process) with the
/// profile this test binary was built with.
fn example_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test binary's own path");
        // …/target/<profile>/deps/interop-<hash> → …/target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .unwrap_or_else(|| panic!("unexpected test binary path {}", exe.display()));
        let binary = profile_dir
            .join("examples")
            .join(format!("sharedflow{}", std::env::consts::EXE_SUFFIX));

        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--example", "sharedflow"]);
        match profile_dir.file_name().and_then(OsStr::to_str) {
            Some("debug") | None => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(profile) => {
                cmd.args(["--profile", profile]);
            }
        }
        let out = run_bounded(&mut cmd, BUILD_TIMEOUT, "cargo build --example sharedflow");
        assert!(
            out.status.success(),
            "cargo build --example sharedflow failed ({}):\n{}",
            out.status,
            out.stderr
        );
        assert!(
            binary.is_file(),
            "built the example, but {} does not exist",
            binary.display()
        );
        binary
    })
}

/// The Python interpreter to use: `WSHUB_PYTHON` or `python3` if it has
/// `websockets`; otherwise the test's own virtual environment under
/// `target/`, made and filled with [`WEBSOCKETS`] the first time.
fn require_python_websockets() -> String {
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
    let mut make = Command::new(&python);
    make.arg("-m").arg("venv").arg(&venv);
    let out = run_bounded(&mut make, INSTALL_TIMEOUT, &format!("{python} -m venv"));
    assert!(
        out.status.success(),
        "{python} -m venv {} failed. {PIP_HINT}.\n{}",
        venv.display(),
        out.stderr
    );
    let mut install = Command::new(&own);
    install.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--quiet",
        WEBSOCKETS,
    ]);
    let out = run_bounded(
        &mut install,
        INSTALL_TIMEOUT,
        &format!("pip install {WEBSOCKETS}"),
    );
    assert!(
        out.status.success() && has_websockets(&own_text),
        "pip install {WEBSOCKETS} into {} failed. {PIP_HINT}.\n{}",
        venv.display(),
        out.stderr
    );
    own_text
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
fn no_proxy(cmd: &mut Command) {
    for var in ["http_proxy", "https_proxy", "all_proxy"] {
        cmd.env_remove(var).env_remove(var.to_ascii_uppercase());
    }
    cmd.env("NO_PROXY", "*").env("PYTHONUNBUFFERED", "1");
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to completion, killing it and failing the test after `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration, what: &str) -> Finished {
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
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr")
}

/// Awaits `fut`, failing the test after [`STEP_TIMEOUT`].
async fn within<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("no progress within {STEP_TIMEOUT:?}"))
}
