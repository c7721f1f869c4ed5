#!/usr/bin/env bash
# `just bench-vod`: on-demand uploads and block runs. Writes bench/results/vod.md and vod.json.
#
# 1. Upload: one fragmented MP4 file (made here by ffmpeg) is PUT to the release server
#    BENCH_UPLOADS times (`?replace=true`), timed by curl, with the server's CPU seconds;
#    beside it, in the same run, the same file copied to the same disk (`cp` + `sync`),
#    the floor any upload that stores the file pays.
# 2. Runs: `GET /vod/bench/blocks?from=S&count=64` rotating over the asset, against nginx
#    serving the same bytes as static files (one file per run), by wrk, in the order
#    clubcast, nginx, nginx, clubcast. The server runs with on-demand metering off
#    (--vod-budget-kbps 0): this is raw serving, not the grant ledger.
# Knobs (environment): BENCH_VOD_SECONDS (120 s of media)  BENCH_VOD_KBPS (4000)
#   BENCH_UPLOADS (3)  BENCH_WRK_SECS (15)  BENCH_WRK_CONNS (64)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
TARGET="${CARGO_TARGET_DIR:-target}"
OUT="${ROOT}/bench/results"
MEDIA_SECS="${BENCH_VOD_SECONDS:-120}"
KBPS="${BENCH_VOD_KBPS:-4000}"
UPLOADS="${BENCH_UPLOADS:-3}"
WRK_SECS="${BENCH_WRK_SECS:-15}"
WRK_CONNS="${BENCH_WRK_CONNS:-64}"
RUN=64
PORT=18191
NGINX_PORT=18192
TOKEN=bench

log() { echo "bench-vod: $*" >&2; }

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v jq >/dev/null || missing+=(jq)
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian's packages"
    SUDO=""
    [[ "$(id -u)" == 0 ]] || SUDO="sudo"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${missing[@]}"
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

log "building (release)"
cargo build --release -p clubcast-server --bin clubcast-server
SERVER="${TARGET}/release/clubcast-server"

WORK="$(mktemp -d)"
chmod 755 "${WORK}"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "${WORK}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

