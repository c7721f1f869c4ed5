//! The public key-value store, `/kv`: signed mutable items in the style of
//! BitTorrent's BEP 44 (`clubcast_protocol::kv` has the item format).
//!
//! | route | answer |
//! |---|---|
//! | `GET /kv/{key}` (`?salt=<hex>`) | 200: the item as JSON, `ETag: "<seq>"`; 404 `not_found` |
//! | `GET /kv/{key}?salt=<hex>&after=<seq>` with `Prefer: wait=<s>` | the item once its `seq` is above `after`, or 404 / the older item after min(s, [`MAX_WAIT`]) |
//! | `PUT /kv/{key}` | body: the item as JSON (its `key` must be the path's). 201 stored new, 200 replaced or unchanged (the same item again refreshes its lifetime) |
//!
//! A put is stored only if its signature verifies under its key and its `seq`
//! is above the stored one's: anyone may write, only the key's holder can
//! sign, and nobody, the server included, can roll an item back. A put may
//! carry `If-Match: "<seq>"` (compare and swap: stored only if the item
//! stored now has this `seq`, else 412) or `If-None-Match: *` (only if none).
//!
//! # Limits
//! | what | bound | at the bound |
//! |---|---|---|
//! | request body | [`MAX_BODY`] | 413 |
//! | salt, value, seq | `MAX_SALT`, `MAX_VALUE`, `MAX_SEQ` of the protocol | 400 `bad_item` |
//! | items | `--kv-max-items` | 507 `kv_full` for a new (key, salt); replacing goes on |
//! | lifetime | `--kv-ttl-seconds` since the last put | the item is gone (a put of the same item refreshes it) |
//! | waiting `GET`s | [`MAX_WAITERS`] at once, each at most [`MAX_WAIT`] | answered at once |
//! | puts per client address | `--kv-put-rate` per second, a burst of [`PUT_BURST_SECONDS`] seconds' worth (an IPv6 client is its /64) | 429 `rate_limited`, `Retry-After` |
//! | client addresses tracked | [`MAX_TRACKED_CLIENTS`] (quiet ones are forgotten) | 429 `rate_limited` for a new one |
//!
//! # On disk
//! With a data dir, the live items are written to `<data dir>/kv.jsonl` (one
//! `{"v":1,"expires_unix_ms":…,"item":{…}}` per line, replaced atomically) at
//! most every [`SAVE_EVERY`] after a put and at shutdown, and read back at
//! start: a crash loses at most the last [`SAVE_EVERY`] of puts. Each line
//! read back is verified again; a line that does not parse, verify or is past
//! its lifetime is skipped and counted in the log.
//!
//! Errors are JSON `{"code": "...", "message": "..."}`, counted in
//! `clubcast_rejects_total{code}`; `clubcast_kv_items` is the number stored and
//! `clubcast_kv_puts_total{result}` counts puts by outcome.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clubcast_protocol::kv::{parse_key, parse_salt, KvError, KvItem, KvItemJson};
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::metrics::Metrics;
use crate::signal::limits::TokenBucket;

/// Largest request body: an item with a full value and salt is about 1.6 KB of JSON.
pub const MAX_BODY: usize = 4096;
/// Longest a `GET` with `Prefer: wait` is held.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// Most `GET`s waiting at once; beyond it they are answered at once.
pub const MAX_WAITERS: usize = 1024;
/// A client's burst of puts, in seconds of its `--kv-put-rate`.
pub const PUT_BURST_SECONDS: u32 = 5;
/// Most client addresses whose put rate is tracked at once.
pub const MAX_TRACKED_CLIENTS: usize = 65_536;

/// Longest a put waits to be written to the data dir.
pub const SAVE_EVERY: Duration = Duration::from_secs(10);
/// The file under the data dir.
pub const FILE_NAME: &str = "kv.jsonl";
/// Version of a line of the file.
const FILE_VERSION: u32 = 1;

