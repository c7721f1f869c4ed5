//! Wire format of peer links: what two peers say over one data channel.
//!
//! Each data-channel message holds exactly one frame:
//!
//! ```text
//! | len u32 (bytes after this field) | version u8 | type u8 | body ... |
//! ```
//!
//! Flow: on open, both sides send [`Frame::Hello`] with their clubs, and a joiner may
//! send [`Frame::HaveRange`] or [`Frame::Bitfield`]. After that, a block of a
//! shared club moves as [`Frame::Block`], preceded or followed by [`Frame::Have`]s
//! that stop duplicates. A missing block is asked for with [`Frame::Want`] and
//! answered with the block, or with [`Frame::DontHave`]; [`Frame::Cancel`]
//! withdraws a want. A peer that receives a block it already had sends
//! [`Frame::Prune`] to the slower sender, which then announces that club's blocks
//! with HAVE instead of pushing them; a WANT on such a link grafts it back. [`Frame::Ping`]/[`Frame::Pong`] measure round-trip time.
//!
//! Every decoder returns a [`WireError`] on bad bytes and never panics; every
//! variable-length field is bounded by a `MAX_*` constant.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::block::{Block, BlockError};

/// Version of the peer wire protocol.
pub const WIRE_VERSION: u8 = 1;
/// Largest frame on a link, length prefix included. Kept at 64 KiB for SCTP.
pub const MAX_FRAME: usize = 64 * 1024;
/// Most clubs a HELLO may list.
pub const MAX_HELLO_CLUBS: usize = 64;
/// Most blocks one HAVE_RANGE may announce.
pub const MAX_RANGE: u32 = 1 << 16;
/// Most bytes of a BITFIELD (so at most 8× as many blocks).
pub const MAX_BITFIELD_BYTES: usize = 4096;
/// Bytes of the frame header: length, version and type.
pub const FRAME_HEADER_LEN: usize = 6;

/// Errors of frame decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than the header or the body needs.
    #[error("frame truncated")]
    Truncated,
    /// The length prefix disagrees with the message size.
    #[error("length prefix {declared} does not match {actual} bytes")]
    Length {
        /// Length in the prefix.
        declared: usize,
        /// Bytes present after the prefix.
        actual: usize,
    },
    /// The frame is larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds {MAX_FRAME}")]
    TooLarge(usize),
    /// The version byte names a protocol this build does not speak.
    #[error("unsupported wire version {0}")]
    Version(u8),
    /// The type byte names no frame.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A field is over its bound or inconsistent.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    /// The body has bytes left over after the frame's fields.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// The embedded block is malformed.
    #[error("bad block: {0}")]
    Block(#[from] BlockError),
}

/// One frame on a peer link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame on a link: who the sender is and which clubs it is in.
    Hello {
        /// Peer protocol version the sender speaks.
        version: u8,
        /// The sender's server-assigned peer id.
        peer_id: u64,
        /// The clubs the sender is a member of.
        clubs: Vec<u16>,
    },
    /// The sender holds block `seq`.
    Have(u64),
    /// The sender holds `count` consecutive blocks from `start`.
    HaveRange {
        /// First block.
        start: u64,
        /// Number of blocks, at most [`MAX_RANGE`].
        count: u32,
    },
    /// The sender holds the blocks whose bits are set, bit i (MSB first) for
    /// block `start + i`.
    Bitfield {
        /// Block of bit 0.
        start: u64,
        /// The bits, at most [`MAX_BITFIELD_BYTES`].
        bits: Bytes,
    },
    /// A block, not yet verified by the receiver.
    Block(Block),
    /// Please send block `seq`.
    Want(u64),
    /// Withdraws a want for block `seq`.
    Cancel(u64),
    /// The sender does not hold block `seq` (an answer to a want).
    DontHave(u64),
    /// Round-trip probe.
    Ping(u64),
    /// Answer to a ping, echoing its nonce.
    Pong(u64),
    /// The sender already had block `seq` when it arrived from the receiver:
    /// for that block's club, send HAVEs instead of blocks from now on (until
    /// the sender WANTs one). This is Plumtree's prune; it keeps in-club
    /// duplicates rare.
    Prune(u64),
}

const T_HELLO: u8 = 0x01;
const T_HAVE: u8 = 0x02;
const T_HAVE_RANGE: u8 = 0x03;
const T_BITFIELD: u8 = 0x04;
const T_BLOCK: u8 = 0x05;
const T_WANT: u8 = 0x06;
const T_CANCEL: u8 = 0x07;
const T_DONT_HAVE: u8 = 0x08;
const T_PING: u8 = 0x09;
const T_PONG: u8 = 0x0A;
const T_PRUNE: u8 = 0x0B;

