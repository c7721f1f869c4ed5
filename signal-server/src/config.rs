//! Command-line options, each with a `CLUBCAST_*` environment fallback.
//!
//! [`Config`] is parsed once in `main` and shared read-only (`Arc<Config>`) by
//! every part of the server. Tests build one with [`Config::default`] (which is
//! what an empty command line gives, environment aside) and change fields.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clubcast_protocol::block::DEFAULT_BLOCK_KIB;
use clubcast_protocol::club::{ClubConfig, MAX_CLUBS};
use clubcast_protocol::signal::IceServer;

/// Most `--ice-server` entries; browsers slow down with long ICE server lists.
pub const MAX_ICE_SERVERS: usize = 8;
/// Largest `--vod-max-bytes`: 1 TiB.
pub const MAX_VOD_BYTES: u64 = 1 << 40;
/// Largest `--vod-budget-kbps`: 100 Gbit/s.
pub const MAX_VOD_BUDGET_KBPS: u64 = 100_000_000;
/// Default `--vod-budget-kbps`: 1 Gbit/s.
pub const DEFAULT_VOD_BUDGET_KBPS: u64 = 1_000_000;

/// Errors of option validation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// An option is outside its valid range.
    #[error("--{option}: {message}")]
    OutOfRange {
        /// The option, without dashes.
        option: &'static str,
        /// What is allowed.
        message: String,
    },
    /// An `--ice-server` value is not `URL[,USERNAME,CREDENTIAL]`.
    #[error("--ice-server {0:?}: expected URL or URL,USERNAME,CREDENTIAL with a stun:, stuns:, turn: or turns: URL")]
    BadIceServer(String),
    /// `--allow-test-corruption` needs a build with the `test-hooks` feature.
    #[error("--allow-test-corruption is refused: this build lacks the `test-hooks` cargo feature")]
    TestHooksMissing,
}

/// The WebRTC stack behind the seeder's links (`--seeder-rtc`).
///
/// `str0m` is the default: against one headless Chromium behind a relay dropping 10 % of
/// datagrams (`just bench-loss`, six runs of 60 s), twice as much of the stream came over its
/// link (0.25 of the bytes against 0.12) with less stall (7.8 s in the six minutes against
/// 11.1 s); at 5 % the two were close (0.72 against 0.65 of the bytes, 8.6 against 8.1 s of
/// stall), and at 0–2 % both carry nearly all of it. It also connects in milliseconds where
/// the `webrtc` crate takes 0.6 s (`examples/rtc_bench.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeederRtc {
    /// `str0m` (0.25), sans-IO on our own sockets: host candidates only.
    #[default]
    Str0m,
    /// The `webrtc` crate (0.21.1): full ICE, with STUN/TURN gathering.
    WebrtcRs,
}

/// clubcast server options.
#[derive(Debug, Clone, Parser)]
#[command(name = "clubcast-server", version, about)]
pub struct Config {
    /// Address to listen on for HTTP and WebSocket.
    #[arg(long, env = "CLUBCAST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory for persistent state: stream keys, and each stream's next
    /// block number, timeline end and init segment, so that streams resume
    /// after a restart.
    #[arg(long, env = "CLUBCAST_DATA_DIR", default_value = "./clubcast-data")]
    pub data_dir: PathBuf,

    /// Token publishers must present to ingest; generated and logged if absent.
    #[arg(long, env = "CLUBCAST_PUBLISH_TOKEN", hide_env_values = true)]
    pub publish_token: Option<String>,

    /// Clubs per stream (C); block `seq` belongs to club `seq mod C`.
    #[arg(long, env = "CLUBCAST_CLUBS", default_value_t = 8)]
    pub clubs: u16,

    /// Clubs each relaying peer joins (m).
    #[arg(long, env = "CLUBCAST_CLUBS_PER_PEER", default_value_t = 2)]
    pub clubs_per_peer: u16,

    /// Club members the seeder pushes each block to (k).
    #[arg(long, env = "CLUBCAST_SEEDS_PER_BLOCK", default_value_t = 2)]
    pub seeds_per_block: u8,

