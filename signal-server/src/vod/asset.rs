//! One stored on-demand asset: its signed manifest, its init segment and
//! where each of its blocks lies.
//!
//! The manifest (as its JSON text, served as stored) and the init segment
//! are held in memory; the blocks stay in `blocks.bin` and only their
//! offsets are kept, one `u64` per block (4 MB for a 2-GiB asset of 4-KiB
//! blocks). A run of blocks is one contiguous byte range of the file, read
//! with a positioned read on the blocking pool, so no lock or file cursor is
//! shared between requests. The asset holds its `blocks.bin` open: a replace
//! or a delete renames and removes the directory, and requests already
//! reading the old asset finish from the open file.
//!
//! [`Asset::load`] reads an asset back at start and trusts nothing: the
//! manifest must parse, verify under its own key and name its directory, the
//! init segment must match the manifest's hash and length, and every block
//! header in `blocks.bin` is read in turn (seq, flags, length) so that the
//! offsets, the block count and the byte total must all agree with the
//! manifest. The block signatures are not checked again here: the browser
//! verifies every block under the manifest's key anyway.

use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use clubcast_protocol::block::{BlockFlags, BlockHeader, BLOCK_OVERHEAD, HEADER_LEN, MAX_PAYLOAD};
use clubcast_protocol::vod::{
    Manifest, SignedManifest, MAX_INIT_BYTES, MAX_MANIFEST_JSON, MAX_RUN_BLOCKS,
};
use serde::Serialize;

use super::{VodError, BLOCKS_FILE, INIT_FILE, MANIFEST_FILE};

/// Where an asset's encoded blocks are.
#[derive(Debug, Clone)]
pub enum BlockSource {
    /// `blocks.bin`, held open.
    File(Arc<File>),
    /// In memory (the built-in demo asset).
    Memory(Bytes),
}

/// A stored asset; see the module docs.
#[derive(Debug)]
pub struct Asset {
    signed: SignedManifest,
    json: Bytes,
    init: Bytes,
    /// Offset of every block, and the end of the last: `blocks + 1` entries.
    offsets: Vec<u64>,
    source: BlockSource,
}

/// An asset as `GET /vod` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AssetSummary {
    /// The asset name.
    pub name: String,
    /// The asset key (`StreamKey::to_id`), which signs its manifest and blocks.
    pub key: String,
    /// Media duration, seconds.
    pub duration_s: f64,
    /// Blocks, numbered `0..blocks`.
    pub blocks: u64,
    /// Sum of the encoded blocks' lengths.
    pub bytes: u64,
    /// Fragments.
    pub fragments: usize,
    /// Unix ms of the upload.
    pub created_ms: u64,
}

/// A run of blocks to serve: which blocks, and where they lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The blocks, `from..from + count`.
    pub seqs: Range<u64>,
    /// Their bytes in the asset's block data.
    pub bytes: Range<u64>,
}

impl Asset {
    /// An asset from its parts, as an upload made them.
    pub(super) fn new(
        signed: SignedManifest,
        json: Bytes,
        init: Bytes,
        offsets: Vec<u64>,
        source: BlockSource,
    ) -> Asset {
        Asset {
            signed,
            json,
            init,
            offsets,
            source,
        }
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        self.signed.manifest()
    }

    /// The signed manifest.
    pub fn signed(&self) -> &SignedManifest {
        &self.signed
    }

    /// The manifest JSON, as stored and served.
    pub fn manifest_json(&self) -> &Bytes {
        &self.json
    }

    /// The init segment.
    pub fn init(&self) -> &Bytes {
        &self.init
    }

    /// Whether the asset is built in (in memory, not stored in the data dir).
    pub fn builtin(&self) -> bool {
        matches!(self.source, BlockSource::Memory(_))
    }

    /// The asset as the list shows it.
    pub fn summary(&self) -> AssetSummary {
        let m = self.manifest();
        AssetSummary {
            name: m.name.clone(),
            key: m.key.to_id(),
            duration_s: m.duration_s(),
            blocks: m.blocks,
            bytes: m.bytes,
            fragments: m.fragments.len(),
            created_ms: m.created_ms,
        }
    }

