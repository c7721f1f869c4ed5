//! Server metrics in Prometheus text exposition, all prefixed `clubcast_`.
//!
//! Counters are plain atomics; labelled ones keep a small map whose keys come
//! from closed sets (error codes, HTTP statuses, message types) or from stream
//! names, which the registry bounds at [`crate::stream::MAX_STREAMS`]. Every
//! part of the server (signaling, origin, ingest, seeder) holds the one
//! `Arc<Metrics>` and counts through its methods.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Errors of this module (rendering cannot fail today; kept for the one-enum rule).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// Formatting into the output buffer failed.
    #[error("formatting metrics failed")]
    Format(#[from] std::fmt::Error),
}

/// A counter or gauge split by one label.
#[derive(Debug, Default)]
struct Labelled(Mutex<BTreeMap<String, u64>>);

impl Labelled {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        // Map updates are single statements; a poisoned lock holds a valid map.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, label: &str, n: u64) {
        let mut m = self.map();
        match m.get_mut(label) {
            Some(v) => *v = v.saturating_add(n),
            None => {
                m.insert(label.to_owned(), n);
            }
        }
    }

    fn set(&self, label: &str, n: u64) {
        let mut m = self.map();
        if n == 0 {
            m.remove(label);
        } else {
            m.insert(label.to_owned(), n);
        }
    }

    /// Replaces every entry, zeros kept.
    fn replace(&self, entries: impl IntoIterator<Item = (String, u64)>) {
        *self.map() = entries.into_iter().collect();
    }

    fn get(&self, label: &str) -> u64 {
        self.map().get(label).copied().unwrap_or(0)
    }

    fn snapshot(&self) -> Vec<(String, u64)> {
        self.map().iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// All server metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    streams: AtomicU64,
    streams_ended: AtomicU64,
    rtmp_connections: AtomicU64,
    publishing: Labelled,
    peers: Labelled,
    joins: AtomicU64,
    signal_messages: Labelled,
    bytes_seeded: AtomicU64,
    gap_fill_bytes: AtomicU64,
    bids: AtomicU64,
    grants: AtomicU64,
    granted_bits: AtomicU64,
    rejects: Labelled,
    origin_requests: Labelled,
    dropped_peers: Labelled,
    reports: AtomicU64,
    sources_replaced: AtomicU64,
    shares_shed: AtomicU64,
    capacities_learned: AtomicU64,
    upload_probes: Labelled,
    kv_items: AtomicU64,
    kv_puts: Labelled,
    vod_assets: AtomicU64,
    vod_bytes: AtomicU64,
    vod_uploads: Labelled,
    vod_peers: AtomicU64,
    vod_joins: AtomicU64,
    vod_bids: AtomicU64,
    vod_grants: AtomicU64,
    vod_granted_bits: AtomicU64,
    vod_refused: Labelled,
}

