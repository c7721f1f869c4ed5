//! One stream's swarm: its [`Membership`] and the outbound queue of each peer.
//!
//! Everything here runs under the swarm's mutex and never awaits: messages go
//! out through bounded queues with `try_send`. A peer whose queue is full is
//! dropped (its queue sender is dropped, which closes its socket), and the link
//! changes its departure causes are delivered in turn, so one slow peer costs a
//! bounded amount of memory and work. What must happen outside the lock
//! (metrics, the grant ledger, the seeder) comes back as [`Effects`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use clubcast_protocol::club::{
    capacity_pct, ClubConfig, Joined, LinkChange, Membership, Overload, UploadStreak,
    DEFAULT_CAPACITY_PCT,
};
use clubcast_protocol::signal::{
    ErrorCode, Link, LinkOp, PeerId, ServerMsg, SignalData, SEEDER_PEER_ID, SIGNAL_VERSION,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::outbox::Sender;
use super::{DropReason, SeederEvent, SignalError, REPORTS_TO_KICK};
use crate::stream::Stream;

/// Two reports of one failed link, one from each end, this close together
/// (ms) replace it once: the second is the echo of the first. A seeder that
/// closes a slow seed reports it, and the browser that saw the channel close
/// reports it too; replaced twice, the link the first replacement had the
/// browser start was torn down at once for another (`just bench-loss`).
pub(crate) const LINK_FAILED_ECHO_MS: u64 = 2_000;
/// Link failures remembered for [`LINK_FAILED_ECHO_MS`]; at the bound the
/// expired ones go, and if none has expired, all.
const MAX_RECENT_FAILURES: usize = 4096;

/// Why the server closed a peer's socket, shared between the swarm (which sets
/// it) and the connection task (which sends it as the close reason).
pub(crate) type CloseCell = Arc<OnceLock<DropReason>>;

struct Member {
    tx: Sender,
    close: CloseCell,
    reported_by: HashSet<PeerId>,
    /// Whether it may shed a last-hop subscriber ([`Swarm::note_overloaded`]).
    overload: Overload,
    /// Its upload as its bids report it ([`Swarm::note_upload`]).
    upload: UploadStreak,
    /// Whether it stated its upload at join; if not, the plan is a guess
    /// that its bids correct ([`Membership::learn_capacity`]).
    stated: bool,
}

/// What a bid's upload report changed ([`Swarm::note_upload`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Upload {
    /// A last-hop share moved off the peer.
    pub(crate) shed: bool,
    /// The peer, which stated no upload, is now planned on what it sent.
    pub(crate) learned: bool,
}

/// What a joiner said about its upload.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JoinUpload {
    /// Stated by its page (`upload_kbps`): planned on as stated.
    pub(crate) stated_kbps: Option<u32>,
    /// Measured by its upload probe, below the cap: its bids may lower
    /// the plan further ([`Membership::learn_capacity`]).
    pub(crate) probed_kbps: Option<u32>,
}

/// Work for the hub once the swarm lock is released.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    /// Peers the swarm dropped, already removed from it.
    pub(crate) dropped: Vec<(PeerId, DropReason)>,
    /// Events for the seeder.
    pub(crate) seeder: Vec<SeederEvent>,
    /// The swarm's name and size after drops, for the peers gauge.
    pub(crate) size: Option<(String, usize)>,
}

/// `msg` as JSON text, or `None` (logged) if it cannot be.
fn encode(msg: &ServerMsg) -> Option<String> {
    serde_json::to_string(msg)
        .map_err(|e| tracing::error!(%e, "server message failed to serialize"))
        .ok()
}

/// One stream's peers.
pub(crate) struct Swarm {
    pub(crate) stream: Arc<Stream>,
    membership: Membership,
    members: HashMap<PeerId, Member>,
    rng: ChaCha8Rng,
    max_peers: usize,
    /// Zero of the ms clock the overload state runs on.
    epoch: Instant,
    /// Recent link failures by the pair (lower id first): who reported, when
    /// ([`LINK_FAILED_ECHO_MS`]).
    recent_failures: HashMap<(PeerId, PeerId), (PeerId, u64)>,
}