    /// Block payload size, KiB.
    #[arg(long, env = "CLUBCAST_BLOCK_KIB", default_value_t = DEFAULT_BLOCK_KIB as u32)]
    pub block_kib: u32,

    /// Seconds of blocks each stream keeps for the origin.
    #[arg(long, env = "CLUBCAST_STORE_SECONDS", default_value_t = 120)]
    pub store_seconds: u64,

    /// Origin gap-fill egress budget, kbit/s, shared by all peers of all streams.
    #[arg(long, env = "CLUBCAST_ORIGIN_BUDGET_KBPS", default_value_t = 100_000)]
    pub origin_budget_kbps: u64,

    /// On-demand egress budget, kbit/s, for the runs of blocks
    /// (`/vod/{name}/blocks`) of all assets: a ledger of its own, apart from
    /// the live gap-fill budget. On-demand viewers bid for it every
    /// `--bid-interval-ms` and send their grant token on their runs; requests
    /// without one share `--anonymous-budget-percent` of it. 0: on-demand
    /// runs are not metered (no grant token, bids refused).
    #[arg(long, env = "CLUBCAST_VOD_BUDGET_KBPS", default_value_t = DEFAULT_VOD_BUDGET_KBPS)]
    pub vod_budget_kbps: u64,

    /// Percent of the origin budget (live and on demand alike) kept for
    /// requests without a grant token (plain HTTP clients, caches); the rest
    /// is split among bids.
    #[arg(long, env = "CLUBCAST_ANONYMOUS_BUDGET_PERCENT", default_value_t = 25)]
    pub anonymous_budget_percent: u8,

    /// Seconds a stream waits for its publisher to come back: a stream with
    /// no publisher for this long ends. Its viewers are told (`stream_ended`),
    /// it leaves the list and its memory is freed; a later publish under its
    /// name starts it again, numbered on. 0: streams never end.
    #[arg(long, env = "CLUBCAST_PUBLISHER_WAIT_SECONDS", default_value_t = 600)]
    pub publisher_wait_seconds: u64,

    /// Length of a bid interval, ms.
    #[arg(long, env = "CLUBCAST_BID_INTERVAL_MS", default_value_t = 1000)]
    pub bid_interval_ms: u32,

    /// Live latency the player should hold behind the edge, ms.
    #[arg(long, env = "CLUBCAST_TARGET_LATENCY_MS", default_value_t = 1500)]
    pub target_latency_ms: u32,

    /// How often peers send heartbeats, ms; a peer silent for 3 intervals is dropped.
    #[arg(long, env = "CLUBCAST_HEARTBEAT_MS", default_value_t = 5000)]
    pub heartbeat_ms: u32,

    /// Directory of the web player (`index.html`, `watch.html`, `embed.html`, `pkg/`).
    #[arg(long, env = "CLUBCAST_STATIC_DIR", default_value = "web")]
    pub static_dir: PathBuf,

    /// Do not start the built-in demo stream.
    #[arg(long, env = "CLUBCAST_NO_DEMO")]
    pub no_demo: bool,

    /// Name of the built-in demo stream.
    #[arg(long, env = "CLUBCAST_DEMO_NAME", default_value = "demo")]
    pub demo_name: String,

