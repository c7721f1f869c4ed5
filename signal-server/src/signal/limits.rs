//! Per-connection limits: a token bucket for message rate and an offence count.

use std::time::Instant;

/// Messages per second a connection may send on average, and the burst it may
/// save up. Over it, messages are refused with `rate_limited`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(per_sec: u32, burst: u32, now: Instant) -> Self {
        TokenBucket {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Whether the bucket would be full at `now`: a client that has been
    /// quiet that long can be forgotten and started again full.
    pub(crate) fn full_at(&self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + dt * self.per_sec >= self.burst
    }

    /// Seconds until the next token, rounded up (at least 1).
    pub(crate) fn wait_secs(&self) -> u64 {
        if self.per_sec <= 0.0 {
            return 1;
        }
        (((1.0 - self.tokens).max(0.0) / self.per_sec).ceil() as u64).max(1)
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts protocol violations; the connection closes at `max_total` over its
/// life or `max_in_a_row` without a good message in between.
#[derive(Debug)]
pub(crate) struct Offences {
    total: u32,
    in_a_row: u32,
    max_total: u32,
    max_in_a_row: u32,
}

impl Offences {
    /// No offences yet.
    pub(crate) fn new(max_total: u32, max_in_a_row: u32) -> Self {
        Offences {
            total: 0,
            in_a_row: 0,
            max_total,
            max_in_a_row,
        }
    }

    /// Records an offence; true if the connection must now close.
    pub(crate) fn offend(&mut self) -> bool {
        self.total += 1;
        self.in_a_row += 1;
        self.total >= self.max_total || self.in_a_row >= self.max_in_a_row
    }

    /// Records a good message.
    pub(crate) fn good(&mut self) {
        self.in_a_row = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let t = Instant::now();
        let mut b = TokenBucket::new(10, 5, t);
        assert!((0..5).all(|_| b.take(t)));
        assert!(!b.take(t));
        assert!(b.take(t + Duration::from_millis(100)));
        assert!(!b.take(t + Duration::from_millis(100)));
    }

    #[test]
    fn offences_close_in_a_row_or_in_total() {
        let mut o = Offences::new(5, 3);
        assert!(!o.offend());
        assert!(!o.offend());
        assert!(o.offend());
        let mut o = Offences::new(5, 3);
        for _ in 0..4 {
            assert!(!o.offend());
            o.good();
        }
        assert!(o.offend());
    }
}
