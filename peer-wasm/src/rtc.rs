//! One WebRTC link: an `RTCPeerConnection` carrying exactly one ordered binary
//! data channel labelled [`LABEL`].
//!
//! Flow, driven by the signaling messages the driver relays:
//! - offerer: [`RtcLink::offerer`] creates the channel and the offer, and emits
//!   [`LinkEvent::LocalDescription`]; the driver sends it to the remote peer and
//!   feeds the answer back through [`RtcLink::handle_remote_description`].
//! - answerer: [`RtcLink::answerer`] waits; the offer goes into
//!   [`RtcLink::handle_remote_description`], which emits the answer as a
//!   [`LinkEvent::LocalDescription`]. The channel arrives through `ondatachannel`.
//! - both: local ICE candidates are emitted as [`LinkEvent::LocalCandidate`]
//!   (trickle), remote ones go into [`RtcLink::handle_remote_candidate`]; those
//!   arriving before the remote description are held (at most
//!   [`MAX_PENDING_CANDIDATES`]).
//!
//! Writes are paced: [`RtcLink::try_send`] hands a message to the channel while
//! its `bufferedAmount` stays under [`MAX_BUFFERED_AMOUNT`], and queues it
//! otherwise. The queue is drained on `bufferedamountlow` and is bounded by
//! [`MAX_QUEUED_MESSAGES`] and [`MAX_QUEUED_BYTES`]; past that `try_send`
//! returns [`RtcError::Full`] and the caller drops or defers the message.
//! [`LinkEvent::Writable`] tells it when space is back.
//!
//! Every JS callback is a `Closure` owned by the link (the channel's in the
//! shared state, which the closures reach only through a `Weak`), so dropping
//! the link detaches the handlers, closes the connection and frees them all.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};

use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{spawn_local, JsFuture};
use web_sys::{
    Event, MessageEvent, RtcConfiguration, RtcDataChannel, RtcDataChannelEvent, RtcDataChannelInit,
    RtcDataChannelState, RtcDataChannelType, RtcIceCandidateInit, RtcIceServer, RtcPeerConnection,
    RtcPeerConnectionIceEvent, RtcPeerConnectionState, RtcSdpType, RtcSessionDescriptionInit,
};

use crate::error::JsError;

/// The label of the one data channel per link; a channel with another label is refused.
pub const LABEL: &str = "clubcast";
/// Largest message accepted by [`RtcLink::try_send`]. A block of up to 60 KiB plus its
/// header fits; 64 KiB is the size every browser's SCTP stack delivers intact.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// Messages are handed to the channel only while its `bufferedAmount` is below this.
pub const MAX_BUFFERED_AMOUNT: u32 = 1024 * 1024;
/// `bufferedAmountLowThreshold`: when the channel drains below it, the queue is flushed.
pub const BUFFERED_AMOUNT_LOW: u32 = 256 * 1024;
/// Most messages waiting in the link's own queue.
pub const MAX_QUEUED_MESSAGES: usize = 256;
/// Most bytes waiting in the link's own queue.
pub const MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;
/// Most remote candidates held while the remote description is not yet set.
pub const MAX_PENDING_CANDIDATES: usize = 64;

/// Errors of the WebRTC glue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RtcError {
    /// A browser call failed; `op` names it.
    #[error("{op}: {source}")]
    Js {
        /// The browser call that failed.
        op: &'static str,
        /// What it threw.
        source: JsError,
    },
    /// The send queue is at [`MAX_QUEUED_MESSAGES`] or [`MAX_QUEUED_BYTES`].
    #[error("send queue full")]
    Full,
    /// The message is larger than [`MAX_MESSAGE_SIZE`].
    #[error("message of {len} bytes exceeds {max}")]
    TooLarge {
        /// Size of the refused message.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The data channel or connection is closing or closed.
    #[error("link closed")]
    Closed,
    /// More than [`MAX_PENDING_CANDIDATES`] remote candidates arrived before the remote description.
    #[error("too many early remote candidates")]
    TooManyCandidates,
    /// The remote description is neither an offer nor an answer, or came in the wrong role.
    #[error("unexpected remote description: {0}")]
    UnexpectedDescription(String),
}

