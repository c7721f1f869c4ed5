//! The seeder's data channel to a real browser under packet loss.
//!
//! ```text
//! cargo run -p clubcast-tests --bin bench_loss -- [--loss 0,2,5] [--secs 60]
//!     [--seed 1] [--stacks webrtc-rs,str0m] [--out bench/results]
//!     [--command "just bench-loss"]
//! ```
//!
//! Per loss rate (in %) and per WebRTC stack of the seeder (`--seeder-rtc`; the
//! stacks take turns at each rate, so both see the same hour of a noisy
//! machine), with a fresh server and a fresh headless Chromium:
//! the browser loads `/watch/demo` through a proxy that forwards HTTP as it
//! is and rewrites the signaling, so that the WebRTC link between the browser
//! and the server's seeder (peer 0) crosses a UDP relay that drops each
//! datagram with that probability, both ways. The seeder's candidates reach
//! the browser with the relay's address in their place, and the browser's
//! candidates do not reach the seeder, which learns the relay's address from
//! the browser's connectivity checks (a peer-reflexive candidate). Only the
//! seeder's link crosses the relay: the one browser has no other peer.
//!
//! The window of `--secs` starts at the first frame; the browser's `stats()`
//! are read once a second. Writes `loss.md` and `loss.json` into `--out`.
//! Nothing is asserted: the figures are reported as measured.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clubcast_tests::{fixed, num, quantile, run_stamp, with_notes, Browser, Server, ServerOptions};
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message;

/// With `CLUBCAST_BENCH_TRACE`: records the player's playback events.
const TRACE_HOOK_JS: &str = "window.__trace = []; \
    for (const t of ['gap', 'jump', 'nudge', 'skip', 'stall', 'resume', 'origin_fallback', 'link_failed', 'error']) \
    window.player.on(t, (e) => window.__trace.push([Math.round(performance.now()), t, e])); return true;";
/// With `CLUBCAST_BENCH_TRACE`: the video element's state and the events since the last call.
const TRACE_POLL_JS: &str = "const v = document.querySelector('video'); const b = []; \
    for (let i = 0; i < v.buffered.length; i++) b.push([v.buffered.start(i), v.buffered.end(i)]); \
    const ev = window.__trace; window.__trace = []; \
    return {t: v.currentTime, paused: v.paused, ready: v.readyState, rate: v.playbackRate, \
    seeking: v.seeking, buffered: b, events: ev};";

/// The seeder's peer id in signaling (`clubcast_protocol::SEEDER_PEER_ID`).
const SEEDER: u64 = 0;
/// Stall time in a window past which a run without a trace prints the
/// player's events and state, ms.
const LONG_STALL_MS: f64 = 10_000.0;
/// Wall time allowed for the first frame.
const START_TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    loss: Vec<f64>,
    stacks: Vec<String>,
    secs: u64,
    seed: u64,
    out: PathBuf,
    command: String,
}