/// Shortest time between two sweeps of expired items when the store is full,
/// so that a flood of new keys against a full store costs no sweep each.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Why a put or a get is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvStoreError {
    /// The item, the key or the salt is malformed, or fails its bounds.
    #[error("{0}")]
    BadItem(#[from] KvError),
    /// The body is not an item as JSON.
    #[error("the body is not an item as JSON: {0}")]
    BadJson(String),
    /// The query is not `salt=<hex>&after=<seq>`.
    #[error("the query must be salt=<hex>&after=<seq>: {0}")]
    BadQuery(String),
    /// The body's key is not the path's.
    #[error("the item's key is not the one in the path")]
    KeyMismatch,
    /// The signature does not verify.
    #[error("the signature does not verify under the item's key")]
    BadSignature,
    /// The stored item has a higher `seq`, or the same `seq` with other bytes.
    #[error("seq {offered} is not above the stored item's {stored}")]
    SeqTooLow {
        /// The put's seq.
        offered: u64,
        /// The stored item's seq.
        stored: u64,
    },
    /// `If-Match` / `If-None-Match` does not hold.
    #[error("precondition failed: the stored item's seq is {stored:?}")]
    CasMismatch {
        /// The stored item's seq, if any.
        stored: Option<u64>,
    },
    /// `If-Match` is not `"<seq>"`.
    #[error("If-Match must be a quoted decimal seq, such as \"3\"")]
    BadPrecondition,
    /// The store holds `--kv-max-items` items.
    #[error("the store is full ({0} items); try again later")]
    Full(usize),
    /// Nothing under this key and salt.
    #[error("no item under this key and salt")]
    NotFound,
    /// This client address put more than `--kv-put-rate` allows.
    #[error("too many puts from this address; try again in {0} s")]
    RateLimited(u64),
}

impl KvStoreError {
    /// Stable code in the JSON body and in `clubcast_rejects_total`.
    pub fn code(&self) -> &'static str {
        match self {
            KvStoreError::BadItem(_) | KvStoreError::BadJson(_) => "bad_item",
            KvStoreError::BadQuery(_) => "bad_query",
            KvStoreError::KeyMismatch => "key_mismatch",
            KvStoreError::BadSignature => "bad_signature",
            KvStoreError::SeqTooLow { .. } => "seq_too_low",
            KvStoreError::CasMismatch { .. } => "cas_mismatch",
            KvStoreError::BadPrecondition => "bad_precondition",
            KvStoreError::Full(_) => "kv_full",
            KvStoreError::NotFound => "not_found",
            KvStoreError::RateLimited(_) => "rate_limited",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            KvStoreError::BadItem(_)
            | KvStoreError::BadJson(_)
            | KvStoreError::BadQuery(_)
            | KvStoreError::KeyMismatch
            | KvStoreError::BadSignature
            | KvStoreError::BadPrecondition => StatusCode::BAD_REQUEST,
            KvStoreError::SeqTooLow { .. } => StatusCode::CONFLICT,
            KvStoreError::CasMismatch { .. } => StatusCode::PRECONDITION_FAILED,
            KvStoreError::Full(_) => StatusCode::INSUFFICIENT_STORAGE,
            KvStoreError::NotFound => StatusCode::NOT_FOUND,
            KvStoreError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn respond(&self, metrics: &Metrics) -> Response {
        if !matches!(self, KvStoreError::NotFound) {
            metrics.reject(self.code());
        }
        let body = serde_json::json!({ "code": self.code(), "message": self.to_string() });
        let mut r = (self.status(), Json(body)).into_response();
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let KvStoreError::RateLimited(secs) = self {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
        }
        r
    }
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A new (key, salt).
    Created,
    /// A higher `seq` replaced the stored item.
    Replaced,
    /// The same item again: its lifetime starts over.
    Refreshed,
}

impl Stored {
    fn label(self) -> &'static str {
        match self {
            Stored::Created => "created",
            Stored::Replaced => "replaced",
            Stored::Refreshed => "refreshed",
        }
    }
}

/// A put's precondition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// None.
    Any,
    /// `If-Match: "<seq>"`: the stored item has this seq.
    Seq(u64),
    /// `If-None-Match: *`: nothing is stored.
    Absent,
}

type Slot = ([u8; 32], Vec<u8>);

#[derive(Debug)]
struct Entry {
    item: KvItem,
    stored: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    items: HashMap<Slot, Entry>,
    last_sweep: Option<Instant>,
    /// A put since the last snapshot.
    dirty: bool,
}