proc_cpu() { # utime + stime ticks of a pid and its children (nginx's workers)
    local total=0 p
    for p in "$1" $(pgrep -P "$1" || true); do
        total=$((total + $(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/${p}/stat")))
    done
    echo "${total}"
}
TCK="$(getconf CLK_TCK)"

log "making ${MEDIA_SECS} s of ${KBPS} kbit/s H.264 + AAC, 2-s fragments"
ffmpeg -loglevel error -f lavfi -i "testsrc2=size=1280x720:rate=30" \
    -f lavfi -i "sine=frequency=440:sample_rate=48000" -t "${MEDIA_SECS}" \
    -c:v libx264 -preset ultrafast -b:v "${KBPS}k" -maxrate "${KBPS}k" -bufsize "$((2 * KBPS))k" -g 60 \
    -c:a aac -b:a 128k -movflags frag_keyframe+empty_moov+default_base_moof -f mp4 "${WORK}/in.mp4"
FILE_BYTES="$(stat -c %s "${WORK}/in.mp4")"

mkdir -p "${WORK}/data" "${WORK}/static"
# --vod-budget-kbps 0: this measures unmetered on-demand serving. wrk's anonymous runs ask
# far more than any budget allows, and metered they would mostly be 429s from the grant
# ledger, not served blocks.
"${SERVER}" --listen "127.0.0.1:${PORT}" --data-dir "${WORK}/data" --static-dir "${WORK}/static" \
    --publish-token "${TOKEN}" --no-demo --vod-budget-kbps 0 >"${WORK}/server.log" 2>&1 &
SERVER_PID=$!
PIDS+=("${SERVER_PID}")
for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:${PORT}/healthz" 2>/dev/null && break
    sleep 0.1
done

# --- 1. uploads ------------------------------------------------------------------------
LOAD_UPLOAD="$(cut -d' ' -f1-3 /proc/loadavg)"
: >"${WORK}/uploads.jsonl"
for i in $(seq 1 "${UPLOADS}"); do
    # The baseline first in each round: the file copied to the same disk, synced.
    sync
    t0="$(date +%s.%N)"
    cp "${WORK}/in.mp4" "${WORK}/copy.mp4"
    sync
    t1="$(date +%s.%N)"
    rm -f "${WORK}/copy.mp4"
    c0="$(proc_cpu "${SERVER_PID}")"
    secs="$(curl -fsS -o "${WORK}/upload.json" -w '%{time_total}' -T "${WORK}/in.mp4" \
        -H "Authorization: Bearer ${TOKEN}" "http://127.0.0.1:${PORT}/vod/bench?replace=true")"
    sync
    c1="$(proc_cpu "${SERVER_PID}")"
    jq -c --argjson secs "${secs}" --argjson cp "$(awk -v a="${t0}" -v b="${t1}" 'BEGIN { print b - a }')" \
        --argjson cpu "$(((c1 - c0)))" --argjson tck "${TCK}" \
        '{upload_s: $secs, copy_s: $cp, server_cpu_s: ($cpu / $tck), blocks, bytes}' \
        "${WORK}/upload.json" >>"${WORK}/uploads.jsonl"
done
BLOCKS="$(jq -r .blocks "${WORK}/upload.json")"

# --- 2. runs against nginx -------------------------------------------------------------
LOAD_RUNS="$(cut -d' ' -f1-3 /proc/loadavg)"
RUNS=$(((BLOCKS + RUN - 1) / RUN))
WWW="${WORK}/www/vod/bench/runs"
mkdir -p "${WWW}"
for r in $(seq 0 $((RUNS - 1))); do
    curl -fsS -o "${WWW}/$((r * RUN))" "http://127.0.0.1:${PORT}/vod/bench/blocks?from=$((r * RUN))&count=${RUN}"
done
chmod -R a+rX "${WORK}/www"
RUN_BYTES="$(cat "${WWW}"/* | wc -c)"
mkdir -p "${WORK}/nginx"
cat >"${WORK}/nginx/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid ${WORK}/nginx/nginx.pid;
error_log ${WORK}/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path ${WORK}/nginx/body;
    proxy_temp_path ${WORK}/nginx/proxy;
    fastcgi_temp_path ${WORK}/nginx/fastcgi;
    uwsgi_temp_path ${WORK}/nginx/uwsgi;
    scgi_temp_path ${WORK}/nginx/scgi;
    server { listen 127.0.0.1:${NGINX_PORT}; root ${WORK}/www; location / { } }
}
EOF
"${NGINX}" -p "${WORK}/nginx" -c "${WORK}/nginx/nginx.conf" 2>"${WORK}/nginx/stderr.log" &
NGINX_PID=$!
PIDS+=("${NGINX_PID}")
for _ in $(seq 1 50); do
    curl -fsS -o /dev/null "http://127.0.0.1:${NGINX_PORT}/vod/bench/runs/0" 2>/dev/null && break
    sleep 0.1
done
cmp <(curl -fsS "http://127.0.0.1:${NGINX_PORT}/vod/bench/runs/${RUN}") \
    <(curl -fsS "http://127.0.0.1:${PORT}/vod/bench/blocks?from=${RUN}&count=${RUN}")

# One Lua script for both: the path differs, the rotation and the JSON line do not.
cat >"${WORK}/rotate.lua" <<'EOF'
local runs, step, kind, i
init = function(args)
    runs, step, kind = tonumber(args[1]), tonumber(args[2]), args[3]
    i = math.random(0, runs - 1)
end
request = function()
    i = (i + 1) % runs
    if kind == "nginx" then
        return wrk.format("GET", "/vod/bench/runs/" .. (i * step))
    end
    return wrk.format("GET", "/vod/bench/blocks?from=" .. (i * step) .. "&count=" .. step)
end
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        '{"requests":%d,"bytes":%d,"duration_us":%d,"non_2xx_3xx":%d,"socket_errors":%d,"latency_p50_us":%d,"latency_p99_us":%d}\n',
        summary.requests, summary.bytes, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
        latency:percentile(50), latency:percentile(99)))
