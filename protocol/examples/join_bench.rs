//! Times [`Membership`] joins and leaves at swarm scale.
//!
//! Joins `peers` viewers (default 10,000) into one stream, then runs `churn`
//! (default 1,000) leave-then-join pairs, and prints per-op times and the number
//! of [`LinkChange`]s each phase produced. Capacities are drawn so that about one
//! peer in five is a leaf, as behind a slow uplink.
//!
//! ```text
//! cargo run --release -p clubcast-protocol --example join_bench -- [peers] [churn] [seed]
//! ```
//!
//! [`LinkChange`]: clubcast_protocol::club::LinkChange

use std::time::{Duration, Instant};

use clubcast_protocol::club::{ClubConfig, Membership};
use clubcast_protocol::signal::PeerId;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .map(|a| a.parse().expect("arguments are whole numbers"))
        .unwrap_or(default)
}

/// Upload capacity in % of the bitrate: 20 % leaves (40–99 %), the rest 100–400 %.
fn capacity(rng: &mut impl RngCore) -> u32 {
    let r = rng.next_u32();
    if r % 5 == 0 {
        40 + (r >> 8) % 60
    } else {
        100 + (r >> 8) % 301
    }
}

struct Phase {
    name: &'static str,
    times: Vec<Duration>,
    changes: usize,
}

impl Phase {
    fn new(name: &'static str) -> Self {
        Phase {
            name,
            times: Vec::new(),
            changes: 0,
        }
    }

    fn row(&mut self) -> String {
        self.times.sort_unstable();
        let n = self.times.len();
        let pct = |p: usize| self.times[(n * p / 100).min(n - 1)];
        let total: Duration = self.times.iter().sum();
        format!(
            "| {} | {} | {:.3} | {:.1} | {:.1} | {:.1} | {} |",
            self.name,
            n,
            total.as_secs_f64(),
            pct(50).as_secs_f64() * 1e6,
            pct(99).as_secs_f64() * 1e6,
            self.times[n - 1].as_secs_f64() * 1e6,
            self.changes,
        )
    }
}

fn main() {
    let peers = arg(1, 10_000);
    let churn = arg(2, 1_000);
    let mut rng = ChaCha8Rng::seed_from_u64(arg(3, 1));
    let cfg = ClubConfig::default();
    let mut m = Membership::new(cfg);

    let mut joins = Phase::new("join");
    let mut alive: Vec<PeerId> = Vec::new();
    for p in 1..=peers {
        let cap = capacity(&mut rng);
        let t = Instant::now();
        let j = m.join_with_capacity(p, true, cap, &mut rng);
        joins.times.push(t.elapsed());
        joins.changes += j.links.len() + j.changes.len();
        alive.push(p);
    }

    let mut leaves = Phase::new("churn leave");
    let mut rejoins = Phase::new("churn join");
    for next in peers + 1..=peers + churn {
        let i = (rng.next_u64() % alive.len() as u64) as usize;
        let gone = alive.swap_remove(i);
        let t = Instant::now();
        let changes = m.leave(gone, &mut rng);
        leaves.times.push(t.elapsed());
        leaves.changes += changes.len();

        let cap = capacity(&mut rng);
        let t = Instant::now();
        let j = m.join_with_capacity(next, true, cap, &mut rng);
        rejoins.times.push(t.elapsed());
        rejoins.changes += j.links.len() + j.changes.len();
        alive.push(next);
    }

    println!(
        "{peers} peers, {churn} churn ops, {} clubs, m = {}",
        cfg.clubs, cfg.clubs_per_peer
    );
    println!();
    println!("| phase | ops | total s | p50 µs | p99 µs | max µs | link changes |");
    println!("|---|---|---|---|---|---|---|");
    for phase in [&mut joins, &mut leaves, &mut rejoins] {
        println!("{}", phase.row());
    }
}
