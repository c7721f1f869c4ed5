//! What a stream keeps on disk beside its key, so that it goes on across a
//! server restart: the next block number, where its media timeline ends, and
//! its newest init segment.
//!
//! Without them a restarted server numbered a stream's blocks from 0 again and
//! started its timeline over: every viewer that reconnected found the stream
//! restarted and had to reload. With them, a publisher that comes back to the
//! restarted server continues the stream as if it had only been away (the
//! same as a publisher that reconnects to a running server), and the viewers
//! play on past the blocks the old process held in memory.
//!
//! Files, under `<data dir>/streams/`: `<name>.json` (`{"v":1,"next_seq":…,
//! "timeline_end":[ticks,timescale]}`, plus `"ended":true` once the stream
//! ended because its publisher stayed away: a restart does not open it, and
//! a publisher that comes back starts it again numbered on) and `<name>.init`
//! (the init segment's bytes). Both are replaced atomically (written beside, then renamed).
//! `next_seq` is written before a fragment's blocks are published, counting
//! them, so a block number is never given out twice whenever the process
//! dies; a number reserved and not used is a gap the players skip. A failed
//! write is logged once per stream and publishing goes on: the stream then
//! resumes from the last state written. A missing or unreadable state file
//! starts the stream's numbering at 0, as before this file existed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::stream::{replace_file, valid_name};

/// Version of the state file's format.
const VERSION: u32 = 1;
/// Largest state file read; a real one is under 100 bytes.
const MAX_STATE_BYTES: u64 = 4096;
/// Largest init segment read back (the ingest bound on an init segment).
const MAX_INIT_BYTES: u64 = crate::ingest::fmp4::MAX_INIT as u64;

/// Where a stream stood when its state was last written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// The number its next block gets.
    pub next_seq: u64,
    /// Where its timeline ends: decode time and its timescale.
    pub timeline_end: Option<(u64, u32)>,
    /// Its newest init segment.
    pub init: Option<Bytes>,
    /// It ended ([`crate::stream::Stream::end_if_away`]) and has had no
    /// publisher since.
    pub ended: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    v: u32,
    next_seq: u64,
    #[serde(default)]
    timeline_end: Option<(u64, u32)>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    ended: bool,
}

/// One stream's state files.
#[derive(Debug)]
pub struct ResumeFile {
    state: PathBuf,
    init: PathBuf,
    /// Serializes writers (a publisher and the one taking it over), and
    /// holds the highest `next_seq` saved: a writer that read an older
    /// number (the publisher being taken over) never saves it.
    writing: Mutex<u64>,
    /// Whether a failed write was logged already.
    warned: AtomicBool,
}

impl ResumeFile {
    /// The files of stream `name` under `data_dir`.
    pub fn new(data_dir: &Path, name: &str) -> Self {
        let dir = dir(data_dir);
        ResumeFile {
            state: dir.join(format!("{name}.json")),
            init: dir.join(format!("{name}.init")),
            writing: Mutex::new(0),
            warned: AtomicBool::new(false),
        }
    }

    /// The stream's saved state; `None` for a stream never saved, or (with a
    /// warning) one whose state file cannot be read.
    pub fn load(&self) -> Option<Resume> {
        let text = match read_bounded(&self.state, MAX_STATE_BYTES) {
            Ok(Some(t)) => t,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(file = %self.state.display(), "stream state unreadable, numbering starts at 0: {e}");
                return None;
            }
        };
        let saved: Saved = match serde_json::from_slice(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(file = %self.state.display(), "stream state corrupt, numbering starts at 0: {e}");
                return None;
            }
        };
        if saved.v != VERSION {
            tracing::warn!(file = %self.state.display(), v = saved.v, "stream state of another version, numbering starts at 0");
            return None;
        }
        let init = match read_bounded(&self.init, MAX_INIT_BYTES) {
            Ok(b) => b.map(Bytes::from),
            Err(e) => {
                tracing::warn!(file = %self.init.display(), "stream init unreadable: {e}");
                None
            }
        };
        let mut highest = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        *highest = (*highest).max(saved.next_seq);
        Some(Resume {
            next_seq: saved.next_seq,
            timeline_end: saved.timeline_end.filter(|(_, scale)| *scale > 0),
            init,
            ended: saved.ended,
        })
    }

    /// Writes the state: blocks are numbered from `next_seq` on, the
    /// timeline ends at `timeline_end`.
    pub fn save(&self, next_seq: u64, timeline_end: Option<(u64, u32)>) {
        self.save_state(next_seq, timeline_end, false);
    }

    /// [`ResumeFile::save`], and that the stream ended.
    pub fn save_ended(&self, next_seq: u64, timeline_end: Option<(u64, u32)>) {
        self.save_state(next_seq, timeline_end, true);
    }

    fn save_state(&self, next_seq: u64, timeline_end: Option<(u64, u32)>, ended: bool) {
        let mut highest = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        *highest = (*highest).max(next_seq);
        let saved = Saved {
            v: VERSION,
            next_seq: *highest,
            timeline_end,
            ended,
        };
        let json = serde_json::to_vec(&saved).expect("plain numbers");
        self.write(&self.state, &json);
    }

    /// Writes the newest init segment.
    pub fn save_init(&self, init: &[u8]) {
        let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        self.write(&self.init, init);
    }

    /// Replaces `path` with `bytes`; the caller holds `writing`.
    fn write(&self, path: &Path, bytes: &[u8]) {
        if let Err(e) = replace_file(path, bytes, false) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::error!(file = %path.display(), "cannot save stream state; after a restart the stream resumes from the last state saved: {e}");
            }
        }
    }
}

