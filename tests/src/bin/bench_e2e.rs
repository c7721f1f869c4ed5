//! End-to-end benchmark: one `clubcast-server` with the demo stream and N
//! headless Chromiums on `/watch/demo`, first with P2P on, then (in the same
//! run, with a fresh server and fresh browsers) with P2P off
//! (`/watch/demo?p2p=0`: every block from the origin), the baseline.
//!
//! ```text
//! cargo run -p clubcast-tests --bin bench_e2e -- [--browsers 12] [--secs 60]
//!     [--extra 6] [--stagger-ms 500] [--out bench/results] [--command "just bench-e2e"]
//! ```
//!
//! Per mode: every Chromium starts on a blank page first, then (after
//! [`LAUNCH_SETTLE`]) each opens the watch page, `--stagger-ms` apart;
//! the window of `--secs` starts when all show a first frame, and in it every
//! browser is sampled once a second (stats, `<video>`, RSS). Writes
//! `e2e.md` (definitions, goals, table; the hand-written notes of the old file,
//! from its first `## Notes` heading on, are kept) and `e2e.json` into `--out`.
//! `--extra N` adds rows for N browsers (both modes), labelled as such; 0 adds none.
//! Nothing is asserted: the figures are reported as measured.

#![recursion_limit = "256"]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clubcast_tests::{
    fixed, http_get, num, quantile, run_stamp, sh, with_notes, Browser, Server, ServerOptions,
    CHROMIUM_FLAGS,
};
use fantoccini::Client;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Wall time allowed for all browsers of a mode to show a first frame.
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// Wait between starting a mode's Chromiums and opening the watch pages.
const LAUNCH_SETTLE: Duration = Duration::from_secs(5);
/// Goals from issue 5, printed beside the figures.
const GOAL_P2P_RATIO: f64 = 0.80;
const GOAL_LATENCY_P95_MS: f64 = 3000.0;
const GOAL_STARTUP_MS: f64 = 1500.0;
/// Swarm size at which the issue sets the p2p_ratio goal.
const GOAL_P2P_BROWSERS: u64 = 12;

/// One sample of one browser: stats and `<video>` in one script.
const SAMPLE_JS: &str = "const v = document.querySelector('video');
    return {stats: window.player ? window.player.stats() : null,
            video: v ? {current_time: v.currentTime,
                        error: v.error ? {code: v.error.code, message: v.error.message} : null}
                     : null};";

struct Args {
    browsers: usize,
    secs: u64,
    extra: Option<usize>,
    stagger: Duration,
    out: PathBuf,
    command: String,
}

