//! Signed blocks: the unit of content that peers relay.
//!
//! A block is a header, an ed25519 signature and a payload (a slice of one MP4
//! fragment). The stream key signs the header bytes followed by the SHA-256 of the
//! payload, so a relay can neither alter nor truncate a block without detection.
//!
//! ```text
//! 0      1      2          10                 18            26            30         94
//! | ver  | flags| seq u64  | ingest_time_ms u64 | media_time u64 | payload_len u32 | sig 64 B | payload |
//! ```
//!
//! All integers are big-endian. Bytes from the network become a [`Block`] with
//! [`Block::decode`], which checks only the structure; a [`BlockVerifier`] turns it
//! into a [`VerifiedBlock`], the only form that the peer state machine stores,
//! relays or plays.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Version of the block format.
pub const BLOCK_VERSION: u8 = 1;
/// Length of the encoded header, without signature and payload.
pub const HEADER_LEN: usize = 30;
/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Bytes that precede the payload in an encoded block.
pub const BLOCK_OVERHEAD: usize = HEADER_LEN + SIGNATURE_LEN;
/// Largest payload a block may carry: a block plus its frame header stays under
/// 64 KiB, which keeps data-channel messages small enough for every SCTP stack.
pub const MAX_PAYLOAD: usize = 64 * 1024 - 256;
/// Default payload size of the chunker, KiB.
///
/// Every hop stores a whole block before it forwards it, so a block's delay grows
/// with its size times the number of hops. In `clubcast-sim` (1000 peers, 30 s,
/// seed 1), 16 KiB blocks gave continuity 0.966 and block delay p95 1383 ms;
/// 8 KiB gave 0.998 and 1056 ms, for 1.4 % of control bytes instead of 0.8 %.
/// 4 KiB cut p95 to 858 ms but doubled the control bytes again (2.7 %).
///
/// The size matters most at scale. Each relay forwards a block to its in-club
/// children and then to about three last-hop subscribers, one block after the
/// other, so the last subscriber waits several blocks' serialization. At
/// 10,000 peers (30 s, seed 1, commit 7deac92), 8 KiB gave continuity 0.942
/// and p95 1404 ms; 4 KiB gave 0.9987 and 1184 ms. Hence 4 KiB, within the
/// 3 % budget for control bytes.
pub const DEFAULT_BLOCK_KIB: usize = 4;
/// Default payload size of the chunker, bytes.
pub const DEFAULT_BLOCK_BYTES: usize = DEFAULT_BLOCK_KIB * 1024;

/// Errors of block decoding and verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlockError {
    /// Fewer bytes than the header and signature need.
    #[error("block truncated: {0} bytes, header and signature need {BLOCK_OVERHEAD}")]
    Truncated(usize),
    /// The version byte names a format this build does not speak.
    #[error("unsupported block version {0}")]
    Version(u8),
    /// The header's payload length disagrees with the bytes that follow it.
    #[error("payload length {declared} does not match the {actual} bytes present")]
    Length {
        /// Length the header declares.
        declared: usize,
        /// Bytes actually present.
        actual: usize,
    },
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(usize),
    /// Flags carry bits this version does not define.
    #[error("unknown flag bits {0:#04x}")]
    Flags(u8),
    /// A run carries more blocks than the reader accepts.
    #[error("a run of more than {0} blocks")]
    RunTooLong(usize),
    /// The signature does not verify under the stream key.
    #[error("bad signature")]
    Signature,
}

/// Per-block flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BlockFlags(u8);

impl BlockFlags {
    /// The block starts an MP4 fragment (moof), so playback may start here.
    pub const FRAGMENT_START: BlockFlags = BlockFlags(0b01);
    /// The fragment this block starts begins with a keyframe.
    pub const KEYFRAME: BlockFlags = BlockFlags(0b10);
    /// The fragment this block starts needs another init segment than the
    /// blocks before it (a publisher came back with other settings): a player
    /// fetches the init in force at this block's seq and appends it first.
    /// Set only on a fragment start.
    pub const NEW_INIT: BlockFlags = BlockFlags(0b100);
    const KNOWN: u8 = 0b111;

