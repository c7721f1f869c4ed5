//! [`Transport`] over `str0m` (0.25, sans-IO): our own UDP sockets and one task per link.
//!
//! `str0m` does no I/O and reads no clock; the link task feeds it datagrams, timeouts, our
//! sends and the control calls, one at a time, and after each drains its output (datagrams
//! to send, events, the next timeout) before the next, as the crate's run loop requires. The
//! task owns the `Rtc`: [`Str0mLink`] reaches it through a command queue (answers,
//! candidates) and the outbound queue (messages), so nothing else ever mutates it.
//!
//! What differs from the `webrtc`-crate stack:
//! - Candidates are host candidates only, one per bound address. With
//!   [`RtcConfig::public_ip`] (a server behind a 1:1 NAT) each is signalled at that address
//!   and its own port instead: the remote's checks to it arrive, through the NAT, at the
//!   socket's own address, which is the candidate the ICE agent knows. Sockets bind within
//!   [`RtcConfig::ports`] when it is set. Gathering takes no time, so
//!   they are in the description itself, and with [`Gathering::Trickle`] the same ones
//!   follow as [`LinkEvent::LocalCandidate`] too (a remote that strips or rewrites the
//!   description's candidates still learns them). STUN and TURN servers
//!   in [`RtcConfig::ice_servers`] are not used: a server has reachable host addresses, and
//!   a browser behind a NAT still reaches them from its own server-reflexive or relayed
//!   candidates.
//! - Remote `.local` (mDNS) candidates are skipped rather than resolved: the browser's
//!   checks reach us first, and its address is learned from them (a peer-reflexive
//!   candidate), which is how the `webrtc` stack connects to Chromium too.
//! - It connects in milliseconds (the `webrtc` crate takes 0.6 s native to native), and
//!   over a link to Chromium that drops 10 % of datagrams it carried about twice the share
//!   of the stream (`just bench-loss`; `bench/results/loss.md` has the runs).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId};
use str0m::crypto::CryptoProvider;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::handle::{self, LinkHandle, TaskSide};
use super::{
    CloseReason, Gathering, Handshake, IceCandidate, Link, LinkEvent, RtcConfig, RtcError, SdpKind,
    SendError, SessionDescription, Transport, CHANNEL_LABEL, LOW_BUFFERED_BYTES,
    MAX_BUFFERED_BYTES, MAX_MESSAGE,
};

/// Largest datagram read; WebRTC keeps its packets under the path MTU.
const MAX_DATAGRAM: usize = 2048;

/// Control calls queued for one link task; each waits for its answer, so a handful is plenty.
const MAX_COMMANDS: usize = 16;

/// The `str0m` stack: makes links that all share one [`RtcConfig`].
#[derive(Clone)]
pub struct Str0m {
    config: RtcConfig,
    crypto: Arc<CryptoProvider>,
}

impl std::fmt::Debug for Str0m {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Str0m")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Default for Str0m {
    fn default() -> Self {
        Self::new(RtcConfig::default())
    }
}

impl Str0m {
    /// A stack whose links use `config` (its ICE servers are not used; see the module doc).
    pub fn new(config: RtcConfig) -> Self {
        if !config.ice_servers.is_empty() {
            warn!("rtc: the str0m stack uses host candidates only; ICE servers are ignored");
        }
        Self {
            config,
            crypto: Arc::new(str0m::crypto::from_feature_flags()),
        }
    }

    /// A fresh `Rtc` with one socket and host candidate per bound address, and the
    /// candidates to trickle.
    async fn build(&self) -> Result<(Rtc, Vec<Bound>, Vec<IceCandidate>), RtcError> {
        let mut rtc = Rtc::builder()
            .set_crypto_provider(Arc::clone(&self.crypto))
            .set_sctp_max_message_size(MAX_MESSAGE as u32)
            .set_sctp_max_buffered_amount(MAX_BUFFERED_BYTES)
            .build(Instant::now());
        let mut sockets = Vec::new();
        let mut trickle = Vec::new();
        for addr in bind_addrs(&self.config.udp_bind)? {
            let socket = bind(addr, self.config.ports).await?;
            let local = socket.local_addr().map_err(stack)?;
            let candidate = Candidate::host(local, "udp").map_err(stack)?;
            if self.config.gathering == Gathering::Trickle {
                // Named by index alone, as the `webrtc` stack does: a link has one m-line.
                trickle.push(IceCandidate {
                    candidate: self.announced(candidate.to_sdp_string(), &[local]),
                    sdp_mid: None,
                    sdp_m_line_index: Some(0),
                });
            }
            rtc.add_local_candidate(candidate);
            sockets.push(Bound { socket, local });
        }
        if sockets.is_empty() {
            return Err(RtcError::Stack("no usable local address to bind".into()));
        }
        Ok((rtc, sockets, trickle))
    }

