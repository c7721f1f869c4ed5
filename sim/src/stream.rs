//! The live stream: 1 s fragments cut into blocks as their bytes arrive.

use clubcast_protocol::block::{Block, BlockFlags, BLOCK_OVERHEAD};
use clubcast_protocol::wire::Frame;

use crate::config::Config;
use crate::verify::{corrupt, SimVerifier};

/// Where the simulated clock starts, µs (an arbitrary epoch well above 0 so
/// that no deadline arithmetic saturates).
pub const EPOCH_US: u64 = 1_000_000_000;
/// The stream starts this long after the first viewers arrive, µs.
pub const LOBBY_US: u64 = 2_000_000;
/// Length of one fragment, µs.
pub const FRAGMENT_US: u64 = 1_000_000;
/// The player's target latency (the protocol's default), ms.
pub const TARGET_LATENCY_MS: u64 = 1500;

/// Every block of the run, cut in advance.
#[derive(Debug)]
pub struct Stream {
    /// Blocks by seq.
    pub blocks: Vec<Block>,
    /// When each block was cut (its ingest time), µs.
    pub ingest_us: Vec<u64>,
    /// When the first block is cut, µs.
    pub start_us: u64,
    /// When the last block is cut, µs.
    pub end_us: u64,
}

impl Stream {
    /// Cuts `cfg.seconds` of stream: each 1 s fragment is `bitrate / 8` bytes,
    /// cut into blocks of at most `block_kib` (the last one short); a block is
    /// cut when its last byte has arrived at the bitrate.
    pub fn new(cfg: &Config, verifier: &SimVerifier) -> Self {
        let start_us = EPOCH_US + LOBBY_US;
        let frag_bytes = (cfg.byte_rate() as u64).max(1);
        let block_bytes = cfg.block_kib * 1024;
        let mut blocks = Vec::new();
        let mut ingest_us = Vec::new();
        for f in 0..cfg.seconds {
            let t0 = start_us + f * FRAGMENT_US;
            let mut off = 0;
            while off < frag_bytes {
                let len = block_bytes.min(frag_bytes - off);
                off += len;
                let at = t0 + off * FRAGMENT_US / frag_bytes;
                let flags = if blocks.len() as u64 == 0 || off == len {
                    BlockFlags::FRAGMENT_START.union(BlockFlags::KEYFRAME)
                } else {
                    BlockFlags::empty()
                };
                let seq = blocks.len() as u64;
                blocks.push(verifier.block(seq, flags, at / 1000, len as usize));
                ingest_us.push(at);
            }
        }
        let end_us = *ingest_us.last().unwrap_or(&start_us);
        Stream {
            blocks,
            ingest_us,
            start_us,
            end_us,
        }
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the stream has no blocks.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Bytes of block `seq` on the wire (payload plus header and signature).
    pub fn wire_len(&self, seq: u64) -> usize {
        self.blocks[seq as usize].payload.len() + BLOCK_OVERHEAD
    }

    /// Bits of the largest block on the wire: one gap-fill grant unit.
    pub fn block_bits(&self) -> u64 {
        (0..self.len() as u64)
            .map(|s| self.wire_len(s))
            .max()
            .unwrap_or(BLOCK_OVERHEAD) as u64
            * 8
    }

    /// The newest block cut at or before `now_us`.
    pub fn edge(&self, now_us: u64) -> Option<u64> {
        let n = self.ingest_us.partition_point(|t| *t <= now_us);
        n.checked_sub(1).map(|s| s as u64)
    }

    /// Where a viewer joining at `now_us` starts: the newest fragment start at
    /// least the target latency behind the edge (0 before the stream starts).
    /// Returns `(start_seq, live_edge)`.
    pub fn start_for(&self, now_us: u64) -> (u64, u64) {
        let Some(edge) = self.edge(now_us) else {
            return (0, 0);
        };
        let limit = self.ingest_us[edge as usize].saturating_sub(TARGET_LATENCY_MS * 1000);
        let start = (0..=edge)
            .rev()
            .find(|s| {
                self.ingest_us[*s as usize] <= limit
                    && self.blocks[*s as usize]
                        .header
                        .flags
                        .contains(BlockFlags::FRAGMENT_START)
            })
            .unwrap_or(0);
        (start, edge)
    }
}

/// A frame in flight, kept small: the queues hold millions of them (a block
/// frame is about 150 bytes, this is 16).
///
/// A block travels as its seq. Every block a peer relays passed its
/// verifier, so it is the stream's own, or that block corrupted if the peer
/// is hostile; the receiver gets it rebuilt from the stream.
#[derive(Debug)]
pub(crate) enum Wired {
    Block { seq: u64, corrupt: bool },
    Have(u64),
    Want(u64),
    DontHave(u64),
    Other(Box<Frame>),
}

impl Wired {
    /// `frame` in flight from a peer that corrupts the blocks it relays if
    /// `hostile`.
    pub(crate) fn new(frame: Frame, hostile: bool) -> Self {
        match frame {
            Frame::Block(b) => Wired::Block {
                seq: b.header.seq,
                corrupt: hostile,
            },
            Frame::Have(seq) => Wired::Have(seq),
            Frame::Want(seq) => Wired::Want(seq),
            Frame::DontHave(seq) => Wired::DontHave(seq),
            f => Wired::Other(Box::new(f)),
        }
    }

    /// The frame as it arrives.
    pub(crate) fn into_frame(self, stream: &Stream) -> Frame {
        match self {
            Wired::Block { seq, corrupt: c } => {
                let b = &stream.blocks[seq as usize];
                Frame::Block(if c { corrupt(b) } else { b.clone() })
            }
            Wired::Have(seq) => Frame::Have(seq),
            Wired::Want(seq) => Frame::Want(seq),
            Wired::DontHave(seq) => Frame::DontHave(seq),
            Wired::Other(f) => *f,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queues hold millions of frames in flight: one must stay as small
    /// as a block's seq and a tag.
    #[test]
    fn a_frame_in_flight_takes_16_bytes() {
        assert_eq!(std::mem::size_of::<Wired>(), 16);
        assert!(std::mem::size_of::<Frame>() > 100, "what it saves");
    }
}
