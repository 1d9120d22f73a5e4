//! The chat example in a real browser: headless Chromium, driven through
//! the DevTools protocol (`common::cdp`), against the example binary.
//!
//! Chromium must be installed (`apt-get install chromium` on Debian, which
//! `.ci/run` does); without it these tests fail with that command.
//! `WSHUB_CHROMIUM` names another Chrome binary. Screenshots for review go
//! to `target/tmp/browser/`.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::cdp::{Browser, Page};
use common::process::{ExampleProcess, build_example};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// How long a page may take to show what a step expects (a debug build,
/// two cores, a browser sharing them with the server).
const SHOW: Duration = Duration::from_secs(20);

fn chat_binary() -> &'static PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build_example("chat", &[]))
}

fn start_chat(args: &[&str]) -> ExampleProcess {
    let mut all = vec!["--addr", "127.0.0.1:0"];
    all.extend_from_slice(args);
    ExampleProcess::start(chat_binary(), &all, "chat on http://")
        .unwrap_or_else(|err| panic!("the chat example did not start: {err}"))
}

fn page_url(addr: SocketAddr) -> String {
    format!("http://{addr}/")
}

fn screenshot_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("browser")
        .join(format!("{name}.png"))
}

/// The text of each line the page shows in its current room.
const LINES: &str = "Array.from(document.querySelectorAll('#lines .room:not([hidden]) .line')).map(l => l.textContent)";

/// The names in the page's member list.
const MEMBERS: &str =
    "Array.from(document.querySelectorAll('#members li')).map(l => l.textContent)";

async fn lines(page: &Page) -> Vec<String> {
    strings(page.eval(LINES).await)
}

fn strings(value: Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect()
}

/// Waits until the page is online and its member list has `count` names;
/// returns the page's own name.
async fn online(page: &Page, count: usize) -> String {
    page.wait_until(
        "the page to be online",
        "document.getElementById('state').classList.contains('open')",
        SHOW,
    )
    .await;
    page.wait_until(
        &format!("{count} members"),
        &format!("document.querySelectorAll('#members li').length === {count} && document.querySelector('#members li.me') !== null"),
        SHOW,
    )
    .await;
    let name = page
        .eval("document.getElementById('name').value")
        .await
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(name.starts_with("user"), "the server's name: {name:?}");
    name
}

/// Types `text` into the message box and presses Enter, as a user does.
async fn say(page: &Page, text: &str) {
    page.eval("document.getElementById('text').focus()").await;
    page.insert_text(text).await;
    page.press_enter().await;
    page.wait_until(
        "the message box to empty once sent",
        "document.getElementById('text').value === ''",
        SHOW,
    )
    .await;
}

/// Waits until the page shows `line` in its current room.
async fn shows(page: &Page, line: &str) {
    page.wait_until(
        &format!("the line {line:?}"),
        &format!("({LINES}).includes({})", json!(line)),
        SHOW,
    )
    .await;
}

/// Waits until the page shows that it lost its connection and retries.
async fn offline(page: &Page) {
    page.wait_until(
        "the page to show it is offline",
        "document.getElementById('state').classList.contains('reconnecting')",
        SHOW,
    )
    .await;
}

/// `page` says each of `texts`, and shows each once it is sent.
async fn say_each(page: &Page, name: &str, texts: &[String]) {
    for text in texts {
        say(page, text).await;
        shows(page, &format!("{name} said: {text}")).await;
    }
}

/// Three lines numbered after `what`.
fn three(what: &str) -> Vec<String> {
    (1..=3).map(|n| format!("{what} {n}")).collect()
}

/// The "name said: text" lines of the page's current room.
async fn said(page: &Page) -> Vec<String> {
    lines(page)
        .await
        .into_iter()
        .filter(|l| l.contains(" said: "))
        .collect()
}

/// The seq of each message line the page shows, in every room.
async fn seqs(page: &Page) -> Vec<String> {
    strings(
        page.eval(
            "Array.from(document.querySelectorAll('#lines .line.message')).map(l => l.dataset.seq)",
        )
        .await,
    )
}

/// How many gap lines the page shows.
async fn gaps(page: &Page) -> Value {
    page.eval("document.querySelectorAll('#lines .line.gap').length")
        .await
}

