//! A cheap stand-in for the stream signature.
//!
//! 10,000 simulated peers cannot afford an ed25519 verification per received
//! block, so the simulated source puts a keyed 64-bit tag of the block header in
//! the first 8 bytes of the signature field, and [`SimVerifier`] recomputes it.
//! A hostile relay flips a signature byte ([`corrupt`]); the tag no longer
//! matches and the peer state machine (unchanged) rejects the block exactly as
//! it would reject a bad ed25519 signature.
//!
//! Once the stream is cut, [`SimVerifier::sharing`] gives a verifier that hands
//! every peer the same [`VerifiedBlock`] for a genuine block, as a browser's
//! would hand it one copy: 10,000 peers caching 600 blocks then hold pointers,
//! not 6 million copies of a header and signature.

use std::sync::Arc;

use bytes::Bytes;
use clubcast_protocol::block::{
    Block, BlockError, BlockFlags, BlockHeader, BlockVerifier, VerifiedBlock, BLOCK_VERSION,
    SIGNATURE_LEN,
};

/// The largest payload the simulator cuts; payloads are slices of one static
/// zero buffer, so blocks cost no heap memory.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The keyed tag of a header.
pub fn tag(key: u64, h: &BlockHeader) -> u64 {
    let mut x = mix(key ^ h.seq);
    for w in [
        h.ingest_time_ms,
        h.media_time,
        u64::from(h.payload_len) | u64::from(h.flags.bits()) << 32 | u64::from(h.version) << 40,
    ] {
        x = mix(x ^ w);
    }
    x
}

/// Checks the keyed tag instead of an ed25519 signature.
#[derive(Debug, Clone)]
pub struct SimVerifier {
    key: u64,
    /// The stream's blocks by seq, verified once (see [`SimVerifier::sharing`]).
    genuine: Arc<[VerifiedBlock]>,
}

impl SimVerifier {
    /// A verifier for blocks tagged with `key`.
    pub fn new(key: u64) -> Self {
        SimVerifier {
            key,
            genuine: Arc::from([]),
        }
    }

    /// The same verifier, returning the shared copy of each of `blocks` (the
    /// stream, by seq) when a block equal to it verifies.
    pub fn sharing(&self, blocks: &[Block]) -> Self {
        SimVerifier {
            key: self.key,
            genuine: blocks
                .iter()
                .map(|b| VerifiedBlock::assume_verified(b.clone()))
                .collect(),
        }
    }

    /// Cuts a tagged block of `len` zero bytes.
    pub fn block(&self, seq: u64, flags: BlockFlags, ingest_ms: u64, len: usize) -> Block {
        let header = BlockHeader {
            version: BLOCK_VERSION,
            seq,
            flags,
            ingest_time_ms: ingest_ms,
            media_time: seq,
            payload_len: len as u32,
        };
        let mut signature = [0u8; SIGNATURE_LEN];
        signature[..8].copy_from_slice(&tag(self.key, &header).to_le_bytes());
        Block {
            header,
            signature,
            payload: Bytes::from_static(&ZEROS[..len.min(ZEROS.len())]),
        }
    }
}

impl BlockVerifier for SimVerifier {
    fn verify(&self, block: Block) -> Result<VerifiedBlock, BlockError> {
        let declared = block.header.payload_len as usize;
        if declared != block.payload.len() {
            return Err(BlockError::Length {
                declared,
                actual: block.payload.len(),
            });
        }
        if block.signature[..8] != tag(self.key, &block.header).to_le_bytes() {
            return Err(BlockError::Signature);
        }
        match self.genuine.get(block.header.seq as usize) {
            // The same header, signature and bytes (payloads are slices of
            // one static buffer: the same slice is the same bytes).
            Some(g) if same_slice(g.block(), &block) => Ok(g.clone()),
            _ => Ok(VerifiedBlock::assume_verified(block)),
        }
    }
}

/// Whether `a` and `b` are the same header and signature over the same
/// payload slice. Payloads are slices of one static buffer, so the same slice
/// is the same bytes: equal blocks compared without reading 4 KiB of payload.
fn same_slice(a: &Block, b: &Block) -> bool {
    a.header == b.header
        && a.signature == b.signature
        && a.payload.as_ptr() == b.payload.as_ptr()
        && a.payload.len() == b.payload.len()
}

/// Whether `a` equals `b`, as `==` says, but cheap when they share their
/// payload slice (every block the simulated stream cut does).
pub fn same_block(a: &Block, b: &Block) -> bool {
    same_slice(a, b) || a == b
}

/// What a hostile relay sends instead of `block`: one signature byte flipped.
pub fn corrupt(block: &Block) -> Block {
    let mut b = block.clone();
    b.signature[0] ^= 0xA5;
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sharing_verifier_hands_every_peer_one_copy() {
        let v = SimVerifier::new(9);
        let blocks: Vec<Block> = (0..3)
            .map(|s| v.block(s, BlockFlags::empty(), 1000 + s, 4096))
            .collect();
        let shared = v.sharing(&blocks);
        let a = shared.verify(blocks[2].clone()).expect("genuine");
        let b = shared.verify(blocks[2].clone()).expect("genuine");
        assert!(std::ptr::eq(a.block(), b.block()), "one copy");
        assert_eq!(a.block(), &blocks[2]);
        assert_eq!(
            shared.verify(corrupt(&blocks[2])),
            Err(BlockError::Signature)
        );
        // Past the stream's end (or unknown): verified, not shared.
        let late = v.block(7, BlockFlags::empty(), 1007, 4096);
        assert_eq!(shared.verify(late.clone()).expect("genuine").block(), &late);
    }

    #[test]
    fn good_blocks_pass_and_corrupt_ones_fail() {
        let v = SimVerifier::new(9);
        let b = v.block(5, BlockFlags::FRAGMENT_START, 1234, 100);
        assert!(v.verify(b.clone()).is_ok());
        assert_eq!(v.verify(corrupt(&b)), Err(BlockError::Signature));
        let mut forged = b.clone();
        forged.header.ingest_time_ms += 1;
        assert_eq!(v.verify(forged), Err(BlockError::Signature));
        assert!(SimVerifier::new(10).verify(b).is_err(), "keyed");
    }
}
