//! The hub's on-demand rooms: `join_vod` checks the asset and key against the
//! library and seats the viewer in the room of that key id
//! ([`VodRoom`]); the viewer's later messages go to its room.
//!
//! Rooms are by key id, so a replaced asset's old viewers keep their own room
//! (no new viewer can join it: the library names the new key). A room is made
//! at its first join and removed when it empties; a joiner that raced the
//! removal makes a new one. Lock order: the rooms map, then a room.

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
    /// must be the asset's current key, and queues its welcome.
    pub(crate) fn join_vod(&self, asset: &str, key: &str) -> Result<VodSession, SignalError> {
        let unknown = || SignalError::UnknownAsset(safe(asset), safe(key));
        let current = self.0.vod.get(asset).ok_or_else(unknown)?;
        if current.manifest().key.to_id() != key {
            return Err(unknown());
        }
        let name = current.manifest().name.clone();
        let peer = self.0.next_peer.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = outbox::outbox(OUTBOUND_QUEUE);
        let close = CloseCell::default();
        let now = Instant::now();
        let (room, fx) = loop {
            let room = self.vod_room_for(&name, key, now)?;
            let mut r = lock(&room);
            if r.is_retired() {
                continue;
            }
            let fx = r.join(peer, tx, close.clone(), now, |n| {
                self.vod_welcome(peer, &name, key, n)
            })?;
            drop(r);
            break (room, fx);
        };
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
    ) -> String {
        let msg = ServerMsg::VodWelcome {
            v: SIGNAL_VERSION,
            peer_id: peer,
            asset: asset.to_owned(),
            key: key.to_owned(),
            neighbours: neighbours.to_vec(),
            ice_servers: self.0.ice_servers.clone(),
            heartbeat_ms: self.0.config.heartbeat_ms,
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
        self.settle(&session.room, fx);
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
}