    /// No flags set.
    pub const fn empty() -> Self {
        BlockFlags(0)
    }

    /// Flags from their wire byte, rejecting unknown bits.
    pub fn from_bits(bits: u8) -> Result<Self, BlockError> {
        if bits & !Self::KNOWN != 0 {
            return Err(BlockError::Flags(bits));
        }
        Ok(BlockFlags(bits))
    }

    /// The wire byte.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether all flags of `other` are set in `self`.
    pub const fn contains(self, other: BlockFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Union of two flag sets.
    pub const fn union(self, other: BlockFlags) -> BlockFlags {
        BlockFlags(self.0 | other.0)
    }
}

/// The signed fields of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHeader {
    /// Format version, [`BLOCK_VERSION`].
    pub version: u8,
    /// Position in the stream, starting at 0 and without gaps.
    pub seq: u64,
    /// Fragment start and keyframe flags.
    pub flags: BlockFlags,
    /// Server wall clock (Unix ms) when the block was cut at ingest.
    pub ingest_time_ms: u64,
    /// Decode time of the fragment's first sample, in the track timescale.
    pub media_time: u64,
    /// Length of the payload in bytes.
    pub payload_len: u32,
}

impl BlockHeader {
    /// Encodes the header into its fixed 30-byte form.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = self.version;
        out[1] = self.flags.bits();
        out[2..10].copy_from_slice(&self.seq.to_be_bytes());
        out[10..18].copy_from_slice(&self.ingest_time_ms.to_be_bytes());
        out[18..26].copy_from_slice(&self.media_time.to_be_bytes());
        out[26..30].copy_from_slice(&self.payload_len.to_be_bytes());
        out
    }

    /// Reads a header from its encoded form (the first [`HEADER_LEN`] bytes
    /// of an encoded block), for a reader that walks stored blocks without
    /// decoding their payloads. It checks the version and flags only.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Self, BlockError> {
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(a)
        };
        if b[0] != BLOCK_VERSION {
            return Err(BlockError::Version(b[0]));
        }
        Ok(BlockHeader {
            version: b[0],
            flags: BlockFlags::from_bits(b[1])?,
            seq: u64_at(2),
            ingest_time_ms: u64_at(10),
            media_time: u64_at(18),
            payload_len: u32::from_be_bytes([b[26], b[27], b[28], b[29]]),
        })
    }

    /// The bytes the stream key signs: the header followed by the payload hash.
    pub fn signed_message(&self, payload: &[u8]) -> [u8; HEADER_LEN + 32] {
        let mut msg = [0u8; HEADER_LEN + 32];
        msg[..HEADER_LEN].copy_from_slice(&self.to_bytes());
        msg[HEADER_LEN..].copy_from_slice(&Sha256::digest(payload));
        msg
    }
}

/// A structurally valid block whose signature has not been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The signed fields.
    pub header: BlockHeader,
    /// Signature over [`BlockHeader::signed_message`].
    pub signature: [u8; SIGNATURE_LEN],
    /// The content bytes.
    pub payload: Bytes,
}

impl Block {
    /// Parses an encoded block. Checks structure only; see [`BlockVerifier`].
    pub fn decode(bytes: Bytes) -> Result<Block, BlockError> {
        if bytes.len() < BLOCK_OVERHEAD {
            return Err(BlockError::Truncated(bytes.len()));
        }
        let mut head = [0u8; HEADER_LEN];
        head.copy_from_slice(&bytes[..HEADER_LEN]);
        let header = BlockHeader::parse(&head)?;
        let declared = header.payload_len as usize;
        if declared > MAX_PAYLOAD {
            return Err(BlockError::TooLarge(declared));
        }
        let actual = bytes.len() - BLOCK_OVERHEAD;
        if declared != actual {
            return Err(BlockError::Length { declared, actual });
        }
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(&bytes[HEADER_LEN..BLOCK_OVERHEAD]);
        Ok(Block {
            header,
            signature,
            payload: bytes.slice(BLOCK_OVERHEAD..),
        })
    }

