//! Who watches: capacities, latencies, hostility and the churn schedule.
//!
//! The population is drawn once from the seed, before any mode runs, so the
//! three modes see the same viewers arriving and leaving at the same moments.

use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::Config;
use crate::stream::{EPOCH_US, LOBBY_US};

/// Upload capacity of the server-side seeder, bit/s (a datacenter link).
pub const SEEDER_UP_BPS: u64 = 10_000_000_000;
/// Access latency of the server (seeder, origin, signaling), µs: its share
/// of a round trip ([`Viewer::access_us`]).
pub const SERVER_ACCESS_US: u64 = 5_000;
/// Download capacity of a viewer as a multiple of the bitrate (used for the
/// transfer time of origin fetches; peer-to-peer transfers are limited by the
/// sender's upload, see the crate doc).
pub const DOWNLOAD_X: u64 = 10;

/// One viewer, id `index + 1` (id 0 is the seeder).
#[derive(Debug, Clone, PartialEq)]
pub struct Viewer {
    /// Upload capacity, bit/s.
    pub up_bps: u64,
    /// Access latency, µs: a path's round trip is the sum of its two ends',
    /// its one-way delay half that.
    pub access_us: u64,
    /// When it arrives, µs.
    pub join_us: u64,
    /// When it leaves abruptly, µs, if before the end.
    pub leave_us: Option<u64>,
    /// Whether it corrupts every block it sends.
    pub hostile: bool,
}

/// Draws the viewers: `cfg.peers` arrive during the lobby before the stream
/// starts; then every second `churn_per_min / 60` of them leave at random
/// moments and as many new ones arrive.
pub fn draw(cfg: &Config, stream_end_us: u64) -> Vec<Viewer> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x9e37_79b9_7f4a_7c15);
    let bitrate = cfg.bitrate_kbps as f64 * 1000.0;
    // Non-free-riders share the rest of the mean, uniform in ±50 % around it.
    let fr = cfg.free_rider_frac;
    let rest_mean = ((cfg.upload_mean_x - fr * cfg.free_rider_x) / (1.0 - fr)).max(0.05);
    let new_viewer = |rng: &mut ChaCha8Rng, join_us: u64| {
        let x = if rng.gen::<f64>() < fr {
            cfg.free_rider_x
        } else {
            rest_mean * rng.gen_range(0.5..1.5)
        };
        Viewer {
            up_bps: ((x * bitrate) as u64).max(8_000),
            access_us: rng.gen_range(cfg.latency_min_ms..=cfg.latency_max_ms) * 1000,
            join_us,
            leave_us: None,
            hostile: rng.gen::<f64>() < cfg.hostile,
        }
    };
    let mut out: Vec<Viewer> = (0..cfg.peers)
        .map(|_| {
            let t = EPOCH_US + rng.gen_range(0..LOBBY_US * 3 / 4);
            new_viewer(&mut rng, t)
        })
        .collect();
    let mut alive: Vec<usize> = (0..out.len()).collect();
    let per_sec = cfg.churn_per_min * cfg.peers as f64 / 60.0;
    let mut carry = 0.0;
    let mut t = EPOCH_US + LOBBY_US;
    while per_sec > 0.0 && t + 1_000_000 <= stream_end_us {
        carry += per_sec;
        let mut arrived = Vec::new();
        while carry >= 1.0 && !alive.is_empty() {
            carry -= 1.0;
            let i = rng.gen_range(0..alive.len());
            let who = alive.swap_remove(i);
            out[who].leave_us = Some(t + rng.gen_range(0..1_000_000));
            let at = t + rng.gen_range(0..1_000_000);
            let v = new_viewer(&mut rng, at);
            arrived.push(out.len());
            out.push(v);
        }
        // Arrivals of this second may leave from the next one on.
        alive.extend(arrived);
        t += 1_000_000;
    }
    out
}
