//! Blocks from the origin: gap fill, and the in-order fetcher of `p2p: false`.
//!
//! Gap fill: each `GapFill{seq}` is queued (at most [`MAX_GAP_QUEUE`]) and
//! fetched with `Authorization: Bearer <grant_token>`, at most
//! [`MAX_ORIGIN_FETCHES`] at a time. Gaps queued one after the other (the
//! startup backlog, a lost link's share) go as one run of up to [`RUN_MAX`]
//! (`…/blocks?from=<seq>&max=<n>`), others as single blocks. What arrives goes
//! to `handle_origin_block`; every asked block that did not arrive (an error,
//! or a run the origin cut short at the grant) to `handle_gap_fill_failed`. A 429 (over the grant) pauses all
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

/// Gaps queued one after the other (the startup backlog, a lost link's share)
/// go as one run: takes from the front of `queue` the seqs that follow `first`
/// without a hole, up to `max` in all, and says how many the run holds.
fn take_run(queue: &mut VecDeque<u64>, first: u64, max: u64) -> u64 {
    let mut count = 1;
    while count < max && queue.front() == Some(&(first + count)) {
        queue.pop_front();
        count += 1;
    }
    count
}

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

/// What a running fetch asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// Gap fill: the `count` blocks from the fetch's seq, one block or a run.
    Gaps { count: u64 },
    /// In order: a run from the fetch's seq, as many as the origin has.
    InOrder,
}

struct Inflight {
    ask: Ask,
    abort: Rc<Abort>,
}

pub(super) struct Origin {
    weak: Weak<Shared>,
    queue: VecDeque<u64>,
    /// Running fetches by their first seq.
    inflight: BTreeMap<u64, Inflight>,
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

    /// Whether a running gap fill covers `seq`.
    fn fetching(&self, seq: u64) -> bool {
        self.inflight
            .range(..=seq)
            .next_back()
            .is_some_and(|(from, f)| matches!(f.ask, Ask::Gaps { count } if seq < from + count))
    }

    pub(super) fn gap_fill(&mut self, seq: u64) {
        if self.queue.contains(&seq) || self.fetching(seq) {
            return;
        }
        if self.queue.len() >= MAX_GAP_QUEUE {
            if let Some(old) = self.queue.pop_front() {
                self.overflow.push(old);
            }
        }
        self.queue.push_back(seq);
    }

    /// Whether [`Origin::pump`] may have a fetch to start.
    pub(super) fn has_work(&self) -> bool {
        !self.queue.is_empty() || (self.in_order.is_some() && self.inflight.is_empty())
    }

    /// Starts fetches while slots are free. `next_play` drops work the player
    /// has passed; `now` is `performance.now()`.
    pub(super) fn pump(&mut self, base: &str, token: &str, next_play: Option<u64>, now: f64) {
        if now < self.paused_until {
            return;
        }
        let runs = base.trim_end_matches('/');
        if let Some(o) = &mut self.in_order {
            // One run at a time, from the first block playback still needs.
            o.next = o.next.max(next_play.unwrap_or(0));
            if self.inflight.is_empty() && now >= o.not_before && o.next <= o.edge + LOOKAHEAD {
                let from = o.next;
                let url = format!("{runs}?from={from}&max={RUN_MAX}");
                self.spawn(url, token, from, Ask::InOrder);
            }
            return;
        }
        while self.inflight.len() < MAX_ORIGIN_FETCHES {
            let Some(seq) = self.queue.pop_front() else {
                break;
            };
            if next_play.is_some_and(|p| seq < p) || self.fetching(seq) {
                continue;
            }
            let count = take_run(&mut self.queue, seq, RUN_MAX);
            let url = match count {
                1 => format!("{base}{seq}"),
                n => format!("{runs}?from={seq}&max={n}"),
            };
            self.spawn(url, token, seq, Ask::Gaps { count });
        }
    }

