//! Signaling JSON from clients and servers never panics the parser.
#![no_main]
use clubcast_protocol::signal::{ClientMsg, ServerMsg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<ClientMsg>(data);
    let _ = serde_json::from_slice::<ServerMsg>(data);
});