    /// Splits blocks sent back to back (an origin run) and parses each; at
    /// most `max` of them. Each header's payload length says where the next
    /// block starts. A tail too short for its header or its declared payload,
    /// or more than `max` blocks, is an error.
    pub fn decode_run(mut bytes: Bytes, max: usize) -> Result<Vec<Block>, BlockError> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            if out.len() == max {
                return Err(BlockError::RunTooLong(max));
            }
            if bytes.len() < BLOCK_OVERHEAD {
                return Err(BlockError::Truncated(bytes.len()));
            }
            let mut head = [0u8; HEADER_LEN];
            head.copy_from_slice(&bytes[..HEADER_LEN]);
            let declared = BlockHeader::parse(&head)?.payload_len as usize;
            if declared > MAX_PAYLOAD {
                return Err(BlockError::TooLarge(declared));
            }
            let len = BLOCK_OVERHEAD + declared;
            if bytes.len() < len {
                return Err(BlockError::Length {
                    declared,
                    actual: bytes.len() - BLOCK_OVERHEAD,
                });
            }
            out.push(Block::decode(bytes.split_to(len))?);
        }
        Ok(out)
    }

    /// Length of [`Block::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        BLOCK_OVERHEAD + self.payload.len()
    }

    /// Appends the wire form to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.reserve(self.encoded_len());
        out.put_slice(&self.header.to_bytes());
        out.put_slice(&self.signature);
        out.put_slice(&self.payload);
    }

    /// The wire form.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out.freeze()
    }
}

/// A block whose signature checked out. Only a [`BlockVerifier`] or a
/// [`StreamSigner`] makes one.
///
/// It is shared, not copied: a peer's cache, its player queue and the frames
/// it relays hold the same block, and a clone is a reference count (a cache of
/// 600 blocks is 600 pointers, not 600 headers and signatures).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBlock(Arc<Block>);

impl VerifiedBlock {
    /// The block.
    pub fn block(&self) -> &Block {
        &self.0
    }

    /// The block's sequence number.
    pub fn seq(&self) -> u64 {
        self.0.header.seq
    }

    /// The block's header.
    pub fn header(&self) -> &BlockHeader {
        &self.0.header
    }

    /// The block's payload.
    pub fn payload(&self) -> &Bytes {
        &self.0.payload
    }

    /// Wraps a block as verified. Only for [`BlockVerifier`] implementations,
    /// which must have checked it.
    pub fn assume_verified(block: Block) -> Self {
        VerifiedBlock(Arc::new(block))
    }

    /// Gives back the inner block (a copy if it is shared).
    pub fn into_block(self) -> Block {
        Arc::unwrap_or_clone(self.0)
    }
}

/// Checks blocks before a peer stores, relays or plays them.
///
/// The real implementation is [`StreamKey`] (ed25519). The simulator swaps in a
/// cheap stand-in so that 10,000 simulated peers do not spend its time in
/// signature checks; the peer state machine is the same.
pub trait BlockVerifier {
    /// Verifies `block`, or says why it is bad.
    fn verify(&self, block: Block) -> Result<VerifiedBlock, BlockError>;
}

/// A stream's public key: its identity and the key its blocks verify under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamKey(VerifyingKey);

/// Errors of parsing a stream id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamIdError {
    /// Neither 52 base32 characters nor 64 hex characters.
    #[error("stream id must be 52 base32 or 64 hex characters")]
    Encoding,
    /// The 32 bytes are not a valid ed25519 public key.
    #[error("stream id is not a valid ed25519 public key")]
    Key,
}

