// <clubcast-player> custom element.
//
//   <script type="module" src="https://host/clubcast-player.js"></script>
//   <clubcast-player server="https://host" stream="<id>" stats muted></clubcast-player>
//   <clubcast-player vod="<asset name>"></clubcast-player>
//
// Attributes: stream (a live stream) or vod (an on-demand asset's name; then
// key pins the key it must be signed with, ahead-s how far past the playhead
// it fetches), server (defaults to the origin this script
// came from), upload-kbps (upload offered for relaying, kbit/s; without it the
// player measures its upload before it joins), upload-probe="off" (do not),
// stats (show the overlay), muted, controls (default on), autoplay-muted="off"
// (if the browser refuses to autoplay with sound, wait for the user instead of
// starting muted). When the browser's autoplay policy refused sound, the
// element shows an "Unmute" button; when it refused playback, a "Play" one.
// Property `.player` is the clubcast player (stats(), on(), destroy()).
// Changing `stream`, `vod`, `key`, `ahead-s`, `server` or `upload-kbps`
// restarts playback; removal destroys it. The player's events are dispatched
// on the element as CustomEvents (detail: the event's fields).
import { play } from "./clubcast.js";
import { attachOverlay } from "./overlay.js";

const STYLE = new URL("./style.css", import.meta.url).href;

class ClubcastPlayer extends HTMLElement {
  static get observedAttributes() {
    return ["stream", "vod", "key", "ahead-s", "server", "upload-kbps", "stats"];
  }

  constructor() {
    super();
    const shadow = this.attachShadow({ mode: "open" });
    const link = document.createElement("link");
    link.rel = "stylesheet";
    link.href = STYLE;
    this.frame = document.createElement("div");
    this.frame.className = "cc-frame";
    this.video = document.createElement("video");
    this.video.playsInline = true;
    this.video.autoplay = true;
    this.frame.append(this.video);
    shadow.append(link, this.frame);
    this.player = null;
    this.overlay = null;
    this.button = null;
  }

  connectedCallback() {
    this.video.muted = this.hasAttribute("muted");
    this.video.controls = this.getAttribute("controls") !== "false";
    this._restart();
  }

  disconnectedCallback() {
    this._stop();
  }

  attributeChangedCallback() {
    if (this.isConnected) this._restart();
  }

  _stop() {
    this._hideButton();
    this.overlay?.destroy();
    this.overlay = null;
    this.player?.destroy();
    this.player = null;
  }

  _restart() {
    this._stop();
    const stream = this.getAttribute("stream");
    const vod = this.getAttribute("vod");
    if (!stream && !vod) return;
    // Without a server attribute, play() uses the server this script came from.
    const opts = vod ? { vod } : { stream };
    if (vod && this.getAttribute("key")) opts.key = this.getAttribute("key");
    if (vod && this.getAttribute("ahead-s")) opts.ahead_s = this.getAttribute("ahead-s");
    const server = this.getAttribute("server");
    if (server) opts.server = server;
    const upload = this.getAttribute("upload-kbps");
    if (upload !== null) opts.upload_kbps = upload;
    // upload-probe="off": no upload probe before the join.
    if (this.getAttribute("upload-probe") === "off") opts.upload_probe = false;
    if (this.getAttribute("autoplay-muted") === "off") opts.autoplay_muted = false;
    this.player = play(this.video, opts);
    // The player's own mute fires a volumechange too: the button goes once unmuted.
    this.player.on("autoplay_muted", () =>
      this._showButton("🔇 Unmute", () => (this.video.muted = false), "volumechange", () => !this.video.muted),
    );
    this.player.on("autoplay_blocked", () =>
      this._showButton("▶ Play", () => this.video.play().catch(() => {}), "playing"),
    );
    const events = [
      "ready", "playing", "stall", "resume", "publisher", "error", "autoplay_muted", "autoplay_blocked",
      "manifest", "seeked", "ended",
    ];
    for (const type of events) {
      this.player.on(type, (detail) =>
        this.dispatchEvent(new CustomEvent(type, { detail, bubbles: true, composed: true })),
      );
    }
    if (this.hasAttribute("stats")) this.overlay = attachOverlay(this.frame, this.player);
  }

  /** Shows a button that runs `act` when clicked; it goes when clicked, or
   * when the video fires `until` and `settled()` holds (the user used the
   * controls instead). */
  _showButton(label, act, until, settled = () => true) {
    this._hideButton();
    const button = document.createElement("button");
    button.className = "cc-autoplay";
    button.textContent = label;
    button.addEventListener("click", () => {
      act();
      this._hideButton();
    });
    const done = () => settled() && this._hideButton();
    this.video.addEventListener(until, done);
    this.button = { element: button, until, done };
    this.frame.append(button);
  }

  _hideButton() {
    if (!this.button) return;
    this.video.removeEventListener(this.button.until, this.button.done);
    this.button.element.remove();
    this.button = null;
  }
}

if (!customElements.get("clubcast-player")) {
  customElements.define("clubcast-player", ClubcastPlayer);
}
export { ClubcastPlayer };
