//! Headless-Chromium test harness for clubcast: one real server, N real browsers.
//!
//! - [`Server`] runs the `clubcast-server` binary on a free loopback port with
//!   a private data directory and `--static-dir web`. The binary is built with
//!   `cargo build --workspace --all-targets` (plus `--features
//!   clubcast-server/test-hooks` when [`ServerOptions::test_hooks`] asks for
//!   it) and found from cargo's own JSON
//!   artifact report, so `CARGO_TARGET_DIR` and any other target-dir setting
//!   are respected. Both builds share the target dir; since cargo links either
//!   one to the same `debug/clubcast-server`, each is copied at once to a name
//!   of its own (see [`server_binary`]). `CLUBCAST_SERVER_BIN` (and
//!   `CLUBCAST_SERVER_TEST_HOOKS_BIN`) skip the build. A separate process
//!   (rather than the app in-process) runs exactly what `main` wires up: demo
//!   source, seeder, ingest.
//! - [`Browser`] runs one chromedriver (its own free port, its own process
//!   group) driving headless Chromium with a fresh profile directory, through
//!   fantoccini.
//!
//! - [`watch_all`], [`first_frames`] and [`sample_all`] are the steps every
//!   browser test takes: open `/watch/…` in N browsers, wait for their first
//!   frames, then sample each `<video>` for a window ([`Playback`]).
//!
//! Cleanup: both kill what they started on drop, also when a test panics:
//! the server by its pid, chromedriver and the Chromium it launched by their
//! process group. Temporary directories are removed after the processes are gone.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Lets pages start playback with sound before any user gesture.
pub const AUTOPLAY_ANYTHING: &str = "--autoplay-policy=no-user-gesture-required";
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
    AUTOPLAY_ANYTHING,
    // A small window: with `--disable-gpu` Chromium scales and composites every
    // video frame in software, which at the default 800×600 cost about 4 points
    // of a core per player (13 → 9 % with P2P on, 2 browsers, `bench_e2e`). A
    // viewer's GPU does that work; decoding and the peer still run in full.
    "--window-size=320,240",
];
/// Reads the page's first `<video>`, or the one in its `<clubcast-player>`
/// (see [`Browser::video`]).
const VIDEO_JS: &str = "const el = document.querySelector('clubcast-player');
    const v = document.querySelector('video')
        || (el && el.shadowRoot && el.shadowRoot.querySelector('video'));
    return v ? {current_time: v.currentTime, paused: v.paused, ready_state: v.readyState,
                error: v.error ? {code: v.error.code, message: v.error.message} : null}
             : null;";
/// Sampling period of [`sample`].
pub const TICK: Duration = Duration::from_millis(250);
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
    /// The page's `<video>` reported a media error.
    #[error("media error: {0}")]
    Media(String),
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
        if let Ok(s) = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
            // Polling a port that nobody listens on yet, in the ephemeral
            // range, can connect the socket to itself (TCP simultaneous
            // open, when the kernel picks the same port as the source): that
            // is not the process. The likeliest cause of one failure here:
            // chromedriver's port answered, then refused the session.
            if s.local_addr().ok() != s.peer_addr().ok() {
                return Ok(());
            }
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
    http_request(addr, "GET", path, b"").await
}

/// `method path` with `body` over HTTP/1.0; the status and the body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), HarnessError> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(io(format!("connect {addr}")))?;
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).await.map_err(io("send request"))?;
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

