//! Signaling load: many WebSocket peers join one stream, then relay ICE to their links.
//! Nothing here is a test and nothing asserts speed; `scripts/bench-server.sh` runs it
//! against a release server and writes `bench/results/server.{md,json}`.
//!
//! ```text
//! signal_load --url ws://127.0.0.1:18080/ws --stream demo --peers 10000 --server-pid PID
//! ```
//!
//! Phases, all against the one server process `--server-pid`:
//! 1. **idle**: `VmRSS` of the server before any connection.
//! 2. **join**: `--peers` connections, at most `--connect-concurrency` of them connecting
//!    or waiting for their welcome at once. Join latency is from sending `join` to
//!    receiving `welcome`. Joined peers keep heartbeating so none is dropped as silent.
//! 3. **connected**: after `--settle-secs`, `VmRSS` again; the difference over the idle
//!    figure, divided by the peers, is the memory per connection.
//! 4. **relay**: every peer sends `signal` messages (an ICE candidate) round-robin to its
//!    linked viewers at `--relay-rate` per second, below the server's per-connection
//!    limit ([`RATE_PER_SEC`]). After `--warmup-secs`, the `signal` messages the peers
//!    *receive* over `--relay-secs` are counted and divided by the server's CPU seconds
//!    (utime + stime of `/proc/PID/stat`) over the same window.
//!
//! Prints one JSON object on stdout (`--out` writes it to a file as well).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use clubcast_protocol::signal::{ClientMsg, LinkOp, PeerId, ServerMsg, SignalData};
use clubcast_server::signal::{RATE_BURST, RATE_PER_SEC};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// WebSocket URL of the server's `/ws`.
    #[arg(long)]
    url: String,
    /// Stream id or name to join.
    #[arg(long, default_value = "demo")]
    stream: String,
    /// Peers to connect.
    #[arg(long, default_value_t = 10_000)]
    peers: usize,
    /// Most peers connecting or waiting for their welcome at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Pid of the server process whose RSS and CPU are read.
    #[arg(long)]
    server_pid: u32,
    /// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Seconds between the last welcome and the connected RSS reading.
    #[arg(long, default_value_t = 3)]
    settle_secs: u64,
    /// Signal messages each peer sends per second in the relay phase.
    #[arg(long, default_value_t = 20)]
    relay_rate: u32,
    /// Seconds of relay before the measured window.
    #[arg(long, default_value_t = 3)]
    warmup_secs: u64,
    /// Seconds of the measured relay window.
    #[arg(long, default_value_t = 20)]
    relay_secs: u64,
    /// Longest the join phase may take, seconds.
    #[arg(long, default_value_t = 600)]
    join_timeout_secs: u64,
    /// Tokio worker threads of this client (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Also write the JSON result here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

const PHASE_JOIN: u8 = 0;
const PHASE_RELAY: u8 = 1;
const PHASE_QUIET: u8 = 2;
const PHASE_STOP: u8 = 3;

/// How often a peer wakes to send in the relay phase; it sends `rate / TICKS_PER_SEC`
/// messages per wake, a burst far below [`RATE_BURST`].
const TICKS_PER_SEC: u32 = 10;

/// An ICE candidate of realistic length (documentation address).
const CANDIDATE: &str =
    "candidate:842163049 1 udp 1677729535 192.0.2.3 54400 typ srflx raddr 10.0.0.1 rport 54400 generation 0 ufrag EsAw network-cost 999";

#[derive(Default)]
struct Counters {
    joined: AtomicU64,
    join_failed: AtomicU64,
    closed: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    links_msgs: AtomicU64,
    rate_limited: AtomicU64,
    unknown_peer: AtomicU64,
    other_errors: AtomicU64,
    pongs: AtomicU64,
}

struct Ctx {
    args: Args,
    phase: AtomicU8,
    counters: Counters,
    join_us: Mutex<Vec<u64>>,
    failures: Mutex<HashMap<String, u64>>,
    connect: Semaphore,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.relay_rate >= RATE_PER_SEC || args.relay_rate / TICKS_PER_SEC >= RATE_BURST {
        return Err(format!(
            "--relay-rate {} must stay below the server's per-connection limit of {RATE_PER_SEC}/s",
            args.relay_rate
        )
        .into());
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(w) = args.workers {
        rt.worker_threads(w);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(run(args))
}

#[derive(Clone, Copy)]
struct ProcSample {
    at: Instant,
    cpu_ticks: u64,
}

fn vm_rss_bytes(pid: u32) -> std::io::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| std::io::Error::other("no VmRSS line"))?;
    Ok(kb * 1024)
}