    fn spawn(&mut self, url: String, token: &str, seq: u64, ask: Ask) {
        let Ok(abort) = Abort::new() else { return };
        let abort = Rc::new(abort);
        self.inflight.insert(
            seq,
            Inflight {
                ask,
                abort: Rc::clone(&abort),
            },
        );
        let auth = format!("Bearer {token}");
        let weak = self.weak.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let mut headers = vec![("Authorization", auth.as_str())];
            if ask == Ask::InOrder {
                headers.push(("Prefer", IN_ORDER_PREFER));
            }
            let result = fetch_bytes(&url, &headers, Some(&abort)).await;
            deliver(&weak, Input::Origin { seq, result });
        });
    }

    /// A fetch from `seq` finished. `now` is the server clock for the core;
    /// `perf` is `performance.now()` for retries.
    pub(super) fn handle_result(
        &mut self,
        core: &mut Peer<StreamKey>,
        now: Time,
        perf: f64,
        seq: u64,
        result: Result<Fetched, FetchError>,
    ) {
        let Some(Inflight { ask, .. }) = self.inflight.remove(&seq) else {
            return;
        };
        for s in std::mem::take(&mut self.overflow) {
            core.handle_gap_fill_failed(now, s);
        }
        self.fetches += 1;
        let count = match ask {
            Ask::Gaps { count } => count,
            Ask::InOrder => RUN_MAX,
        };
        // The blocks, or how long to wait before asking again and whether
        // that counts as a failure.
        // One block is a run of one.
        let blocks = match result {
            Ok(f) => Block::decode_run(Bytes::from(f.bytes), count as usize)
                .map_err(|_| (ERROR_RETRY_MS, true)),
            Err(FetchError::Aborted) => return,
            Err(FetchError::RateLimited { retry_after }) => {
                let pause = retry_after.map_or(RATE_LIMIT_PAUSE_MS, |d| d.as_millis() as f64);
                self.paused_until = perf + pause.min(MAX_PAUSE_MS);
                Err((0.0, true))
            }
            // The wait ran out: not a failure.
            Err(FetchError::Status(425)) => Err((NOT_YET_RETRY_MS, false)),
            // Anything else, an evicted block (404) included. In order, it
            // is retried from the block playback needs next (a skip moves
            // that on).
            Err(_) => Err((ERROR_RETRY_MS, true)),
        };
        // Only blocks in order from `seq`, as asked.
        let blocks = blocks.and_then(|run| {
            if !run.is_empty() && run.iter().zip(seq..).all(|(b, s)| b.header.seq == s) {
                Ok(run)
            } else {
                Err((ERROR_RETRY_MS, true))
            }
        });
        let got = blocks.as_ref().map_or(0, |run| run.len() as u64);
        if let Err((_, failed)) = blocks {
            self.failures += u64::from(failed);
        }
        match (ask, &mut self.in_order) {
            (Ask::InOrder, Some(o)) => match &blocks {
                Ok(_) => {
                    o.next = o.next.max(seq + got);
                    o.edge = o.edge.max(seq + got - 1);
                }
                Err((wait, _)) => o.not_before = perf + wait,
            },
            // A run that ended after the switch back to gap fill: what came
            // is kept, the rest is the core's to ask again.
            (Ask::InOrder, None) => {}
            (Ask::Gaps { .. }, _) => {
                for s in seq + got..seq + count {
                    core.handle_gap_fill_failed(now, s);
                }
            }
        }
        for b in blocks.into_iter().flatten() {
            core.handle_origin_block(now, b);
        }
    }

    /// Cancels every running fetch.
    pub(super) fn abort_all(&mut self) {
        for (_, f) in std::mem::take(&mut self.inflight) {
            f.abort.abort();
        }
        self.queue.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_gaps_go_as_one_run() {
        let mut q: VecDeque<u64> = [11, 12, 13, 20, 21].into();
        assert_eq!(take_run(&mut q, 10, 64), 4);
        assert_eq!(q, [20, 21]);
        assert_eq!(take_run(&mut q, 5, 64), 1, "a hole ends the run");
        assert_eq!(q, [20, 21]);
        let mut q: VecDeque<u64> = (1..100).collect();
        assert_eq!(take_run(&mut q, 0, 64), 64, "at most max");
        assert_eq!(q.front(), Some(&64));
    }

    #[test]
    fn full_rate_bid_covers_the_stream_with_headroom() {
        // 2000 kbit/s for one second is 2 Mbit; bid 1.5 of it.
        assert_eq!(full_rate_bits(2000, 1000.0, 0), 3_000_000);
        assert_eq!(full_rate_bits(2000, 1000.0, 5_000_000), 5_000_000);
        // A stream too new to have a bitrate: the blocks due are bid for.
        assert_eq!(full_rate_bits(0, 1000.0, 262_144), 262_144);
    }
}
