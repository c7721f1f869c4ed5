//! On-demand assets: the signed manifest that lists an asset's blocks, and the
//! cursor that says which blocks a player needs next.
//!
//! An on-demand asset (a file uploaded to the server) is cut into the same
//! signed [`Block`](crate::block::Block)s as a live stream, numbered from 0, under
//! a key of its own. Its [`Manifest`] says what a player needs before it fetches
//! a block: the key, the init segment's length and SHA-256, the timescale and
//! duration, how many blocks there are, and where each fragment starts (its
//! first block, its media time and whether it starts on a keyframe), so that a
//! seek lands on a keyframe without fetching anything else. The asset key signs
//! the manifest; a player that pins the key (or got the manifest from a source it
//! trusts) then takes nothing from the server that the key did not sign.
//!
//! The signature covers a fixed binary form of every field ([`Manifest::signed_message`]),
//! not the JSON text, so a server may reformat the JSON without breaking it.
//!
//! [`VodCursor`] plans the fetches: whole fragments ahead of the playhead, in
//! runs of at most [`MAX_RUN_BLOCKS`], from the keyframe fragment a seek lands
//! on. It reads no clock: the playhead is an argument.

use core::ops::Range;

use data_encoding::HEXLOWER_PERMISSIVE;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::block::{StreamKey, StreamSigner, BLOCK_OVERHEAD, MAX_PAYLOAD, SIGNATURE_LEN};

pub mod swarm;

/// Version of the manifest format (the JSON's `v`).
pub const MANIFEST_VERSION: u8 = 1;
/// Most fragments an asset may have: about 69 hours of 1-s fragments.
pub const MAX_FRAGMENTS: usize = 250_000;
/// Most blocks an asset may have: 2^32 (16 TiB of 4-KiB blocks).
pub const MAX_BLOCKS: u64 = 1 << 32;
/// Longest init segment, bytes.
pub const MAX_INIT_BYTES: u64 = 4 << 20;
/// Longest manifest JSON accepted, bytes.
pub const MAX_MANIFEST_JSON: usize = 16 << 20;
/// Most blocks one fetch of a run (`GET /vod/{name}/blocks`) returns.
pub const MAX_RUN_BLOCKS: u64 = 256;
/// Longest asset name; stream names follow the same rule ([`valid_name`]).
pub const MAX_NAME_LEN: usize = 64;

/// Domain separation for the manifest signature: no block header, KV item or
/// later manifest version signs the same bytes.
const LABEL: &[u8] = b"clubcast-vod-manifest-v1\0";

/// Errors of building, reading and checking a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VodError {
    /// The JSON does not parse as a manifest.
    #[error("manifest JSON: {0}")]
    Json(String),
    /// The JSON is longer than [`MAX_MANIFEST_JSON`].
    #[error("manifest of {0} bytes; at most {MAX_MANIFEST_JSON}")]
    TooLarge(usize),
    /// A field is out of range or inconsistent with the others.
    #[error("manifest field {field}: {why}")]
    BadField {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The signature does not verify under the manifest's key.
    #[error("manifest signature does not verify under its key")]
    Signature,
    /// The init segment's length or SHA-256 differs from the manifest's.
    #[error("init segment does not match the manifest")]
    InitMismatch,
}

impl VodError {
    /// A short machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            VodError::Json(_) | VodError::TooLarge(_) | VodError::BadField { .. } => "bad_manifest",
            VodError::Signature => "bad_signature",
            VodError::InitMismatch => "bad_init",
        }
    }
}

fn bad(field: &'static str, why: &'static str) -> VodError {
    VodError::BadField { field, why }
}

/// Whether `name` is a valid asset or stream name: 1 to [`MAX_NAME_LEN`]
/// characters of `a-z`, `0-9`, `-` and `_` (safe in a URL path and as a file
/// name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Where a fragment starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VodFragment {
    /// Its first block; its blocks run to the next fragment's first (or to the
    /// asset's end).
    pub seq: u64,
    /// Its decode time, in the manifest's timescale (the blocks' `media_time`).
    pub media_time: u64,
    /// Whether it starts with a video sync sample: a seek can start here.
    pub keyframe: bool,
}