    /// ICE server for browsers, `URL` or `URL,USERNAME,CREDENTIAL`; repeatable
    /// (`;`-separated in the environment). None by default: host candidates
    /// suffice on one machine or LAN.
    #[arg(
        long = "ice-server",
        env = "CLUBCAST_ICE_SERVERS",
        value_delimiter = ';'
    )]
    pub ice_servers: Vec<String>,

    /// Most peers in one stream's swarm; joins beyond it get `stream_full`.
    #[arg(long, env = "CLUBCAST_MAX_PEERS_PER_STREAM", default_value_t = 20_000)]
    pub max_peers_per_stream: usize,

    /// WebRTC stack of the server's seeder: `str0m` (host candidates only) or `webrtc-rs`
    /// (the `webrtc` crate, which also gathers through `--ice-server`: for a server behind a
    /// NAT). `bench/results/loss.md` compares the two under packet loss.
    #[arg(long, env = "CLUBCAST_SEEDER_RTC", value_enum, default_value_t = SeederRtc::Str0m)]
    pub seeder_rtc: SeederRtc,

    /// Address browsers reach the seeder's UDP sockets at, for a server behind a 1:1 NAT
    /// (a cloud VM whose interface has a private address and whose public one is mapped to
    /// it): each socket is announced at this IP and its own port, in place of its interface
    /// address. With `--seeder-rtc str0m`; `webrtc-rs` learns it through `--ice-server`.
    #[arg(long, env = "CLUBCAST_RTC_PUBLIC_IP")]
    pub rtc_public_ip: Option<IpAddr>,

    /// UDP ports the seeder's sockets take, `MIN-MAX`, for a firewall that opens only
    /// those: each link takes one per interface, so the range bounds the links (seeds)
    /// open at once. Default: ephemeral ports. With `--seeder-rtc str0m`.
    #[arg(long, env = "CLUBCAST_RTC_PORTS")]
    pub rtc_ports: Option<String>,

    /// Address to take RTMP publishers on, e.g. `0.0.0.0:1935` (OBS: server
    /// `rtmp://<host>:1935/live`, stream key `<name>?token=<TOKEN>`). Off when
    /// not given.
    #[arg(long, env = "CLUBCAST_RTMP_LISTEN")]
    pub rtmp_listen: Option<SocketAddr>,

    /// Most items in the public key-value store (`/kv`); a put for a new key
    /// and salt beyond it gets 507 `kv_full`. An item is at most about 1.2 KB.
    #[arg(long, env = "CLUBCAST_KV_MAX_ITEMS", default_value_t = 50_000)]
    pub kv_max_items: usize,

    /// Seconds a `/kv` item lives after its last put (BitTorrent's DHT keeps
    /// its items 2 hours; the writer puts the same item again to keep it).
    #[arg(long, env = "CLUBCAST_KV_TTL_SECONDS", default_value_t = 7200)]
    pub kv_ttl_seconds: u64,

    /// `/kv` puts a client address may make per second on average, with a
    /// burst of 5 seconds' worth (an IPv6 client counts as its /64); over it,
    /// 429 `rate_limited`. 0: no limit (behind a reverse proxy every client
    /// has the proxy's address: raise it or set 0 there).
    #[arg(long, env = "CLUBCAST_KV_PUT_RATE", default_value_t = 10)]
    pub kv_put_rate: u32,

    /// Largest on-demand upload (`PUT /vod/{name}`), bytes of file; a larger
    /// one gets 413 `too_large` and leaves nothing behind.
    #[arg(long, env = "CLUBCAST_VOD_MAX_BYTES", default_value_t = crate::vod::DEFAULT_MAX_BYTES)]
    pub vod_max_bytes: u64,

    /// Most on-demand assets stored under `<data dir>/vod/`; an upload of a
    /// new name beyond it gets 507 `vod_full` (replacing one goes on).
    #[arg(long, env = "CLUBCAST_VOD_MAX_ASSETS", default_value_t = crate::vod::DEFAULT_MAX_ASSETS)]
    pub vod_max_assets: usize,

    /// Path every route is served under, e.g. `/live`, for a reverse proxy
    /// that forwards `https://site/live/…` without stripping it. Empty (the
    /// default): the root. A proxy that strips the prefix needs none: the
    /// pages and the player use relative URLs either way.
    #[arg(long, env = "CLUBCAST_BASE_PATH", default_value = "")]
    pub base_path: String,

    /// Test only: let test peers corrupt blocks on purpose. Refused unless the
    /// server was built with the `test-hooks` cargo feature (not wired yet).
    #[arg(long, hide = true)]
    pub allow_test_corruption: bool,
}

