//! Block decoding (single and run) and verification never panic on arbitrary bytes.
#![no_main]
use bytes::Bytes;
use clubcast_protocol::block::{Block, BlockVerifier, StreamSigner};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(block) = Block::decode(Bytes::copy_from_slice(data)) {
        let re = block.encode();
        assert_eq!(&re[..], data, "decode then encode is the identity");
        let key = StreamSigner::from_seed(&[7; 32]).key();
        let _ = key.verify(block);
    }
    if let Ok(run) = Block::decode_run(Bytes::copy_from_slice(data), 64) {
        let len: usize = run.iter().map(Block::encoded_len).sum();
        assert_eq!(len, data.len(), "a run accounts for every byte");
    }
});
