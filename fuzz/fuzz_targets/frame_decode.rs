//! Peer frame decoding never panics, and what decodes re-encodes to the same bytes.
#![no_main]
use bytes::Bytes;
use clubcast_protocol::wire::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(Bytes::copy_from_slice(data)) {
        assert_eq!(frame.encoded_len(), data.len());
        assert_eq!(&frame.encode()[..], data);
    }
});