impl StreamKey {
    /// The key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, StreamIdError> {
        VerifyingKey::from_bytes(bytes)
            .map(StreamKey)
            .map_err(|_| StreamIdError::Key)
    }

    /// The 32 key bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The URL form: lowercase unpadded base32 of the key (52 characters).
    pub fn to_id(&self) -> String {
        data_encoding::BASE32_NOPAD
            .encode(&self.0.to_bytes())
            .to_ascii_lowercase()
    }

    /// Parses the URL form, base32 (any case) or hex.
    pub fn from_id(id: &str) -> Result<Self, StreamIdError> {
        let bytes = match id.len() {
            52 => data_encoding::BASE32_NOPAD
                .decode(id.to_ascii_uppercase().as_bytes())
                .map_err(|_| StreamIdError::Encoding)?,
            64 => data_encoding::HEXLOWER_PERMISSIVE
                .decode(id.as_bytes())
                .map_err(|_| StreamIdError::Encoding)?,
            _ => return Err(StreamIdError::Encoding),
        };
        let arr: [u8; 32] = bytes.try_into().map_err(|_| StreamIdError::Encoding)?;
        Self::from_bytes(&arr)
    }
}

impl StreamKey {
    /// Whether `sig` is this key's signature of `msg` (strict ed25519), for
    /// the other things the stream key signs (an on-demand asset's manifest).
    pub(crate) fn verifies(&self, msg: &[u8], sig: &[u8; SIGNATURE_LEN]) -> bool {
        self.0
            .verify_strict(msg, &Signature::from_bytes(sig))
            .is_ok()
    }
}

impl BlockVerifier for StreamKey {
    fn verify(&self, block: Block) -> Result<VerifiedBlock, BlockError> {
        let msg = block.header.signed_message(&block.payload);
        let sig = Signature::from_bytes(&block.signature);
        self.0
            .verify_strict(&msg, &sig)
            .map_err(|_| BlockError::Signature)?;
        Ok(VerifiedBlock::assume_verified(block))
    }
}

/// The stream's private key, held by the server only.
pub struct StreamSigner(SigningKey);

impl core::fmt::Debug for StreamSigner {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("StreamSigner")
            .field(&self.key().to_id())
            .finish()
    }
}