fn args() -> Args {
    let mut a = Args {
        browsers: 12,
        secs: 60,
        extra: None,
        stagger: Duration::from_millis(500),
        out: clubcast_tests::workspace_dir().join("bench/results"),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--browsers" => a.browsers = v().parse().expect("--browsers N"),
            "--secs" => a.secs = v().parse().expect("--secs S"),
            "--extra" => a.extra = Some(v().parse().expect("--extra N")).filter(|n| *n > 0),
            "--stagger-ms" => {
                a.stagger = Duration::from_millis(v().parse().expect("--stagger-ms MS"))
            }
            "--out" => a.out = PathBuf::from(v()),
            "--command" => a.command = v(),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Busy and total ticks of the whole machine, from the `cpu` line of /proc/stat.
fn machine_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    // idle and iowait are fields 4 and 5.
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Machine CPU busy over `d`, in % of one core.
async fn machine_busy_pct(d: Duration, clk: f64) -> f64 {
    let (b0, _) = machine_ticks();
    tokio::time::sleep(d).await;
    let (b1, _) = machine_ticks();
    b1.saturating_sub(b0) as f64 / clk / d.as_secs_f64() * 100.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Per-process figures from /proc.
mod procfs {
    use std::collections::BTreeMap;

    /// `(pgrp, utime + stime ticks)` of `pid`.
    pub fn stat(pid: u32) -> Option<(u32, u64)> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name, which may hold spaces.
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest[0] is field 3 (state): pgrp is field 5, utime 14, stime 15.
        let pgrp = f.get(2)?.parse().ok()?;
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some((pgrp, ticks))
    }

    /// VmRSS of `pid` in KiB.
    pub fn rss_kib(pid: u32) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Every pid with its `/proc/<pid>/comm`.
    pub fn all() -> Vec<(u32, String)> {
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .map(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                (pid, comm)
            })
            .collect()
    }

    /// The processes of group `pgrp` except its leader (chromedriver): pid → ticks.
    pub fn group_ticks(pgrp: u32, procs: &[(u32, String)]) -> BTreeMap<u32, u64> {
        procs
            .iter()
            .filter(|(pid, _)| *pid != pgrp)
            .filter_map(|(pid, _)| match stat(*pid) {
                Some((g, t)) if g == pgrp => Some((*pid, t)),
                _ => None,
            })
            .collect()
    }

    /// CPU ticks used between two snapshots of a group (processes that
    /// appeared count in full; ones that exited in between are lost).
    pub fn ticks_between(a: &BTreeMap<u32, u64>, b: &BTreeMap<u32, u64>) -> u64 {
        b.iter()
            .map(|(pid, t)| t.saturating_sub(a.get(pid).copied().unwrap_or(0)))
            .sum()
    }
}

/// What one browser reported during the window.
#[derive(Default)]
struct Trace {
    samples: Vec<Value>,
    rss_kib: Vec<u64>,
}

/// Samples one browser every second for `window`.
async fn trace(client: Client, pgrp: u32, window: Duration) -> Trace {
    let mut t = Trace::default();
    let end = Instant::now() + window;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() < end {
        tick.tick().await;
        if let Ok(v) = client.execute(SAMPLE_JS, Vec::new()).await {
            t.samples.push(v);
        }
        let procs = procfs::all();
        let rss: u64 = procfs::group_ticks(pgrp, &procs)
            .keys()
            .filter_map(|&pid| procfs::rss_kib(pid))
            .sum();
        t.rss_kib.push(rss);
    }
    t
}

/// `HEAD path`: the Content-Length of the answer (0 when absent or not 200).
async fn head_len(server: &Server, path: &str) -> u64 {
    let addr = server.addr();
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return 0;
    };
    let req = format!("HEAD {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let head = String::from_utf8_lossy(&buf);
    if head.split_whitespace().nth(1) != Some("200") {
        return 0;
    }
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

async fn live_edge(server: &Server) -> u64 {
    match http_get(server.addr(), "/streams/demo").await {
        Ok((200, body)) => serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["live_edge"].as_u64())
            .unwrap_or(0),
        _ => 0,
    }
}

/// Runs one mode; returns its row (figures and raw per-browser data).
async fn run_mode(n: usize, p2p: bool, a: &Args) -> Value {
    let label = format!("{n} browsers, P2P {}", if p2p { "on" } else { "off" });
    let clk = sh("getconf", &["CLK_TCK"]).parse::<f64>().unwrap_or(100.0);
    // Also lets the previous mode's processes go.
    let busy_before = machine_busy_pct(Duration::from_secs(10), clk).await;
    let load_before = loadavg();
    eprintln!(
        "bench-e2e: {label}: machine busy {busy_before:.0} % of a core over the 10 s before; \
         load {load_before}"
    );
    let server = Server::start_demo(ServerOptions::default())
        .await
        .expect("server starts and publishes the demo stream");
    let url = format!(
        "{}/watch/demo{}",
        server.url(),
        if p2p { "" } else { "?p2p=0" }
    );
    // Every Chromium starts first, on a blank page, and the machine settles:
    // a viewer's browser is running before they open the page, and
    // Chromium's own start-up (about a second of CPU each) is not the
    // player's.
    let mut browsers = Vec::new();
    for i in 0..n {
        browsers.push(
            Browser::launch()
                .await
                .unwrap_or_else(|e| panic!("browser {i} starts: {e}")),
        );
    }
    let busy_launched = machine_busy_pct(LAUNCH_SETTLE, clk).await;
    eprintln!(
        "bench-e2e: {label}: {n} browsers up; machine busy {busy_launched:.0} % of a core \
         over the {LAUNCH_SETTLE:?} after"
    );
    let launched = Instant::now();
    for (i, b) in browsers.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(a.stagger).await;
        }
        b.goto(&url)
            .await
            .unwrap_or_else(|e| panic!("browser {i} opens the watch page: {e}"));
    }
    let launch_secs = launched.elapsed().as_secs_f64();

    // First frames (not an error if some never come: reported as missing).
    let mut startup: Vec<Option<Value>> = vec![None; n];
    let deadline = Instant::now() + START_TIMEOUT;
    while startup.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, b) in browsers.iter().enumerate() {
            if startup[i].is_none() {
                let s = b.stats().await.unwrap_or(Value::Null);
                if s.get("startup_ms").and_then(Value::as_f64).is_some() {
                    startup[i] = Some(s);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let all_started_secs = launched.elapsed().as_secs_f64();
    eprintln!(
        "bench-e2e: {label}: {}/{n} started {all_started_secs:.1} s after the first page opened",
        startup.iter().flatten().count()
    );

    // The window.
    let window = Duration::from_secs(a.secs);
    let m0 = server.metrics().await.expect("metrics");
    let e0 = live_edge(&server).await;
    let procs = procfs::all();
    let cpu0: Vec<_> = browsers
        .iter()
        .map(|b| procfs::group_ticks(b.process_group(), &procs))
        .collect();
    let server_cpu0 = procfs::stat(server.pid()).map_or(0, |(_, t)| t);
    let self_cpu0 = procfs::stat(std::process::id()).map_or(0, |(_, t)| t);
    let (machine0, _) = machine_ticks();
    let t0 = Instant::now();
    let tasks: Vec<_> = browsers
        .iter()
        .map(|b| tokio::spawn(trace(b.client().clone(), b.process_group(), window)))
        .collect();
    // Concurrent compilers, sampled while the browsers play.
    let mut rustc_max = 0;
    while t0.elapsed() < window {
        let procs = procfs::all();
        let rustc = procs
            .iter()
            .filter(|(_, c)| c == "rustc" || c == "cc" || c == "ld" || c.starts_with("cc1"))
            .count();
        rustc_max = rustc_max.max(rustc);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let mut traces = Vec::new();
    for t in tasks {
        traces.push(t.await.expect("trace task"));
    }
    let secs = t0.elapsed().as_secs_f64();
    let m1 = server.metrics().await.expect("metrics");
    let e1 = live_edge(&server).await;
    let procs = procfs::all();
    let cpu1: Vec<_> = browsers
        .iter()
        .map(|b| procfs::group_ticks(b.process_group(), &procs))
        .collect();
    let server_cpu1 = procfs::stat(server.pid()).map_or(0, |(_, t)| t);
    let self_cpu1 = procfs::stat(std::process::id()).map_or(0, |(_, t)| t);
    let (machine1, _) = machine_ticks();
    let load_after = loadavg();
    let mut stream_bytes = 0;
    for seq in e0..e1 {
        stream_bytes += head_len(&server, &format!("/streams/demo/blocks/{seq}")).await;
    }

    let delta = |k: &str| m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0);
    let seeded = delta("clubcast_bytes_seeded_total");
    let gap_fill = delta("clubcast_gap_fill_bytes_total");

    let mut per_browser = Vec::new();
    let (mut sum_peers, mut sum_origin, mut sum_up) = (0.0, 0.0, 0.0);
    let (mut stalls, mut stall_ms, mut errors) = (0.0, 0.0, 0usize);
    let (mut stalls_total, mut stall_ms_total) = (0.0, 0.0);
    let mut latencies = Vec::new();
    let mut advances = Vec::new();
    for (i, t) in traces.iter().enumerate() {
        let stats: Vec<&Value> = t.samples.iter().map(|s| &s["stats"]).collect();
        let (Some(first), Some(last)) = (stats.first(), stats.last()) else {
            per_browser.push(json!({"browser": i, "samples": 0}));
            continue;
        };
        let d = |k: &str| num(last, k) - num(first, k);
        sum_peers += d("bytes_from_peers");
        sum_origin += d("bytes_from_origin");
        sum_up += d("bytes_uploaded");
        stalls += d("stalls");
        stall_ms += d("stall_ms");
        stalls_total += num(last, "stalls");
        stall_ms_total += num(last, "stall_ms");
        latencies.extend(
            stats
                .iter()
                .filter_map(|s| s.get("latency_ms").and_then(Value::as_f64)),
        );
        errors += t
            .samples
            .iter()
            .filter(|s| !s["video"]["error"].is_null() || s["video"].is_null())
            .count();
        let ct = |s: &Value| s["video"]["current_time"].as_f64().unwrap_or(0.0);
        let advance =
            ct(t.samples.last().expect("non-empty")) - ct(t.samples.first().expect("non-empty"));
        advances.push(advance);
        let cpu = procfs::ticks_between(&cpu0[i], &cpu1[i]) as f64 / clk / secs * 100.0;
        let rss_peak = t.rss_kib.iter().copied().max().unwrap_or(0) as f64 / 1024.0;
        per_browser.push(json!({
            "browser": i,
            "startup_ms": startup[i].as_ref().map(|s| num(s, "startup_ms")),
            "page_startup_ms": startup[i].as_ref().map(|s| num(s, "page_startup_ms")),
            "startup_trace": startup[i].as_ref().map(|s| s["startup_trace"].clone()),
            "samples": t.samples.len(),
            "advance_s": advance,
            "bytes_from_peers": d("bytes_from_peers"),
            "bytes_from_origin": d("bytes_from_origin"),
            "bytes_uploaded": d("bytes_uploaded"),
            "stalls": d("stalls"),
            "stall_ms": d("stall_ms"),
            "stalls_since_load": num(last, "stalls"),
            "peers": num(last, "peers"),
            "slow_sources": num(last, "slow_sources"),
            "rejoins": num(last, "rejoins"),
            "gap_fills": num(last, "gap_fills"),
            "latency_ms_p50": quantile(&stats.iter().filter_map(|s| s.get("latency_ms").and_then(Value::as_f64)).collect::<Vec<_>>(), 0.5),
            "cpu_pct": cpu,
            "rss_mib_peak": rss_peak,
            "processes": cpu1[i].len(),
        }));
    }
    let startups: Vec<f64> = startup
        .iter()
        .flatten()
        .map(|s| num(s, "startup_ms"))
        .collect();
    let page_startups: Vec<f64> = startup
        .iter()
        .flatten()
        .map(|s| num(s, "page_startup_ms"))
        .collect();
    let col = |k: &str| -> Vec<f64> {
        per_browser
            .iter()
            .filter_map(|b| b.get(k).and_then(Value::as_f64))
            .collect()
    };
    let mean = |xs: &[f64]| {
        if xs.is_empty() {
            None
        } else {
            Some(xs.iter().sum::<f64>() / xs.len() as f64)
        }
    };
    let max = |xs: &[f64]| {
        xs.iter()
            .copied()
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { Some(a / b) } else { None };
    let cpu = col("cpu_pct");
    let pct = |ticks: u64| ticks as f64 / clk / secs * 100.0;
    let ours = cpu.iter().sum::<f64>()
        + pct(server_cpu1.saturating_sub(server_cpu0))
        + pct(self_cpu1.saturating_sub(self_cpu0));
    let machine = pct(machine1.saturating_sub(machine0));
    let samples = col("samples");
    let rss = col("rss_mib_peak");
    let slowest = per_browser
        .iter()
        .filter(|b| b["startup_ms"].is_number())
        .max_by(|a, b| num(a, "startup_ms").total_cmp(&num(b, "startup_ms")));
    // Every browser's probe planned at the cap: read at or above it, ran dry at
    // the player, too little to time, or the bitrate not known yet.
    let probes_at_cap: f64 = ["at_cap", "limited", "nothing", "unused"]
        .iter()
        .map(|r| {
            let key = format!("clubcast_upload_probes_total{{result=\"{r}\"}}");
            m1.get(&key).copied().unwrap_or(0.0)
        })
        .sum();
    let row = json!({
        "slowest_start": slowest.map(|b| json!({
            "browser": b["browser"],
            "startup_ms": b["startup_ms"],
            "trace": b["startup_trace"],
        })),
        "mode": label,
        "browsers": n,
        "p2p": p2p,
        "started": startups.len(),
        "window_s": secs,
        "launch_s": launch_secs,
        "all_started_s": all_started_secs,
        "p2p_ratio": ratio(sum_peers, sum_peers + sum_origin),
        "p2p_ratio_without_seeder": ratio((sum_peers - seeded).max(0.0), sum_peers + sum_origin),
        "origin_egress_ratio": ratio(seeded + gap_fill, stream_bytes as f64),
        "origin_seeded_bytes": seeded,
        "origin_gap_fill_bytes": gap_fill,
        "shares_shed": delta("clubcast_shares_shed_total"),
        "sources_replaced": delta("clubcast_sources_replaced_total"),
        // Since the mode's fresh server started: most are learnt at startup.
        "capacities_learned": m1.get("clubcast_capacities_learned_total").copied().unwrap_or(0.0),
        // Every browser's probe, by how the server used it (all at the cap on loopback).
        "probes_planned": m1.get("clubcast_upload_probes_total{result=\"planned\"}").copied().unwrap_or(0.0),
        "probes_at_cap": probes_at_cap,
        "stream_bytes": stream_bytes,
        "stream_blocks": e1.saturating_sub(e0),
        "stream_kbps": stream_bytes as f64 * 8.0 / secs / 1000.0,
        "bytes_from_peers": sum_peers,
        "bytes_from_origin": sum_origin,
        "bytes_uploaded": sum_up,
        "startup_ms_p50": quantile(&startups, 0.5),
        "startup_ms_max": max(&startups),
        "page_startup_ms_p50": quantile(&page_startups, 0.5),
        "page_startup_ms_max": max(&page_startups),
        "latency_ms_p50": quantile(&latencies, 0.5),
        "latency_ms_p95": quantile(&latencies, 0.95),
        "latency_samples": latencies.len(),
        "stalls": stalls,
        "stall_ms": stall_ms,
        "stalls_since_load": stalls_total,
        "stall_ms_since_load": stall_ms_total,
        "media_errors": errors,
        "advance_s_min": advances.iter().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x)))),
        "cpu_pct_mean": mean(&cpu),
        "cpu_pct_max": max(&cpu),
        "cpu_pct_sum": cpu.iter().sum::<f64>(),
        "rss_mib_mean": mean(&rss),
        "rss_mib_max": max(&rss),
        "server_cpu_pct": pct(server_cpu1.saturating_sub(server_cpu0)),
        "machine_busy_pct_before": busy_before,
        "machine_busy_pct_window": machine,
        "others_cpu_pct_window": (machine - ours).max(0.0),
        "samples_per_browser_min": samples.iter().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x)))),
        "samples_per_browser_mean": mean(&samples),
        "load_before": load_before,
        "load_after": load_after,
        "compiler_processes_max": rustc_max,
        "per_browser": per_browser,
    });
    eprintln!("bench-e2e: {label}: {}", summary(&row));
    for b in browsers {
        b.close().await;
    }
    drop(server);
    row
}

