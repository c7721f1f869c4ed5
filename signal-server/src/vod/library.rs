//! The on-demand library: every asset by name, and the disk layout under
//! `<data dir>/vod/` that keeps them.
//!
//! ```text
//! <data dir>/vod/<name>/init.mp4        the init segment
//! <data dir>/vod/<name>/blocks.bin      the encoded blocks, back to back
//! <data dir>/vod/<name>/manifest.json   the signed manifest
//! <data dir>/vod/.up-<name>-<hex>/      an upload being written
//! <data dir>/vod/.old-<name>-<hex>/     an asset being replaced
//! <data dir>/vod/.del-<name>-<hex>/     an asset being deleted
//! ```
//!
//! A name is held by at most one upload or delete at a time (a second gets
//! 409 `asset_busy`), and at most [`MAX_UPLOADS`] run at once. An upload
//! writes its own staging directory and only at the end renames it into
//! place: a replaced asset is first moved aside, and moved back if the
//! rename fails, then removed. Requests reading the old asset finish from
//! its open file. At start, [`VodLibrary::load`] clears what a crash left
//! half done (an upload's staging directory; an asset moved aside is put
//! back if nothing took its place) and loads every asset that checks out
//! ([`Asset::load`]); a damaged one is logged and left on disk untouched.
//!
//! The map is a `std` lock held for lookups and inserts only, never across
//! an `.await` or disk I/O; the disk work runs on tokio's blocking pool.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use clubcast_protocol::block::StreamSigner;
use clubcast_protocol::vod::valid_name;
use futures_util::{Stream, StreamExt};

use super::asset::Asset;
use super::upload::{Staging, Upload};
use super::VodError;
use crate::ingest::chunker::now_ms;
use crate::ingest::IDLE_TIMEOUT;

/// Most uploads and deletes running at once.
pub const MAX_UPLOADS: usize = 8;
/// Body bytes gathered before they are handed to the blocking pool at once.
const BATCH_BYTES: usize = 1 << 20;

/// Prefix of an upload's staging directory.
const UPLOADING: &str = ".up-";
/// Prefix of a replaced asset moved aside.
const REPLACED: &str = ".old-";
/// Prefix of a deleted asset moved aside.
const DELETED: &str = ".del-";

/// The bounds of the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VodLimits {
    /// Largest upload, bytes of file (`--vod-max-bytes`).
    pub max_bytes: u64,
    /// Most stored assets (`--vod-max-assets`); the built-in one is not counted.
    pub max_assets: usize,
    /// Block payload size uploads are cut into (`--block-kib`).
    pub block_bytes: usize,
}

/// What [`VodLibrary::load`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Assets loaded.
    pub assets: usize,
    /// Asset directories skipped as damaged (left on disk).
    pub damaged: usize,
}

/// What a successful upload did.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The new asset.
    pub asset: Arc<Asset>,
    /// Whether it replaced an asset of the same name.
    pub replaced: bool,
}

/// The on-demand assets; see the module docs.
#[derive(Debug)]
pub struct VodLibrary {
    dir: PathBuf,
    limits: VodLimits,
    assets: RwLock<BTreeMap<String, Arc<Asset>>>,
    /// Names held by an upload or a delete, and whether the upload would
    /// add an asset (a new name) rather than replace one.
    held: Mutex<BTreeMap<String, bool>>,
}

/// A name held by one upload or delete; freed when dropped.
#[derive(Debug)]
struct Hold<'a> {
    library: &'a VodLibrary,
    name: String,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.library.held().remove(&self.name);
    }
}

impl VodLibrary {
    /// An empty library keeping its assets under `dir` (`<data dir>/vod`);
    /// nothing is read or created until [`VodLibrary::load`] or an upload.
    pub fn new(dir: PathBuf, limits: VodLimits) -> Self {
        VodLibrary {
            dir,
            limits,
            assets: RwLock::new(BTreeMap::new()),
            held: Mutex::new(BTreeMap::new()),
        }
    }

