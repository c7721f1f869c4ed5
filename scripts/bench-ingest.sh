#!/usr/bin/env bash
# `just bench-ingest`: the CPU cost of ingest, HTTP (fragmented MP4) against RTMP (FLV
# remuxed to fragmented MP4), on the same encoded frames, through the server's own code.
# Writes bench/results/ingest.md. Knobs (environment): BENCH_INGEST_SECS (60),
# BENCH_INGEST_ROUNDS (5).
set -euo pipefail

cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-target}"
OUT="bench/results"
SECS="${BENCH_INGEST_SECS:-60}"
ROUNDS="${BENCH_INGEST_ROUNDS:-5}"
TMP="$(mktemp -d)"
trap 'rm -rf "${TMP}"' EXIT

# One encode (720p30, 4 Mbit/s, a keyframe every 2 s, B-frames, AAC), as FLV; the same
# frames copied into fragmented MP4 as an HTTP publisher sends it (fragments at
# keyframes and every 500 ms, as the RTMP remuxer cuts).
ffmpeg -hide_banner -loglevel error -y \
  -f lavfi -i "testsrc2=size=1280x720:rate=30" -f lavfi -i "sine=frequency=440:sample_rate=48000" \
  -t "${SECS}" -c:v libx264 -preset veryfast -b:v 4M -maxrate 4M -bufsize 8M -g 60 -pix_fmt yuv420p \
  -c:a aac -b:a 128k -f flv "${TMP}/clip.flv"
ffmpeg -hide_banner -loglevel error -y -i "${TMP}/clip.flv" -c copy -f mp4 \
  -movflags frag_keyframe+empty_moov+default_base_moof -frag_duration 500000 "${TMP}/clip.mp4"

cargo build --release -p clubcast-server --example ingest_bench
table="$("${TARGET}/release/examples/ingest_bench" "${TMP}/clip.flv" "${TMP}/clip.mp4" "${SECS}" "${ROUNDS}")"

mkdir -p "${OUT}"
cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
{
  echo "# Ingest CPU cost: HTTP against RTMP"
  echo
  echo "Written by \`just bench-ingest\` ($(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD), $(nproc) cores, ${cpu}; load average before: $(cut -d' ' -f1-3 /proc/loadavg))."
  echo "One ffmpeg encode of ${SECS} s (1280x720, 30 fps, 4 Mbit/s, a keyframe every 2 s, B-frames, AAC 128 kbit/s)"
  echo "as FLV, and the same frames copied into fragmented MP4 (\`frag_keyframe\`, 500-ms fragments)."
  echo "Each path runs the server's own code on one thread (\`signal-server/examples/ingest_bench.rs\`):"
  echo "\`http\` is the splitter, the chunker and the signer (4-KiB blocks, ed25519) into a fresh stream;"
  echo "\`rtmp\` adds the FLV remuxer in front; \`remux only\` is the remuxer alone. Release build, best of ${ROUNDS} rounds."
  echo
  echo "${table}"
  echo
  echo "Reproduce: \`just bench-ingest\` (\`BENCH_INGEST_SECS\`, \`BENCH_INGEST_ROUNDS\`)."
} > "${OUT}/ingest.md"
cat "${OUT}/ingest.md"
