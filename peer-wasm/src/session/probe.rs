//! The upload probe (`clubcast_protocol::probe`): before it joins, a viewer
//! whose page states no `upload_kbps` sends binary frames of
//! [`PROBE_CHUNK_BYTES`] on the signaling socket while the browser holds less
//! than [`PROBE_BUFFER_BYTES`] unsent, until [`PROBE_MAX_MS`] have passed or
//! [`MAX_PROBE_BYTES`] went out; once what it queued has left, it joins (the
//! join then carries a clean round trip for the clock). The server times the
//! frames and plans the viewer on the rate (the welcome's
//! `upload_probe_kbps`). Frames are queued every [`PROBE_PUMP_MS`]; if the
//! socket runs dry in between, the frames leave as fast as the player queues
//! them and the rate would be the player's: the probe stops there and the
//! join says `probe_limited` (an uplink that fast is past any plan, so a
//! fast uplink costs the join one or two rounds). A drain that takes longer
//! than [`PROBE_DRAIN_MAX_MS`] is not waited for.

use clubcast_protocol::probe::{
    MAX_PROBE_BYTES, PROBE_BUFFER_BYTES, PROBE_CHUNK_BYTES, PROBE_MAX_MS,
};
use serde_json::{json, Value};

use crate::ws::SignalSocket;

/// Interval between two rounds of queuing probe frames, ms.
pub const PROBE_PUMP_MS: u64 = 4;
/// Longest the join waits for the probe's last frames to leave, ms.
pub const PROBE_DRAIN_MAX_MS: f64 = 2_000.0;

/// The probe of one signaling connection.
pub(super) struct UploadProbe {
    started: f64,
    sent: u32,
    chunk: Vec<u8>,
    /// When it stopped queuing frames (its time or bytes were up).
    stopped: Option<f64>,
    /// The socket was found empty after frames were queued.
    starved: bool,
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
    /// Whether it ran dry (the rate was the player's, not the uplink's).
    pub(super) limited: bool,
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
            "limited": self.limited,
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
            stopped: None,
            starved: false,
        }
    }

    /// Queues frames while the socket holds little, then waits for them to
    /// leave; returns whether the join may go (the probe's frames have left,
    /// the drain took too long, or the socket refused).
    pub(super) fn pump(&mut self, socket: &SignalSocket, perf: f64) -> bool {
        let buffered = socket.buffered_amount();
        if let Some(at) = self.stopped {
            return buffered == 0 || perf - at > PROBE_DRAIN_MAX_MS;
        }
        if self.sent > 0 && buffered == 0 {
            // It ran dry: the uplink outpaces the player, so the rate would
            // be the player's. Nothing more to learn; join now.
            self.starved = true;
            self.stopped = Some(perf);
            return true;
        }
        loop {
            if perf - self.started >= PROBE_MAX_MS as f64 || self.sent >= MAX_PROBE_BYTES {
                self.stopped = Some(perf);
                return socket.buffered_amount() == 0;
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
            limited: self.starved,
        }
    }
}
