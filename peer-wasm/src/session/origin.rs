//! Blocks from the origin: gap fill, and the in-order fetcher of `p2p: false`.
//!
//! Gap fill: each `GapFill{seq}` is queued (at most [`MAX_GAP_QUEUE`]) and
//! fetched with `Authorization: Bearer <grant_token>`, at most
//! [`MAX_ORIGIN_FETCHES`] at a time. 200 goes to `handle_origin_block`;
//! anything else to `handle_gap_fill_failed`. A 429 (over the grant) pauses all
//! origin fetches until its `Retry-After` or the next grant.
//!
//! In order (`p2p: false`): every block from `start_seq` on is fetched, at most
//! [`LOOKAHEAD`] beyond the newest known one, with `Prefer:` [`IN_ORDER_PREFER`],
//! so the origin answers a block not produced yet when it is produced instead
//! of with 425; a 425 (the wait ran out) is retried after
//! [`NOT_YET_RETRY_MS`], so the fetcher follows the live edge closely.

use std::collections::{BTreeMap, VecDeque};
use std::rc::{Rc, Weak};

use bytes::Bytes;
use clubcast_protocol::block::{Block, StreamKey};
use clubcast_protocol::peer::Peer;
use clubcast_protocol::Time;

use crate::fetch::{fetch_bytes, Abort, FetchError, Fetched};
use crate::player::{deliver, Shared};

use super::Input;

/// Origin fetches running at once.
pub const MAX_ORIGIN_FETCHES: usize = 4;
/// Gap fills waiting for a fetch slot; beyond it the oldest is failed.
pub const MAX_GAP_QUEUE: usize = 256;
/// In order: blocks fetched beyond the newest one known to exist.
pub const LOOKAHEAD: u64 = 2;
/// `Prefer` header of in-order fetches (RFC 7240): the origin holds a request
/// for a block not produced yet up to this long.
pub const IN_ORDER_PREFER: &str = "wait=2";
/// Retry of a block the origin has not produced yet (425), ms.
pub const NOT_YET_RETRY_MS: f64 = 150.0;
/// Pause after a 429 without `Retry-After`, ms.
pub const RATE_LIMIT_PAUSE_MS: f64 = 500.0;
/// Longest pause after a 429, ms.
pub const MAX_PAUSE_MS: f64 = 2_000.0;
/// Retry after a network error (in order), ms.
pub const ERROR_RETRY_MS: f64 = 500.0;
/// Bid headroom over the stream's bitrate estimate, in order.
pub const FULL_RATE_HEADROOM: f64 = 1.5;

/// The bid of an origin-only viewer: the whole stream for one interval, with
/// headroom, and never less than what the core counts as due (`core_bits`).
/// A viewer that joins a stream too new for the server to know its bitrate
/// (0) would otherwise bid nothing, get no grant, and never start.
pub fn full_rate_bits(bitrate_kbps: u32, interval_ms: f64, core_bits: u64) -> u64 {
    ((f64::from(bitrate_kbps) * interval_ms * FULL_RATE_HEADROOM) as u64).max(core_bits)
}

struct InOrder {
    next: u64,
    edge: u64,
    retry: BTreeMap<u64, f64>,
}

pub(super) struct Origin {
    weak: Weak<Shared>,
    queue: VecDeque<u64>,
    inflight: BTreeMap<u64, Rc<Abort>>,
    paused_until: f64,
    in_order: Option<InOrder>,
    fetches: u64,
    failures: u64,
    /// Gap fills dropped from a full queue, to be failed to the core.
    overflow: Vec<u64>,
}

impl Origin {
    pub(super) fn new(weak: Weak<Shared>) -> Self {
        Origin {
            weak,
            queue: VecDeque::new(),
            inflight: BTreeMap::new(),
            paused_until: 0.0,
            in_order: None,
            fetches: 0,
            failures: 0,
            overflow: Vec::new(),
        }
    }

    /// True while a fetch runs (peer WANTs wait).
    pub(super) fn busy(&self) -> bool {
        !self.inflight.is_empty()
    }

    pub(super) fn fetches(&self) -> u64 {
        self.fetches
    }

    pub(super) fn failures(&self) -> u64 {
        self.failures
    }

    /// Switches to fetching every block in order from `start`.
    pub(super) fn start_in_order(&mut self, start: u64, edge: u64) {
        self.in_order = Some(InOrder {
            next: start,
            edge,
            retry: BTreeMap::new(),
        });
    }

    /// Whether every block is being fetched in order.
    pub(super) fn in_order(&self) -> bool {
        self.in_order.is_some()
    }

    /// Back to gap fill only (peers deliver again).
    pub(super) fn stop_in_order(&mut self) {
        self.in_order = None;
    }

    /// The server says blocks up to `edge` exist.
    pub(super) fn note_edge(&mut self, edge: u64) {
        if let Some(o) = &mut self.in_order {
            o.edge = o.edge.max(edge);
        }
    }

