//! Upload probe: how a viewer that does not know its upload has it measured
//! before the swarm plans on it.
//!
//! A page may state `upload_kbps` at join; most do not, and the server would
//! then plan the viewer at the cap ([`crate::club::DEFAULT_CAPACITY_PCT`]) and
//! correct the plan only once a bid shows the viewer falling behind
//! ([`crate::club::Membership::learn_capacity`]). A plan corrected that way
//! keeps the in-club links the guess gave, and in a swarm that starts at once
//! every wrong guess falls behind together. So the player measures first: on
//! the signaling socket, before its join, it sends binary frames of
//! [`PROBE_CHUNK_BYTES`] while the browser holds less than
//! [`PROBE_BUFFER_BYTES`] unsent, until [`PROBE_MAX_MS`] have passed or
//! [`MAX_PROBE_BYTES`] went out; once what it queued has left, it sends the
//! join. The server times the frames' arrival ([`ProbeMeter`]) and plans the
//! viewer on the measured rate as if it had stated it, except that its bids
//! may still lower it. A fast uplink is done in a few tens of ms; a slow one
//! costs the join at most [`PROBE_MAX_MS`] plus the time its last
//! [`PROBE_BUFFER_BYTES`] take ([`probe_span`]).
//!
//! If the socket runs dry while the probe runs (the player could not queue
//! frames as fast as they left: a fast uplink, or timers throttled in a
//! background tab), the rate would measure the player, not the uplink; the
//! probe stops there, the join says so (`probe_limited`), and the server
//! plans the viewer at the cap.
//!
//! The meter skips the first part of the transfer, while TCP's slow start
//! still ramps up, and takes the rate over the rest.

/// Longest the player sends the probe before it joins, ms.
pub const PROBE_MAX_MS: u64 = 500;
/// Most bytes a probe sends; the server refuses more before a join.
pub const MAX_PROBE_BYTES: u32 = 256 * 1024;
/// Bytes of one probe frame: small, so that the server's per-connection read
/// buffer stays small.
pub const PROBE_CHUNK_BYTES: u32 = 4 * 1024;
/// The player queues another probe frame while the browser holds less than
/// this unsent, topping it up every few ms: enough to keep an uplink of tens
/// of Mbit/s busy, and little for a slow one to drain before the join.
pub const PROBE_BUFFER_BYTES: u32 = 16 * 1024;
/// Share of the transfer's time, from its first frame, that the meter skips
/// while the sender's congestion window grows, %.
pub const PROBE_WARMUP_PCT: u64 = 25;
/// Fewest ms the measured part must span; a shorter one (a fast path that
/// delivered the probe at once) says only that the upload is above any plan.
pub const MIN_MEASURED_MS: u64 = 20;
/// Fewest bytes a probe that came at once must have for that to mean fast.
pub const MIN_FAST_BYTES: u64 = 64 * 1024;

/// What a probe costs an uplink of `up_bps` bit/s (what the simulator
/// models): it sends [`MAX_PROBE_BYTES`], or, if that takes longer than
/// [`PROBE_MAX_MS`], what leaves by then plus the [`PROBE_BUFFER_BYTES`]
/// still queued, which drain before the join; returns (bytes, ms until the
/// last has left).
pub fn probe_span(up_bps: u64) -> (u64, u64) {
    let up = up_bps.max(1);
    let ms_for = |bytes: u64| bytes.saturating_mul(8000) / up;
    let full = u64::from(MAX_PROBE_BYTES);
    if ms_for(full) <= PROBE_MAX_MS {
        return (full, ms_for(full));
    }
    let bytes = (up.saturating_mul(PROBE_MAX_MS) / 8000 + u64::from(PROBE_BUFFER_BYTES)).min(full);
    (bytes, ms_for(bytes))
}

/// What a probe measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measured {
    /// Upload, kbit/s.
    Kbps(u32),
    /// It came too fast to time: more than any cap (loopback, a LAN).
    Fast,
    /// The sender ran dry, so whatever was timed measured the sender, not
    /// its uplink (the client says so with its join; the meter never
    /// returns this).
    Limited,
    /// Too little arrived to say anything.
    Nothing,
}

/// Times the arrival of a probe's bytes. Feed it each chunk as it arrives
/// ([`ProbeMeter::feed`], ms on any monotonic clock), then ask
/// [`ProbeMeter::measure`].
#[derive(Debug, Clone, Default)]
pub struct ProbeMeter {
    /// (ms since the first chunk, bytes so far), one per chunk, bounded.
    samples: Vec<(u64, u64)>,
    first_ms: Option<u64>,
    bytes: u64,
}

/// Most samples a meter keeps: past it, every other one is dropped, which
/// keeps the time resolution a fraction of the transfer.
const MAX_SAMPLES: usize = 512;

impl ProbeMeter {
    /// A meter with nothing fed.
    pub fn new() -> Self {
        Self::default()
    }

