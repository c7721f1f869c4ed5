//! [`Transport`] over the `webrtc` crate (0.21.1, the async layer over the sans-IO `rtc` core).
//!
//! Each link owns one task. It reads the crate's callbacks (candidates, connection state,
//! the remote's data channel), the channel's events and our outbound queue, and it is the only
//! place that closes the peer connection. The crate does not stop its driver when a peer
//! connection is merely dropped, so the task always calls `close()` on the way out; dropping
//! the [`WebrtcRsLink`] cancels the task.
//!
//! Crate callbacks run on the crate's driver, which also runs ICE consent, DTLS and SCTP
//! timers, so the handler never awaits: it `try_send`s into a small queue (candidates, new
//! channels) or overwrites a `watch` (states, which must never be lost).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rtc_core::ice::mdns::MulticastDnsMode;
use rtc_core::peer_connection::configuration::setting_engine::SctpMaxMessageSize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateInit, RTCIceGatheringState, RTCIceServer, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSessionDescription, SettingEngineBuilder,
};

use super::handle::{self, LinkHandle, TaskSide};
use super::{
    CloseReason, Gathering, Handshake, IceCandidate, Link, LinkEvent, RtcConfig, RtcError, SdpKind,
    SendError, SessionDescription, Transport, CHANNEL_LABEL, LOW_BUFFERED_BYTES, MAX_MESSAGE,
};

/// Callback items (candidates, remote channels) queued between the crate's driver and the link
/// task. Overflow drops the item with a warning: it only happens if the task is stuck behind a
/// consumer that stopped reading events, and then the link is failing anyway.
const MAX_CONTROL_QUEUE: usize = 64;

/// How often the link re-reads the crate's outstanding bytes while any are in flight. The
/// crate's buffered-amount-low event fires on the SCTP stream's count, not on these bytes, so
/// it misses most drains; at 20 ms, 16 KiB messages ran at 12 MB/s, at 5 ms at 30 MB/s.
const REFRESH_INTERVAL: Duration = Duration::from_millis(5);

/// The `webrtc`-crate stack: makes links that all share one [`RtcConfig`].
#[derive(Debug, Clone, Default)]
pub struct WebrtcRs {
    config: RtcConfig,
}

impl WebrtcRs {
    /// A stack whose links use `config`.
    pub fn new(config: RtcConfig) -> Self {
        Self { config }
    }

    /// Builds a peer connection wired to a fresh handler.
    async fn build(&self) -> Result<(Arc<dyn PeerConnection>, Signals), RtcError> {
        let mdns = if self.config.resolve_mdns {
            MulticastDnsMode::QueryOnly
        } else {
            MulticastDnsMode::Disabled
        };
        // Prflx acceptance defaults to a 1 s wait, and against a browser that hides its host
        // address behind mDNS the first working pair is peer-reflexive, so the wait is the
        // whole connect time. Nothing better is coming on a host-only setup: accept at once.
        let setting_engine = SettingEngineBuilder::new()
            .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
            .with_host_acceptance_min_wait(Some(Duration::ZERO))
            .with_multicast_dns_mode(mdns)
            .with_sctp_max_message_size(SctpMaxMessageSize::Bounded(MAX_MESSAGE as u32))
            .build();
        let ice_servers = self
            .config
            .ice_servers
            .iter()
            .map(|server| RTCIceServer {
                urls: server.urls.clone(),
                username: server.username.clone(),
                credential: server.credential.clone(),
            })
            .collect();
        let configuration = RTCConfigurationBuilder::new()
            .with_ice_servers(ice_servers)
            .build();

        let (control_tx, control) = mpsc::channel(MAX_CONTROL_QUEUE);
        let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
        let (gathered_tx, gathered) = watch::channel(false);
        let handler = Handler {
            control: control_tx,
            state: state_tx,
            gathered: gathered_tx,
            trickle: self.config.gathering == Gathering::Trickle,
        };
        let pc = PeerConnectionBuilder::new()
            .with_configuration(configuration)
            .with_setting_engine(setting_engine)
            .with_handler(Arc::new(handler))
            .with_udp_addrs(self.config.udp_bind.clone())
            .build()
            .await
            .map_err(stack)?;
        let signals = Signals {
            control,
            state,
            gathered,
        };
        Ok((Arc::new(pc), signals))
    }

