//! One on-demand room: the viewers of one upload of an asset (one key id),
//! each trading blocks both ways with a few neighbours.
//!
//! The server only introduces neighbours and relays their SDP and ICE; it
//! never joins a room (the origin's `/vod/{name}/blocks` is the backstop).
//!
//! - A joiner gets up to [`VOD_NEIGHBOURS`] members, drawn at random among
//!   those with fewer than [`VOD_MAX_DEGREE`] neighbours; it makes the offers.
//! - When a member leaves (or is dropped), or a link between two fails, each
//!   member it leaves with fewer than [`VOD_NEEDY`] neighbours is topped up
//!   to [`VOD_NEIGHBOURS`] with members under the degree cap that are not
//!   already its neighbours; the needy one makes the offers.
//! - A failed pair is not paired again for [`FAILED_PAIR_MS`]
//!   (at most [`MAX_FAILED_PAIRS`] remembered).
//!
//! Like the live [`Swarm`](super::swarm::Swarm), everything runs under the
//! room's mutex and never awaits: messages go out through the bounded
//! outboxes with `try_send`, a member whose outbox is full is dropped (its
//! sender dropped, which closes its socket), and what the hub must do outside
//! the lock comes back as [`VodEffects`]. Every degree stays at most
//! [`VOD_MAX_DEGREE`], so one member's departure costs a bounded amount of work.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use clubcast_protocol::signal::{LinkOp, Neighbour, PeerId, ServerMsg, SignalData, SIGNAL_VERSION};
use rand::seq::IteratorRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::outbox::Sender;
use super::swarm::CloseCell;
use super::{DropReason, SignalError, REPORTS_TO_KICK};

/// Neighbours a joiner is given, and a needy member is topped up to.
pub const VOD_NEIGHBOURS: usize = 6;
/// Most neighbours a member has: members at it are not picked for others.
pub const VOD_MAX_DEGREE: usize = 10;
/// A member left with fewer neighbours than this is topped up.
pub const VOD_NEEDY: usize = VOD_NEIGHBOURS / 2;
/// How long a pair whose link failed is kept apart, ms.
pub const FAILED_PAIR_MS: u64 = 60_000;
/// Failed pairs one room remembers; at the bound the expired ones go, and if
/// none has expired, the oldest.
pub const MAX_FAILED_PAIRS: usize = 2048;

struct Member {
    tx: Sender,
    close: CloseCell,
    /// Its neighbours, each with whether this member makes the offer (as
    /// it was told; a removal repeats it).
    neighbours: BTreeMap<PeerId, bool>,
    /// Distinct neighbours that reported a bad block from it.
    reported_by: BTreeSet<PeerId>,
}

/// Work for the hub once the room lock is released.
#[derive(Debug, Default)]
pub(crate) struct VodEffects {
    /// Members the room dropped, already removed from it.
    pub(crate) dropped: Vec<(PeerId, DropReason)>,
}

/// Members to drop, and why.
type Work = Vec<(PeerId, DropReason)>;

/// The viewers of one upload of an asset.
pub(crate) struct VodRoom {
    asset: String,
    key: String,
    members: BTreeMap<PeerId, Member>,
    rng: ChaCha8Rng,
    max_peers: usize,
    /// Zero of the ms clock failed pairs are timed on.
    epoch: Instant,
    /// Pairs (lower id first) whose link failed, and when.
    failed: HashMap<(PeerId, PeerId), u64>,
    /// Emptied and taken out of the hub: a joiner that raced the removal
    /// must make a new room.
    retired: bool,
}

/// `msg` as JSON text, or `None` (logged) if it cannot be.
fn encode(msg: &ServerMsg) -> Option<String> {
    serde_json::to_string(msg)
        .map_err(|e| tracing::error!(%e, "server message failed to serialize"))
        .ok()
}

fn pair(a: PeerId, b: PeerId) -> (PeerId, PeerId) {
    (a.min(b), a.max(b))
}

/// Whether the link between `a` and `b` failed less than [`FAILED_PAIR_MS`] before `ms`.
fn recently_failed(failed: &HashMap<(PeerId, PeerId), u64>, a: PeerId, b: PeerId, ms: u64) -> bool {
    failed
        .get(&pair(a, b))
        .is_some_and(|&at| ms.saturating_sub(at) < FAILED_PAIR_MS)
}

impl VodRoom {
    /// An empty room for the upload of `asset` under `key` (its id form),
    /// holding at most `max_peers` members.
    pub(crate) fn new(asset: String, key: String, max_peers: usize, now: Instant) -> Self {
        Self::with_rng(
            asset,
            key,
            max_peers,
            now,
            ChaCha8Rng::from_seed(rand::random()),
        )
    }

