//! The upload probe (`clubcast_protocol::probe`): before it joins, a viewer
//! whose page states no `upload_kbps` sends binary frames of
//! [`PROBE_CHUNK_BYTES`] on the signaling socket while the browser holds less
//! than [`PROBE_BUFFER_BYTES`] unsent, until [`PROBE_MAX_MS`] have passed or
//! [`MAX_PROBE_BYTES`] went out; then it joins. The server times the frames
//! and plans the viewer on the rate (the welcome's `upload_probe_kbps`).
//! The frames are paced by [`PROBE_PUMP_MS`] timer calls, so a fast uplink
//! is done within a few tens of ms.

use clubcast_protocol::probe::{
    MAX_PROBE_BYTES, PROBE_BUFFER_BYTES, PROBE_CHUNK_BYTES, PROBE_MAX_MS,
};
use serde_json::{json, Value};

use crate::ws::SignalSocket;

/// Interval between two rounds of queuing probe frames, ms.
pub const PROBE_PUMP_MS: u64 = 4;

/// The probe of one signaling connection.
pub(super) struct UploadProbe {
    started: f64,
    sent: u32,
    chunk: Vec<u8>,
}

/// What the last probe did, for the stats.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ProbeRecord {
    /// Bytes it sent.
    pub(super) bytes: u32,
    /// How long it ran, ms.
    pub(super) ms: f64,
    /// What the server measured, kbit/s (`None`: at or above the cap, or not
    /// timed).
    pub(super) kbps: Option<u32>,
    /// Probes run (one per signaling connection that joined with one).
    pub(super) count: u32,
}

impl ProbeRecord {
    pub(super) fn stats(&self) -> Value {
        if self.count == 0 {
            return Value::Null;
        }
        json!({
            "bytes": self.bytes,
            "ms": self.ms.round(),
            "upload_kbps": self.kbps,
            "count": self.count,
        })
    }
}

impl UploadProbe {
    /// A probe starting at `perf` (`performance.now()`).
    pub(super) fn new(perf: f64) -> Self {
        UploadProbe {
            started: perf,
            sent: 0,
            chunk: vec![0; PROBE_CHUNK_BYTES as usize],
        }
    }

    /// Queues frames while the socket holds little; returns whether the
    /// probe is over (its time or its bytes are up, or the socket refused).
    pub(super) fn pump(&mut self, socket: &SignalSocket, perf: f64) -> bool {
        loop {
            if perf - self.started >= PROBE_MAX_MS as f64 || self.sent >= MAX_PROBE_BYTES {
                return true;
            }
            if socket.buffered_amount() >= PROBE_BUFFER_BYTES {
                return false;
            }
            if socket.send_bytes(&self.chunk).is_err() {
                return true;
            }
            self.sent += PROBE_CHUNK_BYTES;
        }
    }

    /// What it did, ending at `perf`.
    pub(super) fn record(&self, perf: f64, count: u32) -> ProbeRecord {
        ProbeRecord {
            bytes: self.sent,
            ms: perf - self.started,
            kbps: None,
            count,
        }
    }
}
