//! Drives a [`Peer`] with operations read from arbitrary bytes, for the
//! `peer_ops` fuzz target (`fuzz/`) and a property test here that runs the
//! same in CI: remotes send well-formed frames, signed blocks and tampered
//! ones, while links come and go and time moves on. [`run`] panics when the
//! peer breaks a promise: its queues stay bounded, it plays only blocks the
//! stream signed, in order and each once, and it drops only remotes that sent
//! a bad block or spoke another wire version.
//!
//! Built only for tests and with the `fuzzing` feature.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use bytes::Bytes;

use crate::block::{Block, BlockFlags, StreamSigner};
use crate::peer::{Peer, PeerConfig, PeerEvent, MAX_EVENTS, MAX_TRANSMITS};
use crate::signal::{Link, LinkOp, LinkRole};
use crate::wire::{Frame, WIRE_VERSION};
use crate::Time;

const T0: u64 = 1_000_000;
const CLUBS: u16 = 4;
/// Seqs the remotes may name: the signed blocks, and a few past them.
const BLOCKS: u64 = 96;

fn signer() -> &'static StreamSigner {
    static S: OnceLock<StreamSigner> = OnceLock::new();
    S.get_or_init(|| StreamSigner::from_seed(&[3; 32]))
}

/// Blocks `0..BLOCKS`, signed once: 40 ms of stream apart, a fragment start
/// every tenth.
fn blocks() -> &'static [Block] {
    static B: OnceLock<Vec<Block>> = OnceLock::new();
    B.get_or_init(|| {
        (0..BLOCKS)
            .map(|seq| {
                let flags = if seq % 10 == 0 {
                    BlockFlags::FRAGMENT_START
                } else {
                    BlockFlags::empty()
                };
                let payload = Bytes::from(vec![seq as u8; 64 + seq as usize]);
                signer()
                    .sign(seq, flags, T0 + seq * 40, seq, payload)
                    .expect("small payload")
                    .into_block()
            })
            .collect()
    })
}

/// Reads the input a byte or a word at a time, zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn seq(&mut self) -> u64 {
        // Mostly the signed blocks; now and then one far off.
        match self.u8() {
            250 => u64::MAX,
            251 => u64::MAX / 2,
            b => u64::from(b) % (BLOCKS + 8),
        }
    }

    fn role(&mut self) -> LinkRole {
        let club = u16::from(self.u8() % (CLUBS as u8 + 1));
        let share_count = self.u8() % 4;
        let share = self.u8() % 4;
        match self.u8() % 4 {
            0 => LinkRole::Download { club },
            1 => LinkRole::Upload { club },
            2 => LinkRole::Source {
                club,
                share,
                share_count,
            },
            _ => LinkRole::Subscriber {
                club,
                share,
                share_count,
            },
        }
    }
}

/// Runs the operations `data` encodes against a fresh peer (see the module
/// doc); panics if the peer breaks one of its promises.
pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let mut peer = Peer::new(PeerConfig::new(1, CLUBS), signer().key());
    let links: Vec<Link> = (2..6)
        .map(|p| Link {
            peer: p,
            role: input.role(),
            offer: p % 2 == 0,
        })
        .collect();
    let start = u64::from(input.u8()) % BLOCKS;
    peer.handle_welcome(Time(T0), &[0, 1], &links, start, start);
    let mut run = Run {
        peer,
        now: T0,
        played: None,
        misbehaved: BTreeSet::new(),
    };
    while !input.0.is_empty() {
        run.op(&mut input);
        run.drain();
    }
}

/// The peer under test and what it has been shown so far.
struct Run {
    peer: Peer<crate::block::StreamKey>,
    now: u64,
    /// The last block played.
    played: Option<u64>,
    /// Remotes that sent a tampered block or spoke another wire version.
    misbehaved: BTreeSet<u64>,
}