    /// The run of `count` blocks from `from`: at most
    /// [`MAX_RUN_BLOCKS`], clamped at the asset's end; `from` past the end is
    /// [`VodError::OutOfRange`].
    pub fn run(&self, from: u64, count: u64) -> Result<Run, VodError> {
        let blocks = self.offsets.len() as u64 - 1;
        if from >= blocks {
            return Err(VodError::OutOfRange { from, blocks });
        }
        let end = from
            .saturating_add(count.clamp(1, MAX_RUN_BLOCKS))
            .min(blocks);
        // In range: from < end <= blocks < offsets.len().
        let bytes = self.offsets[from as usize]..self.offsets[end as usize];
        Ok(Run {
            seqs: from..end,
            bytes,
        })
    }

    /// The encoded length of each block of `run`, bytes, in order: from the
    /// offsets held in memory, without a read. Empty for a run that is not
    /// the asset's.
    pub fn block_lens(&self, run: &Run) -> impl Iterator<Item = u64> + '_ {
        let start = usize::try_from(run.seqs.start).unwrap_or(usize::MAX);
        let end = usize::try_from(run.seqs.end).unwrap_or(usize::MAX);
        let offsets = match start < end {
            true => self.offsets.get(start..=end).unwrap_or(&[]),
            false => &[],
        };
        offsets.windows(2).map(|w| w[1].saturating_sub(w[0]))
    }

    /// The encoded blocks of `run`, back to back. Reads the file on the
    /// blocking pool.
    pub async fn read(&self, run: &Run) -> Result<Bytes, VodError> {
        let len = usize::try_from(run.bytes.end - run.bytes.start)
            .map_err(|_| VodError::Damaged("a run too large for memory".into()))?;
        match &self.source {
            BlockSource::Memory(b) => {
                let start = run.bytes.start as usize;
                if start.saturating_add(len) > b.len() {
                    return Err(VodError::Damaged("a run past the asset's data".into()));
                }
                Ok(b.slice(start..start + len))
            }
            BlockSource::File(f) => {
                let (file, at) = (f.clone(), run.bytes.start);
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    read_exact_at(&file, &mut buf, at)?;
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(|e| VodError::Io(std::io::Error::other(e)))?
            }
        }
    }

    /// Reads the asset in directory `dir`, which must be called `name`, and
    /// checks it against its manifest (see the module docs).
    pub fn load(dir: &Path, name: &str) -> Result<Asset, VodError> {
        let damaged = |what: String| VodError::Damaged(what);
        let json = read_bounded(&dir.join(MANIFEST_FILE), MAX_MANIFEST_JSON as u64)?;
        let text = String::from_utf8(json).map_err(|_| damaged("manifest is not UTF-8".into()))?;
        let signed = SignedManifest::from_json(&text)
            .map_err(|e| damaged(format!("manifest: {e} ({})", e.code())))?;
        let m = signed.manifest();
        if m.name != name {
            return Err(damaged(format!(
                "the manifest names {:?}, not its directory",
                m.name
            )));
        }
        let init = read_bounded(&dir.join(INIT_FILE), MAX_INIT_BYTES)?;
        signed
            .verify_init(&init)
            .map_err(|e| damaged(format!("init segment: {e}")))?;
        let file = File::open(dir.join(BLOCKS_FILE))?;
        let offsets = scan(&file, m)?;
        Ok(Asset {
            json: Bytes::from(text),
            init: Bytes::from(init),
            offsets,
            source: BlockSource::File(Arc::new(file)),
            signed,
        })
    }
}

