//! The on-demand swarm core against hostile neighbours and a flaky origin.
//! The bytes are a script of operations: links opening and closing, any
//! frame from any neighbour (blocks genuine, forged, altered or past the
//! asset), origin answers (whole or cut at a grant), failures, refusals and
//! grants, and ticks at moving playheads. After every step: the core never
//! holds a block that is not the asset's own, its store stays under its
//! bound, it asks the origin for at most one run at a time, within the asset
//! and the run cap, every frame it sends goes to a neighbour it has, and its
//! bid is at most the whole asset.
#![no_main]
use std::collections::BTreeSet;
use std::sync::OnceLock;

use bytes::Bytes;
use clubcast_protocol::block::{BlockFlags, StreamKey, StreamSigner, VerifiedBlock};
use clubcast_protocol::vod::swarm::{Action, SwarmConfig, VodSwarm};
use clubcast_protocol::vod::{Manifest, VodFragment, MAX_RUN_BLOCKS};
use clubcast_protocol::wire::Frame;
use libfuzzer_sys::fuzz_target;

/// Fragments of 1 s, [`PER`] blocks each.
const FRAGS: u64 = 24;
const PER: u64 = 8;
const BLOCKS: u64 = FRAGS * PER;
const PAYLOAD: usize = 64;

struct Asset {
    m: Manifest,
    good: Vec<VerifiedBlock>,
    forged: Vec<VerifiedBlock>,
}

fn asset() -> &'static Asset {
    static A: OnceLock<Asset> = OnceLock::new();
    A.get_or_init(|| {
        let s = StreamSigner::from_seed(&[5; 32]);
        let other = StreamSigner::from_seed(&[6; 32]);
        let m = Manifest {
            name: "fuzz".into(),
            key: s.key(),
            created_ms: 0,
            init_sha256: [0; 32],
            init_bytes: 1,
            timescale: 1000,
            duration: 1000 * FRAGS,
            blocks: BLOCKS,
            bytes: BLOCKS * 200,
            fragments: (0..FRAGS)
                .map(|i| VodFragment {
                    seq: i * PER,
                    media_time: 1000 * i,
                    keyframe: true,
                })
                .collect(),
        };
        let sign = |k: &StreamSigner, seq: u64| {
            let t = 1000 * (seq / PER);
            k.sign(
                seq,
                BlockFlags::empty(),
                1,
                t,
                Bytes::from(vec![seq as u8; PAYLOAD]),
            )
            .expect("signs")
        };
        Asset {
            good: (0..BLOCKS).map(|q| sign(&s, q)).collect(),
            forged: (0..BLOCKS).map(|q| sign(&other, q)).collect(),
            m,
        }
    })
}

fn frame(a: &Asset, kind: u8, seq: u64, x: u8) -> Frame {
    let i = (seq % BLOCKS) as usize;
    match kind % 9 {
        0 => Frame::Have(seq),
        1 => Frame::HaveRange {
            start: seq,
            count: u32::from(x) * 37,
        },
        2 => Frame::Bitfield {
            start: seq,
            bits: Bytes::from(vec![x; usize::from(x % 40)]),
        },
        3 => Frame::Want(seq),
        4 => Frame::Cancel(seq),
        5 => Frame::DontHave(seq),
        6 => Frame::Block(a.good[i].block().clone()),
        7 => Frame::Block(a.forged[i].block().clone()),
        _ => {
            let mut b = a.good[i].block().clone();
            let mut p = b.payload.to_vec();
            p[usize::from(x) % PAYLOAD] ^= 1;
            b.payload = Bytes::from(p);
            Frame::Block(b)
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let a = asset();
    let cfg = SwarmConfig {
        max_store_bytes: 40 * 200,
        ..SwarmConfig::default()
    };
    let max_store = cfg.max_store_bytes;
    let mut core: VodSwarm<StreamKey> = VodSwarm::new(&a.m, a.m.key, cfg);
    let mut peers = BTreeSet::new();
    let mut fetching: Option<std::ops::Range<u64>> = None;
    let (mut now, mut playhead) = (0u64, 0.0f64);
    for op in data.chunks(4) {
        let [k, p, s, x] = [
            op[0],
            *op.get(1).unwrap_or(&0),
            *op.get(2).unwrap_or(&0),
            *op.get(3).unwrap_or(&0),
        ];
        let peer = u64::from(p % 20);
        // Mostly in the asset, sometimes far past it.
        let seq = if x & 0x80 == 0 {
            u64::from(s) % (BLOCKS + 4)
        } else {
            u64::from(s) << 40
        };
        now += u64::from(x % 16) * 37;
        match k % 8 {
            0 => {
                if core.add_peer(peer, now) {
                    peers.insert(peer);
                }
            }
            1 => {
                core.remove_peer(peer);
                peers.remove(&peer);
            }
            2..=4 => core.handle_frame(peer, frame(a, s ^ x, seq, x), now),
            5 => {
                if let Some(run) = fetching.take() {
                    // Whole, cut at a grant, failed, or refused for want of one.
                    let cut = run.start + 1 + u64::from(s) % (run.end - run.start);
                    let run_end = run.end;
                    match x % 4 {
                        0 | 1 => {
                            let end = if x % 4 == 0 { run.end } else { cut };
                            let blocks = a.good[run.start as usize..end as usize].to_vec();
                            core.http_done(run, blocks, 1, now);
                            if end < run_end {
                                core.wait_for_grant(now + u64::from(s));
                            }
                        }
                        2 => core.http_failed(run, now + u64::from(s)),
                        _ => core.http_refused(run, now + u64::from(s)),
                    }
                } else {
                    core.grant(u64::from(s) * u64::from(x));
                }
            }
            _ => {
                playhead = (playhead + f64::from(x % 8) * 0.25).min(FRAGS as f64);
                if x % 17 == 0 {
                    playhead = f64::from(s % FRAGS as u8);
                }
                let next = a.m.fragments[a.m.seek_fragment(playhead)].seq;
                core.tick(now, next, playhead, f64::from(1 + s % 30));
            }
        }
        while let Some(action) = core.poll() {
            match action {
                Action::Fetch(run) => {
                    assert!(fetching.is_none(), "a second fetch before the first ended");
                    assert!(run.start < run.end && run.end <= BLOCKS, "{run:?}");
                    assert!(run.end - run.start <= MAX_RUN_BLOCKS, "{run:?}");
                    fetching = Some(run);
                }
                Action::Send { peer, .. } => assert!(peers.contains(&peer), "to a stranger"),
                Action::Drop { peer, .. } => {
                    peers.remove(&peer);
                }
                Action::Switch { .. } => {}
            }
        }
        let st = core.stats();
        assert!(
            st.store_bytes <= max_store,
            "{} > {max_store}",
            st.store_bytes
        );
        assert_eq!(st.peers, peers.len());
        // A bid is at most the whole asset.
        let whole = a.m.bytes.div_ceil(BLOCKS) * BLOCKS * 8;
        assert!(core.bid(u32::from(s) * 100) <= whole);
    }
    // What the core holds is the asset's own, byte for byte.
    for q in 0..BLOCKS {
        if let Some(p) = core.payloads(q..q + 1) {
            assert_eq!(p, a.good[q as usize].payload().to_vec(), "block {q}");
        }
    }
});
