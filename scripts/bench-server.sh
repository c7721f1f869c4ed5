#!/usr/bin/env bash
# `just bench-server`: signaling at 10k WebSocket peers, origin blocks against nginx in the
# same run, and the seeder fan-out. Writes bench/results/server.md and server.json.
#
# Every server here is the release binary run directly, so the pid measured is the
# server's own. Traffic stays on 127.0.0.1. Knobs (environment):
#   BENCH_PEERS (10000)   BENCH_RELAY_RATE (20 msgs/s per peer)   BENCH_RELAY_SECS (20)
#   BENCH_WRK_SECS (15)   BENCH_WRK_CONNS (64)   BENCH_BLOCKS (200)   BENCH_SKIP_SEEDER (unset)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
TARGET="${CARGO_TARGET_DIR:-target}"
OUT="${ROOT}/bench/results"
PEERS="${BENCH_PEERS:-10000}"
RELAY_RATE="${BENCH_RELAY_RATE:-20}"
RELAY_SECS="${BENCH_RELAY_SECS:-20}"
WRK_SECS="${BENCH_WRK_SECS:-15}"
WRK_CONNS="${BENCH_WRK_CONNS:-64}"
BLOCKS="${BENCH_BLOCKS:-200}"
SIG_PORT=18180
ORIGIN_PORT=18181
NGINX_PORT=18182
# The origin bench must not be limited by gap-fill metering: 1 Tbit/s, all of it for
# requests without a grant token (what wrk and nginx clients are). Production defaults
# (100 Mbit/s, 25 % anonymous) are unchanged.
ORIGIN_BUDGET_ARGS=(--origin-budget-kbps 1000000000 --anonymous-budget-percent 100)

log() { echo "bench-server: $*" >&2; }

# --- tools -----------------------------------------------------------------------------
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian's packages"
    SUDO=""
    [[ "$(id -u)" == 0 ]] || SUDO="sudo"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${missing[@]}"
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

# 10k client sockets in one process and 10k server sockets in another.
ulimit -n "$(ulimit -Hn)"
if (($(ulimit -n) < PEERS + 1000)); then
    log "ulimit -n is $(ulimit -n) (hard limit); ${PEERS} peers need more than $((PEERS + 1000))"
    exit 1
fi

log "building (release)"
cargo build --release -p clubcast-server --bin clubcast-server \
    --example signal_load --example seeder_bench
SERVER="${TARGET}/release/clubcast-server"
LOAD="${TARGET}/release/examples/signal_load"
SEEDER_BENCH="${TARGET}/release/examples/seeder_bench"

