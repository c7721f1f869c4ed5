//! A session's WebRTC links: one [`RtcLink`] per remote peer with a role
//! (live) or per neighbour (on demand).
//!
//! A link is made when its peer first gets a role or becomes a neighbour
//! (offering iff the server says so) and closed when the core no longer
//! lists the peer. Signals for a peer
//! without a link yet (an offer that overtook its `link` message) are held,
//! at most [`MAX_PENDING_PEERS`] × [`MAX_PENDING_SIGNALS`]. A link that fails,
//! closes, or is not open after [`CONNECT_TIMEOUT_MS`] is reported; if the
//! server keeps the role, it is tried again after [`RETRY_MS`].
//!
//! Writes are paced twice: the core's send queue hands out blocks only while
//! the links' send buffers (reported with `handle_link_buffered` after every
//! send, every tick and before every core timer) are under its windows, and
//! [`RtcLink::try_send`] queues under `bufferedAmount`.
//! While an origin fetch runs, WANTs are held back ([`MAX_DEFERRED_WANTS`]):
//! the origin transfer gets the downlink first.
//!
//! A first start holds every link back ([`Links::hold`]): making a dozen
//! `RTCPeerConnection`s and their offers takes the page's main thread for
//! a while on a busy machine, and the start is on the origin anyway. Once
//! the session ends the hold, the held links are made [`LINKS_PER_TICK`] at a
//! time ([`Links::release`]), so that playback work goes on between them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use clubcast_protocol::block::{Block, StreamKey};
use clubcast_protocol::peer::{Peer, Transmit};
use clubcast_protocol::signal::{same_attempt, PeerId, SignalData};
use clubcast_protocol::wire::Frame;

use crate::rtc::{
    IceCandidate, IceServer, LinkEvent, RtcConfig, RtcError, RtcLink, SdpKind, SessionDescription,
};

/// Where a link's events go: the remote peer, the link's generation (events
/// of a replaced link are dropped by [`Links::handle_event`]), the event.
pub(crate) type OnLinkEvent = Rc<dyn Fn(PeerId, u64, LinkEvent)>;

/// Peers for which early signals are held.
pub const MAX_PENDING_PEERS: usize = 16;
/// Early signals held per peer.
pub const MAX_PENDING_SIGNALS: usize = 64;
/// A link not open this long after it was made is given up, ms.
pub const CONNECT_TIMEOUT_MS: f64 = 15_000.0;
/// Wait before reconnecting a failed link whose role the server kept, ms.
pub const RETRY_MS: f64 = 5_000.0;
/// WANTs held while an origin fetch runs; beyond it the oldest is dropped.
pub const MAX_DEFERRED_WANTS: usize = 64;
/// Held links made per tick once the hold ends.
pub const LINKS_PER_TICK: usize = 3;

struct Slot {
    link: RtcLink,
    gen: u64,
    /// The connection attempt its signals carry: its own `gen` as the
    /// offerer, the offer's as the answerer (`None` until the offer, or from
    /// a remote that sends none); see [`SignalData`].
    conn: Option<u64>,
    offerer: bool,
    created: f64,
    open: bool,
}

/// What a link event means for the session.
pub(crate) enum Outcome {
    None,
    Send(SignalData),
    Open,
    Message(Vec<u8>),
    Buffered(usize),
    Failed(String),
}

pub(crate) struct Links {
    on_event: OnLinkEvent,
    config: RtcConfig,
    slots: BTreeMap<PeerId, Slot>,
    /// Closed links, dropped on the next tick rather than inside their own callback.
    closing: Vec<RtcLink>,
    pending: BTreeMap<PeerId, Vec<SignalData>>,
    offers: BTreeMap<PeerId, bool>,
    retry_at: BTreeMap<PeerId, f64>,
    deferred: VecDeque<Transmit>,
    next_gen: u64,
    /// Links are not made while this holds.
    holding: bool,
    /// Peers whose link was asked for during the hold (offer flag in `offers`).
    held: BTreeSet<PeerId>,
    /// Data channel messages handed to links: blocks, and everything else.
    sent_blocks: u64,
    sent_control: u64,
    /// Data channel messages that arrived.
    received: u64,
}

impl Links {
    pub(crate) fn new(on_event: OnLinkEvent, ice_servers: Vec<IceServer>) -> Self {
        Links {
            on_event,
            config: RtcConfig { ice_servers },
            slots: BTreeMap::new(),
            closing: Vec::new(),
            pending: BTreeMap::new(),
            offers: BTreeMap::new(),
            retry_at: BTreeMap::new(),
            deferred: VecDeque::new(),
            next_gen: 0,
            holding: false,
            held: BTreeSet::new(),
            sent_blocks: 0,
            sent_control: 0,
            received: 0,
        }
    }

