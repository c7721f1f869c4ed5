//! What the seeder says on a data channel: block frames it pushes, and its answers to the
//! few frames a peer sends it.
//!
//! The seeder is a member of no club, so a peer's HAVE, PRUNE, HAVE_RANGE, BITFIELD, CANCEL
//! and pushed blocks mean nothing to it and are ignored. It answers HELLO with its own (once),
//! PING with PONG, and WANT from the stream's store within a per-link rate
//! ([`super::SeederConfig::wants_per_sec`]) so a peer cannot pull the stream around the
//! origin's grants; a WANT over the rate, or for a block not stored, gets DONT_HAVE.

use std::time::Instant;

use crate::signal::limits::TokenBucket;

use bytes::{BufMut, Bytes, BytesMut};
use clubcast_protocol::signal::SEEDER_PEER_ID;
use clubcast_protocol::wire::{Frame, FRAME_HEADER_LEN, WIRE_VERSION};

use crate::store::{Lookup, StoredBlock};
use crate::stream::Stream;

/// Type byte of a BLOCK frame (see `clubcast_protocol::wire`).
const T_BLOCK: u8 = 0x05;

/// The data-channel message that carries `block`: the frame header in front of the block's
/// stored wire bytes, so a block is encoded once however many peers get it.
pub(crate) fn block_frame(block: &StoredBlock) -> Bytes {
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + block.encoded.len());
    // The length prefix counts the version and type bytes and the body. A stored block is
    // under `MAX_PAYLOAD` plus its header, far below `u32::MAX`.
    out.put_u32((block.encoded.len() + 2) as u32);
    out.put_u8(WIRE_VERSION);
    out.put_u8(T_BLOCK);
    out.put_slice(&block.encoded);
    out.freeze()
}

/// Per-link state of the frame dialogue.
#[derive(Debug)]
pub(crate) struct Dialogue {
    hello_sent: bool,
    /// Answered WANTs per second; the burst equals the rate.
    wants: TokenBucket,
}

/// What the seeder sends back for one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Nothing.
    None,
    /// A control frame.
    Frame(Bytes),
    /// A block answering a WANT; counts as seeded bytes.
    Block(Bytes),
}

impl Dialogue {
    /// A fresh link allowed `wants_per_sec` answered wants.
    pub(crate) fn new(wants_per_sec: u32, now: Instant) -> Self {
        Dialogue {
            hello_sent: false,
            wants: TokenBucket::new(wants_per_sec, wants_per_sec, now),
        }
    }

    /// The answer to `frame`. `room` says whether the link has send room for a block.
    pub(crate) fn handle(
        &mut self,
        frame: Frame,
        stream: &Stream,
        room: bool,
        now: Instant,
    ) -> Reply {
        match frame {
            Frame::Hello { .. } if !self.hello_sent => {
                self.hello_sent = true;
                Reply::Frame(
                    Frame::Hello {
                        version: WIRE_VERSION,
                        peer_id: SEEDER_PEER_ID,
                        clubs: Vec::new(),
                    }
                    .encode(),
                )
            }
            Frame::Ping(nonce) => Reply::Frame(Frame::Pong(nonce).encode()),
            Frame::Want(seq) => {
                if room && self.wants.take(now) {
                    if let Lookup::Found(block) = stream.block(seq) {
                        return Reply::Block(block_frame(&block));
                    }
                }
                Reply::Frame(Frame::DontHave(seq).encode())
            }
            _ => Reply::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{StoreConfig, Streams};
    use clubcast_protocol::block::{BlockFlags, BlockVerifier};
    use std::time::Duration;

    fn stream() -> std::sync::Arc<Stream> {
        let streams = Streams::new(
            None,
            StoreConfig {
                store_seconds: 60,
                max_bytes: 1 << 20,
            },
        );
        streams.get_or_create("t").expect("valid name")
    }

    #[test]
    fn block_frame_matches_the_protocol_encoder() {
        let s = stream();
        let stored = s
            .publish(BlockFlags::KEYFRAME, 9, 1, Bytes::from_static(b"payload"))
            .expect("publishes");
        let ours = block_frame(&stored);
        assert_eq!(ours, Frame::Block(stored.block.block().clone()).encode());
        let Frame::Block(back) = Frame::decode(ours).expect("decodes") else {
            panic!("not a block frame");
        };
        s.key.verify(back).expect("verifies under the stream key");
    }

    #[test]
    fn hello_once_ping_pong_and_others_ignored() {
        let s = stream();
        let now = Instant::now();
        let mut d = Dialogue::new(4, now);
        let hello = Frame::Hello {
            version: WIRE_VERSION,
            peer_id: 7,
            clubs: vec![1, 2],
        };
        let Reply::Frame(ours) = d.handle(hello.clone(), &s, true, now) else {
            panic!("hello is answered");
        };
        assert_eq!(
            Frame::decode(ours).expect("decodes"),
            Frame::Hello {
                version: WIRE_VERSION,
                peer_id: SEEDER_PEER_ID,
                clubs: vec![]
            }
        );
        assert_eq!(d.handle(hello, &s, true, now), Reply::None);
        assert_eq!(
            d.handle(Frame::Ping(5), &s, true, now),
            Reply::Frame(Frame::Pong(5).encode())
        );
        assert_eq!(d.handle(Frame::Have(3), &s, true, now), Reply::None);
        assert_eq!(d.handle(Frame::Prune(3), &s, true, now), Reply::None);
    }

    #[test]
    fn wants_are_answered_within_the_rate_then_refused() {
        let s = stream();
        for _ in 0..3 {
            s.publish(BlockFlags::empty(), 0, 0, Bytes::from_static(b"x"))
                .expect("publishes");
        }
        let now = Instant::now();
        let mut d = Dialogue::new(2, now);
        assert!(matches!(
            d.handle(Frame::Want(0), &s, true, now),
            Reply::Block(_)
        ));
        assert!(matches!(
            d.handle(Frame::Want(1), &s, true, now),
            Reply::Block(_)
        ));
        let refused = Reply::Frame(Frame::DontHave(2).encode());
        assert_eq!(d.handle(Frame::Want(2), &s, true, now), refused);
        let later = now + Duration::from_secs(1);
        assert!(matches!(
            d.handle(Frame::Want(2), &s, true, later),
            Reply::Block(_)
        ));
        // Not stored, and no send room: both refused.
        assert_eq!(
            d.handle(Frame::Want(99), &s, true, later),
            Reply::Frame(Frame::DontHave(99).encode())
        );
        assert_eq!(
            d.handle(Frame::Want(0), &s, false, later + Duration::from_secs(5)),
            Reply::Frame(Frame::DontHave(0).encode())
        );
    }
}