/// The `clubcast-server` executable, built once per process and feature set.
///
/// The build selects what `cargo test --workspace` builds, so that it
/// resolves the same dependency features and finds them compiled already.
/// `test_hooks` adds `--features clubcast-server/test-hooks` (into the same
/// target dir: only the server crate's own targets are compiled again; cargo
/// keeps both variants, so switching back is free). The plain build never
/// has the feature: nothing in this crate depends on `clubcast-server`, so
/// feature unification cannot turn it on. Cargo links whichever build ran
/// last to `debug/clubcast-server`, so the executable is copied at once to
/// `debug/clubcast-tests/clubcast-server[-test-hooks]` (via a rename, so a
/// running copy is never overwritten) and run from there.
/// `CLUBCAST_SERVER_BIN` (plain) and `CLUBCAST_SERVER_TEST_HOOKS_BIN` skip the
/// build.
pub fn server_binary(test_hooks: bool) -> Result<PathBuf, HarnessError> {
    static PLAIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static HOOKS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let (cell, var) = if test_hooks {
        (&HOOKS, "CLUBCAST_SERVER_TEST_HOOKS_BIN")
    } else {
        (&PLAIN, "CLUBCAST_SERVER_BIN")
    };
    cell.get_or_init(|| match std::env::var(var) {
        Ok(p) => Ok(PathBuf::from(p)),
        Err(_) => build_server(test_hooks),
    })
    .clone()
    .map_err(HarnessError::Build)
}

fn build_server(test_hooks: bool) -> Result<PathBuf, String> {
    // Two tests of one process may build at once; cargo would serialize them
    // anyway, and the copy below must not interleave.
    static BUILD: Mutex<()> = Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // `--workspace --all-targets` resolves dependency features exactly as
    // `cargo test --workspace` does, so after `just test` has compiled the
    // tests every dependency is fresh. `-p clubcast-server` would resolve them
    // for the server alone and build ~90 crates a second time (4 min in CI).
    cmd.current_dir(workspace_dir()).args([
        "build",
        "--workspace",
        "--all-targets",
        "--message-format=json-render-diagnostics",
    ]);
    if test_hooks {
        cmd.args(["--features", "clubcast-server/test-hooks"]);
    }
    // Cargo runs a test with its package's variables (`CARGO_PKG_NAME`,
    // `CARGO_MANIFEST_DIR`, `OUT_DIR`, ...). Build scripts such as ring's
    // rerun when those change in cargo's own environment, so inherited they
    // made this build recompile ring and the 11 crates above it.
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("CARGO_BIN_")
            || matches!(
                k,
                "OUT_DIR" | "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR"
            )
        {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("cargo build exited with {}", out.status));
    }
    let built = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && m["target"]["name"] == "clubcast-server"
                && m["target"]["kind"] == json!(["bin"])
                && m["profile"]["test"] == false
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "no clubcast-server executable in cargo's report".to_owned())?;
    let dir = built
        .parent()
        .ok_or_else(|| format!("{} has no parent dir", built.display()))?
        .join("clubcast-tests");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let name = if test_hooks {
        "clubcast-server-test-hooks"
    } else {
        "clubcast-server"
    };
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    std::fs::copy(&built, &tmp).map_err(|e| format!("copy {}: {e}", built.display()))?;
    let dest = dir.join(name);
    std::fs::rename(&tmp, &dest).map_err(|e| format!("rename to {}: {e}", dest.display()))?;
    Ok(dest)
}

/// Extra options for [`Server::start`].
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Further command-line arguments, e.g. `["--clubs", "4"]`.
    pub args: Vec<String>,
    /// Build the server with the `test-hooks` cargo feature (needed for
    /// `--allow-test-corruption`).
    pub test_hooks: bool,
    /// `--base-path`: every route under it; [`Server::url`] includes it.
    pub base_path: Option<String>,
}

/// Starts `bin` with `args`, logging to `log` (appended), and waits for it
/// to listen on `port`.
async fn spawn_server(
    bin: &Path,
    args: &[std::ffi::OsString],
    log: &Path,
    port: u16,
) -> Result<Child, HarnessError> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io("server log"))?;
    let err = out.try_clone().map_err(io("server log"))?;
    let mut child = Command::new(bin)
        .args(args)
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
    Ok(child)
}

