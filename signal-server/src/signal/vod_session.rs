//! The hub's on-demand rooms: `join_vod` checks the asset and key against the
//! library and seats the viewer in the room of that key id
//! ([`VodRoom`]); the viewer's later messages go to its room.
//!
//! Rooms are by key id, so a replaced asset's old viewers keep their own room
//! (no new viewer can join it: the library names the new key). A room is made
//! at its first join and removed when it empties; a joiner that raced the
//! removal makes a new one. Lock order: the rooms map, then a room; the
//! viewers map (peer → room, for grants) is taken alone.
//!
//! With on-demand runs metered (`--vod-budget-kbps` > 0), a joiner is
//! registered on the on-demand ledger and its welcome carries the token and
//! the bid interval; its bids go to that ledger, its grants come through its
//! room's outbox at each interval's end, and every way it leaves (its
//! socket closes, or the room drops it as slow or reported) forgets its
//! token, so runs with it get 401.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clubcast_protocol::signal::{Neighbour, PeerId, ServerMsg, SignalData, SIGNAL_VERSION};

use super::outbox::{self, Receiver};
use super::swarm::CloseCell;
use super::vod_room::{VodEffects, VodRoom};
use super::{lock, Hub, SignalError, OUTBOUND_QUEUE};

/// A viewer seated in an on-demand room, as its connection task holds it.
pub(crate) struct VodSession {
    pub(crate) peer: PeerId,
    pub(crate) room: Arc<Mutex<VodRoom>>,
    pub(crate) rx: Receiver,
    pub(crate) close: CloseCell,
}

/// At most 80 characters of a name or key from a client, for messages and logs.
fn safe(s: &str) -> String {
    s.chars().take(80).collect()
}

impl Hub {
    /// Most rooms at once: one per asset (the built-in one included) for its
    /// current upload, and as many again for replaced uploads still watched.
    fn max_vod_rooms(&self) -> usize {
        self.0
            .config
            .vod_max_assets
            .saturating_add(1)
            .saturating_mul(2)
    }

    /// Seats a viewer in the room of `asset`'s upload `key` (id form), which
    /// must be the asset's current key, and queues its welcome (with a grant
    /// token from the on-demand ledger when runs are metered).
    pub(crate) fn join_vod(&self, asset: &str, key: &str) -> Result<VodSession, SignalError> {
        let unknown = || SignalError::UnknownAsset(safe(asset), safe(key));
        let current = self.0.vod.get(asset).ok_or_else(unknown)?;
        if current.manifest().key.to_id() != key {
            return Err(unknown());
        }
        let name = current.manifest().name.clone();
        let peer = self.0.next_peer.fetch_add(1, Ordering::Relaxed);
        let token = self.0.vod_grants.as_ref().map(|g| g.register(peer));
        let (tx, rx) = outbox::outbox(OUTBOUND_QUEUE);
        let close = CloseCell::default();
        let now = Instant::now();
        let seated = loop {
            let room = match self.vod_room_for(&name, key, now) {
                Ok(room) => room,
                Err(e) => break Err(e),
            };
            let mut r = lock(&room);
            if r.is_retired() {
                continue;
            }
            let joined = r.join(peer, tx, close.clone(), now, |n| {
                self.vod_welcome(peer, &name, key, n, token)
            });
            drop(r);
            break joined.map(|fx| (room, fx));
        };
        let (room, fx) = match seated {
            Ok(v) => v,
            Err(e) => {
                self.forget_vod(peer);
                return Err(e);
            }
        };
        // Dropped before this insert (another's operation found its queue
        // full), it is taken out again when its connection ends (`leave_vod`).
        lock(&self.0.vod_viewers).insert(peer, room.clone());
        self.0.metrics.vod_join();
        tracing::debug!(peer, asset = %name, "on-demand viewer joined");
        self.settle(&room, fx);
        Ok(VodSession {
            peer,
            room,
            rx,
            close,
        })
    }

    /// The room for `key`, made if there is none (and the rooms are not at
    /// their bound).
    fn vod_room_for(
        &self,
        asset: &str,
        key: &str,
        now: Instant,
    ) -> Result<Arc<Mutex<VodRoom>>, SignalError> {
        let mut rooms = lock(&self.0.vod_rooms);
        if let Some(room) = rooms.get(key) {
            return Ok(room.clone());
        }
        let max = self.max_vod_rooms();
        if rooms.len() >= max {
            return Err(SignalError::TooManyRooms(max));
        }
        let room = Arc::new(Mutex::new(VodRoom::new(
            asset.to_owned(),
            key.to_owned(),
            self.0.config.max_peers_per_stream,
            now,
        )));
        rooms.insert(key.to_owned(), room.clone());
        Ok(room)
    }