    /// The description to hand to the remote: at once when trickling, else after gathering.
    async fn local_description(
        &self,
        pc: &Arc<dyn PeerConnection>,
        signals: &mut Signals,
        immediate: RTCSessionDescription,
    ) -> Result<SessionDescription, RtcError> {
        let desc = match self.config.gathering {
            Gathering::Trickle => immediate,
            Gathering::Complete => {
                tokio::time::timeout(
                    self.config.gather_timeout,
                    signals.gathered.wait_for(|done| *done),
                )
                .await
                .map_err(|_| RtcError::GatherTimeout)?
                .map_err(|_| RtcError::Closed)?;
                pc.local_description()
                    .await
                    .ok_or_else(|| RtcError::Stack("no local description".into()))?
            }
        };
        Ok(SessionDescription {
            kind: if is_offer(&desc) {
                SdpKind::Offer
            } else {
                SdpKind::Answer
            },
            sdp: desc.sdp,
        })
    }

    /// Starts the link task and hands out the link.
    fn spawn(
        &self,
        pc: Arc<dyn PeerConnection>,
        signals: Signals,
        channel: Option<Arc<dyn DataChannel>>,
        local: SessionDescription,
    ) -> Handshake<WebrtcRsLink> {
        let offerer = channel.is_some();
        let open_timeout = self.config.open_timeout;
        let task_pc = Arc::clone(&pc);
        let (handle, events) = handle::link(move |side| {
            LinkTask {
                pc: task_pc,
                signals,
                channel,
                side,
                open_timeout,
            }
            .run()
        });
        Handshake {
            link: WebrtcRsLink {
                pc,
                handle,
                offerer,
            },
            local,
            events,
        }
    }
}

/// Whether the crate labelled a description as an offer.
fn is_offer(desc: &RTCSessionDescription) -> bool {
    desc.sdp_type == webrtc::peer_connection::RTCSdpType::Offer
}

impl Transport for WebrtcRs {
    type Link = WebrtcRsLink;

    async fn accept(&self, offer: SessionDescription) -> Result<Handshake<WebrtcRsLink>, RtcError> {
        if offer.kind != SdpKind::Offer {
            return Err(RtcError::WrongSdpKind {
                expected: SdpKind::Offer,
                got: offer.kind,
            });
        }
        let remote = RTCSessionDescription::offer(offer.sdp).map_err(bad_description)?;
        let (pc, mut signals) = self.build().await?;
        let answered = async {
            pc.set_remote_description(remote)
                .await
                .map_err(bad_description)?;
            let answer = pc.create_answer(None).await.map_err(stack)?;
            pc.set_local_description(answer.clone())
                .await
                .map_err(stack)?;
            self.local_description(&pc, &mut signals, answer).await
        }
        .await;
        match answered {
            Ok(local) => Ok(self.spawn(pc, signals, None, local)),
            Err(error) => {
                close_quietly(&pc).await;
                Err(error)
            }
        }
    }

    async fn connect(&self) -> Result<Handshake<WebrtcRsLink>, RtcError> {
        let (pc, mut signals) = self.build().await?;
        let offered = async {
            let init = RTCDataChannelInit {
                ordered: true,
                ..Default::default()
            };
            let channel = pc
                .create_data_channel(CHANNEL_LABEL, Some(init))
                .await
                .map_err(stack)?;
            let offer = pc.create_offer(None).await.map_err(stack)?;
            pc.set_local_description(offer.clone())
                .await
                .map_err(stack)?;
            let local = self.local_description(&pc, &mut signals, offer).await?;
            Ok((channel, local))
        }
        .await;
        match offered {
            Ok((channel, local)) => Ok(self.spawn(pc, signals, Some(channel), local)),
            Err(error) => {
                close_quietly(&pc).await;
                Err(error)
            }
        }
    }
}

/// A link made by [`WebrtcRs`].
pub struct WebrtcRsLink {
    pc: Arc<dyn PeerConnection>,
    handle: LinkHandle,
    offerer: bool,
}

impl Link for WebrtcRsLink {
    async fn apply_answer(&self, answer: SessionDescription) -> Result<(), RtcError> {
        if !self.offerer {
            return Err(RtcError::NotOfferer);
        }
        if answer.kind != SdpKind::Answer {
            return Err(RtcError::WrongSdpKind {
                expected: SdpKind::Answer,
                got: answer.kind,
            });
        }
        self.handle.check_alive()?;
        let remote = RTCSessionDescription::answer(answer.sdp).map_err(bad_description)?;
        self.pc
            .set_remote_description(remote)
            .await
            .map_err(bad_description)
    }

