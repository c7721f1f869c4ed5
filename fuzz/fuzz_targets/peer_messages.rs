//! A hostile remote sends arbitrary messages: the peer state machine never
//! panics and its queues stay bounded.
#![no_main]
use bytes::Bytes;
use clubcast_protocol::block::StreamSigner;
use clubcast_protocol::peer::{Peer, PeerConfig, MAX_EVENTS, MAX_TRANSMITS};
use clubcast_protocol::signal::{Link, LinkOp, LinkRole};
use clubcast_protocol::Time;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = StreamSigner::from_seed(&[3; 32]).key();
    let mut peer = Peer::new(PeerConfig::new(1, 8), key);
    let link = Link {
        peer: 2,
        role: LinkRole::Upload { club: 0 },
        offer: true,
    };
    peer.handle_welcome(Time(1_000), &[0, 1], &[link], 0, 0);
    peer.handle_link(Time(1_000), LinkOp::Add, link);
    peer.handle_link_open(Time(1_000), 2);
    let mut now = 1_000;
    for chunk in data.split(|b| *b == 0xFF) {
        now += 7;
        peer.handle_message(Time(now), 2, Bytes::copy_from_slice(chunk));
        peer.handle_timeout(Time(now));
    }
    let mut n = 0;
    while peer.poll_transmit().is_some() {
        n += 1;
    }
    assert!(n <= MAX_TRANSMITS);
    let mut e = 0;
    while peer.poll_event().is_some() {
        e += 1;
    }
    assert!(e <= MAX_EVENTS);
});
