//! The swarm side of an on-demand session: the signaling socket that finds
//! neighbours watching the same upload, their WebRTC links, and the frames
//! between those links and the session's [`VodSwarm`] core.
//!
//! Nothing here can stop playback: the origin over HTTP is always there. A
//! socket that closes is reopened after [`RECONNECT_MS`], doubling up to
//! [`MAX_RECONNECT_MS`]; a server that does not know the upload
//! (`unknown_asset`: it was replaced or deleted) ends the swarm side for the
//! session, with a `p2p_error` event. A neighbour that sends a frame that
//! does not parse, or a block that does not verify, is closed and reported
//! to the server, which replaces it.
//!
//! Bids (invention 2): when the welcome carries a grant token, the origin
//! meters this viewer's runs. Every bid interval the session bids what its
//! core wants from the origin ([`VodSwarm::bid`]), each `grant` goes to the
//! core ([`VodSwarm::grant`]), and runs carry the token
//! ([`P2p::grant_token`]). Without a token (no socket yet, a server that
//! does not meter, `p2p: false`) runs go without one, on the origin's
//! anonymous budget.

use std::collections::BTreeSet;
use std::rc::{Rc, Weak};
use std::time::Duration;

use bytes::Bytes;
use clubcast_protocol::block::StreamKey;
use clubcast_protocol::signal::{ClientMsg, ErrorCode, LinkOp, PeerId, ServerMsg, SIGNAL_VERSION};
use clubcast_protocol::vod::swarm::VodSwarm;
use clubcast_protocol::wire::Frame;
use serde_json::json;

use super::session::{Input, VodSession};
use crate::links::{Links, Outcome};
use crate::player::{deliver, Hub};
use crate::rtc::{IceServer, LinkEvent};
use crate::timer::Timer;
use crate::ws::{signal_url, SignalSocket, WsEvent};

/// First wait before reopening a closed signaling socket, ms.
pub const RECONNECT_MS: u64 = 500;
/// Longest wait between reopening attempts, ms.
pub const MAX_RECONNECT_MS: u64 = 16_000;
/// After the server names a neighbour, HTTP keeps to the near zone this
/// long while the link is made ([`VodSwarm::expect_peers`]), ms: links
/// open in about a second here.
pub const LINK_GRACE_MS: f64 = 5_000.0;

/// The swarm side of one `VodPlayer`.
pub(crate) struct P2p {
    weak: Weak<Hub<VodSession>>,
    url: String,
    asset: String,
    key_id: String,
    socket: Option<SignalSocket>,
    /// Our id, from the welcome (a reconnect gets a new one).
    peer_id: Option<PeerId>,
    links: Links,
    /// The neighbours the server listed (a link may not be open yet).
    neighbours: BTreeSet<PeerId>,
    /// ICE servers from the options; empty: the welcome's.
    own_ice: bool,
    heartbeat_ms: u32,
    heartbeat_timer: Timer,
    /// The welcome's grant token, while the socket that got it is open.
    grant_token: Option<String>,
    bid_interval_ms: u32,
    bid_timer: Timer,
    bids_sent: u64,
    reconnect_timer: Timer,
    /// Reopening attempts in a row (reset by a welcome).
    reconnects: u32,
    /// Why the swarm side ended, if it did.
    ended: Option<String>,
    bad_frames: u64,
}

impl P2p {
    /// Opens the signaling socket to `server` for `asset`'s upload `key`.
    pub(crate) fn start(
        weak: Weak<Hub<VodSession>>,
        server: &str,
        asset: &str,
        key: &StreamKey,
        ice_servers: Vec<IceServer>,
    ) -> P2p {
        let own_ice = !ice_servers.is_empty();
        let to_links = weak.clone();
        let mut p = P2p {
            weak,
            url: signal_url(server),
            asset: asset.to_owned(),
            key_id: key.to_id(),
            socket: None,
            peer_id: None,
            links: Links::new(
                Rc::new(move |peer, gen, event| {
                    deliver(&to_links, Input::Link { peer, gen, event })
                }),
                ice_servers,
            ),
            neighbours: BTreeSet::new(),
            own_ice,
            heartbeat_ms: 0,
            heartbeat_timer: Timer::new(),
            grant_token: None,
            bid_interval_ms: 0,
            bid_timer: Timer::new(),
            bids_sent: 0,
            reconnect_timer: Timer::new(),
            reconnects: 0,
            ended: None,
            bad_frames: 0,
        };
        p.connect();
        p
    }