impl StreamSigner {
    /// A signer from a 32-byte secret seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        StreamSigner(SigningKey::from_bytes(seed))
    }

    /// The 32-byte secret seed, for persisting the key.
    pub fn to_seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public stream key.
    pub fn key(&self) -> StreamKey {
        StreamKey(self.0.verifying_key())
    }

    /// Signs `msg` (not a block: see [`StreamSigner::sign`]).
    pub(crate) fn sign_message(&self, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.0.sign(msg).to_bytes()
    }

    /// Builds and signs a block.
    pub fn sign(
        &self,
        seq: u64,
        flags: BlockFlags,
        ingest_time_ms: u64,
        media_time: u64,
        payload: Bytes,
    ) -> Result<VerifiedBlock, BlockError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(BlockError::TooLarge(payload.len()));
        }
        let header = BlockHeader {
            version: BLOCK_VERSION,
            seq,
            flags,
            ingest_time_ms,
            media_time,
            payload_len: payload.len() as u32,
        };
        let signature = self.0.sign(&header.signed_message(&payload)).to_bytes();
        Ok(VerifiedBlock::assume_verified(Block {
            header,
            signature,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn signer(n: u8) -> StreamSigner {
        StreamSigner::from_seed(&[n; 32])
    }

    fn sample(s: &StreamSigner) -> VerifiedBlock {
        s.sign(
            7,
            BlockFlags::FRAGMENT_START.union(BlockFlags::KEYFRAME),
            1_700_000_000_000,
            90_000,
            Bytes::from(vec![0xAB; 1000]),
        )
        .expect("payload is under the limit")
    }

    #[test]
    fn round_trip_verifies() {
        let s = signer(1);
        let b = sample(&s);
        let back = Block::decode(b.block().encode()).expect("decodes");
        let v = s.key().verify(back).expect("verifies");
        assert_eq!(v, b);
    }

    #[test]
    fn wrong_key_is_rejected() {
        let b = sample(&signer(1));
        let err = signer(2).key().verify(b.into_block()).unwrap_err();
        assert_eq!(err, BlockError::Signature);
    }

    #[test]
    fn every_altered_byte_is_rejected() {
        let s = signer(3);
        let enc = s
            .sign(
                1,
                BlockFlags::empty(),
                5,
                6,
                Bytes::from_static(b"hello world"),
            )
            .expect("small")
            .block()
            .encode();
        for i in 0..enc.len() {
            let mut bad = enc.to_vec();
            bad[i] ^= 0x01;
            let rejected = match Block::decode(Bytes::from(bad)) {
                Err(_) => true,
                Ok(b) => s.key().verify(b).is_err(),
            };
            assert!(rejected, "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn truncated_frames_are_rejected() {
        let enc = sample(&signer(4)).block().encode();
        for len in 0..enc.len() {
            assert!(Block::decode(enc.slice(..len)).is_err(), "len {len}");
        }
    }

    #[test]
    fn oversized_payload_is_refused_at_signing() {
        let err = signer(5)
            .sign(
                0,
                BlockFlags::empty(),
                0,
                0,
                Bytes::from(vec![0; MAX_PAYLOAD + 1]),
            )
            .unwrap_err();
        assert_eq!(err, BlockError::TooLarge(MAX_PAYLOAD + 1));
    }

    #[test]
    fn stream_id_round_trips_in_base32_and_hex() {
        let key = signer(6).key();
        let id = key.to_id();
        assert_eq!(id.len(), 52);
        assert_eq!(StreamKey::from_id(&id).expect("base32"), key);
        assert_eq!(StreamKey::from_id(&id.to_uppercase()).expect("upper"), key);
        let hex = data_encoding::HEXLOWER.encode(&key.to_bytes());
        assert_eq!(StreamKey::from_id(&hex).expect("hex"), key);
        assert!(StreamKey::from_id("short").is_err());
    }

    #[test]
    fn a_run_splits_into_its_blocks_and_a_cut_tail_is_an_error() {
        let s = signer(3);
        let blocks: Vec<Block> = (0..4u64)
            .map(|i| {
                let payload = Bytes::from(vec![i as u8; 100 + 700 * i as usize]);
                s.sign(i, BlockFlags::empty(), i, i, payload)
                    .expect("small")
                    .into_block()
            })
            .collect();
        let mut run = BytesMut::new();
        for b in &blocks {
            b.encode_into(&mut run);
        }
        let run = run.freeze();
        assert_eq!(Block::decode_run(run.clone(), 4).expect("splits"), blocks);
        assert_eq!(Block::decode_run(Bytes::new(), 4).expect("empty"), vec![]);
        assert!(matches!(
            Block::decode_run(run.clone(), 3),
            Err(BlockError::RunTooLong(3))
        ));
        // Cut inside the last payload, then inside the last header.
        let cut = run.slice(..run.len() - 1);
        assert!(matches!(
            Block::decode_run(cut, 4),
            Err(BlockError::Length { .. })
        ));
        let last = blocks[3].encoded_len();
        let cut = run.slice(..run.len() - last + 10);
        assert!(matches!(
            Block::decode_run(cut, 4),
            Err(BlockError::Truncated(10))
        ));
    }

    #[test]
    fn unknown_flag_bits_are_refused() {
        let all = BlockFlags::FRAGMENT_START
            .union(BlockFlags::KEYFRAME)
            .union(BlockFlags::NEW_INIT);
        assert_eq!(BlockFlags::from_bits(all.bits()), Ok(all));
        for bits in [0b1000u8, 0x80, 0xFF] {
            assert!(matches!(BlockFlags::from_bits(bits), Err(BlockError::Flags(b)) if b == bits));
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Block::decode(Bytes::from(bytes));
        }

        #[test]
        fn decode_run_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Block::decode_run(Bytes::from(bytes), 4);
        }

        #[test]
        fn sign_decode_verify(seq: u64, t: u64, m: u64, flags in 0u8..8,
                              payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let s = signer(9);
            let flags = BlockFlags::from_bits(flags).expect("known bits");
            let b = s.sign(seq, flags, t, m, Bytes::from(payload)).expect("small");
            let back = Block::decode(b.block().encode()).expect("decodes");
            prop_assert_eq!(s.key().verify(back).expect("verifies"), b);
        }
    }
}
