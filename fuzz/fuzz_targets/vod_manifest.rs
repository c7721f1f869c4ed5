//! On-demand manifests. Any text read as a manifest gives a typed error or a
//! manifest whose JSON reads back the same. Any fragment table the bytes
//! describe either fails validation or, signed, reads back and drives the
//! cursor over every block exactly once, in runs within the bounds, whatever
//! the seeks and playheads.
#![no_main]
use clubcast_protocol::block::StreamSigner;
use clubcast_protocol::vod::{Manifest, SignedManifest, VodCursor, VodFragment, MAX_RUN_BLOCKS};
use libfuzzer_sys::fuzz_target;

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    for (i, x) in data.iter().skip(at).take(8).enumerate() {
        b[i] = *x;
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if let Ok(text) = std::str::from_utf8(rest) {
            if let Ok(m) = SignedManifest::from_json(text) {
                assert_eq!(SignedManifest::from_json(&m.to_json()).as_ref(), Ok(&m));
            }
        }
        return;
    }
    // Bytes 1..9: blocks and timescale; then 5 bytes per fragment: a seq step
    // (u16), a media time step (u16, may be 0) and a keyframe byte.
    let signer = StreamSigner::from_seed(&[3; 32]);
    let blocks = u64_at(rest, 0) % 100_000;
    let timescale = (u64_at(rest, 4) % 100_000) as u32;
    let mut fragments = Vec::new();
    let (mut seq, mut time) = (0u64, 0u64);
    for c in rest.get(8..).unwrap_or_default().chunks(5) {
        fragments.push(VodFragment {
            seq,
            media_time: time,
            keyframe: c[0] & 1 == 1,
        });
        seq += u64::from(u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        time += u64::from(u16::from_le_bytes([
            *c.get(2).unwrap_or(&0),
            *c.get(3).unwrap_or(&0),
        ]));
    }
    let m = Manifest {
        name: "fuzz".into(),
        key: signer.key(),
        created_ms: 0,
        init_sha256: [0; 32],
        init_bytes: 1,
        timescale,
        duration: time,
        blocks,
        bytes: blocks * 200,
        fragments,
    };
    let Ok(signed) = m.clone().sign(&signer) else {
        assert!(m.validate().is_err());
        return;
    };
    let back = SignedManifest::from_json(&signed.to_json()).expect("a signed manifest reads back");
    assert_eq!(back.manifest(), &m);
    let mut c = VodCursor::new();
    let seek = f64::from(mode >> 1) * 0.37;
    c.seek(&m, seek);
    let mut at = c.next();
    assert_eq!(at, m.fragments[m.seek_fragment(seek)].seq);
    let mut playhead = seek;
    while !c.done(&m) {
        match c.next_run(&m, playhead, 3.0) {
            Some(run) => {
                assert_eq!(run.start, at);
                assert!(run.end > run.start && run.end - run.start <= MAX_RUN_BLOCKS);
                assert!(run.end <= m.blocks);
                at = run.end;
                c.fetched(run);
            }
            None => playhead = 2.0 * playhead + 1.0,
        }
    }
});