impl RtcError {
    fn js(op: &'static str) -> impl FnOnce(JsValue) -> RtcError {
        move |value| RtcError::Js {
            op,
            source: JsError::from(value),
        }
    }
}

/// An ICE server (STUN or TURN).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// `stun:` or `turn:` URLs.
    pub urls: Vec<String>,
    /// TURN username.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

impl From<clubcast_protocol::signal::IceServer> for IceServer {
    fn from(s: clubcast_protocol::signal::IceServer) -> Self {
        IceServer {
            urls: s.urls,
            username: s.username,
            credential: s.credential,
        }
    }
}

/// Configuration of a link's `RTCPeerConnection`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcConfig {
    /// ICE servers; empty means host candidates only.
    #[serde(default)]
    pub ice_servers: Vec<IceServer>,
}

/// An ICE candidate in the JSON shape of `RTCIceCandidateInit`, relayed as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IceCandidate {
    /// The `candidate:` attribute line.
    pub candidate: String,
    /// The media stream id it belongs to.
    #[serde(default)]
    pub sdp_mid: Option<String>,
    /// The m-line index it belongs to.
    #[serde(default, rename = "sdpMLineIndex")]
    pub sdp_m_line_index: Option<u16>,
}

/// Which side of the offer/answer exchange a description is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SdpKind {
    /// An offer.
    Offer,
    /// An answer.
    Answer,
}

/// A session description in the JSON shape of `RTCSessionDescriptionInit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDescription {
    /// Offer or answer.
    #[serde(rename = "type")]
    pub kind: SdpKind,
    /// The SDP text.
    pub sdp: String,
}

/// The connection state of a link, mirroring `RTCPeerConnectionState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Not started.
    New,
    /// ICE/DTLS in progress.
    Connecting,
    /// Connected.
    Connected,
    /// Temporarily lost; may recover.
    Disconnected,
    /// Failed; the link should be replaced.
    Failed,
    /// Closed.
    Closed,
}

/// What a link reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// Send this description to the remote peer.
    LocalDescription(SessionDescription),
    /// Send this candidate to the remote peer.
    LocalCandidate(IceCandidate),
    /// Local candidate gathering finished.
    CandidatesDone,
    /// The data channel is open; `try_send` now reaches the peer.
    Open,
    /// A binary message arrived.
    Message(Vec<u8>),
    /// The queue has room again after a [`RtcError::Full`].
    Writable,
    /// The connection state changed.
    State(ConnectionState),
    /// The data channel closed; the link is finished.
    Closed,
    /// An asynchronous step (negotiation, candidate) failed.
    Error(RtcError),
}

type Handler = Rc<RefCell<dyn FnMut(LinkEvent)>>;

/// Channel callbacks, owned by the shared state because the answerer only
/// gets its channel inside `ondatachannel`.
struct ChannelClosures {
    _on_open: Closure<dyn FnMut(Event)>,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_close: Closure<dyn FnMut(Event)>,
    _on_low: Closure<dyn FnMut(Event)>,
}

struct Shared {
    channel: Option<RtcDataChannel>,
    channel_closures: Option<ChannelClosures>,
    queue: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    /// `try_send` returned `Full` since the last `Writable`.
    refused: bool,
    remote_description_set: bool,
    pending_candidates: Vec<IceCandidate>,
    closed: bool,
}

/// One peer link: an `RTCPeerConnection` with one paced binary data channel.
pub struct RtcLink {
    pc: RtcPeerConnection,
    shared: Rc<RefCell<Shared>>,
    handler: Handler,
    _on_ice_candidate: Closure<dyn FnMut(RtcPeerConnectionIceEvent)>,
    _on_state_change: Closure<dyn FnMut(Event)>,
    _on_data_channel: Option<Closure<dyn FnMut(RtcDataChannelEvent)>>,
}

