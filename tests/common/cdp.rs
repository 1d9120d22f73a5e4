//! A small Chrome DevTools Protocol client, enough for the browser tests to
//! drive a headless Chromium: open a page, evaluate scripts in it, type into
//! it, press Enter, take a screenshot and read what it logged.
//!
//! One task owns the browser's WebSocket: it writes the commands callers
//! queue and reads every message. A reply (it has an `id`) goes to the caller
//! waiting for it; an event (it has a `method`) goes to the page named by its
//! `sessionId`. Every wait is bounded, and every failure fails the test with
//! a message that says what went wrong.
//!
//! `WSHUB_CHROMIUM` names the browser binary; otherwise `chromium`,
//! `chromium-browser` or `google-chrome` is looked up on `PATH`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::within_for;

/// How long Chromium may take to print its DevTools address.
pub const LAUNCH_WAIT: Duration = Duration::from_secs(20);
/// How long one command may take to be answered.
pub const CALL_WAIT: Duration = Duration::from_secs(10);
/// How long a page may take to load.
pub const LOAD_WAIT: Duration = Duration::from_secs(10);

/// The flags that keep Chromium headless, quiet and off the network
/// (everything the tests load is on loopback).
const FLAGS: &str = "--headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage \
    --window-size=1000,700 --remote-debugging-port=0 --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --no-default-browser-check \
    --no-proxy-server --disable-quic --disable-extensions --metrics-recording-only \
    --disable-default-apps";

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

type Reply = Result<Value, Value>;

/// What the connection task and the callers share.
#[derive(Default)]
struct State {
    /// Callers waiting for a reply, by command id.
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// The open pages, by session id.
    pages: HashMap<String, Arc<PageEvents>>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

/// What a page's events leave behind.
struct PageEvents {
    console: Mutex<Vec<String>>,
    /// How many load events the page has fired.
    loads: watch::Sender<u64>,
}

/// The browser-level connection, shared by the browser and its pages.
struct Connection {
    state: Mutex<State>,
    outbox: mpsc::UnboundedSender<String>,
    next_id: AtomicU64,
}

impl Connection {
    /// Sends `method` (to `session`, if given) and waits for its reply; `Err`
    /// holds the protocol's error.
    async fn try_call(&self, session: Option<&str>, method: &str, params: Value) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut state = lock(&self.state);
            if let Some(why) = &state.closed {
                panic!("CDP {method}: the browser's connection is closed ({why})");
            }
            state.pending.insert(id, tx);
        }
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        let _ = self.outbox.send(command.to_string());
        let what = format!("the reply to CDP {method}");
        match within_for(CALL_WAIT, &what, rx).await {
            Ok(reply) => reply,
            Err(_) => {
                let why = lock(&self.state).closed.clone().unwrap_or_default();
                panic!("CDP {method}: the browser's connection closed ({why})")
            }
        }
    }

    /// As [`Connection::try_call`], but fails the test on a protocol error.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        match self.try_call(session, method, params).await {
            Ok(result) => result,
            Err(error) => panic!("CDP {method} failed: {error}"),
        }
    }

    /// Handles one message from the browser.
    fn dispatch(&self, message: Value) {
        if let Some(id) = message["id"].as_u64() {
            let waiter = lock(&self.state).pending.remove(&id);
            if let Some(waiter) = waiter {
                let reply = match message.get("error") {
                    Some(error) => Err(error.clone()),
                    None => Ok(message["result"].clone()),
                };
                let _ = waiter.send(reply);
            }
            return;
        }
        let Some(session) = message["sessionId"].as_str() else {
            return;
        };
        let Some(page) = lock(&self.state).pages.get(session).cloned() else {
            return;
        };
        let params = &message["params"];
        match message["method"].as_str().unwrap_or_default() {
            "Runtime.consoleAPICalled" => {
                let args = params["args"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                let words: Vec<String> = args.iter().map(describe).collect();
                let line = format!(
                    "{}: {}",
                    params["type"].as_str().unwrap_or("log"),
                    words.join(" ")
                );
                lock(&page.console).push(line);
            }
            "Runtime.exceptionThrown" => {
                let line = format!("exception: {}", exception_text(&params["exceptionDetails"]));
                lock(&page.console).push(line);
            }
            "Page.loadEventFired" => page.loads.send_modify(|n| *n += 1),
            _ => {}
        }
    }

    /// Marks the connection closed and fails every waiting caller.
    fn close(&self, why: String) {
        let mut state = lock(&self.state);
        state.closed.get_or_insert(why);
        state.pending.clear();
    }
}

