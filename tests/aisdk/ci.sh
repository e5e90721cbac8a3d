#!/usr/bin/env bash
# The AI SDK suites, run by scripts/test-all.sh (and so by .ci/run):
#   - protocol conformance: the example server's streams through the real
#     `ai` client code, every pinned major (7.x, 6.x, 5.x);
#   - browser end-to-end: examples/web (useChat) in Debian's Chromium.
# Both on SQLite and on a fresh Postgres database each.
# Idempotent: installs Chromium and the npm packages only when missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

step() { printf '\n--- aisdk: %s ---\n' "$*"; }

if [[ ! -x /usr/bin/chromium ]]; then
  step "installing Debian chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi
/usr/bin/chromium --version

# `npm ci` only when the lock file changed since the last install.
npm_install() {
  local dir="$1"
  if [[ ! -f "$dir/node_modules/.package-lock.json" ]] ||
    ! cmp -s "$dir/package-lock.json" "$dir/node_modules/.aisdk-installed-lock"; then
    step "npm ci in ${dir#"$root"/}"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    cp "$dir/package-lock.json" "$dir/node_modules/.aisdk-installed-lock"
  fi
}
npm_install "$here"
npm_install "$root/examples/web"

step "building examples/web"
(cd "$root/examples/web" && npm run --silent build -- --logLevel warn)

step "building the example server"
# Same features as the workspace-wide `cargo nextest --all-features` run before
# this script in scripts/test-all.sh, so the binary it built is reused.
cargo build --workspace --all-features --bin chat-server-example
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
export CHAT_SERVER_BIN="$target_dir/debug/chat-server-example"

export AISDK_DBS="${AISDK_DBS:-sqlite,postgres}"
cd "$here"
step "protocol conformance (ai 7.x, 6.x, 5.x) on $AISDK_DBS"
node --test --test-reporter=spec conformance.test.mjs
step "browser end-to-end (Chromium) on $AISDK_DBS; screenshots in tests/aisdk/artifacts/"
node --test --test-reporter=spec browser.test.mjs
step "the example server's built-in page (Chromium) on $AISDK_DBS"
node --test --test-reporter=spec builtin-page.test.mjs
