// Stats overlay: a small live chart of bytes from peers vs the origin, and the
// numbers a viewer (or a benchmark screenshot) wants at a glance.
//
//   import { attachOverlay } from "/overlay.js";
//   const overlay = attachOverlay(containerElement, player);  // player from clubcast.play
//   overlay.destroy();

const fmtBits = (bps) => {
  if (bps >= 1e6) return (bps / 1e6).toFixed(2) + " Mb/s";
  if (bps >= 1e3) return (bps / 1e3).toFixed(0) + " kb/s";
  return bps.toFixed(0) + " b/s";
};
const fmtMs = (ms) => (ms == null ? "–" : ms >= 10000 ? (ms / 1000).toFixed(1) + " s" : Math.round(ms) + " ms");

const fmtClock = (secs) => {
  const t = Math.max(0, Math.floor(secs || 0));
  return `${Math.floor(t / 60)}:${String(t % 60).padStart(2, "0")}`;
};

// An on-demand player (its stats have duration_s) shows where it is in the
// asset where a live one shows its latency.
const ROWS = [
  ["peers", (s) => s.peers],
  ["clubs", (s) => s.clubs],
  ["from peers", (s) => (100 * s.p2p_ratio).toFixed(1) + " %"],
  ["down", (s) => fmtBits(s.down_bps)],
  ["up", (s) => fmtBits(s.up_bps)],
  ["latency", (s) => fmtMs(s.latency_ms), (s) => s.duration_s === undefined],
  ["position", (s) => `${fmtClock(s.position_s)} / ${fmtClock(s.duration_s)}`, (s) => s.duration_s !== undefined],
  ["buffer", (s) => fmtMs(s.buffer_ms)],
  ["stalls", (s) => `${s.stalls} (${fmtMs(s.stall_ms)})`],
  ["startup", (s) => fmtMs(s.startup_ms)],
];

export function attachOverlay(container, player) {
  const root = document.createElement("div");
  root.className = "cc-overlay";
  const canvas = document.createElement("canvas");
  canvas.width = 240;
  canvas.height = 64;
  canvas.className = "cc-chart";
  canvas.setAttribute("aria-label", "bit rate from peers (green) and origin (orange)");
  const table = document.createElement("dl");
  const cells = ROWS.map(([label]) => {
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.dataset.stat = label;
    table.append(dt, dd);
    return dd;
  });
  const status = document.createElement("div");
  status.className = "cc-status";
  root.append(canvas, table, status);
  container.append(root);

  const draw = () => {
    const s = player.stats();
    ROWS.forEach(([, f, shown], i) => {
      const show = !shown || shown(s);
      cells[i].hidden = !show;
      cells[i].previousSibling.hidden = !show;
      if (show) cells[i].textContent = f(s);
    });
    chart(canvas, player.rates());
  };
  // Once the stream has ended, nothing later (its last stall) replaces that.
  let ended = false;
  const say = (text) => {
    if (!ended) status.textContent = text;
  };
  const offs = [
    player.on("stats", draw),
    player.on("error", (e) => {
      if (e.code === "stream_ended") {
        say("the stream has ended");
        ended = true;
        return;
      }
      say("error: " + e.message);
      status.classList.add("cc-error");
    }),
    player.on("reconnecting", (e) => say(`reconnecting (attempt ${e.attempt})…`)),
    player.on("joined", (e) => {
      if (e.rejoin) say("");
    }),
    // No publisher: the stream goes on where it stopped once one is back.
    player.on("publisher", (e) => say(e.connected ? "" : "publisher away")),
    player.on("stall", (e) => {
      say(e.reason === "publisher" ? "waiting for the publisher…" : "buffering…");
    }),
    player.on("resume", () => say("")),
    player.on("playing", () => say("")),
    // On demand: the manifest checked out, and the end of the asset.
    player.on("manifest", () => say("")),
    player.on("ended", () => say("ended")),
    player.on("seeked", () => say("")),
  ];
  say("connecting…");
  draw();
  return {
    element: root,
    destroy() {
      offs.forEach((off) => off());
      root.remove();
    },
  };
}

function chart(canvas, rates) {
  const ctx = canvas.getContext("2d");
  const { width: w, height: h } = canvas;
  ctx.clearRect(0, 0, w, h);
  if (rates.length < 2) return;
  const max = Math.max(1, ...rates.map((r) => Math.max(r.down_peers_bps + r.down_origin_bps, r.up_bps)));
  const n = rates.length;
  const x = (i) => (i / (n - 1)) * w;
  const y = (v) => h - (v / max) * (h - 2);
  const area = (top, bottom, color) => {
    ctx.beginPath();
    rates.forEach((r, i) => (i ? ctx.lineTo(x(i), y(top(r))) : ctx.moveTo(x(i), y(top(r)))));
    for (let i = n - 1; i >= 0; i--) ctx.lineTo(x(i), y(bottom(rates[i])));
    ctx.closePath();
    ctx.fillStyle = color;
    ctx.fill();
  };
  // Stacked: peers at the bottom, origin on top.
  area((r) => r.down_peers_bps, () => 0, "rgba(60, 200, 120, 0.8)");
  area((r) => r.down_peers_bps + r.down_origin_bps, (r) => r.down_peers_bps, "rgba(240, 150, 40, 0.8)");
  ctx.beginPath();
  rates.forEach((r, i) => (i ? ctx.lineTo(x(i), y(r.up_bps)) : ctx.moveTo(x(i), y(r.up_bps))));
  ctx.strokeStyle = "rgba(120, 170, 255, 0.9)";
  ctx.lineWidth = 1.5;
  ctx.stroke();
  ctx.fillStyle = "rgba(255,255,255,0.7)";
  ctx.font = "10px sans-serif";
  ctx.fillText((max / 1e6).toFixed(2) + " Mb/s", 2, 10);
}