    fn with_rng(
        asset: String,
        key: String,
        max_peers: usize,
        now: Instant,
        rng: ChaCha8Rng,
    ) -> Self {
        VodRoom {
            asset,
            key,
            members: BTreeMap::new(),
            rng,
            max_peers,
            epoch: now,
            failed: HashMap::new(),
            retired: false,
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The asset's name.
    pub(crate) fn asset(&self) -> &str {
        &self.asset
    }

    /// The key id the room is for.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// Members now.
    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the room has no member.
    pub(crate) fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether the hub took the room out (see [`VodRoom::retire`]).
    pub(crate) fn is_retired(&self) -> bool {
        self.retired
    }

    /// Marks the room as taken out of the hub: no one joins it any more.
    pub(crate) fn retire(&mut self) {
        self.retired = true;
    }

    /// Whether `a` and `b` are neighbours.
    pub(crate) fn neighbours(&self, a: PeerId, b: PeerId) -> bool {
        self.members
            .get(&a)
            .is_some_and(|m| m.neighbours.contains_key(&b))
    }

    /// Adds `peer` with up to [`VOD_NEIGHBOURS`] neighbours drawn at random
    /// among the members under [`VOD_MAX_DEGREE`]. `welcome` builds the
    /// joiner's first message from them (it offers to each); it is queued
    /// before any neighbour hears of the joiner, so it is always the first
    /// message the joiner receives. Each neighbour is told
    /// `neighbour add` (it answers).
    pub(crate) fn join(
        &mut self,
        peer: PeerId,
        tx: Sender,
        close: CloseCell,
        now: Instant,
        welcome: impl FnOnce(&[Neighbour]) -> String,
    ) -> Result<VodEffects, SignalError> {
        if self.members.len() >= self.max_peers {
            return Err(SignalError::StreamFull(self.max_peers));
        }
        let chosen: Vec<PeerId> = self
            .members
            .iter()
            .filter(|(&p, m)| p != peer && m.neighbours.len() < VOD_MAX_DEGREE)
            .map(|(&p, _)| p)
            .choose_multiple(&mut self.rng, VOD_NEIGHBOURS);
        let told: Vec<Neighbour> = chosen
            .iter()
            .map(|&p| Neighbour {
                peer: p,
                offer: true,
            })
            .collect();
        // A fresh queue has room: the welcome is its first message.
        let _ = tx.try_send(welcome(&told));
        self.members.insert(
            peer,
            Member {
                tx,
                close,
                neighbours: chosen.iter().map(|&p| (p, true)).collect(),
                reported_by: BTreeSet::new(),
            },
        );
        let mut work = Work::new();
        for p in chosen {
            if let Some(m) = self.members.get_mut(&p) {
                m.neighbours.insert(peer, false);
            }
            let n = Neighbour { peer, offer: false };
            self.tell(p, LinkOp::Add, n, &mut work);
        }
        let mut fx = VodEffects::default();
        self.drop_peers(work, now, &mut fx);
        Ok(fx)
    }

    /// Removes `peer` (its socket closed): each former neighbour is told
    /// `neighbour remove`, and the needy ones are topped up. Returns whether
    /// it was a member (a dropped one no longer is).
    pub(crate) fn leave(&mut self, peer: PeerId, now: Instant) -> (bool, VodEffects) {
        let mut fx = VodEffects::default();
        if !self.members.contains_key(&peer) {
            return (false, fx);
        }
        let mut work = Work::new();
        self.remove_member(peer, now, &mut work);
        self.drop_peers(work, now, &mut fx);
        (true, fx)
    }

    /// Relays SDP or ICE from `from` to `to`, which must be its neighbour.
    pub(crate) fn relay(
        &mut self,
        from: PeerId,
        to: PeerId,
        data: SignalData,
        now: Instant,
    ) -> Result<VodEffects, SignalError> {
        if from == to || !self.neighbours(from, to) {
            return Err(SignalError::UnknownPeer(to));
        }
        let msg = ServerMsg::Signal {
            v: SIGNAL_VERSION,
            from,
            data,
        };
        let mut work = Work::new();
        self.send(to, &msg, &mut work);
        let mut fx = VodEffects::default();
        self.drop_peers(work, now, &mut fx);
        Ok(fx)
    }

    /// Queues `msg` for the member `to` (its grant); one whose queue is
    /// full is dropped as slow. Nothing happens for a non-member.
    pub(crate) fn send_to(&mut self, to: PeerId, msg: &ServerMsg, now: Instant) -> VodEffects {
        let mut work = Work::new();
        self.send(to, msg, &mut work);
        let mut fx = VodEffects::default();
        self.drop_peers(work, now, &mut fx);
        fx
    }

    /// `peer`'s link to its neighbour `remote` failed: the pair is parted
    /// (both told `neighbour remove`), kept apart for [`FAILED_PAIR_MS`], and
    /// both are topped up if needy. A report about a peer that is not a
    /// neighbour changes nothing: that is how the other end's echo of the
    /// same failure acts once, and a stranger cannot be accused.
    pub(crate) fn link_failed(&mut self, peer: PeerId, remote: PeerId, now: Instant) -> VodEffects {
        let mut work = Work::new();
        self.fail_link(peer, remote, now, &mut work);
        let mut fx = VodEffects::default();
        self.drop_peers(work, now, &mut fx);
        fx
    }

    /// `reporter` says its neighbour `accused` sent a bad block. The pair is
    /// parted as for a failure; once [`REPORTS_TO_KICK`] distinct neighbours
    /// reported it, `accused` is dropped ([`DropReason::Reported`]) and its
    /// departure handled as a leave. A report about a non-neighbour does
    /// nothing. Returns whether `accused` was dropped.
    pub(crate) fn report(
        &mut self,
        reporter: PeerId,
        accused: PeerId,
        now: Instant,
    ) -> (bool, VodEffects) {
        let mut fx = VodEffects::default();
        let mut work = Work::new();
        if !self.fail_link(reporter, accused, now, &mut work) {
            return (false, fx);
        }
        let kick = match self.members.get_mut(&accused) {
            Some(m) => {
                m.reported_by.insert(reporter);
                m.reported_by.len() >= REPORTS_TO_KICK
            }
            None => false,
        };
        if kick && !work.iter().any(|&(p, _)| p == accused) {
            work.push((accused, DropReason::Reported));
        }
        self.drop_peers(work, now, &mut fx);
        (kick, fx)
    }

    /// Parts `peer` and `remote` if they are neighbours; returns whether they were.
    fn fail_link(&mut self, peer: PeerId, remote: PeerId, now: Instant, work: &mut Work) -> bool {
        if peer == remote || !self.neighbours(peer, remote) {
            return false;
        }
        self.unlink(peer, remote, work);
        self.remember_failed(pair(peer, remote), self.ms(now));
        self.top_up(peer, now, work);
        self.top_up(remote, now, work);
        true
    }

    fn remember_failed(&mut self, key: (PeerId, PeerId), ms: u64) {
        if self.failed.len() >= MAX_FAILED_PAIRS {
            self.failed
                .retain(|_, &mut at| ms.saturating_sub(at) < FAILED_PAIR_MS);
        }
        if self.failed.len() >= MAX_FAILED_PAIRS {
            let oldest = self
                .failed
                .iter()
                .min_by_key(|(_, &at)| at)
                .map(|(&k, _)| k);
            if let Some(k) = oldest {
                self.failed.remove(&k);
            }
        }
        self.failed.insert(key, ms);
    }

    /// Removes the pair from both sides and tells both.
    fn unlink(&mut self, a: PeerId, b: PeerId, work: &mut Work) {
        for (me, other) in [(a, b), (b, a)] {
            let offer = self
                .members
                .get_mut(&me)
                .and_then(|m| m.neighbours.remove(&other));
            if let Some(offer) = offer {
                let n = Neighbour { peer: other, offer };
                self.tell(me, LinkOp::Remove, n, work);
            }
        }
    }

    /// Tops `peer` up to [`VOD_NEIGHBOURS`] if it has fewer than
    /// [`VOD_NEEDY`], with members under [`VOD_MAX_DEGREE`] that are not its
    /// neighbours, not recently failed with it, and not being dropped.
    fn top_up(&mut self, peer: PeerId, now: Instant, work: &mut Work) {
        let ms = self.ms(now);
        let Some(m) = self.members.get(&peer) else {
            return;
        };
        let have = m.neighbours.len();
        if have >= VOD_NEEDY || work.iter().any(|&(p, _)| p == peer) {
            return;
        }
        let failed = &self.failed;
        let picked: Vec<PeerId> = self
            .members
            .iter()
            .filter(|&(&q, c)| {
                q != peer
                    && c.neighbours.len() < VOD_MAX_DEGREE
                    && !m.neighbours.contains_key(&q)
                    && !recently_failed(failed, peer, q, ms)
                    && !work.iter().any(|&(p, _)| p == q)
            })
            .map(|(&q, _)| q)
            .choose_multiple(&mut self.rng, VOD_NEIGHBOURS - have);
        for q in picked {
            self.link(peer, q, work);
        }
    }

    /// Makes `offerer` and `answerer` neighbours and tells both.
    fn link(&mut self, offerer: PeerId, answerer: PeerId, work: &mut Work) {
        for (me, other, offer) in [(offerer, answerer, true), (answerer, offerer, false)] {
            if let Some(m) = self.members.get_mut(&me) {
                m.neighbours.insert(other, offer);
            }
            let n = Neighbour { peer: other, offer };
            self.tell(me, LinkOp::Add, n, work);
        }
    }

    /// Takes `peer` out: its former neighbours are told and the needy ones
    /// topped up, and its failed pairs are forgotten (its id is not reused).
    fn remove_member(&mut self, peer: PeerId, now: Instant, work: &mut Work) {
        let Some(gone) = self.members.remove(&peer) else {
            return;
        };
        // Dropping its sender closes its socket.
        drop(gone.tx);
        for &n in gone.neighbours.keys() {
            let offer = self
                .members
                .get_mut(&n)
                .and_then(|m| m.neighbours.remove(&peer));
            if let Some(offer) = offer {
                let msg = Neighbour { peer, offer };
                self.tell(n, LinkOp::Remove, msg, work);
            }
        }
        self.failed.retain(|&(a, b), _| a != peer && b != peer);
        for &n in gone.neighbours.keys() {
            self.top_up(n, now, work);
        }
    }

    /// Drops members and handles their departures as leaves; a message that
    /// meets another full queue drops that member too. Ends because every
    /// member is dropped at most once.
    fn drop_peers(&mut self, mut work: Work, now: Instant, fx: &mut VodEffects) {
        while let Some((peer, reason)) = work.pop() {
            let Some(m) = self.members.get(&peer) else {
                continue;
            };
            let _ = m.close.set(reason);
            fx.dropped.push((peer, reason));
            self.remove_member(peer, now, &mut work);
        }
    }

    fn tell(&self, to: PeerId, op: LinkOp, neighbour: Neighbour, work: &mut Work) {
        let msg = ServerMsg::Neighbour {
            v: SIGNAL_VERSION,
            op,
            neighbour,
        };
        self.send(to, &msg, work);
    }

    /// Queues `msg` for `to`; a full queue marks it to be dropped.
    fn send(&self, to: PeerId, msg: &ServerMsg, work: &mut Work) {
        let Some(m) = self.members.get(&to) else {
            return;
        };
        let Some(text) = encode(msg) else { return };
        if m.tx.try_send(text).is_err() && !work.iter().any(|&(p, _)| p == to) {
            work.push((to, DropReason::Slow));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::outbox::{outbox, Receiver};
    use std::collections::HashSet;
    use std::time::Duration;

    fn room(max: usize, seed: u64, now: Instant) -> VodRoom {
        VodRoom::with_rng(
            "demo".into(),
            "key".into(),
            max,
            now,
            ChaCha8Rng::seed_from_u64(seed),
        )
    }

    /// What one member was told: its welcome's neighbours, then changes.
    struct Viewer {
        rx: Receiver,
        close: CloseCell,
        view: BTreeMap<PeerId, bool>,
        signals: Vec<(PeerId, SignalData)>,
    }

    impl Viewer {
        /// Reads every queued message into the view.
        fn read(&mut self) {
            while let Some(text) = self.rx.try_recv() {
                match serde_json::from_str::<ServerMsg>(&text).expect("a server message") {
                    ServerMsg::VodWelcome { neighbours, .. } => {
                        assert!(self.view.is_empty(), "the welcome comes first");
                        self.view = neighbours.iter().map(|n| (n.peer, n.offer)).collect();
                    }
                    ServerMsg::Neighbour {
                        op: LinkOp::Add,
                        neighbour,
                        ..
                    } => {
                        let old = self.view.insert(neighbour.peer, neighbour.offer);
                        assert!(old.is_none(), "told twice of {neighbour:?}");
                    }
                    ServerMsg::Neighbour {
                        op: LinkOp::Remove,
                        neighbour,
                        ..
                    } => {
                        let old = self.view.remove(&neighbour.peer);
                        assert_eq!(old, Some(neighbour.offer), "removed {neighbour:?}");
                    }
                    ServerMsg::Signal { from, data, .. } => self.signals.push((from, data)),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    fn welcome(peer: PeerId) -> impl FnOnce(&[Neighbour]) -> String {
        move |n| {
            serde_json::to_string(&ServerMsg::VodWelcome {
                v: SIGNAL_VERSION,
                peer_id: peer,
                asset: "demo".into(),
                key: "key".into(),
                neighbours: n.to_vec(),
                ice_servers: Vec::new(),
                heartbeat_ms: 5000,
                grant_token: None,
                bid_interval_ms: 0,
            })
            .expect("serializes")
        }
    }

    fn add(r: &mut VodRoom, peer: PeerId, cap: usize, now: Instant) -> (Viewer, VodEffects) {
        let (tx, rx) = outbox(cap);
        let close = CloseCell::default();
        let fx = r
            .join(peer, tx, close.clone(), now, welcome(peer))
            .expect("room");
        let mut v = Viewer {
            rx,
            close,
            view: BTreeMap::new(),
            signals: Vec::new(),
        };
        v.read();
        (v, fx)
    }

    /// Reads every viewer's queue and checks each view is the room's,
    /// neighbours are mutual with one offerer, and degrees are capped.
    fn check(r: &VodRoom, viewers: &mut BTreeMap<PeerId, Viewer>) {
        for v in viewers.values_mut() {
            v.read();
        }
        let ids: BTreeSet<PeerId> = r.members.keys().copied().collect();
        let held: BTreeSet<PeerId> = viewers.keys().copied().collect();
        assert_eq!(ids, held, "the members the test holds are the room's");
        for (&p, v) in viewers.iter() {
            let m = &r.members[&p];
            assert_eq!(v.view, m.neighbours, "peer {p} was told its neighbours");
            assert!(
                m.neighbours.len() <= VOD_MAX_DEGREE,
                "peer {p} over the cap"
            );
            for (&q, &offer) in &m.neighbours {
                assert_eq!(r.members[&q].neighbours.get(&p), Some(&!offer), "{p}-{q}");
            }
        }
    }

    fn many(n: u64, seed: u64, now: Instant) -> (VodRoom, BTreeMap<PeerId, Viewer>) {
        let mut r = room(1000, seed, now);
        let mut viewers = BTreeMap::new();
        for p in 1..=n {
            let (v, fx) = add(&mut r, p, 4096, now);
            assert!(fx.dropped.is_empty());
            viewers.insert(p, v);
        }
        check(&r, &mut viewers);
        (r, viewers)
    }

    /// A room of members 1..=n whose neighbours are exactly `edges`
    /// (the first of each pair offers), with every viewer's view to match.
    fn wired(
        n: PeerId,
        edges: &[(PeerId, PeerId)],
        now: Instant,
    ) -> (VodRoom, BTreeMap<PeerId, Viewer>) {
        let mut r = room(1000, 12, now);
        let mut viewers = BTreeMap::new();
        for p in 1..=n {
            viewers.insert(p, add(&mut r, p, 4096, now).0);
        }
        for (p, m) in r.members.iter_mut() {
            m.neighbours.clear();
            let v = viewers.get_mut(p).expect("held");
            v.read();
            v.view.clear();
        }
        let mut work = Work::new();
        for &(a, b) in edges {
            r.link(a, b, &mut work);
        }
        assert!(work.is_empty());
        check(&r, &mut viewers);
        (r, viewers)
    }

    fn neighbours_of(r: &VodRoom, p: PeerId) -> Vec<PeerId> {
        r.members[&p].neighbours.keys().copied().collect()
    }

    #[test]
    fn a_joiner_gets_at_most_six_neighbours_under_the_degree_cap() {
        let now = Instant::now();
        let mut r = room(1000, 1, now);
        let mut viewers = BTreeMap::new();
        for p in 1..=60 {
            let under: BTreeSet<PeerId> = r
                .members
                .iter()
                .filter(|(_, m)| m.neighbours.len() < VOD_MAX_DEGREE)
                .map(|(&q, _)| q)
                .collect();
            let (v, fx) = add(&mut r, p, 4096, now);
            assert!(fx.dropped.is_empty());
            assert_eq!(v.view.len(), under.len().min(VOD_NEIGHBOURS), "peer {p}");
            for (q, &offer) in &v.view {
                assert!(offer, "the joiner offers");
                assert!(under.contains(q), "{q} was at the cap");
            }
            viewers.insert(p, v);
            check(&r, &mut viewers);
        }
        // Sixty joins fill the room up to the cap.
        assert!(r
            .members
            .values()
            .any(|m| m.neighbours.len() == VOD_MAX_DEGREE));
        // Everyone at the cap (eleven members, all neighbours): a joiner gets no one.
        let all: Vec<(PeerId, PeerId)> = (1..=11)
            .flat_map(|a| ((a + 1)..=11).map(move |b| (a, b)))
            .collect();
        let (mut r2, _viewers) = wired(11, &all, now);
        let (late, _) = add(&mut r2, 12, 64, now);
        assert!(
            late.view.is_empty(),
            "everyone is at the cap: {:?}",
            late.view
        );
    }

    #[test]
    fn a_full_room_refuses_the_joiner() {
        let now = Instant::now();
        let mut r = room(2, 3, now);
        let _a = add(&mut r, 1, 8, now);
        let _b = add(&mut r, 2, 8, now);
        let (tx, _rx) = outbox(8);
        let e = r.join(3, tx, CloseCell::default(), now, welcome(3));
        assert!(matches!(e, Err(SignalError::StreamFull(2))));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn a_leave_tells_its_neighbours_and_tops_up_the_needy_only() {
        let now = Instant::now();
        // 2 keeps 3, 4 and 5 when 1 leaves: not needy, so not topped up,
        // though 6, 7 and 8 have room.
        let edges = [
            (1, 2),
            (2, 3),
            (2, 4),
            (2, 5),
            (3, 4),
            (3, 5),
            (4, 5),
            (6, 7),
            (6, 8),
            (7, 8),
        ];
        let (mut r, mut viewers) = wired(8, &edges, now);
        viewers.remove(&1);
        let (was, fx) = r.leave(1, now);
        assert!(was && fx.dropped.is_empty());
        check(&r, &mut viewers);
        assert_eq!(neighbours_of(&r, 2), [3, 4, 5]);
        assert!(!r.leave(1, now).0, "a second leave is nothing");

        // 2 keeps only 3: needy, topped up to six with everyone it can have,
        // and it makes the offers.
        let edges = [
            (1, 2),
            (3, 2),
            (1, 4),
            (3, 4),
            (4, 5),
            (5, 6),
            (6, 7),
            (7, 8),
            (8, 3),
        ];
        let (mut r, mut viewers) = wired(8, &edges, now);
        viewers.remove(&1);
        r.leave(1, now);
        check(&r, &mut viewers);
        let two = &r.members[&2].neighbours;
        assert_eq!(two.len(), VOD_NEIGHBOURS, "{two:?}");
        assert_eq!(
            two.get(&3),
            Some(&false),
            "the old neighbour is kept as it was"
        );
        for q in 4..=8 {
            assert_eq!(two.get(&q), Some(&true), "2 offers to {q}");
        }
        for p in 2..=8 {
            assert!(!r.neighbours(p, 1), "{p} still has 1");
        }
    }

    #[test]
    fn a_failed_link_parts_the_pair_and_does_not_pair_it_again_at_once() {
        let t0 = Instant::now();
        let mut r = room(100, 5, t0);
        let mut viewers = BTreeMap::new();
        for p in 1..=3 {
            viewers.insert(p, add(&mut r, p, 256, t0).0);
        }
        assert!(r.neighbours(1, 2) && r.neighbours(1, 3) && r.neighbours(2, 3));
        let fx = r.link_failed(1, 2, t0);
        assert!(fx.dropped.is_empty());
        check(&r, &mut viewers);
        assert!(!r.neighbours(1, 2), "parted");
        // Both were needy (one left each), but the only other member is theirs already.
        assert!(r.neighbours(1, 3) && r.neighbours(2, 3));
        // The other end's echo changes nothing.
        r.link_failed(2, 1, t0 + Duration::from_millis(30));
        check(&r, &mut viewers);
        assert!(!r.neighbours(1, 2));
        // Peer 3 leaves: 1 and 2 are needy, but kept apart for FAILED_PAIR_MS.
        viewers.remove(&3);
        r.leave(3, t0 + Duration::from_millis(100));
        check(&r, &mut viewers);
        assert!(viewers[&1].view.is_empty() && viewers[&2].view.is_empty());
        // A newcomer after the pause can be paired with both; a later top-up
        // may pair 1 and 2 again.
        let later = t0 + Duration::from_millis(FAILED_PAIR_MS + 1);
        viewers.insert(4, add(&mut r, 4, 256, later).0);
        check(&r, &mut viewers);
        assert!(r.neighbours(4, 1) && r.neighbours(4, 2));
        r.link_failed(4, 1, later);
        check(&r, &mut viewers);
        assert!(
            r.neighbours(1, 2),
            "the pause is over: 1 is topped up with 2"
        );
        assert_eq!(
            r.members[&1].neighbours.get(&2),
            Some(&true),
            "the needy one offers"
        );
    }

    #[test]
    fn a_failure_about_a_stranger_or_oneself_changes_nothing() {
        let now = Instant::now();
        let (mut r, mut viewers) = many(20, 6, now);
        let stranger = (2..=20).find(|&q| !r.neighbours(1, q)).expect("a stranger");
        let before: Vec<_> = r.members.values().map(|m| m.neighbours.clone()).collect();
        r.link_failed(1, stranger, now);
        r.link_failed(1, 1, now);
        r.link_failed(1, 9_999, now);
        check(&r, &mut viewers);
        let after: Vec<_> = r.members.values().map(|m| m.neighbours.clone()).collect();
        assert_eq!(before, after);
        assert!(r.failed.is_empty());
    }

    #[test]
    fn signals_go_only_between_neighbours() {
        let now = Instant::now();
        let (mut r, mut viewers) = many(20, 7, now);
        let n = *r.members[&1].neighbours.keys().next().expect("a neighbour");
        let stranger = (2..=20).find(|&q| !r.neighbours(1, q)).expect("a stranger");
        let offer = SignalData::Offer {
            sdp: "v=0".into(),
            conn: Some(1),
        };
        r.relay(1, n, offer.clone(), now).expect("neighbours");
        assert!(matches!(
            r.relay(1, stranger, offer.clone(), now),
            Err(SignalError::UnknownPeer(p)) if p == stranger
        ));
        assert!(matches!(
            r.relay(1, 9_999, offer.clone(), now),
            Err(SignalError::UnknownPeer(9_999))
        ));
        assert!(r.relay(1, 1, offer.clone(), now).is_err());
        check(&r, &mut viewers);
        assert_eq!(viewers[&n].signals, vec![(1, offer)]);
        assert!(viewers[&stranger].signals.is_empty());
    }

    #[test]
    fn reports_from_two_neighbours_drop_the_accused() {
        let now = Instant::now();
        let (mut r, mut viewers) = many(20, 8, now);
        let accused = 10;
        let stranger = (1..=20)
            .find(|&q| q != accused && !r.neighbours(q, accused))
            .expect("a stranger");
        assert!(
            !r.report(stranger, accused, now).0,
            "strangers do not count"
        );
        assert!(r.members[&accused].reported_by.is_empty());
        let first = *r.members[&accused].neighbours.keys().next().expect("one");
        let (kicked, fx) = r.report(first, accused, now);
        assert!(!kicked && fx.dropped.is_empty());
        assert!(
            !r.neighbours(first, accused),
            "the reporter is parted from it"
        );
        // The same reporter again is no neighbour any more: it does not count twice.
        assert!(!r.report(first, accused, now).0);
        check(&r, &mut viewers);
        let second = *r.members[&accused]
            .neighbours
            .keys()
            .next()
            .expect("another");
        let former: Vec<PeerId> = r.members[&accused].neighbours.keys().copied().collect();
        let (kicked, fx) = r.report(second, accused, now);
        assert!(kicked);
        assert_eq!(fx.dropped, vec![(accused, DropReason::Reported)]);
        let gone = viewers.remove(&accused).expect("held");
        assert_eq!(gone.close.get(), Some(&DropReason::Reported));
        check(&r, &mut viewers);
        for p in former {
            assert!(!r.neighbours(p, accused));
        }
        assert!(!r.members.contains_key(&accused));
    }

    #[test]
    fn a_full_queue_drops_the_member_as_a_leave() {
        let now = Instant::now();
        let mut r = room(100, 9, now);
        // Peer 1's queue holds only its welcome, unread: the first add for it overflows.
        let (tx, _unread) = outbox(1);
        let close = CloseCell::default();
        r.join(1, tx, close.clone(), now, welcome(1)).expect("room");
        let mut viewers = BTreeMap::new();
        let (v, fx) = add(&mut r, 2, 256, now);
        viewers.insert(2, v);
        assert_eq!(fx.dropped, vec![(1, DropReason::Slow)]);
        assert_eq!(close.get(), Some(&DropReason::Slow));
        check(&r, &mut viewers);
        assert!(
            viewers[&2].view.is_empty(),
            "told of 1, then of its removal"
        );
    }

    #[test]
    fn a_message_for_one_member_reaches_it_and_a_full_queue_drops_it() {
        let now = Instant::now();
        let mut r = room(10, 5, now);
        let (mut a, _) = add(&mut r, 1, 8, now);
        let (_b, _) = add(&mut r, 2, 1, now);
        let grant = ServerMsg::Grant {
            v: SIGNAL_VERSION,
            bits: 4_000,
            interval_ms: 1000,
        };
        let fx = r.send_to(1, &grant, now);
        assert!(fx.dropped.is_empty());
        // A's queue: B's arrival, then its grant only.
        let mut got = Vec::new();
        while let Some(text) = a.rx.try_recv() {
            got.push(serde_json::from_str::<ServerMsg>(&text).expect("a server message"));
        }
        assert_eq!(got.last(), Some(&grant));
        assert_eq!(got.iter().filter(|m| **m == grant).count(), 1);
        // B's queue holds one message: its first grant fits, the second
        // finds it full and drops B.
        assert!(r.send_to(2, &grant, now).dropped.is_empty());
        let fx = r.send_to(2, &grant, now);
        assert_eq!(fx.dropped, [(2, DropReason::Slow)]);
        assert_eq!(r.len(), 1);
        // Nobody to send to: nothing happens.
        assert!(r.send_to(99, &grant, now).dropped.is_empty());
    }

    #[test]
    fn the_room_is_empty_when_the_last_leaves() {
        let now = Instant::now();
        let (mut r, viewers) = many(5, 10, now);
        for p in viewers.keys() {
            r.leave(*p, now);
        }
        assert!(r.is_empty());
        assert!(r.failed.is_empty());
    }

    #[test]
    fn failed_pairs_are_bounded() {
        let t0 = Instant::now();
        let mut r = room(10, 11, t0);
        for i in 0..(MAX_FAILED_PAIRS as u64 + 10) {
            r.remember_failed((i, i + 1_000_000), i);
        }
        assert_eq!(r.failed.len(), MAX_FAILED_PAIRS);
        assert!(!r.failed.contains_key(&(0, 1_000_000)), "the oldest went");
        // Expired ones go first, all at once.
        r.remember_failed((7, 8), FAILED_PAIR_MS + 5_000);
        assert!(r.failed.len() < MAX_FAILED_PAIRS / 2, "{}", r.failed.len());
    }

    mod views {
        //! What each member is told equals what the room holds, whatever happens.
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            /// A viewer joins with a queue of this bound (small ones overflow).
            Join(usize),
            Leave(usize),
            LinkFailed(usize, usize),
            Report(usize, usize),
            Signal(usize, usize),
            Wait(u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            let who = any::<usize>;
            prop_oneof![
                5 => prop_oneof![19 => Just(4_096usize), 1 => 1usize..6].prop_map(Op::Join),
                2 => who().prop_map(Op::Leave),
                3 => (who(), who()).prop_map(|(a, b)| Op::LinkFailed(a, b)),
                1 => (who(), who()).prop_map(|(a, b)| Op::Report(a, b)),
                2 => (who(), who()).prop_map(|(a, b)| Op::Signal(a, b)),
                1 => (0u64..30_000).prop_map(Op::Wait),
            ]
        }

        fn run(seed: u64, ops: Vec<Op>) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut r = room(usize::MAX, seed, t0);
            let mut viewers: BTreeMap<PeerId, Viewer> = BTreeMap::new();
            let mut next: PeerId = 1;
            let pick = |v: &BTreeMap<PeerId, Viewer>, i: usize| -> PeerId {
                let ids: Vec<PeerId> = v.keys().copied().collect();
                match i % (ids.len() + 1) {
                    0 => 9_999,
                    k => ids[k - 1],
                }
            };
            for op in ops {
                let fx = match op {
                    Op::Join(cap) => {
                        let (v, fx) = add(&mut r, next, cap, now);
                        viewers.insert(next, v);
                        next += 1;
                        fx
                    }
                    Op::Leave(i) => {
                        let p = pick(&viewers, i);
                        viewers.remove(&p);
                        r.leave(p, now).1
                    }
                    Op::LinkFailed(a, b) => {
                        r.link_failed(pick(&viewers, a), pick(&viewers, b), now)
                    }
                    Op::Report(a, b) => r.report(pick(&viewers, a), pick(&viewers, b), now).1,
                    Op::Signal(a, b) => {
                        let (a, b) = (pick(&viewers, a), pick(&viewers, b));
                        let data = SignalData::Offer {
                            sdp: String::new(),
                            conn: None,
                        };
                        let linked = r.neighbours(a, b);
                        let res = r.relay(a, b, data, now);
                        assert_eq!(res.is_ok(), linked);
                        res.unwrap_or_default()
                    }
                    Op::Wait(ms) => {
                        now += Duration::from_millis(ms);
                        VodEffects::default()
                    }
                };
                let dropped: HashSet<PeerId> = fx.dropped.iter().map(|&(p, _)| p).collect();
                assert_eq!(dropped.len(), fx.dropped.len(), "dropped once each");
                for p in dropped {
                    viewers.remove(&p);
                }
                check(&r, &mut viewers);
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn every_member_is_told_exactly_its_neighbours(
                seed in any::<u64>(),
                ops in prop::collection::vec(op(), 1..200),
            ) {
                run(seed, ops);
            }
        }
    }
}
