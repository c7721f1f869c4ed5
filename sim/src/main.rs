//! clubcast-sim: command line of the swarm simulator (see the library doc for
//! the model).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use clubcast_sim::config::{Config, Mode};
use clubcast_sim::error::SimError;
use clubcast_sim::metrics::Report;
use clubcast_sim::report::{self, Row};

/// Simulates a clubcast live swarm (and its baselines) on a modelled network.
#[derive(Debug, Parser)]
#[command(name = "clubcast-sim", version)]
struct Cli {
    /// System to simulate.
    #[arg(long, value_enum, default_value = "clubs")]
    mode: Mode,
    /// Viewers.
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// Seconds of stream (default 60, or 120 with --bench).
    #[arg(long)]
    seconds: Option<u64>,
    /// Stream bitrate, kbit/s.
    #[arg(long, default_value_t = 2000)]
    bitrate_kbps: u64,
    /// Block payload size, KiB.
    #[arg(long, default_value_t = clubcast_protocol::block::DEFAULT_BLOCK_KIB as u64)]
    block_kib: u64,
    /// Clubs C.
    #[arg(long, default_value_t = 8)]
    clubs: u16,
    /// Fraction of viewers replaced per minute.
    #[arg(long, default_value_t = 0.0)]
    churn_per_min: f64,
    /// Fraction of hostile viewers.
    #[arg(long, default_value_t = 0.0)]
    hostile: f64,
    /// RNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Probability that a frame needs a retransmission.
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
    /// Origin egress budget (seeding + gap fill), kbit/s; 0 = 3 × bitrate.
    #[arg(long, default_value_t = 0)]
    origin_budget_kbps: u64,
    /// Mean upload capacity, × bitrate.
    #[arg(long, default_value_t = 1.5)]
    upload_mean_x: f64,
    /// Fraction of free riders.
    #[arg(long, default_value_t = 0.2)]
    free_rider_frac: f64,
    /// Upload capacity of a free rider, × bitrate.
    #[arg(long, default_value_t = 0.2)]
    free_rider_x: f64,
    /// Smallest access latency, ms (a path's round trip is the sum of its two
    /// ends', its one-way delay half that).
    #[arg(long, default_value_t = 10)]
    latency_min_ms: u64,
    /// Largest access latency, ms.
    #[arg(long, default_value_t = 100)]
    latency_max_ms: u64,
    /// Fraction of viewers that state their upload when they join; the
    /// others are planned at the server's default for a browser that states
    /// none (190 % of the bitrate) until their upload probe reports.
    #[arg(long, default_value_t = 1.0)]
    stated_upload: f64,
    /// Viewers that state no upload run no upload probe: they are planned
    /// at the default until their bids show them falling behind.
    #[arg(long)]
    no_upload_probe: bool,
    /// Error of an upload probe's reading: it reads the upload times 1 + u,
    /// u uniform in [-e, e] per viewer.
    #[arg(long, default_value_t = 0.2)]
    probe_error: f64,
    /// Seeds the server pushes each block to (k).
    #[arg(long, default_value_t = 2)]
    seeds_k: u8,
    /// In-club links per member.
    #[arg(long, default_value_t = 2)]
    in_club_links: u8,
    /// Neighbours per peer in mesh-pull.
    #[arg(long, default_value_t = 8)]
    mesh_neighbours: usize,
    /// Threads of the clubs driver (0: one per core from 300 peers up).
    /// The results are the same for any count.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Write the report (or, with --compare, all reports) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run all three modes and print one markdown table.
    #[arg(long)]
    compare: bool,
    /// Benchmark sweep: every mode at each of --bench-peers, plus churn and
    /// hostile rows; writes sim.md, sim.json and sim.svg into --out.
    #[arg(long)]
    bench: bool,
    /// Peer counts of the benchmark sweep.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    bench_peers: Vec<usize>,
    /// Output directory of --bench.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

impl Cli {
    fn config(&self, mode: Mode) -> Config {
        Config {
            mode,
            peers: self.peers,
            seconds: self.seconds.unwrap_or(if self.bench { 120 } else { 60 }),
            bitrate_kbps: self.bitrate_kbps,
            block_kib: self.block_kib,
            clubs: self.clubs,
            churn_per_min: self.churn_per_min,
            hostile: self.hostile,
            seed: self.seed,
            loss: self.loss,
            origin_budget_kbps: self.origin_budget_kbps,
            upload_mean_x: self.upload_mean_x,
            free_rider_frac: self.free_rider_frac,
            free_rider_x: self.free_rider_x,
            latency_min_ms: self.latency_min_ms,
            latency_max_ms: self.latency_max_ms,
            stated_upload: self.stated_upload,
            upload_probe: !self.no_upload_probe,
            probe_error: self.probe_error,
            seeds_k: self.seeds_k,
            in_club_links: self.in_club_links,
            mesh_neighbours: self.mesh_neighbours,
            threads: self.threads,
            time_order: false,
            cut_at_server_events: false,
        }
    }
}

/// The command line that runs `cfg` alone, for a child process.
fn child_args(cfg: &Config, json: &std::path::Path) -> Vec<String> {
    let mut a: Vec<String> = vec![
        ("--mode", cfg.mode.name().to_string()),
        ("--peers", cfg.peers.to_string()),
        ("--seconds", cfg.seconds.to_string()),
        ("--bitrate-kbps", cfg.bitrate_kbps.to_string()),
        ("--block-kib", cfg.block_kib.to_string()),
        ("--clubs", cfg.clubs.to_string()),
        ("--churn-per-min", cfg.churn_per_min.to_string()),
        ("--hostile", cfg.hostile.to_string()),
        ("--seed", cfg.seed.to_string()),
        ("--loss", cfg.loss.to_string()),
        ("--origin-budget-kbps", cfg.origin_budget_kbps.to_string()),
        ("--upload-mean-x", cfg.upload_mean_x.to_string()),
        ("--free-rider-frac", cfg.free_rider_frac.to_string()),
        ("--free-rider-x", cfg.free_rider_x.to_string()),
        ("--latency-min-ms", cfg.latency_min_ms.to_string()),
        ("--latency-max-ms", cfg.latency_max_ms.to_string()),
        ("--stated-upload", cfg.stated_upload.to_string()),
        ("--probe-error", cfg.probe_error.to_string()),
        ("--seeds-k", cfg.seeds_k.to_string()),
        ("--in-club-links", cfg.in_club_links.to_string()),
        ("--mesh-neighbours", cfg.mesh_neighbours.to_string()),
        ("--threads", cfg.threads.to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect();
    if !cfg.upload_probe {
        a.push("--no-upload-probe".into());
    }
    a.push("--json".into());
    a.push(json.display().to_string());
    a
}

/// Runs `cfg` in a child process, so that its wall time and peak memory are
/// its own.
fn run_child(cfg: &Config, dir: &std::path::Path) -> Result<Report, SimError> {
    let tmp = dir.join(format!(
        ".sim-{}-{}.json",
        cfg.mode.name(),
        std::process::id()
    ));
    let exe = std::env::current_exe()?;
    let status = std::process::Command::new(exe)
        .args(child_args(cfg, &tmp))
        .status()?;
    if !status.success() {
        return Err(SimError::Bench(format!("{cfg:?}: {status}")));
    }
    let report: Report = serde_json::from_str(&std::fs::read_to_string(&tmp)?)?;
    std::fs::remove_file(&tmp)?;
    Ok(report)
}

fn bench(cli: &Cli) -> Result<(), SimError> {
    std::fs::create_dir_all(&cli.out)?;
    let mut rows = Vec::new();
    let mut scenarios: Vec<(String, Config)> = Vec::new();
    for &n in &cli.bench_peers {
        for mode in Mode::ALL {
            let mut c = cli.config(mode);
            c.peers = n;
            scenarios.push((format!("steady N={n}"), c));
        }
    }
    for &n in cli.bench_peers.iter().filter(|n| **n >= 1000) {
        for mode in Mode::ALL {
            let mut c = cli.config(mode);
            c.peers = n;
            c.churn_per_min = 0.1;
            c.hostile = 0.05;
            scenarios.push((format!("churn 10%/min + 5% hostile N={n}"), c));
        }
        // The same with no viewer stating its upload, as browsers whose page
        // sets no `upload_kbps`: each runs the upload probe before it joins
        // (the baselines do not plan on upload).
        let mut c = cli.config(Mode::Clubs);
        c.peers = n;
        c.churn_per_min = 0.1;
        c.hostile = 0.05;
        c.stated_upload = 0.0;
        scenarios.push((
            format!("churn 10%/min + 5% hostile, no upload stated (probed) N={n}"),
            c,
        ));
    }
    for (label, cfg) in scenarios {
        eprintln!("bench: {label} {}", cfg.mode.name());
        let report = run_child(&cfg, &cli.out)?;
        eprintln!(
            "{}",
            report::table(&[Row {
                label: label.clone(),
                report: report.clone()
            }])
        );
        rows.push(Row { label, report });
    }
    let table = report::table(&rows);
    let md = format!(
        "# clubcast-sim benchmark\n\n\
         Command: `just bench-sim` (= `clubcast-sim --compare --bench --out bench/results`), \
         {} s of a {} kbit/s stream, {} KiB blocks, {} clubs, seed {}, loss {}, \
         upload mean {}× bitrate with {:.0} % free riders at {}×. Each row is a separate \
         process (`just bench-sim` builds the `sim` profile: release, fat LTO, {BUILT_FOR}); wall time \
         and max RSS are that process's own, and `threads` is how many threads it ran \
         (clubs: one per core from 300 peers up; the figures do not depend on it). A \
         clubs row runs with mimalloc's purge delay off and huge pages on. The machine \
         has 2 cores shared with other builds, so wall times are noisy.\n\n{table}\n\
         ![origin egress and p95 block delay vs peers](sim.svg)\n",
        cli.config(Mode::Clubs).seconds,
        cli.bitrate_kbps,
        cli.block_kib,
        cli.clubs,
        cli.seed,
        cli.loss,
        cli.upload_mean_x,
        cli.free_rider_frac * 100.0,
        cli.free_rider_x,
    );
    // Hand-written notes (from the first `## ` heading on) outlive a rerun.
    let notes = std::fs::read_to_string(cli.out.join("sim.md"))
        .ok()
        .and_then(|old| old.find("\n## ").map(|i| old[i..].to_string()))
        .unwrap_or_default();
    report::write(&cli.out, "sim.md", &format!("{md}{notes}"))?;
    report::write(&cli.out, "sim.json", &serde_json::to_string_pretty(&rows)?)?;
    let modes: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
    report::write(&cli.out, "sim.svg", &report::svg(&rows, &modes))?;
    println!("{table}");
    Ok(())
}

/// What CPU this binary was built for, as far as the bench header can tell.
/// `just sim` and `just bench-sim` pass `-C target-cpu=native`, which turns
/// SSE4.2 on for any x86-64 CPU since 2008; baseline x86-64 has none.
const BUILT_FOR: &str = if cfg!(all(target_arch = "x86_64", target_feature = "sse4.2")) {
    "for a CPU past baseline x86-64 (SSE4.2 on: `just bench-sim` passes `-C target-cpu=native`)"
} else if cfg!(target_arch = "x86_64") {
    "for baseline x86-64"
} else {
    "for a CPU this header does not name (not x86-64)"
};

/// mimalloc's options that a clubs-only run sets, with their values (see
/// [`tune_allocator`]): keep freed memory rather than hand it back to the
/// kernel, and back the heap with huge pages.
const ALLOC_ENV: [(&str, &str); 2] = [
    ("MIMALLOC_PURGE_DELAY", "-1"),
    ("MIMALLOC_ALLOW_LARGE_OS_PAGES", "1"),
];

/// Re-runs this process (`exec`, so the same pid, and its own peak memory)
/// with the [`ALLOC_ENV`] options that the environment does not set: mimalloc
/// reads its options from the environment when the process loads, and has
/// no safe API to set them later. Measured at 10,000 clubs viewers × 30 s
/// with churn and hostile relays, with the same report (wall times: three
/// runs each, alternately):
/// - by default mimalloc hands pages that stayed free for a second back to
///   the kernel, and the run faults them in again: 20,126 minor page faults
///   and 1.7 s of system time against 730 and 1.1 s with the purge delay
///   off (one run each), and 35.4-38.4 s of wall time against 32.9-35.0 s,
///   for about 28 MiB more peak memory;
/// - huge pages on top: 37.4-38.6 s against 38.5-39.1 s.
///
/// Only a clubs-only run does so: mesh-pull gains nothing from them
/// (10,000 peers × 20 s, two runs each, alternately: 45.1 and 45.9 s by
/// default, 44.2 and 46.0 s with them, the same report). Returns only if it
/// does not exec.
#[cfg(unix)]
fn tune_allocator(cli: &Cli) {
    use std::os::unix::process::CommandExt;
    if cli.bench || cli.compare || cli.mode != Mode::Clubs {
        return;
    }
    let missing: Vec<_> = ALLOC_ENV
        .into_iter()
        .filter(|(k, _)| std::env::var_os(k).is_none())
        .collect();
    if missing.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .envs(missing)
        .exec();
    eprintln!(
        "clubcast-sim: running with mimalloc's default options ({err}): slower, the same report"
    );
}

#[cfg(not(unix))]
fn tune_allocator(_cli: &Cli) {}

fn main_inner() -> Result<(), SimError> {
    let cli = Cli::parse();
    tune_allocator(&cli);
    if std::env::var_os("CLUBCAST_SIM_DEBUG").is_some() {
        for (key, _) in ALLOC_ENV {
            let value = std::env::var(key).unwrap_or_else(|_| "unset".into());
            eprintln!("allocator: {key}={value}");
        }
    }
    if cli.bench {
        return bench(&cli);
    }
    let modes: Vec<Mode> = if cli.compare {
        Mode::ALL.to_vec()
    } else {
        vec![cli.mode]
    };
    let mut rows = Vec::new();
    for mode in modes {
        let run = clubcast_sim::run(&cli.config(mode))?;
        rows.push(Row {
            label: format!("N={}", cli.peers),
            report: run.report,
        });
    }
    if let Some(path) = &cli.json {
        let text = if cli.compare {
            serde_json::to_string_pretty(&rows)?
        } else {
            serde_json::to_string_pretty(&rows[0].report)?
        };
        std::fs::write(path, text)?;
    }
    println!("{}", report::table(&rows));
    Ok(())
}

/// mimalloc rather than the system allocator: the run makes and frees many
/// small objects (frames, queue nodes, per-link lists) on both threads; at
/// 10,000 peers it ran about 8 % faster, with the same report.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match main_inner() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clubcast-sim: {e}");
            ExitCode::FAILURE
        }
    }
}