impl RtcLink {
    /// Creates the offering side: makes the channel and starts the offer, which
    /// is emitted as [`LinkEvent::LocalDescription`].
    pub fn offerer(
        config: &RtcConfig,
        on_event: impl FnMut(LinkEvent) + 'static,
    ) -> Result<Self, RtcError> {
        let link = Self::new(config, on_event, false)?;
        let init = RtcDataChannelInit::new();
        init.set_ordered(true);
        let channel = link
            .pc
            .create_data_channel_with_data_channel_dict(LABEL, &init);
        attach_channel(&link.shared, &link.handler, channel);

        let pc = link.pc.clone();
        let handler = Rc::clone(&link.handler);
        spawn_local(async move {
            let result = async {
                let offer = JsFuture::from(pc.create_offer())
                    .await
                    .map_err(RtcError::js("createOffer"))?;
                let sdp = sdp_of(&offer);
                let desc = RtcSessionDescriptionInit::new(RtcSdpType::Offer);
                desc.set_sdp(&sdp);
                JsFuture::from(pc.set_local_description(&desc))
                    .await
                    .map_err(RtcError::js("setLocalDescription"))?;
                Ok::<_, RtcError>(SessionDescription {
                    kind: SdpKind::Offer,
                    sdp,
                })
            }
            .await;
            emit(
                &handler,
                match result {
                    Ok(desc) => LinkEvent::LocalDescription(desc),
                    Err(err) => LinkEvent::Error(err),
                },
            );
        });
        Ok(link)
    }

    /// Creates the answering side; feed it the offer with
    /// [`RtcLink::handle_remote_description`].
    pub fn answerer(
        config: &RtcConfig,
        on_event: impl FnMut(LinkEvent) + 'static,
    ) -> Result<Self, RtcError> {
        Self::new(config, on_event, true)
    }

    fn new(
        config: &RtcConfig,
        on_event: impl FnMut(LinkEvent) + 'static,
        answerer: bool,
    ) -> Result<Self, RtcError> {
        let pc = RtcPeerConnection::new_with_configuration(&rtc_configuration(config))
            .map_err(RtcError::js("new RTCPeerConnection"))?;
        let handler: Handler = Rc::new(RefCell::new(on_event));
        let shared = Rc::new(RefCell::new(Shared {
            channel: None,
            channel_closures: None,
            queue: VecDeque::new(),
            queued_bytes: 0,
            refused: false,
            remote_description_set: false,
            pending_candidates: Vec::new(),
            closed: false,
        }));

        let h = Rc::clone(&handler);
        let on_ice_candidate = Closure::<dyn FnMut(RtcPeerConnectionIceEvent)>::new(
            move |ev: RtcPeerConnectionIceEvent| {
                match ev.candidate() {
                    // An empty candidate string is the end-of-candidates marker.
                    Some(c) if !c.candidate().is_empty() => emit(
                        &h,
                        LinkEvent::LocalCandidate(IceCandidate {
                            candidate: c.candidate(),
                            sdp_mid: c.sdp_mid(),
                            sdp_m_line_index: c.sdp_m_line_index(),
                        }),
                    ),
                    _ => emit(&h, LinkEvent::CandidatesDone),
                }
            },
        );
        pc.set_onicecandidate(Some(on_ice_candidate.as_ref().unchecked_ref()));

        let h = Rc::clone(&handler);
        let pc_ref = pc.clone();
        let on_state_change = Closure::<dyn FnMut(Event)>::new(move |_: Event| {
            emit(&h, LinkEvent::State(state_of(&pc_ref)));
        });
        pc.set_onconnectionstatechange(Some(on_state_change.as_ref().unchecked_ref()));

        let on_data_channel = answerer.then(|| {
            let weak = Rc::downgrade(&shared);
            let h = Rc::clone(&handler);
            let closure =
                Closure::<dyn FnMut(RtcDataChannelEvent)>::new(move |ev: RtcDataChannelEvent| {
                    let channel = ev.channel();
                    let Some(shared) = weak.upgrade() else {
                        channel.close();
                        return;
                    };
                    let taken = shared.borrow().channel.is_some();
                    if channel.label() != LABEL || taken {
                        // One link, one channel: anything else is refused.
                        channel.close();
                        return;
                    }
                    attach_channel(&shared, &h, channel);
                });
            pc.set_ondatachannel(Some(closure.as_ref().unchecked_ref()));
            closure
        });

        Ok(Self {
            pc,
            shared,
            handler,
            _on_ice_candidate: on_ice_candidate,
            _on_state_change: on_state_change,
            _on_data_channel: on_data_channel,
        })
    }