/// A remote object as a word of a console line: strings as they are, other
/// values as JSON, the rest by their description.
fn describe(object: &Value) -> String {
    match object.get("value") {
        Some(Value::String(text)) => text.clone(),
        Some(value) => value.to_string(),
        None => ["unserializableValue", "description", "type"]
            .iter()
            .find_map(|key| object[key].as_str())
            .unwrap_or("?")
            .to_owned(),
    }
}

/// The most telling text of a thrown exception: its description (message
/// and stack), else the protocol's summary.
fn exception_text(details: &Value) -> String {
    let description = details["exception"]["description"].as_str();
    description
        .or(details["text"].as_str())
        .unwrap_or("?")
        .to_owned()
}

/// A headless Chromium and its DevTools connection; the process is killed
/// and its profile directory removed when this is dropped.
pub struct Browser {
    child: tokio::process::Child,
    profile: PathBuf,
    connection: Arc<Connection>,
    tasks: Vec<JoinHandle<()>>,
    /// The last lines Chromium printed on stderr.
    stderr: Arc<Mutex<VecDeque<String>>>,
}

/// The first of `WSHUB_CHROMIUM`, `chromium`, `chromium-browser` and
/// `google-chrome` (on `PATH`) that exists.
fn find_chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("WSHUB_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no Chromium for the browser tests: apt-get install chromium (Debian), \
                 or set WSHUB_CHROMIUM to a Chrome binary"
            )
        })
}

