#!/usr/bin/env bash
# Install, idempotently, only what the build and the tests need and is missing:
#   - the rustup target wasm32-unknown-unknown (and rustfmt/clippy),
#   - wasm-bindgen-cli at exactly the wasm-bindgen version in Cargo.lock
#     (the CLI and the library must match, or bindgen refuses the module),
#   - chromium, chromium-driver and ffmpeg from Debian's packages.
# Nothing here downloads a browser or a binary from outside the package
# registries: the browser is Debian's, and the CLI is built from crates.io.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'setup: %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Rust toolchain pieces.
if ! rustup target list --installed | grep -qx 'wasm32-unknown-unknown'; then
    log "adding rustup target wasm32-unknown-unknown"
    rustup target add wasm32-unknown-unknown
fi
for component in rustfmt clippy; do
    if ! rustup component list --installed | grep -q "^${component}"; then
        log "adding rustup component ${component}"
        rustup component add "${component}"
    fi
done

# wasm-bindgen-cli pinned to Cargo.lock.
want="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)"
if [ -z "${want}" ]; then
    echo "setup: no wasm-bindgen entry in Cargo.lock" >&2
    exit 1
fi
have="$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }' || true)"
have_runner="$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{ print $2 }' || true)"
if [ "${have}" != "${want}" ] || [ "${have_runner}" != "${want}" ]; then
    log "installing wasm-bindgen-cli ${want} (found '${have:-none}')"
    cargo install wasm-bindgen-cli --version "${want}"
fi

# Browser, driver and encoder from the Debian archive.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
if [ "${#missing[@]}" -gt 0 ]; then
    log "apt installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    ${SUDO} apt-get update
    ${SUDO} apt-get install -y --no-install-recommends "${missing[@]}"
fi

log "ok (wasm-bindgen ${want}, $(chromium --version 2>/dev/null | head -n1))"
