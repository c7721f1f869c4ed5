//! Headless-Chromium test harness for clubcast: one real server, N real browsers.
//!
//! - [`Server`] runs the `clubcast-server` binary on a free loopback port with
//!   a private data directory and `--static-dir web`. The binary is built with
//!   `cargo build -p clubcast-server` and found from cargo's own JSON artifact
//!   report, so `CARGO_TARGET_DIR` and any other target-dir setting are
//!   respected; `CLUBCAST_SERVER_BIN` skips the build. A separate process
//!   (rather than the app in-process) runs exactly what `main` wires up: demo
//!   source, seeder, ingest.
//! - [`Browser`] runs one chromedriver (its own free port, its own process
//!   group) driving headless Chromium with a fresh profile directory, through
//!   fantoccini.
//!
//! Cleanup: both kill what they started on drop, also when a test panics:
//! the server by its pid, chromedriver and the Chromium it launched by their
//! process group. Temporary directories are removed after the processes are gone.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The Chromium flags every test browser gets (plus a fresh `--user-data-dir`).
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
];
/// How long a started process gets to accept connections.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// Spawning or talking to a process failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `cargo build -p clubcast-server` failed or named no executable.
    #[error("building clubcast-server: {0}")]
    Build(String),
    /// `web/pkg` is missing: the wasm peer was not built.
    #[error("{0} is missing; run `just build-web` first")]
    NoWasm(PathBuf),
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The WebDriver session could not be made.
    #[error("webdriver session: {0}")]
    Session(#[from] fantoccini::error::NewSessionError),
    /// A WebDriver command failed.
    #[error("webdriver: {0}")]
    Command(#[from] fantoccini::error::CmdError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// The workspace root (this crate lives in `tests/`).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits inside the workspace")
        .to_path_buf()
}

/// A free loopback TCP port (bound and released; good enough for tests).
pub fn free_port() -> Result<u16, HarnessError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("bind a free port"))?;
    Ok(l.local_addr().map_err(io("local addr"))?.port())
}

async fn wait_for_port(port: u16, what: &str, child: &mut Child) -> Result<(), HarnessError> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(HarnessError::Timeout(format!("{what} exited: {status}")));
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Timeout(format!("{what} on port {port}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET http://addr/path` over HTTP/1.0: the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), HarnessError> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(io(format!("connect {addr}")))?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(io("send GET"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(io("read answer"))?;
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(buf.len(), |i| i + 4);
    let status = std::str::from_utf8(&buf[..head_end])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, buf[head_end..].to_vec()))
}

fn server_binary() -> Result<PathBuf, HarnessError> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("CLUBCAST_SERVER_BIN") {
            return Ok(PathBuf::from(p));
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .current_dir(workspace_dir())
            .args([
                "build",
                "-p",
                "clubcast-server",
                "--bin",
                "clubcast-server",
                "--message-format=json-render-diagnostics",
            ])
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("cargo build exited with {}", out.status));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|m| {
                m["reason"] == "compiler-artifact" && m["target"]["name"] == "clubcast-server"
            })
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .ok_or_else(|| "no clubcast-server executable in cargo's report".to_owned())
    })
    .clone()
    .map_err(HarnessError::Build)
}

/// Extra options for [`Server::start`].
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Further command-line arguments, e.g. `["--clubs", "4"]`.
    pub args: Vec<String>,
}

/// A running `clubcast-server` with the demo stream.
pub struct Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Builds (if needed) and starts the server on a free loopback port.
    pub async fn start(opts: ServerOptions) -> Result<Server, HarnessError> {
        let web = workspace_dir().join("web");
        let pkg = web.join("pkg").join("clubcast_peer_bg.wasm");
        if !pkg.exists() {
            return Err(HarnessError::NoWasm(pkg));
        }
        let bin = tokio::task::spawn_blocking(server_binary)
            .await
            .map_err(|e| HarnessError::Build(e.to_string()))??;
        let dir = tempfile::tempdir().map_err(io("temp dir"))?;
        let port = free_port()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let log = dir.path().join("server.log");
        let out = std::fs::File::create(&log).map_err(io("server log"))?;
        let err = out.try_clone().map_err(io("server log"))?;
        let mut child = Command::new(&bin)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--static-dir")
            .arg(&web)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(&opts.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io(format!("spawn {}", bin.display())))?;
        if let Err(e) = wait_for_port(port, "clubcast-server", &mut child).await {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(Server {
            child,
            addr,
            log,
            _dir: dir,
        })
    }

    /// The HTTP base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until stream `id` (id or name) serves its init segment.
    pub async fn wait_for_stream(&self, id: &str, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = http_get(self.addr, &format!("/streams/{id}/init")).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(format!(
                    "stream {id:?} has no init segment; server log:\n{}",
                    self.log_tail(40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One chromedriver with one headless Chromium session.
pub struct Browser {
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver (`CHROMEDRIVER`, default `/usr/bin/chromedriver`)
    /// and a Chromium session (`CHROMIUM`, default `/usr/bin/chromium`).
    pub async fn launch() -> Result<Browser, HarnessError> {
        use std::os::unix::process::CommandExt;
        let driver_bin =
            std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let profile = tempfile::tempdir().map_err(io("profile dir"))?;
        let port = free_port()?;
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group, so that Chromium dies with it on drop.
            .process_group(0)
            .spawn()
            .map_err(io(format!("spawn {driver_bin}")))?;
        let mut browser_args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
        browser_args.push(format!("--user-data-dir={}", profile.path().display()));
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": browser_args},
        });
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!("built as an object above"),
        };
        let mut browser = Browser {
            client: None,
            driver,
            _profile: profile,
        };
        wait_for_port(port, "chromedriver", &mut browser.driver).await?;
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await?;
        browser.client = Some(client);
        Ok(browser)
    }

    /// The WebDriver client.
    pub fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("a Browser always holds its client until close")
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) -> Result<(), HarnessError> {
        Ok(self.client().goto(url).await?)
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub async fn eval(&self, script: &str) -> Result<Value, HarnessError> {
        Ok(self.client().execute(script, Vec::new()).await?)
    }

    /// `window.player.stats()` of the watch page, or `Null` before it exists.
    pub async fn stats(&self) -> Result<Value, HarnessError> {
        self.eval("return window.player ? window.player.stats() : null;")
            .await
    }

    /// The page's first `<video>`: `{current_time, paused, error, ready_state}`.
    pub async fn video(&self) -> Result<Value, HarnessError> {
        self.eval(
            "const v = document.querySelector('video');
             return v ? {current_time: v.currentTime, paused: v.paused, ready_state: v.readyState,
                         error: v.error ? {code: v.error.code, message: v.error.message} : null}
                      : null;",
        )
        .await
    }

    /// Ends the session cleanly, then stops chromedriver.
    pub async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.close()).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Kill chromedriver's whole process group (Chromium included) by its id.
        let pgid = self.driver.id();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // Let the killed Chromium processes go before the profile is removed.
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Median of `xs` (None when empty).
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}
