//! On-demand swarm benchmark: N headless Chromiums watch one uploaded asset,
//! each starting `--stagger-s` after the one before, first with P2P on, then
//! (in the same run, with a fresh server and fresh browsers) with `p2p=0`,
//! the baseline where every block comes from the origin.
//!
//! With `--capped-kbps K`, the same two rows run again on an origin whose
//! on-demand budget is K kbit/s (`--vod-budget-kbps`): with P2P on the
//! viewers bid for it and get grants (the default anonymous share, 25 %,
//! serves runs sent before a viewer's welcome); with P2P off the viewers
//! have no grant token, so the whole budget is the anonymous share
//! (`--anonymous-budget-percent 100`): the same cap, first come, first
//! served. The uncapped rows run with `--vod-budget-kbps 0` (unmetered).
//!
//! ```text
//! cargo run -p clubcast-tests --bin bench_vod_swarm -- [--browsers 6] [--secs 45]
//!     [--stagger-s 5] [--asset-secs 90] [--kbps 2000] [--capped-kbps K]
//!     [--out bench/results] [--command "just bench-vod-swarm"]
//! ```
//!
//! The asset is made with ffmpeg (`--asset-secs` of 1280x720 H.264 at
//! `--kbps`, 2-s fragments) and uploaded with `PUT /vod/bench`. Each browser
//! plays from the start for `--secs` after its page opens; then its stats
//! are read. The origin's egress is the server's `clubcast_vod_bytes_total`
//! (block bytes served). Writes `vod-swarm.md` (the hand-written notes of the
//! old file, from its first `## Notes` heading on, are kept) and
//! `vod-swarm.json` into `--out`. Nothing is asserted: the figures are
//! reported as measured.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clubcast_tests::{
    fixed, http_request, median, num, quantile, run_stamp, with_notes, workspace_dir, Browser,
    Server, ServerOptions,
};
use serde_json::{json, Value};

const TOKEN: &str = "bench";
const ASSET: &str = "bench";

/// The page's stats, the `source` events and the element's state.
const SAMPLE_JS: &str = "const v = document.getElementById('video');
    return {stats: window.player ? window.player.stats() : null,
            sources: window.benchSources || [], t: v.currentTime,
            error: v.error ? v.error.message : null};";
/// Records the `source` events with the page's clock.
const RECORD_JS: &str = "window.benchSources = [];
    window.player.on('source', (e) => window.benchSources.push(
        Object.assign({at_ms: performance.now()}, e)));";

struct Args {
    browsers: usize,
    secs: u64,
    stagger: Duration,
    asset_secs: u32,
    kbps: u32,
    capped_kbps: Option<u32>,
    out: PathBuf,
    command: String,
}

