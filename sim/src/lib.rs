//! clubcast-sim: a discrete-event simulator of a live swarm.
//!
//! Data flow: [`population::draw`] fixes the viewers (capacity, latency,
//! hostility, arrival and departure) from the seed; [`stream::Stream`] cuts the
//! stream into blocks; one of three drivers plays them out on the network model
//! of [`net`] and feeds a [`metrics::Collector`], which becomes a
//! [`metrics::Report`]. The `clubs` driver ([`clubs`]) runs the unchanged
//! protocol state machines — `Membership`, `Source`, `Peer` — exactly as the
//! server and the browser do; [`server_only`] and [`mesh`] are the baselines.
//!
//! # Model (each choice is a knob in [`config::Config`] unless fixed here)
//! - **Time**: one virtual clock in µs; the core sees milliseconds. Events are
//!   `(time, tie)` keys in a calendar queue with payloads in a slab; equal
//!   times run in push order (`clubs`: in the order of the viewer that
//!   scheduled them and its count), so a run is a pure function of its config
//!   and seed. `clubs` runs the viewers on `--threads` threads in windows as
//!   long as the shortest viewer-to-viewer delay (see [`clubs`]); the results
//!   do not depend on the thread count.
//! - **Stream**: `--bitrate-kbps` (2000), 1 s fragments cut into blocks of at
//!   most `--block-kib` (16) with the last block of a fragment short, and
//!   `FRAGMENT_START` on each fragment's first block. A block is cut when its
//!   last byte has arrived at the bitrate; its ingest time is that moment.
//!   Payloads are slices of one static zero buffer (`Bytes::from_static`).
//! - **Verification**: 10k peers cannot afford an ed25519 verify per block.
//!   [`verify::SimVerifier`] checks a keyed 64-bit tag of the header kept in
//!   the signature field; the peer state machine is the same.
//! - **Upload**: each viewer's capacity is drawn once: a fraction
//!   `--free-rider-frac` (0.2) are free riders at `--free-rider-x` (0.2) ×
//!   bitrate, the others uniform in ±50 % around the mean that makes the overall
//!   mean `--upload-mean-x` (1.5) × bitrate. Upload is a FIFO serializer per
//!   host across all its links: a frame leaves after everything queued before
//!   it. Each link's queued bytes are reported with `handle_link_buffered`
//!   before every input the peer handles (the core only reads them while
//!   handling an input, so this equals reporting at each frame's send end).
//!   The seeder uploads at 10 Gbit/s.
//! - **Download** is unlimited for peer traffic (the sender's upload is the
//!   bottleneck: viewers have ≥ 10× the bitrate down); an origin fetch takes
//!   its size at 10 × bitrate.
//! - **Latency**: each viewer has an access latency uniform in
//!   `--latency-min-ms`..`--latency-max-ms` (10–100 ms); a path's round trip
//!   is the sum of both ends' (so RTTs run 20–200 ms) and its one-way delay
//!   half that; the server (seeder, origin, signaling) has 5 ms.
//! - **Loss**: data channels are reliable and ordered (SCTP), so loss is
//!   delay: with probability `--loss` (0.01) a frame takes an extra
//!   max(200 ms, RTT), and frames behind it on the same channel wait for it.
//! - **Signaling**: the server decides at once; a peer learns of a welcome
//!   or link change one RTT to the server later; a new connection opens two
//!   peer RTTs after both ends learned of it.
//! - **Churn**: the initial viewers arrive during a 1.5 s lobby before the
//!   stream starts. Then each second `--churn-per-min / 60` of the viewers
//!   leave abruptly at random moments (frames still in their serializer are
//!   lost) and as many new ones join, also at random moments. A leave goes
//!   through `Membership::leave` and its link changes reach the others after
//!   the signaling delay. Joiners start at the newest fragment start at least
//!   the target latency behind the edge.
//! - **Hostile peers** (`--hostile`) corrupt every block they send (one
//!   signature byte flipped). A peer that rejects a block reports `BadPeer`;
//!   the server applies `Membership::replace(reporter, bad)` and kicks a peer
//!   reported by two distinct peers (`Membership::leave`).
//! - **Origin**: an egress budget `--origin-budget-kbps` (default 3 ×
//!   bitrate) covers seeding and gap fill. Every 1 s the server collects every
//!   peer's `bid`, and splits what the seeder did not use in the last second
//!   with `allocate_units`, in whole blocks; the unallocated rest serves unbid
//!   fetches first come.
//!   A fetch within the grant arrives after the RTT to the origin plus its
//!   transfer time (`handle_origin_block`); beyond it, the refusal arrives
//!   after one RTT (`handle_gap_fill_failed`). Seeder pushes count as egress.
//! - **Metrics** (names as everywhere in clubcast): see [`metrics::Report`].
//!   `continuity` counts (honest peer, block) pairs for blocks cut after the
//!   peer's first Play whose deadline (ingest + 1500 ms) falls while it is
//!   present; a block counts when its first copy arrived by the deadline.
//!   `p2p_ratio` counts the seeder's pushes as server bytes.

pub mod clubs;
pub mod config;
pub mod error;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod population;
pub mod report;
pub mod server_only;
pub mod stream;
pub mod verify;

use config::{Config, Mode};
use error::SimError;
use metrics::{Collector, Report};
use stream::Stream;
use verify::SimVerifier;

/// A finished run: its report and what is needed to check it in tests.
#[derive(Debug)]
pub struct Run {
    /// The report.
    pub report: Report,
    /// Per-viewer records.
    pub metrics: Collector,
    /// The stream that was played.
    pub stream: Stream,
    /// When the run stopped, µs.
    pub end_us: u64,
}

/// Peak resident set of this process so far, MiB (0 where unknown).
pub fn max_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs one simulation.
pub fn run(cfg: &Config) -> Result<Run, SimError> {
    let cfg = cfg.clone().validated()?;
    let started = std::time::Instant::now();
    let verifier = SimVerifier::new(cfg.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let stream = Stream::new(&cfg, &verifier);
    let verifier = verifier.sharing(&stream.blocks);
    let viewers = population::draw(&cfg, stream.end_us);
    let mut run = match cfg.mode {
        Mode::Clubs => clubs::Sim::new(&cfg, &viewers, stream, verifier).run(),
        Mode::ServerOnly => server_only::run(&cfg, &viewers, stream),
        Mode::MeshPull => mesh::Sim::new(&cfg, &viewers, stream, verifier).run(),
    };
    run.report.wall_seconds = started.elapsed().as_secs_f64();
    run.report.max_rss_mib = max_rss_mib();
    Ok(run)
}
