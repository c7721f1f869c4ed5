//! One upload: a fragmented MP4 file in, an asset's blocks and manifest out.
//!
//! [`Upload::push`] feeds the file's bytes, in whatever chunks the request
//! body brings, to the live ingest's splitter ([`Fmp4Parser`]). The init
//! segment is kept (it is at most [`fmp4::MAX_INIT`]); each fragment is cut
//! into blocks exactly as live ingest cuts it ([`chunker::cut`]), signed with
//! the asset's own key and appended to `blocks.bin` the moment the fragment is
//! complete, so memory holds one fragment and one write buffer, never the
//! file. [`Upload::finish`] checks the file ended cleanly, writes `init.mp4`
//! and the signed `manifest.json`, and hands back the [`Asset`].
//!
//! Uploads to disk happen in a staging directory ([`Staging`]) that removes
//! itself when dropped: a failed, refused or abandoned upload (the client hung
//! up, the handler's future was dropped) leaves nothing behind. The library
//! renames the directory into place only once everything is written.
//!
//! The pipeline is synchronous (file writes and signing are blocking work);
//! the library runs it on tokio's blocking pool a batch of body chunks at a
//! time. The built-in demo asset runs the same pipeline into memory.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use clubcast_protocol::block::StreamSigner;
use clubcast_protocol::vod::{Manifest, VodFragment, MAX_FRAGMENTS};
use sha2::{Digest as _, Sha256};

use super::asset::{Asset, BlockSource};
use super::{VodError, BLOCKS_FILE, INIT_FILE, MANIFEST_FILE};
use crate::ingest::chunker::{self, clamp_block_bytes};
use crate::ingest::fmp4::{self, Fmp4Parser, Fragment, Item};

/// Size of the write buffer in front of `blocks.bin`.
const WRITE_BUFFER: usize = 1 << 20;

/// A directory being filled by an upload: removed, with everything in it,
/// when dropped, unless [`Staging::keep`] was called.
#[derive(Debug)]
pub struct Staging {
    path: PathBuf,
    keep: bool,
}

impl Staging {
    /// Creates the directory `path` (which must not exist).
    pub fn create(path: PathBuf) -> std::io::Result<Staging> {
        std::fs::create_dir(&path)?;
        Ok(Staging { path, keep: false })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory (it was renamed into place): nothing is removed.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.path.display(), "cannot remove a failed upload's files: {e}");
            }
        }
    }
}

/// Where an upload's encoded blocks go.
#[derive(Debug)]
enum Sink {
    /// `blocks.bin` in a staging directory.
    Disk {
        staging: Staging,
        out: BufWriter<File>,
    },
    /// Memory (the built-in demo asset).
    Memory(Vec<u8>),
}

/// An upload in progress; see the module docs.
#[derive(Debug)]
pub struct Upload {
    name: String,
    parser: Fmp4Parser,
    signer: StreamSigner,
    block_size: usize,
    created_ms: u64,
    max_bytes: u64,
    /// Body bytes pushed so far.
    received: u64,
    init: Option<Bytes>,
    sink: Sink,
    fragments: Vec<VodFragment>,
    /// Offset of every block in `blocks.bin`, and the end of the last.
    offsets: Vec<u64>,
    timescale: Option<u32>,
    /// Where the reference track's samples end, in `timescale` ticks.
    media_end: u64,
}

impl Upload {
    /// An upload of asset `name` into `staging`, cutting blocks of
    /// `block_bytes` (clamped as live ingest clamps them), signed by
    /// `signer`, refused past `max_bytes` of file.
    pub fn to_disk(
        staging: Staging,
        name: &str,
        block_bytes: usize,
        max_bytes: u64,
        signer: StreamSigner,
        created_ms: u64,
    ) -> Result<Upload, VodError> {
        let file = File::create(staging.path().join(BLOCKS_FILE))?;
        let out = BufWriter::with_capacity(WRITE_BUFFER, file);
        let sink = Sink::Disk { staging, out };
        Ok(Upload::new(
            sink,
            name,
            block_bytes,
            max_bytes,
            signer,
            created_ms,
        ))
    }