WORK="$(mktemp -d)"
chmod 755 "${WORK}" # nginx workers run as nobody and read the block files here
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    rm -rf "${WORK}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server NAME PORT ARGS...: starts the release server, sets SERVER_PID, waits for
# /healthz and for the demo stream's first block.
start_server() {
    local name="$1" port="$2"
    shift 2
    mkdir -p "${WORK}/${name}-data" "${WORK}/static"
    "${SERVER}" --listen "127.0.0.1:${port}" --data-dir "${WORK}/${name}-data" \
        --static-dir "${WORK}/static" "$@" >"${WORK}/${name}.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("${SERVER_PID}")
    for _ in $(seq 1 100); do
        if curl -fsS "http://127.0.0.1:${port}/streams/demo" 2>/dev/null | jq -e '.live_edge != null' >/dev/null; then
            return 0
        fi
        kill -0 "${SERVER_PID}" 2>/dev/null || { cat "${WORK}/${name}.log" >&2; exit 1; }
        sleep 0.2
    done
    log "${name}: the demo stream did not start"
    cat "${WORK}/${name}.log" >&2
    exit 1
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

live_edge() { curl -fsS "http://127.0.0.1:$1/streams/demo" | jq -r '.live_edge'; }

# --- 1. signaling ----------------------------------------------------------------------
# --store-seconds 10: the demo's block ring is full before the idle RSS is read (after
# 12 s), so RSS growth during the run is the connections', not the store's.
log "signaling: ${PEERS} peers"
LOAD_SIGNALING="$(cut -d' ' -f1-3 /proc/loadavg)"
start_server signal "${SIG_PORT}" --store-seconds 10
SIG_PID="${SERVER_PID}"
sleep 12
"${LOAD}" --url "ws://127.0.0.1:${SIG_PORT}/ws" --stream demo --peers "${PEERS}" \
    --server-pid "${SIG_PID}" --clk-tck "$(getconf CLK_TCK)" \
    --relay-rate "${RELAY_RATE}" --relay-secs "${RELAY_SECS}" \
    --out "${WORK}/signaling.json" >/dev/null
curl -fsS "http://127.0.0.1:${SIG_PORT}/metrics" >"${WORK}/signal-metrics.txt" || true
stop_pid "${SIG_PID}"

# --- 2. origin vs nginx ----------------------------------------------------------------
LOAD_ORIGIN="$(cut -d' ' -f1-3 /proc/loadavg)"
log "origin: clubcast and nginx, ${BLOCKS} blocks each, wrk ${WRK_SECS} s x ${WRK_CONNS} connections"
start_server origin "${ORIGIN_PORT}" "${ORIGIN_BUDGET_ARGS[@]}"
ORIGIN_PID="${SERVER_PID}"
# Wait for BLOCKS blocks (the default 120-s store keeps them all through the run).
for _ in $(seq 1 600); do
    (($(live_edge "${ORIGIN_PORT}") + 1 >= BLOCKS)) && break
    sleep 0.2
done
EDGE="$(live_edge "${ORIGIN_PORT}")"
FIRST=$((EDGE + 1 - BLOCKS))
if ((FIRST < 0)); then
    log "only $((EDGE + 1)) blocks after 120 s"
    exit 1
fi
WWW="${WORK}/www"
mkdir -p "${WWW}/streams/demo/blocks"
for seq in $(seq "${FIRST}" "${EDGE}"); do
    curl -fsS -o "${WWW}/streams/demo/blocks/${seq}" "http://127.0.0.1:${ORIGIN_PORT}/streams/demo/blocks/${seq}"
done
chmod -R a+rX "${WWW}"
BLOCK_BYTES="$(cat "${WWW}"/streams/demo/blocks/* | wc -c)"
MEAN_BLOCK=$((BLOCK_BYTES / BLOCKS))

mkdir -p "${WORK}/nginx/logs"
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
    server {
        listen 127.0.0.1:${NGINX_PORT};
        root ${WWW};
        location / { }
    }
}
EOF
"${NGINX}" -p "${WORK}/nginx" -c "${WORK}/nginx/nginx.conf" 2>"${WORK}/nginx/stderr.log" &
NGINX_PID=$!
PIDS+=("${NGINX_PID}")
for _ in $(seq 1 50); do
    curl -fsS -o /dev/null "http://127.0.0.1:${NGINX_PORT}/streams/demo/blocks/${FIRST}" 2>/dev/null && break
    sleep 0.1
done
# Same bytes from both servers.
for seq in "${FIRST}" "${EDGE}"; do
    cmp <(curl -fsS "http://127.0.0.1:${NGINX_PORT}/streams/demo/blocks/${seq}") \
        <(curl -fsS "http://127.0.0.1:${ORIGIN_PORT}/streams/demo/blocks/${seq}")
done

cat >"${WORK}/rotate.lua" <<'EOF'
-- Rotates GETs over blocks FIRST .. FIRST+COUNT-1; done() prints one JSON line.
local first, count, i
init = function(args)
    first = tonumber(args[1])
    count = tonumber(args[2])
    i = math.random(0, count - 1)
end
request = function()
    i = (i + 1) % count
    return wrk.format("GET", "/streams/demo/blocks/" .. (first + i))
end
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        '{"requests":%d,"bytes":%d,"duration_us":%d,"non_2xx_3xx":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,"latency_p50_us":%d,"latency_p99_us":%d}\n',
        summary.requests, summary.bytes, summary.duration, e.status, e.connect, e.read, e.write,
        e.timeout, latency:percentile(50), latency:percentile(99)))
end
EOF