/// What an asset is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The asset's name ([`valid_name`]).
    pub name: String,
    /// The asset key: it signs the manifest and every block.
    pub key: StreamKey,
    /// When the asset was made, Unix ms (also every block's `ingest_time_ms`).
    pub created_ms: u64,
    /// SHA-256 of the init segment.
    pub init_sha256: [u8; 32],
    /// Length of the init segment, bytes.
    pub init_bytes: u64,
    /// Units per second of `media_time` and `duration` (the video track's).
    pub timescale: u32,
    /// Media duration, in `timescale` units.
    pub duration: u64,
    /// Number of blocks: their seqs are `0..blocks`.
    pub blocks: u64,
    /// Sum of the encoded blocks' lengths, bytes.
    pub bytes: u64,
    /// Every fragment, in order.
    pub fragments: Vec<VodFragment>,
}

impl Manifest {
    /// Checks every field's range and that the fragment table is consistent:
    /// it starts at block 0, its seqs rise and stay below `blocks`, and its
    /// media times do not go back.
    pub fn validate(&self) -> Result<(), VodError> {
        if !valid_name(&self.name) {
            return Err(bad(
                "name",
                "must be 1-64 characters of a-z, 0-9, '-' or '_'",
            ));
        }
        if self.timescale == 0 {
            return Err(bad("timescale", "must not be 0"));
        }
        if self.init_bytes == 0 || self.init_bytes > MAX_INIT_BYTES {
            return Err(bad("init_bytes", "must be 1 to 4 MiB"));
        }
        if self.blocks == 0 || self.blocks > MAX_BLOCKS {
            return Err(bad("blocks", "must be 1 to 2^32"));
        }
        let least = self.blocks * BLOCK_OVERHEAD as u64;
        let most = self.blocks * (BLOCK_OVERHEAD + MAX_PAYLOAD) as u64;
        if !(least..=most).contains(&self.bytes) {
            return Err(bad("bytes", "does not fit the number of blocks"));
        }
        if self.fragments.is_empty() || self.fragments.len() > MAX_FRAGMENTS {
            return Err(bad("fragments", "must be 1 to 250,000 entries"));
        }
        if self.fragments[0].seq != 0 {
            return Err(bad("fragments", "the first must start at block 0"));
        }
        for pair in self.fragments.windows(2) {
            if pair[1].seq <= pair[0].seq {
                return Err(bad("fragments", "block seqs must rise"));
            }
            if pair[1].media_time < pair[0].media_time {
                return Err(bad("fragments", "media times must not go back"));
            }
        }
        if self.fragments.last().is_some_and(|f| f.seq >= self.blocks) {
            return Err(bad("fragments", "a fragment starts past the last block"));
        }
        Ok(())
    }

    /// The bytes the asset key signs: a label, then every field in a fixed
    /// big-endian form.
    pub fn signed_message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(LABEL.len() + 160 + self.fragments.len() * 17);
        m.extend_from_slice(LABEL);
        m.push(MANIFEST_VERSION);
        m.push(self.name.len() as u8);
        m.extend_from_slice(self.name.as_bytes());
        m.extend_from_slice(&self.key.to_bytes());
        m.extend_from_slice(&self.created_ms.to_be_bytes());
        m.extend_from_slice(&self.init_sha256);
        m.extend_from_slice(&self.init_bytes.to_be_bytes());
        m.extend_from_slice(&self.timescale.to_be_bytes());
        m.extend_from_slice(&self.duration.to_be_bytes());
        m.extend_from_slice(&self.blocks.to_be_bytes());
        m.extend_from_slice(&self.bytes.to_be_bytes());
        m.extend_from_slice(&(self.fragments.len() as u32).to_be_bytes());
        for f in &self.fragments {
            m.extend_from_slice(&f.seq.to_be_bytes());
            m.extend_from_slice(&f.media_time.to_be_bytes());
            m.push(u8::from(f.keyframe));
        }
        m
    }

    /// Validates the manifest and signs it with the asset key, which must be
    /// the manifest's `key`.
    pub fn sign(self, signer: &StreamSigner) -> Result<SignedManifest, VodError> {
        self.validate()?;
        if signer.key() != self.key {
            return Err(bad("key", "is not the signer's"));
        }
        let sig = signer.sign_message(&self.signed_message());
        Ok(SignedManifest {
            manifest: self,
            sig,
        })
    }

    /// `media_time` in seconds.
    pub fn seconds(&self, media_time: u64) -> f64 {
        media_time as f64 / f64::from(self.timescale)
    }

    /// The media duration in seconds.
    pub fn duration_s(&self) -> f64 {
        self.seconds(self.duration)
    }

    /// Where the media starts, seconds (the first fragment's decode time: a
    /// player's timeline uses the file's own times).
    pub fn start_s(&self) -> f64 {
        self.fragments
            .first()
            .map_or(0.0, |f| self.seconds(f.media_time))
    }

    /// The block seqs of fragment `i`.
    ///
    /// # Panics
    /// If `i` is not a fragment's index.
    pub fn fragment_blocks(&self, i: usize) -> Range<u64> {
        let end = self.fragments.get(i + 1).map_or(self.blocks, |f| f.seq);
        self.fragments[i].seq..end
    }

    /// The index of the fragment that holds block `seq` (the last one for a
    /// seq past the end).
    pub fn fragment_of(&self, seq: u64) -> usize {
        self.fragments
            .partition_point(|f| f.seq <= seq)
            .saturating_sub(1)
    }

    /// The fragment a seek to `t_s` seconds starts from: the last keyframe
    /// fragment that starts at or before `t_s`, else the first fragment.
    pub fn seek_fragment(&self, t_s: f64) -> usize {
        let at = self
            .fragments
            .partition_point(|f| self.seconds(f.media_time) <= t_s);
        self.fragments[..at]
            .iter()
            .rposition(|f| f.keyframe)
            .unwrap_or(0)
    }
}