    /// Messages sent (blocks, other frames) and received, since the start.
    pub(crate) fn messages(&self) -> (u64, u64, u64) {
        (self.sent_blocks, self.sent_control, self.received)
    }

    /// Holds back every link asked for from now on, until [`Links::release`].
    pub(crate) fn hold(&mut self) {
        self.holding = true;
    }

    /// Whether links are held back, or some held ones are still to be made.
    pub(crate) fn holding(&self) -> bool {
        self.holding || !self.held.is_empty()
    }

    /// Ends the hold: makes up to [`LINKS_PER_TICK`] of the held links whose
    /// peer is still `listed` (call it again on the next tick for the rest).
    pub(crate) fn release(&mut self, listed: &[PeerId], now: f64) {
        self.holding = false;
        self.held.retain(|p| listed.contains(p));
        for _ in 0..LINKS_PER_TICK {
            let Some(peer) = self.held.pop_first() else {
                break;
            };
            let offer = self.offers.get(&peer).copied().unwrap_or(true);
            self.ensure(peer, offer, now);
        }
    }

    pub(crate) fn set_ice_servers(&mut self, ice_servers: Vec<IceServer>) {
        self.config.ice_servers = ice_servers;
    }

    pub(crate) fn open_count(&self) -> usize {
        self.slots.values().filter(|s| s.open).count()
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Makes the link to `peer` unless one exists.
    pub(crate) fn ensure(&mut self, peer: PeerId, offer: bool, now: f64) {
        self.offers.insert(peer, offer);
        if self.holding {
            self.held.insert(peer);
            return;
        }
        if self.slots.contains_key(&peer) {
            return;
        }
        self.retry_at.remove(&peer);
        if !self.make(peer, offer, now) {
            return;
        }
        for data in self.pending.remove(&peer).unwrap_or_default() {
            self.apply_signal(peer, data, now);
        }
    }

    /// Makes a new link to `peer` in its slot (replacing any); false if the
    /// browser refused, and then a retry is due.
    fn make(&mut self, peer: PeerId, offer: bool, now: f64) -> bool {
        let gen = self.next_gen;
        self.next_gen += 1;
        let sink = Rc::clone(&self.on_event);
        let on_event = move |event| sink(peer, gen, event);
        let link = if offer {
            RtcLink::offerer(&self.config, on_event)
        } else {
            RtcLink::answerer(&self.config, on_event)
        };
        let link = match link {
            Ok(l) => l,
            Err(e) => {
                web_sys::console::warn_1(&format!("clubcast: link to {peer}: {e}").into());
                self.retry_at.insert(peer, now + RETRY_MS);
                return false;
            }
        };
        let old = self.slots.insert(
            peer,
            Slot {
                link,
                gen,
                conn: offer.then_some(gen),
                offerer: offer,
                created: now,
                open: false,
            },
        );
        if let Some(old) = old {
            old.link.close();
            self.closing.push(old.link);
        }
        true
    }

    /// SDP or ICE from `from`; `listed` says whether the core knows the peer.
    /// Returns true when a new offer replaced an open link (the core should
    /// hear that the old one closed).
    pub(crate) fn handle_signal(
        &mut self,
        from: PeerId,
        data: SignalData,
        listed: bool,
        now: f64,
    ) -> bool {
        if self.slots.contains_key(&from) {
            return self.apply_signal(from, data, now);
        }
        if !listed && !self.pending.contains_key(&from) && self.pending.len() >= MAX_PENDING_PEERS {
            return false;
        }
        let held = self.pending.entry(from).or_default();
        if held.len() < MAX_PENDING_SIGNALS {
            held.push(data);
        }
        false
    }

    /// Applies a signal to the link to `peer`; true when a new offer replaced
    /// an open link.
    fn apply_signal(&mut self, peer: PeerId, data: SignalData, now: f64) -> bool {
        let Some(slot) = self.slots.get_mut(&peer) else {
            return false;
        };
        let mut replaced_open = false;
        if let SignalData::Offer { conn: Some(c), .. } = data {
            if !slot.offerer && slot.conn.is_some_and(|k| k != c) {
                // The remote started over: the new offer wins, on a new link.
                replaced_open = slot.open;
                if !self.make(peer, false, now) {
                    if let Some(old) = self.slots.remove(&peer) {
                        old.link.close();
                        self.closing.push(old.link);
                    }
                    return replaced_open;
                }
            }
        }
        let Some(slot) = self.slots.get_mut(&peer) else {
            return replaced_open;
        };
        if matches!(data, SignalData::Offer { .. }) && !slot.offerer && slot.conn.is_none() {
            slot.conn = data.conn();
        }
        if !same_attempt(data.conn(), slot.conn) {
            // Meant for a connection attempt given up since.
            return replaced_open;
        }
        match data {
            SignalData::Offer { sdp, .. } => {
                slot.link.handle_remote_description(SessionDescription {
                    kind: SdpKind::Offer,
                    sdp,
                })
            }
            SignalData::Answer { sdp, .. } => {
                slot.link.handle_remote_description(SessionDescription {
                    kind: SdpKind::Answer,
                    sdp,
                })
            }
            SignalData::Candidate {
                candidate,
                sdp_mid,
                sdp_mline_index,
                ..
            } => {
                if candidate.is_empty() {
                    return replaced_open;
                }
                let r = slot.link.handle_remote_candidate(IceCandidate {
                    candidate,
                    sdp_mid,
                    sdp_m_line_index: sdp_mline_index,
                });
                if let Err(e) = r {
                    web_sys::console::warn_1(
                        &format!("clubcast: candidate from {peer}: {e}").into(),
                    );
                }
            }
        }
        replaced_open
    }

    /// Interprets a link event; a failure removes the link.
    pub(crate) fn handle_event(
        &mut self,
        peer: PeerId,
        gen: u64,
        event: LinkEvent,
        now: f64,
    ) -> Outcome {
        let Some(slot) = self.slots.get_mut(&peer).filter(|s| s.gen == gen) else {
            return Outcome::None;
        };
        match event {
            LinkEvent::LocalDescription(d) => Outcome::Send(match d.kind {
                SdpKind::Offer => SignalData::Offer {
                    sdp: d.sdp,
                    conn: slot.conn,
                },
                SdpKind::Answer => SignalData::Answer {
                    sdp: d.sdp,
                    conn: slot.conn,
                },
            }),
            LinkEvent::LocalCandidate(c) => Outcome::Send(SignalData::Candidate {
                conn: slot.conn,
                candidate: c.candidate,
                sdp_mid: c.sdp_mid,
                sdp_mline_index: c.sdp_m_line_index,
            }),
            LinkEvent::Open => {
                slot.open = true;
                Outcome::Open
            }
            LinkEvent::Message(bytes) => {
                self.received += 1;
                Outcome::Message(bytes)
            }
            LinkEvent::Writable => Outcome::Buffered(buffered(&slot.link)),
            LinkEvent::State(crate::rtc::ConnectionState::Failed) => {
                self.fail(peer, now, "connection failed".into())
            }
            LinkEvent::Closed => self.fail(peer, now, "data channel closed".into()),
            // A candidate the browser cannot use is not fatal; negotiation is.
            LinkEvent::Error(RtcError::Js {
                op: "addIceCandidate",
                ..
            }) => Outcome::None,
            LinkEvent::Error(e) => self.fail(peer, now, e.to_string()),
            _ => Outcome::None,
        }
    }

    fn fail(&mut self, peer: PeerId, now: f64, reason: String) -> Outcome {
        if let Some(slot) = self.slots.remove(&peer) {
            slot.link.close();
            self.closing.push(slot.link);
        }
        self.retry_at.insert(peer, now + RETRY_MS);
        Outcome::Failed(reason)
    }

    /// Closes the link to `peer` (its roles are gone); no retry.
    pub(crate) fn close(&mut self, peer: PeerId) {
        if let Some(slot) = self.slots.remove(&peer) {
            slot.link.close();
            self.closing.push(slot.link);
        }
        self.pending.remove(&peer);
        self.retry_at.remove(&peer);
        self.offers.remove(&peer);
        self.held.remove(&peer);
    }

    pub(crate) fn close_all(&mut self) {
        self.reset();
        self.closing.clear();
    }

    /// Closes every link and forgets every peer: after a rejoin the server
    /// knows this browser by a new id, and the old links' remotes dropped it.
    pub(crate) fn reset(&mut self) {
        for (_, slot) in std::mem::take(&mut self.slots) {
            slot.link.close();
            self.closing.push(slot.link);
        }
        self.pending.clear();
        self.offers.clear();
        self.retry_at.clear();
        self.deferred.clear();
        self.holding = false;
        self.held.clear();
    }

    /// Drops links closed since the last tick.
    pub(crate) fn reap(&mut self) {
        self.closing.clear();
    }

    /// Sends one of the core's frames (or defers a WANT while the origin is busy).
    pub(crate) fn transmit(
        &mut self,
        core: &mut Peer<StreamKey>,
        t: Transmit,
        corrupt: bool,
        origin_busy: bool,
    ) {
        if origin_busy && matches!(t.frame, Frame::Want(_)) {
            if self.deferred.len() >= MAX_DEFERRED_WANTS {
                self.deferred.pop_front();
            }
            self.deferred.push_back(t);
            return;
        }
        let Some(slot) = self.slots.get(&t.to) else {
            return;
        };
        if matches!(t.frame, Frame::Block(_)) {
            self.sent_blocks += 1;
        } else {
            self.sent_control += 1;
        }
        let bytes = match t.frame {
            Frame::Block(b) if corrupt => Frame::Block(corrupted(b)).encode(),
            frame => frame.encode(),
        };
        // `Full` and `Closed` drop the frame: the core re-pulls what matters.
        let _ = slot.link.try_send(bytes.to_vec());
        core.handle_link_buffered(t.to, buffered(&slot.link));
    }

    /// Sends the WANTs held back while the origin was busy.
    pub(crate) fn flush_deferred(&mut self, core: &mut Peer<StreamKey>, corrupt: bool) {
        for t in std::mem::take(&mut self.deferred) {
            self.transmit(core, t, corrupt, false);
        }
    }

    /// Reports every open link's send-buffer level to the core, which may then
    /// hand out queued pushes.
    pub(crate) fn report_buffered(&self, core: &mut Peer<StreamKey>) {
        for (&peer, slot) in &self.slots {
            if slot.open {
                core.handle_link_buffered(peer, buffered(&slot.link));
            }
        }
    }

    /// Reports send-buffer levels and gives up links that never opened.
    pub(crate) fn tick(&mut self, core: &mut Peer<StreamKey>, now: f64) -> Vec<(PeerId, String)> {
        self.report_buffered(core);
        self.give_up_late(now)
    }

    /// Sends `bytes` on the open link to `peer` (on-demand frames); a full
    /// or closed channel drops them, and the remote asks again.
    pub(crate) fn send(&mut self, peer: PeerId, bytes: Vec<u8>, block: bool) {
        let Some(slot) = self.slots.get(&peer).filter(|s| s.open) else {
            return;
        };
        if block {
            self.sent_blocks += 1;
        } else {
            self.sent_control += 1;
        }
        let _ = slot.link.try_send(bytes);
    }

    /// Gives up links that are not open [`CONNECT_TIMEOUT_MS`] after they
    /// were made: the peers and why.
    pub(crate) fn give_up_late(&mut self, now: f64) -> Vec<(PeerId, String)> {
        let late: Vec<PeerId> = self
            .slots
            .iter()
            .filter(|(_, slot)| !slot.open && now - slot.created > CONNECT_TIMEOUT_MS)
            .map(|(&peer, _)| peer)
            .collect();
        late.into_iter()
            .map(|peer| {
                self.fail(peer, now, "not connected in time".into());
                (peer, "not connected in time".to_owned())
            })
            .collect()
    }

    /// Failed links whose peer is still listed and whose wait is over.
    pub(crate) fn due_retries(&mut self, listed: &[PeerId], now: f64) -> Vec<(PeerId, bool)> {
        self.retry_at.retain(|p, _| listed.contains(p));
        let due: Vec<PeerId> = self
            .retry_at
            .iter()
            .filter(|(_, at)| now >= **at)
            .map(|(p, _)| *p)
            .collect();
        due.into_iter()
            .map(|p| {
                self.retry_at.remove(&p);
                (p, self.offers.get(&p).copied().unwrap_or(true))
            })
            .collect()
    }
}

fn buffered(link: &RtcLink) -> usize {
    link.buffered_amount() as usize + link.queued_bytes()
}

/// Test only: the block with one payload byte flipped, so that it no longer
/// verifies at the receiver.
pub(crate) fn corrupted(mut b: Block) -> Block {
    let mut payload = b.payload.to_vec();
    match payload.first_mut() {
        Some(x) => *x ^= 0xff,
        None => b.signature[0] ^= 0xff,
    }
    b.payload = payload.into();
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> Links {
        Links::new(Rc::new(|_, _, _| {}), Vec::new())
    }

    #[test]
    fn a_hold_keeps_links_back_and_forgets_closed_peers() {
        let mut l = links();
        l.hold();
        l.ensure(1, true, 0.0);
        l.ensure(2, false, 0.0);
        l.ensure(3, true, 0.0);
        assert_eq!(l.len(), 0, "no link is made during the hold");
        assert!(l.holding());
        assert_eq!(l.offers.get(&2), Some(&false), "the offer flag is kept");
        l.close(3);
        assert!(!l.held.contains(&3), "a closed role is not made later");
        // Released with none of them listed any more: nothing is made, and
        // nothing is held.
        l.release(&[], 0.0);
        assert_eq!(l.len(), 0);
        assert!(!l.holding());
    }

    #[test]
    fn a_rejoin_drops_the_hold() {
        let mut l = links();
        l.hold();
        l.ensure(1, true, 0.0);
        l.reset();
        assert!(!l.holding());
        assert!(l.held.is_empty());
    }
}