#[tokio::test]
async fn two_pages_chat_in_a_room_and_see_each_other_and_the_history() {
    let server = start_chat(&["--history", "50"]);
    let browser = Browser::launch().await;
    let ann = browser.page(&page_url(server.addr)).await;
    let ann_name = online(&ann, 1).await;
    let bob = browser.page(&page_url(server.addr)).await;
    let bob_name = online(&bob, 2).await;
    assert_ne!(ann_name, bob_name, "each visitor gets a name of its own");

    // Each sees both in the member list, itself marked.
    let members = strings(ann.eval(MEMBERS).await);
    assert!(
        members.contains(&format!("{ann_name} (you)")),
        "{members:?}"
    );
    assert!(members.contains(&bob_name), "{members:?}");
    shows(&ann, &format!("{bob_name} joined")).await;

    say(&ann, "hello from ann").await;
    shows(&bob, &format!("{ann_name} said: hello from ann")).await;
    say(&bob, "hi ann").await;
    shows(&ann, &format!("{bob_name} said: hi ann")).await;
    shows(&bob, &format!("{bob_name} said: hi ann")).await;

    // A rename reconnects under the new name; the others see it arrive.
    ann.eval("document.getElementById('name').value = 'ann'; document.getElementById('name-form').requestSubmit()")
        .await;
    bob.wait_until(
        "ann under her new name in bob's member list",
        &format!(
            "({MEMBERS}).includes('ann') && !({MEMBERS}).includes({})",
            json!(ann_name)
        ),
        SHOW,
    )
    .await;
    say(&ann, "renamed").await;
    shows(&bob, "ann said: renamed").await;

    // A newcomer gets the room's history on entering.
    let cat = browser.page(&page_url(server.addr)).await;
    online(&cat, 3).await;
    for line in [
        format!("{ann_name} said: hello from ann"),
        format!("{bob_name} said: hi ann"),
        "ann said: renamed".to_string(),
    ] {
        shows(&cat, &line).await;
    }

    // Another room: only those in it hear what is said there.
    bob.eval("document.getElementById('room-name').value = 'side'; document.getElementById('join-form').requestSubmit()")
        .await;
    online(&bob, 1).await;
    say(&bob, "only in side").await;
    shows(&bob, &format!("{bob_name} said: only in side")).await;
    let rooms = strings(
        bob.eval("Array.from(document.querySelectorAll('#rooms li')).map(l => l.dataset.room)")
            .await,
    );
    assert_eq!(rooms, ["lobby", "side"]);
    say(&ann, "still in lobby").await;
    shows(&cat, "ann said: still in lobby").await;
    assert!(
        !lines(&ann).await.iter().any(|l| l.contains("only in side")),
        "{:?}",
        lines(&ann).await
    );
    // The lobby's unread line shows as a badge on bob's room list.
    bob.wait_until(
        "an unread badge on bob's lobby",
        "document.querySelector('#rooms li[data-room=lobby] .unread')?.textContent === '1'",
        SHOW,
    )
    .await;

    ann.screenshot(&screenshot_path("chat")).await;
    assert!(
        ann.console().iter().all(|l| !l.contains("rror")),
        "{:?}",
        ann.console()
    );
}