    /// The directory assets are stored in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bounds in force.
    pub fn limits(&self) -> VodLimits {
        self.limits
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Asset>>> {
        // Every update is one insert or remove: a poisoned map is still whole.
        self.assets.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Asset>>> {
        self.assets.write().unwrap_or_else(|e| e.into_inner())
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, bool>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The asset called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Asset>> {
        self.read().get(name).cloned()
    }

    /// Every asset, by name.
    pub fn list(&self) -> Vec<Arc<Asset>> {
        self.read().values().cloned().collect()
    }

    /// Number of assets, the built-in one included.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether there is no asset.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Adds a built-in asset (the demo clip), which uploads and deletes
    /// cannot touch. It hides a stored asset of the same name.
    pub fn add_builtin(&self, asset: Asset) {
        let name = asset.manifest().name.clone();
        if let Some(old) = self.write().insert(name.clone(), Arc::new(asset)) {
            if !old.builtin() {
                tracing::warn!(asset = %name, "a stored on-demand asset is hidden by the built-in one of the same name");
            }
        }
    }

    /// Holds `name` for an upload: refused if it is built in, exists and is
    /// not to be `replace`d, is held already, or would go over the limits.
    fn hold_upload(&self, name: &str, replace: bool) -> Result<Hold<'_>, VodError> {
        let mut held = self.held();
        let (exists, builtin, stored) = {
            let assets = self.read();
            let found = assets.get(name);
            let stored = assets.values().filter(|a| !a.builtin()).count();
            (found.is_some(), found.is_some_and(|a| a.builtin()), stored)
        };
        if builtin {
            return Err(VodError::Builtin(name.to_owned()));
        }
        if held.contains_key(name) {
            return Err(VodError::Busy(name.to_owned()));
        }
        // A damaged asset left on disk holds its name too.
        let exists = exists || self.dir.join(name).exists();
        if exists && !replace {
            return Err(VodError::Exists(name.to_owned()));
        }
        if held.len() >= MAX_UPLOADS {
            return Err(VodError::TooManyUploads(MAX_UPLOADS));
        }
        let adding = held.values().filter(|&&new| new).count();
        if !exists && stored + adding >= self.limits.max_assets {
            return Err(VodError::Full(self.limits.max_assets));
        }
        held.insert(name.to_owned(), !exists);
        Ok(Hold {
            library: self,
            name: name.to_owned(),
        })
    }

    /// Holds `name` for a delete.
    fn hold_delete(&self, name: &str) -> Result<Hold<'_>, VodError> {
        let mut held = self.held();
        match self.get(name) {
            None => return Err(VodError::UnknownAsset(name.to_owned())),
            Some(a) if a.builtin() => return Err(VodError::Builtin(name.to_owned())),
            Some(_) => {}
        }
        if held.contains_key(name) {
            return Err(VodError::Busy(name.to_owned()));
        }
        if held.len() >= MAX_UPLOADS {
            return Err(VodError::TooManyUploads(MAX_UPLOADS));
        }
        held.insert(name.to_owned(), false);
        Ok(Hold {
            library: self,
            name: name.to_owned(),
        })
    }

    /// Stores the fragmented MP4 file `body` as asset `name` (replacing one
    /// of that name only if `replace`), signed with a fresh asset key. The
    /// body is read as it arrives, and a stall of [`IDLE_TIMEOUT`] ends it.
    /// On any error, nothing is left behind and an old asset stays as it was.
    pub async fn store<S>(&self, name: &str, replace: bool, mut body: S) -> Result<Stored, VodError>
    where
        S: Stream<Item = Result<Bytes, VodError>> + Unpin,
    {
        if !valid_name(name) {
            return Err(VodError::BadName);
        }
        let _hold = self.hold_upload(name, replace)?;
        let signer = StreamSigner::from_seed(&rand::random());
        let (dir, owned) = (self.dir.clone(), name.to_owned());
        let limits = self.limits;
        let mut upload = blocking(move || {
            std::fs::create_dir_all(&dir)?;
            let staging = Staging::create(dir.join(aside_name(UPLOADING, &owned)))?;
            Upload::to_disk(
                staging,
                &owned,
                limits.block_bytes,
                limits.max_bytes,
                signer,
                now_ms(),
            )
        })
        .await?;
        let mut batch = Vec::new();
        let mut batched = 0usize;
        loop {
            let next = tokio::time::timeout(IDLE_TIMEOUT, body.next())
                .await
                .map_err(|_| VodError::Idle)?;
            let Some(chunk) = next else { break };
            let chunk = chunk?;
            batched += chunk.len();
            // Refused before it is buffered, not a batch later.
            if upload.received().saturating_add(batched as u64) > limits.max_bytes {
                return Err(VodError::TooLarge(limits.max_bytes));
            }
            batch.push(chunk);
            if batched >= BATCH_BYTES {
                upload = push(upload, std::mem::take(&mut batch)).await?;
                batched = 0;
            }
        }
        let upload = push(upload, batch).await?;
        let (dir, owned) = (self.dir.clone(), name.to_owned());
        let asset = blocking(move || {
            let (asset, staging) = upload.finish()?;
            if let Some(staging) = staging {
                commit(&dir, &owned, staging)?;
            }
            Ok(asset)
        })
        .await?;
        let asset = Arc::new(asset);
        let replaced = self
            .write()
            .insert(name.to_owned(), asset.clone())
            .is_some();
        let m = asset.manifest();
        tracing::info!(
            asset = %name,
            key = %m.key.to_id(),
            fragments = m.fragments.len(),
            blocks = m.blocks,
            bytes = m.bytes,
            replaced,
            "on-demand asset stored"
        );
        Ok(Stored { asset, replaced })
    }

    /// Deletes the stored asset `name`, from the disk and the library.
    pub async fn delete(&self, name: &str) -> Result<(), VodError> {
        if !valid_name(name) {
            return Err(VodError::BadName);
        }
        let _hold = self.hold_delete(name)?;
        let (dir, owned) = (self.dir.clone(), name.to_owned());
        let aside = blocking(move || {
            let aside = dir.join(aside_name(DELETED, &owned));
            match std::fs::rename(dir.join(&owned), &aside) {
                Ok(()) => Ok(Some(aside)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await?;
        self.write().remove(name);
        tracing::info!(asset = %name, "on-demand asset deleted");
        if let Some(aside) = aside {
            // Gone from the library already; what is left is only disk space.
            let _ = blocking(move || {
                std::fs::remove_dir_all(&aside).map_err(|e| {
                    tracing::warn!(dir = %aside.display(), "cannot remove a deleted asset's files: {e}");
                    VodError::Io(e)
                })
            })
            .await;
        }
        Ok(())
    }

    /// Loads every asset stored under the directory (see the module docs).
    /// Blocking: called once at start.
    pub fn load(&self) -> Loaded {
        let mut loaded = Loaded::default();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return loaded,
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), "cannot read the on-demand assets: {e}");
                return loaded;
            }
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        // Half-done work first: an asset moved aside may come back.
        for entry in names.iter().filter(|n| n.starts_with('.')) {
            self.recover(entry);
        }
        let names: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|e| {
                e.filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| valid_name(n))
                    .collect()
            })
            .unwrap_or_default();
        let mut assets = self.write();
        for name in names {
            match Asset::load(&self.dir.join(&name), &name) {
                Ok(asset) => {
                    assets.insert(name, Arc::new(asset));
                    loaded.assets += 1;
                }
                Err(e) => {
                    tracing::error!(asset = %name, dir = %self.dir.join(&name).display(), "on-demand asset skipped, left on disk: {e}");
                    loaded.damaged += 1;
                }
            }
        }
        loaded
    }