    /// `len` bytes arrived at `now_ms`.
    pub fn feed(&mut self, now_ms: u64, len: usize) {
        if len == 0 {
            return;
        }
        let first = *self.first_ms.get_or_insert(now_ms);
        self.bytes = self.bytes.saturating_add(len as u64);
        if self.samples.len() >= MAX_SAMPLES {
            let mut i = 0;
            self.samples.retain(|_| {
                i += 1;
                i % 2 == 0
            });
        }
        self.samples
            .push((now_ms.saturating_sub(first), self.bytes));
    }

    /// Bytes fed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The rate over the chunks after the first [`PROBE_WARMUP_PCT`] of the
    /// transfer's time: from the first sample at or past that point to the
    /// last one. The bytes of the sample the span starts at were already
    /// there, so they are not counted.
    pub fn measure(&self) -> Measured {
        let Some(&(end_ms, total)) = self.samples.last() else {
            return Measured::Nothing;
        };
        if self.samples.len() < 2 {
            // One chunk: everything came at once.
            return if total >= MIN_FAST_BYTES {
                Measured::Fast
            } else {
                Measured::Nothing
            };
        }
        let from = end_ms * PROBE_WARMUP_PCT / 100;
        let &(start_ms, start_bytes) = self
            .samples
            .iter()
            .find(|(t, _)| *t >= from)
            .unwrap_or(&(end_ms, total));
        let span = end_ms - start_ms;
        if span < MIN_MEASURED_MS {
            return if total >= MIN_FAST_BYTES {
                Measured::Fast
            } else {
                Measured::Nothing
            };
        }
        // bytes × 8 / ms = kbit/s.
        let kbps = (total - start_bytes) * 8 / span;
        Measured::Kbps(u32::try_from(kbps).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` at `kbps` in `chunk`-byte pieces, starting at 1,000 ms,
    /// with the first `slow_ms` at a quarter of the rate (slow start).
    fn feed_at(m: &mut ProbeMeter, bytes: u64, kbps: u64, chunk: u64, slow_ms: u64) {
        let mut t_us = 1_000_000u64;
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.min(bytes - sent);
            let rate = if t_us - 1_000_000 < slow_ms * 1000 {
                kbps / 4
            } else {
                kbps
            };
            // bytes × 8 / kbit/s = ms; × 1000 = µs.
            t_us += n * 8 * 1000 / rate.max(1);
            sent += n;
            m.feed(t_us / 1000, n as usize);
        }
    }

    #[test]
    fn a_probe_ends_at_its_deadline_and_drains_or_at_its_bytes() {
        // 400 kbit/s: 25,000 bytes by 500 ms, then 16 KiB drain (328 ms).
        assert_eq!(probe_span(400_000), (41_384, 827));
        // 100 Mbit/s: all 256 KiB in 20 ms.
        assert_eq!(probe_span(100_000_000), (262_144, 20));
        // 4 Mbit/s: 250,000 + 16,384 bytes would pass the 256 KiB.
        assert_eq!(probe_span(4_000_000), (262_144, 524));
        assert!(probe_span(0).1 > PROBE_MAX_MS);
    }

    #[test]
    fn a_steady_upload_measures_its_rate() {
        for kbps in [400u64, 1_500, 3_000] {
            let mut m = ProbeMeter::new();
            feed_at(&mut m, kbps * 1000 / 8, kbps, 4096, 0);
            let Measured::Kbps(got) = m.measure() else {
                panic!("{kbps}: {:?}", m.measure());
            };
            let err = (i64::from(got) - kbps as i64).abs() as f64 / kbps as f64;
            assert!(err < 0.05, "{kbps} kbit/s measured {got}");
        }
    }

    #[test]
    fn the_ramp_of_slow_start_is_skipped() {
        // A quarter rate for the first 150 ms of a ~1 s transfer: the whole
        // transfer's mean would read about 11 % low.
        let mut m = ProbeMeter::new();
        feed_at(&mut m, 300_000, 3_000, 8192, 150);
        let Measured::Kbps(got) = m.measure() else {
            panic!("{:?}", m.measure());
        };
        assert!((2_850..=3_150).contains(&got), "measured {got}");
    }

    #[test]
    fn what_came_at_once_is_fast_and_too_little_is_nothing() {
        let mut m = ProbeMeter::new();
        assert_eq!(m.measure(), Measured::Nothing);
        m.feed(5, 600_000);
        assert_eq!(m.measure(), Measured::Fast);
        let mut m = ProbeMeter::new();
        for i in 0..100 {
            m.feed(10 + i / 50, 8192);
        }
        assert_eq!(m.measure(), Measured::Fast);
        let mut m = ProbeMeter::new();
        m.feed(5, 1_000);
        assert_eq!(m.measure(), Measured::Nothing);
        m.feed(6, 0);
        assert_eq!(m.bytes(), 1_000);
    }

    #[test]
    fn many_chunks_stay_bounded_and_still_measure() {
        let mut m = ProbeMeter::new();
        feed_at(&mut m, 1_000_000, 8_000, 256, 0);
        assert!(m.samples.len() <= MAX_SAMPLES);
        let Measured::Kbps(got) = m.measure() else {
            panic!("{:?}", m.measure());
        };
        assert!((7_600..=8_400).contains(&got), "measured {got}");
        assert_eq!(m.bytes(), 1_000_000);
    }
}
