//! The stream registry: each stream's key, init segment, block store and the
//! broadcast of new blocks to the seeder.
//!
//! A stream is created on first publish (or by the demo source) under a short
//! name. Its ed25519 key is generated once and persisted in the data dir, so the
//! stream keeps its id across restarts; its numbering, timeline end and init
//! are saved there too, so it goes on after one ([`crate::resume`]). Ingest calls [`Stream::set_init`] and
//! [`Stream::publish`]; the origin, signaling and seeder read. A stream whose
//! publisher stays away too long ends ([`Streams::end_away`]): the registry
//! forgets it, and its viewers and the seeder follow [`Stream::ended`].

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clubcast_protocol::block::{BlockError, BlockFlags, StreamKey, StreamSigner};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::resume::{Resume, ResumeFile};
use crate::store::{BlockStore, Lookup, StoreError, StoredBlock};

/// Most streams one server holds.
pub const MAX_STREAMS: usize = 256;
/// Longest stream name, and [`valid_name`]: stream names and on-demand asset
/// names follow one rule, the protocol's.
pub use clubcast_protocol::vod::{valid_name, MAX_NAME_LEN};
/// Silence after which a publisher may be taken over by a new one (see
/// [`PublishGuard`]).
pub const STALE_PUBLISHER: Duration = Duration::from_secs(3);
/// Most init segments a stream keeps for the blocks it stores: a publisher
/// that came back with other settings more often than this within the store's
/// window leaves its oldest blocks with the oldest kept init.
pub const MAX_INITS: usize = 16;
/// Capacity of the new-block broadcast; a receiver that lags further skips ahead.
pub const BLOCK_BROADCAST_CAPACITY: usize = 1024;

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The name is empty, too long or has characters other than `[a-z0-9_-]`.
    #[error("stream name must be 1-{MAX_NAME_LEN} characters of a-z, 0-9, '-' or '_'")]
    BadName,
    /// The server already holds [`MAX_STREAMS`] streams.
    #[error("the server holds its maximum of {MAX_STREAMS} streams")]
    TooMany,
    /// The key file could not be read or written.
    #[error("stream key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file exists but does not hold a 32-byte hex seed.
    #[error("stream key file {0} is corrupt")]
    CorruptKey(PathBuf),
    /// Another publisher holds the stream.
    #[error("stream is already being published")]
    Busy,
    /// The stream ended (its publisher stayed away too long): the registry
    /// makes a new one under its name ([`Streams::get_or_create`]).
    #[error("the stream ended")]
    Ended,
    /// This publisher's claim went to another one (it was silent too long).
    #[error("another publisher took the stream over")]
    Replaced,
    /// The block could not be signed.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The block could not be stored.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Bounds of each stream's block store.
#[derive(Debug, Clone, Copy)]
pub struct StoreConfig {
    /// Seconds of blocks kept.
    pub store_seconds: u64,
    /// Bytes kept at most.
    pub max_bytes: usize,
}

struct State {
    /// The init segments blocks refer to, oldest first: each with the seq of
    /// the first block it is in force for. At most [`MAX_INITS`].
    inits: VecDeque<(u64, Bytes)>,
    /// An init segment that differs from the newest, sent by a publisher
    /// that came back: in force from its next fragment start on.
    next_init: Option<Bytes>,
    /// The stored blocks; it also holds the next block's number.
    store: BlockStore,
    /// Where the last published fragment ended: decode time, timescale.
    timeline_end: Option<(u64, u32)>,
    /// Resumed from the data dir after a restart, and no fragment published
    /// since: the next fragment start is flagged `NEW_INIT`, since the
    /// players' init may not be the one the publisher comes back with.
    resumed: bool,
    /// The publisher holding the stream, if any.
    claim: Option<Claim>,
    /// Since when no publisher has been sending (`None` while one is).
    away_since: Option<Instant>,
    /// Id of the next claim.
    next_claim: u64,
}

impl State {
    /// The claim `id`, if it still holds the stream.
    fn claim_of(&mut self, id: u64) -> Option<&mut Claim> {
        self.claim.as_mut().filter(|c| c.id == id)
    }

    /// [`State::claim_of`], to read.
    fn claim_ref(&self, id: u64) -> Option<&Claim> {
        self.claim.as_ref().filter(|c| c.id == id)
    }
}

/// A publisher's hold on a stream.
struct Claim {
    id: u64,
    /// When it last sent data.
    last: Instant,
    /// Its longest silence so far.
    longest_gap: Duration,
    /// Cancelled when another publisher takes the stream over.
    replaced: CancellationToken,
}

impl Claim {
    /// Whether the publisher has been silent long enough to be taken over:
    /// [`STALE_PUBLISHER`], or twice its longest silence so far if that is
    /// longer (an encoder that sends long fragments is not stale between
    /// them).
    fn stale(&self, now: Instant) -> bool {
        now > self.stale_at()
    }

    /// When it turns stale if it sends nothing more.
    fn stale_at(&self) -> Instant {
        self.last + STALE_PUBLISHER.max(2 * self.longest_gap)
    }

