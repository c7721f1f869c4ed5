//! `server-only` baseline: the origin sends every block to every viewer.
//!
//! The origin is a CDN with unlimited egress; a block reaches a viewer after the
//! one-way delay, its transfer at the viewer's download rate and, with
//! probability `--loss`, a retransmission. Nothing is relayed, so there is no
//! event queue: each (viewer, block) arrival is computed directly.

use clubcast_protocol::wire::Frame;

use crate::config::Config;
use crate::metrics::Collector;
use crate::net::Wire;
use crate::population::{Viewer, DOWNLOAD_X};
use crate::stream::Stream;
use crate::Run;

/// Runs the baseline.
pub fn run(cfg: &Config, viewers: &[Viewer], stream: Stream) -> Run {
    let mut wire = Wire::new(viewers, cfg.loss, cfg.seed);
    let mut metrics = Collector::new(viewers, stream.len());
    let end_us = stream.end_us + 2_000_000;
    let down_bps = cfg.bitrate_kbps * 1000 * DOWNLOAD_X;
    let mut origin_bytes = 0u64;
    let mut events = 0u64;
    for (seq, block) in stream.blocks.iter().enumerate() {
        let cut = stream.ingest_us[seq];
        let frame = Frame::Block(block.clone());
        let len = frame.encoded_len();
        let xfer = (len as u64 * 8 * 1_000_000).div_ceil(down_bps);
        for (i, v) in viewers.iter().enumerate() {
            let id = i as u64 + 1;
            // Viewers get the stream from their arrival (after a request RTT).
            let ready = v.join_us + wire.rtt(id, 0);
            if ready > cut || v.leave_us.is_some_and(|l| l <= cut) {
                continue;
            }
            let at = cut + wire.owd(0, id) + xfer + wire.loss_delay(0, id);
            if v.leave_us.is_some_and(|l| l <= at) {
                continue;
            }
            events += 1;
            origin_bytes += len as u64;
            metrics.tally.payload_sent += block.payload.len() as u64;
            metrics.tally.overhead_sent += frame.overhead_len() as u64;
            metrics.played(id, at);
            metrics.tally.arrival(
                &mut metrics.recs[id as usize],
                seq as u64,
                block.header.ingest_time_ms,
                at,
                true,
                block.payload.len(),
            );
        }
    }
    for (i, v) in viewers.iter().enumerate() {
        metrics.recs[i + 1].leave_us = v.leave_us;
    }
    let uploads: Vec<(u64, u64)> = viewers.iter().map(|_| (0, u64::MAX)).collect();
    let report = metrics.report(cfg, &stream, end_us, origin_bytes, &uploads, events, (0, 0));
    Run {
        report,
        metrics,
        stream,
        end_us,
    }
}