/// A TCP relay in front of the server whose connections the test can cut,
/// and refuse while it is down: a network drop, as the page meets it.
struct Relay {
    addr: SocketAddr,
    to: Arc<Mutex<SocketAddr>>,
    up: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<AbortHandle>>>,
    task: AbortHandle,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let open: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let to = Arc::new(Mutex::new(to));
        let (accepting, relays, target) = (up.clone(), open.clone(), to.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    // Down: the connection is closed at once.
                    continue;
                }
                let to = *target.lock().unwrap();
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                relays.lock().unwrap().push(relay.abort_handle());
            }
        })
        .abort_handle();
        Relay {
            addr,
            to,
            up,
            open,
            task,
        }
    }

    /// Cuts every connection and refuses new ones until `restore`.
    fn cut(&self) -> usize {
        self.up.store(false, Ordering::SeqCst);
        let open = std::mem::take(&mut *self.open.lock().unwrap());
        let cut = open.iter().filter(|relay| !relay.is_finished()).count();
        for relay in open {
            relay.abort();
        }
        cut
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Relays new connections to `to` from now on (a server that came back
    /// on another port).
    fn retarget(&self, to: SocketAddr) {
        *self.to.lock().unwrap() = to;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        for relay in self.open.lock().unwrap().drain(..) {
            relay.abort();
        }
    }
}

#[tokio::test]
async fn a_page_cut_off_reconnects_resumes_and_shows_each_missed_message_once() {
    // A newcomer sees only the last line: what comes back after the cut
    // comes from resuming at the page's position, not from the replay.
    let server = start_chat(&["--replay", "1"]);
    let relay = Relay::start(server.addr).await;
    let browser = Browser::launch().await;
    // Ann's page reaches the server through the relay; Bob's directly.
    let ann = browser.page(&page_url(relay.addr)).await;
    online(&ann, 1).await;
    let bob = browser.page(&page_url(server.addr)).await;
    let bob_name = online(&bob, 2).await;
    say(&bob, "before the cut").await;
    shows(&ann, &format!("{bob_name} said: before the cut")).await;

    assert!(relay.cut() >= 1, "ann's WebSocket went through the relay");
    offline(&ann).await;
    let state = ann
        .eval("document.getElementById('state').textContent")
        .await;
    assert!(
        state.as_str().unwrap_or_default().contains("retrying"),
        "{state}"
    );
    // Bob's page sees ann leave; meanwhile he says three things.
    bob.wait_until(
        "ann to leave bob's member list",
        "document.querySelectorAll('#members li').length === 1",
        SHOW,
    )
    .await;
    let missed = three("while you were away");
    say_each(&bob, &bob_name, &missed).await;
    // Still cut: ann's page has none of them yet.
    let seen = lines(&ann).await;
    assert!(
        !seen.iter().any(|l| l.contains("while you were away")),
        "{seen:?}"
    );

    relay.restore();
    online(&ann, 2).await;
    for text in &missed {
        shows(&ann, &format!("{bob_name} said: {text}")).await;
    }
    // Once each, in order, after what came before, and no gap: the history
    // kept them all.
    let mut expected = vec![format!("{bob_name} said: before the cut")];
    expected.extend(missed.iter().map(|t| format!("{bob_name} said: {t}")));
    assert_eq!(said(&ann).await, expected);
    assert_eq!(seqs(&ann).await, ["1", "2", "3", "4"]);
    assert_eq!(gaps(&ann).await, 0);

    // And live again: both ways.
    say(&ann, "back").await;
    shows(&bob, &format!("{} said: back", online(&ann, 2).await)).await;
    ann.screenshot(&screenshot_path("chat-resumed")).await;
}

/// The text of the page's connection badge.
async fn badge(page: &Page) -> String {
    let state = page
        .eval("document.getElementById('state').textContent")
        .await;
    state.as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_restarted_server_is_found_again_and_its_fresh_history_shown_as_such() {
    let mut server = start_chat(&[]);
    let relay = Relay::start(server.addr).await;
    let browser = Browser::launch().await;
    let ann = browser.page(&page_url(relay.addr)).await;
    let name = online(&ann, 1).await;
    say(&ann, "before the restart").await;
    shows(&ann, &format!("{name} said: before the restart")).await;

    // The embedded broker's history goes with the process.
    server.kill();
    offline(&ann).await;
    let again = start_chat(&[]);
    relay.retarget(again.addr);
    // The page finds the new process by itself, under the same name.
    assert_eq!(online(&ann, 1).await, name, "{}", badge(&ann).await);
    ann.wait_until(
        "a line saying the room's history started afresh",
        "Array.from(document.querySelectorAll('#lines .line.gap')).some(l => l.textContent.includes('started afresh'))",
        SHOW,
    )
    .await;
    say(&ann, "after the restart").await;
    shows(&ann, &format!("{name} said: after the restart")).await;
    assert_eq!(
        seqs(&ann).await,
        ["1", "1"],
        "the new process numbers from 1 again"
    );
}

/// Two chat nodes on one `redis-server`: a page on each talks to the
/// other; one node is killed and started again, and its page comes back to
/// it with everything said on the other node meanwhile, once.
#[cfg(feature = "redis")]
#[tokio::test]
async fn two_nodes_on_redis_share_a_room_and_a_restarted_node_loses_nothing() {
    let redis = common::redis::RedisServer::start();
    let url = redis.url();
    let mut first = start_chat(&["--redis", &url]);
    let second = start_chat(&["--redis", &url]);
    let relay = Relay::start(first.addr).await;
    let browser = Browser::launch().await;
    let ann = browser.page(&page_url(relay.addr)).await;
    let ann_name = online(&ann, 1).await;
    let bob = browser.page(&page_url(second.addr)).await;
    let bob_name = online(&bob, 2).await;
    // Presence spans the nodes.
    ann.wait_until(
        "bob, on the other node, in ann's member list",
        &format!("({MEMBERS}).includes({})", json!(bob_name)),
        SHOW,
    )
    .await;
    say(&ann, "from the first node").await;
    shows(&bob, &format!("{ann_name} said: from the first node")).await;
    say(&bob, "from the second node").await;
    shows(&ann, &format!("{bob_name} said: from the second node")).await;

    first.kill();
    offline(&ann).await;
    let missed = three("while the node was down");
    say_each(&bob, &bob_name, &missed).await;
    let restarted = start_chat(&["--redis", &url]);
    relay.retarget(restarted.addr);
    for text in &missed {
        shows(&ann, &format!("{bob_name} said: {text}")).await;
    }
    let mut expected = vec![
        format!("{ann_name} said: from the first node"),
        format!("{bob_name} said: from the second node"),
    ];
    expected.extend(missed.iter().map(|t| format!("{bob_name} said: {t}")));
    assert_eq!(said(&ann).await, expected, "each once, in order");
    assert_eq!(gaps(&ann).await, 0, "the history in Redis kept them all");
    // The killed node's entry for ann lapses with its lease (10 s): then
    // both lists show the two of them.
    for page in [&ann, &bob] {
        page.wait_until(
            "two members once the dead node's lease lapsed",
            "document.querySelectorAll('#members li').length === 2",
            Duration::from_secs(30),
        )
        .await;
    }
    say(&ann, "back on the first node").await;
    shows(&bob, &format!("{ann_name} said: back on the first node")).await;
}

#[tokio::test]
async fn markup_in_a_message_or_a_name_is_shown_as_text() {
    let server = start_chat(&[]);
    let browser = Browser::launch().await;
    let ann = browser.page(&page_url(server.addr)).await;
    online(&ann, 1).await;
    let bob = browser.page(&page_url(server.addr)).await;
    online(&bob, 2).await;

    // A name with markup, too.
    ann.eval(
        r#"document.getElementById('name').value = '<b>ann</b>'; document.getElementById('name-form').requestSubmit()"#,
    )
    .await;
    bob.wait_until(
        "ann's new name, as text",
        &format!("({MEMBERS}).includes('<b>ann</b>')"),
        SHOW,
    )
    .await;
    let hostile = [
        r#"<script>window.injected = 'script'</script>"#,
        r#"<img src="/nowhere.png" onerror="window.injected = 'img'">"#,
    ];
    for text in hostile {
        say(&ann, text).await;
        shows(&bob, &format!("<b>ann</b> said: {text}")).await;
    }
    for page in [&ann, &bob] {
        let found = page
            .eval("[document.querySelectorAll('#lines script, #lines img, #lines b, #members b').length, window.injected ?? null]")
            .await;
        assert_eq!(found, json!([0, null]), "markup got into the page");
    }
    bob.screenshot(&screenshot_path("chat-escaped")).await;
}

#[tokio::test]
async fn wshub_js_publishes_with_promises_and_rejects_with_the_error_code() {
    let server = start_chat(&[]);
    let browser = Browser::launch().await;
    let page = browser.page(&page_url(server.addr)).await;
    online(&page, 1).await;

    // The client the page uses, as any page would use it.
    let result = page
        .eval(
            r#"(async () => {
                const hub = new WsHub("/pubsub?name=script");
                await new Promise((ok) => hub.on("state", (s) => s.state === "open" && ok()));
                const got = [];
                const sub = hub.subscribe("api", { message: (data, meta) => got.push([meta.seq, data]) });
                const reply = await sub.ready;
                const seqs = [await hub.publish("api", {n: 1}), await hub.publish("api", {n: 2})];
                const codes = [];
                for (const topic of ["bad topic!", ""]) {
                    try { await hub.publish(topic, 1); codes.push("resolved"); }
                    catch (err) { codes.push(err.code); }
                }
                let twice;
                try { hub.subscribe("api", {}); twice = "allowed"; } catch (err) { twice = err.code; }
                const members = await hub.presence("api");
                while (got.length < 2) await new Promise((ok) => setTimeout(ok, 10));
                const history = await hub.history("api", 1);
                await sub.unsubscribe();
                hub.close();
                await new Promise((ok) => hub.on("state", (s) => s.state === "closed" && ok()));
                let closed;
                try { await hub.publish("api", 3); closed = "resolved"; } catch (err) { closed = err.code; }
                return {first: reply.seq, client: typeof reply.client, mine: members.map((m) => m.info.name),
                        seqs, got, codes, twice, history: history.messages, closed};
            })()"#,
        )
        .await;
    assert_eq!(
        result,
        json!({
            "first": 0,
            "client": "string",
            "mine": ["script"],
            "seqs": [1, 2],
            "got": [[1, {"n": 1}], [2, {"n": 2}]],
            "codes": ["bad_topic", "bad_topic"],
            "twice": "bad_request",
            "history": [{"seq": 2, "data": {"n": 2}}],
            "closed": "disconnected",
        })
    );
}

