//! The server's clock as seen from the browser.
//!
//! Block deadlines and latency compare the server's ingest wall clock with
//! "now", so the core runs on the server's clock: `now = local + offset`.
//! `local` is `performance.now()` pinned to the Unix epoch once at start, so it
//! never jumps with the system clock. Each welcome or pong carries
//! `server_time_ms`; with the round trip `rtt` of its request, one sample is
//! `offset = server_time + rtt / 2 - local_at_receipt`. Of the last
//! [`MAX_SAMPLES`] samples, the one with the smallest round trip wins (its
//! error is at most half of that round trip).

use std::collections::VecDeque;

/// Offset samples remembered.
pub const MAX_SAMPLES: usize = 8;

/// Offset from the local clock to the server's, from timed request/answer pairs.
#[derive(Debug, Default)]
pub struct ServerClock {
    /// `(rtt_ms, offset_ms)`, newest last.
    samples: VecDeque<(f64, f64)>,
}

impl ServerClock {
    /// A clock with no samples (offset 0 until the first one).
    pub fn new() -> Self {
        Self::default()
    }

    /// A request sent at local `sent_ms` was answered with `server_ms`,
    /// received at local `received_ms`.
    pub fn handle_sample(&mut self, sent_ms: f64, server_ms: f64, received_ms: f64) {
        let rtt = (received_ms - sent_ms).max(0.0);
        if self.samples.len() >= MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples
            .push_back((rtt, server_ms + rtt / 2.0 - received_ms));
    }

    /// Server minus local clock, ms.
    pub fn offset_ms(&self) -> f64 {
        self.samples
            .iter()
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map_or(0.0, |s| s.1)
    }

    /// Round trip of the sample in use, ms.
    pub fn rtt_ms(&self) -> Option<f64> {
        self.samples.iter().map(|s| s.0).min_by(f64::total_cmp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smallest_round_trip_wins() {
        let mut c = ServerClock::new();
        assert_eq!(c.offset_ms(), 0.0);
        // Server is 1000 ms ahead; a 100 ms round trip, symmetric.
        c.handle_sample(0.0, 1050.0, 100.0);
        assert_eq!(c.offset_ms(), 1000.0);
        // A slow, asymmetric answer does not displace it.
        c.handle_sample(200.0, 1300.0, 600.0);
        assert_eq!(c.offset_ms(), 1000.0);
        c.handle_sample(700.0, 1710.0, 720.0);
        assert_eq!(c.offset_ms(), 1000.0);
        assert_eq!(c.rtt_ms(), Some(20.0));
        for i in 0..MAX_SAMPLES {
            c.handle_sample(1000.0 + i as f64, 2500.0, 1040.0 + i as f64);
        }
        assert_eq!(c.rtt_ms(), Some(40.0));
    }
}