impl Browser {
    /// Starts Chromium with a fresh profile under the target directory and
    /// connects to its DevTools WebSocket.
    pub async fn launch() -> Browser {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let binary = find_chromium();
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let profile = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("chromium-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile)
            .unwrap_or_else(|err| panic!("create {}: {err}", profile.display()));

        let mut cmd = std::process::Command::new(&binary);
        cmd.args(FLAGS.split_whitespace())
            .arg(format!("--user-data-dir={}", profile.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        super::process::no_proxy(&mut cmd);
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));

        // Keep reading stderr for the life of the process, so it never blocks
        // on a full pipe; the first DevTools line names the address.
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let (found, address) = oneshot::channel();
        let pipe = child.stderr.take().expect("Chromium's stderr");
        let lines = stderr.clone();
        let drain = tokio::spawn(async move {
            let mut found = Some(found);
            let mut pipe = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = pipe.next_line().await {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    if let Some(found) = found.take() {
                        let _ = found.send(url.trim().to_owned());
                    }
                }
                let mut lines = lock(&lines);
                lines.push_back(line);
                if lines.len() > 50 {
                    lines.pop_front();
                }
            }
        });
        let seen = |stderr: &Mutex<VecDeque<String>>| Vec::from(lock(stderr).clone()).join("\n");
        let url = match tokio::time::timeout(LAUNCH_WAIT, address).await {
            Ok(Ok(url)) => url,
            Ok(Err(_)) => panic!(
                "{} exited ({:?}) before printing its DevTools address; stderr:\n{}",
                binary.display(),
                child.wait().await,
                seen(&stderr)
            ),
            Err(_) => panic!(
                "{} printed no DevTools address within {LAUNCH_WAIT:?}; stderr:\n{}",
                binary.display(),
                seen(&stderr)
            ),
        };
        let (ws, _) = within_for(
            CALL_WAIT,
            "the DevTools WebSocket",
            tokio_tungstenite::connect_async(&url),
        )
        .await
        .unwrap_or_else(|err| panic!("connect to {url}: {err}"));

        let (outbox, mut queued) = mpsc::unbounded_channel::<String>();
        let connection = Arc::new(Connection {
            state: Mutex::new(State::default()),
            outbox,
            next_id: AtomicU64::new(1),
        });
        let conn = connection.clone();
        let io = tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let why = loop {
                tokio::select! {
                    command = queued.recv() => {
                        let Some(text) = command else {
                            break "the browser was dropped".to_owned();
                        };
                        if let Err(err) = sink.send(Message::text(text)).await {
                            break format!("sending failed: {err}");
                        }
                    }
                    message = stream.next() => match message {
                        Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
                            Ok(message) => conn.dispatch(message),
                            Err(err) => break format!("not JSON ({err}): {text}"),
                        },
                        Some(Ok(Message::Close(frame))) => break format!("closed: {frame:?}"),
                        Some(Ok(_)) => {}
                        Some(Err(err)) => break format!("reading failed: {err}"),
                        None => break "the browser ended it".to_owned(),
                    },
                }
            };
            conn.close(why);
        });
        Browser {
            child,
            profile,
            connection,
            tasks: vec![drain, io],
            stderr,
        }
    }

    /// Opens a new tab, enables its runtime and page events, navigates it to
    /// `url` and waits for its load event.
    pub async fn page(&self, url: &str) -> Page {
        let conn = &self.connection;
        let target = conn
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let target_id = target["targetId"].as_str().expect("a targetId").to_owned();
        let params = json!({ "targetId": target_id, "flatten": true });
        let attached = conn.call(None, "Target.attachToTarget", params).await;
        let session = attached["sessionId"]
            .as_str()
            .expect("a sessionId")
            .to_owned();
        let events = Arc::new(PageEvents {
            console: Mutex::default(),
            loads: watch::Sender::new(0),
        });
        lock(&conn.state)
            .pages
            .insert(session.clone(), events.clone());
        let page = Page {
            connection: conn.clone(),
            session,
            target_id,
            events,
        };
        page.call("Runtime.enable", json!({})).await;
        page.call("Page.enable", json!({})).await;

        let mut loads = page.events.loads.subscribe();
        loads.mark_unchanged();
        let navigated = page.call("Page.navigate", json!({ "url": url })).await;
        if let Some(error) = navigated["errorText"].as_str() {
            panic!("navigating to {url} failed: {error}");
        }
        // The load event, or a document that says it is complete.
        let ready = "document.readyState === 'complete' && location.href !== 'about:blank'";
        let ready = json!({ "expression": ready, "returnByValue": true });
        let loaded = async {
            loop {
                let reply = conn.try_call(Some(&page.session), "Runtime.evaluate", ready.clone());
                let tick = tokio::time::timeout(Duration::from_millis(100), loads.changed());
                if reply.await.is_ok_and(|r| r["result"]["value"] == true) || tick.await.is_ok() {
                    return;
                }
            }
        };
        if tokio::time::timeout(LOAD_WAIT, loaded).await.is_err() {
            let console = page.console().join("\n");
            panic!("{url} did not load within {LOAD_WAIT:?}; console:\n{console}");
        }
        page
    }

    /// The last lines Chromium printed on stderr.
    pub fn stderr(&self) -> Vec<String> {
        lock(&self.stderr).iter().cloned().collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.connection.close("the browser was dropped".to_owned());
        let _ = self.child.start_kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Its helper processes exit soon after it, and may write into the
        // profile until they have.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let in_use = profile_in_use(&self.profile);
            let _ = std::fs::remove_dir_all(&self.profile);
            if (!in_use && !self.profile.exists()) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether a process still runs with `profile` on its command line (Linux).
fn profile_in_use(profile: &Path) -> bool {
    let profile = profile.to_string_lossy();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(profile.as_ref()))
    })
}