    async fn add_remote_candidate(&self, candidate: IceCandidate) -> Result<(), RtcError> {
        if candidate.candidate.is_empty() {
            return Ok(());
        }
        self.handle.count_remote_candidate()?;
        self.handle.check_alive()?;
        let init = RTCIceCandidateInit {
            candidate: candidate.candidate,
            sdp_mid: candidate.sdp_mid,
            sdp_mline_index: candidate.sdp_m_line_index,
            username_fragment: None,
            url: None,
        };
        self.pc
            .add_ice_candidate(init)
            .await
            .map_err(|e| RtcError::BadCandidate(e.to_string()))
    }

    fn try_send(&self, message: Bytes) -> Result<(), SendError> {
        self.handle.try_send(message)
    }

    fn buffered_amount(&self) -> usize {
        self.handle.buffered_amount()
    }

    fn is_open(&self) -> bool {
        self.handle.is_open()
    }

    async fn close(self) {
        self.handle.close().await;
    }
}

impl std::fmt::Debug for WebrtcRsLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebrtcRsLink")
            .field("offerer", &self.offerer)
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

/// The receiving ends of what the handler reports.
struct Signals {
    control: mpsc::Receiver<Control>,
    state: watch::Receiver<RTCPeerConnectionState>,
    gathered: watch::Receiver<bool>,
}

/// One callback item for the link task.
enum Control {
    /// A local candidate to trickle.
    Candidate(IceCandidate),
    /// A data channel the remote opened.
    Channel(Arc<dyn DataChannel>),
}

/// Receives the crate's callbacks on its driver; must never wait.
struct Handler {
    control: mpsc::Sender<Control>,
    state: watch::Sender<RTCPeerConnectionState>,
    gathered: watch::Sender<bool>,
    trickle: bool,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if !self.trickle {
            return;
        }
        match event.candidate.to_json() {
            // The crate labels every candidate `sdpMid: ""`, which a browser rejects as an
            // unknown media section. A link has exactly one m-line, so name it by index alone.
            Ok(init) => {
                let candidate = IceCandidate {
                    candidate: init.candidate,
                    sdp_mid: None,
                    sdp_m_line_index: Some(0),
                };
                if self
                    .control
                    .try_send(Control::Candidate(candidate))
                    .is_err()
                {
                    warn!("rtc: local candidate dropped, link task not keeping up");
                }
            }
            Err(error) => debug!(%error, "rtc: local candidate not serialisable"),
        }
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.send_replace(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        debug!(%state, "rtc: connection state");
        self.state.send_replace(state);
    }

    async fn on_data_channel(&self, channel: Arc<dyn DataChannel>) {
        if self.control.try_send(Control::Channel(channel)).is_err() {
            warn!("rtc: remote data channel dropped, link task not keeping up");
        }
    }
}

/// Everything the link task owns.
struct LinkTask {
    pc: Arc<dyn PeerConnection>,
    signals: Signals,
    channel: Option<Arc<dyn DataChannel>>,
    side: TaskSide,
    open_timeout: Duration,
}

impl LinkTask {
    /// Runs the link until it closes, then tears everything down.
    async fn run(mut self) {
        if let Some(channel) = &self.channel {
            configure(channel.as_ref()).await;
        }
        let reason = self.drive().await;
        self.side.finish(reason, 0).await;
        if let Some(channel) = self.channel.take() {
            // Best effort: tells the peer now rather than when consent expires.
            let _ = channel.close().await;
        }
        close_quietly(&self.pc).await;
    }