impl Default for Config {
    fn default() -> Self {
        // Mirrors the clap defaults above without reading the environment, so
        // tests are not affected by a stray CLUBCAST_* variable; a unit test
        // checks the two agree.
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./clubcast-data"),
            publish_token: None,
            clubs: 8,
            clubs_per_peer: 2,
            seeds_per_block: 2,
            block_kib: DEFAULT_BLOCK_KIB as u32,
            store_seconds: 120,
            publisher_wait_seconds: 600,
            origin_budget_kbps: 100_000,
            vod_budget_kbps: DEFAULT_VOD_BUDGET_KBPS,
            anonymous_budget_percent: 25,
            bid_interval_ms: 1000,
            target_latency_ms: 1500,
            heartbeat_ms: 5000,
            static_dir: PathBuf::from("web"),
            no_demo: false,
            demo_name: "demo".into(),
            ice_servers: Vec::new(),
            max_peers_per_stream: 20_000,
            seeder_rtc: SeederRtc::Str0m,
            rtc_public_ip: None,
            rtc_ports: None,
            rtmp_listen: None,
            kv_max_items: 50_000,
            kv_ttl_seconds: 7200,
            kv_put_rate: 10,
            vod_max_bytes: crate::vod::DEFAULT_MAX_BYTES,
            vod_max_assets: crate::vod::DEFAULT_MAX_ASSETS,
            base_path: String::new(),
            allow_test_corruption: false,
        }
    }
}