/// The names of the streams with a state file under `data_dir`, sorted.
pub fn saved_names(data_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir(data_dir)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".json")?;
            valid_name(stem).then(|| stem.to_owned())
        })
        .collect();
    names.sort();
    names
}

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("streams")
}

/// The file's bytes, `None` if it does not exist; an error past `max` bytes.
fn read_bounded(path: &Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("clubcast-resume-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn state_and_init_round_trip() {
        let dir = temp_dir("rt");
        let f = ResumeFile::new(&dir, "cam");
        assert_eq!(f.load(), None, "nothing saved yet");
        f.save(42, Some((90_000, 90_000)));
        f.save_init(b"init bytes");
        // A writer that read an older number (a publisher being taken
        // over) does not move the saved one back.
        f.save(40, Some((90_000, 90_000)));
        let back = ResumeFile::new(&dir, "cam").load().expect("saved");
        assert_eq!(
            back,
            Resume {
                next_seq: 42,
                timeline_end: Some((90_000, 90_000)),
                init: Some(Bytes::from_static(b"init bytes")),
                ended: false,
            }
        );
        assert_eq!(saved_names(&dir), vec!["cam".to_owned()]);
        // Ended, then published again: the flag goes with the next save.
        f.save_ended(43, None);
        let ended = ResumeFile::new(&dir, "cam").load().expect("saved");
        assert!(ended.ended);
        assert_eq!(ended.next_seq, 43);
        f.save(44, None);
        assert!(!ResumeFile::new(&dir, "cam").load().expect("saved").ended);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_failed_write_is_logged_once_and_not_fatal() {
        let dir = temp_dir("ro");
        std::fs::create_dir_all(&dir).expect("mkdir");
        // `streams` is a file: nothing can be written under it.
        std::fs::write(dir.join("streams"), b"").expect("write");
        let f = ResumeFile::new(&dir, "cam");
        f.save(5, None);
        assert!(f.warned.load(Ordering::Relaxed));
        f.save_init(b"init");
        f.save(6, None);
        assert_eq!(f.load(), None);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn bad_files_read_as_nothing_saved() {
        let dir = temp_dir("bad");
        let f = ResumeFile::new(&dir, "cam");
        std::fs::create_dir_all(dir.join("streams")).expect("mkdir");
        for bad in [
            &b"not json"[..],
            br#"{"v":2,"next_seq":5}"#,
            br#"{"v":1,"next_seq":-1}"#,
            &[b' '; 5000][..],
        ] {
            std::fs::write(dir.join("streams/cam.json"), bad).expect("write");
            assert_eq!(f.load(), None, "{:?}", String::from_utf8_lossy(bad));
        }
        // A zero timescale is dropped, not divided by.
        std::fs::write(
            dir.join("streams/cam.json"),
            br#"{"v":1,"next_seq":7,"timeline_end":[10,0]}"#,
        )
        .expect("write");
        assert_eq!(
            f.load(),
            Some(Resume {
                next_seq: 7,
                ..Resume::default()
            })
        );
        // Other files and bad names are not streams.
        std::fs::write(dir.join("streams/Bad Name.json"), b"{}").expect("write");
        std::fs::write(dir.join("streams/cam.json.tmp"), b"{}").expect("write");
        assert_eq!(saved_names(&dir), vec!["cam".to_owned()]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