fn args() -> Args {
    let mut a = Args {
        browsers: 6,
        secs: 45,
        stagger: Duration::from_secs(5),
        asset_secs: 90,
        kbps: 2000,
        capped_kbps: None,
        out: workspace_dir().join("bench/results"),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--browsers" => a.browsers = v().parse().expect("--browsers N"),
            "--secs" => a.secs = v().parse().expect("--secs S"),
            "--stagger-s" => a.stagger = Duration::from_secs(v().parse().expect("--stagger-s S")),
            "--asset-secs" => a.asset_secs = v().parse().expect("--asset-secs S"),
            "--kbps" => a.kbps = v().parse().expect("--kbps K"),
            "--capped-kbps" => a.capped_kbps = Some(v().parse().expect("--capped-kbps K")),
            "--out" => a.out = PathBuf::from(v()),
            "--command" => a.command = v(),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// The asset file: `secs` of 720p H.264 (and AAC) at `kbps`, 2-s fragments.
fn encode(a: &Args) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("clubcast-bench-vod-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("asset.mp4");
    let k = a.kbps;
    let status = std::process::Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-f", "lavfi", "-i"])
        .arg("testsrc2=size=1280x720:rate=30")
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args(["-t", &a.asset_secs.to_string()])
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-g", "60"])
        .args(["-b:v", &format!("{k}k"), "-maxrate", &format!("{k}k")])
        .args(["-bufsize", &format!("{}k", k / 2), "-c:a", "aac"])
        .args(["-movflags", "frag_keyframe+empty_moov+default_base_moof"])
        .arg(&file)
        .status()
        .expect("ffmpeg runs");
    assert!(status.success(), "ffmpeg failed");
    let bytes = std::fs::read(&file).expect("read the asset");
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

/// One mode: a fresh server with the asset (its on-demand budget `cap`
/// kbit/s, or unmetered), N browsers; its row.
async fn run_mode(a: &Args, file: &[u8], p2p: bool, cap: Option<u32>) -> Value {
    let label = match (p2p, cap) {
        (true, None) => "P2P on".to_owned(),
        (false, None) => "P2P off (baseline)".to_owned(),
        (true, Some(k)) => format!("P2P on, origin capped at {k} kbit/s, bids"),
        (false, Some(k)) => format!("P2P off, origin capped at {k} kbit/s"),
    };
    let mut args = vec![
        "--publish-token".into(),
        TOKEN.into(),
        "--vod-budget-kbps".into(),
    ];
    args.push(cap.unwrap_or(0).to_string());
    if cap.is_some() && !p2p {
        // No grant tokens without the swarm side: all of it for anonymous runs.
        args.extend(["--anonymous-budget-percent".into(), "100".into()]);
    }
    let opts = ServerOptions {
        args,
        ..ServerOptions::default()
    };
    let server = Server::start(opts).await.expect("server starts");
    let path = format!("/vod/{ASSET}?token={TOKEN}");
    let (status, body) = http_request(server.addr(), "PUT", &path, file)
        .await
        .expect("upload");
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let summary: Value = serde_json::from_slice(&body).expect("summary");
    let asset_bytes = num(&summary, "bytes");
    let mut browsers = Vec::new();
    for i in 0..a.browsers {
        browsers.push(
            Browser::launch()
                .await
                .unwrap_or_else(|e| panic!("browser {i} starts: {e}")),
        );
    }
    let url = format!(
        "{}/watch.html?vod={ASSET}{}",
        server.url(),
        if p2p { "" } else { "&p2p=0" }
    );
    let served0 = served(&server).await;
    let t0 = Instant::now();
    let mut opened = Vec::new();
    for (i, b) in browsers.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(a.stagger).await;
        }
        b.goto(&url).await.expect("open the watch page");
        opened.push(Instant::now());
        // `window.player` is set by the page's module script.
        for _ in 0..100 {
            if b.eval("return Boolean(window.player);").await.ok() == Some(json!(true)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b.eval(RECORD_JS).await.expect("record events");
        eprintln!("bench-vod-swarm: {label}: browser {i} opened");
    }
    // Each browser plays `secs` from its own start.
    let mut rows = Vec::new();
    for (i, b) in browsers.iter().enumerate() {
        let until = opened[i] + Duration::from_secs(a.secs);
        tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
        let s = b.eval(SAMPLE_JS).await.unwrap_or(Value::Null);
        rows.push(s);
    }
    let wall = t0.elapsed().as_secs_f64();
    let served = served(&server).await - served0;
    for b in browsers {
        b.close().await;
    }
    let stats: Vec<&Value> = rows.iter().map(|r| &r["stats"]).collect();
    let sum = |k: &str| stats.iter().map(|s| num(s, k)).sum::<f64>();
    let from_peers = sum("bytes_from_peers");
    let from_origin = sum("bytes_from_origin");
    let startups: Vec<f64> = stats
        .iter()
        .filter_map(|s| s["startup_ms"].as_f64())
        .collect();
    let stall_ms: Vec<f64> = stats.iter().map(|s| num(s, "stall_ms")).collect();
    let switch_s: Vec<f64> = rows
        .iter()
        .filter_map(|r| {
            let first = r["sources"]
                .as_array()?
                .iter()
                .find(|e| e["mode"] == "swarm")?;
            first["current_time"].as_f64()
        })
        .collect();
    let errors: Vec<Value> = rows
        .iter()
        .filter_map(|r| {
            let e = &r["stats"]["error"];
            (!e.is_null()).then(|| e.clone())
        })
        .collect();
    let row = json!({
        "mode": label,
        "p2p": p2p,
        "vod_budget_kbps": cap,
        "origin_refused": sum("origin_refused"),
        "grants": sum("grants"),
        "browsers": a.browsers,
        "asset_bytes": asset_bytes,
        "origin_block_bytes": served,
        "bytes_from_origin": from_origin,
        "bytes_from_peers": from_peers,
        "origin_share": if from_peers + from_origin > 0.0 { from_origin / (from_peers + from_origin) } else { 0.0 },
        "origin_per_viewer_mb": served / a.browsers as f64 / 1e6,
        "startup_ms_p50": median(&startups),
        "startup_ms_max": startups.iter().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
        "stalls": sum("stalls"),
        "stall_ms_p95": quantile(&stall_ms, 0.95),
        "switched": switch_s.len(),
        "switch_at_s_p50": median(&switch_s),
        "errors": errors,
        "wall_s": wall,
        "per_browser": rows,
    });
    eprintln!(
        "bench-vod-swarm: {label}: origin served {:.1} MB, peers {:.1} MB, {} of {} switched",
        served / 1e6,
        from_peers / 1e6,
        switch_s.len(),
        a.browsers
    );
    row
}

/// The server's count of on-demand block bytes served.
async fn served(server: &Server) -> f64 {
    let m = server.metrics().await.expect("metrics");
    m.get("clubcast_vod_bytes_total").copied().unwrap_or(0.0)
}

fn table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| mode | viewers | origin egress MB (per viewer) | from peers MB | origin share of bytes received | switched to swarm (p50 at media s) | startup ms p50 / max | stalls (stall ms p95) | runs refused |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let opt = |k: &str, d: usize| match r[k].as_f64() {
            Some(_) => fixed(r, k, d),
            None => "–".into(),
        };
        t.push_str(&format!(
            "| {} | {} | {:.1} ({:.1}) | {:.1} | {} | {} of {} ({}) | {} / {} | {} ({}) | {} |\n",
            r["mode"].as_str().unwrap_or(""),
            r["browsers"],
            num(r, "origin_block_bytes") / 1e6,
            num(r, "origin_per_viewer_mb"),
            num(r, "bytes_from_peers") / 1e6,
            fixed(r, "origin_share", 2),
            r["switched"],
            r["browsers"],
            opt("switch_at_s_p50", 1),
            opt("startup_ms_p50", 0),
            opt("startup_ms_max", 0),
            r["stalls"],
            opt("stall_ms_p95", 0),
            r["origin_refused"],
        ));
    }
    t
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let file = encode(&a);
    eprintln!("bench-vod-swarm: asset {} bytes", file.len());
    let mut rows = vec![
        run_mode(&a, &file, true, None).await,
        run_mode(&a, &file, false, None).await,
    ];
    if let Some(k) = a.capped_kbps {
        rows.push(run_mode(&a, &file, true, Some(k)).await);
        rows.push(run_mode(&a, &file, false, Some(k)).await);
    }
    let (date, commit, cpu) = run_stamp();
    let md = format!(
        "# On-demand swarm: origin egress with P2P on and off\n\n\
         Command: `{}`. {date}, commit {commit}, {cpu}.\n\n\
         {} headless Chromiums watch one asset ({} s of 1280x720 H.264 at {} kbit/s, 2-s \
         fragments, uploaded with `PUT /vod`), each opening the watch page {} s after the one \
         before and playing {} s from the start. Origin egress is the server's \
         `clubcast_vod_bytes_total` (block bytes served); the share is of the bytes the \
         players received. Each mode runs on a fresh server with fresh browsers, P2P on first. \
         The first two rows are unmetered (`--vod-budget-kbps 0`). A capped row's origin has \
         an on-demand budget (`--vod-budget-kbps`): with P2P on the viewers bid for it and run \
         on grants (runs before a viewer's welcome use the 25 % anonymous share); with P2P off \
         they have no grant token and the whole budget is anonymous (first come, first \
         served). Refused: origin runs answered 429 (over the grant or the anonymous share).\n\n{}",
        a.command,
        a.browsers,
        a.asset_secs,
        a.kbps,
        a.stagger.as_secs(),
        a.secs,
        table(&rows)
    );
    std::fs::create_dir_all(&a.out).expect("out dir");
    let md_path = a.out.join("vod-swarm.md");
    let old = std::fs::read_to_string(&md_path).ok();
    std::fs::write(&md_path, with_notes(md, old.as_deref())).expect("write md");
    let json = json!({"command": a.command, "date": date, "commit": commit, "rows": rows});
    std::fs::write(
        a.out.join("vod-swarm.json"),
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("write json");
    println!("{}", table(&rows));
}
