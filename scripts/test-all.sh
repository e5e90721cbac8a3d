#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, every Rust test (SQLite,
# Postgres, fake OpenAI server, real HTTP server), then the Node/browser/workerd
# suites. Needs Postgres at 127.0.0.1:5432 and Redis at 127.0.0.1:6379 (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s ===\n' "$*"; }

if ! command -v cargo-nextest >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (workspace, all targets, -D warnings)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "cargo nextest (workspace)"
cargo nextest run --workspace --all-features --no-fail-fast

step "doc tests"
cargo test --workspace --all-features --doc

step "benches build"
cargo bench --workspace --no-run

# Suites outside cargo, each an idempotent script that installs what it needs.
for suite in examples/worker/ci.sh tests/aisdk/ci.sh tests/multi-instance/ci.sh; do
  if [[ -x "$suite" ]]; then
    step "$suite"
    "$suite"
  fi
done

step "all tests passed"