impl Swarm {
    /// An empty swarm for `stream`.
    pub(crate) fn new(stream: Arc<Stream>, cfg: ClubConfig, max_peers: usize) -> Self {
        Swarm {
            stream,
            membership: Membership::new(cfg),
            members: HashMap::new(),
            rng: ChaCha8Rng::from_seed(rand::random()),
            max_peers,
            epoch: Instant::now(),
            recent_failures: HashMap::new(),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Connected peers.
    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether `peer` is connected here.
    #[cfg(test)]
    pub(crate) fn contains(&self, peer: PeerId) -> bool {
        self.members.contains_key(&peer)
    }

    /// The seeder's links, as it sees them.
    pub(crate) fn seeder_links(&self) -> Vec<Link> {
        self.membership.links_of(SEEDER_PEER_ID)
    }

    /// Adds `peer`, planned on the upload it stated, or else on what its
    /// upload probe measured (see [`JoinUpload`] and [`capacity_pct`]).
    /// `welcome` builds the joiner's first message from its
    /// clubs and links; it is queued before anyone else hears of the joiner, so
    /// it is always the first message the joiner receives.
    pub(crate) fn join(
        &mut self,
        peer: PeerId,
        p2p: bool,
        upload: JoinUpload,
        tx: Sender,
        close: CloseCell,
        welcome: impl FnOnce(&Joined) -> String,
    ) -> Result<Effects, SignalError> {
        if self.stream.ended().is_cancelled() {
            return Err(SignalError::StreamEnded);
        }
        if self.members.len() >= self.max_peers {
            return Err(SignalError::StreamFull(self.max_peers));
        }
        let capacity = match upload.stated_kbps.or(upload.probed_kbps) {
            Some(kbps) => capacity_pct(Some(kbps), self.stream.bitrate_kbps()),
            None => DEFAULT_CAPACITY_PCT,
        };
        let joined = self
            .membership
            .join_with_capacity(peer, p2p, capacity, &mut self.rng);
        // A fresh queue has room: the welcome is its first message.
        let _ = tx.try_send(welcome(&joined));
        self.members.insert(
            peer,
            Member {
                tx,
                close,
                reported_by: HashSet::new(),
                overload: Overload::default(),
                upload: UploadStreak::default(),
                stated: upload.stated_kbps.is_some(),
            },
        );
        let mut fx = Effects::default();
        self.deliver(joined.changes, &mut fx);
        Ok(fx)
    }

    /// Ends the swarm, its stream having ended: every peer is sent
    /// `stream_ended` and dropped, with no link repaired, and the seeder
    /// loses its links.
    pub(crate) fn end(&mut self) -> Effects {
        let mut fx = Effects::default();
        let ended = encode(&ServerMsg::Error {
            v: SIGNAL_VERSION,
            code: ErrorCode::StreamEnded,
            message: "the stream ended: its publisher stayed away".into(),
        });
        for (peer, m) in self.members.drain() {
            if let Some(text) = &ended {
                let _ = m.tx.try_send(text.clone());
            }
            let _ = m.close.set(DropReason::StreamEnded);
            fx.dropped.push((peer, DropReason::StreamEnded));
        }
        for link in self.membership.links_of(SEEDER_PEER_ID) {
            fx.seeder.push(SeederEvent::Link {
                stream: self.stream.clone(),
                op: LinkOp::Remove,
                link,
            });
        }
        self.membership = Membership::new(*self.membership.config());
        fx.size = Some((self.stream.name.clone(), 0));
        fx
    }

    /// Removes `peer` (its socket closed) and repairs the links it held.
    pub(crate) fn leave(&mut self, peer: PeerId) -> Effects {
        let mut fx = Effects::default();
        if self.members.remove(&peer).is_some() {
            let changes = self.membership.leave(peer, &mut self.rng);
            self.deliver(changes, &mut fx);
        }
        fx
    }

    /// Relays SDP or ICE from `from` to `to`, which must share a link with it.
    pub(crate) fn relay(
        &mut self,
        from: PeerId,
        to: PeerId,
        data: SignalData,
        fx: &mut Effects,
    ) -> Result<(), SignalError> {
        if !self.linked(from, to) {
            return Err(SignalError::UnknownPeer(to));
        }
        if to == SEEDER_PEER_ID {
            fx.seeder.push(SeederEvent::Signal {
                stream: self.stream.clone(),
                from,
                data,
            });
            return Ok(());
        }
        let msg = ServerMsg::Signal {
            v: SIGNAL_VERSION,
            from,
            data,
        };
        self.send(to, &msg, fx);
        Ok(())
    }

    /// Whether `a` holds any link role towards `b`.
    pub(crate) fn linked(&self, a: PeerId, b: PeerId) -> bool {
        a != b
            && (b == SEEDER_PEER_ID || self.members.contains_key(&b))
            && self.membership.linked(a, b)
    }

    /// `peer`'s link to `remote` failed: replace every role between them,
    /// unless `remote` reported the same failure just before
    /// ([`LINK_FAILED_ECHO_MS`]).
    pub(crate) fn link_failed(&mut self, peer: PeerId, remote: PeerId, now: Instant) -> Effects {
        let mut fx = Effects::default();
        let ms = self.ms(now);
        let pair = (peer.min(remote), peer.max(remote));
        if let Some(&(by, at)) = self.recent_failures.get(&pair) {
            if by != peer && ms.saturating_sub(at) < LINK_FAILED_ECHO_MS {
                self.recent_failures.remove(&pair);
                return fx;
            }
        }
        if self.recent_failures.len() >= MAX_RECENT_FAILURES {
            self.recent_failures
                .retain(|_, &mut (_, at)| ms.saturating_sub(at) < LINK_FAILED_ECHO_MS);
            if self.recent_failures.len() >= MAX_RECENT_FAILURES {
                self.recent_failures.clear();
            }
        }
        self.recent_failures.insert(pair, (peer, ms));
        let changes = self.membership.replace(peer, remote, &mut self.rng);
        self.deliver(changes, &mut fx);
        fx
    }

    /// `peer`'s bids said its upload stays behind
    /// ([`clubcast_protocol::club::LateStreak`]): it is overloaded for a while.
    pub(crate) fn note_overloaded(&mut self, peer: PeerId, now: Instant) {
        let ms = self.ms(now);
        if let Some(m) = self.members.get_mut(&peer) {
            m.overload.mark(ms);
        }
    }

    /// `peer`'s bid says it sent `up_bytes` since its previous bid and could
    /// not send `late` pushes in time; peers bid every `interval_ms`. A peer
    /// whose bids stay over its plan ([`Membership::plan_limit_pct`]) sheds
    /// a last-hop share to a member with room ([`UploadStreak::note_bid`],
    /// which also says over what time the rate is taken,
    /// [`Membership::shed_share`]). A peer that stated no upload and falls
    /// behind ([`UploadStreak::behind_pct`]) is planned on the
    /// upload the bid measured ([`Membership::learn_capacity`]). Returns
    /// whether it shed a share and whether its capacity was learned.
    pub(crate) fn note_upload(
        &mut self,
        peer: PeerId,
        up_bytes: u64,
        late: u64,
        interval_ms: u64,
        now: Instant,
    ) -> (Upload, Effects) {
        let mut fx = Effects::default();
        let mut done = Upload::default();
        let ms = self.ms(now);
        let cap = self
            .membership
            .plan_limit_pct(peer)
            .unwrap_or(self.membership.config().max_capacity_pct);
        let bitrate = self.stream.bitrate_kbps();
        let Some(m) = self.members.get_mut(&peer) else {
            return (done, fx);
        };
        let over = m.upload.note_bid(ms, up_bytes, interval_ms, bitrate, cap);
        let measured = m.upload.behind_pct(late).filter(|_| !m.stated);
        let members = &self.members;
        let up_pct = |p: PeerId| members.get(&p).map_or(u32::MAX, |m| m.upload.last_pct());
        let mut changes = Vec::new();
        if let Some(learned) =
            measured.and_then(|pct| self.membership.learn_capacity(peer, pct, up_pct))
        {
            changes = learned;
            done.learned = true;
        }
        if over {
            let shed = self.membership.shed_share(peer, up_pct);
            done.shed = !shed.is_empty();
            changes.extend(shed);
        }
        if done.shed {
            if let Some(m) = self.members.get_mut(&peer) {
                m.upload.shed(ms);
            }
        }
        self.deliver(changes, &mut fx);
        (done, fx)
    }

    /// `reporter` says its last-hop source `source` leaves its share to the
    /// origin. An overloaded source is replaced as `reporter`'s source (the
    /// in-club links between them stay), one reporter at a time
    /// ([`Overload::may_shed`]); one that is merely late is kept. Returns
    /// whether it was replaced.
    pub(crate) fn slow_source(
        &mut self,
        reporter: PeerId,
        source: PeerId,
        now: Instant,
    ) -> (bool, Effects) {
        let mut fx = Effects::default();
        let ms = self.ms(now);
        let sheds = self
            .members
            .get(&source)
            .is_some_and(|m| m.overload.may_shed(ms));
        if !sheds || !self.members.contains_key(&reporter) {
            return (false, fx);
        }
        let changes = self.membership.replace_source(reporter, source);
        let replaced = !changes.is_empty();
        if replaced {
            if let Some(m) = self.members.get_mut(&source) {
                m.overload.shed(ms);
            }
        }
        self.deliver(changes, &mut fx);
        (replaced, fx)
    }

    /// `reporter` says `accused` sent a bad block. The link is replaced like a
    /// failure; a report counts towards a kick only if the two were linked, so
    /// peers cannot accuse strangers, and [`REPORTS_TO_KICK`] distinct reporters
    /// drop the accused.
    pub(crate) fn report(
        &mut self,
        reporter: PeerId,
        accused: PeerId,
        now: Instant,
    ) -> (bool, Effects) {
        let counts = self.linked(reporter, accused);
        let mut fx = self.link_failed(reporter, accused, now);
        if !counts || accused == SEEDER_PEER_ID {
            return (false, fx);
        }
        let kick = match self.members.get_mut(&accused) {
            Some(m) => {
                m.reported_by.insert(reporter);
                m.reported_by.len() >= REPORTS_TO_KICK
            }
            None => false,
        };
        if kick {
            self.drop_peers(vec![(accused, DropReason::Reported)], &mut fx);
        }
        (kick, fx)
    }

    /// Queues `msg` for `peer`; a full queue drops the peer.
    pub(crate) fn send(&mut self, peer: PeerId, msg: &ServerMsg, fx: &mut Effects) {
        let Some(m) = self.members.get(&peer) else {
            return;
        };
        let Some(text) = encode(msg) else { return };
        if m.tx.try_send(text).is_err() {
            self.drop_peers(vec![(peer, DropReason::Slow)], fx);
        }
    }

    /// Queues `msg` for every peer; a full queue drops the peer.
    pub(crate) fn broadcast(&mut self, msg: &ServerMsg, fx: &mut Effects) {
        let Some(text) = encode(msg) else { return };
        let full = self
            .members
            .iter()
            .filter(|(_, m)| m.tx.try_send(text.clone()).is_err())
            .map(|(&peer, _)| (peer, DropReason::Slow))
            .collect();
        self.drop_peers(full, fx);
    }

    fn deliver(&mut self, changes: Vec<LinkChange>, fx: &mut Effects) {
        let mut full = Vec::new();
        self.deliver_into(changes, fx, &mut full);
        self.drop_peers(full, fx);
    }

    fn deliver_into(
        &mut self,
        changes: Vec<LinkChange>,
        fx: &mut Effects,
        full: &mut Vec<(PeerId, DropReason)>,
    ) {
        for ch in changes {
            if ch.to == SEEDER_PEER_ID {
                fx.seeder.push(SeederEvent::Link {
                    stream: self.stream.clone(),
                    op: ch.op,
                    link: ch.link,
                });
                continue;
            }
            let Some(m) = self.members.get(&ch.to) else {
                continue;
            };
            let msg = ServerMsg::Link {
                v: SIGNAL_VERSION,
                op: ch.op,
                link: ch.link,
            };
            let Ok(text) = serde_json::to_string(&msg) else {
                continue;
            };
            if m.tx.try_send(text).is_err() && !full.iter().any(|(p, _)| *p == ch.to) {
                full.push((ch.to, DropReason::Slow));
            }
        }
    }

    /// Drops peers and delivers the repairs their departure causes; a repair
    /// that meets another full queue drops that peer too. Ends because every
    /// peer is dropped at most once.
    fn drop_peers(&mut self, mut work: Vec<(PeerId, DropReason)>, fx: &mut Effects) {
        while let Some((peer, reason)) = work.pop() {
            let Some(m) = self.members.remove(&peer) else {
                continue;
            };
            let _ = m.close.set(reason);
            drop(m);
            fx.dropped.push((peer, reason));
            let changes = self.membership.leave(peer, &mut self.rng);
            self.deliver_into(changes, fx, &mut work);
            fx.size = Some((self.stream.name.clone(), self.members.len()));
        }
    }

    /// The membership, for tests.
    #[cfg(test)]
    pub(crate) fn membership(&self) -> &Membership {
        &self.membership
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::outbox::{outbox, Receiver};
    use crate::stream::{StoreConfig, Streams};

    fn swarm(max: usize) -> Swarm {
        let streams = Streams::new(
            None,
            StoreConfig {
                store_seconds: 10,
                max_bytes: 1 << 20,
            },
        );
        Swarm::new(
            streams.get_or_create("t").expect("valid name"),
            ClubConfig::default(),
            max,
        )
    }

    fn add(s: &mut Swarm, peer: PeerId, cap: usize) -> (Receiver, Effects) {
        let (tx, rx) = outbox(cap);
        let fx = s
            .join(
                peer,
                true,
                JoinUpload::default(),
                tx,
                CloseCell::default(),
                |_| "welcome".into(),
            )
            .expect("room");
        (rx, fx)
    }

    /// A swarm of peers 1 to 60, with roomy queues.
    fn sixty_peers() -> (Swarm, Vec<Receiver>) {
        let mut s = swarm(100);
        let rxs = (1..=60).map(|p| add(&mut s, p, 4096).0).collect();
        (s, rxs)
    }

    #[test]
    fn a_full_queue_drops_the_peer_and_repairs_its_links() {
        let mut s = swarm(100);
        // Peer 1's queue holds only its welcome: the first change for it overflows.
        let (_rx1, _) = add(&mut s, 1, 1);
        let mut rxs = Vec::new();
        let mut dropped = Vec::new();
        for p in 2..10 {
            let (rx, fx) = add(&mut s, p, 1024);
            rxs.push(rx);
            dropped.extend(fx.dropped);
        }
        assert_eq!(dropped, vec![(1, DropReason::Slow)]);
        assert!(!s.contains(1));
        assert!(s.membership().clubs_of(1).is_none());
        assert_eq!(s.len(), 8);
    }

    #[test]
    fn a_failure_reported_from_both_ends_is_replaced_once() {
        use std::time::Duration;
        let mut s = swarm(10);
        let (_rx, _) = add(&mut s, 1, 64);
        assert!(
            s.linked(1, SEEDER_PEER_ID),
            "a lone peer is linked with the seeder"
        );
        let t0 = Instant::now();
        let first = s.link_failed(SEEDER_PEER_ID, 1, t0);
        assert!(
            !first.seeder.is_empty(),
            "the seeder's report replaces the link"
        );
        let echo = s.link_failed(1, SEEDER_PEER_ID, t0 + Duration::from_millis(30));
        assert!(
            echo.seeder.is_empty(),
            "the peer's report of the same failure is an echo"
        );
        // A later failure of the new link counts, from either end.
        let later = t0 + Duration::from_millis(LINK_FAILED_ECHO_MS + 1);
        assert!(!s.link_failed(1, SEEDER_PEER_ID, later).seeder.is_empty());
        // And one end reporting twice is two failures.
        let again = later + Duration::from_millis(10);
        assert!(!s.link_failed(1, SEEDER_PEER_ID, again).seeder.is_empty());
    }

    #[test]
    fn stream_full_at_the_bound() {
        let mut s = swarm(2);
        let _a = add(&mut s, 1, 8);
        let _b = add(&mut s, 2, 8);
        let (tx, _rx) = outbox(8);
        let r = s.join(
            3,
            true,
            JoinUpload::default(),
            tx,
            CloseCell::default(),
            |_| String::new(),
        );
        assert!(matches!(r, Err(SignalError::StreamFull(2))));
    }

    #[test]
    fn two_linked_reporters_kick_and_strangers_do_not() {
        let (mut s, _rxs) = sixty_peers();
        let accused = 5;
        let stranger = (1..=60)
            .find(|&p| p != accused && !s.linked(p, accused))
            .expect("someone is not linked to peer 5");
        assert!(!s.report(stranger, accused, Instant::now()).0);
        let linked_to_accused = |s: &Swarm, not: PeerId| {
            (1..=60)
                .find(|&p| p != accused && p != not && s.linked(p, accused))
                .expect("peer 5 keeps links to other peers")
        };
        let first = linked_to_accused(&s, 0);
        assert!(!s.report(first, accused, Instant::now()).0);
        assert!(s.contains(accused));
        // The same reporter again does not count twice.
        assert!(!s.report(first, accused, Instant::now()).0);
        let second = linked_to_accused(&s, first);
        let (kicked, fx) = s.report(second, accused, Instant::now());
        assert!(kicked);
        assert!(fx.dropped.contains(&(accused, DropReason::Reported)));
        assert!(!s.contains(accused));
    }

    #[test]
    fn an_overloaded_source_sheds_one_subscriber_at_a_time() {
        use clubcast_protocol::club::{OVERLOAD_HOLD_MS, OVERLOAD_SHED_MS};
        use clubcast_protocol::signal::LinkRole;
        use std::time::Duration;
        let (mut s, _rxs) = sixty_peers();
        let sources_of = |s: &Swarm, p: PeerId| -> Vec<PeerId> {
            s.membership()
                .links_of(p)
                .into_iter()
                .filter(|l| matches!(l.role, LinkRole::Source { .. }))
                .map(|l| l.peer)
                .filter(|&q| q != SEEDER_PEER_ID)
                .collect()
        };
        // A source that serves two reporters. One peer may have the same
        // source for two shares: count it once, or r1 and r2 could be one peer.
        let mut reporters_of: HashMap<PeerId, Vec<PeerId>> = HashMap::new();
        for p in 1..=60 {
            for q in sources_of(&s, p) {
                let r = reporters_of.entry(q).or_default();
                if !r.contains(&p) {
                    r.push(p);
                }
            }
        }
        let (source, reporters) = reporters_of
            .into_iter()
            .find(|(_, r)| r.len() >= 2)
            .expect("some peer is the last-hop source of two others");
        let (r1, r2) = (reporters[0], reporters[1]);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert!(!s.slow_source(r1, source, t0).0, "late, not overloaded");
        assert!(sources_of(&s, r1).contains(&source));
        s.note_overloaded(source, t0);
        assert!(
            !s.slow_source(r1, source, t0 + ms(OVERLOAD_HOLD_MS)).0,
            "the overload has passed"
        );
        let (replaced, fx) = s.slow_source(r1, source, t0 + ms(1));
        assert!(replaced);
        assert!(fx.dropped.is_empty());
        assert!(!sources_of(&s, r1).contains(&source));
        let shed = ms(OVERLOAD_SHED_MS);
        assert!(
            !s.slow_source(r2, source, t0 + shed).0,
            "one subscriber per OVERLOAD_SHED_MS"
        );
        assert!(sources_of(&s, r2).contains(&source));
        assert!(s.slow_source(r2, source, t0 + ms(1) + shed).0);
        assert!(
            !s.slow_source(r1, source, t0 + shed * 3).0,
            "no longer its source"
        );
        assert!(
            !s.slow_source(999, source, t0 + shed * 5).0,
            "strangers change nothing"
        );
    }

    mod views {
        //! What each peer is told equals what the server believes.
        use super::*;
        use bytes::Bytes;
        use clubcast_protocol::block::BlockFlags;
        use clubcast_protocol::signal::LinkOp;
        use proptest::prelude::*;
        use std::time::Duration;

        /// A peer id no one has: a stranger.
        const STRANGER: PeerId = 9_999;

        #[derive(Debug, Clone)]
        enum Op {
            /// A viewer joins: relays or not, its stated upload, its probed
            /// upload (kbit/s), and its queue's bound (small ones overflow).
            Join(bool, Option<u32>, Option<u32>, usize),
            Leave(usize),
            LinkFailed(usize, usize),
            Overloaded(usize),
            /// Bids a second apart: how many, upload in % of the bitrate,
            /// late pushes.
            Bid(usize, u8, u64, u64),
            SlowSource(usize, usize),
            Report(usize, usize),
            Wait(u64),
        }

        fn kbps() -> impl Strategy<Value = Option<u32>> {
            prop_oneof![
                2 => Just(None),
                1 => prop::sample::select(vec![0u32, 500, 1_500, 2_500, 4_000]).prop_map(Some),
            ]
        }

        fn op() -> impl Strategy<Value = Op> {
            let who = any::<usize>;
            prop_oneof![
                4 => (prop::bool::weighted(0.9), kbps(), kbps(),
                      prop_oneof![9 => Just(4_096usize), 1 => 1usize..4])
                    .prop_map(|(p2p, stated, probed, cap)| Op::Join(p2p, stated, probed, cap)),
                1 => who().prop_map(Op::Leave),
                2 => (who(), who()).prop_map(|(a, b)| Op::LinkFailed(a, b)),
                1 => who().prop_map(Op::Overloaded),
                3 => (who(), 1u8..5, prop::sample::select(vec![0u64, 50, 100, 180, 250]),
                      prop::sample::select(vec![0u64, 5, 25]))
                    .prop_map(|(p, n, pct, late)| Op::Bid(p, n, pct, late)),
                2 => (who(), who()).prop_map(|(a, b)| Op::SlowSource(a, b)),
                1 => (who(), who()).prop_map(|(a, b)| Op::Report(a, b)),
                2 => (0u64..3_000).prop_map(Op::Wait),
            ]
        }

        /// A swarm on a stream of 2,000 kbit/s, so that bids measure upload.
        fn streaming() -> Swarm {
            let s = swarm(usize::MAX);
            // 5 blocks of 4,000 bytes over 80 ms: 160,000 bits in 80 ms.
            for i in 0..5u64 {
                s.stream
                    .publish(
                        BlockFlags::default(),
                        i,
                        i * 20,
                        Bytes::from(vec![0u8; 4_000]),
                    )
                    .expect("publish");
            }
            assert_eq!(s.stream.bitrate_kbps(), 2_000);
            s
        }

        /// A peer's links as it was told of them.
        type View = HashSet<Link>;

        fn apply(view: &mut View, op: LinkOp, link: Link, who: PeerId) {
            match op {
                LinkOp::Add => assert!(view.insert(link), "{who} told twice of {link:?}"),
                LinkOp::Remove => assert!(view.remove(&link), "{who} told to remove {link:?}"),
            }
        }

        /// Runs `ops` on a swarm and, after each, checks that every peer's
        /// links as its messages built them (its welcome, then link changes)
        /// are the membership's links of it, and the seeder's likewise.
        fn check(ops: Vec<Op>) {
            let mut s = streaming();
            let mut ids: Vec<PeerId> = Vec::new();
            let mut live: HashMap<PeerId, (Receiver, View)> = HashMap::new();
            let mut seeder = View::new();
            let t0 = Instant::now();
            let mut now = t0;
            let pick = |ids: &[PeerId], i: usize| match i % (ids.len() + 2) {
                0 => SEEDER_PEER_ID,
                1 => STRANGER,
                k => ids[k - 2],
            };
            for op in ops {
                let mut fx = Effects::default();
                match op {
                    Op::Join(p2p, stated_kbps, probed_kbps, cap) => {
                        let peer = ids.len() as PeerId + 1;
                        let (tx, rx) = outbox(cap);
                        let upload = JoinUpload {
                            stated_kbps,
                            probed_kbps,
                        };
                        let welcome =
                            |j: &Joined| serde_json::to_string(&j.links).expect("links serialize");
                        fx = s
                            .join(peer, p2p, upload, tx, CloseCell::default(), welcome)
                            .expect("room");
                        ids.push(peer);
                        live.insert(peer, (rx, View::new()));
                    }
                    Op::Leave(i) => {
                        let p = pick(&ids, i);
                        fx = s.leave(p);
                        live.remove(&p);
                    }
                    Op::LinkFailed(a, b) => fx = s.link_failed(pick(&ids, a), pick(&ids, b), now),
                    Op::Overloaded(a) => s.note_overloaded(pick(&ids, a), now),
                    Op::Bid(a, n, pct, late) => {
                        // pct % of 2,000 kbit/s over one second, in bytes.
                        let up = pct * 2_000 * 1_000 / 100 / 8;
                        for _ in 0..n {
                            now += Duration::from_secs(1);
                            let more = s.note_upload(pick(&ids, a), up, late, 1_000, now).1;
                            fx.dropped.extend(more.dropped);
                            fx.seeder.extend(more.seeder);
                        }
                    }
                    Op::SlowSource(a, b) => fx = s.slow_source(pick(&ids, a), pick(&ids, b), now).1,
                    Op::Report(a, b) => fx = s.report(pick(&ids, a), pick(&ids, b), now).1,
                    Op::Wait(ms) => now += Duration::from_millis(ms),
                }
                for (p, _) in &fx.dropped {
                    live.remove(p);
                }
                for e in fx.seeder {
                    if let SeederEvent::Link { op, link, .. } = e {
                        apply(&mut seeder, op, link, SEEDER_PEER_ID);
                    }
                }
                for (p, (rx, view)) in &mut live {
                    while let Some(text) = rx.try_recv() {
                        if let Ok(links) = serde_json::from_str::<Vec<Link>>(&text) {
                            assert!(view.is_empty(), "the welcome comes first");
                            *view = links.into_iter().collect();
                            continue;
                        }
                        match serde_json::from_str::<ServerMsg>(&text) {
                            Ok(ServerMsg::Link { op, link, .. }) => apply(view, op, link, *p),
                            other => panic!("{p} got {other:?}"),
                        }
                    }
                }
                let members: HashSet<PeerId> = live.keys().copied().collect();
                let expected: HashSet<PeerId> = s.members.keys().copied().collect();
                assert_eq!(
                    members, expected,
                    "the peers the test holds are the swarm's"
                );
                for (p, (_, view)) in &live {
                    let told: View = s.membership().links_of(*p).into_iter().collect();
                    assert_eq!(*view, told, "peer {p}");
                    for l in view {
                        assert!(
                            l.peer == SEEDER_PEER_ID || live.contains_key(&l.peer),
                            "{p} linked to {} that left",
                            l.peer
                        );
                    }
                }
                let told: View = s.seeder_links().into_iter().collect();
                assert_eq!(seeder, told, "the seeder");
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn every_peer_is_told_exactly_its_links(ops in prop::collection::vec(op(), 1..150)) {
                check(ops);
            }
        }
    }
}
