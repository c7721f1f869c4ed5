// clubcast JS API: plays a clubcast stream, or an on-demand asset, in a <video> element.
//
//   import { play } from "/clubcast.js";
//   const player = play(document.querySelector("video"), { stream: "<id>" });
//   // or, on demand (an asset uploaded with PUT /vod/<name>; listed by GET /vod):
//   const player = play(document.querySelector("video"), { vod: "<name>" });
//   player.on("playing", () => console.log("first frame"));
//   setInterval(() => console.log(player.stats()), 1000);
//   player.destroy();
//
// `play` returns at once; the wasm peer loads in the background. Events:
//   "ready"   the peer is running                       ({})
//   "playing" first frame shown                         ({startup_ms})
//   "stall" / "resume"  playback stopped / went on     ({current_time, reason} /
//                       {stall_ms, reason}); reason "buffer" is a rebuffer,
//                       "publisher" a wait at the live edge while no publisher
//                       is connected (not counted in stalls / stall_ms)
//   "publisher" a publisher connected or left         ({connected}); sent when it
//                       changes, and at the start if none is connected
//   "stats"   a stats sample, once per second           (same object as stats())
//   "error"   something failed                          ({message, code?}); codes
//                       include "signal_failed", "bad_stream", "media",
//                       "stream_restarted" (its numbering began again: reload),
//                       "stream_ended" (its publisher stayed away longer than
//                       the server waits: the session is over),
//                       "unknown_stream" and "no_mse" (the browser has neither
//                       MediaSource nor ManagedMediaSource: it cannot play)
//   "reconnecting"  signaling dropped; playing on, retry ({code, reason, attempt, in_ms})
//   "joined"  the server admitted the peer              ({peer_id, clubs, rejoin, ...})
//   "autoplay_muted"   the browser refused to start with sound (its autoplay
//                       policy, before any user gesture): the player muted the
//                       element and started; unmute on a user gesture ({})
//   "autoplay_blocked" the browser refused to start playback at all (or
//                       autoplay_muted: false): it starts when the user presses
//                       play, or at the player's next try after any gesture ({})
//   "skip"    blocks passed over                        ({from, to}: seqs): missing
//                       past their deadline, or gone at a rejoin (a restarted
//                       server, or away longer than the server keeps blocks)
//   any other event the wasm peer emits, by its `type`
//
// On demand ({vod: "<name>"}), the events are "ready", "playing" ({startup_ms}),
// "stall" / "resume" (reason "buffer"), "autoplay_muted", "autoplay_blocked",
// "stats", and:
//   "manifest" the asset's signed manifest checked out  ({name, key, duration_s,
//                       blocks, bytes, fragments})
//   "seeked"  a seek landed                             ({current_time})
//   "ended"   playback reached the end of the asset     ({current_time})
//   "retry"   a fetch failed and is tried again          ({what, attempt, in_ms, message})
//   "gap"     the playhead jumped a hole in the buffer   ({from, to})
//   "p2p_joined" the server introduced this viewer to others of the same upload
//                       ({peer_id, neighbours})
//   "source"  the switch-over: "swarm" when the swarm alone keeps up and the
//                       HTTP transfer stops (the origin then only fills blocks
//                       about to be due), "http" when it falls back
//                       ({mode, reason, swarm_bytes, http_bytes, current_time};
//                       reasons "swarm_keeps_up", "no_peers", "backstop")
//   "peer_dropped" a neighbour sent a frame that does not parse or a block
//                       that does not verify: closed and reported ({peer, reason})
//   "p2p_error" the swarm side ended (the origin goes on) ({code, message})
//   "error"   something failed; fetching stops, what is buffered still plays
//                       ({message, code}); codes: "bad_options", "unknown_asset"
//                       (404), "asset_replaced" (uploaded again while it
//                       played: its blocks are another upload's), "wrong_key" (the asset is not signed by the
//                       pinned key), "bad_manifest", "bad_signature" (of the
//                       manifest), "bad_init", "bad_block" (a block fails its
//                       signature or is not the one asked for: never played),
//                       "network" (a fetch failed 7 times in a row), "http"
//                       (another 4xx), "no_mse", "mse", "media"
//
// ---------------------------------------------------------------------------
// Interface this file expects from the wasm package (web/pkg/clubcast_peer.js,
// built from peer-wasm/ by `just build-web`):
//
//   export default function init(): Promise<void>     // wasm-bindgen --target web
//   export class WasmPlayer {
//     constructor(video: HTMLMediaElement, optsJson: string);   // throws on bad options
//     stats(): object | string;   // a plain object (or its JSON) with the fields of
//                                 // STAT_FIELDS below; counters are totals since start
//     on(cb: (event: {type: string, ...}) => void): void;     // one callback, all events
//     destroy(): void;            // closes links, socket, MSE; idempotent
//   }
//   export class VodPlayer { ... }  // the same shape, for on-demand assets;
//                                   // its stats add VOD_STAT_FIELDS
//
// optsJson is JSON.stringify of:
//   { server: "http://host:port",   // HTTP base; signaling is <server>/ws
//                                   // (play() defaults it to where this script came from)
//     stream: "<stream id>",        // base32/hex of the stream's ed25519 key
//     target_latency_ms: 1500,      // live latency the player steers toward
//     ice_servers: [{urls: ["stun:…"], username?, credential?}],
//     upload_kbps?: 3000,           // upload offered for relaying; under the
//                                   // stream's bitrate the viewer only receives;
//                                   // unset: the player measures it (upload
//                                   // probe, up to 500 ms before the join)
//     upload_probe?: true,          // false: no probe; unset upload is then
//                                   // planned at the cap until bids correct it
//     autoplay_muted?: true,        // false: if autoplay with sound is refused,
//                                   // wait for the user, do not start muted
//     p2p?: true }                  // false: everything from the origin
// or, for VodPlayer:
//   { server: "http://host:port",   // HTTP base; the asset is <server>/vod/<name>/…
//     vod: "<name>",                // the asset's name ([a-z0-9_-]{1,64})
//     key?: "<stream id>",          // the key the asset must be signed with
//                                   // (else error "wrong_key"); unset: the
//                                   // manifest's own key, which the server chose
//     ahead_s?: 30,                 // how far past the playhead to fetch (1 to 600 s)
//     ice_servers?: [...],          // as for live
//     p2p?: true,                   // false: every block from the origin
//     autoplay_muted?: true }       // as for live
// Unknown fields must be ignored, so options can grow on either side.
// ---------------------------------------------------------------------------