    /// Applies the remote peer's description. An offer (answerer side) is
    /// answered, and the answer is emitted as [`LinkEvent::LocalDescription`].
    /// Held remote candidates are added once the description is set.
    pub fn handle_remote_description(&self, desc: SessionDescription) {
        let pc = self.pc.clone();
        let weak = Rc::downgrade(&self.shared);
        let handler = Rc::clone(&self.handler);
        spawn_local(async move {
            let result = async {
                let init = RtcSessionDescriptionInit::new(match desc.kind {
                    SdpKind::Offer => RtcSdpType::Offer,
                    SdpKind::Answer => RtcSdpType::Answer,
                });
                init.set_sdp(&desc.sdp);
                JsFuture::from(pc.set_remote_description(&init))
                    .await
                    .map_err(RtcError::js("setRemoteDescription"))?;
                let held = match weak.upgrade() {
                    Some(shared) => {
                        let mut shared = shared.borrow_mut();
                        shared.remote_description_set = true;
                        std::mem::take(&mut shared.pending_candidates)
                    }
                    None => return Ok(None),
                };
                for candidate in held {
                    add_candidate(&pc, &candidate).await?;
                }
                if desc.kind == SdpKind::Answer {
                    return Ok(None);
                }
                let answer = JsFuture::from(pc.create_answer())
                    .await
                    .map_err(RtcError::js("createAnswer"))?;
                let sdp = sdp_of(&answer);
                let local = RtcSessionDescriptionInit::new(RtcSdpType::Answer);
                local.set_sdp(&sdp);
                JsFuture::from(pc.set_local_description(&local))
                    .await
                    .map_err(RtcError::js("setLocalDescription"))?;
                Ok(Some(SessionDescription {
                    kind: SdpKind::Answer,
                    sdp,
                }))
            }
            .await;
            match result {
                Ok(Some(answer)) => emit(&handler, LinkEvent::LocalDescription(answer)),
                Ok(None) => {}
                Err(err) => emit(&handler, LinkEvent::Error(err)),
            }
        });
    }

    /// Adds a remote ICE candidate, or holds it until the remote description
    /// is set. Failures to add are reported as [`LinkEvent::Error`].
    pub fn handle_remote_candidate(&self, candidate: IceCandidate) -> Result<(), RtcError> {
        {
            let mut shared = self.shared.borrow_mut();
            if shared.closed {
                return Err(RtcError::Closed);
            }
            if !shared.remote_description_set {
                if shared.pending_candidates.len() >= MAX_PENDING_CANDIDATES {
                    return Err(RtcError::TooManyCandidates);
                }
                shared.pending_candidates.push(candidate);
                return Ok(());
            }
        }
        let pc = self.pc.clone();
        let handler = Rc::clone(&self.handler);
        spawn_local(async move {
            if let Err(err) = add_candidate(&pc, &candidate).await {
                emit(&handler, LinkEvent::Error(err));
            }
        });
        Ok(())
    }