    /// Finishes what a crash interrupted for the directory entry `entry`.
    fn recover(&self, entry: &str) {
        let path = self.dir.join(entry);
        let remove = |why: &str| match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!(dir = %path.display(), "removed {why}"),
            Err(e) => tracing::warn!(dir = %path.display(), "cannot remove {why}: {e}"),
        };
        if entry.starts_with(UPLOADING) {
            remove("an interrupted upload");
        } else if entry.starts_with(DELETED) {
            remove("an interrupted delete");
        } else if let Some(rest) = entry.strip_prefix(REPLACED) {
            let Some((name, _)) = rest.rsplit_once('-') else {
                return;
            };
            let target = self.dir.join(name);
            if valid_name(name) && !target.exists() {
                match std::fs::rename(&path, &target) {
                    Ok(()) => {
                        tracing::warn!(asset = %name, "an interrupted replace put the old asset back")
                    }
                    Err(e) => {
                        tracing::error!(dir = %path.display(), "cannot put a replaced asset back: {e}")
                    }
                }
            } else {
                remove("a replaced asset");
            }
        }
    }
}

/// Feeds `batch` to `upload` on the blocking pool.
async fn push(mut upload: Upload, batch: Vec<Bytes>) -> Result<Upload, VodError> {
    if batch.is_empty() {
        return Ok(upload);
    }
    blocking(move || {
        for chunk in &batch {
            upload.push(chunk)?;
        }
        Ok(upload)
    })
    .await
}