    /// The publisher sent data at `now`.
    fn note(&mut self, now: Instant) {
        self.longest_gap = self
            .longest_gap
            .max(now.saturating_duration_since(self.last));
        self.last = now;
    }
}

/// One live stream.
pub struct Stream {
    /// URL form of the stream key.
    pub id: String,
    /// Short display name, also accepted in URLs.
    pub name: String,
    /// The public key blocks verify under.
    pub key: StreamKey,
    signer: StreamSigner,
    state: RwLock<State>,
    tx: broadcast::Sender<Arc<StoredBlock>>,
    /// Whether a publisher holds the stream and is not stale; set under the
    /// state lock as claims come, send, go quiet and go.
    publishing: watch::Sender<bool>,
    /// Where its state is saved across restarts (`None`: not saved).
    file: Option<ResumeFile>,
    /// Cancelled, under the state lock, when the stream ends
    /// ([`Stream::end_if_away`]): no claim is taken after.
    ended: CancellationToken,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Held by the one publisher of a stream; dropping it frees the stream.
///
/// A publisher silent for longer than [`STALE_PUBLISHER`] (or twice its
/// longest silence) may be taken over by a new claim: a publisher whose
/// connection died without closing (a network path that broke) would
/// otherwise hold its stream until ingest's idle timeout, and refuse the same
/// encoder coming back on a new connection. The old guard's
/// [`PublishGuard::replaced`] is then cancelled, and what it publishes after
/// is refused ([`StreamError::Replaced`]).
#[derive(Debug)]
pub struct PublishGuard {
    stream: Arc<Stream>,
    id: u64,
    replaced: CancellationToken,
}

impl PublishGuard {
    /// The stream being published.
    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }

    /// Cancelled when another publisher takes the stream over.
    pub fn replaced(&self) -> &CancellationToken {
        &self.replaced
    }

    /// Notes that the publisher sent data now.
    pub fn alive(&self) {
        self.alive_at(Instant::now());
    }

    fn alive_at(&self, now: Instant) {
        // A publisher taken over learns it at its next publish.
        let _ = self
            .stream
            .note_alive(&mut self.stream.write(), self.id, now);
    }

    /// How long from now until [`PublishGuard::note_quiet`] would find this
    /// publisher stale if it sends nothing more; `None` if it already shows
    /// as away or was taken over.
    pub fn quiet_in(&self) -> Option<Duration> {
        let st = self.stream.read();
        let c = st.claim_ref(self.id).filter(|_| self.stream.publishing())?;
        Some(c.stale_at().saturating_duration_since(Instant::now()))
    }

    /// Viewers are told the publisher is away ([`Stream::publishing`] goes
    /// false) if it is stale now: silent past [`STALE_PUBLISHER`] (or twice
    /// its longest silence), its connection may have died without a word,
    /// and a new publisher may take it over. Its next data says it is back.
    pub fn note_quiet(&self) {
        self.note_quiet_at(Instant::now());
    }

    fn note_quiet_at(&self, now: Instant) {
        let mut st = self.stream.write();
        if st.claim_of(self.id).is_some_and(|c| c.stale(now)) {
            self.stream.set_publishing(&mut st, false, now);
        }
    }

    /// [`Stream::set_init`], unless the stream was taken over.
    pub fn set_init(&self, init: Bytes) -> Result<(), StreamError> {
        let mut st = self.stream.write();
        if st.claim_of(self.id).is_none() {
            return Err(StreamError::Replaced);
        }
        self.stream.set_init_in(st, init);
        Ok(())
    }

    /// [`Stream::publish`], unless the stream was taken over: then nothing is
    /// published.
    pub fn publish(
        &self,
        flags: BlockFlags,
        media_time: u64,
        ingest_time_ms: u64,
        payload: Bytes,
    ) -> Result<Arc<StoredBlock>, StreamError> {
        let now = Instant::now();
        self.stream.publish_as(
            Some((self.id, now)),
            flags,
            media_time,
            ingest_time_ms,
            payload,
        )
    }
}

impl Drop for PublishGuard {
    fn drop(&mut self) {
        let mut st = self.stream.write();
        if st.claim_of(self.id).is_some() {
            st.claim = None;
            self.stream.set_publishing(&mut st, false, Instant::now());
            tracing::debug!(stream = %self.stream.name, "publisher gone");
        }
    }
}

