//! The grant ledger: who may take how many bits from the origin this interval.
//!
//! Flow, every bid interval (default 1 s):
//! 1. Peers send `bid` messages over `/ws`; [`Grants::handle_bid`] keeps the
//!    newest bid of each peer for the current interval.
//! 2. At the interval's end, [`Grants::handle_interval`] splits the bid budget
//!    with [`clubcast_protocol::bid::allocate_units`] (max-min fair in whole
//!    blocks, see [`Grants::with_unit_bits`]), replaces every
//!    balance with the new grants (unused bits expire) and refills the anonymous
//!    bucket. The signaling hub sends each bidder its `grant`.
//! 3. The origin calls [`Grants::debit`] for every block it serves (an
//!    on-demand run, [`Grants::debit_prefix`] for its blocks at once: as many
//!    leading blocks as fit). A request with
//!    `Authorization: Bearer <grant_token>` draws on that peer's balance, and
//!    past it on the bid budget no grant took this interval (first come, first
//!    served, as the simulator's origin does), so a budget the bids left over
//!    is not wasted while a peer that bid too little misses a block. One
//!    without a token draws on the shared anonymous bucket, so plain HTTP clients
//!    and caches keep working but cannot take more than their share.
//!
//! A server keeps two ledgers of this type: one for live gap fill
//! (`--origin-budget-kbps`) and one for on-demand runs (`--vod-budget-kbps`,
//! none when 0), so a viewer's bulk on-demand fetches never take the live
//! gap-fill budget. Both end their intervals on the same tick.
//!
//! Budget split: `anonymous_percent` of the per-interval budget (default 25 %)
//! is the anonymous bucket; the rest is what bids share. Bids are collected
//! during one interval and their grants are spendable during the next.
//!
//! Startup grants (HTTP first, then the swarm): a joiner has no grant until the
//! interval after its first bid, up to a whole interval away, yet it needs the
//! blocks from its start block to the live edge at once, and its links are not
//! up yet. [`Grants::grant_startup`] gives it those blocks (at most
//! [`STARTUP_MAX_BITS`]) right at the join, out of the bid budget nobody
//! was granted this interval and then out of the anonymous bucket. What is left
//! of it survives the first interval end, so a join just before it loses
//! nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clubcast_protocol::bid::{allocate_units, Bid, Grant};
use clubcast_protocol::signal::PeerId;

/// Length of a grant token, bytes of randomness (hex-encoded on the wire).
pub const GRANT_TOKEN_BYTES: usize = 16;
/// Most bits a joiner's startup grant covers, in whole units: 4 s of a
/// 2 Mbit/s stream, whatever the block size.
pub const STARTUP_MAX_BITS: u64 = 4 * 2_000_000;

/// Why a debit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantError {
    /// The bearer token belongs to no connected peer.
    #[error("unknown grant token")]
    UnknownToken,
    /// The peer's grant for this interval does not cover the request.
    #[error("over grant: {wanted} bits wanted, {left} left this interval")]
    OverGrant {
        /// Bits the request needs.
        wanted: u64,
        /// Bits left in the grant.
        left: u64,
        /// Time until the next interval.
        retry_after: Duration,
    },
    /// The anonymous bucket is empty for this interval.
    #[error("anonymous origin budget exhausted for this interval")]
    OverAnonymous {
        /// Time until the next interval.
        retry_after: Duration,
    },
}

impl GrantError {
    /// Stable code for JSON errors and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            GrantError::UnknownToken => "unknown_token",
            GrantError::OverGrant { .. } => "over_grant",
            GrantError::OverAnonymous { .. } => "over_anonymous_budget",
        }
    }

    /// When the client may try again, if waiting helps.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GrantError::UnknownToken => None,
            GrantError::OverGrant { retry_after, .. }
            | GrantError::OverAnonymous { retry_after } => Some(*retry_after),
        }
    }
}