/// A line of the file.
#[derive(Debug, Serialize, Deserialize)]
struct SavedItem {
    v: u32,
    expires_unix_ms: u64,
    item: KvItemJson,
}

/// What [`KvStore::load`] read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Items stored.
    pub items: usize,
    /// Lines past their lifetime.
    pub expired: usize,
    /// Lines that do not parse or verify, of another version, or beyond `--kv-max-items`.
    pub refused: usize,
}

/// The items, bounded in number and lifetime.
#[derive(Debug)]
pub struct KvStore {
    inner: Mutex<Inner>,
    max_items: usize,
    ttl: Duration,
    /// Bumped at every stored put; waiting `GET`s watch it.
    changes: tokio::sync::watch::Sender<u64>,
    waiters: tokio::sync::Semaphore,
    /// Puts per second per client address; 0: no limit.
    put_rate: u32,
    clients: Mutex<Clients>,
}

#[derive(Debug, Default)]
struct Clients {
    buckets: HashMap<IpAddr, TokenBucket>,
    last_prune: Option<Instant>,
}

impl KvStore {
    /// An empty store of at most `max_items` items, each living `ttl` after its last put.
    pub fn new(max_items: usize, ttl: Duration) -> Self {
        KvStore {
            inner: Mutex::default(),
            max_items,
            ttl,
            changes: tokio::sync::watch::channel(0).0,
            waiters: tokio::sync::Semaphore::new(MAX_WAITERS),
            put_rate: 0,
            clients: Mutex::default(),
        }
    }

    /// Limits each client address to `per_sec` puts a second on average
    /// (0: no limit).
    pub fn with_put_rate(mut self, per_sec: u32) -> Self {
        self.put_rate = per_sec;
        self
    }

