//! Time as the core sees it: a plain number passed in by the driver.

use core::ops::{Add, Sub};

/// A point in time, in milliseconds on the stream's clock.
///
/// The core never reads a clock. Drivers pass `now` in the same timebase as the
/// server's wall clock (Unix milliseconds), so that it compares with a block's
/// `ingest_time_ms`. The browser driver corrects for its clock offset from the
/// server; the simulator runs every peer on one virtual clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    /// Milliseconds since the epoch of the timebase.
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// Milliseconds elapsed since `earlier`, or 0 if `earlier` is later.
    pub fn since(self, earlier: Time) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<u64> for Time {
    type Output = Time;
    fn add(self, ms: u64) -> Time {
        Time(self.0.saturating_add(ms))
    }
}

impl Sub<u64> for Time {
    type Output = Time;
    fn sub(self, ms: u64) -> Time {
        Time(self.0.saturating_sub(ms))
    }
}