fn summary(r: &Value) -> String {
    format!(
        "p2p_ratio {} origin_egress_ratio {} startup p50/max {}/{} ms latency p50/p95 {}/{} ms \
         stalls {} ({} ms) cpu mean {} % rss mean {} MiB",
        fixed(r, "p2p_ratio", 3),
        fixed(r, "origin_egress_ratio", 2),
        fixed(r, "startup_ms_p50", 0),
        fixed(r, "startup_ms_max", 0),
        fixed(r, "latency_ms_p50", 0),
        fixed(r, "latency_ms_p95", 0),
        fixed(r, "stalls", 0),
        fixed(r, "stall_ms", 0),
        fixed(r, "cpu_pct_mean", 0),
        fixed(r, "rss_mib_mean", 0),
    )
}

fn markdown(meta: &Value, rows: &[Value]) -> String {
    let mut s = String::new();
    s.push_str("# End-to-end: headless Chromium peers on the demo stream\n\n");
    s.push_str(&format!(
        "- date: {}\n- commit: {}\n- machine: nproc {}, {}\n- command: `{}`\n- server: `{}`\n\
         - browsers: {}, with `{}` (the window is small so that software compositing, which a \
         viewer's GPU does, does not crowd out the players), one chromedriver and one \
         profile each; all started on a \
         blank page first, then after 5 s each opened the watch page, {} ms apart (staggered \
         so that 12 page loads do not all land on 2 cores at once); each mode \
         has a fresh server and fresh browsers\n- window: {} s per mode, starting when every \
         browser of the mode shows a first frame\n\n",
        meta["date"].as_str().unwrap_or(""),
        meta["commit"].as_str().unwrap_or(""),
        meta["nproc"].as_str().unwrap_or(""),
        meta["cpu"].as_str().unwrap_or(""),
        meta["command"].as_str().unwrap_or(""),
        meta["server"].as_str().unwrap_or(""),
        meta["chromium"].as_str().unwrap_or(""),
        meta["chromium_flags"].as_str().unwrap_or(""),
        meta["stagger_ms"],
        meta["secs"],
    ));
    s.push_str("| mode | p2p_ratio (goal ≥ 0.80) | p2p_ratio without the seeder (limit 0.83 at 12) | origin_egress_ratio | startup_ms p50 / max (goal ≤ 1500) | latency_ms p50 / p95 (goal p95 ≤ 3000) | stalls in window: count / ms (goal 0) | CPU % of a core per browser: mean / max | RSS MiB per browser: mean / max | server CPU % | others' CPU % (window) |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {}{} | {} | {} | {} | {} / {} | {} / {} | {} / {} | {} / {} | {} / {} | {} | {} |\n",
            r["mode"].as_str().unwrap_or(""),
            if r["started"] == r["browsers"] {
                String::new()
            } else {
                format!(" ({} of {} started)", r["started"], r["browsers"])
            },
            fixed(r, "p2p_ratio", 3),
            fixed(r, "p2p_ratio_without_seeder", 3),
            fixed(r, "origin_egress_ratio", 2),
            fixed(r, "startup_ms_p50", 0),
            fixed(r, "startup_ms_max", 0),
            fixed(r, "latency_ms_p50", 0),
            fixed(r, "latency_ms_p95", 0),
            fixed(r, "stalls", 0),
            fixed(r, "stall_ms", 0),
            fixed(r, "cpu_pct_mean", 0),
            fixed(r, "cpu_pct_max", 0),
            fixed(r, "rss_mib_mean", 0),
            fixed(r, "rss_mib_max", 0),
            fixed(r, "server_cpu_pct", 1),
            fixed(r, "others_cpu_pct_window", 0),
        ));
    }
    s.push_str("\nGoals met (P2P-on rows):\n\n");
    let ok = |b: bool| if b { "yes" } else { "**no**" };
    // The share relayed browser to browser is judged against the goal only
    // where the issue sets it, at 12 browsers: in a small swarm the seeder's
    // two copies of each block are a large share of it (2 of 6 at 6).
    let without_seeder = |r: &Value| {
        let x = r.get("p2p_ratio_without_seeder").and_then(Value::as_f64);
        let at = r.get("browsers").and_then(Value::as_u64).unwrap_or(0);
        match x {
            Some(x) if at >= GOAL_P2P_BROWSERS => format!("{x:.3}, {}", ok(x >= GOAL_P2P_RATIO)),
            Some(x) => format!("{x:.3}, the goal is set at {GOAL_P2P_BROWSERS} browsers"),
            None => ok(false).to_owned(),
        }
    };
    for r in rows.iter().filter(|r| r["p2p"] == true) {
        let g = |k: &str| r.get(k).and_then(Value::as_f64);
        s.push_str(&format!(
            "- {}: p2p_ratio ≥ {GOAL_P2P_RATIO}: {} (without the seeder: {}); latency p95 ≤ {GOAL_LATENCY_P95_MS} ms: {}; \
             startup ≤ {GOAL_STARTUP_MS} ms (max): {}; zero stalls: {}\n",
            r["mode"].as_str().unwrap_or(""),
            ok(g("p2p_ratio").is_some_and(|x| x >= GOAL_P2P_RATIO)),
            without_seeder(r),
            ok(g("latency_ms_p95").is_some_and(|x| x <= GOAL_LATENCY_P95_MS)),
            ok(g("startup_ms_max").is_some_and(|x| x <= GOAL_STARTUP_MS)),
            ok(g("stalls") == Some(0.0)),
        ));
    }
    s.push_str("\nMore per mode (window unless said otherwise):\n\n");
    s.push_str("| mode | stream kbit/s | blocks | seeder bytes | gap-fill bytes | page_startup_ms p50 / max | stalls since page load: count / ms | media errors | least media played, s | latency samples | samples per browser: min / mean | all started after the first page opened, s | machine busy % of a core: 10 s before / window | load avg before → after | compiler processes seen (max) | last-hop shares shed / sources replaced | capacities learnt since the server started | upload probes planned on / at the cap |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} / {} | {} / {} | {} | {} | {} | {} / {} | {} | {} / {} | {} → {} | {} | {} / {} | {} | {} / {} |\n",
            r["mode"].as_str().unwrap_or(""),
            fixed(r, "stream_kbps", 0),
            r["stream_blocks"],
            fixed(r, "origin_seeded_bytes", 0),
            fixed(r, "origin_gap_fill_bytes", 0),
            fixed(r, "page_startup_ms_p50", 0),
            fixed(r, "page_startup_ms_max", 0),
            fixed(r, "stalls_since_load", 0),
            fixed(r, "stall_ms_since_load", 0),
            r["media_errors"],
            fixed(r, "advance_s_min", 1),
            r["latency_samples"],
            fixed(r, "samples_per_browser_min", 0),
            fixed(r, "samples_per_browser_mean", 0),
            fixed(r, "all_started_s", 1),
            fixed(r, "machine_busy_pct_before", 0),
            fixed(r, "machine_busy_pct_window", 0),
            r["load_before"].as_str().unwrap_or(""),
            r["load_after"].as_str().unwrap_or(""),
            r["compiler_processes_max"],
            fixed(r, "shares_shed", 0),
            fixed(r, "sources_replaced", 0),
            fixed(r, "capacities_learned", 0),
            fixed(r, "probes_planned", 0),
            fixed(r, "probes_at_cap", 0),
        ));
    }
    s.push_str(
        "\nWhere the slowest start of each mode went (`startup_trace`: ms after the player's creation):\n\n",
    );
    s.push_str("| mode | browser (launch order) | startup_ms |");
    for k in TRACE_MARKS {
        s.push_str(&format!(" {k} |"));
    }
    s.push_str("\n|---|---|---|");
    s.push_str(&"---|".repeat(TRACE_MARKS.len()));
    s.push('\n');
    for r in rows {
        let w = &r["slowest_start"];
        s.push_str(&format!(
            "| {} | {} | {} |",
            r["mode"].as_str().unwrap_or(""),
            w["browser"],
            fixed(w, "startup_ms", 0)
        ));
        for k in TRACE_MARKS {
            s.push_str(&format!(" {} |", fixed(&w["trace"], k, 0)));
        }
        s.push('\n');
    }
    s.push_str(DEFINITIONS);
    s
}