    /// A new grant arrived: end a 429 pause.
    pub(super) fn unblock(&mut self) {
        self.paused_until = 0.0;
    }

    pub(super) fn gap_fill(&mut self, seq: u64) {
        if self.queue.contains(&seq) || self.inflight.contains_key(&seq) {
            return;
        }
        if self.queue.len() >= MAX_GAP_QUEUE {
            if let Some(old) = self.queue.pop_front() {
                self.overflow.push(old);
            }
        }
        self.queue.push_back(seq);
    }

    /// Starts fetches while slots are free. `next_play` drops work the player
    /// has passed; `now` is `performance.now()`.
    pub(super) fn pump(&mut self, base: &str, token: &str, next_play: Option<u64>, now: f64) {
        if now < self.paused_until {
            return;
        }
        while self.inflight.len() < MAX_ORIGIN_FETCHES {
            let seq = match &mut self.in_order {
                Some(o) => {
                    o.retry.retain(|s, _| next_play.is_none_or(|p| *s >= p));
                    let due = o.retry.iter().find(|(_, at)| now >= **at).map(|(s, _)| *s);
                    match due {
                        Some(s) => {
                            o.retry.remove(&s);
                            Some(s)
                        }
                        None if o.next <= o.edge + LOOKAHEAD => {
                            o.next += 1;
                            Some(o.next - 1)
                        }
                        None => None,
                    }
                }
                None => self.queue.pop_front(),
            };
            let Some(seq) = seq else { break };
            if next_play.is_some_and(|p| seq < p) || self.inflight.contains_key(&seq) {
                continue;
            }
            let wait = self.in_order.is_some();
            self.spawn(format!("{base}{seq}"), token, seq, wait);
        }
    }

    fn spawn(&mut self, url: String, token: &str, seq: u64, wait: bool) {
        let Ok(abort) = Abort::new() else { return };
        let abort = Rc::new(abort);
        self.inflight.insert(seq, Rc::clone(&abort));
        let auth = format!("Bearer {token}");
        let weak = self.weak.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let mut headers = vec![("Authorization", auth.as_str())];
            if wait {
                headers.push(("Prefer", IN_ORDER_PREFER));
            }
            let result = fetch_bytes(&url, &headers, Some(&abort)).await;
            deliver(&weak, Input::Origin { seq, result });
        });
    }

    /// A fetch finished. `now` is the server clock for the core; `perf` is
    /// `performance.now()` for retries.
    pub(super) fn handle_result(
        &mut self,
        core: &mut Peer<StreamKey>,
        now: Time,
        perf: f64,
        seq: u64,
        result: Result<Fetched, FetchError>,
    ) {
        if self.inflight.remove(&seq).is_none() {
            return;
        }
        for s in std::mem::take(&mut self.overflow) {
            core.handle_gap_fill_failed(now, s);
        }
        self.fetches += 1;
        let not_yet = matches!(result, Err(FetchError::Status(425)));
        let block = match result {
            Ok(f) => Block::decode(Bytes::from(f.bytes))
                .ok()
                .filter(|b| b.header.seq == seq)
                .ok_or(None),
            Err(FetchError::Aborted) => return,
            Err(FetchError::RateLimited { retry_after }) => {
                let pause = retry_after.map_or(RATE_LIMIT_PAUSE_MS, |d| d.as_millis() as f64);
                self.paused_until = perf + pause.min(MAX_PAUSE_MS);
                Err(Some(self.paused_until))
            }
            Err(FetchError::Status(425)) => Err(Some(perf + NOT_YET_RETRY_MS)),
            Err(FetchError::Status(404)) => Err(None),
            Err(_) => Err(Some(perf + ERROR_RETRY_MS)),
        };
        match block {
            Ok(b) => {
                if let Some(o) = &mut self.in_order {
                    o.edge = o.edge.max(seq);
                }
                core.handle_origin_block(now, b);
            }
            Err(retry) => {
                if !not_yet {
                    self.failures += 1;
                }
                match (&mut self.in_order, retry) {
                    (Some(o), Some(at)) => {
                        o.retry.insert(seq, at);
                    }
                    (Some(_), None) => {}
                    (None, _) => core.handle_gap_fill_failed(now, seq),
                }
            }
        }
    }

    /// Cancels every running fetch.
    pub(super) fn abort_all(&mut self) {
        for (_, abort) in std::mem::take(&mut self.inflight) {
            abort.abort();
        }
        self.queue.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_rate_bid_covers_the_stream_with_headroom() {
        // 2000 kbit/s for one second is 2 Mbit; bid 1.5 of it.
        assert_eq!(full_rate_bits(2000, 1000.0, 0), 3_000_000);
        assert_eq!(full_rate_bits(2000, 1000.0, 5_000_000), 5_000_000);
        // A stream too new to have a bitrate: the blocks due are bid for.
        assert_eq!(full_rate_bits(0, 1000.0, 262_144), 262_144);
    }
}