fn inc(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    /// Fresh, all zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the number of streams (gauge).
    pub fn set_streams(&self, n: usize) {
        self.streams.store(n as u64, Ordering::Relaxed);
    }

    /// A stream ended: its publisher stayed away too long.
    pub fn stream_ended(&self) {
        inc(&self.streams_ended, 1);
    }

    /// An RTMP connection opened (`true`) or closed (`false`).
    pub fn rtmp_connection(&self, open: bool) {
        if open {
            inc(&self.rtmp_connections, 1);
        } else {
            self.rtmp_connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Sets the number of `/kv` items (gauge).
    pub fn set_kv_items(&self, n: usize) {
        self.kv_items.store(n as u64, Ordering::Relaxed);
    }

    /// A `/kv` put ended with `result` (`created`, `replaced`, `refreshed` or an error code).
    pub fn kv_put(&self, result: &str) {
        self.kv_puts.add(result, 1);
    }

    /// `/kv` puts that ended with `result`.
    pub fn kv_puts(&self, result: &str) -> u64 {
        self.kv_puts.get(result)
    }

    /// Sets the number of on-demand assets (gauge).
    pub fn set_vod_assets(&self, n: usize) {
        self.vod_assets.store(n as u64, Ordering::Relaxed);
    }

    /// `GET /vod/{name}/blocks` served `bytes` of blocks.
    pub fn vod_bytes(&self, bytes: u64) {
        inc(&self.vod_bytes, bytes);
    }

    /// Block bytes of on-demand assets served so far.
    pub fn vod_bytes_total(&self) -> u64 {
        self.vod_bytes.load(Ordering::Relaxed)
    }

    /// An upload to `/vod` ended with `result` (`created`, `replaced` or an error code).
    pub fn vod_upload(&self, result: &str) {
        self.vod_uploads.add(result, 1);
    }

    /// Uploads to `/vod` that ended with `result`.
    pub fn vod_uploads(&self, result: &str) -> u64 {
        self.vod_uploads.get(result)
    }

    /// A viewer joined an on-demand room.
    pub fn vod_join(&self) {
        inc(&self.vod_joins, 1);
        inc(&self.vod_peers, 1);
    }

    /// A viewer left an on-demand room (or was dropped from it).
    pub fn vod_left(&self) {
        let _ = self
            .vod_peers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// Viewers in on-demand rooms now.
    pub fn vod_peers(&self) -> u64 {
        self.vod_peers.load(Ordering::Relaxed)
    }

    /// Viewers that joined an on-demand room so far.
    pub fn vod_joins(&self) -> u64 {
        self.vod_joins.load(Ordering::Relaxed)
    }

    /// An on-demand viewer's bid arrived.
    pub fn vod_bid(&self) {
        inc(&self.vod_bids, 1);
    }

    /// On-demand bids received so far.
    pub fn vod_bids(&self) -> u64 {
        self.vod_bids.load(Ordering::Relaxed)
    }

    /// An on-demand grant of `bits` was made (sent, if its viewer is still there).
    pub fn vod_grant(&self, bits: u64) {
        inc(&self.vod_grants, 1);
        inc(&self.vod_granted_bits, bits);
    }

    /// On-demand grants made so far.
    pub fn vod_grants(&self) -> u64 {
        self.vod_grants.load(Ordering::Relaxed)
    }

    /// Bits of on-demand grants so far.
    pub fn vod_granted_bits(&self) -> u64 {
        self.vod_granted_bits.load(Ordering::Relaxed)
    }

    /// The on-demand ledger refused a run with the grant error `code`
    /// (`over_grant`, `over_anonymous_budget`, `unknown_token`).
    pub fn vod_refuse(&self, code: &str) {
        self.vod_refused.add(code, 1);
    }

    /// On-demand runs the ledger refused with `code` so far.
    pub fn vod_refused(&self, code: &str) -> u64 {
        self.vod_refused.get(code)
    }

    /// RTMP connections open now.
    pub fn rtmp_connections(&self) -> u64 {
        self.rtmp_connections.load(Ordering::Relaxed)
    }

    /// Streams ended so far.
    pub fn streams_ended(&self) -> u64 {
        self.streams_ended.load(Ordering::Relaxed)
    }

    /// Sets, for every stream, whether a publisher is sending it (gauge,
    /// 1 or 0; a stream not given is dropped).
    pub fn set_publishing(&self, streams: impl IntoIterator<Item = (String, bool)>) {
        self.publishing
            .replace(streams.into_iter().map(|(s, p)| (s, u64::from(p))));
    }

    /// Sets the number of peers in `stream`'s swarm (gauge).
    pub fn set_peers(&self, stream: &str, n: usize) {
        self.peers.set(stream, n as u64);
    }

    /// A peer joined a swarm.
    pub fn join(&self) {
        inc(&self.joins, 1);
    }

    /// A signaling message of type `ty` arrived (`invalid` if it did not parse).
    pub fn signal_message(&self, ty: &str) {
        self.signal_messages.add(ty, 1);
    }

    /// The seeder sent `bytes` of blocks to peers.
    pub fn seeded(&self, bytes: u64) {
        inc(&self.bytes_seeded, bytes);
    }

    /// The origin served `bytes` of blocks.
    pub fn gap_fill(&self, bytes: u64) {
        inc(&self.gap_fill_bytes, bytes);
    }

    /// A bid arrived.
    pub fn bid(&self) {
        inc(&self.bids, 1);
    }

    /// A grant of `bits` was sent.
    pub fn grant(&self, bits: u64) {
        inc(&self.grants, 1);
        inc(&self.granted_bits, bits);
    }

    /// Something was refused with the stable error `code` (the same string as
    /// the JSON `code` the client saw, e.g. `rate_limited`, `over_grant`).
    pub fn reject(&self, code: &str) {
        self.rejects.add(code, 1);
    }

    /// The origin answered with HTTP `status`.
    pub fn origin_request(&self, status: u16) {
        self.origin_requests.add(&status.to_string(), 1);
    }

    /// The server dropped a peer's connection for `reason` (`slow`, `silent`,
    /// `reported`, `offences`).
    pub fn drop_peer(&self, reason: &str) {
        self.dropped_peers.add(reason, 1);
    }

    /// A peer reported a bad block.
    pub fn report(&self) {
        inc(&self.reports, 1);
    }

    /// A slow-source report replaced an overloaded last-hop source.
    pub fn source_replaced(&self) {
        inc(&self.sources_replaced, 1);
    }

    /// A peer whose bids stayed over the planned upload cap shed a last-hop share.
    pub fn share_shed(&self) {
        inc(&self.shares_shed, 1);
    }

    /// A peer that stated no upload fell behind, and is now planned on the
    /// upload its bid measured.
    pub fn capacity_learned(&self) {
        inc(&self.capacities_learned, 1);
    }

    /// A joiner's upload probe gave `result`: `planned` (planned on the
    /// measured upload, below the cap), `at_cap` (it read at or above the cap,
    /// or too fast to time), `limited` (the sender ran dry: a lower bound,
    /// planned at the cap), `nothing` (too little came to time) or `unused`
    /// (the peer stated its upload, or relays nothing).
    pub fn upload_probe(&self, result: &str) {
        self.upload_probes.add(result, 1);
    }

    /// Upload probes counted with `result` so far.
    pub fn upload_probes(&self, result: &str) -> u64 {
        self.upload_probes.get(result)
    }

    /// Last-hop shares shed so far.
    pub fn shares_shed(&self) -> u64 {
        self.shares_shed.load(Ordering::Relaxed)
    }

    /// Overloaded sources replaced so far.
    pub fn sources_replaced(&self) -> u64 {
        self.sources_replaced.load(Ordering::Relaxed)
    }

    /// Times `code` was rejected so far (for tests and logs).
    pub fn rejects(&self, code: &str) -> u64 {
        self.rejects.get(code)
    }

    /// Peers dropped for `reason` so far.
    pub fn dropped_peers(&self, reason: &str) -> u64 {
        self.dropped_peers.get(reason)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = self.render_into(&mut out);
        out
    }

    fn render_into(&self, out: &mut String) -> Result<(), MetricsError> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        scalar(
            out,
            "clubcast_streams",
            "gauge",
            "Streams this server holds.",
            get(&self.streams),
        )?;
        scalar(
            out,
            "clubcast_streams_ended_total",
            "counter",
            "Streams ended because their publisher stayed away longer than --publisher-wait-seconds.",
            get(&self.streams_ended),
        )?;
        scalar(
            out,
            "clubcast_rtmp_connections",
            "gauge",
            "RTMP connections open (publishing or not yet).",
            get(&self.rtmp_connections),
        )?;
        scalar(
            out,
            "clubcast_kv_items",
            "gauge",
            "Items in the public key-value store (/kv), expired ones not yet swept included.",
            get(&self.kv_items),
        )?;
        labelled(
            out,
            "clubcast_kv_puts_total",
            "counter",
            "Puts to /kv, by result: created, replaced, refreshed, or the error code.",
            "result",
            &self.kv_puts,
        )?;
        scalar(
            out,
            "clubcast_vod_assets",
            "gauge",
            "On-demand assets served (/vod), the built-in demo asset included.",
            get(&self.vod_assets),
        )?;
        scalar(
            out,
            "clubcast_vod_bytes_total",
            "counter",
            "Block bytes of on-demand assets served (GET /vod/{name}/blocks).",
            get(&self.vod_bytes),
        )?;
        labelled(
            out,
            "clubcast_vod_uploads_total",
            "counter",
            "Uploads to /vod, by result: created, replaced, or the error code.",
            "result",
            &self.vod_uploads,
        )?;
        scalar(
            out,
            "clubcast_vod_peers",
            "gauge",
            "On-demand viewers in rooms (join_vod), all assets together.",
            get(&self.vod_peers),
        )?;
        scalar(
            out,
            "clubcast_vod_joins_total",
            "counter",
            "On-demand viewers that joined a room (join_vod answered with vod_welcome).",
            get(&self.vod_joins),
        )?;
        scalar(
            out,
            "clubcast_vod_bids_total",
            "counter",
            "Bids of on-demand viewers (for their runs; live bids are clubcast_bids_total).",
            get(&self.vod_bids),
        )?;
        scalar(
            out,
            "clubcast_vod_grants_total",
            "counter",
            "Grants of the on-demand ledger (--vod-budget-kbps).",
            get(&self.vod_grants),
        )?;
        scalar(
            out,
            "clubcast_vod_granted_bits_total",
            "counter",
            "Bits granted by the on-demand ledger.",
            get(&self.vod_granted_bits),
        )?;
        labelled(
            out,
            "clubcast_vod_refused_total",
            "counter",
            "On-demand runs the grant ledger refused, by code: over_grant and over_anonymous_budget (429), unknown_token (401).",
            "code",
            &self.vod_refused,
        )?;
        labelled(
            out,
            "clubcast_stream_publishing",
            "gauge",
            "Whether a publisher is sending each stream (1) or not (0): 0 once it left or went silent long enough to be taken over.",
            "stream",
            &self.publishing,
        )?;
        labelled(
            out,
            "clubcast_peers",
            "gauge",
            "Peers in each stream's swarm.",
            "stream",
            &self.peers,
        )?;
        scalar(
            out,
            "clubcast_joins_total",
            "counter",
            "Peers that joined a swarm.",
            get(&self.joins),
        )?;
        labelled(
            out,
            "clubcast_signal_messages_total",
            "counter",
            "Signaling messages received, by type.",
            "type",
            &self.signal_messages,
        )?;
        scalar(
            out,
            "clubcast_bytes_seeded_total",
            "counter",
            "Block bytes the seeder pushed to peers.",
            get(&self.bytes_seeded),
        )?;
        scalar(
            out,
            "clubcast_gap_fill_bytes_total",
            "counter",
            "Block bytes the origin served.",
            get(&self.gap_fill_bytes),
        )?;
        scalar(
            out,
            "clubcast_bids_total",
            "counter",
            "Bids of live peers (gap fill; on-demand bids are clubcast_vod_bids_total).",
            get(&self.bids),
        )?;
        scalar(
            out,
            "clubcast_grants_total",
            "counter",
            "Grants of the live gap-fill ledger.",
            get(&self.grants),
        )?;
        scalar(
            out,
            "clubcast_granted_bits_total",
            "counter",
            "Bits granted by the live gap-fill ledger.",
            get(&self.granted_bits),
        )?;
        labelled(
            out,
            "clubcast_rejects_total",
            "counter",
            "Refused requests and messages, by error code.",
            "code",
            &self.rejects,
        )?;
        labelled(
            out,
            "clubcast_origin_requests_total",
            "counter",
            "Origin HTTP responses, by status.",
            "status",
            &self.origin_requests,
        )?;
        labelled(
            out,
            "clubcast_dropped_peers_total",
            "counter",
            "Peer connections the server closed, by reason.",
            "reason",
            &self.dropped_peers,
        )?;
        scalar(
            out,
            "clubcast_reports_total",
            "counter",
            "Bad-block reports received.",
            get(&self.reports),
        )?;
        scalar(
            out,
            "clubcast_sources_replaced_total",
            "counter",
            "Overloaded last-hop sources replaced after a slow-source report.",
            get(&self.sources_replaced),
        )?;
        scalar(
            out,
            "clubcast_shares_shed_total",
            "counter",
            "Last-hop shares moved off peers whose bids stayed over the planned upload cap.",
            get(&self.shares_shed),
        )?;
        scalar(
            out,
            "clubcast_capacities_learned_total",
            "counter",
            "Peers that stated no upload, fell behind, and were planned on their measured upload.",
            get(&self.capacities_learned),
        )?;
        labelled(
            out,
            "clubcast_upload_probes_total",
            "counter",
            "Joiners' upload probes, by result (planned, at_cap, limited, nothing, unused).",
            "result",
            &self.upload_probes,
        )?;
        Ok(())
    }
}

fn scalar(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    value: u64,
) -> Result<(), MetricsError> {
    writeln!(out, "# HELP {name} {help}")?;
    writeln!(out, "# TYPE {name} {kind}")?;
    writeln!(out, "{name} {value}")?;
    Ok(())
}

fn labelled(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    values: &Labelled,
) -> Result<(), MetricsError> {
    writeln!(out, "# HELP {name} {help}")?;
    writeln!(out, "# TYPE {name} {kind}")?;
    for (k, v) in values.snapshot() {
        writeln!(out, "{name}{{{label}=\"{}\"}} {v}", escape(&k))?;
    }
    Ok(())
}

/// Escapes a label value per the exposition format.
fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_counters_and_gauges() {
        let m = Metrics::new();
        m.set_streams(2);
        m.set_peers("demo", 3);
        m.reject("rate_limited");
        m.reject("rate_limited");
        m.origin_request(429);
        m.signal_message("join");
        m.reject("we\"ird");
        let t = m.render();
        assert!(t.contains("clubcast_streams 2\n"));
        assert!(t.contains("clubcast_peers{stream=\"demo\"} 3\n"));
        assert!(t.contains("clubcast_rejects_total{code=\"rate_limited\"} 2\n"));
        assert!(t.contains("clubcast_origin_requests_total{status=\"429\"} 1\n"));
        assert!(t.contains("clubcast_signal_messages_total{type=\"join\"} 1\n"));
        assert!(t.contains("code=\"we\\\"ird\""));
        m.set_peers("demo", 0);
        assert!(!m.render().contains("stream=\"demo\""));
        // On-demand bids, grants and refusals are apart from live ones.
        m.bid();
        m.vod_bid();
        m.vod_bid();
        m.vod_grant(4_000);
        m.vod_refuse("over_grant");
        let t = m.render();
        assert!(t.contains("clubcast_bids_total 1\n"), "{t}");
        assert!(t.contains("clubcast_vod_bids_total 2\n"), "{t}");
        assert!(t.contains("clubcast_grants_total 0\n"), "{t}");
        assert!(t.contains("clubcast_vod_grants_total 1\n"), "{t}");
        assert!(t.contains("clubcast_vod_granted_bits_total 4000\n"), "{t}");
        assert!(t.contains("clubcast_vod_refused_total{code=\"over_grant\"} 1\n"));
        // Publishing keeps its zeros: a stream without a publisher is 0, not absent.
        m.set_publishing([("cam".to_owned(), false), ("demo".to_owned(), true)]);
        let t = m.render();
        assert!(
            t.contains("clubcast_stream_publishing{stream=\"cam\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("clubcast_stream_publishing{stream=\"demo\"} 1\n"),
            "{t}"
        );
        m.set_publishing([("demo".to_owned(), false)]);
        let t = m.render();
        assert!(!t.contains("stream=\"cam\""), "{t}");
        assert!(
            t.contains("clubcast_stream_publishing{stream=\"demo\"} 0\n"),
            "{t}"
        );
    }
}