impl Stream {
    fn new(name: String, signer: StreamSigner, cfg: StoreConfig, file: Option<ResumeFile>) -> Self {
        let key = signer.key();
        let (tx, _) = broadcast::channel(BLOCK_BROADCAST_CAPACITY);
        let saved = file.as_ref().and_then(ResumeFile::load);
        let resumed = saved.is_some();
        let Resume {
            next_seq,
            timeline_end,
            init,
            ..
        } = saved.unwrap_or_default();
        if resumed {
            tracing::info!(stream = %name, next_seq, "stream resumed from the data dir");
        }
        let store = BlockStore::new(cfg.store_seconds.saturating_mul(1000), cfg.max_bytes)
            .starting_at(next_seq);
        Stream {
            id: key.to_id(),
            name,
            key,
            signer,
            state: RwLock::new(State {
                inits: init.map(|i| (next_seq, i)).into_iter().collect(),
                next_init: None,
                store,
                timeline_end,
                resumed,
                claim: None,
                away_since: Some(Instant::now()),
                next_claim: 0,
            }),
            tx,
            publishing: watch::channel(false).0,
            file,
            ended: CancellationToken::new(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-written: every
        // writer finishes its mutation before anything that can panic.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims the stream for one publisher; `Busy` if another holds it and
    /// is not stale (see [`PublishGuard`]).
    pub fn claim(self: &Arc<Self>) -> Result<PublishGuard, StreamError> {
        self.claim_at(Instant::now())
    }

    fn claim_at(self: &Arc<Self>, now: Instant) -> Result<PublishGuard, StreamError> {
        let mut st = self.write();
        if self.ended.is_cancelled() {
            return Err(StreamError::Ended);
        }
        if let Some(old) = &st.claim {
            if !old.stale(now) {
                return Err(StreamError::Busy);
            }
            let silent = now.saturating_duration_since(old.last);
            tracing::info!(stream = %self.name, ?silent, "a silent publisher is taken over");
            old.replaced.cancel();
        }
        let id = st.next_claim;
        st.next_claim += 1;
        let replaced = CancellationToken::new();
        st.claim = Some(Claim {
            id,
            last: now,
            longest_gap: Duration::ZERO,
            replaced: replaced.clone(),
        });
        self.set_publishing(&mut st, true, now);
        Ok(PublishGuard {
            stream: self.clone(),
            id,
            replaced,
        })
    }

    /// The claim `id` sent data at `now`: it is fresh, and publishing if it
    /// had gone quiet; `Replaced` if it no longer holds the stream.
    fn note_alive(&self, st: &mut State, id: u64, now: Instant) -> Result<(), StreamError> {
        let c = st.claim_of(id).ok_or(StreamError::Replaced)?;
        c.note(now);
        self.set_publishing(st, true, now);
        Ok(())
    }

    /// Sets [`Stream::publishing`] under the lock `st`, and when the
    /// publisher went away if it now is.
    fn set_publishing(&self, st: &mut State, on: bool, now: Instant) {
        if self
            .publishing
            .send_if_modified(|p| std::mem::replace(p, on) != on)
        {
            st.away_since = (!on).then_some(now);
        }
    }

    /// Ends the stream if no publisher holds it and none has sent it for
    /// `after` or longer at `now`: no publisher may claim it any more, its
    /// state file says so (a restart does not open it again, see
    /// [`Streams::open_saved`]), and [`Stream::ended`] is cancelled, which
    /// tells its viewers and the seeder. Its numbering and timeline stay
    /// saved: a publisher that comes back later starts it again under the
    /// same key, numbered on, so no block URL ever names two blocks.
    /// Returns whether it ended now.
    pub fn end_if_away(&self, after: Duration, now: Instant) -> bool {
        let st = self.write();
        let away = st
            .away_since
            .is_some_and(|t| now.saturating_duration_since(t) >= after);
        if self.ended.is_cancelled() || st.claim.is_some() || !away {
            return false;
        }
        self.ended.cancel();
        let (next, end) = (st.store.next_seq(), st.timeline_end);
        drop(st);
        if let Some(f) = &self.file {
            f.save_ended(next, end);
        }
        true
    }

    /// Cancelled once the stream has ended ([`Stream::end_if_away`]).
    pub fn ended(&self) -> &CancellationToken {
        &self.ended
    }

    /// Whether a publisher holds the stream and is not stale (see
    /// [`PublishGuard::note_quiet`]).
    pub fn publishing(&self) -> bool {
        *self.publishing.borrow()
    }

    /// Follows [`Stream::publishing`]: the receiver sees each change (a
    /// takeover is none: a publisher holds the stream throughout).
    pub fn watch_publishing(&self) -> watch::Receiver<bool> {
        self.publishing.subscribe()
    }

    /// Sets the init segment (ftyp + moov) that every fragment after it needs.
    ///
    /// The stream's first init is in force from its first block. A later one
    /// (a publisher that came back) that differs from the one in force takes
    /// effect at the next fragment start, whose block [`Stream::publish`] flags
    /// [`BlockFlags::NEW_INIT`]; one equal to it changes nothing.
    pub fn set_init(&self, init: Bytes) {
        self.set_init_in(self.write(), init);
    }

    /// [`Stream::set_init`] under the lock `st`; saves the init once the lock
    /// is released if it is now the newest and was not.
    fn set_init_in(&self, mut st: std::sync::RwLockWriteGuard<'_, State>, init: Bytes) {
        let before = newest_init(&st).cloned();
        match st.inits.back() {
            None => {
                let seq = st.store.next_seq();
                st.inits.push_back((seq, init.clone()));
            }
            Some((_, newest)) if *newest == init => st.next_init = None,
            Some(_) => st.next_init = Some(init.clone()),
        }
        let changed = before.as_ref() != newest_init(&st);
        drop(st);
        if let (true, Some(f)) = (changed, &self.file) {
            f.save_init(&init);
        }
    }

    /// The newest init segment, once a publisher has sent one.
    pub fn init_segment(&self) -> Option<Bytes> {
        newest_init(&self.read()).cloned()
    }

    /// The init segment block `seq` needs: the last one in force at or before
    /// it (the oldest kept, for a seq before it). A player fetches it for its
    /// first block and again at each block flagged [`BlockFlags::NEW_INIT`].
    pub fn init_segment_at(&self, seq: u64) -> Option<Bytes> {
        let st = self.read();
        st.inits
            .iter()
            .rev()
            .find(|(from, _)| *from <= seq)
            .or(st.inits.front())
            .map(|(_, b)| b.clone())
    }

    /// Signs `payload` as the next block, stores it and announces it.
    pub fn publish(
        &self,
        flags: BlockFlags,
        media_time: u64,
        ingest_time_ms: u64,
        payload: Bytes,
    ) -> Result<Arc<StoredBlock>, StreamError> {
        self.publish_as(None, flags, media_time, ingest_time_ms, payload)
    }

    /// [`Stream::publish`] for the claim `by` (its id, and the time it sent
    /// the data), if given: refused if that claim no longer holds the stream.
    fn publish_as(
        &self,
        by: Option<(u64, Instant)>,
        flags: BlockFlags,
        media_time: u64,
        ingest_time_ms: u64,
        payload: Bytes,
    ) -> Result<Arc<StoredBlock>, StreamError> {
        let mut st = self.write();
        if let Some((id, now)) = by {
            self.note_alive(&mut st, id, now)?;
        }
        let seq = st.store.next_seq();
        let start = flags.contains(BlockFlags::FRAGMENT_START);
        let new_init = start && (st.next_init.is_some() || st.resumed);
        st.resumed &= !start;
        let flags = if new_init {
            flags.union(BlockFlags::NEW_INIT)
        } else {
            flags
        };
        let block = self
            .signer
            .sign(seq, flags, ingest_time_ms, media_time, payload)?;
        let stored = Arc::new(StoredBlock::new(block));
        st.store.push(stored.clone())?;
        if new_init {
            if let Some(init) = st.next_init.take() {
                st.inits.push_back((seq, init));
            }
        }
        // Keep the init in force at the oldest stored block and every later one.
        let oldest = st.store.oldest().unwrap_or(seq);
        while st.inits.len() > MAX_INITS || st.inits.get(1).is_some_and(|(s, _)| *s <= oldest) {
            st.inits.pop_front();
        }
        drop(st);
        // No receivers is fine: nobody is seeding yet.
        let _ = self.tx.send(stored.clone());
        Ok(stored)
    }

    /// Where the stream's media timeline ends: the decode time at which the
    /// last published fragment ends, in ticks of its timescale, with that
    /// timescale. A publisher that comes back continues from here.
    pub fn timeline_end(&self) -> Option<(u64, u32)> {
        self.read().timeline_end
    }

    /// Records that the timeline now ends at `end` ticks of `timescale`.
    pub fn set_timeline_end(&self, end: u64, timescale: u32) {
        self.write().timeline_end = Some((end, timescale));
    }

    /// Saves, before a fragment of `blocks` blocks is published, that the
    /// stream's numbering goes on after them and its timeline at `end` (or
    /// where it ends now): a restart then neither reuses a number nor
    /// starts the timeline over (see [`crate::resume`]). Nothing for a
    /// stream without a data dir.
    pub fn save_progress(&self, blocks: u64, end: Option<(u64, u32)>) {
        let Some(f) = &self.file else { return };
        let (next, end) = {
            let st = self.read();
            (
                st.store.next_seq().saturating_add(blocks),
                end.or(st.timeline_end),
            )
        };
        f.save(next, end);
    }

    /// The seq the next block gets.
    pub fn next_seq(&self) -> u64 {
        self.read().store.next_seq()
    }

    /// The live edge as peers are told it: the newest block, or with none
    /// stored yet the number before the next one (a stream resumed after a
    /// restart goes on from its saved number; 0 for a new stream).
    pub fn edge_seq(&self) -> u64 {
        let st = self.read();
        st.store
            .live_edge()
            .unwrap_or(st.store.next_seq().saturating_sub(1))
    }

    /// The oldest seq the origin can still serve or will serve: the oldest
    /// stored block, or the next one when none is (a stream resumed after a
    /// restart, before its publisher is back).
    pub fn first_available(&self) -> u64 {
        self.read().store.first_available()
    }

    /// New blocks as they are published.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredBlock>> {
        self.tx.subscribe()
    }

    /// Looks a block up.
    pub fn block(&self, seq: u64) -> Lookup {
        self.read().store.get(seq)
    }

    /// Seq of the newest block.
    pub fn live_edge(&self) -> Option<u64> {
        self.read().store.live_edge()
    }

    /// Where a new viewer should start playing.
    pub fn start_seq(&self, target_latency_ms: u64) -> Option<u64> {
        self.read().store.start_seq(target_latency_ms)
    }

    /// About how far apart the publisher's keyframes are, ms (see
    /// [`BlockStore::keyframe_interval_ms`]).
    pub fn keyframe_interval_ms(&self) -> Option<u64> {
        self.read().store.keyframe_interval_ms()
    }

    /// Payload bitrate over the stored window, kbit/s.
    pub fn bitrate_kbps(&self) -> u32 {
        self.read().store.bitrate_kbps()
    }
}

/// All streams of this server, by name and by id.
pub struct Streams {
    data_dir: Option<PathBuf>,
    cfg: StoreConfig,
    by_name: RwLock<HashMap<String, Arc<Stream>>>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Streams {
    /// A registry persisting keys under `data_dir` (ephemeral keys if `None`).
    pub fn new(data_dir: Option<PathBuf>, cfg: StoreConfig) -> Self {
        Streams {
            data_dir,
            cfg,
            by_name: RwLock::new(HashMap::new()),
        }
    }

    /// The stream called `name`, created (with a persisted key) if new.
    pub fn get_or_create(&self, name: &str) -> Result<Arc<Stream>, StreamError> {
        if !valid_name(name) {
            return Err(StreamError::BadName);
        }
        if let Some(s) = self
            .by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(s.clone());
        }
        let mut map = self.by_name.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(name) {
            return Ok(s.clone());
        }
        if map.len() >= MAX_STREAMS {
            return Err(StreamError::TooMany);
        }
        let signer = self.load_or_make_key(name)?;
        let file = self.data_dir.as_deref().map(|d| ResumeFile::new(d, name));
        let stream = Arc::new(Stream::new(name.to_owned(), signer, self.cfg, file));
        map.insert(name.to_owned(), stream.clone());
        Ok(stream)
    }

    /// Opens every stream whose state the data dir holds (see
    /// [`crate::resume`]), so that viewers reconnecting after a restart
    /// find their stream, with its publisher away, before the publisher is
    /// back. Returns how many were opened; one that cannot be (a corrupt
    /// key, past [`MAX_STREAMS`]) is logged and skipped.
    pub fn open_saved(&self) -> usize {
        let Some(dir) = &self.data_dir else { return 0 };
        let mut opened = 0;
        for name in crate::resume::saved_names(dir) {
            let ended = || ResumeFile::new(dir, &name).load().is_some_and(|r| r.ended);
            if !key_path(dir, &name).exists() || ended() {
                continue;
            }
            match self.get_or_create(&name) {
                Ok(_) => opened += 1,
                Err(e) => tracing::warn!(stream = %name, "saved stream not opened: {e}"),
            }
        }
        opened
    }

    /// Ends every stream whose publisher has been away for `after` or longer
    /// at `now` ([`Stream::end_if_away`]) and forgets it: it leaves the
    /// list, and a publish under its name makes a new one. Returns them.
    pub fn end_away(&self, after: Duration, now: Instant) -> Vec<Arc<Stream>> {
        let mut map = self.by_name.write().unwrap_or_else(|e| e.into_inner());
        let mut ended = Vec::new();
        map.retain(|_, s| {
            let end = s.end_if_away(after, now);
            if end {
                ended.push(s.clone());
            }
            !end
        });
        ended
    }

    /// Runs [`Streams::end_away`] until `shutdown`, often enough that a
    /// stream ends within a quarter of `after` past it (at most every 10 s).
    /// Each stream ended is logged and counted.
    pub fn spawn_ender(
        self: &Arc<Self>,
        after: Duration,
        metrics: Arc<crate::metrics::Metrics>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let streams = self.clone();
        let every = (after / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                for s in streams.end_away(after, Instant::now()) {
                    tracing::info!(stream = %s.name, ?after, "stream ended: its publisher stayed away");
                    metrics.stream_ended();
                }
            }
        })
    }

