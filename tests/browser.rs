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
        let (accepting, relays) = (up.clone(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    // Down: the connection is closed at once.
                    continue;
                }
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
    ann.wait_until(
        "ann's page to show it is offline",
        "document.getElementById('state').classList.contains('reconnecting')",
        SHOW,
    )
    .await;
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
    let missed: Vec<String> = (1..=3)
        .map(|n| format!("while you were away {n}"))
        .collect();
    for text in &missed {
        say(&bob, text).await;
        shows(&bob, &format!("{bob_name} said: {text}")).await;
    }
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
    let said: Vec<String> = lines(&ann)
        .await
        .into_iter()
        .filter(|l| l.contains(" said: "))
        .collect();
    let mut expected = vec![format!("{bob_name} said: before the cut")];
    expected.extend(missed.iter().map(|t| format!("{bob_name} said: {t}")));
    assert_eq!(said, expected);
    let seqs = strings(
        ann.eval(
            "Array.from(document.querySelectorAll('#lines .line.message')).map(l => l.dataset.seq)",
        )
        .await,
    );
    assert_eq!(seqs, ["1", "2", "3", "4"]);
    let gaps = ann
        .eval("document.querySelectorAll('#lines .line.gap').length")
        .await;
    assert_eq!(gaps, 0);

    // And live again: both ways.
    say(&ann, "back").await;
    shows(&bob, &format!("{} said: back", online(&ann, 2).await)).await;
    ann.screenshot(&screenshot_path("chat-resumed")).await;
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