/// A manifest with the asset key's signature. Made by [`Manifest::sign`] or
/// read by [`SignedManifest::from_json`], which verifies it: holding one means
/// its key signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    manifest: Manifest,
    sig: [u8; SIGNATURE_LEN],
}

/// The manifest's JSON form. The fields are in the order they are written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestJson {
    v: u8,
    name: String,
    key: String,
    created_ms: u64,
    init_sha256: String,
    init_bytes: u64,
    timescale: u32,
    duration: u64,
    blocks: u64,
    bytes: u64,
    fragments: Vec<(u64, u64, u8)>,
    sig: String,
}

impl SignedManifest {
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The JSON form: `{"v":1,"name":..,"key":"<stream id>",..,"fragments":[[seq,
    /// media_time,keyframe 0|1],..],"sig":"<hex>"}`.
    pub fn to_json(&self) -> String {
        let m = &self.manifest;
        let json = ManifestJson {
            v: MANIFEST_VERSION,
            name: m.name.clone(),
            key: m.key.to_id(),
            created_ms: m.created_ms,
            init_sha256: HEXLOWER_PERMISSIVE.encode(&m.init_sha256),
            init_bytes: m.init_bytes,
            timescale: m.timescale,
            duration: m.duration,
            blocks: m.blocks,
            bytes: m.bytes,
            fragments: m
                .fragments
                .iter()
                .map(|f| (f.seq, f.media_time, u8::from(f.keyframe)))
                .collect(),
            sig: HEXLOWER_PERMISSIVE.encode(&self.sig),
        };
        // A struct of strings and numbers always serializes.
        serde_json::to_string(&json).unwrap_or_default()
    }

    /// Reads the JSON form, checks its bounds and fields, and verifies the
    /// signature under the manifest's own key. A caller that expects a key
    /// compares it with `manifest().key`.
    pub fn from_json(text: &str) -> Result<SignedManifest, VodError> {
        if text.len() > MAX_MANIFEST_JSON {
            return Err(VodError::TooLarge(text.len()));
        }
        let json: ManifestJson =
            serde_json::from_str(text).map_err(|e| VodError::Json(e.to_string()))?;
        if json.v != MANIFEST_VERSION {
            return Err(bad("v", "unknown manifest version"));
        }
        if json.fragments.len() > MAX_FRAGMENTS {
            return Err(bad("fragments", "must be 1 to 250,000 entries"));
        }
        let key = StreamKey::from_id(&json.key).map_err(|_| bad("key", "not a stream id"))?;
        let init_sha256 =
            hex_array::<32>(&json.init_sha256).ok_or(bad("init_sha256", "not 64 hex digits"))?;
        let sig = hex_array::<SIGNATURE_LEN>(&json.sig).ok_or(bad("sig", "not 128 hex digits"))?;
        let mut fragments = Vec::with_capacity(json.fragments.len());
        for (seq, media_time, keyframe) in json.fragments {
            if keyframe > 1 {
                return Err(bad("fragments", "keyframe must be 0 or 1"));
            }
            fragments.push(VodFragment {
                seq,
                media_time,
                keyframe: keyframe == 1,
            });
        }
        let manifest = Manifest {
            name: json.name,
            key,
            created_ms: json.created_ms,
            init_sha256,
            init_bytes: json.init_bytes,
            timescale: json.timescale,
            duration: json.duration,
            blocks: json.blocks,
            bytes: json.bytes,
            fragments,
        };
        manifest.validate()?;
        if !manifest.key.verifies(&manifest.signed_message(), &sig) {
            return Err(VodError::Signature);
        }
        Ok(SignedManifest { manifest, sig })
    }

