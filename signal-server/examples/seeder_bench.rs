//! Seeder figures; nothing here is a test and nothing asserts speed.
//!
//! ```text
//! cargo run --release -p clubcast-server --example seeder_bench -- fanout --peers 50
//! cargo run --release -p clubcast-server --example seeder_bench -- loss --loss 0.02
//! ```
//!
//! `--stack str0m|webrtc-rs` picks the seeder's WebRTC stack (default: the server's,
//! `str0m`); the native peers always run on the `webrtc` crate.
//!
//! `fanout` runs the real app and seeder in this process, publishes a stream at `--kbps`, and
//! first measures this process's CPU and RSS with no peers (the baseline), then again with
//! `--peers` native peers, which run in a *separate process* (this binary, `peers`
//! subcommand) so their WebRTC work is not counted. `loss` runs one peer whose link to the
//! seeder crosses a UDP proxy that drops `--loss` of the packets each way, and reports
//! delivery, stalls and block delay.

#[path = "../tests/seeder_common/mod.rs"]
mod seeder_common;

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use clubcast_server::config::{Config, SeederRtc};
use clubcast_server::seeder::SeederConfig;
use seeder_common::{publish, run_peer, start_on, start_server, PeerOptions, PeerUpdate};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Tokio worker threads (default: one per core).
    #[arg(long, global = true)]
    workers: Option<usize>,
    /// The seeder's WebRTC stack.
    #[arg(long, global = true, value_enum, default_value_t = SeederRtc::default())]
    stack: SeederRtc,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Server CPU and RSS while seeding `--peers` peers in another process.
    Fanout {
        /// Native peers.
        #[arg(long, default_value_t = 50)]
        peers: usize,
        /// Stream bitrate, kbit/s.
        #[arg(long, default_value_t = 2000)]
        kbps: u64,
        /// Block payload bytes.
        #[arg(long, default_value_t = 16 * 1024)]
        bytes: usize,
        /// Clubs (C). With C ≥ peers, every peer is a seed of its clubs.
        #[arg(long, default_value_t = 50)]
        clubs: u16,
        /// Seeds each block is pushed to (k).
        #[arg(long, default_value_t = 2)]
        k: u8,
        /// Seconds measured, per phase.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Seconds for peers to join and connect before measuring.
        #[arg(long, default_value_t = 20)]
        warmup: u64,
    },
    /// Child of `fanout`: runs native peers and prints one summary line.
    Peers {
        #[arg(long)]
        url: String,
        #[arg(long)]
        stream: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        seconds: u64,
    },
    /// One peer through a lossy proxy.
    Loss {
        /// Fraction of packets dropped each way.
        #[arg(long, default_value_t = 0.02)]
        loss: f64,
        /// Blocks per second.
        #[arg(long, default_value_t = 20)]
        rate: u32,
        /// Block payload bytes.
        #[arg(long, default_value_t = 16 * 1024)]
        bytes: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.workers {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build().expect("tokio runtime");
    match args.cmd {
        Cmd::Fanout {
            peers,
            kbps,
            bytes,
            clubs,
            k,
            seconds,
            warmup,
        } => rt.block_on(fanout(
            args.stack, peers, kbps, bytes, clubs, k, seconds, warmup,
        )),
        Cmd::Peers {
            url,
            stream,
            count,
            seconds,
        } => rt.block_on(peers(url, stream, count, seconds)),
        Cmd::Loss {
            loss,
            rate,
            bytes,
            seconds,
        } => rt.block_on(lossy(args.stack, loss, rate, bytes, seconds)),
    }
}

/// CPU seconds (user + system) and RSS of this process, from `/proc/self`.
fn usage() -> (f64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15 (1-based).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // CLK_TCK is 100 on every Linux we run on.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (cpu, kb("VmRSS:"), kb("VmHWM:"))
}

fn seeded(server: &seeder_common::Server) -> u64 {
    server
        .state
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("clubcast_bytes_seeded_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One measured phase: CPU %, RSS MiB at the end, seeded Mbit/s.
async fn phase(server: &seeder_common::Server, seconds: u64) -> (f64, f64, f64) {
    let (cpu0, _, _) = usage();
    let bytes0 = seeded(server);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (cpu1, rss, _) = usage();
    let secs = t0.elapsed().as_secs_f64();
    let mbps = (seeded(server) - bytes0) as f64 * 8.0 / secs / 1e6;
    (100.0 * (cpu1 - cpu0) / secs, rss as f64 / 1024.0, mbps)
}

#[allow(clippy::too_many_arguments)]
async fn fanout(
    stack: SeederRtc,
    n: usize,
    kbps: u64,
    bytes: usize,
    clubs: u16,
    k: u8,
    seconds: u64,
    warmup: u64,
) {
    let config = Config {
        clubs,
        seeds_per_block: k,
        seeder_rtc: stack,
        ..Config::default()
    };
    let server = start_server(config, SeederConfig::default(), "bench").await;
    let rate = ((kbps * 1000 / 8) as f64 / bytes as f64).round().max(1.0) as u32;
    let _publisher = publish(server.stream.clone(), rate, bytes, server.shutdown.clone());
    eprintln!(
        "publishing {rate} blocks/s of {bytes} B ({kbps} kbit/s); baseline phase {seconds} s"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = phase(&server, seconds).await;

    let exe = std::env::current_exe().expect("own path");
    let mut child = tokio::process::Command::new(exe)
        .args([
            "peers",
            "--url",
            &server.ws_url(),
            "--stream",
            "bench",
            "--count",
            &n.to_string(),
            "--seconds",
            &(warmup + seconds + 5).to_string(),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the peers process");
    let (join_cpu0, _, _) = usage();
    eprintln!("{n} peers joining; warm-up {warmup} s");
    tokio::time::sleep(Duration::from_secs(warmup)).await;
    let (join_cpu1, _, _) = usage();
    let peers = server.state.hub.peers("bench");
    eprintln!("{peers} peers in the swarm; measuring {seconds} s");
    let load = phase(&server, seconds).await;
    let (_, _, hwm) = usage();

    let mut summary = String::new();
    if let Some(out) = child.stdout.take() {
        let mut lines = tokio::io::BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            summary = line;
        }
    }
    let _ = child.wait().await;
    let rejects = |code| server.state.metrics.rejects(code);
    println!(
        "| phase | peers in swarm | server CPU % (of one core) | server RSS MiB | seeded Mbit/s |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| baseline: publishing, no peers | 0 | {:.1} | {:.1} | {:.2} |",
        base.0, base.1, base.2
    );
    println!(
        "| join + connect ({warmup} s) | {peers} | {:.1} | | |",
        100.0 * (join_cpu1 - join_cpu0) / warmup as f64
    );
    println!(
        "| steady, {n} native peers | {peers} | {:.1} | {:.1} | {:.2} |",
        load.0, load.1, load.2
    );
    println!();
    println!("peak RSS (VmHWM) {:.1} MiB", hwm as f64 / 1024.0);
    println!(
        "rejects: seeder_full {} seeder_busy {} seeder_slow_seed {} seeder_send_full {} seeder_lagged {}",
        rejects("seeder_full"),
        rejects("seeder_busy"),
        rejects("seeder_slow_seed"),
        rejects("seeder_send_full"),
        rejects("seeder_lagged")
    );
    println!("peers process: {summary}");
    server.stop().await;
}

async fn peers(url: String, stream: String, count: usize, seconds: u64) {
    let stop = CancellationToken::new();
    let opened = Arc::new(AtomicU64::new(0));
    let blocks = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..count {
        let (tx, mut rx) = mpsc::channel(1024);
        let opts = PeerOptions {
            ws_url: url.clone(),
            stream: stream.clone(),
            ..PeerOptions::default()
        };
        tasks.push(tokio::spawn(run_peer(opts, tx, stop.clone())));
        let (opened, blocks, bad) = (opened.clone(), blocks.clone(), bad.clone());
        tokio::spawn(async move {
            let mut open_once = false;
            while let Some(u) = rx.recv().await {
                match u {
                    PeerUpdate::Open if !open_once => {
                        open_once = true;
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    PeerUpdate::Block { .. } => {
                        blocks.fetch_add(1, Ordering::Relaxed);
                    }
                    PeerUpdate::BadBlock(_) => {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
        // Browsers do not all arrive in the same millisecond.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.cancel();
    let mut errors = 0;
    for t in tasks {
        if !matches!(t.await, Ok(Ok(()))) {
            errors += 1;
        }
    }
    println!(
        "{{\"peers\":{count},\"opened\":{},\"blocks\":{},\"bad_blocks\":{},\"peer_errors\":{errors}}}",
        opened.load(Ordering::Relaxed),
        blocks.load(Ordering::Relaxed),
        bad.load(Ordering::Relaxed)
    );
}

async fn lossy(stack: SeederRtc, loss: f64, rate: u32, bytes: usize, seconds: u64) {
    let server = start_on(stack, "lossy").await;
    let publisher = publish(server.stream.clone(), rate, bytes, server.shutdown.clone());
    let (tx, mut rx) = mpsc::channel(65536);
    let opts = PeerOptions {
        ws_url: server.ws_url(),
        stream: "lossy".into(),
        loss: Some(loss),
        ..PeerOptions::default()
    };
    let peer_stop = server.shutdown.child_token();
    let peer = tokio::spawn(run_peer(opts, tx, peer_stop.clone()));
    // How late a 50 ms timer task runs: shows whether a stall is the network or a blocked
    // runtime worker.
    let watchdog_stop = peer_stop.clone();
    let watchdog = tokio::spawn(async move {
        let mut worst = Duration::ZERO;
        let mut blocked = 0u32;
        loop {
            let t = Instant::now();
            tokio::select! {
                () = watchdog_stop.cancelled() => return (worst, blocked),
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            let late = t.elapsed().saturating_sub(Duration::from_millis(50));
            if late > Duration::from_millis(500) {
                blocked += 1;
            }
            worst = worst.max(late);
        }
    });
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let (mut first_open, mut opens, mut closes) = (None, 0u32, 0u32);
    let mut arrivals: Vec<(Instant, u64, i64)> = Vec::new();
    loop {
        let u = tokio::select! {
            u = rx.recv() => u,
            () = tokio::time::sleep_until(end.into()) => break,
        };
        match u {
            Some(PeerUpdate::Open) => {
                opens += 1;
                first_open.get_or_insert_with(Instant::now);
            }
            Some(PeerUpdate::Closed) => closes += 1,
            Some(PeerUpdate::Block {
                seq, at, delay_ms, ..
            }) => arrivals.push((at, seq, delay_ms)),
            Some(PeerUpdate::BadBlock(e)) => eprintln!("bad block: {e}"),
            Some(_) => {}
            None => {
                eprintln!("peer ended after {:.1} s", start.elapsed().as_secs_f64());
                break;
            }
        }
    }
    peer_stop.cancel();
    let (late, blocked) = watchdog.await.unwrap_or_default();
    match peer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("peer ended early: {e}"),
        Err(e) => eprintln!("peer task failed: {e}"),
    }
    server.shutdown.cancel();
    let published = publisher.await.unwrap_or(0);
    let Some(open_at) = first_open else {
        println!("loss {loss}: the channel never opened in {seconds} s");
        return;
    };
    // Blocks published after the channel first opened are the ones the peer could get.
    let expected = ((end - open_at).as_secs_f64() * f64::from(rate)) as u64;
    let mut gaps: Vec<f64> = arrivals
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).as_secs_f64())
        .collect();
    if let Some((last, _, _)) = arrivals.last() {
        gaps.push((end - *last).as_secs_f64());
    }
    let stall_limit = 1.0;
    let stalls: Vec<f64> = gaps.iter().copied().filter(|g| *g >= stall_limit).collect();
    let mut delays: Vec<i64> = arrivals.iter().map(|a| a.2).collect();
    delays.sort_unstable();
    let pct = |p: f64| {
        delays
            .get(((delays.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    let in_order = arrivals.windows(2).all(|w| w[1].1 > w[0].1);
    let received_mb = arrivals.len() as f64 * bytes as f64 / 1e6;
    println!(
        "| {:.0} % | {seconds} | {:.1} | {} / {expected} ({:.0} %) | {:.2} | {} | {:.1} | {:.1} | {} / {} / {} | {opens} / {closes} | {} | {in_order} |",
        loss * 100.0,
        (open_at - start).as_secs_f64(),
        arrivals.len(),
        100.0 * arrivals.len() as f64 / expected.max(1) as f64,
        received_mb * 8.0 / (end - open_at).as_secs_f64(),
        stalls.len(),
        stalls.iter().sum::<f64>(),
        stalls.iter().copied().fold(0.0, f64::max),
        pct(0.5),
        pct(0.95),
        delays.last().copied().unwrap_or(0),
        server.state.metrics.rejects("seeder_slow_seed"),
    );
    eprintln!(
        "published {published}; runtime: worst timer lateness {late:?}, {blocked} times over 500 ms"
    );
    server.stop().await;
}