/** Stats fields, named as in the simulator, server metrics and benchmarks. */
export const STAT_FIELDS = [
  "bytes_from_peers", // payload bytes received over data channels
  "bytes_from_origin", // payload bytes fetched from the origin (gap fill, init)
  "bytes_uploaded", // payload bytes sent to other peers
  "peers", // open peer links
  "clubs", // clubs this peer belongs to
  "latency_ms", // glass to glass: wall clock minus capture time of the frame shown
  "edge_latency_ms", // how far the frame shown is behind the live edge (steered to the target)
  "buffer_ms", // media buffered ahead of the playhead
  "stalls", // rebuffering events
  "stall_ms", // total rebuffering time
  "publisher_wait_ms", // total time stalled at the live edge while no publisher was connected
  "publisher_connected", // whether a publisher is sending the stream, as the server last said
  "startup_ms", // player creation to first frame (null until then); see also startup_trace
];

/** Further stats of an on-demand player (bytes_from_peers, latency and
 * publisher fields are 0 or null there). */
export const VOD_STAT_FIELDS = [
  "position_s", // the playhead, seconds
  "duration_s", // the asset's duration, seconds (null until the manifest is in)
  "asset_bytes", // the asset's blocks, bytes (bytes_from_origin adds the init segment)
  "blocks_fetched", // blocks fetched and verified
  "seeks", // seeks by the viewer
  "refetches", // seeks that moved the fetch position (media not buffered)
  "blocks_from_peers", // blocks received from neighbours and verified
  "blocks_uploaded", // blocks sent to neighbours
  "mode", // "http" (the origin streams the near part) or "swarm" (the origin is the backstop)
  "switches", // switch-overs between the two
  "metered", // the origin meters runs: they carry this viewer's grant token
  "bids_sent", // bids for origin runs
  "grants", // grants received
  "bits_granted", // bits granted in all
  "origin_refused", // origin runs refused (429) for want of a grant
];

const HISTORY = 120; // seconds of rate samples kept for charts
/** The server this script came from: its directory, so `https://host/live`
 * for `https://host/live/clubcast.js` (a deployment under a path prefix). */
export const SCRIPT_BASE = new URL(".", import.meta.url).href.replace(/\/$/, "");

