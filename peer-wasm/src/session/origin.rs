//! Blocks from the origin: gap fill, and the in-order fetcher of `p2p: false`.
//!
//! Gap fill: each `GapFill{seq}` is queued (at most [`MAX_GAP_QUEUE`]) and
//! fetched with `Authorization: Bearer <grant_token>`, at most
//! [`MAX_ORIGIN_FETCHES`] at a time. 200 goes to `handle_origin_block`;
//! anything else to `handle_gap_fill_failed`. A 429 (over the grant) pauses all
//! origin fetches until its `Retry-After` or the next grant.
//!
//! In order (`p2p: false`, or a p2p session with no open link): every block
//! from `start_seq` on is fetched in runs (`GET …/blocks?from=<next>&max=`
//! [`RUN_MAX`]: the produced blocks from `next` on, back to back), one run at a
//! time, with `Prefer:` [`IN_ORDER_PREFER`], so the origin holds a run whose
//! first block is not produced yet until it is. The demo's fragments are
//! published whole, so this is about one request per fragment instead of one
//! per 4-KiB block. A 425 (the wait ran out) is retried after
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
/// In order: how far beyond the newest block known to exist a run may start.
pub const LOOKAHEAD: u64 = 2;
/// In order: most blocks asked for in one run (the origin's cap is 64).
pub const RUN_MAX: u64 = 64;
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
    /// First block not fetched yet.
    next: u64,
    edge: u64,
    /// No run before this `performance.now()`.
    not_before: f64,
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
            not_before: 0.0,
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
        if let Some(o) = &mut self.in_order {
            // One run at a time, from the first block playback still needs.
            o.next = o.next.max(next_play.unwrap_or(0));
            if self.inflight.is_empty() && now >= o.not_before && o.next <= o.edge + LOOKAHEAD {
                let from = o.next;
                let url = format!("{}?from={from}&max={RUN_MAX}", base.trim_end_matches('/'));
                self.spawn(url, token, from, true, true);
            }
            return;
        }
        while self.inflight.len() < MAX_ORIGIN_FETCHES {
            let Some(seq) = self.queue.pop_front() else {
                break;
            };
            if next_play.is_some_and(|p| seq < p) || self.inflight.contains_key(&seq) {
                continue;
            }
            self.spawn(format!("{base}{seq}"), token, seq, false, false);
        }
    }

    fn spawn(&mut self, url: String, token: &str, seq: u64, wait: bool, run: bool) {
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
            deliver(&weak, Input::Origin { seq, run, result });
        });
    }

    /// A fetch finished: a run (from `seq`) or one block. `now` is the server
    /// clock for the core; `perf` is `performance.now()` for retries.
    pub(super) fn handle_result(
        &mut self,
        core: &mut Peer<StreamKey>,
        now: Time,
        perf: f64,
        (seq, run): (u64, bool),
        result: Result<Fetched, FetchError>,
    ) {
        if self.inflight.remove(&seq).is_none() {
            return;
        }
        for s in std::mem::take(&mut self.overflow) {
            core.handle_gap_fill_failed(now, s);
        }
        self.fetches += 1;
        if run {
            self.handle_run(core, now, perf, seq, result);
            return;
        }
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
            Ok(b) => core.handle_origin_block(now, b),
            Err(_) => {
                if !not_yet {
                    self.failures += 1;
                }
                core.handle_gap_fill_failed(now, seq);
            }
        }
    }

    /// A run from `from` finished (in order).
    fn handle_run(
        &mut self,
        core: &mut Peer<StreamKey>,
        now: Time,
        perf: f64,
        from: u64,
        result: Result<Fetched, FetchError>,
    ) {
        let blocks = match result {
            Ok(f) => Block::decode_run(Bytes::from(f.bytes), RUN_MAX as usize)
                .ok()
                .filter(|run| {
                    // Consecutive from `from`, as asked.
                    !run.is_empty() && run.iter().zip(from..).all(|(b, seq)| b.header.seq == seq)
                })
                .ok_or((ERROR_RETRY_MS, true)),
            Err(FetchError::Aborted) => return,
            Err(FetchError::RateLimited { retry_after }) => {
                let pause = retry_after.map_or(RATE_LIMIT_PAUSE_MS, |d| d.as_millis() as f64);
                self.paused_until = perf + pause.min(MAX_PAUSE_MS);
                Err((0.0, true))
            }
            // The wait ran out: not a failure.
            Err(FetchError::Status(425)) => Err((NOT_YET_RETRY_MS, false)),
            // Anything else, an evicted start (404) included, is retried from
            // the block playback needs next (a skip moves it on).
            Err(_) => Err((ERROR_RETRY_MS, true)),
        };
        let Some(o) = &mut self.in_order else {
            // Switched back to gap fill while the run was out: keep what came.
            for b in blocks.into_iter().flatten() {
                core.handle_origin_block(now, b);
            }
            return;
        };
        match blocks {
            Ok(run) => {
                let last = from + run.len() as u64 - 1;
                o.next = o.next.max(last + 1);
                o.edge = o.edge.max(last);
                for b in run {
                    core.handle_origin_block(now, b);
                }
            }
            Err((wait, failed)) => {
                self.failures += u64::from(failed);
                o.not_before = perf + wait;
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