#[derive(Debug)]
struct Ledger {
    tokens: HashMap<String, PeerId>,
    token_of: HashMap<PeerId, String>,
    bids: HashMap<PeerId, u64>,
    balances: HashMap<PeerId, u64>,
    anonymous: u64,
    /// Bid budget no grant took this interval; startup grants draw on it.
    spare: u64,
    /// Startup bits granted this interval, by peer: kept over the next
    /// interval end (as far as unspent).
    startup: HashMap<PeerId, u64>,
    interval_end: Instant,
    /// Where the next interval's spare units start among the bids.
    cursor: usize,
}

/// The ledger of one server; shared by signaling (bids) and the origin (debits).
#[derive(Debug)]
pub struct Grants {
    bid_budget: u64,
    anonymous_budget: u64,
    interval: Duration,
    unit_bits: u64,
    ledger: Mutex<Ledger>,
}

impl Grants {
    /// A ledger with `budget_bits` per `interval`, of which `anonymous_percent`
    /// goes to requests without a token. The first interval starts at `now`.
    pub fn new(budget_bits: u64, anonymous_percent: u8, interval: Duration, now: Instant) -> Self {
        let anonymous_budget = budget_bits / 100 * u64::from(anonymous_percent.min(100))
            + budget_bits % 100 * u64::from(anonymous_percent.min(100)) / 100;
        Grants {
            bid_budget: budget_bits - anonymous_budget,
            anonymous_budget,
            interval,
            unit_bits: 0,
            ledger: Mutex::new(Ledger {
                tokens: HashMap::new(),
                token_of: HashMap::new(),
                bids: HashMap::new(),
                balances: HashMap::new(),
                anonymous: anonymous_budget,
                spare: budget_bits - anonymous_budget,
                startup: HashMap::new(),
                interval_end: now + interval,
                cursor: 0,
            }),
        }
    }