    fn emit(&self, event: serde_json::Value) {
        if let Some(hub) = self.weak.upgrade() {
            hub.emit(event);
        }
    }

    fn connect(&mut self) {
        let weak = self.weak.clone();
        match SignalSocket::connect(&self.url, move |e| deliver(&weak, Input::Ws(e))) {
            Ok(s) => self.socket = Some(s),
            Err(e) => {
                web_sys::console::warn_1(&format!("clubcast: signaling: {e}").into());
                self.schedule_reconnect();
            }
        }
    }

    fn send(&self, msg: &ClientMsg) {
        if let Some(s) = &self.socket {
            if let Err(e) = s.send_json(msg) {
                web_sys::console::warn_1(&format!("clubcast: signaling send: {e}").into());
            }
        }
    }

    /// Ends the swarm side for good (the origin goes on).
    fn end(&mut self, code: &str, message: String, core: &mut VodSwarm<StreamKey>) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some(code.to_owned());
        self.forget_all(core);
        self.heartbeat_timer.cancel();
        self.bid_timer.cancel();
        self.reconnect_timer.cancel();
        if let Some(s) = self.socket.take() {
            s.close("done");
        }
        web_sys::console::warn_1(&format!("clubcast: swarm off: {message}").into());
        self.emit(json!({"type": "p2p_error", "code": code, "message": message}));
    }

    /// Closes every link and forgets every neighbour (a new socket means a
    /// new id, and the old neighbours dropped us).
    fn forget_all(&mut self, core: &mut VodSwarm<StreamKey>) {
        for peer in std::mem::take(&mut self.neighbours) {
            core.remove_peer(peer);
        }
        self.links.reset();
        self.peer_id = None;
        // The server forgot the token with the connection.
        self.grant_token = None;
        self.bid_timer.cancel();
    }

    fn schedule_reconnect(&mut self) {
        if self.ended.is_some() {
            return;
        }
        let delay = (RECONNECT_MS << self.reconnects.min(8)).min(MAX_RECONNECT_MS);
        self.reconnects += 1;
        let weak = self.weak.clone();
        let _ = self
            .reconnect_timer
            .set(Duration::from_millis(delay), move || {
                deliver(&weak, Input::Reconnect)
            });
    }

    /// The reconnect timer fired.
    pub(crate) fn on_reconnect(&mut self) {
        if self.ended.is_none() && self.socket.is_none() {
            self.connect();
        }
    }

    fn arm_heartbeat(&mut self) {
        if self.heartbeat_ms == 0 {
            return;
        }
        let weak = self.weak.clone();
        let _ = self.heartbeat_timer.set(
            Duration::from_millis(u64::from(self.heartbeat_ms)),
            move || deliver(&weak, Input::Heartbeat),
        );
    }

    fn arm_bid(&mut self) {
        if self.bid_interval_ms == 0 || self.grant_token.is_none() {
            return;
        }
        let weak = self.weak.clone();
        let _ = self.bid_timer.set(
            Duration::from_millis(u64::from(self.bid_interval_ms)),
            move || deliver(&weak, Input::Bid),
        );
    }

    /// The bid timer fired: bids what the core wants from the origin over
    /// the next interval.
    pub(crate) fn on_bid(&mut self, core: &VodSwarm<StreamKey>) {
        if self.socket.is_some() && self.grant_token.is_some() {
            self.send(&ClientMsg::Bid {
                v: SIGNAL_VERSION,
                bits: core.bid(self.bid_interval_ms),
                late: 0,
                up: 0,
            });
            self.bids_sent += 1;
            self.arm_bid();
        }
    }

    /// The token to send as `Authorization: Bearer` on origin runs, if the
    /// origin meters them.
    pub(crate) fn grant_token(&self) -> Option<&str> {
        self.grant_token.as_deref()
    }

    /// The bid interval, ms (0 without a grant token).
    pub(crate) fn bid_interval_ms(&self) -> u32 {
        if self.grant_token.is_some() {
            self.bid_interval_ms
        } else {
            0
        }
    }

    /// The origin does not know the token (401): runs go without one until
    /// the next welcome.
    pub(crate) fn forget_token(&mut self) {
        self.grant_token = None;
        self.bid_timer.cancel();
    }

    /// The heartbeat timer fired.
    pub(crate) fn on_heartbeat(&mut self) {
        if self.socket.is_some() && self.peer_id.is_some() {
            self.send(&ClientMsg::Heartbeat { v: SIGNAL_VERSION });
            self.arm_heartbeat();
        }
    }

    /// A signaling socket event.
    pub(crate) fn on_ws(&mut self, e: WsEvent, core: &mut VodSwarm<StreamKey>, now: f64) {
        if self.ended.is_some() {
            return;
        }
        match e {
            WsEvent::Open => self.send(&ClientMsg::JoinVod {
                v: SIGNAL_VERSION,
                asset: self.asset.clone(),
                key: self.key_id.clone(),
            }),
            WsEvent::Message(text) => match serde_json::from_str::<ServerMsg>(&text) {
                Ok(msg) => self.on_server(msg, core, now),
                Err(e) => {
                    web_sys::console::warn_1(&format!("clubcast: bad server message: {e}").into())
                }
            },
            WsEvent::Rejected(e) => {
                web_sys::console::warn_1(&format!("clubcast: signaling: {e}").into());
            }
            WsEvent::Closed { code, reason, .. } => {
                self.socket = None;
                self.heartbeat_timer.cancel();
                self.forget_all(core);
                if reason == ErrorCode::UnknownAsset.as_str() {
                    let msg = format!("the server has no upload {} of {}", self.key_id, self.asset);
                    return self.end("unknown_asset", msg, core);
                }
                web_sys::console::info_1(
                    &format!("clubcast: signaling closed ({code} {reason}); reconnecting").into(),
                );
                self.schedule_reconnect();
            }
        }
    }

    fn on_server(&mut self, msg: ServerMsg, core: &mut VodSwarm<StreamKey>, now: f64) {
        match msg {
            ServerMsg::VodWelcome {
                peer_id,
                neighbours,
                ice_servers,
                heartbeat_ms,
                grant_token,
                bid_interval_ms,
                ..
            } => {
                self.peer_id = Some(peer_id);
                self.reconnects = 0;
                self.heartbeat_ms = heartbeat_ms;
                self.arm_heartbeat();
                if grant_token.is_some() {
                    // A run refused on the anonymous share may go again, metered.
                    core.clear_refusal();
                }
                self.grant_token = grant_token;
                self.bid_interval_ms = bid_interval_ms;
                // The first bid at once: a joiner's first grant is then an
                // interval away at most.
                self.on_bid(core);
                if !self.own_ice {
                    self.links
                        .set_ice_servers(ice_servers.into_iter().map(IceServer::from).collect());
                }
                self.emit(json!({
                    "type": "p2p_joined", "peer_id": peer_id, "neighbours": neighbours.len(),
                }));
                for n in neighbours {
                    self.neighbours.insert(n.peer);
                    self.links.ensure(n.peer, n.offer, now);
                    core.expect_peers((now + LINK_GRACE_MS) as u64);
                }
            }
            ServerMsg::Neighbour { op, neighbour, .. } => match op {
                LinkOp::Add => {
                    self.neighbours.insert(neighbour.peer);
                    self.links.ensure(neighbour.peer, neighbour.offer, now);
                    core.expect_peers((now + LINK_GRACE_MS) as u64);
                }
                LinkOp::Remove => {
                    self.neighbours.remove(&neighbour.peer);
                    self.links.close(neighbour.peer);
                    core.remove_peer(neighbour.peer);
                }
            },
            ServerMsg::Signal { from, data, .. } => {
                let listed = self.neighbours.contains(&from);
                if self.links.handle_signal(from, data, listed, now) {
                    // A new offer replaced an open link: the core hears of
                    // the new one when it opens.
                    core.remove_peer(from);
                }
            }
            ServerMsg::Grant { bits, .. } => core.grant(bits),
            ServerMsg::Error { code, message, .. } => {
                if code == ErrorCode::UnknownAsset {
                    return self.end(code.as_str(), message, core);
                }
                web_sys::console::warn_1(
                    &format!("clubcast: signaling error {}: {message}", code.as_str()).into(),
                );
            }
            // Pongs keep the socket alive; live-stream messages do not come
            // to an on-demand join.
            _ => {}
        }
    }

    /// An event of the link to `peer`.
    pub(crate) fn on_link(
        &mut self,
        peer: PeerId,
        gen: u64,
        event: LinkEvent,
        core: &mut VodSwarm<StreamKey>,
        now: f64,
    ) {
        match self.links.handle_event(peer, gen, event, now) {
            Outcome::Send(data) => self.send(&ClientMsg::Signal {
                v: SIGNAL_VERSION,
                to: peer,
                data,
            }),
            Outcome::Open => {
                if !core.add_peer(peer, now as u64) {
                    // Over the core's neighbour cap: not used, and not kept open.
                    self.links.close(peer);
                }
            }
            Outcome::Message(bytes) => match Frame::decode(Bytes::from(bytes)) {
                Ok(frame) => core.handle_frame(peer, frame, now as u64),
                Err(e) => {
                    self.bad_frames += 1;
                    core.remove_peer(peer);
                    self.drop_peer(peer, format!("malformed frame: {e}"));
                }
            },
            Outcome::Failed(reason) => {
                core.remove_peer(peer);
                web_sys::console::info_1(&format!("clubcast: link to {peer}: {reason}").into());
                self.send(&ClientMsg::LinkFailed {
                    v: SIGNAL_VERSION,
                    peer,
                });
            }
            Outcome::Buffered(_) | Outcome::None => {}
        }
    }

    /// Sends a frame of the core to `peer`.
    pub(crate) fn send_frame(&mut self, peer: PeerId, frame: &Frame) {
        let block = matches!(frame, Frame::Block(_));
        self.links.send(peer, frame.encode().to_vec(), block);
    }

    /// Closes the link to a neighbour that misbehaved (the core has
    /// forgotten it) and reports it, so that the server replaces it.
    pub(crate) fn drop_peer(&mut self, peer: PeerId, reason: String) {
        self.links.close(peer);
        self.emit(json!({"type": "peer_dropped", "peer": peer, "reason": reason}));
        self.send(&ClientMsg::Report {
            v: SIGNAL_VERSION,
            peer,
            reason,
        });
        self.send(&ClientMsg::LinkFailed {
            v: SIGNAL_VERSION,
            peer,
        });
    }

    /// Housekeeping: drops closed links, gives up links that never opened,
    /// and remakes failed links to listed neighbours once their wait is over.
    pub(crate) fn tick(&mut self, core: &mut VodSwarm<StreamKey>, now: f64) {
        self.links.reap();
        for (peer, reason) in self.links.give_up_late(now) {
            core.remove_peer(peer);
            web_sys::console::info_1(&format!("clubcast: link to {peer}: {reason}").into());
            self.send(&ClientMsg::LinkFailed {
                v: SIGNAL_VERSION,
                peer,
            });
        }
        let listed: Vec<PeerId> = self.neighbours.iter().copied().collect();
        for (peer, offer) in self.links.due_retries(&listed, now) {
            self.links.ensure(peer, offer, now);
        }
    }

    /// Closes the socket and every link.
    pub(crate) fn close(&mut self) {
        self.ended.get_or_insert_with(|| "closed".to_owned());
        self.heartbeat_timer.cancel();
        self.bid_timer.cancel();
        self.reconnect_timer.cancel();
        self.links.close_all();
        self.neighbours.clear();
        if let Some(s) = self.socket.take() {
            s.close("done");
        }
    }

    /// Stats fields of the swarm side.
    pub(crate) fn stats(&self) -> serde_json::Value {
        let (sent_blocks, sent_control, received) = self.links.messages();
        json!({
            "peer_id": self.peer_id,
            "neighbours": self.neighbours.len(),
            "links": self.links.len(),
            "links_open": self.links.open_count(),
            "messages_sent_blocks": sent_blocks,
            "messages_sent_control": sent_control,
            "messages_received": received,
            "bad_frames": self.bad_frames,
            "metered": self.grant_token.is_some(),
            "bids_sent": self.bids_sent,
            "p2p_ended": self.ended,
        })
    }
}

impl Drop for P2p {
    fn drop(&mut self) {
        self.close();
    }
}
