//! The block store: a bounded ring buffer of a stream's newest signed blocks.
//!
//! Blocks go in strictly in seq order. The store keeps them for `max_age_ms` of
//! ingest time and at most `max_bytes`, whichever bound bites first, and answers
//! lookups with found, evicted (too old) or not yet produced — the three answers
//! the origin turns into 200, 404 and 425.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use clubcast_protocol::block::{BlockFlags, VerifiedBlock};

/// Hard cap on stored bytes per stream, whatever the configured age.
pub const MAX_STORE_BYTES: usize = 512 * 1024 * 1024;

/// A block as stored: the verified block and its encoded wire form, so that the
/// origin and the seeder serve it without encoding it again.
#[derive(Debug)]
pub struct StoredBlock {
    /// The block.
    pub block: VerifiedBlock,
    /// `block.block().encode()`, computed once.
    pub encoded: Bytes,
}

impl StoredBlock {
    /// Wraps a block, encoding it once.
    pub fn new(block: VerifiedBlock) -> Self {
        let encoded = block.block().encode();
        StoredBlock { block, encoded }
    }

    /// The block's seq.
    pub fn seq(&self) -> u64 {
        self.block.seq()
    }
}

/// The answer to a lookup.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The block is stored.
    Found(Arc<StoredBlock>),
    /// The block existed but has been evicted (or never will be stored).
    Evicted,
    /// The block has not been produced yet.
    NotYet,
}

/// A bounded, seq-ordered ring buffer of blocks.
#[derive(Debug)]
pub struct BlockStore {
    blocks: VecDeque<Arc<StoredBlock>>,
    bytes: usize,
    max_age_ms: u64,
    max_bytes: usize,
    /// The seq the next block must have; blocks before it that are not
    /// stored are evicted (or were never stored: a server restart).
    next: u64,
    /// Ingest time of the newest keyframe fragment start, ms.
    last_key_ms: Option<u64>,
    /// Ingest time between the two newest keyframe fragment starts, ms.
    key_interval_ms: Option<u64>,
}

/// Errors of [`BlockStore::push`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The block's seq is not the one after the newest stored block.
    #[error("block {got} is out of order, expected {expected}")]
    OutOfOrder {
        /// The seq expected next.
        expected: u64,
        /// The seq given.
        got: u64,
    },
}

impl BlockStore {
    /// An empty store keeping `max_age_ms` of blocks and at most `max_bytes`.
    pub fn new(max_age_ms: u64, max_bytes: usize) -> Self {
        BlockStore {
            blocks: VecDeque::new(),
            bytes: 0,
            max_age_ms,
            max_bytes: max_bytes.min(MAX_STORE_BYTES),
            next: 0,
            last_key_ms: None,
            key_interval_ms: None,
        }
    }

    /// The store, empty, of a stream whose next block is `seq`: every block
    /// before it reads as evicted.
    pub fn starting_at(mut self, seq: u64) -> Self {
        self.next = seq;
        self
    }

    /// Appends the next block and evicts what is over the bounds. The newest
    /// block is never evicted.
    pub fn push(&mut self, block: Arc<StoredBlock>) -> Result<(), StoreError> {
        if block.seq() != self.next {
            return Err(StoreError::OutOfOrder {
                expected: self.next,
                got: block.seq(),
            });
        }
        self.next = block.seq() + 1;
        let newest_time = block.block.header().ingest_time_ms;
        let key = BlockFlags::FRAGMENT_START.union(BlockFlags::KEYFRAME);
        if block.block.header().flags.contains(key) {
            if let Some(last) = self.last_key_ms {
                self.key_interval_ms = Some(newest_time.saturating_sub(last));
            }
            self.last_key_ms = Some(newest_time);
        }
        self.bytes += block.encoded.len();
        self.blocks.push_back(block);
        while self.blocks.len() > 1 {
            let oldest = &self.blocks[0];
            let too_old =
                newest_time.saturating_sub(oldest.block.header().ingest_time_ms) > self.max_age_ms;
            if !too_old && self.bytes <= self.max_bytes {
                break;
            }
            self.bytes -= oldest.encoded.len();
            self.blocks.pop_front();
        }
        Ok(())
    }

