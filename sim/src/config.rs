//! What one simulation run is: the swarm, the stream and the network model.

use serde::Serialize;

use crate::error::SimError;

/// Which distribution system is simulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// clubcast: the club relay driven through the real protocol state machines.
    Clubs,
    /// The origin sends every block to every viewer.
    ServerOnly,
    /// A random mesh with buffer-map exchange and pull (CoolStreaming style).
    MeshPull,
}

impl Mode {
    /// All modes, in table order.
    pub const ALL: [Mode; 3] = [Mode::Clubs, Mode::ServerOnly, Mode::MeshPull];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Clubs => "clubs",
            Mode::ServerOnly => "server-only",
            Mode::MeshPull => "mesh-pull",
        }
    }
}

/// Most threads the `clubs` driver runs.
pub const MAX_THREADS: usize = 64;
/// Peers from which `--threads 0` runs one thread per core: below it a
/// window of events is too short to pay for waking a second thread.
pub const AUTO_THREADS_FROM_PEERS: usize = 300;

/// Every knob of a run; echoed into the JSON report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// The system simulated.
    pub mode: Mode,
    /// Viewers present from the start (churn keeps the count about constant).
    pub peers: usize,
    /// Seconds of stream produced.
    pub seconds: u64,
    /// Stream bitrate, kbit/s.
    pub bitrate_kbps: u64,
    /// Largest block payload, KiB.
    pub block_kib: u64,
    /// Clubs C.
    pub clubs: u16,
    /// Fraction of viewers that leave (and of new ones that join) per minute.
    pub churn_per_min: f64,
    /// Fraction of viewers that corrupt every block they send.
    pub hostile: f64,
    /// RNG seed; a run is a pure function of its config.
    pub seed: u64,
    /// Probability that a frame needs a retransmission.
    pub loss: f64,
    /// Origin egress budget (seeding plus gap fill), kbit/s.
    pub origin_budget_kbps: u64,
    /// Mean upload capacity as a multiple of the bitrate.
    pub upload_mean_x: f64,
    /// Fraction of viewers that are free riders.
    pub free_rider_frac: f64,
    /// Upload capacity of a free rider as a multiple of the bitrate.
    pub free_rider_x: f64,
    /// Smallest access latency, ms (a path's round trip is the sum of its two
    /// ends', its one-way delay half that).
    pub latency_min_ms: u64,
    /// Largest access latency, ms.
    pub latency_max_ms: u64,
    /// Fraction of viewers that state their upload capacity when they join.
    /// The others are planned at `DEFAULT_CAPACITY_PCT` of the bitrate, as the
    /// server plans a browser whose page sets no `upload_kbps`, until their
    /// upload probe or their bids say otherwise.
    pub stated_upload: f64,
    /// Viewers that state no upload run the player's upload probe
    /// (`clubcast_protocol::probe`): before they join, their upload carries
    /// the probe to the server for up to `PROBE_MAX_MS`, and the server plans
    /// them on the rate it read (their bids may still lower it).
    pub upload_probe: bool,
    /// Error of a probe's reading: each viewer's reads its upload times
    /// 1 + u, u uniform in [-e, e] (drawn per viewer from the seed).
    pub probe_error: f64,
    /// Seeds each block is pushed to by the server (k).
    pub seeds_k: u8,
    /// In-club download and upload links per member.
    pub in_club_links: u8,
    /// Neighbours per peer in `mesh-pull`.
    pub mesh_neighbours: usize,
    /// Threads of the `clubs` driver (0: one per core from 300 peers up,
    /// else one). Results do not depend on it, so the report leaves it out of
    /// the config and states it in [`crate::metrics::Report::threads`].
    #[serde(skip)]
    pub threads: usize,
    /// The `clubs` driver runs each window's events in time order rather
    /// than viewer by viewer. Slower, with the same results (a test checks
    /// it); not a CLI option.
    #[serde(skip)]
    pub time_order: bool,
    /// Clubs mode: every server event ends a window, even those that may
    /// run after it ([`crate::clubs`]). Slower, with the same results (a
    /// test checks it); not a CLI option.
    #[serde(skip)]
    pub cut_at_server_events: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Clubs,
            peers: 1000,
            seconds: 60,
            bitrate_kbps: 2000,
            block_kib: clubcast_protocol::block::DEFAULT_BLOCK_KIB as u64,
            clubs: 8,
            churn_per_min: 0.0,
            hostile: 0.0,
            seed: 1,
            loss: 0.01,
            origin_budget_kbps: 0,
            upload_mean_x: 1.5,
            free_rider_frac: 0.2,
            free_rider_x: 0.2,
            latency_min_ms: 10,
            latency_max_ms: 100,
            stated_upload: 1.0,
            upload_probe: true,
            probe_error: 0.2,
            seeds_k: 2,
            in_club_links: 2,
            mesh_neighbours: 8,
            threads: 0,
            time_order: false,
            cut_at_server_events: false,
        }
    }
}

impl Config {
    /// Fills derived defaults (an origin budget of 0 means 3 × bitrate:
    /// the seeder's 2 × plus 1 × for gap fill) and
    /// rejects values the model cannot run.
    pub fn validated(mut self) -> Result<Self, SimError> {
        if self.origin_budget_kbps == 0 {
            self.origin_budget_kbps = 3 * self.bitrate_kbps;
        }
        let bad = |what: &str| Err(SimError::InvalidConfig(what.to_string()));
        if self.peers == 0 || self.peers > 1_000_000 {
            return bad("--peers must be 1..=1000000");
        }
        if self.seconds == 0 || self.seconds > 3600 {
            return bad("--seconds must be 1..=3600");
        }
        if self.bitrate_kbps == 0 || self.block_kib == 0 || self.block_kib > 63 {
            return bad("--bitrate-kbps must be > 0 and --block-kib 1..=63");
        }
        if self.clubs < 2 || self.clubs > clubcast_protocol::club::MAX_CLUBS {
            return bad("--clubs must be 2..=64");
        }
        for (v, name) in [
            (self.hostile, "--hostile"),
            (self.loss, "--loss"),
            (self.free_rider_frac, "--free-rider-frac"),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(&format!("{name} must be in [0, 1)"));
            }
        }
        if !(0.0..=1.0).contains(&self.stated_upload) {
            return bad("--stated-upload must be in [0, 1]");
        }
        if !(0.0..1.0).contains(&self.probe_error) {
            return bad("--probe-error must be in [0, 1)");
        }
        if !(0.0..=10.0).contains(&self.churn_per_min) {
            return bad("--churn-per-min must be in [0, 10]");
        }
        if self.upload_mean_x <= 0.0 || self.free_rider_x < 0.0 {
            return bad("upload capacities must be positive");
        }
        if self.latency_min_ms > self.latency_max_ms {
            return bad("--latency-min-ms must not exceed --latency-max-ms");
        }
        if self.threads > MAX_THREADS {
            return bad(&format!("--threads must be 0..={MAX_THREADS}"));
        }
        if self.seeds_k == 0 || self.in_club_links == 0 || self.mesh_neighbours == 0 {
            return bad("--seeds-k, --in-club-links and --mesh-neighbours must be > 0");
        }
        Ok(self)
    }

    /// Threads the `clubs` driver runs.
    pub fn threads(&self) -> usize {
        match self.threads {
            0 if self.peers >= AUTO_THREADS_FROM_PEERS => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_THREADS),
            0 => 1,
            n => n,
        }
    }

    /// Bytes per second of the stream.
    pub fn byte_rate(&self) -> f64 {
        self.bitrate_kbps as f64 * 1000.0 / 8.0
    }
}