impl Frame {
    fn body_len(&self) -> usize {
        match self {
            Frame::Hello { clubs, .. } => 1 + 8 + 1 + 2 * clubs.len(),
            Frame::HaveRange { .. } => 12,
            Frame::Bitfield { bits, .. } => 8 + 2 + bits.len(),
            Frame::Block(b) => b.encoded_len(),
            Frame::Have(_)
            | Frame::Want(_)
            | Frame::Cancel(_)
            | Frame::DontHave(_)
            | Frame::Ping(_)
            | Frame::Pong(_)
            | Frame::Prune(_) => 8,
        }
    }

    /// Size of the encoded frame, prefix included, without encoding it.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN + self.body_len()
    }

    /// Bytes of this frame that are not block payload (for `control_overhead`).
    pub fn overhead_len(&self) -> usize {
        match self {
            Frame::Block(b) => self.encoded_len() - b.payload.len(),
            _ => self.encoded_len(),
        }
    }

    /// Encodes the frame into one message.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        let body_len = self.body_len() + 2;
        out.put_u32(body_len as u32);
        out.put_u8(WIRE_VERSION);
        match self {
            Frame::Hello {
                version,
                peer_id,
                clubs,
            } => {
                out.put_u8(T_HELLO);
                out.put_u8(*version);
                out.put_u64(*peer_id);
                out.put_u8(clubs.len().min(MAX_HELLO_CLUBS) as u8);
                for c in clubs.iter().take(MAX_HELLO_CLUBS) {
                    out.put_u16(*c);
                }
            }
            Frame::Have(s) => put_seq(&mut out, T_HAVE, *s),
            Frame::HaveRange { start, count } => {
                out.put_u8(T_HAVE_RANGE);
                out.put_u64(*start);
                out.put_u32(*count);
            }
            Frame::Bitfield { start, bits } => {
                out.put_u8(T_BITFIELD);
                out.put_u64(*start);
                out.put_u16(bits.len() as u16);
                out.put_slice(bits);
            }
            Frame::Block(b) => {
                out.put_u8(T_BLOCK);
                b.encode_into(&mut out);
            }
            Frame::Want(s) => put_seq(&mut out, T_WANT, *s),
            Frame::Cancel(s) => put_seq(&mut out, T_CANCEL, *s),
            Frame::DontHave(s) => put_seq(&mut out, T_DONT_HAVE, *s),
            Frame::Ping(n) => put_seq(&mut out, T_PING, *n),
            Frame::Pong(n) => put_seq(&mut out, T_PONG, *n),
            Frame::Prune(s) => put_seq(&mut out, T_PRUNE, *s),
        }
        out.freeze()
    }

    /// Decodes exactly one frame from one message.
    pub fn decode(msg: Bytes) -> Result<Frame, WireError> {
        if msg.len() > MAX_FRAME {
            return Err(WireError::TooLarge(msg.len()));
        }
        if msg.len() < FRAME_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let mut buf = msg;
        let declared = buf.get_u32() as usize;
        if declared != buf.len() {
            return Err(WireError::Length {
                declared,
                actual: buf.len(),
            });
        }
        let version = buf.get_u8();
        if version != WIRE_VERSION {
            return Err(WireError::Version(version));
        }
        let ty = buf.get_u8();
        let frame = match ty {
            T_HELLO => {
                need(&buf, 10)?;
                let version = buf.get_u8();
                let peer_id = buf.get_u64();
                let n = buf.get_u8() as usize;
                if n > MAX_HELLO_CLUBS {
                    return Err(WireError::Malformed("hello"));
                }
                need(&buf, 2 * n)?;
                let clubs = (0..n).map(|_| buf.get_u16()).collect();
                Frame::Hello {
                    version,
                    peer_id,
                    clubs,
                }
            }
            T_HAVE => Frame::Have(get_seq(&mut buf)?),
            T_HAVE_RANGE => {
                need(&buf, 12)?;
                let start = buf.get_u64();
                let count = buf.get_u32();
                if count == 0 || count > MAX_RANGE || start.checked_add(count as u64).is_none() {
                    return Err(WireError::Malformed("have_range"));
                }
                Frame::HaveRange { start, count }
            }
            T_BITFIELD => {
                need(&buf, 10)?;
                let start = buf.get_u64();
                let n = buf.get_u16() as usize;
                if n == 0 || n > MAX_BITFIELD_BYTES {
                    return Err(WireError::Malformed("bitfield"));
                }
                need(&buf, n)?;
                let bits = buf.split_to(n);
                Frame::Bitfield { start, bits }
            }
            T_BLOCK => {
                let block = Block::decode(core::mem::take(&mut buf))?;
                Frame::Block(block)
            }
            T_WANT => Frame::Want(get_seq(&mut buf)?),
            T_CANCEL => Frame::Cancel(get_seq(&mut buf)?),
            T_DONT_HAVE => Frame::DontHave(get_seq(&mut buf)?),
            T_PING => Frame::Ping(get_seq(&mut buf)?),
            T_PONG => Frame::Pong(get_seq(&mut buf)?),
            T_PRUNE => Frame::Prune(get_seq(&mut buf)?),
            other => return Err(WireError::UnknownType(other)),
        };
        if !buf.is_empty() {
            return Err(WireError::Trailing(buf.len()));
        }
        Ok(frame)
    }
}