    /// `text` (a description or a candidate line) as the remote should see it: with
    /// [`RtcConfig::public_ip`], each host candidate on `local` at that address instead.
    fn announced(&self, text: String, local: &[SocketAddr]) -> String {
        let Some(public) = self.config.public_ip else {
            return text;
        };
        local
            .iter()
            .filter(|a| a.is_ipv4() == public.is_ipv4())
            .fold(text, |text, a| {
                let port = a.port();
                text.replace(
                    &format!(" {} {port} typ host", a.ip()),
                    &format!(" {public} {port} typ host"),
                )
            })
    }

    /// Starts the link task and hands out the link.
    fn spawn(
        &self,
        (rtc, sockets, trickle): (Rtc, Vec<Bound>, Vec<IceCandidate>),
        pending: Option<SdpPendingOffer>,
        local: SessionDescription,
    ) -> Handshake<Str0mLink> {
        let offerer = pending.is_some();
        let (commands_tx, commands) = mpsc::channel(MAX_COMMANDS);
        let open_timeout = self.config.open_timeout;
        let (handle, events) = handle::link(move |side| {
            LinkTask {
                rtc,
                sockets,
                pending,
                channel: None,
                held: None,
                side,
                commands,
                open_timeout,
                out: trickle.into_iter().map(LinkEvent::LocalCandidate).collect(),
            }
            .run()
        });
        Handshake {
            link: Str0mLink {
                handle,
                commands: commands_tx,
                offerer,
            },
            local,
            events,
        }
    }
}

/// The addresses to bind: each given one, with a wildcard IPv4 address expanded to every
/// interface's that is not loopback or link-local (the `webrtc` stack's rule).
fn bind_addrs(configured: &[SocketAddr]) -> Result<Vec<SocketAddr>, RtcError> {
    let mut out = Vec::new();
    for addr in configured {
        if !addr.ip().is_unspecified() {
            out.push(*addr);
            continue;
        }
        let interfaces = rtc_core::shared::ifaces::ifaces().map_err(stack)?;
        for interface in interfaces {
            let Some(found) = interface.addr else {
                continue;
            };
            let ip = found.ip();
            let candidate = SocketAddr::new(ip, addr.port());
            if ip.is_ipv4() == addr.is_ipv4() && usable(ip) && !out.contains(&candidate) {
                out.push(candidate);
            }
        }
    }
    Ok(out)
}

/// The addresses of `sockets`.
fn bound(sockets: &[Bound]) -> Vec<SocketAddr> {
    sockets.iter().map(|b| b.local).collect()
}

/// Where the next bind within a port range starts, so that links spread over the range
/// rather than all probing its first ports.
static NEXT_PORT: AtomicUsize = AtomicUsize::new(0);

/// A UDP socket on `addr`, or with `ports` on `addr`'s IP and the first free port of the
/// range, tried from a cursor that moves on with each bind.
async fn bind(addr: SocketAddr, ports: Option<(u16, u16)>) -> Result<UdpSocket, RtcError> {
    let Some((min, max)) = ports else {
        return UdpSocket::bind(addr).await.map_err(stack);
    };
    let span = usize::from(max - min) + 1;
    let start = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    for i in 0..span {
        let port = min + ((start + i) % span) as u16;
        match UdpSocket::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(socket) => return Ok(socket),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(stack(e)),
        }
    }
    Err(RtcError::Stack(format!(
        "no free UDP port on {} in {min}-{max}",
        addr.ip()
    )))
}