    fn vod_welcome(
        &self,
        peer: PeerId,
        asset: &str,
        key: &str,
        neighbours: &[Neighbour],
        grant_token: Option<String>,
    ) -> String {
        let bid_interval_ms = match grant_token {
            Some(_) => self.0.config.bid_interval_ms,
            None => 0,
        };
        let msg = ServerMsg::VodWelcome {
            v: SIGNAL_VERSION,
            peer_id: peer,
            asset: asset.to_owned(),
            key: key.to_owned(),
            neighbours: neighbours.to_vec(),
            ice_servers: self.0.ice_servers.clone(),
            heartbeat_ms: self.0.config.heartbeat_ms,
            grant_token,
            bid_interval_ms,
        };
        serde_json::to_string(&msg).expect("ServerMsg is plain structs and strings")
    }

    /// Applies what a room operation left for outside its lock, and removes
    /// the room if it is empty.
    fn settle(&self, room: &Arc<Mutex<VodRoom>>, fx: VodEffects) {
        for (peer, reason) in fx.dropped {
            tracing::info!(peer, reason = reason.as_str(), "on-demand viewer dropped");
            self.0.metrics.drop_peer(reason.as_str());
            self.0.metrics.vod_left();
            self.forget_vod(peer);
        }
        if !lock(room).is_empty() {
            return;
        }
        let mut rooms = lock(&self.0.vod_rooms);
        let mut r = lock(room);
        if !r.is_empty() || r.is_retired() {
            return;
        }
        r.retire();
        if rooms.get(r.key()).is_some_and(|e| Arc::ptr_eq(e, room)) {
            rooms.remove(r.key());
        }
        tracing::debug!(asset = %r.asset(), "on-demand room emptied");
    }

    /// An on-demand viewer's connection ended.
    pub(crate) fn leave_vod(&self, session: &VodSession) {
        let (was, fx) = lock(&session.room).leave(session.peer, Instant::now());
        if was {
            self.0.metrics.vod_left();
        }
        // Also when it was dropped before: then its entry may have been put
        // back by a join that raced the drop.
        self.forget_vod(session.peer);
        self.settle(&session.room, fx);
    }

    /// Forgets a viewer that left: its room entry and its grant token.
    fn forget_vod(&self, peer: PeerId) {
        lock(&self.0.vod_viewers).remove(&peer);
        if let Some(g) = &self.0.vod_grants {
            g.unregister(peer);
        }
    }

    /// `session`'s viewer bids `bits` for its runs of the next interval;
    /// `false` (nothing recorded) when on-demand runs are not metered.
    pub(crate) fn vod_bid(&self, session: &VodSession, bits: u64) -> bool {
        let Some(g) = &self.0.vod_grants else {
            return false;
        };
        self.0.metrics.vod_bid();
        g.handle_bid(session.peer, bits);
        true
    }

    /// Ends the on-demand ledger's interval (when metered) and sends each
    /// bidder its grant through its room's outbox; a viewer whose queue is
    /// full is dropped as slow, as for any other message.
    pub(super) fn run_vod_interval(&self, now: Instant) {
        let Some(ledger) = &self.0.vod_grants else {
            return;
        };
        let interval_ms = self.0.config.bid_interval_ms;
        for g in ledger.handle_interval(now) {
            self.0.metrics.vod_grant(g.bits);
            let Some(room) = lock(&self.0.vod_viewers).get(&g.peer).cloned() else {
                continue;
            };
            let msg = ServerMsg::Grant {
                v: SIGNAL_VERSION,
                bits: g.bits,
                interval_ms,
            };
            let fx = lock(&room).send_to(g.peer, &msg, now);
            self.settle(&room, fx);
        }
    }

    /// Relays SDP/ICE from `session`'s viewer to its neighbour `to`.
    pub(crate) fn vod_relay(
        &self,
        session: &VodSession,
        to: PeerId,
        data: SignalData,
    ) -> Result<(), SignalError> {
        let fx = lock(&session.room).relay(session.peer, to, data, Instant::now())?;
        self.settle(&session.room, fx);
        Ok(())
    }

    /// `session`'s link to its neighbour `remote` failed.
    pub(crate) fn vod_link_failed(&self, session: &VodSession, remote: PeerId) {
        let fx = lock(&session.room).link_failed(session.peer, remote, Instant::now());
        self.settle(&session.room, fx);
    }

    /// `session`'s viewer reports a bad block from its neighbour `accused`.
    pub(crate) fn vod_report(&self, session: &VodSession, accused: PeerId, reason: &str) {
        self.0.metrics.report();
        let (kicked, fx) = lock(&session.room).report(session.peer, accused, Instant::now());
        tracing::warn!(
            reporter = session.peer,
            accused,
            kicked,
            reason = %safe(reason),
            "bad on-demand block reported"
        );
        self.settle(&session.room, fx);
    }

    /// Viewers in the on-demand room of key id `key` (0 if it has none).
    pub fn vod_peers(&self, key: &str) -> usize {
        let room = lock(&self.0.vod_rooms).get(key).cloned();
        room.map_or(0, |r| lock(&r).len())
    }

    /// On-demand rooms open now.
    pub fn vod_rooms(&self) -> usize {
        lock(&self.0.vod_rooms).len()
    }

    /// On-demand viewers the hub can send grants to now.
    pub fn vod_viewers(&self) -> usize {
        lock(&self.0.vod_viewers).len()
    }
}