    /// Looks a block up by seq.
    pub fn get(&self, seq: u64) -> Lookup {
        if seq >= self.next {
            return Lookup::NotYet;
        }
        match self.blocks.front() {
            Some(first) if seq >= first.seq() => {
                Lookup::Found(self.blocks[(seq - first.seq()) as usize].clone())
            }
            _ => Lookup::Evicted,
        }
    }

    /// About how far apart the publisher's keyframes are: the ingest time
    /// between the two newest fragment starts that begin with one, ms
    /// (`None` before the second).
    pub fn keyframe_interval_ms(&self) -> Option<u64> {
        self.key_interval_ms
    }

    /// The seq the next block gets.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// The oldest seq still to be had: the oldest stored block, or the next
    /// one when none is.
    pub fn first_available(&self) -> u64 {
        self.blocks.front().map_or(self.next, |b| b.seq())
    }

    /// Seq of the newest block.
    pub fn live_edge(&self) -> Option<u64> {
        self.blocks.back().map(|b| b.seq())
    }

    /// Seq of the oldest stored block.
    pub fn oldest(&self) -> Option<u64> {
        self.blocks.front().map(|b| b.seq())
    }

    /// Where a new viewer should start: the newest fragment start that begins
    /// with a keyframe and is at least `target_latency_ms` behind the newest
    /// block. A decoder cannot start elsewhere: from another fragment start
    /// the browser shows a still picture (it drops the frames) until the next
    /// keyframe, for up to a keyframe interval (OBS's default is about 8 s).
    /// The player then catches up to its target latency by seeking forward in
    /// what it buffered. Without such a start: the newest keyframe start
    /// younger than the target, else the newest fragment start at least the
    /// target behind, else the oldest fragment start.
    pub fn start_seq(&self, target_latency_ms: u64) -> Option<u64> {
        let newest = self.blocks.back()?.block.header().ingest_time_ms;
        let starts = self
            .blocks
            .iter()
            .rev()
            .filter(|b| b.block.header().flags.contains(BlockFlags::FRAGMENT_START));
        let (mut young_key, mut old_enough, mut oldest) = (None, None, None);
        for b in starts {
            let h = b.block.header();
            let behind = newest.saturating_sub(h.ingest_time_ms) >= target_latency_ms;
            let key = h.flags.contains(BlockFlags::KEYFRAME);
            if key && behind {
                return Some(b.seq());
            }
            if key && young_key.is_none() {
                young_key = Some(b.seq());
            }
            if behind && old_enough.is_none() {
                old_enough = Some(b.seq());
            }
            oldest = Some(b.seq());
        }
        young_key.or(old_enough).or(oldest)
    }

    /// Payload bitrate over the stored window, kbit/s (0 until two blocks exist).
    pub fn bitrate_kbps(&self) -> u32 {
        let (Some(first), Some(last)) = (self.blocks.front(), self.blocks.back()) else {
            return 0;
        };
        let span = last
            .block
            .header()
            .ingest_time_ms
            .saturating_sub(first.block.header().ingest_time_ms);
        if span == 0 {
            return 0;
        }
        let payload: usize = self.blocks.iter().map(|b| b.block.payload().len()).sum();
        (payload as u64 * 8 / span) as u32
    }

    /// Stored bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Stored blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clubcast_protocol::block::StreamSigner;

    fn block(s: &StreamSigner, seq: u64, t: u64, start: bool) -> Arc<StoredBlock> {
        let flags = if start {
            BlockFlags::FRAGMENT_START
        } else {
            BlockFlags::empty()
        };
        Arc::new(StoredBlock::new(
            s.sign(seq, flags, t, 0, Bytes::from(vec![0; 1000]))
                .expect("small"),
        ))
    }

    /// A block at `t` ms with `flags`.
    fn flagged(s: &StreamSigner, seq: u64, t: u64, flags: BlockFlags) -> Arc<StoredBlock> {
        Arc::new(StoredBlock::new(
            s.sign(seq, flags, t, 0, Bytes::from(vec![0; 100]))
                .expect("small"),
        ))
    }