/// The offsets of `file`'s blocks, checked header by header against `m`:
/// seqs `0..blocks` in order, `FRAGMENT_START` exactly on the fragments'
/// first blocks, and the file exactly `m.bytes` long.
fn scan(file: &File, m: &Manifest) -> Result<Vec<u64>, VodError> {
    let damaged = |what: String| VodError::Damaged(format!("blocks.bin: {what}"));
    let len = file.metadata()?.len();
    if len != m.bytes {
        return Err(damaged(format!(
            "{len} bytes, the manifest says {}",
            m.bytes
        )));
    }
    let mut offsets = Vec::with_capacity(usize::try_from(m.blocks).unwrap_or(0).saturating_add(1));
    let mut starts = m.fragments.iter().map(|f| f.seq).peekable();
    let mut at = 0u64;
    for seq in 0..m.blocks {
        offsets.push(at);
        if at.saturating_add(BLOCK_OVERHEAD as u64) > len {
            return Err(damaged(format!("ends inside block {seq}")));
        }
        let mut head = [0u8; HEADER_LEN];
        read_exact_at(file, &mut head, at)?;
        let header =
            parse_header(&head).ok_or_else(|| damaged(format!("block {seq}: bad header")))?;
        if header.seq != seq {
            return Err(damaged(format!("block {seq} has seq {}", header.seq)));
        }
        let start = starts.next_if_eq(&seq).is_some();
        if header.flags.contains(BlockFlags::FRAGMENT_START) != start {
            return Err(damaged(format!("block {seq}: fragment start flag")));
        }
        at = at.saturating_add((BLOCK_OVERHEAD + header.payload_len as usize) as u64);
    }
    if at != len {
        return Err(damaged(format!(
            "{} blocks end at byte {at} of {len}",
            m.blocks
        )));
    }
    offsets.push(at);
    Ok(offsets)
}

/// A block header from its encoded form, `None` if it is not one.
fn parse_header(b: &[u8; HEADER_LEN]) -> Option<BlockHeader> {
    BlockHeader::parse(b)
        .ok()
        .filter(|h| h.payload_len as usize <= MAX_PAYLOAD)
}

/// Fills `buf` from `file` at `offset`, without moving a shared cursor.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt as _;
        let mut done = 0;
        while done < buf.len() {
            let n = file.seek_read(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}

/// The bytes of `path`; an error past `max` bytes.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, VodError> {
    use std::io::Read as _;
    let file =
        File::open(path).map_err(|e| VodError::Damaged(format!("{}: {e}", file_name(path))))?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(VodError::Damaged(format!(
            "{} is over {max} bytes",
            file_name(path)
        )));
    }
    Ok(bytes)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clubcast_protocol::block::{StreamSigner, BLOCK_VERSION};

    #[tokio::test]
    async fn block_lens_are_the_runs_blocks_as_encoded() {
        let asset = crate::vod::demo_asset("demo", 4096).expect("the demo clip");
        let run = asset.run(3, 40).expect("in range");
        let lens: Vec<u64> = asset.block_lens(&run).collect();
        assert_eq!(lens.len(), 40);
        assert_eq!(lens.iter().sum::<u64>(), run.bytes.end - run.bytes.start);
        let body = asset.read(&run).await.expect("reads");
        let blocks = clubcast_protocol::block::Block::decode_run(body, 40).expect("decodes");
        assert_eq!(blocks.len(), 40);
        for (b, len) in blocks.iter().zip(&lens) {
            assert_eq!(b.encoded_len() as u64, *len);
        }
        // The last block of the asset has a length too.
        let blocks = asset.manifest().blocks;
        let last = asset.run(blocks - 1, 1).expect("the last");
        assert_eq!(
            asset.block_lens(&last).collect::<Vec<_>>(),
            [last.bytes.end - last.bytes.start]
        );
        // A run that is not the asset's has none.
        let reversed = Range { start: 5, end: 3 };
        for seqs in [reversed, 0..u64::MAX, blocks..blocks + 1] {
            let foreign = Run { seqs, bytes: 0..0 };
            assert_eq!(asset.block_lens(&foreign).count(), 0);
        }
    }

    #[test]
    fn block_headers_read_back_as_the_protocol_encodes_them() {
        let signer = StreamSigner::from_seed(&[9; 32]);
        let flags = BlockFlags::FRAGMENT_START.union(BlockFlags::KEYFRAME);
        let block = signer
            .sign(77, flags, 1234, 5678, Bytes::from_static(b"payload"))
            .expect("signs");
        let encoded = block.block().encode();
        let mut head = [0u8; HEADER_LEN];
        head.copy_from_slice(&encoded[..HEADER_LEN]);
        assert_eq!(parse_header(&head), Some(*block.header()));
        head[0] = BLOCK_VERSION + 1;
        assert_eq!(parse_header(&head), None, "another version");
    }
}
