//! What a run measured, under the metric names used everywhere in clubcast.

use clubcast_protocol::prefetch::{self, Depth};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::stream::{Stream, TARGET_LATENCY_MS};

/// Largest delay the histogram resolves, ms; later arrivals land in the last
/// bucket.
const MAX_DELAY_MS: usize = 120_000;
/// Viewers present shorter than this are left out of the upload statistics
/// (10 s: [`UploadPcts`] says so).
const MIN_UPLOAD_WINDOW_US: u64 = 10_000_000;

/// Three percentiles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Pcts {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// Two percentiles of per-peer upload, over the viewers present for at least
/// 10 s of the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UploadPcts {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Viewers measured. With none (a run shorter than 10 s), `p50` and `p99`
    /// are 0 and mean nothing; the table prints them as n/a.
    #[serde(default)]
    pub viewers: usize,
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The mode.
    pub mode: String,
    /// Bytes from peers ÷ all bytes received by viewers.
    pub p2p_ratio: f64,
    /// Origin bytes sent (seeding plus gap fill) ÷ (bitrate × duration).
    pub origin_egress_ratio: f64,
    /// Arrival wall time − ingest time over first arrivals, ms.
    pub block_delay_ms: Pcts,
    /// Fraction of (peer, block) present before the playback deadline.
    pub continuity: f64,
    /// Duplicate block bytes ÷ useful block bytes.
    pub dup_ratio: f64,
    /// Non-payload bytes ÷ payload bytes, over every frame sent.
    pub control_overhead: f64,
    /// Play events whose block differs from the original.
    pub corrupt_blocks_played: u64,
    /// Per-peer upload as a multiple of the bitrate.
    pub upload_x_bitrate: UploadPcts,
    /// Events processed.
    pub events: u64,
    /// Wall time of the run, s (noisy: shared machine).
    pub wall_seconds: f64,
    /// Peak resident memory of the process after the run, MiB (Linux VmHWM).
    pub max_rss_mib: f64,
    /// Threads the run used (the results do not depend on it).
    #[serde(default)]
    pub threads: usize,
    /// Viewers that ever joined.
    pub viewers: usize,
    /// Hostile viewers that ever joined.
    pub hostile_viewers: usize,
    /// Hostile viewers that were reported by ≥ 2 peers and kicked.
    pub hostile_kicked: usize,
    /// Honest viewers wrongly kicked.
    pub honest_kicked: usize,
    /// Blocks rejected by verification.
    pub blocks_rejected: u64,
    /// Blocks skipped by playback.
    pub blocks_skipped: u64,
    /// Gap fills served by the origin.
    pub gap_fills_ok: u64,
    /// Gap fills refused for lack of budget.
    pub gap_fills_denied: u64,
    /// Honest viewers with at least one eligible block that got none in time.
    pub stranded_viewers: usize,
    /// The config of the run.
    pub config: serde_json::Value,
}

/// What one viewer saw.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// When it joined, µs.
    pub join_us: u64,
    /// When it left, µs.
    pub leave_us: Option<u64>,
    /// First Play, µs: its startup.
    pub first_play_us: Option<u64>,
    /// Whether it is hostile.
    pub hostile: bool,
    /// Whether it was kicked.
    pub kicked: bool,
    /// Two words per 64 seqs, side by side so that an arrival touches one
    /// cache line: a bit per seq that arrived at all ([`ARRIVED`]) and one
    /// per seq that arrived before its deadline ([`ON_TIME`]).
    bits: Vec<u64>,
}

/// Word of [`Record::bits`] that says which seqs arrived.
const ARRIVED: usize = 0;
/// Word of [`Record::bits`] that says which seqs arrived on time.
const ON_TIME: usize = 1;

impl Record {
    /// Prefetches, at `depth`, what an arrival of block `seq` reads first:
    /// its fields, then the word of `seq` (see `clubcast_protocol::prefetch`).
    pub fn prefetch(&self, depth: Depth, seq: Option<u64>) {
        match (depth, seq) {
            (Depth::Struct, _) => prefetch::line(&self.bits),
            (Depth::Heap, Some(seq)) => prefetch::at(&self.bits, (seq / 64) as usize * 2),
            _ => {}
        }
    }

    /// Sets bit `seq` of the `which` words; returns whether it was clear.
    fn set(&mut self, which: usize, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize * 2 + which, seq % 64);
        let was = self.bits[w] >> b & 1 == 1;
        self.bits[w] |= 1 << b;
        !was
    }

    fn get(&self, which: usize, seq: u64) -> bool {
        self.bits[(seq / 64) as usize * 2 + which] >> (seq % 64) & 1 == 1
    }
}