impl Run {
    /// Reads one operation and applies it.
    fn op(&mut self, input: &mut Input<'_>) {
        let from = 2 + u64::from(input.u8() % 6);
        let now = Time(self.now);
        let frame = match input.u8() % 24 {
            0..=3 => blocks()
                .get(input.seq() as usize)
                .cloned()
                .map(Frame::Block),
            4 => blocks().get(input.seq() as usize).map(|b| {
                let mut b = b.clone();
                let mut p = b.payload.to_vec();
                let at = usize::from(input.u8()) % p.len();
                p[at] ^= 1 | input.u8();
                b.payload = Bytes::from(p);
                self.misbehaved.insert(from);
                Frame::Block(b)
            }),
            5 => Some(Frame::Have(input.seq())),
            6 => Some(Frame::HaveRange {
                start: input.seq(),
                count: u32::from(input.u16()),
            }),
            7 => {
                let start = input.seq();
                let n = usize::from(input.u8() % 24);
                let bits = (0..n).map(|_| input.u8()).collect::<Vec<u8>>().into();
                Some(Frame::Bitfield { start, bits })
            }
            8 => Some(Frame::Want(input.seq())),
            9 => Some(Frame::Cancel(input.seq())),
            10 => Some(Frame::DontHave(input.seq())),
            11 => Some(Frame::Ping(u64::from(input.u16()))),
            12 => Some(Frame::Pong(u64::from(input.u8() % 8))),
            13 => Some(Frame::Prune(input.seq())),
            14 => {
                let clubs = (0..input.u8() % 4).map(|_| u16::from(input.u8())).collect();
                let version = input.u8() % 3;
                if version != WIRE_VERSION {
                    self.misbehaved.insert(from);
                }
                Some(Frame::Hello {
                    version,
                    peer_id: from,
                    clubs,
                })
            }
            op => {
                self.other(op, from, input);
                None
            }
        };
        if let Some(f) = frame {
            self.peer.handle_frame(now, from, f);
        }
    }

    /// Operations other than a frame from `from`: links, the origin, the
    /// server, and time.
    fn other(&mut self, op: u8, from: u64, input: &mut Input<'_>) {
        let now = Time(self.now);
        let p = &mut self.peer;
        match op {
            15 | 16 => {
                let link_op = if input.u8() % 2 == 0 {
                    LinkOp::Add
                } else {
                    LinkOp::Remove
                };
                let link = Link {
                    peer: from,
                    role: input.role(),
                    offer: false,
                };
                p.handle_link(now, link_op, link);
            }
            17 => p.handle_link_open(now, from),
            18 => p.handle_link_closed(now, from),
            19 => p.handle_link_buffered(from, usize::from(input.u16()) * 8),
            20 => {
                if let Some(b) = blocks().get(input.seq() as usize) {
                    p.handle_origin_block(now, b.clone());
                }
            }
            21 => p.handle_gap_fill_failed(now, input.seq()),
            22 => p.handle_live_edge(now, input.seq()),
            _ => {
                // Time moves on: to the peer's own timer, or by a step.
                self.now += u64::from(input.u16());
                if let Some(t) = p.poll_timeout() {
                    self.now = self.now.max(t.0);
                }
                p.handle_timeout(Time(self.now));
            }
        }
    }

    /// Takes what the peer sends and reports, checking its promises.
    fn drain(&mut self) {
        let mut n = 0;
        while self.peer.poll_transmit().is_some() {
            n += 1;
            assert!(n <= MAX_TRANSMITS, "transmit queue bounded");
        }
        let mut e = 0;
        while let Some(ev) = self.peer.poll_event() {
            e += 1;
            assert!(e <= MAX_EVENTS, "event queue bounded");
            match ev {
                PeerEvent::Play(b) => {
                    let seq = b.seq();
                    assert_eq!(
                        Some(b.block()),
                        blocks().get(seq as usize),
                        "played only as signed"
                    );
                    assert!(self.played.is_none_or(|p| seq > p), "played in order, once");
                    self.played = Some(seq);
                }
                PeerEvent::BadPeer { peer, .. } => {
                    assert!(
                        self.misbehaved.contains(&peer),
                        "dropped {peer}, which did nothing wrong"
                    );
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        // What `cargo fuzz run peer_ops` runs, from random bytes: far less
        // deep than the fuzzer's guided inputs, but in every CI run.
        #[test]
        fn a_peer_keeps_its_promises_whatever_its_remotes_do(
            data in proptest::collection::vec(any::<u8>(), 0..3000)
        ) {
            super::run(&data);
        }
    }

    /// The input `cargo fuzz run peer_ops` first failed on: an empty
    /// HAVE_RANGE built in process underflowed.
    #[test]
    fn the_fuzzers_first_find_stays_fixed() {
        super::run(&[
            0x71, 0x8a, 0xa4, 0xa4, 0xa4, 0xa4, 0xa4, 0xa4, 0xa4, 0x29, 0x29, 0x29, 0x1f, 0x29,
            0x29, 0x71, 0x09, 0xff, 0xf6, 0x00, 0x00,
        ]);
    }
}
