//! Interop: clients written in another language chat through the real
//! `sharedflow` example binary, started as a child process on a loopback port.
//!
//! The Python test needs python3 with the `websockets` package. When the
//! interpreter lacks it, the test makes a virtual environment of its own
//! under `target/` and installs a pinned `websockets` there from PyPI (once;
//! later runs reuse it), saying so on stderr. It fails, rather than skips,
//! only when that is impossible (no `python3`, no `venv` module, no package
//! index), with the one command to run. `WSHUB_PYTHON` names another
//! interpreter than `python3`. Both helpers live in `tests/common/process.rs`,
//! shared with the axum example's test.
//!
//! The binary is the one `cargo test` builds into `target/<profile>/examples/`;
//! the tests run `cargo build --example sharedflow` first (a no-op when it is
//! fresh) so that `cargo test --test interop` never runs a stale one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::GREETING;
use common::process::{
    ExampleProcess, PIP_HINT, START_TIMEOUT, build_example, free_port, no_proxy,
    require_python_websockets, run_bounded,
};

/// How long the Python chat script may run (it bounds each step to 10 s).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one step of the Rust client may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn python_clients_chat_through_the_sharedflow_example() {
    let python = require_python_websockets();
    let server = start_sharedflow(&["--addr", "127.0.0.1:0"])
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
    out.assert_success("chat.py", &server.log());

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
        match start_sharedflow(&args) {
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

/// Starts the `sharedflow` example with `args` and waits for the line that
/// names its address (`sharedflow on ws://ADDR/ws ...`).
fn start_sharedflow(args: &[&str]) -> Result<ExampleProcess, String> {
    ExampleProcess::start(example_binary(), args, "sharedflow on ws://")
}

/// The `sharedflow` example binary, built (once per test process) with the
/// profile this test binary was built with.
fn example_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build_example("sharedflow", &[]))
}

/// Awaits `fut`, failing the test after [`STEP_TIMEOUT`].
async fn within<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("no progress within {STEP_TIMEOUT:?}"))
}