    /// Sends `message` now if the channel has room, queues it if not.
    ///
    /// Returns [`RtcError::Full`] when the queue is at its bound (the message is
    /// not taken), [`RtcError::TooLarge`] past [`MAX_MESSAGE_SIZE`], and
    /// [`RtcError::Closed`] once the channel is closing. Messages sent before
    /// the channel opens are queued and flushed on open.
    pub fn try_send(&self, message: Vec<u8>) -> Result<(), RtcError> {
        if message.len() > MAX_MESSAGE_SIZE {
            return Err(RtcError::TooLarge {
                len: message.len(),
                max: MAX_MESSAGE_SIZE,
            });
        }
        let mut shared = self.shared.borrow_mut();
        if shared.closed {
            return Err(RtcError::Closed);
        }
        if shared.queue.is_empty() {
            if let Some(channel) = shared.channel.as_ref() {
                match channel.ready_state() {
                    RtcDataChannelState::Open => {
                        if channel.buffered_amount() < MAX_BUFFERED_AMOUNT {
                            return channel
                                .send_with_u8_array(&message)
                                .map_err(RtcError::js("RTCDataChannel.send"));
                        }
                    }
                    RtcDataChannelState::Connecting => {}
                    _ => return Err(RtcError::Closed),
                }
            }
        }
        if shared.queue.len() >= MAX_QUEUED_MESSAGES
            || shared.queued_bytes + message.len() > MAX_QUEUED_BYTES
        {
            shared.refused = true;
            return Err(RtcError::Full);
        }
        shared.queued_bytes += message.len();
        shared.queue.push_back(message);
        Ok(())
    }

    /// Bytes the browser holds for this channel, not yet sent (`bufferedAmount`).
    pub fn buffered_amount(&self) -> u32 {
        self.shared
            .borrow()
            .channel
            .as_ref()
            .map_or(0, |c| c.buffered_amount())
    }

    /// Messages waiting in the link's own queue.
    pub fn queued_messages(&self) -> usize {
        self.shared.borrow().queue.len()
    }

    /// Bytes waiting in the link's own queue.
    pub fn queued_bytes(&self) -> usize {
        self.shared.borrow().queued_bytes
    }

    /// True while the data channel is open.
    pub fn is_open(&self) -> bool {
        self.shared
            .borrow()
            .channel
            .as_ref()
            .is_some_and(|c| c.ready_state() == RtcDataChannelState::Open)
    }

    /// The current connection state.
    pub fn connection_state(&self) -> ConnectionState {
        state_of(&self.pc)
    }

    /// Closes the channel and the connection and drops queued messages. No
    /// events are delivered afterwards.
    pub fn close(&self) {
        let mut shared = self.shared.borrow_mut();
        shared.closed = true;
        shared.queue.clear();
        shared.queued_bytes = 0;
        if let Some(channel) = shared.channel.take() {
            detach_channel(&channel);
            channel.close();
        }
        shared.channel_closures = None;
        drop(shared);
        self.pc.set_onicecandidate(None);
        self.pc.set_onconnectionstatechange(None);
        self.pc.set_ondatachannel(None);
        self.pc.close();
    }
}

impl Drop for RtcLink {
    fn drop(&mut self) {
        self.close();
    }
}

fn state_of(pc: &RtcPeerConnection) -> ConnectionState {
    match pc.connection_state() {
        RtcPeerConnectionState::New => ConnectionState::New,
        RtcPeerConnectionState::Connecting => ConnectionState::Connecting,
        RtcPeerConnectionState::Connected => ConnectionState::Connected,
        RtcPeerConnectionState::Disconnected => ConnectionState::Disconnected,
        RtcPeerConnectionState::Failed => ConnectionState::Failed,
        _ => ConnectionState::Closed,
    }
}

fn rtc_configuration(config: &RtcConfig) -> RtcConfiguration {
    let rtc = RtcConfiguration::new();
    let servers = js_sys::Array::new();
    for server in &config.ice_servers {
        let ice = RtcIceServer::new();
        let urls: js_sys::Array = server.urls.iter().map(|u| JsValue::from_str(u)).collect();
        ice.set_urls(&urls);
        if let Some(username) = &server.username {
            ice.set_username(username);
        }
        if let Some(credential) = &server.credential {
            ice.set_credential(credential);
        }
        servers.push(&ice);
    }
    rtc.set_ice_servers(&servers);
    rtc
}

fn sdp_of(description: &JsValue) -> String {
    js_sys::Reflect::get(description, &JsValue::from_str("sdp"))
        .ok()
        .and_then(|v| v.as_string())
        .unwrap_or_default()
}