    /// A stream by id (any case, base32 or hex) or by name.
    pub fn get(&self, id_or_name: &str) -> Option<Arc<Stream>> {
        let map = self.by_name.read().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(id_or_name) {
            return Some(s.clone());
        }
        let key = StreamKey::from_id(id_or_name).ok()?;
        map.values().find(|s| s.key == key).cloned()
    }

    /// All streams, by name.
    pub fn list(&self) -> Vec<Arc<Stream>> {
        let map = self.by_name.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn load_or_make_key(&self, name: &str) -> Result<StreamSigner, StreamError> {
        let Some(dir) = &self.data_dir else {
            return Ok(StreamSigner::from_seed(&rand::random()));
        };
        let path = key_path(dir, name);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let seed = data_encoding::HEXLOWER_PERMISSIVE
                    .decode(text.trim().as_bytes())
                    .ok()
                    .and_then(|v| <[u8; 32]>::try_from(v).ok())
                    .ok_or_else(|| StreamError::CorruptKey(path.clone()))?;
                Ok(StreamSigner::from_seed(&seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let signer = StreamSigner::from_seed(&rand::random());
                let seed = data_encoding::HEXLOWER.encode(&signer.to_seed());
                replace_file(&path, seed.as_bytes(), true).map_err(|source| {
                    StreamError::KeyFile {
                        path: path.clone(),
                        source,
                    }
                })?;
                Ok(signer)
            }
            Err(source) => Err(StreamError::KeyFile { path, source }),
        }
    }
}

/// The newest init segment: the one a publisher that came back sent, else
/// the one in force.
fn newest_init(st: &State) -> Option<&Bytes> {
    st.next_init
        .as_ref()
        .or_else(|| st.inits.back().map(|(_, b)| b))
}

fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join("keys").join(format!("{name}.key"))
}

