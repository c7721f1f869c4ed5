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