impl Config {
    /// Checks ranges and cross-option rules; `main` refuses to start otherwise.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |option, ok: bool, message: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange {
                    option,
                    message: message.to_owned(),
                })
            }
        };
        range(
            "clubs",
            (1..=MAX_CLUBS).contains(&self.clubs),
            &format!("must be 1-{MAX_CLUBS}"),
        )?;
        range(
            "clubs-per-peer",
            (1..=self.clubs).contains(&self.clubs_per_peer),
            "must be 1 to --clubs",
        )?;
        range(
            "seeds-per-block",
            (1..=16).contains(&self.seeds_per_block),
            "must be 1-16",
        )?;
        range(
            "block-kib",
            (1..=60).contains(&self.block_kib),
            "must be 1-60 (a block must fit one 64 KiB data channel message)",
        )?;
        range("store-seconds", self.store_seconds >= 1, "must be ≥ 1")?;
        range(
            "kv-max-items",
            (1..=10_000_000).contains(&self.kv_max_items),
            "must be 1-10000000",
        )?;
        range(
            "kv-ttl-seconds",
            (1..=30 * 86_400).contains(&self.kv_ttl_seconds),
            "must be 1-2592000 (30 days)",
        )?;
        range(
            "kv-put-rate",
            self.kv_put_rate <= 100_000,
            "must be 0-100000 (0: no limit)",
        )?;
        range(
            "vod-max-bytes",
            (1..=MAX_VOD_BYTES).contains(&self.vod_max_bytes),
            "must be 1-1099511627776 (1 TiB)",
        )?;
        range(
            "vod-max-assets",
            (1..=1_000_000).contains(&self.vod_max_assets),
            "must be 1-1000000",
        )?;
        range(
            "vod-budget-kbps",
            self.vod_budget_kbps <= MAX_VOD_BUDGET_KBPS,
            "must be 0-100000000 (100 Gbit/s; 0: on-demand runs are not metered)",
        )?;
        range(
            "anonymous-budget-percent",
            self.anonymous_budget_percent <= 100,
            "must be 0-100",
        )?;
        range(
            "bid-interval-ms",
            (100..=60_000).contains(&self.bid_interval_ms),
            "must be 100-60000",
        )?;
        range(
            "heartbeat-ms",
            (500..=120_000).contains(&self.heartbeat_ms),
            "must be 500-120000",
        )?;
        range(
            "max-peers-per-stream",
            self.max_peers_per_stream >= 1,
            "must be ≥ 1",
        )?;
        range(
            "ice-server",
            self.ice_servers.len() <= MAX_ICE_SERVERS,
            &format!("at most {MAX_ICE_SERVERS}"),
        )?;
        self.ice_servers()?;
        range(
            "base-path",
            valid_base_path(&self.base_path),
            "must be empty or /-separated segments of A-Z, a-z, 0-9, '.', '_', '~' or '-' \
             (not '.' or '..'), starting with '/', e.g. /live",
        )?;
        range(
            "rtc-public-ip",
            self.rtc_public_ip.is_none_or(|ip| !ip.is_unspecified()),
            "must be an address, not 0.0.0.0 or ::",
        )?;
        self.rtc_ports()?;
        let str0m_only = self.rtc_public_ip.is_some() || self.rtc_ports.is_some();
        range(
            "seeder-rtc",
            !str0m_only || self.seeder_rtc == SeederRtc::Str0m,
            "--rtc-public-ip and --rtc-ports need str0m; webrtc-rs learns a NAT's public \
             address through --ice-server (STUN)",
        )?;
        if self.allow_test_corruption && !cfg!(feature = "test-hooks") {
            return Err(ConfigError::TestHooksMissing);
        }
        Ok(())
    }

    /// The club shape every stream's swarm uses. The seeder pushes to `k` seeds
    /// per block and keeps one spare seed per club to rotate through.
    pub fn club_config(&self) -> ClubConfig {
        ClubConfig {
            clubs: self.clubs,
            clubs_per_peer: self.clubs_per_peer,
            seeds_per_club: self.seeds_per_block.saturating_add(1),
            ..ClubConfig::default()
        }
        .normalized()
    }

    /// Block payload size, bytes.
    pub fn block_bytes(&self) -> usize {
        self.block_kib as usize * 1024
    }

    /// Heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.into())
    }

    /// How long a stream waits for its publisher before it ends; `None`:
    /// for ever.
    pub fn publisher_wait(&self) -> Option<Duration> {
        (self.publisher_wait_seconds > 0).then(|| Duration::from_secs(self.publisher_wait_seconds))
    }

    /// The bounds of the on-demand library.
    pub fn vod_limits(&self) -> crate::vod::VodLimits {
        crate::vod::VodLimits {
            max_bytes: self.vod_max_bytes,
            max_assets: self.vod_max_assets,
            block_bytes: self.block_bytes(),
        }
    }

    /// How long a `/kv` item lives after its last put.
    pub fn kv_ttl(&self) -> Duration {
        Duration::from_secs(self.kv_ttl_seconds)
    }

    /// Bid interval.
    pub fn bid_interval(&self) -> Duration {
        Duration::from_millis(self.bid_interval_ms.into())
    }

    /// One gap-fill grant unit: a whole block with its header and signature, bits.
    pub fn block_unit_bits(&self) -> u64 {
        (self.block_bytes() + clubcast_protocol::block::BLOCK_OVERHEAD) as u64 * 8
    }

    /// Gap-fill budget per bid interval, bits.
    pub fn budget_bits_per_interval(&self) -> u64 {
        self.origin_budget_kbps
            .saturating_mul(u64::from(self.bid_interval_ms))
    }

    /// On-demand budget per bid interval, bits; `None` when on-demand runs
    /// are not metered (`--vod-budget-kbps 0`).
    pub fn vod_budget_bits_per_interval(&self) -> Option<u64> {
        (self.vod_budget_kbps > 0).then(|| {
            self.vod_budget_kbps
                .saturating_mul(u64::from(self.bid_interval_ms))
        })
    }

    /// `--base-path` without a trailing `/`: empty for the root, else
    /// `/seg[/seg…]`.
    pub fn base_path(&self) -> &str {
        self.base_path.trim_end_matches('/')
    }

    /// `--rtc-ports` as `(min, max)`; `None` when not given.
    pub fn rtc_ports(&self) -> Result<Option<(u16, u16)>, ConfigError> {
        let Some(text) = &self.rtc_ports else {
            return Ok(None);
        };
        text.split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
            .filter(|&(min, max): &(u16, u16)| 0 < min && min <= max)
            .map(Some)
            .ok_or_else(|| ConfigError::OutOfRange {
                option: "rtc-ports",
                message: format!("{text:?}: must be MIN-MAX, 1 ≤ MIN ≤ MAX ≤ 65535"),
            })
    }

    /// The `--ice-server` values as sent in the welcome.
    pub fn ice_servers(&self) -> Result<Vec<IceServer>, ConfigError> {
        self.ice_servers
            .iter()
            .map(|s| parse_ice_server(s))
            .collect()
    }
}