    #[test]
    fn a_new_viewer_starts_at_a_keyframe() {
        let s = StreamSigner::from_seed(&[2; 32]);
        let key = BlockFlags::FRAGMENT_START.union(BlockFlags::KEYFRAME);
        // A fragment every 500 ms, a keyframe every 3 s (every 6th fragment),
        // one block each, to 9.5 s: keyframe starts at 0, 6, 12 and 18.
        let mut store = BlockStore::new(60_000, usize::MAX);
        for i in 0..20u64 {
            let flags = if i % 6 == 0 {
                key
            } else {
                BlockFlags::FRAGMENT_START
            };
            store
                .push(flagged(&s, i, i * 500, flags))
                .expect("in order");
        }
        // The keyframe at 12 (6 s, 3.5 s behind the edge) is the newest at
        // least 1.5 s behind; the fragment start at 16 (8 s) is not a keyframe.
        assert_eq!(store.start_seq(1_500), Some(12));
        // 6 s behind: the keyframe at 6 (3 s), not the fragment start at 7.
        assert_eq!(store.start_seq(6_000), Some(6));
        // Keyframes only younger than the target: the newest of them.
        assert_eq!(store.start_seq(20_000), Some(18));
        assert_eq!(store.keyframe_interval_ms(), Some(3_000));
        // No keyframe at all (a publisher sending none yet): the newest
        // fragment start at least the target behind, else the oldest.
        let mut bare = BlockStore::new(60_000, usize::MAX);
        for i in 0..20u64 {
            bare.push(flagged(&s, i, i * 500, BlockFlags::FRAGMENT_START))
                .expect("in order");
        }
        assert_eq!(bare.start_seq(1_500), Some(16));
        assert_eq!(bare.start_seq(20_000), Some(0));
        assert_eq!(bare.keyframe_interval_ms(), None);
    }

    #[test]
    fn evicts_by_age_and_answers_three_ways() {
        let s = StreamSigner::from_seed(&[1; 32]);
        let mut store = BlockStore::new(1000, usize::MAX);
        for i in 0..30 {
            store
                .push(block(&s, i, i * 100, i % 10 == 0))
                .expect("in order");
        }
        assert_eq!(store.live_edge(), Some(29));
        assert!(matches!(store.get(29), Lookup::Found(_)));
        assert!(matches!(store.get(30), Lookup::NotYet));
        assert!(matches!(store.get(5), Lookup::Evicted));
        assert_eq!(store.oldest(), Some(19));
        assert_eq!(store.start_seq(500), Some(20));
        assert_eq!(store.first_available(), 19);
    }

    #[test]
    fn a_store_started_past_zero_reads_what_came_before_as_evicted() {
        let s = StreamSigner::from_seed(&[3; 32]);
        let mut store = BlockStore::new(1000, usize::MAX).starting_at(500);
        assert!(matches!(store.get(0), Lookup::Evicted));
        assert!(matches!(store.get(499), Lookup::Evicted));
        assert!(matches!(store.get(500), Lookup::NotYet));
        assert_eq!(store.first_available(), 500);
        assert_eq!(store.live_edge(), None);
        let err = store.push(block(&s, 499, 0, true)).unwrap_err();
        assert_eq!(
            err,
            StoreError::OutOfOrder {
                expected: 500,
                got: 499
            }
        );
        store.push(block(&s, 500, 0, true)).expect("the next block");
        assert!(matches!(store.get(500), Lookup::Found(_)));
        assert!(matches!(store.get(501), Lookup::NotYet));
        assert_eq!(store.next_seq(), 501);
    }

    #[test]
    fn bounded_by_bytes_and_rejects_gaps() {
        let s = StreamSigner::from_seed(&[2; 32]);
        let mut store = BlockStore::new(u64::MAX, 10_000);
        for i in 0..100 {
            store.push(block(&s, i, i, false)).expect("in order");
        }
        assert!(store.bytes() <= 10_000);
        assert_eq!(store.live_edge(), Some(99));
        let err = store.push(block(&s, 200, 0, false)).unwrap_err();
        assert_eq!(
            err,
            StoreError::OutOfOrder {
                expected: 100,
                got: 200
            }
        );
    }
}