/// A running `clubcast-server` with the demo stream.
pub struct Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    /// `--base-path`, or empty.
    base: String,
    /// The executable and its arguments, for [`Server::restart`].
    bin: PathBuf,
    args: Vec<std::ffi::OsString>,
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
        let test_hooks = opts.test_hooks;
        let bin = tokio::task::spawn_blocking(move || server_binary(test_hooks))
            .await
            .map_err(|e| HarnessError::Build(e.to_string()))??;
        let dir = tempfile::tempdir().map_err(io("temp dir"))?;
        let port = free_port()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let log = dir.path().join("server.log");
        let mut args: Vec<std::ffi::OsString> = vec![
            "--listen".into(),
            addr.to_string().into(),
            "--static-dir".into(),
            web.into(),
            "--data-dir".into(),
            dir.path().join("data").into(),
        ];
        args.extend(opts.args.iter().map(Into::into));
        let base = opts.base_path.clone().unwrap_or_default();
        if !base.is_empty() {
            args.extend(["--base-path".into(), base.clone().into()]);
        }
        let child = spawn_server(&bin, &args, &log, port).await?;
        Ok(Server {
            child,
            addr,
            log,
            base,
            bin,
            args,
            _dir: dir,
        })
    }

    /// Kills the server (SIGKILL: nothing is saved on the way out, as in a
    /// crash) and starts it again with the same arguments, port and data
    /// dir. The log goes on in the same file.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_server(&self.bin, &self.args, &self.log, self.addr.port()).await?;
        Ok(())
    }

    /// [`Server::start`], then waits (up to a minute) for the demo stream.
    pub async fn start_demo(opts: ServerOptions) -> Result<Server, HarnessError> {
        let server = Server::start(opts).await?;
        server
            .wait_for_stream("demo", Duration::from_secs(60))
            .await?;
        Ok(server)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET /metrics`: every sample as `name{labels}` → value.
    pub async fn metrics(&self) -> Result<BTreeMap<String, f64>, HarnessError> {
        let (status, body) = http_get(self.addr, &format!("{}/metrics", self.base)).await?;
        if status != 200 {
            return Err(HarnessError::Io {
                what: "GET /metrics".into(),
                source: std::io::Error::other(format!("status {status}")),
            });
        }
        Ok(parse_metrics(&String::from_utf8_lossy(&body)))
    }

    /// The HTTP base URL, `http://127.0.0.1:<port>` (and the base path).
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.base)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's `--data-dir` (inside its temporary directory).
    pub fn data_dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    /// Waits until stream `id` (id or name) serves its init segment.
    pub async fn wait_for_stream(&self, id: &str, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let init = format!("{}/streams/{id}/init", self.base);
            if let Ok((200, _)) = http_get(self.addr, &init).await {
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
        Browser::launch_with(CHROMIUM_FLAGS).await
    }

    /// [`Browser::launch`] with the browser's own autoplay policy, as a
    /// visitor's: no playback with sound before a user gesture.
    pub async fn launch_with_autoplay_policy() -> Result<Browser, HarnessError> {
        let flags: Vec<&str> = CHROMIUM_FLAGS
            .iter()
            .copied()
            .filter(|f| *f != AUTOPLAY_ANYTHING)
            .collect();
        Browser::launch_with(&flags).await
    }

    /// [`Browser::launch`] with `extra` flags.
    pub async fn launch_with_flags(extra: &[&str]) -> Result<Browser, HarnessError> {
        let flags: Vec<&str> = CHROMIUM_FLAGS.iter().chain(extra).copied().collect();
        Browser::launch_with(&flags).await
    }

    async fn launch_with(flags: &[&str]) -> Result<Browser, HarnessError> {
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
        let mut browser_args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
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

    /// Launches a browser and opens `url` in it.
    pub async fn watch(url: &str) -> Result<Browser, HarnessError> {
        let b = Browser::launch().await?;
        b.goto(url).await?;
        Ok(b)
    }

    /// The process group of chromedriver and the Chromium it started.
    pub fn process_group(&self) -> u32 {
        self.driver.id()
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

    /// The page's first `<video>`, or its `<clubcast-player>`'s:
    /// `{current_time, paused, error, ready_state}`.
    pub async fn video(&self) -> Result<Value, HarnessError> {
        self.eval(VIDEO_JS).await
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

/// Stdout of `cmd args` run in the workspace, trimmed; empty if it failed.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .current_dir(workspace_dir())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// What a benchmark file says of its run: the UTC time, the commit (marked
/// if the working tree has uncommitted changes) and the CPU model.
pub fn run_stamp() -> (String, String, String) {
    let date = sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]);
    let c = sh("git", &["rev-parse", "--short", "HEAD"]);
    let commit = if sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        c
    } else {
        format!("{c} (working tree has uncommitted changes)")
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    (date, commit, cpu)
}

/// `v[k]` with `digits` decimals, or "–" when absent or not a number.
pub fn fixed(v: &Value, k: &str, digits: usize) -> String {
    v.get(k)
        .and_then(Value::as_f64)
        .map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// The generated `md`, followed by the hand-written notes of the file it
/// replaces (`old`, from its first `## Notes` heading on), which outlive a
/// rerun as `sim.md`'s do.
pub fn with_notes(md: String, old: Option<&str>) -> String {
    let Some(notes) = old.and_then(|o| o.find("\n## Notes").map(|i| &o[i + 1..])) else {
        return md;
    };
    format!("{}\n\n{notes}", md.trim_end())
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

/// `v[k]` as a number, 0 when absent or not a number.
pub fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// The `q` quantile (0..=1, nearest rank) of `xs` (None when empty).
pub fn quantile(xs: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i])
}

/// Prometheus text exposition → `name{labels}` → value (comments skipped).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// A loopback TCP proxy in front of the server whose connections can be cut
/// at once, as a network blip or a proxy restart would: a browser that loads
/// its page through it has its signaling socket and HTTP fetches on it, while
/// its WebRTC links go around it. It keeps listening after a cut, so the
/// browser can reconnect. Everything stops on drop.
pub struct Proxy {
    addr: SocketAddr,
    conns: std::sync::Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Proxy, HarnessError> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(io("proxy bind"))?;
        let addr = listener.local_addr().map_err(io("proxy address"))?;
        let conns = std::sync::Arc::new(Mutex::new(Vec::new()));
        let list = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
                list.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
                list.push(task);
            }
        });
        Ok(Proxy {
            addr,
            conns,
            accept,
        })
    }

    /// `http://127.0.0.1:port` of the proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection open through the proxy; how many there were.
    pub fn cut(&self) -> usize {
        let mut list = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let open = list.iter().filter(|t| !t.is_finished()).count();
        for t in list.drain(..) {
            t.abort();
        }
        open
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Launches `n` browsers, one after the other, each on `url`.
pub async fn watch_all(n: usize, url: &str) -> Result<Vec<Browser>, HarnessError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Browser::watch(url).await?);
    }
    Ok(out)
}