/// Whether a local address can carry a host candidate.
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_unspecified() || v4.is_link_local()),
        IpAddr::V6(v6) => {
            !(v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

impl Transport for Str0m {
    type Link = Str0mLink;

    async fn accept(&self, offer: SessionDescription) -> Result<Handshake<Str0mLink>, RtcError> {
        if offer.kind != SdpKind::Offer {
            return Err(RtcError::WrongSdpKind {
                expected: SdpKind::Offer,
                got: offer.kind,
            });
        }
        let remote = SdpOffer::from_sdp_string(&offer.sdp).map_err(bad_description)?;
        let (mut rtc, sockets, trickle) = self.build().await?;
        let answer = rtc
            .sdp_api()
            .accept_offer(remote)
            .map_err(bad_description)?;
        let local = SessionDescription {
            kind: SdpKind::Answer,
            sdp: self.announced(answer.to_sdp_string(), &bound(&sockets)),
        };
        Ok(self.spawn((rtc, sockets, trickle), None, local))
    }

    async fn connect(&self) -> Result<Handshake<Str0mLink>, RtcError> {
        let (mut rtc, sockets, trickle) = self.build().await?;
        let mut api = rtc.sdp_api();
        api.add_channel_with_config(ChannelConfig {
            label: CHANNEL_LABEL.into(),
            ..ChannelConfig::default()
        });
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| RtcError::Stack("no offer to make".into()))?;
        let local = SessionDescription {
            kind: SdpKind::Offer,
            sdp: self.announced(offer.to_sdp_string(), &bound(&sockets)),
        };
        Ok(self.spawn((rtc, sockets, trickle), Some(pending), local))
    }
}

/// A control call for the link task, with where its answer goes.
enum Command {
    /// [`Link::apply_answer`].
    Answer(SdpAnswer, oneshot::Sender<Result<(), RtcError>>),
    /// [`Link::add_remote_candidate`].
    Candidate(Candidate, oneshot::Sender<Result<(), RtcError>>),
}

/// A link made by [`Str0m`].
pub struct Str0mLink {
    handle: LinkHandle,
    commands: mpsc::Sender<Command>,
    offerer: bool,
}

impl Str0mLink {
    /// Runs `command` on the link task and waits for its answer.
    async fn call(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(), RtcError>>) -> Command,
    ) -> Result<(), RtcError> {
        self.handle.check_alive()?;
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(command(tx))
            .await
            .map_err(|_| RtcError::Closed)?;
        rx.await.map_err(|_| RtcError::Closed)?
    }
}

