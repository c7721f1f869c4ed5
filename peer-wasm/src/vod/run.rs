//! What one `GET /vod/{name}/blocks` answer becomes: the verified blocks
//! asked for, or an error, never a part of them.
//!
//! The answer is the encoded blocks back to back. Each must verify under the
//! asset key, and their seqs must be the run asked for, in order, or a
//! beginning of it (an origin that meters runs cuts one at the viewer's
//! grant; the rest is asked for again): a server that sends a genuine block
//! in the wrong place, one too many or none, is refused like one that sends
//! a forged block. The blocks go to the
//! session's swarm core, which serves them to neighbours and hands the
//! payloads of whole fragments (their `moof`+`mdat` boxes) to MSE.

use core::ops::Range;

use bytes::Bytes;
use clubcast_protocol::block::{Block, BlockError, BlockVerifier, StreamKey, VerifiedBlock};

/// Why a run was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The body does not split into blocks (or holds more than were asked).
    #[error("blocks {asked:?} do not parse: {source}")]
    Decode {
        /// The run asked for.
        asked: Range<u64>,
        /// Why.
        source: BlockError,
    },
    /// A block's signature does not verify under the asset key.
    #[error("block {seq} does not verify under the asset key")]
    Signature {
        /// The block's seq.
        seq: u64,
    },
    /// The blocks are not the ones asked for.
    #[error("asked for blocks {asked:?}, got {count} starting at {first:?}")]
    WrongRun {
        /// The run asked for.
        asked: Range<u64>,
        /// The first block's seq, if any came.
        first: Option<u64>,
        /// How many came.
        count: usize,
    },
}

impl RunError {
    /// Stable code for the `error` event.
    pub fn code(&self) -> &'static str {
        "bad_block"
    }
}

/// Checks the answer `body` to a fetch of `asked` against the asset `key`;
/// the blocks, verified, in order: all of `asked`, or at least its first.
pub fn accept_run(
    key: &StreamKey,
    asked: Range<u64>,
    body: Bytes,
) -> Result<Vec<VerifiedBlock>, RunError> {
    let want = usize::try_from(asked.end.saturating_sub(asked.start)).unwrap_or(usize::MAX);
    let blocks = Block::decode_run(body, want).map_err(|source| RunError::Decode {
        asked: asked.clone(),
        source,
    })?;
    let in_order = !blocks.is_empty()
        && blocks.len() <= want
        && blocks
            .iter()
            .zip(asked.clone())
            .all(|(b, seq)| b.header.seq == seq);
    if !in_order {
        return Err(RunError::WrongRun {
            first: blocks.first().map(|b| b.header.seq),
            count: blocks.len(),
            asked,
        });
    }
    blocks
        .into_iter()
        .map(|block| {
            let seq = block.header.seq;
            key.verify(block).map_err(|_| RunError::Signature { seq })
        })
        .collect()
}