/// Waits until every browser shows a first frame; their `startup_ms`.
/// A media error on the way, or `timeout`, is an error.
pub async fn first_frames(
    browsers: &[Browser],
    timeout: Duration,
) -> Result<Vec<f64>, HarnessError> {
    let deadline = Instant::now() + timeout;
    let mut startup: Vec<Option<f64>> = vec![None; browsers.len()];
    while startup.iter().any(Option::is_none) {
        for (i, b) in browsers.iter().enumerate() {
            if startup[i].is_some() {
                continue;
            }
            let s = b.stats().await?;
            startup[i] = s.get("startup_ms").and_then(Value::as_f64);
            let v = b.video().await?;
            if !v["error"].is_null() {
                return Err(HarnessError::Media(format!(
                    "browser {i} before its first frame: {v}; stats {s}"
                )));
            }
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Timeout(format!(
                "not every browser showed a first frame in {timeout:?}: {startup:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(startup.into_iter().flatten().collect())
}

/// What one browser's `<video>` did in a sampled window.
#[derive(Debug, Default, Clone)]
pub struct Playback {
    /// `currentTime` at the first sample.
    pub first: Option<f64>,
    /// The largest `currentTime` seen.
    pub last: f64,
    /// Longest wall time with `currentTime` not moving, in ms (resolution: one [`TICK`]).
    pub longest_freeze_ms: f64,
    /// Freezes longer than 500 ms.
    pub freezes_over_500ms: usize,
    /// Media errors, missing video, failed WebDriver calls.
    pub errors: Vec<String>,
    /// Samples taken.
    pub samples: usize,
}

impl Playback {
    /// Media seconds played in the window.
    pub fn advance(&self) -> f64 {
        self.first.map_or(0.0, |f| self.last - f)
    }
}

/// Samples the `<video>` of `client` every [`TICK`] for `window`.
pub async fn sample(client: Client, window: Duration) -> Playback {
    let mut p = Playback::default();
    let end = Instant::now() + window;
    let mut frozen_since: Option<Instant> = None;
    let mut counted = false;
    let mut tick = tokio::time::interval(TICK);
    while Instant::now() < end {
        tick.tick().await;
        let v = match client.execute(VIDEO_JS, Vec::new()).await {
            Ok(v) => v,
            Err(e) => {
                p.errors.push(format!("webdriver: {e}"));
                continue;
            }
        };
        p.samples += 1;
        if !v["error"].is_null() {
            p.errors.push(format!("media error: {}", v["error"]));
        }
        let Some(t) = v["current_time"].as_f64() else {
            p.errors.push(format!("no video: {v}"));
            continue;
        };
        let now = Instant::now();
        match p.first {
            None => {
                p.first = Some(t);
                p.last = t;
                frozen_since = Some(now);
            }
            Some(_) if t > p.last => {
                p.last = t;
                frozen_since = Some(now);
                counted = false;
            }
            Some(_) => {
                let since = frozen_since.get_or_insert(now);
                let ms = now.duration_since(*since).as_secs_f64() * 1000.0;
                p.longest_freeze_ms = p.longest_freeze_ms.max(ms);
                if ms > 500.0 && !counted {
                    p.freezes_over_500ms += 1;
                    counted = true;
                }
            }
        }
    }
    p
}

/// Samples every browser's `<video>` concurrently for `window`, starting at
/// once (one task per browser, spawned before this returns); the future gives
/// the results in browser order.
pub fn sample_all(
    browsers: &[Browser],
    window: Duration,
) -> impl std::future::Future<Output = Vec<Playback>> + Send + 'static {
    let tasks: Vec<_> = browsers
        .iter()
        .map(|b| tokio::spawn(sample(b.client().clone(), window)))
        .collect();
    async move {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("a sampler task does not panic"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rerun_keeps_the_hand_written_notes() {
        let old = "# E2E\n\n| old table |\n\n## Definitions\n\nx\n\n## Notes on a run\n\nWhy.\n";
        let md = with_notes(
            "# E2E\n\n| new table |\n\n## Definitions\n\nx\n".into(),
            Some(old),
        );
        assert_eq!(
            md,
            "# E2E\n\n| new table |\n\n## Definitions\n\nx\n\n## Notes on a run\n\nWhy.\n"
        );
        assert_eq!(with_notes("new\n".into(), None), "new\n");
        assert_eq!(with_notes("new\n".into(), Some("no notes\n")), "new\n");
    }

    #[test]
    fn fixed_formats_numbers_and_marks_the_rest() {
        let v = json!({"a": 1.234, "b": "x"});
        assert_eq!(fixed(&v, "a", 1), "1.2");
        assert_eq!(fixed(&v, "b", 1), "–");
        assert_eq!(fixed(&v, "c", 0), "–");
    }
}