    /// Grants in whole units of `unit_bits` (one block with its overhead), so
    /// that a budget of a few blocks goes a block each to a few bidders, in turn,
    /// instead of a crumb smaller than a block to every one. 0 (the default)
    /// grants any number of bits.
    #[must_use]
    pub fn with_unit_bits(mut self, unit_bits: u64) -> Self {
        self.unit_bits = unit_bits;
        self
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // Every mutation below completes before anything that could panic.
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bits per interval that bids share.
    pub fn bid_budget(&self) -> u64 {
        self.bid_budget
    }

    /// Bits per interval for requests without a token.
    pub fn anonymous_budget(&self) -> u64 {
        self.anonymous_budget
    }

    /// The interval length.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Gives `peer` a fresh random grant token and returns it.
    pub fn register(&self, peer: PeerId) -> String {
        let token = data_encoding::HEXLOWER.encode(&rand::random::<[u8; GRANT_TOKEN_BYTES]>());
        let mut l = self.ledger();
        if let Some(old) = l.token_of.insert(peer, token.clone()) {
            l.tokens.remove(&old);
        }
        l.tokens.insert(token.clone(), peer);
        token
    }

    /// Forgets `peer`: its token, bid and balance.
    pub fn unregister(&self, peer: PeerId) {
        let mut l = self.ledger();
        if let Some(t) = l.token_of.remove(&peer) {
            l.tokens.remove(&t);
        }
        l.bids.remove(&peer);
        l.balances.remove(&peer);
        l.startup.remove(&peer);
    }

    /// Grants a joiner `units` whole units (at most [`STARTUP_MAX_BITS`]) to
    /// spend at once: the blocks from its start block to the live edge. They
    /// come out of this interval's unallocated bid budget, then out of the
    /// anonymous bucket, as far as those reach. Returns the bits granted.
    /// Without unit grants ([`Grants::with_unit_bits`]) there is no unit to
    /// count in, and nothing is granted.
    pub fn grant_startup(&self, peer: PeerId, units: u64) -> u64 {
        let mut l = self.ledger();
        if self.unit_bits == 0 || !l.token_of.contains_key(&peer) {
            return 0;
        }
        let unit = self.unit_bits;
        let wanted = units.min(STARTUP_MAX_BITS / unit);
        let from_spare = wanted.min(l.spare / unit);
        let from_anonymous = (wanted - from_spare).min(l.anonymous / unit);
        let bits = (from_spare + from_anonymous) * unit;
        l.spare -= from_spare * unit;
        l.anonymous -= from_anonymous * unit;
        if bits > 0 {
            *l.balances.entry(peer).or_default() += bits;
            *l.startup.entry(peer).or_default() += bits;
        }
        bits
    }

    /// Records `peer`'s bid for the current interval, replacing an earlier one.
    /// Bids over the whole bid budget are cut to it. Unregistered peers are ignored.
    pub fn handle_bid(&self, peer: PeerId, bits: u64) {
        let mut l = self.ledger();
        if l.token_of.contains_key(&peer) {
            l.bids.insert(peer, bits.min(self.bid_budget));
        }
    }

    /// Ends the interval: allocates the budget over its bids, replaces every
    /// balance with the new grants and refills the anonymous bucket. Returns
    /// one grant per bidder (possibly zero bits), to be sent to the bidders.
    #[must_use]
    pub fn handle_interval(&self, now: Instant) -> Vec<Grant> {
        let mut l = self.ledger();
        let mut bids: Vec<Bid> = l
            .bids
            .drain()
            .map(|(peer, bits)| Bid { peer, bits })
            .collect();
        bids.sort_by_key(|b| b.peer);
        let grants = allocate_units(self.bid_budget, &bids, self.unit_bits, &mut l.cursor);
        let mut balances: HashMap<PeerId, u64> = grants
            .iter()
            .filter(|g| g.bits > 0)
            .map(|g| (g.peer, g.bits))
            .collect();
        // Unspent startup bits of this interval's joiners carry over once.
        for (peer, granted) in std::mem::take(&mut l.startup) {
            let left = l.balances.get(&peer).copied().unwrap_or(0).min(granted);
            if left > 0 {
                *balances.entry(peer).or_default() += left;
            }
        }
        l.balances = balances;
        let granted: u64 = grants.iter().map(|g| g.bits).sum();
        l.spare = self.bid_budget.saturating_sub(granted);
        l.anonymous = self.anonymous_budget;
        l.interval_end = now + self.interval;
        grants
    }

    /// Takes `bits` from the grant of the peer holding `token` (past it, from
    /// the bid budget nobody was granted this interval), or from the
    /// anonymous bucket if there is no token. Nothing is taken on refusal.
    pub fn debit(&self, token: Option<&str>, bits: u64, now: Instant) -> Result<(), GrantError> {
        self.debit_prefix(token, [bits], now).map(|_| ())
    }

    /// Takes, block by block, as many leading items of `bits` (one block's
    /// bits each) as fit, each wholly from one place as [`Grants::debit`]
    /// takes it: the peer's balance, else the spare bid budget, or the
    /// anonymous bucket without a token. Returns how many were taken: at
    /// least 1 (0 only for no items). When the first does not fit, or the
    /// token is unknown, nothing is taken. One lock for the whole call, so a
    /// run of blocks is metered against one state of the ledger.
    pub fn debit_prefix(
        &self,
        token: Option<&str>,
        bits: impl IntoIterator<Item = u64>,
        now: Instant,
    ) -> Result<usize, GrantError> {
        let mut l = self.ledger();
        let peer = match token {
            Some(t) => Some(*l.tokens.get(t).ok_or(GrantError::UnknownToken)?),
            None => None,
        };
        let mut taken = 0;
        for b in bits {
            let refused = match peer {
                Some(peer) => {
                    let left = l.balances.get(&peer).copied().unwrap_or(0);
                    if left >= b {
                        l.balances.insert(peer, left - b);
                        None
                    } else if l.spare >= b {
                        l.spare -= b;
                        None
                    } else {
                        Some(GrantError::OverGrant {
                            wanted: b,
                            left,
                            retry_after: retry_after(l.interval_end, now),
                        })
                    }
                }
                None if l.anonymous >= b => {
                    l.anonymous -= b;
                    None
                }
                None => Some(GrantError::OverAnonymous {
                    retry_after: retry_after(l.interval_end, now),
                }),
            };
            match refused {
                None => taken += 1,
                Some(e) if taken == 0 => return Err(e),
                Some(_) => break,
            }
        }
        Ok(taken)
    }

    /// Bits left in `peer`'s grant this interval.
    pub fn balance(&self, peer: PeerId) -> u64 {
        self.ledger().balances.get(&peer).copied().unwrap_or(0)
    }
}

/// Time to the interval end, at least one second: `Retry-After` counts whole
/// seconds and 0 would invite an immediate retry.
fn retry_after(end: Instant, now: Instant) -> Duration {
    let left = end.saturating_duration_since(now);
    Duration::from_secs(left.as_millis().div_ceil(1000).max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_max_min_fair_and_enforced_until_the_interval_ends() {
        let t0 = Instant::now();
        // 10_000 bits per interval, 20 % anonymous: bids share 8_000.
        let g = Grants::new(10_000, 20, Duration::from_secs(1), t0);
        assert_eq!(g.bid_budget(), 8_000);
        let tok1 = g.register(1);
        let tok2 = g.register(2);
        let _tok3 = g.register(3);
        g.handle_bid(1, 1_000);
        g.handle_bid(2, 50_000);
        g.handle_bid(3, 50_000);
        let grants = g.handle_interval(t0);
        let bits: Vec<u64> = grants.iter().map(|g| g.bits).collect();
        assert_eq!(bits, vec![1_000, 3_500, 3_500]);
        assert!(g.debit(Some(&tok1), 800, t0).is_ok());
        let err = g.debit(Some(&tok1), 800, t0).unwrap_err();
        assert!(matches!(err, GrantError::OverGrant { left: 200, .. }));
        assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
        assert!(g.debit(Some(&tok2), 3_500, t0).is_ok());
        assert_eq!(g.debit(Some("nope"), 1, t0), Err(GrantError::UnknownToken));
        // Anonymous bucket: 2_000 bits.
        assert!(g.debit(None, 1_500, t0).is_ok());
        assert!(matches!(
            g.debit(None, 1_000, t0),
            Err(GrantError::OverAnonymous { .. })
        ));
        // Next interval with no bids: grants expire, the bucket refills.
        assert!(g.handle_interval(t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(g.balance(2), 0);
        assert!(g.debit(None, 1_000, t0).is_ok());
        g.unregister(1);
        assert_eq!(g.debit(Some(&tok1), 1, t0), Err(GrantError::UnknownToken));
    }

    #[test]
    fn a_fetch_past_its_grant_takes_the_budget_no_bid_took_first_come() {
        let t0 = Instant::now();
        // 10_000 bits per interval, 20 % anonymous: bids share 8_000.
        let g = Grants::new(10_000, 20, Duration::from_secs(1), t0);
        let tok1 = g.register(1);
        let tok2 = g.register(2);
        g.handle_bid(1, 3_000);
        g.handle_bid(2, 2_000);
        let _ = g.handle_interval(t0);
        // 3_000 of the bid budget stayed spare. Peer 1 spends its grant, then
        // 2_500 of the spare; peer 2's own grant is untouched by that.
        assert!(g.debit(Some(&tok1), 3_000, t0).is_ok());
        assert!(g.debit(Some(&tok1), 2_500, t0).is_ok());
        assert_eq!(g.balance(1), 0);
        let err = g.debit(Some(&tok1), 1_000, t0).unwrap_err();
        assert!(
            matches!(
                err,
                GrantError::OverGrant {
                    wanted: 1_000,
                    left: 0,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(g.debit(Some(&tok2), 2_000, t0).is_ok());
        assert!(g.debit(Some(&tok2), 500, t0).is_ok(), "the last spare bits");
        assert!(g.debit(Some(&tok2), 1, t0).is_err());
        // The anonymous bucket is not the bidders' to take.
        assert!(g.debit(None, 2_000, t0).is_ok());
        // A new interval with every bit granted leaves nothing spare.
        g.handle_bid(1, 50_000);
        let _ = g.handle_interval(t0 + Duration::from_secs(1));
        assert!(g.debit(Some(&tok2), 1, t0).is_err());
    }

    #[test]
    fn unit_grants_hand_whole_blocks_to_bidders_in_turn() {
        let t0 = Instant::now();
        // Bids share 3 blocks of 1_000 bits per interval; 5 peers want 2 each.
        let g = Grants::new(3_000, 0, Duration::from_secs(1), t0).with_unit_bits(1_000);
        for p in 1..=5 {
            g.register(p);
        }
        let mut served = [0u64; 5];
        for i in 0..5 {
            for p in 1..=5 {
                g.handle_bid(p, 2_000);
            }
            let grants = g.handle_interval(t0 + Duration::from_secs(i));
            assert!(grants.iter().all(|g| g.bits % 1_000 == 0));
            assert_eq!(grants.iter().map(|g| g.bits).sum::<u64>(), 3_000);
            for gr in grants {
                served[(gr.peer - 1) as usize] += gr.bits / 1_000;
            }
        }
        // 15 blocks over 5 intervals: everyone is served, 3 each.
        assert_eq!(served, [3; 5]);
    }

    #[test]
    fn a_joiner_gets_its_backlog_at_once_from_spare_then_anonymous_budget() {
        let t0 = Instant::now();
        // 10 units per interval, 20 % anonymous: bids share 8, anonymous 2.
        let g = Grants::new(10_000, 20, Duration::from_secs(1), t0).with_unit_bits(1_000);
        let tok1 = g.register(1);
        let tok2 = g.register(2);
        g.register(3);
        // Peer 1 bids 5 units: 3 of the bid budget stay spare.
        g.handle_bid(1, 5_000);
        let _ = g.handle_interval(t0);
        // Joiner 2 asks for 4: 3 spare + 1 anonymous, spendable at once.
        assert_eq!(g.grant_startup(2, 4), 4_000);
        assert_eq!(g.balance(2), 4_000);
        // Joiner 3 gets the last anonymous unit; anonymous clients get nothing.
        assert_eq!(g.grant_startup(3, 4), 1_000);
        assert!(g.debit(None, 1, t0).is_err(), "the bucket is spent");
        // Existing grants are untouched.
        assert!(g.debit(Some(&tok1), 5_000, t0).is_ok());
        // Unknown peers and huge asks are bounded.
        assert_eq!(g.grant_startup(99, 4), 0);
        // The startup grant outlives one interval end, as far as unspent.
        assert!(g.debit(Some(&tok2), 1_000, t0).is_ok());
        let _ = g.handle_interval(t0 + Duration::from_secs(1));
        assert_eq!(g.balance(2), 3_000);
        let _ = g.handle_interval(t0 + Duration::from_secs(2));
        assert_eq!(g.balance(2), 0);
        // A fresh interval: at most STARTUP_MAX_BITS however large the backlog.
        let big = Grants::new(100_000_000, 0, Duration::from_secs(1), t0).with_unit_bits(1_000);
        big.register(7);
        assert_eq!(big.grant_startup(7, 100_000), STARTUP_MAX_BITS);
        // Units are whole: 3,000-bit units round the cap down.
        let odd = Grants::new(100_000_000, 0, Duration::from_secs(1), t0).with_unit_bits(3_000);
        odd.register(8);
        assert_eq!(
            odd.grant_startup(8, 100_000),
            STARTUP_MAX_BITS / 3_000 * 3_000
        );
    }

    #[test]
    fn a_run_takes_the_leading_blocks_that_fit_and_nothing_when_the_first_does_not() {
        let t0 = Instant::now();
        // 10_000 bits per interval, 20 % anonymous: bids share 8_000, 2_000 anonymous.
        let g = Grants::new(10_000, 20, Duration::from_secs(1), t0);
        let tok1 = g.register(1);
        let tok2 = g.register(2);
        g.handle_bid(1, 3_000);
        g.handle_bid(2, 4_000);
        let _ = g.handle_interval(t0);
        // Peer 1: three blocks from its grant, the fourth from the 1_000
        // spare bits, and the run is cut before the fifth.
        assert_eq!(g.debit_prefix(Some(&tok1), [1_000; 6], t0), Ok(4));
        assert_eq!(g.balance(1), 0);
        let err = g.debit_prefix(Some(&tok1), [1, 1], t0).unwrap_err();
        assert!(
            matches!(
                err,
                GrantError::OverGrant {
                    wanted: 1,
                    left: 0,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
        // Peer 2's grant is untouched by that. A block that does not fit
        // ends the prefix, even if a smaller one after it would fit.
        assert_eq!(g.balance(2), 4_000);
        assert_eq!(g.debit_prefix(Some(&tok2), [2_500, 2_000, 500], t0), Ok(1));
        assert_eq!(g.balance(2), 1_500);
        // A refused first block takes nothing, the blocks after it neither.
        assert!(g.debit_prefix(Some(&tok2), [1_600, 100], t0).is_err());
        assert_eq!(g.balance(2), 1_500);
        // An unknown token is refused whole, and takes no anonymous bits.
        assert_eq!(
            g.debit_prefix(Some("nope"), [1], t0),
            Err(GrantError::UnknownToken)
        );
        // Without a token: the anonymous bucket's 2_000 bits.
        assert_eq!(g.debit_prefix(None, [800, 800, 800], t0), Ok(2));
        assert!(matches!(
            g.debit_prefix(None, [800], t0),
            Err(GrantError::OverAnonymous { .. })
        ));
        assert_eq!(g.debit_prefix(None, [400, 1], t0), Ok(1), "the 400 left");
        assert_eq!(g.debit_prefix(None, [], t0), Ok(0), "nothing asked");
        // A peer that left is unknown.
        g.unregister(2);
        assert_eq!(
            g.debit_prefix(Some(&tok2), [1], t0),
            Err(GrantError::UnknownToken)
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Register(PeerId),
        Unregister(PeerId),
        Bid(PeerId, u64),
        Startup(PeerId, u64),
        /// A fetch with the peer's token (`Some`) or none, of so many bits.
        Debit(Option<PeerId>, u64),
        /// Fetches with the peer's token, or none, until every size is refused.
        Drain(Option<PeerId>),
        /// A run of blocks of so many bits each, with the peer's token or none.
        Run(Option<PeerId>, Vec<u64>),
        Interval,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let peer = 1u64..6;
        prop_oneof![
            2 => peer.clone().prop_map(Op::Register),
            1 => peer.clone().prop_map(Op::Unregister),
            3 => (peer.clone(), 0u64..60_000).prop_map(|(p, b)| Op::Bid(p, b)),
            1 => (peer.clone(), 0u64..20).prop_map(|(p, u)| Op::Startup(p, u)),
            6 => (proptest::option::weighted(0.8, peer), 1u64..8_000)
                .prop_map(|(p, b)| Op::Debit(p, b)),
            2 => proptest::option::weighted(0.8, 1u64..6).prop_map(Op::Drain),
            3 => (
                proptest::option::weighted(0.8, 1u64..6),
                proptest::collection::vec(1u64..4_000, 0..8),
            )
                .prop_map(|(p, bits)| Op::Run(p, bits)),
            2 => Just(Op::Interval),
        ]
    }

    proptest::proptest! {
        /// Whatever peers join, leave, bid and fetch, the origin serves at most
        /// its budget over time: a startup grant's unspent bits move to the
        /// next interval, never more. Anonymous fetches stay within their
        /// bucket, and a refused fetch takes nothing.
        #[test]
        fn the_origin_never_serves_more_than_its_budget(
            budget in 0u64..100_000,
            anonymous_percent in 0u8..=100,
            unit in proptest::prop_oneof![proptest::strategy::Just(0u64), 1u64..5_000],
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let t0 = Instant::now();
            let g = Grants::new(budget, anonymous_percent, Duration::from_secs(1), t0)
                .with_unit_bits(unit);
            proptest::prop_assert_eq!(g.bid_budget() + g.anonymous_budget(), budget);
            let mut tokens: HashMap<PeerId, String> = HashMap::new();
            let (mut intervals, mut served, mut anonymous) = (0u64, 0u64, 0u64);
            // Served this interval, and what it may serve: the budget plus the
            // unspent startup bits of the interval before.
            let (mut served_now, mut may_serve) = (0u64, budget);
            let mut startup: HashMap<PeerId, u64> = HashMap::new();
            for op in ops {
                let now = t0 + Duration::from_secs(intervals);
                match op {
                    Op::Register(p) => {
                        tokens.insert(p, g.register(p));
                    }
                    Op::Unregister(p) => {
                        g.unregister(p);
                        startup.remove(&p);
                        proptest::prop_assert_eq!(g.balance(p), 0);
                    }
                    Op::Bid(p, bits) => g.handle_bid(p, bits),
                    Op::Startup(p, units) => {
                        let bits = g.grant_startup(p, units);
                        *startup.entry(p).or_default() += bits;
                        proptest::prop_assert!(bits <= STARTUP_MAX_BITS);
                        if unit > 0 {
                            proptest::prop_assert_eq!(bits % unit, 0);
                        }
                    }
                    Op::Debit(who, bits) => {
                        let token = who.map(|p| tokens.get(&p).cloned().unwrap_or_default());
                        let before = who.map(|p| g.balance(p));
                        match g.debit(token.as_deref(), bits, now) {
                            Ok(()) => {
                                served += bits;
                                served_now += bits;
                                if who.is_none() {
                                    anonymous += bits;
                                }
                            }
                            Err(e) => {
                                proptest::prop_assert_eq!(who.map(|p| g.balance(p)), before,
                                    "a refused fetch took bits: {:?}", e);
                                proptest::prop_assert!(e.retry_after()
                                    .is_none_or(|d| d >= Duration::from_secs(1)));
                            }
                        }
                    }
                    Op::Drain(who) => {
                        let token = who.map(|p| tokens.get(&p).cloned().unwrap_or_default());
                        let mut bits = budget.max(1);
                        while bits > 0 {
                            while g.debit(token.as_deref(), bits, now).is_ok() {
                                served += bits;
                                served_now += bits;
                                if who.is_none() {
                                    anonymous += bits;
                                }
                            }
                            bits /= 2;
                        }
                    }
                    Op::Run(who, bits) => {
                        let token = who.map(|p| tokens.get(&p).cloned().unwrap_or_default());
                        let before = who.map(|p| g.balance(p));
                        match g.debit_prefix(token.as_deref(), bits.iter().copied(), now) {
                            Ok(n) => {
                                proptest::prop_assert!(n <= bits.len());
                                proptest::prop_assert!(n >= 1 || bits.is_empty());
                                let taken: u64 = bits[..n].iter().sum();
                                served += taken;
                                served_now += taken;
                                if who.is_none() {
                                    anonymous += taken;
                                }
                            }
                            Err(e) => {
                                proptest::prop_assert!(!bits.is_empty() || token.is_some());
                                proptest::prop_assert_eq!(who.map(|p| g.balance(p)), before,
                                    "a refused run took bits: {:?}", e);
                            }
                        }
                    }
                    Op::Interval => {
                        let carry: u64 = std::mem::take(&mut startup)
                            .into_iter()
                            .map(|(p, bits)| bits.min(g.balance(p)))
                            .sum();
                        let grants = g.handle_interval(now + Duration::from_secs(1));
                        (served_now, may_serve) = (0, budget + carry);
                        proptest::prop_assert!(
                            grants.iter().map(|g| g.bits).sum::<u64>() <= g.bid_budget());
                        intervals += 1;
                    }
                }
                proptest::prop_assert!(served_now <= may_serve,
                    "served {} of {} this interval", served_now, may_serve);
                proptest::prop_assert!(served <= (intervals + 1) * budget,
                    "served {} in {} intervals of {}", served, intervals + 1, budget);
                proptest::prop_assert!(anonymous <= (intervals + 1) * g.anonymous_budget());
            }
        }
    }
}
