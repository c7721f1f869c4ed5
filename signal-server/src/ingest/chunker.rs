//! Cuts fragments into blocks and publishes them.
//!
//! A block never spans two fragments: each fragment becomes
//! `ceil(len / block_bytes)` blocks ([`cut`]), the first flagged `FRAGMENT_START` (and
//! `KEYFRAME` when the fragment starts with a sync sample). On-demand uploads
//! ([`crate::vod`]) cut their fragments the same way. Every block of a
//! fragment carries the fragment's media time, so a player can map blocks to
//! presentation time. Each fragment also moves the stream's timeline end
//! ([`crate::stream::Stream::timeline_end`]) to where its reference track's samples end.
//! Before its blocks are published, the stream's progress is saved to the data
//! dir ([`crate::resume`]).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clubcast_protocol::block::{BlockFlags, MAX_PAYLOAD};

use super::fmp4::Fragment;
use crate::store::StoredBlock;
use crate::stream::{PublishGuard, StreamError};

/// Server wall clock, Unix ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Smallest block payload: below this the 94-byte block overhead and one
/// signature per block dominate.
pub const MIN_BLOCK_BYTES: usize = 1024;

/// Block payload size actually used for a requested size: clamped to
/// [`MIN_BLOCK_BYTES`]..=[`MAX_PAYLOAD`].
pub fn clamp_block_bytes(block_bytes: usize) -> usize {
    block_bytes.clamp(MIN_BLOCK_BYTES, MAX_PAYLOAD)
}

/// How many blocks of `size` (already clamped) a fragment of `len` bytes
/// becomes.
pub fn block_count(len: usize, size: usize) -> usize {
    len.div_ceil(size.max(1))
}

/// The blocks `frag` is cut into, each block's flags and payload: payloads of
/// `size` bytes (already clamped, see [`clamp_block_bytes`]), the last one
/// shorter; the first flagged `FRAGMENT_START`, and `KEYFRAME` as well when
/// the fragment starts with a sync sample. The payloads share the
/// fragment's bytes.
pub fn cut(frag: &Fragment, size: usize) -> impl Iterator<Item = (BlockFlags, Bytes)> + '_ {
    let size = size.max(1);
    let first = if frag.keyframe {
        BlockFlags::FRAGMENT_START.union(BlockFlags::KEYFRAME)
    } else {
        BlockFlags::FRAGMENT_START
    };
    (0..frag.bytes.len()).step_by(size).map(move |off| {
        let end = (off + size).min(frag.bytes.len());
        let flags = if off == 0 { first } else { BlockFlags::empty() };
        (flags, frag.bytes.slice(off..end))
    })
}

/// Publishes `frag` as blocks of at most `block_bytes`; returns them.
pub fn publish_fragment(
    guard: &PublishGuard,
    frag: &Fragment,
    block_bytes: usize,
) -> Result<Vec<Arc<StoredBlock>>, StreamError> {
    let size = clamp_block_bytes(block_bytes);
    let now = now_ms();
    let count = block_count(frag.bytes.len(), size);
    // Where the reference track's samples end. A fragment without them (an
    // audio tail after the video ended) leaves the end there: a publisher that
    // comes back overlaps the tail's audio, which MSE splices, rather than
    // leave a gap in the video, at which playback would stop.
    let end = frag
        .duration
        .map(|d| (frag.media_time.saturating_add(d), frag.timescale));
    // Saved first, so that a restart never numbers a block twice.
    guard.stream().save_progress(count as u64, end);
    let mut out = Vec::with_capacity(count);
    for (flags, payload) in cut(frag, size) {
        out.push(guard.publish(flags, frag.media_time, now, payload)?);
    }
    if let Some((end, timescale)) = end {
        guard.stream().set_timeline_end(end, timescale);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{StoreConfig, Streams};

    #[test]
    fn fragments_become_blocks_that_never_span_two() {
        let streams = Streams::new(
            None,
            StoreConfig {
                store_seconds: 60,
                max_bytes: usize::MAX,
            },
        );
        let s = streams.get_or_create("t").expect("valid name");
        let guard = s.claim().expect("free");
        for (i, len) in [5000usize, 4096, 1].into_iter().enumerate() {
            let frag = Fragment {
                bytes: Bytes::from(vec![i as u8; len]),
                media_time: i as u64 * 1000,
                timescale: 1000,
                duration: None,
                keyframe: i != 2,
                tracks: Vec::new(),
                sequence_offset: None,
            };
            let blocks = publish_fragment(&guard, &frag, 2048).expect("publish");
            assert_eq!(blocks.len(), len.div_ceil(2048));
            let first = blocks[0].block.header().flags;
            assert!(first.contains(BlockFlags::FRAGMENT_START));
            assert_eq!(first.contains(BlockFlags::KEYFRAME), i != 2);
            assert!(blocks[1..]
                .iter()
                .all(|b| b.block.header().flags == BlockFlags::empty()));
            assert!(blocks
                .iter()
                .all(|b| b.block.header().media_time == i as u64 * 1000));
            let joined: Vec<u8> = blocks
                .iter()
                .flat_map(|b| b.block.payload().to_vec())
                .collect();
            assert_eq!(joined, frag.bytes.to_vec());
        }
    }

    #[test]
    fn block_size_is_clamped_to_what_a_block_can_carry() {
        assert_eq!(clamp_block_bytes(0), MIN_BLOCK_BYTES);
        assert_eq!(clamp_block_bytes(16 * 1024), 16 * 1024);
        assert_eq!(clamp_block_bytes(usize::MAX), MAX_PAYLOAD);
        let streams = Streams::new(
            None,
            StoreConfig {
                store_seconds: 60,
                max_bytes: usize::MAX,
            },
        );
        let s = streams.get_or_create("big").expect("valid name");
        let guard = s.claim().expect("free");
        let frag = Fragment {
            bytes: Bytes::from(vec![7; 3 * MAX_PAYLOAD + 1]),
            media_time: 0,
            timescale: 1000,
            duration: None,
            keyframe: true,
            tracks: Vec::new(),
            sequence_offset: None,
        };
        let blocks = publish_fragment(&guard, &frag, 1 << 20).expect("publish");
        assert_eq!(blocks.len(), 4);
        assert!(blocks
            .iter()
            .all(|b| b.block.payload().len() <= MAX_PAYLOAD));
    }
}