    /// Counts a put from `client` against its rate; refused over it.
    pub fn admit(&self, client: IpAddr, now: Instant) -> Result<(), KvStoreError> {
        if self.put_rate == 0 {
            return Ok(());
        }
        let client = client_key(client);
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if !clients.buckets.contains_key(&client) && clients.buckets.len() >= MAX_TRACKED_CLIENTS {
            // Forget the clients quiet long enough to be full again.
            if due(&mut clients.last_prune, now) {
                clients.buckets.retain(|_, b| !b.full_at(now));
            }
            if clients.buckets.len() >= MAX_TRACKED_CLIENTS {
                return Err(KvStoreError::RateLimited(1));
            }
        }
        let rate = self.put_rate;
        let bucket = clients
            .buckets
            .entry(client)
            .or_insert_with(|| TokenBucket::new(rate, rate.saturating_mul(PUT_BURST_SECONDS), now));
        if bucket.take(now) {
            Ok(())
        } else {
            Err(KvStoreError::RateLimited(bucket.wait_secs()))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update is a single insert or remove: a poisoned lock holds a valid map.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `item` if its signature verifies, its `seq` is above the stored
    /// one's and `pre` holds.
    pub fn put(
        &self,
        item: KvItem,
        pre: Precondition,
        now: Instant,
    ) -> Result<Stored, KvStoreError> {
        // Verify outside the lock: a flood of bad signatures does not stall readers.
        item.verify().map_err(|e| match e {
            KvError::Signature | KvError::Key => KvStoreError::BadSignature,
            e => KvStoreError::BadItem(e),
        })?;
        let slot = (item.key, item.salt.clone());
        let mut inner = self.lock();
        let ttl = self.ttl;
        let stored = inner
            .items
            .get(&slot)
            .filter(|e| now.saturating_duration_since(e.stored) < ttl)
            .map(|e| &e.item);
        let holds = match pre {
            Precondition::Any => true,
            Precondition::Seq(s) => stored.is_some_and(|i| i.seq == s),
            Precondition::Absent => stored.is_none(),
        };
        if !holds {
            return Err(KvStoreError::CasMismatch {
                stored: stored.map(|i| i.seq),
            });
        }
        let outcome = match stored {
            Some(old) if old.seq > item.seq || (old.seq == item.seq && *old != item) => {
                return Err(KvStoreError::SeqTooLow {
                    offered: item.seq,
                    stored: old.seq,
                });
            }
            Some(old) if *old == item => Stored::Refreshed,
            Some(_) => Stored::Replaced,
            None => Stored::Created,
        };
        if outcome == Stored::Created && !inner.items.contains_key(&slot) {
            if inner.items.len() >= self.max_items {
                sweep(&mut inner, ttl, now);
            }
            if inner.items.len() >= self.max_items {
                return Err(KvStoreError::Full(self.max_items));
            }
        }
        inner.items.insert(slot, Entry { item, stored: now });
        inner.dirty = true;
        drop(inner);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(outcome)
    }

    /// The live item under (`key`, `salt`).
    pub fn get(&self, key: &[u8; 32], salt: &[u8], now: Instant) -> Option<KvItem> {
        let inner = self.lock();
        let e = inner.items.get(&(*key, salt.to_vec()))?;
        (now.saturating_duration_since(e.stored) < self.ttl).then(|| e.item.clone())
    }

    /// Items stored, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits, at most `wait`, for an item under (`key`, `salt`) with a `seq`
    /// above `after` (any item when `after` is `None`); the item then, or
    /// what is stored at the end of the wait. Waits only while a slot of
    /// [`MAX_WAITERS`] is free.
    pub async fn wait(
        &self,
        key: &[u8; 32],
        salt: &[u8],
        after: Option<u64>,
        wait: Duration,
    ) -> Option<KvItem> {
        let fresh = |i: &KvItem| after.is_none_or(|a| i.seq > a);
        // Subscribe before looking, so a put in between is seen.
        let mut rx = self.changes.subscribe();
        let now = self.get(key, salt, Instant::now());
        if now.as_ref().is_some_and(fresh) || wait.is_zero() {
            return now;
        }
        let Ok(_slot) = self.waiters.try_acquire() else {
            return now;
        };
        let found = tokio::time::timeout(wait, async {
            while rx.changed().await.is_ok() {
                if let Some(i) = self.get(key, salt, Instant::now()).filter(fresh) {
                    return Some(i);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(i)) => Some(i),
            _ => self.get(key, salt, Instant::now()),
        }
    }
}

impl KvStore {
    /// The live items as the file's lines, if any put came since the last
    /// snapshot (or `force`); marks the store clean.
    pub fn snapshot(&self, now: Instant, force: bool) -> Option<Vec<u8>> {
        let unix_now = unix_ms(SystemTime::now());
        let mut inner = self.lock();
        if !inner.dirty && !force {
            return None;
        }
        inner.dirty = false;
        let mut out = Vec::new();
        for e in inner.items.values() {
            let age = now.saturating_duration_since(e.stored);
            let Some(left) = self.ttl.checked_sub(age).filter(|d| !d.is_zero()) else {
                continue;
            };
            let line = SavedItem {
                v: FILE_VERSION,
                expires_unix_ms: unix_now.saturating_add(left.as_millis() as u64),
                item: e.item.to_json(),
            };
            // A struct of strings and integers always serializes.
            if serde_json::to_writer(&mut out, &line).is_ok() {
                out.push(b'\n');
            }
        }
        Some(out)
    }

    /// Stores the items of a file written by [`KvStore::snapshot`], each
    /// verified again and living what was left of its lifetime.
    pub fn load(&self, file: &[u8], now: Instant) -> Loaded {
        let unix_now = unix_ms(SystemTime::now());
        let mut loaded = Loaded::default();
        let mut inner = self.lock();
        for line in file.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let saved = serde_json::from_slice::<SavedItem>(line)
                .ok()
                .filter(|s| s.v == FILE_VERSION && inner.items.len() < self.max_items);
            let Some(saved) = saved else {
                loaded.refused += 1;
                continue;
            };
            let item = KvItem::from_json(&saved.item);
            let Ok(item) = item.and_then(|i| i.verify().map(|()| i)) else {
                loaded.refused += 1;
                continue;
            };
            let left = Duration::from_millis(saved.expires_unix_ms.saturating_sub(unix_now));
            if left.is_zero() {
                loaded.expired += 1;
                continue;
            }
            // Stored as if put `ttl - left` ago (now, if the clock is that young).
            let stored = now
                .checked_sub(self.ttl.saturating_sub(left))
                .unwrap_or(now);
            let slot = (item.key, item.salt.clone());
            if inner
                .items
                .get(&slot)
                .is_some_and(|e| e.item.seq >= item.seq)
            {
                loaded.refused += 1;
                continue;
            }
            inner.items.insert(slot, Entry { item, stored });
            loaded.items += 1;
        }
        loaded
    }

    /// Reads `<data_dir>/kv.jsonl` if it exists (at most a full store's worth).
    pub fn load_from(&self, data_dir: &FsPath) -> std::io::Result<Loaded> {
        use std::io::Read as _;
        let path = data_dir.join(FILE_NAME);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::default()),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        let cap = (self.max_items as u64).saturating_mul(4096);
        file.take(cap).read_to_end(&mut bytes)?;
        Ok(self.load(&bytes, Instant::now()))
    }

    /// Writes the store to `<data_dir>/kv.jsonl` at most every [`SAVE_EVERY`]
    /// after a put, and once more when `shutdown` is cancelled.
    pub fn spawn_saver(
        self: std::sync::Arc<Self>,
        data_dir: PathBuf,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let path = data_dir.join(FILE_NAME);
            let mut failed = false;
            loop {
                let stop = tokio::select! {
                    () = tokio::time::sleep(SAVE_EVERY) => false,
                    () = shutdown.cancelled() => true,
                };
                if let Some(bytes) = self.snapshot(Instant::now(), false) {
                    let to = path.clone();
                    let written = tokio::task::spawn_blocking(move || {
                        crate::stream::replace_file(&to, &bytes, false)
                    })
                    .await;
                    let error = match written {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(e) => Some(e.to_string()),
                    };
                    if let Some(e) = &error {
                        // Dirty again, so the next round retries; warned once per outage.
                        self.lock().dirty = true;
                        if !failed {
                            tracing::warn!(%e, path = %path.display(), "cannot save the kv store; retrying");
                        }
                    }
                    failed = error.is_some();
                }
                if stop {
                    return;
                }
            }
        })
    }
}

