//! The peer among remotes that send well-formed frames, signed blocks and
//! tampered ones, while its links come and go and time moves on: see
//! `clubcast_protocol::peer_ops`, which a property test also runs in CI.
//! `peer_messages` covers arbitrary bytes on the wire.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| clubcast_protocol::peer_ops::run(data));