/// utime + stime of a process, clock ticks.
fn cpu_ticks(pid: &str) -> std::io::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; fields resume after the last ')'.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| std::io::Error::other("bad stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is f[0]; utime is field 14, stime field 15.
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok(num(11) + num(12))
}

fn sample(pid: u32) -> std::io::Result<ProcSample> {
    Ok(ProcSample {
        at: Instant::now(),
        cpu_ticks: cpu_ticks(&pid.to_string())?,
    })
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let pid = args.server_pid;
    let ctx = Arc::new(Ctx {
        connect: Semaphore::new(args.connect_concurrency.max(1)),
        phase: AtomicU8::new(PHASE_JOIN),
        counters: Counters::default(),
        join_us: Mutex::new(Vec::with_capacity(args.peers)),
        failures: Mutex::new(HashMap::new()),
        args,
    });
    let n = ctx.args.peers;
    let rss_idle = vm_rss_bytes(pid)?;
    let client_cpu0 = cpu_ticks("self")?;
    let join0 = sample(pid)?;
    eprintln!(
        "signal_load: server RSS idle {:.1} MiB; joining {n} peers",
        mib(rss_idle)
    );

    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move { peer(i, ctx).await }));
    }
    let deadline = Instant::now() + Duration::from_secs(ctx.args.join_timeout_secs);
    let mut last_report = Instant::now();
    loop {
        let c = &ctx.counters;
        let done = c.joined.load(Ordering::Relaxed) + c.join_failed.load(Ordering::Relaxed);
        if done >= n as u64 || Instant::now() > deadline {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "signal_load: {} joined, {} failed",
                c.joined.load(Ordering::Relaxed),
                c.join_failed.load(Ordering::Relaxed)
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let join1 = sample(pid)?;
    let join_wall = join1.at.duration_since(join0.at).as_secs_f64();
    let joined = ctx.counters.joined.load(Ordering::Relaxed);
    eprintln!("signal_load: {joined} joined in {join_wall:.1} s; settling");

    let counters_after_join = server_counters(&ctx.args.url).await;
    tokio::time::sleep(Duration::from_secs(ctx.args.settle_secs)).await;
    let rss_connected = vm_rss_bytes(pid)?;
    let connected_before_relay = joined - ctx.counters.closed.load(Ordering::Relaxed);

    eprintln!(
        "signal_load: server RSS {:.1} MiB with {connected_before_relay} connected; relaying at {}/s per peer",
        mib(rss_connected),
        ctx.args.relay_rate
    );
    ctx.phase.store(PHASE_RELAY, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(ctx.args.warmup_secs)).await;
    let c = &ctx.counters;
    let (recv0, sent0, cl0) = (
        c.received.load(Ordering::Relaxed),
        c.sent.load(Ordering::Relaxed),
        cpu_ticks("self")?,
    );
    let r0 = sample(pid)?;
    tokio::time::sleep(Duration::from_secs(ctx.args.relay_secs)).await;
    let r1 = sample(pid)?;
    let (recv1, sent1, cl1) = (
        c.received.load(Ordering::Relaxed),
        c.sent.load(Ordering::Relaxed),
        cpu_ticks("self")?,
    );
    ctx.phase.store(PHASE_QUIET, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_relay = vm_rss_bytes(pid)?;
    let connected_after_relay = joined - c.closed.load(Ordering::Relaxed);
    let counters_after_relay = server_counters(&ctx.args.url).await;
    ctx.phase.store(PHASE_STOP, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }

    let tck = ctx.args.clk_tck as f64;
    let window = r1.at.duration_since(r0.at).as_secs_f64();
    let server_cpu = (r1.cpu_ticks - r0.cpu_ticks) as f64 / tck;
    let client_cpu = (cl1 - cl0) as f64 / tck;
    let received = recv1 - recv0;
    let sent = sent1 - sent0;
    let mut lat = ctx.join_us.lock().map(|v| v.clone()).unwrap_or_default();
    lat.sort_unstable();
    let join_cpu = (join1.cpu_ticks - join0.cpu_ticks) as f64 / tck;
    let per_conn = if connected_before_relay > 0 {
        rss_connected.saturating_sub(rss_idle) as f64 / connected_before_relay as f64
    } else {
        f64::NAN
    };
    let failures = ctx.failures.lock().map(|m| m.clone()).unwrap_or_default();
    let out = json!({
        "peers": n,
        "connect_concurrency": ctx.args.connect_concurrency,
        "joined": joined,
        "join_failed": c.join_failed.load(Ordering::Relaxed),
        "join_failures": failures,
        "join_ms": {
            "p50": round(percentile(&lat, 0.50), 2),
            "p90": round(percentile(&lat, 0.90), 2),
            "p99": round(percentile(&lat, 0.99), 2),
            "max": round(percentile(&lat, 1.0), 2),
        },
        "join_wall_s": round(join_wall, 2),
        "join_server_cpu_s": round(join_cpu, 2),
        "joins_per_s": round(joined as f64 / join_wall, 0),
        "rss_idle_bytes": rss_idle,
        "rss_connected_bytes": rss_connected,
        "rss_after_relay_bytes": rss_after_relay,
        "connected_before_relay": connected_before_relay,
        "connected_after_relay": connected_after_relay,
        "rss_bytes_per_conn": round(per_conn, 0),
        "relay": {
            "rate_per_peer": ctx.args.relay_rate,
            "offered_per_s": ctx.args.relay_rate as u64 * connected_before_relay,
            "window_s": round(window, 2),
            "sent": sent,
            "received": received,
            "sent_per_s": round(sent as f64 / window, 0),
            "received_per_s": round(received as f64 / window, 0),
            "server_cpu_s": round(server_cpu, 2),
            "server_cores_busy": round(server_cpu / window, 2),
            "client_cpu_s": round(client_cpu, 2),
            "rate_limited": c.rate_limited.load(Ordering::Relaxed),
            "unknown_peer": c.unknown_peer.load(Ordering::Relaxed),
        },
        "relayed_msgs_per_s_per_core": round(received as f64 / server_cpu, 0),
        "server_counters_after_join": counters_after_join,
        "server_counters_after_relay": counters_after_relay,
        "link_msgs": c.links_msgs.load(Ordering::Relaxed),
        "other_errors": c.other_errors.load(Ordering::Relaxed),
        "client_cpu_s_total": round((cpu_ticks("self")? - client_cpu0) as f64 / tck, 2),
    });
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    if let Some(p) = &ctx.args.out {
        std::fs::write(p, text + "\n")?;
    }
    Ok(())
}

/// The server's drop and reject counters (`/metrics` beside `/ws`), by label.
async fn server_counters(ws_url: &str) -> serde_json::Value {
    let addr = ws_url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let body = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        std::io::Result::Ok(text)
    };
    let text = match tokio::time::timeout(Duration::from_secs(10), body).await {
        Ok(Ok(t)) => t,
        _ => return json!(null),
    };
    let mut out = serde_json::Map::new();
    for line in text.lines() {
        for (prefix, key) in [
            ("clubcast_dropped_peers_total{reason=\"", "dropped"),
            ("clubcast_rejects_total{code=\"", "rejects"),
        ] {
            let Some(rest) = line.strip_prefix(prefix) else {
                continue;
            };
            let Some((label, value)) = rest.split_once("\"} ") else {
                continue;
            };
            let entry = out.entry(key).or_insert_with(|| json!({}));
            entry[label] = json!(value.trim().parse::<u64>().unwrap_or(0));
        }
    }
    serde_json::Value::Object(out)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn fail(ctx: &Ctx, why: String) {
    ctx.counters.join_failed.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut m) = ctx.failures.lock() {
        *m.entry(why).or_default() += 1;
    }
}

async fn peer(i: usize, ctx: Arc<Ctx>) {
    let permit = match ctx.connect.acquire().await {
        Ok(p) => p,
        Err(_) => return,
    };
    let ws = match tokio_tungstenite::connect_async_with_config(ctx.args.url.as_str(), None, true)
        .await
    {
        Ok((ws, _)) => ws,
        Err(e) => return fail(&ctx, format!("connect: {e}")),
    };
    let (mut sink, mut source) = ws.split();
    let join = ClientMsg::Join {
        v: 1,
        stream: ctx.args.stream.clone(),
        upload_kbps: None,
        p2p: true,
        probe_limited: false,
        test_corrupt: false,
    };
    let join = serde_json::to_string(&join).expect("ClientMsg serializes");
    let t0 = Instant::now();
    if let Err(e) = sink.send(Message::Text(join.into())).await {
        return fail(&ctx, format!("send join: {e}"));
    }
    let first = tokio::time::timeout(Duration::from_secs(60), source.next()).await;
    let text = match first {
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(Some(Ok(m))) => return fail(&ctx, format!("first frame not text: {m:?}")),
        Ok(Some(Err(e))) => return fail(&ctx, format!("ws: {e}")),
        Ok(None) => return fail(&ctx, "closed before welcome".into()),
        Err(_) => return fail(&ctx, "no welcome within 60 s".into()),
    };
    let elapsed = t0.elapsed();
    drop(permit);
    let (heartbeat_ms, mut links) = match serde_json::from_str::<ServerMsg>(&text) {
        Ok(ServerMsg::Welcome {
            heartbeat_ms,
            links,
            ..
        }) => {
            let mut m: HashMap<PeerId, u32> = HashMap::new();
            for l in links.iter().filter(|l| l.peer != 0) {
                *m.entry(l.peer).or_default() += 1;
            }
            (heartbeat_ms, m)
        }
        Ok(ServerMsg::Error { code, .. }) => return fail(&ctx, format!("error {code:?}")),
        _ => return fail(&ctx, "first message not a welcome".into()),
    };
    if let Ok(mut v) = ctx.join_us.lock() {
        v.push(elapsed.as_micros() as u64);
    }
    ctx.counters.joined.fetch_add(1, Ordering::Relaxed);

    let c = &ctx.counters;
    let per_tick = ctx.args.relay_rate / TICKS_PER_SEC;
    let extra = ctx.args.relay_rate % TICKS_PER_SEC;
    let tick_len = Duration::from_millis(1000 / u64::from(TICKS_PER_SEC));
    // Spread the peers' ticks over the tick length so sends do not come in waves.
    let offset = tick_len.mul_f64((i % 97) as f64 / 97.0);
    let mut next = tokio::time::Instant::now() + offset;
    // Outside the relay phase a peer only heartbeats, so it wakes once a second.
    let idle_tick = Duration::from_secs(1);
    let heartbeat = Duration::from_millis(u64::from(heartbeat_ms.max(500)));
    let mut last_sent = Instant::now();
    let mut ticks: u64 = 0;
    let mut rr: usize = 0;
    let heartbeat_msg = r#"{"type":"heartbeat","v":1}"#;
    loop {
        tokio::select! {
            m = source.next() => {
                let Some(Ok(m)) = m else { break };
                let Message::Text(t) = m else { continue };
                // The server writes the tag first; counting relayed signals must be cheap.
                if t.starts_with(r#"{"type":"signal""#) {
                    c.received.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match serde_json::from_str::<ServerMsg>(&t) {
                    Ok(ServerMsg::Link { op, link, .. }) => {
                        c.links_msgs.fetch_add(1, Ordering::Relaxed);
                        if link.peer == 0 {
                            continue;
                        }
                        match op {
                            LinkOp::Add => *links.entry(link.peer).or_default() += 1,
                            LinkOp::Remove => {
                                if let Some(n) = links.get_mut(&link.peer) {
                                    *n = n.saturating_sub(1);
                                    if *n == 0 {
                                        links.remove(&link.peer);
                                    }
                                }
                            }
                        }
                    }
                    Ok(ServerMsg::Pong { .. }) => {
                        c.pongs.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(ServerMsg::Error { code, .. }) => {
                        let counter = match code.as_str() {
                            "rate_limited" => &c.rate_limited,
                            "unknown_peer" => &c.unknown_peer,
                            _ => &c.other_errors,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            _ = tokio::time::sleep_until(next) => {
                ticks += 1;
                let phase = ctx.phase.load(Ordering::Relaxed);
                let now = tokio::time::Instant::now();
                let step = if phase == PHASE_RELAY { tick_len } else { idle_tick };
                // Skip missed ticks rather than catch up in a burst.
                next = (next + step).max(now);
                if phase == PHASE_STOP {
                    let _ = sink.send(Message::Close(None)).await;
                    // Read until the server's close so the socket ends cleanly.
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Some(Ok(_)) = source.next().await {}
                    })
                    .await;
                    return;
                }
                let mut burst = 0;
                let relaying = phase == PHASE_RELAY && !links.is_empty();
                if relaying {
                    burst = per_tick + u32::from((ticks % u64::from(TICKS_PER_SEC)) < u64::from(extra));
                    let targets: Vec<PeerId> = links.keys().copied().collect();
                    for _ in 0..burst {
                        let to = targets[rr % targets.len()];
                        rr = rr.wrapping_add(1);
                        let msg = ClientMsg::Signal {
                            v: 1,
                            to,
                            data: SignalData::Candidate {
                                conn: None,
                                candidate: CANDIDATE.into(),
                                sdp_mid: Some("0".into()),
                                sdp_mline_index: Some(0),
                            },
                        };
                        let text = serde_json::to_string(&msg).expect("ClientMsg serializes");
                        if sink.feed(Message::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                } else if last_sent.elapsed() >= heartbeat / 2 {
                    burst = 1;
                    if sink.feed(Message::Text(heartbeat_msg.into())).await.is_err() {
                        break;
                    }
                }
                if burst > 0 {
                    if sink.flush().await.is_err() {
                        break;
                    }
                    if relaying {
                        c.sent.fetch_add(u64::from(burst), Ordering::Relaxed);
                    }
                    last_sent = Instant::now();
                }
            }
        }
    }
    c.closed.fetch_add(1, Ordering::Relaxed);
}