impl Link for Str0mLink {
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
        let remote = SdpAnswer::from_sdp_string(&answer.sdp).map_err(bad_description)?;
        self.call(|tx| Command::Answer(remote, tx)).await
    }

    async fn add_remote_candidate(&self, candidate: IceCandidate) -> Result<(), RtcError> {
        let line = candidate.candidate.trim();
        if line.is_empty() {
            return Ok(());
        }
        self.handle.count_remote_candidate()?;
        let line = line.strip_prefix("a=").unwrap_or(line);
        if is_mdns(line) {
            // Learned from the browser's own checks instead; see the module doc.
            debug!("rtc: skipping an mDNS candidate");
            return Ok(());
        }
        let parsed =
            Candidate::from_sdp_string(line).map_err(|e| RtcError::BadCandidate(e.to_string()))?;
        self.call(|tx| Command::Candidate(parsed, tx)).await
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

impl std::fmt::Debug for Str0mLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Str0mLink")
            .field("offerer", &self.offerer)
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

/// Whether a candidate line names a `.local` host rather than an IP.
fn is_mdns(line: &str) -> bool {
    line.split_ascii_whitespace()
        .nth(4)
        .is_some_and(|address| address.ends_with(".local"))
}

/// One bound socket and its address, read once: a candidate's address is what the stack
/// names as a datagram's destination or source.
struct Bound {
    socket: UdpSocket,
    local: SocketAddr,
}

/// What woke the link task.
enum Wake {
    Cancelled,
    Datagram(usize, std::io::Result<(SocketAddr, usize)>),
    Command(Command),
    Message(Bytes),
    Timeout,
    OpenDeadline,
}

/// Everything the link task owns.
struct LinkTask {
    rtc: Rtc,
    sockets: Vec<Bound>,
    /// Our offer, until the answer comes.
    pending: Option<SdpPendingOffer>,
    /// Our one data channel, once open.
    channel: Option<ChannelId>,
    /// A message the channel had no room for yet.
    held: Option<Bytes>,
    side: TaskSide,
    commands: mpsc::Receiver<Command>,
    open_timeout: std::time::Duration,
    /// Events drained from the `Rtc`, handed on once the drain is done.
    out: VecDeque<LinkEvent>,
}

impl LinkTask {
    /// Runs the link until it closes, then tears everything down.
    async fn run(mut self) {
        let reason = self.drive().await;
        let held = self.held.take().map_or(0, |message| message.len());
        self.side.finish(reason, held).await;
        // Best effort: tells the peer now rather than when its consent checks expire.
        if self.rtc.is_alive() && self.rtc.close().is_ok() {
            let _ = self.drain();
        }
        self.rtc.disconnect();
    }

    /// The event loop; returns why the link closed, or `None` if our side closed it.
    async fn drive(&mut self) -> Option<CloseReason> {
        let open_deadline = tokio::time::Instant::now() + self.open_timeout;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        // Whether a message the channel had no room for may be tried again: after input
        // from the network or a timer, which may have made room (not after our own write).
        let mut retry = false;
        loop {
            let next = match self.drain() {
                Ok(next) => next,
                Err(reason) => return Some(reason),
            };
            while let Some(event) = self.out.pop_front() {
                self.side.emit(event).await;
            }
            if retry {
                retry = false;
                if let Some(message) = self.held.take() {
                    self.write(message);
                    continue;
                }
            }
            let open = self.channel.is_some();
            let wake = {
                let sockets = &self.sockets;
                let buf = &mut buf;
                let datagram = std::future::poll_fn(|cx| {
                    for (i, bound) in sockets.iter().enumerate() {
                        let mut read = ReadBuf::new(buf);
                        if let Poll::Ready(result) = bound.socket.poll_recv_from(cx, &mut read) {
                            let len = read.filled().len();
                            return Poll::Ready((i, result.map(|from| (from, len))));
                        }
                    }
                    Poll::Pending
                });
                tokio::select! {
                    biased;
                    () = self.side.cancel.cancelled() => Wake::Cancelled,
                    (i, result) = datagram => Wake::Datagram(i, result),
                    Some(command) = self.commands.recv() => Wake::Command(command),
                    Some(message) = self.side.outbound.recv(), if open && self.held.is_none() => {
                        Wake::Message(message)
                    }
                    () = tokio::time::sleep_until(tokio::time::Instant::from_std(next)) => {
                        Wake::Timeout
                    }
                    () = tokio::time::sleep_until(open_deadline), if !open => Wake::OpenDeadline,
                }
            };
            // Only a datagram or a timer can carry the acknowledgement that makes room.
            retry = matches!(wake, Wake::Datagram(..) | Wake::Timeout);
            match wake {
                Wake::Cancelled => return None,
                Wake::OpenDeadline => {
                    debug!("rtc: channel did not open in time");
                    return Some(CloseReason::Failed);
                }
                Wake::Datagram(i, Ok((source, len))) => {
                    let destination = self.sockets[i].local;
                    // Anything that is not STUN, DTLS, RTP or RTCP is not ours: drop it.
                    let Ok(receive) = Receive::new(Protocol::Udp, source, destination, &buf[..len])
                    else {
                        continue;
                    };
                    let input = Input::Receive(Instant::now(), receive);
                    // Until DTLS is up, `Rtc::accepts` turns down the remote's first DTLS
                    // flight whenever it beats the ICE pair's nomination, and the remote
                    // resends it a second later (setup took 0.8–1.2 s native to native, and
                    // 2.7 ms without the check). The socket is this link's alone, so before
                    // that everything goes in; after, only what belongs to the pair.
                    if self.rtc.is_connected() && !self.rtc.accepts(&input) {
                        continue;
                    }
                    // A bad datagram (anyone can send one to the port) is dropped, not
                    // fatal: if the stack gave up on the link, the drain finds it dead.
                    if let Err(error) = self.rtc.handle_input(input) {
                        debug!(%error, "rtc: datagram refused");
                    }
                }
                Wake::Datagram(_, Err(error)) => {
                    // An ICMP error of an earlier send (port unreachable) surfaces here on
                    // Linux; ICE consent, not one datagram, decides whether the path is dead.
                    debug!(%error, "rtc: socket read failed");
                }
                Wake::Command(Command::Answer(answer, reply)) => {
                    let result = match self.pending.take() {
                        Some(pending) => self
                            .rtc
                            .sdp_api()
                            .accept_answer(pending, answer)
                            .map_err(bad_description),
                        None => Err(RtcError::BadDescription("answer already applied".into())),
                    };
                    let _ = reply.send(result);
                }
                Wake::Command(Command::Candidate(candidate, reply)) => {
                    self.rtc.add_remote_candidate(candidate);
                    let _ = reply.send(Ok(()));
                }
                Wake::Message(message) => self.write(message),
                Wake::Timeout => {
                    if let Err(error) = self.rtc.handle_input(Input::Timeout(Instant::now())) {
                        debug!(%error, "rtc: timeout refused");
                        return Some(CloseReason::Failed);
                    }
                }
            }
        }
    }

    /// Hands one message to the channel, or holds it if the channel has no room.
    fn write(&mut self, message: Bytes) {
        let len = message.len();
        let Some(mut channel) = self.channel.and_then(|id| self.rtc.channel(id)) else {
            self.side.shared.budget.discard(len);
            return;
        };
        match channel.write(true, &message) {
            // The drain that follows re-reads the channel's buffered bytes.
            Ok(true) => self.side.shared.budget.handed_over(len),
            Ok(false) => self.held = Some(message),
            Err(error) => {
                debug!(%error, "rtc: send failed");
                self.side.shared.budget.discard(len);
            }
        }
    }

    /// Drains the `Rtc`'s output: sends datagrams, queues events, refreshes the send budget.
    /// Returns the next timeout, or why the link is over.
    fn drain(&mut self) -> Result<Instant, CloseReason> {
        loop {
            if !self.rtc.is_alive() {
                return Err(CloseReason::Remote);
            }
            let output = match self.rtc.poll_output() {
                Ok(output) => output,
                Err(error) => {
                    debug!(%error, "rtc: stack failed");
                    return Err(CloseReason::Failed);
                }
            };
            match output {
                Output::Timeout(at) => {
                    self.refresh();
                    return Ok(at);
                }
                Output::Transmit(transmit) => {
                    let socket = &self
                        .sockets
                        .iter()
                        .find(|b| b.local == transmit.source)
                        .unwrap_or(&self.sockets[0])
                        .socket;
                    // UDP: a full socket buffer loses the datagram, as the network could.
                    if let Err(error) = socket.try_send_to(&transmit.contents, transmit.destination)
                    {
                        debug!(%error, "rtc: datagram not sent");
                    }
                }
                Output::Event(event) => self.on_event(event)?,
            }
        }
    }

    /// Acts on one event of the `Rtc`.
    fn on_event(&mut self, event: Event) -> Result<(), CloseReason> {
        match event {
            Event::ChannelOpen(id, label) => {
                if self.channel.is_none() && label == CHANNEL_LABEL {
                    if let Some(mut channel) = self.rtc.channel(id) {
                        channel.set_buffered_amount_low_threshold(LOW_BUFFERED_BYTES);
                    }
                    self.channel = Some(id);
                    self.side.shared.open.store(true, Ordering::Release);
                    self.out.push_back(LinkEvent::Open);
                } else {
                    debug!(%label, "rtc: closing unexpected data channel");
                    self.rtc.direct_api().close_data_channel(id);
                }
            }
            Event::ChannelData(data) if Some(data.id) == self.channel => {
                if data.data.len() > MAX_MESSAGE {
                    warn!(len = data.data.len(), "rtc: oversized message, closing");
                    return Err(CloseReason::Protocol);
                }
                self.out
                    .push_back(LinkEvent::Message(Bytes::from(data.data)));
            }
            Event::ChannelClose(id) if Some(id) == self.channel => {
                return Err(CloseReason::Remote);
            }
            Event::Closed => return Err(CloseReason::Remote),
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                return Err(CloseReason::Failed);
            }
            Event::ChannelBufferedAmountLow(_) => self.refresh(),
            other => debug!(?other, "rtc: event"),
        }
        Ok(())
    }

    /// Re-reads the channel's buffered bytes and reports `Writable` when a refused sender
    /// may try again.
    fn refresh(&mut self) {
        if let Some(mut channel) = self.channel.and_then(|id| self.rtc.channel(id)) {
            self.side
                .shared
                .budget
                .set_in_flight(channel.buffered_amount());
        }
        if self.side.shared.budget.take_writable() {
            self.out.push_back(LinkEvent::Writable);
        }
    }
}

/// Maps a parse or negotiation error on a remote description.
fn bad_description(error: impl std::fmt::Display) -> RtcError {
    RtcError::BadDescription(error.to_string())
}

/// Maps any other stack or socket error.
fn stack(error: impl std::fmt::Display) -> RtcError {
    RtcError::Stack(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mdns_candidates_are_told_from_ip_ones() {
        assert!(is_mdns(
            "candidate:1 1 udp 2122260223 4f2a7c1e-9d1b-4c8e-a3f5-0123456789ab.local 54321 typ host"
        ));
        assert!(!is_mdns(
            "candidate:1 1 udp 2122260223 192.0.2.7 54321 typ host"
        ));
        assert!(!is_mdns("candidate:nonsense"));
    }

    #[test]
    fn a_wildcard_bind_becomes_usable_interface_addresses() {
        let addrs = bind_addrs(&[SocketAddr::from(([0, 0, 0, 0], 0))]).expect("interfaces");
        assert!(addrs.iter().all(|a| usable(a.ip()) && a.is_ipv4()));
        let fixed = SocketAddr::from(([127, 0, 0, 1], 5000));
        assert_eq!(bind_addrs(&[fixed]).expect("as given"), vec![fixed]);
    }
}