/// Replaces `path` with `bytes` atomically: written beside it (its name plus
/// `.tmp`), then renamed over it; its directory is created if missing.
/// `private`: readable by the owner only (a key).
pub(crate) fn replace_file(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    if private {
        restrict_permissions(&tmp);
    }
    std::fs::rename(&tmp, path)
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // Best effort: the key stays usable even where chmod is not allowed.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict_permissions(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;
    use clubcast_protocol::block::{Block, BlockVerifier};

    fn cfg() -> StoreConfig {
        StoreConfig {
            store_seconds: 120,
            max_bytes: usize::MAX,
        }
    }

    #[test]
    fn keys_persist_across_restarts() {
        let dir = std::env::temp_dir().join(format!("clubcast-keys-{}", std::process::id()));
        let id1 = Streams::new(Some(dir.clone()), cfg())
            .get_or_create("cam")
            .expect("ok")
            .id
            .clone();
        let id2 = Streams::new(Some(dir.clone()), cfg())
            .get_or_create("cam")
            .expect("ok")
            .id
            .clone();
        assert_eq!(id1, id2);
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    /// A restart (a new registry on the same data dir) goes on where the
    /// stream stood: the next number, the timeline end and the newest init.
    #[test]
    fn a_stream_resumes_after_a_restart() {
        use crate::ingest::chunker::publish_fragment;
        use crate::ingest::fmp4::Fragment;
        let dir = std::env::temp_dir().join(format!("clubcast-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let frag = |i: u64| Fragment {
            bytes: Bytes::from(vec![i as u8; 3000]),
            media_time: i * 1000,
            timescale: 1000,
            duration: Some(1000),
            keyframe: true,
            tracks: Vec::new(),
            sequence_offset: None,
        };
        let start = BlockFlags::FRAGMENT_START.union(BlockFlags::KEYFRAME);
        let (init_a, init_b) = (Bytes::from_static(b"init a"), Bytes::from_static(b"init b"));
        let first = Streams::new(Some(dir.clone()), cfg());
        assert_eq!(first.open_saved(), 0, "nothing saved yet");
        let s = first.get_or_create("cam").expect("ok");
        let guard = s.claim().expect("free");
        guard.set_init(init_a.clone()).expect("claimed");
        for i in 0..3 {
            publish_fragment(&guard, &frag(i), 1024).expect("publish");
        }
        // Another init, sent and not yet in force when the process dies.
        guard.set_init(init_b.clone()).expect("claimed");
        let (id, next) = (s.id.clone(), s.next_seq());
        assert_eq!(next, 9);
        drop((guard, s, first));

        let second = Streams::new(Some(dir.clone()), cfg());
        assert_eq!(second.open_saved(), 1);
        let s = second.get(&id).expect("opened before any publisher");
        assert!(!s.publishing());
        assert_eq!(s.next_seq(), next, "numbering goes on");
        assert_eq!(s.first_available(), next);
        assert!(matches!(s.block(next - 1), Lookup::Evicted));
        assert!(matches!(s.block(next), Lookup::NotYet));
        assert_eq!(s.timeline_end(), Some((3000, 1000)), "the timeline goes on");
        assert_eq!(s.init_segment(), Some(init_b.clone()), "the newest init");
        let guard = s.claim().expect("free");
        guard.set_init(init_b.clone()).expect("claimed");
        let flags = |b: Vec<Arc<StoredBlock>>| -> Vec<BlockFlags> {
            b.iter().map(|b| b.block.header().flags).collect()
        };
        // The players' init may not be this one: the first fragment says so.
        let blocks = publish_fragment(&guard, &frag(3), 1024).expect("publish");
        assert_eq!(blocks[0].seq(), next);
        assert_eq!(
            flags(blocks),
            [
                start.union(BlockFlags::NEW_INIT),
                BlockFlags::empty(),
                BlockFlags::empty()
            ]
        );
        let blocks = publish_fragment(&guard, &frag(4), 1024).expect("publish");
        assert_eq!(flags(blocks)[0], start, "only the first");
        assert_eq!(s.init_segment_at(next), Some(init_b));
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn a_stream_whose_publisher_stays_away_ends_and_starts_again_numbered_on() {
        use crate::ingest::chunker::publish_fragment;
        use crate::ingest::fmp4::Fragment;
        let dir = std::env::temp_dir().join(format!("clubcast-end-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let frag = Fragment {
            bytes: Bytes::from(vec![1; 3000]),
            media_time: 0,
            timescale: 1000,
            duration: Some(1000),
            keyframe: true,
            tracks: Vec::new(),
            sequence_offset: None,
        };
        let wait = Duration::from_secs(10);
        let streams = Streams::new(Some(dir.clone()), cfg());
        let s = streams.get_or_create("cam").expect("ok");
        let guard = s.claim().expect("free");
        guard
            .set_init(Bytes::from_static(b"init"))
            .expect("claimed");
        publish_fragment(&guard, &frag, 1024).expect("publish");
        let later = Instant::now() + 2 * wait;
        assert!(
            streams.end_away(wait, later).is_empty(),
            "a publisher holds it"
        );
        // Silent long enough to be taken over, and still connected: kept.
        guard.note_quiet_at(later);
        assert!(!s.publishing());
        assert!(streams.end_away(wait, later + 2 * wait).is_empty());
        // Away since it went quiet, not since its connection closed.
        drop(guard);
        assert!(
            streams.end_away(wait, later + wait / 2).is_empty(),
            "not away long enough"
        );
        let ended = streams.end_away(wait, later + wait);
        assert_eq!(ended.len(), 1);
        assert!(s.ended().is_cancelled());
        assert!(streams.get("cam").is_none() && streams.list().is_empty());
        assert!(matches!(s.claim(), Err(StreamError::Ended)));
        assert!(streams.end_away(wait, later + 2 * wait).is_empty(), "once");

        // A restart does not open it; a publisher that comes back makes it
        // again, under the same key, numbered on.
        let next = s.next_seq();
        drop((s, ended, streams));
        let streams = Streams::new(Some(dir.clone()), cfg());
        assert_eq!(streams.open_saved(), 0);
        let again = streams.get_or_create("cam").expect("ok");
        assert_eq!(again.next_seq(), next);
        let guard = again.claim().expect("free");
        let blocks = publish_fragment(&guard, &frag, 1024).expect("publish");
        assert_eq!(blocks[0].seq(), next);
        drop((guard, again, blocks, streams));
        assert_eq!(Streams::new(Some(dir.clone()), cfg()).open_saved(), 1);
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn a_stream_opened_after_a_restart_ends_if_no_publisher_comes() {
        let streams = Streams::new(None, cfg());
        let s = streams.get_or_create("cam").expect("ok");
        let wait = Duration::from_secs(10);
        assert!(streams.end_away(wait, Instant::now()).is_empty());
        assert_eq!(streams.end_away(wait, Instant::now() + wait).len(), 1);
        assert!(s.ended().is_cancelled());
    }

    #[test]
    fn another_init_takes_effect_at_a_fragment_start_and_is_kept_while_needed() {
        let streams = Streams::new(None, cfg());
        let s = streams.get_or_create("cam").expect("ok");
        let (a, b) = (Bytes::from_static(b"init a"), Bytes::from_static(b"init b"));
        let start = BlockFlags::FRAGMENT_START;
        let publish = |flags, at_ms| {
            let b = s.publish(flags, 0, at_ms, Bytes::from_static(b"x"));
            b.expect("publish").block.header().flags
        };
        assert_eq!(s.init_segment_at(0), None, "nothing published");
        s.set_init(a.clone());
        assert_eq!(publish(start, 0), start, "the first init needs no flag");
        publish(BlockFlags::empty(), 0);
        // The publisher comes back with the same init: nothing changes.
        s.set_init(a.clone());
        assert_eq!(publish(start, 0), start);
        // ... and with another: in force from its next fragment start on.
        s.set_init(b.clone());
        assert_eq!(s.init_segment(), Some(b.clone()), "the newest, for /init");
        assert_eq!(
            publish(start, 0),
            start.union(BlockFlags::NEW_INIT),
            "seq 3 starts the new init"
        );
        assert_eq!(publish(BlockFlags::empty(), 0), BlockFlags::empty());
        assert_eq!(publish(start, 0), start, "flagged once");
        for (seq, init) in [(0, &a), (2, &a), (3, &b), (5, &b), (99, &b)] {
            assert_eq!(s.init_segment_at(seq).as_ref(), Some(init), "seq {seq}");
        }
        // Once the blocks of the old init are evicted (older than the store's
        // 120 s), it goes.
        publish(start, 200_000);
        assert_eq!(s.init_segment_at(0), Some(b.clone()), "only b is left");
        // A publisher that keeps coming back with other inits: the newest
        // MAX_INITS are kept.
        let inits: Vec<Bytes> = (0..2 * MAX_INITS)
            .map(|i| Bytes::from(format!("init {i}")))
            .collect();
        let mut firsts = Vec::new();
        for init in &inits {
            s.set_init(init.clone());
            firsts.push(s.live_edge().expect("blocks") + 1);
            assert!(publish(start, 200_000).contains(BlockFlags::NEW_INIT));
        }
        assert_eq!(s.read().inits.len(), MAX_INITS);
        let last = inits.len() - 1;
        assert_eq!(s.init_segment_at(firsts[last]), Some(inits[last].clone()));
        let kept = inits.len() - MAX_INITS;
        assert_eq!(s.init_segment_at(firsts[kept]), Some(inits[kept].clone()));
        assert_eq!(
            s.init_segment_at(0),
            Some(inits[kept].clone()),
            "the oldest kept"
        );
    }

    /// A fresh stream `cam`, and a clock: `secs(n)` is `n` s after now.
    fn cam_and_clock() -> (Arc<Stream>, impl Fn(f64) -> Instant) {
        let streams = Streams::new(None, cfg());
        let s = streams.get_or_create("cam").expect("ok");
        let t = Instant::now();
        (s, move |n: f64| t + Duration::from_secs_f64(n))
    }

    #[test]
    fn a_silent_publisher_is_taken_over_and_publishes_nothing_after() {
        let (s, secs) = cam_and_clock();
        let t = secs(0.0);
        let mut watch = s.watch_publishing();
        assert!(!s.publishing() && !watch.has_changed().expect("open"));
        let first = s.claim_at(t).expect("free");
        assert!(s.publishing() && watch.has_changed().expect("open"));
        watch.mark_unchanged();
        first.alive_at(secs(1.0));
        assert!(
            matches!(s.claim_at(secs(3.9)), Err(StreamError::Busy)),
            "silent 2.9 s"
        );
        let second = s.claim_at(secs(4.1)).expect("silent 3.1 s: taken over");
        assert!(first.replaced().is_cancelled());
        assert!(!second.replaced().is_cancelled());
        let x = || Bytes::from_static(b"x");
        assert!(matches!(
            first.publish(BlockFlags::FRAGMENT_START, 0, 0, x()),
            Err(StreamError::Replaced)
        ));
        assert!(matches!(first.set_init(x()), Err(StreamError::Replaced)));
        assert_eq!(s.live_edge(), None, "the old publisher published nothing");
        // Its guard going away leaves the new claim alone.
        drop(first);
        assert!(matches!(s.claim_at(secs(4.2)), Err(StreamError::Busy)));
        assert!(
            s.publishing() && !watch.has_changed().expect("open"),
            "a takeover is no change to viewers"
        );
        second
            .publish(BlockFlags::FRAGMENT_START, 0, 0, x())
            .expect("the new one publishes");
        drop(second);
        assert!(!s.publishing() && watch.has_changed().expect("open"));
        // A publisher that sends 5-s fragments is not stale between them.
        let t = Instant::now();
        let slow = s.claim_at(t).expect("free again");
        slow.alive_at(t + Duration::from_secs(5));
        let after = |n: u64| t + Duration::from_secs(5) + Duration::from_millis(n);
        assert!(matches!(s.claim_at(after(9_900)), Err(StreamError::Busy)));
        assert!(
            s.claim_at(after(10_100)).is_ok(),
            "silent twice its longest gap"
        );
    }

    #[test]
    fn a_stale_publisher_shows_as_away_until_it_sends_again() {
        let (s, secs) = cam_and_clock();
        let guard = s.claim_at(secs(0.0)).expect("free");
        let mut watch = s.watch_publishing();
        assert!(guard.quiet_in().is_some());
        guard.alive_at(secs(1.0));
        guard.note_quiet_at(secs(3.9));
        assert!(s.publishing(), "silent 2.9 s");
        guard.note_quiet_at(secs(4.1));
        assert!(!s.publishing(), "silent 3.1 s: away");
        assert_eq!(guard.quiet_in(), None, "already away");
        assert!(watch.has_changed().expect("open"));
        watch.mark_unchanged();
        guard.note_quiet_at(secs(5.0));
        assert!(!watch.has_changed().expect("open"), "told once");
        guard.alive_at(secs(6.0));
        assert!(s.publishing(), "back");
        assert!(watch.has_changed().expect("open"));
        // Its longest silence (5 s) now sets when it goes stale.
        guard.note_quiet_at(secs(15.9));
        assert!(s.publishing());
        guard.note_quiet_at(secs(16.1));
        assert!(!s.publishing());
        drop(guard);
        assert!(!s.publishing());
    }

    #[test]
    fn published_blocks_verify_and_second_publisher_is_refused() {
        let streams = Streams::new(None, cfg());
        let s = streams.get_or_create("live").expect("ok");
        let guard = s.claim().expect("first publisher");
        assert!(matches!(s.claim(), Err(StreamError::Busy)));
        let b = s
            .publish(BlockFlags::FRAGMENT_START, 0, 1, Bytes::from_static(b"x"))
            .expect("publish");
        let back = Block::decode(b.encoded.clone()).expect("decodes");
        s.key.verify(back).expect("verifies");
        drop(guard);
        assert!(s.claim().is_ok());
        assert!(streams.get(&s.id).is_some());
        assert!(streams.get(&s.id.to_uppercase()).is_some());
        assert!(matches!(
            streams.get_or_create("Bad Name"),
            Err(StreamError::BadName)
        ));
    }
}