/// The milestones of `stats().startup_trace`, in the order a start reaches them.
const TRACE_MARKS: [&str; 9] = [
    "socket_open",
    "welcome",
    "init",
    "origin_block",
    "link_open",
    "first_block",
    "buffered",
    "play",
    "first_frame",
];

const DEFINITIONS: &str = "
## Definitions

All byte counts are deltas over the window, from the players' `stats()` (read once a second
from every browser) and the server's `/metrics`.

- `p2p_ratio`: Σ `bytes_from_peers` ÷ Σ (`bytes_from_peers` + `bytes_from_origin`), summed
  over the browsers. The players count the server's WebRTC seeder as a peer, so this is the
  share that did not come over HTTP.
- `p2p_ratio` without the seeder: (Σ `bytes_from_peers` − the seeder's bytes,
  Δ`clubcast_bytes_seeded_total`) ÷ the same denominator: the share the browsers relayed
  to each other. The seeder's count is of frames (block header and signature included,
  about 1 % over the payload), so this slightly under-states the share. With 2 seeds per
  block the limit for 12 browsers is 10/12 = 0.83.
- `origin_egress_ratio`: bytes the server sent, Δ`clubcast_bytes_seeded_total` (seeder
  frames over data channels) + Δ`clubcast_gap_fill_bytes_total` (blocks served over HTTP),
  ÷ the bytes of the stream itself over the window: the encoded sizes of the blocks produced
  in it (live edge at the start to live edge at the end, each size read with `HEAD
  /streams/demo/blocks/{seq}`, which is not metered). The ideal with P2P is about k = 2
  (seeds per block); without P2P it is the number of browsers. Init segments are not
  counted.