async fn add_candidate(pc: &RtcPeerConnection, candidate: &IceCandidate) -> Result<(), RtcError> {
    let init = RtcIceCandidateInit::new(&candidate.candidate);
    init.set_sdp_mid(candidate.sdp_mid.as_deref());
    init.set_sdp_m_line_index(candidate.sdp_m_line_index);
    JsFuture::from(pc.add_ice_candidate_with_opt_rtc_ice_candidate_init(Some(&init)))
        .await
        .map_err(RtcError::js("addIceCandidate"))?;
    Ok(())
}

/// Delivers an event. Browser events are dispatched from the event loop, never
/// from inside another of our callbacks, so the handler is never borrowed twice;
/// if it ever is, the event is dropped rather than panicking.
fn emit(handler: &Handler, event: LinkEvent) {
    if let Ok(mut f) = handler.try_borrow_mut() {
        f(event);
    }
}

fn attach_channel(shared: &Rc<RefCell<Shared>>, handler: &Handler, channel: RtcDataChannel) {
    channel.set_binary_type(RtcDataChannelType::Arraybuffer);
    channel.set_buffered_amount_low_threshold(BUFFERED_AMOUNT_LOW);

    let weak = Rc::downgrade(shared);
    let h = Rc::clone(handler);
    let on_open = Closure::<dyn FnMut(Event)>::new(move |_: Event| {
        let writable = flush(&weak);
        emit(&h, LinkEvent::Open);
        if writable {
            emit(&h, LinkEvent::Writable);
        }
    });
    let h = Rc::clone(handler);
    let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
        // binaryType is arraybuffer; a text message is not ours and is ignored.
        if let Some(buffer) = ev.data().dyn_ref::<js_sys::ArrayBuffer>() {
            emit(
                &h,
                LinkEvent::Message(js_sys::Uint8Array::new(buffer).to_vec()),
            );
        }
    });
    let weak = Rc::downgrade(shared);
    let h = Rc::clone(handler);
    let on_close = Closure::<dyn FnMut(Event)>::new(move |_: Event| {
        if let Some(shared) = weak.upgrade() {
            let mut shared = shared.borrow_mut();
            shared.closed = true;
            shared.queue.clear();
            shared.queued_bytes = 0;
        }
        emit(&h, LinkEvent::Closed);
    });
    let weak = Rc::downgrade(shared);
    let h = Rc::clone(handler);
    let on_low = Closure::<dyn FnMut(Event)>::new(move |_: Event| {
        if flush(&weak) {
            emit(&h, LinkEvent::Writable);
        }
    });
    channel.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    channel.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    channel.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    channel.set_onbufferedamountlow(Some(on_low.as_ref().unchecked_ref()));

    let mut shared = shared.borrow_mut();
    shared.channel = Some(channel);
    shared.channel_closures = Some(ChannelClosures {
        _on_open: on_open,
        _on_message: on_message,
        _on_close: on_close,
        _on_low: on_low,
    });
}

fn detach_channel(channel: &RtcDataChannel) {
    channel.set_onopen(None);
    channel.set_onmessage(None);
    channel.set_onclose(None);
    channel.set_onbufferedamountlow(None);
}

/// Moves queued messages into the channel while it has room. Returns true when
/// a caller was refused with `Full` and the queue now has room again.
fn flush(weak: &Weak<RefCell<Shared>>) -> bool {
    let Some(shared) = weak.upgrade() else {
        return false;
    };
    let mut shared = shared.borrow_mut();
    let Some(channel) = shared.channel.clone() else {
        return false;
    };
    if channel.ready_state() != RtcDataChannelState::Open {
        return false;
    }
    while channel.buffered_amount() < MAX_BUFFERED_AMOUNT {
        let Some(message) = shared.queue.pop_front() else {
            break;
        };
        shared.queued_bytes -= message.len();
        if channel.send_with_u8_array(&message).is_err() {
            // The channel is failing; its close event follows and ends the link.
            break;
        }
    }
    let has_room = shared.queue.len() < MAX_QUEUED_MESSAGES
        && shared.queued_bytes + MAX_MESSAGE_SIZE <= MAX_QUEUED_BYTES;
    if shared.refused && has_room {
        shared.refused = false;
        return true;
    }
    false
}
