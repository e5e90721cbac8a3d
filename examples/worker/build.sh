#!/usr/bin/env bash
# Builds the Worker into build/ (index.js + index_bg.wasm) with worker-build, size-optimized.
# Needs worker-build, wasm-bindgen (the version in Cargo.lock) and `npm ci` (for wasm-opt);
# ci.sh installs them all.
set -euo pipefail
cd "$(dirname "$0")"
export WASM_BINDGEN_BIN="${WASM_BINDGEN_BIN:-$(command -v wasm-bindgen)}"
# wasm-opt from the pinned npm `binaryen` (worker-build would download it from GitHub).
export WASM_OPT_BIN="${WASM_OPT_BIN:-$PWD/node_modules/.bin/wasm-opt}"
# Own target dir: a wasm release build does not invalidate the host builds in target/.
export CARGO_TARGET_DIR="${WORKER_TARGET_DIR:-$PWD/../../target-wasm}"
export CARGO_PROFILE_RELEASE_OPT_LEVEL=z CARGO_PROFILE_RELEASE_LTO=true \
  CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 CARGO_PROFILE_RELEASE_DEBUG=false
exec worker-build --release "$@"