/// The address a client's puts count under: an IPv6 client is its /64 (one
/// host usually has a whole one), an IPv4-mapped one its IPv4 address.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn sweep(inner: &mut Inner, ttl: Duration, now: Instant) {
    if due(&mut inner.last_sweep, now) {
        inner
            .items
            .retain(|_, e| now.saturating_duration_since(e.stored) < ttl);
    }
}

/// Whether a sweep is due: the first, or [`SWEEP_EVERY`] after the last
/// (then `now` is the last). A flood against a full map costs no sweep each.
fn due(last: &mut Option<Instant>, now: Instant) -> bool {
    if last.is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY) {
        return false;
    }
    *last = Some(now);
    true
}

/// The `/kv` routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/kv/{key}", get(get_item).put(put_item))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// `?salt=<hex>&after=<seq>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GetQuery {
    #[serde(default)]
    salt: String,
    after: Option<u64>,
}

async fn get_item(
    State(state): State<AppState>,
    Path(key): Path<String>,
    query: Result<Query<GetQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let metrics = &state.metrics;
    let answer = async {
        let Query(q) = query.map_err(|e| KvStoreError::BadQuery(e.body_text()))?;
        let key = parse_key(&key)?;
        let salt = parse_salt(&q.salt)?;
        let wait = crate::origin::prefer_wait(&headers, MAX_WAIT).unwrap_or(Duration::ZERO);
        let found = tokio::select! {
            f = state.kv.wait(&key, &salt, q.after, wait) => f,
            () = state.shutdown.cancelled() => state.kv.get(&key, &salt, Instant::now()),
        };
        found.ok_or(KvStoreError::NotFound)
    }
    .await;
    match answer {
        Ok(item) => item_response(StatusCode::OK, &item),
        Err(e) => e.respond(metrics),
    }
}