/// Whether `path` is a usable `--base-path`: empty, `/`, or `/`-separated
/// segments of unreserved URL characters (one trailing `/` allowed).
fn valid_base_path(path: &str) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.is_empty() {
        return true;
    }
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    path.len() <= 256
        && rest.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
        })
}

fn parse_ice_server(s: &str) -> Result<IceServer, ConfigError> {
    let bad = || ConfigError::BadIceServer(s.to_owned());
    let mut parts = s.split(',');
    let url = parts.next().unwrap_or_default().trim();
    let scheme_ok = ["stun:", "stuns:", "turn:", "turns:"]
        .iter()
        .any(|p| url.starts_with(p));
    if !scheme_ok || url.len() <= 5 {
        return Err(bad());
    }
    let rest: Vec<&str> = parts.collect();
    let (username, credential) = match rest.as_slice() {
        [] => (None, None),
        [u, c] => (Some((*u).to_owned()), Some((*c).to_owned())),
        _ => return Err(bad()),
    };
    Ok(IceServer {
        urls: vec![url.to_owned()],
        username,
        credential,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_command_line_defaults() {
        let parsed = Config::try_parse_from(["clubcast-server"]).expect("parses");
        let d = Config::default();
        // Environment may override in CI; compare what is unlikely to be set.
        assert_eq!(parsed.clubs_per_peer, d.clubs_per_peer);
        assert_eq!(parsed.bid_interval_ms, d.bid_interval_ms);
        assert_eq!(parsed.heartbeat_ms, d.heartbeat_ms);
        assert_eq!(parsed.vod_max_bytes, d.vod_max_bytes);
        assert_eq!(parsed.vod_max_assets, d.vod_max_assets);
        assert_eq!(parsed.vod_budget_kbps, d.vod_budget_kbps);
        assert!(d.validate().is_ok());
        let webrtc = Config::try_parse_from(["clubcast-server", "--seeder-rtc", "webrtc-rs"])
            .expect("parses");
        assert_eq!(webrtc.seeder_rtc, SeederRtc::WebrtcRs);
        assert!(Config::try_parse_from(["clubcast-server", "--seeder-rtc", "quic"]).is_err());
    }

    #[test]
    fn vod_limits_parse_and_are_checked() {
        let c = Config::try_parse_from([
            "clubcast-server",
            "--vod-max-bytes",
            "1048576",
            "--vod-max-assets",
            "3",
        ])
        .expect("parses");
        assert!(c.validate().is_ok());
        let limits = c.vod_limits();
        assert_eq!((limits.max_bytes, limits.max_assets), (1 << 20, 3));
        assert_eq!(limits.block_bytes, c.block_bytes());
        for bad in [
            Config {
                vod_max_bytes: 0,
                ..Config::default()
            },
            Config {
                vod_max_bytes: MAX_VOD_BYTES + 1,
                ..Config::default()
            },
            Config {
                vod_max_assets: 0,
                ..Config::default()
            },
        ] {
            let err = bad.validate().expect_err("out of range").to_string();
            assert!(err.starts_with("--vod-max-"), "{err}");
        }
    }

    #[test]
    fn the_vod_budget_parses_is_checked_and_0_turns_metering_off() {
        let d = Config::default();
        assert_eq!(d.vod_budget_kbps, DEFAULT_VOD_BUDGET_KBPS);
        // 1 Gbit/s over 1-s intervals.
        assert_eq!(d.vod_budget_bits_per_interval(), Some(1_000_000_000));
        let c = Config::try_parse_from([
            "clubcast-server",
            "--vod-budget-kbps",
            "2000",
            "--bid-interval-ms",
            "250",
        ])
        .expect("parses");
        assert!(c.validate().is_ok());
        assert_eq!(c.vod_budget_kbps, 2000);
        assert_eq!(c.vod_budget_bits_per_interval(), Some(500_000));
        let off =
            Config::try_parse_from(["clubcast-server", "--vod-budget-kbps", "0"]).expect("parses");
        assert!(off.validate().is_ok());
        assert_eq!(off.vod_budget_bits_per_interval(), None);
        let top = Config {
            vod_budget_kbps: MAX_VOD_BUDGET_KBPS,
            ..Config::default()
        };
        assert!(top.validate().is_ok());
        let over = Config {
            vod_budget_kbps: MAX_VOD_BUDGET_KBPS + 1,
            ..Config::default()
        };
        let err = over.validate().expect_err("out of range").to_string();
        assert!(err.starts_with("--vod-budget-kbps"), "{err}");
        assert!(
            Config::try_parse_from(["clubcast-server", "--vod-budget-kbps", "-1"]).is_err(),
            "not a u64"
        );
    }

    #[test]
    fn base_paths_are_checked_and_lose_their_trailing_slash() {
        let with = |p: &str| Config {
            base_path: p.into(),
            ..Config::default()
        };
        for (ok, norm) in [
            ("", ""),
            ("/", ""),
            ("/live", "/live"),
            ("/live/", "/live"),
            ("/a/b-c_d.e~f", "/a/b-c_d.e~f"),
        ] {
            assert!(with(ok).validate().is_ok(), "{ok:?}");
            assert_eq!(with(ok).base_path(), norm);
        }
        for bad in [
            "live", "//", "/a//b", "/a/../b", "/.", "/a b", "/a?b", "/%2e", "/live//",
        ] {
            assert!(
                matches!(
                    with(bad).validate(),
                    Err(ConfigError::OutOfRange {
                        option: "base-path",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ice_servers_parse_and_bad_ones_are_refused() {
        let c = Config::try_parse_from([
            "clubcast-server",
            "--ice-server",
            "stun:stun.example.org:3478",
            "--ice-server",
            "turn:turn.example.org:3478,alice,secret",
        ])
        .expect("parses");
        let ice = c.ice_servers().expect("valid");
        assert_eq!(ice.len(), 2);
        assert_eq!(ice[1].username.as_deref(), Some("alice"));
        let bad = Config {
            ice_servers: vec!["http://x".into()],
            ..Config::default()
        };
        assert!(matches!(bad.validate(), Err(ConfigError::BadIceServer(_))));
        let hooks = Config {
            allow_test_corruption: true,
            ..Config::default()
        };
        if cfg!(feature = "test-hooks") {
            assert!(hooks.validate().is_ok());
        } else {
            assert!(matches!(
                hooks.validate(),
                Err(ConfigError::TestHooksMissing)
            ));
        }
    }

    #[test]
    fn nat_options_parse_and_need_str0m() {
        let c = Config::try_parse_from([
            "clubcast-server",
            "--rtc-public-ip",
            "203.0.113.5",
            "--rtc-ports",
            "40000-40999",
        ])
        .expect("parses");
        assert!(c.validate().is_ok());
        assert_eq!(c.rtc_ports().expect("valid"), Some((40_000, 40_999)));
        assert_eq!(Config::default().rtc_ports().expect("valid"), None);
        for bad in ["40999-40000", "0-10", "40000", "a-b", "1-65536", ""] {
            let c = Config {
                rtc_ports: Some(bad.into()),
                ..Config::default()
            };
            assert!(c.validate().is_err(), "{bad:?}");
        }
        let unspecified = Config {
            rtc_public_ip: Some("0.0.0.0".parse().expect("ip")),
            ..Config::default()
        };
        assert!(unspecified.validate().is_err());
        let webrtc_rs = Config {
            seeder_rtc: SeederRtc::WebrtcRs,
            ..c
        };
        let err = webrtc_rs.validate().expect_err("str0m only").to_string();
        assert!(err.contains("--seeder-rtc"), "{err}");
    }
}