/// Counts of block delays by millisecond, up to two minutes.
#[derive(Debug, Clone)]
pub struct DelayHist(Vec<u64>);

impl Default for DelayHist {
    fn default() -> Self {
        DelayHist(vec![0; MAX_DELAY_MS + 1])
    }
}

impl DelayHist {
    /// Counts one delay of `ms` (longer ones as the longest).
    pub fn note(&mut self, ms: u64) {
        self.0[(ms as usize).min(MAX_DELAY_MS)] += 1;
    }

    /// Adds the counts of `o`.
    pub fn add(&mut self, o: &DelayHist) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a += b;
        }
    }

    /// Delays counted.
    pub fn len(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `q` quantile, ms (0 if empty).
    pub fn pct(&self, q: f64) -> f64 {
        let total = self.len();
        if total == 0 {
            return 0.0;
        }
        let want = ((total as f64 * q).ceil() as u64).max(1);
        let mut acc = 0;
        for (ms, n) in self.0.iter().enumerate() {
            acc += n;
            if acc >= want {
                return ms as f64;
            }
        }
        MAX_DELAY_MS as f64
    }
}

/// The run-wide sums a driver accumulates; a parallel driver keeps one per
/// thread and adds them up ([`Tally::add`]).
#[derive(Debug, Default)]
pub struct Tally {
    delay_hist: DelayHist,
    /// Payload bytes of first arrivals from peers.
    pub from_peers: u64,
    /// Payload bytes of first arrivals from the server (seeder or origin).
    pub from_server: u64,
    /// Payload bytes of duplicate arrivals.
    pub dup_bytes: u64,
    /// Payload bytes of every frame sent.
    pub payload_sent: u64,
    /// Non-payload bytes of every frame sent.
    pub overhead_sent: u64,
    /// Plays of a block that differs from the original.
    pub corrupt_played: u64,
    /// Blocks rejected by verification.
    pub rejected: u64,
    /// Blocks skipped by playback.
    pub skipped: u64,
}

impl Tally {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &Tally) {
        self.delay_hist.add(&o.delay_hist);
        self.from_peers += o.from_peers;
        self.from_server += o.from_server;
        self.dup_bytes += o.dup_bytes;
        self.payload_sent += o.payload_sent;
        self.overhead_sent += o.overhead_sent;
        self.corrupt_played += o.corrupt_played;
        self.rejected += o.rejected;
        self.skipped += o.skipped;
    }

    /// A block reached the viewer of record `r`. Returns whether it was its
    /// first copy.
    pub fn arrival(
        &mut self,
        r: &mut Record,
        seq: u64,
        ingest_ms: u64,
        now_us: u64,
        from_server: bool,
        bytes: usize,
    ) -> bool {
        if !r.set(ARRIVED, seq) {
            self.dup_bytes += bytes as u64;
            return false;
        }
        let now_ms = now_us / 1000;
        if now_ms <= ingest_ms + TARGET_LATENCY_MS {
            r.set(ON_TIME, seq);
        }
        if !r.hostile {
            self.delay_hist.note(now_ms.saturating_sub(ingest_ms));
        }
        if from_server {
            self.from_server += bytes as u64;
        } else {
            self.from_peers += bytes as u64;
        }
        true
    }
}

/// Accumulates a run's measurements.
#[derive(Debug)]
pub struct Collector {
    /// Per viewer, by peer id (index 0 unused).
    pub recs: Vec<Record>,
    /// The run-wide sums.
    pub tally: Tally,
}

impl Collector {
    /// The records of `viewers` (ids 1..=n, index 0 unused) for a stream of
    /// `blocks` blocks.
    pub fn records(viewers: &[crate::population::Viewer], blocks: usize) -> Vec<Record> {
        let words = blocks.div_ceil(64).max(1);
        let mut recs = vec![Record::default()];
        recs.extend(viewers.iter().map(|v| Record {
            join_us: v.join_us,
            hostile: v.hostile,
            bits: vec![0; 2 * words],
            ..Record::default()
        }));
        recs
    }

    /// A collector for `viewers` (ids 1..=n) and a stream of `blocks` blocks.
    pub fn new(viewers: &[crate::population::Viewer], blocks: usize) -> Self {
        Collector {
            recs: Self::records(viewers, blocks),
            tally: Tally::default(),
        }
    }

    /// Viewer `id` started playing.
    pub fn played(&mut self, id: u64, now_us: u64) {
        self.recs[id as usize].first_play_us.get_or_insert(now_us);
    }