    /// An upload kept in memory (the built-in demo asset).
    pub fn in_memory(
        name: &str,
        block_bytes: usize,
        max_bytes: u64,
        signer: StreamSigner,
        created_ms: u64,
    ) -> Upload {
        let sink = Sink::Memory(Vec::new());
        Upload::new(sink, name, block_bytes, max_bytes, signer, created_ms)
    }

    fn new(
        sink: Sink,
        name: &str,
        block_bytes: usize,
        max_bytes: u64,
        signer: StreamSigner,
        created_ms: u64,
    ) -> Upload {
        Upload {
            name: name.to_owned(),
            parser: Fmp4Parser::new(),
            signer,
            block_size: clamp_block_bytes(block_bytes),
            created_ms,
            max_bytes,
            received: 0,
            init: None,
            sink,
            fragments: Vec::new(),
            offsets: vec![0],
            timescale: None,
            media_end: 0,
        }
    }

    /// Body bytes pushed so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Feeds the next bytes of the file. After an error the upload is
    /// unusable; dropping it removes what it wrote.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), VodError> {
        self.received = self.received.saturating_add(chunk.len() as u64);
        if self.received > self.max_bytes {
            return Err(VodError::TooLarge(self.max_bytes));
        }
        for item in self.parser.push(chunk)? {
            match item {
                Item::Init(init) if self.init.is_none() => self.init = Some(init),
                Item::Init(_) => return Err(VodError::SecondInit),
                Item::Fragment(frag) => self.fragment(&frag)?,
            }
        }
        Ok(())
    }

    /// Cuts, signs and writes one fragment.
    fn fragment(&mut self, frag: &Fragment) -> Result<(), VodError> {
        if self.fragments.len() >= MAX_FRAGMENTS {
            return Err(VodError::TooManyFragments(MAX_FRAGMENTS));
        }
        let seq = self.offsets.len() as u64 - 1;
        self.fragments.push(VodFragment {
            seq,
            media_time: frag.media_time,
            keyframe: frag.keyframe,
        });
        // The splitter gives every fragment the reference track's timescale.
        self.timescale.get_or_insert(frag.timescale);
        if let Some(d) = frag.duration {
            self.media_end = self.media_end.max(frag.media_time.saturating_add(d));
        }
        for (i, (flags, payload)) in chunker::cut(frag, self.block_size).enumerate() {
            let block = self.signer.sign(
                seq + i as u64,
                flags,
                self.created_ms,
                frag.media_time,
                payload,
            )?;
            let encoded = block.block().encode();
            match &mut self.sink {
                Sink::Disk { out, .. } => out.write_all(&encoded)?,
                Sink::Memory(buf) => buf.extend_from_slice(&encoded),
            }
            let end = self.offsets.last().copied().unwrap_or(0) + encoded.len() as u64;
            self.offsets.push(end);
        }
        Ok(())
    }

    /// Checks the file ended cleanly with an init segment and at least one
    /// fragment, writes the init segment and the signed manifest, and returns
    /// the asset with its staging directory (`None` in memory), which the
    /// caller renames into place and then keeps.
    pub fn finish(self) -> Result<(Asset, Option<Staging>), VodError> {
        self.parser.finish()?;
        let init = self.init.ok_or(VodError::Media(fmp4::Fmp4Error::NoInit))?;
        let (Some(first), Some(timescale)) = (self.fragments.first(), self.timescale) else {
            return Err(VodError::NoFragments);
        };
        let blocks = self.offsets.len() as u64 - 1;
        let bytes = self.offsets.last().copied().unwrap_or(0);
        let manifest = Manifest {
            name: self.name,
            key: self.signer.key(),
            created_ms: self.created_ms,
            init_sha256: Sha256::digest(&init).into(),
            init_bytes: init.len() as u64,
            timescale,
            duration: self.media_end.saturating_sub(first.media_time),
            blocks,
            bytes,
            fragments: self.fragments,
        };
        let signed = manifest.sign(&self.signer).map_err(VodError::Manifest)?;
        let json = Bytes::from(signed.to_json());
        let (source, staging) = match self.sink {
            Sink::Disk { staging, out } => {
                let file = out.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
                drop(file);
                write_synced(&staging.path().join(INIT_FILE), &init)?;
                write_synced(&staging.path().join(MANIFEST_FILE), &json)?;
                // Opened before the rename into place; the handle follows the
                // file, and outlives a later replace or delete of the asset.
                let file = File::open(staging.path().join(BLOCKS_FILE))?;
                (BlockSource::File(Arc::new(file)), Some(staging))
            }
            Sink::Memory(buf) => (BlockSource::Memory(Bytes::from(buf)), None),
        };
        let asset = Asset::new(signed, json, init, self.offsets, source);
        Ok((asset, staging))
    }
}