/// A plain `GET`: the status line, the headers (lower-cased names) and the body.
async fn get(addr: SocketAddr, path: &str) -> (String, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    common::within("the whole answer", stream.read_to_end(&mut raw))
        .await
        .unwrap();
    let text = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

#[tokio::test]
async fn the_chat_serves_its_page_script_style_and_wshub_js_from_the_binary() {
    let server = start_chat(&[]);
    for (path, content_type, part) in [
        (
            "/",
            "text/html; charset=utf-8",
            r#"<script src="/wshub.js"></script>"#,
        ),
        ("/chat.js", "text/javascript; charset=utf-8", "textContent"),
        ("/chat.css", "text/css; charset=utf-8", "#lines"),
        (
            "/wshub.js",
            "text/javascript; charset=utf-8",
            wshub::WSHUB_JS,
        ),
    ] {
        let (status, headers, body) = get(server.addr, path).await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(header("content-type"), Some(content_type), "{path}");
        assert_eq!(header("content-length"), Some(&*body.len().to_string()));
        assert!(body.contains(part), "{path}: {body}");
        // Nothing from elsewhere: no CDN, works offline.
        assert!(!body.contains("://"), "{path} names another origin");
    }
    let (status, _, _) = get(server.addr, "/nowhere").await;
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
}

/// What the chat says when it will not start with `args`.
fn refusal(args: &[&str]) -> String {
    let mut all = vec!["--addr", "127.0.0.1:0"];
    all.extend_from_slice(args);
    match ExampleProcess::start(chat_binary(), &all, "chat on http://") {
        Ok(_) => panic!("the chat started with {args:?}"),
        Err(err) => err,
    }
}

#[test]
fn the_chat_refuses_a_history_of_nothing_with_a_reason() {
    let err = refusal(&["--history", "0"]);
    assert!(err.contains("--history must be at least 1"), "{err}");
    if !cfg!(feature = "redis") {
        let err = refusal(&["--redis", "redis://127.0.0.1:1"]);
        assert!(err.contains("--features redis"), "{err}");
    }
}

#[tokio::test]
async fn wshub_js_backs_off_exponentially_with_jitter_up_to_its_ceiling() {
    let server = start_chat(&[]);
    let browser = Browser::launch().await;
    let page = browser.page(&page_url(server.addr)).await;
    // A port nothing listens on (a free one, just released): every attempt
    // is refused at once.
    let nowhere = common::process::free_port();
    let delays = page
        .eval(&format!(
            r#"(async () => {{
                const down = new WsHub("ws://{nowhere}/pubsub", {{minDelay: 40, maxDelay: 200}});
                const delays = [];
                await new Promise((ok) => down.on("state", (s) => {{
                    if (s.state === "reconnecting") {{ delays.push([s.attempt, s.delay]); if (delays.length === 6) ok(); }}
                }}));
                down.close();
                return delays;
            }})()"#
        ))
        .await;
    let delays = delays.as_array().expect("a list").clone();
    assert_eq!(delays.len(), 6);
    for (n, pair) in delays.iter().enumerate() {
        let (attempt, delay) = (pair[0].as_u64().unwrap(), pair[1].as_f64().unwrap());
        assert_eq!(attempt, n as u64 + 1);
        // The ceiling doubles from minDelay up to maxDelay; each delay is
        // drawn from its upper half.
        let ceiling = (40.0 * 2f64.powi(n as i32)).min(200.0);
        assert!(
            (ceiling / 2.0..=ceiling).contains(&delay),
            "attempt {attempt}: {delay} ms, not in [{}, {ceiling}]",
            ceiling / 2.0
        );
    }
}