function zeroStats() {
  const s = {};
  for (const k of STAT_FIELDS) s[k] = 0;
  s.startup_ms = null;
  s.publisher_connected = true;
  return s;
}

class Player {
  constructor(video, opts) {
    this.video = video;
    this.opts = {
      // The server this script came from, which on another site is not the page's.
      server: SCRIPT_BASE,
      target_latency_ms: 1500,
      ice_servers: [],
      ...opts,
    };
    // Attributes and query strings give text: digits become a number, anything
    // else is passed on and refused by the player with an "error" event.
    const up = this.opts.upload_kbps;
    if (typeof up === "string" && /^\d+$/.test(up)) this.opts.upload_kbps = Number(up);
    const ahead = this.opts.ahead_s;
    if (typeof ahead === "string" && /^\d+(\.\d+)?$/.test(ahead)) this.opts.ahead_s = Number(ahead);
    this.handlers = new Map();
    this.wasm = null;
    this.destroyed = false;
    this.last = zeroStats();
    this.history = []; // [{t, down_peers_bps, down_origin_bps, up_bps}]
    this.prev = null;
    this.ticker = setInterval(() => this._tick(), 1000);
    this._start();
  }

  async _start() {
    try {
      // `vod` plays an on-demand asset, `stream` a live stream.
      const vod = Boolean(this.opts.vod);
      if (!vod && !this.opts.stream) throw new Error("no stream id given");
      const mod = await loadPeer();
      if (this.destroyed) return;
      const Class = vod ? mod.VodPlayer : mod.WasmPlayer;
      if (typeof Class !== "function") {
        throw new Error(`this build of clubcast_peer has no ${vod ? "VodPlayer" : "WasmPlayer"} export`);
      }
      this.wasm = new Class(this.video, JSON.stringify(this.opts));
      this.wasm.on((ev) => this._emit(ev && ev.type ? ev.type : "event", ev || {}));
      this._emit("ready", {});
    } catch (err) {
      const event = { message: String(err && err.message ? err.message : err) };
      if (err && typeof err.code === "string") event.code = err.code;
      this._emit("error", event);
    }
  }

  /** Latest stats: the STAT_FIELDS plus p2p_ratio and down/up rates in bit/s. */
  stats() {
    if (this.wasm) {
      try {
        const raw = this.wasm.stats();
        this.last = { ...zeroStats(), ...(typeof raw === "string" ? JSON.parse(raw) : raw) };
      } catch (_) {
        // keep the last good sample; a destroyed peer has nothing new
      }
    }
    const s = { ...this.last };
    const total = s.bytes_from_peers + s.bytes_from_origin;
    s.p2p_ratio = total > 0 ? s.bytes_from_peers / total : 0;
    const h = this.history[this.history.length - 1];
    s.down_bps = h ? h.down_peers_bps + h.down_origin_bps : 0;
    s.up_bps = h ? h.up_bps : 0;
    return s;
  }

  /** Rate samples of the last HISTORY seconds, oldest first. */
  rates() {
    return this.history.slice();
  }

  /** Subscribes `fn` to `event`; returns a function that unsubscribes. */
  on(event, fn) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event).add(fn);
    return () => this.handlers.get(event)?.delete(fn);
  }

  /** Stops playback and frees the peer. */
  destroy() {
    if (this.destroyed) return;
    this.destroyed = true;
    clearInterval(this.ticker);
    if (this.wasm) {
      try {
        this.wasm.destroy();
      } catch (_) {
        // already gone
      }
      if (typeof this.wasm.free === "function") this.wasm.free();
      this.wasm = null;
    }
    this.handlers.clear();
  }

  _tick() {
    const s = this.stats();
    const now = performance.now();
    if (this.prev) {
      const dt = (now - this.prev.t) / 1000;
      if (dt > 0) {
        this.history.push({
          t: now,
          down_peers_bps: (8 * (s.bytes_from_peers - this.prev.s.bytes_from_peers)) / dt,
          down_origin_bps: (8 * (s.bytes_from_origin - this.prev.s.bytes_from_origin)) / dt,
          up_bps: (8 * (s.bytes_uploaded - this.prev.s.bytes_uploaded)) / dt,
        });
        if (this.history.length > HISTORY) this.history.shift();
      }
    }
    this.prev = { t: now, s };
    this._emit("stats", this.stats());
  }

  _emit(type, detail) {
    for (const fn of this.handlers.get(type) || []) {
      try {
        fn(detail);
      } catch (err) {
        console.error("clubcast handler for", type, "threw", err);
      }
    }
  }
}