/// Writes `bytes` to the new file `path` and flushes it to the disk.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{Clip, CLIP};
    use clubcast_protocol::block::{Block, BlockFlags, BlockVerifier as _};
    use clubcast_protocol::vod::{SignedManifest, MAX_RUN_BLOCKS};

    const BLOCK: usize = 1024;

    /// The demo clip uploaded into memory, fed in uneven chunks.
    fn clip_asset(chunk: usize) -> Result<Asset, VodError> {
        let mut up = Upload::in_memory(
            "clip",
            BLOCK,
            u64::MAX,
            StreamSigner::from_seed(&[3; 32]),
            42,
        );
        for c in CLIP.chunks(chunk) {
            up.push(c)?;
        }
        Ok(up.finish()?.0)
    }

    #[tokio::test]
    async fn the_demo_clip_becomes_blocks_that_verify_under_the_manifest_key() {
        let asset = clip_asset(1000).expect("the clip uploads");
        let clip = Clip::parse(CLIP).expect("the clip parses");
        let m = asset.manifest();
        assert_eq!(m.created_ms, 42);
        assert_eq!(asset.init(), &clip.init);
        asset
            .signed()
            .verify_init(asset.init())
            .expect("init matches");
        // The stored JSON reads back as the same signed manifest.
        let text = std::str::from_utf8(asset.manifest_json()).expect("utf-8");
        assert_eq!(
            &SignedManifest::from_json(text).expect("verifies"),
            asset.signed()
        );

        // One fragment table entry per fragment, at the block it starts.
        assert_eq!(m.fragments.len(), clip.fragments.len());
        let mut seq = 0;
        for (f, c) in m.fragments.iter().zip(&clip.fragments) {
            assert_eq!(
                (f.seq, f.media_time, f.keyframe),
                (seq, c.media_time, c.keyframe)
            );
            seq += c.bytes.len().div_ceil(BLOCK) as u64;
        }
        assert_eq!(m.blocks, seq);
        assert!(m.blocks > 2 * MAX_RUN_BLOCKS, "several runs' worth");

        // Every block, fetched run by run, verifies under the manifest's key
        // and carries its fragment's flags and time; the payloads are the file.
        let mut blocks = Vec::new();
        let mut from = 0;
        while from < m.blocks {
            let run = asset.run(from, MAX_RUN_BLOCKS).expect("in range");
            let bytes = asset.read(&run).await.expect("reads");
            let n = (run.seqs.end - run.seqs.start) as usize;
            blocks.extend(Block::decode_run(bytes, n).expect("decodes"));
            from = run.seqs.end;
        }
        assert_eq!(blocks.len() as u64, m.blocks);
        assert_eq!(
            m.bytes,
            blocks.iter().map(|b| b.encoded_len() as u64).sum::<u64>()
        );
        for (i, f) in m.fragments.iter().enumerate() {
            let range = m.fragment_blocks(i);
            let payload: Vec<u8> = blocks[range.start as usize..range.end as usize]
                .iter()
                .flat_map(|b| b.payload.to_vec())
                .collect();
            assert_eq!(payload, clip.fragments[i].bytes.to_vec(), "fragment {i}");
            for seq in range {
                let h = blocks[seq as usize].header;
                assert_eq!(h.seq, seq);
                assert_eq!(h.media_time, f.media_time);
                assert_eq!(h.ingest_time_ms, 42);
                let start = seq == f.seq;
                assert_eq!(h.flags.contains(BlockFlags::FRAGMENT_START), start);
                assert_eq!(h.flags.contains(BlockFlags::KEYFRAME), start && f.keyframe);
            }
        }
        for b in blocks {
            m.key.verify(b).expect("signed by the asset key");
        }
    }

    #[test]
    fn the_same_file_in_any_chunking_makes_the_same_asset() {
        let a = clip_asset(1).expect("byte by byte");
        let b = clip_asset(CLIP.len()).expect("at once");
        assert_eq!(a.manifest_json(), b.manifest_json());
    }

    #[test]
    fn a_second_init_segment_is_refused() {
        let mut up = Upload::in_memory("x", BLOCK, u64::MAX, StreamSigner::from_seed(&[1; 32]), 0);
        up.push(CLIP).expect("the first file");
        let err = up.push(CLIP).expect_err("a second moov");
        assert!(matches!(err, VodError::SecondInit), "{err}");
        assert_eq!(err.code(), "bad_media");
        assert_eq!(err.to_string(), "an on-demand asset has one init segment");
    }

    #[test]
    fn a_truncated_or_empty_file_is_refused() {
        let err = clip_asset_of(&CLIP[..CLIP.len() - 100]).expect_err("truncated");
        assert_eq!(err.code(), "truncated", "{err}");
        // ftyp + moov alone: an init segment without media.
        let init_len = Clip::parse(CLIP).expect("parses").init.len();
        let err = clip_asset_of(&CLIP[..init_len]).expect_err("no fragments");
        assert!(matches!(err, VodError::NoFragments), "{err}");
        let err = clip_asset_of(b"GIF89a, not a video at all").expect_err("not mp4");
        assert_eq!(err.code(), "not_mp4");
        assert_eq!(err.status(), axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    fn clip_asset_of(file: &[u8]) -> Result<Asset, VodError> {
        let mut up = Upload::in_memory("x", BLOCK, u64::MAX, StreamSigner::from_seed(&[1; 32]), 0);
        up.push(file)?;
        Ok(up.finish()?.0)
    }

    #[test]
    fn a_file_over_the_limit_is_refused_as_it_arrives() {
        let max = 100_000;
        let mut up = Upload::in_memory("x", BLOCK, max, StreamSigner::from_seed(&[1; 32]), 0);
        let mut err = None;
        for c in CLIP.chunks(30_000) {
            if let Err(e) = up.push(c) {
                err = Some(e);
                break;
            }
        }
        let err = err.expect("refused");
        assert!(matches!(err, VodError::TooLarge(m) if m == max), "{err}");
        assert!(
            up.received() <= max + 30_000,
            "refused at the chunk that crossed it"
        );
    }

    #[test]
    fn runs_are_clamped_to_the_cap_and_the_asset_end() {
        let asset = clip_asset(CLIP.len()).expect("uploads");
        let blocks = asset.manifest().blocks;
        let run = asset.run(0, 5).expect("in range");
        assert_eq!(run.seqs, 0..5);
        assert_eq!(asset.run(3, 0).expect("at least one").seqs, 3..4);
        assert_eq!(
            asset.run(0, u64::MAX).expect("capped").seqs,
            0..MAX_RUN_BLOCKS
        );
        assert_eq!(
            asset.run(blocks - 2, 10).expect("clamped").seqs,
            blocks - 2..blocks
        );
        let last = asset.run(blocks - 1, 1).expect("the last");
        assert_eq!(last.bytes.end, asset.manifest().bytes);
        for from in [blocks, blocks + 1, u64::MAX] {
            let err = asset.run(from, 1).expect_err("past the end");
            assert!(matches!(err, VodError::OutOfRange { .. }), "{err}");
            assert_eq!(err.status(), axum::http::StatusCode::RANGE_NOT_SATISFIABLE);
        }
    }
}