async fn put_item(
    State(state): State<AppState>,
    Path(key): Path<String>,
    client: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let answer = (|| {
        // Served without client addresses (a test's router): no per-client limit.
        if let Some(axum::Extension(ConnectInfo(addr))) = client {
            state.kv.admit(addr.ip(), Instant::now())?;
        }
        let j: KvItemJson =
            serde_json::from_slice(&body).map_err(|e| KvStoreError::BadJson(e.to_string()))?;
        let item = KvItem::from_json(&j)?;
        if parse_key(&key)? != item.key {
            return Err(KvStoreError::KeyMismatch);
        }
        let pre = precondition(&headers)?;
        let stored = state.kv.put(item.clone(), pre, Instant::now())?;
        Ok((stored, item))
    })();
    match answer {
        Ok((stored, item)) => {
            state.metrics.kv_put(stored.label());
            let status = match stored {
                Stored::Created => StatusCode::CREATED,
                Stored::Replaced | Stored::Refreshed => StatusCode::OK,
            };
            item_response(status, &item)
        }
        Err(e) => {
            state.metrics.kv_put(e.code());
            e.respond(&state.metrics)
        }
    }
}

fn precondition(headers: &HeaderMap) -> Result<Precondition, KvStoreError> {
    if let Some(v) = headers.get(header::IF_MATCH) {
        let v = v.to_str().map_err(|_| KvStoreError::BadPrecondition)?;
        let seq = v
            .trim()
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .and_then(|v| v.parse().ok())
            .ok_or(KvStoreError::BadPrecondition)?;
        return Ok(Precondition::Seq(seq));
    }
    match headers.get(header::IF_NONE_MATCH) {
        Some(v) if v.as_bytes().trim_ascii() == b"*" => Ok(Precondition::Absent),
        Some(_) => Err(KvStoreError::BadPrecondition),
        None => Ok(Precondition::Any),
    }
}