end
EOF
run_wrk() { # NAME PORT PID ROUND
    local name="$1" port="$2" pid="$3" round="$4" c0 c1
    wrk -t2 -c"${WRK_CONNS}" -d3s -s "${WORK}/rotate.lua" "http://127.0.0.1:${port}" \
        -- "${RUNS}" "${RUN}" "${name}" >/dev/null
    c0="$(proc_cpu "${pid}")"
    wrk -t2 -c"${WRK_CONNS}" -d"${WRK_SECS}s" -s "${WORK}/rotate.lua" "http://127.0.0.1:${port}" \
        -- "${RUNS}" "${RUN}" "${name}" >"${WORK}/wrk-${name}-${round}.txt"
    c1="$(proc_cpu "${pid}")"
    tail -n 1 "${WORK}/wrk-${name}-${round}.txt" |
        jq -c --argjson cpu "$(((c1 - c0)))" --argjson tck "${TCK}" \
            '. + {server_cpu_s: ($cpu / $tck)}' >"${WORK}/wrk-${name}-${round}.json"
}
log "runs: wrk ${WRK_SECS} s x ${WRK_CONNS} connections, ${RUNS} runs of ${RUN} blocks"
run_wrk clubcast "${PORT}" "${SERVER_PID}" 1
run_wrk nginx "${NGINX_PORT}" "${NGINX_PID}" 1
run_wrk nginx "${NGINX_PORT}" "${NGINX_PID}" 2
run_wrk clubcast "${PORT}" "${SERVER_PID}" 2
curl -fsS "http://127.0.0.1:${PORT}/metrics" | grep '^clubcast_vod' >"${WORK}/metrics.txt" || true

# --- results ---------------------------------------------------------------------------
mkdir -p "${OUT}"
COMMIT="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- signal-server protocol || echo '+dirty')"
DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" COMMIT="${COMMIT}" NPROC="$(nproc)" \
    CPU_MODEL="$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)" \
    FILE_BYTES="${FILE_BYTES}" MEDIA_SECS="${MEDIA_SECS}" KBPS="${KBPS}" RUN="${RUN}" RUNS="${RUNS}" \
    RUN_BYTES="${RUN_BYTES}" WRK_SECS="${WRK_SECS}" WRK_CONNS="${WRK_CONNS}" \
    LOAD_UPLOAD="${LOAD_UPLOAD}" LOAD_RUNS="${LOAD_RUNS}" \
    python3 - "${WORK}" "${OUT}" <<'EOF'
import json, os, sys
env = os.environ
work, out = sys.argv[1], sys.argv[2]
ups = [json.loads(l) for l in open(f"{work}/uploads.jsonl")]
file_bytes, media_secs = int(env["FILE_BYTES"]), int(env["MEDIA_SECS"])
def mbps(b, s): return round(b / s / 1e6, 1)
uploads = [{
    "upload_s": round(u["upload_s"], 3), "copy_s": round(u["copy_s"], 3),
    "upload_mb_per_s": mbps(file_bytes, u["upload_s"]), "copy_mb_per_s": mbps(file_bytes, u["copy_s"]),
    "server_cpu_s": round(u["server_cpu_s"], 2), "x_realtime": round(media_secs / u["upload_s"], 1),
} for u in ups]
rounds = {(n, k): json.load(open(f"{work}/wrk-{n}-{k}.json")) for n in ("clubcast", "nginx") for k in (1, 2)}
run_bytes, runs = int(env["RUN_BYTES"]), int(env["RUNS"])
mean_run = run_bytes / runs
def serve(rs):
    secs = sum(r["duration_us"] for r in rs) / 1e6
    reqs = sum(r["requests"] for r in rs)
    cpu = sum(r["server_cpu_s"] for r in rs)
    return {
        "req_per_s": round(reqs / secs), "gbit_per_s": round(reqs * mean_run * 8 / secs / 1e9, 2),
        "latency_ms": {"p50": max(r["latency_p50_us"] for r in rs) / 1000, "p99": max(r["latency_p99_us"] for r in rs) / 1000},
        "server_cpu_s": round(cpu, 2), "req_per_cpu_s": round(reqs / cpu) if cpu else None,
        "errors": sum(r["non_2xx_3xx"] + r["socket_errors"] for r in rs),
    }
o = {n: serve([rounds[(n, 1)], rounds[(n, 2)]]) for n in ("clubcast", "nginx")}
for n in o:
    o[n]["rounds"] = [serve([rounds[(n, k)]]) for k in (1, 2)]