fn args() -> Args {
    let mut a = Args {
        loss: vec![0.0, 2.0, 5.0],
        stacks: vec!["webrtc-rs".into(), "str0m".into()],
        secs: 60,
        seed: 1,
        out: PathBuf::from("bench/results"),
        command: "cargo run -p clubcast-tests --bin bench_loss".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--loss" => {
                a.loss = v()
                    .split(',')
                    .map(|s| s.trim().parse().expect("--loss P,P,... (percent)"))
                    .collect();
                assert!(
                    a.loss.iter().all(|p| (0.0..100.0).contains(p)),
                    "--loss: each rate in [0, 100)"
                );
            }
            "--stacks" => {
                a.stacks = v().split(',').map(|s| s.trim().to_owned()).collect();
                assert!(
                    a.stacks.iter().all(|s| s == "webrtc-rs" || s == "str0m"),
                    "--stacks: webrtc-rs and/or str0m"
                );
            }
            "--secs" => a.secs = v().parse().expect("--secs S"),
            "--seed" => a.seed = v().parse().expect("--seed N"),
            "--out" => a.out = PathBuf::from(v()),
            "--command" => a.command = v(),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Datagrams through the relays, by direction and fate.
#[derive(Default)]
struct Counts {
    to_seeder: AtomicU64,
    to_seeder_dropped: AtomicU64,
    to_browser: AtomicU64,
    to_browser_dropped: AtomicU64,
}

/// The lossy path: one UDP relay per seeder candidate.
struct Lossy {
    loss: f64,
    /// The address the relays listen on (the host's, not loopback: Chromium
    /// gathers and pairs host candidates on its interfaces).
    ip: IpAddr,
    relays: Mutex<HashMap<SocketAddr, SocketAddr>>,
    counts: Arc<Counts>,
    rng: Arc<Mutex<rand::rngs::StdRng>>,
    candidates_rewritten: AtomicU64,
    candidates_withheld: AtomicU64,
}

impl Lossy {
    fn drop_one(&self) -> bool {
        self.loss > 0.0
            && self
                .rng
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .gen_bool(self.loss)
    }

    /// The relay's address for seeder candidate `seeder` (started on first use).
    async fn relay_for(self: &Arc<Self>, seeder: SocketAddr) -> std::io::Result<SocketAddr> {
        if let Some(a) = self
            .relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&seeder)
        {
            return Ok(*a);
        }
        let down = Arc::new(UdpSocket::bind((self.ip, 0)).await?);
        let addr = down.local_addr()?;
        self.relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seeder, addr);
        let me = self.clone();
        tokio::spawn(async move {
            let _ = me.relay(down, seeder).await;
        });
        Ok(addr)
    }

    /// Forwards what browsers send to `down` to the seeder at `seeder`, each
    /// browser address from its own upstream socket, and the answers back.
    async fn relay(
        self: Arc<Self>,
        down: Arc<UdpSocket>,
        seeder: SocketAddr,
    ) -> std::io::Result<()> {
        let mut ups: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, from) = down.recv_from(&mut buf).await?;
            let up = match ups.get(&from) {
                Some(u) => u.clone(),
                None => {
                    let u = Arc::new(UdpSocket::bind((self.ip, 0)).await?);
                    u.connect(seeder).await?;
                    let (back, down, me) = (u.clone(), down.clone(), self.clone());
                    tokio::spawn(async move {
                        let mut b = vec![0u8; 65_536];
                        while let Ok(n) = back.recv(&mut b).await {
                            me.counts.to_browser.fetch_add(1, Ordering::Relaxed);
                            if me.drop_one() {
                                me.counts.to_browser_dropped.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            let _ = down.send_to(&b[..n], from).await;
                        }
                    });
                    ups.insert(from, u.clone());
                    u
                }
            };
            self.counts.to_seeder.fetch_add(1, Ordering::Relaxed);
            if self.drop_one() {
                self.counts
                    .to_seeder_dropped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let _ = up.send(&buf[..n]).await;
        }
    }

    /// Candidate line `c` (with or without `a=`) of the seeder with the relay's
    /// address in place of its own, or `None` for a candidate the relay cannot
    /// stand in for (not UDP, or not an IP address), which is withheld.
    async fn rewrite(self: &Arc<Self>, c: &str) -> Option<String> {
        let mut f: Vec<String> = c.split(' ').map(str::to_owned).collect();
        if f.len() < 8 || !f[2].eq_ignore_ascii_case("udp") {
            self.candidates_withheld.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let (Ok(ip), Ok(port)) = (f[4].parse::<IpAddr>(), f[5].parse::<u16>()) else {
            self.candidates_withheld.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let relay = self.relay_for(SocketAddr::new(ip, port)).await.ok()?;
        f[4] = relay.ip().to_string();
        f[5] = relay.port().to_string();
        self.candidates_rewritten.fetch_add(1, Ordering::Relaxed);
        Some(f.join(" "))
    }

    /// SDP `sdp` of the seeder with its candidate lines rewritten.
    async fn rewrite_sdp(self: &Arc<Self>, sdp: &str) -> String {
        let mut out = Vec::new();
        for line in sdp.split("\r\n") {
            if line.starts_with("a=candidate:") {
                if let Some(l) = self.rewrite(line).await {
                    out.push(l);
                }
            } else {
                out.push(line.to_owned());
            }
        }
        out.join("\r\n")
    }

    /// A server-to-browser message, rewritten if it carries the seeder's ICE.
    async fn server_msg(self: &Arc<Self>, text: &str) -> Option<String> {
        let Some(mut v) = seeder_signal(text, "from") else {
            return Some(text.to_owned());
        };
        let data = &mut v["data"];
        match data["kind"].as_str() {
            Some("candidate") => {
                let c = data["candidate"].as_str().unwrap_or("").to_owned();
                if c.is_empty() {
                    return Some(text.to_owned());
                }
                data["candidate"] = json!(self.rewrite(&c).await?);
            }
            Some("offer" | "answer") => {
                let sdp = data["sdp"].as_str().unwrap_or("").to_owned();
                data["sdp"] = json!(self.rewrite_sdp(&sdp).await);
            }
            _ => {}
        }
        Some(v.to_string())
    }

    /// A browser-to-server message, with the browser's own candidates for the
    /// seeder withheld.
    fn browser_msg(&self, text: &str) -> Option<String> {
        let Some(mut v) = seeder_signal(text, "to") else {
            return Some(text.to_owned());
        };
        let data = &mut v["data"];
        match data["kind"].as_str() {
            Some("candidate") => {
                self.candidates_withheld.fetch_add(1, Ordering::Relaxed);
                None
            }
            Some("offer" | "answer") => {
                let sdp = data["sdp"].as_str().unwrap_or("");
                let kept: Vec<&str> = sdp
                    .split("\r\n")
                    .filter(|l| !l.starts_with("a=candidate:"))
                    .collect();
                data["sdp"] = json!(kept.join("\r\n"));
                Some(v.to_string())
            }
            _ => Some(text.to_owned()),
        }
    }
}

/// Signaling message `text`, parsed, if it is a signal whose `party` (`from`
/// or `to`) is the seeder.
fn seeder_signal(text: &str, party: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(text).ok()?;
    (v["type"] == "signal" && v[party] == SEEDER).then_some(v)
}

/// The proxy in front of the server: `GET /ws` is relayed message by
/// message through [`Lossy`]; every other connection is copied as it is.
async fn proxy(listener: TcpListener, upstream: SocketAddr, lossy: Arc<Lossy>) {
    while let Ok((down, _)) = listener.accept().await {
        let lossy = lossy.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 8];
            let n = match down.peek(&mut head).await {
                Ok(n) => n,
                Err(_) => return,
            };
            if head[..n].starts_with(b"GET /ws") {
                if let Err(e) = signaling(down, upstream, lossy).await {
                    eprintln!("bench-loss: signaling relay: {e}");
                }
            } else if let Ok(mut up) = TcpStream::connect(upstream).await {
                let mut down = down;
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
        });
    }
}