    /// Eligible and on-time (peer, block) pairs of viewer `id`: blocks cut
    /// after its startup whose deadline falls while it is present and before
    /// `end_us`.
    pub fn continuity_of(&self, id: usize, stream: &Stream, end_us: u64) -> (u64, u64) {
        let r = &self.recs[id];
        let Some(start) = r.first_play_us else {
            return (0, 0);
        };
        let until = r.leave_us.unwrap_or(u64::MAX).min(end_us);
        let mut eligible = 0;
        let mut ok = 0;
        let first = stream.ingest_us.partition_point(|t| *t < start);
        for (seq, &t) in stream.ingest_us.iter().enumerate().skip(first) {
            if t + TARGET_LATENCY_MS * 1000 > until {
                break;
            }
            eligible += 1;
            ok += u64::from(r.get(ON_TIME, seq as u64));
        }
        (eligible, ok)
    }

    /// Blocks viewer `id` never received among those cut after its startup and
    /// at least `settle_us` before `until_us` (and before it left).
    pub fn never_arrived(&self, id: usize, stream: &Stream, until_us: u64) -> Vec<u64> {
        let r = &self.recs[id];
        let Some(start) = r.first_play_us else {
            return Vec::new();
        };
        let until = r.leave_us.unwrap_or(u64::MAX).min(until_us);
        stream
            .ingest_us
            .iter()
            .enumerate()
            .filter(|(s, t)| **t >= start && **t <= until && !r.get(ARRIVED, *s as u64))
            .map(|(s, _)| s as u64)
            .collect()
    }

    /// The report. `origin_bytes` is everything the server sent; `uploads`
    /// is (bytes, present µs) per viewer.
    #[allow(clippy::too_many_arguments)]
    pub fn report(
        &self,
        cfg: &Config,
        stream: &Stream,
        end_us: u64,
        origin_bytes: u64,
        uploads: &[(u64, u64)],
        events: u64,
        gap_fills: (u64, u64),
    ) -> Report {
        let (mut eligible, mut ok, mut stranded) = (0, 0, 0);
        for id in 1..self.recs.len() {
            if self.recs[id].hostile {
                continue;
            }
            let (e, o) = self.continuity_of(id, stream, end_us);
            eligible += e;
            ok += o;
            if e > 0 && o == 0 {
                stranded += 1;
            }
        }
        let bitrate_bps = cfg.bitrate_kbps as f64 * 1000.0;
        let mut ups: Vec<f64> = uploads
            .iter()
            .filter(|(_, us)| *us >= MIN_UPLOAD_WINDOW_US)
            .map(|(b, us)| *b as f64 * 8.0 / (bitrate_bps * *us as f64 / 1e6))
            .collect();
        ups.sort_by(f64::total_cmp);
        let upct = |q: f64| {
            if ups.is_empty() {
                0.0
            } else {
                ups[((ups.len() as f64 * q).ceil() as usize).clamp(1, ups.len()) - 1]
            }
        };
        let useful = self.tally.from_peers + self.tally.from_server;
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        Report {
            mode: cfg.mode.name().to_string(),
            p2p_ratio: ratio(self.tally.from_peers, useful),
            origin_egress_ratio: origin_bytes as f64 * 8.0 / (bitrate_bps * cfg.seconds as f64),
            block_delay_ms: Pcts {
                p50: self.tally.delay_hist.pct(0.50),
                p95: self.tally.delay_hist.pct(0.95),
                p99: self.tally.delay_hist.pct(0.99),
            },
            continuity: if eligible == 0 {
                0.0
            } else {
                ok as f64 / eligible as f64
            },
            dup_ratio: ratio(self.tally.dup_bytes, useful),
            control_overhead: ratio(self.tally.overhead_sent, self.tally.payload_sent),
            corrupt_blocks_played: self.tally.corrupt_played,
            upload_x_bitrate: UploadPcts {
                p50: upct(0.50),
                p99: upct(0.99),
                viewers: ups.len(),
            },
            events,
            wall_seconds: 0.0,
            max_rss_mib: 0.0,
            threads: 1,
            viewers: self.recs.len() - 1,
            hostile_viewers: self.recs.iter().filter(|r| r.hostile).count(),
            hostile_kicked: self.recs.iter().filter(|r| r.hostile && r.kicked).count(),
            honest_kicked: self.recs.iter().filter(|r| !r.hostile && r.kicked).count(),
            blocks_rejected: self.tally.rejected,
            blocks_skipped: self.tally.skipped,
            gap_fills_ok: gap_fills.0,
            gap_fills_denied: gap_fills.1,
            stranded_viewers: stranded,
            config: serde_json::to_value(cfg).unwrap_or_default(),
        }
    }
}