/// One tab of the browser, attached through its own session.
pub struct Page {
    connection: Arc<Connection>,
    session: String,
    target_id: String,
    events: Arc<PageEvents>,
}

impl Page {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.connection
            .call(Some(&self.session), method, params)
            .await
    }

    /// Evaluates `js` (awaiting it if it is a promise) and returns its value
    /// (`Null` for `undefined`; NaN, Infinity and the like as strings).
    /// Fails the test if the script throws.
    pub async fn eval(&self, js: &str) -> Value {
        match self.try_eval(js).await {
            Ok(value) => value,
            Err(exception) => panic!("the script threw: {exception}\nscript: {js}"),
        }
    }

    /// As [`Page::eval`], but a thrown exception is `Err` with its text.
    async fn try_eval(&self, js: &str) -> Result<Value, String> {
        let params = json!({ "expression": js, "returnByValue": true, "awaitPromise": true });
        let result = self.call("Runtime.evaluate", params).await;
        if let Some(details) = result.get("exceptionDetails") {
            return Err(exception_text(details));
        }
        let object = &result["result"];
        Ok(match object.get("value") {
            Some(value) => value.clone(),
            None => object
                .get("unserializableValue")
                .cloned()
                .unwrap_or(Value::Null),
        })
    }

    /// Evaluates `js` every 20 ms until it is truthy and returns that value;
    /// a script that throws counts as not yet. Fails the test after `limit`
    /// with `what`, the last value and the page's console.
    pub async fn wait_until(&self, what: &str, js: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        let mut last = Err("never evaluated".to_owned());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(value) = tokio::time::timeout(left, self.try_eval(js)).await {
                last = value;
            }
            if let Ok(value) = &last {
                let falsy = match value {
                    Value::Null => true,
                    Value::Bool(b) => !b,
                    Value::Number(n) => n.as_f64() == Some(0.0),
                    Value::String(s) => s.is_empty(),
                    _ => false,
                };
                if !falsy {
                    return value.clone();
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {limit:?} waiting for {what}\nscript: {js}\nlast: {last:?}\nconsole:\n{}",
                    self.console().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Types `text` into the focused element.
    pub async fn insert_text(&self, text: &str) {
        self.call("Input.insertText", json!({ "text": text })).await;
    }

    /// Presses and releases Enter in the focused element.
    pub async fn press_enter(&self) {
        for kind in ["keyDown", "keyUp"] {
            let mut key = json!({ "type": kind, "key": "Enter", "code": "Enter" });
            key["windowsVirtualKeyCode"] = json!(13);
            if kind == "keyDown" {
                key["text"] = json!("\r");
            }
            self.call("Input.dispatchKeyEvent", key).await;
        }
    }

    /// Saves a PNG screenshot of the page at `path`, creating its directory.
    pub async fn screenshot(&self, path: &Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let data = shot["data"].as_str().expect("screenshot data");
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap_or_else(|err| panic!("screenshot data is not base64: {err}"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|err| panic!("create {}: {err}", dir.display()));
        }
        std::fs::write(path, png).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    }

    /// Everything the page logged so far, a line per call or uncaught
    /// exception, in order: `"log: text 42"`, `"exception: Error: …"`.
    pub fn console(&self) -> Vec<String> {
        lock(&self.events.console).clone()
    }
}

impl Drop for Page {
    /// Closes the tab without waiting for the browser's answer.
    fn drop(&mut self) {
        lock(&self.connection.state).pages.remove(&self.session);
        let id = self.connection.next_id.fetch_add(1, Ordering::Relaxed);
        let params = json!({ "targetId": self.target_id });
        let command = json!({ "id": id, "method": "Target.closeTarget", "params": params });
        let _ = self.connection.outbox.send(command.to_string());
    }
}