/// Runs `f` on the blocking pool. If the caller's future is dropped, `f`
/// still runs to its end, and drops (and so cleans up) what it owns there.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VodError> + Send + 'static,
) -> Result<T, VodError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| VodError::Io(std::io::Error::other(e)))?
}

/// Moves `staging` into place as `<dir>/<name>`, moving an asset already
/// there aside first and removing it after; on failure the old asset is
/// put back and the staging directory removed.
fn commit(dir: &Path, name: &str, staging: Staging) -> Result<(), VodError> {
    let target = dir.join(name);
    let old = match std::fs::symlink_metadata(&target) {
        Ok(_) => {
            let aside = dir.join(aside_name(REPLACED, name));
            std::fs::rename(&target, &aside)?;
            Some(aside)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    if let Err(e) = std::fs::rename(staging.path(), &target) {
        if let Some(aside) = &old {
            if let Err(back) = std::fs::rename(aside, &target) {
                tracing::error!(asset = %name, "cannot put the old asset back ({back}); it is restored at the next start");
            }
        }
        return Err(e.into());
    }
    staging.keep();
    if let Some(aside) = old {
        if let Err(e) = std::fs::remove_dir_all(&aside) {
            tracing::warn!(dir = %aside.display(), "cannot remove a replaced asset's files: {e}");
        }
    }
    Ok(())
}

/// `<prefix><name>-<8 random hex digits>`: a directory name no asset has.
fn aside_name(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::CLIP;
    use crate::vod::{BLOCKS_FILE, INIT_FILE, MANIFEST_FILE};
    use futures_util::stream;
    use std::time::Duration;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("clubcast-vod-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn limits() -> VodLimits {
        VodLimits {
            max_bytes: 64 << 20,
            max_assets: 10,
            block_bytes: 4096,
        }
    }

    fn library(dir: &Path, limits: VodLimits) -> VodLibrary {
        VodLibrary::new(dir.to_path_buf(), limits)
    }

    /// `file` as a request body of 64-KiB chunks.
    fn body(file: &'static [u8]) -> impl Stream<Item = Result<Bytes, VodError>> + Unpin {
        stream::iter(file.chunks(64 * 1024).map(|c| Ok(Bytes::from_static(c))))
    }

    /// The entries of `dir`, sorted.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|e| {
                e.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    async fn all_blocks(asset: &Asset) -> Bytes {
        let mut out = bytes::BytesMut::new();
        let mut from = 0;
        while from < asset.manifest().blocks {
            let run = asset
                .run(from, clubcast_protocol::vod::MAX_RUN_BLOCKS)
                .expect("in range");
            out.extend_from_slice(&asset.read(&run).await.expect("reads"));
            from = run.seqs.end;
        }
        out.freeze()
    }

    #[tokio::test]
    async fn an_abandoned_upload_leaves_nothing_and_frees_its_name() {
        let dir = temp_dir("abandoned");
        let lib = library(&dir, limits());
        // Half the file, then the client goes quiet and hangs up.
        let half = body(&CLIP[..CLIP.len() / 2]).chain(stream::pending());
        let upload =
            tokio::time::timeout(Duration::from_millis(300), lib.store("clip", false, half));
        assert!(upload.await.is_err(), "still waiting for the rest");
        // The staging directory goes with the last owner of the upload.
        for _ in 0..100 {
            if entries(&dir).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(entries(&dir).is_empty(), "left behind: {:?}", entries(&dir));
        lib.store("clip", false, body(CLIP))
            .await
            .expect("the name is free");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_stored_asset_is_read_back_after_a_restart() {
        let dir = temp_dir("roundtrip");
        let lib = library(&dir, limits());
        let stored = lib.store("clip", false, body(CLIP)).await.expect("stored");
        assert!(!stored.replaced);
        assert_eq!(entries(&dir), ["clip"], "no staging left");
        assert_eq!(
            entries(&dir.join("clip")),
            [BLOCKS_FILE, INIT_FILE, MANIFEST_FILE]
        );

        let again = library(&dir, limits());
        assert_eq!(
            again.load(),
            Loaded {
                assets: 1,
                damaged: 0
            }
        );
        let back = again.get("clip").expect("loaded");
        assert_eq!(back.manifest_json(), stored.asset.manifest_json());
        assert_eq!(back.init(), stored.asset.init());
        assert_eq!(all_blocks(&back).await, all_blocks(&stored.asset).await);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_failed_upload_leaves_nothing_and_the_old_asset_as_it_was() {
        let dir = temp_dir("failed");
        let lib = library(&dir, limits());
        for (file, code) in [
            (&CLIP[..CLIP.len() - 100], "truncated"),
            (&CLIP[..CLIP.len() / 2], "truncated"),
        ] {
            let err = lib
                .store("clip", false, body(file))
                .await
                .expect_err("refused");
            assert_eq!(err.code(), code, "{err}");
        }
        let twice: &'static [u8] = [CLIP, CLIP].concat().leak();
        let err = lib
            .store("clip", false, body(twice))
            .await
            .expect_err("two inits");
        assert!(matches!(err, VodError::SecondInit), "{err}");
        assert!(lib.get("clip").is_none());
        assert!(entries(&dir).is_empty(), "left behind: {:?}", entries(&dir));

        // The same failures as replacements: the old asset stays, on disk too.
        let old = lib
            .store("clip", false, body(CLIP))
            .await
            .expect("stored")
            .asset;
        let err = lib
            .store("clip", true, body(&CLIP[..CLIP.len() - 1]))
            .await
            .expect_err("truncated");
        assert_eq!(err.code(), "truncated");
        assert!(Arc::ptr_eq(&lib.get("clip").expect("still there"), &old));
        assert_eq!(entries(&dir), ["clip"]);
        let again = library(&dir, limits());
        assert_eq!(again.load().assets, 1);
        assert_eq!(
            again.get("clip").expect("loaded").manifest().key,
            old.manifest().key
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_existing_name_is_replaced_only_when_asked() {
        let dir = temp_dir("replace");
        let lib = library(&dir, limits());
        let first = lib
            .store("clip", false, body(CLIP))
            .await
            .expect("stored")
            .asset;
        let err = lib
            .store("clip", false, body(CLIP))
            .await
            .expect_err("exists");
        assert!(matches!(err, VodError::Exists(_)), "{err}");
        assert_eq!(err.status(), axum::http::StatusCode::CONFLICT);
        let second = lib.store("clip", true, body(CLIP)).await.expect("replaced");
        assert!(second.replaced);
        assert_ne!(
            second.asset.manifest().key,
            first.manifest().key,
            "a fresh key"
        );
        assert_eq!(
            lib.get("clip").expect("there").manifest().key,
            second.asset.manifest().key
        );
        assert_eq!(entries(&dir), ["clip"], "the old files are gone");
        // A request that began on the old asset still reads it from its open file.
        assert_eq!(
            all_blocks(&first).await.len() as u64,
            first.manifest().bytes
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_damaged_asset_is_skipped_and_left_on_disk() {
        let dir = temp_dir("damaged");
        let lib = library(&dir, limits());
        for name in ["good", "short", "flipped", "badinit", "renamed"] {
            lib.store(name, false, body(CLIP)).await.expect("stored");
        }
        let blocks = dir.join("short").join(BLOCKS_FILE);
        let len = std::fs::metadata(&blocks).expect("there").len();
        std::fs::File::options()
            .write(true)
            .open(&blocks)
            .and_then(|f| f.set_len(len - 1))
            .expect("truncated");
        // A header byte (the seq of block 1), the file length kept.
        let path = dir.join("flipped").join(BLOCKS_FILE);
        let mut bytes = std::fs::read(&path).expect("read");
        let second = lib
            .get("flipped")
            .expect("there")
            .run(1, 1)
            .expect("run")
            .bytes
            .start;
        bytes[second as usize + 9] ^= 1;
        std::fs::write(&path, bytes).expect("write");
        let path = dir.join("badinit").join(INIT_FILE);
        let mut init = std::fs::read(&path).expect("read");
        init[20] ^= 1;
        std::fs::write(&path, init).expect("write");
        std::fs::rename(dir.join("renamed"), dir.join("other")).expect("rename");

        let again = library(&dir, limits());
        assert_eq!(
            again.load(),
            Loaded {
                assets: 1,
                damaged: 4
            }
        );
        assert!(again.get("good").is_some());
        assert_eq!(
            entries(&dir),
            ["badinit", "flipped", "good", "other", "short"],
            "nothing deleted"
        );
        assert_eq!(entries(&dir.join("short")).len(), 3, "files kept");
        // Its name is still taken: only a replace may overwrite it.
        let err = again
            .store("short", false, body(CLIP))
            .await
            .expect_err("exists");
        assert!(matches!(err, VodError::Exists(_)), "{err}");
        again
            .store("short", true, body(CLIP))
            .await
            .expect("replaced");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn what_a_crash_left_half_done_is_cleared_at_start() {
        let dir = temp_dir("crash");
        let lib = library(&dir, limits());
        lib.store("kept", false, body(CLIP)).await.expect("stored");
        lib.store("moved", false, body(CLIP)).await.expect("stored");
        lib.store("dup", false, body(CLIP)).await.expect("stored");
        // A replace interrupted after the old asset was moved aside, one after
        // the new one took its place, an upload and a delete half done.
        std::fs::rename(dir.join("moved"), dir.join(".old-moved-0000abcd")).expect("aside");
        let copy = dir.join(".old-dup-0000abcd");
        std::fs::create_dir(&copy).expect("mkdir");
        std::fs::write(copy.join(BLOCKS_FILE), b"x").expect("write");
        std::fs::create_dir(dir.join(".up-new-00001234")).expect("mkdir");
        std::fs::create_dir(dir.join(".del-gone-00001234")).expect("mkdir");
        let again = library(&dir, limits());
        assert_eq!(
            again.load(),
            Loaded {
                assets: 3,
                damaged: 0
            }
        );
        assert_eq!(entries(&dir), ["dup", "kept", "moved"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_library_is_bounded_and_deletes_free_a_place() {
        let dir = temp_dir("bounds");
        let lib = library(
            &dir,
            VodLimits {
                max_assets: 1,
                ..limits()
            },
        );
        lib.store("one", false, body(CLIP)).await.expect("stored");
        let err = lib.store("two", false, body(CLIP)).await.expect_err("full");
        assert!(matches!(err, VodError::Full(1)), "{err}");
        assert_eq!(err.status(), axum::http::StatusCode::INSUFFICIENT_STORAGE);
        lib.store("one", true, body(CLIP))
            .await
            .expect("replacing goes on");
        assert!(matches!(
            lib.delete("two").await,
            Err(VodError::UnknownAsset(_))
        ));
        lib.delete("one").await.expect("deleted");
        assert!(lib.get("one").is_none());
        assert!(entries(&dir).is_empty());
        lib.store("two", false, body(CLIP))
            .await
            .expect("a place again");
        for bad in ["", "Caps", "a/b", "..", &"x".repeat(65)] {
            let err = lib
                .store(bad, false, body(CLIP))
                .await
                .expect_err("bad name");
            assert!(matches!(err, VodError::BadName), "{bad:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_name_takes_one_upload_at_a_time_and_builtins_stay() {
        let dir = temp_dir("busy");
        let lib = library(&dir, limits());
        let hold = lib.hold_upload("clip", false).expect("free");
        let err = lib.store("clip", true, body(CLIP)).await.expect_err("busy");
        assert!(matches!(err, VodError::Busy(_)), "{err}");
        drop(hold);
        lib.store("clip", false, body(CLIP))
            .await
            .expect("free again");
        lib.add_builtin(super::super::demo_asset("demo", 4096).expect("demo"));
        let err = lib
            .store("demo", true, body(CLIP))
            .await
            .expect_err("builtin");
        assert!(matches!(err, VodError::Builtin(_)), "{err}");
        assert!(matches!(
            lib.delete("demo").await,
            Err(VodError::Builtin(_))
        ));
        assert_eq!(lib.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