    /// The event loop; returns why the link closed, or `None` if our side closed it.
    async fn drive(&mut self) -> Option<CloseReason> {
        let open_deadline = tokio::time::sleep(self.open_timeout);
        tokio::pin!(open_deadline);
        let mut refresh = tokio::time::interval(REFRESH_INTERVAL);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let channel = self.channel.clone();
            let channel_event = async move {
                match channel {
                    Some(channel) => channel.poll().await,
                    None => std::future::pending().await,
                }
            };
            let open = self.side.shared.open.load(Ordering::Acquire);
            let draining =
                self.side.shared.budget.in_flight() > 0 || self.side.shared.budget.has_refused();
            tokio::select! {
                biased;
                () = self.side.cancel.cancelled() => return None,
                changed = self.signals.state.changed() => {
                    if changed.is_err() {
                        return Some(CloseReason::Failed);
                    }
                    let state = *self.signals.state.borrow_and_update();
                    match state {
                        RTCPeerConnectionState::Failed => return Some(CloseReason::Failed),
                        RTCPeerConnectionState::Closed => return Some(CloseReason::Remote),
                        _ => {}
                    }
                }
                Some(control) = self.signals.control.recv() => match control {
                    Control::Candidate(candidate) => {
                        self.side.emit(LinkEvent::LocalCandidate(candidate)).await;
                    }
                    Control::Channel(channel) => self.adopt(channel).await,
                },
                event = channel_event => match event {
                    Some(DataChannelEvent::OnOpen) => {
                        self.side.shared.open.store(true, Ordering::Release);
                        self.side.emit(LinkEvent::Open).await;
                    }
                    Some(DataChannelEvent::OnMessage(message)) => {
                        if message.data.len() > MAX_MESSAGE {
                            warn!(len = message.data.len(), "rtc: oversized message, closing");
                            return Some(CloseReason::Protocol);
                        }
                        self.side.emit(LinkEvent::Message(message.data.freeze())).await;
                    }
                    Some(DataChannelEvent::OnBufferedAmountLow) => self.refresh().await,
                    Some(DataChannelEvent::OnClose | DataChannelEvent::OnClosing) | None => {
                        return Some(CloseReason::Remote);
                    }
                    Some(other) => debug!(?other, "rtc: data channel event"),
                },
                Some(message) = self.side.outbound.recv(), if open => {
                    let len = message.len();
                    let Some(channel) = &self.channel else {
                        self.side.shared.budget.discard(len);
                        continue;
                    };
                    let data = message
                        .try_into_mut()
                        .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
                    if let Err(error) = channel.send(data).await {
                        debug!(%error, "rtc: send failed");
                        self.side.shared.budget.discard(len);
                        return Some(CloseReason::Failed);
                    }
                    self.side.shared.budget.handed_over(len);
                    self.refresh().await;
                }
                _ = refresh.tick(), if draining => self.refresh().await,
                () = &mut open_deadline, if !open => {
                    debug!("rtc: channel did not open in time");
                    return Some(CloseReason::Failed);
                }
            }
        }
    }

    /// Takes the remote's data channel if it is the first one labelled [`CHANNEL_LABEL`];
    /// closes any other.
    async fn adopt(&mut self, channel: Arc<dyn DataChannel>) {
        let label = channel.label().await.unwrap_or_default();
        if self.channel.is_none() && label == CHANNEL_LABEL {
            configure(channel.as_ref()).await;
            self.channel = Some(channel);
        } else {
            debug!(%label, "rtc: closing unexpected data channel");
            let _ = channel.close().await;
        }
    }

    /// Re-reads the crate's outstanding bytes and reports `Writable` when a refused sender
    /// may try again.
    async fn refresh(&mut self) {
        let Some(channel) = &self.channel else {
            return;
        };
        if let Ok(bytes) = channel.outstanding_bytes().await {
            self.side.shared.budget.set_in_flight(bytes);
        }
        if self.side.shared.budget.take_writable() {
            self.side.emit(LinkEvent::Writable).await;
        }
    }
}

/// Applies our pacing threshold to a channel the link takes on.
async fn configure(channel: &dyn DataChannel) {
    let low = u32::try_from(LOW_BUFFERED_BYTES).unwrap_or(u32::MAX);
    if let Err(error) = channel.set_buffered_amount_low_threshold(low).await {
        debug!(%error, "rtc: could not set buffered-amount-low threshold");
    }
}

/// Closes a peer connection, logging rather than returning a failure nobody can act on.
async fn close_quietly(pc: &Arc<dyn PeerConnection>) {
    if let Err(error) = pc.close().await {
        debug!(%error, "rtc: close failed");
    }
}

/// Maps a crate error on a remote description.
fn bad_description(error: webrtc::error::Error) -> RtcError {
    RtcError::BadDescription(error.to_string())
}

/// Maps any other crate error.
fn stack(error: impl std::fmt::Display) -> RtcError {
    RtcError::Stack(error.to_string())
}