fn item_response(status: StatusCode, item: &KvItem) -> Response {
    let mut r = (status, Json(item.to_json())).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", item.seq)) {
        h.insert(header::ETAG, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn item(n: u8, salt: &[u8], seq: u64, value: &[u8]) -> KvItem {
        KvItem::sign(&SigningKey::from_bytes(&[n; 32]), salt, seq, value).unwrap()
    }

    #[test]
    fn only_a_higher_seq_replaces_an_item() {
        let s = KvStore::new(10, Duration::from_secs(60));
        let t = Instant::now();
        assert_eq!(
            s.put(item(1, b"", 2, b"a"), Precondition::Any, t).unwrap(),
            Stored::Created
        );
        assert!(matches!(
            s.put(item(1, b"", 1, b"old"), Precondition::Any, t),
            Err(KvStoreError::SeqTooLow {
                offered: 1,
                stored: 2
            })
        ));
        assert!(matches!(
            s.put(item(1, b"", 2, b"other"), Precondition::Any, t),
            Err(KvStoreError::SeqTooLow { .. })
        ));
        assert_eq!(
            s.put(item(1, b"", 2, b"a"), Precondition::Any, t).unwrap(),
            Stored::Refreshed
        );
        assert_eq!(
            s.put(item(1, b"", 3, b"b"), Precondition::Any, t).unwrap(),
            Stored::Replaced
        );
        // Another salt is another slot.
        assert_eq!(
            s.put(item(1, b"x", 1, b"c"), Precondition::Any, t).unwrap(),
            Stored::Created
        );
        assert_eq!(
            s.get(&item(1, b"", 0, b"").key, b"", t).unwrap().value,
            b"b"
        );
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn a_forged_or_altered_item_is_refused_and_stores_nothing() {
        let s = KvStore::new(10, Duration::from_secs(60));
        let t = Instant::now();
        let mut forged = item(1, b"", 5, b"mine");
        forged.key = item(2, b"", 0, b"").key;
        assert!(matches!(
            s.put(forged, Precondition::Any, t),
            Err(KvStoreError::BadSignature)
        ));
        let mut altered = item(1, b"", 5, b"mine");
        altered.value[0] ^= 1;
        assert!(matches!(
            s.put(altered, Precondition::Any, t),
            Err(KvStoreError::BadSignature)
        ));
        assert!(s.is_empty());
    }

    #[test]
    fn compare_and_swap_holds_or_fails_with_the_stored_seq() {
        let s = KvStore::new(10, Duration::from_secs(60));
        let t = Instant::now();
        s.put(item(1, b"", 1, b"a"), Precondition::Absent, t)
            .unwrap();
        assert!(matches!(
            s.put(item(1, b"", 2, b"b"), Precondition::Absent, t),
            Err(KvStoreError::CasMismatch { stored: Some(1) })
        ));
        assert!(matches!(
            s.put(item(1, b"", 2, b"b"), Precondition::Seq(7), t),
            Err(KvStoreError::CasMismatch { stored: Some(1) })
        ));
        s.put(item(1, b"", 2, b"b"), Precondition::Seq(1), t)
            .unwrap();
        assert!(matches!(
            s.put(item(3, b"", 1, b"c"), Precondition::Seq(1), t),
            Err(KvStoreError::CasMismatch { stored: None })
        ));
    }

    #[test]
    fn items_expire_and_a_full_store_takes_no_new_slot_until_one_does() {
        let ttl = Duration::from_secs(60);
        let s = KvStore::new(2, ttl);
        let t = Instant::now();
        s.put(item(1, b"", 1, b"a"), Precondition::Any, t).unwrap();
        s.put(
            item(2, b"", 1, b"b"),
            Precondition::Any,
            t + Duration::from_secs(30),
        )
        .unwrap();
        assert!(matches!(
            s.put(
                item(3, b"", 1, b"c"),
                Precondition::Any,
                t + Duration::from_secs(40)
            ),
            Err(KvStoreError::Full(2))
        ));
        // A stored slot can still be replaced when full.
        s.put(
            item(2, b"", 2, b"b2"),
            Precondition::Any,
            t + Duration::from_secs(41),
        )
        .unwrap();
        // Item 1 expires at 60 s: then it is gone and its place is free.
        let later = t + ttl + Duration::from_secs(1);
        assert!(s.get(&item(1, b"", 0, b"").key, b"", later).is_none());
        s.put(item(3, b"", 1, b"c"), Precondition::Any, later)
            .unwrap();
        assert_eq!(s.len(), 2);
        // An expired item does not block a lower seq: the slot is new again.
        let s = KvStore::new(2, ttl);
        s.put(item(1, b"", 9, b"a"), Precondition::Any, t).unwrap();
        assert_eq!(
            s.put(item(1, b"", 1, b"a"), Precondition::Any, later)
                .unwrap(),
            Stored::Created
        );
    }

    #[test]
    fn a_snapshot_reads_back_with_what_was_left_of_each_lifetime() {
        let ttl = Duration::from_secs(100);
        let s = KvStore::new(10, ttl);
        let t = Instant::now();
        assert!(
            s.snapshot(t, false).is_none(),
            "nothing put, nothing to write"
        );
        s.put(item(1, b"", 3, b"a"), Precondition::Any, t).unwrap();
        s.put(
            item(2, b"x", 1, b"b"),
            Precondition::Any,
            t + Duration::from_secs(60),
        )
        .unwrap();
        let file = s
            .snapshot(t + Duration::from_secs(60), false)
            .expect("dirty");
        assert!(
            s.snapshot(t + Duration::from_secs(60), false).is_none(),
            "clean after"
        );

        let back = KvStore::new(10, ttl);
        let now = Instant::now();
        assert_eq!(
            back.load(&file, now),
            Loaded {
                items: 2,
                expired: 0,
                refused: 0
            }
        );
        assert_eq!(
            back.get(&item(1, b"", 0, b"").key, b"", now).unwrap().seq,
            3
        );
        // Item 1 had 40 s left, item 2 100 s.
        let later = now + Duration::from_secs(50);
        assert!(back.get(&item(1, b"", 0, b"").key, b"", later).is_none());
        assert!(back.get(&item(2, b"", 0, b"").key, b"x", later).is_some());
        // A put after loading is refused below the loaded seq, as before the restart.
        assert!(matches!(
            back.put(item(1, b"", 2, b"old"), Precondition::Any, now),
            Err(KvStoreError::SeqTooLow { .. })
        ));
    }

    #[test]
    fn a_damaged_or_tampered_file_loads_only_its_good_lines() {
        let ttl = Duration::from_secs(100);
        let s = KvStore::new(10, ttl);
        let t = Instant::now();
        s.put(item(1, b"", 1, b"good"), Precondition::Any, t)
            .unwrap();
        let good = s.snapshot(t, true).expect("forced");
        let text = String::from_utf8(good.clone()).unwrap();
        let tampered = text.replace("Z29vZA==", "YmFkIQ==");
        assert_ne!(tampered, text);
        let expired = text.replace("\"expires_unix_ms\":", "\"expires_unix_ms\":1,\"x\":");
        let mut file = good;
        file.extend_from_slice(b"{not json\n\n");
        file.extend_from_slice(tampered.as_bytes());
        file.extend_from_slice(&[0xff, 0xfe, b'\n']);
        file.extend_from_slice(expired.as_bytes());
        let back = KvStore::new(10, ttl);
        let l = back.load(&file, Instant::now());
        assert_eq!(
            l,
            Loaded {
                items: 1,
                expired: 1,
                refused: 3
            }
        );
        assert_eq!(back.len(), 1);
    }

    #[tokio::test]
    async fn the_saver_writes_at_shutdown_and_a_new_store_reads_it() {
        let dir = std::env::temp_dir().join(format!("clubcast-kv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = std::sync::Arc::new(KvStore::new(10, Duration::from_secs(60)));
        s.put(item(1, b"", 1, b"kept"), Precondition::Any, Instant::now())
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = s.clone().spawn_saver(dir.clone(), stop.clone());
        stop.cancel();
        task.await.unwrap();
        let back = KvStore::new(10, Duration::from_secs(60));
        assert_eq!(back.load_from(&dir).unwrap().items, 1);
        assert_eq!(
            back.get(&item(1, b"", 0, b"").key, b"", Instant::now())
                .unwrap()
                .value,
            b"kept"
        );
        // No file: an empty store, no error.
        let none = KvStore::new(10, Duration::from_secs(60));
        assert_eq!(
            none.load_from(&dir.join("missing")).unwrap(),
            Loaded::default()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn each_client_address_gets_its_own_put_rate() {
        let s = KvStore::new(10, Duration::from_secs(60)).with_put_rate(2);
        let t = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        // A burst of 5 s × 2/s, then refused until a token comes back.
        for _ in 0..10 {
            s.admit(a, t).unwrap();
        }
        assert!(matches!(s.admit(a, t), Err(KvStoreError::RateLimited(1))));
        s.admit(b, t).unwrap();
        s.admit(a, t + Duration::from_millis(500)).unwrap();
        assert!(s.admit(a, t + Duration::from_millis(500)).is_err());
        // One IPv6 host is its /64; an IPv4-mapped address is its IPv4 one.
        let v6 = |x: &str| x.parse::<IpAddr>().unwrap();
        for _ in 0..10 {
            s.admit(v6("2001:db8:1:2::1"), t).unwrap();
        }
        assert!(s.admit(v6("2001:db8:1:2:ffff::9"), t).is_err());
        s.admit(v6("2001:db8:1:3::1"), t).unwrap();
        assert!(s.admit(v6("::ffff:192.0.2.1"), t).is_err());
        // No limit at 0.
        let open = KvStore::new(10, Duration::from_secs(60));
        for _ in 0..1000 {
            open.admit(a, t).unwrap();
        }
    }

    #[tokio::test]
    async fn a_waiting_get_answers_at_the_next_put() {
        let s = std::sync::Arc::new(KvStore::new(10, Duration::from_secs(60)));
        let key = item(1, b"", 0, b"").key;
        s.put(item(1, b"", 1, b"a"), Precondition::Any, Instant::now())
            .unwrap();
        // The stored item is not above `after`, so the get waits for seq 2.
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.wait(&key, b"", Some(1), Duration::from_secs(20)).await })
        };
        tokio::task::yield_now().await;
        s.put(item(1, b"", 2, b"b"), Precondition::Any, Instant::now())
            .unwrap();
        let got = waiter.await.unwrap().unwrap();
        assert_eq!((got.seq, got.value), (2, b"b".to_vec()));
        // Without news, the wait ends with what is stored.
        let got = s
            .wait(&key, b"", Some(2), Duration::from_millis(20))
            .await
            .unwrap();
        assert_eq!(got.seq, 2);
        assert!(s
            .wait(&[9; 32], b"", None, Duration::from_millis(20))
            .await
            .is_none());
    }
}