- Last-hop shares shed and sources replaced: Δ`clubcast_shares_shed_total` (a relay whose
  bids stayed over its planned upload gave a subscriber share to a member with room)
  and Δ`clubcast_sources_replaced_total` (an overloaded source replaced on a slow-source
  report), over the window. Capacities learnt: `clubcast_capacities_learned_total` since
  the mode's server started (a browser states no upload, so a bid reporting 20 or more
  late pushes plans it on the upload that bid measured). Upload probes: each browser's
  probe before its join, by `clubcast_upload_probes_total{result}` since the mode's
  server started: planned on the measured upload, or at the cap (read at or above it,
  ran dry at the player, too little to time, or the stream's bitrate not known yet);
  over loopback every probe runs dry at once.
- `startup_ms`: the player's own figure, from the player's creation to the first frame;
  `page_startup_ms` is from the page's navigation start. p50 is the nearest-rank median
  (the lower of the middle two), as for every p50 here. `startup_trace` is the player's
  record of when its start first reached each milestone: the signaling socket open, the
  welcome, the init segment, the first block from the origin, the first open peer link, the
  first block handed to playback, media buffered in the element, `play()` at the start
  position, and the first frame (a dash: not reached before the player's first frame was
  read, e.g. no link open yet).
- `latency_ms`: the player's `latency_ms`, glass to glass: wall clock minus the capture time
  of the frame shown, where a frame's capture is its fragment's ingest (the server gets a
  fragment whole, at its end) less the media time left in the fragment. The player steers
  `edge_latency_ms` (how far it plays behind the live edge, one fragment less) to the
  1.5-s target. Sampled once a second from every browser in the window; p50 and p95 over all
  those samples (nearest rank). A sample is one WebDriver call; when the machine is
  saturated a call takes longer than a second and a browser gets fewer samples (see
  \"samples per browser\").
- stalls: Δ`stalls` and Δ`stall_ms` of the players over the window, summed over the
  browsers; \"since page load\" adds what happened before the window (start-up included).
- CPU: Δ(utime + stime) of every process in the browser's process group (the Chromium
  processes chromedriver started; chromedriver itself excluded) over the window, in % of
  one core. RSS: Σ `VmRSS` of the same processes, its peak over the once-a-second samples;
  pages shared between Chromium processes are counted once per process, so this
  over-estimates the memory a browser really takes.
- server CPU: Δ(utime + stime) of the `clubcast-server` process over the window.
- machine busy: Δ of the non-idle ticks of `/proc/stat`'s `cpu` line, in % of one core (200 %
  is the whole 2-core machine), over the 10 s before the mode's server starts and over the
  window. others' CPU: the window's machine busy minus the browsers, the server and this
  driver: what other processes (other engineers' builds) took. load avg: `/proc/loadavg`
  (1, 5, 15 min; it lags, so \"before\" still holds the previous mode); compiler processes: the most `rustc`/`cc`/`ld` processes seen at once during the
  window (other engineers build on this machine).
";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let mut modes = vec![(a.browsers, true), (a.browsers, false)];
    if let Some(x) = a.extra {
        modes.push((x, true));
        modes.push((x, false));
    }
    let (date, commit, cpu) = run_stamp();
    let server = clubcast_tests::server_binary(false)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let meta = json!({
        "date": date,
        "commit": commit,
        "nproc": sh("nproc", &[]),
        "cpu": cpu,
        "command": a.command,
        "argv": std::env::args().collect::<Vec<_>>().join(" "),
        "server": if std::env::var_os("CLUBCAST_SERVER_BIN").is_some() {
            format!("{server} (from CLUBCAST_SERVER_BIN)")
        } else {
            format!("{server} (dev profile: dependencies at opt-level 2, our crates at 0)")
        },
        "chromium": sh(&std::env::var("CHROMIUM").unwrap_or("/usr/bin/chromium".into()), &["--version"]),
        "chromium_flags": CHROMIUM_FLAGS.join(" "),
        "stagger_ms": a.stagger.as_millis() as u64,
        "secs": a.secs,
        "uptime": sh("uptime", &[]),
    });
    let mut rows = Vec::new();
    for (n, p2p) in modes {
        rows.push(run_mode(n, p2p, &a).await);
    }
    write(&a.out, &meta, &rows);
}

fn write(out: &Path, meta: &Value, rows: &[Value]) {
    std::fs::create_dir_all(out).expect("results dir");
    let json = json!({"meta": meta, "modes": rows});
    std::fs::write(
        out.join("e2e.json"),
        serde_json::to_string_pretty(&json).expect("json") + "\n",
    )
    .expect("write e2e.json");
    let path = out.join("e2e.md");
    let old = std::fs::read_to_string(&path).ok();
    let md = with_notes(markdown(meta, rows), old.as_deref());
    std::fs::write(&path, md).expect("write e2e.md");
    eprintln!("bench-e2e: wrote {}/e2e.md and e2e.json", out.display());
}