fn put_seq(out: &mut BytesMut, ty: u8, v: u64) {
    out.put_u8(ty);
    out.put_u64(v);
}

fn need(buf: &Bytes, n: usize) -> Result<(), WireError> {
    if buf.len() < n {
        Err(WireError::Truncated)
    } else {
        Ok(())
    }
}

fn get_seq(buf: &mut Bytes) -> Result<u64, WireError> {
    need(buf, 8)?;
    Ok(buf.get_u64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockFlags, StreamSigner};
    use proptest::prelude::*;

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                any::<u8>(),
                any::<u64>(),
                proptest::collection::vec(any::<u16>(), 0..MAX_HELLO_CLUBS)
            )
                .prop_map(|(version, peer_id, clubs)| Frame::Hello {
                    version,
                    peer_id,
                    clubs
                }),
            any::<u64>().prop_map(Frame::Have),
            (0..u64::MAX / 2, 1..=MAX_RANGE)
                .prop_map(|(start, count)| Frame::HaveRange { start, count }),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..64)).prop_map(|(start, b)| {
                Frame::Bitfield {
                    start,
                    bits: Bytes::from(b),
                }
            }),
            (
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..3000)
            )
                .prop_map(|(seq, p)| {
                    let s = StreamSigner::from_seed(&[1; 32]);
                    Frame::Block(
                        s.sign(seq, BlockFlags::empty(), 1, 2, Bytes::from(p))
                            .expect("small")
                            .into_block(),
                    )
                }),
            any::<u64>().prop_map(Frame::Want),
            any::<u64>().prop_map(Frame::Cancel),
            any::<u64>().prop_map(Frame::DontHave),
            any::<u64>().prop_map(Frame::Ping),
            any::<u64>().prop_map(Frame::Pong),
            any::<u64>().prop_map(Frame::Prune),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(frame in arb_frame()) {
            let enc = frame.encode();
            prop_assert_eq!(enc.len(), frame.encoded_len());
            prop_assert_eq!(Frame::decode(enc).expect("decodes"), frame);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::decode(Bytes::from(bytes));
        }

        #[test]
        fn truncation_is_an_error(frame in arb_frame(), cut in 1usize..40) {
            let enc = frame.encode();
            let cut = cut.min(enc.len());
            prop_assert!(Frame::decode(enc.slice(..enc.len() - cut)).is_err());
        }
    }

    #[test]
    fn limits_are_enforced() {
        assert_eq!(
            Frame::decode(Bytes::from(vec![0u8; MAX_FRAME + 1])),
            Err(WireError::TooLarge(MAX_FRAME + 1))
        );
        let bad_range = Frame::HaveRange {
            start: 0,
            count: MAX_RANGE + 1,
        }
        .encode();
        assert_eq!(
            Frame::decode(bad_range),
            Err(WireError::Malformed("have_range"))
        );
        let mut unknown = Frame::Have(1).encode().to_vec();
        unknown[5] = 0xEE;
        assert_eq!(
            Frame::decode(Bytes::from(unknown)),
            Err(WireError::UnknownType(0xEE))
        );
        let mut newer = Frame::Have(1).encode().to_vec();
        newer[4] = 9;
        assert_eq!(
            Frame::decode(Bytes::from(newer)),
            Err(WireError::Version(9))
        );
    }

    #[test]
    fn largest_block_fits_a_frame() {
        let s = StreamSigner::from_seed(&[2; 32]);
        let b = s
            .sign(
                0,
                BlockFlags::empty(),
                0,
                0,
                Bytes::from(vec![0; crate::block::MAX_PAYLOAD]),
            )
            .expect("at the limit");
        let f = Frame::Block(b.into_block());
        assert!(f.encoded_len() <= MAX_FRAME);
        assert_eq!(Frame::decode(f.encode()).expect("decodes"), f);
    }
}