async fn signaling(
    down: TcpStream,
    upstream: SocketAddr,
    lossy: Arc<Lossy>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let down = tokio_tungstenite::accept_async(down).await?;
    let (up, _) = tokio_tungstenite::connect_async(format!("ws://{upstream}/ws")).await?;
    let (mut down_tx, mut down_rx) = down.split();
    let (mut up_tx, mut up_rx) = up.split();
    let l = lossy.clone();
    let to_server = async move {
        while let Some(Ok(m)) = down_rx.next().await {
            let m = match m {
                Message::Text(t) => match l.browser_msg(t.as_str()) {
                    Some(t) => Message::text(t),
                    None => continue,
                },
                other => other,
            };
            if up_tx.send(m).await.is_err() {
                break;
            }
        }
    };
    let to_browser = async move {
        while let Some(Ok(m)) = up_rx.next().await {
            let m = match m {
                Message::Text(t) => match lossy.server_msg(t.as_str()).await {
                    Some(t) => Message::text(t),
                    None => continue,
                },
                other => other,
            };
            if down_tx.send(m).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = to_server => {}
        _ = to_browser => {}
    }
    Ok(())
}

/// This host's address on its default route (what Chromium's host candidates use).
fn host_ip() -> IpAddr {
    let s = StdUdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
    // No datagram is sent: connect only picks the route's source address.
    s.connect("192.0.2.1:9").expect("a default route");
    s.local_addr().expect("its address").ip()
}

/// One loss rate's run: the row of the table.
async fn run(
    a: &Args,
    loss_pct: f64,
    stack: &str,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let server = Server::start_demo(ServerOptions {
        args: vec!["--seeder-rtc".into(), stack.into()],
        ..ServerOptions::default()
    })
    .await?;
    let lossy = Arc::new(Lossy {
        loss: loss_pct / 100.0,
        ip: host_ip(),
        relays: Mutex::new(HashMap::new()),
        counts: Arc::new(Counts::default()),
        rng: Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(a.seed))),
        candidates_rewritten: AtomicU64::new(0),
        candidates_withheld: AtomicU64::new(0),
    });
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    let proxy_task = tokio::spawn(proxy(listener, server.addr(), lossy.clone()));
    let browser = Browser::watch(&format!("http://127.0.0.1:{port}/watch/demo")).await?;

    let opened = Instant::now();
    let first = loop {
        let s = browser.stats().await?;
        if s.get("startup_ms").is_some_and(|v| v.is_number()) {
            break s;
        }
        if opened.elapsed() > START_TIMEOUT {
            return Err(
                format!("no first frame within {START_TIMEOUT:?} at {loss_pct} % loss").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let m0 = server.metrics().await?;
    let t0 = Instant::now();
    // `CLUBCAST_BENCH_TRACE=1`: every second's stats, and the server's log at the end.
    let trace = std::env::var_os("CLUBCAST_BENCH_TRACE").is_some();
    let mut latency = Vec::new();
    let mut peers_seen = 0.0f64;
    let mut last = first.clone();
    // The events are kept in every run (event listeners cost nothing
    // measurable), so that a long stall can be looked at after the fact.
    browser.eval(TRACE_HOOK_JS).await?;
    while t0.elapsed() < Duration::from_secs(a.secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        last = browser.stats().await?;
        if trace {
            let keys = [
                "links",
                "peers",
                "bytes_from_peers",
                "bytes_from_origin",
                "stalls",
                "buffer_ms",
                "latency_ms",
                "current_time",
                "playback_rate",
                "next_play",
                "live_edge",
                "gap_fills",
                "origin_fetches",
                "origin_failures",
                "wants_sent",
                "blocks_skipped",
                "edge_probes",
                "origin_fallback",
                "slow_sources",
                "rejoins",
            ];
            let shown: Vec<String> = keys
                .iter()
                .map(|k| format!("{k} {}", last.get(*k).unwrap_or(&Value::Null)))
                .collect();
            eprintln!(
                "bench-loss: t {:.0} s: {}",
                t0.elapsed().as_secs_f64(),
                shown.join(" ")
            );
            eprintln!("bench-loss:   {}", browser.eval(TRACE_POLL_JS).await?);
        }
        if let Some(l) = last.get("latency_ms").and_then(Value::as_f64) {
            latency.push(l);
        }
        peers_seen = peers_seen.max(num(&last, "peers"));
    }
    let m1 = server.metrics().await?;
    if trace {
        eprintln!("bench-loss: server log:\n{}", server.log_tail(400));
    }
    let stalled_ms = num(&last, "stall_ms") - num(&first, "stall_ms");
    if !trace && stalled_ms > LONG_STALL_MS {
        // Without a trace: what the player did, and where it stands.
        eprintln!(
            "bench-loss: {stalled_ms} ms stalled; stats {last}\nbench-loss: video and events {}",
            browser.eval(TRACE_POLL_JS).await?
        );
    }
    let d = |k: &str| num(&last, k) - num(&first, k);
    let from_peers = d("bytes_from_peers");
    let from_origin = d("bytes_from_origin");
    let metric = |k: &str| m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0);
    let c = &lossy.counts;
    let row = json!({
        "loss_pct": loss_pct,
        "stack": stack,
        "window_s": t0.elapsed().as_secs_f64(),
        "startup_ms": num(&first, "startup_ms"),
        "bytes_from_peers": from_peers,
        "bytes_from_origin": from_origin,
        "peer_share": if from_peers + from_origin > 0.0 { from_peers / (from_peers + from_origin) } else { 0.0 },
        "seeded_bytes": metric("clubcast_bytes_seeded_total"),
        "stalls": d("stalls"),
        "stall_ms": d("stall_ms"),
        "nudges": d("nudges"),
        "skips": d("blocks_skipped"),
        "latency_ms_p50": quantile(&latency, 0.5),
        "latency_ms_p95": quantile(&latency, 0.95),
        "peers_max": peers_seen,
        "datagrams_to_seeder": c.to_seeder.load(Ordering::Relaxed),
        "datagrams_to_seeder_dropped": c.to_seeder_dropped.load(Ordering::Relaxed),
        "datagrams_to_browser": c.to_browser.load(Ordering::Relaxed),
        "datagrams_to_browser_dropped": c.to_browser_dropped.load(Ordering::Relaxed),
        "candidates_rewritten": lossy.candidates_rewritten.load(Ordering::Relaxed),
        "candidates_withheld": lossy.candidates_withheld.load(Ordering::Relaxed),
    });
    browser.close().await;
    proxy_task.abort();
    drop(server);
    Ok(row)
}

#[tokio::main]
async fn main() {
    let a = args();
    let mut rows = Vec::new();
    for &l in &a.loss {
        for stack in &a.stacks {
            eprintln!(
                "bench-loss: {l} % loss, seeder on {stack}, {} s window",
                a.secs
            );
            match run(&a, l, stack).await {
                Ok(r) => {
                    eprintln!("bench-loss: {r}");
                    rows.push(r);
                }
                Err(e) => {
                    eprintln!("bench-loss: {l} % loss on {stack} failed: {e}");
                    rows.push(json!({"loss_pct": l, "stack": stack, "error": e.to_string()}));
                }
            }
        }
    }
    let (date, commit, cpu) = run_stamp();
    let mut md = format!(
        "# The seeder's link to a browser under packet loss\n\n\
         - date: {date}\n- commit: {commit}\n- machine: nproc {}, {cpu}\n- command: `{}`\n\
         - setup: one release server with the demo stream (about 0.8 Mbit/s) and one headless \
         Chromium on `/watch/demo`, P2P on, through a proxy that sends the WebRTC link between \
         the browser and the seeder over a UDP relay dropping each datagram with the given \
         probability, both ways (loss draws seeded with {}); a fresh server and browser per row; \
         the seeder's WebRTC stack per row (`--seeder-rtc`), the stacks taking turns\n\
         - window: {} s from the first frame; `stats()` read once a second\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        a.command,
        a.seed,
        a.secs,
    );
    md.push_str(
        "| loss % | seeder stack | bytes from the seeder's link, share | bytes from the origin | stalls: count / ms | \
         blocks skipped | nudges | latency_ms p50 / p95 | startup_ms | \
         datagrams to the browser: through / dropped | to the seeder: through / dropped |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        if let Some(e) = r.get("error") {
            md.push_str(&format!(
                "| {} | {} | failed: {} | | | | | | | | |\n",
                r["loss_pct"],
                r["stack"].as_str().unwrap_or(""),
                e
            ));
            continue;
        }
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} / {} | {} | {} | {} / {} | {} | {} / {} | {} / {} |\n",
            r["loss_pct"],
            r["stack"].as_str().unwrap_or(""),
            fixed(r, "peer_share", 3),
            fixed(r, "bytes_from_origin", 0),
            fixed(r, "stalls", 0),
            fixed(r, "stall_ms", 0),
            fixed(r, "skips", 0),
            fixed(r, "nudges", 0),
            fixed(r, "latency_ms_p50", 0),
            fixed(r, "latency_ms_p95", 0),
            fixed(r, "startup_ms", 0),
            n("datagrams_to_browser") - n("datagrams_to_browser_dropped"),
            n("datagrams_to_browser_dropped"),
            n("datagrams_to_seeder") - n("datagrams_to_seeder_dropped"),
            n("datagrams_to_seeder_dropped"),
        ));
    }
    std::fs::create_dir_all(&a.out).expect("the output directory");
    let old = std::fs::read_to_string(a.out.join("loss.md")).ok();
    std::fs::write(a.out.join("loss.md"), with_notes(md, old.as_deref())).expect("write loss.md");
    std::fs::write(
        a.out.join("loss.json"),
        serde_json::to_string_pretty(&json!({"date": date, "commit": commit, "rows": rows}))
            .expect("json"),
    )
    .expect("write loss.json");
    eprintln!(
        "bench-loss: wrote {}/loss.md and loss.json",
        a.out.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lossy() -> Arc<Lossy> {
        Arc::new(Lossy {
            loss: 0.5,
            ip: IpAddr::from([127, 0, 0, 1]),
            relays: Mutex::new(HashMap::new()),
            counts: Arc::new(Counts::default()),
            rng: Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(1))),
            candidates_rewritten: AtomicU64::new(0),
            candidates_withheld: AtomicU64::new(0),
        })
    }

    #[tokio::test]
    async fn the_seeders_udp_candidates_point_at_one_relay_each_and_the_rest_are_withheld() {
        let l = lossy();
        let c = "candidate:1 1 udp 2130706431 192.0.2.7 50000 typ host";
        let a = l.rewrite(c).await.expect("a UDP host candidate");
        let f: Vec<&str> = a.split(' ').collect();
        let relay: SocketAddr = format!("{}:{}", f[4], f[5]).parse().expect("an address");
        assert_eq!(relay.ip(), IpAddr::from([127, 0, 0, 1]));
        assert_ne!(relay.port(), 50000);
        assert_eq!(&f[..4], &c.split(' ').collect::<Vec<_>>()[..4]);
        // The same candidate again (in the SDP, say) gets the same relay.
        assert_eq!(
            l.rewrite(&format!("a={c}"))
                .await
                .map(|s| s.replace("a=", "")),
            Some(a)
        );
        assert_eq!(l.relays.lock().unwrap().len(), 1);
        // TCP, and a name rather than an address, cannot be stood in for.
        assert!(l
            .rewrite("candidate:2 1 tcp 1518280447 192.0.2.7 9 typ host tcptype active")
            .await
            .is_none());
        assert!(l
            .rewrite("candidate:3 1 udp 2130706431 x.local 50001 typ host")
            .await
            .is_none());
        assert_eq!(l.candidates_withheld.load(Ordering::Relaxed), 2);

        let msg = json!({"type": "signal", "v": 1, "from": SEEDER,
            "data": {"kind": "offer", "sdp": format!("v=0\r\na={c}\r\na=mid:0\r\n")}});
        let out: Value =
            serde_json::from_str(&l.server_msg(&msg.to_string()).await.expect("kept")).unwrap();
        let sdp = out["data"]["sdp"].as_str().unwrap();
        assert!(
            sdp.contains(&format!("{} {}", relay.ip(), relay.port())),
            "{sdp}"
        );
        assert!(!sdp.contains("192.0.2.7"), "{sdp}");
        // Another peer's signals pass as they are.
        let other = json!({"type": "signal", "v": 1, "from": 5,
            "data": {"kind": "candidate", "candidate": c}});
        assert_eq!(
            l.server_msg(&other.to_string()).await,
            Some(other.to_string())
        );
    }

    #[test]
    fn the_browsers_candidates_for_the_seeder_are_withheld_and_others_pass() {
        let l = lossy();
        let cand = |to: u64| {
            json!({"type": "signal", "v": 1, "to": to,
                "data": {"kind": "candidate", "candidate": "candidate:1 1 udp 1 abc.local 5 typ host"}})
            .to_string()
        };
        assert_eq!(l.browser_msg(&cand(SEEDER)), None);
        assert_eq!(l.browser_msg(&cand(3)), Some(cand(3)));
        let answer = json!({"type": "signal", "v": 1, "to": SEEDER,
            "data": {"kind": "answer", "sdp": "v=0\r\na=candidate:1 1 udp 1 abc.local 5 typ host\r\na=mid:0"}});
        let out: Value =
            serde_json::from_str(&l.browser_msg(&answer.to_string()).expect("kept")).unwrap();
        assert_eq!(out["data"]["sdp"], "v=0\r\na=mid:0");
        let bid = json!({"type": "bid", "v": 1}).to_string();
        assert_eq!(l.browser_msg(&bid), Some(bid));
    }

    #[tokio::test]
    async fn the_relay_forwards_both_ways_and_drops_about_its_share() {
        let l = lossy(); // 50 % each way
        let seeder = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = l.relay_for(seeder.local_addr().unwrap()).await.unwrap();
        let browser = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // Paced, so that no socket buffer overflows on the way.
        for i in 0..400u16 {
            browser.send_to(&i.to_be_bytes(), relay).await.unwrap();
            if i % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let mut got = 0;
        let mut buf = [0u8; 16];
        let mut back_to = None;
        while let Ok(Ok((_, from))) =
            tokio::time::timeout(Duration::from_millis(300), seeder.recv_from(&mut buf)).await
        {
            got += 1;
            back_to = Some(from);
        }
        assert!((120..280).contains(&got), "{got} of 400 through at 50 %");
        let c = &l.counts;
        assert_eq!(c.to_seeder.load(Ordering::Relaxed), 400);
        assert_eq!(c.to_seeder_dropped.load(Ordering::Relaxed), 400 - got);
        // The answers go back through the browser's own upstream socket.
        let up = back_to.expect("something came through");
        for i in 0..400u16 {
            seeder.send_to(&i.to_be_bytes(), up).await.unwrap();
            if i % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let mut back = 0;
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(300), browser.recv_from(&mut buf)).await
        {
            back += 1;
        }
        assert!((120..280).contains(&back), "{back} of 400 back at 50 %");
        assert_eq!(c.to_browser_dropped.load(Ordering::Relaxed), 400 - back);
    }
}