/** Starts playing `opts.stream` (live) or `opts.vod` (on demand) from
 * `opts.server` in `video`; returns the player. */
export function play(video, opts = {}) {
  return new Player(video, opts);
}

let peerModule = null;

/** The wasm peer, loaded and initialised once (a failed load is tried again). */
function loadPeer() {
  if (!peerModule) {
    peerModule = import(new URL("./pkg/clubcast_peer.js", import.meta.url).href).then(async (mod) => {
      await mod.default();
      return mod;
    });
    peerModule.catch(() => {
      peerModule = null;
    });
  }
  return peerModule;
}

/**
 * Private values through the server's public key-value store (`/kv`): a slot
 * two parties share, which only they can write or read (the server stores
 * what it can neither read nor alter).
 *
 *   const store = await kv();                   // loads the wasm peer
 *   const me = new store.KvSecret();            // or store.KvSecret.fromHex(kept)
 *   // give me.publicKey (64 hex digits) to the other party, by any channel
 *   const slot = me.shared(theirPublicKey);     // both sides get the same slot
 *   await store.put(slot.seal("stream-key", 1, new TextEncoder().encode("...")));
 *   const item = await store.get(slot.publicKey, { salt: "stream-key", after: 0, wait: 30 });
 *   const bytes = slot.open(item);              // Uint8Array
 *
 * - `slot.seal(salt, seq, bytes)`: the item's JSON; `seq` must grow with each
 *   put (0 to 2^53-1), `salt` names the value (≤ 64 bytes), bytes ≤ 960.
 * - `store.put(item, {ifMatch?: seq, ifNoneMatch?: true})`: the stored item's JSON.
 * - `store.get(key, {salt?, after?, wait?})`: the item's JSON, or null when
 *   there is none. With `wait` (seconds, ≤ 30), it answers as soon as an item
 *   with a seq above `after` is put, or at the end of the wait with what is
 *   stored (check its seq).
 * - `slot.open(item)`: the bytes, or throws.
 *
 * Every failure is an Error with a `code`: the server's (`seq_too_low`,
 * `cas_mismatch`, `kv_full`, `bad_signature`, `bad_item`, ...; with the HTTP
 * `status`) or the slot's (`wrong_key`, `bad_signature`, `not_sealed`,
 * `bad_key`, `bad_item`).
 */
export async function kv(server = SCRIPT_BASE) {
  const mod = await loadPeer();
  if (typeof mod.KvSecret !== "function") {
    throw new Error("this build of clubcast_peer has no KvSecret export");
  }
  const base = server.replace(/\/$/, "");
  const hex = (text) =>
    Array.from(new TextEncoder().encode(text), (b) => b.toString(16).padStart(2, "0")).join("");
  const answer = async (r) => {
    const text = await r.text();
    if (r.ok) return text;
    let body = {};
    try {
      body = JSON.parse(text);
    } catch (_) {
      // not JSON: a proxy's page, say
    }
    const err = new Error(`clubcast kv: ${body.message || `HTTP ${r.status}`}`);
    err.code = body.code || `http_${r.status}`;
    err.status = r.status;
    throw err;
  };
  return {
    KvSecret: mod.KvSecret,
    async put(item, opts = {}) {
      const text = typeof item === "string" ? item : JSON.stringify(item);
      const headers = { "content-type": "application/json" };
      if (opts.ifMatch !== undefined) headers["if-match"] = `"${opts.ifMatch}"`;
      if (opts.ifNoneMatch) headers["if-none-match"] = "*";
      const key = encodeURIComponent(JSON.parse(text).key);
      return answer(await fetch(`${base}/kv/${key}`, { method: "PUT", headers, body: text }));
    },
    async get(key, opts = {}) {
      const q = new URLSearchParams();
      if (opts.salt) q.set("salt", hex(opts.salt));
      if (opts.after !== undefined) q.set("after", String(opts.after));
      const headers = opts.wait ? { prefer: `wait=${opts.wait}` } : {};
      const r = await fetch(`${base}/kv/${encodeURIComponent(key)}?${q}`, { headers, cache: "no-store" });
      if (r.status === 404) return null;
      return answer(r);
    },
  };
}

export const clubcast = { play, kv, STAT_FIELDS, VOD_STAT_FIELDS };
export default clubcast;
