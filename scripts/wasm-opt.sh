#!/usr/bin/env bash
# Optional size pass over the bindgen output: `CLUBCAST_WASM_OPT=1 just build-web`.
# Uses wasm-opt from the npm package `binaryen` only, pinned below, installed
# into a cache directory. Debian's binaryen (v108) is never used: it emits
# modules that fail at instantiation for current rustc output.
set -euo pipefail
wasm="$1"
if [ "${CLUBCAST_WASM_OPT:-0}" != "1" ]; then
    exit 0
fi
BINARYEN_VERSION="132.0.0"
prefix="${XDG_CACHE_HOME:-$HOME/.cache}/clubcast/binaryen-${BINARYEN_VERSION}"
bin="${prefix}/node_modules/.bin/wasm-opt"
if [ ! -x "${bin}" ]; then
    echo "wasm-opt: installing npm binaryen@${BINARYEN_VERSION} into ${prefix}"
    mkdir -p "${prefix}"
    npm install --prefix "${prefix}" --no-save --no-audit --no-fund "binaryen@${BINARYEN_VERSION}" >/dev/null
fi
before="$(stat -c %s "${wasm}")"
"${bin}" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int \
    --enable-sign-ext --enable-mutable-globals --enable-reference-types \
    --enable-multivalue "${wasm}" -o "${wasm}.opt"
mv "${wasm}.opt" "${wasm}"
echo "wasm-opt: ${wasm} ${before} -> $(stat -c %s "${wasm}") bytes"