    /// Checks an init segment against the manifest's length and SHA-256.
    pub fn verify_init(&self, init: &[u8]) -> Result<(), VodError> {
        let m = &self.manifest;
        if init.len() as u64 != m.init_bytes || Sha256::digest(init)[..] != m.init_sha256 {
            return Err(VodError::InitMismatch);
        }
        Ok(())
    }
}

fn hex_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    HEXLOWER_PERMISSIVE
        .decode(text.as_bytes())
        .ok()?
        .try_into()
        .ok()
}

/// Which blocks a player appends next: whole fragments from the one it is at,
/// as far as `ahead_s` past the playhead, in runs of at most [`MAX_RUN_BLOCKS`].
/// (Where the blocks come from, the origin or neighbours, is
/// [`swarm::VodSwarm`]'s plan; the cursor keeps the order they are played in.)
///
/// A fragment of more than [`MAX_RUN_BLOCKS`] blocks takes several runs; every
/// other run ends on a fragment boundary, so the player can append what a run
/// brings at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VodCursor {
    next: u64,
}

impl VodCursor {
    /// A cursor at the first block.
    pub fn new() -> Self {
        Self::default()
    }

    /// The first block not yet fetched in order.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Moves to the keyframe fragment a seek to `t_s` starts from
    /// ([`Manifest::seek_fragment`]).
    pub fn seek(&mut self, m: &Manifest, t_s: f64) {
        self.next = m.fragments[m.seek_fragment(t_s)].seq;
    }

    /// The next run to fetch, if the fragment at the cursor starts before
    /// `playhead_s + ahead_s`: from the cursor to the end of as many whole
    /// fragments as fit in [`MAX_RUN_BLOCKS`] (or the first
    /// [`MAX_RUN_BLOCKS`] blocks of a longer fragment). `None` when nothing is
    /// due yet or every block is fetched.
    pub fn next_run(&self, m: &Manifest, playhead_s: f64, ahead_s: f64) -> Option<Range<u64>> {
        if self.next >= m.blocks {
            return None;
        }
        let first = m.fragment_of(self.next);
        if m.seconds(m.fragments[first].media_time) >= playhead_s + ahead_s {
            return None;
        }
        let limit = self.next + MAX_RUN_BLOCKS;
        let mut end = m.fragment_blocks(first).end;
        if end > limit {
            return Some(self.next..limit);
        }
        for i in first + 1..m.fragments.len() {
            let blocks = m.fragment_blocks(i);
            if blocks.end > limit || m.seconds(m.fragments[i].media_time) >= playhead_s + ahead_s {
                break;
            }
            end = blocks.end;
        }
        Some(self.next..end)
    }

    /// Records that `run` arrived: the cursor moves past it if it started at
    /// the cursor (a run from before a seek is ignored).
    pub fn fetched(&mut self, run: Range<u64>) {
        if run.start == self.next && run.end > run.start {
            self.next = run.end;
        }
    }