ratio = round(o["clubcast"]["req_per_s"] / o["nginx"]["req_per_s"], 2)
result = {
    "date": env["DATE"], "commit": env["COMMIT"], "command": "just bench-vod",
    "machine": {"nproc": int(env["NPROC"]), "cpu_model": env["CPU_MODEL"]},
    "loadavg_before": {"uploads": env["LOAD_UPLOAD"], "runs": env["LOAD_RUNS"]},
    "file": {"bytes": file_bytes, "media_s": media_secs, "video_kbps": int(env["KBPS"])},
    "uploads": uploads,
    "runs": {"blocks_per_run": int(env["RUN"]), "runs": runs, "mean_run_bytes": round(mean_run),
             "wrk": {"threads": 2, "connections": int(env["WRK_CONNS"]), "seconds_per_round": int(env["WRK_SECS"]),
                     "order": "clubcast, nginx, nginx, clubcast"},
             "clubcast": o["clubcast"], "nginx": o["nginx"], "ratio": ratio},
    "metrics": open(f"{work}/metrics.txt").read().splitlines(),
}
json.dump(result, open(f"{out}/vod.json", "w"), indent=2)
open(f"{out}/vod.json", "a").write("\n")
best = min(uploads, key=lambda u: u["upload_s"])
lines = [
    "# On-demand figures",
    "",
    f"Written by `just bench-vod` ({env['DATE']}, commit {env['COMMIT']}, {env['NPROC']} cores, {env['CPU_MODEL']}). "
    f"One run; the load generators share the cores with the server (load average before the uploads {env['LOAD_UPLOAD']}, "
    f"before the runs {env['LOAD_RUNS']}). Release build, started directly. Machine-readable: `vod.json`.",
    "",
    f"## Uploads: `PUT /vod/bench?replace=true` against copying the file, same run",
    "",
    f"The file: {media_secs} s of 1280x720 H.264 at {env['KBPS']} kbit/s plus AAC, 2-s fragments, "
    f"{file_bytes / 1e6:.1f} MB, made by ffmpeg in the run. Each round copies it to the same disk (`cp` + `sync`) and then "
    f"uploads it with curl over loopback (the server splits it, cuts and signs each 4-KiB block, hashes the init, and writes "
    f"`blocks.bin` before it answers; `sync` after). Server CPU is its utime + stime over the upload.",
    "",
    "| round | upload s | upload MB/s | × real time | server CPU s | copy s | copy MB/s |",
    "|---|---|---|---|---|---|---|",
]
for i, u in enumerate(uploads, 1):
    lines.append(f"| {i} | {u['upload_s']} | {u['upload_mb_per_s']} | {u['x_realtime']} | {u['server_cpu_s']} | {u['copy_s']} | {u['copy_mb_per_s']} |")
lines += [
    "",
    f"Fastest upload: **{best['upload_mb_per_s']} MB/s**, {best['x_realtime']}× the media's real time.",
    "",
    f"## Runs: `GET /vod/bench/blocks?from=S&count={env['RUN']}` against nginx, same bytes",
    "",
    f"The asset's {runs} runs of {env['RUN']} blocks (mean {mean_run / 1024:.0f} KiB) are fetched from clubcast and written "
    f"as files that nginx (`sendfile on`, `worker_processes auto`, access log off) serves. `wrk -t2 -c{env['WRK_CONNS']} "
    f"-d{env['WRK_SECS']}s` rotates over them, after a 3-s unmeasured warm-up, in the order clubcast, nginx, nginx, clubcast. "
    "clubcast reads each run from `blocks.bin` by byte range; nginx sends a whole file.",
    "",
    "| server | requests/s | Gbit/s | latency p50 / p99 ms | server CPU s | requests per CPU-s | errors |",
    "|---|---|---|---|---|---|---|",
]
for n in ("clubcast", "nginx"):
    for label, r in [(f"**{n}** (both rounds)", o[n])] + [(f"{n} round {k + 1}", o[n]["rounds"][k]) for k in (0, 1)]:
        lines.append(f"| {label} | {r['req_per_s']:,} | {r['gbit_per_s']} | {r['latency_ms']['p50']} / {r['latency_ms']['p99']} | "
                     f"{r['server_cpu_s']} | {r['req_per_cpu_s']:,} | {r['errors']} |")
lines += ["", f"**clubcast ÷ nginx = {ratio}** (requests/s).", ""]
open(f"{out}/vod.md", "w").write("\n".join(lines))
print("\n".join(lines))
EOF