# run_wrk NAME PORT PID ROUND: wrk against one server; also the server's CPU seconds.
run_wrk() {
    local name="$1" port="$2" pid="$3" round="$4"
    local t0 t1
    # Warm up connections and caches, unmeasured.
    wrk -t2 -c"${WRK_CONNS}" -d3s -s "${WORK}/rotate.lua" "http://127.0.0.1:${port}" \
        -- "${FIRST}" "${BLOCKS}" >/dev/null
    t0="$(proc_cpu "${pid}")"
    wrk -t2 -c"${WRK_CONNS}" -d"${WRK_SECS}s" -s "${WORK}/rotate.lua" "http://127.0.0.1:${port}" \
        -- "${FIRST}" "${BLOCKS}" >"${WORK}/wrk-${name}-${round}.txt"
    t1="$(proc_cpu "${pid}")"
    tail -n 1 "${WORK}/wrk-${name}-${round}.txt" |
        jq -c --argjson cpu "$(((t1 - t0)))" --argjson tck "$(getconf CLK_TCK)" \
            '. + {server_cpu_s: ($cpu / $tck)}' >"${WORK}/wrk-${name}-${round}.json"
}
# utime + stime of a process and its reaped children are not what we want; nginx has
# workers, so sum the process group's members: the pid and its children.
proc_cpu() {
    local total=0 p
    for p in "$1" $(pgrep -P "$1" || true); do
        total=$((total + $(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/${p}/stat")))
    done
    echo "${total}"
}
# Order A B B A, so a drift in the machine's other load weighs on both alike.
run_wrk clubcast "${ORIGIN_PORT}" "${ORIGIN_PID}" 1
run_wrk nginx "${NGINX_PORT}" "${NGINX_PID}" 1
run_wrk nginx "${NGINX_PORT}" "${NGINX_PID}" 2
run_wrk clubcast "${ORIGIN_PORT}" "${ORIGIN_PID}" 2
curl -fsS "http://127.0.0.1:${ORIGIN_PORT}/metrics" >"${WORK}/origin-metrics.txt" || true
stop_pid "${NGINX_PID}"
stop_pid "${ORIGIN_PID}"

# --- 3. seeder fan-out -----------------------------------------------------------------
if [[ -z "${BENCH_SKIP_SEEDER:-}" ]]; then
    log "seeder: fanout --peers 50 (about 90 s)"
    "${SEEDER_BENCH}" fanout --peers 50 >"${WORK}/seeder.md"
else
    echo "(skipped: BENCH_SKIP_SEEDER was set)" >"${WORK}/seeder.md"
fi

# --- results ---------------------------------------------------------------------------
mkdir -p "${OUT}"
COMMIT="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- signal-server protocol || echo '+dirty')"
CPU_MODEL="$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" COMMIT="${COMMIT}" CPU_MODEL="${CPU_MODEL}" \
    NPROC="$(nproc)" KERNEL="$(uname -r)" MEAN_BLOCK="${MEAN_BLOCK}" BLOCKS="${BLOCKS}" \
    WRK_CONNS="${WRK_CONNS}" WRK_SECS="${WRK_SECS}" \
    LOAD_SIGNALING="${LOAD_SIGNALING}" LOAD_ORIGIN="${LOAD_ORIGIN}" \
    python3 - "${WORK}" "${OUT}" <<'EOF'
import json, os, sys
env = os.environ
work, out = sys.argv[1], sys.argv[2]
sig = json.load(open(f"{work}/signaling.json"))
rounds = {(n, k): json.loads(open(f"{work}/wrk-{n}-{k}.json").read()) for n in ("clubcast", "nginx") for k in (1, 2)}
def total(n):
    rs = [rounds[(n, k)] for k in (1, 2)]
    t = {key: sum(r[key] for r in rs) for key in ("requests", "bytes", "duration_us", "non_2xx_3xx", "connect_errors",
                                                 "read_errors", "write_errors", "timeouts", "server_cpu_s")}
    t["latency_p50_us"] = max(r["latency_p50_us"] for r in rs)
    t["latency_p99_us"] = max(r["latency_p99_us"] for r in rs)
    return t
wrk = {n: total(n) for n in ("clubcast", "nginx")}
mean_block = int(env["MEAN_BLOCK"])
blocks = int(env["BLOCKS"])
wrk_conns, wrk_secs = int(env["WRK_CONNS"]), int(env["WRK_SECS"])
def origin(w):
    secs = w["duration_us"] / 1e6
    return {
        "req_per_s": round(w["requests"] / secs),
        "gbit_per_s": round(w["requests"] * mean_block * 8 / secs / 1e9, 2),
        "wire_gbit_per_s": round(w["bytes"] * 8 / secs / 1e9, 2),
        "latency_ms": {"p50": w["latency_p50_us"] / 1000, "p99": w["latency_p99_us"] / 1000},
        "requests": w["requests"],
        "non_2xx_3xx": w["non_2xx_3xx"],
        "socket_errors": w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"],
        "server_cpu_s": round(w["server_cpu_s"], 2),
        "req_per_cpu_s": round(w["requests"] / w["server_cpu_s"]) if w["server_cpu_s"] else None,
    }
o = {n: origin(w) for n, w in wrk.items()}
for n in o:
    o[n]["rounds"] = [origin(rounds[(n, k)]) for k in (1, 2)]
round_ratios = [round(o["clubcast"]["rounds"][k]["req_per_s"] / o["nginx"]["rounds"][k]["req_per_s"], 2) for k in (0, 1)]
ratio = round(o["clubcast"]["req_per_s"] / o["nginx"]["req_per_s"], 2)
bad = [n for n in o if o[n]["non_2xx_3xx"] or o[n]["socket_errors"]]
seeder = open(f"{work}/seeder.md").read().strip()
result = {
    "date": env["DATE"],
    "commit": env["COMMIT"],
    "machine": {"nproc": int(env["NPROC"]), "cpu_model": env["CPU_MODEL"], "kernel": env["KERNEL"]},
    "command": "just bench-server",
    "loadavg_before": {"signaling": env["LOAD_SIGNALING"], "origin": env["LOAD_ORIGIN"]},
    "signaling": sig,
    "origin": {
        "blocks": blocks, "mean_block_bytes": mean_block,
        "wrk": {"threads": 2, "connections": wrk_conns, "seconds_per_round": wrk_secs, "rounds": 2, "order": "clubcast, nginx, nginx, clubcast"},
        "clubcast": o["clubcast"], "nginx": o["nginx"], "ratio": ratio, "round_ratios": round_ratios,
        "goal_ratio": 0.8, "valid": not bad,
    },
    "anchors_published_not_measured": {
        "aquatic_ws_responses_per_s_per_core": 120000,
        "wt_tracker_bytes_per_peer": 12000,
    },
}
json.dump(result, open(f"{out}/server.json", "w"), indent=2)
open(f"{out}/server.json", "a").write("\n")

s, r = sig, sig["relay"]
def fmt_counts(c, key):
    d = (c or {}).get(key) or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"
def mib(b): return b / 1048576
lines = [
 "# Server figures",
 "",
 f"Written by `just bench-server` ({result['date']}, commit {result['commit']}, "
 f"{result['machine']['nproc']} cores, {result['machine']['cpu_model']}, Linux {result['machine']['kernel']}). "
 "One run; the load generators share the 2 cores with the server, and other builds may run beside it "
 f"(load average before the signaling phase {env['LOAD_SIGNALING']}, before the origin phase {env['LOAD_ORIGIN']}). "
 "Release build, the server binary started directly so its own pid is measured. Machine-readable: `server.json`.",
 "",
 "## Signaling: one stream, WebSocket peers",
 "",
 f"{s['peers']:,} peers (`signal-server/examples/signal_load.rs`, one process, at most {s['connect_concurrency']} "
 "connecting at once) join the demo stream with `{\"type\":\"join\",\"v\":1,\"stream\":\"demo\"}`. "
 "Join latency is from sending `join` to receiving `welcome`. RSS per connection is "
 "(server VmRSS with all peers connected − VmRSS before the first connection) ÷ peers; the server runs with "
 "`--store-seconds 10` so the demo's block ring is already full when the idle figure is read. "
 f"Relay: every peer sends an ICE-candidate `signal` to its linked viewers, round-robin, at {r['rate_per_peer']}/s "
 "(the server's per-connection limit is 50/s, burst 100, and is not changed); the `signal` messages the peers "
 f"receive over {r['window_s']} s are divided by the server's utime + stime over the same window.",
 "",
 "| figure | clubcast (measured) | published anchor (not measured here) |",
 "|---|---|---|",
 f"| peers joined / failed | {s['joined']:,} / {s['join_failed']} | |",
 f"| join latency p50 / p99 (max) | {s['join_ms']['p50']} / {s['join_ms']['p99']} ms ({s['join_ms']['max']} ms) | |",
 f"| joins/s (all {s['peers']:,}, wall) | {s['joins_per_s']:,.0f} ({s['join_wall_s']} s, server CPU {s['join_server_cpu_s']} s) | |",
 f"| server RSS idle → {s['connected_before_relay']:,} connected | {mib(s['rss_idle_bytes']):.1f} → {mib(s['rss_connected_bytes']):.1f} MiB | |",
 f"| **RSS per connection** | **{s['rss_bytes_per_conn']/1024:.1f} KiB** | wt-tracker: 100k peers in 1.2 GB ≈ 12 KB/peer |",
 f"| relayed signals received / s (wall) | {r['received_per_s']:,.0f} of {r['sent_per_s']:,.0f} sent/s | |",
 f"| server CPU in the relay window | {r['server_cpu_s']} s = {r['server_cores_busy']} cores busy | |",
 f"| **relayed msgs / s per core** | **{s['relayed_msgs_per_s_per_core']:,.0f}** | aquatic_ws: ~120k responses/s per core |",
 f"| peers the server dropped (by reason): after the joins / after the relay | {fmt_counts(s['server_counters_after_join'], 'dropped')} / {fmt_counts(s['server_counters_after_relay'], 'dropped')} | |",
 f"| rate_limited / unknown_peer answers during the relay; peers lost in it | {r['rate_limited']} / {r['unknown_peer']}; {s['connected_before_relay'] - s['connected_after_relay']} | |",
 f"| server RSS after the relay phase | {mib(s['rss_after_relay_bytes']):.1f} MiB | |",
 "",
 "## Origin: `GET /streams/{id}/blocks/{seq}` against nginx, same run, same bytes",
 "",
 f"The demo's newest {result['origin']['blocks']} blocks (mean {mean_block:,} bytes) are fetched from clubcast and written as files "
 "that nginx (`sendfile on`, `worker_processes auto`, access log off, private config on its own loopback port) serves "
 f"under the same paths. `wrk -t2 -c{wrk_conns} -d{wrk_secs}s` with a Lua script that rotates over the seqs runs "
 "against each in turn, each time after a 3-s unmeasured warm-up, in the order clubcast, nginx, nginx, clubcast so that a "
 "drift in the machine's other load weighs on both alike; the totals are over both rounds, latency is the worse round's. "
 "Gap-fill metering would otherwise answer 429 once the anonymous bucket (25 % of 100 Mbit/s by default) is spent, so "
 "this server runs with `--origin-budget-kbps 1000000000 --anonymous-budget-percent 100`; "
 "the debit is still taken on every request. Gbit/s counts block bytes (requests × mean block size); "
 "any non-2xx/3xx answer or socket error marks the run invalid.",
 "",
 "| server | requests/s | Gbit/s (blocks) | latency p50 / p99 | server CPU s | requests per CPU-s | non-2xx / socket errors |",
 "|---|---|---|---|---|---|---|",
]
def row(label, x):
    lines.append(f"| {label} | {x['req_per_s']:,} | {x['gbit_per_s']} | {x['latency_ms']['p50']:.2f} / {x['latency_ms']['p99']:.2f} ms | "
                 f"{x['server_cpu_s']} | {x['req_per_cpu_s']:,} | {x['non_2xx_3xx']} / {x['socket_errors']} |")
for n in ("clubcast", "nginx"):
    row(f"**{n}** (both rounds)", o[n])
for label, n, k in (("clubcast round 1", "clubcast", 0), ("nginx round 1", "nginx", 0),
                    ("nginx round 2", "nginx", 1), ("clubcast round 2", "clubcast", 1)):
    row(label, o[n]["rounds"][k])
verdict = "meets" if ratio >= 0.8 else "misses"
lines += [
 "",
 f"**clubcast ÷ nginx = {ratio}** (goal ≥ 0.8: {verdict}; round 1 {round_ratios[0]}, round 2 {round_ratios[1]})." + ("" if not bad else f" **INVALID RUN: errors from {', '.join(bad)}.**"),
 "",
 "## Seeder fan-out (`seeder_bench fanout --peers 50`, this run)",
 "",
 "See `seeder.md` for the method and the loss runs.",
 "",
 seeder,
 "",
 "## Reproduce",
 "",
 "```",
 "just bench-server          # = scripts/bench-server.sh",
 "```",
 "",
]
open(f"{out}/server.md", "w").write("\n".join(lines))
if bad:
    sys.exit(f"bench-server: non-2xx responses or socket errors from {bad}")
EOF
log "wrote ${OUT}/server.md and ${OUT}/server.json"