    /// Whether every block has been fetched.
    pub fn done(&self, m: &Manifest) -> bool {
        self.next >= m.blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn signer() -> StreamSigner {
        StreamSigner::from_seed(&[7; 32])
    }

    /// 10 fragments of 1 s (timescale 1000, starting at 500 ms), every other a
    /// keyframe, of 3 blocks each but the fifth, of 300.
    fn sample() -> Manifest {
        let mut fragments = Vec::new();
        let mut seq = 0;
        for i in 0..10u64 {
            fragments.push(VodFragment {
                seq,
                media_time: 500 + 1000 * i,
                keyframe: i % 2 == 0,
            });
            seq += if i == 4 { 300 } else { 3 };
        }
        let init = b"init segment";
        Manifest {
            name: "clip-1".into(),
            key: signer().key(),
            created_ms: 1_700_000_000_000,
            init_sha256: Sha256::digest(init).into(),
            init_bytes: init.len() as u64,
            timescale: 1000,
            duration: 10_000,
            blocks: seq,
            bytes: seq * 4000,
            fragments,
        }
    }

    #[test]
    fn a_signed_manifest_reads_back_and_any_change_is_refused() {
        let signed = sample().sign(&signer()).unwrap();
        let json = signed.to_json();
        assert!(
            json.starts_with(r#"{"v":1,"name":"clip-1","key":""#),
            "{json}"
        );
        let back = SignedManifest::from_json(&json).unwrap();
        assert_eq!(back, signed);
        back.verify_init(b"init segment").unwrap();
        assert_eq!(
            back.verify_init(b"init segmenT"),
            Err(VodError::InitMismatch)
        );
        assert_eq!(back.verify_init(b"init"), Err(VodError::InitMismatch));

        // Each field changed in the text, signature kept: refused.
        for (from, to) in [
            (
                r#""created_ms":1700000000000"#,
                r#""created_ms":1700000000001"#,
            ),
            (r#""duration":10000"#, r#""duration":10001"#),
            ("[9,3500,0]", "[9,3500,1]"),
            ("[9,3500,0]", "[9,3400,0]"),
            (r#""name":"clip-1""#, r#""name":"clip-2""#),
        ] {
            assert!(json.contains(from), "{from} in {json}");
            let changed = json.replace(from, to);
            assert_eq!(
                SignedManifest::from_json(&changed),
                Err(VodError::Signature),
                "{from} -> {to}"
            );
        }
        // Another key's signature over the same manifest, claiming this key.
        let mut other = sample();
        other.key = StreamSigner::from_seed(&[8; 32]).key();
        let forged = other
            .sign(&StreamSigner::from_seed(&[8; 32]))
            .unwrap()
            .to_json();
        let forged = forged.replace(&other_key_id(), &signer().key().to_id());
        assert_eq!(SignedManifest::from_json(&forged), Err(VodError::Signature));
    }

    fn other_key_id() -> String {
        StreamSigner::from_seed(&[8; 32]).key().to_id()
    }

    #[test]
    fn bad_json_and_bad_fields_are_named() {
        let json = sample().sign(&signer()).unwrap().to_json();
        for (from, to, field) in [
            (r#""v":1"#, r#""v":2"#, "v"),
            (r#""timescale":1000"#, r#""timescale":0"#, "timescale"),
            ("[0,500,1]", "[1,500,1]", "fragments"),
            ("[6,2500,1]", "[3,2500,1]", "fragments"),
            ("[6,2500,1]", "[6,1000,1]", "fragments"),
            ("[6,2500,1]", "[6,2500,2]", "fragments"),
            (r#""name":"clip-1""#, r#""name":"Clip 1""#, "name"),
            (r#""init_bytes":12"#, r#""init_bytes":0"#, "init_bytes"),
            (r#""bytes":1308000"#, r#""bytes":1"#, "bytes"),
        ] {
            let changed = json.replace(from, to);
            assert_ne!(changed, json, "{from}");
            match SignedManifest::from_json(&changed) {
                Err(VodError::BadField { field: f, .. }) => assert_eq!(f, field, "{from} -> {to}"),
                other => panic!("{from} -> {to}: {other:?}"),
            }
        }
        // A fragment past the last block.
        let mut m = sample();
        m.blocks = m.fragments.last().unwrap().seq;
        m.bytes = m.blocks * 4000;
        assert!(matches!(
            m.validate(),
            Err(VodError::BadField {
                field: "fragments",
                ..
            })
        ));
        for text in [
            "",
            "{}",
            "[]",
            "null",
            r#"{"v":1}"#,
            &json[..json.len() - 1],
        ] {
            assert!(
                matches!(SignedManifest::from_json(text), Err(VodError::Json(_))),
                "{text:?}"
            );
        }
        let extra = json.replacen('{', r#"{"extra":1,"#, 1);
        assert!(matches!(
            SignedManifest::from_json(&extra),
            Err(VodError::Json(_))
        ));
        let huge = " ".repeat(MAX_MANIFEST_JSON + 1);
        assert!(matches!(
            SignedManifest::from_json(&huge),
            Err(VodError::TooLarge(_))
        ));
        // Signing needs the manifest's own key.
        assert!(matches!(
            sample().sign(&StreamSigner::from_seed(&[8; 32])),
            Err(VodError::BadField { field: "key", .. })
        ));
        assert_eq!(VodError::Signature.code(), "bad_signature");
    }

    #[test]
    fn fragments_and_seeks() {
        let m = sample();
        assert_eq!(m.fragment_blocks(0), 0..3);
        assert_eq!(m.fragment_blocks(4), 12..312);
        assert_eq!(m.fragment_blocks(9), 324..327);
        assert_eq!(m.fragment_of(0), 0);
        assert_eq!(m.fragment_of(2), 0);
        assert_eq!(m.fragment_of(3), 1);
        assert_eq!(m.fragment_of(200), 4);
        assert_eq!(m.fragment_of(10_000), 9);
        assert_eq!(m.start_s(), 0.5);
        assert_eq!(m.duration_s(), 10.0);
        // Keyframes at 0.5, 2.5, 4.5, 6.5, 8.5 s.
        assert_eq!(m.seek_fragment(0.0), 0);
        assert_eq!(m.seek_fragment(2.4), 0);
        assert_eq!(m.seek_fragment(2.5), 2);
        assert_eq!(m.seek_fragment(4.0), 2);
        assert_eq!(m.seek_fragment(99.0), 8);
    }

    #[test]
    fn the_cursor_fetches_whole_fragments_ahead_of_the_playhead() {
        let m = sample();
        let mut c = VodCursor::new();
        // 2 s ahead of 0.5: fragments 0 and 1 (0.5 and 1.5 s start before 2.5).
        assert_eq!(c.next_run(&m, 0.5, 2.0), Some(0..6));
        c.fetched(0..6);
        assert_eq!(c.next_run(&m, 0.5, 2.0), None, "2.5 s is not before 2.5");
        // Fragment 3 fits; fragment 4 (300 blocks) does not fit with it.
        assert_eq!(c.next_run(&m, 1.0, 3.0), Some(6..12));
        c.fetched(6..12);
        // Fragment 4 alone is longer than a run: it comes in parts.
        assert_eq!(c.next_run(&m, 4.0, 1.0), Some(12..12 + MAX_RUN_BLOCKS));
        c.fetched(12..12 + MAX_RUN_BLOCKS);
        assert_eq!(c.next_run(&m, 4.0, 1.0), Some(268..312));
        // A late answer for a run before a seek moves nothing.
        c.seek(&m, 7.0);
        assert_eq!(c.next(), m.fragments[6].seq);
        c.fetched(268..312);
        assert_eq!(c.next(), m.fragments[6].seq);
        assert_eq!(c.next_run(&m, 7.0, 100.0), Some(315..327));
        c.fetched(315..327);
        assert!(c.done(&m));
        assert_eq!(c.next_run(&m, 7.0, 100.0), None);
    }

    proptest! {
        #[test]
        fn runs_cover_every_block_once_in_order(
            sizes in proptest::collection::vec(1u64..600, 1..40),
            ahead in 0.5f64..20.0,
        ) {
            let mut m = sample();
            let mut seq = 0;
            m.fragments = sizes.iter().enumerate().map(|(i, &n)| {
                let f = VodFragment { seq, media_time: 1000 * i as u64, keyframe: i % 3 == 0 };
                seq += n;
                f
            }).collect();
            m.blocks = seq;
            m.bytes = seq * 200;
            m.validate().unwrap();
            let mut c = VodCursor::new();
            let mut playhead = 0.0;
            let mut got = 0;
            while !c.done(&m) {
                match c.next_run(&m, playhead, ahead) {
                    Some(run) => {
                        prop_assert_eq!(run.start, got);
                        prop_assert!(run.end > run.start && run.end - run.start <= MAX_RUN_BLOCKS);
                        // A run ends on a fragment boundary unless it is a part of one fragment.
                        let boundary = run.end == m.blocks || m.fragments.iter().any(|f| f.seq == run.end);
                        prop_assert!(boundary || m.fragment_of(run.start) == m.fragment_of(run.end - 1));
                        got = run.end;
                        c.fetched(run);
                    }
                    None => playhead += 1.0,
                }
                prop_assert!(playhead < 1000.0);
            }
            prop_assert_eq!(got, m.blocks);
        }

        #[test]
        fn from_json_never_panics(text in ".{0,400}") {
            let _ = SignedManifest::from_json(&text);
        }
    }
}
