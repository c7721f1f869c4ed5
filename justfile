# clubcast task runner. `just setup` once, then `just demo`, `just test`, `just bench`.
# Every recipe uses the default cargo target dir (or $CARGO_TARGET_DIR if set).

set shell := ["bash", "-euo", "pipefail", "-c"]

target_dir := env_var_or_default("CARGO_TARGET_DIR", "target")
results := "bench/results"
# The simulator (`just sim`, `just bench-sim`) is built for the CPU it runs on:
# a sweep runs where it was built. The same figures, and faster (`sim.md`).
sim_rustflags := trim(env_var_or_default("RUSTFLAGS", "") + " -C target-cpu=native")

# List the recipes.
default:
    @just --list

# Install what is missing: wasm32 target, wasm-bindgen-cli pinned to Cargo.lock, chromium, chromedriver, ffmpeg.
setup:
    scripts/setup.sh

# Build the browser peer into web/pkg (set CLUBCAST_WASM_OPT=1 for an npm-binaryen wasm-opt pass).
build-web: setup
    cargo build -p clubcast-peer --target wasm32-unknown-unknown --release
    wasm-bindgen --target web --out-dir web/pkg {{target_dir}}/wasm32-unknown-unknown/release/clubcast_peer.wasm
    scripts/wasm-opt.sh web/pkg/clubcast_peer_bg.wasm
    @echo "web/pkg/clubcast_peer_bg.wasm: $(stat -c %s web/pkg/clubcast_peer_bg.wasm) bytes"

# Run the server with the built-in demo stream at http://127.0.0.1:8080/.
demo: setup build-web
    cargo run --release -p clubcast-server -- --listen 127.0.0.1:8080 --static-dir web

# Format the workspace and the fuzz targets.
fmt:
    cargo fmt --all
    cargo fmt --manifest-path fuzz/Cargo.toml --all

# Format check and clippy -D warnings: native, wasm32, and the fuzz targets;
# the API docs build without a broken link.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy -p clubcast-peer --target wasm32-unknown-unknown --all-targets -- -D warnings
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
    # The fuzz targets live outside the workspace (cargo-fuzz needs nightly);
    # on stable this proves they still compile and that fuzz/Cargo.lock is current.
    cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check
    cargo clippy --manifest-path fuzz/Cargo.toml --locked -- -D warnings

# Everything CI runs: lint, native tests, then the peer's tests in headless Chromium.
test: setup build-web lint
    cargo test --workspace
    just test-wasm

# The peer's wasm-bindgen tests in headless Chromium (flags in peer-wasm/webdriver.json).
test-wasm:
    #!/usr/bin/env bash
    set -euo pipefail
    # Each run gets a fresh TMPDIR, so chromedriver's per-session --user-data-dir
    # lands in a private directory and no two browsers share a profile.
    export TMPDIR="$(mktemp -d)"
    trap 'rm -rf "${TMPDIR}"' EXIT
    export CHROMEDRIVER="${CHROMEDRIVER:-$(command -v chromedriver)}"
    export WASM_BINDGEN_TEST_WEBDRIVER_JSON="{{justfile_directory()}}/peer-wasm/webdriver.json"
    export WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-120}"
    cargo test -p clubcast-peer --target wasm32-unknown-unknown

# Swarm simulator: clubs against the server-only and mesh-pull baselines.
sim *ARGS:
    RUSTFLAGS="{{sim_rustflags}}" cargo run --profile sim -p clubcast-sim -- --compare {{ARGS}}

# All benchmarks; each writes markdown + JSON into bench/results/.
bench: bench-sim bench-server bench-e2e bench-loss bench-ingest bench-vod bench-vod-swarm

# Simulator scaling sweep (clubs vs baselines, same run); e.g. `just bench-sim --bench-peers 100,1000`.
bench-sim *ARGS:
    mkdir -p {{results}}
    RUSTFLAGS="{{sim_rustflags}}" cargo run --profile sim -p clubcast-sim -- --compare --bench --out {{results}} {{ARGS}}

# Server ingest/sign/seed/origin throughput.
bench-server:
    scripts/bench-server.sh

# Ingest CPU cost: HTTP (fMP4) against RTMP (FLV remuxed), same frames, same run.
bench-ingest:
    scripts/bench-ingest.sh

# On-demand uploads against copying the file, and block runs against nginx, same run.
bench-vod:
    scripts/bench-vod.sh

# One server and N headless-Chromium peers, measured end to end.
bench-e2e: setup build-web
    #!/usr/bin/env bash
    set -euo pipefail
    # A private TMPDIR: every browser's profile and chromedriver files land there.
    export TMPDIR="$(mktemp -d)"
    trap 'rm -rf "${TMPDIR}"' EXIT
    mkdir -p {{results}}
    # The server as `just demo` runs it: the release build.
    cargo build --release -p clubcast-server
    export CLUBCAST_SERVER_BIN="$(realpath {{target_dir}})/release/clubcast-server"
    # 12 browsers with P2P on, then off, then the same with 6 (labelled rows).
    cargo run -p clubcast-tests --bin bench_e2e -- --browsers 12 --secs 60 --extra 6 \
        --out {{results}} --command "just bench-e2e"

# On-demand viewers, staggered, with P2P on and then off, unmetered and on a capped origin budget: the origin's egress and stalls, same run.
bench-vod-swarm *ARGS: setup build-web
    #!/usr/bin/env bash
    set -euo pipefail
    export TMPDIR="$(mktemp -d)"
    trap 'rm -rf "${TMPDIR}"' EXIT
    mkdir -p {{results}}
    cargo build --release -p clubcast-server
    export CLUBCAST_SERVER_BIN="$(realpath {{target_dir}})/release/clubcast-server"
    # Unmetered, then with the origin's on-demand budget at 2x the bitrate (bids).
    cargo run -p clubcast-tests --bin bench_vod_swarm -- --out {{results}} --capped-kbps 4000 \
        --command "just bench-vod-swarm" {{ARGS}}

# The seeder's WebRTC link to one headless Chromium through a UDP relay that drops 0, 2, 5 and 10 % of datagrams.
bench-loss *ARGS: setup build-web
    #!/usr/bin/env bash
    set -euo pipefail
    export TMPDIR="$(mktemp -d)"
    trap 'rm -rf "${TMPDIR}"' EXIT
    mkdir -p {{results}}
    cargo build --release -p clubcast-server
    export CLUBCAST_SERVER_BIN="$(realpath {{target_dir}})/release/clubcast-server"
    cargo run -p clubcast-tests --bin bench_loss -- --loss 0,2,5,10 --secs 60 \
        --out {{results}} --command "just bench-loss" {{ARGS}}
