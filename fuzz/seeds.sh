#!/usr/bin/env bash
# Seeds for the fmp4_split target: the test fixture's init segment, alone and
# followed by its first, first two and last fragments, each fragment's mdat cut
# to 64 zero bytes (the splitter reads no sample data). Each seed starts with
# the byte that picks the chunk size (0, 7, 255).
#   fuzz/seeds.sh <corpus dir>    (default: fuzz/corpus/fmp4_split)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-${here}/corpus/fmp4_split}"
mkdir -p "${out}"
python3 - "${here}/../signal-server/tests/fixtures/small.mp4" "${out}" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
boxes, i = [], 0
while i + 8 <= len(data):
    size, kind = struct.unpack(">I4s", data[i:i + 8])
    boxes.append((kind, data[i:i + size]))
    i += size
init = boxes[0][1] + boxes[1][1]
mdat = struct.pack(">I4s", 8 + 64, b"mdat") + bytes(64)
moofs = [b for k, b in boxes if k == b"moof"]
seeds = {
    "init": init,
    "first": init + moofs[0] + mdat,
    "two": init + moofs[0] + mdat + moofs[1] + mdat,
    "tail": init + moofs[-1] + mdat,
}
for name, seed in seeds.items():
    for cut in (0, 7, 255):
        open(f"{sys.argv[2]}/{name}-{cut}", "wb").write(bytes([cut]) + seed)
PY
echo "seeds in ${out}"

# Seeds for the flv_remux target: the FLV fixture's tags in the target's
# framing (kind byte, even for video, odd for audio, with the top bit asking
# for audio; 4-byte timestamp; 2-byte length; payload), whole and cut to its
# first 20 tags.
#   fuzz/seeds.sh <corpus dir> <flv corpus dir>  (default: fuzz/corpus/flv_remux)
flv_out="${2:-${here}/corpus/flv_remux}"
mkdir -p "${flv_out}"
python3 - "${here}/../signal-server/tests/fixtures/small.flv" "${flv_out}" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
i = struct.unpack(">I", data[5:9])[0] + 4
tags = []
while i + 11 <= len(data):
    kind = data[i]
    size = int.from_bytes(data[i + 1:i + 4], "big")
    ts = int.from_bytes(data[i + 4:i + 7], "big") | data[i + 7] << 24
    body = data[i + 11:i + 11 + size]
    if kind in (8, 9):
        tags.append(bytes([0x81 if kind == 8 else 0x80]) + struct.pack(">IH", ts, len(body)) + body)
    i += 11 + size + 4
open(f"{sys.argv[2]}/whole", "wb").write(b"".join(tags))
open(f"{sys.argv[2]}/first20", "wb").write(b"".join(tags[:20]))
PY
